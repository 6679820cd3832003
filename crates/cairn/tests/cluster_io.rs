//! End-to-end I/O through a real `cairn dev` (3 replica processes, engine, NBD server), driven
//! by real NBD clients: nbdcopy, qemu-img, qemu-io, nbdinfo, and a raw NBD client for
//! concurrent overlapping writes. Every test runs in its own network namespace and checks the
//! data byte for byte, then that the replicas hold identical content (`cairn volume verify`).
//!
//! These tests kill nothing, so they use a long I/O timeout (10 s): a replica that is merely
//! slow on a loaded machine is never dropped.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use common::{
    all_zero, assert_modes, assert_same_bytes, block_is, enter_private_netns, have_tools,
    nbdcopy_out, pattern, random_bytes, replica_status, run_ok, scrub, tag_of, Dev, NbdClient, Rng,
    BS, BSZ, DEV_SIZE, NBD_ADDR, NBD_URI,
};

const IO_TIMEOUT: &str = "10s";
const MIB: usize = 1 << 20;

/// One extent of `nbdinfo --map`: `(offset, length, type)`; type bit 0 is "hole".
fn map_extents() -> Vec<(u64, u64, u32)> {
    let r = run_ok("nbdinfo", &["--map", NBD_URI]);
    r.stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 3, "nbdinfo --map line {l:?}");
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
            )
        })
        .collect()
}

/// `nbdinfo --map` as `(start, end, is_data)` runs, adjacent extents of one kind merged.
fn data_runs() -> Vec<(u64, u64, bool)> {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut at = 0;
    for (off, len, kind) in map_extents() {
        assert_eq!(off, at, "nbdinfo --map extents are contiguous");
        at = off + len;
        let data = kind & 1 == 0;
        match runs.last_mut() {
            Some(last) if last.2 == data => last.1 = at,
            _ => runs.push((off, at, data)),
        }
    }
    assert_eq!(at, DEV_SIZE, "nbdinfo --map covers the volume");
    runs
}

#[test]
fn round_trip_with_real_clients() {
    if !enter_private_netns() || !have_tools(&["nbdcopy", "nbdinfo", "qemu-img"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(&tmp.path().join("data"), IO_TIMEOUT);
    let mut rng = Rng::new(0x5eed_0001);

    // What the export advertises.
    let info = run_ok("nbdinfo", &["--json", NBD_URI]);
    let info: serde_json::Value = serde_json::from_str(&info.stdout).expect("nbdinfo JSON");
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], DEV_SIZE, "{info:#}");
    assert_eq!(export["block_size_minimum"], 4096, "{info:#}");
    assert_eq!(export["block_size_preferred"], 4096, "{info:#}");

    // nbdcopy in and out: 32 MiB at offset 0.
    let a = random_bytes(&mut rng, 32 * MIB);
    let a_path = tmp.path().join("a.img");
    std::fs::write(&a_path, &a).unwrap();
    run_ok("nbdcopy", &[&a_path.display().to_string(), NBD_URI]);
    let back = nbdcopy_out(tmp.path());
    assert_same_bytes(&back[..32 * MIB], &a, "nbdcopy round trip");
    assert!(
        all_zero(&back[32 * MIB..]),
        "the rest of the volume reads as zeros"
    );

    // qemu-img convert in over the first 16 MiB, then out.
    let b = random_bytes(&mut rng, 16 * MIB);
    let b_path = tmp.path().join("b.img");
    std::fs::write(&b_path, &b).unwrap();
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &b_path.display().to_string(),
            NBD_URI,
        ],
    );
    // And 8 MiB at 64 MiB through qemu's raw driver with an offset, leaving a hole between.
    let c = random_bytes(&mut rng, 8 * MIB);
    let c_path = tmp.path().join("c.img");
    std::fs::write(&c_path, &c).unwrap();
    let (host, port) = NBD_ADDR.split_once(':').unwrap();
    let window = |offset: usize, size: usize| {
        format!(
            "driver=raw,offset={offset},size={size},file.driver=nbd,file.server.type=inet,\
             file.server.host={host},file.server.port={port},file.export=vol0"
        )
    };
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "--target-image-opts",
            &c_path.display().to_string(),
            &window(64 * MIB, 8 * MIB),
        ],
    );
    let out_path = tmp.path().join("out.img");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            NBD_URI,
            &out_path.display().to_string(),
        ],
    );
    let out = std::fs::read(&out_path).unwrap();
    std::fs::remove_file(&out_path).unwrap();
    assert_eq!(out.len() as u64, DEV_SIZE);
    let mut want = vec![0u8; DEV_SIZE as usize];
    want[..32 * MIB].copy_from_slice(&a);
    want[..16 * MIB].copy_from_slice(&b);
    want[64 * MIB..72 * MIB].copy_from_slice(&c);
    assert_same_bytes(&out, &want, "qemu-img convert out");
    drop(out);
    // Only the window, read back through the same raw driver.
    let win_path = tmp.path().join("window.img");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--image-opts",
            &window(64 * MIB, 8 * MIB),
            "-O",
            "raw",
            &win_path.display().to_string(),
        ],
    );
    assert_same_bytes(
        &std::fs::read(&win_path).unwrap(),
        &c,
        "qemu-img window out",
    );
    assert_same_bytes(&nbdcopy_out(tmp.path()), &want, "nbdcopy after qemu-img");

    // Allocation: written ranges are data, the rest is hole.
    let mib = MIB as u64;
    assert_eq!(
        data_runs(),
        vec![
            (0, 32 * mib, true),
            (32 * mib, 64 * mib, false),
            (64 * mib, 72 * mib, true),
            (72 * mib, DEV_SIZE, false),
        ],
        "nbdinfo --map"
    );

    assert_modes(&dev.status(), &[("r1", "RW"), ("r2", "RW"), ("r3", "RW")]);
    dev.assert_verified("after the round trips");
}

