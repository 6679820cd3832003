//! Tests of the rebuild operations: unmap, range digests and recreate.

use std::path::Path;

use super::*;
use crate::meta::Meta;
use crate::recreate::{exchange, scratch_dir};

const SNAP: &str = "s1";

fn store(dir: &Path, blocks: u64) -> Store {
    Store::create(dir, "v", "r1", blocks * 4096, EngineChoice::Portable).unwrap()
}

fn read_range(s: &mut Store, block: u64, blocks: usize) -> Vec<u8> {
    let mut buf = vec![0u8; blocks * BSZ];
    s.read(block * 4096, &mut buf).unwrap();
    buf
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// The digests `range_digests` must give for blocks `blocks` (`None`: not held), `granule`
/// blocks per digest.
fn model_digests(blocks: &[Option<Vec<u8>>], granule: usize) -> Vec<[u8; 32]> {
    blocks
        .chunks(granule)
        .map(|g| {
            let mut h = blake3::Hasher::new();
            for b in g {
                match b {
                    Some(data) => {
                        h.update(&[1]);
                        h.update(data);
                    }
                    None => {
                        h.update(&[0]);
                    }
                }
            }
            *h.finalize().as_bytes()
        })
        .collect()
}

// ------------------------------------------------------------------------------- unmap

#[test]
fn unmap_reveals_the_snapshot_and_drops_head_only_data() {
    for e in engines() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), "v", "r1", 16 * 4096, e).unwrap();
        let old = pattern(20, 4 * BSZ);
        write(&mut s, 0, &old).unwrap();
        s.snapshot_create(SNAP, 1, vec![]).unwrap();
        let new = pattern(21, 2 * BSZ);
        write(&mut s, 0, &new).unwrap();
        let head_only = pattern(22, 2 * BSZ);
        write(&mut s, 8 * 4096, &head_only).unwrap();
        s.flush().unwrap();
        s.flush().unwrap(); // clears the dirty marks of the writes
        assert!(s.dirty_regions().1.is_empty());
        assert_eq!(&read_range(&mut s, 0, 4)[..2 * BSZ], &new[..]);

        s.unmap(0, 4 * 4096).unwrap();
        assert_eq!(s.dirty_regions().1, vec![0], "unmap marks its regions");
        assert_eq!(read_range(&mut s, 0, 4), old, "the snapshot shows through");
        s.unmap(8 * 4096, 2 * 4096).unwrap();
        assert!(is_zero(&read_range(&mut s, 8, 2)), "no layer below: zeros");
        assert!(s.extents(&LayerSel::Head, 0, 16 * 4096).unwrap().is_empty());
        assert_eq!(
            s.extents(&LayerSel::Merged, 0, 16 * 4096).unwrap(),
            vec![(0, 4 * 4096)]
        );
        // Unlike trim, unmap wrote nothing: the head holds no zero blocks.
        assert_eq!(
            s.extents(&LayerSel::Snapshot(SNAP.into()), 0, 16 * 4096)
                .unwrap(),
            vec![(0, 4 * 4096)]
        );

        drop(s);
        let mut s = Store::open(dir.path(), e).unwrap();
        assert_eq!(read_range(&mut s, 0, 4), old);
        assert!(is_zero(&read_range(&mut s, 8, 2)));
        assert!(s.extents(&LayerSel::Head, 0, 16 * 4096).unwrap().is_empty());
        assert!(s.scrub(|_, _| {}).unwrap().is_empty());
    }
}

#[test]
fn unmap_differs_from_trim_and_refuses_bad_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path(), 16);
    let old = pattern(23, 2 * BSZ);
    write(&mut s, 0, &old).unwrap();
    s.snapshot_create(SNAP, 1, vec![]).unwrap();
    s.trim(0, 4096).unwrap(); // explicit zeros in the head hide the snapshot
    assert!(is_zero(&read_range(&mut s, 0, 1)));
    s.unmap(0, 2 * 4096).unwrap(); // drops those zeros: the snapshot is back
    assert_eq!(read_range(&mut s, 0, 2), old);

    assert!(matches!(
        s.unmap(1, 4096),
        Err(StoreError::Misaligned { .. })
    ));
    assert!(matches!(
        s.unmap(0, 100),
        Err(StoreError::Misaligned { .. })
    ));
    assert!(matches!(
        s.unmap(15 * 4096, 2 * 4096),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.unmap(u64::MAX - 4095, 4096),
        Err(StoreError::OutOfRange { .. })
    ));
    s.unmap(16 * 4096, 0).unwrap();
    assert_eq!(read_range(&mut s, 0, 2), old);
}

