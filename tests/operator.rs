//! What an operator does to a running daemon: signals (SIGHUP reload, a second SIGTERM),
//! bad log filters, floods from outside the allowlist, idle admin connections under a low
//! open-file limit. These run the real binary as a child process and talk to it over raw
//! AudioSocket bytes and HTTP, reading its JSON log lines from stderr.
//!
//! Waits are hang guards, never timing assertions: each test asserts what happened (frames
//! received, hangups, log lines, metrics), whatever the machine's load.

mod common;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Frame, Peer, audio_frame, uuid_frame};
use serde_json::Value;
use sifucall::sandbox::{Sandbox, SandboxConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Hang guard for one step of a child-process test.
const GUARD: Duration = Duration::from_secs(60);

/// A `sifucall run` child with its stderr collected line by line.
struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
    config: PathBuf,
}

impl Daemon {
    fn start(tag: &str, config: &str, env: &[(String, String)]) -> Self {
        Self::start_with(tag, config, env, |_| {})
    }

    fn start_with(
        tag: &str,
        config: &str,
        env: &[(String, String)],
        tweak: impl FnOnce(&mut Command),
    ) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sifucall-operator-{tag}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sifucall.toml");
        std::fs::write(&path, config).unwrap();
        // OPERATOR_TEST_BIN runs these tests against another build (e.g. an older one, to
        // see them fail there).
        let bin = std::env::var_os("OPERATOR_TEST_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_sifucall")),
            PathBuf::from,
        );
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("AZURE_SPEECH_KEY")
            .env_remove("OPENROUTER_API_KEY")
            .env_remove("ELEVENLABS_API_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        tweak(&mut cmd);
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
        Self {
            child,
            lines,
            dir,
            config: path,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn json_lines(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for a log line whose message contains `text`, after the first `skip` lines.
    async fn wait_for(&mut self, text: &str, skip: usize) -> Value {
        let deadline = Instant::now() + GUARD;
        loop {
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() {
                // Let the reader thread catch up with what the process wrote before exiting.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let lines = self.lines();
            for l in lines.iter().skip(skip) {
                if let Ok(v) = serde_json::from_str::<Value>(l) {
                    if v["message"].as_str().is_some_and(|m| m.contains(text)) {
                        return v;
                    }
                }
            }
            if Instant::now() > deadline || exited.is_some() {
                panic!(
                    "no log line with {text:?} (exit: {exited:?}); got:\n{}",
                    lines.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The listening addresses from the startup line.
    async fn addrs(&mut self) -> (SocketAddr, SocketAddr) {
        let v = self.wait_for("sifucall started", 0).await;
        (
            v["audiosocket"].as_str().unwrap().parse().unwrap(),
            v["admin"].as_str().unwrap().parse().unwrap(),
        )
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    fn rewrite_config(&self, config: &str) {
        // Write then rename, as an editor or config management would.
        let tmp = self.dir.join("sifucall.toml.new");
        std::fs::write(&tmp, config).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Waits for the process to exit; returns its status.
    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + GUARD;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Let the reader thread drain the pipe.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("daemon did not exit; log:\n{}", self.lines().join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn echo_config(extra_audiosocket: &str) -> String {
    format!(
        "[audiosocket]\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.0/8\"]\n{extra_audiosocket}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n[agent]\nmode = \"echo\"\n"
    )
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(GUARD, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A call that sends 20 ms of silence every 20 ms until `stop`, counting what comes back.
struct PacedCall {
    received: Arc<AtomicUsize>,
    frames: Arc<Mutex<Vec<Frame>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Peer>,
}

impl PacedCall {
    async fn start(addr: SocketAddr) -> Self {
        let mut peer = Peer::connect(addr).await;
        peer.send(&uuid_frame()).await;
        let received = Arc::new(AtomicUsize::new(0));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (r, f, s) = (Arc::clone(&received), Arc::clone(&frames), stop.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    () = s.cancelled() => break,
                    _ = tick.tick() => peer.send_lossy(&audio_frame(0x10, &[0; 160])).await,
                    got = peer.frames.recv() => match got {
                        Some(frame) => {
                            r.fetch_add(1, Ordering::SeqCst);
                            let hangup = frame.kind == 0;
                            f.lock().unwrap().push(frame);
                            if hangup {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
            peer
        });
        Self {
            received,
            frames,
            stop,
            task,
        }
    }

    fn count(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    async fn wait_frames(&self, n: usize) {
        let deadline = Instant::now() + GUARD;
        while self.count() < n {
            assert!(
                !self.task.is_finished(),
                "call ended early: {:?}",
                self.kinds()
            );
            assert!(Instant::now() < deadline, "only {} frames", self.count());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn kinds(&self) -> Vec<u8> {
        self.frames.lock().unwrap().iter().map(|f| f.kind).collect()
    }

    fn frames(&self) -> Vec<Frame> {
        self.frames.lock().unwrap().clone()
    }

    async fn hang_up(self) -> Vec<Frame> {
        self.stop.cancel();
        let peer = tokio::time::timeout(GUARD, self.task)
            .await
            .unwrap()
            .unwrap();
        peer.assert_no_violations();
        drop(peer);
        self.frames.lock().unwrap().clone()
    }
}

/// Frames carrying agent speech (any sample at least `LOUD`).
fn loud_frames(frames: &[Frame]) -> usize {
    frames
        .iter()
        .filter(|f| f.kind != 0 && common::samples(f).iter().any(|s| s.abs() >= 300))
        .count()
}

fn ai_config(greeting: &str, max_calls: usize, records: &Path, level: &str) -> String {
    format!(
        "[audiosocket]\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.0/8\"]\nmax_calls = {max_calls}\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\nlevel = \"{level}\"\n\n\
         [agent]\nmode = \"ai\"\ngreeting = \"{greeting}\"\nidle_hangup_secs = 0\n\n\
         [records]\nurl = \"file://{}\"\n",
        records.display()
    )
}

const SHORT_GREETING: &str = "Helo.";
const LONG_GREETING: &str = "Selamat datang ke talian bantuan kami. Panggilan anda penting bagi kami. \
     Sila nyatakan apa yang boleh kami bantu hari ini.";

/// SIGHUP during a call: the call goes on untouched, the new greeting and `max_calls` apply
/// to the next calls, an invalid file is refused with a reason, the records file is
/// reopened after logrotate moved it, and the log level changes live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_without_dropping_the_call() {
    let fakes = Sandbox::start(SandboxConfig::default()).await.unwrap();
    let records_dir = std::env::temp_dir().join(format!(
        "sifucall-operator-records-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let records = records_dir.join("calls.jsonl");
    let mut d = Daemon::start(
        "hup",
        &ai_config(SHORT_GREETING, 2, &records, "info"),
        &fakes.env_overrides(),
    );
    let (addr, admin) = d.addrs().await;

    let first = PacedCall::start(addr).await;
    // Long enough to hear the whole short greeting.
    first.wait_frames(150).await;
    let first_greeting = loud_frames(&first.frames());
    assert!(first_greeting > 0, "the greeting was heard");

    // logrotate: move the records file away, then SIGHUP with a new greeting, a lower call
    // cap and a louder log level.
    std::fs::create_dir_all(&records_dir).unwrap();
    let rotated = records_dir.join("calls.jsonl.1");
    if records.exists() {
        std::fs::rename(&records, &rotated).unwrap();
    }
    let before_reload = d.lines().len();
    d.rewrite_config(&ai_config(
        LONG_GREETING,
        1,
        &records,
        "info,sifucall::server=debug",
    ));
    d.signal(libc::SIGHUP);
    let reloaded = d.wait_for("configuration reloaded", before_reload).await;
    let changed = reloaded["changed"].as_str().unwrap_or_default().to_owned();
    assert!(
        changed.contains("agent.greeting") && changed.contains("audiosocket.max_calls"),
        "{reloaded}"
    );

    // The running call is untouched: frames keep coming, no hangup.
    let at_reload = first.count();
    first.wait_frames(at_reload + 50).await;
    assert!(
        !first.kinds().contains(&0),
        "no hangup: {:?}",
        first.kinds()
    );

    // max_calls is now 1 and the first call holds it: a second call gets a hangup.
    // (Twice: the first refusal from a source is a WARN, later ones are DEBUG lines.)
    for _ in 0..2 {
        let mut refused = Peer::connect(addr).await;
        refused.send_lossy(&uuid_frame()).await;
        assert_eq!(
            refused.read_to_close().await,
            vec![Frame {
                kind: 0,
                payload: vec![]
            }]
        );
    }
    // The new level is in force: the second refusal is logged at DEBUG by the listener
    // (the log writer is asynchronous: wait for the line, bounded).
    let mut debug_after = false;
    for _ in 0..250 {
        debug_after = d
            .json_lines()
            .iter()
            .skip(before_reload)
            .any(|v| v["level"] == "DEBUG" && v["target"].as_str() == Some("sifucall::server"));
        if debug_after {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = http_get(admin, "/readyz").await;
    assert!(r.ends_with("full"), "readyz at the cap: {r}");

    // An invalid file changes nothing and says why.
    let before_bad = d.lines().len();
    d.rewrite_config("[audiosocket]\nmax_calls = 0\n");
    d.signal(libc::SIGHUP);
    let bad = d.wait_for("keeping the running", before_bad).await;
    assert_eq!(bad["level"], "ERROR", "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("max_calls"),
        "{bad}"
    );
    let at_bad = first.count();
    first.wait_frames(at_bad + 25).await;

    let first_frames = first.hang_up().await;
    assert!(!first_frames.iter().any(|f| f.kind == 0));

    // The next call hears the new, longer greeting.
    let mut admitted = false;
    for _ in 0..100 {
        if !http_get(admin, "/readyz").await.ends_with("full") {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "the slot came back");
    let second = PacedCall::start(addr).await;
    let long_frames = sifucall::sandbox::elevenlabs::speech_samples(LONG_GREETING, 8_000) / 160;
    second.wait_frames(long_frames + 100).await;
    let second_greeting = loud_frames(&second.frames());
    second.hang_up().await;
    assert!(
        second_greeting > 2 * first_greeting,
        "new greeting heard: {second_greeting} loud frames vs {first_greeting} before"
    );

    d.signal(libc::SIGTERM);
    let status = d.wait_exit().await;
    assert!(status.success(), "{status:?}");
    assert!(
        debug_after,
        "log level reloaded; log:\n{}",
        d.lines().join("\n")
    );
    // Both calls' records went to the reopened file, none to the rotated one after the move.
    let new = std::fs::read_to_string(&records).unwrap_or_default();
    assert_eq!(new.lines().count(), 2, "records after reopen: {new}");
    let _ = std::fs::remove_dir_all(&records_dir);
}

/// A second SIGTERM during the drain hangs every call up at once, each with its 0x00.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_ends_the_drain_at_once() {
    let mut d = Daemon::start("term", &echo_config("shutdown_grace_secs = 300"), &[]);
    let (addr, admin) = d.addrs().await;
    let call = PacedCall::start(addr).await;
    call.wait_frames(10).await;

    let before = d.lines().len();
    d.signal(libc::SIGTERM);
    d.wait_for("draining", before).await;
    let r = http_get(admin, "/readyz").await;
    assert!(r.ends_with("draining"), "{r}");
    // The call goes on during the drain.
    let n = call.count();
    call.wait_frames(n + 10).await;

    d.signal(libc::SIGTERM);
    let status = d.wait_exit().await;
    assert!(status.success(), "{status:?}");
    let frames = call.hang_up().await;
    assert_eq!(
        frames.last().map(|f| f.kind),
        Some(0),
        "the call got its hangup"
    );
    assert!(
        d.lines().iter().any(|l| l.contains("second stop signal")),
        "{}",
        d.lines().join("\n")
    );
}

/// An invalid `log.level` or `RUST_LOG` is a configuration error (exit 2) that is reported,
/// not a daemon that prints nothing.
#[tokio::test]
async fn invalid_log_filters_exit_2_and_say_why() {
    for (level, rust_log) in [("inf", None), ("warning", None), ("info", Some("warning"))] {
        let config = format!("{}\n[log]\nlevel = \"{level}\"\n", echo_config(""));
        let env: Vec<(String, String)> = rust_log
            .map(|v| vec![("RUST_LOG".to_owned(), v.to_owned())])
            .unwrap_or_default();
        let mut d = Daemon::start("loglevel", &config, &env);
        let status = d.wait_exit().await;
        assert_eq!(status.code(), Some(2), "{level} {rust_log:?}");
        // The configuration check reports it on stderr (journald keeps it), naming the value.
        let bad = rust_log.unwrap_or(level);
        let said: Vec<String> = d
            .lines()
            .into_iter()
            .filter(|l| l.contains("configuration error") && l.contains(bad))
            .collect();
        assert!(!said.is_empty(), "{level} {rust_log:?}: {:?}", d.lines());
    }
}

/// 1000 connections from outside the allowlist: every one is counted, and the log gets a
/// handful of lines, not 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_flood_is_counted_not_logged_line_by_line() {
    let config = "[audiosocket]\nlisten = \"127.0.0.1:0\"\nallow = [\"10.0.0.0/8\"]\n\n\
                  [admin]\nlisten = \"127.0.0.1:0\"\n\n[agent]\nmode = \"echo\"\n";
    let mut d = Daemon::start("flood", config, &[]);
    let (addr, admin) = d.addrs().await;
    let before = d.lines().len();
    for _ in 0..1000 {
        if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
            drop(s);
        }
    }
    let deadline = Instant::now() + GUARD;
    loop {
        let body = http_get(admin, "/metrics").await;
        let n = metric(
            &body,
            "sifucall_connections_refused_total{reason=\"not_allowed\"}",
        );
        if n == Some(1000.0) {
            break;
        }
        assert!(Instant::now() < deadline, "refusals counted: {n:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());
    // Every WARN line after startup is about the refusals (whatever its wording).
    let refusal_lines: Vec<String> = d
        .lines()
        .into_iter()
        .skip(before)
        .filter(|l| l.contains("\"level\":\"WARN\""))
        .collect();
    assert!(
        !refusal_lines.is_empty() && refusal_lines.len() <= 6,
        "{} lines: {refusal_lines:#?}",
        refusal_lines.len()
    );
    // The summaries account for all of them (including those also logged alone).
    let total: u64 = refusal_lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["refused"].as_u64())
        .sum();
    assert_eq!(total, 1000, "{refusal_lines:#?}");
}

/// Under a low open-file limit, 48 idle admin connections leave the AudioSocket port
/// working: admin connections are capped well below the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_do_not_starve_calls() {
    let config = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\nheader_timeout_ms = 60000\n",
        "[audiosocket]\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.0/8\"]\n\n[agent]\nmode = \"echo\"\n"
    );
    let mut d = Daemon::start_with("fds", &config, &[], |cmd| {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 56,
                    rlim_max: 56,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let (addr, admin) = d.addrs().await;
    let mut idle = Vec::new();
    for _ in 0..48 {
        idle.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    // Give the admin loop time to accept (and refuse) them all: wait for the count.
    let deadline = Instant::now() + GUARD;
    loop {
        let lines = d.lines();
        if lines
            .iter()
            .any(|l| l.contains("admin connections at their cap"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{}", lines.join("\n"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..3 {
        let call = PacedCall::start(addr).await;
        call.wait_frames(5).await;
        let frames = call.hang_up().await;
        assert!(frames.iter().all(|f| f.kind == 0x10), "echoed, not refused");
    }
    assert!(
        !d.lines().iter().any(|l| l.contains("accept failed")),
        "{}",
        d.lines().join("\n")
    );
    drop(idle);
}

// ---- in-process listener tests --------------------------------------------------------

/// Connections that dribble their UUID a byte at a time are pending, not calls: at
/// `max_calls = 10`, twelve of them refuse no real call, and the metrics say so.
#[tokio::test]
async fn dribbling_connections_hold_no_call_slot() {
    let mut cfg = common::echo_config();
    cfg.max_calls = 10;
    cfg.max_pending = 16;
    cfg.session.first_message_timeout = Duration::from_secs(30);
    let d = common::start(cfg).await;
    let uuid = uuid_frame();
    let mut dribblers = Vec::new();
    for _ in 0..12 {
        let mut s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
        let first = uuid[0];
        s.write_all(&[first]).await.unwrap();
        let rest = uuid[1..].to_vec();
        dribblers.push(tokio::spawn(async move {
            for b in rest {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if s.write_all(&[b]).await.is_err() {
                    break;
                }
            }
            s
        }));
    }
    let deadline = Instant::now() + GUARD;
    while d.metrics.pending_connections() < 12 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut p = Peer::connect(d.addr).await;
        p.send(&uuid_frame()).await;
        p.send(&audio_frame(0x10, &[7; 160])).await;
        let f = p.next_frame().await.expect("served");
        assert_eq!(f.kind, 0x10, "a real call is served, not refused");
        calls.push(p);
    }
    let text = d.metrics.render();
    assert_eq!(
        metric(&text, "sifucall_pending_connections"),
        Some(12.0),
        "{text}"
    );
    assert_eq!(metric(&text, "sifucall_active_calls"), Some(4.0), "{text}");
    for t in dribblers {
        t.abort();
    }
}

/// Over `max_pending`, a connection is closed at once and counted.
#[tokio::test]
async fn pending_connections_have_their_own_cap() {
    let mut cfg = common::echo_config();
    cfg.max_pending = 2;
    cfg.session.first_message_timeout = Duration::from_secs(30);
    let d = common::start(cfg).await;
    let _silent1 = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let _silent2 = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let deadline = Instant::now() + GUARD;
    while d.metrics.pending_connections() < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut third = Peer::connect(d.addr).await;
    third.send_lossy(&uuid_frame()).await;
    assert!(third.read_to_close().await.is_empty(), "closed at once");
    assert_eq!(
        d.metrics
            .sample("sifucall_connections_refused_total{reason=\"too_many_pending\"}"),
        Some(1.0)
    );
    // A pending connection that sends its UUID becomes a call and frees its pending slot.
    drop(_silent1);
    let deadline = Instant::now() + GUARD;
    while d.metrics.pending_connections() > 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut call = Peer::connect(d.addr).await;
    call.send(&uuid_frame()).await;
    call.send(&audio_frame(0x10, &[7; 160])).await;
    assert_eq!(call.next_frame().await.map(|f| f.kind), Some(0x10));
}

/// A dual-stack listener (`[::]`) sees IPv4 peers as `::ffff:a.b.c.d`; an IPv4 allowlist
/// still admits them.
#[tokio::test]
async fn dual_stack_listener_admits_ipv4_peers() {
    let listener = match tokio::net::TcpListener::bind("[::]:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "note: skipping dual_stack_listener_admits_ipv4_peers: cannot bind [::] ({e})"
            );
            return;
        }
    };
    let port = listener.local_addr().unwrap().port();
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Probe: on a v6-only host the IPv4 connect fails; then there is nothing to test.
    let mut cfg = common::echo_config();
    cfg.allow = vec!["127.0.0.0/8".parse().unwrap()];
    let metrics = Arc::new(sifucall::ops::metrics::Metrics::new());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sifucall::server::serve(
        listener,
        cfg,
        Arc::clone(&metrics),
        sifucall::ops::admin::ReadyFlag::new(),
        None,
        shutdown.clone(),
    ));
    let stream = match tokio::net::TcpStream::connect(v4).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("note: skipping: IPv4 to a [::] listener is not possible here ({e})");
            return;
        }
    };
    drop(stream);
    let mut p = Peer::connect(v4).await;
    p.send(&uuid_frame()).await;
    p.send(&audio_frame(0x10, &[9; 160])).await;
    assert_eq!(p.next_frame().await.map(|f| f.kind), Some(0x10));
    assert_eq!(
        metrics.sample("sifucall_connections_refused_total{reason=\"not_allowed\"}"),
        Some(0.0)
    );
    shutdown.cancel();
}

/// A reload's allowlist applies to the next connection; the running call keeps going.
#[tokio::test]
async fn reconfigured_allowlist_applies_to_new_connections_only() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(sifucall::ops::metrics::Metrics::new());
    let server = sifucall::server::Server::new(
        common::echo_config(),
        Arc::clone(&metrics),
        sifucall::ops::admin::ReadyFlag::new(),
    );
    let handle = server.handle();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.run(listener, None, shutdown.clone()));
    let mut running = Peer::connect(addr).await;
    running.send(&uuid_frame()).await;
    running.send(&audio_frame(0x10, &[5; 160])).await;
    assert_eq!(running.next_frame().await.map(|f| f.kind), Some(0x10));

    let mut cfg = common::echo_config();
    cfg.allow = vec!["10.0.0.0/8".parse().unwrap()];
    handle.reconfigure(cfg);
    let mut stranger = Peer::connect(addr).await;
    stranger.send_lossy(&uuid_frame()).await;
    assert!(
        stranger.read_to_close().await.is_empty(),
        "closed without a byte"
    );
    assert_eq!(
        metrics.sample("sifucall_connections_refused_total{reason=\"not_allowed\"}"),
        Some(1.0)
    );
    for _ in 0..5 {
        running.send(&audio_frame(0x10, &[5; 160])).await;
        assert_eq!(running.next_frame().await.map(|f| f.kind), Some(0x10));
    }
    running.assert_no_violations();
    drop(running);
    shutdown.cancel();
    tokio::time::timeout(GUARD, task).await.unwrap().unwrap();
}
