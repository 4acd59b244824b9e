//! The `stream-input` websocket transport: connect and initialise ahead of time, forward
//! clauses as they come (whole words, trailing space), keep an idle socket alive, and decode
//! audio the moment it arrives. [`Outbound`] decides what to send and when; [`WsDriver`]
//! only moves bytes and watches the audio deadline.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::messages::{
    CHUNK_LENGTH_SCHEDULE, CharTimes, ServerEvent, close_message, flush_message, init_message,
    keepalive_message, parse_error_body, parse_server_message, retry_after_ms, text_message,
};
use super::{
    DEFAULT_CONNECT_TIMEOUT, ElevenLabs, duration_ms, endpoint_url, output_format_for, spawn_driver,
};
use crate::ops::config::OutputFormat;
use crate::providers::tts::decode::AudioDecoder;
use crate::providers::tts::{TtsError, TtsInput, TtsOutput, TtsParams, TtsStream};

/// The server closes after 20 s without text; a space every 10 s keeps a pre-opened or slow
/// reply alive.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a goodbye (close frame) may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

impl ElevenLabs {
    /// The `stream-input` URL with its query.
    pub(super) fn websocket_url(
        &self,
        format: OutputFormat,
        params: &TtsParams,
    ) -> Result<reqwest::Url, TtsError> {
        let mut url = endpoint_url(
            &self.settings.base_url,
            &self.settings.voice_id,
            "stream-input",
        )?;
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme).map_err(|()| {
            TtsError::Config(format!(
                "cannot derive a websocket URL from {}",
                self.settings.base_url
            ))
        })?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("model_id", &self.settings.model_id);
            q.append_pair("output_format", format.as_str());
            if let Some(lang) = self.language_code(params) {
                q.append_pair("language_code", lang);
            }
        }
        Ok(url)
    }

    pub(super) async fn open_websocket(&self, params: TtsParams) -> Result<TtsStream, TtsError> {
        let format = output_format_for(self.settings.output_format, params.sample_rate)?;
        let url = self.websocket_url(format, &params)?;
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| TtsError::Config(format!("bad websocket URL: {e}")))?;
        request
            .headers_mut()
            .insert("xi-api-key", self.key_header()?);

        let connect_ms = duration_ms(DEFAULT_CONNECT_TIMEOUT);
        let (mut ws, _) = timeout(
            DEFAULT_CONNECT_TIMEOUT,
            // Nagle off: each clause must leave at once, not wait for an ACK.
            tokio_tungstenite::connect_async_with_config(request, None, true),
        )
        .await
        .map_err(|_| TtsError::Timeout(connect_ms))?
        .map_err(upgrade_error)?;
        timeout(
            DEFAULT_CONNECT_TIMEOUT,
            ws.send(Message::text(init_message())),
        )
        .await
        .map_err(|_| TtsError::Timeout(connect_ms))?
        .map_err(|e| TtsError::Transport(format!("sending the initialise message: {e}")))?;
        tracing::debug!(call_id = %params.call_id, format = format.as_str(), "TTS websocket open");

        let deadline_after = self.first_byte_timeout();
        Ok(spawn_driver(|text_rx, audio_tx| {
            WsDriver {
                ws,
                text_rx,
                audio_tx,
                decoder: AudioDecoder::new(format),
                rate: format.sample_rate(),
                samples_out: 0,
                outbound: Outbound::new(Instant::now()),
                deadline_after,
                call_id: params.call_id,
            }
            .run()
        }))
    }
}

fn upgrade_error(e: tungstenite::Error) -> TtsError {
    match e {
        tungstenite::Error::Http(resp) => {
            let body = resp.body().as_deref().unwrap_or_default();
            match parse_error_body(resp.status().as_u16(), body) {
                TtsError::Status {
                    status, message, ..
                } => TtsError::Status {
                    status,
                    message,
                    retry_after_ms: retry_after_ms(
                        resp.headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok()),
                    ),
                },
                other => other,
            }
        }
        other => TtsError::Transport(format!("websocket connect: {other}")),
    }
}

/// `text` trimmed, with the trailing space ElevenLabs wants; `None` if nothing is left.
fn with_trailing_space(text: &str) -> Option<String> {
    let t = text.trim();
    (!t.is_empty()).then(|| format!("{t} "))
}

/// What the websocket client sends and when: text, the end of the reply, keep-alives, and
/// whether audio is owed (which arms the audio deadline).
#[derive(Debug)]
struct Outbound {
    last_sent: Instant,
    finished: bool,
    chars_sent: usize,
}

