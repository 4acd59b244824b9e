//! The voice agent for one call: caller audio -> STT -> LLM -> TTS -> playout, streamed at
//! every stage, with turn-taking, barge-in, DTMF, hang-up and a spoken apology on failure.
//!
//! One task per call owns the conversation state; each reply runs in its own task (LLM
//! stream feeding TTS clause by clause) that is cancelled as a unit on barge-in. All audio
//! to the caller goes through this task, so audio from a cancelled reply can never be
//! played after the flush.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::agent::{AgentCommand, AgentFactory, AgentHandle, AgentInput, AgentReport, CallInfo};
use super::clauses::ClauseSplitter;
use super::playout::{PlayoutEvent, Progress, UtteranceId};
use super::prompts::{PromptCache, PromptKind};
use super::turn::{TurnConfig, TurnDetector, TurnEvent};
use crate::audio::pcm;
use crate::audio::vad::Vad;
use crate::ops::metrics::{Metrics, Provider, Stage};
use crate::ops::records::{Role, TranscriptEntry, TurnTiming as TurnTimings};
use crate::providers::llm::{ChatMessage, ChatRequest, LlmEvent, LlmProvider};
use crate::providers::stt::{SttEvent, SttParams, SttProvider, SttSession};
use crate::providers::tts::{TtsInput, TtsOutput, TtsParams, TtsProvider};

/// The three providers.
#[derive(Clone)]
pub struct Providers {
    /// Speech-to-text.
    pub stt: Arc<dyn SttProvider>,
    /// The language model.
    pub llm: Arc<dyn LlmProvider>,
    /// Text-to-speech.
    pub tts: Arc<dyn TtsProvider>,
}

/// How the agent behaves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// STT locale, e.g. `ms-MY`.
    pub language: String,
    /// The LLM's instructions.
    pub system_prompt: String,
    /// STT segmentation silence.
    pub segmentation_silence_ms: u32,
    /// Turn-taking tunables.
    pub turn: TurnConfig,
    /// Speak the hold phrase if a reply has made no sound this long after the caller's turn.
    pub hold_after: Duration,
    /// A DTMF entry ends this long after its last digit (or at `#`).
    pub dtmf_timeout: Duration,
    /// Hang up after this long with neither party speaking (`None`: never).
    pub idle_hangup: Option<Duration>,
}

/// Starts a `Conversation` per call.
pub struct AiAgentFactory {
    providers: Providers,
    prompts: Arc<PromptCache>,
    cfg: Arc<AgentConfig>,
    metrics: Arc<Metrics>,
}

impl AiAgentFactory {
    /// A factory sharing providers and cached prompts across calls.
    pub fn new(
        providers: Providers,
        prompts: Arc<PromptCache>,
        cfg: AgentConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            providers,
            prompts,
            cfg: Arc::new(cfg),
            metrics,
        }
    }
}

const GREETING: UtteranceId = UtteranceId(1);

impl AgentFactory for AiAgentFactory {
    fn start(&self, call: CallInfo, cancel: CancellationToken) -> AgentHandle {
        let (input_tx, input_rx) = mpsc::channel(256);
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let (report_tx, report_rx) = oneshot::channel();
        let rate = call.rate.hz();
        if !matches!(rate, 8_000 | 16_000) {
            // Azure STT, ElevenLabs and the VAD only do 8 and 16 kHz: hand the call back to
            // the dialplan at once rather than fail turn by turn.
            warn!(
                rate,
                "the AI agent supports 8 and 16 kHz calls only; hanging up to the dialplan"
            );
            let mut report = AgentReport::default();
            report
                .errors
                .push(format!("unsupported call rate {rate} Hz for the AI agent"));
            let _ = report_tx.send(report);
            drop((input_rx, cmd_tx));
            return AgentHandle {
                input: input_tx,
                commands: cmd_rx,
                initial: vec![AgentCommand::Hangup],
                report: Some(report_rx),
            };
        }
        let mut initial = Vec::new();
        let greeting_cached = match self.prompts.cached(PromptKind::Greeting, rate) {
            Some(pcm) => {
                initial.push(AgentCommand::Play {
                    utterance: GREETING,
                    pcm: pcm.to_vec(),
                });
                initial.push(AgentCommand::Finish(GREETING));
                true
            }
            None => false,
        };
        let span = tracing::Span::current();
        let conv = Conversation::new(
            call,
            self.providers.clone(),
            Arc::clone(&self.prompts),
            Arc::clone(&self.cfg),
            Arc::clone(&self.metrics),
            cmd_tx,
            cancel,
        );
        tokio::spawn(
            conv.run(input_rx, greeting_cached, report_tx)
                .instrument(span),
        );
        AgentHandle {
            input: input_tx,
            commands: cmd_rx,
            initial,
            report: Some(report_rx),
        }
    }
}

