//! Prometheus metrics for the daemon, rendered as OpenMetrics text on the admin server.
//!
//! Why it looks the way it does:
//! - No global registry: each [`Metrics`] owns its own, so several daemons can run in one
//!   test process and be asserted on separately. Share one through `Arc<Metrics>`.
//! - Hot paths (frames in/out and pacing lateness: ~50 events per second per call, times the
//!   call cap) touch only atomics. Every labelled series with a fixed label set is resolved once
//!   at construction and kept in a field, so recording never looks up a label map. The same
//!   pre-resolution makes every known series appear at zero from the first scrape, which keeps
//!   `rate()` and alerting sane.
//! - Latency histograms use [`DurationHistogram`], a lock-free histogram over integer
//!   nanoseconds, because `prometheus-client`'s own `Histogram` takes a mutex per observation.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, text::encode,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the pacing-lateness histogram, seconds.
const PACING_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
];
/// Upper bounds of the per-turn stage latency histogram, seconds.
const STAGE_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
];
/// Upper bounds of the call duration histogram, seconds.
const CALL_DURATION_BUCKETS: [f64; 11] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

/// Distinct `kind` values kept per scrape for `provider_errors_total` before new ones are
/// folded into `other` (a free-form kind must not explode the series count).
const MAX_PROVIDER_ERROR_SERIES: usize = 64;
/// Longest `kind` label value kept.
const MAX_KIND_LEN: usize = 40;

/// Why a call ended. Recorded in `sifucall_calls_total{end_reason}` and in call records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EndReason {
    /// Asterisk closed the socket (the caller hung up).
    CallerHangup,
    /// Asterisk sent a 0x00 hangup frame.
    HangupFrame,
    /// Asterisk sent a 0xff error frame.
    ErrorFrame,
    /// The peer broke the AudioSocket protocol.
    ProtocolError,
    /// The agent ended the call (goodbye, `end_call` tool, idle timeout).
    AgentHangup,
    /// The daemon was shutting down and the drain grace ran out.
    Shutdown,
    /// The connection sent no UUID message in time.
    FirstMessageTimeout,
    /// Writing audio to Asterisk failed.
    WriteFailed,
    /// Reading from the socket failed.
    IoError,
    /// The call's task panicked (a bug); only that call ended.
    InternalError,
}

impl EndReason {
    /// Every reason, in a fixed order.
    pub const ALL: [EndReason; 10] = [
        Self::CallerHangup,
        Self::HangupFrame,
        Self::ErrorFrame,
        Self::ProtocolError,
        Self::AgentHangup,
        Self::Shutdown,
        Self::FirstMessageTimeout,
        Self::WriteFailed,
        Self::IoError,
        Self::InternalError,
    ];

    /// The label value (and the call record's `end_reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CallerHangup => "caller_hangup",
            Self::HangupFrame => "hangup_frame",
            Self::ErrorFrame => "error_frame",
            Self::ProtocolError => "protocol_error",
            Self::AgentHangup => "agent_hangup",
            Self::Shutdown => "shutdown",
            Self::FirstMessageTimeout => "first_message_timeout",
            Self::WriteFailed => "write_failed",
            Self::IoError => "io_error",
            Self::InternalError => "internal_error",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::CallerHangup => 0,
            Self::HangupFrame => 1,
            Self::ErrorFrame => 2,
            Self::ProtocolError => 3,
            Self::AgentHangup => 4,
            Self::Shutdown => 5,
            Self::FirstMessageTimeout => 6,
            Self::WriteFailed => 7,
            Self::IoError => 8,
            Self::InternalError => 9,
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection was refused before it became a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefuseReason {
    /// The source address is not in `audiosocket.allow`.
    NotAllowed,
    /// `audiosocket.max_calls` calls are already up.
    OverCapacity,
    /// The daemon is shutting down.
    Draining,
    /// `audiosocket.max_pending` connections are already waiting for their UUID.
    TooManyPending,
    /// The connection closed, timed out or broke the protocol before its UUID arrived.
    NoUuid,
}

impl RefuseReason {
    /// Every reason, in a fixed order.
    pub const ALL: [RefuseReason; 5] = [
        Self::NotAllowed,
        Self::OverCapacity,
        Self::Draining,
        Self::TooManyPending,
        Self::NoUuid,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAllowed => "not_allowed",
            Self::OverCapacity => "over_capacity",
            Self::Draining => "draining",
            Self::TooManyPending => "too_many_pending",
            Self::NoUuid => "no_uuid",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::NotAllowed => 0,
            Self::OverCapacity => 1,
            Self::Draining => 2,
            Self::TooManyPending => 3,
            Self::NoUuid => 4,
        }
    }
}

