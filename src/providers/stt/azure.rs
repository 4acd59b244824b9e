//! Azure Speech continuous recognition over the SDK's real-time websocket protocol.
//!
//! One recognition spans the whole call. The service drops connections (idle limit,
//! 10-minute cap, 1011, network errors), so the driver reconnects transparently: it keeps
//! the audio sent since the last final phrase, replays it on a fresh connection and rebases
//! the service's turn-relative offsets so that [`SttEvent::Final`] offsets stay on one
//! timeline. Bytes on the wire come from [`super::protocol`]; the bookkeeping (chunking,
//! replay buffer, offsets, what each service message means) is the sans-IO
//! `Recognition`, so this module is a thin async driver.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

use super::protocol::{self, RecognitionStatus, ServiceMessage};
use super::{SttError, SttEvent, SttParams, SttProvider, SttSession};
use crate::ops::config::{Secret, Settings, SttSettings};
use crate::providers::BoxFuture;

/// Close codes after which the SDK gives up rather than reconnecting.
const FATAL_CLOSE_CODES: [u16; 4] = [1002, 1003, 1007, 4000];

/// Capacity of [`SttSession::audio`]; the driver drains it continuously.
pub const AUDIO_CHANNEL_CAPACITY: usize = 64;
const EVENTS_CAPACITY: usize = 256;
/// Outgoing messages queued for one connection beyond a full replay: a full queue means the
/// socket is stuck and the connection is abandoned. (Messages are allocated as they are
/// queued, so a large bound costs nothing while the socket keeps up.)
const WRITE_QUEUE_SLACK: usize = 256;

/// Timeouts, retries and buffering of an [`AzureStt`] client.
#[derive(Debug, Clone)]
pub struct AzureSttOptions {
    /// Deadline for TCP + TLS + websocket upgrade.
    pub connect_timeout: Duration,
    /// After (re)connecting, the service must say something (`turn.start`) within this.
    pub first_message_timeout: Duration,
    /// Reconnect attempts after a connection is lost before giving up with
    /// [`SttEvent::Failed`]. A connection that made progress resets the count.
    pub max_reconnects: u32,
    /// Delay before the first reconnect; doubled for each further attempt.
    pub reconnect_backoff: Duration,
    /// Audio is sent in chunks of this many ms (Azure wants 20-100 ms). 20 ms, one call
    /// frame, means the frame that completes the caller's end-of-phrase silence is never held
    /// back waiting for a second one (up to 20 ms per turn at 40 ms chunks).
    pub chunk_ms: u32,
    /// At most this much unacknowledged audio is kept for replay.
    pub max_replay_ms: u32,
    /// After end of stream, how long to wait for the last phrase and `turn.end`.
    pub finish_timeout: Duration,
    /// Deadline for one websocket write.
    pub write_timeout: Duration,
    /// A connection older than this is replaced right after a final phrase, while the caller
    /// is quiet, so that the service's 10-minute connection cap does not fall mid-phrase.
    pub rollover_after: Duration,
}

impl Default for AzureSttOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            first_message_timeout: Duration::from_secs(5),
            max_reconnects: 3,
            reconnect_backoff: Duration::from_millis(200),
            chunk_ms: 20,
            max_replay_ms: 30_000,
            finish_timeout: Duration::from_secs(3),
            write_timeout: Duration::from_secs(5),
            rollover_after: Duration::from_secs(570),
        }
    }
}

/// The Azure speech-to-text client.
#[derive(Debug, Clone)]
pub struct AzureStt {
    url: String,
    key: Secret,
    opts: AzureSttOptions,
}

impl AzureStt {
    /// A client for `settings.websocket_url()` using `key`.
    pub fn new(settings: &SttSettings, key: Secret) -> Result<Self, SttError> {
        if !key.is_set() {
            return Err(SttError::Config("AZURE_SPEECH_KEY is not set".into()));
        }
        let url = settings.websocket_url();
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            return Err(SttError::Config(format!(
                "stt endpoint {url:?} is not a ws:// or wss:// URL"
            )));
        }
        Ok(Self {
            url,
            key,
            opts: AzureSttOptions::default(),
        })
    }

    /// [`AzureStt::new`] from the whole configuration.
    pub fn from_settings(settings: &Settings) -> Result<Self, SttError> {
        Self::new(&settings.stt, settings.secrets.azure_speech_key.clone())
    }

    /// Replaces the timeouts, retries and buffering.
    pub fn with_options(mut self, opts: AzureSttOptions) -> Self {
        self.opts = opts;
        self
    }

    /// The current options.
    pub fn options(&self) -> &AzureSttOptions {
        &self.opts
    }
}

impl SttProvider for AzureStt {
    fn start(&self, params: SttParams) -> BoxFuture<'_, Result<SttSession, SttError>> {
        Box::pin(async move {
            validate(&params)?;
            let key = self
                .key
                .expose()
                .ok_or_else(|| SttError::Config("AZURE_SPEECH_KEY is not set".into()))?;
            let cfg = Arc::new(ConnConfig {
                url: request_url(&self.url, &params),
                key: key.to_owned(),
                params,
                opts: self.opts.clone(),
            });
            let conn = connect(&cfg).await?;
            info!(call_id = %cfg.params.call_id, "speech recognition connected");
            let (audio_tx, audio_rx) = mpsc::channel(AUDIO_CHANNEL_CAPACITY);
            let (events_tx, events_rx) = mpsc::channel(EVENTS_CAPACITY);
            let driver = Driver {
                rec: Recognition::new(&cfg.params, &cfg.opts),
                cfg,
                audio_rx,
                audio_open: true,
                events: events_tx,
            };
            tokio::spawn(driver.run(conn));
            Ok(SttSession {
                audio: audio_tx,
                events: events_rx,
            })
        })
    }
}

fn validate(p: &SttParams) -> Result<(), SttError> {
    if p.sample_rate != 8000 && p.sample_rate != 16000 {
        return Err(SttError::Config(format!(
            "sample rate {} is not 8000 or 16000",
            p.sample_rate
        )));
    }
    if !(100..=5000).contains(&p.segmentation_silence_ms) {
        return Err(SttError::Config(format!(
            "segmentation silence {} ms is outside Azure's 100..=5000",
            p.segmentation_silence_ms
        )));
    }
    let tags = std::iter::once(&p.language).chain(&p.languages);
    for tag in tags {
        if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(SttError::Config(format!(
                "language {tag:?} is not a BCP-47 tag"
            )));
        }
    }
    if p.languages.len() > MAX_CONTINUOUS_LID_LANGUAGES {
        return Err(SttError::Config(format!(
            "{} candidate languages; continuous language identification takes at most {MAX_CONTINUOUS_LID_LANGUAGES}",
            p.languages.len()
        )));
    }
    Ok(())
}

/// Continuous language identification chooses among at most this many locales.
const MAX_CONTINUOUS_LID_LANGUAGES: usize = 10;

/// The v1 conversation path that `stt.region` and most `stt.endpoint`s name.
const CONVERSATION_V1_PATH: &str = "/speech/recognition/conversation/cognitiveservices/v1";
/// Where continuous language identification is served: the path the SDK 1.52 builds for its
/// recognition endpoint version 2 (`SpeechConnectionFactory.universalUri` + `2`).
pub const UNIVERSAL_V2_PATH: &str = "/stt/speech/universal/v2";

