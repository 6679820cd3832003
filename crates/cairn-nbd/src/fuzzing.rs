//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`) and the property
//! tests: each feeds arbitrary bytes to one pure decoder and asserts its invariants, so a
//! violation panics. Not part of the server's API.

use crate::negotiate::{parse_export_query, parse_meta_query, ExportMeta, Negotiation, Next};
use crate::proto::{
    Errno, CMD_FLAG_DF, OPT_EXPORT_NAME, OPT_REPLY_MAGIC, REQUEST_LEN, REQUEST_MAGIC,
};
use crate::reply::{descriptors, MAX_DESCRIPTORS, STATUS_DATA, STATUS_HOLE};
use crate::request::{errno, validate, Failure, Limits, RawRequest, Request};

fn take<const N: usize>(data: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = data.split_first_chunk::<N>()?;
    *data = rest;
    Some(*head)
}

/// Input: a control byte, 12 bytes of limits, then a request header (its magic forced right
/// when the control byte's low bit is set, since random bytes rarely carry it).
///
/// Checks: decoding never panics and re-encodes to the same bytes; a validated request
/// respects every limit (non-empty, in range, aligned, within the maximum, negotiated);
/// every refusal maps to EINVAL or ENOSPC.
pub fn request(mut data: &[u8]) {
    let Some([ctrl]) = take::<1>(&mut data) else {
        return;
    };
    let (Some(size), Some(max)) = (take::<8>(&mut data), take::<4>(&mut data)) else {
        return;
    };
    let Some(mut head) = take::<REQUEST_LEN>(&mut data) else {
        return;
    };
    if ctrl & 1 != 0 {
        head[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    let block = 1u32 << (u32::from(ctrl >> 3) % 17);
    let max_io = u32::from_be_bytes(max).max(block);
    let limits = Limits {
        size: u64::from_be_bytes(size),
        block,
        max_io: max_io - max_io % block,
        structured: ctrl & 2 != 0,
        base_allocation: ctrl & 4 != 0,
    };
    let Ok(raw) = RawRequest::decode(&head) else {
        assert_eq!(ctrl & 1, 0, "a request with the right magic must decode");
        return;
    };
    assert_eq!(raw.encode(), head);
    match validate(&raw, &limits) {
        Ok(req) => check_request(&raw, &req, &limits),
        Err(invalid) => {
            let e = errno(&Failure::Invalid(invalid), raw.cmd, raw.flags);
            assert!(matches!(e, Errno::Inval | Errno::NoSpc), "{e:?}");
        }
    }
}

fn check_request(raw: &RawRequest, req: &Request, limits: &Limits) {
    let block = u64::from(limits.block);
    let range = |offset: u64, len: u32| {
        assert!(len > 0);
        let end = offset.checked_add(u64::from(len)).expect("range overflow");
        assert!(end <= limits.size, "range past the end");
        assert_eq!(offset % block, 0);
        assert_eq!(u64::from(len) % block, 0);
    };
    match *req {
        Request::Read { offset, len, df } => {
            range(offset, len);
            assert!(len <= limits.max_io);
            assert!(!df || limits.structured);
            assert_eq!(df, raw.flags & CMD_FLAG_DF != 0);
        }
        Request::Write { offset, len, .. } => {
            range(offset, len);
            assert!(len <= limits.max_io);
        }
        Request::Trim { offset, len, .. } | Request::WriteZeroes { offset, len, .. } => {
            range(offset, len);
        }
        Request::BlockStatus { offset, len, .. } => {
            range(offset, len);
            assert!(limits.structured && limits.base_allocation);
        }
        Request::Flush => assert_eq!((raw.offset, raw.len), (0, 0)),
        Request::Disc => {}
    }
}

/// Input: offset (8 bytes), length (4), a REQ_ONE byte, then `(offset, len)` extents of 16
/// bytes each, as a device might return them (possibly unsorted or out of range).
///
/// Checks: at least one descriptor, all nonzero, consecutive statuses differ, the sum at
/// most the query length (exactly one with REQ_ONE), only DATA or HOLE statuses.
pub fn block_status(mut data: &[u8]) {
    let (Some(off), Some(len), Some([one])) = (
        take::<8>(&mut data),
        take::<4>(&mut data),
        take::<1>(&mut data),
    ) else {
        return;
    };
    let offset = u64::from_be_bytes(off);
    let len = u32::from_be_bytes(len);
    if len == 0 || offset.checked_add(u64::from(len)).is_none() {
        return; // validation refuses these before the device is asked
    }
    let mut extents = Vec::new();
    while let (Some(o), Some(l)) = (take::<8>(&mut data), take::<8>(&mut data)) {
        extents.push((u64::from_be_bytes(o), u64::from_be_bytes(l)));
    }
    let req_one = one & 1 != 0;
    let d = descriptors(offset, len, &extents, req_one);
    assert!(!d.is_empty());
    assert!(d.len() <= if req_one { 1 } else { MAX_DESCRIPTORS });
    assert!(d
        .iter()
        .all(|&(l, s)| l > 0 && (s == STATUS_DATA || s == STATUS_HOLE)));
    assert!(d.windows(2).all(|w| w[0].1 != w[1].1));
    let total: u64 = d.iter().map(|&(l, _)| u64::from(l)).sum();
    assert!(total <= u64::from(len));
    if !req_one && d.len() < MAX_DESCRIPTORS {
        assert_eq!(total, u64::from(len), "descriptors must cover the query");
    }
}

/// Input: 4 bytes of client flags, then options, each a type byte (mapped onto 0..16 so
/// known options are common), a 16-bit length and that much data.
///
/// Checks: the option decoders and the negotiation never panic; every reply is a sequence of
/// well-formed option replies for the option sent, ending with ACK or an error, except the
/// raw EXPORT_NAME answer.
pub fn options(mut data: &[u8]) {
    let Some(flags) = take::<4>(&mut data) else {
        return;
    };
    let Ok(mut neg) = Negotiation::new(u32::from_be_bytes(flags)) else {
        return;
    };
    let exports = [
        ExportMeta {
            name: "disk".into(),
            description: "fuzz".into(),
            size: 1 << 20,
            block: 4096,
            max_io: 1 << 20,
            multi_conn: true,
        },
        ExportMeta {
            name: String::new(),
            description: String::new(),
            size: 0,
            block: 512,
            max_io: 512,
            multi_conn: false,
        },
    ];
    while let (Some([opt]), Some(len)) = (take::<1>(&mut data), take::<2>(&mut data)) {
        let opt = u32::from(opt % 16);
        let len = usize::from(u16::from_be_bytes(len)).min(data.len());
        let (payload, rest) = data.split_at(len);
        data = rest;
        let _ = parse_export_query(payload);
        let _ = parse_meta_query(payload);
        let step = neg.on_option(&exports, opt, payload);
        let transmit = matches!(step.next, Next::Transmit { .. });
        if !(opt == OPT_EXPORT_NAME && transmit) {
            check_option_replies(&step.reply, opt);
        }
        match step.next {
            Next::Continue => {}
            Next::Transmit { export } => {
                assert!(export < exports.len());
                return;
            }
            Next::Abort | Next::Fail(_) => return,
        }
    }
}

fn check_option_replies(mut b: &[u8], opt: u32) {
    let mut last = None;
    while !b.is_empty() {
        assert!(b.len() >= 20, "truncated option reply");
        assert_eq!(b[0..8], OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(b[8..12], opt.to_be_bytes());
        let kind = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
        let len = usize::try_from(u32::from_be_bytes([b[16], b[17], b[18], b[19]])).unwrap();
        assert!(b.len() >= 20 + len, "option reply length past its data");
        b = &b[20 + len..];
        last = Some(kind);
    }
    if let Some(kind) = last {
        assert!(
            kind == 1 || kind & (1 << 31) != 0,
            "last reply must be final"
        );
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::proto::{
        OPT_GO, OPT_INFO, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
    };
    use crate::reply::{descriptors, STATUS_DATA, STATUS_HOLE};

    fn header_bytes(ctrl: u8, size: u64, max: u32, raw: [u64; 4]) -> Vec<u8> {
        let [flags, cmd, offset, len] = raw;
        let mut b = vec![ctrl | 1];
        b.extend_from_slice(&size.to_be_bytes());
        b.extend_from_slice(&max.to_be_bytes());
        b.extend_from_slice(&[0; 4]); // magic, forced by ctrl bit 0
        b.extend_from_slice(&u16::try_from(flags).unwrap().to_be_bytes());
        b.extend_from_slice(&u16::try_from(cmd).unwrap().to_be_bytes());
        b.extend_from_slice(&9u64.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        b
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut b = vec![u8::try_from(opt).unwrap()];
        b.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn string32(b: &mut Vec<u8>, s: &[u8]) {
        b.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
        b.extend_from_slice(s);
    }

    fn arb_option() -> impl Strategy<Value = Vec<u8>> {
        let name = prop_oneof![
            Just(b"disk".to_vec()),
            Just(Vec::new()),
            Just(b"nope".to_vec())
        ];
        let query = prop_oneof![
            Just(b"base:allocation".to_vec()),
            Just(b"base:".to_vec()),
            prop::collection::vec(any::<u8>(), 0..8)
        ];
        prop_oneof![
            (0u32..16, prop::collection::vec(any::<u8>(), 0..16)).prop_map(|(o, d)| option(o, &d)),
            Just(option(OPT_STRUCTURED_REPLY, &[])),
            (
                name.clone(),
                prop::collection::vec(0u16..5, 0..4),
                any::<bool>()
            )
                .prop_map(|(n, infos, go)| {
                    let mut d = Vec::new();
                    string32(&mut d, &n);
                    d.extend_from_slice(&u16::try_from(infos.len()).unwrap().to_be_bytes());
                    for i in infos {
                        d.extend_from_slice(&i.to_be_bytes());
                    }
                    option(if go { OPT_GO } else { OPT_INFO }, &d)
                }),
            (name, prop::collection::vec(query, 0..3), any::<bool>()).prop_map(|(n, qs, set)| {
                let mut d = Vec::new();
                string32(&mut d, &n);
                d.extend_from_slice(&u32::try_from(qs.len()).unwrap().to_be_bytes());
                for q in qs {
                    string32(&mut d, &q);
                }
                let opt = if set {
                    OPT_SET_META_CONTEXT
                } else {
                    OPT_LIST_META_CONTEXT
                };
                option(opt, &d)
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn request_decoder_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..80)) {
            super::request(&data);
        }

        #[test]
        fn request_decoder_edge_values(
            ctrl in any::<u8>(),
            size in prop_oneof![Just(0u64), Just(1 << 20), Just(u64::MAX), any::<u64>()],
            max in prop_oneof![Just(0u32), Just(1 << 16), any::<u32>()],
            flags in prop_oneof![0u64..32, 0u64..=0xffff],
            cmd in prop_oneof![0u64..9, 0u64..=0xffff],
            offset in prop_oneof![
                (0u64..300).prop_map(|b| b * 4096),
                Just(u64::MAX - 4095),
                any::<u64>()
            ],
            len in prop_oneof![(0u64..300).prop_map(|b| b * 4096), 0u64..=0xffff_ffff],
        ) {
            super::request(&header_bytes(ctrl, size, max, [flags, cmd, offset, len]));
        }

        #[test]
        fn block_status_arbitrary_extents(data in prop::collection::vec(any::<u8>(), 0..200)) {
            super::block_status(&data);
        }

        /// Against a per-block model: descriptors expand to exactly the allocation map.
        #[test]
        fn block_status_matches_model(
            map in prop::collection::vec(any::<bool>(), 1..64),
            start in 0usize..64,
        ) {
            let start = start % map.len();
            let extents: Vec<(u64, u64)> = map
                .iter()
                .enumerate()
                .filter(|&(i, &a)| a && i >= start)
                .map(|(i, _)| (i as u64 * 4096, 4096))
                .collect();
            let offset = start as u64 * 4096;
            let len = u32::try_from((map.len() - start) * 4096).unwrap();
            let d = descriptors(offset, len, &extents, false);
            let mut expanded = Vec::new();
            for (l, s) in d {
                prop_assert_eq!(l % 4096, 0);
                for _ in 0..l / 4096 {
                    expanded.push(s == STATUS_DATA);
                }
                prop_assert!(s == STATUS_DATA || s == STATUS_HOLE);
            }
            prop_assert_eq!(&expanded[..], &map[start..]);
        }

        #[test]
        fn option_negotiation_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..400)) {
            super::options(&data);
        }

        #[test]
        fn option_negotiation_well_formed(
            flags in prop_oneof![Just(3u32), Just(1u32), any::<u32>()],
            opts in prop::collection::vec(arb_option(), 0..8),
        ) {
            let mut data = flags.to_be_bytes().to_vec();
            for o in opts {
                data.extend_from_slice(&o);
            }
            super::options(&data);
        }
    }
}
