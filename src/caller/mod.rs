//! A synthetic Asterisk: places one AudioSocket call against a server and reports what the
//! server did, so operators can test a deployment from the VPS (`sifucall call ...`) and the
//! integration tests and benchmarks can drive the daemon without a PBX.
//!
//! It behaves like `app_audiosocket` on a live channel: TCP_NODELAY, the UUID message
//! first, then one audio message every 20 ms on an absolute schedule (no drift), DTMF as a
//! lone 0x03 message at its time, every message in one write, the socket read the whole
//! time, and a caller hangup is a plain close (never 0x00). It judges the server the way
//! Asterisk would: a forbidden kind or an empty audio frame ends the call (unless
//! [`CallOptions::abort_on_violation`] is off), 0x00 or a close is a graceful end.
//!
//! The send plan (`script`) and the analysis of what comes back (`observer`) are sans-IO;
//! [`place_call`] is the thin driver that runs both halves of the socket concurrently in one
//! task and closes it when either side ends the call.

mod dialogue;
mod line;
mod observer;
mod script;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::audio::resample::resample_linear;
use crate::audio::{pcm, wav};
use crate::audiosocket::{CallerCodec, Digit, FrameError, Inbound, MAX_PAYLOAD, SampleRate};

pub use dialogue::{DialogueOptions, DialogueReport, DialogueTurn, place_dialogue};
pub use line::{LineNoise, LineOptions, NoiseColour};
pub use observer::{FrameArrival, GAP_TOLERANCE, JitterStats, SILENCE_DBFS};
use observer::{Observer, Verdict};
use script::{Action, Script, ScriptSpec};

/// Default connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default upper bound on a whole call.
pub const MAX_CALL: Duration = Duration::from_secs(600);
/// The largest accepted [`CallOptions::max_duration`].
pub const MAX_CALL_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// Default silence sent after the audio before hanging up.
pub const DEFAULT_TAIL: Duration = Duration::from_secs(3);
/// When the first digit of a [`parse_dtmf`] string is sent.
pub const DTMF_START: Duration = Duration::from_secs(1);
/// Spacing of [`parse_dtmf`] digits, and the length of a `w` pause.
pub const DTMF_SPACING: Duration = Duration::from_millis(500);
/// A write that cannot complete in this long ends the call (Asterisk's own writes are
/// non-blocking, and it drops a call after 2 s without traffic anyway).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// After the server's 0x00, how long to keep reading to catch bytes sent after it (or,
/// after a failed write, to learn whether the server closed or hung up).
const DRAIN: Duration = Duration::from_millis(100);

/// How to place a call. Build with [`CallOptions::new`] and adjust the fields.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// `host:port` of the AudioSocket server.
    pub addr: String,
    /// The UUID sent in the first message.
    pub call_id: Uuid,
    /// The call's rate: 8 kHz sends kind 0x10, 16 kHz kind 0x12 (`c(slin16)`).
    pub rate: SampleRate,
    /// What the caller says, at `rate`.
    pub play: Vec<i16>,
    /// Silence before `play`.
    pub lead_silence: Duration,
    /// Digits to send, each at its offset from the call start (see [`parse_dtmf`]).
    pub dtmf: Vec<(Duration, Digit)>,
    /// Hang up this long after the call start, whatever else is going on.
    pub hangup_after: Option<Duration>,
    /// Silence sent after `play` before hanging up (ignored with `until_server_hangup` or
    /// `hangup_after`).
    pub tail: Duration,
    /// Audio payload sizes in bytes, cycled (e.g. `[320, 288]` as seen from real Asterisk);
    /// `None` sends 20 ms frames. Frames are always due when their first sample would be
    /// captured, so any pattern stays exactly real-time.
    pub frame_bytes_pattern: Option<Vec<usize>>,
    /// Keep the call up with silence after `play` until the server sends 0x00 or closes,
    /// bounded by `hangup_after` and `max_duration`.
    pub until_server_hangup: bool,
    /// Drop the call on a forbidden kind or an empty audio frame, as Asterisk does; when
    /// off, such messages are only reported.
    pub abort_on_violation: bool,
    /// Bound on name resolution plus TCP connect.
    pub connect_timeout: Duration,
    /// Hard bound on the call, from the UUID message to the hangup.
    pub max_duration: Duration,
}

