//! The ElevenLabs message bodies, sans-IO: what the client sends on the websocket and in an
//! HTTP request, and how it reads the service's websocket messages and error bodies.
//!
//! Only the client uses these; the fake in `crate::sandbox::elevenlabs` has its own reader
//! and writer, so a misreading here is not mirrored there.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::providers::tts::TtsError;

/// A shorter schedule than the default `[120,160,250,290]`: we send clause by clause and
/// want the first audio early.
pub(super) const CHUNK_LENGTH_SCHEDULE: [usize; 4] = [50, 90, 120, 150];

/// Voice settings of every request (the service's defaults, spelt out).
fn voice_settings() -> Value {
    json!({"stability": 0.5, "similarity_boost": 0.8, "speed": 1.0})
}

/// The websocket initialise message: a single space, voice settings and our chunk schedule.
/// No key: it went in the `xi-api-key` upgrade header, and a body can end up in a log.
pub(super) fn init_message() -> String {
    json!({
        "text": " ",
        "voice_settings": voice_settings(),
        "generation_config": {"chunk_length_schedule": CHUNK_LENGTH_SCHEDULE},
    })
    .to_string()
}

/// A clause; `try_trigger_generation` asks for audio without waiting for the schedule.
pub(super) fn text_message(text: &str) -> String {
    json!({"text": text, "try_trigger_generation": true}).to_string()
}

/// Forces generation of everything buffered; the socket stays open. Never an empty `text`
/// (that would close the socket).
pub(super) fn flush_message(text: Option<&str>) -> String {
    json!({"text": text.unwrap_or(" "), "flush": true}).to_string()
}

/// Generates the rest, then the server sends `isFinal` and closes.
pub(super) fn close_message() -> String {
    json!({"text": ""}).to_string()
}

/// Keeps an idle socket open (the service closes after 20 s without text).
pub(super) fn keepalive_message() -> String {
    json!({"text": " "}).to_string()
}

/// One server message, decoded.
#[derive(Debug, PartialEq)]
pub(super) enum ServerEvent {
    /// Audio bytes in the output format, and whether this was also the final message.
    Audio { bytes: Vec<u8>, is_final: bool },
    /// `{"isFinal":true}` without audio.
    Final,
    /// Nothing for us (e.g. an alignment-only message).
    Other,
    /// `{"error":..,"message":..,"code":..}` or a message we cannot read.
    Error(String),
}

