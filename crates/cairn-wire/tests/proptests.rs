//! Property tests of the codec: the same properties the cargo-fuzz target
//! (`fuzz/fuzz_targets/decode.rs`) explores, run on stable in CI.
//!
//! - arbitrary bytes in arbitrary chunks never panic the decoder, and every
//!   frame it yields re-encodes to exactly the bytes it consumed (so its CRC
//!   was right);
//! - every representable request and reply round-trips exactly;
//! - flipping any one byte of an encoded frame makes decoding fail or wait
//!   for more bytes, never yield a frame;
//! - payload decoders never panic on arbitrary payloads, and whatever they
//!   accept re-encodes to the same bytes (the encoding is canonical).

use bytes::{Bytes, BytesMut};
use cairn_wire::{
    block_crcs, op, Counters, ErrorKind, Frame, FrameDecoder, Header, LayerRef, Reply, ReplyBody,
    ReplyError, Request, SnapshotInfo, StatusBody, WireError, BLOCK_SIZE, DEFAULT_MAX_FRAME,
    DIGEST_LEN, MAX_STR_LEN,
};
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------- strategies

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        1 => Just(String::new()),
        1 => Just("é".repeat(MAX_STR_LEN / 2)),
    ]
}

fn arb_labels() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((arb_string(), arb_string()), 0..4)
}

fn arb_layer() -> impl Strategy<Value = LayerRef> {
    prop_oneof![
        Just(LayerRef::Head),
        Just(LayerRef::Merged),
        arb_string().prop_map(LayerRef::Snapshot),
    ]
}

/// Cheap pseudo-random data of `len` bytes.
fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn arb_write() -> impl Strategy<Value = Request> {
    (0usize..=3).prop_flat_map(|blocks| {
        let len = blocks * BLOCK_SIZE as usize;
        (
            any::<u64>(),
            any::<bool>(),
            any::<u8>(),
            prop_oneof![
                Just(None),
                prop::collection::vec(any::<u32>(), blocks).prop_map(Some)
            ],
        )
            .prop_map(move |(offset, fua, seed, crcs)| {
                let data = pattern(len, seed);
                Request::Write {
                    offset,
                    fua,
                    crcs: crcs.unwrap_or_else(|| block_crcs(&data)),
                    data,
                }
            })
    })
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (arb_string(), arb_string(), any::<u64>(), any::<bool>()).prop_map(
            |(volume, replica_id, create_size, takeover)| Request::Hello {
                volume,
                replica_id,
                create_size,
                takeover,
            }
        ),
        (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Request::Read { offset, len }),
        arb_write(),
        (any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>()).prop_map(
            |(offset, len, fua, no_hole)| Request::WriteZeroes {
                offset,
                len,
                fua,
                no_hole
            }
        ),
        (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(offset, len, fua)| Request::Trim {
            offset,
            len,
            fua
        }),
        Just(Request::Flush),
        (arb_string(), any::<u64>(), arb_labels()).prop_map(|(name, created_unix_ms, labels)| {
            Request::SnapshotCreate {
                name,
                created_unix_ms,
                labels,
            }
        }),
        arb_string().prop_map(|name| Request::SnapshotDelete { name }),
        arb_string().prop_map(|name| Request::SnapshotRevert { name }),
        Just(Request::SnapshotList),
        any::<u64>().prop_map(|new_size| Request::Grow { new_size }),
        Just(Request::Status),
        (arb_layer(), any::<u64>(), any::<u64>())
            .prop_map(|(layer, offset, len)| Request::ListExtents { layer, offset, len }),
        (arb_layer(), any::<u64>(), any::<u32>())
            .prop_map(|(layer, offset, len)| Request::ReadLayer { layer, offset, len }),
        Just(Request::Ping),
        Just(Request::Digest),
        Just(Request::DirtyRegions),
        (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| Request::Unmap { offset, len }),
        (arb_layer(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
            |(layer, offset, len, granule)| Request::RangeDigests {
                layer,
                offset,
                len,
                granule
            }
        ),
        Just(Request::Recreate),
    ]
}

