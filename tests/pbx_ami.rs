//! The AMI side channel against the fake Asterisk manager: a call's context read from its
//! channel by UUID, the default profile when there is none, reconnects, and the outcome set
//! on the channel before the daemon's 0x00 reaches the PBX.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{HANG_GUARD, Peer, echo_config, frame};
use futures_util::future::BoxFuture;
use sifucall::call::context::{CallContext, CallControl, CallOutcome, ContextSource};
use sifucall::ops::config::Secret;
use sifucall::pbx::ami::control::{DESTINATION_VAR, REASON_VAR, RESULT_VAR, WHISPER_VAR};
use sifucall::pbx::ami::{AmiClient, AmiConfig, AmiControl, AmiError};
use sifucall::sandbox::ami::{FakeAmi, FakeAmiFaults, FakeChannel};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn config(fake: &FakeAmi, secret: &str) -> AmiConfig {
    AmiConfig {
        host: "127.0.0.1".into(),
        port: fake.addr().port(),
        username: fake.username().into(),
        secret: Secret::new(Some(secret.into())),
        tls: false,
        tls_ca_file: None,
        // A hang guard here; the call's own deadlines (300 ms, 500 ms) are what bound calls.
        action_timeout: HANG_GUARD,
        reconnect_max: Duration::from_millis(200),
    }
}

async fn control(fake: &FakeAmi) -> Arc<AmiControl> {
    let client = AmiClient::start(config(fake, fake.secret()), CancellationToken::new());
    assert!(client.wait_up(HANG_GUARD).await, "logged in to the fake");
    Arc::new(AmiControl::new(client))
}

fn call_channel(name: &str, id: Uuid) -> FakeChannel {
    FakeChannel::new(name, "60312345678", "2000").var("SIFUCALL_UUID", &id.to_string())
}

/// Places a call with this UUID: the UUID, one audio frame, then silence.
async fn dial(addr: std::net::SocketAddr, id: Uuid) -> Peer {
    let mut peer = Peer::connect(addr).await;
    peer.send(&frame(0x01, id.as_bytes())).await;
    peer.send(&frame(0x10, &[0u8; 320])).await;
    peer
}

/// Waits for the daemon's 0x00; panics if the connection closes without one.
async fn until_hangup(peer: &mut Peer) {
    loop {
        match peer.next_frame().await {
            Some(f) if f.kind == 0x00 => return,
            Some(_) => {}
            None => panic!("closed without a hangup frame"),
        }
    }
}

#[tokio::test]
async fn the_context_is_read_by_uuid_through_the_daemon() {
    let fake = FakeAmi::start("sifucall", "s3cret").await.unwrap();
    let id = Uuid::new_v4();
    fake.add_channel(
        FakeChannel::new("PJSIP/other-00000001", "111", "100")
            .var("SIFUCALL_UUID", &Uuid::new_v4().to_string()),
    );
    // A channel that inherited the UUID (e.g. a Local channel) but is not running AudioSocket.
    let mut inherited = call_channel("Local/2000@x-00000002;2", id);
    inherited.application = "Dial".into();
    fake.add_channel(inherited);
    let mut ch = call_channel("PJSIP/trunk-00000012", id)
        .var("FROM_DID", "0380001234")
        .var("SIFUCALL_PROFILE", "sales")
        .var("SIFUCALL_VAR_ACCOUNT", "A-17")
        .var("MIKO_UNRELATED", "x");
    ch.caller_name = "Ali".into();
    fake.add_channel(ch);

    let mut cfg = echo_config();
    cfg.session.control = control(&fake).await;
    cfg.session.idle_hangup = Some(Duration::from_millis(300));
    let mut daemon = common::start(cfg).await;
    let mut peer = dial(daemon.addr, id).await;
    until_hangup(&mut peer).await;
    let s = daemon.next_summary().await;
    let c = s.context;
    assert_eq!(c.source, ContextSource::Ami);
    assert_eq!(c.channel.as_deref(), Some("PJSIP/trunk-00000012"));
    assert_eq!(c.caller_number.as_deref(), Some("60312345678"));
    assert_eq!(c.caller_name.as_deref(), Some("Ali"));
    assert_eq!(c.did.as_deref(), Some("0380001234"));
    assert_eq!(c.profile.as_deref(), Some("sales"));
    assert_eq!(
        c.vars.into_iter().collect::<Vec<_>>(),
        [("account".to_owned(), "A-17".to_owned())]
    );
    // The echo call ended normally: the dialplan was told so on the call's channel.
    assert_eq!(
        fake.var("PJSIP/trunk-00000012", RESULT_VAR).as_deref(),
        Some("completed")
    );
    assert_eq!(fake.var("Local/2000@x-00000002;2", RESULT_VAR), None);
    peer.assert_no_violations();
}

