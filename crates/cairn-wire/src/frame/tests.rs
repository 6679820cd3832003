use bytes::{Bytes, BytesMut};

use super::*;
use crate::testutil::fix_crc;
use crate::{Request, DEFAULT_MAX_FRAME};

fn ping(request_id: u64) -> BytesMut {
    let mut out = BytesMut::new();
    Request::Ping.encode(request_id, 9, &mut out);
    out
}

fn raw(op: u8, flags: u16, payload: &'static [u8]) -> BytesMut {
    let frame = Frame {
        header: Header {
            op,
            flags,
            request_id: 1,
            epoch: 2,
            payload_len: u32::try_from(payload.len()).unwrap(),
        },
        payload: Bytes::from_static(payload),
    };
    let mut out = BytesMut::new();
    frame.encode(&mut out).unwrap();
    out
}

fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    FrameDecoder::new(DEFAULT_MAX_FRAME).decode(buf)
}

#[test]
fn header_layout_is_as_documented() {
    let buf = raw(op::READ, 0, &[0xAA; 12]);
    assert_eq!(&buf[0..4], b"CARN");
    assert_eq!(buf[4], VERSION);
    assert_eq!(buf[5], op::READ);
    assert_eq!(&buf[8..16], &1u64.to_le_bytes());
    assert_eq!(&buf[16..24], &2u64.to_le_bytes());
    assert_eq!(&buf[24..28], &12u32.to_le_bytes());
    let crc = crc32fast::hash(&[&buf[..28], &buf[32..]].concat());
    assert_eq!(&buf[28..32], &crc.to_le_bytes());
}

#[test]
fn decodes_a_frame_and_consumes_it() {
    let mut buf = raw(op::READ, 0, &[5; 12]);
    let frame = decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    assert_eq!(frame.header.op, op::READ);
    assert_eq!(frame.header.request_id, 1);
    assert_eq!(frame.header.epoch, 2);
    assert_eq!(frame.header.payload_len, 12);
    assert_eq!(&frame.payload[..], &[5; 12]);
}

#[test]
fn corrupted_crc_is_rejected() {
    let mut buf = raw(op::READ, 0, &[5; 12]);
    buf[40] ^= 0x10;
    assert!(matches!(decode(&mut buf), Err(WireError::BadCrc { .. })));
    assert_eq!(buf.len(), HEADER_LEN + 12, "nothing consumed on error");

    let mut buf = raw(op::READ, 0, &[5; 12]);
    buf[OFF_CRC] ^= 1;
    assert!(matches!(decode(&mut buf), Err(WireError::BadCrc { .. })));

    // Request id and epoch are covered too.
    let mut buf = raw(op::READ, 0, &[5; 12]);
    buf[OFF_EPOCH] ^= 1;
    assert!(matches!(decode(&mut buf), Err(WireError::BadCrc { .. })));
}

#[test]
fn wrong_magic_version_op_and_flags_are_rejected_even_with_a_valid_crc() {
    let mut buf = ping(1);
    buf[0] = b'X';
    fix_crc(&mut buf);
    let bad_magic = u32::from_le_bytes(*b"XARN");
    assert_eq!(decode(&mut buf), Err(WireError::BadMagic(bad_magic)));

    let mut buf = ping(1);
    buf[OFF_VERSION] = 2;
    fix_crc(&mut buf);
    assert_eq!(decode(&mut buf), Err(WireError::BadVersion(2)));

    for bad_op in [0x00, 0x15, 0x7F, 0x80, 0x95, 0xFF] {
        let mut buf = raw(bad_op, 0, b"");
        assert_eq!(decode(&mut buf), Err(WireError::UnknownOp(bad_op)));
    }
    let mut buf = raw(op::REPLY_BIT | op::PING, 0, &[0]);
    assert!(
        decode(&mut buf).unwrap().is_some(),
        "replies are frames too"
    );

    let mut buf = raw(op::WRITE, 0x0008, b"");
    assert_eq!(decode(&mut buf), Err(WireError::BadFlags(0x0008)));
    let mut buf = raw(op::WRITE, 0x8001, b"");
    assert_eq!(decode(&mut buf), Err(WireError::BadFlags(0x8001)));
    // TAKEOVER is a known bit: the frame layer lets it through whatever the op, and
    // Request::decode refuses it on every op but Hello.
    let mut buf = raw(op::WRITE, FLAG_TAKEOVER, b"");
    let frame = decode(&mut buf).unwrap().expect("a whole frame");
    assert_eq!(
        Request::decode(&frame),
        Err(WireError::BadFlags(FLAG_TAKEOVER))
    );
}

