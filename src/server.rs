//! The AudioSocket listener: who may connect, how many at once, and how the daemon drains.
//!
//! AudioSocket has no authentication, so the allowlist is the only gate: connections from
//! elsewhere are closed before a byte is read. A connection that is allowed but has not sent
//! its UUID yet is *pending*: pending connections have their own small cap and the
//! first-message deadline, so peers that connect and dribble bytes never hold a call slot.
//! The call slot is taken when the UUID arrives; over the call cap the connection gets a
//! hangup message (so the dialplan continues, e.g. to a human) and is closed, never left
//! hanging.
//!
//! Refusals are counted per reason in `/metrics` and logged in aggregate (the first few new
//! sources of each interval, then one summary line per interval), so a flood from outside
//! the allowlist cannot flood journald and push the real call lines out.
//!
//! The allowlist, the caps and the per-call behaviour can be replaced while the listener
//! runs ([`ServerHandle::reconfigure`], used on SIGHUP): running calls keep the settings they
//! started with, and lowering `max_calls` drops no call (new calls wait for the count to
//! fall below the new cap).
//!
//! Shutdown is one path: stop taking calls, let the running ones finish for a grace period,
//! then cancel them, which makes each hang up after its last frame has played.
//! [`ServerHandle::stop_now`] (a second SIGTERM) skips the rest of the grace period.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::{FutureExt as _, StreamExt as _};
use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::audiosocket::{Inbound, ServerCodec};
use crate::call::driver;
use crate::call::{CallSummary, SessionConfig};
use crate::ops::admin::ReadyFlag;
use crate::ops::logging::panic_text;
use crate::ops::metrics::{EndReason, Metrics, RefuseReason};

/// The 0x00 hangup message, sent to connections we refuse.
const HANGUP: [u8; 3] = [0, 0, 0];
/// Time allowed for the calls cancelled after the grace period to send their hangup.
pub const HANGUP_DEADLINE: Duration = Duration::from_secs(3);
/// How often refusals are summarised in the log.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// At most this many refusals per interval are logged one by one (each from a source not
/// seen in that interval); the rest only appear in the summary line.
const REFUSALS_LOGGED_ALONE: usize = 3;
/// Distinct sources remembered per interval; further ones count as "other sources".
const MAX_TRACKED_SOURCES: usize = 1024;

/// Listener settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Allowed source networks.
    pub allow: Vec<IpNet>,
    /// Concurrent call cap.
    pub max_calls: usize,
    /// Cap on connections accepted but still waiting for their UUID.
    pub max_pending: usize,
    /// How long calls may run on after shutdown starts.
    pub shutdown_grace: Duration,
    /// Per-call settings.
    pub session: SessionConfig,
}

impl ServerConfig {
    /// Whether `ip` may connect. IPv4 peers of a dual-stack (`[::]`) listener arrive as
    /// `::ffff:a.b.c.d`; they are compared as the IPv4 address they are.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.iter().any(|net| net.contains(&ip))
    }
}

/// Called with each finished call's summary (call records, webhooks).
pub type OnCallEnd = Arc<dyn Fn(CallSummary) + Send + Sync>;

/// A counter with a cap that can move while slots are held.
#[derive(Debug)]
struct Slots {
    used: AtomicUsize,
    max: AtomicUsize,
}

