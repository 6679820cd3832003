//! Engine crash: `cairn dev` is SIGKILLed while fio writes (its replica servers die with it);
//! the restarted engine resyncs the regions the replicas' dirty logs mark, so every RW replica
//! ends byte-identical.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Waits until fio (writing through `dev`) has had 2000 more writes acknowledged, then
/// SIGKILLs `cairn dev` and waits for its replica servers to die with it.
fn kill_engine_mid_write(dev: Dev, fio: Proc) {
    let writes = |dev: &Dev| {
        replica_status(&dev.status(), "r1")["writes"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = writes(&dev);
    wait_until(
        "fio to have written 2000 times",
        Duration::from_secs(60),
        || writes(&dev) > before + 2000,
    );
    let replicas = children_of(dev.pid());
    send_signal(dev.pid(), libc::SIGKILL);
    for pid in replicas {
        wait_until(
            &format!("replica server {pid} to die with cairn dev"),
            Duration::from_secs(10),
            || !proc_alive(pid),
        );
    }
    drop(dev);
    drop(fio);
}

#[test]
fn engine_killed_mid_write_restarts_with_identical_replicas() {
    if !enter_private_netns() || !have_tools(&["fio"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    for round in 0..3u32 {
        let dev = Dev::start(&dir, "5s");
        if round > 0 {
            let status = dev.status();
            assert!(
                status["resynced_regions"].as_u64().unwrap_or(0) > 0,
                "round {round}: the restarted engine resynced nothing: {status}"
            );
            for id in ["r1", "r2", "r3"] {
                assert_eq!(mode_of(&status, id), "RW", "round {round}: {status}");
            }
            dev.assert_verified(&format!("replicas after engine crash {round}"));
        }
        let fio = Proc::spawn(
            Command::new("fio").args([
                "--name=crash",
                "--ioengine=nbd",
                &format!("--uri={NBD_URI}"),
                "--rw=randwrite",
                "--bsrange=4k-64k",
                "--size=128M",
                "--iodepth=32",
                "--time_based",
                "--runtime=60",
                &format!("--randseed={}", round + 1),
            ]),
            "fio writing while the engine is killed",
        );
        kill_engine_mid_write(dev, fio);
    }
    let dev = Dev::start(&dir, "5s");
    dev.assert_verified("replicas after the last engine crash");
}

/// What a restarted engine copies is bounded by the writes of the last flush intervals, not
/// by the volume: after the whole volume was written and the engine's background flushes
/// cleared the replicas' dirty logs, the engine is killed during writes confined to 16 MiB,
/// and the restart copies at most those 16 regions of 1 MiB (of 256).
#[test]
fn crash_resync_is_bounded_by_the_writes_in_flight() {
    if !enter_private_netns() || !have_tools(&["fio"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let dev = DevOpts::new("5s")
        .arg("--flush-interval")
        .arg("500ms")
        .start(&dir);
    run_bounded(
        Command::new("fio").args([
            "--name=fill",
            "--ioengine=nbd",
            &format!("--uri={NBD_URI}"),
            "--rw=write",
            "--bs=1M",
            "--size=256M",
            "--iodepth=8",
        ]),
        Duration::from_secs(300),
    )
    .expect_success("fio filling the volume");
    // Two background flushes after the last write clear every mark.
    wait_until(
        "the background flushes to settle after the fill",
        Duration::from_secs(60),
        || dev.status()["flushes_settled"] == true,
    );
    let fio = Proc::spawn(
        Command::new("fio").args([
            "--name=burst",
            "--ioengine=nbd",
            &format!("--uri={NBD_URI}"),
            "--rw=randwrite",
            "--bs=4k",
            "--offset=64M",
            "--size=16M",
            "--iodepth=32",
            "--time_based",
            "--runtime=60",
        ]),
        "fio writing 16 MiB while the engine is killed",
    );
    kill_engine_mid_write(dev, fio);

    let dev = Dev::start(&dir, "5s");
    let status = dev.status();
    let regions = status["resynced_regions"].as_u64().unwrap();
    let bytes = status["resynced_bytes"].as_u64().unwrap();
    assert!(
        (1..=16).contains(&regions),
        "the restart copied {regions} regions; writes in flight covered 16 of 256: {status:#}"
    );
    eprintln!("bounded crash resync: {regions} regions of 1 MiB, {bytes} bytes copied");
    // Each of the two other replicas gets at most the 16 regions.
    assert!(bytes <= 2 * (16 << 20), "copied {bytes} bytes: {status:#}");
    for id in ["r1", "r2", "r3"] {
        assert_eq!(mode_of(&status, id), "RW", "{status:#}");
    }
    dev.assert_verified("replicas after the bounded resync");
}
