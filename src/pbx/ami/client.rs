//! One authenticated AMI connection, kept by a background task for the daemon's lifetime.
//!
//! The task connects (TCP, or TLS when the PBX offers it), reads the banner, logs in with
//! `Events: off` (the daemon asks; it does not listen to the PBX's event firehose), then
//! multiplexes actions over the connection: each action gets a fresh `ActionID`, and the
//! response (plus, for list actions such as `Status`, every event up to the list's
//! `...Complete`) goes back to whoever asked. Anything without a matching `ActionID` is
//! dropped. A `Ping` every [`KEEPALIVE`] notices a dead link that TCP would not.
//!
//! When the connection fails, pending actions fail at once, and the task reconnects with a
//! doubling backoff up to the configured maximum. While disconnected, actions fail at once
//! ([`AmiError::NotConnected`]) rather than queue: a call waiting for its context has a
//! deadline of a few hundred milliseconds and goes on without it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::packet::{Action, Incoming, Packet, ParseError, Parser};
use crate::ops::config::Secret;

/// How often an idle connection is pinged.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// The first reconnect delay; it doubles up to the configured maximum.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Actions queued towards the connection task at most.
const QUEUE: usize = 256;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct AmiConfig {
    /// PBX host name or address.
    pub host: String,
    /// Manager port (5038; 5039 is the usual TLS port).
    pub port: u16,
    /// Manager user (`[name]` in manager.conf).
    pub username: String,
    /// Its secret, from the environment.
    pub secret: Secret,
    /// Speak TLS.
    pub tls: bool,
    /// PEM file of the certificate authority (or the PBX's self-signed certificate) to
    /// trust; `None` trusts the public roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Deadline of each action, and of connecting and logging in.
    pub action_timeout: Duration,
    /// Longest wait between reconnect attempts.
    pub reconnect_max: Duration,
}

/// Why an action got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmiError {
    /// The connection is down (being re-made).
    #[error("not connected to the Asterisk manager")]
    NotConnected,
    /// No complete answer within the deadline.
    #[error("the Asterisk manager did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection ended while the action was pending.
    #[error("the manager connection closed before the answer")]
    Disconnected,
    /// Asterisk answered `Response: Error`.
    #[error("Asterisk refused {action}: {message}")]
    Refused {
        /// The action.
        action: String,
        /// Asterisk's `Message:`.
        message: String,
    },
}

/// Why a connection attempt or session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("timed out ({0})")]
    Timeout(&'static str),
    #[error("login refused: {0}")]
    Login(String),
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("closed by the PBX")]
    Closed,
    #[error("no secret: set the environment variable named by ami.secret_env")]
    NoSecret,
}

/// The answer to one action: the response and, for list actions, the list's events
/// (without the closing `...Complete`).
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// `Response: ...` and its fields.
    pub response: Packet,
    /// The events of an event list, in order.
    pub events: Vec<Packet>,
}

struct Request {
    action: Action,
    reply: oneshot::Sender<Result<Reply, AmiError>>,
}

/// Link state as the handle sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not (yet, or no longer) logged in.
    Down,
    /// Logged in; actions go through.
    Up,
}

/// A handle to the daemon's manager connection. Clones share it.
#[derive(Debug, Clone)]
pub struct AmiClient {
    requests: mpsc::Sender<Request>,
    state: watch::Receiver<LinkState>,
    action_timeout: Duration,
    connects: Arc<AtomicU64>,
}

impl AmiClient {
    /// Starts the connection task; it runs until `stop` is cancelled.
    pub fn start(cfg: AmiConfig, stop: CancellationToken) -> Self {
        let (requests, rx) = mpsc::channel(QUEUE);
        let (state_tx, state) = watch::channel(LinkState::Down);
        let connects = Arc::new(AtomicU64::new(0));
        let action_timeout = cfg.action_timeout;
        tokio::spawn(run(cfg, rx, state_tx, Arc::clone(&connects), stop));
        Self {
            requests,
            state,
            action_timeout,
            connects,
        }
    }

    /// Whether the connection is logged in now.
    pub fn is_up(&self) -> bool {
        *self.state.borrow() == LinkState::Up
    }

