//! The admin HTTP server: liveness, readiness and metrics for systemd, load balancers and
//! Prometheus. It is separate from the AudioSocket port and should stay on loopback or a
//! management network (`admin.listen`).
//!
//! - `GET /healthz`: 200 `ok` while the process serves HTTP at all.
//! - `GET /readyz`: 200 `ready` when new calls are welcome; 503 `starting` before the daemon
//!   is up, 503 `full` while `audiosocket.max_calls` calls are up, and 503 `draining` once
//!   shutdown has begun, so a PBX-side health check or a load balancer can route new calls
//!   elsewhere.
//! - `GET /metrics`: OpenMetrics text from [`Metrics::render`].
//! - `/calls/...`: the `func_curl` side channel (call context in, outcome out), when the
//!   daemon wires it in ([`AdminState::with_calls`]); see [`crate::pbx::http`].
//! - The operator's console and its JSON API (`/console`, `/api/...`), when the daemon
//!   gives it one ([`AdminState::with_console`]; see [`super::console`] for its access rule).
//!
//! The admin port shares the process's file descriptors with the calls, so it must never
//! starve them: connections are capped ([`AdminLimits::max_connections`], over the cap a
//! connection is closed at once and counted), a request's headers must arrive within
//! [`AdminLimits::header_timeout`] (which also closes idle keep-alive connections), and no
//! connection lives longer than [`AdminLimits::max_age`].

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::console::Console;
use super::metrics::{CONTENT_TYPE, Metrics};

/// After shutdown is requested, how long open admin connections (a slow scrape) may hold
/// up [`serve`] before it returns anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

/// Whether the daemon accepts new calls. Clones share one flag.
///
/// It starts "starting"; [`ReadyFlag::set_ready`]`(true)` makes it ready; `set_ready(false)`
/// after that means "draining" (shutdown has begun). Independently, the listener marks it
/// full ([`ReadyFlag::set_full`]) while every call slot is taken.
#[derive(Debug, Clone, Default)]
pub struct ReadyFlag(Arc<AtomicU8>, Arc<AtomicBool>);

impl ReadyFlag {
    /// A flag in the "starting" state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the daemon ready (`true`) or not (`false`: "draining" if it was ever ready,
    /// otherwise still "starting").
    pub fn set_ready(&self, ready: bool) {
        if ready {
            self.0.store(READY, Ordering::SeqCst);
        } else {
            // Never go back from draining/ready to starting.
            let _ = self
                .0
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                    (s != STARTING).then_some(DRAINING)
                });
        }
    }

    /// Whether new calls are welcome: started, not draining, and not at the call cap.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst) == READY && !self.is_full()
    }

    /// Marks whether every call slot is taken.
    pub fn set_full(&self, full: bool) {
        self.1.store(full, Ordering::SeqCst);
    }

    /// Whether every call slot is taken.
    pub fn is_full(&self) -> bool {
        self.1.load(Ordering::SeqCst)
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::SeqCst) == DRAINING
    }
}

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The daemon's metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness.
    pub ready: ReadyFlag,
    /// The `/calls` routes, when served.
    pub calls: Option<crate::pbx::http::CallRoutes>,
    /// The console's live calls, history and access rule, if it is served.
    pub console: Option<Console>,
}

impl AdminState {
    /// Bundles the metrics and the readiness flag.
    pub fn new(metrics: Arc<Metrics>, ready: ReadyFlag) -> Self {
        Self {
            metrics,
            ready,
            calls: None,
            console: None,
        }
    }

    /// Also serves the `/calls` routes (call context registration and outcomes).
    pub fn with_calls(mut self, calls: crate::pbx::http::CallRoutes) -> Self {
        self.calls = Some(calls);
        self
    }

