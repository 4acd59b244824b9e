//! The database writer: a bounded queue of writes and one task that applies them in
//! batches, one transaction per batch, so a call never waits on the database and 200 calls
//! cost a few commits a second, not hundreds.
//!
//! While the database cannot take a batch (down, locked, full), batches go to the
//! [`Spool`] and are replayed in order once it answers again; new batches queue behind the
//! spooled ones so a call's writes are never reordered. What cannot be spooled either is
//! lost: counted in `/metrics` and logged once per outage. On startup, after replaying the
//! spool, calls this node left open (a crash or SIGKILL) are closed as `interrupted` with
//! what had been written of them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::db::{Db, with_pool};
use super::spool::Spool;
use super::{CallRecord, RecordsError};
use crate::ops::metrics::Metrics;

/// Writes applied in one transaction at most.
const MAX_BATCH: usize = 512;
/// How often a spool is retried while the database is down.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(24 * 3600);

/// A call's row as it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallStart {
    /// The UUID.
    pub call_id: Uuid,
    /// The daemon taking it.
    pub node_id: String,
    /// When it started, ms since the Unix epoch.
    pub started_at_ms: i64,
    /// Asterisk's address.
    pub peer: String,
    /// `ai` or `echo`.
    pub mode: String,
    /// The caller's number.
    pub caller_number: Option<String>,
    /// The caller's name.
    pub caller_name: Option<String>,
    /// The dialled number.
    pub did: Option<String>,
    /// The profile.
    pub profile: Option<String>,
}

/// What a [`CallEvent`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A [`super::TranscriptEntry`].
    Transcript,
    /// A [`super::TurnTiming`].
    Turn,
    /// A [`super::ToolCall`].
    Tool,
    /// A [`super::CallError`].
    Error,
}

impl EventKind {
    /// The `kind` column's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transcript => "transcript",
            Self::Turn => "turn",
            Self::Tool => "tool",
            Self::Error => "error",
        }
    }
}

/// One thing that happened in a call, written as the call goes; the same `(kind, idx)`
/// written again replaces the earlier version (a turn's marks arrive one by one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallEvent {
    /// The call.
    pub call_id: Uuid,
    /// What it is.
    pub kind: EventKind,
    /// Its position among the call's events of that kind.
    pub idx: u32,
    /// When, ms since the call started.
    pub at_ms: u64,
    /// The item as JSON.
    pub body: String,
}

/// One write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A call started: its row, open.
    Start(CallStart),
    /// Something happened in a call.
    Event(CallEvent),
    /// A call ended: its row completed, its events replaced by the final ones, and the
    /// webhook's outbox row added when there is a webhook.
    Finish(Box<CallRecord>),
}

/// How the writer behaves.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// This daemon's name in the rows (`records.node_id`).
    pub node_id: String,
    /// Writes waiting for the writer at most.
    pub queue: usize,
    /// Where batches wait while the database is down.
    pub spool_dir: PathBuf,
    /// The spool's size limit.
    pub spool_max_bytes: u64,
    /// Keep calls this many days (0: forever).
    pub retention_days: u64,
    /// Add a webhook outbox row for each finished call.
    pub webhook: bool,
}

/// Counts and flags shared by the queue's producers and the writer.
#[derive(Debug, Default)]
struct Health {
    /// A loss has been logged in the current outage.
    loss_logged: AtomicBool,
    /// The database refused the last batch.
    db_down: AtomicBool,
}

/// The writer and its queue. Share it as `Arc<Store>`.
#[derive(Debug)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    db: Db,
    cfg: StoreConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    closing: CancellationToken,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Woken after each commit that added outbox rows.
    pub(crate) outbox_ready: Arc<Notify>,
}

