//! A sans-IO Server-Sent-Events parser (WHATWG "event stream interpretation").
//!
//! OpenRouter streams chat completions as SSE. Network reads split the byte stream at
//! arbitrary points (inside a line, inside a `\r\n`, inside a multi-byte UTF-8 character), so
//! the parser buffers raw bytes and only decodes complete lines. It never grows without
//! bound: a line or an event larger than the configured limit is an error.

use std::collections::VecDeque;

/// The default cap on one line and on one event's data: 1 MiB.
pub const DEFAULT_MAX_SIZE: usize = 1 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if the event had one.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last event id seen on the stream (it persists across events, per the spec).
    pub id: Option<String>,
}

/// Why the stream cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line or an event's data exceeded the size limit.
    #[error("SSE line or event larger than {0} bytes")]
    TooLarge(usize),
}

/// An incremental SSE parser: feed bytes with [`SseParser::push`], take events with
/// [`SseParser::next_event`].
#[derive(Debug)]
pub struct SseParser {
    max_size: usize,
    /// Bytes of the line being received (no terminator).
    line: Vec<u8>,
    /// The previous push ended in `\r`: a leading `\n` in the next push belongs to it.
    after_cr: bool,
    /// No line completed yet, so a leading byte-order mark must be stripped.
    at_start: bool,
    data: String,
    has_data: bool,
    event_type: Option<String>,
    last_id: Option<String>,
    ready: VecDeque<SseEvent>,
    failed: Option<SseError>,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// A parser with the default 1 MiB limit.
    pub fn new() -> Self {
        Self::with_max_size(DEFAULT_MAX_SIZE)
    }

    /// A parser whose lines and events may not exceed `max_size` bytes.
    pub fn with_max_size(max_size: usize) -> Self {
        Self {
            max_size,
            line: Vec::new(),
            after_cr: false,
            at_start: true,
            data: String::new(),
            has_data: false,
            event_type: None,
            last_id: None,
            ready: VecDeque::new(),
            failed: None,
        }
    }

