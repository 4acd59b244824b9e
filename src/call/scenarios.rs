//! Whole calls in virtual time: the machine fed a script of (time, input), its effects
//! performed by a simulated driver that writes frames at their deadlines. No socket, no
//! sleep: these run in milliseconds and assert what the caller hears, frame by frame.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::history::{HistoryBudget, estimate_tokens};
use super::machine::{
    AgentConfig, CallMachine, Effect, Input, Mode, Pipeline, PromptChunk, ReplyEvent, ReplyId,
};
use super::prompts::{PromptKind, PromptTexts};
use super::turn::TurnConfig;
use crate::audio::wav;
use crate::audiosocket::{Digit, SampleRate};
use crate::ops::metrics::{Metrics, Provider};
use crate::ops::records::Role;
use crate::providers::llm::ChatRequest;
use crate::providers::stt::SttEvent;
use crate::providers::tts::TtsParams;

const MS: Duration = Duration::from_millis(1);
/// Agent audio values: each utterance kind is a constant-ish tone whose sample magnitude
/// says what it is, so a frame tells who was speaking.
const GREETING: i16 = 1100;
const APOLOGY: i16 = 1200;
const HOLD: i16 = 1300;

fn tone(level: i16, ms: u64) -> Vec<i16> {
    (0..ms * 8)
        .map(|i| if i % 2 == 0 { level } else { -level })
        .collect()
}

fn reply_tone(id: ReplyId, ms: u64) -> Vec<i16> {
    tone(2000 + id.0 as i16, ms)
}

fn speech() -> Vec<i16> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/malay_question_8k.wav"
    );
    let w = wav::read(std::path::Path::new(path)).unwrap();
    assert_eq!(w.rate, 8000);
    // The recording's voiced part (1.0 s to 4.55 s).
    w.samples[8000..36_400].to_vec()
}

pub(super) fn config() -> AgentConfig {
    AgentConfig {
        language: "ms-MY".into(),
        system_prompt: "Anda pembantu.".into(),
        prompts: PromptTexts {
            greeting: "Selamat datang.".into(),
            apology: "Maaf, ada masalah.".into(),
            hold: "Sebentar ya.".into(),
            still_there: "Masih di sana?".into(),
            handover: "Baik, saya sambungkan anda.".into(),
            filler: "Sebentar ya.".into(),
        },
        segmentation_silence_ms: 300,
        turn: TurnConfig::default(),
        hold_after: Duration::from_millis(1200),
        dtmf_timeout: Duration::from_millis(2000),
        idle_hangup: Some(Duration::from_secs(60)),
        history: HistoryBudget::default(),
        pipeline: Pipeline::Streamed,
        still_there_after: None,
        speculate_after: None,
        speculative_max: 20,
        backchannels: vec!["ya".into(), "ok".into(), "hmm".into(), "mm".into()],
        resume_after: Duration::from_millis(1200),
        tools: super::tools::AgentTools::default(),
        languages: Vec::new(),
    }
}

/// A simulated driver around one machine.
struct Sim {
    m: CallMachine,
    t0: Instant,
    now: Instant,
    /// Frames written: (time, samples).
    frames: Vec<(Instant, Vec<i16>)>,
    prompts: HashMap<PromptKind, Arc<Vec<i16>>>,
    /// Prompts asked for, in order.
    prompt_requests: Vec<(Instant, PromptKind)>,
    replies: Vec<(Instant, ReplyId, ChatRequest)>,
    cancelled: Vec<ReplyId>,
    stt_starts: Vec<Instant>,
    stt_audio: usize,
    hangup: Option<Instant>,
    /// Answer StartStt with SttUp at once.
    stt_auto_up: bool,
    /// The synthesis settings of each reply started, in order.
    tts: Vec<TtsParams>,
    /// Phrases the test streams itself ([`Input::PromptStream`]): asked for, not answered.
    streamed: Vec<PromptKind>,
}

impl Sim {
    fn new(cfg: AgentConfig) -> Self {
        let t0 = Instant::now();
        let mut prompts = HashMap::new();
        prompts.insert(PromptKind::Greeting, Arc::new(tone(GREETING, 1000)));
        prompts.insert(PromptKind::Apology, Arc::new(tone(APOLOGY, 800)));
        prompts.insert(PromptKind::Hold, Arc::new(tone(HOLD, 600)));
        Self {
            m: CallMachine::new(
                uuid::Uuid::nil(),
                t0,
                Mode::Agent(Arc::new(cfg)),
                Arc::new(Metrics::new()),
            ),
            t0,
            now: t0,
            frames: Vec::new(),
            prompts,
            prompt_requests: Vec::new(),
            replies: Vec::new(),
            cancelled: Vec::new(),
            stt_starts: Vec::new(),
            stt_audio: 0,
            hangup: None,
            stt_auto_up: true,
            tts: Vec::new(),
            streamed: Vec::new(),
        }
    }

    fn m_ms(&self, t: Instant) -> u64 {
        (t - self.t0).as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + MS * ms as u32
    }

    fn perform(&mut self) {
        while let Some(e) = self.m.poll_effect() {
            match e {
                Effect::Frame { pcm, .. } => {
                    self.frames.push((self.now, pcm));
                    self.m.frame_written(self.now);
                }
                Effect::Hangup => self.hangup = Some(self.now),
                Effect::StartStt(_) => {
                    self.stt_starts.push(self.now);
                    if self.stt_auto_up {
                        self.m.handle(Input::SttUp, self.now);
                    }
                }
                Effect::SttAudio(_) => self.stt_audio += 1,
                Effect::StartReply {
                    id, request, tts, ..
                } => {
                    self.replies.push((self.now, id, request));
                    self.tts.push(tts);
                }
                Effect::CancelReply(id) => self.cancelled.push(id),
                Effect::Prompt(kind) if self.streamed.contains(&kind) => {
                    self.prompt_requests.push((self.now, kind));
                }
                Effect::Prompt(kind) => {
                    self.prompt_requests.push((self.now, kind));
                    let r = self
                        .prompts
                        .get(&kind)
                        .cloned()
                        .ok_or_else(|| "TTS down".to_owned());
                    self.m.handle(Input::Prompt(kind, r), self.now);
                }
            }
        }
    }

    /// Runs the machine's own deadlines up to `t`.
    fn advance(&mut self, t: Instant) {
        loop {
            self.perform();
            match self.m.poll_timeout() {
                Some(d) if d <= t => {
                    self.now = self.now.max(d);
                    self.m.handle(Input::Timeout, self.now);
                }
                _ => break,
            }
        }
        self.now = self.now.max(t);
    }

    fn input(&mut self, t: Instant, input: Input) {
        self.advance(t);
        self.m.handle(input, self.now);
        self.perform();
    }

    /// The caller sends 20 ms frames from `from` for `samples` (zeros for silence).
    fn caller(&mut self, from: Instant, samples: &[i16]) -> Instant {
        let mut t = from;
        for chunk in samples.chunks(160) {
            self.input(
                t,
                Input::CallerAudio {
                    rate: SampleRate::Hz8000,
                    pcm: chunk.to_vec(),
                },
            );
            t += 20 * MS;
        }
        t
    }

    fn silence(&mut self, from: Instant, ms: u64) -> Instant {
        self.caller(from, &vec![0; (ms * 8) as usize])
    }

    fn reply(&mut self, t: Instant, id: ReplyId, ev: ReplyEvent) {
        self.input(t, Input::Reply(id, ev));
    }

    /// A whole reply arriving at once: first token, text, audio, done.
    fn full_reply(&mut self, t: Instant, id: ReplyId, text: &str, ms: u64, end_call: bool) {
        self.reply(t, id, ReplyEvent::FirstToken);
        self.reply(t, id, ReplyEvent::Text(format!("{text} ")));
        self.reply(t, id, ReplyEvent::Audio(reply_tone(id, ms)));
        if end_call {
            self.reply(t, id, ReplyEvent::EndCall);
        }
        self.reply(t, id, ReplyEvent::Done);
    }

    /// The caller says something (a short voiced stretch, then the silence Azure needs to
    /// end the phrase) and the final arrives; returns the final's time.
    fn ask(&mut self, t: Instant, text: &str) -> Instant {
        let voiced = speech();
        let t = self.caller(t, &voiced[..6400]);
        let t = self.silence(t, 460);
        self.final_(t, text);
        t
    }

    fn final_(&mut self, t: Instant, text: &str) {
        self.input(
            t,
            Input::Stt(SttEvent::Final {
                text: text.into(),
                offset_ms: 0,
                duration_ms: 0,
                language: None,
            }),
        );
    }

    fn dtmf(&mut self, t: Instant, c: u8) {
        self.input(t, Input::Dtmf(Digit::new(c).unwrap()));
    }

    fn last_reply(&self) -> ReplyId {
        self.replies.last().unwrap().1
    }

