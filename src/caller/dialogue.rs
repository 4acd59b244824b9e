//! A caller that holds a conversation instead of playing a fixed script: it waits for the
//! greeting, asks a question, waits until the agent has answered and gone quiet, asks again,
//! and can talk over a reply on purpose (barge-in). The benchmarks measure turn latency and
//! barge-in with it from the caller's side of the socket, so every frame it writes and every
//! frame it reads is timestamped at the socket, not when it was scheduled.
//!
//! [`Dialogue`] is the sans-IO turn-taking plan (fed the time and what was heard, it says
//! what the next 20 ms frame carries); [`place_dialogue`] is the thin driver that runs it
//! over one AudioSocket connection, reading and writing in one task.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::codec::{Encoder, FramedRead};
use uuid::Uuid;

use super::line::{Line, LineOptions};
use super::observer::{FrameArrival, Observer, Verdict};
use super::{CONNECT_TIMEOUT, CallerError, ClosedBy, WRITE_TIMEOUT, connect};
use crate::audio::pcm;
use crate::audiosocket::{CallerCodec, Inbound, SampleRate};

const FRAME: Duration = Duration::from_millis(20);
const SPF: usize = 160;

/// How to hold a conversation. Build with [`DialogueOptions::new`] and adjust the fields.
#[derive(Debug, Clone)]
pub struct DialogueOptions {
    /// `host:port` of the AudioSocket server.
    pub addr: String,
    /// The UUID sent in the first message.
    pub call_id: Uuid,
    /// What the caller says each turn, 8 kHz (the call is an 8 kHz call).
    pub utterance: Vec<i16>,
    /// Questions asked after the agent has finished its previous reply.
    pub turns: usize,
    /// Then questions each spoken over the reply to the one before.
    pub barge_ins: usize,
    /// The agent's silence that ends a reply (or the greeting).
    pub quiet: Duration,
    /// A barge-in starts this long after the first frame of the reply it interrupts.
    pub barge_after: Duration,
    /// With no greeting heard, the first question is asked this long into the call.
    pub greeting_timeout: Duration,
    /// A question with no reply in this long is given up and the next one is asked.
    pub reply_timeout: Duration,
    /// Hard bound on the whole call.
    pub max_duration: Duration,
    /// Bound on name resolution plus TCP connect.
    pub connect_timeout: Duration,
    /// Echo of the agent and noise on the line (default: a clean line).
    pub line: LineOptions,
}

impl DialogueOptions {
    /// A conversation with `addr`: `turns` questions, no barge-in, a 900 ms quiet rule.
    pub fn new(addr: impl Into<String>, utterance: Vec<i16>, turns: usize) -> Self {
        Self {
            addr: addr.into(),
            call_id: Uuid::new_v4(),
            utterance,
            turns,
            barge_ins: 0,
            quiet: Duration::from_millis(900),
            barge_after: Duration::from_millis(800),
            greeting_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(10),
            max_duration: Duration::from_secs(600),
            connect_timeout: CONNECT_TIMEOUT,
            line: LineOptions::default(),
        }
    }
}

/// One question as the caller lived it; times are ms from the call start (the UUID write).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DialogueTurn {
    /// Spoken over the agent on purpose.
    pub barge: bool,
    /// The first frame of the question was written: the caller's speech onset.
    pub start_ms: f64,
    /// The frame carrying the question's last sample was written: the caller's speech end.
    pub end_ms: f64,
    /// Index in [`DialogueReport::sent_ms`] of that last frame.
    pub end_frame: usize,
    /// The first non-silent frame read after `end_ms`: the reply as the caller hears it.
    pub first_reply_ms: Option<f64>,
}

/// What happened on a conversation.
#[derive(Debug, Clone)]
pub struct DialogueReport {
    /// The UUID we sent.
    pub call_id: Uuid,
    /// The call start (the UUID write) on this process's clock, so that other marks taken in
    /// this process (a fake provider's) can be put on the call's timeline.
    pub started: std::time::Instant,
    /// The call start on the wall clock (to align with marks from another process).
    pub started_wall: std::time::SystemTime,
    /// Questions asked, in order.
    pub turns: Vec<DialogueTurn>,
    /// When each audio frame was written, ms from the call start.
    pub sent_ms: Vec<f64>,
    /// Every audio frame read, timestamped when read from the socket.
    pub arrivals: Vec<FrameArrival>,
    /// Who ended the call.
    pub closed_by: ClosedBy,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// What Asterisk would object to in what the server sent.
    pub protocol_violations: Vec<String>,
    /// Worst lateness of our own writes against their schedule (health of the test host).
    pub max_send_lag_ms: f64,
}

