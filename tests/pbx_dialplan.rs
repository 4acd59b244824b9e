//! The shipped dialplan (`asterisk/extensions_custom.conf`), run step by step by a small
//! interpreter against the real daemon and the fake manager (AMI variant) or the admin
//! server (func_curl variant): the same applications in the same order as Asterisk would
//! run them (set the variables, `AudioSocket()`, read `SIFUCALL_RESULT`, branch), so a
//! change to the daemon's side channel or to the shipped file that breaks the other fails
//! here.
//!
//! The interpreter knows only what the file uses: `Set`, `ExecIf`, `GotoIf`, `Goto`,
//! `Gosub`/`Return`, `TryExec(AudioSocket(...))`, `CURL()`, `CURLOPT(httpheader)`,
//! `URIENCODE`, `CALLERID`, `UUID`, `$[...]` with `=`, `!=`, `&`, `|`, and extension
//! patterns. It stops at the first application that hands the call elsewhere (`Hangup`,
//! `Queue`, `Dial`, or a `Goto` into a context the file does not define).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{HANG_GUARD, echo_config, frame};
use futures_util::future::BoxFuture;
use sifucall::call::context::{CallContext, CallControl, CallOutcome, ContextSource};
use sifucall::ops::admin::{self, AdminState, ReadyFlag};
use sifucall::ops::config::Secret;
use sifucall::ops::metrics::Metrics;
use sifucall::pbx::PbxControl;
use sifucall::pbx::ami::control::whisper_uuid;
use sifucall::pbx::ami::{AmiClient, AmiConfig, AmiControl};
use sifucall::pbx::http::{CallRegistry, CallRoutes, HttpControl};
use sifucall::sandbox::ami::{FakeAmi, FakeChannel};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SHIPPED: &str = include_str!("../asterisk/extensions_custom.conf");

// ---- the interpreter ----------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Step {
    exten: String,
    label: Option<String>,
    app: String,
    args: String,
}

fn parse(conf: &str) -> HashMap<String, Vec<Step>> {
    let mut contexts: HashMap<String, Vec<Step>> = HashMap::new();
    let mut current = String::new();
    let mut exten = String::new();
    for raw in conf.lines() {
        let line = raw.split(';').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            current = name.trim_end_matches(']').to_owned();
            contexts.entry(current.clone()).or_default();
            continue;
        }
        let (kind, rest) = line.split_once("=>").expect("exten/same/include line");
        let rest = rest.trim();
        let (prio, app) = match kind.trim() {
            "exten" => {
                let (e, r) = rest.split_once(',').unwrap();
                exten = e.trim().to_owned();
                r.split_once(',').unwrap()
            }
            "same" => rest.split_once(',').unwrap(),
            "include" => continue,
            other => panic!("unknown line kind {other}"),
        };
        let label = prio
            .split_once('(')
            .map(|(_, l)| l.trim_end_matches(')').to_owned());
        let app = app.trim();
        let (name, args) = app.split_once('(').unwrap_or((app, ")"));
        contexts.get_mut(&current).unwrap().push(Step {
            exten: exten.clone(),
            label,
            app: name.to_owned(),
            args: args.strip_suffix(')').unwrap_or(args).to_owned(),
        });
    }
    contexts
}

/// Asterisk extension patterns as the file uses them.
fn matches(pattern: &str, exten: &str) -> bool {
    let Some(p) = pattern.strip_prefix('_') else {
        return pattern == exten;
    };
    let (p, e): (Vec<char>, Vec<char>) = (p.chars().collect(), exten.chars().collect());
    fn m(p: &[char], e: &[char]) -> bool {
        match p.first() {
            None => e.is_empty(),
            Some('.') => !e.is_empty(),
            Some('!') => true,
            Some(c) => {
                let ok = match (c, e.first()) {
                    (_, None) => false,
                    ('X', Some(d)) => d.is_ascii_digit(),
                    ('N', Some(d)) => ('2'..='9').contains(d),
                    ('Z', Some(d)) => ('1'..='9').contains(d),
                    (c, Some(d)) => c == d,
                };
                ok && m(&p[1..], &e[1..])
            }
        }
    }
    m(&p, &e)
}

