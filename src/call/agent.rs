//! The boundary between the session task (socket, clock, playout) and whatever decides what
//! to say. The session never waits on the agent: inputs go over a bounded channel with
//! `try_send` (audio is dropped and counted if the agent falls behind), commands come back
//! over another.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::playout::{PlayoutEvent, Progress, UtteranceId};
use crate::audiosocket::{Digit, SampleRate};
use crate::ops::records::{TranscriptEntry, TurnTiming};

/// What the agent learns about the call when it starts.
#[derive(Debug, Clone)]
pub struct CallInfo {
    /// Asterisk's UUID for the call.
    pub call_id: Uuid,
    /// Where the call came from.
    pub peer: SocketAddr,
    /// The call's rate, learned from its first audio message.
    pub rate: SampleRate,
    /// When the session started (the UUID arrived).
    pub started: Instant,
}

/// From the session to the agent.
#[derive(Debug)]
pub enum AgentInput {
    /// Caller audio at the call rate, as it arrived.
    Audio(Vec<i16>),
    /// A DTMF digit.
    Dtmf(Digit),
    /// Something the playout did (an utterance started, completed, ran dry).
    Playout(PlayoutEvent),
    /// The playout was flushed (answer to [`AgentCommand::Flush`]): how far each utterance got.
    Flushed(Vec<Progress>),
}

/// From the agent to the session.
#[derive(Debug)]
pub enum AgentCommand {
    /// Queue audio for an utterance (opening it if new).
    Play {
        /// Which utterance.
        utterance: UtteranceId,
        /// Samples at the call rate.
        pcm: Vec<i16>,
    },
    /// No more audio for this utterance.
    Finish(UtteranceId),
    /// Stop talking now (barge-in). Answered with [`AgentInput::Flushed`].
    Flush,
    /// End the call after everything queued has played out.
    Hangup,
}

/// The session's side of a running agent.
#[derive(Debug)]
pub struct AgentHandle {
    /// Inputs to the agent. Bounded; the session uses `try_send`.
    pub input: mpsc::Sender<AgentInput>,
    /// Commands from the agent.
    pub commands: mpsc::Receiver<AgentCommand>,
    /// Commands applied before the first frame (the cached greeting), so they cost no
    /// channel hop and the greeting starts in the call's first frame.
    pub initial: Vec<AgentCommand>,
    /// The agent's account of the call, sent when it stops.
    pub report: Option<oneshot::Receiver<AgentReport>>,
}

/// What the agent reports at the end of a call.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct AgentReport {
    /// The conversation.
    pub transcript: Vec<TranscriptEntry>,
    /// Latency marks per turn.
    pub turns: Vec<TurnTiming>,
    /// LLM cost in credits, when reported.
    pub llm_cost: Option<f64>,
    /// Provider errors seen.
    pub errors: Vec<String>,
    /// Times the caller interrupted the agent.
    pub barge_ins: u32,
    /// When the VAD decided each barge-in, ms since the call started (latency benchmarks).
    pub barge_in_ms: Vec<u64>,
}

/// Starts an agent for each call.
pub trait AgentFactory: Send + Sync + 'static {
    /// Starts the agent for a call whose rate is now known. The agent must stop when
    /// `cancel` fires or its input channel closes.
    fn start(&self, call: CallInfo, cancel: CancellationToken) -> AgentHandle;
}
