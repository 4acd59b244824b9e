//! Wires the daemon together from [`Settings`]: the AudioSocket listener, the admin server,
//! systemd notifications, call records and the per-call behaviour. `main` only parses
//! arguments, loads the configuration, starts logging and calls [`run`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::call::history::HistoryBudget;
use crate::call::prompts::{PromptCache, PromptTexts};
use crate::call::reply::Providers;
use crate::call::turn::TurnConfig;
use crate::call::{AgentConfig, AgentSetup, Behaviour, CallSummary, SessionConfig};
use crate::ops::admin::{self, AdminState, ReadyFlag};
use crate::ops::config::{AgentMode, Settings};
use crate::ops::metrics::Metrics;
use crate::ops::records::{CallRecord, RecordSink};
use crate::ops::systemd;
use crate::providers::llm::openrouter::OpenRouter;
use crate::providers::stt::azure::AzureStt;
use crate::providers::tts::TtsProvider;
use crate::providers::tts::elevenlabs::ElevenLabs;
use crate::server::{self, OnCallEnd, ServerConfig};

/// How long startup waits for the greeting and apology to be synthesized.
const PRELOAD_WAIT: Duration = Duration::from_secs(5);

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address is taken or not ours.
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Which listener.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The agent could not be built (e.g. missing API key).
    #[error("{0}")]
    Agent(String),
    /// Call records are misconfigured.
    #[error("{0}")]
    Records(String),
}

