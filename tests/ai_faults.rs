//! Whole AI calls while a provider fails: the call always goes on. The caller hears the
//! apology (`agent.apology`, cached at startup) instead of silence, the daemon keeps sending
//! frames, nothing it sends breaks the AudioSocket protocol, and a later turn works once the
//! fault is over.

mod common;

use common::ai::*;
use sifucall::audiosocket::Digit;
use sifucall::call::CallSummary;
use sifucall::caller::{CallReport, ClosedBy};
use sifucall::ops::metrics::EndReason;
use sifucall::ops::records::Role;
use sifucall::sandbox::SandboxConfig;
use sifucall::sandbox::azure::AzureFault;
use sifucall::sandbox::elevenlabs::{LaterTtsFault, TtsFault};
use sifucall::sandbox::openrouter::LlmFault;
use std::time::Duration;

const RATE: u32 = 8_000;
/// Requests the prompt cache makes at startup: greeting, apology and hold at 8 and 16 kHz.
const PRELOAD_REQUESTS: usize = 6;

/// The caller asks the question twice, `gap_ms` apart, then listens for `tail_ms` and hangs up.
struct TwoTurns {
    report: CallReport,
    summary: CallSummary,
    first: Span,
    second: Span,
}

async fn two_turns(d: &mut AiDaemon, gap_ms: u64, tail_ms: u64) -> TwoTurns {
    let q = phrase_8k();
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    let first = t.say(&q);
    t.silence_ms(gap_ms);
    let second = t.say(&q);
    let report = d.place(d.call_then_hang_up(&t, tail_ms)).await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(
        report.closed_by,
        ClosedBy::Caller,
        "the daemon kept the call up: {report:?}"
    );
    assert_not_dropped(&summary);
    TwoTurns {
        report,
        summary,
        first,
        second,
    }
}

/// The caller, not the daemon, ended the call. (When the caller closes with audio still
/// unread the kernel resets the connection, which the daemon reports as an I/O error.)
#[track_caller]
fn assert_not_dropped(summary: &CallSummary) {
    assert!(
        matches!(summary.reason, EndReason::CallerHangup | EndReason::IoError),
        "{:?} {:?}",
        summary.reason,
        summary.detail
    );
}

fn sandbox(f: impl FnOnce(&mut SandboxConfig)) -> SandboxConfig {
    let mut sb = fast_sandbox();
    sb.azure.transcripts = vec![QUESTION.into()];
    f(&mut sb);
    sb
}

fn caller_and_agent(summary: &CallSummary) -> Vec<(Role, String)> {
    lines(&agent(summary))
}

fn q() -> (Role, String) {
    (Role::Caller, QUESTION.to_owned())
}
fn says(text: &str) -> (Role, String) {
    (Role::Agent, text.to_owned())
}

// ---- a. LLM HTTP errors ------------------------------------------------------------------------

async fn llm_500_on_every_request_gets_the_apology_each_turn() {
    let mut d = start(
        sandbox(|s| s.openrouter.fault = LlmFault::Status(500)),
        settings(),
    )
    .await;
    let apology_ms = speech_ms(APOLOGY, RATE);
    let r = two_turns(&mut d, apology_ms + 1_500, apology_ms + 1_500).await;
    assert_eq!(
        caller_and_agent(&r.summary),
        [says(GREETING), q(), says(APOLOGY), q(), says(APOLOGY)]
    );
    let rec = &r.report.recording;
    assert_heard_all(
        loud_samples(segment(rec, r.first.end, r.second.start)),
        expected_loud(APOLOGY, RATE),
        "first apology",
    );
    assert_heard_all(
        loud_samples(segment(rec, r.second.end, rec.len())),
        expected_loud(APOLOGY, RATE),
        "second apology",
    );
    // One retry per turn, then the apology.
    assert_eq!(d.llm_requests().len(), 4);
    assert!(!agent(&r.summary).errors.is_empty());
    d.stop().await;
}

