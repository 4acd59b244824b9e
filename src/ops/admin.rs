//! The admin HTTP server: liveness, readiness and metrics for systemd, load balancers and
//! Prometheus. It is separate from the AudioSocket port and should stay on loopback or a
//! management network (`admin.listen`).
//!
//! - `GET /healthz`: 200 `ok` while the process serves HTTP at all.
//! - `GET /readyz`: 200 `ready` when new calls are welcome; 503 `starting` before the daemon
//!   is up and 503 `draining` once shutdown has begun, so a PBX-side health check can route
//!   new calls elsewhere while existing calls finish.
//! - `GET /metrics`: OpenMetrics text from [`Metrics::render`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
/// after that means "draining" (shutdown has begun).
#[derive(Debug, Clone, Default)]
pub struct ReadyFlag(Arc<AtomicU8>);

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

    /// Whether new calls are welcome.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst) == READY
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
}

impl AdminState {
    /// Bundles the metrics and the readiness flag.
    pub fn new(metrics: Arc<Metrics>, ready: ReadyFlag) -> Self {
        Self { metrics, ready }
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.ready.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else if state.ready.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
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

/// Serves the admin routes on `listener` until `shutdown` is cancelled, then lets open
/// requests finish (at most a few seconds) and returns.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin HTTP server listening");
    }
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    tokio::select! {
        r = server => r,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("admin HTTP server: connections still open after shutdown grace; closing");
            Ok(())
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
}
