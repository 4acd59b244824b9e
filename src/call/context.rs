//! What the daemon knows about a call beyond its UUID, and what the dialplan learns when
//! `AudioSocket()` returns.
//!
//! AudioSocket carries only a UUID. Who is calling, which number they dialled and which
//! profile the dialplan chose come over a side channel (the PBX's manager interface, or an
//! HTTP registration from `CURL()` before `AudioSocket()`); the [`CallControl`] trait is
//! that side channel as the call sees it. The same channel carries the call's outcome back
//! before the daemon sends 0x00, so the dialplan can branch on it (goodbye, transfer,
//! fallback, over capacity).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest wait for a call's context before the call goes on with what it has (the default
/// profile): the caller hears nothing meanwhile.
pub const CONTEXT_DEADLINE: Duration = Duration::from_millis(300);
/// Longest wait for the outcome to reach the PBX before 0x00 is sent anyway.
pub const DECISION_DEADLINE: Duration = Duration::from_millis(500);

/// Where a call's context came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextSource {
    /// Nothing arrived (in time): the default profile, no caller details.
    #[default]
    None,
    /// Read from the channel over the Asterisk Manager Interface.
    Ami,
    /// Registered over HTTP (`CURL()` in the dialplan) before `AudioSocket()`.
    Http,
}

/// Who is calling, what they dialled, and what the dialplan set for the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallContext {
    /// The caller's number (`CALLERID(num)`).
    pub caller_number: Option<String>,
    /// The caller's name (`CALLERID(name)`).
    pub caller_name: Option<String>,
    /// The dialled number (MikoPBX's `FROM_DID`, else `EXTEN`).
    pub did: Option<String>,
    /// The Asterisk channel name, e.g. `PJSIP/trunk-00000012`.
    pub channel: Option<String>,
    /// The profile the dialplan asked for (`SIFUCALL_PROFILE`), overriding DID routing.
    pub profile: Option<String>,
    /// Free variables for prompts (`{var_NAME}`), from `SIFUCALL_VAR_NAME` channel variables
    /// or the registration's `var_*` fields; keys without the prefix.
    pub vars: BTreeMap<String, String>,
    /// Where this came from.
    pub source: ContextSource,
}

/// A person or queue the agent may hand the call to. The model sees `name` and
/// `description`; only the dialplan sees `destination`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferTarget {
    /// What the model calls it, e.g. `sales`.
    pub name: String,
    /// When to use it, for the model.
    pub description: String,
    /// The dialplan destination, e.g. `201` or `queue-sales`.
    pub destination: String,
}

/// How the call ended, as the dialplan branches on it after `AudioSocket()` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CallOutcome {
    /// The conversation ended normally (goodbye, caller hung up, idle).
    Completed,
    /// The agent handed the call to a person or queue.
    Transferred {
        /// The target's name, as the model chose it.
        target: String,
        /// Its dialplan destination.
        destination: String,
        /// What the model wrote for the person taking the call (warm transfer).
        summary: Option<String>,
    },
    /// The agent could not serve the call (providers failing, caller asked for a person
    /// with no target): send it to the profile's fallback destination.
    Fallback {
        /// Why, e.g. `provider_failures` or `dtmf`.
        reason: String,
        /// The fallback destination.
        destination: String,
    },
    /// The caller hung up before the agent said anything useful.
    Abandoned,
    /// The daemon refused the call (at capacity, draining or not ready): try another daemon.
    Refused {
        /// `over_capacity`, `not_ready` or `draining`.
        reason: String,
    },
    /// The call ended on an error (protocol, I/O, internal).
    Error {
        /// What went wrong.
        detail: String,
    },
}

impl CallOutcome {
    /// The value of `SIFUCALL_RESULT` the shipped dialplan branches on.
    pub fn dialplan_value(&self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Transferred { .. } => "transfer",
            Self::Fallback { .. } => "fallback",
            Self::Abandoned => "abandoned",
            Self::Refused { .. } => "refused",
            Self::Error { .. } => "error",
        }
    }

    /// The dialplan destination that goes with it (`SIFUCALL_DESTINATION`), if any.
    pub fn destination(&self) -> Option<&str> {
        match self {
            Self::Transferred { destination, .. } | Self::Fallback { destination, .. } => {
                Some(destination)
            }
            _ => None,
        }
    }
}

/// The side channel to the PBX, as a call uses it.
pub trait CallControl: Send + Sync + fmt::Debug {
    /// The call's context; callers bound the wait with [`CONTEXT_DEADLINE`].
    fn context(&self, call_id: Uuid) -> BoxFuture<'_, CallContext>;
    /// Tells the PBX how the call ended, before the daemon sends 0x00; callers bound the
    /// wait with [`DECISION_DEADLINE`].
    fn decide(&self, call_id: Uuid, outcome: CallOutcome) -> BoxFuture<'_, ()>;

    /// If `call_id` is the whisper leg of a warm transfer (the person's channel connecting
    /// to hear the summary), the summary to speak; taken once. `None` for ordinary calls.
    fn whisper(&self, _call_id: Uuid) -> Option<String> {
        None
    }
}

/// No side channel: every call gets the default profile, and the dialplan sees only the
/// hangup.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoControl;

impl CallControl for NoControl {
    fn context(&self, _call_id: Uuid) -> BoxFuture<'_, CallContext> {
        Box::pin(async { CallContext::default() })
    }

    fn decide(&self, _call_id: Uuid, _outcome: CallOutcome) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_dialplan_values() {
        let t = CallOutcome::Transferred {
            target: "sales".into(),
            destination: "201".into(),
            summary: None,
        };
        assert_eq!(t.dialplan_value(), "transfer");
        assert_eq!(t.destination(), Some("201"));
        assert_eq!(CallOutcome::Completed.destination(), None);
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["kind"], "transferred");
    }
}
