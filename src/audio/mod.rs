//! Audio plumbing: sample conversions, G.711, WAV files, resampling and voice activity.
//!
//! AudioSocket carries signed 16-bit little-endian PCM; G.711 only appears at the provider
//! edge (ElevenLabs `ulaw_8000`), and the VAD model wants 16 kHz, hence the resampler.

pub mod g711;
pub mod pcm;
pub mod resample;
pub mod vad;
pub mod wav;