/// A stage of one conversational turn, measured between two events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stage {
    /// The VAD saw the caller stop talking -> STT final result.
    VadEndToSttFinal,
    /// STT final result -> first LLM token.
    SttFinalToLlmFirstToken,
    /// First LLM token -> first TTS audio bytes.
    LlmFirstTokenToTtsFirstAudio,
    /// First TTS audio bytes -> first reply frame written to Asterisk.
    TtsFirstAudioToWire,
    /// The whole turn: caller stopped talking -> first reply frame on the wire.
    SpeechEndToFirstAudio,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 5] = [
        Self::VadEndToSttFinal,
        Self::SttFinalToLlmFirstToken,
        Self::LlmFirstTokenToTtsFirstAudio,
        Self::TtsFirstAudioToWire,
        Self::SpeechEndToFirstAudio,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VadEndToSttFinal => "vad_end_to_stt_final",
            Self::SttFinalToLlmFirstToken => "stt_final_to_llm_first_token",
            Self::LlmFirstTokenToTtsFirstAudio => "llm_first_token_to_tts_first_audio",
            Self::TtsFirstAudioToWire => "tts_first_audio_to_wire",
            Self::SpeechEndToFirstAudio => "speech_end_to_first_audio",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::VadEndToSttFinal => 0,
            Self::SttFinalToLlmFirstToken => 1,
            Self::LlmFirstTokenToTtsFirstAudio => 2,
            Self::TtsFirstAudioToWire => 3,
            Self::SpeechEndToFirstAudio => 4,
        }
    }
}

/// An external provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Provider {
    /// Speech-to-text.
    Stt,
    /// The language model.
    Llm,
    /// Text-to-speech.
    Tts,
}