/// What an utterance was, for history and the transcript.
#[derive(Debug)]
struct Spoken {
    kind: SpokenKind,
    /// Text sent to TTS for it so far.
    text: String,
    /// Samples queued for it so far.
    samples: usize,
    /// Index of its assistant message in the history, once it has one.
    history_index: Option<usize>,
    playing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpokenKind {
    Greeting,
    Reply,
    Apology,
    Hold,
}

/// One reply in flight.
struct Reply {
    utterance: UtteranceId,
    cancel: CancellationToken,
    events: mpsc::Receiver<ReplyEvent>,
    user_text: String,
    timing: TurnTimings,
    turn_index: usize,
    user_history_index: usize,
    audio_started: bool,
    finished_audio: bool,
    end_call: bool,
    hold_at: Option<Instant>,
    level_sum: f64,
    level_n: u64,
}

/// From a reply task.
#[derive(Debug)]
enum ReplyEvent {
    FirstToken,
    Clause(String),
    Audio(Vec<i16>),
    EndCall,
    Usage {
        prompt: u64,
        completion: u64,
        cost: Option<f64>,
    },
    /// Both the LLM and TTS are done.
    Done,
    Failed {
        provider: Provider,
        error: String,
    },
}

struct Conversation {
    call: CallInfo,
    providers: Providers,
    prompts: Arc<PromptCache>,
    cfg: Arc<AgentConfig>,
    metrics: Arc<Metrics>,
    cmd: mpsc::Sender<AgentCommand>,
    cancel: CancellationToken,
    stt: Option<SttSession>,
    stt_retry_at: Option<Instant>,
    /// The caller was told that speech recognition is down (once per outage).
    stt_outage_apologised: bool,
    vad: Option<Vad>,
    probs: Vec<f32>,
    turns: TurnDetector,
    history: Vec<ChatMessage>,
    utterances: HashMap<UtteranceId, Spoken>,
    next_utterance: u64,
    reply: Option<Reply>,
    last_speech_end: Option<Instant>,
    dtmf: String,
    dtmf_deadline: Option<Instant>,
    hangup_sent: bool,
    /// Last time either party was heard, for the idle hang-up.
    last_activity: Instant,
    report: AgentReport,
}

impl Conversation {
    fn new(
        call: CallInfo,
        providers: Providers,
        prompts: Arc<PromptCache>,
        cfg: Arc<AgentConfig>,
        metrics: Arc<Metrics>,
        cmd: mpsc::Sender<AgentCommand>,
        cancel: CancellationToken,
    ) -> Self {
        let vad = match Vad::new(call.rate.hz()) {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(error = %e, "no voice activity detection at this rate; barge-in disabled");
                None
            }
        };
        Self {
            turns: TurnDetector::new(cfg.turn),
            call,
            providers,
            prompts,
            cfg,
            metrics,
            cmd,
            cancel,
            stt: None,
            stt_retry_at: None,
            stt_outage_apologised: false,
            vad,
            probs: Vec::new(),
            history: Vec::new(),
            utterances: HashMap::new(),
            next_utterance: GREETING.0 + 1,
            reply: None,
            last_speech_end: None,
            dtmf: String::new(),
            dtmf_deadline: None,
            hangup_sent: false,
            last_activity: Instant::now(),
            report: AgentReport::default(),
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.call.started).as_millis() as u64
    }