    /// Feeds the next bytes of the stream. Complete events become available from
    /// [`SseParser::next_event`]. After an error the parser stays failed.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<(), SseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if bytes.first() == Some(&b'\n') {
                bytes = bytes.get(1..).unwrap_or_default();
            }
        }
        while let Some(pos) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, rest) = bytes.split_at(pos);
            self.extend_line(head)?;
            let line = std::mem::take(&mut self.line);
            self.process_line(&line)?;
            self.line = line;
            self.line.clear();
            // `rest` starts with the terminator.
            let is_cr = rest.first() == Some(&b'\r');
            bytes = rest.get(1..).unwrap_or_default();
            if is_cr {
                match bytes.first() {
                    Some(b'\n') => bytes = bytes.get(1..).unwrap_or_default(),
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.extend_line(bytes)
    }

    /// The next complete event, if any.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len() + bytes.len() > self.max_size {
            return Err(self.fail());
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn fail(&mut self) -> SseError {
        let e = SseError::TooLarge(self.max_size);
        self.failed = Some(e.clone());
        self.line = Vec::new();
        self.data = String::new();
        e
    }

    fn process_line(&mut self, raw: &[u8]) -> Result<(), SseError> {
        let mut raw = raw;
        if self.at_start {
            self.at_start = false;
            raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
        }
        if raw.is_empty() {
            self.dispatch();
            return Ok(());
        }
        if raw.first() == Some(&b':') {
            return Ok(());
        }
        let line = String::from_utf8_lossy(raw);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event_type = Some(value.to_owned()),
            "data" => {
                if self.data.len() + value.len() + 1 > self.max_size {
                    return Err(self.fail());
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            // `retry` only matters to a client that reconnects an event stream; ours never does.
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self) {
        let event_type = self.event_type.take().filter(|t| !t.is_empty());
        if !self.has_data {
            return;
        }
        self.has_data = false;
        self.ready.push_back(SseEvent {
            event: event_type,
            data: std::mem::take(&mut self.data),
            id: self.last_id.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c).unwrap();
            while let Some(e) = p.next_event() {
                out.push(e);
            }
        }
        out
    }

    fn data(d: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: d.to_owned(),
            id: None,
        }
    }

    #[test]
    fn openrouter_stream_with_comments() {
        let s = b": OPENROUTER PROCESSING\n\n: OPENROUTER PROCESSING\n\ndata: {\"a\":1}\n\n: OPENROUTER PROCESSING\n\ndata: [DONE]\n\n";
        assert_eq!(parse_all(&[s]), vec![data("{\"a\":1}"), data("[DONE]")]);
    }

    #[test]
    fn line_endings_and_multiline_data() {
        let s = b"data: a\r\ndata:b\rdata:  c\n\r\nevent: x\nid: 7\ndata\n\n";
        let evs = parse_all(&[s]);
        assert_eq!(evs[0], data("a\nb\n c"));
        assert_eq!(
            evs[1],
            SseEvent {
                event: Some("x".into()),
                data: String::new(),
                id: Some("7".into())
            }
        );
        assert_eq!(evs.len(), 2);
    }

    #[test]
    fn crlf_split_across_pushes_is_one_terminator() {
        // If the `\n` after a pushed-final `\r` counted as a second line end, the blank line
        // would dispatch "a" alone.
        let evs = parse_all(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(evs, vec![data("a\nb")]);
    }

    #[test]
    fn utf8_split_inside_a_character() {
        let s = "data: selamat pagi, apa khabar? \u{1F600} é\n\n".as_bytes();
        let mid = s.len() - 6; // inside the 4-byte emoji or the 2-byte é
        for cut in [mid, mid + 1, mid + 2, s.len() - 3] {
            let evs = parse_all(&[&s[..cut], &s[cut..]]);
            assert_eq!(evs, vec![data("selamat pagi, apa khabar? \u{1F600} é")]);
        }
    }

    #[test]
    fn blank_lines_without_data_dispatch_nothing_and_reset_event_type() {
        let evs = parse_all(&[b"\n\nevent: ping\n\ndata: x\n\n"]);
        assert_eq!(evs, vec![data("x")]);
    }

    #[test]
    fn unknown_fields_bom_and_id_persistence() {
        let evs = parse_all(&[
            b"\xEF\xBB\xBFid: 1\nfoo: bar\nretry: 250\ndata: a\n\ndata: b\n\nid\ndata: c\n\n",
        ]);
        let ids: Vec<_> = evs.iter().map(|e| e.id.clone()).collect();
        assert_eq!(
            ids,
            vec![Some("1".into()), Some("1".into()), Some(String::new())]
        );
        assert_eq!(evs[0].data, "a");
    }

    #[test]
    fn retry_field_is_ignored() {
        let mut p = SseParser::new();
        p.push(b"retry: 250\nretry: x1\ndata: a\n\n").unwrap();
        assert_eq!(p.next_event().map(|e| e.data), Some("a".into()));
        assert_eq!(p.next_event(), None);
    }

    #[test]
    fn unterminated_event_is_not_dispatched() {
        let mut p = SseParser::new();
        p.push(b"data: partial\n").unwrap();
        assert_eq!(p.next_event(), None);
    }

    #[test]
    fn oversized_line_is_an_error_and_sticks() {
        let mut p = SseParser::with_max_size(16);
        p.push(b"data: 0123456").unwrap();
        assert_eq!(p.push(b"789abcdef"), Err(SseError::TooLarge(16)));
        assert_eq!(p.push(b"\n\n"), Err(SseError::TooLarge(16)));
    }

    #[test]
    fn oversized_event_from_many_lines_is_an_error() {
        let mut p = SseParser::with_max_size(16);
        let r = p.push(b"data: 01234\ndata: 56789\ndata: abcde\n");
        assert_eq!(r, Err(SseError::TooLarge(16)));
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let evs = parse_all(&[b"data: a\xFFb\n\n"]);
        assert_eq!(evs, vec![data("a\u{FFFD}b")]);
    }

    /// Renders events with a mix of terminators and keep-alive comments.
    fn render(events: &[(Option<String>, Vec<String>)], eols: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        let mut eol = |out: &mut Vec<u8>| {
            let mut e: &[u8] = match eols.get(i % eols.len().max(1)).copied().unwrap_or(0) % 3 {
                0 => b"\n",
                1 => b"\r\n",
                _ => b"\r",
            };
            // After a bare `\r`, an empty line ended by `\n` would merge into one `\r\n`.
            if out.last() == Some(&b'\r') && e == b"\n" {
                e = b"\r\n";
            }
            i += 1;
            out.extend_from_slice(e);
        };
        for (event, lines) in events {
            out.extend_from_slice(b": OPENROUTER PROCESSING");
            eol(&mut out);
            if let Some(t) = event {
                out.extend_from_slice(format!("event: {t}").as_bytes());
                eol(&mut out);
            }
            for l in lines {
                out.extend_from_slice(format!("data: {l}").as_bytes());
                eol(&mut out);
            }
            eol(&mut out);
        }
        out
    }

    proptest! {
        #[test]
        fn any_split_yields_the_same_events(
            events in proptest::collection::vec(
                (proptest::option::of("[a-z]{1,8}"),
                 proptest::collection::vec("[^\r\n]{0,12}", 1..4)),
                0..8),
            eols in proptest::collection::vec(any::<u8>(), 1..16),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let bytes = render(&events, &eols);
            let whole = parse_all(&[&bytes]);
            let expected: Vec<SseEvent> = events.iter().map(|(t, lines)| SseEvent {
                event: t.clone(),
                data: lines.join("\n"),
                id: None,
            }).collect();
            prop_assert_eq!(&whole, &expected);

            let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut prev = 0;
            for p in points {
                chunks.push(&bytes[prev..p]);
                prev = p;
            }
            chunks.push(&bytes[prev..]);
            prop_assert_eq!(parse_all(&chunks), expected);
        }
    }
}
