//! The fake Azure service's own reading and writing of the Speech SDK websocket protocol.
//!
//! Written apart from the client's `crate::providers::stt::protocol` on purpose: a fake that
//! parsed with the client's code would accept whatever the client gets wrong. This side reads
//! what a client sends the way the service does (headers in any case and order, text frames
//! with a blank line, binary frames with a big-endian header length, a RIFF header opening
//! the audio) and writes what the service sends. Reference: `docs/providers/azure-stt.md`.

/// The service refuses header blocks longer than this.
pub(crate) const HEADER_LIMIT: usize = 8192;

/// Why a client frame was refused; each maps to the close code the service uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Framing or a required header is wrong: close 1002.
    Protocol(String),
    /// The header block is over [`HEADER_LIMIT`]: close 1009.
    TooBig(usize),
}

impl Refusal {
    fn protocol(why: impl Into<String>) -> Self {
        Self::Protocol(why.into())
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Protocol(why) => f.write_str(why),
            Self::TooBig(n) => write!(f, "header block of {n} bytes is over {HEADER_LIMIT}"),
        }
    }
}

/// A client message as the service reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Received {
    /// `Path`, as sent (compare case-insensitively).
    pub(crate) path: String,
    /// `X-RequestId`: 32 hex digits. Absent only on `speech.config`: the Python SDK sends
    /// none there and the service accepts that.
    pub(crate) request_id: Option<String>,
    /// Every header line, names as sent, in order (for the recording hook).
    pub(crate) headers: Vec<(String, String)>,
    /// Whether it came in a binary frame.
    pub(crate) binary: bool,
    /// Whether a binary frame's headers ended with a blank line (the JavaScript SDK's do not).
    pub(crate) blank_line: bool,
    /// JSON text or audio bytes.
    pub(crate) body: Vec<u8>,
}

/// `(name, value)` pairs of a header block; lines are split on LF with an optional CR.
fn header_lines(block: &str) -> Result<Vec<(String, String)>, Refusal> {
    let mut out = Vec::new();
    for raw in block.lines() {
        if raw.trim().is_empty() {
            continue;
        }
        let Some(colon) = raw.find(':') else {
            return Err(Refusal::protocol(format!(
                "header line without a colon: {raw:?}"
            )));
        };
        let name = raw[..colon].trim();
        if name.is_empty() {
            return Err(Refusal::protocol(format!(
                "header line without a name: {raw:?}"
            )));
        }
        out.push((name.to_owned(), raw[colon + 1..].trim().to_owned()));
    }
    Ok(out)
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads a text frame: headers, a blank line (CRLF CRLF, or LF LF), the body. A frame that
/// is all headers may end with its last line break instead.
pub(crate) fn read_text(frame: &str) -> Result<Received, Refusal> {
    let split = ["\r\n\r\n", "\n\n"]
        .iter()
        .filter_map(|sep| frame.find(sep).map(|at| (at, at + sep.len())))
        .min_by_key(|(at, _)| *at);
    let (head, body) = match split {
        Some((end, body_at)) => (&frame[..end], &frame[body_at..]),
        None if frame.ends_with('\n') => (frame, ""),
        None => return Err(Refusal::protocol("text frame without a blank line")),
    };
    if head.len() > HEADER_LIMIT {
        return Err(Refusal::TooBig(head.len()));
    }
    received(&header_lines(head)?, false, body.as_bytes())
}

/// Reads a binary frame: a 2-byte big-endian length, that many bytes of headers, payload.
pub(crate) fn read_binary(frame: &[u8]) -> Result<Received, Refusal> {
    let [hi, lo, rest @ ..] = frame else {
        return Err(Refusal::protocol(
            "binary frame shorter than its length prefix",
        ));
    };
    let len = usize::from(*hi) << 8 | usize::from(*lo);
    if len > HEADER_LIMIT {
        return Err(Refusal::TooBig(len));
    }
    if rest.len() < len {
        return Err(Refusal::protocol(
            "binary frame shorter than its header length",
        ));
    }
    let (head, payload) = rest.split_at(len);
    let head = std::str::from_utf8(head)
        .map_err(|_| Refusal::protocol("binary frame headers are not UTF-8"))?;
    let mut m = received(&header_lines(head)?, true, payload)?;
    m.blank_line = head.ends_with("\r\n\r\n") || head.ends_with("\n\n");
    Ok(m)
}

fn received(headers: &[(String, String)], binary: bool, body: &[u8]) -> Result<Received, Refusal> {
    let path = find(headers, "path")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| Refusal::protocol("missing Path header"))?;
    let request_id = find(headers, "x-requestid");
    if request_id.is_none() && !path.eq_ignore_ascii_case("speech.config") {
        return Err(Refusal::protocol("missing X-RequestId"));
    }
    if let Some(id) = request_id {
        let hex32 = id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit());
        if !hex32 {
            return Err(Refusal::protocol(format!(
                "X-RequestId {id:?} is not 32 hex digits"
            )));
        }
    }
    Ok(Received {
        path: path.to_owned(),
        request_id: request_id.map(str::to_owned),
        headers: headers.to_vec(),
        binary,
        blank_line: false,
        body: body.to_vec(),
    })
}

