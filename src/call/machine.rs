//! One call as a sans-IO state machine: every decision of the conversation lives here, and
//! nothing here waits, reads a socket or talks to a provider.
//!
//! The driver feeds [`Input`]s with the time they happened ([`CallMachine::handle`]), asks
//! for the [`Effect`]s to perform ([`CallMachine::poll_effect`]) and sleeps until
//! [`CallMachine::poll_timeout`]. The machine owns the playout (so it knows, frame by frame,
//! what the caller heard), the turn detector, the keypad collector, the history and the
//! hang-up state; the provider tasks only ever see effects and answer with inputs tagged by
//! reply id, so a late event from a cancelled reply can never reach the caller.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use uuid::Uuid;

use super::context::CallOutcome;
use super::dtmf::DtmfCollector;
use super::hangup::{Hangup, HangupReason};
use super::history::{EntryId, History, HistoryBudget, Speaker, estimate_tokens};
use super::playout::{FRAME, FrameKind, Playout, PlayoutEvent, Progress, UtteranceId};
use super::prompts::{PromptKind, PromptTexts};
use super::tools::{AgentTools, ToolCallRecord};
use super::turn::{TurnConfig, TurnDetector, TurnEvent};
use crate::audio::pcm;
use crate::audio::vad::Vad;
use crate::audiosocket::{Digit, SampleRate};
use crate::ops::metrics::{Metrics, Provider, Stage};
use crate::ops::records::{Role, Speculation, TranscriptEntry, TurnTiming};
use crate::providers::llm::ChatRequest;
use crate::providers::stt::{SttEvent, SttParams};
use crate::providers::tts::TtsParams;

/// Before the first audio message tells the call's rate, send an 8 kHz silence frame this
/// often so Asterisk's 2 s inactivity timer never fires (the rate is not locked by it).
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// ... starting this long after the UUID (a real channel sends audio within 20 ms).
const KEEPALIVE_AFTER: Duration = Duration::from_millis(500);
/// Echo mode: start echoing once this many frames are queued, to absorb the phase between
/// the caller's clock and ours.
const ECHO_PREBUFFER_FRAMES: usize = 2;
/// Echo mode: cap on echo latency.
const ECHO_MAX_QUEUED: Duration = Duration::from_millis(200);
/// How far back the echo guard looks at what we sent: the line's echo returns within
/// tens of milliseconds, a PBX's jitter buffer adds some more (16 frames = 320 ms).
const ECHO_REFERENCE_FRAMES: usize = 16;
/// The level of digital silence, in dBFS.
const SILENT_DB: f64 = -120.0;
/// Caller audio held while the recogniser connects (10 s at 20 ms).
const STT_BACKLOG_FRAMES: usize = 500;
/// If the VAD never hears the caller stop after an interruption, resume this much later.
const RESUME_FALLBACK: Duration = Duration::from_secs(2);
/// Speech samples kept for rewinding at a resume (at 16 kHz, 500 ms).
const RECENT_SENT_SAMPLES: usize = 8_000;
/// After "are you still there?", wait at least this long for an answer before hanging up.
const MIN_IDLE_AFTER_ASKING: Duration = Duration::from_secs(5);
/// Retry a failed speech-to-text connection after this long.
const STT_RETRY: Duration = Duration::from_secs(2);

/// How a reply is produced: streamed stage to stage (production), or each stage waiting for
/// the whole output of the previous one (the benchmark's baseline through the same code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pipeline {
    /// Clauses go to TTS as the model writes them, audio plays as it arrives.
    #[default]
    Streamed,
    /// Whole reply text, then whole audio, then playback.
    Sequential,
}

/// How the voice agent behaves (AI mode).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// STT locale, e.g. `ms-MY`.
    pub language: String,
    /// The LLM's instructions.
    pub system_prompt: String,
    /// The fixed phrases' texts (what the history and transcript say they said).
    pub prompts: PromptTexts,
    /// STT segmentation silence.
    pub segmentation_silence_ms: u32,
    /// Turn-taking tunables.
    pub turn: TurnConfig,
    /// The longest silence the caller hears while a reply is pending before the hold phrase
    /// (and, the same again after it, before giving up with an apology). Counted from the
    /// caller's end of speech or the end of the agent's last audio, whichever is later.
    pub hold_after: Duration,
    /// A DTMF entry ends this long after its last digit (or at `#`).
    pub dtmf_timeout: Duration,
    /// Hang up after this long with neither party speaking (`None`: never).
    pub idle_hangup: Option<Duration>,
    /// What each model request may carry.
    pub history: HistoryBudget,
    /// Streamed or sequential replies.
    pub pipeline: Pipeline,
    /// Ask "are you still there?" after this much silence (before the idle hang-up).
    pub still_there_after: Option<Duration>,
    /// Start the reply on a hypothesis that has been stable, with the caller silent, this
    /// long (`None`: wait for the final).
    pub speculate_after: Option<Duration>,
    /// Speculative requests allowed per call.
    pub speculative_max: u32,
    /// Listening noises ("ya", "hmm"), normalised: said alone while the agent talks, they
    /// are not a turn.
    pub backchannels: Vec<String>,
    /// After an interruption with no words, resume this long after the caller stopped.
    pub resume_after: Duration,
    /// Candidate locales (`[agent] languages`): with two or more, the recogniser identifies
    /// the language of every phrase among them, the model is told it, and the reply is
    /// synthesized with its language code. Fewer: recognition in `language` only.
    pub languages: Vec<String>,
    /// Handing over to a person, and the tools the model may call.
    pub tools: AgentTools,
}

impl AgentConfig {
    /// Whether the caller's language is identified turn by turn.
    pub fn identifies_language(&self) -> bool {
        self.languages.len() >= 2
    }
}

/// Appended to the system prompt when the caller's language is identified: every caller
/// message then starts with its language as a tag (see [`tag_language`]).
pub const LANGUAGE_TAG_NOTE: &str = "Each caller message starts with the language the caller \
     spoke, as a tag such as [en-US]. Reply in that language. Never write such a tag yourself.";

/// A caller message as the model sees it with language identification on: `[en-US] text`.
pub fn tag_language(language: Option<&str>, text: &str) -> String {
    match language {
        Some(l) => format!("[{l}] {text}"),
        None => text.to_owned(),
    }
}

/// The ISO 639-1 code TTS wants for a BCP-47 locale: its primary subtag, `ms` for `ms-MY`.
pub fn language_code(locale: &str) -> String {
    locale
        .split('-')
        .next()
        .unwrap_or(locale)
        .to_ascii_lowercase()
}

/// Lower case, letters and digits only, single spaces: how transcripts are compared.
pub fn normalise(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' {
                c
            } else {
                ' '
            }
        })
        .collect::<String>()
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the call does.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Loop the caller's audio back: a plumbing test.
    Echo {
        /// End the call after this long without caller audio.
        idle_hangup: Option<Duration>,
    },
    /// The voice agent.
    Agent(Arc<AgentConfig>),
}

/// Identifies one reply (one LLM request and its speech) within a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyId(pub u64);

/// What a reply task reports.
#[derive(Debug)]
pub enum ReplyEvent {
    /// The model's first token (text or tool call).
    FirstToken,
    /// Text sent to TTS (a clause, or the whole reply in sequential mode).
    Text(String),
    /// Synthesized audio at the call rate.
    Audio(Vec<i16>),
    /// Which characters the audio so far speaks: each character and when it starts, ms from
    /// the start of the reply's audio.
    Alignment {
        /// The characters as the TTS service reported them.
        chars: Vec<String>,
        /// Start of each.
        start_ms: Vec<u32>,
    },
    /// The model asked to end the call after this reply.
    EndCall,
    /// The model called tools; they are running (the reply goes on when they are done).
    ToolsStarted {
        /// Their names.
        names: Vec<String>,
    },
    /// Everything the model said before those calls has been synthesized (its audio has
    /// all been sent as [`ReplyEvent::Audio`]): a filler may follow it now.
    SpeechDrained,
    /// The tools are done; the next model round starts. `at_ms` of each record is unset.
    ToolsFinished(Vec<ToolCallRecord>),
    /// The model asked to hand the call over to this target (a name it was offered).
    Transfer {
        /// The target's name.
        target: String,
        /// What the model wrote for the person taking the call.
        summary: Option<String>,
    },
    /// Token usage and cost.
    Usage {
        /// Prompt tokens.
        prompt: u64,
        /// Completion tokens.
        completion: u64,
        /// Cost in credits, when reported.
        cost: Option<f64>,
    },
    /// The model and TTS are both done.
    Done,
    /// The reply failed.
    Failed {
        /// Which stage.
        provider: Provider,
        /// What happened.
        error: String,
    },
}

/// Something that happened, fed to [`CallMachine::handle`] with the time it happened.
#[derive(Debug)]
pub enum Input {
    /// A caller audio message at the rate its kind says.
    CallerAudio {
        /// The message's rate.
        rate: SampleRate,
        /// Its samples.
        pcm: Vec<i16>,
    },
    /// A keypad digit.
    Dtmf(Digit),
    /// The speech-to-text connection is up.
    SttUp,
    /// It could not start or has ended for good.
    SttDown(String),
    /// Something the recogniser said.
    Stt(SttEvent),
    /// Something a reply task said.
    Reply(ReplyId, ReplyEvent),
    /// A fixed phrase's audio at the call rate, or why it cannot be had.
    Prompt(PromptKind, Result<Arc<Vec<i16>>, String>),
    /// A piece of a phrase synthesized for this call (one with variables), streamed as the
    /// TTS service produces it: the driver's other answer to [`Effect::Prompt`] for the
    /// greeting, the apology and the still-there question. A stream that fails before any
    /// audio is answered with [`Input::Prompt`] (the generic version) instead.
    PromptStream {
        /// Which phrase (one of [`STREAMED_PROMPTS`]).
        kind: PromptKind,
        /// Tells this synthesis from an earlier one of the same phrase still running.
        stream: u64,
        /// What arrived.
        chunk: PromptChunk,
    },
    /// The deadline from [`CallMachine::poll_timeout`] has passed.
    Timeout,
    /// The daemon is shutting down: hang up once the frame in flight has played.
    Shutdown,
}

/// One piece of a streamed phrase ([`Input::PromptStream`]).
#[derive(Debug)]
pub enum PromptChunk {
    /// Synthesized audio at the call rate (the first one starts the phrase).
    Audio(Vec<i16>),
    /// Which characters the audio so far speaks, as [`ReplyEvent::Alignment`].
    Alignment {
        /// The characters as the TTS service reported them.
        chars: Vec<String>,
        /// Start of each, ms from the start of the phrase's audio.
        start_ms: Vec<u32>,
    },
    /// The phrase is all synthesized.
    Done,
    /// Synthesis failed after some audio: what was queued plays, then the phrase ends.
    Failed(String),
}

/// The phrases the machine takes as a stream ([`Input::PromptStream`]); the others (hold,
/// filler, handover) always come whole.
pub const STREAMED_PROMPTS: [PromptKind; 3] = [
    PromptKind::Greeting,
    PromptKind::Apology,
    PromptKind::StillThere,
];