#[tokio::test]
async fn no_channel_or_a_silent_pbx_gives_the_default_profile() {
    let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
    let ami = control(&fake).await;
    let mut cfg = echo_config();
    cfg.session.control = ami.clone();
    cfg.session.idle_hangup = Some(Duration::from_millis(300));
    let mut daemon = common::start(cfg).await;

    // No channel carries this UUID.
    let mut peer = dial(daemon.addr, Uuid::new_v4()).await;
    let first = peer.next_frame().await.expect("the call goes on");
    assert_eq!(first.kind, 0x10, "echoed audio");
    until_hangup(&mut peer).await;
    assert_eq!(daemon.next_summary().await.context, CallContext::default());

    // The PBX stops answering: the call does not wait for it beyond its deadline (nor for
    // the outcome beyond its own).
    daemon.shutdown.cancel();
    let mut cfg = echo_config();
    cfg.session.control = ami.clone();
    cfg.session.idle_hangup = Some(Duration::from_secs(2));
    let mut daemon = common::start(cfg).await;
    let id = Uuid::new_v4();
    fake.add_channel(call_channel("PJSIP/t-2", id));
    fake.set_faults(FakeAmiFaults {
        silent: true,
        ..FakeAmiFaults::default()
    });
    let mut peer = dial(daemon.addr, id).await;
    assert_eq!(
        peer.next_frame().await.expect("the call goes on").kind,
        0x10
    );
    until_hangup(&mut peer).await;
    assert_eq!(daemon.next_summary().await.context, CallContext::default());
}

#[tokio::test]
async fn the_connection_comes_back_after_the_pbx_drops_it() {
    let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
    let id = Uuid::new_v4();
    fake.add_channel(call_channel("PJSIP/t-1", id));
    let ami = control(&fake).await;
    assert_eq!(ami.client().logins(), 1);
    assert!(ami.lookup(id).await.unwrap().is_some());

    fake.drop_connections();
    let guard = Instant::now() + HANG_GUARD;
    while ami.client().logins() < 2 {
        assert!(Instant::now() < guard, "reconnected within the guard");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ami.client().wait_up(HANG_GUARD).await);
    let c = ami
        .lookup(id)
        .await
        .unwrap()
        .expect("found after reconnecting");
    assert_eq!(c.channel.as_deref(), Some("PJSIP/t-1"));
    assert_eq!(fake.logins(), (2, 0));
}

#[tokio::test]
async fn a_wrong_secret_never_logs_in_and_actions_fail_at_once() {
    let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
    let client = AmiClient::start(config(&fake, "wrong"), CancellationToken::new());
    let guard = Instant::now() + HANG_GUARD;
    while fake.logins().1 < 2 {
        assert!(Instant::now() < guard, "login retried within the guard");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!client.is_up());
    let ami = AmiControl::new(client);
    assert_eq!(
        ami.lookup(Uuid::new_v4()).await,
        Err(AmiError::NotConnected)
    );
    assert_eq!(fake.logins().0, 0);
}

#[tokio::test]
async fn interleaved_events_do_not_mix_up_concurrent_lookups() {
    let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
    fake.set_faults(FakeAmiFaults {
        chatter: true,
        ..FakeAmiFaults::default()
    });
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        fake.add_channel(
            call_channel(&format!("PJSIP/t-{i}"), *id).var("FROM_DID", &format!("{i}")),
        );
    }
    let ami = control(&fake).await;
    let lookups = ids.iter().map(|id| {
        let ami = Arc::clone(&ami);
        let id = *id;
        tokio::spawn(async move { ami.lookup(id).await })
    });
    let got = futures_util::future::join_all(lookups).await;
    for (i, r) in got.into_iter().enumerate() {
        let c = r.unwrap().unwrap().unwrap();
        assert_eq!(c.channel, Some(format!("PJSIP/t-{i}")));
        assert_eq!(c.did, Some(format!("{i}")));
    }
}

/// The real AMI control with the outcome chosen by the test: the call core decides only
/// `completed` today (other outcomes come from the agent's tools).
#[derive(Debug)]
struct Decides {
    outcome: CallOutcome,
    inner: Arc<dyn CallControl>,
}

