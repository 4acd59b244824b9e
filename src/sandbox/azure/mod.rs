//! A fake Azure Speech real-time recognition server.
//!
//! It speaks the SDK websocket protocol exactly (see `docs/providers/azure-stt.md`), reading
//! and writing it with its own code in `wire.rs` (never the client's), validates what the
//! real service validates (auth at upgrade, `Path`/`X-RequestId`, `speech.config` first, the
//! WAV header's format) and
//! "recognises" speech with an energy endpointer on the decoded PCM, answering with scripted
//! transcripts. Faults (auth rejection, server closes, stalls) exercise the client's
//! reconnect logic.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::debug;

use crate::audio::pcm;

mod wire;

use super::ws::{ServerSocket, Upgrade};
use wire::{Received, Refusal};

/// The close codes the service uses (RFC 6455).
mod close_code {
    pub(super) const NORMAL: u16 = 1000;
    pub(super) const PROTOCOL: u16 = 1002;
    pub(super) const INVALID: u16 = 1007;
    pub(super) const SIZE: u16 = 1009;
    pub(super) const ERROR: u16 = 1011;
}

/// The paths the fake serves: the SDK's v1 recognition modes, the 2025 `universal/v2` the
/// SDK builds itself, and the `universal/v2` path Microsoft's language identification guide
/// tells applications to use for continuous identification.
pub const PATHS: [&str; 5] = [
    "/speech/recognition/conversation/cognitiveservices/v1",
    "/speech/recognition/interactive/cognitiveservices/v1",
    "/speech/recognition/dictation/cognitiveservices/v1",
    "/stt/speech/universal/v2",
    "/speech/universal/v2",
];

/// The `languageId.mode`s a `speech.context` may name.
const LID_MODES: [&str; 3] = ["DetectAtAudioStart", "DetectContinuous", "DetectSegments"];
/// Continuous language identification takes at most this many candidates.
const LID_MAX_LANGUAGES: usize = 10;

/// Block size of the endpointer.
const BLOCK_MS: u64 = 20;
/// A block is speech above this level.
const SPEECH_DBFS: f64 = -40.0;
/// Azure's default segmentation silence.
const DEFAULT_SEGMENTATION_MS: u64 = 500;
/// Idle connections are closed after this long (AZ-WSDOC).
const IDLE_TIMEOUT: Duration = Duration::from_secs(180);

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AzureFault {
    /// Behave.
    #[default]
    None,
    /// Refuse every upgrade with HTTP 401.
    RejectAuth,
    /// Close every connection with 1011 this many ms after it opens.
    CloseAfterMs(u64),
    /// Close every connection with this close code this many ms after it opens (e.g. the
    /// codes the SDK treats as fatal: 1002, 1003, 1007, 4000).
    CloseWithAfterMs(u16, u64),
    /// Close a connection with 1011 after it has sent this many `Success` phrases.
    DropAfterPhrases(usize),
    /// Accept, read everything, never answer.
    Stall,
    /// End the turn (`turn.end`) after this many `Success` phrases in it, while the client's
    /// audio still flows, as the real service sometimes does: the client must start a new
    /// turn on the same socket (new `X-RequestId`, `speech.context`, WAV header).
    TurnEndAfterPhrases(usize),
}

/// The `RecognitionStatus` values and their numbers (the JavaScript SDK's enum: the service
/// may send either form).
pub const RECOGNITION_STATUSES: [&str; 9] = [
    "Success",
    "NoMatch",
    "InitialSilenceTimeout",
    "BabbleTimeout",
    "Error",
    "EndOfDictation",
    "TooManyRequests",
    "BadRequest",
    "Forbidden",
];

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct FakeAzureConfig {
    /// Required key (`Ocp-Apim-Subscription-Key` header or `Authorization: Bearer`); `None`
    /// accepts any or none. A key in the URL is always refused.
    pub key: Option<String>,
    /// Transcripts, cycled for successive phrases.
    pub transcripts: Vec<String>,
    /// Delay of `speech.phrase` once the segmentation silence has elapsed.
    pub final_delay_ms: u64,
    /// A `speech.hypothesis` per this many ms of speech (0 disables them).
    pub hypothesis_every_ms: u64,
    /// When the caller pauses, send the whole phrase as a hypothesis (as the real service's
    /// last hypothesis usually is), ahead of the final by the segmentation silence plus
    /// `final_delay_ms`: what lets a reply start on the hypothesis.
    pub complete_hypothesis_at_pause: bool,
    /// Every this many phrases (by transcript index: 1 = every phrase, 2 = every second,
    /// 0 = never), the hypotheses are revised by the final: they miss its last word, as when
    /// the recogniser has not committed to a word when the caller pauses. A reply started on
    /// such a hypothesis is wasted.
    pub revise_every: usize,
    /// Voiced audio (20 ms blocks above the speech level) a phrase needs before it is
    /// recognised: shorter bursts (a click, a peak of line noise) get no hypothesis and no
    /// final, as the real service does not transcribe noise. 0: any voiced block is a phrase.
    pub min_phrase_voiced_ms: u64,
    /// Fault injection.
    pub fault: AzureFault,
    /// The `RecognitionStatus` of each detected phrase, in order across the fake's life
    /// (`NoMatch`, `InitialSilenceTimeout`, `BabbleTimeout`, `Error`, `TooManyRequests`...);
    /// once exhausted, phrases are `Success` with the next transcript. A non-`Success` phrase
    /// carries no `DisplayText` and uses no transcript.
    pub phrase_statuses: Vec<String>,
    /// Send `RecognitionStatus` as the SDK enum's number instead of its name.
    pub status_as_number: bool,
    /// Send partial results as `speech.fragment` instead of `speech.hypothesis`.
    pub fragments: bool,
    /// The service closes a connection (code 1000) this long after it opened, busy or not:
    /// 10 minutes for the real one. Tests shorten it.
    pub connection_cap_ms: u64,
    /// Accept a key in the URL's query string, as the real service does and as the official
    /// JavaScript SDK sends it (beside the header). Off by default: our client must never
    /// put the key in a URL, and the strict fake proves it.
    pub allow_key_in_url: bool,
    /// Record every upgrade and client message in [`FakeAzureStats::upgrades`] and
    /// [`FakeAzureStats::messages`] (conformance tests compare clients message by message).
    pub record: bool,
    /// With language identification asked for (a `languageId` section in `speech.context`),
    /// the locale each transcript is "spoken" in, index for index with `transcripts` (cycled
    /// the same way): what `PrimaryLanguage` says for its phrase and hypotheses. A missing or
    /// empty entry is guessed from the transcript's words among the candidates.
    pub transcript_languages: Vec<String>,
}

/// The real service's connection cap.
pub const CONNECTION_CAP_MS: u64 = 10 * 60 * 1000;

impl Default for FakeAzureConfig {
    fn default() -> Self {
        Self {
            key: None,
            transcripts: vec!["Helo, apa khabar?".into(), "Terima kasih.".into()],
            final_delay_ms: 150,
            hypothesis_every_ms: 200,
            complete_hypothesis_at_pause: true,
            revise_every: 0,
            min_phrase_voiced_ms: 0,
            fault: AzureFault::None,
            phrase_statuses: Vec::new(),
            status_as_number: false,
            fragments: false,
            connection_cap_ms: CONNECTION_CAP_MS,
            allow_key_in_url: false,
            record: false,
            transcript_languages: Vec::new(),
        }
    }
}

