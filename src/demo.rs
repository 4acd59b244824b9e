//! `sifucall demo`: one complete AI call on a machine with no API keys.
//!
//! It starts the fake providers ([`crate::sandbox`]), the daemon in AI mode pointed at them,
//! and the synthetic caller ([`crate::caller`]) speaking committed Malay recordings exactly
//! as Asterisk would: it waits for the greeting, asks a question, listens to the answer,
//! says goodbye, and the agent hangs up. Everything between the caller and the fakes is the
//! production code path: AudioSocket, the session, VAD, the Azure websocket protocol,
//! OpenRouter SSE, the ElevenLabs websocket, playout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::app::{self, Hooks};
use crate::audio::wav;
use crate::audiosocket::SampleRate;
use crate::call::CallSummary;
use crate::caller::{self, CallOptions, CallReport};
use crate::ops::config::{AgentMode, Settings};
use crate::ops::records::{Role, TurnTiming};
use crate::sandbox::{Sandbox, SandboxConfig, elevenlabs, openrouter};

/// The caller's question, 8 kHz (espeak-ng, Malay voice; see `tests/fixtures/make.sh`).
pub const QUESTION_WAV: &[u8] = include_bytes!("../tests/fixtures/malay_question_8k.wav");
/// The caller's goodbye, 8 kHz.
pub const GOODBYE_WAV: &[u8] = include_bytes!("../tests/fixtures/malay_goodbye_8k.wav");
/// What the question says (the fake STT reports it).
pub const QUESTION_TEXT: &str = "Selamat pagi, saya nak tanya tentang harga pakej internet.";
/// What the goodbye says.
pub const GOODBYE_TEXT: &str = "Terima kasih, itu sahaja, selamat tinggal.";

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where to write the call audio (left: caller, right: agent).
    pub wav_out: PathBuf,
    /// Provider delays.
    pub sandbox: SandboxConfig,
}

impl Default for DemoOptions {
    fn default() -> Self {
        let mut sandbox = SandboxConfig::realistic();
        sandbox.azure.transcripts = vec![QUESTION_TEXT.into(), GOODBYE_TEXT.into()];
        Self {
            wav_out: PathBuf::from("demo-call.wav"),
            sandbox,
        }
    }
}

/// The demo failed to run (not: the call went badly, which the report shows).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A component could not start.
    #[error("could not start {what}: {detail}")]
    Start {
        /// Which.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The call could not be placed.
    #[error("the synthetic call failed: {0}")]
    Call(String),
    /// The daemon reported no call.
    #[error("the daemon did not report the call")]
    NoSummary,
}

/// What happened.
#[derive(Debug)]
pub struct DemoReport {
    /// The daemon's account (transcript, timings, end reason).
    pub summary: CallSummary,
    /// The caller's account (what it heard, pacing).
    pub caller: CallReport,
    /// Where the audio went.
    pub wav_out: PathBuf,
}

fn ms(d: f64) -> Duration {
    Duration::from_secs_f64(d / 1000.0)
}

