//! `tokio-util` codecs for both ends of an AudioSocket connection.
//!
//! [`ServerCodec`] is what the daemon uses: it decodes [`Inbound`] with strict validation
//! and encodes [`Outbound`] so that each message is one contiguous buffer (Asterisk waits
//! only 5 ms for a payload after its header, so header and payload must go in one write).
//! [`CallerCodec`] is the other end, used by the synthetic caller: it encodes whatever
//! Asterisk would send and decodes anything at all, so the caller can report a server
//! that sends a forbidden kind.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};
use uuid::Uuid;

use super::frame::{Digit, Inbound, Outbound, SampleRate};

/// Kind byte plus 16-bit length.
pub const HEADER_LEN: usize = 3;
/// The largest payload the length field can describe.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

const KIND_HANGUP: u8 = 0x00;
const KIND_UUID: u8 = 0x01;
const KIND_DTMF: u8 = 0x03;
const KIND_ERROR: u8 = 0xff;

/// A protocol or transport error on the inbound stream. Every variant ends the call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended inside a message.
    #[error(
        "truncated frame: kind 0x{kind:02x} announced {expected} payload bytes, stream ended after {got}"
    )]
    Truncated {
        /// The kind of the unfinished message.
        kind: u8,
        /// The length its header announced.
        expected: usize,
        /// How many payload bytes arrived.
        got: usize,
    },
    /// The stream ended inside a 3-byte header.
    #[error("truncated header: stream ended after {0} of 3 header bytes")]
    TruncatedHeader(usize),
    /// A kind that AudioSocket does not define.
    #[error("unknown message kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The first message was not a UUID.
    #[error("first message must be a UUID (0x01), got kind 0x{0:02x}")]
    UuidNotFirst(u8),
    /// A second UUID message.
    #[error("UUID sent twice")]
    DuplicateUuid,
    /// A UUID payload of the wrong size.
    #[error("UUID payload must be 16 bytes, got {0}")]
    BadUuidLength(usize),
    /// A DTMF payload that is not one valid digit.
    #[error("DTMF payload must be one of 0-9 * # A-D, got {0:02x?}")]
    BadDtmf(Vec<u8>),
    /// An audio message with no samples.
    #[error("empty audio frame (kind 0x{0:02x})")]
    EmptyAudio(u8),
    /// An audio message holding half a sample.
    #[error("audio frame of odd length {len} (kind 0x{kind:02x})")]
    OddAudio {
        /// The audio kind.
        kind: u8,
        /// The payload length.
        len: usize,
    },
    /// A hangup that carries a payload.
    #[error("hangup with a {0}-byte payload")]
    HangupWithPayload(usize),
}

/// Returns `(kind, payload)` once a whole message is buffered; advances only then.
fn split_frame(src: &mut BytesMut) -> Option<(u8, Bytes)> {
    if src.len() < HEADER_LEN {
        src.reserve(HEADER_LEN - src.len());
        return None;
    }
    let len = usize::from(u16::from_be_bytes([src[1], src[2]]));
    if src.len() < HEADER_LEN + len {
        src.reserve(HEADER_LEN + len - src.len());
        return None;
    }
    let kind = src[0];
    src.advance(HEADER_LEN);
    Some((kind, src.split_to(len).freeze()))
}

fn eof_error(src: &BytesMut) -> FrameError {
    if src.len() < HEADER_LEN {
        FrameError::TruncatedHeader(src.len())
    } else {
        FrameError::Truncated {
            kind: src[0],
            expected: usize::from(u16::from_be_bytes([src[1], src[2]])),
            got: src.len() - HEADER_LEN,
        }
    }
}

/// The daemon's codec: decodes and validates [`Inbound`], encodes [`Outbound`].
#[derive(Debug, Default)]
pub struct ServerCodec {
    seen_uuid: bool,
}

impl ServerCodec {
    /// A codec for a new connection: the first message must be the UUID.
    pub fn new() -> Self {
        Self::default()
    }

    fn parse(&mut self, kind: u8, payload: Bytes) -> Result<Inbound, FrameError> {
        if !self.seen_uuid && kind != KIND_UUID {
            return Err(FrameError::UuidNotFirst(kind));
        }
        match kind {
            KIND_UUID => {
                if self.seen_uuid {
                    return Err(FrameError::DuplicateUuid);
                }
                let bytes: [u8; 16] = payload
                    .as_ref()
                    .try_into()
                    .map_err(|_| FrameError::BadUuidLength(payload.len()))?;
                self.seen_uuid = true;
                Ok(Inbound::Uuid(Uuid::from_bytes(bytes)))
            }
            KIND_HANGUP if payload.is_empty() => Ok(Inbound::Hangup),
            KIND_HANGUP => Err(FrameError::HangupWithPayload(payload.len())),
            KIND_DTMF => match payload.as_ref() {
                [b] => Digit::new(*b)
                    .map(Inbound::Dtmf)
                    .ok_or_else(|| FrameError::BadDtmf(payload.to_vec())),
                _ => Err(FrameError::BadDtmf(payload.to_vec())),
            },
            KIND_ERROR => Ok(Inbound::Error(payload)),
            other => match SampleRate::from_kind(other) {
                Some(_) if payload.is_empty() => Err(FrameError::EmptyAudio(other)),
                Some(_) if !payload.len().is_multiple_of(2) => Err(FrameError::OddAudio {
                    kind: other,
                    len: payload.len(),
                }),
                Some(rate) => Ok(Inbound::Audio { rate, pcm: payload }),
                None => Err(FrameError::UnknownKind(other)),
            },
        }
    }
}

