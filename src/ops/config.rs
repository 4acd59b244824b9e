//! Configuration: `config/default.toml` (compiled in, so the binary always has sane
//! defaults), then an optional operator file, then `SIFUCALL_<SECTION>__<KEY>` environment
//! overrides. Secrets come only from their own environment variables and never print.
//!
//! Loading is strict so that `sifucall check` saying OK means `sifucall run` will start:
//! numbers must be whole where whole numbers are meant (the `config` crate would otherwise
//! round `1.5` and turn `true` into `1`) and lie inside the range listed in
//! [`NUMERIC_RANGES`]; URLs, names, the language tag, the log filter and the allowlist are
//! checked for the shapes the providers and the daemon need. Every problem names the key and
//! where its value came from (the file, an environment variable, or the built-in default).
//! What can only be known on the host (API keys, a writable records file, free listen ports)
//! is checked by [`Settings::preflight`].
//!
//! Section and key names are a contract with operators' files: add keys, never rename.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use config::{Config as Loader, Environment, File, FileFormat, ValueKind};
use ipnet::IpNet;
use reqwest::Url;
use serde::{Deserialize, Serialize};

/// The built-in defaults; the same file operators copy and edit.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// The prefix of environment overrides: `SIFUCALL_<SECTION>__<KEY>`.
const ENV_PREFIX: &str = "SIFUCALL";

/// A bad configuration: one problem per line, each naming the key and where its value came
/// from.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    fn from_problems(problems: Vec<String>) -> Self {
        Self(problems.join("\n"))
    }

    /// The problems, one per entry.
    pub fn problems(&self) -> impl Iterator<Item = &str> {
        self.0.lines()
    }
}

/// A secret read from the environment. `Debug` and `Display` never show it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Option<String>);

impl Secret {
    /// Wraps a value; empty strings count as absent.
    pub fn new(v: Option<String>) -> Self {
        Self(v.filter(|s| !s.trim().is_empty()))
    }

    /// Reads an environment variable.
    pub fn from_env(var: &str) -> Self {
        Self::new(std::env::var(var).ok())
    }

    /// The secret itself, for the one place that sends it to the provider.
    pub fn expose(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// Whether a value is present.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Why the value cannot be sent in an HTTP header, without showing it: keys are visible
    /// ASCII, so whitespace, a line break, a control character or quotes mean the env file
    /// was written wrongly.
    pub fn format_problem(&self) -> Option<String> {
        let key = self.0.as_deref()?;
        if let Some((i, c)) = key.chars().enumerate().find(|(_, c)| !c.is_ascii_graphic()) {
            let what = if c == '\n' || c == '\r' {
                "a line break"
            } else if c.is_whitespace() {
                "whitespace"
            } else if c.is_control() {
                "a control character"
            } else {
                "a non-ASCII character"
            };
            return Some(format!(
                "contains {what} at character {} of {}; API keys are printable ASCII with no spaces",
                i + 1,
                key.chars().count()
            ));
        }
        let quoted = |q: char| key.len() >= 2 && key.starts_with(q) && key.ends_with(q);
        if quoted('"') || quoted('\'') {
            return Some("is wrapped in quotes; write KEY=value without them".into());
        }
        None
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "\"<redacted>\""
        } else {
            "<unset>"
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_some() {
            "<redacted>"
        } else {
            "<unset>"
        })
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The AudioSocket listener.
    pub audiosocket: AudioSocketSettings,
    /// The admin HTTP server.
    pub admin: AdminSettings,
    /// Logging.
    pub log: LogSettings,
    /// The agent's behaviour.
    pub agent: AgentSettings,
    /// Speech-to-text.
    pub stt: SttSettings,
    /// The language model.
    pub llm: LlmSettings,
    /// Text-to-speech.
    pub tts: TtsSettings,
    /// Call records.
    pub records: RecordsSettings,
    /// The end-of-call webhook.
    pub webhook: WebhookSettings,
    /// Which profile a call gets.
    #[serde(default)]
    pub routing: super::profiles::RoutingSettings,
    /// `[profiles.NAME]`, resolved over `[agent]`, `[llm]` and `[tts]` (read by
    /// [`super::profiles::resolve`], not by this derive). The implicit `default` profile is
    /// `[agent]` itself and appears here only when `[profiles.default]` overlays it.
    #[serde(skip_deserializing)]
    pub profiles: std::collections::BTreeMap<String, super::profiles::ProfileSettings>,
    /// The Asterisk Manager Interface (call context and outcome).
    pub ami: AmiSettings,
    /// HTTP tools the agent may call, by name (`[tools.NAME]`).
    #[serde(default)]
    pub tools: std::collections::BTreeMap<String, ToolSettings>,
    /// MCP servers whose tools the agent may call, by name (`[mcp.NAME]`).
    #[serde(default)]
    pub mcp: std::collections::BTreeMap<String, McpSettings>,
    /// What providers charge, for each call's cost.
    #[serde(default)]
    pub pricing: PricingSettings,
    /// API keys, from the environment only.
    #[serde(skip_deserializing)]
    pub secrets: Secrets,
    /// Where each value came from, for error messages.
    #[serde(skip)]
    origins: Origins,
}

/// `[audiosocket]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioSocketSettings {
    /// Listen address for Asterisk.
    pub listen: SocketAddr,
    /// Allowed source networks.
    pub allow: Vec<IpNet>,
    /// Concurrent call cap.
    #[serde(deserialize_with = "strict::uint")]
    pub max_calls: usize,
    /// Deadline for the UUID message, ms.
    #[serde(deserialize_with = "strict::uint")]
    pub first_message_timeout_ms: u64,
    /// Drain time on shutdown, seconds.
    #[serde(deserialize_with = "strict::uint")]
    pub shutdown_grace_secs: u64,
    /// Cap on connections still waiting for their UUID (they hold no call slot).
    #[serde(deserialize_with = "strict::uint")]
    pub max_pending: usize,
}

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Listen address of the admin HTTP server.
    pub listen: SocketAddr,
    /// A request's headers must arrive within this, ms; also closes idle keep-alive
    /// connections.
    #[serde(deserialize_with = "strict::uint")]
    pub header_timeout_ms: u64,
    /// Cap on open admin connections (lowered further under a low open-file limit).
    #[serde(deserialize_with = "strict::uint")]
    pub max_connections: usize,
    /// The environment variable holding the bearer token of the `/calls` routes.
    pub token_env: String,
}

/// `[ami]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmiSettings {
    /// Keep a manager connection for call context and outcomes.
    pub enabled: bool,
    /// PBX host.
    pub host: String,
    /// Manager port.
    #[serde(deserialize_with = "strict::uint")]
    pub port: u16,
    /// Manager user.
    pub username: String,
    /// The environment variable holding the manager secret.
    pub secret_env: String,
    /// Connect with TLS.
    pub tls: bool,
    /// PEM file of the CA or self-signed certificate to trust; empty = public roots.
    pub tls_ca_file: String,
    /// Deadline of each action (and of connecting), ms.
    #[serde(deserialize_with = "strict::uint")]
    pub action_timeout_ms: u64,
    /// Longest wait between reconnect attempts, ms.
    #[serde(deserialize_with = "strict::uint")]
    pub reconnect_max_ms: u64,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON lines.
    Json,
    /// Human-readable.
    Pretty,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// Filter directive.
    pub level: String,
}

/// What the daemon does with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    /// The voice agent.
    Ai,
    /// Loop the caller's audio back (plumbing test).
    Echo,
}

/// `[agent]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// `ai` or `echo`.
    pub mode: AgentMode,
    /// BCP-47 locale for STT.
    pub language: String,
    /// Candidate locales for continuous language identification (two or more, `language`
    /// among them); empty: recognition in `language` only.
    pub languages: Vec<String>,
    /// First thing the agent says.
    pub greeting: String,
    /// The LLM's instructions.
    pub system_prompt: String,
    /// Spoken when a provider fails.
    pub apology: String,
    /// Spoken when a reply is slow to start.
    pub hold_prompt: String,
    /// How slow, ms.
    #[serde(deserialize_with = "strict::uint")]
    pub hold_after_ms: u64,
    /// Caller speech needed to interrupt the agent, ms.
    #[serde(deserialize_with = "strict::uint")]
    pub barge_in_min_speech_ms: u64,
    /// Echo guard margin, dB.
    #[serde(deserialize_with = "strict::float")]
    pub echo_margin_db: f64,
    /// DTMF entry timeout, ms.
    #[serde(deserialize_with = "strict::uint")]
    pub dtmf_timeout_ms: u64,
    /// VAD speech probability threshold.
    #[serde(deserialize_with = "strict::float32")]
    pub vad_threshold: f32,
    /// Hang up after this much caller silence; 0 disables.
    #[serde(deserialize_with = "strict::uint")]
    pub idle_hangup_secs: u64,
    /// Most recent conversation entries sent to the model with each request.
    #[serde(deserialize_with = "strict::uint")]
    pub history_max_entries: u64,
    /// Estimated tokens of conversation sent to the model with each request.
    #[serde(deserialize_with = "strict::uint")]
    pub history_max_tokens: u64,
    /// `streamed` (production) or `sequential` (the benchmark's non-streaming baseline).
    pub pipeline: crate::call::Pipeline,
    /// Asked after `still_there_after_secs` of silence, before the idle hang-up.
    pub still_there_prompt: String,
    /// Silence before the "are you still there?" prompt; 0 disables it.
    #[serde(deserialize_with = "strict::uint")]
    pub still_there_after_secs: u64,
    /// VAD silence with an unchanged hypothesis before the reply starts on the hypothesis;
    /// 0 disables speculation.
    #[serde(deserialize_with = "strict::uint")]
    pub speculate_after_ms: u64,
    /// Speculative requests allowed per call.
    #[serde(deserialize_with = "strict::uint")]
    pub speculative_max_per_call: u64,
    /// Words that, said alone while the agent talks, are listening noises, not a turn.
    pub backchannels: Vec<String>,
    /// After a barge-in that brought no words, resume this long after the caller stopped.
    #[serde(deserialize_with = "strict::uint")]
    pub resume_after_ms: u64,
    /// IANA time zone of the `{now}` prompt variable.
    pub time_zone: String,
    /// People or queues the model may hand the call to (`transfer_call`).
    pub transfer_targets: Vec<crate::call::context::TransferTarget>,
    /// Said before a transfer (cached at startup).
    pub handover_line: String,
    /// A keypad entry of only this digit asks for a person; empty disables.
    pub operator_digit: String,
    /// The dialplan destination for calls the agent cannot serve; empty: none.
    pub fallback_destination: String,
    /// Provider failures in a row that hand the call to the fallback destination instead of
    /// another apology; 0 never.
    #[serde(deserialize_with = "strict::uint")]
    pub max_provider_failures: u64,
    /// The declared tools (`[tools.NAME]`, `[mcp.NAME]`) this agent may use.
    pub tools: Vec<String>,
    /// Tool rounds per caller turn.
    #[serde(deserialize_with = "strict::uint")]
    pub max_tool_rounds: u64,
    /// Said (once per turn) when a tool round takes longer than `filler_after_ms`.
    pub filler_phrase: String,
    /// How slow a tool round gets the filler phrase, ms.
    #[serde(deserialize_with = "strict::uint")]
    pub filler_after_ms: u64,
    /// An HTTP tool run before the greeting with `{caller_number}`; empty: none.
    pub pre_call_lookup: String,
    /// How long the greeting waits for it, ms.
    #[serde(deserialize_with = "strict::uint")]
    pub pre_call_deadline_ms: u64,
}

/// `[tools.NAME]`: an HTTP tool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSettings {
    /// When to use it, for the model.
    pub description: String,
    /// A JSON schema of the arguments: a TOML table, or the schema as a JSON string.
    #[serde(default = "empty_object_schema")]
    pub parameters: serde_json::Value,
    /// GET, POST, PUT, PATCH or DELETE.
    #[serde(default = "default_tool_method")]
    pub method: String,
    /// http(s) URL; `{param}` is replaced by that argument, percent-encoded.
    pub url: String,
    /// Request headers; values may refer to environment variables as `${NAME}` (secrets
    /// never go in the file).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Deadline, ms (100..=30000).
    #[serde(default = "default_tool_timeout", deserialize_with = "strict::uint")]
    pub timeout_ms: u64,
    /// Whether the result may be read to the caller.
    #[serde(default)]
    pub speakable: bool,
    /// Argument fields kept out of the call record.
    #[serde(default)]
    pub redact: Vec<String>,
}

impl ToolSettings {
    /// The parameters as a JSON schema object (parsing a JSON string).
    pub fn parameters_schema(&self) -> Result<serde_json::Value, String> {
        let v = match &self.parameters {
            serde_json::Value::String(s) => serde_json::from_str(s)
                .map_err(|e| format!("parameters is not a JSON schema: {e}"))?,
            other => other.clone(),
        };
        if v.get("type").and_then(serde_json::Value::as_str) != Some("object") {
            return Err("parameters must be an object schema (type = \"object\")".into());
        }
        Ok(v)
    }
}