impl Outbound {
    fn new(now: Instant) -> Self {
        Self {
            last_sent: now,
            finished: false,
            chars_sent: 0,
        }
    }

    /// A clause goes out as it came (whole words, per [`TtsInput::Text`]) with the trailing
    /// space the service wants; blank text sends nothing (an empty `text` would end the
    /// stream).
    fn on_text(&mut self, text: &str, now: Instant) -> Option<String> {
        let chunk = with_trailing_space(text)?;
        self.chars_sent += chunk.chars().count();
        self.last_sent = now;
        Some(text_message(&chunk))
    }

    /// The flush and the close message.
    fn on_finish(&mut self, now: Instant) -> [String; 2] {
        self.finished = true;
        self.last_sent = now;
        [flush_message(None), close_message()]
    }

    /// When a keep-alive is due; none once the reply is finished (the server is generating).
    fn keepalive_at(&self) -> Option<Instant> {
        (!self.finished).then(|| self.last_sent + KEEPALIVE_INTERVAL)
    }

    fn on_keepalive(&mut self, now: Instant) -> String {
        self.last_sent = now;
        keepalive_message()
    }

    /// Whether the service must be producing audio now: the reply is finished, or, before the
    /// first audio, enough text went out to fill the first chunk of the schedule. (Between
    /// those, silence may just mean the service is waiting for more text.)
    fn audio_owed(&self, got_audio: bool) -> bool {
        self.finished || (!got_audio && self.chars_sent >= CHUNK_LENGTH_SCHEDULE[0])
    }
}

struct WsDriver {
    ws: WsStream,
    text_rx: mpsc::Receiver<TtsInput>,
    audio_tx: mpsc::Sender<TtsOutput>,
    decoder: AudioDecoder,
    /// The decoded audio's sample rate.
    rate: u32,
    /// Samples handed out so far: where the next message's alignment starts.
    samples_out: u64,
    outbound: Outbound,
    deadline_after: Duration,
    call_id: String,
}

/// How a websocket synthesis ended.
enum WsEnd {
    Done,
    Failed(String),
    /// The text sender or the audio receiver went away: stop quietly.
    Cancelled,
}

impl WsDriver {
    async fn run(mut self) {
        let end = self.drive().await;
        match end {
            WsEnd::Done => {
                let _ = self.audio_tx.send(TtsOutput::Done).await;
            }
            WsEnd::Failed(msg) => {
                tracing::warn!(call_id = %self.call_id, error = %msg, "TTS websocket failed");
                let _ = self.audio_tx.send(TtsOutput::Failed(msg)).await;
            }
            WsEnd::Cancelled => {
                tracing::debug!(call_id = %self.call_id, "TTS websocket cancelled");
            }
        }
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = timeout(CLOSE_TIMEOUT, self.ws.close(Some(frame))).await;
    }

    async fn send(&mut self, text: String) -> Result<(), WsEnd> {
        self.ws
            .send(Message::text(text))
            .await
            .map_err(|e| WsEnd::Failed(format!("sending text to ElevenLabs: {e}")))
    }

    /// Hands out one message's audio, then its alignment moved from the message's own time
    /// base to the stream's (the audio handed out before it).
    async fn emit(&mut self, samples: Vec<i16>, alignment: Option<CharTimes>) -> Result<(), WsEnd> {
        let offset_ms = self.samples_out * 1000 / u64::from(self.rate.max(1));
        if !samples.is_empty() {
            self.samples_out += samples.len() as u64;
            self.audio_tx
                .send(TtsOutput::Audio(samples))
                .await
                .map_err(|_| WsEnd::Cancelled)?;
        }
        if let Some(a) = alignment {
            let offset = u32::try_from(offset_ms).unwrap_or(u32::MAX);
            self.audio_tx
                .send(TtsOutput::Alignment {
                    chars: a.chars,
                    start_ms: a
                        .start_ms
                        .into_iter()
                        .map(|t| t.saturating_add(offset))
                        .collect(),
                    duration_ms: a.duration_ms,
                })
                .await
                .map_err(|_| WsEnd::Cancelled)?;
        }
        Ok(())
    }

    async fn drive(&mut self) -> WsEnd {
        match self.drive_inner().await {
            Ok(end) | Err(end) => end,
        }
    }

