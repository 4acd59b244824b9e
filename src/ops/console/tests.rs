//! The console's pages and API through a real admin server.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::*;
use crate::ops::admin::{AdminState, ReadyFlag, serve};
use crate::ops::metrics::Metrics;

const EVIL: &str = "<script>alert('x')</script>&\"";

fn row(id: u128, started_at: &str, caller: &str, outcome: &str, cost: f64) -> CallRow {
    CallRow {
        call_id: Uuid::from_u128(id),
        node: Some("node-a".into()),
        started_at: started_at.into(),
        ended_at: None,
        duration_ms: 90_000,
        caller_number: Some(format!("+6012{id}")),
        caller_name: Some(caller.into()),
        did: Some("0380001000".into()),
        profile: Some("sales".into()),
        outcome: outcome.into(),
        end_reason: "agent_hangup".into(),
        turns: 2,
        cost: Some(cost),
        currency: "USD".into(),
    }
}

fn detail(r: CallRow) -> CallDetail {
    CallDetail {
        row: r,
        transfer_target: None,
        transcript: vec![
            TranscriptLine {
                role: "agent".into(),
                text: "Selamat datang.".into(),
                start_ms: 20,
                end_ms: Some(900),
                interrupted: false,
            },
            TranscriptLine {
                role: "caller".into(),
                text: EVIL.into(),
                start_ms: 1_500,
                end_ms: Some(3_000),
                interrupted: false,
            },
        ],
        turn_timings: vec![TurnTiming {
            speech_end_ms: Some(3_000),
            stt_final_ms: Some(3_100),
            llm_first_token_ms: Some(3_400),
            tts_first_audio_ms: Some(3_550),
            first_frame_ms: Some(3_580),
        }],
        tool_calls: vec![ToolCall {
            name: "end_call".into(),
            arguments: "{\"reason\":\"<bye>\"}".into(),
            at_ms: Some(9_000),
            result: None,
        }],
        errors: vec!["llm: status 429 <too many>".into()],
        cost_items: vec![CostItem {
            component: "llm".into(),
            amount: 0.002,
            detail: "812 tokens".into(),
        }],
        total_myr: Some(0.0094),
        recording: None,
    }
}

fn history() -> Arc<MemoryHistory> {
    let h = Arc::new(MemoryHistory::new(10));
    // Open calls as a shared database shows them: one on this daemon, one elsewhere.
    for (id, node) in [(20, "node-a"), (21, "node-b")] {
        let mut r = row(id, "2026-11-29T08:00:00.000Z", "Budi", "open", 0.0);
        r.node = Some(node.into());
        h.push(detail(r));
    }
    h.push(detail(row(
        1,
        "2026-11-30T10:00:00.000Z",
        "Siti",
        "completed",
        0.01,
    )));
    h.push(detail(row(
        2,
        "2026-12-01T09:00:00.000Z",
        EVIL,
        "transfer",
        0.02,
    )));
    h.push(detail(row(
        3,
        "2026-12-01T11:30:00.000Z",
        "Aminah",
        "completed",
        0.03,
    )));
    h
}

#[test]
fn filters_match_time_caller_and_outcome() {
    let r = row(1, "2026-12-01T09:00:00.000Z", "Aminah", "completed", 0.0);
    let f = |f: CallFilter| f.matches(&r);
    assert!(f(CallFilter::default()));
    assert!(f(CallFilter {
        from: Some("2026-12-01".into()),
        to: Some("2026-12-01".into()),
        ..Default::default()
    }));
    assert!(!f(CallFilter {
        to: Some("2026-11-30".into()),
        ..Default::default()
    }));
    assert!(!f(CallFilter {
        from: Some("2026-12-01T09:30".into()),
        ..Default::default()
    }));
    assert!(f(CallFilter {
        caller: Some("amin".into()),
        ..Default::default()
    }));
    assert!(f(CallFilter {
        caller: Some("60121".into()),
        ..Default::default()
    }));
    assert!(!f(CallFilter {
        outcome: Some("transfer".into()),
        ..Default::default()
    }));
    assert!(!f(CallFilter {
        did: Some("999".into()),
        ..Default::default()
    }));
}

#[test]
fn time_filters_parse_to_utc_ranges() {
    let f = |from: &str, to: &str| {
        time_range(&CallFilter {
            from: Some(from.into()),
            to: Some(to.into()),
            ..Default::default()
        })
    };
    // 2026-12-01T00:00Z is 1_796_083_200 s after the epoch.
    let day = 1_796_083_200_000;
    assert_eq!(
        f("2026-12-01", "2026-12-01"),
        Ok((Some(day), Some(day + 86_400_000)))
    );
    assert_eq!(
        f("2026-12-01T09:30", "2026-12-01 09:30:15Z"),
        Ok((Some(day + 34_200_000), Some(day + 34_215_000 + 1_000)))
    );
    assert_eq!(f("1970-01-01", "").unwrap().0, Some(0));
    for bad in ["yesterday", "2026-13-01", "2026-12-01T25:00", "2026-1-1"] {
        assert!(f(bad, "").is_err(), "{bad}");
    }
}

#[test]
fn totals_are_per_day_newest_first() {
    let rows = [
        row(1, "2026-11-30T10:00:00.000Z", "a", "completed", 0.01),
        row(2, "2026-12-01T09:00:00.000Z", "b", "completed", 0.02),
        row(3, "2026-12-01T11:00:00.000Z", "c", "completed", 0.03),
    ];
    let t = totals_of(&rows);
    assert_eq!(t.len(), 2);
    assert_eq!((t[0].day.as_str(), t[0].calls), ("2026-12-01", 2));
    assert!((t[0].minutes - 3.0).abs() < 1e-9);
    assert!((t[0].cost - 0.05).abs() < 1e-9);
    assert_eq!((t[1].day.as_str(), t[1].calls), ("2026-11-30", 1));
}

