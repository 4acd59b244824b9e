//! Echo-call load benchmark: N concurrent calls against the real daemon binary for S seconds.
//!
//! Run: `cargo bench --bench echo_calls -- [--calls 100,500,1000] [--secs 30]`
//!
//! The daemon runs as its own process (echo mode) so its CPU and memory are measured alone
//! from /proc; this process plays N Asterisks, each sending a 20 ms frame on an absolute
//! schedule and reading everything back. Reported, per N: daemon CPU per call (% of one
//! core), RSS per call, the daemon's own pacing lateness (p50/p99 from its histogram, max
//! from its gauge), underruns, and the receive-side gap jitter seen by the callers (which
//! also includes this load generator's scheduling on the same 2 cores).
//!
//! These are figures for the notes, not pass/fail assertions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME: Duration = Duration::from_millis(20);

#[path = "common.rs"]
mod common;

fn main() {
    let Some(args) = common::bench_args("echo_calls") else {
        return;
    };
    let calls = common::list(&args, "--calls").unwrap_or_else(|| vec![100, 500, 1000]);
    let secs: u64 = common::flag(&args, "--secs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let rt = common::runtime();
    println!(
        "| calls | daemon CPU/call (% core) | RSS/call (KB) | lateness p50 | p99 | max | underruns | frames out | caller gap p50 | p99 | max |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for n in calls {
        let r = rt.block_on(run(n, Duration::from_secs(secs)));
        println!(
            "| {n} | {:.4} | {:.0} | {} | {} | {:.2} ms | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
            r.cpu_pct_per_call,
            r.rss_kb_per_call,
            r.lateness_p50,
            r.lateness_p99,
            r.lateness_max_ms,
            r.underruns,
            r.frames_out,
            r.gap_p50,
            r.gap_p99,
            r.gap_max
        );
    }
}

struct Report {
    cpu_pct_per_call: f64,
    rss_kb_per_call: f64,
    lateness_p50: String,
    lateness_p99: String,
    lateness_max_ms: f64,
    underruns: f64,
    frames_out: f64,
    gap_p50: f64,
    gap_p99: f64,
    gap_max: f64,
}

/// Quantile from cumulative histogram buckets: the upper bound of the bucket reaching q.
fn bucket_quantile(before: &HashMap<String, f64>, after: &HashMap<String, f64>, q: f64) -> String {
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix("sifucall_pacing_lateness_seconds_bucket{le=\"")?
                .strip_suffix("\"}")?;
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v - before.get(k).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return "n/a".into();
    }
    for (le, c) in &buckets {
        if *c >= total * q {
            return if le.is_infinite() {
                "> 100 ms".into()
            } else {
                format!("<= {} ms", le * 1000.0)
            };
        }
    }
    "n/a".into()
}

async fn run(n: usize, dur: Duration) -> Report {
    let env = [
        ("SIFUCALL_AGENT__MODE", "echo".to_owned()),
        ("SIFUCALL_AUDIOSOCKET__MAX_CALLS", (n + 10).to_string()),
        ("SIFUCALL_LOG__LEVEL", "warn".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let d = common::start_daemon(&env, None).await.expect("daemon");
    let pid = d.proc.pid();
    let rss_base = common::proc_rss_kb(pid);
    let before = common::scrape(d.admin).await;
    let gaps = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let received = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(200);
    let ramp = Duration::from_millis(2000);
    let mut tasks = Vec::new();
    for i in 0..n {
        let addr = d.audio;
        let offset = ramp * u32::try_from(i).unwrap() / u32::try_from(n).unwrap();
        let gaps = Arc::clone(&gaps);
        let received = Arc::clone(&received);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until((start + offset).into()).await;
            one_call(addr, dur, gaps, received).await;
        }));
    }
    // Measure the steady state: after the ramp, for most of the run.
    tokio::time::sleep_until((start + ramp + Duration::from_secs(1)).into()).await;
    let t0 = Instant::now();
    let cpu0 = common::proc_cpu_secs(pid);
    let rss_peak_window = dur.saturating_sub(ramp + Duration::from_secs(3));
    tokio::time::sleep(rss_peak_window).await;
    let cpu1 = common::proc_cpu_secs(pid);
    let elapsed = t0.elapsed().as_secs_f64();
    let rss = common::proc_rss_kb(pid);
    for t in tasks {
        let _ = t.await;
    }
    let after = common::scrape(d.admin).await;
    let cpu_pct = (cpu1 - cpu0) / elapsed * 100.0;
    let mut g = gaps.lock().unwrap().clone();
    g.sort_unstable();
    let pct = |q: f64| {
        g.get(((g.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let delta = |k: &str| common::delta(&before, &after, k);
    Report {
        cpu_pct_per_call: cpu_pct / n as f64,
        rss_kb_per_call: rss.saturating_sub(rss_base) as f64 / n as f64,
        lateness_p50: bucket_quantile(&before, &after, 0.5),
        lateness_p99: bucket_quantile(&before, &after, 0.99),
        lateness_max_ms: after
            .get("sifucall_pacing_lateness_max_microseconds")
            .copied()
            .unwrap_or(0.0)
            / 1000.0,
        underruns: delta("sifucall_underruns_total"),
        frames_out: delta("sifucall_frames_out_total"),
        gap_p50: pct(0.5),
        gap_p99: pct(0.99),
        gap_max: g.last().copied().unwrap_or(0) as f64 / 1000.0,
    }
}

/// One Asterisk: UUID, then a 20 ms frame of speech-like samples on an absolute schedule,
/// reading everything back; records inter-arrival gaps (µs) of the daemon's frames.
async fn one_call(
    addr: SocketAddr,
    dur: Duration,
    gaps: Arc<std::sync::Mutex<Vec<u32>>>,
    received: Arc<AtomicU64>,
) {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        let mut pending = 0usize;
        let mut last: Option<Instant> = None;
        let mut local = Vec::with_capacity(2000);
        let mut acc = Vec::<u8>::new();
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            acc.extend_from_slice(&buf[..n]);
            let now = Instant::now();
            while acc.len() >= 3 {
                let len = u16::from_be_bytes([acc[1], acc[2]]) as usize;
                if acc.len() < 3 + len {
                    break;
                }
                acc.drain(..3 + len);
                pending += 1;
                if let Some(l) = last {
                    let gap = now.duration_since(l).as_micros() as i64 - 20_000;
                    local.push(gap.unsigned_abs() as u32);
                }
                last = Some(now);
            }
        }
        received.fetch_add(pending as u64, Ordering::Relaxed);
        // Skip the first second (call set-up) when reporting jitter.
        let skip = local.len().min(50);
        gaps.lock().unwrap().extend_from_slice(&local[skip..]);
    });
    let mut msg = vec![0x01, 0, 16];
    msg.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    let _ = wr.write_all(&msg).await;
    let frames = (dur.as_millis() / FRAME.as_millis()) as u32;
    let mut frame = vec![0x10, 0x01, 0x40];
    frame.resize(3 + 320, 0);
    let t0 = Instant::now();
    for k in 0..frames {
        for (j, s) in frame[3..].chunks_exact_mut(2).enumerate() {
            let v = (((k as usize * 160 + j) % 40) as i16 - 20) * 300;
            s.copy_from_slice(&v.to_le_bytes());
        }
        tokio::time::sleep_until((t0 + FRAME * k).into()).await;
        if wr.write_all(&frame).await.is_err() {
            break;
        }
    }
    drop(wr);
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
}
