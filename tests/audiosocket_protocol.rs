#![allow(missing_docs)]
//! The daemon over TCP with raw AudioSocket bytes, as Asterisk sends them.

mod common;

use std::time::Duration;

use common::*;
use sifucall::ops::metrics::EndReason;

/// Speaks `n` 20 ms frames of a ramp at 8 kHz, paced, and returns the samples sent.
async fn speak(
    peer: &mut Peer,
    kind: u8,
    frames: usize,
    samples_per_frame: usize,
    seed: i16,
) -> Vec<i16> {
    let mut sent = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    for i in 0..frames {
        ticker.tick().await;
        let s: Vec<i16> = (0..samples_per_frame)
            .map(|j| seed.wrapping_add((i * samples_per_frame + j) as i16))
            .collect();
        peer.send(&audio_frame(kind, &s)).await;
        sent.extend(s);
    }
    sent
}

fn contains(hay: &[i16], needle: &[i16]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn echo_round_trip_8k() {
    let mut d = start(echo_config()).await;
    let mut peer = Peer::connect(d.addr).await;
    peer.send(&uuid_frame()).await;
    let sent = speak(&mut peer, 0x10, 25, 160, 1000).await;
    // Keep the line open a little so the echo drains, then hang up like Asterisk: close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut got = Vec::new();
    while let Ok(Some(f)) =
        tokio::time::timeout(Duration::from_millis(10), peer.frames.recv()).await
    {
        assert_eq!(f.kind, 0x10, "reply at the caller's rate");
        assert_eq!(f.payload.len(), 320, "20 ms frames at 8 kHz");
        got.extend(samples(&f));
    }
    let violations = std::sync::Arc::clone(&peer.violations);
    drop(peer.write);
    assert!(
        contains(&got, &sent[..1600]),
        "the first 200 ms of caller audio came back in order"
    );
    let s = d.next_summary().await;
    assert_eq!(s.reason, EndReason::CallerHangup);
    assert_eq!(s.rate.map(|r| r.hz()), Some(8000));
    assert!(s.frames_in >= 26);
    assert!(s.frames_out > 0);
    let v = violations.lock().unwrap();
    assert!(v.is_empty(), "{v:?}");
}

#[tokio::test]
async fn echo_round_trip_16k_answers_at_caller_rate() {
    let mut d = start(echo_config()).await;
    let mut peer = Peer::connect(d.addr).await;
    peer.send(&uuid_frame()).await;
    let sent = speak(&mut peer, 0x12, 15, 320, -5000).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut got = Vec::new();
    while let Ok(Some(f)) =
        tokio::time::timeout(Duration::from_millis(10), peer.frames.recv()).await
    {
        assert_eq!(f.kind, 0x12);
        assert_eq!(f.payload.len(), 640);
        got.extend(samples(&f));
    }
    assert!(contains(&got, &sent[..3200]));
    peer.assert_no_violations();
    drop(peer.write);
    assert_eq!(d.next_summary().await.rate.map(|r| r.hz()), Some(16000));
}

#[tokio::test]
async fn odd_sized_frames_are_accepted() {
    let mut d = start(echo_config()).await;
    let mut peer = Peer::connect(d.addr).await;
    peer.send(&uuid_frame()).await;
    for n in [144usize, 160, 80, 1] {
        peer.send(&audio_frame(0x10, &vec![7; n])).await;
    }
    assert!(peer.next_frame().await.is_some());
    drop(peer.write);
    let s = d.next_summary().await;
    assert_eq!(s.reason, EndReason::CallerHangup);
    assert_eq!(s.frames_in, 5);
}

#[tokio::test]
async fn silence_keeps_flowing_without_caller_audio() {
    let _d = start(echo_config()).await;
    let mut peer = Peer::connect(_d.addr).await;
    peer.send(&uuid_frame()).await;
    peer.send(&audio_frame(0x10, &[0; 160])).await;
    // Asterisk drops a call after 2 s without traffic; the daemon must keep sending.
    let mut n = 0;
    while n < 30 {
        let f = peer.next_frame().await.expect("daemon keeps sending");
        assert_eq!(f.kind, 0x10);
        n += 1;
    }
    peer.assert_no_violations();
}

#[tokio::test]
async fn defaults_to_8k_when_no_audio_arrives() {
    let _d = start(echo_config()).await;
    let mut peer = Peer::connect(_d.addr).await;
    peer.send(&uuid_frame()).await;
    let f = peer
        .next_frame()
        .await
        .expect("silence frames start without caller audio");
    assert_eq!(f.kind, 0x10);
    assert_eq!(f.payload, vec![0; 320]);
}

#[tokio::test]
async fn dtmf_is_recorded() {
    let mut d = start(echo_config()).await;
    let mut peer = Peer::connect(d.addr).await;
    peer.send(&uuid_frame()).await;
    peer.send(&audio_frame(0x10, &[0; 160])).await;
    for digit in b"12#*D" {
        peer.send(&frame(0x03, &[*digit])).await;
    }
    peer.next_frame().await;
    drop(peer.write);
    let s = d.next_summary().await;
    assert_eq!(s.dtmf, "12#*D");
    assert_eq!(s.reason, EndReason::CallerHangup);
}

#[tokio::test]
async fn hangup_and_error_frames_end_the_call() {
    let mut d = start(echo_config()).await;
    for (msg, want) in [
        (frame(0x00, &[]), EndReason::HangupFrame),
        (frame(0xff, &[2]), EndReason::ErrorFrame),
        (frame(0xff, &[]), EndReason::ErrorFrame),
    ] {
        let mut peer = Peer::connect(d.addr).await;
        peer.send(&uuid_frame()).await;
        peer.send(&audio_frame(0x10, &[0; 160])).await;
        peer.send(&msg).await;
        peer.read_to_close().await;
        assert_eq!(d.next_summary().await.reason, want);
        peer.assert_no_violations();
    }
}

#[tokio::test]
async fn malformed_input_ends_only_that_call() {
    let mut d = start(echo_config()).await;
    // A healthy call runs alongside all the broken ones.
    let mut healthy = Peer::connect(d.addr).await;
    healthy.send(&uuid_frame()).await;
    healthy.send(&audio_frame(0x10, &[0; 160])).await;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("audio before UUID", audio_frame(0x10, &[0; 160])),
        ("short UUID", frame(0x01, &[1; 15])),
        ("long UUID", frame(0x01, &[1; 17])),
        ("second UUID", [uuid_frame(), uuid_frame()].concat()),
        ("bad DTMF digit", [uuid_frame(), frame(0x03, b"x")].concat()),
        (
            "two DTMF bytes",
            [uuid_frame(), frame(0x03, b"12")].concat(),
        ),
        ("empty audio", [uuid_frame(), frame(0x10, &[])].concat()),
        (
            "odd audio",
            [uuid_frame(), frame(0x10, &[1, 2, 3])].concat(),
        ),
        ("unknown kind", [uuid_frame(), frame(0x42, &[1])].concat()),
        (
            "hangup with payload",
            [uuid_frame(), frame(0x00, &[9])].concat(),
        ),
        (
            "truncated payload",
            [uuid_frame(), vec![0x10, 0x01, 0x40, 1, 2, 3]].concat(),
        ),
        (
            "truncated header",
            [uuid_frame(), vec![0x10, 0x01]].concat(),
        ),
    ];
    for (name, bytes) in cases {
        let mut peer = Peer::connect(d.addr).await;
        peer.send_lossy(&bytes).await;
        // Truncation is only visible at EOF: close our side after sending.
        if name.starts_with("truncated") {
            let _ = peer.write.shutdown().await;
        }
        peer.read_to_close().await;
        let s = d.next_summary().await;
        assert_eq!(s.reason, EndReason::ProtocolError, "{name}: {s:?}");
        assert!(s.detail.is_some(), "{name}: the error is described");
        peer.assert_no_violations();
    }
    // The healthy call is still being served.
    for _ in 0..5 {
        assert_eq!(healthy.next_frame().await.map(|f| f.kind), Some(0x10));
    }
    healthy.assert_no_violations();
}

