//! Wires the daemon together from [`Settings`]: the AudioSocket listener, the admin server,
//! systemd notifications, call records and the per-call behaviour. `main` only parses
//! arguments, loads the configuration, starts logging, turns signals into a [`Control`] and
//! calls [`run_controlled`].
//!
//! A reload (SIGHUP) re-reads the configuration through the same loader as startup and
//! validates it completely (including building the new per-call behaviour) before anything
//! changes; an invalid file leaves the daemon as it was and says why. What can change live
//! does (new calls get it, running calls keep theirs); what cannot is named as "needs
//! restart". The records file is reopened either way, so logrotate can move it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::call::history::HistoryBudget;
use crate::call::prompts::{PromptCache, PromptTexts};
use crate::call::reply::Providers;
use crate::call::turn::TurnConfig;
use crate::call::{
    AgentConfig, AgentProfiles, AgentSetup, Behaviour, CallSummary, ProfileSetup, SessionConfig,
};
use crate::ops::admin::{self, AdminLimits, AdminState, ReadyFlag};
use crate::ops::config::{AgentMode, Settings};
use crate::ops::logging::{self, LevelChange};
use crate::ops::metrics::Metrics;
use crate::ops::profiles::DEFAULT_PROFILE;
use crate::ops::records::{CallRecord, RecordSink};
use crate::ops::systemd;
use crate::providers::llm::openrouter::OpenRouter;
use crate::providers::stt::azure::AzureStt;
use crate::providers::tts::TtsProvider;
use crate::providers::tts::elevenlabs::ElevenLabs;
use crate::server::{OnCallEnd, Server, ServerConfig, ServerHandle};

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
    /// The configuration is unsafe to start with (e.g. `/calls` open beyond loopback).
    #[error("configuration error: {0}")]
    Config(String),
}

