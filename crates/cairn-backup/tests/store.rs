//! Backup store behaviour against object_store's in-memory store and a `file://`
//! directory: dedup, holes, codecs, incremental cost, corruption and missing blocks
//! named, delete + GC, concurrent deletes, GC racing a backup that reuses blocks.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use cairn_backup::*;
use common::*;
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

fn mem_target() -> Target {
    Target::from_store(Arc::new(InMemory::new()), "vols/prod", "memory://test")
}

fn spec(name: &str) -> BackupSpec {
    BackupSpec {
        name: name.into(),
        volume: "vol1".into(),
        snapshot: format!("snap-{name}"),
    }
}

async fn restore_vec(t: &Target, name: &str, size: usize) -> Result<Vec<u8>> {
    let sink = MemImage::zeroed(size);
    restore(t, name, &sink, &RestoreOptions::default()).await?;
    Ok(sink.to_vec())
}

async fn keys(t: &Target, under: &str) -> BTreeSet<String> {
    let prefix = Path::from(format!("vols/prod/{under}"));
    let v: Vec<_> = t.store().list(Some(&prefix)).try_collect().await.unwrap();
    v.into_iter().map(|m| m.location.to_string()).collect()
}

async fn block_keys(t: &Target) -> BTreeSet<String> {
    keys(t, "blocks").await
}

async fn referenced(t: &Target, names: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for n in names {
        for b in read_manifest(t, n).await.unwrap().blocks {
            out.insert(t.block_key(&b.hash().unwrap()).to_string());
        }
    }
    out
}

/// A volume with every kind of block: random, compressible, all-zero but allocated,
/// unallocated, a duplicate, and a short last block.
fn mixed_volume() -> (MemImage, Vec<u8>) {
    let size = 9 * BS + 300_000;
    let mut v = vec![0u8; size];
    random_fill(&mut v[0..BS], 1);
    for (i, b) in v[BS..2 * BS].iter_mut().enumerate() {
        *b = b"cairn block store "[i % 18];
    }
    // Block 2: allocated zeroes. Blocks 3-4: unallocated.
    random_fill(&mut v[5 * BS..6 * BS], 5);
    let dup = v[0..BS].to_vec();
    v[6 * BS..7 * BS].copy_from_slice(&dup);
    random_fill(&mut v[7 * BS + 1000..7 * BS + 2000], 7); // mostly zero block
                                                          // Block 8: allocated zeroes; block 9 (short): data.
    random_fill(&mut v[9 * BS..], 9);
    let img = MemImage::from_vec(v.clone())
        .with_allocated(vec![0..(3 * BS) as u64, (5 * BS) as u64..size as u64]);
    (img, v)
}

#[tokio::test]
async fn roundtrip_lz4_zstd_none_with_holes_and_dedup() {
    let (img, want) = mixed_volume();
    for (i, c) in [Compression::Lz4, Compression::Zstd(3), Compression::None]
        .into_iter()
        .enumerate()
    {
        let t = mem_target();
        let opts = BackupOptions {
            compression: c,
            ..Default::default()
        };
        let name = format!("b{i}");
        let r = backup(&t, &img, &spec(&name), &opts).await.unwrap();
        // 10 blocks: 0,1,5,6(dup of 0),7,9 data; 2,3,4,8 holes.
        assert_eq!(r.blocks_hole, 4, "{c:?}: {r:?}");
        assert_eq!(r.blocks_new, 5, "{c:?}: {r:?}");
        assert_eq!(r.blocks_reused, 1, "{c:?}: {r:?}");
        assert_eq!(block_keys(&t).await.len(), 5);
        let m = read_manifest(&t, &name).await.unwrap();
        let idx: Vec<u64> = m.blocks.iter().map(|b| b.index).collect();
        assert_eq!(idx, vec![0, 1, 5, 6, 7, 9]);
        assert_same(&restore_vec(&t, &name, want.len()).await.unwrap(), &want);
        if c != Compression::None {
            // Block 1 compresses well, block 7 is mostly zero.
            assert!(r.bytes_uploaded < 3 * BS as u64 + 400_000, "{c:?}: {r:?}");
        }
    }
}

#[tokio::test]
async fn second_full_backup_uploads_only_the_manifest() {
    let t = mem_target();
    let img = MemImage::from_vec(random_volume(8, 3));
    let a = backup(&t, &img, &spec("a"), &BackupOptions::default())
        .await
        .unwrap();
    assert_eq!(a.blocks_new, 8);
    let b = backup(&t, &img, &spec("b"), &BackupOptions::default())
        .await
        .unwrap();
    assert_eq!((b.blocks_new, b.blocks_reused), (0, 8));
    assert!(b.bytes_uploaded < 4096, "{b:?}");
    let again = backup(&t, &img, &spec("b"), &BackupOptions::default()).await;
    assert!(
        matches!(again, Err(BackupError::AlreadyExists(_))),
        "{again:?}"
    );
}

