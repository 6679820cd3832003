//! Fuzz target `decode`: bytes through `FrameDecoder` (small max frame,
//! input fed in chunks) and every frame it yields through `Request::decode`
//! and `Reply::decode`; and, since random bytes rarely carry a valid CRC,
//! the same input read directly as a frame header + payload so the payload
//! decoders get fuzzed too.
//!
//! Properties checked (the same as tests/proptests.rs on stable):
//! no panic; every yielded frame re-encodes to exactly the bytes it was cut
//! from and fits the max frame; whatever decodes re-encodes to the same bytes.

#![no_main]

use bytes::BytesMut;
use cairn_wire::{Frame, FrameDecoder, Header, Reply, Request, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

/// Small, so that length checks and partial frames are exercised often.
const MAX_FRAME: usize = 4096;

fn check_payload_decoders(frame: &Frame) {
    let mut original = BytesMut::new();
    frame.encode(&mut original).expect("consistent frame");
    if let Ok(request) = Request::decode(frame) {
        let mut again = BytesMut::new();
        request.encode(frame.header.request_id, frame.header.epoch, &mut again);
        assert_eq!(again, original, "request re-encodes differently");
    }
    if let Ok(reply) = Reply::decode(frame) {
        let mut again = BytesMut::new();
        reply.encode(&mut again);
        assert_eq!(again, original, "reply re-encodes differently");
    }
}

fn stream(chunk: usize, input: &[u8]) {
    let mut decoder = FrameDecoder::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    let mut consumed = 0;
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let mut again = BytesMut::new();
                    frame.encode(&mut again).expect("consistent frame");
                    assert!(again.len() <= MAX_FRAME);
                    assert_eq!(&again[..], &input[consumed..consumed + again.len()]);
                    consumed += again.len();
                    check_payload_decoders(&frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

fn direct(input: &[u8]) {
    let Some((&op, rest)) = input.split_first() else {
        return;
    };
    let Some((flags, payload)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let Ok(payload_len) = u32::try_from(payload.len()) else {
        return;
    };
    let frame = Frame {
        header: Header {
            op,
            flags: u16::from_le_bytes(*flags),
            request_id: 1,
            epoch: 1,
            payload_len,
        },
        payload: bytes::Bytes::copy_from_slice(payload),
    };
    check_payload_decoders(&frame);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    if input.len() > 4 * MAX_FRAME + HEADER_LEN {
        return;
    }
    if mode & 0x80 == 0 {
        stream(usize::from(mode).max(1), input);
    } else {
        direct(input);
    }
});
