//! Fixed phrases (greeting, apology, hold) synthesized once and cached per sample rate, so
//! the greeting starts in the first frame of a call and an apology can be spoken even when
//! the TTS provider is the thing that failed. Startup synthesis runs a bounded number at a
//! time (`tts.max_concurrency`) and retries a 429 after the service's backoff: small plans
//! allow only a few concurrent requests, and six at once would be refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::RwLock;
use tracing::{info, warn};

use crate::providers::tts::{TtsError, TtsInput, TtsOutput, TtsParams, TtsProvider};

/// Which phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromptKind {
    /// `agent.greeting`
    Greeting,
    /// `agent.apology`
    Apology,
    /// `agent.hold_prompt`
    Hold,
    /// `agent.still_there_prompt`
    StillThere,
}

/// The texts of the phrases.
#[derive(Debug, Clone)]
pub struct PromptTexts {
    /// Said when the call starts.
    pub greeting: String,
    /// Said when a provider fails.
    pub apology: String,
    /// Said when a reply is slow to start.
    pub hold: String,
    /// Said when the caller has been silent for a while, before the idle hang-up.
    pub still_there: String,
}

impl PromptTexts {
    /// The text of a phrase.
    pub fn text(&self, kind: PromptKind) -> &str {
        match kind {
            PromptKind::Greeting => &self.greeting,
            PromptKind::Apology => &self.apology,
            PromptKind::Hold => &self.hold,
            PromptKind::StillThere => &self.still_there,
        }
    }
}

/// Shared synthesized audio.
type Pcm = Arc<Vec<i16>>;

/// Synthesized phrases by (kind, rate).
pub struct PromptCache {
    texts: PromptTexts,
    tts: Arc<dyn TtsProvider>,
    audio: RwLock<HashMap<(PromptKind, u32), Pcm>>,
    max_concurrency: usize,
}

impl std::fmt::Debug for PromptCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptCache")
            .field("texts", &self.texts)
            .finish_non_exhaustive()
    }
}

/// Longest a phrase synthesis may take (each attempt).
const SYNTH_TIMEOUT: Duration = Duration::from_secs(15);
/// Syntheses at once during [`PromptCache::preload`] unless set with
/// [`PromptCache::with_max_concurrency`] (the default of `tts.max_concurrency`).
pub const DEFAULT_MAX_CONCURRENCY: usize = 2;
/// Attempts per phrase while the service answers 429.
const BUSY_ATTEMPTS: u32 = 6;
/// The first wait after a 429 without `Retry-After`; doubled after each further one.
const BUSY_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between attempts, whatever the service asks for.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(10);

/// Why one synthesis attempt failed.
enum SynthError {
    /// 429: retry after the wait the service asked for, if it said.
    Busy(Option<Duration>, String),
    Other(String),
}

impl SynthError {
    fn message(self) -> String {
        match self {
            Self::Busy(_, m) | Self::Other(m) => m,
        }
    }
}

impl From<TtsError> for SynthError {
    fn from(e: TtsError) -> Self {
        match e {
            TtsError::Status {
                retry_after_ms,
                ref message,
                ..
            } if e.is_busy() => Self::Busy(
                retry_after_ms.map(Duration::from_millis),
                format!("HTTP 429: {message}"),
            ),
            other => Self::Other(other.to_string()),
        }
    }
}

impl PromptCache {
    /// An empty cache.
    pub fn new(texts: PromptTexts, tts: Arc<dyn TtsProvider>) -> Self {
        Self {
            texts,
            tts,
            audio: RwLock::new(HashMap::new()),
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
        }
    }

    /// At most `n` (at least 1) syntheses at once during [`PromptCache::preload`]
    /// (`tts.max_concurrency`).
    pub fn with_max_concurrency(mut self, n: u32) -> Self {
        self.max_concurrency = usize::try_from(n).unwrap_or(usize::MAX).max(1);
        self
    }

    /// The texts.
    pub fn texts(&self) -> &PromptTexts {
        &self.texts
    }

