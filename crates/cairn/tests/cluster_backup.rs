//! Backups, restores and clones through the `cairn` CLI end to end: `cairn dev` with meta
//! and 3 node agents in a private network namespace, s3s-fs as the S3 target (started in
//! the same namespace; `SKIP:` without it). Every byte read back is compared with a model:
//! full then incremental backups (the incremental uploads <= 2 % after a 1 % change), both
//! restored and verified, a delete that collects exactly the unreferenced blocks; a corrupt
//! and a missing block object named by a failed restore that leaves no volume; the S3 server
//! killed mid-backup (nothing listed, the retry succeeds); a snapshot taken under pipelined
//! writes restored and checked against the acknowledged writes (exactly, block by block, and
//! with fio's read verify on a second region); clones of a volume taking writes, independent
//! of it, and the refused clones.

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
        for f in std::fs::read_dir(sub.path())
            .into_iter()
            .flatten()
            .flatten()
        {
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
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
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

/// `cairn ARGS` must exit 1 with every one of `why` on stderr; returns stderr.
fn refused(args: &[&str], why: &[&str]) -> String {
    let r = run_bounded(Command::new(cairn_bin()).args(args), CLI_LIMIT);
    println!(
        "refused as expected: cairn {}: {}",
        args.join(" "),
        r.stderr.trim()
    );
    assert_eq!(
        r.status.and_then(|s| s.code()),
        Some(1),
        "cairn {}: exit 1 expected: {r:?}",
        args.join(" ")
    );
    for w in why {
        assert!(
            r.stderr.contains(w),
            "cairn {}: stderr should say {w:?}: {r:?}",
            args.join(" ")
        );
    }
    r.stderr
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
                "backup",
                "create",
                "vol0",
                "--snapshot",
                "s1",
                "--target",
                &url,
                "--json",
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
        println!(
            "restore {name} -> {to} ({:?}): {}",
            t.elapsed(),
            r.stdout.trim()
        );
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
        &[
            "backup", "restore", "vol0-s2", "--target", &url, "--to", "r3",
        ],
    );
    check_volume(&c, "r3", "node-1", &at_s2, "r3 restored after the delete");
}

#[test]
fn a_corrupt_or_missing_block_fails_the_restore_and_leaves_no_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((s3, c)) = setup(tmp.path(), "256MiB") else {
        return;
    };
    let prefix = "corrupt";
    let url = s3.url(prefix);
    let dir = s3.dir(prefix);
    let mut rng = Rng::new(0xc0);
    let mut model = vec![0u8; (256 * MIB) as usize];
    for (at, len) in [(0, 16 * MIB), (100 * MIB, 8 * MIB)] {
        let data = random_bytes(&mut rng, len as usize);
        write_vol0(at, &data);
        put(&mut model, at, &data);
    }
    c.cli(&["snapshot", "create", "vol0", "k1"]);
    ok_env(
        &s3,
        &[
            "backup",
            "create",
            "vol0",
            "--snapshot",
            "k1",
            "--target",
            &url,
        ],
    );
    let blocks = manifest_blocks(&manifest(&dir, "vol0-k1"));
    assert_eq!(blocks.len(), 12, "{blocks:?}");

    // One byte flipped in the middle of a block object.
    let (idx, hash) = blocks[9].clone();
    let file = block_file(&dir, &hash);
    let good = std::fs::read(&file).expect("read the block object");
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(&file, &bad).expect("corrupt the block object");
    let r = run_env(
        &s3,
        &[
            "backup", "restore", "vol0-k1", "--target", &url, "--to", "bad",
        ],
    );
    println!(
        "restore of a corrupt block: {:?}: {}",
        r.status,
        r.stderr.trim()
    );
    assert!(
        r.status.is_some_and(|s| !s.success()),
        "a restore with a corrupt block must fail: {r:?}"
    );
    let key = format!("{prefix}/blocks/{}/{hash}", &hash[..2]);
    for want in [format!("corrupt block {idx}"), key.clone()] {
        assert!(
            r.stderr.contains(&want),
            "stderr should name {want:?}: {r:?}"
        );
    }
    assert!(!volume_exists("bad"), "the failed restore left volume bad");

    // The object restored, another one removed.
    std::fs::write(&file, &good).expect("repair the block object");
    let (idx2, hash2) = blocks[2].clone();
    let file2 = block_file(&dir, &hash2);
    let kept = std::fs::read(&file2).expect("read the block object");
    std::fs::remove_file(&file2).expect("remove the block object");
    let r = run_env(
        &s3,
        &[
            "backup", "restore", "vol0-k1", "--target", &url, "--to", "bad",
        ],
    );
    println!(
        "restore of a missing block: {:?}: {}",
        r.status,
        r.stderr.trim()
    );
    assert!(
        r.status.is_some_and(|s| !s.success()),
        "a restore with a missing block must fail: {r:?}"
    );
    let key2 = format!("{prefix}/blocks/{}/{hash2}", &hash2[..2]);
    for want in [format!("missing block {idx2}"), key2] {
        assert!(
            r.stderr.contains(&want),
            "stderr should name {want:?}: {r:?}"
        );
    }
    assert!(!volume_exists("bad"), "the failed restore left volume bad");

    // Repaired: the same restore goes through and the name is free again.
    std::fs::write(&file2, &kept).expect("put the block object back");
    ok_env(
        &s3,
        &[
            "backup", "restore", "vol0-k1", "--target", &url, "--to", "bad",
        ],
    );
    check_volume(&c, "bad", "node-2", &model, "restored after the repair");
}