impl CallOptions {
    /// An 8 kHz call to `addr` with a fresh UUID, nothing to play, a 3 s tail.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            call_id: Uuid::new_v4(),
            rate: SampleRate::Hz8000,
            play: Vec::new(),
            lead_silence: Duration::ZERO,
            dtmf: Vec::new(),
            hangup_after: None,
            tail: DEFAULT_TAIL,
            frame_bytes_pattern: None,
            until_server_hangup: false,
            abort_on_violation: true,
            connect_timeout: CONNECT_TIMEOUT,
            max_duration: MAX_CALL,
        }
    }
}

/// Why a call could not be placed (or its inputs prepared). Anything that goes wrong once
/// connected is part of the [`CallReport`] instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallerError {
    /// `addr` did not resolve.
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// `addr` resolved to nothing.
    #[error("{0} resolved to no address")]
    NoAddress(String),
    /// The TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Resolve plus connect took longer than the connect timeout.
    #[error("connecting to {addr} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The address.
        addr: String,
        /// The timeout.
        timeout: Duration,
    },
    /// An option is out of range.
    #[error("invalid call option: {0}")]
    InvalidOption(String),
    /// A DTMF string holds something other than `0-9 * # A-D w`.
    #[error("invalid DTMF character {0:?} (allowed: 0-9 * # A-D, w = 500 ms pause)")]
    BadDtmf(char),
    /// A WAV file could not be read or written.
    #[error(transparent)]
    Wav(#[from] wav::WavError),
}

/// Who ended the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClosedBy {
    /// We hung up (closed the socket) on schedule.
    Caller,
    /// The server sent 0x00.
    ServerHangup,
    /// The server closed the socket cleanly between messages.
    ServerClose,
    /// A socket error, a truncated message, or a message Asterisk aborts the call on.
    Error,
}

impl std::fmt::Display for ClosedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Caller => "caller",
            Self::ServerHangup => "server_hangup",
            Self::ServerClose => "server_close",
            Self::Error => "error",
        })
    }
}

/// What happened on a call. Times are milliseconds; "call start" is when the UUID message
/// was sent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallReport {
    /// The UUID we sent.
    pub call_id: Uuid,
    /// The call's rate (and the rate of `recording`).
    pub rate_hz: u32,
    /// Audio messages sent.
    pub frames_sent: u64,
    /// Digits sent, in order.
    pub dtmf_sent: String,
    /// Audio messages received (of any rate).
    pub frames_received: u64,
    /// Messages of any kind received, including those after the server's hangup.
    pub messages_received: u64,
    /// Bytes received on the wire (headers included).
    pub bytes_received: u64,
    /// Duration of all audio received.
    pub audio_received_ms: f64,
    /// Distinct rates of the audio received, in order of first appearance.
    pub received_rates: Vec<u32>,
    /// What Asterisk would object to: forbidden kinds, empty or odd-length audio, audio at
    /// another rate than the call's, bytes after the server's hangup, truncated messages.
    pub protocol_violations: Vec<String>,
    /// How many violations there were (the list keeps the first few).
    pub violation_count: u64,
    /// From our first audio frame to the first audio frame received, whatever it holds.
    pub first_frame_latency_ms: Option<f64>,
    /// From our first audio frame to the first non-silent audio frame received (the
    /// greeting); negative if the server spoke before it knew the call's rate.
    pub first_audio_latency_ms: Option<f64>,
    /// From the frame holding the last sample of `play` to the first non-silent frame
    /// received after it (the reply to what the caller said).
    pub reply_latency_ms: Option<f64>,
    /// `|inter-arrival gap - previous frame's duration|` between consecutive audio frames.
    pub frame_jitter_ms: JitterStats,
    /// Longest time without any message from the server, counted from the call start to the
    /// end of the call (Asterisk drops a call after 2000 ms without traffic).
    pub max_gap_ms: f64,
    /// Most audio the server had sent ahead of real time (a burst a real channel would
    /// mostly drop); near 0 for a well-paced server.
    pub max_queue_ms: f64,
    /// Worst lateness of our own sends against their schedule (health of the test host).
    pub max_send_lag_ms: f64,
    /// The server sent 0x00.
    pub server_hangup: bool,
    /// Who ended the call.
    pub closed_by: ClosedBy,
    /// What went wrong when `closed_by` is `error`.
    pub error: Option<String>,
    /// From the call start to the event that ended it.
    pub duration_ms: f64,
    /// What came back, at the call's rate: each frame placed at its arrival time (gaps
    /// are silence), or right after the previous frame if it arrived within
    /// [`GAP_TOLERANCE`] of its end or before it (bursts are kept whole, in order).
    /// Frames at another rate are resampled linearly.
    #[serde(skip)]
    pub recording: Vec<i16>,
    /// Every audio frame received, timestamped when it was read from the socket.
    #[serde(skip)]
    pub arrivals: Vec<FrameArrival>,
}

