//! Turn-taking decisions from voice activity, sans-IO: who holds the floor, when the caller
//! started and stopped speaking, and when the caller is talking over the agent (barge-in).
//!
//! Fed one VAD window at a time (probability, caller level, window end time). Barge-in needs
//! `barge_in_min_speech` of continuous speech, and while the agent is talking a window only
//! counts as speech if the caller is louder than the agent's own audio minus an echo margin:
//! a phone line reflects some of what we send (hybrid echo, 6-20 dB down), and without this
//! guard the agent interrupts itself, the top complaint against peers.

use std::time::{Duration, Instant};

/// Tunables.
#[derive(Debug, Clone, Copy)]
pub struct TurnConfig {
    /// VAD probability at or above which a window is speech.
    pub vad_threshold: f32,
    /// Continuous speech that counts as the caller starting to talk.
    pub min_speech: Duration,
    /// Continuous speech over the agent that interrupts it. Echo is kept out by level (the
    /// echo guard), not by this; it keeps out clicks and short noises, and the VAD's own rise
    /// (about 60 ms into a soft onset) comes on top, so the caller hears the agent stop about
    /// this plus 60 ms after they start.
    pub barge_in_min_speech: Duration,
    /// Non-speech that ends the caller's speech.
    pub min_silence: Duration,
    /// While the agent talks, caller windows quieter than (agent level - margin) are echo.
    pub echo_margin_db: f64,
    /// Length of one VAD window.
    pub window: Duration,
    /// How long after the agent stops talking a transcript may still be its echo (the STT
    /// final arrives segmentation silence + processing after the audio).
    pub echo_tail: Duration,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            vad_threshold: 0.5,
            min_speech: Duration::from_millis(96),
            barge_in_min_speech: Duration::from_millis(160),
            min_silence: Duration::from_millis(240),
            echo_margin_db: 12.0,
            window: Duration::from_millis(16),
            echo_tail: Duration::from_millis(1500),
        }
    }
}

/// What the detector decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEvent {
    /// The caller started talking (backdated to the first speech window).
    SpeechStarted {
        /// Start of the first speech window.
        at: Instant,
    },
    /// The caller stopped talking (backdated to the end of the last speech window).
    SpeechEnded {
        /// End of the last speech window.
        at: Instant,
    },
    /// The caller is talking over the agent: stop speaking now.
    BargeIn {
        /// When the decision was made.
        at: Instant,
    },
}

/// The turn-taking state of one call.
#[derive(Debug, Clone)]
pub struct TurnDetector {
    cfg: TurnConfig,
    speech_run: Duration,
    silence_run: Duration,
    run_start: Option<Instant>,
    last_speech_end: Option<Instant>,
    speaking: bool,
    agent_speaking: bool,
    agent_level_db: f64,
    barged: bool,
    caller_spoke_over_agent: bool,
    /// When the agent last started talking, and since when it has been silent (None while
    /// talking or before it first spoke).
    agent_started_at: Option<Instant>,
    agent_silent_since: Option<Instant>,
    /// When the caller was last heard starting to talk.
    caller_voice_at: Option<Instant>,
}

impl TurnDetector {
    /// A detector with nobody speaking.
    pub fn new(cfg: TurnConfig) -> Self {
        Self {
            cfg,
            speech_run: Duration::ZERO,
            silence_run: Duration::ZERO,
            run_start: None,
            last_speech_end: None,
            speaking: false,
            agent_speaking: false,
            agent_level_db: -120.0,
            barged: false,
            caller_spoke_over_agent: false,
            agent_started_at: None,
            agent_silent_since: None,
            caller_voice_at: None,
        }
    }

    /// The agent started or stopped playing audio; `level_db` is its speech level (dBFS).
    pub fn set_agent_speaking(&mut self, speaking: bool, level_db: f64, now: Instant) {
        if speaking && !self.agent_speaking {
            self.barged = false;
            self.caller_spoke_over_agent = false;
            self.agent_started_at = Some(now);
            self.agent_silent_since = None;
        }
        if !speaking && self.agent_speaking {
            self.agent_silent_since = Some(now);
        }
        self.agent_speaking = speaking;
        self.agent_level_db = level_db;
    }

