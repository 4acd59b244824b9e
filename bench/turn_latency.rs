//! Turn latency benchmark: what a caller hears, per conversational turn and per barge-in,
//! from the daemon running as its own process against fake providers of KNOWN delay.
//!
//! Run: `cargo bench --bench turn_latency -- [--calls 1,50,200] [--turns N] [--barge-ins N]
//! [--pipelines streamed,sequential,speculative,speculative-revised] [--revise-every N]
//! [--echo-db -20] [--echo-delay-ms 40] [--noise-dbfs -45] [--noise pink|white]
//! [--long-first-sentence]` (default pipelines: streamed,sequential).
//! Defaults: 1 call = 100 turns and 20 barge-ins, asked over calls of at most 25 turns placed
//! one after the other (so the 1-call figures have the samples for a p99); N calls = N
//! concurrent conversations of 3 turns and 2 barge-ins each, ramped over 2 s.
//!
//! Where things run: the daemon is `target/release/sifucall run` (the binary cargo builds
//! for this bench), a child process, configured only through its environment; the fakes of
//! [`sifucall::sandbox`] and the callers run in this process. Fakes: segmentation silence
//! 300 ms, STT final 150 ms after it, LLM first token 300 ms then 50 tokens/s, TTS first
//! audio 150 ms then 1.5x real time. The hold phrase is pushed out to 30 s in every run so
//! that the first audio after a question is the reply itself.
//!
//! Every figure is taken outside the daemon, at the caller ([`sifucall::caller::
//! place_dialogue`]: each frame is timestamped when it is written to or read from the
//! socket) and at the fakes (their own wall-clock marks, for attribution):
//!
//! 1. Speech end (the frame carrying the caller's last voiced sample written) -> the first
//!    non-silent reply frame read by the caller. The "overhead" column is that minus the
//!    sum of the known provider delays, including the clause release time (the production
//!    [`ClauseSplitter`] fed the fake's tokens). For the streamed pipeline the fakes' marks
//!    split each turn into the daemon's own gaps and the fakes' own time (their overshoot of
//!    the configured delays).
//! 2. Streamed vs sequential, both through the same daemon code path: the sequential run
//!    sets `agent.pipeline = "sequential"` (`SIFUCALL_AGENT__PIPELINE`), in which the daemon
//!    waits for the whole LLM reply, sends it to TTS as one text and waits for all its audio
//!    before playing. Every configuration run is printed; a daemon that does not accept the
//!    setting gives an N/A row, never a substitute. Both run with speculation off
//!    (`agent.speculate_after_ms = 0`, so the reply starts at the STT final, as the known
//!    delays assume); `speculative` runs the streamed pipeline with the daemon's default
//!    speculation (a reply may start on a stable hypothesis, before the final).
//! 3. Barge-in as the caller feels it: the first frame of the interrupting speech written ->
//!    the last non-silent agent frame read, next to the daemon's own VAD decision -> that
//!    frame. The decision is when the daemon logged its "barge-in" line (the JSON line's own
//!    timestamp, microseconds, compared with the caller's wall-clock start); without such
//!    lines, the call record's `barge_in_ms` if it has them (ms since the call started, put
//!    on the caller's clock with the record's `started_at`, 1 ms resolution).
//! 4. Speculation: speech end -> first frame with replies started on a stable hypothesis,
//!    its saving over `streamed`, and how many speculative requests were thrown away (call
//!    records and /metrics); `speculative-revised` has the fake STT's final revise some
//!    hypotheses (`--revise-every`), for the waste rate.
//! 5. False barge-ins per minute of agent speech heard by the callers: with `--echo-db` the
//!    callers send the agent's audio back attenuated (the line's hybrid echo), with
//!    `--noise-dbfs` they add line noise to everything they send; barge-ins the daemon
//!    recorded outside the callers' deliberate ones are false.
//!
//! Percentiles: a p99 is printed only over >= 100 samples; below that the maximum and the
//! sample count are printed instead. The fakes and callers share this machine's cores with
//! the daemon, so loaded figures are an upper bound of the daemon's own cost. Figures for
//! the notes, never pass/fail assertions.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::{Instant, sleep_until};
use uuid::Uuid;

use sifucall::audio::{pcm, wav};
use sifucall::call::clauses::ClauseSplitter;
use sifucall::caller::{
    ClosedBy, DialogueOptions, DialogueReport, LineNoise, LineOptions, NoiseColour, place_dialogue,
};
use sifucall::sandbox::{Sandbox, SandboxConfig, elevenlabs};

#[path = "common.rs"]
mod common;
use common::{dist, pct};

const SPF: usize = 160;
const RATE: u32 = 8_000;
/// The fake STT's endpointer: a 20 ms block above this is speech.
const STT_SPEECH_DBFS: f64 = -40.0;

const SEGMENTATION_MS: u64 = 300;
/// The fake STT recognises no phrase with less voice than this.
const FAKE_STT_MIN_PHRASE_MS: u64 = 100;
const STT_FINAL_MS: u64 = 150;
const LLM_TTFT_MS: u64 = 300;
const TOKENS_PER_SEC: f64 = 50.0;
const TTS_FIRST_BYTE_MS: u64 = 150;
const TTS_REALTIME: f64 = 1.5;

/// What the fake STT "hears".
const QUESTION_TEXT: &str = sifucall::demo::QUESTION_TEXT;
/// The scripted three-sentence reply.
const SHORT_REPLY: &str =
    "Pakej asas kami RM99 sebulan. Pakej premium pula RM199 sebulan. Ada soalan lain?";
/// With `--long-first-sentence`: a first sentence of 27 words and no comma, the case where
/// waiting for punctuation would hold the first audio back.
const LONG_REPLY: &str = "Pakej asas kami RM99 sebulan termasuk data tanpa had panggilan percuma ke semua \
     rangkaian tempatan dan antarabangsa sepanjang bulan bagi setiap pelanggan baharu yang \
     mendaftar hari ini. Ada soalan lain?";

static REPLY_TEXT: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The scripted reply of this run.
fn reply_text() -> &'static str {
    REPLY_TEXT.get().copied().unwrap_or(SHORT_REPLY)
}

