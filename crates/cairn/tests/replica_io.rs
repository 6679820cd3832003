//! The server's I/O: that it really runs on io_uring when asked (seen with strace), and that
//! deep pipelines of overlapping writes are applied in arrival order, identically on two
//! replicas fed the same frames.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use bytes::{Bytes, BytesMut};
use cairn_wire::{ReplyBody, Request};
use common::{assert_pattern, cairn_bin, log_path, pattern, serve_args, Rng, Server, BS, BSZ};

// ---------------------------------------------------------------------------------------
// 6. io_uring, seen from outside.

/// True when strace is on PATH and may trace here.
fn strace_works() -> bool {
    Command::new("strace")
        .args(["-f", "-o", "/dev/null", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a server for `engine` under `strace -f -e trace=io_uring_setup`, does a write/read
/// round trip, stops it and returns the trace.
fn traced_round_trip(tmp: &Path, engine: &str) -> (String, String) {
    let dir = tmp.join(format!("data-{engine}"));
    let trace = tmp.join(format!("strace-{engine}.txt"));
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-e", "trace=io_uring_setup", "-o"])
        .arg(&trace)
        .arg(cairn_bin())
        .args(serve_args(&dir, engine));
    let mut server = Server::spawn(cmd, &log_path(&dir), true);
    let io = server.io.clone();
    let mut c = server.client(1);
    c.hello("vol", "r1", 1 << 20).unwrap();
    let data = pattern(0x5EED, 4, 4);
    c.write(4 * BS, Bytes::from(data.clone()), true).unwrap();
    assert_eq!(&c.read(4 * BS, 4 * BSZ as u32).unwrap()[..], &data[..]);
    c.flush().unwrap();
    drop(c);
    server.kill_and_wait();
    (io, std::fs::read_to_string(&trace).unwrap())
}

#[test]
fn server_uses_io_uring_when_available() {
    if !strace_works() {
        println!("SKIP server_uses_io_uring_when_available: strace missing or cannot trace");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();

    let (io, trace) = traced_round_trip(tmp.path(), "auto");
    assert_eq!(io, "uring", "auto picked {io}");
    let setups: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("io_uring_setup("))
        .collect();
    assert!(
        !setups.is_empty(),
        "no io_uring_setup in the trace:\n{trace}"
    );
    // One ring at bind, one per store and one per connection thread at least; all succeed.
    assert!(setups.len() >= 3, "io_uring_setup calls:\n{trace}");
    for l in &setups {
        assert!(!l.contains("= -1"), "io_uring_setup failed: {l}");
    }

    let (io, trace) = traced_round_trip(tmp.path(), "portable");
    assert_eq!(io, "portable");
    assert!(
        !trace.contains("io_uring_setup("),
        "the portable server set up io_uring:\n{trace}"
    );
}

// ---------------------------------------------------------------------------------------
// 7. Ordering of pipelined writes.

const PIPELINE: usize = 200;
/// The writes all land in blocks 0..HOT_BLOCKS.
const HOT_BLOCKS: u64 = 8;

fn pipelined(engine: &str, seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::start(&dir, engine);
    let size = 1 << 20;

    // One frame sequence, with what each block must hold once it has been applied in order.
    let mut rng = Rng::new(seed);
    let mut last = [0u64; HOT_BLOCKS as usize];
    let mut frames = BytesMut::new();
    for i in 0..PIPELINE {
        let n = rng.range(1, 5);
        let first = rng.below(HOT_BLOCKS - n + 1);
        let tag = 100 + i as u64;
        let req = Request::write(
            first * BS,
            i % 17 == 16,
            Bytes::from(pattern(tag, first, n)),
        );
        req.encode(1000 + i as u64, 1, &mut frames);
        for b in first..first + n {
            last[b as usize] = tag;
        }
    }
    let mut expected = Vec::new();
    for (b, tag) in last.iter().enumerate() {
        expected.extend_from_slice(&pattern(*tag, b as u64, 1));
    }

    let mut replicas = Vec::new();
    for vol in ["vol-a", "vol-b"] {
        let mut c = server.client(1);
        c.hello(vol, "r1", size).unwrap();
        replicas.push(c);
    }
    // Every frame goes out before any reply is read, on both connections.
    for c in &mut replicas {
        c.send_raw(&frames).unwrap();
    }
    let mut digests = Vec::new();
    for (k, c) in replicas.iter_mut().enumerate() {
        for i in 0..PIPELINE {
            let r = c.recv().unwrap();
            assert_eq!(r.request_id, 1000 + i as u64, "{engine}: replica {k}");
            assert_eq!(r.result, Ok(ReplyBody::Empty), "{engine}: write {i}");
        }
        let data = c.read(0, (HOT_BLOCKS * BS) as u32).unwrap();
        for (b, tag) in last.iter().enumerate() {
            assert_pattern(
                &data[b * BSZ..(b + 1) * BSZ],
                *tag,
                b as u64,
                &format!("{engine}: replica {k}"),
            );
        }
        assert_eq!(data, expected);
        digests.push(c.digest().unwrap());
    }
    assert_eq!(digests[0], digests[1], "{engine}: replicas differ");

    // A third replica written with the final content directly has the same digest.
    let mut c = server.client(1);
    c.hello("vol-c", "r1", size).unwrap();
    c.write(0, Bytes::from(expected), false).unwrap();
    assert_eq!(c.digest().unwrap(), digests[0], "{engine}");
}

#[test]
fn many_requests_in_flight_apply_in_order() {
    pipelined("portable", 0x0DE5_0001);
    pipelined("uring", 0x0DE5_0002);
}

// ---------------------------------------------------------------------------------------
// Large replies. A reply bigger than the socket's send buffer goes out in several sends; the
// server must finish sending it while the client waits for it.

/// Fails a test that would otherwise hang on a reply that never completes.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const BIG_VOLUME: u64 = 32 << 20;

/// A server with `BIG_VOLUME` bytes of pattern `tag` written (in 4 MiB writes).
fn big_volume(dir: &Path, engine: &str, tag: u64) -> (Server, cairn_replica::Client) {
    let server = Server::start(dir, engine);
    let mut c = server.client(1);
    c.set_timeout(Some(REPLY_TIMEOUT)).unwrap();
    c.hello("vol", "r1", BIG_VOLUME).unwrap();
    let chunk = 4u64 << 20;
    for i in 0..BIG_VOLUME / chunk {
        let first = i * chunk / BS;
        c.write(
            i * chunk,
            Bytes::from(pattern(tag, first, chunk / BS)),
            false,
        )
        .unwrap();
    }
    (server, c)
}

#[test]
fn large_read_replies_arrive_whole() {
    for engine in ["portable", "uring"] {
        let tmp = tempfile::tempdir().unwrap();
        let (_server, mut c) = big_volume(&tmp.path().join("data"), engine, 31);
        for mib in [8u64, 16] {
            let off = 4u64 << 20;
            let data = c.read(off, (mib << 20) as u32).unwrap_or_else(|e| {
                panic!("{engine}: {mib} MiB read: {e} (a timeout means the reply stopped coming)")
            });
            assert_pattern(&data, 31, off / BS, &format!("{engine}: {mib} MiB read"));
        }
    }
}

#[test]
fn pipelined_reads_all_complete() {
    for engine in ["portable", "uring"] {
        let tmp = tempfile::tempdir().unwrap();
        let (_server, mut c) = big_volume(&tmp.path().join("data"), engine, 32);
        // 32 reads of 512 KiB sent back to back: 16 MiB of replies queue up at once.
        let len = 512u64 << 10;
        let mut frames = BytesMut::new();
        let n = BIG_VOLUME / len / 2;
        for i in 0..n {
            Request::Read {
                offset: i * 2 * len,
                len: len as u32,
            }
            .encode(500 + i, 1, &mut frames);
        }
        c.send_raw(&frames).unwrap();
        for i in 0..n {
            let r = c.recv().unwrap_or_else(|e| {
                panic!(
                    "{engine}: reply {i} of {n}: {e} (a timeout means the replies stopped coming)"
                )
            });
            assert_eq!(r.request_id, 500 + i);
            let Ok(ReplyBody::Data { data, .. }) = r.result else {
                panic!("{engine}: reply {i}: {:?}", r.result);
            };
            assert_pattern(
                &data,
                32,
                i * 2 * len / BS,
                &format!("{engine}: pipelined read {i}"),
            );
        }
    }
}

#[test]
fn read_larger_than_a_frame_is_refused_as_too_large() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "portable");
    let mut c = server.client(1);
    c.set_timeout(Some(REPLY_TIMEOUT)).unwrap();
    c.hello("vol", "r1", 64 << 20).unwrap();
    let block = pattern(33, 0, 1);
    c.write(0, Bytes::from(block.clone()), false).unwrap();
    // 20 MiB of data cannot fit a reply frame of at most DEFAULT_MAX_FRAME bytes: the
    // replica must refuse the read rather than send a frame no engine accepts.
    common::expect_kind(
        c.read(0, 20 << 20),
        cairn_wire::ErrorKind::TooLarge,
        "20 MiB read",
    );
    assert_eq!(&c.read(0, BSZ as u32).unwrap()[..], &block[..]);
}