// ------------------------------------------------------------------------ range digests

/// Snapshot `s1` holds blocks 0..4 = `a`; the head holds blocks 2..3 = `b` and 9 = `c`.
fn layered(dir: &Path, a: &[u8], b: &[u8], c: &[u8]) -> Store {
    let mut s = store(dir, 32);
    write(&mut s, 0, a).unwrap();
    s.snapshot_create(SNAP, 1, vec![]).unwrap();
    write(&mut s, 2 * 4096, b).unwrap();
    write(&mut s, 9 * 4096, c).unwrap();
    s
}

#[test]
fn range_digests_follow_the_documented_hash() {
    let (a, b, c) = (pattern(30, 4 * BSZ), pattern(31, BSZ), pattern(32, BSZ));
    let dir = tempfile::tempdir().unwrap();
    let mut s = layered(dir.path(), &a, &b, &c);
    let block = |d: &[u8], i: usize| Some(d[i * BSZ..(i + 1) * BSZ].to_vec());
    // Blocks 0..12, granules of 4 blocks (the last one 4 too) and of 5 (the last one 2).
    let mut head: Vec<Option<Vec<u8>>> = vec![None; 12];
    head[2] = block(&b, 0);
    head[9] = block(&c, 0);
    let mut snap: Vec<Option<Vec<u8>>> = vec![None; 12];
    for (i, slot) in snap.iter_mut().enumerate().take(4) {
        *slot = block(&a, i);
    }
    let mut merged = snap.clone();
    merged[2] = block(&b, 0);
    merged[9] = block(&c, 0);
    for granule in [4usize, 5] {
        let g = u32::try_from(granule * BSZ).unwrap();
        for (sel, model) in [
            (LayerSel::Head, &head),
            (LayerSel::Snapshot(SNAP.into()), &snap),
            (LayerSel::Merged, &merged),
        ] {
            let got = s.range_digests(&sel, 0, 12 * 4096, g).unwrap();
            assert_eq!(
                got,
                model_digests(model, granule),
                "{sel:?}, granule {granule}"
            );
        }
    }
    assert_eq!(
        s.range_digests(&LayerSel::Head, 0, 12 * 4096, 20 * 4096)
            .unwrap()
            .len(),
        1
    );
    assert!(s
        .range_digests(&LayerSel::Head, 4096, 0, 4096)
        .unwrap()
        .is_empty());
    // An offset inside the volume shifts the blocks covered.
    assert_eq!(
        s.range_digests(&LayerSel::Merged, 2 * 4096, 8 * 4096, 4 * 4096)
            .unwrap(),
        model_digests(&merged[2..10], 4)
    );
}

#[test]
fn range_digests_agree_across_replicas_and_pin_differences() {
    let (a, b, c) = (pattern(40, 4 * BSZ), pattern(41, BSZ), pattern(42, BSZ));
    let (d1, d2, d3) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut x = layered(d1.path(), &a, &b, &c);
    let mut y = layered(d2.path(), &a, &b, &c);
    // z differs from x in block 9 of the head only.
    let mut z = layered(d3.path(), &a, &b, &pattern(43, BSZ));
    let g = 4 * 4096;
    for sel in [
        LayerSel::Head,
        LayerSel::Snapshot(SNAP.into()),
        LayerSel::Merged,
    ] {
        let dx = x.range_digests(&sel, 0, 32 * 4096, g).unwrap();
        assert_eq!(dx.len(), 8);
        assert_eq!(
            dx,
            y.range_digests(&sel, 0, 32 * 4096, g).unwrap(),
            "{sel:?}"
        );
        let dz = z.range_digests(&sel, 0, 32 * 4096, g).unwrap();
        let differ: Vec<usize> = (0..8).filter(|&i| dx[i] != dz[i]).collect();
        let expected = if sel == LayerSel::Snapshot(SNAP.into()) {
            vec![]
        } else {
            vec![2] // block 9 lies in granule 9 / 4
        };
        assert_eq!(differ, expected, "{sel:?}");
    }
    // Head and snapshot are told apart.
    assert_ne!(
        x.range_digests(&LayerSel::Head, 0, 4 * 4096, g).unwrap(),
        x.range_digests(&LayerSel::Snapshot(SNAP.into()), 0, 4 * 4096, g)
            .unwrap()
    );
}

