//! A fake Asterisk Manager Interface: the banner, `Login` (good and bad secrets), actions
//! answered by `ActionID`, `Status` as an event list with channel variables, `Setvar`,
//! `Getvar`, `Redirect`, `Ping` and `Logoff`, unsolicited events interleaved on demand,
//! and faults on demand (drop every connection, stop answering, refuse logins, answer
//! late).
//!
//! It keeps a table of channels the test sets up (as the dialplan would have: caller ID,
//! extension, application, variables) and records every action it was sent and every
//! variable set, in order. It reads the wire with its own line reader, sharing nothing with
//! the daemon's client (`pbx::ami::packet`), so a parsing bug cannot hide on both sides.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The banner the fake greets with (Asterisk 20/22 send manager version 9.x).
pub const FAKE_BANNER: &str = "Asterisk Call Manager/9.0.0";

/// One channel as the fake PBX holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeChannel {
    /// e.g. `PJSIP/trunk-00000012`.
    pub name: String,
    /// `CALLERID(num)`.
    pub caller_number: String,
    /// `CALLERID(name)`.
    pub caller_name: String,
    /// Dialplan context.
    pub context: String,
    /// Dialplan extension.
    pub exten: String,
    /// Application running now (`AudioSocket` during the call).
    pub application: String,
    /// Channel variables.
    pub vars: BTreeMap<String, String>,
}

impl FakeChannel {
    /// A channel with this name, caller number and extension, running `AudioSocket`.
    pub fn new(name: &str, caller_number: &str, exten: &str) -> Self {
        Self {
            name: name.to_owned(),
            caller_number: caller_number.to_owned(),
            caller_name: String::new(),
            context: "sifucall-agent".to_owned(),
            exten: exten.to_owned(),
            application: "AudioSocket".to_owned(),
            vars: BTreeMap::new(),
        }
    }

    /// Sets a variable (as `Set()` in the dialplan would).
    pub fn var(mut self, name: &str, value: &str) -> Self {
        self.vars.insert(name.to_owned(), value.to_owned());
        self
    }
}

/// One received action, as the fake read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedAction {
    /// `Action:`.
    pub name: String,
    /// Every line, in order.
    pub fields: Vec<(String, String)>,
}

impl ReceivedAction {
    /// The first value of a key (case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
}

/// A `Redirect` the fake was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeRedirect {
    /// Channel.
    pub channel: String,
    /// Target context.
    pub context: String,
    /// Target extension.
    pub exten: String,
    /// Target priority.
    pub priority: String,
}

/// Faults and behaviour switches, changeable while the fake runs.
#[derive(Debug, Clone, Default)]
pub struct FakeAmiFaults {
    /// Answer every action this much later.
    pub delay: Duration,
    /// Read actions but never answer them.
    pub silent: bool,
    /// Refuse every login, even with the right secret.
    pub refuse_logins: bool,
    /// Send an unrelated event before every response and between list items (as a
    /// manager user with event permissions would see on a busy PBX).
    pub chatter: bool,
}

#[derive(Debug, Default)]
struct State {
    channels: Vec<FakeChannel>,
    actions: Vec<ReceivedAction>,
    setvars: Vec<(String, String, String)>,
    redirects: Vec<FakeRedirect>,
    faults: FakeAmiFaults,
    logins: u64,
    failed_logins: u64,
    accepted: u64,
}

/// The running fake.
#[derive(Debug)]
pub struct FakeAmi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Bumped to close every open connection.
    generation: watch::Sender<u64>,
    task: JoinHandle<()>,
    username: String,
    secret: String,
}

impl Drop for FakeAmi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeAmi {
    /// Starts the fake on 127.0.0.1 with one manager user.
    pub async fn start(username: &str, secret: &str) -> std::io::Result<Self> {
        Self::start_with(username, secret, None).await
    }

