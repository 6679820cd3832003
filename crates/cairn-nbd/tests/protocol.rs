//! Protocol tests with the raw test client over an in-memory pipe: handshake options, exact
//! errnos for refused requests, connection survival after refused writes, connection
//! closing on malformed streams, concurrency and DISC.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cairn_blockdev::MemDevice;
use cairn_nbd::{NbdError, NbdServer};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 1 << 20;

fn mem() -> Arc<TestDev> {
    Arc::new(TestDev::new(SIZE))
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ------------------------------------------------------------------- handshake

#[tokio::test]
async fn go_reports_size_flags_and_block_sizes() {
    let srv = server(mem());
    let (io, task) = pipe(&srv);
    let c = Client::connect(
        io,
        "disk",
        Opts {
            structured: true,
            meta: true,
        },
    )
    .await;
    assert_eq!(c.info.size, SIZE);
    let want = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_DF
        | FLAG_CAN_MULTI_CONN;
    assert_eq!(c.info.flags, want);
    assert_eq!(c.info.block_size, Some((4096, 4096, 32 << 20)));
    c.disconnect().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn flags_follow_negotiation_and_device() {
    let mut dev = TestDev::new(SIZE);
    dev.multi_conn = false;
    dev.max_io = 1 << 20;
    let srv = server(Arc::new(dev));
    let (io, task) = pipe(&srv);
    let c = Client::connect(io, "", Opts::default()).await;
    assert_eq!(c.info.flags & (FLAG_SEND_DF | FLAG_CAN_MULTI_CONN), 0);
    assert_eq!(c.info.block_size, Some((4096, 4096, 1 << 20)));
    c.disconnect().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn info_names_descriptions_and_unknown_exports() {
    let mut s = NbdServer::new();
    s.add_export("a", "first export", Arc::new(MemDevice::new(8192)));
    s.add_export("b", "", Arc::new(MemDevice::new(4096)));
    let srv = Arc::new(s);
    let (mut io, task) = pipe(&srv);
    greeting(&mut io).await;
    io.write_u32(3).await.unwrap();

    send_option(
        &mut io,
        OPT_INFO,
        &go_data("", &[INFO_NAME, INFO_DESCRIPTION]),
    )
    .await;
    let r = option_replies(&mut io).await;
    assert_eq!(r.last().unwrap().1, REP_ACK);
    let info = parse_infos(&r);
    assert_eq!(info.size, 8192);
    assert_eq!(
        info.name.as_deref(),
        Some("a"),
        "the default export is the first"
    );
    assert_eq!(info.description.as_deref(), Some("first export"));
    assert!(info.block_size.is_some(), "block sizes are always sent");

    send_option(&mut io, OPT_GO, &go_data("missing", &[])).await;
    let r = option_replies(&mut io).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    send_option(&mut io, OPT_GO, &go_data("b", &[1, 2, 3, 99])).await;
    let r = option_replies(&mut io).await;
    assert_eq!(r.last().unwrap().1, REP_ACK);
    let info = parse_infos(&r);
    assert_eq!(info.size, 4096);
    assert_eq!(
        info.description, None,
        "no description info for an empty one"
    );
    drop(io);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn list_exports() {
    let mut s = NbdServer::new();
    s.add_export("a", "first", Arc::new(MemDevice::new(4096)));
    s.add_export("bee", "second", Arc::new(MemDevice::new(4096)));
    let srv = Arc::new(s);
    let (mut io, task) = pipe(&srv);
    greeting(&mut io).await;
    io.write_u32(3).await.unwrap();
    send_option(&mut io, OPT_LIST, &[]).await;
    let r = option_replies(&mut io).await;
    assert_eq!(r.len(), 3);
    assert_eq!(
        (r[0].1, &r[0].2[..]),
        (REP_SERVER, &b"\0\0\0\x01afirst"[..])
    );
    assert_eq!(
        (r[1].1, &r[1].2[..]),
        (REP_SERVER, &b"\0\0\0\x03beesecond"[..])
    );
    assert_eq!(r[2].1, REP_ACK);
    send_option(&mut io, OPT_LIST, b"junk").await;
    assert_eq!(option_reply(&mut io).await.1, REP_ERR_INVALID);
    send_option(&mut io, OPT_ABORT, &[]).await;
    assert_eq!(option_reply(&mut io).await.1, REP_ACK);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    let srv = server(mem());
    for (cflags, tail) in [(3u32, 0usize), (1, 124)] {
        let (mut io, task) = pipe(&srv);
        greeting(&mut io).await;
        io.write_u32(cflags).await.unwrap();
        send_option(&mut io, OPT_EXPORT_NAME, b"disk").await;
        assert_eq!(io.read_u64().await.unwrap(), SIZE);
        let flags = io.read_u16().await.unwrap();
        assert_eq!(flags & FLAG_SEND_DF, 0);
        let mut zeroes = vec![1u8; tail];
        io.read_exact(&mut zeroes).await.unwrap();
        assert!(zeroes.iter().all(|&b| b == 0));
        // Transmission works right after: a simple read of one block.
        let mut req = vec![0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0];
        req.extend_from_slice(&7u64.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&4096u32.to_be_bytes());
        io.write_all(&req).await.unwrap();
        assert_eq!(io.read_u32().await.unwrap(), 0x6744_6698);
        assert_eq!(io.read_u32().await.unwrap(), 0);
        assert_eq!(io.read_u64().await.unwrap(), 7);
        let mut data = vec![1u8; 4096];
        io.read_exact(&mut data).await.unwrap();
        assert!(data.iter().all(|&b| b == 0));
        drop(io);
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn export_name_unknown_closes() {
    let srv = server(mem());
    let (mut io, task) = pipe(&srv);
    greeting(&mut io).await;
    io.write_u32(3).await.unwrap();
    send_option(&mut io, OPT_EXPORT_NAME, b"nope").await;
    let mut rest = Vec::new();
    io.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert!(matches!(task.await.unwrap(), Err(NbdError::UnknownExport(n)) if n == "nope"));
}

#[tokio::test]
async fn unsupported_and_oversized_options() {
    let srv = server(mem());
    let (mut io, task) = pipe(&srv);
    greeting(&mut io).await;
    io.write_u32(3).await.unwrap();
    for opt in [OPT_STARTTLS, 4, 11, 12345] {
        send_option(&mut io, opt, b"xyz").await;
        let (o, kind, _) = option_reply(&mut io).await;
        assert_eq!((o, kind), (opt, REP_ERR_UNSUP));
    }
    // 100 KiB of option data: skipped, refused, and the connection goes on.
    send_option(&mut io, OPT_GO, &vec![0u8; 100 << 10]).await;
    assert_eq!(option_reply(&mut io).await.1, REP_ERR_TOO_BIG);
    // Meta contexts need structured replies first.
    send_option(
        &mut io,
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    )
    .await;
    assert_eq!(option_reply(&mut io).await.1, REP_ERR_INVALID);
    send_option(&mut io, OPT_LIST_META_CONTEXT, &meta_data("disk", &[])).await;
    assert_eq!(option_reply(&mut io).await.1, REP_ERR_INVALID);
    send_option(&mut io, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(&mut io).await.1, REP_ACK);
    send_option(&mut io, OPT_LIST_META_CONTEXT, &meta_data("disk", &[])).await;
    let r = option_replies(&mut io).await;
    assert_eq!(r[0].1, REP_META_CONTEXT);
    assert_eq!(&r[0].2, b"\0\0\0\0base:allocation");
    assert_eq!(r[1].1, REP_ACK);
    send_option(&mut io, OPT_LIST_META_CONTEXT, &meta_data("nope", &[])).await;
    assert_eq!(option_reply(&mut io).await.1, REP_ERR_UNKNOWN);
    // An absurd option length closes the connection without reading it.
    let mut head = IHAVEOPT.to_be_bytes().to_vec();
    head.extend_from_slice(&OPT_GO.to_be_bytes());
    head.extend_from_slice(&(16u32 << 20).to_be_bytes());
    io.write_all(&head).await.unwrap();
    assert!(matches!(
        task.await.unwrap(),
        Err(NbdError::OptionTooLarge { option: OPT_GO, len }) if len == 16 << 20
    ));
}

#[tokio::test]
async fn malformed_handshakes_close() {
    let srv = server(mem());
    // Unknown client flags.
    let (mut io, task) = pipe(&srv);
    greeting(&mut io).await;
    io.write_u32(0x10).await.unwrap();
    assert!(matches!(
        task.await.unwrap(),
        Err(NbdError::UnknownClientFlags(0x10))
    ));
    // Bad option magic.
    let (mut io, task) = pipe(&srv);
    greeting(&mut io).await;
    io.write_u32(3).await.unwrap();
    io.write_all(&[0u8; 16]).await.unwrap();
    assert!(matches!(
        task.await.unwrap(),
        Err(NbdError::BadOptionMagic(0))
    ));
    // Truncated option data.
    let (mut io, task) = pipe(&srv);
    greeting(&mut io).await;
    io.write_u32(3).await.unwrap();
    let mut head = IHAVEOPT.to_be_bytes().to_vec();
    head.extend_from_slice(&OPT_GO.to_be_bytes());
    head.extend_from_slice(&100u32.to_be_bytes());
    head.extend_from_slice(&[0; 10]);
    io.write_all(&head).await.unwrap();
    drop(io);
    assert!(matches!(task.await.unwrap(), Err(NbdError::Truncated(_))));
    // Non-fixed newstyle client sending anything but EXPORT_NAME.
    let (mut io, task) = pipe(&srv);
    greeting(&mut io).await;
    io.write_u32(0).await.unwrap();
    send_option(&mut io, OPT_LIST, &[]).await;
    assert!(matches!(
        task.await.unwrap(),
        Err(NbdError::NotFixedNewstyle { option: OPT_LIST })
    ));
    // A client that goes away between options is not an error.
    let (mut io, task) = pipe(&srv);
    greeting(&mut io).await;
    io.write_u32(3).await.unwrap();
    drop(io);
    task.await.unwrap().unwrap();
}

// ------------------------------------------------------------------ transmission

#[tokio::test]
async fn read_write_flush_round_trip() {
    let dev = mem();
    let srv = server(Arc::clone(&dev));
    for structured in [false, true] {
        let (io, task) = pipe(&srv);
        let mut c = Client::connect(
            io,
            "disk",
            Opts {
                structured,
                meta: false,
            },
        )
        .await;
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        c.write(4096, &data, 0).await.unwrap();
        c.write(16384, &data[..4096], FLAG_FUA).await.unwrap();
        assert_eq!(c.read(4096, 8192).await.unwrap(), data);
        assert_eq!(c.read(16384, 4096).await.unwrap(), &data[..4096]);
        let before = dev.mem.flushes();
        c.simple(CMD_FLUSH, 0, 0, 0).await.unwrap();
        assert_eq!(dev.mem.flushes(), before + 1);
        // DF is only valid with structured replies.
        let df = c.call(CMD_READ, FLAG_DF, 0, 4096, &[]).await;
        if structured {
            assert!(matches!(df, Ok(Payload::Data(ref d)) if d.len() == 4096));
        } else {
            assert_eq!(df.unwrap_err().0, EINVAL);
        }
        c.disconnect().await;
        task.await.unwrap().unwrap();
    }
    assert_eq!(&dev.mem.contents()[4096..8192][..4], &[0, 1, 2, 3]);
}

#[tokio::test]
async fn refused_writes_keep_the_connection_usable() {
    let mut dev = TestDev::new(SIZE);
    dev.max_io = 64 << 10;
    let dev = Arc::new(dev);
    let srv = server(Arc::clone(&dev));
    for structured in [false, true] {
        let (io, task) = pipe(&srv);
        let mut c = Client::connect(
            io,
            "disk",
            Opts {
                structured,
                meta: false,
            },
        )
        .await;
        c.write(0, &[7u8; 4096], 0).await.unwrap();
        // Misaligned: 512 bytes at 512, payload sent and discarded.
        assert_eq!(c.write(512, &[1u8; 512], 0).await, Err(EINVAL));
        assert_eq!(c.read(0, 4096).await.unwrap(), vec![7u8; 4096]);
        // Aligned offset, unaligned length.
        assert_eq!(c.write(4096, &[1u8; 5000], 0).await, Err(EINVAL));
        // Longer than the maximum block size, but skippable.
        assert_eq!(c.write(0, &vec![1u8; 128 << 10], 0).await, Err(EINVAL));
        // Beyond the end, and with an offset that overflows.
        assert_eq!(c.write(SIZE, &[1u8; 4096], 0).await, Err(ENOSPC));
        assert_eq!(c.write(SIZE - 4096, &[1u8; 8192], 0).await, Err(ENOSPC));
        assert_eq!(c.write(u64::MAX - 4095, &[1u8; 8192], 0).await, Err(ENOSPC));
        // Flags that are not valid for WRITE.
        assert_eq!(c.write(0, &[1u8; 4096], FLAG_NO_HOLE).await, Err(EINVAL));
        assert_eq!(c.write(0, &[1u8; 4096], FLAG_DF).await, Err(EINVAL));
        assert_eq!(c.write(0, &[1u8; 4096], 1 << 12).await, Err(EINVAL));
        // Zero-length write.
        assert_eq!(c.write(0, &[], 0).await, Err(EINVAL));
        // Nothing above changed the device, and the connection still works.
        assert_eq!(c.read(0, 8192).await.unwrap()[..4097], {
            let mut v = vec![7u8; 4096];
            v.push(0);
            v
        });
        c.disconnect().await;
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn refused_requests_get_nbdkit_errnos() {
    let mut dev = TestDev::new(SIZE);
    dev.max_io = 64 << 10;
    let srv = server(Arc::new(dev));
    let (io, task) = pipe(&srv);
    let mut c = Client::connect(
        io,
        "disk",
        Opts {
            structured: true,
            meta: false,
        },
    )
    .await;
    assert_eq!(c.read(SIZE, 4096).await, Err(EINVAL));
    assert_eq!(c.read(512, 4096).await, Err(EINVAL));
    assert_eq!(c.read(0, 128 << 10).await, Err(EINVAL));
    assert_eq!(c.read(0, 0).await, Err(EINVAL));
    assert_eq!(c.simple(CMD_TRIM, 0, SIZE - 4096, 8192).await, Err(EINVAL));
    assert_eq!(c.simple(CMD_TRIM, 0, 100, 4096).await, Err(EINVAL));
    assert_eq!(c.simple(CMD_WRITE_ZEROES, 0, SIZE, 4096).await, Err(ENOSPC));
    assert_eq!(
        c.simple(CMD_WRITE_ZEROES, FLAG_FAST_ZERO, 0, 4096).await,
        Err(EINVAL),
        "FAST_ZERO is not advertised"
    );
    assert_eq!(c.simple(CMD_FLUSH, 0, 4096, 0).await, Err(EINVAL));
    assert_eq!(c.simple(CMD_CACHE, 0, 0, 4096).await, Err(EINVAL));
    assert_eq!(c.simple(99, 0, 0, 4096).await, Err(EINVAL));
    assert_eq!(c.simple(CMD_TRIM, FLAG_REQ_ONE, 0, 4096).await, Err(EINVAL));
    // BLOCK_STATUS without base:allocation negotiated.
    assert_eq!(c.block_status(0, 4096, 0).await, Err(EINVAL));
    // Structured errors carry a message.
    let err = c.call(CMD_READ, 0, SIZE, 4096, &[]).await.unwrap_err();
    assert_eq!(err.0, EINVAL);
    assert!(err.1.contains("outside the export"), "{}", err.1);
    // WRITE_ZEROES and TRIM are not limited by the maximum block size (as nbdkit).
    c.simple(CMD_WRITE_ZEROES, 0, 0, 256 << 10).await.unwrap();
    c.simple(CMD_TRIM, FLAG_FUA, 0, 256 << 10).await.unwrap();
    c.disconnect().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn device_errors_map_to_eio() {
    let mut dev = TestDev::new(SIZE);
    dev.fail_offset = Some(8192);
    let srv = server(Arc::new(dev));
    for structured in [false, true] {
        let (io, task) = pipe(&srv);
        let mut c = Client::connect(
            io,
            "disk",
            Opts {
                structured,
                meta: structured,
            },
        )
        .await;
        assert_eq!(c.read(8192, 4096).await, Err(EIO));
        assert_eq!(c.write(8192, &[1; 4096], 0).await, Err(EIO));
        assert_eq!(c.simple(CMD_TRIM, 0, 8192, 4096).await, Err(EIO));
        if structured {
            let err = c
                .call(CMD_BLOCK_STATUS, 0, 8192, 4096, &[])
                .await
                .unwrap_err();
            assert_eq!(err.0, EIO);
            assert!(err.1.contains("injected failure"), "{}", err.1);
        }
        assert_eq!(c.read(0, 4096).await.unwrap(), vec![0; 4096]);
        c.disconnect().await;
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn block_status_reports_holes_and_data() {
    let srv = server(mem());
    let (io, task) = pipe(&srv);
    let mut c = Client::connect(
        io,
        "disk",
        Opts {
            structured: true,
            meta: true,
        },
    )
    .await;
    assert_eq!(c.block_status(0, 65536, 0).await.unwrap(), vec![(65536, 3)]);
    c.write(8192, &[1; 8192], 0).await.unwrap();
    c.simple(CMD_WRITE_ZEROES, FLAG_NO_HOLE, 32768, 4096)
        .await
        .unwrap();
    c.simple(CMD_WRITE_ZEROES, 0, 40960, 4096).await.unwrap();
    assert_eq!(
        c.block_status(0, 65536, 0).await.unwrap(),
        vec![(8192, 3), (8192, 0), (16384, 3), (4096, 0), (28672, 3)]
    );
    // REQ_ONE: one descriptor, not beyond the request.
    assert_eq!(
        c.block_status(0, 65536, FLAG_REQ_ONE).await.unwrap(),
        vec![(8192, 3)]
    );
    assert_eq!(
        c.block_status(8192, 4096, FLAG_REQ_ONE).await.unwrap(),
        vec![(4096, 0)]
    );
    // Trim punches the hole back.
    c.simple(CMD_TRIM, 0, 8192, 8192).await.unwrap();
    assert_eq!(
        c.block_status(4096, 12288, 0).await.unwrap(),
        vec![(12288, 3)]
    );
    assert_eq!(c.block_status(SIZE, 4096, 0).await, Err(EINVAL));
    assert_eq!(c.block_status(0, 100, 0).await, Err(EINVAL));
    c.disconnect().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn malformed_requests_close_the_connection() {
    let srv = server(mem());
    // Bad magic.
    let (io, task) = pipe(&srv);
    let mut c = Client::connect(io, "disk", Opts::default()).await;
    c.send_raw(0xdead_beef, CMD_READ, 0, 1, 0, 4096, &[]).await;
    assert!(matches!(
        task.await.unwrap(),
        Err(NbdError::BadRequestMagic(0xdead_beef))
    ));
    // Truncated header.
    let (io, task) = pipe(&srv);
    let mut c = Client::connect(io, "disk", Opts::default()).await;
    c.io.write_all(&[0x25, 0x60, 0x95]).await.unwrap();
    drop(c);
    assert!(matches!(task.await.unwrap(), Err(NbdError::Truncated(_))));
    // Truncated write payload.
    let (io, task) = pipe(&srv);
    let mut c = Client::connect(io, "disk", Opts::default()).await;
    c.send(CMD_WRITE, 0, 0, 4096, &[1; 100]).await;
    drop(c);
    assert!(matches!(task.await.unwrap(), Err(NbdError::Truncated(_))));
    // A refused write too large to skip.
    let (io, task) = pipe(&srv);
    let mut c = Client::connect(io, "disk", Opts::default()).await;
    c.send(CMD_WRITE, 0, 0, 100 << 20, &[]).await;
    assert!(matches!(
        task.await.unwrap(),
        Err(NbdError::PayloadTooLarge { len }) if len == 100 << 20
    ));
    // Client closing between requests is a clean end.
    let (io, task) = pipe(&srv);
    let c = Client::connect(io, "disk", Opts::default()).await;
    drop(c);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn replies_come_out_of_order() {
    let mut dev = TestDev::new(SIZE);
    dev.gated_offset = Some(0);
    let dev = Arc::new(dev);
    let srv = server(Arc::clone(&dev));
    let (io, task) = pipe(&srv);
    let mut c = Client::connect(
        io,
        "disk",
        Opts {
            structured: true,
            meta: false,
        },
    )
    .await;
    let slow = c.send(CMD_READ, 0, 0, 4096, &[]).await;
    let fast = c.send(CMD_READ, 0, 4096, 4096, &[]).await;
    assert_eq!(
        c.recv().await.cookie,
        fast,
        "the ungated read answers first"
    );
    dev.gate.add_permits(1);
    let r = c.recv().await;
    assert_eq!(r.cookie, slow);
    assert_eq!(r.result, Ok(Payload::Data(vec![0; 4096])));
    c.disconnect().await;
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_are_bounded() {
    let mut dev = TestDev::new(SIZE);
    dev.gated_offset = Some(0);
    let dev = Arc::new(dev);
    let srv = server(Arc::clone(&dev));
    let (io, task) = pipe(&srv);
    let mut c = Client::connect(io, "disk", Opts::default()).await;
    for _ in 0..100 {
        c.send(CMD_READ, 0, 0, 4096, &[]).await;
    }
    wait_for("64 reads in the device", || {
        dev.active.load(Ordering::SeqCst) == 64
    })
    .await;
    dev.gate.add_permits(100);
    for _ in 0..100 {
        assert!(c.recv().await.result.is_ok());
    }
    assert_eq!(dev.max_active.load(Ordering::SeqCst), 64);
    c.disconnect().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn disc_answers_in_flight_requests_first() {
    let mut dev = TestDev::new(SIZE);
    dev.gated_offset = Some(0);
    let dev = Arc::new(dev);
    let srv = server(Arc::clone(&dev));
    let (io, task) = pipe(&srv);
    let mut c = Client::connect(io, "disk", Opts::default()).await;
    let w = c.send(CMD_WRITE, 0, 0, 4096, &[5; 4096]).await;
    c.send(CMD_DISC, 0, 0, 0, &[]).await;
    wait_for("the write in the device", || {
        dev.active.load(Ordering::SeqCst) == 1
    })
    .await;
    dev.gate.add_permits(1);
    let r = c.recv().await;
    assert_eq!((r.cookie, r.result), (w, Ok(Payload::None)));
    let mut rest = Vec::new();
    c.io.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    task.await.unwrap().unwrap();
    assert_eq!(&dev.mem.contents()[..4096], &[5; 4096]);
}

#[tokio::test]
async fn two_connections_share_the_export() {
    let dev = mem();
    let srv = server(Arc::clone(&dev));
    let (io1, t1) = pipe(&srv);
    let (io2, t2) = pipe(&srv);
    let mut a = Client::connect(io1, "disk", Opts::default()).await;
    let mut b = Client::connect(
        io2,
        "disk",
        Opts {
            structured: true,
            meta: true,
        },
    )
    .await;
    a.write(0, &[9; 4096], FLAG_FUA).await.unwrap();
    a.simple(CMD_FLUSH, 0, 0, 0).await.unwrap();
    assert_eq!(b.read(0, 4096).await.unwrap(), vec![9; 4096]);
    assert_eq!(
        b.block_status(0, 8192, 0).await.unwrap(),
        vec![(4096, 0), (4096, 3)]
    );
    a.disconnect().await;
    b.disconnect().await;
    t1.await.unwrap().unwrap();
    t2.await.unwrap().unwrap();
}

#[tokio::test]
async fn serve_accepts_tcp_connections() {
    let dev = mem();
    let srv = server(Arc::clone(&dev));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(Arc::clone(&srv).serve(listener));
    for i in 0..3u8 {
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = Client::connect(
            sock,
            "disk",
            Opts {
                structured: i % 2 == 0,
                meta: false,
            },
        )
        .await;
        c.write(u64::from(i) * 4096, &[i + 1; 4096], 0)
            .await
            .unwrap();
        assert_eq!(
            c.read(u64::from(i) * 4096, 4096).await.unwrap(),
            vec![i + 1; 4096]
        );
        c.disconnect().await;
    }
    serving.abort();
    assert_eq!(&dev.mem.contents()[8192..8196], &[3; 4]);
}
