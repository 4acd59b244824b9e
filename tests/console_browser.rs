//! The operator's console in a real browser: a daemon against the sandbox fakes takes a few
//! calls, then headless Chromium loads each page and the test reads what it shows (the DOM
//! after the page's own script ran), not only the status code. One screenshot per page is
//! kept in `target/console-*.png` (CI keeps them as artefacts).
//!
//! Needs Debian's `chromium` (`.ci/run` installs it). Without it the test fails in CI
//! (`CI=true`) and is skipped elsewhere with a message. `CHROMIUM=/path` picks the binary.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::ai::*;
use serde_json::Value;
use tokio::process::Command;

const RATE: u32 = 8_000;
/// Bound on one browser run (a hang guard, not a timing assertion).
const BROWSER_GUARD: Duration = Duration::from_secs(90);

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
        .find(|p| p.is_file())
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target")
}

struct Browser {
    bin: PathBuf,
    profile: PathBuf,
}

impl Browser {
    fn args(&self) -> Vec<String> {
        vec![
            "--headless".into(),
            // CI runs as root, where Chromium's sandbox cannot start.
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--hide-scrollbars".into(),
            "--window-size=1280,1000".into(),
            format!("--user-data-dir={}", self.profile.display()),
            // Lets the page's script fetch and render before the DOM is taken.
            "--virtual-time-budget=5000".into(),
        ]
    }

    async fn run(&self, extra: &[String], url: &str) -> std::process::Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(self.args())
            .args(extra)
            .arg(url)
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null());
        tokio::time::timeout(BROWSER_GUARD, cmd.output())
            .await
            .expect("chromium finishes within the guard")
            .expect("chromium runs")
    }

    /// The page's DOM after its script ran.
    async fn dom(&self, url: &str) -> String {
        let out = self.run(&["--dump-dom".into()], url).await;
        let dom = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && dom.contains("</html>"),
            "chromium --dump-dom {url} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        dom
    }

    async fn screenshot(&self, url: &str, name: &str) {
        let path = target_dir().join(format!("console-{name}.png"));
        let _ = std::fs::remove_file(&path);
        let out = self
            .run(&[format!("--screenshot={}", path.display())], url)
            .await;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 1000,
            "no screenshot of {url} at {} ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The happy path: greeting, question, reply, goodbye, the agent hangs up.
fn conversation() -> Timeline {
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    t.say(&question_8k());
    t.silence_ms(speech_ms(REPLY, RATE) + 1_500);
    t.say(&goodbye_8k());
    t
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url)
        .await
        .expect("admin answers")
        .json()
        .await
        .expect("JSON")
}

