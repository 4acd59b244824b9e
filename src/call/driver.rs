//! The only I/O of a call: one task that reads the socket, writes the frames the machine
//! asks for, runs the provider work as tasks, feeds their results back as inputs, and sleeps
//! until the machine's next deadline. It never awaits a provider in its loop.
//!
//! Order of the loop (biased): the outbound timer first (a flooding or chatty peer cannot
//! delay our frames), then control events from the provider tasks (never dropped: the tasks
//! wait for room), then recognition events, then the socket. The socket is read at every
//! turn, because Asterisk's writes are non-blocking and a server that stops reading ends
//! the call; input beyond twice real time is dropped and counted, far beyond it ends the
//! call. A peer that stops reading our frames is noticed from the socket's send queue.
//! (Why each of these matters to Asterisk: `docs/audiosocket.md`; the design: `docs/call-core.md`.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};
use uuid::Uuid;

use super::context::{CONTEXT_DEADLINE, CallContext, CallControl, CallOutcome, DECISION_DEADLINE};
use super::hangup::HangupReason;
use super::machine::{
    AgentConfig, AgentReport, CallMachine, Effect, Input, Mode, PromptChunk, ReplyEvent, ReplyId,
    STREAMED_PROMPTS,
};
use super::profile::ProfileSetup;
use super::prompts::{PromptCache, PromptKind};
use super::reply::{self, Providers};
use crate::audio::pcm;
use crate::audiosocket::{FrameError, Inbound, Outbound, SampleRate, ServerCodec};
use crate::ops::live::{LiveCalls, LiveGuard};
use crate::ops::metrics::{EndReason, Metrics};
use crate::ops::profiles::{DEFAULT_PROFILE, DEFAULT_TIME_ZONE};
use crate::providers::stt::{SttEvent, SttSession};
use crate::providers::tts::TtsOutput;

/// A single frame write that takes longer than this means the peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Close a peer that leaves more than this much of our audio unread in the socket.
const MAX_UNSENT_AUDIO: Duration = Duration::from_secs(2);
/// How often the send queue is looked at.
const UNSENT_CHECK_EVERY: Duration = Duration::from_millis(500);
/// Caller audio beyond this multiple of real time (per one-second window) is dropped...
const INPUT_BUDGET: u64 = 2;
/// ... and beyond this multiple the call is ended: no PBX sends that.
const INPUT_FLOOD: u64 = 10;
/// Longest wait for a phrase that is not cached (the caller is hearing silence meanwhile).
const PROMPT_DEADLINE: Duration = Duration::from_millis(800);
/// Longest wait for a phrase with variables, which every call synthesizes for itself: for
/// the first audio of a streamed one, for the whole of the others (a greeting takes a good
/// part of its own length to synthesize).
const PER_CALL_PROMPT_DEADLINE: Duration = Duration::from_secs(3);
/// A streamed phrase whose audio stops arriving for this long ends where its audio ends.
const PROMPT_STREAM_STALL: Duration = Duration::from_secs(2);
/// Longest wait for the recognition's websocket to open.
const STT_START_DEADLINE: Duration = Duration::from_secs(5);
/// Room for control events from the provider tasks (they wait when it is full).
const CONTROL_QUEUE: usize = 64;

/// Everything the AI agent needs, shared by all calls.
#[derive(Debug)]
pub struct AgentSetup {
    /// The provider clients.
    pub providers: Providers,
    /// The fixed phrases.
    pub prompts: Arc<PromptCache>,
    /// How the agent behaves.
    pub cfg: Arc<AgentConfig>,
}

/// How the call behaves.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Loop the caller's audio back: a plumbing test.
    Echo,
    /// Run the voice agent.
    Agent(Arc<AgentSetup>),
    /// Run the voice agent of the call's profile (chosen from its context).
    Profiles(Arc<super::profile::AgentProfiles>),
}