#[tokio::test]
async fn incremental_one_percent_change_uploads_under_two_percent() {
    let t = mem_target();
    let blocks = 100;
    let mut v = random_volume(blocks, 11);
    let full = backup(
        &t,
        &MemImage::from_vec(v.clone()),
        &spec("full"),
        &BackupOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(full.blocks_new, blocks as u64);
    let snap1 = v.clone();
    // Change 1 % of the blocks (1 of 100) by a small unaligned write.
    v[57 * BS + 5] ^= 0xff;
    let write = (57 * BS + 5) as u64..(57 * BS + 6) as u64;
    let changed = vec![write];
    let progress: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let p2 = progress.clone();
    let opts = BackupOptions {
        incremental: Some(Incremental {
            parent: "full".into(),
            changed,
        }),
        progress: Some(Arc::new(move |d, t| p2.lock().unwrap().push((d, t)))),
        ..Default::default()
    };
    let src = GatedSource::new(MemImage::from_vec(v.clone()), u64::MAX);
    let inc = backup(&t, &src, &spec("inc"), &opts).await.unwrap();
    let volume = (blocks * BS) as u64;
    assert_eq!(inc.blocks_new, 1, "{inc:?}");
    assert_eq!(inc.blocks_unchanged, blocks as u64 - 1);
    assert_eq!(
        src.reads.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only changed blocks are read"
    );
    assert!(
        inc.bytes_uploaded * 50 <= volume,
        "uploaded {} of {volume}",
        inc.bytes_uploaded
    );
    let p = progress.lock().unwrap().clone();
    assert_eq!(p.last(), Some(&(BS as u64, BS as u64)));
    assert!(p.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(
        read_manifest(&t, "inc").await.unwrap().parent.as_deref(),
        Some("full")
    );
    assert_same(&restore_vec(&t, "full", v.len()).await.unwrap(), &snap1);
    assert_same(&restore_vec(&t, "inc", v.len()).await.unwrap(), &v);
}

#[tokio::test]
async fn incremental_handles_growth_and_parent_mismatch() {
    let t = mem_target();
    let mut v = random_volume(3, 21);
    v.truncate(2 * BS + 1000);
    backup(
        &t,
        &MemImage::from_vec(v.clone()),
        &spec("p"),
        &BackupOptions::default(),
    )
    .await
    .unwrap();
    // The volume grows: the old partial last block and the new blocks are re-read.
    v.resize(4 * BS, 0);
    random_fill(&mut v[2 * BS + 1000..], 22);
    let opts = BackupOptions {
        incremental: Some(Incremental {
            parent: "p".into(),
            changed: vec![],
        }),
        ..Default::default()
    };
    let r = backup(&t, &MemImage::from_vec(v.clone()), &spec("grown"), &opts)
        .await
        .unwrap();
    assert_eq!((r.blocks_unchanged, r.blocks_new), (2, 2), "{r:?}");
    assert_same(&restore_vec(&t, "grown", v.len()).await.unwrap(), &v);
    let other = BackupSpec {
        volume: "other".into(),
        ..spec("x")
    };
    let e = backup(&t, &MemImage::from_vec(v), &other, &opts)
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::ParentMismatch { .. }), "{e}");
    assert!(!keys(&t, "manifests")
        .await
        .iter()
        .any(|k| k.contains("/x.json")));
}

async fn first_block_key(t: &Target, name: &str, index: u64) -> Path {
    let m = read_manifest(t, name).await.unwrap();
    let b = m.blocks.iter().find(|b| b.index == index).unwrap();
    t.block_key(&b.hash().unwrap())
}

