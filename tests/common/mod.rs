//! Test harness: a daemon on 127.0.0.1:0 and a raw-bytes AudioSocket peer that behaves like
//! Asterisk and checks every byte the daemon sends against what Asterisk accepts.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod ai;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sifucall::call::{Behaviour, CallSummary, SessionConfig};
use sifucall::ops::admin::ReadyFlag;
use sifucall::ops::metrics::Metrics;
use sifucall::server::{self, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound for any wait in a test: a hang guard, not a timing assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(10);

pub struct TestDaemon {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub summaries: mpsc::UnboundedReceiver<CallSummary>,
    pub metrics: Arc<Metrics>,
    pub ready: ReadyFlag,
    pub task: JoinHandle<()>,
}

pub fn echo_config() -> ServerConfig {
    ServerConfig {
        allow: vec!["127.0.0.0/8".parse().unwrap()],
        max_calls: 10,
        max_pending: 16,
        shutdown_grace: Duration::from_secs(5),
        session: SessionConfig {
            first_message_timeout: Duration::from_secs(2),
            behaviour: Behaviour::Echo,
            idle_hangup: Some(Duration::from_secs(60)),
            control: std::sync::Arc::new(sifucall::call::NoControl),
            records: None,
        },
    }
}

pub async fn start(cfg: ServerConfig) -> TestDaemon {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let (tx, summaries) = mpsc::unbounded_channel();
    let metrics = Arc::new(Metrics::new());
    let ready = ReadyFlag::default();
    let on_end: server::OnCallEnd = Arc::new(move |s| {
        let _ = tx.send(s);
    });
    let task = tokio::spawn(server::serve(
        listener,
        cfg,
        Arc::clone(&metrics),
        ready.clone(),
        Some(on_end),
        shutdown.clone(),
    ));
    TestDaemon {
        addr,
        shutdown,
        summaries,
        metrics,
        ready,
        task,
    }
}

impl TestDaemon {
    pub async fn next_summary(&mut self) -> CallSummary {
        tokio::time::timeout(HANG_GUARD, self.summaries.recv())
            .await
            .expect("call ended")
            .expect("daemon alive")
    }
}

/// A frame as it arrived from the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub fn uuid_frame() -> Vec<u8> {
    frame(0x01, uuid::Uuid::new_v4().as_bytes())
}

pub fn audio_frame(kind: u8, samples: &[i16]) -> Vec<u8> {
    let mut p = Vec::new();
    for s in samples {
        p.extend_from_slice(&s.to_le_bytes());
    }
    frame(kind, &p)
}

/// The Asterisk side of a connection.
pub struct Peer {
    pub write: tokio::net::tcp::OwnedWriteHalf,
    pub frames: mpsc::UnboundedReceiver<Frame>,
    /// Set when the daemon sent something Asterisk would abort the call for.
    pub violations: Arc<std::sync::Mutex<Vec<String>>>,
    pub closed: tokio::sync::watch::Receiver<bool>,
}

impl Peer {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (mut read, write) = stream.into_split();
        let (tx, frames) = mpsc::unbounded_channel();
        let violations = Arc::new(std::sync::Mutex::new(Vec::new()));
        let v = Arc::clone(&violations);
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match read.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                while buf.len() >= 3 {
                    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
                    if buf.len() < 3 + len {
                        break;
                    }
                    let f = Frame {
                        kind: buf[0],
                        payload: buf[3..3 + len].to_vec(),
                    };
                    buf.drain(..3 + len);
                    let ok_kind = f.kind == 0x00 || (0x10..=0x18).contains(&f.kind);
                    if !ok_kind {
                        v.lock()
                            .unwrap()
                            .push(format!("forbidden kind 0x{:02x}", f.kind));
                    }
                    if f.kind != 0 && f.payload.is_empty() {
                        v.lock().unwrap().push("zero-length audio".into());
                    }
                    if f.kind == 0 && !f.payload.is_empty() {
                        v.lock().unwrap().push("hangup with payload".into());
                    }
                    let _ = tx.send(f);
                }
            }
            if !buf.is_empty() {
                v.lock()
                    .unwrap()
                    .push(format!("{} trailing bytes (truncated frame)", buf.len()));
            }
            let _ = closed_tx.send(true);
        });
        Self {
            write,
            frames,
            violations,
            closed,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.unwrap();
    }

    /// Sends, ignoring errors (the daemon may already have closed).
    pub async fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.write.write_all(bytes).await;
    }

    pub async fn next_frame(&mut self) -> Option<Frame> {
        tokio::time::timeout(HANG_GUARD, self.frames.recv())
            .await
            .expect("frame or close within guard")
    }

    /// Reads frames until the daemon closes; returns them.
    pub async fn read_to_close(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = self.next_frame().await {
            out.push(f);
        }
        out
    }

    pub fn assert_no_violations(&self) {
        let v = self.violations.lock().unwrap();
        assert!(
            v.is_empty(),
            "daemon sent frames Asterisk would reject: {v:?}"
        );
    }
}

pub fn samples(f: &Frame) -> Vec<i16> {
    f.payload
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}
