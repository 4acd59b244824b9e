//! Reading the call history back: the list with filters, one call in full, and totals per
//! day. This is what the console and its JSON API are built on; the types serialise as the
//! API returns them.

use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use uuid::Uuid;

use super::db::{Db, with_pool};
use super::{CallCost, CallError, RecordsError, ToolCall, TranscriptEntry, TurnTiming};
use crate::call::CallOutcome;

/// The most rows one [`list_calls`] returns.
pub const MAX_LIMIT: u32 = 1000;

/// Which calls [`list_calls`] returns; every field narrows, `None` does not.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CallFilter {
    /// Calls started at or after this, ms since the Unix epoch.
    pub from_ms: Option<i64>,
    /// Calls started before this, ms since the Unix epoch.
    pub to_ms: Option<i64>,
    /// The caller's number contains this.
    pub caller: Option<String>,
    /// The dialled number, exactly.
    pub did: Option<String>,
    /// The profile, exactly.
    pub profile: Option<String>,
    /// The outcome (`completed`, `transfer`, `fallback`, `abandoned`, `refused`, `error`),
    /// or `interrupted` for calls a crash cut short, or `open` for calls in progress.
    pub outcome: Option<String>,
    /// The daemon that took the call.
    pub node_id: Option<String>,
    /// At most this many rows (capped at [`MAX_LIMIT`]).
    pub limit: u32,
    /// Skip this many rows first (newest first).
    pub offset: u32,
}

impl Default for CallFilter {
    fn default() -> Self {
        Self {
            from_ms: None,
            to_ms: None,
            caller: None,
            did: None,
            profile: None,
            outcome: None,
            node_id: None,
            limit: 100,
            offset: 0,
        }
    }
}

/// One call in the history list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRow {
    /// The UUID Asterisk sent.
    pub call_id: Uuid,
    /// The daemon that took it (`records.node_id`).
    pub node_id: String,
    /// `open` (in progress, or its daemon has not restarted since a crash), `completed`,
    /// or `interrupted` (closed at the next start after a crash).
    pub status: String,
    /// When it started, ms since the Unix epoch.
    pub started_at_ms: i64,
    /// When it ended (for an interrupted call: the last thing written).
    pub ended_at_ms: Option<i64>,
    /// Length in ms.
    pub duration_ms: Option<i64>,
    /// The caller's number.
    pub caller_number: Option<String>,
    /// The caller's name.
    pub caller_name: Option<String>,
    /// The dialled number.
    pub did: Option<String>,
    /// The profile that served it.
    pub profile: Option<String>,
    /// The call's audio rate.
    pub sample_rate: Option<i64>,
    /// Why it ended (`caller_hangup`, `agent_hangup`, ... or `interrupted`).
    pub end_reason: Option<String>,
    /// How it ended for the dialplan (`completed`, `transfer`, ... or `interrupted`).
    pub outcome: Option<String>,
    /// Where it was transferred, if it was.
    pub transfer_target: Option<String>,
    /// Caller turns answered.
    pub turns: i64,
    /// Times the caller talked over the agent.
    pub barge_ins: i64,
    /// Turn latency (end of the caller's speech to the reply's first frame), median.
    pub latency_p50_ms: Option<i64>,
    /// ... 95th percentile.
    pub latency_p95_ms: Option<i64>,
    /// ... worst.
    pub latency_max_ms: Option<i64>,
    /// What the call cost, in `currency`.
    pub cost_total: Option<f64>,
    /// The currency of the cost (`pricing.currency`).
    pub currency: Option<String>,
    /// The stereo recording, if one was made.
    pub recording_path: Option<String>,
}

/// One call in full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallDetail {
    /// What the list shows.
    #[serde(flatten)]
    pub row: CallRow,
    /// Asterisk's address.
    pub peer: String,
    /// `ai` or `echo`.
    pub mode: String,
    /// The outcome as the dialplan was told it, with its details.
    pub outcome_detail: Option<CallOutcome>,
    /// What was said, in order, with when each line started and ended.
    pub transcript: Vec<TranscriptEntry>,
    /// Each turn's latency marks.
    pub turns: Vec<TurnTiming>,
    /// Tools the agent called.
    pub tool_calls: Vec<ToolCall>,
    /// Provider and pipeline errors.
    pub errors: Vec<CallError>,
    /// The cost by component (present once the call ended).
    pub cost: Option<CallCost>,
}

