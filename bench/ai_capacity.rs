//! AI-mode capacity benchmark: the daemon's CPU and memory per AI call in steady state, the
//! basis for `audiosocket.max_calls`'s default.
//!
//! Run: `cargo bench --bench ai_capacity -- [--calls 50,200] [--secs 60]`
//!
//! Three processes: the fakes (`sifucall sandbox --fakes-only --print-endpoints`: realistic
//! delays, STT final 150 ms, LLM first token 300 ms then 50 tokens/s, TTS 150 ms then 2x
//! real time), the daemon (`sifucall run`, AI mode, pointed at the fakes), and this process
//! playing N Asterisks. Each Asterisk holds a conversation (greeting, three questions each
//! answered in full, hang up) and dials again at once, so N calls are up at almost every
//! moment, with the call set-up and tear-down a real PBX brings. After a 2 s ramp and 10 s
//! of settling, the daemon's CPU time (/proc/<pid>/stat) is measured over `--secs`, its RSS
//! (/proc/<pid>/status) sampled every second, and its active calls read from /metrics.
//! The fakes' and this process's CPU are shown too: the three share the machine's cores, so
//! on a small machine they compete with the daemon.
//!
//! Figures for the notes, never pass/fail assertions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::{Instant, sleep, sleep_until};

use sifucall::audio::wav;
use sifucall::caller::{DialogueOptions, place_dialogue};

#[path = "common.rs"]
mod common;
use common::dist;

const SETTLE: Duration = Duration::from_secs(10);
const RAMP: Duration = Duration::from_secs(2);