/// Splits at `sep` outside brackets and quotes.
fn split_top(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let (mut depth, mut quoted) = (0i32, false);
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            '(' | '[' | '{' if !quoted => depth += 1,
            ')' | ']' | '}' if !quoted => depth -= 1,
            _ => {}
        }
        if c == sep && depth == 0 && !quoted {
            out.push(String::new());
        } else {
            out.last_mut().unwrap().push(c);
        }
    }
    out
}

fn uri_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Where the call went when the dialplan handed it on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    Hangup,
    /// `Goto` into a context the file does not define (e.g. MikoPBX's `internal`).
    Goto(String, String),
    /// `Queue(...)` or `Dial(...)`, with expanded arguments.
    App(String, String),
}

enum Flow {
    Next,
    Jump(String, String, String),
    Return,
    End(End),
}

struct Channel<'a> {
    vars: HashMap<String, String>,
    /// Values the operator would have written into [sifucall-settings].
    site: HashMap<&'static str, String>,
    caller: (&'static str, &'static str),
    name: String,
    /// The AMI variant: the fake manager holds the channel's variables too.
    ami: Option<&'a FakeAmi>,
    curl_header: Option<String>,
    /// Applications run, in order (`App arg0`).
    trace: Vec<String>,
    context: String,
}

impl Channel<'_> {
    fn var(&self, name: &str) -> String {
        if let Some(fake) = self.ami {
            if let Some(v) = fake.var(&self.name, name) {
                return v;
            }
        }
        self.vars.get(name).cloned().unwrap_or_default()
    }

    fn set(&mut self, name: &str, value: String) {
        let value = self.site.get(name).cloned().unwrap_or(value);
        if let Some(fake) = self.ami {
            fake.set_var(&self.name, name.trim_start_matches('_'), &value);
        }
        self.vars
            .insert(name.trim_start_matches('_').to_owned(), value);
    }

    fn expand(&self, s: &str) -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find(['$']) {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let (open, close) = match after.chars().next() {
                Some('{') => ('{', '}'),
                Some('[') => ('[', ']'),
                _ => {
                    out.push('$');
                    rest = after;
                    continue;
                }
            };
            let mut depth = 0;
            let mut end = 0;
            for (j, c) in after.char_indices() {
                if c == open {
                    depth += 1;
                } else if c == close {
                    depth -= 1;
                    if depth == 0 {
                        end = j;
                        break;
                    }
                }
            }
            let inner = self.expand(&after[1..end]);
            out.push_str(&if open == '{' {
                self.eval(&inner)
            } else {
                cond(&inner).to_string()
            });
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }

    fn eval(&self, expr: &str) -> String {
        if let Some((f, args)) = expr.split_once('(') {
            let args = args.strip_suffix(')').unwrap_or(args);
            return match f {
                "UUID" => Uuid::new_v4().to_string(),
                "URIENCODE" => uri_encode(args),
                "CALLERID" if args == "num" => self.caller.0.to_owned(),
                "CALLERID" if args == "name" => self.caller.1.to_owned(),
                other => panic!("function {other} is not known to the interpreter"),
            };
        }
        match expr {
            "CHANNEL" => self.name.clone(),
            "CONTEXT" => self.context.clone(),
            _ => match expr.split_once(':') {
                Some((v, off)) => self.var(v).chars().skip(off.parse().unwrap()).collect(),
                None => self.var(expr),
            },
        }
    }
}

