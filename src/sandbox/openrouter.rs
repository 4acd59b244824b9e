//! A fake OpenRouter (OpenAI-compatible) chat-completions server.
//!
//! It streams replies in OpenRouter's exact SSE format (`: OPENROUTER PROCESSING`
//! keep-alives, a role chunk, one content delta per token, a finish chunk, a usage chunk with
//! empty `choices`, `[DONE]`), streams `end_call` tool calls as deltas, validates requests,
//! records them for tests, and injects faults: HTTP errors, stalls, mid-stream errors,
//! garbage and dropped connections. Without scripted replies it answers in Malay. Models
//! named in [`FakeOpenRouterConfig::reasoning_models`] think first: `reasoning` deltas (with
//! `reasoning_details`) before any content, as OpenRouter streams reasoning models, honouring
//! the request's `reasoning` object (`exclude` hides the thinking but not its time,
//! `effort: "none"` skips it).
//!
//! Tool calling is scripted ([`FakeToolScript`]): when the caller's last words match, the
//! model "calls" the given tools, several in one round (their deltas interleaved by index,
//! arguments in fragments, `finish_reason: "tool_calls"`), round after round as the `tool`
//! results come back, and then answers. Requests that carry tool calls and results are
//! checked as OpenAI's API checks them (every `tool` message answers a call made before).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Interval of `: OPENROUTER PROCESSING` keep-alives while the fake "thinks".
const KEEPALIVE: Duration = Duration::from_millis(250);
/// A stalled stream gives up after this long, so no task outlives a test for good.
const MAX_STALL: Duration = Duration::from_secs(120);
const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LlmFault {
    /// Behave.
    #[default]
    None,
    /// Answer every request with this HTTP status and an error body.
    Status(u16),
    /// Answer only the first request with this status (exercises the client's retry).
    StatusOnce(u16),
    /// HTTP 200, then only keep-alive comments: no token ever.
    StallBeforeFirstToken,
    /// Stream this many tokens, then only keep-alive comments.
    StallAfterTokens(usize),
    /// Stream this many tokens, then an event with a top-level `error` and
    /// `finish_reason: "error"`, then end the stream. The code is the number 429 on even
    /// request numbers and the string `"server_error"` on odd ones (both occur in the wild).
    MidStreamError {
        /// Tokens before the error.
        after_tokens: usize,
    },
    /// Stream this many tokens, then a `data:` event that is not valid JSON.
    Malformed {
        /// Tokens before the garbage.
        after_tokens: usize,
    },
    /// Stream this many tokens, then drop the connection mid-body.
    Disconnect {
        /// Tokens before the drop.
        after_tokens: usize,
    },
}

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct FakeOpenRouterConfig {
    /// `None` accepts any bearer token; `Some` requires exactly this one.
    pub key: Option<String>,
    /// Time to the first token (keep-alive comments are sent meanwhile).
    pub first_token_delay_ms: u64,
    /// Token rate after the first; `0` or less means as fast as possible.
    pub tokens_per_sec: f64,
    /// Scripted replies, used in turn (cycled); empty means the built-in Malay responder.
    pub replies: Vec<String>,
    /// If the last user message contains one of these (case-insensitive), the reply is a
    /// goodbye followed by an `end_call` tool call (when the request offers that tool).
    pub hang_up_words: Vec<String>,
    /// The fault to inject.
    pub fault: LlmFault,
    /// Inject `fault` only into requests whose last user message contains this
    /// (case-insensitive), so one call of several can fail; `None` faults every request.
    pub fault_only_for: Option<String>,
    /// Models that reason before answering (`"*"` matches every model).
    pub reasoning_models: Vec<String>,
    /// What such a model thinks, streamed token by token (at `tokens_per_sec`, after
    /// `first_token_delay_ms`) before the content.
    pub reasoning_text: String,
    /// Scripted tool calls (the first that matches the last user message applies).
    pub tool_scripts: Vec<FakeToolScript>,
}

/// The model calls tools when the caller says something.
#[derive(Debug, Clone, Default)]
pub struct FakeToolScript {
    /// Applies when the last user message contains this (case-insensitive).
    pub when_user_says: String,
    /// Said before the first round's calls (may be empty).
    pub say_first: String,
    /// The calls of each round, in order; once the conversation since the user message
    /// holds all the rounds, the model answers (the scripted replies, or the built-in one).
    pub rounds: Vec<Vec<FakeToolCall>>,
}

