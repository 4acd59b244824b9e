//! A fake ElevenLabs text-to-speech service speaking the real wire formats
//! (`docs/providers/elevenlabs.md`): the `stream-input` websocket and the HTTP `/stream` and
//! whole-file endpoints, with controllable latency, pacing and faults. It reads and writes
//! the messages with its own code (not the client's), and accepts the key only in the
//! `xi-api-key` header.
//!
//! The audio is synthesized deterministically from the text, so tests can predict its exact
//! length ([`speech_samples`]) and it is speech-like enough to drive a VAD: every letter is
//! 65 ms (vowels a voiced harmonic tone at ~140 Hz shaped by the vowel's formants, consonants
//! a noise burst from a fixed LCG), commas and the like are 150 ms pauses, sentence ends 300 ms,
//! whitespace takes no time (so chunking the text never changes the total).
//!
//! Formats: `pcm_8000|16000|22050|24000|32000|44100|48000` (s16le) and `ulaw_8000`/`alaw_8000`
//! (ITU G.711). MP3 and Opus are not implemented by the fake: they get a 422
//! `unsupported_output_format` error.
//!
//! Websocket audio messages carry `alignment`/`normalizedAlignment` (`chars`,
//! `charStartTimesMs`, `charDurationsMs`, relative to the message's audio) exact for the
//! synthesized audio. The fake records what each websocket client sent, for comparing our
//! client with the official SDK, and can enforce a plan's concurrency limit (429).

use std::collections::{HashMap, VecDeque};

use crate::audio::g711::{alaw_encode, ulaw_encode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::ws::{ServerSocket, Upgrade};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, sleep_until};

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum TtsFault {
    /// Behave.
    #[default]
    None,
    /// Answer every request (and websocket upgrade) with this HTTP status and the service's
    /// error JSON (`detail` object; the array form for 422).
    Status(u16),
    /// Stop sending after this many audio chunks, keeping the connection open.
    StallAfterChunks(usize),
    /// Drop the stream after this many audio chunks (websocket close 1011, HTTP body aborted).
    CloseAfterChunks(usize),
    /// Websocket inactivity timeout in seconds (default 20, as the real service): without text
    /// for that long, send `input_timeout_exceeded` and close with 1008.
    InputTimeoutSecs(u64),
    /// Serve the first `ok` requests (websocket upgrades and HTTP synthesis requests, in
    /// arrival order) normally, then inject `then` into every later one: a key revoked or a
    /// service degrading after the daemon cached its prompts at startup.
    AfterRequests {
        /// Healthy requests first.
        ok: usize,
        /// The fault after them.
        then: LaterTtsFault,
    },
}

/// The faults [`TtsFault::AfterRequests`] can switch to (the [`TtsFault`] variants of the same
/// names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaterTtsFault {
    /// [`TtsFault::Status`].
    Status(u16),
    /// [`TtsFault::StallAfterChunks`].
    StallAfterChunks(usize),
    /// [`TtsFault::CloseAfterChunks`].
    CloseAfterChunks(usize),
}

impl TtsFault {
    /// The fault of the request numbered `request` (from 0).
    fn for_request(self, request: usize) -> Self {
        match self {
            Self::AfterRequests { ok, .. } if request < ok => Self::None,
            Self::AfterRequests { then, .. } => match then {
                LaterTtsFault::Status(s) => Self::Status(s),
                LaterTtsFault::StallAfterChunks(n) => Self::StallAfterChunks(n),
                LaterTtsFault::CloseAfterChunks(n) => Self::CloseAfterChunks(n),
            },
            f => f,
        }
    }
}

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct FakeElevenLabsConfig {
    /// The accepted API key; `None` accepts any (or none).
    pub key: Option<String>,
    /// Model latency before the first audio of each generation, ms.
    pub first_byte_delay_ms: u64,
    /// Audio is produced at this multiple of real time (e.g. 2.0); 0 or less means at once.
    pub realtime_factor: f64,
    /// Audio per websocket message / HTTP chunk, ms.
    pub chunk_ms: u64,
    /// The fault to inject.
    pub fault: TtsFault,
    /// The plan's concurrency limit: a synthesis request (websocket or HTTP) arriving while
    /// this many are running gets 429 `too_many_concurrent_requests`; 0 means no limit.
    pub max_concurrent: usize,
}

impl Default for FakeElevenLabsConfig {
    fn default() -> Self {
        Self {
            key: None,
            first_byte_delay_ms: 75,
            realtime_factor: 4.0,
            chunk_ms: 100,
            fault: TtsFault::None,
            max_concurrent: 0,
        }
    }
}

/// What one websocket client sent: the upgrade's query and headers and every text message
/// (parsed as JSON, or as a JSON string when it was not JSON), for comparing clients.
#[derive(Debug, Clone, Default)]
pub struct RecordedWsSession {
    /// The query parameters of the upgrade.
    pub query: HashMap<String, String>,
    /// The upgrade request's headers.
    pub headers: HeaderMap,
    /// The client's text messages, in order.
    pub messages: Vec<Value>,
}

/// Counters the tests read.
#[derive(Debug, Default)]
pub struct FakeElevenLabsStats {
    connections: AtomicUsize,
    sessions_ended: AtomicUsize,
    client_disconnects: AtomicUsize,
    texts: AtomicUsize,
    characters: AtomicUsize,
    http_requests: AtomicUsize,
    output_formats: std::sync::Mutex<Vec<String>>,
    sessions: std::sync::Mutex<Vec<TtsSessionTimes>>,
    active: AtomicUsize,
    max_active: AtomicUsize,
    busy_rejections: AtomicUsize,
    recorded: std::sync::Mutex<Vec<RecordedWsSession>>,
    language_codes: std::sync::Mutex<Vec<String>>,
}

/// Wall-clock marks of one websocket session, for attributing latency in benchmarks.
#[derive(Debug, Clone)]
pub struct TtsSessionTimes {
    /// When the initialise message had been accepted.
    pub opened: std::time::Instant,
    /// Arrival of the first non-blank text.
    pub first_text_at: Option<std::time::Instant>,
    /// Arrival of the text that made the first generation.
    pub trigger_at: Option<std::time::Instant>,
    /// The text received up to and including that message.
    pub trigger_text: String,
    /// When the first audio message had been written to the socket.
    pub first_audio_at: Option<std::time::Instant>,
}

