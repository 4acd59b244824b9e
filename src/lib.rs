//! sifucall: an AI voice agent on Asterisk AudioSocket calls.
//!
//! # Layout
//! - [`audiosocket`]: the wire protocol (typed frames, strict codec).
//! - [`audio`]: G.711, WAV, resampling and voice-activity detection.
//! - [`call`]: one call: the session task, real-time playout, echo and the conversation.
//! - [`server`]: the listener: allowlist, call cap, graceful shutdown.
//! - [`providers`]: Azure STT, OpenRouter and ElevenLabs clients behind one trait each.
//! - [`sandbox`]: fake providers speaking the same wire formats, for tests and the demo.
//! - [`caller`]: a synthetic Asterisk that places calls, for operators, tests and benchmarks.
//! - [`ops`]: configuration, logging, metrics, admin HTTP, systemd, call records.
//! - [`pbx`]: the side channel to the PBX (AMI, or `CURL()` over the admin server): call
//!   context before the call, the outcome for the dialplan after it.
//!
//! # Errors
//! Library modules return `thiserror` enums; `anyhow` is only in `main`. Nothing that reads
//! the network, a file or a provider unwraps: `unwrap()` appears only in `#[cfg(test)]`
//! code, and the one `expect` outside tests parses the compiled-in `config/default.toml`,
//! which a unit test loads.

pub mod app;
pub mod audio;
pub mod audiosocket;
pub mod call;
pub mod caller;
pub mod demo;
pub mod ops;
pub mod pbx;
pub mod providers;
pub mod sandbox;
pub mod server;
