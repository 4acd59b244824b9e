//! The OpenRouter (OpenAI-compatible) chat-completions client, streamed over SSE.
//!
//! Split in two: [`ChunkDecoder`] is a sans-IO state machine that turns SSE `data` payloads
//! into [`LlmEvent`]s (text deltas, tool calls assembled from fragments, usage, errors), and
//! [`OpenRouter`] is the thin async driver around it: one pooled HTTP client reused across
//! turns, the single pre-first-token retry, and the first-token and stall deadlines.
//!
//! Wire format: `docs/providers/openrouter.md`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::sse::SseParser;
use super::{ChatMessage, ChatRequest, LlmError, LlmEvent, LlmProvider, LlmStream};
use crate::ops::config::{LlmSettings, Secret};
use crate::providers::BoxFuture;

/// The name of the tool the model calls to hang up.
pub const END_CALL_TOOL: &str = "end_call";

/// Sent as `HTTP-Referer` (OpenRouter's app attribution).
pub const APP_REFERER: &str = "https://github.com/sifucall/sifucall";
/// Sent as `X-OpenRouter-Title`.
pub const APP_TITLE: &str = "sifucall";

/// Wait before the retry when the server gave no usable `Retry-After`.
const RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// The longest `Retry-After` we honour; a longer one gets [`RETRY_BACKOFF`] instead.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(2);
/// How long we wait for the body's end after `[DONE]` to keep the connection pooled.
const DRAIN_WAIT: Duration = Duration::from_millis(100);
/// The most of an error body we read.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Caps on tool-call accumulation (the SSE parser bounds single events only).
const MAX_TOOL_CALLS: usize = 16;
const MAX_TOOL_ARGUMENT_BYTES: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Sans-IO chunk decoding
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    /// A reasoning model's thinking (OpenRouter), streamed before the content.
    #[serde(default)]
    reasoning: Option<String>,
    /// The same in structured form (`reasoning.text`, `reasoning.summary`,
    /// `reasoning.encrypted` items); only its presence matters here.
    #[serde(default)]
    reasoning_details: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Debug, Default)]
struct PartialToolCall {
    id: String,
    name: String,
    arguments: String,
}

/// Turns the `data` payloads of an OpenRouter stream into [`LlmEvent`]s.
///
/// `Done` is always the last event: it is emitted on `[DONE]` (or by [`ChunkDecoder::finish`]
/// when the stream ends after a `finish_reason`), so the usage chunk that follows the finish
/// chunk is not lost. Tool calls are emitted whole, when `finish_reason` is `tool_calls` or
/// at the end.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    tool_calls: BTreeMap<u64, PartialToolCall>,
    tool_bytes: usize,
    finish_reason: Option<String>,
    output: bool,
    reasoning: bool,
    reasoning_chars: usize,
    done: bool,
}

impl ChunkDecoder {
    /// A decoder for one reply.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one SSE `data` payload. An `Err` ends the reply.
    pub fn decode(&mut self, data: &str) -> Result<Vec<LlmEvent>, LlmError> {
        let data = data.trim();
        if self.done || data.is_empty() {
            return Ok(Vec::new());
        }
        if data == "[DONE]" {
            return self.complete();
        }
        let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
            self.done = true;
            LlmError::Malformed(format!("bad chunk JSON ({e}): {}", truncate(data, 200)))
        })?;
        if let Some(err) = chunk.error.filter(|e| !e.is_null()) {
            self.done = true;
            return Err(mid_stream_error(&err));
        }
        let mut out = Vec::new();
        if let Some(choice) = chunk.choices.and_then(|c| c.into_iter().next()) {
            if let Some(delta) = choice.delta {
                // Thinking is life (it keeps the deadlines at bay) but never speech.
                if let Some(r) = delta.reasoning.filter(|r| !r.is_empty()) {
                    self.reasoning = true;
                    self.reasoning_chars += r.chars().count();
                }
                if delta
                    .reasoning_details
                    .as_ref()
                    .and_then(Value::as_array)
                    .is_some_and(|d| !d.is_empty())
                {
                    self.reasoning = true;
                }
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    self.output = true;
                    out.push(LlmEvent::Text(text));
                }
                for tc in delta.tool_calls.unwrap_or_default() {
                    self.add_tool_delta(tc)?;
                }
            }
            if let Some(reason) = choice.finish_reason {
                if reason == "error" {
                    self.done = true;
                    return Err(LlmError::MidStream {
                        code: "error".into(),
                        message: "the provider ended the reply with finish_reason \"error\"".into(),
                    });
                }
                if reason == "tool_calls" {
                    out.extend(self.take_tool_calls()?);
                }
                self.finish_reason = Some(reason);
            }
        }
        if let Some(usage) = chunk.usage.filter(Value::is_object) {
            let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
            out.push(LlmEvent::Usage {
                prompt_tokens: n("prompt_tokens"),
                completion_tokens: n("completion_tokens"),
                cost: usage.get("cost").and_then(Value::as_f64),
            });
        }
        Ok(out)
    }

    /// The stream ended (cleanly or by a deadline) without `[DONE]`: completes the reply if
    /// the model had finished, else reports a truncated stream.
    pub fn finish(&mut self) -> Result<Vec<LlmEvent>, LlmError> {
        if self.done {
            return Ok(Vec::new());
        }
        if self.finish_reason.is_some() {
            return self.complete();
        }
        self.done = true;
        Err(LlmError::Transport(
            "the stream ended before the reply finished".into(),
        ))
    }

    /// The `finish_reason` seen so far.
    pub fn finish_reason(&self) -> Option<&str> {
        self.finish_reason.as_deref()
    }

    /// Whether the model produced anything yet (text or a tool-call fragment): the "first
    /// token" for the time-to-first-token deadline.
    pub fn has_output(&self) -> bool {
        self.output
    }

    /// Whether anything at all came from the model, reasoning included: the first token of
    /// any kind, which ends the first-token deadline (the stall deadline takes over).
    pub fn has_activity(&self) -> bool {
        self.output || self.reasoning
    }

    /// Characters of reasoning streamed so far (never spoken; for logs).
    pub fn reasoning_chars(&self) -> usize {
        self.reasoning_chars
    }

    fn complete(&mut self) -> Result<Vec<LlmEvent>, LlmError> {
        let mut out = self.take_tool_calls()?;
        out.push(LlmEvent::Done {
            finish_reason: self.finish_reason.clone(),
        });
        self.done = true;
        Ok(out)
    }

    fn add_tool_delta(&mut self, tc: ToolCallDelta) -> Result<(), LlmError> {
        self.output = true;
        let index = tc.index.unwrap_or(0);
        if !self.tool_calls.contains_key(&index) && self.tool_calls.len() >= MAX_TOOL_CALLS {
            self.done = true;
            return Err(LlmError::Malformed(format!(
                "more than {MAX_TOOL_CALLS} tool calls"
            )));
        }
        let slot = self.tool_calls.entry(index).or_default();
        if let Some(id) = tc.id.filter(|i| !i.is_empty())
            && slot.id.is_empty()
        {
            slot.id = id;
        }
        if let Some(f) = tc.function {
            if let Some(name) = f.name.filter(|n| !n.is_empty()) {
                // Some providers repeat the name on every fragment: the first one wins.
                if slot.name.is_empty() {
                    slot.name = name;
                }
            }
            if let Some(args) = f.arguments {
                self.tool_bytes += args.len();
                if self.tool_bytes > MAX_TOOL_ARGUMENT_BYTES {
                    self.done = true;
                    return Err(LlmError::Malformed("tool-call arguments too large".into()));
                }
                slot.arguments.push_str(&args);
            }
        }
        Ok(())
    }

    fn take_tool_calls(&mut self) -> Result<Vec<LlmEvent>, LlmError> {
        let calls = std::mem::take(&mut self.tool_calls);
        let mut out = Vec::with_capacity(calls.len());
        for (index, call) in calls {
            if call.name.is_empty() {
                self.done = true;
                return Err(LlmError::Malformed(format!(
                    "tool call {index} has no function name"
                )));
            }
            out.push(LlmEvent::ToolCall {
                id: if call.id.is_empty() {
                    format!("call_{index}")
                } else {
                    call.id
                },
                name: call.name,
                arguments: if call.arguments.trim().is_empty() {
                    "{}".into()
                } else {
                    call.arguments
                },
            });
        }
        Ok(out)
    }
}