/// `[mcp.NAME]`: an MCP server (streamable HTTP).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpSettings {
    /// The server's streamable-HTTP endpoint.
    pub url: String,
    /// The server's tools the agent may use (others are neither listed nor called).
    pub tools: Vec<String>,
    /// Deadline per request, ms (100..=30000).
    #[serde(default = "default_tool_timeout", deserialize_with = "strict::uint")]
    pub timeout_ms: u64,
    /// Request headers; values may refer to environment variables as `${NAME}`.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

fn empty_object_schema() -> serde_json::Value {
    serde_json::json!({"type": "object", "properties": {}})
}

fn default_tool_method() -> String {
    "GET".into()
}

fn default_tool_timeout() -> u64 {
    3000
}

/// `[stt]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SttSettings {
    /// Only `azure` for now.
    pub provider: String,
    /// Azure region.
    pub region: String,
    /// Full websocket URL override; empty means derive from `region`.
    pub endpoint: String,
    /// Segmentation silence, ms.
    #[serde(deserialize_with = "strict::uint")]
    pub segmentation_silence_ms: u32,
}

impl SttSettings {
    /// The websocket URL (without query), from `endpoint` or `region`.
    pub fn websocket_url(&self) -> String {
        if self.endpoint.is_empty() {
            format!(
                "wss://{}.stt.speech.microsoft.com/speech/recognition/conversation/cognitiveservices/v1",
                self.region
            )
        } else {
            self.endpoint.clone()
        }
    }
}

/// `[llm]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSettings {
    /// Only `openrouter` (any OpenAI-compatible server) for now.
    pub provider: String,
    /// API base, e.g. `https://openrouter.ai/api/v1`.
    pub base_url: String,
    /// Primary model.
    pub model: String,
    /// Fallback models.
    pub fallback_models: Vec<String>,
    /// Reply length cap.
    #[serde(deserialize_with = "strict::uint")]
    pub max_tokens: u32,
    /// Sampling temperature.
    #[serde(deserialize_with = "strict::float32")]
    pub temperature: f32,
    /// Time-to-first-token deadline, ms.
    #[serde(deserialize_with = "strict::uint")]
    pub first_token_timeout_ms: u64,
    /// Mid-stream stall deadline, ms.
    #[serde(deserialize_with = "strict::uint")]
    pub stall_timeout_ms: u64,
    /// OpenRouter `reasoning.effort` (`none`, `minimal`, `low`, `medium`, `high`, `xhigh`);
    /// empty leaves it to the provider.
    pub reasoning_effort: String,
    /// OpenRouter `reasoning.exclude`: the model still thinks, but its reasoning is not
    /// streamed (then nothing but keep-alive comments arrives while it thinks).
    pub reasoning_exclude: bool,
    /// OpenRouter `reasoning.max_tokens`; 0 leaves it unset. When set it replaces the effort
    /// (OpenRouter takes one of the two).
    #[serde(deserialize_with = "strict::uint")]
    pub reasoning_max_tokens: u32,
}

/// The values `llm.reasoning_effort` may take (empty: the provider's default).
pub const REASONING_EFFORTS: [&str; 7] = ["", "none", "minimal", "low", "medium", "high", "xhigh"];

/// TTS transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TtsTransport {
    /// `stream-input` websocket.
    Websocket,
    /// HTTP `/stream`.
    Http,
}

/// ElevenLabs output formats the daemon can play.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputFormat {
    /// G.711 µ-law, 8 kHz.
    #[serde(rename = "ulaw_8000")]
    Ulaw8000,
    /// G.711 A-law, 8 kHz.
    #[serde(rename = "alaw_8000")]
    Alaw8000,
    /// s16le, 8 kHz.
    #[serde(rename = "pcm_8000")]
    Pcm8000,
    /// s16le, 16 kHz.
    #[serde(rename = "pcm_16000")]
    Pcm16000,
}

impl OutputFormat {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ulaw8000 => "ulaw_8000",
            Self::Alaw8000 => "alaw_8000",
            Self::Pcm8000 => "pcm_8000",
            Self::Pcm16000 => "pcm_16000",
        }
    }

    /// Its sample rate.
    pub fn sample_rate(self) -> u32 {
        match self {
            Self::Pcm16000 => 16_000,
            _ => 8_000,
        }
    }
}

/// `[tts]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtsSettings {
    /// Only `elevenlabs` for now.
    pub provider: String,
    /// `websocket` or `http`.
    pub transport: TtsTransport,
    /// API base, e.g. `https://api.elevenlabs.io`.
    pub base_url: String,
    /// Voice.
    pub voice_id: String,
    /// Model.
    pub model_id: String,
    /// ISO 639-1 language code.
    pub language_code: String,
    /// Output format.
    pub output_format: OutputFormat,
    /// First-audio deadline, ms.
    #[serde(deserialize_with = "strict::uint")]
    pub first_byte_timeout_ms: u64,
    /// Syntheses the daemon runs at once outside calls (the prompt cache at startup): small
    /// plans allow only a few concurrent requests and answer more with 429.
    #[serde(deserialize_with = "strict::uint")]
    pub max_concurrency: u32,
}

/// `[records]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsSettings {
    /// Destination URL; empty disables.
    pub url: String,
    /// This daemon's name in the records (several daemons may share a database); empty:
    /// the host name.
    #[serde(default)]
    pub node_id: String,
    /// Delete calls older than this many days, daily; 0 keeps them forever.
    #[serde(default, deserialize_with = "strict::uint")]
    pub retention_days: u64,
    /// Where writes wait while the database is down; empty: `spool/` next to a SQLite
    /// file, `/var/lib/sifucall/spool` for PostgreSQL.
    #[serde(default)]
    pub spool_dir: String,
    /// The spool's size limit, MB.
    #[serde(default = "default_spool_max_mb", deserialize_with = "strict::uint")]
    pub spool_max_mb: u64,
    /// Writes waiting for the database writer at most.
    #[serde(default = "default_records_queue", deserialize_with = "strict::uint")]
    pub queue: u64,
    /// Stereo call recordings (caller left, agent right) go here; empty: none.
    #[serde(default)]
    pub recordings_dir: String,
    /// Record every call (with `recordings_dir`); otherwise only calls whose context sets
    /// the variable `record` to `1` or `yes` (`SIFUCALL_VAR_RECORD` in the dialplan).
    #[serde(default)]
    pub record_all: bool,
}

fn default_spool_max_mb() -> u64 {
    512
}

fn default_records_queue() -> u64 {
    20_000
}

/// `[pricing]`: what each call costs. The LLM's cost is what the service reports; speech is
/// priced here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingSettings {
    /// The currency of the prices below (and of the cost in records and metrics).
    pub currency: String,
    /// Speech-to-text, per hour of audio streamed.
    #[serde(deserialize_with = "strict::float")]
    pub stt_per_hour: f64,
    /// Text-to-speech, per 1000 characters.
    #[serde(deserialize_with = "strict::float")]
    pub tts_per_1k_chars: f64,
    /// LLM, per million tokens: only for requests abandoned before the service reported
    /// their cost (wasted speculation), estimated from their tokens.
    #[serde(deserialize_with = "strict::float")]
    pub llm_per_million_tokens: f64,
    /// Malaysian ringgit per unit of `currency`; 0 hides the MYR figure.
    #[serde(deserialize_with = "strict::float")]
    pub myr_rate: f64,
}

impl Default for PricingSettings {
    fn default() -> Self {
        Self {
            currency: "USD".into(),
            stt_per_hour: 1.0,
            tts_per_1k_chars: 0.10,
            llm_per_million_tokens: 0.5,
            myr_rate: 0.0,
        }
    }
}

/// `[webhook]`
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Destination URL; empty disables. Its query often carries a token, so `Debug` shows it
    /// through [`redact_url`].
    pub url: String,
    /// Wait after a failed delivery, doubled each time up to `backoff_max_ms`.
    #[serde(
        default = "default_backoff_initial_ms",
        deserialize_with = "strict::uint"
    )]
    pub backoff_initial_ms: u64,
    /// The longest wait between tries.
    #[serde(default = "default_backoff_max_ms", deserialize_with = "strict::uint")]
    pub backoff_max_ms: u64,
    /// One delivery's deadline.
    #[serde(
        default = "default_webhook_timeout_ms",
        deserialize_with = "strict::uint"
    )]
    pub timeout_ms: u64,
}

fn default_backoff_initial_ms() -> u64 {
    1_000
}

fn default_backoff_max_ms() -> u64 {
    300_000
}

fn default_webhook_timeout_ms() -> u64 {
    10_000
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &redact_url(&self.url))
            .field("backoff_initial_ms", &self.backoff_initial_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// API keys.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Secrets {
    /// `AZURE_SPEECH_KEY`
    pub azure_speech_key: Secret,
    /// `OPENROUTER_API_KEY`
    pub openrouter_api_key: Secret,
    /// `ELEVENLABS_API_KEY`
    pub elevenlabs_api_key: Secret,
    /// The admin `/calls` bearer token, from the variable `admin.token_env` names.
    pub admin_token: Secret,
    /// The AMI secret, from the variable `ami.secret_env` names.
    pub ami_secret: Secret,
}

impl Secrets {
    /// Reads the keys from the process environment.
    pub fn from_env() -> Self {
        Self {
            azure_speech_key: Secret::from_env("AZURE_SPEECH_KEY"),
            openrouter_api_key: Secret::from_env("OPENROUTER_API_KEY"),
            elevenlabs_api_key: Secret::from_env("ELEVENLABS_API_KEY"),
            ..Self::default()
        }
    }

    /// Reads the secrets whose variable names come from the configuration.
    pub fn read_named(&mut self, settings: &Settings) {
        self.admin_token = Secret::from_env(&settings.admin.token_env);
        self.ami_secret = Secret::from_env(&settings.ami.secret_env);
    }

    /// Each key with the environment variable it is read from.
    pub fn named(&self) -> [(&'static str, &Secret); 3] {
        [
            ("AZURE_SPEECH_KEY", &self.azure_speech_key),
            ("OPENROUTER_API_KEY", &self.openrouter_api_key),
            ("ELEVENLABS_API_KEY", &self.elevenlabs_api_key),
        ]
    }
}

/// Whether a numeric setting takes whole numbers or decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberKind {
    /// Whole numbers only: `1.5` and `true` are errors, not rounded.
    Integer,
    /// Any finite decimal.
    Decimal,
}

/// The allowed range of one numeric setting, inclusive at both ends.
#[derive(Debug, Clone, Copy)]
pub struct NumericRange {
    /// `section.key`.
    pub key: &'static str,
    /// Whole or decimal.
    pub kind: NumberKind,
    /// Smallest allowed value.
    pub min: f64,
    /// Largest allowed value.
    pub max: f64,
    /// What the number means (shown in errors).
    pub meaning: &'static str,
}

const fn range(
    key: &'static str,
    kind: NumberKind,
    min: f64,
    max: f64,
    meaning: &'static str,
) -> NumericRange {
    NumericRange {
        key,
        kind,
        min,
        max,
        meaning,
    }
}

