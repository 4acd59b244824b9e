//! Fixed phrases (greeting, apology, hold) synthesized once and cached per sample rate, so
//! the greeting starts in the first frame of a call and an apology can be spoken even when
//! the TTS provider is the thing that failed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::RwLock;
use tracing::{info, warn};

use crate::providers::tts::{TtsInput, TtsOutput, TtsParams, TtsProvider};

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
}

impl std::fmt::Debug for PromptCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptCache")
            .field("texts", &self.texts)
            .finish_non_exhaustive()
    }
}

/// Longest a phrase synthesis may take.
const SYNTH_TIMEOUT: Duration = Duration::from_secs(15);

impl PromptCache {
    /// An empty cache.
    pub fn new(texts: PromptTexts, tts: Arc<dyn TtsProvider>) -> Self {
        Self {
            texts,
            tts,
            audio: RwLock::new(HashMap::new()),
        }
    }

    /// The texts.
    pub fn texts(&self) -> &PromptTexts {
        &self.texts
    }

    /// Synthesizes every phrase at each rate, concurrently; failures are logged and retried
    /// on first use.
    pub async fn preload(&self, rates: &[u32]) {
        let jobs = rates.iter().flat_map(|&rate| {
            [PromptKind::Greeting, PromptKind::Apology, PromptKind::Hold, PromptKind::StillThere].map(move |kind| async move {
                if self.texts.text(kind).trim().is_empty() {
                    return;
                }
                match self.synthesize(kind, rate).await {
                    Ok(pcm) => info!(?kind, rate, ms = pcm.len() as u64 * 1000 / u64::from(rate), "prompt cached"),
                    Err(e) => warn!(?kind, rate, error = %e, "could not synthesize prompt at startup; will retry on first use"),
                }
            })
        });
        futures_util::future::join_all(jobs).await;
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
        let params = TtsParams {
            sample_rate: rate,
            call_id: format!("prompt-{kind:?}"),
        };
        let pcm = tokio::time::timeout(
            SYNTH_TIMEOUT,
            synthesize_text(self.tts.as_ref(), params, text),
        )
        .await
        .map_err(|_| format!("timed out after {SYNTH_TIMEOUT:?}"))??;
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
    let mut stream = tts.open(params).await.map_err(|e| e.to_string())?;
    stream
        .text
        .send(TtsInput::Text(format!("{} ", text.trim())))
        .await
        .map_err(|_| "TTS stream closed")?;
    stream
        .text
        .send(TtsInput::Finish)
        .await
        .map_err(|_| "TTS stream closed")?;
    let mut pcm = Vec::new();
    while let Some(out) = stream.audio.recv().await {
        match out {
            TtsOutput::Audio(a) => pcm.extend(a),
            TtsOutput::Done => break,
            TtsOutput::Failed(e) => return Err(e),
        }
    }
    if pcm.is_empty() {
        return Err("TTS returned no audio".into());
    }
    Ok(pcm)
}
