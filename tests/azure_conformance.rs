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
    run_sdk_on(fake, &fixture()).await
}

async fn run_sdk_on(fake: &FakeAzure, wav_path: &Path) -> Vec<Value> {
    run_sdk_with(&fake.url(), wav_path, None).await
}

/// The SDK on `url`; with `languages` (comma-separated) it identifies each phrase's language
/// among them, continuously.
async fn run_sdk_with(url: &str, wav_path: &Path, languages: Option<&str>) -> Vec<Value> {
    require_sdk();
    let child = tokio::process::Command::new("node")
        .current_dir(sdk_dir())
        .arg("recognize.js")
        .arg(url)
        .arg(KEY)
        .arg(wav_path)
        .arg(LANGUAGE)
        .arg(SEGMENTATION_MS.to_string())
        .args(languages)
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
    run_ours_on(fake, &fixture(), 1).await
}

/// Our client on `wav_path`; the caller stays on the line until `finals` finals arrived (as
/// a caller does: the SDK's push stream, by contrast, ends when the file does).
async fn run_ours_on(fake: &FakeAzure, wav_path: &Path, finals: usize) -> Vec<SttEvent> {
    run_ours_with(fake, wav_path, finals, Vec::new()).await
}

/// [`run_ours_on`] with candidate `languages` (two or more: language identification).
async fn run_ours_with(
    fake: &FakeAzure,
    wav_path: &Path,
    finals: usize,
    languages: Vec<String>,
) -> Vec<SttEvent> {
    let mut settings = Settings::defaults().stt;
    settings.endpoint = fake.url();
    let stt = AzureStt::new(&settings, Secret::new(Some(KEY.into()))).unwrap();
    let audio = wav::read(wav_path).unwrap();
    let SttSession {
        audio: tx,
        mut events,
    } = stt
        .start(SttParams {
            language: LANGUAGE.into(),
            languages,
            sample_rate: audio.rate,
            segmentation_silence_ms: SEGMENTATION_MS,
            call_id: "conformance".into(),
        })
        .await
        .unwrap();
    for frame in audio.samples.chunks(audio.rate as usize / 50) {
        tx.send(frame.to_vec()).await.unwrap();
    }
    let mut out = Vec::new();
    let mut tx = Some(tx);
    timeout(GUARD, async {
        while let Some(ev) = events.recv().await {
            out.push(ev);
            let seen = out
                .iter()
                .filter(|e| matches!(e, SttEvent::Final { .. }))
                .count();
            if seen >= finals {
                tx = None;
            }
        }
    })
    .await
    .expect("our client hung");
    drop(tx);
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

/// The connection-0 messages, without the SDK's `telemetry` (sent after `turn.end`; we send
/// none, and the service does not need it).
fn client_messages(stats: &FakeAzureStats) -> Vec<&RecordedMessage> {
    stats
        .messages
        .iter()
        .filter(|m| m.connection == 0 && m.path() != "telemetry")
        .collect()
}

/// Header names in order, with the values that must match exactly (`Path`, `Content-Type`);
/// request ids and timestamps are checked for form only.
fn header_shape(m: &RecordedMessage) -> Vec<String> {
    m.headers
        .iter()
        .map(|(name, value)| match name.to_ascii_lowercase().as_str() {
            "x-requestid" => {
                let ok = value.len() == 32
                    && value.chars().all(|c| {
                        c.is_ascii_digit() || c.is_ascii_uppercase() && c.is_ascii_hexdigit()
                    });
                format!("{name}: <{}>", if ok { "32 upper hex" } else { value })
            }
            "x-timestamp" => {
                // 2026-05-01T10:00:00.123Z
                let b = value.as_bytes();
                let ok = b.len() == 24 && b[10] == b'T' && b[19] == b'.' && b[23] == b'Z';
                format!("{name}: <{}>", if ok { "ISO-8601 ms Z" } else { value })
            }
            _ => format!("{name}: {value}"),
        })
        .collect()
}

/// A JSON body with the fields that legitimately differ blanked: the SDK's version and the OS
/// description (ours name this program).
fn json_shape(m: &RecordedMessage) -> Value {
    let mut v: Value = serde_json::from_slice(&m.body).expect("JSON body");
    if let Some(system) = v.pointer_mut("/context/system/version") {
        *system = Value::String("<version>".into());
    }
    if let Some(os) = v.pointer_mut("/context/os").and_then(Value::as_object_mut) {
        for value in os.values_mut() {
            *value = Value::String("<os>".into());
        }
    }
    v
}

fn find_path<'a>(ms: &[&'a RecordedMessage], path: &str) -> Option<&'a RecordedMessage> {
    ms.iter().find(|m| m.path() == path).copied()
}