#[test]
fn a_held_zero_block_differs_from_a_hole() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut held = store(d1.path(), 8);
    let mut hole = store(d2.path(), 8);
    write(&mut held, 4096, &vec![0u8; BSZ]).unwrap();
    held.write_zeroes(5 * 4096, 4096, true).unwrap(); // NO_HOLE: allocated zeros
    let dh = held
        .range_digests(&LayerSel::Head, 0, 8 * 4096, 2 * 4096)
        .unwrap();
    let dz = hole
        .range_digests(&LayerSel::Head, 0, 8 * 4096, 2 * 4096)
        .unwrap();
    let differ: Vec<usize> = (0..4).filter(|&i| dh[i] != dz[i]).collect();
    assert_eq!(differ, vec![0, 2]);
    assert_eq!(read_all(&mut held), read_all(&mut hole), "same content");
    // Unmapping the zeros makes them holes again.
    held.unmap(0, 8 * 4096).unwrap();
    assert_eq!(
        held.range_digests(&LayerSel::Head, 0, 8 * 4096, 2 * 4096)
            .unwrap(),
        dz
    );
}

#[test]
fn range_digests_cross_read_batches() {
    // Data across the 1 MiB read batch boundary (block 256), odd granule of 3 blocks.
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path(), 600);
    let data = pattern(50, 20 * BSZ);
    write(&mut s, 250 * 4096, &data).unwrap();
    write(&mut s, 520 * 4096, &data[..BSZ]).unwrap();
    let mut model: Vec<Option<Vec<u8>>> = vec![None; 600];
    for i in 0..20 {
        model[250 + i] = Some(data[i * BSZ..(i + 1) * BSZ].to_vec());
    }
    model[520] = Some(data[..BSZ].to_vec());
    let got = s
        .range_digests(&LayerSel::Merged, 0, 600 * 4096, 3 * 4096)
        .unwrap();
    assert_eq!(got, model_digests(&model, 3));
    let got = s
        .range_digests(&LayerSel::Head, 4096, 599 * 4096, 512 * 4096)
        .unwrap();
    assert_eq!(got, model_digests(&model[1..], 512));
}

#[test]
fn range_digests_refuse_bad_requests_and_report_corruption() {
    let dir = tempfile::tempdir().unwrap();
    // 256 MiB + 1 MiB, sparse: only big enough to test the range limit.
    let blocks = (MAX_DIGEST_RANGE + (1 << 20)) / 4096;
    let mut s = store(dir.path(), blocks);
    let head = LayerSel::Head;
    for granule in [0u32, 100, 4095, 4097] {
        assert!(
            matches!(
                s.range_digests(&head, 0, 4096, granule),
                Err(StoreError::InvalidArgument(_))
            ),
            "granule {granule}"
        );
    }
    assert!(matches!(
        s.range_digests(&head, 1, 4096, 4096),
        Err(StoreError::Misaligned { .. })
    ));
    assert!(matches!(
        s.range_digests(&head, 0, 4097, 4096),
        Err(StoreError::Misaligned { .. })
    ));
    assert!(matches!(
        s.range_digests(&head, (blocks - 1) * 4096, 2 * 4096, 4096),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.range_digests(&head, 0, MAX_DIGEST_RANGE + 4096, 1 << 20),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        s.range_digests(&LayerSel::Snapshot("nope".into()), 0, 4096, 4096),
        Err(StoreError::NotFound(_))
    ));
    // The largest request: 256 MiB in 65536 granules.
    let all = s.range_digests(&head, 0, MAX_DIGEST_RANGE, 4096).unwrap();
    assert_eq!(all.len() as u64, MAX_DIGEST_GRANULES);
    assert!(all.iter().all(|d| *d == all[0]));

    // Bit rot in a held block: the call fails naming it, as a read would.
    write(&mut s, 3 * 4096, &pattern(60, BSZ)).unwrap();
    s.flush().unwrap();
    s.flush().unwrap();
    drop(s);
    flip_byte(&dir.path().join("layers/00000001.data"), 3 * 4096 + 5);
    let mut s = Store::open(dir.path(), EngineChoice::Portable).unwrap();
    match s.range_digests(&LayerSel::Merged, 0, 8 * 4096, 4096) {
        Err(StoreError::Corruption { offset, .. }) => assert_eq!(offset, 3 * 4096),
        other => panic!("expected corruption, got {other:?}"),
    }
    // Granules that do not read the bad block still work.
    assert_eq!(
        s.range_digests(&LayerSel::Merged, 4 * 4096, 4 * 4096, 4096)
            .unwrap()
            .len(),
        4
    );
}