/// Runs the demo call.
pub async fn run(opts: DemoOptions, mut settings: Settings) -> Result<DemoReport, DemoError> {
    let sandbox = Sandbox::start(opts.sandbox.clone())
        .await
        .map_err(|e| DemoError::Start {
            what: "the fake providers",
            detail: e.to_string(),
        })?;
    settings.agent.mode = AgentMode::Ai;
    if settings.records.url == Settings::defaults().records.url {
        // The demo's scripted call is not history: not into the system's records database.
        settings.records.url = String::new();
    }
    let loopback_any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    settings.audiosocket.listen = loopback_any_port;
    settings.admin.listen = loopback_any_port;
    sandbox.point(&mut settings);
    let rate = 8_000u32;
    let greeting_ms = elevenlabs::speech_samples(&settings.agent.greeting, rate) as f64 / 8.0;
    let reply_ms =
        elevenlabs::speech_samples(&openrouter::malay_reply(QUESTION_TEXT), rate) as f64 / 8.0;

    let shutdown = CancellationToken::new();
    let (bound_tx, bound_rx) = oneshot::channel();
    let (sum_tx, mut sum_rx) = mpsc::unbounded_channel();
    let hooks = Hooks {
        on_bound: Some(bound_tx),
        on_call_end: Some(Arc::new(move |s: CallSummary| {
            let _ = sum_tx.send(s);
        })),
    };
    let daemon = tokio::spawn(app::run(settings, shutdown.clone(), hooks));
    let bound = match bound_rx.await {
        Ok(b) => b,
        Err(_) => {
            let detail = match daemon.await {
                Ok(Err(e)) => e.to_string(),
                _ => "it stopped".into(),
            };
            return Err(DemoError::Start {
                what: "the daemon",
                detail,
            });
        }
    };

    // Wait for the greeting (the prompt cache fills at startup), then speak.
    let question = wav::read_bytes(QUESTION_WAV, "question fixture")
        .map_err(|e| DemoError::Call(e.to_string()))?;
    let goodbye = wav::read_bytes(GOODBYE_WAV, "goodbye fixture")
        .map_err(|e| DemoError::Call(e.to_string()))?;
    let silence = |d: f64| vec![0i16; (d * f64::from(rate) / 1000.0) as usize];
    let mut play = silence(greeting_ms + 600.0);
    play.extend(&question.samples);
    play.extend(silence(reply_ms + 1_800.0));
    play.extend(&goodbye.samples);
    let mut call = CallOptions::new(bound.audiosocket.to_string());
    call.rate = SampleRate::Hz8000;
    call.play = play.clone();
    call.until_server_hangup = true;
    call.tail = Duration::from_secs(8);
    call.hangup_after = Some(ms(play.len() as f64 / 8.0) + Duration::from_secs(20));
    let report = caller::place_call(call)
        .await
        .map_err(|e| DemoError::Call(e.to_string()))?;
    let summary = tokio::time::timeout(Duration::from_secs(5), sum_rx.recv())
        .await
        .ok()
        .flatten();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), daemon).await;
    let summary = summary.ok_or(DemoError::NoSummary)?;
    let _ = wav::write_stereo(&opts.wav_out, rate, &play, &report.recording);
    Ok(DemoReport {
        summary,
        caller: report,
        wav_out: opts.wav_out,
    })
}

/// The report as the demo prints it.
pub fn render(r: &DemoReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let s = &r.summary;
    let _ = writeln!(
        out,
        "\nsifucall demo: one AI call through AudioSocket, Azure STT, OpenRouter and ElevenLabs"
    );
    let _ = writeln!(
        out,
        "(local stand-ins speaking the real wire formats; no API keys used)\n"
    );
    let agent = s.agent.clone().unwrap_or_default();
    for line in &agent.transcript {
        let who = match line.role {
            Role::Caller => "caller",
            Role::Agent => "agent ",
            Role::Dtmf => "dtmf  ",
        };
        let cut = if line.interrupted {
            " [interrupted]"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {:>6.2}s  {who}  {}{cut}",
            // When the words started, as heard or said (older records: when settled).
            line.start_ms.unwrap_or(line.at_ms) as f64 / 1000.0,
            line.text
        );
    }
    let _ = writeln!(
        out,
        "\nPer-turn latency (ms after the caller stopped speaking):"
    );
    let _ = writeln!(
        out,
        "  turn | STT final | LLM 1st token | TTS 1st audio | 1st frame on wire"
    );
    for (i, t) in agent.turns.iter().enumerate() {
        let rel = |v: Option<u64>, t: &TurnTiming| match (v, t.speech_end_ms.or(t.stt_final_ms)) {
            (Some(v), Some(base)) => format!("{:>5}", v.saturating_sub(base)),
            _ => "    -".into(),
        };
        let _ = writeln!(
            out,
            "  {:>4} | {:>9} | {:>13} | {:>13} | {:>17}",
            i + 1,
            rel(t.stt_final_ms, t),
            rel(t.llm_first_token_ms, t),
            rel(t.tts_first_audio_ms, t),
            rel(t.first_frame_ms, t)
        );
    }
    let c = &r.caller;
    let _ = writeln!(
        out,
        "\nCall: ended by {} after {:.1} s; {} frames out, {} underruns; caller saw {} protocol violations, frame jitter p99 {:.1} ms.",
        s.reason.as_str(),
        s.duration.as_secs_f64(),
        s.frames_out,
        s.underruns,
        c.violation_count,
        c.frame_jitter_ms.p99
    );
    if !agent.errors.is_empty() {
        let _ = writeln!(out, "Provider errors: {:?}", agent.errors);
    }
    let _ = writeln!(
        out,
        "Call audio (left: caller, right: agent): {}",
        r.wav_out.display()
    );
    out
}