/// A top-level `error` object (its `code` is a number or a string in the wild).
fn mid_stream_error(err: &Value) -> LlmError {
    let (code, message) = match err {
        Value::Object(o) => (
            match o.get("code") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => "unknown".into(),
            },
            o.get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        ),
        Value::String(s) => ("unknown".into(), s.clone()),
        other => ("unknown".into(), other.to_string()),
    };
    LlmError::MidStream { code, message }
}

/// Whether a failure before the first token is worth the one retry.
fn is_retryable(e: &LlmError) -> bool {
    match e {
        LlmError::Transport(_) => true,
        LlmError::MidStream { code, .. } => match code.parse::<u16>() {
            Ok(n) => n == 408 || n == 429 || (500..=599).contains(&n),
            Err(_) => [
                "server_error",
                "rate_limit",
                "overloaded",
                "unavailable",
                "timeout",
            ]
            .iter()
            .any(|k| code.contains(k)),
        },
        _ => false,
    }
}

/// The wait before the retry: `Retry-After` seconds if small, else a short backoff.
fn retry_delay(headers: &HeaderMap) -> Duration {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .filter(|d| *d <= MAX_RETRY_AFTER)
        .unwrap_or(RETRY_BACKOFF)
}

/// The human message of an error body: `error.message` if JSON, else the (trimmed) text.
fn error_message(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        let found = v
            .pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error"))
            .and_then(Value::as_str);
        if let Some(m) = found {
            return m.to_owned();
        }
    }
    if text.is_empty() {
        reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("no message")
            .to_owned()
    } else {
        truncate(text, 300).to_owned()
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// reqwest's `Display` hides the cause ("error sending request"); include the chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct RequestBody<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    models: Option<Vec<&'a str>>,
    messages: &'a [ChatMessage],
    stream: bool,
    max_tokens: u32,
    temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<&'a Value>,
}

struct Inner {
    client: reqwest::Client,
    chat_url: String,
    models_url: String,
    auth: HeaderValue,
    model: String,
    fallback_models: Vec<String>,
    max_tokens: u32,
    temperature: f32,
    first_token: Duration,
    stall: Duration,
    /// The request's `reasoning` object, if any setting is made.
    reasoning: Option<Value>,
}

/// The OpenRouter client. Cheap to share (`Arc` inside); one connection pool for all calls.
#[derive(Clone)]
pub struct OpenRouter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for OpenRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenRouter")
            .field("chat_url", &self.inner.chat_url)
            .field("model", &self.inner.model)
            .finish_non_exhaustive()
    }
}

impl OpenRouter {
    /// Builds the client and its connection pool. Fails if the key is missing or a setting
    /// is unusable.
    pub fn new(settings: &LlmSettings, key: Secret) -> Result<Self, LlmError> {
        let key = key
            .expose()
            .ok_or_else(|| LlmError::Config("OPENROUTER_API_KEY is not set".into()))?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| LlmError::Config("OPENROUTER_API_KEY has invalid characters".into()))?;
        auth.set_sensitive(true);
        let base = settings.base_url.trim_end_matches('/');
        let parsed = reqwest::Url::parse(base)
            .map_err(|e| LlmError::Config(format!("llm.base_url {base:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(LlmError::Config(format!(
                "llm.base_url {base:?} is not http(s)"
            )));
        }
        if settings.model.trim().is_empty() {
            return Err(LlmError::Config("llm.model is empty".into()));
        }
        if settings.first_token_timeout_ms == 0 || settings.stall_timeout_ms == 0 {
            return Err(LlmError::Config("llm timeouts must be positive".into()));
        }
        let first_token = Duration::from_millis(settings.first_token_timeout_ms);
        // Short enough that a black-holed connect still leaves time for the retry.
        let connect = (first_token / 2).clamp(Duration::from_millis(500), Duration::from_secs(3));
        let client = reqwest::Client::builder()
            .connect_timeout(connect)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(8)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true)
            .user_agent(concat!("sifucall/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LlmError::Config(format!("HTTP client: {}", error_chain(&e))))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                chat_url: format!("{base}/chat/completions"),
                models_url: format!("{base}/models"),
                auth,
                model: settings.model.clone(),
                fallback_models: settings.fallback_models.clone(),
                max_tokens: settings.max_tokens,
                temperature: settings.temperature,
                first_token,
                stall: Duration::from_millis(settings.stall_timeout_ms),
                reasoning: reasoning_settings(settings),
            }),
        })
    }

    /// Opens a pooled connection ahead of the first turn (a `HEAD {base_url}/models` in the
    /// background), so the first reply does not pay for DNS, TCP and TLS. No-op outside a
    /// Tokio runtime.
    pub fn warm_up(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let req = self
            .inner
            .client
            .head(&self.inner.models_url)
            .timeout(Duration::from_secs(10));
        rt.spawn(async move {
            match req.send().await {
                Ok(r) => tracing::debug!(status = r.status().as_u16(), "LLM connection warmed up"),
                Err(e) => tracing::debug!(error = %error_chain(&e), "LLM warm-up failed"),
            }
        });
    }
}