fn arb_counters() -> impl Strategy<Value = Counters> {
    prop::array::uniform8(any::<u64>()).prop_map(|c| Counters {
        reads: c[0],
        writes: c[1],
        bytes_read: c[2],
        bytes_written: c[3],
        flushes: c[4],
        errors: c[5],
        corruptions: c[6],
        dirty_regions: c[7],
    })
}

fn arb_status() -> impl Strategy<Value = StatusBody> {
    (
        (any::<u64>(), any::<u64>(), any::<u64>()),
        arb_string(),
        arb_string(),
        prop::collection::vec(arb_string(), 0..4),
        arb_counters(),
    )
        .prop_map(
            |((size, epoch, instance), volume, replica_id, chain, counters)| StatusBody {
                size,
                epoch,
                instance,
                volume,
                replica_id,
                chain,
                counters,
            },
        )
}

fn arb_snapshot() -> impl Strategy<Value = SnapshotInfo> {
    (
        arb_string(),
        prop::option::of(arb_string().prop_filter("empty parent means none", |p| !p.is_empty())),
        any::<u64>(),
        any::<u64>(),
        arb_labels(),
    )
        .prop_map(
            |(name, parent, created_unix_ms, allocated_bytes, labels)| SnapshotInfo {
                name,
                parent,
                created_unix_ms,
                allocated_bytes,
                labels,
            },
        )
}

/// An op and an ok body that suits it.
fn arb_ok_body() -> impl Strategy<Value = (u8, ReplyBody)> {
    let empty_ops = prop::sample::select(vec![
        op::WRITE,
        op::WRITE_ZEROES,
        op::TRIM,
        op::FLUSH,
        op::SNAPSHOT_CREATE,
        op::SNAPSHOT_DELETE,
        op::SNAPSHOT_REVERT,
        op::GROW,
        op::PING,
        op::UNMAP,
    ]);
    prop_oneof![
        empty_ops.prop_map(|op| (op, ReplyBody::Empty)),
        (
            prop::sample::select(vec![op::HELLO, op::STATUS, op::RECREATE]),
            arb_status()
        )
            .prop_map(|(op, s)| (op, ReplyBody::Status(s))),
        (
            prop::sample::select(vec![op::READ, op::READ_LAYER]),
            0usize..3 * BLOCK_SIZE as usize,
            any::<u8>()
        )
            .prop_map(|(op, len, seed)| {
                let data = pattern(len, seed);
                (
                    op,
                    ReplyBody::Data {
                        crcs: block_crcs(&data),
                        data,
                    },
                )
            }),
        prop::collection::vec(arb_snapshot(), 0..4)
            .prop_map(|s| (op::SNAPSHOT_LIST, ReplyBody::Snapshots(s))),
        prop::collection::vec((any::<u64>(), any::<u64>()), 0..8)
            .prop_map(|e| (op::LIST_EXTENTS, ReplyBody::Extents(e))),
        (
            prop::array::uniform::<_, DIGEST_LEN>(any::<u8>()),
            any::<u64>()
        )
            .prop_map(|(digest, size)| (op::DIGEST, ReplyBody::Digest { digest, size })),
        (any::<u64>(), prop::collection::vec(any::<u64>(), 0..8)).prop_map(
            |(region_size, regions)| (
                op::DIRTY_REGIONS,
                ReplyBody::DirtyRegions {
                    region_size,
                    regions
                }
            )
        ),
        prop::collection::vec(prop::array::uniform::<_, DIGEST_LEN>(any::<u8>()), 0..8)
            .prop_map(|d| (op::RANGE_DIGESTS, ReplyBody::RangeDigests(d))),
    ]
}

