//! What the synthetic caller sends and when: a sans-IO plan of audio frames, DTMF digits
//! and the hangup, each at an absolute offset from the start of the call.
//!
//! Frame `n` is due when the samples before it would have been captured: `samples_before /
//! rate`, computed in integer nanoseconds from the call start, so the schedule never drifts
//! however long the call, and frames of varying size (a `[320, 288]` byte pattern) keep the
//! stream exactly real-time.

use std::collections::VecDeque;
use std::time::Duration;

use crate::audiosocket::{Digit, SampleRate};

/// The next thing the caller does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Send one audio message with these samples.
    Audio {
        /// The samples (never empty).
        samples: Vec<i16>,
        /// This frame carries the last sample of the played audio.
        ends_play: bool,
    },
    /// Send one DTMF message.
    Dtmf(Digit),
    /// Close the socket.
    Hangup,
}

/// The send plan of one call.
#[derive(Debug)]
pub(super) struct Script {
    rate: SampleRate,
    /// Samples of lead silence before `play`.
    lead: usize,
    /// The played audio.
    play: Vec<i16>,
    /// Samples per frame, cycled.
    pattern: Vec<usize>,
    next_pattern: usize,
    /// Samples already sent (including silence after `audio`).
    pos: usize,
    dtmf: VecDeque<(Duration, Digit)>,
    hangup_at: Duration,
    done: bool,
}