impl Slots {
    fn new(max: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    fn try_take(&self) -> bool {
        let max = self.max.load(Ordering::SeqCst);
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    fn is_full(&self) -> bool {
        self.used.load(Ordering::SeqCst) >= self.max.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    Pending,
    Call,
}

/// What the listener and its handles share.
struct Shared {
    cfg: RwLock<Arc<ServerConfig>>,
    calls: Slots,
    pending: Slots,
    metrics: Arc<Metrics>,
    ready: ReadyFlag,
    refusals: Mutex<RefusalLog>,
    stop_now: CancellationToken,
}

impl Shared {
    fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.cfg.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn take(self: &Arc<Self>, kind: SlotKind) -> Option<Slot> {
        let taken = match kind {
            SlotKind::Pending => self.pending.try_take(),
            SlotKind::Call => self.calls.try_take(),
        };
        if !taken {
            return None;
        }
        match kind {
            SlotKind::Pending => self.metrics.pending_started(),
            SlotKind::Call => self.ready.set_full(self.calls.is_full()),
        }
        Some(Slot {
            shared: Arc::clone(self),
            kind,
        })
    }

    fn refuse(&self, peer: SocketAddr, reason: RefuseReason) {
        self.metrics.connection_refused(reason);
        let alone = self
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(peer.ip().to_canonical(), reason);
        if alone {
            warn!(%peer, reason = reason.as_str(), "connection refused (further refusals are summarised every {}s)", REFUSAL_LOG_INTERVAL.as_secs());
        } else {
            debug!(%peer, reason = reason.as_str(), "connection refused");
        }
    }

    fn log_refusal_summary(&self, now: Instant, force: bool) {
        let summary = self
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_summary(now, force);
        if let Some(s) = summary {
            warn!(
                refused = s.total,
                sources = s.sources,
                top = %s.top_text(),
                by_reason = %s.reasons_text(),
                interval_secs = s.interval.as_secs(),
                "refused {} AudioSocket connections from {} sources",
                s.total,
                s.sources
            );
        }
    }
}

/// A held pending or call slot; released (and metrics updated) on drop, also when the task
/// holding it panics.
struct Slot {
    shared: Arc<Shared>,
    kind: SlotKind,
}

impl Drop for Slot {
    fn drop(&mut self) {
        match self.kind {
            SlotKind::Pending => {
                self.shared.pending.release();
                self.shared.metrics.pending_ended();
            }
            SlotKind::Call => {
                self.shared.calls.release();
                self.shared.ready.set_full(self.shared.calls.is_full());
            }
        }
    }
}

/// Controls a running listener from outside (signal handlers, tests).
#[derive(Clone)]
pub struct ServerHandle(Arc<Shared>);

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Replaces the settings for connections accepted from now on: allowlist, caps, grace
    /// and the per-call behaviour. Running calls keep what they started with; lowering a cap
    /// ends nothing, it only refuses new connections until the count is below it.
    pub fn reconfigure(&self, cfg: ServerConfig) {
        let shared = &self.0;
        shared.calls.max.store(cfg.max_calls, Ordering::SeqCst);
        shared.pending.max.store(cfg.max_pending, Ordering::SeqCst);
        shared.ready.set_full(shared.calls.is_full());
        *shared.cfg.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
    }

    /// The settings new connections get.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.0.config()
    }

    /// Ends the drain now: the running calls are hung up (each gets its 0x00) without
    /// waiting for the rest of the grace period. Has no effect before shutdown starts.
    pub fn stop_now(&self) {
        self.0.stop_now.cancel();
    }
}

/// The listener, before it runs.
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Prepares a listener with these settings.
    pub fn new(cfg: ServerConfig, metrics: Arc<Metrics>, ready: ReadyFlag) -> Self {
        Self {
            shared: Arc::new(Shared {
                calls: Slots::new(cfg.max_calls),
                pending: Slots::new(cfg.max_pending),
                cfg: RwLock::new(Arc::new(cfg)),
                metrics,
                ready,
                refusals: Mutex::new(RefusalLog::new(REFUSAL_LOG_INTERVAL, Instant::now())),
                stop_now: CancellationToken::new(),
            }),
        }
    }