#[test]
fn bad_header_fields_are_rejected_as_soon_as_they_arrive() {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1"[..]);
    assert_eq!(
        decoder.decode(&mut buf),
        Err(WireError::BadMagic(u32::from_le_bytes(*b"GET ")))
    );
    assert_eq!(decoder.bytes_needed(&buf), 0);

    let mut buf = BytesMut::from(&b"CARN\x01\x42"[..]);
    assert_eq!(decoder.decode(&mut buf), Err(WireError::UnknownOp(0x42)));
}

#[test]
fn truncated_input_needs_more_bytes_until_complete() {
    let full = raw(op::READ, 0, &[3; 12]);
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::new();
    for (i, byte) in full.iter().enumerate() {
        let needed = if i < HEADER_LEN {
            HEADER_LEN - i
        } else {
            full.len() - i
        };
        assert_eq!(decoder.bytes_needed(&buf), needed);
        assert_eq!(decoder.decode(&mut buf), Ok(None), "after {i} bytes");
        assert_eq!(buf.len(), i, "nothing consumed while incomplete");
        buf.extend_from_slice(&[*byte]);
    }
    assert_eq!(decoder.bytes_needed(&buf), 0);
    let frame = decoder.decode(&mut buf).unwrap().unwrap();
    assert_eq!(&frame.payload[..], &[3; 12]);
    assert!(buf.is_empty());
    assert_eq!(decoder.decode(&mut buf), Ok(None));
}

#[test]
fn oversized_length_is_rejected_before_the_payload_arrives() {
    let max = 1024;
    let mut decoder = FrameDecoder::new(max);
    let mut header = ping(1);
    header[OFF_PAYLOAD_LEN..OFF_CRC].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(decoder.bytes_needed(&header), 0);
    assert_eq!(
        decoder.decode(&mut header),
        Err(WireError::TooLarge {
            len: HEADER_LEN + u32::MAX as usize,
            max
        })
    );

    // Exactly at the limit is fine; one byte over is not.
    let limit = u32::try_from(max - HEADER_LEN).unwrap();
    let mut at_limit = ping(1);
    at_limit[OFF_PAYLOAD_LEN..OFF_CRC].copy_from_slice(&limit.to_le_bytes());
    assert_eq!(decoder.decode(&mut at_limit), Ok(None));
    assert_eq!(decoder.bytes_needed(&at_limit), max - HEADER_LEN);
    let mut over = ping(1);
    over[OFF_PAYLOAD_LEN..OFF_CRC].copy_from_slice(&(limit + 1).to_le_bytes());
    assert_eq!(
        decoder.decode(&mut over),
        Err(WireError::TooLarge { len: max + 1, max })
    );
}

#[test]
fn tiny_max_frame_still_takes_empty_frames() {
    let mut decoder = FrameDecoder::new(0);
    assert_eq!(decoder.max_frame(), HEADER_LEN);
    let mut buf = ping(4);
    assert!(decoder.decode(&mut buf).unwrap().is_some());
    let mut buf = raw(op::READ, 0, &[0; 12]);
    assert!(matches!(
        decoder.decode(&mut buf),
        Err(WireError::TooLarge { .. })
    ));
}

#[test]
fn back_to_back_frames_decode_in_order() {
    let mut buf = ping(1);
    buf.extend_from_slice(&raw(op::READ, 0, &[9; 12]));
    buf.extend_from_slice(&ping(3));
    buf.extend_from_slice(&ping(4)[..10]);
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let ids: Vec<(u64, u8)> = std::iter::from_fn(|| decoder.decode(&mut buf).unwrap())
        .map(|f| (f.header.request_id, f.header.op))
        .collect();
    assert_eq!(ids, [(1, op::PING), (1, op::READ), (3, op::PING)]);
    assert_eq!(buf.len(), 10, "the partial fourth frame stays buffered");
}

#[test]
fn frame_encode_refuses_an_inconsistent_length() {
    let frame = Frame {
        header: Header {
            op: op::PING,
            flags: 0,
            request_id: 0,
            epoch: 0,
            payload_len: 3,
        },
        payload: Bytes::new(),
    };
    let mut out = BytesMut::from(&b"keep"[..]);
    assert_eq!(
        frame.encode(&mut out),
        Err(WireError::LengthMismatch {
            expected: 3,
            actual: 0
        })
    );
    assert_eq!(&out[..], b"keep");
}
