//! The Asterisk Manager Interface (AMI): the daemon's own small client and the call
//! control built on it.
//!
//! [`packet`] is the wire format without I/O, [`client`] the one connection the daemon
//! keeps (login, `ActionID` correlation, event lists, reconnects, deadlines), and
//! [`control`] reads a call's context from its channel and sets its outcome there.
//!
//! Why not the `asterisk-manager` crate (2.1.3): it has no TLS, fixes its timeouts at 10 s,
//! logs in with `Events: on` and collects list events from a lossy broadcast of the whole
//! event stream (a busy PBX can make it drop a `Status` item), keeps action fields in a
//! map (no repeated keys), reads lines without a length bound and puts values on the wire
//! without stripping line breaks; it also brings `chrono`, `log` and tokio's `test-util`
//! into the build. AMI is a small line protocol; the client here is a few hundred lines
//! with the limits this daemon needs, and is tested against a fake server in
//! `sandbox::ami` that does not share its parser.

pub mod client;
pub mod control;
pub mod packet;

pub use client::{AmiClient, AmiConfig, AmiError};
pub use control::AmiControl;
