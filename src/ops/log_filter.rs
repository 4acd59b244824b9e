//! Keeps third-party HTTP/websocket/TLS libraries quiet when an operator turns logging up.
//!
//! `tungstenite` logs every handshake request verbatim at trace level, and `hyper`, `h2`,
//! `reqwest`, `rustls` and friends log headers and connection details at debug/trace. Those
//! headers carry our API keys (`xi-api-key`, `Ocp-Apim-Subscription-Key`,
//! `Authorization`), so `RUST_LOG=trace` or `log.level = "trace"` would write the keys to the
//! journal. [`cap_noisy_targets`] rewrites a filter directive so that those targets stay at
//! `info` at most (or the directive's own global level, if that is quieter), unless the
//! operator names one of them explicitly, e.g. `trace,tungstenite=trace` when debugging a
//! handshake on purpose.
//!
//! Limitation: a span directive without a target (`[call{call_id=...}]=trace`) enables every
//! event inside the span whatever its target, and a static cap cannot undo that; the keys are
//! sent from inside call spans only at connect time, so such a directive should be used with
//! care (the daemon's own logs never contain a key).

use std::str::FromStr;

use tracing_subscriber::filter::LevelFilter;

/// Targets that log request/response headers or raw handshakes at debug/trace level.
pub const NOISY_TARGETS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
    "rustls",
    "http",
];

/// The most verbose level a noisy target gets unless the operator names it.
const CAP: LevelFilter = LevelFilter::INFO;

/// One comma-separated directive, split into the parts this module cares about.
#[derive(Debug)]
struct Parsed<'a> {
    /// The target prefix, if any.
    target: Option<&'a str>,
    /// Whether the directive has a `[span{fields}]` part.
    has_span: bool,
    /// The level it sets (a bare target or span means `trace`, as in `EnvFilter`).
    level: LevelFilter,
}

fn parse_directive(d: &str) -> Option<Parsed<'_>> {
    let d = d.trim();
    if d.is_empty() {
        return None;
    }
    // The level follows the last `]` when there is a span part (field values may hold `=`).
    let (selector, level) = match d.rfind(']') {
        Some(close) => {
            let rest = &d[close + 1..];
            (&d[..=close], rest.strip_prefix('=').map(str::trim))
        }
        None => match d.split_once('=') {
            Some((s, l)) => (s.trim(), Some(l.trim())),
            None => (d, None),
        },
    };
    let (target, has_span) = match selector.find('[') {
        Some(open) => (&selector[..open], true),
        None => (selector, false),
    };
    let target = target.trim();
    match level {
        Some(l) => Some(Parsed {
            target: (!target.is_empty()).then_some(target),
            has_span,
            level: LevelFilter::from_str(l).ok()?,
        }),
        // A bare word: a global level if it reads as one, else a target at trace.
        None if !has_span => match LevelFilter::from_str(target) {
            Ok(level) => Some(Parsed {
                target: None,
                has_span: false,
                level,
            }),
            Err(_) => Some(Parsed {
                target: Some(target),
                has_span: false,
                level: LevelFilter::TRACE,
            }),
        },
        None => Some(Parsed {
            target: (!target.is_empty()).then_some(target),
            has_span,
            level: LevelFilter::TRACE,
        }),
    }
}

/// Returns `directives` with `target=info` (or quieter) appended for every noisy target that
/// the directives would otherwise let log at debug or trace, unless the directives name that
/// exact target themselves. Directives it cannot read are left for `EnvFilter` to reject.
///
/// `"trace"` becomes `"trace,tungstenite=info,tokio_tungstenite=info,..."`;
/// `"info,sifucall=debug"` is returned unchanged; `"debug,hyper=trace"` keeps `hyper` at
/// trace and caps the others.
pub fn cap_noisy_targets(directives: &str) -> String {
    let parsed: Vec<Parsed<'_>> = directives.split(',').filter_map(parse_directive).collect();
    let global = parsed
        .iter()
        .filter(|p| p.target.is_none() && !p.has_span)
        .map(|p| p.level)
        .next_back();
    let loudest_untargeted = parsed
        .iter()
        .filter(|p| p.target.is_none())
        .map(|p| p.level)
        .max();
    if loudest_untargeted.is_none_or(|l| l <= CAP) {
        return directives.to_owned();
    }
    let cap = global.map_or(CAP, |g| g.min(CAP));
    let mut out = directives.trim().trim_end_matches(',').to_owned();
    for noisy in NOISY_TARGETS {
        if parsed.iter().any(|p| p.target == Some(*noisy)) {
            continue;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&format!("{noisy}={}", level_name(cap)));
    }
    out
}

