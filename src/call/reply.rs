//! One reply as a task: stream the model's text, cut it into clauses, stream them to TTS,
//! stream the audio back. TTS is connected while the model is still thinking. The task only
//! reports ([`ReplyEvent`]s tagged with its id) and is cancelled as a unit; the call
//! machine decides what any of it means.
//!
//! A reply may take several model rounds: when the model calls tools, what it said before
//! the calls is spoken to its end (its own TTS stream, finished, so the machine knows when
//! that speech is all in: [`ReplyEvent::SpeechDrained`]) while the tools run concurrently;
//! their results go back as `tool` messages and the next round streams on into the same
//! utterance. A `transfer_call` ends the reply with [`ReplyEvent::Transfer`]: the machine
//! does the handover.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::clauses::ClauseSplitter;
use super::machine::{Pipeline, ReplyEvent, ReplyId};
use super::tools::{
    END_CALL_TOOL, TRANSFER_TOOL, ToolBox, ToolCallRecord, ToolOutput, ToolStatus, redact,
};
use crate::ops::metrics::Provider;
use crate::providers::llm::{
    ChatMessage, ChatRequest, LlmEvent, LlmProvider, LlmStream, ToolCallRequest,
};
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
    /// The declared tools (HTTP and MCP), shared by every call.
    pub tools: Arc<ToolBox>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Providers")
    }
}

type Sink = mpsc::Sender<(ReplyId, ReplyEvent)>;

