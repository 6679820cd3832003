//! Unit tests of option decoding and the negotiation state machine.

use super::*;
use crate::proto::{FLAG_SEND_DF, OPT_STARTTLS};

fn exports() -> Vec<ExportMeta> {
    vec![
        ExportMeta {
            name: "disk".into(),
            description: "first".into(),
            size: 1 << 20,
            block: 4096,
            max_io: 32 << 20,
            multi_conn: true,
        },
        ExportMeta {
            name: "other".into(),
            description: String::new(),
            size: 8192,
            block: 4096,
            max_io: 1 << 20,
            multi_conn: false,
        },
    ]
}

/// Splits option reply bytes into `(option, type, data)`.
fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert_eq!(&b[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(b[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        out.push((opt, kind, b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    out
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&u16::try_from(infos.len()).unwrap().to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&u32::try_from(queries.len()).unwrap().to_be_bytes());
    for q in queries {
        d.extend_from_slice(&u32::try_from(q.len()).unwrap().to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn fixed() -> Negotiation {
    Negotiation::new(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).unwrap()
}

#[test]
fn client_flags_are_checked() {
    assert!(matches!(
        Negotiation::new(1 << 2),
        Err(NbdError::UnknownClientFlags(4))
    ));
    assert!(Negotiation::new(0).is_ok());
    assert!(Negotiation::new(3).is_ok());
}

#[test]
fn parse_export_query_checks_lengths() {
    let d = go_data("disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
    let q = parse_export_query(&d).unwrap();
    assert_eq!(q.name, b"disk");
    assert_eq!(q.infos, vec![INFO_NAME, INFO_BLOCK_SIZE]);
    // Truncated, trailing byte, name length past the end, oversized name.
    assert_eq!(parse_export_query(&d[..d.len() - 1]), None);
    let mut longer = d.clone();
    longer.push(0);
    assert_eq!(parse_export_query(&longer), None);
    assert_eq!(parse_export_query(&[0, 0, 0, 9, b'a', 0, 0]), None);
    assert_eq!(parse_export_query(&go_data(&"x".repeat(5000), &[])), None);
    assert_eq!(parse_export_query(&[]), None);
}

#[test]
fn parse_meta_query_checks_lengths() {
    let d = meta_data("disk", &["base:allocation", "qemu:dirty-bitmap:x"]);
    let q = parse_meta_query(&d).unwrap();
    assert_eq!(q.name, b"disk");
    assert_eq!(
        q.queries,
        vec![&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]
    );
    assert_eq!(parse_meta_query(&d[..d.len() - 3]), None);
    // A huge query count with no data fails fast instead of looping.
    assert_eq!(
        parse_meta_query(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
        None
    );
}

#[test]
fn go_replies_info_then_ack_and_transmits() {
    let mut n = fixed();
    let step = n.on_option(
        &exports(),
        OPT_GO,
        &go_data("", &[INFO_NAME, INFO_DESCRIPTION]),
    );
    assert!(matches!(step.next, Next::Transmit { export: 0 }));
    let r = replies(&step.reply);
    assert_eq!(r.len(), 5);
    assert!(r.iter().all(|(o, _, _)| *o == OPT_GO));
    let (_, kind, export) = &r[0];
    assert_eq!(*kind, REP_INFO);
    assert_eq!(&export[0..2], &INFO_EXPORT.to_be_bytes());
    assert_eq!(&export[2..10], &(1u64 << 20).to_be_bytes());
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    assert_eq!(flags & FLAG_SEND_DF, 0, "DF needs structured replies");
    let (_, _, bs) = &r[1];
    assert_eq!(bs.len(), 14);
    assert_eq!(&bs[2..6], &4096u32.to_be_bytes());
    assert_eq!(&bs[6..10], &4096u32.to_be_bytes());
    assert_eq!(&bs[10..14], &(32u32 << 20).to_be_bytes());
    assert_eq!(&r[2].2[2..], b"disk");
    assert_eq!(&r[3].2[2..], b"first");
    assert_eq!(r[4].1, REP_ACK);
}

#[test]
fn info_does_not_transmit_and_unknown_export_is_an_error() {
    let mut n = fixed();
    let step = n.on_option(&exports(), OPT_INFO, &go_data("other", &[INFO_DESCRIPTION]));
    assert!(matches!(step.next, Next::Continue));
    let r = replies(&step.reply);
    // No description info for an export without one.
    assert_eq!(
        r.iter().map(|x| x.1).collect::<Vec<_>>(),
        vec![REP_INFO, REP_INFO, REP_ACK]
    );
    let step = n.on_option(&exports(), OPT_GO, &go_data("nope", &[]));
    assert!(matches!(step.next, Next::Continue));
    assert_eq!(replies(&step.reply)[0].1, REP_ERR_UNKNOWN);
    let step = n.on_option(&exports(), OPT_GO, &[1, 2, 3]);
    assert_eq!(replies(&step.reply)[0].1, REP_ERR_INVALID);
    let step = n.on_option(&[], OPT_GO, &go_data("", &[]));
    assert_eq!(replies(&step.reply)[0].1, REP_ERR_UNKNOWN);
}

#[test]
fn list_abort_and_unknown_options() {
    let mut n = fixed();
    let r = replies(&n.on_option(&exports(), OPT_LIST, &[]).reply);
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].1, REP_SERVER);
    assert_eq!(&r[0].2, b"\0\0\0\x04diskfirst");
    assert_eq!(&r[1].2, b"\0\0\0\x05other");
    assert_eq!(r[2].1, REP_ACK);
    let r = replies(&n.on_option(&exports(), OPT_LIST, &[0]).reply);
    assert_eq!(r[0].1, REP_ERR_INVALID);
    for opt in [OPT_STARTTLS, 4, 11, 0, 999] {
        let step = n.on_option(&exports(), opt, &[1, 2]);
        assert!(matches!(step.next, Next::Continue));
        assert_eq!(replies(&step.reply)[0].1, REP_ERR_UNSUP);
    }
    let step = n.on_option(&exports(), OPT_ABORT, &[9]);
    assert!(matches!(step.next, Next::Abort));
    assert_eq!(replies(&step.reply)[0].1, REP_ACK);
    let r = replies(&n.too_big(OPT_GO).reply);
    assert_eq!(r[0].1, REP_ERR_TOO_BIG);
}

#[test]
fn export_name_replies_size_flags_and_zeroes() {
    let mut n = fixed();
    let step = n.on_option(&exports(), OPT_EXPORT_NAME, b"other");
    assert!(matches!(step.next, Next::Transmit { export: 1 }));
    assert_eq!(step.reply.len(), 10);
    assert_eq!(&step.reply[0..8], &8192u64.to_be_bytes());
    let mut n = Negotiation::new(FLAG_C_FIXED_NEWSTYLE).unwrap();
    let step = n.on_option(&exports(), OPT_EXPORT_NAME, b"");
    assert!(matches!(step.next, Next::Transmit { export: 0 }));
    assert_eq!(step.reply.len(), 10 + 124);
    let step = n.on_option(&exports(), OPT_EXPORT_NAME, b"missing");
    assert!(matches!(step.next, Next::Fail(NbdError::UnknownExport(ref s)) if s == "missing"));
}

#[test]
fn not_fixed_newstyle_only_allows_export_name() {
    let mut n = Negotiation::new(0).unwrap();
    let step = n.on_option(&exports(), OPT_LIST, &[]);
    assert!(matches!(
        step.next,
        Next::Fail(NbdError::NotFixedNewstyle { option: OPT_LIST })
    ));
    let step = n.on_option(&exports(), OPT_EXPORT_NAME, b"disk");
    assert!(matches!(step.next, Next::Transmit { export: 0 }));
}

#[test]
fn meta_context_needs_structured_replies() {
    let mut n = fixed();
    let d = meta_data("disk", &["base:allocation"]);
    let r = replies(&n.on_option(&exports(), OPT_SET_META_CONTEXT, &d).reply);
    assert_eq!(r[0].1, REP_ERR_INVALID);
    assert!(!n.base_allocation(0));
    let r = replies(&n.on_option(&exports(), OPT_STRUCTURED_REPLY, &[]).reply);
    assert_eq!(r[0].1, REP_ACK);
    assert!(n.structured());
    let r = replies(&n.on_option(&exports(), OPT_STRUCTURED_REPLY, &[1]).reply);
    assert_eq!(r[0].1, REP_ERR_INVALID);

    let r = replies(&n.on_option(&exports(), OPT_SET_META_CONTEXT, &d).reply);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].1, REP_META_CONTEXT);
    assert_eq!(&r[0].2[0..4], &META_BASE_ALLOCATION_ID.to_be_bytes());
    assert_eq!(&r[0].2[4..], b"base:allocation");
    assert_eq!(r[1].1, REP_ACK);
    assert!(n.base_allocation(0));
    assert!(!n.base_allocation(1));
    let flags = n.transmission_flags(&exports()[0]);
    assert_ne!(flags & FLAG_SEND_DF, 0);

    // A later SET that selects nothing (or fails) clears the selection.
    let r = replies(
        &n.on_option(
            &exports(),
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:"]),
        )
        .reply,
    );
    assert_eq!(r.iter().map(|x| x.1).collect::<Vec<_>>(), vec![REP_ACK]);
    assert!(!n.base_allocation(0));
    n.on_option(&exports(), OPT_SET_META_CONTEXT, &d);
    assert!(n.base_allocation(0));
    let r = replies(
        &n.on_option(
            &exports(),
            OPT_SET_META_CONTEXT,
            &meta_data("zzz", &["base:allocation"]),
        )
        .reply,
    );
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    assert!(!n.base_allocation(0));
}

#[test]
fn list_meta_context_wildcards() {
    let mut n = fixed();
    n.on_option(&exports(), OPT_STRUCTURED_REPLY, &[]);
    for queries in [
        &[][..],
        &["base:"][..],
        &["base:allocation", "x-foo:bar"][..],
    ] {
        let r = replies(
            &n.on_option(&exports(), OPT_LIST_META_CONTEXT, &meta_data("", queries))
                .reply,
        );
        assert_eq!(r.len(), 2, "{queries:?}");
        assert_eq!(&r[0].2, b"\0\0\0\0base:allocation");
        assert_eq!(r[1].1, REP_ACK);
    }
    let r = replies(
        &n.on_option(
            &exports(),
            OPT_LIST_META_CONTEXT,
            &meta_data("", &["qemu:x"]),
        )
        .reply,
    );
    assert_eq!(r.iter().map(|x| x.1).collect::<Vec<_>>(), vec![REP_ACK]);
    // LIST never changes the selection.
    assert!(!n.base_allocation(0));
}
