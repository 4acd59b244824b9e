//! Whole AI calls that use tools and hand over to a person, through the daemon against the
//! fake providers: a local HTTP tool server (a fast, a slow and a failing tool, and a
//! caller lookup) and a local MCP server (the official SDK's server, streamable HTTP), with
//! the fake OpenRouter scripted to call them.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use common::ai::*;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, ServerHandler, schemars, tool, tool_handler, tool_router};
use serde_json::{Value, json};
use sifucall::call::context::{CallContext, CallControl, TransferTarget};
use sifucall::call::tools::ToolStatus;
use sifucall::call::{CallOutcome, NoControl};
use sifucall::caller::ClosedBy;
use sifucall::ops::config::{McpSettings, Settings, ToolSettings};
use sifucall::ops::records::Role;
use sifucall::sandbox::SandboxConfig;
use sifucall::sandbox::openrouter::{FakeToolCall, FakeToolScript};

const RATE: u32 = 8_000;
const FILLER: &str = "Sebentar ya...";
const HANDOVER: &str = "Baik, saya sambungkan anda sekarang.";

// ---- a local HTTP tool server ---------------------------------------------------------------

#[derive(Default)]
struct Seen {
    /// (path, authorization header) of every request.
    requests: Vec<(String, String)>,
}

type Shared = Arc<Mutex<Seen>>;

async fn note(seen: &Shared, path: String, headers: &HeaderMap) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    seen.lock().unwrap().requests.push((path, auth));
}

/// Fast: `/orders/{id}`; slow (5 s): `/slow/{id}`; failing: `/broken`; the caller lookup
/// (`/lookup?caller_number=..&delay_ms=..`).
async fn tool_server() -> (String, Shared) {
    let seen: Shared = Arc::default();
    let app = axum::Router::new()
        .route(
            "/orders/{id}",
            get(
                |State(s): State<Shared>, Path(id): Path<String>, h: HeaderMap| async move {
                    note(&s, format!("/orders/{id}"), &h).await;
                    axum::Json(json!({"order_id": id, "status": "dihantar", "eta": "esok"}))
                },
            ),
        )
        .route(
            "/slow/{id}",
            get(
                |State(s): State<Shared>, Path(id): Path<String>, h: HeaderMap| async move {
                    note(&s, format!("/slow/{id}"), &h).await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    axum::Json(json!({"late": true}))
                },
            ),
        )
        .route(
            "/broken",
            get(|State(s): State<Shared>, h: HeaderMap| async move {
                note(&s, "/broken".into(), &h).await;
                (StatusCode::INTERNAL_SERVER_ERROR, "database down")
            }),
        )
        .route(
            "/lookup",
            get(
                |State(s): State<Shared>,
                 Query(q): Query<BTreeMap<String, String>>,
                 h: HeaderMap| async move {
                    let number = q.get("caller_number").cloned().unwrap_or_default();
                    note(&s, format!("/lookup?caller_number={number}"), &h).await;
                    let delay = q.get("delay_ms").and_then(|d| d.parse().ok()).unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    axum::Json(json!({"name": "Aminah", "tier": "emas", "number": number}))
                },
            ),
        )
        .with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (base, seen)
}

fn http_tool(url: String, timeout_ms: u64) -> ToolSettings {
    ToolSettings {
        description: "Look up an order by its number.".into(),
        parameters: json!({
            "type": "object",
            "properties": {"order_id": {"type": "string"}, "ic_number": {"type": "string"}},
            "required": ["order_id"],
        }),
        method: "GET".into(),
        url,
        // Cargo sets CARGO_PKG_NAME for the test process: a stand-in for a secret's variable.
        headers: [(
            "Authorization".to_owned(),
            "Bearer ${CARGO_PKG_NAME}".to_owned(),
        )]
        .into(),
        timeout_ms,
        speakable: true,
        redact: vec!["ic_number".into()],
    }
}

fn tool_settings(base: &str) -> Settings {
    let mut s = settings();
    s.tools.insert(
        "order_status".into(),
        http_tool(format!("{base}/orders/{{order_id}}"), 3000),
    );
    s.tools.insert(
        "slow_status".into(),
        http_tool(format!("{base}/slow/{{order_id}}"), 1500),
    );
    s.tools
        .insert("broken".into(), http_tool(format!("{base}/broken"), 3000));
    s.agent.tools = vec!["order_status".into(), "slow_status".into(), "broken".into()];
    s.agent.filler_phrase = FILLER.into();
    s.agent.handover_line = HANDOVER.into();
    s
}