/// One scripted tool call.
#[derive(Debug, Clone)]
pub struct FakeToolCall {
    /// The function's name (called only if the request offers it).
    pub name: String,
    /// Its arguments.
    pub arguments: Value,
}

impl FakeToolCall {
    /// A call of `name` with `arguments`.
    pub fn new(name: &str, arguments: Value) -> Self {
        Self {
            name: name.into(),
            arguments,
        }
    }
}

impl Default for FakeOpenRouterConfig {
    /// Realistic pacing for the sandbox and the demo.
    fn default() -> Self {
        Self {
            key: None,
            first_token_delay_ms: 350,
            tokens_per_sec: 60.0,
            replies: Vec::new(),
            hang_up_words: ["selamat tinggal", "bye", "itu sahaja"]
                .map(String::from)
                .to_vec(),
            fault: LlmFault::None,
            fault_only_for: None,
            reasoning_models: Vec::new(),
            reasoning_text: "The caller asked a question. I should answer briefly and politely, \
                             in Malay, in one or two short sentences."
                .into(),
            tool_scripts: Vec::new(),
        }
    }
}

impl FakeOpenRouterConfig {
    /// The fault for a request whose last user message is `user`.
    fn fault_for(&self, user: &str) -> LlmFault {
        match &self.fault_only_for {
            Some(t) if !user.to_lowercase().contains(&t.to_lowercase()) => LlmFault::None,
            _ => self.fault,
        }
    }
}

#[derive(Default)]
struct Stats {
    chat_requests: usize,
    replies_served: usize,
    bodies: Vec<Value>,
    headers: Vec<HeaderMap>,
    models_requests: usize,
    times: Vec<LlmRequestTimes>,
}

/// Wall-clock marks of one streamed chat reply, for attributing latency in benchmarks.
#[derive(Debug, Clone)]
pub struct LlmRequestTimes {
    /// When the handler had the whole request body.
    pub arrived: std::time::Instant,
    /// The request's last user message.
    pub user: String,
    /// The reply's content tokens, in order.
    pub tokens: Vec<String>,
    /// When each content token was handed to the response body, in order.
    pub token_sent: Vec<std::time::Instant>,
    /// When the last fragment of the reply's scripted tool calls was handed to the body.
    pub calls_sent: Option<std::time::Instant>,
}

struct Shared {
    cfg: FakeOpenRouterConfig,
    stats: Mutex<Stats>,
    connections: AtomicUsize,
}