/// Everything a call needs from the daemon.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Deadline for the UUID message.
    pub first_message_timeout: Duration,
    /// Echo or agent.
    pub behaviour: Behaviour,
    /// End the call after this long without anything from the peer (and, in AI mode,
    /// without anybody speaking).
    pub idle_hangup: Option<Duration>,
    /// The side channel to the PBX: the call's context, and its outcome before 0x00.
    pub control: Arc<dyn CallControl>,
    /// The calls in progress, for the console (keep the daemon's one across reloads).
    pub live: LiveCalls,
    /// The call records, written as the call goes (the end of call goes through the
    /// server's `on_call_end`); `None`: nothing is written during the call.
    pub records: Option<Arc<crate::ops::records::RecordSink>>,
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
    /// Inbound audio dropped (over the input budget, or the recogniser behind).
    pub inbound_dropped: u64,
    /// DTMF digits in order.
    pub dtmf: String,
    /// The agent's transcript and timings (AI mode).
    pub agent: Option<AgentReport>,
    /// Who called and what they dialled, as far as the PBX told us.
    pub context: CallContext,
    /// How the call ended, as the dialplan was told.
    pub outcome: Option<CallOutcome>,
    /// The agent profile the call ran with (empty in echo mode or without a call).
    pub profile: String,
    /// The call's stereo recording, when one was made.
    pub recording: Option<std::path::PathBuf>,
}

impl CallSummary {
    /// A connection that ended before (or without) a call.
    pub fn no_call(peer: SocketAddr, reason: EndReason, detail: Option<String>) -> Self {
        Self {
            call_id: None,
            peer,
            reason,
            detail,
            rate: None,
            duration: Duration::ZERO,
            frames_in: 0,
            frames_out: 0,
            underruns: 0,
            inbound_dropped: 0,
            dtmf: String::new(),
            agent: None,
            context: CallContext::default(),
            outcome: None,
            profile: String::new(),
            recording: None,
        }
    }
}

/// A call's transport: TCP in production, an in-memory pipe in tests.
pub trait CallStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Bytes written but not yet taken by the peer, where the transport can tell.
    fn unsent_bytes(&self) -> Option<usize> {
        None
    }
}

