//! `sifucall check --config FILE` as an operator runs it: exit 0 only when `run` would start,
//! exit 2 with a message naming the key and where its value came from otherwise.
//!
//! Every case runs the built binary with a cleared environment (plus the variables the case
//! sets), so keys or `SIFUCALL_*` variables of whoever runs the tests do not leak in.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test; `SIFUCALL_CHECK_BIN` points the same tests at another build (to
/// see which cases an older binary got wrong).
fn binary() -> PathBuf {
    std::env::var_os("SIFUCALL_CHECK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sifucall")))
}

const KEYS: [(&str, &str); 3] = [
    ("AZURE_SPEECH_KEY", "azure-test-key-0001"),
    ("OPENROUTER_API_KEY", "sk-or-v1-test0002"),
    ("ELEVENLABS_API_KEY", "sk_test0003"),
];

/// A config that passes: AI mode, ports chosen by the kernel, so nothing here collides.
const BASE: &str = "[audiosocket]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sifucall-check-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `BASE` merged with `extra` (later tables win: sections are written once, with
    /// the extra keys appended to their section).
    fn config(&self, extra: &str) -> PathBuf {
        let path = self.0.join("sifucall.toml");
        std::fs::write(&path, merge(BASE, extra)).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Merges two small TOML texts section by section (enough for these tests; a key given
/// twice would be a TOML error, so `extra` keys replace `base` keys).
fn merge(base: &str, extra: &str) -> String {
    let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for text in [base, extra] {
        let mut current = String::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if line.starts_with('[') {
                current = line.to_owned();
                if !sections.iter().any(|(s, _)| *s == current) {
                    sections.push((current.clone(), Vec::new()));
                }
            } else {
                let key = line.split('=').next().unwrap().trim().to_owned();
                let entries = &mut sections.iter_mut().find(|(s, _)| *s == current).unwrap().1;
                entries.retain(|(k, _)| *k != key);
                entries.push((key, line.to_owned()));
            }
        }
    }
    let mut out = String::new();
    for (section, entries) in sections {
        out.push_str(&section);
        out.push('\n');
        for (_, line) in entries {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

fn check(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary());
    cmd.env_clear()
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn with_keys<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = KEYS.to_vec();
    env.extend_from_slice(extra);
    env
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
fn assert_config_error(o: &Output, needles: &[&str], what: &str) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{what}: exit {:?}\n{err}",
        o.status
    );
    for n in needles {
        assert!(err.contains(n), "{what}: stderr lacks {n:?}:\n{err}");
    }
    assert!(!err.contains("configuration OK"), "{what}:\n{err}");
    assert!(
        stdout(o).is_empty(),
        "{what}: printed settings despite errors"
    );
}

#[test]
fn a_good_config_passes_and_prints_the_settings() {
    let dir = Scratch::new("good");
    let cfg = dir.config("");
    let o = check(&cfg, &[], &with_keys(&[]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("configuration OK"));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["audiosocket"]["max_calls"], 200);
    let out = stdout(&o);
    for (_, key) in KEYS {
        assert!(!out.contains(key), "a key was printed");
    }
}

/// Values that `check` passed before and `run` then failed on or misbehaved with.
#[test]
fn values_run_cannot_use_fail_with_exit_2_naming_key_and_file() {
    let dir = Scratch::new("bad-values");
    let cases: &[(&str, &str)] = &[
        ("[records]\nurl = \"calls.jsonl\"", "records.url"),
        (
            "[records]\nurl = \"file:///var/lib/sifucall/\"",
            "records.url",
        ),
        ("[records]\nurl = \"https://\"", "records.url"),
        ("[webhook]\nurl = \"garbage\"", "webhook.url"),
        ("[webhook]\nurl = \"ftp://example.com/hook\"", "webhook.url"),
        ("[tts]\nvoice_id = \"\"", "tts.voice_id"),
        ("[llm]\nmodel = \"\"", "llm.model"),
        ("[agent]\napology = \"\"", "agent.apology"),
        ("[stt]\nregion = \"\"", "stt.region"),
        (
            "[llm]\nfirst_token_timeout_ms = 0",
            "llm.first_token_timeout_ms",
        ),
        (
            "[tts]\nfirst_byte_timeout_ms = 0",
            "tts.first_byte_timeout_ms",
        ),
        (
            "[audiosocket]\nfirst_message_timeout_ms = 0",
            "audiosocket.first_message_timeout_ms",
        ),
        ("[llm]\nmax_tokens = 0", "llm.max_tokens"),
        (
            "[stt]\nendpoint = \"wss://stt.example.com\"",
            "stt.endpoint",
        ),
        (
            "[stt]\nendpoint = \"wss://stt.example.com/speech/v1?language=en-US\"",
            "stt.endpoint",
        ),
        (
            "[llm]\nbase_url = \"https://openrouter.ai\"",
            "llm.base_url",
        ),
        (
            "[llm]\nbase_url = \"https://openrouter.ai/api/v1?x=1\"",
            "llm.base_url",
        ),
        ("[agent]\nlanguage = \"ms_MY\"", "agent.language"),
        ("[log]\nlevel = \"inf\"", "log.level"),
        ("[log]\nlevel = \"warning\"", "log.level"),
        ("[log]\nlevel = \"\"", "log.level"),
        ("[audiosocket]\nmax_calls = 1.5", "audiosocket.max_calls"),
        ("[audiosocket]\nmax_calls = true", "audiosocket.max_calls"),
        ("[audiosocket]\nmax_calls = 1e30", "audiosocket.max_calls"),
        ("[agent]\nidle_hangup_secs = 1e20", "agent.idle_hangup_secs"),
        ("[agent]\necho_margin_db = nan", "agent.echo_margin_db"),
        (
            "[audiosocket]\nallow = [\"10.0.0.5/8\"]",
            "audiosocket.allow",
        ),
    ];
    let mut wrong = Vec::new();
    for (snippet, key) in cases {
        let cfg = dir.config(snippet);
        let o = check(&cfg, &[], &with_keys(&[]));
        let err = stderr(&o);
        let named = err.contains(key) && err.contains(&cfg.display().to_string());
        if o.status.code() != Some(2) || !named || !stdout(&o).is_empty() {
            wrong.push(format!("{snippet:?}: exit {:?}\n{err}", o.status.code()));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

#[test]
fn errors_name_the_environment_variable_and_env_numbers_still_work() {
    let dir = Scratch::new("env");
    let cfg = dir.config("");
    let o = check(
        &cfg,
        &[],
        &with_keys(&[("SIFUCALL_AUDIOSOCKET__MAX_CALLS", "50")]),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["audiosocket"]["max_calls"], 50);
    for value in ["1.5", "true", "0", "lots"] {
        let o = check(
            &cfg,
            &[],
            &with_keys(&[("SIFUCALL_AUDIOSOCKET__MAX_CALLS", value)]),
        );
        assert_config_error(
            &o,
            &["audiosocket.max_calls", "SIFUCALL_AUDIOSOCKET__MAX_CALLS"],
            value,
        );
    }
}

#[test]
fn every_problem_is_listed() {
    let dir = Scratch::new("many");
    let cfg =
        dir.config("[llm]\nmax_tokens = 0\n[agent]\nlanguage = \"ms_MY\"\n[log]\nlevel = \"inf\"");
    let o = check(&cfg, &[], &with_keys(&[]));
    assert_config_error(
        &o,
        &["llm.max_tokens", "agent.language", "log.level"],
        "three",
    );
}

#[test]
fn ai_mode_without_keys_says_which_and_what_to_try_instead() {
    let dir = Scratch::new("no-keys");
    let cfg = dir.config("");
    let o = check(&cfg, &[], &[("OPENROUTER_API_KEY", "sk-or-v1-x")]);
    assert_config_error(
        &o,
        &[
            "AZURE_SPEECH_KEY, ELEVENLABS_API_KEY",
            "sifucall demo",
            "sifucall sandbox",
            "echo",
        ],
        "two keys missing",
    );
    assert!(!stderr(&o).contains("not set: AZURE_SPEECH_KEY, OPENROUTER_API_KEY"));
    // Echo mode needs none.
    let cfg = dir.config("[agent]\nmode = \"echo\"");
    let o = check(&cfg, &[], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn a_key_with_a_line_break_or_space_is_refused_without_printing_it() {
    let dir = Scratch::new("key-format");
    let cfg = dir.config("");
    for bad in [
        "sk-or-v1-secretvalue\n",
        "sk-or-v1-secret value",
        "sk-or-v1-secret\tvalue",
    ] {
        let o = check(&cfg, &[], &with_keys(&[("OPENROUTER_API_KEY", bad)]));
        assert_config_error(&o, &["OPENROUTER_API_KEY"], &format!("{bad:?}"));
        assert!(!stderr(&o).contains("secret"), "{}", stderr(&o));
    }
}

#[test]
fn an_unusable_records_destination_is_found_by_trying_it() {
    let dir = Scratch::new("records");
    let file = dir.0.join("plain-file");
    std::fs::write(&file, "").unwrap();
    for url in [
        // Below a regular file: no one, not even root, can create that directory.
        format!("file://{}/calls.jsonl", file.display()),
        // An existing directory rather than a file.
        format!("file://{}", dir.0.display()),
    ] {
        let cfg = dir.config(&format!("[records]\nurl = \"{url}\""));
        let o = check(&cfg, &[], &with_keys(&[]));
        assert_config_error(&o, &["records.url"], &url);
    }
    let url = format!("file://{}/new/dir/calls.jsonl", dir.0.display());
    let cfg = dir.config(&format!("[records]\nurl = \"{url}\""));
    let o = check(&cfg, &[], &with_keys(&[]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!dir.0.join("new").exists(), "check left a directory behind");
}

#[test]
fn a_port_in_use_fails_once_and_no_bind_skips_it() {
    let dir = Scratch::new("port");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let cfg = dir.config(&format!("[audiosocket]\nlisten = \"{addr}\""));
    let o = check(&cfg, &[], &with_keys(&[]));
    assert_config_error(
        &o,
        &["audiosocket.listen", &addr.to_string()],
        "port in use",
    );
    let err = stderr(&o);
    assert_eq!(err.matches("in use").count(), 1, "repeats itself:\n{err}");
    let o = check(&cfg, &["--no-bind"], &with_keys(&[]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // Both listeners on one address.
    let cfg =
        dir.config("[audiosocket]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"0.0.0.0:0\"");
    // Beyond loopback the admin server's /calls routes need a token.
    let o = check(&cfg, &[], &with_keys(&[("SIFUCALL_ADMIN_TOKEN", "t0ken")]));
    assert_eq!(
        o.status.code(),
        Some(0),
        "port 0 twice is fine: {}",
        stderr(&o)
    );
    drop(taken);
}

#[test]
fn an_unreadable_or_missing_config_file_is_named() {
    let dir = Scratch::new("unreadable");
    let o = check(&dir.0, &[], &with_keys(&[]));
    assert_config_error(&o, &[&dir.0.display().to_string()], "a directory");
    let missing = dir.0.join("nope.toml");
    let o = check(&missing, &[], &with_keys(&[]));
    assert_config_error(&o, &[&missing.display().to_string()], "missing");
}

#[test]
fn secrets_inside_urls_are_redacted() {
    let dir = Scratch::new("redact");
    let cfg = dir.config(
        "[webhook]\nurl = \"https://hookuser:hookpassword1@hooks.example.com/in?token=hooktoken123&team=x\"",
    );
    let o = check(&cfg, &[], &with_keys(&[]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("hooks.example.com"), "{out}");
    for secret in ["hookpassword1", "hooktoken123"] {
        assert!(!out.contains(secret), "{secret} printed:\n{out}");
    }
}

#[test]
fn an_invalid_rust_log_fails() {
    let dir = Scratch::new("rust-log");
    let cfg = dir.config("");
    let o = check(&cfg, &[], &with_keys(&[("RUST_LOG", "inf")]));
    assert_config_error(&o, &["RUST_LOG", "\"info\""], "RUST_LOG=inf");
    let o = check(
        &cfg,
        &[],
        &with_keys(&[("RUST_LOG", "info,sifucall=debug")]),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}
