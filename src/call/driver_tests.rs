//! The driver over an in-memory socket in paused (virtual) time: what only the I/O layer
//! can get wrong (losing control events under an audio flood, waiting on a provider,
//! budgeting a flooding peer). Providers are small in-process stand-ins that misbehave on
//! purpose; the wire fakes in `crate::sandbox` cover the real protocols elsewhere.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

use super::driver::{self, AgentSetup, Behaviour, CallSummary, SessionConfig};
use super::prompts::PromptCache;
use super::reply::Providers;
use crate::ops::metrics::{EndReason, Metrics};
use crate::ops::records::Role;
use crate::providers::BoxFuture;
use crate::providers::llm::{ChatRequest, LlmError, LlmProvider, LlmStream};
use crate::providers::stt::{SttError, SttEvent, SttParams, SttProvider, SttSession};
use crate::providers::tts::{TtsError, TtsParams, TtsProvider, TtsStream};

/// A recogniser that accepts the connection and then never reads the audio.
/// A recognition's channels, held open and never read.
type HeldSession = (
    tokio::sync::mpsc::Receiver<Vec<i16>>,
    tokio::sync::mpsc::Sender<SttEvent>,
);

#[derive(Default)]
struct DeafStt {
    keep: Mutex<Vec<HeldSession>>,
}

impl SttProvider for DeafStt {
    fn start(&self, _: SttParams) -> BoxFuture<'_, Result<SttSession, SttError>> {
        let (atx, arx) = tokio::sync::mpsc::channel(4);
        let (etx, erx) = tokio::sync::mpsc::channel(4);
        self.keep.lock().unwrap().push((arx, etx));
        Box::pin(async move {
            Ok(SttSession {
                audio: atx,
                events: erx,
            })
        })
    }
}

/// A model that never answers.
struct SilentLlm;

impl LlmProvider for SilentLlm {
    fn stream(&self, _: ChatRequest) -> BoxFuture<'_, Result<LlmStream, LlmError>> {
        Box::pin(std::future::pending())
    }
}

/// A TTS whose connection hangs forever (a black-holed endpoint).
struct StalledTts;

impl TtsProvider for StalledTts {
    fn open(&self, _: TtsParams) -> BoxFuture<'_, Result<TtsStream, TtsError>> {
        Box::pin(std::future::pending())
    }
}

fn agent(stt: Arc<dyn SttProvider>, tts: Arc<dyn TtsProvider>) -> Behaviour {
    // The scenario tests' agent; only the providers differ.
    let cfg = super::scenarios::config();
    Behaviour::Agent(Arc::new(AgentSetup {
        providers: Providers {
            stt,
            llm: Arc::new(SilentLlm),
            tts: Arc::clone(&tts),
            tools: Arc::new(super::tools::ToolBox::empty()),
        },
        prompts: Arc::new(PromptCache::new(cfg.prompts.clone(), tts)),
        cfg: Arc::new(cfg),
    }))
}

fn config(behaviour: Behaviour) -> SessionConfig {
    SessionConfig {
        first_message_timeout: Duration::from_secs(2),
        behaviour,
        idle_hangup: Some(Duration::from_secs(60)),
        control: std::sync::Arc::new(crate::call::NoControl),
        live: Default::default(),
        records: None,
    }
}

fn start(cfg: SessionConfig) -> (DuplexStream, tokio::task::JoinHandle<CallSummary>) {
    let (asterisk, daemon) = tokio::io::duplex(1 << 20);
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let task = tokio::spawn(driver::run(
        daemon,
        peer,
        cfg,
        Arc::new(Metrics::new()),
        CancellationToken::new(),
    ));
    (asterisk, task)
}

