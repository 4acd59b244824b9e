//! What the agent can do besides talking: hand the call to a person (`transfer_call`, built
//! in) and call the tools an operator declared, over HTTP (`[tools.NAME]`) or from an MCP
//! server (`[mcp.NAME]`).
//!
//! The call machine stays sans-IO: it only puts the tools' definitions into each model
//! request and learns from the reply task that tools started, finished or a transfer was
//! asked for. [`ToolBox`] is the I/O side, shared by every call: it runs a tool by name with
//! its deadline and turns every failure (timeout, HTTP error, unreachable server, bad
//! arguments) into an error result the model can talk about, never a crash or dead air.

pub mod http;
pub mod mcp;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::warn;

use super::context::TransferTarget;
use crate::ops::config::Settings;
use crate::providers::llm::ToolDef;

pub use http::HttpTool;
pub use mcp::McpServer;

/// The built-in tool the model calls to hand the call to a person.
pub const TRANSFER_TOOL: &str = "transfer_call";
/// The tool the model calls to hang up (offered by the LLM client itself).
pub const END_CALL_TOOL: &str = "end_call";
/// Most of a tool's result handed to the model.
pub const MAX_RESULT_CHARS: usize = 4_000;

/// What an agent may do besides talking, from its `[agent]` settings.
#[derive(Debug, Clone)]
pub struct AgentTools {
    /// People or queues the model may hand the call to.
    pub transfer_targets: Vec<TransferTarget>,
    /// A keypad entry of exactly this digit asks for a person (`None`: off).
    pub operator_digit: Option<char>,
    /// Where calls go that the agent cannot serve (`None`: nowhere configured).
    pub fallback_destination: Option<String>,
    /// Provider failures in a row after which the call is handed to the fallback
    /// destination instead of another apology (0: never).
    pub max_provider_failures: u32,
    /// The declared tools offered to the model, besides `transfer_call`.
    pub defs: Vec<ToolDef>,
    /// Tool rounds per caller turn; the last round's request forbids further calls.
    pub max_rounds: u32,
    /// A tool round slower than this gets the filler phrase (once per turn).
    pub filler_after: Duration,
    /// The HTTP tool run before the greeting with `{caller_number}` (`None`: none).
    pub pre_call_lookup: Option<String>,
    /// How long the greeting waits for that lookup.
    pub pre_call_deadline: Duration,
}

impl Default for AgentTools {
    fn default() -> Self {
        Self {
            transfer_targets: Vec::new(),
            operator_digit: None,
            fallback_destination: None,
            max_provider_failures: 0,
            defs: Vec::new(),
            max_rounds: 3,
            filler_after: Duration::from_millis(700),
            pre_call_lookup: None,
            pre_call_deadline: Duration::from_millis(800),
        }
    }
}

impl AgentTools {
    /// Every tool definition a model request carries: `transfer_call` (when there are
    /// targets) and the declared tools.
    pub fn request_defs(&self) -> Vec<ToolDef> {
        let mut defs = Vec::with_capacity(self.defs.len() + 1);
        if let Some(t) = transfer_def(&self.transfer_targets) {
            defs.push(t);
        }
        defs.extend(self.defs.iter().cloned());
        defs
    }

    /// The target a keypad request for a person goes to: the one named `operator`, else the
    /// first; `None` when there is none.
    pub fn operator_target(&self) -> Option<&TransferTarget> {
        self.transfer_targets
            .iter()
            .find(|t| t.name == "operator")
            .or_else(|| self.transfer_targets.first())
    }

    /// The target called `name`.
    pub fn target(&self, name: &str) -> Option<&TransferTarget> {
        self.transfer_targets.iter().find(|t| t.name == name)
    }
}

/// The definition of `transfer_call` for these targets: the model sees their names and
/// descriptions, never their destinations.
pub fn transfer_def(targets: &[TransferTarget]) -> Option<ToolDef> {
    if targets.is_empty() {
        return None;
    }
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let when: Vec<String> = targets
        .iter()
        .map(|t| format!("{}: {}", t.name, t.description))
        .collect();
    Some(ToolDef {
        name: TRANSFER_TOOL.into(),
        description: format!(
            "Hand the call over to a person. Use it when the caller asks for a person or when \
             you cannot help. Say nothing after calling it: the system tells the caller they are \
             being connected. Targets: {}.",
            when.join("; ")
        ),
        parameters: json!({
            "type": "object",
            "properties": {
                "target": {"type": "string", "enum": names, "description": "Who takes the call."},
                "summary": {
                    "type": "string",
                    "description": "Two or three sentences for the person taking the call: who is \
                                    calling, what they want, what was already done.",
                },
            },
            "required": ["target", "summary"],
        }),
    })
}

/// How a tool call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolStatus {
    /// It answered.
    Ok,
    /// It answered with an error (HTTP status, the MCP tool's own error, bad arguments).
    Error,
    /// It did not answer within its deadline.
    Timeout,
    /// The model called a tool it was not offered.
    Refused,
}