/// The 1-call scenario asks its turns over calls of at most this many turns.
const SOLO_TURNS_PER_CALL: usize = 25;
/// A barge-in decision belongs to the barge-in whose speech it falls in (or just after).
const DECISION_WINDOW_AFTER_END_MS: f64 = 400.0;

/// How the daemon turns the LLM's reply into audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pipeline {
    /// The default: clauses go to TTS as they stream, audio plays as it arrives.
    Streamed,
    /// Benchmark baseline: whole reply, then whole audio, then play.
    Sequential,
    /// Streamed, and the reply may start on a stable STT hypothesis before the final
    /// (`agent.speculate_after_ms`, the production default when the daemon has it).
    Speculative,
    /// Speculative, with the fake STT's final revising every `--revise-every`th phrase's
    /// hypothesis (its last word): the replies started on those are thrown away.
    SpeculativeRevised,
}

impl Pipeline {
    fn name(self) -> &'static str {
        match self {
            Self::Streamed => "streamed",
            Self::Sequential => "sequential",
            Self::Speculative => "speculative",
            Self::SpeculativeRevised => "speculative-revised",
        }
    }

    fn speculates(self) -> bool {
        matches!(self, Self::Speculative | Self::SpeculativeRevised)
    }
}

/// What the run changes from the defaults.
#[derive(Debug, Clone, Copy)]
struct RunOptions {
    /// The fake STT revises every this many phrases' hypotheses in `speculative-revised`.
    revise_every: usize,
    /// Echo and noise on the callers' lines.
    line: LineOptions,
}

fn main() {
    let Some(args) = common::bench_args("turn_latency") else {
        return;
    };
    let calls = common::list(&args, "--calls").unwrap_or_else(|| vec![1, 50, 200]);
    let turns: Option<usize> = common::flag(&args, "--turns").and_then(|v| v.parse().ok());
    let barge_ins: Option<usize> = common::flag(&args, "--barge-ins").and_then(|v| v.parse().ok());
    let pipelines: Vec<Pipeline> = common::flag(&args, "--pipelines")
        .unwrap_or("streamed,sequential")
        .split(',')
        .filter_map(|p| match p.trim() {
            "streamed" => Some(Pipeline::Streamed),
            "sequential" => Some(Pipeline::Sequential),
            "speculative" => Some(Pipeline::Speculative),
            "speculative-revised" => Some(Pipeline::SpeculativeRevised),
            _ => None,
        })
        .collect();
    if args.iter().any(|a| a == "--long-first-sentence") {
        let _ = REPLY_TEXT.set(LONG_REPLY);
    }
    let number = |name: &str| common::flag(&args, name).and_then(|v| v.parse::<f64>().ok());
    let run = RunOptions {
        revise_every: number("--revise-every").map_or(2, |v| v as usize),
        line: LineOptions {
            echo_db: number("--echo-db"),
            echo_delay: Duration::from_millis(number("--echo-delay-ms").unwrap_or(40.0) as u64),
            noise: number("--noise-dbfs").map(|dbfs| LineNoise {
                dbfs,
                colour: match common::flag(&args, "--noise") {
                    Some("white") => NoiseColour::White,
                    _ => NoiseColour::Pink,
                },
            }),
        },
    };
    let rt = common::runtime();
    rt.block_on(run_all(calls, turns, barge_ins, pipelines, run));
}

// ---------------------------------------------------------------------------------------
// The known delays.

/// The fake OpenRouter's tokens for a reply.
fn fake_tokens(text: &str) -> Vec<String> {
    sifucall::sandbox::openrouter::split_tokens(text)
}

struct Known {
    first_clause: String,
    /// Index of the token whose arrival releases the first clause (token 0 comes at TTFT).
    release_token: usize,
    clause_ms: f64,
    sum_ms: f64,
}

fn known_delays() -> Known {
    let tokens = fake_tokens(reply_text());
    let mut splitter = ClauseSplitter::default();
    let mut found = None;
    for (i, t) in tokens.iter().enumerate() {
        if let Some(c) = splitter.push(t).into_iter().next() {
            found = Some((i, c));
            break;
        }
    }
    // A one-clause reply is released by the end of the stream, one token gap after the last.
    let (release_token, first_clause) =
        found.unwrap_or_else(|| (tokens.len(), splitter.finish().unwrap_or_default()));
    let clause_ms = release_token as f64 * 1000.0 / TOKENS_PER_SEC;
    let sum_ms =
        (SEGMENTATION_MS + STT_FINAL_MS + LLM_TTFT_MS + TTS_FIRST_BYTE_MS) as f64 + clause_ms;
    Known {
        first_clause,
        release_token,
        clause_ms,
        sum_ms,
    }
}

/// Distinct transcripts and replies per request (see [`marked_reply`]), so the fakes' marks
/// of one turn can be joined across the three fakes.
const VARIANTS: usize = 4_000;

/// Transcript `k`: the question with a number, unique per phrase.
fn marked_transcript(k: usize) -> String {
    format!("{QUESTION_TEXT} {k}")
}

/// Reply `k`: [`reply_text`] with its first number replaced by a unique one (same tokens, same
/// first clause boundary), so the first clause text names the request it came from.
fn marked_reply(k: usize) -> String {
    reply_text().replacen("RM99", &format!("RM{}", 10_000 + k), 1)
}

/// The mark in a text made by [`marked_reply`].
fn reply_mark(text: &str) -> Option<usize> {
    let at = text.find("RM1")? + 2;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse::<usize>().ok()?.checked_sub(10_000)
}

