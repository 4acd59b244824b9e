//! The HTTP transport: each clause is POSTed to `/stream` as it comes, one request at a time
//! (clauses that arrive while a body is still streaming go together in the next request),
//! and the chunked response bodies are decoded as they arrive.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _, TryStreamExt as _};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::messages::{http_request_body, parse_error_body, retry_after_ms};
use super::{ElevenLabs, duration_ms, endpoint_url, output_format_for, spawn_driver};
use crate::ops::config::OutputFormat;
use crate::providers::tts::decode::AudioDecoder;
use crate::providers::tts::{TtsError, TtsInput, TtsOutput, TtsParams, TtsStream};

/// Error bodies are read up to this size.
const MAX_ERROR_BODY: usize = 16 * 1024;

type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, TtsError>> + Send>>;

impl ElevenLabs {
    pub(super) fn open_http(&self, params: TtsParams) -> Result<TtsStream, TtsError> {
        let format = output_format_for(self.settings.output_format, params.sample_rate)?;
        let mut url = endpoint_url(&self.settings.base_url, &self.settings.voice_id, "stream")?;
        url.query_pairs_mut()
            .append_pair("output_format", format.as_str());
        let target = Arc::new(HttpTarget {
            client: self.http.clone(),
            url,
            key: self.key_header()?,
            model_id: self.settings.model_id.clone(),
            language_code: self.language_code(&params).map(str::to_owned),
        });
        let deadline_after = self.first_byte_timeout();
        Ok(spawn_driver(|text_rx, audio_tx| {
            HttpDriver {
                target,
                text_rx,
                audio_tx,
                format,
                deadline_after,
                call_id: params.call_id,
            }
            .run()
        }))
    }
}

/// Where and how the HTTP transport posts.
#[derive(Debug)]
struct HttpTarget {
    client: reqwest::Client,
    url: reqwest::Url,
    /// `xi-api-key`, marked sensitive.
    key: HeaderValue,
    model_id: String,
    language_code: Option<String>,
}

impl HttpTarget {
    /// One POST to `/stream` as a stream of body chunks; a non-2xx answer is one error item.
    fn request(self: &Arc<Self>, text: String) -> BodyStream {
        let target = Arc::clone(self);
        let response = async move {
            let body = http_request_body(&text, &target.model_id, target.language_code.as_deref());
            let mut resp = target
                .client
                .post(target.url.clone())
                .header("xi-api-key", target.key.clone())
                .json(&body)
                .send()
                .await
                .map_err(|e| TtsError::Transport(format!("POST to ElevenLabs: {e}")))?;
            let status = resp.status();
            if !status.is_success() {
                let mut err_body = Vec::new();
                while let Ok(Some(chunk)) = resp.chunk().await {
                    err_body.extend_from_slice(&chunk);
                    if err_body.len() >= MAX_ERROR_BODY {
                        break;
                    }
                }
                let retry_after = retry_after_ms(
                    resp.headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()),
                );
                return Err(match parse_error_body(status.as_u16(), &err_body) {
                    TtsError::Status {
                        status, message, ..
                    } => TtsError::Status {
                        status,
                        message,
                        retry_after_ms: retry_after,
                    },
                    other => other,
                });
            }
            Ok(resp
                .bytes_stream()
                .map_err(|e| TtsError::Transport(format!("reading ElevenLabs audio: {e}"))))
        };
        futures_util::stream::once(response).try_flatten().boxed()
    }
}

struct HttpDriver {
    target: Arc<HttpTarget>,
    text_rx: mpsc::Receiver<TtsInput>,
    audio_tx: mpsc::Sender<TtsOutput>,
    format: OutputFormat,
    deadline_after: Duration,
    call_id: String,
}

impl HttpDriver {
    async fn run(mut self) {
        match self.drive().await {
            Some(TtsOutput::Failed(msg)) => {
                tracing::warn!(call_id = %self.call_id, error = %msg, "TTS request failed");
                let _ = self.audio_tx.send(TtsOutput::Failed(msg)).await;
            }
            Some(out) => {
                let _ = self.audio_tx.send(out).await;
            }
            None => tracing::debug!(call_id = %self.call_id, "TTS request cancelled"),
        }
    }

