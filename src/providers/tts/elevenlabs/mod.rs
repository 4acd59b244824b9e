//! ElevenLabs text-to-speech over the `stream-input` websocket (`ws.rs`) or HTTP `/stream`
//! (`http.rs`).
//!
//! The call pipeline opens a synthesis while the LLM is still thinking, feeds it clauses as
//! they are produced and plays the PCM that comes back. The websocket transport is the fast
//! path: `open()` connects and sends the initialise message ahead of time, text is forwarded
//! clause by clause with `try_trigger_generation`, and audio is decoded the moment it arrives.
//! The HTTP transport posts the clauses to `/stream` one request at a time and streams the
//! response bodies out. The key travels only in the `xi-api-key` header of the upgrade or the
//! POST, never in a message body or URL. Wire formats: `docs/providers/elevenlabs.md`; the
//! message bodies are built and parsed in `messages.rs`.

mod http;
mod messages;
mod ws;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::{TtsError, TtsInput, TtsOutput, TtsParams, TtsProvider, TtsStream};
use crate::ops::config::{OutputFormat, Secret, TtsSettings, TtsTransport};
use crate::providers::BoxFuture;

/// Clauses waiting to be sent.
const TEXT_CHANNEL: usize = 32;
/// Audio chunks waiting to be played.
const AUDIO_CHANNEL: usize = 64;
/// Default deadline for the TCP + TLS + websocket handshake.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The ElevenLabs client. Cheap to share; one pooled HTTP client serves all calls.
#[derive(Debug, Clone)]
pub struct ElevenLabs {
    settings: TtsSettings,
    key: Secret,
    http: reqwest::Client,
}

impl ElevenLabs {
    /// Checks the settings and builds the pooled HTTP client.
    pub fn new(settings: &TtsSettings, key: Secret) -> Result<Self, TtsError> {
        let Some(k) = key.expose() else {
            return Err(TtsError::Config("ELEVENLABS_API_KEY is not set".into()));
        };
        if HeaderValue::from_str(k).is_err() {
            return Err(TtsError::Config(
                "ELEVENLABS_API_KEY is not a valid header value".into(),
            ));
        }
        if settings.voice_id.trim().is_empty() {
            return Err(TtsError::Config("tts.voice_id is empty".into()));
        }
        if settings.model_id.trim().is_empty() {
            return Err(TtsError::Config("tts.model_id is empty".into()));
        }
        if settings.first_byte_timeout_ms == 0 {
            return Err(TtsError::Config(
                "tts.first_byte_timeout_ms must be positive".into(),
            ));
        }
        // Validates base_url and voice_id once, so `open()` cannot fail on them later.
        endpoint_url(&settings.base_url, &settings.voice_id, "stream")?;
        let http = reqwest::Client::builder()
            .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| TtsError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            settings: settings.clone(),
            key,
            http,
        })
    }

    fn first_byte_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.first_byte_timeout_ms)
    }

    /// The key as an `xi-api-key` header value, marked sensitive so that `Debug` of a
    /// request never shows it.
    fn key_header(&self) -> Result<HeaderValue, TtsError> {
        let mut v = HeaderValue::from_str(self.key.expose().unwrap_or_default()).map_err(|_| {
            TtsError::Config("ELEVENLABS_API_KEY is not a valid header value".into())
        })?;
        v.set_sensitive(true);
        Ok(v)
    }

    /// `language_code` only for the models that take it (flash/turbo v2.5): the language of
    /// this request's text when the caller says which, else the configured one.
    fn language_code<'a>(&'a self, params: &'a TtsParams) -> Option<&'a str> {
        let lang = params
            .language_code
            .as_deref()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| self.settings.language_code.trim());
        (self.settings.model_id.ends_with("_v2_5") && !lang.is_empty()).then_some(lang)
    }
}

/// Makes the text and audio channels, spawns the driver `run` builds on its ends of them and
/// returns the caller's ends.
fn spawn_driver<F>(
    run: impl FnOnce(mpsc::Receiver<TtsInput>, mpsc::Sender<TtsOutput>) -> F,
) -> TtsStream
where
    F: Future<Output = ()> + Send + 'static,
{
    let (text_tx, text_rx) = mpsc::channel(TEXT_CHANNEL);
    let (audio_tx, audio_rx) = mpsc::channel(AUDIO_CHANNEL);
    tokio::spawn(run(text_rx, audio_tx));
    TtsStream {
        text: text_tx,
        audio: audio_rx,
    }
}

