//! Whole AI calls against the fake providers: a daemon in AI mode (`app::run`, everything on
//! port 0) pointed at its own [`Sandbox`], the committed Malay recordings laid out on a
//! timeline, and helpers that measure what the caller heard.
//!
//! The fake STT reports `FakeAzureConfig::transcripts` in order, one per phrase it detects by
//! energy; the fake LLM answers deterministically (the scripted `replies`, or a goodbye plus
//! `end_call` when the user text holds a hang-up word); the fake TTS makes speech-like audio
//! of an exactly known length. So every test knows what each party says, and asserts on
//! what was said, sent and received rather than on timing.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sifucall::app::{self, Hooks};
use sifucall::audio::{pcm, wav};
use sifucall::audiosocket::SampleRate;
use sifucall::call::AgentReport;
use sifucall::call::CallSummary;
use sifucall::caller::{self, CallOptions, CallReport};
use sifucall::ops::config::{AgentMode, Settings};
use sifucall::ops::records::{Role, TranscriptEntry};
use sifucall::sandbox::{Sandbox, SandboxConfig, elevenlabs};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Hang guard for a whole call (never a timing assertion).
pub const CALL_GUARD: Duration = Duration::from_secs(90);

/// What the caller's question says (the fake STT reports it for the first phrase).
pub const QUESTION: &str = sifucall::demo::QUESTION_TEXT;
/// What the caller's goodbye says; it holds the fake LLM's hang-up words.
pub const GOODBYE: &str = sifucall::demo::GOODBYE_TEXT;
/// The fake LLM's goodbye (it follows with `end_call`).
pub const AGENT_GOODBYE: &str = "Baiklah, terima kasih kerana menghubungi kami. Selamat tinggal!";
/// Short prompts keep the calls short.
pub const GREETING: &str = "Selamat datang.";
/// Spoken when a provider fails.
pub const APOLOGY: &str = "Maaf, ada gangguan. Sila ulang.";
/// Spoken when a reply is slow.
pub const HOLD: &str = "Sekejap, ya.";
/// The scripted reply of most tests.
pub const REPLY: &str = "Harga pakej asas ialah RM99 sebulan.";

/// A sample at least this loud counts as agent speech (the fakes' speech peaks near 9000;
/// the G.711 round trip moves small samples by a few steps only).
pub const LOUD: i16 = 300;

// ---- caller audio -------------------------------------------------------------------------

/// Reads a committed fixture and cuts its leading and trailing silence (each file has 1 s of
/// it), keeping 40 ms either side.
pub fn fixture(name: &str, rate: u32) -> Vec<i16> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let audio = wav::read(&path).expect("fixture readable");
    assert_eq!(audio.rate, rate, "{name} rate");
    trim_silence(&audio.samples, rate)
}

/// The caller's question, 8 kHz.
pub fn question_8k() -> Vec<i16> {
    fixture("malay_question_8k.wav", 8_000)
}

/// A short phrase for tests where what is said does not matter (the fake STT only needs its
/// energy): the first 1.6 s of the question.
pub fn phrase_8k() -> Vec<i16> {
    let mut q = question_8k();
    q.truncate(8_000 * 8 / 5);
    q
}

/// The caller's goodbye, 8 kHz.
pub fn goodbye_8k() -> Vec<i16> {
    fixture("malay_goodbye_8k.wav", 8_000)
}

/// The caller's question, 16 kHz.
pub fn question_16k() -> Vec<i16> {
    fixture("malay_question_16k.wav", 16_000)
}

fn trim_silence(x: &[i16], rate: u32) -> Vec<i16> {
    let block = (rate / 50) as usize;
    let voiced: Vec<usize> = x
        .chunks(block)
        .enumerate()
        .filter(|(_, b)| pcm::dbfs(b) > -45.0)
        .map(|(i, _)| i)
        .collect();
    let (Some(&first), Some(&last)) = (voiced.first(), voiced.last()) else {
        return Vec::new();
    };
    let margin = 2 * block;
    let start = (first * block).saturating_sub(margin);
    let end = ((last + 1) * block + margin).min(x.len());
    x[start..end].to_vec()
}