    /// How many times the task has logged in (1 after the first login; more after
    /// reconnects).
    pub fn logins(&self) -> u64 {
        self.connects.load(Ordering::SeqCst)
    }

    /// Waits until the connection is logged in, at most `within`; whether it is.
    pub async fn wait_up(&self, within: Duration) -> bool {
        let mut s = self.state.clone();
        timeout(within, s.wait_for(|v| *v == LinkState::Up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Sends `action` and waits for its whole answer, within the action deadline.
    pub async fn send(&self, action: Action) -> Result<Reply, AmiError> {
        self.send_within(action, self.action_timeout).await
    }

    /// Sends `action` and waits for its whole answer, at most `deadline`.
    pub async fn send_within(&self, action: Action, deadline: Duration) -> Result<Reply, AmiError> {
        if !self.is_up() {
            return Err(AmiError::NotConnected);
        }
        let name = action.name().to_owned();
        let (tx, rx) = oneshot::channel();
        let sent = self.requests.try_send(Request { action, reply: tx });
        if sent.is_err() {
            return Err(AmiError::NotConnected);
        }
        let reply = match timeout(deadline, rx).await {
            Err(_) => return Err(AmiError::Timeout(deadline)),
            Ok(Err(_)) => return Err(AmiError::Disconnected),
            Ok(Ok(r)) => r?,
        };
        if reply.response.is_success() {
            Ok(reply)
        } else {
            Err(AmiError::Refused {
                action: name,
                message: reply
                    .response
                    .message()
                    .unwrap_or("(no message)")
                    .to_owned(),
            })
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn run(
    cfg: AmiConfig,
    mut requests: mpsc::Receiver<Request>,
    state: watch::Sender<LinkState>,
    connects: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut last_error = String::new();
    let tls = if cfg.tls {
        match tls_connector(cfg.tls_ca_file.as_deref()) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(error = %e, "AMI TLS is not usable; the manager connection stays down");
                stop.cancelled().await;
                return;
            }
        }
    } else {
        None
    };
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = session(&cfg, tls.as_ref(), &mut requests, &state, &connects) => r,
        };
        let _ = state.send(LinkState::Down);
        let text = result
            .err()
            .map_or_else(|| "closed".to_owned(), |e| e.to_string());
        if text != last_error {
            warn!(host = %cfg.host, port = cfg.port, error = %text, "AMI connection down; reconnecting");
            last_error = text;
        } else {
            debug!(error = %last_error, "AMI reconnect failed again");
        }
        if started.elapsed() > cfg.reconnect_max.max(KEEPALIVE) {
            // It stayed up a while: this is a fresh failure, start the backoff again.
            backoff = FIRST_BACKOFF;
        }
        let wake = Instant::now() + backoff;
        backoff = (backoff * 2).min(cfg.reconnect_max);
        // Actions asked for meanwhile fail at once instead of waiting for the link.
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(wake) => break,
                r = requests.recv() => match r {
                    Some(req) => { let _ = req.reply.send(Err(AmiError::NotConnected)); }
                    None => return,
                },
            }
        }
    }
}