impl Provider {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stt => "stt",
            Self::Llm => "llm",
            Self::Tts => "tts",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProviderErrorLabels {
    provider: &'static str,
    kind: String,
}

/// A histogram of durations with lock-free recording.
///
/// Buckets are counted in integer nanoseconds with one relaxed atomic add for the bucket and
/// one for the sum. A scrape is not an atomic snapshot across buckets; the count is derived
/// from the buckets so a scrape is always internally consistent (`count` equals the `+Inf`
/// bucket).
#[derive(Clone)]
pub struct DurationHistogram {
    inner: Arc<HistogramInner>,
}

struct HistogramInner {
    /// Finite upper bounds in seconds (for encoding), ascending.
    bounds_secs: Box<[f64]>,
    /// The same bounds in nanoseconds (for recording).
    bounds_nanos: Box<[u64]>,
    /// One counter per finite bound plus the `+Inf` bucket.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    /// A histogram with these upper bounds in seconds (non-finite or negative bounds are
    /// ignored; they are sorted; `+Inf` is implicit).
    pub fn new(bounds_secs: &[f64]) -> Self {
        let mut bounds: Vec<f64> = bounds_secs
            .iter()
            .copied()
            .filter(|b| b.is_finite() && *b >= 0.0)
            .collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let bounds_nanos = bounds.iter().map(|b| (b * 1e9).round() as u64).collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self {
            inner: Arc::new(HistogramInner {
                bounds_secs: bounds.into_boxed_slice(),
                bounds_nanos,
                counts,
                sum_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let idx = self
            .inner
            .bounds_nanos
            .iter()
            .position(|b| nanos <= *b)
            .unwrap_or(self.inner.bounds_nanos.len());
        if let Some(c) = self.inner.counts.get(idx) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of all observations.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.inner.sum_nanos.load(Ordering::Relaxed))
    }
}

impl fmt::Debug for DurationHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurationHistogram")
            .field("bounds_secs", &self.inner.bounds_secs)
            .field("count", &self.count())
            .finish()
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let counts: Vec<u64> = self
            .inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let count = counts.iter().sum();
        let sum = self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let buckets: Vec<(f64, u64)> = self
            .inner
            .bounds_secs
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts)
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            sum,
            count,
            &buckets,
            None::<&std::collections::HashMap<usize, Exemplar<NoLabelSet, f64>>>,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

type LabelledCounter = Family<[(&'static str, &'static str); 1], Counter>;
type HistogramFamily =
    Family<[(&'static str, &'static str); 1], DurationHistogram, fn() -> DurationHistogram>;

fn stage_histogram() -> DurationHistogram {
    DurationHistogram::new(&STAGE_BUCKETS)
}

/// The daemon's metrics. Create one per daemon and share it as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    active_calls: Gauge,
    calls_by_reason: [Counter; 10],
    refused_by_reason: [Counter; 5],
    pending_connections: Gauge,
    log_lines_dropped: Counter,
    /// Serialises the catch-up of `log_lines_dropped` from the logger's own count.
    log_lines_seen: Mutex<u64>,
    admin_refused: Counter,
    frames_in: Counter,
    frames_out: Counter,
    underruns: Counter,
    dtmf: Counter,
    inbound_dropped: Counter,
    pacing_lateness: DurationHistogram,
    pacing_lateness_max_us: Gauge,
    stage: [DurationHistogram; 5],
    provider_errors: Family<ProviderErrorLabels, Counter>,
    /// Distinct `provider_errors` series created so far.
    provider_error_series: Mutex<usize>,
    barge_ins: Counter,
    llm_cost: Counter<f64, AtomicU64>,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    speculative: LabelledCounter,
    speculative_wasted_tokens: Counter,
    call_duration: DurationHistogram,
    records: RecordsMetrics,
}

/// The call records' own series.
struct RecordsMetrics {
    written: Counter,
    spooled: Counter,
    lost: LabelledCounter,
    backlog: Gauge,
    webhook: LabelledCounter,
    cost: Family<[(&'static str, &'static str); 1], Counter<f64, AtomicU64>>,
}

impl RecordsMetrics {
    fn register(registry: &mut Registry) -> Self {
        let written = Counter::default();
        registry.register(
            "records_written",
            "Call record writes committed to the database",
            written.clone(),
        );
        let spooled = Counter::default();
        registry.register(
            "records_spooled",
            "Call record writes spooled to disk while the database refused them",
            spooled.clone(),
        );
        let lost = LabelledCounter::default();
        registry.register(
            "records_lost",
            "Call record writes lost, by reason (queue_full, spool_failed, closed)",
            lost.clone(),
        );
        for r in ["queue_full", "spool_failed", "closed"] {
            let _ = lost.get_or_create(&[("reason", r)]);
        }
        let backlog = Gauge::default();
        registry.register(
            "records_backlog",
            "Spooled batches of call records waiting for the database",
            backlog.clone(),
        );
        let webhook = LabelledCounter::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts, by result (delivered, failed)",
            webhook.clone(),
        );
        for r in ["delivered", "failed"] {
            let _ = webhook.get_or_create(&[("result", r)]);
        }
        let cost = Family::<[(&'static str, &'static str); 1], Counter<f64, AtomicU64>>::default();
        registry.register(
            "cost",
            "Cost of ended calls in pricing.currency, by component (llm, stt, tts)",
            cost.clone(),
        );
        for c in ["llm", "stt", "tts"] {
            let _ = cost.get_or_create(&[("component", c)]);
        }
        Self {
            written,
            spooled,
            lost,
            backlog,
            webhook,
            cost,
        }
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("active_calls", &self.active_calls.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every `sifucall_*` metric registered at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sifucall");

        let active_calls = Gauge::default();
        registry.register("active_calls", "Calls in progress", active_calls.clone());

        let calls = LabelledCounter::default();
        registry.register("calls", "Calls ended, by end reason", calls.clone());
        let calls_by_reason =
            EndReason::ALL.map(|r| calls.get_or_create_owned(&[("end_reason", r.as_str())]));

        let refused = LabelledCounter::default();
        registry.register(
            "connections_refused",
            "AudioSocket connections refused before becoming a call, by reason",
            refused.clone(),
        );
        let refused_by_reason =
            RefuseReason::ALL.map(|r| refused.get_or_create_owned(&[("reason", r.as_str())]));

        let pending_connections = Gauge::default();
        registry.register(
            "pending_connections",
            "AudioSocket connections accepted and still waiting for their UUID (they hold no call slot)",
            pending_connections.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log output (stderr, journald) was not keeping up",
            log_lines_dropped.clone(),
        );
        let admin_refused = Counter::default();
        registry.register(
            "admin_connections_refused",
            "Admin HTTP connections closed at once because admin connections were at their cap",
            admin_refused.clone(),
        );

        let frames_in = Counter::default();
        registry.register(
            "frames_in",
            "Audio frames received from Asterisk",
            frames_in.clone(),
        );
        let frames_out = Counter::default();
        registry.register(
            "frames_out",
            "Audio frames sent to Asterisk",
            frames_out.clone(),
        );
        let underruns = Counter::default();
        registry.register(
            "underruns",
            "Playout ticks with a reply in progress but no audio ready (silence sent instead)",
            underruns.clone(),
        );
        let dtmf = Counter::default();
        registry.register("dtmf", "DTMF digits received", dtmf.clone());
        let inbound_dropped = Counter::default();
        registry.register(
            "inbound_dropped",
            "Inbound audio frames dropped because a pipeline stage was behind",
            inbound_dropped.clone(),
        );

        let pacing_lateness = DurationHistogram::new(&PACING_BUCKETS);
        registry.register_with_unit(
            "pacing_lateness",
            "How late each outbound frame was sent relative to its schedule",
            Unit::Seconds,
            pacing_lateness.clone(),
        );

        let pacing_lateness_max_us = Gauge::default();
        registry.register(
            "pacing_lateness_max_microseconds",
            "Worst outbound frame lateness since start, microseconds",
            pacing_lateness_max_us.clone(),
        );

        let stages = HistogramFamily::new_with_constructor(stage_histogram);
        registry.register_with_unit(
            "turn_stage",
            "Per-turn latency of each pipeline stage",
            Unit::Seconds,
            stages.clone(),
        );
        let stage = Stage::ALL.map(|s| stages.get_or_create_owned(&[("stage", s.as_str())]));

        let provider_errors = Family::<ProviderErrorLabels, Counter>::default();
        registry.register(
            "provider_errors",
            "Provider failures, by provider (stt, llm, tts) and kind",
            provider_errors.clone(),
        );

        let barge_ins = Counter::default();
        registry.register(
            "barge_ins",
            "Times the caller interrupted the agent",
            barge_ins.clone(),
        );

        let llm_cost = Counter::<f64, AtomicU64>::default();
        registry.register(
            "llm_cost",
            "LLM cost reported by the provider, in credits (USD)",
            llm_cost.clone(),
        );

        let tokens = LabelledCounter::default();
        registry.register("llm_tokens", "LLM tokens used, by kind", tokens.clone());
        let prompt_tokens = tokens.get_or_create_owned(&[("kind", "prompt")]);
        let completion_tokens = tokens.get_or_create_owned(&[("kind", "completion")]);

        let speculative = LabelledCounter::default();
        registry.register(
            "llm_speculative_requests",
            "LLM requests started on a hypothesis before the final, by outcome (started, used, wasted)",
            speculative.clone(),
        );
        for outcome in ["started", "used", "wasted"] {
            let _ = speculative.get_or_create(&[("outcome", outcome)]);
        }
        let speculative_wasted_tokens = Counter::default();
        registry.register(
            "llm_speculative_wasted_tokens",
            "Estimated tokens of speculative requests that were thrown away",
            speculative_wasted_tokens.clone(),
        );

        let call_duration = DurationHistogram::new(&CALL_DURATION_BUCKETS);
        registry.register_with_unit(
            "call_duration",
            "Duration of ended calls",
            Unit::Seconds,
            call_duration.clone(),
        );

        let records = RecordsMetrics::register(&mut registry);

        Self {
            records,
            registry,
            active_calls,
            calls_by_reason,
            refused_by_reason,
            pending_connections,
            log_lines_dropped,
            log_lines_seen: Mutex::new(0),
            admin_refused,
            frames_in,
            frames_out,
            underruns,
            dtmf,
            inbound_dropped,
            pacing_lateness,
            pacing_lateness_max_us,
            stage,
            provider_errors,
            provider_error_series: Mutex::new(0),
            barge_ins,
            llm_cost,
            prompt_tokens,
            completion_tokens,
            speculative,
            speculative_wasted_tokens,
            call_duration,
        }
    }

