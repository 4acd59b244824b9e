//! Turn latency benchmark: the daemon's own overhead per conversational turn, measured
//! against fake providers of KNOWN delay.
//!
//! Run: `cargo bench --bench turn_latency -- [--calls 1,200] [--turns N] [--barge-ins N]`
//! (defaults: 1 call x 10 turns + 3 barge-ins; 200 calls x 3 turns + 1 barge-in, ramped
//! over 2 s).
//!
//! The daemon runs in this process (as `sifucall demo` does) in AI mode, pointed at the fakes
//! of [`sifucall::sandbox`] configured with: segmentation silence 300 ms, STT final 150 ms
//! after it, LLM first token 300 ms then 50 tokens/s, TTS first audio 150 ms then 1.5x real
//! time. Every call is a small AudioSocket client written here (not `sifucall::caller`), so
//! each received frame gets its own arrival time: the caller's recording places frames
//! within a 20 ms tolerance, which is the very size of what is measured. It sends a frame
//! every 20 ms on an absolute schedule, each frame when its 20 ms have been "captured", as
//! Asterisk does; so the caller's speech end is exactly when the frame carrying its last
//! voiced sample is sent.
//!
//! The caller's speech is the Malay question fixture with its silences cut to whole frames:
//! from the first to the last 20 ms frame the fake STT calls voiced (> -40 dBFS, the fake's
//! own endpointer rule), zeros after that, so the end is sharp and the fake's segmentation
//! silence starts exactly there. The reply is a scripted three-sentence Malay reply.
//!
//! 1. Latency: from the caller's speech end to the first non-silent reply frame arriving at
//!    the caller, and the daemon's overhead = that minus the sum of the known provider
//!    delays: segmentation silence + STT final delay + LLM time to first token + the time
//!    the LLM needs to stream the first clause (the clause splitter releases it only when
//!    the token after its last one arrives: computed here by feeding the production
//!    [`ClauseSplitter`] the fake's tokens) + TTS first-byte delay. The overhead includes
//!    the playout clock: a reply frame goes out on the next 20 ms tick, 0-20 ms. Also the
//!    daemon's own per-stage marks (`TurnTiming`), and playout underruns. The fakes overshoot
//!    their configured delays (sleeps round up, chained steps, keep-alives), so "measured -
//!    known" charges their slack to the daemon; the fakes therefore record wall-clock marks
//!    (phrase heard/sent, LLM request arrival and each token's send, TTS text arrival and first
//!    audio) and each turn is split into the daemon's own gaps and the fakes' own time. To
//!    join the marks of one turn across the fakes, each phrase's transcript and each reply
//!    carry a unique number (the reply's first clause keeps its tokens).
//! 2. Barge-in: the caller talks over a reply; from the VAD's barge-in decision
//!    (`AgentReport::barge_in_ms`) to the last non-silent reply frame the caller receives.
//!    Daemon marks are ms since the session started; they are put on the caller's clock
//!    with the smallest (caller arrival - daemon `first_frame_ms`) of the call's turns.
//! 3. The sequential design of the user's earlier plan, for the same turn and the same
//!    fakes, measured here with direct HTTP against the fakes (a measurement of the old
//!    design, not production code): (a) the STT final (production Azure client against the
//!    fake Azure, same audio), (b) the whole LLM reply (the whole SSE stream, reqwest),
//!    (c) the whole reply synthesized by the non-streaming `POST /v1/text-to-speech/{voice}`,
//!    then (d) the first frame "sent" at once (no tick wait, in the baseline's favour). The
//!    fake's whole-file endpoint answers after its first-byte delay without the generation
//!    time a real service needs, which favours the baseline; so a second row drains the
//!    `/stream` endpoint instead (whole reply at the same 1.5x generation rate as the
//!    streamed run).
//!
//! Everything shares this machine's cores: the fakes and the callers load it too, so the
//! 200-call figures are an upper bound of the daemon's overhead. Figures for the notes, not
//! pass/fail assertions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use sifucall::app::{self, Hooks};
use sifucall::audio::{pcm, wav};
use sifucall::call::CallSummary;
use sifucall::call::clauses::ClauseSplitter;
use sifucall::ops::config::{AgentMode, Settings};
use sifucall::providers::stt::azure::AzureStt;
use sifucall::providers::stt::{SttEvent, SttParams, SttProvider};
use sifucall::sandbox::{Sandbox, SandboxConfig, elevenlabs};

