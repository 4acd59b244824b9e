//! End-to-end tests of the caller against a tiny fake AudioSocket server that decodes with
//! the daemon's strict [`ServerCodec`] (so any framing mistake by the caller fails the test).

use super::*;
use crate::audiosocket::{Outbound, ServerCodec};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the fake server does.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Echo every audio frame straight back.
    Echo,
    /// Echo, and send 0x00 after receiving this many audio frames.
    HangupAfter(usize),
    /// Like `HangupAfter`, then send one more audio frame after the 0x00.
    HangupThenAudio(usize),
    /// Echo, and send a forbidden UUID message (0x01) after this many audio frames.
    Forbidden(usize),
    /// Echo, and close the socket after this many audio frames.
    CloseAfter(usize),
    /// After this many audio frames, send a header announcing 320 bytes, 2 bytes of it, close.
    TruncateAfter(usize),
}

/// What the fake server saw.
#[derive(Debug, Default)]
struct Seen {
    msgs: Vec<Inbound>,
    /// The caller closed the socket cleanly (EOF between messages).
    eof: bool,
    /// Messages received after the server sent 0x00 or a forbidden message.
    after_end: usize,
    error: Option<String>,
}

async fn fake_server(mode: Mode) -> (String, JoinHandle<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let mut seen = Seen::default();
        let Ok(Ok((sock, _))) = timeout(Duration::from_secs(30), listener.accept()).await else {
            seen.error = Some("no connection".into());
            return seen;
        };
        let (r, mut w) = sock.into_split();
        let mut framed = FramedRead::new(r, ServerCodec::new());
        let mut audio = 0usize;
        let mut ended = false;
        let mut out = BytesMut::new();
        loop {
            let item = match timeout(Duration::from_secs(60), framed.next()).await {
                Ok(item) => item,
                Err(_) => {
                    seen.error = Some("hang guard".into());
                    return seen;
                }
            };
            let msg = match item {
                None => {
                    seen.eof = true;
                    return seen;
                }
                Some(Err(e)) => {
                    seen.error = Some(e.to_string());
                    return seen;
                }
                Some(Ok(m)) => m,
            };
            if ended {
                seen.after_end += 1;
            }
            seen.msgs.push(msg.clone());
            let Inbound::Audio { rate, pcm } = msg else {
                continue;
            };
            if ended {
                continue;
            }
            audio += 1;
            out.clear();
            ServerCodec::new()
                .encode(Outbound::audio(rate, pcm).unwrap(), &mut out)
                .unwrap();
            match mode {
                Mode::HangupAfter(n) | Mode::HangupThenAudio(n) if audio == n => {
                    ServerCodec::new()
                        .encode(Outbound::Hangup, &mut out)
                        .unwrap();
                    if matches!(mode, Mode::HangupThenAudio(_)) {
                        out.extend_from_slice(&[0x10, 0, 2, 1, 0]);
                    }
                    ended = true;
                }
                Mode::Forbidden(n) if audio == n => {
                    out.extend_from_slice(&[0x01, 0, 16]);
                    out.extend_from_slice(&[0xab; 16]);
                    ended = true;
                }
                Mode::CloseAfter(n) if audio == n => return seen,
                Mode::TruncateAfter(n) if audio == n => {
                    w.write_all(&[0x10, 0x01, 0x40, 0, 0]).await.ok();
                    return seen;
                }
                _ => {}
            }
            if w.write_all(&out).await.is_err() {
                seen.error = Some("write failed".into());
                return seen;
            }
        }
    });
    (addr, task)
}

/// A tone whose first sample is loud, so its start is easy to find in the recording.
fn tone(samples: usize, rate: SampleRate) -> Vec<i16> {
    (0..samples)
        .map(|i| {
            let t = i as f64 / f64::from(rate.hz());
            (8000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).cos()) as i16
        })
        .collect()
}

fn audio_frames(seen: &Seen) -> Vec<(SampleRate, usize)> {
    seen.msgs
        .iter()
        .filter_map(|m| match m {
            Inbound::Audio { rate, pcm } => Some((*rate, pcm.len())),
            _ => None,
        })
        .collect()
}

