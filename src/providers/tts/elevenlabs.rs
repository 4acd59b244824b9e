//! ElevenLabs text-to-speech over the `stream-input` websocket or HTTP `/stream`.
//!
//! The call pipeline opens a synthesis while the LLM is still thinking, feeds it clauses as
//! they are produced and plays the PCM that comes back. The websocket transport is the fast
//! path: `open()` connects and sends the initialise message ahead of time, text is forwarded
//! clause by clause with `try_trigger_generation`, and audio is decoded the moment it arrives.
//! The HTTP transport posts each completed sentence batch to `/stream` in turn and streams the
//! response bodies out. Wire formats follow `shared/docs/provider-apis.md` section 3.
//!
//! The protocol pieces (text chunking, message building and parsing, error bodies) are plain
//! functions and structs tested below; the async drivers only move bytes and watch deadlines.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt as _, Stream, StreamExt as _, TryStreamExt as _};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::decode::AudioDecoder;
use super::{TtsError, TtsInput, TtsOutput, TtsParams, TtsProvider, TtsStream};
use crate::ops::config::{OutputFormat, Secret, TtsSettings, TtsTransport};
use crate::providers::BoxFuture;

/// Clauses waiting to be sent.
const TEXT_CHANNEL: usize = 32;
/// Audio chunks waiting to be played.
const AUDIO_CHANNEL: usize = 64;
/// A shorter schedule than the default `[120,160,250,290]`: we send clause by clause and
/// want the first audio early.
const CHUNK_LENGTH_SCHEDULE: [usize; 4] = [50, 90, 120, 150];
/// The server closes after 20 s without text; a space every 10 s keeps a pre-opened or slow
/// reply alive.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Default deadline for the TCP + TLS + websocket handshake.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a goodbye (close frame) may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Error bodies are read up to this size.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// An HTTP batch without a sentence end is cut at a word once it gets this long.
const MAX_HTTP_BATCH_CHARS: usize = 300;

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;
type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, TtsError>> + Send>>;