#[test]
fn pages_escape_what_callers_and_providers_say() {
    let h = history();
    let calls = h.rows(&CallFilter::default());
    let page = pages::history(&CallFilter::default(), &calls, &totals_of(&calls), "test");
    assert!(!page.contains("<script>alert"), "{page}");
    assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"));
    let d = detail(row(9, "2026-12-01T09:00:00.000Z", EVIL, "completed", 0.0));
    let page = pages::call(&d);
    assert!(!page.contains("<script>alert"));
    assert!(!page.contains("<too many>") && page.contains("&lt;too many&gt;"));
    assert!(page.contains("{&quot;reason&quot;:&quot;&lt;bye&gt;&quot;}"));
    // The filter's values go back into attributes escaped.
    let f = CallFilter {
        caller: Some("\"><img src=x onerror=alert(1)>".into()),
        ..Default::default()
    };
    let page = pages::history(&f, &[], &[], "test");
    assert!(!page.contains("<img"), "{page}");
}

#[test]
fn the_waterfall_shows_every_stage() {
    let d = detail(row(9, "2026-12-01T09:00:00.000Z", "A", "completed", 0.0));
    let page = pages::call(&d);
    for want in [
        "+0 ms", "+100 ms", "+400 ms", "+550 ms", "+580 ms", "580 ms", "Δ300",
    ] {
        assert!(page.contains(want), "{want} missing");
    }
}

async fn start(console: Console) -> (String, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = AdminState::new(Arc::new(Metrics::new()), ReadyFlag::new()).with_console(console);
    let token = CancellationToken::new();
    tokio::spawn(serve(listener, state, token.clone()));
    (base, token)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn pages_and_api_answer_with_the_calls() {
    let live = LiveCalls::new();
    let ctx = crate::call::CallContext {
        caller_name: Some(EVIL.into()),
        caller_number: Some("+60111".into()),
        ..Default::default()
    };
    let _g = live.begin(
        Uuid::from_u128(77),
        "127.0.0.1:5000".parse().unwrap(),
        &ctx,
        std::time::Instant::now(),
    );
    let (base, stop) = start(Console {
        live,
        history: history(),
        access: Access::open(),
        node_id: "node-a".into(),
    })
    .await;
    let c = client();

    let r = c.get(format!("{base}/console")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let page = r.text().await.unwrap();
    assert!(page.contains("1 call in progress") && page.contains("+60111"));
    assert!(!page.contains("<script>alert"));

    let live: serde_json::Value = c
        .get(format!("{base}/api/live"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(live["calls"][0]["caller_name"], EVIL);
    assert_eq!(live["calls"][0]["state"], "listening");
    let others = live["other_nodes"].as_array().unwrap();
    assert_eq!(others.len(), 1, "{others:?}");
    assert_eq!(others[0]["node"], "node-b");
    assert!(page.contains("id=\"other-nodes\"") && page.contains("Budi"));

    let page = c
        .get(format!("{base}/console/calls?outcome=completed"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Aminah") && page.contains("Siti"));
    assert!(
        !page.contains("&lt;script&gt;"),
        "the transfer is filtered out"
    );

    let calls: serde_json::Value = c
        .get(format!("{base}/api/calls?from=2026-12-01&limit=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let calls = calls["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["caller_name"], "Aminah");

    let totals: serde_json::Value = c
        .get(format!("{base}/api/totals"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(totals["days"][0]["day"], "2026-12-01");
    assert_eq!(totals["days"][0]["calls"], 2);

    let id = Uuid::from_u128(3);
    let page = c
        .get(format!("{base}/console/calls/{id}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Selamat datang.") && page.contains("id=\"waterfall\""));
    let one: serde_json::Value = c
        .get(format!("{base}/api/calls/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["call_id"], id.to_string());
    assert_eq!(one["turn_timings"][0]["first_frame_ms"], 3_580);

    let r = c
        .get(format!("{base}/console/calls/{}", Uuid::from_u128(404)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .get(format!("{base}/api/calls/{id}/recording"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    stop.cancel();
}

#[tokio::test]
async fn the_token_guards_pages_and_api() {
    let (base, stop) = start(Console {
        live: LiveCalls::new(),
        history: history(),
        access: Access::new(Some("tok-123"), "0.0.0.0:9090".parse().unwrap()),
        node_id: String::new(),
    })
    .await;
    let c = client();
    let r = c.get(format!("{base}/api/calls")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c.get(format!("{base}/console/calls")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/console/login");
    // Health and metrics stay open for load balancers and Prometheus.
    let r = c.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let r = c
        .get(format!("{base}/api/calls"))
        .bearer_auth("tok-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let r = c
        .post(format!("{base}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{base}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=tok-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let pair = cookie.split(';').next().unwrap().to_owned();
    let r = c
        .get(format!("{base}/console/calls"))
        .header("cookie", pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("Aminah"));
    stop.cancel();

    // Beyond loopback without a token, the console is off.
    let (base, stop) = start(Console {
        live: LiveCalls::new(),
        history: history(),
        access: Access::new(None, "0.0.0.0:9090".parse().unwrap()),
        node_id: String::new(),
    })
    .await;
    let r = c.get(format!("{base}/api/live")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = c.get(format!("{base}/console")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("SIFUCALL_ADMIN_TOKEN"));
    stop.cancel();
}