fn msg(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

fn uuid() -> Vec<u8> {
    msg(0x01, &[7; 16])
}

fn audio_8k() -> Vec<u8> {
    msg(0x10, &[0; 320])
}

/// Reads messages until the daemon's 0x00 or EOF; returns (kind, payload length) each.
async fn read_all(asterisk: &mut DuplexStream) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    let mut header = [0u8; 3];
    while asterisk.read_exact(&mut header).await.is_ok() {
        let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
        let mut payload = vec![0; len];
        if asterisk.read_exact(&mut payload).await.is_err() {
            break;
        }
        out.push((header[0], len));
        if header[0] == 0x00 {
            break;
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn keypad_events_are_never_lost_while_audio_floods_a_recogniser_that_is_behind() {
    let stt = Arc::new(DeafStt::default());
    let (mut asterisk, call) = start(config(agent(stt, Arc::new(StalledTts))));
    asterisk.write_all(&uuid()).await.unwrap();
    // 400 audio frames (8 s of audio) in one burst with a digit after every tenth: the
    // recogniser takes 4 chunks and then nothing, the input budget drops the excess.
    let digits = b"0123456789*#ABCD0123456789*#ABCD0123456789*#ABCD";
    let mut burst = Vec::new();
    let mut sent = String::new();
    for i in 0..400 {
        burst.extend(audio_8k());
        if i % 10 == 9 {
            let d = digits[i / 10];
            burst.extend(msg(0x03, &[d]));
            sent.push(char::from(d));
        }
    }
    asterisk.write_all(&burst).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(asterisk);
    let summary = call.await.unwrap();
    assert_eq!(summary.dtmf, sent, "every digit arrived, in order");
    let report = summary.agent.unwrap();
    let keyed: String = report
        .transcript
        .iter()
        .filter(|l| l.role == Role::Dtmf)
        .map(|l| l.text.as_str())
        .collect();
    assert_eq!(keyed, sent);
    assert!(summary.inbound_dropped > 0, "the audio overload is counted");
}

#[tokio::test(start_paused = true)]
async fn with_tts_down_at_startup_the_call_is_handed_back_within_a_second() {
    let (mut asterisk, call) = start(config(agent(
        Arc::new(DeafStt::default()),
        Arc::new(StalledTts),
    )));
    asterisk.write_all(&uuid()).await.unwrap();
    let t0 = tokio::time::Instant::now();
    let (mut rx, mut tx) = tokio::io::split(asterisk);
    let feeder = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if tx.write_all(&audio_8k()).await.is_err() {
                break;
            }
        }
    });
    let mut header = [0u8; 3];
    let hung_up_at = loop {
        rx.read_exact(&mut header).await.unwrap();
        let mut payload = vec![0; usize::from(u16::from_be_bytes([header[1], header[2]]))];
        rx.read_exact(&mut payload).await.unwrap();
        if header[0] == 0x00 {
            break tokio::time::Instant::now();
        }
    };
    feeder.abort();
    assert!(
        hung_up_at - t0 <= Duration::from_secs(1),
        "after {:?}",
        hung_up_at - t0
    );
    let summary = call.await.unwrap();
    assert_eq!(summary.reason, EndReason::AgentHangup);
    assert!(
        summary
            .agent
            .unwrap()
            .errors
            .iter()
            .any(|e| e.contains("could not speak"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_flooding_far_beyond_real_time_is_cut_off() {
    let (mut asterisk, call) = start(config(Behaviour::Echo));
    asterisk.write_all(&uuid()).await.unwrap();
    // Three times real time for a second: the excess is dropped, the call goes on.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for _ in 0..50 {
        tick.tick().await;
        for _ in 0..3 {
            asterisk.write_all(&audio_8k()).await.unwrap();
        }
    }
    // Then 65 KB frames flat out: the call is ended as a protocol fault.
    let big = msg(0x10, &vec![0; 65_534]);
    let mut ended = false;
    for _ in 0..100 {
        if asterisk.write_all(&big).await.is_err() {
            ended = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    let summary = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap()
        .unwrap();
    assert!(ended || summary.reason == EndReason::ProtocolError);
    assert_eq!(summary.reason, EndReason::ProtocolError, "{summary:?}");
    assert!(summary.inbound_dropped >= 50, "{}", summary.inbound_dropped);
}

#[tokio::test(start_paused = true)]
async fn an_echo_call_whose_peer_goes_quiet_is_ended() {
    let (mut asterisk, call) = start(config(Behaviour::Echo));
    asterisk.write_all(&uuid()).await.unwrap();
    asterisk.write_all(&audio_8k()).await.unwrap();
    // A header with no payload, then nothing at all.
    asterisk.write_all(&[0x10, 0x01]).await.unwrap();
    let frames = read_all(&mut asterisk).await;
    assert_eq!(frames.last(), Some(&(0x00, 0)), "the daemon hung up");
    let summary = call.await.unwrap();
    assert_eq!(summary.reason, EndReason::AgentHangup);
    assert!(
        summary.duration >= Duration::from_secs(60) && summary.duration < Duration::from_secs(62)
    );
}

/// A TTS that answers like the realistic fake, in virtual time: first audio 150 ms after the
/// text is complete, then 200 ms of audio every 100 ms (twice real time), 3 s in all. A text
/// containing `fail_if` fails before any audio.
struct PacedTts {
    fail_if: Option<&'static str>,
}

/// The level of [`PacedTts`]'s audio (the caller sends silence).
const SPOKEN: i16 = 3000;

impl TtsProvider for PacedTts {
    fn open(&self, params: TtsParams) -> BoxFuture<'_, Result<TtsStream, TtsError>> {
        use crate::providers::tts::{TtsInput, TtsOutput};
        let fail_if = self.fail_if;
        Box::pin(async move {
            let (text_tx, mut text_rx) = tokio::sync::mpsc::channel(8);
            let (audio_tx, audio_rx) = tokio::sync::mpsc::channel(64);
            tokio::spawn(async move {
                let mut text = String::new();
                while let Some(TtsInput::Text(t)) = text_rx.recv().await {
                    text.push_str(&t);
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
                if fail_if.is_some_and(|f| text.contains(f)) {
                    let _ = audio_tx.send(TtsOutput::Failed("HTTP 500".into())).await;
                    return;
                }
                let chunk = params.sample_rate as usize / 5;
                for i in 0..15 {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let _ = audio_tx.send(TtsOutput::Audio(vec![SPOKEN; chunk])).await;
                }
                let _ = audio_tx.send(TtsOutput::Done).await;
            });
            Ok(TtsStream {
                text: text_tx,
                audio: audio_rx,
            })
        })
    }
}

/// The scenario agent whose greeting has a variable (`{call_id}`: the call's own), with a
/// [`PacedTts`]; its generic version is cached first when `cache_generic`.
async fn per_call_greeting_agent(tts: PacedTts, cache_generic: bool) -> Behaviour {
    let mut cfg = super::scenarios::config();
    cfg.prompts.greeting = "Rujukan {call_id}, selamat datang.".into();
    let tts: Arc<dyn TtsProvider> = Arc::new(tts);
    let prompts = PromptCache::new(cfg.prompts.clone(), Arc::clone(&tts));
    if cache_generic {
        prompts.preload(&[8_000]).await;
    }
    Behaviour::Agent(Arc::new(AgentSetup {
        providers: Providers {
            stt: Arc::new(DeafStt::default()),
            llm: Arc::new(SilentLlm),
            tts,
            tools: Arc::new(super::tools::ToolBox::empty()),
        },
        prompts: Arc::new(prompts),
        cfg: Arc::new(cfg),
    }))
}

/// Runs a call that sends silence for `for_ms`; returns when each frame carrying
/// [`SPOKEN`] went out (ms from the first audio message) and the summary.
async fn greeted_call(behaviour: Behaviour, for_ms: u64) -> (Vec<u64>, CallSummary) {
    let (mut asterisk, call) = start(config(behaviour));
    asterisk.write_all(&uuid()).await.unwrap();
    asterisk.write_all(&audio_8k()).await.unwrap();
    let t0 = tokio::time::Instant::now();
    let (mut rx, mut tx) = tokio::io::split(asterisk);
    let feeder = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.tick().await;
        for _ in 0..for_ms / 20 {
            tick.tick().await;
            if tx.write_all(&audio_8k()).await.is_err() {
                break;
            }
        }
    });
    let mut spoken = Vec::new();
    let mut header = [0u8; 3];
    while rx.read_exact(&mut header).await.is_ok() {
        let mut payload = vec![0; usize::from(u16::from_be_bytes([header[1], header[2]]))];
        rx.read_exact(&mut payload).await.unwrap();
        let at = (tokio::time::Instant::now() - t0).as_millis() as u64;
        if header[0] == 0x10 && payload[..2] == SPOKEN.to_le_bytes() {
            spoken.push(at);
        }
        if at >= for_ms {
            break;
        }
    }
    feeder.await.unwrap();
    drop(rx);
    (spoken, call.await.unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_greeting_with_a_variable_plays_as_its_tts_audio_arrives() {
    let agent = per_call_greeting_agent(PacedTts { fail_if: None }, false).await;
    let (spoken, summary) = greeted_call(agent, 4000).await;
    // The first audio arrives at 150 ms; the whole phrase only at 1550 ms.
    let first = spoken.first().copied().unwrap();
    assert!(first <= 150 + 40, "first greeting frame at {first} ms");
    assert_eq!(spoken.len(), 150, "all 3 s of it, once");
    assert!(
        spoken.windows(2).all(|w| w[1] - w[0] <= 20),
        "no gap while it streams: {spoken:?}"
    );
    let report = summary.agent.unwrap();
    let said: Vec<_> = report
        .transcript
        .iter()
        .map(|l| (l.role, l.text.as_str(), l.interrupted))
        .collect();
    assert_eq!(
        said,
        [(
            Role::Agent,
            "Rujukan 07070707-0707-0707-0707-070707070707, selamat datang.",
            false
        )]
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[tokio::test(start_paused = true)]
async fn a_greeting_whose_synthesis_fails_before_any_audio_plays_the_generic_version() {
    let tts = PacedTts {
        fail_if: Some("0707"),
    };
    let agent = per_call_greeting_agent(tts, true).await;
    let (spoken, summary) = greeted_call(agent, 4000).await;
    assert_eq!(spoken.len(), 150, "the cached generic greeting, whole");
    let first = spoken.first().copied().unwrap();
    assert!(
        first <= 150 + 40,
        "played as soon as the failure came: {first} ms"
    );
    let report = summary.agent.unwrap();
    // What the history and transcript say is the call's own text (as before this change).
    assert_eq!(report.transcript.len(), 1, "{:?}", report.transcript);
    assert_eq!(summary.reason, EndReason::CallerHangup);
}
