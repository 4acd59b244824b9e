//! Tools and handover latency, as the caller feels it: the daemon's server in this process
//! against the fake providers, a local HTTP tool server, and a raw AudioSocket caller that
//! timestamps every message it reads.
//!
//! Run: `cargo bench --bench tool_latency -- [--calls N]` (default 10 calls per figure).
//!
//! 1. Transfer: the fake model streams `transfer_call` (no words before it); from the fake's
//!    last tool-call fragment handed to the socket to the first frame of the handover line at
//!    the caller, and to the 0x00 (which follows the whole line, whose length is printed).
//! 2. Filler: the model calls a tool that takes 2 s; from its last tool-call fragment to the
//!    first loud frame at the caller (the filler phrase, due `agent.filler_after_ms` = 700
//!    ms into the tool round).
//! 3. Greeting after a pre-call lookup: from the UUID written to the first loud greeting
//!    frame read, with no lookup and with lookups answering after 0 and 300 ms (deadline
//!    800 ms). The greeting is cached, so this is the lookup's cost alone.
//!
//! Every process shares this machine's cores: figures for the notes, never assertions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use serde_json::json;
use sifucall::call::CallOutcome;
use sifucall::call::context::{CallContext, CallControl, TransferTarget};
use sifucall::ops::config::{AgentMode, Settings, ToolSettings};
use sifucall::sandbox::openrouter::{FakeToolCall, FakeToolScript};
use sifucall::sandbox::{Sandbox, SandboxConfig, elevenlabs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[path = "common.rs"]
mod common;

const HANDOVER: &str = "Baik, saya sambungkan anda sekarang.";
const GREETING: &str = "Selamat datang.";
const RATE: usize = 8_000;
const LOUD: i16 = 300;

fn main() {
    let Some(args) = common::bench_args("tool_latency") else {
        return;
    };
    let calls: usize = common::flag(&args, "--calls")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let rt = common::runtime();
    rt.block_on(async move {
        transfer(calls).await;
        filler(calls).await;
        for delay in [None, Some(0), Some(300)] {
            lookup(calls, delay).await;
        }
    });
}

fn question() -> Vec<i16> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/malay_question_8k.wav"
    );
    sifucall::audio::wav::read(std::path::Path::new(path))
        .expect("fixture")
        .samples
}

fn sandbox_config() -> SandboxConfig {
    let mut c = SandboxConfig::default();
    c.azure.transcripts = vec![sifucall::demo::QUESTION_TEXT.into()];
    c.azure.final_delay_ms = 50;
    c.openrouter.first_token_delay_ms = 60;
    c.openrouter.tokens_per_sec = 100.0;
    c.openrouter.replies = vec!["Baik.".into()];
    c.elevenlabs.first_byte_delay_ms = 30;
    c.elevenlabs.realtime_factor = 4.0;
    c
}

fn settings() -> Settings {
    let mut s = Settings::defaults();
    s.agent.mode = AgentMode::Ai;
    s.agent.greeting = GREETING.into();
    s.agent.handover_line = HANDOVER.into();
    s.agent.hold_after_ms = 5_000;
    s.agent.speculate_after_ms = 0;
    s.agent.transfer_targets = vec![TransferTarget {
        name: "sales".into(),
        description: "buying a plan".into(),
        destination: "201".into(),
    }];
    s
}

/// A side channel that knows the caller's number.
#[derive(Debug)]
struct KnownCaller;

impl CallControl for KnownCaller {
    fn context(&self, _: uuid::Uuid) -> futures_util::future::BoxFuture<'_, CallContext> {
        Box::pin(async {
            CallContext {
                caller_number: Some("0123456789".into()),
                ..CallContext::default()
            }
        })
    }

    fn decide(&self, _: uuid::Uuid, _: CallOutcome) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

struct Daemon {
    addr: SocketAddr,
    sandbox: Sandbox,
    shutdown: CancellationToken,
}

