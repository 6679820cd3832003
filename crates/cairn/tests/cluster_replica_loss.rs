//! Losing replicas of a real `cairn dev` while real clients use it: fio with verification
//! while replicas are SIGKILLed one after the other, a restart that must keep a failed
//! replica out, and how fast a replica that died while idle is noticed.
//!
//! What the engine promises (crates/cairn-engine/src/lib.rs): a request succeeds while at
//! least one RW replica takes it, a failed replica goes to ERR and stays there across
//! restarts, and with no RW replica left requests fail with an I/O error.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    all_zero, assert_modes, assert_same_bytes, enter_private_netns, have_tools, mode_of,
    nbdcopy_out, random_bytes, replica_status, run_bounded, run_ok, tcp_states_to, wait_until, Dev,
    Proc, Rng, DEV_SIZE, NBD_URI, TCP_ESTABLISHED,
};

const MIB: usize = 1 << 20;

/// fio writing 64 MiB at `offset` randomly (4 KiB..64 KiB, 16 deep) through the nbd engine,
/// then reading it all back and checking crc32c of every block; stops at the first mismatch.
fn fio_verify(scratch: &Path, offset: usize, seed: u64) -> Command {
    let mut c = Command::new("fio");
    c.current_dir(scratch).args([
        "--name=randverify",
        "--ioengine=nbd",
        &format!("--uri={NBD_URI}"),
        "--rw=randwrite",
        "--bsrange=4k-64k",
        &format!("--offset={offset}"),
        "--size=64M",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--verify_state_save=0",
        &format!("--randseed={seed}"),
        "--output-format=json",
    ]);
    c
}

/// Asserts a fio run exited 0 having written and verified 64 MiB with no error.
fn assert_fio_clean(run: &common::Run, what: &str) {
    run.expect_success(what);
    let json = &run.stdout[run.stdout.find('{').unwrap_or(0)..];
    let v: serde_json::Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("{what}: fio output is not JSON ({e}):\n{}", run.stdout));
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{what}: fio job error in {job:#}");
    assert_eq!(job["write"]["io_bytes"], 64 << 20, "{what}: bytes written");
    assert_eq!(job["read"]["io_bytes"], 64 << 20, "{what}: bytes verified");
}

