//! Malay and English in one call, through the daemon against the fakes: the caller speaks
//! Malay, then English, then Malay again. With `[agent] languages = ["ms-MY", "en-US"]` the
//! recogniser identifies each phrase's language on the same websocket, the model is told which
//! language the caller used (a `[en-US]` tag before the caller's words, explained once in the
//! system prompt) and each reply is synthesized with that language's code. A call without
//! candidate languages is exactly today's.

mod common;

use common::ai::*;
use serde_json::Value;
use sifucall::call::machine::LANGUAGE_TAG_NOTE;
use sifucall::caller::ClosedBy;
use sifucall::ops::config::{Settings, TtsTransport};
use sifucall::ops::metrics::EndReason;
use sifucall::ops::records::Role;
use sifucall::sandbox::SandboxConfig;

const RATE: u32 = 8_000;
/// What the caller asks in English (the fake STT reports it, identified as `en-US`).
const ENGLISH_QUESTION: &str = "How much is the premium plan?";
/// The agent's scripted answers: in Malay to the Malay question, in English to the English.
const MALAY_REPLY: &str = REPLY;
const ENGLISH_REPLY: &str = "The premium plan is RM199 a month.";
/// The model copies the caller's tag to the start of its English answer: it must not be
/// spoken, nor kept in the history or the record.
const ENGLISH_REPLY_AS_WRITTEN: &str = "[en-US] The premium plan is RM199 a month.";

fn both() -> Vec<String> {
    vec!["ms-MY".into(), "en-US".into()]
}

/// The fakes for a Malay, English, Malay call: the transcripts and the language the fake STT
/// reports for each, the two scripted replies (the goodbye is the fake LLM's own).
fn switching_sandbox() -> SandboxConfig {
    let mut sb = fast_sandbox();
    sb.azure.transcripts = vec![QUESTION.into(), ENGLISH_QUESTION.into(), GOODBYE.into()];
    sb.azure.transcript_languages = vec!["ms-MY".into(), "en-US".into(), "ms-MY".into()];
    sb.openrouter.replies = vec![MALAY_REPLY.into(), ENGLISH_REPLY_AS_WRITTEN.into()];
    sb
}

/// Greeting, the Malay question, the English question, the Malay goodbye, each after the
/// agent's previous answer has played out.
fn three_turns() -> Timeline {
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    t.say(&question_8k());
    t.silence_ms(speech_ms(MALAY_REPLY, RATE) + 1_500);
    t.say(&question_8k());
    t.silence_ms(speech_ms(ENGLISH_REPLY, RATE) + 1_500);
    t.say(&goodbye_8k());
    t
}

/// The `language_code` of every TTS request made during the call, with runs of one reply's
/// requests (HTTP posts a reply in one or more requests) counted once.
fn reply_codes(all: &[String], before_call: usize) -> Vec<String> {
    let mut codes: Vec<String> = all[before_call..].to_vec();
    codes.dedup();
    codes
}

