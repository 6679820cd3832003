use bytes::{Bytes, BytesMut};

use super::*;
use crate::testutil::decode_one;
use crate::{Header, Request, FLAG_FUA};

fn ok(op: u8, body: ReplyBody) -> Reply {
    Reply {
        request_id: 77,
        epoch: 5,
        op,
        result: Ok(body),
    }
}

fn round_trip(reply: &Reply) {
    let mut out = BytesMut::new();
    reply.encode(&mut out);
    let frame = decode_one(out);
    assert_eq!(frame.header.op, op::REPLY_BIT | reply.op);
    assert_eq!(frame.header.flags, 0);
    assert_eq!(Reply::decode(&frame).as_ref(), Ok(reply));
}

fn status_body() -> StatusBody {
    StatusBody {
        size: 1 << 30,
        epoch: 3,
        instance: 0x0123_4567_89AB_CDEF,
        volume: "vol".into(),
        replica_id: "r1".into(),
        chain: vec!["a".into(), "b".into()],
        counters: Counters {
            reads: 1,
            writes: 2,
            bytes_read: 3,
            bytes_written: 4,
            flushes: 5,
            errors: 6,
            corruptions: 7,
            dirty_regions: 8,
        },
    }
}

#[test]
fn every_reply_body_round_trips() {
    let data = Bytes::from((0..4096 + 100).map(|i| (i % 13) as u8).collect::<Vec<u8>>());
    let replies = [
        ok(op::WRITE, ReplyBody::Empty),
        ok(op::PING, ReplyBody::Empty),
        ok(op::HELLO, ReplyBody::Status(status_body())),
        ok(
            op::STATUS,
            ReplyBody::Status(StatusBody {
                chain: vec![],
                counters: Counters::default(),
                ..status_body()
            }),
        ),
        ok(op::READ, ReplyBody::data(data.clone())),
        ok(
            op::READ,
            ReplyBody::Data {
                crcs: vec![1, 2],
                data,
            },
        ),
        ok(
            op::READ_LAYER,
            ReplyBody::Data {
                crcs: vec![],
                data: Bytes::new(),
            },
        ),
        ok(
            op::SNAPSHOT_LIST,
            ReplyBody::Snapshots(vec![
                SnapshotInfo {
                    name: "base".into(),
                    parent: None,
                    created_unix_ms: 1,
                    allocated_bytes: 4096,
                    labels: vec![],
                },
                SnapshotInfo {
                    name: "next".into(),
                    parent: Some("base".into()),
                    created_unix_ms: 2,
                    allocated_bytes: 0,
                    labels: vec![("owner".into(), "ops".into())],
                },
            ]),
        ),
        ok(op::SNAPSHOT_LIST, ReplyBody::Snapshots(vec![])),
        ok(
            op::LIST_EXTENTS,
            ReplyBody::Extents(vec![(0, 4096), (1 << 20, u64::MAX)]),
        ),
        ok(
            op::DIGEST,
            ReplyBody::Digest {
                digest: [0x5A; DIGEST_LEN],
                size: 1 << 30,
            },
        ),
        ok(
            op::DIRTY_REGIONS,
            ReplyBody::DirtyRegions {
                region_size: 1 << 20,
                regions: vec![0, 3, 99],
            },
        ),
        ok(op::UNMAP, ReplyBody::Empty),
        ok(
            op::RANGE_DIGESTS,
            ReplyBody::RangeDigests(vec![[1; DIGEST_LEN], [0; DIGEST_LEN], [0xFF; DIGEST_LEN]]),
        ),
        ok(op::RANGE_DIGESTS, ReplyBody::RangeDigests(vec![])),
        ok(op::RECREATE, ReplyBody::Status(status_body())),
    ];
    for reply in &replies {
        round_trip(reply);
    }
}

#[test]
fn status_and_range_digest_layouts_are_as_documented() {
    let mut out = BytesMut::new();
    ok(op::STATUS, ReplyBody::Status(status_body())).encode(&mut out);
    let mut expected = vec![0];
    expected.extend_from_slice(&(1u64 << 30).to_le_bytes());
    expected.extend_from_slice(&3u64.to_le_bytes());
    expected.extend_from_slice(&0x0123_4567_89AB_CDEFu64.to_le_bytes());
    expected.extend_from_slice(&[3, 0, b'v', b'o', b'l', 2, 0, b'r', b'1']);
    expected.extend_from_slice(&[2, 0, 1, 0, b'a', 1, 0, b'b']);
    for c in 1u64..=8 {
        expected.extend_from_slice(&c.to_le_bytes());
    }
    assert_eq!(&out[32..], &expected[..]);

    let mut out = BytesMut::new();
    let digests = vec![[7; DIGEST_LEN], [9; DIGEST_LEN]];
    ok(op::RANGE_DIGESTS, ReplyBody::RangeDigests(digests)).encode(&mut out);
    let mut expected = vec![0, 2, 0, 0, 0];
    expected.extend_from_slice(&[7; DIGEST_LEN]);
    expected.extend_from_slice(&[9; DIGEST_LEN]);
    assert_eq!(&out[32..], &expected[..]);

    // Strict: a digest list cut short or with a byte too many is refused.
    let reply_op = op::REPLY_BIT | op::RANGE_DIGESTS;
    let mut short = expected.clone();
    short.pop();
    assert_eq!(
        Reply::decode(&reply_frame(reply_op, 0, short)),
        Err(WireError::Truncated)
    );
    let mut long = expected;
    long.push(0);
    assert_eq!(
        Reply::decode(&reply_frame(reply_op, 0, long)),
        Err(WireError::TrailingBytes(1))
    );
    // A forged count cannot make the decoder allocate.
    let mut forged = vec![0];
    forged.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        Reply::decode(&reply_frame(reply_op, 0, forged)),
        Err(WireError::Truncated)
    );
}