/// One write a client sent: its tag (content), blocks, and when it was sent and answered.
#[derive(Clone, Copy)]
struct Sent {
    tag: u64,
    first: u64,
    n: u64,
    sent: Instant,
    acked: Instant,
}

/// First block of the region the concurrent writers fight over.
const REGION_FIRST: u64 = 1024;
const REGION_BLOCKS: u64 = 256;
const WRITERS: u64 = 4;
const ROUNDS: u64 = 6;
const WRITES_PER_ROUND: u64 = 60;
const WINDOW: usize = 8;

/// One writer: `ROUNDS` rounds (all writers start each round together) of pipelined writes
/// of 1..16 blocks at random places in the region, a flush now and then.
fn writer(id: u64, start: &Barrier) -> Vec<Sent> {
    let mut rng = Rng::new(0xc0ffee ^ (id << 20));
    let mut nbd = NbdClient::connect(NBD_ADDR, "vol0");
    let mut sent: Vec<Sent> = Vec::new();
    let mut pending: HashMap<u64, usize> = HashMap::new();
    let mut seq = 0;
    for _ in 0..ROUNDS {
        start.wait();
        for _ in 0..WRITES_PER_ROUND {
            while nbd.in_flight() >= WINDOW {
                take_reply(&mut nbd, &mut pending, &mut sent);
            }
            seq += 1;
            let n = rng.range(1, 17);
            let first = REGION_FIRST + rng.below(REGION_BLOCKS - n + 1);
            let tag = (id << 32) | seq;
            let data = pattern(tag, first, n);
            let now = Instant::now();
            let cookie = nbd.send_write(first * BS, &data);
            pending.insert(cookie, sent.len());
            sent.push(Sent {
                tag,
                first,
                n,
                sent: now,
                acked: now,
            });
            if rng.chance(20) {
                nbd.send_flush();
            }
        }
        while nbd.in_flight() > 0 {
            take_reply(&mut nbd, &mut pending, &mut sent);
        }
    }
    sent
}

fn take_reply(nbd: &mut NbdClient, pending: &mut HashMap<u64, usize>, sent: &mut [Sent]) {
    let r = nbd.recv();
    assert_eq!(r.error, 0, "a write or flush failed: {r:?}");
    if let Some(i) = pending.remove(&r.cookie) {
        sent[i].acked = Instant::now();
    }
}