#[test]
fn s3_killed_mid_backup_fails_cleanly_and_the_retry_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((mut s3, c)) = setup(tmp.path(), "512MiB") else {
        return;
    };
    let size = 512 * MIB;
    let prefix = "killed";
    let url = s3.url(prefix);
    let dir = s3.dir(prefix);
    let mut rng = Rng::new(0x511);
    let mut model = vec![0u8; size as usize];
    let data = random_bytes(&mut rng, (384 * MIB) as usize);
    write_vol0(64 * MIB, &data);
    put(&mut model, 64 * MIB, &data);
    drop(data);
    c.cli(&["snapshot", "create", "vol0", "big"]);

    let args = [
        "backup",
        "create",
        "vol0",
        "--snapshot",
        "big",
        "--target",
        &url,
        "--name",
        "big-1",
        "--concurrency",
        "2",
        "--json",
    ];
    let mut cmd = Command::new(cairn_bin());
    s3.env(&mut cmd).args(args);
    let mut backup = Proc::spawn(&mut cmd, "backup create big-1");
    wait_until(
        "a first block object in the target",
        Duration::from_secs(60),
        || {
            assert!(
                !backup.exited(),
                "the backup ended before the server was killed"
            );
            !block_files(&dir).is_empty()
        },
    );
    s3.kill();
    let killed = Instant::now();
    let stored = block_files(&dir).len();
    let r = backup.finish(Duration::from_secs(120));
    println!(
        "backup after the kill ({stored} blocks stored): {:?} {:?} after the kill: {}",
        r.status,
        killed.elapsed(),
        r.stderr.trim()
    );
    assert!(r.status.is_some(), "the backup hung after the server died");
    assert!(
        r.status.is_some_and(|s| !s.success()),
        "the backup succeeded with its server killed: {r:?}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(60),
        "the backup took {:?} to fail",
        killed.elapsed()
    );
    assert!(!r.stderr.trim().is_empty(), "no error message: {r:?}");
    assert!(
        stored < (384 * MIB / BLOCK) as usize,
        "every block was stored before the kill ({stored})"
    );
    assert!(
        !dir.join("manifests/big-1.json").exists(),
        "a failed backup wrote its manifest"
    );

    s3.restart();
    assert!(
        !list_names(&s3, &url).contains(&"big-1".to_owned()),
        "the failed backup is listed"
    );
    let t = Instant::now();
    let retry = parse(&ok_env(&s3, &args), "retried backup");
    println!("retry ({:?}): {retry}", t.elapsed());
    assert_eq!(retry["name"], "big-1", "{retry:#}");
    assert_eq!(
        retry["blocks_new"].as_u64().unwrap_or(0) + retry["blocks_reused"].as_u64().unwrap_or(0),
        384 * MIB / BLOCK,
        "{retry:#}"
    );
    assert_eq!(list_names(&s3, &url), ["big-1"]);
    assert_eq!(
        manifest_blocks(&manifest(&dir, "big-1")).len() as u64,
        384 * MIB / BLOCK
    );
    ok_env(
        &s3,
        &[
            "backup", "restore", "big-1", "--target", &url, "--to", "big-copy",
        ],
    );
    check_volume(&c, "big-copy", "node-2", &model, "restored after the retry");
}