/// Calls, minutes and cost of one UTC day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DayTotal {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    /// Calls started that day.
    pub calls: i64,
    /// Their length, in minutes.
    pub minutes: f64,
    /// Their cost, in the configured currency.
    pub cost: f64,
}

const ROW_COLUMNS: &str = "call_id, node_id, status, started_at_ms, ended_at_ms, duration_ms, \
    caller_number, caller_name, did, profile, sample_rate, end_reason, outcome, transfer_target, \
    turns, barge_ins, latency_p50_ms, latency_p95_ms, latency_max_ms, cost_total, currency, \
    recording_path";

/// A bound value of a dynamically built query.
enum Arg {
    Int(i64),
    Text(String),
}

macro_rules! bind_all {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match a {
                Arg::Int(v) => q.bind(*v),
                Arg::Text(v) => q.bind(v.clone()),
            };
        }
        q
    }};
}

macro_rules! call_row {
    ($r:expr) => {{
        let r = $r;
        let id: String = r.try_get("call_id")?;
        CallRow {
            call_id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            node_id: r.try_get("node_id")?,
            status: r.try_get("status")?,
            started_at_ms: r.try_get("started_at_ms")?,
            ended_at_ms: r.try_get("ended_at_ms")?,
            duration_ms: r.try_get("duration_ms")?,
            caller_number: r.try_get("caller_number")?,
            caller_name: r.try_get("caller_name")?,
            did: r.try_get("did")?,
            profile: r.try_get("profile")?,
            sample_rate: r.try_get("sample_rate")?,
            end_reason: r.try_get("end_reason")?,
            outcome: r.try_get("outcome")?,
            transfer_target: r.try_get("transfer_target")?,
            turns: r.try_get("turns")?,
            barge_ins: r.try_get("barge_ins")?,
            latency_p50_ms: r.try_get("latency_p50_ms")?,
            latency_p95_ms: r.try_get("latency_p95_ms")?,
            latency_max_ms: r.try_get("latency_max_ms")?,
            cost_total: r.try_get("cost_total")?,
            currency: r.try_get("currency")?,
            recording_path: r.try_get("recording_path")?,
        }
    }};
}

/// Calls matching `filter`, newest first.
pub async fn list_calls(db: &Db, filter: &CallFilter) -> Result<Vec<CallRow>, RecordsError> {
    let mut args = Vec::new();
    let mut clauses = Vec::new();
    let mut push = |clause: &str, arg: Arg| {
        args.push(arg);
        clauses.push(clause.replace('?', &format!("${}", args.len())));
    };
    if let Some(v) = filter.from_ms {
        push("started_at_ms >= ?", Arg::Int(v));
    }
    if let Some(v) = filter.to_ms {
        push("started_at_ms < ?", Arg::Int(v));
    }
    if let Some(v) = &filter.caller {
        push(
            "caller_number LIKE ?",
            Arg::Text(format!("%{}%", like_escape(v))),
        );
    }
    if let Some(v) = &filter.did {
        push("did = ?", Arg::Text(v.clone()));
    }
    if let Some(v) = &filter.profile {
        push("profile = ?", Arg::Text(v.clone()));
    }
    if let Some(v) = &filter.outcome {
        match v.as_str() {
            "open" | "interrupted" => push("status = ?", Arg::Text(v.clone())),
            _ => push("outcome = ?", Arg::Text(v.clone())),
        }
    }
    if let Some(v) = &filter.node_id {
        push("node_id = ?", Arg::Text(v.clone()));
    }
    let mut sql = format!("SELECT {ROW_COLUMNS} FROM calls");
    if !clauses.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&clauses.join(" AND "));
    }
    sql.push_str(&format!(
        " ORDER BY started_at_ms DESC, call_id LIMIT {} OFFSET {}",
        filter.limit.min(MAX_LIMIT),
        filter.offset
    ));
    let rows = with_pool!(db, pool => {
        let q = bind_all!(sqlx::query(&sql), &args);
        let rows = q.fetch_all(pool).await.map_err(|e| RecordsError::db("list calls", e))?;
        rows.iter()
            .map(|r| Ok(call_row!(r)))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(|e| RecordsError::db("read a call row", e))?
    });
    Ok(rows)
}