fn sandbox_config(marked: bool, revise_every: usize) -> SandboxConfig {
    let mut c = SandboxConfig::default();
    c.azure.revise_every = revise_every;
    // As the real service, no words from a peak of line noise (`--noise-dbfs`).
    c.azure.min_phrase_voiced_ms = FAKE_STT_MIN_PHRASE_MS;
    c.azure.transcripts = vec![QUESTION_TEXT.into()];
    if marked {
        c.azure.transcripts = (0..VARIANTS).map(marked_transcript).collect();
    }
    c.azure.final_delay_ms = STT_FINAL_MS;
    c.openrouter.first_token_delay_ms = LLM_TTFT_MS;
    c.openrouter.tokens_per_sec = TOKENS_PER_SEC;
    c.openrouter.replies = if marked {
        (0..VARIANTS).map(marked_reply).collect()
    } else {
        vec![reply_text().into()]
    };
    c.openrouter.hang_up_words = Vec::new();
    c.elevenlabs.first_byte_delay_ms = TTS_FIRST_BYTE_MS;
    c.elevenlabs.realtime_factor = TTS_REALTIME;
    c.elevenlabs.chunk_ms = 100;
    c
}

/// The question fixture cut to whole frames from the first to the last voiced one (by the
/// fake STT's rule), so the speech ends sharply on a frame boundary.
fn utterance() -> Vec<i16> {
    let audio = wav::read_bytes(sifucall::demo::QUESTION_WAV, "question fixture").expect("fixture");
    assert_eq!(audio.rate, RATE, "8 kHz fixture");
    let frames: Vec<&[i16]> = audio.samples.chunks_exact(SPF).collect();
    let voiced: Vec<usize> = frames
        .iter()
        .enumerate()
        .filter(|(_, f)| pcm::dbfs(f) > STT_SPEECH_DBFS)
        .map(|(i, _)| i)
        .collect();
    let (first, last) = (voiced[0], voiced[voiced.len() - 1]);
    frames[first..=last].concat()
}

// ---------------------------------------------------------------------------------------
// One scenario: one pipeline, N concurrent conversations (or 1 at a time).

#[derive(Debug, Default)]
struct Results {
    pipeline: &'static str,
    calls: usize,
    /// Why the scenario could not run (e.g. the daemon rejected the pipeline setting).
    not_run: Option<String>,
    conversations: usize,
    failed: usize,
    errors: Vec<String>,
    turns_asked: usize,
    /// Speech end -> first non-silent reply frame read.
    e2e: Vec<f64>,
    /// The daemon's first-frame mark -> that frame read by the caller.
    mark_to_read: Vec<f64>,
    underruns: f64,
    max_send_lag_ms: f64,
    barge_attempted: usize,
    /// Barge-ins with agent audio read after the caller's onset.
    barge_heard: usize,
    /// Caller speech onset -> last non-silent agent frame read.
    barge_felt: Vec<f64>,
    barge_frames_after_onset: Vec<f64>,
    barge_decided: usize,
    /// Caller speech onset -> the daemon's decision.
    barge_detect: Vec<f64>,
    /// The daemon's decision -> last non-silent agent frame read.
    barge_flush: Vec<f64>,
    /// Where the decision marks came from.
    decision_source: &'static str,
    att: Attribution,
    /// Speculative requests from the call records: started, used, wasted, wasted tokens.
    spec: [u64; 4],
    /// The same from the daemon's /metrics (deltas over the scenario).
    spec_metrics: [f64; 4],
    /// Agent audio the callers heard (voiced frames read), ms.
    agent_speech_ms: f64,
    /// Barge-ins in the call records.
    barge_ins_recorded: u64,
    /// Of those, decided within a deliberate barge-in (its speech or just after).
    barge_ins_deliberate: u64,
    /// Caller lines in the records (each a turn the daemon took from the caller).
    caller_lines: usize,
}

/// How the scenario's questions are spread over conversations.
fn plan(n: usize, turns: Option<usize>, barge_ins: Option<usize>) -> Vec<(usize, usize)> {
    if n == 1 {
        let t = turns.unwrap_or(100);
        let b = barge_ins.unwrap_or(20);
        let calls = t.div_ceil(SOLO_TURNS_PER_CALL).max(1);
        (0..calls)
            .map(|i| {
                let share = |total: usize| total / calls + usize::from(i < total % calls);
                (share(t), share(b))
            })
            .collect()
    } else {
        vec![(turns.unwrap_or(3), barge_ins.unwrap_or(2)); n]
    }
}

fn daemon_env(
    sandbox: &Sandbox,
    pipeline: Pipeline,
    n: usize,
    records: &Path,
) -> Vec<(String, String)> {
    let mut env = sandbox.env_overrides();
    let set = |env: &mut Vec<(String, String)>, k: &str, v: String| env.push((k.to_owned(), v));
    set(&mut env, "SIFUCALL_AGENT__MODE", "ai".into());
    set(
        &mut env,
        "SIFUCALL_AUDIOSOCKET__MAX_CALLS",
        (n + 10).to_string(),
    );
    set(
        &mut env,
        "SIFUCALL_STT__SEGMENTATION_SILENCE_MS",
        SEGMENTATION_MS.to_string(),
    );
    set(&mut env, "SIFUCALL_AGENT__HOLD_AFTER_MS", "30000".into());
    set(
        &mut env,
        "SIFUCALL_RECORDS__URL",
        format!("file://{}", records.display()),
    );
    set(&mut env, "SIFUCALL_LOG__FORMAT", "json".into());
    set(&mut env, "SIFUCALL_LOG__LEVEL", "info".into());
    if pipeline == Pipeline::Sequential {
        set(&mut env, "SIFUCALL_AGENT__PIPELINE", "sequential".into());
    }
    if !pipeline.speculates() {
        // The known-delay model starts the reply at the STT final.
        set(&mut env, "SIFUCALL_AGENT__SPECULATE_AFTER_MS", "0".into());
    }
    env
}