/// A writer of 4 KiB blocks on one pipelined NBD connection to vol0 (writes to
/// `blocks` blocks from 0); each block written by write `seq` holds
/// `fill_block(seq, block)`, which names both and is a checksum of itself. No two writes
/// to one block are in flight at once, so a block's acknowledged writes are in order.
struct Writer {
    stop: Arc<AtomicBool>,
    track: Arc<Mutex<Track>>,
    thread: std::thread::JoinHandle<()>,
}

/// What the writer sent and what was acknowledged.
#[derive(Clone)]
struct Track {
    /// Per block: highest sequence sent (recorded before it is sent).
    sent: Vec<u64>,
    /// Per block: highest sequence acknowledged.
    acked: Vec<u64>,
    /// Block of each sequence number (index `seq`).
    block_of: Vec<u64>,
    acks: u64,
}

impl Writer {
    fn start(blocks: u64, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let track = Arc::new(Mutex::new(Track {
            sent: vec![0; blocks as usize],
            acked: vec![0; blocks as usize],
            block_of: vec![u64::MAX],
            acks: 0,
        }));
        let (stop2, track2) = (stop.clone(), track.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut nbd = NbdClient::connect(CLUSTER_NBD, "vol0");
            let mut in_flight: HashMap<u64, (u64, u64)> = HashMap::new();
            let mut busy = BTreeSet::new();
            let mut buf = vec![0u8; BSZ];
            loop {
                let stopping = stop2.load(Ordering::Relaxed);
                while !stopping && in_flight.len() < 16 {
                    let b = rng.below(blocks);
                    if !busy.insert(b) {
                        continue;
                    }
                    let seq = {
                        let mut t = track2.lock().expect("track");
                        let seq = t.block_of.len() as u64;
                        t.block_of.push(b);
                        t.sent[b as usize] = seq;
                        seq
                    };
                    fill_block(seq, b, &mut buf);
                    let cookie = nbd.send_write(b * BS, &buf);
                    in_flight.insert(cookie, (b, seq));
                }
                if in_flight.is_empty() {
                    break;
                }
                let r = nbd.recv();
                let (b, seq) = in_flight.remove(&r.cookie).expect("a reply to our write");
                assert_eq!(r.error, 0, "write {seq} of block {b}: NBD error");
                busy.remove(&b);
                let mut t = track2.lock().expect("track");
                t.acked[b as usize] = seq;
                t.acks += 1;
            }
            nbd.flush().expect("flush");
        });
        Writer {
            stop,
            track,
            thread,
        }
    }

    fn track(&self) -> Track {
        self.track.lock().expect("track").clone()
    }

    fn acks(&self) -> u64 {
        self.track.lock().expect("track").acks
    }

    fn finish(self) -> Track {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .expect("the writer saw every write acknowledged");
        let t = self.track.lock().expect("track");
        t.clone()
    }
}