/// Every numeric setting and its range (also written next to each key in
/// `config/default.toml`). Values outside are configuration errors, never clamped.
pub const NUMERIC_RANGES: &[NumericRange] = {
    use NumberKind::{Decimal, Integer};
    &[
        range(
            "audiosocket.max_calls",
            Integer,
            1.0,
            10_000.0,
            "concurrent calls",
        ),
        range(
            "audiosocket.max_pending",
            Integer,
            1.0,
            10_000.0,
            "connections still waiting for their UUID",
        ),
        range(
            "admin.header_timeout_ms",
            Integer,
            100.0,
            600_000.0,
            "ms for an admin request's headers (also closes idle admin connections)",
        ),
        range(
            "admin.max_connections",
            Integer,
            1.0,
            10_000.0,
            "open admin connections",
        ),
        range(
            "audiosocket.first_message_timeout_ms",
            Integer,
            100.0,
            60_000.0,
            "ms to wait for the call's UUID",
        ),
        range(
            "audiosocket.shutdown_grace_secs",
            Integer,
            0.0,
            600.0,
            "seconds calls may run on after SIGTERM; keep it below the unit's TimeoutStopSec",
        ),
        range(
            "agent.hold_after_ms",
            Integer,
            100.0,
            30_000.0,
            "ms of silence before the hold prompt",
        ),
        range(
            "agent.barge_in_min_speech_ms",
            Integer,
            0.0,
            5_000.0,
            "ms of caller speech that interrupts the agent",
        ),
        range("agent.echo_margin_db", Decimal, 0.0, 60.0, "dB"),
        range(
            "agent.dtmf_timeout_ms",
            Integer,
            100.0,
            30_000.0,
            "ms after the last digit",
        ),
        range(
            "agent.vad_threshold",
            Decimal,
            0.05,
            0.95,
            "speech probability",
        ),
        range(
            "agent.idle_hangup_secs",
            Integer,
            0.0,
            86_400.0,
            "seconds of silence before hanging up; 0 = never",
        ),
        range(
            "agent.history_max_entries",
            Integer,
            2.0,
            1_000.0,
            "conversation entries per model request",
        ),
        range(
            "agent.history_max_tokens",
            Integer,
            100.0,
            1_000_000.0,
            "estimated conversation tokens per model request",
        ),
        range(
            "agent.still_there_after_secs",
            Integer,
            0.0,
            86_400.0,
            "seconds of silence before asking; 0 = never",
        ),
        range(
            "agent.speculate_after_ms",
            Integer,
            0.0,
            5_000.0,
            "ms of silence on a stable hypothesis; 0 = never",
        ),
        range(
            "agent.speculative_max_per_call",
            Integer,
            0.0,
            1_000.0,
            "speculative model requests per call",
        ),
        range(
            "agent.resume_after_ms",
            Integer,
            100.0,
            10_000.0,
            "ms after a wordless interruption",
        ),
        range(
            "agent.max_provider_failures",
            Integer,
            0.0,
            100.0,
            "provider failures in a row before the fallback; 0 = never",
        ),
        range(
            "agent.max_tool_rounds",
            Integer,
            1.0,
            10.0,
            "tool rounds per caller turn",
        ),
        range(
            "agent.filler_after_ms",
            Integer,
            100.0,
            10_000.0,
            "ms of a tool round before the filler phrase",
        ),
        range(
            "agent.pre_call_deadline_ms",
            Integer,
            50.0,
            1_500.0,
            "ms the greeting waits for the pre-call lookup",
        ),
        range(
            "stt.segmentation_silence_ms",
            Integer,
            100.0,
            5_000.0,
            "ms of silence that ends a phrase (Azure's range)",
        ),
        range("llm.max_tokens", Integer, 1.0, 32_768.0, "tokens per reply"),
        range("llm.temperature", Decimal, 0.0, 2.0, "sampling temperature"),
        range(
            "records.retention_days",
            Integer,
            0.0,
            36_500.0,
            "days calls are kept (0: forever)",
        ),
        range(
            "records.spool_max_mb",
            Integer,
            1.0,
            1_000_000.0,
            "MB of records spooled while the database is down",
        ),
        range(
            "records.queue",
            Integer,
            1.0,
            1_000_000.0,
            "record writes waiting for the database writer",
        ),
        range(
            "webhook.backoff_initial_ms",
            Integer,
            10.0,
            3_600_000.0,
            "ms before retrying a failed delivery",
        ),
        range(
            "webhook.backoff_max_ms",
            Integer,
            10.0,
            86_400_000.0,
            "longest ms between delivery tries",
        ),
        range(
            "webhook.timeout_ms",
            Integer,
            100.0,
            120_000.0,
            "ms for one delivery",
        ),
        range(
            "pricing.stt_per_hour",
            Decimal,
            0.0,
            10_000.0,
            "speech-to-text price per audio hour",
        ),
        range(
            "pricing.tts_per_1k_chars",
            Decimal,
            0.0,
            10_000.0,
            "text-to-speech price per 1000 characters",
        ),
        range(
            "pricing.llm_per_million_tokens",
            Decimal,
            0.0,
            100_000.0,
            "LLM price per million tokens, for abandoned requests",
        ),
        range(
            "pricing.myr_rate",
            Decimal,
            0.0,
            100_000.0,
            "ringgit per unit of pricing.currency (0: not shown)",
        ),
        range(
            "llm.first_token_timeout_ms",
            Integer,
            100.0,
            120_000.0,
            "ms to the first token",
        ),
        range(
            "llm.stall_timeout_ms",
            Integer,
            100.0,
            120_000.0,
            "ms a reply stream may stall",
        ),
        range(
            "llm.reasoning_max_tokens",
            Integer,
            0.0,
            32_768.0,
            "reasoning tokens per reply; 0 = not set",
        ),
        range(
            "tts.first_byte_timeout_ms",
            Integer,
            100.0,
            60_000.0,
            "ms to the first audio",
        ),
        range(
            "tts.max_concurrency",
            Integer,
            1.0,
            64.0,
            "prompt syntheses at once",
        ),
        range(
            "ami.port",
            Integer,
            1.0,
            65_535.0,
            "TCP port of the manager",
        ),
        range(
            "ami.action_timeout_ms",
            Integer,
            50.0,
            10_000.0,
            "ms for each manager action",
        ),
        range(
            "ami.reconnect_max_ms",
            Integer,
            100.0,
            300_000.0,
            "ms between manager reconnect attempts at most",
        ),
    ]
};

/// A numeric setting's current value.
#[derive(Debug, Clone, Copy)]
enum Number {
    Int(u64),
    F64(f64),
    F32(f32),
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(n) => write!(f, "{n}"),
            Self::F64(x) => write!(f, "{x}"),
            Self::F32(x) => write!(f, "{x}"),
        }
    }
}

impl NumericRange {
    fn contains(&self, v: Number) -> bool {
        match v {
            // Bounds are small whole numbers, exact in f64.
            Number::Int(n) => (self.min as u64..=self.max as u64).contains(&n),
            Number::F64(x) => x.is_finite() && (self.min..=self.max).contains(&x),
            Number::F32(x) => x.is_finite() && (self.min as f32..=self.max as f32).contains(&x),
        }
    }

    /// `between 1 and 10000 (concurrent calls)`.
    pub fn describe(&self) -> String {
        format!("between {} and {} ({})", self.min, self.max, self.meaning)
    }
}

impl Settings {
    fn number(&self, key: &str) -> Option<Number> {
        use Number::{F32, F64, Int};
        let (a, g, s, l, t) = (
            &self.audiosocket,
            &self.agent,
            &self.stt,
            &self.llm,
            &self.tts,
        );
        Some(match key {
            "audiosocket.max_calls" => Int(a.max_calls as u64),
            "audiosocket.first_message_timeout_ms" => Int(a.first_message_timeout_ms),
            "audiosocket.shutdown_grace_secs" => Int(a.shutdown_grace_secs),
            "audiosocket.max_pending" => Int(a.max_pending as u64),
            "admin.header_timeout_ms" => Int(self.admin.header_timeout_ms),
            "admin.max_connections" => Int(self.admin.max_connections as u64),
            "agent.hold_after_ms" => Int(g.hold_after_ms),
            "agent.barge_in_min_speech_ms" => Int(g.barge_in_min_speech_ms),
            "agent.echo_margin_db" => F64(g.echo_margin_db),
            "agent.dtmf_timeout_ms" => Int(g.dtmf_timeout_ms),
            "agent.vad_threshold" => F32(g.vad_threshold),
            "agent.idle_hangup_secs" => Int(g.idle_hangup_secs),
            "agent.history_max_entries" => Int(g.history_max_entries),
            "agent.history_max_tokens" => Int(g.history_max_tokens),
            "agent.still_there_after_secs" => Int(g.still_there_after_secs),
            "agent.speculate_after_ms" => Int(g.speculate_after_ms),
            "agent.speculative_max_per_call" => Int(g.speculative_max_per_call),
            "agent.resume_after_ms" => Int(g.resume_after_ms),
            "agent.max_provider_failures" => Int(g.max_provider_failures),
            "agent.max_tool_rounds" => Int(g.max_tool_rounds),
            "agent.filler_after_ms" => Int(g.filler_after_ms),
            "agent.pre_call_deadline_ms" => Int(g.pre_call_deadline_ms),
            "stt.segmentation_silence_ms" => Int(u64::from(s.segmentation_silence_ms)),
            "llm.max_tokens" => Int(u64::from(l.max_tokens)),
            "llm.temperature" => F32(l.temperature),
            "llm.first_token_timeout_ms" => Int(l.first_token_timeout_ms),
            "llm.stall_timeout_ms" => Int(l.stall_timeout_ms),
            "llm.reasoning_max_tokens" => Int(u64::from(l.reasoning_max_tokens)),
            "tts.first_byte_timeout_ms" => Int(t.first_byte_timeout_ms),
            "tts.max_concurrency" => Int(u64::from(t.max_concurrency)),
            "ami.port" => Int(u64::from(self.ami.port)),
            "ami.action_timeout_ms" => Int(self.ami.action_timeout_ms),
            "ami.reconnect_max_ms" => Int(self.ami.reconnect_max_ms),
            "records.retention_days" => Int(self.records.retention_days),
            "records.spool_max_mb" => Int(self.records.spool_max_mb),
            "records.queue" => Int(self.records.queue),
            "webhook.backoff_initial_ms" => Int(self.webhook.backoff_initial_ms),
            "webhook.backoff_max_ms" => Int(self.webhook.backoff_max_ms),
            "webhook.timeout_ms" => Int(self.webhook.timeout_ms),
            "pricing.stt_per_hour" => F64(self.pricing.stt_per_hour),
            "pricing.tts_per_1k_chars" => F64(self.pricing.tts_per_1k_chars),
            "pricing.llm_per_million_tokens" => F64(self.pricing.llm_per_million_tokens),
            "pricing.myr_rate" => F64(self.pricing.myr_rate),
            _ => return None,
        })
    }
}

