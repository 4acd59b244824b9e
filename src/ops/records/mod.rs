//! Per-call records: who called, how long, why it ended, what was said, how fast each turn
//! was and what it cost.
//!
//! With a database `records.url` (`sqlite:///...` or `postgres://...`) a call's row is
//! written when it starts, its transcript, turns, tool calls and errors as it goes, and the
//! row is completed when it ends ([`store`]); the webhook is delivered from an outbox table
//! in the same database, signed, with retries ([`webhook`]); [`query`] reads it all back.
//! A `file:///...` URL keeps the older sink: one JSON line per call appended to a file, and
//! a best-effort webhook POST.
//!
//! A call never waits for any of it: everything goes through bounded queues to writer
//! tasks. When a queue is full the item is dropped, counted and logged, rather than
//! stalling a call or growing memory without bound.

pub mod db;
pub mod live;
pub mod query;
pub mod recording;
pub mod spool;
pub mod store;
pub mod webhook;

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt as _;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::config::{AgentMode, RecordsSettings, Settings, WebhookSettings};
use super::metrics::{EndReason, Metrics};
use crate::call::CallOutcome;

/// Records waiting for the file writer.
const FILE_QUEUE: usize = 1024;
/// Records waiting for the webhook.
const WEBHOOK_QUEUE: usize = 256;
/// Webhook POSTs in flight at once.
const WEBHOOK_CONCURRENCY: usize = 4;
/// Whole-request deadline for one webhook POST.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest batch of lines written to the file in one write.
const MAX_FILE_BATCH: usize = 1 << 20;

/// One call, as stored and sent when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The UUID Asterisk sent.
    pub call_id: uuid::Uuid,
    /// Asterisk's address.
    pub peer: SocketAddr,
    /// When the call started, RFC 3339 UTC (see [`rfc3339_utc`]).
    pub started_at: String,
    /// Call length.
    pub duration_ms: u64,
    /// Why it ended.
    pub end_reason: EndReason,
    /// `ai` or `echo`.
    pub mode: AgentMode,
    /// The call's audio rate (8000 or 16000).
    pub sample_rate: u32,
    /// Audio frames received.
    pub frames_in: u64,
    /// Audio frames sent.
    pub frames_out: u64,
    /// Playout underruns.
    pub underruns: u64,
    /// DTMF digits received, in order.
    pub dtmf: String,
    /// What was said, in order.
    pub transcript: Vec<TranscriptEntry>,
    /// Per-turn timings.
    pub turns: Vec<TurnTiming>,
    /// LLM cost reported by the provider, if any.
    pub llm_cost: Option<f64>,
    /// The daemon that took the call (`records.node_id`).
    #[serde(default)]
    pub node_id: String,
    /// When the call ended, RFC 3339 UTC.
    #[serde(default)]
    pub ended_at: String,
    /// The caller's number, as the PBX told it.
    #[serde(default)]
    pub caller_number: Option<String>,
    /// The caller's name.
    #[serde(default)]
    pub caller_name: Option<String>,
    /// The dialled number.
    #[serde(default)]
    pub did: Option<String>,
    /// The profile that served the call.
    #[serde(default)]
    pub profile: Option<String>,
    /// How the call ended, as the dialplan was told.
    #[serde(default)]
    pub outcome: Option<CallOutcome>,
    /// Where the call was transferred (the target's name), if it was.
    #[serde(default)]
    pub transfer_target: Option<String>,
    /// Turn latency (the caller's end of speech to the reply's first frame) over the call.
    #[serde(default)]
    pub latency: Option<LatencySummary>,
    /// Tools the agent called.
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    /// What the call cost, by component.
    #[serde(default)]
    pub cost: Option<CallCost>,
    /// The call's stereo recording (caller left, agent right), if one was made.
    #[serde(default)]
    pub recording_path: Option<String>,
    /// Caller audio streamed to the recogniser, ms.
    #[serde(default)]
    pub stt_audio_ms: u64,
    /// Characters of reply text synthesized.
    #[serde(default)]
    pub tts_characters: u64,
    /// Times the caller talked over the agent.
    #[serde(default)]
    pub barge_ins: u32,
    /// When each barge-in was decided, ms since the call started.
    #[serde(default)]
    pub barge_in_ms: Vec<u64>,
    /// ... of which carried no words, and the agent went on.
    #[serde(default)]
    pub resumes: u32,
    /// Replies started on the recogniser's hypothesis before its final.
    #[serde(default)]
    pub speculative: Speculation,
    /// Provider or pipeline errors during the call, one line each.
    pub errors: Vec<String>,
}