    /// Frames carrying a reply's audio.
    fn frames_of(&self, level: i16) -> usize {
        self.frames
            .iter()
            .filter(|(_, f)| f.contains(&level))
            .count()
    }

    fn transcript(&self) -> Vec<(Role, String, bool)> {
        self.m
            .report()
            .unwrap()
            .transcript
            .into_iter()
            .map(|e| (e.role, e.text, e.interrupted))
            .collect()
    }

    /// The longest run of silent frames in [from, to).
    fn longest_silence(&self, from: Instant, to: Instant) -> Duration {
        let mut longest = Duration::ZERO;
        let mut run_start = None;
        for (t, f) in self.frames.iter().filter(|(t, _)| *t >= from && *t < to) {
            let silent = f.iter().all(|&s| s == 0);
            match (silent, run_start) {
                (true, None) => run_start = Some(*t),
                (false, Some(s)) => {
                    longest = longest.max(*t - s);
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            longest = longest.max(to - s);
        }
        longest
    }
}

/// A call that has heard the greeting out and has STT up; returns the time.
fn greeted(sim: &mut Sim) -> Instant {
    let t = sim.silence(sim.t0, 1500);
    assert_eq!(sim.frames_of(GREETING), 50, "the greeting plays in full");
    t
}

#[test]
fn dtmf_during_a_streaming_reply_does_not_silence_the_agent() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Berapa harga pakej?");
    let r1 = sim.last_reply();
    sim.reply(t + 300 * MS, r1, ReplyEvent::FirstToken);
    sim.reply(
        t + 300 * MS,
        r1,
        ReplyEvent::Text("Harga pakej asas ialah ".into()),
    );
    sim.reply(t + 400 * MS, r1, ReplyEvent::Audio(reply_tone(r1, 3000)));
    // Still streaming (no Done) when the caller keys 1 then #.
    let t = sim.silence(t, 900);
    sim.dtmf(t, b'1');
    let t = sim.silence(t, 240);
    sim.dtmf(t, b'#');
    assert_eq!(sim.cancelled, vec![r1], "the streaming reply is cancelled");
    let r2 = sim.last_reply();
    assert_ne!(r1, r2, "the keypad entry starts a new reply");
    let user = &sim.replies.last().unwrap().2.messages;
    assert!(user.last().unwrap().content.contains("1"), "{user:?}");
    // Late audio from the cancelled reply is never played.
    sim.reply(t + 10 * MS, r1, ReplyEvent::Audio(reply_tone(r1, 1000)));
    let r1_frames = sim.frames_of(2001);
    sim.full_reply(t + 300 * MS, r2, "Anda menekan satu.", 1000, false);
    let t = sim.silence(t, 2000);
    assert_eq!(
        sim.frames_of(2001),
        r1_frames,
        "nothing of r1 after the flush"
    );
    assert_eq!(sim.frames_of(2002), 50, "the new reply is heard in full");
    assert_eq!(sim.m.underruns(), 0);
    // The agent is not stuck talking: a later transcript is answered, not taken for echo.
    sim.ask(t + 1600 * MS, "Terima kasih");
    assert_eq!(sim.replies.len(), 3);
    let lines = sim.transcript();
    assert!(
        lines
            .iter()
            .any(|(role, text, interrupted)| *role == Role::Agent
                && *interrupted
                && !text.is_empty()
                && "Harga pakej asas ialah".starts_with(text.as_str())),
        "the cut reply is recorded as heard: {lines:?}"
    );
}

#[test]
fn a_barge_in_during_the_goodbye_cancels_the_hangup_and_the_next_question_is_answered() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Itu sahaja, terima kasih.");
    let r1 = sim.last_reply();
    sim.full_reply(t + 300 * MS, r1, "Baiklah, selamat tinggal!", 3000, true);
    // 600 ms into the goodbye the caller starts speaking over it.
    let t = sim.silence(t, 900);
    let speech = speech();
    let t = sim.caller(t, &speech[..8000 * 2]);
    assert_eq!(sim.m.report().unwrap().barge_ins, 1);
    assert!(sim.frames_of(2001) < 150, "the goodbye was cut short");
    let t = sim.silence(t, 600);
    assert_eq!(sim.hangup, None, "no hangup after an interrupted goodbye");
    let t = sim.ask(t, "Oh, satu soalan lagi.");
    let r2 = sim.last_reply();
    sim.full_reply(t + 300 * MS, r2, "Silakan.", 1000, false);
    sim.silence(t, 3000);
    assert_eq!(sim.frames_of(2002), 50);
    assert_eq!(sim.hangup, None);
}

#[test]
fn a_goodbye_heard_to_its_end_hangs_up_after_it() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Itu sahaja.");
    let r1 = sim.last_reply();
    sim.full_reply(t + 300 * MS, r1, "Selamat tinggal!", 1000, true);
    sim.silence(t, 3000);
    assert_eq!(sim.frames_of(2001), 50, "the goodbye is heard to its end");
    let last_goodbye_frame = sim
        .frames
        .iter()
        .filter(|(_, f)| f.contains(&2001))
        .map(|(t, _)| *t)
        .max()
        .unwrap();
    let h = sim.hangup.expect("hung up");
    assert!(h >= last_goodbye_frame + 100 * MS && h <= last_goodbye_frame + 140 * MS);
}

#[test]
fn dtmf_and_speech_together_make_one_turn() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Saya nak bayar bil");
    let r1 = sim.last_reply();
    sim.dtmf(t + 20 * MS, b'2');
    sim.dtmf(t + 60 * MS, b'#');
    assert_eq!(sim.cancelled, vec![r1]);
    let r2 = sim.last_reply();
    let last = sim
        .replies
        .last()
        .unwrap()
        .2
        .messages
        .last()
        .unwrap()
        .clone();
    assert_eq!(last.role, "user");
    assert!(last.content.contains("Saya nak bayar bil") && last.content.contains('2'));
    let user_turns = sim
        .replies
        .last()
        .unwrap()
        .2
        .messages
        .iter()
        .filter(|m| m.role == "user")
        .count();
    assert_eq!(user_turns, 1, "merged into one caller turn");
    sim.full_reply(t + 400 * MS, r2, "Baik.", 600, false);
    sim.silence(t, 2000);
    assert_eq!(sim.frames_of(2002), 30);
    let turns = sim.m.report().unwrap().turns;
    assert_eq!(turns.len(), 1, "one turn in the record: {turns:?}");
}

#[test]
fn an_stt_outage_mid_call_gets_one_apology_and_recovers() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Soalan pertama");
    let r1 = sim.last_reply();
    sim.full_reply(t + 300 * MS, r1, "Jawapan pertama.", 500, false);
    let t = sim.silence(t, 1500);
    sim.stt_auto_up = false;
    sim.input(t, Input::SttDown("websocket closed".into()));
    let t = sim.silence(t, 2100);
    assert_eq!(sim.stt_starts.len(), 2, "retried after 2 s");
    sim.input(t, Input::SttDown("connection refused".into()));
    let t = sim.silence(t, 2100);
    assert_eq!(sim.stt_starts.len(), 3);
    let apologies = sim
        .prompt_requests
        .iter()
        .filter(|(_, k)| *k == PromptKind::Apology)
        .count();
    assert_eq!(apologies, 1, "one apology per outage");
    sim.input(t, Input::SttUp);
    let t = sim.silence(t, 500);
    let t = sim.ask(t, "Soalan kedua");
    let r2 = sim.last_reply();
    sim.full_reply(t + 300 * MS, r2, "Jawapan kedua.", 500, false);
    sim.silence(t, 1500);
    let lines = sim.transcript();
    let texts: Vec<&str> = lines.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(
        texts,
        [
            "Selamat datang.",
            "Soalan pertama",
            "Jawapan pertama.",
            "Maaf, ada masalah.",
            "Soalan kedua",
            "Jawapan kedua."
        ]
    );
    // The model sees the whole conversation, apology included.
    let msgs = &sim.replies.last().unwrap().2.messages;
    assert!(msgs.iter().any(|m| m.content == "Jawapan pertama."));
}

#[test]
fn with_tts_down_and_nothing_cached_the_call_goes_back_to_the_dialplan_at_once() {
    let mut sim = Sim::new(config());
    sim.prompts.clear();
    sim.silence(sim.t0, 1000);
    let h = sim.hangup.expect("handed back to the dialplan");
    assert!(h <= sim.t0 + 100 * MS, "hung up at {:?}", h - sim.t0);
    assert!(
        sim.m
            .report()
            .unwrap()
            .errors
            .iter()
            .any(|e| e.contains("could not speak"))
    );
}