/// Runs one reply to its end (or until `cancel`), reporting on `tx`. Every send waits for
/// room: events are never dropped, and a slow driver slows the reply, not the call.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    id: ReplyId,
    providers: Providers,
    req: ChatRequest,
    tts_params: TtsParams,
    pipeline: Pipeline,
    tool_rounds: u32,
    tx: Sink,
    cancel: CancellationToken,
) {
    let work = async {
        let t0 = Instant::now();
        let llm_fut = async {
            let r = providers.llm.stream(req.clone()).await;
            debug!(
                ms = t0.elapsed().as_secs_f64() * 1000.0,
                "LLM response headers"
            );
            r
        };
        let tts_fut = async {
            let r = providers.tts.open(tts_params.clone()).await;
            debug!(ms = t0.elapsed().as_secs_f64() * 1000.0, "TTS stream open");
            r
        };
        let (llm, tts) = tokio::join!(llm_fut, tts_fut);
        let llm = llm.map_err(|e| (Provider::Llm, e.to_string()))?;
        let tts = tts.map_err(|e| (Provider::Tts, e.to_string()))?;
        match pipeline {
            Pipeline::Streamed => {
                let rounds = Rounds {
                    providers: &providers,
                    req,
                    tts_params,
                    max: tool_rounds,
                };
                streamed(id, llm, tts, rounds, &tx).await
            }
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

/// What one model event means for the reply.
enum Said {
    /// Reply text.
    Text(String),
    /// A tool call other than `end_call`, for the round to run.
    Call(ToolCallRequest),
    /// Nothing to speak.
    Nothing,
}

/// Reports what needs reporting at once (first token, `end_call`, usage) and says what the
/// event means for the reply.
async fn model_event(id: ReplyId, ev: LlmEvent, first_token: &mut bool, tx: &Sink) -> Said {
    let is_token = matches!(ev, LlmEvent::Text(_) | LlmEvent::ToolCall { .. });
    if is_token && !*first_token {
        *first_token = true;
        send(tx, id, ReplyEvent::FirstToken).await;
    }
    match ev {
        LlmEvent::Text(t) => return Said::Text(t),
        LlmEvent::ToolCall { name, .. } if name == END_CALL_TOOL => {
            send(tx, id, ReplyEvent::EndCall).await;
        }
        LlmEvent::ToolCall {
            id: call_id,
            name,
            arguments,
        } => {
            return Said::Call(ToolCallRequest {
                id: call_id,
                name,
                arguments,
            });
        }
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
    Said::Nothing
}

/// What the tool rounds of a reply need.
struct Rounds<'a> {
    providers: &'a Providers,
    /// The request so far (each round appends the calls and their results).
    req: ChatRequest,
    tts_params: TtsParams,
    /// Tool rounds allowed.
    max: u32,
}

/// How one model round ended.
struct RoundEnd {
    /// Everything the model said in it.
    text: String,
    /// The tools it called (not `end_call`).
    calls: Vec<ToolCallRequest>,
    /// Its TTS stream, when nothing was said into it (it can serve the next round).
    unused_tts: Option<TtsStream>,
    /// Its TTS stream, finished, with audio still to come.
    draining: Option<TtsStream>,
}

/// Clauses go to TTS as the model writes them; audio goes back as TTS makes it; tool rounds
/// as the model asks for them.
async fn streamed(
    id: ReplyId,
    llm: LlmStream,
    tts: TtsStream,
    mut rounds: Rounds<'_>,
    tx: &Sink,
) -> Result<(), Failure> {
    let mut first_token = false;
    let mut llm = llm;
    let mut tts = tts;
    let mut round = 0u32;
    loop {
        let end = stream_round(id, llm, tts, &mut first_token, tx).await?;
        if end.calls.is_empty() {
            return drain(id, end.draining, tx).await;
        }
        if let Some((target, summary)) = transfer_request(&rounds.req, &end.calls) {
            drain(id, end.draining, tx).await?;
            send(tx, id, ReplyEvent::Transfer { target, summary }).await;
            return Ok(());
        }
        if round >= rounds.max {
            warn!(
                calls = end.calls.len(),
                "tool calls past the last round; ignored"
            );
            return drain(id, end.draining, tx).await;
        }
        round += 1;
        let names = end.calls.iter().map(|c| c.name.clone()).collect();
        send(tx, id, ReplyEvent::ToolsStarted { names }).await;
        let had_speech = end.draining.is_some();
        let speech = async {
            let r = drain(id, end.draining, tx).await;
            send(tx, id, ReplyEvent::SpeechDrained).await;
            r
        };
        let work = run_calls(rounds.providers, &rounds.req, &end.calls);
        let (spoken, results) = tokio::join!(speech, work);
        spoken?;
        let records = results.iter().map(|(r, _)| r.clone()).collect();
        send(tx, id, ReplyEvent::ToolsFinished(records)).await;
        let req = &mut rounds.req;
        req.messages.push(ChatMessage::assistant_tool_calls(
            end.text.trim(),
            end.calls.clone(),
        ));
        for (call, (_, out)) in end.calls.iter().zip(results) {
            req.messages
                .push(ChatMessage::tool_result(call.id.clone(), out.content));
        }
        req.forbid_tools = round >= rounds.max;
        debug!(round, "tool round done; asking the model again");
        let next_tts = async {
            match end.unused_tts {
                Some(t) if !had_speech => Ok(t),
                _ => rounds.providers.tts.open(rounds.tts_params.clone()).await,
            }
        };
        let (next_llm, next_tts) = tokio::join!(rounds.providers.llm.stream(req.clone()), next_tts);
        llm = next_llm.map_err(|e| (Provider::Llm, e.to_string()))?;
        tts = next_tts.map_err(|e| (Provider::Tts, e.to_string()))?;
    }
}

/// The `transfer_call` among `calls` with a target the request offered: (target, summary).
fn transfer_request(
    req: &ChatRequest,
    calls: &[ToolCallRequest],
) -> Option<(String, Option<String>)> {
    let offered = req.tools.iter().find(|t| t.name == TRANSFER_TOOL)?;
    let names = offered
        .parameters
        .pointer("/properties/target/enum")?
        .as_array()?;
    calls
        .iter()
        .filter(|c| c.name == TRANSFER_TOOL)
        .find_map(|c| {
            let args: Value = serde_json::from_str(&c.arguments).ok()?;
            let target = args.get("target")?.as_str()?;
            names.iter().any(|n| n.as_str() == Some(target)).then(|| {
                let summary = args
                    .get("summary")
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned);
                (target.to_owned(), summary)
            })
        })
}

/// Runs a round's calls concurrently, each to its own deadline; what each gives back and
/// its record.
async fn run_calls(
    providers: &Providers,
    req: &ChatRequest,
    calls: &[ToolCallRequest],
) -> Vec<(ToolCallRecord, ToolOutput)> {
    let runs = calls.iter().map(|c| async move {
        let started = tokio::time::Instant::now();
        let offered = req.tools.iter().any(|t| t.name == c.name) && c.name != TRANSFER_TOOL;
        let out = if c.name == TRANSFER_TOOL {
            ToolOutput::failed(
                ToolStatus::Error,
                "unknown target: use one of the target names listed in the tool",
            )
        } else if offered {
            providers.tools.call(&c.name, &c.arguments).await
        } else {
            ToolOutput::failed(ToolStatus::Refused, format!("no tool called {}", c.name))
        };
        let args: Value = serde_json::from_str(&c.arguments).unwrap_or(Value::Null);
        let record = ToolCallRecord {
            name: c.name.clone(),
            arguments: redact(&args, providers.tools.redact_fields(&c.name)),
            at_ms: 0,
            duration_ms: started.elapsed().as_millis() as u64,
            status: out.status,
            detail: out.detail.clone(),
        };
        if out.status != ToolStatus::Ok {
            warn!(tool = %c.name, status = ?out.status, detail = out.detail.as_deref().unwrap_or(""), "tool call failed; the model is told");
        }
        (record, out)
    });
    futures_util::future::join_all(runs).await
}

/// Waits for a finished TTS stream's remaining audio, forwarding it.
async fn drain(id: ReplyId, tts: Option<TtsStream>, tx: &Sink) -> Result<(), Failure> {
    let Some(mut tts) = tts else {
        return Ok(());
    };
    loop {
        match tts.audio.recv().await {
            Some(TtsOutput::Audio(pcm)) if !pcm.is_empty() => {
                send(tx, id, ReplyEvent::Audio(pcm)).await;
            }
            Some(TtsOutput::Audio(_)) => {}
            Some(TtsOutput::Alignment {
                chars, start_ms, ..
            }) => {
                send(tx, id, ReplyEvent::Alignment { chars, start_ms }).await;
            }
            Some(TtsOutput::Done) | None => return Ok(()),
            Some(TtsOutput::Failed(e)) => return Err((Provider::Tts, e)),
        }
    }
}

/// One model round: its text to TTS as clauses (audio forwarded meanwhile) until the model
/// is done; a stream that got text is finished and handed back to be drained.
async fn stream_round(
    id: ReplyId,
    mut llm: LlmStream,
    mut tts: TtsStream,
    first_token: &mut bool,
    tx: &Sink,
) -> Result<RoundEnd, Failure> {
    let mut splitter = ClauseSplitter::default();
    let mut tag = LeadingTag::default();
    let mut sent_text = false;
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut tts_done = false;
    loop {
        tokio::select! {
            ev = llm.next() => match ev {
                Some(Ok(LlmEvent::Done { .. })) | None => {
                    let held = tag.finish();
                    if let Some(h) = &held {
                        text.push_str(h);
                    }
                    let mut clauses = held.map(|h| splitter.push(&h)).unwrap_or_default();
                    clauses.extend(splitter.finish());
                    for rest in clauses {
                        sent_text = true;
                        send(tx, id, ReplyEvent::Text(rest.clone())).await;
                        let _ = tts.text.send(TtsInput::Text(rest)).await;
                    }
                    break;
                }
                Some(Ok(ev)) => match model_event(id, ev, first_token, tx).await {
                    Said::Text(t) => {
                        let Some(t) = tag.push(&t) else { continue };
                        text.push_str(&t);
                        for clause in splitter.push(&t) {
                            sent_text = true;
                            send(tx, id, ReplyEvent::Text(clause.clone())).await;
                            if tts.text.send(TtsInput::Text(clause)).await.is_err() {
                                return Err((Provider::Tts, "TTS stream closed".into()));
                            }
                        }
                    }
                    Said::Call(c) => calls.push(c),
                    Said::Nothing => {}
                },
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
                None => return Err((Provider::Tts, "TTS stream ended early".into())),
            },
        }
    }
    if !sent_text {
        return Ok(RoundEnd {
            text,
            calls,
            unused_tts: Some(tts),
            draining: None,
        });
    }
    let _ = tts.text.send(TtsInput::Finish).await;
    Ok(RoundEnd {
        text,
        calls,
        unused_tts: None,
        draining: (!tts_done).then_some(tts),
    })
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
            Ok(ev) => match model_event(id, ev, &mut first_token, tx).await {
                Said::Text(t) => text.push_str(&t),
                Said::Call(c) => warn!(name = %c.name, "tool call in a sequential reply; ignored"),
                Said::Nothing => {}
            },
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
