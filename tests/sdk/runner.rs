//! Runs the vendors' official SDKs (tests/sdk/python) as clients of the fakes, from the venv
//! that `scripts/sdk-setup.sh` installs with exact pins. A missing venv fails the test: these
//! tests are part of the suite, not optional.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// Hang guard for one SDK run (never a timing assertion).
const GUARD: Duration = Duration::from_secs(120);

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/python")
}

/// The venv's python; panics with what to do when it is missing.
fn python() -> PathBuf {
    let py = sdk_dir().join(".venv/bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run scripts/sdk-setup.sh first (it installs the official SDKs from \
         tests/sdk/python/requirements.txt; scripts/test.sh does it for you)",
        py.display()
    );
    py
}

/// Runs `script` with `args` and returns the JSON object it prints; panics (with its stderr)
/// if it fails.
pub(crate) async fn run(script: &str, args: &[String]) -> Value {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(sdk_dir().join(script))
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .kill_on_drop(true);
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(GUARD, cmd.output())
        .await
        .expect("hang guard")
        .expect("the venv's python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{script} printed no JSON ({e}):\n{stdout}\n{stderr}"))
}
