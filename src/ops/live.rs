//! The calls in progress, for the console's live view and `GET /api/live`.
//!
//! Metrics say how many calls are up; an operator watching the floor wants to know which:
//! who is calling, on which profile, for how long, whether the agent is listening, thinking
//! or speaking, and how fast its last answer came. Each call's driver holds a [`LiveGuard`]
//! and tells it what the machine is doing after every step; the guard takes the shared lock
//! only when something changed (a few times per turn, never per frame), and removes the call
//! when it is dropped, so a call that ends by error or panic leaves no ghost behind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::call::context::CallContext;
use crate::ops::records::rfc3339_utc;

/// What a call is doing right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activity {
    /// Nothing is playing and no reply is pending: the caller has the floor.
    #[default]
    Listening,
    /// A reply is being prepared and the caller hears nothing yet.
    Thinking,
    /// The caller hears the agent.
    Speaking,
}

impl Activity {
    /// The label shown and sent (`listening`, `thinking`, `speaking`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listening => "listening",
            Self::Thinking => "thinking",
            Self::Speaking => "speaking",
        }
    }
}

/// One call in progress, as `GET /api/live` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveCall {
    /// The UUID Asterisk sent.
    pub call_id: Uuid,
    /// Asterisk's address.
    pub peer: SocketAddr,
    /// The caller's number, as the PBX told us.
    pub caller_number: Option<String>,
    /// The caller's name, as the PBX told us.
    pub caller_name: Option<String>,
    /// The dialled number.
    pub did: Option<String>,
    /// The profile the dialplan asked for (`None`: the default).
    pub profile: Option<String>,
    /// When the call started, RFC 3339 UTC.
    pub started_at: String,
    /// How long it has been up, ms.
    pub duration_ms: u64,
    /// Listening, thinking or speaking.
    pub state: Activity,
    /// Answered turns so far.
    pub turns: u32,
    /// The last answered turn: the caller's speech end to the first reply frame, ms.
    pub last_turn_latency_ms: Option<u64>,
}

#[derive(Debug)]
struct Entry {
    peer: SocketAddr,
    context: CallContext,
    started_at: SystemTime,
    started: Instant,
    state: Activity,
    turns: u32,
    last_turn_latency_ms: Option<u64>,
}

/// The registry of calls in progress. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct LiveCalls(Arc<Mutex<HashMap<Uuid, Entry>>>);

impl LiveCalls {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Entry>> {
        // The map holds plain data; a panic elsewhere while it was held leaves it usable.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a call that started at `started` (the driver's clock); it stays listed
    /// until the returned guard is dropped.
    pub fn begin(
        &self,
        call_id: Uuid,
        peer: SocketAddr,
        context: &CallContext,
        started: Instant,
    ) -> LiveGuard {
        let now = tokio::time::Instant::now().into_std();
        let started_at = SystemTime::now()
            .checked_sub(now.saturating_duration_since(started))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.lock().insert(
            call_id,
            Entry {
                peer,
                context: context.clone(),
                started_at,
                started,
                state: Activity::Listening,
                turns: 0,
                last_turn_latency_ms: None,
            },
        );
        LiveGuard {
            calls: self.clone(),
            call_id,
            state: Activity::Listening,
            turns_key: (0, None),
        }
    }

    /// Calls in progress, oldest first, with their durations as of now.
    pub fn snapshot(&self) -> Vec<LiveCall> {
        let now = tokio::time::Instant::now().into_std();
        let mut out: Vec<LiveCall> = self
            .lock()
            .iter()
            .map(|(id, e)| LiveCall {
                call_id: *id,
                peer: e.peer,
                caller_number: e.context.caller_number.clone(),
                caller_name: e.context.caller_name.clone(),
                did: e.context.did.clone(),
                profile: e.context.profile.clone(),
                started_at: rfc3339_utc(e.started_at),
                duration_ms: now.saturating_duration_since(e.started).as_millis() as u64,
                state: e.state,
                turns: e.turns,
                last_turn_latency_ms: e.last_turn_latency_ms,
            })
            .collect();
        out.sort_by(|a, b| {
            a.started_at
                .cmp(&b.started_at)
                .then(a.call_id.cmp(&b.call_id))
        });
        out
    }

    /// Calls in progress.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no call is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One call's place in [`LiveCalls`]; dropping it removes the call.
#[derive(Debug)]
pub struct LiveGuard {
    calls: LiveCalls,
    call_id: Uuid,
    state: Activity,
    turns_key: (usize, Option<u64>),
}

impl LiveGuard {
    /// Tells the registry what the call is doing. `turns_key` changes whenever the turns
    /// may have (cheap to compute, e.g. how many there are and the last one's first frame);
    /// only then is `turns` asked for the answered turns and the last one's latency. Called
    /// after every step of the call, so it takes no lock unless something changed.
    pub fn update(
        &mut self,
        state: Activity,
        turns_key: (usize, Option<u64>),
        turns: impl FnOnce() -> (u32, Option<u64>),
    ) {
        let turns_changed = turns_key != self.turns_key;
        if state == self.state && !turns_changed {
            return;
        }
        self.state = state;
        self.turns_key = turns_key;
        let answered = turns_changed.then(turns);
        if let Some(e) = self.calls.lock().get_mut(&self.call_id) {
            e.state = state;
            if let Some((n, last)) = answered {
                e.turns = n;
                e.last_turn_latency_ms = last;
            }
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.calls.lock().remove(&self.call_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> CallContext {
        CallContext {
            caller_number: Some("+60123456789".into()),
            caller_name: Some("Aminah".into()),
            did: Some("0380001000".into()),
            profile: Some("sales".into()),
            ..CallContext::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_is_listed_while_its_guard_lives() {
        let live = LiveCalls::new();
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let id = Uuid::from_u128(7);
        let start = tokio::time::Instant::now().into_std();
        let mut g = live.begin(id, peer, &context(), start);
        tokio::time::advance(std::time::Duration::from_millis(2_500)).await;
        let s = live.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].call_id, id);
        assert_eq!(s[0].caller_name.as_deref(), Some("Aminah"));
        assert_eq!(s[0].profile.as_deref(), Some("sales"));
        assert_eq!(s[0].state, Activity::Listening);
        assert_eq!(s[0].duration_ms, 2_500);
        assert_eq!(s[0].last_turn_latency_ms, None);

        g.update(Activity::Thinking, (0, None), || {
            unreachable!("turns unchanged")
        });
        assert_eq!(live.snapshot()[0].state, Activity::Thinking);
        g.update(Activity::Speaking, (1, Some(3_000)), || (1, Some(640)));
        let s = live.snapshot();
        assert_eq!(
            (s[0].state, s[0].turns, s[0].last_turn_latency_ms),
            (Activity::Speaking, 1, Some(640))
        );
        let json = serde_json::to_value(&s[0]).unwrap();
        assert_eq!(json["state"], "speaking");

        drop(g);
        assert!(live.is_empty());
    }

    #[test]
    fn calls_are_listed_oldest_first() {
        let live = LiveCalls::new();
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let now = Instant::now();
        let _new = live.begin(Uuid::from_u128(1), peer, &CallContext::default(), now);
        let _old = live.begin(
            Uuid::from_u128(2),
            peer,
            &CallContext::default(),
            now - std::time::Duration::from_secs(60),
        );
        let ids: Vec<u128> = live
            .snapshot()
            .iter()
            .map(|c| c.call_id.as_u128())
            .collect();
        assert_eq!(ids, [2, 1]);
    }
}