/// One tool call as the call record keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    /// The tool's name.
    pub name: String,
    /// Its arguments, with the tool's `redact` fields replaced.
    pub arguments: Value,
    /// When it started, ms since the call started.
    pub at_ms: u64,
    /// How long it took.
    pub duration_ms: u64,
    /// How it ended.
    pub status: ToolStatus,
    /// The error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ToolCallRecord {
    /// How it ended, in a few words for people: `ok in 120 ms`, `timeout after 3000 ms: ...`.
    pub fn summary(&self) -> String {
        let status = match self.status {
            ToolStatus::Ok => "ok in",
            ToolStatus::Error => "failed after",
            ToolStatus::Timeout => "timed out after",
            ToolStatus::Refused => "refused after",
        };
        match &self.detail {
            Some(d) => format!("{status} {} ms: {d}", self.duration_ms),
            None => format!("{status} {} ms", self.duration_ms),
        }
    }
}

/// What a tool gave back, for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    /// The `tool` message's content.
    pub content: String,
    /// How it ended.
    pub status: ToolStatus,
    /// The error, when it failed.
    pub detail: Option<String>,
}

impl ToolOutput {
    /// A result the model gets as it is (capped).
    pub fn ok(content: String) -> Self {
        Self {
            content: cap(content),
            status: ToolStatus::Ok,
            detail: None,
        }
    }

    /// A failure, told to the model as `{"error": ...}` so it can say so to the caller.
    pub fn failed(status: ToolStatus, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        Self {
            content: json!({"error": detail}).to_string(),
            status,
            detail: Some(detail),
        }
    }
}

fn cap(mut s: String) -> String {
    if s.chars().count() > MAX_RESULT_CHARS {
        s = s.chars().take(MAX_RESULT_CHARS).collect();
        s.push_str(" …(truncated)");
    }
    s
}

/// Why the declared tools cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ToolError {
    /// A declaration is unusable.
    #[error("{0}")]
    Config(String),
}

/// Replaces the values of `fields` (at any depth) by `"[redacted]"`.
pub fn redact(arguments: &Value, fields: &[String]) -> Value {
    match arguments {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if fields.iter().any(|f| f == k) {
                        Value::String("[redacted]".into())
                    } else {
                        redact(v, fields)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| redact(v, fields)).collect()),
        other => other.clone(),
    }
}

/// Every declared tool, ready to run; shared by all calls.
#[derive(Debug, Default)]
pub struct ToolBox {
    http: BTreeMap<String, HttpTool>,
    mcp: Vec<Arc<McpServer>>,
    /// MCP tool name -> its server, once listed.
    mcp_tools: BTreeMap<String, (Arc<McpServer>, ToolDef)>,
}