    async fn run(
        mut self,
        mut input: mpsc::Receiver<AgentInput>,
        greeting_cached: bool,
        report_tx: oneshot::Sender<AgentReport>,
    ) {
        // The LLM connection pool and STT connection are opened now, not on the first turn.
        self.providers.llm.warm_up();
        self.start_stt().await;
        let greeting_text = self.prompts.texts().greeting.clone();
        if greeting_cached {
            self.register(GREETING, SpokenKind::Greeting, &greeting_text);
        } else if !greeting_text.trim().is_empty() {
            // Not cached (TTS was down at startup): synthesize it now.
            match self
                .prompts
                .get(PromptKind::Greeting, self.call.rate.hz())
                .await
            {
                Ok(pcm) => {
                    self.register(GREETING, SpokenKind::Greeting, &greeting_text);
                    self.play_whole(GREETING, pcm.to_vec()).await;
                }
                Err(e) => {
                    warn!(error = %e, "greeting unavailable");
                    self.cannot_speak().await;
                }
            }
        }
        if self.stt.is_none() {
            // After the greeting, so the caller hears (and the history holds) them in order.
            self.apologise_for_stt().await;
        }
        loop {
            let timer = self.next_timer();
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => break,
                msg = input.recv() => match msg {
                    Some(m) => self.on_input(m).await,
                    None => break,
                },
                ev = recv_reply(&mut self.reply) => self.on_reply_event(ev).await,
                ev = recv_stt(&mut self.stt) => self.on_stt(ev).await,
                () = sleep_until(timer.unwrap_or_else(far_future).into()), if timer.is_some() => self.on_timer().await,
            }
        }
        if let Some(r) = self.reply.take() {
            r.cancel.cancel();
        }
        self.report.turns.retain(|t| t.stt_final_ms.is_some());
        let _ = report_tx.send(std::mem::take(&mut self.report));
    }

    async fn start_stt(&mut self) {
        let params = SttParams {
            language: self.cfg.language.clone(),
            sample_rate: self.call.rate.hz(),
            segmentation_silence_ms: self.cfg.segmentation_silence_ms,
            call_id: self.call.call_id.to_string(),
        };
        match self.providers.stt.start(params).await {
            Ok(s) => {
                self.stt = Some(s);
                self.stt_retry_at = None;
                self.stt_outage_apologised = false;
            }
            Err(e) => {
                warn!(error = %e, "speech-to-text unavailable");
                self.provider_failed(Provider::Stt, "connect", &e.to_string());
                self.stt = None;
                self.stt_retry_at = Some(Instant::now() + Duration::from_secs(3));
            }
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        [
            self.dtmf_deadline,
            self.reply.as_ref().and_then(|r| r.hold_at),
            self.stt_retry_at,
            self.idle_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// When the call counts as abandoned: nobody has spoken for `idle_hangup`, and the agent
    /// is neither thinking nor talking.
    fn idle_deadline(&self) -> Option<Instant> {
        let idle = self.cfg.idle_hangup?;
        let busy = self.reply.is_some()
            || self.hangup_sent
            || self.turns.caller_speaking()
            || self.utterances.values().any(|u| u.playing);
        (!busy).then_some(self.last_activity + idle)
    }

    fn register(&mut self, id: UtteranceId, kind: SpokenKind, text: &str) {
        let history_index = matches!(
            kind,
            SpokenKind::Greeting | SpokenKind::Apology | SpokenKind::Reply
        )
        .then(|| {
            self.history.push(ChatMessage::new("assistant", ""));
            self.history.len() - 1
        });
        self.utterances.insert(
            id,
            Spoken {
                kind,
                text: text.to_owned(),
                samples: 0,
                history_index,
                playing: false,
            },
        );
    }

    fn new_utterance(&mut self) -> UtteranceId {
        let id = UtteranceId(self.next_utterance);
        self.next_utterance += 1;
        id
    }

    async fn send(&mut self, cmd: AgentCommand) {
        if let AgentCommand::Play { utterance, pcm } = &cmd {
            if let Some(u) = self.utterances.get_mut(utterance) {
                u.samples += pcm.len();
            }
        }
        let _ = self.cmd.send(cmd).await;
    }

    async fn play_whole(&mut self, id: UtteranceId, pcm: Vec<i16>) {
        self.send(AgentCommand::Play { utterance: id, pcm }).await;
        self.send(AgentCommand::Finish(id)).await;
    }

    async fn play_prompt(&mut self, kind: PromptKind) {
        let Ok(pcm) = self.prompts.get(kind, self.call.rate.hz()).await else {
            if kind == PromptKind::Apology {
                self.cannot_speak().await;
            } else {
                warn!(?kind, "prompt unavailable; cannot speak it");
            }
            return;
        };
        let id = self.new_utterance();
        let text = self.prompts.texts().text(kind).to_owned();
        let spoken_kind = match kind {
            PromptKind::Greeting => SpokenKind::Greeting,
            PromptKind::Apology => SpokenKind::Apology,
            PromptKind::Hold => SpokenKind::Hold,
        };
        self.register(id, spoken_kind, &text);
        self.play_whole(id, pcm.to_vec()).await;
    }

    /// Text-to-speech is down and nothing cached can be said: rather than leave the caller
    /// in silence, end the AudioSocket leg with a hangup message so the dialplan continues
    /// at its next priority (e.g. a human operator, see `asterisk/`).
    async fn cannot_speak(&mut self) {
        if self.hangup_sent {
            return;
        }
        warn!(
            "the agent cannot speak (TTS unavailable, nothing cached); handing the call back to the dialplan"
        );
        self.report
            .errors
            .push("tts: agent could not speak; call handed back to the dialplan".into());
        self.hangup_sent = true;
        self.send(AgentCommand::Hangup).await;
    }

    // ---- inputs from the session ------------------------------------------------------

    async fn on_input(&mut self, msg: AgentInput) {
        match msg {
            AgentInput::Audio(samples) => self.on_caller_audio(samples).await,
            AgentInput::Dtmf(d) => {
                let now = Instant::now();
                self.last_activity = now;
                self.dtmf.push(d.as_char());
                self.report.transcript.push(TranscriptEntry {
                    role: Role::Dtmf,
                    text: d.to_string(),
                    at_ms: self.ms(now),
                    interrupted: false,
                });
                if d.as_char() == '#' {
                    self.dtmf_deadline = None;
                    self.submit_dtmf().await;
                } else {
                    self.dtmf_deadline = Some(now + self.cfg.dtmf_timeout);
                }
            }
            AgentInput::Playout(ev) => self.on_playout(ev).await,
            AgentInput::Flushed(progress) => {
                for p in progress {
                    self.utterance_ended(p, true);
                }
                self.update_agent_speaking();
            }
        }
    }

    async fn on_caller_audio(&mut self, samples: Vec<i16>) {
        let now = Instant::now();
        // Score the frame first (about 10 µs), so the samples can then be moved to STT
        // rather than copied.
        self.probs.clear();
        let level = match self.vad.as_mut() {
            Some(vad) => {
                vad.push(&samples, &mut self.probs);
                pcm::dbfs(&samples)
            }
            None => 0.0,
        };
        if let Some(stt) = &self.stt {
            if stt.audio.try_send(samples).is_err() {
                debug!("STT input full; audio chunk dropped");
            }
        }
        let probs = std::mem::take(&mut self.probs);
        for p in &probs {
            if let Some(ev) = self.turns.push_window(*p, level, now) {
                self.on_turn_event(ev).await;
            }
        }
        self.probs = probs;
    }

    async fn on_turn_event(&mut self, ev: TurnEvent) {
        match ev {
            TurnEvent::SpeechStarted { .. } => {
                debug!("caller speaking");
                self.last_activity = Instant::now();
            }
            TurnEvent::SpeechEnded { at } => {
                debug!("caller stopped speaking");
                self.last_speech_end = Some(at);
                self.last_activity = Instant::now();
            }
            TurnEvent::BargeIn { at } => {
                info!(
                    at_ms = self.ms(at),
                    "barge-in: caller talked over the agent; stopping playout"
                );
                self.metrics.barge_in();
                self.report.barge_ins += 1;
                self.report.barge_in_ms.push(self.ms(at));
                if let Some(r) = self.reply.take() {
                    r.cancel.cancel();
                    if r.end_call {
                        // The caller interrupted the goodbye: keep the call.
                        debug!("goodbye interrupted; not hanging up");
                    }
                }
                self.send(AgentCommand::Flush).await;
                self.turns.set_agent_speaking(false, -120.0, Instant::now());
            }
        }
    }

    async fn on_playout(&mut self, ev: PlayoutEvent) {
        match ev {
            PlayoutEvent::Started { utterance, at } => {
                if let Some(u) = self.utterances.get_mut(&utterance) {
                    u.playing = true;
                }
                if let Some(r) = self.reply.as_mut().filter(|r| r.utterance == utterance) {
                    if r.timing.first_frame_ms.is_none() {
                        let ms = at.saturating_duration_since(self.call.started).as_millis() as u64;
                        r.timing.first_frame_ms = Some(ms);
                        let timing = r.timing.clone();
                        let idx = r.turn_index;
                        self.log_turn(&timing);
                        if let Some(t) = self.report.turns.get_mut(idx) {
                            *t = timing;
                        }
                    }
                }
                self.update_agent_speaking();
            }
            PlayoutEvent::Completed { progress, .. } => {
                self.last_activity = Instant::now();
                self.utterance_ended(progress, false);
                self.update_agent_speaking();
                self.maybe_hang_up().await;
            }
            PlayoutEvent::Underrun { utterance } => {
                debug!(?utterance, "playout underrun (TTS slower than real time)")
            }
        }
    }

    fn update_agent_speaking(&mut self) {
        let playing: Vec<&Spoken> = self.utterances.values().filter(|u| u.playing).collect();
        let level = self
            .reply
            .as_ref()
            .filter(|r| r.level_n > 0)
            .map_or(-20.0, |r| r.level_sum / r.level_n as f64);
        self.turns
            .set_agent_speaking(!playing.is_empty(), level, Instant::now());
    }

    /// Whether a transcript arriving now is probably the line echoing the agent back (only
    /// judged when the VAD runs: it is what hears the caller).
    fn looks_like_echo(&self, now: Instant) -> bool {
        self.vad.is_some() && self.turns.looks_like_echo(now)
    }

    /// An utterance finished playing or was flushed: record what the caller heard.
    fn utterance_ended(&mut self, p: Progress, flushed: bool) {
        let Some(u) = self.utterances.remove(&p.utterance) else {
            return;
        };
        let interrupted = flushed && (p.dropped_samples > 0 || !p.input_finished);
        let heard = if interrupted {
            heard_prefix(&u.text, p.sent_samples, u.samples.max(1))
        } else {
            u.text.trim().to_owned()
        };
        if let Some(i) = u.history_index {
            if let Some(m) = self.history.get_mut(i) {
                m.content = if interrupted && !heard.is_empty() {
                    format!("{heard}…")
                } else {
                    heard.clone()
                };
            }
        }
        if u.kind != SpokenKind::Hold && !heard.is_empty() {
            self.report.transcript.push(TranscriptEntry {
                role: Role::Agent,
                text: heard,
                at_ms: self.ms(Instant::now()),
                interrupted,
            });
        }
        if let Some(r) = &self.reply {
            if r.utterance == p.utterance && (interrupted || r.finished_audio) {
                // The reply is over as far as the caller is concerned. A goodbye stays until
                // the hang-up has been sent.
                if interrupted || !r.end_call {
                    r.cancel.cancel();
                    self.reply = None;
                }
            }
        }
    }

    // ---- STT ---------------------------------------------------------------------------

    async fn on_stt(&mut self, ev: Option<SttEvent>) {
        let Some(ev) = ev else {
            warn!("speech-to-text stream ended; reconnecting");
            self.stt = None;
            self.stt_retry_at = Some(Instant::now() + Duration::from_millis(500));
            return;
        };
        match ev {
            SttEvent::SpeechStarted => {}
            SttEvent::Partial(text) => debug!(%text, "partial transcript"),
            SttEvent::Reconnected => info!("speech-to-text reconnected"),
            SttEvent::Failed(e) => {
                warn!(error = %e, "speech-to-text failed");
                self.provider_failed(Provider::Stt, "failed", &e);
                self.stt = None;
                self.stt_retry_at = Some(Instant::now() + Duration::from_secs(2));
                self.apologise_for_stt().await;
            }
            SttEvent::Final { text, .. } => {
                let text = text.trim().to_owned();
                if text.is_empty() {
                    return;
                }
                let now = Instant::now();
                let agent_playing = self.utterances.values().any(|u| u.playing);
                if self.looks_like_echo(now) {
                    info!(%text, "transcript while the agent was talking (or just after) with no caller voice detected: treated as line echo, ignored");
                    return;
                }
                info!(%text, "caller said");
                self.report.transcript.push(TranscriptEntry {
                    role: Role::Caller,
                    text: text.clone(),
                    at_ms: self.ms(now),
                    interrupted: false,
                });
                if agent_playing {
                    // Real speech over the agent that the VAD gate did not already act on.
                    self.metrics.barge_in();
                    self.report.barge_ins += 1;
                    if let Some(r) = self.reply.take() {
                        r.cancel.cancel();
                    }
                    self.send(AgentCommand::Flush).await;
                }
                self.start_reply(text, now).await;
            }
        }
    }

    async fn submit_dtmf(&mut self) {
        let digits = std::mem::take(&mut self.dtmf);
        if digits.is_empty() {
            return;
        }
        let spaced: Vec<String> = digits.chars().map(String::from).collect();
        let text = format!("(Pemanggil menekan kekunci telefon: {})", spaced.join(" "));
        info!(%digits, "DTMF entry");
        self.start_reply(text, Instant::now()).await;
    }

    // ---- replies -----------------------------------------------------------------------

    async fn start_reply(&mut self, mut text: String, now: Instant) {
        let mut timing = TurnTimings {
            speech_end_ms: self.last_speech_end.take().map(|t| self.ms(t)),
            stt_final_ms: Some(self.ms(now)),
            ..TurnTimings::default()
        };
        if let Some(prev) = self.reply.take() {
            prev.cancel.cancel();
            if !prev.audio_started {
                // The caller went on talking before we said anything: one turn, not two.
                text = format!("{} {}", prev.user_text, text);
                self.history.truncate(prev.user_history_index);
                self.utterances.remove(&prev.utterance);
                if timing.speech_end_ms.is_none() {
                    timing.speech_end_ms = self
                        .report
                        .turns
                        .get(prev.turn_index)
                        .and_then(|t| t.speech_end_ms);
                }
            }
        }
        self.history.push(ChatMessage::new("user", text.clone()));
        let user_history_index = self.history.len() - 1;
        let utterance = self.new_utterance();
        self.register(utterance, SpokenKind::Reply, "");
        let mut messages = vec![ChatMessage::new("system", self.cfg.system_prompt.clone())];
        messages.extend(
            self.history
                .iter()
                .filter(|m| !m.content.is_empty())
                .cloned(),
        );
        let req = ChatRequest {
            messages,
            offer_end_call: true,
            call_id: self.call.call_id.to_string(),
        };
        let tts_params = TtsParams {
            sample_rate: self.call.rate.hz(),
            call_id: self.call.call_id.to_string(),
        };
        let cancel = self.cancel.child_token();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(
            reply_task(self.providers.clone(), req, tts_params, tx, cancel.clone())
                .instrument(tracing::Span::current()),
        );
        self.report.turns.push(timing.clone());
        self.reply = Some(Reply {
            utterance,
            cancel,
            events: rx,
            user_text: text,
            timing,
            turn_index: self.report.turns.len() - 1,
            user_history_index,
            audio_started: false,
            finished_audio: false,
            end_call: false,
            hold_at: Some(now + self.cfg.hold_after),
            level_sum: 0.0,
            level_n: 0,
        });
    }

    async fn on_reply_event(&mut self, ev: Option<ReplyEvent>) {
        let Some(reply) = self.reply.as_mut() else {
            return;
        };
        let now = Instant::now();
        let now_ms = now.saturating_duration_since(self.call.started).as_millis() as u64;
        let Some(ev) = ev else {
            // The reply task ended without Done/Failed (cancelled): nothing more to do.
            reply.events.close();
            if !reply.finished_audio {
                let u = reply.utterance;
                reply.finished_audio = true;
                self.send(AgentCommand::Finish(u)).await;
            }
            return;
        };
        match ev {
            ReplyEvent::FirstToken => reply.timing.llm_first_token_ms = Some(now_ms),
            ReplyEvent::Clause(c) => {
                let u = reply.utterance;
                if let Some(s) = self.utterances.get_mut(&u) {
                    s.text.push_str(&c);
                }
            }
            ReplyEvent::Audio(samples) => {
                if !reply.audio_started {
                    reply.audio_started = true;
                    reply.hold_at = None;
                    reply.timing.tts_first_audio_ms = Some(now_ms);
                }
                reply.level_sum += pcm::dbfs(&samples);
                reply.level_n += 1;
                let u = reply.utterance;
                self.send(AgentCommand::Play {
                    utterance: u,
                    pcm: samples,
                })
                .await;
            }
            ReplyEvent::EndCall => {
                info!("the model ended the call");
                reply.end_call = true;
            }
            ReplyEvent::Usage {
                prompt,
                completion,
                cost,
            } => {
                self.metrics.llm_usage(prompt, completion, cost);
                if let Some(c) = cost {
                    *self.report.llm_cost.get_or_insert(0.0) += c;
                }
            }
            ReplyEvent::Done => {
                reply.finished_audio = true;
                reply.hold_at = None;
                let u = reply.utterance;
                let spoke = reply.audio_started;
                self.send(AgentCommand::Finish(u)).await;
                if !spoke {
                    // No audio at all (e.g. only a tool call): nothing will play.
                    self.utterance_ended(
                        Progress {
                            utterance: u,
                            sent_samples: 0,
                            dropped_samples: 0,
                            input_finished: true,
                        },
                        false,
                    );
                }
                self.maybe_hang_up().await;
            }
            ReplyEvent::Failed { provider, error } => {
                warn!(?provider, %error, "reply failed");
                let spoke = reply.audio_started;
                let u = reply.utterance;
                reply.finished_audio = true;
                reply.hold_at = None;
                reply.cancel.cancel();
                self.provider_failed(provider, classify(&error), &error);
                self.send(AgentCommand::Finish(u)).await;
                if !spoke {
                    self.utterances.remove(&u);
                }
                self.reply = None;
                self.play_prompt(PromptKind::Apology).await;
            }
        }
    }

    async fn maybe_hang_up(&mut self) {
        let Some(r) = &self.reply else { return };
        if !r.end_call || !r.finished_audio || self.hangup_sent {
            return;
        }
        // Hang up once the goodbye has been queued; the session waits for it to play out.
        self.hangup_sent = true;
        self.send(AgentCommand::Hangup).await;
    }

    fn log_turn(&self, t: &TurnTimings) {
        let d = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let stages = [
            (Stage::VadEndToSttFinal, d(t.speech_end_ms, t.stt_final_ms)),
            (
                Stage::SttFinalToLlmFirstToken,
                d(t.stt_final_ms, t.llm_first_token_ms),
            ),
            (
                Stage::LlmFirstTokenToTtsFirstAudio,
                d(t.llm_first_token_ms, t.tts_first_audio_ms),
            ),
            (
                Stage::TtsFirstAudioToWire,
                d(t.tts_first_audio_ms, t.first_frame_ms),
            ),
            (
                Stage::SpeechEndToFirstAudio,
                d(t.speech_end_ms.or(t.stt_final_ms), t.first_frame_ms),
            ),
        ];
        for (stage, v) in stages {
            if let Some(ms) = v {
                self.metrics.turn_stage(stage, Duration::from_millis(ms));
            }
        }
        info!(
            speech_end_ms = t.speech_end_ms,
            stt_final_ms = t.stt_final_ms,
            llm_first_token_ms = t.llm_first_token_ms,
            tts_first_audio_ms = t.tts_first_audio_ms,
            first_frame_ms = t.first_frame_ms,
            response_ms = stages[4].1,
            "turn timings"
        );
    }

    fn provider_failed(&mut self, provider: Provider, kind: &str, error: &str) {
        self.metrics.provider_error(provider, kind);
        self.report.errors.push(format!("{provider:?}: {error}"));
    }

    /// Without STT the agent cannot hear the caller: say so once per outage (not at every
    /// reconnect attempt) instead of leaving them talking to silence.
    async fn apologise_for_stt(&mut self) {
        if !self.stt_outage_apologised {
            self.stt_outage_apologised = true;
            self.play_prompt(PromptKind::Apology).await;
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if self.idle_deadline().is_some_and(|d| now >= d) {
            info!(
                idle_secs = self.cfg.idle_hangup.map_or(0, |d| d.as_secs()),
                "nobody has spoken for the idle limit; hanging up"
            );
            self.hangup_sent = true;
            self.send(AgentCommand::Hangup).await;
            return;
        }
        if self.dtmf_deadline.is_some_and(|d| now >= d) {
            self.dtmf_deadline = None;
            self.submit_dtmf().await;
        }
        if self.stt_retry_at.is_some_and(|d| now >= d) {
            self.stt_retry_at = None;
            self.start_stt().await;
            if self.stt.is_none() {
                self.apologise_for_stt().await;
            }
        }
        let hold_due = self
            .reply
            .as_ref()
            .and_then(|r| r.hold_at)
            .is_some_and(|d| now >= d);
        if hold_due {
            if let Some(r) = self.reply.as_mut() {
                r.hold_at = None;
            }
            info!("reply is slow; saying the hold phrase");
            self.play_prompt(PromptKind::Hold).await;
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

fn classify(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("first token") || e.contains("timed out") || e.contains("timeout") {
        "timeout"
    } else if e.contains("stall") {
        "stalled"
    } else if e.contains("429") {
        "status_429"
    } else if e.contains("401") || e.contains("403") || e.contains("credential") {
        "auth"
    } else if e.contains("http 5") {
        "status_5xx"
    } else if e.contains("stream error") {
        "mid_stream"
    } else if e.contains("malformed") {
        "malformed"
    } else {
        "other"
    }
}

/// The words of `text` the caller heard, given how much of its audio was sent: assumes
/// speech is spread evenly over the characters, then cuts back to a word boundary.
fn heard_prefix(text: &str, sent: usize, total: usize) -> String {
    let text = text.trim();
    if sent >= total {
        return text.to_owned();
    }
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len() * sent / total.max(1);
    let prefix: String = chars[..n.min(chars.len())].iter().collect();
    match prefix.rfind(char::is_whitespace) {
        Some(i) if n < chars.len() => prefix[..i].trim_end().to_owned(),
        _ => prefix,
    }
}

async fn recv_reply(reply: &mut Option<Reply>) -> Option<ReplyEvent> {
    match reply {
        Some(r) if !r.events.is_closed() || !r.events.is_empty() => r.events.recv().await,
        _ => std::future::pending().await,
    }
}

async fn recv_stt(stt: &mut Option<SttSession>) -> Option<SttEvent> {
    match stt {
        Some(s) => s.events.recv().await,
        None => std::future::pending().await,
    }
}

/// One reply: stream the LLM, cut its text into clauses, stream them to TTS, stream the
/// audio back. TTS is connected while the LLM is still thinking.
async fn reply_task(
    providers: Providers,
    req: ChatRequest,
    tts_params: TtsParams,
    tx: mpsc::Sender<ReplyEvent>,
    cancel: CancellationToken,
) {
    let work = async {
        let t0 = Instant::now();
        let llm_fut = async {
            let r = providers.llm.stream(req).await;
            debug!(
                ms = t0.elapsed().as_secs_f64() * 1000.0,
                "LLM response headers"
            );
            r
        };
        let tts_fut = async {
            let r = providers.tts.open(tts_params).await;
            debug!(ms = t0.elapsed().as_secs_f64() * 1000.0, "TTS stream open");
            r
        };
        let (llm, tts) = tokio::join!(llm_fut, tts_fut);
        let mut llm = match llm {
            Ok(s) => s,
            Err(e) => return Err((Provider::Llm, e.to_string())),
        };
        let mut tts = match tts {
            Ok(t) => t,
            Err(e) => return Err((Provider::Tts, e.to_string())),
        };
        let mut splitter = ClauseSplitter::default();
        let mut first_token = false;
        let mut sent_text = false;
        let mut llm_done = false;
        let mut tts_done = false;
        let mut first_token_deadline = None::<Instant>;
        let _ = &mut first_token_deadline;
        use futures_util::StreamExt;
        while !(llm_done && tts_done) {
            tokio::select! {
                ev = llm.next(), if !llm_done => match ev {
                    Some(Ok(LlmEvent::Text(t))) => {
                        if !first_token {
                            debug!(ms = t0.elapsed().as_secs_f64() * 1000.0, "LLM first token");
                            first_token = true;
                            let _ = tx.send(ReplyEvent::FirstToken).await;
                        }
                        for clause in splitter.push(&t) {
                            sent_text = true;
                            let _ = tx.send(ReplyEvent::Clause(clause.clone())).await;
                            if tts.text.send(TtsInput::Text(clause)).await.is_err() {
                                return Err((Provider::Tts, "TTS stream closed".into()));
                            }
                        }
                    }
                    Some(Ok(LlmEvent::ToolCall { name, .. })) => {
                        if !first_token {
                            first_token = true;
                            let _ = tx.send(ReplyEvent::FirstToken).await;
                        }
                        if name == "end_call" {
                            let _ = tx.send(ReplyEvent::EndCall).await;
                        } else {
                            warn!(%name, "model called an unknown tool; ignored");
                        }
                    }
                    Some(Ok(LlmEvent::Usage { prompt_tokens, completion_tokens, cost })) => {
                        let _ = tx.send(ReplyEvent::Usage { prompt: prompt_tokens, completion: completion_tokens, cost }).await;
                    }
                    Some(Ok(LlmEvent::Done { .. })) | None => {
                        llm_done = true;
                        if let Some(rest) = splitter.finish() {
                            sent_text = true;
                            let _ = tx.send(ReplyEvent::Clause(rest.clone())).await;
                            let _ = tts.text.send(TtsInput::Text(rest)).await;
                        }
                        if sent_text {
                            let _ = tts.text.send(TtsInput::Finish).await;
                        } else {
                            tts_done = true;
                        }
                    }
                    Some(Err(e)) => return Err((Provider::Llm, e.to_string())),
                },
                out = tts.audio.recv(), if !tts_done => match out {
                    Some(TtsOutput::Audio(pcm)) if !pcm.is_empty() => {
                        if tx.send(ReplyEvent::Audio(pcm)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Some(TtsOutput::Audio(_)) => {}
                    Some(TtsOutput::Done) => tts_done = true,
                    Some(TtsOutput::Failed(e)) => return Err((Provider::Tts, e)),
                    None if llm_done => tts_done = true,
                    None => return Err((Provider::Tts, "TTS stream ended early".into())),
                },
            }
        }
        Ok(())
    };
    tokio::select! {
        () = cancel.cancelled() => {}
        r = work => {
            let ev = match r {
                Ok(()) => ReplyEvent::Done,
                Err((provider, error)) => ReplyEvent::Failed { provider, error },
            };
            let _ = tx.send(ev).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heard_prefix_cuts_at_words() {
        let t = "Harga pakej asas ialah tiga puluh ringgit sebulan.";
        assert_eq!(heard_prefix(t, 0, 100), "");
        assert_eq!(heard_prefix(t, 100, 100), t);
        let half = heard_prefix(t, 50, 100);
        assert!(
            t.starts_with(&half) && half.len() < t.len() && !half.ends_with(' '),
            "{half}"
        );
    }

    #[test]
    fn errors_are_classified() {
        assert_eq!(classify("no first token within 2500 ms"), "timeout");
        assert_eq!(
            classify("LLM request failed with HTTP 429: slow down"),
            "status_429"
        );
        assert_eq!(classify("LLM stream error 429: Rate limit"), "status_429");
        assert_eq!(classify("stream stalled for 3000 ms"), "stalled");
    }
}
