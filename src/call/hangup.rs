//! When the call ends from our side, as a state rather than a one-way latch: a goodbye the
//! caller interrupts is cancelled and the agent listens again; the 0x00 goes out only after
//! the goodbye has been heard to its end (plus a tail, or Asterisk clips the last frame).

use std::time::{Duration, Instant};

use super::playout::UtteranceId;

/// Hang up this long after the last audio frame's play-out time, or Asterisk cuts it.
pub const HANGUP_TAIL: Duration = Duration::from_millis(100);

/// Why we end the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HangupReason {
    /// The model said goodbye (`end_call`).
    Goodbye,
    /// Nobody spoke for the idle limit.
    Idle,
    /// The agent cannot speak at all (TTS down, nothing cached): back to the dialplan.
    CannotSpeak,
    /// The call's rate is one the agent cannot serve: back to the dialplan.
    UnsupportedRate,
    /// The daemon is shutting down.
    Shutdown,
    /// The call goes to a person or the fallback destination (the outcome says which).
    Handover,
}

/// Where the hang-up stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hangup {
    /// Nobody wants to hang up.
    #[default]
    None,
    /// Hang up once this utterance (the goodbye) has played to its end; a flush cancels.
    AfterUtterance(UtteranceId, HangupReason),
    /// Hang up at this instant (after the tail of the last frame).
    At(Instant, HangupReason),
    /// The 0x00 was sent; the call is over.
    Sent(HangupReason),
}

impl Hangup {
    /// Hang up after `utterance` has been heard to its end.
    pub fn after(utterance: UtteranceId, reason: HangupReason) -> Self {
        Self::AfterUtterance(utterance, reason)
    }

    /// Hang up as soon as the audio already sent has played (`last_speech_end`), never
    /// earlier than `now`.
    pub fn soon(last_speech_end: Option<Instant>, now: Instant, reason: HangupReason) -> Self {
        let at = last_speech_end.map_or(now, |e| (e + HANGUP_TAIL).max(now));
        Self::At(at, reason)
    }

    /// An utterance ended. Returns the new state: the goodbye played out -> hang up after
    /// the tail; the goodbye was cut short (the caller spoke) -> cancelled. A handover line
    /// cut short hangs up all the same: the caller cannot cancel a handover.
    pub fn on_utterance_ended(self, id: UtteranceId, interrupted: bool, ends_at: Instant) -> Self {
        match self {
            Self::AfterUtterance(u, reason) if u == id => {
                if interrupted && matches!(reason, HangupReason::Goodbye | HangupReason::Idle) {
                    Self::None
                } else {
                    Self::At(ends_at + HANGUP_TAIL, reason)
                }
            }
            other => other,
        }
    }

    /// The caller took the floor (barge-in or a new turn): a pending goodbye is cancelled.
    /// Hang-ups the caller cannot talk us out of (shutdown, cannot speak) stand.
    pub fn on_caller_turn(self) -> Self {
        match self {
            Self::AfterUtterance(_, HangupReason::Goodbye)
            | Self::At(_, HangupReason::Goodbye | HangupReason::Idle) => Self::None,
            other => other,
        }
    }

    /// When the 0x00 is due.
    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Self::At(at, _) => Some(*at),
            _ => None,
        }
    }

    /// Whether anything is pending or done.
    pub fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }

    /// Whether the call is ending for a reason the caller cannot cancel, or already ended.
    pub fn is_final(&self) -> bool {
        match self {
            Self::None => false,
            Self::AfterUtterance(_, r) | Self::At(_, r) => {
                !matches!(r, HangupReason::Goodbye | HangupReason::Idle)
            }
            Self::Sent(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BYE: UtteranceId = UtteranceId(7);

    #[test]
    fn a_goodbye_heard_to_its_end_hangs_up_after_the_tail() {
        let t0 = Instant::now();
        let h = Hangup::after(BYE, HangupReason::Goodbye);
        assert_eq!(h.deadline(), None);
        let h = h.on_utterance_ended(UtteranceId(6), false, t0);
        assert_eq!(
            h,
            Hangup::after(BYE, HangupReason::Goodbye),
            "another utterance"
        );
        let h = h.on_utterance_ended(BYE, false, t0);
        assert_eq!(h.deadline(), Some(t0 + HANGUP_TAIL));
    }

    #[test]
    fn an_interrupted_goodbye_is_cancelled() {
        let t0 = Instant::now();
        let h = Hangup::after(BYE, HangupReason::Goodbye).on_utterance_ended(BYE, true, t0);
        assert!(h.is_none());
        assert!(
            Hangup::after(BYE, HangupReason::Goodbye)
                .on_caller_turn()
                .is_none()
        );
    }

    #[test]
    fn a_handover_cut_short_still_hangs_up() {
        let t0 = Instant::now();
        let h = Hangup::after(BYE, HangupReason::Handover);
        assert_eq!(h.on_caller_turn(), h, "a new turn does not cancel it");
        assert!(h.is_final());
        let h = h.on_utterance_ended(BYE, true, t0);
        assert_eq!(h.deadline(), Some(t0 + HANGUP_TAIL));
    }

    #[test]
    fn shutdown_is_not_cancelled_by_the_caller() {
        let t0 = Instant::now();
        let h = Hangup::soon(Some(t0), t0, HangupReason::Shutdown);
        assert_eq!(h.on_caller_turn().deadline(), Some(t0 + HANGUP_TAIL));
        assert!(h.is_final());
    }
}
