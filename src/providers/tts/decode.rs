//! Sans-IO decoding of ElevenLabs audio bytes into `i16` PCM.
//!
//! The service sends headerless audio in whatever chunks the transport produced (websocket
//! messages, HTTP body chunks). For `pcm_*` a chunk may end in the middle of a 16-bit sample,
//! so the decoder keeps the odd byte and joins it to the next chunk; G.711 maps byte for byte.

use crate::audio::g711;
use crate::ops::config::OutputFormat;

/// Turns a stream of audio bytes in one output format into whole `i16` samples.
#[derive(Debug, Clone)]
pub struct AudioDecoder {
    format: OutputFormat,
    carry: Option<u8>,
}

impl AudioDecoder {
    /// A decoder for bytes in `format`.
    pub fn new(format: OutputFormat) -> Self {
        Self {
            format,
            carry: None,
        }
    }

    /// The format being decoded.
    pub fn format(&self) -> OutputFormat {
        self.format
    }

    /// Decodes `bytes` and appends the whole samples to `out`; a split sample is held until
    /// the next call.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<i16>) {
        match self.format {
            OutputFormat::Ulaw8000 => out.extend(bytes.iter().map(|&b| g711::ulaw_decode(b))),
            OutputFormat::Alaw8000 => out.extend(bytes.iter().map(|&b| g711::alaw_decode(b))),
            OutputFormat::Pcm8000 | OutputFormat::Pcm16000 => {
                let mut rest = bytes;
                if let Some(lo) = self.carry.take() {
                    match rest.split_first() {
                        Some((&hi, tail)) => {
                            out.push(i16::from_le_bytes([lo, hi]));
                            rest = tail;
                        }
                        None => {
                            self.carry = Some(lo);
                            return;
                        }
                    }
                }
                let mut pairs = rest.chunks_exact(2);
                out.reserve(rest.len() / 2);
                for pair in pairs.by_ref() {
                    if let [lo, hi] = *pair {
                        out.push(i16::from_le_bytes([lo, hi]));
                    }
                }
                self.carry = pairs.remainder().first().copied();
            }
        }
    }

    /// Convenience: decodes one chunk into a fresh vector.
    pub fn decode(&mut self, bytes: &[u8]) -> Vec<i16> {
        let mut out = Vec::new();
        self.push(bytes, &mut out);
        out
    }

    /// Whether half a sample is still waiting for its second byte (at the end of a stream it
    /// means the service sent an odd number of bytes; the byte is dropped).
    pub fn has_partial_sample(&self) -> bool {
        self.carry.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm_samples_split_across_chunks_are_joined() {
        let samples: Vec<i16> = vec![0, 1, -1, 1234, -32768, 32767, 0x0102];
        let mut bytes = Vec::new();
        crate::audio::pcm::samples_to_le_bytes(&samples, &mut bytes);
        // Every way of cutting the buffer into three pieces gives the same samples.
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let mut dec = AudioDecoder::new(OutputFormat::Pcm16000);
                let mut out = Vec::new();
                dec.push(&bytes[..a], &mut out);
                dec.push(&bytes[a..b], &mut out);
                dec.push(&bytes[b..], &mut out);
                assert_eq!(out, samples, "cut at {a},{b}");
                assert!(!dec.has_partial_sample());
            }
        }
    }

    #[test]
    fn single_byte_chunks_and_empty_chunks() {
        let mut dec = AudioDecoder::new(OutputFormat::Pcm8000);
        assert!(dec.decode(&[0x34]).is_empty());
        assert!(dec.has_partial_sample());
        assert!(dec.decode(&[]).is_empty());
        assert!(dec.has_partial_sample());
        assert_eq!(dec.decode(&[0x12, 0xff]), vec![0x1234]);
        assert!(dec.has_partial_sample());
        assert_eq!(dec.decode(&[0x7f]), vec![0x7fff]);
        assert!(!dec.has_partial_sample());
    }

    #[test]
    fn g711_maps_each_byte() {
        let mut u = AudioDecoder::new(OutputFormat::Ulaw8000);
        assert_eq!(u.decode(&[0xff, 0x7f, 0x80]), vec![0, 0, 32124]);
        let mut a = AudioDecoder::new(OutputFormat::Alaw8000);
        assert_eq!(a.decode(&[0xd5, 0x55]), vec![8, -8]);
        assert!(!a.has_partial_sample());
    }
}
