//! Failures the real server must survive with its data intact: a full disk, fenced engines,
//! malformed frames and bit rot on disk. Each test starts `cairn replica serve` on a temp dir
//! and checks the data byte for byte.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::{BufMut, Bytes, BytesMut};
use cairn_replica::{Client, ClientError};
use cairn_wire::{op, ErrorKind, Frame, Header, ReplyBody, Request, DEFAULT_MAX_FRAME, HEADER_LEN};
use common::{
    assert_pattern, checksum, expect_kind, pattern, scrub, Closed, RawConn, Server, BS, BSZ,
};

// ---------------------------------------------------------------------------------------
// 2. A full disk.

/// A tmpfs mounted for one test; lazily unmounted on drop, panics included.
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `size` (mount(8) syntax) on `path`; `None` (after printing why)
    /// when not root or the mount fails.
    fn mount(path: &Path, size: &str) -> Option<TmpfsMount> {
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP disk_full_gives_no_space_and_keeps_data: not running as root");
            return None;
        }
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(TmpfsMount {
                path: path.to_owned(),
            }),
            Ok(o) => {
                println!(
                    "SKIP disk_full_gives_no_space_and_keeps_data: mount failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                println!("SKIP disk_full_gives_no_space_and_keeps_data: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Bytes per write while filling the disk.
const FILL_CHUNK: u64 = 64 << 10;
const FILL_BLOCKS: u64 = FILL_CHUNK / BS;

fn disk_full(engine: &str) {
    let tmp = tempfile::tempdir().unwrap();
    // The data dir is the mount point itself, so the server log (DIR.log) lands outside it.
    let dir = tmp.path().join("data");
    let Some(_mount) = TmpfsMount::mount(&dir, "8m") else {
        return;
    };
    let replica = dir.join("vol").join("r1");
    let size = 64u64 << 20;
    let mut server = Server::start(&dir, engine);
    let mut c = server.client(1);
    c.hello("vol", "r1", size).unwrap();

    // Fill: 64 KiB writes at increasing offsets until one fails with NoSpace.
    let mut acked = 0u64; // chunks written and acknowledged
    let failed_at = loop {
        let off = acked * FILL_CHUNK;
        assert!(off < size, "{engine}: 64 MiB written to an 8 MiB tmpfs");
        let data = pattern(1000 + acked, off / BS, FILL_BLOCKS);
        match c.write(off, Bytes::from(data), false) {
            Ok(()) => acked += 1,
            Err(ClientError::Remote(e)) if e.kind == ErrorKind::NoSpace => break off,
            Err(e) => panic!("{engine}: write at {off}: expected ok or NoSpace, got {e}"),
        }
    };
    assert!(
        acked > 16,
        "{engine}: only {acked} chunks fit before NoSpace"
    );
    println!("{engine}: NoSpace after {acked} x 64 KiB");

    // The server is alive and answers on the same connection and on a new one.
    let st = c.status().unwrap();
    assert_eq!(st.size, size);
    let mut c2 = server.client(1);
    c2.hello("vol", "r1", 0).unwrap();

    // Everything acknowledged reads back exactly; the failed write left each of its blocks
    // either as it was (zeros) or as written, never corrupt.
    let check_fill = |c: &mut Client, skip: &dyn Fn(u64) -> bool| {
        for i in 0..acked {
            if skip(i) {
                continue;
            }
            let data = c.read(i * FILL_CHUNK, FILL_CHUNK as u32).unwrap();
            assert_pattern(
                &data,
                1000 + i,
                i * FILL_BLOCKS,
                &format!("{engine}: chunk {i}"),
            );
        }
    };
    check_fill(&mut c2, &|_| false);
    let torn = c
        .read(failed_at, FILL_CHUNK as u32)
        .expect("the range of the failed write reads");
    for (k, block) in torn.chunks_exact(BSZ).enumerate() {
        let b = failed_at / BS + k as u64;
        let as_written = pattern(1000 + acked, b, 1);
        assert!(
            block.iter().all(|&x| x == 0) || block == &as_written[..],
            "{engine}: block {b} of the failed write holds neither zeros nor its data"
        );
    }

    // Overwriting an allocated block needs no space and works.
    let over = pattern(5, 0, 1);
    c.write(0, Bytes::from(over.clone()), false).unwrap();
    assert_eq!(&c.read(0, BSZ as u32).unwrap()[..], &over[..]);

    // Trim 1 MiB: the space comes back and the write that failed now succeeds.
    let (trim_off, trim_len) = (1u64 << 20, 1u64 << 20);
    c.call(&Request::Trim {
        offset: trim_off,
        len: trim_len,
        fua: false,
    })
    .unwrap();
    assert!(c
        .read(trim_off, trim_len as u32)
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    let retry = pattern(2000, failed_at / BS, FILL_BLOCKS);
    c.write(failed_at, Bytes::from(retry.clone()), false)
        .expect("write after trim freed space");
    assert_eq!(
        &c.read(failed_at, FILL_CHUNK as u32).unwrap()[..],
        &retry[..]
    );
    c.flush().unwrap();

    // All of it survives a restart, and scrub finds nothing wrong.
    let trimmed = |i: u64| {
        let o = i * FILL_CHUNK;
        o < trim_off + trim_len && trim_off < o + FILL_CHUNK
    };
    drop((c, c2));
    server.kill_and_wait();
    let server = Server::start(&dir, engine);
    let mut c = server.client(1);
    c.hello("vol", "r1", 0).unwrap();
    assert_eq!(&c.read(0, BSZ as u32).unwrap()[..], &over[..]);
    let rest = c.read(BS, (FILL_CHUNK - BS) as u32).unwrap();
    assert_pattern(&rest, 1000, 1, &format!("{engine}: chunk 0 after restart"));
    check_fill(&mut c, &|i| i == 0 || trimmed(i));
    assert!(c
        .read(trim_off, trim_len as u32)
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    assert_eq!(
        &c.read(failed_at, FILL_CHUNK as u32).unwrap()[..],
        &retry[..]
    );
    drop(c);
    drop(server);
    let out = scrub(&replica);
    assert_eq!(
        out.code,
        Some(0),
        "{engine}: scrub:\n{}{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn disk_full_gives_no_space_and_keeps_data() {
    for engine in ["portable", "uring"] {
        disk_full(engine);
    }
}

// ---------------------------------------------------------------------------------------
// 3. Fencing.

#[test]
fn fencing_refuses_stale_epochs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = Server::start(&dir, "auto");
    let x = 9 * BS;
    let a_data = pattern(0xA, 9, 1);
    let b_data = pattern(0xB, 9, 1);

    let mut a = server.client(5);
    assert_eq!(a.hello("vol", "r1", 1 << 20).unwrap().epoch, 5);
    a.write(x, Bytes::from(a_data.clone()), false).unwrap();

    let mut b = server.client(6);
    assert_eq!(b.hello("vol", "r1", 0).unwrap().epoch, 6);

    // A has been overtaken: its write is refused, and so is everything else it sends.
    expect_kind(
        a.write(x, Bytes::from(b_data.clone()), false),
        ErrorKind::StaleEpoch,
        "write at the overtaken epoch 5",
    );
    expect_kind(a.read(x, BSZ as u32), ErrorKind::StaleEpoch, "read at 5");
    expect_kind(a.flush(), ErrorKind::StaleEpoch, "flush at 5");
    // An even older engine cannot attach.
    let mut old = server.client(4);
    expect_kind(
        old.hello("vol", "r1", 0),
        ErrorKind::StaleEpoch,
        "hello at 4",
    );

    // The refused write was never applied.
    assert_eq!(&b.read(x, BSZ as u32).unwrap()[..], &a_data[..]);
    assert_eq!(b.status().unwrap().epoch, 6);

    // The accepted epoch survives a restart.
    drop((a, b, old));
    server.kill_and_wait();
    let server = Server::start(&dir, "auto");
    let mut stale = server.client(5);
    expect_kind(
        stale.hello("vol", "r1", 0),
        ErrorKind::StaleEpoch,
        "hello at 5 after restart",
    );
    let mut b = server.client(6);
    assert_eq!(b.hello("vol", "r1", 0).unwrap().epoch, 6);
    assert_eq!(&b.read(x, BSZ as u32).unwrap()[..], &a_data[..]);
    b.write(x, Bytes::from(b_data.clone()), true).unwrap();
    assert_eq!(&b.read(x, BSZ as u32).unwrap()[..], &b_data[..]);
}

// ---------------------------------------------------------------------------------------
// 4. Malformed frames.

const VOL_SIZE: u64 = 1 << 20;

/// A raw connection attached to vol/r1 at epoch 1.
fn raw_attached(server: &Server) -> RawConn {
    let mut r = RawConn::connect(&server.addr, 1);
    let reply = r.call(&Request::Hello {
        volume: "vol".into(),
        replica_id: "r1".into(),
        create_size: 0,
        takeover: false,
    });
    assert!(
        matches!(reply.result, Ok(ReplyBody::Status(_))),
        "{reply:?}"
    );
    r
}

/// Asserts block `block` still holds write `tag` and the connection still serves.
fn still_holds(c: &mut Client, block: u64, tag: u64, what: &str) {
    let data = c.read(block * BS, BSZ as u32).unwrap();
    assert_pattern(&data, tag, block, what);
    c.status().unwrap();
}

#[test]
fn bad_frames_close_only_that_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::start(&dir, "auto");
    let mut good = server.client(1);
    good.hello("vol", "r1", VOL_SIZE).unwrap();
    let x = 3u64;
    good.write(x * BS, Bytes::from(pattern(1, x, 1)), true)
        .unwrap();

    // Each bad frame is a Write of tag 99 over block X, damaged one way.
    let bad_write = |r: &mut RawConn| {
        r.frame(&Request::write(
            x * BS,
            false,
            Bytes::from(pattern(99, x, 1)),
        ))
    };
    type Damage = fn(&mut BytesMut);
    let cases: [(&str, Damage, bool); 4] = [
        (
            "flipped payload byte",
            |f| f[HEADER_LEN + 16 + 100] ^= 0x01,
            false,
        ),
        ("bad magic", |f| f[0] ^= 0xFF, false),
        (
            "payload length over the frame limit",
            |f| {
                let len = u32::try_from(DEFAULT_MAX_FRAME - HEADER_LEN + 1).unwrap();
                f[24..28].copy_from_slice(&len.to_le_bytes());
            },
            false,
        ),
        (
            "truncated frame then close",
            |f| f.truncate(f.len() / 2),
            true,
        ),
    ];
    for (what, damage, then_close) in cases {
        let mut r = raw_attached(&server);
        let mut f = bad_write(&mut r);
        damage(&mut f);
        r.send_raw(&f);
        if then_close {
            r.shutdown_write();
        }
        let how = r.expect_closed(what);
        if then_close {
            assert!(matches!(how, Closed::Eof), "{what}: {how:?}");
        }
        still_holds(&mut good, x, 1, what);
        // A new connection works too.
        let mut fresh = server.client(1);
        fresh.hello("vol", "r1", 0).unwrap();
        still_holds(&mut fresh, x, 1, what);
    }

    // (e) A well-formed frame whose block CRC does not match its data: refused, not written,
    // the connection goes on.
    let data = Bytes::from(pattern(7, x, 2));
    let mut crcs = cairn_wire::block_crcs(&data);
    crcs[1] ^= 0x8000_0000;
    let e = expect_kind(
        good.call(&Request::Write {
            offset: x * BS,
            fua: false,
            crcs,
            data,
        }),
        ErrorKind::ChecksumMismatch,
        "write with a bad block CRC",
    );
    assert!(e.message.contains("checksum"), "{e:?}");
    still_holds(&mut good, x, 1, "after a bad block CRC");
    assert!(good
        .read((x + 1) * BS, BSZ as u32)
        .unwrap()
        .iter()
        .all(|&b| b == 0));

    // (f) Out of range and misaligned requests are refused and change nothing.
    let last = VOL_SIZE - BS;
    good.write(last, Bytes::from(pattern(8, last / BS, 1)), false)
        .unwrap();
    let one = || Bytes::from(pattern(9, 0, 1));
    let two = || Bytes::from(pattern(9, 0, 2));
    let cases: Vec<(&str, Result<(), ClientError>, ErrorKind)> = vec![
        (
            "write at the end",
            good.write(VOL_SIZE, one(), false),
            ErrorKind::OutOfRange,
        ),
        (
            "write across the end",
            good.write(last, two(), false),
            ErrorKind::OutOfRange,
        ),
        (
            "write at an offset that overflows",
            good.write(u64::MAX - BS + 1, two(), false),
            ErrorKind::OutOfRange,
        ),
        (
            "write at a misaligned offset",
            good.write(100, one(), false),
            ErrorKind::Misaligned,
        ),
        (
            "read at the end",
            good.read(VOL_SIZE, 4096).map(drop),
            ErrorKind::OutOfRange,
        ),
        (
            "read across the end",
            good.read(last, 8192).map(drop),
            ErrorKind::OutOfRange,
        ),
        (
            "read at an offset that overflows",
            good.read(u64::MAX - BS + 1, 8192).map(drop),
            ErrorKind::OutOfRange,
        ),
        (
            "read of 4 GiB - 4 KiB",
            good.read(0, u32::MAX - 4095).map(drop),
            ErrorKind::OutOfRange,
        ),
        (
            "read at a misaligned offset",
            good.read(100, 4096).map(drop),
            ErrorKind::Misaligned,
        ),
        (
            "read of a misaligned length",
            good.read(0, 100).map(drop),
            ErrorKind::Misaligned,
        ),
    ];
    for (what, r, kind) in cases {
        expect_kind(r, kind, what);
    }
    // A Write whose length is not whole blocks does not even decode: InvalidArgument, and
    // the connection stays up.
    let mut payload = BytesMut::new();
    payload.put_u64_le(0);
    payload.put_u32_le(100);
    payload.put_u32_le(0);
    payload.put_slice(&[0xEE; 100]);
    let frame = Frame {
        header: Header {
            op: op::WRITE,
            flags: 0,
            request_id: 77_777,
            epoch: 1,
            payload_len: payload.len() as u32,
        },
        payload: payload.freeze(),
    };
    let mut raw = BytesMut::new();
    frame.encode(&mut raw).unwrap();
    good.send_raw(&raw).unwrap();
    let reply = good.recv().unwrap();
    assert_eq!(reply.request_id, 77_777);
    match reply.result {
        Err(e) => assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e:?}"),
        Ok(b) => panic!("misaligned write length accepted: {b:?}"),
    }
    assert_pattern(
        &good.read(0, BSZ as u32).unwrap(),
        0,
        0,
        "block 0 after refused writes",
    );
    assert_pattern(
        &good.read(last, BSZ as u32).unwrap(),
        8,
        last / BS,
        "last block after refused writes",
    );
    still_holds(&mut good, x, 1, "after refused requests");
}

// ---------------------------------------------------------------------------------------
// 5. Bit rot.

#[test]
fn bit_rot_is_detected_and_scrub_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let replica = dir.join("vol").join("r1");
    let mut server = Server::start(&dir, "auto");
    let mut c = server.client(1);
    c.hello("vol", "r1", VOL_SIZE).unwrap();
    let data = pattern(42, 0, 8);
    c.write(0, Bytes::from(data.clone()), false).unwrap();
    // Two flushes: the first makes the writes durable, the second clears their region from
    // the dirty log (so recovery will not "repair" the checksum of what we damage).
    c.flush().unwrap();
    c.flush().unwrap();
    assert_eq!(c.status().unwrap().counters.dirty_regions, 0);
    drop(c);
    server.kill_and_wait();

    // Flip one byte of block 3 in place.
    let path = replica.join("layers").join("00000001.data");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = 3 * BS + 1234;
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    f.sync_all().unwrap();
    let meta = f.metadata().unwrap();
    assert!(
        meta.blocks() * 512 < 64 * 1024,
        "the data file is no longer sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    drop(f);

    let mut server = Server::start(&dir, "auto");
    let mut c = server.client(1);
    c.hello("vol", "r1", 0).unwrap();
    let e = expect_kind(
        c.read(3 * BS, BSZ as u32),
        ErrorKind::Corruption,
        "read of block 3",
    );
    assert_eq!(e.detail, 3 * BS, "{e:?}");
    assert_eq!(
        &c.read(2 * BS, BSZ as u32).unwrap()[..],
        &data[2 * BSZ..3 * BSZ]
    );
    assert_eq!(
        &c.read(4 * BS, BSZ as u32).unwrap()[..],
        &data[4 * BSZ..5 * BSZ]
    );
    let e = expect_kind(
        c.read(2 * BS, 3 * BSZ as u32),
        ErrorKind::Corruption,
        "read of blocks 2..5",
    );
    assert_eq!(e.detail, 3 * BS, "{e:?}");
    assert!(c.status().unwrap().counters.corruptions >= 2);
    drop(c);
    server.kill_and_wait();

    let out = scrub(&replica);
    assert_eq!(out.code, Some(1), "scrub:\n{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("corrupt block at byte 12288 in layer head"),
        "scrub output: {}",
        out.stdout
    );
    assert_eq!(
        out.stdout.matches("corrupt block at byte").count(),
        1,
        "scrub output: {}",
        out.stdout
    );

    // `checksum` depends on content only, not on how it is layered.
    let dir2 = tmp.path().join("data2");
    let server = Server::start(&dir2, "auto");
    let mut a = server.client(1);
    a.hello("vol-a", "r1", VOL_SIZE).unwrap();
    let mut b = server.client(1);
    b.hello("vol-b", "r1", VOL_SIZE).unwrap();
    // A: blocks 0..8, a snapshot, then block 2 overwritten, block 20 written and block 5
    // zeroed over the snapshot.
    a.write(0, Bytes::from(pattern(1, 0, 8)), false).unwrap();
    a.call(&Request::SnapshotCreate {
        name: "s1".into(),
        created_unix_ms: 1_700_000_000_000,
        labels: vec![("k".into(), "v".into())],
    })
    .unwrap();
    a.write(2 * BS, Bytes::from(pattern(2, 2, 1)), false)
        .unwrap();
    a.write(20 * BS, Bytes::from(pattern(3, 20, 1)), false)
        .unwrap();
    a.call(&Request::Trim {
        offset: 5 * BS,
        len: BS,
        fua: false,
    })
    .unwrap();
    // B: the same final content, written directly.
    let mut want = pattern(1, 0, 8);
    want[2 * BSZ..3 * BSZ].copy_from_slice(&pattern(2, 2, 1));
    want[5 * BSZ..6 * BSZ].fill(0);
    b.write(0, Bytes::from(want.clone()), false).unwrap();
    b.write(20 * BS, Bytes::from(pattern(3, 20, 1)), false)
        .unwrap();
    for c in [&mut a, &mut b] {
        assert_eq!(&c.read(0, 8 * BSZ as u32).unwrap()[..], &want[..]);
        assert_pattern(&c.read(20 * BS, BSZ as u32).unwrap(), 3, 20, "block 20");
        c.flush().unwrap();
    }
    assert_eq!(a.status().unwrap().chain, vec!["s1".to_owned()]);
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    drop((a, b));
    drop(server);
    let ca = checksum(&dir2.join("vol-a").join("r1"));
    let cb = checksum(&dir2.join("vol-b").join("r1"));
    assert_eq!(ca.code, Some(0), "{}", ca.stderr);
    assert_eq!(cb.code, Some(0), "{}", cb.stderr);
    assert!(
        ca.stdout.trim().ends_with(&format!("  {VOL_SIZE}")),
        "{}",
        ca.stdout
    );
    assert_eq!(ca.stdout, cb.stdout);
}

// ---------------------------------------------------------------------------------------
// Offline tools and a running server (docs/store.md: the tools take the data dir's lock, so
// a replica is never opened twice; opening runs recovery, which rewrites checksums and
// clears the dirty log under the server's feet).

#[test]
fn offline_tools_refuse_a_replica_being_served() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let replica = dir.join("vol").join("r1");
    let mut server = Server::start(&dir, "auto");
    let mut c = server.client(1);
    c.hello("vol", "r1", VOL_SIZE).unwrap();
    let data = pattern(61, 0, 4);
    c.write(0, Bytes::from(data.clone()), false).unwrap();
    assert_eq!(c.status().unwrap().counters.dirty_regions, 1);

    let outs = [("scrub", scrub(&replica)), ("checksum", checksum(&replica))];
    // Opening the replica a second time would run recovery, which clears the on-disk
    // dirty-region log while the server still counts on it: a crash of the server would
    // then leave torn data/checksum pairs outside any marked region, read as corruption.
    let log = std::fs::read(replica.join("dirty.log")).unwrap();
    assert_eq!(
        log.first().map(|b| b & 1),
        Some(1),
        "region 0 is no longer marked in dirty.log ({log:?}) although the server wrote to it \
         and has not flushed; tool output:\n{}{}",
        outs[0].1.stdout,
        outs[0].1.stderr
    );
    for (tool, out) in outs {
        assert_eq!(
            out.code,
            Some(2),
            "`cairn replica {tool}` ran on a replica the server holds:\n{}{}",
            out.stdout,
            out.stderr
        );
    }
    // The server's view is untouched.
    assert_eq!(c.status().unwrap().counters.dirty_regions, 1);
    assert_eq!(&c.read(0, 4 * BSZ as u32).unwrap()[..], &data[..]);
    drop(c);
    server.kill_and_wait();

    // Once the server is gone the tools work.
    let out = scrub(&replica);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let out = checksum(&replica);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
}