impl CallControl for Decides {
    fn context(&self, call_id: Uuid) -> BoxFuture<'_, CallContext> {
        self.inner.context(call_id)
    }
    fn decide(&self, call_id: Uuid, _outcome: CallOutcome) -> BoxFuture<'_, ()> {
        self.inner.decide(call_id, self.outcome.clone())
    }
}

fn every_outcome() -> Vec<CallOutcome> {
    vec![
        CallOutcome::Completed,
        CallOutcome::Transferred {
            target: "sales".into(),
            destination: "201".into(),
            summary: None,
        },
        CallOutcome::Transferred {
            target: "support".into(),
            destination: "queue-support".into(),
            summary: Some("Caller wants a refund for order 17.".into()),
        },
        CallOutcome::Fallback {
            reason: "provider_failures".into(),
            destination: "200".into(),
        },
        CallOutcome::Abandoned,
        CallOutcome::Refused {
            reason: "not_ready".into(),
        },
        CallOutcome::Error {
            detail: "protocol".into(),
        },
    ]
}

#[tokio::test]
async fn each_outcome_is_on_the_channel_before_the_hangup_frame() {
    let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
    let ami = control(&fake).await;
    for (i, outcome) in every_outcome().into_iter().enumerate() {
        let id = Uuid::new_v4();
        let channel = format!("PJSIP/trunk-{i:08}");
        fake.add_channel(call_channel(&channel, id));
        let mut cfg = echo_config();
        cfg.session.control = Arc::new(Decides {
            outcome: outcome.clone(),
            inner: ami.clone(),
        });
        cfg.session.idle_hangup = Some(Duration::from_millis(200));
        let mut daemon = common::start(cfg).await;
        let mut peer = dial(daemon.addr, id).await;
        until_hangup(&mut peer).await;
        // The 0x00 has arrived: the dialplan would run now and must see the outcome.
        assert_eq!(
            fake.var(&channel, RESULT_VAR).as_deref(),
            Some(outcome.dialplan_value()),
            "{outcome:?}"
        );
        assert_eq!(
            fake.var(&channel, DESTINATION_VAR).unwrap_or_default(),
            outcome.destination().unwrap_or(""),
        );
        let whisper = fake.var(&channel, WHISPER_VAR).unwrap_or_default();
        let warm = matches!(
            &outcome,
            CallOutcome::Transferred {
                summary: Some(_),
                ..
            }
        );
        assert_eq!(!whisper.is_empty(), warm, "{outcome:?}");
        let set: Vec<String> = fake
            .setvars()
            .into_iter()
            .filter(|(c, _, _)| *c == channel)
            .map(|(_, v, _)| v)
            .collect();
        assert_eq!(
            set.last().map(String::as_str),
            Some(RESULT_VAR),
            "result last"
        );
        daemon.next_summary().await;
        daemon.shutdown.cancel();
    }
}

#[tokio::test]
async fn over_capacity_is_told_to_the_dialplan_before_the_hangup_frame() {
    let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
    let ami = control(&fake).await;
    let (busy, refused) = (Uuid::new_v4(), Uuid::new_v4());
    fake.add_channel(call_channel("PJSIP/t-busy", busy));
    fake.add_channel(call_channel("PJSIP/t-refused", refused));
    let mut cfg = echo_config();
    cfg.max_calls = 1;
    cfg.session.control = ami;
    let daemon = common::start(cfg).await;
    let mut first = dial(daemon.addr, busy).await;
    assert_eq!(
        first.next_frame().await.unwrap().kind,
        0x10,
        "first call up"
    );
    let mut second = dial(daemon.addr, refused).await;
    until_hangup(&mut second).await;
    assert_eq!(
        fake.var("PJSIP/t-refused", RESULT_VAR).as_deref(),
        Some("refused")
    );
    assert_eq!(
        fake.var("PJSIP/t-refused", REASON_VAR).as_deref(),
        Some("over_capacity")
    );
    assert_eq!(fake.var("PJSIP/t-busy", RESULT_VAR), None);
}

#[tokio::test]
async fn a_renamed_channel_is_found_again_for_the_outcome() {
    let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
    let ami = control(&fake).await;
    let id = Uuid::new_v4();
    fake.add_channel(call_channel("PJSIP/t-1", id));
    assert!(ami.lookup(id).await.unwrap().is_some());
    fake.rename_channel("PJSIP/t-1", "PJSIP/t-1<MASQ>");
    ami.tell(id, &CallOutcome::Completed).await.unwrap();
    assert_eq!(
        fake.var("PJSIP/t-1<MASQ>", RESULT_VAR).as_deref(),
        Some("completed")
    );
    // Gone altogether: an error, never a hang.
    fake.remove_channel("PJSIP/t-1<MASQ>");
    assert!(ami.tell(id, &CallOutcome::Completed).await.is_err());
}

