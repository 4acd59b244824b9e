//! Azure Speech real-time websocket protocol, client side, sans-IO: the exact messages the
//! JavaScript Speech SDK sends, and the parser of what the service sends back.
//!
//! The async client ([`super::azure`]) is a thin driver around these functions, so every
//! byte it puts on the wire is decided (and unit tested) here. The fake server
//! (`crate::sandbox::azure`) deliberately has its own reader and writer. Wire format
//! reference: `docs/providers/azure-stt.md`.

use std::time::SystemTime;

use serde_json::Value;

/// `speech.config`: once per connection, before anything else.
pub const PATH_SPEECH_CONFIG: &str = "speech.config";
/// `speech.context`: phrase detection (language, segmentation) for the turn.
pub const PATH_SPEECH_CONTEXT: &str = "speech.context";
/// `audio`: the WAV header, then raw PCM, then an empty body for end of stream.
pub const PATH_AUDIO: &str = "audio";

/// The most header bytes a message may carry (AZ-WSDOC).
pub const MAX_HEADER_BYTES: usize = 8192;

/// Length of the RIFF/WAVE header that opens the audio stream.
pub const WAV_HEADER_LEN: usize = 44;

/// One 100 ns tick per unit: what Azure offsets and durations are counted in.
pub const TICKS_PER_SECOND: u64 = 10_000_000;

/// A malformed service message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The header block exceeds [`MAX_HEADER_BYTES`].
    #[error("header block of {0} bytes exceeds the 8192-byte limit")]
    HeadersTooLong(usize),
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A JSON body that does not parse or lacks a required field.
    #[error("bad {path} body: {reason}")]
    BadBody {
        /// The message's `Path`.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// Message headers in arrival order; lookups ignore case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All headers, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Parses `Name: value` / `Name:value` lines separated by CRLF (a bare LF is tolerated);
    /// blank lines are skipped, names and values trimmed. Like the SDK's
    /// `WebsocketMessageFormatter`, a line without a colon (or starting with one) is a header
    /// named by the whole line with an empty value, not an error.
    pub fn parse(block: &str) -> Self {
        let mut out = Vec::new();
        for line in block.split('\n') {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            match line.split_once(':') {
                Some((name, value)) if !name.trim().is_empty() => {
                    out.push((name.trim().to_owned(), value.trim().to_owned()));
                }
                _ => out.push((line.trim().to_owned(), String::new())),
            }
        }
        Self(out)
    }
}

/// A fresh 32-upper-hex-digit id, as the SDK uses for `X-RequestId` and `X-ConnectionId`.
pub fn new_id() -> String {
    uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .to_ascii_uppercase()
}

/// `X-Timestamp` for `t`: ISO-8601 UTC with milliseconds, like JavaScript's
/// `Date.toISOString()` (`2026-05-01T10:00:00.123Z`). Times before 1970 print as the epoch.
pub fn format_timestamp(t: SystemTime) -> String {
    // Azure wants exactly the call records' format: RFC 3339 UTC with milliseconds.
    crate::ops::records::rfc3339_utc(t)
}

/// A text message: `Path`, `X-RequestId`, `X-Timestamp`, `Content-Type`, blank line, body.
pub fn text_message(
    path: &str,
    request_id: &str,
    timestamp: &str,
    content_type: &str,
    body: &str,
) -> String {
    format!(
        "Path: {path}\r\nX-RequestId: {request_id}\r\nX-Timestamp: {timestamp}\r\nContent-Type: {content_type}\r\n\r\n{body}"
    )
}

/// The `speech.config` body as the JavaScript SDK sends it for continuous recognition from a
/// push stream (telemetry on, its default): the system, the OS and the audio source, which
/// declares the stream's format, then `"recognition":"conversation"`. Only the SDK version
/// and the OS description differ from the SDK's (ours name this program). Built by hand so
/// that the key order matches the SDK's.
pub fn speech_config_body(sample_rate: u32) -> String {
    format!(
        "{{\"context\":{{\"system\":{{\"name\":\"SpeechSDK\",\"version\":{version},\"build\":\"JavaScript\",\"lang\":\"JavaScript\"}},\
         \"os\":{{\"platform\":{platform},\"name\":\"sifucall\",\"version\":{version}}},\
         \"audio\":{{\"source\":{{\"bitspersample\":16,\"channelcount\":1,\"connectivity\":\"Unknown\",\
         \"manufacturer\":\"Speech SDK\",\"model\":\"PushStream\",\"samplerate\":{sample_rate},\"type\":\"Stream\"}}}}}},\
         \"recognition\":\"conversation\"}}",
        version = Value::String(env!("CARGO_PKG_VERSION").to_owned()),
        platform = Value::String(std::env::consts::OS.to_owned()),
    )
}