    /// A handle to reconfigure or hurry the listener once it runs.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle(Arc::clone(&self.shared))
    }

    /// Runs the listener until `shutdown` fires, then drains. Returns when every call has
    /// ended.
    pub async fn run(
        self,
        listener: TcpListener,
        on_call_end: Option<OnCallEnd>,
        shutdown: CancellationToken,
    ) {
        let shared = self.shared;
        let calls = TaskTracker::new();
        let cancel_calls = CancellationToken::new();
        shared.ready.set_ready(true);
        if let Ok(addr) = listener.local_addr() {
            let cfg = shared.config();
            info!(%addr, max_calls = cfg.max_calls, max_pending = cfg.max_pending, "AudioSocket listener ready");
        }

        let mut summaries = tokio::time::interval(REFUSAL_LOG_INTERVAL);
        summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                _ = summaries.tick() => {
                    shared.log_refusal_summary(Instant::now(), false);
                    continue;
                }
                r = listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(c) => {
                    backoff = Duration::from_millis(10);
                    c
                }
                Err(e) => {
                    // EMFILE and friends: back off rather than spin, keep serving.
                    error!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let cfg = shared.config();
            if !cfg.allows(peer.ip()) {
                shared.refuse(peer, RefuseReason::NotAllowed);
                drop(stream);
                continue;
            }
            let Some(slot) = shared.take(SlotKind::Pending) else {
                shared.refuse(peer, RefuseReason::TooManyPending);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            calls.spawn(pending(
                stream,
                peer,
                slot,
                Arc::clone(&shared),
                on_call_end.clone(),
                cancel_calls.clone(),
                shutdown.clone(),
                calls.clone(),
            ));
        }

        shared.ready.set_ready(false);
        info!(
            active = calls.len(),
            grace_secs = shared.config().shutdown_grace.as_secs(),
            "draining: no new calls"
        );
        // New connections during the drain get a hangup, so the dialplan can route them
        // elsewhere.
        let refuse_during_drain = {
            let shared = Arc::clone(&shared);
            let calls = calls.clone();
            tokio::spawn(async move {
                loop {
                    if let Ok((stream, peer)) = listener.accept().await {
                        shared.refuse(peer, RefuseReason::Draining);
                        calls.spawn(refuse(stream));
                    }
                }
            })
        };
        calls.close();
        let grace = shared.config().shutdown_grace;
        let hang_up = tokio::select! {
            () = calls.wait() => false,
            () = tokio::time::sleep(grace) => {
                info!(active = calls.len(), "grace period over: hanging up the remaining calls");
                true
            }
            () = shared.stop_now.cancelled() => {
                warn!(active = calls.len(), "second stop signal: hanging up the remaining calls now");
                true
            }
        };
        if hang_up {
            cancel_calls.cancel();
            tokio::select! {
                () = calls.wait() => {}
                () = tokio::time::sleep(HANGUP_DEADLINE) => warn!(active = calls.len(), "calls still running after hangup deadline"),
            }
        }
        refuse_during_drain.abort();
        shared.log_refusal_summary(Instant::now(), true);
        info!("all calls ended");
    }
}

/// Runs the listener until `shutdown` fires, then drains. Returns when every call has ended.
pub async fn serve(
    listener: TcpListener,
    cfg: ServerConfig,
    metrics: Arc<Metrics>,
    ready: ReadyFlag,
    on_call_end: Option<OnCallEnd>,
    shutdown: CancellationToken,
) {
    Server::new(cfg, metrics, ready)
        .run(listener, on_call_end, shutdown)
        .await;
}

/// A connection that has not sent its UUID yet: wait for it (bounded by the first-message
/// deadline), then take a call slot or refuse with a hangup.
#[allow(clippy::too_many_arguments)]
async fn pending(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    shared: Arc<Shared>,
    on_end: Option<OnCallEnd>,
    cancel_calls: CancellationToken,
    draining: CancellationToken,
    tracker: TaskTracker,
) {
    let accepted = Instant::now();
    let cfg = shared.config();
    let mut framed = Framed::new(stream, ServerCodec::new());
    let wait = cfg.session.first_message_timeout;
    let first = tokio::select! {
        r = timeout(wait, framed.next()) => Some(r),
        () = cancel_calls.cancelled() => None,
    };
    drop(slot);
    let (reason, detail) = match first {
        Some(Ok(Some(Ok(Inbound::Uuid(call_id))))) => {
            if draining.is_cancelled() {
                shared.refuse(peer, RefuseReason::Draining);
                tell_refused(&cfg, call_id, "draining").await;
                refuse(framed.into_inner()).await;
                return;
            }
            // A warm transfer's whisper leg belongs to a call already counted: no slot.
            if let Some(summary) = cfg.session.control.whisper(call_id) {
                crate::pbx::whisper::serve_leg(
                    framed,
                    call_id,
                    summary,
                    cfg.session.behaviour.clone(),
                    cancel_calls,
                )
                .await;
                return;
            }
            let Some(call_slot) = shared.take(SlotKind::Call) else {
                shared.refuse(peer, RefuseReason::OverCapacity);
                let control = Arc::clone(&cfg.session.control);
                tracker.spawn(async move {
                    tell_refused_with(&*control, call_id, "over_capacity").await;
                    refuse(framed.into_inner()).await;
                });
                return;
            };
            run_call(
                framed,
                call_id,
                peer,
                accepted,
                call_slot,
                cfg,
                shared,
                on_end,
                cancel_calls,
            )
            .await;
            return;
        }
        None => (EndReason::Shutdown, None),
        Some(Err(_)) => (
            EndReason::FirstMessageTimeout,
            Some(format!("no UUID within {wait:?}")),
        ),
        Some(Ok(None)) => (
            EndReason::CallerHangup,
            Some("closed before sending a UUID".to_owned()),
        ),
        Some(Ok(Some(Err(e)))) => (EndReason::ProtocolError, Some(e.to_string())),
        // The codec only yields a UUID first; anything else is an error above.
        Some(Ok(Some(Ok(other)))) => (
            EndReason::ProtocolError,
            Some(format!("unexpected first message {other:?}")),
        ),
    };
    // Counted and logged in aggregate like refusals: a TCP health check or a peer that
    // connects and closes in a loop must not write a line per connection.
    shared.refuse(peer, RefuseReason::NoUuid);
    let summary = summary_without_call(peer, reason, detail, accepted.elapsed());
    debug!(
        %peer,
        reason = reason.as_str(),
        detail = summary.detail.as_deref().unwrap_or(""),
        "connection closed before a call started"
    );
    if let Some(f) = on_end {
        f(summary);
    }
}