#[test]
fn an_llm_stall_gets_the_hold_phrase_then_an_apology_with_no_long_silence() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let speech = speech();
    let t = sim.caller(t, &speech);
    // The VAD's end of speech; Azure's final comes 450 ms later.
    let t = sim.silence(t, 450);
    sim.final_(t, "Berapa harga pakej?");
    let speech_end = sim.m.report().unwrap().turns[0].speech_end_ms.unwrap();
    let speech_end = sim.t0 + MS * speech_end as u32;
    // The model never answers.
    let end = sim.silence(t, 6000);
    let hold = sim
        .prompt_requests
        .iter()
        .find(|(_, k)| *k == PromptKind::Hold)
        .unwrap()
        .0;
    assert!(
        hold - speech_end <= 1200 * MS + 20 * MS,
        "hold after {:?}",
        hold - speech_end
    );
    let apology = sim
        .prompt_requests
        .iter()
        .find(|(_, k)| *k == PromptKind::Apology)
        .unwrap()
        .0;
    assert!(apology > hold);
    assert_eq!(
        sim.cancelled,
        vec![sim.last_reply()],
        "the stalled reply is abandoned"
    );
    let until_apology_played = apology + 800 * MS;
    let longest = sim.longest_silence(speech_end, until_apology_played);
    assert!(longest <= 1500 * MS, "{longest:?} of unexplained silence");
    assert!(
        sim.m
            .report()
            .unwrap()
            .errors
            .iter()
            .any(|e| e.contains("Llm"))
    );
    // Afterwards the agent listens again.
    sim.ask(end, "Helo?");
    assert_eq!(sim.replies.len(), 2);
}

#[test]
fn a_call_silent_for_two_seconds_then_at_16_khz_is_a_16_khz_call() {
    let mut sim = Sim::new(config());
    sim.advance(sim.at(2000));
    let keepalives = sim.frames.len();
    assert!(
        (1..=2).contains(&keepalives),
        "{keepalives} keep-alive frames"
    );
    assert!(
        sim.frames
            .iter()
            .all(|(_, f)| f.len() == 160 && f.iter().all(|&s| s == 0))
    );
    sim.prompts
        .insert(PromptKind::Greeting, Arc::new(vec![GREETING; 16_000]));
    let mut t = sim.at(2000);
    for _ in 0..100 {
        sim.input(
            t,
            Input::CallerAudio {
                rate: SampleRate::Hz16000,
                pcm: vec![0; 320],
            },
        );
        t += 20 * MS;
    }
    assert_eq!(sim.m.rate(), Some(SampleRate::Hz16000));
    let after: Vec<_> = sim.frames[keepalives..].iter().collect();
    assert!(after.iter().all(|(_, f)| f.len() == 320), "16 kHz frames");
    assert_eq!(sim.frames_of(GREETING), 50);
    assert_eq!(sim.stt_audio, 100, "no caller frame dropped");
}

#[test]
fn a_sixty_turn_call_stays_within_the_history_budget() {
    let mut cfg = config();
    cfg.history = HistoryBudget {
        max_entries: 16,
        max_tokens: 600,
    };
    let mut sim = Sim::new(cfg);
    let mut t = greeted(&mut sim);
    for turn in 0..60 {
        t = sim.ask(
            t,
            &format!("Soalan nombor {turn} tentang bil internet bulan ini"),
        );
        let r = sim.last_reply();
        let req = &sim.replies.last().unwrap().2;
        assert_eq!(req.messages[0].role, "system");
        assert!(req.messages.len() <= 17);
        let tokens: usize = req.messages[1..]
            .iter()
            .map(|m| estimate_tokens(&m.content))
            .sum();
        assert!(tokens <= 600, "turn {turn}: {tokens}");
        assert!(
            req.messages
                .last()
                .unwrap()
                .content
                .contains(&format!("nombor {turn} "))
        );
        sim.full_reply(
            t + 300 * MS,
            r,
            &format!("Jawapan {turn}: bil anda ialah RM{turn}."),
            400,
            false,
        );
        t = sim.silence(t, 900);
    }
    let report = sim.m.report().unwrap();
    assert_eq!(report.turns.len(), 60);
    assert_eq!(
        report.transcript.len(),
        121,
        "the record keeps the whole conversation"
    );
}

#[test]
fn a_hundred_talkspurts_never_run_the_schedule_ahead() {
    let mut sim = Sim::new(config());
    let mut t = greeted(&mut sim);
    for n in 0..100u64 {
        sim.dtmf(t, b'1');
        sim.dtmf(t, b'#');
        let r = sim.last_reply();
        // Audio arrives at an odd moment inside a frame.
        sim.full_reply(t + MS * (7 + (n % 13)) as u32, r, "ya.", 100, false);
        t = sim.silence(t, 400);
    }
    let times: Vec<Instant> = sim.frames.iter().map(|(t, _)| *t).collect();
    for w in times.windows(2) {
        assert!(w[1] - w[0] >= 20 * MS, "two frames {:?} apart", w[1] - w[0]);
    }
    let elapsed = *times.last().unwrap() - *times.first().unwrap();
    assert!(times.len() as u128 <= elapsed.as_millis() / 20 + 1);
}

#[test]
fn a_reply_that_fails_after_speaking_part_apologises_after_what_was_heard() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Soalan");
    let r1 = sim.last_reply();
    sim.reply(t + 300 * MS, r1, ReplyEvent::FirstToken);
    sim.reply(
        t + 300 * MS,
        r1,
        ReplyEvent::Text("Sebahagian jawapan ".into()),
    );
    sim.reply(t + 300 * MS, r1, ReplyEvent::Audio(reply_tone(r1, 400)));
    sim.reply(
        t + 400 * MS,
        r1,
        ReplyEvent::Failed {
            provider: Provider::Tts,
            error: "TTS stream closed".into(),
        },
    );
    sim.silence(t, 2500);
    assert_eq!(sim.frames_of(2001), 20, "the part already made is heard");
    assert_eq!(sim.frames_of(APOLOGY), 40, "then the apology");
    let lines = sim.transcript();
    assert!(
        lines.contains(&(Role::Agent, "Sebahagian jawapan".into(), false)),
        "{lines:?}"
    );
}

#[test]
fn idle_hangup_counts_from_the_end_of_the_agents_audio() {
    let mut cfg = config();
    cfg.idle_hangup = Some(Duration::from_secs(5));
    let mut sim = Sim::new(cfg);
    // The greeting (1 s) ends at about 1.0 s; nobody speaks.
    sim.silence(sim.t0, 8000);
    let h = sim.hangup.expect("idle hangup");
    let greeting_end = sim
        .frames
        .iter()
        .filter(|(_, f)| f.contains(&GREETING))
        .map(|(t, _)| *t)
        .max()
        .unwrap()
        + 20 * MS;
    let after = h - greeting_end;
    assert!(after >= 5000 * MS && after <= 5200 * MS, "{after:?}");
}

#[test]
fn a_listening_noise_over_the_agent_is_not_a_turn() {
    let mut cfg = config();
    // So that a 300 ms "ya" is heard as the caller's voice but is no barge-in.
    cfg.turn.barge_in_min_speech = Duration::from_millis(600);
    let mut sim = Sim::new(cfg);
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Terangkan pakej premium.");
    let r1 = sim.last_reply();
    sim.full_reply(
        t + 300 * MS,
        r1,
        "Pakej premium termasuk banyak perkara.",
        3000,
        false,
    );
    let t = sim.silence(t, 1000);
    // The caller says "ya": voiced, but too short for the VAD to call it a barge-in.
    let voiced = speech();
    let t = sim.caller(t, &voiced[..2400]);
    let t = sim.silence(t, 300);
    assert_eq!(sim.m.report().unwrap().barge_ins, 0);
    sim.final_(t, "Ya.");
    sim.silence(t, 3000);
    assert_eq!(sim.replies.len(), 1, "no new turn");
    assert_eq!(sim.frames_of(2001), 150, "the reply is heard in full");
    assert!(
        sim.transcript()
            .contains(&(Role::Caller, "Ya.".into(), false))
    );
}

