//! Configuration: `config/default.toml` (compiled in, so the binary always has sane
//! defaults), then an optional operator file, then `SIFUCALL_<SECTION>__<KEY>` environment
//! overrides. Secrets come only from their own environment variables and never print.
//!
//! Section and key names are a contract with operators' files: add keys, never rename.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use config::{Config as Loader, Environment, File, FileFormat};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The built-in defaults; the same file operators copy and edit.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// A bad configuration. The message names the key and where its value came from.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

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
    /// API keys, from the environment only.
    #[serde(skip_deserializing)]
    pub secrets: Secrets,
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
    pub max_calls: usize,
    /// Deadline for the UUID message, ms.
    pub first_message_timeout_ms: u64,
    /// Drain time on shutdown, seconds.
    pub shutdown_grace_secs: u64,
    /// Cap on connections still waiting for their UUID (they hold no call slot).
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
    pub header_timeout_ms: u64,
    /// Cap on open admin connections (lowered further under a low open-file limit).
    pub max_connections: usize,
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
    /// First thing the agent says.
    pub greeting: String,
    /// The LLM's instructions.
    pub system_prompt: String,
    /// Spoken when a provider fails.
    pub apology: String,
    /// Spoken when a reply is slow to start.
    pub hold_prompt: String,
    /// How slow, ms.
    pub hold_after_ms: u64,
    /// Caller speech needed to interrupt the agent, ms.
    pub barge_in_min_speech_ms: u64,
    /// Echo guard margin, dB.
    pub echo_margin_db: f64,
    /// DTMF entry timeout, ms.
    pub dtmf_timeout_ms: u64,
    /// VAD speech probability threshold.
    pub vad_threshold: f32,
    /// Hang up after this much caller silence; 0 disables.
    pub idle_hangup_secs: u64,
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
    pub max_tokens: u32,
    /// Sampling temperature.
    pub temperature: f32,
    /// Time-to-first-token deadline, ms.
    pub first_token_timeout_ms: u64,
    /// Mid-stream stall deadline, ms.
    pub stall_timeout_ms: u64,
}

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
    pub first_byte_timeout_ms: u64,
}

/// `[records]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsSettings {
    /// Destination URL; empty disables.
    pub url: String,
}

/// `[webhook]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Destination URL; empty disables.
    pub url: String,
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
}

impl Secrets {
    /// Reads the keys from the process environment.
    pub fn from_env() -> Self {
        Self {
            azure_speech_key: Secret::from_env("AZURE_SPEECH_KEY"),
            openrouter_api_key: Secret::from_env("OPENROUTER_API_KEY"),
            elevenlabs_api_key: Secret::from_env("ELEVENLABS_API_KEY"),
        }
    }
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
        Ok(s)
    }

    /// Like [`Settings::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut b = Loader::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            b = b.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        let vars: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SIFUCALL_"))
            .collect();
        let env_src = Environment::with_prefix("SIFUCALL")
            .prefix_separator("_")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("audiosocket.allow")
            .with_list_parse_key("llm.fallback_models")
            .try_parsing(true)
            .source(Some(vars.clone()));
        b = b.add_source(env_src);
        let loaded = b
            .build()
            .map_err(|e| ConfigError(describe(e, file, &vars)))?;
        let settings: Self = loaded
            .try_deserialize()
            .map_err(|e| ConfigError(describe(e, file, &vars)))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| {
            Err(ConfigError(format!("invalid value for key `{key}`: {why}")))
        };
        if self.audiosocket.max_calls == 0 {
            return bad("audiosocket.max_calls", "must be at least 1");
        }
        if self.audiosocket.max_pending == 0 {
            return bad("audiosocket.max_pending", "must be at least 1");
        }
        if self.admin.max_connections == 0 {
            return bad("admin.max_connections", "must be at least 1");
        }
        if !(100..=600_000).contains(&self.admin.header_timeout_ms) {
            return bad("admin.header_timeout_ms", "must be between 100 and 600000");
        }
        if self.audiosocket.allow.is_empty() {
            return bad(
                "audiosocket.allow",
                "an empty allowlist refuses every connection",
            );
        }
        if !(100..=5000).contains(&self.stt.segmentation_silence_ms) {
            return bad(
                "stt.segmentation_silence_ms",
                "must be between 100 and 5000 (Azure's range)",
            );
        }
        if self.stt.provider != "azure" {
            return bad("stt.provider", "only \"azure\" is supported");
        }
        if self.llm.provider != "openrouter" {
            return bad(
                "llm.provider",
                "only \"openrouter\" (any OpenAI-compatible server) is supported",
            );
        }
        if self.tts.provider != "elevenlabs" {
            return bad("tts.provider", "only \"elevenlabs\" is supported");
        }
        if !(0.0..=2.0).contains(&self.llm.temperature) {
            return bad("llm.temperature", "must be between 0 and 2");
        }
        if !(0.0..=1.0).contains(&self.agent.vad_threshold) {
            return bad("agent.vad_threshold", "must be between 0 and 1");
        }
        for (key, url) in [
            ("llm.base_url", &self.llm.base_url),
            ("tts.base_url", &self.tts.base_url),
        ] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad(key, "must be an http:// or https:// URL");
            }
        }
        let ep = &self.stt.endpoint;
        if !(ep.is_empty() || ep.starts_with("ws://") || ep.starts_with("wss://")) {
            return bad("stt.endpoint", "must be a ws:// or wss:// URL");
        }
        Ok(())
    }
}