/// `"a" = "b" & "c" != "d" | ...` after expansion.
fn cond(expr: &str) -> bool {
    split_top(expr, '|').iter().any(|alt| {
        split_top(alt, '&').iter().all(|term| {
            let t = term.trim();
            let (l, op, r) = if let Some((l, r)) = t.split_once("!=") {
                (l, "!=", r)
            } else {
                let (l, r) = t.split_once('=').expect("comparison");
                (l, "=", r)
            };
            let (l, r) = (l.trim().trim_matches('"'), r.trim().trim_matches('"'));
            (l == r) == (op == "=")
        })
    })
}

async fn curl(ch: &mut Channel<'_>, args: &str) -> String {
    let parts = split_top(args, ',');
    let url = ch.expand(&parts[0]);
    let client = reqwest::Client::builder()
        .timeout(HANG_GUARD)
        .build()
        .unwrap();
    let mut req = match parts.get(1) {
        Some(body) => client.post(&url).body(ch.expand(body)),
        None => client.get(&url),
    };
    if let Some(h) = &ch.curl_header {
        let (k, v) = h.split_once(':').unwrap();
        req = req.header(k.trim(), v.trim());
    }
    ch.trace
        .push(format!("CURL {}", url.rsplit('/').next().unwrap_or("")));
    match req.send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// `AudioSocket(uuid,host:port)` as app_audiosocket does it: connect, send the UUID, play
/// audio, return when the daemon sends 0x00 (0), or -1 if it cannot connect or the
/// connection drops.
async fn audiosocket(args: &str) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let parts = split_top(args, ',');
    let id = Uuid::parse_str(&parts[0]).unwrap();
    let Ok(addr) = parts[1].parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let mut hello = frame(0x01, id.as_bytes());
    hello.extend_from_slice(&frame(0x10, &[0u8; 320]));
    if s.write_all(&hello).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while buf.len() >= 3 {
            let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
            if buf.len() < 3 + len {
                break;
            }
            if buf[0] == 0 {
                return true;
            }
            buf.drain(..3 + len);
        }
        match tokio::time::timeout(HANG_GUARD, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
}

fn run_from<'a>(
    plan: &'a HashMap<String, Vec<Step>>,
    ch: &'a mut Channel<'_>,
    context: String,
    exten: String,
    at: String,
) -> BoxFuture<'a, Result<End, ()>> {
    Box::pin(async move {
        let (mut context, mut exten, mut at) = (context, exten, at);
        'jump: loop {
            let Some(steps) = plan.get(&context) else {
                return Ok(End::Goto(context, exten));
            };
            let pattern = steps
                .iter()
                .map(|s| s.exten.clone())
                .find(|p| matches(p, &exten))
                .or_else(|| steps.iter().any(|s| s.exten == "i").then(|| "i".to_owned()))
                .unwrap_or_else(|| panic!("{exten} not in [{context}]"));
            let ext: Vec<&Step> = steps.iter().filter(|s| s.exten == pattern).collect();
            let mut i = if at == "1" {
                0
            } else {
                ext.iter()
                    .position(|s| s.label.as_deref() == Some(at.as_str()))
                    .unwrap_or_else(|| panic!("label {at} in [{context}]"))
            };
            ch.context = context.clone();
            ch.vars.insert("EXTEN".into(), exten.clone());
            while i < ext.len() {
                let step = ext[i].clone();
                match exec(plan, ch, &step).await? {
                    Flow::Next => i += 1,
                    Flow::Return => return Err(()),
                    Flow::End(e) => return Ok(e),
                    Flow::Jump(c, e, p) => {
                        let c = if c.is_empty() { context.clone() } else { c };
                        let e = if e.is_empty() { exten.clone() } else { e };
                        (context, exten, at) = (c, e, p);
                        continue 'jump;
                    }
                }
            }
            panic!("fell off the end of [{context}]");
        }
    })
}

fn goto(target: &str) -> Flow {
    let p = split_top(target, ',');
    match p.len() {
        1 => Flow::Jump(String::new(), String::new(), p[0].clone()),
        2 => Flow::Jump(String::new(), p[0].clone(), p[1].clone()),
        _ => Flow::Jump(p[0].clone(), p[1].clone(), p[2].clone()),
    }
}