impl CallStream for TcpStream {
    fn unsent_bytes(&self) -> Option<usize> {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int for a valid socket descriptor, which `self` owns.
        let rc = unsafe { libc::ioctl(self.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        (rc == 0).then(|| usize::try_from(n).unwrap_or(0))
    }
}

impl CallStream for tokio::io::DuplexStream {}

/// Runs one connection to its end: waits for the UUID, then serves the call. Never panics
/// on peer input; always returns a summary.
pub async fn run<S: CallStream>(
    stream: S,
    peer: SocketAddr,
    cfg: SessionConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> CallSummary {
    let started = now();
    let mut framed = Framed::new(stream, ServerCodec::new());
    let first = tokio::select! {
        r = timeout(cfg.first_message_timeout, framed.next()) => r,
        () = shutdown.cancelled() => {
            return CallSummary::no_call(peer, EndReason::Shutdown, None);
        }
    };
    let call_id = match first {
        Err(_) => {
            let detail = format!("no UUID within {:?}", cfg.first_message_timeout);
            warn!(%peer, "{detail}");
            return CallSummary::no_call(peer, EndReason::FirstMessageTimeout, Some(detail));
        }
        Ok(None) => {
            debug!(%peer, "closed before sending a UUID");
            return CallSummary::no_call(peer, EndReason::CallerHangup, None);
        }
        Ok(Some(Err(e))) => {
            warn!(%peer, error = %e, "bad first message");
            return CallSummary::no_call(peer, EndReason::ProtocolError, Some(e.to_string()));
        }
        Ok(Some(Ok(Inbound::Uuid(id)))) => id,
        Ok(Some(Ok(other))) => {
            return CallSummary::no_call(
                peer,
                EndReason::ProtocolError,
                Some(format!("unexpected first message {other:?}")),
            );
        }
    };
    serve_call(framed, call_id, peer, started, cfg, metrics, shutdown).await
}

/// Serves a call whose UUID has arrived (at `started`) until it ends.
pub async fn serve_call<S: CallStream>(
    framed: Framed<S, ServerCodec>,
    call_id: Uuid,
    peer: SocketAddr,
    started: Instant,
    cfg: SessionConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> CallSummary {
    metrics.frames_in(1);
    metrics.call_started();
    let span = tracing::info_span!("call", call_id = %call_id, peer = %peer);
    let context = tokio::select! {
        r = timeout(CONTEXT_DEADLINE, cfg.control.context(call_id)) => r.unwrap_or_else(|_| {
            span.in_scope(|| {
                warn!("no call context within {CONTEXT_DEADLINE:?}: default profile");
            });
            CallContext::default()
        }),
        () = shutdown.cancelled() => CallContext::default(),
    };
    span.in_scope(|| {
        info!(
            caller = context.caller_number.as_deref().unwrap_or(""),
            did = context.did.as_deref().unwrap_or(""),
            "call started"
        );
    });
    let chosen = match &cfg.behaviour {
        Behaviour::Echo => None,
        Behaviour::Agent(setup) => Some(ProfileSetup::new(
            DEFAULT_PROFILE,
            Arc::clone(setup),
            DEFAULT_TIME_ZONE,
        )),
        Behaviour::Profiles(profiles) => span.in_scope(|| profiles.select(&context)).cloned(),
    };
    // The pre-call lookup runs with the chosen profile's tools, before its phrases are
    // rendered: its fields are prompt variables ({lookup_*}).
    let mut context = context;
    let lookup = match &chosen {
        Some(profile) => tokio::select! {
            r = pre_call_lookup(&profile.setup, &mut context, started).instrument(span.clone()) => r,
            () = shutdown.cancelled() => None,
        },
        None => None,
    };
    let call = chosen.map(|p| p.for_call(&context, &call_id.to_string(), jiff::Timestamp::now()));
    let (mode, agent, call_prompts, profile) = match call {
        None => (
            Mode::Echo {
                idle_hangup: cfg.idle_hangup,
            },
            None,
            None,
            String::new(),
        ),
        Some(call) => {
            call.setup.providers.llm.warm_up();
            (
                Mode::Agent(call.cfg),
                Some(call.setup),
                call.prompts,
                call.profile,
            )
        }
    };
    let tap = cfg.records.as_ref().and_then(|r| {
        let ago = now().saturating_duration_since(started);
        let wall = std::time::SystemTime::now()
            .checked_sub(ago)
            .unwrap_or(std::time::UNIX_EPOCH);
        r.call_started(crate::ops::records::store::CallStart {
            call_id,
            node_id: r.node_id().to_owned(),
            started_at_ms: crate::ops::records::store::epoch_ms(wall),
            peer: peer.to_string(),
            mode: if matches!(cfg.behaviour, Behaviour::Echo) {
                "echo"
            } else {
                "ai"
            }
            .into(),
            caller_number: context.caller_number.clone(),
            caller_name: context.caller_name.clone(),
            did: context.did.clone(),
            profile: context.profile.clone(),
        })
    });
    let recorder = cfg
        .records
        .as_ref()
        .and_then(|r| r.recorder_for(call_id, &context, started));
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (reply_tx, reply_rx) = mpsc::channel(CONTROL_QUEUE);
    let live = cfg.live.begin(call_id, peer, &context, started);
    let mut driver = Driver {
        framed,
        machine: CallMachine::new(call_id, started, mode, Arc::clone(&metrics)),
        agent,
        call_prompts,
        metrics: Arc::clone(&metrics),
        call_id,
        control: Arc::clone(&cfg.control),
        outcome: None,
        control_tx,
        control_rx,
        reply_tx,
        reply_rx,
        stt: None,
        stt_generation: 0,
        replies: HashMap::new(),
        prompt_streams: HashMap::new(),
        next_prompt_stream: 0,
        tasks: CancellationToken::new(),
        frames_in: 1,
        frames_out: 0,
        inbound_dropped: 0,
        budget: InputBudget::new(started),
        next_unsent_check: started,
        live,
        tap,
        started,
        recorder,
    };
    if let Some(record) = lookup {
        driver.machine.record_tool_call(record);
    }
    let (reason, detail) = driver.run(shutdown).instrument(span.clone()).await;
    driver.tasks.cancel();
    let recording = match driver.recorder.take() {
        // After the call: the file is written off the runtime's threads.
        Some(r) => tokio::task::spawn_blocking(move || r.write())
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let summary = CallSummary {
        call_id: Some(call_id),
        peer,
        reason,
        detail,
        rate: driver.machine.rate(),
        duration: now().saturating_duration_since(started),
        frames_in: driver.frames_in,
        frames_out: driver.frames_out,
        underruns: driver.machine.underruns(),
        inbound_dropped: driver.inbound_dropped,
        dtmf: driver.machine.dtmf().to_owned(),
        agent: driver.machine.report(),
        context,
        outcome: driver.outcome.take(),
        profile,
        recording,
    };
    span.in_scope(|| log_end(&summary, &metrics));
    summary
}

/// The agent's pre-call lookup, if it has one and the caller's number is known: run with
/// `{caller_number}` within its deadline (the caller hears nothing meanwhile, so the deadline
/// is short); its fields become `lookup_*` variables of the context for the greeting and
/// the prompt. On a failure or timeout the call goes on without them.
async fn pre_call_lookup(
    setup: &AgentSetup,
    context: &mut CallContext,
    started: Instant,
) -> Option<super::tools::ToolCallRecord> {
    let name = setup.cfg.tools.pre_call_lookup.as_deref()?;
    let number = context.caller_number.clone()?;
    let deadline = setup.cfg.tools.pre_call_deadline;
    let args = serde_json::json!({ "caller_number": number });
    let at_ms = now().saturating_duration_since(started).as_millis() as u64;
    let run = setup.providers.tools.lookup(name, &args);
    let (out, mut record) = match timeout(deadline, run).await {
        Ok(r) => r,
        Err(_) => {
            let detail = format!(
                "no answer within {} ms (the greeting went on)",
                deadline.as_millis()
            );
            warn!(tool = name, "pre-call lookup: {detail}");
            let record = super::tools::ToolCallRecord {
                name: name.to_owned(),
                arguments: super::tools::redact(&args, setup.providers.tools.redact_fields(name)),
                at_ms,
                duration_ms: deadline.as_millis() as u64,
                status: super::tools::ToolStatus::Timeout,
                detail: Some(detail),
            };
            return Some(record);
        }
    };
    record.at_ms = at_ms;
    if out.status == super::tools::ToolStatus::Ok {
        let vars = super::tools::lookup_vars(&out.content);
        debug!(tool = name, fields = vars.len(), "pre-call lookup done");
        context.vars.extend(vars);
    } else {
        warn!(
            tool = name,
            detail = out.detail.as_deref().unwrap_or(""),
            "pre-call lookup failed; the greeting goes on without it"
        );
    }
    Some(record)
}

fn log_end(summary: &CallSummary, metrics: &Metrics) {
    metrics.call_ended(summary.reason, summary.duration);
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
        profile = %summary.profile,
        "call ended"
    );
}

/// What the provider tasks send back.
enum Control {
    SttStarted(u64, Result<SttSession, String>),
    Prompt(PromptKind, Result<Arc<Vec<i16>>, String>),
    PromptStream(PromptKind, u64, PromptChunk),
}

/// Caller audio per one-second window, against the call's real-time rate.
#[derive(Debug)]
struct InputBudget {
    window_start: Instant,
    samples: u64,
}

enum Admit {
    Take,
    Drop,
    Flood,
}

impl InputBudget {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            samples: 0,
        }
    }

    fn admit(&mut self, rate: SampleRate, samples: usize, now: Instant) -> Admit {
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.samples = 0;
        }
        self.samples += samples as u64;
        let per_sec = u64::from(rate.hz());
        if self.samples > per_sec * INPUT_FLOOD {
            Admit::Flood
        } else if self.samples > per_sec * INPUT_BUDGET {
            Admit::Drop
        } else {
            Admit::Take
        }
    }
}

type Flow = Result<(), (EndReason, Option<String>)>;

struct Driver<S: CallStream> {
    framed: Framed<S, ServerCodec>,
    machine: CallMachine,
    agent: Option<Arc<AgentSetup>>,
    /// This call's own phrases (those with variables), if it has any.
    call_prompts: Option<Arc<PromptCache>>,
    metrics: Arc<Metrics>,
    call_id: Uuid,
    /// The PBX side channel.
    control: Arc<dyn CallControl>,
    /// What the dialplan was told, once the agent hung up.
    outcome: Option<CallOutcome>,
    control_tx: mpsc::Sender<Control>,
    control_rx: mpsc::Receiver<Control>,
    /// Every reply task's events, tagged with its id (the tasks wait for room).
    reply_tx: mpsc::Sender<(ReplyId, ReplyEvent)>,
    reply_rx: mpsc::Receiver<(ReplyId, ReplyEvent)>,
    stt: Option<SttSession>,
    stt_generation: u64,
    replies: HashMap<ReplyId, CancellationToken>,
    /// The phrases being streamed, by stream id (see [`Input::PromptStream`]).
    prompt_streams: HashMap<u64, CancellationToken>,
    next_prompt_stream: u64,
    /// Parent of every task this call started: cancelled when the call ends.
    tasks: CancellationToken,
    frames_in: u64,
    frames_out: u64,
    inbound_dropped: u64,
    budget: InputBudget,
    next_unsent_check: Instant,
    /// This call's line in the live view.
    live: LiveGuard,
    /// Writes the call's progress to the records now and then.
    tap: Option<crate::ops::records::live::CallTap>,
    started: Instant,
    /// The call's stereo recording, when it is recorded.
    recorder: Option<crate::ops::records::recording::Recorder>,
}

impl<S: CallStream> Driver<S> {
    async fn run(&mut self, shutdown: CancellationToken) -> (EndReason, Option<String>) {
        let mut shutdown_seen = false;
        loop {
            if let Err(end) = self.perform().await {
                return end;
            }
            self.sync_records();
            if let Some(reason) = self.machine.hangup_reason() {
                let reason = match reason {
                    HangupReason::Shutdown => EndReason::Shutdown,
                    _ => EndReason::AgentHangup,
                };
                return (reason, None);
            }
            let deadline = self
                .machine
                .poll_timeout()
                .unwrap_or_else(|| now() + Duration::from_secs(3600));
            let flow = tokio::select! {
                biased;
                () = sleep_until(deadline.into()) => {
                    self.machine.handle(Input::Timeout, now());
                    Ok(())
                }
                Some(c) = self.control_rx.recv() => {
                    self.on_control(c);
                    Ok(())
                }
                Some((id, ev)) = self.reply_rx.recv() => {
                    if matches!(ev, ReplyEvent::Done | ReplyEvent::Failed { .. }) {
                        self.replies.remove(&id);
                    }
                    self.machine.handle(Input::Reply(id, ev), now());
                    Ok(())
                }
                ev = recv_stt(&mut self.stt) => {
                    self.on_stt(ev);
                    Ok(())
                }
                msg = self.framed.next() => self.on_inbound(msg),
                () = shutdown.cancelled(), if !shutdown_seen => {
                    shutdown_seen = true;
                    self.machine.handle(Input::Shutdown, now());
                    Ok(())
                }
            };
            if let Err(end) = flow {
                return end;
            }
            let machine = &self.machine;
            self.live
                .update(machine.activity(), machine.turns_key(), || {
                    machine.answered_turns()
                });
        }
    }

