//! One reply as a task: stream the model's text, cut it into clauses, stream them to TTS,
//! stream the audio back. TTS is connected while the model is still thinking. The task only
//! reports ([`ReplyEvent`]s tagged with its id) and is cancelled as a unit; the call
//! machine decides what any of it means.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::clauses::ClauseSplitter;
use super::machine::{Pipeline, ReplyEvent, ReplyId};
use crate::ops::metrics::Provider;
use crate::providers::llm::{ChatRequest, LlmEvent, LlmProvider, LlmStream};
use crate::providers::stt::SttProvider;
use crate::providers::tts::{TtsInput, TtsOutput, TtsParams, TtsProvider, TtsStream};

/// The three providers.
#[derive(Clone)]
pub struct Providers {
    /// Speech-to-text.
    pub stt: Arc<dyn SttProvider>,
    /// The language model.
    pub llm: Arc<dyn LlmProvider>,
    /// Text-to-speech.
    pub tts: Arc<dyn TtsProvider>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Providers")
    }
}

type Sink = mpsc::Sender<(ReplyId, ReplyEvent)>;

/// Runs one reply to its end (or until `cancel`), reporting on `tx`. Every send waits for
/// room: events are never dropped, and a slow driver slows the reply, not the call.
pub async fn run(
    id: ReplyId,
    providers: Providers,
    req: ChatRequest,
    tts_params: TtsParams,
    pipeline: Pipeline,
    tx: Sink,
    cancel: CancellationToken,
) {
    let work = async {
        let t0 = Instant::now();
        let llm_fut = async {
            let r = providers.llm.stream(req).await;
            debug!(
                ms = t0.elapsed().as_secs_f64() * 1000.0,
                "LLM response headers"
            );
            r
        };
        let tts_fut = async {
            let r = providers.tts.open(tts_params).await;
            debug!(ms = t0.elapsed().as_secs_f64() * 1000.0, "TTS stream open");
            r
        };
        let (llm, tts) = tokio::join!(llm_fut, tts_fut);
        let llm = llm.map_err(|e| (Provider::Llm, e.to_string()))?;
        let tts = tts.map_err(|e| (Provider::Tts, e.to_string()))?;
        match pipeline {
            Pipeline::Streamed => streamed(id, llm, tts, &tx).await,
            Pipeline::Sequential => sequential(id, llm, tts, &tx).await,
        }
    };
    tokio::select! {
        () = cancel.cancelled() => {}
        r = work => {
            let ev = match r {
                Ok(()) => ReplyEvent::Done,
                Err((provider, error)) => ReplyEvent::Failed { provider, error },
            };
            let _ = tx.send((id, ev)).await;
        }
    }
}

type Failure = (Provider, String);

/// Drops a language tag (`[en-US] `) the model may copy from the caller's tagged messages to
/// the start of its reply, so TTS never reads it out. Text is held only while the reply's
/// first characters could still be such a tag (at most [`LeadingTag::MAX`] characters).
#[derive(Debug, Default)]
struct LeadingTag {
    held: String,
    decided: bool,
    /// A tag was dropped: the whitespace after it goes too.
    after_tag: bool,
}

impl LeadingTag {
    /// Longest tag looked for, brackets included (`[zh-Hans-CN]` is 12).
    const MAX: usize = 16;

    /// The text to pass on now.
    fn push(&mut self, text: &str) -> Option<String> {
        if self.after_tag {
            let text = text.trim_start();
            self.after_tag = text.is_empty();
            return (!text.is_empty()).then(|| text.to_owned());
        }
        if self.decided {
            return Some(text.to_owned());
        }
        self.held.push_str(text);
        let start = self.held.trim_start();
        if start.is_empty() {
            return None;
        }
        if !start.starts_with('[') {
            return self.release();
        }
        match start.find(']') {
            Some(end) if is_locale(&start[1..end]) => {
                let rest = start[end + 1..].trim_start().to_owned();
                self.decided = true;
                self.after_tag = rest.is_empty();
                self.held.clear();
                (!rest.is_empty()).then_some(rest)
            }
            Some(_) => self.release(),
            None if start.chars().count() > Self::MAX => self.release(),
            None => None,
        }
    }

