//! The AudioSocket listener: who may connect, how many at once, and how the daemon drains.
//!
//! AudioSocket has no authentication, so the allowlist is the only gate: connections from
//! elsewhere are closed before a byte is read. Over the call cap a connection gets a hangup
//! message (so the dialplan continues, e.g. to a human) and is closed, never left hanging.
//! Shutdown is one path: stop taking calls, let the running ones finish for a grace period,
//! then cancel them, which makes each hang up after its last frame has played.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::call::driver;
use crate::call::{CallSummary, SessionConfig};
use crate::ops::admin::ReadyFlag;
use crate::ops::metrics::{Metrics, RefuseReason};

/// The 0x00 hangup message, sent to connections we refuse.
const HANGUP: [u8; 3] = [0, 0, 0];
/// Time allowed for the calls cancelled after the grace period to send their hangup.
const HANGUP_DEADLINE: Duration = Duration::from_secs(3);

/// Listener settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Allowed source networks.
    pub allow: Vec<IpNet>,
    /// Concurrent call cap.
    pub max_calls: usize,
    /// How long calls may run on after shutdown starts.
    pub shutdown_grace: Duration,
    /// Per-call settings.
    pub session: SessionConfig,
}

/// Called with each finished call's summary (call records, webhooks).
pub type OnCallEnd = Arc<dyn Fn(CallSummary) + Send + Sync>;

/// Runs the listener until `shutdown` fires, then drains. Returns when every call has ended.
pub async fn serve(
    listener: TcpListener,
    cfg: ServerConfig,
    metrics: Arc<Metrics>,
    ready: ReadyFlag,
    on_call_end: Option<OnCallEnd>,
    shutdown: CancellationToken,
) {
    let calls = TaskTracker::new();
    let cancel_calls = CancellationToken::new();
    let permits = Arc::new(Semaphore::new(cfg.max_calls));
    let cfg = Arc::new(cfg);
    ready.set_ready(true);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, max_calls = cfg.max_calls, "AudioSocket listener ready");
    }

    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
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
        if !cfg.allow.iter().any(|net| net.contains(&peer.ip())) {
            warn!(%peer, "connection from a source not in audiosocket.allow; closed");
            metrics.connection_refused(RefuseReason::NotAllowed);
            drop(stream);
            continue;
        }
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            warn!(%peer, max_calls = cfg.max_calls, "over audiosocket.max_calls; call refused with hangup");
            metrics.connection_refused(RefuseReason::OverCapacity);
            calls.spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let cfg = Arc::clone(&cfg);
        let metrics = Arc::clone(&metrics);
        let on_end = on_call_end.clone();
        let cancel = cancel_calls.clone();
        calls.spawn(run_call(stream, peer, cfg, metrics, on_end, cancel, permit));
    }

    ready.set_ready(false);
    info!(
        active = calls.len(),
        grace_secs = cfg.shutdown_grace.as_secs(),
        "draining: no new calls"
    );
    // New connections during the drain get a hangup, so the dialplan can route them elsewhere.
    let refuse_during_drain = {
        let metrics = Arc::clone(&metrics);
        let calls = calls.clone();
        async move {
            loop {
                if let Ok((stream, peer)) = listener.accept().await {
                    debug!(%peer, "refused while draining");
                    metrics.connection_refused(RefuseReason::Draining);
                    calls.spawn(refuse(stream));
                }
            }
        }
    };
    calls.close();
    tokio::select! {
        () = calls.wait() => {}
        () = tokio::time::sleep(cfg.shutdown_grace) => {
            info!(active = calls.len(), "grace period over: hanging up the remaining calls");
            cancel_calls.cancel();
            tokio::select! {
                () = calls.wait() => {}
                () = tokio::time::sleep(HANGUP_DEADLINE) => warn!(active = calls.len(), "calls still running after hangup deadline"),
            }
        }
        () = refuse_during_drain => {}
    }
    info!("all calls ended");
}

async fn run_call(
    stream: TcpStream,
    peer: SocketAddr,
    cfg: Arc<ServerConfig>,
    metrics: Arc<Metrics>,
    on_end: Option<OnCallEnd>,
    cancel: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let summary = driver::run(stream, peer, cfg.session.clone(), metrics, cancel).await;
    drop(permit);
    if let Some(f) = on_end {
        f(summary);
    }
}

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let _ = stream.write_all(&HANGUP).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