/// Type-checks one integer setting as strictly as its field.
#[derive(Deserialize)]
#[allow(dead_code)] // Only whether it deserializes matters.
struct WholeProbe(#[serde(deserialize_with = "strict::uint")] u64);

/// Type-checks one decimal setting as strictly as its field.
#[derive(Deserialize)]
#[allow(dead_code)] // Only whether it deserializes matters.
struct RealProbe(#[serde(deserialize_with = "strict::float")] f64);

/// What [`Settings::preflight`] tries besides the records file.
#[derive(Debug, Clone, Copy)]
pub struct Preflight {
    /// In AI mode, require the three API keys and check their format.
    pub keys: bool,
    /// Bind both listen addresses and release them (skip while the daemon is running).
    pub bind: bool,
}

impl Settings {
    /// The built-in defaults alone (no file, no environment): what tests start from.
    pub fn defaults() -> Self {
        // The embedded file is covered by a unit test, so this cannot fail at run time.
        Self::load_from(None, std::iter::empty()).expect("built-in config/default.toml is valid")
    }

    /// Loads defaults, then `file` if given, then `SIFUCALL_*` variables from the process
    /// environment, and the secrets.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut s = Self::load_from(file, std::env::vars())?;
        s.secrets = Secrets::from_env();
        let mut secrets = std::mem::take(&mut s.secrets);
        secrets.read_named(&s);
        s.secrets = secrets;
        Ok(s)
    }

    /// Like [`Settings::load`] with an explicit environment (for tests). Secrets are left
    /// unset.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut b = Loader::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            // Read it once here: the `config` crate's message for an unreadable file does not
            // always name it.
            if let Err(e) = std::fs::read_to_string(path) {
                return Err(ConfigError(if e.kind() == std::io::ErrorKind::NotFound {
                    format!("config file {} does not exist", path.display())
                } else {
                    format!("cannot read config file {}: {e}", path.display())
                }));
            }
            b = b.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        let prefix = format!("{ENV_PREFIX}_");
        // `SIFUCALL_X` without `__` cannot be a `SECTION__KEY` override; such a variable is
        // fine when a setting names it (a secret such as SIFUCALL_ADMIN_TOKEN), else an error
        // below (a typo such as SIFUCALL_AGENT_MODE).
        let (vars, loose): (HashMap<String, String>, HashMap<String, String>) = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .partition(|(k, _)| k[prefix.len()..].contains("__"));
        let env_src = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("audiosocket.allow")
            .with_list_parse_key("llm.fallback_models")
            .with_list_parse_key("agent.backchannels")
            .with_list_parse_key("agent.languages")
            .try_parsing(true)
            .source(Some(vars));
        b = b.add_source(env_src);
        let loaded = b.build().map_err(|e| {
            let mut msg = e.to_string();
            if let Some(path) = file {
                let name = path.display().to_string();
                if !msg.contains(&name) {
                    msg = format!("{msg} (config file {name})");
                }
            }
            ConfigError(msg)
        })?;
        let origins = Origins::from_cache(&loaded.cache, file);
        let without_profiles = super::profiles::without_profiles(&loaded.cache);
        let mut settings: Self = match without_profiles.try_deserialize() {
            Ok(s) => s,
            Err(e) => {
                // Deserialization stops at the first bad value; report every bad number.
                let first = origins.annotate(&e.to_string());
                let mut problems: Vec<String> = NUMERIC_RANGES
                    .iter()
                    .filter_map(|r| match r.kind {
                        NumberKind::Integer => loaded.get::<WholeProbe>(r.key).err(),
                        NumberKind::Decimal => loaded.get::<RealProbe>(r.key).err(),
                    })
                    .map(|e| origins.annotate(&e.to_string()))
                    .collect();
                if !problems.contains(&first) {
                    problems.insert(0, first);
                }
                return Err(ConfigError::from_problems(problems));
            }
        };
        settings.origins = origins;
        let (profiles, unresolved) = super::profiles::resolve(&loaded.cache);
        settings.profiles = profiles;
        let mut p = Problems::new(&settings.origins);
        for (key, why) in unresolved {
            p.bad(&key, why);
        }
        let mut problems = p.list;
        if let Err(e) = settings.check_loose_env(loose.keys()) {
            problems.extend(e.problems().map(str::to_owned));
        }
        if let Err(e) = settings.validate() {
            problems.extend(e.problems().map(str::to_owned));
        }
        if !problems.is_empty() {
            return Err(ConfigError::from_problems(problems));
        }
        Ok(settings)
    }

    /// Checks everything that can be checked without touching the host: ranges, URLs, names,
    /// the language tag, the log filter, the allowlist. Reports every problem, not just the
    /// first. [`Settings::load`] already calls it; call it again after changing fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::new(&self.origins);
        self.validate_values(&mut p);
        self.validate_profiles(&mut p);
        p.into_result()
    }

    /// Every check but the profiles' (which run it again over each profile's settings).
    fn validate_values(&self, p: &mut Problems<'_>) {
        for r in NUMERIC_RANGES {
            match self.number(r.key) {
                Some(v) if r.contains(v) => {}
                Some(v)
                    if matches!(v, Number::F64(x) if !x.is_finite())
                        || matches!(v, Number::F32(x) if !x.is_finite()) =>
                {
                    p.bad(
                        r.key,
                        format!("{v} is not a finite number; must be {}", r.describe()),
                    );
                }
                Some(v) => p.bad(
                    r.key,
                    format!("{v} is out of range; must be {}", r.describe()),
                ),
                None => p.bad(
                    r.key,
                    "unknown numeric setting (bug: NUMERIC_RANGES is stale)",
                ),
            }
        }
        self.validate_network(p);
        if let Err(why) = validate_log_filter(&self.log.level) {
            p.bad("log.level", why);
        }
        self.validate_agent(p);
        self.validate_providers(p);
        self.validate_pbx(p);
        if let Err(why) = records_path(&self.records.url) {
            p.bad("records.url", why);
        }
        if let Err(why) = webhook_url(&self.webhook.url) {
            p.bad("webhook.url", why);
        }
        let base = super::profiles::ProfileSettings::base(self);
        for (key, why) in super::profiles::validate_profile(&base) {
            p.bad(&key, why);
        }
    }

    /// Each profile gets every check `[agent]`, `[llm]` and `[tts]` get, reported under the
    /// profile's own keys (a problem in an inherited value is reported once, under its own
    /// section); then `[routing]` is checked against the profiles.
    fn validate_profiles(&self, p: &mut Problems<'_>) {
        for profile in self.profiles.values() {
            let view = profile.apply(self);
            let rename = |key: &str| profile.own_key(key);
            let mut inner = Problems::new(&self.origins);
            inner.rename = Some(&rename);
            view.validate_values(&mut inner);
            p.list.extend(inner.list);
        }
        for (key, why) in super::profiles::validate_routing(self) {
            p.bad(&key, why);
        }
    }

    /// `SIFUCALL_*` variables without `__` are errors unless a setting names them.
    fn check_loose_env<'a>(
        &self,
        names: impl Iterator<Item = &'a String>,
    ) -> Result<(), ConfigError> {
        let named = serde_json::to_value(self).unwrap_or_default();
        let is_named = |name: &str| {
            fn walk(v: &serde_json::Value, name: &str) -> bool {
                match v {
                    serde_json::Value::String(s) => s == name,
                    serde_json::Value::Array(a) => a.iter().any(|x| walk(x, name)),
                    serde_json::Value::Object(o) => o.values().any(|x| walk(x, name)),
                    _ => false,
                }
            }
            walk(&named, name)
        };
        let mut problems: Vec<String> = names
            .filter(|n| !is_named(n))
            .map(|n| {
                format!(
                    "environment variable {n} is not a setting: overrides are \
                     {ENV_PREFIX}_<SECTION>__<KEY> with two underscores between section and key \
                     (e.g. {ENV_PREFIX}_AGENT__MODE)"
                )
            })
            .collect();
        problems.sort();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::from_problems(problems))
        }
    }

    fn validate_pbx(&self, p: &mut Problems<'_>) {
        let a = &self.ami;
        if a.enabled && a.host.trim().is_empty() {
            p.bad("ami.host", "is empty; name the PBX (e.g. 127.0.0.1)");
        }
        if a.enabled && a.username.trim().is_empty() {
            p.bad("ami.username", "is empty; name the manager user");
        }
        for (key, name) in [
            ("ami.secret_env", &a.secret_env),
            ("admin.token_env", &self.admin.token_env),
        ] {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                p.bad(
                    key,
                    format!("{name:?} is not an environment variable name (A-Z, 0-9, _)"),
                );
            }
        }
    }

    /// Whether the admin server listens beyond loopback without a `/calls` token (the
    /// daemon refuses to start so).
    pub fn admin_needs_token(&self) -> Option<String> {
        let ip = self.admin.listen.ip().to_canonical();
        (!ip.is_loopback() && !self.secrets.admin_token.is_set()).then(|| {
            format!(
                "admin.listen = {} is reachable beyond this host, and its /calls routes change calls: \
                 set a bearer token in the environment variable {} (admin.token_env), e.g. \
                 {}=$(openssl rand -hex 24), or listen on 127.0.0.1",
                self.admin.listen, self.admin.token_env, self.admin.token_env
            )
        })
    }

    fn validate_network(&self, p: &mut Problems<'_>) {
        let a = &self.audiosocket;
        if a.allow.is_empty() {
            p.bad(
                "audiosocket.allow",
                "an empty allowlist refuses every connection",
            );
        }
        for net in &a.allow {
            let network = net.trunc();
            if *net != network {
                let host = match net {
                    IpNet::V4(_) => 32,
                    IpNet::V6(_) => 128,
                };
                p.bad(
                    "audiosocket.allow",
                    format!(
                        "{net} has host bits set and would allow all of {network}; write {network} for the \
                         whole network or {}/{host} for that one host",
                        net.addr()
                    ),
                );
            }
        }
        let (calls, admin) = (a.listen, self.admin.listen);
        let overlap = |x: IpAddr, y: IpAddr| x == y || x.is_unspecified() || y.is_unspecified();
        if calls.port() != 0 && calls.port() == admin.port() && overlap(calls.ip(), admin.ip()) {
            p.bad(
                "admin.listen",
                format!("{admin} collides with audiosocket.listen = {calls}; use another port"),
            );
        }
    }

    fn validate_agent(&self, p: &mut Problems<'_>) {
        let g = &self.agent;
        if let Err(why) = bcp47(&g.language) {
            p.bad("agent.language", why);
        }
        if let Err(why) = candidate_languages(&g.language, &g.languages) {
            p.bad("agent.languages", why);
        }
        if g.apology.trim().is_empty() {
            p.bad(
                "agent.apology",
                "is empty; it is what callers hear when a provider fails",
            );
        }
        self.validate_tools(p);
    }

    /// Transfer targets, the operator digit, the declared tools and the agent's choice of them.
    fn validate_tools(&self, p: &mut Problems<'_>) {
        let g = &self.agent;
        let reserved = ["transfer_call", "end_call"];
        let mut seen = std::collections::HashSet::new();
        for (i, t) in g.transfer_targets.iter().enumerate() {
            if let Err(why) = tool_name(&t.name) {
                p.bad(
                    "agent.transfer_targets",
                    format!("entry {}: name {why}", i + 1),
                );
            }
            if !seen.insert(t.name.as_str()) {
                p.bad(
                    "agent.transfer_targets",
                    format!("entry {}: the name {:?} is used twice", i + 1, t.name),
                );
            }
            if t.destination.trim().is_empty() {
                p.bad(
                    "agent.transfer_targets",
                    format!("entry {} ({}): destination is empty", i + 1, t.name),
                );
            }
        }
        let d = g.operator_digit.trim();
        if !(d.is_empty() || (d.len() == 1 && d.chars().all(|c| "0123456789*".contains(c)))) {
            p.bad(
                "agent.operator_digit",
                format!("{d:?} must be one keypad key (0-9 or *) or empty"),
            );
        }
        for (name, t) in &self.tools {
            let key = format!("tools.{name}");
            if let Err(why) = tool_name(name) {
                p.bad(&key, format!("the name {why}"));
            }
            if reserved.contains(&name.as_str()) {
                p.bad(&key, "is a built-in tool's name");
            }
            if let Err(why) = t.parameters_schema() {
                p.bad(&key, why);
            }
            if !(100..=30_000).contains(&t.timeout_ms) {
                p.bad(
                    &key,
                    format!("timeout_ms {} must be between 100 and 30000", t.timeout_ms),
                );
            }
            if reqwest::Method::from_bytes(t.method.trim().to_ascii_uppercase().as_bytes()).is_err()
            {
                p.bad(&key, format!("method {:?} is not an HTTP method", t.method));
            }
            let probe = t.url.replace(['{', '}'], "");
            match Url::parse(probe.trim()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
                Ok(_) => p.bad(&key, "url must be http:// or https:// with a host"),
                Err(e) => p.bad(&key, format!("url is not a URL ({e})")),
            }
        }
        for (name, m) in &self.mcp {
            let key = format!("mcp.{name}");
            if let Err(why) = service_url(&m.url, &["http", "https"], false) {
                p.bad(&key, format!("url: {why}"));
            }
            if !(100..=30_000).contains(&m.timeout_ms) {
                p.bad(
                    &key,
                    format!("timeout_ms {} must be between 100 and 30000", m.timeout_ms),
                );
            }
            if self.tools.contains_key(name) {
                p.bad(&key, "has the name of a [tools] entry");
            }
        }
        let headers = self
            .tools
            .iter()
            .map(|(n, t)| (format!("tools.{n}"), &t.headers))
            .chain(
                self.mcp
                    .iter()
                    .map(|(n, m)| (format!("mcp.{n}"), &m.headers)),
            );
        for (key, headers) in headers {
            for (name, value) in headers {
                let n = name.to_ascii_lowercase();
                let secret = n == "authorization"
                    || ["token", "secret", "key", "auth", "cookie"]
                        .iter()
                        .any(|w| n.contains(w));
                if secret && !value.contains("${") {
                    p.bad(
                        &key,
                        format!(
                            "header {name} looks like a secret written in the file; put it in an \
                             environment variable and write ${{NAME}} (e.g. \"Bearer ${{CRM_TOKEN}}\")"
                        ),
                    );
                }
            }
        }
        for name in &g.tools {
            if !self.tools.contains_key(name) && !self.mcp.contains_key(name) {
                p.bad(
                    "agent.tools",
                    format!("{name:?} is neither a [tools.{name}] nor an [mcp.{name}] entry"),
                );
            }
        }
        let lookup = g.pre_call_lookup.trim();
        if !lookup.is_empty() && !self.tools.contains_key(lookup) {
            p.bad(
                "agent.pre_call_lookup",
                format!("{lookup:?} is not a [tools.{lookup}] entry"),
            );
        }
    }

    fn validate_providers(&self, p: &mut Problems<'_>) {
        let (s, l, t) = (&self.stt, &self.llm, &self.tts);
        if s.provider != "azure" {
            p.bad("stt.provider", "only \"azure\" is supported");
        }
        if s.endpoint.trim().is_empty() {
            if let Err(why) = hostname_label(&s.region) {
                p.bad("stt.region", why);
            }
        } else if let Err(why) = service_url(&s.endpoint, &["ws", "wss"], true) {
            p.bad("stt.endpoint", why);
        }
        if l.provider != "openrouter" {
            p.bad(
                "llm.provider",
                "only \"openrouter\" (any OpenAI-compatible server) is supported",
            );
        }
        if let Err(why) = service_url(&l.base_url, &["http", "https"], true) {
            p.bad("llm.base_url", why);
        }
        if let Err(why) = model_name(&l.model) {
            p.bad("llm.model", why);
        }
        for (i, m) in l.fallback_models.iter().enumerate() {
            if let Err(why) = model_name(m) {
                p.bad("llm.fallback_models", format!("entry {}: {why}", i + 1));
            }
        }
        if !REASONING_EFFORTS.contains(&l.reasoning_effort.as_str()) {
            p.bad(
                "llm.reasoning_effort",
                format!(
                    "{:?} is not one of {:?}",
                    l.reasoning_effort, REASONING_EFFORTS
                ),
            );
        }
        if t.provider != "elevenlabs" {
            p.bad("tts.provider", "only \"elevenlabs\" is supported");
        }
        if let Err(why) = service_url(&t.base_url, &["http", "https"], false) {
            p.bad("tts.base_url", why);
        }
        for (key, value) in [("tts.voice_id", &t.voice_id), ("tts.model_id", &t.model_id)] {
            if let Err(why) = identifier(value) {
                p.bad(key, why);
            }
        }
        let code = &t.language_code;
        if !(code.is_empty()
            || ((2..=3).contains(&code.len()) && code.chars().all(|c| c.is_ascii_lowercase())))
        {
            p.bad(
                "tts.language_code",
                format!("{code:?} is not an ISO 639-1 code such as \"ms\" or \"en\" (or empty)"),
            );
        }
    }

    /// Checks what only the host can answer, as `sifucall run` would meet it: the API keys
    /// (AI mode), whether the records file can be written (trying it, without leaving
    /// anything behind), and whether both listen addresses can be bound (binding and
    /// releasing them). Returns every problem found.
    pub fn preflight(&self, what: Preflight) -> Vec<String> {
        let mut p = Problems::new(&self.origins);
        if what.keys && self.agent.mode == AgentMode::Ai {
            self.check_keys(&mut p);
            self.check_tool_env(&mut p, &|k| std::env::var(k).ok());
        }
        if let Ok(Some(path)) = records_path(&self.records.url) {
            if let Err(why) = probe_records_file(&path) {
                p.bad("records.url", why);
            }
        }
        if what.bind {
            self.probe_listen(&mut p);
        }
        if let Some(why) = self.admin_needs_token() {
            p.bad("admin.listen", why);
        }
        if self.ami.enabled && !self.secrets.ami_secret.is_set() {
            p.bad(
                "ami.enabled",
                format!(
                    "the manager secret is not in the environment variable {} (ami.secret_env)",
                    self.ami.secret_env
                ),
            );
        }
        if self.ami.enabled && self.ami.tls && !self.ami.tls_ca_file.trim().is_empty() {
            if let Err(e) = std::fs::read(self.ami.tls_ca_file.trim()) {
                p.bad("ami.tls_ca_file", format!("cannot read it: {e}"));
            }
        }
        p.list
    }

    fn check_keys(&self, p: &mut Problems<'_>) {
        let named = self.secrets.named();
        let missing: Vec<&str> = named
            .iter()
            .filter(|(_, s)| !s.is_set())
            .map(|(name, _)| *name)
            .collect();
        if !missing.is_empty() {
            p.bad(
                "agent.mode",
                format!(
                    "\"ai\" needs the API keys AZURE_SPEECH_KEY, OPENROUTER_API_KEY and \
                     ELEVENLABS_API_KEY in the environment; not set: {} (under systemd they go in \
                     /etc/sifucall/sifucall.env). \
                     Without keys, try `sifucall demo` (one scripted call against local stand-ins), \
                     `sifucall sandbox` (the daemon against local stand-ins), or agent.mode = \"echo\" \
                     (SIFUCALL_AGENT__MODE=echo) to test the PBX plumbing",
                    missing.join(", "),
                ),
            );
        }
        for (name, secret) in named {
            if let Some(why) = secret.format_problem() {
                p.list
                    .push(format!("invalid API key {name} (environment): {why}"));
            }
        }
    }

    /// Every `${NAME}` a tool's or MCP server's header refers to is set (the values are
    /// secrets: only the names are ever shown).
    fn check_tool_env(&self, p: &mut Problems<'_>, env: &dyn Fn(&str) -> Option<String>) {
        let headers = self
            .tools
            .iter()
            .map(|(n, t)| (format!("tools.{n}"), &t.headers))
            .chain(
                self.mcp
                    .iter()
                    .map(|(n, m)| (format!("mcp.{n}"), &m.headers)),
            );
        for (key, headers) in headers {
            for (name, value) in headers {
                if let Err(why) = crate::call::tools::http::expand_env(value, env) {
                    p.bad(&key, format!("header {name} {why} in the environment"));
                }
            }
        }
    }

    fn probe_listen(&self, p: &mut Problems<'_>) {
        // Held together, so two settings naming the same address are caught too.
        let mut held = Vec::new();
        for (key, addr) in [
            ("audiosocket.listen", self.audiosocket.listen),
            ("admin.listen", self.admin.listen),
        ] {
            match std::net::TcpListener::bind(addr) {
                Ok(listener) => held.push(listener),
                Err(e) => {
                    let hint = match e.kind() {
                        std::io::ErrorKind::AddrInUse => format!(
                            "; another process (a running sifucall?) holds it: ss -ltnp 'sport = :{}'",
                            addr.port()
                        ),
                        std::io::ErrorKind::PermissionDenied => {
                            "; ports below 1024 need privileges the service does not have".into()
                        }
                        std::io::ErrorKind::AddrNotAvailable => {
                            "; no network interface on this host has that address".into()
                        }
                        _ => String::new(),
                    };
                    p.bad(key, format!("cannot listen on {addr}: {e}{hint}"));
                }
            }
        }
    }

    /// The settings as JSON for `sifucall check`: API keys are `<redacted>`, and secrets
    /// inside URLs (passwords, query values, token-like path segments) are replaced by
    /// `REDACTED`.
    pub fn redacted_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        let mut v = serde_json::to_value(self)?;
        for (section, key) in [
            ("records", "url"),
            ("webhook", "url"),
            ("llm", "base_url"),
            ("tts", "base_url"),
            ("stt", "endpoint"),
        ] {
            if let Some(field) = v.get_mut(section).and_then(|s| s.get_mut(key)) {
                if let Some(url) = field.as_str() {
                    *field = serde_json::Value::String(redact_url(url));
                }
            }
        }
        Ok(v)
    }

    /// Where `key` (`section.key`) got its value: `set in FILE`, `set by environment
    /// variable SIFUCALL_...` or `built-in default`; `None` for settings not loaded from
    /// sources.
    pub fn origin_of(&self, key: &str) -> Option<String> {
        self.origins.describe(key)
    }
}