const SPF: usize = 160;
const RATE: u32 = 8_000;
/// The fake STT's endpointer: a 20 ms block above this is speech.
const STT_SPEECH_DBFS: f64 = -40.0;
/// A received frame above this is agent audio (the caller observer's threshold).
const SILENCE_DBFS: f64 = -60.0;

const SEGMENTATION_MS: u64 = 300;
const STT_FINAL_MS: u64 = 150;
const LLM_TTFT_MS: u64 = 300;
const TOKENS_PER_SEC: f64 = 50.0;
const TTS_FIRST_BYTE_MS: u64 = 150;
const TTS_REALTIME: f64 = 1.5;

/// What the fake STT "hears".
const QUESTION_TEXT: &str = sifucall::demo::QUESTION_TEXT;
/// The scripted three-sentence reply (streamed run and baseline).
const REPLY: &str =
    "Pakej asas kami RM99 sebulan. Pakej premium pula RM199 sebulan. Ada soalan lain?";

/// Agent silence that ends a reply, for the caller's turn-taking.
const QUIET_MS: f64 = 900.0;
/// The caller barges in this long after the reply it interrupts starts.
const BARGE_AFTER_MS: f64 = 800.0;
/// A turn without a reply gives up after this.
const REPLY_TIMEOUT_MS: f64 = 10_000.0;

#[path = "common.rs"]
mod common;

