//! The official `openai` Python SDK as a client of the fake OpenRouter: it must stream a
//! reply, a tool call, usage and a reasoning model's thinking without complaint and assemble
//! what the fake meant; and our client must send what the SDK sends (same body fields with
//! the same shapes, the key in the same header).

#[path = "sdk/runner.rs"]
mod sdk;

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use sifucall::ops::config::{Secret, Settings};
use sifucall::providers::llm::openrouter::OpenRouter;
use sifucall::providers::llm::{ChatMessage, ChatRequest, LlmEvent, LlmProvider as _};
use sifucall::sandbox::openrouter::{
    self as fake, FakeOpenRouter, FakeOpenRouterConfig, FakeToolCall, FakeToolScript,
};

const KEY: &str = "sk-or-v1-conformance";
const MODEL: &str = "openai/gpt-4o-mini";
const THINKER: &str = "deepseek/deepseek-r1";
const REPLY: &str = "Harga pakej asas ialah RM99 sebulan, termasuk data tanpa had.";
const GOODBYE: &str = "Baiklah, terima kasih kerana menghubungi kami. Selamat tinggal!";

async fn fake_openrouter() -> FakeOpenRouter {
    fake::spawn(FakeOpenRouterConfig {
        key: Some(KEY.into()),
        first_token_delay_ms: 0,
        tokens_per_sec: 0.0,
        replies: vec![REPLY.into()],
        reasoning_models: vec![THINKER.into()],
        reasoning_text: "The caller asks about prices. Answer briefly.".into(),
        tool_scripts: vec![FakeToolScript {
            when_user_says: "pesanan".into(),
            say_first: "Sekejap.".into(),
            rounds: vec![vec![
                FakeToolCall::new("order_status", json!({"order_id": "A1"})),
                FakeToolCall::new("weather", json!({"city": "Kuala Lumpur"})),
            ]],
        }],
        ..FakeOpenRouterConfig::default()
    })
    .await
    .unwrap()
}

