//! The operator's console: a window onto the calls on the admin server, as web pages for
//! people and JSON for scripts, under the same paths.
//!
//! | page | JSON | what |
//! | --- | --- | --- |
//! | `/console` | `/api/live` | calls in progress: caller, profile, duration, listening/thinking/speaking, last turn's latency (the page refreshes itself) |
//! | `/console/calls?from=&to=&caller=&did=&profile=&outcome=&limit=` | `/api/calls?...` and `/api/totals?...` | history with filters, and calls, minutes and cost per day |
//! | `/console/calls/{id}` | `/api/calls/{id}` | one call: transcript with times, per-turn latency waterfall, tool calls, errors, cost, recording |
//! | | `/api/calls/{id}/recording` | the call's recording (WAV), where there is one |
//!
//! Pages are rendered on the server with every value escaped (caller names come from the
//! PBX, transcripts from the caller), with a few lines of inline script for the live view
//! and no build step. Where the history comes from is behind [`History`]: the call records
//! database when records are kept there, else the calls this daemon has seen since it
//! started ([`MemoryHistory`]).
//!
//! Access: `/healthz`, `/readyz` and `/metrics` stay open (load balancers and Prometheus);
//! the console and its API need the admin token when one is set (`Authorization: Bearer`,
//! or the cookie the `/console/login` form sets), and are refused altogether when the admin
//! server listens beyond loopback without a token.

mod auth;
mod db;
mod memory;
mod pages;
mod routes;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::live::LiveCalls;
use super::records::TurnTiming;

pub use auth::{Access, Denied};
pub use db::DbHistory;
pub use memory::MemoryHistory;
pub use routes::router;

/// Which calls to list. Times compare as RFC 3339 UTC text: `from` and `to` may be a date
/// (`2026-12-01`) or a date and time (`2026-12-01T09:30`); `to` is inclusive at its own
/// precision (`to=2026-12-01` includes the whole day).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallFilter {
    /// Calls that started at or after this.
    pub from: Option<String>,
    /// Calls that started at or before this.
    pub to: Option<String>,
    /// Caller number or name contains this (case-insensitive).
    pub caller: Option<String>,
    /// The dialled number is this.
    pub did: Option<String>,
    /// The profile is this.
    pub profile: Option<String>,
    /// The outcome is this (`completed`, `transfer`, `fallback`, `abandoned`, `refused`,
    /// `error`, `interrupted`).
    pub outcome: Option<String>,
    /// At most this many calls, newest first (default and ceiling: [`MAX_LIMIT`]).
    pub limit: Option<usize>,
}

/// The most calls one list returns.
pub const MAX_LIMIT: usize = 500;

impl CallFilter {
    /// The effective limit.
    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(MAX_LIMIT).clamp(1, MAX_LIMIT)
    }

    /// Whether a call matches (for stores that filter in memory).
    pub fn matches(&self, c: &CallRow) -> bool {
        fn nonempty(o: &Option<String>) -> Option<&str> {
            o.as_deref().map(str::trim).filter(|s| !s.is_empty())
        }
        if let Some(from) = nonempty(&self.from) {
            if c.started_at.as_str() < from {
                return false;
            }
        }
        if let Some(to) = nonempty(&self.to) {
            let head = c.started_at.get(..to.len()).unwrap_or(&c.started_at);
            if head > to {
                return false;
            }
        }
        if let Some(q) = nonempty(&self.caller) {
            let q = q.to_lowercase();
            let hit =
                |v: &Option<String>| v.as_deref().is_some_and(|v| v.to_lowercase().contains(&q));
            if !hit(&c.caller_number) && !hit(&c.caller_name) {
                return false;
            }
        }
        if let Some(did) = nonempty(&self.did) {
            if c.did.as_deref() != Some(did) {
                return false;
            }
        }
        if let Some(p) = nonempty(&self.profile) {
            if c.profile.as_deref() != Some(p) {
                return false;
            }
        }
        if let Some(o) = nonempty(&self.outcome) {
            if c.outcome != o {
                return false;
            }
        }
        true
    }
}

/// One call in a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRow {
    /// The UUID Asterisk sent.
    pub call_id: Uuid,
    /// The daemon that took it (several may share one database).
    pub node: Option<String>,
    /// When it started, RFC 3339 UTC.
    pub started_at: String,
    /// When it ended (`None` while it is up, or if its daemon died).
    pub ended_at: Option<String>,
    /// How long it lasted, ms.
    pub duration_ms: u64,
    /// The caller's number.
    pub caller_number: Option<String>,
    /// The caller's name.
    pub caller_name: Option<String>,
    /// The dialled number.
    pub did: Option<String>,
    /// The profile.
    pub profile: Option<String>,
    /// How it ended for the dialplan (`completed`, `transfer`, ...; `interrupted` when the
    /// daemon died with it).
    pub outcome: String,
    /// Why the connection ended (`caller_hangup`, `agent_hangup`, ...).
    pub end_reason: String,
    /// Answered turns.
    pub turns: u32,
    /// What it cost, in `currency`.
    pub cost: Option<f64>,
    /// The currency of `cost`.
    pub currency: String,
}

/// One line of a transcript, timed as the caller heard or said it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptLine {
    /// `caller`, `agent` or `dtmf`.
    pub role: String,
    /// What was said.
    pub text: String,
    /// When it started, ms from the call start.
    pub start_ms: u64,
    /// When it ended, where known.
    pub end_ms: Option<u64>,
    /// The agent was cut off before finishing it.
    pub interrupted: bool,
}

/// A tool the model called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The tool.
    pub name: String,
    /// Its arguments, as JSON text.
    pub arguments: String,
    /// When, ms from the call start.
    pub at_ms: Option<u64>,
    /// What came of it.
    pub result: Option<String>,
}