async fn echo_call(rate: SampleRate) {
    let (addr, server) = fake_server(Mode::Echo).await;
    let play = tone(rate.samples_per_frame() * 10, rate);
    let mut opts = CallOptions::new(addr);
    opts.rate = rate;
    opts.play = play.clone();
    opts.tail = Duration::from_millis(100);
    let id = opts.call_id;
    let report = place_call(opts).await.unwrap();
    let seen = server.await.unwrap();

    assert_eq!(seen.error, None);
    assert!(seen.eof, "the caller hangs up by closing the socket");
    assert_eq!(seen.msgs.first(), Some(&Inbound::Uuid(id)));
    let frames = audio_frames(&seen);
    assert_eq!(frames.len(), 15);
    assert_eq!(
        seen.msgs.len(),
        16,
        "nothing but the UUID and audio, and never 0x00"
    );
    let bytes = rate.samples_per_frame() * 2;
    assert!(frames.iter().all(|&f| f == (rate, bytes)), "{frames:?}");

    assert_eq!(report.closed_by, ClosedBy::Caller);
    assert!(!report.server_hangup);
    assert_eq!(report.frames_sent, 15);
    assert_eq!(report.frames_received, 15);
    assert_eq!(report.received_rates, vec![rate.hz()]);
    assert!(
        report.protocol_violations.is_empty(),
        "{:?}",
        report.protocol_violations
    );
    assert!(report.first_audio_latency_ms.is_some() && report.reply_latency_ms.is_some());
    // The echo comes back paced by our own frames: the recording is what we played, then
    // the echoed tail silence.
    let rec = &report.recording;
    let start = rec.iter().position(|&s| s != 0).unwrap();
    assert!(
        start < rate.samples_per_frame(),
        "echo starts {start} samples late"
    );
    assert_eq!(&rec[start..start + play.len()], &play[..]);
    let sent = 15 * rate.samples_per_frame();
    assert!(
        rec.len() >= sent && rec.len() <= sent + rate.samples_per_frame(),
        "{}",
        rec.len()
    );
}

#[tokio::test(start_paused = true)]
async fn echo_call_8k() {
    echo_call(SampleRate::Hz8000).await;
}

#[tokio::test(start_paused = true)]
async fn echo_call_16k_uses_kind_0x12() {
    echo_call(SampleRate::Hz16000).await;
}