impl ToolBox {
    /// No tools at all.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The `[tools.*]` and `[mcp.*]` declarations, with header values' `${ENV}` references
    /// resolved through `env`. MCP servers are not contacted yet: see [`ToolBox::discover`].
    pub fn from_settings(
        settings: &Settings,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ToolError> {
        let client = http::client()?;
        let mut http = BTreeMap::new();
        for (name, t) in &settings.tools {
            http.insert(name.clone(), HttpTool::new(name, t, client.clone(), env)?);
        }
        let mut mcp = Vec::new();
        for (name, m) in &settings.mcp {
            mcp.push(Arc::new(McpServer::new(name, m, env)?));
        }
        Ok(Self {
            http,
            mcp,
            mcp_tools: BTreeMap::new(),
        })
    }

    /// Connects to every MCP server and lists its allowlisted tools (each bounded by the
    /// server's timeout). A server that cannot be reached is logged and its tools are not
    /// offered until the next reload.
    pub async fn discover(&mut self) {
        let lists = futures_util::future::join_all(self.mcp.iter().map(|s| {
            let s = Arc::clone(s);
            async move { (Arc::clone(&s), s.list().await) }
        }))
        .await;
        for (server, list) in lists {
            match list {
                Ok(defs) => {
                    for def in defs {
                        if self.http.contains_key(&def.name)
                            || self.mcp_tools.contains_key(&def.name)
                        {
                            warn!(server = server.name(), tool = %def.name, "an MCP tool has the name of another tool; ignored");
                            continue;
                        }
                        self.mcp_tools
                            .insert(def.name.clone(), (Arc::clone(&server), def));
                    }
                }
                Err(e) => {
                    warn!(server = server.name(), error = %e, "MCP server unavailable; its tools are not offered")
                }
            }
        }
    }

    /// The definitions of the tools `allowed` names: `[tools.NAME]` entries, and `[mcp.NAME]`
    /// servers (each bringing its allowlisted tools that were discovered).
    pub fn defs_for(&self, allowed: &[String]) -> Vec<ToolDef> {
        let mut defs = Vec::new();
        for name in allowed {
            if let Some(t) = self.http.get(name) {
                defs.push(t.def());
            } else {
                defs.extend(
                    self.mcp_tools
                        .values()
                        .filter(|(s, _)| s.name() == name)
                        .map(|(_, d)| d.clone()),
                );
            }
        }
        defs
    }

    /// The `redact` fields of a tool.
    pub fn redact_fields(&self, name: &str) -> &[String] {
        self.http.get(name).map_or(&[], HttpTool::redact_fields)
    }

    /// Runs tool `name` with the model's `arguments` (JSON text). Never fails: every failure
    /// is an error result for the model.
    pub async fn call(&self, name: &str, arguments: &str) -> ToolOutput {
        let args: Value = match serde_json::from_str(arguments.trim()) {
            Ok(v @ Value::Object(_)) => v,
            Ok(Value::Null) => json!({}),
            Ok(_) | Err(_) if arguments.trim().is_empty() => json!({}),
            Ok(_) => return ToolOutput::failed(ToolStatus::Error, "arguments must be an object"),
            Err(e) => {
                return ToolOutput::failed(
                    ToolStatus::Error,
                    format!("arguments are not valid JSON: {e}"),
                );
            }
        };
        if let Some(t) = self.http.get(name) {
            return t.call(&args).await;
        }
        if let Some((server, _)) = self.mcp_tools.get(name) {
            return server.call(name, &args).await;
        }
        ToolOutput::failed(ToolStatus::Refused, format!("no tool called {name}"))
    }

    /// Runs HTTP tool `name` outside a conversation (the pre-call lookup) and gives its
    /// response as it is, with its call record (`at_ms` unset).
    pub async fn lookup(&self, name: &str, args: &Value) -> (ToolOutput, ToolCallRecord) {
        let started = tokio::time::Instant::now();
        let out = match self.http.get(name) {
            Some(t) => t.fetch(args).await,
            None => ToolOutput::failed(ToolStatus::Refused, format!("no HTTP tool called {name}")),
        };
        let record = ToolCallRecord {
            name: name.to_owned(),
            arguments: redact(args, self.redact_fields(name)),
            at_ms: 0,
            duration_ms: started.elapsed().as_millis() as u64,
            status: out.status,
            detail: out.detail.clone(),
        };
        (out, record)
    }

    /// Whether an HTTP tool of this name is declared.
    pub fn has_http(&self, name: &str) -> bool {
        self.http.contains_key(name)
    }
}

/// A lookup result as prompt variables: each top-level field of an object becomes
/// `lookup_FIELD` (strings as they are, anything else as JSON); any other value is
/// `lookup_result`.
pub fn lookup_vars(content: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match serde_json::from_str::<Value>(content) {
        Ok(Value::Object(map)) => {
            for (k, v) in map {
                let key: String = k
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let text = match v {
                    Value::String(s) => s,
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                out.insert(format!("lookup_{key}"), text);
            }
        }
        Ok(Value::String(s)) => {
            out.insert("lookup_result".into(), s);
        }
        Ok(other) => {
            out.insert("lookup_result".into(), other.to_string());
        }
        Err(_) => {
            out.insert("lookup_result".into(), content.trim().to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_reaches_nested_fields() {
        let args =
            json!({"ic": "900101-14-5555", "order": {"id": 7, "card": "4111"}, "x": [{"card": 1}]});
        let r = redact(&args, &["ic".into(), "card".into()]);
        assert_eq!(
            r,
            json!({"ic": "[redacted]", "order": {"id": 7, "card": "[redacted]"}, "x": [{"card": "[redacted]"}]})
        );
    }

    #[test]
    fn the_transfer_tool_shows_names_never_destinations() {
        let targets = vec![
            TransferTarget {
                name: "sales".into(),
                description: "buying a plan".into(),
                destination: "SIP/201".into(),
            },
            TransferTarget {
                name: "operator".into(),
                description: "anything else".into(),
                destination: "queue-9".into(),
            },
        ];
        let def = transfer_def(&targets).unwrap();
        let text = serde_json::to_string(&def).unwrap();
        assert!(
            !text.contains("SIP/201") && !text.contains("queue-9"),
            "{text}"
        );
        assert_eq!(
            def.parameters.pointer("/properties/target/enum").unwrap(),
            &json!(["sales", "operator"])
        );
        assert!(transfer_def(&[]).is_none());
        let tools = AgentTools {
            transfer_targets: targets,
            ..AgentTools::default()
        };
        assert_eq!(tools.operator_target().unwrap().name, "operator");
    }

    #[test]
    fn lookup_results_become_prompt_variables() {
        let v = lookup_vars(r#"{"name": "Aminah", "Tier": "gold", "orders": 3, "x": null}"#);
        assert_eq!(v["lookup_name"], "Aminah");
        assert_eq!(v["lookup_tier"], "gold");
        assert_eq!(v["lookup_orders"], "3");
        assert_eq!(v["lookup_x"], "");
        assert_eq!(lookup_vars("plain text")["lookup_result"], "plain text");
    }

    #[tokio::test]
    async fn bad_arguments_and_unknown_tools_are_results_not_errors() {
        let tb = ToolBox::empty();
        let out = tb.call("nope", "{}").await;
        assert_eq!(out.status, ToolStatus::Refused);
        assert!(out.content.contains("nope"));
        let out = tb.call("nope", "{not json").await;
        assert_eq!(out.status, ToolStatus::Error);
        let v: Value = serde_json::from_str(&out.content).unwrap();
        assert!(v["error"].as_str().unwrap().contains("JSON"));
    }
}