impl Decoder for ServerCodec {
    type Item = Inbound;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, FrameError> {
        match split_frame(src) {
            Some((kind, payload)) => self.parse(kind, payload).map(Some),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, FrameError> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() => Ok(None),
            None => Err(eof_error(src)),
        }
    }
}

impl Encoder<Outbound> for ServerCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Outbound, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        match item {
            Outbound::Hangup => dst.extend_from_slice(&[KIND_HANGUP, 0, 0]),
            Outbound::Audio(audio) => {
                let pcm = audio.pcm();
                dst.reserve(HEADER_LEN + pcm.len());
                dst.put_u8(audio.rate().kind());
                // Outbound::audio guarantees the payload fits in 16 bits.
                dst.put_u16(pcm.len() as u16);
                dst.extend_from_slice(pcm);
            }
        }
        Ok(())
    }
}

impl<'a> Encoder<&'a Outbound> for ServerCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: &'a Outbound, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        self.encode(item.clone(), dst)
    }
}

/// A message as the caller side sees it: any kind, unvalidated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The kind byte.
    pub kind: u8,
    /// The payload.
    pub payload: Bytes,
}

/// The Asterisk side's codec, for the synthetic caller and the tests.
#[derive(Debug, Default)]
pub struct CallerCodec;

impl Decoder for CallerCodec {
    type Item = RawFrame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, FrameError> {
        Ok(split_frame(src).map(|(kind, payload)| RawFrame { kind, payload }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, FrameError> {
        match self.decode(src)? {
            Some(f) => Ok(Some(f)),
            None if src.is_empty() => Ok(None),
            None => Err(eof_error(src)),
        }
    }
}

impl Encoder<Inbound> for CallerCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Inbound, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        let (kind, payload): (u8, &[u8]) = match &item {
            Inbound::Hangup => (KIND_HANGUP, &[]),
            Inbound::Uuid(u) => (KIND_UUID, u.as_bytes()),
            Inbound::Dtmf(d) => {
                dst.extend_from_slice(&[KIND_DTMF, 0, 1, d.as_byte()]);
                return Ok(());
            }
            Inbound::Audio { rate, pcm } => (rate.kind(), pcm),
            Inbound::Error(p) => (KIND_ERROR, p),
        };
        let len = u16::try_from(payload.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "payload over 65535 bytes")
        })?;
        dst.reserve(HEADER_LEN + payload.len());
        dst.put_u8(kind);
        dst.put_u16(len);
        dst.extend_from_slice(payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn uuid_frame() -> Vec<u8> {
        frame(0x01, &[7u8; 16])
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Inbound>, FrameError> {
        let mut codec = ServerCodec::new();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(m) = codec.decode_eof(&mut buf)? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn decodes_every_kind() {
        let mut s = uuid_frame();
        s.extend(frame(0x03, b"#"));
        for rate in SampleRate::ALL {
            s.extend(frame(rate.kind(), &[1, 0, 2, 0]));
        }
        s.extend(frame(0xff, &[4]));
        s.extend(frame(0x00, &[]));
        let msgs = decode_all(&s).unwrap();
        assert_eq!(msgs[0], Inbound::Uuid(Uuid::from_bytes([7; 16])));
        assert_eq!(msgs[1], Inbound::Dtmf(Digit::new(b'#').unwrap()));
        for (i, rate) in SampleRate::ALL.into_iter().enumerate() {
            assert_eq!(
                msgs[2 + i],
                Inbound::Audio {
                    rate,
                    pcm: Bytes::from_static(&[1, 0, 2, 0])
                }
            );
        }
        assert_eq!(msgs[11], Inbound::Error(Bytes::from_static(&[4])));
        assert_eq!(msgs[12], Inbound::Hangup);
    }

    #[test]
    fn accepts_audio_of_any_even_length() {
        let mut s = uuid_frame();
        s.extend(frame(0x10, &[0u8; 288]));
        s.extend(frame(0x10, &[0u8; 2]));
        assert_eq!(decode_all(&s).unwrap().len(), 3);
    }

    #[test]
    fn rejects_malformed_input() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (frame(0x10, &[0, 0]), "UuidNotFirst"),
            (frame(0x01, &[1; 15]), "BadUuidLength"),
            (frame(0x01, &[1; 17]), "BadUuidLength"),
            ([uuid_frame(), uuid_frame()].concat(), "DuplicateUuid"),
            ([uuid_frame(), frame(0x03, b"x")].concat(), "BadDtmf"),
            ([uuid_frame(), frame(0x03, b"12")].concat(), "BadDtmf"),
            ([uuid_frame(), frame(0x03, b"")].concat(), "BadDtmf"),
            ([uuid_frame(), frame(0x10, &[])].concat(), "EmptyAudio"),
            ([uuid_frame(), frame(0x12, &[1, 2, 3])].concat(), "OddAudio"),
            ([uuid_frame(), frame(0x02, &[])].concat(), "UnknownKind"),
            ([uuid_frame(), frame(0x19, &[0, 0])].concat(), "UnknownKind"),
            (
                [uuid_frame(), frame(0x00, &[1])].concat(),
                "HangupWithPayload",
            ),
            ([uuid_frame(), vec![0x10, 0x01]].concat(), "TruncatedHeader"),
            (
                [uuid_frame(), vec![0x10, 0x01, 0x40, 0, 0]].concat(),
                "Truncated",
            ),
        ];
        for (bytes, want) in cases {
            let err = decode_all(&bytes).expect_err(want);
            let got = format!("{err:?}");
            assert!(got.starts_with(&want.to_string()), "want {want}, got {got}");
        }
    }

    #[test]
    fn eof_between_messages_is_clean() {
        assert_eq!(decode_all(&uuid_frame()).unwrap().len(), 1);
        assert!(decode_all(&[]).unwrap().is_empty());
    }

    #[test]
    fn encodes_outbound_in_one_buffer() {
        let mut codec = ServerCodec::new();
        let mut dst = BytesMut::new();
        let audio = Outbound::audio_samples(SampleRate::Hz16000, &[1, -1]).unwrap();
        codec.encode(audio, &mut dst).unwrap();
        codec.encode(Outbound::Hangup, &mut dst).unwrap();
        assert_eq!(&dst[..], &[0x12, 0, 4, 1, 0, 0xff, 0xff, 0, 0, 0]);
    }

    #[test]
    fn outbound_refuses_invalid_audio() {
        use crate::audiosocket::OutboundError;
        assert_eq!(
            Outbound::audio(SampleRate::Hz8000, Bytes::new()),
            Err(OutboundError::Empty)
        );
        assert_eq!(
            Outbound::audio(SampleRate::Hz8000, Bytes::from_static(&[1, 2, 3])),
            Err(OutboundError::OddLength(3))
        );
        assert_eq!(
            Outbound::audio(SampleRate::Hz8000, Bytes::from(vec![0; 65536])),
            Err(OutboundError::TooLong(65536))
        );
    }

    #[test]
    fn caller_codec_round_trips_with_server_codec() {
        let msgs = vec![
            Inbound::Uuid(Uuid::new_v4()),
            Inbound::Dtmf(Digit::new(b'5').unwrap()),
            Inbound::Audio {
                rate: SampleRate::Hz8000,
                pcm: Bytes::from(vec![3u8; 320]),
            },
            Inbound::Error(Bytes::new()),
            Inbound::Hangup,
        ];
        let mut buf = BytesMut::new();
        for m in msgs.clone() {
            CallerCodec.encode(m, &mut buf).unwrap();
        }
        let mut codec = ServerCodec::new();
        let mut got = Vec::new();
        while let Some(m) = codec.decode_eof(&mut buf).unwrap() {
            got.push(m);
        }
        assert_eq!(got, msgs);
    }

    fn arb_message() -> impl Strategy<Value = Inbound> {
        prop_oneof![
            Just(Inbound::Hangup),
            prop::sample::select(b"0123456789*#ABCD".to_vec())
                .prop_map(|b| Inbound::Dtmf(Digit::new(b).unwrap())),
            (0usize..9, prop::collection::vec(any::<u8>(), 1..400)).prop_map(|(r, mut v)| {
                if v.len() % 2 == 1 {
                    v.pop();
                }
                if v.is_empty() {
                    v = vec![0, 0];
                }
                Inbound::Audio {
                    rate: SampleRate::ALL[r],
                    pcm: Bytes::from(v),
                }
            }),
            prop::collection::vec(any::<u8>(), 0..4).prop_map(|v| Inbound::Error(Bytes::from(v))),
        ]
    }

    proptest! {
        /// Any split of a valid byte stream decodes to the same messages.
        #[test]
        fn any_split_decodes_the_same(
            uuid in any::<[u8; 16]>(),
            body in prop::collection::vec(arb_message(), 0..20),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
        ) {
            let mut msgs = vec![Inbound::Uuid(Uuid::from_bytes(uuid))];
            msgs.extend(body);
            let mut wire = BytesMut::new();
            for m in msgs.clone() {
                CallerCodec.encode(m, &mut wire).unwrap();
            }
            let wire = wire.freeze();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            points.push(wire.len());
            points.sort_unstable();
            let mut codec = ServerCodec::new();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut at = 0;
            for p in points {
                buf.extend_from_slice(&wire[at..p]);
                at = p;
                while let Some(m) = codec.decode(&mut buf).unwrap() {
                    got.push(m);
                }
            }
            prop_assert!(codec.decode_eof(&mut buf).unwrap().is_none());
            prop_assert_eq!(got, msgs);
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let mut codec = ServerCodec::new();
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode_eof(&mut buf) {}
        }
    }
}
