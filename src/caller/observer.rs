//! What the synthetic caller makes of the server's messages: a sans-IO analyser fed each
//! decoded message with its arrival offset from the call start. It judges every message the
//! way Asterisk would, measures pacing (jitter, gaps, how far ahead of real time the server
//! ran) and rebuilds the audio the caller would have heard.

use std::collections::BTreeMap;
use std::time::Duration;

use super::resample_linear;
use super::script::{sample_time, samples_in};
use crate::audio::pcm;
use crate::audiosocket::{RawFrame, SampleRate};

/// A received frame whose level is at or below this is silence (about 33 RMS on 16 bits).
pub const SILENCE_DBFS: f64 = -60.0;

/// A frame arriving at most this much after the end of what is already recorded is appended
/// right after it instead of at its arrival time, so ordinary network jitter does not chop
/// the recording into clicks (this is the small jitter buffer a phone would have).
pub const GAP_TOLERANCE: Duration = Duration::from_millis(20);

/// At most this many violation messages are kept; the rest are only counted.
const MAX_VIOLATIONS: usize = 32;
/// At most this many jitter samples are kept for the percentiles (the maximum is exact).
const MAX_JITTER_SAMPLES: usize = 1 << 20;
/// At most this many frame arrivals are kept (about 5.8 hours of 20 ms frames).
const MAX_ARRIVALS: usize = 1 << 20;

const KIND_HANGUP: u8 = 0x00;

/// What the caller does after a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Keep the call up.
    Continue,
    /// The server sent 0x00: end the call gracefully.
    Hangup,
    /// The server sent something Asterisk aborts the call on.
    Abort(String),
}

/// The receive side of one call.
#[derive(Debug)]
pub(super) struct Observer {
    rate: SampleRate,
    abort_on_violation: bool,
    recording_cap: usize,
    pub(super) messages_received: u64,
    pub(super) frames_received: u64,
    pub(super) bytes_received: u64,
    pub(super) audio_received: Duration,
    pub(super) rates: Vec<u32>,
    violations: Vec<String>,
    pub(super) violation_count: u64,
    pub(super) first_frame_at: Option<Duration>,
    pub(super) first_voiced_at: Option<Duration>,
    pub(super) reply_at: Option<Duration>,
    last_audio: Option<(Duration, Duration)>,
    jitter: Vec<f64>,
    jitter_max: f64,
    jitter_count: u64,
    last_any: Duration,
    pub(super) max_gap: Duration,
    pub(super) hangup_at: Option<Duration>,
    after_hangup: (u64, u64),
    odd: Option<(u64, usize)>,
    off_rate: BTreeMap<u32, u64>,
    pub(super) recording: Vec<i16>,
    recording_truncated: bool,
    pub(super) max_queue: Duration,
    /// Every audio frame as it was read from the socket, in order (bounded).
    pub(super) arrivals: Vec<FrameArrival>,
}

/// One audio frame as the caller read it: when, and whether it held sound.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FrameArrival {
    /// Read from the socket this long after the call start, in ms.
    pub at_ms: f64,
    /// Louder than [`SILENCE_DBFS`]: the caller hears the agent in this frame.
    pub voiced: bool,
}

/// Distribution of `|inter-arrival gap - previous frame's duration|` in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct JitterStats {
    /// How many consecutive pairs of audio frames were measured.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Worst.
    pub max: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or(0.0)
}

impl Observer {
    /// `limit` bounds the recording (in call time) so a flooding server cannot exhaust memory.
    pub(super) fn new(rate: SampleRate, abort_on_violation: bool, limit: Duration) -> Self {
        Self {
            rate,
            abort_on_violation,
            recording_cap: samples_in(limit, rate),
            messages_received: 0,
            frames_received: 0,
            bytes_received: 0,
            audio_received: Duration::ZERO,
            rates: Vec::new(),
            violations: Vec::new(),
            violation_count: 0,
            first_frame_at: None,
            first_voiced_at: None,
            reply_at: None,
            last_audio: None,
            jitter: Vec::new(),
            jitter_max: 0.0,
            jitter_count: 0,
            last_any: Duration::ZERO,
            max_gap: Duration::ZERO,
            hangup_at: None,
            after_hangup: (0, 0),
            odd: None,
            off_rate: BTreeMap::new(),
            recording: Vec::new(),
            recording_truncated: false,
            max_queue: Duration::ZERO,
            arrivals: Vec::new(),
        }
    }