/// Builds the per-call behaviour from the settings. In AI mode this builds the provider
/// clients, opens the LLM connection pool and starts caching the fixed phrases.
pub async fn behaviour(
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<Behaviour, StartError> {
    match settings.agent.mode {
        AgentMode::Echo => Ok(Behaviour::Echo),
        AgentMode::Ai => {
            let missing: Vec<&str> = [
                (
                    "AZURE_SPEECH_KEY",
                    settings.secrets.azure_speech_key.is_set(),
                ),
                (
                    "OPENROUTER_API_KEY",
                    settings.secrets.openrouter_api_key.is_set(),
                ),
                (
                    "ELEVENLABS_API_KEY",
                    settings.secrets.elevenlabs_api_key.is_set(),
                ),
            ]
            .into_iter()
            .filter_map(|(k, set)| (!set).then_some(k))
            .collect();
            if !missing.is_empty() {
                return Err(StartError::Agent(format!(
                    "agent.mode = \"ai\" needs {} in the environment. Without keys, try `sifucall demo` or \
                     `sifucall sandbox` (local stand-ins for the providers), or set agent.mode = \"echo\"",
                    missing.join(", ")
                )));
            }
            let agent_err = |e: &dyn std::fmt::Display| StartError::Agent(e.to_string());
            let stt = AzureStt::new(&settings.stt, settings.secrets.azure_speech_key.clone())
                .map_err(|e| agent_err(&e))?;
            let llm = OpenRouter::new(&settings.llm, settings.secrets.openrouter_api_key.clone())
                .map_err(|e| agent_err(&e))?;
            let tts = ElevenLabs::new(&settings.tts, settings.secrets.elevenlabs_api_key.clone())
                .map_err(|e| agent_err(&e))?;
            llm.warm_up();
            let tts: Arc<dyn TtsProvider> = Arc::new(tts);
            let a = &settings.agent;
            let texts = PromptTexts {
                greeting: a.greeting.clone(),
                apology: a.apology.clone(),
                hold: a.hold_prompt.clone(),
                still_there: a.still_there_prompt.clone(),
            };
            let prompts = Arc::new(PromptCache::new(texts.clone(), Arc::clone(&tts)));
            // Cache the phrases before taking calls, so the first caller hears the greeting in
            // the first frame; if TTS is slow or down, start anyway (calls synthesize live).
            let preload = Arc::clone(&prompts);
            let job = tokio::spawn(async move { preload.preload(&[8_000, 16_000]).await });
            if tokio::time::timeout(PRELOAD_WAIT, job).await.is_err() {
                warn!(
                    "prompts not cached within {PRELOAD_WAIT:?}; starting anyway, caching continues"
                );
            }
            let cfg = AgentConfig {
                language: a.language.clone(),
                system_prompt: a.system_prompt.clone(),
                prompts: texts,
                segmentation_silence_ms: settings.stt.segmentation_silence_ms,
                turn: TurnConfig {
                    vad_threshold: a.vad_threshold,
                    barge_in_min_speech: Duration::from_millis(a.barge_in_min_speech_ms),
                    echo_margin_db: a.echo_margin_db,
                    ..TurnConfig::default()
                },
                hold_after: Duration::from_millis(a.hold_after_ms),
                dtmf_timeout: Duration::from_millis(a.dtmf_timeout_ms),
                idle_hangup: idle_hangup(settings),
                history: HistoryBudget {
                    max_entries: usize::try_from(a.history_max_entries).unwrap_or(usize::MAX),
                    max_tokens: usize::try_from(a.history_max_tokens).unwrap_or(usize::MAX),
                },
                pipeline: a.pipeline,
                still_there_after: (a.still_there_after_secs > 0)
                    .then(|| Duration::from_secs(a.still_there_after_secs)),
                speculate_after: (a.speculate_after_ms > 0)
                    .then(|| Duration::from_millis(a.speculate_after_ms)),
                speculative_max: u32::try_from(a.speculative_max_per_call).unwrap_or(u32::MAX),
                backchannels: a
                    .backchannels
                    .iter()
                    .map(|b| crate::call::machine::normalise(b))
                    .filter(|b| !b.is_empty())
                    .collect(),
                resume_after: Duration::from_millis(a.resume_after_ms),
            };
            let providers = Providers {
                stt: Arc::new(stt),
                llm: Arc::new(llm),
                tts,
            };
            let _ = metrics;
            Ok(Behaviour::Agent(Arc::new(AgentSetup {
                providers,
                prompts,
                cfg: Arc::new(cfg),
            })))
        }
    }
}

fn idle_hangup(settings: &Settings) -> Option<Duration> {
    let secs = settings.agent.idle_hangup_secs;
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// Optional observers of a running daemon (the demo, tests).
#[derive(Default)]
pub struct Hooks {
    /// Told the listening addresses once both sockets are bound.
    pub on_bound: Option<tokio::sync::oneshot::Sender<Bound>>,
    /// Called with every finished call's summary, besides the call records.
    pub on_call_end: Option<OnCallEnd>,
}

/// Where a started daemon listens (useful when the settings asked for port 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The AudioSocket listener.
    pub audiosocket: std::net::SocketAddr,
    /// The admin HTTP listener.
    pub admin: std::net::SocketAddr,
}

/// Runs the daemon until `shutdown` fires and every call has drained. `on_bound` is told
/// the listening addresses once both sockets are bound.
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<(), StartError> {
    let listener = TcpListener::bind(settings.audiosocket.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: settings.audiosocket.listen,
            what: "audiosocket.listen",
            source,
        })?;
    let admin_listener = TcpListener::bind(settings.admin.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: settings.admin.listen,
            what: "admin.listen",
            source,
        })?;
    let metrics = Arc::new(Metrics::new());
    let ready = ReadyFlag::new();
    let records = Arc::new(
        RecordSink::new(&settings.records, &settings.webhook)
            .map_err(|e| StartError::Records(e.to_string()))?,
    );
    let behaviour = behaviour(&settings, &metrics).await?;
    let cfg = ServerConfig {
        allow: settings.audiosocket.allow.clone(),
        max_calls: settings.audiosocket.max_calls,
        shutdown_grace: Duration::from_secs(settings.audiosocket.shutdown_grace_secs),
        session: SessionConfig {
            first_message_timeout: Duration::from_millis(
                settings.audiosocket.first_message_timeout_ms,
            ),
            behaviour,
            idle_hangup: idle_hangup(&settings),
        },
    };

    let admin_stop = CancellationToken::new();
    let admin_state = AdminState::new(Arc::clone(&metrics), ready.clone());
    let admin_addr = admin_listener.local_addr().unwrap_or(settings.admin.listen);
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin_state,
        admin_stop.clone(),
    ));
    let watchdog = tokio::spawn(systemd::watchdog_loop(admin_stop.clone()));

    let on_end: Option<OnCallEnd> =
        (records.is_enabled() || hooks.on_call_end.is_some()).then(|| {
            let records = Arc::clone(&records);
            let mode = settings.agent.mode;
            let extra = hooks.on_call_end.clone();
            Arc::new(move |s: CallSummary| {
                if let Some(f) = &extra {
                    f(s.clone());
                }
                if records.is_enabled() {
                    if let Some(rec) = to_record(s, mode) {
                        records.submit(rec);
                    }
                }
            }) as OnCallEnd
        });

    let audiosocket_addr = listener.local_addr().unwrap_or(settings.audiosocket.listen);
    info!(
        audiosocket = %audiosocket_addr,
        admin = %admin_addr,
        mode = ?settings.agent.mode,
        version = env!("CARGO_PKG_VERSION"),
        "sifucall started"
    );
    if let Some(tx) = hooks.on_bound {
        let _ = tx.send(Bound {
            audiosocket: audiosocket_addr,
            admin: admin_addr,
        });
    }
    systemd::notify_ready();
    let stopping = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            systemd::notify_stopping();
        })
    };
    server::serve(listener, cfg, Arc::clone(&metrics), ready, on_end, shutdown).await;
    let _ = stopping.await;
    records.close(Duration::from_secs(5)).await;
    admin_stop.cancel();
    if let Ok(Err(e)) = admin_task.await {
        warn!(error = %e, "admin server error");
    }
    let _ = watchdog.await;
    info!("sifucall stopped");
    Ok(())
}

/// Turns a call summary into a stored record; calls that never sent a UUID are not calls.
pub fn to_record(s: CallSummary, mode: AgentMode) -> Option<CallRecord> {
    let call_id = s.call_id?;
    let started = SystemTime::now()
        .checked_sub(s.duration)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let agent = s.agent.unwrap_or_default();
    let mut errors = agent.errors;
    if let Some(d) = s.detail {
        errors.insert(0, d);
    }
    Some(CallRecord {
        call_id,
        peer: s.peer,
        started_at: crate::ops::records::rfc3339_utc(started),
        duration_ms: s.duration.as_millis() as u64,
        end_reason: s.reason,
        mode,
        sample_rate: s.rate.map_or(0, |r| r.hz()),
        frames_in: s.frames_in,
        frames_out: s.frames_out,
        underruns: s.underruns,
        dtmf: s.dtmf,
        transcript: agent.transcript,
        turns: agent.turns,
        llm_cost: agent.llm_cost,
        barge_ins: agent.barge_ins,
        resumes: agent.resumes,
        speculative: agent.speculative,
        errors,
    })
}
