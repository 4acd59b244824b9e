//! Text-to-speech: text goes in as the LLM produces it, PCM comes out as it is synthesized.

pub mod decode;
pub mod elevenlabs;

use tokio::sync::mpsc;

use super::BoxFuture;

/// What a synthesis needs to know up front.
#[derive(Debug, Clone)]
pub struct TtsParams {
    /// The PCM rate the call needs (8000 or 16000); the client picks the output format and
    /// converts so that what comes out is always i16 at this rate.
    pub sample_rate: u32,
    /// The call's id, for logs.
    pub call_id: String,
}

/// Text for an open synthesis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TtsInput {
    /// More text: a whole clause (never a word cut in two; splitting the reply into clauses
    /// is the caller's job). The client adds the trailing space the API wants.
    Text(String),
    /// The reply is complete: generate everything buffered, then end the audio stream.
    Finish,
}

/// Audio out of a synthesis.
#[derive(Debug, Clone, PartialEq)]
pub enum TtsOutput {
    /// i16 PCM at the requested rate, whole samples only.
    Audio(Vec<i16>),
    /// Everything was generated.
    Done,
    /// Synthesis failed part-way.
    Failed(String),
}

/// A live synthesis for one reply. Dropping `text` without `Finish` cancels it.
#[derive(Debug)]
pub struct TtsStream {
    /// Text in, in order.
    pub text: mpsc::Sender<TtsInput>,
    /// Audio out, in order.
    pub audio: mpsc::Receiver<TtsOutput>,
}

/// Why a synthesis could not start or finished badly.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TtsError {
    /// The service rejected the request (bad key, quota, voice not found...).
    #[error("TTS request failed with HTTP {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// `detail.status` / `detail.message` as the service gave them.
        message: String,
    },
    /// Connection-level failure.
    #[error("TTS transport error: {0}")]
    Transport(String),
    /// The configuration is unusable.
    #[error("TTS is misconfigured: {0}")]
    Config(String),
    /// Nothing came back in time.
    #[error("TTS timed out after {0} ms")]
    Timeout(u64),
}

/// A text-to-speech provider.
pub trait TtsProvider: Send + Sync + 'static {
    /// Opens a streaming synthesis. Implementations should make this cheap to call ahead of
    /// time (connect while the LLM is still thinking).
    fn open(&self, params: TtsParams) -> BoxFuture<'_, Result<TtsStream, TtsError>>;
}