    /// Hands what the call produced since the last time to the records (at most once a
    /// second; a few comparisons and a non-blocking queue push).
    fn sync_records(&mut self) {
        let Some(tap) = self.tap.as_mut() else { return };
        let now = now();
        if !tap.due(now) {
            return;
        }
        if let Some(report) = self.machine.progress() {
            let at_ms = now.saturating_duration_since(self.started).as_millis() as u64;
            tap.sync(report, now, at_ms);
        }
    }

    /// How the call ended when the agent hangs up: the machine's decision.
    fn agent_outcome(&self) -> CallOutcome {
        self.machine.outcome()
    }

    /// Performs every effect the machine has queued.
    async fn perform(&mut self) -> Flow {
        while let Some(effect) = self.machine.poll_effect() {
            match effect {
                Effect::Frame {
                    rate,
                    pcm,
                    lateness,
                } => {
                    self.metrics.pacing_lateness(lateness);
                    let frame = Outbound::audio_samples(rate, &pcm)
                        .map_err(|e| (EndReason::WriteFailed, Some(e.to_string())))?;
                    self.send(frame).await?;
                    let now = now();
                    if let Some(r) = self.recorder.as_mut() {
                        r.agent(rate.hz(), &pcm, now);
                    }
                    self.machine.frame_written(now);
                    self.frames_out += 1;
                    self.metrics.frames_out(1);
                    self.check_unsent(rate, now)?;
                }
                Effect::Hangup => {
                    let outcome = self.agent_outcome();
                    info!(outcome = outcome.dialplan_value(), "hanging up");
                    let decide = self.control.decide(self.call_id, outcome.clone());
                    if timeout(DECISION_DEADLINE, decide).await.is_err() {
                        warn!("the PBX did not take the outcome within {DECISION_DEADLINE:?}");
                    }
                    self.outcome = Some(outcome);
                    self.send(Outbound::Hangup).await?;
                }
                Effect::StartStt(params) => self.start_stt(params),
                Effect::SttAudio(pcm) => {
                    if let Some(s) = &self.stt {
                        if s.audio.try_send(pcm).is_err() {
                            self.inbound_dropped += 1;
                            self.metrics.inbound_dropped(1);
                        }
                    }
                }
                Effect::StartReply {
                    id,
                    request,
                    tts,
                    pipeline,
                    tool_rounds,
                } => {
                    let Some(agent) = &self.agent else { continue };
                    let cancel = self.tasks.child_token();
                    self.replies.insert(id, cancel.clone());
                    tokio::spawn(
                        reply::run(
                            id,
                            agent.providers.clone(),
                            request,
                            tts,
                            pipeline,
                            tool_rounds,
                            self.reply_tx.clone(),
                            cancel,
                        )
                        .instrument(tracing::Span::current()),
                    );
                }
                Effect::CancelReply(id) => {
                    if let Some(t) = self.replies.remove(&id) {
                        t.cancel();
                    }
                }
                Effect::Prompt(kind) => self.fetch_prompt(kind),
            }
        }
        Ok(())
    }