/// What the fake received, for tests.
#[derive(Debug, Clone, Default)]
pub struct FakeAzureStats {
    /// Accepted websocket upgrades.
    pub connections: usize,
    /// Upgrades refused for auth.
    pub rejected_auth: usize,
    /// `language` query parameter of each connection.
    pub languages: Vec<String>,
    /// Sample rate declared by each turn's WAV header.
    pub sample_rates: Vec<u32>,
    /// Effective segmentation silence of each turn.
    pub segmentation_silence_ms: Vec<u32>,
    /// PCM bytes received (WAV headers excluded).
    pub audio_bytes: u64,
    /// `speech.config` bodies.
    pub configs: Vec<Value>,
    /// `speech.context` bodies.
    pub contexts: Vec<Value>,
    /// Empty audio messages (end of stream).
    pub end_of_streams: usize,
    /// `Success` phrases sent.
    pub phrases_sent: usize,
    /// Connections closed for a protocol violation: close code and reason.
    pub violations: Vec<(u16, String)>,
    /// When each `Success` phrase was heard and sent, in the order sent (benchmarks).
    pub phrase_times: Vec<PhraseTimes>,
    /// `speech.phrase` messages sent with any status other than `EndOfDictation`.
    pub phrase_outcomes: usize,
    /// Turns (distinct request ids carrying audio) over all connections.
    pub turns: usize,
    /// Turns the fake ended while audio still flowed ([`AzureFault::TurnEndAfterPhrases`]).
    pub turns_cut: usize,
    /// Connections closed by the connection cap.
    pub capped: usize,
    /// Audio messages that arrived for a turn the fake had already ended (in flight when it
    /// sent `turn.end`), ignored as the service does.
    pub late_audio: usize,
    /// Upgrade requests, when [`FakeAzureConfig::record`] is on.
    pub upgrades: Vec<RecordedUpgrade>,
    /// Client messages in arrival order, when [`FakeAzureConfig::record`] is on.
    pub messages: Vec<RecordedMessage>,
    /// Whether each connection's URL asked for language identification (`lidEnabled=true`).
    pub lid_enabled: Vec<bool>,
    /// The `PrimaryLanguage` of each `Success` phrase sent with language identification on,
    /// in the order sent.
    pub detected_languages: Vec<String>,
}

/// An upgrade request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedUpgrade {
    /// The URL path.
    pub path: String,
    /// Query parameters, in order (values decoded).
    pub query: Vec<(String, String)>,
    /// Request header names, lower case, in order.
    pub header_names: Vec<String>,
}

/// One client message as the fake read it.
#[derive(Debug, Clone)]
pub struct RecordedMessage {
    /// The connection (0-based, in upgrade order).
    pub connection: usize,
    /// Whether it came in a binary frame.
    pub binary: bool,
    /// Header lines, names as sent, in order.
    pub headers: Vec<(String, String)>,
    /// Whether a binary frame's header block ended with a blank line.
    pub blank_line_after_binary_headers: bool,
    /// The body: JSON text or audio bytes.
    pub body: Vec<u8>,
}

impl RecordedMessage {
    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Its `Path`.
    pub fn path(&self) -> &str {
        self.header("Path").unwrap_or_default()
    }
}

/// Wall-clock marks of one `Success` phrase, for attributing latency in benchmarks.
#[derive(Debug, Clone)]
pub struct PhraseTimes {
    /// The connection (0-based, in upgrade order) that sent it.
    pub connection: usize,
    /// Its transcript.
    pub text: String,
    /// Arrival of the audio message carrying the phrase's last voiced block.
    pub last_speech_at: Option<std::time::Instant>,
    /// Arrival of the audio message whose block completed the segmentation silence (`None`
    /// when the phrase was ended by the end of the audio stream).
    pub segmented_at: Option<std::time::Instant>,
    /// When the `speech.phrase` message had been written to the socket.
    pub sent_at: std::time::Instant,
}

struct Shared {
    cfg: FakeAzureConfig,
    stats: Arc<Mutex<FakeAzureStats>>,
    outcomes: Mutex<Outcomes>,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, FakeAzureStats> {
        // A panicked test thread must not hide the stats from the others.
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The outcome of a new phrase: the next status of
    /// [`FakeAzureConfig::phrase_statuses`] (`Success` once they are used up) and, for a
    /// `Success`, the next transcript.
    fn decide(&self) -> Outcome {
        let mut o = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        let status = o.statuses.take();
        let success = self
            .cfg
            .phrase_statuses
            .get(status)
            .is_none_or(|s| s == "Success");
        let transcript = success.then(|| o.transcripts.take());
        Outcome { status, transcript }
    }

    /// A phrase that will never be sent gives its outcome back to the next phrase.
    fn give_back(&self, outcome: Option<Outcome>) {
        let Some(outcome) = outcome else { return };
        let mut o = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        o.statuses.give_back(outcome.status);
        if let Some(t) = outcome.transcript {
            o.transcripts.give_back(t);
        }
    }

    fn status(&self, outcome: Outcome) -> &str {
        self.cfg
            .phrase_statuses
            .get(outcome.status)
            .map_or("Success", String::as_str)
    }
}

/// What a phrase will say: decided at its first hypothesis, so that its hypotheses and its
/// final agree even while other connections send phrases in between (many concurrent calls
/// on one fake), or at its final if it had no hypothesis.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// Index into [`FakeAzureConfig::phrase_statuses`].
    status: usize,
    /// Index into [`FakeAzureConfig::transcripts`] (cycled), for a `Success`.
    transcript: Option<usize>,
}

/// The statuses and transcripts handed out so far, across all connections, in phrase order.
#[derive(Debug, Default)]
struct Outcomes {
    statuses: Sequence,
    transcripts: Sequence,
}

/// 0, 1, 2... with numbers given back (by phrases never sent) handed out again first.
#[derive(Debug, Default)]
struct Sequence {
    next: usize,
    returned: BTreeSet<usize>,
}

impl Sequence {
    fn take(&mut self) -> usize {
        self.returned.pop_first().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn give_back(&mut self, n: usize) {
        self.returned.insert(n);
    }
}

/// A running fake on 127.0.0.1; stops when dropped.
#[derive(Debug)]
pub struct FakeAzure {
    /// Where it listens.
    pub addr: SocketAddr,
    stats: Arc<Mutex<FakeAzureStats>>,
    task: JoinHandle<()>,
}

impl FakeAzure {
    /// Binds 127.0.0.1:0 and serves `cfg` in the background.
    pub async fn spawn(cfg: FakeAzureConfig) -> std::io::Result<Self> {
        let stats = Arc::new(Mutex::new(FakeAzureStats::default()));
        let app = routes(cfg, Arc::clone(&stats));
        let (addr, task) = super::spawn_on_loopback("fake Azure", app, || {}).await?;
        Ok(Self { addr, stats, task })
    }

    /// The conversation endpoint URL, for `stt.endpoint`.
    pub fn url(&self) -> String {
        format!("ws://{}{}", self.addr, PATHS[0])
    }