async fn exec(
    plan: &HashMap<String, Vec<Step>>,
    ch: &mut Channel<'_>,
    step: &Step,
) -> Result<Flow, ()> {
    let args = &step.args;
    Ok(match step.app.as_str() {
        "NoOp" | "Answer" => Flow::Next,
        "Return" => Flow::Return,
        "Hangup" => {
            ch.trace.push("Hangup".into());
            Flow::End(End::Hangup)
        }
        "Queue" | "Dial" => {
            ch.trace.push(step.app.clone());
            Flow::End(End::App(step.app.clone(), ch.expand(args)))
        }
        "Gosub" => {
            let p = split_top(args, ',');
            let (context, exten) = (ch.context.clone(), ch.vars.get("EXTEN").cloned());
            let _ = run_from(plan, ch, p[0].clone(), p[1].clone(), p[2].clone()).await;
            // Return restores where the call was.
            ch.context = context;
            if let Some(e) = exten {
                ch.vars.insert("EXTEN".into(), e);
            }
            Flow::Next
        }
        "Set" => {
            let (name, value) = args.split_once('=').unwrap();
            if name == "CURLOPT(httpheader)" {
                ch.curl_header = Some(ch.expand(value));
            } else if let Some(inner) = value
                .strip_prefix("${CURL(")
                .and_then(|v| v.strip_suffix(")}"))
            {
                let got = curl(ch, inner).await;
                ch.set(name, got);
            } else {
                let v = ch.expand(value);
                ch.trace.push(format!("Set {name}"));
                ch.set(name, v);
            }
            Flow::Next
        }
        "ExecIf" => {
            let (c, app) = args.split_once('?').unwrap();
            if cond(&ch.expand(c.trim_start_matches("$[").trim_end_matches(']'))) {
                let (name, a) = app.split_once('(').unwrap();
                let inner = Step {
                    app: name.to_owned(),
                    args: a.strip_suffix(')').unwrap().to_owned(),
                    ..step.clone()
                };
                return Box::pin(exec(plan, ch, &inner)).await;
            }
            Flow::Next
        }
        "GotoIf" => {
            let (c, dest) = args.split_once('?').unwrap();
            let dest = split_top(dest, ':')[0].clone();
            if ch.expand(c) == "true" {
                goto(&ch.expand(&dest))
            } else {
                Flow::Next
            }
        }
        "Goto" => goto(&ch.expand(args)),
        "TryExec" => {
            let inner = args
                .strip_prefix("AudioSocket(")
                .and_then(|a| a.strip_suffix(')'))
                .expect("TryExec(AudioSocket(...))");
            let expanded = ch.expand(inner);
            ch.trace.push(format!("AudioSocket {expanded}"));
            let ok = audiosocket(&expanded).await;
            ch.vars.insert(
                "TRYSTATUS".into(),
                if ok { "SUCCESS" } else { "FAILED" }.into(),
            );
            Flow::Next
        }
        other => panic!("application {other} is not known to the interpreter"),
    })
}

/// Runs a call from the internal test number (`[sifucall]`, e.g. 999) to the end.
async fn place(ch: &mut Channel<'_>, number: &str) -> End {
    let plan = parse(SHIPPED);
    run_from(&plan, ch, "sifucall".into(), number.into(), "1".into())
        .await
        .expect("no Return outside a Gosub")
}