fn main() {
    let Some(args) = common::bench_args("turn_latency") else {
        return;
    };
    let calls = common::list(&args, "--calls").unwrap_or_else(|| vec![1, 200]);
    let turns: Option<usize> = common::flag(&args, "--turns").and_then(|v| v.parse().ok());
    let barge_ins: Option<usize> = common::flag(&args, "--barge-ins").and_then(|v| v.parse().ok());
    let rt = common::runtime();
    rt.block_on(run_all(calls, turns, barge_ins));
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
    let tokens = fake_tokens(REPLY);
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

/// Reply `k`: [`REPLY`] with its first number replaced by a unique one (same tokens, same
/// first clause boundary), so the first clause text names the request it came from.
fn marked_reply(k: usize) -> String {
    REPLY.replacen("RM99", &format!("RM{}", 10_000 + k), 1)
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

fn sandbox_config(marked: bool) -> SandboxConfig {
    let mut c = SandboxConfig::default();
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
        vec![REPLY.into()]
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
// Statistics.

fn pct(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s.get(rank.clamp(1, s.len()) - 1).copied()
}

fn f(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

fn p50_99(v: &[f64]) -> String {
    format!("{} / {}", f(pct(v, 50.0)), f(pct(v, 99.0)))
}

// ---------------------------------------------------------------------------------------
// The caller.

#[derive(Debug, Clone)]
struct TurnObs {
    barge: bool,
    /// First frame of the utterance sent, ms on the caller's clock.
    start_ms: f64,
    /// The frame carrying the last voiced sample sent: the speech end.
    end_ms: f64,
    /// Frames written when the speech ended (the frame counter).
    end_k: u32,
    /// The frame completing the segmentation silence after `end_ms` written.
    seg_sent_ms: Option<f64>,
    /// First non-silent frame received after `end_ms` (or after `start_ms` for a barge-in,
    /// once the interrupted reply has been flushed: see `analyse`).
    first_reply_ms: Option<f64>,
}

#[derive(Debug, Default)]
struct CallerLog {
    call_id: Uuid,
    /// The caller clock's zero.
    origin: Option<std::time::Instant>,
    turns: Vec<TurnObs>,
    /// Arrival of every non-silent frame, ms on the caller's clock.
    voiced: Vec<f64>,
    frames_in: u64,
    max_send_lag_ms: f64,
    error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Greeting,
    Speaking { turn: usize, pos: usize },
    AwaitReply { turn: usize },
    BargeWait { until: f64 },
    Listening,
    Done { at: f64 },
}

/// One Asterisk: greeting, `turns` questions each answered in full, then `barge_ins`
/// questions each spoken over the reply to the one before.
async fn one_call(
    addr: SocketAddr,
    utt: Arc<Vec<i16>>,
    turns: usize,
    barge_ins: usize,
) -> CallerLog {
    let mut log = CallerLog {
        call_id: Uuid::new_v4(),
        ..CallerLog::default()
    };
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            log.error = Some(format!("connect: {e}"));
            return log;
        }
    };
    let _ = stream.set_nodelay(true);
    let origin = Instant::now();
    log.origin = Some(origin.into_std());
    let ms = |t: Instant| t.saturating_duration_since(origin).as_secs_f64() * 1000.0;
    let (mut rd, mut wr) = stream.into_split();
    let mut msg = vec![0x01, 0, 16];
    msg.extend_from_slice(log.call_id.as_bytes());
    if let Err(e) = wr.write_all(&msg).await {
        log.error = Some(format!("uuid: {e}"));
        return log;
    }
    let total = turns + barge_ins;
    let mut phase = Phase::Greeting;
    let mut k: u32 = 0;
    let mut buf = vec![0u8; 16 * 1024];
    let mut acc: Vec<u8> = Vec::new();
    let mut last_voiced = f64::NEG_INFINITY;
    let mut frame = vec![0x10u8, 0x01, 0x40];
    frame.resize(3 + SPF * 2, 0);
    let hard_stop = Duration::from_secs(30 + 15 * total as u64);
    loop {
        let due = origin + Duration::from_millis(20) * (k + 1);
        tokio::select! {
            () = sleep_until(due) => {
                let now = ms(Instant::now());
                log.max_send_lag_ms = log.max_send_lag_ms.max(now - ms(due));
                if origin.elapsed() > hard_stop {
                    log.error = Some("call did not finish in time".into());
                    break;
                }
                let quiet = now - last_voiced >= QUIET_MS;
                // Decide what this frame carries.
                phase = match phase {
                    Phase::Greeting if now > 1_000.0 && quiet => Phase::Speaking { turn: 0, pos: 0 },
                    Phase::Listening if quiet => {
                        let next = log.turns.len();
                        if next < total { Phase::Speaking { turn: next, pos: 0 } } else { Phase::Done { at: now } }
                    }
                    Phase::BargeWait { until } if now >= until => Phase::Speaking { turn: log.turns.len(), pos: 0 },
                    Phase::AwaitReply { turn } => {
                        let t = &log.turns[turn];
                        if t.first_reply_ms.is_some() {
                            if log.turns.len() >= turns && log.turns.len() < total {
                                Phase::BargeWait { until: t.first_reply_ms.unwrap_or(now) + BARGE_AFTER_MS }
                            } else {
                                Phase::Listening
                            }
                        } else if now - t.end_ms > REPLY_TIMEOUT_MS {
                            Phase::Listening
                        } else {
                            phase
                        }
                    }
                    Phase::Done { at } if now - at > 300.0 => break,
                    p => p,
                };
                let payload = &mut frame[3..];
                payload.fill(0);
                if let Phase::Speaking { turn, pos } = phase {
                    if pos == 0 {
                        log.turns.push(TurnObs { barge: turn >= turns, start_ms: now, end_ms: 0.0, end_k: 0, seg_sent_ms: None, first_reply_ms: None });
                    }
                    let chunk = &utt[pos * SPF..(pos + 1) * SPF];
                    for (b, s) in payload.chunks_exact_mut(2).zip(chunk) {
                        b.copy_from_slice(&s.to_le_bytes());
                    }
                }
                if let Err(e) = wr.write_all(&frame).await {
                    log.error = Some(format!("write: {e}"));
                    break;
                }
                k += 1;
                let seg_frames = (SEGMENTATION_MS / 20) as u32;
                if let Some(t) = log.turns.last_mut()
                    && t.end_k > 0
                    && t.seg_sent_ms.is_none()
                    && k - t.end_k == seg_frames
                {
                    t.seg_sent_ms = Some(ms(Instant::now()));
                }
                if let Phase::Speaking { turn, pos } = phase {
                    if (pos + 1) * SPF >= utt.len() {
                        log.turns[turn].end_ms = ms(Instant::now());
                        log.turns[turn].end_k = k;
                        phase = Phase::AwaitReply { turn };
                    } else {
                        phase = Phase::Speaking { turn, pos: pos + 1 };
                    }
                }
            }
            r = rd.read(&mut buf) => {
                let n = match r {
                    Ok(0) => { log.error = Some("server closed".into()); break; }
                    Err(e) => { log.error = Some(format!("read: {e}")); break; }
                    Ok(n) => n,
                };
                let now = ms(Instant::now());
                acc.extend_from_slice(&buf[..n]);
                let mut at = 0;
                while acc.len() - at >= 3 {
                    let kind = acc[at];
                    let len = usize::from(u16::from_be_bytes([acc[at + 1], acc[at + 2]]));
                    if acc.len() - at < 3 + len {
                        break;
                    }
                    if kind == 0x10 {
                        log.frames_in += 1;
                        let samples = pcm::le_bytes_to_samples(&acc[at + 3..at + 3 + len]);
                        if pcm::dbfs(&samples) > SILENCE_DBFS {
                            log.voiced.push(now);
                            last_voiced = now;
                            if let Phase::AwaitReply { turn } = phase {
                                let t = &mut log.turns[turn];
                                if t.first_reply_ms.is_none() {
                                    t.first_reply_ms = Some(now);
                                }
                            }
                        }
                    } else if kind == 0x00 {
                        log.error = Some("server hung up".into());
                    }
                    at += 3 + len;
                }
                acc.drain(..at);
            }
        }
    }
    log
}

// ---------------------------------------------------------------------------------------
// One scenario.

#[derive(Debug, Default)]
struct Results {
    calls: usize,
    calls_failed: usize,
    turns_attempted: usize,
    e2e: Vec<f64>,
    overhead: Vec<f64>,
    vad_lag: Vec<f64>,
    stt: Vec<f64>,
    llm: Vec<f64>,
    tts: Vec<f64>,
    tick: Vec<f64>,
    wire: Vec<f64>,
    unmatched_calls: usize,
    underruns: u64,
    inbound_dropped: u64,
    barge_attempted: usize,
    barge_decided: usize,
    barge_detect: Vec<f64>,
    barge_flush: Vec<f64>,
    barge_frames_after: Vec<f64>,
    max_send_lag_ms: f64,
    errors: Vec<String>,
    att: Attribution,
}

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
    /// Fake TTS: trigger text -> first audio message sent (configured first byte).
    fake_tts: Vec<f64>,
    /// First audio message sent -> first non-silent frame at the caller.
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
fn attribute(logs: &[CallerLog], fakes: &FakeMarks, known: &Known, a: &mut Attribution) {
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
        let Some(origin) = log.origin else { continue };
        let normal: Vec<(usize, &TurnObs)> = log
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
                    seg_sent: t.seg_sent_ms?,
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

async fn scenario(
    n: usize,
    turns: usize,
    barge_ins: usize,
    known: &Known,
    utt: Arc<Vec<i16>>,
) -> Results {
    let sandbox = Sandbox::start(sandbox_config(true))
        .await
        .expect("fake providers");
    let mut settings = Settings::defaults();
    settings.agent.mode = AgentMode::Ai;
    settings.audiosocket.listen = "127.0.0.1:0".parse().expect("literal");
    settings.admin.listen = "127.0.0.1:0".parse().expect("literal");
    settings.audiosocket.max_calls = n + 10;
    settings.stt.segmentation_silence_ms = SEGMENTATION_MS as u32;
    sandbox.point(&mut settings);

    let shutdown = CancellationToken::new();
    let (bound_tx, bound_rx) = oneshot::channel();
    let (sum_tx, mut sum_rx) = mpsc::unbounded_channel::<CallSummary>();
    let hooks = Hooks {
        on_bound: Some(bound_tx),
        on_call_end: Some(Arc::new(move |s: CallSummary| {
            let _ = sum_tx.send(s);
        })),
    };
    let daemon = tokio::spawn(app::run(settings, shutdown.clone(), hooks));
    let bound = bound_rx.await.expect("daemon started");

    let start = Instant::now() + Duration::from_millis(100);
    let ramp = if n > 1 {
        Duration::from_secs(2)
    } else {
        Duration::ZERO
    };
    let mut tasks = Vec::new();
    for i in 0..n {
        let offset = ramp * u32::try_from(i).unwrap_or(0) / u32::try_from(n).unwrap_or(1);
        let utt = Arc::clone(&utt);
        let addr = bound.audiosocket;
        tasks.push(tokio::spawn(async move {
            sleep_until(start + offset).await;
            one_call(addr, utt, turns, barge_ins).await
        }));
    }
    let mut logs = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            logs.push(l);
        }
    }
    let mut summaries: HashMap<Uuid, CallSummary> = HashMap::new();
    while summaries.len() < logs.len() {
        match tokio::time::timeout(Duration::from_secs(5), sum_rx.recv()).await {
            Ok(Some(s)) => {
                if let Some(id) = s.call_id {
                    summaries.insert(id, s);
                }
            }
            _ => break,
        }
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), daemon).await;
    let fakes = FakeMarks {
        phrases: sandbox.azure.stats().phrase_times,
        llm: sandbox.openrouter.request_times(),
        tts: sandbox.elevenlabs.stats().session_times(),
        llm_connections: sandbox.openrouter.connections(),
    };
    drop(sandbox);

    let mut r = Results {
        calls: n,
        ..Results::default()
    };
    for log in &logs {
        analyse(log, summaries.get(&log.call_id), known, &mut r);
    }
    r.calls_failed += n - logs.len();
    attribute(&logs, &fakes, known, &mut r.att);
    r.att.llm_connections = (fakes.llm_connections, fakes.llm.len());
    r
}

