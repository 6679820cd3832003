//! Online volume expansion end to end (`cairn dev` with meta and 4 agents, in a private
//! network namespace): `cairn volume expand` of an attached volume grows every replica, the
//! engine and the NBD export while it serves; a new NBD connection sees the new size (an
//! open one keeps its old size and is refused past it); old data reads back byte for byte,
//! new space reads zeros, writes past the old end read back; the replicas stay identical;
//! a replica rebuilt after a node loss gets the grown size; a detached volume's replicas grow
//! at its next attach; shrinking, bad sizes and unknown volumes are refused with exit 1 and
//! the current size is a no-op. Also `volume create --stale-replica-timeout` bounds.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
/// ENOSPC: what the NBD server answers for a write past the export's end.
const ENOSPC: u32 = 28;

/// Reads `len` bytes of `export` at `offset` through a new NBD connection to `addr`.
fn read_range(addr: &str, export: &str, offset: u64, len: u64) -> Vec<u8> {
    let mut nbd = NbdClient::connect(addr, export);
    let mut out = Vec::with_capacity(len as usize);
    let mut at = offset;
    while at < offset + len {
        let n = (4 * MIB).min(offset + len - at) as u32;
        out.extend(
            nbd.read(at, n)
                .unwrap_or_else(|e| panic!("read {export} at {at}: NBD error {e}")),
        );
        at += u64::from(n);
    }
    out
}

/// Writes `data` to `export` at `offset` through a new NBD connection, then flushes.
fn write_range(addr: &str, export: &str, offset: u64, data: &[u8]) {
    let mut nbd = NbdClient::connect(addr, export);
    for (k, piece) in data.chunks(4 << 20).enumerate() {
        let at = offset + (k as u64) * (4 << 20);
        nbd.write(at, piece)
            .unwrap_or_else(|e| panic!("write {export} at {at}: NBD error {e}"));
    }
    nbd.flush().expect("flush");
}

/// `cairn volume verify VOLUME [--endpoint E]`: exit 0, and every RW replica listed with
/// `size` bytes; returns how many replicas it compared.
fn assert_verified_at_size(volume: &str, endpoint: Option<&str>, size: u64, what: &str) -> usize {
    let mut args = vec!["volume", "verify", volume];
    if let Some(e) = endpoint {
        args.extend(["--endpoint", e]);
    }
    let r = run_bounded(
        Command::new(cairn_bin()).args(&args),
        Duration::from_secs(300),
    );
    assert!(r.success(), "{what}: cairn volume verify: {r:?}");
    let sizes: Vec<u64> = r
        .stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| f[2].parse().ok()).flatten()
        })
        .collect();
    assert!(!sizes.is_empty(), "{what}: no replica listed: {r:?}");
    assert!(
        sizes.iter().all(|s| *s == size),
        "{what}: replica sizes {sizes:?}, want {size}: {r:?}"
    );
    sizes.len()
}