/// The line reflects the agent's own speech back (hybrid echo, here 20 dB down and 40 ms
/// late) over line noise (white, -45 dBFS), and Azure transcribes that echo: the agent is
/// neither interrupted nor answers itself.
#[test]
fn the_agents_own_echo_over_line_noise_never_interrupts_it() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Terangkan pakej premium.");
    let r1 = sim.last_reply();
    // A reply of real speech, so that the VAD hears its echo as a voice.
    let voice = speech();
    let text = "Pakej premium termasuk banyak perkara.";
    sim.reply(t + 300 * MS, r1, ReplyEvent::FirstToken);
    sim.reply(t + 300 * MS, r1, ReplyEvent::Text(format!("{text} ")));
    sim.reply(t + 300 * MS, r1, ReplyEvent::Audio(voice.clone()));
    sim.reply(t + 300 * MS, r1, ReplyEvent::Done);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let noise_rms = 32768.0 * 10f64.powf(-45.0 / 20.0);
    let mut line = |sim: &mut Sim, from: Instant, ms: u64| {
        let mut now = from;
        while now < from + MS * ms as u32 {
            let echo = sim
                .frames
                .iter()
                .rev()
                .find(|(at, _)| *at + 40 * MS <= now)
                .map_or_else(|| vec![0; 160], |(_, f)| f.clone());
            let pcm = echo
                .iter()
                .map(|&s| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    // Uniform in [-1, 1), RMS 1/sqrt(3).
                    let u = (rng >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                    let n = u * 3f64.sqrt() * noise_rms;
                    (f64::from(s) * 0.1 + n).round() as i16
                })
                .collect();
            sim.input(
                now,
                Input::CallerAudio {
                    rate: SampleRate::Hz8000,
                    pcm,
                },
            );
            now += 20 * MS;
        }
        now
    };
    let t = line(&mut sim, t, 2000);
    // Azure hears the echo's words.
    sim.final_(t, "Pakej premium termasuk");
    let t = line(&mut sim, t, 3000);
    let report = sim.m.report().unwrap();
    assert_eq!(report.barge_ins, 0, "the echo interrupted the agent");
    assert_eq!(sim.replies.len(), 1, "the agent answered its own echo");
    let lines = sim.transcript();
    assert_eq!(
        lines.last(),
        Some(&(Role::Agent, text.to_owned(), false)),
        "heard to its end: {lines:?}"
    );
    // And the caller's own words afterwards are answered.
    let t = sim.silence(t, 1600);
    sim.ask(t, "Terima kasih");
    assert_eq!(sim.replies.len(), 2);
}

/// Azure's final can come before the VAD has timed out the caller's speech (a short
/// segmentation silence, or line noise keeping the VAD's speech open a little longer). That
/// speech has been answered: the echo of the reply, transcribed while the agent talks, is
/// still echo and not the caller's next turn.
#[test]
fn a_final_before_the_vads_end_of_speech_does_not_let_the_echo_in() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let voiced = speech();
    let t = sim.caller(t, &voiced[..6400]);
    // The final 100 ms after the last voiced frame: the VAD still holds the speech open.
    let t = sim.silence(t, 100);
    sim.final_(t, "Terangkan pakej premium.");
    let r1 = sim.last_reply();
    sim.full_reply(
        t + 300 * MS,
        r1,
        "Pakej premium termasuk banyak perkara.",
        3000,
        false,
    );
    let t = sim.silence(t, 1500);
    // Azure transcribes the agent's echo; the VAD heard no caller voice.
    sim.final_(t, "Pakej premium termasuk");
    sim.silence(t, 3000);
    assert_eq!(sim.replies.len(), 1, "the agent answered its own echo");
    assert_eq!(sim.frames_of(2001), 150, "the reply is heard in full");
    assert_eq!(sim.m.report().unwrap().barge_ins, 0);
}

#[test]
fn an_interruption_without_words_resumes_the_sentence() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Terangkan pakej premium.");
    let r1 = sim.last_reply();
    sim.reply(t + 300 * MS, r1, ReplyEvent::FirstToken);
    sim.reply(
        t + 300 * MS,
        r1,
        ReplyEvent::Text("Pakej premium termasuk banyak perkara. ".into()),
    );
    sim.reply(t + 300 * MS, r1, ReplyEvent::Audio(reply_tone(r1, 2000)));
    let t = sim.silence(t, 1000);
    // A cough: voiced for 400 ms, enough for a barge-in.
    let voiced = speech();
    let t = sim.caller(t, &voiced[..3200]);
    assert_eq!(sim.m.report().unwrap().barge_ins, 1);
    let cut_at = sim.frames_of(2001);
    // The rest of the reply streams while the agent waits to hear what it was.
    sim.reply(t, r1, ReplyEvent::Audio(reply_tone(r1, 1000)));
    sim.reply(t, r1, ReplyEvent::Done);
    let t = sim.silence(t, 500);
    assert_eq!(sim.frames_of(2001), cut_at, "silent while it waits");
    // Azure finds no words.
    sim.final_(t, "");
    sim.silence(t, 4000);
    let report = sim.m.report().unwrap();
    assert_eq!(report.resumes, 1);
    assert_eq!(sim.replies.len(), 1, "no new turn");
    let total = sim.frames_of(2001);
    // Everything from a little before the cut is played: 150 frames plus the rewind.
    assert!((150..=150 + 16).contains(&total), "{total} reply frames");
    assert!(sim.cancelled.is_empty(), "the reply was never cancelled");
    let lines = sim.transcript();
    assert!(
        lines.contains(&(
            Role::Agent,
            "Pakej premium termasuk banyak perkara.".into(),
            false
        )),
        "heard to its end: {lines:?}"
    );
}

#[test]
fn an_interrupted_goodbye_that_carried_no_words_still_hangs_up_after_it() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Itu sahaja.");
    let r1 = sim.last_reply();
    sim.full_reply(
        t + 300 * MS,
        r1,
        "Terima kasih, selamat tinggal!",
        2000,
        true,
    );
    let t = sim.silence(t, 900);
    let voiced = speech();
    let t = sim.caller(t, &voiced[..3200]);
    let t = sim.silence(t, 300);
    assert_eq!(sim.hangup, None);
    sim.final_(t, "hmm");
    sim.silence(t, 4000);
    assert!(
        sim.hangup.is_some(),
        "the goodbye resumed and the call ended after it"
    );
    assert_eq!(sim.m.report().unwrap().resumes, 1);
}

#[test]
fn the_agent_asks_whether_the_caller_is_still_there_before_hanging_up() {
    let mut cfg = config();
    cfg.still_there_after = Some(Duration::from_secs(10));
    cfg.idle_hangup = Some(Duration::from_secs(20));
    let mut sim = Sim::new(cfg);
    sim.prompts
        .insert(PromptKind::StillThere, Arc::new(tone(1400, 1000)));
    sim.silence(sim.t0, 40_000);
    let asked = sim
        .prompt_requests
        .iter()
        .find(|(_, k)| *k == PromptKind::StillThere)
        .unwrap()
        .0;
    let greeting_end = sim.at(1000);
    assert!(
        asked - greeting_end >= 10_000 * MS && asked - greeting_end <= 10_040 * MS,
        "asked {:?} after the greeting",
        asked - greeting_end
    );
    assert_eq!(sim.frames_of(1400), 50, "the question is heard");
    let h = sim.hangup.expect("hung up");
    // 20 s of silence in all: 10 before asking, 10 after the question ended.
    let question_end = sim
        .frames
        .iter()
        .filter(|(_, f)| f.contains(&1400))
        .map(|(t, _)| *t)
        .max()
        .unwrap()
        + 20 * MS;
    assert!(
        h - question_end >= 10_000 * MS && h - question_end <= 10_200 * MS,
        "{:?}",
        h - question_end
    );
}

#[test]
fn a_caller_who_answers_the_question_keeps_the_call() {
    let mut cfg = config();
    cfg.still_there_after = Some(Duration::from_secs(10));
    cfg.idle_hangup = Some(Duration::from_secs(20));
    let mut sim = Sim::new(cfg);
    sim.prompts
        .insert(PromptKind::StillThere, Arc::new(tone(1400, 1000)));
    let t = sim.silence(sim.t0, 12_500);
    assert_eq!(sim.frames_of(1400), 50);
    let t = sim.ask(t, "Ya, saya masih di sini.");
    let r = sim.last_reply();
    sim.full_reply(t + 300 * MS, r, "Baik.", 500, false);
    sim.silence(t, 15_000);
    assert_eq!(sim.hangup, None);
    assert_eq!(
        sim.prompt_requests
            .iter()
            .filter(|(_, k)| *k == PromptKind::StillThere)
            .count(),
        2,
        "asked again after the next silence"
    );
}

fn hypothesis(sim: &mut Sim, t: Instant, text: &str) {
    sim.input(t, Input::Stt(SttEvent::Partial(text.into())));
}

#[test]
fn a_reply_started_on_a_stable_hypothesis_goes_on_when_the_final_matches() {
    let mut cfg = config();
    cfg.speculate_after = Some(Duration::from_millis(200));
    let mut sim = Sim::new(cfg);
    let t = greeted(&mut sim);
    let voiced = speech();
    hypothesis(&mut sim, t, "Berapa harga");
    let t = sim.caller(t, &voiced[..6400]);
    hypothesis(&mut sim, t, "Berapa harga pakej");
    // 200 ms after the last voiced window the reply starts on the hypothesis, well before
    // the VAD's debounced end of speech and Azure's final.
    let t = sim.silence(t, 320);
    assert_eq!(sim.replies.len(), 1, "started before the final");
    let started = sim.replies[0].0;
    let r = sim.last_reply();
    sim.full_reply(started + 100 * MS, r, "Harga bermula RM99.", 600, false);
    assert_eq!(
        sim.frames_of(2001),
        0,
        "nothing is played before the final confirms it"
    );
    let t = sim.silence(t, 160);
    sim.final_(t, "Berapa harga pakej?");
    assert_eq!(sim.replies.len(), 1, "the final matched: no second request");
    sim.silence(t, 1500);
    assert_eq!(sim.frames_of(2001), 30, "played once confirmed");
    let report = sim.m.report().unwrap();
    assert_eq!(
        (report.speculative.started, report.speculative.used),
        (1, 1)
    );
    let turn = &report.turns[0];
    assert!(turn.llm_first_token_ms.unwrap() < turn.stt_final_ms.unwrap());
    assert!(turn.first_frame_ms.unwrap() <= turn.stt_final_ms.unwrap() + 20);
}