/// The ElevenLabs client. Cheap to share; one pooled HTTP client serves all calls.
#[derive(Debug, Clone)]
pub struct ElevenLabs {
    settings: TtsSettings,
    key: Secret,
    http: reqwest::Client,
    connect_timeout: Duration,
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
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        })
    }

    /// Overrides the connect deadline (TCP, TLS and the websocket upgrade); default 5 s.
    pub fn with_connect_timeout(mut self, deadline: Duration) -> Self {
        self.connect_timeout = deadline;
        self
    }

    fn first_byte_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.first_byte_timeout_ms)
    }

    fn key(&self) -> &str {
        self.key.expose().unwrap_or_default()
    }

    /// `language_code` only for the models that take it (flash/turbo v2.5).
    fn language_code(&self) -> Option<&str> {
        let lang = self.settings.language_code.trim();
        (self.settings.model_id.ends_with("_v2_5") && !lang.is_empty()).then_some(lang)
    }

    /// The `stream-input` URL with its query.
    fn websocket_url(&self, format: OutputFormat) -> Result<reqwest::Url, TtsError> {
        let mut url = endpoint_url(
            &self.settings.base_url,
            &self.settings.voice_id,
            "stream-input",
        )?;
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme).map_err(|()| {
            TtsError::Config(format!(
                "cannot derive a websocket URL from {}",
                self.settings.base_url
            ))
        })?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("model_id", &self.settings.model_id);
            q.append_pair("output_format", format.as_str());
            if let Some(lang) = self.language_code() {
                q.append_pair("language_code", lang);
            }
        }
        Ok(url)
    }

    async fn open_websocket(&self, params: TtsParams) -> Result<TtsStream, TtsError> {
        let format = output_format_for(self.settings.output_format, params.sample_rate)?;
        let url = self.websocket_url(format)?;
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| TtsError::Config(format!("bad websocket URL: {e}")))?;
        let key = HeaderValue::from_str(self.key()).map_err(|e| TtsError::Config(e.to_string()))?;
        request.headers_mut().insert("xi-api-key", key);

        let connect_ms = duration_ms(self.connect_timeout);
        let (mut ws, _) = timeout(
            self.connect_timeout,
            // Nagle off: each clause must leave at once, not wait for an ACK.
            tokio_tungstenite::connect_async_with_config(request, None, true),
        )
        .await
        .map_err(|_| TtsError::Timeout(connect_ms))?
        .map_err(upgrade_error)?;
        timeout(
            self.connect_timeout,
            ws.send(Message::text(init_message(self.key()))),
        )
        .await
        .map_err(|_| TtsError::Timeout(connect_ms))?
        .map_err(|e| TtsError::Transport(format!("sending the initialise message: {e}")))?;
        tracing::debug!(call_id = %params.call_id, format = format.as_str(), "TTS websocket open");

        let deadline_after = self.first_byte_timeout();
        Ok(spawn_driver(|text_rx, audio_tx| {
            WsDriver {
                ws,
                text_rx,
                audio_tx,
                decoder: AudioDecoder::new(format),
                outbound: Outbound::new(Instant::now()),
                deadline_after,
                call_id: params.call_id,
            }
            .run()
        }))
    }

    fn open_http(&self, params: TtsParams) -> Result<TtsStream, TtsError> {
        let format = output_format_for(self.settings.output_format, params.sample_rate)?;
        let mut url = endpoint_url(&self.settings.base_url, &self.settings.voice_id, "stream")?;
        url.query_pairs_mut()
            .append_pair("output_format", format.as_str());
        let target = Arc::new(HttpTarget {
            client: self.http.clone(),
            url,
            key: self.key().to_owned(),
            model_id: self.settings.model_id.clone(),
            language_code: self.language_code().map(str::to_owned),
        });
        let deadline_after = self.first_byte_timeout();
        Ok(spawn_driver(|text_rx, audio_tx| {
            HttpDriver {
                target,
                text_rx,
                audio_tx,
                format,
                deadline_after,
                call_id: params.call_id,
            }
            .run()
        }))
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

/// Opens a synthesis, sends `text` as one reply and collects all of its audio: for clips
/// synthesized once at startup (greeting, apology).
pub async fn synthesize_all(
    provider: &dyn TtsProvider,
    params: TtsParams,
    text: &str,
) -> Result<Vec<i16>, TtsError> {
    let TtsStream {
        text: tx,
        mut audio,
    } = provider.open(params).await?;
    // If the driver already died these fail; its `Failed` is then read below.
    if tx.send(TtsInput::Text(text.to_owned())).await.is_ok() {
        let _ = tx.send(TtsInput::Finish).await;
    }
    let mut pcm = Vec::new();
    while let Some(out) = audio.recv().await {
        match out {
            TtsOutput::Audio(samples) => pcm.extend_from_slice(&samples),
            TtsOutput::Done => return Ok(pcm),
            TtsOutput::Failed(msg) => return Err(TtsError::Transport(msg)),
        }
    }
    Err(TtsError::Transport(
        "the synthesis ended without finishing".into(),
    ))
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

fn upgrade_error(e: tungstenite::Error) -> TtsError {
    match e {
        tungstenite::Error::Http(resp) => {
            let body = resp.body().as_deref().unwrap_or_default();
            parse_error_body(resp.status().as_u16(), body)
        }
        other => TtsError::Transport(format!("websocket connect: {other}")),
    }
}

// ---------------------------------------------------------------------------------------
// Sans-IO protocol pieces.

/// The websocket initialise message: a single space, voice settings, our chunk schedule and
/// the key (also sent as the `xi-api-key` upgrade header).
fn init_message(key: &str) -> String {
    json!({
        "text": " ",
        "voice_settings": {"stability": 0.5, "similarity_boost": 0.8, "speed": 1.0},
        "generation_config": {"chunk_length_schedule": CHUNK_LENGTH_SCHEDULE},
        "xi_api_key": key,
    })
    .to_string()
}

fn text_message(text: &str) -> String {
    json!({"text": text, "try_trigger_generation": true}).to_string()
}

/// Forces generation of everything buffered; the socket stays open. Never an empty `text`
/// (that would close the socket).
fn flush_message(text: Option<&str>) -> String {
    json!({"text": text.unwrap_or(" "), "flush": true}).to_string()
}

/// Generates the rest, then the server sends `isFinal` and closes.
fn close_message() -> String {
    json!({"text": ""}).to_string()
}

fn keepalive_message() -> String {
    json!({"text": " "}).to_string()
}

/// Whether a buffer ending in `c` can be sent as is: the service wants whole words and each
/// chunk to end with a space, so only clause punctuation (or whitespace) ends a chunk.
fn ends_clause(c: char) -> bool {
    matches!(
        c,
        '.' | ',' | '!' | '?' | ';' | ':' | '…' | ')' | ']' | '”' | '’' | '»' | '。' | '、'
    )
}

fn ends_sentence(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '。')
}

/// `text` trimmed, with the trailing space ElevenLabs wants; `None` if nothing is left.
fn with_trailing_space(text: &str) -> Option<String> {
    let t = text.trim();
    (!t.is_empty()).then(|| format!("{t} "))
}

/// Cuts LLM text into websocket chunks that end on a word boundary with a trailing space. A
/// clause ending in punctuation or whitespace goes at once; a trailing partial word waits for
/// the next text or the end of the reply.
#[derive(Debug, Default)]
struct TextChunker {
    pending: String,
}

impl TextChunker {
    fn push(&mut self, text: &str) -> Option<String> {
        self.pending.push_str(text);
        let cut = match self.pending.chars().next_back() {
            None => 0,
            Some(c) if c.is_whitespace() || ends_clause(c) => self.pending.len(),
            Some(_) => self
                .pending
                .char_indices()
                .rev()
                .find(|(_, c)| c.is_whitespace())
                .map_or(0, |(i, c)| i + c.len_utf8()),
        };
        if cut == 0 {
            return None;
        }
        let ready: String = self.pending.drain(..cut).collect();
        with_trailing_space(&ready)
    }

    fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        with_trailing_space(&rest)
    }
}

/// What the websocket client sends and when: text, the end of the reply, keep-alives, and
/// whether audio is owed (which arms the audio deadline).
#[derive(Debug)]
struct Outbound {
    chunker: TextChunker,
    last_sent: Instant,
    finished: bool,
    chars_sent: usize,
}

impl Outbound {
    fn new(now: Instant) -> Self {
        Self {
            chunker: TextChunker::default(),
            last_sent: now,
            finished: false,
            chars_sent: 0,
        }
    }

    fn on_text(&mut self, text: &str, now: Instant) -> Option<String> {
        let chunk = self.chunker.push(text)?;
        self.chars_sent += chunk.chars().count();
        self.last_sent = now;
        Some(text_message(&chunk))
    }

    /// The flush (carrying any held-back word) and the close message.
    fn on_finish(&mut self, now: Instant) -> [String; 2] {
        let rest = self.chunker.finish();
        self.chars_sent += rest.as_deref().map_or(0, |r| r.chars().count());
        self.finished = true;
        self.last_sent = now;
        [flush_message(rest.as_deref()), close_message()]
    }

    /// When a keep-alive is due; none once the reply is finished (the server is generating).
    fn keepalive_at(&self) -> Option<Instant> {
        (!self.finished).then(|| self.last_sent + KEEPALIVE_INTERVAL)
    }

    fn on_keepalive(&mut self, now: Instant) -> String {
        self.last_sent = now;
        keepalive_message()
    }

    /// Whether the service must be producing audio now: the reply is finished, or, before the
    /// first audio, enough text went out to fill the first chunk of the schedule. (Between
    /// those, silence may just mean the service is waiting for more text.)
    fn audio_owed(&self, got_audio: bool) -> bool {
        self.finished || (!got_audio && self.chars_sent >= CHUNK_LENGTH_SCHEDULE[0])
    }
}