async fn connect(
    cfg: &AmiConfig,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Box<dyn Stream>, SessionError> {
    let tcp = timeout(
        cfg.action_timeout,
        TcpStream::connect((cfg.host.as_str(), cfg.port)),
    )
    .await
    .map_err(|_| SessionError::Timeout("connect"))?
    .map_err(SessionError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
        .map_err(|e| SessionError::Tls(format!("{}: {e}", cfg.host)))?;
    let stream = timeout(cfg.action_timeout, tls.connect(name, tcp))
        .await
        .map_err(|_| SessionError::Timeout("TLS handshake"))?
        .map_err(|e| SessionError::Tls(e.to_string()))?;
    Ok(Box::new(stream))
}

/// A TLS client that trusts `ca_file` (PEM) or, without one, the public web roots.
fn tls_connector(ca_file: Option<&std::path::Path>) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject as _;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no certificate in the file", path.display()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

struct Pending {
    reply: oneshot::Sender<Result<Reply, AmiError>>,
    response: Option<Packet>,
    events: Vec<Packet>,
}

/// One connection: connect, banner, login, then serve actions until it fails.
async fn session(
    cfg: &AmiConfig,
    tls: Option<&tokio_rustls::TlsConnector>,
    requests: &mut mpsc::Receiver<Request>,
    state: &watch::Sender<LinkState>,
    connects: &AtomicU64,
) -> Result<(), SessionError> {
    let secret = cfg.secret.expose().ok_or(SessionError::NoSecret)?;
    let stream = connect(cfg, tls).await?;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut parser = Parser::default();
    let mut chunk = vec![0u8; 16 * 1024];

    // Banner and login, under one deadline.
    let login = Action::new("Login")
        .field("Username", cfg.username.clone())
        .field("Secret", secret)
        .field("Events", "off");
    let banner = timeout(cfg.action_timeout * 2, async {
        let mut banner = None;
        loop {
            while let Some(item) = parser.next_item()? {
                match item {
                    Incoming::Banner(b) => {
                        banner = Some(b);
                        writer.write_all(&login.encode("login")).await?;
                    }
                    Incoming::Packet(p) if p.action_id() == Some("login") => {
                        if p.is_success() {
                            return Ok(banner.unwrap_or_default());
                        }
                        return Err(SessionError::Login(
                            p.message().unwrap_or("(no message)").to_owned(),
                        ));
                    }
                    Incoming::Packet(_) => {}
                }
            }
            let n = reader.read(&mut chunk).await?;
            if n == 0 {
                return Err(SessionError::Closed);
            }
            parser.feed(&chunk[..n]);
        }
    })
    .await
    .map_err(|_| SessionError::Timeout("banner and login"))??;
    let n = connects.fetch_add(1, Ordering::SeqCst) + 1;
    info!(host = %cfg.host, port = cfg.port, tls = cfg.tls, %banner, logins = n, "AMI connected");
    let _ = state.send(LinkState::Up);

    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut next_id: u64 = 0;
    let mut keepalive = tokio::time::interval_at(Instant::now() + KEEPALIVE, KEEPALIVE);
    let mut ping_sent: Option<Instant> = None;
    let result = loop {
        // Packets already buffered first.
        while let Some(item) = parser.next_item()? {
            if let Incoming::Packet(p) = item {
                ping_sent = None;
                route(&mut pending, p);
            }
        }
        tokio::select! {
            r = reader.read(&mut chunk) => {
                let n = r?;
                if n == 0 {
                    break Err(SessionError::Closed);
                }
                parser.feed(&chunk[..n]);
            }
            req = requests.recv() => {
                let Some(req) = req else { break Ok(()) };
                next_id += 1;
                let id = format!("sifucall-{next_id}");
                pending.retain(|_, p| !p.reply.is_closed());
                writer.write_all(&req.action.encode(&id)).await?;
                pending.insert(id, Pending { reply: req.reply, response: None, events: Vec::new() });
            }
            _ = keepalive.tick() => {
                if let Some(at) = ping_sent {
                    if at.elapsed() > cfg.action_timeout {
                        break Err(SessionError::Timeout("keepalive ping"));
                    }
                }
                writer.write_all(&Action::new("Ping").encode("keepalive")).await?;
                ping_sent = Some(Instant::now());
            }
        }
    };
    for (_, p) in pending.drain() {
        let _ = p.reply.send(Err(AmiError::Disconnected));
    }
    result
}

/// Hands a packet to the action it answers, completing it when it is whole.
fn route(pending: &mut HashMap<String, Pending>, p: Packet) {
    let Some(id) = p.action_id().map(str::to_owned) else {
        return;
    };
    let Some(entry) = pending.get_mut(&id) else {
        return;
    };
    let done = if p.response().is_some() && entry.response.is_none() {
        let list = p.is_success() && p.starts_list();
        entry.response = Some(p);
        !list
    } else if p.event().is_some() {
        if p.ends_list() {
            true
        } else {
            entry.events.push(p);
            false
        }
    } else {
        false
    };
    if done {
        if let Some(e) = pending.remove(&id) {
            let _ = e.reply.send(Ok(Reply {
                response: e.response.unwrap_or_default(),
                events: e.events,
            }));
        }
    }
}