fn arb_reply() -> impl Strategy<Value = Reply> {
    let error = (
        op::FIRST_REQUEST..=op::LAST_REQUEST,
        prop::sample::select(ErrorKind::ALL.to_vec()),
        any::<u64>(),
        arb_string(),
    )
        .prop_map(|(op, kind, detail, message)| (op, Err(ReplyError::new(kind, detail, message))));
    let ok = arb_ok_body().prop_map(|(op, body)| (op, Ok(body)));
    (any::<u64>(), any::<u64>(), prop_oneof![3 => ok, 1 => error]).prop_map(
        |(request_id, epoch, (op, result))| Reply {
            request_id,
            epoch,
            op,
            result,
        },
    )
}

/// One encoded request or reply frame.
fn arb_encoded_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (arb_request(), any::<u64>(), any::<u64>()).prop_map(|(req, id, epoch)| {
            let mut out = BytesMut::new();
            req.encode(id, epoch, &mut out);
            out.to_vec()
        }),
        arb_reply().prop_map(|reply| {
            let mut out = BytesMut::new();
            reply.encode(&mut out);
            out.to_vec()
        }),
    ]
}

// ------------------------------------------------------------------ helpers

/// Feeds `input` to a decoder in `chunks`, checking every yielded frame
/// against the bytes it consumed. Returns the frames and how decoding ended.
fn feed(input: &[u8], chunks: &[usize], max_frame: usize) -> (Vec<Frame>, Result<(), WireError>) {
    let mut decoder = FrameDecoder::new(max_frame);
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut consumed = 0;
    let mut frames = Vec::new();
    let mut chunk_sizes = chunks.iter().cycle();
    loop {
        loop {
            let capacity = buf.capacity();
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let mut again = BytesMut::new();
                    frame.encode(&mut again).unwrap();
                    assert!(again.len() <= decoder.max_frame());
                    assert_eq!(&again[..], &input[consumed..consumed + again.len()]);
                    consumed += again.len();
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(err) => return (frames, Err(err)),
            }
            assert!(buf.capacity() <= capacity, "decode grew the buffer");
        }
        assert_eq!(consumed + buf.len(), fed);
        if fed == input.len() {
            return (frames, Ok(()));
        }
        let n = (*chunk_sizes.next().unwrap()).min(input.len() - fed);
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
    }
}

/// Decodes both ways; whatever decodes must re-encode to the same frame.
fn decode_payload_both_ways(frame: &Frame) {
    let mut original = BytesMut::new();
    frame.encode(&mut original).unwrap();
    if let Ok(request) = Request::decode(frame) {
        let mut again = BytesMut::new();
        request.encode(frame.header.request_id, frame.header.epoch, &mut again);
        assert_eq!(
            again, original,
            "request re-encodes differently: {request:?}"
        );
    }
    if let Ok(reply) = Reply::decode(frame) {
        let mut again = BytesMut::new();
        reply.encode(&mut again);
        assert_eq!(again, original, "reply re-encodes differently: {reply:?}");
    }
}

fn frame_with(op: u8, flags: u16, payload: Vec<u8>) -> Frame {
    Frame {
        header: Header {
            op,
            flags,
            request_id: 1,
            epoch: 2,
            payload_len: u32::try_from(payload.len()).unwrap(),
        },
        payload: payload.into(),
    }
}

