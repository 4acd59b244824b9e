//! A whole call whose model reasons before it answers: the thinking streams for longer than
//! the first-token deadline, counts as life, is never spoken, and the caller hears the reply
//! (no apology).

mod common;

use common::ai::*;
use sifucall::caller::ClosedBy;
use sifucall::ops::records::Role;

const RATE: u32 = 8_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reasoning_model_answers_without_an_apology() {
    let mut sb = fast_sandbox();
    sb.azure.transcripts = vec![QUESTION.into()];
    sb.openrouter.reasoning_models = vec!["*".into()];
    // 120 reasoning tokens at 100 tokens/s: about 1.2 s of thinking, twice the deadline.
    sb.openrouter.reasoning_text = vec!["hmm"; 120].join(" ");
    let mut s = settings();
    s.llm.first_token_timeout_ms = 600;
    let mut d = start(sb, s).await;

    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    let question = t.say(&phrase_8k());
    let report = d
        .place(d.call_then_hang_up(&t, 1_200 + speech_ms(REPLY, RATE) + 2_000))
        .await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(report.closed_by, ClosedBy::Caller, "{report:?}");

    let said = lines(&agent(&summary));
    assert_eq!(
        said,
        [
            (Role::Agent, GREETING.to_owned()),
            (Role::Caller, QUESTION.to_owned()),
            (Role::Agent, REPLY.to_owned()),
        ],
        "the reply, not the apology, and no reasoning spoken"
    );
    assert!(
        agent(&summary).errors.is_empty(),
        "{:?}",
        agent(&summary).errors
    );
    let rec = &report.recording;
    assert_heard_all(
        loud_samples(segment(rec, question.end, rec.len())),
        expected_loud(REPLY, RATE),
        "reply",
    );
    // The default reasoning settings went out with the request.
    let reqs = d.llm_requests();
    assert_eq!(reqs.len(), 1, "no retry");
    assert_eq!(
        reqs[0]["reasoning"],
        serde_json::json!({"effort": "minimal"})
    );
    d.stop().await;
}
