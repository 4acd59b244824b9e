//! The real-time playout buffer: the part peers get wrong.
//!
//! Asterisk writes whatever we send straight to the caller's channel with no buffering or
//! pacing, so the server must emit exactly one 20 ms frame per tick on an absolute clock,
//! keep sending silence when it has nothing to say (Asterisk drops a call after 2 s without
//! traffic), stop within one frame when told to (barge-in), and know exactly how much of
//! each utterance went out (so the conversation history keeps only what was heard).
//!
//! This is sans-IO: it is fed `now` and asked for frames; the call machine owns it and the
//! driver owns the timer and the socket. Frame `n` is due at `start + n * 20 ms`, so lateness
//! never accumulates: a late tick is late on its own, the next deadline is unchanged. Speech
//! that arrives between ticks waits for the next tick of the same clock (at most 20 ms): the
//! clock is never moved, so the wire never runs ahead of real time and never carries two
//! frames closer than 20 ms apart (unless a starved task catches up a few late frames).
//!
//! The playout is the one owner of each utterance's life: queued, playing, then ended (played
//! out or flushed) with exactly one [`PlayoutEvent::Ended`] saying how much the caller heard.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::audiosocket::SampleRate;

/// Length of one frame on the wire.
pub const FRAME: Duration = Duration::from_millis(20);

/// If a tick comes this many frames late (the task was starved), the schedule skips ahead
/// instead of bursting the backlog, which Asterisk would play late or drop.
const MAX_CATCH_UP_FRAMES: u32 = 3;

/// Identifies one utterance (a greeting, a reply, an echo stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UtteranceId(pub u64);

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// At least one sample of an utterance.
    Speech,
    /// Nothing to say: zeros.
    Silence,
}

/// One frame to send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    /// Exactly one frame of samples.
    pub pcm: Vec<i16>,
    /// Speech or silence.
    pub kind: FrameKind,
    /// How late the tick was handled relative to its absolute deadline.
    pub lateness: Duration,
    /// Frames skipped because the tick came more than a few frames late.
    pub skipped: u32,
}

/// How far an utterance got when it ended or was flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Which utterance.
    pub utterance: UtteranceId,
    /// Samples that went out on the wire (and so were played to the caller).
    pub sent_samples: usize,
    /// Samples that were queued but dropped by a flush.
    pub dropped_samples: usize,
    /// Whether its producer had said it was complete.
    pub input_finished: bool,
    /// Whether it was cut short by a flush (barge-in, a new turn, shutdown) rather than
    /// played to its end.
    pub flushed: bool,
}

impl Progress {
    /// Whether the caller missed part of it: flushed with audio dropped or still to come.
    pub fn interrupted(&self) -> bool {
        self.flushed && (self.dropped_samples > 0 || !self.input_finished)
    }
}

/// Something the playout noticed, for the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlayoutEvent {
    /// The first samples of an utterance went out at this deadline.
    Started {
        /// Which utterance.
        utterance: UtteranceId,
        /// The frame's scheduled time.
        at: Instant,
    },
    /// The utterance is over: its last sample went out, or it was flushed. The only end
    /// event: whoever tracks an utterance learns here how much of it the caller heard.
    Ended {
        /// How much was sent, and whether it was cut short.
        progress: Progress,
        /// When its last frame finishes playing at the caller.
        ends_at: Instant,
    },
    /// An utterance still open ran dry while playing: the caller hears a gap.
    Underrun {
        /// Which utterance.
        utterance: UtteranceId,
    },
}

#[derive(Debug)]
struct Utterance {
    id: UtteranceId,
    queued: usize,
    sent: usize,
    input_finished: bool,
    started: bool,
}

impl Utterance {
    /// Progress of an utterance that played to its end.
    fn completed(&self) -> Progress {
        Progress {
            utterance: self.id,
            sent_samples: self.sent,
            dropped_samples: 0,
            input_finished: true,
            flushed: false,
        }
    }
}

/// Counters for the call summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlayoutStats {
    /// Frames emitted.
    pub frames: u64,
    /// Frames that carried speech.
    pub speech_frames: u64,
    /// Frames where an open utterance had run dry.
    pub underruns: u64,
    /// Frames skipped after a starved tick.
    pub skipped: u64,
}