impl Shared {
    fn stats(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake server; stops when dropped.
#[derive(Debug)]
pub struct FakeOpenRouter {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl FakeOpenRouter {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API base to configure as `llm.base_url`, e.g. `http://127.0.0.1:PORT/api/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/api/v1", self.addr)
    }

    /// The JSON bodies of the chat requests received (those that parsed), in order.
    pub fn requests(&self) -> Vec<Value> {
        self.shared.stats().bodies.clone()
    }

    /// The headers of every chat request received, in order.
    pub fn request_headers(&self) -> Vec<HeaderMap> {
        self.shared.stats().headers.clone()
    }

    /// How many chat requests arrived (including rejected ones).
    pub fn request_count(&self) -> usize {
        self.shared.stats().chat_requests
    }

    /// Arrival and token send times of every streamed reply, in order.
    pub fn request_times(&self) -> Vec<LlmRequestTimes> {
        self.shared.stats().times.clone()
    }

    /// How many `/models` requests arrived.
    pub fn models_requests(&self) -> usize {
        self.shared.stats().models_requests
    }

    /// How many TCP connections were accepted.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FakeOpenRouter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the fake on `127.0.0.1` with an ephemeral port.
pub async fn spawn(cfg: FakeOpenRouterConfig) -> io::Result<FakeOpenRouter> {
    let (app, shared) = build(cfg);
    let counter = Arc::clone(&shared);
    let (addr, task) = super::spawn_on_loopback("fake OpenRouter", app, move || {
        counter.connections.fetch_add(1, Ordering::Relaxed);
    })
    .await?;
    Ok(FakeOpenRouter { addr, shared, task })
}

/// The fake's routes, for embedding in another server.
pub fn router(cfg: FakeOpenRouterConfig) -> Router {
    build(cfg).0
}

fn build(cfg: FakeOpenRouterConfig) -> (Router, Arc<Shared>) {
    let shared = Arc::new(Shared {
        cfg,
        stats: Mutex::new(Stats::default()),
        connections: AtomicUsize::new(0),
    });
    let app = Router::new()
        .route("/api/v1/chat/completions", post(chat))
        .route("/v1/chat/completions", post(chat))
        .route("/api/v1/models", get(models))
        .route("/v1/models", get(models))
        .with_state(Arc::clone(&shared));
    (app, shared)
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    shared.stats().models_requests += 1;
    axum::Json(json!({"data": [{
        "id": "openai/gpt-4o-mini",
        "name": "OpenAI: GPT-4o-mini",
        "context_length": 128000,
        "pricing": {"prompt": "0.00000015", "completion": "0.0000006"},
    }]}))
    .into_response()
}

fn error_response(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let error_type = match status {
        400 => "bad_request",
        401 => "authentication",
        402 => "payment_required",
        408 => "timeout",
        429 => "rate_limit_exceeded",
        502 => "provider_unavailable",
        503 => "provider_overloaded",
        _ => "server",
    };
    let body = json!({"error": {"code": status, "message": message, "metadata": {"error_type": error_type}}});
    let mut resp = (code, axum::Json(body)).into_response();
    if status == 429 || status == 503 {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn status_message(status: u16) -> &'static str {
    match status {
        400 => "Bad request",
        401 => "No auth credentials found",
        402 => "Insufficient credits",
        403 => "Blocked by moderation",
        408 => "Request timed out",
        429 => "Rate limit exceeded",
        502 => "Provider returned error",
        503 => "No allowed providers are available for the selected model",
        _ => "Internal Server Error",
    }
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = std::time::Instant::now();
    let parsed = serde_json::from_slice::<Value>(&body);
    let attempt = {
        let mut st = shared.stats();
        st.chat_requests += 1;
        st.headers.push(headers.clone());
        if let Ok(v) = &parsed {
            st.bodies.push(v.clone());
        }
        st.chat_requests - 1
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return error_response(401, "No auth credentials found");
    };
    if shared.cfg.key.as_deref().is_some_and(|k| k != token) {
        return error_response(401, "User not found.");
    }
    let req = match parsed {
        Ok(v) => v,
        Err(e) => return error_response(400, &format!("Invalid JSON body: {e}")),
    };
    if let Err(why) = validate(&req) {
        return error_response(400, &why);
    }
    let mut cfg = shared.cfg.clone();
    cfg.fault = cfg.fault_for(&last_user_text(&req));
    match cfg.fault {
        LlmFault::Status(s) => return error_response(s, status_message(s)),
        LlmFault::StatusOnce(s) if attempt == 0 => return error_response(s, status_message(s)),
        _ => {}
    }
    let served = {
        let mut st = shared.stats();
        st.replies_served += 1;
        st.replies_served - 1
    };
    let mut script = Script::new(&cfg, &req, served);
    script.times = {
        let mut st = shared.stats();
        st.times.push(LlmRequestTimes {
            arrived,
            user: last_user_text(&req),
            tokens: script.tokens.clone(),
            token_sent: Vec::new(),
            calls_sent: None,
        });
        Some((Arc::clone(&shared), st.times.len() - 1))
    };
    let id = format!("gen-{}-{attempt}", unix_secs());
    let (tx, mut rx) = mpsc::channel::<Frame>(16);
    tokio::spawn(script.run(Emitter { tx, id: id.clone() }, cfg, attempt));
    let mut aborting = false;
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        if aborting {
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "fault: disconnect",
            ))));
        }
        match rx.poll_recv(cx) {
            Poll::Ready(Some(Frame::Data(b))) => Poll::Ready(Some(Ok(b))),
            Poll::Ready(Some(Frame::Abort)) => {
                // Pending once first: hyper flushes what it buffered, so the tokens before
                // the drop really reach the client.
                aborting = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-generation-id", v);
    }
    resp
}

fn validate(req: &Value) -> Result<(), String> {
    let obj = req
        .as_object()
        .ok_or("The request body must be a JSON object")?;
    match obj.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => {}
        _ => return Err("`model` is required".into()),
    }
    if let Some(models) = obj.get("models") {
        let ok = models
            .as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string));
        if !ok {
            return Err("`models` must be a non-empty array of model ids".into());
        }
    }
    if obj.get("stream") != Some(&Value::Bool(true)) {
        return Err("This server only supports `stream: true`".into());
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or("`messages` must be a non-empty array")?;
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        if !ROLES.contains(&role) {
            return Err(format!(
                "messages[{i}].role {role:?} is not one of {ROLES:?}"
            ));
        }
        match m.get("content") {
            Some(Value::String(_) | Value::Array(_)) => {}
            Some(Value::Null) | None if role == "assistant" => {}
            _ => {
                return Err(format!(
                    "messages[{i}].content must be a string or an array"
                ));
            }
        }
    }
    validate_tool_messages(messages)?;
    if obj
        .get("max_tokens")
        .is_some_and(|v| v.as_u64().is_none_or(|n| n == 0))
    {
        return Err("`max_tokens` must be a positive integer".into());
    }
    let temperature = obj.get("temperature");
    if temperature.is_some_and(|v| v.as_f64().is_none_or(|t| !(0.0..=2.0).contains(&t))) {
        return Err("`temperature` must be a number between 0 and 2".into());
    }
    if let Some(r) = obj.get("reasoning") {
        let r = r.as_object().ok_or("`reasoning` must be an object")?;
        const EFFORTS: [&str; 6] = ["none", "minimal", "low", "medium", "high", "xhigh"];
        if let Some(e) = r.get("effort")
            && e.as_str().is_none_or(|e| !EFFORTS.contains(&e))
        {
            return Err(format!("`reasoning.effort` must be one of {EFFORTS:?}"));
        }
        if r.get("max_tokens")
            .is_some_and(|v| v.as_u64().is_none_or(|n| n == 0))
        {
            return Err("`reasoning.max_tokens` must be a positive integer".into());
        }
        if r.contains_key("effort") && r.contains_key("max_tokens") {
            return Err(
                "Only one of `reasoning.effort` and `reasoning.max_tokens` may be set".into(),
            );
        }
        for flag in ["exclude", "enabled"] {
            if r.get(flag).is_some_and(|v| !v.is_boolean()) {
                return Err(format!("`reasoning.{flag}` must be a boolean"));
            }
        }
    }
    if let Some(tools) = obj.get("tools") {
        let ok = tools.as_array().is_some_and(|a| {
            a.iter().all(|t| {
                t.get("type").and_then(Value::as_str) == Some("function")
                    && t.pointer("/function/name")
                        .and_then(Value::as_str)
                        .is_some()
            })
        });
        if !ok {
            return Err("`tools` must be an array of function tools".into());
        }
    }
    Ok(())
}

/// Every assistant tool call is well formed, and every `tool` message answers a call made
/// earlier in the conversation.
fn validate_tool_messages(messages: &[Value]) -> Result<(), String> {
    let mut called: Vec<&str> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        if let Some(calls) = m.get("tool_calls") {
            if role != "assistant" {
                return Err(format!(
                    "messages[{i}]: only assistant messages carry tool_calls"
                ));
            }
            let calls = calls
                .as_array()
                .ok_or(format!("messages[{i}].tool_calls must be an array"))?;
            for (j, c) in calls.iter().enumerate() {
                let id = c.get("id").and_then(Value::as_str).unwrap_or_default();
                let ok = !id.is_empty()
                    && c.get("type").and_then(Value::as_str) == Some("function")
                    && c.pointer("/function/name")
                        .and_then(Value::as_str)
                        .is_some()
                    && c.pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .is_some();
                if !ok {
                    return Err(format!(
                        "messages[{i}].tool_calls[{j}] needs an id, type \"function\", a function name and arguments as a string"
                    ));
                }
                called.push(id);
            }
        }
        if role == "tool" {
            let id = m
                .get("tool_call_id")
                .and_then(Value::as_str)
                .ok_or(format!("messages[{i}]: a tool message needs tool_call_id"))?;
            if !called.contains(&id) {
                return Err(format!(
                    "messages[{i}]: tool_call_id {id:?} answers no earlier tool call"
                ));
            }
        }
    }
    Ok(())
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The text of the last user message (`content` as a string or as text parts).
fn last_user_text(req: &Value) -> String {
    let messages = req.get("messages").and_then(Value::as_array);
    let last = messages.and_then(|m| {
        m.iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    });
    match last.and_then(|m| m.get("content")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The scripted round for this request, if a script matches the last user message and has a
/// round left: (what to say first, the calls offered by the request).
fn scripted_calls(
    cfg: &FakeOpenRouterConfig,
    req: &Value,
    user_lower: &str,
) -> Option<(String, Vec<FakeToolCall>)> {
    if req.get("tool_choice").and_then(Value::as_str) == Some("none") {
        return None;
    }
    let script = cfg.tool_scripts.iter().find(|s| {
        !s.when_user_says.trim().is_empty() && user_lower.contains(&s.when_user_says.to_lowercase())
    })?;
    let messages = req.get("messages").and_then(Value::as_array)?;
    let since_user = messages
        .iter()
        .rev()
        .take_while(|m| m.get("role").and_then(Value::as_str) != Some("user"));
    let done = since_user
        .filter(|m| m.get("tool_calls").is_some_and(|c| c.is_array()))
        .count();
    let round = script.rounds.get(done)?;
    let offered: Vec<&str> = req
        .get("tools")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let calls: Vec<FakeToolCall> = round
        .iter()
        .filter(|c| offered.contains(&c.name.as_str()))
        .cloned()
        .collect();
    if calls.is_empty() {
        return None;
    }
    let say = if done == 0 {
        script.say_first.clone()
    } else {
        String::new()
    };
    Some((say, calls))
}

/// Splits a reply into "tokens": each word with the whitespace before it, so the pieces
/// concatenate back to the reply. Public so benchmarks can compute when a clause completes.
pub fn split_tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_space = false;
    for c in text.chars() {
        if c.is_whitespace() && !prev_space && !cur.trim().is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        prev_space = c.is_whitespace();
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The built-in responder's topics, in order of precedence: the words (or phrases) that
/// select a topic and its reply.
const TOPICS: [(&[&str], &str); 6] = [
    (
        &["waktu", "jam", "buka", "tutup", "pukul", "operasi"],
        "Kami dibuka setiap hari dari pukul 9 pagi hingga 6 petang. \
         Pada hari Ahad, kami tutup lebih awal pada pukul 1 tengah hari. \
         Ada apa-apa lagi yang boleh saya bantu?",
    ),
    (
        &[
            "harga", "berapa", "kos", "bayaran", "yuran", "mahal", "murah", "price", "rm",
        ],
        "Untuk soalan tentang harga, pakej asas kami bermula dari RM99 sebulan. \
         Pakej premium pula RM199 sebulan dan termasuk sokongan 24 jam. \
         Pakej mana yang anda minati?",
    ),
    (
        &[
            "alamat", "lokasi", "di mana", "kat mana", "pejabat", "cawangan",
        ],
        "Pejabat kami terletak di Jalan Ampang, Kuala Lumpur, berhampiran stesen LRT \
         Ampang Park. Ada tempat letak kereta di bangunan yang sama. \
         Mahu saya hantarkan pautan peta melalui SMS?",
    ),
    (
        &[
            "tempah",
            "tempahan",
            "temujanji",
            "janji temu",
            "booking",
            "appointment",
        ],
        "Boleh, saya boleh bantu anda membuat temujanji. \
         Hari dan masa apakah yang paling sesuai untuk anda?",
    ),
    (
        &["assalamualaikum", "salam"],
        "Waalaikumussalam, terima kasih kerana menghubungi kami. \
         Apa yang boleh saya bantu hari ini?",
    ),
    (
        &[
            "helo",
            "hello",
            "hai",
            "hi",
            "selamat pagi",
            "selamat petang",
        ],
        "Hai, terima kasih kerana menghubungi kami. Apa yang boleh saya bantu hari ini?",
    ),
];

/// The built-in responder: a short, natural Malay reply about what the caller asked.
/// Deterministic: the same message always gets the same reply.
pub fn malay_reply(user: &str) -> String {
    let lower = user.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let joined = words.join(" ");
    let has = |keys: &[&str]| {
        keys.iter().any(|k| {
            if k.contains(' ') {
                joined.contains(k)
            } else {
                words.contains(k)
            }
        })
    };
    if words.is_empty() {
        return "Maaf, saya tidak dapat mendengar anda dengan jelas. Boleh ulang sekali lagi?"
            .into();
    }
    if let Some((_, reply)) = TOPICS.iter().find(|(keys, _)| has(keys)) {
        return (*reply).into();
    }
    let snippet: Vec<&str> = user.split_whitespace().take(8).collect();
    let snippet = snippet.join(" ");
    let snippet = snippet.trim_end_matches(|c: char| c.is_ascii_punctuation());
    format!(
        "Baik, saya faham anda menyebut \"{snippet}\". \
         Boleh terangkan sedikit lagi supaya saya dapat membantu anda dengan lebih baik?"
    )
}

const GOODBYE: &str = "Baiklah, terima kasih kerana menghubungi kami. Selamat tinggal!";

/// What one request's stream will say.
struct Script {
    model: String,
    /// Thinking before the content (empty: the model does not reason).
    reasoning: Vec<String>,
    /// `reasoning.exclude`: think for as long, but stream only keep-alives meanwhile.
    reasoning_hidden: bool,
    tokens: Vec<String>,
    end_call: bool,
    /// Tool calls to stream after the content (a scripted round).
    calls: Vec<FakeToolCall>,
    finish_reason: &'static str,
    prompt_tokens: u64,
    /// Where to record token send times: the fake's state and the request's index.
    times: Option<(Arc<Shared>, usize)>,
}

impl Script {
    fn new(cfg: &FakeOpenRouterConfig, req: &Value, served: usize) -> Self {
        let user = last_user_text(req);
        let lower = user.to_lowercase();
        let hang_up = cfg
            .hang_up_words
            .iter()
            .any(|w| !w.trim().is_empty() && lower.contains(&w.to_lowercase()));
        let offers_end_call = req.get("tools").and_then(Value::as_array).is_some_and(|t| {
            t.iter()
                .any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some("end_call"))
        });
        let calls = scripted_calls(cfg, req, &lower);
        let text = if let Some((say, _)) = &calls {
            say.clone()
        } else if hang_up {
            GOODBYE.to_owned()
        } else if cfg.replies.is_empty() {
            malay_reply(&user)
        } else {
            cfg.replies
                .get(served % cfg.replies.len())
                .cloned()
                .unwrap_or_default()
        };
        let mut tokens = split_tokens(&text);
        let max = req
            .get("max_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(u64::MAX);
        let truncated = tokens.len() as u64 > max;
        tokens.truncate(usize::try_from(max).unwrap_or(usize::MAX));
        let (end_call, calls) = match calls {
            Some((_, calls)) => (false, calls),
            None => (hang_up && offers_end_call && !truncated, Vec::new()),
        };
        let prompt_chars: usize = req
            .get("messages")
            .and_then(Value::as_array)
            .map(|m| m.iter().map(|m| m.to_string().len()).sum())
            .unwrap_or(0);
        let model = req
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let reasons = cfg.reasoning_models.iter().any(|m| m == "*" || *m == model)
            && req.pointer("/reasoning/effort").and_then(Value::as_str) != Some("none");
        let reasoning = if reasons {
            split_tokens(&cfg.reasoning_text)
        } else {
            Vec::new()
        };
        Self {
            model,
            reasoning,
            reasoning_hidden: req.pointer("/reasoning/exclude") == Some(&Value::Bool(true)),
            tokens,
            end_call,
            finish_reason: if end_call || !calls.is_empty() {
                "tool_calls"
            } else if truncated {
                "length"
            } else {
                "stop"
            },
            prompt_tokens: (prompt_chars / 4) as u64 + 1,
            times: None,
            calls,
        }
    }

    fn chunk(&self, id: &str, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": id, "provider": "Sandbox", "model": self.model,
            "object": "chat.completion.chunk", "created": unix_secs(),
            "choices": [{
                "index": 0, "delta": delta, "finish_reason": finish,
                "native_finish_reason": finish, "logprobs": null,
            }],
        })
    }

    async fn run(self, out: Emitter, cfg: FakeOpenRouterConfig, attempt: usize) {
        // `None` from a step means the client went away.
        let _ = self.run_inner(&out, &cfg, attempt).await;
    }

    async fn run_inner(
        &self,
        out: &Emitter,
        cfg: &FakeOpenRouterConfig,
        attempt: usize,
    ) -> Option<()> {
        out.comment().await?;
        out.wait(Duration::from_millis(cfg.first_token_delay_ms))
            .await?;
        if cfg.fault == LlmFault::StallBeforeFirstToken {
            return out.stall().await;
        }
        let gap = if cfg.tokens_per_sec > 0.0 && cfg.tokens_per_sec.is_finite() {
            Duration::from_secs_f64(1.0 / cfg.tokens_per_sec)
        } else {
            Duration::ZERO
        };
        for (i, thought) in self.reasoning.iter().enumerate() {
            if i > 0 {
                out.wait(gap).await?;
            }
            if self.reasoning_hidden {
                out.comment().await?;
                continue;
            }
            let detail = json!([{"type": "reasoning.text", "text": thought, "format": "unknown", "index": 0}]);
            out.data(&self.chunk(
                &out.id,
                json!({"role": "assistant", "content": "", "reasoning": thought, "reasoning_details": detail}),
                None,
            ))
            .await?;
        }
        if !self.reasoning.is_empty() {
            out.wait(gap).await?;
        }
        out.data(&self.chunk(&out.id, json!({"role": "assistant", "content": ""}), None))
            .await?;
        let fault_at = match cfg.fault {
            LlmFault::StallAfterTokens(n)
            | LlmFault::MidStreamError { after_tokens: n }
            | LlmFault::Malformed { after_tokens: n }
            | LlmFault::Disconnect { after_tokens: n } => Some(n.min(self.tokens.len())),
            _ => None,
        };
        for i in 0..=self.tokens.len() {
            if fault_at == Some(i) {
                return self.inject(out, cfg.fault, attempt).await;
            }
            let Some(token) = self.tokens.get(i) else {
                break;
            };
            if i > 0 {
                out.wait(gap).await?;
            }
            out.data(&self.chunk(
                &out.id,
                json!({"role": "assistant", "content": token}),
                None,
            ))
            .await?;
            if let Some((shared, idx)) = &self.times {
                let now = std::time::Instant::now();
                if let Some(t) = shared.stats().times.get_mut(*idx) {
                    t.token_sent.push(now);
                }
            }
        }
        if self.end_call {
            let call_id = format!("call_{}", out.id.rsplit('-').next().unwrap_or("0"));
            let fragments = [
                json!({"index": 0, "id": call_id, "type": "function",
                       "function": {"name": "end_call", "arguments": ""}}),
                json!({"index": 0, "function": {"arguments": "{"}}),
                json!({"index": 0, "function": {"arguments": "}"}}),
            ];
            for f in fragments {
                out.wait(gap).await?;
                out.data(&self.chunk(
                    &out.id,
                    json!({"role": "assistant", "content": null, "tool_calls": [f]}),
                    None,
                ))
                .await?;
            }
        }
        if !self.calls.is_empty() {
            self.stream_calls(out, gap).await?;
            if let Some((shared, idx)) = &self.times {
                let now = std::time::Instant::now();
                if let Some(t) = shared.stats().times.get_mut(*idx) {
                    t.calls_sent = Some(now);
                }
            }
        }
        out.data(&self.chunk(&out.id, json!({"content": ""}), Some(self.finish_reason)))
            .await?;
        let reasoning_tokens = self.reasoning.len() as u64;
        let completion =
            self.tokens.len() as u64 + reasoning_tokens + if self.end_call { 5 } else { 0 };
        let cost = (self.prompt_tokens as f64 * 0.15 + completion as f64 * 0.6) / 1_000_000.0;
        out.data(&json!({
            "id": out.id, "provider": "Sandbox", "model": self.model,
            "object": "chat.completion.chunk", "created": unix_secs(), "choices": [],
            "usage": {
                "prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion, "cost": cost,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
            },
        }))
        .await?;
        out.raw(Bytes::from_static(b"data: [DONE]\n\n")).await
    }

    /// The round's calls as deltas: each call's first fragment has its id and name, then its
    /// arguments follow in pieces, the calls' fragments interleaved (a client must assemble
    /// them by index).
    async fn stream_calls(&self, out: &Emitter, gap: Duration) -> Option<()> {
        let tag = out.id.rsplit('-').next().unwrap_or("0").to_owned();
        let mut pieces: Vec<Vec<Value>> = Vec::new();
        for (i, c) in self.calls.iter().enumerate() {
            let args = c.arguments.to_string();
            let mid = args
                .char_indices()
                .nth(args.chars().count() / 2)
                .map_or(0, |(b, _)| b);
            pieces.push(vec![
                json!({"index": i, "id": format!("call_{tag}_{i}"), "type": "function",
                       "function": {"name": c.name, "arguments": ""}}),
                json!({"index": i, "function": {"arguments": &args[..mid]}}),
                json!({"index": i, "function": {"arguments": &args[mid..]}}),
            ]);
        }
        for step in 0..3 {
            for p in &pieces {
                out.wait(gap).await?;
                out.data(&self.chunk(
                    &out.id,
                    json!({"role": "assistant", "content": null, "tool_calls": [p[step]]}),
                    None,
                ))
                .await?;
            }
        }
        Some(())
    }

    async fn inject(&self, out: &Emitter, fault: LlmFault, attempt: usize) -> Option<()> {
        match fault {
            LlmFault::StallAfterTokens(_) => out.stall().await,
            LlmFault::MidStreamError { .. } => {
                let error = if attempt.is_multiple_of(2) {
                    json!({"code": 429, "message": "Rate limit exceeded",
                           "metadata": {"error_type": "rate_limit_exceeded"}})
                } else {
                    json!({"code": "server_error", "message": "Internal Server Error",
                           "metadata": {"error_type": "server"}})
                };
                let mut chunk = self.chunk(&out.id, json!({"content": ""}), Some("error"));
                if let Some(obj) = chunk.as_object_mut() {
                    obj.insert("error".into(), error);
                }
                out.data(&chunk).await
            }
            LlmFault::Malformed { .. } => {
                out.raw(Bytes::from_static(
                    b"data: {\"id\":\"gen-x\",\"choices\":[{\"delta\":{\"content\":\n\n",
                ))
                .await
            }
            LlmFault::Disconnect { .. } => {
                let _ = out.tx.send(Frame::Abort).await;
                None
            }
            _ => Some(()),
        }
    }
}

/// What the script hands the response body.
enum Frame {
    Data(Bytes),
    /// Drop the connection mid-body.
    Abort,
}

/// Writes SSE frames into the response body.
struct Emitter {
    tx: mpsc::Sender<Frame>,
    id: String,
}

impl Emitter {
    async fn raw(&self, b: Bytes) -> Option<()> {
        self.tx.send(Frame::Data(b)).await.ok()
    }

    async fn comment(&self) -> Option<()> {
        self.raw(Bytes::from_static(b": OPENROUTER PROCESSING\n\n"))
            .await
    }

    async fn data(&self, v: &Value) -> Option<()> {
        self.raw(Bytes::from(format!("data: {v}\n\n"))).await
    }

    /// Waits, sending keep-alive comments every [`KEEPALIVE`] like OpenRouter does.
    async fn wait(&self, total: Duration) -> Option<()> {
        let mut left = total;
        while !left.is_zero() {
            let step = left.min(KEEPALIVE);
            tokio::time::sleep(step).await;
            left -= step;
            if !left.is_zero() {
                self.comment().await?;
            }
        }
        Some(())
    }

    /// Keep-alives only, until the client gives up (or [`MAX_STALL`]).
    async fn stall(&self) -> Option<()> {
        self.wait(MAX_STALL).await?;
        let _ = self.tx.send(Frame::Abort).await;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_concatenate_to_the_reply() {
        for s in [
            "Harga pakej  ialah RM99.",
            " leading space",
            "one",
            "",
            "a\nb  c ",
        ] {
            assert_eq!(split_tokens(s).concat(), s);
        }
        assert_eq!(
            split_tokens("Harga pakej ialah"),
            vec!["Harga", " pakej", " ialah"]
        );
    }

    #[test]
    fn malay_replies_follow_the_question() {
        assert!(malay_reply("Berapa harga pakej ini?").contains("harga"));
        assert!(malay_reply("Pukul berapa kedai buka?").contains("pukul 9 pagi"));
        assert!(malay_reply("Kedai buka jam 9?").contains("pukul 9 pagi"));
        assert!(malay_reply("Di mana lokasi pejabat?").contains("Jalan Ampang"));
        assert!(malay_reply("Saya nak buat temujanji").contains("temujanji"));
        let other = malay_reply("Anak saya suka kucing oren");
        assert!(other.contains("\"Anak saya suka kucing oren\""), "{other}");
        assert_eq!(malay_reply("Berapa harga?"), malay_reply("Berapa harga?"));
        assert!(malay_reply("").starts_with("Maaf"));
    }

    #[test]
    fn faults_can_target_one_conversation() {
        let mut cfg = FakeOpenRouterConfig {
            fault: LlmFault::Status(500),
            ..FakeOpenRouterConfig::default()
        };
        assert_eq!(cfg.fault_for("anything"), LlmFault::Status(500));
        cfg.fault_only_for = Some("Kekunci".into());
        assert_eq!(cfg.fault_for("menekan kekunci 5"), LlmFault::Status(500));
        assert_eq!(cfg.fault_for("berapa harga?"), LlmFault::None);
    }

    #[test]
    fn validation_rejects_bad_requests() {
        let ok =
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(validate(&ok), Ok(()));
        for (bad, what) in [
            (
                json!({"stream": true, "messages": [{"role": "user", "content": "hi"}]}),
                "model",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
                "stream",
            ),
            (
                json!({"model": "m", "stream": true, "messages": []}),
                "messages",
            ),
            (
                json!({"model": "m", "stream": true, "messages": [{"role": "robot", "content": "x"}]}),
                "role",
            ),
            (
                json!({"model": "m", "stream": true, "messages": [{"role": "user"}]}),
                "content",
            ),
            (
                json!({"model": "m", "stream": true, "temperature": 3, "messages": [{"role": "user", "content": "x"}]}),
                "temperature",
            ),
        ] {
            let e = validate(&bad).unwrap_err();
            assert!(e.contains(what), "{e} should mention {what}");
        }
    }
}