impl Inner {
    fn body(&self, req: &ChatRequest) -> Result<Bytes, LlmError> {
        let models = (!self.fallback_models.is_empty()).then(|| {
            std::iter::once(self.model.as_str())
                .chain(self.fallback_models.iter().map(String::as_str))
                .collect()
        });
        let mut tools: Vec<Value> = Vec::new();
        if req.offer_end_call {
            tools.push(serde_json::json!({
                "type": "function",
                "function": {
                    "name": END_CALL_TOOL,
                    "description": "End the phone call after saying goodbye.",
                    "parameters": {"type": "object", "properties": {}},
                },
            }));
        }
        tools.extend(req.tools.iter().map(|t| {
            serde_json::json!({
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                },
            })
        }));
        let tool_choice = match (tools.is_empty(), req.forbid_tools) {
            (true, _) => None,
            (false, true) => Some("none"),
            (false, false) => Some("auto"),
        };
        let body = RequestBody {
            model: &self.model,
            models,
            messages: &req.messages,
            stream: true,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            tool_choice,
            tools: (!tools.is_empty()).then_some(Value::Array(tools)),
            reasoning: self.reasoning.as_ref(),
        };
        serde_json::to_vec(&body)
            .map(Bytes::from)
            .map_err(|e| LlmError::Malformed(format!("cannot encode the request: {e}")))
    }

    /// POSTs the request until the response headers arrive, using up `retries` on 429, 5xx
    /// or connection errors. Everything happens before `deadline`.
    async fn open(
        &self,
        body: &Bytes,
        deadline: Instant,
        retries: &mut u8,
        call_id: &str,
    ) -> Result<reqwest::Response, LlmError> {
        let timed_out = || LlmError::FirstTokenTimeout(self.first_token.as_millis() as u64);
        loop {
            let send = self
                .client
                .post(&self.chat_url)
                .header(AUTHORIZATION, self.auth.clone())
                .header(CONTENT_TYPE, "application/json")
                // As the official SDK sends it, even for a stream.
                .header(ACCEPT, "application/json")
                .header("HTTP-Referer", APP_REFERER)
                .header("X-OpenRouter-Title", APP_TITLE)
                .body(body.clone())
                .send();
            let sent = tokio::time::timeout_at(deadline, send)
                .await
                .map_err(|_| timed_out())?;
            let (delay, why) = match sent {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(mut resp) => {
                    let status = resp.status();
                    let delay = retry_delay(resp.headers());
                    // Reading the body keeps the connection reusable and gives the message.
                    let body = tokio::time::timeout_at(deadline, read_capped(&mut resp))
                        .await
                        .unwrap_or_default();
                    let message = error_message(status.as_u16(), &body);
                    let retryable = status.as_u16() == 429 || status.is_server_error();
                    if !retryable || *retries == 0 {
                        return Err(LlmError::Status {
                            status: status.as_u16(),
                            message,
                        });
                    }
                    (delay, format!("HTTP {}: {message}", status.as_u16()))
                }
                Err(e) if *retries > 0 && !e.is_builder() => (RETRY_BACKOFF, error_chain(&e)),
                Err(e) => return Err(LlmError::Transport(error_chain(&e))),
            };
            *retries -= 1;
            tracing::warn!(call_id, reason = %why, delay_ms = delay.as_millis() as u64, "LLM request failed, retrying once");
            tokio::time::timeout_at(deadline, tokio::time::sleep(delay))
                .await
                .map_err(|_| timed_out())?;
        }
    }
}

/// OpenRouter's `reasoning` object from the settings: `max_tokens` if set, else `effort`
/// (OpenRouter takes one of the two), `exclude` when set; `None` when nothing is set (the
/// provider's default).
fn reasoning_settings(settings: &LlmSettings) -> Option<Value> {
    let effort = settings.reasoning_effort.trim();
    let mut obj = serde_json::Map::new();
    if !effort.is_empty() && settings.reasoning_max_tokens == 0 {
        obj.insert("effort".into(), Value::from(effort));
    }
    if settings.reasoning_max_tokens > 0 {
        obj.insert(
            "max_tokens".into(),
            Value::from(settings.reasoning_max_tokens),
        );
    }
    if settings.reasoning_exclude {
        obj.insert("exclude".into(), Value::Bool(true));
    }
    (!obj.is_empty()).then_some(Value::Object(obj))
}

async fn read_capped(resp: &mut reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = MAX_ERROR_BODY.saturating_sub(out.len());
        out.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
        if out.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    out
}

impl LlmProvider for OpenRouter {
    fn warm_up(&self) {
        OpenRouter::warm_up(self);
    }

    fn stream(&self, req: ChatRequest) -> BoxFuture<'_, Result<LlmStream, LlmError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let deadline = Instant::now() + inner.first_token;
            let body = inner.body(&req)?;
            let mut retries = 1;
            let resp = inner
                .open(&body, deadline, &mut retries, &req.call_id)
                .await?;
            let state = StreamState {
                body: resp.bytes_stream().boxed(),
                inner,
                request: body,
                call_id: req.call_id,
                sse: SseParser::new(),
                decoder: ChunkDecoder::new(),
                queue: VecDeque::new(),
                first_deadline: deadline,
                last_event_at: Instant::now(),
                retries,
                finished: false,
            };
            let stream = futures_util::stream::unfold(state, |mut st| async move {
                st.next().await.map(|item| (item, st))
            });
            Ok(stream.boxed())
        })
    }
}

/// The driver of one reply's stream.
struct StreamState {
    inner: Arc<Inner>,
    request: Bytes,
    call_id: String,
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    sse: SseParser,
    decoder: ChunkDecoder,
    queue: VecDeque<Result<LlmEvent, LlmError>>,
    first_deadline: Instant,
    last_event_at: Instant,
    retries: u8,
    finished: bool,
}