/// Maps a key to the name it is reported under, or to `None` to leave it out.
type Rename<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Collects problems, each naming its key and origin.
struct Problems<'a> {
    origins: &'a Origins,
    list: Vec<String>,
    /// Reports a key under another name (a profile's own key), or not at all (`None`).
    rename: Option<Rename<'a>>,
}

impl<'a> Problems<'a> {
    fn new(origins: &'a Origins) -> Self {
        Self {
            origins,
            list: Vec::new(),
            rename: None,
        }
    }

    fn bad(&mut self, key: &str, why: impl fmt::Display) {
        let renamed;
        let key = match self.rename {
            Some(rename) => match rename(key) {
                Some(k) => {
                    renamed = k;
                    renamed.as_str()
                }
                None => return,
            },
            None => key,
        };
        self.list.push(match self.origins.describe(key) {
            Some(origin) => format!("invalid value for key `{key}` ({origin}): {why}"),
            None => format!("invalid value for key `{key}`: {why}"),
        });
    }

    fn into_result(self) -> Result<(), ConfigError> {
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::from_problems(self.list))
        }
    }
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    BuiltIn,
    File,
    Env,
}

/// The origin of every `section` and `section.key` (and deeper keys, as in
/// `profiles.NAME.key`) after layering, and the line of each key in the file.
#[derive(Clone, Default)]
struct Origins {
    file: Option<PathBuf>,
    by_key: HashMap<String, Origin>,
    lines: HashMap<String, usize>,
}

impl fmt::Debug for Origins {
    // Kept short: `Settings` is sometimes logged with `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origins")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// The `config` crate's origin string for environment values.
const ENV_ORIGIN: &str = "the environment";

impl Origins {
    fn from_cache(cache: &config::Value, file: Option<&Path>) -> Self {
        let origin = |v: &config::Value| match v.origin() {
            None => Origin::BuiltIn,
            Some(ENV_ORIGIN) => Origin::Env,
            Some(_) => Origin::File,
        };
        let mut by_key = HashMap::new();
        if let ValueKind::Table(sections) = &cache.kind {
            for (section, table) in sections {
                by_key.insert(section.clone(), origin(table));
                if let ValueKind::Table(keys) = &table.kind {
                    for (key, value) in keys {
                        by_key.insert(format!("{section}.{key}"), origin(value));
                        if let ValueKind::Table(deeper) = &value.kind {
                            for (k, v) in deeper {
                                by_key.insert(format!("{section}.{key}.{k}"), origin(v));
                            }
                        }
                    }
                }
            }
        }
        let lines = file
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|text| key_lines(&text))
            .unwrap_or_default();
        Self {
            file: file.map(Path::to_owned),
            by_key,
            lines,
        }
    }

    fn describe(&self, key: &str) -> Option<String> {
        Some(match self.by_key.get(key)? {
            Origin::BuiltIn => "built-in default".to_owned(),
            Origin::Env => format!("set by environment variable {}", env_var(key)),
            Origin::File => match (&self.file, self.lines.get(key)) {
                (Some(path), Some(line)) => format!("set in {}:{line}", path.display()),
                (Some(path), None) => format!("set in {}", path.display()),
                (None, _) => "set in the config file".to_owned(),
            },
        })
    }

    /// Adds the origin to a `config` crate message that names a key ("... for key `a.b`").
    fn annotate(&self, msg: &str) -> String {
        let Some(key) = msg
            .split("for key `")
            .nth(1)
            .and_then(|r| r.split('`').next())
        else {
            return msg.to_owned();
        };
        // An unknown key is reported against its section; the key itself has the origin.
        let unknown = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map(|field| format!("{key}.{field}"));
        let origin = unknown
            .as_deref()
            .and_then(|k| self.describe(k))
            .or_else(|| self.describe(key));
        match origin {
            Some(o) if !msg.contains(ENV_ORIGIN) => format!("{msg} ({o})"),
            _ => msg.to_owned(),
        }
    }
}

/// The line of every key in a TOML file, by dotted path (`profiles.sales.greeting` -> 12).
fn key_lines(text: &str) -> HashMap<String, usize> {
    fn walk(
        text: &str,
        prefix: &str,
        table: &toml::de::DeTable<'_>,
        out: &mut HashMap<String, usize>,
    ) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            let at = key.span().start.min(text.len());
            out.entry(path.clone())
                .or_insert_with(|| text[..at].matches('\n').count() + 1);
            if let toml::de::DeValue::Table(t) = value.get_ref() {
                walk(text, &path, t, out);
            }
        }
    }
    let mut out = HashMap::new();
    if let Ok(doc) = toml::de::DeTable::parse(text) {
        walk(text, "", doc.get_ref(), &mut out);
    }
    out
}

/// `audiosocket.max_calls` -> `SIFUCALL_AUDIOSOCKET__MAX_CALLS`.
fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}_{}", key.to_uppercase().replace('.', "__"))
}

/// Strict number parsing for the `config` crate, which would otherwise round `1.5` to 2,
/// read `true` as 1 and saturate `1e30`. Strings are accepted when they parse exactly (an
/// environment value the crate did not already turn into a number).
mod strict {
    use std::fmt;

    use serde::Deserializer;
    use serde::de::{self, Unexpected, Visitor};

    struct Whole;

    impl Visitor<'_> for Whole {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number (no decimal point, not true/false)")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }

        fn visit_u128<E: de::Error>(self, v: u128) -> Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| E::invalid_value(Unexpected::Other("a huge number"), &self))
        }

        fn visit_i128<E: de::Error>(self, v: i128) -> Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| E::invalid_value(Unexpected::Other("a huge number"), &self))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            v.parse()
                .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
        }
    }

    struct Real;

    impl Visitor<'_> for Real {
        type Value = f64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number")
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            v.parse()
                .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
        }
    }

    /// A whole number that fits `T`.
    pub(super) fn uint<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        let v = d.deserialize_any(Whole)?;
        T::try_from(v).map_err(|_| {
            de::Error::invalid_value(Unexpected::Unsigned(v), &"a smaller whole number")
        })
    }

    /// Any number; range checks (which also reject NaN and infinities) come later.
    pub(super) fn float<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        d.deserialize_any(Real)
    }

    /// As [`float`], narrowed to `f32` (huge values become infinite and fail the range).
    pub(super) fn float32<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(d.deserialize_any(Real)? as f32)
    }
}

/// The level names `tracing` knows.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a log filter (`log.level`, `RUST_LOG`): a level name, or comma-separated
/// `target=level` directives, where every level is one of trace, debug, info, warn, error,
/// off. `EnvFilter` itself would read an unknown word such as `inf` or `warning` as a target
/// name and silently log nothing, so this is stricter than it.
pub fn validate_log_filter(filter: &str) -> Result<(), String> {
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()));
    let names = LEVELS.join(", ");
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(format!(
            "is empty; use a level ({names}) or directives like \"info,sifucall=debug\""
        ));
    }
    for d in directives {
        // `target[span{field=value}]` has no level of its own; `...=level` ends in one.
        let level = if d.ends_with(']') {
            None
        } else {
            d.rsplit_once('=').map(|(_, level)| level)
        };
        match level {
            Some(l) if is_level(l) => {}
            Some(l) => {
                return Err(format!(
                    "{l:?} in {d:?} is not a level name{}; use one of {names}",
                    suggest_level(l)
                ));
            }
            None if is_level(d) => {}
            None => {
                return Err(format!(
                    "{d:?} is not a level name{} (use one of {names}); a directive for one module \
                     is written module=level, e.g. sifucall=debug",
                    suggest_level(d)
                ));
            }
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| format!("{filter:?} is not a valid filter: {e}"))
}

