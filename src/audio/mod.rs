//! Audio plumbing: sample conversions, G.711, WAV files, resampling and voice activity.
//!
//! AudioSocket carries signed 16-bit little-endian PCM; G.711 only appears at the provider
//! edge (ElevenLabs `ulaw_8000`), and the VAD model wants 16 kHz, hence the resampler.

/// G.711 µ-law and A-law, bit-exact with the ITU-T reference software.
pub mod g711;
pub mod pcm;
/// Streaming 2x conversion between 8 and 16 kHz, and linear one-shot resampling.
pub mod resample;
/// Voice activity: `earshot` speech probabilities and a debounced speech gate.
pub mod vad;
pub mod wav;
