//! Typed AudioSocket messages, one enum per direction.

use bytes::Bytes;
use std::fmt;
use uuid::Uuid;

/// Sample rate of an audio message; each rate has its own message kind (0x10, 0x11..0x18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SampleRate {
    /// 0x10, slin at 8 kHz: what `AudioSocket()` always uses.
    Hz8000,
    /// 0x11, slin12.
    Hz12000,
    /// 0x12, slin16: wideband through `Dial(AudioSocket/.../c(slin16))`.
    Hz16000,
    /// 0x13, slin24.
    Hz24000,
    /// 0x14, slin32.
    Hz32000,
    /// 0x15, slin44.
    Hz44100,
    /// 0x16, slin48.
    Hz48000,
    /// 0x17, slin96.
    Hz96000,
    /// 0x18, slin192.
    Hz192000,
}

impl SampleRate {
    /// Every rate, in kind order.
    pub const ALL: [Self; 9] = [
        Self::Hz8000,
        Self::Hz12000,
        Self::Hz16000,
        Self::Hz24000,
        Self::Hz32000,
        Self::Hz44100,
        Self::Hz48000,
        Self::Hz96000,
        Self::Hz192000,
    ];

    /// The message kind that carries audio at this rate.
    pub const fn kind(self) -> u8 {
        match self {
            Self::Hz8000 => 0x10,
            Self::Hz12000 => 0x11,
            Self::Hz16000 => 0x12,
            Self::Hz24000 => 0x13,
            Self::Hz32000 => 0x14,
            Self::Hz44100 => 0x15,
            Self::Hz48000 => 0x16,
            Self::Hz96000 => 0x17,
            Self::Hz192000 => 0x18,
        }
    }

    /// The rate carried by an audio kind, or `None` if `kind` is not an audio kind.
    pub const fn from_kind(kind: u8) -> Option<Self> {
        Some(match kind {
            0x10 => Self::Hz8000,
            0x11 => Self::Hz12000,
            0x12 => Self::Hz16000,
            0x13 => Self::Hz24000,
            0x14 => Self::Hz32000,
            0x15 => Self::Hz44100,
            0x16 => Self::Hz48000,
            0x17 => Self::Hz96000,
            0x18 => Self::Hz192000,
            _ => return None,
        })
    }

    /// Samples per second.
    pub const fn hz(self) -> u32 {
        match self {
            Self::Hz8000 => 8_000,
            Self::Hz12000 => 12_000,
            Self::Hz16000 => 16_000,
            Self::Hz24000 => 24_000,
            Self::Hz32000 => 32_000,
            Self::Hz44100 => 44_100,
            Self::Hz48000 => 48_000,
            Self::Hz96000 => 96_000,
            Self::Hz192000 => 192_000,
        }
    }

    /// The rate for a number of samples per second, if AudioSocket has a kind for it.
    pub fn from_hz(hz: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.hz() == hz)
    }

    /// Samples in one 20 ms frame (44.1 kHz rounds down to 882).
    pub const fn samples_per_frame(self) -> usize {
        (self.hz() / 50) as usize
    }
}

impl fmt::Display for SampleRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} Hz", self.hz())
    }
}

/// A DTMF digit: `0-9 * # A-D`, as Asterisk sends it in a 0x03 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digit(u8);

impl Digit {
    /// Validates one ASCII byte.
    pub fn new(b: u8) -> Option<Self> {
        matches!(b, b'0'..=b'9' | b'*' | b'#' | b'A'..=b'D').then_some(Self(b))
    }

    /// The digit as a character.
    pub fn as_char(self) -> char {
        char::from(self.0)
    }

    /// The digit as its wire byte.
    pub fn as_byte(self) -> u8 {
        self.0
    }
}

impl fmt::Display for Digit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// A message from Asterisk to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// 0x00: the call is over. Asterisk's app never sends it, but the channel driver may.
    Hangup,
    /// 0x01: the call's UUID, always the first message.
    Uuid(Uuid),
    /// 0x03: one DTMF digit, sent when the key is released.
    Dtmf(Digit),
    /// 0x10..0x18: signed 16-bit little-endian mono PCM, non-empty, even length.
    Audio {
        /// The rate named by the message kind.
        rate: SampleRate,
        /// Raw little-endian samples.
        pcm: Bytes,
    },
    /// 0xff: Asterisk reports an error; the payload is an optional error code.
    Error(Bytes),
}

/// Why an [`Outbound`] audio message could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    /// Asterisk aborts the call on a zero-length audio message.
    #[error("an outbound audio frame must not be empty")]
    Empty,
    /// Half a sample would shift every following sample by one byte.
    #[error("an outbound audio frame must hold whole 16-bit samples, got {0} bytes")]
    OddLength(usize),
    /// The length field is 16 bits.
    #[error("an outbound audio frame must be at most 65535 bytes, got {0}")]
    TooLong(usize),
}

/// A message from the server to Asterisk: only what Asterisk accepts.
///
/// Audio can be built only through [`Outbound::audio`], which refuses empty, odd or
/// oversized payloads, so an invalid frame is unrepresentable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// 0x00: end the call gracefully; the dialplan continues at the next priority.
    Hangup,
    /// Audio at a rate AudioSocket knows. Constructed by [`Outbound::audio`].
    Audio(OutboundAudio),
}

/// Validated outbound audio; the fields are private so it cannot be built empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundAudio {
    rate: SampleRate,
    pcm: Bytes,
}

impl OutboundAudio {
    /// The rate (and so the kind) of this frame.
    pub fn rate(&self) -> SampleRate {
        self.rate
    }

    /// The little-endian PCM payload.
    pub fn pcm(&self) -> &Bytes {
        &self.pcm
    }
}

impl Outbound {
    /// Builds an audio message from little-endian PCM bytes.
    pub fn audio(rate: SampleRate, pcm: Bytes) -> Result<Self, OutboundError> {
        if pcm.is_empty() {
            return Err(OutboundError::Empty);
        }
        if !pcm.len().is_multiple_of(2) {
            return Err(OutboundError::OddLength(pcm.len()));
        }
        if pcm.len() > usize::from(u16::MAX) {
            return Err(OutboundError::TooLong(pcm.len()));
        }
        Ok(Self::Audio(OutboundAudio { rate, pcm }))
    }

    /// Builds an audio message from samples.
    pub fn audio_samples(rate: SampleRate, samples: &[i16]) -> Result<Self, OutboundError> {
        let mut buf = Vec::with_capacity(samples.len() * 2);
        for s in samples {
            buf.extend_from_slice(&s.to_le_bytes());
        }
        Self::audio(rate, Bytes::from(buf))
    }
}