    /// A call was accepted. Pair every call with exactly one [`Metrics::call_ended`].
    pub fn call_started(&self) {
        self.active_calls.inc();
    }

    /// A call ended after `duration`.
    pub fn call_ended(&self, reason: EndReason, duration: Duration) {
        self.active_calls.dec();
        if let Some(c) = self.calls_by_reason.get(reason.index()) {
            c.inc();
        }
        self.call_duration.observe(duration);
    }

    /// A connection was refused before it became a call.
    pub fn connection_refused(&self, reason: RefuseReason) {
        if let Some(c) = self.refused_by_reason.get(reason.index()) {
            c.inc();
        }
    }

    /// A connection was accepted and now waits for its UUID. Pair with
    /// [`Metrics::pending_ended`].
    pub fn pending_started(&self) {
        self.pending_connections.inc();
    }

    /// A pending connection sent its UUID, or was closed.
    pub fn pending_ended(&self) {
        self.pending_connections.dec();
    }

    /// Connections waiting for their UUID right now.
    pub fn pending_connections(&self) -> i64 {
        self.pending_connections.get()
    }

    /// An admin HTTP connection was closed at once (admin connections at their cap).
    pub fn admin_connection_refused(&self) {
        self.admin_refused.inc();
    }

    /// `n` audio frames arrived from Asterisk.
    pub fn frames_in(&self, n: u64) {
        self.frames_in.inc_by(n);
    }