    /// A snapshot of what was received so far.
    pub fn stats(&self) -> FakeAzureStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops accepting connections (the listener closes, so connects are refused); open
    /// connections carry on.
    pub fn stop_accepting(&self) {
        self.task.abort();
    }
}

impl Drop for FakeAzure {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds 127.0.0.1:0 and serves in the background: [`FakeAzure::spawn`].
pub async fn spawn(cfg: FakeAzureConfig) -> std::io::Result<FakeAzure> {
    FakeAzure::spawn(cfg).await
}

/// The fake's routes on every path the SDKs use.
fn routes(cfg: FakeAzureConfig, stats: Arc<Mutex<FakeAzureStats>>) -> Router {
    let shared = Arc::new(Shared {
        cfg,
        stats,
        outcomes: Mutex::default(),
    });
    let mut app = Router::new();
    for p in PATHS {
        app = app.route(p, get(upgrade));
    }
    app.with_state(shared)
}

/// The key must come in the `Ocp-Apim-Subscription-Key` header (or a bearer token in
/// `Authorization`). A key in the URL is refused outright, whatever `key` says: URLs end up in
/// logs and proxies, so the client must never put it there.
fn authorised(
    cfg: &FakeAzureConfig,
    headers: &HeaderMap,
    query: &[(String, String)],
) -> Result<(), StatusCode> {
    if cfg.fault == AzureFault::RejectAuth {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let in_url = query.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("Ocp-Apim-Subscription-Key")
            || k.eq_ignore_ascii_case("Authorization")
    });
    if in_url && !cfg.allow_key_in_url {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let Some(want) = &cfg.key else { return Ok(()) };
    let from_url = query
        .iter()
        .filter(|_| cfg.allow_key_in_url)
        .find(|(k, _)| k.eq_ignore_ascii_case("Ocp-Apim-Subscription-Key"))
        .map(|(_, v)| v.as_str());
    let header = headers
        .get("Ocp-Apim-Subscription-Key")
        .and_then(|v| v.to_str().ok());
    let bearer = headers
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let offered: Vec<&str> = [header, bearer, from_url].into_iter().flatten().collect();
    if offered.is_empty() {
        Err(StatusCode::FORBIDDEN)
    } else if offered.iter().any(|k| *k == want) {
        Ok(())
    } else {
        Err(StatusCode::UNAUTHORIZED)
    }
}

async fn upgrade(
    State(sh): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
    ws: Upgrade,
) -> Response {
    if sh.cfg.record {
        sh.stats().upgrades.push(RecordedUpgrade {
            path: uri.path().to_owned(),
            query: query.clone(),
            header_names: headers.keys().map(|k| k.as_str().to_owned()).collect(),
        });
    }
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if let Err(status) = authorised(&sh.cfg, &headers, &query) {
        sh.stats().rejected_auth += 1;
        let body = json!({"error": {"code": status.as_u16().to_string(),
            "message": "Access denied due to invalid subscription key or wrong API endpoint."}});
        return (status, axum::Json(body)).into_response();
    }
    let Some(language) = param("language") else {
        return (StatusCode::BAD_REQUEST, "language is required").into_response();
    };
    let seg = param("segmentationSilenceTimeoutMs").and_then(|v| v.parse().ok());
    let lid = param("lidEnabled").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let index = {
        let mut st = sh.stats();
        st.connections += 1;
        st.languages.push(language);
        st.lid_enabled.push(lid);
        st.connections - 1
    };
    ws.on_upgrade(move |socket| async move {
        let mut conn = Connection::new(sh, index, seg.unwrap_or(DEFAULT_SEGMENTATION_MS));
        conn.run(socket).await;
    })
}

/// Something to send at a due time.
#[derive(Debug)]
enum Out {
    Text(String),
    /// A phrase; its status and transcript are picked when it is sent.
    Final {
        request_id: String,
        offset: u64,
        duration: u64,
        last_speech_at: Option<std::time::Instant>,
        segmented_at: Option<std::time::Instant>,
        /// Its outcome, if its hypotheses already decided it.
        outcome: Option<Outcome>,
    },
}

/// A protocol violation: close code and reason.
type Violation = (u16, String);

fn violation(code: u16, why: impl Into<String>) -> Violation {
    (code, why.into())
}

/// The endpointer's phrase in progress, in samples relative to the turn.
#[derive(Debug)]
struct Speech {
    start: u64,
    last_voiced_end: u64,
    /// Arrival of the audio carrying the last voiced block.
    last_voiced_at: std::time::Instant,
    next_hypothesis: u64,
    hypotheses: usize,
    /// Voiced blocks so far.
    voiced_blocks: u64,
    /// Decided at the first hypothesis.
    outcome: Option<Outcome>,
}

/// One turn (one `X-RequestId`) on a connection.
#[derive(Debug)]
struct Turn {
    request_id: String,
    rate: u32,
    /// Samples received in this turn.
    pos: u64,
    block: Vec<i16>,
    odd_byte: Option<u8>,
    speech: Option<Speech>,
    start_detected: bool,
    end_of_stream: bool,
    /// `Success` phrases sent in this turn.
    phrases: usize,
}

struct Connection {
    sh: Arc<Shared>,
    /// 0-based upgrade index, for [`PhraseTimes`].
    index: usize,
    /// Segmentation silence for the next turn, from the query or `speech.context`.
    segmentation_ms: u64,
    config_seen: bool,
    turn: Option<Turn>,
    /// Request ids whose turn has ended: reusing one is a protocol error.
    finished_ids: HashSet<String>,
    /// Of those, the turns the fake ended while audio flowed: audio in flight is ignored.
    cut_ids: HashSet<String>,
    queue: VecDeque<(Instant, Out)>,
    phrases_sent_here: usize,
    /// Language identification, from the last `speech.context` (`None`: off).
    lid: Option<Lid>,
}

/// What the client's `languageId` section asked for.
#[derive(Debug, Clone)]
struct Lid {
    /// The candidate locales.
    languages: Vec<String>,
    /// `DetectContinuous`: every phrase is identified. Otherwise the first phrase's language
    /// holds for the rest of the connection.
    continuous: bool,
    /// At-start identification: the language found for the first phrase.
    found: Option<String>,
}

impl Connection {
    fn new(sh: Arc<Shared>, index: usize, segmentation_ms: u64) -> Self {
        Self {
            sh,
            index,
            segmentation_ms,
            config_seen: false,
            turn: None,
            finished_ids: HashSet::new(),
            cut_ids: HashSet::new(),
            queue: VecDeque::new(),
            phrases_sent_here: 0,
            lid: None,
        }
    }

    /// The `PrimaryLanguage` of transcript `index` (`text`), with language identification on.
    fn primary_language(&mut self, index: usize, text: &str) -> Option<Value> {
        let lid = self.lid.as_mut()?;
        let language = match &lid.found {
            Some(l) if !lid.continuous => l.clone(),
            _ => {
                let scripted = transcript(&self.sh.cfg.transcript_languages, index);
                let l = if scripted.trim().is_empty() {
                    guess_language(text, &lid.languages)
                } else {
                    scripted
                };
                lid.found.get_or_insert_with(|| l.clone());
                l
            }
        };
        Some(json!({"Language": language, "Confidence": "High"}))
    }

    async fn run(&mut self, socket: ServerSocket) {
        self.serve(socket).await;
        // Outcomes of phrases that will never be sent go to the next phrases.
        let speech = self.turn.take().and_then(|t| t.speech);
        self.give_back(speech);
    }

    /// Gives back the outcomes of the phrase in progress and of the finals not yet sent.
    fn give_back(&mut self, speech: Option<Speech>) {
        self.sh.give_back(speech.and_then(|sp| sp.outcome));
        for (_, out) in self.queue.drain(..) {
            if let Out::Final { outcome, .. } = out {
                self.sh.give_back(outcome);
            }
        }
    }

