//! What both benchmarks need before they start: their arguments, a raised open-file limit
//! and a runtime. Included with `#[path]` (benchmarks are separate crates).

/// The benchmark's arguments, or `None` when it is being run as a test (`cargo test
/// --all-targets` runs bench targets without `--bench`): then it should do nothing.
pub(crate) fn bench_args(name: &str) -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") {
        Some(args)
    } else {
        println!("{name}: run with `cargo bench --bench {name}`");
        None
    }
}

/// The value after `--name`, if given.
pub(crate) fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

/// A comma-separated list of numbers after `--name`, if given.
pub(crate) fn list(args: &[String], name: &str) -> Option<Vec<usize>> {
    flag(args, name).map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
}

/// Raises the fd limit (every call is a socket or two) and builds the runtime.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    let _ = sifucall::ops::rlimit::raise_nofile_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
