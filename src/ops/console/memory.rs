//! The history of the calls this daemon has taken since it started, kept in memory: what
//! the console shows when call records are not kept in a database, and the same view for
//! tests. Bounded: the oldest calls are forgotten first.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use futures_util::future::BoxFuture;
use uuid::Uuid;

use super::{
    CallDetail, CallFilter, CallRow, CostItem, DayTotals, History, HistoryError, TranscriptLine,
    totals_of,
};
use crate::call::{CallOutcome, CallSummary};
use crate::ops::records::{Role, rfc3339_utc};

/// Calls kept by default.
pub(super) const DEFAULT_CAPACITY: usize = 2_000;

/// The last calls this daemon took, newest last.
#[derive(Debug)]
pub struct MemoryHistory {
    capacity: usize,
    calls: Mutex<VecDeque<CallDetail>>,
    currency: String,
}

impl Default for MemoryHistory {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl MemoryHistory {
    /// Keeps at most `capacity` calls.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            calls: Mutex::new(VecDeque::new()),
            currency: "USD".into(),
        }
    }

    /// Adds a call.
    pub fn push(&self, call: CallDetail) {
        let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        if calls.len() >= self.capacity {
            calls.pop_front();
        }
        calls.push_back(call);
    }

    /// Adds a finished call from its summary (connections without a UUID are not calls).
    pub fn push_summary(&self, s: &CallSummary) {
        if let Some(d) = self.detail_of(s, SystemTime::now()) {
            self.push(d);
        }
    }

    /// The console's view of a finished call that ended at `ended`.
    pub fn detail_of(&self, s: &CallSummary, ended: SystemTime) -> Option<CallDetail> {
        let call_id = s.call_id?;
        let started = ended.checked_sub(s.duration).unwrap_or(ended);
        let agent = s.agent.clone().unwrap_or_default();
        let outcome = match &s.outcome {
            Some(o) => o.dialplan_value().to_owned(),
            None if agent.transcript.iter().any(|l| l.role == Role::Caller) => {
                CallOutcome::Completed.dialplan_value().to_owned()
            }
            None => CallOutcome::Abandoned.dialplan_value().to_owned(),
        };
        let transfer_target = match &s.outcome {
            Some(CallOutcome::Transferred {
                target,
                destination,
                ..
            }) => Some(format!("{target} ({destination})")),
            _ => None,
        };
        let mut errors = agent.errors.clone();
        if let Some(d) = &s.detail {
            errors.insert(0, d.clone());
        }
        let cost_items = agent
            .llm_cost
            .map(|c| CostItem {
                component: "llm".into(),
                amount: c,
                detail: "as reported by OpenRouter".into(),
            })
            .into_iter()
            .collect();
        let answered = agent
            .turns
            .iter()
            .filter(|t| t.first_frame_ms.is_some())
            .count();
        Some(CallDetail {
            row: CallRow {
                call_id,
                node: None,
                started_at: rfc3339_utc(started),
                ended_at: Some(rfc3339_utc(ended)),
                duration_ms: s.duration.as_millis() as u64,
                caller_number: s.context.caller_number.clone(),
                caller_name: s.context.caller_name.clone(),
                did: s.context.did.clone(),
                profile: s.context.profile.clone(),
                outcome,
                end_reason: s.reason.as_str().to_owned(),
                turns: u32::try_from(answered).unwrap_or(u32::MAX),
                cost: agent.llm_cost,
                currency: self.currency.clone(),
            },
            transfer_target,
            transcript: agent
                .transcript
                .iter()
                .map(|l| TranscriptLine {
                    role: super::db::role(l.role).into(),
                    text: l.text.clone(),
                    start_ms: l.start_ms.unwrap_or(l.at_ms),
                    end_ms: l.end_ms,
                    interrupted: l.interrupted,
                })
                .collect(),
            turn_timings: agent.turns,
            tool_calls: agent
                .tool_calls
                .iter()
                .map(|t| super::ToolCall {
                    name: t.name.clone(),
                    arguments: t.arguments.to_string(),
                    at_ms: Some(t.at_ms),
                    result: Some(t.summary()),
                })
                .collect(),
            errors,
            cost_items,
            total_myr: None,
            recording: None,
        })
    }

    pub(super) fn rows(&self, filter: &CallFilter) -> Vec<CallRow> {
        let calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        calls
            .iter()
            .rev()
            .filter(|c| filter.matches(&c.row))
            .map(|c| c.row.clone())
            .collect()
    }
}

impl History for MemoryHistory {
    fn list(&self, filter: CallFilter) -> BoxFuture<'_, Result<Vec<CallRow>, HistoryError>> {
        let mut rows = self.rows(&filter);
        rows.truncate(filter.limit());
        Box::pin(async move { Ok(rows) })
    }

    fn call(&self, id: Uuid) -> BoxFuture<'_, Result<Option<CallDetail>, HistoryError>> {
        let found = self
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .rev()
            .find(|c| c.row.call_id == id)
            .cloned();
        Box::pin(async move { Ok(found) })
    }

    fn daily_totals(
        &self,
        filter: CallFilter,
    ) -> BoxFuture<'_, Result<Vec<DayTotals>, HistoryError>> {
        let totals = totals_of(&self.rows(&filter));
        Box::pin(async move { Ok(totals) })
    }

    fn describe(&self) -> String {
        format!(
            "the last {} calls this daemon took since it started (call records are not kept in a database)",
            self.capacity
        )
    }
}