/// `cairn volume expand VOLUME --size SIZE --json`: its reported size.
fn expand(c: &Cluster, volume: &str, size: &str) -> u64 {
    let v = c.json(&["volume", "expand", volume, "--size", size, "--json"]);
    assert_eq!(v["name"], volume, "{v:#}");
    v["size_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("size_bytes in {v:#}"))
}

#[test]
fn expand_online_through_the_cli() {
    if !enter_private_netns() {
        return;
    }
    let old = 64 * MIB;
    let new = 160 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(4)
        .size("64MiB")
        .start(&tmp.path().join("data"));
    let mut rng = Rng::new(0xe4a);
    let want = random_bytes(&mut rng, old as usize);
    write_vol0(0, &want);

    // A connection open across the expansion keeps its size: the protocol cannot change it.
    let mut open = NbdClient::connect(CLUSTER_NBD, "vol0");
    assert_eq!(open.size, old);
    let version = c.volume()["version"].as_u64().unwrap();

    assert_eq!(expand(&c, "vol0", "160MiB"), new);
    // `expand` returned once the engine served the new size: a new connection sees it.
    assert_eq!(c.status()["size"], new, "{:#}", c.status());
    assert_eq!(c.volume()["size_bytes"], new);
    assert_eq!(NbdClient::connect(CLUSTER_NBD, "vol0").size, new);
    if have_tool("nbdinfo") {
        let r = run_ok("nbdinfo", &["--size", "nbd://127.0.0.1:10809/vol0"]);
        assert_eq!(r.stdout.trim(), new.to_string(), "nbdinfo --size: {r:?}");
    }
    assert_eq!(
        open.write(old, &vec![1u8; 4096]),
        Err(ENOSPC),
        "past the old end on a connection opened before the expansion"
    );
    open.write(old - 4096, &want[(old - 4096) as usize..])
        .expect("inside the old end on the old connection");
    open.flush().expect("flush on the old connection");
    drop(open);

    // Old data byte for byte, new space zeros.
    assert_vol0(&want, "data written before the expansion");
    assert!(
        all_zero(&read_range(CLUSTER_NBD, "vol0", old, new - old)),
        "new space reads zeros"
    );
    // Writes across the old end and at the new end read back.
    let across = random_bytes(&mut rng, (8 * MIB) as usize);
    write_range(CLUSTER_NBD, "vol0", old - 4 * MIB, &across);
    let tail = random_bytes(&mut rng, (4 * MIB) as usize);
    write_range(CLUSTER_NBD, "vol0", new - 4 * MIB, &tail);
    let mut model = want.clone();
    model.resize(new as usize, 0);
    model[(old - 4 * MIB) as usize..(old + 4 * MIB) as usize].copy_from_slice(&across);
    model[(new - 4 * MIB) as usize..].copy_from_slice(&tail);
    assert_same_bytes(
        &read_range(CLUSTER_NBD, "vol0", 0, new),
        &model,
        "the whole grown volume",
    );
    assert_eq!(
        assert_verified_at_size("vol0", None, new, "after the expansion"),
        3
    );

    // The same size again: success, record untouched. Smaller, misaligned, unknown: refused.
    let grown_version = c.volume()["version"].as_u64().unwrap();
    assert!(grown_version > version);
    assert_eq!(expand(&c, "vol0", "160MiB"), new);
    assert_eq!(c.volume()["version"].as_u64().unwrap(), grown_version);
    refused(
        &["volume", "expand", "vol0", "--size", "64MiB"],
        "cannot shrink",
    );
    refused(
        &["volume", "expand", "vol0", "--size", "167776257"],
        "not a multiple of 4096",
    );
    refused(
        &["volume", "expand", "vol0", "--size", "17TiB"],
        "exceeds the largest volume",
    );
    refused(
        &["volume", "expand", "nope", "--size", "1GiB"],
        "volume nope not found",
    );
    assert_eq!(c.volume()["size_bytes"], new);

    // A replica lost with its node is rebuilt elsewhere at the grown size.
    let reps = c.replicas();
    let lost = live(&reps)
        .into_iter()
        .find(|r| s(r, "node") != "node-1")
        .expect("a replica off node-1")
        .clone();
    let (victim, old_replica) = (s(&lost, "node").to_owned(), s(&lost, "name").to_owned());
    let lock = c.kill_agent_and_hold(&victim);
    wait_until(
        "the lost replica to be replaced and rebuilt",
        Duration::from_secs(180),
        || {
            let reps = c.replicas();
            let l = live(&reps);
            reps.iter()
                .any(|r| s(r, "name") == old_replica && r["deleted"] == true)
                && l.len() == 3
                && l.iter()
                    .all(|r| s(r, "mode") == "rw" && s(r, "node") != victim)
        },
    );
    assert_eq!(
        assert_verified_at_size("vol0", None, new, "after the rebuild"),
        3
    );
    assert_same_bytes(
        &read_range(CLUSTER_NBD, "vol0", 0, new),
        &model,
        "the grown volume after the rebuild",
    );
    drop(lock);
    c.stop();
}

#[test]
fn detached_volume_grows_at_its_next_attach() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(3).start(&tmp.path().join("data"));
    let (old, new) = (16 * MIB, 48 * MIB);
    c.cli(&[
        "volume",
        "create",
        "vol1",
        "--size",
        "16MiB",
        "--replicas",
        "3",
    ]);
    let uri = c.cli(&["volume", "attach", "vol1", "--node", "node-2"]);
    let addr = uri
        .trim()
        .strip_prefix("nbd://")
        .and_then(|u| u.strip_suffix("/vol1"))
        .unwrap_or_else(|| panic!("attach printed {uri:?}"))
        .to_owned();
    let endpoint = c
        .nodes()
        .iter()
        .find(|n| s(n, "name") == "node-2")
        .map(|n| s(n, "control_address").to_owned())
        .expect("node-2");
    let mut rng = Rng::new(0xd7);
    let want = random_bytes(&mut rng, old as usize);
    write_range(&addr, "vol1", 0, &want);
    c.cli(&["volume", "detach", "vol1"]);
    wait_until("vol1's export to go", Duration::from_secs(60), || {
        let r = run_bounded(
            Command::new(cairn_bin()).args(["volume", "status", "vol1", "--endpoint", &endpoint]),
            Duration::from_secs(10),
        );
        !r.success()
    });

    // Detached: only the record changes; the replicas grow when an engine starts.
    assert_eq!(expand(&c, "vol1", "48MiB"), new);
    assert_eq!(
        c.json(&["volume", "get", "vol1", "--json"])["size_bytes"],
        new
    );
    c.cli(&["volume", "attach", "vol1", "--node", "node-2"]);
    let st = c.json(&[
        "volume",
        "status",
        "vol1",
        "--json",
        "--endpoint",
        &endpoint,
    ]);
    assert_eq!(st["size"], new, "{st:#}");
    assert!(
        st["replicas"]
            .as_array()
            .is_some_and(|r| r.len() == 3 && r.iter().all(|r| r["mode"] == "RW")),
        "every replica grown and RW: {st:#}"
    );
    assert_eq!(NbdClient::connect(&addr, "vol1").size, new);
    assert_same_bytes(
        &read_range(&addr, "vol1", 0, old),
        &want,
        "vol1 after the attach",
    );
    assert!(all_zero(&read_range(&addr, "vol1", old, new - old)));
    let tail = random_bytes(&mut rng, (2 * MIB) as usize);
    write_range(&addr, "vol1", new - 2 * MIB, &tail);
    assert_same_bytes(
        &read_range(&addr, "vol1", new - 2 * MIB, 2 * MIB),
        &tail,
        "written past the old end",
    );
    assert_eq!(
        assert_verified_at_size("vol1", Some(&endpoint), new, "vol1"),
        3
    );

    // The per-volume stale replica timeout: bounds checked before any call, then stored.
    refused(
        &[
            "volume",
            "create",
            "vol2",
            "--size",
            "1MiB",
            "--stale-replica-timeout",
            "500ms",
        ],
        "--stale-replica-timeout",
    );
    refused(
        &[
            "volume",
            "create",
            "vol2",
            "--size",
            "1MiB",
            "--stale-replica-timeout",
            "400days",
        ],
        "365 days",
    );
    c.cli(&[
        "volume",
        "create",
        "vol2",
        "--size",
        "1MiB",
        "--stale-replica-timeout",
        "90s",
    ]);
    c.stop();
}
