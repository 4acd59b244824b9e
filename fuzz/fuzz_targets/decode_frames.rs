//! Feeds arbitrary bytes to the daemon's AudioSocket decoder, split into arbitrary reads.
//!
//! Properties: no panic; every call that yields a frame or an error consumes input (so a
//! `Framed` read loop always makes progress); `Ok(None)` consumes nothing; at end of stream
//! `decode_eof` either drains the buffer or reports truncation.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sifucall::audiosocket::ServerCodec;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size (1..=256), the rest is the stream.
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step) + 1;

    let mut codec = ServerCodec::new();
    let mut buf = BytesMut::new();
    for chunk in stream.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(_)) => assert!(buf.len() < before, "frame decoded without consuming input"),
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed input");
                    break;
                }
                // A decode error ends a real connection; keep going to fuzz later state too,
                // but the bad frame must have been consumed.
                Err(_) => assert!(buf.len() < before, "error without consuming input"),
            }
        }
    }
    // End of stream: drain what is complete, then the rest is either nothing or an error.
    loop {
        let before = buf.len();
        match codec.decode_eof(&mut buf) {
            Ok(Some(_)) => assert!(buf.len() < before, "eof frame without consuming input"),
            Ok(None) => {
                assert!(
                    buf.is_empty(),
                    "decode_eof returned Ok(None) with {} bytes left",
                    buf.len()
                );
                break;
            }
            Err(_) if buf.len() < before => {}
            // Truncation is reported without consuming: the loop ends here.
            Err(_) => break,
        }
    }
});