    /// What is still held at the end of the reply.
    fn finish(&mut self) -> Option<String> {
        self.release()
    }

    fn release(&mut self) -> Option<String> {
        self.decided = true;
        let held = std::mem::take(&mut self.held);
        (!held.is_empty()).then_some(held)
    }
}

/// `ms-MY`, `en-US`, `zh-Hans-CN`: letters, digits and hyphens, starting with 2-3 letters.
fn is_locale(s: &str) -> bool {
    let primary = s.split('-').next().unwrap_or_default();
    (2..=3).contains(&primary.len())
        && primary.chars().all(|c| c.is_ascii_alphabetic())
        && s.len() <= LeadingTag::MAX
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

async fn send(tx: &Sink, id: ReplyId, ev: ReplyEvent) {
    let _ = tx.send((id, ev)).await;
}

/// What one model event means for the reply; `Some(text)` is reply text.
async fn model_event(
    id: ReplyId,
    ev: LlmEvent,
    first_token: &mut bool,
    tx: &Sink,
) -> Option<String> {
    let is_token = matches!(ev, LlmEvent::Text(_) | LlmEvent::ToolCall { .. });
    if is_token && !*first_token {
        *first_token = true;
        send(tx, id, ReplyEvent::FirstToken).await;
    }
    match ev {
        LlmEvent::Text(t) => return Some(t),
        LlmEvent::ToolCall { name, .. } if name == "end_call" => {
            send(tx, id, ReplyEvent::EndCall).await;
        }
        LlmEvent::ToolCall { name, .. } => warn!(%name, "model called an unknown tool; ignored"),
        LlmEvent::Usage {
            prompt_tokens,
            completion_tokens,
            cost,
        } => {
            let ev = ReplyEvent::Usage {
                prompt: prompt_tokens,
                completion: completion_tokens,
                cost,
            };
            send(tx, id, ev).await;
        }
        LlmEvent::Done { .. } => {}
    }
    None
}

/// Clauses go to TTS as the model writes them; audio goes back as TTS makes it.
async fn streamed(
    id: ReplyId,
    mut llm: LlmStream,
    mut tts: TtsStream,
    tx: &Sink,
) -> Result<(), Failure> {
    let mut splitter = ClauseSplitter::default();
    let mut tag = LeadingTag::default();
    let mut first_token = false;
    let mut sent_text = false;
    let mut llm_done = false;
    let mut tts_done = false;
    while !(llm_done && tts_done) {
        tokio::select! {
            ev = llm.next(), if !llm_done => match ev {
                Some(Ok(LlmEvent::Done { .. })) | None => {
                    llm_done = true;
                    let held = tag.finish();
                    let mut clauses = held.map(|h| splitter.push(&h)).unwrap_or_default();
                    clauses.extend(splitter.finish());
                    for rest in clauses {
                        sent_text = true;
                        send(tx, id, ReplyEvent::Text(rest.clone())).await;
                        let _ = tts.text.send(TtsInput::Text(rest)).await;
                    }
                    if sent_text {
                        let _ = tts.text.send(TtsInput::Finish).await;
                    } else {
                        tts_done = true;
                    }
                }
                Some(Ok(ev)) => {
                    let text = model_event(id, ev, &mut first_token, tx).await;
                    if let Some(text) = text.and_then(|t| tag.push(&t)) {
                        for clause in splitter.push(&text) {
                            sent_text = true;
                            send(tx, id, ReplyEvent::Text(clause.clone())).await;
                            if tts.text.send(TtsInput::Text(clause)).await.is_err() {
                                return Err((Provider::Tts, "TTS stream closed".into()));
                            }
                        }
                    }
                }
                Some(Err(e)) => return Err((Provider::Llm, e.to_string())),
            },
            out = tts.audio.recv(), if !tts_done => match out {
                Some(TtsOutput::Audio(pcm)) if !pcm.is_empty() => {
                    send(tx, id, ReplyEvent::Audio(pcm)).await;
                }
                Some(TtsOutput::Audio(_)) => {}
                Some(TtsOutput::Alignment { chars, start_ms, .. }) => {
                    send(tx, id, ReplyEvent::Alignment { chars, start_ms }).await;
                }
                Some(TtsOutput::Done) => tts_done = true,
                Some(TtsOutput::Failed(e)) => return Err((Provider::Tts, e)),
                None if llm_done => tts_done = true,
                None => return Err((Provider::Tts, "TTS stream ended early".into())),
            },
        }
    }
    Ok(())
}

/// The baseline a non-streaming design gets, through the same providers and playout: the
/// whole reply text, then the whole audio, then playback.
async fn sequential(
    id: ReplyId,
    mut llm: LlmStream,
    mut tts: TtsStream,
    tx: &Sink,
) -> Result<(), Failure> {
    let mut first_token = false;
    let mut text = String::new();
    while let Some(ev) = llm.next().await {
        match ev {
            Ok(LlmEvent::Done { .. }) => break,
            Ok(ev) => {
                if let Some(t) = model_event(id, ev, &mut first_token, tx).await {
                    text.push_str(&t);
                }
            }
            Err(e) => return Err((Provider::Llm, e.to_string())),
        }
    }
    let mut tag = LeadingTag::default();
    let text: String = [tag.push(&text), tag.finish()]
        .into_iter()
        .flatten()
        .collect();
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Ok(());
    }
    send(tx, id, ReplyEvent::Text(format!("{text} "))).await;
    let closed = || (Provider::Tts, "TTS stream closed".to_owned());
    tts.text
        .send(TtsInput::Text(format!("{text} ")))
        .await
        .map_err(|_| closed())?;
    tts.text
        .send(TtsInput::Finish)
        .await
        .map_err(|_| closed())?;
    let mut audio = Vec::new();
    loop {
        match tts.audio.recv().await {
            Some(TtsOutput::Audio(pcm)) => audio.extend(pcm),
            Some(TtsOutput::Alignment { .. }) => {}
            Some(TtsOutput::Done) | None => break,
            Some(TtsOutput::Failed(e)) => return Err((Provider::Tts, e)),
        }
    }
    if !audio.is_empty() {
        send(tx, id, ReplyEvent::Audio(audio)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What passes `LeadingTag` for `chunks`, streamed one after another.
    fn passed(chunks: &[&str]) -> String {
        let mut tag = LeadingTag::default();
        let mut out: String = chunks.iter().filter_map(|c| tag.push(c)).collect();
        out.extend(tag.finish());
        out
    }

    #[test]
    fn a_copied_language_tag_is_never_spoken() {
        assert_eq!(passed(&["[en-US] The premium plan."]), "The premium plan.");
        assert_eq!(
            passed(&["[", "ms", "-MY", "]", " Harga", " RM99."]),
            "Harga RM99."
        );
        assert_eq!(passed(&[" [zh-Hans-CN]", "你好"]), "你好");
        // Only at the very start, and only a locale.
        assert_eq!(passed(&["Ya. [en-US] ok"]), "Ya. [en-US] ok");
        assert_eq!(passed(&["[nota] Baik."]), "[nota] Baik.");
        assert_eq!(passed(&["[1] Baik."]), "[1] Baik.");
        assert_eq!(
            passed(&["[tidak ditutup lagi panjang sekali"]),
            "[tidak ditutup lagi panjang sekali"
        );
        assert_eq!(passed(&["[en"]), "[en");
        assert_eq!(passed(&["Baik", ", terima kasih."]), "Baik, terima kasih.");
        assert_eq!(passed(&["[en-US]"]), "");
    }
}