async fn llm_429_once_is_retried_transparently() {
    let mut d = start(
        sandbox(|s| s.openrouter.fault = LlmFault::StatusOnce(429)),
        settings(),
    )
    .await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    let question = t.say(&phrase_8k());
    // Retry-After: 1 s, then the reply.
    let report = d
        .place(d.call_then_hang_up(&t, speech_ms(REPLY, RATE) + 2_500))
        .await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(
        caller_and_agent(&summary),
        [says(GREETING), q(), says(REPLY)]
    );
    assert!(agent(&summary).errors.is_empty());
    let reqs = d.llm_requests();
    assert_eq!(reqs.len(), 2, "the 429 and its retry");
    assert_eq!(reqs[0], reqs[1], "the retry is the same request");
    assert_heard_all(
        loud_samples(segment(
            &report.recording,
            question.end,
            report.recording.len(),
        )),
        expected_loud(REPLY, RATE),
        "reply after the retry",
    );
    d.stop().await;
}

// ---- b. LLM stall before the first token ---------------------------------------------------

async fn llm_stall_gets_the_hold_prompt_then_the_apology() {
    let mut s = settings();
    s.llm.first_token_timeout_ms = 800;
    s.agent.hold_after_ms = 300;
    let mut d = start(
        sandbox(|s| s.openrouter.fault = LlmFault::StallBeforeFirstToken),
        s,
    )
    .await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    let question = t.say(&phrase_8k());
    let report = d
        .place(d.call_then_hang_up(&t, speech_ms(HOLD, RATE) + speech_ms(APOLOGY, RATE) + 3_000))
        .await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(report.closed_by, ClosedBy::Caller);
    // The hold phrase is not part of the transcript; the caller heard it and the apology.
    assert_eq!(
        caller_and_agent(&summary),
        [says(GREETING), q(), says(APOLOGY)]
    );
    let after = segment(&report.recording, question.end, report.recording.len());
    assert_heard_all(
        loud_samples(after),
        expected_loud(HOLD, RATE) + expected_loud(APOLOGY, RATE),
        "hold prompt and apology",
    );
    // The hold phrase came first: the first sound after the question is as long as it.
    let first = first_loud(after).expect("the agent spoke");
    let hold_len = sifucall::sandbox::elevenlabs::speech_samples(HOLD, RATE);
    assert_heard_all(
        loud_samples(segment(after, first, first + hold_len)),
        expected_loud(HOLD, RATE),
        "hold prompt first",
    );
    d.stop().await;
}

// ---- c, d. LLM stream failures after tokens ------------------------------------------------

async fn llm_error_mid_stream_keeps_what_was_said_then_apologises() {
    const FIRST: &str = "Baik, harga pakej asas ialah RM99 sebulan.";
    const REST: &str = " Pakej premium pula RM199 sebulan.";
    let mut d = start(
        sandbox(|s| {
            s.openrouter.replies = vec![format!("{FIRST}{REST}")];
            // Seven tokens make the first sentence; the error comes two tokens later, long
            // after the sentence went to TTS (which answers at once here).
            s.openrouter.fault = LlmFault::MidStreamError { after_tokens: 9 };
            s.openrouter.tokens_per_sec = 5.0;
            s.elevenlabs.realtime_factor = 0.0;
        }),
        settings(),
    )
    .await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    let question = t.say(&phrase_8k());
    let report = d
        .place(d.call_then_hang_up(
            &t,
            speech_ms(FIRST, RATE) + speech_ms(APOLOGY, RATE) + 3_000,
        ))
        .await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(
        caller_and_agent(&summary),
        [says(GREETING), q(), says(FIRST), says(APOLOGY)]
    );
    assert_heard_all(
        loud_samples(segment(
            &report.recording,
            question.end,
            report.recording.len(),
        )),
        expected_loud(FIRST, RATE) + expected_loud(APOLOGY, RATE),
        "the first sentence, then the apology",
    );
    assert_eq!(d.llm_requests().len(), 1, "no retry once text was produced");
    d.stop().await;
}

async fn stream_failure_apologises(fault: LlmFault) {
    let mut d = start(sandbox(|s| s.openrouter.fault = fault), settings()).await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    t.say(&phrase_8k());
    let report = d
        .place(d.call_then_hang_up(&t, speech_ms(APOLOGY, RATE) + 2_500))
        .await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(report.closed_by, ClosedBy::Caller);
    let l = caller_and_agent(&summary);
    assert_eq!(l.last(), Some(&says(APOLOGY)), "{fault:?}: {l:?}");
    assert!(!agent(&summary).errors.is_empty());
    d.stop().await;
}