#[tokio::test]
async fn tls_with_the_pbx_certificate_authority() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ami_tls");
    let fake = FakeAmi::start_tls(
        "sifucall",
        "pw",
        &std::fs::read(format!("{dir}/cert.pem")).unwrap(),
        &std::fs::read(format!("{dir}/key.pem")).unwrap(),
    )
    .await
    .unwrap();
    let id = Uuid::new_v4();
    fake.add_channel(call_channel("PJSIP/t-1", id));
    let mut cfg = config(&fake, "pw");
    cfg.tls = true;
    cfg.tls_ca_file = Some(format!("{dir}/ca.pem").into());
    let client = AmiClient::start(cfg.clone(), CancellationToken::new());
    assert!(client.wait_up(HANG_GUARD).await, "TLS login");
    let c = AmiControl::new(client).lookup(id).await.unwrap().unwrap();
    assert_eq!(c.channel.as_deref(), Some("PJSIP/t-1"));

    // Without the PBX's CA the certificate is not trusted: never logged in.
    cfg.tls_ca_file = None;
    let untrusted = AmiClient::start(cfg, CancellationToken::new());
    let (logins, accepted) = (fake.logins().0, fake.accepted());
    let guard = Instant::now() + HANG_GUARD;
    while fake.accepted() < accepted + 2 {
        assert!(Instant::now() < guard, "retried within the guard");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!untrusted.is_up());
    assert_eq!(
        fake.logins().0,
        logins,
        "no login over an untrusted connection"
    );
}

#[tokio::test]
async fn the_daemons_control_waits_for_both_sides_in_any_order() {
    use sifucall::pbx::PbxControl;
    use sifucall::pbx::http::CallRegistry;
    let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
    let registry = CallRegistry::new();
    let pbx = PbxControl::new(Arc::clone(&registry), Some(control(&fake).await));
    // The manager answers after the wait for a registration is over, and finds nothing.
    fake.set_faults(FakeAmiFaults {
        delay: sifucall::pbx::http::REGISTRATION_WAIT * 2,
        ..FakeAmiFaults::default()
    });
    assert_eq!(pbx.context(Uuid::new_v4()).await, CallContext::default());
    // A channel found by AMI.
    let id = Uuid::new_v4();
    fake.add_channel(call_channel("PJSIP/t-9", id));
    assert_eq!(pbx.context(id).await.source, ContextSource::Ami);
    // A registration present wins without asking the manager.
    let id = Uuid::new_v4();
    registry
        .register(
            id,
            CallContext {
                source: ContextSource::Http,
                ..CallContext::default()
            },
        )
        .unwrap();
    let asked = fake.actions().len();
    assert_eq!(pbx.context(id).await.source, ContextSource::Http);
    assert_eq!(fake.actions().len(), asked);
}

/// Context lookup and decision times against the fake (50 other channels up): figures for the report,
/// printed, never asserted. `cargo test --test pbx_ami lookup_figures -- --nocapture`
#[tokio::test]
async fn lookup_figures() {
    let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
    for i in 0..50 {
        fake.add_channel(call_channel(&format!("PJSIP/busy-{i}"), Uuid::new_v4()));
    }
    let ami = control(&fake).await;
    let (mut lookups, mut decisions) = (Vec::new(), Vec::new());
    for i in 0..200 {
        let id = Uuid::new_v4();
        let name = format!("PJSIP/call-{i}");
        fake.add_channel(call_channel(&name, id).var("SIFUCALL_VAR_X", "1"));
        let t = Instant::now();
        let c = ami.context(id).await;
        lookups.push(t.elapsed());
        assert_eq!(c.channel.as_deref(), Some(name.as_str()));
        let t = Instant::now();
        ami.decide(id, CallOutcome::Completed).await;
        decisions.push(t.elapsed());
        assert_eq!(fake.var(&name, RESULT_VAR).as_deref(), Some("completed"));
        fake.remove_channel(&name);
    }
    for (what, mut times) in [
        ("context lookup (2 Status actions, 51 channels)", lookups),
        ("decision (4 Setvar actions)", decisions),
    ] {
        times.sort();
        let pct = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
        eprintln!(
            "AMI {what}: n={} p50={:?} p99={:?} max={:?}",
            times.len(),
            pct(50),
            pct(99),
            times[times.len() - 1]
        );
    }
}