/// One part of a call's cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostItem {
    /// `llm`, `stt`, `tts`.
    pub component: String,
    /// How much, in the call's currency.
    pub amount: f64,
    /// What was counted (tokens, audio seconds, characters).
    pub detail: String,
}

/// Everything about one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallDetail {
    /// The list fields.
    #[serde(flatten)]
    pub row: CallRow,
    /// Where the call was handed, if it was.
    pub transfer_target: Option<String>,
    /// What was said.
    pub transcript: Vec<TranscriptLine>,
    /// Each turn's marks, ms from the call start.
    pub turn_timings: Vec<TurnTiming>,
    /// Tools the model called.
    pub tool_calls: Vec<ToolCall>,
    /// Provider and pipeline errors.
    pub errors: Vec<String>,
    /// The cost by component.
    pub cost_items: Vec<CostItem>,
    /// The total in Malaysian ringgit, when `pricing.myr_rate` is set.
    pub total_myr: Option<f64>,
    /// Where the recording is, if the call was recorded.
    pub recording: Option<String>,
}

/// Calls, minutes and cost of one day (UTC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DayTotals {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Calls that started that day.
    pub calls: u64,
    /// Their minutes.
    pub minutes: f64,
    /// Their cost.
    pub cost: f64,
    /// The currency of `cost`.
    pub currency: String,
}

/// The history could not be read.
#[derive(Debug, thiserror::Error)]
#[error("call history unavailable: {0}")]
pub struct HistoryError(pub String);

/// Where past calls come from.
pub trait History: Send + Sync + std::fmt::Debug {
    /// Calls matching `filter`, newest first, at most `filter.limit()`.
    fn list(&self, filter: CallFilter) -> BoxFuture<'_, Result<Vec<CallRow>, HistoryError>>;
    /// One call.
    fn call(&self, id: Uuid) -> BoxFuture<'_, Result<Option<CallDetail>, HistoryError>>;
    /// Per-day totals of the calls matching `filter` (its limit does not apply), newest day
    /// first.
    fn daily_totals(
        &self,
        filter: CallFilter,
    ) -> BoxFuture<'_, Result<Vec<DayTotals>, HistoryError>>;
    /// Where it comes from, shown on the pages (e.g. `this daemon since start`).
    fn describe(&self) -> String;
}

/// `from` and `to` of a filter as `[from_ms, to_ms)` since the Unix epoch (`to` is inclusive
/// at its own precision, so the end is one day, minute or second after it).
pub fn time_range(f: &CallFilter) -> Result<(Option<i64>, Option<i64>), String> {
    let parse = |key: &str, v: &Option<String>, end: bool| -> Result<Option<i64>, String> {
        let Some(v) = v.as_deref().map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let (start, unit) = parse_utc(v).ok_or_else(|| {
            format!("{key}={v:?} is not a UTC date or time (2026-12-01, 2026-12-01T09:30)")
        })?;
        Ok(Some(if end { start + unit } else { start }))
    };
    Ok((parse("from", &f.from, false)?, parse("to", &f.to, true)?))
}

/// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM` or `YYYY-MM-DDTHH:MM:SS` (a space for the `T`, a
/// trailing `Z` and fractions are accepted) as ms since the epoch, with the unit of its
/// last field in ms.
fn parse_utc(s: &str) -> Option<(i64, i64)> {
    let s = s.trim_end_matches('Z');
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut d = date.splitn(3, '-');
    let num = |x: Option<&str>, len: usize| -> Option<i64> {
        let x = x?;
        (x.len() == len && x.bytes().all(|b| b.is_ascii_digit())).then(|| x.parse().ok())?
    };
    let (y, m, day) = (num(d.next(), 4)?, num(d.next(), 2)?, num(d.next(), 2)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(y, m, day);
    let mut ms = days * 86_400_000;
    let Some(time) = time else {
        return Some((ms, 86_400_000));
    };
    let mut t = time.splitn(3, ':');
    let (h, min) = (num(t.next(), 2)?, num(t.next(), 2)?);
    if h > 23 || min > 59 {
        return None;
    }
    ms += (h * 60 + min) * 60_000;
    match t.next() {
        None => Some((ms, 60_000)),
        Some(sec) => {
            let sec = num(sec.split('.').next(), 2)?;
            (sec <= 60).then_some((ms + sec * 1000, 1000))
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Sums rows into per-day totals, newest day first (for stores that hold rows in memory).
pub fn totals_of<'a>(rows: impl IntoIterator<Item = &'a CallRow>) -> Vec<DayTotals> {
    let mut days: std::collections::BTreeMap<String, DayTotals> = Default::default();
    for r in rows {
        let day = r.started_at.get(..10).unwrap_or(&r.started_at).to_owned();
        let t = days.entry(day.clone()).or_insert_with(|| DayTotals {
            day,
            calls: 0,
            minutes: 0.0,
            cost: 0.0,
            currency: r.currency.clone(),
        });
        t.calls += 1;
        t.minutes += r.duration_ms as f64 / 60_000.0;
        t.cost += r.cost.unwrap_or(0.0);
    }
    days.into_values().rev().collect()
}

/// What the console routes need.
#[derive(Debug, Clone)]
pub struct Console {
    /// Calls in progress on this daemon.
    pub live: LiveCalls,
    /// Past calls.
    pub history: Arc<dyn History>,
    /// Who may look.
    pub access: Access,
    /// This daemon's name in the records (`records.node_id`): calls in progress that the
    /// history lists under another name are on other daemons.
    pub node_id: String,
}

#[cfg(test)]
mod tests;