// ---- e. TTS failures after the prompts were cached -----------------------------------------

async fn tts_fails_after_startup(then: LaterTtsFault) -> (AiDaemon, TwoTurns) {
    let mut s = settings();
    s.tts.first_byte_timeout_ms = 700;
    let mut d = start(
        sandbox(|s| {
            s.elevenlabs.fault = TtsFault::AfterRequests {
                ok: PRELOAD_REQUESTS,
                then,
            }
        }),
        s,
    )
    .await;
    let apology_ms = speech_ms(APOLOGY, RATE);
    // A stalled stream is given up after tts.first_byte_timeout_ms.
    let r = two_turns(&mut d, apology_ms + 2_000, apology_ms + 2_000).await;
    (d, r)
}

async fn tts_key_revoked_apologises_from_the_cache() {
    let (d, r) = tts_fails_after_startup(LaterTtsFault::Status(401)).await;
    assert_eq!(
        caller_and_agent(&r.summary),
        [says(GREETING), q(), says(APOLOGY), q(), says(APOLOGY)]
    );
    let rec = &r.report.recording;
    assert_heard_all(
        loud_samples(segment(rec, r.first.end, r.second.start)),
        expected_loud(APOLOGY, RATE),
        "apology from the cache",
    );
    d.stop().await;
}

async fn tts_stall_apologises() {
    let (d, r) = tts_fails_after_startup(LaterTtsFault::StallAfterChunks(1)).await;
    let l = caller_and_agent(&r.summary);
    assert_eq!(l.last(), Some(&says(APOLOGY)), "{l:?}");
    assert_eq!(
        l.iter().filter(|x| **x == says(APOLOGY)).count(),
        2,
        "{l:?}"
    );
    d.stop().await;
}

async fn tts_closing_mid_stream_apologises() {
    let (d, r) = tts_fails_after_startup(LaterTtsFault::CloseAfterChunks(1)).await;
    let l = caller_and_agent(&r.summary);
    assert_eq!(
        l.iter().filter(|x| **x == says(APOLOGY)).count(),
        2,
        "{l:?}"
    );
    d.stop().await;
}

// ---- f. STT ------------------------------------------------------------------------------------

async fn stt_connection_closed_by_the_service_reconnects_and_answers() {
    // Every connection is closed 3 s after it opens: the first in the middle of the question.
    let mut d = start(
        sandbox(|s| s.azure.fault = AzureFault::CloseAfterMs(3_000)),
        settings(),
    )
    .await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    let question = t.say(&question_8k());
    assert!(question.start < 3 * RATE as usize && question.end > 3 * RATE as usize);
    let report = d
        .place(d.call_then_hang_up(&t, speech_ms(REPLY, RATE) + 2_000))
        .await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert!(d.sandbox.azure.stats().connections >= 2, "it reconnected");
    assert_eq!(
        caller_and_agent(&summary),
        [says(GREETING), q(), says(REPLY)]
    );
    assert_heard_all(
        loud_samples(segment(
            &report.recording,
            question.end,
            report.recording.len(),
        )),
        expected_loud(REPLY, RATE),
        "reply",
    );
    d.stop().await;
}

async fn stt_rejecting_the_key_apologises_and_keeps_the_call() {
    let mut d = start(
        sandbox(|s| s.azure.fault = AzureFault::RejectAuth),
        settings(),
    )
    .await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    let report = d
        .place(d.call_then_hang_up(&t, speech_ms(APOLOGY, RATE) + 4_000))
        .await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(report.closed_by, ClosedBy::Caller, "the call stayed up");
    assert!(d.sandbox.azure.stats().rejected_auth >= 1);
    // Once per outage, not at every reconnect attempt.
    assert_eq!(caller_and_agent(&summary), [says(GREETING), says(APOLOGY)]);
    assert_heard_all(
        loud_samples(&report.recording),
        expected_loud(GREETING, RATE) + expected_loud(APOLOGY, RATE),
        "greeting and apology",
    );
    d.stop().await;
}

