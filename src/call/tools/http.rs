//! A tool that is one HTTP request: the URL template's `{param}`s filled from the model's
//! arguments (percent-encoded), the other arguments as the query (GET, DELETE) or a JSON body,
//! headers whose `${ENV}` references were resolved at startup, and a deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

use super::{ToolError, ToolOutput, ToolStatus};
use crate::ops::config::ToolSettings;
use crate::providers::llm::ToolDef;

/// The most of a response body read.
const MAX_BODY: usize = 64 * 1024;

/// The shared client of every HTTP tool (one connection pool, rustls).
pub(super) fn client() -> Result<reqwest::Client, ToolError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .user_agent(concat!("sifucall/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ToolError::Config(format!("HTTP client for tools: {e}")))
}

/// One declared HTTP tool.
#[derive(Debug)]
pub struct HttpTool {
    name: String,
    description: String,
    parameters: Value,
    method: Method,
    url: String,
    headers: HeaderMap,
    timeout: Duration,
    speakable: bool,
    redact: Vec<String>,
    client: reqwest::Client,
}

/// Replaces `${NAME}` by the environment variable's value; a missing one is an error naming
/// it (the value itself never appears in an error).
pub fn expand_env(value: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            return Err("has an unclosed ${".into());
        };
        let var = &after[..end];
        match env(var) {
            Some(v) => out.push_str(&v),
            None => return Err(format!("refers to ${{{var}}}, which is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A tool's configured headers, `${ENV}` expanded and marked sensitive; the error says which
/// header is wrong and why.
pub fn header_pairs(
    headers: &BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<impl Iterator<Item = (HeaderName, HeaderValue)>, String> {
    let mut out = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        let value = expand_env(v, env).map_err(|why| format!("header {k} {why}"))?;
        let k = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("{k:?} is not a header name"))?;
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| format!("header {k} has characters a header cannot carry"))?;
        value.set_sensitive(true);
        out.push((k, value));
    }
    Ok(out.into_iter())
}

impl HttpTool {
    /// Builds tool `name` from its declaration.
    pub fn new(
        name: &str,
        t: &ToolSettings,
        client: reqwest::Client,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ToolError> {
        let bad = |why: String| ToolError::Config(format!("tools.{name}: {why}"));
        let method = Method::from_bytes(t.method.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| bad(format!("method {:?} is not an HTTP method", t.method)))?;
        let headers: HeaderMap = header_pairs(&t.headers, env).map_err(bad)?.collect();
        Ok(Self {
            name: name.to_owned(),
            description: t.description.clone(),
            parameters: t.parameters_schema().map_err(bad)?,
            method,
            url: t.url.clone(),
            headers,
            timeout: Duration::from_millis(t.timeout_ms),
            speakable: t.speakable,
            redact: t.redact.clone(),
            client,
        })
    }

    /// What the model sees.
    pub fn def(&self) -> ToolDef {
        let mut description = self.description.clone();
        if !self.speakable {
            description.push_str(" Its result is confidential: use it, never read it out.");
        }
        ToolDef {
            name: self.name.clone(),
            description,
            parameters: self.parameters.clone(),
        }
    }

    /// The argument fields kept out of the call record.
    pub fn redact_fields(&self) -> &[String] {
        &self.redact
    }

    /// The URL with the template filled, and the arguments it did not use.
    fn url_for(&self, args: &Value) -> Result<(String, Map<String, Value>), String> {
        let mut rest: Map<String, Value> = args.as_object().cloned().unwrap_or_default();
        let mut out = String::new();
        let mut tail = self.url.as_str();
        while let Some(i) = tail.find('{') {
            out.push_str(&tail[..i]);
            let after = &tail[i + 1..];
            let Some(end) = after.find('}') else {
                out.push_str(&tail[i..]);
                tail = "";
                break;
            };
            let key = &after[..end];
            let value = rest
                .remove(key)
                .ok_or_else(|| format!("missing argument {key}"))?;
            let text = match value {
                Value::String(s) => s,
                other => other.to_string(),
            };
            out.push_str(&percent_encode(&text));
            tail = &after[end + 1..];
        }
        out.push_str(tail);
        Ok((out, rest))
    }

    /// Runs the request for the model. Never fails: every failure is an error result; a
    /// result that may not be read out says so.
    pub async fn call(&self, args: &Value) -> ToolOutput {
        let mut out = self.fetch(args).await;
        if out.status == ToolStatus::Ok && !self.speakable {
            out.content = format!(
                "[confidential: do not read this out to the caller] {}",
                out.content
            );
        }
        out
    }

    /// Runs the request and gives the response as it is.
    pub async fn fetch(&self, args: &Value) -> ToolOutput {
        let (url, rest) = match self.url_for(args) {
            Ok(u) => u,
            Err(why) => return ToolOutput::failed(ToolStatus::Error, why),
        };
        let mut url = match reqwest::Url::parse(&url) {
            Ok(u) => u,
            Err(e) => return ToolOutput::failed(ToolStatus::Error, format!("bad URL: {e}")),
        };
        let in_query = matches!(self.method, Method::GET | Method::DELETE | Method::HEAD);
        if in_query && !rest.is_empty() {
            let query: BTreeMap<String, String> = rest
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => (k.clone(), s.clone()),
                    other => (k.clone(), other.to_string()),
                })
                .collect();
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut req = self
            .client
            .request(self.method.clone(), url)
            .headers(self.headers.clone())
            .timeout(self.timeout);
        if !in_query {
            req = req.json(&Value::Object(rest));
        }
        let run = async {
            let mut resp = req.send().await?;
            let status = resp.status();
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await? {
                body.extend_from_slice(&chunk);
                if body.len() >= MAX_BODY {
                    body.truncate(MAX_BODY);
                    break;
                }
            }
            Ok::<_, reqwest::Error>((status, body))
        };
        // reqwest's own timeout covers the request; this one also covers a slow body.
        let result = match tokio::time::timeout(self.timeout, run).await {
            Err(_) => {
                return ToolOutput::failed(
                    ToolStatus::Timeout,
                    format!("no answer within {} ms", self.timeout.as_millis()),
                );
            }
            Ok(r) => r,
        };
        match result {
            Ok((status, body)) => {
                let text = String::from_utf8_lossy(&body).trim().to_owned();
                if status.is_success() {
                    let text = match serde_json::from_str::<Value>(&text) {
                        Ok(v) => v.to_string(),
                        Err(_) => text,
                    };
                    ToolOutput::ok(text)
                } else {
                    let snippet: String = text.chars().take(200).collect();
                    ToolOutput::failed(
                        ToolStatus::Error,
                        format!("HTTP {}: {snippet}", status.as_u16()),
                    )
                }
            }
            Err(e) if e.is_timeout() => ToolOutput::failed(
                ToolStatus::Timeout,
                format!("no answer within {} ms", self.timeout.as_millis()),
            ),
            Err(e) => {
                ToolOutput::failed(ToolStatus::Error, format!("request failed: {}", chain(&e)))
            }
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tool(url: &str) -> HttpTool {
        let t = ToolSettings {
            description: "d".into(),
            parameters: json!({"type": "object", "properties": {}}),
            method: "get".into(),
            url: url.into(),
            headers: [("Authorization".to_owned(), "Bearer ${TOKEN}".to_owned())].into(),
            timeout_ms: 1000,
            speakable: true,
            redact: vec![],
        };
        HttpTool::new("t", &t, client().unwrap(), &|k| {
            (k == "TOKEN").then(|| "s3cret".to_owned())
        })
        .unwrap()
    }

    #[test]
    fn the_template_takes_its_arguments_encoded_and_leaves_the_rest() {
        let t = tool("http://h/orders/{id}/items?lang={lang}");
        let (url, rest) = t
            .url_for(&json!({"id": "A 1/2", "lang": "ms", "n": 3}))
            .unwrap();
        assert_eq!(url, "http://h/orders/A%201%2F2/items?lang=ms");
        assert_eq!(Value::Object(rest), json!({"n": 3}));
        assert_eq!(t.url_for(&json!({})).unwrap_err(), "missing argument id");
        assert!(format!("{:?}", t.headers).contains("Sensitive"));
    }

    #[test]
    fn env_references_resolve_or_name_the_missing_variable() {
        let env = |k: &str| (k == "A").then(|| "1".to_owned());
        assert_eq!(expand_env("x${A}y", &env).unwrap(), "x1y");
        assert_eq!(
            expand_env("${B}", &env).unwrap_err(),
            "refers to ${B}, which is not set"
        );
    }
}