impl StreamState {
    async fn next(&mut self) -> Option<Result<LlmEvent, LlmError>> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                match &item {
                    Ok(LlmEvent::Done { .. }) => {
                        self.finished = true;
                        self.queue.clear();
                        if self.decoder.reasoning_chars() > 0 {
                            tracing::debug!(call_id = %self.call_id, chars = self.decoder.reasoning_chars(), "the model reasoned before answering");
                        }
                        self.release_connection().await;
                    }
                    Err(_) => {
                        self.finished = true;
                        self.queue.clear();
                    }
                    Ok(_) => {}
                }
                return Some(item);
            }
            if self.finished {
                return None;
            }
            if let Some(event) = self.sse.next_event() {
                self.last_event_at = Instant::now();
                match self.decoder.decode(&event.data) {
                    Ok(events) => self.queue.extend(events.into_iter().map(Ok)),
                    Err(e) => self.fail(e).await,
                }
                continue;
            }
            let started = self.decoder.has_activity();
            let deadline = if started {
                self.last_event_at + self.inner.stall
            } else {
                self.first_deadline
            };
            match tokio::time::timeout_at(deadline, self.body.try_next()).await {
                // The reply is complete; only the usage chunk or `[DONE]` is missing.
                Err(_) if self.decoder.finish_reason().is_some() => self.end_of_stream().await,
                Err(_) if !started => {
                    let ms = self.inner.first_token.as_millis() as u64;
                    self.queue.push_back(Err(LlmError::FirstTokenTimeout(ms)));
                }
                Err(_) => {
                    let ms = self.inner.stall.as_millis() as u64;
                    self.queue.push_back(Err(LlmError::Stalled(ms)));
                }
                Ok(Ok(Some(bytes))) => {
                    if let Err(e) = self.sse.push(&bytes) {
                        self.fail(LlmError::Malformed(e.to_string())).await;
                    }
                }
                Ok(Ok(None)) => self.end_of_stream().await,
                Ok(Err(e)) => self.fail(LlmError::Transport(error_chain(&e))).await,
            }
        }
    }

    /// Reads the body's end (normally already buffered right after `[DONE]`) so the
    /// connection goes back to the pool instead of being closed with the dropped body.
    async fn release_connection(&mut self) {
        let drain = async {
            let mut budget = 64 * 1024usize;
            while let Ok(Some(b)) = self.body.try_next().await {
                budget = budget.saturating_sub(b.len());
                if budget == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_WAIT, drain).await;
    }

    async fn end_of_stream(&mut self) {
        match self.decoder.finish() {
            Ok(events) => self.queue.extend(events.into_iter().map(Ok)),
            Err(e) => self.fail(e).await,
        }
    }

    /// Queues the error, unless nothing was produced yet and the one retry is left: then the
    /// request is sent again and the reply starts over.
    async fn fail(&mut self, e: LlmError) {
        if self.decoder.has_activity() || self.retries == 0 || !is_retryable(&e) {
            self.queue.push_back(Err(e));
            return;
        }
        self.retries -= 1;
        tracing::warn!(call_id = %self.call_id, error = %e, "LLM stream failed before the first token, retrying once");
        let timed_out = LlmError::FirstTokenTimeout(self.inner.first_token.as_millis() as u64);
        let slept =
            tokio::time::timeout_at(self.first_deadline, tokio::time::sleep(RETRY_BACKOFF)).await;
        if slept.is_err() {
            self.queue.push_back(Err(timed_out));
            return;
        }
        let mut retries = 0;
        let inner = Arc::clone(&self.inner);
        match inner
            .open(
                &self.request,
                self.first_deadline,
                &mut retries,
                &self.call_id,
            )
            .await
        {
            Ok(resp) => {
                self.body = resp.bytes_stream().boxed();
                self.sse = SseParser::new();
                self.decoder = ChunkDecoder::new();
                self.queue.clear();
            }
            Err(e) => self.queue.push_back(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::openrouter::{self as fake, FakeOpenRouterConfig, LlmFault};
    use serde_json::json;

    // ---- ChunkDecoder, on the exact lines of docs/providers/openrouter.md ----

    const ROLE: &str = r#"{"id":"gen-..","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion.chunk","created":1739458867,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"system_fingerprint":"fp_72ed7ab54c"}"#;
    const HELLO: &str = r#"{"id":"gen-..","choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}"#;
    const STOP: &str = r#"{"id":"gen-..","choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop","native_finish_reason":"stop"}]}"#;
    const USAGE: &str = r#"{"id":"gen-..","choices":[],"usage":{"prompt_tokens":22,"completion_tokens":7,"total_tokens":29,"cost":0.000171}}"#;
    const MID_ERROR: &str = r#"{"id":"gen-abc","object":"chat.completion.chunk","created":1234567890,"model":"openai/gpt-4o","provider":"OpenAI","error":{"code":429,"message":"Rate limit exceeded","metadata":{"error_type":"rate_limit_exceeded"}},"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}"#;

    fn usage(p: u64, c: u64, cost: Option<f64>) -> LlmEvent {
        LlmEvent::Usage {
            prompt_tokens: p,
            completion_tokens: c,
            cost,
        }
    }

    fn done(r: &str) -> LlmEvent {
        LlmEvent::Done {
            finish_reason: Some(r.into()),
        }
    }

    #[test]
    fn doc_stream_decodes_with_done_last() {
        let mut d = ChunkDecoder::new();
        assert_eq!(d.decode(ROLE).unwrap(), vec![]);
        assert!(!d.has_output(), "the empty role chunk is not a first token");
        assert_eq!(
            d.decode(HELLO).unwrap(),
            vec![LlmEvent::Text("Hello".into())]
        );
        assert!(d.has_output());
        assert_eq!(d.decode(STOP).unwrap(), vec![]);
        assert_eq!(d.finish_reason(), Some("stop"));
        assert_eq!(d.decode(USAGE).unwrap(), vec![usage(22, 7, Some(0.000171))]);
        assert_eq!(d.decode("[DONE]").unwrap(), vec![done("stop")]);
        assert_eq!(d.decode(HELLO).unwrap(), vec![], "nothing after the end");
        assert_eq!(d.finish().unwrap(), vec![]);
    }

    #[test]
    fn usage_in_every_form() {
        let forms = [
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"cost":0.01}}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":null}],"usage":{"prompt_tokens":5,"completion_tokens":2,"cost":0.01}}"#,
            r#"{"choices":[{"index":0,"delta":{"content":""},"finish_reason":null}],"usage":{"prompt_tokens":5,"completion_tokens":2,"cost":0.01}}"#,
            r#"{"usage":{"prompt_tokens":5,"completion_tokens":2,"cost":0.01}}"#,
            r#"{"choices":null,"usage":{"prompt_tokens":5,"completion_tokens":2,"cost":0.01,"prompt_tokens_details":{"cached_tokens":0}}}"#,
        ];
        for f in forms {
            assert_eq!(
                ChunkDecoder::new().decode(f).unwrap(),
                vec![usage(5, 2, Some(0.01))],
                "{f}"
            );
        }
        let no_cost = r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
        assert_eq!(
            ChunkDecoder::new().decode(no_cost).unwrap(),
            vec![usage(5, 2, None)]
        );
        let null_usage = r#"{"choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}"#;
        assert_eq!(
            ChunkDecoder::new().decode(null_usage).unwrap(),
            vec![LlmEvent::Text("x".into())]
        );
    }

    #[test]
    fn tool_call_fragments_are_assembled_by_index() {
        let mut d = ChunkDecoder::new();
        let frags = [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_2","type":"function","function":{"name":"end_call","arguments":""}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city"}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\":\"KL\"}"}}]},"finish_reason":null}]}"#,
        ];
        for f in frags {
            assert_eq!(d.decode(f).unwrap(), vec![]);
        }
        assert!(
            d.has_output(),
            "tool-call fragments count as the first token"
        );
        let fin = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#;
        assert_eq!(
            d.decode(fin).unwrap(),
            vec![
                LlmEvent::ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"KL"}"#.into()
                },
                LlmEvent::ToolCall {
                    id: "call_2".into(),
                    name: "end_call".into(),
                    arguments: "{}".into()
                },
            ]
        );
        assert_eq!(d.decode("[DONE]").unwrap(), vec![done("tool_calls")]);
    }

    #[test]
    fn tool_calls_without_tool_calls_finish_are_emitted_at_the_end() {
        let mut d = ChunkDecoder::new();
        let f = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"end_call","arguments":"{}"}}]}}]}"#;
        d.decode(f).unwrap();
        d.decode(STOP).unwrap();
        let tool = LlmEvent::ToolCall {
            id: "c".into(),
            name: "end_call".into(),
            arguments: "{}".into(),
        };
        // Stream ends without [DONE]: the finish_reason makes it a complete reply.
        assert_eq!(d.finish().unwrap(), vec![tool, done("stop")]);
    }

    #[test]
    fn tool_call_without_name_is_malformed() {
        let mut d = ChunkDecoder::new();
        d.decode(
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}"#,
        )
        .unwrap();
        assert!(matches!(d.decode("[DONE]"), Err(LlmError::Malformed(_))));
    }

    #[test]
    fn mid_stream_errors_with_number_and_string_codes() {
        let e = ChunkDecoder::new().decode(MID_ERROR).unwrap_err();
        assert!(
            matches!(&e, LlmError::MidStream { code, message } if code == "429" && message == "Rate limit exceeded"),
            "{e:?}"
        );
        assert!(is_retryable(&e));
        let s = r#"{"id":"x","error":{"code":"server_error","message":"masked"},"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}"#;
        let e = ChunkDecoder::new().decode(s).unwrap_err();
        assert!(
            matches!(&e, LlmError::MidStream { code, message } if code == "server_error" && message == "masked"),
            "{e:?}"
        );
        assert!(is_retryable(&e));
        let bare = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"error"}]}"#;
        assert!(matches!(
            ChunkDecoder::new().decode(bare),
            Err(LlmError::MidStream { .. })
        ));
        let auth = LlmError::MidStream {
            code: "401".into(),
            message: String::new(),
        };
        assert!(!is_retryable(&auth));
    }

    #[test]
    fn unknown_fields_ignored_and_garbage_rejected() {
        let mut d = ChunkDecoder::new();
        let odd = r#"{"brand_new":{"x":[1,2]},"choices":[{"index":0,"delta":{"content":"a","reasoning":"hmm","annotations":[]},"extra":true}]}"#;
        assert_eq!(d.decode(odd).unwrap(), vec![LlmEvent::Text("a".into())]);
        assert_eq!(
            d.decode("").unwrap(),
            vec![],
            "an empty data line is a keep-alive"
        );
        assert!(matches!(
            d.decode(r#"{"choices":[{"delta":{"content":"#),
            Err(LlmError::Malformed(_))
        ));
        assert!(matches!(
            ChunkDecoder::new().decode("[1,2]"),
            Err(LlmError::Malformed(_))
        ));
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let mut d = ChunkDecoder::new();
        d.decode(HELLO).unwrap();
        assert!(matches!(d.finish(), Err(LlmError::Transport(_))));
    }

    #[test]
    fn retry_after_handling() {
        let h = |v: Option<&str>| {
            let mut m = HeaderMap::new();
            if let Some(v) = v {
                m.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            }
            retry_delay(&m)
        };
        assert_eq!(h(Some("1")), Duration::from_secs(1));
        assert_eq!(h(Some("2")), Duration::from_secs(2));
        assert_eq!(h(Some("0.5")), Duration::from_millis(500));
        assert_eq!(h(Some("30")), RETRY_BACKOFF);
        assert_eq!(h(Some("Wed, 21 Oct 2015 07:28:00 GMT")), RETRY_BACKOFF);
        assert_eq!(h(None), RETRY_BACKOFF);
    }

    #[test]
    fn error_messages_from_bodies() {
        assert_eq!(
            error_message(
                401,
                br#"{"error":{"message":"User not found.","code":401}}"#
            ),
            "User not found."
        );
        assert_eq!(
            error_message(502, b"  <html>Bad gateway</html>\n"),
            "<html>Bad gateway</html>"
        );
        assert_eq!(error_message(503, b""), "Service Unavailable");
        assert_eq!(error_message(400, br#"{"message":"flat"}"#), "flat");
    }

    // ---- The client against the fake server ----

    const KEY: &str = "sk-or-v1-test";
    const HANG: Duration = Duration::from_secs(30);

    fn settings(base_url: String) -> LlmSettings {
        LlmSettings {
            provider: "openrouter".into(),
            base_url,
            model: "openai/gpt-4o-mini".into(),
            fallback_models: vec![],
            max_tokens: 200,
            temperature: 0.7,
            first_token_timeout_ms: 10_000,
            stall_timeout_ms: 10_000,
            reasoning_effort: String::new(),
            reasoning_exclude: false,
            reasoning_max_tokens: 0,
        }
    }

    fn fast(fault: LlmFault, replies: &[&str]) -> FakeOpenRouterConfig {
        FakeOpenRouterConfig {
            key: Some(KEY.into()),
            first_token_delay_ms: 0,
            tokens_per_sec: 0.0,
            replies: replies.iter().map(|s| s.to_string()).collect(),
            fault,
            ..FakeOpenRouterConfig::default()
        }
    }

    fn client(s: &LlmSettings) -> OpenRouter {
        OpenRouter::new(s, Secret::new(Some(KEY.into()))).unwrap()
    }

    fn request(user: &str, offer_end_call: bool) -> ChatRequest {
        ChatRequest {
            messages: vec![
                ChatMessage::new("system", "Anda ejen khidmat pelanggan."),
                ChatMessage::new("user", user),
            ],
            offer_end_call,
            call_id: "test-call".into(),
            ..ChatRequest::default()
        }
    }

    async fn run(
        c: &OpenRouter,
        req: ChatRequest,
    ) -> Result<Vec<Result<LlmEvent, LlmError>>, LlmError> {
        let stream = tokio::time::timeout(HANG, c.stream(req))
            .await
            .expect("hang guard")?;
        Ok(tokio::time::timeout(HANG, stream.collect::<Vec<_>>())
            .await
            .expect("hang guard"))
    }

    fn texts(events: &[Result<LlmEvent, LlmError>]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                Ok(LlmEvent::Text(t)) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    const REPLY: &str = "Harga pakej asas ialah RM99 sebulan, termasuk data tanpa had.";

    /// A fake that answers [`REPLY`] with `fault` injected.
    async fn start(fault: LlmFault) -> fake::FakeOpenRouter {
        fake::spawn(fast(fault, &[REPLY])).await.unwrap()
    }

    /// One plain turn ("hai") with a client on `s`.
    async fn hai(s: &LlmSettings) -> Result<Vec<Result<LlmEvent, LlmError>>, LlmError> {
        run(&client(s), request("hai", false)).await
    }

    #[tokio::test]
    async fn streams_text_in_order_then_usage_then_done() {
        let srv = start(LlmFault::None).await;
        let c = client(&settings(srv.base_url()));
        let events = run(&c, request("Berapa harga pakej?", false))
            .await
            .unwrap();
        let n_tokens = REPLY.split(' ').count();
        let text_events: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, Ok(LlmEvent::Text(_))))
            .collect();
        assert_eq!(text_events.len(), n_tokens, "one event per streamed token");
        assert_eq!(texts(&events), REPLY);
        let tail = events.get(n_tokens..).unwrap();
        assert!(
            matches!(tail, [Ok(LlmEvent::Usage { completion_tokens, cost: Some(cost), .. }), Ok(LlmEvent::Done { finish_reason: Some(r) })]
                if *completion_tokens == n_tokens as u64 && *cost > 0.0 && r == "stop"),
            "{tail:?}"
        );

        assert_eq!(srv.request_count(), 1);
        let expected = json!({
            "model": "openai/gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Anda ejen khidmat pelanggan."},
                {"role": "user", "content": "Berapa harga pakej?"},
            ],
            "stream": true,
            "max_tokens": 200,
            "temperature": 0.7,
        });
        assert_eq!(srv.requests(), vec![expected]);
        let headers = srv.request_headers();
        let h = headers.first().unwrap();
        assert_eq!(h.get("authorization").unwrap(), &format!("Bearer {KEY}"));
        assert_eq!(h.get("content-type").unwrap(), "application/json");
        assert_eq!(h.get("http-referer").unwrap(), APP_REFERER);
        assert_eq!(h.get("x-openrouter-title").unwrap(), "sifucall");
    }

    #[tokio::test]
    async fn builtin_malay_responder_answers_the_question() {
        let srv = fake::spawn(fast(LlmFault::None, &[])).await.unwrap();
        let c = client(&settings(srv.base_url()));
        let events = run(&c, request("Berapa harga pakej bulanan?", false))
            .await
            .unwrap();
        let text = texts(&events);
        assert_eq!(text, fake::malay_reply("Berapa harga pakej bulanan?"));
        assert!(text.contains("harga"), "{text}");
        assert!(matches!(events.last(), Some(Ok(LlmEvent::Done { .. }))));
    }

    #[tokio::test]
    async fn goodbye_ends_with_an_end_call_tool_call() {
        let srv = start(LlmFault::None).await;
        let c = client(&settings(srv.base_url()));
        let events = run(&c, request("Okey, itu sahaja. Terima kasih!", true))
            .await
            .unwrap();
        assert!(texts(&events).contains("Selamat tinggal"));
        let tools: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, Ok(LlmEvent::ToolCall { .. })))
            .collect();
        assert!(
            matches!(tools.as_slice(), [Ok(LlmEvent::ToolCall { id, name, arguments })]
                if name == END_CALL_TOOL && arguments == "{}" && !id.is_empty()),
            "{tools:?}"
        );
        assert!(
            matches!(events.last(), Some(Ok(LlmEvent::Done { finish_reason: Some(r) })) if r == "tool_calls")
        );
        let body = srv.requests().pop().unwrap();
        assert_eq!(
            body.get("tools").unwrap(),
            &json!([{"type": "function", "function": {
                "name": "end_call",
                "description": "End the phone call after saying goodbye.",
                "parameters": {"type": "object", "properties": {}},
            }}])
        );
        assert_eq!(body.get("tool_choice").unwrap(), "auto");
    }

    #[tokio::test]
    async fn fallback_models_are_sent() {
        let srv = start(LlmFault::None).await;
        let mut s = settings(srv.base_url());
        s.fallback_models = vec![
            "anthropic/claude-3.5-haiku".into(),
            "google/gemini-flash-1.5".into(),
        ];
        run(&client(&s), request("hai", false)).await.unwrap();
        let body = srv.requests().pop().unwrap();
        assert_eq!(
            body.get("models").unwrap(),
            &json!([
                "openai/gpt-4o-mini",
                "anthropic/claude-3.5-haiku",
                "google/gemini-flash-1.5"
            ])
        );
        assert_eq!(body.get("model").unwrap(), "openai/gpt-4o-mini");
    }

    #[tokio::test]
    async fn retries_once_after_429() {
        let srv = start(LlmFault::StatusOnce(429)).await;
        let events = hai(&settings(srv.base_url())).await.unwrap();
        assert_eq!(texts(&events), REPLY);
        assert_eq!(srv.request_count(), 2);
        let reqs = srv.requests();
        assert_eq!(reqs.first(), reqs.get(1), "the retry sends the same body");
    }

    #[tokio::test]
    async fn persistent_500_fails_after_exactly_two_requests() {
        let srv = start(LlmFault::Status(500)).await;
        let err = hai(&settings(srv.base_url())).await.unwrap_err();
        assert!(
            matches!(&err, LlmError::Status { status: 500, message } if message == "Internal Server Error"),
            "{err:?}"
        );
        assert_eq!(srv.request_count(), 2);
    }

    #[tokio::test]
    async fn unauthorized_is_not_retried() {
        let mut cfg = fast(LlmFault::None, &[REPLY]);
        cfg.key = Some("sk-or-v1-other".into());
        let srv = fake::spawn(cfg).await.unwrap();
        let err = hai(&settings(srv.base_url())).await.unwrap_err();
        assert!(
            matches!(&err, LlmError::Status { status: 401, message } if message == "User not found."),
            "{err:?}"
        );
        assert_eq!(srv.request_count(), 1);
    }

    #[tokio::test]
    async fn fake_rejects_missing_auth_and_bad_bodies() {
        let srv = fake::spawn(fast(LlmFault::None, &[])).await.unwrap();
        let http = reqwest::Client::new();
        let url = format!("{}/chat/completions", srv.base_url());
        let r = http.post(&url).body("{}").send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v.pointer("/error/message").unwrap(),
            "No auth credentials found"
        );
        assert_eq!(v.pointer("/error/code").unwrap(), 401);
        let r = http
            .post(format!("http://{}/v1/chat/completions", srv.addr()))
            .bearer_auth(KEY)
            .body(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v.pointer("/error/code").unwrap(), 400);
        let r = http
            .get(format!("{}/models", srv.base_url()))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let v: Value = r.json().await.unwrap();
        assert!(v.pointer("/data/0/id").is_some());
    }

    #[tokio::test]
    async fn mid_stream_error_after_text() {
        let srv = start(LlmFault::MidStreamError { after_tokens: 2 }).await;
        let events = hai(&settings(srv.base_url())).await.unwrap();
        assert_eq!(texts(&events), "Harga pakej");
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(
            matches!(events.last(), Some(Err(LlmError::MidStream { code, message })) if code == "429" && message == "Rate limit exceeded")
        );
        assert_eq!(srv.request_count(), 1, "no retry once text was produced");
    }

    #[tokio::test]
    async fn mid_stream_error_before_first_token_is_retried_once() {
        let srv = start(LlmFault::MidStreamError { after_tokens: 0 }).await;
        let events = hai(&settings(srv.base_url())).await.unwrap();
        // The second attempt's error carries the string code.
        assert!(
            matches!(events.as_slice(), [Err(LlmError::MidStream { code, .. })] if code == "server_error"),
            "{events:?}"
        );
        assert_eq!(srv.request_count(), 2);
    }

    #[tokio::test]
    async fn no_first_token_times_out() {
        let srv = start(LlmFault::StallBeforeFirstToken).await;
        let mut s = settings(srv.base_url());
        s.first_token_timeout_ms = 300;
        let events = hai(&s).await.unwrap();
        assert!(
            matches!(events.as_slice(), [Err(LlmError::FirstTokenTimeout(300))]),
            "{events:?}"
        );
        assert_eq!(srv.request_count(), 1);
    }

    #[tokio::test]
    async fn server_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let mut s = settings(format!("http://{addr}/api/v1"));
        s.first_token_timeout_ms = 300;
        let err = hai(&s).await.unwrap_err();
        assert!(matches!(err, LlmError::FirstTokenTimeout(300)), "{err:?}");
        hold.abort();
    }

    #[tokio::test]
    async fn refused_connection_is_a_transport_error() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = run(
            &client(&settings(format!("http://{addr}/api/v1"))),
            request("hai", false),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, LlmError::Transport(_)), "{err:?}");
    }

    #[tokio::test]
    async fn stall_mid_stream() {
        let srv = start(LlmFault::StallAfterTokens(2)).await;
        let mut s = settings(srv.base_url());
        s.stall_timeout_ms = 300;
        let events = hai(&s).await.unwrap();
        assert_eq!(texts(&events), "Harga pakej");
        assert!(
            matches!(events.last(), Some(Err(LlmError::Stalled(300)))),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn disconnect_mid_stream() {
        let srv = start(LlmFault::Disconnect { after_tokens: 3 }).await;
        let events = hai(&settings(srv.base_url())).await.unwrap();
        assert_eq!(texts(&events), "Harga pakej asas", "{events:?}");
        assert!(
            matches!(events.last(), Some(Err(LlmError::Transport(_)))),
            "{events:?}"
        );
        assert_eq!(srv.request_count(), 1);
    }

    #[tokio::test]
    async fn disconnect_before_first_token_is_retried_once() {
        let srv = start(LlmFault::Disconnect { after_tokens: 0 }).await;
        let events = hai(&settings(srv.base_url())).await.unwrap();
        assert!(
            matches!(events.as_slice(), [Err(LlmError::Transport(_))]),
            "{events:?}"
        );
        assert_eq!(srv.request_count(), 2);
    }

    #[tokio::test]
    async fn garbage_mid_stream_is_malformed() {
        let srv = start(LlmFault::Malformed { after_tokens: 1 }).await;
        let events = hai(&settings(srv.base_url())).await.unwrap();
        assert_eq!(texts(&events), "Harga");
        assert!(
            matches!(events.last(), Some(Err(LlmError::Malformed(_)))),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn warm_up_and_turns_share_one_connection() {
        let srv = fake::spawn(fast(LlmFault::None, &["Satu.", "Dua."]))
            .await
            .unwrap();
        let c = client(&settings(srv.base_url()));
        c.warm_up();
        tokio::time::timeout(HANG, async {
            while srv.models_requests() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("warm-up request arrives");
        let first = run(&c, request("hai", false)).await.unwrap();
        let second = run(&c, request("lagi", false)).await.unwrap();
        assert_eq!(
            (texts(&first).as_str(), texts(&second).as_str()),
            ("Satu.", "Dua.")
        );
        assert_eq!(
            srv.connections(),
            1,
            "warm-up and both turns reuse the pooled connection"
        );
    }

    /// A one-shot HTTP server that reads the request, answers 200 with `body` (delimited by
    /// the connection's end) and then closes or, if `hang`, keeps the connection open.
    async fn raw_server(body: String, hang: bool) -> (String, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            loop {
                let n = sock.read(&mut tmp).await.unwrap();
                assert!(n > 0, "client closed early");
                buf.extend_from_slice(&tmp[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
            sock.write_all(head.as_bytes()).await.unwrap();
            sock.write_all(body.as_bytes()).await.unwrap();
            sock.flush().await.unwrap();
            if hang {
                tokio::time::sleep(HANG).await;
            }
        });
        (base, task)
    }

    #[tokio::test]
    async fn finished_reply_without_done_still_completes() {
        let body =
            format!(": OPENROUTER PROCESSING\n\ndata: {ROLE}\n\ndata: {HELLO}\n\ndata: {STOP}\n\n");
        for hang in [false, true] {
            let (base, task) = raw_server(body.clone(), hang).await;
            let mut s = settings(base);
            s.stall_timeout_ms = 300;
            let events = hai(&s).await.unwrap();
            assert!(
                matches!(events.as_slice(), [Ok(LlmEvent::Text(t)), Ok(LlmEvent::Done { finish_reason: Some(r) })] if t == "Hello" && r == "stop"),
                "hang={hang}: {events:?}"
            );
            task.abort();
        }
    }

    #[tokio::test]
    async fn truncated_reply_is_an_error() {
        let (base, task) = raw_server(format!("data: {HELLO}\n\n"), false).await;
        let events = hai(&settings(base)).await.unwrap();
        assert!(
            matches!(
                events.as_slice(),
                [Ok(LlmEvent::Text(_)), Err(LlmError::Transport(_))]
            ),
            "{events:?}"
        );
        task.abort();
    }

    #[test]
    fn config_errors() {
        let s = settings("http://127.0.0.1:1/api/v1".into());
        assert!(matches!(
            OpenRouter::new(&s, Secret::default()),
            Err(LlmError::Config(_))
        ));
        let bad = settings("ftp://x".into());
        assert!(matches!(
            OpenRouter::new(&bad, Secret::new(Some(KEY.into()))),
            Err(LlmError::Config(_))
        ));
        let dbg = format!("{:?}", client(&s));
        assert!(!dbg.contains(KEY));
    }

    // ---- Tool calling ----

    #[tokio::test]
    async fn parallel_tool_calls_are_assembled_and_results_go_back_as_tool_messages() {
        use crate::providers::llm::{ToolCallRequest, ToolDef};
        use crate::sandbox::openrouter::{FakeToolCall, FakeToolScript};
        let cfg = FakeOpenRouterConfig {
            tool_scripts: vec![FakeToolScript {
                when_user_says: "pesanan".into(),
                say_first: "Sekejap.".into(),
                rounds: vec![vec![
                    FakeToolCall::new("order_status", json!({"order_id": "A1"})),
                    FakeToolCall::new("weather", json!({"city": "Kuala Lumpur"})),
                ]],
            }],
            ..fast(LlmFault::None, &["Sudah dihantar."])
        };
        let srv = fake::spawn(cfg).await.unwrap();
        let c = client(&settings(srv.base_url()));
        let def = |name: &str| ToolDef {
            name: name.into(),
            description: "d".into(),
            parameters: json!({"type": "object", "properties": {}}),
        };
        let mut req = request("Di mana pesanan saya?", true);
        req.tools = vec![def("order_status"), def("weather")];
        let events = run(&c, req.clone()).await.unwrap();
        assert_eq!(texts(&events), "Sekejap.");
        let calls: Vec<ToolCallRequest> = events
            .iter()
            .filter_map(|e| match e {
                Ok(LlmEvent::ToolCall {
                    id,
                    name,
                    arguments,
                }) => Some(ToolCallRequest {
                    id: id.clone(),
                    name: name.clone(),
                    arguments: arguments.clone(),
                }),
                _ => None,
            })
            .collect();
        assert_eq!(calls.len(), 2, "{events:?}");
        assert_eq!(calls[0].name, "order_status");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[1].arguments).unwrap(),
            json!({"city": "Kuala Lumpur"}),
            "fragments interleaved across calls are joined by index"
        );
        assert_ne!(calls[0].id, calls[1].id);
        assert!(matches!(
            events.last(),
            Some(Ok(LlmEvent::Done { finish_reason: Some(r) })) if r == "tool_calls"
        ));
        let sent = &srv.requests()[0];
        assert_eq!(sent["tool_choice"], "auto");
        let names: Vec<&str> = sent["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
            .collect();
        assert_eq!(names, ["end_call", "order_status", "weather"]);

        req.messages
            .push(ChatMessage::assistant_tool_calls("Sekejap.", calls.clone()));
        req.messages.push(ChatMessage::tool_result(
            calls[0].id.clone(),
            r#"{"status":"dihantar"}"#,
        ));
        req.messages
            .push(ChatMessage::tool_result(calls[1].id.clone(), "cerah"));
        req.forbid_tools = true;
        let events = run(&c, req).await.unwrap();
        assert_eq!(texts(&events), "Sudah dihantar.", "{events:?}");
        let sent = &srv.requests()[1];
        assert_eq!(sent["tool_choice"], "none");
        let m = sent["messages"].as_array().unwrap();
        assert_eq!(m[2]["role"], "assistant");
        assert_eq!(m[2]["tool_calls"][1]["function"]["name"], "weather");
        assert_eq!(m[3]["tool_call_id"], calls[0].id.as_str());
        assert_eq!(m[4]["content"], "cerah");
    }

    #[tokio::test]
    async fn an_assistant_message_with_only_calls_has_null_content_and_a_stray_result_is_refused() {
        use crate::providers::llm::ToolCallRequest;
        let m = ChatMessage::assistant_tool_calls(
            "",
            vec![ToolCallRequest {
                id: "call_1".into(),
                name: "x".into(),
                arguments: "{}".into(),
            }],
        );
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["content"], Value::Null);
        assert_eq!(v["tool_calls"][0]["type"], "function");
        let srv = fake::spawn(fast(LlmFault::None, &["x"])).await.unwrap();
        let mut req = request("hai", false);
        req.messages
            .push(ChatMessage::tool_result("call_never_made", "{}"));
        let err = run(&client(&settings(srv.base_url())), req)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, LlmError::Status { status: 400, message } if message.contains("answers no earlier tool call")),
            "{err:?}"
        );
    }

    // ---- Reasoning models ----

    const THINK: &str = r#"{"id":"gen-..","choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":"The caller","reasoning_details":[{"type":"reasoning.text","text":"The caller","format":"unknown","index":0}]},"finish_reason":null}]}"#;
    const THINK_DETAILS_ONLY: &str = r#"{"id":"gen-..","choices":[{"index":0,"delta":{"content":null,"reasoning":null,"reasoning_details":[{"type":"reasoning.encrypted","data":"gAAAA..","index":0}]},"finish_reason":null}]}"#;

    #[test]
    fn reasoning_is_activity_but_never_text() {
        let mut d = ChunkDecoder::new();
        assert_eq!(d.decode(ROLE).unwrap(), vec![]);
        assert!(!d.has_activity());
        assert_eq!(d.decode(THINK).unwrap(), vec![], "reasoning is not spoken");
        assert!(d.has_activity(), "reasoning ends the first-token wait");
        assert!(!d.has_output(), "but it is not the reply's first token");
        assert_eq!(d.reasoning_chars(), "The caller".len());
        let mut d = ChunkDecoder::new();
        assert_eq!(d.decode(THINK_DETAILS_ONLY).unwrap(), vec![]);
        assert!(d.has_activity(), "encrypted reasoning details count too");
        assert_eq!(
            d.decode(HELLO).unwrap(),
            vec![LlmEvent::Text("Hello".into())]
        );
        assert!(d.has_output());
    }

    fn thinking_fake(reasoning_words: usize) -> FakeOpenRouterConfig {
        FakeOpenRouterConfig {
            reasoning_models: vec!["openai/gpt-4o-mini".into()],
            reasoning_text: vec!["hmm"; reasoning_words].join(" "),
            // Thinking takes reasoning_words / 4 s, well past the first-token deadline below
            // (and each gap well inside the stall deadline).
            tokens_per_sec: 4.0,
            ..fast(LlmFault::None, &["Harga pakej RM99."])
        }
    }

    #[tokio::test]
    async fn a_reasoning_model_thinking_past_the_first_token_deadline_still_answers() {
        let srv = fake::spawn(thinking_fake(10)).await.unwrap();
        let mut s = settings(srv.base_url());
        s.first_token_timeout_ms = 1_000;
        s.reasoning_effort = "low".into();
        let events = run(&client(&s), request("hai", false)).await.unwrap();
        assert_eq!(texts(&events), "Harga pakej RM99.", "{events:?}");
        assert!(
            !events.iter().any(Result::is_err),
            "no deadline fired: {events:?}"
        );
        assert!(
            matches!(
                events.iter().rev().nth(1),
                Some(Ok(LlmEvent::Usage {
                    completion_tokens: 13,
                    ..
                }))
            ),
            "usage counts the reasoning tokens: {events:?}"
        );
        assert_eq!(srv.request_count(), 1, "no retry");
        assert_eq!(
            srv.requests()[0].get("reasoning").unwrap(),
            &json!({"effort": "low"})
        );
    }

    #[tokio::test]
    async fn hidden_reasoning_leaves_only_keepalives_and_hits_the_deadline() {
        // Why `llm.reasoning_exclude` defaults to false: the model thinks just as long, but
        // nothing tells the client it is alive.
        let srv = fake::spawn(thinking_fake(10)).await.unwrap();
        let mut s = settings(srv.base_url());
        s.first_token_timeout_ms = 1_000;
        s.reasoning_exclude = true;
        let events = hai(&s).await.unwrap();
        assert!(
            matches!(events.as_slice(), [Err(LlmError::FirstTokenTimeout(1_000))]),
            "{events:?}"
        );
        assert_eq!(
            srv.requests()[0].get("reasoning").unwrap(),
            &json!({"exclude": true})
        );
    }

    #[test]
    fn reasoning_settings_become_the_request_object() {
        let mut s = settings("http://127.0.0.1:1/api/v1".into());
        assert_eq!(reasoning_settings(&s), None, "nothing set: omitted");
        s.reasoning_effort = "minimal".into();
        assert_eq!(reasoning_settings(&s), Some(json!({"effort": "minimal"})));
        s.reasoning_max_tokens = 64;
        s.reasoning_exclude = true;
        assert_eq!(
            reasoning_settings(&s),
            Some(json!({"max_tokens": 64, "exclude": true})),
            "a token budget replaces the effort"
        );
    }
}