/// Something the driver must do.
#[derive(Debug)]
pub enum Effect {
    /// Write one audio frame now (then call [`CallMachine::frame_written`]).
    Frame {
        /// The frame's rate.
        rate: SampleRate,
        /// Exactly one frame of samples.
        pcm: Vec<i16>,
        /// How late relative to its slot on the absolute clock.
        lateness: Duration,
    },
    /// Send the 0x00 hangup and end the call.
    Hangup,
    /// Open (or reopen) the recognition; answer with [`Input::SttUp`] or [`Input::SttDown`].
    StartStt(SttParams),
    /// Caller audio for the recogniser (may be dropped, counted, if it is behind).
    SttAudio(Vec<i16>),
    /// Start a reply task; its events come back as [`Input::Reply`].
    StartReply {
        /// The reply's id.
        id: ReplyId,
        /// The model request.
        request: ChatRequest,
        /// The synthesis settings.
        tts: TtsParams,
        /// Streamed or sequential.
        pipeline: Pipeline,
        /// Tool rounds the reply may take.
        tool_rounds: u32,
    },
    /// Stop a reply task; events it still sends are ignored.
    CancelReply(ReplyId),
    /// Fetch a fixed phrase at the call rate (cached, or synthesized with a deadline);
    /// answer with [`Input::Prompt`].
    Prompt(PromptKind),
}

/// What the agent reports at the end of a call.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct AgentReport {
    /// The conversation as the caller heard it.
    pub transcript: Vec<TranscriptEntry>,
    /// Latency marks per turn.
    pub turns: Vec<TurnTiming>,
    /// LLM cost in credits, when reported.
    pub llm_cost: Option<f64>,
    /// Provider errors seen.
    pub errors: Vec<String>,
    /// Times the caller interrupted the agent.
    pub barge_ins: u32,
    /// When the VAD decided each barge-in, ms since the call started.
    pub barge_in_ms: Vec<u64>,
    /// Interruptions that carried no words, after which the agent went on.
    pub resumes: u32,
    /// Replies started on a hypothesis before the final.
    pub speculative: Speculation,
    /// Characters of reply text sent to speech synthesis (the fixed phrases are cached).
    pub tts_characters: u64,
    /// Caller audio streamed to the recogniser, in samples at the call's rate.
    pub stt_samples: u64,
    /// With language identification on, the language the caller spoke in each turn, index
    /// for index with `turns` (`None`: not known yet, e.g. keypad digits before any speech).
    /// Empty for calls in one language.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub turn_languages: Vec<Option<String>>,
    /// Every tool call (the pre-call lookup included), in order.
    pub tool_calls: Vec<ToolCallRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpokenKind {
    Greeting,
    Reply,
    Apology,
    Hold,
    StillThere,
    Handover,
}

/// An utterance as the conversation knows it; the playout knows how far it got.
#[derive(Debug)]
struct Spoken {
    kind: SpokenKind,
    text: String,
    /// All samples queued for it, across a pause and resume.
    samples: usize,
    /// Samples the caller heard before this utterance id (it resumes an interrupted one).
    heard_before: usize,
    entry: Option<EntryId>,
    /// The TTS service's alignment: each character and when it starts (ms from the start of
    /// the audio), when the transport reports it.
    aligned: Vec<(String, u32)>,
    /// When its first frame went out.
    started_at: Option<Instant>,
}

/// Queues a phrase whose audio is all at hand (a cached or whole clip) as utterance `u`.
fn queue_whole_phrase(
    utterances: &mut HashMap<UtteranceId, Spoken>,
    playout: Option<&mut Playout>,
    u: UtteranceId,
    kind: SpokenKind,
    text: String,
    entry: Option<EntryId>,
    pcm: &[i16],
) {
    utterances.insert(
        u,
        Spoken {
            kind,
            text,
            samples: pcm.len(),
            heard_before: 0,
            entry,
            aligned: Vec::new(),
            started_at: None,
        },
    );
    if let Some(p) = playout {
        p.push(u, pcm);
        p.finish(u);
    }
}

/// An utterance stopped by an interruption that may turn out to carry no words.
#[derive(Debug)]
struct Paused {
    utterance: UtteranceId,
    /// Samples of it heard before the interruption (from its very start).
    heard: usize,
    /// Audio to play if it resumes: a little before the cut, then everything unsent (and
    /// whatever the reply streams meanwhile).
    rest: Vec<i16>,
    /// Where `rest` starts, in samples from the utterance's start.
    rest_from: usize,
    /// Resume then, unless the caller's words arrive first (`None` while they talk).
    resume_at: Option<Instant>,
}

/// The reply in flight.
#[derive(Debug)]
struct Reply {
    id: ReplyId,
    utterance: UtteranceId,
    user_entry: EntryId,
    user_text: String,
    turn: usize,
    /// When the caller finished the turn this answers (their speech end, or the keypad).
    turn_end: Instant,
    first_token: bool,
    audio_queued: bool,
    done: bool,
    end_call: bool,
    hold_played: bool,
    /// Started on this (normalised) hypothesis and not confirmed yet: its audio is held.
    speculative: Option<String>,
    held: Vec<i16>,
    /// For a speculative reply: the caller's last voice when it started (any later voice
    /// means they went on, and it is abandoned).
    spoken_until: Option<Instant>,
    /// Estimated prompt tokens, and characters streamed, for the waste count.
    prompt_tokens: u64,
    text_chars: u64,
    /// The caller's language the model was told and the reply is synthesized in.
    language: Option<String>,
    /// Tools are running since then.
    tools_since: Option<Instant>,
    /// The speech before the running tools has all arrived (a filler may follow it).
    drained: bool,
    /// The filler was asked for in this turn (once per turn).
    filler_asked: bool,
    /// The filler's audio, waiting for the speech before it to arrive.
    filler_held: Option<Arc<Vec<i16>>>,
    /// The model asked for a transfer: done once the reply's speech is all in.
    transfer: Option<CallOutcome>,
    /// Where the current round's audio starts in the utterance, ms (alignment offset).
    round_base_ms: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stt {
    Connecting,
    Up,
    Down { retry_at: Instant },
}

/// Agent-only state, present once the call's rate is known and supported.
struct Agent {
    cfg: Arc<AgentConfig>,
    vad: Option<Vad>,
    probs: Vec<f32>,
    turns: TurnDetector,
    dtmf: DtmfCollector,
    history: History,
    utterances: HashMap<UtteranceId, Spoken>,
    reply: Option<Reply>,
    stt: Stt,
    /// Caller audio that arrived while the recogniser was connecting.
    stt_backlog: VecDeque<Vec<i16>>,
    stt_outage_apologised: bool,
    greeting_pending: bool,
    apology_after_greeting: bool,
    last_speech_end: Option<Instant>,
    /// The caller's voice onset (VAD) of the phrase not yet in the transcript.
    phrase_started: Option<Instant>,
    /// A final was taken while the VAD still held the caller's speech open (Azure can end a
    /// phrase before the VAD times it out): that speech's end is not a new caller phrase.
    speech_answered: bool,
    last_activity: Instant,
    still_there_asked: bool,
    /// The latest hypothesis (as said) and since when it has stood unchanged.
    hypothesis: Option<(String, Instant)>,
    /// The normalised hypothesis a reply was last started on (not again for the same).
    speculated: Option<String>,
    paused: Option<Paused>,
    /// The language of the caller's last phrase, with language identification on.
    caller_language: Option<String>,
    /// What the model is told first: the configured prompt, plus [`LANGUAGE_TAG_NOTE`] with
    /// language identification on.
    system_prompt: String,
    /// Phrases streamed for this call whose audio is still arriving: stream id, utterance.
    prompt_streams: Vec<(u64, UtteranceId)>,
}

#[derive(Debug, Default)]
struct Echo {
    utterance: u64,
    open: bool,
    last_audio: Option<Instant>,
}

/// One call.
pub struct CallMachine {
    call_id: Uuid,
    started: Instant,
    mode: Mode,
    metrics: Arc<Metrics>,
    rate: Option<SampleRate>,
    playout: Option<Playout>,
    agent: Option<Agent>,
    echo: Echo,
    hangup: Hangup,
    effects: VecDeque<Effect>,
    report: AgentReport,
    next_utterance: u64,
    next_reply: u64,
    keepalive_at: Instant,
    last_inbound: Instant,
    /// The turn whose first reply frame is in the frame being written now.
    wire_mark: Option<usize>,
    dtmf_digits: String,
    other_rate_frames: u64,
    /// Levels of the frames sent over the echo path's reach, newest last.
    sent_levels: VecDeque<f64>,
    /// The last speech samples sent (for resuming a little before an interruption).
    recent_sent: VecDeque<i16>,
    /// Set while a barge-in flushes: the utterance being heard pauses instead of ending.
    pausing: bool,
    /// How the call ends, once that is decided (a transfer, a fallback).
    outcome: Option<CallOutcome>,
    /// The handover line's utterance, reserved when the handover starts.
    handover_utterance: Option<UtteranceId>,
    /// Provider failures since the last reply that completed.
    failures_in_a_row: u32,
}

impl std::fmt::Debug for CallMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallMachine")
            .field("call_id", &self.call_id)
            .field("rate", &self.rate)
            .field("hangup", &self.hangup)
            .finish_non_exhaustive()
    }
}

impl CallMachine {
    /// A call whose UUID arrived at `started`.
    pub fn new(call_id: Uuid, started: Instant, mode: Mode, metrics: Arc<Metrics>) -> Self {
        Self {
            call_id,
            started,
            mode,
            metrics,
            rate: None,
            playout: None,
            agent: None,
            echo: Echo::default(),
            hangup: Hangup::None,
            effects: VecDeque::new(),
            report: AgentReport::default(),
            next_utterance: 0,
            next_reply: 0,
            keepalive_at: started + KEEPALIVE_AFTER,
            last_inbound: started,
            wire_mark: None,
            dtmf_digits: String::new(),
            other_rate_frames: 0,
            sent_levels: VecDeque::with_capacity(ECHO_REFERENCE_FRAMES),
            recent_sent: VecDeque::new(),
            pausing: false,
            outcome: None,
            handover_utterance: None,
            failures_in_a_row: 0,
        }
    }

    // ---- the driver's interface -------------------------------------------------------

    /// Feeds one input.
    pub fn handle(&mut self, input: Input, now: Instant) {
        if matches!(self.hangup, Hangup::Sent(_)) {
            return;
        }
        match input {
            Input::CallerAudio { rate, pcm } => self.on_caller_audio(rate, pcm, now),
            Input::Dtmf(d) => self.on_dtmf(d, now),
            Input::SttUp => self.on_stt_up(),
            Input::SttDown(e) => self.on_stt_down(&e, now),
            Input::Stt(ev) => self.on_stt(ev, now),
            Input::Reply(id, ev) => self.on_reply(id, ev, now),
            Input::Prompt(kind, r) => self.on_prompt(kind, r, now),
            Input::PromptStream {
                kind,
                stream,
                chunk,
            } => self.on_prompt_stream(kind, stream, chunk, now),
            Input::Timeout => self.on_timeout(now),
            Input::Shutdown => self.on_shutdown(now),
        }
    }