#[tokio::test]
async fn corrupt_and_missing_blocks_are_named() {
    let t = mem_target();
    let v = random_volume(6, 31);
    backup(
        &t,
        &MemImage::from_vec(v.clone()),
        &spec("c"),
        &BackupOptions::default(),
    )
    .await
    .unwrap();
    let key = first_block_key(&t, "c", 4).await;
    let mut obj = t
        .store()
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    obj[BLOCK_HEADER_LEN + 1000] ^= 0x40;
    t.store().put(&key, PutPayload::from(obj)).await.unwrap();
    let e = restore_vec(&t, "c", v.len()).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, BackupError::CorruptBlock { index: 4, offset, .. } if offset == 4 * BLOCK_SIZE),
        "{msg}"
    );
    assert!(
        msg.contains("block 4") && msg.contains(&key.to_string()) && msg.contains("offset 8388608"),
        "{msg}"
    );

    let key = first_block_key(&t, "c", 2).await;
    t.store().delete(&key).await.unwrap();
    let sink = MemImage::zeroed(v.len());
    let opts = RestoreOptions {
        concurrency: 1,
        ..Default::default()
    };
    let e = restore(&t, "c", &sink, &opts).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, BackupError::MissingBlock { index: 2, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("missing block 2") && msg.contains(&key.to_string()),
        "{msg}"
    );
}

#[tokio::test]
async fn delete_keeps_other_backups_and_removes_unreferenced_blocks() {
    let t = mem_target();
    let mut v = random_volume(10, 41);
    backup(
        &t,
        &MemImage::from_vec(v.clone()),
        &spec("one"),
        &BackupOptions::default(),
    )
    .await
    .unwrap();
    for i in 0..5 {
        change_block(&mut v, i, 400 + i as u64);
    }
    let first_five = 0..(5 * BS) as u64;
    let opts = BackupOptions {
        incremental: Some(Incremental {
            parent: "one".into(),
            changed: vec![first_five],
        }),
        ..Default::default()
    };
    backup(&t, &MemImage::from_vec(v.clone()), &spec("two"), &opts)
        .await
        .unwrap();
    assert_eq!(block_keys(&t).await.len(), 15);
    let report = delete(&t, "one", &CoordOptions::default()).await.unwrap();
    assert_eq!(report.blocks_deleted, 5, "{report:?}");
    assert_eq!(block_keys(&t).await, referenced(&t, &["two"]).await);
    assert_same(&restore_vec(&t, "two", v.len()).await.unwrap(), &v);
    let names: Vec<String> = list(&t)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, vec!["two"]);
    assert!(matches!(
        delete(&t, "one", &CoordOptions::default()).await,
        Err(BackupError::NotFound(_))
    ));
    assert!(keys(&t, "gc.lock").await.is_empty());
    assert!(keys(&t, "inprogress").await.is_empty());
}

#[tokio::test]
async fn concurrent_deletes_never_remove_a_used_block() {
    let t = mem_target();
    let mut v = random_volume(6, 51);
    let mut images = Vec::new();
    for n in 0..5u64 {
        change_block(&mut v, usize::try_from(n).unwrap(), 500 + n);
        backup(
            &t,
            &MemImage::from_vec(v.clone()),
            &spec(&format!("b{n}")),
            &BackupOptions::default(),
        )
        .await
        .unwrap();
        images.push(v.clone());
    }
    let coord = CoordOptions::default();
    let (r1, r2, r3) = tokio::join!(
        delete(&t, "b0", &coord),
        delete(&t, "b2", &coord),
        delete(&t, "b3", &coord)
    );
    r1.unwrap();
    r2.unwrap();
    r3.unwrap();
    assert_eq!(block_keys(&t).await, referenced(&t, &["b1", "b4"]).await);
    assert_same(&restore_vec(&t, "b1", v.len()).await.unwrap(), &images[1]);
    assert_same(&restore_vec(&t, "b4", v.len()).await.unwrap(), &images[4]);
}

#[tokio::test]
async fn gc_during_a_backup_that_reuses_blocks_keeps_them() {
    let t = mem_target();
    let v = random_volume(2, 61);
    backup(
        &t,
        &MemImage::from_vec(v.clone()),
        &spec("old"),
        &BackupOptions::default(),
    )
    .await
    .unwrap();
    // The new backup has the same content: with concurrency 1 it finds block 0 in the
    // target (reuse decided), then holds at its second read while "old" is deleted.
    let src = GatedSource::new(MemImage::from_vec(v.clone()), 1);
    let opts = BackupOptions {
        concurrency: 1,
        ..Default::default()
    };
    let running = {
        let (t, src, opts) = (t.clone(), src.clone(), opts.clone());
        tokio::spawn(async move { backup(&t, &src, &spec("new"), &opts).await })
    };
    src.reached.notified().await;
    let report = delete(&t, "old", &CoordOptions::default()).await.unwrap();
    assert_eq!(report.running_backups, 1, "{report:?}");
    assert_eq!(report.blocks_deleted, 0, "{report:?}");
    assert_eq!(report.blocks_kept_for_running_backups, 2, "{report:?}");
    src.release();
    let r = running.await.unwrap().unwrap();
    assert_eq!(r.blocks_reused, 2, "{r:?}");
    assert_same(&restore_vec(&t, "new", v.len()).await.unwrap(), &v);
    // Nothing is garbage now; a later GC keeps both blocks.
    let report = gc(&t, &CoordOptions::default()).await.unwrap();
    assert_eq!((report.running_backups, report.blocks_deleted), (0, 0));
    assert_eq!(block_keys(&t).await.len(), 2);
}