/// Milliseconds since the Unix epoch.
pub fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Store {
    /// Replays what an earlier run spooled, closes this node's calls left open by a crash,
    /// applies retention, and starts the writer. `db` is connected and migrated.
    pub async fn start(
        db: Db,
        cfg: StoreConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, RecordsError> {
        let spool = Spool::new(cfg.spool_dir.clone(), cfg.spool_max_bytes);
        let outbox_ready = Arc::new(Notify::new());
        if let Err(e) = replay(&db, &spool, cfg.webhook).await {
            tracing::warn!(error = %e, "the records spool could not be replayed yet; retrying while running");
        }
        match close_interrupted(&db, &cfg.node_id).await {
            Ok(0) => {}
            Ok(closed) => tracing::warn!(
                calls = closed,
                node_id = %cfg.node_id,
                "calls left open by an earlier run (crash or kill) closed as interrupted"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot close calls left open by an earlier run"),
        }
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let store = Arc::new(Self {
            tx,
            db: db.clone(),
            cfg: cfg.clone(),
            metrics: Arc::clone(&metrics),
            health: Arc::new(Health::default()),
            closing: CancellationToken::new(),
            workers: Mutex::new(Vec::new()),
            outbox_ready: Arc::clone(&outbox_ready),
        });
        let writer = tokio::spawn(writer(
            db.clone(),
            spool,
            rx,
            Arc::clone(&store.health),
            metrics,
            store.closing.clone(),
            cfg.webhook,
            outbox_ready,
        ));
        let mut workers = vec![writer];
        if cfg.retention_days > 0 {
            workers.push(tokio::spawn(retention_loop(
                db,
                cfg.retention_days,
                store.closing.clone(),
            )));
        }
        *store.workers.lock().unwrap_or_else(|p| p.into_inner()) = workers;
        Ok(store)
    }

    /// The database, for reading.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// This daemon's node id.
    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    /// Queues a write. Never blocks: a full queue drops it, counted and logged once.
    pub fn send(&self, op: Op) {
        if let Err(e) = self.tx.try_send(op) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "queue_full",
                mpsc::error::TrySendError::Closed(_) => "closed",
            };
            self.metrics.records_lost(why, 1);
            if !self.health.loss_logged.swap(true, Ordering::SeqCst) {
                tracing::error!(
                    reason = why,
                    "call records are being lost: the records queue is not being emptied \
                     (counted in sifucall_records_lost_total; logged once)"
                );
            }
        }
    }

    /// Stops taking writes, lets the writer finish for up to `grace`, then abandons the
    /// rest (spooled writes stay spooled for the next start).
    pub async fn close(&self, grace: Duration) {
        self.closing.cancel();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        let aborts: Vec<_> = workers.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(grace, futures_util::future::join_all(workers))
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "call records still queued at shutdown were abandoned"
            );
            for a in aborts {
                a.abort();
            }
        }
        self.db.close().await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn writer(
    db: Db,
    spool: Spool,
    mut rx: mpsc::Receiver<Op>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    closing: CancellationToken,
    webhook: bool,
    outbox_ready: Arc<Notify>,
) {
    let mut spooling = !spool.is_empty();
    let mut retry = tokio::time::interval(RETRY_EVERY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            biased;
            op = rx.recv() => op,
            _ = retry.tick(), if spooling => {
                spooling = !try_replay(&db, &spool, webhook, &health, &outbox_ready).await;
                metrics.records_backlog(spool.pending().len() as i64);
                continue;
            }
            () = closing.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if !spooling {
            match apply(&db, &batch, webhook).await {
                Ok(()) => {
                    metrics.records_written(batch.len() as u64);
                    if webhook && batch.iter().any(|op| matches!(op, Op::Finish(_))) {
                        outbox_ready.notify_one();
                    }
                    continue;
                }
                Err(e) => {
                    if !health.db_down.swap(true, Ordering::SeqCst) {
                        tracing::error!(
                            error = %e,
                            spool = %spool.dir().display(),
                            "the records database refused a write; calls go on, records are spooled \
                             and written when it is back"
                        );
                    }
                    spooling = true;
                }
            }
        }
        match spool.put(&batch) {
            Ok(()) => metrics.records_spooled(batch.len() as u64),
            Err(e) => {
                metrics.records_lost("spool_failed", batch.len() as u64);
                if !health.loss_logged.swap(true, Ordering::SeqCst) {
                    tracing::error!(
                        error = %e,
                        writes = batch.len(),
                        "call records lost: the database refused them and the spool cannot hold them \
                         (counted in sifucall_records_lost_total; logged once per outage)"
                    );
                }
            }
        }
        metrics.records_backlog(spool.pending().len() as i64);
    }
    // At shutdown, one last try to empty the spool.
    if spooling {
        try_replay(&db, &spool, webhook, &health, &outbox_ready).await;
    }
}