#[test]
fn every_op_has_a_body_shape() {
    for request_op in op::FIRST_REQUEST..=op::LAST_REQUEST {
        assert!(body_kind(request_op).is_some(), "op {request_op:#04x}");
    }
}

#[test]
fn error_replies_round_trip_for_every_kind() {
    for kind in ErrorKind::ALL {
        round_trip(&Reply {
            request_id: 1,
            epoch: 2,
            op: op::READ,
            result: Err(ReplyError::new(kind, 4096 * 3, format!("{kind} happened"))),
        });
    }
}

#[test]
fn error_reply_layout_is_as_documented() {
    let reply = Reply {
        request_id: 1,
        epoch: 2,
        op: op::READ,
        result: Err(ReplyError::new(ErrorKind::Corruption, 8192, "bad")),
    };
    let mut out = BytesMut::new();
    reply.encode(&mut out);
    assert_eq!(out[5], 0x82);
    let mut expected = vec![6];
    expected.extend_from_slice(&8192u64.to_le_bytes());
    expected.extend_from_slice(&[3, 0, b'b', b'a', b'd']);
    assert_eq!(&out[32..], &expected[..]);
}

#[test]
fn reply_error_messages_are_cut_to_fit() {
    let long = "é".repeat(MAX_STR_LEN); // 2 bytes a char
    let err = ReplyError::new(ErrorKind::Io, 0, long);
    assert_eq!(err.message.len(), MAX_STR_LEN);
    let odd = format!("x{}", "é".repeat(MAX_STR_LEN));
    let err = ReplyError::new(ErrorKind::Io, 0, odd);
    assert_eq!(err.message.len(), MAX_STR_LEN - 1, "cut at a char boundary");
    assert_eq!(
        err.to_string(),
        format!("i/o error: {} (detail 0)", err.message)
    );
}

#[test]
fn body_must_match_the_op_when_encoding() {
    let mut out = BytesMut::new();
    assert_eq!(
        ok(op::READ, ReplyBody::Empty).try_encode(&mut out),
        Err(WireError::BodyMismatch { op: op::READ })
    );
    assert_eq!(
        ok(0x55, ReplyBody::Empty).try_encode(&mut out),
        Err(WireError::UnknownOp(0x55))
    );
    let bad_crcs = ReplyBody::Data {
        crcs: vec![],
        data: Bytes::from_static(b"x"),
    };
    assert_eq!(
        ok(op::READ, bad_crcs).try_encode(&mut out),
        Err(WireError::CrcCountMismatch {
            expected: 1,
            actual: 0
        })
    );
    let empty_parent = ReplyBody::Snapshots(vec![SnapshotInfo {
        name: "s".into(),
        parent: Some(String::new()),
        created_unix_ms: 0,
        allocated_bytes: 0,
        labels: vec![],
    }]);
    assert_eq!(
        ok(op::SNAPSHOT_LIST, empty_parent).try_encode(&mut out),
        Err(WireError::EmptyParent)
    );
    assert!(out.is_empty());
}

fn reply_frame(op_byte: u8, flags: u16, payload: Vec<u8>) -> Frame {
    Frame {
        header: Header {
            op: op_byte,
            flags,
            request_id: 1,
            epoch: 1,
            payload_len: u32::try_from(payload.len()).unwrap(),
        },
        payload: Bytes::from(payload),
    }
}

#[test]
fn malformed_replies_are_refused() {
    let ping = op::REPLY_BIT | op::PING;
    assert_eq!(
        Reply::decode(&reply_frame(ping, 0, vec![])),
        Err(WireError::Truncated)
    );
    assert_eq!(
        Reply::decode(&reply_frame(ping, 0, vec![0, 0])),
        Err(WireError::TrailingBytes(1))
    );
    assert_eq!(
        Reply::decode(&reply_frame(ping, 0, vec![14])),
        Err(WireError::UnknownErrorKind(14))
    );
    assert_eq!(
        Reply::decode(&reply_frame(ping, FLAG_FUA, vec![0])),
        Err(WireError::BadFlags(FLAG_FUA))
    );
    assert_eq!(
        Reply::decode(&reply_frame(op::PING, 0, vec![0])),
        Err(WireError::UnexpectedRequest(op::PING))
    );
    assert_eq!(
        Reply::decode(&reply_frame(0xC0, 0, vec![0])),
        Err(WireError::UnknownOp(0xC0))
    );
    // A forged extent count cannot make the decoder allocate.
    let mut forged = vec![0];
    forged.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        Reply::decode(&reply_frame(op::REPLY_BIT | op::LIST_EXTENTS, 0, forged)),
        Err(WireError::Truncated)
    );
    // Data whose length claims more than is there.
    let mut short = vec![0];
    short.extend_from_slice(&4096u32.to_le_bytes());
    short.extend_from_slice(&[0; 4 + 10]);
    assert_eq!(
        Reply::decode(&reply_frame(op::REPLY_BIT | op::READ, 0, short)),
        Err(WireError::Truncated)
    );
}

#[test]
fn a_request_frame_is_not_a_reply_and_vice_versa() {
    let mut out = BytesMut::new();
    Request::Flush.encode(3, 4, &mut out);
    let frame = decode_one(out);
    assert_eq!(
        Reply::decode(&frame),
        Err(WireError::UnexpectedRequest(op::FLUSH))
    );

    let mut out = BytesMut::new();
    ok(op::FLUSH, ReplyBody::Empty).encode(&mut out);
    let frame = decode_one(out);
    assert_eq!(
        Request::decode(&frame),
        Err(WireError::UnexpectedReply(op::REPLY_BIT | op::FLUSH))
    );
    assert!(Reply::decode(&frame).is_ok());
}