/// Who produced a transcript entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The caller (STT result).
    Caller,
    /// The agent (LLM reply text).
    Agent,
    /// A DTMF digit.
    Dtmf,
}

/// Replies started on Azure's hypothesis before its final.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Speculation {
    /// Requests started on a hypothesis.
    pub started: u32,
    /// ... whose hypothesis the final confirmed (the reply went on, time saved).
    pub used: u32,
    /// ... thrown away (the final differed, or the caller went on talking).
    pub wasted: u32,
    /// Estimated tokens of the wasted requests (prompt and what had streamed).
    pub wasted_tokens: u64,
}

/// One line of the transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptEntry {
    /// Who.
    pub role: Role,
    /// What (for the agent: the text actually generated; see `interrupted`).
    pub text: String,
    /// When the line was settled, ms since call start (the caller's: the recogniser's
    /// final; the agent's: the end of its playback).
    pub at_ms: u64,
    /// The agent was cut off by a barge-in before finishing this reply.
    pub interrupted: bool,
    /// When the words started as heard or said, ms since call start: the agent's first
    /// frame written, the caller's voice onset (VAD).
    #[serde(default)]
    pub start_ms: Option<u64>,
    /// When they ended: the agent's last frame heard, the caller's end of speech (VAD).
    #[serde(default)]
    pub end_ms: Option<u64>,
}

/// One tool call as the record keeps it (name, redacted arguments, when, how long, status).
pub use crate::call::tools::ToolCallRecord as ToolCall;

/// A provider or pipeline error during a call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallError {
    /// When it was noticed, ms since call start.
    pub at_ms: u64,
    /// What it said.
    pub text: String,
}

/// Turn latency over one call, ms from the caller's end of speech (or the recogniser's
/// final) to the reply's first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50_ms: u64,
    /// 95th percentile (nearest rank).
    pub p95_ms: u64,
    /// Worst.
    pub max_ms: u64,
}

impl LatencySummary {
    /// Over the turns that reached their first frame; `None` when none did.
    pub fn of(turns: &[TurnTiming]) -> Option<Self> {
        let mut v: Vec<u64> = turns
            .iter()
            .filter_map(|t| {
                let from = t.speech_end_ms.or(t.stt_final_ms)?;
                Some(t.first_frame_ms?.saturating_sub(from))
            })
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Self {
            p50_ms: rank(0.50),
            p95_ms: rank(0.95),
            max_ms: v[v.len() - 1],
        })
    }
}

/// What a call cost, by component, in `currency`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallCost {
    /// The LLM's cost as the service reported it (OpenRouter's `usage.cost`), every
    /// request whose usage arrived, speculative ones included.
    pub llm: f64,
    /// Requests abandoned before their usage arrived (wasted speculation, barge-ins),
    /// estimated from their tokens at `pricing.llm_per_million_tokens`; included in `total`.
    pub llm_abandoned_estimate: f64,
    /// Speech-to-text: `stt_audio_seconds` at `pricing.stt_per_hour`.
    pub stt: f64,
    /// Text-to-speech: `tts_characters` at `pricing.tts_per_1k_chars`.
    pub tts: f64,
    /// All of it.
    pub total: f64,
    /// `pricing.currency`.
    pub currency: String,
    /// Audio streamed to the recogniser.
    pub stt_audio_seconds: f64,
    /// Characters synthesized for this call (cached fixed phrases are not).
    pub tts_characters: u64,
    /// The total in Malaysian ringgit, when `pricing.myr_rate` is set.
    #[serde(default)]
    pub total_myr: Option<f64>,
}

/// Timestamps of one turn, ms since call start; `None` when the turn never got there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnTiming {
    /// The VAD saw the caller stop talking.
    pub speech_end_ms: Option<u64>,
    /// STT final result.
    pub stt_final_ms: Option<u64>,
    /// First LLM token.
    pub llm_first_token_ms: Option<u64>,
    /// First TTS audio.
    pub tts_first_audio_ms: Option<u64>,
    /// First reply frame written to Asterisk.
    pub first_frame_ms: Option<u64>,
}

