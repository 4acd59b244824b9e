//! Agent profiles end to end: the daemon's listener with the per-profile behaviour built from
//! a configuration file, the fake providers, and a side channel that hands each call the
//! context a dialplan would have set. Calls to different numbers hear different greetings
//! (one of them with the caller's name in it, synthesized for that call), use their
//! profile's model, and a reload changes what new calls hear.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ai::*;
use sifucall::app;
use sifucall::call::{CallContext, CallControl, CallOutcome, CallSummary};
use sifucall::caller::{self, CallOptions, CallReport};
use sifucall::ops::admin::ReadyFlag;
use sifucall::ops::config::Settings;
use sifucall::ops::metrics::Metrics;
use sifucall::sandbox::{Sandbox, SandboxConfig};
use sifucall::server::{OnCallEnd, Server, ServerHandle};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const RATE: u32 = 8_000;

const SALES_DID: &str = "+60 3-1234 5678";
const SUPPORT_DID: &str = "60312340000";
const SALES_GREETING: &str =
    "Terima kasih kerana menghubungi jabatan jualan kami, {caller_name|tuan}.";
const SUPPORT_GREETING: &str = "Sokongan teknikal.";

/// What the PBX would say about each call: the context the dialplan set, by UUID.
#[derive(Debug, Default)]
struct Dialplan {
    contexts: Mutex<HashMap<Uuid, CallContext>>,
}

impl Dialplan {
    fn set(&self, id: Uuid, did: &str, caller_name: Option<&str>, profile: Option<&str>) {
        let ctx = CallContext {
            caller_number: Some("0123456789".into()),
            caller_name: caller_name.map(str::to_owned),
            did: Some(did.into()),
            profile: profile.map(str::to_owned),
            ..CallContext::default()
        };
        self.contexts.lock().unwrap().insert(id, ctx);
    }
}

impl CallControl for Dialplan {
    fn context(&self, call_id: Uuid) -> futures_util::future::BoxFuture<'_, CallContext> {
        let ctx = self
            .contexts
            .lock()
            .unwrap()
            .get(&call_id)
            .cloned()
            .unwrap_or_default();
        Box::pin(async move { ctx })
    }

    fn decide(
        &self,
        _call_id: Uuid,
        _outcome: CallOutcome,
    ) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

fn config_text(sales_greeting: &str) -> String {
    format!(
        r#"
[audiosocket]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[agent]
mode = "ai"
greeting = "{GREETING}"
apology = "{APOLOGY}"
hold_after_ms = 5000
speculate_after_ms = 0

[profiles.sales]
greeting = "{sales_greeting}"
llm_model = "sales/model"
tts_model = "eleven_turbo_v2_5"

[profiles.support]
greeting = "{SUPPORT_GREETING}"
llm_model = "support/model"

[routing]
dids = {{ "60312345678" = "sales", "6031234*" = "support" }}
"#
    )
}

fn write_config(dir: &std::path::Path, sales_greeting: &str) -> PathBuf {
    let path = dir.join("sifucall.toml");
    std::fs::write(&path, config_text(sales_greeting)).unwrap();
    path
}

/// The listener as `app::run` builds it, with `dialplan` as its side channel.
struct Daemon {
    sandbox: Sandbox,
    addr: SocketAddr,
    server: ServerHandle,
    metrics: Arc<Metrics>,
    dialplan: Arc<Dialplan>,
    summaries: mpsc::UnboundedReceiver<CallSummary>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn load(path: &std::path::Path, sandbox: &Sandbox) -> Settings {
    let mut s = Settings::load_from(Some(path), std::iter::empty()).expect("valid config");
    sandbox.point(&mut s);
    s
}

async fn start(sandbox: SandboxConfig, path: &std::path::Path) -> (Daemon, Settings) {
    let sandbox = Sandbox::start(sandbox).await.expect("fakes start");
    let settings = load(path, &sandbox).await;
    let metrics = Arc::new(Metrics::new());
    let behaviour = app::behaviour(&settings, &metrics)
        .await
        .expect("profiles build");
    let dialplan = Arc::new(Dialplan::default());
    let mut cfg = app::server_config(&settings, behaviour);
    cfg.session.control = Arc::clone(&dialplan) as Arc<dyn CallControl>;
    let server = Server::new(cfg, Arc::clone(&metrics), ReadyFlag::new());
    let handle = server.handle();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, summaries) = mpsc::unbounded_channel();
    let on_end: OnCallEnd = Arc::new(move |s| {
        let _ = tx.send(s);
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(listener, Some(on_end), shutdown.clone()));
    let d = Daemon {
        sandbox,
        addr,
        server: handle,
        metrics,
        dialplan,
        summaries,
        shutdown,
        task,
    };
    (d, settings)
}

impl Daemon {
    /// A call that stays silent long enough to hear `greeting` whole, then hangs up.
    async fn call(&self, id: Uuid, greeting: &str) -> CallReport {
        let mut c = CallOptions::new(self.addr.to_string());
        c.call_id = id;
        c.until_server_hangup = true;
        c.hangup_after = Some(Duration::from_millis(speech_ms(greeting, RATE) + 2_500));
        tokio::time::timeout(CALL_GUARD, caller::place_call(c))
            .await
            .expect("call ends within the guard")
            .expect("call placed")
    }

