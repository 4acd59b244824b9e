//! The API keys never leave the daemon except in the providers' request headers: a whole AI
//! call through the real binary at `RUST_LOG=trace`, with marker keys, and none of the
//! markers may appear on stdout, stderr, in the call record or in the webhook request.
//!
//! The fakes run in this test process and require exactly the marker keys, in headers only
//! (a key in a URL or a message body is refused), so the call only succeeds if every key was
//! sent, and sent the right way.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use common::ai::*;
use sifucall::caller;
use sifucall::sandbox::Sandbox;
use tokio::net::TcpListener;

const AZURE_KEY: &str = "MARKER-AZ-5c1e7d9a42b8f06e";
const OPENROUTER_KEY: &str = "MARKER-OR-sk-or-v1-93ad0f7b2e6c1485";
const ELEVENLABS_KEY: &str = "MARKER-EL-b07e4c2d9f1a6385";
const RATE: u32 = 8_000;

/// Every key, and a distinctive piece of each (a key printed cut short still leaks).
fn needles() -> Vec<&'static str> {
    let mut v = Vec::new();
    for k in [AZURE_KEY, OPENROUTER_KEY, ELEVENLABS_KEY] {
        v.push(k);
        v.push(&k[k.len() - 12..]);
    }
    v
}

#[track_caller]
fn assert_no_key(what: &str, text: &str) {
    for n in needles() {
        if let Some(at) = text.find(n) {
            let line = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
            panic!("{what} contains a key ({n}): {}", &text[line..end]);
        }
    }
}

/// The webhook receiver: every request's headers and body, as text.
async fn webhook() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let store = Arc::clone(&store);
            async move {
                store
                    .lock()
                    .unwrap()
                    .push(format!("{headers:?}\n{}", String::from_utf8_lossy(&body)));
                "ok"
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// Reads a child's pipe to the end on a thread, line by line, into a shared buffer.
fn drain(mut pipe: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&out);
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}

/// Polls `f` until it returns `Some`, within a hang guard.
async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + CALL_GUARD;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// Without `ops::logging` running its directive through `ops::log_filter::cap_noisy_targets`,
// tungstenite's trace logging of the upgrade request prints the Azure and ElevenLabs keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_in_any_output_at_trace_level() {
    let mut fakes = fast_sandbox();
    fakes.azure.key = Some(AZURE_KEY.into());
    fakes.openrouter.key = Some(OPENROUTER_KEY.into());
    fakes.elevenlabs.key = Some(ELEVENLABS_KEY.into());
    let sandbox = Sandbox::start(fakes).await.unwrap();
    let (hook_url, hook_requests) = webhook().await;
    let dir = std::env::temp_dir().join(format!("sifucall-secrets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let records = dir.join("calls.jsonl");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sifucall"));
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "trace")
        .env("SIFUCALL_LOG__LEVEL", "trace")
        .env("SIFUCALL_AUDIOSOCKET__LISTEN", "127.0.0.1:0")
        .env("SIFUCALL_ADMIN__LISTEN", "127.0.0.1:0")
        .env("SIFUCALL_AGENT__MODE", "ai")
        .env("SIFUCALL_AGENT__GREETING", GREETING)
        .env("SIFUCALL_AGENT__APOLOGY", APOLOGY)
        .env("SIFUCALL_AGENT__HOLD_PROMPT", HOLD)
        .env("SIFUCALL_AGENT__HOLD_AFTER_MS", "5000")
        .env("SIFUCALL_STT__ENDPOINT", sandbox.azure.url())
        .env("SIFUCALL_LLM__BASE_URL", sandbox.openrouter.base_url())
        .env("SIFUCALL_TTS__BASE_URL", sandbox.elevenlabs.base_url())
        .env(
            "SIFUCALL_RECORDS__URL",
            format!("file://{}", records.display()),
        )
        .env("SIFUCALL_WEBHOOK__URL", &hook_url)
        .env("AZURE_SPEECH_KEY", AZURE_KEY)
        .env("OPENROUTER_API_KEY", OPENROUTER_KEY)
        .env("ELEVENLABS_API_KEY", ELEVENLABS_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut daemon = Daemon(cmd.spawn().expect("the daemon starts"));
    let stdout = drain(daemon.0.stdout.take().unwrap());
    let stderr = drain(daemon.0.stderr.take().unwrap());

    // The JSON "sifucall started" line names the AudioSocket address (port 0 was asked for).
    let audiosocket = wait_for("the daemon to listen", || {
        let err = stderr.lock().unwrap();
        err.lines()
            .filter(|l| l.contains("sifucall started"))
            .find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                v["audiosocket"].as_str().map(str::to_owned)
            })
    })
    .await;

    // A whole conversation: greeting, a question answered, a goodbye and the agent's hang-up.
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    t.say(&question_8k());
    t.silence_ms(speech_ms(REPLY, RATE) + 1_500);
    t.say(&goodbye_8k());
    let mut opts = caller::CallOptions::new(audiosocket);
    opts.play = t.samples.clone();
    opts.until_server_hangup = true;
    opts.hangup_after = Some(Duration::from_millis(t.ms()) + Duration::from_secs(15));
    let report = tokio::time::timeout(CALL_GUARD, caller::place_call(opts))
        .await
        .expect("the call ends within the guard")
        .expect("the call is placed");
    assert_eq!(
        report.closed_by,
        caller::ClosedBy::ServerHangup,
        "{report:?}"
    );

    let record = wait_for("the call record", || {
        std::fs::read_to_string(&records)
            .ok()
            .filter(|s| s.ends_with('\n'))
    })
    .await;
    let hook = wait_for("the webhook", || {
        let seen = hook_requests.lock().unwrap();
        (!seen.is_empty()).then(|| seen.join("\n"))
    })
    .await;

    // Stop the daemon the way systemd does, and let it flush its logs.
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe {
        libc::kill(daemon.0.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = wait_for("the daemon to exit", || daemon.0.try_wait().ok().flatten()).await;
    // The pipes close when the daemon exits; give the reader threads a moment to finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stdout = stdout.lock().unwrap().clone();
    let stderr = stderr.lock().unwrap().clone();

    // The call really used all three providers, authenticated by the marker keys...
    assert!(record.contains(REPLY), "the LLM answered: {record}");
    assert!(record.contains(AGENT_GOODBYE), "{record}");
    assert!(sandbox.azure.stats().connections >= 1);
    assert!(sandbox.elevenlabs.stats().connections() >= 1);
    // ...and the logs really were verbose, the provider clients' debug lines included.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("\"level\":\"DEBUG\"") && l.contains("sifucall::providers")),
        "no provider debug lines"
    );

    assert_no_key("stdout", &stdout);
    assert_no_key("stderr", &stderr);
    assert_no_key("the call record", &record);
    assert_no_key("the webhook request", &hook);
    let _ = std::fs::remove_dir_all(&dir);
}
