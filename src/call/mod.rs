//! One call, from the UUID to the hangup.
//!
//! A call is a sans-IO state machine ([`machine`]) that holds every decision of the
//! conversation, and one async task ([`driver`]) that is its only I/O: the socket, the
//! 20 ms clock and the provider tasks. Reading order: [`machine`] (inputs, effects, the
//! state), then its parts ([`playout`], [`turn`], [`history`], [`hangup`], [`dtmf`]), then
//! [`driver`] (the only waiting) and [`reply`] (the LLM -> clauses -> TTS task).

pub mod clauses;
pub mod context;
pub mod driver;
pub mod dtmf;
pub mod hangup;
pub mod history;
pub mod machine;
pub mod playout;
pub mod profile;
pub mod prompts;
pub mod reply;
pub mod tools;
pub mod turn;

pub use context::{CallContext, CallControl, CallOutcome, NoControl};
pub use driver::{AgentSetup, Behaviour, CallSummary, SessionConfig};
pub use machine::{AgentConfig, AgentReport, CallMachine, Effect, Input, Pipeline};
pub use profile::{AgentProfiles, ProfileSetup};

#[cfg(test)]
mod driver_tests;
#[cfg(test)]
mod scenarios;
