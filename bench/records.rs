//! Call records throughput: how many record writes per second the database writer commits
//! while 200 calls write their progress at once, on SQLite and on PostgreSQL, and the CPU
//! the records path adds per call.
//!
//! Run: `cargo bench --bench records -- [--calls 200] [--turns 10] [--turn-ms 500]`
//! (PostgreSQL from `RECORDS_TEST_POSTGRES`, e.g. after `scripts/test-postgres.sh start`).
//!
//! Two runs per backend, in this process, through the daemon's own `Store` and `CallTap`:
//! - burst: every call writes its start, `turns` turns (two transcript lines and the turn's
//!   marks each) and its end as fast as it can; writes/s = all writes / time until the last
//!   is committed;
//! - paced: the same calls with a turn every `--turn-ms` (as in a conversation); CPU per call
//!   = this process's user+system CPU over the run / calls. With PostgreSQL the server's own
//!   CPU is not included (it is another process); with SQLite the engine runs in-process.
//!
//! Figures for the notes, never pass/fail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sifucall::call::AgentReport;
use sifucall::ops::config::{AgentMode, Settings};
use sifucall::ops::metrics::{EndReason, Metrics};
use sifucall::ops::records::db::{Db, DbUrl};
use sifucall::ops::records::live::{CallTap, FinishSettings};
use sifucall::ops::records::store::{CallStart, Op, Store, StoreConfig, epoch_ms};
use sifucall::ops::records::{
    CallRecord, Role, Speculation, TranscriptEntry, TurnTiming, rfc3339_utc,
};
use uuid::Uuid;

fn flag(args: &[String], name: &str) -> Option<u64> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