// ----------------------------------------------------------------------------- recreate

/// A replica with data in a snapshot and the head, epoch 7.
fn populated(dir: &Path) -> Store {
    let mut s = store(dir, 64);
    write(&mut s, 0, &pattern(70, 8 * BSZ)).unwrap();
    s.snapshot_create(SNAP, 1, vec![]).unwrap();
    write(&mut s, 20 * 4096, &pattern(71, 4 * BSZ)).unwrap();
    s.set_epoch(7).unwrap();
    s
}

fn assert_empty_replica(s: &mut Store, instance_before: u64) {
    assert_eq!(s.epoch(), 7, "epoch kept");
    assert_ne!(s.instance(), instance_before, "new instance");
    assert_ne!(s.instance(), 0);
    assert_eq!(
        (s.volume(), s.replica_id(), s.size()),
        ("v", "r1", 64 * 4096)
    );
    assert!(is_zero(&read_all(s)));
    assert!(s.snapshot_list().is_empty());
    assert!(s.chain_names().is_empty());
    assert!(s
        .extents(&LayerSel::Merged, 0, 64 * 4096)
        .unwrap()
        .is_empty());
    assert!(s.extents(&LayerSel::Head, 0, 64 * 4096).unwrap().is_empty());
    assert!(s.dirty_regions().1.is_empty());
    assert!(s.scrub(|_, _| {}).unwrap().is_empty());
}

fn layer_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn recreate_empties_the_replica_and_keeps_its_epoch() {
    for e in engines() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("r1");
        let mut s = Store::create(&dir, "v", "r1", 64 * 4096, e).unwrap();
        write(&mut s, 0, &pattern(70, 8 * BSZ)).unwrap();
        s.snapshot_create(SNAP, 1, vec![]).unwrap();
        write(&mut s, 20 * 4096, &pattern(71, 4 * BSZ)).unwrap();
        s.set_epoch(7).unwrap();
        let before = s.instance();
        assert_ne!(before, 0);
        assert!(!s.dirty_regions().1.is_empty());

        s.recreate().unwrap();
        assert_empty_replica(&mut s, before);
        assert!(!scratch_dir(&dir).unwrap().exists(), "old replica deleted");
        assert_eq!(layer_files(&dir), vec!["00000001.crc", "00000001.data"]);
        // The same store serves the new replica: writes, snapshots, epochs.
        let data = pattern(72, 2 * BSZ);
        write(&mut s, 4 * 4096, &data).unwrap();
        s.snapshot_create("fresh", 2, vec![]).unwrap();
        s.flush().unwrap();
        let after = s.instance();
        assert!(s.set_epoch(6).is_err());

        drop(s);
        let mut s = Store::open(&dir, e).unwrap();
        assert_eq!((s.epoch(), s.instance()), (7, after));
        assert_eq!(read_range(&mut s, 4, 2), data);
        assert!(is_zero(&read_range(&mut s, 0, 4)));
        assert_eq!(s.chain_names(), vec!["fresh".to_owned()]);
        s.recreate().unwrap();
        assert_empty_replica(&mut s, after);
    }
}

#[test]
fn recreate_survives_reopen_unchanged() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r1");
    let mut s = populated(&dir);
    let before = s.instance();
    s.recreate().unwrap();
    let instance = s.instance();
    drop(s);
    let mut s = Store::open(&dir, EngineChoice::Portable).unwrap();
    assert_eq!(s.instance(), instance);
    assert_empty_replica(&mut s, before);
}

