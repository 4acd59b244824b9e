//! The official Azure Speech SDK for JavaScript as a reference client: it must recognise a
//! phrase through the fake Azure (so the fake speaks what the real service speaks), and what
//! our client sends for a call must equal, message by message, what the SDK sends for the
//! same audio (so our client drifts from the SDK only where we chose to, and a test says so).
//!
//! Needs `node` and the SDK installed under `tests/sdk/azure` by `scripts/sdk-setup.sh`; a
//! missing one fails these tests (it is not a skip).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use sifucall::audio::wav;
use sifucall::ops::config::{Secret, Settings};
use sifucall::providers::stt::azure::AzureStt;
use sifucall::providers::stt::{SttEvent, SttParams, SttProvider, SttSession};
use sifucall::sandbox::azure::{FakeAzure, FakeAzureConfig, FakeAzureStats, RecordedMessage};
use tokio::time::timeout;

const KEY: &str = "conformance-key";
const LANGUAGE: &str = "ms-MY";
const SEGMENTATION_MS: u32 = 500;
const TRANSCRIPT: &str = sifucall::demo::QUESTION_TEXT;
/// Hang guard only, never a timing assertion.
const GUARD: Duration = Duration::from_secs(120);

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/malay_question_8k.wav")
}

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/azure")
}

/// Fails (never skips) when node or the SDK is missing.
fn require_sdk() {
    const FIX: &str = "run scripts/sdk-setup.sh (it installs the official SDKs the conformance \
                       tests drive; Node.js 18+ and npm must be on PATH)";
    let node = std::process::Command::new("node").arg("--version").output();
    match node {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("`node --version` failed ({}): {FIX}", out.status),
        Err(e) => panic!("node is not installed ({e}): {FIX}"),
    }
    let sdk = sdk_dir().join("node_modules/microsoft-cognitiveservices-speech-sdk/package.json");
    assert!(
        sdk.is_file(),
        "the Azure Speech SDK is not installed ({} is missing): {FIX}",
        sdk.display()
    );
}

fn fake_config() -> FakeAzureConfig {
    FakeAzureConfig {
        key: Some(KEY.into()),
        transcripts: vec![TRANSCRIPT.into()],
        final_delay_ms: 50,
        // The SDK copies the key into the query string beside the header.
        allow_key_in_url: true,
        record: true,
        ..Default::default()
    }
}

/// One JSON line the script printed per SDK event.
async fn run_sdk(fake: &FakeAzure) -> Vec<Value> {
    require_sdk();
    let child = tokio::process::Command::new("node")
        .current_dir(sdk_dir())
        .arg("recognize.js")
        .arg(fake.url())
        .arg(KEY)
        .arg(fixture())
        .arg(LANGUAGE)
        .arg(SEGMENTATION_MS.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts");
    let out = timeout(GUARD, child.wait_with_output())
        .await
        .expect("the SDK script hung")
        .expect("node ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        out.status.success(),
        "the SDK script failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    events
}

/// Our client, fed the same audio as fast as it takes it.
async fn run_ours(fake: &FakeAzure) -> Vec<SttEvent> {
    let mut settings = Settings::defaults().stt;
    settings.endpoint = fake.url();
    let stt = AzureStt::new(&settings, Secret::new(Some(KEY.into()))).unwrap();
    let audio = wav::read(&fixture()).unwrap();
    let SttSession {
        audio: tx,
        mut events,
    } = stt
        .start(SttParams {
            language: LANGUAGE.into(),
            sample_rate: audio.rate,
            segmentation_silence_ms: SEGMENTATION_MS,
            call_id: "conformance".into(),
        })
        .await
        .unwrap();
    for frame in audio.samples.chunks(audio.rate as usize / 50) {
        tx.send(frame.to_vec()).await.unwrap();
    }
    drop(tx);
    let mut out = Vec::new();
    timeout(GUARD, async {
        while let Some(ev) = events.recv().await {
            out.push(ev);
        }
    })
    .await
    .expect("our client hung");
    out
}

#[tokio::test]
async fn the_official_sdk_recognises_a_phrase_through_the_fake() {
    let fake = FakeAzure::spawn(fake_config()).await.unwrap();
    let events = run_sdk(&fake).await;
    let recognised: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "recognized" && e["reason"] == "RecognizedSpeech")
        .collect();
    assert_eq!(recognised.len(), 1, "{events:#?}");
    assert_eq!(recognised[0]["text"], TRANSCRIPT);
    assert!(
        events.iter().any(|e| e["event"] == "recognizing"),
        "partials reach the SDK: {events:#?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "canceled" && e["reason"] != "EndOfStream"),
        "{events:#?}"
    );
    let stats = fake.stats();
    assert!(stats.violations.is_empty(), "{:?}", stats.violations);
    assert_eq!(stats.sample_rates, vec![8000]);
    assert_eq!(stats.segmentation_silence_ms, vec![SEGMENTATION_MS]);
    assert_eq!(stats.end_of_streams, 1);
}

fn dump(stats: &FakeAzureStats) -> String {
    let mut s = format!("{:#?}\n", stats.upgrades);
    for m in &stats.messages {
        let body = if m.binary {
            format!("{} bytes", m.body.len())
        } else {
            String::from_utf8_lossy(&m.body).into_owned()
        };
        s.push_str(&format!(
            "{} {:?} blank={} {}\n",
            m.connection, m.headers, m.blank_line_after_binary_headers, body
        ));
    }
    s
}

#[tokio::test]
async fn dump_both() {
    let sdk_fake = FakeAzure::spawn(fake_config()).await.unwrap();
    run_sdk(&sdk_fake).await;
    let ours_fake = FakeAzure::spawn(fake_config()).await.unwrap();
    run_ours(&ours_fake).await;
    eprintln!("SDK:\n{}", dump(&sdk_fake.stats()));
    eprintln!("OURS:\n{}", dump(&ours_fake.stats()));
    let _: &[RecordedMessage] = &[];
    panic!();
}
