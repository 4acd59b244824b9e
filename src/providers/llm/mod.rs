//! The language model: a streamed chat completion per turn.

pub mod openrouter;
pub mod sse;

use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};

use super::BoxFuture;

/// One message of the conversation history, in OpenAI chat format.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (may be empty for an assistant message that only calls tools; it is then
    /// sent as `null`, which every provider behind OpenRouter accepts).
    pub content: String,
    /// The tools an assistant message called (`tool_calls`).
    #[serde(default)]
    pub tool_calls: Vec<ToolCallRequest>,
    /// Which call a `tool` message answers (`tool_call_id`).
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

impl Serialize for ChatMessage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("role", &self.role)?;
        if self.content.is_empty() && !self.tool_calls.is_empty() {
            m.serialize_entry("content", &None::<String>)?;
        } else {
            m.serialize_entry("content", &self.content)?;
        }
        if !self.tool_calls.is_empty() {
            let calls: Vec<serde_json::Value> = self
                .tool_calls
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    })
                })
                .collect();
            m.serialize_entry("tool_calls", &calls)?;
        }
        if let Some(id) = &self.tool_call_id {
            m.serialize_entry("tool_call_id", id)?;
        }
        m.end()
    }
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// The assistant's turn that called tools (with whatever it said before the calls).
    pub fn assistant_tool_calls(content: impl Into<String>, calls: Vec<ToolCallRequest>) -> Self {
        Self {
            tool_calls: calls,
            ..Self::new("assistant", content)
        }
    }

    /// A tool's result, answering the call `id`.
    pub fn tool_result(id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(id.into()),
            ..Self::new("tool", content)
        }
    }
}

/// A tool call as the assistant message that made it carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallRequest {
    /// The call id the model chose.
    pub id: String,
    /// The function name.
    pub name: String,
    /// The JSON arguments as text, as the model wrote them.
    pub arguments: String,
}

/// A function the model may call (OpenAI `tools[].function`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDef {
    /// The name the model calls it by (`^[A-Za-z0-9_-]{1,64}$`).
    pub name: String,
    /// When to use it, for the model.
    pub description: String,
    /// A JSON schema of its arguments (an object schema).
    pub parameters: serde_json::Value,
}

/// One completion request.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    /// System prompt first, then the history.
    pub messages: Vec<ChatMessage>,
    /// Offer the `end_call` tool.
    pub offer_end_call: bool,
    /// The call's id, for logs.
    pub call_id: String,
    /// Further tools offered to the model (besides `end_call`).
    pub tools: Vec<ToolDef>,
    /// Send `tool_choice: "none"`: the tools stay declared (the history may hold calls to
    /// them) but the model must answer in words (after the last tool round of a turn).
    pub forbid_tools: bool,
}

/// Something the model streamed.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmEvent {
    /// A piece of the reply's text.
    Text(String),
    /// A complete tool call (arguments concatenated across deltas).
    ToolCall {
        /// The call id the model chose.
        id: String,
        /// The function name, e.g. `end_call`.
        name: String,
        /// The JSON arguments as text.
        arguments: String,
    },
    /// Token usage and cost, when the service reports them.
    Usage {
        /// Prompt tokens.
        prompt_tokens: u64,
        /// Completion tokens.
        completion_tokens: u64,
        /// Cost in credits (USD), if reported.
        cost: Option<f64>,
    },
    /// The reply is complete.
    Done {
        /// `stop`, `length`, `tool_calls`, ...
        finish_reason: Option<String>,
    },
}

/// Why a completion failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LlmError {
    /// An HTTP error status before the stream started (after the one retry, if any).
    #[error("LLM request failed with HTTP {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The service's message.
        message: String,
    },
    /// No first token before the deadline.
    #[error("no first token within {0} ms")]
    FirstTokenTimeout(u64),
    /// The stream stalled mid-reply.
    #[error("stream stalled for {0} ms")]
    Stalled(u64),
    /// An `error` event inside an HTTP 200 stream.
    #[error("LLM stream error {code}: {message}")]
    MidStream {
        /// The error code (number or string in the wild).
        code: String,
        /// The message.
        message: String,
    },
    /// Data that is not what the protocol says.
    #[error("malformed LLM stream: {0}")]
    Malformed(String),
    /// Connection-level failure.
    #[error("LLM transport error: {0}")]
    Transport(String),
    /// The configuration is unusable.
    #[error("LLM is misconfigured: {0}")]
    Config(String),
}

/// A stream of events for one reply; it ends after `Done` or an error.
pub type LlmStream = BoxStream<'static, Result<LlmEvent, LlmError>>;

/// A chat-completion provider.
pub trait LlmProvider: Send + Sync + 'static {
    /// Starts a streamed completion. Resolves once the response headers arrived (after the
    /// pre-stream retry); the first-token deadline applies to the returned stream.
    fn stream(&self, req: ChatRequest) -> BoxFuture<'_, Result<LlmStream, LlmError>>;

    /// Opens (or refreshes) a pooled connection in the background so the next request pays
    /// no TCP/TLS handshake. Called at daemon start and at each call start.
    fn warm_up(&self) {}
}