    async fn drive_inner(&mut self) -> Result<WsEnd, WsEnd> {
        let mut got_audio = false;
        // When audio must have arrived by (armed only while audio is owed).
        let mut deadline: Option<Instant> = None;
        let far = || Instant::now() + Duration::from_secs(3600);
        loop {
            let keepalive_at = self.outbound.keepalive_at();
            tokio::select! {
                input = self.text_rx.recv(), if !self.outbound.finished => {
                    let now = Instant::now();
                    match input {
                        Some(TtsInput::Text(t)) => {
                            if let Some(msg) = self.outbound.on_text(&t, now) {
                                self.send(msg).await?;
                            }
                        }
                        Some(TtsInput::Finish) => {
                            for msg in self.outbound.on_finish(now) {
                                self.send(msg).await?;
                            }
                        }
                        None => return Ok(WsEnd::Cancelled),
                    }
                    if deadline.is_none() && self.outbound.audio_owed(got_audio) {
                        deadline = Some(now + self.deadline_after);
                    }
                }
                frame = self.ws.next() => {
                    let Some(frame) = frame else {
                        return Ok(WsEnd::Failed("ElevenLabs dropped the connection".into()));
                    };
                    let frame = frame.map_err(|e| WsEnd::Failed(format!("ElevenLabs websocket: {e}")))?;
                    match frame {
                        Message::Text(text) => match parse_server_message(text.as_str()) {
                            ServerEvent::Audio { bytes, alignment, is_final } => {
                                got_audio = true;
                                let samples = self.decoder.decode(&bytes);
                                self.emit(samples, alignment).await?;
                                if is_final {
                                    return Ok(self.final_received());
                                }
                                deadline = self
                                    .outbound
                                    .audio_owed(got_audio)
                                    .then(|| Instant::now() + self.deadline_after);
                            }
                            ServerEvent::Final => return Ok(self.final_received()),
                            ServerEvent::Other => {}
                            ServerEvent::Error(msg) => return Ok(WsEnd::Failed(msg)),
                        },
                        Message::Close(frame) => {
                            let normal = frame.as_ref().is_none_or(|f| f.code == CloseCode::Normal);
                            if normal && self.outbound.finished {
                                return Ok(WsEnd::Done);
                            }
                            let why = frame.map_or_else(
                                || "no close frame".to_owned(),
                                |f| format!("code {}: {}", u16::from(f.code), f.reason),
                            );
                            return Ok(WsEnd::Failed(format!("ElevenLabs closed the stream ({why})")));
                        }
                        // Pings are answered by tungstenite; binary frames are not in the protocol.
                        _ => {}
                    }
                }
                () = sleep_until(keepalive_at.unwrap_or_else(far)), if keepalive_at.is_some() => {
                    let msg = self.outbound.on_keepalive(Instant::now());
                    self.send(msg).await?;
                }
                () = sleep_until(deadline.unwrap_or_else(far)), if deadline.is_some() => {
                    return Ok(WsEnd::Failed(format!(
                        "no audio from ElevenLabs within {} ms",
                        duration_ms(self.deadline_after)
                    )));
                }
                () = self.audio_tx.closed() => return Ok(WsEnd::Cancelled),
            }
        }
    }