fn level_name(l: LevelFilter) -> &'static str {
    match l {
        LevelFilter::OFF => "off",
        LevelFilter::ERROR => "error",
        LevelFilter::WARN => "warn",
        LevelFilter::INFO => "info",
        LevelFilter::DEBUG => "debug",
        _ => "trace",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    fn caps(d: &str) -> String {
        cap_noisy_targets(d)
    }

    #[test]
    fn trace_and_debug_get_every_noisy_target_capped() {
        let all_info = NOISY_TARGETS
            .iter()
            .map(|t| format!("{t}=info"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(caps("trace"), format!("trace,{all_info}"));
        assert_eq!(caps("DEBUG"), format!("DEBUG,{all_info}"));
        assert_eq!(caps("sifucall=trace"), "sifucall=trace", "no global trace");
        assert_eq!(
            caps("info,sifucall=trace"),
            "info,sifucall=trace",
            "targets other than ours stay at info"
        );
        assert_eq!(caps("warn"), "warn");
        assert_eq!(caps(""), "");
    }

    #[test]
    fn an_explicitly_named_target_is_left_alone() {
        let out = caps("trace,tungstenite=trace,hyper=debug");
        assert!(
            out.starts_with("trace,tungstenite=trace,hyper=debug,"),
            "{out}"
        );
        assert!(!out.contains(",tungstenite=info"), "{out}");
        assert!(!out.contains(",hyper=info"), "{out}");
        // Named targets are exact: hyper does not name hyper_util.
        assert!(out.contains("hyper_util=info"), "{out}");
        assert!(out.contains("tokio_tungstenite=info"), "{out}");
        // A bare target means trace for it.
        let out = caps("debug,h2");
        assert!(!out.contains("h2=info"), "{out}");
        assert!(out.contains("rustls=info"), "{out}");
    }

    #[test]
    fn span_directives_and_odd_spellings() {
        // A span directive at trace counts as turning logging up.
        let out = caps("warn,[call{call_id=a=b}]=trace");
        assert!(out.contains("tungstenite=warn"), "{out}");
        // Trailing commas and spaces survive as EnvFilter accepts them.
        let out = caps(" trace, ");
        assert!(out.starts_with("trace,tungstenite=info"), "{out}");
        // Mixed-case levels.
        assert!(caps("Trace").contains("reqwest=info"));
        // Garbage is left for EnvFilter to reject.
        assert_eq!(caps("info,=nonsense"), "info,=nonsense");
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// What a subscriber filtered by `directive` writes for a trace event of each target.
    fn written(directive: &str) -> String {
        let buf = Buf::default();
        let filter = EnvFilter::builder().parse(directive).unwrap();
        let sub = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(buf.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::trace!(target: "tungstenite::handshake::client", "Request: xi-api-key: SECRET-WS");
            tracing::debug!(target: "hyper_util::client", "headers: SECRET-HTTP");
            tracing::info!(target: "hyper", "connected");
            tracing::trace!(target: "sifucall::providers", "ours");
        });
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn the_capped_filter_really_drops_header_logging() {
        let raw = written("trace");
        assert!(
            raw.contains("SECRET-WS") && raw.contains("SECRET-HTTP"),
            "{raw}"
        );
        let capped = written(&caps("trace"));
        assert!(!capped.contains("SECRET"), "{capped}");
        assert!(
            capped.contains("connected") && capped.contains("ours"),
            "{capped}"
        );
        let named = written(&caps("trace,tungstenite=trace"));
        assert!(
            named.contains("SECRET-WS") && !named.contains("SECRET-HTTP"),
            "{named}"
        );
    }
}