/// Where something sits on a [`Timeline`], in samples from the call start.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

/// What the caller sends, laid out in time (sample 0 is the call's first audio frame).
#[derive(Debug, Clone)]
pub struct Timeline {
    pub rate: u32,
    pub samples: Vec<i16>,
}

impl Timeline {
    pub fn new(rate: u32) -> Self {
        Self {
            rate,
            samples: Vec::new(),
        }
    }

    pub fn silence_ms(&mut self, ms: u64) -> &mut Self {
        let n = (ms * u64::from(self.rate) / 1000) as usize;
        self.samples.extend(std::iter::repeat_n(0i16, n));
        self
    }

    pub fn say(&mut self, audio: &[i16]) -> Span {
        let start = self.samples.len();
        self.samples.extend_from_slice(audio);
        Span {
            start,
            end: self.samples.len(),
        }
    }

    /// Current length in ms.
    pub fn ms(&self) -> u64 {
        self.samples.len() as u64 * 1000 / u64::from(self.rate)
    }
}

/// Milliseconds of `samples` at `rate`.
pub fn samples_ms(samples: usize, rate: u32) -> u64 {
    samples as u64 * 1000 / u64::from(rate)
}

/// How long the fake TTS's audio for `text` lasts, ms.
pub fn speech_ms(text: &str, rate: u32) -> u64 {
    samples_ms(elevenlabs::speech_samples(text, rate), rate)
}

// ---- the daemon ----------------------------------------------------------------------------

/// Fast fakes: little latency, fast token streaming, the scripted [`REPLY`], the transcripts
/// `[QUESTION, GOODBYE]`.
pub fn fast_sandbox() -> SandboxConfig {
    let mut c = SandboxConfig::default();
    c.azure.transcripts = vec![QUESTION.into(), GOODBYE.into()];
    c.azure.final_delay_ms = 50;
    c.azure.hypothesis_every_ms = 200;
    c.openrouter.first_token_delay_ms = 60;
    c.openrouter.tokens_per_sec = 100.0;
    c.openrouter.replies = vec![REPLY.into()];
    c.elevenlabs.first_byte_delay_ms = 30;
    c.elevenlabs.realtime_factor = 4.0;
    c
}

/// Built-in defaults with short prompts; no hold prompt unless a test lowers `hold_after_ms`.
pub fn settings() -> Settings {
    let mut s = Settings::defaults();
    s.agent.mode = AgentMode::Ai;
    s.agent.greeting = GREETING.into();
    s.agent.apology = APOLOGY.into();
    s.agent.hold_prompt = HOLD.into();
    s.agent.hold_after_ms = 5_000;
    // The fake's hypotheses are word prefixes of its transcripts, so a reply started on one
    // is always thrown away; tests that count requests turn speculation off (it has tests of
    // its own).
    s.agent.speculate_after_ms = 0;
    s.audiosocket.listen = "127.0.0.1:0".parse().unwrap();
    s.admin.listen = "127.0.0.1:0".parse().unwrap();
    s
}

/// A daemon in AI mode and its own fakes.
pub struct AiDaemon {
    pub sandbox: Sandbox,
    pub audiosocket: SocketAddr,
    pub admin: SocketAddr,
    pub settings: Settings,
    shutdown: CancellationToken,
    summaries: mpsc::UnboundedReceiver<CallSummary>,
    task: JoinHandle<Result<(), app::StartError>>,
}