use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn missing_uuid_times_out() {
    let mut cfg = echo_config();
    cfg.session.first_message_timeout = Duration::from_millis(200);
    let mut d = start(cfg).await;
    let mut peer = Peer::connect(d.addr).await;
    let frames = peer.read_to_close().await;
    assert!(frames.is_empty());
    assert_eq!(
        d.next_summary().await.reason,
        EndReason::FirstMessageTimeout
    );
}

#[tokio::test]
async fn allowlist_closes_strangers_without_a_byte() {
    let mut cfg = echo_config();
    cfg.allow = vec!["10.0.0.0/8".parse().unwrap()];
    let d = start(cfg).await;
    let mut peer = Peer::connect(d.addr).await;
    peer.send_lossy(&uuid_frame()).await;
    assert!(peer.read_to_close().await.is_empty());
}

#[tokio::test]
async fn over_capacity_gets_a_hangup_not_silence() {
    let mut cfg = echo_config();
    cfg.max_calls = 1;
    let d = start(cfg).await;
    let mut first = Peer::connect(d.addr).await;
    first.send(&uuid_frame()).await;
    first.send(&audio_frame(0x10, &[0; 160])).await;
    first.next_frame().await.expect("first call is served");
    let mut second = Peer::connect(d.addr).await;
    second.send_lossy(&uuid_frame()).await;
    let frames = second.read_to_close().await;
    assert_eq!(
        frames,
        vec![Frame {
            kind: 0x00,
            payload: vec![]
        }]
    );
    // The first call is unaffected.
    assert_eq!(first.next_frame().await.map(|f| f.kind), Some(0x10));
    // Once it ends, capacity comes back.
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = Peer::connect(d.addr).await;
    third.send(&uuid_frame()).await;
    third.send(&audio_frame(0x10, &[0; 160])).await;
    assert_eq!(third.next_frame().await.map(|f| f.kind), Some(0x10));
}