    async fn serve(&mut self, mut socket: ServerSocket) {
        let fault = self.sh.cfg.fault;
        let (close_at, close_with) = match fault {
            AzureFault::CloseAfterMs(ms) => (Some(ms), close_code::ERROR),
            AzureFault::CloseWithAfterMs(code, ms) => (Some(ms), code),
            _ => (None, close_code::ERROR),
        };
        let close_at = close_at.map(|ms| Instant::now() + Duration::from_millis(ms));
        let cap_at = Instant::now() + Duration::from_millis(self.sh.cfg.connection_cap_ms);
        let far = Instant::now() + Duration::from_secs(86_400);
        let mut idle_deadline = Instant::now() + IDLE_TIMEOUT;
        loop {
            let next_due = self.queue.front().map(|(t, _)| *t);
            tokio::select! {
                _ = sleep_until(close_at.unwrap_or(far)), if close_at.is_some() => {
                    close(&mut socket, close_with, "injected fault").await;
                    return;
                }
                _ = sleep_until(cap_at) => {
                    self.sh.stats().capped += 1;
                    close(&mut socket, close_code::NORMAL, "maximum connection duration reached").await;
                    return;
                }
                _ = sleep_until(idle_deadline) => {
                    close(&mut socket, close_code::NORMAL, "idle timeout").await;
                    return;
                }
                _ = sleep_until(next_due.unwrap_or(far)), if next_due.is_some() && fault != AzureFault::Stall => {
                    if !self.send_due(&mut socket).await {
                        return;
                    }
                }
                msg = socket.next() => {
                    idle_deadline = Instant::now() + IDLE_TIMEOUT;
                    let result = match msg {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                        Some(Ok(Message::Text(t))) => self.on_frame(wire::read_text(t.as_str())),
                        Some(Ok(Message::Binary(b))) => self.on_frame(wire::read_binary(&b)),
                        Some(Ok(_)) => Ok(()),
                    };
                    if let Err((code, why)) = result {
                        debug!(code, %why, "fake azure closing on protocol violation");
                        self.sh.stats().violations.push((code, why.clone()));
                        close(&mut socket, code, &why).await;
                        return;
                    }
                    // Answer immediately if something is due now (e.g. turn.start).
                    if fault != AzureFault::Stall && !self.send_due(&mut socket).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sends everything due; false if the connection is over.
    async fn send_due(&mut self, socket: &mut ServerSocket) -> bool {
        let now = Instant::now();
        while self.queue.front().is_some_and(|(t, _)| *t <= now) {
            let Some((_, out)) = self.queue.pop_front() else {
                break;
            };
            let (text, was_final) = match out {
                Out::Text(t) => (t, None),
                Out::Final {
                    request_id,
                    offset,
                    duration,
                    last_speech_at,
                    segmented_at,
                    outcome,
                } => {
                    let cfg = &self.sh.cfg;
                    let outcome = outcome.unwrap_or_else(|| self.sh.decide());
                    let status = self.sh.status(outcome).to_owned();
                    let text = outcome.transcript.map(|i| transcript(&cfg.transcripts, i));
                    {
                        let mut st = self.sh.stats();
                        st.phrase_outcomes += 1;
                        st.phrases_sent += usize::from(text.is_some());
                    }
                    let text = text.zip(outcome.transcript);
                    let mut body = json!({"RecognitionStatus": status_value(cfg, &status),
                        "Offset": offset, "Duration": duration});
                    let text = text.map(|(t, index)| {
                        body["DisplayText"] = json!(t);
                        if let Some(lang) = self.primary_language(index, &t) {
                            if let Some(l) = lang["Language"].as_str() {
                                self.sh.stats().detected_languages.push(l.to_owned());
                            }
                            body["PrimaryLanguage"] = lang;
                        }
                        t
                    });
                    body["Channel"] = json!(0);
                    (
                        wire::service_text("speech.phrase", &request_id, &body.to_string()),
                        text.map(|t| (t, last_speech_at, segmented_at)),
                    )
                }
            };
            if socket.send(Message::Text(text.into())).await.is_err() {
                return false;
            }
            if let Some((text, last_speech_at, segmented_at)) = was_final {
                let sent_at = std::time::Instant::now();
                self.sh.stats().phrase_times.push(PhraseTimes {
                    connection: self.index,
                    text,
                    last_speech_at,
                    segmented_at,
                    sent_at,
                });
                self.phrases_sent_here += 1;
                if self.sh.cfg.fault == AzureFault::DropAfterPhrases(self.phrases_sent_here) {
                    close(
                        socket,
                        close_code::ERROR,
                        "injected fault: dropped after phrases",
                    )
                    .await;
                    return false;
                }
                let cut = self.turn.as_mut().is_some_and(|t| {
                    t.phrases += 1;
                    !t.end_of_stream
                        && self.sh.cfg.fault == AzureFault::TurnEndAfterPhrases(t.phrases)
                });
                if cut && !self.cut_turn(socket).await {
                    return false;
                }
            }
        }
        true
    }

    /// Ends the current turn while the client is still sending audio: `speech.endDetected`
    /// and `turn.end` now, and whatever was queued for the turn is dropped.
    async fn cut_turn(&mut self, socket: &mut ServerSocket) -> bool {
        let Some(mut turn) = self.turn.take() else {
            return true;
        };
        self.give_back(turn.speech.take());
        self.sh.stats().turns_cut += 1;
        let end = wire::ticks(turn.pos, turn.rate);
        for (path, body) in [
            ("speech.endDetected", json!({"Offset": end}).to_string()),
            ("turn.end", String::new()),
        ] {
            let text = wire::service_text(path, &turn.request_id, &body);
            if socket.send(Message::Text(text.into())).await.is_err() {
                return false;
            }
        }
        self.finished_ids.insert(turn.request_id.clone());
        self.cut_ids.insert(turn.request_id);
        true
    }

    fn push(&mut self, at: Instant, out: Out) {
        // Keep messages in order even when a later one has a shorter delay.
        let at = self.queue.back().map_or(at, |(t, _)| at.max(*t));
        self.queue.push_back((at, out));
    }

    fn say(&mut self, path: &str, body: Value) {
        let Some(rid) = self.turn.as_ref().map(|t| t.request_id.clone()) else {
            return;
        };
        let text = wire::service_text(
            path,
            &rid,
            &if body.is_null() {
                String::new()
            } else {
                body.to_string()
            },
        );
        self.push(Instant::now(), Out::Text(text));
    }

    fn on_frame(&mut self, frame: Result<Received, Refusal>) -> Result<(), Violation> {
        let msg = frame.map_err(|e| match e {
            Refusal::TooBig(_) => violation(close_code::SIZE, e.to_string()),
            Refusal::Protocol(why) => violation(close_code::PROTOCOL, why),
        })?;
        if self.sh.cfg.record {
            self.sh.stats().messages.push(RecordedMessage {
                connection: self.index,
                binary: msg.binary,
                headers: msg.headers.clone(),
                blank_line_after_binary_headers: msg.blank_line,
                body: msg.body.clone(),
            });
        }
        let rid = msg.request_id.clone().unwrap_or_default();
        if self.cut_ids.contains(&rid) && msg.binary && msg.path.eq_ignore_ascii_case("audio") {
            self.sh.stats().late_audio += 1;
            return Ok(());
        }
        // The SDK sends its telemetry under the turn's id right after turn.end.
        let telemetry = msg.path.eq_ignore_ascii_case("telemetry");
        if self.finished_ids.contains(&rid) && !telemetry {
            return Err(violation(
                close_code::PROTOCOL,
                format!("X-RequestId {rid} reused after turn.end"),
            ));
        }
        let json_body = |body: &[u8]| -> Result<Value, Violation> {
            serde_json::from_slice(body)
                .map_err(|e| violation(close_code::INVALID, format!("{}: {e}", msg.path)))
        };
        match (msg.path.to_ascii_lowercase().as_str(), msg.binary) {
            ("speech.config", false) => {
                let v = json_body(&msg.body)?;
                self.config_seen = true;
                self.sh.stats().configs.push(v);
            }
            ("speech.context", false) => {
                let v = json_body(&msg.body)?;
                self.lid = read_language_id(&v)?;
                // The mode's section: `conversation` from the JavaScript SDK, `CONVERSATION`
                // from the Python one; the service takes either.
                let seg = v
                    .get("phraseDetection")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| {
                        ["conversation", "interactive", "dictation"]
                            .iter()
                            .any(|m| k.eq_ignore_ascii_case(m))
                    })
                    .find_map(|(_, mode)| {
                        mode.pointer("/segmentation/segmentationSilenceTimeoutMs")
                            .and_then(Value::as_u64)
                    });
                if let Some(ms) = seg {
                    if !(100..=5000).contains(&ms) {
                        return Err(violation(
                            close_code::INVALID,
                            format!("segmentationSilenceTimeoutMs {ms}"),
                        ));
                    }
                    self.segmentation_ms = ms;
                }
                self.sh.stats().contexts.push(v);
            }
            ("audio", true) => {
                if !self.config_seen {
                    return Err(violation(
                        close_code::PROTOCOL,
                        "audio before speech.config",
                    ));
                }
                self.on_audio(rid, &msg.body)?;
            }
            ("audio", false) => {
                return Err(violation(close_code::PROTOCOL, "audio in a text frame"));
            }
            // telemetry and anything else: ignored, as the service does.
            _ => {}
        }
        Ok(())
    }

    fn on_audio(&mut self, request_id: String, body: &[u8]) -> Result<(), Violation> {
        let new_turn = self
            .turn
            .as_ref()
            .is_none_or(|t| t.request_id != request_id);
        if new_turn {
            if let Some(old) = self.turn.as_ref().filter(|t| !t.end_of_stream) {
                return Err(violation(
                    close_code::PROTOCOL,
                    format!(
                        "audio for {request_id} while turn {} is open",
                        old.request_id
                    ),
                ));
            }
            let (rate, pcm_at) = if body.starts_with(b"RIFF") {
                let f =
                    wire::read_wav_header(body).map_err(|e| violation(close_code::INVALID, e))?;
                if f.format_tag != 1 || f.channels != 1 || f.bits != 16 {
                    return Err(violation(
                        close_code::INVALID,
                        format!("unsupported audio format {f:?}"),
                    ));
                }
                if f.sample_rate != 8000 && f.sample_rate != 16000 {
                    return Err(violation(
                        close_code::INVALID,
                        format!("unsupported sample rate {}", f.sample_rate),
                    ));
                }
                (f.sample_rate, f.data_at.min(body.len()))
            } else {
                // No header: the service assumes 16 kHz 16-bit mono.
                (16000, 0)
            };
            {
                let mut st = self.sh.stats();
                st.sample_rates.push(rate);
                st.segmentation_silence_ms
                    .push(u32::try_from(self.segmentation_ms).unwrap_or(u32::MAX));
            }
            self.sh.stats().turns += 1;
            self.turn = Some(Turn {
                request_id,
                rate,
                pos: 0,
                block: Vec::new(),
                odd_byte: None,
                speech: None,
                start_detected: false,
                end_of_stream: false,
                phrases: 0,
            });
            self.say(
                "turn.start",
                json!({"context": {"serviceTag": wire::fresh_id()}}),
            );
            let rest = body.get(pcm_at..).unwrap_or_default();
            if body.is_empty() {
                self.end_of_stream();
            } else if !rest.is_empty() {
                self.on_pcm(rest);
            }
            return Ok(());
        }
        if body.is_empty() {
            self.end_of_stream();
        } else if self.turn.as_ref().is_some_and(|t| !t.end_of_stream) {
            self.on_pcm(body);
        }
        Ok(())
    }

    fn on_pcm(&mut self, bytes: &[u8]) {
        self.sh.stats().audio_bytes += bytes.len() as u64;
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        let mut data = Vec::with_capacity(bytes.len() + 1);
        data.extend(turn.odd_byte.take());
        data.extend_from_slice(bytes);
        if data.len() % 2 == 1 {
            turn.odd_byte = data.pop();
        }
        let samples = pcm::le_bytes_to_samples(&data);
        let block_len = (u64::from(turn.rate) * BLOCK_MS / 1000) as usize;
        for s in samples {
            let Some(turn) = self.turn.as_mut() else {
                return;
            };
            turn.block.push(s);
            if turn.block.len() >= block_len {
                let block = std::mem::take(&mut turn.block);
                self.on_block(&block);
            }
        }
    }

    /// The endpointer, one 20 ms block at a time.
    fn on_block(&mut self, block: &[i16]) {
        let seg_ms = self.segmentation_ms;
        let hyp_ms = self.sh.cfg.hypothesis_every_ms;
        let min_blocks = self.sh.cfg.min_phrase_voiced_ms.div_ceil(BLOCK_MS);
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        let rate = u64::from(turn.rate);
        let start = turn.pos;
        turn.pos += block.len() as u64;
        let end = turn.pos;
        let voiced = pcm::dbfs(block) > SPEECH_DBFS;
        let mut hypothesis = None;
        let mut started = false;
        let mut ended = None;
        match (&mut turn.speech, voiced) {
            (None, true) => {
                started = !turn.start_detected;
                turn.start_detected = true;
                turn.speech = Some(Speech {
                    start,
                    last_voiced_end: end,
                    last_voiced_at: std::time::Instant::now(),
                    next_hypothesis: start + hyp_ms * rate / 1000,
                    hypotheses: 0,
                    voiced_blocks: 1,
                    outcome: None,
                });
            }
            (Some(sp), true) => {
                sp.last_voiced_end = end;
                sp.last_voiced_at = std::time::Instant::now();
                sp.voiced_blocks += 1;
                if hyp_ms > 0 && end >= sp.next_hypothesis && sp.voiced_blocks >= min_blocks {
                    sp.hypotheses += 1;
                    sp.next_hypothesis += hyp_ms * rate / 1000;
                    hypothesis = Some((sp.start, end - sp.start, sp.hypotheses));
                }
            }
            (Some(sp), false) if end - sp.last_voiced_end >= seg_ms * rate / 1000 => {
                // Too little voice to be a phrase: noise, forgotten.
                ended = (sp.voiced_blocks >= min_blocks).then_some((
                    sp.start,
                    sp.last_voiced_end - sp.start,
                    sp.last_voiced_at,
                    sp.outcome,
                ));
                turn.speech = None;
            }
            (Some(sp), false)
                if hyp_ms > 0
                    && sp.voiced_blocks >= min_blocks
                    && self.sh.cfg.complete_hypothesis_at_pause
                    && end - sp.last_voiced_end == block.len() as u64 =>
            {
                hypothesis = Some((sp.start, sp.last_voiced_end - sp.start, usize::MAX));
            }
            _ => {}
        }
        let ticks = |samples: u64| wire::ticks(samples, rate as u32);
        if started {
            self.say("speech.startDetected", json!({"Offset": ticks(start)}));
        }
        if let Some((s, d, n)) = hypothesis {
            let outcome = self.phrase_outcome();
            // A phrase with no words (NoMatch...) still has hypotheses: some transcript.
            let idx = outcome.transcript.unwrap_or(outcome.status);
            let full = transcript(&self.sh.cfg.transcripts, idx);
            let every = self.sh.cfg.revise_every;
            let mut words: Vec<&str> = full.split_whitespace().collect();
            if every > 0 && (idx + 1).is_multiple_of(every) {
                words.pop();
            }
            words.truncate(n);
            let path = if self.sh.cfg.fragments {
                "speech.fragment"
            } else {
                "speech.hypothesis"
            };
            let mut body = json!({"Text": words.join(" "), "Offset": ticks(s), "Duration": ticks(d), "Id": wire::fresh_id()});
            if let Some(lang) = self.primary_language(idx, &full) {
                body["PrimaryLanguage"] = lang;
            }
            self.say(path, body);
        }
        if let Some((s, d, heard, taken)) = ended {
            let segmented = std::time::Instant::now();
            self.queue_final(ticks(s), ticks(d), Some(heard), Some(segmented), taken);
        }
    }

    /// The outcome of the phrase in progress, decided at its first hypothesis.
    fn phrase_outcome(&mut self) -> Outcome {
        let sh = Arc::clone(&self.sh);
        match self.turn.as_mut().and_then(|t| t.speech.as_mut()) {
            Some(sp) => *sp.outcome.get_or_insert_with(|| sh.decide()),
            None => Outcome {
                status: 0,
                transcript: None,
            },
        }
    }

    fn queue_final(
        &mut self,
        offset: u64,
        duration: u64,
        last_speech_at: Option<std::time::Instant>,
        segmented_at: Option<std::time::Instant>,
        outcome: Option<Outcome>,
    ) {
        let Some(request_id) = self.turn.as_ref().map(|t| t.request_id.clone()) else {
            self.sh.give_back(outcome);
            return;
        };
        let at = Instant::now() + Duration::from_millis(self.sh.cfg.final_delay_ms);
        self.push(
            at,
            Out::Final {
                request_id,
                offset,
                duration,
                last_speech_at,
                segmented_at,
                outcome,
            },
        );
    }

    /// The empty audio message: finish the phrase in progress, then close the turn.
    fn end_of_stream(&mut self) {
        self.sh.stats().end_of_streams += 1;
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        if turn.end_of_stream {
            return;
        }
        turn.end_of_stream = true;
        let rate = turn.rate;
        let pos = turn.pos;
        let rid = turn.request_id.clone();
        let ticks = |samples: u64| wire::ticks(samples, rate);
        let min_blocks = self.sh.cfg.min_phrase_voiced_ms.div_ceil(BLOCK_MS);
        if let Some(sp) = turn
            .speech
            .take()
            .filter(|sp| sp.voiced_blocks >= min_blocks)
        {
            self.queue_final(
                ticks(sp.start),
                ticks(sp.last_voiced_end - sp.start),
                Some(sp.last_voiced_at),
                None,
                sp.outcome,
            );
        }
        let now = Instant::now();
        for (path, body) in [
            (
                "speech.endDetected",
                json!({"Offset": ticks(pos)}).to_string(),
            ),
            (
                "speech.phrase",
                json!({"RecognitionStatus": status_value(&self.sh.cfg, "EndOfDictation"), "Offset": ticks(pos), "Duration": 0})
                    .to_string(),
            ),
            ("turn.end", String::new()),
        ] {
            self.push(now, Out::Text(wire::service_text(path, &rid, &body)));
        }
        self.finished_ids.insert(rid);
    }
}

/// Reads a `speech.context`'s `languageId` section as the service would: the candidates
/// (1 to 10 locale strings) and the mode. Anything else there is refused with 1007; no
/// section means no identification.
fn read_language_id(context: &Value) -> Result<Option<Lid>, Violation> {
    let Some(section) = context.get("languageId") else {
        return Ok(None);
    };
    let bad = |why: &str| violation(close_code::INVALID, format!("languageId: {why}"));
    let languages: Vec<String> = section
        .get("languages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no languages array"))?
        .iter()
        .map(|l| l.as_str().map(str::to_owned))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("a language is not a string"))?;
    if languages.is_empty() || languages.len() > LID_MAX_LANGUAGES {
        return Err(bad(&format!(
            "{} languages (1 to {LID_MAX_LANGUAGES})",
            languages.len()
        )));
    }
    let mode = match section.get("mode") {
        None => "DetectAtAudioStart",
        Some(m) => m
            .as_str()
            .filter(|m| LID_MODES.contains(m))
            .ok_or_else(|| bad(&format!("unknown mode {m}")))?,
    };
    Ok(Some(Lid {
        languages,
        continuous: mode == "DetectContinuous",
        found: None,
    }))
}

/// Which candidate `text` is most likely in, by its common words (Malay or English; other
/// candidates are never guessed): the fallback when the script names no language.
fn guess_language(text: &str, candidates: &[String]) -> String {
    const ENGLISH: [&str; 24] = [
        "the", "is", "it", "how", "what", "much", "i", "you", "can", "please", "thank", "thanks",
        "yes", "my", "to", "a", "and", "do", "want", "hello", "bye", "of", "in", "for",
    ];
    const MALAY: [&str; 24] = [
        "saya", "anda", "apa", "berapa", "boleh", "terima", "kasih", "ya", "tidak", "nak", "mahu",
        "ini", "itu", "dan", "untuk", "harga", "selamat", "tinggal", "awak", "kami", "ke", "di",
        "yang", "khabar",
    ];
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let score = |list: &[&str]| words.iter().filter(|w| list.contains(&w.as_str())).count();
    let base = if score(&ENGLISH) > score(&MALAY) {
        "en"
    } else {
        "ms"
    };
    candidates
        .iter()
        .find(|c| {
            c.split('-')
                .next()
                .is_some_and(|p| p.eq_ignore_ascii_case(base))
        })
        .or(candidates.first())
        .cloned()
        .unwrap_or_default()
}

/// A `RecognitionStatus` as the configuration asks: its name, or the SDK enum's number.
fn status_value(cfg: &FakeAzureConfig, status: &str) -> Value {
    match RECOGNITION_STATUSES.iter().position(|s| *s == status) {
        Some(n) if cfg.status_as_number => json!(n),
        _ => json!(status),
    }
}

fn transcript(list: &[String], i: usize) -> String {
    if list.is_empty() {
        return String::new();
    }
    list.get(i % list.len()).cloned().unwrap_or_default()
}

async fn close(socket: &mut ServerSocket, code: u16, reason: &str) {
    // Close reasons are limited to 123 bytes.
    let reason: String = reason.chars().take(100).collect();
    let frame = CloseFrame {
        code: code.into(),
        reason: reason.into(),
    };
    let _ = timeout(
        Duration::from_secs(1),
        socket.send(Message::Close(Some(frame))),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    use super::*;

    const RID: &str = "0123456789ABCDEF0123456789ABCDEF";
    const TS: &str = "2026-05-01T10:00:00.000Z";

    // The client's side of the protocol, written out by hand from the documentation (not
    // with the client's builders, which these tests must not trust).

    fn text_frame(path: &str, body: &str) -> WsMessage {
        WsMessage::text(format!(
            "Path: {path}\r\nX-RequestId: {RID}\r\nX-Timestamp: {TS}\r\nContent-Type: application/json\r\n\r\n{body}"
        ))
    }

    fn config_frame() -> WsMessage {
        text_frame(
            "speech.config",
            r#"{"context":{"system":{"name":"SpeechSDK","build":"JavaScript"}}}"#,
        )
    }

    fn audio_frame(content_type: Option<&str>, payload: &[u8]) -> WsMessage {
        let mut head = format!("Path: audio\r\nX-RequestId: {RID}\r\nX-Timestamp: {TS}\r\n");
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        let mut f = u16::try_from(head.len()).unwrap().to_be_bytes().to_vec();
        f.extend_from_slice(head.as_bytes());
        f.extend_from_slice(payload);
        WsMessage::binary(f)
    }

    fn wav_header_frame(rate: u32) -> WsMessage {
        let mut h = b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x01\0\x01\0".to_vec();
        h.extend(rate.to_le_bytes());
        h.extend((rate * 2).to_le_bytes());
        h.extend(b"\x02\0\x10\0data\0\0\0\0");
        assert_eq!(h.len(), 44);
        audio_frame(Some("audio/x-wav"), &h)
    }

    fn end_of_stream_frame() -> WsMessage {
        audio_frame(None, &[])
    }

    /// A service message: its `Path` and JSON body (`Null` when empty).
    #[derive(Debug, PartialEq)]
    struct Said {
        path: String,
        body: Value,
    }

    fn said(frame: &str) -> Said {
        let (head, body) = frame.split_once("\r\n\r\n").expect("blank line");
        let path = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("Path: "))
            .expect("Path header");
        assert!(head.contains(&format!("X-RequestId: {RID}")), "{head}");
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap()
        };
        Said {
            path: path.to_owned(),
            body,
        }
    }

