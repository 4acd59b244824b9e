//! The official `elevenlabs` Python SDK's stream-input client (`convert_realtime`) against
//! the fake ElevenLabs: it must receive all the audio and read every message with its own
//! models, alignment included (`charDurationsMs`); and our client must send what the SDK
//! sends (key only in the `xi-api-key` header, the SDK's query parameters, the same message
//! shapes).

#[path = "sdk/runner.rs"]
mod sdk;

use serde_json::{Value, json};
use sifucall::ops::config::{OutputFormat, Secret, Settings, TtsTransport};
use sifucall::providers::tts::elevenlabs::ElevenLabs;
use sifucall::providers::tts::{TtsInput, TtsOutput, TtsParams, TtsProvider as _};
use sifucall::sandbox::elevenlabs::{
    self as fake, FakeElevenLabs, FakeElevenLabsConfig, speech_samples,
};

const KEY: &str = "el-conformance-key";
const VOICE: &str = "21m00Tcm4TlvDq8ikWAM";
const CLAUSES: [&str; 2] = [
    "Selamat pagi, terima kasih kerana menelefon.",
    "Ada apa yang boleh saya bantu?",
];

async fn fake_elevenlabs() -> FakeElevenLabs {
    fake::spawn(FakeElevenLabsConfig {
        key: Some(KEY.into()),
        first_byte_delay_ms: 5,
        realtime_factor: 0.0,
        ..FakeElevenLabsConfig::default()
    })
    .await
    .unwrap()
}

async fn sdk(srv: &FakeElevenLabs, format: &str) -> Value {
    let mut args = vec![srv.base_url(), KEY.into(), VOICE.into(), format.into()];
    args.extend(CLAUSES.iter().map(|c| format!("{c} ")));
    sdk::run("elevenlabs_stream_input.py", &args).await
}

fn spoken() -> String {
    CLAUSES.join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_receives_the_audio_and_reads_the_alignment() {
    let srv = fake_elevenlabs().await;
    let out = sdk(&srv, "pcm_16000").await;
    assert_eq!(
        out["audio_bytes"].as_u64().unwrap() as usize,
        2 * speech_samples(&spoken(), 16_000),
        "all the audio, as s16le"
    );
    let messages = out["messages"].as_array().unwrap();
    let audio: Vec<&Value> = messages.iter().filter(|m| m["kind"] == "audio").collect();
    assert!(audio.len() > 2, "{out}");
    assert!(
        messages.iter().all(|m| m["kind"] != "other"),
        "a message the SDK's models do not know: {out}"
    );
    assert_eq!(
        messages.last().unwrap(),
        &json!({"kind": "final", "is_final": true}),
        "{out}"
    );
    let mut chars = String::new();
    for m in &audio {
        for key in ["alignment", "normalized_alignment"] {
            let a = &m[key];
            if a.is_null() {
                continue;
            }
            let n = a["chars"].as_array().unwrap().len();
            // Misspelt durations would read as None here.
            assert_eq!(
                a["duration"].as_array().map(Vec::len),
                Some(n),
                "{key} durations as the SDK reads them: {a}"
            );
            assert_eq!(a["start"].as_array().map(Vec::len), Some(n), "{a}");
        }
        if let Some(c) = m["alignment"]["chars"].as_array() {
            chars.extend(c.iter().map(|c| c.as_str().unwrap().to_owned()));
        }
    }
    assert_eq!(chars.trim_end(), spoken());
}

/// Our websocket client speaking the same text to the same fake.
async fn our_session(srv: &FakeElevenLabs) {
    let mut s = Settings::defaults().tts;
    s.base_url = srv.base_url();
    s.voice_id = VOICE.into();
    s.transport = TtsTransport::Websocket;
    s.output_format = OutputFormat::Pcm16000;
    let el = ElevenLabs::new(&s, Secret::new(Some(KEY.into()))).unwrap();
    let mut stream = el
        .open(TtsParams {
            sample_rate: 16_000,
            call_id: "conformance".into(),
            language_code: None,
        })
        .await
        .unwrap();
    for c in CLAUSES {
        stream.text.send(TtsInput::Text(c.into())).await.unwrap();
    }
    stream.text.send(TtsInput::Finish).await.unwrap();
    loop {
        match stream.audio.recv().await {
            Some(TtsOutput::Done) => break,
            Some(TtsOutput::Failed(e)) => panic!("{e}"),
            None => panic!("ended without Done"),
            Some(_) => {}
        }
    }
}

fn non_null_keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, _)| k.clone())
        .collect();
    k.sort();
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_sends_what_the_sdk_sends() {
    let srv = fake_elevenlabs().await;
    sdk(&srv, "pcm_16000").await;
    our_session(&srv).await;
    let sessions = srv.stats().recorded_sessions();
    let (theirs, ours) = (&sessions[0], &sessions[1]);

    // The key: in the `xi-api-key` header, nowhere else.
    for s in [theirs, ours] {
        assert_eq!(s.headers["xi-api-key"], KEY);
        assert!(s.query.values().all(|v| !v.contains(KEY)));
        assert!(s.messages.iter().all(|m| !m.to_string().contains(KEY)));
    }
    // Every query parameter the SDK sends, we send the same way.
    for (k, v) in &theirs.query {
        assert_eq!(ours.query.get(k), Some(v), "query `{k}`");
    }
    // The first message initialises with a single space; we set at least what the SDK sets
    // (it also asks try_trigger_generation there, which a lone space cannot trigger).
    let (first_theirs, first_ours) = (&theirs.messages[0], &ours.messages[0]);
    assert_eq!(first_theirs["text"], " ");
    assert_eq!(first_ours["text"], " ");
    for k in non_null_keys(first_theirs) {
        assert!(
            k == "try_trigger_generation" || first_ours.get(&k).is_some_and(|v| !v.is_null()),
            "the SDK initialises `{k}` and we do not: {first_theirs} vs {first_ours}"
        );
    }
    // Text goes out in the same shape: whole words ending in a space, asking for generation.
    let texts = |msgs: &[Value]| -> Vec<Value> {
        msgs[1..]
            .iter()
            .filter(|m| m["text"].as_str().is_some_and(|t| !t.trim().is_empty()))
            .cloned()
            .collect()
    };
    let (t_theirs, t_ours) = (texts(&theirs.messages), texts(&ours.messages));
    assert_eq!(t_ours.len(), CLAUSES.len());
    for m in t_theirs.iter().chain(&t_ours) {
        assert_eq!(non_null_keys(m), ["text", "try_trigger_generation"], "{m}");
        assert_eq!(m["try_trigger_generation"], true);
        assert!(m["text"].as_str().unwrap().ends_with(' '), "{m}");
    }
    let joined = |t: &[Value]| -> String {
        t.iter()
            .map(|m| m["text"].as_str().unwrap())
            .collect::<String>()
            .trim_end()
            .to_owned()
    };
    assert_eq!(joined(&t_theirs), joined(&t_ours));
    // Both end the stream with an empty text.
    assert_eq!(theirs.messages.last().unwrap(), &json!({"text": ""}));
    assert_eq!(ours.messages.last().unwrap(), &json!({"text": ""}));
}