    /// `n` audio frames were written to Asterisk.
    pub fn frames_out(&self, n: u64) {
        self.frames_out.inc_by(n);
    }

    /// The playout clock ticked with a reply in progress and no audio ready.
    pub fn underrun(&self) {
        self.underruns.inc();
    }

    /// A DTMF digit arrived.
    pub fn dtmf(&self) {
        self.dtmf.inc();
    }

    /// `n` inbound frames were dropped because a stage was behind.
    pub fn inbound_dropped(&self, n: u64) {
        self.inbound_dropped.inc_by(n);
    }

    /// An outbound frame went out this late relative to its schedule.
    pub fn pacing_lateness(&self, late: Duration) {
        self.pacing_lateness.observe(late);
        let us = i64::try_from(late.as_micros()).unwrap_or(i64::MAX);
        self.pacing_lateness_max_us
            .inner()
            .fetch_max(us, Ordering::Relaxed);
    }

    /// One stage of a turn took `d`.
    pub fn turn_stage(&self, stage: Stage, d: Duration) {
        if let Some(h) = self.stage.get(stage.index()) {
            h.observe(d);
        }
    }

    /// A provider failed. `kind` is a short classification such as `timeout`, `status_429`,
    /// `stalled`, `mid_stream`, `connect` or `auth`; it is normalised to `[a-z0-9_]`, capped
    /// in length, and folded into `other` once too many distinct kinds have been seen.
    pub fn provider_error(&self, provider: Provider, kind: &str) {
        let mut labels = ProviderErrorLabels {
            provider: provider.as_str(),
            kind: normalise_kind(kind),
        };
        let counter = {
            // Errors are rare; the lock makes the series cap exact.
            let mut series = self
                .provider_error_series
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let known = self.provider_errors.get(&labels).is_some();
            if !known {
                if *series >= MAX_PROVIDER_ERROR_SERIES {
                    labels.kind = "other".to_owned();
                }
                if self.provider_errors.get(&labels).is_none() {
                    *series += 1;
                }
            }
            self.provider_errors.get_or_create_owned(&labels)
        };
        counter.inc();
    }

    /// The caller interrupted the agent.
    pub fn barge_in(&self) {
        self.barge_ins.inc();
    }