/// The `speech.config` message.
pub fn speech_config_message(request_id: &str, timestamp: &str, sample_rate: u32) -> String {
    text_message(
        PATH_SPEECH_CONFIG,
        request_id,
        timestamp,
        "application/json",
        &speech_config_body(sample_rate),
    )
}

/// The `speech.context` body for continuous conversation recognition with custom
/// segmentation silence, as the JavaScript SDK 1.52 sends it (with its empty `phraseOutput`).
pub fn speech_context_body(language: &str, segmentation_silence_ms: u32) -> String {
    // Built by hand (not `json!`) so key order matches the SDK byte for byte.
    format!(
        "{{\"phraseDetection\":{{\"mode\":\"Conversation\",\"language\":{},\"conversation\":{{\"segmentation\":{{\"mode\":\"Custom\",\"segmentationSilenceTimeoutMs\":{segmentation_silence_ms}}}}},\"enrichment\":{{}}}},\"phraseOutput\":{{}}}}",
        Value::String(language.to_owned())
    )
}

/// The `speech.context` body for continuous recognition with continuous language
/// identification among `languages`, as the JavaScript SDK 1.52 builds it for a recognizer
/// made with `AutoDetectSourceLanguageConfig.fromLanguages(languages)` in `Continuous` mode
/// (`ServiceRecognizerBase.setLanguageIdJson`, then `setLanguageJson`, which drops
/// `phraseDetection.language`): a `languageId` section (`DetectContinuous`, recognise on
/// success, nothing on unknown, `PrioritizeLatency`) and a `phraseOutput` asking for interim
/// and phrase results whatever the language. Key order is the SDK's.
pub fn speech_context_lid_body(languages: &[String], segmentation_silence_ms: u32) -> String {
    let languages = Value::Array(languages.iter().cloned().map(Value::String).collect());
    format!(
        "{{\"phraseDetection\":{{\"mode\":\"Conversation\",\"conversation\":{{\"segmentation\":{{\"mode\":\"Custom\",\"segmentationSilenceTimeoutMs\":{segmentation_silence_ms}}}}},\"enrichment\":{{}}}},\
         \"languageId\":{{\"languages\":{languages},\"mode\":\"DetectContinuous\",\"onSuccess\":{{\"action\":\"Recognize\"}},\"onUnknown\":{{\"action\":\"None\"}},\"priority\":\"PrioritizeLatency\"}},\
         \"phraseOutput\":{{\"interimResults\":{{\"resultType\":\"Auto\"}},\"phraseResults\":{{\"resultType\":\"Always\"}}}}}}"
    )
}

/// The `speech.context` message.
pub fn speech_context_message(
    request_id: &str,
    timestamp: &str,
    language: &str,
    segmentation_silence_ms: u32,
) -> String {
    text_message(
        PATH_SPEECH_CONTEXT,
        request_id,
        timestamp,
        "application/json",
        &speech_context_body(language, segmentation_silence_ms),
    )
}

/// The `speech.context` message with continuous language identification among `languages`.
pub fn speech_context_lid_message(
    request_id: &str,
    timestamp: &str,
    languages: &[String],
    segmentation_silence_ms: u32,
) -> String {
    text_message(
        PATH_SPEECH_CONTEXT,
        request_id,
        timestamp,
        "application/json",
        &speech_context_lid_body(languages, segmentation_silence_ms),
    )
}

