//! Backups, restores and clones through the `cairn` CLI end to end: `cairn dev` with meta
//! and 3 node agents in a private network namespace, s3s-fs as the S3 target (started in
//! the same namespace; `SKIP:` without it). Every byte read back is compared with a model:
//! full then incremental backups (the incremental uploads <= 2 % after a 1 % change), both
//! restored and verified, a delete that collects exactly the unreferenced blocks; a corrupt
//! and a missing block object named by a failed restore that leaves no volume; the S3 server
//! killed mid-backup (nothing listed, the retry succeeds); a snapshot taken under pipelined
//! writes restored and checked against the acknowledged writes; clones of a volume taking
//! writes, independent of it, and the refused clones.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
/// Backup block size (docs/backup.md).
const BLOCK: u64 = 2 * MIB;
const BUCKET: &str = "cairn-backups";
/// Bound of one CLI call.
const CLI_LIMIT: Duration = Duration::from_secs(180);

/// Enters the namespace and starts s3s-fs and a 3-node cluster of a `size` vol0; `None`
/// (after `SKIP:`) when either is impossible here.
fn setup(tmp: &Path, size: &str) -> Option<(S3Server, Cluster)> {
    if !enter_private_netns() {
        return None;
    }
    let s3 = S3Server::start(&tmp.join("s3"), BUCKET)?;
    let c = ClusterOpts::new(3).size(size).start(&tmp.join("data"));
    Some((s3, c))
}

/// `cairn ARGS` with the S3 settings in the environment, bounded.
fn run_env(s3: &S3Server, args: &[&str]) -> Run {
    let mut cmd = Command::new(cairn_bin());
    s3.env(&mut cmd).args(args);
    run_bounded(&mut cmd, CLI_LIMIT)
}

/// `cairn ARGS` (S3 settings in the environment); panics unless it exits 0.
fn ok_env(s3: &S3Server, args: &[&str]) -> String {
    let r = run_env(s3, args);
    r.expect_success(&format!("cairn {}", args.join(" ")));
    r.stdout
}

fn parse(out: &str, what: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {out}"))
}