/// One server message, decoded.
#[derive(Debug, PartialEq)]
enum ServerEvent {
    /// Audio bytes in the output format, and whether this was also the final message.
    Audio { bytes: Vec<u8>, is_final: bool },
    /// `{"isFinal":true}` without audio.
    Final,
    /// Nothing for us (e.g. an alignment-only message).
    Other,
    /// `{"error":..,"message":..,"code":..}` or a message we cannot read.
    Error(String),
}

#[derive(Deserialize)]
struct RawServerMessage {
    #[serde(default)]
    audio: Option<String>,
    #[serde(default, rename = "isFinal", alias = "is_final")]
    is_final: Option<bool>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

fn parse_server_message(text: &str) -> ServerEvent {
    let raw: RawServerMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => return ServerEvent::Error(format!("unreadable message from ElevenLabs: {e}")),
    };
    if raw.error.as_ref().is_some_and(|e| !e.is_null()) {
        let kind = match &raw.error {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let mut msg = format!("ElevenLabs error {kind}");
        if let Some(m) = raw.message {
            msg.push_str(": ");
            msg.push_str(&m);
        }
        if let Some(code) = raw.code.filter(|c| !c.is_null()) {
            msg.push_str(&format!(" (code {code})"));
        }
        return ServerEvent::Error(msg);
    }
    let is_final = raw.is_final == Some(true);
    match raw.audio.filter(|a| !a.is_empty()) {
        Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()) {
            Ok(bytes) => ServerEvent::Audio { bytes, is_final },
            Err(e) => ServerEvent::Error(format!("bad base64 audio from ElevenLabs: {e}")),
        },
        None if is_final => ServerEvent::Final,
        None => ServerEvent::Other,
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    detail: ErrorDetail,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorDetail {
    Object {
        #[serde(default)]
        status: Option<String>,
        #[serde(default)]
        message: Option<String>,
    },
    Validation(Vec<ValidationItem>),
    Text(String),
}

#[derive(Deserialize)]
struct ValidationItem {
    #[serde(default)]
    loc: Vec<serde_json::Value>,
    #[serde(default)]
    msg: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// An error response: `{"detail":{"status","message"}}`, the 422 array form, or anything.
fn parse_error_body(status: u16, body: &[u8]) -> TtsError {
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody {
            detail:
                ErrorDetail::Object {
                    status: code,
                    message,
                },
        }) => match (code, message) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c,
            (None, Some(m)) => m,
            (None, None) => "no detail".to_owned(),
        },
        Ok(ErrorBody {
            detail: ErrorDetail::Validation(items),
        }) => items
            .iter()
            .map(|i| {
                let loc: Vec<String> = i
                    .loc
                    .iter()
                    .map(|l| l.as_str().map_or_else(|| l.to_string(), str::to_owned))
                    .collect();
                match &i.kind {
                    Some(k) => format!("{}: {} ({k})", loc.join("."), i.msg),
                    None => format!("{}: {}", loc.join("."), i.msg),
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        Ok(ErrorBody {
            detail: ErrorDetail::Text(t),
        }) => t,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let t = text.trim();
            if t.is_empty() {
                "no body".to_owned()
            } else {
                t.chars().take(300).collect()
            }
        }
    };
    TtsError::Status { status, message }
}

/// Collects LLM text into batches for the HTTP transport: everything up to the last sentence
/// end, so each POST is whole sentences (better prosody, and a POST can go before the reply is
/// complete).
#[derive(Debug, Default)]
struct SentenceBatcher {
    pending: String,
}

impl SentenceBatcher {
    fn push(&mut self, text: &str) {
        self.pending.push_str(text);
    }

    /// The next batch, if one is ready; with `finished` everything left is ready.
    fn take_ready(&mut self, finished: bool) -> Option<String> {
        let cut = if finished {
            self.pending.len()
        } else {
            let mut cut = 0;
            let mut prev: Option<char> = None;
            for (i, c) in self.pending.char_indices() {
                if c.is_whitespace() && prev.is_some_and(ends_sentence) {
                    cut = i;
                }
                prev = Some(c);
            }
            if prev.is_some_and(ends_sentence) {
                cut = self.pending.len();
            }
            if cut == 0 && self.pending.chars().count() > MAX_HTTP_BATCH_CHARS {
                cut = self.pending.rfind(char::is_whitespace).unwrap_or(0);
            }
            cut
        };
        if cut == 0 {
            return None;
        }
        let batch: String = self.pending.drain(..cut).collect();
        let t = batch.trim();
        (!t.is_empty()).then(|| t.to_owned())
    }
}

// ---------------------------------------------------------------------------------------
// Drivers.

struct WsDriver {
    ws: WsStream,
    text_rx: mpsc::Receiver<TtsInput>,
    audio_tx: mpsc::Sender<TtsOutput>,
    decoder: AudioDecoder,
    outbound: Outbound,
    deadline_after: Duration,
    call_id: String,
}

/// How a websocket synthesis ended.
enum WsEnd {
    Done,
    Failed(String),
    /// The text sender or the audio receiver went away: stop quietly.
    Cancelled,
}

impl WsDriver {
    async fn run(mut self) {
        let end = self.drive().await;
        match end {
            WsEnd::Done => {
                let _ = self.audio_tx.send(TtsOutput::Done).await;
            }
            WsEnd::Failed(msg) => {
                tracing::warn!(call_id = %self.call_id, error = %msg, "TTS websocket failed");
                let _ = self.audio_tx.send(TtsOutput::Failed(msg)).await;
            }
            WsEnd::Cancelled => {
                tracing::debug!(call_id = %self.call_id, "TTS websocket cancelled");
            }
        }
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = timeout(CLOSE_TIMEOUT, self.ws.close(Some(frame))).await;
    }

    async fn send(&mut self, text: String) -> Result<(), WsEnd> {
        self.ws
            .send(Message::text(text))
            .await
            .map_err(|e| WsEnd::Failed(format!("sending text to ElevenLabs: {e}")))
    }

    async fn emit(&mut self, samples: Vec<i16>) -> Result<(), WsEnd> {
        if samples.is_empty() {
            return Ok(());
        }
        self.audio_tx
            .send(TtsOutput::Audio(samples))
            .await
            .map_err(|_| WsEnd::Cancelled)
    }

    async fn drive(&mut self) -> WsEnd {
        match self.drive_inner().await {
            Ok(end) | Err(end) => end,
        }
    }

    async fn drive_inner(&mut self) -> Result<WsEnd, WsEnd> {
        let mut got_audio = false;
        // When audio must have arrived by (armed only while audio is owed).
        let mut deadline: Option<Instant> = None;
        let far = || Instant::now() + Duration::from_secs(3600);
        loop {
            let keepalive_at = self.outbound.keepalive_at();
            tokio::select! {
                input = self.text_rx.recv(), if !self.outbound.finished => {
                    let now = Instant::now();
                    match input {
                        Some(TtsInput::Text(t)) => {
                            if let Some(msg) = self.outbound.on_text(&t, now) {
                                self.send(msg).await?;
                            }
                        }
                        Some(TtsInput::Finish) => {
                            for msg in self.outbound.on_finish(now) {
                                self.send(msg).await?;
                            }
                        }
                        None => return Ok(WsEnd::Cancelled),
                    }
                    if deadline.is_none() && self.outbound.audio_owed(got_audio) {
                        deadline = Some(now + self.deadline_after);
                    }
                }
                frame = self.ws.next() => {
                    let Some(frame) = frame else {
                        return Ok(WsEnd::Failed("ElevenLabs dropped the connection".into()));
                    };
                    let frame = frame.map_err(|e| WsEnd::Failed(format!("ElevenLabs websocket: {e}")))?;
                    match frame {
                        Message::Text(text) => match parse_server_message(text.as_str()) {
                            ServerEvent::Audio { bytes, is_final } => {
                                got_audio = true;
                                let samples = self.decoder.decode(&bytes);
                                self.emit(samples).await?;
                                if is_final {
                                    return Ok(self.final_received());
                                }
                                deadline = self
                                    .outbound
                                    .audio_owed(got_audio)
                                    .then(|| Instant::now() + self.deadline_after);
                            }
                            ServerEvent::Final => return Ok(self.final_received()),
                            ServerEvent::Other => {}
                            ServerEvent::Error(msg) => return Ok(WsEnd::Failed(msg)),
                        },
                        Message::Close(frame) => {
                            let normal = frame.as_ref().is_none_or(|f| f.code == CloseCode::Normal);
                            if normal && self.outbound.finished {
                                return Ok(WsEnd::Done);
                            }
                            let why = frame.map_or_else(
                                || "no close frame".to_owned(),
                                |f| format!("code {}: {}", u16::from(f.code), f.reason),
                            );
                            return Ok(WsEnd::Failed(format!("ElevenLabs closed the stream ({why})")));
                        }
                        // Pings are answered by tungstenite; binary frames are not in the protocol.
                        _ => {}
                    }
                }
                () = sleep_until(keepalive_at.unwrap_or_else(far)), if keepalive_at.is_some() => {
                    let msg = self.outbound.on_keepalive(Instant::now());
                    self.send(msg).await?;
                }
                () = sleep_until(deadline.unwrap_or_else(far)), if deadline.is_some() => {
                    return Ok(WsEnd::Failed(format!(
                        "no audio from ElevenLabs within {} ms",
                        duration_ms(self.deadline_after)
                    )));
                }
                () = self.audio_tx.closed() => return Ok(WsEnd::Cancelled),
            }
        }
    }

    fn final_received(&self) -> WsEnd {
        if self.decoder.has_partial_sample() {
            tracing::warn!(call_id = %self.call_id, "TTS audio ended with half a sample");
        }
        if self.outbound.finished {
            WsEnd::Done
        } else {
            WsEnd::Failed("ElevenLabs ended the stream before the reply was finished".into())
        }
    }
}

/// Where and how the HTTP transport posts.
#[derive(Debug)]
struct HttpTarget {
    client: reqwest::Client,
    url: reqwest::Url,
    key: String,
    model_id: String,
    language_code: Option<String>,
}

impl HttpTarget {
    /// One POST to `/stream` as a stream of body chunks; a non-2xx answer is one error item.
    fn request(self: &Arc<Self>, text: String) -> BodyStream {
        let target = Arc::clone(self);
        let response = async move {
            let mut body = json!({
                "text": text,
                "model_id": target.model_id,
                "voice_settings": {"stability": 0.5, "similarity_boost": 0.8, "speed": 1.0},
            });
            if let (Some(lang), Some(obj)) = (&target.language_code, body.as_object_mut()) {
                obj.insert("language_code".into(), json!(lang));
            }
            let mut resp = target
                .client
                .post(target.url.clone())
                .header("xi-api-key", &target.key)
                .json(&body)
                .send()
                .await
                .map_err(|e| TtsError::Transport(format!("POST to ElevenLabs: {e}")))?;
            let status = resp.status();
            if !status.is_success() {
                let mut err_body = Vec::new();
                while let Ok(Some(chunk)) = resp.chunk().await {
                    err_body.extend_from_slice(&chunk);
                    if err_body.len() >= MAX_ERROR_BODY {
                        break;
                    }
                }
                return Err(parse_error_body(status.as_u16(), &err_body));
            }
            Ok(resp
                .bytes_stream()
                .map_err(|e| TtsError::Transport(format!("reading ElevenLabs audio: {e}"))))
        };
        futures_util::stream::once(response).try_flatten().boxed()
    }
}

struct HttpDriver {
    target: Arc<HttpTarget>,
    text_rx: mpsc::Receiver<TtsInput>,
    audio_tx: mpsc::Sender<TtsOutput>,
    format: OutputFormat,
    deadline_after: Duration,
    call_id: String,
}

impl HttpDriver {
    async fn run(mut self) {
        match self.drive().await {
            Some(TtsOutput::Failed(msg)) => {
                tracing::warn!(call_id = %self.call_id, error = %msg, "TTS request failed");
                let _ = self.audio_tx.send(TtsOutput::Failed(msg)).await;
            }
            Some(out) => {
                let _ = self.audio_tx.send(out).await;
            }
            None => tracing::debug!(call_id = %self.call_id, "TTS request cancelled"),
        }
    }

    /// Runs until the end; `None` means cancelled. Dropping a body stream aborts its request.
    async fn drive(&mut self) -> Option<TtsOutput> {
        let mut batcher = SentenceBatcher::default();
        let mut finished = false;
        let mut body: Option<BodyStream> = None;
        let mut decoder = AudioDecoder::new(self.format);
        let mut deadline = Instant::now();
        let mut queue: VecDeque<String> = VecDeque::new();
        loop {
            while let Some(batch) = batcher.take_ready(finished) {
                queue.push_back(batch);
            }
            if body.is_none() {
                if !queue.is_empty() {
                    // Everything ready goes in one request: fewer round trips, better prosody.
                    let text = queue.drain(..).collect::<Vec<_>>().join(" ");
                    body = Some(self.target.request(text));
                    decoder = AudioDecoder::new(self.format);
                    deadline = Instant::now() + self.deadline_after;
                } else if finished {
                    return Some(TtsOutput::Done);
                }
            }
            tokio::select! {
                input = self.text_rx.recv(), if !finished => match input {
                    Some(TtsInput::Text(t)) => batcher.push(&t),
                    Some(TtsInput::Finish) => finished = true,
                    None => return None,
                },
                chunk = async { match body.as_mut() {
                    Some(b) => b.next().await,
                    None => std::future::pending().await,
                } }, if body.is_some() => match chunk {
                    Some(Ok(bytes)) => {
                        let samples = decoder.decode(&bytes);
                        if !samples.is_empty() && self.audio_tx.send(TtsOutput::Audio(samples)).await.is_err() {
                            return None;
                        }
                        deadline = Instant::now() + self.deadline_after;
                    }
                    Some(Err(e)) => return Some(TtsOutput::Failed(e.to_string())),
                    None => {
                        if decoder.has_partial_sample() {
                            tracing::warn!(call_id = %self.call_id, "TTS body ended with half a sample");
                        }
                        body = None;
                    }
                },
                () = sleep_until(deadline), if body.is_some() => {
                    return Some(TtsOutput::Failed(
                        TtsError::Timeout(duration_ms(self.deadline_after)).to_string(),
                    ));
                }
                () = self.audio_tx.closed() => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::config::Settings;
    use crate::sandbox::elevenlabs::{
        self as fake, FakeElevenLabs, FakeElevenLabsConfig, TtsFault, speech_samples, synthesize,
    };

    /// Hang guard only: every test finishes far sooner on a healthy machine.
    const GUARD: Duration = Duration::from_secs(30);
    const KEY: &str = "test-key";

    fn settings(base_url: &str, transport: TtsTransport, format: OutputFormat) -> TtsSettings {
        let mut s = Settings::defaults().tts;
        s.base_url = base_url.to_owned();
        s.transport = transport;
        s.output_format = format;
        s.first_byte_timeout_ms = 10_000;
        s
    }

    fn fast() -> FakeElevenLabsConfig {
        FakeElevenLabsConfig {
            key: Some(KEY.into()),
            first_byte_delay_ms: 5,
            realtime_factor: 50.0,
            chunk_ms: 100,
            fault: TtsFault::None,
        }
    }

    fn with_fault(fault: TtsFault) -> FakeElevenLabsConfig {
        FakeElevenLabsConfig { fault, ..fast() }
    }

    fn client(s: &TtsSettings, key: &str) -> ElevenLabs {
        ElevenLabs::new(s, Secret::new(Some(key.into()))).unwrap()
    }

    /// A fake serving `cfg` and a client of it using `key`, `transport` and `format`.
    async fn start(
        cfg: FakeElevenLabsConfig,
        transport: TtsTransport,
        format: OutputFormat,
        key: &str,
    ) -> (FakeElevenLabs, ElevenLabs) {
        let srv = fake::spawn(cfg).await.unwrap();
        let el = client(&settings(&srv.base_url(), transport, format), key);
        (srv, el)
    }

    /// Opens a synthesis and sends `clauses`, then `Finish` if `finish`.
    async fn open_and_send(
        el: &ElevenLabs,
        rate: u32,
        clauses: &[&str],
        finish: bool,
    ) -> TtsStream {
        let stream = el.open(params(rate)).await.unwrap();
        for c in clauses {
            stream.text.send(TtsInput::Text((*c).into())).await.unwrap();
        }
        if finish {
            stream.text.send(TtsInput::Finish).await.unwrap();
        }
        stream
    }

    /// The message of a `Failed` end; panics on anything else.
    fn failure(end: Option<TtsOutput>) -> String {
        match end {
            Some(TtsOutput::Failed(m)) => m,
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    /// A clause long enough for several chunks of audio.
    const LONG: &str = "Selamat pagi, terima kasih kerana menelefon kami hari ini.";

    fn params(rate: u32) -> TtsParams {
        TtsParams {
            sample_rate: rate,
            call_id: "test-call".into(),
        }
    }

    async fn recv(audio: &mut mpsc::Receiver<TtsOutput>) -> Option<TtsOutput> {
        timeout(GUARD, audio.recv()).await.expect("hang guard")
    }

    /// All audio up to the end marker.
    async fn collect(
        audio: &mut mpsc::Receiver<TtsOutput>,
    ) -> (Vec<i16>, usize, Option<TtsOutput>) {
        let (mut pcm, mut chunks) = (Vec::new(), 0);
        loop {
            match recv(audio).await {
                Some(TtsOutput::Audio(s)) => {
                    assert!(!s.is_empty());
                    chunks += 1;
                    pcm.extend_from_slice(&s);
                }
                end => return (pcm, chunks, end),
            }
        }
    }

    // --- sans-IO pieces -----------------------------------------------------------------

    #[test]
    fn messages_are_exactly_the_documented_ones() {
        let init: serde_json::Value = serde_json::from_str(&init_message("k")).unwrap();
        assert_eq!(
            init,
            json!({"text":" ","voice_settings":{"stability":0.5,"similarity_boost":0.8,"speed":1.0},
                   "generation_config":{"chunk_length_schedule":[50,90,120,150]},"xi_api_key":"k"})
        );
        assert_eq!(
            text_message("Ya. "),
            r#"{"text":"Ya. ","try_trigger_generation":true}"#
        );
        let flush: serde_json::Value = serde_json::from_str(&flush_message(None)).unwrap();
        assert_eq!(flush, json!({"text":" ","flush":true}));
        let flush: serde_json::Value = serde_json::from_str(&flush_message(Some("pagi "))).unwrap();
        assert_eq!(flush, json!({"text":"pagi ","flush":true}));
        assert_eq!(close_message(), r#"{"text":""}"#);
        assert_eq!(keepalive_message(), r#"{"text":" "}"#);
    }

    #[test]
    fn chunker_sends_whole_words_with_a_trailing_space() {
        let mut c = TextChunker::default();
        assert_eq!(c.push("Hello,").as_deref(), Some("Hello, "));
        assert_eq!(c.push("Sela"), None);
        assert_eq!(c.push("mat pagi").as_deref(), Some("Selamat "));
        assert_eq!(c.push(" ").as_deref(), Some("pagi "));
        assert_eq!(c.push("   "), None);
        assert_eq!(c.push("Apa khabar?").as_deref(), Some("Apa khabar? "));
        assert_eq!(c.push("Terima kasih"), Some("Terima ".into()));
        assert_eq!(c.finish().as_deref(), Some("kasih "));
        assert_eq!(c.finish(), None);
    }

    #[test]
    fn keepalive_and_audio_owed() {
        let t0 = Instant::now();
        let mut o = Outbound::new(t0);
        assert_eq!(o.keepalive_at(), Some(t0 + KEEPALIVE_INTERVAL));
        let t1 = t0 + Duration::from_secs(4);
        assert!(o.on_text("Short. ", t1).is_some());
        assert_eq!(o.keepalive_at(), Some(t1 + KEEPALIVE_INTERVAL));
        assert!(!o.audio_owed(false), "the service may wait for more text");
        let long = "x".repeat(CHUNK_LENGTH_SCHEDULE[0]) + " ";
        assert!(o.on_text(&long, t1).is_some());
        assert!(o.audio_owed(false));
        assert!(!o.audio_owed(true));
        let t2 = t1 + KEEPALIVE_INTERVAL;
        assert_eq!(o.on_keepalive(t2), r#"{"text":" "}"#);
        assert_eq!(o.keepalive_at(), Some(t2 + KEEPALIVE_INTERVAL));
        let [flush, close] = o.on_finish(t2);
        assert!(flush.contains("\"flush\":true"));
        assert_eq!(close, r#"{"text":""}"#);
        assert_eq!(o.keepalive_at(), None);
        assert!(o.audio_owed(true));
    }

    #[test]
    fn server_messages_parse() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([1u8, 2, 3]);
        let full = format!(
            r#"{{"audio":"{b64}","isFinal":null,"normalizedAlignment":{{"chars":["H"],"charStartTimesMs":[0],"charsDurationsMs":[3]}},"alignment":null}}"#
        );
        assert_eq!(
            parse_server_message(&full),
            ServerEvent::Audio {
                bytes: vec![1, 2, 3],
                is_final: false
            }
        );
        assert_eq!(
            parse_server_message(&format!(r#"{{"audio":"{b64}"}}"#)),
            ServerEvent::Audio {
                bytes: vec![1, 2, 3],
                is_final: false
            }
        );
        assert_eq!(
            parse_server_message(r#"{"isFinal":true}"#),
            ServerEvent::Final
        );
        assert_eq!(
            parse_server_message(r#"{"audio":null,"isFinal":true,"alignment":null}"#),
            ServerEvent::Final
        );
        assert_eq!(
            parse_server_message(r#"{"audio":"","is_final":true}"#),
            ServerEvent::Final
        );
        assert_eq!(
            parse_server_message(r#"{"audio":null,"isFinal":null}"#),
            ServerEvent::Other
        );
        let ServerEvent::Error(e) = parse_server_message(
            r#"{"message":"Have not received a new text input within the timeout of 20 seconds.","error":"input_timeout_exceeded","code":1008}"#,
        ) else {
            panic!("not an error")
        };
        assert!(
            e.contains("input_timeout_exceeded") && e.contains("20 seconds") && e.contains("1008"),
            "{e}"
        );
        assert!(matches!(
            parse_server_message("not json"),
            ServerEvent::Error(_)
        ));
        assert!(matches!(
            parse_server_message(r#"{"audio":"!!!"}"#),
            ServerEvent::Error(_)
        ));
    }

    #[test]
    fn error_bodies_parse_in_both_shapes() {
        let body = br#"{"detail":{"status":"quota_exceeded","message":"This request exceeds your quota of 10000."}}"#;
        let TtsError::Status { status, message } = parse_error_body(401, body) else {
            panic!()
        };
        assert_eq!(status, 401);
        assert_eq!(
            message,
            "quota_exceeded: This request exceeds your quota of 10000."
        );
        let body =
            br#"{"detail":[{"loc":["body","text"],"msg":"Field required","type":"missing"}]}"#;
        let TtsError::Status { status, message } = parse_error_body(422, body) else {
            panic!()
        };
        assert_eq!(
            (status, message.as_str()),
            (422, "body.text: Field required (missing)")
        );
        let TtsError::Status { message, .. } = parse_error_body(502, b"<html>Bad gateway</html>")
        else {
            panic!()
        };
        assert_eq!(message, "<html>Bad gateway</html>");
        let TtsError::Status { message, .. } = parse_error_body(500, b"") else {
            panic!()
        };
        assert_eq!(message, "no body");
    }

    #[test]
    fn http_batches_are_whole_sentences() {
        let mut b = SentenceBatcher::default();
        b.push("Harga dia 3.5 ringgit");
        assert_eq!(b.take_ready(false), None);
        b.push(". Boleh");
        assert_eq!(
            b.take_ready(false).as_deref(),
            Some("Harga dia 3.5 ringgit.")
        );
        b.push(" saya bantu? Ya");
        assert_eq!(b.take_ready(false).as_deref(), Some("Boleh saya bantu?"));
        assert_eq!(b.take_ready(false), None);
        assert_eq!(b.take_ready(true).as_deref(), Some("Ya"));
        assert_eq!(b.take_ready(true), None);
        b.push(&"kata ".repeat(80));
        let long = b.take_ready(false).unwrap();
        assert!(long.len() <= 400 && long.ends_with("kata"));
    }

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
    fn urls_and_config() {
        let mut s = settings(
            "https://api.elevenlabs.io/",
            TtsTransport::Websocket,
            OutputFormat::Ulaw8000,
        );
        s.voice_id = "voice 1".into();
        let el = client(&s, KEY);
        assert_eq!(
            el.websocket_url(OutputFormat::Ulaw8000).unwrap().as_str(),
            "wss://api.elevenlabs.io/v1/text-to-speech/voice%201/stream-input?model_id=eleven_flash_v2_5&output_format=ulaw_8000&language_code=ms"
        );
        s.model_id = "eleven_multilingual_v2".into();
        s.base_url = "http://127.0.0.1:9/prefix".into();
        let el = client(&s, KEY);
        assert_eq!(
            el.websocket_url(OutputFormat::Pcm8000).unwrap().as_str(),
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

    // --- websocket against the fake -----------------------------------------------------

    #[tokio::test]
    async fn websocket_streams_clauses_and_finishes() {
        let (srv, el) = start(fast(), TtsTransport::Websocket, OutputFormat::Ulaw8000, KEY).await;
        let first = "Selamat pagi, terima kasih kerana menelefon.";
        let second = "Ada apa yang boleh saya bantu?";
        let TtsStream { text, mut audio } = open_and_send(&el, 8_000, &[first], false).await;
        // The clause triggers generation: audio comes before the reply is finished.
        let Some(TtsOutput::Audio(head)) = recv(&mut audio).await else {
            panic!("expected audio first")
        };
        text.send(TtsInput::Text(second.into())).await.unwrap();
        text.send(TtsInput::Finish).await.unwrap();
        let (rest, chunks, end) = collect(&mut audio).await;
        assert_eq!(end, Some(TtsOutput::Done));
        assert!(chunks >= 2, "audio arrives in pieces, got {chunks}");
        let total = head.len() + rest.len();
        assert_eq!(total, speech_samples(&format!("{first} {second}"), 8_000));
        let mut pcm = head;
        pcm.extend(rest);
        // µ-law decoded into real speech-like audio, not silence.
        assert!(
            crate::audio::pcm::dbfs(&pcm) > -35.0,
            "level {}",
            crate::audio::pcm::dbfs(&pcm)
        );
        assert_eq!(srv.stats().connections(), 1);
        assert_eq!(srv.stats().texts_received(), 2);
        assert_eq!(
            srv.stats().characters_received(),
            first.len() + 1 + second.len() + 1
        );
        assert_eq!(recv(&mut audio).await, None, "nothing after Done");
    }

    #[tokio::test]
    async fn websocket_pcm_16000_for_a_wideband_call() {
        let (_srv, el) = start(fast(), TtsTransport::Websocket, OutputFormat::Ulaw8000, KEY).await;
        let text = "Baik, saya faham.";
        let pcm = synthesize_all(&el, params(16_000), text).await.unwrap();
        // One clause is one generation, so the fake's output is known sample for sample.
        assert_eq!(pcm, synthesize(&format!("{text} "), 16_000));
    }

    #[tokio::test]
    async fn websocket_alaw_decodes() {
        let (_srv, el) = start(fast(), TtsTransport::Websocket, OutputFormat::Alaw8000, KEY).await;
        let pcm = synthesize_all(&el, params(8_000), "Terima kasih.")
            .await
            .unwrap();
        assert_eq!(pcm.len(), speech_samples("Terima kasih.", 8_000));
        let reference = synthesize("Terima kasih. ", 8_000);
        // G.711 quantisation error is at most a few percent of the value.
        for (got, want) in pcm.iter().zip(&reference) {
            assert!(
                (i32::from(*got) - i32::from(*want)).abs()
                    <= i32::from(want.unsigned_abs() / 16) + 16
            );
        }
    }

    #[tokio::test]
    async fn websocket_bad_key_is_status_401() {
        let (srv, el) = start(
            fast(),
            TtsTransport::Websocket,
            OutputFormat::Ulaw8000,
            "wrong",
        )
        .await;
        match el.open(params(8_000)).await {
            Err(TtsError::Status {
                status: 401,
                message,
            }) => assert!(message.contains("invalid_api_key"), "{message}"),
            other => panic!("expected 401, got {other:?}"),
        }
        assert_eq!(srv.stats().connections(), 0);
    }

    #[tokio::test]
    async fn websocket_unexpected_close_fails() {
        let cfg = with_fault(TtsFault::CloseAfterChunks(2));
        let (_srv, el) = start(cfg, TtsTransport::Websocket, OutputFormat::Pcm8000, KEY).await;
        let mut stream = open_and_send(&el, 8_000, &[LONG], true).await;
        let (_, chunks, end) = collect(&mut stream.audio).await;
        assert_eq!(chunks, 2);
        let m = failure(end);
        assert!(m.contains("1011"), "{m}");
    }

    #[tokio::test]
    async fn websocket_stall_fails_by_deadline() {
        let srv = fake::spawn(with_fault(TtsFault::StallAfterChunks(1)))
            .await
            .unwrap();
        let mut s = settings(
            &srv.base_url(),
            TtsTransport::Websocket,
            OutputFormat::Pcm8000,
        );
        s.first_byte_timeout_ms = 300;
        let el = client(&s, KEY);
        let mut stream = open_and_send(&el, 8_000, &[LONG], true).await;
        let (_, chunks, end) = collect(&mut stream.audio).await;
        assert_eq!(chunks, 1);
        let m = failure(end);
        assert!(m.contains("no audio") && m.contains("300 ms"), "{m}");
    }

    #[tokio::test]
    async fn websocket_server_error_message_fails() {
        let cfg = with_fault(TtsFault::InputTimeoutSecs(1));
        let (_srv, el) = start(cfg, TtsTransport::Websocket, OutputFormat::Pcm8000, KEY).await;
        let TtsStream { text, mut audio } = open_and_send(&el, 8_000, &[], false).await;
        // Pre-connected but no text comes: the service gives up after its inactivity timeout.
        let m = failure(recv(&mut audio).await);
        assert!(m.contains("input_timeout_exceeded"), "{m}");
        drop(text);
    }

    #[tokio::test]
    async fn dropping_the_text_sender_cancels() {
        let cfg = FakeElevenLabsConfig {
            realtime_factor: 1.0,
            ..fast()
        };
        let (srv, el) = start(cfg, TtsTransport::Websocket, OutputFormat::Pcm8000, KEY).await;
        let TtsStream { text, mut audio } = open_and_send(&el, 8_000, &[LONG], false).await;
        assert!(matches!(recv(&mut audio).await, Some(TtsOutput::Audio(_))));
        drop(text);
        // The stream stops without Done or Failed...
        while let Some(out) = recv(&mut audio).await {
            assert!(matches!(out, TtsOutput::Audio(_)), "unexpected {out:?}");
        }
        // ...and the service sees the client go away.
        timeout(GUARD, async {
            while srv.stats().client_disconnects() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the fake never saw the close");
        assert_eq!(srv.stats().sessions_ended(), 1);
    }

    // --- HTTP against the fake ----------------------------------------------------------

    #[tokio::test]
    async fn http_posts_sentences_in_turn_and_streams() {
        let (srv, el) = start(fast(), TtsTransport::Http, OutputFormat::Pcm16000, KEY).await;
        let (a, b) = (
            "Selamat pagi, apa khabar?",
            "Saya boleh bantu anda hari ini.",
        );
        let mut stream = open_and_send(&el, 16_000, &[a, &format!(" {b}")], true).await;
        let (pcm, chunks, end) = collect(&mut stream.audio).await;
        assert_eq!(end, Some(TtsOutput::Done));
        assert!(chunks > 2);
        // The fake splits PCM bodies mid-sample; the decoder rejoins them exactly.
        let mut want = synthesize(a, 16_000);
        want.extend(synthesize(b, 16_000));
        assert_eq!(pcm, want);
        assert_eq!(srv.stats().http_requests(), 2);
    }

    #[tokio::test]
    async fn http_audio_arrives_before_the_body_is_complete() {
        // The body never completes, yet audio is delivered: it is streamed, not buffered.
        let cfg = with_fault(TtsFault::StallAfterChunks(2));
        let (_srv, el) = start(cfg, TtsTransport::Http, OutputFormat::Ulaw8000, KEY).await;
        let mut stream = open_and_send(&el, 8_000, &[LONG], true).await;
        for _ in 0..2 {
            match recv(&mut stream.audio).await {
                Some(TtsOutput::Audio(s)) => assert_eq!(s.len(), 800, "100 ms of µ-law per chunk"),
                other => panic!("expected audio, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn http_bad_key_fails_with_the_detail() {
        let (_srv, el) = start(fast(), TtsTransport::Http, OutputFormat::Ulaw8000, "wrong").await;
        match synthesize_all(&el, params(8_000), "Helo.").await {
            Err(TtsError::Transport(m)) => {
                assert!(
                    m.contains("401") && m.contains("invalid_api_key: Invalid API key"),
                    "{m}"
                )
            }
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn http_422_array_form_is_reported() {
        let cfg = with_fault(TtsFault::Status(422));
        let (_srv, el) = start(cfg, TtsTransport::Http, OutputFormat::Ulaw8000, KEY).await;
        let mut stream = open_and_send(&el, 8_000, &["Helo."], false).await;
        let m = failure(recv(&mut stream.audio).await);
        assert!(
            m.contains("422") && m.contains("body.text: Field required"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn http_dropped_body_fails() {
        let cfg = with_fault(TtsFault::CloseAfterChunks(1));
        let (_srv, el) = start(cfg, TtsTransport::Http, OutputFormat::Pcm8000, KEY).await;
        let err = synthesize_all(
            &el,
            params(8_000),
            "Selamat pagi, terima kasih kerana menelefon.",
        )
        .await;
        assert!(matches!(err, Err(TtsError::Transport(_))), "{err:?}");
    }

    #[tokio::test]
    async fn synthesize_all_over_http_returns_everything() {
        let (srv, el) = start(fast(), TtsTransport::Http, OutputFormat::Pcm8000, KEY).await;
        let greeting = "Selamat datang. Saya pembantu maya anda.";
        let pcm = synthesize_all(&el, params(8_000), greeting).await.unwrap();
        assert_eq!(pcm.len(), speech_samples(greeting, 8_000));
        assert_eq!(
            srv.stats().texts_received(),
            1,
            "one whole text, one request"
        );
    }
}