fn analyse(log: &CallerLog, summary: Option<&CallSummary>, known: &Known, r: &mut Results) {
    r.max_send_lag_ms = r.max_send_lag_ms.max(log.max_send_lag_ms);
    if let Some(e) = &log.error {
        r.calls_failed += 1;
        if r.errors.len() < 5 {
            r.errors.push(e.clone());
        }
    }
    let normal: Vec<&TurnObs> = log.turns.iter().filter(|t| !t.barge).collect();
    r.turns_attempted += normal.len();
    for t in &normal {
        if let Some(first) = t.first_reply_ms {
            r.e2e.push(first - t.end_ms);
            r.overhead.push(first - t.end_ms - known.sum_ms);
        }
    }
    let Some(s) = summary else {
        r.unmatched_calls += 1;
        return;
    };
    r.underruns += s.underruns;
    r.inbound_dropped += s.inbound_dropped;
    let agent = s.agent.clone().unwrap_or_default();
    // One daemon turn per caller utterance, in order; otherwise the marks cannot be paired.
    if agent.turns.len() != log.turns.len() {
        r.unmatched_calls += 1;
        return;
    }
    let pairs: Vec<(&TurnObs, &sifucall::ops::records::TurnTiming)> =
        log.turns.iter().zip(&agent.turns).collect();
    // Daemon ms -> caller ms: the smallest (arrival - daemon first-frame mark) of the call.
    let offset = pairs
        .iter()
        .filter(|(c, _)| !c.barge)
        .filter_map(|(c, d)| Some(c.first_reply_ms? - d.first_frame_ms? as f64))
        .fold(f64::INFINITY, f64::min);
    if !offset.is_finite() {
        r.unmatched_calls += 1;
        return;
    }
    let d = |a: Option<u64>, b: Option<u64>| Some(b? as f64 - a? as f64);
    for (c, t) in pairs.iter().filter(|(c, _)| !c.barge) {
        if let Some(v) = t.speech_end_ms {
            r.vad_lag.push(v as f64 + offset - c.end_ms);
        }
        r.stt.extend(d(t.speech_end_ms, t.stt_final_ms));
        r.llm.extend(d(t.stt_final_ms, t.llm_first_token_ms));
        r.tts.extend(d(t.llm_first_token_ms, t.tts_first_audio_ms));
        r.tick.extend(d(t.tts_first_audio_ms, t.first_frame_ms));
        if let (Some(first), Some(ff)) = (c.first_reply_ms, t.first_frame_ms) {
            r.wire.push(first - (ff as f64 + offset));
        }
    }
    // Barge-ins: each barge-in utterance interrupts the reply before it.
    for (i, c) in log.turns.iter().enumerate().filter(|(_, c)| c.barge) {
        r.barge_attempted += 1;
        let window_end = c.end_ms + 400.0;
        let decision = agent
            .barge_in_ms
            .iter()
            .map(|&b| b as f64 + offset)
            .find(|&b| b >= c.start_ms && b <= window_end);
        let Some(dec) = decision else { continue };
        r.barge_decided += 1;
        r.barge_detect.push(dec - c.start_ms);
        // Agent audio of the interrupted reply: from the barge-in start until this
        // utterance's own reply begins (it cannot begin before its speech end).
        let next_reply = log.turns[i].first_reply_ms.unwrap_or(f64::INFINITY);
        let tail: Vec<f64> = log
            .voiced
            .iter()
            .copied()
            .filter(|&a| a >= c.start_ms && a < next_reply.min(c.end_ms + 300.0))
            .collect();
        if let Some(&last) = tail.last() {
            r.barge_flush.push(last - dec);
        }
        r.barge_frames_after
            .push(tail.iter().filter(|&&a| a > dec).count() as f64);
    }
}