#[test]
fn a_final_that_differs_cancels_the_speculative_reply_and_starts_again() {
    let mut cfg = config();
    cfg.speculate_after = Some(Duration::from_millis(200));
    let mut sim = Sim::new(cfg);
    let t = greeted(&mut sim);
    let voiced = speech();
    let t = sim.caller(t, &voiced[..6400]);
    hypothesis(&mut sim, t, "Berapa harga");
    let t = sim.silence(t, 700);
    let spec = sim.last_reply();
    sim.reply(t, spec, ReplyEvent::FirstToken);
    sim.reply(t, spec, ReplyEvent::Text("Harga ".into()));
    sim.final_(t + 100 * MS, "Berapa harga pakej premium?");
    assert_eq!(sim.cancelled, vec![spec]);
    assert_eq!(sim.replies.len(), 2);
    let real = sim.replies.last().unwrap();
    let users: Vec<_> = real
        .2
        .messages
        .iter()
        .filter(|m| m.role == "user")
        .collect();
    assert_eq!(users.len(), 1, "the hypothesis left no trace: {users:?}");
    assert_eq!(users[0].content, "Berapa harga pakej premium?");
    let report = sim.m.report().unwrap();
    assert_eq!(
        (report.speculative.started, report.speculative.wasted),
        (1, 1)
    );
    assert!(report.speculative.wasted_tokens > 0);
    assert_eq!(report.turns.len(), 1, "one turn in the record");
}

#[test]
fn after_an_interruption_the_agent_never_resumes_over_a_caller_who_pauses_and_goes_on() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Terangkan pakej premium.");
    let r1 = sim.last_reply();
    sim.full_reply(
        t + 300 * MS,
        r1,
        "Pakej premium termasuk banyak perkara.",
        4000,
        false,
    );
    let t = sim.silence(t, 1000);
    let voiced = speech();
    // Talks over the agent, pauses half a second, then talks on for two seconds.
    let t = sim.caller(t, &voiced[..4800]);
    assert_eq!(sim.m.report().unwrap().barge_ins, 1);
    let cut = sim.frames_of(2001);
    let t = sim.silence(t, 500);
    let t = sim.caller(t, &voiced[4800..20_800]);
    assert_eq!(
        sim.frames_of(2001),
        cut,
        "no word of the reply over the caller"
    );
    let t = sim.silence(t, 460);
    sim.final_(t, "Bukan, saya mahu tahu harga pakej asas.");
    assert_eq!(sim.replies.len(), 2);
    assert_eq!(sim.m.report().unwrap().resumes, 0);
}

#[test]
fn words_whose_final_comes_after_the_agent_resumed_are_still_answered() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Terangkan pakej premium.");
    let r1 = sim.last_reply();
    sim.full_reply(
        t + 300 * MS,
        r1,
        "Pakej premium termasuk banyak perkara.",
        4000,
        false,
    );
    let t = sim.silence(t, 1000);
    let voiced = speech();
    let t = sim.caller(t, &voiced[..4000]);
    // A slow recogniser: the agent resumes before the final comes.
    let t = sim.silence(t, 1800);
    assert_eq!(sim.m.report().unwrap().resumes, 1);
    sim.final_(t, "Berapa harganya?");
    assert_eq!(
        sim.replies.len(),
        2,
        "the question is answered, not taken for echo"
    );
    assert_eq!(sim.cancelled, vec![r1]);
}

#[test]
fn a_caller_who_goes_on_after_a_pause_abandons_the_speculative_reply() {
    let mut cfg = config();
    cfg.speculate_after = Some(Duration::from_millis(200));
    let mut sim = Sim::new(cfg);
    let t = greeted(&mut sim);
    let voiced = speech();
    let t = sim.caller(t, &voiced[..6400]);
    hypothesis(&mut sim, t, "Berapa harga");
    let t = sim.silence(t, 320);
    assert_eq!(
        sim.replies.len(),
        1,
        "started on the hypothesis during the pause"
    );
    let spec = sim.last_reply();
    // The caller goes on.
    let t = sim.caller(t, &voiced[6400..12_800]);
    assert_eq!(
        sim.cancelled,
        vec![spec],
        "abandoned as soon as the voice came back"
    );
    let t = sim.silence(t, 460);
    sim.final_(t, "Berapa harga pakej premium bulan ini?");
    let report = sim.m.report().unwrap();
    assert_eq!(report.speculative.wasted, 1);
    let last = sim.replies.last().unwrap();
    let users: Vec<_> = last
        .2
        .messages
        .iter()
        .filter(|m| m.role == "user")
        .collect();
    assert_eq!(users.len(), 1, "{users:?}");
    assert_eq!(users[0].content, "Berapa harga pakej premium bulan ini?");
}

#[test]
fn a_question_asked_twice_word_for_word_is_speculated_on_both_times() {
    let mut cfg = config();
    cfg.speculate_after = Some(Duration::from_millis(200));
    let mut sim = Sim::new(cfg);
    let mut t = greeted(&mut sim);
    let voiced = speech();
    for round in 1..=2u32 {
        t = sim.caller(t, &voiced[..6400]);
        hypothesis(&mut sim, t, "Berapa harga pakej");
        t = sim.silence(t, 320);
        let r = sim.last_reply();
        sim.final_(t, "Berapa harga pakej?");
        sim.full_reply(t + 100 * MS, r, "RM99.", 400, false);
        t = sim.silence(t, 2500);
        assert_eq!(sim.m.report().unwrap().speculative.used, round);
    }
}

// ---- handing over to a person, and tools ---------------------------------------------------

const HANDOVER: i16 = 1400;
const FILLER: i16 = 1500;

fn tools_config() -> AgentConfig {
    use super::context::TransferTarget;
    let mut cfg = config();
    cfg.tools = super::tools::AgentTools {
        transfer_targets: vec![
            TransferTarget {
                name: "sales".into(),
                description: "buying a plan".into(),
                destination: "201".into(),
            },
            TransferTarget {
                name: "operator".into(),
                description: "anything else".into(),
                destination: "9".into(),
            },
        ],
        operator_digit: Some('0'),
        fallback_destination: Some("700".into()),
        max_provider_failures: 2,
        ..super::tools::AgentTools::default()
    };
    cfg
}

fn tools_sim() -> Sim {
    let mut sim = Sim::new(tools_config());
    sim.prompts
        .insert(PromptKind::Handover, Arc::new(tone(HANDOVER, 800)));
    sim.prompts
        .insert(PromptKind::Filler, Arc::new(tone(FILLER, 500)));
    sim
}

fn prompts_asked(sim: &Sim, kind: PromptKind) -> Vec<Instant> {
    sim.prompt_requests
        .iter()
        .filter(|(_, k)| *k == kind)
        .map(|(t, _)| *t)
        .collect()
}

fn last_frame_of(sim: &Sim, level: i16) -> Instant {
    sim.frames
        .iter()
        .filter(|(_, f)| f.contains(&level))
        .map(|(t, _)| *t)
        .max()
        .unwrap()
}

fn first_frame_of(sim: &Sim, level: i16) -> Instant {
    sim.frames
        .iter()
        .filter(|(_, f)| f.contains(&level))
        .map(|(t, _)| *t)
        .min()
        .unwrap()
}

fn sales_transfer() -> CallOutcome {
    CallOutcome::Transferred {
        target: "sales".into(),
        destination: "201".into(),
        summary: Some("Pemanggil mahu membeli pakej premium.".into()),
    }
}

use super::context::CallOutcome;