/// `url` plus the query the JavaScript SDK sends: `language`, `format=simple`, with language
/// identification `lidEnabled=true` (`QueryParameterNames.EnableLanguageId`), and
/// `segmentationSilenceTimeoutMs` (also sent in `speech.context`), in the SDK's order. The
/// languages are validated, so no escaping is needed. Unlike the SDK we never copy the key
/// into the URL.
///
/// Continuous language identification needs the v2 endpoint (Microsoft's language
/// identification guide), so with it a URL on the v1 conversation path moves to
/// [`UNIVERSAL_V2_PATH`] on the same host; any other path is the operator's choice and kept.
fn request_url(url: &str, p: &SttParams) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = match base.strip_suffix(CONVERSATION_V1_PATH) {
        Some(host) if p.identifies_language() => format!("{host}{UNIVERSAL_V2_PATH}"),
        _ => base.to_owned(),
    };
    let mut out = match query {
        Some(q) => format!("{base}?{q}&"),
        None => format!("{base}?"),
    };
    out.push_str(&format!("language={}&format=simple", p.language));
    if p.identifies_language() {
        out.push_str("&lidEnabled=true");
    }
    out.push_str(&format!(
        "&segmentationSilenceTimeoutMs={}",
        p.segmentation_silence_ms
    ));
    out
}

struct ConnConfig {
    url: String,
    key: String,
    params: SttParams,
    opts: AzureSttOptions,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One websocket: reads happen in the driver, writes in a task fed by a bounded queue so a
/// slow socket never stops the driver from reading.
struct Conn {
    out: mpsc::Sender<Message>,
    writer: JoinHandle<Result<(), String>>,
    input: SplitStream<Ws>,
    request_id: String,
}

impl Conn {
    /// Queues a message; false if the queue is full or the writer is gone.
    fn send(&self, m: Message) -> bool {
        self.out.try_send(m).is_ok()
    }

    /// Starts a turn: `speech.context` and the WAV header under the turn's request id, a new
    /// one if `new_id` (as the SDK does for every turn after the connection's first).
    fn open_turn(&mut self, p: &SttParams, new_id: bool) -> bool {
        if new_id {
            self.request_id = protocol::new_id();
        }
        let context = if p.identifies_language() {
            protocol::speech_context_lid_message(
                &self.request_id,
                &now(),
                &p.languages,
                p.segmentation_silence_ms,
            )
        } else {
            protocol::speech_context_message(
                &self.request_id,
                &now(),
                &p.language,
                p.segmentation_silence_ms,
            )
        };
        self.send(Message::text(context))
            && self.send(Message::binary(protocol::wav_header_message(
                &self.request_id,
                &now(),
                p.sample_rate,
            )))
    }

    fn send_audio(&self, payload: &[u8]) -> bool {
        self.send(Message::binary(protocol::audio_message(
            &self.request_id,
            &now(),
            None,
            payload,
        )))
    }
}

fn now() -> String {
    protocol::format_timestamp(SystemTime::now())
}

/// Connects, then queues `speech.config`, `speech.context` and the WAV header.
async fn connect(cfg: &ConnConfig) -> Result<Conn, SttError> {
    let mut req = cfg
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| SttError::Config(format!("bad stt endpoint: {e}")))?;
    let mut key = HeaderValue::from_str(&cfg.key)
        .map_err(|_| SttError::Config("key is not a valid header".into()))?;
    // Only ever in this header (never the URL); sensitive, so `Debug` of the request hides it.
    key.set_sensitive(true);
    req.headers_mut().insert("Ocp-Apim-Subscription-Key", key);
    let conn_id = protocol::new_id();
    if let Ok(v) = HeaderValue::from_str(&conn_id) {
        // The SDK sends the id under both names.
        req.headers_mut().insert("X-ConnectionId", v.clone());
        req.headers_mut().insert("connectionId", v);
    }
    let ws = match timeout(
        cfg.opts.connect_timeout,
        // Nagle off: 20 ms audio messages must not wait for ACKs.
        tokio_tungstenite::connect_async_with_config(req, None, true),
    )
    .await
    {
        Err(_) => {
            return Err(SttError::Connect(format!(
                "no upgrade within {:?}",
                cfg.opts.connect_timeout
            )));
        }
        Ok(Err(tungstenite::Error::Http(resp))) => {
            let status = resp.status().as_u16();
            return Err(if status == 401 || status == 403 {
                SttError::Unauthorized(status)
            } else {
                SttError::Connect(format!("upgrade refused with HTTP {status}"))
            });
        }
        Ok(Err(e)) => return Err(SttError::Connect(e.to_string())),
        Ok(Ok((ws, _))) => ws,
    };
    debug!(call_id = %cfg.params.call_id, connection_id = %conn_id, "speech websocket open");
    let (sink, input) = ws.split();
    // Room for the preamble, a full replay and whatever piled up while reconnecting.
    let replay_chunks = (cfg.opts.max_replay_ms / cfg.opts.chunk_ms.clamp(20, 100)) as usize;
    let (out, rx) = mpsc::channel(2 * replay_chunks + WRITE_QUEUE_SLACK);
    let writer = tokio::spawn(write_loop(sink, rx, cfg.opts.write_timeout));
    let mut conn = Conn {
        out,
        writer,
        input,
        request_id: protocol::new_id(),
    };
    let ok = conn.send(Message::text(protocol::speech_config_message(
        &conn.request_id,
        &now(),
        cfg.params.sample_rate,
    ))) && conn.open_turn(&cfg.params, false);
    if !ok {
        return Err(SttError::Connect("connection closed during setup".into()));
    }
    Ok(conn)
}

async fn write_loop(
    mut sink: SplitSink<Ws, Message>,
    mut rx: mpsc::Receiver<Message>,
    write_timeout: Duration,
) -> Result<(), String> {
    while let Some(m) = rx.recv().await {
        match timeout(write_timeout, sink.send(m)).await {
            Err(_) => return Err("websocket write timed out".into()),
            Ok(Err(e)) => return Err(format!("websocket write failed: {e}")),
            Ok(Ok(())) => {}
        }
    }
    // The driver let go of the connection: close it politely (sends a Close frame).
    let _ = timeout(write_timeout, sink.close()).await;
    Ok(())
}

/// How one connection ended.
#[derive(Debug, PartialEq)]
enum ConnEnd {
    /// End of stream acknowledged (or waited for long enough).
    Finished,
    /// Lost; worth reconnecting.
    Lost(String),
    /// Old enough to be replaced before the service's cap, and the caller is between phrases.
    Rollover,
    /// The service refused us in a way retrying will not fix.
    Fatal(String),
    /// Nobody reads the events any more.
    Abandoned,
}

struct Driver {
    cfg: Arc<ConnConfig>,
    rec: Recognition,
    audio_rx: mpsc::Receiver<Vec<i16>>,
    audio_open: bool,
    events: mpsc::Sender<SttEvent>,
}

impl Driver {
    async fn run(mut self, mut conn: Conn) {
        let call_id = self.cfg.params.call_id.clone();
        let mut failures = 0u32;
        self.rec.begin_turn();
        loop {
            let (end, progressed) = self.run_connection(&mut conn).await;
            drop(conn);
            let mut reason = match end {
                ConnEnd::Finished => {
                    debug!(%call_id, "speech recognition finished");
                    return;
                }
                ConnEnd::Abandoned => return,
                ConnEnd::Fatal(r) => {
                    warn!(%call_id, reason = %r, "speech recognition failed");
                    self.emit(SttEvent::Failed(r)).await;
                    return;
                }
                ConnEnd::Lost(r) => r,
                ConnEnd::Rollover => {
                    info!(%call_id, "replacing the speech connection before the service's cap");
                    "planned rollover".to_owned()
                }
            };
            if progressed {
                failures = 0;
            }
            if !self.audio_open && self.rec.unacked_samples() == 0 && self.rec.pending.is_empty() {
                return;
            }
            if reason != "planned rollover" {
                warn!(%call_id, %reason, "speech connection lost; reconnecting");
            }
            conn = loop {
                failures += 1;
                if failures > self.cfg.opts.max_reconnects {
                    let r = format!(
                        "{reason} (gave up after {} reconnects)",
                        self.cfg.opts.max_reconnects
                    );
                    warn!(%call_id, reason = %r, "speech recognition failed");
                    self.emit(SttEvent::Failed(r)).await;
                    return;
                }
                // The first attempt is immediate (the 10-minute cap and idle closes are routine;
                // the caller keeps talking), later ones back off.
                let backoff = if failures == 1 {
                    Duration::ZERO
                } else {
                    self.cfg
                        .opts
                        .reconnect_backoff
                        .saturating_mul(1 << (failures - 2).min(10))
                };
                if self.drain_while(sleep(backoff)).await.is_none() {
                    return;
                }
                let cfg = self.cfg.clone();
                match self.drain_while(async move { connect(&cfg).await }).await {
                    None => return,
                    Some(Ok(c)) => break c,
                    Some(Err(SttError::Unauthorized(s))) => {
                        self.emit(SttEvent::Failed(format!(
                            "credentials rejected on reconnect (HTTP {s})"
                        )))
                        .await;
                        return;
                    }
                    Some(Err(e)) => reason = e.to_string(),
                }
            };
            let replay = self.rec.begin_turn();
            let replayed_ms = self.rec.samples_to_ms(self.rec.unacked_samples());
            // Then whatever the caller said while we were reconnecting.
            let mut ok = replay.iter().all(|chunk| conn.send_audio(chunk));
            while let Some(chunk) = self.rec.next_chunk(false) {
                ok &= conn.send_audio(&chunk);
            }
            if !ok {
                warn!(%call_id, "replay did not fit the write queue");
            }
            info!(%call_id, replayed_ms, "speech connection re-established");
            if !self.emit(SttEvent::Reconnected).await {
                return;
            }
        }
    }