    /// Starts the fake speaking TLS (as manager.conf `tlsenable=yes` does) with this
    /// certificate chain and private key (PEM).
    pub async fn start_tls(
        username: &str,
        secret: &str,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> std::io::Result<Self> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(&e))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(&e))?;
        Self::start_with(
            username,
            secret,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await
    }

    async fn start_with(
        username: &str,
        secret: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let (generation, _) = watch::channel(0u64);
        let user = (username.to_owned(), secret.to_owned());
        let task = {
            let state = Arc::clone(&state);
            let generation = generation.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    state.lock().unwrap_or_else(|p| p.into_inner()).accepted += 1;
                    let conn = Connection {
                        state: Arc::clone(&state),
                        user: user.clone(),
                        stop: generation.subscribe(),
                    };
                    let _ = stream.set_nodelay(true);
                    match tls.clone() {
                        None => {
                            tokio::spawn(conn.run(stream));
                        }
                        Some(acceptor) => {
                            tokio::spawn(async move {
                                if let Ok(s) = acceptor.accept(stream).await {
                                    conn.run(s).await;
                                }
                            });
                        }
                    }
                }
            })
        };
        Ok(Self {
            addr,
            state,
            generation,
            task,
            username: username.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The manager user.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The manager secret.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a channel (a call in progress).
    pub fn add_channel(&self, c: FakeChannel) {
        self.lock().channels.push(c);
    }

    /// Removes a channel (the caller hung up).
    pub fn remove_channel(&self, name: &str) {
        self.lock().channels.retain(|c| c.name != name);
    }

    /// Renames a channel (as a masquerade would).
    pub fn rename_channel(&self, from: &str, to: &str) {
        for c in &mut self.lock().channels {
            if c.name == from {
                c.name = to.to_owned();
            }
        }
    }

    /// Sets a channel variable (as `Set()` in the dialplan does).
    pub fn set_var(&self, channel: &str, name: &str, value: &str) {
        for c in &mut self.lock().channels {
            if c.name == channel {
                c.vars.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    /// A channel's variable now.
    pub fn var(&self, channel: &str, name: &str) -> Option<String> {
        self.lock()
            .channels
            .iter()
            .find(|c| c.name == channel)
            .and_then(|c| c.vars.get(name).cloned())
    }

    /// Every action received, in order.
    pub fn actions(&self) -> Vec<ReceivedAction> {
        self.lock().actions.clone()
    }

    /// Every `Setvar` that worked: (channel, variable, value), in order.
    pub fn setvars(&self) -> Vec<(String, String, String)> {
        self.lock().setvars.clone()
    }

    /// Every `Redirect` asked for.
    pub fn redirects(&self) -> Vec<FakeRedirect> {
        self.lock().redirects.clone()
    }

    /// Successful and failed logins so far.
    pub fn logins(&self) -> (u64, u64) {
        let s = self.lock();
        (s.logins, s.failed_logins)
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.lock().accepted
    }

    /// Replaces the faults.
    pub fn set_faults(&self, f: FakeAmiFaults) {
        self.lock().faults = f;
    }

    /// Closes every open manager connection (the PBX restarted, a firewall dropped it).
    pub fn drop_connections(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

struct Connection {
    state: Arc<Mutex<State>>,
    user: (String, String),
    stop: watch::Receiver<u64>,
}

/// A packet as the fake reads it: `Key: Value` lines up to an empty line.
type Lines = Vec<(String, String)>;

fn get<'a>(lines: &'a Lines, key: &str) -> Option<&'a str> {
    lines
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

fn render(lines: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (k, v) in lines {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out
}

fn chatter_event() -> String {
    render(&[
        ("Event", "Newexten".into()),
        ("Privilege", "dialplan,all".into()),
        ("Channel", "PJSIP/other-00000001".into()),
        ("Application", "Playback".into()),
        ("AppData", "hello-world".into()),
    ])
}

impl Connection {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run<S>(mut self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (read, mut write) = tokio::io::split(stream);
        let mut reader = BufReader::new(read);
        if write
            .write_all(format!("{FAKE_BANNER}\r\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        let mut logged_in = false;
        loop {
            let packet = tokio::select! {
                p = read_packet(&mut reader) => p,
                _ = self.stop.changed() => return,
            };
            let Some(packet) = packet else { return };
            let Some(action) = get(&packet, "Action").map(str::to_owned) else {
                continue;
            };
            let id = get(&packet, "ActionID").unwrap_or("").to_owned();
            let faults = {
                let mut s = self.lock();
                s.actions.push(ReceivedAction {
                    name: action.clone(),
                    fields: packet.clone(),
                });
                s.faults.clone()
            };
            if faults.silent {
                continue;
            }
            if !faults.delay.is_zero() {
                tokio::time::sleep(faults.delay).await;
            }
            let mut out = String::new();
            if faults.chatter {
                out.push_str(&chatter_event());
            }
            let mut close = false;
            if action.eq_ignore_ascii_case("Login") {
                let good = get(&packet, "Username") == Some(self.user.0.as_str())
                    && get(&packet, "Secret") == Some(self.user.1.as_str())
                    && !faults.refuse_logins;
                if good {
                    logged_in = true;
                    self.lock().logins += 1;
                    out.push_str(&render(&[
                        ("Response", "Success".into()),
                        ("ActionID", id.clone()),
                        ("Message", "Authentication accepted".into()),
                    ]));
                    if !get(&packet, "Events").is_some_and(|e| e.eq_ignore_ascii_case("off")) {
                        out.push_str(&render(&[
                            ("Event", "FullyBooted".into()),
                            ("Privilege", "system,all".into()),
                            ("Status", "Fully Booted".into()),
                        ]));
                    }
                } else {
                    self.lock().failed_logins += 1;
                    out.push_str(&render(&[
                        ("Response", "Error".into()),
                        ("ActionID", id.clone()),
                        ("Message", "Authentication failed".into()),
                    ]));
                    close = true;
                }
            } else if !logged_in {
                out.push_str(&render(&[
                    ("Response", "Error".into()),
                    ("ActionID", id.clone()),
                    ("Message", "Authentication Required".into()),
                ]));
            } else {
                let (text, bye) = self.answer(&action, &id, &packet, faults.chatter);
                out.push_str(&text);
                close = bye;
            }
            if write.write_all(out.as_bytes()).await.is_err() || close {
                return;
            }
        }
    }

    fn answer(&self, action: &str, id: &str, p: &Lines, chatter: bool) -> (String, bool) {
        let ok = |msg: &str| {
            render(&[
                ("Response", "Success".into()),
                ("ActionID", id.to_owned()),
                ("Message", msg.to_owned()),
            ])
        };
        let err = |msg: &str| {
            render(&[
                ("Response", "Error".into()),
                ("ActionID", id.to_owned()),
                ("Message", msg.to_owned()),
            ])
        };
        match action.to_ascii_lowercase().as_str() {
            "ping" => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                (
                    render(&[
                        ("Response", "Success".into()),
                        ("ActionID", id.to_owned()),
                        ("Ping", "Pong".into()),
                        (
                            "Timestamp",
                            format!("{}.{:06}", now.as_secs(), now.subsec_micros()),
                        ),
                    ]),
                    false,
                )
            }
            "logoff" => (
                render(&[
                    ("Response", "Goodbye".into()),
                    ("ActionID", id.to_owned()),
                    ("Message", "Thanks for all the fish.".into()),
                ]),
                true,
            ),
            "status" => (self.status(id, p, chatter), false),
            "setvar" => {
                let (Some(channel), Some(var)) = (get(p, "Channel"), get(p, "Variable")) else {
                    return (err("No variable specified"), false);
                };
                let value = get(p, "Value").unwrap_or("").to_owned();
                let mut s = self.lock();
                match s.channels.iter_mut().find(|c| c.name == channel) {
                    Some(c) => {
                        c.vars.insert(var.to_owned(), value.clone());
                        s.setvars.push((channel.to_owned(), var.to_owned(), value));
                        (ok("Variable Set"), false)
                    }
                    None => (err("No such channel"), false),
                }
            }
            "getvar" => {
                let (Some(channel), Some(var)) = (get(p, "Channel"), get(p, "Variable")) else {
                    return (err("No variable specified"), false);
                };
                let s = self.lock();
                match s.channels.iter().find(|c| c.name == channel) {
                    Some(c) => (
                        render(&[
                            ("Response", "Success".into()),
                            ("ActionID", id.to_owned()),
                            ("Variable", var.to_owned()),
                            ("Value", c.vars.get(var).cloned().unwrap_or_default()),
                        ]),
                        false,
                    ),
                    None => (err("No such channel"), false),
                }
            }
            "redirect" => {
                let Some(channel) = get(p, "Channel") else {
                    return (err("Channel not specified"), false);
                };
                let mut s = self.lock();
                let Some(c) = s.channels.iter_mut().find(|c| c.name == channel) else {
                    return (err("Channel not existent"), false);
                };
                let r = FakeRedirect {
                    channel: channel.to_owned(),
                    context: get(p, "Context").unwrap_or("").to_owned(),
                    exten: get(p, "Exten").unwrap_or("").to_owned(),
                    priority: get(p, "Priority").unwrap_or("1").to_owned(),
                };
                c.context = r.context.clone();
                c.exten = r.exten.clone();
                s.redirects.push(r);
                (ok("Redirect successful"), false)
            }
            _ => (err("Invalid/unknown command"), false),
        }
    }

    fn status(&self, id: &str, p: &Lines, chatter: bool) -> String {
        let only = get(p, "Channel").map(str::to_owned);
        let wanted: Vec<String> = get(p, "Variables")
            .unwrap_or("")
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        let all = get(p, "AllVariables").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let channels: Vec<FakeChannel> = {
            let s = self.lock();
            s.channels
                .iter()
                .filter(|c| only.as_ref().is_none_or(|o| *o == c.name))
                .cloned()
                .collect()
        };
        if only.is_some() && channels.is_empty() {
            return render(&[
                ("Response", "Error".into()),
                ("ActionID", id.to_owned()),
                ("Message", "No such channel".into()),
            ]);
        }
        let mut out = render(&[
            ("Response", "Success".into()),
            ("ActionID", id.to_owned()),
            ("EventList", "start".into()),
            ("Message", "Channel status will follow".into()),
        ]);
        for c in &channels {
            if chatter {
                out.push_str(&chatter_event());
            }
            let mut lines: Vec<(&str, String)> = vec![
                ("Event", "Status".into()),
                ("Privilege", "Call".into()),
                ("Channel", c.name.clone()),
                ("ChannelState", "6".into()),
                ("ChannelStateDesc", "Up".into()),
                ("CallerIDNum", or_unknown(&c.caller_number)),
                ("CallerIDName", or_unknown(&c.caller_name)),
                ("ConnectedLineNum", "<unknown>".into()),
                ("ConnectedLineName", "<unknown>".into()),
                ("Language", "en".into()),
                ("AccountCode", String::new()),
                ("Context", c.context.clone()),
                ("Exten", c.exten.clone()),
                ("Priority", "3".into()),
                ("Uniqueid", "1764633600.42".into()),
                ("Linkedid", "1764633600.42".into()),
                ("Application", c.application.clone()),
                ("Data", String::new()),
                ("Nativeformats", "(ulaw)".into()),
                ("Readformat", "slin".into()),
                ("Writeformat", "slin".into()),
                ("Seconds", "3".into()),
            ];
            if all {
                for (k, v) in &c.vars {
                    lines.push(("Variable", format!("{k}={v}")));
                }
            } else {
                for name in &wanted {
                    let v = c.vars.get(name).cloned().unwrap_or_default();
                    lines.push(("Variable", format!("{name}={v}")));
                }
            }
            lines.push(("ActionID", id.to_owned()));
            out.push_str(&render(&lines));
        }
        out.push_str(&render(&[
            ("Event", "StatusComplete".into()),
            ("ActionID", id.to_owned()),
            ("EventList", "Complete".into()),
            ("ListItems", channels.len().to_string()),
            ("Items", channels.len().to_string()),
        ]));
        out
    }
}

fn or_unknown(v: &str) -> String {
    if v.is_empty() {
        "<unknown>".to_owned()
    } else {
        v.to_owned()
    }
}

/// Reads one packet: lines until an empty one. `None` when the client closed or sent
/// something that is not text lines (the fake then hangs up, as Asterisk would).
async fn read_packet<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Option<Lines> {
    let mut lines = Lines::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).await.ok()?;
        if n == 0 || line.len() > 8192 {
            return None;
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if lines.is_empty() {
                continue;
            }
            return Some(lines);
        }
        let (k, v) = line.split_once(':')?;
        lines.push((k.trim().to_owned(), v.trim().to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpStream;

    async fn exchange(s: &mut TcpStream, send: &str, until: &str) -> String {
        s.write_all(send.as_bytes()).await.unwrap();
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        while !got.contains(until) {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            if n == 0 {
                break;
            }
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        got
    }

    #[tokio::test]
    async fn speaks_the_manager_protocol() {
        let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
        fake.add_channel(FakeChannel::new("PJSIP/t-1", "601", "2000").var("SIFUCALL_UUID", "u1"));
        let mut s = TcpStream::connect(fake.addr()).await.unwrap();
        let hello = exchange(&mut s, "", "\r\n").await;
        assert_eq!(hello, format!("{FAKE_BANNER}\r\n"));
        let r = exchange(&mut s, "Action: Status\r\nActionID: 0\r\n\r\n", "\r\n\r\n").await;
        assert!(r.contains("Authentication Required"), "{r}");
        let r = exchange(
            &mut s,
            "Action: Login\r\nActionID: 1\r\nUsername: sifucall\r\nSecret: pw\r\nEvents: off\r\n\r\n",
            "\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("Response: Success\r\nActionID: 1\r\n"), "{r}");
        let r = exchange(
            &mut s,
            "Action: Status\r\nActionID: 2\r\nVariables: SIFUCALL_UUID\r\n\r\n",
            "EventList: Complete",
        )
        .await;
        assert!(r.contains("Variable: SIFUCALL_UUID=u1\r\n"), "{r}");
        assert!(r.contains("Event: StatusComplete"), "{r}");
        let r = exchange(
            &mut s,
            "Action: Setvar\r\nActionID: 3\r\nChannel: PJSIP/t-1\r\nVariable: X\r\nValue: y\r\n\r\n",
            "\r\n\r\n",
        )
        .await;
        assert!(r.contains("Variable Set"), "{r}");
        assert_eq!(fake.var("PJSIP/t-1", "X").as_deref(), Some("y"));
    }

    #[tokio::test]
    async fn a_bad_secret_is_refused_and_closed() {
        let fake = FakeAmi::start("sifucall", "pw").await.unwrap();
        let mut s = TcpStream::connect(fake.addr()).await.unwrap();
        let r = exchange(
            &mut s,
            "Action: Login\r\nActionID: 1\r\nUsername: sifucall\r\nSecret: nope\r\n\r\n",
            "Authentication failed\r\n\r\n",
        )
        .await;
        assert!(r.contains("Response: Error"), "{r}");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "closed after a failed login");
        assert_eq!(fake.logins(), (0, 1));
    }
}
