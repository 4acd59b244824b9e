//! The `sifucall` binary: argument parsing and exit codes only; everything else is the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sifucall::ops::config::{Preflight, Settings, validate_log_filter};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "sifucall",
    version,
    about = "AI voice agent for Asterisk AudioSocket calls"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (what the systemd unit starts).
    Run {
        /// Operator config file, layered over the built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration as `run` would need it (values, API keys, the records
    /// file, the listen ports) and print the effective settings (secrets redacted). Exits 0
    /// when `run` will start, 2 on any configuration problem.
    Check {
        /// Operator config file, layered over the built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Do not try to bind the listen addresses (use while the daemon is running, e.g.
        /// before restarting it after an upgrade).
        #[arg(long)]
        no_bind: bool,
    },
    /// One complete AI call with no API keys: fake providers, the daemon and a synthetic
    /// caller speaking Malay; prints the conversation and per-stage latency.
    Demo {
        /// Operator config file (greeting, prompt...), layered over the built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where to write the call audio (stereo: caller left, agent right).
        #[arg(long, default_value = "demo-call.wav")]
        wav: PathBuf,
        /// Show the daemon's logs.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Run the daemon against local stand-ins for Azure, OpenRouter and ElevenLabs, so the
    /// PBX plumbing and the whole pipeline can be tested without keys or credits.
    Sandbox {
        /// Operator config file, layered over the built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Run only the three fake providers, in this process, until interrupted (for a
        /// daemon or benchmark started separately).
        #[arg(long)]
        fakes_only: bool,
        /// With --fakes-only: print the daemon's environment for these fakes on stdout
        /// (`KEY=VALUE` lines, then an empty line).
        #[arg(long, requires = "fakes_only")]
        print_endpoints: bool,
    },
    /// Place a synthetic call to an AudioSocket server, exactly as Asterisk would, and print
    /// a JSON summary.
    Call {
        /// Server address, e.g. 127.0.0.1:10000.
        addr: String,
        /// Audio to speak (WAV, 16-bit; converted to the call rate).
        #[arg(long)]
        play: Option<PathBuf>,
        /// Where to write what the server sent back (with real-time gaps).
        #[arg(long)]
        record: Option<PathBuf>,
        /// DTMF digits to press, 500 ms apart from 1 s in (`w` = 500 ms pause).
        #[arg(long, default_value = "")]
        dtmf: String,
        /// Hang up (close the socket) after this many seconds.
        #[arg(long)]
        hangup_after: Option<f64>,
        /// Call rate: 8000 (AudioSocket()) or 16000 (Dial(AudioSocket/...c(slin16))).
        #[arg(long, default_value_t = 8000)]
        rate: u32,
        /// Stay on the line until the server hangs up (bounded by --hangup-after).
        #[arg(long)]
        until_hangup: bool,
    },
}

/// Exit code for every configuration problem (the unit's `RestartPreventExitStatus=2`).
const CONFIG_ERROR: u8 = 2;

fn config_errors<'a>(problems: impl IntoIterator<Item = &'a str>) -> ExitCode {
    for p in problems {
        eprintln!("sifucall: configuration error: {p}");
    }
    ExitCode::from(CONFIG_ERROR)
}

fn load(config: Option<&PathBuf>) -> Result<Settings, ExitCode> {
    Settings::load(config.map(PathBuf::as_path)).map_err(|e| config_errors(e.problems()))
}

/// `sifucall check`: everything `run` needs, every problem reported, exit 2 on any.
fn check(config: Option<&PathBuf>, no_bind: bool) -> ExitCode {
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut problems = settings.preflight(Preflight {
        keys: true,
        bind: !no_bind,
    });
    if let Some(filter) = rust_log() {
        if let Err(why) = validate_log_filter(&filter) {
            problems.push(format!(
                "invalid RUST_LOG (environment; it overrides log.level): {why}"
            ));
        }
    }
    if problems.is_empty() {
        problems.extend(check_records_database(&settings));
    }
    if !problems.is_empty() {
        let code = config_errors(problems.iter().map(String::as_str));
        eprintln!(
            "configuration NOT OK: {} problem{}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        return code;
    }
    match settings
        .redacted_json()
        .context("rendering settings")
        .and_then(|v| serde_json::to_string_pretty(&v).context("rendering settings"))
    {
        Ok(text) => {
            println!("{text}");
            eprintln!("configuration OK");
            ExitCode::SUCCESS
        }
        Err(e) => fail("sifucall", e),
    }
}

/// Connects to the records database and applies its migrations, as `run` will.
fn check_records_database(settings: &Settings) -> Option<String> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Some(format!("cannot start a runtime to check records.url: {e}")),
    };
    match rt.block_on(sifucall::ops::records::check_database(&settings.records)) {
        Ok(Some(backend)) => {
            eprintln!("records database ({backend}) reachable and migrated");
            None
        }
        Ok(None) => None,
        Err(e) => Some(format!(
            "records.url: {e} (the URL as configured: {})",
            sifucall::ops::config::redact_url(&settings.records.url)
        )),
    }
}

