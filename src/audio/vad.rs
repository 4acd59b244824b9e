//! Voice activity on call audio: speech probabilities from the `earshot` model.
//!
//! The call loop uses them for barge-in (the caller talks over the agent) and for
//! end-of-turn hints. [`Vad`] adapts arbitrary AudioSocket chunks at 8 or 16 kHz to the
//! model's fixed input (256 samples at 16 kHz = 16 ms), one probability per window.

use earshot::Detector;

use super::resample::Upsampler2x;

/// Samples per model window at 16 kHz.
const WINDOW_SAMPLES: usize = 256;

/// Construction error for [`Vad`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VadError {
    /// Only 8 kHz and 16 kHz are supported.
    #[error("unsupported VAD sample rate {0} Hz (need 8000 or 16000)")]
    UnsupportedRate(u32),
}

/// Streaming speech-probability estimator for one call direction.
///
/// 8 kHz input is upsampled with [`Upsampler2x`] (adding its 1.5 ms delay). Chunks of any
/// length are accepted; samples short of a full window wait for the next call.
pub struct Vad {
    detector: Box<Detector>,
    upsampler: Option<Upsampler2x>,
    /// 16 kHz samples not yet fed to the model (always fewer than a window after `push`).
    pending: Vec<i16>,
}

impl std::fmt::Debug for Vad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vad")
            .field(
                "rate",
                &if self.upsampler.is_some() {
                    8000
                } else {
                    16000
                },
            )
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Vad {
    /// Length of the window each probability describes.
    pub const WINDOW_MS: u32 = 16;

    /// A detector for audio at `sample_rate` (8000 or 16000 Hz).
    pub fn new(sample_rate: u32) -> Result<Self, VadError> {
        let upsampler = match sample_rate {
            8000 => Some(Upsampler2x::new()),
            16000 => None,
            other => return Err(VadError::UnsupportedRate(other)),
        };
        Ok(Self {
            detector: Detector::default_boxed(),
            upsampler,
            pending: Vec::with_capacity(2 * WINDOW_SAMPLES),
        })
    }

    /// Feeds samples; appends one speech probability in `[0, 1]` per completed 16 ms window.
    pub fn push(&mut self, pcm: &[i16], out: &mut Vec<f32>) {
        match &mut self.upsampler {
            Some(up) => up.process(pcm, &mut self.pending),
            None => self.pending.extend_from_slice(pcm),
        }
        let mut windows = self.pending.chunks_exact(WINDOW_SAMPLES);
        for window in &mut windows {
            out.push(self.detector.predict_i16(window).clamp(0.0, 1.0));
        }
        let rest = windows.remainder().len();
        let consumed = self.pending.len() - rest;
        self.pending.drain(..consumed);
    }

    /// Forgets all audio so far (model state, resampler history and partial window).
    pub fn reset(&mut self) {
        self.detector.reset();
        if let Some(up) = &mut self.upsampler {
            *up = Upsampler2x::new();
        }
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::wav;
    use std::path::PathBuf;

    // A debouncer over the probabilities, as a call would use them, so the fixture tests
    // can assert one speech region per recording. (Production does its own turn-taking.)
    /// Settings of a [`SpeechGate`]. Durations are rounded up to whole 16 ms windows.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct GateConfig {
        /// A window is speech when its probability is at least this (earshot suggests 0.5).
        threshold: f32,
        /// While speaking, a window still counts as speech down to this lower probability
        /// (hysteresis on the level, so a wobbling score does not chop speech up). Clamped to at
        /// most `threshold`.
        release_threshold: f32,
        /// Speech must last this long (consecutive speech windows) before `SpeechStart`; this is
        /// the caller's barge-in setting.
        min_speech_ms: u32,
        /// Non-speech must last this long (consecutive) before `SpeechEnd` (the hangover).
        min_silence_ms: u32,
    }

    impl Default for GateConfig {
        fn default() -> Self {
            Self {
                threshold: 0.5,
                release_threshold: 0.35,
                min_speech_ms: 300,
                min_silence_ms: 240,
            }
        }
    }

    /// A change of the gate's state.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum GateEvent {
        /// Speech has lasted `min_speech_ms`; it began that long ago.
        SpeechStart,
        /// Non-speech has lasted `min_silence_ms`; speech ended that long ago.
        SpeechEnd,
    }

    /// Speech/silence decision with hysteresis, fed one probability per 16 ms window.
    #[derive(Debug, Clone)]
    struct SpeechGate {
        threshold: f32,
        release_threshold: f32,
        min_speech: u32,
        min_silence: u32,
        speaking: bool,
        /// Consecutive windows contradicting the current state.
        run: u32,
    }

    fn windows_for(ms: u32) -> u32 {
        ms.div_ceil(Vad::WINDOW_MS).max(1)
    }

    impl SpeechGate {
        /// A gate in the silent state.
        fn new(config: GateConfig) -> Self {
            Self {
                threshold: config.threshold,
                release_threshold: config.release_threshold.min(config.threshold),
                min_speech: windows_for(config.min_speech_ms),
                min_silence: windows_for(config.min_silence_ms),
                speaking: false,
                run: 0,
            }
        }

        /// Takes the next window's probability; returns an event when the state flips.
        fn push(&mut self, prob: f32) -> Option<GateEvent> {
            // NaN is neither speech nor above the release level: it counts as silence.
            let is_speech = if self.speaking {
                prob >= self.release_threshold
            } else {
                prob >= self.threshold
            };
            if is_speech == self.speaking {
                self.run = 0;
                return None;
            }
            self.run += 1;
            let needed = if self.speaking {
                self.min_silence
            } else {
                self.min_speech
            };
            if self.run < needed {
                return None;
            }
            self.run = 0;
            self.speaking = !self.speaking;
            Some(if self.speaking {
                GateEvent::SpeechStart
            } else {
                GateEvent::SpeechEnd
            })
        }

        /// Whether the gate is in the speaking state.
        fn is_speaking(&self) -> bool {
            self.speaking
        }

        /// Returns to the silent state.
        fn reset(&mut self) {
            self.speaking = false;
            self.run = 0;
        }
    }

    fn fixture(name: &str) -> wav::MonoPcm {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        wav::read(&path).unwrap()
    }

    /// Runs the VAD and a default gate over `samples` in `chunk`-sized pieces; returns the
    /// probabilities and each event with the time (ms) at which it fired.
    fn run(
        rate: u32,
        samples: &[i16],
        chunk: usize,
        config: GateConfig,
    ) -> (Vec<f32>, Vec<(GateEvent, u32)>) {
        let mut vad = Vad::new(rate).unwrap();
        let mut gate = SpeechGate::new(config);
        let mut probs = Vec::new();
        for c in samples.chunks(chunk) {
            vad.push(c, &mut probs);
        }
        let events = probs
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| gate.push(p).map(|e| (e, (i as u32 + 1) * Vad::WINDOW_MS)))
            .collect();
        (probs, events)
    }

    /// First and last millisecond of audible signal (16 ms blocks above -45 dBFS).
    fn speech_extent_ms(f: &wav::MonoPcm) -> (u32, u32) {
        let block = f.rate as usize * 16 / 1000;
        let loud: Vec<usize> = f
            .samples
            .chunks(block)
            .enumerate()
            .filter(|(_, c)| crate::audio::pcm::dbfs(c) > -45.0)
            .map(|(i, _)| i)
            .collect();
        let (first, last) = (*loud.first().unwrap() as u32, *loud.last().unwrap() as u32);
        (first * 16, (last + 1) * 16)
    }

    fn check_fixture(name: &str) {
        let f = fixture(name);
        let (begin, end) = speech_extent_ms(&f);
        // The fixtures carry 1 s of padding on each side.
        assert!(
            begin >= 1000 && end + 1000 <= (f.samples.len() * 1000 / f.rate as usize) as u32 + 16
        );
        // Real AudioSocket frames are 20 ms; also an odd size to exercise the carry-over.
        for chunk in [f.rate as usize / 50, 333] {
            let config = GateConfig::default();
            let (_, events) = run(f.rate, &f.samples, chunk, config);
            let [
                (GateEvent::SpeechStart, start),
                (GateEvent::SpeechEnd, stop),
            ] = events[..]
            else {
                panic!(
                    "{name}: expected one start and one end, got {events:?} (speech {begin}..{end} ms)"
                );
            };
            // Start: not in the leading silence, at least min_speech into the speech, and
            // well before it is over.
            assert!(
                start >= begin + config.min_speech_ms,
                "{name}: start at {start} ms, speech from {begin} ms"
            );
            assert!(
                start <= begin + 1000,
                "{name}: start at {start} ms, speech from {begin} ms"
            );
            // End: after the speech, once the hangover has passed, and not long after.
            assert!(
                stop >= end + config.min_silence_ms - 100,
                "{name}: end at {stop} ms, speech until {end} ms"
            );
            assert!(
                stop <= end + config.min_silence_ms + 400,
                "{name}: end at {stop} ms, speech until {end} ms"
            );
        }
    }

    #[test]
    fn detects_speech_in_malay_question_8k() {
        check_fixture("malay_question_8k.wav");
    }

    #[test]
    fn detects_speech_in_malay_goodbye_8k() {
        check_fixture("malay_goodbye_8k.wav");
    }

    #[test]
    fn detects_speech_in_malay_question_16k() {
        check_fixture("malay_question_16k.wav");
    }

    #[test]
    fn chunking_does_not_change_probabilities() {
        let f = fixture("malay_question_8k.wav");
        let (whole, _) = run(f.rate, &f.samples, f.samples.len(), GateConfig::default());
        assert_eq!(whole.len(), f.samples.len() * 2 / 256);
        for chunk in [1, 7, 160, 256, 1000] {
            assert_eq!(
                run(f.rate, &f.samples, chunk, GateConfig::default()).0,
                whole,
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn silent_on_silence_and_low_noise() {
        for rate in [8000, 16000] {
            let n = rate as usize * 8;
            let (probs, events) = run(rate, &vec![0; n], 160, GateConfig::default());
            assert!(events.is_empty(), "{rate} Hz silence: {events:?}");
            assert!(probs.iter().all(|&p| p < 0.5), "{rate} Hz silence");

            // Deterministic white noise from an LCG, uniform in [-180, 180]: about -50 dBFS.
            let mut state: u32 = 0x1234_5678;
            let noise: Vec<i16> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((state >> 16) % 361) as i16 - 180
                })
                .collect();
            let level = crate::audio::pcm::dbfs(&noise);
            assert!((-52.0..-48.0).contains(&level), "{level} dBFS");
            let (_, events) = run(rate, &noise, 160, GateConfig::default());
            assert!(events.is_empty(), "{rate} Hz noise: {events:?}");
        }
    }

    #[test]
    fn rejects_other_rates_and_resets() {
        assert_eq!(
            Vad::new(44100).unwrap_err(),
            VadError::UnsupportedRate(44100)
        );
        let f = fixture("malay_goodbye_8k.wav");
        let mut vad = Vad::new(8000).unwrap();
        let mut first = Vec::new();
        vad.push(&f.samples, &mut first);
        vad.push(&f.samples[..100], &mut Vec::new()); // leaves a partial window behind
        vad.reset();
        let mut second = Vec::new();
        vad.push(&f.samples, &mut second);
        assert_eq!(first, second);
    }

    fn feed(gate: &mut SpeechGate, probs: &[f32]) -> Vec<(usize, GateEvent)> {
        probs
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| gate.push(p).map(|e| (i, e)))
            .collect()
    }

    #[test]
    fn gate_debounces_start_and_end() {
        // 300 ms = 19 windows (rounded up), 240 ms = 15 windows.
        let mut gate = SpeechGate::new(GateConfig::default());
        let mut probs = vec![0.9; 18];
        probs.push(0.1); // a blip of 18 windows is not enough
        probs.extend([0.9; 19]);
        probs.extend([0.4; 30]); // above the release level: still speech
        probs.extend([0.2; 14]); // a pause shorter than the hangover
        probs.extend([0.6; 3]);
        probs.extend([0.2; 15]);
        probs.extend([0.2; 10]);
        let events = feed(&mut gate, &probs);
        assert_eq!(
            events,
            [
                (37, GateEvent::SpeechStart),
                (18 + 1 + 19 + 30 + 14 + 3 + 14, GateEvent::SpeechEnd)
            ]
        );
        assert!(!gate.is_speaking());
    }

    #[test]
    fn gate_parameters_and_edge_cases() {
        let config = GateConfig {
            threshold: 0.7,
            release_threshold: 0.9,
            min_speech_ms: 0,
            min_silence_ms: 16,
        };
        let mut gate = SpeechGate::new(config);
        assert_eq!(gate.push(0.69), None);
        assert_eq!(gate.push(0.7), Some(GateEvent::SpeechStart));
        assert!(gate.is_speaking());
        // The release level is clamped to the threshold.
        assert_eq!(gate.push(0.7), None);
        assert_eq!(gate.push(f32::NAN), Some(GateEvent::SpeechEnd));
        assert_eq!(gate.push(f32::NAN), None);

        let mut gate = SpeechGate::new(GateConfig {
            min_speech_ms: 100,
            ..GateConfig::default()
        });
        assert_eq!(feed(&mut gate, &[0.8; 7]), [(6, GateEvent::SpeechStart)]);
        gate.reset();
        assert!(!gate.is_speaking());
        assert_eq!(feed(&mut gate, &[0.8; 7]), [(6, GateEvent::SpeechStart)]);
    }
}
