//! One call: the session task that owns the socket and the clock, the real-time playout
//! buffer, and what the call does (echo, or the voice agent).

pub mod agent;
pub mod clauses;
pub mod conversation;
pub mod playout;
pub mod prompts;
pub mod session;
pub mod turn;
