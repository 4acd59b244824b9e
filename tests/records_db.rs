//! The records database against a real SQLite file and a real PostgreSQL (the cluster
//! `.ci/run` starts, named by `RECORDS_TEST_POSTGRES`; without it, locally, the PostgreSQL
//! half says it was skipped; in CI a missing PostgreSQL is a failure).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sifucall::call::CallOutcome;
use sifucall::ops::config::{AgentMode, Settings};
use sifucall::ops::metrics::{EndReason, Metrics};
use sifucall::ops::records::db::{Db, DbUrl};
use sifucall::ops::records::query::{self, CallFilter};
use sifucall::ops::records::store::{CallStart, Op, Store, StoreConfig, epoch_ms};
use sifucall::ops::records::webhook::{self, WebhookConfig};
use sifucall::ops::records::{
    CallRecord, Role, Speculation, TranscriptEntry, TurnTiming, live::CallTap, rfc3339_utc,
};
use uuid::Uuid;

fn postgres_url() -> Option<String> {
    match std::env::var("RECORDS_TEST_POSTGRES") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the records tests against PostgreSQL: RECORDS_TEST_POSTGRES is not set"
            );
            eprintln!("SKIPPED the PostgreSQL half: RECORDS_TEST_POSTGRES is not set");
            None
        }
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sifucall-records-{tag}-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fresh database of each available backend: SQLite in a temp dir; PostgreSQL in a
/// schema of its own (so tests running at once do not see each other's rows).
async fn databases(tag: &str) -> Vec<(String, Db)> {
    let dir = temp_dir(tag);
    let sqlite = DbUrl::parse(&format!("sqlite://{}/calls.db", dir.display()))
        .unwrap()
        .unwrap();
    let mut out = vec![(
        format!("sqlite://{}/calls.db", dir.display()),
        Db::open(&sqlite, 2).await.unwrap(),
    )];
    if let Some(url) = postgres_url() {
        let schema = format!("t_{}", Uuid::new_v4().simple());
        let base = DbUrl::parse(&url).unwrap().unwrap();
        let admin = Db::open(&base, 1).await.unwrap();
        if let Db::Postgres(p) = &admin {
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(p)
                .await
                .unwrap();
        }
        admin.close().await;
        let sep = if url.contains('?') { '&' } else { '?' };
        let scoped = format!("{url}{sep}options=-csearch_path%3D{schema}");
        let db = Db::open(&DbUrl::parse(&scoped).unwrap().unwrap(), 2)
            .await
            .unwrap();
        out.push((scoped, db));
    }
    out
}

fn store_config(node: &str, webhook: bool) -> StoreConfig {
    StoreConfig {
        node_id: node.into(),
        queue: 1000,
        spool_dir: temp_dir("spool"),
        spool_max_bytes: 1 << 20,
        retention_days: 0,
        webhook,
    }
}

