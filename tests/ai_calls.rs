//! Whole AI calls through the daemon against the fake providers: the conversation as the
//! caller hears it (greeting, reply, goodbye and hangup), what the providers were sent,
//! barge-in, the echo guard, DTMF and concurrent calls.

mod common;

use common::ai::*;
use serde_json::Value;
use sifucall::audiosocket::Digit;
use sifucall::caller::ClosedBy;
use sifucall::ops::config::Settings;
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

/// A reply long enough to interrupt.
const LONG: &str = "Untuk soalan tentang harga, pakej asas kami bermula dari RM99 sebulan. \
                    Pakej premium pula RM199 sebulan dan termasuk sokongan 24 jam. \
                    Pakej mana yang anda minati?";

async fn wideband_call_is_16k_end_to_end() {
    let mut d = start(fast_sandbox(), settings()).await;
    let formats_at_start = d.sandbox.elevenlabs.stats().output_formats().len();
    let rate = 16_000;
    let mut t = Timeline::new(rate);
    t.silence_ms(speech_ms(GREETING, rate) + 400);
    let question = t.say(&question_16k());
    let report = d
        .place(d.call_then_hang_up(&t, speech_ms(REPLY, rate) + 1_500))
        .await;
    let summary = d.next_summary().await;

    assert_clean(&report);
    assert_eq!(report.closed_by, ClosedBy::Caller);
    assert_eq!(
        summary.rate,
        Some(sifucall::audiosocket::SampleRate::Hz16000)
    );
    assert_eq!(report.received_rates, [16_000], "every frame is 0x12");
    let rec = &report.recording;
    assert_heard_all(
        loud_samples(segment(rec, 0, question.start)),
        expected_loud(GREETING, rate),
        "greeting at 16 kHz",
    );
    assert_heard_all(
        loud_samples(segment(rec, question.end, rec.len())),
        expected_loud(REPLY, rate),
        "reply at 16 kHz",
    );
    let stt = d.sandbox.azure.stats();
    assert!(!stt.sample_rates.is_empty());
    assert!(
        stt.sample_rates.iter().all(|&r| r == 16_000),
        "WAV headers declared {:?}",
        stt.sample_rates
    );
    let formats = d.sandbox.elevenlabs.stats().output_formats();
    let during_call = &formats[formats_at_start..];
    assert!(!during_call.is_empty(), "the reply was synthesized");
    assert!(
        during_call.iter().all(|f| f == "pcm_16000"),
        "{during_call:?}"
    );
    assert_eq!(
        lines(&agent(&summary)),
        [
            (Role::Agent, GREETING.to_owned()),
            (Role::Caller, QUESTION.to_owned()),
            (Role::Agent, REPLY.to_owned()),
        ]
    );
    d.stop().await;
}

async fn barge_in_stops_the_agent_and_the_llm_learns_what_was_heard() {
    const AGAIN: &str = "Tunggu, saya nak tanya soalan lain.";
    let mut sb = fast_sandbox();
    sb.openrouter.replies = vec![LONG.into()];
    sb.azure.transcripts = vec![QUESTION.into(), AGAIN.into()];
    let mut d = start(sb, settings()).await;
    let q = question_8k();
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    let first = t.say(&q);
    // The reply starts within a second; talk over it well before it could end.
    t.silence_ms(2_500);
    let second = t.say(&q);
    assert!(
        samples_ms(second.end - first.end, RATE) < speech_ms(LONG, RATE),
        "the caller must speak while the reply would still be playing"
    );
    let report = d.place(d.call_then_hang_up(&t, 2_500)).await;
    let summary = d.next_summary().await;
    assert_clean(&report);

    // The agent stopped: far less of the reply reached the caller than it had.
    let heard = loud_samples(segment(&report.recording, first.end, second.end));
    let full = expected_loud(LONG, RATE);
    assert!(heard > 0, "the reply had started");
    assert!(
        heard < full / 2,
        "the agent kept talking: {heard} of {full} loud samples"
    );
    // It went quiet soon after the caller started talking (300 ms of speech decides a
    // barge-in; the margin is generous), not when the transcript came.
    let over = segment(
        &report.recording,
        second.start + RATE as usize * 6 / 5,
        second.end,
    );
    assert_eq!(loud_samples(over), 0, "the agent talked on over the caller");

    let a = agent(&summary);
    assert!(a.barge_ins >= 1, "{a:?}");
    let cut: Vec<_> = agent_lines(&a)
        .into_iter()
        .filter(|l| l.interrupted)
        .collect();
    assert_eq!(cut.len(), 1, "{:?}", a.transcript);
    assert!(LONG.starts_with(&cut[0].text) && cut[0].text.len() < LONG.len());

    // The next request's history holds what the caller heard, then the new question.
    let reqs = d.llm_requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    let m = messages(&reqs[1]);
    let n = m.len();
    assert_eq!(m[n - 1], ("user".to_owned(), AGAIN.to_owned()));
    let (role, said) = &m[n - 2];
    assert_eq!(role, "assistant");
    let said = said.strip_suffix('…').unwrap_or(said);
    assert!(!said.is_empty(), "the caller heard some of it");
    assert!(
        LONG.starts_with(said) && said.len() < LONG.len(),
        "{said:?} is not a strict prefix of the reply"
    );
    assert!(
        LONG[said.len()..].starts_with(char::is_whitespace),
        "{said:?} does not end at a word boundary"
    );
    assert_eq!(said, cut[0].text, "history and transcript agree");
    assert!(metric(&d.metrics().await, "sifucall_barge_ins_total").unwrap_or(0.0) >= 1.0);
    d.stop().await;
}