impl CallReport {
    /// Writes `recording` as a 16-bit mono WAV at the call's rate.
    pub fn save_recording(&self, path: &Path) -> Result<(), CallerError> {
        Ok(wav::write(path, self.rate_hz, &self.recording)?)
    }
}

/// The report as pretty JSON (without the recording), for the CLI.
pub fn summary_json(report: &CallReport) -> String {
    serde_json::to_string_pretty(report)
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialise report: {e}\"}}"))
}

/// Parses a CLI DTMF string: digits `0-9 * # A-D` (lowercase accepted) spaced
/// [`DTMF_SPACING`] apart starting [`DTMF_START`] into the call; `w` is a pause of one
/// spacing.
pub fn parse_dtmf(spec: &str) -> Result<Vec<(Duration, Digit)>, CallerError> {
    let mut at = DTMF_START;
    let mut out = Vec::new();
    for c in spec.chars() {
        if c.eq_ignore_ascii_case(&'w') {
            at += DTMF_SPACING;
            continue;
        }
        let digit = u8::try_from(c.to_ascii_uppercase())
            .ok()
            .and_then(Digit::new)
            .ok_or(CallerError::BadDtmf(c))?;
        out.push((at, digit));
        at += DTMF_SPACING;
    }
    Ok(out)
}

/// Reads a 16-bit PCM WAV (stereo is mixed down) and converts it to `rate` by linear
/// interpolation (no anti-alias filter: fine for speech fixtures, not for measurement).
pub fn load_wav(path: &Path, rate: SampleRate) -> Result<Vec<i16>, CallerError> {
    let audio = wav::read(path)?;
    if audio.rate == 0 {
        return Err(CallerError::InvalidOption(format!(
            "{}: sample rate 0",
            path.display()
        )));
    }
    Ok(resample_linear(&audio.samples, audio.rate, rate.hz()))
}

/// Sample counts per frame from a byte pattern, validated like Asterisk's framing.
fn frame_pattern(opts: &CallOptions) -> Result<Vec<usize>, CallerError> {
    let Some(bytes) = &opts.frame_bytes_pattern else {
        return Ok(vec![opts.rate.samples_per_frame()]);
    };
    if bytes.is_empty() {
        return Err(CallerError::InvalidOption(
            "frame_bytes_pattern is empty".into(),
        ));
    }
    bytes
        .iter()
        .map(|&n| {
            if n == 0 || !n.is_multiple_of(2) || n > MAX_PAYLOAD {
                Err(CallerError::InvalidOption(format!(
                    "audio frame size {n}: must be even, non-zero and at most {MAX_PAYLOAD} bytes"
                )))
            } else {
                Ok(n / 2)
            }
        })
        .collect()
}