/// The tool messages of a request: (tool_call_id, content).
fn tool_messages(req: &Value) -> Vec<(String, String)> {
    req["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| {
            (
                m["tool_call_id"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The names of the tools a request offers.
fn offered(req: &Value) -> Vec<String> {
    req["tools"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The content of the tool message answering the call of `name` in `req`.
fn result_of(req: &Value, name: &str) -> String {
    let msgs = req["messages"].as_array().unwrap();
    let id = msgs
        .iter()
        .filter_map(|m| m["tool_calls"].as_array())
        .flatten()
        .find(|c| c.pointer("/function/name").and_then(Value::as_str) == Some(name))
        .and_then(|c| c["id"].as_str())
        .unwrap_or_else(|| panic!("a call of {name}"))
        .to_owned();
    tool_messages(req)
        .into_iter()
        .find(|(i, _)| *i == id)
        .map(|(_, c)| c)
        .unwrap_or_else(|| panic!("a result for {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tools_run_in_parallel_and_failures_reach_the_model_as_errors() {
    let (base, seen) = tool_server().await;
    let mut sandbox = fast_sandbox();
    sandbox.openrouter.tool_scripts = vec![FakeToolScript {
        when_user_says: QUESTION.into(),
        say_first: String::new(),
        rounds: vec![vec![
            FakeToolCall::new(
                "order_status",
                json!({"order_id": "A123", "ic_number": "900101-14-5555"}),
            ),
            FakeToolCall::new("slow_status", json!({"order_id": "A123"})),
            FakeToolCall::new("broken", json!({"order_id": "A123"})),
        ]],
    }];
    let mut d = start(sandbox, tool_settings(&base)).await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    t.say(&question_8k());
    // The slow tool's 1.5 s deadline, the filler, then the reply.
    t.silence_ms(1_500 + speech_ms(FILLER, RATE) + speech_ms(REPLY, RATE) + 2_500);
    t.say(&goodbye_8k());
    let report = d.place(d.call(&t)).await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(report.closed_by, ClosedBy::ServerHangup, "{report:?}");

    let reqs = d.llm_requests();
    assert_eq!(reqs.len(), 3, "the question, its tool round, the goodbye");
    let tools = offered(&reqs[0]);
    for name in ["end_call", "order_status", "slow_status", "broken"] {
        assert!(tools.iter().any(|t| t == name), "{name} offered: {tools:?}");
    }
    assert!(
        !tools.iter().any(|t| t == "transfer_call"),
        "no targets, no transfer tool"
    );
    // The three results went back to the model, each answering its call.
    let second = &reqs[1];
    assert_eq!(tool_messages(second).len(), 3);
    let ok: Value = serde_json::from_str(&result_of(second, "order_status")).unwrap();
    assert_eq!(ok["status"], "dihantar");
    let slow: Value = serde_json::from_str(&result_of(second, "slow_status")).unwrap();
    assert!(
        slow["error"].as_str().unwrap().contains("1500 ms"),
        "{slow}"
    );
    let broken: Value = serde_json::from_str(&result_of(second, "broken")).unwrap();
    assert!(
        broken["error"].as_str().unwrap().starts_with("HTTP 500"),
        "{broken}"
    );
    // The header's ${ENV} reference was resolved; the secret is not in the file.
    let seen = seen.lock().unwrap().requests.clone();
    assert!(seen.iter().any(|(p, _)| p == "/orders/A123"), "{seen:?}");
    assert!(
        seen.iter().all(|(_, auth)| auth == "Bearer sifucall"),
        "{seen:?}"
    );

    // The caller heard the filler during the slow round, then the answer; the record has
    // every call with its status, the IC number redacted.
    let a = agent(&summary);
    let said: Vec<String> = agent_lines(&a).iter().map(|l| l.text.clone()).collect();
    assert!(
        said.iter()
            .any(|l| l.starts_with(FILLER) && l.ends_with(REPLY)),
        "{said:?}"
    );
    let statuses: BTreeMap<String, ToolStatus> = a
        .tool_calls
        .iter()
        .map(|c| (c.name.clone(), c.status))
        .collect();
    assert_eq!(statuses["order_status"], ToolStatus::Ok);
    assert_eq!(statuses["slow_status"], ToolStatus::Timeout);
    assert_eq!(statuses["broken"], ToolStatus::Error);
    let order = a
        .tool_calls
        .iter()
        .find(|c| c.name == "order_status")
        .unwrap();
    assert_eq!(order.arguments["ic_number"], "[redacted]");
    assert_eq!(order.arguments["order_id"], "A123");
    assert!(
        a.errors.is_empty(),
        "a failing tool is no provider error: {:?}",
        a.errors
    );
    assert_eq!(summary.outcome, Some(CallOutcome::Completed));
    d.stop().await;
}

fn with_targets(mut s: Settings) -> Settings {
    s.agent.transfer_targets = vec![
        TransferTarget {
            name: "sales".into(),
            description: "buying a new plan".into(),
            destination: "dest-sales-xq".into(),
        },
        TransferTarget {
            name: "operator".into(),
            description: "anything else".into(),
            destination: "queue-operators".into(),
        },
    ];
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_call_hands_the_call_over_after_the_handover_line() {
    let (base, _) = tool_server().await;
    let mut sandbox = fast_sandbox();
    let summary_text = "Pemanggil mahu tahu harga pakej premium.";
    sandbox.openrouter.tool_scripts = vec![FakeToolScript {
        when_user_says: QUESTION.into(),
        say_first: "Baik.".into(),
        rounds: vec![vec![FakeToolCall::new(
            "transfer_call",
            json!({"target": "sales", "summary": summary_text}),
        )]],
    }];
    let mut d = start(sandbox, with_targets(tool_settings(&base))).await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    let question = t.say(&question_8k());
    let report = d.place(d.call(&t)).await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(report.closed_by, ClosedBy::ServerHangup, "{report:?}");
    assert_eq!(
        summary.outcome,
        Some(CallOutcome::Transferred {
            target: "sales".into(),
            destination: "dest-sales-xq".into(),
            summary: Some(summary_text.into()),
        })
    );
    // The model's words and the handover line were heard whole before the 0x00.
    let rec = &report.recording;
    assert_heard_all(
        loud_samples(segment(rec, question.end, rec.len())),
        expected_loud("Baik.", RATE) + expected_loud(HANDOVER, RATE),
        "reply and handover line",
    );
    let reqs = d.llm_requests();
    assert_eq!(
        reqs.len(),
        1,
        "the model is not asked again after a transfer"
    );
    let all = serde_json::to_string(&reqs).unwrap();
    assert!(all.contains("transfer_call") && all.contains("\"sales\""));
    assert!(
        !all.contains("dest-sales-xq") && !all.contains("queue-operators"),
        "the model never sees a destination"
    );
    let a = agent(&summary);
    assert_eq!(a.transcript.last().unwrap().text, HANDOVER);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_digit_transfers_to_the_operator() {
    let (base, _) = tool_server().await;
    let mut d = start(fast_sandbox(), with_targets(tool_settings(&base))).await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 3_000);
    let mut call = d.call(&t);
    let at = Duration::from_millis(speech_ms(GREETING, RATE) + 300);
    call.dtmf = vec![
        (at, sifucall::audiosocket::Digit::new(b'0').unwrap()),
        (
            at + Duration::from_millis(150),
            sifucall::audiosocket::Digit::new(b'#').unwrap(),
        ),
    ];
    let report = d.place(call).await;
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(report.closed_by, ClosedBy::ServerHangup);
    assert_eq!(
        summary.outcome,
        Some(CallOutcome::Transferred {
            target: "operator".into(),
            destination: "queue-operators".into(),
            summary: None,
        })
    );
    assert!(
        d.llm_requests().is_empty(),
        "no model turn for the keypad request"
    );
    let a = agent(&summary);
    assert_eq!(
        lines(&a).last().unwrap(),
        &(Role::Agent, HANDOVER.to_owned())
    );
    d.stop().await;
}

// ---- a local MCP server ----------------------------------------------------------------------

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct Phone {
    /// The caller's phone number.
    phone: String,
}

#[derive(Debug, Clone)]
struct Crm {
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Crm {
    #[tool(description = "Find a customer by phone number.")]
    fn find_customer(&self, Parameters(Phone { phone }): Parameters<Phone>) -> String {
        json!({"name": "Aminah binti Ali", "phone": phone, "plan": "premium"}).to_string()
    }

    #[tool(description = "A lookup that takes three seconds.")]
    async fn slow_history(&self, Parameters(Phone { phone }): Parameters<Phone>) -> String {
        tokio::time::sleep(Duration::from_secs(3)).await;
        phone
    }

    #[tool(description = "A lookup whose backend is down.")]
    fn broken_lookup(
        &self,
        Parameters(Phone { .. }): Parameters<Phone>,
    ) -> Result<CallToolResult, ErrorData> {
        Ok(CallToolResult::error(vec![ContentBlock::text(
            "backend down",
        )]))
    }

    #[tool(description = "Not for the voice agent.")]
    fn delete_customer(&self, Parameters(Phone { phone }): Parameters<Phone>) -> String {
        format!("deleted {phone}")
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Crm {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

async fn mcp_server() -> String {
    let service: StreamableHttpService<Crm, LocalSessionManager> = StreamableHttpService::new(
        || {
            Ok(Crm {
                tool_router: Crm::tool_router(),
            })
        },
        Default::default(),
        StreamableHttpServerConfig::default().with_sse_keep_alive(None),
    );
    let app = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_tools_are_offered_by_allowlist_and_called_with_deadlines() {
    let url = mcp_server().await;
    let mut s = settings();
    s.mcp.insert(
        "crm".into(),
        McpSettings {
            url,
            tools: vec![
                "find_customer".into(),
                "slow_history".into(),
                "broken_lookup".into(),
            ],
            timeout_ms: 1000,
            headers: BTreeMap::new(),
        },
    );
    s.agent.tools = vec!["crm".into()];
    s.agent.filler_phrase = FILLER.into();
    let mut sandbox = fast_sandbox();
    let phone = json!({"phone": "0123456789"});
    sandbox.openrouter.tool_scripts = vec![FakeToolScript {
        when_user_says: QUESTION.into(),
        say_first: String::new(),
        rounds: vec![vec![
            FakeToolCall::new("find_customer", phone.clone()),
            FakeToolCall::new("slow_history", phone.clone()),
            FakeToolCall::new("broken_lookup", phone.clone()),
            FakeToolCall::new("delete_customer", phone),
        ]],
    }];
    let mut d = start(sandbox, s).await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    t.say(&question_8k());
    let report = d
        .place(d.call_then_hang_up(
            &t,
            1_000 + speech_ms(FILLER, RATE) + speech_ms(REPLY, RATE) + 2_500,
        ))
        .await;
    let summary = d.next_summary().await;
    assert_clean(&report);

    let reqs = d.llm_requests();
    assert_eq!(reqs.len(), 2, "the question and its tool round");
    let tools = offered(&reqs[0]);
    for name in ["find_customer", "slow_history", "broken_lookup"] {
        assert!(tools.iter().any(|t| t == name), "{name} offered: {tools:?}");
    }
    assert!(
        !tools.iter().any(|t| t == "delete_customer"),
        "a tool outside the allowlist is never offered: {tools:?}"
    );
    let second = &reqs[1];
    assert_eq!(
        tool_messages(second).len(),
        3,
        "the unoffered call was not made"
    );
    assert!(result_of(second, "find_customer").contains("Aminah binti Ali"));
    let slow: Value = serde_json::from_str(&result_of(second, "slow_history")).unwrap();
    assert!(
        slow["error"].as_str().unwrap().contains("1000 ms"),
        "{slow}"
    );
    let broken: Value = serde_json::from_str(&result_of(second, "broken_lookup")).unwrap();
    assert!(
        broken["error"].as_str().unwrap().contains("backend down"),
        "{broken}"
    );
    let a = agent(&summary);
    let statuses: BTreeMap<String, ToolStatus> = a
        .tool_calls
        .iter()
        .map(|c| (c.name.clone(), c.status))
        .collect();
    assert_eq!(statuses.len(), 3);
    assert_eq!(statuses["find_customer"], ToolStatus::Ok);
    assert_eq!(statuses["slow_history"], ToolStatus::Timeout);
    assert_eq!(statuses["broken_lookup"], ToolStatus::Error);
    let said: Vec<String> = agent_lines(&a).iter().map(|l| l.text.clone()).collect();
    assert!(said.iter().any(|l| l.ends_with(REPLY)), "{said:?}");
    d.stop().await;
}

// ---- the pre-call lookup ---------------------------------------------------------------------

/// A PBX side channel that knows the caller's number.
#[derive(Debug)]
struct KnownCaller;

impl CallControl for KnownCaller {
    fn context(&self, _call_id: uuid::Uuid) -> futures_util::future::BoxFuture<'_, CallContext> {
        Box::pin(async {
            CallContext {
                caller_number: Some("0123456789".into()),
                ..CallContext::default()
            }
        })
    }

    fn decide(
        &self,
        _call_id: uuid::Uuid,
        _outcome: CallOutcome,
    ) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A daemon whose calls come with a caller number, its lookup answering after `delay_ms`.
async fn lookup_daemon(
    delay_ms: u64,
    deadline_ms: u64,
) -> (common::TestDaemon, sifucall::sandbox::Sandbox, Shared) {
    let (base, seen) = tool_server().await;
    let sandbox = sifucall::sandbox::Sandbox::start(fast_sandbox())
        .await
        .unwrap();
    let mut s = settings();
    let mut lookup = http_tool(format!("{base}/lookup?delay_ms={delay_ms}"), 3000);
    lookup.parameters =
        json!({"type": "object", "properties": {"caller_number": {"type": "string"}}});
    s.tools.insert("caller_lookup".into(), lookup);
    s.agent.pre_call_lookup = "caller_lookup".into();
    s.agent.pre_call_deadline_ms = deadline_ms;
    sandbox.point(&mut s);
    let metrics = Arc::new(sifucall::ops::metrics::Metrics::new());
    let behaviour = sifucall::app::behaviour(&s, &metrics).await.unwrap();
    let mut cfg = sifucall::app::server_config(&s, behaviour);
    cfg.allow = vec!["127.0.0.0/8".parse().unwrap()];
    cfg.session.control = Arc::new(KnownCaller);
    (common::start(cfg).await, sandbox, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pre_call_lookup_fills_lookup_variables_before_the_greeting() {
    let (mut d, _sandbox, seen) = lookup_daemon(100, 1000).await;
    let mut call = sifucall::caller::CallOptions::new(d.addr.to_string());
    call.play = vec![0; (RATE as usize) * 2];
    let report = tokio::time::timeout(CALL_GUARD, sifucall::caller::place_call(call))
        .await
        .unwrap()
        .unwrap();
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert_eq!(summary.context.vars["lookup_name"], "Aminah");
    assert_eq!(summary.context.vars["lookup_tier"], "emas");
    let seen = seen.lock().unwrap().requests.clone();
    assert!(
        seen.iter()
            .any(|(p, _)| p == "/lookup?caller_number=0123456789"),
        "{seen:?}"
    );
    let a = agent(&summary);
    assert_eq!(a.tool_calls.len(), 1);
    assert_eq!(a.tool_calls[0].status, ToolStatus::Ok);
    assert_eq!(a.tool_calls[0].arguments["caller_number"], "0123456789");
    assert_eq!(a.transcript[0].text, GREETING, "the greeting follows");
    d.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pre_call_lookup_does_not_hold_the_greeting_past_its_deadline() {
    let (mut d, _sandbox, _) = lookup_daemon(3_000, 200).await;
    let mut call = sifucall::caller::CallOptions::new(d.addr.to_string());
    call.play = vec![0; (RATE as usize) * 2];
    let report = tokio::time::timeout(CALL_GUARD, sifucall::caller::place_call(call))
        .await
        .unwrap()
        .unwrap();
    let summary = d.next_summary().await;
    assert_clean(&report);
    assert!(
        summary.context.vars.is_empty(),
        "{:?}",
        summary.context.vars
    );
    let a = agent(&summary);
    assert_eq!(a.tool_calls[0].status, ToolStatus::Timeout);
    assert_eq!(a.transcript[0].text, GREETING, "the plain greeting");
    d.shutdown.cancel();
}

#[test]
fn check_rejects_unknown_tools_and_bad_targets() {
    let mut s = Settings::defaults();
    s.agent.tools = vec!["nope".into()];
    s.agent.pre_call_lookup = "missing".into();
    s.agent.operator_digit = "00".into();
    s.agent.transfer_targets = vec![TransferTarget {
        name: "has space".into(),
        description: "x".into(),
        destination: String::new(),
    }];
    let mut literal = http_tool("ftp://x/{a}".into(), 50);
    literal
        .headers
        .insert("X-Api-Key".into(), "sk-live-123".into());
    s.tools.insert("transfer_call".into(), literal);
    let err = s.validate().unwrap_err().to_string();
    for want in [
        "agent.tools",
        "agent.pre_call_lookup",
        "agent.operator_digit",
        "destination is empty",
        "letters, digits",
        "built-in tool",
        "timeout_ms 50",
        "tools.transfer_call",
        "header X-Api-Key looks like a secret",
    ] {
        assert!(err.contains(want), "{want} in:\n{err}");
    }
    assert!(!err.contains("sk-live-123"), "a secret is never echoed");
    // NoControl is still the default side channel.
    let _ = NoControl;
    let _ = SandboxConfig::default();
}