fn channel<'a>(ami: Option<&'a FakeAmi>, site: &[(&'static str, String)]) -> Channel<'a> {
    let name = format!("PJSIP/trunk-{:08x}", rand_u32());
    if let Some(fake) = ami {
        fake.add_channel(FakeChannel::new(&name, "60312345678", "999"));
    }
    Channel {
        vars: HashMap::new(),
        site: site.iter().cloned().collect(),
        caller: ("60312345678", "Ali"),
        name,
        ami,
        curl_header: None,
        trace: Vec::new(),
        context: String::new(),
    }
}

fn rand_u32() -> u32 {
    Uuid::new_v4().as_u128() as u32
}

// ---- daemons ------------------------------------------------------------------------------

/// The real side channel with the outcome the test wants (the call core decides only
/// `completed` itself today).
#[derive(Debug)]
struct Decides {
    outcome: Option<CallOutcome>,
    inner: Arc<dyn CallControl>,
}

impl CallControl for Decides {
    fn context(&self, call_id: Uuid) -> BoxFuture<'_, CallContext> {
        self.inner.context(call_id)
    }
    fn decide(&self, call_id: Uuid, outcome: CallOutcome) -> BoxFuture<'_, ()> {
        self.inner
            .decide(call_id, self.outcome.clone().unwrap_or(outcome))
    }
    fn whisper(&self, call_id: Uuid) -> Option<String> {
        self.inner.whisper(call_id)
    }
}

async fn daemon(
    control: Arc<dyn CallControl>,
    outcome: Option<CallOutcome>,
    max_calls: usize,
) -> common::TestDaemon {
    let mut cfg = echo_config();
    cfg.max_calls = max_calls;
    cfg.session.idle_hangup = Some(Duration::from_millis(200));
    cfg.session.control = Arc::new(Decides {
        outcome,
        inner: control,
    });
    common::start(cfg).await
}

/// The daemon's own control (HTTP registry, whisper legs) with AMI, as `app` builds it.
async fn fake_ami() -> (FakeAmi, Arc<PbxControl>) {
    let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
    let client = AmiClient::start(
        AmiConfig {
            host: "127.0.0.1".into(),
            port: fake.addr().port(),
            username: "sifucall".into(),
            secret: Secret::new(Some("pw".into())),
            tls: false,
            tls_ca_file: None,
            action_timeout: HANG_GUARD,
            reconnect_max: Duration::from_millis(200),
        },
        CancellationToken::new(),
    );
    assert!(client.wait_up(HANG_GUARD).await);
    let ami = Arc::new(AmiControl::new(client));
    (
        fake,
        Arc::new(PbxControl::new(CallRegistry::new(), Some(ami))),
    )
}

fn transfer(dest: &str, summary: Option<&str>) -> CallOutcome {
    CallOutcome::Transferred {
        target: "sales".into(),
        destination: dest.into(),
        summary: summary.map(str::to_owned),
    }
}

fn site(primary: SocketAddr) -> Vec<(&'static str, String)> {
    vec![("SIFUCALL_PRIMARY", primary.to_string())]
}

fn internal(n: &str) -> End {
    End::Goto("internal".into(), n.into())
}

// ---- AMI -----------------------------------------------------------------------------------

#[tokio::test]
async fn ami_dialplan_follows_each_outcome() {
    let (fake, ami) = fake_ami().await;
    let cases = [
        (None, End::Hangup, "completed"),
        (Some(transfer("201", None)), internal("201"), "transfer"),
        (
            Some(CallOutcome::Fallback {
                reason: "provider_failures".into(),
                destination: "queue-support".into(),
            }),
            End::App("Queue".into(), "support,,,,30".into()),
            "fallback",
        ),
        (Some(CallOutcome::Abandoned), End::Hangup, "abandoned"),
        (
            Some(CallOutcome::Error {
                detail: "protocol".into(),
            }),
            internal("201"),
            "error",
        ),
        // A summary, but warm transfers are off in the shipped settings: blind.
        (
            Some(transfer("202", Some("refund"))),
            internal("202"),
            "transfer",
        ),
    ];
    for (outcome, expected, result) in cases {
        let d = daemon(ami.clone(), outcome.clone(), 10).await;
        let mut ch = channel(Some(&fake), &site(d.addr));
        let end = place(&mut ch, "999").await;
        assert_eq!(end, expected, "{outcome:?}: {:?}", ch.trace);
        assert_eq!(ch.var("SIFUCALL_RESULT"), result);
        // The order the daemon depends on: the UUID is on the channel before AudioSocket(),
        // and the branch reads the result after it.
        let pos = |p: &str| ch.trace.iter().position(|t| t.starts_with(p)).unwrap();
        assert!(
            pos("Set SIFUCALL_UUID") < pos("AudioSocket"),
            "{:?}",
            ch.trace
        );
        d.shutdown.cancel();
    }
}