// ---------------------------------------------------------------------------------------
// The sequential baseline.

#[derive(Debug, Default)]
struct Baseline {
    stt: Vec<f64>,
    llm: Vec<f64>,
    tts_file: Vec<f64>,
    tts_stream: Vec<f64>,
    first_audio_file: Vec<f64>,
    first_audio_stream: Vec<f64>,
    errors: Vec<String>,
}

/// The whole SSE stream; returns the reply text.
async fn whole_llm_reply(
    client: &reqwest::Client,
    settings: &Settings,
    base: &str,
) -> Result<String, String> {
    let body = serde_json::json!({
        "model": settings.llm.model,
        "stream": true,
        "max_tokens": settings.llm.max_tokens,
        "messages": [
            {"role": "system", "content": settings.agent.system_prompt},
            {"role": "user", "content": QUESTION_TEXT},
        ],
    });
    let resp = client
        .post(format!("{base}/chat/completions"))
        .bearer_auth("sandbox")
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let text = resp.text().await.map_err(|e| e.to_string())?;
    let mut reply = String::new();
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if let Some(c) = v
            .pointer("/choices/0/delta/content")
            .and_then(|c| c.as_str())
        {
            reply.push_str(c);
        }
    }
    Ok(reply)
}

async fn whole_tts(
    client: &reqwest::Client,
    settings: &Settings,
    base: &str,
    leaf: &str,
    text: &str,
) -> Result<usize, String> {
    let resp = client
        .post(format!(
            "{base}/v1/text-to-speech/{}{leaf}?output_format=ulaw_8000",
            settings.tts.voice_id
        ))
        .header("xi-api-key", "sandbox")
        .json(&serde_json::json!({"text": text, "model_id": settings.tts.model_id}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("TTS HTTP {}", resp.status()));
    }
    Ok(resp.bytes().await.map_err(|e| e.to_string())?.len())
}