impl FakeElevenLabsStats {
    /// Websocket sessions accepted (after a successful upgrade).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    /// Websocket sessions that have ended, for any reason.
    pub fn sessions_ended(&self) -> usize {
        self.sessions_ended.load(Ordering::SeqCst)
    }
    /// Websocket sessions the client closed or dropped before the stream was complete.
    pub fn client_disconnects(&self) -> usize {
        self.client_disconnects.load(Ordering::SeqCst)
    }
    /// Text messages (websocket) or request bodies (HTTP) with non-blank text.
    pub fn texts_received(&self) -> usize {
        self.texts.load(Ordering::SeqCst)
    }
    /// Characters in those texts.
    pub fn characters_received(&self) -> usize {
        self.characters.load(Ordering::SeqCst)
    }
    /// HTTP synthesis requests (any outcome).
    pub fn http_requests(&self) -> usize {
        self.http_requests.load(Ordering::SeqCst)
    }
    /// The `output_format` of every request (websocket or HTTP, any outcome), in arrival
    /// order; empty when a request named none.
    pub fn output_formats(&self) -> Vec<String> {
        self.output_formats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The `language_code` of every synthesis request that got past its checks (the
    /// websocket upgrade's query, the HTTP body), in arrival order; empty when it named none.
    pub fn language_codes(&self) -> Vec<String> {
        self.language_codes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn record_language_code(&self, code: Option<&str>) {
        self.language_codes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(code.unwrap_or_default().to_owned());
    }

    /// Requests refused with 429 for the concurrency limit.
    pub fn busy_rejections(&self) -> usize {
        self.busy_rejections.load(Ordering::SeqCst)
    }

    /// The most synthesis requests that ran at once.
    pub fn max_concurrent_seen(&self) -> usize {
        self.max_active.load(Ordering::SeqCst)
    }

    /// What each websocket client sent (upgrades that were accepted), in arrival order.
    pub fn recorded_sessions(&self) -> Vec<RecordedWsSession> {
        self.recorded_lock().clone()
    }

    fn recorded_lock(&self) -> std::sync::MutexGuard<'_, Vec<RecordedWsSession>> {
        self.recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Timing marks of every websocket session, in the order they were initialised.
    pub fn session_times(&self) -> Vec<TtsSessionTimes> {
        self.sessions_lock().clone()
    }

    fn sessions_lock(&self) -> std::sync::MutexGuard<'_, Vec<TtsSessionTimes>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Updates session `i`'s marks.
    fn mark(&self, i: usize, f: impl FnOnce(&mut TtsSessionTimes)) {
        if let Some(t) = self.sessions_lock().get_mut(i) {
            f(t);
        }
    }

    fn count_text(&self, text: &str) {
        if !text.trim().is_empty() {
            self.texts.fetch_add(1, Ordering::SeqCst);
            self.characters
                .fetch_add(text.chars().count(), Ordering::SeqCst);
        }
    }
}

/// A running fake on 127.0.0.1; stops when dropped.
#[derive(Debug)]
pub struct FakeElevenLabs {
    addr: SocketAddr,
    stats: Arc<FakeElevenLabsStats>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeElevenLabs {
    /// `http://127.0.0.1:PORT`, to use as `tts.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The counters.
    pub fn stats(&self) -> &FakeElevenLabsStats {
        &self.stats
    }
}

impl Drop for FakeElevenLabs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the fake on an ephemeral port.
pub async fn spawn(cfg: FakeElevenLabsConfig) -> std::io::Result<FakeElevenLabs> {
    let (app, stats) = router_with_stats(cfg);
    let (addr, task) = super::spawn_on_loopback("fake ElevenLabs", app, || {}).await?;
    Ok(FakeElevenLabs { addr, stats, task })
}

/// The routes and their counters.
fn router_with_stats(cfg: FakeElevenLabsConfig) -> (Router, Arc<FakeElevenLabsStats>) {
    let stats = Arc::new(FakeElevenLabsStats::default());
    let app = Arc::new(App {
        cfg,
        stats: Arc::clone(&stats),
        requests: AtomicUsize::new(0),
    });
    let router = Router::new()
        .route(
            "/v1/text-to-speech/{voice_id}/stream-input",
            get(ws_handler),
        )
        .route("/v1/text-to-speech/{voice_id}/stream", post(stream_handler))
        .route("/v1/text-to-speech/{voice_id}", post(file_handler))
        .with_state(app);
    (router, stats)
}

struct App {
    cfg: FakeElevenLabsConfig,
    stats: Arc<FakeElevenLabsStats>,
    /// Websocket upgrades and HTTP synthesis requests so far.
    requests: AtomicUsize,
}

/// One running synthesis request, counted against the concurrency limit until dropped.
struct Slot(Arc<FakeElevenLabsStats>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl App {
    /// Takes a concurrency slot, or the 429 the real service answers past the plan's limit.
    fn take_slot(&self) -> Result<Slot, Reject> {
        let now = self.stats.active.fetch_add(1, Ordering::SeqCst) + 1;
        let slot = Slot(Arc::clone(&self.stats));
        if self.cfg.max_concurrent > 0 && now > self.cfg.max_concurrent {
            drop(slot);
            self.stats.busy_rejections.fetch_add(1, Ordering::SeqCst);
            return Err(detail(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_concurrent_requests",
                &format!(
                    "Too many concurrent requests for your subscription ({} allowed).",
                    self.cfg.max_concurrent
                ),
            ));
        }
        self.stats.max_active.fetch_max(now, Ordering::SeqCst);
        Ok(slot)
    }

    /// Counts a request, records its format and returns the fault to inject into it.
    fn begin_request(&self, query: &HashMap<String, String>) -> TtsFault {
        let format = query.get("output_format").cloned().unwrap_or_default();
        self.stats
            .output_formats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(format);
        let n = self.requests.fetch_add(1, Ordering::SeqCst);
        self.cfg.fault.for_request(n)
    }
}

// ---------------------------------------------------------------------------------------
// Synthesis.

/// How long a character sounds, ms.
fn char_ms(c: char) -> u64 {
    match c {
        c if c.is_whitespace() => 0,
        ',' | ';' | ':' => 150,
        '.' | '!' | '?' | '…' => 300,
        c if c.is_alphanumeric() => 65,
        _ => 0,
    }
}

fn samples_for_ms(ms: u64, rate: u32) -> usize {
    usize::try_from(u64::from(rate) * ms / 1000).unwrap_or(0)
}

/// Exactly how many samples [`synthesize`] produces for `text` at `rate`, however the text is
/// split into generations.
pub fn speech_samples(text: &str, rate: u32) -> usize {
    text.chars().map(|c| samples_for_ms(char_ms(c), rate)).sum()
}

/// Deterministic speech-like audio for `text` at `rate` Hz.
pub fn synthesize(text: &str, rate: u32) -> Vec<i16> {
    let mut out = Vec::with_capacity(speech_samples(text, rate));
    for (i, c) in text.chars().enumerate() {
        let n = samples_for_ms(char_ms(c), rate);
        if n == 0 {
            continue;
        }
        let lower = c.to_lowercase().next().unwrap_or(c);
        if !lower.is_alphanumeric() {
            out.extend(std::iter::repeat_n(0, n));
        } else if let Some(formants) = vowel_formants(lower) {
            voiced(&mut out, n, rate, i, formants);
        } else {
            consonant(&mut out, n, rate, i, lower);
        }
    }
    out
}

fn vowel_formants(c: char) -> Option<(f64, f64)> {
    Some(match c {
        'a' | 'à' | 'á' | 'â' | 'ä' => (730.0, 1090.0),
        'e' | 'è' | 'é' | 'ê' | 'ë' => (530.0, 1840.0),
        'i' | 'y' | 'ì' | 'í' | 'î' | 'ï' => (270.0, 2290.0),
        'o' | 'ò' | 'ó' | 'ô' | 'ö' | '0'..='9' => (570.0, 840.0),
        'u' | 'ù' | 'ú' | 'û' | 'ü' => (300.0, 870.0),
        c if !c.is_ascii() => (730.0, 1090.0),
        _ => return None,
    })
}

/// A raised-cosine attack and release of `ramp` samples.
fn envelope(j: usize, n: usize, ramp: usize) -> f64 {
    let ramp = ramp.max(1).min(n / 2).max(1);
    let edge = j.min(n.saturating_sub(1 + j));
    if edge >= ramp {
        1.0
    } else {
        0.5 - 0.5 * (std::f64::consts::PI * edge as f64 / ramp as f64).cos()
    }
}

fn voiced(out: &mut Vec<i16>, n: usize, rate: u32, index: usize, (f1, f2): (f64, f64)) {
    // A little intonation so consecutive vowels differ.
    let f0 = 128.0 + 6.0 * (index % 5) as f64;
    let nyquist = f64::from(rate) / 2.0 - 200.0;
    let harmonics: Vec<(f64, f64)> = (1..=12)
        .map(|k| f0 * f64::from(k))
        .filter(|&f| f < nyquist)
        .map(|f| {
            let w = (-((f - f1) / 180.0).powi(2)).exp() + 0.6 * (-((f - f2) / 220.0).powi(2)).exp();
            (f, 0.15 * f0 / f + w)
        })
        .collect();
    let norm: f64 = harmonics.iter().map(|(_, a)| a).sum::<f64>().max(1e-9);
    let ramp = samples_for_ms(10, rate);
    for j in 0..n {
        let t = j as f64 / f64::from(rate);
        let s: f64 = harmonics
            .iter()
            .map(|&(f, a)| a * (std::f64::consts::TAU * f * t).sin())
            .sum();
        out.push((9000.0 * envelope(j, n, ramp) * s / norm) as i16);
    }
}

fn consonant(out: &mut Vec<i16>, n: usize, rate: u32, index: usize, c: char) {
    let voiced = matches!(
        c,
        'b' | 'd' | 'g' | 'j' | 'l' | 'm' | 'n' | 'r' | 'v' | 'w' | 'z'
    );
    let burst = samples_for_ms(35, rate).min(n);
    let ramp = samples_for_ms(5, rate);
    let mut lcg = Lcg::new((index as u64) << 8 | u64::from(u32::from(c)));
    let mut low = 0.0;
    for j in 0..n {
        let noise = lcg.next_f64();
        let s = if j < burst {
            // Voiced consonants: a darker (low-passed) burst over a hum at the fundamental.
            if voiced {
                low += 0.25 * (noise - low);
                let hum = (std::f64::consts::TAU * 130.0 * j as f64 / f64::from(rate)).sin();
                4000.0 * envelope(j, burst, ramp) * (0.6 * hum + 0.8 * low)
            } else {
                3500.0 * envelope(j, burst, ramp) * noise
            }
        } else {
            0.0
        };
        out.push(s as i16);
    }
}

/// Knuth's MMIX LCG: the same "noise" on every run.
struct Lcg(u64);

impl Lcg {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
}

/// Per-character timings, the shape of `normalizedAlignment`.
fn char_timings(text: &str) -> Vec<(char, u64, u64)> {
    let mut t = 0;
    text.chars()
        .map(|c| {
            let d = char_ms(c);
            let start = t;
            t += d;
            (c, start, d)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Formats, keys and errors.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Pcm(u32),
    Ulaw,
    Alaw,
}

impl Format {
    fn rate(self) -> u32 {
        match self {
            Self::Pcm(r) => r,
            Self::Ulaw | Self::Alaw => 8_000,
        }
    }
    fn bytes_per_sample(self) -> usize {
        match self {
            Self::Pcm(_) => 2,
            Self::Ulaw | Self::Alaw => 1,
        }
    }
    fn encode(self, samples: &[i16]) -> Vec<u8> {
        match self {
            Self::Pcm(_) => samples.iter().flat_map(|s| s.to_le_bytes()).collect(),
            Self::Ulaw => samples.iter().map(|&s| ulaw_encode(s)).collect(),
            Self::Alaw => samples.iter().map(|&s| alaw_encode(s)).collect(),
        }
    }
}

const MP3_OPUS: [&str; 12] = [
    "mp3_22050_32",
    "mp3_24000_48",
    "mp3_44100_32",
    "mp3_44100_64",
    "mp3_44100_96",
    "mp3_44100_128",
    "mp3_44100_192",
    "opus_48000_32",
    "opus_48000_64",
    "opus_48000_96",
    "opus_48000_128",
    "opus_48000_192",
];

const MODELS: [&str; 9] = [
    "eleven_flash_v2_5",
    "eleven_turbo_v2_5",
    "eleven_multilingual_v2",
    "eleven_flash_v2",
    "eleven_turbo_v2",
    "eleven_v3",
    "eleven_monolingual_v1",
    "eleven_multilingual_v1",
    "eleven_english_sts_v2",
];

/// An error response, boxed so `Result`s stay small.
type Reject = Box<Response>;

fn detail(status: StatusCode, code: &str, message: &str) -> Reject {
    Box::new(
        (
            status,
            axum::Json(json!({"detail": {"status": code, "message": message}})),
        )
            .into_response(),
    )
}

fn validation(loc: [&str; 2], msg: &str, kind: &str) -> Reject {
    let body = json!({"detail": [{"loc": loc, "msg": msg, "type": kind}]});
    Box::new((StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response())
}

fn parse_format(value: Option<&str>) -> Result<Format, Reject> {
    // The real default is mp3_44100_128, which the fake cannot produce.
    let v = value.unwrap_or("mp3_44100_128");
    match v {
        "ulaw_8000" => Ok(Format::Ulaw),
        "alaw_8000" => Ok(Format::Alaw),
        "pcm_8000" => Ok(Format::Pcm(8_000)),
        "pcm_16000" => Ok(Format::Pcm(16_000)),
        "pcm_22050" => Ok(Format::Pcm(22_050)),
        "pcm_24000" => Ok(Format::Pcm(24_000)),
        "pcm_32000" => Ok(Format::Pcm(32_000)),
        "pcm_44100" => Ok(Format::Pcm(44_100)),
        "pcm_48000" => Ok(Format::Pcm(48_000)),
        v if MP3_OPUS.contains(&v) => Err(detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsupported_output_format",
            &format!(
                "The fake ElevenLabs server does not encode {v}; use pcm_* or ulaw_8000/alaw_8000."
            ),
        )),
        v => Err(validation(
            ["query", "output_format"],
            &format!("Input should be a valid output format, got {v:?}"),
            "enum",
        )),
    }
}

fn check_model(model: Option<&str>) -> Result<(), Reject> {
    match model {
        None => Ok(()),
        Some(m) if MODELS.contains(&m) => Ok(()),
        Some(m) => Err(detail(
            StatusCode::BAD_REQUEST,
            "model_not_found",
            &format!("A model with model ID {m} does not exist."),
        )),
    }
}

fn key_ok(cfg: &FakeElevenLabsConfig, provided: Option<&str>) -> bool {
    cfg.key.as_deref().is_none_or(|k| provided == Some(k))
}

fn unauthorized(provided: bool) -> Reject {
    let message = if provided {
        "Invalid API key"
    } else {
        "Missing API key (xi-api-key)"
    };
    detail(StatusCode::UNAUTHORIZED, "invalid_api_key", message)
}

fn fault_response(status: u16) -> Reject {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (name, message) = match status {
        401 => (
            "quota_exceeded",
            "This request exceeds your quota of 10000. You have 0 credits remaining.",
        ),
        403 => (
            "only_for_creator+",
            "This feature is only available for Creator tier and above.",
        ),
        404 => (
            "voice_not_found",
            "A voice with the voice_id was not found.",
        ),
        422 => return validation(["body", "text"], "Field required", "missing"),
        429 => (
            "too_many_concurrent_requests",
            "Too many concurrent requests for your subscription.",
        ),
        503 => (
            "system_busy",
            "Our services are experiencing high levels of traffic.",
        ),
        _ => ("fault_injected", "Injected fault."),
    };
    detail(code, name, message)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------------------
// HTTP.

#[derive(Debug, Deserialize)]
struct HttpRequestBody {
    text: Option<String>,
    model_id: Option<String>,
    language_code: Option<String>,
}

/// Shared checks of both HTTP endpoints; the audio bytes and the fault to inject, or the
/// error response.
fn http_audio(
    app: &App,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Format, String, Vec<u8>, TtsFault, Slot), Reject> {
    app.stats.http_requests.fetch_add(1, Ordering::SeqCst);
    let fault = app.begin_request(query);
    let slot = app.take_slot()?;
    if let TtsFault::Status(s) = fault {
        return Err(fault_response(s));
    }
    let key = header_str(headers, "xi-api-key");
    if !key_ok(&app.cfg, key) {
        return Err(unauthorized(key.is_some()));
    }
    let format = parse_format(query.get("output_format").map(String::as_str))?;
    let req: HttpRequestBody = serde_json::from_slice(body).map_err(|e| {
        validation(
            ["body", "0"],
            &format!("JSON decode error: {e}"),
            "json_invalid",
        )
    })?;
    check_model(req.model_id.as_deref())?;
    let Some(text) = req.text else {
        return Err(validation(["body", "text"], "Field required", "missing"));
    };
    app.stats.record_language_code(req.language_code.as_deref());
    app.stats.count_text(&text);
    let bytes = format.encode(&synthesize(&text, format.rate()));
    Ok((format, text, bytes, fault, slot))
}

fn audio_headers(text: &str) -> [(header::HeaderName, String); 3] {
    [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (
            header::HeaderName::from_static("character-cost"),
            text.chars().count().to_string(),
        ),
        (
            header::HeaderName::from_static("request-id"),
            uuid::Uuid::new_v4().simple().to_string(),
        ),
    ]
}

fn pace(cfg: &FakeElevenLabsConfig, audio_ms: u64) -> Duration {
    if cfg.realtime_factor > 0.0 {
        Duration::from_secs_f64(audio_ms as f64 / 1000.0 / cfg.realtime_factor)
    } else {
        Duration::ZERO
    }
}

async fn stream_handler(
    State(app): State<Arc<App>>,
    Path(_voice_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (format, text, bytes, fault, slot) = match http_audio(&app, &query, &headers, &body) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let chunk_bytes =
        (samples_for_ms(app.cfg.chunk_ms, format.rate()) * format.bytes_per_sample()).max(2);
    // Real chunk boundaries are arbitrary: for PCM the first chunk carries one extra byte, so
    // every later boundary splits a sample.
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut rest = Bytes::from(bytes);
    let mut first = true;
    while !rest.is_empty() {
        let extra = usize::from(first && format.bytes_per_sample() == 2);
        first = false;
        let take = (chunk_bytes + extra).min(rest.len());
        chunks.push_back(rest.split_to(take));
    }
    let cfg = app.cfg.clone();
    let step = pace(&cfg, cfg.chunk_ms);
    let stream = futures_util::stream::unfold((chunks, 0usize), move |(mut chunks, sent)| {
        let cfg = cfg.clone();
        // The request counts against the limit until its body is done (or dropped).
        let _slot = &slot;
        async move {
            match fault {
                TtsFault::StallAfterChunks(n) if sent >= n => std::future::pending::<()>().await,
                TtsFault::CloseAfterChunks(n) if sent >= n => {
                    return Some((
                        Err(std::io::Error::other("fault: connection dropped")),
                        (chunks, sent),
                    ));
                }
                _ => {}
            }
            let chunk = chunks.pop_front()?;
            sleep(if sent == 0 {
                Duration::from_millis(cfg.first_byte_delay_ms)
            } else {
                step
            })
            .await;
            Some((Ok::<_, std::io::Error>(chunk), (chunks, sent + 1)))
        }
    });
    (audio_headers(&text), Body::from_stream(stream)).into_response()
}

async fn file_handler(
    State(app): State<Arc<App>>,
    Path(_voice_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match http_audio(&app, &query, &headers, &body) {
        Ok((_, text, bytes, _, _slot)) => {
            sleep(Duration::from_millis(app.cfg.first_byte_delay_ms)).await;
            (audio_headers(&text), bytes).into_response()
        }
        Err(resp) => *resp,
    }
}

// ---------------------------------------------------------------------------------------
// Websocket.

/// Default `chunk_length_schedule`.
const DEFAULT_SCHEDULE: [usize; 4] = [120, 160, 250, 290];
/// `try_trigger_generation` only works above this many buffered characters.
const TRIGGER_MIN_CHARS: usize = 10;
const DEFAULT_INACTIVITY_SECS: u64 = 20;

async fn ws_handler(
    State(app): State<Arc<App>>,
    Path(_voice_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: Upgrade,
) -> Response {
    let fault = app.begin_request(&query);
    if let TtsFault::Status(s) = fault {
        return *fault_response(s);
    }
    let format = match parse_format(query.get("output_format").map(String::as_str)) {
        Ok(f) => f,
        Err(resp) => return *resp,
    };
    if let Err(resp) = check_model(query.get("model_id").map(String::as_str)) {
        return *resp;
    }
    // Only the upgrade header counts: the real service also takes a key in the first message,
    // but a key in a body or URL ends up in logs, so the fake refuses those (below).
    let key = header_str(&headers, "xi-api-key");
    if !key_ok(&app.cfg, key) {
        return *unauthorized(key.is_some());
    }
    let slot = match app.take_slot() {
        Ok(s) => s,
        Err(resp) => return *resp,
    };
    app.stats
        .record_language_code(query.get("language_code").map(String::as_str));
    let recorded = {
        let mut r = app.stats.recorded_lock();
        r.push(RecordedWsSession {
            query: query.clone(),
            headers: headers.clone(),
            messages: Vec::new(),
        });
        r.len() - 1
    };
    let inactivity = match fault {
        TtsFault::InputTimeoutSecs(s) => s,
        _ => query
            .get("inactivity_timeout")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(DEFAULT_INACTIVITY_SECS, |v| v.clamp(1, 180)),
    };
    let session = WsSession {
        app: Arc::clone(&app),
        format,
        inactivity: Duration::from_secs(inactivity),
        fault,
        recorded,
    };
    ws.on_upgrade(move |socket| async move {
        let _slot = slot;
        session.run(socket).await;
    })
}

struct WsSession {
    app: Arc<App>,
    format: Format,
    inactivity: Duration,
    /// This session's fault.
    fault: TtsFault,
    /// Its index in the recorded sessions.
    recorded: usize,
}

#[derive(Debug, PartialEq)]
enum SessionEnd {
    Completed,
    ClientGone,
    ServerClosed,
}

#[derive(Deserialize)]
struct ClientMessage {
    text: Option<String>,
    #[serde(default)]
    flush: bool,
    #[serde(default)]
    try_trigger_generation: bool,
    generation_config: Option<GenerationConfig>,
    xi_api_key: Option<String>,
    #[serde(rename = "xi-api-key")]
    xi_api_key_dashed: Option<String>,
}

#[derive(Deserialize)]
struct GenerationConfig {
    chunk_length_schedule: Option<Vec<usize>>,
}

/// The socket's state: buffered text and audio messages waiting to be sent.
struct Generator {
    format: Format,
    chunk_ms: u64,
    buffer: String,
    schedule: Vec<usize>,
    schedule_index: usize,
    pending: VecDeque<String>,
}

impl Generator {
    /// Generates audio for `text` as ready-to-send messages of `chunk_ms` each.
    fn generate(&mut self, text: &str) {
        let rate = self.format.rate();
        let samples = synthesize(text, rate);
        if samples.is_empty() {
            return;
        }
        let timings = char_timings(text);
        let per_chunk = samples_for_ms(self.chunk_ms, rate).max(1);
        let chunks = samples.len().div_ceil(per_chunk);
        for (k, chunk) in samples.chunks(per_chunk).enumerate() {
            // Times in each message are relative to that message's audio, as the service
            // sends them; a character belongs to the message its start falls in (trailing
            // zero-length spaces to the last one).
            let start_ms = k as u64 * self.chunk_ms;
            let end_ms = start_ms + self.chunk_ms;
            let last = k + 1 == chunks;
            let in_chunk: Vec<&(char, u64, u64)> = timings
                .iter()
                .filter(|(_, s, _)| *s >= start_ms && (*s < end_ms || last))
                .collect();
            let alignment = if in_chunk.is_empty() {
                Value::Null
            } else {
                json!({
                    "chars": in_chunk.iter().map(|(c, _, _)| c.to_string()).collect::<Vec<_>>(),
                    "charStartTimesMs": in_chunk.iter().map(|(_, s, _)| s - start_ms).collect::<Vec<_>>(),
                    "charDurationsMs": in_chunk.iter().map(|(_, _, d)| *d).collect::<Vec<_>>(),
                })
            };
            let audio = base64::engine::general_purpose::STANDARD.encode(self.format.encode(chunk));
            self.pending.push_back(
                json!({"audio": audio, "isFinal": null, "normalizedAlignment": alignment, "alignment": alignment})
                    .to_string(),
            );
        }
    }

    /// Takes the buffer up to its last whitespace (all of it with `all`).
    fn take_buffer(&mut self, all: bool) -> String {
        let cut = if all || self.buffer.ends_with(char::is_whitespace) {
            self.buffer.len()
        } else {
            self.buffer.rfind(char::is_whitespace).unwrap_or(0)
        };
        self.buffer.drain(..cut).collect()
    }

    /// Adds text and generates whatever it triggers.
    fn on_text(&mut self, text: &str, flush: bool, try_trigger: bool) {
        self.buffer.push_str(text);
        let buffered = self.buffer.trim().chars().count();
        if flush {
            let t = self.take_buffer(true);
            self.generate(&t);
        } else if try_trigger && buffered >= TRIGGER_MIN_CHARS {
            let t = self.take_buffer(false);
            self.generate(&t);
        } else if let Some(&threshold) = self.schedule.get(self.schedule_index)
            && buffered >= threshold
        {
            {
                let t = self.take_buffer(false);
                self.generate(&t);
                self.schedule_index =
                    (self.schedule_index + 1).min(self.schedule.len().saturating_sub(1));
            }
        }
    }
}

fn error_message(error: &str, message: &str) -> Message {
    Message::Text(
        json!({"message": message, "error": error, "code": 1008})
            .to_string()
            .into(),
    )
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.into(),
        reason: reason.to_owned().into(),
    }))
}

impl WsSession {
    async fn run(self, socket: ServerSocket) {
        let stats = Arc::clone(&self.app.stats);
        stats.connections.fetch_add(1, Ordering::SeqCst);
        let end = self.serve(socket).await;
        if end == SessionEnd::ClientGone {
            stats.client_disconnects.fetch_add(1, Ordering::SeqCst);
        }
        stats.sessions_ended.fetch_add(1, Ordering::SeqCst);
    }

    async fn fail(socket: &mut ServerSocket, error: &str, message: &str) -> SessionEnd {
        let _ = socket.send(error_message(error, message)).await;
        let _ = socket.send(close(1008, error)).await;
        SessionEnd::ServerClosed
    }

    async fn serve(self, mut socket: ServerSocket) -> SessionEnd {
        let cfg = &self.app.cfg;
        // The initialise message.
        let first = match tokio::time::timeout(self.inactivity, socket.next()).await {
            Err(_) => {
                return Self::fail(&mut socket, "input_timeout_exceeded", &self.timeout_text())
                    .await;
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                self.record(t.as_str());
                t
            }
            Ok(Some(Ok(_))) => {
                return Self::fail(
                    &mut socket,
                    "invalid_input_message",
                    "Expected a JSON text message.",
                )
                .await;
            }
            Ok(_) => return SessionEnd::ClientGone,
        };
        let init: ClientMessage = match serde_json::from_str(first.as_str()) {
            Ok(m) => m,
            Err(e) => {
                return Self::fail(
                    &mut socket,
                    "invalid_input_message",
                    &format!("Invalid JSON: {e}"),
                )
                .await;
            }
        };
        if init.xi_api_key.is_some() || init.xi_api_key_dashed.is_some() {
            return Self::fail(
                &mut socket,
                "invalid_input_message",
                "This fake refuses an API key in a message: send it as the xi-api-key header.",
            )
            .await;
        }
        if init.text.as_deref() != Some(" ") {
            return Self::fail(
                &mut socket,
                "invalid_input_message",
                "The first message must have \"text\" set to a single space.",
            )
            .await;
        }
        let schedule = match init.generation_config.and_then(|g| g.chunk_length_schedule) {
            Some(s) if s.is_empty() || s.iter().any(|v| !(50..=500).contains(v)) => {
                return Self::fail(
                    &mut socket,
                    "invalid_input_message",
                    "chunk_length_schedule items must be between 50 and 500.",
                )
                .await;
            }
            Some(s) => s,
            None => DEFAULT_SCHEDULE.to_vec(),
        };

        let mut generator = Generator {
            format: self.format,
            chunk_ms: cfg.chunk_ms.max(1),
            buffer: String::new(),
            schedule,
            schedule_index: 0,
            pending: VecDeque::new(),
        };
        let session = {
            let mut s = self.app.stats.sessions_lock();
            s.push(TtsSessionTimes {
                opened: std::time::Instant::now(),
                first_text_at: None,
                trigger_at: None,
                trigger_text: String::new(),
                first_audio_at: None,
            });
            s.len() - 1
        };
        let mut triggered = false;
        let step = pace(cfg, cfg.chunk_ms);
        let mut closing = false;
        let mut stalled = false;
        let mut sent = 0usize;
        let mut last_input = Instant::now();
        let mut next_send = Instant::now();
        loop {
            let idle = generator.pending.is_empty() && !closing;
            tokio::select! {
                msg = socket.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => {
                            self.record(t.as_str());
                            t
                        }
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return SessionEnd::ClientGone,
                        Some(Ok(_)) => continue,
                    };
                    let m: ClientMessage = match serde_json::from_str(text.as_str()) {
                        Ok(m) => m,
                        Err(e) => {
                            return Self::fail(&mut socket, "invalid_input_message", &format!("Invalid JSON: {e}")).await;
                        }
                    };
                    let Some(text) = m.text else {
                        return Self::fail(&mut socket, "invalid_input_message", "Field \"text\" is required.").await;
                    };
                    last_input = Instant::now();
                    if closing {
                        continue;
                    }
                    let arrived = std::time::Instant::now();
                    if !triggered {
                        self.app.stats.mark(session, |t| {
                            if t.first_text_at.is_none() && !text.trim().is_empty() {
                                t.first_text_at = Some(arrived);
                            }
                            t.trigger_text.push_str(&text);
                        });
                    }
                    let was_empty = generator.pending.is_empty();
                    if text.is_empty() {
                        closing = true;
                        let rest = generator.take_buffer(true);
                        generator.generate(&rest);
                    } else {
                        self.app.stats.count_text(&text);
                        generator.on_text(&text, m.flush, m.try_trigger_generation);
                    }
                    if !triggered && !generator.pending.is_empty() {
                        triggered = true;
                        self.app.stats.mark(session, |t| t.trigger_at = Some(arrived));
                    }
                    if was_empty && !generator.pending.is_empty() {
                        next_send = next_send.max(Instant::now() + Duration::from_millis(cfg.first_byte_delay_ms));
                    }
                    if closing && generator.pending.is_empty() {
                        return Self::finish(&mut socket).await;
                    }
                }
                () = sleep_until(next_send), if !generator.pending.is_empty() && !stalled => {
                    let Some(msg) = generator.pending.pop_front() else { continue };
                    if socket.send(Message::Text(msg.into())).await.is_err() {
                        return SessionEnd::ClientGone;
                    }
                    sent += 1;
                    if sent == 1 {
                        let now = std::time::Instant::now();
                        self.app.stats.mark(session, |t| t.first_audio_at = Some(now));
                    }
                    next_send = Instant::now() + step;
                    match self.fault {
                        TtsFault::CloseAfterChunks(n) if sent >= n => {
                            let _ = socket.send(close(1011, "fault injected")).await;
                            return SessionEnd::ServerClosed;
                        }
                        TtsFault::StallAfterChunks(n) if sent >= n => stalled = true,
                        _ => {}
                    }
                    if closing && generator.pending.is_empty() {
                        return Self::finish(&mut socket).await;
                    }
                }
                () = sleep_until(last_input + self.inactivity), if idle => {
                    return Self::fail(&mut socket, "input_timeout_exceeded", &self.timeout_text()).await;
                }
            }
        }
    }

    fn record(&self, text: &str) {
        let v = serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()));
        if let Some(r) = self.app.stats.recorded_lock().get_mut(self.recorded) {
            r.messages.push(v);
        }
    }

    fn timeout_text(&self) -> String {
        format!(
            "Have not received a new text input within the timeout of {} seconds. Streaming input terminated. Please make sure to send text before the timeout expires.",
            self.inactivity.as_secs()
        )
    }

    async fn finish(socket: &mut ServerSocket) -> SessionEnd {
        let _ = socket
            .send(Message::Text(json!({"isFinal": true}).to_string().into()))
            .await;
        let _ = socket.send(close(1000, "")).await;
        SessionEnd::Completed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio_tungstenite::tungstenite::Message as WsMessage;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    const GUARD: Duration = Duration::from_secs(30);

    fn cfg() -> FakeElevenLabsConfig {
        FakeElevenLabsConfig {
            key: Some("k".into()),
            first_byte_delay_ms: 1,
            realtime_factor: 0.0,
            chunk_ms: 100,
            fault: TtsFault::None,
            max_concurrent: 0,
        }
    }

    async fn connect(srv: &FakeElevenLabs, query: &str) -> Client {
        connect_with_key(srv, query, Some("k")).await.unwrap()
    }

    /// Opens the websocket with `key` in the `xi-api-key` header; the refusal's status if any.
    async fn connect_with_key(
        srv: &FakeElevenLabs,
        query: &str,
        key: Option<&str>,
    ) -> Result<Client, u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let url = format!(
            "ws://{}/v1/text-to-speech/v/stream-input?model_id=eleven_flash_v2_5&{query}",
            srv.addr()
        );
        let mut req = url.into_client_request().unwrap();
        if let Some(k) = key {
            req.headers_mut().insert("xi-api-key", k.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
            Err(e) => panic!("{e}"),
        }
    }

    /// Every frame until the server closes: texts as JSON, then the close code.
    async fn drain(ws: &mut Client) -> (Vec<Value>, Option<CloseCode>) {
        let mut texts = Vec::new();
        loop {
            match tokio::time::timeout(GUARD, ws.next())
                .await
                .expect("hang guard")
            {
                Some(Ok(WsMessage::Text(t))) => {
                    texts.push(serde_json::from_str(t.as_str()).unwrap())
                }
                Some(Ok(WsMessage::Close(f))) => return (texts, f.map(|f| f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return (texts, None),
            }
        }
    }

    async fn send(ws: &mut Client, v: Value) {
        use futures_util::SinkExt as _;
        ws.send(WsMessage::text(v.to_string())).await.unwrap();
    }

    #[tokio::test]
    async fn websocket_key_in_header_and_full_exchange() {
        let srv = spawn(cfg()).await.unwrap();
        let mut ws = connect(&srv, "output_format=pcm_16000").await;
        send(&mut ws, json!({"text": " "})).await;
        send(
            &mut ws,
            json!({"text": "Hi there, friend. ", "flush": true}),
        )
        .await;
        send(&mut ws, json!({"text": ""})).await;
        let (texts, close) = drain(&mut ws).await;
        assert_eq!(close, Some(CloseCode::Normal));
        let (last, audio) = texts.split_last().unwrap();
        assert_eq!(last, &json!({"isFinal": true}));
        let mut pcm = Vec::new();
        for m in audio {
            assert!(m["isFinal"].is_null());
            assert!(m.get("alignment").is_some() && m.get("normalizedAlignment").is_some());
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(m["audio"].as_str().unwrap())
                .unwrap();
            pcm.extend(crate::audio::pcm::le_bytes_to_samples(&bytes));
        }
        assert_eq!(pcm, synthesize("Hi there, friend. ", 16_000));
        assert_eq!(audio[0]["normalizedAlignment"]["chars"][0], "H");
        assert_eq!(srv.stats().characters_received(), 18);
        assert_eq!(srv.stats().client_disconnects(), 0);
    }

    #[tokio::test]
    async fn websocket_rejects_bad_keys_and_bad_first_messages() {
        let srv = spawn(cfg()).await.unwrap();
        let q = "output_format=ulaw_8000";
        assert_eq!(
            connect_with_key(&srv, q, Some("wrong")).await.err(),
            Some(401)
        );
        assert_eq!(connect_with_key(&srv, q, None).await.err(), Some(401));
        // A key in the URL does not count.
        let q_key = "output_format=ulaw_8000&xi_api_key=k&authorization=Bearer%20k";
        assert_eq!(connect_with_key(&srv, q_key, None).await.err(), Some(401));

        // A key in the first message is refused, even the right one.
        for field in ["xi_api_key", "xi-api-key"] {
            let mut ws = connect(&srv, q).await;
            send(&mut ws, json!({"text": " ", field: "k"})).await;
            let (texts, close) = drain(&mut ws).await;
            assert_eq!(texts[0]["error"], "invalid_input_message", "{field}");
            assert_eq!(close, Some(CloseCode::Policy));
        }

        let mut ws = connect(&srv, q).await;
        send(&mut ws, json!({"text": "Hello "})).await;
        let (texts, close) = drain(&mut ws).await;
        assert_eq!(texts[0]["error"], "invalid_input_message");
        assert_eq!(texts[0]["code"], 1008);
        assert_eq!(close, Some(CloseCode::Policy));

        let url = format!(
            "ws://{}/v1/text-to-speech/v/stream-input?output_format=mp3_44100_128",
            srv.addr()
        );
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 422),
            other => panic!("expected 422, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn late_faults_spare_the_first_requests() {
        let srv = spawn(FakeElevenLabsConfig {
            fault: TtsFault::AfterRequests {
                ok: 2,
                then: LaterTtsFault::Status(401),
            },
            ..cfg()
        })
        .await
        .unwrap();
        let http = reqwest::Client::new();
        let url = format!(
            "{}/v1/text-to-speech/v?output_format=pcm_16000",
            srv.base_url()
        );
        let body = json!({"text": "Apa khabar?", "model_id": "eleven_flash_v2_5"});
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let r = http
                .post(&url)
                .header("xi-api-key", "k")
                .json(&body)
                .send()
                .await
                .unwrap();
            statuses.push(r.status().as_u16());
        }
        // The third request is a websocket upgrade: refused too.
        let ws_url = format!(
            "ws://{}/v1/text-to-speech/v/stream-input?output_format=ulaw_8000",
            srv.addr()
        );
        match tokio_tungstenite::connect_async(ws_url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                statuses.push(r.status().as_u16())
            }
            other => panic!("expected 401, got {:?}", other.map(|_| ())),
        }
        assert_eq!(statuses, [200, 200, 401]);
        assert_eq!(
            srv.stats().output_formats(),
            ["pcm_16000", "pcm_16000", "ulaw_8000"]
        );
        assert_eq!(
            TtsFault::AfterRequests {
                ok: 1,
                then: LaterTtsFault::CloseAfterChunks(3)
            }
            .for_request(1),
            TtsFault::CloseAfterChunks(3)
        );
    }

    #[tokio::test]
    async fn records_the_language_code_of_each_request() {
        let srv = spawn(cfg()).await.unwrap();
        for query in [
            "output_format=pcm_8000&language_code=ms",
            "output_format=pcm_8000",
        ] {
            let mut ws = connect(&srv, query).await;
            send(&mut ws, json!({"text": " "})).await;
            send(&mut ws, json!({"text": ""})).await;
            drain(&mut ws).await;
        }
        let r = reqwest::Client::new()
            .post(format!(
                "{}/v1/text-to-speech/v/stream?output_format=pcm_8000",
                srv.base_url()
            ))
            .header("xi-api-key", "k")
            .json(&json!({"text": "How much?", "model_id": "eleven_flash_v2_5", "language_code": "en"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        assert_eq!(srv.stats().language_codes(), ["ms", "", "en"]);
    }

    #[tokio::test]
    async fn http_whole_file_and_errors() {
        let srv = spawn(cfg()).await.unwrap();
        let http = reqwest::Client::new();
        let url = |leaf: &str, fmt: &str| {
            format!(
                "{}/v1/text-to-speech/v{leaf}?output_format={fmt}",
                srv.base_url()
            )
        };
        let body = json!({"text": "Apa khabar?", "model_id": "eleven_flash_v2_5"});
        let r = http
            .post(url("", "pcm_8000"))
            .header("xi-api-key", "k")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["character-cost"], "11");
        let bytes = r.bytes().await.unwrap();
        assert_eq!(bytes.len(), 2 * speech_samples("Apa khabar?", 8_000));

        let r = http
            .post(url("/stream", "mp3_44100_128"))
            .header("xi-api-key", "k")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["detail"]["status"], "unsupported_output_format");

        let r = http
            .post(url("/stream", "ulaw_8000"))
            .header("xi-api-key", "k")
            .json(&json!({"model_id": "eleven_flash_v2_5"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["detail"][0]["loc"], json!(["body", "text"]));

        let r = http
            .post(url("/stream", "ulaw_8000"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(srv.stats().http_requests(), 4);
    }

    #[test]
    fn synthesis_is_deterministic_speech_like_and_sized() {
        let text = "Selamat pagi, terima kasih.";
        let a = synthesize(text, 8_000);
        assert_eq!(a, synthesize(text, 8_000));
        assert_eq!(a.len(), speech_samples(text, 8_000));
        // 22 letters, 1 comma, 1 full stop.
        assert_eq!(a.len(), (22 * 65 + 150 + 300) * 8);
        assert!(
            crate::audio::pcm::dbfs(&a) > -30.0,
            "audible: {}",
            crate::audio::pcm::dbfs(&a)
        );
        // Pauses are silent, letters are not.
        let letters = 22 * 65 * 8;
        assert!(a[..65 * 8].iter().any(|&s| s.unsigned_abs() > 1000));
        assert!(a[letters + 150 * 8..].iter().all(|&s| s == 0));
        // Splitting the text does not change the length.
        let parts =
            speech_samples("Selamat pagi, ", 16_000) + speech_samples("terima kasih. ", 16_000);
        assert_eq!(parts, speech_samples(text, 16_000));
        assert_eq!(synthesize(text, 16_000).len(), parts);
    }

    #[test]
    fn generator_follows_triggers() {
        let mut g = Generator {
            format: Format::Pcm(8_000),
            chunk_ms: 100,
            buffer: String::new(),
            schedule: vec![50, 90],
            schedule_index: 0,
            pending: VecDeque::new(),
        };
        g.on_text("Hi ", false, true);
        assert!(g.pending.is_empty(), "below the trigger minimum");
        g.on_text("there, how are you? ", false, true);
        assert!(!g.pending.is_empty());
        assert!(g.buffer.is_empty());
        g.pending.clear();
        g.on_text("Short ", false, false);
        assert!(g.pending.is_empty());
        g.on_text(" ", true, false);
        assert!(!g.pending.is_empty());
        let first: Value = serde_json::from_str(&g.pending[0]).unwrap();
        assert!(first["isFinal"].is_null());
        assert_eq!(first["normalizedAlignment"]["chars"][0], "S");
    }
}