#[test]
fn a_transfer_hangs_up_once_the_handover_line_was_heard() {
    let mut sim = tools_sim();
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Saya nak beli pakej premium.");
    let r1 = sim.last_reply();
    let tools = &sim.replies.last().unwrap().2.tools;
    let transfer = tools.iter().find(|t| t.name == "transfer_call").unwrap();
    assert!(
        !serde_json::to_string(transfer).unwrap().contains("201"),
        "the model never sees a destination"
    );
    sim.reply(t + 300 * MS, r1, ReplyEvent::FirstToken);
    sim.reply(t + 300 * MS, r1, ReplyEvent::Text("Baik. ".into()));
    sim.reply(t + 300 * MS, r1, ReplyEvent::Audio(reply_tone(r1, 500)));
    sim.reply(
        t + 400 * MS,
        r1,
        ReplyEvent::Transfer {
            target: "sales".into(),
            summary: Some("Pemanggil mahu membeli pakej premium.".into()),
        },
    );
    sim.reply(t + 400 * MS, r1, ReplyEvent::Done);
    assert_eq!(
        sim.hangup, None,
        "nothing is cut: the reply and the line play first"
    );
    sim.silence(t, 3000);
    assert_eq!(
        sim.frames_of(2001),
        25,
        "the model's own words are heard whole"
    );
    assert_eq!(sim.frames_of(HANDOVER), 40, "then the handover line, whole");
    assert!(first_frame_of(&sim, HANDOVER) > last_frame_of(&sim, 2001));
    let h = sim.hangup.expect("hung up");
    let last = last_frame_of(&sim, HANDOVER);
    assert!(
        h >= last + 100 * MS && h <= last + 140 * MS,
        "0x00 after the line and its tail"
    );
    assert_eq!(sim.m.outcome(), sales_transfer());
    let lines = sim.transcript();
    assert_eq!(lines.last().unwrap().1, "Baik, saya sambungkan anda.");
}

#[test]
fn a_caller_talking_over_the_handover_line_is_still_handed_over() {
    // A transfer, once announced, is final: what the caller says over the short line neither
    // stops it nor starts a reply; the person they are connected to hears them next.
    let mut sim = tools_sim();
    sim.prompts
        .insert(PromptKind::Handover, Arc::new(tone(HANDOVER, 3000)));
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Sambungkan saya dengan jualan.");
    let r1 = sim.last_reply();
    sim.reply(t + 300 * MS, r1, ReplyEvent::FirstToken);
    sim.reply(
        t + 300 * MS,
        r1,
        ReplyEvent::Transfer {
            target: "sales".into(),
            summary: Some("Pemanggil mahu membeli pakej premium.".into()),
        },
    );
    sim.reply(t + 300 * MS, r1, ReplyEvent::Done);
    // 200 ms into the line the caller talks for two seconds, and Azure hears words.
    let t = sim.silence(t, 500);
    assert!(sim.frames_of(HANDOVER) > 0, "the line is playing");
    let speech = speech();
    let t = sim.caller(t, &speech[..8000 * 2]);
    sim.final_(t, "Eh tunggu, saya nak tanya harga dulu.");
    assert_eq!(
        sim.m.report().unwrap().barge_ins,
        0,
        "no barge-in into a handover"
    );
    assert_eq!(sim.hangup, None, "the line is still playing");
    sim.silence(t, 1500);
    assert_eq!(sim.frames_of(HANDOVER), 150, "the line is heard whole");
    let h = sim.hangup.expect("handed over");
    assert!(h <= last_frame_of(&sim, HANDOVER) + 140 * MS);
    assert_eq!(sim.replies.len(), 1, "no new reply over a handover");
    assert_eq!(sim.m.outcome(), sales_transfer());
}

#[test]
fn the_operator_digit_hands_the_call_over_at_any_time() {
    let mut sim = tools_sim();
    let t = greeted(&mut sim);
    // A keypad entry holding a 0 among other digits is an ordinary entry.
    sim.dtmf(t, b'1');
    sim.dtmf(t + 100 * MS, b'0');
    sim.dtmf(t + 200 * MS, b'#');
    assert_eq!(sim.replies.len(), 1, "\"10\" goes to the model");
    assert!(sim.m.outcome() == CallOutcome::Completed);
    let r1 = sim.last_reply();
    sim.reply(t + 500 * MS, r1, ReplyEvent::FirstToken);
    sim.reply(t + 500 * MS, r1, ReplyEvent::Text("Anda menekan ".into()));
    sim.reply(t + 500 * MS, r1, ReplyEvent::Audio(reply_tone(r1, 3000)));
    // Mid-reply the caller keys 0 then #.
    let t = sim.silence(t + 200 * MS, 1000);
    sim.dtmf(t, b'0');
    sim.dtmf(t + 150 * MS, b'#');
    assert_eq!(sim.cancelled, vec![r1], "the reply stops");
    assert_eq!(prompts_asked(&sim, PromptKind::Handover).len(), 1);
    sim.silence(t + 150 * MS, 2000);
    assert_eq!(sim.frames_of(HANDOVER), 40);
    assert!(
        first_frame_of(&sim, HANDOVER) <= t + 150 * MS + 40 * MS,
        "at once"
    );
    assert!(sim.hangup.is_some());
    assert_eq!(sim.replies.len(), 1, "the model is not asked");
    assert_eq!(
        sim.m.outcome(),
        CallOutcome::Transferred {
            target: "operator".into(),
            destination: "9".into(),
            summary: None,
        }
    );
}

#[test]
fn repeated_provider_failures_hand_over_to_the_fallback_instead_of_apologising_again() {
    let mut sim = tools_sim();
    let failed = || ReplyEvent::Failed {
        provider: Provider::Llm,
        error: "LLM request failed with HTTP 503: down".into(),
    };
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Soalan satu");
    let r1 = sim.last_reply();
    sim.reply(t + 300 * MS, r1, failed());
    let t = sim.silence(t, 1500);
    assert_eq!(prompts_asked(&sim, PromptKind::Apology).len(), 1);
    // A reply that completes resets the count.
    let t = sim.ask(t, "Soalan dua");
    let r2 = sim.last_reply();
    sim.full_reply(t + 300 * MS, r2, "Jawapan.", 500, false);
    let t = sim.silence(t, 1500);
    let t = sim.ask(t, "Soalan tiga");
    let r3 = sim.last_reply();
    sim.reply(t + 300 * MS, r3, failed());
    let t = sim.silence(t, 1500);
    assert_eq!(prompts_asked(&sim, PromptKind::Apology).len(), 2);
    assert!(sim.hangup.is_none());
    // The second failure in a row: the fallback, not a third apology.
    let t = sim.ask(t, "Soalan empat");
    let r4 = sim.last_reply();
    sim.reply(t + 300 * MS, r4, failed());
    sim.silence(t, 2000);
    assert_eq!(prompts_asked(&sim, PromptKind::Apology).len(), 2);
    assert_eq!(sim.frames_of(HANDOVER), 40);
    assert!(sim.hangup.is_some());
    assert_eq!(
        sim.m.outcome(),
        CallOutcome::Fallback {
            reason: "provider_failures".into(),
            destination: "700".into(),
        }
    );
}

fn tool_record(name: &str, ms: u64) -> super::tools::ToolCallRecord {
    super::tools::ToolCallRecord {
        name: name.into(),
        arguments: serde_json::json!({"order_id": "A1"}),
        at_ms: 0,
        duration_ms: ms,
        status: super::tools::ToolStatus::Ok,
        detail: None,
    }
}

#[test]
fn a_slow_tool_gets_the_filler_after_700_ms_and_no_hold_phrase() {
    let mut sim = tools_sim();
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Di mana pesanan saya?");
    let r1 = sim.last_reply();
    let called = t + 300 * MS;
    sim.reply(called, r1, ReplyEvent::FirstToken);
    sim.reply(
        called,
        r1,
        ReplyEvent::ToolsStarted {
            names: vec!["order_status".into()],
        },
    );
    sim.reply(called, r1, ReplyEvent::SpeechDrained);
    // The tool takes 2.5 s.
    let done = called + 2500 * MS;
    sim.silence(t, 2500 + 300);
    sim.reply(
        done,
        r1,
        ReplyEvent::ToolsFinished(vec![tool_record("order_status", 2500)]),
    );
    sim.reply(
        done + 300 * MS,
        r1,
        ReplyEvent::Text("Pesanan anda sudah dihantar. ".into()),
    );
    sim.reply(done + 300 * MS, r1, ReplyEvent::Audio(reply_tone(r1, 1000)));
    sim.reply(done + 300 * MS, r1, ReplyEvent::Done);
    sim.silence(done, 2000);
    let asked = prompts_asked(&sim, PromptKind::Filler);
    assert_eq!(asked, vec![called + 700 * MS], "once, 700 ms into the tool");
    assert_eq!(sim.frames_of(FILLER), 25, "the filler is heard whole");
    assert!(first_frame_of(&sim, FILLER) <= called + 700 * MS + 20 * MS);
    assert!(
        prompts_asked(&sim, PromptKind::Hold).is_empty(),
        "no hold phrase on top"
    );
    assert!(
        prompts_asked(&sim, PromptKind::Apology).is_empty(),
        "a slow tool is no failure"
    );
    assert_eq!(sim.frames_of(2001), 50, "the answer after the tool");
    let report = sim.m.report().unwrap();
    assert_eq!(report.tool_calls.len(), 1);
    assert_eq!(report.tool_calls[0].at_ms + 2500, sim.m_ms(done));
    let agent = sim.transcript().last().unwrap().1.clone();
    assert_eq!(agent, "Sebentar ya. Pesanan anda sudah dihantar.");
}