// --------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// (a) Arbitrary bytes, arbitrary chunking: no panic, no bad frame.
    #[test]
    fn arbitrary_bytes_never_panic_or_yield_a_bad_frame(
        input in prop::collection::vec(any::<u8>(), 0..4096),
        chunks in prop::collection::vec(1usize..600, 1..32),
        max_frame in prop::sample::select(vec![0usize, 48, 1024, DEFAULT_MAX_FRAME]),
    ) {
        let (_frames, _end) = feed(&input, &chunks, max_frame);
    }

    /// (a') Valid frames followed by garbage, arbitrarily chunked: every
    /// frame comes out in order, then the garbage is refused or waited on.
    #[test]
    fn valid_frames_then_garbage_decode_in_order(
        frames in prop::collection::vec(arb_encoded_frame(), 1..5),
        garbage in prop::collection::vec(any::<u8>(), 0..64),
        chunks in prop::collection::vec(1usize..5000, 1..16),
    ) {
        let mut input: Vec<u8> = frames.concat();
        let valid_len = input.len();
        input.extend_from_slice(&garbage);
        let (decoded, _) = feed(&input, &chunks, DEFAULT_MAX_FRAME);
        prop_assert!(decoded.len() >= frames.len());
        let lens: usize = decoded[..frames.len()]
            .iter()
            .map(|f| 32 + f.payload.len())
            .sum();
        prop_assert_eq!(lens, valid_len);
    }

    /// (b) Every representable request round-trips exactly.
    #[test]
    fn requests_round_trip(request in arb_request(), id in any::<u64>(), epoch in any::<u64>()) {
        let mut out = BytesMut::new();
        request.try_encode(id, epoch, &mut out).unwrap();
        let (frames, end) = feed(&out, &[out.len()], DEFAULT_MAX_FRAME);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(frames.len(), 1);
        let header = frames[0].header;
        prop_assert_eq!((header.request_id, header.epoch), (id, epoch));
        prop_assert_eq!(Request::decode(&frames[0]), Ok(request));
    }

    /// (b') Every representable reply round-trips exactly.
    #[test]
    fn replies_round_trip(reply in arb_reply()) {
        let mut out = BytesMut::new();
        reply.try_encode(&mut out).unwrap();
        let (frames, end) = feed(&out, &[out.len()], DEFAULT_MAX_FRAME);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(frames.len(), 1);
        prop_assert_eq!(Reply::decode(&frames[0]), Ok(reply));
    }

    /// (c) One flipped byte anywhere: refused or incomplete, never a frame.
    #[test]
    fn a_flipped_byte_never_yields_a_frame(
        encoded in arb_encoded_frame(),
        at in any::<Index>(),
        xor in 1u8..=255,
    ) {
        let mut buf = BytesMut::from(&encoded[..]);
        let i = at.index(buf.len());
        buf[i] ^= xor;
        let result = FrameDecoder::new(DEFAULT_MAX_FRAME).decode(&mut buf);
        prop_assert!(matches!(result, Err(_) | Ok(None)), "byte {} gave {:?}", i, result);
    }

    /// (d) Payload decoders never panic on arbitrary payloads.
    #[test]
    fn payload_decoders_never_panic_on_arbitrary_bytes(
        op_byte in prop_oneof![
            4 => op::FIRST_REQUEST..=op::LAST_REQUEST,
            4 => (op::FIRST_REQUEST..=op::LAST_REQUEST).prop_map(|o| o | op::REPLY_BIT),
            1 => any::<u8>(),
        ],
        flags in prop_oneof![4 => 0u16..8, 1 => any::<u16>()],
        payload in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        decode_payload_both_ways(&frame_with(op_byte, flags, payload));
    }

    /// (d') The same on valid payloads with a few bytes changed or cut off,
    /// which reach deeper into the decoders than random bytes do.
    #[test]
    fn payload_decoders_never_panic_on_mutated_payloads(
        encoded in arb_encoded_frame(),
        mutations in prop::collection::vec((any::<Index>(), any::<u8>()), 0..4),
        cut in prop::option::of(any::<Index>()),
    ) {
        let mut payload = encoded[32..].to_vec();
        for (at, value) in mutations {
            if !payload.is_empty() {
                let i = at.index(payload.len());
                payload[i] = value;
            }
        }
        if let Some(cut) = cut {
            payload.truncate(cut.index(payload.len() + 1));
        }
        let flags = u16::from_le_bytes([encoded[6], encoded[7]]);
        decode_payload_both_ways(&frame_with(encoded[5], flags, payload));
    }
}