    type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn open(fake: &FakeAzure, path: &str, query: &str) -> Client {
        let url = format!("ws://{}{path}?language=ms-MY{query}", fake.addr);
        let req = url.into_client_request().unwrap();
        tokio_tungstenite::connect_async(req).await.unwrap().0
    }

    /// Reads until close; returns the parsed messages and the close code.
    async fn read_all(ws: &mut Client) -> (Vec<Said>, Option<u16>) {
        let mut out = Vec::new();
        loop {
            match timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("fake hung")
            {
                Some(Ok(WsMessage::Text(t))) => {
                    let m = said(&t);
                    let end = m.path == "turn.end";
                    out.push(m);
                    if end {
                        return (out, None);
                    }
                }
                Some(Ok(WsMessage::Close(f))) => return (out, f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return (out, None),
            }
        }
    }

    async fn send_all(ws: &mut Client, frames: Vec<WsMessage>) {
        for f in frames {
            ws.send(f).await.unwrap();
        }
    }

    fn cfg() -> FakeAzureConfig {
        FakeAzureConfig {
            final_delay_ms: 0,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn universal_v2_path_and_headerless_16k() {
        let fake = FakeAzure::spawn(cfg()).await.unwrap();
        let mut ws = open(
            &fake,
            "/stt/speech/universal/v2",
            "&segmentationSilenceTimeoutMs=200",
        )
        .await;
        // No WAV header: raw 16 kHz PCM. 0.5 s of loud square wave, 0.5 s of silence.
        let mut pcm = Vec::new();
        for i in 0..8000 {
            pcm.push(if (i / 20) % 2 == 0 { 8000i16 } else { -8000 });
        }
        pcm.extend(std::iter::repeat_n(0i16, 8000));
        let mut bytes = Vec::new();
        pcm::samples_to_le_bytes(&pcm, &mut bytes);
        send_all(
            &mut ws,
            vec![
                config_frame(),
                audio_frame(None, &bytes),
                end_of_stream_frame(),
            ],
        )
        .await;
        let (msgs, code) = read_all(&mut ws).await;
        assert_eq!(code, None);
        assert_eq!(msgs.first().map(|m| m.path.as_str()), Some("turn.start"));
        assert!(msgs.contains(&Said {
            path: "speech.phrase".into(),
            body: json!({"RecognitionStatus": "Success", "DisplayText": "Helo, apa khabar?",
                "Offset": 0, "Duration": 5_000_000, "Channel": 0}),
        }));
        assert!(
            msgs.iter()
                .any(|m| m.path == "speech.hypothesis" && m.body["Text"] == "Helo,")
        );
        let st = fake.stats();
        assert_eq!(st.sample_rates, vec![16000]);
        assert_eq!(st.segmentation_silence_ms, vec![200]);
    }

    /// `phrases` times 0.5 s of loud square wave and 0.5 s of silence, 16 kHz PCM bytes.
    fn square_phrases(phrases: usize) -> Vec<u8> {
        let mut pcm = Vec::new();
        for _ in 0..phrases {
            for i in 0..8000 {
                pcm.push(if (i / 20) % 2 == 0 { 8000i16 } else { -8000 });
            }
            pcm.extend(std::iter::repeat_n(0i16, 8000));
        }
        let mut bytes = Vec::new();
        pcm::samples_to_le_bytes(&pcm, &mut bytes);
        bytes
    }

    /// The `speech.context` of a client asking for continuous identification (as the
    /// documentation describes the section, written out by hand).
    fn lid_context_frame(languages: &str, mode: &str) -> WsMessage {
        text_frame(
            "speech.context",
            &format!(
                r#"{{"phraseDetection":{{"mode":"Conversation","conversation":{{"segmentation":{{"mode":"Custom","segmentationSilenceTimeoutMs":200}}}}}},"languageId":{{"languages":{languages},"mode":"{mode}","onSuccess":{{"action":"Recognize"}},"onUnknown":{{"action":"None"}},"priority":"PrioritizeLatency"}}}}"#
            ),
        )
    }

    #[tokio::test]
    async fn language_identification_reports_each_phrases_language() {
        let fake = FakeAzure::spawn(FakeAzureConfig {
            transcripts: vec![
                "Berapa harga pakej asas?".into(),
                "How much is the premium plan?".into(),
                "Terima kasih.".into(),
            ],
            // The third is left to the fake's guess.
            transcript_languages: vec!["ms-MY".into(), "en-US".into()],
            ..cfg()
        })
        .await
        .unwrap();
        let mut ws = open(&fake, "/speech/universal/v2", "&lidEnabled=true").await;
        send_all(
            &mut ws,
            vec![
                config_frame(),
                lid_context_frame(r#"["ms-MY","en-US"]"#, "DetectContinuous"),
                audio_frame(None, &square_phrases(3)),
                end_of_stream_frame(),
            ],
        )
        .await;
        let (msgs, code) = read_all(&mut ws).await;
        assert_eq!(code, None);
        let phrases: Vec<(&str, &str)> = msgs
            .iter()
            .filter(|m| m.path == "speech.phrase" && m.body["RecognitionStatus"] == "Success")
            .map(|m| {
                assert_eq!(m.body["PrimaryLanguage"]["Confidence"], "High");
                (
                    m.body["DisplayText"].as_str().unwrap(),
                    m.body["PrimaryLanguage"]["Language"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            phrases,
            [
                ("Berapa harga pakej asas?", "ms-MY"),
                ("How much is the premium plan?", "en-US"),
                ("Terima kasih.", "ms-MY"),
            ]
        );
        // Hypotheses say the language too (the SDK reads it from them as well).
        assert!(msgs.iter().any(|m| m.path == "speech.hypothesis"
            && m.body["Text"] == "How"
            && m.body["PrimaryLanguage"]["Language"] == "en-US"));
        let st = fake.stats();
        assert_eq!(st.lid_enabled, [true]);
        assert_eq!(st.detected_languages, ["ms-MY", "en-US", "ms-MY"]);
        assert!(st.violations.is_empty(), "{:?}", st.violations);
    }

    #[tokio::test]
    async fn at_start_identification_keeps_the_first_language() {
        let fake = FakeAzure::spawn(FakeAzureConfig {
            transcripts: vec!["Helo.".into(), "How much?".into()],
            transcript_languages: vec!["ms-MY".into(), "en-US".into()],
            ..cfg()
        })
        .await
        .unwrap();
        let mut ws = open(&fake, PATHS[0], "").await;
        send_all(
            &mut ws,
            vec![
                config_frame(),
                lid_context_frame(r#"["ms-MY","en-US"]"#, "DetectAtAudioStart"),
                audio_frame(None, &square_phrases(2)),
                end_of_stream_frame(),
            ],
        )
        .await;
        let _ = read_all(&mut ws).await;
        assert_eq!(fake.stats().detected_languages, ["ms-MY", "ms-MY"]);
    }

    #[tokio::test]
    async fn without_language_identification_phrases_name_no_language() {
        let fake = FakeAzure::spawn(FakeAzureConfig {
            transcript_languages: vec!["en-US".into()],
            ..cfg()
        })
        .await
        .unwrap();
        let mut ws = open(&fake, PATHS[0], "").await;
        send_all(
            &mut ws,
            vec![
                config_frame(),
                audio_frame(None, &square_phrases(1)),
                end_of_stream_frame(),
            ],
        )
        .await;
        let (msgs, _) = read_all(&mut ws).await;
        assert!(msgs.iter().any(|m| m.path == "speech.phrase"));
        assert!(msgs.iter().all(|m| m.body.get("PrimaryLanguage").is_none()));
        assert!(fake.stats().detected_languages.is_empty());
    }

    #[tokio::test]
    async fn a_malformed_language_id_section_is_refused() {
        let fake = FakeAzure::spawn(cfg()).await.unwrap();
        for (languages, mode) in [
            ("[]", "DetectContinuous"),
            (r#"["ms-MY",3]"#, "DetectContinuous"),
            (r#""ms-MY""#, "DetectContinuous"),
            (r#"["ms-MY","en-US"]"#, "Sometimes"),
            (
                r#"["a-A","b-B","c-C","d-D","e-E","f-F","g-G","h-H","i-I","j-J","k-K"]"#,
                "DetectContinuous",
            ),
        ] {
            let code = expect_close(
                &fake,
                vec![config_frame(), lid_context_frame(languages, mode)],
            )
            .await;
            assert_eq!(code, Some(1007), "{languages} {mode}");
        }
    }

    #[test]
    fn the_guess_picks_malay_or_english_among_the_candidates() {
        let c = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let both = c(&["ms-MY", "en-US"]);
        assert_eq!(guess_language("How much is it?", &both), "en-US");
        assert_eq!(guess_language("Berapa harganya?", &both), "ms-MY");
        assert_eq!(guess_language("Okay", &c(&["en-GB", "ms-MY"])), "ms-MY");
        assert_eq!(guess_language("Thank you", &c(&["zh-CN"])), "zh-CN");
    }

    /// 8 kHz PCM bytes: `tone_ms` of a loud square wave, then `silence_ms` of silence.
    fn tone_then_silence(tone_ms: usize, silence_ms: usize) -> Vec<u8> {
        let mut pcm: Vec<i16> = (0..tone_ms * 8)
            .map(|i| if (i / 10) % 2 == 0 { 8000 } else { -8000 })
            .collect();
        pcm.extend(std::iter::repeat_n(0i16, silence_ms * 8));
        let mut bytes = Vec::new();
        pcm::samples_to_le_bytes(&pcm, &mut bytes);
        bytes
    }

    /// Reads until a `speech.hypothesis`; returns its text.
    async fn next_hypothesis(ws: &mut Client) -> String {
        loop {
            match timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("fake hung")
            {
                Some(Ok(WsMessage::Text(t))) => {
                    let m = said(&t);
                    if m.path == "speech.hypothesis" {
                        return m.body["Text"].as_str().unwrap().to_owned();
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("no hypothesis: {other:?}"),
            }
        }
    }

    fn final_text(msgs: &[Said]) -> String {
        msgs.iter()
            .find(|m| m.path == "speech.phrase" && m.body["RecognitionStatus"] == "Success")
            .map(|m| m.body["DisplayText"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    fn phrase_cfg() -> FakeAzureConfig {
        FakeAzureConfig {
            transcripts: vec!["satu dua tiga".into(), "empat lima enam".into()],
            // Only the hypothesis at the pause (no periodic ones within a short phrase).
            hypothesis_every_ms: 10_000,
            ..cfg()
        }
    }

    /// Many calls share one fake: a phrase's final says what its hypothesis said even when
    /// another connection's phrase is sent in between (a reply started on the hypothesis
    /// must be confirmed by the final).
    #[tokio::test]
    async fn a_phrases_final_says_what_its_hypothesis_said_across_connections() {
        let fake = FakeAzure::spawn(phrase_cfg()).await.unwrap();
        let query = "&segmentationSilenceTimeoutMs=200";
        let mut a = open(&fake, PATHS[0], query).await;
        send_all(
            &mut a,
            vec![
                config_frame(),
                wav_header_frame(8000),
                audio_frame(None, &tone_then_silence(400, 40)),
            ],
        )
        .await;
        let a_hypothesis = next_hypothesis(&mut a).await;
        // Another call says a whole phrase meanwhile.
        let mut b = open(&fake, PATHS[0], query).await;
        send_all(
            &mut b,
            vec![
                config_frame(),
                wav_header_frame(8000),
                audio_frame(None, &tone_then_silence(400, 400)),
                end_of_stream_frame(),
            ],
        )
        .await;
        let (b_msgs, _) = read_all(&mut b).await;
        send_all(
            &mut a,
            vec![
                audio_frame(None, &tone_then_silence(0, 400)),
                end_of_stream_frame(),
            ],
        )
        .await;
        let (a_msgs, _) = read_all(&mut a).await;
        assert_eq!(final_text(&a_msgs), a_hypothesis);
        let b_hypothesis = b_msgs
            .iter()
            .find(|m| m.path == "speech.hypothesis")
            .map(|m| m.body["Text"].as_str().unwrap().to_owned());
        assert_eq!(Some(final_text(&b_msgs)), b_hypothesis);
        assert_ne!(final_text(&a_msgs), final_text(&b_msgs));
    }

    /// With `revise_every`, the final revises what the hypothesis said (its last word), for
    /// benchmarking the replies started on a hypothesis and thrown away.
    #[tokio::test]
    async fn revised_phrases_finals_differ_from_their_hypotheses() {
        let fake = FakeAzure::spawn(FakeAzureConfig {
            revise_every: 2,
            ..phrase_cfg()
        })
        .await
        .unwrap();
        let mut ws = open(&fake, PATHS[0], "&segmentationSilenceTimeoutMs=200").await;
        send_all(&mut ws, vec![config_frame(), wav_header_frame(8000)]).await;
        let mut said_then_final = Vec::new();
        for _ in 0..2 {
            send_all(
                &mut ws,
                vec![audio_frame(None, &tone_then_silence(400, 40))],
            )
            .await;
            let hypothesis = next_hypothesis(&mut ws).await;
            send_all(&mut ws, vec![audio_frame(None, &tone_then_silence(0, 400))]).await;
            let fin = loop {
                let m = match timeout(Duration::from_secs(10), ws.next()).await {
                    Ok(Some(Ok(WsMessage::Text(t)))) => said(&t),
                    other => panic!("{other:?}"),
                };
                if m.path == "speech.phrase" {
                    break m.body["DisplayText"].as_str().unwrap().to_owned();
                }
            };
            said_then_final.push((hypothesis, fin));
        }
        assert_eq!(
            said_then_final,
            [
                ("satu dua tiga".to_owned(), "satu dua tiga".to_owned()),
                ("empat lima".to_owned(), "empat lima enam".to_owned()),
            ]
        );
    }

    /// Line noise peaks above the speech level now and then: too short to be a phrase.
    #[tokio::test]
    async fn bursts_shorter_than_a_phrase_are_not_recognised() {
        let fake = FakeAzure::spawn(FakeAzureConfig {
            min_phrase_voiced_ms: 100,
            ..phrase_cfg()
        })
        .await
        .unwrap();
        let mut ws = open(&fake, PATHS[0], "&segmentationSilenceTimeoutMs=200").await;
        let mut audio = tone_then_silence(40, 400);
        audio.extend(tone_then_silence(400, 400));
        send_all(
            &mut ws,
            vec![
                config_frame(),
                wav_header_frame(8000),
                audio_frame(None, &audio),
                end_of_stream_frame(),
            ],
        )
        .await;
        let (msgs, _) = read_all(&mut ws).await;
        let phrases: Vec<&Said> = msgs
            .iter()
            .filter(|m| m.path == "speech.phrase" && m.body["RecognitionStatus"] == "Success")
            .collect();
        assert_eq!(phrases.len(), 1, "{msgs:?}");
        // The phrase is the tone, 440 ms in.
        assert_eq!(phrases[0].body["Offset"], 4_400_000);
        assert_eq!(phrases[0].body["DisplayText"], "satu dua tiga");
    }

    async fn expect_close(fake: &FakeAzure, frames: Vec<WsMessage>) -> Option<u16> {
        let mut ws = open(fake, PATHS[0], "").await;
        for f in frames {
            if ws.send(f).await.is_err() {
                break;
            }
        }
        read_all(&mut ws).await.1
    }

    #[tokio::test]
    async fn protocol_violations_close_the_connection() {
        let fake = FakeAzure::spawn(cfg()).await.unwrap();
        let config = config_frame;
        let header = wav_header_frame;
        let bad_context = text_frame("speech.context", "{");
        for (what, frames, code) in [
            ("audio before speech.config", vec![header(8000)], 1002),
            (
                "missing X-RequestId",
                vec![WsMessage::text("Path: speech.context\r\n\r\n{}")],
                1002,
            ),
            (
                "missing Path",
                vec![WsMessage::text(format!("X-RequestId: {RID}\r\n\r\n{{}}"))],
                1002,
            ),
            ("44.1 kHz", vec![config(), header(44100)], 1007),
            ("bad JSON context", vec![config(), bad_context], 1007),
        ] {
            assert_eq!(expect_close(&fake, frames).await, Some(code), "{what}");
        }
        // Reusing a request id after turn.end.
        let mut ws = open(&fake, PATHS[0], "").await;
        send_all(&mut ws, vec![config(), header(8000), end_of_stream_frame()]).await;
        let (msgs, _) = read_all(&mut ws).await;
        assert_eq!(msgs.last().map(|m| m.path.as_str()), Some("turn.end"));
        ws.send(header(8000)).await.unwrap();
        assert_eq!(read_all(&mut ws).await.1, Some(1002));
        assert_eq!(fake.stats().violations.len(), 6);
    }

    #[tokio::test]
    async fn python_sdk_spelling_of_the_mode_section() {
        let fake = FakeAzure::spawn(cfg()).await.unwrap();
        let mut ws = open(&fake, PATHS[0], "").await;
        send_all(
            &mut ws,
            vec![
                config_frame(),
                text_frame(
                    "speech.context",
                    r#"{"phraseDetection":{"mode":"CONVERSATION","CONVERSATION":{"segmentation":{"mode":"Custom","segmentationSilenceTimeoutMs":700}}}}"#,
                ),
                wav_header_frame(8000),
                end_of_stream_frame(),
            ],
        )
        .await;
        read_all(&mut ws).await;
        assert_eq!(fake.stats().segmentation_silence_ms, vec![700]);
    }

    #[tokio::test]
    async fn speech_config_without_a_request_id_is_accepted() {
        // As the Python SDK sends it; the real service accepts it.
        let fake = FakeAzure::spawn(cfg()).await.unwrap();
        let mut ws = open(&fake, PATHS[0], "").await;
        send_all(
            &mut ws,
            vec![
                WsMessage::text("Path: speech.config\r\nContent-Type: application/json\r\n\r\n{}"),
                wav_header_frame(8000),
                end_of_stream_frame(),
            ],
        )
        .await;
        let (msgs, code) = read_all(&mut ws).await;
        assert_eq!(code, None);
        assert_eq!(msgs.last().map(|m| m.path.as_str()), Some("turn.end"));
        assert!(fake.stats().violations.is_empty());
    }

    #[tokio::test]
    async fn auth_in_header_or_bearer_never_in_the_url() {
        let fake = FakeAzure::spawn(FakeAzureConfig {
            key: Some("k1".into()),
            ..cfg()
        })
        .await
        .unwrap();
        let status = |url: String, header: Option<(&'static str, &'static str)>| async move {
            let mut req = url.into_client_request().unwrap();
            if let Some((n, v)) = header {
                req.headers_mut().insert(n, v.parse().unwrap());
            }
            match tokio_tungstenite::connect_async(req).await {
                Ok(_) => 101,
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
                Err(e) => panic!("{e}"),
            }
        };
        let base = format!("ws://{}{}?language=ms-MY", fake.addr, PATHS[2]);
        assert_eq!(status(base.clone(), None).await, 403);
        assert_eq!(
            status(base.clone(), Some(("Ocp-Apim-Subscription-Key", "nope"))).await,
            401
        );
        assert_eq!(
            status(base.clone(), Some(("Ocp-Apim-Subscription-Key", "k1"))).await,
            101
        );
        assert_eq!(
            status(base.clone(), Some(("Authorization", "Bearer k1"))).await,
            101
        );
        assert_eq!(
            status(format!("{base}&Ocp-Apim-Subscription-Key=k1"), None).await,
            401,
            "a key in the URL is refused"
        );
        assert_eq!(
            status(
                format!("{base}&Ocp-Apim-Subscription-Key=k1"),
                Some(("Ocp-Apim-Subscription-Key", "k1"))
            )
            .await,
            401,
            "even beside the right header"
        );
        let no_lang = format!("ws://{}{}", fake.addr, PATHS[1]);
        assert_eq!(
            status(no_lang, Some(("Ocp-Apim-Subscription-Key", "k1"))).await,
            400
        );
        assert_eq!(fake.stats().rejected_auth, 4);
        // The official JavaScript SDK copies the key into the URL: allowed when asked for.
        let sdk_fake = FakeAzure::spawn(FakeAzureConfig {
            key: Some("k1".into()),
            allow_key_in_url: true,
            ..cfg()
        })
        .await
        .unwrap();
        let base = format!("ws://{}{}?language=ms-MY", sdk_fake.addr, PATHS[0]);
        assert_eq!(
            status(
                format!("{base}&Ocp-Apim-Subscription-Key=k1"),
                Some(("Ocp-Apim-Subscription-Key", "k1"))
            )
            .await,
            101
        );
        assert_eq!(
            status(format!("{base}&Ocp-Apim-Subscription-Key=k1"), None).await,
            101
        );
        assert_eq!(
            status(format!("{base}&Ocp-Apim-Subscription-Key=k2"), None).await,
            401
        );
        // Without a configured key, anything goes except a key in the URL.
        let open_fake = FakeAzure::spawn(cfg()).await.unwrap();
        let base = format!("ws://{}{}?language=ms-MY", open_fake.addr, PATHS[0]);
        assert_eq!(status(base.clone(), None).await, 101);
        assert_eq!(
            status(format!("{base}&ocp-apim-subscription-key=x"), None).await,
            401
        );
    }
}