    /// Synthesizes every phrase at each rate, at most `max_concurrency` at a time, retrying
    /// 429s; failures are logged and retried on first use.
    pub async fn preload(&self, rates: &[u32]) {
        let jobs: Vec<(PromptKind, u32)> = rates
            .iter()
            .flat_map(|&rate| {
                [
                    PromptKind::Greeting,
                    PromptKind::Apology,
                    PromptKind::Hold,
                    PromptKind::StillThere,
                ]
                .map(move |kind| (kind, rate))
            })
            .collect();
        futures_util::stream::iter(jobs)
            .map(|(kind, rate)| self.preload_one(kind, rate))
            .buffer_unordered(self.max_concurrency)
            .collect::<Vec<()>>()
            .await;
    }

    async fn preload_one(&self, kind: PromptKind, rate: u32) {
        if self.texts.text(kind).trim().is_empty() {
            return;
        }
        match self.synthesize(kind, rate).await {
            Ok(pcm) => info!(
                ?kind,
                rate,
                ms = pcm.len() as u64 * 1000 / u64::from(rate),
                "prompt cached"
            ),
            Err(e) => {
                warn!(?kind, rate, error = %e, "could not synthesize prompt at startup; will retry on first use")
            }
        }
    }

    /// The cached audio, if ready (never waits).
    pub fn cached(&self, kind: PromptKind, rate: u32) -> Option<Arc<Vec<i16>>> {
        self.audio
            .try_read()
            .ok()
            .and_then(|m| m.get(&(kind, rate)).cloned())
    }

    /// The audio, synthesizing it now if it is not cached.
    pub async fn get(&self, kind: PromptKind, rate: u32) -> Result<Arc<Vec<i16>>, String> {
        if let Some(a) = self.audio.read().await.get(&(kind, rate)) {
            return Ok(Arc::clone(a));
        }
        self.synthesize(kind, rate).await
    }

    async fn synthesize(&self, kind: PromptKind, rate: u32) -> Result<Arc<Vec<i16>>, String> {
        let text = self.texts.text(kind);
        if text.trim().is_empty() {
            return Err("empty prompt text".into());
        }
        let mut backoff = BUSY_BACKOFF;
        let mut attempt = 1;
        let pcm = loop {
            let params = TtsParams {
                sample_rate: rate,
                call_id: format!("prompt-{kind:?}"),
                language_code: None,
            };
            let result = tokio::time::timeout(
                SYNTH_TIMEOUT,
                synthesize_attempt(self.tts.as_ref(), params, text),
            )
            .await
            .unwrap_or_else(|_| {
                Err(SynthError::Other(format!(
                    "timed out after {SYNTH_TIMEOUT:?}"
                )))
            });
            match result {
                Ok(pcm) => break pcm,
                Err(SynthError::Busy(asked, why)) if attempt < BUSY_ATTEMPTS => {
                    let wait = asked.unwrap_or(backoff).min(MAX_BUSY_WAIT);
                    warn!(?kind, rate, attempt, wait_ms = wait.as_millis() as u64, reason = %why, "TTS busy; retrying the prompt");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_BUSY_WAIT);
                    attempt += 1;
                }
                Err(e) => return Err(e.message()),
            }
        };
        let pcm = Arc::new(pcm);
        self.audio
            .write()
            .await
            .insert((kind, rate), Arc::clone(&pcm));
        Ok(pcm)
    }
}

/// Synthesizes a whole text through a streaming provider.
pub async fn synthesize_text(
    tts: &dyn TtsProvider,
    params: TtsParams,
    text: &str,
) -> Result<Vec<i16>, String> {
    synthesize_attempt(tts, params, text)
        .await
        .map_err(SynthError::message)
}

