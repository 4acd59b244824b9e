//! The func_curl side channel through the whole daemon (`app::run`): a call's context
//! registered over HTTP before the call, its outcome read after it, and the bearer-token
//! rules (open on loopback without a token; a token required whenever one is set; no
//! start beyond loopback without one, and `sifucall check` says so).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use common::{HANG_GUARD, Peer, frame};
use sifucall::app::{self, Hooks, StartError};
use sifucall::call::CallSummary;
use sifucall::call::context::ContextSource;
use sifucall::ops::config::{AgentMode, Secret, Settings};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Daemon {
    audiosocket: SocketAddr,
    admin: String,
    shutdown: CancellationToken,
    summaries: mpsc::UnboundedReceiver<CallSummary>,
}

fn settings(admin: &str, token: Option<&str>) -> Settings {
    let mut s = Settings::defaults();
    s.agent.mode = AgentMode::Echo;
    s.agent.idle_hangup_secs = 1;
    s.audiosocket.listen = "127.0.0.1:0".parse().unwrap();
    s.admin.listen = admin.parse().unwrap();
    s.secrets.admin_token = Secret::new(token.map(str::to_owned));
    s
}

async fn start(s: Settings) -> Result<Daemon, StartError> {
    let shutdown = CancellationToken::new();
    let (bound_tx, bound_rx) = oneshot::channel();
    let (tx, summaries) = mpsc::unbounded_channel();
    let hooks = Hooks {
        on_bound: Some(bound_tx),
        on_call_end: Some(Arc::new(move |s: CallSummary| {
            let _ = tx.send(s);
        })),
    };
    let task = tokio::spawn(app::run(s, shutdown.clone(), hooks));
    match tokio::time::timeout(HANG_GUARD, bound_rx).await.unwrap() {
        Ok(b) => Ok(Daemon {
            audiosocket: b.audiosocket,
            admin: format!("http://127.0.0.1:{}", b.admin.port()),
            shutdown,
            summaries,
        }),
        Err(_) => Err(task.await.unwrap().expect_err("no start without an error")),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HANG_GUARD)
        .build()
        .unwrap()
}

/// What `CURL(url,postdata)` sends: a form body; with `CURLOPT(httpheader)` set, Asterisk
/// drops its default Content-Type.
async fn register(d: &Daemon, id: Uuid, body: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = http()
        .post(format!("{}/calls/{id}/context", d.admin))
        .body(body.to_owned());
    if let Some(t) = token {
        r = r.header("Authorization", format!("Bearer {t}"));
    }
    r.send().await.unwrap()
}