    fn start_stt(&mut self, params: crate::providers::stt::SttParams) {
        let Some(agent) = &self.agent else { return };
        self.stt = None;
        self.stt_generation += 1;
        let generation = self.stt_generation;
        let stt = Arc::clone(&agent.providers.stt);
        let tx = self.control_tx.clone();
        let cancel = self.tasks.clone();
        tokio::spawn(
            async move {
                let started = tokio::select! {
                    () = cancel.cancelled() => return,
                    r = timeout(STT_START_DEADLINE, stt.start(params)) => r,
                };
                let result = match started {
                    Ok(Ok(s)) => Ok(s),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no connection within {STT_START_DEADLINE:?}")),
                };
                let _ = tx.send(Control::SttStarted(generation, result)).await;
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// A cached phrase is handed over at once (so the greeting starts in the first frame);
    /// one that is not is synthesized in a task the call waits on for a short while only.
    /// The synthesis itself runs on, so the cache fills for later calls. A phrase with
    /// variables is synthesized for this call; if that fails or is late, the profile's
    /// generic version (variables left out) plays instead, if it is cached.
    fn fetch_prompt(&mut self, kind: PromptKind) {
        let (Some(agent), Some(rate)) = (&self.agent, self.machine.rate()) else {
            return;
        };
        let own = (self.call_prompts.as_ref()).filter(|_| agent.prompts.is_per_call(kind));
        let (prompts, deadline) = match own {
            Some(own) => (own, PER_CALL_PROMPT_DEADLINE),
            None => (&agent.prompts, PROMPT_DEADLINE),
        };
        if let Some(pcm) = prompts.cached(kind, rate.hz()) {
            self.machine.handle(Input::Prompt(kind, Ok(pcm)), now());
            return;
        }
        let generic = own.and_then(|_| agent.prompts.cached(kind, rate.hz()));
        if own.is_some() && STREAMED_PROMPTS.contains(&kind) {
            let own = Arc::clone(prompts);
            self.stream_prompt(kind, own, generic, rate.hz());
            return;
        }
        let prompts = Arc::clone(prompts);
        let tx = self.control_tx.clone();
        let cancel = self.tasks.clone();
        let synth = tokio::spawn(async move { prompts.get(kind, rate.hz()).await });
        tokio::spawn(async move {
            let result = tokio::select! {
                () = cancel.cancelled() => return,
                r = timeout(deadline, synth) => r,
            };
            let result = match result {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => Err(format!("prompt synthesis failed: {e}")),
                Err(_) => Err(format!("not synthesized within {deadline:?}")),
            };
            let result = match (result, generic) {
                (Err(e), Some(generic)) => {
                    warn!(?kind, error = %e, "this call's own phrase failed; playing the generic one");
                    Ok(generic)
                }
                (r, _) => r,
            };
            let _ = tx.send(Control::Prompt(kind, result)).await;
        });
    }

    /// Plays this call's own phrase while it is synthesized: its audio goes to the machine
    /// piece by piece, into the same playout a reply uses. If it fails or has no audio
    /// within [`PER_CALL_PROMPT_DEADLINE`], the generic version plays instead; a failure or
    /// a stall after some audio ends the phrase where its audio ends.
    fn stream_prompt(
        &mut self,
        kind: PromptKind,
        own: Arc<PromptCache>,
        generic: Option<Arc<Vec<i16>>>,
        rate: u32,
    ) {
        self.next_prompt_stream += 1;
        let stream = self.next_prompt_stream;
        let cancel = self.tasks.child_token();
        self.prompt_streams.insert(stream, cancel.clone());
        let tx = self.control_tx.clone();
        tokio::spawn(
            async move {
                let result = tokio::select! {
                    () = cancel.cancelled() => return,
                    r = stream_phrase(&own, kind, rate, stream, &tx) => r,
                };
                let Err(e) = result else { return };
                let result = match generic {
                    Some(generic) => {
                        warn!(?kind, error = %e, "this call's own phrase failed before any audio; playing the generic one");
                        Ok(generic)
                    }
                    None => Err(format!("prompt synthesis failed: {e}")),
                };
                let _ = tx.send(Control::Prompt(kind, result)).await;
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// Feeds one piece of a streamed phrase; stops the synthesis once the caller has
    /// interrupted the phrase (its audio is no longer wanted).
    fn on_prompt_stream(&mut self, kind: PromptKind, stream: u64, chunk: PromptChunk) {
        let audio = matches!(chunk, PromptChunk::Audio(_));
        let end = matches!(chunk, PromptChunk::Done | PromptChunk::Failed(_));
        self.machine.handle(
            Input::PromptStream {
                kind,
                stream,
                chunk,
            },
            now(),
        );
        if end {
            self.prompt_streams.remove(&stream);
        } else if audio && !self.machine.wants_prompt_stream(stream) {
            if let Some(t) = self.prompt_streams.remove(&stream) {
                t.cancel();
            }
            let chunk = PromptChunk::Done;
            let input = Input::PromptStream {
                kind,
                stream,
                chunk,
            };
            self.machine.handle(input, now());
        }
    }

    fn on_control(&mut self, c: Control) {
        let now = now();
        match c {
            Control::SttStarted(generation, result) => {
                if generation != self.stt_generation {
                    return;
                }
                match result {
                    Ok(s) => {
                        self.stt = Some(s);
                        self.machine.handle(Input::SttUp, now);
                    }
                    Err(e) => self.machine.handle(Input::SttDown(e), now),
                }
            }
            Control::Prompt(kind, result) => self.machine.handle(Input::Prompt(kind, result), now),
            Control::PromptStream(kind, stream, chunk) => {
                self.on_prompt_stream(kind, stream, chunk);
            }
        }
    }

    fn on_stt(&mut self, ev: Option<SttEvent>) {
        let now = now();
        match ev {
            Some(ev) => self.machine.handle(Input::Stt(ev), now),
            None => {
                self.stt = None;
                self.machine
                    .handle(Input::SttDown("speech-to-text stream ended".into()), now);
            }
        }
    }

    fn on_inbound(&mut self, msg: Option<Result<Inbound, FrameError>>) -> Flow {
        let msg = match msg {
            None => return Err((EndReason::CallerHangup, None)),
            // A caller who hangs up while our frames are still unread resets the connection:
            // that is a hangup, not a fault.
            Some(Err(FrameError::Io(e))) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err((EndReason::CallerHangup, Some("connection reset".into())));
            }
            Some(Err(FrameError::Io(e))) => return Err((EndReason::IoError, Some(e.to_string()))),
            Some(Err(e)) => {
                warn!(error = %e, "protocol error from Asterisk");
                return Err((EndReason::ProtocolError, Some(e.to_string())));
            }
            Some(Ok(m)) => m,
        };
        self.frames_in += 1;
        self.metrics.frames_in(1);
        let now = now();
        match msg {
            Inbound::Audio { rate, pcm } => {
                let samples = pcm.len() / 2;
                match self.budget.admit(rate, samples, now) {
                    Admit::Take => {
                        let pcm = pcm::le_bytes_to_samples(&pcm);
                        if let Some(r) = self.recorder.as_mut() {
                            r.caller(rate.hz(), &pcm, now);
                        }
                        self.machine.handle(Input::CallerAudio { rate, pcm }, now);
                    }
                    Admit::Drop => {
                        self.inbound_dropped += 1;
                        self.metrics.inbound_dropped(1);
                    }
                    Admit::Flood => {
                        warn!("caller audio at over {INPUT_FLOOD}x real time; ending the call");
                        return Err((
                            EndReason::ProtocolError,
                            Some(format!("audio input over {INPUT_FLOOD}x real time")),
                        ));
                    }
                }
                Ok(())
            }
            Inbound::Dtmf(d) => {
                info!(digit = %d, "DTMF");
                self.machine.handle(Input::Dtmf(d), now);
                Ok(())
            }
            Inbound::Hangup => Err((EndReason::HangupFrame, None)),
            Inbound::Error(code) => {
                warn!(code = ?code.as_ref(), "Asterisk sent an error message");
                Err((
                    EndReason::ErrorFrame,
                    Some(format!("error payload {:02x?}", code.as_ref())),
                ))
            }
            // The codec rejects a second UUID, so this cannot happen.
            Inbound::Uuid(_) => Err((EndReason::ProtocolError, Some("second UUID".into()))),
        }
    }

    /// A peer that stopped reading is noticed from the send queue long before a write
    /// blocks (the kernel takes megabytes first).
    fn check_unsent(&mut self, rate: SampleRate, now: Instant) -> Flow {
        if now < self.next_unsent_check {
            return Ok(());
        }
        self.next_unsent_check = now + UNSENT_CHECK_EVERY;
        let limit = rate.hz() as usize * 2 * MAX_UNSENT_AUDIO.as_secs() as usize;
        match self.framed.get_ref().unsent_bytes() {
            Some(n) if n > limit => {
                warn!(
                    unsent_bytes = n,
                    "peer is not reading our audio; ending the call"
                );
                Err((
                    EndReason::WriteFailed,
                    Some(format!("peer not reading: {n} bytes unsent")),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Writes one message (header and payload in one write); on failure says why the call
    /// ends. A peer that closed (the caller hung up between our read and our write) is a
    /// hangup, not a write fault.
    async fn send(&mut self, msg: Outbound) -> Flow {
        match timeout(WRITE_TIMEOUT, self.framed.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                Err((EndReason::CallerHangup, Some(format!("peer closed: {e}"))))
            }
            Ok(Err(e)) => Err((EndReason::WriteFailed, Some(format!("write failed: {e}")))),
            Err(_) => Err((
                EndReason::WriteFailed,
                Some(format!(
                    "write blocked for {WRITE_TIMEOUT:?}: peer not reading"
                )),
            )),
        }
    }
}

/// Sends a phrase's audio to the call as the TTS service produces it. `Err` when it failed
/// before any audio (nothing was sent; the caller may get the generic version instead).
async fn stream_phrase(
    prompts: &PromptCache,
    kind: PromptKind,
    rate: u32,
    stream: u64,
    tx: &mpsc::Sender<Control>,
) -> Result<(), String> {
    let first_deadline = tokio::time::Instant::now() + PER_CALL_PROMPT_DEADLINE;
    let late = || format!("no audio within {PER_CALL_PROMPT_DEADLINE:?}");
    let tts = tokio::time::timeout_at(first_deadline, prompts.open_stream(kind, rate))
        .await
        .map_err(|_| late())??;
    let mut audio = tts.audio;
    let mut started = false;
    loop {
        let next = if started {
            timeout(PROMPT_STREAM_STALL, audio.recv()).await
        } else {
            tokio::time::timeout_at(first_deadline, audio.recv()).await
        };
        let chunk = match next {
            Err(_) if !started => return Err(late()),
            Err(_) => PromptChunk::Failed(format!(
                "no TTS audio for {PROMPT_STREAM_STALL:?} mid-phrase"
            )),
            Ok(Some(TtsOutput::Audio(pcm))) if pcm.is_empty() => continue,
            Ok(Some(TtsOutput::Audio(pcm))) => {
                started = true;
                PromptChunk::Audio(pcm)
            }
            Ok(Some(TtsOutput::Alignment { .. })) if !started => continue,
            Ok(Some(TtsOutput::Alignment {
                chars, start_ms, ..
            })) => PromptChunk::Alignment { chars, start_ms },
            Ok(Some(TtsOutput::Done) | None) if !started => {
                return Err("TTS returned no audio".into());
            }
            Ok(Some(TtsOutput::Done) | None) => PromptChunk::Done,
            Ok(Some(TtsOutput::Failed(e))) if !started => return Err(e),
            Ok(Some(TtsOutput::Failed(e))) => PromptChunk::Failed(e),
        };
        let end = matches!(chunk, PromptChunk::Done | PromptChunk::Failed(_));
        if tx
            .send(Control::PromptStream(kind, stream, chunk))
            .await
            .is_err()
            || end
        {
            return Ok(());
        }
    }
}

/// The time, from tokio's clock so that tests can run a call in paused (virtual) time.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

async fn recv_stt(stt: &mut Option<SttSession>) -> Option<SttEvent> {
    match stt {
        Some(s) => s.events.recv().await,
        None => std::future::pending().await,
    }
}
