//! Wires the daemon together from [`Settings`]: the AudioSocket listener, the admin server,
//! systemd notifications and the per-call behaviour. `main` only parses arguments, loads
//! the configuration and calls [`run`].

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::call::session::{Behaviour, SessionConfig};
use crate::ops::config::{AgentMode, Settings};
use crate::ops::metrics::Metrics;
use crate::server::{self, Readiness, ServerConfig};

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address is taken or not ours.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Which listener.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The agent could not be built (e.g. missing API key).
    #[error("{0}")]
    Agent(String),
}

/// Builds the per-call behaviour from the settings.
pub async fn behaviour(settings: &Settings) -> Result<Behaviour, StartError> {
    match settings.agent.mode {
        AgentMode::Echo => Ok(Behaviour::Echo),
        AgentMode::Ai => Err(StartError::Agent(
            "agent.mode = \"ai\" is not available in this build yet; set agent.mode = \"echo\""
                .into(),
        )),
    }
}

/// Runs the daemon until `shutdown` fires and every call has drained.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), StartError> {
    let listener = TcpListener::bind(settings.audiosocket.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: settings.audiosocket.listen,
            what: "audiosocket.listen",
            source,
        })?;
    let admin_listener = TcpListener::bind(settings.admin.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: settings.admin.listen,
            what: "admin.listen",
            source,
        })?;
    let metrics = Arc::new(Metrics::new());
    let ready = Readiness::default();
    let behaviour = behaviour(&settings).await?;
    let cfg = ServerConfig {
        allow: settings.audiosocket.allow.clone(),
        max_calls: settings.audiosocket.max_calls,
        shutdown_grace: Duration::from_secs(settings.audiosocket.shutdown_grace_secs),
        session: SessionConfig {
            first_message_timeout: Duration::from_millis(
                settings.audiosocket.first_message_timeout_ms,
            ),
            behaviour,
        },
    };
    let _ = admin_listener;
    info!(mode = ?settings.agent.mode, "sifucall starting");
    server::serve(listener, cfg, metrics, ready, None, shutdown).await;
    Ok(())
}