    /// Whether a streamed phrase's audio is still wanted: it has started and the caller has
    /// not interrupted it for good (a paused phrase is still wanted).
    pub fn wants_prompt_stream(&self, stream: u64) -> bool {
        self.agent.as_ref().is_some_and(|a| {
            (a.prompt_streams.iter())
                .find(|(id, _)| *id == stream)
                .is_some_and(|(_, u)| a.utterances.contains_key(u))
        })
    }

    /// The next thing to do, if any.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// When [`Input::Timeout`] is next due (`None` once the call is over).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.hangup, Hangup::Sent(_)) {
            return None;
        }
        let frame = match &self.playout {
            Some(p) => p.next_deadline(),
            None => self.keepalive_at,
        };
        let mut t = [
            Some(frame),
            self.hangup.deadline(),
            self.idle_deadline().map(|(at, _)| at),
            self.inbound_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(a) = &self.agent {
            let agent = [
                a.dtmf.deadline(),
                match a.stt {
                    Stt::Down { retry_at } => Some(retry_at),
                    _ => None,
                },
                self.reply_silence_deadline(),
                self.filler_deadline(),
                self.speculate_deadline(),
                a.paused.as_ref().and_then(|p| p.resume_at),
            ];
            t = t.into_iter().chain(agent.into_iter().flatten()).min();
        }
        t
    }

    /// The frame from the last [`Effect::Frame`] was written to the socket at `now`: the
    /// time on the wire of a reply's first frame is this, not its scheduled slot.
    pub fn frame_written(&mut self, now: Instant) {
        if let Some(turn) = self.wire_mark.take() {
            let ms = self.ms(now);
            if let Some(t) = self.report.turns.get_mut(turn) {
                if t.first_frame_ms.is_none() {
                    t.first_frame_ms = Some(ms);
                    let t = t.clone();
                    self.log_turn(&t);
                }
            }
        }
    }

    /// Whether the 0x00 has been asked for: the call is over.
    pub fn is_over(&self) -> bool {
        matches!(self.hangup, Hangup::Sent(_))
    }

    /// Why we hung up, if we did.
    pub fn hangup_reason(&self) -> Option<HangupReason> {
        match self.hangup {
            Hangup::Sent(r) => Some(r),
            _ => None,
        }
    }

    /// The call's rate, once known.
    pub fn rate(&self) -> Option<SampleRate> {
        self.rate
    }

    /// Playout underruns so far.
    pub fn underruns(&self) -> u64 {
        self.playout.as_ref().map_or(0, |p| p.stats().underruns)
    }

    /// The keypad digits in order.
    pub fn dtmf(&self) -> &str {
        &self.dtmf_digits
    }

    /// The agent's account of the call (AI mode) so far.
    pub fn report(&self) -> Option<AgentReport> {
        matches!(self.mode, Mode::Agent(_)).then(|| {
            let mut r = self.report.clone();
            if r.turn_languages.len() == r.turns.len() {
                let mut kept = r.turns.iter().map(|t| t.stt_final_ms.is_some());
                r.turn_languages.retain(|_| kept.next().unwrap_or_default());
            }
            r.turns.retain(|t| t.stt_final_ms.is_some());
            r
        })
    }

    /// What the call is doing now, for the live view: speaking while the caller hears the
    /// agent, thinking while a confirmed reply is pending and nothing plays, else listening.
    pub fn activity(&self) -> crate::ops::live::Activity {
        use crate::ops::live::Activity;
        if self.playout.as_ref().is_some_and(Playout::is_speaking) {
            Activity::Speaking
        } else if self
            .agent
            .as_ref()
            .and_then(|a| a.reply.as_ref())
            .is_some_and(|r| !r.done && r.speculative.is_none())
        {
            Activity::Thinking
        } else {
            Activity::Listening
        }
    }

    /// Changes whenever [`CallMachine::answered_turns`] may have: the number of turns and
    /// the last one's first frame. O(1), for a check after every step.
    pub fn turns_key(&self) -> (usize, Option<u64>) {
        let t = &self.report.turns;
        (t.len(), t.last().and_then(|t| t.first_frame_ms))
    }

    /// Turns answered so far (the first reply frame went out), and the latest one's latency
    /// (the caller's speech end, or the STT final, to that frame), ms.
    pub fn answered_turns(&self) -> (u32, Option<u64>) {
        let mut answered = self
            .report
            .turns
            .iter()
            .filter(|t| t.first_frame_ms.is_some());
        let n = answered.clone().count();
        let last = answered.next_back().and_then(|t| {
            Some(
                t.first_frame_ms?
                    .saturating_sub(t.speech_end_ms.or(t.stt_final_ms)?),
            )
        });
        (u32::try_from(n).unwrap_or(u32::MAX), last)
    }

    /// The agent's account so far, without copying it (AI mode): what the call records
    /// write as the call goes. Unlike [`CallMachine::report`], turns the recogniser has not
    /// finalised are included.
    pub fn progress(&self) -> Option<&AgentReport> {
        matches!(self.mode, Mode::Agent(_)).then_some(&self.report)
    }

    // ---- caller -----------------------------------------------------------------------

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.started).as_millis() as u64
    }

    fn on_caller_audio(&mut self, rate: SampleRate, samples: Vec<i16>, now: Instant) {
        self.last_inbound = now;
        if self.rate.is_none() {
            self.begin(rate, now);
        }
        if Some(rate) != self.rate {
            self.other_rate_frames += 1;
            if self.other_rate_frames == 1 {
                warn!(got = %rate, "audio at a different rate than the call's; ignored");
            }
            return;
        }
        if let Mode::Echo { .. } = self.mode {
            if !self.hangup.is_none() {
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
            return;
        }
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        // Score the frame first (about 10 µs), then move the samples to STT.
        a.probs.clear();
        let level = match a.vad.as_mut() {
            Some(vad) => {
                vad.push(&samples, &mut a.probs);
                pcm::dbfs(&samples)
            }
            None => 0.0,
        };
        match a.stt {
            Stt::Up => {
                self.report.stt_samples += samples.len() as u64;
                self.effects.push_back(Effect::SttAudio(samples))
            }
            Stt::Connecting => {
                // Held until the recogniser is up, so words said over the greeting count.
                if a.stt_backlog.len() == STT_BACKLOG_FRAMES {
                    a.stt_backlog.pop_front();
                    self.metrics.inbound_dropped(1);
                }
                a.stt_backlog.push_back(samples);
            }
            Stt::Down { .. } => {}
        }
        let probs = std::mem::take(&mut a.probs);
        for p in &probs {
            let ev = self
                .agent
                .as_mut()
                .and_then(|a| a.turns.push_window(*p, level, now));
            if let Some(ev) = ev {
                self.on_turn_event(ev, now, level);
            }
        }
        if let Some(a) = self.agent.as_mut() {
            a.probs = probs;
            let went_on = a
                .reply
                .as_ref()
                .is_some_and(|r| r.speculative.is_some() && a.turns.last_voice() > r.spoken_until);
            if went_on {
                self.abandon_speculation("the caller went on talking");
            }
        }
    }

    /// The first audio message fixed the call's rate: start the clock and the agent.
    fn begin(&mut self, rate: SampleRate, now: Instant) {
        info!(rate = rate.hz(), "call rate known");
        self.rate = Some(rate);
        let mut playout = Playout::new(rate, now);
        let cfg = match &self.mode {
            Mode::Echo { .. } => {
                playout.set_prebuffer(rate.samples_per_frame() * ECHO_PREBUFFER_FRAMES);
                playout.set_max_queued(
                    (rate.hz() as usize) * ECHO_MAX_QUEUED.as_millis() as usize / 1000,
                );
                self.playout = Some(playout);
                return;
            }
            Mode::Agent(cfg) => Arc::clone(cfg),
        };
        self.playout = Some(playout);
        if !matches!(rate.hz(), 8_000 | 16_000) {
            // Azure STT, ElevenLabs and the VAD only do 8 and 16 kHz: hand the call back to
            // the dialplan at once rather than fail turn by turn.
            warn!(
                rate = rate.hz(),
                "the AI agent supports 8 and 16 kHz calls only; hanging up to the dialplan"
            );
            self.report.errors.push(format!(
                "unsupported call rate {} Hz for the AI agent",
                rate.hz()
            ));
            self.hangup = Hangup::soon(None, now, HangupReason::UnsupportedRate);
            return;
        }
        let vad = match Vad::new(rate.hz()) {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(error = %e, "no voice activity detection at this rate; barge-in disabled");
                None
            }
        };
        let greeting = !cfg.prompts.greeting.trim().is_empty();
        self.agent = Some(Agent {
            turns: TurnDetector::new(cfg.turn),
            dtmf: DtmfCollector::new(cfg.dtmf_timeout),
            vad,
            probs: Vec::new(),
            history: History::default(),
            utterances: HashMap::new(),
            reply: None,
            stt: Stt::Connecting,
            stt_backlog: VecDeque::new(),
            stt_outage_apologised: false,
            greeting_pending: greeting,
            apology_after_greeting: false,
            last_speech_end: None,
            phrase_started: None,
            speech_answered: false,
            last_activity: now,
            still_there_asked: false,
            hypothesis: None,
            speculated: None,
            paused: None,
            caller_language: None,
            system_prompt: if cfg.identifies_language() {
                format!("{}\n\n{LANGUAGE_TAG_NOTE}", cfg.system_prompt.trim_end())
            } else {
                cfg.system_prompt.clone()
            },
            cfg: Arc::clone(&cfg),
            prompt_streams: Vec::new(),
        });
        if greeting {
            self.effects.push_back(Effect::Prompt(PromptKind::Greeting));
        }
        self.effects
            .push_back(Effect::StartStt(self.stt_params(&cfg, rate)));
    }

    fn stt_params(&self, cfg: &AgentConfig, rate: SampleRate) -> SttParams {
        SttParams {
            language: cfg.language.clone(),
            languages: if cfg.identifies_language() {
                cfg.languages.clone()
            } else {
                Vec::new()
            },
            sample_rate: rate.hz(),
            segmentation_silence_ms: cfg.segmentation_silence_ms,
            call_id: self.call_id.to_string(),
        }
    }

    fn on_dtmf(&mut self, d: Digit, now: Instant) {
        self.last_inbound = now;
        self.dtmf_digits.push(d.as_char());
        self.metrics.dtmf();
        let at_ms = self.ms(now);
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        a.last_activity = now;
        self.report.transcript.push(TranscriptEntry {
            role: Role::Dtmf,
            text: d.to_string(),
            at_ms,
            interrupted: false,
            start_ms: Some(at_ms),
            end_ms: Some(at_ms),
        });
        if let Some(entry) = a.dtmf.push(d, now) {
            self.submit_dtmf(entry, now);
        }
    }

    fn submit_dtmf(&mut self, digits: String, now: Instant) {
        if self.operator_requested(&digits, now) {
            return;
        }
        let spaced: Vec<String> = digits.chars().map(String::from).collect();
        let text = format!("(Pemanggil menekan kekunci telefon: {})", spaced.join(" "));
        info!(%digits, "DTMF entry");
        self.start_reply(text, now, now, None);
    }

    fn on_turn_event(&mut self, ev: TurnEvent, now: Instant, level: f64) {
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        match ev {
            TurnEvent::SpeechStarted { at } => {
                debug!(caller_db = level, "caller speaking");
                a.phrase_started.get_or_insert(at);
                a.last_activity = now;
                a.still_there_asked = false;
                if let Some(p) = a.paused.as_mut() {
                    // Never resume over the caller: wait for them to stop again.
                    p.resume_at = None;
                }
                a.speech_answered = false;
                // The caller goes on: a reply started on their last hypothesis is premature.
                if a.reply.as_ref().is_some_and(|r| r.speculative.is_some()) {
                    self.abandon_speculation("the caller went on talking");
                }
            }
            TurnEvent::SpeechEnded { at } => {
                debug!("caller stopped speaking");
                if !std::mem::take(&mut a.speech_answered) {
                    a.last_speech_end = Some(at);
                }
                a.last_activity = now;
                let resume_after = a.cfg.resume_after;
                if let Some(p) = a.paused.as_mut() {
                    p.resume_at = Some(at + resume_after);
                }
            }
            TurnEvent::BargeIn { at } => {
                if self.hangup.is_final() {
                    return;
                }
                a.last_activity = now;
                a.still_there_asked = false;
                a.speech_answered = false;
                info!(
                    at_ms = self.ms(at),
                    "barge-in: caller talked over the agent; stopping playout"
                );
                self.metrics.barge_in();
                self.report.barge_ins += 1;
                self.report.barge_in_ms.push(self.ms(at));
                self.hangup = self.hangup.on_caller_turn();
                // The utterance being heard pauses: if the interruption brings no words
                // (a cough, "mm"), the agent goes on instead of leaving silence.
                self.pausing = true;
                self.flush(now);
                self.pausing = false;
            }
        }
    }

    // ---- speech-to-text ---------------------------------------------------------------

    fn on_stt_up(&mut self) {
        if let Some(a) = self.agent.as_mut() {
            if a.stt_outage_apologised || a.stt != Stt::Connecting {
                info!("speech-to-text connected");
            }
            a.stt = Stt::Up;
            a.stt_outage_apologised = false;
            self.report.stt_samples += a.stt_backlog.iter().map(|f| f.len() as u64).sum::<u64>();
            self.effects
                .extend(a.stt_backlog.drain(..).map(Effect::SttAudio));
        }
    }

    fn on_stt_down(&mut self, error: &str, now: Instant) {
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        warn!(%error, "speech-to-text unavailable");
        a.stt = Stt::Down {
            retry_at: now + STT_RETRY,
        };
        a.stt_backlog.clear();
        self.provider_failed(Provider::Stt, "failed", error);
        self.apologise_for_stt();
    }

    /// Without STT the agent cannot hear the caller: say so once per outage (not at every
    /// reconnect attempt) instead of leaving them talking to silence.
    fn apologise_for_stt(&mut self) {
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        if a.stt_outage_apologised {
            return;
        }
        a.stt_outage_apologised = true;
        if a.greeting_pending {
            // After the greeting, so the caller hears them in order.
            a.apology_after_greeting = true;
        } else {
            self.effects.push_back(Effect::Prompt(PromptKind::Apology));
        }
    }

    fn on_stt(&mut self, ev: SttEvent, now: Instant) {
        match ev {
            SttEvent::SpeechStarted => {}
            SttEvent::Partial(text) => {
                debug!(%text, "partial transcript");
                if let Some(a) = self.agent.as_mut() {
                    let changed = a
                        .hypothesis
                        .as_ref()
                        .is_none_or(|(h, _)| normalise(h) != normalise(&text));
                    if changed {
                        a.hypothesis = Some((text, now));
                    }
                }
            }
            SttEvent::Reconnected => info!("speech-to-text reconnected"),
            SttEvent::Failed(e) => self.on_stt_down(&e, now),
            SttEvent::Final { text, language, .. } => self.on_final(text.trim(), language, now),
        }
    }

    fn on_final(&mut self, text: &str, language: Option<String>, now: Instant) {
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        a.hypothesis = None;
        // A new phrase may repeat the last one word for word: speculate on it again.
        a.speculated = None;
        let words = normalise(text);
        let backchannel = words.is_empty() || a.cfg.backchannels.contains(&words);
        if a.paused.is_some() && backchannel {
            if !words.is_empty() {
                self.note_caller(text, now);
            }
            info!(%text, "the interruption carried no words; resuming");
            self.resume(now);
            return;
        }
        if words.is_empty() {
            return;
        }
        // The VAD heard the caller speak and stop since the last turn: the words are theirs,
        // even if the agent has started talking again since (a resume).
        let caller_phrase = a.last_speech_end.is_some();
        if !caller_phrase && a.vad.is_some() && a.turns.looks_like_echo(now) {
            info!(%text, "transcript while the agent was talking (or just after) with no caller voice detected: treated as line echo, ignored");
            return;
        }
        let agent_talking = self.playout.as_ref().is_some_and(Playout::is_speaking);
        if backchannel && agent_talking {
            info!(%text, "listening noise while the agent talks; going on");
            self.note_caller(text, now);
            return;
        }
        if let Some(a) = self.agent.as_mut() {
            if a.cfg.identifies_language() && language.is_some() {
                a.caller_language = language;
            }
        }
        if self.confirm_speculation(&words, text, now) {
            return;
        }
        let language = self.agent.as_ref().and_then(|a| a.caller_language.clone());
        info!(%text, language = language.as_deref().unwrap_or_default(), "caller said");
        let Some(a) = self.agent.as_ref() else {
            return;
        };
        let speech_end = a.last_speech_end.unwrap_or(now);
        let speech_end_ms = a.last_speech_end.map(|t| self.ms(t));
        self.note_caller(text, now);
        if let Some(a) = self.agent.as_mut() {
            a.last_speech_end = None;
            a.speech_answered = a.turns.caller_speaking();
        }
        self.start_reply(text.to_owned(), now, speech_end, speech_end_ms);
    }

    /// A caller line for the transcript.
    fn note_caller(&mut self, text: &str, now: Instant) {
        let at_ms = self.ms(now);
        let (start, end) = self.agent.as_mut().map_or((None, None), |a| {
            (a.phrase_started.take(), a.last_speech_end)
        });
        self.report.transcript.push(TranscriptEntry {
            role: Role::Caller,
            text: text.to_owned(),
            at_ms,
            interrupted: false,
            start_ms: start.map(|t| self.ms(t)),
            end_ms: end.map(|t| self.ms(t)),
        });
        if let Some(a) = self.agent.as_mut() {
            a.last_activity = now;
            a.still_there_asked = false;
        }
    }

    // ---- speculation ------------------------------------------------------------------

    /// When to start the reply on the hypothesis: it has stood unchanged and no voice has
    /// been heard for `speculate_after` (counted from the last voiced VAD window, not from
    /// the debounced end of speech, which comes later than Azure's final on short
    /// segmentation), nothing else is going on, and the cap allows.
    fn speculate_deadline(&self) -> Option<Instant> {
        let a = self.agent.as_ref()?;
        let after = a.cfg.speculate_after?;
        let (hyp, since) = a.hypothesis.as_ref()?;
        let speech_end = a.turns.last_voice()?;
        let busy = a.reply.is_some()
            || a.paused.is_some()
            || a.stt != Stt::Up
            || !self.hangup.is_none()
            || self.report.speculative.started >= a.cfg.speculative_max;
        if busy || a.speculated.as_deref() == Some(normalise(hyp).as_str()) {
            return None;
        }
        Some((*since).max(speech_end) + after)
    }

    fn speculate(&mut self, now: Instant) {
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        let Some((hyp, _)) = a.hypothesis.clone() else {
            return;
        };
        let words = normalise(&hyp);
        if words.is_empty() {
            a.speculated = Some(words);
            return;
        }
        a.speculated = Some(words.clone());
        let voice = a.turns.last_voice();
        let speech_end = voice.unwrap_or(now);
        let speech_end_ms = voice.map(|t| self.ms(t));
        debug!(%hyp, "starting the reply on the stable hypothesis");
        self.report.speculative.started += 1;
        self.metrics.llm_speculative("started", 0);
        self.start_reply(hyp, now, speech_end, speech_end_ms);
        if let Some(r) = self.agent.as_mut().and_then(|a| a.reply.as_mut()) {
            r.speculative = Some(words);
            r.spoken_until = voice;
            if let Some(t) = self.report.turns.get_mut(r.turn) {
                t.stt_final_ms = None;
            }
        }
    }

    /// The final matches the hypothesis a reply was started on: the reply goes on (its
    /// held audio plays now). Returns whether it did.
    fn confirm_speculation(&mut self, words: &str, text: &str, now: Instant) -> bool {
        let Some(a) = self.agent.as_mut() else {
            return false;
        };
        let Some(r) = a.reply.as_mut() else {
            return false;
        };
        match r.speculative.as_deref() {
            None => return false,
            Some(spec) if spec != words => {
                self.abandon_speculation("the final differs from the hypothesis");
                return false;
            }
            // Started before the phrase's language was known: the model was told, and TTS
            // set to, the previous one.
            Some(_) if r.language != a.caller_language => {
                self.abandon_speculation("the caller switched language");
                return false;
            }
            Some(_) => {}
        }
        info!(%text, "caller said (the reply started on the hypothesis goes on)");
        r.speculative = None;
        let tagged = if a.cfg.identifies_language() {
            tag_language(r.language.as_deref(), text)
        } else {
            text.to_owned()
        };
        a.history.set_text(r.user_entry, &tagged);
        r.user_text = text.to_owned();
        let (u, turn, done, end_call) = (r.utterance, r.turn, r.done, r.end_call);
        let held = std::mem::take(&mut r.held);
        a.last_speech_end = None;
        a.speech_answered = a.turns.caller_speaking();
        self.report.speculative.used += 1;
        self.metrics.llm_speculative("used", 0);
        let ms = self.ms(now);
        if let Some(t) = self.report.turns.get_mut(turn) {
            t.stt_final_ms = Some(ms);
        }
        self.note_caller(text, now);
        if let Some(p) = self.playout.as_mut() {
            if !held.is_empty() {
                p.push(u, &held);
            }
            if done {
                p.finish(u);
            }
        }
        if done && end_call {
            self.hangup = Hangup::after(u, HangupReason::Goodbye);
        }
        self.drain_playout_events(now);
        true
    }

    /// Throws away a reply started on a hypothesis, as if it had never been.
    fn abandon_speculation(&mut self, why: &str) {
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        let Some(r) = a.reply.take_if(|r| r.speculative.is_some()) else {
            return;
        };
        debug!(why, "speculative reply abandoned");
        self.effects.push_back(Effect::CancelReply(r.id));
        a.history.remove(r.user_entry);
        if let Some(e) = a.utterances.remove(&r.utterance).and_then(|s| s.entry) {
            a.history.remove(e);
        }
        let tokens = r.prompt_tokens + r.text_chars.div_ceil(4);
        self.report.speculative.wasted += 1;
        self.report.speculative.wasted_tokens += tokens;
        self.metrics.llm_speculative("wasted", tokens);
    }

    // ---- interruptions that carry no words ----------------------------------------------

    /// Goes on with the paused utterance from a little before where it was cut.
    fn resume(&mut self, now: Instant) {
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        let Some(p) = a.paused.take() else {
            return;
        };
        let Some(mut spoken) = a.utterances.remove(&p.utterance) else {
            return;
        };
        self.next_utterance += 1;
        let u = UtteranceId(self.next_utterance);
        spoken.heard_before = p.rest_from;
        let is_reply = a.reply.as_ref().is_some_and(|r| r.utterance == p.utterance);
        let (finished, goodbye) = match a.reply.as_mut().filter(|_| is_reply) {
            Some(r) => {
                r.utterance = u;
                (r.done, r.done && r.end_call)
            }
            // A streamed phrase whose audio is still arriving goes on in the new utterance.
            None => match a.prompt_streams.iter_mut().find(|(_, s)| *s == p.utterance) {
                Some((_, s)) => {
                    *s = u;
                    (false, false)
                }
                None => (true, false),
            },
        };
        a.utterances.insert(u, spoken);
        self.report.resumes += 1;
        if let Some(pl) = self.playout.as_mut() {
            pl.push(u, &p.rest);
            if finished {
                pl.finish(u);
            }
        }
        if goodbye {
            self.hangup = Hangup::after(u, HangupReason::Goodbye);
        }
        self.drain_playout_events(now);
    }

    /// The interruption was a real turn: the paused utterance ends where it was cut.
    fn abandon_pause(&mut self) {
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        let Some(p) = a.paused.take() else {
            return;
        };
        let before = a.utterances.get(&p.utterance).map_or(0, |s| s.heard_before);
        let progress = Progress {
            utterance: p.utterance,
            sent_samples: p.heard.saturating_sub(before),
            dropped_samples: p.rest.len().max(1),
            input_finished: false,
            flushed: true,
        };
        let at = self
            .playout
            .as_ref()
            .and_then(Playout::last_speech_end)
            .unwrap_or(self.started);
        self.on_ended(progress, at);
    }

    // ---- replies ----------------------------------------------------------------------

    /// The caller finished a turn (speech or keypad): whatever the agent was saying or
    /// preparing gives way, and a new reply starts.
    fn start_reply(
        &mut self,
        mut text: String,
        now: Instant,
        turn_end: Instant,
        mut speech_end_ms: Option<u64>,
    ) {
        if self.hangup.is_final() {
            debug!("the call is ending; turn ignored");
            return;
        }
        self.abandon_speculation("a new turn");
        self.abandon_pause();
        self.hangup = self.hangup.on_caller_turn();
        let stt_final_ms = Some(self.ms(now));
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        if let Some(prev) = a.reply.take() {
            if !prev.audio_queued {
                self.effects.push_back(Effect::CancelReply(prev.id));
                // The caller went on before we said anything: one turn, not two.
                text = format!("{} {}", prev.user_text, text);
                a.history.remove(prev.user_entry);
                if let Some(s) = a.utterances.remove(&prev.utterance) {
                    if let Some(e) = s.entry {
                        a.history.remove(e);
                    }
                }
                if speech_end_ms.is_none() {
                    speech_end_ms = self
                        .report
                        .turns
                        .get(prev.turn)
                        .and_then(|t| t.speech_end_ms);
                }
                // The merged turn replaces the earlier one in the record.
                if let Some(t) = self.report.turns.get_mut(prev.turn) {
                    t.stt_final_ms = None;
                }
            } else {
                // Its utterance is flushed below, which cancels it and records what was heard.
                a.reply = Some(prev);
            }
        }
        // The caller has the floor: stop anything still playing (a reply, the greeting).
        self.flush(now);
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        let cfg = Arc::clone(&a.cfg);
        let language = a.caller_language.clone();
        let user_entry = if cfg.identifies_language() {
            a.history
                .push(Speaker::Caller, tag_language(language.as_deref(), &text))
        } else {
            a.history.push(Speaker::Caller, text.clone())
        };
        let messages = a.history.for_model(&a.system_prompt, cfg.history);
        let prompt_tokens = messages
            .iter()
            .map(|m| estimate_tokens(&m.content) as u64)
            .sum();
        self.next_utterance += 1;
        let utterance = UtteranceId(self.next_utterance);
        let entry = a.history.push(Speaker::Agent, "");
        a.utterances.insert(
            utterance,
            Spoken {
                kind: SpokenKind::Reply,
                text: String::new(),
                samples: 0,
                heard_before: 0,
                entry: Some(entry),
                aligned: Vec::new(),
                started_at: None,
            },
        );
        self.next_reply += 1;
        let id = ReplyId(self.next_reply);
        self.report.turns.push(TurnTiming {
            speech_end_ms,
            stt_final_ms,
            ..TurnTiming::default()
        });
        if cfg.identifies_language() {
            self.report.turn_languages.push(language.clone());
        }
        a.reply = Some(Reply {
            id,
            utterance,
            user_entry,
            user_text: text,
            turn: self.report.turns.len() - 1,
            turn_end,
            first_token: false,
            audio_queued: false,
            done: false,
            end_call: false,
            hold_played: false,
            speculative: None,
            spoken_until: None,
            held: Vec::new(),
            prompt_tokens,
            text_chars: 0,
            language: language.clone(),
            tools_since: None,
            drained: false,
            filler_asked: false,
            filler_held: None,
            transfer: None,
            round_base_ms: 0,
        });
        let rate = self.rate.map_or(8_000, SampleRate::hz);
        self.effects.push_back(Effect::StartReply {
            id,
            request: ChatRequest {
                messages,
                offer_end_call: true,
                call_id: self.call_id.to_string(),
                tools: cfg.tools.request_defs(),
                forbid_tools: false,
            },
            tts: TtsParams {
                sample_rate: rate,
                call_id: self.call_id.to_string(),
                // The model is told to answer in the caller's language: speak it as that.
                language_code: language.as_deref().map(language_code),
            },
            pipeline: cfg.pipeline,
            tool_rounds: cfg.tools.max_rounds,
        });
    }

    fn on_reply(&mut self, id: ReplyId, ev: ReplyEvent, now: Instant) {
        let now_ms = self.ms(now);
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        let Some(r) = a.reply.as_mut().filter(|r| r.id == id) else {
            debug!(?id, "event from a finished or cancelled reply; ignored");
            return;
        };
        let turn = r.turn;
        // Audio of a reply not yet confirmed (speculative) or paused by an interruption
        // waits outside the playout.
        let paused = a.paused.as_mut().filter(|p| p.utterance == r.utterance);
        let held = r.speculative.is_some() || paused.is_some();
        match ev {
            ReplyEvent::FirstToken => {
                r.first_token = true;
                if let Some(t) = self.report.turns.get_mut(turn) {
                    t.llm_first_token_ms = Some(now_ms);
                }
            }
            ReplyEvent::Text(clause) => {
                r.text_chars += clause.chars().count() as u64;
                self.report.tts_characters += clause.chars().count() as u64;
                let u = r.utterance;
                if let Some(s) = a.utterances.get_mut(&u) {
                    s.text.push_str(&clause);
                    if let Some(e) = s.entry {
                        a.history.append(e, &clause);
                    }
                }
            }
            ReplyEvent::Audio(samples) => {
                if samples.is_empty() || r.done {
                    return;
                }
                if !r.audio_queued {
                    r.audio_queued = true;
                    if let Some(t) = self.report.turns.get_mut(turn) {
                        t.tts_first_audio_ms = Some(now_ms);
                    }
                }
                let u = r.utterance;
                if let Some(s) = a.utterances.get_mut(&u) {
                    s.samples += samples.len();
                }
                if let Some(p) = paused {
                    p.rest.extend_from_slice(&samples);
                } else if r.speculative.is_some() {
                    r.held.extend_from_slice(&samples);
                } else if let Some(p) = self.playout.as_mut() {
                    p.push(u, &samples);
                }
            }
            ReplyEvent::Alignment { chars, start_ms } => {
                let base = r.round_base_ms;
                if let Some(s) = a.utterances.get_mut(&r.utterance) {
                    s.aligned.extend(
                        chars
                            .into_iter()
                            .zip(start_ms.into_iter().map(|m| m + base)),
                    );
                }
            }
            ReplyEvent::ToolsStarted { names } => {
                info!(?names, "the model called tools");
                r.tools_since = Some(now);
                r.drained = false;
            }
            ReplyEvent::SpeechDrained => {
                r.drained = true;
                if let Some(pcm) = r.filler_held.take() {
                    self.push_filler(&pcm, now);
                }
            }
            ReplyEvent::ToolsFinished(records) => {
                r.tools_since = None;
                r.filler_held = None;
                // The silence clock starts again: the next round gets a turn's budget. When
                // the caller already heard something (a filler, the words before the calls)
                // the hold phrase is not said, so the give-up waits the hold's time too.
                r.turn_end = if r.audio_queued || r.filler_asked {
                    now + a.cfg.hold_after
                } else {
                    now
                };
                let rate = self.rate.map_or(8_000, SampleRate::hz) as usize;
                if let Some(s) = a.utterances.get(&r.utterance) {
                    r.round_base_ms = (s.samples * 1000 / rate.max(1)) as u32;
                }
                for mut rec in records {
                    rec.at_ms = now_ms.saturating_sub(rec.duration_ms);
                    self.report.tool_calls.push(rec);
                }
            }
            ReplyEvent::Transfer { target, summary } => match a.cfg.tools.target(&target) {
                Some(t) => {
                    info!(%target, "the model asked to hand the call over");
                    r.transfer = Some(CallOutcome::Transferred {
                        target: t.name.clone(),
                        destination: t.destination.clone(),
                        summary,
                    });
                }
                None => warn!(%target, "transfer to a target that is not configured; ignored"),
            },
            ReplyEvent::Done if r.transfer.is_some() => {
                if r.speculative.is_some() {
                    // Hand over on the caller's confirmed words only: the final starts the
                    // turn again.
                    self.abandon_speculation("a transfer waits for the final");
                    self.drain_playout_events(now);
                    return;
                }
                r.done = true;
                let u = r.utterance;
                let outcome = r.transfer.take();
                self.failures_in_a_row = 0;
                if held {
                    // The interrupted words end where they were cut.
                    self.abandon_pause();
                } else if let Some(p) = self.playout.as_mut() {
                    p.finish(u);
                }
                if let Some(o) = outcome {
                    self.start_handover(o, false, now);
                }
            }
            ReplyEvent::EndCall => {
                info!("the model ended the call");
                r.end_call = true;
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
            ReplyEvent::Done if held => r.done = true,
            ReplyEvent::Done => {
                r.done = true;
                self.failures_in_a_row = 0;
                let u = r.utterance;
                if r.end_call {
                    self.hangup = Hangup::after(u, HangupReason::Goodbye);
                }
                if let Some(p) = self.playout.as_mut() {
                    p.finish(u);
                }
            }
            ReplyEvent::Failed { .. } if r.speculative.is_some() => {
                // The final will start the reply again.
                self.abandon_speculation("it failed");
            }
            ReplyEvent::Failed { provider, error } => {
                warn!(?provider, %error, "reply failed");
                if held {
                    self.abandon_pause();
                }
                let Some(r) = self.agent.as_mut().and_then(|a| a.reply.as_mut()) else {
                    self.provider_failed(provider, classify(&error), &error);
                    self.apologise_or_hand_over(now);
                    self.drain_playout_events(now);
                    return;
                };
                r.done = true;
                r.end_call = false;
                let u = r.utterance;
                // What was already queued plays to its end; then the apology.
                if let Some(p) = self.playout.as_mut() {
                    p.finish(u);
                }
                self.provider_failed(provider, classify(&error), &error);
                self.apologise_or_hand_over(now);
            }
        }
        self.drain_playout_events(now);
    }

    /// While a reply is pending and the caller hears nothing, when that silence becomes
    /// too long: the hold phrase the first time, giving up with an apology the second.
    fn reply_silence_deadline(&self) -> Option<Instant> {
        let a = self.agent.as_ref()?;
        let r = a.reply.as_ref()?;
        if r.done || r.tools_since.is_some() {
            // Tools have their own deadlines (and the filler covers the wait).
            return None;
        }
        let p = self.playout.as_ref()?;
        if p.queued_samples() > 0 {
            return None;
        }
        let heard_last = p
            .last_speech_end()
            .map_or(r.turn_end, |e| e.max(r.turn_end));
        Some(heard_last + a.cfg.hold_after)
    }

    fn on_reply_silence(&mut self, now: Instant) {
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        let Some(r) = a.reply.as_mut() else {
            return;
        };
        if !r.hold_played && !r.audio_queued && !r.filler_asked {
            r.hold_played = true;
            info!("reply is slow; saying the hold phrase");
            self.effects.push_back(Effect::Prompt(PromptKind::Hold));
            // Until the hold phrase arrives the deadline would fire again at once.
            r.turn_end = now;
            return;
        }
        let provider = if r.first_token {
            Provider::Tts
        } else {
            Provider::Llm
        };
        let id = r.id;
        let u = r.utterance;
        r.done = true;
        r.end_call = false;
        warn!(
            ?provider,
            "no reply audio for too long; giving up on this reply"
        );
        self.effects.push_back(Effect::CancelReply(id));
        if let Some(p) = self.playout.as_mut() {
            p.finish(u);
        }
        self.provider_failed(
            provider,
            "timeout",
            "no reply audio within the hold limit after the hold phrase",
        );
        self.apologise_or_hand_over(now);
        self.drain_playout_events(now);
    }

    // ---- fixed phrases ----------------------------------------------------------------

    fn on_prompt(&mut self, kind: PromptKind, result: Result<Arc<Vec<i16>>, String>, now: Instant) {
        match kind {
            PromptKind::Handover => return self.on_handover_prompt(result, now),
            PromptKind::Filler => return self.on_filler_prompt(result, now),
            _ => {}
        }
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        if kind == PromptKind::Greeting {
            a.greeting_pending = false;
        }
        let pcm = match result {
            Ok(pcm) if !pcm.is_empty() => pcm,
            Ok(_) | Err(_) => {
                let error = match &result {
                    Err(e) => e.clone(),
                    Ok(_) => "no audio".into(),
                };
                match kind {
                    PromptKind::Greeting | PromptKind::Apology => {
                        warn!(?kind, %error, "prompt unavailable");
                        self.cannot_speak(now);
                    }
                    PromptKind::Hold
                    | PromptKind::StillThere
                    | PromptKind::Handover
                    | PromptKind::Filler => {
                        warn!(?kind, %error, "prompt unavailable")
                    }
                }
                return;
            }
        };
        if kind == PromptKind::Hold && a.reply.as_ref().is_none_or(|r| r.audio_queued || r.done) {
            // The reply started (or ended) while the hold phrase was being fetched.
            return;
        }
        if self.hangup.is_final() {
            return;
        }
        let text = a.cfg.prompts.text(kind).to_owned();
        let spoken = match kind {
            PromptKind::Greeting => SpokenKind::Greeting,
            PromptKind::Apology => SpokenKind::Apology,
            PromptKind::Hold | PromptKind::Filler => SpokenKind::Hold,
            PromptKind::StillThere => SpokenKind::StillThere,
            PromptKind::Handover => SpokenKind::Handover,
        };
        let entry =
            (spoken != SpokenKind::Hold).then(|| a.history.push(Speaker::Agent, text.clone()));
        self.next_utterance += 1;
        let u = UtteranceId(self.next_utterance);
        queue_whole_phrase(
            &mut a.utterances,
            self.playout.as_mut(),
            u,
            spoken,
            text,
            entry,
            &pcm,
        );
        if kind == PromptKind::Greeting && a.apology_after_greeting {
            a.apology_after_greeting = false;
            self.effects.push_back(Effect::Prompt(PromptKind::Apology));
        }
    }

    /// A piece of a phrase streamed for this call. The first audio starts it as
    /// [`CallMachine::on_prompt`] starts a whole one (same history entry, transcript and
    /// barge-in); the rest follows into the playout as a reply's audio does. An apology held
    /// for after the greeting waits for the greeting's end, so the two never interleave.
    fn on_prompt_stream(
        &mut self,
        kind: PromptKind,
        stream: u64,
        chunk: PromptChunk,
        now: Instant,
    ) {
        if !STREAMED_PROMPTS.contains(&kind) {
            warn!(?kind, "this phrase cannot be streamed; ignored");
            return;
        }
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        let current = (a.prompt_streams.iter())
            .find(|(id, _)| *id == stream)
            .map(|(_, u)| *u);
        match (chunk, current) {
            (PromptChunk::Audio(samples), _) if samples.is_empty() => {}
            (PromptChunk::Audio(samples), None) => {
                if self.hangup.is_final() {
                    return;
                }
                let text = a.cfg.prompts.text(kind).to_owned();
                let spoken = match kind {
                    PromptKind::Greeting => SpokenKind::Greeting,
                    PromptKind::Apology => SpokenKind::Apology,
                    _ => SpokenKind::StillThere,
                };
                let entry = Some(a.history.push(Speaker::Agent, text.clone()));
                self.next_utterance += 1;
                let u = UtteranceId(self.next_utterance);
                a.utterances.insert(
                    u,
                    Spoken {
                        kind: spoken,
                        text,
                        samples: samples.len(),
                        heard_before: 0,
                        entry,
                        aligned: Vec::new(),
                        started_at: None,
                    },
                );
                a.prompt_streams.push((stream, u));
                if let Some(p) = self.playout.as_mut() {
                    p.push(u, &samples);
                }
            }
            (PromptChunk::Audio(samples), Some(u)) => {
                // Gone when the caller interrupted it: the rest is not wanted.
                let Some(s) = a.utterances.get_mut(&u) else {
                    return;
                };
                s.samples += samples.len();
                if let Some(p) = a.paused.as_mut().filter(|p| p.utterance == u) {
                    p.rest.extend_from_slice(&samples);
                } else if let Some(p) = self.playout.as_mut() {
                    p.push(u, &samples);
                }
            }
            (PromptChunk::Alignment { chars, start_ms }, Some(u)) => {
                if let Some(s) = a.utterances.get_mut(&u) {
                    s.aligned.extend(chars.into_iter().zip(start_ms));
                }
            }
            (PromptChunk::Alignment { .. }, None) => {}
            (end @ (PromptChunk::Done | PromptChunk::Failed(_)), current) => {
                a.prompt_streams.retain(|(id, _)| *id != stream);
                let error = match end {
                    PromptChunk::Failed(e) => Some(e),
                    _ => None,
                };
                if let Some(u) = current {
                    if let Some(s) = a.utterances.get_mut(&u) {
                        if let Some(e) = &error {
                            warn!(?kind, error = %e, "this call's phrase failed part-way; it ends where its audio ends");
                            // The caller hears the audio that came: the words it speaks.
                            if !s.aligned.is_empty() {
                                s.text = heard_by_alignment(&s.aligned, u32::MAX);
                            }
                        }
                        let paused = a.paused.as_ref().is_some_and(|p| p.utterance == u);
                        if !paused {
                            if let Some(p) = self.playout.as_mut() {
                                p.finish(u);
                            }
                        }
                    }
                }
                if kind == PromptKind::Greeting && a.greeting_pending {
                    a.greeting_pending = false;
                    if a.apology_after_greeting {
                        a.apology_after_greeting = false;
                        self.effects.push_back(Effect::Prompt(PromptKind::Apology));
                    }
                }
                if let Some(e) = error {
                    self.provider_failed(Provider::Tts, classify(&e), &e);
                }
            }
        }
        self.drain_playout_events(now);
    }

    /// Text-to-speech is down and nothing cached can be said: rather than leave the caller
    /// in silence, end the AudioSocket leg with a hangup message so the dialplan continues
    /// at its next priority (e.g. a human operator, see `asterisk/`).
    fn cannot_speak(&mut self, now: Instant) {
        if self.hangup.is_final() {
            return;
        }
        warn!(
            "the agent cannot speak (TTS unavailable, nothing cached); handing the call back to the dialplan"
        );
        self.report
            .errors
            .push("tts: agent could not speak; call handed back to the dialplan".into());
        self.hang_up_soon(now, HangupReason::CannotSpeak);
    }

    // ---- playout ------------------------------------------------------------------------

    /// Stops everything queued now; the utterances end as flushed with what was heard.
    fn flush(&mut self, now: Instant) {
        if let Some(p) = self.playout.as_mut() {
            if !p.is_idle() {
                p.flush(now);
            }
        }
        self.drain_playout_events(now);
    }

    fn drain_playout_events(&mut self, now: Instant) {
        while let Some(ev) = self.playout.as_mut().and_then(Playout::poll_event) {
            match ev {
                PlayoutEvent::Started { utterance, at } => {
                    if let Some(u) = self
                        .agent
                        .as_mut()
                        .and_then(|a| a.utterances.get_mut(&utterance))
                    {
                        u.started_at.get_or_insert(at);
                    }
                    self.on_started(utterance)
                }
                PlayoutEvent::Ended { progress, ends_at } => self.on_ended(progress, ends_at),
                PlayoutEvent::Underrun { utterance } => {
                    self.metrics.underrun();
                    debug!(?utterance, "playout underrun (audio slower than real time)");
                }
            }
        }
        self.update_agent_speaking(now);
    }

    fn on_started(&mut self, u: UtteranceId) {
        if let Some(r) = self
            .agent
            .as_ref()
            .and_then(|a| a.reply.as_ref())
            .filter(|r| r.utterance == u)
        {
            if self
                .report
                .turns
                .get(r.turn)
                .is_some_and(|t| t.first_frame_ms.is_none())
            {
                self.wire_mark = Some(r.turn);
            }
        }
    }

    /// An utterance is over: record what the caller heard.
    fn on_ended(&mut self, p: Progress, ends_at: Instant) {
        let interrupted = p.interrupted();
        if self.pausing && interrupted && p.sent_samples > 0 && self.pause(p, ends_at) {
            return;
        }
        self.hangup = self
            .hangup
            .on_utterance_ended(p.utterance, interrupted, ends_at);
        let at_ms = self.ms(ends_at);
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        if let Some(r) = a.reply.as_ref().filter(|r| r.utterance == p.utterance) {
            if interrupted || !r.done {
                self.effects.push_back(Effect::CancelReply(r.id));
            }
            a.reply = None;
        }
        let Some(u) = a.utterances.remove(&p.utterance) else {
            return;
        };
        let heard = if interrupted {
            let heard_samples = u.heard_before + p.sent_samples;
            let rate = self.rate.map_or(8_000, SampleRate::hz) as usize;
            let heard_ms = (heard_samples * 1000 / rate) as u32;
            if u.aligned.is_empty() {
                heard_prefix(&u.text, heard_samples, u.samples.max(1))
            } else {
                heard_by_alignment(&u.aligned, heard_ms)
            }
        } else {
            u.text.trim().to_owned()
        };
        if let Some(e) = u.entry {
            if heard.is_empty() {
                a.history.remove(e);
            } else if interrupted {
                a.history.set_text(e, format!("{heard}…"));
            } else {
                a.history.set_text(e, heard.clone());
            }
        }
        if u.kind != SpokenKind::Hold && !heard.is_empty() {
            let start_ms = u.started_at.map(|t| self.ms(t));
            self.report.transcript.push(TranscriptEntry {
                role: Role::Agent,
                text: heard,
                at_ms,
                interrupted,
                start_ms,
                end_ms: Some(at_ms),
            });
        }
    }

    /// Keeps the utterance being heard for a possible resume. Returns whether it paused.
    fn pause(&mut self, p: Progress, at: Instant) -> bool {
        let rate = self.rate.map_or(8_000, SampleRate::hz) as usize;
        let unsent = self
            .playout
            .as_mut()
            .and_then(Playout::take_flushed_front)
            .filter(|(u, _)| *u == p.utterance)
            .map(|(_, pcm)| pcm)
            .unwrap_or_default();
        let Some(a) = self.agent.as_mut() else {
            return false;
        };
        if a.paused.is_some() {
            return false;
        }
        let Some(spoken) = a.utterances.get(&p.utterance) else {
            return false;
        };
        if spoken.kind == SpokenKind::Hold {
            return false;
        }
        // Go back over what the caller talked over before the barge-in was decided.
        let talked_over = a.cfg.turn.barge_in_min_speech + Duration::from_millis(100);
        let rewind = (rate * talked_over.as_millis() as usize / 1000)
            .min(p.sent_samples)
            .min(self.recent_sent.len());
        let heard = spoken.heard_before + p.sent_samples;
        let mut rest: Vec<i16> = self
            .recent_sent
            .iter()
            .skip(self.recent_sent.len() - rewind)
            .copied()
            .collect();
        rest.extend(unsent);
        a.paused = Some(Paused {
            utterance: p.utterance,
            heard,
            rest,
            rest_from: heard - rewind,
            resume_at: Some(at + a.cfg.resume_after + RESUME_FALLBACK),
        });
        true
    }

    fn update_agent_speaking(&mut self, now: Instant) {
        let speaking = self.playout.as_ref().is_some_and(Playout::is_speaking);
        let level = self.sent_levels.iter().copied().fold(SILENT_DB, f64::max);
        if let Some(a) = self.agent.as_mut() {
            a.turns.set_agent_speaking(speaking, level, now);
        }
    }

    // ---- tools and handing over to a person ------------------------------------------------

    /// How the call ends for the dialplan: a decided transfer or fallback, else what the
    /// hang-up's reason means (a goodbye or idle is a normal end; an agent that cannot speak
    /// or serve the call's rate sends it to the fallback destination; a draining daemon is
    /// a refusal, so the dialplan can try another).
    pub fn outcome(&self) -> CallOutcome {
        if let Some(o) = &self.outcome {
            return o.clone();
        }
        let fallback = |reason: &str| CallOutcome::Fallback {
            reason: reason.into(),
            destination: self.fallback_destination().unwrap_or_default(),
        };
        match self.hangup_reason() {
            Some(HangupReason::CannotSpeak) => fallback("cannot_speak"),
            Some(HangupReason::UnsupportedRate) => fallback("unsupported_rate"),
            Some(HangupReason::Shutdown) => CallOutcome::Refused {
                reason: "draining".into(),
            },
            _ => CallOutcome::Completed,
        }
    }

    /// Adds a tool call made outside any reply (the pre-call lookup) to the record.
    pub fn record_tool_call(&mut self, record: ToolCallRecord) {
        self.report.tool_calls.push(record);
    }

    fn fallback_destination(&self) -> Option<String> {
        match &self.mode {
            Mode::Agent(cfg) => cfg.tools.fallback_destination.clone(),
            Mode::Echo { .. } => None,
        }
    }

    /// When the filler phrase is due: a tool round has run `filler_after` and nothing else
    /// has covered the wait in this turn (a filler or the hold phrase).
    fn filler_deadline(&self) -> Option<Instant> {
        let a = self.agent.as_ref()?;
        let r = a.reply.as_ref()?;
        let since = r.tools_since?;
        if r.filler_asked
            || r.hold_played
            || r.speculative.is_some()
            || a.cfg.prompts.filler.trim().is_empty()
            || !self.hangup.is_none()
        {
            return None;
        }
        Some(since + a.cfg.tools.filler_after)
    }

    fn on_filler_prompt(&mut self, result: Result<Arc<Vec<i16>>, String>, now: Instant) {
        let pcm = match result {
            Ok(pcm) if !pcm.is_empty() => pcm,
            Ok(_) => return,
            Err(error) => {
                warn!(%error, "filler phrase unavailable");
                return;
            }
        };
        let Some(r) = self.agent.as_mut().and_then(|a| a.reply.as_mut()) else {
            return;
        };
        if r.tools_since.is_none() || r.done {
            // The tools finished while the phrase was being fetched.
            return;
        }
        if r.drained {
            self.push_filler(&pcm, now);
        } else {
            r.filler_held = Some(pcm);
        }
    }

    /// The filler goes into the reply's own utterance, after the speech before the tool
    /// calls (all of which has arrived) and before the next round's.
    fn push_filler(&mut self, pcm: &[i16], now: Instant) {
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        let Some(r) = a.reply.as_mut() else {
            return;
        };
        if r.speculative.is_some()
            || a.paused
                .as_ref()
                .is_some_and(|p| p.utterance == r.utterance)
        {
            return;
        }
        let text = format!("{} ", a.cfg.prompts.filler.trim());
        r.audio_queued = true;
        let u = r.utterance;
        let rate = self.rate.map_or(8_000, SampleRate::hz) as usize;
        if let Some(s) = a.utterances.get_mut(&u) {
            // Synthetic alignment spreads the phrase over its audio, so the words heard at a
            // barge-in stay right.
            if !s.aligned.is_empty() {
                let start = (s.samples * 1000 / rate.max(1)) as u32;
                let len = (pcm.len() * 1000 / rate.max(1)) as u32;
                let n = text.chars().count().max(1) as u32;
                s.aligned.extend(
                    text.chars()
                        .enumerate()
                        .map(|(i, c)| (c.to_string(), start + len * i as u32 / n)),
                );
            }
            s.samples += pcm.len();
            s.text.push_str(&text);
            if let Some(e) = s.entry {
                a.history.append(e, &text);
            }
        }
        if let Some(p) = self.playout.as_mut() {
            p.push(u, pcm);
        }
        self.drain_playout_events(now);
    }

    /// A keypad entry of just the operator digit asks for a person: the operator target, or
    /// the fallback destination. Returns whether the entry was taken as such.
    fn operator_requested(&mut self, digits: &str, now: Instant) -> bool {
        let Some(a) = self.agent.as_ref() else {
            return false;
        };
        let t = &a.cfg.tools;
        let Some(digit) = t.operator_digit else {
            return false;
        };
        if digits.len() != 1 || !digits.starts_with(digit) {
            return false;
        }
        let outcome = match (t.operator_target(), &t.fallback_destination) {
            (Some(target), _) => CallOutcome::Transferred {
                target: target.name.clone(),
                destination: target.destination.clone(),
                summary: None,
            },
            (None, Some(d)) => CallOutcome::Fallback {
                reason: "dtmf".into(),
                destination: d.clone(),
            },
            (None, None) => return false,
        };
        info!(%digits, "the caller keyed the operator digit");
        self.start_handover(outcome, true, now);
        true
    }

    /// Provider failures in a row: the apology, or, at `max_provider_failures` with a
    /// fallback destination, the handover instead of another apology.
    fn apologise_or_hand_over(&mut self, now: Instant) {
        self.failures_in_a_row += 1;
        let fallback = self.agent.as_ref().and_then(|a| {
            let t = &a.cfg.tools;
            (t.max_provider_failures > 0 && self.failures_in_a_row >= t.max_provider_failures)
                .then(|| t.fallback_destination.clone())
                .flatten()
        });
        match fallback {
            Some(destination) => {
                warn!(
                    failures = self.failures_in_a_row,
                    "providers keep failing; handing the call to the fallback destination"
                );
                let outcome = CallOutcome::Fallback {
                    reason: "provider_failures".into(),
                    destination,
                };
                self.start_handover(outcome, false, now);
            }
            None => self.effects.push_back(Effect::Prompt(PromptKind::Apology)),
        }
    }

    /// The call goes to a person (or the fallback): the handover line after whatever is
    /// already queued (`interrupt`: at once, dropping it), then the 0x00 once it was heard.
    /// The caller cannot talk the agent out of it: the hang-up is final, so speech over the
    /// (short) line neither stops it nor starts a reply; the call is handed over when it ends.
    fn start_handover(&mut self, outcome: CallOutcome, interrupt: bool, now: Instant) {
        if self.outcome.is_some() || self.hangup.is_final() {
            return;
        }
        info!(
            result = outcome.dialplan_value(),
            destination = outcome.destination().unwrap_or(""),
            "handing the call over"
        );
        if interrupt {
            self.abandon_speculation("the call is handed over");
            self.abandon_pause();
            self.flush(now);
            if let Some(id) = self
                .agent
                .as_mut()
                .and_then(|a| a.reply.take())
                .map(|r| r.id)
            {
                self.effects.push_back(Effect::CancelReply(id));
            }
        }
        self.outcome = Some(outcome);
        self.next_utterance += 1;
        let u = UtteranceId(self.next_utterance);
        self.handover_utterance = Some(u);
        self.hangup = Hangup::after(u, HangupReason::Handover);
        self.effects.push_back(Effect::Prompt(PromptKind::Handover));
    }

    fn on_handover_prompt(&mut self, result: Result<Arc<Vec<i16>>, String>, now: Instant) {
        let Some(u) = self.handover_utterance.take() else {
            return;
        };
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        let pcm = match result {
            Ok(pcm) if !pcm.is_empty() => pcm,
            other => {
                if let Err(error) = other {
                    warn!(%error, "handover line unavailable; handing over without it");
                }
                // After the reply's own words if they are still playing, else at once.
                let reply = a.reply.as_ref().filter(|r| r.done).map(|r| r.utterance);
                self.hangup = match reply {
                    Some(r) => Hangup::after(r, HangupReason::Handover),
                    None => {
                        let last = self.playout.as_ref().and_then(Playout::last_speech_end);
                        Hangup::soon(last, now, HangupReason::Handover)
                    }
                };
                return;
            }
        };
        let text = a.cfg.prompts.handover.clone();
        let entry = Some(a.history.push(Speaker::Agent, text.clone()));
        queue_whole_phrase(
            &mut a.utterances,
            self.playout.as_mut(),
            u,
            SpokenKind::Handover,
            text,
            entry,
            &pcm,
        );
        self.drain_playout_events(now);
    }

    // ---- time -----------------------------------------------------------------------------

    fn on_timeout(&mut self, now: Instant) {
        if let Some(at) = self.hangup.deadline() {
            if now >= at {
                let reason = match self.hangup {
                    Hangup::At(_, r) => r,
                    _ => HangupReason::Idle,
                };
                self.hangup = Hangup::Sent(reason);
                self.effects.push_back(Effect::Hangup);
                return;
            }
        }
        self.tick(now);
        if self.inbound_deadline().is_some_and(|d| now >= d) {
            info!("nothing from the peer for the idle limit; hanging up");
            self.end_idle(now);
            return;
        }
        self.echo_idle_check(now);
        if let Some((_, ask)) = self.idle_deadline().filter(|(at, _)| now >= *at) {
            if ask {
                info!("nobody has spoken for a while; asking whether the caller is still there");
                if let Some(a) = self.agent.as_mut() {
                    a.still_there_asked = true;
                    a.last_activity = now;
                }
                self.effects
                    .push_back(Effect::Prompt(PromptKind::StillThere));
            } else {
                info!("nobody has spoken for the idle limit; hanging up");
                self.end_idle(now);
                return;
            }
        }
        if let Some(a) = self.agent.as_mut() {
            let speaking = a.turns.caller_speaking();
            if let Some(p) = a
                .paused
                .as_mut()
                .filter(|p| p.resume_at.is_some_and(|at| now >= at))
            {
                if speaking {
                    // Never over the caller: re-armed when they stop.
                    p.resume_at = None;
                } else {
                    info!("no words came after the interruption; resuming");
                    self.resume(now);
                }
            }
        }
        if self.speculate_deadline().is_some_and(|d| now >= d) {
            self.speculate(now);
        }
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        if let Some(entry) = a.dtmf.poll(now) {
            self.submit_dtmf(entry, now);
        }
        if let Some(Stt::Down { retry_at }) = self.agent.as_ref().map(|a| a.stt) {
            if now >= retry_at {
                let cfg = self.agent.as_ref().map(|a| Arc::clone(&a.cfg));
                if let (Some(cfg), Some(rate)) = (cfg, self.rate) {
                    let params = self.stt_params(&cfg, rate);
                    if let Some(a) = self.agent.as_mut() {
                        a.stt = Stt::Connecting;
                    }
                    self.effects.push_back(Effect::StartStt(params));
                }
            }
        }
        if self.reply_silence_deadline().is_some_and(|d| now >= d) {
            self.on_reply_silence(now);
        }
        if self.filler_deadline().is_some_and(|d| now >= d) {
            if let Some(r) = self.agent.as_mut().and_then(|a| a.reply.as_mut()) {
                r.filler_asked = true;
                info!("a tool is slow; saying the filler phrase");
                self.effects.push_back(Effect::Prompt(PromptKind::Filler));
            }
        }
    }

    /// Sends the frame due now, if one is.
    fn tick(&mut self, now: Instant) {
        let Some(p) = self.playout.as_mut() else {
            if now >= self.keepalive_at {
                self.keepalive_at = now + KEEPALIVE_EVERY;
                let rate = SampleRate::Hz8000;
                self.effects.push_back(Effect::Frame {
                    rate,
                    pcm: vec![0; rate.samples_per_frame()],
                    lateness: Duration::ZERO,
                });
            }
            return;
        };
        let Some(tick) = p.poll(now) else {
            return;
        };
        let rate = self.rate.unwrap_or(SampleRate::Hz8000);
        if self.agent.is_some() {
            // The echo guard compares the caller with what we sent lately (the line's echo
            // comes back within the window), not with an average of the whole reply.
            if self.sent_levels.len() == ECHO_REFERENCE_FRAMES {
                self.sent_levels.pop_front();
            }
            let level = match tick.kind {
                FrameKind::Speech => pcm::dbfs(&tick.pcm),
                FrameKind::Silence => SILENT_DB,
            };
            self.sent_levels.push_back(level);
            if tick.kind == FrameKind::Speech {
                self.recent_sent.extend(tick.pcm.iter().copied());
                let excess = self.recent_sent.len().saturating_sub(RECENT_SENT_SAMPLES);
                self.recent_sent.drain(..excess);
            }
        }
        self.effects.push_back(Effect::Frame {
            rate,
            pcm: tick.pcm,
            lateness: tick.lateness,
        });
        self.drain_playout_events(now);
    }

    fn end_idle(&mut self, now: Instant) {
        self.hang_up_soon(now, HangupReason::Idle);
    }

    /// Ends the call once the audio already sent has played: whatever the agent was
    /// preparing or holding is dropped.
    fn hang_up_soon(&mut self, now: Instant, reason: HangupReason) {
        self.abandon_speculation("the call is ending");
        self.abandon_pause();
        if let Some(id) = self
            .agent
            .as_mut()
            .and_then(|a| a.reply.take())
            .map(|r| r.id)
        {
            self.effects.push_back(Effect::CancelReply(id));
        }
        let last = self.playout.as_ref().and_then(Playout::last_speech_end);
        self.hangup = Hangup::soon(last, now, reason);
    }

    /// When nobody has spoken for long enough (counted from the end of the agent's audio as
    /// the caller heard it) and the agent is neither thinking nor talking: first the "are you
    /// still there?" question (`true`), then the idle hang-up (`false`).
    fn idle_deadline(&self) -> Option<(Instant, bool)> {
        let a = self.agent.as_ref()?;
        let p = self.playout.as_ref()?;
        let busy = a.reply.is_some()
            || a.paused.is_some()
            || !self.hangup.is_none()
            || a.turns.caller_speaking()
            || !p.is_idle()
            || a.greeting_pending;
        if busy {
            return None;
        }
        let since = p
            .last_speech_end()
            .map_or(a.last_activity, |e| e.max(a.last_activity));
        let idle = a.cfg.idle_hangup;
        match (a.cfg.still_there_after, a.still_there_asked, idle) {
            (Some(ask), false, None) => Some((since + ask, true)),
            (Some(ask), false, Some(idle)) if ask < idle => Some((since + ask, true)),
            (Some(ask), true, Some(idle)) => Some((
                since + idle.saturating_sub(ask).max(MIN_IDLE_AFTER_ASKING),
                false,
            )),
            (_, _, Some(idle)) => Some((since + idle, false)),
            (_, _, None) => None,
        }
    }

    /// A peer that sends nothing at all (no audio, no keypad) for the idle limit is gone,
    /// whatever the mode: a stuck PBX, a half-sent message.
    fn inbound_deadline(&self) -> Option<Instant> {
        if !self.hangup.is_none() {
            return None;
        }
        let idle = match &self.mode {
            Mode::Echo { idle_hangup } => *idle_hangup,
            Mode::Agent(cfg) => cfg.idle_hangup,
        }?;
        Some(self.last_inbound + idle)
    }

    /// Echo mode: when the caller's audio stops, close the echo utterance so caller silence
    /// is not counted as playout underruns.
    fn echo_idle_check(&mut self, now: Instant) {
        if !matches!(self.mode, Mode::Echo { .. }) || !self.echo.open {
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

    fn on_shutdown(&mut self, now: Instant) {
        if self.hangup.is_final() {
            return;
        }
        info!("daemon shutting down: hanging up");
        // Stop talking now (the flush cancels the reply it ends), then hang up after the
        // frame in flight.
        self.flush(now);
        self.hang_up_soon(now, HangupReason::Shutdown);
    }

    // ---- accounting -------------------------------------------------------------------

    fn provider_failed(&mut self, provider: Provider, kind: &str, error: &str) {
        self.metrics.provider_error(provider, kind);
        self.report.errors.push(format!("{provider:?}: {error}"));
    }

    fn log_turn(&self, t: &TurnTiming) {
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
}

/// A failure's kind, for the provider-error metric.
pub fn classify(error: &str) -> &'static str {
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

/// The words the caller heard, from the TTS service's alignment: the characters that had
/// started by `heard_ms`, cut back to a word boundary unless the word was complete.
fn heard_by_alignment(aligned: &[(String, u32)], heard_ms: u32) -> String {
    let n = aligned
        .iter()
        .take_while(|(_, start)| *start < heard_ms)
        .count();
    let prefix: String = aligned[..n].iter().map(|(c, _)| c.as_str()).collect();
    let word_complete = aligned
        .get(n)
        .is_none_or(|(c, _)| c.chars().all(char::is_whitespace));
    let prefix = if word_complete {
        prefix.as_str()
    } else {
        prefix
            .rfind(char::is_whitespace)
            .map_or("", |i| &prefix[..i])
    };
    prefix.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heard_words_come_from_the_alignment() {
        let text = "Harga pakej asas ialah tiga puluh ringgit.";
        // 60 ms a character.
        let aligned: Vec<(String, u32)> = text
            .chars()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32 * 60))
            .collect();
        assert_eq!(heard_by_alignment(&aligned, 0), "");
        // "Harga pakej as" had started: "as" is cut off.
        assert_eq!(heard_by_alignment(&aligned, 14 * 60), "Harga pakej");
        // "Harga pakej " had started: both words whole.
        assert_eq!(heard_by_alignment(&aligned, 12 * 60), "Harga pakej");
        assert_eq!(heard_by_alignment(&aligned, 10_000), text);
    }

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
