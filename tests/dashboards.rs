//! The Grafana dashboard (`deploy/grafana/sifucall.json`) and the Prometheus alert rules
//! (`deploy/prometheus/alerts.yml`) cannot drift from the daemon: every metric they name,
//! and every label value they select, must be in the `/metrics` output of a daemon that has
//! taken a call (one with a provider failure, so the error series exist). With `promtool`
//! on the PATH (Debian's `prometheus` package; required in CI), the rules are checked and
//! unit-tested, and every dashboard query is parsed by Prometheus's own parser.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::ai::*;
use serde_json::Value;
use sifucall::sandbox::openrouter::LlmFault;

const RATE: u32 = 8_000;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every query of the dashboard (panel targets and template variables).
fn dashboard_queries() -> Vec<String> {
    let dash: Value = serde_json::from_str(&read("grafana/sifucall.json")).expect("valid JSON");
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        ("query", Value::String(s)) if s.contains("sifucall_") => {
                            out.push(s.clone())
                        }
                        _ => walk(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&dash, &mut out);
    out
}

/// A label matcher: `(label, op, value)`.
type Matcher = (String, String, String);

/// `(metric, matchers)` for each `sifucall_*` name in `text`.
fn selectors(text: &str) -> Vec<(String, Vec<Matcher>)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("sifucall_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_owned();
        let mut matchers = Vec::new();
        let after = &tail[end..];
        if let Some(body) = after.strip_prefix('{') {
            let body = &body[..body.find('}').unwrap_or(body.len())];
            for m in body.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let op_at = m.find(['=', '!']).expect("a matcher has an operator");
                let label = m[..op_at].trim().to_owned();
                let op: String = m[op_at..]
                    .chars()
                    .take_while(|c| matches!(c, '=' | '!' | '~'))
                    .collect();
                let value = m[op_at + op.len()..].trim().trim_matches('"').to_owned();
                matchers.push((label, op, value));
            }
        }
        out.push((name, matchers));
        rest = &tail[end..];
    }
    out
}

/// Sample names with the label values seen for each label, and the metric family names.
struct Scrape {
    samples: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    families: BTreeSet<String>,
}

fn parse_scrape(text: &str) -> Scrape {
    let mut samples: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let mut families = BTreeSet::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            families.insert(t.split(' ').next().unwrap_or_default().to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = samples.entry(line[..name_end].to_owned()).or_default();
        if line[name_end..].starts_with('{') {
            let body = &line[name_end + 1..line.find('}').unwrap_or(line.len())];
            for pair in body.split("\",") {
                if let Some((k, v)) = pair.split_once('=') {
                    labels
                        .entry(k.trim().to_owned())
                        .or_default()
                        .insert(v.trim_matches('"').to_owned());
                }
            }
        }
    }
    Scrape { samples, families }
}

/// Names and label values used by `text` that the scrape does not have.
fn missing(text: &str, scrape: &Scrape, what: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, matchers) in selectors(text) {
        let Some(labels) = scrape.samples.get(&name) else {
            if !scrape.families.contains(&name) {
                problems.push(format!("{what}: {name} is not in /metrics"));
            }
            continue;
        };
        for (label, op, value) in matchers {
            if value.contains('$') || op.starts_with('!') {
                continue;
            }
            let alternatives: Vec<&str> = if op == "=~" {
                value.split('|').collect()
            } else {
                vec![value.as_str()]
            };
            for alt in alternatives {
                if alt.contains(['.', '*', '+', '[']) && op == "=~" {
                    continue;
                }
                if !labels.get(&label).is_some_and(|vs| vs.contains(alt)) {
                    problems.push(format!(
                        "{what}: {name}{{{label}=\"{alt}\"}} is not in /metrics (values: {:?})",
                        labels.get(&label)
                    ));
                }
            }
        }
    }
    problems
}

fn promtool() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file())
}

#[test]
fn selectors_are_parsed() {
    let s = selectors(
        r#"rate(sifucall_calls_total{end_reason="x", instance=~"$instance"}[5m]) / sifucall_active_calls"#,
    );
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].0, "sifucall_calls_total");
    assert_eq!(s[0].1[0], ("end_reason".into(), "=".into(), "x".into()));
    assert_eq!(s[0].1[1].1, "=~");
    assert_eq!(s[1], ("sifucall_active_calls".into(), vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_use_is_in_the_daemons_output() {
    // Every LLM request fails (provider errors; the caller hears the apology).
    let mut sandbox = fast_sandbox();
    sandbox.openrouter.fault = LlmFault::Status(500);
    let mut d = start(sandbox, settings()).await;
    let mut t = Timeline::new(RATE);
    t.silence_ms(speech_ms(GREETING, RATE) + 400);
    t.say(&question_8k());
    t.silence_ms(speech_ms(REPLY, RATE) + 3_000);
    d.place(d.call_then_hang_up(&t, 0)).await;
    d.next_summary().await;
    let text = d.metrics().await;
    d.stop().await;
    let scrape = parse_scrape(&text);
    assert!(
        scrape
            .samples
            .contains_key("sifucall_provider_errors_total"),
        "the call hit a provider error:\n{text}"
    );

    let mut problems = Vec::new();
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    for q in &queries {
        problems.extend(missing(q, &scrape, "dashboard"));
    }
    let rules = read("prometheus/alerts.yml");
    problems.extend(missing(&rules, &scrape, "alerts.yml"));
    // What the issue asks the dashboard and the alerts to watch.
    let dash = queries.join("\n");
    for name in [
        "sifucall_calls_total",
        "sifucall_connections_refused_total",
        "sifucall_turn_stage_seconds_bucket",
        "sifucall_provider_errors_total",
        "sifucall_underruns_total",
        "sifucall_cost_total",
    ] {
        if !dash.contains(name) {
            problems.push(format!("the dashboard does not show {name}"));
        }
    }
    for name in [
        "sifucall_provider_errors_total",
        "sifucall_turn_stage_seconds_bucket",
        "sifucall_underruns_total",
        "sifucall_connections_refused_total",
        "sifucall_records_backlog",
    ] {
        if !rules.contains(name) {
            problems.push(format!("no alert watches {name}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn promtool_checks_the_rules_and_every_dashboard_query() {
    let Some(promtool) = promtool() else {
        let msg = "promtool not found (apt-get install prometheus)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}: CI must check the rules");
        }
        eprintln!("SKIPPED promtool_checks_the_rules_and_every_dashboard_query: {msg}");
        return;
    };
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let rules = deploy("prometheus/alerts.yml");
    run(&["check", "rules", rules.to_str().unwrap()]);
    let tests = deploy("prometheus/alerts_test.yml");
    run(&["test", "rules", tests.to_str().unwrap()]);

    // Each dashboard query as a recording rule, Grafana's variables filled in.
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in dashboard_queries()
        .iter()
        .filter(|q| !q.starts_with("label_values"))
        .enumerate()
    {
        let q = q
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        let json = serde_json::to_string(&q).unwrap();
        yaml.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {json}\n"
        ));
    }
    let dir = std::env::temp_dir().join(format!("sifucall-dash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dashboard-rules.yml");
    std::fs::write(&file, yaml).unwrap();
    run(&["check", "rules", file.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(dir);
}
