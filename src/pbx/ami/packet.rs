//! The AMI wire format, sans I/O: a parser fed bytes that yields the banner and then whole
//! packets, and the encoder for actions.
//!
//! After the one-line banner (`Asterisk Call Manager/9.0.0`), everything is a *packet*:
//! `Key: Value` lines ended by CRLF, the packet ended by an empty line. Keys repeat
//! (`Variable:` once per channel variable in a `Status` event), so a packet keeps its lines
//! in order rather than in a map. Old Asterisk answers `Command` with `Response: Follows`
//! and raw output lines up to `--END COMMAND--`, which may contain empty lines; the parser
//! reads those to the marker. Bare `\n` line ends are accepted too.
//!
//! Nothing here waits or allocates without bound: a packet or banner longer than the
//! configured limit is an error (the connection is then dropped and re-made).

use std::fmt;

/// The start of the line Asterisk sends first on every manager connection.
pub const BANNER_PREFIX: &str = "Asterisk Call Manager/";
/// The longest packet accepted by default (a `Status` with `AllVariables` of a busy channel
/// is a few kB; this leaves a wide margin).
pub const DEFAULT_MAX_PACKET: usize = 1 << 20;
const MAX_BANNER: usize = 1024;
const END_COMMAND: &str = "--END COMMAND--";

/// One AMI packet: a response, an event, or (sent) an action. Lines keep their order; keys
/// compare case-insensitively, as Asterisk does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packet {
    fields: Vec<(String, String)>,
}

impl Packet {
    /// A packet from its lines.
    pub fn from_fields(fields: Vec<(String, String)>) -> Self {
        Self { fields }
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, in order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// All lines in order.
    pub fn fields(&self) -> &[(String, String)] {
        &self.fields
    }

    /// `Response:` (`Success`, `Error`, `Follows`, `Goodbye`), if this is a response.
    pub fn response(&self) -> Option<&str> {
        self.get("Response")
    }

    /// `Event:`, if this is an event.
    pub fn event(&self) -> Option<&str> {
        self.get("Event")
    }

    /// `ActionID:`, which ties responses and list events to the action that asked.
    pub fn action_id(&self) -> Option<&str> {
        self.get("ActionID")
    }

    /// Whether the response says the action worked (`Success`, or `Follows` for command
    /// output).
    pub fn is_success(&self) -> bool {
        self.response()
            .is_some_and(|r| r.eq_ignore_ascii_case("Success") || r.eq_ignore_ascii_case("Follows"))
    }

    /// `Message:`, Asterisk's human-readable reason.
    pub fn message(&self) -> Option<&str> {
        self.get("Message")
    }

    /// Whether this response opens an event list (`EventList: start`, or the older
    /// `... will follow` message), so the action is complete only at its `...Complete` event.
    pub fn starts_list(&self) -> bool {
        self.get("EventList")
            .is_some_and(|v| v.eq_ignore_ascii_case("start"))
            || self
                .message()
                .is_some_and(|m| m.to_ascii_lowercase().contains("will follow"))
    }

    /// Whether this event closes an event list (`EventList: Complete`, or an event named
    /// `...Complete`).
    pub fn ends_list(&self) -> bool {
        self.get("EventList")
            .is_some_and(|v| v.eq_ignore_ascii_case("complete"))
            || self.event().is_some_and(|e| e.ends_with("Complete"))
    }
}

/// What the parser produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// The greeting line, e.g. `Asterisk Call Manager/9.0.0`.
    Banner(String),
    /// A whole packet.
    Packet(Packet),
}

/// The stream is not AMI, or breaks its limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The first line is not `Asterisk Call Manager/...` (wrong port, not Asterisk).
    #[error("not an Asterisk manager: first line {0:?}")]
    BadBanner(String),
    /// A packet grew past the limit without ending.
    #[error("AMI packet longer than {0} bytes")]
    TooLarge(usize),
}

/// Turns a byte stream from Asterisk into the banner and packets.
#[derive(Debug)]
pub struct Parser {
    buf: Vec<u8>,
    greeted: bool,
    max_packet: usize,
    /// Bytes of `buf` already checked for the end of the current packet.
    scanned: usize,
    /// The current packet is `Response: Follows` command output (ends at the marker).
    follows: Option<bool>,
    /// In a `Follows` packet, the marker has been seen; the next empty line ends it.
    marker_seen: bool,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PACKET)
    }
}

