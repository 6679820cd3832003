use bytes::{BufMut, Bytes, BytesMut};

use super::*;
use crate::testutil::{decode_one, fix_crc};
use crate::{block_crcs, Header, MAX_STR_LEN};

fn round_trip(request: &Request) {
    let mut out = BytesMut::new();
    request.encode(0xDEAD_BEEF, 42, &mut out);
    let frame = decode_one(out);
    assert_eq!(frame.header.op, request.op());
    assert_eq!(frame.header.flags, request.flags());
    assert_eq!(frame.header.request_id, 0xDEAD_BEEF);
    assert_eq!(frame.header.epoch, 42);
    assert_eq!(Request::decode(&frame).as_ref(), Ok(request));
}

fn frame(op: u8, flags: u16, payload: Vec<u8>) -> Frame {
    Frame {
        header: Header {
            op,
            flags,
            request_id: 7,
            epoch: 1,
            payload_len: u32::try_from(payload.len()).unwrap(),
        },
        payload: Bytes::from(payload),
    }
}

fn write_payload(offset: u64, len: u32, crcs: &[u32], data: &[u8]) -> Vec<u8> {
    let mut p = BytesMut::new();
    p.put_u64_le(offset);
    p.put_u32_le(len);
    for crc in crcs {
        p.put_u32_le(*crc);
    }
    p.put_slice(data);
    p.to_vec()
}