/// Starts the fakes and a daemon pointed at them; returns once the prompts are cached and
/// the daemon listens.
pub async fn start(sandbox: SandboxConfig, mut settings: Settings) -> AiDaemon {
    let sandbox = Sandbox::start(sandbox).await.expect("fakes start");
    sandbox.point(&mut settings);
    if settings.records.url == Settings::defaults().records.url {
        // Each daemon its own records database, never the system's.
        let dir =
            std::env::temp_dir().join(format!("sifucall-ai-records-{}", uuid::Uuid::new_v4()));
        settings.records.url = format!("sqlite://{}/calls.db", dir.display());
    }
    let shutdown = CancellationToken::new();
    let (bound_tx, bound_rx) = oneshot::channel();
    let (tx, summaries) = mpsc::unbounded_channel();
    let hooks = Hooks {
        on_bound: Some(bound_tx),
        on_call_end: Some(Arc::new(move |s: CallSummary| {
            let _ = tx.send(s);
        })),
    };
    let task = tokio::spawn(app::run(settings.clone(), shutdown.clone(), hooks));
    let bound = tokio::time::timeout(CALL_GUARD, bound_rx)
        .await
        .expect("daemon binds within the guard")
        .expect("daemon started");
    AiDaemon {
        sandbox,
        audiosocket: bound.audiosocket,
        admin: bound.admin,
        settings,
        shutdown,
        summaries,
        task,
    }
}

impl AiDaemon {
    /// A call that plays `timeline` and then stays up until the daemon hangs up (bounded).
    pub fn call(&self, timeline: &Timeline) -> CallOptions {
        let mut c = CallOptions::new(self.audiosocket.to_string());
        c.rate = match timeline.rate {
            16_000 => SampleRate::Hz16000,
            _ => SampleRate::Hz8000,
        };
        c.play = timeline.samples.clone();
        c.until_server_hangup = true;
        c.hangup_after = Some(Duration::from_millis(timeline.ms()) + Duration::from_secs(15));
        c
    }

    /// A call that plays `timeline` and then hangs up itself after `tail_ms` of silence.
    pub fn call_then_hang_up(&self, timeline: &Timeline, tail_ms: u64) -> CallOptions {
        let mut c = self.call(timeline);
        c.until_server_hangup = false;
        c.hangup_after = None;
        c.tail = Duration::from_millis(tail_ms);
        c
    }

    pub async fn place(&self, opts: CallOptions) -> CallReport {
        tokio::time::timeout(CALL_GUARD, caller::place_call(opts))
            .await
            .expect("call ends within the guard")
            .expect("call placed")
    }

    pub async fn next_summary(&mut self) -> CallSummary {
        tokio::time::timeout(Duration::from_secs(10), self.summaries.recv())
            .await
            .expect("the daemon reports the call")
            .expect("daemon alive")
    }

    /// Every chat request the fake LLM received, in order.
    pub fn llm_requests(&self) -> Vec<Value> {
        self.sandbox.openrouter.requests()
    }

