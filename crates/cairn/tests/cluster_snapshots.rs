//! First-class snapshots end to end (`cairn dev` with meta and agents, in a private network
//! namespace): `cairn snapshot create|list|delete` under fio write+verify (every run must
//! verify), refusals (duplicate name, detached or unknown volume, bad name), deletes that
//! leave the volume byte-identical, the chain kept on a replica rebuilt on another node, and
//! 200 snapshots on one volume with every byte still read back correctly.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// `cairn snapshot create vol0 NAME --json`; checks the reply and returns the pause (µs).
fn snap(c: &Cluster, name: &str, labels: &[&str]) -> u64 {
    let mut args = vec!["snapshot", "create", "vol0", name, "--json"];
    for l in labels {
        args.extend(["--label", l]);
    }
    let v = c.json(&args);
    assert_eq!(v["name"], name, "{v:#}");
    assert_eq!(v["volume"], "vol0", "{v:#}");
    assert!(v["created_unix_ms"].as_u64().unwrap_or(0) > 0, "{v:#}");
    v["pause_us"]
        .as_u64()
        .unwrap_or_else(|| panic!("pause_us in {v:#}"))
}

/// `cairn snapshot list vol0 --json`, names in order.
fn listed(c: &Cluster) -> Vec<serde_json::Value> {
    c.json(&["snapshot", "list", "vol0", "--json"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn names(list: &[serde_json::Value]) -> Vec<String> {
    list.iter()
        .map(|s| s["name"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Every replica in the engine's status is RW and has `chain`.
fn assert_chains(c: &Cluster, chain: &[String], what: &str) {
    let st = c.status();
    let reps = st["replicas"].as_array().cloned().unwrap_or_default();
    assert_eq!(reps.len(), 3, "{what}: {st:#}");
    for r in &reps {
        assert_eq!(r["mode"], "RW", "{what}: {st:#}");
        assert_eq!(
            r["chain"],
            serde_json::json!(chain),
            "{what}: replica {}: {st:#}",
            r["id"]
        );
    }
}

#[test]
fn snapshots_under_fio_through_the_cli() {
    if !enter_private_netns() || !have_tools(&["fio"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(3).start(&tmp.path().join("data"));
    let mut rng = Rng::new(0x5a9);
    let want = random_bytes(&mut rng, (32 * MIB) as usize);
    write_vol0(0, &want);

    let fio = FioLoop::start("64M", "64M", "16k");
    wait_until("fio to write", Duration::from_secs(60), || {
        c.status()["replicas"][0]["writes"].as_u64().unwrap_or(0) > 100
    });
    let mut pauses = Vec::new();
    let mut made = Vec::new();
    for k in 0..12 {
        let name = format!("s{k}");
        pauses.push(snap(&c, &name, &[&format!("run={k}"), "app=test"]));
        made.push(name);
    }
    // Snapshots were taken while fio wrote: at least one run spanned them or followed.
    let runs_during = fio.runs();

    // Duplicate names are refused, whatever the volume; bad names before any call.
    refused(
        &["snapshot", "create", "vol0", "s3"],
        "snapshot s3 already exists (volume vol0)",
    );
    refused(&["snapshot", "create", "vol0", "Bad_Name"], "snapshot");
    refused(
        &["snapshot", "create", "vol0", "x", "--label", "novalue"],
        "KEY=VALUE",
    );
    refused(&["snapshot", "create", "nosuch", "x"], "no volume nosuch");

    let list = listed(&c);
    assert_eq!(names(&list), made, "{list:#?}");
    for (k, s) in list.iter().enumerate() {
        assert_eq!(s["recorded"], true, "{s:#}");
        assert_eq!(s["on_replicas"], true, "{s:#}");
        assert_eq!(s["labels"]["run"], k.to_string(), "{s:#}");
        assert_eq!(s["labels"]["app"], "test", "{s:#}");
    }
    // Deletes under load: every other one.
    for k in (0..12).step_by(2) {
        let name = format!("s{k}");
        let out = c.cli(&["snapshot", "delete", "vol0", &name]);
        assert!(out.contains("deleted"), "{out}");
        made.retain(|n| *n != name);
    }
    refused(&["snapshot", "delete", "vol0", "s0"], "no snapshot s0");
    let runs = fio.finish();
    assert!(
        runs >= 1 && runs >= runs_during,
        "fio finished runs ({runs})"
    );
    assert_eq!(names(&listed(&c)), made);
    assert_chains(&c, &made, "after the deletes");
    c.assert_verified("after snapshots under fio");
    assert_vol0(&want, "data written before the snapshots");
    let max = pauses.iter().max().copied().unwrap_or(0);
    println!("pauses (us): {pauses:?}");
    assert!(max < 2_000_000, "a snapshot held writes for {max} us");
    c.stop();
}

#[test]
fn snapshot_deletes_keep_the_data_and_detached_volumes_are_refused() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(3).start(&tmp.path().join("data"));
    let mut rng = Rng::new(0xde1);
    let mut want = random_bytes(&mut rng, (24 * MIB) as usize);
    write_vol0(0, &want);
    // Three layers, each overwriting part of the one below.
    for (k, (at, len)) in [(4 * MIB, 8 * MIB), (10 * MIB, 6 * MIB), (0, MIB)]
        .into_iter()
        .enumerate()
    {
        snap(&c, &format!("d{k}"), &[]);
        let data = random_bytes(&mut rng, len as usize);
        want[at as usize..(at + len) as usize].copy_from_slice(&data);
        write_vol0(at, &data);
    }
    assert_vol0(&want, "after three snapshots");
    // Deleting merges a layer: the content stays byte-identical.
    for name in ["d1", "d0", "d2"] {
        c.cli(&["snapshot", "delete", "vol0", name]);
        assert_vol0(&want, &format!("after deleting {name}"));
    }
    assert!(listed(&c).is_empty());
    assert_chains(&c, &[], "after every delete");
    c.assert_verified("after the deletes");

    // Detached: refused, nothing recorded; attached again: it works.
    snap(&c, "kept", &[]);
    c.cli(&["volume", "detach", "vol0"]);
    refused(
        &["snapshot", "create", "vol0", "late"],
        "volume vol0 is not attached; attach it to take a snapshot",
    );
    refused(&["snapshot", "delete", "vol0", "kept"], "is not attached");
    let l = listed(&c);
    assert_eq!(names(&l), ["kept"], "{l:#?}");
    assert_eq!(l[0]["on_replicas"], serde_json::Value::Null, "{l:#?}");
    c.cli(&[
        "volume",
        "create",
        "other",
        "--size",
        "64MiB",
        "--replicas",
        "1",
    ]);
    refused(
        &["snapshot", "create", "other", "o1"],
        "volume other is not attached; attach it to take a snapshot",
    );
    c.cli(&["volume", "attach", "vol0", "--node", "node-1"]);
    assert_vol0(&want, "after detach and attach");
    snap(&c, "late", &[]);
    refused(
        &["snapshot", "create", "vol0", "late"],
        "snapshot late already exists (volume vol0)",
    );
    assert_eq!(names(&listed(&c)), ["kept", "late"]);
    c.cli(&["snapshot", "delete", "vol0", "kept"]);
    c.cli(&["snapshot", "delete", "vol0", "late"]);
    assert_vol0(&want, "after the last deletes");
    c.assert_verified("at the end");
    c.stop();
}

#[test]
fn a_rebuilt_replica_has_the_same_chain() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(4).start(&tmp.path().join("data"));
    let mut rng = Rng::new(0xc4a1);
    let mut want = random_bytes(&mut rng, (16 * MIB) as usize);
    write_vol0(0, &want);
    let chain: Vec<String> = (0..3).map(|k| format!("c{k}")).collect();
    for (k, name) in chain.iter().enumerate() {
        snap(&c, name, &[&format!("k={k}")]);
        let at = (k as u64) * 4 * MIB;
        let data = random_bytes(&mut rng, (2 * MIB) as usize);
        want[at as usize..(at + 2 * MIB) as usize].copy_from_slice(&data);
        write_vol0(at, &data);
    }
    assert_chains(&c, &chain, "before the node dies");

    // A replica-holding node dies and stays down: its replica is replaced and rebuilt.
    let reps = c.replicas();
    let victim = live(&reps)
        .into_iter()
        .find(|r| s(r, "node") != "node-1")
        .map(|r| (s(r, "node").to_owned(), s(r, "name").to_owned()))
        .expect("a replica off node-1");
    let _lock = c.kill_agent_and_hold(&victim.0);
    wait_until(
        &format!(
            "{} on {} to be replaced and vol0 healthy",
            victim.1, victim.0
        ),
        Duration::from_secs(120),
        || {
            let reps = c.replicas();
            let l = live(&reps);
            l.len() == 3
                && l.iter()
                    .all(|r| s(r, "mode") == "rw" && s(r, "node") != victim.0)
                && s(&c.volume(), "state") == "healthy"
        },
    );
    wait_until(
        "the engine to see 3 RW replicas",
        Duration::from_secs(60),
        || {
            let st = c.status();
            let reps = st["replicas"].as_array().cloned().unwrap_or_default();
            reps.len() == 3 && reps.iter().all(|r| r["mode"] == "RW")
        },
    );
    let st = c.status();
    let rebuilt = st["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["rebuild"]["kind"] == "rebuild"))
        .unwrap_or_else(|| panic!("a rebuilt replica in {st:#}"));
    assert_eq!(rebuilt["rebuild"]["state"], "done", "{st:#}");
    assert_chains(&c, &chain, "after the rebuild");
    let l = listed(&c);
    assert_eq!(names(&l), chain, "{l:#?}");
    assert!(l.iter().all(|s| s["on_replicas"] == true), "{l:#?}");
    c.assert_verified("after the rebuild");
    assert_vol0(&want, "after the rebuild");
    // The rebuilt replica serves reads: delete a snapshot (merge) and read again.
    c.cli(&["snapshot", "delete", "vol0", "c1"]);
    assert_vol0(&want, "after deleting c1 on the rebuilt set");
    c.assert_verified("after the delete");
    c.stop();
}

#[test]
fn two_hundred_snapshots_on_one_volume() {
    if !enter_private_netns() {
        return;
    }
    const SNAPS: u64 = 200;
    const PIECE: u64 = 64 << 10;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(3).start(&tmp.path().join("data"));
    let mut rng = Rng::new(0x200);
    let mut want = random_bytes(&mut rng, (16 * MIB) as usize);
    write_vol0(0, &want);
    let mut nbd = NbdClient::connect(CLUSTER_NBD, "vol0");
    // Each layer holds one 64 KiB piece at a random place (some overwrite earlier ones).
    for k in 0..SNAPS {
        let at = rng.below(16 * MIB / PIECE) * PIECE;
        let data = random_bytes(&mut rng, PIECE as usize);
        nbd.write(at, &data).expect("write");
        want[at as usize..(at + PIECE) as usize].copy_from_slice(&data);
        snap(&c, &format!("n{k}"), &[]);
    }
    nbd.flush().expect("flush");
    drop(nbd);
    let l = listed(&c);
    assert_eq!(l.len() as u64, SNAPS);
    assert!(l
        .iter()
        .all(|s| s["recorded"] == true && s["on_replicas"] == true));
    assert_vol0(&want, &format!("after {SNAPS} snapshots"));
    c.assert_verified(&format!("after {SNAPS} snapshots"));
    // A few deletes in the middle of the chain merge layers; the content stays.
    for k in [0, 57, 123, SNAPS - 1] {
        c.cli(&["snapshot", "delete", "vol0", &format!("n{k}")]);
    }
    assert_vol0(&want, "after deleting four of the snapshots");
    assert_eq!(listed(&c).len() as u64, SNAPS - 4);
    c.stop();
}

#[test]
fn revert_only_while_detached_and_only_with_every_rw_replica() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(3).start(&tmp.path().join("data"));
    let mut rng = Rng::new(0x4e7);
    let at_r1 = random_bytes(&mut rng, (16 * MIB) as usize);
    write_vol0(0, &at_r1);
    snap(&c, "r1", &[]);
    let mut at_r2 = at_r1.clone();
    let b = random_bytes(&mut rng, (4 * MIB) as usize);
    at_r2[(2 * MIB) as usize..(6 * MIB) as usize].copy_from_slice(&b);
    write_vol0(2 * MIB, &b);
    snap(&c, "r2", &[]);
    let mut now = at_r2.clone();
    let head = random_bytes(&mut rng, (8 * MIB) as usize);
    now[(4 * MIB) as usize..(12 * MIB) as usize].copy_from_slice(&head);
    write_vol0(4 * MIB, &head);
    // Writes beyond the data so far must be dropped by a revert too.
    let tail = random_bytes(&mut rng, (2 * MIB) as usize);
    write_vol0(20 * MIB, &tail);

    refused(
        &["snapshot", "revert", "vol0", "r1"],
        "volume vol0 is attached to node node-1; detach it before reverting",
    );
    let mut expect = now.clone();
    expect.resize((22 * MIB) as usize, 0);
    expect[(20 * MIB) as usize..].copy_from_slice(&tail);
    assert_vol0(&expect, "after the refused revert");

    c.cli(&["volume", "detach", "vol0"]);
    refused(&["snapshot", "revert", "vol0", "nope"], "no snapshot nope");
    // An RW replica that cannot be reached: refused before anything changes.
    let lock = c.kill_agent_and_hold("node-3");
    refused(&["snapshot", "revert", "vol0", "r1"], "is unreachable");
    drop(lock);
    // The agent comes back (cairn dev restarts it); then the revert goes through.
    let mut last = None;
    wait_until(
        "a revert once node-3's agent is back",
        Duration::from_secs(60),
        || {
            let r = run_bounded(
                Command::new(cairn_bin()).args(["snapshot", "revert", "vol0", "r1"]),
                Duration::from_secs(60),
            );
            let ok = r.success();
            last = Some(r);
            ok
        },
    );
    let out = last.expect("ran");
    assert!(
        out.stdout.contains("volume vol0 reverted to snapshot r1"),
        "{out:?}"
    );
    c.cli(&["volume", "attach", "vol0", "--node", "node-1"]);
    let mut want = at_r1.clone();
    want.resize((22 * MIB) as usize, 0);
    assert_vol0(&want, "after the revert to r1");
    c.assert_verified("after the revert to r1");
    assert_eq!(
        names(&listed(&c)),
        ["r1", "r2"],
        "r2 is kept (on its own branch)"
    );

    // r2 is still there: reverting to it brings back its content.
    c.cli(&["volume", "detach", "vol0"]);
    c.cli(&["snapshot", "revert", "vol0", "r2"]);
    c.cli(&["volume", "attach", "vol0", "--node", "node-1"]);
    let mut want = at_r2.clone();
    want.resize((22 * MIB) as usize, 0);
    assert_vol0(&want, "after the revert to r2");
    c.assert_verified("after the revert to r2");
    c.stop();
}