/// `cairn backup list --target URL --json`: the backup names.
fn list_names(s3: &S3Server, url: &str) -> Vec<String> {
    let v = parse(
        &ok_env(s3, &["backup", "list", "--target", url, "--json"]),
        "backup list",
    );
    v.as_array()
        .unwrap_or_else(|| panic!("backup list: not an array: {v:#}"))
        .iter()
        .map(|b| b["name"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Block object files (`blocks/XX/<64 hex>`) under the target directory `dir`.
fn block_files(dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let Ok(subdirs) = std::fs::read_dir(dir.join("blocks")) else {
        return found;
    };
    for sub in subdirs.flatten() {
        for f in std::fs::read_dir(sub.path()).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                found.insert(name);
            }
        }
    }
    found
}

/// Manifest `name` as stored in the target directory `dir`.
fn manifest(dir: &Path, name: &str) -> serde_json::Value {
    let p = dir.join("manifests").join(format!("{name}.json"));
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    parse(&text, "manifest")
}

/// The `(index, hash)` entries of a manifest.
fn manifest_blocks(m: &serde_json::Value) -> Vec<(u64, String)> {
    m["blocks"]
        .as_array()
        .unwrap_or_else(|| panic!("no blocks in {m:#}"))
        .iter()
        .map(|b| {
            (
                b["index"].as_u64().expect("index"),
                b["hash"].as_str().expect("hash").to_owned(),
            )
        })
        .collect()
}

/// The file of block object `hash` under the target directory `dir`.
fn block_file(dir: &Path, hash: &str) -> PathBuf {
    dir.join("blocks").join(&hash[..2]).join(hash)
}

/// Attaches `vol` to `node`; returns its NBD address.
fn attach(c: &Cluster, vol: &str, node: &str) -> String {
    let uri = c.cli(&["volume", "attach", vol, "--node", node]);
    let addr = uri
        .trim()
        .strip_prefix("nbd://")
        .and_then(|u| u.strip_suffix(&format!("/{vol}")))
        .unwrap_or_else(|| panic!("attach {vol}: unexpected output {uri:?}"));
    addr.to_owned()
}

/// Reads `len` bytes of export `vol` at `addr` from offset 0, 4 MiB reads, 8 in flight.
fn read_volume(addr: &str, vol: &str, len: u64) -> Vec<u8> {
    const PIECE: u64 = 4 * MIB;
    let mut nbd = NbdClient::connect(addr, vol);
    assert!(nbd.size >= len, "{vol}: export size {} < {len}", nbd.size);
    let mut out = vec![0u8; len as usize];
    let mut at_of = HashMap::new();
    let mut next = 0u64;
    while next < len || nbd.in_flight() > 0 {
        while next < len && nbd.in_flight() < 8 {
            let n = PIECE.min(len - next);
            at_of.insert(nbd.send_read(next, n as u32), next);
            next += n;
        }
        let r = nbd.recv();
        let at = at_of.remove(&r.cookie).expect("a reply to a read we sent");
        let data = r
            .data
            .unwrap_or_else(|| panic!("{vol}: read at {at}: NBD error {}", r.error));
        out[at as usize..at as usize + data.len()].copy_from_slice(&data);
    }
    out
}

/// Writes `data` at `offset` of export `vol` at `addr`, then flushes.
fn write_volume(addr: &str, vol: &str, offset: u64, data: &[u8]) {
    let mut nbd = NbdClient::connect(addr, vol);
    for (k, piece) in data.chunks(4 << 20).enumerate() {
        let at = offset + (k as u64) * (4 << 20);
        nbd.write(at, piece)
            .unwrap_or_else(|e| panic!("{vol}: write at {at}: NBD error {e}"));
    }
    nbd.flush().expect("flush");
}

/// Attaches `vol` to `node`, compares its whole content with `want`, checks its replicas
/// are identical, detaches it.
fn check_volume(c: &Cluster, vol: &str, node: &str, want: &[u8], what: &str) {
    let addr = attach(c, vol, node);
    let got = read_volume(&addr, vol, want.len() as u64);
    assert_same_bytes(&got, want, what);
    assert_verified(vol, what);
    c.cli(&["volume", "detach", vol]);
}

/// `cairn volume verify VOL` exits 0.
fn assert_verified(vol: &str, what: &str) {
    let r = run_bounded(
        Command::new(cairn_bin()).args(["volume", "verify", vol]),
        CLI_LIMIT,
    );
    assert!(
        r.success(),
        "{what}: cairn volume verify {vol}: {:?}\n{}{}",
        r.status,
        r.stdout,
        r.stderr
    );
}

/// True when meta has a volume `vol` (`cairn volume get` exits 0; 1 means no such volume).
fn volume_exists(vol: &str) -> bool {
    let r = run_bounded(
        Command::new(cairn_bin()).args(["volume", "get", vol, "--json"]),
        CLI_LIMIT,
    );
    match r.status.and_then(|s| s.code()) {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("cairn volume get {vol}: {r:?}"),
    }
}

/// `data` written into `model` at `at`.
fn put(model: &mut [u8], at: u64, data: &[u8]) {
    model[at as usize..at as usize + data.len()].copy_from_slice(data);
}

#[test]
fn full_then_incremental_backup_restore_and_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((s3, c)) = setup(tmp.path(), "256MiB") else {
        return;
    };
    let size = 256 * MIB;
    let prefix = "cl/vol0";
    let url = s3.url(prefix);
    let dir = s3.dir(prefix);
    let mut rng = Rng::new(0xb1);
    // 96 MiB of random data in two ranges; the rest never written (holes).
    let mut model = vec![0u8; size as usize];
    for (at, len) in [(0, 64 * MIB), (128 * MIB, 32 * MIB)] {
        let data = random_bytes(&mut rng, len as usize);
        write_vol0(at, &data);
        put(&mut model, at, &data);
    }
    let at_s1 = model.clone();
    c.cli(&["snapshot", "create", "vol0", "s1"]);

    // Full backup, settings from the environment.
    let t = Instant::now();
    let b1 = parse(
        &ok_env(
            &s3,
            &[
                "backup", "create", "vol0", "--snapshot", "s1", "--target", &url, "--json",
            ],
        ),
        "backup create s1",
    );
    println!("full backup ({:?}): {b1}", t.elapsed());
    assert_eq!(b1["name"], "vol0-s1", "{b1:#}");
    assert_eq!(b1["volume"], "vol0", "{b1:#}");
    assert_eq!(b1["snapshot"], "s1", "{b1:#}");
    assert_eq!(b1["parent"], serde_json::Value::Null, "{b1:#}");
    assert_eq!(b1["blocks_new"], 48, "96 MiB of random data: {b1:#}");
    assert!(
        b1["bytes_uploaded"].as_u64().unwrap_or(0) >= 96 * MIB,
        "{b1:#}"
    );
    let m1 = manifest(&dir, "vol0-s1");
    assert_eq!(manifest_blocks(&m1).len(), 48, "{m1:#}");
    assert_eq!(block_files(&dir).len(), 48);

    // Change 1 % of the volume inside two 2 MiB blocks (5 and 6).
    let change_at = 11 * MIB;
    let change = random_bytes(&mut rng, (size / 100).next_multiple_of(4096) as usize);
    assert!(change_at / BLOCK == 5 && (change_at + change.len() as u64 - 1) / BLOCK == 6);
    write_vol0(change_at, &change);
    put(&mut model, change_at, &change);
    let at_s2 = model.clone();
    c.cli(&["snapshot", "create", "vol0", "s2"]);

    // Incremental backup, settings from a config file.
    let cfg = tmp.path().join("target.toml");
    s3.write_config(&cfg);
    let r = run_bounded(
        Command::new(cairn_bin()).args([
            "backup",
            "create",
            "vol0",
            "--snapshot",
            "s2",
            "--target",
            &url,
            "--target-config",
            &cfg.display().to_string(),
            "--json",
        ]),
        CLI_LIMIT,
    );
    r.expect_success("incremental backup with --target-config");
    let b2 = parse(&r.stdout, "backup create s2");
    let uploaded = b2["bytes_uploaded"].as_u64().expect("bytes_uploaded");
    let ratio = uploaded as f64 / size as f64;
    println!(
        "incremental backup: {uploaded} bytes uploaded = {:.2} % of the volume: {b2}",
        ratio * 100.0
    );
    assert_eq!(b2["name"], "vol0-s2", "{b2:#}");
    assert_eq!(b2["parent"], "vol0-s1", "{b2:#}");
    assert!(uploaded <= size / 50, "more than 2 % uploaded: {b2:#}");
    assert_eq!(b2["blocks_new"], 2, "{b2:#}");
    let m2 = manifest(&dir, "vol0-s2");
    assert_eq!(m2["parent"], "vol0-s1", "{m2:#}");
    assert_eq!(block_files(&dir).len(), 50);

    let listed = parse(
        &ok_env(&s3, &["backup", "list", "--target", &url, "--json"]),
        "backup list",
    );
    let names: BTreeSet<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|b| b["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, BTreeSet::from(["vol0-s1", "vol0-s2"]), "{listed:#}");
    for b in listed.as_array().expect("array") {
        assert_eq!(b["size"], size, "{b:#}");
        assert_eq!(b["volume"], "vol0", "{b:#}");
    }

    // Restore each (settings as flags) and compare with the model at its snapshot.
    for (name, to, node, want) in [
        ("vol0-s1", "r1", "node-2", &at_s1),
        ("vol0-s2", "r2", "node-3", &at_s2),
    ] {
        let mut args = vec!["backup", "restore", name, "--target", &url, "--to", to];
        let flags = s3.flags();
        args.extend(flags.iter().map(String::as_str));
        let t = Instant::now();
        let r = run_bounded(Command::new(cairn_bin()).args(&args), CLI_LIMIT);
        r.expect_success(&format!("restore {name} with flags"));
        println!("restore {name} -> {to} ({:?}): {}", t.elapsed(), r.stdout.trim());
        check_volume(&c, to, node, want, &format!("{to} restored from {name}"));
    }

    // Delete the first backup: only the second is listed and its blocks are exactly those
    // left.
    let gc = parse(
        &ok_env(
            &s3,
            &["backup", "delete", "vol0-s1", "--target", &url, "--json"],
        ),
        "backup delete",
    );
    println!("delete vol0-s1: {gc}");
    assert_eq!(list_names(&s3, &url), ["vol0-s2"]);
    let referenced: BTreeSet<String> = manifest_blocks(&m2).into_iter().map(|(_, h)| h).collect();
    assert_eq!(referenced.len(), 48);
    assert_eq!(
        block_files(&dir),
        referenced,
        "block objects left after the delete"
    );
    assert!(!dir.join("manifests/vol0-s1.json").exists());
    ok_env(
        &s3,
        &["backup", "restore", "vol0-s2", "--target", &url, "--to", "r3"],
    );
    check_volume(&c, "r3", "node-1", &at_s2, "r3 restored after the delete");
}