#[test]
fn a_crash_before_the_exchange_leaves_the_old_replica() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r1");
    let mut s = populated(&dir);
    s.flush().unwrap();
    let content = read_all(&mut s);
    let instance = s.instance();
    let fresh = s.prepare_recreate().unwrap();
    let scratch = fresh.scratch.clone();
    assert_eq!(scratch, root.path().join(".r1.recreate"));
    assert!(Store::exists(&scratch), "the new replica is complete");
    drop(fresh);
    drop(s); // crash

    let mut s = Store::open(&dir, EngineChoice::Portable).unwrap();
    assert!(!scratch.exists(), "open deletes the leftover");
    assert_eq!((s.epoch(), s.instance()), (7, instance));
    assert_eq!(read_all(&mut s), content);
    assert_eq!(s.chain_names(), vec![SNAP.to_owned()]);
}

#[test]
fn a_crash_after_the_exchange_leaves_the_new_replica() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r1");
    let s = populated(&dir);
    let before = s.instance();
    let fresh = s.prepare_recreate().unwrap();
    let scratch = fresh.scratch.clone();
    exchange(&scratch, &dir).unwrap();
    let new_instance = Meta::load(&dir).unwrap().instance;
    assert_eq!(
        Meta::load(&scratch).unwrap().instance,
        before,
        "old one aside"
    );
    drop(fresh);
    drop(s); // crash before the old replica is deleted

    let mut s = Store::open(&dir, EngineChoice::Portable).unwrap();
    assert!(!scratch.exists(), "open deletes the old replica");
    assert_eq!(s.instance(), new_instance);
    assert_empty_replica(&mut s, before);
}

#[test]
fn recreate_clears_a_partial_leftover_first() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r1");
    let mut s = populated(&dir);
    let before = s.instance();
    // What a crash half-way through building the scratch directory leaves.
    let scratch = scratch_dir(&dir).unwrap();
    std::fs::create_dir_all(scratch.join("layers")).unwrap();
    std::fs::write(scratch.join("layers/00000001.data"), b"junk").unwrap();
    s.recreate().unwrap();
    assert!(!scratch.exists());
    assert_empty_replica(&mut s, before);
}

#[test]
fn merged_at_reads_the_content_as_of_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path(), 16);
    let a = pattern(31, 4 * BSZ);
    write(&mut s, 0, &a).unwrap(); // blocks 0-3
    s.snapshot_create("s1", 1, vec![]).unwrap();
    let b = pattern(32, 2 * BSZ);
    write(&mut s, 2 * 4096, &b).unwrap(); // blocks 2-3 over s1
    write(&mut s, 8 * 4096, &b).unwrap(); // blocks 8-9, new
    s.snapshot_create("s2", 2, vec![]).unwrap();
    let c = pattern(33, BSZ);
    write(&mut s, 0, &c).unwrap(); // head only
    s.trim(8 * 4096, 4096).unwrap(); // explicit zeros in the head

    let at = |s: &mut Store, name: &str| {
        let mut buf = vec![0u8; 16 * BSZ];
        s.read_layer(&LayerSel::MergedAt(name.into()), 0, &mut buf)
            .unwrap();
        buf
    };
    let mut want1 = vec![0u8; 16 * BSZ];
    want1[..4 * BSZ].copy_from_slice(&a);
    assert_eq!(at(&mut s, "s1"), want1, "s1 is blocks 0-3 of a");
    let mut want2 = want1.clone();
    want2[2 * BSZ..4 * BSZ].copy_from_slice(&b);
    want2[8 * BSZ..10 * BSZ].copy_from_slice(&b);
    assert_eq!(at(&mut s, "s2"), want2, "s2 is s1 with b over it");
    assert_eq!(
        s.extents(&LayerSel::MergedAt("s1".into()), 0, 16 * 4096)
            .unwrap(),
        vec![(0, 4 * 4096)]
    );
    assert_eq!(
        s.extents(&LayerSel::MergedAt("s2".into()), 0, 16 * 4096)
            .unwrap(),
        vec![(0, 4 * 4096), (8 * 4096, 2 * 4096)]
    );

    // A revert to s1 keeps s2 on its own branch: still readable as it was.
    s.snapshot_revert("s1").unwrap();
    assert_eq!(at(&mut s, "s2"), want2);
    assert_eq!(at(&mut s, "s1"), want1);
    assert!(matches!(
        s.extents(&LayerSel::MergedAt("nope".into()), 0, 4096),
        Err(StoreError::NotFound(_))
    ));
}