    /// An LLM reply used these tokens and, if the provider reported it, cost this much.
    pub fn llm_usage(&self, prompt_tokens: u64, completion_tokens: u64, cost: Option<f64>) {
        self.prompt_tokens.inc_by(prompt_tokens);
        self.completion_tokens.inc_by(completion_tokens);
        if let Some(c) = cost.filter(|c| c.is_finite() && *c > 0.0) {
            self.llm_cost.inc_by(c);
        }
    }

    /// A speculative request `started`, `used` or `wasted` (with its estimated tokens).
    pub fn llm_speculative(&self, outcome: &'static str, wasted_tokens: u64) {
        self.speculative
            .get_or_create(&[("outcome", outcome)])
            .inc();
        self.speculative_wasted_tokens.inc_by(wasted_tokens);
    }

    /// Call record writes committed.
    pub fn records_written(&self, n: u64) {
        self.records.written.inc_by(n);
    }

    /// Call record writes spooled while the database refused them.
    pub fn records_spooled(&self, n: u64) {
        self.records.spooled.inc_by(n);
    }

    /// Call record writes lost (`queue_full`, `spool_failed`, `closed`).
    pub fn records_lost(&self, reason: &'static str, n: u64) {
        self.records
            .lost
            .get_or_create(&[("reason", reason)])
            .inc_by(n);
    }

    /// Spooled batches waiting now.
    pub fn records_backlog(&self, batches: i64) {
        self.records.backlog.set(batches);
    }

