//! Log setup: one `tracing` subscriber writing to stderr, which journald captures under the
//! unit's name. JSON lines by default (timestamp, level, target, message, fields, and the
//! enclosing spans such as the per-call span with `call_id` and `peer`) so that
//! `journalctl -u sifucall -o cat | jq` works; a human-readable format on request.
//!
//! Lines go through a bounded queue to a writer thread, so a call never waits for stderr:
//! if journald pushes back and the queue is full, lines are dropped and counted
//! ([`dropped_lines`], exported as `sifucall_log_lines_dropped_total`). The filter can be
//! changed while running ([`set_level`], used on SIGHUP), and a panic anywhere is logged as a
//! line of its own, inside the span it happened in ([`install_panic_hook`]).

use std::io::{self, Write as _};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry, reload};

use super::config::LogFormat;

/// Lines the queue holds before new ones are dropped.
const QUEUE_LINES: usize = 16_384;
/// How long [`LogGuard`]'s drop waits for queued lines to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

static DROPPED: AtomicU64 = AtomicU64::new(0);
static FILTER: OnceLock<FilterHandle> = OnceLock::new();

type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    /// The filter directive (from `log.level` or `RUST_LOG`) does not parse.
    #[error("invalid log filter {directive:?} from {source_name}: {reason}")]
    Filter {
        /// The text that failed.
        directive: String,
        /// `log.level` or `RUST_LOG`.
        source_name: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// A global subscriber is already installed (init was called twice).
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadySet(String),
}

/// Log lines dropped so far because the output was not keeping up.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Keeps the log writer thread's queue flushed at exit: hold it in `main` until the end.
#[must_use = "dropping the guard flushes and detaches the log writer"]
#[derive(Debug)]
pub struct LogGuard {
    tx: SyncSender<Msg>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        // Blocking send: at exit, waiting for room in the queue is right.
        if self.tx.send(Msg::Flush(ack_tx)).is_ok() {
            let _ = ack_rx.recv_timeout(FLUSH_WAIT);
        }
    }
}

/// What the fmt layer writes to: each event becomes one queued line.
#[derive(Debug, Clone)]
pub struct NonBlocking {
    tx: SyncSender<Msg>,
}

#[derive(Debug)]
enum Msg {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

impl NonBlocking {
    /// Starts a writer thread that writes queued lines to `out`; the guard flushes it.
    pub fn new<W: io::Write + Send + 'static>(out: W, capacity: usize) -> (Self, LogGuard) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(rx, out));
        if let Err(e) = spawned {
            // Without the thread every line is dropped (and counted); say so once.
            let _ = writeln!(
                io::stderr(),
                "sifucall: cannot start the log writer thread: {e}"
            );
        }
        (Self { tx: tx.clone() }, LogGuard { tx })
    }
}

fn write_lines<W: io::Write>(rx: Receiver<Msg>, mut out: W) {
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        let mut acks = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Line(l) => batch.extend_from_slice(&l),
                Msg::Flush(ack) => acks.push(ack),
            }
            next = if batch.len() < 64 * 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            let _ = out.write_all(&batch);
            let _ = out.flush();
            batch.clear();
        }
        for ack in acks {
            let _ = ack.try_send(());
        }
    }
}

/// One event's bytes, queued when the fmt layer is done with it.
#[derive(Debug)]
pub struct QueuedLine {
    buf: Vec<u8>,
    tx: SyncSender<Msg>,
}

impl io::Write for QueuedLine {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buf);
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = QueuedLine;
    fn make_writer(&'a self) -> QueuedLine {
        QueuedLine {
            buf: Vec::with_capacity(512),
            tx: self.tx.clone(),
        }
    }
}

/// Installs the global subscriber: `format` to stderr through the non-blocking queue,
/// filtered by `RUST_LOG` if it is set and non-empty, otherwise by `level` (an `EnvFilter`
/// directive such as `info` or `info,sifucall::providers=debug`). Keep the returned guard
/// alive until exit. Calling it again returns [`LoggingError::AlreadySet`].
pub fn init(format: LogFormat, level: &str) -> Result<LogGuard, LoggingError> {
    let filter = match rust_log() {
        Some(v) => parse_filter(&v, "RUST_LOG")?,
        None => parse_filter(level, "log.level")?,
    };
    install(format, filter)
}

/// Like [`init`] with `directive` as the filter, ignoring `RUST_LOG`: the fallback used to
/// report an invalid filter.
pub fn init_with_filter(format: LogFormat, directive: &str) -> Result<LogGuard, LoggingError> {
    install(format, parse_filter(directive, "log.level")?)
}

fn install(format: LogFormat, filter: EnvFilter) -> Result<LogGuard, LoggingError> {
    let (writer, guard) = NonBlocking::new(io::stderr(), QUEUE_LINES);
    let (subscriber, handle) = build_reloadable(format, filter, writer);
    // Also routes `log` records from dependencies through tracing.
    subscriber
        .try_init()
        .map_err(|e| LoggingError::AlreadySet(e.to_string()))?;
    let _ = FILTER.set(handle);
    Ok(guard)
}

fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// What [`set_level`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelChange {
    /// The new filter is in force.
    Applied,
    /// `RUST_LOG` is set, and it wins over `log.level`; nothing changed.
    OverriddenByRustLog,
    /// Logging was not initialised by [`init`]; nothing changed.
    NotInitialised,
}

/// Replaces the filter of the subscriber [`init`] installed with `level` (a `log.level`
/// directive), unless `RUST_LOG` overrides it. An invalid directive changes nothing.
pub fn set_level(level: &str) -> Result<LevelChange, LoggingError> {
    let filter = parse_filter(level, "log.level")?;
    if rust_log().is_some() {
        return Ok(LevelChange::OverriddenByRustLog);
    }
    let Some(handle) = FILTER.get() else {
        return Ok(LevelChange::NotInitialised);
    };
    match handle.reload(filter) {
        Ok(()) => Ok(LevelChange::Applied),
        Err(_) => Ok(LevelChange::NotInitialised),
    }
}

/// Checks what `EnvFilter` accepts but almost surely is a typo (an empty directive, `inf`,
/// `warning`: `EnvFilter` reads unknown words as target names, so the daemon would print
/// nothing at all), with the same rules as the configuration check.
pub fn check_directive(directive: &str) -> Result<(), String> {
    super::config::validate_log_filter(directive)
}

/// Parses a filter directive, naming where it came from on error.
pub fn parse_filter(directive: &str, source_name: &'static str) -> Result<EnvFilter, LoggingError> {
    let err = |reason: String| LoggingError::Filter {
        directive: directive.to_owned(),
        source_name,
        reason,
    };
    check_directive(directive).map_err(err)?;
    EnvFilter::builder()
        .parse(super::log_filter::cap_noisy_targets(directive))
        .map_err(|e| err(e.to_string()))
}

/// The subscriber [`init`] installs, writing to `writer` (tests pass a buffer), with a
/// handle to replace its filter.
pub fn build_reloadable<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
) -> (Box<dyn Subscriber + Send + Sync>, FilterHandle)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_target(true)
            .with_writer(writer)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_target(true)
            .with_writer(writer)
            .boxed(),
    };
    (
        Box::new(tracing_subscriber::registry().with(filter).with(fmt)),
        handle,
    )
}

