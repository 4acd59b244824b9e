//! Whole AI calls through the daemon against the fake providers: the conversation as the
//! caller hears it (greeting, reply, goodbye and hangup), what the providers were sent,
//! barge-in, the echo guard, DTMF and concurrent calls.

mod common;

use common::ai::*;
use serde_json::Value;
use sifucall::audiosocket::Digit;
use sifucall::caller::ClosedBy;
use sifucall::ops::metrics::EndReason;
use sifucall::ops::records::Role;
use std::time::Duration;

const RATE: u32 = 8_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_8k_greets_answers_and_hangs_up_after_the_goodbye() {
    let mut d = start(fast_sandbox(), settings()).await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    let question = t.say(&question_8k());
    t.silence_ms(speech_ms(REPLY, RATE) + 1_500);
    let goodbye = t.say(&goodbye_8k());
    let report = d.place(d.call(&t)).await;
    let summary = d.next_summary().await;

    assert_clean(&report);
    assert_eq!(report.closed_by, ClosedBy::ServerHangup, "{report:?}");
    assert_eq!(summary.reason, EndReason::AgentHangup);
    assert_eq!(report.rate_hz, RATE);
    assert_eq!(report.received_rates, [RATE]);

    // The greeting comes first, at once, and whole.
    let rec = &report.recording;
    let greeting = segment(rec, 0, question.start);
    let first = first_loud(rec).expect("the agent spoke");
    assert!(
        first < elevenlabs_samples(GREETING),
        "the greeting should start right away, not after {} ms",
        samples_ms(first, RATE)
    );
    assert_heard_all(
        loud_samples(greeting),
        expected_loud(GREETING, RATE),
        "greeting",
    );
    // The reply to the question, whole.
    assert_heard_all(
        loud_samples(segment(rec, question.end, goodbye.start)),
        expected_loud(REPLY, RATE),
        "reply",
    );
    // The agent's goodbye played out completely before the 0x00.
    assert_heard_all(
        loud_samples(segment(rec, goodbye.end, rec.len())),
        expected_loud(AGENT_GOODBYE, RATE),
        "goodbye",
    );

    // What the LLM was asked.
    let reqs = d.llm_requests();
    assert_eq!(reqs.len(), 2, "one request per caller turn");
    let first_req = &reqs[0];
    assert_eq!(first_req["stream"], Value::Bool(true));
    let tools: Vec<&str> = first_req["tools"]
        .as_array()
        .expect("tools offered")
        .iter()
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
        .collect();
    assert_eq!(tools, ["end_call"]);
    let m = messages(first_req);
    let roles: Vec<&str> = m.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(roles, ["system", "assistant", "user"]);
    assert_eq!(m[0].1, d.settings.agent.system_prompt);
    assert_eq!(m[1].1, GREETING);
    assert_eq!(m[2].1, QUESTION);
    let m = messages(&reqs[1]);
    assert_eq!(
        m[1..],
        [
            ("assistant".to_owned(), GREETING.to_owned()),
            ("user".to_owned(), QUESTION.to_owned()),
            ("assistant".to_owned(), REPLY.to_owned()),
            ("user".to_owned(), GOODBYE.to_owned()),
        ]
    );

    // The record of the call.
    let a = agent(&summary);
    assert_eq!(
        lines(&a),
        [
            (Role::Agent, GREETING.to_owned()),
            (Role::Caller, QUESTION.to_owned()),
            (Role::Agent, REPLY.to_owned()),
            (Role::Caller, GOODBYE.to_owned()),
            (Role::Agent, AGENT_GOODBYE.to_owned()),
        ]
    );
    assert!(a.transcript.iter().all(|l| !l.interrupted));
    assert!(a.transcript.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    assert_eq!(a.turns.len(), 2);
    for t in &a.turns {
        let marks = [
            t.speech_end_ms,
            t.stt_final_ms,
            t.llm_first_token_ms,
            t.tts_first_audio_ms,
            t.first_frame_ms,
        ];
        let marks: Vec<u64> = marks
            .iter()
            .map(|m| m.unwrap_or_else(|| panic!("every mark present: {t:?}")))
            .collect();
        assert!(marks.windows(2).all(|w| w[0] <= w[1]), "{t:?}");
    }
    assert_eq!(a.barge_ins, 0);
    assert!(a.errors.is_empty(), "{:?}", a.errors);
    d.stop().await;
}

fn elevenlabs_samples(text: &str) -> usize {
    sifucall::sandbox::elevenlabs::speech_samples(text, RATE)
}

#[allow(dead_code)]
fn digit(c: char) -> Digit {
    Digit::new(c as u8).unwrap()
}

#[allow(dead_code)]
const _D: Duration = Duration::ZERO;