/// Where the conversation is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Greeting,
    Speaking { turn: usize, pos: usize },
    AwaitReply { turn: usize },
    BargeWait { until: f64 },
    Listening,
    Done { at: f64 },
}

/// What the next frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Silence.
    Silence,
    /// Samples `[pos * 160, pos * 160 + 160)` of the utterance (zero-padded).
    Speech(usize),
    /// The conversation is over: hang up.
    Hangup,
}

/// The sans-IO turn-taking plan. Times are ms from the call start.
#[derive(Debug)]
pub(super) struct Dialogue {
    utterance_frames: usize,
    turns: usize,
    total: usize,
    quiet_ms: f64,
    barge_after_ms: f64,
    greeting_timeout_ms: f64,
    reply_timeout_ms: f64,
    phase: Phase,
    heard_any: bool,
    last_voiced: f64,
    pub(super) asked: Vec<DialogueTurn>,
    pub(super) frames_written: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Dialogue {
    pub(super) fn new(opts: &DialogueOptions) -> Self {
        Self {
            utterance_frames: opts.utterance.len().div_ceil(SPF),
            turns: opts.turns,
            total: opts.turns + opts.barge_ins,
            quiet_ms: ms(opts.quiet),
            barge_after_ms: ms(opts.barge_after),
            greeting_timeout_ms: ms(opts.greeting_timeout),
            reply_timeout_ms: ms(opts.reply_timeout),
            phase: Phase::Greeting,
            heard_any: false,
            last_voiced: f64::NEG_INFINITY,
            asked: Vec::new(),
            frames_written: 0,
        }
    }

    /// A non-silent frame was read at `at`.
    pub(super) fn on_voiced(&mut self, at: f64) {
        self.heard_any = true;
        self.last_voiced = self.last_voiced.max(at);
        if let Phase::AwaitReply { turn } = self.phase {
            if let Some(t) = self.asked.get_mut(turn) {
                if t.first_reply_ms.is_none() && at >= t.end_ms {
                    t.first_reply_ms = Some(at);
                }
            }
        }
    }

    /// What the frame due `now` carries.
    pub(super) fn next(&mut self, now: f64) -> Next {
        let quiet = now - self.last_voiced >= self.quiet_ms;
        let next_turn = self.asked.len();
        self.phase = match self.phase {
            Phase::Greeting if quiet && (self.heard_any || now >= self.greeting_timeout_ms) => {
                self.start_or_finish(now)
            }
            Phase::Listening if quiet => self.start_or_finish(now),
            Phase::BargeWait { until } if now >= until => Phase::Speaking {
                turn: next_turn,
                pos: 0,
            },
            Phase::AwaitReply { turn } => match self.asked.get(turn) {
                Some(t) => match t.first_reply_ms {
                    Some(first) if next_turn >= self.turns && next_turn < self.total => {
                        Phase::BargeWait {
                            until: first + self.barge_after_ms,
                        }
                    }
                    Some(_) => Phase::Listening,
                    None if now - t.end_ms > self.reply_timeout_ms => Phase::Listening,
                    None => self.phase,
                },
                None => Phase::Listening,
            },
            Phase::Done { at } if now - at >= 300.0 => return Next::Hangup,
            p => p,
        };
        match self.phase {
            Phase::Speaking { pos, .. } => Next::Speech(pos),
            _ => Next::Silence,
        }
    }

    fn start_or_finish(&self, now: f64) -> Phase {
        if self.asked.len() < self.total && self.utterance_frames > 0 {
            Phase::Speaking {
                turn: self.asked.len(),
                pos: 0,
            }
        } else {
            Phase::Done { at: now }
        }
    }

    /// The frame planned by the last [`Dialogue::next`] was written at `at`.
    pub(super) fn written(&mut self, at: f64) {
        let index = self.frames_written;
        self.frames_written += 1;
        let Phase::Speaking { turn, pos } = self.phase else {
            return;
        };
        if pos == 0 {
            self.asked.push(DialogueTurn {
                barge: turn >= self.turns,
                start_ms: at,
                end_ms: 0.0,
                end_frame: 0,
                first_reply_ms: None,
            });
        }
        if pos + 1 >= self.utterance_frames {
            if let Some(t) = self.asked.last_mut() {
                t.end_ms = at;
                t.end_frame = index;
            }
            self.phase = Phase::AwaitReply { turn };
        } else {
            self.phase = Phase::Speaking { turn, pos: pos + 1 };
        }
    }
}

/// Holds one conversation and reports on it. Errors only if the call cannot start; a call
/// that goes wrong once connected still yields a report (`closed_by: error`).
pub async fn place_dialogue(opts: DialogueOptions) -> Result<DialogueReport, CallerError> {
    if opts.max_duration.is_zero() || opts.max_duration > super::MAX_CALL_LIMIT {
        return Err(CallerError::InvalidOption(format!(
            "max_duration must be positive and at most {:?}",
            super::MAX_CALL_LIMIT
        )));
    }
    let stream = connect(&opts.addr, opts.connect_timeout).await?;
    stream
        .set_nodelay(true)
        .map_err(|source| CallerError::Connect {
            addr: opts.addr.clone(),
            source,
        })?;
    let (rd, mut wr) = stream.into_split();
    let mut plan = Dialogue::new(&opts);
    let mut obs = Observer::new(SampleRate::Hz8000, true, opts.max_duration);
    let mut framed = FramedRead::new(rd, CallerCodec);
    let mut buf = BytesMut::with_capacity(512);
    let mut sent_ms = Vec::new();
    let mut max_lag = Duration::ZERO;
    let mut line = Line::new(&opts.line, opts.call_id.as_u64_pair().0);

    let start = Instant::now();
    let started = start.into_std();
    let started_wall = std::time::SystemTime::now();
    let elapsed_ms = || ms(start.elapsed());
    let mut write = async |wr: &mut tokio::net::tcp::OwnedWriteHalf, msg: Inbound| {
        buf.clear();
        CallerCodec
            .encode(msg, &mut buf)
            .map_err(|e| e.to_string())?;
        match timeout(WRITE_TIMEOUT, wr.write_all(&buf)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write failed: {e}")),
            Err(_) => Err(format!("write stalled for {WRITE_TIMEOUT:?}")),
        }
    };
    let mut closed_by = ClosedBy::Caller;
    let mut error = None;
    if let Err(e) = write(&mut wr, Inbound::Uuid(opts.call_id)).await {
        closed_by = ClosedBy::Error;
        error = Some(e);
    }
    let mut k: u32 = 0;
    let end = loop {
        if error.is_some() {
            break start.elapsed();
        }
        let due = start + FRAME * k;
        tokio::select! {
            () = sleep_until(due) => {
                max_lag = max_lag.max(due.elapsed());
                if start.elapsed() > opts.max_duration {
                    closed_by = ClosedBy::Error;
                    error = Some(format!("the conversation did not finish in {:?}", opts.max_duration));
                    break start.elapsed();
                }
                let samples = match plan.next(elapsed_ms()) {
                    Next::Hangup => break start.elapsed(),
                    Next::Silence => vec![0i16; SPF],
                    Next::Speech(pos) => {
                        let mut s = vec![0i16; SPF];
                        let from = (pos * SPF).min(opts.utterance.len());
                        let to = (from + SPF).min(opts.utterance.len());
                        s[..to - from].copy_from_slice(&opts.utterance[from..to]);
                        s
                    }
                };
                let mut samples = samples;
                line.send(&mut samples);
                let mut bytes = Vec::with_capacity(SPF * 2);
                pcm::samples_to_le_bytes(&samples, &mut bytes);
                let msg = Inbound::Audio { rate: SampleRate::Hz8000, pcm: Bytes::from(bytes) };
                if let Err(e) = write(&mut wr, msg).await {
                    closed_by = ClosedBy::Error;
                    error = Some(e);
                    break start.elapsed();
                }
                let at = elapsed_ms();
                sent_ms.push(at);
                plan.written(at);
                k += 1;
            }
            item = framed.next() => {
                let at = start.elapsed();
                match item {
                    None => {
                        closed_by = ClosedBy::ServerClose;
                        break at;
                    }
                    Some(Err(e)) => {
                        obs.violation_from_error(&e);
                        closed_by = ClosedBy::Error;
                        error = Some(e.to_string());
                        break at;
                    }
                    Some(Ok(frame)) => {
                        if !opts.line.is_clean() && SampleRate::from_kind(frame.kind).is_some() {
                            line.heard(&pcm::le_bytes_to_samples(&frame.payload));
                        }
                        let seen = obs.arrivals.len();
                        let verdict = obs.on_frame(at, frame, None);
                        if obs.arrivals.len() > seen && obs.arrivals[seen].voiced {
                            plan.on_voiced(obs.arrivals[seen].at_ms);
                        }
                        match verdict {
                            Verdict::Continue => {}
                            Verdict::Hangup => {
                                closed_by = ClosedBy::ServerHangup;
                                break at;
                            }
                            Verdict::Abort(m) => {
                                closed_by = ClosedBy::Error;
                                error = Some(m);
                                break at;
                            }
                        }
                    }
                }
            }
        }
    };
    drop(wr);
    let protocol_violations = obs.finish(end);
    Ok(DialogueReport {
        call_id: opts.call_id,
        started,
        started_wall,
        turns: plan.asked,
        sent_ms,
        arrivals: std::mem::take(&mut obs.arrivals),
        closed_by,
        error,
        protocol_violations,
        max_send_lag_ms: ms(max_lag),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(turns: usize, barge_ins: usize) -> DialogueOptions {
        // Three frames of "speech".
        let mut o = DialogueOptions::new("unused", vec![1000; 3 * SPF], turns);
        o.barge_ins = barge_ins;
        o
    }

    /// Drives the plan frame by frame; `agent` says whether a voiced frame arrives at `t`.
    fn run(
        d: &mut Dialogue,
        until: f64,
        agent: impl Fn(f64, &Dialogue) -> bool,
    ) -> Vec<(f64, Next)> {
        let mut out = Vec::new();
        let mut t = 0.0;
        while t < until {
            if agent(t, d) {
                d.on_voiced(t + 5.0);
            }
            let n = d.next(t + 10.0);
            out.push((t + 10.0, n));
            if n == Next::Hangup {
                break;
            }
            d.written(t + 10.0);
            t += 20.0;
        }
        out
    }

    #[test]
    fn waits_for_the_greeting_then_takes_turns() {
        let o = opts(2, 0);
        let mut d = Dialogue::new(&o);
        // Greeting 0-1000 ms; a reply 400 ms after each question's end, 1 s long.
        let out = run(&mut d, 20_000.0, |t, d| {
            if t < 1000.0 {
                return true;
            }
            d.asked
                .last()
                .is_some_and(|q| q.end_ms > 0.0 && t >= q.end_ms + 400.0 && t < q.end_ms + 1400.0)
        });
        let speech: Vec<f64> = out
            .iter()
            .filter(|(_, n)| matches!(n, Next::Speech(0)))
            .map(|(t, _)| *t)
            .collect();
        // First question after 900 ms of quiet following the greeting's last frame (985).
        assert_eq!(speech.len(), 2);
        assert!(speech[0] >= 1885.0 && speech[0] < 1905.0, "{speech:?}");
        assert_eq!(d.asked.len(), 2);
        let q = &d.asked[0];
        assert_eq!(q.end_ms - q.start_ms, 40.0);
        assert_eq!(q.end_frame, (q.end_ms / 20.0 - 0.5) as usize);
        let first = q.first_reply_ms.unwrap();
        assert!(first >= q.end_ms + 400.0 && first < q.end_ms + 425.0);
        // The second question waits for the reply to end plus the quiet time.
        assert!(d.asked[1].start_ms >= first + 1000.0 + 900.0 - 25.0);
        assert!(!q.barge && !d.asked[1].barge);
        assert_eq!(out.last().map(|(_, n)| *n), Some(Next::Hangup));
    }

    #[test]
    fn barge_ins_talk_over_the_reply() {
        let o = opts(1, 1);
        let mut d = Dialogue::new(&o);
        // The agent talks from 400 ms after each question's end for 5 s.
        let out = run(&mut d, 30_000.0, |t, d| {
            d.asked
                .last()
                .is_some_and(|q| q.end_ms > 0.0 && t >= q.end_ms + 400.0 && t < q.end_ms + 5400.0)
        });
        assert_eq!(d.asked.len(), 2);
        let (q, b) = (&d.asked[0], &d.asked[1]);
        let first = q.first_reply_ms.unwrap();
        assert!(b.barge);
        // The barge-in starts 800 ms into the reply, while the agent still talks.
        assert!(b.start_ms >= first + 800.0 && b.start_ms < first + 830.0);
        assert!(b.start_ms < q.end_ms + 5400.0);
        assert_eq!(out.last().map(|(_, n)| *n), Some(Next::Hangup));
    }

    #[test]
    fn a_silent_server_still_gets_its_questions() {
        let o = opts(2, 0);
        let mut d = Dialogue::new(&o);
        let out = run(&mut d, 60_000.0, |_, _| false);
        assert_eq!(d.asked.len(), 2);
        assert!(d.asked[0].start_ms >= 5000.0);
        assert!(d.asked.iter().all(|q| q.first_reply_ms.is_none()));
        // Given up after the reply timeout.
        assert!(d.asked[1].start_ms >= d.asked[0].end_ms + 10_000.0);
        assert_eq!(out.last().map(|(_, n)| *n), Some(Next::Hangup));
    }
}