async fn connect(addr: &str, limit: Duration) -> Result<TcpStream, CallerError> {
    let attempt = async {
        let addrs = tokio::net::lookup_host(addr)
            .await
            .map_err(|source| CallerError::Resolve {
                addr: addr.to_owned(),
                source,
            })?;
        let mut last = None;
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(source) => CallerError::Connect {
                addr: addr.to_owned(),
                source,
            },
            None => CallerError::NoAddress(addr.to_owned()),
        })
    };
    timeout(limit, attempt)
        .await
        .map_err(|_| CallerError::ConnectTimeout {
            addr: addr.to_owned(),
            timeout: limit,
        })?
}

/// Places one call and reports on it. Errors only if the call cannot start; a call that
/// goes wrong once connected still yields a report (`closed_by: error`).
pub async fn place_call(opts: CallOptions) -> Result<CallReport, CallerError> {
    let pattern = frame_pattern(&opts)?;
    if opts.max_duration.is_zero() || opts.max_duration > MAX_CALL_LIMIT {
        return Err(CallerError::InvalidOption(format!(
            "max_duration must be positive and at most {MAX_CALL_LIMIT:?}"
        )));
    }
    let mut stream = connect(&opts.addr, opts.connect_timeout).await?;
    stream
        .set_nodelay(true)
        .map_err(|source| CallerError::Connect {
            addr: opts.addr.clone(),
            source,
        })?;
    let script = Script::new(ScriptSpec {
        rate: opts.rate,
        play: &opts.play,
        lead_silence: opts.lead_silence,
        tail: opts.tail,
        pattern,
        dtmf: &opts.dtmf,
        hangup_after: opts.hangup_after,
        until_server_hangup: opts.until_server_hangup,
        max_duration: opts.max_duration,
    });
    let limit = script.hangup_at() * 2 + Duration::from_secs(10);
    let mut obs = Observer::new(opts.rate, opts.abort_on_violation, limit);
    let tokens = Tokens::default();
    let play_done = PlayDone::default();
    let start = Instant::now();
    let (r, w) = stream.split();
    let (read_end, write_end) = tokio::join!(
        read_side(r, &mut obs, start, &tokens, &play_done),
        write_side(
            w,
            script,
            opts.call_id,
            opts.rate,
            start,
            &tokens,
            &play_done
        ),
    );
    // Closing the socket is the caller's hangup (and ends the call in every other case).
    drop(stream);

    let (closed_by, error, end) = match (read_end, &write_end.outcome) {
        (ReadEnd::Hangup(at), _) => (ClosedBy::ServerHangup, None, at),
        (ReadEnd::Closed(at), _) => (ClosedBy::ServerClose, None, at),
        (ReadEnd::Failed(e, at), _) | (ReadEnd::Aborted(e, at), _) => {
            (ClosedBy::Error, Some(e), at)
        }
        (ReadEnd::Stopped, WriteOutcome::Failed(e, at)) => (ClosedBy::Error, Some(e.clone()), *at),
        (ReadEnd::Stopped, WriteOutcome::Hangup(at)) => (ClosedBy::Caller, None, *at),
        (ReadEnd::Stopped, WriteOutcome::ServerEnded) => (
            ClosedBy::Error,
            Some("call ended without a cause".into()),
            start.elapsed(),
        ),
    };
    let violations = obs.finish(end);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let since_first_sent = |t: Option<Duration>| Some(ms(t?) - ms(write_end.first_audio_at?));
    Ok(CallReport {
        call_id: opts.call_id,
        rate_hz: opts.rate.hz(),
        frames_sent: write_end.frames_sent,
        dtmf_sent: write_end.dtmf_sent,
        frames_received: obs.frames_received,
        messages_received: obs.messages_received,
        bytes_received: obs.bytes_received,
        audio_received_ms: ms(obs.audio_received),
        received_rates: obs.rates.clone(),
        protocol_violations: violations,
        violation_count: obs.violation_count,
        first_frame_latency_ms: since_first_sent(obs.first_frame_at),
        first_audio_latency_ms: since_first_sent(obs.first_voiced_at),
        reply_latency_ms: obs
            .reply_at
            .zip(play_done.get())
            .map(|(r, p)| ms(r.saturating_sub(p))),
        frame_jitter_ms: obs.jitter_stats(),
        max_gap_ms: ms(obs.max_gap),
        max_queue_ms: ms(obs.max_queue),
        max_send_lag_ms: ms(write_end.max_lag),
        server_hangup: obs.hangup_at.is_some(),
        closed_by,
        error,
        duration_ms: ms(end),
        recording: std::mem::take(&mut obs.recording),
        arrivals: std::mem::take(&mut obs.arrivals),
    })
}

