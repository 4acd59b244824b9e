//! The warm transfer's whisper leg on the daemon: after a transfer with a summary, a
//! connection with the call's whisper UUID hears the summary (synthesized by the TTS
//! provider, here the fake ElevenLabs) and gets 0x00; it is not taken for a new call.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{HANG_GUARD, Peer, echo_config, frame, samples};
use sifucall::call::context::{CallControl, CallOutcome};
use sifucall::ops::config::{AgentMode, Settings};
use sifucall::ops::metrics::Metrics;
use sifucall::pbx::PbxControl;
use sifucall::pbx::ami::control::whisper_uuid;
use sifucall::pbx::http::CallRegistry;
use sifucall::sandbox::{Sandbox, SandboxConfig};
use uuid::Uuid;

fn transfer(summary: &str) -> CallOutcome {
    CallOutcome::Transferred {
        target: "sales".into(),
        destination: "201".into(),
        summary: Some(summary.into()),
    }
}

/// Reads the leg to its end: (audio samples, whether it ended with 0x00).
async fn listen(peer: &mut Peer) -> (Vec<i16>, bool) {
    let mut pcm = Vec::new();
    while let Some(f) = peer.next_frame().await {
        if f.kind == 0 {
            return (pcm, true);
        }
        pcm.extend(samples(&f));
    }
    (pcm, false)
}

#[tokio::test]
async fn the_person_hears_the_summary_then_the_leg_ends() {
    let sandbox = Sandbox::start(SandboxConfig::default()).await.unwrap();
    let mut settings = Settings::defaults();
    settings.agent.mode = AgentMode::Ai;
    sandbox.point(&mut settings);
    let behaviour = sifucall::app::behaviour(&settings, &Arc::new(Metrics::new()))
        .await
        .unwrap();
    let control = Arc::new(PbxControl::new(CallRegistry::new(), None));
    let mut cfg = echo_config();
    cfg.session.behaviour = behaviour;
    cfg.session.control = control.clone();
    let mut daemon = common::start(cfg).await;

    // The call was transferred with a summary (what the driver does before its 0x00).
    let call = Uuid::new_v4();
    control
        .decide(
            call,
            transfer("Encik Ali mahu bayaran balik untuk pesanan tujuh belas."),
        )
        .await;

    // The person answers; Dial's U() connects their channel with the whisper UUID.
    let mut person = Peer::connect(daemon.addr).await;
    person
        .send(&frame(0x01, whisper_uuid(call).as_bytes()))
        .await;
    person.send(&frame(0x10, &[0u8; 320])).await;
    let (pcm, hung_up) = listen(&mut person).await;
    assert!(hung_up, "the leg ends with 0x00");
    assert!(
        pcm.iter().any(|s| *s != 0),
        "the summary was spoken ({} samples)",
        pcm.len()
    );
    person.assert_no_violations();

    // Taken once: the same UUID again is an ordinary call (an agent greeting), not a leg.
    assert_eq!(control.whisper(whisper_uuid(call)), None);
    // No call summary for the leg: it was not a call.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), daemon.summaries.recv())
            .await
            .is_err()
    );
    daemon.shutdown.cancel();
}

#[tokio::test]
async fn in_echo_mode_the_leg_ends_at_once_without_a_slot() {
    let control = Arc::new(PbxControl::new(CallRegistry::new(), None));
    let mut cfg = echo_config();
    cfg.max_calls = 1;
    cfg.session.control = control.clone();
    let daemon = common::start(cfg).await;
    // The one call slot is taken by a running call.
    let mut busy = Peer::connect(daemon.addr).await;
    busy.send(&frame(0x01, Uuid::new_v4().as_bytes())).await;
    busy.send(&frame(0x10, &[0u8; 320])).await;
    assert_eq!(busy.next_frame().await.unwrap().kind, 0x10);

    let call = Uuid::new_v4();
    control.decide(call, transfer("Wants a refund.")).await;
    let mut person = Peer::connect(daemon.addr).await;
    person
        .send(&frame(0x01, whisper_uuid(call).as_bytes()))
        .await;
    person.send(&frame(0x10, &[0u8; 320])).await;
    let (pcm, hung_up) = tokio::time::timeout(HANG_GUARD, listen(&mut person))
        .await
        .unwrap();
    assert!(hung_up);
    assert!(pcm.iter().all(|s| *s == 0), "nothing to say without TTS");
    daemon.shutdown.cancel();
}