/// `RUST_LOG` when set and not blank (logging then ignores `log.level`).
fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, no_bind } => check(config.as_ref(), no_bind),
        Command::Demo {
            config,
            wav,
            verbose,
        } => {
            let settings = match load(config.as_ref()) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let level = if verbose { "info" } else { "warn" };
            let _log_guard =
                sifucall::ops::logging::init(sifucall::ops::config::LogFormat::Pretty, level);
            let opts = sifucall::demo::DemoOptions {
                wav_out: wav,
                ..Default::default()
            };
            block_on("sifucall demo", async {
                let report = sifucall::demo::run(opts, settings).await?;
                println!("{}", sifucall::demo::render(&report));
                Ok(())
            })
        }
        Command::Sandbox {
            fakes_only: true,
            print_endpoints,
            ..
        } => block_on("sifucall", fakes_only(print_endpoints)),
        Command::Sandbox { config, .. } => match load_with_logs(config.as_ref(), false) {
            Ok((settings, _log_guard)) => block_on("sifucall", sandbox(settings)),
            Err(code) => code,
        },
        Command::Call {
            addr,
            play,
            record,
            dtmf,
            hangup_after,
            rate,
            until_hangup,
        } => {
            let opts = CallArgs {
                addr,
                play,
                record,
                dtmf,
                hangup_after,
                rate,
                until_hangup,
            };
            block_on("sifucall call", call(opts))
        }
        Command::Run { config } => match load_with_logs(config.as_ref(), true) {
            Ok((settings, _log_guard)) => {
                let loader = reload_loader(config);
                block_on("sifucall", run(settings, Some(loader)))
            }
            Err(code) => code,
        },
    }
}

/// Loads the configuration, starts logging as it says (through the non-blocking writer;
/// keep the guard until exit), logs panics as JSON lines, and checks the records file and
/// (with `keys`, for `run`) the API keys, so that these configuration errors exit 2 (which
/// the unit does not restart) rather than failing later with 1. A busy port is left to `run`
/// itself: that is usually transient (the old process still draining) and worth a restart.
fn load_with_logs(
    config: Option<&PathBuf>,
    keys: bool,
) -> Result<(Settings, sifucall::ops::logging::LogGuard), ExitCode> {
    let settings = load(config)?;
    if let Some(filter) = rust_log() {
        // `EnvFilter` reads an unknown word such as `inf` as a target and logs nothing at all.
        if let Err(why) = validate_log_filter(&filter) {
            return Err(config_errors([format!(
                "invalid RUST_LOG (environment; it overrides log.level): {why}"
            )
            .as_str()]));
        }
    }
    let guard = match sifucall::ops::logging::init(settings.log.format, &settings.log.level) {
        Ok(guard) => guard,
        Err(e) => return Err(config_errors([e.to_string().as_str()])),
    };
    sifucall::ops::logging::install_panic_hook();
    let problems = settings.preflight(Preflight { keys, bind: false });
    if !problems.is_empty() {
        return Err(config_errors(problems.iter().map(String::as_str)));
    }
    Ok((settings, guard))
}

/// Re-reads the configuration on SIGHUP exactly as startup read it.
fn reload_loader(config: Option<PathBuf>) -> sifucall::app::Loader {
    Box::new(move || Settings::load(config.as_deref()).map_err(|e| e.to_string()))
}

fn fail(what: &str, e: anyhow::Error) -> ExitCode {
    eprintln!("{what}: {e:#}");
    ExitCode::FAILURE
}