async fn line_echo_of_the_agent_is_not_a_barge_in() {
    const ECHO_REPLY: &str = "Pakej asas kami bermula dari RM99 sebulan. \
                              Pakej premium pula RM199 sebulan.";
    let mut sb = fast_sandbox();
    sb.openrouter.replies = vec![ECHO_REPLY.into()];
    let mut d = start(sb, settings()).await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 600);
    let question = t.say(&question_8k());
    t.silence_ms(speech_ms(ECHO_REPLY, RATE) + 2_000);
    let call = echo_call(d.audiosocket, &t.samples, -20.0, 3).await;
    let summary = d.next_summary().await;
    assert!(call.violations.is_empty(), "{:?}", call.violations);

    let a = agent(&summary);
    assert_eq!(a.barge_ins, 0, "{:?}", a.transcript);
    assert!(a.transcript.iter().all(|l| !l.interrupted));
    assert_heard_all(
        loud_samples(segment(&call.recording, question.end, call.recording.len())),
        expected_loud(ECHO_REPLY, RATE),
        "reply over its own echo",
    );
    assert_eq!(
        lines(&a),
        [
            (Role::Agent, GREETING.to_owned()),
            (Role::Caller, QUESTION.to_owned()),
            (Role::Agent, ECHO_REPLY.to_owned()),
        ],
        "the echo was never taken for the caller"
    );
    d.stop().await;
}