/// Everything that must be equal between two clients' recordings of the same call, as a list
/// of differences.
fn differences(sdk: &FakeAzureStats, ours: &FakeAzureStats) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut differ = |what: String, a: String, b: String| {
        if a != b {
            diffs.push(format!("{what}:\n    SDK:  {a}\n    ours: {b}"));
        }
    };
    // The upgrade: same path, same query but for the credentials and ids the SDK copies into
    // it (browsers cannot set headers; we never put the key in a URL), same custom headers.
    let (us, uo) = (&sdk.upgrades[0], &ours.upgrades[0]);
    differ("upgrade path".into(), us.path.clone(), uo.path.clone());
    let copied = [
        "Ocp-Apim-Subscription-Key",
        "X-ConnectionId",
        "connectionId",
    ];
    let query_shape = |q: &[(String, String)]| {
        format!(
            "{:?}",
            q.iter()
                .filter(|(k, _)| !copied.iter().any(|c| c.eq_ignore_ascii_case(k)))
                .collect::<Vec<_>>()
        )
    };
    differ(
        "query".into(),
        query_shape(&us.query),
        query_shape(&uo.query),
    );
    let custom_headers = |h: &[String]| {
        let mut names: Vec<&str> = h
            .iter()
            .map(String::as_str)
            .filter(|n| {
                !n.starts_with("sec-websocket") && !["host", "connection", "upgrade"].contains(n)
            })
            .collect();
        names.sort_unstable();
        format!("{names:?}")
    };
    differ(
        "upgrade headers".into(),
        custom_headers(&us.header_names),
        custom_headers(&uo.header_names),
    );

    // The messages: config, context, WAV header, audio, end of stream.
    let (ms, mo) = (client_messages(sdk), client_messages(ours));
    let framing = |ms: &[&RecordedMessage]| -> Vec<String> {
        let mut out = Vec::new();
        let mut audio_run = 0;
        for m in ms {
            let is_pcm = m.path() == "audio" && m.header("Content-Type").is_none();
            if is_pcm && !m.body.is_empty() {
                audio_run += 1;
                continue;
            }
            if audio_run > 0 {
                out.push("<PCM audio messages>".to_owned());
                audio_run = 0;
            }
            out.push(format!(
                "{} {}{}",
                m.path(),
                if m.binary { "binary" } else { "text" },
                if is_pcm {
                    " (empty: end of stream)"
                } else {
                    ""
                }
            ));
        }
        out
    };
    differ(
        "message sequence".into(),
        format!("{:#?}", framing(&ms)),
        format!("{:#?}", framing(&mo)),
    );
    for path in ["speech.config", "speech.context"] {
        let (Some(a), Some(b)) = (find_path(&ms, path), find_path(&mo, path)) else {
            differ(format!("{path} present"), "yes".into(), "no".into());
            continue;
        };
        differ(
            format!("{path} headers"),
            format!("{:?}", header_shape(a)),
            format!("{:?}", header_shape(b)),
        );
        differ(
            format!("{path} body"),
            json_shape(a).to_string(),
            json_shape(b).to_string(),
        );
    }
    let audio = |ms: &[&RecordedMessage]| -> Vec<RecordedMessage> {
        ms.iter()
            .filter(|m| m.path() == "audio")
            .map(|m| (*m).clone())
            .collect()
    };
    let (aa, ab) = (audio(&ms), audio(&mo));
    if let (Some(a), Some(b)) = (aa.first(), ab.first()) {
        differ(
            "WAV header message headers".into(),
            format!("{:?}", header_shape(a)),
            format!("{:?}", header_shape(b)),
        );
        differ(
            "WAV header bytes".into(),
            format!("{:02x?}", a.body),
            format!("{:02x?}", b.body),
        );
    }
    if let (Some(a), Some(b)) = (aa.get(1), ab.get(1)) {
        differ(
            "audio message headers".into(),
            format!("{:?}", header_shape(a)),
            format!("{:?}", header_shape(b)),
        );
        differ(
            "blank line after binary headers".into(),
            a.blank_line_after_binary_headers.to_string(),
            b.blank_line_after_binary_headers.to_string(),
        );
    }
    let pcm = |a: &[RecordedMessage]| -> Vec<u8> {
        a.iter()
            .skip(1)
            .flat_map(|m| m.body.iter().copied())
            .collect()
    };
    let (pa, pb) = (pcm(&aa), pcm(&ab));
    differ(
        "PCM bytes (chunking aside)".into(),
        format!("{} bytes, equal: {}", pa.len(), pa == pb),
        format!("{} bytes, equal: {}", pb.len(), pa == pb),
    );
    // One request id for the whole turn on both sides.
    let ids = |ms: &[&RecordedMessage]| -> usize {
        let mut ids: Vec<&str> = ms.iter().filter_map(|m| m.header("X-RequestId")).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    };
    differ(
        "request ids in the turn".into(),
        ids(&ms).to_string(),
        ids(&mo).to_string(),
    );
    diffs
}