impl Parser {
    /// A parser expecting the banner first, accepting packets up to `max_packet` bytes.
    pub fn new(max_packet: usize) -> Self {
        Self {
            buf: Vec::new(),
            greeted: false,
            max_packet,
            scanned: 0,
            follows: None,
            marker_seen: false,
        }
    }

    /// A parser for a stream whose banner was already read elsewhere.
    pub fn after_banner(max_packet: usize) -> Self {
        Self {
            greeted: true,
            ..Self::new(max_packet)
        }
    }

    /// Appends bytes read from the connection.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next banner or whole packet, `None` until more bytes arrive.
    pub fn next_item(&mut self) -> Result<Option<Incoming>, ParseError> {
        if !self.greeted {
            let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
                if self.buf.len() > MAX_BANNER {
                    return Err(ParseError::BadBanner(lossy(&self.buf[..64])));
                }
                return Ok(None);
            };
            let line = trim_line(&self.buf[..end]);
            let line = lossy(line);
            self.buf.drain(..=end);
            if !line.starts_with(BANNER_PREFIX) {
                return Err(ParseError::BadBanner(line));
            }
            self.greeted = true;
            return Ok(Some(Incoming::Banner(line)));
        }
        loop {
            // Empty lines between packets are not packets.
            let lead = self
                .buf
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            if lead > 0 && self.scanned == 0 {
                self.buf.drain(..lead);
            }
            match self.find_end()? {
                Some(end) => {
                    let packet = self.take_packet(end);
                    if packet.fields.is_empty() {
                        continue;
                    }
                    return Ok(Some(Incoming::Packet(packet)));
                }
                None => return Ok(None),
            }
        }
    }

    /// The offset just past the empty line ending the current packet, scanning only the
    /// lines not checked before.
    fn find_end(&mut self) -> Result<Option<usize>, ParseError> {
        while let Some(rel) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let start = self.scanned;
            let end = start + rel;
            let line = trim_line(&self.buf[start..end]);
            self.scanned = end + 1;
            if self.follows.is_none() {
                self.follows = Some(is_follows(line));
            }
            if self.follows == Some(true) && !self.marker_seen {
                if line.ends_with(END_COMMAND.as_bytes()) {
                    self.marker_seen = true;
                }
                continue;
            }
            if line.is_empty() {
                return Ok(Some(self.scanned));
            }
        }
        if self.buf.len() > self.max_packet {
            return Err(ParseError::TooLarge(self.max_packet));
        }
        Ok(None)
    }

    fn take_packet(&mut self, end: usize) -> Packet {
        let raw: Vec<u8> = self.buf.drain(..end).collect();
        let follows = self.follows == Some(true);
        self.scanned = 0;
        self.follows = None;
        self.marker_seen = false;
        let mut fields = Vec::new();
        let mut in_output = false;
        for line in raw.split(|&b| b == b'\n') {
            let line = trim_line(line);
            if line.is_empty() && !in_output {
                continue;
            }
            let text = lossy(line);
            if follows && in_output {
                let (out, done) = match text.strip_suffix(END_COMMAND) {
                    Some(rest) => (rest.to_owned(), true),
                    None => (text, false),
                };
                if !out.is_empty() || !done {
                    fields.push(("Output".to_owned(), out));
                }
                if done {
                    in_output = false;
                }
                continue;
            }
            match text.split_once(':') {
                Some((k, v)) if is_key(k) => {
                    fields.push((k.to_owned(), v.trim_start_matches(' ').to_owned()));
                }
                _ if follows => {
                    // The first line that is not `Key: value` starts the raw output.
                    in_output = true;
                    let done = text.ends_with(END_COMMAND);
                    let out = text.strip_suffix(END_COMMAND).unwrap_or(&text).to_owned();
                    if !out.is_empty() {
                        fields.push(("Output".to_owned(), out));
                    }
                    if done {
                        in_output = false;
                    }
                }
                _ => fields.push((String::new(), text)),
            }
        }
        Packet { fields }
    }
}