/// What a RIFF/WAVE header at the start of the audio declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Declared {
    /// 1 = PCM.
    pub(crate) format_tag: u16,
    /// Channels.
    pub(crate) channels: u16,
    /// Samples per second.
    pub(crate) sample_rate: u32,
    /// Bits per sample.
    pub(crate) bits: u16,
    /// Where the samples start (just past the `data` chunk header).
    pub(crate) data_at: usize,
}

/// Walks the RIFF chunks up to `data`, reading `fmt ` on the way.
pub(crate) fn read_wav_header(b: &[u8]) -> Result<Declared, String> {
    let le16 = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
    };
    let le32 = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    if !b.starts_with(b"RIFF") || b.get(8..12) != Some(&b"WAVE"[..]) {
        return Err("audio does not start with a RIFF/WAVE header".into());
    }
    let mut fmt: Option<(u16, u16, u32, u16)> = None;
    let mut chunk = 12usize;
    while let Some(id) = b.get(chunk..chunk + 4) {
        let size = le32(chunk + 4).ok_or("WAV chunk header cut short")? as usize;
        let body = chunk + 8;
        match id {
            b"data" => {
                let (format_tag, channels, sample_rate, bits) =
                    fmt.ok_or("WAV data chunk before its fmt chunk")?;
                return Ok(Declared {
                    format_tag,
                    channels,
                    sample_rate,
                    bits,
                    data_at: body,
                });
            }
            b"fmt " => {
                let short = || "WAV fmt chunk cut short".to_owned();
                fmt = Some((
                    le16(body).ok_or_else(short)?,
                    le16(body + 2).ok_or_else(short)?,
                    le32(body + 4).ok_or_else(short)?,
                    le16(body + 14).ok_or_else(short)?,
                ));
            }
            _ => {}
        }
        // Chunks are padded to an even length.
        chunk = size
            .checked_add(size % 2)
            .and_then(|s| s.checked_add(body))
            .ok_or("WAV chunk size overflows")?;
    }
    Err("WAV header without a data chunk".into())
}

/// A service message: the request id it answers, content type, `Path`, blank line, body.
pub(crate) fn service_text(path: &str, request_id: &str, body: &str) -> String {
    let mut s = String::with_capacity(120 + body.len());
    s.push_str("X-RequestId: ");
    s.push_str(request_id);
    s.push_str("\r\nContent-Type: application/json; charset=utf-8\r\nPath: ");
    s.push_str(path);
    s.push_str("\r\n\r\n");
    s.push_str(body);
    s
}

/// A fresh id in the service's style (32 upper-case hex digits), e.g. for `serviceTag`.
pub(crate) fn fresh_id() -> String {
    format!("{:032X}", uuid::Uuid::new_v4().as_u128())
}

