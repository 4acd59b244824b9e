//! Flood fairness: does one allowed but misbehaving peer hurt other calls?
//!
//! Run: `cargo bench --bench flood -- [--flooders 0,2,4] [--secs 10]`
//!
//! The daemon runs as its own process in echo mode. A *canary* call sends a 20 ms frame on
//! an absolute schedule from its own thread and timestamps every frame it gets back; the
//! figure that matters is the largest gap between two frames it receives (a caller hears
//! anything over ~40 ms as a dropout). Meanwhile F *flooders* each open a call and send
//! 65,535-byte audio frames as fast as the socket takes them (reading and discarding what
//! the daemon sends back, so the daemon is never blocked on them). Reported per F: the
//! canary's max and p99 inter-arrival gap, the flooders' bytes sent, and the daemon's CPU
//! (% of one core, from /proc).
//!
//! The flooders and the canary run in this process on the same 2 cores as the daemon, so
//! the figures include this load generator's own scheduling. Figures for the notes, not
//! pass/fail assertions.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "common.rs"]
mod common;

const FRAME: Duration = Duration::from_millis(20);
/// The first frames of the canary include the echo prebuffer; gaps are measured after.
const WARMUP_FRAMES: usize = 25;

fn main() {
    let Some(args) = common::bench_args("flood") else {
        return;
    };
    let flooders = common::list(&args, "--flooders").unwrap_or_else(|| vec![0, 2, 4]);
    let secs: u64 = common::flag(&args, "--secs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let rt = common::runtime();
    println!(
        "| flooders | canary frames | canary gap max | p99 | p50 | canary hangup | flood MB sent | daemon CPU (% core) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for f in flooders {
        let r = rt.block_on(run(f, Duration::from_secs(secs)));
        println!(
            "| {f} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {:.0} | {:.0} |",
            r.canary_frames,
            r.gap_max_ms,
            r.gap_p99_ms,
            r.gap_p50_ms,
            if r.canary_hung_up { "yes" } else { "no" },
            r.flood_bytes as f64 / 1e6,
            r.daemon_cpu_pct
        );
    }
}

struct Report {
    canary_frames: usize,
    gap_max_ms: f64,
    gap_p99_ms: f64,
    gap_p50_ms: f64,
    canary_hung_up: bool,
    flood_bytes: u64,
    daemon_cpu_pct: f64,
}

struct Daemon {
    child: Child,
    audio: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start_daemon() -> Daemon {
    let audio: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sifucall"))
        .arg("run")
        .env("SIFUCALL_AGENT__MODE", "echo")
        .env("SIFUCALL_AUDIOSOCKET__LISTEN", audio.to_string())
        .env("SIFUCALL_ADMIN__LISTEN", admin.to_string())
        .env("SIFUCALL_LOG__LEVEL", "warn")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start daemon");
    for _ in 0..200 {
        if TcpStream::connect(admin).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Daemon { child, audio }
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    utime + stime
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn uuid_frame() -> Vec<u8> {
    frame(0x01, uuid::Uuid::new_v4().as_bytes())
}

/// One flooding peer: UUID, then 65,535-byte audio frames flat out until `stop`.
async fn flood(addr: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    if wr.write_all(&uuid_frame()).await.is_err() {
        return;
    }
    // A loud-ish sawtooth, so an echo pipeline cannot skip it as silence.
    let payload: Vec<u8> = (0..u16::MAX as usize / 2)
        .flat_map(|i| (((i % 200) as i16 - 100) * 50).to_le_bytes())
        .chain(std::iter::once(0))
        .take(u16::MAX as usize)
        .collect();
    let big = frame(0x10, &payload[..payload.len() & !1]);
    while !stop.load(Ordering::Relaxed) {
        if wr.write_all(&big).await.is_err() {
            break;
        }
        sent.fetch_add(big.len() as u64, Ordering::Relaxed);
    }
    drain.abort();
}

struct CanaryResult {
    arrivals: Vec<Instant>,
    hung_up: bool,
}

/// The canary on its own thread and runtime: paced 20 ms frames, arrival times recorded.
fn canary(addr: SocketAddr, dur: Duration) -> CanaryResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("canary runtime");
    rt.block_on(async move {
        let stream = TcpStream::connect(addr).await.expect("canary connects");
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        wr.write_all(&uuid_frame()).await.expect("uuid");
        let reader = tokio::spawn(async move {
            let mut arrivals = Vec::new();
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 16 * 1024];
            let mut hung_up = false;
            loop {
                let n = match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let now = Instant::now();
                buf.extend_from_slice(&chunk[..n]);
                while buf.len() >= 3 {
                    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
                    if buf.len() < 3 + len {
                        break;
                    }
                    if buf[0] == 0 {
                        hung_up = true;
                    } else {
                        arrivals.push(now);
                    }
                    buf.drain(..3 + len);
                }
                if hung_up {
                    break;
                }
            }
            CanaryResult { arrivals, hung_up }
        });
        let payload: Vec<u8> = (0..160i16)
            .flat_map(|i| ((i % 40 - 20) * 300).to_le_bytes())
            .collect();
        let f = frame(0x10, &payload);
        let start = tokio::time::Instant::now();
        let frames = (dur.as_millis() / FRAME.as_millis()) as u32;
        for k in 0..frames {
            tokio::time::sleep_until(start + FRAME * k).await;
            if wr.write_all(&f).await.is_err() {
                break;
            }
        }
        // Hang up as Asterisk does and collect what arrived.
        let _ = wr.write_all(&[0, 0, 0]).await;
        let _ = wr.shutdown().await;
        match tokio::time::timeout(Duration::from_secs(5), reader).await {
            Ok(Ok(r)) => r,
            _ => CanaryResult {
                arrivals: Vec::new(),
                hung_up: false,
            },
        }
    })
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(flooders: usize, dur: Duration) -> Report {
    let d = start_daemon().await;
    let pid = d.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut floods = Vec::new();
    for _ in 0..flooders {
        floods.push(tokio::spawn(flood(
            d.audio,
            Arc::clone(&stop),
            Arc::clone(&sent),
        )));
    }
    // Let the flood get going before the canary starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = proc_cpu_ticks(pid);
    let t0 = Instant::now();
    let addr = d.audio;
    let canary = tokio::task::spawn_blocking(move || canary(addr, dur))
        .await
        .expect("canary thread");
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu_after = proc_cpu_ticks(pid);
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        let _ = tokio::time::timeout(Duration::from_secs(2), f).await;
    }
    let mut gaps: Vec<f64> = canary
        .arrivals
        .windows(2)
        .skip(WARMUP_FRAMES)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
        .collect();
    gaps.sort_by(f64::total_cmp);
    Report {
        canary_frames: canary.arrivals.len(),
        gap_max_ms: gaps.last().copied().unwrap_or(f64::NAN),
        gap_p99_ms: quantile(&gaps, 0.99),
        gap_p50_ms: quantile(&gaps, 0.50),
        canary_hung_up: canary.hung_up,
        flood_bytes: sent.load(Ordering::Relaxed),
        daemon_cpu_pct: (cpu_after - cpu_before) as f64 / ticks_per_sec() / elapsed * 100.0,
    }
}