/// A binary `audio` message: big-endian u16 header length, the headers (no blank line, as
/// the JS SDK does), then `payload`. `content_type` is set only on the WAV header message.
pub fn audio_message(
    request_id: &str,
    timestamp: &str,
    content_type: Option<&str>,
    payload: &[u8],
) -> Vec<u8> {
    let mut headers =
        format!("Path: {PATH_AUDIO}\r\nX-RequestId: {request_id}\r\nX-Timestamp: {timestamp}\r\n");
    if let Some(ct) = content_type {
        headers.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    // Our headers are ~100 bytes, far below u16::MAX.
    let len = u16::try_from(headers.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(2 + headers.len() + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(headers.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// The 44-byte RIFF header for 16-bit mono PCM at `sample_rate`, with RIFF and data sizes
/// 0 exactly as the JS SDK writes them for a stream of unknown length.
pub fn wav_header(sample_rate: u32) -> [u8; WAV_HEADER_LEN] {
    let mut h = [0u8; WAV_HEADER_LEN];
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(dst) = h.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(0, b"RIFF");
    put(4, &0u32.to_le_bytes());
    put(8, b"WAVE");
    put(12, b"fmt ");
    put(16, &16u32.to_le_bytes());
    put(20, &1u16.to_le_bytes()); // PCM
    put(22, &1u16.to_le_bytes()); // mono
    put(24, &sample_rate.to_le_bytes());
    put(28, &(sample_rate * 2).to_le_bytes()); // byte rate
    put(32, &2u16.to_le_bytes()); // block align
    put(34, &16u16.to_le_bytes()); // bits per sample
    put(36, b"data");
    put(40, &0u32.to_le_bytes());
    h
}

/// The first `audio` message of a turn: the WAV header alone, `Content-Type: audio/x-wav`.
pub fn wav_header_message(request_id: &str, timestamp: &str, sample_rate: u32) -> Vec<u8> {
    audio_message(
        request_id,
        timestamp,
        Some("audio/x-wav"),
        &wav_header(sample_rate),
    )
}

/// End of stream: an `audio` message with an empty body.
pub fn end_of_stream_message(request_id: &str, timestamp: &str) -> Vec<u8> {
    audio_message(request_id, timestamp, None, &[])
}

/// Splits a text frame into headers and body at the first blank line. Without one, the whole
/// frame is headers and the body is empty, as the SDK reads it.
pub fn parse_text_frame(text: &str) -> Result<(Headers, &str), ProtocolError> {
    let (head, body) = if let Some(i) = text.find("\r\n\r\n") {
        (&text[..i], &text[i + 4..])
    } else if let Some(i) = text.find("\n\n") {
        (&text[..i], &text[i + 2..])
    } else {
        (text, "")
    };
    if head.len() > MAX_HEADER_BYTES {
        return Err(ProtocolError::HeadersTooLong(head.len()));
    }
    Ok((Headers::parse(head), body))
}

/// `RecognitionStatus` of a `speech.phrase`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecognitionStatus {
    /// Recognised; `DisplayText` is present.
    Success,
    /// Speech detected but nothing matched.
    NoMatch,
    /// Only silence at the start.
    InitialSilenceTimeout,
    /// Only noise.
    BabbleTimeout,
    /// Service error.
    Error,
    /// End of the audio stream reached.
    EndOfDictation,
    /// Throttled.
    TooManyRequests,
    /// The request was invalid.
    BadRequest,
    /// Not allowed.
    Forbidden,
    /// Any status this code does not know.
    Other(String),
}

impl RecognitionStatus {
    /// The SDK enum's order: the service may send the number instead of the name.
    const BY_NUMBER: [Self; 9] = [
        Self::Success,
        Self::NoMatch,
        Self::InitialSilenceTimeout,
        Self::BabbleTimeout,
        Self::Error,
        Self::EndOfDictation,
        Self::TooManyRequests,
        Self::BadRequest,
        Self::Forbidden,
    ];

    /// From the JSON value: a name, or the SDK enum's number.
    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Some(Self::parse(s)),
            Value::Number(n) => Some(
                n.as_u64()
                    .and_then(|i| Self::BY_NUMBER.get(usize::try_from(i).ok()?).cloned())
                    .unwrap_or_else(|| Self::Other(n.to_string())),
            ),
            _ => None,
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "Success" => Self::Success,
            "NoMatch" => Self::NoMatch,
            "InitialSilenceTimeout" => Self::InitialSilenceTimeout,
            "BabbleTimeout" => Self::BabbleTimeout,
            "Error" => Self::Error,
            "EndOfDictation" => Self::EndOfDictation,
            "TooManyRequests" => Self::TooManyRequests,
            "BadRequest" => Self::BadRequest,
            "Forbidden" => Self::Forbidden,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Success => "Success",
            Self::NoMatch => "NoMatch",
            Self::InitialSilenceTimeout => "InitialSilenceTimeout",
            Self::BabbleTimeout => "BabbleTimeout",
            Self::Error => "Error",
            Self::EndOfDictation => "EndOfDictation",
            Self::TooManyRequests => "TooManyRequests",
            Self::BadRequest => "BadRequest",
            Self::Forbidden => "Forbidden",
            Self::Other(s) => s,
        }
    }
}

/// A service message. Offsets and durations are 100 ns ticks relative to the turn's audio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceMessage {
    /// `turn.start`
    TurnStart,
    /// `speech.startDetected`
    SpeechStartDetected {
        /// Where speech started.
        offset: u64,
    },
    /// `speech.hypothesis` or `speech.fragment`: a partial result.
    Hypothesis {
        /// The partial text.
        text: String,
        /// Start of the phrase.
        offset: u64,
        /// Length so far.
        duration: u64,
        /// `PrimaryLanguage`, with language identification on.
        language: Option<PrimaryLanguage>,
    },
    /// `speech.phrase`: a final result (or a non-success status).
    Phrase {
        /// The outcome.
        status: RecognitionStatus,
        /// The text, present on `Success`.
        display_text: Option<String>,
        /// Start of the phrase.
        offset: u64,
        /// Length of the phrase.
        duration: u64,
        /// `PrimaryLanguage`, with language identification on.
        language: Option<PrimaryLanguage>,
    },
    /// `speech.endDetected` (its offset is optional; the body may be empty).
    SpeechEndDetected,
    /// `turn.end`
    TurnEnd,
    /// Any other path (e.g. `speech.keyword`), ignored by the client.
    Unknown {
        /// The message's `Path`.
        path: String,
    },
}

/// The language identification of a phrase or hypothesis: its `PrimaryLanguage` object,
/// `{"Language":"en-US","Confidence":"High"}`. The SDK reads both fields as strings
/// (`AutoDetectSourceLanguageResult`); the confidence is a word (`Unknown`, `Low`, `Normal`,
/// `High`) and may be absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryLanguage {
    /// The detected locale, one of the candidates (`Unknown` when the service could not tell).
    pub language: String,
    /// How sure the service is, as it says it.
    pub confidence: Option<String>,
}