/// Builds the per-call behaviour from the settings. In AI mode this builds every profile
/// (the `default` one, `[agent]`, and each `[profiles.NAME]`) with [`profile_behaviour`],
/// one after the other so that their phrase caching stays within `tts.max_concurrency`.
pub async fn behaviour(
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<Behaviour, StartError> {
    if settings.agent.mode == AgentMode::Echo {
        return Ok(Behaviour::Echo);
    }
    let mut profiles = Vec::new();
    for profile in crate::ops::profiles::all_profiles(settings) {
        let view = profile.apply(settings);
        let setup = match profile_behaviour(&view, metrics).await {
            Ok(Behaviour::Agent(setup)) => setup,
            Ok(other) => return Ok(other),
            Err(StartError::Agent(e)) if profile.name != DEFAULT_PROFILE => {
                return Err(StartError::Agent(format!("profile {}: {e}", profile.name)));
            }
            Err(e) => return Err(e),
        };
        info!(profile = %profile.name, "agent profile ready");
        profiles.push(ProfileSetup::new(
            profile.name,
            setup,
            &view.agent.time_zone,
        ));
    }
    Ok(Behaviour::Profiles(Arc::new(AgentProfiles::new(
        profiles,
        settings.routing.clone(),
    ))))
}

/// Builds one profile's behaviour from its settings (`[agent]`, `[llm]`, `[tts]` with the
/// profile's keys over them). In AI mode this builds the provider clients, opens the LLM
/// connection pool and starts caching the fixed phrases.
pub async fn profile_behaviour(
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
                handover: a.handover_line.clone(),
                filler: a.filler_phrase.clone(),
            };
            let prompts = Arc::new(
                PromptCache::new(texts.clone(), Arc::clone(&tts))
                    .with_max_concurrency(settings.tts.max_concurrency),
            );
            // Cache the phrases before taking calls, so the first caller hears the greeting in
            // the first frame; if TTS is slow or down, start anyway (calls synthesize live).
            let preload = Arc::clone(&prompts);
            let job = tokio::spawn(async move { preload.preload(&[8_000, 16_000]).await });
            if tokio::time::timeout(PRELOAD_WAIT, job).await.is_err() {
                warn!(
                    "prompts not cached within {PRELOAD_WAIT:?}; starting anyway, caching continues"
                );
            }
            let toolbox = tool_box(settings).await?;
            let cfg = AgentConfig {
                language: a.language.clone(),
                languages: a.languages.clone(),
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
                tools: agent_tools(a, &toolbox),
            };
            let providers = Providers {
                stt: Arc::new(stt),
                llm: Arc::new(llm),
                tts,
                tools: Arc::new(toolbox),
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

/// The declared tools, with their MCP servers' tool lists fetched (each within its
/// timeout; a server that cannot be reached is logged and left out).
pub async fn tool_box(settings: &Settings) -> Result<crate::call::tools::ToolBox, StartError> {
    let env = |k: &str| std::env::var(k).ok();
    let mut toolbox = crate::call::tools::ToolBox::from_settings(settings, &env)
        .map_err(|e| StartError::Agent(e.to_string()))?;
    toolbox.discover().await;
    Ok(toolbox)
}

/// What one agent may do besides talking, from its `[agent]` settings and the declared tools.
pub fn agent_tools(
    a: &crate::ops::config::AgentSettings,
    toolbox: &crate::call::tools::ToolBox,
) -> crate::call::tools::AgentTools {
    let nonempty = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    crate::call::tools::AgentTools {
        transfer_targets: a.transfer_targets.clone(),
        operator_digit: a.operator_digit.trim().chars().next(),
        fallback_destination: nonempty(&a.fallback_destination),
        max_provider_failures: u32::try_from(a.max_provider_failures).unwrap_or(u32::MAX),
        defs: toolbox.defs_for(&a.tools),
        max_rounds: u32::try_from(a.max_tool_rounds).unwrap_or(u32::MAX),
        filler_after: Duration::from_millis(a.filler_after_ms),
        pre_call_lookup: nonempty(&a.pre_call_lookup),
        pre_call_deadline: Duration::from_millis(a.pre_call_deadline_ms),
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

/// Re-reads the configuration for a reload, exactly as startup read it.
pub type Loader = Box<dyn Fn() -> Result<Settings, String> + Send + Sync>;

/// How the process steers a running daemon (main turns signals into these).
pub struct Control {
    /// Start the drain (first SIGTERM or SIGINT).
    pub shutdown: CancellationToken,
    /// End the drain at once (a second SIGTERM or SIGINT): calls get their hangup now.
    pub stop_now: CancellationToken,
    /// Each message asks for a reload (SIGHUP), using the loader.
    pub reload: Option<(mpsc::Receiver<()>, Loader)>,
}

impl Control {
    /// Only a shutdown token: no reload, no hurry.
    pub fn shutdown_only(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            stop_now: CancellationToken::new(),
            reload: None,
        }
    }
}

/// The listener settings the configuration asks for, with the given per-call behaviour.
pub fn server_config(settings: &Settings, behaviour: Behaviour) -> ServerConfig {
    let a = &settings.audiosocket;
    ServerConfig {
        allow: a.allow.clone(),
        max_calls: a.max_calls,
        max_pending: a.max_pending,
        shutdown_grace: Duration::from_secs(a.shutdown_grace_secs),
        session: SessionConfig {
            first_message_timeout: Duration::from_millis(a.first_message_timeout_ms),
            behaviour,
            idle_hangup: idle_hangup(settings),
            control: std::sync::Arc::new(crate::call::NoControl),
            records: None,
        },
    }
}

/// Runs the daemon until `shutdown` fires and every call has drained. `on_bound` is told
/// the listening addresses once both sockets are bound.
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<(), StartError> {
    run_controlled(settings, Control::shutdown_only(shutdown), hooks).await
}

/// Runs the daemon until `control.shutdown` fires and every call has drained, reloading
/// the configuration on each `control.reload` message.
pub async fn run_controlled(
    settings: Settings,
    control: Control,
    hooks: Hooks,
) -> Result<(), StartError> {
    let Control {
        shutdown,
        stop_now,
        reload,
    } = control;
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
    if let Some(why) = settings.admin_needs_token() {
        return Err(StartError::Config(why));
    }
    let metrics = Arc::new(Metrics::new());
    let ready = ReadyFlag::new();
    let pbx_stop = CancellationToken::new();
    let registry = crate::pbx::http::CallRegistry::new();
    let pbx = crate::pbx::build(&settings, Arc::clone(&registry), pbx_stop.clone());
    let records = Arc::new(
        RecordSink::open(&settings, Arc::clone(&metrics))
            .await
            .map_err(|e| StartError::Records(e.to_string()))?,
    );
    let behaviour = behaviour(&settings, &metrics).await?;
    let mut config = server_config(&settings, behaviour);
    config.session.control = Arc::new(pbx);
    config.session.records = Some(Arc::clone(&records));
    let server = Server::new(config, Arc::clone(&metrics), ready.clone());
    let server_handle = server.handle();

    let admin_stop = CancellationToken::new();
    let admin_state = AdminState::new(Arc::clone(&metrics), ready.clone()).with_calls(
        crate::pbx::http::CallRoutes {
            registry,
            token: settings.secrets.admin_token.clone(),
        },
    );
    let admin_addr = admin_listener.local_addr().unwrap_or(settings.admin.listen);
    let admin_task = tokio::spawn(admin::serve_with(
        admin_listener,
        admin_state,
        admin_limits(&settings),
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
                    if let Some(mut rec) = to_record(s, mode) {
                        records.complete(&mut rec);
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
    let hurry = {
        let handle = server_handle.clone();
        tokio::spawn(async move {
            stop_now.cancelled().await;
            handle.stop_now();
        })
    };
    let reloader = reload.map(|(rx, loader)| {
        tokio::spawn(reload_loop(
            rx,
            loader,
            settings.clone(),
            server_handle.clone(),
            Arc::clone(&metrics),
            Arc::clone(&records),
        ))
    });
    server.run(listener, on_end, shutdown).await;
    let _ = stopping.await;
    hurry.abort();
    if let Some(r) = reloader {
        r.abort();
    }
    records.close(Duration::from_secs(5)).await;
    pbx_stop.cancel();
    admin_stop.cancel();
    if let Ok(Err(e)) = admin_task.await {
        warn!(error = %e, "admin server error");
    }
    let _ = watchdog.await;
    info!("sifucall stopped");
    Ok(())
}

fn admin_limits(settings: &Settings) -> AdminLimits {
    let limits = AdminLimits {
        max_connections: settings.admin.max_connections,
        header_timeout: Duration::from_millis(settings.admin.header_timeout_ms),
        ..AdminLimits::default()
    };
    match crate::ops::rlimit::raise_nofile_limit() {
        Ok(nofile) => limits.within_fd_limit(nofile),
        Err(_) => limits,
    }
}

/// Settings that only take effect at startup: a reload that changes them says so.
const RESTART_ONLY: &[&str] = &[
    "audiosocket.listen",
    "admin.listen",
    "admin.header_timeout_ms",
    "admin.max_connections",
    "log.format",
    "records.url",
    "webhook.url",
    // The records sink, its webhook poster and the cost are built once at startup.
    "records.node_id",
    "records.retention_days",
    "records.spool_dir",
    "records.spool_max_mb",
    "records.queue",
    "records.recordings_dir",
    "records.record_all",
    "webhook.backoff_initial_ms",
    "webhook.backoff_max_ms",
    "webhook.timeout_ms",
    "pricing.currency",
    "pricing.stt_per_hour",
    "pricing.tts_per_1k_chars",
    "pricing.llm_per_million_tokens",
    "pricing.myr_rate",
];

async fn reload_loop(
    mut requests: mpsc::Receiver<()>,
    loader: Loader,
    mut current: Settings,
    server: ServerHandle,
    metrics: Arc<Metrics>,
    records: Arc<RecordSink>,
) {
    while requests.recv().await.is_some() {
        // Several signals while one reload runs make one more reload, not many.
        while requests.try_recv().is_ok() {}
        systemd::notify_reloading();
        records.reopen();
        match loader() {
            Err(e) => {
                error!(error = %e, "reload: the configuration is invalid; keeping the running one")
            }
            Ok(new) => {
                if let Err(e) = apply_reload(&current, &new, &server, &metrics).await {
                    error!(error = %e, "reload: keeping the running configuration");
                } else {
                    current = new;
                }
            }
        }
        systemd::notify_ready();
    }
}

/// Validates `new` completely, then applies what can change live. On error nothing
/// changed.
pub async fn apply_reload(
    current: &Settings,
    new: &Settings,
    server: &ServerHandle,
    metrics: &Arc<Metrics>,
) -> Result<Vec<String>, String> {
    logging::parse_filter(&new.log.level, "log.level").map_err(|e| e.to_string())?;
    let changed = changed_keys(current, new);
    // Building the behaviour checks the provider settings and caches the new prompts
    // before any call can use them; running calls keep the one they started with.
    let behaviour = behaviour(new, metrics)
        .await
        .map_err(|e| format!("the new agent settings do not work: {e}"))?;
    let needs_restart: Vec<&String> = changed
        .iter()
        .filter(|k| {
            RESTART_ONLY.contains(&k.as_str()) || k.starts_with("ami.") || *k == "admin.token_env"
        })
        .collect();
    if !needs_restart.is_empty() {
        warn!(
            keys = ?needs_restart,
            "reload: these settings changed but need a restart to take effect"
        );
    }
    match logging::set_level(&new.log.level) {
        Ok(LevelChange::OverriddenByRustLog) if changed.iter().any(|k| k == "log.level") => {
            warn!("reload: log.level changed but RUST_LOG is set and wins; level unchanged");
        }
        Ok(_) => {}
        Err(e) => return Err(e.to_string()),
    }
    let mut next = server_config(new, behaviour);
    // The side channel to the PBX is the daemon's, not the file's: it outlives reloads.
    next.session.control = Arc::clone(&server.config().session.control);
    // The records sink is the running one (records.url needs a restart).
    next.session
        .records
        .clone_from(&server.config().session.records);
    server.reconfigure(next);
    info!(
        changed = ?changed,
        max_calls = new.audiosocket.max_calls,
        "configuration reloaded; new calls use it, running calls keep theirs"
    );
    Ok(changed)
}

/// `section.key` names whose values differ (secrets compare as redacted).
pub fn changed_keys(a: &Settings, b: &Settings) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(a), serde_json::to_value(b)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (section, av) in a {
            let bv = b.get(section);
            match (av.as_object(), bv.and_then(|v| v.as_object())) {
                (Some(ao), Some(bo)) => {
                    for (k, x) in ao {
                        if bo.get(k) != Some(x) {
                            out.push(format!("{section}.{k}"));
                        }
                    }
                }
                _ if Some(av) != bv => out.push(section.clone()),
                _ => {}
            }
        }
    }
    out
}

/// Turns a call summary into a stored record; calls that never sent a UUID are not calls.
pub fn to_record(s: CallSummary, mode: AgentMode) -> Option<CallRecord> {
    let call_id = s.call_id?;
    let ended = SystemTime::now();
    let started = ended
        .checked_sub(s.duration)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let agent = s.agent.unwrap_or_default();
    let rate_hz = s.rate.map_or(0, |r| r.hz());
    let transfer_target = match &s.outcome {
        Some(crate::call::CallOutcome::Transferred { target, .. }) => Some(target.clone()),
        _ => None,
    };
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
        sample_rate: rate_hz,
        frames_in: s.frames_in,
        frames_out: s.frames_out,
        underruns: s.underruns,
        dtmf: s.dtmf,
        transcript: agent.transcript,
        turns: agent.turns,
        llm_cost: agent.llm_cost,
        barge_ins: agent.barge_ins,
        barge_in_ms: agent.barge_in_ms,
        resumes: agent.resumes,
        speculative: agent.speculative,
        errors,
        node_id: String::new(),
        ended_at: crate::ops::records::rfc3339_utc(ended),
        caller_number: s.context.caller_number,
        caller_name: s.context.caller_name,
        did: s.context.did,
        profile: Some(s.profile).filter(|p| !p.is_empty()),
        outcome: s.outcome,
        transfer_target,
        latency: None,
        tool_calls: agent.tool_calls,
        cost: None,
        recording_path: s.recording.map(|p| p.display().to_string()),
        stt_audio_ms: if rate_hz > 0 {
            agent.stt_samples * 1000 / u64::from(rate_hz)
        } else {
            0
        },
        tts_characters: agent.tts_characters,
    })
}