    fn violation(&mut self, msg: String) {
        self.violation_count += 1;
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(msg);
        }
    }

    /// Records a stream error that is the server's fault (a message cut off by EOF).
    pub(super) fn violation_from_error(&mut self, e: &crate::audiosocket::FrameError) {
        self.violation(e.to_string());
    }

    fn fatal(&mut self, msg: String) -> Verdict {
        self.violation(msg.clone());
        if self.abort_on_violation {
            Verdict::Abort(msg)
        } else {
            Verdict::Continue
        }
    }

    /// Takes one message that arrived `at` after the call start. `play_done` is when the
    /// frame holding the last played sample was sent, if it has been.
    pub(super) fn on_frame(
        &mut self,
        at: Duration,
        frame: RawFrame,
        play_done: Option<Duration>,
    ) -> Verdict {
        let len = frame.payload.len();
        self.messages_received += 1;
        self.bytes_received += (crate::audiosocket::HEADER_LEN + len) as u64;
        if self.hangup_at.is_some() {
            self.after_hangup.0 += 1;
            self.after_hangup.1 += (crate::audiosocket::HEADER_LEN + len) as u64;
            return Verdict::Continue;
        }
        self.max_gap = self.max_gap.max(at.saturating_sub(self.last_any));
        self.last_any = self.last_any.max(at);
        if frame.kind == KIND_HANGUP {
            if len > 0 {
                self.violation(format!("hangup (0x00) with a {len}-byte payload"));
            }
            self.hangup_at = Some(at);
            return Verdict::Hangup;
        }
        let Some(rate) = SampleRate::from_kind(frame.kind) else {
            return self.fatal(format!(
                "forbidden message kind 0x{:02x} ({len} bytes) from the server: Asterisk aborts the call",
                frame.kind
            ));
        };
        if len == 0 {
            return self.fatal(format!(
                "zero-length audio frame (kind 0x{:02x}): Asterisk aborts the call",
                frame.kind
            ));
        }
        if !len.is_multiple_of(2) {
            let odd = self.odd.get_or_insert((0, len));
            odd.0 += 1;
        }
        if !self.rates.contains(&rate.hz()) {
            self.rates.push(rate.hz());
        }
        let mut samples = pcm::le_bytes_to_samples(&frame.payload);
        let dur = sample_time(samples.len(), rate);
        if rate != self.rate {
            *self.off_rate.entry(rate.hz()).or_default() += 1;
            samples = resample_linear(&samples, rate.hz(), self.rate.hz());
        }
        self.frames_received += 1;
        self.audio_received += dur;
        self.first_frame_at.get_or_insert(at);
        let voiced = pcm::dbfs(&samples) > SILENCE_DBFS;
        if self.arrivals.len() < MAX_ARRIVALS {
            self.arrivals.push(FrameArrival {
                at_ms: ms(at),
                voiced,
            });
        }
        if voiced {
            self.first_voiced_at.get_or_insert(at);
            if self.reply_at.is_none() && play_done.is_some_and(|p| at >= p) {
                self.reply_at = Some(at);
            }
        }
        if let Some((prev_at, prev_dur)) = self.last_audio {
            let gap = ms(at.saturating_sub(prev_at));
            let j = (gap - ms(prev_dur)).abs();
            self.jitter_count += 1;
            self.jitter_max = self.jitter_max.max(j);
            if self.jitter.len() < MAX_JITTER_SAMPLES {
                self.jitter.push(j);
            }
        }
        self.last_audio = Some((at, dur));
        self.record(at, &samples);
        Verdict::Continue
    }

    /// Places a frame on the timeline: at its arrival time if that is more than
    /// [`GAP_TOLERANCE`] past the end of the recording (the gap becomes silence), otherwise
    /// right after the end, so bursts and early frames are kept, in order, never overlapped.
    fn record(&mut self, at: Duration, samples: &[i16]) {
        let pos = samples_in(at, self.rate);
        if pos > self.recording.len() + samples_in(GAP_TOLERANCE, self.rate) {
            let fill = pos.min(self.recording_cap);
            self.recording.resize(fill.max(self.recording.len()), 0);
        }
        let room = self.recording_cap.saturating_sub(self.recording.len());
        if room < samples.len() {
            self.recording_truncated = true;
        }
        self.recording
            .extend_from_slice(&samples[..room.min(samples.len())]);
        let end = sample_time(self.recording.len(), self.rate);
        let arrived_end = at + sample_time(samples.len(), self.rate);
        self.max_queue = self.max_queue.max(end.saturating_sub(arrived_end));
    }

    /// Closes the books when the call ends `end` after its start; returns the violations.
    pub(super) fn finish(&mut self, end: Duration) -> Vec<String> {
        let until = self.hangup_at.unwrap_or(end);
        self.max_gap = self.max_gap.max(until.saturating_sub(self.last_any));
        if let Some((n, first)) = self.odd.take() {
            self.violation(format!(
                "{n} audio frame(s) of odd length (first: {first} bytes): half a sample shifts the stream"
            ));
        }
        for (hz, n) in std::mem::take(&mut self.off_rate) {
            self.violation(format!(
                "{n} audio frame(s) at {hz} Hz on a {} Hz call",
                self.rate.hz()
            ));
        }
        if self.after_hangup.0 > 0 {
            self.violation(format!(
                "{} message(s), {} bytes after the server's hangup (0x00)",
                self.after_hangup.0, self.after_hangup.1
            ));
        }
        if self.recording_truncated {
            self.violation(format!(
                "the server sent far more audio than real time; recording cut at {} samples",
                self.recording_cap
            ));
        }
        if self.violation_count > self.violations.len() as u64 {
            let more = self.violation_count - self.violations.len() as u64;
            self.violations
                .push(format!("... and {more} more violation(s)"));
        }
        std::mem::take(&mut self.violations)
    }

    /// Percentiles of the measured jitter.
    pub(super) fn jitter_stats(&mut self) -> JitterStats {
        self.jitter.sort_by(f64::total_cmp);
        JitterStats {
            count: self.jitter_count,
            p50: percentile(&self.jitter, 50.0),
            p99: percentile(&self.jitter, 99.0),
            max: self.jitter_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn audio(kind: u8, samples: &[i16]) -> RawFrame {
        let mut b = Vec::new();
        pcm::samples_to_le_bytes(samples, &mut b);
        RawFrame {
            kind,
            payload: Bytes::from(b),
        }
    }

    fn t(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn obs() -> Observer {
        Observer::new(SampleRate::Hz8000, true, Duration::from_secs(60))
    }

    #[test]
    fn recording_places_frames_on_the_timeline() {
        let mut o = obs();
        let tone = vec![1000i16; 160];
        // Jitter within the tolerance: appended contiguously.
        o.on_frame(t(5), audio(0x10, &tone), None);
        o.on_frame(t(27), audio(0x10, &tone), None);
        assert_eq!(o.recording.len(), 320);
        // A 100 ms pause: the gap is silence, the frame lands at its arrival time.
        o.on_frame(t(200), audio(0x10, &tone), None);
        assert_eq!(o.recording.len(), 1600 + 160);
        assert!(o.recording[320..1600].iter().all(|&s| s == 0));
        assert_eq!(o.recording[1600], 1000);
        // A burst of three frames at once: all kept, one after the other.
        for _ in 0..3 {
            o.on_frame(t(220), audio(0x10, &[-5; 160]), None);
        }
        assert_eq!(o.recording.len(), 1760 + 480);
        assert_eq!(o.max_queue, t(40));
        assert!(o.finish(t(300)).is_empty());
        assert_eq!(o.max_gap, t(200 - 27));
    }

    #[test]
    fn jitter_gaps_and_latencies() {
        let mut o = obs();
        let silent = vec![0i16; 160];
        let loud = vec![3000i16; 160];
        o.on_frame(t(100), audio(0x10, &silent), None);
        o.on_frame(t(120), audio(0x10, &silent), Some(t(110)));
        o.on_frame(t(145), audio(0x10, &loud), Some(t(110)));
        o.on_frame(t(160), audio(0x10, &loud), Some(t(110)));
        assert_eq!(o.first_frame_at, Some(t(100)));
        assert_eq!(o.first_voiced_at, Some(t(145)));
        let arrivals: Vec<(f64, bool)> = o.arrivals.iter().map(|a| (a.at_ms, a.voiced)).collect();
        assert_eq!(
            arrivals,
            [(100.0, false), (120.0, false), (145.0, true), (160.0, true)]
        );
        assert_eq!(o.reply_at, Some(t(145)));
        let j = o.jitter_stats();
        assert_eq!(j.count, 3);
        assert!((j.max - 5.0).abs() < 1e-9 && (j.p50 - 5.0).abs() < 1e-9);
        o.finish(t(1000));
        assert_eq!(o.max_gap, t(840));
    }

    #[test]
    fn forbidden_kinds_abort_like_asterisk() {
        for kind in [0x01u8, 0x03, 0x02, 0x19, 0xff] {
            let mut o = obs();
            let v = o.on_frame(
                t(1),
                RawFrame {
                    kind,
                    payload: Bytes::from_static(&[1; 16]),
                },
                None,
            );
            assert!(matches!(v, Verdict::Abort(ref m) if m.contains(&format!("0x{kind:02x}"))));
        }
        let mut o = obs();
        assert!(matches!(
            o.on_frame(t(1), audio(0x10, &[]), None),
            Verdict::Abort(_)
        ));
        let mut lenient = Observer::new(SampleRate::Hz8000, false, t(1000));
        let v = lenient.on_frame(
            t(1),
            RawFrame {
                kind: 0x01,
                payload: Bytes::new(),
            },
            None,
        );
        assert_eq!(v, Verdict::Continue);
        assert_eq!(lenient.finish(t(2)).len(), 1);
    }

    #[test]
    fn soft_violations_are_summarised() {
        let mut o = obs();
        o.on_frame(
            t(0),
            RawFrame {
                kind: 0x10,
                payload: Bytes::from_static(&[1, 2, 3]),
            },
            None,
        );
        o.on_frame(t(20), audio(0x12, &[500; 320]), None);
        o.on_frame(t(40), audio(0x12, &[500; 320]), None);
        assert_eq!(
            o.on_frame(
                t(60),
                RawFrame {
                    kind: 0,
                    payload: Bytes::new()
                },
                None
            ),
            Verdict::Hangup
        );
        o.on_frame(t(61), audio(0x10, &[1; 160]), None);
        let v = o.finish(t(100));
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(v[0].contains("odd length"));
        assert!(v[1].contains("2 audio frame(s) at 16000 Hz"));
        assert!(v[2].contains("323 bytes after the server's hangup"));
        assert_eq!(o.rates, vec![8000, 16000]);
        // The 16 kHz frames were resampled onto the 8 kHz timeline.
        assert_eq!(o.recording.len(), 1 + 160 + 160);
        assert_eq!(o.frames_received, 3);
        assert_eq!(o.hangup_at, Some(t(60)));
    }

    #[test]
    fn recording_is_bounded() {
        let mut o = Observer::new(SampleRate::Hz8000, true, t(50));
        for _ in 0..10 {
            o.on_frame(t(0), audio(0x10, &[9; 160]), None);
        }
        assert_eq!(o.recording.len(), 400);
        assert!(o.finish(t(1)).iter().any(|v| v.contains("recording cut")));
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