async fn dtmf_entry_reaches_the_llm() {
    let mut d = start(fast_sandbox(), settings()).await;
    let mut t = Timeline::new(RATE);
    let after_greeting = speech_ms(GREETING, RATE) + 300;
    t.silence_ms(after_greeting);
    let mut call = d.call_then_hang_up(&t, speech_ms(REPLY, RATE) + 2_500);
    call.dtmf = "12#"
        .chars()
        .enumerate()
        .map(|(i, c)| {
            (
                Duration::from_millis(after_greeting + 200 * i as u64),
                Digit::new(c as u8).unwrap(),
            )
        })
        .collect();
    let report = d.place(call).await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(report.dtmf_sent, "12#");
    assert_eq!(summary.dtmf, "12#");

    let reqs = d.llm_requests();
    assert_eq!(reqs.len(), 1, "'#' ends the entry: one turn");
    let user = last_user(&reqs[0]);
    assert!(
        user.ends_with(": 1 2)"),
        "the digits, without the # that ended them: {user:?}"
    );
    let a = agent(&summary);
    let dtmf: Vec<&str> = a
        .transcript
        .iter()
        .filter(|l| l.role == Role::Dtmf)
        .map(|l| l.text.as_str())
        .collect();
    assert_eq!(dtmf, ["1", "2", "#"]);
    assert_eq!(agent_lines(&a).last().map(|l| l.text.as_str()), Some(REPLY));
    assert_heard_all(
        loud_samples(segment(
            &report.recording,
            t.samples.len(),
            report.recording.len(),
        )),
        expected_loud(REPLY, RATE),
        "reply to the digits",
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_concurrent_calls_each_complete_their_conversation() {
    const CALLS: usize = 5;
    let mut sb = fast_sandbox();
    // The fake STT hands out transcripts in order across all its connections: every call
    // asks its question before any says goodbye, so the first five phrases are questions.
    sb.azure.transcripts = [
        vec![QUESTION.to_owned(); CALLS],
        vec![GOODBYE.to_owned(); CALLS],
    ]
    .concat();
    let mut d = start(sb, settings()).await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    // What is said does not matter to the fake STT here, only that it is one phrase each.
    t.say(&phrase_8k());
    t.silence_ms(speech_ms(REPLY, RATE) + 2_500);
    t.say(&phrase_8k());
    let calls = (0..CALLS).map(|_| d.place(d.call(&t)));
    let reports = futures_util::future::join_all(calls).await;
    let mut summaries = Vec::new();
    for _ in 0..CALLS {
        summaries.push(d.next_summary().await);
    }
    for r in &reports {
        assert_clean(r);
        assert_eq!(r.closed_by, ClosedBy::ServerHangup, "{r:?}");
    }
    for s in &summaries {
        assert_eq!(s.reason, EndReason::AgentHangup);
        assert_eq!(
            lines(&agent(s)),
            [
                (Role::Agent, GREETING.to_owned()),
                (Role::Caller, QUESTION.to_owned()),
                (Role::Agent, REPLY.to_owned()),
                (Role::Caller, GOODBYE.to_owned()),
                (Role::Agent, AGENT_GOODBYE.to_owned()),
            ]
        );
    }
    assert_eq!(d.llm_requests().len(), 2 * CALLS);
    d.stop().await;
}

// Calls run in real time and mostly wait: these shorter scenarios (each with its own fakes
// and daemon) run two at a time.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_and_echo_guard() {
    tokio::join!(
        barge_in_stops_the_agent_and_the_llm_learns_what_was_heard(),
        line_echo_of_the_agent_is_not_a_barge_in(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wideband_and_dtmf() {
    tokio::join!(
        wideband_call_is_16k_end_to_end(),
        dtmf_entry_reaches_the_llm()
    );
}

/// A call at a rate the AI pipeline cannot serve (48 kHz) is handed back to the dialplan with
/// a hangup at once, not left to fail turn by turn.
#[tokio::test]
async fn unsupported_rate_is_handed_back_to_the_dialplan() {
    let mut d = start(fast_sandbox(), sifucall::ops::config::Settings::defaults()).await;
    let mut peer = common::Peer::connect(d.audiosocket).await;
    peer.send(&common::uuid_frame()).await;
    peer.send(&common::audio_frame(0x16, &[0; 960])).await;
    let frames = peer.read_to_close().await;
    assert_eq!(
        frames.last().map(|f| f.kind),
        Some(0x00),
        "ends with a hangup frame"
    );
    assert!(frames.iter().all(|f| f.kind == 0x16 || f.kind == 0x00));
    peer.assert_no_violations();
    let s = d.next_summary().await;
    assert_eq!(s.reason, EndReason::AgentHangup);
    let errors = s.agent.map(|a| a.errors).unwrap_or_default();
    assert!(errors.iter().any(|e| e.contains("48000")), "{errors:?}");
}

/// With speculation on (the default), the reply to each turn starts on Azure's hypothesis
/// before its final, and the final confirms it: one model request per turn, none wasted,
/// and the conversation is the same as without speculation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_start_on_the_hypothesis_and_the_final_confirms_them() {
    let mut s = settings();
    s.agent.speculate_after_ms = Settings::defaults().agent.speculate_after_ms;
    assert!(s.agent.speculate_after_ms > 0);
    let mut d = start(fast_sandbox(), s).await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    t.say(&question_8k());
    t.silence_ms(speech_ms(REPLY, RATE) + 1_500);
    t.say(&goodbye_8k());
    let report = d.place(d.call(&t)).await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(report.closed_by, ClosedBy::ServerHangup, "{report:?}");
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
    assert_eq!(d.llm_requests().len(), 2, "one request per turn");
    assert_eq!(
        (a.speculative.used, a.speculative.wasted),
        (2, 0),
        "{:?}",
        a.speculative
    );
}