fn summary_without_call(
    peer: SocketAddr,
    reason: EndReason,
    detail: Option<String>,
    duration: Duration,
) -> CallSummary {
    CallSummary {
        duration,
        ..CallSummary::no_call(peer, reason, detail)
    }
}

/// Runs one call on its slot. A panic inside the call ends only this call: it is logged
/// with the call id, the peer gets a hangup, and the slot and metrics are released.
#[allow(clippy::too_many_arguments)]
async fn run_call(
    framed: Framed<TcpStream, ServerCodec>,
    call_id: Uuid,
    peer: SocketAddr,
    accepted: Instant,
    slot: Slot,
    cfg: Arc<ServerConfig>,
    shared: Arc<Shared>,
    on_end: Option<OnCallEnd>,
    cancel: CancellationToken,
) {
    // A second descriptor for the same socket, so a hangup can still be sent if the call
    // task panics (its own descriptor is dropped while unwinding).
    let spare = spare_descriptor(framed.get_ref());
    let metrics = Arc::clone(&shared.metrics);
    let call = driver::serve_call(
        framed,
        call_id,
        peer,
        accepted,
        cfg.session.clone(),
        Arc::clone(&metrics),
        cancel,
    );
    // Test seam: a panic inside the call, after the driver counted the call as started.
    #[cfg(test)]
    let call = {
        let m = Arc::clone(&metrics);
        async move {
            if tests::should_panic(call_id) {
                m.call_started();
                panic!("injected call panic");
            }
            call.await
        }
    };
    let summary = match AssertUnwindSafe(call).catch_unwind().await {
        Ok(summary) => summary,
        Err(payload) => {
            let what = panic_text(payload.as_ref());
            let span = tracing::error_span!("call", call_id = %call_id, peer = %peer);
            span.in_scope(|| error!(panic = %what, "call task panicked; the call was ended"));
            if let Some(sock) = &spare {
                send_hangup_blocking(sock);
            }
            let duration = accepted.elapsed();
            metrics.call_ended(EndReason::InternalError, duration);
            let mut s = summary_without_call(
                peer,
                EndReason::InternalError,
                Some(format!("panic: {what}")),
                duration,
            );
            s.call_id = Some(call_id);
            s
        }
    };
    drop(spare);
    drop(slot);
    if let Some(f) = on_end {
        f(summary);
    }
}

fn spare_descriptor(stream: &TcpStream) -> Option<std::net::TcpStream> {
    use std::os::fd::AsFd as _;
    stream
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(std::net::TcpStream::from)
}