    /// Runs until the end; `None` means cancelled. Dropping a body stream aborts its request.
    async fn drive(&mut self) -> Option<TtsOutput> {
        // Clauses that arrived while a request was running: they go together in the next one.
        let mut pending = String::new();
        let mut finished = false;
        let mut body: Option<BodyStream> = None;
        let mut decoder = AudioDecoder::new(self.format);
        let mut deadline = Instant::now();
        loop {
            if body.is_none() {
                let text = pending.trim();
                if !text.is_empty() {
                    // Everything ready goes in one request: fewer round trips, better prosody.
                    body = Some(self.target.request(text.to_owned()));
                    pending.clear();
                    decoder = AudioDecoder::new(self.format);
                    deadline = Instant::now() + self.deadline_after;
                } else if finished {
                    return Some(TtsOutput::Done);
                }
            }
            tokio::select! {
                input = self.text_rx.recv(), if !finished => match input {
                    Some(TtsInput::Text(t)) => {
                        if !pending.is_empty() && !pending.ends_with(char::is_whitespace) {
                            pending.push(' ');
                        }
                        pending.push_str(&t);
                    }
                    Some(TtsInput::Finish) => finished = true,
                    None => return None,
                },
                chunk = async { match body.as_mut() {
                    Some(b) => b.next().await,
                    None => std::future::pending().await,
                } }, if body.is_some() => match chunk {
                    Some(Ok(bytes)) => {
                        let samples = decoder.decode(&bytes);
                        if !samples.is_empty() && self.audio_tx.send(TtsOutput::Audio(samples)).await.is_err() {
                            return None;
                        }
                        deadline = Instant::now() + self.deadline_after;
                    }
                    Some(Err(e)) => return Some(TtsOutput::Failed(e.to_string())),
                    None => {
                        if decoder.has_partial_sample() {
                            tracing::warn!(call_id = %self.call_id, "TTS body ended with half a sample");
                        }
                        body = None;
                    }
                },
                () = sleep_until(deadline), if body.is_some() => {
                    return Some(TtsOutput::Failed(
                        TtsError::Timeout(duration_ms(self.deadline_after)).to_string(),
                    ));
                }
                () = self.audio_tx.closed() => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::ops::config::TtsTransport;
    use crate::sandbox::elevenlabs::{TtsFault, speech_samples, synthesize};

    #[tokio::test]
    async fn http_posts_sentences_in_turn_and_streams() {
        let (srv, el) = start(fast(), TtsTransport::Http, OutputFormat::Pcm16000, KEY).await;
        let (a, b) = (
            "Selamat pagi, apa khabar?",
            "Saya boleh bantu anda hari ini.",
        );
        let mut stream = open_and_send(&el, 16_000, &[a, &format!(" {b}")], true).await;
        let (pcm, chunks, end) = collect(&mut stream.audio).await;
        assert_eq!(end, Some(TtsOutput::Done));
        assert!(chunks > 2);
        // The fake splits PCM bodies mid-sample; the decoder rejoins them exactly.
        let mut want = synthesize(a, 16_000);
        want.extend(synthesize(b, 16_000));
        assert_eq!(pcm, want);
        assert_eq!(srv.stats().http_requests(), 2);
    }

    #[tokio::test]
    async fn http_audio_arrives_before_the_body_is_complete() {
        // The body never completes, yet audio is delivered: it is streamed, not buffered.
        let cfg = with_fault(TtsFault::StallAfterChunks(2));
        let (_srv, el) = start(cfg, TtsTransport::Http, OutputFormat::Ulaw8000, KEY).await;
        let mut stream = open_and_send(&el, 8_000, &[LONG], true).await;
        for _ in 0..2 {
            match recv(&mut stream.audio).await {
                Some(TtsOutput::Audio(s)) => assert_eq!(s.len(), 800, "100 ms of µ-law per chunk"),
                other => panic!("expected audio, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn http_bad_key_fails_with_the_detail() {
        let (_srv, el) = start(fast(), TtsTransport::Http, OutputFormat::Ulaw8000, "wrong").await;
        match synthesize_all(&el, params(8_000), "Helo.").await {
            Err(TtsError::Transport(m)) => {
                assert!(
                    m.contains("401") && m.contains("invalid_api_key: Invalid API key"),
                    "{m}"
                )
            }
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn http_422_array_form_is_reported() {
        let cfg = with_fault(TtsFault::Status(422));
        let (_srv, el) = start(cfg, TtsTransport::Http, OutputFormat::Ulaw8000, KEY).await;
        let mut stream = open_and_send(&el, 8_000, &["Helo."], false).await;
        let m = failure(recv(&mut stream.audio).await);
        assert!(
            m.contains("422") && m.contains("body.text: Field required"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn http_dropped_body_fails() {
        let cfg = with_fault(TtsFault::CloseAfterChunks(1));
        let (_srv, el) = start(cfg, TtsTransport::Http, OutputFormat::Pcm8000, KEY).await;
        let err = synthesize_all(
            &el,
            params(8_000),
            "Selamat pagi, terima kasih kerana menelefon.",
        )
        .await;
        assert!(matches!(err, Err(TtsError::Transport(_))), "{err:?}");
    }

    #[tokio::test]
    async fn synthesize_all_over_http_returns_everything() {
        let (srv, el) = start(fast(), TtsTransport::Http, OutputFormat::Pcm8000, KEY).await;
        let greeting = "Selamat datang. Saya pembantu maya anda.";
        let pcm = synthesize_all(&el, params(8_000), greeting).await.unwrap();
        assert_eq!(pcm.len(), speech_samples(greeting, 8_000));
        assert_eq!(
            srv.stats().texts_received(),
            1,
            "one whole text, one request"
        );
    }
}
