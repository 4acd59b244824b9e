//! Clients for the three cloud stages of a turn, one trait per stage.
//!
//! The call pipeline only sees the traits, so a test can drive it with any implementation;
//! the real clients speak the providers' exact wire formats (see `docs/providers/`) and are
//! pointed at the real services or at the fakes in [`crate::sandbox`] purely by
//! configuration. Keys go only in request headers.

pub mod llm;
pub mod stt;
pub mod tts;

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future, so the provider traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