fn send_hangup_blocking(sock: &std::net::TcpStream) {
    use std::io::Write as _;
    // The socket is non-blocking (tokio set it so); three bytes fit unless the peer stopped
    // reading, in which case there is nobody to tell.
    let mut s = sock;
    let _ = s.write_all(&HANGUP);
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// How long a refused call waits for the PBX to take `Refused` before its 0x00: short, the
/// daemon is busy and the dialplan should move on to another daemon quickly.
pub const REFUSAL_DECISION_DEADLINE: Duration = Duration::from_millis(200);

/// Tells the PBX (best effort, briefly) that a call whose UUID arrived is refused, so the
/// dialplan can try another daemon.
async fn tell_refused(cfg: &ServerConfig, call_id: Uuid, reason: &str) {
    tell_refused_with(&*cfg.session.control, call_id, reason).await;
}

async fn tell_refused_with(control: &dyn crate::call::CallControl, call_id: Uuid, reason: &str) {
    let outcome = crate::call::CallOutcome::Refused {
        reason: reason.to_owned(),
    };
    if timeout(REFUSAL_DECISION_DEADLINE, control.decide(call_id, outcome))
        .await
        .is_err()
    {
        debug!(%call_id, reason, "the PBX did not take the refusal in time; hanging up anyway");
    }
}

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let _ = stream.write_all(&HANGUP).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Counts refused connections over an interval so the log gets a few lines per interval,
/// however many connections are refused. Pure bookkeeping: the caller passes the time.
#[derive(Debug)]
pub struct RefusalLog {
    interval: Duration,
    window_start: Instant,
    total: u64,
    logged_alone: usize,
    by_source: HashMap<IpAddr, u64>,
    untracked_sources: u64,
    by_reason: Vec<(RefuseReason, u64)>,
}

/// One interval's refusals, for the summary line.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusalSummary {
    /// Connections refused in the interval.
    pub total: u64,
    /// Distinct sources (at least; sources past the tracking cap are counted once each).
    pub sources: u64,
    /// The busiest sources, most refusals first (at most five).
    pub top: Vec<(IpAddr, u64)>,
    /// Refusals by reason.
    pub by_reason: Vec<(RefuseReason, u64)>,
    /// The interval's length.
    pub interval: Duration,
}