/// ` (did you mean "info"?)` for `inf`, `warning`, `err`...
fn suggest_level(word: &str) -> String {
    let w = word.trim().to_ascii_lowercase();
    LEVELS
        .iter()
        .find(|l| !w.is_empty() && (l.starts_with(w.as_str()) || w.starts_with(*l)))
        .map(|l| format!(" (did you mean {l:?}?)"))
        .unwrap_or_default()
}

/// `[agent] languages`: none, or `language` alone, or 2 to 10 tags (Azure's limit for
/// continuous identification) with `language` among them and one locale per base language
/// (identification tells languages apart, not accents).
fn candidate_languages(language: &str, languages: &[String]) -> Result<(), String> {
    for tag in languages {
        bcp47(tag)?;
    }
    match languages {
        [] => return Ok(()),
        [one] if one == language => return Ok(()),
        [one] => {
            return Err(format!(
                "a single entry must be agent.language ({language:?}), not {one:?}; list two or \
                 more to identify the caller's language, or set agent.language"
            ));
        }
        _ => {}
    }
    if languages.len() > 10 {
        return Err(format!(
            "{} languages; continuous language identification takes at most 10",
            languages.len()
        ));
    }
    if !languages.iter().any(|l| l == language) {
        return Err(format!(
            "must include agent.language ({language:?}): the language the call starts in"
        ));
    }
    let base = |l: &str| l.split('-').next().unwrap_or(l).to_ascii_lowercase();
    for (i, a) in languages.iter().enumerate() {
        if let Some(b) = languages[..i].iter().find(|b| base(b) == base(a)) {
            return Err(format!(
                "{b:?} and {a:?} are the same language; list one locale per language"
            ));
        }
    }
    Ok(())
}

/// A BCP-47 language tag of the shape Azure expects: `ms-MY`, `en-US`, `zh-Hans-CN`,
/// `es-419`.
fn bcp47(tag: &str) -> Result<(), String> {
    let bad = || {
        let hint = if tag.contains('_') {
            format!(
                " (write {:?}: subtags are joined with '-')",
                tag.replace('_', "-")
            )
        } else {
            String::new()
        };
        Err(format!(
            "{tag:?} is not a BCP-47 language tag such as \"ms-MY\", \"en-US\" or \"zh-Hans-CN\"{hint}"
        ))
    };
    let mut parts = tag.split('-');
    let lang = parts.next().unwrap_or_default();
    if !((2..=3).contains(&lang.len()) && lang.chars().all(|c| c.is_ascii_alphabetic())) {
        return bad();
    }
    let (mut script, mut region) = (false, false);
    for part in parts {
        let alpha = part.chars().all(|c| c.is_ascii_alphabetic());
        let digits = part.chars().all(|c| c.is_ascii_digit());
        let alnum = part.chars().all(|c| c.is_ascii_alphanumeric());
        if part.len() == 4 && alpha && !script && !region {
            script = true;
        } else if ((part.len() == 2 && alpha) || (part.len() == 3 && digits)) && !region {
            region = true;
        } else if alnum
            && ((5..=8).contains(&part.len())
                || (part.len() == 4 && part.starts_with(|c: char| c.is_ascii_digit())))
        {
            // A variant, e.g. `de-CH-1996`.
        } else {
            return bad();
        }
    }
    Ok(())
}

/// One DNS label (the Azure region becomes part of a host name).
fn hostname_label(region: &str) -> Result<(), String> {
    let ok = !region.is_empty()
        && region.len() <= 63
        && region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !region.starts_with('-')
        && !region.ends_with('-');
    if ok {
        Ok(())
    } else if region.trim().is_empty() {
        Err(
            "is empty; set the Azure Speech region, e.g. \"southeastasia\" (or stt.endpoint)"
                .into(),
        )
    } else {
        Err(format!(
            "{region:?} is not an Azure region name such as \"southeastasia\""
        ))
    }
}

/// A model name: anything without spaces or control characters (`openai/gpt-4o-mini`).
fn model_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        Err("is empty".into())
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!(
            "{name:?} contains whitespace or control characters"
        ))
    } else {
        Ok(())
    }
}

/// An id that goes into a URL path or query: letters, digits, `-`, `_`, `.`.
/// A function name the model can call: `^[A-Za-z0-9_-]{1,64}$`.
fn tool_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{name:?} must be 1 to 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "{name:?} may hold only letters, digits, '_' and '-'"
        ));
    }
    Ok(())
}

fn identifier(id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        Err("is empty".into())
    } else if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Err(format!(
            "{id:?} may contain only letters, digits, '-', '_' and '.'"
        ))
    } else {
        Ok(())
    }
}