#[tokio::test]
async fn our_client_sends_what_the_sdk_sends_message_by_message() {
    let sdk_fake = FakeAzure::spawn(fake_config()).await.unwrap();
    let sdk_events = run_sdk(&sdk_fake).await;
    let ours_fake = FakeAzure::spawn(fake_config()).await.unwrap();
    let ours_events = run_ours(&ours_fake).await;
    // Both recognised the phrase, so both calls are complete.
    assert!(
        sdk_events.iter().any(|e| e["text"] == TRANSCRIPT),
        "{sdk_events:?}"
    );
    assert!(
        ours_events
            .iter()
            .any(|e| matches!(e, SttEvent::Final { text, .. } if text == TRANSCRIPT)),
        "{ours_events:?}"
    );
    let (sdk, ours) = (sdk_fake.stats(), ours_fake.stats());
    assert_eq!((sdk.connections, ours.connections), (1, 1));
    assert!(sdk.violations.is_empty(), "{:?}", sdk.violations);
    assert!(ours.violations.is_empty(), "{:?}", ours.violations);
    let diffs = differences(&sdk, &ours);
    assert!(
        diffs.is_empty(),
        "our client differs from the official SDK:\n{}",
        diffs.join("\n")
    );
    // The SDK does send telemetry after turn.end: the one message we leave out on purpose.
    assert!(sdk.messages.iter().any(|m| m.path() == "telemetry"));
    assert!(!ours.messages.iter().any(|m| m.path() == "telemetry"));
}

/// The turn structure of a recording: per request id in order of appearance, the messages
/// other than PCM (a run of PCM messages shows once), telemetry left out.
fn turns(stats: &FakeAzureStats) -> Vec<Vec<String>> {
    let mut ids: Vec<String> = Vec::new();
    let mut out: Vec<Vec<String>> = Vec::new();
    for m in client_messages(stats) {
        let id = m.header("X-RequestId").unwrap_or_default().to_owned();
        let turn = match ids.iter().position(|i| *i == id) {
            Some(t) => t,
            None => {
                ids.push(id);
                out.push(Vec::new());
                ids.len() - 1
            }
        };
        let shape = match (m.path(), m.header("Content-Type"), m.body.is_empty()) {
            ("audio", None, false) => "PCM".to_owned(),
            ("audio", None, true) => "end of stream".to_owned(),
            (path, ct, _) => format!("{path} {}", ct.unwrap_or_default()),
        };
        if out[turn].last() != Some(&shape) {
            out[turn].push(shape);
        }
    }
    out
}