fn start(id: Uuid, node: &str, caller: &str) -> CallStart {
    CallStart {
        call_id: id,
        node_id: node.into(),
        started_at_ms: epoch_ms(std::time::SystemTime::now()),
        peer: "127.0.0.1:40000".into(),
        mode: "ai".into(),
        caller_number: Some(caller.into()),
        caller_name: Some("Siti".into()),
        did: Some("0388880000".into()),
        profile: Some("sales".into()),
    }
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

fn record(id: Uuid, node: &str, outcome: CallOutcome) -> CallRecord {
    let now = std::time::SystemTime::now();
    let mut rec = CallRecord {
        call_id: id,
        peer: "127.0.0.1:40000".parse().unwrap(),
        started_at: rfc3339_utc(now - Duration::from_secs(30)),
        duration_ms: 30_000,
        end_reason: EndReason::AgentHangup,
        mode: AgentMode::Ai,
        sample_rate: 8000,
        frames_in: 1500,
        frames_out: 1400,
        underruns: 0,
        dtmf: String::new(),
        transcript: vec![
            line(Role::Agent, "Selamat datang", 0, 1500),
            line(Role::Caller, "Saya mahu tempah meja", 2000, 3500),
            line(Role::Agent, "Baik, untuk berapa orang?", 4100, 6000),
        ],
        turns: vec![TurnTiming {
            speech_end_ms: Some(3500),
            stt_final_ms: Some(3700),
            llm_first_token_ms: Some(3900),
            tts_first_audio_ms: Some(4050),
            first_frame_ms: Some(4100),
        }],
        llm_cost: Some(0.0004),
        barge_ins: 1,
        barge_in_ms: vec![5000],
        resumes: 0,
        speculative: Speculation::default(),
        errors: vec!["Tts: 429".into()],
        node_id: node.into(),
        ended_at: rfc3339_utc(now),
        caller_number: Some("+60123456789".into()),
        caller_name: Some("Siti".into()),
        did: Some("0388880000".into()),
        profile: Some("sales".into()),
        transfer_target: match &outcome {
            CallOutcome::Transferred { target, .. } => Some(target.clone()),
            _ => None,
        },
        outcome: Some(outcome),
        latency: None,
        tool_calls: vec![],
        cost: None,
        recording_path: None,
        stt_audio_ms: 20_000,
        tts_characters: 40,
    };
    let f =
        sifucall::ops::records::live::FinishSettings::from_settings(&Settings::defaults(), None);
    f.complete(&mut rec);
    rec.node_id = node.into();
    rec
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    for _ in 0..600 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_written_as_it_goes_and_read_back() {
    for (url, db) in databases("roundtrip").await {
        let metrics = Arc::new(Metrics::new());
        let store = Store::start(
            db.clone(),
            store_config("node-a", false),
            Arc::clone(&metrics),
        )
        .await
        .unwrap();
        let id = Uuid::new_v4();
        store.send(Op::Start(start(id, "node-a", "+60123456789")));
        // While the call is up: its row is open and its lines arrive as they are said.
        let mut tap = CallTap::new(Arc::clone(&store), id);
        let mut report = sifucall::call::AgentReport::default();
        report
            .transcript
            .push(line(Role::Agent, "Selamat datang", 0, 1500));
        tap.sync(&report, std::time::Instant::now(), 1600);
        wait_until("the open row and its first line", || async {
            query::call(&db, id)
                .await
                .unwrap()
                .is_some_and(|d| d.transcript.len() == 1)
        })
        .await;
        let open = query::call(&db, id).await.unwrap().unwrap();
        assert_eq!(open.row.status, "open", "{url}");
        assert_eq!(open.transcript[0].start_ms, Some(0));

        let other = Uuid::new_v4();
        store.send(Op::Finish(Box::new(record(
            other,
            "node-a",
            CallOutcome::Completed,
        ))));
        let rec = record(
            id,
            "node-a",
            CallOutcome::Transferred {
                target: "sales".into(),
                destination: "201".into(),
                summary: None,
            },
        );
        store.send(Op::Finish(Box::new(rec.clone())));
        wait_until("both calls completed", || async {
            query::list_calls(&db, &CallFilter::default())
                .await
                .unwrap()
                .iter()
                .filter(|r| r.status == "completed")
                .count()
                == 2
        })
        .await;
        let d = query::call(&db, id).await.unwrap().unwrap();
        assert_eq!(d.row.outcome.as_deref(), Some("transfer"), "{url}");
        assert_eq!(d.row.transfer_target.as_deref(), Some("sales"));
        assert_eq!(d.row.caller_number.as_deref(), Some("+60123456789"));
        assert_eq!(d.row.node_id, "node-a");
        assert_eq!(d.row.turns, 1);
        assert_eq!(d.row.latency_p50_ms, Some(600));
        assert_eq!(d.transcript, rec.transcript);
        assert_eq!(d.turns, rec.turns);
        assert_eq!(d.errors.len(), 1);
        let cost = d.cost.unwrap();
        // 0.0004 (LLM) + 20 s at 1.0/h + 40 chars at 0.10/1k
        let expect = 0.0004 + 20.0 / 3600.0 + 0.004;
        assert!((cost.total - expect).abs() < 1e-9, "{cost:?}");
        assert_eq!(d.row.cost_total, Some(cost.total));

        let transferred = query::list_calls(
            &db,
            &CallFilter {
                outcome: Some("transfer".into()),
                ..CallFilter::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(transferred.len(), 1, "{url}");
        assert_eq!(transferred[0].call_id, id);
        let by_caller = query::list_calls(
            &db,
            &CallFilter {
                caller: Some("12345".into()),
                did: Some("0388880000".into()),
                profile: Some("sales".into()),
                ..CallFilter::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(by_caller.len(), 2);
        let days = query::daily_totals(&db, 0, i64::MAX).await.unwrap();
        assert_eq!(days.len(), 1, "{days:?}");
        assert_eq!(days[0].calls, 2);
        assert!((days[0].minutes - 1.0).abs() < 1e-9);
        assert!((days[0].cost - 2.0 * expect).abs() < 1e-9);
        store.close(Duration::from_secs(10)).await;
        assert_eq!(
            metrics.sample("sifucall_records_lost_total{reason=\"queue_full\"}"),
            Some(0.0)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_left_open_by_a_crash_are_closed_as_interrupted_with_their_turns() {
    for (url, db) in databases("crash").await {
        let metrics = Arc::new(Metrics::new());
        let store = Store::start(
            db.clone(),
            store_config("node-a", false),
            Arc::clone(&metrics),
        )
        .await
        .unwrap();
        let id = Uuid::new_v4();
        let elsewhere = Uuid::new_v4();
        store.send(Op::Start(start(id, "node-a", "+601")));
        store.send(Op::Start(start(elsewhere, "node-b", "+602")));
        let mut tap = CallTap::new(Arc::clone(&store), id);
        let mut report = sifucall::call::AgentReport::default();
        report
            .transcript
            .push(line(Role::Agent, "Selamat datang", 0, 1500));
        report
            .transcript
            .push(line(Role::Caller, "Helo", 2000, 2600));
        report.turns.push(TurnTiming {
            speech_end_ms: Some(2600),
            stt_final_ms: Some(2800),
            ..TurnTiming::default()
        });
        tap.sync(&report, std::time::Instant::now(), 2900);
        wait_until("the turn written", || async {
            query::call(&db, id)
                .await
                .unwrap()
                .is_some_and(|d| d.turns.len() == 1)
        })
        .await;
        // The daemon dies here: nothing else is written. A restart closes its open calls.
        drop(tap);
        std::mem::forget(store);
        let restarted = Store::start(db.clone(), store_config("node-a", false), metrics)
            .await
            .unwrap();
        let d = query::call(&db, id).await.unwrap().unwrap();
        assert_eq!(d.row.status, "interrupted", "{url}");
        assert_eq!(d.row.outcome.as_deref(), Some("interrupted"));
        assert_eq!(d.row.turns, 1);
        assert_eq!(d.row.duration_ms, Some(2800));
        assert_eq!(d.transcript.len(), 2);
        // Another node's call in progress is not touched.
        let b = query::call(&db, elsewhere).await.unwrap().unwrap();
        assert_eq!(b.row.status, "open");
        let interrupted = query::list_calls(
            &db,
            &CallFilter {
                outcome: Some("interrupted".into()),
                ..CallFilter::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(interrupted.len(), 1);
        restarted.close(Duration::from_secs(10)).await;
    }
}

/// One delivery: the call id header, the timestamp, the signature and the body.
type Delivery = (String, String, String, Bytes);

/// The receiver: refuses (503) until `up`, then records each delivery.
#[derive(Clone, Default)]
struct Receiver {
    up: Arc<std::sync::atomic::AtomicBool>,
    got: Arc<Mutex<Vec<Delivery>>>,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

async fn receiver() -> (String, Receiver) {
    use axum::http::{HeaderMap, StatusCode};
    let r = Receiver::default();
    let state = r.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move {
                if !state.up.load(std::sync::atomic::Ordering::SeqCst) {
                    state
                        .refused
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let h = |k: &str| {
                    headers
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                state.got.lock().unwrap().push((
                    h("idempotency-key"),
                    h("x-sifucall-timestamp"),
                    h("x-sifucall-signature"),
                    body,
                ));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, r)
}

/// An independent HMAC-SHA256 (RFC 2104 over the `sha2`-free ring primitive would share
/// code with the signer; this one is the textbook construction over ring's SHA-256).
fn hmac_sha256_hex(key: &[u8], msg: &[u8]) -> String {
    use ring::digest::{SHA256, digest};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(digest(&SHA256, key).as_ref());
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = k.iter().map(|b| b ^ 0x36).collect::<Vec<u8>>();
    inner.extend_from_slice(msg);
    let ih = digest(&SHA256, &inner);
    let mut outer = k.iter().map(|b| b ^ 0x5c).collect::<Vec<u8>>();
    outer.extend_from_slice(ih.as_ref());
    digest(&SHA256, &outer)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_receiver_down_then_up_gets_every_record_once_signed() {
    for (url, db) in databases("hook").await {
        let (hook, rx) = receiver().await;
        let metrics = Arc::new(Metrics::new());
        let store = Store::start(
            db.clone(),
            store_config("node-a", true),
            Arc::clone(&metrics),
        )
        .await
        .unwrap();
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            store.send(Op::Finish(Box::new(record(
                *id,
                "node-a",
                CallOutcome::Completed,
            ))));
        }
        let closing = tokio_util::sync::CancellationToken::new();
        let cfg = WebhookConfig {
            url: hook.parse().unwrap(),
            secret: Some(b"s3cret".to_vec()),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            timeout: Duration::from_secs(5),
            node_id: "node-a".into(),
        };
        let notify = Arc::new(tokio::sync::Notify::new());
        let poster = webhook::start(
            db.clone(),
            cfg.clone(),
            Arc::clone(&metrics),
            Arc::clone(&notify),
            closing.clone(),
        )
        .unwrap();
        // Down: every try is refused, and retried.
        let refused = rx.refused.clone();
        wait_until("several refused tries", || {
            let refused = refused.clone();
            async move { refused.load(std::sync::atomic::Ordering::SeqCst) >= 10 }
        })
        .await;
        // The daemon restarts while deliveries are pending: the outbox survives.
        closing.cancel();
        let _ = poster.await;
        let closing = tokio_util::sync::CancellationToken::new();
        let poster = webhook::start(
            db.clone(),
            cfg,
            Arc::clone(&metrics),
            notify,
            closing.clone(),
        )
        .unwrap();
        rx.up.store(true, std::sync::atomic::Ordering::SeqCst);
        let got = rx.got.clone();
        wait_until("every record delivered", || {
            let got = got.clone();
            async move { got.lock().unwrap().len() >= 5 }
        })
        .await;
        // A little longer: nothing more arrives (exactly once each).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = rx.got.lock().unwrap().clone();
        assert_eq!(got.len(), 5, "{url}");
        let mut seen: Vec<Uuid> = Vec::new();
        for (key, ts, sig, body) in &got {
            let rec: CallRecord = serde_json::from_slice(body).unwrap();
            assert_eq!(key, &rec.call_id.to_string());
            let mut msg = ts.as_bytes().to_vec();
            msg.push(b'.');
            msg.extend_from_slice(body);
            assert_eq!(sig, &format!("v1={}", hmac_sha256_hex(b"s3cret", &msg)));
            seen.push(rec.call_id);
        }
        seen.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(seen, want);
        closing.cancel();
        let _ = poster.await;
        store.close(Duration::from_secs(10)).await;
        assert!(
            metrics
                .sample("sifucall_webhook_deliveries_total{result=\"failed\"}")
                .unwrap()
                >= 10.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_writes_spools_them_and_a_full_spool_counts_the_loss() {
    // PostgreSQL that is not there (a closed port): every batch is refused.
    let dead = DbUrl::parse("postgres://postgres@127.0.0.1:9/none")
        .unwrap()
        .unwrap();
    let DbUrl::Postgres(u) = dead else {
        unreachable!()
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy(&u)
        .unwrap();
    let metrics = Arc::new(Metrics::new());
    let mut cfg = store_config("node-a", false);
    cfg.spool_max_bytes = 4096;
    let spool = cfg.spool_dir.clone();
    let store = Store::start(Db::Postgres(pool), cfg, Arc::clone(&metrics))
        .await
        .unwrap();
    store.send(Op::Finish(Box::new(record(
        Uuid::new_v4(),
        "node-a",
        CallOutcome::Completed,
    ))));
    wait_until("the batch spooled", || async {
        metrics
            .sample("sifucall_records_spooled_total")
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 1);
    // The spool's limit is reached: further writes are lost, counted.
    for _ in 0..3 {
        store.send(Op::Finish(Box::new(record(
            Uuid::new_v4(),
            "node-a",
            CallOutcome::Completed,
        ))));
    }
    wait_until("the loss counted", || async {
        metrics
            .sample("sifucall_records_lost_total{reason=\"spool_failed\"}")
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;

    // The spooled batch reaches a database that answers, at the next start.
    let dir = temp_dir("replay");
    let url = DbUrl::parse(&format!("sqlite://{}/calls.db", dir.display()))
        .unwrap()
        .unwrap();
    let db = Db::open(&url, 1).await.unwrap();
    let mut cfg = store_config("node-a", false);
    cfg.spool_dir = spool.clone();
    let replayed = Store::start(db.clone(), cfg, Arc::new(Metrics::new()))
        .await
        .unwrap();
    let rows = query::list_calls(&db, &CallFilter::default())
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "completed");
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    replayed.close(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn the_sqlite_file_is_created_with_its_directory_and_not_world_readable() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = temp_dir("mode").join("deeper/still");
    let path = dir.join("calls.db");
    let db = Db::open(
        &DbUrl::parse(&format!("sqlite://{}", path.display()))
            .unwrap()
            .unwrap(),
        1,
    )
    .await
    .unwrap();
    // Migrated: the tables answer.
    assert!(
        query::list_calls(&db, &CallFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o007, 0, "{mode:o}");
    db.close().await;
    // A second open (a restart) migrates nothing twice.
    let again = Db::open(
        &DbUrl::parse(&format!("sqlite://{}", path.display()))
            .unwrap()
            .unwrap(),
        1,
    )
    .await
    .unwrap();
    again.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_calls_with_their_events_and_recordings() {
    use sifucall::ops::records::store::apply_retention;
    for (url, db) in databases("retention").await {
        let metrics = Arc::new(Metrics::new());
        let store = Store::start(db.clone(), store_config("node-a", true), metrics)
            .await
            .unwrap();
        let dir = temp_dir("recordings");
        let old_file = dir.join("old.wav");
        std::fs::write(&old_file, b"RIFF").unwrap();
        let old_id = Uuid::new_v4();
        let mut old = record(old_id, "node-a", CallOutcome::Completed);
        old.started_at =
            rfc3339_utc(std::time::SystemTime::now() - Duration::from_secs(40 * 86_400));
        old.recording_path = Some(old_file.display().to_string());
        let new_id = Uuid::new_v4();
        store.send(Op::Finish(Box::new(old)));
        store.send(Op::Finish(Box::new(record(
            new_id,
            "node-a",
            CallOutcome::Completed,
        ))));
        wait_until("both calls written", || async {
            query::list_calls(&db, &CallFilter::default())
                .await
                .unwrap()
                .len()
                == 2
        })
        .await;
        assert_eq!(apply_retention(&db, 30).await.unwrap(), 1, "{url}");
        assert!(query::call(&db, old_id).await.unwrap().is_none());
        assert!(query::call(&db, new_id).await.unwrap().is_some());
        assert!(!old_file.exists(), "the recording went with its call");
        store.close(Duration::from_secs(10)).await;
    }
}