/// Formats a time as RFC 3339 UTC with milliseconds, e.g. `2024-05-01T09:30:00.250Z`.
/// Times before 1970 are clamped to the epoch.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A record destination that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordsError {
    /// A URL is malformed or has an unsupported scheme.
    #[error("invalid value for key `{key}`: {reason}")]
    Config {
        /// `records.url` or `webhook.url`.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The records file or its directory cannot be created or opened.
    #[error("cannot open call records file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The webhook HTTP client could not be built.
    #[error("cannot build the webhook HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// A sink is enabled but there is no tokio runtime to run its writer task.
    #[error("call records need a tokio runtime (construct the RecordSink inside the runtime)")]
    NoRuntime,
    /// The records database refused (connecting, migrating, a query).
    #[error("cannot {what}: {}", webhook::error_chain(.source.as_ref()))]
    Db {
        /// What was being done.
        what: &'static str,
        /// The driver's error.
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The spool could not be read.
    #[error("records spool: {0}")]
    Spool(String),
}

impl RecordsError {
    /// A database error while doing `what`.
    pub fn db(what: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Db {
            what,
            source: Box::new(e),
        }
    }
}

/// Where finished calls go. Share it (`Arc<RecordSink>`) between calls.
#[derive(Debug)]
pub struct RecordSink {
    file: Option<mpsc::Sender<Bytes>>,
    webhook: Option<mpsc::Sender<Bytes>>,
    closing: CancellationToken,
    workers: Mutex<Vec<JoinHandle<()>>>,
    dropped: AtomicU64,
    /// Set by [`RecordSink::reopen`]; the file writer reopens the path before its next write.
    reopen: Arc<AtomicBool>,
    /// The database writer, when `records.url` names a database.
    store: Option<Arc<store::Store>>,
    /// Pricing, node id and recordings for the records this sink completes.
    pub(crate) finish: Option<Arc<live::FinishSettings>>,
}

impl RecordSink {
    /// A sink that stores nothing.
    pub fn disabled() -> Self {
        Self {
            file: None,
            webhook: None,
            closing: CancellationToken::new(),
            workers: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            reopen: Arc::new(AtomicBool::new(false)),
            store: None,
            finish: None,
        }
    }

    /// Opens what the settings name: a database (connected, migrated, its spool replayed,
    /// crashed calls closed, the webhook outbox poster started) or the JSON-lines file and
    /// best-effort webhook. Must be called inside a tokio runtime.
    pub async fn open(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self, RecordsError> {
        let finish = Arc::new(live::FinishSettings::from_settings(
            settings,
            Some(Arc::clone(&metrics)),
        ));
        let Some(url) =
            db::DbUrl::parse(&settings.records.url).map_err(|reason| RecordsError::Config {
                key: "records.url",
                reason,
            })?
        else {
            let mut sink = Self::new(&settings.records, &settings.webhook)?;
            sink.finish = Some(finish);
            return Ok(sink);
        };
        let webhook_url = parse_webhook_url(&settings.webhook.url)?;
        let db = db::Db::open(&url, 4).await?;
        let r = &settings.records;
        let cfg = store::StoreConfig {
            node_id: finish.node_id.clone(),
            queue: usize::try_from(r.queue).unwrap_or(usize::MAX),
            spool_dir: spool_dir(r, &url),
            spool_max_bytes: r.spool_max_mb.saturating_mul(1 << 20),
            retention_days: r.retention_days,
            webhook: webhook_url.is_some(),
        };
        let store = store::Store::start(db.clone(), cfg, Arc::clone(&metrics)).await?;
        let mut sink = Self::disabled();
        if let Some(url) = webhook_url {
            let w = &settings.webhook;
            let cfg = webhook::WebhookConfig {
                url,
                secret: std::env::var(webhook::SECRET_ENV)
                    .ok()
                    .filter(|s| !s.is_empty())
                    .map(String::into_bytes),
                backoff_initial: Duration::from_millis(w.backoff_initial_ms),
                backoff_max: Duration::from_millis(w.backoff_max_ms.max(w.backoff_initial_ms)),
                timeout: Duration::from_millis(w.timeout_ms),
                node_id: finish.node_id.clone(),
            };
            let poster = webhook::start(
                db,
                cfg,
                metrics,
                Arc::clone(&store.outbox_ready),
                sink.closing.clone(),
            )?;
            sink.workers = Mutex::new(vec![poster]);
        }
        tracing::info!(
            backend = url.backend(),
            node_id = %finish.node_id,
            "call records database ready"
        );
        sink.store = Some(store);
        sink.finish = Some(finish);
        Ok(sink)
    }

    /// This daemon's name in the records.
    pub fn node_id(&self) -> &str {
        self.finish.as_ref().map_or("", |f| f.node_id.as_str())
    }

    /// The records database, when there is one: what the console reads through [`query`].
    pub fn db(&self) -> Option<&db::Db> {
        self.store.as_deref().map(store::Store::db)
    }

    /// Opens the call's row and returns the handle its driver feeds as the call goes;
    /// `None` without a database.
    pub fn call_started(&self, start: store::CallStart) -> Option<live::CallTap> {
        let store = self.store.as_ref()?;
        let call_id = start.call_id;
        store.send(store::Op::Start(start));
        Some(live::CallTap::new(Arc::clone(store), call_id))
    }

    /// A recorder for a call that is to be recorded (`records.recordings_dir` set, and
    /// `record_all` or the call's `record` variable).
    pub fn recorder_for(
        &self,
        call_id: uuid::Uuid,
        ctx: &crate::call::CallContext,
        started: std::time::Instant,
    ) -> Option<recording::Recorder> {
        let f = self.finish.as_ref()?;
        let dir = f.recordings_dir.as_ref()?;
        if !recording::wanted(f.record_all, ctx) {
            return None;
        }
        let wall = SystemTime::now()
            .checked_sub(started.elapsed())
            .unwrap_or(UNIX_EPOCH);
        Some(recording::Recorder::new(
            recording::path_for(dir, call_id, wall),
            started,
        ))
    }

    /// Completes a record from a finished call's summary (node, cost, latency) as this
    /// sink's settings say.
    pub fn complete(&self, rec: &mut CallRecord) {
        if let Some(f) = &self.finish {
            f.complete(rec);
        }
    }

    /// Opens the destinations named in the configuration. `records.url` must be empty or a
    /// `file:///absolute/path` (directories are created, the file is opened for appending
    /// with mode 0640 since records hold what callers said); `webhook.url` must be empty or
    /// `http(s)://...`. Must be called inside a tokio runtime if either is set.
    pub fn new(records: &RecordsSettings, webhook: &WebhookSettings) -> Result<Self, RecordsError> {
        let file_path = parse_records_url(&records.url)?;
        let webhook_url = parse_webhook_url(&webhook.url)?;
        let mut sink = Self::disabled();
        if file_path.is_none() && webhook_url.is_none() {
            return Ok(sink);
        }
        let rt = tokio::runtime::Handle::try_current().map_err(|_| RecordsError::NoRuntime)?;
        let mut workers = Vec::new();
        if let Some(path) = file_path {
            let file = open_append(&path)?;
            let (tx, rx) = mpsc::channel(FILE_QUEUE);
            workers.push(rt.spawn(file_writer(
                tokio::fs::File::from_std(file),
                path,
                rx,
                sink.closing.clone(),
                Arc::clone(&sink.reopen),
            )));
            sink.file = Some(tx);
        }
        if let Some(url) = webhook_url {
            let client = reqwest::Client::builder()
                .timeout(WEBHOOK_TIMEOUT)
                .connect_timeout(WEBHOOK_TIMEOUT)
                .user_agent(concat!("sifucall/", env!("CARGO_PKG_VERSION")))
                .build()?;
            let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
            let secret = std::env::var(webhook::SECRET_ENV)
                .ok()
                .filter(|s| !s.is_empty())
                .map(String::into_bytes);
            workers.push(rt.spawn(webhook_poster(
                client,
                url,
                secret,
                rx,
                sink.closing.clone(),
            )));
            sink.webhook = Some(tx);
        }
        sink.workers = Mutex::new(workers);
        Ok(sink)
    }

    /// Makes the file writer close and reopen the records file before its next write, so
    /// a file moved away by logrotate is recreated at its configured path (SIGHUP).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::SeqCst);
    }

    /// Whether any destination is configured.
    pub fn is_enabled(&self) -> bool {
        self.file.is_some() || self.webhook.is_some() || self.store.is_some()
    }

    /// Records dropped so far (queue full, or submitted after [`RecordSink::close`]),
    /// counted once per destination.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queues a finished call for every destination. Never blocks.
    pub fn submit(&self, rec: CallRecord) {
        if !self.is_enabled() {
            return;
        }
        if let Some(f) = &self.finish {
            f.count_cost(&rec);
        }
        if let Some(store) = &self.store {
            store.send(store::Op::Finish(Box::new(rec)));
            return;
        }
        let mut line = match serde_json::to_vec(&rec) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(call_id = %rec.call_id, error = %e, "cannot serialise call record");
                return;
            }
        };
        line.push(b'\n');
        let line = Bytes::from(line);
        if let Some(tx) = &self.file {
            self.offer(tx, line.clone(), "file", &rec);
        }
        if let Some(tx) = &self.webhook {
            self.offer(tx, line.slice(..line.len() - 1), "webhook", &rec);
        }
    }

    fn offer(&self, tx: &mpsc::Sender<Bytes>, body: Bytes, dest: &'static str, rec: &CallRecord) {
        if let Err(e) = tx.try_send(body) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "queue full",
                mpsc::error::TrySendError::Closed(_) => "sink closed",
            };
            tracing::warn!(call_id = %rec.call_id, destination = dest, reason = why, "call record dropped");
        }
    }

    /// Stops accepting records, lets the writers finish what is queued for up to `grace`,
    /// then abandons the rest. Call once at shutdown, after the last call ended.
    pub async fn close(&self, grace: Duration) {
        if let Some(store) = &self.store {
            store.close(grace).await;
        }
        self.closing.cancel();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        let aborts: Vec<_> = workers.iter().map(JoinHandle::abort_handle).collect();
        let all = futures_util::future::join_all(workers);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                ?grace,
                "call records still pending at shutdown were abandoned"
            );
            for a in aborts {
                a.abort();
            }
        }
    }
}