async fn malay_english_malay(transport: TtsTransport) {
    let mut s = settings();
    s.agent.languages = both();
    s.tts.transport = transport;
    let mut d = start(switching_sandbox(), s).await;
    // The prompts were cached at startup, in the configured language.
    let before_call = d.sandbox.elevenlabs.stats().language_codes().len();
    assert!(before_call > 0, "the prompts were synthesized");
    let report = d.place(d.call(&three_turns())).await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(report.closed_by, ClosedBy::ServerHangup, "{report:?}");
    assert_eq!(summary.reason, EndReason::AgentHangup);

    // Recognition: one websocket, on the v2 endpoint, identifying continuously.
    let stt = d.sandbox.azure.stats();
    assert_eq!(
        stt.connections, 1,
        "the same websocket for all three languages"
    );
    assert_eq!(stt.lid_enabled, [true]);
    assert_eq!(
        stt.languages,
        ["ms-MY"],
        "the call's first language in the query"
    );
    let ctx = &stt.contexts[0];
    assert_eq!(
        ctx["languageId"]["languages"],
        serde_json::json!(["ms-MY", "en-US"])
    );
    assert_eq!(ctx["languageId"]["mode"], "DetectContinuous");
    assert_eq!(stt.detected_languages, ["ms-MY", "en-US", "ms-MY"]);

    // The model was told, turn by turn, which language the caller used.
    let reqs = d.llm_requests();
    assert_eq!(reqs.len(), 3, "one request per caller turn");
    let users: Vec<String> = reqs.iter().map(last_user).collect();
    assert_eq!(
        users,
        [
            format!("[ms-MY] {QUESTION}"),
            format!("[en-US] {ENGLISH_QUESTION}"),
            format!("[ms-MY] {GOODBYE}"),
        ]
    );
    for r in &reqs {
        let m = messages(r);
        assert_eq!(m[0].0, "system");
        assert_eq!(
            m[0].1,
            format!(
                "{}\n\n{LANGUAGE_TAG_NOTE}",
                d.settings.agent.system_prompt.trim_end()
            ),
            "the configured prompt, then the note explaining the tags"
        );
    }
    // Earlier turns keep their tags in the history, next to the agent's untagged answers.
    assert_eq!(
        messages(&reqs[2])[1..],
        [
            ("assistant".to_owned(), GREETING.to_owned()),
            ("user".to_owned(), format!("[ms-MY] {QUESTION}")),
            ("assistant".to_owned(), MALAY_REPLY.to_owned()),
            ("user".to_owned(), format!("[en-US] {ENGLISH_QUESTION}")),
            ("assistant".to_owned(), ENGLISH_REPLY.to_owned()),
            ("user".to_owned(), format!("[ms-MY] {GOODBYE}")),
        ]
    );

    // Each reply was synthesized with the code of the language the caller used.
    let codes = d.sandbox.elevenlabs.stats().language_codes();
    assert_eq!(
        reply_codes(&codes, before_call),
        ["ms", "en", "ms"],
        "{transport:?}: {codes:?}"
    );

    if transport == TtsTransport::Websocket {
        let sent: String = d
            .sandbox
            .elevenlabs
            .stats()
            .recorded_sessions()
            .iter()
            .flat_map(|r| r.messages.iter())
            .filter_map(|m| m["text"].as_str().map(str::to_owned))
            .collect();
        assert!(sent.contains(ENGLISH_REPLY), "{sent}");
        assert!(!sent.contains('['), "a tag reached TTS: {sent}");
    }

    // The record: the words as said (no tags), and each turn's language.
    let a = agent(&summary);
    assert_eq!(
        lines(&a),
        [
            (Role::Agent, GREETING.to_owned()),
            (Role::Caller, QUESTION.to_owned()),
            (Role::Agent, MALAY_REPLY.to_owned()),
            (Role::Caller, ENGLISH_QUESTION.to_owned()),
            (Role::Agent, ENGLISH_REPLY.to_owned()),
            (Role::Caller, GOODBYE.to_owned()),
            (Role::Agent, AGENT_GOODBYE.to_owned()),
        ]
    );
    assert_eq!(
        a.turn_languages,
        [
            Some("ms-MY".to_owned()),
            Some("en-US".to_owned()),
            Some("ms-MY".to_owned())
        ]
    );
    assert_eq!(a.turns.len(), 3);
    d.stop().await;
}

/// Without candidate languages nothing changes: recognition in `agent.language` on the v1
/// path with no `languageId`, the caller's words untagged, the system prompt as configured,
/// TTS in the configured `tts.language_code` whatever the fake STT would have called the
/// language.
async fn one_language_is_todays_call() {
    let mut d = start(switching_sandbox(), settings()).await;
    assert!(d.settings.agent.languages.is_empty());
    let before_call = d.sandbox.elevenlabs.stats().language_codes().len();
    let report = d.place(d.call(&three_turns())).await;
    let summary = d.next_summary().await;
    assert_clean(&report);

    let stt = d.sandbox.azure.stats();
    assert_eq!(stt.lid_enabled, [false]);
    assert!(stt.contexts[0].get("languageId").is_none());
    assert_eq!(stt.contexts[0]["phraseDetection"]["language"], "ms-MY");
    assert!(stt.detected_languages.is_empty());

    let reqs = d.llm_requests();
    assert_eq!(reqs.len(), 3);
    let users: Vec<String> = reqs.iter().map(last_user).collect();
    assert_eq!(users, [QUESTION, ENGLISH_QUESTION, GOODBYE]);
    assert!(
        reqs.iter()
            .all(|r| messages(r)[0].1 == d.settings.agent.system_prompt)
    );
    let codes = d.sandbox.elevenlabs.stats().language_codes();
    assert_eq!(reply_codes(&codes, before_call), ["ms"], "{codes:?}");
    let a = agent(&summary);
    assert!(a.turn_languages.is_empty());
    // ... and the record says nothing about languages.
    let record = serde_json::to_value(&a).unwrap();
    assert_eq!(record.get("turn_languages"), None::<&Value>);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malay_then_english_then_malay_over_the_websocket() {
    tokio::join!(
        malay_english_malay(TtsTransport::Websocket),
        one_language_is_todays_call(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malay_then_english_then_malay_over_http() {
    malay_english_malay(TtsTransport::Http).await;
}

/// The shipped default has no candidate languages, and a list is checked like the rest.
#[test]
fn languages_default_to_none_and_are_checked() {
    assert!(Settings::defaults().agent.languages.is_empty());
    let mut s = Settings::defaults();
    s.agent.languages = both();
    assert!(s.validate().is_ok());
    s.agent.languages = vec!["en-US".into(), "zh-CN".into()];
    let e = s.validate().unwrap_err().to_string();
    assert!(e.contains("agent.languages"), "{e}");
}