/// Replays the spool; true when it is empty afterwards.
async fn try_replay(
    db: &Db,
    spool: &Spool,
    webhook: bool,
    health: &Health,
    outbox_ready: &Notify,
) -> bool {
    match replay(db, spool, webhook).await {
        Ok(()) => {
            if health.db_down.swap(false, Ordering::SeqCst) {
                tracing::info!("the records database is back; spooled records written");
            }
            health.loss_logged.store(false, Ordering::SeqCst);
            outbox_ready.notify_one();
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "records database still refusing writes");
            false
        }
    }
}

/// Applies every spooled batch, oldest first, removing each once committed.
async fn replay(db: &Db, spool: &Spool, webhook: bool) -> Result<(), RecordsError> {
    for path in spool.pending() {
        let ops = spool
            .read(&path)
            .map_err(|e| RecordsError::Spool(e.to_string()))?;
        apply(db, &ops, webhook).await?;
        spool.remove(&path);
    }
    Ok(())
}

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// Applies a batch in one transaction.
pub(crate) async fn apply(db: &Db, ops: &[Op], webhook: bool) -> Result<(), RecordsError> {
    let err = |e| RecordsError::db("write call records", e);
    with_pool!(db, pool => {
        let mut tx = pool.begin().await.map_err(err)?;
        for op in ops {
            match op {
                Op::Start(s) => {
                    sqlx::query(
                        "INSERT INTO calls (call_id, node_id, status, started_at_ms, peer, mode, \
                         caller_number, caller_name, did, profile) \
                         VALUES ($1, $2, 'open', $3, $4, $5, $6, $7, $8, $9) \
                         ON CONFLICT (call_id) DO NOTHING",
                    )
                    .bind(s.call_id.to_string())
                    .bind(&s.node_id)
                    .bind(s.started_at_ms)
                    .bind(&s.peer)
                    .bind(&s.mode)
                    .bind(&s.caller_number)
                    .bind(&s.caller_name)
                    .bind(&s.did)
                    .bind(&s.profile)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                }
                Op::Event(e) => {
                    sqlx::query(
                        "INSERT INTO call_events (call_id, kind, idx, at_ms, body) \
                         VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (call_id, kind, idx) DO UPDATE SET at_ms = excluded.at_ms, body = excluded.body",
                    )
                    .bind(e.call_id.to_string())
                    .bind(e.kind.as_str())
                    .bind(i64::from(e.idx))
                    .bind(opt_i64(Some(e.at_ms)))
                    .bind(&e.body)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                }
                Op::Finish(rec) => {
                    let f = FinishRow::of(rec);
                    sqlx::query(
                        "INSERT INTO calls (call_id, node_id, status, started_at_ms, ended_at_ms, duration_ms, \
                         peer, mode, caller_number, caller_name, did, profile, sample_rate, end_reason, \
                         outcome, outcome_json, transfer_target, turns, barge_ins, latency_p50_ms, \
                         latency_p95_ms, latency_max_ms, cost_llm, cost_stt, cost_tts, cost_total, currency, \
                         recording_path, record_json) \
                         VALUES ($1, $2, 'completed', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                         $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28) \
                         ON CONFLICT (call_id) DO UPDATE SET node_id = excluded.node_id, status = 'completed', \
                         started_at_ms = excluded.started_at_ms, ended_at_ms = excluded.ended_at_ms, \
                         duration_ms = excluded.duration_ms, peer = excluded.peer, mode = excluded.mode, \
                         caller_number = excluded.caller_number, caller_name = excluded.caller_name, \
                         did = excluded.did, profile = excluded.profile, sample_rate = excluded.sample_rate, \
                         end_reason = excluded.end_reason, outcome = excluded.outcome, \
                         outcome_json = excluded.outcome_json, transfer_target = excluded.transfer_target, \
                         turns = excluded.turns, barge_ins = excluded.barge_ins, \
                         latency_p50_ms = excluded.latency_p50_ms, latency_p95_ms = excluded.latency_p95_ms, \
                         latency_max_ms = excluded.latency_max_ms, cost_llm = excluded.cost_llm, \
                         cost_stt = excluded.cost_stt, cost_tts = excluded.cost_tts, \
                         cost_total = excluded.cost_total, currency = excluded.currency, \
                         recording_path = excluded.recording_path, record_json = excluded.record_json",
                    )
                    .bind(rec.call_id.to_string())
                    .bind(&rec.node_id)
                    .bind(f.started_at_ms)
                    .bind(f.ended_at_ms)
                    .bind(opt_i64(Some(rec.duration_ms)))
                    .bind(rec.peer.to_string())
                    .bind(f.mode)
                    .bind(&rec.caller_number)
                    .bind(&rec.caller_name)
                    .bind(&rec.did)
                    .bind(&rec.profile)
                    .bind(i64::from(rec.sample_rate))
                    .bind(rec.end_reason.as_str())
                    .bind(f.outcome)
                    .bind(f.outcome_json)
                    .bind(&rec.transfer_target)
                    .bind(rec.turns.len() as i64)
                    .bind(i64::from(rec.barge_ins))
                    .bind(f.p50)
                    .bind(f.p95)
                    .bind(f.max)
                    .bind(rec.cost.as_ref().map(|c| c.llm + c.llm_abandoned_estimate))
                    .bind(rec.cost.as_ref().map(|c| c.stt))
                    .bind(rec.cost.as_ref().map(|c| c.tts))
                    .bind(rec.cost.as_ref().map(|c| c.total))
                    .bind(rec.cost.as_ref().map(|c| c.currency.clone()))
                    .bind(&rec.recording_path)
                    .bind(&f.json)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                    sqlx::query("DELETE FROM call_events WHERE call_id = $1")
                        .bind(rec.call_id.to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                    for e in events_of(rec) {
                        sqlx::query(
                            "INSERT INTO call_events (call_id, kind, idx, at_ms, body) VALUES ($1, $2, $3, $4, $5)",
                        )
                        .bind(e.call_id.to_string())
                        .bind(e.kind.as_str())
                        .bind(i64::from(e.idx))
                        .bind(opt_i64(Some(e.at_ms)))
                        .bind(&e.body)
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                    }
                    if webhook {
                        sqlx::query(
                            "INSERT INTO webhook_outbox (call_id, body, created_at_ms, next_attempt_at_ms) \
                             VALUES ($1, $2, $3, $3) ON CONFLICT (call_id) DO NOTHING",
                        )
                        .bind(rec.call_id.to_string())
                        .bind(&f.json)
                        .bind(epoch_ms(SystemTime::now()))
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                    }
                }
            }
        }
        tx.commit().await.map_err(err)?;
    });
    Ok(())
}

/// The derived columns of a finished call.
struct FinishRow {
    started_at_ms: i64,
    ended_at_ms: i64,
    mode: &'static str,
    outcome: Option<&'static str>,
    outcome_json: Option<String>,
    p50: Option<i64>,
    p95: Option<i64>,
    max: Option<i64>,
    json: String,
}

impl FinishRow {
    fn of(rec: &CallRecord) -> Self {
        let started_at_ms = parse_rfc3339_ms(&rec.started_at).unwrap_or(0);
        let ended_at_ms = parse_rfc3339_ms(&rec.ended_at).unwrap_or_else(|| {
            started_at_ms.saturating_add(i64::try_from(rec.duration_ms).unwrap_or(0))
        });
        let lat = rec.latency;
        Self {
            started_at_ms,
            ended_at_ms,
            mode: match rec.mode {
                crate::ops::config::AgentMode::Ai => "ai",
                crate::ops::config::AgentMode::Echo => "echo",
            },
            outcome: rec
                .outcome
                .as_ref()
                .map(crate::call::CallOutcome::dialplan_value),
            outcome_json: rec
                .outcome
                .as_ref()
                .and_then(|o| serde_json::to_string(o).ok()),
            p50: lat.map(|l| l.p50_ms as i64),
            p95: lat.map(|l| l.p95_ms as i64),
            max: lat.map(|l| l.max_ms as i64),
            json: serde_json::to_string(rec).unwrap_or_default(),
        }
    }
}

/// A finished call's events, as they are stored.
pub fn events_of(rec: &CallRecord) -> Vec<CallEvent> {
    let mut out = Vec::new();
    let mut push = |kind, idx: usize, at_ms: u64, body: Result<String, serde_json::Error>| {
        if let Ok(body) = body {
            out.push(CallEvent {
                call_id: rec.call_id,
                kind,
                idx: u32::try_from(idx).unwrap_or(u32::MAX),
                at_ms,
                body,
            });
        }
    };
    for (i, t) in rec.transcript.iter().enumerate() {
        push(EventKind::Transcript, i, t.at_ms, serde_json::to_string(t));
    }
    for (i, t) in rec.turns.iter().enumerate() {
        let at = [
            t.first_frame_ms,
            t.tts_first_audio_ms,
            t.llm_first_token_ms,
            t.stt_final_ms,
            t.speech_end_ms,
        ]
        .into_iter()
        .flatten()
        .next()
        .unwrap_or(0);
        push(EventKind::Turn, i, at, serde_json::to_string(t));
    }
    for (i, t) in rec.tool_calls.iter().enumerate() {
        push(EventKind::Tool, i, t.at_ms, serde_json::to_string(t));
    }
    for (i, e) in rec.errors.iter().enumerate() {
        let e = super::CallError {
            at_ms: rec.duration_ms,
            text: e.clone(),
        };
        push(EventKind::Error, i, e.at_ms, serde_json::to_string(&e));
    }
    out
}

/// `2024-05-01T09:30:00.250Z` (as [`super::rfc3339_utc`] writes it) to ms since the epoch.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let ms = if b.get(19) == Some(&b'.') {
        num(20..23).unwrap_or(0)
    } else {
        0
    };
    // Days from civil (H. Hinnant).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + se) * 1000) + ms)
}

