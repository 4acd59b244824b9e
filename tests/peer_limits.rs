//! A peer that is allowed in but misbehaves costs only its own call: one that stops reading
//! our frames is closed once about 2 s of audio sits unsent, instead of after megabytes.

mod common;

use std::time::Duration;

use common::{HANG_GUARD, audio_frame, echo_config, start, uuid_frame};
use sifucall::ops::metrics::EndReason;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

#[tokio::test]
async fn a_peer_that_stops_reading_is_closed() {
    let mut d = start(echo_config()).await;
    let socket = TcpSocket::new_v4().unwrap();
    // A small receive window, so our unread frames pile up in the daemon's send queue
    // within seconds rather than minutes.
    socket.set_recv_buffer_size(2048).unwrap();
    let mut peer = socket.connect(d.addr).await.unwrap();
    peer.write_all(&uuid_frame()).await.unwrap();
    peer.write_all(&audio_frame(0x10, &[0; 160])).await.unwrap();
    // Keep sending audio in real time but never read what comes back.
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if peer.write_all(&audio_frame(0x10, &[0; 160])).await.is_err() {
                break;
            }
        }
    });
    let summary = tokio::time::timeout(HANG_GUARD * 3, d.next_summary())
        .await
        .expect("the daemon gave up on the peer");
    writer.abort();
    assert_eq!(summary.reason, EndReason::WriteFailed, "{summary:?}");
    assert!(
        summary
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("not reading"),
        "{summary:?}"
    );
}
