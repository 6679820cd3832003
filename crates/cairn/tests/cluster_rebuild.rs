//! Healing: a killed replica comes back by itself and is resynced with only what was written
//! while it was out; an empty replica replaces one while fio writes and verifies; a rebuild
//! under a tiny rate limit is cancelled and restarted; a replica that returns as a different
//! instance gets a full rebuild; an old engine that was paused cannot change a replica once
//! a newer engine attached. Every test compares all the data read back with what was written
//! and the replicas' digests with each other.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// `cairn volume ...` against `dev`'s endpoint; panics unless it exits 0. Returns stdout.
fn volume_cmd(dev: &Dev, args: &[&str]) -> String {
    let mut all: Vec<&str> = vec!["volume"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--endpoint", &dev.control]);
    let r = run_bounded(
        Command::new(cairn_bin()).args(&all),
        Duration::from_secs(300),
    );
    r.expect_success(&format!("cairn {}", all.join(" ")));
    r.stdout
}

/// Waits until replica `id` is RW with its last job finished as `kind`; returns its status.
fn wait_healed(dev: &Dev, id: &str, kind: &str, limit: Duration) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_until(
        &format!("replica {id} to be RW after a {kind}"),
        limit,
        || {
            last = replica_status(&dev.status(), id).clone();
            last["mode"] == "RW" && last["rebuild"]["state"] == "done"
        },
    );
    assert_eq!(last["rebuild"]["kind"], kind, "replica {id}: {last:#}");
    last
}