async fn scenario(
    pipeline: Pipeline,
    n: usize,
    conversations: Vec<(usize, usize)>,
    known: &Known,
    utt: Arc<Vec<i16>>,
    run: RunOptions,
) -> Results {
    let mut r = Results {
        pipeline: pipeline.name(),
        calls: n,
        decision_source: "none",
        ..Results::default()
    };
    let revise_every = if pipeline == Pipeline::SpeculativeRevised {
        run.revise_every
    } else {
        0
    };
    let sandbox = Sandbox::start(sandbox_config(true, revise_every))
        .await
        .expect("fake providers");
    let tag = format!("{}-{n}", pipeline.name());
    let records = common::temp_path(&format!("{tag}-records.jsonl"));
    let log = common::temp_path(&format!("{tag}-daemon.log"));
    let _ = std::fs::remove_file(&records);
    let env = daemon_env(&sandbox, pipeline, n, &records);
    if pipeline == Pipeline::Sequential {
        match common::effective_settings(&env) {
            Ok(s)
                if s.pointer("/agent/pipeline").and_then(|v| v.as_str()) == Some("sequential") => {}
            Ok(_) => {
                r.not_run = Some("N/A: the daemon ignores agent.pipeline".into());
                return r;
            }
            Err(e) => {
                let why = e.split(", expected").next().unwrap_or(&e);
                r.not_run = Some(format!("N/A: the daemon rejects agent.pipeline ({why})"));
                return r;
            }
        }
    }
    let mut daemon = match common::start_daemon(&env, Some(log.as_path())).await {
        Ok(d) => d,
        Err(e) => {
            r.not_run = Some(format!("N/A: {e}"));
            return r;
        }
    };
    let before = common::scrape(daemon.admin).await;
    let addr = daemon.audio.to_string();
    let options = |(turns, barge_ins): (usize, usize)| {
        let mut o = DialogueOptions::new(addr.clone(), utt.to_vec(), turns);
        o.barge_ins = barge_ins;
        o.line = run.line;
        o.max_duration = Duration::from_secs(60 + 20 * (turns + barge_ins) as u64);
        o
    };
    let mut reports = Vec::new();
    let mut push = |res: Result<DialogueReport, String>, r: &mut Results| match res {
        Ok(rep) => reports.push(rep),
        Err(e) => {
            r.failed += 1;
            if r.errors.len() < 5 {
                r.errors.push(e);
            }
        }
    };
    r.conversations = conversations.len();
    if n == 1 {
        for c in conversations {
            let res = place_dialogue(options(c)).await.map_err(|e| e.to_string());
            push(res, &mut r);
        }
    } else {
        let start = Instant::now() + Duration::from_millis(100);
        let ramp = Duration::from_secs(2);
        let count = conversations.len();
        let mut tasks = Vec::new();
        for (i, c) in conversations.into_iter().enumerate() {
            let offset = ramp * u32::try_from(i).unwrap_or(0) / u32::try_from(count).unwrap_or(1);
            let opts = options(c);
            tasks.push(tokio::spawn(async move {
                sleep_until(start + offset).await;
                place_dialogue(opts).await.map_err(|e| e.to_string())
            }));
        }
        for t in tasks {
            let res = t.await.map_err(|e| e.to_string()).and_then(|x| x);
            push(res, &mut r);
        }
    }
    let after = common::scrape(daemon.admin).await;
    r.underruns = common::delta(&before, &after, "sifucall_underruns_total");
    for (i, outcome) in ["started", "used", "wasted"].iter().enumerate() {
        let k = format!("sifucall_llm_speculative_requests_total{{outcome=\"{outcome}\"}}");
        r.spec_metrics[i] = common::delta(&before, &after, &k);
    }
    r.spec_metrics[3] = common::delta(
        &before,
        &after,
        "sifucall_llm_speculative_wasted_tokens_total",
    );
    // A graceful stop flushes the call records.
    tokio::task::block_in_place(|| daemon.proc.stop(Duration::from_secs(15)));
    let records = read_records(&records);
    let log_marks = read_log_barge_ins(&log, &reports);
    let fakes = FakeMarks {
        phrases: sandbox.azure.stats().phrase_times,
        llm: sandbox.openrouter.request_times(),
        tts: sandbox.elevenlabs.stats().session_times(),
        llm_connections: sandbox.openrouter.connections(),
    };
    drop(sandbox);

    for rep in &reports {
        let record = records.get(&rep.call_id);
        analyse(rep, record, log_marks.get(&rep.call_id), &mut r);
    }
    if pipeline == Pipeline::Streamed {
        attribute(&reports, &fakes, known, &mut r.att);
        r.att.llm_connections = (fakes.llm_connections, fakes.llm.len());
    }
    r
}

/// The daemon's call records by call id (unparseable lines are skipped).
fn read_records(path: &Path) -> HashMap<Uuid, serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let id = v.get("call_id")?.as_str()?.parse().ok()?;
            Some((id, v))
        })
        .collect()
}

/// When the daemon logged each barge-in decision (the JSON log line's own timestamp, in
/// microseconds), by call id.
fn read_log_barge_ins(path: &Path, reports: &[DialogueReport]) -> HashMap<Uuid, Vec<SystemTime>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let ids: Vec<(Uuid, String)> = reports
        .iter()
        .map(|r| (r.call_id, r.call_id.to_string()))
        .collect();
    let mut out: HashMap<Uuid, Vec<SystemTime>> = HashMap::new();
    for line in text.lines().filter(|l| l.contains("barge-in")) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(at) = v
            .get("timestamp")
            .and_then(|t| t.as_str())
            .and_then(parse_rfc3339_utc)
        else {
            continue;
        };
        if let Some((id, _)) = ids.iter().find(|(_, s)| line.contains(s.as_str())) {
            out.entry(*id).or_default().push(at);
        }
    }
    out
}

