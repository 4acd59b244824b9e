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
    /// ISO 639-1 code of the language of the text (`ms`, `en`), for models that take one per
    /// request; `None` means the configured default (`tts.language_code`).
    pub language_code: Option<String>,
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
    /// Which characters the audio so far speaks, and when: sent right after the
    /// [`TtsOutput::Audio`] chunk it belongs to, on transports that report it (the websocket;
    /// HTTP `/stream` does not, so a consumer falls back to proportions of the text). The three
    /// lists have the same length; times are ms from the start of this stream's audio (the
    /// first sample of the first `Audio`), so a playout position maps straight to the text the
    /// listener has heard: every character with `start_ms < heard_ms`.
    Alignment {
        /// The characters, spaces and punctuation included, as the service reported them
        /// (each normally one `char`).
        chars: Vec<String>,
        /// When each starts, ms from the start of the stream's audio.
        start_ms: Vec<u32>,
        /// How long each lasts, ms.
        duration_ms: Vec<u32>,
    },
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
        /// The wait the service asked for (`Retry-After`), if any.
        retry_after_ms: Option<u64>,
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

impl TtsError {
    /// Whether the service refused for load (429: too many concurrent requests, or busy):
    /// worth retrying after a wait.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Status { status: 429, .. })
    }
}

/// A text-to-speech provider.
pub trait TtsProvider: Send + Sync + 'static {
    /// Opens a streaming synthesis. Implementations should make this cheap to call ahead of
    /// time (connect while the LLM is still thinking).
    fn open(&self, params: TtsParams) -> BoxFuture<'_, Result<TtsStream, TtsError>>;
}