/// Text of the elements between `open` and the next `close` (tags stripped), for asserting
/// on what a table shows.
fn section<'a>(dom: &'a str, open: &str, close: &str) -> &'a str {
    let start = dom
        .find(open)
        .unwrap_or_else(|| panic!("{open} not in the page:\n{dom}"));
    let rest = &dom[start..];
    &rest[..rest.find(close).unwrap_or(rest.len())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_show_live_calls_history_and_one_call() {
    let Some(bin) = chromium() else {
        let msg = "chromium not found (apt-get install chromium, or set CHROMIUM=/path)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}: CI must run the browser test");
        }
        eprintln!("SKIPPED console_pages_show_live_calls_history_and_one_call: {msg}");
        return;
    };
    let profile = tempdir("console-browser");
    let browser = Browser {
        bin,
        profile: profile.clone(),
    };

    let mut d = start(fast_sandbox(), settings()).await;
    let admin = format!("http://{}", d.admin);

    // Two whole conversations.
    let mut finished = Vec::new();
    for _ in 0..2 {
        let report = d.place(d.call(&conversation())).await;
        let summary = d.next_summary().await;
        assert_eq!(summary.call_id, Some(report.call_id));
        finished.push(report.call_id);
    }

    // A third call stays up (the caller says nothing) while the live page is looked at.
    let mut quiet = Timeline::new(RATE);
    quiet.silence_ms(60_000);
    let quiet = d.call_then_hang_up(&quiet, 0);
    let quiet_id = quiet.call_id;
    let up = tokio::spawn(sifucall::caller::place_call(quiet));
    let mut listed = false;
    // A hang guard (30 s), not a timing assertion.
    for _ in 0..600 {
        let live = get_json(&format!("{admin}/api/live")).await;
        if live["calls"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["call_id"] == quiet_id.to_string()))
        {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(listed, "the call in progress is in /api/live");

    // Live calls: the row the script rendered from /api/live.
    let url = format!("{admin}/console");
    let dom = browser.dom(&url).await;
    assert!(
        dom.contains("data-refreshed="),
        "the live script ran and refreshed the table:\n{dom}"
    );
    let live = section(&dom, "<table id=\"live\"", "</table>");
    assert!(live.contains(&quiet_id.to_string()), "{live}");
    assert!(
        ["listening", "thinking", "speaking"]
            .iter()
            .any(|s| live.contains(&format!("class=\"state-{s}\">{s}<"))),
        "{live}"
    );
    assert!(dom.contains("1 call in progress"), "{dom}");
    browser.screenshot(&url, "live").await;

    up.abort();
    let _ = up.await;
    let ended = d.next_summary().await;
    assert_eq!(ended.call_id, Some(quiet_id));

    // History: every call, and the per-day totals as the API counts them.
    let url = format!("{admin}/console/calls");
    let dom = browser.dom(&url).await;
    let calls = section(&dom, "<table id=\"calls\"", "</table>");
    for id in finished.iter().chain([&quiet_id]) {
        assert!(
            calls.contains(&format!("href=\"/console/calls/{id}\"")),
            "{id} listed:\n{calls}"
        );
    }
    assert!(calls.contains("completed"), "{calls}");
    let totals = get_json(&format!("{admin}/api/totals")).await;
    let days = totals["days"].as_array().expect("days");
    let all: u64 = days.iter().map(|d| d["calls"].as_u64().unwrap()).sum();
    assert_eq!(all, 3);
    let shown = section(&dom, "<table id=\"totals\"", "</table>");
    for day in days {
        let row = format!(
            "<td>{}</td><td class=\"num\">{}</td>",
            day["day"].as_str().unwrap(),
            day["calls"]
        );
        assert!(shown.contains(&row), "{row} in\n{shown}");
    }
    browser.screenshot(&url, "calls").await;

    // A filter narrows the list in the browser too.
    let dom = browser
        .dom(&format!("{admin}/console/calls?outcome=abandoned"))
        .await;
    let calls = section(&dom, "<table id=\"calls\"", "</table>");
    assert!(!calls.contains(&finished[0].to_string()), "{calls}");

    // One call: the transcript and a latency row per answered turn.
    let id = finished[0];
    let url = format!("{admin}/console/calls/{id}");
    let dom = browser.dom(&url).await;
    let transcript = section(&dom, "<table id=\"transcript\"", "</table>");
    for said in [GREETING, QUESTION, REPLY, GOODBYE, AGENT_GOODBYE] {
        assert!(transcript.contains(said), "{said:?} in\n{transcript}");
    }
    let waterfall = section(&dom, "<table id=\"waterfall\"", "</table>");
    assert_eq!(
        waterfall.matches("<tr class=\"turn\">").count(),
        2,
        "{waterfall}"
    );
    let detail = get_json(&format!("{admin}/api/calls/{id}")).await;
    let t = &detail["turn_timings"][0];
    let total = t["first_frame_ms"].as_u64().unwrap() - t["speech_end_ms"].as_u64().unwrap();
    assert!(
        waterfall.contains(&format!("<td class=\"num total\">{total} ms</td>")),
        "turn 1 total {total} ms in\n{waterfall}"
    );
    assert!(
        dom.contains("<span id=\"outcome\">completed</span>"),
        "{dom}"
    );
    browser.screenshot(&url, "call").await;

    d.stop().await;
    let _ = std::fs::remove_dir_all(profile);
}

fn tempdir(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("sifucall-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}