/// Writes `data` at `offset` through `nbd` in 4 MiB pieces and records it in `want`.
fn write_at(nbd: &mut NbdClient, want: &mut [u8], offset: u64, data: &[u8]) {
    for (k, piece) in data.chunks(4 << 20).enumerate() {
        let at = offset + (k as u64) * (4 << 20);
        nbd.write(at, piece)
            .unwrap_or_else(|e| panic!("write at {at}: NBD error {e}"));
    }
    want[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

/// Reads the whole volume through `nbd` (4 MiB at a time).
fn read_all(nbd: &mut NbdClient, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size as usize);
    let mut at = 0;
    while at < size {
        let n = (4 * MIB).min(size - at) as u32;
        out.extend(
            nbd.read(at, n)
                .unwrap_or_else(|e| panic!("read at {at}: NBD error {e}")),
        );
        at += u64::from(n);
    }
    out
}

/// Kills replica `id` and takes its data directory's lock, so the server `cairn dev`
/// restarts cannot open it until the returned lock is dropped. The dead server's threads
/// may still be closing its files when its main thread is a zombie, so the lock is polled
/// for; `cairn dev` restarts a replica 1 s after it died at the earliest.
fn kill_and_hold(dev: &Dev, id: &str) -> std::fs::File {
    dev.kill_replica(id);
    let dir = dev.dir.join("replicas").join(id);
    let mut lock = None;
    wait_until(
        &format!("the dead {id}'s lock (before cairn dev restarts it)"),
        Duration::from_millis(800),
        || {
            lock = cairn_replica::lock_data_dir(&dir).expect("lock the replica directory");
            lock.is_some()
        },
    );
    lock.expect("held")
}

/// A replica server of our own on `addr`, data under `dir`.
fn own_server(dir: &Path, addr: &str) -> Server {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = Command::new(cairn_bin());
    cmd.args(["replica", "serve", "--dir"])
        .arg(dir)
        .args(["--listen", addr]);
    Server::spawn(cmd, &log_path(dir), false)
}

#[test]
fn killed_replica_is_resynced_with_only_what_was_written() {
    if !enter_private_netns() || !have_tools(&["nbdcopy"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevOpts::new("2s").start(&tmp.path().join("data"));
    let mut nbd = NbdClient::connect(NBD_ADDR, "vol0");
    let mut rng = Rng::new(0x5e5c);
    let mut want = vec![0u8; DEV_SIZE as usize];
    write_at(&mut nbd, &mut want, 0, &random_bytes(&mut rng, 128 << 20));
    nbd.flush().expect("flush");

    let lock = kill_and_hold(&dev, "r2");
    wait_until("r2 to be ERR", Duration::from_secs(30), || {
        mode_of(&dev.status(), "r2") == "ERR"
    });
    // 64 MiB of random data at random 4 KiB-aligned offsets, in 256 KiB writes.
    let written: u64 = 64 << 20;
    let piece = 256 << 10;
    for _ in 0..written / piece {
        let at = rng.below((DEV_SIZE - piece) / 4096) * 4096;
        let data = random_bytes(&mut rng, piece as usize);
        write_at(&mut nbd, &mut want, at, &data);
    }
    let status = dev.status();
    let marked = replica_status(&status, "r2")["outage_regions"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        marked > 0,
        "the engine recorded no region for r2: {status:#}"
    );
    assert_eq!(mode_of(&status, "r1"), "RW");
    drop(lock);

    let r2 = wait_healed(&dev, "r2", "resync", Duration::from_secs(60));
    let copied = r2["last_resync_bytes"].as_u64().unwrap();
    eprintln!("resync after {written} bytes written: {marked} regions of 64 KiB logged, {copied} bytes copied");
    assert!(
        copied > 0 && copied <= 2 * written,
        "resync copied {copied} bytes for {written} written: {r2:#}"
    );
    assert!(
        copied <= marked * status["outage_region_bytes"].as_u64().unwrap(),
        "copied more than the marked regions: {r2:#}"
    );
    dev.assert_verified("after the resync");
    assert_same_bytes(&nbdcopy_out(tmp.path()), &want, "volume after the resync");
    assert_same_bytes(&read_all(&mut nbd, DEV_SIZE), &want, "volume over NBD");
}

#[test]
fn empty_replica_replaces_one_while_fio_writes_and_verifies() {
    if !enter_private_netns() || !have_tools(&["fio", "nbdcopy"]) {
        return;
    }
    const SIZE: u64 = 1 << 30;
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevOpts::new("5s")
        .size("1GiB")
        .start(&tmp.path().join("data"));
    let mut nbd = NbdClient::connect(NBD_ADDR, "vol0");
    let mut rng = Rng::new(0x300);
    let mut want = vec![0u8; SIZE as usize];
    write_at(&mut nbd, &mut want, 0, &random_bytes(&mut rng, 300 << 20));
    nbd.flush().expect("flush");

    // fio writes and verifies 256 MiB from 256 MiB on (over the end of the data) in a loop
    // until the rebuild is over; every run must verify.
    let stop = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU64::new(0));
    let fio = {
        let (stop, running, runs) = (stop.clone(), running.clone(), runs.clone());
        std::thread::spawn(move || {
            let mut seed = 1;
            while !stop.load(Ordering::Relaxed) {
                running.store(true, Ordering::Relaxed);
                let r = run_bounded(
                    Command::new("fio").args([
                        "--name=verify",
                        "--ioengine=nbd",
                        &format!("--uri={NBD_URI}"),
                        "--rw=randwrite",
                        "--bs=64k",
                        "--offset=256M",
                        "--size=256M",
                        "--iodepth=16",
                        "--verify=crc32c",
                        "--verify_fatal=1",
                        "--do_verify=1",
                        "--verify_state_save=0",
                        &format!("--randseed={seed}"),
                    ]),
                    Duration::from_secs(300),
                );
                running.store(false, Ordering::Relaxed);
                r.expect_success(&format!("fio write+verify run {seed}"));
                runs.fetch_add(1, Ordering::Relaxed);
                seed += 1;
            }
        })
    };
    wait_until("fio to start writing", Duration::from_secs(60), || {
        replica_status(&dev.status(), "r1")["writes"]
            .as_u64()
            .unwrap_or(0)
            > 200
    });

    let server = own_server(&tmp.path().join("r9"), "127.0.0.9:7000");
    let id = volume_cmd(&dev, &["replica", "add", "vol0", "--address", &server.addr]);
    assert_eq!(id.trim(), "r4");
    volume_cmd(&dev, &["replica", "remove", "vol0", "r3"]);
    let mut overlapped = false;
    let mut last = serde_json::Value::Null;
    wait_until("r4 to be RW", Duration::from_secs(600), || {
        last = replica_status(&dev.status(), "r4").clone();
        if last["mode"] == "WO" && running.load(Ordering::Relaxed) {
            overlapped = true;
        }
        last["mode"] == "RW"
    });
    stop.store(true, Ordering::Relaxed);
    fio.join().expect("every fio run verified");
    assert!(
        overlapped,
        "no fio run was writing while r4 was WO: {last:#}"
    );
    assert!(runs.load(Ordering::Relaxed) >= 1);
    assert_eq!(last["rebuild"]["kind"], "rebuild", "{last:#}");
    let copied = last["last_resync_bytes"].as_u64().unwrap();
    assert!(
        copied >= 256 << 20,
        "the rebuild copied only {copied} bytes of >= 300 MiB: {last:#}"
    );
    let status = dev.status();
    assert!(
        status["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["id"] != "r3"),
        "r3 was removed: {status:#}"
    );
    assert_modes(&status, &[("r1", "RW"), ("r2", "RW"), ("r4", "RW")]);
    dev.assert_verified("r1, r2 and the rebuilt r4");
    let got = read_all(&mut nbd, SIZE);
    assert_same_bytes(
        &got[..256 << 20],
        &want[..256 << 20],
        "data fio did not touch",
    );
    assert!(
        all_zero(&got[512 << 20..]),
        "nothing was written past 512 MiB"
    );
}

#[test]
fn rebuild_under_a_tiny_rate_is_cancelled_cleanly_and_restarted() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevOpts::new("5s")
        .arg("--rebuild-rate")
        .arg("1MiB")
        .start(&tmp.path().join("data"));
    let mut nbd = NbdClient::connect(NBD_ADDR, "vol0");
    let mut rng = Rng::new(0xca);
    let mut want = vec![0u8; DEV_SIZE as usize];
    write_at(
        &mut nbd,
        &mut want,
        16 << 20,
        &random_bytes(&mut rng, 64 << 20),
    );

    let server = own_server(&tmp.path().join("r9"), "127.0.0.9:7001");
    volume_cmd(&dev, &["replica", "add", "vol0", "--address", &server.addr]);
    wait_until(
        "the slow rebuild to copy something",
        Duration::from_secs(60),
        || {
            let r4 = replica_status(&dev.status(), "r4").clone();
            r4["rebuild"]["state"] == "running" && r4["rebuild"]["bytes_done"].as_u64() > Some(0)
        },
    );
    // Writes go on while the rebuild runs, to r4 as well (WO).
    write_at(
        &mut nbd,
        &mut want,
        200 << 20,
        &random_bytes(&mut rng, 4 << 20),
    );
    volume_cmd(&dev, &["rebuild", "cancel", "vol0", "r4"]);
    let mut r4 = serde_json::Value::Null;
    wait_until(
        "the rebuild to stop as cancelled",
        Duration::from_secs(60),
        || {
            r4 = replica_status(&dev.status(), "r4").clone();
            r4["rebuild"]["state"] == "cancelled"
        },
    );
    assert_eq!(r4["mode"], "ERR", "{r4:#}");
    assert_eq!(r4["auto_heal"], false, "{r4:#}");
    let done = r4["rebuild"]["bytes_done"].as_u64().unwrap();
    assert!(
        done < 64 << 20,
        "the rate limit did not hold: {done} bytes done: {r4:#}"
    );
    write_at(&mut nbd, &mut want, 0, &random_bytes(&mut rng, 1 << 20));
    dev.assert_verified("RW replicas after the cancel");
    assert_same_bytes(
        &read_all(&mut nbd, DEV_SIZE),
        &want,
        "volume after the cancel",
    );
    assert_eq!(
        mode_of(&dev.status(), "r4"),
        "ERR",
        "stays out after a cancel"
    );

    volume_cmd(&dev, &["rebuild", "rate", "vol0", "0"]);
    volume_cmd(&dev, &["rebuild", "start", "vol0", "r4"]);
    volume_cmd(
        &dev,
        &["rebuild", "wait", "vol0", "r4", "--timeout", "120s"],
    );
    let status = dev.status();
    assert_modes(
        &status,
        &[("r1", "RW"), ("r2", "RW"), ("r3", "RW"), ("r4", "RW")],
    );
    dev.assert_verified("all four replicas after the restarted rebuild");
    assert_same_bytes(&read_all(&mut nbd, DEV_SIZE), &want, "volume at the end");
}

#[test]
fn replica_returning_as_another_instance_gets_a_full_rebuild() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevOpts::new("2s").start(&tmp.path().join("data"));
    let mut nbd = NbdClient::connect(NBD_ADDR, "vol0");
    let mut rng = Rng::new(0x1d);
    let mut want = vec![0u8; DEV_SIZE as usize];
    write_at(
        &mut nbd,
        &mut want,
        8 << 20,
        &random_bytes(&mut rng, 40 << 20),
    );
    nbd.flush().expect("flush");

    let lock = kill_and_hold(&dev, "r3");
    // Its disk is replaced: the replica directory is gone, the server will create a new one.
    std::fs::remove_dir_all(dev.replica_dir("r3")).expect("remove r3's data");
    write_at(
        &mut nbd,
        &mut want,
        100 << 20,
        &random_bytes(&mut rng, 1 << 20),
    );
    wait_until("r3 to be ERR", Duration::from_secs(30), || {
        mode_of(&dev.status(), "r3") == "ERR"
    });
    assert!(
        replica_status(&dev.status(), "r3")["outage_regions"].as_u64() > Some(0),
        "r3 has an outage log, but it does not describe a new instance"
    );
    drop(lock);
    let r3 = wait_healed(&dev, "r3", "rebuild", Duration::from_secs(60));
    let copied = r3["last_resync_bytes"].as_u64().unwrap();
    assert_eq!(copied, 41 << 20, "a full copy of what exists: {r3:#}");
    dev.assert_verified("after the full rebuild");
    assert_same_bytes(
        &read_all(&mut nbd, DEV_SIZE),
        &want,
        "volume after the rebuild",
    );
}

#[test]
fn paused_old_engine_cannot_change_replicas_after_a_new_one_attached() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let servers: Vec<Server> = ["127.0.0.2:7100", "127.0.0.3:7100", "127.0.0.4:7100"]
        .iter()
        .enumerate()
        .map(|(i, a)| own_server(&tmp.path().join(format!("s{i}")), a))
        .collect();
    let addrs = servers
        .iter()
        .map(|s| s.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    let old = DevOpts::new("2s")
        .arg("--replica-addrs")
        .arg(&addrs)
        .start(&tmp.path().join("old"));
    let mut old_nbd = NbdClient::connect(NBD_ADDR, "vol0");
    let first = pattern(1, 0, 256);
    old_nbd
        .write(0, &first)
        .expect("write through the old engine");
    old_nbd.flush().expect("flush");

    send_signal(old.pid(), libc::SIGSTOP);
    let new = DevOpts::new("2s")
        .ports("127.0.0.1:10819", "127.0.0.1:10820")
        .arg("--replica-addrs")
        .arg(&addrs)
        .start(&tmp.path().join("new"));
    let epoch = new.status()["epoch"].as_u64().unwrap();
    assert!(
        epoch >= 2,
        "the new engine must start above the old one's epoch 1"
    );
    let mut new_nbd = NbdClient::connect("127.0.0.1:10819", "vol0");
    let second = pattern(2, 0, 256);
    new_nbd
        .write(0, &second)
        .expect("write through the new engine");
    new_nbd.flush().expect("flush");

    send_signal(old.pid(), libc::SIGCONT);
    let third = pattern(3, 0, 256);
    assert!(
        old_nbd.write(0, &third).is_err(),
        "the old engine's write must fail: every replica refuses its epoch"
    );
    let _ = old_nbd.write(1 << 20, &third);
    let status = old.status();
    assert_eq!(
        status["superseded_by_epoch"].as_u64(),
        Some(epoch),
        "the old engine knows it was fenced out: {status:#}"
    );
    for id in ["r1", "r2", "r3"] {
        let r = replica_status(&status, id);
        assert!(
            r["mode"] == "ERR" || r["last_error"].as_str().unwrap_or("").contains("epoch"),
            "old engine's view of {id}: {r:#}"
        );
    }
    assert_same_bytes(
        &new_nbd.read(0, 1 << 20).expect("read"),
        &second,
        "data after the old engine resumed",
    );
    assert!(
        all_zero(&new_nbd.read(1 << 20, 1 << 20).expect("read")),
        "the old engine's second write did not land"
    );
    new.assert_verified("replicas after the old engine tried to write");
    drop(servers);
}

#[test]
fn replica_returning_with_another_chain_gets_a_rebuild_that_keeps_the_snapshots() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevOpts::new("2s").start(&tmp.path().join("data"));
    let mut nbd = NbdClient::connect(NBD_ADDR, "vol0");
    let mut rng = Rng::new(0xc4a1);
    let mut want = vec![0u8; DEV_SIZE as usize];
    write_at(&mut nbd, &mut want, 0, &random_bytes(&mut rng, 16 << 20));
    nbd.flush().expect("flush");

    // r2 misses a snapshot: its chain is a prefix of the others'.
    let lock = kill_and_hold(&dev, "r2");
    wait_until("r2 to be ERR", Duration::from_secs(30), || {
        mode_of(&dev.status(), "r2") == "ERR"
    });
    volume_cmd(&dev, &["snapshot", "create", "vol0", "s1"]);
    write_at(
        &mut nbd,
        &mut want,
        8 << 20,
        &random_bytes(&mut rng, 16 << 20),
    );
    drop(lock);
    let r2 = wait_healed(&dev, "r2", "rebuild", Duration::from_secs(60));
    assert_eq!(r2["chain"], serde_json::json!(["s1"]), "{r2:#}");
    // The 16 MiB r2 already held were compared against s1, not sent; the head was.
    assert_eq!(r2["last_resync_bytes"].as_u64(), Some(16 << 20), "{r2:#}");
    dev.assert_verified("after the rebuild that kept s1");
    // Bad snapshot requests get a clear error and fail no replica.
    for (name, why) in [("s1", "already exists"), ("bad name", "must be")] {
        let r = run_bounded(
            Command::new(cairn_bin()).args([
                "volume",
                "snapshot",
                "create",
                "vol0",
                name,
                "--endpoint",
                &dev.control,
            ]),
            Duration::from_secs(60),
        );
        assert!(
            !r.success() && r.stderr.contains(why),
            "snapshot create {name:?}: {r:?}"
        );
    }
    assert_modes(&dev.status(), &[("r1", "RW"), ("r2", "RW"), ("r3", "RW")]);
    assert_same_bytes(
        &read_all(&mut nbd, DEV_SIZE),
        &want,
        "volume after rebuild 1",
    );

    // r3 holds a snapshot the others deleted: its chain cannot be reused.
    volume_cmd(&dev, &["snapshot", "create", "vol0", "s2"]);
    let lock = kill_and_hold(&dev, "r3");
    wait_until("r3 to be ERR", Duration::from_secs(30), || {
        mode_of(&dev.status(), "r3") == "ERR"
    });
    volume_cmd(&dev, &["snapshot", "delete", "vol0", "s2"]);
    write_at(
        &mut nbd,
        &mut want,
        40 << 20,
        &random_bytes(&mut rng, 4 << 20),
    );
    drop(lock);
    let r3 = wait_healed(&dev, "r3", "rebuild", Duration::from_secs(60));
    assert_eq!(r3["chain"], serde_json::json!(["s1"]), "{r3:#}");
    assert!(
        r3["last_resync_bytes"].as_u64() >= Some(28 << 20),
        "a recreated replica gets every layer: {r3:#}"
    );
    dev.assert_verified("after the rebuild of a recreated replica");
    assert_same_bytes(
        &read_all(&mut nbd, DEV_SIZE),
        &want,
        "volume after rebuild 2",
    );
}