async fn baseline(turns: usize, utt: Arc<Vec<i16>>) -> Baseline {
    let mut out = Baseline::default();
    let sandbox = Sandbox::start(sandbox_config(false))
        .await
        .expect("fake providers");
    let mut settings = Settings::defaults();
    sandbox.point(&mut settings);
    let stt = match AzureStt::from_settings(&settings) {
        Ok(s) => s,
        Err(e) => {
            out.errors.push(e.to_string());
            return out;
        }
    };
    let mut session = match stt
        .start(SttParams {
            language: settings.agent.language.clone(),
            sample_rate: RATE,
            segmentation_silence_ms: SEGMENTATION_MS as u32,
            call_id: Uuid::new_v4().to_string(),
        })
        .await
    {
        Ok(s) => s,
        Err(e) => {
            out.errors.push(e.to_string());
            return out;
        }
    };
    let client = reqwest::Client::new();
    let llm_base = sandbox.openrouter.base_url();
    let tts_base = sandbox.elevenlabs.base_url();
    let expected_samples = elevenlabs::speech_samples(REPLY, RATE);
    for _ in 0..turns {
        // (a) Speak in real time, frames sent when captured; silence until the final.
        let origin = Instant::now();
        let mut k: u32 = 0;
        let frames = utt.len() / SPF;
        let mut end = None;
        let final_at = loop {
            let due = origin + Duration::from_millis(20) * (k + 1);
            tokio::select! {
                () = sleep_until(due) => {
                    let idx = k as usize;
                    let chunk = if idx < frames { utt[idx * SPF..(idx + 1) * SPF].to_vec() } else { vec![0; SPF] };
                    let _ = session.audio.send(chunk).await;
                    if idx + 1 == frames {
                        end = Some(Instant::now());
                    }
                    k += 1;
                    if k > 500 { break None; }
                }
                ev = session.events.recv() => match ev {
                    Some(SttEvent::Final { .. }) if end.is_some() => break Some(Instant::now()),
                    Some(_) => {}
                    None => break None,
                },
            }
        };
        let (Some(end), Some(final_at)) = (end, final_at) else {
            out.errors.push("no STT final".into());
            continue;
        };
        // (b) The whole reply.
        let reply = match whole_llm_reply(&client, &settings, &llm_base).await {
            Ok(r) => r,
            Err(e) => {
                out.errors.push(e);
                continue;
            }
        };
        let llm_done = Instant::now();
        // (c) The whole file; (d) its first frame is "sent" now.
        let bytes = whole_tts(&client, &settings, &tts_base, "", &reply).await;
        let file_done = Instant::now();
        // (c') The same reply at the TTS generation rate (the /stream endpoint, drained).
        let t0 = Instant::now();
        let streamed = whole_tts(&client, &settings, &tts_base, "/stream", &reply).await;
        let stream_dur = t0.elapsed();
        match (bytes, streamed) {
            (Ok(a), Ok(b)) if a == expected_samples && b == expected_samples => {}
            (a, b) => out
                .errors
                .push(format!("TTS sizes {a:?} {b:?}, want {expected_samples}")),
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        out.stt.push(ms(final_at - end));
        out.llm.push(ms(llm_done - final_at));
        out.tts_file.push(ms(file_done - llm_done));
        out.tts_stream.push(ms(stream_dur));
        out.first_audio_file.push(ms(file_done - end));
        out.first_audio_stream
            .push(ms(llm_done - end) + ms(stream_dur));
    }
    out
}

// ---------------------------------------------------------------------------------------

async fn run_all(calls: Vec<usize>, turns: Option<usize>, barge_ins: Option<usize>) {
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
    println!("| **sum** | **{:.0}** |", known.sum_ms);
    println!(
        "\nCaller utterance {:.0} ms; reply {:?} = {:.0} ms of audio; TTS {TTS_REALTIME}x real time, 100 ms chunks.",
        utt.len() as f64 / 8.0,
        REPLY,
        elevenlabs::speech_samples(REPLY, RATE) as f64 / 8.0
    );

    let mut results = Vec::new();
    for &n in &calls {
        let t = turns.unwrap_or(if n == 1 { 10 } else { 3 });
        let b = barge_ins.unwrap_or(if n == 1 { 3 } else { 1 });
        let r = scenario(n, t, b, &known, Arc::clone(&utt)).await;
        results.push(r);
    }

    println!("\n## 1. Speech end -> first reply frame at the caller (ms)\n");
    println!(
        "| calls | turns (replied/asked) | speech end -> first frame p50 / p99 | daemon overhead p50 / p99 / max | underruns | inbound dropped | failed calls | unpaired calls | caller send lag max |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {}/{} | {} | {} / {} | {} | {} | {} | {} | {:.1} |",
            r.calls,
            r.e2e.len(),
            r.turns_attempted,
            p50_99(&r.e2e),
            p50_99(&r.overhead),
            f(pct(&r.overhead, 100.0)),
            r.underruns,
            r.inbound_dropped,
            r.calls_failed,
            r.unmatched_calls,
            r.max_send_lag_ms
        );
    }
    println!(
        "\nOverhead = measured - {:.0} ms of known provider delays; it includes the 0-20 ms wait for the next playout tick.",
        known.sum_ms
    );
    println!("\n### Per-stage, from the daemon's own turn marks (p50 / p99 ms)\n");
    println!(
        "| calls | caller speech end -> VAD speech end | VAD end -> STT final (known {}) | STT final -> LLM 1st token (known {}) | LLM 1st token -> TTS 1st audio (known {:.0}) | TTS 1st audio -> 1st frame (tick, 0-20) | 1st frame mark -> arrival at caller |",
        SEGMENTATION_MS + STT_FINAL_MS,
        LLM_TTFT_MS,
        known.clause_ms + TTS_FIRST_BYTE_MS as f64
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.calls,
            p50_99(&r.vad_lag),
            p50_99(&r.stt),
            p50_99(&r.llm),
            p50_99(&r.tts),
            p50_99(&r.tick),
            p50_99(&r.wire)
        );
    }
    println!(
        "\n(Daemon marks are ms since the session started, put on the caller's clock with the call's smallest first-frame arrival - mark; the last column is therefore >= 0 by construction and shows its spread.)"
    );

    println!("\n### Daemon's own time per turn (p50 / p99 / max, ms), from the fakes' own marks\n");
    println!(
        "Each stage is timed between two instants in this process: the caller's frame writes and arrivals, and what the fakes recorded (audio received, phrase sent, request arrived, each token handed to the body, TTS text arrived, first audio sent). The fakes' own time (their real overshoot of the configured delays) is thereby separated from the daemon's.\n"
    );
    let pmm = |v: &[f64]| {
        format!(
            "{:.1} / {:.1} / {:.1}",
            pct(v, 50.0).unwrap_or(f64::NAN),
            pct(v, 99.0).unwrap_or(f64::NAN),
            pct(v, 100.0).unwrap_or(f64::NAN)
        )
    };
    println!(
        "| calls | turns joined (unjoined) | (a) caller frame completing the silence -> fake STT | (b) phrase sent -> LLM request arrives | (c) clause-releasing token sent -> clause text at fake TTS | (d) first TTS audio sent -> first frame at caller (incl. 0-20 tick) | **daemon sum** |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        let a = &r.att;
        println!(
            "| {} | {} ({}) | {} | {} | {} | {} | **{}** |",
            r.calls,
            a.turns,
            a.unjoined,
            pmm(&a.audio_seg),
            pmm(&a.phrase_to_llm),
            pmm(&a.clause_to_tts),
            pmm(&a.audio_out),
            pmm(&a.daemon_sum)
        );
    }
    for r in &results {
        println!(
            "\n{} calls: the fake LLM accepted {} TCP connections for {} requests.",
            r.calls, r.att.llm_connections.0, r.att.llm_connections.1
        );
    }
    println!(
        "\n### The fakes' own time per turn (p50 / p99 / max, ms) against their configuration\n"
    );
    println!(
        "| calls | STT final (cfg {STT_FINAL_MS}) | LLM first token (cfg {LLM_TTFT_MS}) | LLM first token -> clause-releasing token #{} (cfg {:.0}) | TTS first audio (cfg {TTS_FIRST_BYTE_MS}) | caller's silence + fakes, sum (cfg {:.0}) | fakes' overshoot | measured - daemon - fakes (check, ~0) | caller last voiced frame -> fake STT |",
        known.release_token, known.clause_ms, known.sum_ms
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let a = &r.att;
        let over: Vec<f64> = a.fake_sum.iter().map(|v| v - known.sum_ms).collect();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.calls,
            pmm(&a.fake_stt),
            pmm(&a.fake_ttft),
            pmm(&a.fake_clause),
            pmm(&a.fake_tts),
            pmm(&a.fake_sum),
            pmm(&over),
            pmm(&a.residual),
            pmm(&a.audio_speech)
        );
    }

    println!("\n## 2. Barge-in flush\n");
    println!(
        "| calls | barge-ins decided/attempted | caller speech start -> VAD decision p50 / p99 | decision -> last agent frame at caller p50 / p99 / max | agent frames after decision p50 / max |"
    );
    println!("|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {}/{} | {} | {} / {} | {} / {} |",
            r.calls,
            r.barge_decided,
            r.barge_attempted,
            p50_99(&r.barge_detect),
            p50_99(&r.barge_flush),
            f(pct(&r.barge_flush, 100.0)),
            f(pct(&r.barge_frames_after, 50.0)),
            f(pct(&r.barge_frames_after, 100.0))
        );
    }
    println!(
        "\n(Negative: the last agent frame had already arrived when the VAD decided, e.g. the reply was in a pause.)"
    );
    for r in &results {
        if !r.errors.is_empty() {
            println!("\n{} calls: errors {:?}", r.calls, r.errors);
        }
    }

    let bt = turns.unwrap_or(10).min(10);
    let b = baseline(bt, Arc::clone(&utt)).await;
    let streamed = results
        .iter()
        .min_by_key(|r| r.calls)
        .and_then(|r| pct(&r.e2e, 50.0));
    println!(
        "\n## 3. Streamed pipeline vs the sequential design ({} turns)\n",
        b.stt.len()
    );
    println!("| design | speech end -> first audio p50 / p99 (ms) | baseline / streamed (p50) |");
    println!("|---|---|---|");
    println!(
        "| streamed (daemon, {} call scenario) | {} | 1.00 |",
        results.iter().map(|r| r.calls).min().unwrap_or(0),
        results
            .iter()
            .min_by_key(|r| r.calls)
            .map_or("-".into(), |r| p50_99(&r.e2e))
    );
    let ratio = |v: &[f64]| match (pct(v, 50.0), streamed) {
        (Some(a), Some(s)) if s > 0.0 => format!("{:.2}", a / s),
        _ => "-".into(),
    };
    println!(
        "| sequential: STT final, whole LLM reply, whole file (`POST /v1/text-to-speech/{{voice}}`) | {} | {} |",
        p50_99(&b.first_audio_file),
        ratio(&b.first_audio_file)
    );
    println!(
        "| sequential, whole reply at the TTS generation rate ({TTS_REALTIME}x, `/stream` drained) | {} | {} |",
        p50_99(&b.first_audio_stream),
        ratio(&b.first_audio_stream)
    );
    println!(
        "\nSequential steps p50 / p99 (ms): speech end -> STT final {}; whole LLM reply {}; whole file {}; whole reply via /stream {}.",
        p50_99(&b.stt),
        p50_99(&b.llm),
        p50_99(&b.tts_file),
        p50_99(&b.tts_stream)
    );
    if !b.errors.is_empty() {
        println!("Baseline errors: {:?}", b.errors);
    }
}