/// Where a database's spool lives: `records.spool_dir`, else `spool/` beside the SQLite
/// file, else `/var/lib/sifucall/spool`.
fn spool_dir(r: &RecordsSettings, url: &db::DbUrl) -> PathBuf {
    if !r.spool_dir.trim().is_empty() {
        return PathBuf::from(r.spool_dir.trim());
    }
    match url {
        db::DbUrl::Sqlite(path) => path
            .parent()
            .map_or_else(|| PathBuf::from("spool"), |d| d.join("spool")),
        db::DbUrl::Postgres(_) => PathBuf::from("/var/lib/sifucall/spool"),
    }
}

/// `sifucall check`: connects to the records database and applies the migrations; `Ok(None)`
/// when `records.url` names no database.
pub async fn check_database(r: &RecordsSettings) -> Result<Option<&'static str>, RecordsError> {
    let Some(url) = db::DbUrl::parse(&r.url).map_err(|reason| RecordsError::Config {
        key: "records.url",
        reason,
    })?
    else {
        return Ok(None);
    };
    let db = db::Db::open(&url, 1).await?;
    db.close().await;
    Ok(Some(url.backend()))
}

fn parse_records_url(s: &str) -> Result<Option<PathBuf>, RecordsError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let bad = |reason: String| RecordsError::Config {
        key: "records.url",
        reason,
    };
    let url = Url::parse(s).map_err(|e| bad(format!("{s:?} is not a URL ({e})")))?;
    if url.scheme() != "file" {
        return Err(bad(format!(
            "scheme {:?} is not supported; use file:///absolute/path/calls.jsonl or leave it empty",
            url.scheme()
        )));
    }
    let path = url.to_file_path().map_err(|()| {
        bad(format!(
            "{s:?} is not a local absolute path (write file:///var/lib/...)"
        ))
    })?;
    if path.file_name().is_none() || s.ends_with('/') {
        return Err(bad(format!("{s:?} names a directory, not a file")));
    }
    Ok(Some(path))
}