impl PrimaryLanguage {
    /// From a message body: `None` when there is no usable `PrimaryLanguage.Language`.
    fn from_json(body: &Value) -> Option<Self> {
        let p = body.get("PrimaryLanguage")?;
        let language = p.get("Language")?.as_str()?.trim();
        if language.is_empty() {
            return None;
        }
        let confidence = match p.get("Confidence") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        Some(Self {
            language: language.to_owned(),
            confidence,
        })
    }

    /// The locale, unless the service said it could not tell (`Unknown`).
    pub fn known(&self) -> Option<&str> {
        (!self.language.eq_ignore_ascii_case("unknown")).then_some(self.language.as_str())
    }
}

/// Reads a tick count given as a JSON number or a numeric string.
fn ticks(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Whether a service frame answers the turn `request_id`: its `X-RequestId` matches (in any
/// case) or it has none. The SDK drops frames for any other turn.
pub fn is_for_turn(text: &str, request_id: &str) -> bool {
    parse_text_frame(text).map_or(true, |(h, _)| {
        h.get("X-RequestId")
            .is_none_or(|id| id.eq_ignore_ascii_case(request_id))
    })
}

/// Parses a service text frame into a typed message.
pub fn parse_service_message(text: &str) -> Result<ServiceMessage, ProtocolError> {
    let (headers, body) = parse_text_frame(text)?;
    let path = headers
        .get("Path")
        .ok_or(ProtocolError::MissingHeader("Path"))?;
    let json = || -> Result<Value, ProtocolError> {
        let body = body.trim();
        if body.is_empty() {
            return Ok(Value::Object(Default::default()));
        }
        serde_json::from_str(body).map_err(|e| ProtocolError::BadBody {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    };
    let bad = |reason: &str| ProtocolError::BadBody {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    Ok(match path.to_ascii_lowercase().as_str() {
        "turn.start" => ServiceMessage::TurnStart,
        "turn.end" => ServiceMessage::TurnEnd,
        "speech.enddetected" => ServiceMessage::SpeechEndDetected,
        "speech.startdetected" => {
            let v = json()?;
            ServiceMessage::SpeechStartDetected {
                offset: ticks(v.get("Offset")).unwrap_or(0),
            }
        }
        "speech.hypothesis" | "speech.fragment" => {
            let v = json()?;
            let text = v
                .get("Text")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("no Text"))?;
            ServiceMessage::Hypothesis {
                text: text.to_owned(),
                offset: ticks(v.get("Offset")).unwrap_or(0),
                duration: ticks(v.get("Duration")).unwrap_or(0),
                language: PrimaryLanguage::from_json(&v),
            }
        }
        "speech.phrase" => {
            let v = json()?;
            let status = v
                .get("RecognitionStatus")
                .and_then(RecognitionStatus::from_json)
                .ok_or_else(|| bad("no RecognitionStatus"))?;
            // `format=detailed` carries the text in NBest[0].Display instead.
            let display_text = v
                .get("DisplayText")
                .and_then(Value::as_str)
                .or_else(|| v.pointer("/NBest/0/Display").and_then(Value::as_str))
                .map(str::to_owned);
            ServiceMessage::Phrase {
                status,
                display_text,
                offset: ticks(v.get("Offset")).unwrap_or(0),
                duration: ticks(v.get("Duration")).unwrap_or(0),
                language: PrimaryLanguage::from_json(&v),
            }
        }
        _ => ServiceMessage::Unknown {
            path: path.to_owned(),
        },
    })
}

/// Converts a sample count at `sample_rate` to 100 ns ticks.
pub fn samples_to_ticks(samples: u64, sample_rate: u32) -> u64 {
    if sample_rate == 0 {
        return 0;
    }
    (u128::from(samples) * u128::from(TICKS_PER_SECOND) / u128::from(sample_rate)) as u64
}

/// Converts 100 ns ticks to a sample count at `sample_rate` (rounded down).
pub fn ticks_to_samples(ticks: u64, sample_rate: u32) -> u64 {
    (u128::from(ticks) * u128::from(sample_rate) / u128::from(TICKS_PER_SECOND)) as u64
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;

    use super::*;

    const RID: &str = "9E1C5E4B2A3D4F6E8A7B6C5D4E3F2A1B";
    const TS: &str = "2026-05-01T10:00:00.123Z";

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn timestamps_match_to_iso_string() {
        let t = UNIX_EPOCH + Duration::from_millis(1_777_629_600_123);
        assert_eq!(format_timestamp(t), TS);
        assert_eq!(format_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // Leap day and end of year.
        assert_eq!(
            format_timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            format_timestamp(UNIX_EPOCH + Duration::from_millis(1_767_225_599_999)),
            "2025-12-31T23:59:59.999Z"
        );
        assert_eq!(
            format_timestamp(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn ids() {
        let id = new_id();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        assert_eq!(id, id.to_ascii_uppercase());
        assert_ne!(id, new_id());
    }

    #[test]
    fn speech_config_bytes() {
        let m = speech_config_message(RID, TS, 8000);
        let expected_head = format!(
            "Path: speech.config\r\nX-RequestId: {RID}\r\nX-Timestamp: {TS}\r\nContent-Type: application/json\r\n\r\n"
        );
        assert!(m.starts_with(&expected_head), "{m}");
        let body: Value = serde_json::from_str(&m[expected_head.len()..]).unwrap();
        assert_eq!(body["context"]["system"]["name"], "SpeechSDK");
        assert_eq!(body["context"]["system"]["build"], "JavaScript");
        assert_eq!(body["recognition"], "conversation");
        // The audio source declares the stream as the SDK's push stream does.
        assert_eq!(
            body["context"]["audio"]["source"],
            json!({"bitspersample": 16, "channelcount": 1, "connectivity": "Unknown",
                "manufacturer": "Speech SDK", "model": "PushStream", "samplerate": 8000,
                "type": "Stream"})
        );
        assert_eq!(body["context"]["os"]["name"], "sifucall");
        // Key order as the SDK writes it.
        assert!(
            m.contains(r#"{"context":{"system":{"name":"SpeechSDK","version":"#),
            "{m}"
        );
    }

    #[test]
    fn speech_context_bytes() {
        assert_eq!(
            speech_context_message(RID, TS, "ms-MY", 500),
            format!(
                "Path: speech.context\r\nX-RequestId: {RID}\r\nX-Timestamp: {TS}\r\nContent-Type: application/json\r\n\r\n\
                 {{\"phraseDetection\":{{\"mode\":\"Conversation\",\"language\":\"ms-MY\",\"conversation\":{{\"segmentation\":{{\"mode\":\"Custom\",\"segmentationSilenceTimeoutMs\":500}}}},\"enrichment\":{{}}}},\"phraseOutput\":{{}}}}"
            )
        );
        // The body is valid JSON with the values in place.
        let v: Value = serde_json::from_str(&speech_context_body("ms-MY", 300)).unwrap();
        assert_eq!(
            v["phraseDetection"]["conversation"]["segmentation"]["segmentationSilenceTimeoutMs"],
            300
        );
    }

    #[test]
    fn speech_context_with_language_identification() {
        let langs = vec!["ms-MY".to_owned(), "en-US".to_owned()];
        let m = speech_context_lid_message(RID, TS, &langs, 500);
        let head = format!(
            "Path: speech.context\r\nX-RequestId: {RID}\r\nX-Timestamp: {TS}\r\nContent-Type: application/json\r\n\r\n"
        );
        assert!(m.starts_with(&head), "{m}");
        // Byte for byte what the SDK 1.52 sends (tests/azure_conformance.rs checks it against
        // the SDK itself): no phraseDetection.language, the languageId section, the
        // phraseOutput that asks for results in whatever language.
        assert_eq!(
            &m[head.len()..],
            "{\"phraseDetection\":{\"mode\":\"Conversation\",\"conversation\":{\"segmentation\":{\"mode\":\"Custom\",\"segmentationSilenceTimeoutMs\":500}},\"enrichment\":{}},\
             \"languageId\":{\"languages\":[\"ms-MY\",\"en-US\"],\"mode\":\"DetectContinuous\",\"onSuccess\":{\"action\":\"Recognize\"},\"onUnknown\":{\"action\":\"None\"},\"priority\":\"PrioritizeLatency\"},\
             \"phraseOutput\":{\"interimResults\":{\"resultType\":\"Auto\"},\"phraseResults\":{\"resultType\":\"Always\"}}}"
        );
        let v: Value = serde_json::from_str(&speech_context_lid_body(&langs, 300)).unwrap();
        assert_eq!(v["languageId"]["languages"], json!(["ms-MY", "en-US"]));
        assert!(v["phraseDetection"].get("language").is_none());
        assert_eq!(
            v["phraseDetection"]["conversation"]["segmentation"]["segmentationSilenceTimeoutMs"],
            300
        );
    }

    #[test]
    fn primary_language_of_phrases_and_hypotheses() {
        let phrase = |body: &str| match parse_service_message(&svc("speech.phrase", body)) {
            Ok(ServiceMessage::Phrase { language, .. }) => language,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            phrase(
                r#"{"RecognitionStatus":"Success","DisplayText":"How much is it?","Offset":1,"Duration":2,"PrimaryLanguage":{"Language":"en-US","Confidence":"High"},"Channel":0}"#
            ),
            Some(PrimaryLanguage {
                language: "en-US".into(),
                confidence: Some("High".into())
            })
        );
        // Without a confidence (as in translation results), or with a number for one.
        let p = phrase(
            r#"{"RecognitionStatus":"Success","DisplayText":"x","PrimaryLanguage":{"Language":"ms-MY"}}"#,
        )
        .unwrap();
        assert_eq!((p.known(), p.confidence.as_deref()), (Some("ms-MY"), None));
        let p = phrase(
            r#"{"RecognitionStatus":"Success","DisplayText":"x","PrimaryLanguage":{"Language":"ms-MY","Confidence":0.9}}"#,
        )
        .unwrap();
        assert_eq!(p.confidence.as_deref(), Some("0.9"));
        // The service could not tell.
        let p = phrase(
            r#"{"RecognitionStatus":"Success","DisplayText":"x","PrimaryLanguage":{"Language":"Unknown","Confidence":"Unknown"}}"#,
        )
        .unwrap();
        assert_eq!(p.known(), None);
        // Absent, empty or malformed: no language, and the phrase still parses.
        for body in [
            r#"{"RecognitionStatus":"Success","DisplayText":"x"}"#,
            r#"{"RecognitionStatus":"Success","DisplayText":"x","PrimaryLanguage":{"Language":""}}"#,
            r#"{"RecognitionStatus":"Success","DisplayText":"x","PrimaryLanguage":{"Language":7}}"#,
            r#"{"RecognitionStatus":"Success","DisplayText":"x","PrimaryLanguage":"en-US"}"#,
        ] {
            assert_eq!(phrase(body), None, "{body}");
        }
        assert_eq!(
            parse_service_message(&svc(
                "speech.hypothesis",
                r#"{"Text":"how much","Offset":1,"Duration":2,"PrimaryLanguage":{"Language":"en-US","Confidence":"Low"}}"#
            )),
            Ok(ServiceMessage::Hypothesis {
                text: "how much".into(),
                offset: 1,
                duration: 2,
                language: Some(PrimaryLanguage {
                    language: "en-US".into(),
                    confidence: Some("Low".into())
                })
            })
        );
    }

    #[test]
    fn wav_header_matches_sdk_bytes() {
        assert_eq!(
            wav_header(8000).to_vec(),
            hex(
                "52494646 00000000 57415645 666d7420 10000000 0100 0100 401f0000 803e0000 0200 1000 64617461 00000000"
            )
        );
        let h16 = wav_header(16000);
        assert_eq!(&h16[24..32], &hex("803e0000 007d0000")[..]);
    }

    #[test]
    fn audio_message_bytes() {
        let head = format!("Path: audio\r\nX-RequestId: {RID}\r\nX-Timestamp: {TS}\r\n");
        let m = audio_message(RID, TS, None, &[1, 2, 3]);
        let mut expected = (head.len() as u16).to_be_bytes().to_vec();
        expected.extend_from_slice(head.as_bytes());
        expected.extend_from_slice(&[1, 2, 3]);
        assert_eq!(m, expected);

        let w = wav_header_message(RID, TS, 8000);
        let head = format!("{head}Content-Type: audio/x-wav\r\n");
        let mut expected = (head.len() as u16).to_be_bytes().to_vec();
        expected.extend_from_slice(head.as_bytes());
        expected.extend_from_slice(&wav_header(8000));
        assert_eq!(w, expected);

        let head = format!("Path: audio\r\nX-RequestId: {RID}\r\nX-Timestamp: {TS}\r\n");
        let mut expected = (head.len() as u16).to_be_bytes().to_vec();
        expected.extend_from_slice(head.as_bytes());
        assert_eq!(end_of_stream_message(RID, TS), expected);
    }

    /// A service message as the service writes it (from the documentation).
    fn svc(path: &str, body: &str) -> String {
        format!(
            "X-RequestId: {RID}\r\nContent-Type: application/json; charset=utf-8\r\nPath: {path}\r\n\r\n{body}"
        )
    }

    #[test]
    fn service_messages_from_the_doc() {
        use ServiceMessage as M;
        assert_eq!(
            parse_service_message(&svc(
                "turn.start",
                r#"{"context":{"serviceTag":"7B33613B91714B32817815DC89633AFA"}}"#
            )),
            Ok(M::TurnStart)
        );
        assert_eq!(
            parse_service_message(&svc("speech.startDetected", r#"{"Offset":100000}"#)),
            Ok(M::SpeechStartDetected { offset: 100_000 })
        );
        assert_eq!(
            parse_service_message(&svc(
                "speech.hypothesis",
                r#"{"Text":"apa khabar","Offset":5000000,"Duration":8400000,"Id":"abc"}"#
            )),
            Ok(M::Hypothesis {
                text: "apa khabar".into(),
                offset: 5_000_000,
                duration: 8_400_000,
                language: None
            })
        );
        assert_eq!(
            parse_service_message(&svc(
                "speech.fragment",
                r#"{"Text":"apa","Offset":"5000000","Duration":"1"}"#
            )),
            Ok(M::Hypothesis {
                text: "apa".into(),
                offset: 5_000_000,
                duration: 1,
                language: None
            })
        );
        assert_eq!(
            parse_service_message(&svc(
                "speech.phrase",
                r#"{"RecognitionStatus":"Success","DisplayText":"Apa khabar?","Offset":5000000,"Duration":12300000,"Channel":0}"#
            )),
            Ok(M::Phrase {
                status: RecognitionStatus::Success,
                display_text: Some("Apa khabar?".into()),
                offset: 5_000_000,
                duration: 12_300_000,
                language: None
            })
        );
        assert_eq!(
            parse_service_message(&svc(
                "speech.phrase",
                r#"{"RecognitionStatus":"Success","DisplayText":"x","Offset":"1236645672289","Duration":"1236645672289"}"#
            )),
            Ok(M::Phrase {
                status: RecognitionStatus::Success,
                display_text: Some("x".into()),
                offset: 1_236_645_672_289,
                duration: 1_236_645_672_289,
                language: None
            })
        );
        assert_eq!(
            parse_service_message(&svc(
                "speech.phrase",
                r#"{"RecognitionStatus":"EndOfDictation","Offset":43000000,"Duration":0}"#
            )),
            Ok(M::Phrase {
                status: RecognitionStatus::EndOfDictation,
                display_text: None,
                offset: 43_000_000,
                duration: 0,
                language: None
            })
        );
        assert_eq!(
            parse_service_message(&svc(
                "speech.phrase",
                r#"{"RecognitionStatus":"Success","Offset":1,"Duration":2,"NBest":[{"Confidence":0.9,"Display":"Hai."}]}"#
            )),
            Ok(M::Phrase {
                status: RecognitionStatus::Success,
                display_text: Some("Hai.".into()),
                offset: 1,
                duration: 2,
                language: None
            })
        );
        assert_eq!(
            parse_service_message(&svc("speech.endDetected", r#"{"Offset":43000000}"#)),
            Ok(M::SpeechEndDetected)
        );
        assert_eq!(
            parse_service_message(&svc("speech.endDetected", "")),
            Ok(M::SpeechEndDetected)
        );
        assert_eq!(parse_service_message(&svc("turn.end", "")), Ok(M::TurnEnd));
        assert_eq!(
            parse_service_message(&svc("turn.end", "{}")),
            Ok(M::TurnEnd)
        );
        assert_eq!(
            parse_service_message(&svc("speech.keyword", "{}")),
            Ok(M::Unknown {
                path: "speech.keyword".into()
            })
        );
        // Header order and case do not matter; headers-only frame without blank line.
        assert_eq!(
            parse_service_message("content-type: application/json\r\npath:turn.end\r\n"),
            Ok(M::TurnEnd)
        );
    }

    #[test]
    fn service_messages_malformed() {
        assert!(matches!(
            parse_service_message(&svc("speech.phrase", "{not json")),
            Err(ProtocolError::BadBody { .. })
        ));
        assert!(matches!(
            parse_service_message(&svc("speech.phrase", r#"{"DisplayText":"x"}"#)),
            Err(ProtocolError::BadBody { .. })
        ));
        assert!(matches!(
            parse_service_message(&svc("speech.hypothesis", r#"{"Offset":1}"#)),
            Err(ProtocolError::BadBody { .. })
        ));
        assert_eq!(
            parse_service_message("Content-Type: application/json\r\n\r\n{}"),
            Err(ProtocolError::MissingHeader("Path"))
        );
        assert_eq!(
            parse_service_message("Path turn.end\r\n\r\n"),
            Err(ProtocolError::MissingHeader("Path"))
        );
        // Bad offsets degrade to 0 rather than failing the message.
        assert_eq!(
            parse_service_message(&svc("speech.startDetected", r#"{"Offset":"soon"}"#)),
            Ok(ServiceMessage::SpeechStartDetected { offset: 0 })
        );
    }

    #[test]
    fn frames_of_other_turns() {
        let m = svc("turn.end", "");
        assert!(is_for_turn(&m, RID));
        assert!(is_for_turn(&m, &RID.to_ascii_lowercase()));
        assert!(!is_for_turn(&m, "0123456789ABCDEF0123456789ABCDEF"));
        assert!(is_for_turn("Path: turn.end\r\n\r\n", RID));
    }

    #[test]
    fn header_quirks_the_sdk_tolerates() {
        // No blank line at all: everything is headers, the body is empty.
        assert_eq!(
            parse_service_message(&format!("X-RequestId: {RID}\r\nPath: turn.end")),
            Ok(ServiceMessage::TurnEnd)
        );
        // A header line without a colon is kept as a name with an empty value.
        let (h, body) =
            parse_text_frame("Path: speech.endDetected\r\nX-Odd-Line\r\n:novalue\r\n\r\n{}")
                .unwrap();
        assert_eq!(h.get("X-Odd-Line"), Some(""));
        assert_eq!(h.get(":novalue"), Some(""));
        assert_eq!(body, "{}");
        assert_eq!(
            parse_service_message("Path: speech.endDetected\r\nX-Odd-Line\r\n\r\n"),
            Ok(ServiceMessage::SpeechEndDetected)
        );
    }

    #[test]
    fn recognition_status_as_number_or_name() {
        let status = |v: &str| match parse_service_message(&svc(
            "speech.phrase",
            &format!(r#"{{"RecognitionStatus":{v},"Offset":0,"Duration":0}}"#),
        )) {
            Ok(ServiceMessage::Phrase { status, .. }) => status,
            other => panic!("{other:?}"),
        };
        for (n, name) in [
            "Success",
            "NoMatch",
            "InitialSilenceTimeout",
            "BabbleTimeout",
            "Error",
            "EndOfDictation",
            "TooManyRequests",
            "BadRequest",
            "Forbidden",
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(status(&n.to_string()), status(&format!("{name:?}")));
            assert_eq!(status(&n.to_string()).as_str(), *name);
        }
        assert_eq!(status("42"), RecognitionStatus::Other("42".into()));
        assert_eq!(
            status(r#""Unheard""#),
            RecognitionStatus::Other("Unheard".into())
        );
        assert!(matches!(
            parse_service_message(&svc("speech.phrase", r#"{"RecognitionStatus":null}"#)),
            Err(ProtocolError::BadBody { .. })
        ));
    }

    #[test]
    fn tick_conversions() {
        assert_eq!(samples_to_ticks(8000, 8000), TICKS_PER_SECOND);
        assert_eq!(samples_to_ticks(160, 16000), 100_000);
        assert_eq!(ticks_to_samples(TICKS_PER_SECOND, 8000), 8000);
        assert_eq!(ticks_to_samples(5_000_000, 16000), 8000);
        assert_eq!(samples_to_ticks(1, 0), 0);
    }
}