#[tokio::test]
async fn ami_dialplan_reads_the_context_set_before_audiosocket() {
    let (fake, ami) = fake_ami().await;
    let mut d = daemon(ami, None, 10).await;
    let mut ch = channel(Some(&fake), &site(d.addr));
    // What a `[<provider>-incoming-custom]` hook would have set earlier on the channel.
    ch.set("__SIFUCALL_PROFILE", "sales".into());
    ch.set("__SIFUCALL_VAR_ACCOUNT", "A-17".into());
    assert_eq!(place(&mut ch, "999").await, End::Hangup);
    let c = d.next_summary().await.context;
    assert_eq!(c.source, ContextSource::Ami);
    assert_eq!(c.did.as_deref(), Some("999"));
    assert_eq!(c.profile.as_deref(), Some("sales"));
    assert_eq!(c.vars.get("account").map(String::as_str), Some("A-17"));
    assert_eq!(c.channel.as_deref(), Some(ch.name.as_str()));
}

#[tokio::test]
async fn ami_dialplan_tries_the_second_daemon_then_a_person() {
    let (fake, ami) = fake_ami().await;
    // The first daemon is full: it refuses after reading the UUID and says so.
    let full = daemon(ami.clone(), None, 0).await;
    let spare = daemon(ami.clone(), None, 10).await;
    let mut site = site(full.addr);
    site.push(("SIFUCALL_SECONDARY", spare.addr.to_string()));
    let mut ch = channel(Some(&fake), &site);
    assert_eq!(place(&mut ch, "999").await, End::Hangup, "{:?}", ch.trace);
    let sockets: Vec<&String> = ch
        .trace
        .iter()
        .filter(|t| t.starts_with("AudioSocket"))
        .collect();
    assert_eq!(sockets.len(), 2, "{:?}", ch.trace);
    assert!(sockets[0].ends_with(&full.addr.to_string()));
    assert!(sockets[1].ends_with(&spare.addr.to_string()));
    assert_ne!(
        sockets[0].split(',').next(),
        sockets[1].split(',').next(),
        "a new UUID"
    );

    // Nobody listens at the primary and there is no second daemon: a person.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = gone.local_addr().unwrap();
    drop(gone);
    let mut ch = channel(Some(&fake), &[("SIFUCALL_PRIMARY", nowhere.to_string())]);
    assert_eq!(
        place(&mut ch, "999").await,
        internal("201"),
        "{:?}",
        ch.trace
    );
    assert_eq!(ch.var("TRYSTATUS"), "FAILED");
}

#[tokio::test]
async fn ami_dialplan_warm_transfer_dials_with_the_whisper_leg() {
    let (fake, ami) = fake_ami().await;
    let d = daemon(ami, Some(transfer("201", Some("Wants a refund"))), 10).await;
    let mut site = site(d.addr);
    site.push(("SIFUCALL_WARM", "yes".into()));
    let mut ch = channel(Some(&fake), &site);
    let End::App(app, args) = place(&mut ch, "999").await else {
        panic!("{:?}", ch.trace);
    };
    assert_eq!(app, "Dial");
    let uuid = ch
        .trace
        .iter()
        .find_map(|t| t.strip_prefix("AudioSocket "))
        .and_then(|a| a.split(',').next())
        .map(|u| Uuid::parse_str(u).unwrap())
        .unwrap();
    assert_eq!(
        args,
        format!(
            "PJSIP/201,30,U(sifucall-whisper^{}^{})",
            whisper_uuid(uuid),
            d.addr
        )
    );

    // The person answers: Dial runs the U() subroutine on their channel with its arguments.
    let sub = args.split("U(").nth(1).unwrap().trim_end_matches(')');
    let parts: Vec<&str> = sub.split('^').collect();
    let mut person = channel(Some(&fake), &[]);
    person.vars.insert("ARG1".into(), parts[1].into());
    person.vars.insert("ARG2".into(), parts[2].into());
    let statuses = || fake.actions().iter().filter(|a| a.name == "Status").count();
    let before = statuses();
    let plan = parse(SHIPPED);
    let returned = run_from(&plan, &mut person, parts[0].into(), "s".into(), "1".into()).await;
    assert!(
        returned.is_err(),
        "the subroutine returns to Dial: {:?}",
        person.trace
    );
    assert_eq!(
        person.var("TRYSTATUS"),
        "SUCCESS",
        "the daemon ended the leg with 0x00"
    );
    assert_eq!(statuses(), before, "the leg was not taken for a new call");
}