    /// The end of the last window that counted as the caller's speech (not debounced: the
    /// caller may be in a short pause).
    pub fn last_voice(&self) -> Option<Instant> {
        self.last_speech_end
    }

    /// Whether the caller is talking now.
    pub fn caller_speaking(&self) -> bool {
        self.speaking
    }

    /// Whether real (not echoed) caller speech was detected since the agent began talking:
    /// a transcript that arrives while the agent talks without this is probably echo.
    pub fn caller_spoke_over_agent(&self) -> bool {
        self.caller_spoke_over_agent
    }

    /// Whether a transcript arriving at `now` is probably the line echoing the agent back:
    /// the agent is talking or stopped less than `echo_tail` ago, and no caller voice was
    /// heard since it started.
    pub fn looks_like_echo(&self, now: Instant) -> bool {
        let recently = self
            .agent_silent_since
            .is_some_and(|t| now.duration_since(t) < self.cfg.echo_tail);
        let caller_voiced = self.caller_spoke_over_agent
            || matches!((self.caller_voice_at, self.agent_started_at), (Some(c), Some(a)) if c >= a);
        (self.agent_speaking || recently) && !caller_voiced
    }

    /// Feeds one VAD window ending at `end`.
    pub fn push_window(&mut self, prob: f32, caller_db: f64, end: Instant) -> Option<TurnEvent> {
        let echo = self.agent_speaking && caller_db < self.agent_level_db - self.cfg.echo_margin_db;
        let is_speech = prob >= self.cfg.vad_threshold && !echo;
        let w = self.cfg.window;
        if is_speech {
            if self.speech_run.is_zero() {
                self.run_start = Some(end.checked_sub(w).unwrap_or(end));
            }
            self.speech_run += w;
            self.silence_run = Duration::ZERO;
            self.last_speech_end = Some(end);
        } else {
            self.silence_run += w;
            if self.silence_run >= self.cfg.min_silence {
                self.speech_run = Duration::ZERO;
            }
        }
        if self.agent_speaking && is_speech && self.speech_run >= self.cfg.min_speech {
            self.caller_spoke_over_agent = true;
        }
        if self.agent_speaking
            && !self.barged
            && is_speech
            && self.speech_run >= self.cfg.barge_in_min_speech
        {
            self.barged = true;
            self.speaking = true;
            self.caller_voice_at = Some(end);
            return Some(TurnEvent::BargeIn { at: end });
        }
        if !self.speaking && is_speech && self.speech_run >= self.cfg.min_speech {
            self.speaking = true;
            let at = self.run_start.unwrap_or(end);
            self.caller_voice_at = Some(at);
            return Some(TurnEvent::SpeechStarted { at });
        }
        if self.speaking && !is_speech && self.silence_run >= self.cfg.min_silence {
            self.speaking = false;
            return Some(TurnEvent::SpeechEnded {
                at: self.last_speech_end.unwrap_or(end),
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS16: Duration = Duration::from_millis(16);

    fn feed(
        d: &mut TurnDetector,
        t: &mut Instant,
        windows: usize,
        prob: f32,
        db: f64,
    ) -> Vec<TurnEvent> {
        (0..windows)
            .filter_map(|_| {
                *t += MS16;
                d.push_window(prob, db, *t)
            })
            .collect()
    }

    #[test]
    fn speech_start_and_end_are_backdated() {
        let t0 = Instant::now();
        let mut t = t0;
        let mut d = TurnDetector::new(TurnConfig::default());
        assert!(feed(&mut d, &mut t, 10, 0.1, -60.0).is_empty());
        let ev = feed(&mut d, &mut t, 30, 0.9, -20.0);
        assert_eq!(ev, vec![TurnEvent::SpeechStarted { at: t0 + MS16 * 10 }]);
        let speech_end = t;
        let ev = feed(&mut d, &mut t, 20, 0.1, -60.0);
        assert_eq!(ev, vec![TurnEvent::SpeechEnded { at: speech_end }]);
    }

    #[test]
    fn short_blips_are_not_speech() {
        let mut t = Instant::now();
        let mut d = TurnDetector::new(TurnConfig::default());
        for _ in 0..10 {
            assert!(feed(&mut d, &mut t, 2, 0.9, -20.0).is_empty());
            assert!(feed(&mut d, &mut t, 20, 0.1, -60.0).is_empty());
        }
    }

    #[test]
    fn barge_in_needs_min_speech_over_the_agent() {
        let mut t = Instant::now();
        let cfg = TurnConfig::default();
        let mut d = TurnDetector::new(cfg);
        d.set_agent_speaking(true, -20.0, t);
        // One window short of the minimum: reported as speech, not yet an interruption.
        let windows = (cfg.barge_in_min_speech.as_millis() / 16) as usize;
        let ev = feed(&mut d, &mut t, windows - 1, 0.9, -18.0);
        assert!(
            matches!(ev[..], [TurnEvent::SpeechStarted { .. }]),
            "{ev:?}"
        );
        let ev = feed(&mut d, &mut t, 1, 0.9, -18.0);
        assert!(matches!(ev[..], [TurnEvent::BargeIn { .. }]), "{ev:?}");
        // Only once per agent utterance.
        assert!(feed(&mut d, &mut t, 30, 0.9, -18.0).is_empty());
    }

    #[test]
    fn echo_of_the_agent_does_not_barge_in() {
        let mut t = Instant::now();
        let mut d = TurnDetector::new(TurnConfig::default());
        d.set_agent_speaking(true, -18.0, t);
        // The line reflects our own speech 20 dB down: voice-like, but quieter than the margin.
        assert!(feed(&mut d, &mut t, 200, 0.95, -38.0).is_empty());
        assert!(!d.caller_spoke_over_agent());
        // The same level is real speech once the agent is silent.
        d.set_agent_speaking(false, -120.0, t);
        let ev = feed(&mut d, &mut t, 10, 0.95, -38.0);
        assert!(matches!(ev[..], [TurnEvent::SpeechStarted { .. }]));
    }

    #[test]
    fn barge_in_resets_for_the_next_utterance() {
        let mut t = Instant::now();
        let mut d = TurnDetector::new(TurnConfig::default());
        d.set_agent_speaking(true, -20.0, t);
        assert!(
            feed(&mut d, &mut t, 25, 0.9, -15.0)
                .iter()
                .any(|e| matches!(e, TurnEvent::BargeIn { .. }))
        );
        d.set_agent_speaking(false, -120.0, t);
        feed(&mut d, &mut t, 30, 0.1, -60.0);
        d.set_agent_speaking(true, -20.0, t);
        assert!(
            feed(&mut d, &mut t, 25, 0.9, -15.0)
                .iter()
                .any(|e| matches!(e, TurnEvent::BargeIn { .. }))
        );
    }

    #[test]
    fn transcripts_during_or_just_after_the_agent_without_caller_voice_are_echo() {
        let mut t = Instant::now();
        let mut d = TurnDetector::new(TurnConfig::default());
        assert!(!d.looks_like_echo(t), "nobody has spoken yet");
        d.set_agent_speaking(true, -18.0, t);
        feed(&mut d, &mut t, 50, 0.95, -38.0);
        assert!(d.looks_like_echo(t), "agent talking, only its echo heard");
        d.set_agent_speaking(false, -120.0, t);
        assert!(
            d.looks_like_echo(t + Duration::from_millis(1000)),
            "within the echo tail"
        );
        assert!(
            !d.looks_like_echo(t + Duration::from_millis(2000)),
            "after the echo tail"
        );
        // Real caller speech after the agent started: not echo.
        feed(&mut d, &mut t, 10, 0.95, -20.0);
        assert!(!d.looks_like_echo(t));
    }
}
