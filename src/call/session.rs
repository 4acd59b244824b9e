//! One task per call: owns the socket, the 20 ms clock and the playout buffer.
//!
//! The loop reads the socket at every turn (Asterisk's writes are non-blocking: a server
//! that stops reading ends the call), sends exactly one frame per deadline, and talks to the
//! agent only through bounded channels, so nothing the agent does can stall the socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};
use uuid::Uuid;

use super::agent::{AgentCommand, AgentFactory, AgentHandle, AgentInput, CallInfo};
use super::playout::{FRAME, Playout, PlayoutEvent, UtteranceId};
use crate::audio::pcm;
use crate::audiosocket::{Inbound, Outbound, SampleRate, ServerCodec};
use crate::ops::metrics::{EndReason, Metrics};

/// How long to wait for the first audio message (which tells the call's rate) before
/// assuming 8 kHz, the rate `AudioSocket()` always uses.
const RATE_WAIT: Duration = Duration::from_millis(500);
/// Hang up this long after the last audio frame's play-out time, or Asterisk cuts it.
const HANGUP_TAIL: Duration = Duration::from_millis(100);
/// A single frame write that takes longer than this means the peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Echo mode: start echoing once this many frames are queued, to absorb the phase between
/// the caller's clock and ours.
const ECHO_PREBUFFER_FRAMES: usize = 2;
/// Echo mode: cap on echo latency.
const ECHO_MAX_QUEUED: Duration = Duration::from_millis(200);

/// How the call behaves.
#[derive(Clone)]
pub enum Behaviour {
    /// Loop the caller's audio back: a plumbing test.
    Echo,
    /// Run an agent.
    Agent(Arc<dyn AgentFactory>),
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Echo => "Echo",
            Self::Agent(_) => "Agent",
        })
    }
}

/// Everything a call needs from the daemon.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Deadline for the UUID message.
    pub first_message_timeout: Duration,
    /// Echo or agent.
    pub behaviour: Behaviour,
}

/// What happened on a call, for the summary line and the call record.
#[derive(Debug, Clone)]
pub struct CallSummary {
    /// The UUID, if one arrived.
    pub call_id: Option<Uuid>,
    /// Where from.
    pub peer: SocketAddr,
    /// Why it ended.
    pub reason: EndReason,
    /// Error detail, for protocol and I/O errors.
    pub detail: Option<String>,
    /// The call's rate.
    pub rate: Option<SampleRate>,
    /// Wall time.
    pub duration: Duration,
    /// Messages received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Playout underruns.
    pub underruns: u64,
    /// Inbound audio dropped because the agent fell behind.
    pub inbound_dropped: u64,
    /// DTMF digits in order.
    pub dtmf: String,
    /// The agent's transcript and timings (AI mode).
    pub agent: Option<super::agent::AgentReport>,
}

/// Counters kept while the call runs.
#[derive(Debug, Default)]
struct Counters {
    frames_in: u64,
    frames_out: u64,
    inbound_dropped: u64,
    dtmf: String,
}

enum Flow {
    Continue,
    End(EndReason, Option<String>),
}