#[test]
fn replica_back_after_the_resync_window_gets_a_rebuild() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevOpts::new("2s")
        .arg("--resync-window")
        .arg("1s")
        .start(&tmp.path().join("data"));
    let mut nbd = NbdClient::connect(NBD_ADDR, "vol0");
    let mut rng = Rng::new(0x1f);
    let mut want = vec![0u8; DEV_SIZE as usize];
    write_at(&mut nbd, &mut want, 0, &random_bytes(&mut rng, 8 << 20));
    nbd.flush().expect("flush");
    let lock = kill_and_hold(&dev, "r1");
    write_at(
        &mut nbd,
        &mut want,
        4 << 20,
        &random_bytes(&mut rng, 2 << 20),
    );
    wait_until("r1's outage log to expire", Duration::from_secs(30), || {
        let s = dev.status();
        mode_of(&s, "r1") == "ERR" && replica_status(&s, "r1")["outage_regions"].is_null()
    });
    drop(lock);
    let r1 = wait_healed(&dev, "r1", "rebuild", Duration::from_secs(60));
    // r1 held the first 8 MiB; the compare sends only the 2 MiB written since.
    assert_eq!(r1["last_resync_bytes"].as_u64(), Some(2 << 20), "{r1:#}");
    dev.assert_verified("after the rebuild past the window");
    assert_same_bytes(
        &read_all(&mut nbd, DEV_SIZE),
        &want,
        "volume after the rebuild",
    );
}