impl TtsProvider for ElevenLabs {
    fn open(&self, params: TtsParams) -> BoxFuture<'_, Result<TtsStream, TtsError>> {
        Box::pin(async move {
            match self.settings.transport {
                TtsTransport::Websocket => self.open_websocket(params).await,
                TtsTransport::Http => self.open_http(params),
            }
        })
    }
}

/// The output format to request for a call at `sample_rate`: the configured one when its
/// rate matches, else raw PCM at the call's rate (so no resampling is ever needed).
pub fn output_format_for(
    configured: OutputFormat,
    sample_rate: u32,
) -> Result<OutputFormat, TtsError> {
    match sample_rate {
        8_000 if configured.sample_rate() == 8_000 => Ok(configured),
        8_000 => Ok(OutputFormat::Pcm8000),
        16_000 => Ok(OutputFormat::Pcm16000),
        other => Err(TtsError::Config(format!(
            "unsupported call sample rate {other} Hz"
        ))),
    }
}

/// `{base_url}/v1/text-to-speech/{voice_id}/{leaf}` with the voice id path-encoded.
fn endpoint_url(base_url: &str, voice_id: &str, leaf: &str) -> Result<reqwest::Url, TtsError> {
    let mut url = reqwest::Url::parse(base_url)
        .map_err(|e| TtsError::Config(format!("tts.base_url {base_url:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TtsError::Config(format!(
            "tts.base_url {base_url:?} must be http(s)"
        )));
    }
    url.path_segments_mut()
        .map_err(|()| TtsError::Config(format!("tts.base_url {base_url:?} cannot take a path")))?
        .pop_if_empty()
        .extend(["v1", "text-to-speech", voice_id, leaf]);
    url.set_query(None);
    Ok(url)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn formats_follow_the_call_rate() {
        use OutputFormat::*;
        assert_eq!(output_format_for(Ulaw8000, 8_000).unwrap(), Ulaw8000);
        assert_eq!(output_format_for(Alaw8000, 8_000).unwrap(), Alaw8000);
        assert_eq!(output_format_for(Pcm16000, 8_000).unwrap(), Pcm8000);
        assert_eq!(output_format_for(Ulaw8000, 16_000).unwrap(), Pcm16000);
        assert!(matches!(
            output_format_for(Ulaw8000, 44_100),
            Err(TtsError::Config(_))
        ));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let s = settings(
            "http://127.0.0.1:9",
            TtsTransport::Http,
            OutputFormat::Ulaw8000,
        );
        let el = client(&s, "MARKER-KEY-123");
        assert!(!format!("{el:?}").contains("MARKER-KEY-123"));
        assert!(!format!("{:?}", el.key_header().unwrap()).contains("MARKER-KEY-123"));
    }

    #[test]
    fn urls_and_config() {
        let mut s = settings(
            "https://api.elevenlabs.io/",
            TtsTransport::Websocket,
            OutputFormat::Ulaw8000,
        );
        s.voice_id = "voice 1".into();
        let el = client(&s, KEY);
        assert_eq!(
            el.websocket_url(OutputFormat::Ulaw8000, &params(8000))
                .unwrap()
                .as_str(),
            "wss://api.elevenlabs.io/v1/text-to-speech/voice%201/stream-input?model_id=eleven_flash_v2_5&output_format=ulaw_8000&language_code=ms"
        );
        // The language of a reply's text, when the call knows it, replaces the configured one.
        let english = TtsParams {
            language_code: Some("en".into()),
            ..params(8000)
        };
        assert_eq!(
            el.websocket_url(OutputFormat::Ulaw8000, &english)
                .unwrap()
                .query(),
            Some("model_id=eleven_flash_v2_5&output_format=ulaw_8000&language_code=en")
        );
        s.model_id = "eleven_multilingual_v2".into();
        s.base_url = "http://127.0.0.1:9/prefix".into();
        let el = client(&s, KEY);
        // multilingual_v2 takes no language_code, whatever the text's language.
        assert_eq!(
            el.websocket_url(OutputFormat::Pcm8000, &english)
                .unwrap()
                .as_str(),
            "ws://127.0.0.1:9/prefix/v1/text-to-speech/voice%201/stream-input?model_id=eleven_multilingual_v2&output_format=pcm_8000"
        );
        assert!(matches!(
            ElevenLabs::new(&s, Secret::new(None)),
            Err(TtsError::Config(_))
        ));
        s.base_url = "ftp://x".into();
        assert!(matches!(
            ElevenLabs::new(&s, Secret::new(Some(KEY.into()))),
            Err(TtsError::Config(_))
        ));
    }
}