fn every_request() -> Vec<Request> {
    let data = Bytes::from((0..3 * 4096).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    vec![
        Request::Hello {
            volume: "vol-1".into(),
            replica_id: "r0".into(),
            create_size: 1 << 30,
            takeover: false,
        },
        Request::Hello {
            volume: "ünïcødé".into(),
            replica_id: String::new(),
            create_size: 0,
            takeover: true,
        },
        Request::Read {
            offset: 4096 * 7,
            len: 8192,
        },
        Request::Write {
            offset: 4096,
            fua: true,
            crcs: block_crcs(&data),
            data: data.clone(),
        },
        Request::Write {
            offset: 0,
            fua: false,
            crcs: vec![1, 2, 3],
            data,
        },
        Request::Write {
            offset: 0,
            fua: false,
            crcs: vec![],
            data: Bytes::new(),
        },
        Request::WriteZeroes {
            offset: 0,
            len: u64::MAX,
            fua: true,
            no_hole: true,
        },
        Request::WriteZeroes {
            offset: 1,
            len: 2,
            fua: false,
            no_hole: true,
        },
        Request::Trim {
            offset: 8192,
            len: 4096,
            fua: true,
        },
        Request::Flush,
        Request::SnapshotCreate {
            name: "nightly".into(),
            created_unix_ms: 1_700_000_000_000,
            labels: vec![
                ("k".into(), "v".into()),
                (String::new(), "x".repeat(MAX_STR_LEN)),
            ],
        },
        Request::SnapshotCreate {
            name: "bare".into(),
            created_unix_ms: 0,
            labels: vec![],
        },
        Request::SnapshotDelete { name: "old".into() },
        Request::SnapshotRevert {
            name: "nightly".into(),
        },
        Request::SnapshotList,
        Request::Grow { new_size: 1 << 40 },
        Request::Status,
        Request::ListExtents {
            layer: LayerRef::Head,
            offset: 0,
            len: 1 << 20,
        },
        Request::ListExtents {
            layer: LayerRef::MergedAt("nightly".into()),
            offset: 4096,
            len: 0,
        },
        Request::ReadLayer {
            layer: LayerRef::Snapshot("nightly".into()),
            offset: 0,
            len: 4096,
        },
        Request::Ping,
        Request::Digest,
        Request::DirtyRegions,
        Request::Unmap {
            offset: 4096,
            len: 1 << 20,
        },
        Request::RangeDigests {
            layer: LayerRef::Snapshot("nightly".into()),
            offset: 0,
            len: 1 << 28,
            granule: 1 << 20,
        },
        Request::RangeDigests {
            layer: LayerRef::Merged,
            offset: u64::MAX,
            len: 0,
            granule: 0,
        },
        Request::Recreate,
    ]
}

#[test]
fn every_request_variant_round_trips() {
    let requests = every_request();
    let mut ops: Vec<u8> = requests.iter().map(Request::op).collect();
    ops.dedup();
    assert_eq!(
        ops,
        (op::FIRST_REQUEST..=op::LAST_REQUEST).collect::<Vec<_>>()
    );
    for request in &requests {
        round_trip(request);
    }
}

#[test]
fn rebuild_payload_layouts_are_as_documented() {
    let payload = |request: &Request| {
        let mut out = BytesMut::new();
        request.encode(1, 1, &mut out);
        assert_eq!(&out[6..8], &[0, 0], "no flags");
        out[32..].to_vec()
    };
    let unmap = Request::Unmap {
        offset: 0x2000,
        len: 0x3000,
    };
    let mut expected = 0x2000u64.to_le_bytes().to_vec();
    expected.extend_from_slice(&0x3000u64.to_le_bytes());
    assert_eq!(payload(&unmap), expected);

    let digests = Request::RangeDigests {
        layer: LayerRef::Snapshot("s1".into()),
        offset: 0x1000,
        len: 0x10_0000,
        granule: 0x4_0000,
    };
    let mut expected = vec![1, 2, 0, b's', b'1'];
    expected.extend_from_slice(&0x1000u64.to_le_bytes());
    expected.extend_from_slice(&0x10_0000u64.to_le_bytes());
    expected.extend_from_slice(&0x4_0000u32.to_le_bytes());
    assert_eq!(payload(&digests), expected);

    assert!(payload(&Request::Recreate).is_empty());
    assert_eq!(
        Request::decode(&frame(op::RECREATE, 0, vec![0])),
        Err(WireError::TrailingBytes(1))
    );
    assert_eq!(
        Request::decode(&frame(op::UNMAP, FLAG_FUA, vec![0; 16])),
        Err(WireError::BadFlags(FLAG_FUA))
    );
    assert_eq!(
        Request::decode(&frame(op::RANGE_DIGESTS, 0, vec![0; 20])),
        Err(WireError::Truncated)
    );
}

#[test]
fn write_payload_layout_is_as_documented() {
    let data = Bytes::from(vec![0xAB; 4096]);
    let crcs = block_crcs(&data);
    let request = Request::Write {
        offset: 0x1000,
        fua: true,
        crcs: crcs.clone(),
        data: data.clone(),
    };
    let mut out = BytesMut::new();
    request.encode(1, 1, &mut out);
    assert_eq!(&out[6..8], &FLAG_FUA.to_le_bytes());
    assert_eq!(&out[32..], &write_payload(0x1000, 4096, &crcs, &data)[..]);
    // The decoded data is a slice of the received frame, not a copy.
    let frame = decode_one(out);
    let Ok(Request::Write { data: decoded, .. }) = Request::decode(&frame) else {
        panic!("not a write");
    };
    assert_eq!(decoded.as_ptr(), frame.payload[16..].as_ptr());
}

#[test]
fn write_with_mismatched_crc_count_is_rejected() {
    let data = vec![1u8; 8192];
    let one_crc = block_crcs(&data[..4096]);
    let decoded = Request::decode(&frame(
        op::WRITE,
        0,
        write_payload(0, 8192, &one_crc, &data),
    ));
    assert_eq!(
        decoded,
        Err(WireError::LengthMismatch {
            expected: 12 + 8 + 8192,
            actual: 12 + 4 + 8192
        })
    );

    let three = [0u32; 3];
    let decoded = Request::decode(&frame(op::WRITE, 0, write_payload(0, 8192, &three, &data)));
    assert!(matches!(decoded, Err(WireError::LengthMismatch { .. })));

    let mut out = BytesMut::new();
    let request = Request::Write {
        offset: 0,
        fua: false,
        crcs: one_crc,
        data: Bytes::from(data),
    };
    assert_eq!(
        request.try_encode(1, 1, &mut out),
        Err(WireError::CrcCountMismatch {
            expected: 2,
            actual: 1
        })
    );
    assert!(out.is_empty());
}

#[test]
fn write_must_be_whole_blocks_and_exactly_its_length() {
    let data = vec![0u8; 100];
    let crcs = block_crcs(&data);
    assert_eq!(
        Request::decode(&frame(op::WRITE, 0, write_payload(0, 100, &crcs, &data))),
        Err(WireError::Misaligned { len: 100 })
    );
    let request = Request::Write {
        offset: 0,
        fua: false,
        crcs,
        data: Bytes::from(data),
    };
    assert_eq!(
        request.try_encode(0, 0, &mut BytesMut::new()),
        Err(WireError::Misaligned { len: 100 })
    );

    let data = vec![0u8; 4096];
    let crcs = block_crcs(&data);
    let mut payload = write_payload(0, 4096, &crcs, &data);
    payload.push(0);
    assert!(matches!(
        Request::decode(&frame(op::WRITE, 0, payload)),
        Err(WireError::LengthMismatch { .. })
    ));
    let short = write_payload(0, 4096, &crcs, &data[..4000]);
    assert!(matches!(
        Request::decode(&frame(op::WRITE, 0, short)),
        Err(WireError::LengthMismatch { .. })
    ));
}

#[test]
fn hello_takeover_is_a_header_flag_and_the_payload_is_unchanged() {
    let hello = |takeover| Request::Hello {
        volume: "v".into(),
        replica_id: "r".into(),
        create_size: 0x1000,
        takeover,
    };
    let mut plain = BytesMut::new();
    hello(false).encode(1, 1, &mut plain);
    let mut taking = BytesMut::new();
    hello(true).encode(1, 1, &mut taking);
    assert_eq!(&plain[6..8], &[0, 0]);
    assert_eq!(&taking[6..8], &FLAG_TAKEOVER.to_le_bytes());
    assert_eq!(&taking[6..8], &[0x04, 0x00]);
    let mut expected = vec![1, 0, b'v', 1, 0, b'r'];
    expected.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(&plain[32..], &expected[..]);
    assert_eq!(&taking[32..], &expected[..]);
    assert_eq!(
        Request::decode(&frame(op::HELLO, FLAG_TAKEOVER, expected.clone())),
        Ok(hello(true))
    );
    assert_eq!(
        Request::decode(&frame(op::HELLO, 0, expected.clone())),
        Ok(hello(false))
    );
    assert_eq!(
        Request::decode(&frame(op::HELLO, FLAG_TAKEOVER | FLAG_FUA, expected)),
        Err(WireError::BadFlags(FLAG_TAKEOVER | FLAG_FUA))
    );
}

#[test]
fn flags_must_suit_the_op() {
    // TAKEOVER is legal on Hello only.
    for (op, payload) in [
        (op::WRITE, write_payload(0, 0, &[], &[])),
        (op::READ, vec![0; 12]),
        (op::PING, vec![]),
        (op::RECREATE, vec![]),
        (op::WRITE_ZEROES, vec![0; 16]),
    ] {
        assert_eq!(
            Request::decode(&frame(op, FLAG_TAKEOVER, payload)),
            Err(WireError::BadFlags(FLAG_TAKEOVER)),
            "op {op:#04x}"
        );
    }
    assert_eq!(
        Request::decode(&frame(op::HELLO, FLAG_FUA, vec![0; 12])),
        Err(WireError::BadFlags(FLAG_FUA))
    );
    assert_eq!(
        Request::decode(&frame(op::READ, FLAG_FUA, vec![0; 12])),
        Err(WireError::BadFlags(FLAG_FUA))
    );
    assert_eq!(
        Request::decode(&frame(op::TRIM, FLAG_NO_HOLE, vec![0; 16])),
        Err(WireError::BadFlags(FLAG_NO_HOLE))
    );
    assert_eq!(
        Request::decode(&frame(op::WRITE_ZEROES, FLAG_NO_HOLE, vec![0; 16])),
        Ok(Request::WriteZeroes {
            offset: 0,
            len: 0,
            fua: false,
            no_hole: true
        })
    );
}

#[test]
fn structural_faults_are_refused() {
    assert_eq!(
        Request::decode(&frame(op::PING, 0, vec![0])),
        Err(WireError::TrailingBytes(1))
    );
    assert_eq!(
        Request::decode(&frame(op::READ, 0, vec![0; 11])),
        Err(WireError::Truncated)
    );
    assert_eq!(
        Request::decode(&frame(op::LIST_EXTENTS, 0, vec![4; 17])),
        Err(WireError::UnknownLayer(4))
    );
    assert_eq!(
        Request::decode(&frame(op::SNAPSHOT_DELETE, 0, vec![2, 0, 0xFF, 0xFE])),
        Err(WireError::BadUtf8)
    );
    assert_eq!(
        Request::decode(&frame(op::REPLY_BIT | op::PING, 0, vec![0])),
        Err(WireError::UnexpectedReply(op::REPLY_BIT | op::PING))
    );
    assert_eq!(
        Request::decode(&frame(0x40, 0, vec![])),
        Err(WireError::UnknownOp(0x40))
    );
    let mut lying = frame(op::PING, 0, vec![]);
    lying.header.payload_len = 5;
    assert!(matches!(
        Request::decode(&lying),
        Err(WireError::LengthMismatch { .. })
    ));
}

#[test]
fn unrepresentable_requests_fail_to_encode_and_leave_out_untouched() {
    let mut out = BytesMut::from(&b"prefix"[..]);
    let request = Request::SnapshotDelete {
        name: "x".repeat(MAX_STR_LEN + 1),
    };
    assert!(matches!(
        request.try_encode(1, 1, &mut out),
        Err(WireError::StringTooLong { .. })
    ));
    let labels = vec![(String::new(), String::new()); usize::from(u16::MAX) + 1];
    let request = Request::SnapshotCreate {
        name: "n".into(),
        created_unix_ms: 0,
        labels,
    };
    assert!(matches!(
        request.try_encode(1, 1, &mut out),
        Err(WireError::TooMany { .. })
    ));
    assert_eq!(&out[..], b"prefix");
}

#[test]
#[should_panic(expected = "cannot encode snapshot-revert request")]
fn encode_panics_on_an_unrepresentable_request() {
    let request = Request::SnapshotRevert {
        name: "y".repeat(MAX_STR_LEN + 1),
    };
    request.encode(0, 0, &mut BytesMut::new());
}

#[test]
fn a_patched_but_recrced_frame_still_gets_structural_checks() {
    let mut out = BytesMut::new();
    Request::Read {
        offset: 0,
        len: 4096,
    }
    .encode(1, 1, &mut out);
    out[6] = 1; // FUA on a read: allowed by the frame layer, not by Read.
    fix_crc(&mut out);
    let frame = decode_one(out);
    assert_eq!(Request::decode(&frame), Err(WireError::BadFlags(1)));
}

/// The worked example in docs/wire.md, byte for byte.
#[test]
fn documented_write_example_matches_docs_wire_md() {
    let request = Request::write(0x2000, true, Bytes::from(vec![0xAB; 4096]));
    let mut out = BytesMut::new();
    request.encode(7, 3, &mut out);
    let expected_head: [u8; 48] = [
        0x43, 0x41, 0x52, 0x4e, 0x01, 0x03, 0x01, 0x00, // magic, version, op, flags
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // request_id
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch
        0x10, 0x10, 0x00, 0x00, 0xcd, 0xee, 0x21, 0xa2, // payload_len, crc
        0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset
        0x00, 0x10, 0x00, 0x00, 0x0b, 0x5c, 0x79, 0xa8, // len, block CRC
    ];
    assert_eq!(out.len(), 4144);
    assert_eq!(&out[..48], &expected_head[..]);
    assert!(out[48..].iter().all(|&b| b == 0xAB));

    let reply = crate::Reply {
        request_id: 7,
        epoch: 3,
        op: op::WRITE,
        result: Ok(crate::ReplyBody::Empty),
    };
    let mut out = BytesMut::new();
    reply.encode(&mut out);
    let expected_reply: [u8; 33] = [
        0x43, 0x41, 0x52, 0x4e, 0x01, 0x83, 0x00, 0x00, // magic, version, op, flags
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // request_id
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch
        0x01, 0x00, 0x00, 0x00, 0x46, 0x84, 0xa4, 0x62, // payload_len, crc
        0x00, // status ok, empty body
    ];
    assert_eq!(&out[..], &expected_reply[..]);
}