/// Runs one call to its end, once its UUID has arrived (the listener reads the UUID, so a
/// connection holds a call slot only from then on). `started` is when the connection was
/// accepted. Never panics on peer input; always returns a summary.
pub async fn serve_call(
    framed: Framed<TcpStream, ServerCodec>,
    call_id: Uuid,
    peer: SocketAddr,
    started: Instant,
    cfg: SessionConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> CallSummary {
    let mut summary = CallSummary {
        call_id: None,
        peer,
        reason: EndReason::FirstMessageTimeout,
        detail: None,
        rate: None,
        duration: Duration::ZERO,
        frames_in: 0,
        frames_out: 0,
        underruns: 0,
        inbound_dropped: 0,
        dtmf: String::new(),
        agent: None,
    };
    summary.call_id = Some(call_id);
    metrics.frames_in(1);
    let span = tracing::info_span!("call", call_id = %call_id, peer = %peer);
    metrics.call_started();
    span.in_scope(|| info!("call started"));

    let mut call = ActiveCall {
        framed,
        cfg,
        metrics: Arc::clone(&metrics),
        shutdown,
        call_id,
        peer,
        started,
        rate: None,
        playout: None,
        agent: None,
        report: None,
        agent_cancel: CancellationToken::new(),
        counters: Counters {
            frames_in: 1,
            ..Counters::default()
        },
        echo: EchoState::default(),
        hangup_requested: false,
        hangup_at: None,
        end_reason: EndReason::AgentHangup,
    };
    let (reason, detail) = call.run().instrument(span.clone()).await;
    call.agent_cancel.cancel();
    if let Some(rx) = call.report.take() {
        summary.agent = timeout(Duration::from_millis(500), rx)
            .await
            .ok()
            .and_then(Result::ok);
    }
    summary.reason = reason;
    summary.detail = detail;
    summary.rate = call.rate;
    summary.frames_in = call.counters.frames_in;
    summary.frames_out = call.counters.frames_out;
    summary.inbound_dropped = call.counters.inbound_dropped;
    summary.underruns = call.playout.as_ref().map_or(0, |p| p.stats().underruns);
    summary.dtmf = std::mem::take(&mut call.counters.dtmf);
    span.in_scope(|| finish(summary, started, &metrics))
}

fn finish(mut summary: CallSummary, started: Instant, metrics: &Metrics) -> CallSummary {
    summary.duration = started.elapsed();
    if summary.call_id.is_some() {
        metrics.call_ended(summary.reason, summary.duration);
    }
    info!(
        reason = summary.reason.as_str(),
        detail = summary.detail.as_deref().unwrap_or(""),
        duration_ms = summary.duration.as_millis() as u64,
        rate = summary.rate.map_or(0, SampleRate::hz),
        frames_in = summary.frames_in,
        frames_out = summary.frames_out,
        underruns = summary.underruns,
        inbound_dropped = summary.inbound_dropped,
        dtmf = %summary.dtmf,
        "call ended"
    );
    summary
}

#[derive(Debug, Default)]
struct EchoState {
    utterance: u64,
    open: bool,
    last_audio: Option<Instant>,
}

struct ActiveCall {
    framed: Framed<TcpStream, ServerCodec>,
    cfg: SessionConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    call_id: Uuid,
    peer: SocketAddr,
    started: Instant,
    rate: Option<SampleRate>,
    playout: Option<Playout>,
    agent: Option<AgentHandle>,
    report: Option<tokio::sync::oneshot::Receiver<super::agent::AgentReport>>,
    agent_cancel: CancellationToken,
    counters: Counters,
    echo: EchoState,
    hangup_requested: bool,
    hangup_at: Option<Instant>,
    end_reason: EndReason,
}

impl ActiveCall {
    async fn run(&mut self) -> (EndReason, Option<String>) {
        let rate_deadline = self.started + RATE_WAIT;
        loop {
            let deadline = self.next_deadline(rate_deadline);
            let flow = tokio::select! {
                biased;
                msg = self.framed.next() => self.on_inbound(msg),
                () = sleep_until(deadline.into()) => self.on_timer().await,
                cmd = recv_command(&mut self.agent) => self.on_command(cmd),
                () = self.shutdown.cancelled(), if self.hangup_at.is_none() && !self.hangup_requested => {
                    info!("daemon shutting down: hanging up");
                    self.end_reason = EndReason::Shutdown;
                    self.agent_cancel.cancel();
                    self.agent = None;
                    if let Some(p) = self.playout.as_mut() {
                        p.flush();
                    }
                    self.schedule_hangup();
                    Flow::Continue
                }
            };
            if let Flow::End(reason, detail) = flow {
                return (reason, detail);
            }
        }
    }

    fn next_deadline(&self, rate_deadline: Instant) -> Instant {
        let mut d = match &self.playout {
            Some(p) => p.next_deadline(),
            None => rate_deadline,
        };
        if let Some(h) = self.hangup_at {
            d = d.min(h);
        }
        d
    }

    fn on_inbound(&mut self, msg: Option<Result<Inbound, crate::audiosocket::FrameError>>) -> Flow {
        let msg = match msg {
            None => return Flow::End(EndReason::CallerHangup, None),
            // A caller who hangs up while our frames are still unread resets the connection:
            // that is a hangup, not a fault.
            Some(Err(crate::audiosocket::FrameError::Io(e)))
                if e.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                return Flow::End(EndReason::CallerHangup, Some("connection reset".into()));
            }
            Some(Err(crate::audiosocket::FrameError::Io(e))) => {
                return Flow::End(EndReason::IoError, Some(e.to_string()));
            }
            Some(Err(e)) => {
                warn!(error = %e, "protocol error from Asterisk");
                return Flow::End(EndReason::ProtocolError, Some(e.to_string()));
            }
            Some(Ok(m)) => m,
        };
        self.counters.frames_in += 1;
        self.metrics.frames_in(1);
        match msg {
            Inbound::Audio { rate, pcm } => {
                let now = Instant::now();
                if self.rate.is_none() {
                    self.begin(rate, now);
                }
                if Some(rate) != self.rate {
                    debug!(got = %rate, "audio at a different rate than the call's; ignored");
                    return Flow::Continue;
                }
                let samples = pcm::le_bytes_to_samples(&pcm);
                self.on_caller_audio(samples, now);
                Flow::Continue
            }
            Inbound::Dtmf(d) => {
                info!(digit = %d, "DTMF");
                self.counters.dtmf.push(d.as_char());
                self.metrics.dtmf();
                self.send_to_agent(AgentInput::Dtmf(d));
                Flow::Continue
            }
            Inbound::Hangup => Flow::End(EndReason::HangupFrame, None),
            Inbound::Error(code) => {
                warn!(code = ?code.as_ref(), "Asterisk sent an error message");
                Flow::End(
                    EndReason::ErrorFrame,
                    Some(format!("error payload {:02x?}", code.as_ref())),
                )
            }
            // The codec rejects a second UUID, so this cannot happen.
            Inbound::Uuid(_) => Flow::End(EndReason::ProtocolError, Some("second UUID".into())),
        }
    }

    fn begin(&mut self, rate: SampleRate, now: Instant) {
        info!(rate = rate.hz(), "call rate known");
        self.rate = Some(rate);
        let mut playout = Playout::new(rate, now);
        if let Behaviour::Echo = self.cfg.behaviour {
            playout.set_prebuffer(rate.samples_per_frame() * ECHO_PREBUFFER_FRAMES);
            playout
                .set_max_queued((rate.hz() as usize) * ECHO_MAX_QUEUED.as_millis() as usize / 1000);
        }
        self.playout = Some(playout);
        if let Behaviour::Agent(factory) = &self.cfg.behaviour {
            let info = CallInfo {
                call_id: self.call_id,
                peer: self.peer,
                rate,
                started: self.started,
            };
            let mut handle = factory.start(info, self.agent_cancel.clone());
            self.report = handle.report.take();
            for cmd in std::mem::take(&mut handle.initial) {
                self.apply_command(cmd);
            }
            self.agent = Some(handle);
        }
    }

    fn on_caller_audio(&mut self, samples: Vec<i16>, now: Instant) {
        match self.cfg.behaviour {
            Behaviour::Echo => {
                if self.hangup_at.is_some() || self.hangup_requested {
                    return;
                }
                if let Some(p) = self.playout.as_mut() {
                    if !self.echo.open {
                        self.echo.utterance += 1;
                        self.echo.open = true;
                    }
                    p.push(UtteranceId(self.echo.utterance), &samples);
                    self.echo.last_audio = Some(now);
                }
            }
            Behaviour::Agent(_) => self.send_to_agent(AgentInput::Audio(samples)),
        }
    }

    fn send_to_agent(&mut self, input: AgentInput) {
        if let Some(agent) = &self.agent
            && let Err(e) = agent.input.try_send(input)
        {
            if let tokio::sync::mpsc::error::TrySendError::Full(AgentInput::Audio(_)) = e {
                self.counters.inbound_dropped += 1;
                self.metrics.inbound_dropped(1);
            } else {
                debug!("agent input not delivered (agent busy or gone)");
            }
        }
    }

    fn on_command(&mut self, cmd: Option<AgentCommand>) -> Flow {
        let Some(cmd) = cmd else {
            // The agent ended without asking to hang up: it failed. End politely.
            warn!("agent stopped; hanging up");
            self.agent = None;
            self.hangup_requested = true;
            self.end_reason = EndReason::AgentHangup;
            self.maybe_schedule_hangup();
            return Flow::Continue;
        };
        self.apply_command(cmd);
        Flow::Continue
    }

    fn apply_command(&mut self, cmd: AgentCommand) {
        let Some(playout) = self.playout.as_mut() else {
            return;
        };
        match cmd {
            AgentCommand::Play { utterance, pcm } => {
                if self.hangup_at.is_none() {
                    playout.push_now(utterance, &pcm, Instant::now());
                }
            }
            AgentCommand::Finish(u) => playout.finish(u),
            AgentCommand::Flush => {
                let progress = playout.flush();
                self.send_to_agent(AgentInput::Flushed(progress));
            }
            AgentCommand::Hangup => {
                info!("agent ended the call");
                self.hangup_requested = true;
                self.end_reason = EndReason::AgentHangup;
                self.maybe_schedule_hangup();
            }
        }
    }

    fn maybe_schedule_hangup(&mut self) {
        if self.hangup_requested
            && self.hangup_at.is_none()
            && self.playout.as_ref().is_none_or(Playout::is_idle)
        {
            self.schedule_hangup();
        }
    }

    fn schedule_hangup(&mut self) {
        let now = Instant::now();
        let at = self
            .playout
            .as_ref()
            .and_then(Playout::last_speech_end)
            .map_or(now, |end| end + HANGUP_TAIL)
            .max(now);
        self.hangup_at = Some(at);
    }

    async fn on_timer(&mut self) -> Flow {
        let now = Instant::now();
        if let Some(at) = self.hangup_at
            && now >= at
        {
            return match self.send(Outbound::Hangup).await {
                Ok(()) => Flow::End(self.end_reason, None),
                Err((reason, e)) => Flow::End(reason, Some(e)),
            };
        }
        if self.playout.is_none() {
            if now >= self.started + RATE_WAIT {
                debug!("no audio yet; assuming 8 kHz");
                self.begin(SampleRate::Hz8000, now);
            }
            return Flow::Continue;
        }
        self.echo_idle_check(now);
        let Some(playout) = self.playout.as_mut() else {
            return Flow::Continue;
        };
        let Some(tick) = playout.poll(now) else {
            return Flow::Continue;
        };
        let rate = self.rate.unwrap_or(SampleRate::Hz8000);
        self.metrics.pacing_lateness(tick.lateness);
        let mut events = Vec::new();
        while let Some(ev) = playout.poll_event() {
            if let PlayoutEvent::Underrun { .. } = ev {
                self.metrics.underrun();
            }
            events.push(ev);
        }
        let frame = match Outbound::audio_samples(rate, &tick.pcm) {
            Ok(f) => f,
            // A frame is always frame_samples long and non-empty; keep the call up regardless.
            Err(e) => return Flow::End(EndReason::WriteFailed, Some(e.to_string())),
        };
        if let Err((reason, e)) = self.send(frame).await {
            return Flow::End(reason, Some(e));
        }
        self.counters.frames_out += 1;
        self.metrics.frames_out(1);
        for ev in events {
            self.send_to_agent(AgentInput::Playout(ev));
        }
        self.maybe_schedule_hangup();
        Flow::Continue
    }

    /// Echo mode: when the caller's audio stops, close the echo utterance so caller silence
    /// is not counted as playout underruns.
    fn echo_idle_check(&mut self, now: Instant) {
        if !matches!(self.cfg.behaviour, Behaviour::Echo) || !self.echo.open {
            return;
        }
        if self
            .echo
            .last_audio
            .is_some_and(|t| now.duration_since(t) > FRAME * 3)
        {
            if let Some(p) = self.playout.as_mut() {
                p.finish(UtteranceId(self.echo.utterance));
            }
            self.echo.open = false;
        }
    }

    /// Writes one message; on failure says why the call ends. A peer that closed (the
    /// caller hung up between our read and our write) is a hangup, not a write fault.
    async fn send(&mut self, msg: Outbound) -> Result<(), (EndReason, String)> {
        match timeout(WRITE_TIMEOUT, self.framed.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                Err((EndReason::CallerHangup, format!("peer closed: {e}")))
            }
            Ok(Err(e)) => Err((EndReason::WriteFailed, format!("write failed: {e}"))),
            Err(_) => Err((
                EndReason::WriteFailed,
                format!("write blocked for {WRITE_TIMEOUT:?}: peer not reading"),
            )),
        }
    }
}

async fn recv_command(agent: &mut Option<AgentHandle>) -> Option<AgentCommand> {
    match agent {
        Some(a) => a.commands.recv().await,
        None => std::future::pending().await,
    }
}