fn parse_webhook_url(s: &str) -> Result<Option<Url>, RecordsError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let bad = |reason: String| RecordsError::Config {
        key: "webhook.url",
        reason,
    };
    let url = Url::parse(s).map_err(|e| bad(format!("not a URL ({e})")))?;
    match url.scheme() {
        "http" | "https" if url.host().is_some() => Ok(Some(url)),
        "http" | "https" => Err(bad("the URL has no host".to_owned())),
        other => Err(bad(format!(
            "scheme {other:?} is not supported; use http:// or https://"
        ))),
    }
}

fn open_append(path: &Path) -> Result<std::fs::File, RecordsError> {
    let io = |source| RecordsError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(io)
}

/// Receives the next queued item; once `closing` fires, stops accepting new items and
/// drains what is already queued.
async fn next(rx: &mut mpsc::Receiver<Bytes>, closing: &CancellationToken) -> Option<Bytes> {
    tokio::select! {
        biased;
        m = rx.recv() => m,
        () = closing.cancelled() => {
            rx.close();
            rx.recv().await
        }
    }
}

/// The only writer of the records file: batches whatever is queued into one append.
async fn file_writer(
    mut file: tokio::fs::File,
    path: PathBuf,
    mut rx: mpsc::Receiver<Bytes>,
    closing: CancellationToken,
    reopen: Arc<AtomicBool>,
) {
    let mut batch = Vec::new();
    while let Some(first) = next(&mut rx, &closing).await {
        batch.clear();
        batch.extend_from_slice(&first);
        let mut lines = 1usize;
        while batch.len() < MAX_FILE_BATCH {
            match rx.try_recv() {
                Ok(more) => {
                    batch.extend_from_slice(&more);
                    lines += 1;
                }
                Err(_) => break,
            }
        }
        if reopen.swap(false, Ordering::SeqCst) {
            match open_append(&path) {
                Ok(f) => {
                    file = tokio::fs::File::from_std(f);
                    tracing::info!(path = %path.display(), "call records file reopened");
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot reopen the call records file; still writing to the old one");
                }
            }
        }
        let written = async {
            file.write_all(&batch).await?;
            file.flush().await
        };
        if let Err(e) = written.await {
            tracing::error!(path = %path.display(), error = %e, lines, "writing call records failed; records lost");
        }
    }
}