/// Runs a future on a multi-threaded runtime; an error is printed and exits 1.
fn block_on(what: &str, f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    match runtime().and_then(|rt| rt.block_on(f)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(what, e),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

async fn run(settings: Settings, loader: Option<sifucall::app::Loader>) -> anyhow::Result<()> {
    // Handlers first: from here on SIGHUP and SIGTERM never kill the process outright.
    let control = handle_signals(loader).context("installing signal handlers")?;
    if let Err(e) = sifucall::ops::rlimit::raise_nofile_limit() {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    sifucall::app::run_controlled(settings, control, sifucall::app::Hooks::default()).await?;
    Ok(())
}

async fn sandbox(mut settings: Settings) -> anyhow::Result<()> {
    let fakes = sifucall::sandbox::Sandbox::start(sifucall::sandbox::SandboxConfig::realistic())
        .await
        .context("starting the fake providers")?;
    settings.agent.mode = sifucall::ops::config::AgentMode::Ai;
    fakes.point(&mut settings);
    eprintln!(
        "sandbox: fake Azure STT at {}, OpenRouter at {}, ElevenLabs at {}",
        fakes.azure.url(),
        fakes.openrouter.base_url(),
        fakes.elevenlabs.base_url()
    );
    eprintln!(
        "sandbox: the daemon listens for AudioSocket on {}; call extension 999 and speak: each phrase you say \
         is \"recognised\" as the next of {} scripted sentences, answered in Malay and spoken with a synthetic voice",
        settings.audiosocket.listen,
        sifucall::sandbox::SANDBOX_TRANSCRIPTS.len()
    );
    // A reload would re-read the file and lose the fakes' addresses; not offered here.
    run(settings, None).await
}

/// `sifucall sandbox --fakes-only`: the fakes alone, until a signal.
async fn fakes_only(print_endpoints: bool) -> anyhow::Result<()> {
    let fakes = sifucall::sandbox::Sandbox::start(sifucall::sandbox::SandboxConfig::realistic())
        .await
        .context("starting the fake providers")?;
    if print_endpoints {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", fakes.endpoint_lines()).context("writing the endpoints")?;
        out.flush().context("writing the endpoints")?;
    }
    eprintln!("sandbox: fake providers only; stop with Ctrl-C or SIGTERM");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// `sifucall call` arguments.
struct CallArgs {
    addr: String,
    play: Option<PathBuf>,
    record: Option<PathBuf>,
    dtmf: String,
    hangup_after: Option<f64>,
    rate: u32,
    until_hangup: bool,
}

async fn call(args: CallArgs) -> anyhow::Result<()> {
    let CallArgs {
        addr,
        play,
        record,
        dtmf,
        hangup_after,
        rate,
        until_hangup,
    } = args;
    use sifucall::audiosocket::SampleRate;
    use sifucall::caller;
    let rate = SampleRate::from_hz(rate)
        .filter(|r| matches!(r, SampleRate::Hz8000 | SampleRate::Hz16000))
        .context("--rate must be 8000 or 16000")?;
    let mut opts = caller::CallOptions::new(addr);
    opts.rate = rate;
    if let Some(p) = &play {
        opts.play = caller::load_wav(p, rate)?;
    }
    opts.dtmf = caller::parse_dtmf(&dtmf)?;
    opts.hangup_after = hangup_after.map(std::time::Duration::from_secs_f64);
    opts.until_server_hangup = until_hangup;
    let report = caller::place_call(opts).await?;
    println!("{}", caller::summary_json(&report));
    if let Some(path) = &record {
        report.save_recording(path)?;
    }
    Ok(())
}

/// Turns signals into the daemon's controls: the first SIGTERM or SIGINT starts the drain,
/// a second one ends it at once (calls get their hangup now); SIGHUP asks for a reload
/// (without a loader it is logged and ignored). Never lets a signal kill the process.
fn handle_signals(loader: Option<sifucall::app::Loader>) -> anyhow::Result<sifucall::app::Control> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let shutdown = CancellationToken::new();
    let stop_now = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let can_reload = loader.is_some();
    let (s, n) = (shutdown.clone(), stop_now.clone());
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    if can_reload {
                        tracing::info!("SIGHUP: reloading the configuration");
                        let _ = reload_tx.try_send(());
                    } else {
                        tracing::warn!("SIGHUP ignored: this mode cannot reload its configuration");
                    }
                    continue;
                }
            };
            if s.is_cancelled() {
                tracing::warn!(
                    signal = name,
                    "second stop signal: hanging up every call now"
                );
                n.cancel();
            } else {
                tracing::info!(
                    signal = name,
                    "stop signal: draining (send it again to hang up at once)"
                );
                s.cancel();
            }
        }
    });
    Ok(sifucall::app::Control {
        shutdown,
        stop_now,
        reload: loader.map(|l| (reload_rx, l)),
    })
}
