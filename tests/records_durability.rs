//! Durability of the call records, driving the real `sifucall run` binary against the fake
//! providers: a SIGKILL with calls up, the database going down during calls, a spool that
//! cannot be written, a webhook receiver that is down across a restart.
//!
//! The PostgreSQL tests start a private cluster each (`scripts/test-postgres.sh`), since
//! they stop it mid-test. Without PostgreSQL's binaries they say they were skipped, except
//! in CI, where that is a failure. Waits are hang guards, never timing assertions.

mod common;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::ai::{Timeline, question_8k, speech_ms};
use serde_json::Value;
use sifucall::audiosocket::SampleRate;
use sifucall::caller::{self, CallOptions, CallReport};
use sifucall::ops::records::db::{Db, DbUrl};
use sifucall::ops::records::query::{self, CallDetail};
use sifucall::ops::records::{CallRecord, Role};
use sifucall::sandbox::{Sandbox, SandboxConfig};
use uuid::Uuid;

/// Hang guard for one step.
const GUARD: Duration = Duration::from_secs(90);
/// The agent's greeting (short, so the question comes soon).
const GREETING: &str = "Selamat datang.";

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "sifucall-durability-{tag}-{}",
        Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `sifucall run` as a child, its stderr (JSON lines) collected.
struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(dir: &Path, config: &str, env: &[(String, String)]) -> Self {
        let path = dir.join(format!("sifucall-{}.toml", Uuid::new_v4().simple()));
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sifucall"));
        cmd.args(["run", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    fn messages(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn count(&self, text: &str) -> usize {
        self.messages()
            .iter()
            .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(text)))
            .count()
    }

    /// The AudioSocket and admin addresses, from the "sifucall started" line.
    async fn addrs(&mut self) -> (SocketAddr, SocketAddr) {
        let deadline = Instant::now() + GUARD;
        loop {
            if let Some(v) = self
                .messages()
                .into_iter()
                .find(|v| v["message"] == "sifucall started")
            {
                return (
                    v["audiosocket"].as_str().unwrap().parse().unwrap(),
                    v["admin"].as_str().unwrap().parse().unwrap(),
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the daemon exited with {status}: {:?}",
                    self.lines.lock().unwrap()
                );
            }
            assert!(Instant::now() < deadline, "the daemon never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the exit.
    async fn stop(mut self) {
        // SAFETY: kill() on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + GUARD;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the daemon did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(records_url: &str, extra_records: &str, webhook: &str) -> String {
    format!(
        "[audiosocket]\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.0/8\"]\nmax_calls = 10\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\nlevel = \"info\"\nformat = \"json\"\n\n\
         [agent]\nmode = \"ai\"\ngreeting = \"{GREETING}\"\nidle_hangup_secs = 0\nspeculate_after_ms = 0\n\n\
         [records]\nurl = \"{records_url}\"\nnode_id = \"durability\"\n{extra_records}\n\n\
         [webhook]\n{webhook}\n"
    )
}

/// A caller who waits for the greeting, asks the question and stays on the line for
/// `stay_ms` more, then hangs up.
fn caller_opts(addr: SocketAddr, stay_ms: u64) -> CallOptions {
    let mut t = Timeline::new(8_000);
    t.silence_ms(speech_ms(GREETING, 8_000) + 400);
    t.say(&question_8k());
    let mut c = CallOptions::new(addr.to_string());
    c.rate = SampleRate::Hz8000;
    c.play = t.samples.clone();
    c.tail = Duration::from_millis(stay_ms);
    c
}

async fn place(opts: CallOptions) -> tokio::task::JoinHandle<Result<CallReport, String>> {
    tokio::spawn(async move {
        tokio::time::timeout(GUARD, caller::place_call(opts))
            .await
            .map_err(|_| "call guard".to_owned())?
            .map_err(|e| e.to_string())
    })
}

async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + GUARD;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn detail(db: &Db, id: Uuid) -> Option<CallDetail> {
    query::call(db, id).await.ok().flatten()
}

/// The caller's question is in the transcript (the fake recogniser's words for it), with
/// when it was said.
fn said_by_caller(d: &CallDetail) -> bool {
    d.transcript.iter().any(|t| {
        t.role == Role::Caller && !t.text.is_empty() && t.start_ms.is_some() && t.end_ms.is_some()
    })
}

async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_calls_up_leaves_them_interrupted_with_their_turns() {
    let fakes = Sandbox::start(SandboxConfig::default()).await.unwrap();
    let dir = temp_dir("kill");
    let url = format!("sqlite://{}/calls.db", dir.display());
    let cfg = config(&url, "", "url = \"\"");
    let mut d = Daemon::start(&dir, &cfg, &fakes.env_overrides());
    let (addr, _) = d.addrs().await;
    let db = Db::open(&DbUrl::parse(&url).unwrap().unwrap(), 1)
        .await
        .unwrap();

    let mut ids = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..3 {
        // They stay on the line long after their question: up when the daemon dies.
        let opts = caller_opts(addr, 60_000);
        ids.push(opts.call_id);
        calls.push(place(opts).await);
    }
    // Each call has had a turn answered, and it is in the database while the call is up.
    for id in &ids {
        wait_for("a turn written during the call", || async {
            detail(&db, *id)
                .await
                .filter(|d| d.row.status == "open" && !d.turns.is_empty() && said_by_caller(d))
        })
        .await;
    }
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    for c in calls {
        let _ = c.await;
    }

    let mut d2 = Daemon::start(&dir, &cfg, &fakes.env_overrides());
    d2.addrs().await;
    for id in &ids {
        let got = detail(&db, *id).await.expect("the call is in the history");
        assert_eq!(got.row.status, "interrupted", "{got:?}");
        assert_eq!(got.row.outcome.as_deref(), Some("interrupted"));
        assert!(got.row.turns >= 1, "{got:?}");
        assert!(said_by_caller(&got), "{got:?}");
        assert!(got.row.duration_ms.unwrap_or(0) > 0, "{got:?}");
        // Both sides' lines say when the words started and ended (the agent's from its
        // first frame to the end of its playback, the caller's as the VAD heard them).
        for t in &got.transcript {
            let (Some(start), Some(end)) = (t.start_ms, t.end_ms) else {
                panic!("a line without its times: {t:?}");
            };
            assert!(start < end, "{t:?}");
            if t.role == Role::Agent {
                assert_eq!(end, t.at_ms, "{t:?}");
            }
        }
    }
    assert_eq!(
        d2.count("closed as interrupted"),
        1,
        "the restart says what it closed"
    );
    d2.stop().await;
    db.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A private PostgreSQL cluster, stopped and started by the test.
struct Postgres {
    dir: PathBuf,
    port: u16,
    url: String,
}

impl Postgres {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-postgres.sh")
    }

    /// `None` (skipped) where PostgreSQL is not installed, except in CI.
    fn start(tag: &str) -> Option<Self> {
        let installed = std::fs::read_dir("/usr/lib/postgresql")
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if !installed {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the PostgreSQL durability tests: PostgreSQL is not installed"
            );
            eprintln!("SKIPPED: PostgreSQL is not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = temp_dir(&format!("pg-{tag}"));
        let pg = Self {
            url: format!("postgres://postgres@127.0.0.1:{port}/sifucall_test"),
            dir,
            port,
        };
        pg.run("start");
        Some(pg)
    }

    fn run(&self, what: &str) {
        let out = Command::new(Self::script())
            .args([what, &self.dir.display().to_string()])
            .env("PGTEST_PORT", self.port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "test-postgres.sh {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.run("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_during_calls_the_calls_go_on_and_records_arrive_when_back() {
    let Some(pg) = Postgres::start("down") else {
        return;
    };
    let fakes = Sandbox::start(SandboxConfig::default()).await.unwrap();
    let dir = temp_dir("down");
    let spool = dir.join("spool");
    let cfg = config(
        &pg.url,
        &format!("spool_dir = \"{}\"", spool.display()),
        "url = \"\"",
    );
    let mut d = Daemon::start(&dir, &cfg, &fakes.env_overrides());
    let (addr, admin) = d.addrs().await;
    let db = Db::open(&DbUrl::parse(&pg.url).unwrap().unwrap(), 1)
        .await
        .unwrap();

    let mut ids = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..2 {
        let opts = caller_opts(addr, 6_000);
        ids.push(opts.call_id);
        calls.push(place(opts).await);
    }
    for id in &ids {
        wait_for("the call's row", || async { detail(&db, *id).await }).await;
    }
    db.close().await;
    pg.run("stop");

    // The calls go on: each hears its reply after the question, and ends normally.
    for c in calls {
        let report = c.await.unwrap().expect("the call completes");
        assert!(
            report.reply_latency_ms.is_some(),
            "the reply was heard with the database down: {report:?}"
        );
        assert_eq!(report.violation_count, 0, "{report:?}");
    }
    wait_for("the records spooled", || async {
        (metric(admin, "sifucall_records_spooled_total").await > 0.0).then_some(())
    })
    .await;

    pg.run("start");
    let db = Db::open(&DbUrl::parse(&pg.url).unwrap().unwrap(), 1)
        .await
        .unwrap();
    for id in &ids {
        let got = wait_for("the record written once the database is back", || async {
            detail(&db, *id)
                .await
                .filter(|d| d.row.status == "completed")
        })
        .await;
        assert!(said_by_caller(&got), "{got:?}");
        // The reply went out during the outage: its turn reached the first frame.
        assert!(
            got.turns
                .first()
                .is_some_and(|t| t.first_frame_ms.is_some()),
            "{got:?}"
        );
    }
    assert_eq!(
        metric(
            admin,
            "sifucall_records_lost_total{reason=\"spool_failed\"}"
        )
        .await,
        0.0
    );
    assert_eq!(d.count("refused a write"), 1, "the outage is logged once");
    db.close().await;
    d.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_that_cannot_be_written_loses_records_counted_and_logged_once() {
    let Some(pg) = Postgres::start("full") else {
        return;
    };
    let fakes = Sandbox::start(SandboxConfig::default()).await.unwrap();
    let dir = temp_dir("full");
    // A path under a regular file: every write fails, as on a full or broken disk.
    let blocker = dir.join("not-a-directory");
    std::fs::write(&blocker, b"x").unwrap();
    let spool = blocker.join("spool");
    let cfg = config(
        &pg.url,
        &format!("spool_dir = \"{}\"", spool.display()),
        "url = \"\"",
    );
    let mut d = Daemon::start(&dir, &cfg, &fakes.env_overrides());
    let (addr, admin) = d.addrs().await;
    pg.run("stop");

    let mut calls = Vec::new();
    for _ in 0..3 {
        calls.push(place(caller_opts(addr, 4_000)).await);
    }
    for c in calls {
        let report = c.await.unwrap().expect("the call completes");
        assert!(report.reply_latency_ms.is_some(), "{report:?}");
        assert_eq!(report.violation_count, 0, "{report:?}");
    }
    wait_for("the loss counted", || async {
        (metric(
            admin,
            "sifucall_records_lost_total{reason=\"spool_failed\"}",
        )
        .await
            >= 3.0)
            .then_some(())
    })
    .await;
    assert_eq!(d.count("call records lost"), 1, "logged once");
    d.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// One delivery: the call id header, the timestamp, the signature and the body.
type Delivery = (String, String, String, Bytes);

/// A webhook receiver that answers 503 until `up`, then records every delivery.
#[derive(Clone, Default)]
struct Receiver {
    up: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<std::sync::atomic::AtomicU64>,
    got: Arc<Mutex<Vec<Delivery>>>,
}

async fn receiver() -> (String, Receiver) {
    use axum::http::{HeaderMap, StatusCode};
    let r = Receiver::default();
    let state = r.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move {
                if !state.up.load(std::sync::atomic::Ordering::SeqCst) {
                    state
                        .refused
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let h = |k: &str| {
                    headers
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                state.got.lock().unwrap().push((
                    h("x-sifucall-call-id"),
                    h("x-sifucall-timestamp"),
                    h("x-sifucall-signature"),
                    body,
                ));
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, r)
}

/// HMAC-SHA256 as RFC 2104 builds it from SHA-256 (not the daemon's signing code).
fn hmac_sha256_hex(key: &[u8], msg: &[u8]) -> String {
    use ring::digest::{SHA256, digest};
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let mut inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(msg);
    let mut outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(digest(&SHA256, &inner).as_ref());
    digest(&SHA256, &outer)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_across_a_restart_then_up_delivers_each_record_once_signed() {
    const SECRET: &str = "whsec-durability";
    let fakes = Sandbox::start(SandboxConfig::default()).await.unwrap();
    let (hook, rx) = receiver().await;
    let dir = temp_dir("hook");
    let url = format!("sqlite://{}/calls.db", dir.display());
    let recordings = dir.join("recordings");
    let cfg = config(
        &url,
        &format!(
            "recordings_dir = \"{}\"\nrecord_all = true",
            recordings.display()
        ),
        &format!("url = \"{hook}\"\nbackoff_initial_ms = 50\nbackoff_max_ms = 200"),
    );
    let mut env = fakes.env_overrides();
    env.push(("WEBHOOK_SIGNING_SECRET".into(), SECRET.into()));
    let mut d = Daemon::start(&dir, &cfg, &env);
    let (addr, _) = d.addrs().await;
    let mut ids = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..3 {
        let opts = caller_opts(addr, 1_000);
        ids.push(opts.call_id);
        calls.push(place(opts).await);
    }
    for c in calls {
        c.await.unwrap().expect("the call completes");
    }
    let refused = rx.refused.clone();
    wait_for("deliveries refused and retried", || {
        let refused = refused.clone();
        async move { (refused.load(std::sync::atomic::Ordering::SeqCst) >= 6).then_some(()) }
    })
    .await;
    // The failures name their cause.
    assert!(
        d.messages().iter().any(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.contains("webhook delivery failed"))
            && v["error"].as_str().is_some_and(|e| e.contains("503"))),
        "a failure is logged with its cause"
    );
    d.stop().await;

    // Pending deliveries survive the restart.
    let mut d2 = Daemon::start(&dir, &cfg, &env);
    d2.addrs().await;
    rx.up.store(true, std::sync::atomic::Ordering::SeqCst);
    let got = rx.got.clone();
    wait_for("every record delivered", || {
        let got = got.clone();
        async move { (got.lock().unwrap().len() >= 3).then_some(()) }
    })
    .await;
    // Nothing is delivered twice: the outbox says delivered for each, and no more come.
    let db = Db::open(&DbUrl::parse(&url).unwrap().unwrap(), 1)
        .await
        .unwrap();
    if let Db::Sqlite(p) = &db {
        wait_for("the outbox marked delivered", || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM webhook_outbox WHERE delivered_at_ms IS NOT NULL",
            )
            .fetch_one(p)
            .await
            .ok()?;
            (n == 3).then_some(())
        })
        .await;
    }
    d2.stop().await;
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "each record once");
    let mut seen = Vec::new();
    for (id, ts, sig, body) in &got {
        let rec: CallRecord = serde_json::from_slice(body).unwrap();
        assert_eq!(id, &rec.call_id.to_string());
        let mut msg = ts.as_bytes().to_vec();
        msg.push(b'.');
        msg.extend_from_slice(body);
        assert_eq!(
            sig,
            &format!("v1={}", hmac_sha256_hex(SECRET.as_bytes(), &msg))
        );
        assert!(rec.cost.is_some(), "the record carries its cost");
        // The call was recorded: a stereo WAV under recordings_dir, named in the record.
        let path = PathBuf::from(rec.recording_path.as_deref().expect("a recording"));
        assert!(path.starts_with(&recordings), "{path:?}");
        let wav = std::fs::read(&path).unwrap();
        assert!(
            wav.len() > 44 + 8_000 * 4,
            "a second or more of stereo audio"
        );
        assert_eq!(u16::from_le_bytes([wav[22], wav[23]]), 2, "two channels");
        seen.push(rec.call_id);
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    db.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