    /// `/metrics` of the admin server.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("admin answers")
            .text()
            .await
            .expect("metrics body")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// The value of an unlabelled metric.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

// ---- what was said -------------------------------------------------------------------------

pub fn agent(summary: &CallSummary) -> AgentReport {
    summary
        .agent
        .clone()
        .expect("AI calls have an agent report")
}

/// `(role, text)` of each transcript line.
pub fn lines(report: &AgentReport) -> Vec<(Role, String)> {
    report
        .transcript
        .iter()
        .map(|l| (l.role, l.text.clone()))
        .collect()
}

pub fn agent_lines(report: &AgentReport) -> Vec<&TranscriptEntry> {
    report
        .transcript
        .iter()
        .filter(|l| l.role == Role::Agent)
        .collect()
}

/// `(role, content)` of a chat request's messages.
pub fn messages(req: &Value) -> Vec<(String, String)> {
    req["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The content of a request's last user message.
pub fn last_user(req: &Value) -> String {
    messages(req)
        .into_iter()
        .rev()
        .find(|(r, _)| r == "user")
        .map(|(_, c)| c)
        .unwrap_or_default()
}

// ---- what was heard ------------------------------------------------------------------------

/// Samples at least [`LOUD`] in magnitude.
pub fn loud_samples(x: &[i16]) -> usize {
    x.iter().filter(|s| s.unsigned_abs() >= LOUD as u16).count()
}

/// [`loud_samples`] of the fake TTS's audio for `text`: what hearing all of it means.
pub fn expected_loud(text: &str, rate: u32) -> usize {
    loud_samples(&elevenlabs::synthesize(text, rate))
}

/// The part of a recording between two sample positions (clamped).
pub fn segment(x: &[i16], from: usize, to: usize) -> &[i16] {
    let to = to.min(x.len());
    &x[from.min(to)..to]
}

/// Position of the first loud sample.
pub fn first_loud(x: &[i16]) -> Option<usize> {
    x.iter().position(|s| s.unsigned_abs() >= LOUD as u16)
}

/// Asserts that `got` loud samples are within `tolerance` (a fraction) of `want`.
#[track_caller]
pub fn assert_heard_all(got: usize, want: usize, what: &str) {
    let tol = want / 20 + 8;
    assert!(
        got.abs_diff(want) <= tol,
        "{what}: heard {got} loud samples, the whole utterance has {want} (tolerance {tol})"
    );
}

/// What every call must satisfy: nothing Asterisk rejects, and frames all the time.
#[track_caller]
pub fn assert_clean(report: &CallReport) {
    assert_eq!(
        report.violation_count, 0,
        "protocol violations: {:?}",
        report.protocol_violations
    );
    // Pacing is asserted in virtual time (src/call/scenarios.rs) and measured in the
    // benchmarks; over real sockets on a shared machine only the behaviour is checked:
    // the line never went quiet long enough for Asterisk to drop the call (2 s).
    assert!(
        report.max_gap_ms < 1500.0,
        "the daemon went {} ms without sending a frame",
        report.max_gap_ms
    );
}

// ---- a caller whose line echoes -------------------------------------------------------------

/// What [`echo_call`] saw.
#[derive(Debug)]
pub struct EchoCall {
    /// Every audio sample received, in order.
    pub recording: Vec<i16>,
    /// The daemon sent 0x00.
    pub server_hangup: bool,
    /// What Asterisk would have rejected.
    pub violations: Vec<String>,
}

/// An 8 kHz call whose line reflects the agent's audio back, like a 2-wire hybrid: every
/// 20 ms it sends the next frame of `play` plus the frame it received `delay_frames` frames
/// earlier scaled by `gain_db`. Hangs up after `play` and a 2 s tail.
pub async fn echo_call(
    addr: SocketAddr,
    play: &[i16],
    gain_db: f64,
    delay_frames: usize,
) -> EchoCall {
    use tokio::sync::mpsc::error::TryRecvError;
    const FRAME: usize = 160;
    let gain = 10f64.powf(gain_db / 20.0);
    let mut peer = super::Peer::connect(addr).await;
    peer.send(&super::uuid_frame()).await;
    let mut received: Vec<Vec<i16>> = Vec::new();
    let mut server_hangup = false;
    let frames = play.len().div_ceil(FRAME) + 100;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let run = async {
        'call: for n in 0..frames {
            tick.tick().await;
            loop {
                match peer.frames.try_recv() {
                    Ok(f) if f.kind == 0x00 => {
                        server_hangup = true;
                        break 'call;
                    }
                    Ok(f) => received.push(super::samples(&f)),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => break 'call,
                }
            }
            let mut out: Vec<i16> = (0..FRAME)
                .map(|i| play.get(n * FRAME + i).copied().unwrap_or(0))
                .collect();
            if let Some(echo) = n.checked_sub(delay_frames).and_then(|k| received.get(k)) {
                for (o, e) in out.iter_mut().zip(echo) {
                    let mixed = f64::from(*o) + f64::from(*e) * gain;
                    *o = mixed.clamp(-32768.0, 32767.0) as i16;
                }
            }
            peer.send_lossy(&super::audio_frame(0x10, &out)).await;
        }
    };
    tokio::time::timeout(CALL_GUARD, run)
        .await
        .expect("echo call ends within the guard");
    drop(peer.write);
    let violations = peer.violations.lock().unwrap().clone();
    EchoCall {
        recording: received.concat(),
        server_hangup,
        violations,
    }
}