/// Audio position in the service's unit, 100 ns ticks, for `samples` at `rate` Hz.
pub(crate) fn ticks(samples: u64, rate: u32) -> u64 {
    if rate == 0 {
        return 0;
    }
    let ticks = u128::from(samples) * 10_000_000 / u128::from(rate);
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RID: &str = "0123456789abcdef0123456789ABCDEF";

    fn binary(head: &str, payload: &[u8]) -> Vec<u8> {
        let mut f = u16::try_from(head.len()).unwrap().to_be_bytes().to_vec();
        f.extend_from_slice(head.as_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn text_frames_in_every_spelling() {
        for frame in [
            format!(
                "Path: speech.config\r\nX-RequestId: {RID}\r\nContent-Type: application/json\r\n\r\n{{}}"
            ),
            format!("x-requestid:{RID}\npath:speech.config\n\n{{}}"),
        ] {
            let m = read_text(&frame).unwrap();
            assert_eq!(
                (m.path.as_str(), m.request_id.as_deref(), m.binary),
                ("speech.config", Some(RID), false)
            );
            assert_eq!(m.body, b"{}");
        }
        let m = read_text(&format!("Path: telemetry\r\nX-RequestId: {RID}\r\n")).unwrap();
        assert!(m.body.is_empty());
        assert_eq!(m.headers[0], ("Path".to_owned(), "telemetry".to_owned()));
        // The Python SDK sends speech.config without a request id; the service accepts it.
        let m =
            read_text("Path: speech.config\r\nContent-Type: application/json\r\n\r\n{}").unwrap();
        assert_eq!(m.request_id, None);
        assert!(matches!(
            read_text("Path: speech.context\r\n\r\n{}"),
            Err(Refusal::Protocol(_))
        ));
        assert!(matches!(read_text("Path: x"), Err(Refusal::Protocol(_))));
        assert!(matches!(
            read_text(&format!("X-RequestId: {RID}\r\n\r\n")),
            Err(Refusal::Protocol(_))
        ));
        assert!(matches!(
            read_text("Path: a\r\nX-RequestId: 12\r\n\r\n"),
            Err(Refusal::Protocol(_))
        ));
        let long = format!("Path: a\r\nX-Junk: {}\r\n\r\n", "x".repeat(9000));
        assert!(matches!(read_text(&long), Err(Refusal::TooBig(_))));
    }

    #[test]
    fn binary_frames() {
        let m = read_binary(&binary(
            &format!("Path: audio\r\nX-RequestId: {RID}\r\n"),
            &[1, 2],
        ))
        .unwrap();
        assert_eq!(
            (m.path.as_str(), m.binary, m.body.as_slice()),
            ("audio", true, &[1u8, 2][..])
        );
        // No trailing line break, odd spacing.
        let m = read_binary(&binary(
            &format!("  Path  :  audio  \nX-RequestId:{RID}"),
            &[],
        ))
        .unwrap();
        assert_eq!(m.path, "audio");
        assert!(m.body.is_empty());
        assert!(matches!(read_binary(&[0]), Err(Refusal::Protocol(_))));
        assert!(matches!(
            read_binary(&[0, 9, b'P']),
            Err(Refusal::Protocol(_))
        ));
        assert_eq!(read_binary(&[0x30, 0]), Err(Refusal::TooBig(0x3000)));
        assert!(matches!(
            read_binary(&[0, 2, 0xff, 0xfe]),
            Err(Refusal::Protocol(_))
        ));
        assert!(matches!(
            read_binary(&binary("no colon here", &[])),
            Err(Refusal::Protocol(_))
        ));
    }

    /// A canonical 44-byte header, written out field by field.
    fn wav(rate: u32, tag: u16, bits: u16) -> Vec<u8> {
        let mut h = b"RIFF\0\0\0\0WAVEfmt ".to_vec();
        h.extend(16u32.to_le_bytes());
        h.extend(tag.to_le_bytes());
        h.extend(1u16.to_le_bytes());
        h.extend(rate.to_le_bytes());
        h.extend((rate * u32::from(bits) / 8).to_le_bytes());
        h.extend((bits / 8).to_le_bytes());
        h.extend(bits.to_le_bytes());
        h.extend(b"data\0\0\0\0");
        h
    }

    #[test]
    fn wav_headers() {
        let d = read_wav_header(&wav(8000, 1, 16)).unwrap();
        assert_eq!(
            d,
            Declared {
                format_tag: 1,
                channels: 1,
                sample_rate: 8000,
                bits: 16,
                data_at: 44
            }
        );
        // An extra chunk (odd size, padded) before data is skipped.
        let mut h = wav(16000, 1, 16);
        let data = h.split_off(36);
        h.extend(b"LIST\x03\0\0\0abc\0");
        h.extend(data);
        assert_eq!(read_wav_header(&h).unwrap().data_at, 56);
        assert!(read_wav_header(b"RIFX").is_err());
        assert!(read_wav_header(&wav(8000, 1, 16)[..30]).is_err());
        let mut h = wav(8000, 1, 16);
        h[12..16].copy_from_slice(b"junk");
        assert!(read_wav_header(&h).is_err(), "data before fmt");
    }

    #[test]
    fn service_messages_and_units() {
        assert_eq!(
            service_text("turn.end", RID, ""),
            format!(
                "X-RequestId: {RID}\r\nContent-Type: application/json; charset=utf-8\r\nPath: turn.end\r\n\r\n"
            )
        );
        let id = fresh_id();
        assert_eq!(id.len(), 32);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
        );
        assert_eq!(ticks(8000, 8000), 10_000_000);
        assert_eq!(ticks(160, 16000), 100_000);
        assert_eq!(ticks(1, 0), 0);
    }
}
