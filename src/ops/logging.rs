//! Log setup: one `tracing` subscriber writing to stderr, which journald captures under the
//! unit's name. JSON lines by default (timestamp, level, target, message, fields, and the
//! enclosing spans such as the per-call span with `call_id` and `peer`) so that
//! `journalctl -u sifucall -o cat | jq` works; a human-readable format on request.

use std::io;

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;

use super::config::LogFormat;

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

/// Installs the global subscriber: `format` to stderr, filtered by `RUST_LOG` if it is set
/// and non-empty, otherwise by `level` (an `EnvFilter` directive such as `info` or
/// `info,sifucall::providers=debug`). Calling it again returns [`LoggingError::AlreadySet`].
pub fn init(format: LogFormat, level: &str) -> Result<(), LoggingError> {
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let filter = match rust_log {
        Some(v) => parse_filter(&v, "RUST_LOG")?,
        None => parse_filter(level, "log.level")?,
    };
    // Also routes `log` records from dependencies through tracing.
    build(format, filter, io::stderr)
        .try_init()
        .map_err(|e| LoggingError::AlreadySet(e.to_string()))
}

/// Parses a filter directive, naming where it came from on error.
pub fn parse_filter(directive: &str, source_name: &'static str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::builder()
        .parse(super::log_filter::cap_noisy_targets(directive))
        .map_err(|e| LoggingError::Filter {
            directive: directive.to_owned(),
            source_name,
            reason: e.to_string(),
        })
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(true);
    match format {
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
        LogFormat::Pretty => Box::new(builder.with_ansi(false).finish()),
    }
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
}