async fn synthesize_attempt(
    tts: &dyn TtsProvider,
    params: TtsParams,
    text: &str,
) -> Result<Vec<i16>, SynthError> {
    let closed = || SynthError::Other("TTS stream closed".into());
    let mut stream = tts.open(params).await?;
    stream
        .text
        .send(TtsInput::Text(format!("{} ", text.trim())))
        .await
        .map_err(|_| closed())?;
    stream
        .text
        .send(TtsInput::Finish)
        .await
        .map_err(|_| closed())?;
    let mut pcm = Vec::new();
    while let Some(out) = stream.audio.recv().await {
        match out {
            TtsOutput::Audio(a) => pcm.extend(a),
            TtsOutput::Alignment { .. } => {}
            TtsOutput::Done => break,
            // Over HTTP a 429 arrives here, as text: retried with the default backoff.
            TtsOutput::Failed(e) if e.contains("HTTP 429") => {
                return Err(SynthError::Busy(None, e));
            }
            TtsOutput::Failed(e) => return Err(SynthError::Other(e)),
        }
    }
    if pcm.is_empty() {
        return Err(SynthError::Other("TTS returned no audio".into()));
    }
    Ok(pcm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::config::{OutputFormat, Secret, Settings, TtsTransport};
    use crate::providers::tts::elevenlabs::ElevenLabs;
    use crate::sandbox::elevenlabs::{self as fake, FakeElevenLabsConfig};

    const KEY: &str = "el-test-key";
    const GUARD: Duration = Duration::from_secs(60);

    fn texts() -> PromptTexts {
        PromptTexts {
            greeting: "Selamat datang ke khidmat pelanggan.".into(),
            apology: "Maaf, ada gangguan.".into(),
            hold: "Sekejap, ya.".into(),
            still_there: "Helo, anda masih di talian?".into(),
        }
    }

    /// A fake whose plan allows two syntheses at once, each slow enough to overlap.
    async fn small_plan(transport: TtsTransport) -> (fake::FakeElevenLabs, Arc<dyn TtsProvider>) {
        let srv = fake::spawn(FakeElevenLabsConfig {
            key: Some(KEY.into()),
            first_byte_delay_ms: 20,
            realtime_factor: 10.0,
            max_concurrent: 2,
            ..FakeElevenLabsConfig::default()
        })
        .await
        .unwrap();
        let mut s = Settings::defaults().tts;
        s.base_url = srv.base_url();
        s.transport = transport;
        s.output_format = OutputFormat::Ulaw8000;
        let el = ElevenLabs::new(&s, Secret::new(Some(KEY.into()))).unwrap();
        (srv, Arc::new(el))
    }

    async fn all_cached(cache: &PromptCache) -> usize {
        let mut n = 0;
        for rate in [8_000, 16_000] {
            for kind in [
                PromptKind::Greeting,
                PromptKind::Apology,
                PromptKind::Hold,
                PromptKind::StillThere,
            ] {
                n += usize::from(cache.cached(kind, rate).is_some());
            }
        }
        n
    }

    #[tokio::test]
    async fn preload_stays_within_the_plans_concurrency() {
        for transport in [TtsTransport::Websocket, TtsTransport::Http] {
            let (srv, tts) = small_plan(transport).await;
            let cache = PromptCache::new(texts(), tts).with_max_concurrency(2);
            tokio::time::timeout(GUARD, cache.preload(&[8_000, 16_000]))
                .await
                .expect("hang guard");
            assert_eq!(all_cached(&cache).await, 8, "{transport:?}");
            assert!(srv.stats().max_concurrent_seen() <= 2);
        }
    }

    #[tokio::test]
    async fn preload_retries_429_until_every_prompt_is_cached() {
        // Eight at once against a plan of two: six are refused at first, then retried.
        let (srv, tts) = small_plan(TtsTransport::Websocket).await;
        let cache = PromptCache::new(texts(), tts).with_max_concurrency(8);
        tokio::time::timeout(GUARD, cache.preload(&[8_000, 16_000]))
            .await
            .expect("hang guard");
        assert!(
            srv.stats().busy_rejections() >= 6,
            "the plan's limit was hit"
        );
        assert_eq!(all_cached(&cache).await, 8);
    }

    #[test]
    fn a_429_is_busy_with_the_asked_wait() {
        let e = TtsError::Status {
            status: 429,
            message: "too_many_concurrent_requests".into(),
            retry_after_ms: Some(1_500),
        };
        assert!(
            matches!(SynthError::from(e), SynthError::Busy(Some(d), m) if d == Duration::from_millis(1_500) && m.contains("429"))
        );
        let e = TtsError::Status {
            status: 401,
            message: "invalid_api_key".into(),
            retry_after_ms: None,
        };
        assert!(matches!(SynthError::from(e), SynthError::Other(_)));
    }
}