// ---- g. one failing call does not affect another ---------------------------------------------

/// Both calls share one daemon and one set of fakes. The LLM fails (HTTP 500) only for
/// requests whose user text is a keypad entry, so the call that only presses keys fails at
/// every turn while the call that speaks is served normally, concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_call_does_not_affect_a_healthy_one() {
    let mut sb = fast_sandbox();
    sb.openrouter.fault = LlmFault::Status(500);
    sb.openrouter.fault_only_for = Some("kekunci".into());
    let mut d = start(sb, settings()).await;

    let mut healthy = Timeline::new(RATE);
    healthy.silence_ms(speech_ms(GREETING, RATE) + 400);
    healthy.say(&phrase_8k());
    healthy.silence_ms(speech_ms(REPLY, RATE) + 2_000);
    healthy.say(&phrase_8k());

    let mut failing = Timeline::new(RATE);
    failing.silence_ms(healthy.ms());
    let mut failing_call = d.call_then_hang_up(&failing, 1_500);
    let press = |at_ms: u64, keys: &str| -> Vec<(Duration, Digit)> {
        keys.chars()
            .enumerate()
            .map(|(i, c)| {
                (
                    Duration::from_millis(at_ms + 150 * i as u64),
                    Digit::new(c as u8).unwrap(),
                )
            })
            .collect()
    };
    // The second entry comes after the first apology has been heard out: a keypad entry
    // while the agent speaks takes the floor (the apology would be cut, by design).
    let second = 1_600 + speech_ms(APOLOGY, RATE) + 1_200;
    assert!(second + 3_000 < failing.ms(), "the call lasts long enough");
    failing_call.dtmf = [press(1_600, "5#"), press(second, "7#")].concat();

    let (h, f) = tokio::join!(d.place(d.call(&healthy)), d.place(failing_call));
    let (s1, s2) = (d.next_summary().await, d.next_summary().await);
    let (hs, fs) = if s1.call_id == Some(h.call_id) {
        (s1, s2)
    } else {
        (s2, s1)
    };
    assert_eq!(fs.call_id, Some(f.call_id));

    assert_clean(&h);
    assert_eq!(h.closed_by, ClosedBy::ServerHangup);
    assert_eq!(hs.reason, EndReason::AgentHangup);
    let ha = agent(&hs);
    assert_eq!(
        lines(&ha),
        [
            says(GREETING),
            q(),
            says(REPLY),
            (Role::Caller, GOODBYE.to_owned()),
            says(AGENT_GOODBYE),
        ]
    );
    assert!(ha.errors.is_empty(), "{:?}", ha.errors);

    assert_clean(&f);
    assert_eq!(f.closed_by, ClosedBy::Caller, "the failing call stayed up");
    let fa = agent(&fs);
    let spoken: Vec<&str> = agent_lines(&fa).iter().map(|l| l.text.as_str()).collect();
    assert_eq!(spoken, [GREETING, APOLOGY, APOLOGY]);
    assert!(!fa.errors.is_empty());
    d.stop().await;
}

// ---- the tests ----------------------------------------------------------------------------------
//
// Calls run in real time and mostly wait, so each test runs a group of independent
// scenarios (each with its own fakes and daemon) concurrently.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_http_errors() {
    tokio::join!(
        llm_500_on_every_request_gets_the_apology_each_turn(),
        llm_429_once_is_retried_transparently(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_stream_failures() {
    tokio::join!(
        llm_stall_gets_the_hold_prompt_then_the_apology(),
        llm_error_mid_stream_keeps_what_was_said_then_apologises(),
        stream_failure_apologises(LlmFault::Malformed { after_tokens: 2 }),
        stream_failure_apologises(LlmFault::Disconnect { after_tokens: 2 }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tts_failures_after_the_prompts_were_cached() {
    tokio::join!(
        tts_key_revoked_apologises_from_the_cache(),
        tts_stall_apologises(),
        tts_closing_mid_stream_apologises(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stt_failures() {
    tokio::join!(
        stt_connection_closed_by_the_service_reconnects_and_answers(),
        stt_rejecting_the_key_apologises_and_keeps_the_call(),
    );
}