    /// The summaries of `n` calls, by call id.
    async fn summaries(&mut self, n: usize) -> HashMap<Uuid, CallSummary> {
        let mut out = HashMap::new();
        while out.len() < n {
            let s = tokio::time::timeout(Duration::from_secs(10), self.summaries.recv())
                .await
                .expect("the daemon reports the call")
                .expect("daemon alive");
            out.insert(s.call_id.expect("a call"), s);
        }
        out
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sifucall-profiles-it-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The agent's first line and what the caller heard of it.
#[track_caller]
fn assert_greeted(summary: &CallSummary, report: &CallReport, profile: &str, greeting: &str) {
    assert_clean(report);
    assert_eq!(summary.profile, profile);
    let agent = agent(summary);
    let first = agent_lines(&agent)
        .first()
        .map(|l| l.text.clone())
        .unwrap_or_default();
    assert_eq!(first, greeting, "{profile}: {summary:?}");
    assert_heard_all(
        loud_samples(&report.recording),
        expected_loud(greeting, RATE),
        &format!("the {profile} greeting"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_different_numbers_hear_their_profiles_greeting() {
    let dir = scratch("routing");
    let path = write_config(&dir, SALES_GREETING);
    let (mut d, _) = start(fast_sandbox(), &path).await;
    let sales_heard = "Terima kasih kerana menghubungi jabatan jualan kami, Aminah.";

    let (sales, support, asked, unknown) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    d.dialplan.set(sales, SALES_DID, Some("Aminah"), None);
    d.dialplan.set(support, SUPPORT_DID, None, None);
    // The dialplan's choice wins over the number's rule; a name it gets wrong gets the default.
    d.dialplan
        .set(asked, SALES_DID, Some("Aminah"), Some("support"));
    d.dialplan.set(unknown, SUPPORT_DID, None, Some("nosuch"));
    let (r_sales, r_support) = tokio::join!(
        d.call(sales, sales_heard),
        d.call(support, SUPPORT_GREETING)
    );
    let (r_asked, r_unknown) =
        tokio::join!(d.call(asked, SUPPORT_GREETING), d.call(unknown, GREETING));
    let s = d.summaries(4).await;

    assert_greeted(&s[&sales], &r_sales, "sales", sales_heard);
    assert_greeted(&s[&support], &r_support, "support", SUPPORT_GREETING);
    assert_greeted(&s[&asked], &r_asked, "support", SUPPORT_GREETING);
    assert_greeted(&s[&unknown], &r_unknown, "default", GREETING);
    assert!(
        expected_loud(sales_heard, RATE) > 2 * expected_loud(SUPPORT_GREETING, RATE),
        "the greetings are told apart by their length"
    );

    // The sales greeting went to TTS with the caller's name, with the profile's model; the
    // fixed ones were cached at startup and not synthesized again for the calls.
    let sessions = d.sandbox.elevenlabs.stats().recorded_sessions();
    let text_of = |s: &sifucall::sandbox::elevenlabs::RecordedWsSession| -> String {
        s.messages
            .iter()
            .filter_map(|m| m.get("text").and_then(|t| t.as_str()))
            .collect()
    };
    let named: Vec<_> = sessions
        .iter()
        .filter(|s| text_of(s).contains("Aminah"))
        .collect();
    assert_eq!(
        named.len(),
        1,
        "for the one call that ran the sales profile"
    );
    assert!(
        named
            .iter()
            .all(|s| s.query.get("model_id").map(String::as_str) == Some("eleven_turbo_v2_5")),
        "{:?}",
        named.iter().map(|s| &s.query).collect::<Vec<_>>()
    );
    let support_synths = sessions
        .iter()
        .filter(|s| text_of(s).contains(SUPPORT_GREETING))
        .count();
    assert_eq!(support_synths, 2, "cached at 8 and 16 kHz, once each");
    let _ = std::fs::remove_dir_all(&dir);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_profile_talks_to_its_own_model() {
    let dir = scratch("models");
    let path = write_config(&dir, SUPPORT_GREETING);
    let mut sandbox = fast_sandbox();
    sandbox.azure.transcripts = vec![QUESTION.into()];
    let (mut d, _) = start(sandbox, &path).await;
    let mut models = Vec::new();
    for (did, want) in [(SALES_DID, "sales/model"), (SUPPORT_DID, "support/model")] {
        let id = Uuid::new_v4();
        d.dialplan.set(id, did, None, None);
        let mut c = CallOptions::new(d.addr.to_string());
        c.call_id = id;
        c.lead_silence = Duration::from_millis(speech_ms(SUPPORT_GREETING, RATE) + 300);
        c.play = phrase_8k();
        c.until_server_hangup = true;
        c.hangup_after =
            Some(c.lead_silence + Duration::from_millis(samples_ms(c.play.len(), RATE) + 3_000));
        let report = tokio::time::timeout(CALL_GUARD, caller::place_call(c))
            .await
            .expect("guard")
            .expect("placed");
        assert_clean(&report);
        d.summaries(1).await;
        let requests = d.sandbox.openrouter.requests();
        let last = requests.last().expect("the question reached the model");
        models.push(last["model"].as_str().unwrap_or_default().to_owned());
        assert_eq!(models.last().unwrap(), want);
    }
    let _ = std::fs::remove_dir_all(&dir);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_greeting_for_new_calls_and_keeps_the_side_channel() {
    let dir = scratch("reload");
    let path = write_config(&dir, "Jualan, versi satu.");
    let (mut d, current) = start(fast_sandbox(), &path).await;
    let first = Uuid::new_v4();
    d.dialplan.set(first, SALES_DID, None, None);
    let r1 = d.call(first, "Jualan, versi satu.").await;
    let s1 = d.summaries(1).await;
    assert_greeted(&s1[&first], &r1, "sales", "Jualan, versi satu.");

    // What SIGHUP does: re-read the file as startup did, then apply it.
    write_config(&dir, "Jualan, versi dua yang lebih panjang sedikit.");
    let new = load(&path, &d.sandbox).await;
    let changed = app::apply_reload(&current, &new, &d.server, &d.metrics)
        .await
        .expect("the new file works");
    assert!(changed.iter().any(|k| k == "profiles.sales"), "{changed:?}");

    let second = Uuid::new_v4();
    d.dialplan.set(second, SALES_DID, None, None);
    let r2 = d
        .call(second, "Jualan, versi dua yang lebih panjang sedikit.")
        .await;
    let s2 = d.summaries(1).await;
    assert_greeted(
        &s2[&second],
        &r2,
        "sales",
        "Jualan, versi dua yang lebih panjang sedikit.",
    );
    let _ = std::fs::remove_dir_all(&dir);
    d.stop().await;
}

/// First-audio latency of a cached greeting against one with a variable (synthesized per
/// call, streamed into the playout), with the realistic fakes (TTS first audio 150 ms, then 2x real time). A figure,
/// not a test: `cargo test --test profiles -- --ignored --nocapture greeting_latency`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn greeting_latency_figures() {
    let dir = scratch("latency");
    let path = write_config(&dir, SALES_GREETING);
    let (mut d, _) = start(SandboxConfig::realistic(), &path).await;
    let heard = "Terima kasih kerana menghubungi jabatan jualan kami, Aminah.";
    let mut cached = Vec::new();
    let mut per_call = Vec::new();
    for _ in 0..5 {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        d.dialplan.set(a, SALES_DID, Some("Aminah"), None);
        d.dialplan.set(b, SUPPORT_DID, None, None);
        let ra = d.call(a, heard).await;
        let rb = d.call(b, SUPPORT_GREETING).await;
        d.summaries(2).await;
        per_call.push(ra.first_audio_latency_ms.unwrap_or(f64::NAN));
        cached.push(rb.first_audio_latency_ms.unwrap_or(f64::NAN));
    }
    println!(
        "first audio, ms: cached greeting {cached:?}; greeting with a variable ({} ms of speech) {per_call:?}",
        speech_ms(heard, RATE)
    );
    let _ = std::fs::remove_dir_all(&dir);
    d.stop().await;
}

/// `sifucall check` as an operator runs it on a file with broken profiles: exit 2, every
/// problem with its key and line; the same file with the problems fixed is OK and shows what
/// each profile sets.
#[test]
fn check_refuses_broken_profiles_with_file_and_line() {
    let dir = scratch("check");
    let path = dir.join("sifucall.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_sifucall"))
            .args(["check", "--no-bind", "--config"])
            .arg(&path)
            .env_clear()
            .envs([
                ("AZURE_SPEECH_KEY", "azure-test-key-0001"),
                ("OPENROUTER_API_KEY", "sk-or-v1-test0002"),
                ("ELEVENLABS_API_KEY", "sk_test0003"),
            ])
            .output()
            .unwrap()
    };
    let broken = r#"
[profiles.sales]
greeting = "Helo {caller}."
voice = "x"

[routing]
dids = { "60312345678" = "salse" }
"#;
    let out = check(broken);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let file = path.display().to_string();
    for needle in [
        format!("profiles.sales.greeting` (set in {file}:3)"),
        "{caller}".to_owned(),
        format!("profiles.sales.voice` (set in {file}:4)"),
        format!("routing.dids.60312345678` (set in {file}:7)"),
        "\"salse\"".to_owned(),
    ] {
        assert!(stderr.contains(&needle), "{needle}: {stderr}");
    }
    assert_eq!(
        stderr.matches("configuration error:").count(),
        3,
        "{stderr}"
    );
    let fixed = broken
        .replace("{caller}", "{caller_name}")
        .replace("voice = ", "voice_id = ")
        .replace("salse", "sales");
    let out = check(&fixed);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["profiles"]["sales"]["voice_id"], "x");
    assert_eq!(shown["routing"]["dids"]["60312345678"], "sales");
    let _ = std::fs::remove_dir_all(&dir);
}