async fn daemon(sandbox: SandboxConfig, mut s: Settings) -> Daemon {
    let sandbox = Sandbox::start(sandbox).await.expect("fakes");
    sandbox.point(&mut s);
    let metrics = Arc::new(sifucall::ops::metrics::Metrics::new());
    let behaviour = sifucall::app::behaviour(&s, &metrics).await.expect("agent");
    let mut cfg = sifucall::app::server_config(&s, behaviour);
    cfg.allow = vec!["127.0.0.0/8".parse().expect("net")];
    cfg.session.control = Arc::new(KnownCaller);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(sifucall::server::serve(
        listener,
        cfg,
        metrics,
        sifucall::ops::admin::ReadyFlag::default(),
        None,
        shutdown.clone(),
    ));
    Daemon {
        addr,
        sandbox,
        shutdown,
    }
}

/// What a raw caller saw.
struct Trace {
    uuid_at: Instant,
    /// (arrival, loud) of each audio frame.
    frames: Vec<(Instant, bool)>,
    hangup_at: Option<Instant>,
}

impl Trace {
    fn first_loud_after(&self, t: Instant) -> Option<Instant> {
        self.frames
            .iter()
            .find(|(at, loud)| *loud && *at >= t)
            .map(|(at, _)| *at)
    }
}