/// When the frame holding the last played sample was sent (shared by the two halves; an
/// atomic rather than a `Cell` so that [`place_call`]'s future stays `Send`).
#[derive(Debug)]
struct PlayDone(AtomicU64);

impl Default for PlayDone {
    fn default() -> Self {
        Self(AtomicU64::new(u64::MAX))
    }
}

impl PlayDone {
    fn set(&self, at: Duration) {
        let nanos = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX - 1);
        self.0.store(nanos, Ordering::Relaxed);
    }

    fn get(&self) -> Option<Duration> {
        let nanos = self.0.load(Ordering::Relaxed);
        (nanos != u64::MAX).then(|| Duration::from_nanos(nanos))
    }
}

/// How the two halves of the call tell each other to stop.
#[derive(Debug, Default)]
struct Tokens {
    /// Writer -> reader: we hang up now.
    hangup: CancellationToken,
    /// Writer -> reader: a write failed; find out why, briefly.
    write_failed: CancellationToken,
    /// Reader -> writer: the server ended the call (or broke it); stop sending.
    server_done: CancellationToken,
}

/// How the read side ended; the offsets are from the call start.
#[derive(Debug)]
enum ReadEnd {
    /// The writer ended the call.
    Stopped,
    /// 0x00 arrived.
    Hangup(Duration),
    /// Clean EOF between messages.
    Closed(Duration),
    /// Socket error or EOF inside a message.
    Failed(String, Duration),
    /// A message Asterisk aborts the call on.
    Aborted(String, Duration),
}

async fn read_side(
    r: ReadHalf<'_>,
    obs: &mut Observer,
    start: Instant,
    tokens: &Tokens,
    play_done: &PlayDone,
) -> ReadEnd {
    let mut framed = FramedRead::new(r, CallerCodec);
    let mut drain_until: Option<Instant> = None;
    let end = loop {
        let item = tokio::select! {
            biased;
            () = tokens.hangup.cancelled() => return ReadEnd::Stopped,
            () = tokens.write_failed.cancelled(), if drain_until.is_none() => {
                drain_until = Some(Instant::now() + DRAIN);
                continue;
            }
            () = sleep_until(drain_until.unwrap_or_else(Instant::now)), if drain_until.is_some() => {
                return ReadEnd::Stopped;
            }
            item = framed.next() => item,
        };
        let at = start.elapsed();
        match item {
            None => break ReadEnd::Closed(at),
            Some(Err(e)) => {
                if matches!(
                    e,
                    FrameError::Truncated { .. } | FrameError::TruncatedHeader(_)
                ) {
                    obs.violation_from_error(&e);
                }
                break ReadEnd::Failed(e.to_string(), at);
            }
            Some(Ok(frame)) => match obs.on_frame(at, frame, play_done.get()) {
                Verdict::Continue => {}
                Verdict::Abort(msg) => break ReadEnd::Aborted(msg, at),
                Verdict::Hangup => {
                    tokens.server_done.cancel();
                    let until = Instant::now() + DRAIN;
                    loop {
                        tokio::select! {
                            () = sleep_until(until) => break,
                            item = framed.next() => match item {
                                Some(Ok(frame)) => {
                                    obs.on_frame(start.elapsed(), frame, play_done.get());
                                }
                                _ => break,
                            },
                        }
                    }
                    break ReadEnd::Hangup(at);
                }
            },
        }
    };
    tokens.server_done.cancel();
    end
}