fn like_escape(s: &str) -> String {
    s.replace(['%', '_'], "")
}

/// One call with its transcript, turns, tool calls, errors and cost; `None` if unknown.
pub async fn call(db: &Db, id: Uuid) -> Result<Option<CallDetail>, RecordsError> {
    let sql = format!(
        "SELECT {ROW_COLUMNS}, peer, mode, outcome_json, record_json FROM calls WHERE call_id = $1"
    );
    let id_text = id.to_string();
    let found = with_pool!(db, pool => {
        let r = sqlx::query(&sql)
            .bind(&id_text)
            .fetch_optional(pool)
            .await
            .map_err(|e| RecordsError::db("read a call", e))?;
        match r {
            None => None,
            Some(r) => {
                let read = || -> Result<_, sqlx::Error> {
                    let row = call_row!(&r);
                    let peer: String = r.try_get("peer")?;
                    let mode: String = r.try_get("mode")?;
                    let outcome: Option<String> = r.try_get("outcome_json")?;
                    let record: Option<String> = r.try_get("record_json")?;
                    Ok((row, peer, mode, outcome, record))
                };
                Some(read().map_err(|e| RecordsError::db("read a call row", e))?)
            }
        }
    });
    let Some((row, peer, mode, outcome_json, record_json)) = found else {
        return Ok(None);
    };
    let events = with_pool!(db, pool => {
        let rows = sqlx::query(
            "SELECT kind, body FROM call_events WHERE call_id = $1 ORDER BY kind, idx",
        )
        .bind(&id_text)
        .fetch_all(pool)
        .await
        .map_err(|e| RecordsError::db("read a call's events", e))?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>("kind")?, r.try_get::<String, _>("body")?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(|e| RecordsError::db("read a call's events", e))?
    });
    let mut detail = CallDetail {
        row,
        peer,
        mode,
        outcome_detail: outcome_json.and_then(|j| serde_json::from_str(&j).ok()),
        transcript: Vec::new(),
        turns: Vec::new(),
        tool_calls: Vec::new(),
        errors: Vec::new(),
        cost: None,
    };
    for (kind, body) in events {
        // A row this version cannot read is skipped rather than hiding the whole call.
        match kind.as_str() {
            "transcript" => detail.transcript.extend(serde_json::from_str(&body).ok()),
            "turn" => detail.turns.extend(serde_json::from_str(&body).ok()),
            "tool" => detail.tool_calls.extend(serde_json::from_str(&body).ok()),
            "error" => detail.errors.extend(serde_json::from_str(&body).ok()),
            _ => {}
        }
    }
    if let Some(rec) = record_json.and_then(|j| serde_json::from_str::<super::CallRecord>(&j).ok())
    {
        detail.cost = rec.cost;
    }
    Ok(Some(detail))
}

/// Calls, minutes and cost per UTC day for calls started in `[from_ms, to_ms)`, oldest
/// first; days without calls are left out.
pub async fn daily_totals(
    db: &Db,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<DayTotal>, RecordsError> {
    let sql = "SELECT started_at_ms / 86400000 AS day, COUNT(*) AS calls, \
               CAST(SUM(COALESCE(duration_ms, 0)) AS BIGINT) AS ms, SUM(COALESCE(cost_total, 0.0)) AS cost \
               FROM calls WHERE started_at_ms >= $1 AND started_at_ms < $2 \
               GROUP BY started_at_ms / 86400000 ORDER BY day";
    let rows = with_pool!(db, pool => {
        let rows = sqlx::query(sql)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(pool)
            .await
            .map_err(|e| RecordsError::db("sum calls per day", e))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<i64, _>("day")?,
                    r.try_get::<i64, _>("calls")?,
                    r.try_get::<Option<i64>, _>("ms")?.unwrap_or(0),
                    r.try_get::<Option<f64>, _>("cost")?.unwrap_or(0.0),
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(|e| RecordsError::db("sum calls per day", e))?
    });
    Ok(rows
        .into_iter()
        .map(|(day, calls, ms, cost)| DayTotal {
            day: super::rfc3339_utc(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(day.max(0) as u64 * 86_400),
            )[..10]
                .to_owned(),
            calls,
            minutes: ms as f64 / 60_000.0,
            cost,
        })
        .collect())
}
