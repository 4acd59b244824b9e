//! The `sifucall` binary: argument parsing and exit codes only; everything else is the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sifucall::ops::config::Settings;
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
    /// Validate the configuration and print the effective settings (secrets redacted).
    Check {
        /// Operator config file, layered over the built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn load(config: Option<&PathBuf>) -> Result<Settings, ExitCode> {
    Settings::load(config.map(PathBuf::as_path)).map_err(|e| {
        eprintln!("sifucall: configuration error: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(config.as_ref()) {
            Ok(s) => {
                match toml_like(&s) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("sifucall: {e:#}");
                        return ExitCode::FAILURE;
                    }
                }
                eprintln!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config } => {
            let settings = match load(config.as_ref()) {
                Ok(s) => s,
                Err(code) => return code,
            };
            if let Err(e) = sifucall::ops::logging::init(settings.log.format, &settings.log.level) {
                eprintln!("sifucall: configuration error: {e}");
                return ExitCode::from(2);
            }
            match runtime().and_then(|rt| rt.block_on(run(settings))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sifucall: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn toml_like(s: &Settings) -> anyhow::Result<String> {
    serde_json::to_string_pretty(s).context("rendering settings")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    if let Err(e) = sifucall::ops::rlimit::raise_nofile_limit() {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signals.cancel();
    });
    sifucall::app::run(settings, shutdown, sifucall::app::Hooks::default()).await?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGKILL; keep running.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