    fn final_received(&self) -> WsEnd {
        if self.decoder.has_partial_sample() {
            tracing::warn!(call_id = %self.call_id, "TTS audio ended with half a sample");
        }
        if self.outbound.finished {
            WsEnd::Done
        } else {
            WsEnd::Failed("ElevenLabs ended the stream before the reply was finished".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::ops::config::TtsTransport;
    use crate::providers::tts::TtsProvider as _;
    use crate::sandbox::elevenlabs::{
        self as fake, FakeElevenLabsConfig, TtsFault, speech_samples, synthesize,
    };

    #[test]
    fn clauses_go_out_whole_with_one_trailing_space() {
        let mut o = Outbound::new(Instant::now());
        let now = Instant::now();
        assert_eq!(
            o.on_text("Hello, ", now).as_deref(),
            Some(r#"{"text":"Hello, ","try_trigger_generation":true}"#)
        );
        assert_eq!(
            o.on_text("  Apa khabar?", now).as_deref(),
            Some(r#"{"text":"Apa khabar? ","try_trigger_generation":true}"#)
        );
        assert_eq!(
            o.on_text("   ", now),
            None,
            "blank text would end the stream"
        );
        assert_eq!(o.chars_sent, "Hello, Apa khabar? ".len());
    }

    #[test]
    fn keepalive_and_audio_owed() {
        let t0 = Instant::now();
        let mut o = Outbound::new(t0);
        assert_eq!(o.keepalive_at(), Some(t0 + KEEPALIVE_INTERVAL));
        let t1 = t0 + Duration::from_secs(4);
        assert!(o.on_text("Short. ", t1).is_some());
        assert_eq!(o.keepalive_at(), Some(t1 + KEEPALIVE_INTERVAL));
        assert!(!o.audio_owed(false), "the service may wait for more text");
        let long = "x".repeat(CHUNK_LENGTH_SCHEDULE[0]) + " ";
        assert!(o.on_text(&long, t1).is_some());
        assert!(o.audio_owed(false));
        assert!(!o.audio_owed(true));
        let t2 = t1 + KEEPALIVE_INTERVAL;
        assert_eq!(o.on_keepalive(t2), r#"{"text":" "}"#);
        assert_eq!(o.keepalive_at(), Some(t2 + KEEPALIVE_INTERVAL));
        let [flush, close] = o.on_finish(t2);
        assert!(flush.contains("\"flush\":true"));
        assert_eq!(close, r#"{"text":""}"#);
        assert_eq!(o.keepalive_at(), None);
        assert!(o.audio_owed(true));
    }

    #[tokio::test]
    async fn websocket_streams_clauses_and_finishes() {
        let (srv, el) = start(fast(), TtsTransport::Websocket, OutputFormat::Ulaw8000, KEY).await;
        let first = "Selamat pagi, terima kasih kerana menelefon.";
        let second = "Ada apa yang boleh saya bantu?";
        let TtsStream { text, mut audio } = open_and_send(&el, 8_000, &[first], false).await;
        // The clause triggers generation: audio comes before the reply is finished.
        let Some(TtsOutput::Audio(head)) = recv(&mut audio).await else {
            panic!("expected audio first")
        };
        text.send(TtsInput::Text(second.into())).await.unwrap();
        text.send(TtsInput::Finish).await.unwrap();
        let (rest, chunks, end) = collect(&mut audio).await;
        assert_eq!(end, Some(TtsOutput::Done));
        assert!(chunks >= 2, "audio arrives in pieces, got {chunks}");
        let total = head.len() + rest.len();
        assert_eq!(total, speech_samples(&format!("{first} {second}"), 8_000));
        let mut pcm = head;
        pcm.extend(rest);
        // µ-law decoded into real speech-like audio, not silence.
        assert!(
            crate::audio::pcm::dbfs(&pcm) > -35.0,
            "level {}",
            crate::audio::pcm::dbfs(&pcm)
        );
        assert_eq!(srv.stats().connections(), 1);
        assert_eq!(srv.stats().texts_received(), 2);
        assert_eq!(
            srv.stats().characters_received(),
            first.len() + 1 + second.len() + 1
        );
        assert_eq!(recv(&mut audio).await, None, "nothing after Done");
    }

    #[tokio::test]
    async fn websocket_pcm_16000_for_a_wideband_call() {
        let (_srv, el) = start(fast(), TtsTransport::Websocket, OutputFormat::Ulaw8000, KEY).await;
        let text = "Baik, saya faham.";
        let pcm = synthesize_all(&el, params(16_000), text).await.unwrap();
        // One clause is one generation, so the fake's output is known sample for sample.
        assert_eq!(pcm, synthesize(&format!("{text} "), 16_000));
    }

    #[tokio::test]
    async fn websocket_alaw_decodes() {
        let (_srv, el) = start(fast(), TtsTransport::Websocket, OutputFormat::Alaw8000, KEY).await;
        let pcm = synthesize_all(&el, params(8_000), "Terima kasih.")
            .await
            .unwrap();
        assert_eq!(pcm.len(), speech_samples("Terima kasih.", 8_000));
        let reference = synthesize("Terima kasih. ", 8_000);
        // G.711 quantisation error is at most a few percent of the value.
        for (got, want) in pcm.iter().zip(&reference) {
            assert!(
                (i32::from(*got) - i32::from(*want)).abs()
                    <= i32::from(want.unsigned_abs() / 16) + 16
            );
        }
    }

    #[tokio::test]
    async fn websocket_alignment_follows_the_audio_in_stream_time() {
        let (_srv, el) = start(fast(), TtsTransport::Websocket, OutputFormat::Pcm8000, KEY).await;
        // Two clauses: two generations, each of several messages whose alignment times
        // restart at 0 (relative to the message's audio).
        let clauses = [
            "Selamat pagi, terima kasih.",
            "Ada apa yang boleh saya bantu?",
        ];
        let mut stream = open_and_send(&el, 8_000, &clauses, true).await;
        let (pcm, chunks, timings, end) = collect_aligned(&mut stream.audio).await;
        assert_eq!(end, Some(TtsOutput::Done));
        assert!(chunks > 4, "{chunks}");
        let spoken: String = timings.iter().map(|(c, _, _)| c.as_str()).collect();
        assert_eq!(spoken.trim_end(), clauses.join(" "));
        // Every character starts where the fake's speech for the text before it ends.
        let mut expected_start = 0u32;
        for (i, (c, start, duration)) in timings.iter().enumerate() {
            assert_eq!(*start, expected_start, "char {i} {c:?}");
            expected_start += duration;
        }
        let audio_ms = u32::try_from(pcm.len() / 8).unwrap();
        assert_eq!(
            expected_start, audio_ms,
            "the alignment covers all the audio"
        );
        let p = spoken.find("pagi").unwrap();
        assert_eq!(timings[p].1, 7 * 65, "\"pagi\" starts after \"Selamat \"");
    }

    #[tokio::test]
    async fn websocket_bad_key_is_status_401() {
        let (srv, el) = start(
            fast(),
            TtsTransport::Websocket,
            OutputFormat::Ulaw8000,
            "wrong",
        )
        .await;
        match el.open(params(8_000)).await {
            Err(TtsError::Status {
                status: 401,
                message,
                ..
            }) => assert!(message.contains("invalid_api_key"), "{message}"),
            other => panic!("expected 401, got {other:?}"),
        }
        assert_eq!(srv.stats().connections(), 0);
    }

    #[tokio::test]
    async fn websocket_unexpected_close_fails() {
        let cfg = with_fault(TtsFault::CloseAfterChunks(2));
        let (_srv, el) = start(cfg, TtsTransport::Websocket, OutputFormat::Pcm8000, KEY).await;
        let mut stream = open_and_send(&el, 8_000, &[LONG], true).await;
        let (_, chunks, end) = collect(&mut stream.audio).await;
        assert_eq!(chunks, 2);
        let m = failure(end);
        assert!(m.contains("1011"), "{m}");
    }

    #[tokio::test]
    async fn websocket_stall_fails_by_deadline() {
        let srv = fake::spawn(with_fault(TtsFault::StallAfterChunks(1)))
            .await
            .unwrap();
        let mut s = settings(
            &srv.base_url(),
            TtsTransport::Websocket,
            OutputFormat::Pcm8000,
        );
        s.first_byte_timeout_ms = 300;
        let el = client(&s, KEY);
        let mut stream = open_and_send(&el, 8_000, &[LONG], true).await;
        let (_, chunks, end) = collect(&mut stream.audio).await;
        assert_eq!(chunks, 1);
        let m = failure(end);
        assert!(m.contains("no audio") && m.contains("300 ms"), "{m}");
    }

    #[tokio::test]
    async fn websocket_server_error_message_fails() {
        let cfg = with_fault(TtsFault::InputTimeoutSecs(1));
        let (_srv, el) = start(cfg, TtsTransport::Websocket, OutputFormat::Pcm8000, KEY).await;
        let TtsStream { text, mut audio } = open_and_send(&el, 8_000, &[], false).await;
        // Pre-connected but no text comes: the service gives up after its inactivity timeout.
        let m = failure(recv(&mut audio).await);
        assert!(m.contains("input_timeout_exceeded"), "{m}");
        drop(text);
    }

    #[tokio::test]
    async fn dropping_the_text_sender_cancels() {
        let cfg = FakeElevenLabsConfig {
            realtime_factor: 1.0,
            ..fast()
        };
        let (srv, el) = start(cfg, TtsTransport::Websocket, OutputFormat::Pcm8000, KEY).await;
        let TtsStream { text, mut audio } = open_and_send(&el, 8_000, &[LONG], false).await;
        assert!(matches!(recv(&mut audio).await, Some(TtsOutput::Audio(_))));
        drop(text);
        // The stream stops without Done or Failed...
        while let Some(out) = recv(&mut audio).await {
            assert!(
                matches!(out, TtsOutput::Audio(_) | TtsOutput::Alignment { .. }),
                "unexpected {out:?}"
            );
        }
        // ...and the service sees the client go away.
        timeout(GUARD, async {
            while srv.stats().client_disconnects() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the fake never saw the close");
        assert_eq!(srv.stats().sessions_ended(), 1);
    }
}