/// A provider URL the daemon appends its own path and query to.
fn service_url(s: &str, schemes: &[&str], needs_path: bool) -> Result<Url, String> {
    let url = Url::parse(s.trim()).map_err(|e| format!("not a URL ({e})"))?;
    let shown = redact_url(url.as_str());
    if !schemes.contains(&url.scheme()) {
        let want: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
        return Err(format!(
            "{shown:?}: scheme {:?} is not supported; use {}",
            url.scheme(),
            want.join(" or ")
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{shown:?} has no host"));
    }
    if needs_path && url.path().trim_matches('/').is_empty() {
        return Err(format!(
            "{shown:?} has no path; the API lives under one (e.g. https://openrouter.ai/api/v1, \
             wss://REGION.stt.speech.microsoft.com/speech/recognition/conversation/cognitiveservices/v1)"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{shown:?} must not have a query string or fragment; the daemon adds its own parameters"
        ));
    }
    Ok(url)
}

/// `records.url`: empty, a database URL, or `file:///absolute/path/to/file`.
fn records_path(s: &str) -> Result<Option<PathBuf>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if s.starts_with("sqlite:") || s.starts_with("postgres") {
        // A database: `sifucall check` connects and migrates it (main.rs).
        return crate::ops::records::db::DbUrl::parse(s).map(|_| None);
    }
    let example = "file:///var/lib/sifucall/calls.jsonl";
    let url = Url::parse(s).map_err(|e| {
        format!(
            "not a URL ({e}); write sqlite:///var/lib/sifucall/calls.db, postgres://user@host/db, \
             {example} (JSON lines) or leave it empty"
        )
    })?;
    if url.scheme() != "file" {
        return Err(format!(
            "scheme {:?} is not supported: records go to a database \
             (sqlite:///var/lib/sifucall/calls.db or postgres://user@host/db) or a JSON-lines file \
             such as {example} (use webhook.url to send them over HTTP)",
            url.scheme()
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{s:?} must not have a query string or fragment"));
    }
    let path = url
        .to_file_path()
        .map_err(|()| format!("{s:?} is not a local absolute path; write {example}"))?;
    if s.ends_with('/') || path.file_name().is_none() {
        return Err(format!(
            "{s:?} names a directory, not a file; e.g. {example}"
        ));
    }
    Ok(Some(path))
}

/// `webhook.url`: empty, or `http(s)://host/...` (a query may carry a token).
fn webhook_url(s: &str) -> Result<Option<Url>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let url = Url::parse(s).map_err(|e| format!("not a URL ({e}); use http:// or https://"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme {:?} is not supported; use http:// or https://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    Ok(Some(url))
}

/// Tries what the records writer will do, leaving nothing behind: opens an existing file
/// for appending, or creates and removes a probe file in its directory, or (when the
/// directory does not exist yet) a probe directory where it would be created.
fn probe_records_file(path: &Path) -> Result<(), String> {
    let probe_name = format!(".sifucall-check-{}", std::process::id());
    if path.is_dir() {
        return Err(format!(
            "{} is a directory; name a file inside it, e.g. {}",
            path.display(),
            path.join("calls.jsonl").display()
        ));
    }
    if path.exists() {
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|e| format!("cannot write {}: {e}", path.display()));
    }
    let Some(dir) = path.parent() else {
        return Err(format!("{} has no directory", path.display()));
    };
    if dir.is_dir() {
        let probe = dir.join(&probe_name);
        return std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .map(|_| {
                let _ = std::fs::remove_file(&probe);
            })
            .map_err(|e| format!("cannot create files in {}: {e}", dir.display()));
    }
    let mut ancestor = dir;
    while !ancestor.exists() {
        match ancestor.parent() {
            Some(up) => ancestor = up,
            None => break,
        }
    }
    if !ancestor.is_dir() {
        return Err(format!(
            "cannot create {}: {} is not a directory",
            dir.display(),
            ancestor.display()
        ));
    }
    let probe = ancestor.join(&probe_name);
    std::fs::create_dir(&probe)
        .map(|()| {
            let _ = std::fs::remove_dir(&probe);
        })
        .map_err(|e| {
            format!(
                "{} does not exist and cannot be created in {}: {e}",
                dir.display(),
                ancestor.display()
            )
        })
}

/// The text that replaces secrets in printed URLs.
const REDACTED: &str = "REDACTED";

/// A URL safe to print: the password (or a lone user name, often a token), every query
/// value, the fragment and token-like path segments (16+ characters mixing letters and
/// digits, as in Slack or Discord webhook URLs) become `REDACTED`. Text that is not a URL
/// is replaced entirely.
pub fn redact_url(s: &str) -> String {
    if s.trim().is_empty() {
        return String::new();
    }
    let Ok(mut url) = Url::parse(s.trim()) else {
        return format!("<{REDACTED}: not a URL>");
    };
    if url.password().is_some() {
        let _ = url.set_password(Some(REDACTED));
    } else if !url.username().is_empty() {
        let _ = url.set_username(REDACTED);
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if v.is_empty() {
                    String::new()
                } else {
                    REDACTED.to_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        if pairs.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
    }
    if url.fragment().is_some() {
        url.set_fragment(Some(REDACTED));
    }
    let token_like = |seg: &str| {
        seg.len() >= 16
            && seg.chars().any(|c| c.is_ascii_digit())
            && seg.chars().any(|c| c.is_ascii_alphabetic())
    };
    // Segments stay percent-encoded, which `set_path` keeps as they are.
    let path: Option<String> = url.path_segments().map(|segs| {
        let kept: Vec<&str> = segs
            .map(|seg| if token_like(seg) { REDACTED } else { seg })
            .collect();
        format!("/{}", kept.join("/"))
    });
    if let Some(path) = path {
        url.set_path(&path);
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A scratch directory unique to this test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sifucall-cfg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Loads the defaults plus one TOML snippet written to a file.
    fn with_toml(dir: &Path, toml: &str) -> Result<Settings, ConfigError> {
        let path = dir.join("sifucall.toml");
        std::fs::write(&path, toml).unwrap();
        Settings::load_from(Some(&path), env(&[]))
    }

    fn with_env(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(None, env(pairs))
    }

    fn err_with_env(pairs: &[(&str, &str)]) -> String {
        match with_env(pairs) {
            Ok(_) => panic!("{pairs:?} was accepted"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn tools_targets_and_mcp_load_from_a_file_with_their_case_kept() {
        let dir = scratch("tools");
        let s = with_toml(
            &dir,
            r#"
[agent]
tools = ["orderStatus", "crm"]
transfer_targets = [{ name = "sales", description = "buying", destination = "SIP/201" }]
pre_call_lookup = "orderStatus"

[tools.orderStatus]
description = "Find an order."
parameters = { type = "object", properties = { orderId = { type = "string" } }, additionalProperties = false }
url = "https://crm.example.my/orders/{orderId}?x=1"
headers = { Authorization = "Bearer ${CRM_TOKEN}" }
timeout_ms = 2500
redact = ["icNumber"]

[tools.json_schema]
description = "Schema as JSON text."
parameters = '{"type": "object", "properties": {"q": {"type": "string"}}}'
url = "http://127.0.0.1:9/q"

[mcp.crm]
url = "http://127.0.0.1:9/mcp"
tools = ["findCustomer"]
"#,
        )
        .unwrap();
        let t = &s.tools["orderStatus"];
        let schema = t.parameters_schema().unwrap();
        assert!(schema.pointer("/properties/orderId").is_some(), "{schema}");
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(t.headers["Authorization"], "Bearer ${CRM_TOKEN}");
        assert_eq!(t.timeout_ms, 2500);
        assert_eq!(t.method, "GET");
        assert!(!t.speakable);
        let q = s.tools["json_schema"].parameters_schema().unwrap();
        assert!(q.pointer("/properties/q").is_some());
        assert_eq!(s.mcp["crm"].tools, ["findCustomer"]);
        assert_eq!(s.mcp["crm"].timeout_ms, 3000);
        assert_eq!(s.agent.transfer_targets[0].destination, "SIP/201");
        assert_eq!(s.agent.tools, ["orderStatus", "crm"]);
    }

    #[test]
    fn preflight_names_header_variables_that_are_not_set() {
        let dir = scratch("tool-env");
        let s = with_toml(
            &dir,
            r#"
[tools.t]
description = "d"
url = "http://127.0.0.1:9/"
headers = { Authorization = "Bearer ${SIFUCALL_TEST_SURELY_UNSET_TOKEN}", X-Ok = "${HOME_SET}" }
"#,
        )
        .unwrap();
        let mut p = Problems::new(&s.origins);
        s.check_tool_env(&mut p, &|k| (k == "HOME_SET").then(|| "v".into()));
        assert_eq!(p.list.len(), 1, "{:?}", p.list);
        assert!(
            p.list[0].contains("${SIFUCALL_TEST_SURELY_UNSET_TOKEN}, which is not set"),
            "{:?}",
            p.list
        );
    }

    #[test]
    fn defaults_load() {
        let s = Settings::defaults();
        assert_eq!(s.audiosocket.listen.port(), 10000);
        assert_eq!(s.agent.mode, AgentMode::Ai);
        assert_eq!(s.stt.segmentation_silence_ms, 300);
        assert_eq!(s.tts.output_format, OutputFormat::Ulaw8000);
        assert!(
            s.audiosocket
                .allow
                .iter()
                .any(|n| n.contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()))
        );
        assert_eq!(
            s.origin_of("audiosocket.max_calls").as_deref(),
            Some("built-in default")
        );
    }

    #[test]
    fn env_overrides() {
        let s = with_env(&[
            ("SIFUCALL_AGENT__MODE", "echo"),
            ("SIFUCALL_AUDIOSOCKET__MAX_CALLS", "7"),
            ("SIFUCALL_AUDIOSOCKET__ALLOW", "10.0.0.0/8,192.168.1.0/24"),
            ("SIFUCALL_STT__SEGMENTATION_SILENCE_MS", "500"),
            ("SIFUCALL_AGENT__ECHO_MARGIN_DB", "9"),
            ("UNRELATED", "x"),
        ])
        .unwrap();
        assert_eq!(s.agent.mode, AgentMode::Echo);
        assert_eq!(s.audiosocket.max_calls, 7);
        assert_eq!(s.audiosocket.allow.len(), 2);
        assert_eq!(s.stt.segmentation_silence_ms, 500);
        assert_eq!(s.agent.echo_margin_db, 9.0);
        assert_eq!(
            s.origin_of("audiosocket.max_calls").as_deref(),
            Some("set by environment variable SIFUCALL_AUDIOSOCKET__MAX_CALLS")
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = err_with_env(&[("SIFUCALL_AUDIOSOCKET__MAX_CALLS", "lots")]);
        assert!(e.contains("max_calls"), "{e}");
        assert!(e.contains("SIFUCALL_AUDIOSOCKET__MAX_CALLS"), "{e}");
        let e = err_with_env(&[("SIFUCALL_AGENT__MODE", "karaoke")]);
        assert!(e.contains("mode"), "{e}");
        let e = err_with_env(&[("SIFUCALL_STT__SEGMENTATION_SILENCE_MS", "50")]);
        assert!(e.contains("stt.segmentation_silence_ms"), "{e}");
        let e = err_with_env(&[("SIFUCALL_AUDIOSOCKET__ALLOW", "not-a-net")]);
        assert!(e.contains("allow"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let e = with_env(&[
            ("SIFUCALL_LLM__MAX_TOKENS", "0"),
            ("SIFUCALL_TTS__VOICE_ID", ""),
            ("SIFUCALL_AGENT__LANGUAGE", "ms_MY"),
        ])
        .unwrap_err();
        let lines: Vec<&str> = e.problems().collect();
        assert_eq!(lines.len(), 3, "{e}");
        for (key, var) in [
            ("llm.max_tokens", "SIFUCALL_LLM__MAX_TOKENS"),
            ("tts.voice_id", "SIFUCALL_TTS__VOICE_ID"),
            ("agent.language", "SIFUCALL_AGENT__LANGUAGE"),
        ] {
            assert!(
                lines.iter().any(|l| l.contains(key) && l.contains(var)),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = scratch("file-errors");
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[admin]\nlisten = \"nonsense\"\n").unwrap();
        let e = Settings::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(e.0.contains("admin.listen"), "{e}");
        assert!(e.0.contains("bad.toml"), "{e}");
        std::fs::write(&path, "[admin]\nlisen = \"127.0.0.1:1\"\n").unwrap();
        let e = Settings::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(e.0.contains("lisen") && e.0.contains("bad.toml"), "{e}");
        std::fs::write(&path, "[admin\n").unwrap();
        let e = Settings::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(e.0.contains("bad.toml"), "{e}");
        let e = Settings::load_from(Some(&dir.join("missing.toml")), env(&[])).unwrap_err();
        assert!(
            e.0.contains("does not exist") && e.0.contains("missing.toml"),
            "{e}"
        );
        // Unreadable (a directory; permission bits do not stop root).
        let e = Settings::load_from(Some(&dir), env(&[])).unwrap_err();
        assert!(
            e.0.contains("cannot read config file") && e.0.contains(&*dir.to_string_lossy()),
            "{e}"
        );
        std::fs::write(&path, "[llm]\nmax_tokens = 0\n").unwrap();
        let e = Settings::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(
            e.0.contains("llm.max_tokens") && e.0.contains(&format!("set in {}", path.display())),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The values to try at the edges of one range: (TOML literal, env value, accepted).
    fn edge_cases(r: &NumericRange) -> Vec<(String, String, bool)> {
        let mut cases = Vec::new();
        let mut both = |v: String, ok: bool| cases.push((v.clone(), v, ok));
        match r.kind {
            NumberKind::Integer => {
                let (min, max) = (r.min as u64, r.max as u64);
                if min > 0 {
                    both((min - 1).to_string(), false);
                }
                both(min.to_string(), true);
                both(max.to_string(), true);
                both((max + 1).to_string(), false);
                both("-1".into(), false);
                both(format!("{}.5", min), false);
                both(format!("{}.0", max), false);
                both("1e30".into(), false);
                both("true".into(), false);
                both("false".into(), false);
            }
            NumberKind::Decimal => {
                let step = (r.max - r.min) / 100.0;
                both(format!("{:?}", r.min - step), false);
                both(format!("{:?}", r.min), true);
                both(format!("{:?}", r.max), true);
                both(format!("{:?}", r.max + step), false);
                both(format!("{:?}", (r.min + r.max) / 2.0), true);
                both("1e30".into(), false);
                both("true".into(), false);
                cases.push(("nan".into(), "NaN".into(), false));
                cases.push(("inf".into(), "inf".into(), false));
                cases.push(("-inf".into(), "-inf".into(), false));
            }
        }
        cases
    }

    #[test]
    fn every_numeric_setting_is_range_checked_at_its_edges() {
        let dir = scratch("ranges");
        for r in NUMERIC_RANGES {
            let (section, key) = r.key.split_once('.').unwrap();
            let var = env_var(r.key);
            for (toml_value, env_value, ok) in edge_cases(r) {
                let from_file = with_toml(&dir, &format!("[{section}]\n{key} = {toml_value}\n"));
                let from_env = with_env(&[(var.as_str(), env_value.as_str())]);
                for (how, result, origin) in [
                    ("file", from_file, "sifucall.toml"),
                    ("env", from_env, var.as_str()),
                ] {
                    match (result, ok) {
                        (Ok(s), true) => {
                            let got = s.number(r.key).unwrap().to_string().parse::<f64>().unwrap();
                            let want: f64 = env_value.parse().unwrap();
                            assert!(
                                (got - want).abs() <= want.abs() * 1e-6,
                                "{} = {toml_value} via {how} became {got}",
                                r.key
                            );
                        }
                        (Err(e), false) => {
                            assert!(
                                e.0.contains(r.key) && e.0.contains(origin),
                                "{} = {toml_value} via {how}: {e}",
                                r.key
                            );
                        }
                        (Ok(_), false) => {
                            panic!("{} = {toml_value} via {how} was accepted", r.key)
                        }
                        (Err(e), true) => {
                            panic!("{} = {toml_value} via {how} was refused: {e}", r.key)
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_numeric_table_covers_every_number_and_defaults_document_it() {
        // Every number in the defaults is in the table...
        let defaults: toml_like::Doc = toml_like::parse(DEFAULT_TOML);
        for (key, value) in &defaults.values {
            let numeric = value.parse::<f64>().is_ok();
            assert_eq!(
                numeric,
                NUMERIC_RANGES.iter().any(|r| r.key == key),
                "{key} = {value}: numeric settings and NUMERIC_RANGES disagree"
            );
        }
        // ...and the comment above each documents its range as written in the table.
        for r in NUMERIC_RANGES {
            let comment = defaults
                .comments
                .get(r.key)
                .map(String::as_str)
                .unwrap_or("");
            let range = format!("{}..={}", r.min, r.max);
            assert!(
                comment.contains(&range),
                "config/default.toml: the comment above {} must say {range}",
                r.key
            );
        }
    }

    /// Just enough TOML reading for the test above: `key = value` lines with the comment
    /// lines right above them.
    mod toml_like {
        use std::collections::HashMap;

        pub(super) struct Doc {
            pub(super) values: Vec<(String, String)>,
            pub(super) comments: HashMap<String, String>,
        }

        pub(super) fn parse(text: &str) -> Doc {
            let (mut section, mut comment) = (String::new(), String::new());
            let mut doc = Doc {
                values: Vec::new(),
                comments: HashMap::new(),
            };
            for line in text.lines() {
                let line = line.trim();
                if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                    section = name.to_owned();
                    comment.clear();
                } else if let Some(c) = line.strip_prefix('#') {
                    comment.push_str(c);
                } else if let Some((key, value)) = line.split_once(" = ") {
                    if !key.contains(' ') && !section.is_empty() {
                        let key = format!("{section}.{key}");
                        doc.comments
                            .insert(key.clone(), std::mem::take(&mut comment));
                        doc.values.push((key, value.trim().to_owned()));
                    }
                } else {
                    comment.clear();
                }
            }
            doc
        }
    }

    #[test]
    fn urls_are_checked_for_what_the_daemon_needs() {
        let bad: &[(&str, &str)] = &[
            ("SIFUCALL_RECORDS__URL", "calls.jsonl"),
            ("SIFUCALL_RECORDS__URL", "/var/lib/sifucall/calls.jsonl"),
            ("SIFUCALL_RECORDS__URL", "file:///var/lib/sifucall/"),
            ("SIFUCALL_RECORDS__URL", "https://"),
            ("SIFUCALL_RECORDS__URL", "https://example.com/records"),
            ("SIFUCALL_RECORDS__URL", "file://host/var/calls.jsonl"),
            ("SIFUCALL_WEBHOOK__URL", "garbage"),
            ("SIFUCALL_WEBHOOK__URL", "ftp://example.com/hook"),
            ("SIFUCALL_WEBHOOK__URL", "https://"),
            ("SIFUCALL_STT__ENDPOINT", "wss://example.com"),
            ("SIFUCALL_STT__ENDPOINT", "wss://example.com/"),
            (
                "SIFUCALL_STT__ENDPOINT",
                "wss://example.com/stt?language=en-US",
            ),
            ("SIFUCALL_STT__ENDPOINT", "https://example.com/stt"),
            ("SIFUCALL_LLM__BASE_URL", "https://openrouter.ai"),
            ("SIFUCALL_LLM__BASE_URL", "https://openrouter.ai/api/v1?x=1"),
            ("SIFUCALL_LLM__BASE_URL", "openrouter.ai/api/v1"),
            ("SIFUCALL_TTS__BASE_URL", "https://api.elevenlabs.io/?a=b"),
            ("SIFUCALL_TTS__BASE_URL", "ws://api.elevenlabs.io"),
        ];
        for (var, value) in bad {
            let e = err_with_env(&[(var, value)]);
            assert!(e.contains(var), "{var}={value}: {e}");
        }
        let good: &[(&str, &str)] = &[
            (
                "SIFUCALL_RECORDS__URL",
                "file:///var/lib/sifucall/calls.jsonl",
            ),
            (
                "SIFUCALL_WEBHOOK__URL",
                "https://hooks.example.com/x?token=abc",
            ),
            (
                "SIFUCALL_STT__ENDPOINT",
                "ws://127.0.0.1:4000/speech/recognition/x/v1",
            ),
            ("SIFUCALL_LLM__BASE_URL", "http://127.0.0.1:4001/api/v1/"),
            ("SIFUCALL_TTS__BASE_URL", "http://127.0.0.1:4002"),
        ];
        for (var, value) in good {
            with_env(&[(var, value)]).unwrap_or_else(|e| panic!("{var}={value}: {e}"));
        }
    }

    #[test]
    fn names_and_texts_must_be_usable() {
        for (var, value) in [
            ("SIFUCALL_TTS__VOICE_ID", ""),
            ("SIFUCALL_TTS__VOICE_ID", "voice 1"),
            ("SIFUCALL_TTS__VOICE_ID", "../x"),
            ("SIFUCALL_TTS__MODEL_ID", " "),
            ("SIFUCALL_TTS__LANGUAGE_CODE", "ms-MY"),
            ("SIFUCALL_LLM__MODEL", ""),
            ("SIFUCALL_LLM__MODEL", "openai/gpt 4o"),
            ("SIFUCALL_LLM__FALLBACK_MODELS", "a/b,"),
            ("SIFUCALL_AGENT__APOLOGY", ""),
            ("SIFUCALL_AGENT__APOLOGY", "   "),
            ("SIFUCALL_STT__REGION", ""),
            ("SIFUCALL_STT__REGION", "south east asia"),
            ("SIFUCALL_AGENT__LANGUAGE", "ms_MY"),
            ("SIFUCALL_AGENT__LANGUAGE", "malay"),
            ("SIFUCALL_AGENT__LANGUAGE", ""),
            ("SIFUCALL_AGENT__LANGUAGE", "ms-"),
            ("SIFUCALL_LOG__LEVEL", "inf"),
            ("SIFUCALL_LOG__LEVEL", "warning"),
            ("SIFUCALL_LOG__LEVEL", ""),
            ("SIFUCALL_LOG__LEVEL", "info,sifucall=loud"),
        ] {
            let e = err_with_env(&[(var, value)]);
            assert!(e.contains(var), "{var}={value:?}: {e}");
        }
        let e = err_with_env(&[("SIFUCALL_AGENT__LANGUAGE", "ms_MY")]);
        assert!(e.contains("\"ms-MY\""), "suggests the fix: {e}");
        // An empty region is fine when the endpoint replaces it.
        with_env(&[
            ("SIFUCALL_STT__REGION", ""),
            ("SIFUCALL_STT__ENDPOINT", "wss://private.example/speech/v1"),
        ])
        .unwrap();
        with_env(&[("SIFUCALL_TTS__LANGUAGE_CODE", "")]).unwrap();
        with_env(&[("SIFUCALL_LLM__FALLBACK_MODELS", "a/b,c/d:free")]).unwrap();
    }

    #[test]
    fn language_tags() {
        for ok in [
            "ms-MY",
            "en-US",
            "en",
            "zh-Hans-CN",
            "es-419",
            "de-CH-1996",
            "fil-PH",
        ] {
            assert!(bcp47(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ms_MY", "", "m", "malay", "ms-", "-MY", "ms-MY-", "en-US-US", "12-US", "ms MY",
        ] {
            assert!(bcp47(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn candidate_language_lists() {
        let l = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        for ok in [
            l(&[]),
            l(&["ms-MY"]),
            l(&["ms-MY", "en-US"]),
            l(&["en-US", "ms-MY", "zh-CN", "ta-IN"]),
        ] {
            assert!(candidate_languages("ms-MY", &ok).is_ok(), "{ok:?}");
        }
        for (bad, says) in [
            (l(&["en-US"]), "single entry"),
            (l(&["en-US", "zh-CN"]), "must include agent.language"),
            (l(&["ms-MY", "en-US", "en-GB"]), "same language"),
            (l(&["ms-MY", "en_US"]), "BCP-47"),
            (
                l(&[
                    "ms-MY", "en-US", "zh-CN", "ta-IN", "hi-IN", "th-TH", "id-ID", "vi-VN",
                    "ja-JP", "ko-KR", "fr-FR",
                ]),
                "at most 10",
            ),
        ] {
            let e = candidate_languages("ms-MY", &bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        // From the environment, as a list, and checked with the rest.
        let s = with_env(&[("SIFUCALL_AGENT__LANGUAGES", "ms-MY,en-US")]).unwrap();
        assert_eq!(s.agent.languages, ["ms-MY", "en-US"]);
        assert!(Settings::defaults().agent.languages.is_empty());
        let e = err_with_env(&[("SIFUCALL_AGENT__LANGUAGES", "en-US,zh-CN")]);
        assert!(
            e.contains("agent.languages") && e.contains("SIFUCALL_AGENT__LANGUAGES"),
            "{e}"
        );
    }

    #[test]
    fn log_filters() {
        for ok in [
            "info",
            "INFO",
            " warn ",
            "off",
            "info,sifucall=debug",
            "warn,sifucall::providers=trace,hyper=off",
            "sifucall[call]=debug",
            "info,",
        ] {
            validate_log_filter(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for (bad, hint) in [
            ("inf", "\"info\""),
            ("warning", "\"warn\""),
            ("", "empty"),
            (" , ", "empty"),
            ("sifucall", "module=level"),
            ("info,sifucall=loud", "loud"),
            ("sifucall=", "level name"),
            ("info,err", "\"error\""),
        ] {
            let e = validate_log_filter(bad).unwrap_err();
            assert!(e.contains(hint), "{bad:?}: {e}");
        }
    }

    #[test]
    fn allowlist_entries_must_not_have_host_bits() {
        let e = err_with_env(&[("SIFUCALL_AUDIOSOCKET__ALLOW", "10.0.0.5/8")]);
        assert!(
            e.contains("10.0.0.0/8")
                && e.contains("10.0.0.5/32")
                && e.contains("audiosocket.allow"),
            "{e}"
        );
        let e = err_with_env(&[("SIFUCALL_AUDIOSOCKET__ALLOW", "fd00::1/64")]);
        assert!(e.contains("fd00::/64") && e.contains("fd00::1/128"), "{e}");
        with_env(&[(
            "SIFUCALL_AUDIOSOCKET__ALLOW",
            "10.0.0.0/8,10.0.0.5/32,::1/128",
        )])
        .unwrap();
    }

    #[test]
    fn listen_addresses_must_not_collide() {
        let e = err_with_env(&[
            ("SIFUCALL_AUDIOSOCKET__LISTEN", "0.0.0.0:9000"),
            ("SIFUCALL_ADMIN__LISTEN", "127.0.0.1:9000"),
        ]);
        assert!(e.contains("admin.listen"), "{e}");
        with_env(&[
            ("SIFUCALL_AUDIOSOCKET__LISTEN", "127.0.0.1:0"),
            ("SIFUCALL_ADMIN__LISTEN", "127.0.0.1:0"),
        ])
        .unwrap();
    }

    #[test]
    fn key_format_problems_never_show_the_key() {
        for bad in [
            "sk-abc\n",
            "sk-abc\ndef",
            "sk abc",
            "sk-abc\r",
            "sk-\tabc",
            "sk-\u{7f}abc",
            "sk-é",
            "\"sk-abc\"",
        ] {
            let why = Secret::new(Some(bad.into())).format_problem();
            let why = why.unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(!why.contains("abc"), "{why}");
        }
        assert_eq!(
            Secret::new(Some("sk-or-v1-0123".into())).format_problem(),
            None
        );
        assert_eq!(Secret::new(None).format_problem(), None);
    }

    fn ai_settings() -> Settings {
        let mut s = Settings::defaults();
        s.agent.mode = AgentMode::Ai;
        s
    }

    const NO_BIND: Preflight = Preflight {
        keys: true,
        bind: false,
    };

    #[test]
    fn ai_mode_needs_every_key_and_says_which_are_missing() {
        let mut s = ai_settings();
        s.secrets.openrouter_api_key = Secret::new(Some("sk-or-v1-x".into()));
        let p = s.preflight(NO_BIND);
        assert_eq!(p.len(), 1, "{p:?}");
        for needle in [
            "not set: AZURE_SPEECH_KEY, ELEVENLABS_API_KEY (",
            "sifucall demo",
            "sifucall sandbox",
            "echo",
        ] {
            assert!(p[0].contains(needle), "{needle}: {}", p[0]);
        }
        s.secrets.azure_speech_key = Secret::new(Some("abc".into()));
        s.secrets.elevenlabs_api_key = Secret::new(Some("sk_x\n".into()));
        let p = s.preflight(NO_BIND);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("ELEVENLABS_API_KEY") && p[0].contains("line break"),
            "{p:?}"
        );
        s.secrets.elevenlabs_api_key = Secret::new(Some("sk_x".into()));
        assert!(s.preflight(NO_BIND).is_empty());
        let mut echo = Settings::defaults();
        echo.agent.mode = AgentMode::Echo;
        assert!(echo.preflight(NO_BIND).is_empty());
    }

    #[test]
    fn records_destination_is_tried() {
        let dir = scratch("records");
        let mut s = Settings::defaults();
        s.agent.mode = AgentMode::Echo;
        let try_url = |s: &mut Settings, url: String| {
            s.records.url = url;
            s.preflight(NO_BIND)
        };
        // Writable: an existing directory, a directory still to be created, an existing file.
        assert!(try_url(&mut s, format!("file://{}/calls.jsonl", dir.display())).is_empty());
        assert!(try_url(&mut s, format!("file://{}/a/b/calls.jsonl", dir.display())).is_empty());
        assert!(!dir.join("a").exists(), "the probe leaves nothing behind");
        std::fs::write(dir.join("calls.jsonl"), "").unwrap();
        assert!(try_url(&mut s, format!("file://{}/calls.jsonl", dir.display())).is_empty());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "nothing left behind"
        );
        // A directory, and a path under a file: refused even for root.
        let p = try_url(&mut s, format!("file://{}", dir.display()));
        assert!(p.len() == 1 && p[0].contains("is a directory"), "{p:?}");
        let p = try_url(
            &mut s,
            format!("file://{}/calls.jsonl/x.jsonl", dir.display()),
        );
        assert!(p.len() == 1 && p[0].contains("records.url"), "{p:?}");
        // A read-only directory, which only stops a non-root user.
        let ro = dir.join("ro");
        std::fs::create_dir(&ro).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let p = try_url(&mut s, format!("file://{}/calls.jsonl", ro.display()));
            assert!(
                p.len() == 1 && p[0].contains("cannot create files"),
                "{p:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_port_in_use_is_reported_once() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = Settings::defaults();
        s.agent.mode = AgentMode::Echo;
        s.audiosocket.listen = taken.local_addr().unwrap();
        s.admin.listen = "127.0.0.1:0".parse().unwrap();
        let p = s.preflight(Preflight {
            keys: true,
            bind: true,
        });
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("audiosocket.listen"), "{p:?}");
        assert_eq!(p[0].matches("in use").count(), 1, "{p:?}");
        drop(taken);
        s.audiosocket.listen = "127.0.0.1:0".parse().unwrap();
        assert!(
            s.preflight(Preflight {
                keys: true,
                bind: true
            })
            .is_empty()
        );
    }

    #[test]
    fn urls_are_redacted() {
        for (url, secret) in [
            (
                "https://hooks.example.com/in?token=s3cr3tT0ken&x=1",
                "s3cr3tT0ken",
            ),
            ("https://user:hunter2pass@example.com/hook", "hunter2pass"),
            ("https://tok3nAsUser@example.com/hook", "tok3nAsUser"),
            (
                "https://hooks.slack.com/services/T000/B000/XXXXXXXX1234XXXXXXXXXXXX",
                "XXXXXXXX1234XXXXXXXXXXXX",
            ),
            ("https://example.com/hook#frag-s3cret", "frag-s3cret"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{shown}");
            assert!(shown.contains(REDACTED), "{shown}");
            assert!(
                shown.contains("example.com") || shown.contains("slack.com"),
                "{shown}"
            );
        }
        let azure = "wss://southeastasia.stt.speech.microsoft.com/speech/recognition/conversation/cognitiveservices/v1";
        assert_eq!(redact_url(azure), azure);
        assert_eq!(
            redact_url("https://openrouter.ai/api/v1"),
            "https://openrouter.ai/api/v1"
        );
        assert_eq!(redact_url(""), "");
        assert!(!redact_url("not a url s3cret").contains("s3cret"));
    }

    #[test]
    fn secrets_are_redacted() {
        let mut s = Settings::defaults();
        s.secrets.openrouter_api_key = Secret::new(Some("sk-or-v1-verysecret".into()));
        s.webhook.url = "https://example.com/hook?token=verysecret".into();
        let dbg = format!("{s:?}");
        let json = s.redacted_json().unwrap().to_string();
        assert!(
            !dbg.contains("verysecret") && !json.contains("verysecret"),
            "{json}"
        );
        assert!(dbg.contains("<redacted>") && json.contains("<redacted>"));
        assert!(
            json.contains("https://example.com/hook?token=REDACTED"),
            "{json}"
        );
    }
}