/// The playout buffer for one call.
#[derive(Debug)]
pub struct Playout {
    frame_samples: usize,
    start: Instant,
    next_frame: u64,
    samples: VecDeque<i16>,
    utterances: VecDeque<Utterance>,
    events: VecDeque<PlayoutEvent>,
    prebuffer: usize,
    max_queued: usize,
    last_speech_end: Option<Instant>,
    stats: PlayoutStats,
    flushed_front: Option<(UtteranceId, Vec<i16>)>,
}

impl Playout {
    /// A buffer whose first frame is due at `start`.
    pub fn new(rate: SampleRate, start: Instant) -> Self {
        let frame_samples = rate.samples_per_frame();
        Self {
            frame_samples,
            start,
            next_frame: 0,
            samples: VecDeque::new(),
            utterances: VecDeque::new(),
            events: VecDeque::new(),
            prebuffer: 0,
            // Five minutes of audio: far more than any reply, a guard against a runaway producer.
            max_queued: rate.hz() as usize * 300,
            last_speech_end: None,
            stats: PlayoutStats::default(),
            flushed_front: None,
        }
    }

    /// Samples an open utterance must have queued before it starts playing. A small
    /// prebuffer absorbs producer jitter (echo mode, where the caller's and our clocks have
    /// different phases); replies from TTS arrive faster than real time and need none.
    pub fn set_prebuffer(&mut self, samples: usize) {
        self.prebuffer = samples;
    }

    /// Caps queued audio; the oldest samples are dropped beyond it (echo mode keeps latency bounded).
    pub fn set_max_queued(&mut self, samples: usize) {
        self.max_queued = samples.max(self.frame_samples);
    }

    /// Samples per 20 ms frame.
    pub fn frame_samples(&self) -> usize {
        self.frame_samples
    }

    /// When the next frame is due.
    pub fn next_deadline(&self) -> Instant {
        self.deadline(self.next_frame)
    }

    fn deadline(&self, frame: u64) -> Instant {
        // u32 frames of 20 ms is 994 days; saturate rather than overflow.
        self.start + FRAME * u32::try_from(frame).unwrap_or(u32::MAX)
    }

    /// Queues samples for an utterance, opening it if new.
    pub fn push(&mut self, utterance: UtteranceId, pcm: &[i16]) {
        if pcm.is_empty() {
            self.open(utterance);
            return;
        }
        self.open(utterance);
        if let Some(u) = self.utterances.iter_mut().rev().find(|u| u.id == utterance) {
            u.queued += pcm.len();
        }
        self.samples.extend(pcm.iter().copied());
        while self.samples.len() > self.max_queued {
            let excess = self.samples.len() - self.max_queued;
            self.drop_front(excess);
        }
    }

    fn open(&mut self, utterance: UtteranceId) {
        if !self.utterances.iter().any(|u| u.id == utterance) {
            self.utterances.push_back(Utterance {
                id: utterance,
                queued: 0,
                sent: 0,
                input_finished: false,
                started: false,
            });
        }
    }

    fn drop_front(&mut self, mut n: usize) {
        while n > 0 {
            let Some(u) = self.utterances.front_mut() else {
                break;
            };
            let take = n.min(u.queued);
            u.queued -= take;
            for _ in 0..take {
                self.samples.pop_front();
            }
            n -= take;
            if u.queued == 0 && n > 0 {
                if u.input_finished {
                    self.utterances.pop_front();
                } else {
                    break;
                }
            }
        }
    }

    /// Marks an utterance complete: no more samples will come for it.
    pub fn finish(&mut self, utterance: UtteranceId) {
        self.open(utterance);
        if let Some(u) = self.utterances.iter_mut().find(|u| u.id == utterance) {
            u.input_finished = true;
        }
    }