fn cpu_time() -> Duration {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct for RUSAGE_SELF.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn line(role: Role, text: &str, start: u64, end: u64) -> TranscriptEntry {
    TranscriptEntry {
        role,
        text: text.into(),
        at_ms: end,
        interrupted: false,
        start_ms: Some(start),
        end_ms: Some(end),
    }
}

async fn one_call(store: Arc<Store>, finish: Arc<FinishSettings>, turns: u64, turn_ms: u64) {
    let id = Uuid::new_v4();
    let started = std::time::SystemTime::now();
    store.send(Op::Start(CallStart {
        call_id: id,
        node_id: "bench".into(),
        started_at_ms: epoch_ms(started),
        peer: "127.0.0.1:40000".into(),
        mode: "ai".into(),
        caller_number: Some("+60123456789".into()),
        caller_name: None,
        did: Some("0388880000".into()),
        profile: None,
    }));
    let mut tap = CallTap::new(Arc::clone(&store), id);
    let mut report = AgentReport::default();
    for t in 0..turns {
        let at = t * 5000;
        report.transcript.push(line(
            Role::Caller,
            "Berapa harga pakej asas?",
            at,
            at + 1500,
        ));
        report.turns.push(TurnTiming {
            speech_end_ms: Some(at + 1500),
            stt_final_ms: Some(at + 1700),
            llm_first_token_ms: Some(at + 1900),
            tts_first_audio_ms: Some(at + 2050),
            first_frame_ms: Some(at + 2100),
        });
        report.transcript.push(line(
            Role::Agent,
            "Harga pakej asas ialah RM99 sebulan.",
            at + 2100,
            at + 4500,
        ));
        tap.sync(&report, Instant::now(), at + 4500);
        if turn_ms > 0 {
            tokio::time::sleep(Duration::from_millis(turn_ms)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    let mut rec = CallRecord {
        call_id: id,
        peer: "127.0.0.1:40000".parse().unwrap_or_else(|_| unreachable!()),
        started_at: rfc3339_utc(started),
        duration_ms: turns * 5000,
        end_reason: EndReason::CallerHangup,
        mode: AgentMode::Ai,
        sample_rate: 8000,
        frames_in: turns * 250,
        frames_out: turns * 250,
        underruns: 0,
        dtmf: String::new(),
        transcript: report.transcript,
        turns: report.turns,
        llm_cost: Some(0.0003),
        barge_ins: 0,
        barge_in_ms: vec![],
        resumes: 0,
        speculative: Speculation::default(),
        errors: vec![],
        node_id: String::new(),
        ended_at: rfc3339_utc(std::time::SystemTime::now()),
        caller_number: Some("+60123456789".into()),
        caller_name: None,
        did: Some("0388880000".into()),
        profile: None,
        outcome: Some(sifucall::call::CallOutcome::Completed),
        transfer_target: None,
        latency: None,
        tool_calls: vec![],
        cost: None,
        recording_path: None,
        stt_audio_ms: turns * 5000,
        tts_characters: turns * 36,
    };
    finish.complete(&mut rec);
    store.send(Op::Finish(Box::new(rec)));
}

async fn run(url: &str, calls: u64, turns: u64, turn_ms: u64) -> (f64, f64, f64) {
    let db = Db::open(&DbUrl::parse(url).unwrap().unwrap(), 4)
        .await
        .unwrap();
    let metrics = Arc::new(Metrics::new());
    let spool = std::env::temp_dir().join(format!("sifucall-bench-spool-{}", Uuid::new_v4()));
    let store = Store::start(
        db,
        StoreConfig {
            node_id: "bench".into(),
            queue: 100_000,
            spool_dir: spool,
            spool_max_bytes: 1 << 30,
            retention_days: 0,
            webhook: true,
        },
        Arc::clone(&metrics),
    )
    .await
    .unwrap();
    let finish = Arc::new(FinishSettings::from_settings(&Settings::defaults(), None));
    let expected = (calls * (3 * turns + 2)) as f64;
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..calls)
        .map(|_| {
            tokio::spawn(one_call(
                Arc::clone(&store),
                Arc::clone(&finish),
                turns,
                turn_ms,
            ))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    loop {
        let done = metrics
            .sample("sifucall_records_written_total")
            .unwrap_or(0.0)
            + metrics
                .sample("sifucall_records_spooled_total")
                .unwrap_or(0.0);
        if done >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    let lost = metrics
        .sample("sifucall_records_lost_total{reason=\"queue_full\"}")
        .unwrap_or(0.0);
    assert!(lost == 0.0, "writes lost: {lost}");
    store.close(Duration::from_secs(30)).await;
    (expected / wall, wall, cpu * 1000.0 / calls as f64)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("records: run with `cargo bench --bench records`");
        return;
    }
    let calls = flag(&args, "--calls").unwrap_or(200);
    let turns = flag(&args, "--turns").unwrap_or(10);
    let turn_ms = flag(&args, "--turn-ms").unwrap_or(500);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sifucall-bench-records-{}", Uuid::new_v4()));
    let mut backends = vec![("sqlite", format!("sqlite://{}/calls.db", dir.display()))];
    match std::env::var("RECORDS_TEST_POSTGRES") {
        Ok(u) if !u.is_empty() => backends.push(("postgres", u)),
        _ => println!("postgres: skipped (RECORDS_TEST_POSTGRES not set)"),
    }
    println!(
        "{calls} concurrent calls, {turns} turns each ({} writes per call)",
        3 * turns + 2
    );
    for (name, url) in backends {
        let (wps, wall, _) = rt.block_on(run(&url, calls, turns, 0));
        println!(
            "{name:8} burst: {wps:9.0} writes/s ({wall:.2} s for {} writes)",
            calls * (3 * turns + 2)
        );
        let (_, wall, cpu_ms) = rt.block_on(run(&url, calls, turns, turn_ms));
        println!(
            "{name:8} paced (a turn every {turn_ms} ms): {wall:.1} s, CPU {cpu_ms:.2} ms per call \
             ({:.3} ms per call-second)",
            cpu_ms / (turns as f64 * turn_ms as f64 / 1000.0)
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