#[derive(Deserialize)]
struct RawServerMessage {
    #[serde(default)]
    audio: Option<String>,
    #[serde(default, rename = "isFinal", alias = "is_final")]
    is_final: Option<bool>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

pub(super) fn parse_server_message(text: &str) -> ServerEvent {
    let raw: RawServerMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => return ServerEvent::Error(format!("unreadable message from ElevenLabs: {e}")),
    };
    if raw.error.as_ref().is_some_and(|e| !e.is_null()) {
        let kind = match &raw.error {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let mut msg = format!("ElevenLabs error {kind}");
        if let Some(m) = raw.message {
            msg.push_str(": ");
            msg.push_str(&m);
        }
        if let Some(code) = raw.code.filter(|c| !c.is_null()) {
            msg.push_str(&format!(" (code {code})"));
        }
        return ServerEvent::Error(msg);
    }
    let is_final = raw.is_final == Some(true);
    match raw.audio.filter(|a| !a.is_empty()) {
        Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()) {
            Ok(bytes) => ServerEvent::Audio { bytes, is_final },
            Err(e) => ServerEvent::Error(format!("bad base64 audio from ElevenLabs: {e}")),
        },
        None if is_final => ServerEvent::Final,
        None => ServerEvent::Other,
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    detail: ErrorDetail,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorDetail {
    Object {
        #[serde(default)]
        status: Option<String>,
        #[serde(default)]
        message: Option<String>,
    },
    Validation(Vec<ValidationItem>),
    Text(String),
}

#[derive(Deserialize)]
struct ValidationItem {
    #[serde(default)]
    loc: Vec<serde_json::Value>,
    #[serde(default)]
    msg: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// An error response: `{"detail":{"status","message"}}`, the 422 array form, or anything.
pub(super) fn parse_error_body(status: u16, body: &[u8]) -> TtsError {
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody {
            detail:
                ErrorDetail::Object {
                    status: code,
                    message,
                },
        }) => match (code, message) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c,
            (None, Some(m)) => m,
            (None, None) => "no detail".to_owned(),
        },
        Ok(ErrorBody {
            detail: ErrorDetail::Validation(items),
        }) => items
            .iter()
            .map(|i| {
                let loc: Vec<String> = i
                    .loc
                    .iter()
                    .map(|l| l.as_str().map_or_else(|| l.to_string(), str::to_owned))
                    .collect();
                match &i.kind {
                    Some(k) => format!("{}: {} ({k})", loc.join("."), i.msg),
                    None => format!("{}: {}", loc.join("."), i.msg),
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        Ok(ErrorBody {
            detail: ErrorDetail::Text(t),
        }) => t,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let t = text.trim();
            if t.is_empty() {
                "no body".to_owned()
            } else {
                t.chars().take(300).collect()
            }
        }
    };
    TtsError::Status { status, message }
}

/// The JSON body of an HTTP `/stream` request.
pub(super) fn http_request_body(text: &str, model_id: &str, language_code: Option<&str>) -> Value {
    let mut body = json!({
        "text": text,
        "model_id": model_id,
        "voice_settings": voice_settings(),
    });
    if let (Some(lang), Some(obj)) = (language_code, body.as_object_mut()) {
        obj.insert("language_code".into(), json!(lang));
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_exactly_the_documented_ones() {
        let init: serde_json::Value = serde_json::from_str(&init_message()).unwrap();
        assert_eq!(
            init,
            json!({"text":" ","voice_settings":{"stability":0.5,"similarity_boost":0.8,"speed":1.0},
                   "generation_config":{"chunk_length_schedule":[50,90,120,150]}})
        );
        assert_eq!(
            text_message("Ya. "),
            r#"{"text":"Ya. ","try_trigger_generation":true}"#
        );
        let flush: serde_json::Value = serde_json::from_str(&flush_message(None)).unwrap();
        assert_eq!(flush, json!({"text":" ","flush":true}));
        let flush: serde_json::Value = serde_json::from_str(&flush_message(Some("pagi "))).unwrap();
        assert_eq!(flush, json!({"text":"pagi ","flush":true}));
        assert_eq!(close_message(), r#"{"text":""}"#);
        assert_eq!(keepalive_message(), r#"{"text":" "}"#);
    }

    #[test]
    fn server_messages_parse() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([1u8, 2, 3]);
        let full = format!(
            r#"{{"audio":"{b64}","isFinal":null,"normalizedAlignment":{{"chars":["H"],"charStartTimesMs":[0],"charsDurationsMs":[3]}},"alignment":null}}"#
        );
        assert_eq!(
            parse_server_message(&full),
            ServerEvent::Audio {
                bytes: vec![1, 2, 3],
                is_final: false
            }
        );
        assert_eq!(
            parse_server_message(&format!(r#"{{"audio":"{b64}"}}"#)),
            ServerEvent::Audio {
                bytes: vec![1, 2, 3],
                is_final: false
            }
        );
        assert_eq!(
            parse_server_message(r#"{"isFinal":true}"#),
            ServerEvent::Final
        );
        assert_eq!(
            parse_server_message(r#"{"audio":null,"isFinal":true,"alignment":null}"#),
            ServerEvent::Final
        );
        assert_eq!(
            parse_server_message(r#"{"audio":"","is_final":true}"#),
            ServerEvent::Final
        );
        assert_eq!(
            parse_server_message(r#"{"audio":null,"isFinal":null}"#),
            ServerEvent::Other
        );
        let ServerEvent::Error(e) = parse_server_message(
            r#"{"message":"Have not received a new text input within the timeout of 20 seconds.","error":"input_timeout_exceeded","code":1008}"#,
        ) else {
            panic!("not an error")
        };
        assert!(
            e.contains("input_timeout_exceeded") && e.contains("20 seconds") && e.contains("1008"),
            "{e}"
        );
        assert!(matches!(
            parse_server_message("not json"),
            ServerEvent::Error(_)
        ));
        assert!(matches!(
            parse_server_message(r#"{"audio":"!!!"}"#),
            ServerEvent::Error(_)
        ));
    }

    #[test]
    fn error_bodies_parse_in_both_shapes() {
        let body = br#"{"detail":{"status":"quota_exceeded","message":"This request exceeds your quota of 10000."}}"#;
        let TtsError::Status { status, message } = parse_error_body(401, body) else {
            panic!()
        };
        assert_eq!(status, 401);
        assert_eq!(
            message,
            "quota_exceeded: This request exceeds your quota of 10000."
        );
        let body =
            br#"{"detail":[{"loc":["body","text"],"msg":"Field required","type":"missing"}]}"#;
        let TtsError::Status { status, message } = parse_error_body(422, body) else {
            panic!()
        };
        assert_eq!(
            (status, message.as_str()),
            (422, "body.text: Field required (missing)")
        );
        let TtsError::Status { message, .. } = parse_error_body(502, b"<html>Bad gateway</html>")
        else {
            panic!()
        };
        assert_eq!(message, "<html>Bad gateway</html>");
        let TtsError::Status { message, .. } = parse_error_body(500, b"") else {
            panic!()
        };
        assert_eq!(message, "no body");
    }

    #[test]
    fn http_body_has_language_only_when_given() {
        assert_eq!(
            http_request_body("Ya.", "m", Some("ms")),
            json!({"text":"Ya.","model_id":"m","language_code":"ms",
                   "voice_settings":{"stability":0.5,"similarity_boost":0.8,"speed":1.0}})
        );
        assert!(
            http_request_body("Ya.", "m", None)
                .get("language_code")
                .is_none()
        );
    }
}
