//! The console's history read from the call records database ([`crate::ops::records::query`]),
//! shared by every daemon that writes to it: with PostgreSQL, one console shows the calls
//! of all of them (the `Node` column says which took each call).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use uuid::Uuid;

use super::{
    CallDetail, CallFilter, CallRow, CostItem, DayTotals, History, HistoryError, ToolCall,
    TranscriptLine, time_range,
};
use crate::ops::records::db::Db;
use crate::ops::records::{Role, query, rfc3339_utc};

/// The history in the records database.
#[derive(Debug, Clone)]
pub struct DbHistory {
    db: Db,
    currency: String,
}

impl DbHistory {
    /// Reads through `db` (e.g. [`crate::ops::records::RecordSink::db`]); per-day costs
    /// are in `currency` (`pricing.currency`).
    pub fn new(db: Db, currency: &str) -> Self {
        Self {
            db,
            currency: currency.to_owned(),
        }
    }
}

fn at(ms: i64) -> String {
    rfc3339_utc(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn row_of(r: query::CallRow) -> CallRow {
    let duration_ms = match (r.duration_ms, r.status.as_str()) {
        (Some(d), _) => d,
        (None, "open") => now_ms().saturating_sub(r.started_at_ms),
        (None, _) => r
            .ended_at_ms
            .map_or(0, |e| e.saturating_sub(r.started_at_ms)),
    };
    let outcome = match r.status.as_str() {
        "open" | "interrupted" => r.status.clone(),
        _ => r.outcome.clone().unwrap_or_else(|| r.status.clone()),
    };
    CallRow {
        call_id: r.call_id,
        node: Some(r.node_id).filter(|n| !n.is_empty()),
        started_at: at(r.started_at_ms),
        ended_at: r.ended_at_ms.map(at),
        duration_ms: u64::try_from(duration_ms).unwrap_or(0),
        caller_number: r.caller_number,
        caller_name: r.caller_name,
        did: r.did,
        profile: r.profile,
        outcome,
        end_reason: r.end_reason.unwrap_or_default(),
        turns: u32::try_from(r.turns).unwrap_or(0),
        cost: r.cost_total,
        currency: r.currency.unwrap_or_else(|| "USD".into()),
    }
}

fn detail_of(d: query::CallDetail) -> CallDetail {
    let transfer_target = d.row.transfer_target.clone();
    let recording = d.row.recording_path.clone();
    let mut cost_items = Vec::new();
    let mut total_myr = None;
    if let Some(c) = &d.cost {
        cost_items.push(CostItem {
            component: "llm".into(),
            amount: c.llm,
            detail: "as reported by OpenRouter".into(),
        });
        if c.llm_abandoned_estimate > 0.0 {
            cost_items.push(CostItem {
                component: "llm (abandoned, estimated)".into(),
                amount: c.llm_abandoned_estimate,
                detail: "requests cut off before their usage arrived".into(),
            });
        }
        cost_items.push(CostItem {
            component: "stt".into(),
            amount: c.stt,
            detail: format!("{:.1} s of audio", c.stt_audio_seconds),
        });
        cost_items.push(CostItem {
            component: "tts".into(),
            amount: c.tts,
            detail: format!("{} characters", c.tts_characters),
        });
        total_myr = c.total_myr;
    }
    CallDetail {
        row: row_of(d.row),
        transfer_target,
        transcript: d
            .transcript
            .into_iter()
            .map(|l| TranscriptLine {
                role: role(l.role).into(),
                start_ms: l.start_ms.unwrap_or(l.at_ms),
                end_ms: l.end_ms,
                text: l.text,
                interrupted: l.interrupted,
            })
            .collect(),
        turn_timings: d.turns,
        tool_calls: d
            .tool_calls
            .into_iter()
            .map(|t| ToolCall {
                result: Some(t.summary()),
                name: t.name,
                arguments: t.arguments.to_string(),
                at_ms: Some(t.at_ms),
            })
            .collect(),
        errors: d
            .errors
            .into_iter()
            .map(|e| format!("at {:.1} s: {}", e.at_ms as f64 / 1000.0, e.text))
            .collect(),
        cost_items,
        total_myr,
        recording,
    }
}

/// The transcript role's name on the page and in the API.
pub(super) fn role(r: Role) -> &'static str {
    match r {
        Role::Caller => "caller",
        Role::Agent => "agent",
        Role::Dtmf => "dtmf",
    }
}

fn query_filter(f: &CallFilter) -> Result<query::CallFilter, HistoryError> {
    let (from_ms, to_ms) = time_range(f).map_err(HistoryError)?;
    Ok(query::CallFilter {
        from_ms,
        to_ms,
        caller: f.caller.clone(),
        did: f.did.clone(),
        profile: f.profile.clone(),
        outcome: f.outcome.clone(),
        limit: u32::try_from(f.limit()).unwrap_or(query::MAX_LIMIT),
        ..query::CallFilter::default()
    })
}

fn unavailable(e: impl std::fmt::Display) -> HistoryError {
    HistoryError(e.to_string())
}

impl History for DbHistory {
    fn list(&self, filter: CallFilter) -> BoxFuture<'_, Result<Vec<CallRow>, HistoryError>> {
        Box::pin(async move {
            let q = query_filter(&filter)?;
            let rows = query::list_calls(&self.db, &q).await.map_err(unavailable)?;
            Ok(rows.into_iter().map(row_of).collect())
        })
    }

    fn call(&self, id: Uuid) -> BoxFuture<'_, Result<Option<CallDetail>, HistoryError>> {
        Box::pin(async move {
            let d = query::call(&self.db, id).await.map_err(unavailable)?;
            Ok(d.map(detail_of))
        })
    }

    fn daily_totals(
        &self,
        filter: CallFilter,
    ) -> BoxFuture<'_, Result<Vec<DayTotals>, HistoryError>> {
        Box::pin(async move {
            let (from, to) = time_range(&filter).map_err(HistoryError)?;
            let days = query::daily_totals(
                &self.db,
                from.unwrap_or(0),
                to.unwrap_or_else(|| now_ms().saturating_add(86_400_000)),
            )
            .await
            .map_err(unavailable)?;
            Ok(days
                .into_iter()
                .rev()
                .map(|d| DayTotals {
                    day: d.day,
                    calls: u64::try_from(d.calls).unwrap_or(0),
                    minutes: d.minutes,
                    cost: d.cost,
                    currency: self.currency.clone(),
                })
                .collect())
        })
    }

    fn describe(&self) -> String {
        "the call records database (every daemon that writes to it)".into()
    }
}
