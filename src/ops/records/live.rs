//! The records' side of a running call: [`CallTap`] writes what the call has produced so
//! far (transcript lines, turns, tool calls, errors), so a daemon killed mid-call leaves
//! the call's turns behind; [`FinishSettings`] completes the record at the end (node, cost,
//! latency summary) and counts the cost in `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::store::{CallEvent, EventKind, Op, Store};
use super::{
    CallCost, CallError, CallRecord, LatencySummary, ToolCall, TranscriptEntry, TurnTiming,
};
use crate::call::AgentReport;
use crate::ops::config::{PricingSettings, Settings};
use crate::ops::metrics::Metrics;

/// How often a call's progress is written.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);

/// What a call has had written so far; fed the machine's report by the driver now and then.
#[derive(Debug)]
pub struct CallTap {
    store: Arc<Store>,
    call_id: Uuid,
    transcript: Vec<TranscriptEntry>,
    turns: Vec<TurnTiming>,
    tools: Vec<ToolCall>,
    errors: usize,
    next_sync: Option<Instant>,
}

impl CallTap {
    /// A tap for one call whose row has been started.
    pub fn new(store: Arc<Store>, call_id: Uuid) -> Self {
        Self {
            store,
            call_id,
            transcript: Vec::new(),
            turns: Vec::new(),
            tools: Vec::new(),
            errors: 0,
            next_sync: None,
        }
    }

    /// Whether a sync is due at `now` (the first one is due at once).
    pub fn due(&self, now: Instant) -> bool {
        self.next_sync.is_none_or(|t| now >= t)
    }

    /// Queues what changed since the last sync; `at_ms` is now, ms since the call started.
    /// Cheap when nothing changed; never blocks.
    pub fn sync(&mut self, report: &AgentReport, now: Instant, at_ms: u64) {
        self.next_sync = Some(now + SYNC_EVERY);
        for (i, t) in report.transcript.iter().enumerate() {
            if self.transcript.get(i) != Some(t) {
                self.event(EventKind::Transcript, i, t.at_ms, t);
                if i < self.transcript.len() {
                    self.transcript[i] = t.clone();
                } else {
                    self.transcript.push(t.clone());
                }
            }
        }
        // Only turns the recogniser finalised, as in the final record.
        for (i, t) in report
            .turns
            .iter()
            .filter(|t| t.stt_final_ms.is_some())
            .enumerate()
        {
            if self.turns.get(i) != Some(t) {
                let at = t.first_frame_ms.or(t.stt_final_ms).unwrap_or(at_ms);
                self.event(EventKind::Turn, i, at, t);
                if i < self.turns.len() {
                    self.turns[i] = t.clone();
                } else {
                    self.turns.push(t.clone());
                }
            }
        }
        for (i, t) in report.tool_calls.iter().enumerate() {
            if self.tools.get(i) != Some(t) {
                self.event(EventKind::Tool, i, t.at_ms, t);
                if i < self.tools.len() {
                    self.tools[i] = t.clone();
                } else {
                    self.tools.push(t.clone());
                }
            }
        }
        for (i, text) in report.errors.iter().enumerate().skip(self.errors) {
            let e = CallError {
                at_ms,
                text: text.clone(),
            };
            self.event(EventKind::Error, i, at_ms, &e);
        }
        self.errors = report.errors.len();
    }

    fn event(&self, kind: EventKind, idx: usize, at_ms: u64, item: &impl serde::Serialize) {
        let Ok(body) = serde_json::to_string(item) else {
            return;
        };
        self.store.send(Op::Event(CallEvent {
            call_id: self.call_id,
            kind,
            idx: u32::try_from(idx).unwrap_or(u32::MAX),
            at_ms,
            body,
        }));
    }
}

/// What completes a record at the end of a call.
#[derive(Debug)]
pub struct FinishSettings {
    /// `records.node_id`, or the host name.
    pub node_id: String,
    /// `[pricing]`.
    pub pricing: PricingSettings,
    /// Where the cost is counted.
    pub metrics: Option<Arc<Metrics>>,
    /// `records.recordings_dir`, when set.
    pub recordings_dir: Option<std::path::PathBuf>,
    /// `records.record_all`.
    pub record_all: bool,
}

impl FinishSettings {
    /// From the settings.
    pub fn from_settings(settings: &Settings, metrics: Option<Arc<Metrics>>) -> Self {
        let id = settings.records.node_id.trim();
        Self {
            node_id: if id.is_empty() {
                hostname()
            } else {
                id.to_owned()
            },
            pricing: settings.pricing.clone(),
            metrics,
            recordings_dir: Some(settings.records.recordings_dir.trim())
                .filter(|d| !d.is_empty())
                .map(std::path::PathBuf::from),
            record_all: settings.records.record_all,
        }
    }

    /// Fills the node, the latency summary and the cost.
    pub fn complete(&self, rec: &mut CallRecord) {
        rec.node_id.clone_from(&self.node_id);
        rec.latency = LatencySummary::of(&rec.turns);
        if rec.mode == crate::ops::config::AgentMode::Ai {
            rec.cost = Some(cost(&self.pricing, rec));
        }
    }

    /// Adds a finished call's cost to `sifucall_cost_total`.
    pub fn count_cost(&self, rec: &CallRecord) {
        if let (Some(m), Some(c)) = (&self.metrics, &rec.cost) {
            m.cost("llm", c.llm + c.llm_abandoned_estimate);
            m.cost("stt", c.stt);
            m.cost("tts", c.tts);
        }
    }
}

/// A call's cost from its record and the prices.
pub fn cost(p: &PricingSettings, rec: &CallRecord) -> CallCost {
    let llm = rec.llm_cost.unwrap_or(0.0);
    let abandoned = rec.speculative.wasted_tokens as f64 * p.llm_per_million_tokens / 1e6;
    let stt_audio_seconds = rec.stt_audio_ms as f64 / 1000.0;
    let stt = stt_audio_seconds / 3600.0 * p.stt_per_hour;
    let tts = rec.tts_characters as f64 / 1000.0 * p.tts_per_1k_chars;
    let total = llm + abandoned + stt + tts;
    CallCost {
        llm,
        llm_abandoned_estimate: abandoned,
        stt,
        tts,
        total,
        currency: p.currency.clone(),
        stt_audio_seconds,
        tts_characters: rec.tts_characters,
        total_myr: (p.myr_rate > 0.0).then_some(total * p.myr_rate),
    }
}

/// The host's name (`records.node_id`'s default).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "sifucall".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_owned();
    if name.is_empty() {
        "sifucall".into()
    } else {
        name
    }
}
