//! What the transports' tests share: a fake service, a client of it, and readers of the
//! audio stream.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::timeout;

use super::ElevenLabs;
use crate::ops::config::{OutputFormat, Secret, Settings, TtsSettings, TtsTransport};
use crate::providers::tts::{TtsInput, TtsOutput, TtsParams, TtsProvider as _, TtsStream};
use crate::sandbox::elevenlabs::{self as fake, FakeElevenLabs, FakeElevenLabsConfig, TtsFault};

/// Hang guard only: every test finishes far sooner on a healthy machine.
pub(crate) const GUARD: Duration = Duration::from_secs(30);
pub(crate) const KEY: &str = "test-key";
/// A clause long enough for several chunks of audio.
pub(crate) const LONG: &str = "Selamat pagi, terima kasih kerana menelefon kami hari ini.";

pub(crate) fn settings(
    base_url: &str,
    transport: TtsTransport,
    format: OutputFormat,
) -> TtsSettings {
    let mut s = Settings::defaults().tts;
    s.base_url = base_url.to_owned();
    s.transport = transport;
    s.output_format = format;
    s.first_byte_timeout_ms = 10_000;
    s
}

pub(crate) fn fast() -> FakeElevenLabsConfig {
    FakeElevenLabsConfig {
        key: Some(KEY.into()),
        first_byte_delay_ms: 5,
        realtime_factor: 50.0,
        chunk_ms: 100,
        fault: TtsFault::None,
        max_concurrent: 0,
    }
}

pub(crate) fn with_fault(fault: TtsFault) -> FakeElevenLabsConfig {
    FakeElevenLabsConfig { fault, ..fast() }
}

pub(crate) fn client(s: &TtsSettings, key: &str) -> ElevenLabs {
    ElevenLabs::new(s, Secret::new(Some(key.into()))).unwrap()
}

/// A fake serving `cfg` and a client of it using `key`, `transport` and `format`.
pub(crate) async fn start(
    cfg: FakeElevenLabsConfig,
    transport: TtsTransport,
    format: OutputFormat,
    key: &str,
) -> (FakeElevenLabs, ElevenLabs) {
    let srv = fake::spawn(cfg).await.unwrap();
    let el = client(&settings(&srv.base_url(), transport, format), key);
    (srv, el)
}

/// Opens a synthesis and sends `clauses`, then `Finish` if `finish`.
pub(crate) async fn open_and_send(
    el: &ElevenLabs,
    rate: u32,
    clauses: &[&str],
    finish: bool,
) -> TtsStream {
    let stream = el.open(params(rate)).await.unwrap();
    for c in clauses {
        stream.text.send(TtsInput::Text((*c).into())).await.unwrap();
    }
    if finish {
        stream.text.send(TtsInput::Finish).await.unwrap();
    }
    stream
}

/// The message of a `Failed` end; panics on anything else.
pub(crate) fn failure(end: Option<TtsOutput>) -> String {
    match end {
        Some(TtsOutput::Failed(m)) => m,
        other => panic!("expected Failed, got {other:?}"),
    }
}

pub(crate) fn params(rate: u32) -> TtsParams {
    TtsParams {
        sample_rate: rate,
        call_id: "test-call".into(),
        language_code: None,
    }
}

pub(crate) async fn recv(audio: &mut mpsc::Receiver<TtsOutput>) -> Option<TtsOutput> {
    timeout(GUARD, audio.recv()).await.expect("hang guard")
}

/// All audio up to the end marker (alignments skipped).
pub(crate) async fn collect(
    audio: &mut mpsc::Receiver<TtsOutput>,
) -> (Vec<i16>, usize, Option<TtsOutput>) {
    let (pcm, chunks, _, end) = collect_aligned(audio).await;
    (pcm, chunks, end)
}

/// One character's timing: (character, start ms, duration ms), from the stream's start.
pub(crate) type CharTiming = (String, u32, u32);

/// All audio and alignment up to the end marker.
pub(crate) async fn collect_aligned(
    audio: &mut mpsc::Receiver<TtsOutput>,
) -> (Vec<i16>, usize, Vec<CharTiming>, Option<TtsOutput>) {
    let (mut pcm, mut chunks, mut timings) = (Vec::new(), 0, Vec::new());
    loop {
        match recv(audio).await {
            Some(TtsOutput::Audio(s)) => {
                assert!(!s.is_empty());
                chunks += 1;
                pcm.extend_from_slice(&s);
            }
            Some(TtsOutput::Alignment {
                chars,
                start_ms,
                duration_ms,
            }) => {
                assert!(chars.len() == start_ms.len() && chars.len() == duration_ms.len());
                timings.extend(
                    chars
                        .into_iter()
                        .zip(start_ms)
                        .zip(duration_ms)
                        .map(|((c, s), d)| (c, s, d)),
                );
            }
            end => return (pcm, chunks, timings, end),
        }
    }
}

/// Opens a synthesis, sends `text` as one reply and collects all of its audio.
pub(crate) async fn synthesize_all(
    provider: &dyn crate::providers::tts::TtsProvider,
    params: TtsParams,
    text: &str,
) -> Result<Vec<i16>, crate::providers::tts::TtsError> {
    let TtsStream {
        text: tx,
        mut audio,
    } = provider.open(params).await?;
    // If the driver already died these fail; its `Failed` is then read below.
    if tx.send(TtsInput::Text(text.to_owned())).await.is_ok() {
        let _ = tx.send(TtsInput::Finish).await;
    }
    let mut pcm = Vec::new();
    while let Some(out) = audio.recv().await {
        match out {
            TtsOutput::Audio(samples) => pcm.extend_from_slice(&samples),
            TtsOutput::Alignment { .. } => {}
            TtsOutput::Done => return Ok(pcm),
            TtsOutput::Failed(msg) => return Err(crate::providers::tts::TtsError::Transport(msg)),
        }
    }
    Err(crate::providers::tts::TtsError::Transport(
        "the synthesis ended without finishing".into(),
    ))
}