/// POSTs each queued record, a few at a time, each with a deadline, signed as the outbox
/// poster signs. No retries: with a JSON-lines file the file is the durable copy (a
/// database `records.url` gets the retried outbox instead).
async fn webhook_poster(
    client: reqwest::Client,
    url: Url,
    secret: Option<Vec<u8>>,
    rx: mpsc::Receiver<Bytes>,
    closing: CancellationToken,
) {
    let host = url.host_str().unwrap_or_default().to_owned();
    let queue = futures_util::stream::unfold((rx, closing), |(mut rx, closing)| async move {
        let item = next(&mut rx, &closing).await?;
        Some((item, (rx, closing)))
    });
    queue
        .for_each_concurrent(WEBHOOK_CONCURRENCY, |body| {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut req = client
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Sifucall-Timestamp", ts.to_string());
            if let Some(key) = &secret {
                req = req.header("X-Sifucall-Signature", webhook::signature(key, ts, &body));
            }
            let req = req.body(body);
            let host = host.as_str();
            async move {
                match req.send().await {
                    Ok(resp) if resp.status().is_success() => {}
                    Ok(resp) => {
                        tracing::warn!(webhook_host = host, status = resp.status().as_u16(), "call record webhook rejected the record");
                    }
                    Err(e) => {
                        // Without the URL: it may carry a token.
                        let e = e.without_url();
                        let cause = webhook::error_chain(&e);
                        tracing::warn!(webhook_host = host, error = %cause, "call record webhook failed");
                    }
                }
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn record(n: u32) -> CallRecord {
        CallRecord {
            call_id: uuid::Uuid::new_v4(),
            peer: "10.0.0.5:40000".parse().unwrap(),
            started_at: rfc3339_utc(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            duration_ms: 61_000 + u64::from(n),
            end_reason: EndReason::CallerHangup,
            mode: AgentMode::Ai,
            sample_rate: 8000,
            frames_in: 3050,
            frames_out: 3049,
            underruns: 2,
            dtmf: "12#".into(),
            transcript: vec![
                TranscriptEntry {
                    role: Role::Agent,
                    text: "Selamat datang".into(),
                    at_ms: 40,
                    interrupted: false,
                    start_ms: None,
                    end_ms: None,
                },
                TranscriptEntry {
                    role: Role::Caller,
                    text: format!("Saya mahu \"tempah\"\nmeja {n}"),
                    at_ms: 2100,
                    interrupted: false,
                    start_ms: None,
                    end_ms: None,
                },
                TranscriptEntry {
                    role: Role::Dtmf,
                    text: "1".into(),
                    at_ms: 3000,
                    interrupted: false,
                    start_ms: None,
                    end_ms: None,
                },
            ],
            turns: vec![TurnTiming {
                speech_end_ms: Some(2000),
                stt_final_ms: Some(2300),
                ..Default::default()
            }],
            llm_cost: Some(0.00042),
            barge_ins: 1,
            barge_in_ms: vec![2500],
            resumes: 0,
            speculative: Speculation::default(),
            errors: vec![],
            node_id: "node-a".into(),
            ended_at: String::new(),
            caller_number: Some("+60123456789".into()),
            caller_name: None,
            did: Some("0388880000".into()),
            profile: Some("sales".into()),
            outcome: Some(CallOutcome::Completed),
            transfer_target: None,
            latency: None,
            tool_calls: vec![],
            cost: None,
            recording_path: None,
            stt_audio_ms: 0,
            tts_characters: 0,
        }
    }

    fn settings(records: &str, webhook: &str) -> (RecordsSettings, WebhookSettings) {
        (
            RecordsSettings {
                url: records.into(),
                ..Settings::defaults().records
            },
            WebhookSettings {
                url: webhook.into(),
                ..Settings::defaults().webhook
            },
        )
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "sifucall-rec-{tag}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn rfc3339_formatting() {
        let at = |ms: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(951_868_799_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(at(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(at(1_709_251_199_000), "2024-02-29T23:59:59.000Z");
        assert_eq!(at(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn record_json_shape() {
        let v = serde_json::to_value(record(1)).unwrap();
        assert_eq!(v["end_reason"], "caller_hangup");
        assert_eq!(v["mode"], "ai");
        assert_eq!(v["peer"], "10.0.0.5:40000");
        assert_eq!(v["started_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["transcript"][0]["role"], "agent");
        assert_eq!(v["transcript"][2]["role"], "dtmf");
        assert_eq!(v["turns"][0]["speech_end_ms"], 2000);
        assert!(v["turns"][0]["first_frame_ms"].is_null());
        assert!(v["call_id"].as_str().is_some_and(|s| s.len() == 36));
    }

    #[test]
    fn bad_urls_are_config_errors() {
        let cases = [
            ("s3://bucket/calls.jsonl", "", "records.url"),
            ("/var/lib/sifucall/calls.jsonl", "", "records.url"),
            ("file://relative/calls.jsonl", "", "records.url"),
            ("file:///var/lib/sifucall/", "", "records.url"),
            ("", "ftp://example.com/hook", "webhook.url"),
            ("", "not a url", "webhook.url"),
        ];
        for (r, w, key) in cases {
            let (rs, ws) = settings(r, w);
            match RecordSink::new(&rs, &ws) {
                Err(RecordsError::Config { key: k, .. }) => assert_eq!(k, key, "{r:?} {w:?}"),
                other => panic!("{r:?} {w:?}: expected a config error, got {other:?}"),
            }
        }
    }

    #[test]
    fn disabled_sink_needs_no_runtime() {
        let (rs, ws) = settings("", "  ");
        let sink = RecordSink::new(&rs, &ws).unwrap();
        assert!(!sink.is_enabled());
        sink.submit(record(0));
        assert_eq!(sink.dropped(), 0);
    }

    #[test]
    fn enabled_sink_outside_a_runtime_is_an_error() {
        let dir = temp_dir("nort");
        let (rs, ws) = settings(&format!("file://{}/c.jsonl", dir.display()), "");
        assert!(matches!(
            RecordSink::new(&rs, &ws),
            Err(RecordsError::NoRuntime)
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn reopen_follows_logrotate_moving_the_file() {
        let dir = temp_dir("rotate");
        let path = dir.join("calls.jsonl");
        let rotated = dir.join("calls.jsonl.1");
        let (rs, ws) = settings(&format!("file://{}", path.display()), "");
        let sink = RecordSink::new(&rs, &ws).unwrap();
        let wait_for = |p: PathBuf, n: usize| async move {
            for _ in 0..500 {
                if std::fs::read_to_string(&p).map_or(0, |t| t.lines().count()) >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{} never had {n} lines", p.display());
        };
        sink.submit(record(1));
        wait_for(path.clone(), 1).await;
        std::fs::rename(&path, &rotated).unwrap();
        sink.reopen();
        let second = record(2);
        sink.submit(second.clone());
        sink.close(Duration::from_secs(30)).await;
        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(old.lines().count(), 1, "{old}");
        assert_eq!(new.lines().count(), 1, "{new}");
        assert_eq!(
            serde_json::from_str::<CallRecord>(new.trim()).unwrap(),
            second
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_sink_appends_whole_lines_from_concurrent_calls() {
        let dir = temp_dir("file");
        let path = dir.join("nested/deeper/calls.jsonl");
        let (rs, ws) = settings(&format!("file://{}", path.display()), "");
        let sink = Arc::new(RecordSink::new(&rs, &ws).unwrap());
        let mut expected = Vec::new();
        let mut tasks = Vec::new();
        for t in 0..8u32 {
            let recs: Vec<CallRecord> = (0..25).map(|i| record(t * 100 + i)).collect();
            expected.extend(recs.iter().map(|r| r.call_id));
            let sink = Arc::clone(&sink);
            tasks.push(tokio::spawn(async move {
                for r in recs {
                    sink.submit(r);
                    tokio::task::yield_now().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        sink.close(Duration::from_secs(30)).await;
        assert_eq!(sink.dropped(), 0);

        // A second daemon run appends rather than truncating.
        let sink2 = RecordSink::new(&rs, &ws).unwrap();
        let last = record(999);
        expected.push(last.call_id);
        sink2.submit(last.clone());
        sink2.close(Duration::from_secs(30)).await;

        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        let parsed: Vec<CallRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut got: Vec<_> = parsed.iter().map(|r| r.call_id).collect();
        assert_eq!(parsed.last(), Some(&last));
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o007,
            0,
            "not world-readable"
        );

        // Submitting after close is counted as dropped, not a panic.
        sink2.submit(record(5));
        assert_eq!(sink2.dropped(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    async fn hook_server(hang: bool) -> (String, mpsc::Receiver<(Option<String>, Bytes)>) {
        use axum::http::HeaderMap;
        let (tx, rx) = mpsc::channel(16);
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let tx = tx.clone();
                async move {
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    let ct = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let _ = tx.send((ct, body)).await;
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/hook?token=s3cret",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, rx)
    }

    #[tokio::test]
    async fn webhook_posts_the_record() {
        let (url, mut rx) = hook_server(false).await;
        let (rs, ws) = settings("", &url);
        let sink = RecordSink::new(&rs, &ws).unwrap();
        let rec = record(7);
        sink.submit(rec.clone());
        let (ct, body) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ct.as_deref(), Some("application/json"));
        assert!(!body.ends_with(b"\n"));
        let got: CallRecord = serde_json::from_slice(&body).unwrap();
        assert_eq!(got, rec);
        sink.close(Duration::from_secs(30)).await;
        assert_eq!(sink.dropped(), 0);
    }

    #[tokio::test]
    async fn webhook_queue_is_bounded_and_close_does_not_hang() {
        let (url, _rx) = hook_server(true).await;
        let (rs, ws) = settings("", &url);
        let sink = RecordSink::new(&rs, &ws).unwrap();
        // On this single-threaded runtime the poster cannot run during the loop, so exactly
        // the queue's capacity is accepted.
        for i in 0..300 {
            sink.submit(record(i));
        }
        assert_eq!(sink.dropped(), 300 - WEBHOOK_QUEUE as u64);
        // The server never answers; close gives up after the grace instead of hanging.
        tokio::time::timeout(
            Duration::from_secs(30),
            sink.close(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    }
}