#[tokio::test]
async fn gc_removes_blocks_of_a_failed_backup_once_it_is_gone() {
    let t = mem_target();
    let v = random_volume(3, 71);
    let mut src = GatedSource::new(MemImage::from_vec(v.clone()), u64::MAX);
    src.on_read = Arc::new(|_| {});
    // A source that fails on its third read: two blocks are uploaded, no manifest.
    struct Failing(MemImage);
    impl SnapshotSource for Failing {
        fn size(&self) -> u64 {
            SnapshotSource::size(&self.0)
        }
        async fn allocated(&self) -> std::io::Result<Vec<std::ops::Range<u64>>> {
            self.0.allocated().await
        }
        async fn read(&self, offset: u64, len: usize) -> std::io::Result<bytes::Bytes> {
            if offset >= 2 * BLOCK_SIZE {
                return Err(std::io::Error::other("disk on fire"));
            }
            self.0.read(offset, len).await
        }
    }
    let opts = BackupOptions {
        concurrency: 1,
        ..Default::default()
    };
    let e = backup(
        &t,
        &Failing(MemImage::from_vec(v.clone())),
        &spec("f"),
        &opts,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, BackupError::Source { offset, .. } if offset == 2 * BLOCK_SIZE),
        "{e}"
    );
    assert!(list(&t).await.unwrap().is_empty());
    assert!(
        keys(&t, "inprogress").await.is_empty(),
        "marker removed on failure"
    );
    assert_eq!(block_keys(&t).await.len(), 2);
    let report = gc(&t, &CoordOptions::default()).await.unwrap();
    assert_eq!(report.blocks_deleted, 2);
    // The retry succeeds.
    backup(&t, &src, &spec("f"), &opts).await.unwrap();
    assert_same(&restore_vec(&t, "f", v.len()).await.unwrap(), &v);
}

#[tokio::test]
async fn a_held_gc_lock_stops_gc_and_backups_cleanly() {
    let t = mem_target();
    let v = random_volume(2, 81);
    backup(
        &t,
        &MemImage::from_vec(v.clone()),
        &spec("a"),
        &BackupOptions::default(),
    )
    .await
    .unwrap();
    // Another process holds the lock.
    t.store()
        .put(
            &Path::from("vols/prod/gc.lock"),
            PutPayload::from_static(b"{}"),
        )
        .await
        .unwrap();
    let quick = CoordOptions {
        lock_wait: std::time::Duration::ZERO,
        ..Default::default()
    };
    let e = gc(&t, &quick).await.unwrap_err();
    assert!(matches!(e, BackupError::GcBusy { .. }), "{e}");
    let opts = BackupOptions {
        coord: quick.clone(),
        ..Default::default()
    };
    let e = backup(&t, &MemImage::from_vec(v.clone()), &spec("b"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::GcBusy { .. }), "{e}");
    assert!(keys(&t, "inprogress").await.is_empty());
    assert_eq!(list(&t).await.unwrap().len(), 1);
    t.store()
        .delete(&Path::from("vols/prod/gc.lock"))
        .await
        .unwrap();
    backup(&t, &MemImage::from_vec(v), &spec("b"), &opts)
        .await
        .unwrap();
}