/// Adds where a value came from when the `config` crate does not say it.
fn describe(
    e: config::ConfigError,
    file: Option<&Path>,
    env: &std::collections::HashMap<String, String>,
) -> String {
    let msg = e.to_string();
    // The crate names the key ("for key `a.b`") but not always the source for env values.
    if let Some(key) = msg
        .split("for key `")
        .nth(1)
        .and_then(|r| r.split('`').next())
    {
        let var = format!("SIFUCALL_{}", key.to_uppercase().replace('.', "__"));
        if env.contains_key(&var) && !msg.contains("environment") {
            return format!("{msg} (set by environment variable {var})");
        }
        if let Some(f) = file
            && !msg.contains(&f.display().to_string())
        {
            return format!("{msg} (in {} or the built-in defaults)", f.display());
        }
    }
    msg
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
    }

    #[test]
    fn env_overrides() {
        let s = Settings::load_from(
            None,
            env(&[
                ("SIFUCALL_AGENT__MODE", "echo"),
                ("SIFUCALL_AUDIOSOCKET__MAX_CALLS", "7"),
                ("SIFUCALL_AUDIOSOCKET__ALLOW", "10.0.0.0/8,192.168.1.0/24"),
                ("SIFUCALL_STT__SEGMENTATION_SILENCE_MS", "500"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.agent.mode, AgentMode::Echo);
        assert_eq!(s.audiosocket.max_calls, 7);
        assert_eq!(s.audiosocket.allow.len(), 2);
        assert_eq!(s.stt.segmentation_silence_ms, 500);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Settings::load_from(None, env(&[("SIFUCALL_AUDIOSOCKET__MAX_CALLS", "lots")]))
            .unwrap_err();
        assert!(e.0.contains("max_calls"), "{e}");
        let e = Settings::load_from(None, env(&[("SIFUCALL_AGENT__MODE", "karaoke")])).unwrap_err();
        assert!(e.0.contains("mode"), "{e}");
        let e = Settings::load_from(
            None,
            env(&[("SIFUCALL_STT__SEGMENTATION_SILENCE_MS", "50")]),
        )
        .unwrap_err();
        assert!(e.0.contains("stt.segmentation_silence_ms"), "{e}");
        let e = Settings::load_from(None, env(&[("SIFUCALL_AUDIOSOCKET__ALLOW", "not-a-net")]))
            .unwrap_err();
        assert!(e.0.contains("allow"), "{e}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("sifucall-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[admin]\nlisten = \"nonsense\"\n").unwrap();
        let e = Settings::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(e.0.contains("admin.listen"), "{e}");
        assert!(e.0.contains("bad.toml"), "{e}");
        std::fs::write(&path, "[admin]\nlisen = \"127.0.0.1:1\"\n").unwrap();
        let e = Settings::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(e.0.contains("lisen"), "{e}");
        let e = Settings::load_from(Some(&dir.join("missing.toml")), env(&[])).unwrap_err();
        assert!(e.0.contains("does not exist"), "{e}");
    }

    #[test]
    fn secrets_are_redacted() {
        let mut s = Settings::defaults();
        s.secrets.openrouter_api_key = Secret::new(Some("sk-or-v1-verysecret".into()));
        let dbg = format!("{s:?}");
        let json = serde_json::to_string(&s).unwrap();
        assert!(!dbg.contains("verysecret") && !json.contains("verysecret"));
        assert!(dbg.contains("<redacted>") && json.contains("<redacted>"));
    }
}