    /// Runs `fut` while still accepting caller audio (into the replay buffer), so the
    /// caller never blocks during a reconnect. `None` if the events receiver went away.
    async fn drain_while<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                _ = self.events.closed() => return None,
                s = self.audio_rx.recv(), if self.audio_open => match s {
                    Some(s) => self.rec.push_audio(&s),
                    None => self.audio_open = false,
                },
            }
        }
    }

    /// Opens the next turn on `conn` and replays the audio not yet recognised, then what
    /// is pending. False if the write queue is full.
    fn next_turn(&mut self, conn: &mut Conn) -> bool {
        if !conn.open_turn(&self.cfg.params, true) {
            return false;
        }
        let replay = self.rec.begin_turn();
        let mut ok = replay.iter().all(|chunk| conn.send_audio(chunk));
        while let Some(chunk) = self.rec.next_chunk(false) {
            ok &= conn.send_audio(&chunk);
        }
        ok
    }

    /// Sends what is left, then the empty end-of-stream audio message.
    fn finish_audio(&mut self, conn: &Conn) -> bool {
        let mut ok = true;
        while let Some(chunk) = self.rec.next_chunk(true) {
            ok &= conn.send_audio(&chunk);
        }
        ok && conn.send(Message::binary(protocol::end_of_stream_message(
            &conn.request_id,
            &now(),
        )))
    }

    /// Pumps one connection until it ends. Also returns whether the service made progress
    /// (recognised something), which resets the reconnect budget.
    async fn run_connection(&mut self, conn: &mut Conn) -> (ConnEnd, bool) {
        let mut progressed = false;
        let mut heard = false;
        let first_deadline = Instant::now() + self.cfg.opts.first_message_timeout;
        let rollover_at = Instant::now() + self.cfg.opts.rollover_after;
        let mut finish_deadline = None;
        if !self.audio_open {
            if !self.finish_audio(conn) {
                return (ConnEnd::Lost("write queue full".into()), progressed);
            }
            finish_deadline = Some(Instant::now() + self.cfg.opts.finish_timeout);
        }
        loop {
            let deadline = finish_deadline.or(if heard { None } else { Some(first_deadline) });
            tokio::select! {
                biased;
                _ = self.events.closed() => {
                    // The session was dropped: end the stream politely if we still can.
                    if self.audio_open {
                        self.audio_open = false;
                        self.finish_audio(conn);
                    }
                    return (ConnEnd::Abandoned, progressed);
                }
                msg = conn.input.next() => {
                    let text = match msg {
                        None => return (ConnEnd::Lost("connection closed".into()), progressed),
                        Some(Err(e)) => return (ConnEnd::Lost(e.to_string()), progressed),
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(frame))) => {
                            let (code, why) = frame
                                .map(|f| (u16::from(f.code), f.reason.to_string()))
                                .unwrap_or((1005, String::new()));
                            let reason = format!("service closed the connection ({code} {why})");
                            // The SDK's fatal codes: we sent something the service rejects
                            // (1002 protocol, 1003 message type, 1007 payload) or it refused
                            // the request (4000); retrying would only repeat it.
                            if finish_deadline.is_none() && FATAL_CLOSE_CODES.contains(&code) {
                                return (ConnEnd::Fatal(reason), progressed);
                            }
                            return (ConnEnd::Lost(reason), progressed);
                        }
                        Some(Ok(_)) => continue,
                    };
                    heard = true;
                    if !protocol::is_for_turn(&text, &conn.request_id) {
                        debug!(call_id = %self.cfg.params.call_id, "ignoring a message for another turn");
                        continue;
                    }
                    let m = match protocol::parse_service_message(&text) {
                        Ok(m) => m,
                        Err(e) => {
                            warn!(call_id = %self.cfg.params.call_id, error = %e, "ignoring malformed service message");
                            continue;
                        }
                    };
                    match self.rec.on_message(m) {
                        Action::None => {}
                        Action::Progress => progressed = true,
                        Action::Emit(ev) => {
                            progressed = true;
                            let final_phrase = matches!(ev, SttEvent::Final { .. });
                            if !self.emit(ev).await {
                                return (ConnEnd::Abandoned, progressed);
                            }
                            if final_phrase && finish_deadline.is_none() && Instant::now() >= rollover_at {
                                return (ConnEnd::Rollover, progressed);
                            }
                        }
                        Action::TurnEnded if finish_deadline.is_some() => {
                            return (ConnEnd::Finished, progressed);
                        }
                        Action::TurnEnded => {
                            // The service ended the turn while audio still flows: like the SDK,
                            // start the next turn on this socket and resend what it has not
                            // recognised yet (no reconnect, no pause).
                            if !self.next_turn(conn) {
                                return (ConnEnd::Lost("websocket write queue full".into()), progressed);
                            }
                            debug!(call_id = %self.cfg.params.call_id, "service ended the turn; next turn on the same connection");
                        }
                        Action::Retry(r) => return (ConnEnd::Lost(r), progressed),
                        Action::Fatal(r) => return (ConnEnd::Fatal(r), progressed),
                    }
                }
                chunk = self.audio_rx.recv(), if self.audio_open => match chunk {
                    Some(samples) => {
                        self.rec.push_audio(&samples);
                        while let Some(c) = self.rec.next_chunk(false) {
                            if !conn.send_audio(&c) {
                                return (ConnEnd::Lost("websocket write queue full".into()), progressed);
                            }
                        }
                    }
                    None => {
                        self.audio_open = false;
                        if !self.finish_audio(conn) {
                            return (ConnEnd::Lost("websocket write queue full".into()), progressed);
                        }
                        finish_deadline = Some(Instant::now() + self.cfg.opts.finish_timeout);
                    }
                },
                res = &mut conn.writer => {
                    let why = match res {
                        Ok(Err(e)) => e,
                        _ => "websocket writer stopped".into(),
                    };
                    return (ConnEnd::Lost(why), progressed);
                }
                _ = sleep_until(deadline.unwrap_or(first_deadline)), if deadline.is_some() => {
                    if finish_deadline.is_some() {
                        debug!(call_id = %self.cfg.params.call_id, "no turn.end after end of stream; closing");
                        return (ConnEnd::Finished, progressed);
                    }
                    return (ConnEnd::Lost("no response from the speech service".into()), progressed);
                }
            }
        }
    }

    /// Delivers an event without stalling on droppable ones; false if nobody listens.
    async fn emit(&self, ev: SttEvent) -> bool {
        match self.events.try_send(ev) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(ev)) => match ev {
                SttEvent::Partial(_) | SttEvent::SpeechStarted => true,
                ev => self.events.send(ev).await.is_ok(),
            },
        }
    }
}