async fn sdk(srv: &FakeOpenRouter, model: &str, case: &str) -> Value {
    sdk::run(
        "openai_stream.py",
        &[srv.base_url(), KEY.into(), model.into(), case.into()],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_streams_a_reply_with_usage() {
    let srv = fake_openrouter().await;
    let out = sdk(&srv, MODEL, "reply").await;
    assert_eq!(out["text"], REPLY, "{out}");
    assert_eq!(out["finish_reason"], "stop");
    assert_eq!(out["tool_calls"], json!([]));
    let usage = &out["usage"];
    assert_eq!(usage["completion_tokens"], 10, "{out}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + 10
    );
    assert!(usage["cost"].as_f64().unwrap() > 0.0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_assembles_the_end_call_tool_call() {
    let srv = fake_openrouter().await;
    let out = sdk(&srv, MODEL, "tool").await;
    assert_eq!(out["text"], GOODBYE, "{out}");
    assert_eq!(out["finish_reason"], "tool_calls");
    let calls = out["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{out}");
    assert_eq!(calls[0]["name"], "end_call");
    assert_eq!(calls[0]["arguments"], "{}");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert!(out["usage"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_reads_reasoning_before_the_content() {
    let srv = fake_openrouter().await;
    let out = sdk(&srv, THINKER, "reasoning").await;
    assert_eq!(
        out["reasoning"],
        "The caller asks about prices. Answer briefly."
    );
    assert_eq!(out["content_before_reasoning"], false);
    assert_eq!(out["text"], REPLY);
    assert_eq!(
        srv.requests()[0]["reasoning"],
        json!({"effort": "low"}),
        "extra_body reached the fake"
    );
}

/// Our client's request for the same turn as the SDK's `tool` case.
async fn our_request(srv: &FakeOpenRouter) {
    let mut s = Settings::defaults().llm;
    s.base_url = srv.base_url();
    s.model = MODEL.into();
    let client = OpenRouter::new(&s, Secret::new(Some(KEY.into()))).unwrap();
    let req = ChatRequest {
        messages: vec![
            ChatMessage::new("system", "Anda ejen khidmat pelanggan."),
            ChatMessage::new("user", "Okey, itu sahaja. Terima kasih!"),
        ],
        offer_end_call: true,
        call_id: "conformance".into(),
        ..ChatRequest::default()
    };
    let events: Vec<_> = client.stream(req).await.unwrap().collect().await;
    assert!(
        matches!(events.last(), Some(Ok(LlmEvent::Done { .. }))),
        "{events:?}"
    );
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_sends_what_the_sdk_sends() {
    let srv = fake_openrouter().await;
    sdk(&srv, MODEL, "tool").await;
    our_request(&srv).await;
    let bodies = srv.requests();
    let headers = srv.request_headers();
    let (theirs, ours) = (&bodies[0], &bodies[1]);
    // Every field the SDK sends, we send, with the same JSON type; the conversation and the
    // tool definition are identical.
    for (key, value) in theirs.as_object().unwrap() {
        let Some(mine) = ours.get(key) else {
            panic!("the SDK sends `{key}` and we do not: {theirs}\nours: {ours}");
        };
        assert_eq!(kind(mine), kind(value), "`{key}`: {value} vs ours {mine}");
    }
    for key in [
        "model",
        "messages",
        "stream",
        "tools",
        "tool_choice",
        "max_tokens",
    ] {
        assert_eq!(theirs[key], ours[key], "`{key}`");
    }
    // What we add beyond the SDK is OpenRouter's own: its reasoning object.
    let extra: Vec<&String> = ours
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| theirs.get(k.as_str()).is_none())
        .collect();
    assert!(
        extra.iter().all(|k| *k == "reasoning"),
        "fields only we send: {extra:?}"
    );
    // The key travels the same way, and only there.
    for h in &headers[..2] {
        assert_eq!(h["authorization"], format!("Bearer {KEY}").as_str());
        assert_eq!(h["content-type"], "application/json");
    }
    for (name, value) in headers[1].iter() {
        if name != "authorization" {
            assert!(
                !value
                    .as_bytes()
                    .windows(KEY.len())
                    .any(|w| w == KEY.as_bytes()),
                "the key leaks into {name}"
            );
        }
    }
    // The SDK's `Accept` (application/json, even for a stream): we send the same.
    assert_eq!(headers[1].get("accept"), headers[0].get("accept"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_reads_parallel_tool_calls_and_sends_results_the_fake_accepts() {
    use sifucall::providers::llm::{ToolCallRequest, ToolDef};
    let srv = fake_openrouter().await;
    let out = sdk(&srv, MODEL, "tools").await;
    assert_eq!(out["text"], "Sekejap.", "{out}");
    assert_eq!(out["finish_reason"], "tool_calls");
    let calls = out["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{out}");
    assert_eq!(calls[0]["name"], "order_status");
    assert_eq!(
        serde_json::from_str::<Value>(calls[1]["arguments"].as_str().unwrap()).unwrap(),
        json!({"city": "Kuala Lumpur"})
    );
    assert_eq!(
        out["second_text"], REPLY,
        "the results were accepted: {out}"
    );

    // Our client's follow-up request has the SDK's shape, message by message.
    let mut s = Settings::defaults().llm;
    s.base_url = srv.base_url();
    s.model = MODEL.into();
    let client = OpenRouter::new(&s, Secret::new(Some(KEY.into()))).unwrap();
    let calls: Vec<ToolCallRequest> = calls
        .iter()
        .map(|c| ToolCallRequest {
            id: c["id"].as_str().unwrap().into(),
            name: c["name"].as_str().unwrap().into(),
            arguments: c["arguments"].as_str().unwrap().into(),
        })
        .collect();
    let mut messages = vec![
        ChatMessage::new("system", "Anda ejen khidmat pelanggan."),
        ChatMessage::new("user", "Di mana pesanan saya?"),
        ChatMessage::assistant_tool_calls("Sekejap.", calls.clone()),
    ];
    for c in &calls {
        messages.push(ChatMessage::tool_result(c.id.clone(), r#"{"ok": true}"#));
    }
    let def = |name: &str| ToolDef {
        name: name.into(),
        description: "Look something up.".into(),
        parameters: json!({"type": "object", "properties": {}}),
    };
    let req = ChatRequest {
        messages,
        call_id: "conformance".into(),
        tools: vec![def("order_status"), def("weather")],
        forbid_tools: true,
        ..ChatRequest::default()
    };
    let events: Vec<_> = client.stream(req).await.unwrap().collect().await;
    assert!(
        matches!(events.last(), Some(Ok(LlmEvent::Done { .. }))),
        "{events:?}"
    );
    let bodies = srv.requests();
    let (theirs, ours) = (&bodies[1], &bodies[2]);
    assert_eq!(
        theirs["messages"], ours["messages"],
        "the tool exchange, byte for byte"
    );
    assert_eq!(theirs["tools"], ours["tools"]);
    assert_eq!(theirs["tool_choice"], ours["tool_choice"]);
}