/// fio's region of vol0 in the snapshot test (after the writer's 32 MiB).
const FIO_AT: u64 = 64 * MIB;
const FIO_LEN: u64 = 32 * MIB;

/// fio on `uri` over its region, 16 KiB blocks with crc32c verify headers, `rw` plus
/// `extra`. A read job verifies each block on its own (header magic, offset, length and
/// checksum), so it accepts a block written by any of the write passes.
fn fio_args(uri: &str, rw: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--name=cut",
        "--ioengine=nbd",
        "--bs=16k",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_state_save=0",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    a.push(format!("--uri={uri}"));
    a.push(format!("--rw={rw}"));
    a.push(format!("--offset={FIO_AT}"));
    a.push(format!("--size={FIO_LEN}"));
    if rw != "read" {
        // Writes only: the restored copy is what gets verified.
        a.push("--do_verify=0".into());
    }
    a.extend(extra.iter().map(|s| (*s).to_owned()));
    a
}

/// Runs fio with `args` to completion (bounded); it must exit 0.
fn fio_ok(args: &[String]) -> Run {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("fio", &args)
}

#[test]
fn a_snapshot_under_pipelined_writes_restores_a_consistent_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((s3, c)) = setup(tmp.path(), "256MiB") else {
        return;
    };
    const BLOCKS: u64 = 8192; // 32 MiB
    let url = s3.url("cut");
    // fio's region: a complete first pass with verify headers, then random overwrites
    // (other headers) running across the snapshot. Every 16 KiB block of the restored copy
    // must pass fio's read verify: intact, at its offset, from either pass.
    let fio = have_tool("fio");
    let fio_pass1 = if fio {
        fio_ok(&fio_args(NBD_URI, "write", &[]));
        read_volume(CLUSTER_NBD, "vol0", FIO_AT + FIO_LEN)[FIO_AT as usize..].to_vec()
    } else {
        println!("fio not installed: only the exact check runs");
        Vec::new()
    };
    let fio_pass2 = fio.then(|| {
        Proc::spawn(
            Command::new("fio").args(fio_args(
                NBD_URI,
                "randwrite",
                &["--time_based", "--runtime=300", "--randseed=7"],
            )),
            "fio randwrite pass",
        )
    });
    let w = Writer::start(BLOCKS, 0xc07);
    wait_until("2000 writes acknowledged", Duration::from_secs(60), || {
        w.acks() > 2000
    });
    let before = w.track();
    let t = Instant::now();
    c.cli(&["snapshot", "create", "vol0", "cut"]);
    let pause = t.elapsed();
    let after = w.track();
    if let Some(mut p) = fio_pass2 {
        assert!(
            !p.exited(),
            "fio's second pass ended before the snapshot was taken"
        );
        send_signal(p.pid(), libc::SIGINT);
        let r = p.finish(Duration::from_secs(60));
        assert!(r.status.is_some(), "fio did not stop on SIGINT: {r:?}");
    }
    wait_until(
        "1000 more writes after the snapshot",
        Duration::from_secs(60),
        || w.acks() > after.acks + 1000,
    );
    // Backed up while the writer goes on.
    let b = parse(
        &ok_env(
            &s3,
            &[
                "backup",
                "create",
                "vol0",
                "--snapshot",
                "cut",
                "--target",
                &url,
                "--json",
            ],
        ),
        "backup of the cut",
    );
    let acks_after_backup = w.acks();
    let end = w.finish();
    println!(
        "snapshot took {pause:?}; acks before {}, after {}, after the backup {acks_after_backup}, at the end {}; backup: {b}",
        before.acks, after.acks, end.acks
    );
    assert!(acks_after_backup > after.acks + 1000);
    ok_env(
        &s3,
        &[
            "backup", "restore", "vol0-cut", "--target", &url, "--to", "cut-copy",
        ],
    );
    let addr = attach(&c, "cut-copy", "node-3");
    let got = read_volume(&addr, "cut-copy", 256 * MIB);
    if fio {
        let uri = format!("nbd://{addr}/cut-copy");
        fio_ok(&fio_args(&uri, "read", &["--verify_fatal=1"]));
        let pass2 = got[FIO_AT as usize..(FIO_AT + FIO_LEN) as usize]
            .chunks_exact(16 << 10)
            .zip(fio_pass1.chunks_exact(16 << 10))
            .filter(|(a, b)| a != b)
            .count();
        println!(
            "fio region of the cut: {pass2} of 2048 blocks from the second pass, all verified"
        );
        assert!(
            pass2 > 0,
            "no block of fio's second pass is in the snapshot"
        );
        // The control: a block swapped for its neighbour fails the same verify.
        let at = (FIO_AT + 5 * (16 << 10)) as usize;
        write_volume(
            &addr,
            "cut-copy",
            at as u64,
            &got[at + (16 << 10)..at + (32 << 10)],
        );
        let args = fio_args(&uri, "read", &["--verify_fatal=1"]);
        let r = run_bounded(Command::new("fio").args(&args), CLI_LIMIT);
        assert!(
            r.status.is_some_and(|s| !s.success()) && r.stderr.contains("bad header offset"),
            "fio read verify missed a misplaced block: {r:?}"
        );
    }
    c.cli(&["volume", "detach", "cut-copy"]);
    let (mut newer, mut zero, mut at_lower) = (0, 0, 0);
    for (i, blk) in got[..(BLOCKS * BS) as usize].chunks_exact(BSZ).enumerate() {
        let i = i as u64;
        let (lo, hi) = (before.acked[i as usize], after.sent[i as usize]);
        let seq = tag_of(blk);
        if seq == 0 {
            assert!(
                all_zero(blk),
                "block {i}: torn or foreign content (tag 0, not zeros)"
            );
            assert_eq!(
                lo, 0,
                "block {i} reads as zeros, but write {lo} was acknowledged before the snapshot"
            );
            zero += 1;
            continue;
        }
        assert!(
            block_is(blk, seq, i),
            "block {i}: not intact (claims write {seq}, block field {})",
            u64::from_le_bytes(blk[8..16].try_into().expect("8 bytes"))
        );
        assert_eq!(
            end.block_of.get(seq as usize).copied(),
            Some(i),
            "block {i} holds write {seq}, which was not a write of block {i}"
        );
        assert!(
            lo <= seq && seq <= hi,
            "block {i} holds write {seq}; the snapshot must hold a write in {lo}..={hi} \
             (last acknowledged before the snapshot started ..= last sent before it returned)"
        );
        if seq == lo {
            at_lower += 1;
        } else {
            newer += 1;
        }
    }
    assert!(
        all_zero(&got[(BLOCKS * BS) as usize..FIO_AT as usize])
            && all_zero(&got[(FIO_AT + FIO_LEN) as usize..]),
        "the restored copy has data outside the written regions"
    );
    println!(
        "restored cut: {at_lower} blocks at their last acknowledged write, {newer} newer (in flight), {zero} never written"
    );
    assert!(at_lower > 0);
}