    /// Drops everything queued at once (barge-in). The next frame is silence. Each dropped
    /// utterance ends with an [`PlayoutEvent::Ended`] saying how far it got; `now` is when
    /// the caller stops hearing it (the frame in flight still plays).
    pub fn flush(&mut self, now: Instant) {
        self.flushed_front = self
            .utterances
            .front()
            .filter(|u| u.started)
            .map(|u| (u.id, self.samples.drain(..u.queued).collect()));
        self.samples.clear();
        let ends_at = self.last_speech_end.map_or(now, |e| e.max(now));
        for u in self.utterances.drain(..) {
            self.events.push_back(PlayoutEvent::Ended {
                progress: Progress {
                    utterance: u.id,
                    sent_samples: u.sent,
                    dropped_samples: u.queued,
                    input_finished: u.input_finished,
                    flushed: true,
                },
                ends_at: if u.started { ends_at } else { now },
            });
        }
    }

    /// The unsent samples of the utterance that was playing at the last flush (once), so
    /// an interrupted utterance can go on if the interruption turns out to be nothing.
    pub fn take_flushed_front(&mut self) -> Option<(UtteranceId, Vec<i16>)> {
        self.flushed_front.take()
    }

    /// Whether audio is queued or an utterance is open and has started playing (the caller
    /// is hearing the agent, or a gap inside its speech).
    pub fn is_speaking(&self) -> bool {
        self.utterances.front().is_some_and(|u| u.started)
    }

    /// Nothing queued and no utterance open.
    pub fn is_idle(&self) -> bool {
        self.utterances.is_empty()
    }

    /// When the last speech frame sent so far finishes playing.
    pub fn last_speech_end(&self) -> Option<Instant> {
        self.last_speech_end
    }

    /// Samples waiting to be sent.
    pub fn queued_samples(&self) -> usize {
        self.samples.len()
    }

