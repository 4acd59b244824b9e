//! The warm transfer's whisper leg: when the person the agent transferred to answers, the
//! dialplan's `Dial(..., U(sifucall-whisper^<uuid>^<daemon>))` opens a second AudioSocket
//! connection from *their* channel with the call's whisper UUID; the daemon speaks the
//! summary the agent wrote and ends the leg with 0x00, and Dial connects the two.
//!
//! The summary is stored when the call's outcome is decided (a transfer with a summary),
//! keyed by [`whisper_uuid`](super::ami::control::whisper_uuid), and taken once. A leg
//! takes no call slot (it belongs to a call already counted), reads and drops what the
//! person's phone sends, keeps the line alive with silence while the text is synthesized
//! (Asterisk drops an AudioSocket leg after 2 s without a message), plays the audio paced at
//! 20 ms frames, and always ends with 0x00, also when synthesis fails or there is no TTS
//! (echo mode).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::audiosocket::{Inbound, Outbound, SampleRate, ServerCodec};
use crate::call::Behaviour;
use crate::providers::tts::TtsParams;

/// How long a summary waits for its whisper leg.
pub const WHISPER_TTL: Duration = Duration::from_secs(600);
/// Summaries kept at most.
const MAX_SUMMARIES: usize = 10_000;
/// Longest wait for the summary's audio; the leg then ends without it.
pub const SYNTHESIS_DEADLINE: Duration = Duration::from_secs(5);
/// Longest wait for the person's first audio frame, which says the rate.
const FIRST_AUDIO_WAIT: Duration = Duration::from_millis(500);
/// Longest a leg may speak (a runaway summary must not hold the person).
const MAX_SPEECH: Duration = Duration::from_secs(30);

/// Summaries waiting for their whisper leg.
#[derive(Debug, Default)]
pub struct WhisperStore {
    summaries: Mutex<HashMap<Uuid, (String, Instant)>>,
}

impl WhisperStore {
    /// Keeps `summary` for the leg `leg`.
    pub fn put(&self, leg: Uuid, summary: String) {
        let now = Instant::now();
        let mut map = self.summaries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_SUMMARIES {
            map.retain(|_, (_, at)| now.saturating_duration_since(*at) < WHISPER_TTL);
            if map.len() >= MAX_SUMMARIES {
                return;
            }
        }
        map.insert(leg, (summary, now));
    }

    /// Takes the summary for `leg`, if one waits and has not expired.
    pub fn take(&self, leg: Uuid) -> Option<String> {
        let (text, at) = self
            .summaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&leg)?;
        (Instant::now().saturating_duration_since(at) < WHISPER_TTL).then_some(text)
    }
}

/// Speaks `summary` on a whisper leg, then sends 0x00.
pub async fn serve_leg<S>(
    mut framed: Framed<S, ServerCodec>,
    leg: Uuid,
    summary: String,
    behaviour: Behaviour,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::info_span!("whisper", leg = %leg);
    let _enter = span.enter();
    // The person's phone says the rate with its first frame.
    let rate = match tokio::time::timeout(FIRST_AUDIO_WAIT, framed.next()).await {
        Ok(Some(Ok(Inbound::Audio { rate, .. }))) if rate == SampleRate::Hz16000 => rate,
        Ok(None) | Ok(Some(Ok(Inbound::Hangup))) | Ok(Some(Err(_))) => return,
        _ => SampleRate::Hz8000,
    };
    let frame = rate.samples_per_frame();
    let silence = vec![0i16; frame];
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let synth = async {
        let setup = match &behaviour {
            Behaviour::Agent(setup) => Some(Arc::clone(setup)),
            Behaviour::Profiles(profiles) => profiles.default_setup(),
            Behaviour::Echo => None,
        };
        match setup {
            Some(setup) => {
                let params = TtsParams {
                    sample_rate: rate.hz(),
                    call_id: leg.to_string(),
                    language_code: None,
                };
                tokio::time::timeout(
                    SYNTHESIS_DEADLINE,
                    crate::call::prompts::synthesize_text(
                        setup.providers.tts.as_ref(),
                        params,
                        &summary,
                    ),
                )
                .await
                .unwrap_or_else(|_| Err("timed out".into()))
            }
            None => Err("no text-to-speech in echo mode".into()),
        }
    };
    tokio::pin!(synth);
    let pcm = loop {
        tokio::select! {
            r = &mut synth => break r,
            _ = tick.tick() => {
                if send(&mut framed, rate, &silence).await.is_err() {
                    return;
                }
            }
            inbound = framed.next() => if gone(inbound) { return },
            () = cancel.cancelled() => break Err("shutting down".into()),
        }
    };
    let pcm = match pcm {
        Ok(pcm) => pcm,
        Err(e) => {
            warn!(error = %e, "whisper leg: summary not spoken");
            Vec::new()
        }
    };
    let max = usize::try_from(u64::from(rate.hz()) * MAX_SPEECH.as_secs()).unwrap_or(usize::MAX);
    let mut chunks = pcm[..pcm.len().min(max)].chunks(frame);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(chunk) = chunks.next() else { break };
                if send(&mut framed, rate, chunk).await.is_err() {
                    return;
                }
            }
            inbound = framed.next() => if gone(inbound) { return },
            () = cancel.cancelled() => break,
        }
    }
    let _ = framed.send(Outbound::Hangup).await;
    info!(
        samples = pcm.len(),
        "whisper leg: summary spoken; connecting the person"
    );
}

fn gone(inbound: Option<Result<Inbound, crate::audiosocket::FrameError>>) -> bool {
    matches!(inbound, None | Some(Ok(Inbound::Hangup)) | Some(Err(_)))
}

async fn send<S>(
    framed: &mut Framed<S, ServerCodec>,
    rate: SampleRate,
    pcm: &[i16],
) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let frame = Outbound::audio_samples(rate, pcm).map_err(|_| ())?;
    framed.send(frame).await.map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn summaries_are_taken_once_and_expire() {
        let s = WhisperStore::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        s.put(a, "one".into());
        s.put(b, "two".into());
        assert_eq!(s.take(a).as_deref(), Some("one"));
        assert_eq!(s.take(a), None);
        tokio::time::advance(WHISPER_TTL).await;
        assert_eq!(s.take(b), None);
    }
}