    /// Serves the operator's console too.
    pub fn with_console(mut self, console: Console) -> Self {
        self.console = Some(console);
        self
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    let calls = state.calls.clone();
    let console = state.console.clone();
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let app = match calls {
        Some(c) => app.merge(crate::pbx::http::router(c)),
        None => app,
    };
    match console {
        Some(c) => app.merge(super::console::router(c)),
        None => app,
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.ready.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else if state.ready.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if state.ready.is_full() && state.ready.0.load(Ordering::SeqCst) == READY {
        (StatusCode::SERVICE_UNAVAILABLE, "full").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

/// Limits that keep the admin port from holding descriptors or tasks the calls need.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// A request's headers must arrive within this; an idle keep-alive connection is closed
    /// after it too.
    pub header_timeout: Duration,
    /// No connection lives longer than this, whatever it does.
    pub max_age: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            max_age: Duration::from_secs(60),
        }
    }
}

impl AdminLimits {
    /// Lowers `max_connections` to a sixteenth of the open-file limit (at least 4), so calls
    /// keep most descriptors whatever the admin port is sent.
    pub fn within_fd_limit(mut self, nofile: u64) -> Self {
        let share = usize::try_from(nofile / 16).unwrap_or(usize::MAX).max(4);
        self.max_connections = self.max_connections.min(share);
        self
    }
}

/// Serves the admin routes on `listener` with the default [`AdminLimits`] until `shutdown`
/// is cancelled, then lets open requests finish (at most a few seconds) and returns.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, state, AdminLimits::default(), shutdown).await
}