    /// Counters so far.
    pub fn stats(&self) -> PlayoutStats {
        self.stats
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<PlayoutEvent> {
        self.events.pop_front()
    }

    /// Emits the frame due at or before `now`, or `None` if the next deadline is in the future.
    pub fn poll(&mut self, now: Instant) -> Option<Tick> {
        let due = self.next_deadline();
        if now < due {
            return None;
        }
        let mut lateness = now - due;
        let mut skipped = 0;
        let behind = (lateness.as_micros() / FRAME.as_micros()) as u64;
        if behind > u64::from(MAX_CATCH_UP_FRAMES) {
            // Starved: jump to the frame that is due now. Queued audio is kept, only delayed.
            skipped = u32::try_from(behind).unwrap_or(u32::MAX);
            self.next_frame += behind;
            self.stats.skipped += behind;
            lateness = now - self.next_deadline();
        }
        let at = self.next_deadline();
        self.next_frame += 1;
        self.stats.frames += 1;
        let (pcm, kind) = self.fill_frame(at);
        if kind == FrameKind::Speech {
            self.stats.speech_frames += 1;
            self.last_speech_end = Some(at + FRAME);
        }
        Some(Tick {
            pcm,
            kind,
            lateness,
            skipped,
        })
    }

    fn fill_frame(&mut self, at: Instant) -> (Vec<i16>, FrameKind) {
        let mut pcm = Vec::with_capacity(self.frame_samples);
        let mut starved = None;
        while pcm.len() < self.frame_samples {
            let Some(u) = self.utterances.front_mut() else {
                break;
            };
            if !u.started {
                let ready = u.input_finished || u.queued >= self.prebuffer.max(1);
                if !ready {
                    break;
                }
            }
            if u.queued == 0 {
                if u.input_finished {
                    let done = u.completed();
                    self.utterances.pop_front();
                    let ends_at = if pcm.is_empty() { at } else { at + FRAME };
                    self.events.push_back(PlayoutEvent::Ended {
                        progress: done,
                        ends_at,
                    });
                    continue;
                }
                if u.started {
                    starved = Some(u.id);
                }
                break;
            }
            if !u.started {
                u.started = true;
                self.events.push_back(PlayoutEvent::Started {
                    utterance: u.id,
                    at,
                });
            }
            let take = (self.frame_samples - pcm.len()).min(u.queued);
            pcm.extend(self.samples.drain(..take));
            u.queued -= take;
            u.sent += take;
        }
        // A finished utterance whose last samples went out in this frame completes now,
        // so the conversation learns it without waiting for another tick.
        if let Some(u) = self.utterances.front()
            && u.input_finished
            && u.queued == 0
            && u.started
        {
            let done = u.completed();
            self.utterances.pop_front();
            self.events.push_back(PlayoutEvent::Ended {
                progress: done,
                ends_at: at + FRAME,
            });
        }
        if let Some(utterance) = starved {
            self.stats.underruns += 1;
            self.events.push_back(PlayoutEvent::Underrun { utterance });
        }
        let kind = if pcm.is_empty() {
            FrameKind::Silence
        } else {
            FrameKind::Speech
        };
        pcm.resize(self.frame_samples, 0);
        (pcm, kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U1: UtteranceId = UtteranceId(1);
    const U2: UtteranceId = UtteranceId(2);

    fn drain_events(p: &mut Playout) -> Vec<PlayoutEvent> {
        std::iter::from_fn(|| p.poll_event()).collect()
    }

    #[test]
    fn one_frame_per_deadline_and_silence_when_idle() {
        let t0 = Instant::now();
        let mut p = Playout::new(SampleRate::Hz8000, t0);
        let tick = p.poll(t0).unwrap();
        assert_eq!(tick.pcm, vec![0; 160]);
        assert_eq!(tick.kind, FrameKind::Silence);
        assert!(p.poll(t0 + Duration::from_millis(19)).is_none());
        assert!(p.poll(t0 + Duration::from_millis(20)).is_some());
        assert_eq!(p.next_deadline(), t0 + Duration::from_millis(40));
    }

    #[test]
    fn no_drift_over_an_hour() {
        let t0 = Instant::now();
        let mut p = Playout::new(SampleRate::Hz8000, t0);
        let frames = 3600 * 50;
        for n in 0..frames {
            // Every tick handled 3 ms late: lateness must not accumulate.
            let tick = p.poll(t0 + FRAME * n + Duration::from_millis(3)).unwrap();
            assert_eq!(tick.lateness, Duration::from_millis(3));
        }
        assert_eq!(p.next_deadline(), t0 + Duration::from_secs(3600));
        assert_eq!(p.stats().frames, u64::from(frames));
    }

    #[test]
    fn starved_tick_skips_instead_of_bursting() {
        let t0 = Instant::now();
        let mut p = Playout::new(SampleRate::Hz8000, t0);
        p.poll(t0).unwrap();
        let tick = p.poll(t0 + Duration::from_millis(205)).unwrap();
        assert!(tick.skipped >= 8, "{tick:?}");
        assert!(tick.lateness < FRAME);
        assert!(p.poll(t0 + Duration::from_millis(205)).is_none());
    }

    #[test]
    fn plays_utterances_and_reports_progress() {
        let t0 = Instant::now();
        let mut p = Playout::new(SampleRate::Hz8000, t0);
        p.push(U1, &[1; 250]);
        p.finish(U1);
        p.push(U2, &[2; 100]);
        let a = p.poll(t0).unwrap();
        assert_eq!(a.pcm, vec![1; 160]);
        let b = p.poll(t0 + FRAME).unwrap();
        // 90 samples of U1 then 70 of U2: contiguous speech, no gap between utterances.
        assert_eq!(&b.pcm[..90], &[1; 90][..]);
        assert_eq!(&b.pcm[90..], &[2; 70][..]);
        let ev = drain_events(&mut p);
        assert!(matches!(ev[0], PlayoutEvent::Started { utterance: U1, .. }));
        assert!(matches!(
            ev[1],
            PlayoutEvent::Ended {
                progress: Progress {
                    utterance: U1,
                    sent_samples: 250,
                    ..
                },
                ..
            }
        ));
        assert!(matches!(ev[2], PlayoutEvent::Started { utterance: U2, .. }));
        // U2 is open with 30 samples: the partial frame is padded and counts as an underrun.
        let c = p.poll(t0 + FRAME * 2).unwrap();
        assert_eq!(&c.pcm[..30], &[2; 30][..]);
        assert_eq!(&c.pcm[30..], &[0; 130][..]);
        assert_eq!(p.stats().underruns, 1);
        assert!(drain_events(&mut p).contains(&PlayoutEvent::Underrun { utterance: U2 }));
    }

    #[test]
    fn flush_stops_within_one_frame_and_reports_sent_samples() {
        let t0 = Instant::now();
        let mut p = Playout::new(SampleRate::Hz16000, t0);
        p.push(U1, &[5; 3200]);
        p.poll(t0).unwrap();
        p.poll(t0 + FRAME).unwrap();
        drain_events(&mut p);
        p.flush(t0 + FRAME + Duration::from_millis(5));
        assert_eq!(
            drain_events(&mut p),
            vec![PlayoutEvent::Ended {
                progress: Progress {
                    utterance: U1,
                    sent_samples: 640,
                    dropped_samples: 2560,
                    input_finished: false,
                    flushed: true,
                },
                // The frame already on the wire still plays to its end.
                ends_at: t0 + FRAME * 2,
            }]
        );
        let next = p.poll(t0 + FRAME * 2).unwrap();
        assert_eq!(next.kind, FrameKind::Silence);
        assert!(p.is_idle());
    }

    #[test]
    fn waits_for_prebuffer_before_starting_open_utterance() {
        let t0 = Instant::now();
        let mut p = Playout::new(SampleRate::Hz8000, t0);
        p.set_prebuffer(320);
        p.push(U1, &[1; 160]);
        assert_eq!(p.poll(t0).unwrap().kind, FrameKind::Silence);
        assert_eq!(p.stats().underruns, 0);
        p.push(U1, &[1; 160]);
        assert_eq!(p.poll(t0 + FRAME).unwrap().kind, FrameKind::Speech);
    }

    #[test]
    fn finished_short_utterance_plays_without_prebuffer() {
        let t0 = Instant::now();
        let mut p = Playout::new(SampleRate::Hz8000, t0);
        p.set_prebuffer(1600);
        p.push(U1, &[1; 10]);
        p.finish(U1);
        let t = p.poll(t0).unwrap();
        assert_eq!(t.kind, FrameKind::Speech);
        assert!(p.is_idle());
        assert_eq!(p.last_speech_end(), Some(t0 + FRAME));
    }

    #[test]
    fn speech_after_silence_waits_for_the_next_tick_of_the_same_clock() {
        let t0 = Instant::now();
        let mut p = Playout::new(SampleRate::Hz8000, t0);
        p.poll(t0).unwrap();
        // Audio arrives 5 ms into the silence frame: it goes out at the next 20 ms tick, so
        // the wire never carries two frames less than 20 ms apart.
        p.push(U1, &[3; 320]);
        assert_eq!(p.next_deadline(), t0 + FRAME);
        assert!(p.poll(t0 + Duration::from_millis(5)).is_none());
        let t = p.poll(t0 + FRAME).unwrap();
        assert_eq!(t.kind, FrameKind::Speech);
        assert_eq!(p.next_deadline(), t0 + FRAME * 2);
    }

    #[test]
    fn the_schedule_never_runs_ahead_of_real_time() {
        let t0 = Instant::now();
        let mut p = Playout::new(SampleRate::Hz8000, t0);
        let mut now = t0;
        let mut sent = Vec::new();
        // 100 talkspurts, each arriving at an odd moment inside a silence frame.
        for spurt in 0..100u64 {
            let arrive = now + Duration::from_millis(7 + spurt % 13);
            while p.next_deadline() <= arrive {
                now = p.next_deadline();
                p.poll(now).unwrap();
                sent.push(now);
            }
            p.push(UtteranceId(spurt), &[1; 400]);
            p.finish(UtteranceId(spurt));
            for _ in 0..6 {
                now = p.next_deadline();
                p.poll(now).unwrap();
                sent.push(now);
            }
        }
        for w in sent.windows(2) {
            assert!(w[1] - w[0] >= FRAME, "frames {:?} apart", w[1] - w[0]);
        }
        let elapsed = *sent.last().unwrap() - t0;
        assert!(sent.len() as u128 <= elapsed.as_millis() / 20 + 1);
    }

    #[test]
    fn max_queued_drops_oldest() {
        let t0 = Instant::now();
        let mut p = Playout::new(SampleRate::Hz8000, t0);
        p.set_max_queued(320);
        p.push(U1, &[1; 300]);
        p.push(U1, &[2; 300]);
        assert_eq!(p.queued_samples(), 320);
        let t = p.poll(t0).unwrap();
        assert_eq!(&t.pcm[..20], &[1; 20][..]);
        assert_eq!(&t.pcm[20..], &[2; 140][..]);
    }
}