#[derive(Debug)]
enum WriteOutcome {
    /// We hung up on schedule, at this offset.
    Hangup(Duration),
    /// The reader saw the server end the call.
    ServerEnded,
    /// A write failed or stalled.
    Failed(String, Duration),
}

#[derive(Debug)]
struct WriteEnd {
    outcome: WriteOutcome,
    frames_sent: u64,
    dtmf_sent: String,
    first_audio_at: Option<Duration>,
    max_lag: Duration,
}

/// Sends one message in one write, unless the server ends the call first.
async fn send(
    w: &mut WriteHalf<'_>,
    buf: &mut BytesMut,
    msg: Inbound,
    server_done: &CancellationToken,
) -> Result<bool, String> {
    buf.clear();
    CallerCodec.encode(msg, buf).map_err(|e| e.to_string())?;
    tokio::select! {
        biased;
        () = server_done.cancelled() => Ok(false),
        res = timeout(WRITE_TIMEOUT, w.write_all(buf)) => match res {
            Ok(Ok(())) => Ok(true),
            Ok(Err(e)) => Err(format!("write failed: {e}")),
            Err(_) => Err(format!("write stalled for {WRITE_TIMEOUT:?}: the server is not reading")),
        },
    }
}

async fn write_side(
    mut w: WriteHalf<'_>,
    mut script: Script,
    call_id: Uuid,
    rate: SampleRate,
    start: Instant,
    tokens: &Tokens,
    play_done: &PlayDone,
) -> WriteEnd {
    let mut end = WriteEnd {
        outcome: WriteOutcome::ServerEnded,
        frames_sent: 0,
        dtmf_sent: String::new(),
        first_audio_at: None,
        max_lag: Duration::ZERO,
    };
    let mut buf = BytesMut::with_capacity(1024);
    let mut next = Some(Inbound::Uuid(call_id));
    let mut sent_at = Duration::ZERO;
    let mut ends_play = false;
    loop {
        if let Some(msg) = next.take() {
            let kind = match &msg {
                Inbound::Audio { .. } => Some(None),
                Inbound::Dtmf(d) => Some(Some(d.as_char())),
                _ => None,
            };
            match send(&mut w, &mut buf, msg, &tokens.server_done).await {
                Ok(true) => {}
                Ok(false) => return end,
                Err(e) => {
                    end.outcome = WriteOutcome::Failed(e, start.elapsed());
                    tokens.write_failed.cancel();
                    return end;
                }
            }
            match kind {
                Some(Some(digit)) => end.dtmf_sent.push(digit),
                Some(None) => {
                    end.frames_sent += 1;
                    end.first_audio_at.get_or_insert(sent_at);
                    if ends_play {
                        play_done.set(sent_at);
                    }
                }
                None => {}
            }
        }
        let (at, action) = script.next_action();
        let deadline = start + at;
        tokio::select! {
            biased;
            () = tokens.server_done.cancelled() => return end,
            () = sleep_until(deadline) => {}
        }
        let now = Instant::now();
        end.max_lag = end.max_lag.max(now.saturating_duration_since(deadline));
        sent_at = now.saturating_duration_since(start);
        next = Some(match action {
            Action::Hangup => {
                end.outcome = WriteOutcome::Hangup(sent_at);
                tokens.hangup.cancel();
                return end;
            }
            Action::Dtmf(d) => Inbound::Dtmf(d),
            Action::Audio {
                samples,
                ends_play: last,
            } => {
                ends_play = last;
                let mut pcm_bytes = Vec::with_capacity(samples.len() * 2);
                pcm::samples_to_le_bytes(&samples, &mut pcm_bytes);
                Inbound::Audio {
                    rate,
                    pcm: Bytes::from(pcm_bytes),
                }
            }
        });
    }
}
