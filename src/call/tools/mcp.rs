//! Tools from an MCP server over streamable HTTP, through the official Rust SDK (`rmcp`).
//!
//! One session per server, opened at startup (and again after it fails), shared by every
//! call; only the tools in the server's allowlist are listed to the model or called. Every
//! request has the server's deadline, and a failure is an error result for the model.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, ClientConfig};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::Value;
use tokio::sync::Mutex;

use super::http::header_pairs;
use super::{ToolError, ToolOutput, ToolStatus};
use crate::ops::config::McpSettings;
use crate::providers::llm::ToolDef;

type Session = RunningService<RoleClient, ClientConfig>;

/// One MCP server.
pub struct McpServer {
    name: String,
    url: String,
    allow: Vec<String>,
    timeout: Duration,
    headers: HashMap<HeaderName, HeaderValue>,
    session: Mutex<Option<Session>>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

impl McpServer {
    /// Server `name` from its declaration (not contacted yet).
    pub fn new(
        name: &str,
        m: &McpSettings,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ToolError> {
        let bad = |why: String| ToolError::Config(format!("mcp.{name}: {why}"));
        let headers: HashMap<HeaderName, HeaderValue> =
            header_pairs(&m.headers, env).map_err(bad)?.collect();
        Ok(Self {
            name: name.to_owned(),
            url: m.url.clone(),
            allow: m.tools.clone(),
            timeout: Duration::from_millis(m.timeout_ms),
            headers,
            session: Mutex::new(None),
        })
    }

    /// The server's name in the configuration.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn connect(&self) -> Result<Session, String> {
        let config = StreamableHttpClientTransportConfig::with_uri(self.url.clone())
            .custom_headers(self.headers.clone());
        let transport = StreamableHttpClientTransport::from_config(config);
        let fut = ClientConfig::default().serve(transport);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(format!("cannot start an MCP session: {e}")),
            Err(_) => Err(format!(
                "no MCP session within {} ms",
                self.timeout.as_millis()
            )),
        }
    }

    /// Opens the session and lists the allowlisted tools.
    pub async fn list(&self) -> Result<Vec<ToolDef>, String> {
        let mut guard = self.session.lock().await;
        if guard.is_none() {
            *guard = Some(self.connect().await?);
        }
        let Some(session) = guard.as_ref() else {
            return Err("no session".into());
        };
        let tools = match tokio::time::timeout(self.timeout, session.list_all_tools()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                *guard = None;
                return Err(format!("tools/list failed: {e}"));
            }
            Err(_) => {
                *guard = None;
                return Err(format!(
                    "no tools/list within {} ms",
                    self.timeout.as_millis()
                ));
            }
        };
        Ok(tools
            .into_iter()
            .filter(|t| self.allow.iter().any(|a| a == t.name.as_ref()))
            .map(|t| ToolDef {
                name: t.name.to_string(),
                description: t.description.map(|d| d.to_string()).unwrap_or_default(),
                parameters: Value::Object((*t.input_schema).clone()),
            })
            .collect())
    }

    /// Calls tool `name` (which must be allowlisted). Never fails: every failure is an error
    /// result; a broken session is reopened on the next call.
    pub async fn call(&self, name: &str, args: &Value) -> ToolOutput {
        if !self.allow.iter().any(|a| a == name) {
            return ToolOutput::failed(ToolStatus::Refused, format!("{name} is not allowed"));
        }
        let session = {
            let mut guard = self.session.lock().await;
            if guard.is_none() {
                match self.connect().await {
                    Ok(s) => *guard = Some(s),
                    Err(e) => return ToolOutput::failed(ToolStatus::Error, e),
                }
            }
            match guard.as_ref() {
                Some(s) => s.peer().clone(),
                None => return ToolOutput::failed(ToolStatus::Error, "no MCP session"),
            }
        };
        let params = CallToolRequestParams::new(name.to_owned())
            .with_arguments(args.as_object().cloned().unwrap_or_default());
        match tokio::time::timeout(self.timeout, session.call_tool(params)).await {
            Err(_) => ToolOutput::failed(
                ToolStatus::Timeout,
                format!("no answer within {} ms", self.timeout.as_millis()),
            ),
            Ok(Err(e)) => {
                *self.session.lock().await = None;
                ToolOutput::failed(ToolStatus::Error, format!("MCP call failed: {e}"))
            }
            Ok(Ok(result)) => {
                let mut text: Vec<String> = result
                    .content
                    .iter()
                    .filter_map(|c| c.as_text().map(|t| t.text.clone()))
                    .collect();
                if text.is_empty() {
                    if let Some(v) = &result.structured_content {
                        text.push(v.to_string());
                    }
                }
                let text = text.join("\n");
                if result.is_error == Some(true) {
                    ToolOutput::failed(ToolStatus::Error, text)
                } else {
                    ToolOutput::ok(text)
                }
            }
        }
    }
}