#[test]
fn a_fast_tool_gets_no_filler() {
    let mut sim = tools_sim();
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Di mana pesanan saya?");
    let r1 = sim.last_reply();
    let called = t + 300 * MS;
    sim.reply(called, r1, ReplyEvent::FirstToken);
    sim.reply(
        called,
        r1,
        ReplyEvent::ToolsStarted {
            names: vec!["order_status".into()],
        },
    );
    sim.reply(called, r1, ReplyEvent::SpeechDrained);
    let done = called + 200 * MS;
    sim.reply(
        done,
        r1,
        ReplyEvent::ToolsFinished(vec![tool_record("order_status", 200)]),
    );
    sim.full_reply(done + 300 * MS, r1, "Sudah dihantar.", 1000, false);
    sim.silence(t, 3000);
    assert!(prompts_asked(&sim, PromptKind::Filler).is_empty());
    assert_eq!(sim.frames_of(FILLER), 0);
    assert_eq!(sim.frames_of(2001), 50);
}

#[test]
fn the_filler_waits_for_what_the_model_said_before_the_tool() {
    let mut sim = tools_sim();
    let t = greeted(&mut sim);
    let t = sim.ask(t, "Di mana pesanan saya?");
    let r1 = sim.last_reply();
    let called = t + 300 * MS;
    sim.reply(called, r1, ReplyEvent::FirstToken);
    sim.reply(called, r1, ReplyEvent::Text("Saya semak dahulu. ".into()));
    sim.reply(called, r1, ReplyEvent::Audio(reply_tone(r1, 400)));
    sim.reply(
        called,
        r1,
        ReplyEvent::ToolsStarted {
            names: vec!["order_status".into()],
        },
    );
    // The rest of that sentence's audio comes after the filler is due.
    sim.silence(t, 300 + 800);
    sim.reply(
        called + 800 * MS,
        r1,
        ReplyEvent::Audio(reply_tone(r1, 800)),
    );
    sim.reply(called + 800 * MS, r1, ReplyEvent::SpeechDrained);
    sim.silence(t + 1100 * MS, 2000);
    assert_eq!(sim.frames_of(2001), 60, "the sentence is heard whole");
    assert_eq!(sim.frames_of(FILLER), 25);
    assert!(
        first_frame_of(&sim, FILLER) > last_frame_of(&sim, 2001),
        "the filler never cuts into the sentence"
    );
}

/// A final in the language the recogniser identified.
fn final_in(sim: &mut Sim, t: Instant, text: &str, language: &str) {
    sim.input(
        t,
        Input::Stt(SttEvent::Final {
            text: text.into(),
            offset_ms: 0,
            duration_ms: 0,
            language: Some(language.into()),
        }),
    );
}

fn user_texts(request: &ChatRequest) -> Vec<&str> {
    request
        .messages
        .iter()
        .filter(|m| m.role == "user")
        .map(|m| m.content.as_str())
        .collect()
}

#[test]
fn each_turn_is_answered_in_the_language_the_caller_used() {
    let mut cfg = config();
    cfg.languages = vec!["ms-MY".into(), "en-US".into()];
    let mut sim = Sim::new(cfg);
    let t = greeted(&mut sim);
    // Keypad digits before any speech: the language is not known yet (TTS default).
    sim.dtmf(t, b'1');
    let t = t + 100 * MS;
    sim.dtmf(t, b'#');
    let r = sim.last_reply();
    sim.full_reply(t + 300 * MS, r, "Baik.", 500, false);
    let t = sim.silence(t, 1000);
    let voiced = speech();
    for (text, language) in [("Berapa harga?", "ms-MY"), ("How much is it?", "en-US")] {
        let t2 = sim.caller(t, &voiced[..6400]);
        let t2 = sim.silence(t2, 460);
        final_in(&mut sim, t2, text, language);
        let r = sim.last_reply();
        sim.full_reply(t2 + 300 * MS, r, "Jawapan.", 500, false);
        sim.silence(t2, 1500);
    }
    // Words the recogniser could not place keep the caller's last language.
    let t = sim.caller(sim.now, &voiced[..6400]);
    let t = sim.silence(t, 460);
    sim.final_(t, "Okay then.");
    let codes: Vec<Option<&str>> = sim.tts.iter().map(|p| p.language_code.as_deref()).collect();
    assert_eq!(codes, [None, Some("ms"), Some("en"), Some("en")]);
    let last = &sim.replies.last().unwrap().2;
    let users = user_texts(last);
    assert_eq!(
        users[1..],
        [
            "[ms-MY] Berapa harga?",
            "[en-US] How much is it?",
            "[en-US] Okay then."
        ]
    );
    assert!(
        users[0].starts_with("(Pemanggil menekan"),
        "untagged: {users:?}"
    );
    assert!(
        last.messages[0]
            .content
            .ends_with(super::machine::LANGUAGE_TAG_NOTE),
        "{}",
        last.messages[0].content
    );
    let report = sim.m.report().unwrap();
    assert_eq!(
        report.turn_languages,
        [
            None,
            Some("ms-MY".into()),
            Some("en-US".into()),
            Some("en-US".into())
        ]
    );
}

#[test]
fn a_speculative_reply_is_dropped_when_the_caller_switched_language() {
    let mut cfg = config();
    cfg.languages = vec!["ms-MY".into(), "en-US".into()];
    cfg.speculate_after = Some(Duration::from_millis(200));
    let mut sim = Sim::new(cfg);
    let t = greeted(&mut sim);
    let voiced = speech();
    // A Malay turn first.
    let t = sim.caller(t, &voiced[..6400]);
    let t = sim.silence(t, 460);
    final_in(&mut sim, t, "Berapa harga?", "ms-MY");
    let r = sim.last_reply();
    sim.full_reply(t + 300 * MS, r, "RM99.", 500, false);
    let t = sim.silence(t, 1500);
    // Then English: the reply starts on the hypothesis, still in Malay as far as it knows.
    let t = sim.caller(t, &voiced[..6400]);
    hypothesis(&mut sim, t, "How much is it");
    let t = sim.silence(t, 320);
    assert_eq!(sim.replies.len(), 2, "speculated");
    let spec = sim.last_reply();
    assert_eq!(sim.tts[1].language_code.as_deref(), Some("ms"));
    let t = sim.silence(t, 160);
    final_in(&mut sim, t, "How much is it?", "en-US");
    assert_eq!(
        sim.cancelled,
        vec![spec],
        "the same words, another language"
    );
    assert_eq!(sim.replies.len(), 3);
    assert_eq!(sim.tts[2].language_code.as_deref(), Some("en"));
    assert_eq!(
        user_texts(&sim.replies[2].2),
        ["[ms-MY] Berapa harga?", "[en-US] How much is it?"]
    );
    let report = sim.m.report().unwrap();
    assert_eq!(
        (report.speculative.started, report.speculative.wasted),
        (1, 1)
    );
    assert_eq!(
        report.turn_languages,
        [Some("ms-MY".into()), Some("en-US".into())],
        "the abandoned speculation leaves no turn"
    );
}

#[test]
fn without_candidate_languages_nothing_is_tagged() {
    let mut sim = Sim::new(config());
    let t = greeted(&mut sim);
    let voiced = speech();
    let t = sim.caller(t, &voiced[..6400]);
    let t = sim.silence(t, 460);
    // Even if a recogniser said a language, one-language calls ignore it.
    final_in(&mut sim, t, "How much is it?", "en-US");
    assert_eq!(sim.tts[0].language_code, None);
    assert_eq!(user_texts(&sim.replies[0].2), ["How much is it?"]);
    assert_eq!(sim.replies[0].2.messages[0].content, config().system_prompt);
    assert!(sim.m.report().unwrap().turn_languages.is_empty());
}

#[test]
fn the_live_state_follows_the_conversation() {
    use crate::ops::live::Activity;
    let mut sim = Sim::new(config());
    let t = sim.silence(sim.t0, 200);
    assert_eq!(sim.m.activity(), Activity::Speaking, "the greeting plays");
    let t = sim.silence(t, 1300);
    assert_eq!(sim.m.activity(), Activity::Listening);
    assert_eq!(sim.m.answered_turns(), (0, None));
    let t = sim.ask(t, "Berapa harga pakej?");
    assert_eq!(sim.m.activity(), Activity::Thinking, "a reply is pending");
    let key = sim.m.turns_key();
    let r = sim.last_reply();
    sim.full_reply(t + 300 * MS, r, "Harga pakej asas ialah RM99.", 600, false);
    let t = sim.silence(t + 300 * MS, 100);
    assert_eq!(sim.m.activity(), Activity::Speaking, "the reply plays");
    assert_ne!(sim.m.turns_key(), key, "the first frame changed the key");
    let (answered, latency) = sim.m.answered_turns();
    assert_eq!(answered, 1);
    let latency = latency.expect("the turn reached the wire");
    assert!(
        latency >= 300,
        "speech end -> first frame includes the 300 ms reply wait: {latency}"
    );
    sim.silence(t, 1_000);
    assert_eq!(sim.m.activity(), Activity::Listening, "the reply is over");
}