async fn get(d: &Daemon, path: &str, token: Option<&str>) -> (u16, String) {
    let mut r = http().get(format!("{}{path}", d.admin));
    if let Some(t) = token {
        r = r.header("Authorization", format!("Bearer {t}"));
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn call_until_hangup(addr: SocketAddr, id: Uuid) {
    let mut peer = Peer::connect(addr).await;
    peer.send(&frame(0x01, id.as_bytes())).await;
    peer.send(&frame(0x10, &[0u8; 320])).await;
    loop {
        match peer.next_frame().await {
            Some(f) if f.kind == 0 => break,
            Some(_) => {}
            None => panic!("closed without a hangup frame"),
        }
    }
}

#[tokio::test]
async fn on_loopback_a_registration_needs_no_token_and_the_outcome_comes_back() {
    let mut d = start(settings("127.0.0.1:0", None)).await.unwrap();
    let id = Uuid::new_v4();
    let r = register(
        &d,
        id,
        "caller_number=%2B60312345678&caller_name=Ali%20Baba&did=0380001234&channel=PJSIP%2Ftrunk-00000012&profile=sales&var_account=A-17",
        None,
    )
    .await;
    assert_eq!(r.status(), 204);
    call_until_hangup(d.audiosocket, id).await;
    // AudioSocket() has returned: the dialplan asks how the call ended.
    let (status, body) = get(&d, &format!("/calls/{id}/outcome"), None).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "result=completed&destination=&reason=&whisper=")
    );
    assert_eq!(
        get(&d, &format!("/calls/{id}/outcome/result"), None).await,
        (200, "completed".to_owned())
    );
    assert_eq!(
        get(&d, &format!("/calls/{id}/outcome/destination"), None).await,
        (200, String::new())
    );
    let s = tokio::time::timeout(HANG_GUARD, d.summaries.recv())
        .await
        .unwrap()
        .unwrap();
    let c = s.context;
    assert_eq!(c.source, ContextSource::Http);
    assert_eq!(c.caller_number.as_deref(), Some("+60312345678"));
    assert_eq!(c.caller_name.as_deref(), Some("Ali Baba"));
    assert_eq!(c.did.as_deref(), Some("0380001234"));
    assert_eq!(c.profile.as_deref(), Some("sales"));
    assert_eq!(c.vars.get("account").map(String::as_str), Some("A-17"));

    // A call nobody decided, a bad body, a bad UUID.
    let (status, body) = get(&d, &format!("/calls/{}/outcome", Uuid::new_v4()), None).await;
    assert_eq!((status, body.as_str()), (404, "result=unknown"));
    assert_eq!(
        register(&d, Uuid::new_v4(), "colour=blue", None)
            .await
            .status(),
        400
    );
    let r = http()
        .post(format!("{}/calls/not-a-uuid/context", d.admin))
        .body("did=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // JSON works too.
    let r = http()
        .post(format!("{}/calls/{}/context", d.admin, Uuid::new_v4()))
        .json(&serde_json::json!({"did": "123", "var_x": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    d.shutdown.cancel();
}

#[tokio::test]
async fn beyond_loopback_the_daemon_will_not_start_without_a_token() {
    let Err(e) = start(settings("0.0.0.0:0", None)).await else {
        panic!("started on 0.0.0.0 without a token");
    };
    let text = e.to_string();
    assert!(matches!(e, StartError::Config(_)), "{text}");
    assert!(text.contains("SIFUCALL_ADMIN_TOKEN"), "{text}");
}

#[tokio::test]
async fn with_a_token_every_calls_route_needs_it() {
    for listen in ["0.0.0.0:0", "127.0.0.1:0"] {
        let d = start(settings(listen, Some("t0ken-abc"))).await.unwrap();
        let id = Uuid::new_v4();
        assert_eq!(
            register(&d, id, "did=1", None).await.status(),
            401,
            "{listen}"
        );
        assert_eq!(register(&d, id, "did=1", Some("wrong")).await.status(), 401);
        assert_eq!(
            register(&d, id, "did=1", Some("t0ken-abc")).await.status(),
            204
        );
        assert_eq!(get(&d, &format!("/calls/{id}/outcome"), None).await.0, 401);
        assert_eq!(
            get(&d, &format!("/calls/{id}/outcome"), Some("t0ken-abc"))
                .await
                .0,
            404,
            "authorised, not decided yet"
        );
        // Health and metrics stay open.
        assert_eq!(get(&d, "/healthz", None).await, (200, "ok".to_owned()));
        d.shutdown.cancel();
    }
}

#[test]
fn check_refuses_an_open_admin_address_without_a_token() {
    let run = |extra: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sifucall"));
        cmd.env_clear()
            .args(["check", "--no-bind"])
            .env("SIFUCALL_AGENT__MODE", "echo")
            .env("SIFUCALL_ADMIN__LISTEN", "0.0.0.0:9099");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let o = run(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("admin.listen") && err.contains("SIFUCALL_ADMIN_TOKEN"),
        "{err}"
    );
    let o = run(&[("SIFUCALL_ADMIN_TOKEN", "abc")]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The token is never printed.
    assert!(!String::from_utf8_lossy(&o.stdout).contains("abc\""));
}

#[test]
fn preflight_wants_the_ami_secret_when_ami_is_on() {
    use sifucall::ops::config::Preflight;
    let mut s = settings("127.0.0.1:0", None);
    s.ami.enabled = true;
    let problems = s.preflight(Preflight {
        keys: true,
        bind: false,
    });
    assert!(
        problems
            .iter()
            .any(|p| p.contains("ami.enabled") && p.contains("SIFUCALL_AMI_SECRET")),
        "{problems:?}"
    );
    s.secrets.ami_secret = Secret::new(Some("pw".into()));
    assert!(
        s.preflight(Preflight {
            keys: true,
            bind: false
        })
        .is_empty()
    );
}

#[test]
fn secret_variables_named_by_settings_are_not_mistaken_for_overrides() {
    let env = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<Vec<_>>()
    };
    assert!(
        Settings::load_from(
            None,
            env(&[("SIFUCALL_ADMIN_TOKEN", "x"), ("SIFUCALL_AMI_SECRET", "y")])
        )
        .is_ok()
    );
    let e = Settings::load_from(None, env(&[("SIFUCALL_AGENT_MODE", "echo")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SIFUCALL_AGENT_MODE") && e.contains("two underscores"),
        "{e}"
    );
}