#[test]
fn fio_verifies_while_replicas_are_killed() {
    if !enter_private_netns() || !have_tools(&["fio", "nbdcopy", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut dev = Dev::start(&tmp.path().join("data"), "2s");

    // r2 dies in the middle of fio's writes.
    let mut fio = Proc::spawn(
        &mut fio_verify(tmp.path(), 0, 1),
        "fio (3 replicas, r2 dies)",
    );
    wait_until(
        "fio to have written 100 times to r2",
        Duration::from_secs(60),
        || {
            replica_status(&dev.status(), "r2")["writes"]
                .as_u64()
                .unwrap()
                >= 100
        },
    );
    assert!(!fio.exited(), "fio finished before r2 could be killed");
    dev.kill_replica("r2");
    assert!(!fio.exited(), "fio finished before r2 died");
    assert_fio_clean(&fio.finish(Duration::from_secs(120)), "fio while r2 died");
    let status = dev.status();
    assert_modes(&status, &[("r1", "RW"), ("r2", "ERR"), ("r3", "RW")]);
    assert!(
        replica_status(&status, "r2")["last_error"].is_string(),
        "{status:#}"
    );
    dev.assert_verified("r1 and r3 after r2 died");
    let before = nbdcopy_out(tmp.path());

    // r3 dies too: one replica carries the volume.
    dev.kill_replica("r3");
    let run = run_bounded(
        &mut fio_verify(tmp.path(), 64 * MIB, 2),
        Duration::from_secs(120),
    );
    assert_fio_clean(&run, "fio on r1 alone");
    assert_modes(&dev.status(), &[("r1", "RW"), ("r2", "ERR"), ("r3", "ERR")]);
    dev.assert_verified("r1 alone");
    // What fio wrote first reads back the same from r1 alone as it did from r1 and r3.
    let after = nbdcopy_out(tmp.path());
    assert_same_bytes(
        &after[..64 * MIB],
        &before[..64 * MIB],
        "first fio region from r1",
    );
    assert!(
        all_zero(&after[128 * MIB..]),
        "nothing was written past 128 MiB"
    );

    // r1 dies: no replica is left, and I/O fails promptly instead of hanging.
    dev.kill_replica("r1");
    for cmd in ["read 0 4k", "write -P 0x33 0 4k", "flush"] {
        let run = run_bounded(
            Command::new("qemu-io").args(["-f", "raw", "-c", cmd, NBD_URI]),
            Duration::from_secs(20),
        );
        eprintln!(
            "qemu-io {cmd:?} with no replica left: {:?} after {:?}",
            run.status, run.elapsed
        );
        assert!(
            run.status.is_some(),
            "qemu-io {cmd:?} hung with no replica left"
        );
        assert!(
            run.elapsed < Duration::from_secs(5),
            "qemu-io {cmd:?} took {:?} to fail with no replica left",
            run.elapsed
        );
        assert!(
            !run.success(),
            "qemu-io {cmd:?} succeeded with no replica left:\n{}{}",
            run.stdout,
            run.stderr
        );
    }
    assert_modes(
        &dev.status(),
        &[("r1", "ERR"), ("r2", "ERR"), ("r3", "ERR")],
    );
    // r1 failed as the last RW replica: it holds every acknowledged write, so the persisted
    // membership keeps it RW and a restart serves from it (r2 and r3 missed writes).
    dev.stop();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dev.dir.join("volume.json")).unwrap()).unwrap();
    let modes: Vec<(String, String)> = state["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_owned(),
                r["mode"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        modes,
        [("r1", "RW"), ("r2", "ERR"), ("r3", "ERR")]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .to_vec()
    );
    let dir = dev.dir.clone();
    drop(dev);
    let dev = Dev::start(&dir, "2s");
    assert_modes(&dev.status(), &[("r1", "RW"), ("r2", "ERR"), ("r3", "ERR")]);
    let again = nbdcopy_out(tmp.path());
    assert_same_bytes(&again, &after, "whole volume from r1 after the restart");
    drop(dev);
}

#[test]
fn restart_keeps_data_and_a_failed_replica_out() {
    if !enter_private_netns() || !have_tools(&["nbdcopy", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let mut dev = Dev::start(&data_dir, "5s");
    let mut rng = Rng::new(0x5eed_0007);

    let a = random_bytes(&mut rng, 16 * MIB);
    let a_path = tmp.path().join("a.img");
    std::fs::write(&a_path, &a).unwrap();
    run_ok("nbdcopy", &[&a_path.display().to_string(), NBD_URI]);
    dev.kill_replica("r2");
    // r2 misses this write.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x6b 32M 4M",
            "-c",
            "flush",
            NBD_URI,
        ],
    );
    let status = dev.status();
    assert_modes(&status, &[("r1", "RW"), ("r2", "ERR"), ("r3", "RW")]);
    let epoch = status["epoch"].as_u64().unwrap();
    let mut want = vec![0u8; DEV_SIZE as usize];
    want[..16 * MIB].copy_from_slice(&a);
    want[32 * MIB..36 * MIB].fill(0x6b);
    assert_same_bytes(&nbdcopy_out(tmp.path()), &want, "before the restart");
    dev.stop();
    drop(dev);

    let dev = Dev::start(&data_dir, "5s");
    let status = dev.status();
    assert!(
        status["epoch"].as_u64().unwrap() > epoch,
        "epoch did not rise over {epoch}: {status:#}"
    );
    assert_modes(&status, &[("r1", "RW"), ("r2", "ERR"), ("r3", "RW")]);
    assert!(
        !data_dir.join("replicas").join("r2.pid").exists(),
        "the ERR replica r2 was started again"
    );
    // Every replica serves reads in turn; none of them may be r2.
    for i in 0..3 {
        assert_same_bytes(
            &nbdcopy_out(tmp.path()),
            &want,
            &format!("read {i} after the restart"),
        );
    }
    // Still writable, and r2 gets nothing.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x7c 40M 1M",
            "-c",
            "read -P 0x7c 40M 1M",
            NBD_URI,
        ],
    );
    want[40 * MIB..41 * MIB].fill(0x7c);
    assert_same_bytes(
        &nbdcopy_out(tmp.path()),
        &want,
        "after a write after the restart",
    );
    let status = dev.status();
    let r2 = replica_status(&status, "r2");
    assert_eq!(r2["reads"], 0, "r2 served reads: {status:#}");
    assert_eq!(r2["writes"], 0, "r2 took writes: {status:#}");
    assert_eq!(mode_of(&status, "r2"), "ERR");
    dev.assert_verified("r1 and r3 after the restart");
}

/// SIGKILLs replica `id` and waits until the engine's connection to it has seen it close
/// (the replica's socket can outlive its process for a moment, held by io_uring teardown).
fn kill_and_see_it_close(dev: &Dev, id: &str) {
    let addr = replica_status(&dev.status(), id)["addr"]
        .as_str()
        .expect("replica address")
        .to_owned();
    assert!(
        tcp_states_to(&addr).contains(&TCP_ESTABLISHED),
        "the engine has no connection to {id} at {addr}"
    );
    dev.kill_replica(id);
    wait_until(
        &format!("the connection to {id} ({addr}) to be closed by {id}"),
        Duration::from_secs(30),
        || !tcp_states_to(&addr).contains(&TCP_ESTABLISHED),
    );
}

/// A replica that dies while the volume is idle must be noticed when the next request goes
/// to it (its connection is closed), not only after `--io-timeout`.
#[test]
fn replica_dead_while_idle_does_not_stall_the_next_request() {
    if !enter_private_netns() || !have_tools(&["qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(&tmp.path().join("data"), "10s");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 64k", NBD_URI],
    );

    kill_and_see_it_close(&dev, "r2");
    let start = Instant::now();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x22 0 64k", NBD_URI],
    );
    let took = start.elapsed();
    assert_modes(&dev.status(), &[("r1", "RW"), ("r2", "ERR"), ("r3", "RW")]);
    assert!(
        took < Duration::from_secs(5),
        "a write after r2 died while idle took {took:?}: the engine waited for the 10 s I/O \
         timeout instead of failing r2's closed connection at once"
    );

    // Same for reads: r1 dies while idle; reads fall over to r3 without waiting.
    kill_and_see_it_close(&dev, "r1");
    for _ in 0..2 {
        let start = Instant::now();
        run_ok(
            "qemu-io",
            &["-f", "raw", "-c", "read -P 0x22 0 64k", NBD_URI],
        );
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "a read after r1 died took {took:?}"
        );
    }
    assert_modes(&dev.status(), &[("r1", "ERR"), ("r2", "ERR"), ("r3", "RW")]);
}