/// Serves the admin routes on `listener` within `limits` until `shutdown` is cancelled,
/// then lets open requests finish (at most a few seconds) and returns.
pub async fn serve_with(
    listener: TcpListener,
    state: AdminState,
    limits: AdminLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, max_connections = limits.max_connections, "admin HTTP server listening");
    }
    let metrics = Arc::clone(&state.metrics);
    let app = router(state);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let conns = TaskTracker::new();
    let mut backoff = Duration::from_millis(10);
    let mut refused_logged = false;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                stream
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; calls come first.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            metrics.admin_connection_refused();
            if !refused_logged {
                refused_logged = true;
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "admin connections at their cap; closing new ones (counted in sifucall_admin_connections_refused_total, logged once)"
                );
            }
            drop(stream);
            continue;
        };
        conns.spawn(serve_connection(
            stream,
            app.clone(),
            limits,
            permit,
            shutdown.clone(),
        ));
    }
    drop(listener);
    conns.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, conns.wait())
        .await
        .is_err()
    {
        tracing::warn!("admin HTTP server: connections still open after shutdown grace; closing");
    }
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    limits: AdminLimits,
    _permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut conn = pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = tokio::time::sleep(limits.max_age) => {}
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::metrics::EndReason;
    use std::future::IntoFuture as _;

    async fn start() -> (
        String,
        AdminState,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = AdminState::new(Arc::new(Metrics::new()), ReadyFlag::new());
        let token = CancellationToken::new();
        let task = tokio::spawn(serve(listener, state.clone(), token.clone()));
        (base, state, token, task)
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    #[test]
    fn ready_flag_states() {
        let f = ReadyFlag::new();
        assert!(!f.is_ready() && !f.is_draining());
        f.set_ready(false);
        assert!(
            !f.is_ready() && !f.is_draining(),
            "not ready before start is still starting"
        );
        let g = f.clone();
        g.set_ready(true);
        assert!(f.is_ready());
        f.set_ready(false);
        assert!(g.is_draining() && !g.is_ready());
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let (base, state, token, task) = start().await;
        let c = client();

        let r = c.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");

        let r = c.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.text().await.unwrap(), "starting");
        state.ready.set_ready(true);
        let r = c.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ready");
        state.ready.set_ready(false);
        let r = c.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.text().await.unwrap(), "draining");

        state.metrics.call_started();
        state
            .metrics
            .call_ended(EndReason::HangupFrame, Duration::from_secs(3));
        let r = c.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers().get("content-type").unwrap().to_str().unwrap(),
            CONTENT_TYPE
        );
        let body = r.text().await.unwrap();
        assert!(
            body.contains("sifucall_calls_total{end_reason=\"hangup_frame\"} 1\n"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"));

        let r = c.get(format!("{base}/nope")).send().await.unwrap();
        assert_eq!(r.status(), 404);

        token.cancel();
        let done = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("serve returns after cancel");
        done.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_stops_accepting() {
        let (base, _state, token, task) = start().await;
        let addr = base.trim_start_matches("http://").to_owned();
        token.cancel();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // The listener is dropped once serve returns, so new connections are refused.
        assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_does_not_wait_forever_for_open_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = AdminState::new(Arc::new(Metrics::new()), ReadyFlag::new());
        let token = CancellationToken::new();
        let task = tokio::spawn(serve(listener, state, token.clone()));
        // A connection that sends half a request and then nothing keeps hyper busy.
        let mut stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stuck, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        token.cancel();
        // Paused time auto-advances through the grace sleep.
        tokio::time::timeout(Duration::from_secs(60), task.into_future())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        drop(stuck);
    }

    async fn start_with(
        limits: AdminLimits,
    ) -> (
        std::net::SocketAddr,
        AdminState,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = AdminState::new(Arc::new(Metrics::new()), ReadyFlag::new());
        let token = CancellationToken::new();
        let task = tokio::spawn(serve_with(listener, state.clone(), limits, token.clone()));
        (addr, state, token, task)
    }

    /// Reads until the server closes; returns what it sent. Panics if it never closes.
    async fn read_until_closed(s: &mut tokio::net::TcpStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt as _;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the server closes the connection")
            .ok();
        out
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::AsyncWriteExt as _;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        String::from_utf8_lossy(&read_until_closed(&mut s).await).into_owned()
    }

    #[tokio::test]
    async fn half_sent_and_idle_connections_are_closed() {
        use tokio::io::AsyncWriteExt as _;
        let (addr, _state, token, task) = start_with(AdminLimits {
            header_timeout: Duration::from_millis(200),
            ..AdminLimits::default()
        })
        .await;
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        read_until_closed(&mut half).await;
        read_until_closed(&mut silent).await;
        // A keep-alive connection that goes idle after a request is closed too.
        let mut keep = tokio::net::TcpStream::connect(addr).await.unwrap();
        keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let got = String::from_utf8_lossy(&read_until_closed(&mut keep).await).into_owned();
        assert!(
            got.starts_with("HTTP/1.1 200") && got.ends_with("ok"),
            "{got}"
        );
        token.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_counted() {
        let (addr, state, token, task) = start_with(AdminLimits {
            max_connections: 2,
            header_timeout: Duration::from_secs(60),
            ..AdminLimits::default()
        })
        .await;
        let idle1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The accept loop may not have taken both yet: wait until a third is refused.
        let mut refused = tokio::net::TcpStream::connect(addr).await.unwrap();
        let got = read_until_closed(&mut refused).await;
        assert!(got.is_empty(), "refused without a response");
        assert_eq!(
            state
                .metrics
                .sample("sifucall_admin_connections_refused_total"),
            Some(1.0)
        );
        drop(idle1);
        drop(idle2);
        // Slots come back when connections close.
        let mut answered = false;
        for _ in 0..100 {
            if get(addr, "/healthz").await.ends_with("ok") {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered);
        token.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn readyz_is_503_full_at_the_call_cap() {
        let (addr, state, token, task) = start_with(AdminLimits::default()).await;
        state.ready.set_ready(true);
        assert!(get(addr, "/readyz").await.contains("200 OK"));
        state.ready.set_full(true);
        let r = get(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503") && r.ends_with("full"), "{r}");
        state.ready.set_full(false);
        assert!(get(addr, "/readyz").await.ends_with("ready"));
        state.ready.set_full(true);
        state.ready.set_ready(false);
        assert!(get(addr, "/readyz").await.ends_with("draining"));
        token.cancel();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn admin_cap_leaves_descriptors_for_calls() {
        let l = AdminLimits::default();
        assert_eq!(l.within_fd_limit(65_536).max_connections, 64);
        assert_eq!(l.within_fd_limit(256).max_connections, 16);
        assert_eq!(l.within_fd_limit(16).max_connections, 4);
    }
}
