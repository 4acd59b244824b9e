//! The HTTP transport: LLM text is batched into whole sentences, each batch is POSTed to
//! `/stream` in turn (the next only after the previous body ended) and the chunked response
//! bodies are decoded as they arrive.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _, TryStreamExt as _};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::messages::{http_request_body, parse_error_body};
use super::{ElevenLabs, duration_ms, endpoint_url, output_format_for, spawn_driver};
use crate::ops::config::OutputFormat;
use crate::providers::tts::decode::AudioDecoder;
use crate::providers::tts::{TtsError, TtsInput, TtsOutput, TtsParams, TtsStream};

/// Error bodies are read up to this size.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// An HTTP batch without a sentence end is cut at a word once it gets this long.
const MAX_HTTP_BATCH_CHARS: usize = 300;

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
            language_code: self.language_code().map(str::to_owned),
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

fn ends_sentence(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '。')
}

/// Collects LLM text into batches for the HTTP transport: everything up to the last sentence
/// end, so each POST is whole sentences (better prosody, and a POST can go before the reply is
/// complete).
#[derive(Debug, Default)]
struct SentenceBatcher {
    pending: String,
}

impl SentenceBatcher {
    fn push(&mut self, text: &str) {
        self.pending.push_str(text);
    }

    /// The next batch, if one is ready; with `finished` everything left is ready.
    fn take_ready(&mut self, finished: bool) -> Option<String> {
        let cut = if finished {
            self.pending.len()
        } else {
            let mut cut = 0;
            let mut prev: Option<char> = None;
            for (i, c) in self.pending.char_indices() {
                if c.is_whitespace() && prev.is_some_and(ends_sentence) {
                    cut = i;
                }
                prev = Some(c);
            }
            if prev.is_some_and(ends_sentence) {
                cut = self.pending.len();
            }
            if cut == 0 && self.pending.chars().count() > MAX_HTTP_BATCH_CHARS {
                cut = self.pending.rfind(char::is_whitespace).unwrap_or(0);
            }
            cut
        };
        if cut == 0 {
            return None;
        }
        let batch: String = self.pending.drain(..cut).collect();
        let t = batch.trim();
        (!t.is_empty()).then(|| t.to_owned())
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
                return Err(parse_error_body(status.as_u16(), &err_body));
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
        let mut batcher = SentenceBatcher::default();
        let mut finished = false;
        let mut body: Option<BodyStream> = None;
        let mut decoder = AudioDecoder::new(self.format);
        let mut deadline = Instant::now();
        let mut queue: VecDeque<String> = VecDeque::new();
        loop {
            while let Some(batch) = batcher.take_ready(finished) {
                queue.push_back(batch);
            }
            if body.is_none() {
                if !queue.is_empty() {
                    // Everything ready goes in one request: fewer round trips, better prosody.
                    let text = queue.drain(..).collect::<Vec<_>>().join(" ");
                    body = Some(self.target.request(text));
                    decoder = AudioDecoder::new(self.format);
                    deadline = Instant::now() + self.deadline_after;
                } else if finished {
                    return Some(TtsOutput::Done);
                }
            }
            tokio::select! {
                input = self.text_rx.recv(), if !finished => match input {
                    Some(TtsInput::Text(t)) => batcher.push(&t),
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

    #[test]
    fn http_batches_are_whole_sentences() {
        let mut b = SentenceBatcher::default();
        b.push("Harga dia 3.5 ringgit");
        assert_eq!(b.take_ready(false), None);
        b.push(". Boleh");
        assert_eq!(
            b.take_ready(false).as_deref(),
            Some("Harga dia 3.5 ringgit.")
        );
        b.push(" saya bantu? Ya");
        assert_eq!(b.take_ready(false).as_deref(), Some("Boleh saya bantu?"));
        assert_eq!(b.take_ready(false), None);
        assert_eq!(b.take_ready(true).as_deref(), Some("Ya"));
        assert_eq!(b.take_ready(true), None);
        b.push(&"kata ".repeat(80));
        let long = b.take_ready(false).unwrap();
        assert!(long.len() <= 400 && long.ends_with("kata"));
    }

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