fn is_follows(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    text.split_once(':').is_some_and(|(k, v)| {
        k.trim().eq_ignore_ascii_case("Response") && v.trim().eq_ignore_ascii_case("Follows")
    })
}

fn is_key(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn trim_line(line: &[u8]) -> &[u8] {
    let mut l = line;
    while let [rest @ .., b'\r' | b'\n'] = l {
        l = rest;
    }
    l
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An action to send: its name and its lines (`ActionID` is added when it is sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    name: String,
    fields: Vec<(String, String)>,
}

impl Action {
    /// `Action: name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            fields: Vec::new(),
        }
    }

    /// Adds a `key: value` line (keys may repeat).
    pub fn field(mut self, key: &str, value: impl Into<String>) -> Self {
        self.fields.push((key.to_owned(), value.into()));
        self
    }

    /// The action's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The wire form with this `ActionID`. Line breaks inside values become spaces, so a
    /// value can never start a line of its own (no header injection).
    pub fn encode(&self, action_id: &str) -> Vec<u8> {
        let mut out = String::with_capacity(64 + self.fields.len() * 32);
        push_line(&mut out, "Action", &self.name);
        push_line(&mut out, "ActionID", action_id);
        for (k, v) in &self.fields {
            push_line(&mut out, k, v);
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

fn push_line(out: &mut String, key: &str, value: &str) {
    out.extend(key.chars().filter(|c| c.is_ascii_graphic() && *c != ':'));
    out.push_str(": ");
    out.extend(
        value
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c }),
    );
    out.push_str("\r\n");
}

impl fmt::Display for Action {
    /// The action without values of `Secret`, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        for (k, v) in &self.fields {
            if k.eq_ignore_ascii_case("Secret") {
                write!(f, " {k}=<redacted>")?;
            } else {
                write!(f, " {k}={v}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut Parser) -> Vec<Incoming> {
        let mut out = Vec::new();
        while let Some(i) = p.next_item().unwrap() {
            out.push(i);
        }
        out
    }

    fn packet(i: &Incoming) -> &Packet {
        match i {
            Incoming::Packet(p) => p,
            Incoming::Banner(b) => panic!("banner {b}"),
        }
    }

    const SESSION: &str = "Asterisk Call Manager/9.0.0\r\n\
        Response: Success\r\nActionID: 1\r\nMessage: Authentication accepted\r\n\r\n\
        Event: FullyBooted\r\nPrivilege: system,all\r\nStatus: Fully Booted\r\n\r\n\
        Response: Success\r\nActionID: 2\r\nEventList: start\r\nMessage: Channel status will follow\r\n\r\n\
        Event: Status\r\nActionID: 2\r\nChannel: PJSIP/trunk-00000012\r\nCallerIDNum: 60312345678\r\n\
        Variable: SIFUCALL_UUID=0f8fad5b-d9cb-469f-a165-70867728950e\r\nVariable: FROM_DID=0380001234\r\n\r\n\
        Event: StatusComplete\r\nActionID: 2\r\nEventList: Complete\r\nListItems: 1\r\n\r\n";

    #[test]
    fn banner_then_packets_with_repeated_keys() {
        let mut p = Parser::default();
        p.feed(SESSION.as_bytes());
        let got = all(&mut p);
        assert_eq!(
            got[0],
            Incoming::Banner("Asterisk Call Manager/9.0.0".into())
        );
        assert_eq!(got.len(), 6);
        let login = packet(&got[1]);
        assert!(login.is_success());
        assert_eq!(login.action_id(), Some("1"));
        assert_eq!(packet(&got[2]).event(), Some("FullyBooted"));
        let status = packet(&got[4]);
        assert_eq!(status.event(), Some("Status"));
        let vars: Vec<&str> = status.get_all("variable").collect();
        assert_eq!(
            vars,
            [
                "SIFUCALL_UUID=0f8fad5b-d9cb-469f-a165-70867728950e",
                "FROM_DID=0380001234"
            ]
        );
    }

    #[test]
    fn byte_at_a_time_gives_the_same_packets() {
        let mut whole = Parser::default();
        whole.feed(SESSION.as_bytes());
        let expected = all(&mut whole);
        let mut p = Parser::default();
        let mut got = Vec::new();
        for b in SESSION.as_bytes() {
            p.feed(std::slice::from_ref(b));
            got.extend(all(&mut p));
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn list_markers() {
        let mut p = Parser::default();
        p.feed(SESSION.as_bytes());
        let got = all(&mut p);
        let kinds: Vec<(bool, bool)> = got[1..]
            .iter()
            .map(|i| (packet(i).starts_list(), packet(i).ends_list()))
            .collect();
        assert_eq!(
            kinds,
            [
                (false, false),
                (false, false),
                (true, false),
                (false, false),
                (false, true)
            ]
        );
    }

    #[test]
    fn bare_newlines_and_stray_blank_lines() {
        let mut p = Parser::after_banner(DEFAULT_MAX_PACKET);
        p.feed(b"\r\n\nResponse: Success\nActionID: 7\nPing: Pong\n\n\r\n");
        let got = all(&mut p);
        assert_eq!(got.len(), 1);
        assert_eq!(packet(&got[0]).get("ping"), Some("Pong"));
    }

    #[test]
    fn values_keep_colons_and_lose_one_leading_space() {
        let mut p = Parser::after_banner(DEFAULT_MAX_PACKET);
        p.feed(
            b"Event: Newchannel\r\nChannel: PJSIP/a:b-1\r\nCallerIDName:   Ali\r\nEmpty:\r\n\r\n",
        );
        let got = all(&mut p);
        let pk = packet(&got[0]);
        assert_eq!(pk.get("Channel"), Some("PJSIP/a:b-1"));
        assert_eq!(pk.get("CallerIDName"), Some("Ali"));
        assert_eq!(pk.get("Empty"), Some(""));
    }

    #[test]
    fn command_output_may_hold_empty_lines() {
        let mut p = Parser::after_banner(DEFAULT_MAX_PACKET);
        p.feed(
            b"Response: Follows\r\nPrivilege: Command\r\nActionID: 9\r\n\
              Module                         Description\r\n\r\n\
              res_audiosocket.so             AudioSocket support\r\n\
              1 modules loaded\r\n--END COMMAND--\r\n\r\n\
              Response: Success\r\nActionID: 10\r\n\r\n",
        );
        let got = all(&mut p);
        assert_eq!(got.len(), 2, "{got:?}");
        let out: Vec<&str> = packet(&got[0]).get_all("Output").collect();
        assert_eq!(
            out,
            [
                "Module                         Description",
                "",
                "res_audiosocket.so             AudioSocket support",
                "1 modules loaded"
            ]
        );
        assert!(packet(&got[0]).is_success());
        assert_eq!(packet(&got[1]).action_id(), Some("10"));
    }

    #[test]
    fn not_asterisk_is_an_error() {
        let mut p = Parser::default();
        p.feed(b"SSH-2.0-OpenSSH_9.6\r\n");
        assert!(matches!(p.next_item(), Err(ParseError::BadBanner(_))));
        let mut p = Parser::default();
        p.feed(&[b'x'; 2000]);
        assert!(matches!(p.next_item(), Err(ParseError::BadBanner(_))));
    }

    #[test]
    fn endless_packet_is_an_error() {
        let mut p = Parser::after_banner(256);
        for _ in 0..100 {
            p.feed(b"Variable: X=1\r\n");
        }
        assert_eq!(p.next_item(), Err(ParseError::TooLarge(256)));
    }

    #[test]
    fn encoded_actions_cannot_inject_lines() {
        let a = Action::new("Setvar")
            .field("Channel", "PJSIP/x-1")
            .field("Variable", "SIFUCALL_RESULT")
            .field("Value", "transfer\r\nAction: Hangup");
        let wire = String::from_utf8(a.encode("42")).unwrap();
        assert_eq!(
            wire,
            "Action: Setvar\r\nActionID: 42\r\nChannel: PJSIP/x-1\r\nVariable: SIFUCALL_RESULT\r\n\
             Value: transfer  Action: Hangup\r\n\r\n"
        );
        let login = Action::new("Login")
            .field("Username", "u")
            .field("Secret", "s3");
        assert!(!login.to_string().contains("s3"));
    }
}