#[tokio::test]
async fn file_target_with_sparse_files() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/backups", dir.path().display());
    let t = Target::open(&url, &S3Config::default()).unwrap();
    // A sparse 64 MiB image with data in three places.
    let img_path = dir.path().join("vol.img");
    let mut want = vec![0u8; 64 * MIB];
    random_fill(&mut want[3 * MIB..5 * MIB], 1);
    random_fill(&mut want[40 * MIB..40 * MIB + 4096], 2);
    random_fill(&mut want[64 * MIB - 10..], 3);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&img_path).unwrap();
        f.set_len(want.len() as u64).unwrap();
        for r in [
            3 * MIB..5 * MIB,
            40 * MIB..40 * MIB + 4096,
            64 * MIB - 10..64 * MIB,
        ] {
            f.write_all_at(&want[r.clone()], r.start as u64).unwrap();
        }
    }
    let src = FileImage::open(&img_path).unwrap();
    let r = backup(&t, &src, &spec("f1"), &BackupOptions::default())
        .await
        .unwrap();
    assert_eq!(r.blocks_new, 4, "{r:?}"); // 2-4 MiB, 4-6 MiB, 40 MiB, the last block
    assert!(r.bytes_read <= 8 * BLOCK_SIZE, "holes are not read: {r:?}");
    let listed = list(&t).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].size, listed[0].volume.as_str()),
        (64 * MIB as u64, "vol1")
    );
    assert!(dir.path().join("backups/manifests/f1.json").exists());
    let out = dir.path().join("restored.img");
    let sink = FileImage::create(&out, want.len() as u64).unwrap();
    restore(&t, "f1", &sink, &RestoreOptions::default())
        .await
        .unwrap();
    assert_same(&std::fs::read(&out).unwrap(), &want);
    delete(&t, "f1", &CoordOptions::default()).await.unwrap();
    assert!(list(&t).await.unwrap().is_empty());
    let blocks: Vec<_> = t
        .store()
        .list(Some(&Path::from("blocks")))
        .try_collect()
        .await
        .unwrap();
    assert!(blocks.is_empty());
}

#[tokio::test]
async fn a_backup_waits_for_a_running_gc_before_reading() {
    let t = mem_target();
    let v = random_volume(2, 91);
    let lock = Path::from("vols/prod/gc.lock");
    t.store()
        .put(&lock, PutPayload::from_static(b"{}"))
        .await
        .unwrap();
    let src = GatedSource::new(MemImage::from_vec(v.clone()), u64::MAX);
    let running = {
        let (t, src) = (t.clone(), src.clone());
        tokio::spawn(async move { backup(&t, &src, &spec("w"), &BackupOptions::default()).await })
    };
    // Wait for the marker: from then on the backup is polling the lock.
    while keys(&t, "inprogress").await.is_empty() {
        tokio::task::yield_now().await;
    }
    assert_eq!(src.reads.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(!running.is_finished());
    t.store().delete(&lock).await.unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(src.reads.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_same(&restore_vec(&t, "w", v.len()).await.unwrap(), &v);
}

#[tokio::test]
async fn an_abandoned_marker_delays_gc_until_it_is_stale() {
    let t = mem_target();
    let v = random_volume(3, 101);
    backup(
        &t,
        &MemImage::from_vec(v),
        &spec("a"),
        &BackupOptions::default(),
    )
    .await
    .unwrap();
    // A backup process died and left its marker.
    let zombie = Path::from("vols/prod/inprogress/dead.0123.json");
    t.store()
        .put(&zombie, PutPayload::from_static(b"{}"))
        .await
        .unwrap();
    let report = delete(&t, "a", &CoordOptions::default()).await.unwrap();
    assert_eq!((report.running_backups, report.blocks_deleted), (1, 0));
    assert_eq!(report.blocks_kept_for_running_backups, 3);
    // Let the store's clock move 5 ms past the marker (polling the store, not sleeping).
    let born = t.store().head(&zombie).await.unwrap().last_modified;
    let probe = Path::from("vols/prod/probe");
    loop {
        t.store()
            .put(&probe, PutPayload::from_static(b"."))
            .await
            .unwrap();
        let now = t.store().head(&probe).await.unwrap().last_modified;
        if (now - born).num_milliseconds() > 5 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let short = CoordOptions {
        stale_after: std::time::Duration::from_millis(5),
        ..Default::default()
    };
    let report = gc(&t, &short).await.unwrap();
    assert_eq!(
        (report.running_backups, report.blocks_deleted),
        (0, 3),
        "{report:?}"
    );
    assert!(keys(&t, "inprogress").await.is_empty());
    assert!(block_keys(&t).await.is_empty());
}

#[tokio::test]
async fn a_cancelled_backup_removes_its_marker_and_lists_nothing() {
    let t = mem_target();
    let src = GatedSource::new(MemImage::from_vec(random_volume(2, 111)), 0);
    let running = {
        let (t, src) = (t.clone(), src.clone());
        tokio::spawn(async move { backup(&t, &src, &spec("c"), &BackupOptions::default()).await })
    };
    src.reached.notified().await;
    assert_eq!(keys(&t, "inprogress").await.len(), 1);
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    // The marker is removed by a background task: wait for that condition.
    while !keys(&t, "inprogress").await.is_empty() {
        tokio::task::yield_now().await;
    }
    assert!(list(&t).await.unwrap().is_empty());
}