#[test]
fn clone_of_a_volume_taking_writes_and_refused_clones() {
    let tmp = tempfile::tempdir().unwrap();
    // No S3 target needed.
    if !enter_private_netns() {
        return;
    }
    let c = ClusterOpts::new(3).start(&tmp.path().join("data"));
    let size = 256 * MIB;
    let mut rng = Rng::new(0xc1);
    let mut model = vec![0u8; size as usize];
    for (at, len) in [(0, 32 * MIB), (200 * MIB, 16 * MIB)] {
        let data = random_bytes(&mut rng, len as usize);
        write_vol0(at, &data);
        put(&mut model, at, &data);
    }
    let at_s1 = model.clone();
    c.cli(&["snapshot", "create", "vol0", "s1"]);

    // vol0 keeps taking writes (1 MiB, acknowledged one by one) while the clone is made.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        let mut model = model.clone();
        std::thread::spawn(move || {
            let mut rng = Rng::new(0xc2);
            let mut nbd = NbdClient::connect(CLUSTER_NBD, "vol0");
            while !stop.load(Ordering::Relaxed) {
                let at = rng.below(48) * MIB;
                let data = random_bytes(&mut rng, MIB as usize);
                nbd.write(at, &data).expect("write vol0");
                put(&mut model, at, &data);
                writes.fetch_add(1, Ordering::Relaxed);
            }
            nbd.flush().expect("flush vol0");
            model
        })
    };
    wait_until("writes to vol0", Duration::from_secs(60), || {
        writes.load(Ordering::Relaxed) > 10
    });
    let w0 = writes.load(Ordering::Relaxed);
    let t = Instant::now();
    c.cli(&["volume", "create", "c1", "--from-snapshot", "vol0/s1"]);
    let took = t.elapsed();
    let w1 = writes.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut vol0 = writer.join().expect("writer");
    println!("clone took {took:?}; {} writes to vol0 meanwhile", w1 - w0);
    assert!(w1 > w0, "no write to vol0 while the clone was made");

    let c1 = attach(&c, "c1", "node-2");
    assert_same_bytes(&read_volume(&c1, "c1", size), &at_s1, "c1 = vol0 at s1");
    assert_verified("c1", "the clone");
    assert_same_bytes(&read_volume(CLUSTER_NBD, "vol0", size), &vol0, "vol0");

    // Independent both ways.
    let mut clone = at_s1.clone();
    let d = random_bytes(&mut rng, (4 * MIB) as usize);
    write_volume(&c1, "c1", 8 * MIB, &d);
    put(&mut clone, 8 * MIB, &d);
    assert_same_bytes(
        &read_volume(CLUSTER_NBD, "vol0", size),
        &vol0,
        "vol0 after writing c1",
    );
    let d = random_bytes(&mut rng, (4 * MIB) as usize);
    write_vol0(100 * MIB, &d);
    put(&mut vol0, 100 * MIB, &d);
    write_vol0(8 * MIB, &d);
    put(&mut vol0, 8 * MIB, &d);
    assert_same_bytes(
        &read_volume(&c1, "c1", size),
        &clone,
        "c1 after writing vol0",
    );
    assert_same_bytes(&read_volume(CLUSTER_NBD, "vol0", size), &vol0, "vol0");
    assert_verified("c1", "the clone after writes");
    c.assert_verified("vol0 after the clone");

    // Refusals: exit 1, a message, nothing created.
    let clone_of = |new: &'static str, from: &'static str| {
        vec!["volume", "create", new, "--from-snapshot", from]
    };
    let mut small = clone_of("c2", "vol0/s1");
    small.extend(["--size", "128MiB"]);
    for (args, why) in [
        (clone_of("c2", "vol0"), "\"vol0\" is not VOLUME/SNAPSHOT"),
        (clone_of("c2", "vol0/"), "snapshot name"),
        (clone_of("c2", "/s1"), "volume name"),
        (clone_of("c2", "nosuch/s1"), "no volume nosuch"),
        (clone_of("c2", "vol0/nosnap"), "no snapshot nosnap"),
        (clone_of("c1", "vol0/s1"), "volume c1 already exists"),
        (small, "is smaller than volume vol0"),
    ] {
        refused(&args, &[why]);
        assert!(
            !volume_exists("c2"),
            "cairn {}: the refused clone left volume c2",
            args.join(" ")
        );
    }
    // The existing c1 is untouched.
    assert_same_bytes(
        &read_volume(&c1, "c1", size),
        &clone,
        "c1 after the refusals",
    );
}