/// The service ends the turn after each phrase while audio still flows: the SDK goes on in a
/// new turn on the same socket (new request id, `speech.context`, the WAV header, then the
/// audio from the end of the last phrase), and so must we, with the same messages and the
/// same place on the call's timeline for the next phrase.
#[tokio::test]
async fn a_turn_ended_mid_audio_goes_on_as_the_sdk_does() {
    // Two phrases: the question, 3 s of silence, the question again, 1 s of silence. The SDK
    // sends the first 5 s at once and the rest at twice real time, so the first phrase's
    // turn.end comes while it is still sending.
    let question = wav::read(&fixture()).unwrap();
    let (path, two) = two_phrases("turn-end");
    let cut = || FakeAzureConfig {
        fault: sifucall::sandbox::azure::AzureFault::TurnEndAfterPhrases(1),
        ..fake_config()
    };

    let sdk_fake = FakeAzure::spawn(cut()).await.unwrap();
    let sdk_events = run_sdk_on(&sdk_fake, &path).await;
    let ours_fake = FakeAzure::spawn(cut()).await.unwrap();
    let ours_events = run_ours_on(&ours_fake, &path, 2).await;
    let _ = std::fs::remove_file(&path);

    let sdk_finals: Vec<(String, u64)> = sdk_events
        .iter()
        .filter(|e| e["event"] == "recognized" && e["reason"] == "RecognizedSpeech")
        .map(|e| {
            (
                e["text"].as_str().unwrap().to_owned(),
                e["offset"].as_u64().unwrap() / 10_000,
            )
        })
        .collect();
    let our_finals: Vec<(String, u64)> = ours_events
        .iter()
        .filter_map(|e| match e {
            SttEvent::Final {
                text, offset_ms, ..
            } => Some((text.clone(), *offset_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(sdk_finals.len(), 2, "{sdk_events:#?}");
    assert!(
        !sdk_events
            .iter()
            .any(|e| e["event"] == "canceled" && e["reason"] != "EndOfStream"),
        "{sdk_events:#?}"
    );
    // Same phrases. Ours sits exactly where it is in the audio (the fake's endpointer works
    // in 20 ms blocks). The SDK's second offset is up to one of its 100 ms chunks late: its
    // new turn starts with the chunk it had already read when turn.end came, then the replay
    // (seen in its recording), so the service hears that chunk first.
    assert_eq!(our_finals.len(), 2, "{ours_events:?}");
    let question_ms = question.samples.len() as u64 / 8;
    assert!(
        our_finals[1]
            .1
            .abs_diff(our_finals[0].1 + question_ms + 3000)
            <= 20,
        "{our_finals:?}"
    );
    for (s, o) in sdk_finals.iter().zip(&our_finals) {
        assert_eq!(s.0, o.0);
        assert!(
            s.1.abs_diff(o.1) <= 120,
            "SDK {sdk_finals:?} ours {our_finals:?}"
        );
    }
    assert!(
        !ours_events
            .iter()
            .any(|e| matches!(e, SttEvent::Reconnected | SttEvent::Failed(_))),
        "{ours_events:?}"
    );

    let (sdk, ours) = (sdk_fake.stats(), ours_fake.stats());
    for st in [&sdk, &ours] {
        assert_eq!(st.connections, 1, "no reconnect");
        assert!(st.turns_cut >= 1, "{:?}", st.turns_cut);
        assert!(st.violations.is_empty(), "{:?}", st.violations);
    }
    // The first two turns look the same on both sides (after that, whether the service cut
    // the second turn too depends on how far the SDK's stream had got).
    // Our second turn replays the audio from the end of the first phrase, contiguously.
    let second_id = client_messages(&ours)
        .iter()
        .filter(|m| m.path() == "speech.context")
        .nth(1)
        .and_then(|m| m.header("X-RequestId"))
        .unwrap()
        .to_owned();
    let replayed: Vec<u8> = client_messages(&ours)
        .iter()
        .filter(|m| {
            m.path() == "audio"
                && m.header("Content-Type").is_none()
                && m.header("X-RequestId") == Some(&second_id)
        })
        .flat_map(|m| m.body.iter().copied())
        .collect();
    let first_end_ms = ours_events
        .iter()
        .find_map(|e| match e {
            SttEvent::Final {
                offset_ms,
                duration_ms,
                ..
            } => Some(offset_ms + duration_ms),
            _ => None,
        })
        .unwrap();
    let file_bytes: Vec<u8> = two.iter().flat_map(|s| s.to_le_bytes()).collect();
    let from = usize::try_from(first_end_ms * 16).unwrap();
    assert!(!replayed.is_empty());
    assert!(
        file_bytes[from..].starts_with(&replayed),
        "turn 2 is the audio from {first_end_ms} ms on"
    );
    let (ts, to) = (turns(&sdk), turns(&ours));
    assert_eq!(ts[..2], to[..2], "SDK {ts:#?}\nours {to:#?}");
    assert_eq!(
        ts[1],
        [
            "speech.context application/json",
            "audio audio/x-wav",
            "PCM"
        ],
        "{ts:#?}"
    );
}

/// The question, 3 s of silence, the question again, 1 s of silence, in a temporary WAV file.
fn two_phrases(tag: &str) -> (PathBuf, Vec<i16>) {
    let question = wav::read(&fixture()).unwrap();
    let mut two = question.samples.clone();
    two.extend(std::iter::repeat_n(0i16, 3 * 8000));
    two.extend_from_slice(&question.samples);
    two.extend(std::iter::repeat_n(0i16, 8000));
    let path = std::env::temp_dir().join(format!(
        "sifucall-two-phrases-{tag}-{}.wav",
        std::process::id()
    ));
    wav::write(&path, 8000, &two).unwrap();
    (path, two)
}

/// The fake's scripted outcomes read as the SDK reads the real service's: a numeric
/// `NoMatch` is the SDK's NoMatch result, `speech.fragment`s are its partials.
#[tokio::test]
async fn the_sdk_reads_the_fakes_scripted_statuses_and_fragments() {
    let (path, _) = two_phrases("statuses");
    let fake = FakeAzure::spawn(FakeAzureConfig {
        phrase_statuses: vec!["NoMatch".into()],
        status_as_number: true,
        fragments: true,
        ..fake_config()
    })
    .await
    .unwrap();
    let events = run_sdk_on(&fake, &path).await;
    let _ = std::fs::remove_file(&path);
    let recognised: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["event"] == "recognized")
        .map(|e| {
            (
                e["reason"].as_str().unwrap(),
                e["text"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        recognised,
        [("NoMatch", ""), ("RecognizedSpeech", TRANSCRIPT)],
        "{events:#?}"
    );
    assert!(events.iter().any(|e| e["event"] == "recognizing"));
    let st = fake.stats();
    assert!(st.violations.is_empty(), "{:?}", st.violations);
    assert_eq!(st.connections, 1);
}

/// The service closes the connection at its cap (code 1000): the SDK reconnects, replays and
/// goes on, so the fake's cap is one the SDK copes with. The SDK sends the first 5 s of a
/// connection at once and the rest at twice real time, so the 13.75 s file takes it at least
/// 3.9 s: a 3.5 s cap falls during the second phrase, and the next connection has time to
/// finish it.
#[tokio::test]
async fn the_sdk_crosses_the_fakes_connection_cap() {
    let (path, _) = two_phrases("cap");
    let fake = FakeAzure::spawn(FakeAzureConfig {
        connection_cap_ms: 3500,
        ..fake_config()
    })
    .await
    .unwrap();
    let events = run_sdk_on(&fake, &path).await;
    let _ = std::fs::remove_file(&path);
    let recognised: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "recognized" && e["reason"] == "RecognizedSpeech")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(recognised, [TRANSCRIPT, TRANSCRIPT], "{events:#?}");
    let st = fake.stats();
    assert!(st.capped >= 1, "{st:?}");
    assert!(st.connections >= 2);
    assert!(st.violations.is_empty(), "{:?}", st.violations);
}

/// Continuous language identification, as Microsoft's guide sets it up: the SDK with
/// `AutoDetectSourceLanguageConfig.fromLanguages(["ms-MY", "en-US"])` in `Continuous` mode on
/// the `universal/v2` endpoint, and our client with the same two candidates, send the same
/// upgrade (path, `lidEnabled=true`) and the same `speech.context` (the `languageId` section,
/// no `phraseDetection.language`, the `phraseOutput` for any language), field by field; and
/// both read each phrase's `PrimaryLanguage` from the fake the same way.
#[tokio::test]
async fn with_language_identification_our_client_sends_what_the_sdk_sends() {
    const ENGLISH: &str = "How much is the premium plan?";
    let (path, _) = two_phrases("lid");
    let lid = || FakeAzureConfig {
        transcripts: vec![TRANSCRIPT.into(), ENGLISH.into()],
        transcript_languages: vec!["ms-MY".into(), "en-US".into()],
        ..fake_config()
    };
    let sdk_fake = FakeAzure::spawn(lid()).await.unwrap();
    let v2 = format!(
        "ws://{}{}",
        sdk_fake.addr,
        sifucall::providers::stt::azure::UNIVERSAL_V2_PATH
    );
    let sdk_events = run_sdk_with(&v2, &path, Some("ms-MY,en-US")).await;
    let ours_fake = FakeAzure::spawn(lid()).await.unwrap();
    let ours_events =
        run_ours_with(&ours_fake, &path, 2, vec!["ms-MY".into(), "en-US".into()]).await;
    let _ = std::fs::remove_file(&path);

    let sdk_finals: Vec<(&str, &str)> = sdk_events
        .iter()
        .filter(|e| e["event"] == "recognized" && e["reason"] == "RecognizedSpeech")
        .map(|e| {
            (
                e["text"].as_str().unwrap(),
                e["language"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    let expected = [(TRANSCRIPT, "ms-MY"), (ENGLISH, "en-US")];
    assert_eq!(sdk_finals, expected, "{sdk_events:#?}");
    let our_finals: Vec<(String, Option<String>)> = ours_events
        .iter()
        .filter_map(|e| match e {
            SttEvent::Final { text, language, .. } => Some((text.clone(), language.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        our_finals,
        expected.map(|(t, l)| (t.to_owned(), Some(l.to_owned()))),
        "{ours_events:?}"
    );

    let (sdk, ours) = (sdk_fake.stats(), ours_fake.stats());
    assert_eq!((sdk.connections, ours.connections), (1, 1));
    assert!(sdk.violations.is_empty(), "{:?}", sdk.violations);
    assert!(ours.violations.is_empty(), "{:?}", ours.violations);
    assert_eq!(
        (&sdk.lid_enabled[..], &ours.lid_enabled[..]),
        (&[true][..], &[true][..])
    );
    let diffs = differences(&sdk, &ours);
    assert!(
        diffs.is_empty(),
        "with language identification our client differs from the official SDK:\n{}",
        diffs.join("\n")
    );
    // Byte for byte, key order included.
    let context_bytes = |st: &FakeAzureStats| {
        find_path(&client_messages(st), "speech.context")
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .unwrap_or_default()
    };
    assert_eq!(context_bytes(&ours), context_bytes(&sdk));
    // What both sent, spelled out (the comparison above would pass if both were wrong).
    let context = &ours.contexts[0];
    assert_eq!(ours.upgrades[0].path, "/stt/speech/universal/v2");
    assert_eq!(
        context["languageId"]["languages"],
        serde_json::json!(["ms-MY", "en-US"])
    );
    assert_eq!(context["languageId"]["mode"], "DetectContinuous");
    assert!(
        context["phraseDetection"].get("language").is_none(),
        "{context}"
    );
}
