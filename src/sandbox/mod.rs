//! Fake Azure STT, OpenRouter and ElevenLabs servers that speak the real wire formats
//! (websocket, SSE, chunked audio) with controllable delays and faults.
//!
//! They drive the tests and benchmarks, `sifucall sandbox` (local stand-ins, so an operator
//! can exercise the PBX plumbing without keys) and `sifucall demo`. The real clients talk
//! to them unchanged: only the endpoint differs.

pub mod azure;
pub mod elevenlabs;
pub mod openrouter;