/// ms from the caller's call start to `t`.
fn caller_ms(rep: &DialogueReport, t: SystemTime) -> f64 {
    match t.duration_since(rep.started_wall) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

/// `2026-12-01T21:39:57.123Z` -> the instant.
fn parse_rfc3339_utc(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    let millis: f64 = format!("0.{frac}").parse().ok()?;
    // Days since the epoch (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_secs_f64(millis))
}

/// ms to add to a daemon mark (ms since its call started) to put it on the caller's clock,
/// from the record's `started_at` (1 ms resolution).
fn daemon_offset_ms(rep: &DialogueReport, record: &serde_json::Value) -> Option<f64> {
    let started = parse_rfc3339_utc(record.get("started_at")?.as_str()?)?;
    Some(caller_ms(rep, started))
}

fn analyse(
    rep: &DialogueReport,
    record: Option<&serde_json::Value>,
    log_marks: Option<&Vec<SystemTime>>,
    r: &mut Results,
) {
    r.max_send_lag_ms = r.max_send_lag_ms.max(rep.max_send_lag_ms);
    r.agent_speech_ms += 20.0 * rep.arrivals.iter().filter(|a| a.voiced).count() as f64;
    if let Some(rec) = record {
        let n = |p: &str| {
            rec.pointer(p)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        let spec = [
            "/speculative/started",
            "/speculative/used",
            "/speculative/wasted",
            "/speculative/wasted_tokens",
        ];
        for (acc, p) in r.spec.iter_mut().zip(spec) {
            *acc += n(p);
        }
        r.barge_ins_recorded += n("/barge_ins");
        r.caller_lines += rec
            .get("transcript")
            .and_then(|t| t.as_array())
            .map_or(0, |t| t.iter().filter(|e| e["role"] == "caller").count());
    }
    if rep.closed_by != ClosedBy::Caller || rep.error.is_some() {
        r.failed += 1;
        if r.errors.len() < 5 {
            r.errors.push(format!(
                "{} ({})",
                rep.error.clone().unwrap_or_default(),
                rep.closed_by
            ));
        }
    }
    for t in rep.turns.iter().filter(|t| !t.barge) {
        r.turns_asked += 1;
        if let Some(first) = t.first_reply_ms {
            r.e2e.push(first - t.end_ms);
        }
    }
    let offset = record.and_then(|rec| daemon_offset_ms(rep, rec));
    // The daemon's first-frame marks against what the caller read, turn by turn.
    if let (Some(rec), Some(offset)) = (record, offset) {
        let marks: Vec<Option<f64>> = rec
            .get("turns")
            .and_then(|t| t.as_array())
            .map(|a| {
                a.iter()
                    .map(|t| t.get("first_frame_ms").and_then(serde_json::Value::as_f64))
                    .collect()
            })
            .unwrap_or_default();
        if marks.len() == rep.turns.len() {
            for (t, m) in rep.turns.iter().zip(marks) {
                if let (false, Some(first), Some(m)) = (t.barge, t.first_reply_ms, m) {
                    r.mark_to_read.push(first - (m + offset));
                }
            }
        }
    }
    // Barge-ins.
    // Decision marks on the caller's clock: the log lines' own timestamps (microseconds)
    // if there are any, else the record's `barge_in_ms` (ms since the call started).
    let decisions: Option<Vec<f64>> = if let Some(v) = log_marks {
        r.decision_source = "daemon log timestamps";
        Some(v.iter().map(|&t| caller_ms(rep, t)).collect())
    } else {
        let from_record = record
            .and_then(|rec| rec.get("barge_in_ms"))
            .and_then(|v| v.as_array())
            .zip(offset)
            .map(|(a, off)| {
                a.iter()
                    .filter_map(serde_json::Value::as_f64)
                    .map(|m| m + off)
                    .collect::<Vec<f64>>()
            });
        if from_record.is_some() && r.decision_source == "none" {
            r.decision_source = "call record";
        }
        from_record
    };
    let voiced: Vec<f64> = rep
        .arrivals
        .iter()
        .filter(|a| a.voiced)
        .map(|a| a.at_ms)
        .collect();
    for c in rep.turns.iter().filter(|t| t.barge) {
        r.barge_attempted += 1;
        // The interrupted reply's audio: from the onset until this question's own reply
        // (which cannot start before its speech end).
        let until = c
            .first_reply_ms
            .unwrap_or(f64::INFINITY)
            .min(c.end_ms + 300.0);
        let tail: Vec<f64> = voiced
            .iter()
            .copied()
            .filter(|&a| a >= c.start_ms && a < until)
            .collect();
        let last = tail.last().copied();
        if let Some(last) = last {
            r.barge_heard += 1;
            r.barge_felt.push(last - c.start_ms);
            r.barge_frames_after_onset.push(tail.len() as f64);
        }
        let decision = decisions.as_ref().and_then(|d| {
            d.iter()
                .copied()
                .find(|&m| m >= c.start_ms && m <= c.end_ms + DECISION_WINDOW_AFTER_END_MS)
        });
        if let Some(dec) = decision {
            r.barge_decided += 1;
            r.barge_ins_deliberate += 1;
            r.barge_detect.push(dec - c.start_ms);
            if let Some(last) = last {
                r.barge_flush.push(last - dec);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Attribution: the daemon's own gaps and the fakes' own time, from the fakes' marks.

/// Per-turn stages from the fakes' own marks (ms): the daemon's gaps and the fakes' own.
#[derive(Debug, Default)]
struct Attribution {
    turns: usize,
    /// Caller writes its last voiced frame -> the fake STT has it.
    audio_speech: Vec<f64>,
    /// Caller writes the frame completing the segmentation silence -> the fake STT has it.
    audio_seg: Vec<f64>,
    /// Fake STT: segmentation complete -> `speech.phrase` sent (configured final delay).
    fake_stt: Vec<f64>,
    /// `speech.phrase` sent -> the LLM request has arrived.
    phrase_to_llm: Vec<f64>,
    /// Fake LLM: request -> first content token handed to the body (configured TTFT).
    fake_ttft: Vec<f64>,
    /// Fake LLM: first token -> the token releasing the first clause (configured clause time).
    fake_clause: Vec<f64>,
    /// Releasing token sent -> the text triggering the first generation arrives at the fake TTS.
    clause_to_tts: Vec<f64>,
    /// First token sent by the fake LLM -> the first text arrives at the fake TTS (the
    /// clause wait plus the daemon's own hop).
    token_to_tts: Vec<f64>,
    /// Fake TTS: trigger text -> first audio message sent (configured first byte).
    fake_tts: Vec<f64>,
    /// First audio message sent -> first non-silent frame read by the caller.
    audio_out: Vec<f64>,
    daemon_sum: Vec<f64>,
    /// Caller's segmentation wait plus the fakes' stages.
    fake_sum: Vec<f64>,
    /// Measured speech end -> first frame minus all the stages (should be ~0).
    residual: Vec<f64>,
    unjoined: usize,
    /// The fake LLM's TCP connections and requests.
    llm_connections: (usize, usize),
}

/// The fakes' marks of one scenario.
struct FakeMarks {
    phrases: Vec<sifucall::sandbox::azure::PhraseTimes>,
    llm: Vec<sifucall::sandbox::openrouter::LlmRequestTimes>,
    tts: Vec<elevenlabs::TtsSessionTimes>,
    /// TCP connections the fake LLM accepted (fewer than requests: kept-alive reuse).
    llm_connections: usize,
}

/// ms from `origin` to `t` (negative if before).
fn rel_ms(origin: std::time::Instant, t: std::time::Instant) -> f64 {
    match t.checked_duration_since(origin) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(origin - t).as_secs_f64() * 1000.0,
    }
}

/// Joins each caller turn to the fakes' marks: the call's STT connection is the one whose
/// phrases' last speech arrived closest to the caller's speech ends; phrase -> LLM request
/// by the (unique) transcript; LLM request -> TTS session by the (unique) reply mark.
fn attribute(logs: &[DialogueReport], fakes: &FakeMarks, known: &Known, a: &mut Attribution) {
    let seg_frames = (SEGMENTATION_MS / 20) as usize;
    let mut by_conn: HashMap<usize, Vec<&sifucall::sandbox::azure::PhraseTimes>> = HashMap::new();
    for p in &fakes.phrases {
        by_conn.entry(p.connection).or_default().push(p);
    }
    let mut llm_by_user = HashMap::new();
    for q in &fakes.llm {
        llm_by_user.entry(q.user.as_str()).or_insert(q);
    }
    let mut tts_by_mark = HashMap::new();
    for t in &fakes.tts {
        if let Some(m) = reply_mark(&t.trigger_text) {
            tts_by_mark.entry(m).or_insert(t);
        }
    }
    let mut used = std::collections::HashSet::new();
    for log in logs {
        let origin = log.started;
        let normal: Vec<(usize, &sifucall::caller::DialogueTurn)> = log
            .turns
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.barge && t.end_ms > 0.0)
            .collect();
        // The connection: smallest worst |last speech arrival - caller speech end|.
        let conn = by_conn
            .iter()
            .filter(|(c, ps)| !used.contains(*c) && ps.len() >= normal.len())
            .map(|(c, ps)| {
                let cost = normal
                    .iter()
                    .map(|(i, t)| {
                        ps.get(*i)
                            .and_then(|p| p.last_speech_at)
                            .map_or(f64::INFINITY, |at| (rel_ms(origin, at) - t.end_ms).abs())
                    })
                    .fold(0.0, f64::max);
                (*c, cost)
            })
            .min_by(|x, y| x.1.total_cmp(&y.1));
        let Some((conn, _)) = conn.filter(|(_, cost)| *cost < 100.0) else {
            a.unjoined += normal.len();
            continue;
        };
        used.insert(conn);
        let phrases = &by_conn[&conn];
        for (i, t) in normal {
            let joined = (|| {
                let p = phrases.get(i)?;
                let q = llm_by_user.get(p.text.as_str())?;
                let tts = tts_by_mark.get(&reply_mark(&q.tokens.concat())?)?;
                let r = |x: std::time::Instant| rel_ms(origin, x);
                Some(Marks {
                    heard: r(p.last_speech_at?),
                    seg_sent: *log.sent_ms.get(t.end_frame + seg_frames)?,
                    segmented: r(p.segmented_at?),
                    phrase: r(p.sent_at),
                    arrived: r(q.arrived),
                    tok0: r(*q.token_sent.first()?),
                    release: r(*q.token_sent.get(known.release_token)?),
                    trigger: r(tts.trigger_at?),
                    audio: r(tts.first_audio_at?),
                    first: t.first_reply_ms?,
                })
            })();
            let Some(Marks {
                heard,
                seg_sent,
                segmented,
                phrase,
                arrived,
                tok0,
                release,
                trigger,
                audio,
                first,
            }) = joined
            else {
                a.unjoined += 1;
                continue;
            };
            a.turns += 1;
            a.audio_speech.push(heard - t.end_ms);
            let daemon = [
                segmented - seg_sent,
                arrived - phrase,
                trigger - release,
                first - audio,
            ];
            a.audio_seg.push(daemon[0]);
            a.phrase_to_llm.push(daemon[1]);
            a.clause_to_tts.push(daemon[2]);
            a.token_to_tts.push(trigger - tok0);
            a.audio_out.push(daemon[3]);
            let fake = [
                seg_sent - t.end_ms,
                phrase - segmented,
                tok0 - arrived,
                release - tok0,
                audio - trigger,
            ];
            a.fake_stt.push(fake[1]);
            a.fake_ttft.push(fake[2]);
            a.fake_clause.push(fake[3]);
            a.fake_tts.push(fake[4]);
            let ds: f64 = daemon.iter().sum();
            let fs: f64 = fake.iter().sum();
            a.daemon_sum.push(ds);
            a.fake_sum.push(fs);
            a.residual.push(first - t.end_ms - ds - fs);
        }
    }
}

/// One turn's instants (ms on the bench's clock), joined across the caller and the fakes.
struct Marks {
    /// The fake STT received the caller's last voiced frame.
    heard: f64,
    /// The caller sent the frame completing the segmentation silence.
    seg_sent: f64,
    /// The fake STT received that frame.
    segmented: f64,
    /// The fake STT sent the phrase.
    phrase: f64,
    /// The LLM request arrived at the fake.
    arrived: f64,
    /// The fake LLM sent the first token.
    tok0: f64,
    /// The fake LLM sent the token that releases the first clause.
    release: f64,
    /// The clause that triggered generation arrived at the fake TTS.
    trigger: f64,
    /// The fake TTS sent its first audio.
    audio: f64,
    /// The first reply frame reached the caller.
    first: f64,
}

// ---------------------------------------------------------------------------------------

async fn run_all(
    calls: Vec<usize>,
    turns: Option<usize>,
    barge_ins: Option<usize>,
    pipelines: Vec<Pipeline>,
    run: RunOptions,
) {
    let known = known_delays();
    let utt = Arc::new(utterance());
    println!("\n## Known provider delays (fakes)\n");
    println!("| component | ms |");
    println!("|---|---|");
    println!("| STT segmentation silence | {SEGMENTATION_MS} |");
    println!("| STT final after the silence | {STT_FINAL_MS} |");
    println!("| LLM first token | {LLM_TTFT_MS} |");
    println!(
        "| LLM streams the first clause {:?}: released by token #{} at {TOKENS_PER_SEC} tok/s | {:.0} |",
        known.first_clause.trim(),
        known.release_token,
        known.clause_ms
    );
    println!("| TTS first audio | {TTS_FIRST_BYTE_MS} |");
    println!("| **sum (streamed)** | **{:.0}** |", known.sum_ms);
    println!(
        "\nCaller utterance {:.0} ms; reply {:?} = {:.0} ms of audio ({} tokens); TTS {TTS_REALTIME}x real time, 100 ms chunks. Daemon: `{}` (child process); fakes and callers in this process.",
        utt.len() as f64 / 8.0,
        reply_text(),
        elevenlabs::speech_samples(reply_text(), RATE) as f64 / 8.0,
        fake_tokens(reply_text()).len(),
        common::sifucall_bin()
    );

    let mut results = Vec::new();
    for &pipeline in &pipelines {
        for &n in &calls {
            let convs = plan(n, turns, barge_ins);
            let t0 = std::time::Instant::now();
            let r = scenario(pipeline, n, convs, &known, Arc::clone(&utt), run).await;
            eprintln!(
                "turn_latency: {} x{n} done in {:.0} s{}",
                pipeline.name(),
                t0.elapsed().as_secs_f64(),
                r.not_run
                    .as_deref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            );
            results.push(r);
        }
    }

    println!(
        "\n## 1. Caller's speech end -> first non-silent reply frame read by the caller (ms)\n"
    );
    println!(
        "| pipeline | calls | conversations (failed) | turns replied/asked | speech end -> first reply frame | overhead over the known {:.0} ms | daemon's first-frame mark -> read by caller | underruns | caller write lag max |",
        known.sum_ms
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        if let Some(why) = &r.not_run {
            println!("| {} | {} | {why} | | | | | | |", r.pipeline, r.calls);
            continue;
        }
        let overhead: Vec<f64> = r.e2e.iter().map(|v| v - known.sum_ms).collect();
        println!(
            "| {} | {} | {} ({}) | {}/{} | {} | {} | {} | {} | {:.1} |",
            r.pipeline,
            r.calls,
            r.conversations,
            r.failed,
            r.e2e.len(),
            r.turns_asked,
            dist(&r.e2e, 0),
            if r.pipeline == "streamed" {
                dist(&overhead, 0)
            } else {
                "-".into()
            },
            dist(&r.mark_to_read, 0),
            r.underruns,
            r.max_send_lag_ms
        );
    }
    println!(
        "\nOverhead = measured - the known provider delays; it includes the wait for the next 20 ms playout tick. The mark column compares the daemon's own `first_frame_ms` (call record, put on the caller's clock via the record's `started_at`: +-1-2 ms) with the caller's read: it should be >= 0 and small if the mark is the real write."
    );

    println!(
        "\n## 2. Streamed vs sequential, same daemon, same fakes (speech end -> first reply frame, p50 ms)\n"
    );
    println!(
        "| calls | streamed | sequential | sequential / streamed | speculative (streamed + reply on a stable hypothesis) |"
    );
    println!("|---|---|---|---|---|");
    for &n in &calls {
        let get = |p: &str| results.iter().find(|r| r.calls == n && r.pipeline == p);
        let cell = |r: Option<&Results>| match r {
            None => "not run".to_owned(),
            Some(r) => match &r.not_run {
                Some(why) => why.clone(),
                None => dist(&r.e2e, 0),
            },
        };
        let p50 = |r: Option<&Results>| {
            r.filter(|r| r.not_run.is_none())
                .and_then(|r| pct(&r.e2e, 50.0))
        };
        let ratio = match (p50(get("sequential")), p50(get("streamed"))) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "N/A".into(),
        };
        println!(
            "| {n} | {} | {} | {ratio} | {} |",
            cell(get("streamed")),
            cell(get("sequential")),
            cell(get("speculative"))
        );
    }

    println!("\n## 3. Streamed: the daemon's own time per turn, from the fakes' marks (ms)\n");
    println!(
        "Each stage is timed between two instants in this process: the caller's frame writes and reads, and what the fakes recorded (audio received, phrase sent, request arrived, each token handed to the body, TTS text arrived, first audio sent). The fakes' own time (their real overshoot of the configured delays) is thereby separated from the daemon's.\n"
    );
    println!(
        "| calls | turns joined (unjoined) | (a) caller frame completing the silence -> fake STT | (b) phrase sent -> LLM request arrives | (c) clause-releasing token sent -> clause text at fake TTS | (d) first TTS audio sent -> first frame read by caller (incl. 0-20 tick) | **daemon sum** |"
    );
    println!("|---|---|---|---|---|---|---|");
    let streamed: Vec<&Results> = results
        .iter()
        .filter(|r| r.pipeline == "streamed" && r.not_run.is_none())
        .collect();
    for r in &streamed {
        let a = &r.att;
        println!(
            "| {} | {} ({}) | {} | {} | {} | {} | **{}** |",
            r.calls,
            a.turns,
            a.unjoined,
            dist(&a.audio_seg, 1),
            dist(&a.phrase_to_llm, 1),
            dist(&a.clause_to_tts, 1),
            dist(&a.audio_out, 1),
            dist(&a.daemon_sum, 1)
        );
    }
    println!(
        "\nFirst LLM token sent -> first text at the fake TTS (ms), reply: {:?}\n",
        reply_text()
    );
    println!("| calls | turns | first token -> first text at TTS |");
    println!("|---|---|---|");
    for r in &streamed {
        println!(
            "| {} | {} | {} |",
            r.calls,
            r.att.turns,
            dist(&r.att.token_to_tts, 1)
        );
    }
    for r in &streamed {
        println!(
            "\n{} calls: the fake LLM accepted {} TCP connections for {} requests.",
            r.calls, r.att.llm_connections.0, r.att.llm_connections.1
        );
    }
    println!("\n### The fakes' own time per turn against their configuration (ms)\n");
    println!(
        "| calls | STT final (cfg {STT_FINAL_MS}) | LLM first token (cfg {LLM_TTFT_MS}) | LLM first token -> clause-releasing token #{} (cfg {:.0}) | TTS first audio (cfg {TTS_FIRST_BYTE_MS}) | caller's silence + fakes, sum (cfg {:.0}) | measured - daemon - fakes (check, ~0) | caller last voiced frame -> fake STT |",
        known.release_token, known.clause_ms, known.sum_ms
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &streamed {
        let a = &r.att;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.calls,
            dist(&a.fake_stt, 1),
            dist(&a.fake_ttft, 1),
            dist(&a.fake_clause, 1),
            dist(&a.fake_tts, 1),
            dist(&a.fake_sum, 1),
            dist(&a.residual, 1),
            dist(&a.audio_speech, 1)
        );
    }

    println!("\n## 4. Barge-in (ms)\n");
    println!(
        "| pipeline | calls | barge-ins with agent audio after the onset / attempted | **caller speech onset -> last agent frame read** | daemon decision -> last agent frame read | onset -> daemon decision (decided) | agent frames read after the onset | decision marks from |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in results.iter().filter(|r| r.not_run.is_none()) {
        println!(
            "| {} | {} | {}/{} | **{}** | {} | {} ({}) | {} | {} |",
            r.pipeline,
            r.calls,
            r.barge_heard,
            r.barge_attempted,
            dist(&r.barge_felt, 0),
            dist(&r.barge_flush, 0),
            dist(&r.barge_detect, 0),
            r.barge_decided,
            dist(&r.barge_frames_after_onset, 0),
            r.decision_source
        );
    }
    println!(
        "\n(The onset is the write of the first frame of the interrupting speech; the barge-in starts {:.0} ms after the first frame of the reply it interrupts. The daemon cannot decide before it has heard enough speech (`agent.barge_in_min_speech_ms`), so onset -> last frame >= about that. Decision -> last frame <= 0: the last agent frame had been read before the daemon logged its decision, i.e. nothing was played after it.)",
        DialogueOptions::new("", Vec::new(), 0)
            .barge_after
            .as_secs_f64()
            * 1000.0
    );

    println!("\n## 5. Speculation: replies started on a stable hypothesis before the final\n");
    println!(
        "| pipeline | calls | speech end -> first reply frame | saving over streamed (p50) | started | used | wasted | waste rate (wasted / started) | wasted tokens (per wasted request) | /metrics: started / used / wasted, wasted tokens |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &n in &calls {
        let streamed = results
            .iter()
            .find(|r| r.calls == n && r.pipeline == "streamed" && r.not_run.is_none())
            .and_then(|r| pct(&r.e2e, 50.0));
        for r in results
            .iter()
            .filter(|r| r.calls == n && r.pipeline.starts_with("speculative"))
            .filter(|r| r.not_run.is_none())
        {
            let [started, used, wasted, tokens] = r.spec;
            let saving = match (streamed, pct(&r.e2e, 50.0)) {
                (Some(a), Some(b)) => format!("{:.0} ms", a - b),
                _ => "N/A (no streamed row)".into(),
            };
            let m = r.spec_metrics;
            println!(
                "| {} | {} | {} | {saving} | {started} | {used} | {wasted} | {} | {tokens} ({}) | {:.0} / {:.0} / {:.0}, {:.0} |",
                r.pipeline,
                r.calls,
                dist(&r.e2e, 0),
                if started > 0 {
                    format!("{:.1} %", 100.0 * wasted as f64 / started as f64)
                } else {
                    "-".into()
                },
                if wasted > 0 {
                    format!("{:.0}", tokens as f64 / wasted as f64)
                } else {
                    "-".into()
                },
                m[0],
                m[1],
                m[2],
                m[3]
            );
        }
    }
    println!(
        "\nOnly the questions asked after the agent finished are timed here; a question spoken over the agent (barge-in) is not speculated on. `speculative-revised`: the fake STT's final revises the hypothesis of one phrase in {} (the hypothesis lacks the final's last word), so the reply started on it is thrown away and started again on the final. Wasted tokens are the daemon's estimate (prompt + text streamed before the cancel).",
        run.revise_every
    );

    let line = run.line;
    println!("\n## 6. False barge-ins per minute of agent speech\n");
    println!(
        "Callers' line: {}; {}.\n",
        line.echo_db.map_or("no echo".into(), |db| format!(
            "the agent's audio sent back {db} dB down, {} ms after it was read",
            line.echo_delay.as_millis()
        )),
        line.noise.map_or("no noise".into(), |n| format!(
            "{:?} noise at {} dBFS on every frame sent",
            n.colour, n.dbfs
        ))
    );
    println!(
        "| pipeline | calls | agent speech heard (min) | barge-ins in the records | of which deliberate | **false** | **false per minute of agent speech** | caller lines in the records / questions asked |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in results.iter().filter(|r| r.not_run.is_none()) {
        let minutes = r.agent_speech_ms / 60_000.0;
        let false_ins = r.barge_ins_recorded.saturating_sub(r.barge_ins_deliberate);
        println!(
            "| {} | {} | {minutes:.1} | {} | {} | **{false_ins}** | **{:.2}** | {} / {} |",
            r.pipeline,
            r.calls,
            r.barge_ins_recorded,
            r.barge_ins_deliberate,
            if minutes > 0.0 {
                false_ins as f64 / minutes
            } else {
                0.0
            },
            r.caller_lines,
            r.turns_asked + r.barge_attempted
        );
    }
    println!(
        "\nA barge-in is deliberate when the daemon decided it during one of the callers' barge-in questions (or within {DECISION_WINDOW_AFTER_END_MS:.0} ms after); any other is false. More caller lines than questions means the daemon took something (echo, noise) for a caller's turn."
    );
    for r in &results {
        if !r.errors.is_empty() {
            println!("\n{} x{}: errors {:?}", r.pipeline, r.calls, r.errors);
        }
    }
}