#[test]
fn concurrent_overlapping_writes_leave_replicas_identical() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(&tmp.path().join("data"), IO_TIMEOUT);

    // Threads inherit this thread's network namespace.
    let start = Arc::new(Barrier::new(WRITERS as usize));
    let handles: Vec<_> = (0..WRITERS)
        .map(|id| {
            let start = start.clone();
            std::thread::spawn(move || writer(id + 1, &start))
        })
        .collect();
    let writes: Vec<Sent> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("writer thread"))
        .collect();
    assert_eq!(writes.len() as u64, WRITERS * ROUNDS * WRITES_PER_ROUND);

    // Per block: every write that covered it.
    let mut covering: Vec<Vec<Sent>> = vec![Vec::new(); REGION_BLOCKS as usize];
    for w in &writes {
        for b in w.first..w.first + w.n {
            covering[(b - REGION_FIRST) as usize].push(*w);
        }
    }
    let contested = covering
        .iter()
        .filter(|c| {
            let mut ids: Vec<u64> = c.iter().map(|w| w.tag >> 32).collect();
            ids.sort_unstable();
            ids.dedup();
            ids.len() > 1
        })
        .count();
    assert!(
        contested > REGION_BLOCKS as usize / 2,
        "writers overlapped on {contested} blocks only"
    );

    // Read the region back several times: reads go round-robin over the replicas, so each
    // replica serves at least one of them; all must agree.
    let mut nbd = NbdClient::connect(NBD_ADDR, "vol0");
    let len = (REGION_BLOCKS * BS) as u32;
    let first_read = nbd.read(REGION_FIRST * BS, len).expect("read region");
    for i in 1..6 {
        let again = nbd.read(REGION_FIRST * BS, len).expect("read region");
        assert_same_bytes(
            &again,
            &first_read,
            &format!("read {i} of the region vs read 0"),
        );
    }
    for (i, block) in first_read.chunks_exact(BSZ).enumerate() {
        let idx = REGION_FIRST + i as u64;
        let tag = tag_of(block);
        if covering[i].is_empty() {
            assert!(
                block.iter().all(|&b| b == 0),
                "block {idx} was never written"
            );
            continue;
        }
        let Some(w) = covering[i].iter().find(|w| w.tag == tag) else {
            panic!("block {idx} holds tag {tag:#x}, which is no write that covered it");
        };
        assert!(
            block_is(block, tag, idx),
            "block {idx}: torn or foreign content (tag {tag:#x})"
        );
        // The block's final write must not have completed before another write to the block
        // was even sent: that one was ordered after it and would have overwritten it.
        if let Some(later) = covering[i].iter().find(|o| o.sent > w.acked) {
            panic!(
                "block {idx} holds write {tag:#x}, acknowledged before write {:#x} to it was sent",
                later.tag
            );
        }
    }
    // The writers' neighbours were never touched.
    let edges = nbd.read((REGION_FIRST - 1) * BS, BSZ as u32).unwrap();
    assert!(
        edges.iter().all(|&b| b == 0),
        "block before the region was written"
    );
    let edges = nbd
        .read((REGION_FIRST + REGION_BLOCKS) * BS, BSZ as u32)
        .unwrap();
    assert!(
        edges.iter().all(|&b| b == 0),
        "block after the region was written"
    );
    drop(nbd);

    assert_modes(&dev.status(), &[("r1", "RW"), ("r2", "RW"), ("r3", "RW")]);
    dev.assert_verified("after concurrent overlapping writes");
}

#[test]
fn bit_rot_on_a_live_replica_is_repaired() {
    if !enter_private_netns() || !have_tools(&["nbdcopy", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut dev = Dev::start(&tmp.path().join("data"), IO_TIMEOUT);
    let mut rng = Rng::new(0x5eed_0005);

    let data = random_bytes(&mut rng, 4 * MIB);
    let path = tmp.path().join("known.img");
    std::fs::write(&path, &data).unwrap();
    run_ok("nbdcopy", &[&path.display().to_string(), NBD_URI]);
    run_ok("qemu-io", &["-f", "raw", "-c", "flush", NBD_URI]);

    // Damage 5 bytes of block 300 in r1's head data file, in place.
    let bad_block = 300u64;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev.head_data_file("r1"))
        .expect("open r1's data file");
    let allocated = file.metadata().unwrap().blocks();
    let at = bad_block * BS + 123;
    let mut bytes = [0u8; 5];
    file.read_exact_at(&mut bytes, at).unwrap();
    assert_eq!(
        bytes,
        data[at as usize..at as usize + 5],
        "r1 holds the data at the expected place"
    );
    for b in &mut bytes {
        *b ^= 0xa5;
    }
    file.write_all_at(&bytes, at).unwrap();
    file.sync_all().unwrap();
    assert_eq!(
        file.metadata().unwrap().blocks(),
        allocated,
        "the data file stays sparse"
    );
    drop(file);

    // Read everything until a read hit r1 (reads go round-robin) and repaired it; every read
    // returns the right data.
    let mut reads = 0;
    let mut after_repair = 0;
    while after_repair < 3 {
        assert!(
            reads < 40,
            "no read repair after {reads} whole-volume reads"
        );
        let back = nbdcopy_out(tmp.path());
        reads += 1;
        assert_same_bytes(
            &back[..4 * MIB],
            &data,
            &format!("read {reads} of the known data"),
        );
        assert!(
            all_zero(&back[4 * MIB..]),
            "read {reads}: the rest is zeros"
        );
        if dev.status()["read_repairs"].as_u64().unwrap() >= 1 {
            after_repair += 1;
        }
    }
    let status = dev.status();
    assert!(status["read_repairs"].as_u64().unwrap() >= 1, "{status:#}");
    assert!(
        replica_status(&status, "r1")["corrupt_reads"]
            .as_u64()
            .unwrap()
            >= 1,
        "{status:#}"
    );
    assert_modes(&status, &[("r1", "RW"), ("r2", "RW"), ("r3", "RW")]);
    dev.assert_verified("after read repair");

    dev.stop();
    let out = scrub(&dev.replica_dir("r1"));
    assert_eq!(
        out.code,
        Some(0),
        "scrub of r1 after repair:\n{}{}",
        out.stdout,
        out.stderr
    );
    // The scrub is not vacuous: r1 holds the repaired block.
    let file = std::fs::File::open(dev.head_data_file("r1")).unwrap();
    let mut block = vec![0u8; BSZ];
    file.read_exact_at(&mut block, bad_block * BS).unwrap();
    let want = &data[(bad_block * BS) as usize..((bad_block + 1) * BS) as usize];
    assert_same_bytes(&block, want, "r1's repaired block on disk");
}
