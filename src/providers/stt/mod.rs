//! Speech-to-text: one continuous recognition per call.
//!
//! A call opens an [`SttSession`] at call start (so no turn pays a handshake), pushes the
//! caller's PCM into it as it arrives and reads [`SttEvent`]s out.

pub mod azure;
pub mod protocol;

use tokio::sync::mpsc;

use super::BoxFuture;

/// What a recognition needs to know up front.
#[derive(Debug, Clone)]
pub struct SttParams {
    /// BCP-47 locale, e.g. `ms-MY`: the language recognised, or with language
    /// identification the one the request names in its URL (the SDK's recognition language).
    pub language: String,
    /// Candidate locales for continuous language identification, e.g. `["ms-MY", "en-US"]`.
    /// With two or more the service detects, phrase by phrase, which one the caller speaks
    /// (and [`SttEvent::Final`] says which); fewer means plain recognition in `language`.
    pub languages: Vec<String>,
    /// The call's sample rate (8000 or 16000), declared to the service in the WAV header.
    pub sample_rate: u32,
    /// Silence that ends a phrase, in ms (Azure accepts 100..=5000).
    pub segmentation_silence_ms: u32,
    /// The call's id, for logs.
    pub call_id: String,
}

/// Something the recogniser said.
#[derive(Debug, Clone, PartialEq)]
pub enum SttEvent {
    /// The service heard speech start (`speech.startDetected`).
    SpeechStarted,
    /// A partial transcript (`speech.hypothesis` or `speech.fragment`); it may change.
    Partial(String),
    /// A final phrase (`speech.phrase`): the end of the caller's turn. Its text is empty when
    /// the service heard sound but no words (`NoMatch`, `InitialSilenceTimeout`,
    /// `BabbleTimeout`, or a `Success` without text), so an interruption that carried no words
    /// can be told from one that did.
    Final {
        /// What the caller said (empty: no words).
        text: String,
        /// Start of the phrase in the call's audio, in ms since the recognition began.
        offset_ms: u64,
        /// Length of the phrase, in ms.
        duration_ms: u64,
        /// The locale language identification detected for the phrase (one of
        /// [`SttParams::languages`]); `None` without identification or when the service could
        /// not tell.
        language: Option<String>,
    },
    /// The connection dropped (or was replaced before the service's 10-minute cap) and was
    /// re-established; unacknowledged audio was replayed.
    Reconnected,
    /// Recognition failed for good (after retries); the call should apologise and go on
    /// without STT or end.
    Failed(String),
}

impl SttParams {
    /// Whether the service is asked to identify the language of each phrase.
    pub fn identifies_language(&self) -> bool {
        self.languages.len() >= 2
    }
}

/// A live recognition. Dropping it ends the recognition (end-of-stream sent if possible).
#[derive(Debug)]
pub struct SttSession {
    /// Caller audio, little-endian i16 samples at `SttParams::sample_rate`, any chunk size.
    /// Bounded: when full, the sender should drop audio and count it rather than block.
    pub audio: mpsc::Sender<Vec<i16>>,
    /// Recognition events, in order.
    pub events: mpsc::Receiver<SttEvent>,
}

/// Why a recognition could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SttError {
    /// The service rejected the key (HTTP 401/403 on upgrade).
    #[error("speech service rejected the credentials (HTTP {0})")]
    Unauthorized(u16),
    /// Could not connect or upgrade.
    #[error("could not connect to the speech service: {0}")]
    Connect(String),
    /// The configuration is unusable (e.g. no key, bad endpoint).
    #[error("speech-to-text is misconfigured: {0}")]
    Config(String),
}

/// A speech-to-text provider.
pub trait SttProvider: Send + Sync + 'static {
    /// Opens a continuous recognition for one call.
    fn start(&self, params: SttParams) -> BoxFuture<'_, Result<SttSession, SttError>>;
}