#[tokio::test]
async fn shutdown_drains_then_hangs_up() {
    let mut cfg = echo_config();
    cfg.shutdown_grace = Duration::from_millis(300);
    let mut d = start(cfg).await;
    let mut peer = Peer::connect(d.addr).await;
    peer.send(&uuid_frame()).await;
    peer.send(&audio_frame(0x10, &[0; 160])).await;
    peer.next_frame().await.expect("call up");
    assert!(d.ready.is_ready());
    d.shutdown.cancel();
    // During the grace period the call goes on and new calls are turned away with a hangup.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!d.ready.is_ready(), "not ready while draining");
    let mut late = Peer::connect(d.addr).await;
    late.send_lossy(&uuid_frame()).await;
    assert_eq!(
        late.read_to_close().await,
        vec![Frame {
            kind: 0x00,
            payload: vec![]
        }]
    );
    let rest = peer.read_to_close().await;
    assert!(rest.len() > 3, "call kept running during the grace period");
    assert_eq!(
        rest.last(),
        Some(&Frame {
            kind: 0x00,
            payload: vec![]
        }),
        "ended with a hangup frame"
    );
    assert!(rest[..rest.len() - 1].iter().all(|f| f.kind == 0x10));
    assert_eq!(d.next_summary().await.reason, EndReason::Shutdown);
    tokio::time::timeout(HANG_GUARD, d.task)
        .await
        .expect("daemon exits after drain")
        .unwrap();
    peer.assert_no_violations();
}

#[tokio::test]
async fn shutdown_with_no_calls_is_immediate() {
    let d = start(echo_config()).await;
    d.shutdown.cancel();
    tokio::time::timeout(HANG_GUARD, d.task)
        .await
        .expect("exits")
        .unwrap();
}