/// Closes this node's calls still open (the daemon died during them) as `interrupted`,
/// ending them at the last thing written; returns how many.
pub async fn close_interrupted(db: &Db, node_id: &str) -> Result<u64, RecordsError> {
    let sql = "UPDATE calls SET status = 'interrupted', end_reason = 'interrupted', outcome = 'interrupted', \
               duration_ms = COALESCE((SELECT MAX(e.at_ms) FROM call_events e WHERE e.call_id = calls.call_id), 0), \
               ended_at_ms = started_at_ms + COALESCE((SELECT MAX(e.at_ms) FROM call_events e WHERE e.call_id = calls.call_id), 0), \
               turns = (SELECT COUNT(*) FROM call_events e WHERE e.call_id = calls.call_id AND e.kind = 'turn') \
               WHERE status = 'open' AND node_id = $1";
    let n = with_pool!(db, pool => {
        sqlx::query(sql)
            .bind(node_id)
            .execute(pool)
            .await
            .map_err(|e| RecordsError::db("close interrupted calls", e))?
            .rows_affected()
    });
    Ok(n)
}

/// Deletes calls (their events, outbox rows and recording files) started more than `days`
/// days ago; returns how many calls.
pub async fn apply_retention(db: &Db, days: u64) -> Result<u64, RecordsError> {
    let cutoff = epoch_ms(SystemTime::now())
        - i64::try_from(days.saturating_mul(86_400_000)).unwrap_or(i64::MAX);
    let err = |e| RecordsError::db("apply retention", e);
    let n = with_pool!(db, pool => {
        let rows = sqlx::query(
            "SELECT recording_path FROM calls WHERE started_at_ms < $1 AND recording_path IS NOT NULL",
        )
        .bind(cutoff)
        .fetch_all(pool)
        .await
        .map_err(err)?;
        for r in rows {
            if let Ok(Some(path)) = r.try_get::<Option<String>, _>("recording_path") {
                if let Err(e) = std::fs::remove_file(&path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path, error = %e, "cannot remove an expired call recording");
                    }
                }
            }
        }
        let mut tx = pool.begin().await.map_err(err)?;
        sqlx::query("DELETE FROM call_events WHERE call_id IN (SELECT call_id FROM calls WHERE started_at_ms < $1)")
            .bind(cutoff)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query("DELETE FROM webhook_outbox WHERE call_id IN (SELECT call_id FROM calls WHERE started_at_ms < $1)")
            .bind(cutoff)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let n = sqlx::query("DELETE FROM calls WHERE started_at_ms < $1")
            .bind(cutoff)
            .execute(&mut *tx)
            .await
            .map_err(err)?
            .rows_affected();
        tx.commit().await.map_err(err)?;
        n
    });
    Ok(n)
}

async fn retention_loop(db: Db, days: u64, closing: CancellationToken) {
    loop {
        match apply_retention(&db, days).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(calls = n, days, "expired call records deleted"),
            Err(e) => tracing::warn!(error = %e, "retention could not run; trying again tomorrow"),
        }
        tokio::select! {
            () = closing.cancelled() => return,
            () = tokio::time::sleep(RETENTION_EVERY) => {}
        }
    }
}
