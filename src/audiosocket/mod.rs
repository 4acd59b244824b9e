//! The AudioSocket protocol exactly as Asterisk speaks it (`app_audiosocket.c`,
//! `res_audiosocket.c`): `kind: u8`, `length: u16 BE`, `payload`, in both directions.
//!
//! The types are split by direction on purpose. [`Inbound`] is everything Asterisk can
//! send us; [`Outbound`] can only express what Asterisk accepts from a server (audio of a
//! known rate, non-empty, and hangup), so no code path can emit a frame that makes Asterisk
//! abort the call. The rules and the observed Asterisk behaviour this relies on are in
//! `docs/audiosocket.md`.

mod codec;
mod frame;

pub use codec::{CallerCodec, FrameError, HEADER_LEN, MAX_PAYLOAD, RawFrame, ServerCodec};
pub use frame::{Digit, Inbound, Outbound, OutboundAudio, OutboundError, SampleRate};
