//! What the benchmarks share: their arguments, a raised open-file limit and a runtime, the
//! daemon (and the fakes) as child processes, /proc readings, and percentiles that are only
//! printed when there are enough samples for them. Included with `#[path]` (benchmarks are
//! separate crates), so not every bench uses every item.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;

/// The benchmark's arguments, or `None` when it is being run as a test (`cargo test
/// --all-targets` runs bench targets without `--bench`): then it should do nothing.
pub(crate) fn bench_args(name: &str) -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") {
        Some(args)
    } else {
        println!("{name}: run with `cargo bench --bench {name}`");
        None
    }
}

/// The value after `--name`, if given.
pub(crate) fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

/// A comma-separated list of numbers after `--name`, if given.
pub(crate) fn list(args: &[String], name: &str) -> Option<Vec<usize>> {
    flag(args, name).map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
}

/// Raises the fd limit (every call is a socket or two) and builds the runtime.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    let _ = sifucall::ops::rlimit::raise_nofile_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------
// Statistics.

/// Fewer samples than this and a p99 is really the maximum: print the maximum instead.
pub(crate) const MIN_SAMPLES_FOR_P99: usize = 100;

/// Nearest-rank percentile.
pub(crate) fn pct(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s.get(rank.clamp(1, s.len()) - 1).copied()
}

/// `p50 X / p99 Y (n=N)` with at least [`MIN_SAMPLES_FOR_P99`] samples, otherwise
/// `p50 X / max Y (n=N)`; `digits` decimals.
pub(crate) fn dist(v: &[f64], digits: usize) -> String {
    let (Some(p50), Some(max)) = (pct(v, 50.0), pct(v, 100.0)) else {
        return "- (n=0)".into();
    };
    // Rounded before printing, so that -0.3 does not print as "-0".
    let scale = 10f64.powi(i32::try_from(digits).unwrap_or(0));
    let round = |x: f64| (x * scale).round() / scale + 0.0;
    let (p50, max) = (round(p50), round(max));
    if v.len() >= MIN_SAMPLES_FOR_P99 {
        let p99 = round(pct(v, 99.0).unwrap_or(max));
        format!("p50 {p50:.digits$} / p99 {p99:.digits$} (n={})", v.len())
    } else {
        format!("p50 {p50:.digits$} / max {max:.digits$} (n={})", v.len())
    }
}

// ---------------------------------------------------------------------------------------
// Child processes.

/// The daemon binary cargo built for this benchmark.
pub(crate) fn sifucall_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sifucall")
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits up to `grace` for the exit (so the daemon flushes its call
    /// records), then SIGKILL.
    pub(crate) fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = std::time::Instant::now() + grace;
        while std::time::Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The daemon as a child process.
pub(crate) struct Daemon {
    pub(crate) proc: Proc,
    pub(crate) audio: SocketAddr,
    pub(crate) admin: SocketAddr,
}

/// Starts `sifucall run` with `env` added (listen addresses are chosen here) and waits
/// until its admin port answers. `stderr` receives its logs (inherited if `None`). An error
/// says why the daemon did not come up, e.g. it rejected a setting (exit code 2).
pub(crate) async fn start_daemon(
    env: &[(String, String)],
    stderr: Option<&Path>,
) -> Result<Daemon, String> {
    let audio: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    // Two ports released in turn can be the same one: ask again until they differ.
    let admin: SocketAddr = loop {
        let port = free_port();
        if port != audio.port() {
            break ([127, 0, 0, 1], port).into();
        }
    };
    let mut cmd = Command::new(sifucall_bin());
    cmd.arg("run")
        .env("SIFUCALL_AUDIOSOCKET__LISTEN", audio.to_string())
        .env("SIFUCALL_ADMIN__LISTEN", admin.to_string())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    match stderr {
        Some(path) => {
            let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
            cmd.stderr(f);
        }
        None => {
            cmd.stderr(Stdio::inherit());
        }
    }
    let child = cmd.spawn().map_err(|e| format!("start the daemon: {e}"))?;
    let mut proc = Proc { child };
    for _ in 0..400 {
        if let Ok(Some(status)) = proc.child.try_wait() {
            let log = stderr
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            return Err(format!("the daemon exited at startup ({status}): {tail:?}"));
        }
        if TcpStream::connect(admin).await.is_ok() && TcpStream::connect(audio).await.is_ok() {
            return Ok(Daemon { proc, audio, admin });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("the daemon did not open its ports within 20 s".into())
}

/// Runs `sifucall check` with `env` added and returns the effective settings it prints, or
/// why it refused them. Tells a setting the daemon understands from one it rejects.
pub(crate) fn effective_settings(env: &[(String, String)]) -> Result<serde_json::Value, String> {
    let out = Command::new(sifucall_bin())
        .arg("check")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run `sifucall check`: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().next().unwrap_or("rejected").to_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("`sifucall check` output: {e}"))
}

/// `sifucall sandbox --fakes-only --print-endpoints` in its own process: the fakes, and the
/// environment a daemon needs to use them.
pub(crate) fn start_fakes_process() -> Result<(Proc, Vec<(String, String)>), String> {
    let mut child = Command::new(sifucall_bin())
        .args(["sandbox", "--fakes-only", "--print-endpoints"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start the fakes: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let proc = Proc { child };
    let mut env = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("read the fakes' endpoints: {e}"))?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once('=') {
            env.push((k.to_owned(), v.to_owned()));
        }
    }
    if env.is_empty() {
        return Err("the fakes printed no endpoints".into());
    }
    Ok((proc, env))
}

/// A temporary file path for this run.
pub(crate) fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sifucall-bench-{}-{name}", std::process::id()))
}

// ---------------------------------------------------------------------------------------
// /proc and /metrics.

/// User + system CPU time of a process, in seconds.
pub(crate) fn proc_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // /proc counts in USER_HZ, which is 100 on Linux whatever the kernel's HZ.
    (utime + stime) as f64 / 100.0
}

/// Resident set size of a process, in KB.
pub(crate) fn proc_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The daemon's `/metrics`, sample name (with labels) -> value; empty if unreachable.
pub(crate) async fn scrape(admin: SocketAddr) -> HashMap<String, f64> {
    let Ok(resp) = reqwest::get(format!("http://{admin}/metrics")).await else {
        return HashMap::new();
    };
    let body = resp.text().await.unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// `after - before` for one sample (0 when absent).
pub(crate) fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, k: &str) -> f64 {
    after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0)
}