/// The subscriber [`init`] installs, writing to `writer` (tests pass a buffer).
pub fn build<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    build_reloadable(format, filter, writer).0
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Replaces the panic hook with one that logs the panic as an ERROR line through
/// `tracing`, inside whatever span was current (so a panic in a call carries its
/// `call_id`), with the location and, if `RUST_BACKTRACE` asks for it, the backtrace.
/// Install it after [`init`].
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = panic_text(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => backtrace.to_string(),
            _ => String::new(),
        };
        tracing::error!(
            target: "sifucall::panic",
            panic = %message,
            location = %location,
            thread = thread.name().unwrap_or("unnamed"),
            backtrace = %backtrace,
            "panic: {message}"
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn json_lines_carry_span_fields() {
        let buf = Buf::default();
        let sub = build(
            LogFormat::Json,
            parse_filter("info", "log.level").unwrap(),
            buf.clone(),
        );
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!(
                "call",
                call_id = "0b8a4a62-3c55-4f43-9a5b-2d7f0a4e8c11",
                peer = "10.0.0.5:4242"
            );
            let _g = span.enter();
            tracing::info!(frames = 3u64, "call ended");
            tracing::debug!("filtered out");
        });
        let text = buf.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "call ended");
        assert_eq!(v["frames"], 3);
        assert_eq!(v["target"], module_path!());
        assert!(
            v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{v}"
        );
        assert_eq!(v["span"]["call_id"], "0b8a4a62-3c55-4f43-9a5b-2d7f0a4e8c11");
        assert_eq!(v["span"]["name"], "call");
        assert_eq!(v["spans"][0]["peer"], "10.0.0.5:4242");
    }

    #[test]
    fn pretty_is_plain_text() {
        let buf = Buf::default();
        let sub = build(
            LogFormat::Pretty,
            parse_filter("debug", "log.level").unwrap(),
            buf.clone(),
        );
        tracing::subscriber::with_default(sub, || tracing::debug!(x = 1, "hello"));
        let text = buf.text();
        assert!(
            text.contains("hello") && text.contains("x=1") && text.contains("DEBUG"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "no ANSI escapes in journald");
    }

    #[test]
    fn bad_directive_is_an_error_naming_its_source() {
        let e = parse_filter("info,sifucall=loud", "log.level").unwrap_err();
        assert!(e.to_string().contains("log.level"), "{e}");
        assert!(e.to_string().contains("loud"), "{e}");
    }

    #[test]
    fn second_init_is_an_error_not_a_panic() {
        // The first call may succeed (installing an "off" subscriber for this test binary)
        // or fail if something else installed one; the second must fail cleanly.
        let _ = init(LogFormat::Json, "off");
        match init(LogFormat::Json, "off") {
            Err(LoggingError::AlreadySet(_)) => {}
            other => panic!("expected AlreadySet, got {other:?}"),
        }
    }

    #[test]
    fn typos_that_envfilter_accepts_are_rejected() {
        for bad in ["inf", "warning", "", " , "] {
            assert!(parse_filter(bad, "log.level").is_err(), "{bad:?} parsed");
        }
        for good in ["info", "WARN", "off", "info,sifucall::providers=debug"] {
            assert!(parse_filter(good, "log.level").is_ok(), "{good:?} rejected");
        }
        let e = parse_filter("warning", "RUST_LOG").unwrap_err().to_string();
        assert!(e.contains("RUST_LOG") && e.contains("warning"), "{e}");
    }

    #[test]
    fn reload_handle_changes_the_level() {
        let buf = Buf::default();
        let (sub, handle) = build_reloadable(
            LogFormat::Json,
            parse_filter("warn", "log.level").unwrap(),
            buf.clone(),
        );
        tracing::subscriber::with_default(sub, || {
            tracing::info!("before");
            handle
                .reload(parse_filter("info", "log.level").unwrap())
                .unwrap();
            tracing::info!("after");
        });
        let text = buf.text();
        assert!(!text.contains("before") && text.contains("after"), "{text}");
    }

    /// A writer that blocks until told to go on, like stderr when journald pushes back.
    struct Stalled {
        go: std::sync::mpsc::Receiver<()>,
        out: Buf,
    }

    impl io::Write for Stalled {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _ = self.go.recv();
            self.out.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_drops_and_counts_lines_instead_of_blocking() {
        let (go_tx, go) = std::sync::mpsc::channel();
        let out = Buf::default();
        let (writer, guard) = NonBlocking::new(
            Stalled {
                go,
                out: out.clone(),
            },
            4,
        );
        let before = dropped_lines();
        let sub = build(
            LogFormat::Json,
            parse_filter("info", "log.level").unwrap(),
            writer,
        );
        // Every event returns although the output never moves.
        tracing::subscriber::with_default(sub, || {
            for i in 0..200 {
                tracing::info!(i, "line");
            }
        });
        let dropped = dropped_lines() - before;
        assert!(dropped >= 100, "only {dropped} dropped");
        let exported = crate::ops::metrics::Metrics::new()
            .sample("sifucall_log_lines_dropped_total")
            .unwrap();
        assert!(exported >= dropped as f64, "{exported} exported");
        for _ in 0..1000 {
            let _ = go_tx.send(());
        }
        drop(guard);
        let written = out.text().lines().count() as u64;
        assert!(
            written >= 1,
            "queued lines are written once the output moves"
        );
        assert!(written + dropped <= 200);
    }

    const PANIC_CHILD_ENV: &str = "SIFUCALL_PANIC_HOOK_TEST_CHILD";

    /// Runs in a child process (spawned by `panic_in_a_span_is_one_json_line_with_its_fields`)
    /// because the panic hook and the global subscriber are process-wide.
    #[test]
    #[ignore = "child half of panic_in_a_span_is_one_json_line_with_its_fields"]
    fn panic_hook_child() {
        if std::env::var_os(PANIC_CHILD_ENV).is_none() {
            return;
        }
        let buf = Buf::default();
        let sub = build(
            LogFormat::Json,
            parse_filter("info", "log.level").unwrap(),
            buf.clone(),
        );
        tracing::subscriber::set_global_default(sub).unwrap();
        install_panic_hook();
        let span = tracing::info_span!("call", call_id = "6f1c2a4e-0000-4000-8000-000000000007");
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _g = span.enter();
            panic!("agent state {} broke", 3);
        }));
        assert!(caught.is_err());
        let _ = std::panic::take_hook();
        println!("CHILD-LOG-BEGIN\n{}CHILD-LOG-END", buf.text());
    }

    #[test]
    fn panic_in_a_span_is_one_json_line_with_its_fields() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ops::logging::tests::panic_hook_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PANIC_CHILD_ENV, "1")
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        let log = stdout
            .split("CHILD-LOG-BEGIN\n")
            .nth(1)
            .and_then(|r| r.split("CHILD-LOG-END").next())
            .expect("child printed its log");
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 1, "{log}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["level"], "ERROR");
        assert_eq!(v["target"], "sifucall::panic");
        assert_eq!(v["panic"], "agent state 3 broke");
        assert_eq!(v["message"], "panic: agent state 3 broke");
        assert!(
            v["location"].as_str().unwrap().contains("logging.rs"),
            "{v}"
        );
        assert_eq!(v["span"]["call_id"], "6f1c2a4e-0000-4000-8000-000000000007");
    }
}