/// Offset of a sample position from the call start, exact to the nanosecond.
pub(super) fn sample_time(pos: usize, rate: SampleRate) -> Duration {
    let nanos = (pos as u128) * 1_000_000_000 / u128::from(rate.hz());
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Samples covering `d` at `rate`, rounded to the nearest sample.
pub(super) fn samples_in(d: Duration, rate: SampleRate) -> usize {
    let n = (d.as_nanos() * u128::from(rate.hz()) + 500_000_000) / 1_000_000_000;
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Inputs of [`Script::new`].
#[derive(Debug)]
pub(super) struct ScriptSpec<'a> {
    pub(super) rate: SampleRate,
    pub(super) play: &'a [i16],
    pub(super) lead_silence: Duration,
    pub(super) tail: Duration,
    /// Samples per frame, cycled; every entry non-zero.
    pub(super) pattern: Vec<usize>,
    pub(super) dtmf: &'a [(Duration, Digit)],
    pub(super) hangup_after: Option<Duration>,
    pub(super) until_server_hangup: bool,
    pub(super) max_duration: Duration,
}

impl Script {
    pub(super) fn new(spec: ScriptSpec<'_>) -> Self {
        let mut pattern = spec.pattern;
        pattern.retain(|&n| n > 0);
        if pattern.is_empty() {
            pattern.push(spec.rate.samples_per_frame());
        }
        let lead = samples_in(spec.lead_silence, spec.rate);
        let natural_end = if spec.until_server_hangup {
            None
        } else {
            // The audio and the tail go out as whole frames; hang up when the next frame
            // would be due.
            let total = lead
                .saturating_add(spec.play.len())
                .saturating_add(samples_in(spec.tail, spec.rate));
            let mut pos = 0usize;
            for len in pattern.iter().cycle() {
                if pos >= total {
                    break;
                }
                pos += len;
            }
            Some(sample_time(pos, spec.rate))
        };
        // An explicit hang-up time wins (the line stays up with silence until then);
        // otherwise the call ends after the audio and its tail. Never past max_duration.
        let hangup_at = spec
            .hangup_after
            .or(natural_end)
            .map_or(spec.max_duration, |t| t.min(spec.max_duration));
        let mut dtmf: Vec<(Duration, Digit)> = spec.dtmf.to_vec();
        dtmf.sort_by_key(|&(at, _)| at);
        Self {
            rate: spec.rate,
            lead,
            play: spec.play.to_vec(),
            pattern,
            next_pattern: 0,
            pos: 0,
            dtmf: dtmf.into(),
            hangup_at,
            done: false,
        }
    }

    /// When the call will be hung up by the caller at the latest.
    pub(super) fn hangup_at(&self) -> Duration {
        self.hangup_at
    }

    /// The next action and its offset from the call start, in time order; ties go to the
    /// hangup first, then audio, then DTMF. After the hangup it keeps returning the hangup.
    pub(super) fn next_action(&mut self) -> (Duration, Action) {
        if self.done {
            return (self.hangup_at, Action::Hangup);
        }
        let frame_at = sample_time(self.pos, self.rate);
        let dtmf_at = self.dtmf.front().map(|&(at, _)| at);
        if self.hangup_at <= frame_at && dtmf_at.is_none_or(|d| self.hangup_at <= d) {
            self.done = true;
            return (self.hangup_at, Action::Hangup);
        }
        if let Some((at, digit)) = self.dtmf.front().copied()
            && at < frame_at
        {
            self.dtmf.pop_front();
            return (at, Action::Dtmf(digit));
        }
        let len = self.pattern.get(self.next_pattern).copied().unwrap_or(1);
        self.next_pattern = (self.next_pattern + 1) % self.pattern.len().max(1);
        let start = self.pos;
        let end = start + len;
        let mut samples = vec![0i16; len];
        let play_end = self.lead + self.play.len();
        // The part of [start, end) that overlaps the played audio.
        let from = start.max(self.lead);
        let to = end.min(play_end);
        if from < to
            && let (Some(dst), Some(src)) = (
                samples.get_mut(from - start..to - start),
                self.play.get(from - self.lead..to - self.lead),
            )
        {
            dst.copy_from_slice(src);
        }
        let ends_play = !self.play.is_empty() && start < play_end && play_end <= end;
        self.pos = end;
        (frame_at, Action::Audio { samples, ends_play })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(play: &[i16]) -> ScriptSpec<'_> {
        ScriptSpec {
            rate: SampleRate::Hz8000,
            play,
            lead_silence: Duration::ZERO,
            tail: Duration::ZERO,
            pattern: vec![160],
            dtmf: &[],
            hangup_after: None,
            until_server_hangup: false,
            max_duration: Duration::from_secs(60),
        }
    }

    fn run(mut s: Script) -> Vec<(Duration, Action)> {
        let mut out = Vec::new();
        loop {
            let (at, a) = s.next_action();
            let end = a == Action::Hangup;
            out.push((at, a));
            if end || out.len() > 10_000 {
                return out;
            }
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn frames_on_an_absolute_20ms_grid_then_hangup() {
        let play: Vec<i16> = (1..=400).collect();
        let mut sp = spec(&play);
        sp.lead_silence = ms(20);
        sp.tail = ms(40);
        let out = run(Script::new(sp));
        // 160 lead + 400 play + 320 tail = 880 samples = 5.5 frames -> 6 frames.
        let times: Vec<Duration> = out.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, (0..=6).map(|n| ms(20 * n)).collect::<Vec<_>>());
        assert_eq!(out.last().map(|(_, a)| a), Some(&Action::Hangup));
        let Action::Audio { samples, ends_play } = &out[0].1 else {
            panic!("not audio")
        };
        assert!(samples.iter().all(|&s| s == 0) && !ends_play);
        let Action::Audio { samples, .. } = &out[1].1 else {
            panic!("not audio")
        };
        assert_eq!(samples[0], 1);
        let Action::Audio { samples, ends_play } = &out[3].1 else {
            panic!("not audio")
        };
        // Frame 3 holds play samples 320..400 then silence.
        assert!(*ends_play);
        assert_eq!(samples[79], 400);
        assert_eq!(samples[80], 0);
        let ends = out.iter().filter(|(_, a)| {
            matches!(
                a,
                Action::Audio {
                    ends_play: true,
                    ..
                }
            )
        });
        assert_eq!(ends.count(), 1);
    }

    #[test]
    fn varying_frame_sizes_keep_real_time() {
        let play = vec![7i16; 8000];
        let mut sp = spec(&play);
        sp.pattern = vec![160, 144];
        let out = run(Script::new(sp));
        let mut pos = 0usize;
        for (at, a) in &out {
            if let Action::Audio { samples, .. } = a {
                assert_eq!(*at, sample_time(pos, SampleRate::Hz8000));
                pos += samples.len();
            }
        }
        assert!(pos >= 8000);
        // 144 samples is 18 ms: the second frame is due 20 ms in, the third 38 ms in.
        assert_eq!(out[2].0, ms(38));
    }

    #[test]
    fn dtmf_between_frames_and_hangup_wins_ties() {
        let play = vec![1i16; 1600];
        let digits = [
            (ms(40), Digit::new(b'5').unwrap()),
            (ms(30), Digit::new(b'#').unwrap()),
            (ms(500), Digit::new(b'9').unwrap()),
        ];
        let mut sp = spec(&play);
        sp.dtmf = &digits;
        sp.hangup_after = Some(ms(100));
        let out = run(Script::new(sp));
        let kinds: Vec<String> = out
            .iter()
            .map(|(t, a)| match a {
                Action::Audio { .. } => format!("a{}", t.as_millis()),
                Action::Dtmf(d) => format!("d{d}{}", t.as_millis()),
                Action::Hangup => format!("h{}", t.as_millis()),
            })
            .collect();
        assert_eq!(
            kinds,
            ["a0", "a20", "d#30", "a40", "d540", "a60", "a80", "h100"]
        );
    }

    #[test]
    fn until_server_hangup_runs_to_the_limit() {
        let mut sp = spec(&[1, 2, 3]);
        sp.until_server_hangup = true;
        sp.max_duration = ms(200);
        let s = Script::new(sp);
        assert_eq!(s.hangup_at(), ms(200));
        assert_eq!(run(s).len(), 11);
    }

    #[test]
    fn sample_conversions() {
        assert_eq!(sample_time(882, SampleRate::Hz44100), ms(20));
        assert_eq!(
            sample_time(3, SampleRate::Hz8000),
            Duration::from_nanos(375_000)
        );
        assert_eq!(samples_in(ms(20), SampleRate::Hz16000), 320);
        assert_eq!(
            samples_in(Duration::from_nanos(62_500), SampleRate::Hz8000),
            1
        );
    }

    #[test]
    fn hangup_after_keeps_the_line_up_past_the_audio() {
        let play = vec![1i16; 160];
        let mut sp = spec(&play);
        sp.hangup_after = Some(ms(200));
        let out = run(Script::new(sp));
        let (at, last) = out.last().unwrap();
        assert!(matches!(last, Action::Hangup));
        assert_eq!(*at, ms(200));
        // One frame of audio, then silence frames every 20 ms until the hangup.
        assert_eq!(
            out.iter()
                .filter(|(_, a)| matches!(a, Action::Audio { .. }))
                .count(),
            10
        );
    }
}