/// What the driver should do about a service message.
#[derive(Debug, PartialEq)]
enum Action {
    /// Nothing.
    None,
    /// Nothing to emit, but the service is recognising.
    Progress,
    /// Emit this event.
    Emit(SttEvent),
    /// `turn.end`.
    TurnEnded,
    /// The service reported a transient error: reconnect.
    Retry(String),
    /// The service refused the request: give up.
    Fatal(String),
}

/// Sans-IO state of one continuous recognition across connections: re-chunking, the replay
/// buffer and the offset base. Sample indices are absolute: the n-th sample sent since the
/// recognition began.
#[derive(Debug)]
struct Recognition {
    rate: u32,
    chunk: usize,
    max_buffer: usize,
    /// Received from the caller, not yet sent.
    pending: VecDeque<i16>,
    /// Sent but not covered by a final phrase: replayed after a reconnect.
    unacked: VecDeque<i16>,
    /// Absolute index of `unacked[0]`.
    unacked_start: u64,
    /// Absolute index where the current turn's audio starts (service offsets are relative).
    turn_base: u64,
    /// Absolute end (in samples) of the last phrase, to drop duplicates after a replay.
    acked_until: u64,
    /// Samples dropped because the buffers overflowed during an outage.
    dropped: u64,
    /// `Error`/`TooManyRequests` phrases since the last recognised one: past
    /// `max_service_errors` the recognition fails (hypotheses before each error would
    /// otherwise reset the reconnect budget forever).
    service_errors: u32,
    max_service_errors: u32,
}

impl Recognition {
    fn new(p: &SttParams, o: &AzureSttOptions) -> Self {
        let rate = p.sample_rate;
        let per_ms = |ms: u32| (u64::from(rate) * u64::from(ms) / 1000) as usize;
        Self {
            rate,
            chunk: per_ms(o.chunk_ms.clamp(20, 100)).max(1),
            max_buffer: per_ms(o.max_replay_ms).max(1),
            pending: VecDeque::new(),
            unacked: VecDeque::new(),
            unacked_start: 0,
            turn_base: 0,
            acked_until: 0,
            dropped: 0,
            service_errors: 0,
            max_service_errors: o.max_reconnects,
        }
    }

    fn push_audio(&mut self, samples: &[i16]) {
        self.pending.extend(samples);
        if self.pending.len() > self.max_buffer {
            let n = self.pending.len() - self.max_buffer;
            self.pending.drain(..n);
            self.dropped += n as u64;
        }
    }

    /// The next chunk to send (little-endian bytes), if a full one is pending or `flush`.
    fn next_chunk(&mut self, flush: bool) -> Option<Vec<u8>> {
        if self.pending.is_empty() || (self.pending.len() < self.chunk && !flush) {
            return None;
        }
        let n = self.chunk.min(self.pending.len());
        let mut out = Vec::with_capacity(n * 2);
        for s in self.pending.drain(..n) {
            out.extend_from_slice(&s.to_le_bytes());
            self.unacked.push_back(s);
        }
        if self.unacked.len() > self.max_buffer {
            let n = self.unacked.len() - self.max_buffer;
            self.unacked.drain(..n);
            self.unacked_start += n as u64;
        }
        Some(out)
    }

    /// Starts a turn on a fresh connection: its audio begins at the oldest unacknowledged
    /// sample. Returns that audio, chunked, to replay.
    fn begin_turn(&mut self) -> Vec<Vec<u8>> {
        self.turn_base = self.unacked_start;
        let samples: Vec<i16> = self.unacked.iter().copied().collect();
        samples
            .chunks(self.chunk)
            .map(|c| c.iter().flat_map(|s| s.to_le_bytes()).collect())
            .collect()
    }

    fn unacked_samples(&self) -> u64 {
        self.unacked.len() as u64
    }

    fn samples_to_ms(&self, samples: u64) -> u64 {
        samples * 1000 / u64::from(self.rate.max(1))
    }

    /// Forgets audio up to absolute sample `end` (never beyond what was sent).
    fn ack(&mut self, end: u64) {
        let sent_end = self.unacked_start + self.unacked.len() as u64;
        let end = end.min(sent_end);
        if end > self.unacked_start {
            self.unacked.drain(..(end - self.unacked_start) as usize);
            self.unacked_start = end;
        }
        self.acked_until = self.acked_until.max(end);
    }