#[tokio::test(start_paused = true)]
async fn dtmf_is_its_own_message_between_frames() {
    let (addr, server) = fake_server(Mode::Echo).await;
    let mut opts = CallOptions::new(addr);
    opts.play = vec![100; 1600];
    opts.tail = Duration::ZERO;
    opts.dtmf = vec![
        (Duration::from_millis(50), Digit::new(b'7').unwrap()),
        (Duration::from_millis(60), Digit::new(b'#').unwrap()),
    ];
    let report = place_call(opts).await.unwrap();
    let seen = server.await.unwrap();
    let shape: Vec<String> = seen
        .msgs
        .iter()
        .map(|m| match m {
            Inbound::Uuid(_) => "U".to_owned(),
            Inbound::Audio { .. } => "A".to_owned(),
            Inbound::Dtmf(d) => d.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    // Frames are due at 0, 20, 40, 60 ms...: '7' (50 ms) after the third, '#' (60 ms)
    // right after the fourth.
    assert_eq!(shape.concat(), "UAAA7A#AAAAAA");
    assert_eq!(report.dtmf_sent, "7#");
    assert_eq!(report.frames_sent, 10);
    // DTMF adds nothing to the audio: every frame is still the played samples.
    for m in &seen.msgs {
        if let Inbound::Audio { pcm, .. } = m {
            assert_eq!(pcm::le_bytes_to_samples(pcm), vec![100; 160]);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn server_hangup_ends_the_call() {
    let (addr, server) = fake_server(Mode::HangupAfter(5)).await;
    let mut opts = CallOptions::new(addr);
    opts.play = vec![300; 400];
    opts.until_server_hangup = true;
    opts.hangup_after = Some(Duration::from_secs(30));
    let report = place_call(opts).await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(report.closed_by, ClosedBy::ServerHangup);
    assert!(report.server_hangup);
    assert_eq!(report.frames_sent, 5);
    assert!(
        report.protocol_violations.is_empty(),
        "{:?}",
        report.protocol_violations
    );
    assert_eq!(seen.after_end, 0, "the caller stops sending after 0x00");
    assert!(seen.eof);
}

#[tokio::test(start_paused = true)]
async fn bytes_after_server_hangup_are_a_violation() {
    let (addr, server) = fake_server(Mode::HangupThenAudio(3)).await;
    let mut opts = CallOptions::new(addr);
    opts.until_server_hangup = true;
    let report = place_call(opts).await.unwrap();
    server.await.unwrap();
    assert_eq!(report.closed_by, ClosedBy::ServerHangup);
    assert_eq!(
        report.protocol_violations.len(),
        1,
        "{:?}",
        report.protocol_violations
    );
    assert!(report.protocol_violations[0].contains("after the server's hangup"));
}

#[tokio::test(start_paused = true)]
async fn forbidden_kind_drops_the_call_like_asterisk() {
    let (addr, server) = fake_server(Mode::Forbidden(3)).await;
    let mut opts = CallOptions::new(addr);
    opts.play = vec![300; 8000];
    let report = place_call(opts).await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(report.closed_by, ClosedBy::Error);
    assert!(
        report.error.as_deref().is_some_and(|e| e.contains("0x01")),
        "{:?}",
        report.error
    );
    assert_eq!(report.protocol_violations.len(), 1);
    assert!(report.protocol_violations[0].contains("forbidden message kind 0x01"));
    assert_eq!(report.frames_sent, 3);
    assert_eq!(seen.after_end, 0);
    assert!(seen.eof);
}

#[tokio::test(start_paused = true)]
async fn forbidden_kind_is_only_reported_when_lenient() {
    let (addr, server) = fake_server(Mode::Forbidden(3)).await;
    let mut opts = CallOptions::new(addr);
    opts.play = vec![300; 800];
    opts.tail = Duration::ZERO;
    opts.abort_on_violation = false;
    let report = place_call(opts).await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(report.closed_by, ClosedBy::Caller);
    assert_eq!(report.frames_sent, 5);
    assert_eq!(report.violation_count, 1);
    assert_eq!(seen.after_end, 2);
}

#[tokio::test(start_paused = true)]
async fn hangup_after_closes_the_socket() {
    let (addr, server) = fake_server(Mode::Echo).await;
    let mut opts = CallOptions::new(addr);
    opts.play = tone(8000 * 5, SampleRate::Hz8000);
    opts.hangup_after = Some(Duration::from_millis(100));
    let report = place_call(opts).await.unwrap();
    let seen = server.await.unwrap();
    assert!(seen.eof, "server sees EOF: {:?}", seen.error);
    // Frames at 0, 20, 40, 60, 80 ms; the hangup at 100 ms comes before a sixth.
    assert_eq!(audio_frames(&seen).len(), 5);
    assert_eq!(report.closed_by, ClosedBy::Caller);
    assert_eq!(report.frames_sent, 5);
    assert!(report.reply_latency_ms.is_none(), "play never finished");
}

#[tokio::test(start_paused = true)]
async fn server_close_is_a_graceful_end() {
    let (addr, server) = fake_server(Mode::CloseAfter(4)).await;
    let mut opts = CallOptions::new(addr);
    opts.until_server_hangup = true;
    let report = place_call(opts).await.unwrap();
    server.await.unwrap();
    assert_eq!(report.closed_by, ClosedBy::ServerClose);
    assert!(!report.server_hangup);
    assert!(report.protocol_violations.is_empty());
    assert_eq!(report.frames_received, 3);
}

#[tokio::test(start_paused = true)]
async fn truncated_frame_is_an_error() {
    let (addr, server) = fake_server(Mode::TruncateAfter(2)).await;
    let mut opts = CallOptions::new(addr);
    opts.until_server_hangup = true;
    let report = place_call(opts).await.unwrap();
    server.await.unwrap();
    assert_eq!(report.closed_by, ClosedBy::Error);
    assert!(
        report
            .protocol_violations
            .iter()
            .any(|v| v.contains("truncated"))
    );
}

#[tokio::test(start_paused = true)]
async fn frame_size_pattern_is_cycled() {
    let (addr, server) = fake_server(Mode::Echo).await;
    let mut opts = CallOptions::new(addr);
    opts.play = vec![5; 1600];
    opts.tail = Duration::ZERO;
    opts.frame_bytes_pattern = Some(vec![320, 288]);
    let report = place_call(opts).await.unwrap();
    let seen = server.await.unwrap();
    let lens: Vec<usize> = audio_frames(&seen).iter().map(|&(_, n)| n).collect();
    // 160/144-sample frames: 11 of them (1680 samples) are the first to cover 1600.
    assert_eq!(
        lens,
        [320, 288, 320, 288, 320, 288, 320, 288, 320, 288, 320]
    );
    assert_eq!(report.frames_sent, 11);
}

#[tokio::test]
async fn invalid_options_and_refused_connections_are_errors() {
    let mut opts = CallOptions::new("127.0.0.1:1");
    opts.frame_bytes_pattern = Some(vec![321]);
    assert!(matches!(
        place_call(opts).await,
        Err(CallerError::InvalidOption(_))
    ));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = place_call(CallOptions::new(addr)).await.unwrap_err();
    assert!(matches!(err, CallerError::Connect { .. }), "{err}");
}

#[test]
fn place_call_can_be_spawned() {
    fn assert_send<T: Send>(_: &T) {}
    assert_send(&place_call(CallOptions::new("127.0.0.1:1")));
}

#[test]
fn dtmf_strings() {
    let got = parse_dtmf("12w#a").unwrap();
    let want = [(1000, '1'), (1500, '2'), (2500, '#'), (3000, 'A')];
    assert_eq!(got.len(), want.len());
    for ((at, d), (ms, c)) in got.iter().zip(want) {
        assert_eq!((*at, d.as_char()), (Duration::from_millis(ms), c));
    }
    assert!(matches!(parse_dtmf("1x"), Err(CallerError::BadDtmf('x'))));
    assert!(parse_dtmf("").unwrap().is_empty());
}

#[test]
fn wav_round_trip_with_rate_conversion() {
    let path = std::env::temp_dir().join(format!("sifucall-caller-{}.wav", std::process::id()));
    wav::write(&path, 16000, &[1000; 3200]).unwrap();
    let samples = load_wav(&path, SampleRate::Hz8000).unwrap();
    assert_eq!(samples, vec![1000; 1600]);
    std::fs::remove_file(&path).ok();
}

#[tokio::test(start_paused = true)]
async fn summary_json_skips_the_recording() {
    let (addr, server) = fake_server(Mode::Echo).await;
    let mut opts = CallOptions::new(addr);
    opts.play = vec![2000; 320];
    opts.tail = Duration::ZERO;
    let report = place_call(opts).await.unwrap();
    server.await.unwrap();
    assert!(!report.recording.is_empty());
    let v: serde_json::Value = serde_json::from_str(&summary_json(&report)).unwrap();
    assert_eq!(v["closed_by"], "caller");
    assert_eq!(v["frames_sent"], 2);
    assert!(v.get("recording").is_none());
    assert!(v["frame_jitter_ms"]["p99"].is_number());
}

/// The same call on the real clock: only structure is asserted, never timing.
#[tokio::test]
async fn echo_call_real_time() {
    let (addr, server) = fake_server(Mode::Echo).await;
    let play: Vec<i16> = tone(1600, SampleRate::Hz8000)
        .into_iter()
        .map(|s| s | 1)
        .collect();
    let mut opts = CallOptions::new(addr);
    opts.play = play.clone();
    opts.lead_silence = Duration::from_millis(40);
    opts.tail = Duration::from_millis(500);
    let report = place_call(opts).await.unwrap();
    let seen = server.await.unwrap();
    assert!(seen.eof, "{:?}", seen.error);
    // 2 lead + 10 played + 25 tail frames.
    assert_eq!(audio_frames(&seen).len(), 37);
    assert_eq!(report.frames_sent, 37);
    assert_eq!(report.closed_by, ClosedBy::Caller);
    assert!(
        report.protocol_violations.is_empty(),
        "{:?}",
        report.protocol_violations
    );
    // Every played sample came back, in order; where silence was inserted depends on the
    // host's scheduling, so it is ignored here.
    let voiced: Vec<i16> = report
        .recording
        .iter()
        .copied()
        .filter(|&s| s != 0)
        .collect();
    assert_eq!(voiced, play);
    assert!(report.frame_jitter_ms.count > 0);
}

#[tokio::test]
async fn dialogue_takes_turns_and_timestamps_every_frame() {
    let (addr, server) = fake_server(Mode::Echo).await;
    // Three voiced frames per question; the echo of the last one is the "reply".
    let utterance: Vec<i16> = tone(480, SampleRate::Hz8000)
        .into_iter()
        .map(|s| s | 1)
        .collect();
    let mut opts = DialogueOptions::new(addr, utterance, 2);
    opts.quiet = Duration::from_millis(100);
    opts.greeting_timeout = Duration::from_millis(100);
    opts.reply_timeout = Duration::from_secs(5);
    let report = place_dialogue(opts).await.unwrap();
    let seen = server.await.unwrap();
    assert!(seen.eof, "{:?}", seen.error);
    assert_eq!(report.closed_by, ClosedBy::Caller, "{:?}", report.error);
    assert!(report.protocol_violations.is_empty());
    assert_eq!(report.turns.len(), 2);
    for t in &report.turns {
        assert!(!t.barge);
        assert!(t.start_ms < t.end_ms);
        assert_eq!(report.sent_ms[t.end_frame], t.end_ms);
        let first = t.first_reply_ms.expect("the echo of the last frame");
        assert!(first >= t.end_ms);
    }
    assert!(report.turns[1].start_ms > report.turns[0].first_reply_ms.unwrap());
    // Every frame written was sent, in order; every echo read was timestamped.
    assert_eq!(audio_frames(&seen).len(), report.sent_ms.len());
    assert!(report.sent_ms.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(report.arrivals.iter().filter(|a| a.voiced).count(), 6);
    assert!(report.arrivals.len() <= report.sent_ms.len());
}