impl RefusalSummary {
    /// `a.b.c.d x123, ...`
    pub fn top_text(&self) -> String {
        self.top
            .iter()
            .map(|(ip, n)| format!("{ip} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `not_allowed=12 over_capacity=3`
    pub fn reasons_text(&self) -> String {
        self.by_reason
            .iter()
            .map(|(r, n)| format!("{}={n}", r.as_str()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl RefusalLog {
    /// An empty log whose first interval starts at `now`.
    pub fn new(interval: Duration, now: Instant) -> Self {
        Self {
            interval,
            window_start: now,
            total: 0,
            logged_alone: 0,
            by_source: HashMap::new(),
            untracked_sources: 0,
            by_reason: Vec::new(),
        }
    }

    /// Counts one refusal. Returns whether it deserves its own log line: the first from its
    /// source in this interval, and only the first few of those.
    pub fn record(&mut self, source: IpAddr, reason: RefuseReason) -> bool {
        self.total += 1;
        match self.by_reason.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.by_reason.push((reason, 1)),
        }
        let tracked = self.by_source.len();
        let new_source = match self.by_source.entry(source) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                *e.get_mut() += 1;
                false
            }
            std::collections::hash_map::Entry::Vacant(e) if tracked < MAX_TRACKED_SOURCES => {
                e.insert(1);
                true
            }
            std::collections::hash_map::Entry::Vacant(_) => {
                self.untracked_sources += 1;
                false
            }
        };
        if new_source && self.logged_alone < REFUSALS_LOGGED_ALONE {
            self.logged_alone += 1;
            true
        } else {
            false
        }
    }

    /// The summary of the interval that ended, if it has ended (or `force`) and any
    /// refusal beyond those logged alone happened in it; starts a new interval then.
    pub fn take_summary(&mut self, now: Instant, force: bool) -> Option<RefusalSummary> {
        let elapsed = now.saturating_duration_since(self.window_start);
        if !force && elapsed < self.interval {
            return None;
        }
        let worth_a_line = self.total > self.logged_alone as u64;
        let mut top: Vec<(IpAddr, u64)> = self.by_source.drain().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let sources = top.len() as u64 + self.untracked_sources;
        top.truncate(5);
        let summary = RefusalSummary {
            total: self.total,
            sources,
            top,
            by_reason: std::mem::take(&mut self.by_reason),
            interval: elapsed,
        };
        self.window_start = now;
        self.total = 0;
        self.logged_alone = 0;
        self.untracked_sources = 0;
        worth_a_line.then_some(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::Behaviour;

    fn cfg(allow: &[&str]) -> ServerConfig {
        ServerConfig {
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
            max_calls: 2,
            max_pending: 2,
            shutdown_grace: Duration::from_secs(1),
            session: SessionConfig {
                first_message_timeout: Duration::from_secs(1),
                behaviour: Behaviour::Echo,
                idle_hangup: None,
                control: std::sync::Arc::new(crate::call::NoControl),
                records: None,
            },
        }
    }

    #[test]
    fn mapped_ipv4_peers_match_ipv4_networks() {
        let c = cfg(&["127.0.0.0/8", "10.1.0.0/16"]);
        assert!(c.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(c.allows("::ffff:10.1.2.3".parse().unwrap()));
        assert!(c.allows("10.1.2.3".parse().unwrap()));
        assert!(!c.allows("::ffff:10.2.0.1".parse().unwrap()));
        assert!(!c.allows("::1".parse().unwrap()));
        let v6 = cfg(&["::1/128"]);
        assert!(v6.allows("::1".parse().unwrap()));
        assert!(!v6.allows("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn slots_resize_without_dropping_holders() {
        let s = Slots::new(2);
        assert!(s.try_take() && s.try_take());
        assert!(!s.try_take() && s.is_full());
        s.max.store(1, Ordering::SeqCst);
        assert!(s.is_full());
        s.release();
        assert!(s.is_full(), "one held, cap one");
        s.release();
        assert!(!s.is_full());
        assert!(s.try_take() && !s.try_take());
        s.max.store(3, Ordering::SeqCst);
        assert!(s.try_take() && s.try_take() && !s.try_take());
    }

    #[test]
    fn refusal_flood_gives_a_few_lines_and_one_summary() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(Duration::from_secs(10), t0);
        let mut alone = 0;
        for i in 0..1000u32 {
            let ip = IpAddr::from([192, 0, 2, (i % 50) as u8]);
            if log.record(ip, RefuseReason::NotAllowed) {
                alone += 1;
            }
        }
        assert!(!log.record("10.0.0.1".parse().unwrap(), RefuseReason::OverCapacity));
        assert_eq!(alone, REFUSALS_LOGGED_ALONE);
        assert_eq!(log.take_summary(t0 + Duration::from_secs(9), false), None);
        let s = log
            .take_summary(t0 + Duration::from_secs(10), false)
            .unwrap();
        assert_eq!(s.total, 1001);
        assert_eq!(s.sources, 51);
        assert_eq!(s.top.len(), 5);
        assert_eq!(s.top[0].1, 20);
        assert_eq!(
            s.reasons_text(),
            "not_allowed=1000 over_capacity=1",
            "{s:?}"
        );
        // A quiet interval logs nothing; a new one starts fresh.
        assert_eq!(log.take_summary(t0 + Duration::from_secs(30), false), None);
        assert!(log.record("192.0.2.1".parse().unwrap(), RefuseReason::NotAllowed));
        assert_eq!(
            log.take_summary(t0 + Duration::from_secs(31), true),
            None,
            "a refusal already logged alone needs no summary"
        );
    }

    #[test]
    fn many_sources_stay_bounded() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(Duration::from_secs(10), t0);
        for i in 0..5000u32 {
            let ip = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i) + 1));
            log.record(ip, RefuseReason::NotAllowed);
        }
        assert_eq!(log.by_source.len(), MAX_TRACKED_SOURCES);
        let s = log.take_summary(t0, true).unwrap();
        assert_eq!(s.sources, 5000);
        assert_eq!(s.total, 5000);
    }

    #[test]
    fn default_drain_fits_inside_the_units_stop_timeout() {
        let unit = include_str!("../deploy/sifucall.service");
        let stop: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .and_then(|v| v.trim().parse().ok())
            .expect("the unit sets TimeoutStopSec in seconds");
        let defaults: toml_grace::Defaults = toml_grace::parse(crate::ops::config::DEFAULT_TOML);
        let worst = Duration::from_secs(defaults.grace) + HANGUP_DEADLINE;
        // Leave systemd at least 10 s of margin (records flush, slow exit) before SIGKILL.
        assert!(
            worst + Duration::from_secs(10) <= Duration::from_secs(stop),
            "drain {worst:?} vs TimeoutStopSec={stop}"
        );
    }

    mod toml_grace {
        pub(super) struct Defaults {
            pub(super) grace: u64,
        }
        pub(super) fn parse(toml: &str) -> Defaults {
            let grace = toml
                .lines()
                .find_map(|l| l.strip_prefix("shutdown_grace_secs"))
                .and_then(|r| r.trim().strip_prefix('='))
                .and_then(|v| v.trim().parse().ok())
                .expect("default.toml sets shutdown_grace_secs");
            Defaults { grace }
        }
    }

    // ---- a panic in one call -------------------------------------------------------------
    // A test-only seam in `run_call` panics inside the call's future for a chosen UUID,
    // which is where a panic in the call driver unwinds to.

    use tokio::io::AsyncReadExt as _;

    static PANIC_FOR: Mutex<Vec<Uuid>> = Mutex::new(Vec::new());

    pub(super) fn should_panic(call_id: Uuid) -> bool {
        PANIC_FOR.lock().unwrap().contains(&call_id)
    }

    /// Sends a UUID and one audio frame; returns the stream.
    async fn call(addr: SocketAddr, id: Uuid) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut msg = vec![0x01, 0, 16];
        msg.extend_from_slice(id.as_bytes());
        msg.extend_from_slice(&[0x10, 1, 64]);
        msg.extend_from_slice(&[0; 320]);
        s.write_all(&msg).await.unwrap();
        s
    }

    /// Reads whole frames until `want` of them arrived or the stream closed; returns kinds.
    async fn read_kinds(s: &mut TcpStream, want: usize) -> Vec<u8> {
        let mut kinds = Vec::new();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let guard = tokio::time::Instant::now() + Duration::from_secs(10);
        while kinds.len() < want {
            let n = tokio::time::timeout_at(guard, s.read(&mut chunk))
                .await
                .expect("frames or close within the guard")
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 3 {
                let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
                if buf.len() < 3 + len {
                    break;
                }
                kinds.push(buf[0]);
                buf.drain(..3 + len);
            }
        }
        kinds
    }

    #[tokio::test]
    async fn a_panic_ends_only_its_own_call_and_frees_its_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let mut c = cfg(&["127.0.0.0/8"]);
        c.max_calls = 2;
        let (tx, mut summaries) = tokio::sync::mpsc::unbounded_channel();
        let on_end: OnCallEnd = Arc::new(move |s| {
            let _ = tx.send(s);
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            c,
            Arc::clone(&metrics),
            ReadyFlag::new(),
            Some(on_end),
            shutdown.clone(),
        ));

        let doomed = Uuid::new_v4();
        PANIC_FOR.lock().unwrap().push(doomed);
        let mut panicking = call(addr, doomed).await;
        assert_eq!(
            read_kinds(&mut panicking, usize::MAX).await,
            vec![0],
            "the panicking call gets a hangup, then EOF"
        );
        let s = summaries.recv().await.unwrap();
        assert_eq!(s.reason, EndReason::InternalError);
        assert!(s.call_id.is_some());
        assert!(s.detail.unwrap().contains("injected call panic"));
        assert_eq!(metrics.active_calls(), 0);
        assert_eq!(
            metrics.sample("sifucall_calls_total{end_reason=\"internal_error\"}"),
            Some(1.0)
        );

        // Both slots are free again: two more calls run side by side.
        let mut a = call(addr, Uuid::new_v4()).await;
        let mut b = call(addr, Uuid::new_v4()).await;
        assert!(read_kinds(&mut a, 5).await.iter().all(|k| *k == 0x10));
        assert!(read_kinds(&mut b, 5).await.iter().all(|k| *k == 0x10));
        assert_eq!(metrics.active_calls(), 2);
        shutdown.cancel();
        drop((a, b));
        task.await.unwrap();
    }
}