// ---- func_curl -----------------------------------------------------------------------------

struct CurlDaemon {
    calls: common::TestDaemon,
    api: String,
    stop: CancellationToken,
}

async fn curl_daemon(outcome: Option<CallOutcome>, token: Option<&str>) -> CurlDaemon {
    let registry = CallRegistry::new();
    let calls = daemon(
        Arc::new(HttpControl::new(Arc::clone(&registry))),
        outcome,
        10,
    )
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let state =
        AdminState::new(Arc::new(Metrics::new()), ReadyFlag::new()).with_calls(CallRoutes {
            registry,
            token: Secret::new(token.map(str::to_owned)),
        });
    tokio::spawn(admin::serve(listener, state, stop.clone()));
    CurlDaemon { calls, api, stop }
}

#[tokio::test]
async fn curl_dialplan_registers_then_branches_on_the_outcome() {
    for (outcome, expected) in [
        (None, End::Hangup),
        (Some(transfer("203", None)), internal("203")),
    ] {
        let mut d = curl_daemon(outcome, Some("tok")).await;
        let mut ch = channel(
            None,
            &[
                ("SIFUCALL_PRIMARY", d.calls.addr.to_string()),
                ("SIFUCALL_API_PRIMARY", d.api.clone()),
                ("SIFUCALL_TOKEN", "tok".into()),
            ],
        );
        assert_eq!(place(&mut ch, "997").await, expected, "{:?}", ch.trace);
        let order: Vec<&str> = ch
            .trace
            .iter()
            .filter(|t| t.starts_with("CURL") || t.starts_with("AudioSocket"))
            .map(|t| t.split(' ').next().unwrap())
            .collect();
        assert_eq!(order, ["CURL", "AudioSocket", "CURL", "CURL", "CURL"]);
        let c = d.calls.next_summary().await.context;
        assert_eq!(c.source, ContextSource::Http);
        assert_eq!(c.caller_number.as_deref(), Some("60312345678"));
        assert_eq!(c.caller_name.as_deref(), Some("Ali"));
        assert_eq!(c.did.as_deref(), Some("997"));
        assert_eq!(c.channel.as_deref(), Some(ch.name.as_str()));
        d.stop.cancel();
        d.calls.shutdown.cancel();
    }
}

#[tokio::test]
async fn curl_dialplan_without_the_token_gets_no_context_and_a_person() {
    let mut d = curl_daemon(None, Some("tok")).await;
    let mut ch = channel(
        None,
        &[
            ("SIFUCALL_PRIMARY", d.calls.addr.to_string()),
            ("SIFUCALL_API_PRIMARY", d.api.clone()),
        ],
    );
    // The call still runs (default profile); its result cannot be read back, so the
    // dialplan does the safe thing.
    assert_eq!(
        place(&mut ch, "997").await,
        internal("201"),
        "{:?}",
        ch.trace
    );
    assert_eq!(d.calls.next_summary().await.context, CallContext::default());
    d.stop.cancel();
}