fn main() {
    let Some(args) = common::bench_args("ai_capacity") else {
        return;
    };
    let calls = common::list(&args, "--calls").unwrap_or_else(|| vec![50, 200]);
    let secs: u64 = common::flag(&args, "--secs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let rt = common::runtime();
    println!(
        "| calls | active calls (mean in window) | daemon CPU, % of one core: total / per call | daemon RSS: idle / in window max (MB) | RSS per call (KB) | fakes' CPU % | callers' CPU % | underruns | turns replied/asked | question's last frame -> first reply frame, ms (health check) | failed conversations |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for n in calls {
        match rt.block_on(run(n, Duration::from_secs(secs))) {
            Ok(r) => println!(
                "| {n} | {:.1} | {:.1} / {:.2} | {:.1} / {:.1} | {:.0} | {:.1} | {:.1} | {} | {}/{} | {} | {} |",
                r.active_mean,
                r.cpu_pct,
                r.cpu_pct / r.active_mean.max(1.0),
                r.rss_idle_kb as f64 / 1024.0,
                r.rss_max_kb as f64 / 1024.0,
                r.rss_max_kb.saturating_sub(r.rss_idle_kb) as f64 / r.active_mean.max(1.0),
                r.fakes_cpu_pct,
                r.callers_cpu_pct,
                r.underruns,
                r.replied,
                r.asked,
                dist(&r.latency, 0),
                r.failed
            ),
            Err(e) => println!("| {n} | N/A: {e} | | | | | | | | | |"),
        }
    }
    println!(
        "\nPer call = total / mean active calls in the window; RSS per call = (max RSS in the window - RSS before the first call) / mean active calls. The question is the raw fixture, trailing silence included, so the health-check latency is not the turn latency (see `turn_latency`). The fakes, the callers and the daemon share the machine's cores: when they saturate them, the daemon's CPU share per call falls while underruns and latency rise."
    );
}

struct Report {
    active_mean: f64,
    cpu_pct: f64,
    rss_idle_kb: u64,
    rss_max_kb: u64,
    fakes_cpu_pct: f64,
    callers_cpu_pct: f64,
    underruns: f64,
    asked: usize,
    replied: usize,
    latency: Vec<f64>,
    failed: usize,
}

/// The demo question, as the caller says it.
fn utterance() -> Vec<i16> {
    wav::read_bytes(sifucall::demo::QUESTION_WAV, "question fixture")
        .map(|a| a.samples)
        .unwrap_or_default()
}

async fn run(n: usize, window: Duration) -> Result<Report, String> {
    let (mut fakes, fake_env) = common::start_fakes_process()?;
    let mut env = fake_env;
    env.push(("SIFUCALL_AGENT__MODE".into(), "ai".into()));
    env.push((
        "SIFUCALL_AUDIOSOCKET__MAX_CALLS".into(),
        (n + 10).to_string(),
    ));
    env.push(("SIFUCALL_LOG__LEVEL".into(), "warn".into()));
    let log = common::temp_path(&format!("capacity-{n}-daemon.log"));
    let mut daemon = common::start_daemon(&env, Some(log.as_path())).await?;
    let pid = daemon.proc.pid();
    sleep(Duration::from_millis(500)).await;
    let rss_idle_kb = common::proc_rss_kb(pid);
    let before = common::scrape(daemon.admin).await;

    let utt = Arc::new(utterance());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for i in 0..n {
        let offset = RAMP * u32::try_from(i).unwrap_or(0) / u32::try_from(n).unwrap_or(1);
        let addr = daemon.audio.to_string();
        let utt = Arc::clone(&utt);
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            sleep_until(start + offset).await;
            let mut out = (0usize, Vec::new(), 0usize);
            while !stop.load(Ordering::Relaxed) {
                let mut o = DialogueOptions::new(addr.clone(), utt.to_vec(), 3);
                o.max_duration = Duration::from_secs(120);
                match place_dialogue(o).await {
                    Ok(rep) => {
                        if rep.error.is_some() {
                            out.2 += 1;
                        }
                        for t in &rep.turns {
                            out.0 += 1;
                            out.1.extend(t.first_reply_ms.map(|f| f - t.end_ms));
                        }
                    }
                    Err(_) => {
                        out.2 += 1;
                        sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            out
        }));
    }
    sleep_until(start + RAMP + SETTLE).await;
    let t0 = Instant::now();
    let cpu0 = common::proc_cpu_secs(pid);
    let fakes0 = common::proc_cpu_secs(fakes.pid());
    let own0 = common::proc_cpu_secs(std::process::id());
    let mut rss_max_kb = 0;
    let mut active = Vec::new();
    while t0.elapsed() < window {
        sleep(Duration::from_secs(1)).await;
        rss_max_kb = rss_max_kb.max(common::proc_rss_kb(pid));
        if let Some(a) = common::scrape(daemon.admin)
            .await
            .get("sifucall_active_calls")
        {
            active.push(*a);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let pct = |a: f64, b: f64| (b - a) / elapsed * 100.0;
    let cpu_pct = pct(cpu0, common::proc_cpu_secs(pid));
    let fakes_cpu_pct = pct(fakes0, common::proc_cpu_secs(fakes.pid()));
    let callers_cpu_pct = pct(own0, common::proc_cpu_secs(std::process::id()));
    stop.store(true, Ordering::Relaxed);
    let (mut asked, mut latency, mut failed) = (0, Vec::new(), 0);
    for t in tasks {
        if let Ok((a, l, f)) = t.await {
            asked += a;
            latency.extend(l);
            failed += f;
        }
    }
    let after = common::scrape(daemon.admin).await;
    tokio::task::block_in_place(|| {
        daemon.proc.stop(Duration::from_secs(10));
        fakes.stop(Duration::from_secs(2));
    });
    Ok(Report {
        active_mean: active.iter().sum::<f64>() / active.len().max(1) as f64,
        cpu_pct,
        rss_idle_kb,
        rss_max_kb,
        fakes_cpu_pct,
        callers_cpu_pct,
        underruns: common::delta(&before, &after, "sifucall_underruns_total"),
        asked,
        replied: latency.len(),
        latency,
        failed,
    })
}
