//! Fake Azure STT, OpenRouter and ElevenLabs servers (and a fake Asterisk manager, [`ami`])
//! that speak the real wire formats
//! (websocket, SSE, chunked audio) with controllable delays and faults.
//!
//! They drive the tests and benchmarks, `sifucall sandbox` (local stand-ins, so an operator
//! can exercise the PBX plumbing without keys) and `sifucall demo`. The real clients talk
//! to them unchanged: only the endpoint differs.

pub mod ami;
pub mod azure;
pub mod elevenlabs;
pub mod openrouter;
mod ws;

use std::net::SocketAddr;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::ops::config::{Secret, Settings};

use azure::{FakeAzure, FakeAzureConfig};
use elevenlabs::{FakeElevenLabs, FakeElevenLabsConfig};
use openrouter::{FakeOpenRouter, FakeOpenRouterConfig};

/// What the caller "says" in the interactive sandbox, phrase after phrase: the fake STT
/// cannot understand speech, it detects phrases by energy and reports these in turn.
pub const SANDBOX_TRANSCRIPTS: &[&str] = &[
    "Selamat pagi, saya nak tanya tentang harga pakej internet.",
    "Boleh saya tahu waktu operasi kedai anda?",
    "Saya nak buat aduan, internet saya perlahan sejak semalam.",
    "Terima kasih, itu sahaja. Selamat tinggal.",
];

/// Delays and faults for the three fakes.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// Fake Azure STT.
    pub azure: FakeAzureConfig,
    /// Fake OpenRouter.
    pub openrouter: FakeOpenRouterConfig,
    /// Fake ElevenLabs.
    pub elevenlabs: FakeElevenLabsConfig,
}

impl SandboxConfig {
    /// Provider delays of typical real services, with the sandbox transcripts: STT final
    /// 150 ms after the segmentation silence, LLM first token 300 ms then 50 tokens/s, TTS
    /// first audio 150 ms then 2x real time.
    pub fn realistic() -> Self {
        let mut c = Self::default();
        c.azure.transcripts = SANDBOX_TRANSCRIPTS
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        c.azure.final_delay_ms = 150;
        c.openrouter.first_token_delay_ms = 300;
        c.openrouter.tokens_per_sec = 50.0;
        c.elevenlabs.first_byte_delay_ms = 150;
        c.elevenlabs.realtime_factor = 2.0;
        c
    }
}

/// The three fakes, running on loopback. They stop when dropped.
#[derive(Debug)]
pub struct Sandbox {
    /// Fake Azure STT.
    pub azure: FakeAzure,
    /// Fake OpenRouter.
    pub openrouter: FakeOpenRouter,
    /// Fake ElevenLabs.
    pub elevenlabs: FakeElevenLabs,
}

impl Sandbox {
    /// Starts the three fakes on 127.0.0.1 ports chosen by the OS.
    pub async fn start(cfg: SandboxConfig) -> std::io::Result<Self> {
        Ok(Self {
            azure: FakeAzure::spawn(cfg.azure).await?,
            openrouter: openrouter::spawn(cfg.openrouter).await?,
            elevenlabs: elevenlabs::spawn(cfg.elevenlabs).await?,
        })
    }

    /// Points the settings' providers at the fakes and fills in placeholder keys (the fakes
    /// accept any key unless configured otherwise). Everything else is left as configured.
    pub fn point(&self, settings: &mut Settings) {
        settings.stt.endpoint = self.azure.url();
        settings.llm.base_url = self.openrouter.base_url();
        settings.tts.base_url = self.elevenlabs.base_url();
        let placeholder = || Secret::new(Some("sandbox".into()));
        settings.secrets.azure_speech_key = placeholder();
        settings.secrets.openrouter_api_key = placeholder();
        settings.secrets.elevenlabs_api_key = placeholder();
    }

    /// [`Sandbox::env_overrides`] as `KEY=VALUE` lines, what `sifucall sandbox --fakes-only
    /// --print-endpoints` prints so that a daemon started elsewhere can use these fakes.
    pub fn endpoint_lines(&self) -> String {
        self.env_overrides()
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }

    /// Environment overrides that point a separately started daemon at these fakes.
    pub fn env_overrides(&self) -> Vec<(String, String)> {
        vec![
            ("SIFUCALL_STT__ENDPOINT".into(), self.azure.url()),
            ("SIFUCALL_LLM__BASE_URL".into(), self.openrouter.base_url()),
            ("SIFUCALL_TTS__BASE_URL".into(), self.elevenlabs.base_url()),
            ("AZURE_SPEECH_KEY".into(), "sandbox".into()),
            ("OPENROUTER_API_KEY".into(), "sandbox".into()),
            ("ELEVENLABS_API_KEY".into(), "sandbox".into()),
        ]
    }
}

/// Serves a fake's routes on `listener` with Nagle off on every connection (small SSE and
/// websocket messages must not wait for ACKs, as with the real services), calling
/// `on_accept` for each connection.
pub(crate) async fn serve_nodelay(
    listener: TcpListener,
    app: Router,
    mut on_accept: impl FnMut() + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(move |tcp| {
        on_accept();
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}

/// Starts a fake on 127.0.0.1 on a port the OS picks; the task ends when aborted.
pub(crate) async fn spawn_on_loopback(
    name: &'static str,
    app: Router,
    on_accept: impl FnMut() + Send + 'static,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = serve_nodelay(listener, app, on_accept).await {
            tracing::warn!(error = %e, "{name} stopped");
        }
    });
    Ok((addr, task))
}