/// A call that plays `audio` (then silence) in real time, until the daemon's 0x00 or
/// `max`.
async fn call(addr: SocketAddr, audio: Vec<i16>, max: Duration) -> Trace {
    let sock = TcpStream::connect(addr).await.expect("connect");
    sock.set_nodelay(true).expect("nodelay");
    let (mut rd, mut wr) = sock.into_split();
    let mut hello = vec![0x01, 0, 16];
    hello.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    wr.write_all(&hello).await.expect("uuid");
    let uuid_at = Instant::now();
    let writer = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut n = 0u32;
        let frames = audio
            .chunks(160)
            .map(<[i16]>::to_vec)
            .chain(std::iter::repeat(vec![0; 160]));
        for f in frames {
            let mut m = vec![0x10, 1, 64];
            for s in f.iter().chain(std::iter::repeat(&0)).take(160) {
                m.extend_from_slice(&s.to_le_bytes());
            }
            if wr.write_all(&m).await.is_err() {
                return;
            }
            n += 1;
            tokio::time::sleep_until(start + Duration::from_millis(20) * n).await;
        }
    });
    let mut trace = Trace {
        uuid_at,
        frames: Vec::new(),
        hangup_at: None,
    };
    let read = async {
        let mut head = [0u8; 3];
        loop {
            if rd.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
            let mut payload = vec![0u8; len];
            if rd.read_exact(&mut payload).await.is_err() {
                return;
            }
            let at = Instant::now();
            match head[0] {
                0x00 => {
                    trace.hangup_at = Some(at);
                    return;
                }
                0x10..=0x18 => {
                    let loud = payload
                        .chunks_exact(2)
                        .any(|b| i16::from_le_bytes([b[0], b[1]]).unsigned_abs() >= LOUD as u16);
                    trace.frames.push((at, loud));
                }
                _ => {}
            }
        }
    };
    let _ = tokio::time::timeout(max, read).await;
    writer.abort();
    trace
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(name: &str, v: &[f64]) {
    if v.is_empty() {
        println!("{name:<58} n/a");
        return;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    println!(
        "{name:<58} median {:>7.1} ms  min {:>7.1}  max {:>7.1}  (n={})",
        s[s.len() / 2],
        s[0],
        s[s.len() - 1],
        s.len()
    );
}

/// The last time the fake model finished streaming tool calls.
fn calls_sent(d: &Daemon) -> Option<Instant> {
    d.sandbox
        .openrouter
        .request_times()
        .iter()
        .filter_map(|t| t.calls_sent)
        .max()
}

fn script(tool: &str, args: serde_json::Value) -> FakeToolScript {
    FakeToolScript {
        when_user_says: sifucall::demo::QUESTION_TEXT.into(),
        say_first: String::new(),
        rounds: vec![vec![FakeToolCall::new(tool, args)]],
    }
}

async fn transfer(calls: usize) {
    let mut sb = sandbox_config();
    sb.openrouter.tool_scripts = vec![script(
        "transfer_call",
        json!({"target": "sales", "summary": "Mahu membeli pakej."}),
    )];
    let d = daemon(sb, settings()).await;
    let line_ms = elevenlabs::speech_samples(HANDOVER, RATE as u32) as f64 * 1000.0 / RATE as f64;
    let (mut onset, mut total) = (Vec::new(), Vec::new());
    for _ in 0..calls {
        let mut audio = vec![0; RATE * 2];
        audio.extend(question());
        let trace = call(d.addr, audio, Duration::from_secs(20)).await;
        let (Some(sent), Some(hangup)) = (calls_sent(&d), trace.hangup_at) else {
            println!("transfer: a call did not hand over");
            continue;
        };
        if let Some(first) = trace.first_loud_after(sent) {
            onset.push(ms(first - sent));
        }
        total.push(ms(hangup - sent));
    }
    println!("1. transfer_call -> 0x00 (handover line {line_ms:.0} ms + 100 ms tail)");
    report("   transfer_call sent -> first handover-line frame", &onset);
    report("   transfer_call sent -> 0x00 read by the caller", &total);
    d.shutdown.cancel();
}

async fn slow_tool_server() -> String {
    let app = axum::Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            axum::Json(json!({"status": "dihantar"}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    base
}

fn tool(url: String, timeout_ms: u64) -> ToolSettings {
    ToolSettings {
        description: "Look something up.".into(),
        parameters: json!({"type": "object", "properties": {}}),
        method: "GET".into(),
        url,
        headers: Default::default(),
        timeout_ms,
        speakable: true,
        redact: vec![],
    }
}

async fn filler(calls: usize) {
    let base = slow_tool_server().await;
    let mut sb = sandbox_config();
    sb.openrouter.tool_scripts = vec![script("slow_status", json!({}))];
    let mut s = settings();
    s.tools
        .insert("slow_status".into(), tool(format!("{base}/slow"), 5_000));
    s.agent.tools = vec!["slow_status".into()];
    let d = daemon(sb, s).await;
    let mut onset = Vec::new();
    for _ in 0..calls {
        let mut audio = vec![0; RATE * 2];
        audio.extend(question());
        let trace = call(d.addr, audio, Duration::from_secs(9)).await;
        let Some(sent) = calls_sent(&d) else {
            println!("filler: the model did not call the tool");
            continue;
        };
        if let Some(first) = trace.first_loud_after(sent) {
            onset.push(ms(first - sent));
        }
    }
    println!("2. filler for a 2 s tool (filler_after_ms = 700)");
    report(
        "   tool call sent -> first filler frame at the caller",
        &onset,
    );
    d.shutdown.cancel();
}

async fn lookup(calls: usize, delay_ms: Option<u64>) {
    let lookup_app = axum::Router::new().route(
        "/lookup",
        get(move || async move {
            tokio::time::sleep(Duration::from_millis(delay_ms.unwrap_or(0))).await;
            axum::Json(json!({"name": "Aminah"}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let lookup_base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, lookup_app).await;
    });
    let mut s = settings();
    if delay_ms.is_some() {
        s.tools.insert(
            "caller_lookup".into(),
            tool(format!("{lookup_base}/lookup"), 3_000),
        );
        s.agent.pre_call_lookup = "caller_lookup".into();
        s.agent.pre_call_deadline_ms = 800;
    }
    let d = daemon(sandbox_config(), s).await;
    let mut first = Vec::new();
    for _ in 0..calls {
        let trace = call(d.addr, vec![0; RATE], Duration::from_millis(1500)).await;
        if let Some(t) = trace.first_loud_after(trace.uuid_at) {
            first.push(ms(t - trace.uuid_at));
        }
    }
    let what = match delay_ms {
        None => "3. greeting: UUID -> first greeting frame, no lookup".to_owned(),
        Some(d) => format!("   ... with a pre-call lookup answering in {d} ms"),
    };
    report(&what, &first);
    d.shutdown.cancel();
}