// ---- per-call phrases streamed as they are synthesized ---------------------------------

const LONG_GREETING: &str = "Selamat datang ke khidmat pelanggan kami, Aminah.";

/// The greeting as the realistic TTS streams it: 3 s of audio, the first 200 ms at 150 ms,
/// then 200 ms every 100 ms (twice real time), each with its characters' alignment (spread
/// evenly over the audio); then done.
fn greeting_stream(sim: &Sim) -> Vec<(Instant, PromptChunk)> {
    let chars: Vec<String> = LONG_GREETING.chars().map(String::from).collect();
    let per_char = 3000 / chars.len() as u32;
    let mut out = Vec::new();
    for i in 0..15u32 {
        let at = sim.at(150 + 100 * u64::from(i));
        out.push((at, PromptChunk::Audio(tone(GREETING, 200))));
        let (from, to) = (i * 200, (i + 1) * 200);
        let (c, s): (Vec<String>, Vec<u32>) = (chars.iter().enumerate())
            .map(|(n, c)| (c.clone(), n as u32 * per_char))
            .filter(|(_, s)| *s >= from && *s < to)
            .unzip();
        out.push((
            at,
            PromptChunk::Alignment {
                chars: c,
                start_ms: s,
            },
        ));
    }
    out.push((sim.at(150 + 1400), PromptChunk::Done));
    out
}

/// The caller sends `samples` from `from` in 20 ms frames while the chunks due meanwhile
/// arrive (stream 1 of the greeting); returns the end.
fn caller_while_streaming(
    sim: &mut Sim,
    from: Instant,
    samples: &[i16],
    chunks: &mut std::collections::VecDeque<(Instant, PromptChunk)>,
) -> Instant {
    let mut t = from;
    for frame in samples.chunks(160) {
        while chunks.front().is_some_and(|(at, _)| *at <= t) {
            let (at, chunk) = chunks.pop_front().unwrap();
            let input = Input::PromptStream {
                kind: PromptKind::Greeting,
                stream: 1,
                chunk,
            };
            sim.input(at, input);
        }
        sim.caller(t, frame);
        t += 20 * MS;
    }
    t
}

/// A call whose 3 s greeting (`LONG_GREETING`) is cached, or has a variable and streams;
/// the caller is silent for `before` ms, then sends `voiced` (400 ms of speech), then
/// silence to 5 s, while the stream (if any) goes on arriving.
fn greeting_heard(streamed: bool, before: u64, voiced: &[i16], final_text: Option<&str>) -> Sim {
    let mut cfg = config();
    cfg.prompts.greeting = LONG_GREETING.into();
    let mut sim = Sim::new(cfg);
    sim.prompts
        .insert(PromptKind::Greeting, Arc::new(tone(GREETING, 3000)));
    let mut chunks = std::collections::VecDeque::new();
    if streamed {
        sim.streamed.push(PromptKind::Greeting);
        chunks.extend(greeting_stream(&sim));
    }
    let t0 = sim.t0;
    let t = caller_while_streaming(&mut sim, t0, &vec![0; before as usize * 8], &mut chunks);
    let t = caller_while_streaming(&mut sim, t, voiced, &mut chunks);
    let t = caller_while_streaming(&mut sim, t, &vec![0; 460 * 8], &mut chunks);
    if let Some(text) = final_text {
        sim.final_(t, text);
    }
    let end = sim.at(5000);
    let rest = (end - t).as_millis() as usize * 8;
    caller_while_streaming(&mut sim, t, &vec![0; rest], &mut chunks);
    sim
}

#[test]
fn a_streamed_greeting_starts_with_its_first_audio_and_plays_without_gaps() {
    let sim = greeting_heard(true, 4000, &[], None);
    assert_eq!(prompts_asked(&sim, PromptKind::Greeting), [sim.t0]);
    let first = first_frame_of(&sim, GREETING) - sim.t0;
    assert!(
        first >= 150 * MS && first <= 170 * MS,
        "first greeting frame {first:?} after the call started (the first audio came at 150 ms)"
    );
    assert_eq!(sim.frames_of(GREETING), 150, "all of it, once");
    let last = last_frame_of(&sim, GREETING);
    assert_eq!(
        sim.longest_silence(first_frame_of(&sim, GREETING), last),
        Duration::ZERO
    );
    assert_eq!(
        sim.transcript(),
        [(Role::Agent, LONG_GREETING.to_owned(), false)]
    );
    assert!(!sim.m.wants_prompt_stream(1), "done");
    // Idle from the greeting's end, as after a cached one.
    assert!(sim.m.poll_timeout().is_some());
}

#[test]
fn a_barge_in_during_a_streamed_greeting_is_one_during_a_cached_greeting() {
    let voiced = speech();
    let question = "Saya nak tanya pasal bil.";
    let [cached, streamed] =
        [false, true].map(|s| greeting_heard(s, 1000, &voiced[..3200], Some(question)));
    for sim in [&cached, &streamed] {
        let report = sim.m.report().unwrap();
        assert_eq!(report.barge_ins, 1);
        assert_eq!(sim.replies.len(), 1, "the caller's words are answered");
        let lines = sim.transcript();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines.contains(&(Role::Caller, question.into(), false)));
        let greeting = lines.iter().find(|l| l.0 == Role::Agent).unwrap();
        assert!(greeting.2, "the greeting was interrupted: {lines:?}");
        assert!(LONG_GREETING.starts_with(&greeting.1), "{lines:?}");
        // Nothing of the greeting after the barge-in, though its audio went on arriving.
        let cut = sim.at(report.barge_in_ms[0] + 40);
        assert!(
            sim.frames
                .iter()
                .all(|(t, f)| *t < cut || !f.contains(&GREETING))
        );
    }
    // The caller heard about the same stretch of it (the stream started 150 ms later).
    let heard = |sim: &Sim| sim.frames_of(GREETING) as i64;
    assert!((heard(&cached) - heard(&streamed)).abs() <= 8 + 1);
    assert!(
        !streamed.m.wants_prompt_stream(1),
        "the driver stops the synthesis"
    );
    // What the streamed one heard comes from the alignment: whole words, cut at the barge-in.
    let lines = streamed.transcript();
    let said = &lines.iter().find(|l| l.0 == Role::Agent).unwrap().1;
    assert_eq!(lines, cached.transcript(), "the same words heard");
    assert!(
        !said.is_empty() && said.len() < LONG_GREETING.len(),
        "{said}"
    );
}

#[test]
fn an_interruption_without_words_resumes_a_streamed_greeting_as_a_cached_one() {
    let voiced = speech();
    // At 300 ms the rest of the streamed greeting is still arriving when it resumes; at
    // 1000 ms it has all arrived while it was paused.
    for before in [300, 1000] {
        let [cached, streamed] =
            [false, true].map(|s| greeting_heard(s, before, &voiced[..3200], Some("")));
        check_resumed(&cached);
        check_resumed(&streamed);
    }
}

fn check_resumed(sim: &Sim) {
    {
        let report = sim.m.report().unwrap();
        assert_eq!((report.barge_ins, report.resumes), (1, 1));
        assert!(sim.replies.is_empty());
        // All of it, plus the stretch before the cut it goes back over.
        let total = sim.frames_of(GREETING);
        assert!((150..=150 + 16).contains(&total), "{total} greeting frames");
        assert_eq!(
            sim.transcript(),
            [(Role::Agent, LONG_GREETING.to_owned(), false)]
        );
    }
}

#[test]
fn a_streamed_greeting_that_fails_part_way_ends_where_its_audio_ends() {
    let mut cfg = config();
    cfg.prompts.greeting = LONG_GREETING.into();
    let mut sim = Sim::new(cfg);
    sim.streamed.push(PromptKind::Greeting);
    let mut chunks: std::collections::VecDeque<_> =
        greeting_stream(&sim).into_iter().take(8).collect();
    chunks.push_back((sim.at(600), PromptChunk::Failed("connection reset".into())));
    let t0 = sim.t0;
    caller_while_streaming(&mut sim, t0, &vec![0; 3000 * 8], &mut chunks);
    assert_eq!(sim.frames_of(GREETING), 40, "the 800 ms that came");
    let report = sim.m.report().unwrap();
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    let lines = sim.transcript();
    assert_eq!(lines.len(), 1);
    assert!(
        LONG_GREETING.starts_with(&lines[0].1) && lines[0].1.len() < LONG_GREETING.len(),
        "what the audio spoke: {lines:?}"
    );
    assert!(!sim.m.wants_prompt_stream(1));
}