    fn on_message(&mut self, m: ServiceMessage) -> Action {
        let base_ticks = protocol::samples_to_ticks(self.turn_base, self.rate);
        match m {
            ServiceMessage::TurnStart
            | ServiceMessage::SpeechEndDetected
            | ServiceMessage::Unknown { .. } => Action::None,
            ServiceMessage::TurnEnd => Action::TurnEnded,
            ServiceMessage::SpeechStartDetected { .. } => Action::Emit(SttEvent::SpeechStarted),
            ServiceMessage::Hypothesis { text, .. } if text.trim().is_empty() => Action::Progress,
            ServiceMessage::Hypothesis { text, .. } => Action::Emit(SttEvent::Partial(text)),
            ServiceMessage::Phrase {
                status,
                display_text,
                offset,
                duration,
                language,
            } => {
                let start = base_ticks.saturating_add(offset);
                let end = start.saturating_add(duration);
                let end_samples = protocol::ticks_to_samples(end, self.rate);
                match status {
                    // A phrase: with words, or (NoMatch, InitialSilenceTimeout, BabbleTimeout,
                    // an empty Success) without. A wordless one ends the caller's turn too, as
                    // an empty Final: the call can tell an interruption that carried no words.
                    RecognitionStatus::Success
                    | RecognitionStatus::NoMatch
                    | RecognitionStatus::InitialSilenceTimeout
                    | RecognitionStatus::BabbleTimeout => {
                        let duplicate = self.acked_until > 0 && end_samples <= self.acked_until;
                        self.ack(end_samples);
                        self.service_errors = 0;
                        if duplicate {
                            return Action::Progress;
                        }
                        let text = match status {
                            RecognitionStatus::Success => display_text.unwrap_or_default(),
                            _ => String::new(),
                        };
                        if let Some(l) = &language {
                            debug!(language = %l.language, confidence = ?l.confidence, "phrase language");
                        }
                        Action::Emit(SttEvent::Final {
                            text,
                            offset_ms: start / 10_000,
                            duration_ms: duration / 10_000,
                            language: language.as_ref().and_then(|l| l.known()).map(str::to_owned),
                        })
                    }
                    RecognitionStatus::EndOfDictation | RecognitionStatus::Other(_) => {
                        Action::Progress
                    }
                    RecognitionStatus::Error | RecognitionStatus::TooManyRequests => {
                        self.service_errors += 1;
                        let why = format!("service reported {}", status.as_str());
                        if self.service_errors > self.max_service_errors {
                            Action::Fatal(format!("{why} {} times", self.service_errors))
                        } else {
                            Action::Retry(why)
                        }
                    }
                    RecognitionStatus::BadRequest | RecognitionStatus::Forbidden => {
                        Action::Fatal(format!("service reported {}", status.as_str()))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::azure::{AzureFault, FakeAzure, FakeAzureConfig, RecordedMessage};

    #[test]
    fn the_key_is_in_no_url_and_no_debug() {
        let mut settings = crate::ops::config::Settings::defaults().stt;
        settings.endpoint =
            "ws://127.0.0.1:9/speech/recognition/conversation/cognitiveservices/v1".into();
        let stt = AzureStt::new(&settings, Secret::new(Some("MARKER-KEY-123".into()))).unwrap();
        assert!(!format!("{stt:?}").contains("MARKER-KEY-123"));
        assert!(!request_url(&stt.url, &params(8000)).contains("MARKER"));
    }

    fn params(rate: u32) -> SttParams {
        SttParams {
            language: "ms-MY".into(),
            languages: Vec::new(),
            sample_rate: rate,
            segmentation_silence_ms: 300,
            call_id: "t".into(),
        }
    }

    /// Malay and English, identified phrase by phrase.
    fn lid_params(rate: u32) -> SttParams {
        SttParams {
            languages: vec!["ms-MY".into(), "en-US".into()],
            ..params(rate)
        }
    }

    fn rec(rate: u32) -> Recognition {
        Recognition::new(
            &params(rate),
            &AzureSttOptions {
                max_replay_ms: 1000,
                // The re-chunking tests below are written for 40 ms chunks.
                chunk_ms: 40,
                ..Default::default()
            },
        )
    }

    fn phrase(
        text: Option<&str>,
        status: RecognitionStatus,
        offset: u64,
        duration: u64,
    ) -> ServiceMessage {
        ServiceMessage::Phrase {
            status,
            display_text: text.map(str::to_owned),
            offset,
            duration,
            language: None,
        }
    }

    /// A `Success` phrase; offsets in 100 ns ticks.
    fn success(text: &str, offset: u64, duration: u64) -> ServiceMessage {
        phrase(Some(text), RecognitionStatus::Success, offset, duration)
    }

    fn emit_final(text: &str, offset_ms: u64, duration_ms: u64) -> Action {
        Action::Emit(SttEvent::Final {
            text: text.into(),
            offset_ms,
            duration_ms,
            language: None,
        })
    }

    #[test]
    fn rechunks_to_40ms() {
        let mut r = rec(8000);
        r.push_audio(&[1; 100]);
        assert_eq!(r.next_chunk(false), None);
        r.push_audio(&[2; 300]);
        let c = r.next_chunk(false).unwrap();
        assert_eq!(c.len(), 640);
        assert_eq!(&c[..2], &[1, 0]);
        assert_eq!(r.next_chunk(false), None);
        assert_eq!(r.next_chunk(true).unwrap().len(), 160);
        assert_eq!(r.next_chunk(true), None);
        assert_eq!(r.unacked_samples(), 400);
    }

    #[test]
    fn finals_ack_audio_and_rebase_offsets() {
        let mut r = rec(8000);
        r.push_audio(&[0; 8000]); // 1 s
        while r.next_chunk(false).is_some() {}
        // Phrase 0.1 s .. 0.6 s.
        assert_eq!(
            r.on_message(success("satu", 1_000_000, 5_000_000)),
            emit_final("satu", 100, 500)
        );
        assert_eq!(r.unacked_samples(), 3200);
        // Reconnect: the new turn starts at 0.6 s; replay is the 0.4 s after the phrase.
        let replay = r.begin_turn();
        assert_eq!(replay.iter().map(Vec::len).sum::<usize>(), 6400);
        assert_eq!(
            r.on_message(success("dua", 1_000_000, 1_000_000)),
            emit_final("dua", 700, 100)
        );
        // A phrase that ends before what was already acknowledged is a duplicate.
        assert_eq!(r.on_message(success("dua", 0, 1_000_000)), Action::Progress);
    }

    #[test]
    fn statuses() {
        let mut r = rec(16000);
        r.push_audio(&[0; 16000]);
        while r.next_chunk(false).is_some() {}
        // Wordless phrases end the caller's turn with an empty Final and acknowledge audio.
        assert_eq!(
            r.on_message(phrase(None, RecognitionStatus::NoMatch, 0, 5_000_000)),
            emit_final("", 0, 500)
        );
        assert_eq!(r.unacked_samples(), 8000);
        assert_eq!(
            r.on_message(phrase(
                None,
                RecognitionStatus::InitialSilenceTimeout,
                5_000_000,
                1_000_000
            )),
            emit_final("", 500, 100)
        );
        assert_eq!(
            r.on_message(phrase(
                None,
                RecognitionStatus::BabbleTimeout,
                6_000_000,
                1_000_000
            )),
            emit_final("", 600, 100)
        );
        assert_eq!(
            r.on_message(phrase(
                Some(""),
                RecognitionStatus::Success,
                7_000_000,
                1_000_000
            )),
            emit_final("", 700, 100)
        );
        // A replayed wordless phrase is a duplicate like any other.
        assert_eq!(
            r.on_message(phrase(None, RecognitionStatus::NoMatch, 0, 1_000_000)),
            Action::Progress
        );
        assert_eq!(r.unacked_samples(), 16000 - 12800);
        assert_eq!(
            r.on_message(phrase(None, RecognitionStatus::EndOfDictation, 0, 0)),
            Action::Progress
        );
        assert!(matches!(
            r.on_message(phrase(None, RecognitionStatus::Error, 0, 0)),
            Action::Retry(_)
        ));
        assert!(matches!(
            r.on_message(phrase(None, RecognitionStatus::TooManyRequests, 0, 0)),
            Action::Retry(_)
        ));
        assert!(matches!(
            r.on_message(phrase(None, RecognitionStatus::BadRequest, 0, 0)),
            Action::Fatal(_)
        ));
        assert!(matches!(
            r.on_message(phrase(None, RecognitionStatus::Forbidden, 0, 0)),
            Action::Fatal(_)
        ));
        assert_eq!(r.on_message(ServiceMessage::TurnEnd), Action::TurnEnded);
        assert_eq!(
            r.on_message(ServiceMessage::SpeechStartDetected { offset: 0 }),
            Action::Emit(SttEvent::SpeechStarted)
        );
        assert_eq!(
            r.on_message(ServiceMessage::Hypothesis {
                text: "apa".into(),
                offset: 0,
                duration: 0,
                language: None,
            }),
            Action::Emit(SttEvent::Partial("apa".into()))
        );
        // Ack never goes past what was sent.
        assert_eq!(
            r.on_message(success("x", 0, 100_000_000)),
            emit_final("x", 0, 10_000)
        );
        assert_eq!(r.unacked_samples(), 0);
    }

    #[test]
    fn replay_buffer_is_bounded() {
        let mut r = rec(8000); // 1 s cap
        r.push_audio(&[0; 20_000]);
        assert_eq!(r.pending.len(), 8000);
        assert_eq!(r.dropped, 12_000);
        while r.next_chunk(false).is_some() {}
        r.push_audio(&[0; 4000]);
        while r.next_chunk(false).is_some() {}
        // 12 full 40 ms chunks went out; 160 samples wait for the next one.
        assert_eq!(r.pending.len(), 160);
        assert_eq!(r.unacked_samples(), 8000);
        assert_eq!(r.unacked_start, 3840);
        let replay = r.begin_turn();
        assert_eq!(r.turn_base, 3840);
        assert_eq!(replay.iter().map(Vec::len).sum::<usize>(), 16_000);
    }

    #[test]
    fn config_errors() {
        let mut s = Settings::defaults().stt;
        assert!(matches!(
            AzureStt::new(&s, Secret::new(None)),
            Err(SttError::Config(_))
        ));
        s.endpoint = "http://x".into();
        assert!(matches!(
            AzureStt::new(&s, Secret::new(Some("k".into()))),
            Err(SttError::Config(_))
        ));
        assert!(
            validate(&SttParams {
                sample_rate: 44100,
                ..params(8000)
            })
            .is_err()
        );
        assert!(
            validate(&SttParams {
                language: "ms MY&x=1".into(),
                ..params(8000)
            })
            .is_err()
        );
        assert!(validate(&params(16000)).is_ok());
        let seg = |ms| SttParams {
            segmentation_silence_ms: ms,
            ..params(8000)
        };
        assert_eq!(
            request_url("ws://h/p", &seg(500)),
            "ws://h/p?language=ms-MY&format=simple&segmentationSilenceTimeoutMs=500"
        );
        assert_eq!(
            request_url("ws://h/p?cid=1", &seg(300)),
            "ws://h/p?cid=1&language=ms-MY&format=simple&segmentationSilenceTimeoutMs=300"
        );
        assert!(
            validate(&SttParams {
                languages: vec!["ms-MY".into(), "en US".into()],
                ..params(8000)
            })
            .is_err()
        );
        assert!(
            validate(&SttParams {
                languages: (0..11).map(|i| format!("x{i}-XX")).collect(),
                ..params(8000)
            })
            .is_err()
        );
        assert!(validate(&lid_params(8000)).is_ok());
    }

    #[test]
    fn language_identification_moves_to_v2_and_says_so_in_the_query() {
        let region = Settings::defaults().stt;
        let v1 = SttSettings {
            region: "southeastasia".into(),
            ..region
        }
        .websocket_url();
        // As the SDK builds it: language, format, lidEnabled, then the common parameters.
        assert_eq!(
            request_url(&v1, &lid_params(8000)),
            "wss://southeastasia.stt.speech.microsoft.com/stt/speech/universal/v2\
             ?language=ms-MY&format=simple&lidEnabled=true&segmentationSilenceTimeoutMs=300"
        );
        // One language (or none listed) is today's request, on today's path.
        let one = SttParams {
            languages: vec!["ms-MY".into()],
            ..params(8000)
        };
        assert!(!one.identifies_language());
        assert_eq!(
            request_url(&v1, &one),
            format!("{v1}?language=ms-MY&format=simple&segmentationSilenceTimeoutMs=300")
        );
        // A path of the operator's own is kept.
        assert_eq!(
            request_url("wss://proxy.example/stt?cid=7", &lid_params(8000)),
            "wss://proxy.example/stt?cid=7&language=ms-MY&format=simple&lidEnabled=true&segmentationSilenceTimeoutMs=300"
        );
    }

    #[test]
    fn finals_carry_the_detected_language() {
        use protocol::PrimaryLanguage;
        let mut r = Recognition::new(&lid_params(8000), &AzureSttOptions::default());
        r.push_audio(&[0; 16_000]);
        while r.next_chunk(false).is_some() {}
        let with = |text: &str, offset: u64, language: &str| ServiceMessage::Phrase {
            status: RecognitionStatus::Success,
            display_text: Some(text.into()),
            offset,
            duration: 1_000_000,
            language: Some(PrimaryLanguage {
                language: language.into(),
                confidence: Some("High".into()),
            }),
        };
        let language_of = |a: Action| match a {
            Action::Emit(SttEvent::Final { language, .. }) => language,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            language_of(r.on_message(with("Berapa harganya?", 0, "ms-MY"))),
            Some("ms-MY".into())
        );
        assert_eq!(
            language_of(r.on_message(with("How much is it?", 2_000_000, "en-US"))),
            Some("en-US".into())
        );
        // The service could not tell: no language rather than a made-up one.
        assert_eq!(
            language_of(r.on_message(with("Hmm.", 4_000_000, "Unknown"))),
            None
        );
        assert_eq!(
            language_of(r.on_message(success("Ya.", 6_000_000, 1_000_000))),
            None
        );
    }

    // ---- against the fake server ----

    /// `bursts` times: 1 s of 440 Hz at -10 dBFS, then 1 s of silence.
    fn tone_bursts(rate: u32, bursts: usize) -> Vec<i16> {
        let amp = 32768.0 * 10f64.powf(-10.0 / 20.0) * std::f64::consts::SQRT_2;
        let mut out = Vec::new();
        for _ in 0..bursts {
            for n in 0..rate {
                let t = f64::from(n) / f64::from(rate);
                out.push(
                    (amp * (2.0 * std::f64::consts::PI * 440.0 * t).sin()).clamp(-32768.0, 32767.0)
                        as i16,
                );
            }
            out.extend(std::iter::repeat_n(0i16, rate as usize));
        }
        out
    }

    fn client(fake: &FakeAzure, key: &str, opts: AzureSttOptions) -> AzureStt {
        let mut s = Settings::defaults().stt;
        s.endpoint = fake.url();
        AzureStt::new(&s, Secret::new(Some(key.into())))
            .unwrap()
            .with_options(opts)
    }

    async fn start_fake(fault: AzureFault) -> FakeAzure {
        FakeAzure::spawn(fake_cfg(fault)).await.unwrap()
    }

    /// A recognition at `rate` against `fake` with the right key.
    async fn open_session(fake: &FakeAzure, opts: AzureSttOptions, rate: u32) -> SttSession {
        let stt = client(fake, "good-key", opts);
        stt.start(params(rate)).await.unwrap()
    }

    fn backoff_ms(ms: u64) -> AzureSttOptions {
        AzureSttOptions {
            reconnect_backoff: Duration::from_millis(ms),
            ..Default::default()
        }
    }

    /// Every event until the driver closes the channel.
    async fn drain(events: &mut mpsc::Receiver<SttEvent>) -> Vec<SttEvent> {
        let mut out = Vec::new();
        let collect = async {
            while let Some(ev) = events.recv().await {
                out.push(ev);
            }
        };
        timeout(Duration::from_secs(30), collect)
            .await
            .expect("recognition hung");
        out
    }

    fn fake_cfg(fault: AzureFault) -> FakeAzureConfig {
        FakeAzureConfig {
            key: Some("good-key".into()),
            transcripts: vec![
                "Apa khabar hari ini".into(),
                "Saya mahu buat tempahan".into(),
            ],
            final_delay_ms: 50,
            hypothesis_every_ms: 200,
            fault,
            ..Default::default()
        }
    }

    /// Feeds `pcm` in 20 ms frames, `pace` per frame, then hangs up; collects every event.
    async fn run_call(
        session: SttSession,
        pcm: Vec<i16>,
        rate: u32,
        pace: Duration,
    ) -> Vec<SttEvent> {
        let SttSession { audio, mut events } = session;
        let feeder = tokio::spawn(async move {
            for frame in pcm.chunks(rate as usize / 50) {
                if audio.send(frame.to_vec()).await.is_err() {
                    break;
                }
                if !pace.is_zero() {
                    sleep(pace).await;
                }
            }
        });
        let out = drain(&mut events).await;
        feeder.abort();
        out
    }

    fn finals(events: &[SttEvent]) -> Vec<(String, u64, u64)> {
        events
            .iter()
            .filter_map(|e| match e {
                SttEvent::Final {
                    text,
                    offset_ms,
                    duration_ms,
                    ..
                } => Some((text.clone(), *offset_ms, *duration_ms)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn recognises_two_phrases_at_8k() {
        let fake = start_fake(AzureFault::None).await;
        let session = open_session(&fake, AzureSttOptions::default(), 8000).await;
        let events = run_call(session, tone_bursts(8000, 2), 8000, Duration::ZERO).await;

        let f = finals(&events);
        assert_eq!(f.len(), 2, "{events:?}");
        assert_eq!(f[0].0, "Apa khabar hari ini");
        assert_eq!(f[1].0, "Saya mahu buat tempahan");
        // Speech at 0-1 s and 2-3 s (20 ms endpointer granularity).
        assert!(f[0].1 <= 20 && (980..=1020).contains(&f[0].2), "{f:?}");
        assert!(
            (1980..=2020).contains(&f[1].1) && (980..=1020).contains(&f[1].2),
            "{f:?}"
        );
        // Partials precede the first final, and SpeechStarted comes first of all.
        let first_final = events
            .iter()
            .position(|e| matches!(e, SttEvent::Final { .. }))
            .unwrap();
        assert!(
            events[..first_final]
                .iter()
                .any(|e| matches!(e, SttEvent::Partial(_))),
            "{events:?}"
        );
        assert_eq!(events.first(), Some(&SttEvent::SpeechStarted));
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, SttEvent::Failed(_) | SttEvent::Reconnected))
        );

        let stats = fake.stats();
        assert_eq!(stats.connections, 1);
        assert_eq!(stats.sample_rates, vec![8000]);
        assert_eq!(stats.audio_bytes, 8000 * 4 * 2);
        assert_eq!(stats.end_of_streams, 1);
        assert_eq!(stats.segmentation_silence_ms, vec![300]);
        assert_eq!(stats.languages, vec!["ms-MY".to_string()]);
        let ctx = &stats.contexts[0];
        assert_eq!(ctx["phraseDetection"]["language"], "ms-MY");
    }

    #[tokio::test]
    async fn declares_16k() {
        let fake = start_fake(AzureFault::None).await;
        let session = open_session(&fake, AzureSttOptions::default(), 16000).await;
        let events = run_call(session, tone_bursts(16000, 1), 16000, Duration::ZERO).await;
        assert_eq!(finals(&events).len(), 1, "{events:?}");
        let stats = fake.stats();
        assert_eq!(stats.sample_rates, vec![16000]);
        assert_eq!(stats.audio_bytes, 16000 * 2 * 2);
    }

    #[tokio::test]
    async fn bad_key_is_unauthorized() {
        for (fault, key) in [
            (AzureFault::None, "wrong-key"),
            (AzureFault::RejectAuth, "good-key"),
        ] {
            let fake = start_fake(fault).await;
            let stt = client(&fake, key, AzureSttOptions::default());
            assert!(matches!(
                stt.start(params(8000)).await,
                Err(SttError::Unauthorized(401))
            ));
        }
    }

    #[tokio::test]
    async fn connection_refused_is_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mut s = Settings::defaults().stt;
        s.endpoint = format!("ws://{addr}/speech/recognition/conversation/cognitiveservices/v1");
        let stt = AzureStt::new(&s, Secret::new(Some("k".into()))).unwrap();
        assert!(matches!(
            stt.start(params(8000)).await,
            Err(SttError::Connect(_))
        ));
    }

    #[tokio::test]
    async fn reconnects_and_replays_after_server_close() {
        // The server drops every connection after 700 ms; audio is paced at 4x real time,
        // so each phrase spans a connection drop.
        let fake = start_fake(AzureFault::CloseAfterMs(700)).await;
        let session = open_session(&fake, backoff_ms(20), 8000).await;
        let events = run_call(
            session,
            tone_bursts(8000, 2),
            8000,
            Duration::from_millis(5),
        )
        .await;

        assert!(events.contains(&SttEvent::Reconnected), "{events:?}");
        assert!(
            !events.iter().any(|e| matches!(e, SttEvent::Failed(_))),
            "{events:?}"
        );
        let f = finals(&events);
        assert_eq!(
            f.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            ["Apa khabar hari ini", "Saya mahu buat tempahan"],
            "{events:?}"
        );
        // Offsets are on the whole call's timeline despite the reconnects.
        assert!(f[0].1 <= 20 && (1980..=2020).contains(&f[1].1), "{f:?}");
        let stats = fake.stats();
        assert!(stats.connections >= 2, "{stats:?}");
        // Replay means the server received more audio than the call produced.
        assert!(stats.audio_bytes > 8000 * 4 * 2, "{stats:?}");
    }

    #[tokio::test]
    async fn gives_up_when_service_never_answers() {
        let fake = start_fake(AzureFault::Stall).await;
        let opts = AzureSttOptions {
            first_message_timeout: Duration::from_millis(1000),
            max_reconnects: 2,
            ..backoff_ms(10)
        };
        let SttSession { audio, mut events } = open_session(&fake, opts, 8000).await;
        // 12 s of unbroken speech: nothing is ever acknowledged, so every reconnect replays
        // all of it (300 chunks, more than a naive write queue would hold).
        let tone: Vec<i16> = tone_bursts(8000, 12)
            .chunks(16_000)
            .flat_map(|c| c[..8000].to_vec())
            .collect();
        for frame in tone.chunks(160) {
            audio.send(frame.to_vec()).await.unwrap();
        }
        let got = drain(&mut events).await;
        drop(audio);
        assert_eq!(
            got.iter().filter(|e| **e == SttEvent::Reconnected).count(),
            2,
            "{got:?}"
        );
        assert!(matches!(got.last(), Some(SttEvent::Failed(_))), "{got:?}");
        let stats = fake.stats();
        assert_eq!(stats.connections, 3);
        assert_eq!(stats.audio_bytes, 3 * 12 * 16_000, "{stats:?}");
    }

    #[tokio::test]
    async fn gives_up_when_server_is_gone() {
        let fake = start_fake(AzureFault::DropAfterPhrases(1)).await;
        let SttSession { audio, mut events } = open_session(&fake, backoff_ms(10), 8000).await;
        // Stop accepting: reconnects are refused.
        fake.stop_accepting();
        let pcm = tone_bursts(8000, 2);
        let feeder = tokio::spawn(async move {
            for frame in pcm.chunks(160) {
                let _ = audio.send(frame.to_vec()).await;
            }
            // Keep the call up until the driver gives up.
            audio.closed().await;
        });
        let got = drain(&mut events).await;
        feeder.abort();
        assert_eq!(finals(&got).len(), 1, "{got:?}");
        assert!(!got.contains(&SttEvent::Reconnected), "{got:?}");
        assert!(matches!(got.last(), Some(SttEvent::Failed(_))), "{got:?}");
    }

    /// Sends all of `pcm` at once and keeps the audio open (the caller is still on the line)
    /// until `finals` finals or a failure arrived; then hangs up and collects the rest.
    async fn run_until_finals(session: SttSession, pcm: Vec<i16>, finals: usize) -> Vec<SttEvent> {
        let SttSession { audio, mut events } = session;
        for frame in pcm.chunks(160) {
            audio.send(frame.to_vec()).await.unwrap();
        }
        let mut out = Vec::new();
        let wait = async {
            while let Some(ev) = events.recv().await {
                let done = matches!(ev, SttEvent::Failed(_))
                    || (matches!(ev, SttEvent::Final { .. }) && finals_count(&out) + 1 == finals);
                out.push(ev);
                if done {
                    break;
                }
            }
        };
        timeout(Duration::from_secs(30), wait)
            .await
            .expect("recognition hung");
        drop(audio);
        out.extend(drain(&mut events).await);
        out
    }

    fn finals_count(events: &[SttEvent]) -> usize {
        events
            .iter()
            .filter(|e| matches!(e, SttEvent::Final { .. }))
            .count()
    }

    async fn start_fake_with(f: impl FnOnce(&mut FakeAzureConfig)) -> FakeAzure {
        let mut cfg = fake_cfg(AzureFault::None);
        cfg.record = true;
        f(&mut cfg);
        FakeAzure::spawn(cfg).await.unwrap()
    }

    #[tokio::test]
    async fn turn_end_mid_audio_opens_the_next_turn_on_the_same_socket() {
        // The service ends the turn after every phrase while audio flows. Before: the client
        // closed, waited and reconnected (a Reconnected event, a second connection).
        let fake = start_fake_with(|c| c.fault = AzureFault::TurnEndAfterPhrases(1)).await;
        let session = open_session(&fake, AzureSttOptions::default(), 8000).await;
        let events = run_until_finals(session, tone_bursts(8000, 3), 3).await;

        let f = finals(&events);
        assert_eq!(
            f.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            [
                "Apa khabar hari ini",
                "Saya mahu buat tempahan",
                "Apa khabar hari ini"
            ],
            "{events:?}"
        );
        // Offsets stay on the call's timeline across the turns.
        for (i, (_, offset, duration)) in f.iter().enumerate() {
            let start = 2000 * i as u64;
            assert!(
                (start..=start + 20).contains(offset) && (980..=1020).contains(duration),
                "{f:?}"
            );
        }
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, SttEvent::Reconnected | SttEvent::Failed(_))),
            "{events:?}"
        );
        let st = fake.stats();
        assert_eq!(st.connections, 1, "no reconnect");
        assert_eq!(st.turns_cut, 3, "{st:?}");
        assert_eq!(st.turns, 4, "three cut turns and the last one");
        assert!(st.violations.is_empty(), "{:?}", st.violations);
        // Each turn: speech.context then the WAV header under a fresh request id; one
        // speech.config for the connection.
        let msgs = &st.messages;
        assert_eq!(
            msgs.iter().filter(|m| m.path() == "speech.config").count(),
            1
        );
        let contexts: Vec<&RecordedMessage> = msgs
            .iter()
            .filter(|m| m.path() == "speech.context")
            .collect();
        assert_eq!(contexts.len(), 4);
        let mut ids: Vec<&str> = contexts
            .iter()
            .map(|m| m.header("X-RequestId").unwrap())
            .collect();
        ids.dedup();
        assert_eq!(ids.len(), 4, "a new request id per turn");
        for (i, m) in msgs.iter().enumerate() {
            if m.path() == "speech.context" {
                let next = &msgs[i + 1];
                assert_eq!(next.path(), "audio");
                assert_eq!(next.header("Content-Type"), Some("audio/x-wav"));
                assert_eq!(next.header("X-RequestId"), m.header("X-RequestId"));
                assert!(next.body.starts_with(b"RIFF"));
            }
        }
        assert_eq!(st.sample_rates, vec![8000; 4]);
    }

    #[tokio::test]
    async fn wordless_phrases_fragments_and_numeric_statuses() {
        let fake = start_fake_with(|c| {
            c.phrase_statuses = ["NoMatch", "InitialSilenceTimeout", "BabbleTimeout"]
                .map(String::from)
                .to_vec();
            c.status_as_number = true;
            c.fragments = true;
        })
        .await;
        let session = open_session(&fake, AzureSttOptions::default(), 8000).await;
        let events = run_until_finals(session, tone_bursts(8000, 4), 4).await;
        let f = finals(&events);
        assert_eq!(
            f.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            ["", "", "", "Apa khabar hari ini"],
            "{events:?}"
        );
        assert_eq!(f[3].1 / 100, 60, "{f:?}");
        assert!(
            events.iter().any(|e| matches!(e, SttEvent::Partial(_))),
            "fragments are partials: {events:?}"
        );
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, SttEvent::Reconnected | SttEvent::Failed(_))),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn an_error_status_reconnects_and_recognition_goes_on() {
        let fake = start_fake_with(|c| c.phrase_statuses = vec!["Error".into()]).await;
        let session = open_session(&fake, AzureSttOptions::default(), 8000).await;
        let events = run_until_finals(session, tone_bursts(8000, 2), 2).await;
        assert_eq!(
            finals(&events)
                .iter()
                .map(|x| x.0.as_str())
                .collect::<Vec<_>>(),
            ["Apa khabar hari ini", "Saya mahu buat tempahan"],
            "the errored phrase is replayed and recognised: {events:?}"
        );
        assert_eq!(
            events
                .iter()
                .filter(|e| **e == SttEvent::Reconnected)
                .count(),
            1
        );
        assert_eq!(fake.stats().connections, 2);
    }

    #[tokio::test]
    async fn too_many_requests_over_and_over_fails() {
        let fake = start_fake_with(|c| {
            c.phrase_statuses = vec!["TooManyRequests".into(); 10];
        })
        .await;
        let opts = AzureSttOptions {
            max_reconnects: 2,
            ..Default::default()
        };
        let session = open_session(&fake, opts, 8000).await;
        let events = run_until_finals(session, tone_bursts(8000, 1), 1).await;
        assert_eq!(
            events
                .iter()
                .filter(|e| **e == SttEvent::Reconnected)
                .count(),
            2,
            "{events:?}"
        );
        assert!(
            matches!(events.last(), Some(SttEvent::Failed(r)) if r.contains("TooManyRequests")),
            "{events:?}"
        );
        assert_eq!(finals(&events).len(), 0);
    }

    #[tokio::test]
    async fn fatal_close_codes_are_not_retried() {
        for code in [1002, 1003, 1007, 4000] {
            let fake = start_fake(AzureFault::CloseWithAfterMs(code, 200)).await;
            let session = open_session(&fake, AzureSttOptions::default(), 8000).await;
            let events = run_until_finals(session, tone_bursts(8000, 3), 99).await;
            assert!(
                matches!(events.last(), Some(SttEvent::Failed(r)) if r.contains(&code.to_string())),
                "{code}: {events:?}"
            );
            assert!(
                !events.contains(&SttEvent::Reconnected),
                "{code}: {events:?}"
            );
            assert_eq!(fake.stats().connections, 1, "{code}");
        }
        // 1011 is worth a retry.
        let fake = start_fake(AzureFault::CloseWithAfterMs(1011, 200)).await;
        let session = open_session(&fake, backoff_ms(10), 8000).await;
        let events = run_until_finals(session, tone_bursts(8000, 3), 99).await;
        assert!(events.contains(&SttEvent::Reconnected), "{events:?}");
    }

    #[tokio::test]
    async fn the_connection_cap_is_crossed_seamlessly() {
        // The service closes every connection 700 ms after it opens (10 minutes for the real
        // one); audio paced at 4x real time spans several caps.
        let fake = start_fake_with(|c| c.connection_cap_ms = 700).await;
        let session = open_session(&fake, AzureSttOptions::default(), 8000).await;
        let events = run_call(
            session,
            tone_bursts(8000, 2),
            8000,
            Duration::from_millis(5),
        )
        .await;
        assert_eq!(
            finals(&events)
                .iter()
                .map(|x| x.0.as_str())
                .collect::<Vec<_>>(),
            ["Apa khabar hari ini", "Saya mahu buat tempahan"],
            "{events:?}"
        );
        assert!(
            !events.iter().any(|e| matches!(e, SttEvent::Failed(_))),
            "{events:?}"
        );
        let st = fake.stats();
        assert!(st.capped >= 1, "{st:?}");
        assert_eq!(st.connections, st.capped + 1);
    }

    #[tokio::test]
    async fn an_old_connection_is_replaced_between_phrases_before_the_cap() {
        let fake = start_fake_with(|_| {}).await;
        let opts = AzureSttOptions {
            rollover_after: Duration::from_millis(300),
            ..Default::default()
        };
        let session = open_session(&fake, opts, 8000).await;
        // At 4x real time the second final comes at least 1.3 s after the start.
        let events = run_call(
            session,
            tone_bursts(8000, 3),
            8000,
            Duration::from_millis(5),
        )
        .await;
        let f = finals(&events);
        assert_eq!(
            f.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            [
                "Apa khabar hari ini",
                "Saya mahu buat tempahan",
                "Apa khabar hari ini"
            ],
            "{events:?}"
        );
        for (i, (_, offset, _)) in f.iter().enumerate() {
            let start = 2000 * i as u64;
            assert!((start..=start + 20).contains(offset), "{f:?}");
        }
        assert!(
            !events.iter().any(|e| matches!(e, SttEvent::Failed(_))),
            "{events:?}"
        );
        let st = fake.stats();
        assert!(st.connections >= 2, "{st:?}");
        assert_eq!(st.capped, 0);
        // Each new connection began right after a phrase: only the silence since its end
        // (under a second) is resent, never the phrase.
        let resent = st.audio_bytes - 8000 * 6 * 2;
        assert!(
            resent < (st.connections as u64 - 1) * 16_000,
            "{resent} bytes resent over {} connections",
            st.connections
        );
    }

    #[tokio::test]
    async fn dropping_events_stops_the_driver() {
        let fake = start_fake(AzureFault::None).await;
        let SttSession { audio, events } =
            open_session(&fake, AzureSttOptions::default(), 8000).await;
        drop(events);
        // The driver drops its audio receiver when it stops.
        timeout(Duration::from_secs(10), audio.closed())
            .await
            .expect("driver kept running");
    }
}