    /// A webhook delivery attempt `delivered` or `failed`.
    pub fn webhook_delivery(&self, result: &'static str) {
        self.records
            .webhook
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// A finished call's cost for one component (`llm`, `stt`, `tts`).
    pub fn cost(&self, component: &'static str, amount: f64) {
        if amount.is_finite() && amount > 0.0 {
            self.records
                .cost
                .get_or_create(&[("component", component)])
                .inc_by(amount);
        }
    }

    fn catch_up_log_drops(&self) {
        let mut seen = self
            .log_lines_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = crate::ops::logging::dropped_lines();
        if now > *seen {
            self.log_lines_dropped.inc_by(now - *seen);
            *seen = now;
        }
    }

    /// Calls in progress right now.
    pub fn active_calls(&self) -> i64 {
        self.active_calls.get()
    }

    /// The exposition text (OpenMetrics 1.0, ending in `# EOF`); serve with [`CONTENT_TYPE`].
    pub fn render(&self) -> String {
        self.catch_up_log_drops();
        let mut out = String::with_capacity(8 * 1024);
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// The value of one series in [`Metrics::render`]'s output, e.g.
    /// `sifucall_calls_total{end_reason="caller_hangup"}`; for tests and diagnostics.
    pub fn sample(&self, series: &str) -> Option<f64> {
        self.render()
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }
}

fn normalise_kind(kind: &str) -> String {
    let mut out: String = kind
        .trim()
        .chars()
        .take(MAX_KIND_LEN)
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() {
        out.push_str("unknown");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find(|l| l.strip_prefix(series).is_some_and(|r| r.starts_with(' ')))
            .map(str::to_owned)
    }

    #[test]
    fn fresh_registry_shows_every_known_series_at_zero() {
        let m = Metrics::new();
        let text = m.render();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE sifucall_active_calls gauge"));
        assert_eq!(
            line(&text, "sifucall_active_calls").as_deref(),
            Some("sifucall_active_calls 0")
        );
        for r in EndReason::ALL {
            let s = format!("sifucall_calls_total{{end_reason=\"{}\"}}", r.as_str());
            assert_eq!(m.sample(&s), Some(0.0), "{s} missing in\n{text}");
        }
        for r in RefuseReason::ALL {
            let s = format!(
                "sifucall_connections_refused_total{{reason=\"{}\"}}",
                r.as_str()
            );
            assert_eq!(m.sample(&s), Some(0.0), "{s}");
        }
        for s in Stage::ALL {
            let series = format!(
                "sifucall_turn_stage_seconds_count{{stage=\"{}\"}}",
                s.as_str()
            );
            assert_eq!(m.sample(&series), Some(0.0), "{series}");
        }
        for name in [
            "sifucall_frames_in_total",
            "sifucall_frames_out_total",
            "sifucall_underruns_total",
            "sifucall_dtmf_total",
            "sifucall_inbound_dropped_total",
            "sifucall_barge_ins_total",
            "sifucall_llm_cost_total",
            "sifucall_llm_tokens_total{kind=\"prompt\"}",
            "sifucall_llm_tokens_total{kind=\"completion\"}",
            "sifucall_pacing_lateness_seconds_count",
            "sifucall_call_duration_seconds_count",
        ] {
            assert_eq!(m.sample(name), Some(0.0), "{name} missing in\n{text}");
        }
        assert!(text.contains("# UNIT sifucall_pacing_lateness_seconds seconds"));
        // A family with no series yet is left out entirely.
        assert!(!text.contains("sifucall_provider_errors"));
    }

    #[test]
    fn call_lifecycle_is_counted() {
        let m = Metrics::new();
        m.call_started();
        m.call_started();
        assert_eq!(m.active_calls(), 2);
        m.call_ended(EndReason::CallerHangup, Duration::from_secs(42));
        m.call_ended(EndReason::AgentHangup, Duration::from_millis(500));
        m.connection_refused(RefuseReason::OverCapacity);
        assert_eq!(m.sample("sifucall_active_calls"), Some(0.0));
        assert_eq!(
            m.sample("sifucall_calls_total{end_reason=\"caller_hangup\"}"),
            Some(1.0)
        );
        assert_eq!(
            m.sample("sifucall_calls_total{end_reason=\"agent_hangup\"}"),
            Some(1.0)
        );
        assert_eq!(
            m.sample("sifucall_calls_total{end_reason=\"shutdown\"}"),
            Some(0.0)
        );
        assert_eq!(
            m.sample("sifucall_connections_refused_total{reason=\"over_capacity\"}"),
            Some(1.0)
        );
        assert_eq!(m.sample("sifucall_call_duration_seconds_count"), Some(2.0));
        assert_eq!(m.sample("sifucall_call_duration_seconds_sum"), Some(42.5));
        // 0.5 s is in the first bucket (le=1), 42 s in le=60; buckets are cumulative.
        assert_eq!(
            m.sample("sifucall_call_duration_seconds_bucket{le=\"1.0\"}"),
            Some(1.0)
        );
        assert_eq!(
            m.sample("sifucall_call_duration_seconds_bucket{le=\"30.0\"}"),
            Some(1.0)
        );
        assert_eq!(
            m.sample("sifucall_call_duration_seconds_bucket{le=\"60.0\"}"),
            Some(2.0)
        );
        assert_eq!(
            m.sample("sifucall_call_duration_seconds_bucket{le=\"+Inf\"}"),
            Some(2.0)
        );
    }

    #[test]
    fn hot_path_counters_and_pacing_histogram() {
        let m = Metrics::new();
        m.frames_in(3);
        m.frames_in(2);
        m.frames_out(7);
        m.underrun();
        m.dtmf();
        m.inbound_dropped(4);
        m.pacing_lateness(Duration::from_micros(50));
        m.pacing_lateness(Duration::from_micros(800));
        m.pacing_lateness(Duration::from_millis(250));
        assert_eq!(m.sample("sifucall_frames_in_total"), Some(5.0));
        assert_eq!(m.sample("sifucall_frames_out_total"), Some(7.0));
        assert_eq!(m.sample("sifucall_underruns_total"), Some(1.0));
        assert_eq!(m.sample("sifucall_dtmf_total"), Some(1.0));
        assert_eq!(m.sample("sifucall_inbound_dropped_total"), Some(4.0));
        assert_eq!(
            m.sample("sifucall_pacing_lateness_seconds_bucket{le=\"0.0001\"}"),
            Some(1.0)
        );
        assert_eq!(
            m.sample("sifucall_pacing_lateness_seconds_bucket{le=\"0.0005\"}"),
            Some(1.0)
        );
        assert_eq!(
            m.sample("sifucall_pacing_lateness_seconds_bucket{le=\"0.001\"}"),
            Some(2.0)
        );
        assert_eq!(
            m.sample("sifucall_pacing_lateness_seconds_bucket{le=\"0.1\"}"),
            Some(2.0)
        );
        assert_eq!(
            m.sample("sifucall_pacing_lateness_seconds_bucket{le=\"+Inf\"}"),
            Some(3.0)
        );
        assert_eq!(
            m.sample("sifucall_pacing_lateness_seconds_count"),
            Some(3.0)
        );
        let sum = m.sample("sifucall_pacing_lateness_seconds_sum").unwrap();
        assert!((sum - 0.25085).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn turn_stages_errors_and_usage() {
        let m = Metrics::new();
        m.turn_stage(Stage::SttFinalToLlmFirstToken, Duration::from_millis(400));
        m.turn_stage(Stage::SpeechEndToFirstAudio, Duration::from_millis(900));
        m.provider_error(Provider::Llm, "status_429");
        m.provider_error(Provider::Llm, "status_429");
        m.provider_error(Provider::Tts, "Mid Stream!");
        m.barge_in();
        m.llm_usage(120, 30, Some(0.00125));
        m.llm_usage(80, 10, None);
        m.llm_usage(0, 0, Some(f64::NAN));
        assert_eq!(
            m.sample("sifucall_turn_stage_seconds_count{stage=\"stt_final_to_llm_first_token\"}"),
            Some(1.0)
        );
        assert_eq!(
            m.sample("sifucall_turn_stage_seconds_bucket{le=\"0.3\",stage=\"stt_final_to_llm_first_token\"}"),
            Some(0.0)
        );
        assert_eq!(
            m.sample("sifucall_turn_stage_seconds_bucket{le=\"0.5\",stage=\"stt_final_to_llm_first_token\"}"),
            Some(1.0)
        );
        assert_eq!(
            m.sample("sifucall_turn_stage_seconds_count{stage=\"speech_end_to_first_audio\"}"),
            Some(1.0)
        );
        assert_eq!(
            m.sample("sifucall_turn_stage_seconds_count{stage=\"vad_end_to_stt_final\"}"),
            Some(0.0)
        );
        assert_eq!(
            m.sample("sifucall_provider_errors_total{provider=\"llm\",kind=\"status_429\"}"),
            Some(2.0)
        );
        assert_eq!(
            m.sample("sifucall_provider_errors_total{provider=\"tts\",kind=\"mid_stream_\"}"),
            Some(1.0)
        );
        assert_eq!(m.sample("sifucall_barge_ins_total"), Some(1.0));
        assert_eq!(
            m.sample("sifucall_llm_tokens_total{kind=\"prompt\"}"),
            Some(200.0)
        );
        assert_eq!(
            m.sample("sifucall_llm_tokens_total{kind=\"completion\"}"),
            Some(40.0)
        );
        assert_eq!(m.sample("sifucall_llm_cost_total"), Some(0.00125));
    }

    #[test]
    fn provider_error_kinds_are_bounded() {
        let m = Metrics::new();
        for i in 0..(MAX_PROVIDER_ERROR_SERIES + 10) {
            m.provider_error(Provider::Stt, &format!("weird error {i}"));
        }
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("sifucall_provider_errors_total{"))
            .count();
        assert_eq!(series, MAX_PROVIDER_ERROR_SERIES + 1, "{text}");
        assert_eq!(
            m.sample("sifucall_provider_errors_total{provider=\"stt\",kind=\"other\"}"),
            Some(10.0)
        );
        let long = "x".repeat(200);
        m.provider_error(Provider::Stt, &long);
        assert!(!m.render().contains(&long));
    }

    #[test]
    fn registries_are_independent() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.frames_in(10);
        assert_eq!(a.sample("sifucall_frames_in_total"), Some(10.0));
        assert_eq!(b.sample("sifucall_frames_in_total"), Some(0.0));
    }

    #[test]
    fn histogram_is_consistent_under_concurrency() {
        let m = Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for i in 0..1000u64 {
                        m.pacing_lateness(Duration::from_micros(i * (t + 1)));
                        m.frames_out(1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.sample("sifucall_frames_out_total"), Some(4000.0));
        assert_eq!(
            m.sample("sifucall_pacing_lateness_seconds_count"),
            Some(4000.0)
        );
        assert_eq!(
            m.sample("sifucall_pacing_lateness_seconds_bucket{le=\"+Inf\"}"),
            Some(4000.0)
        );
    }

    #[test]
    fn end_reason_serializes_as_label() {
        for r in EndReason::ALL {
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
    }
}
