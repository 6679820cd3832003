//! Unit and model-based tests of the store, run against both I/O backends.

use std::collections::BTreeMap;

use cairn_io::EngineChoice;
use proptest::prelude::*;

use super::*;

mod rebuild;

const BSZ: usize = BLOCK_SIZE as usize;

fn engines() -> Vec<EngineChoice> {
    let mut v = vec![EngineChoice::Portable];
    if cairn_io::Io::new(EngineChoice::Uring).is_ok() {
        v.push(EngineChoice::Uring);
    }
    v
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(s: &mut Store, off: u64, data: &[u8]) -> Result<()> {
    s.write(off, data, &block_crcs(data))
}

fn read_all(s: &mut Store) -> Vec<u8> {
    let mut buf = vec![0u8; s.size() as usize];
    s.read(0, &mut buf).unwrap();
    buf
}

/// Flips one bit of the byte at `offset` in place (keeps the file sparse).
fn flip_byte(path: &std::path::Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).unwrap();
}

fn model_digest(content: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&(content.len() as u64).to_le_bytes());
    for (i, b) in content.chunks(BSZ).enumerate() {
        if b.iter().any(|&x| x != 0) {
            h.update(&(i as u64).to_le_bytes());
            h.update(b);
        }
    }
    *h.finalize().as_bytes()
}

#[test]
fn write_read_trim_round_trip() {
    for e in engines() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), "v", "r1", 1 << 20, e).unwrap();
        let data = pattern(1, 3 * BSZ);
        write(&mut s, 4096, &data).unwrap();
        let mut buf = vec![0u8; 3 * BSZ];
        let crcs = s.read(4096, &mut buf).unwrap();
        assert_eq!(buf, data);
        assert_eq!(crcs, block_crcs(&data));
        s.trim(8192, 4096).unwrap();
        s.read(4096, &mut buf).unwrap();
        assert_eq!(&buf[..BSZ], &data[..BSZ]);
        assert!(buf[BSZ..2 * BSZ].iter().all(|&b| b == 0));
        assert_eq!(&buf[2 * BSZ..], &data[2 * BSZ..]);
        assert_eq!(
            s.extents(&LayerSel::Head, 0, 1 << 20).unwrap(),
            vec![(4096, 4096), (12288, 4096)]
        );
    }
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::create(dir.path(), "v", "r1", 64 * 4096, EngineChoice::Portable).unwrap();
    let data = pattern(2, BSZ);
    write(&mut s, 0, &data).unwrap();
    assert!(matches!(
        write(&mut s, 1, &data),
        Err(StoreError::Misaligned { .. })
    ));
    assert!(matches!(
        write(&mut s, 64 * 4096, &data),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        write(&mut s, u64::MAX - 4095, &data),
        Err(StoreError::OutOfRange { .. })
    ));
    let bad = pattern(3, BSZ);
    assert!(matches!(
        s.write(0, &bad, &[crc32fast::hash(&data)]),
        Err(StoreError::ChecksumMismatch { offset: 0 })
    ));
    assert!(matches!(
        s.write(0, &bad, &[]),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        s.trim(4096, 10),
        Err(StoreError::Misaligned { .. })
    ));
    let mut buf = vec![0u8; BSZ];
    s.read(0, &mut buf).unwrap();
    assert_eq!(buf, data);
    assert!(matches!(
        s.snapshot_create("a/b", 0, vec![]),
        Err(StoreError::InvalidArgument(_))
    ));
    s.snapshot_create("s1", 0, vec![]).unwrap();
    assert!(matches!(
        s.snapshot_create("s1", 0, vec![]),
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.snapshot_delete("nope"),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(s.grow(4096), Err(StoreError::InvalidArgument(_))));
}

#[test]
fn trim_in_head_hides_snapshot_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::create(dir.path(), "v", "r1", 16 * 4096, EngineChoice::Portable).unwrap();
    let data = pattern(4, 4 * BSZ);
    write(&mut s, 0, &data).unwrap();
    s.snapshot_create("s1", 1, vec![("k".into(), "v".into())])
        .unwrap();
    s.trim(0, 2 * 4096).unwrap();
    let mut buf = vec![0u8; 4 * BSZ];
    s.read(0, &mut buf).unwrap();
    assert!(buf[..2 * BSZ].iter().all(|&b| b == 0));
    assert_eq!(&buf[2 * BSZ..], &data[2 * BSZ..]);
    drop(s);
    let mut s = Store::open(dir.path(), EngineChoice::Portable).unwrap();
    s.read(0, &mut buf).unwrap();
    assert!(buf[..2 * BSZ].iter().all(|&b| b == 0));
    let list = s.snapshot_list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].labels, vec![("k".to_owned(), "v".to_owned())]);
    assert_eq!(list[0].allocated_bytes, 4 * 4096);
}

#[test]
fn bit_rot_is_reported_for_exactly_that_block() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::create(dir.path(), "v", "r1", 16 * 4096, EngineChoice::Portable).unwrap();
    let data = pattern(5, 4 * BSZ);
    write(&mut s, 0, &data).unwrap();
    s.flush().unwrap();
    s.flush().unwrap(); // second flush clears the regions the first interval touched
    drop(s);
    let path = dir.path().join("layers/00000001.data");
    flip_byte(&path, (2 * BSZ + 17) as u64);
    let mut s = Store::open(dir.path(), EngineChoice::Portable).unwrap();
    assert_eq!(s.recovery_report().checksums_repaired, 0);
    let mut buf = vec![0u8; BSZ];
    for b in [0u64, 1, 3] {
        s.read(b * 4096, &mut buf).unwrap();
        assert_eq!(buf, data[b as usize * BSZ..(b as usize + 1) * BSZ]);
    }
    match s.read(2 * 4096, &mut buf) {
        Err(StoreError::Corruption { offset, .. }) => assert_eq!(offset, 2 * 4096),
        other => panic!("expected corruption, got {other:?}"),
    }
    let bad = s.scrub(|_, _| {}).unwrap();
    assert_eq!(
        bad,
        vec![CorruptBlock {
            layer: "head".into(),
            offset: 2 * 4096
        }]
    );
}

#[test]
fn dirty_regions_repair_torn_checksums_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::create(dir.path(), "v", "r1", 16 * 4096, EngineChoice::Portable).unwrap();
    let data = pattern(6, 2 * BSZ);
    write(&mut s, 0, &data).unwrap();
    assert_eq!(s.dirty_regions().1, vec![0]);
    drop(s); // no flush: region 0 stays marked
             // Simulate a crash that wrote new data but not its checksum.
    let path = dir.path().join("layers/00000001.data");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(7, BSZ), 0).unwrap();
    let mut s = Store::open(dir.path(), EngineChoice::Portable).unwrap();
    assert_eq!(s.recovery_report().dirty_regions, 1);
    assert_eq!(s.recovery_report().checksums_repaired, 1);
    assert!(s.scrub(|_, _| {}).unwrap().is_empty());
    // The mark survives recovery (a restarted engine resyncs from it) until a flush.
    assert_eq!(s.dirty_regions().1, vec![0]);
    s.flush().unwrap();
    assert!(s.dirty_regions().1.is_empty());
}

#[test]
fn large_writes_ending_on_a_region_boundary_mark_ahead_and_small_ones_do_not() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::create(dir.path(), "v", "r1", 64 * MIB, EngineChoice::Portable).unwrap();
    // A 4 KiB write ending at the end of region 3: no mark ahead.
    write(&mut s, 4 * MIB - 4096, &pattern(1, BSZ)).unwrap();
    assert_eq!(s.dirty_regions().1, vec![3]);
    // A 64 KiB write in the middle of region 10: no mark ahead either.
    write(&mut s, 10 * MIB + 4096, &pattern(2, 16 * BSZ)).unwrap();
    assert_eq!(s.dirty_regions().1, vec![3, 10]);
    // A 1 MiB write of region 20 (ends on the boundary): regions 21..29 marked with it.
    write(&mut s, 20 * MIB, &pattern(3, 256 * BSZ)).unwrap();
    let want: Vec<u64> = [3, 10].into_iter().chain(20..29).collect();
    assert_eq!(s.dirty_regions().1, want);
    // Near the end of the volume the marks stop at the last region.
    write(&mut s, 62 * MIB, &pattern(4, 512 * BSZ)).unwrap();
    assert_eq!(s.dirty_regions().1.last(), Some(&63));
    // Marks ahead are cleared like any other after two flushes without writes there.
    s.flush().unwrap();
    s.flush().unwrap();
    assert!(s.dirty_regions().1.is_empty());
}

#[test]
fn epoch_persists_and_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::create(dir.path(), "v", "r1", 4096, EngineChoice::Portable).unwrap();
    s.set_epoch(5).unwrap();
    assert!(s.set_epoch(4).is_err());
    drop(s);
    let s = Store::open(dir.path(), EngineChoice::Portable).unwrap();
    assert_eq!(s.epoch(), 5);
}

#[test]
fn delete_with_two_children_after_revert_keeps_all_content() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::create(dir.path(), "v", "r1", 8 * 4096, EngineChoice::Portable).unwrap();
    let a = pattern(8, 8 * BSZ);
    write(&mut s, 0, &a).unwrap();
    s.snapshot_create("s1", 1, vec![]).unwrap();
    write(&mut s, 0, &pattern(9, BSZ)).unwrap();
    s.snapshot_create("s2", 2, vec![]).unwrap();
    let s2_content = read_all(&mut s);
    s.snapshot_revert("s1").unwrap(); // s1 now has children s2 and the head
    s.snapshot_delete("s1").unwrap(); // hidden, kept until one child is left
    assert_eq!(s.snapshot_list().len(), 1);
    assert_eq!(read_all(&mut s), a);
    s.snapshot_revert("s2").unwrap(); // the head under s1 goes: s1 merges into s2
    assert_eq!(read_all(&mut s), s2_content);
    drop(s);
    let mut s = Store::open(dir.path(), EngineChoice::Portable).unwrap();
    assert_eq!(read_all(&mut s), s2_content);
    assert_eq!(s.chain_names(), vec!["s2".to_owned()]);
    assert!(s.scrub(|_, _| {}).unwrap().is_empty());
}

#[allow(clippy::map_entry)]
#[derive(Debug, Clone)]
enum Action {
    Write {
        block: u64,
        blocks: u64,
        seed: u64,
    },
    Trim {
        block: u64,
        blocks: u64,
    },
    Zero {
        block: u64,
        blocks: u64,
        no_hole: bool,
    },
    Flush,
    Snapshot(u8),
    Delete(u8),
    Revert(u8),
    Grow(u64),
    Reopen,
    Recreate,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0u64..96, 1u64..9, any::<u64>()).prop_map(|(block, blocks, seed)| Action::Write { block, blocks, seed }),
        2 => (0u64..96, 1u64..20).prop_map(|(block, blocks)| Action::Trim { block, blocks }),
        1 => (0u64..96, 1u64..20, any::<bool>()).prop_map(|(block, blocks, no_hole)| Action::Zero { block, blocks, no_hole }),
        1 => Just(Action::Flush),
        2 => (0u8..4).prop_map(Action::Snapshot),
        1 => (0u8..4).prop_map(Action::Delete),
        1 => (0u8..4).prop_map(Action::Revert),
        1 => (0u64..16).prop_map(Action::Grow),
        1 => Just(Action::Reopen),
        1 => Just(Action::Recreate),
    ]
}

#[allow(clippy::map_entry)]
fn run_model(engine: EngineChoice, actions: &[Action]) -> std::result::Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut size = 64 * 4096u64;
    let mut s = Store::create(dir.path(), "v", "r1", size, engine).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut snaps: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for a in actions {
        match a {
            Action::Write {
                block,
                blocks,
                seed,
            } => {
                let (off, len) = (block * 4096, blocks * 4096);
                let data = pattern(*seed, len as usize);
                let r = write(&mut s, off, &data);
                if off + len <= size {
                    prop_assert!(r.is_ok(), "{r:?}");
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                } else {
                    let out_of_range = matches!(r, Err(StoreError::OutOfRange { .. }));
                    prop_assert!(out_of_range, "{r:?}");
                }
            }
            Action::Trim { block, blocks } | Action::Zero { block, blocks, .. } => {
                let (off, len) = (block * 4096, blocks * 4096);
                let r = match a {
                    Action::Zero { no_hole, .. } => s.write_zeroes(off, len, *no_hole),
                    _ => s.trim(off, len),
                };
                if off + len <= size {
                    prop_assert!(r.is_ok(), "{r:?}");
                    model[off as usize..(off + len) as usize].fill(0);
                } else {
                    prop_assert!(r.is_err());
                }
            }
            Action::Flush => s.flush().unwrap(),
            Action::Snapshot(n) => {
                let name = format!("s{n}");
                let r = s.snapshot_create(&name, u64::from(*n), vec![]);
                if snaps.contains_key(&name) {
                    let exists = matches!(r, Err(StoreError::AlreadyExists(_)));
                    prop_assert!(exists);
                } else {
                    prop_assert!(r.is_ok(), "{r:?}");
                    snaps.insert(name, model.clone());
                }
            }
            Action::Delete(n) => {
                let name = format!("s{n}");
                let r = s.snapshot_delete(&name);
                prop_assert_eq!(r.is_ok(), snaps.remove(&name).is_some(), "{:?}", r);
            }
            Action::Revert(n) => {
                let name = format!("s{n}");
                let r = s.snapshot_revert(&name);
                match snaps.get(&name) {
                    Some(content) => {
                        prop_assert!(r.is_ok(), "{r:?}");
                        model = content.clone();
                        model.resize(size as usize, 0);
                    }
                    None => prop_assert!(r.is_err()),
                }
            }
            Action::Grow(extra) => {
                size += extra * 4096;
                s.grow(size).unwrap();
                model.resize(size as usize, 0);
            }
            Action::Reopen => {
                s.flush().unwrap();
                drop(s);
                s = Store::open(dir.path(), engine).unwrap();
            }
            Action::Recreate => {
                let instance = s.instance();
                s.recreate().unwrap();
                prop_assert_ne!(s.instance(), instance);
                model.fill(0);
                snaps.clear();
            }
        }
        prop_assert_eq!(s.size(), size);
    }
    prop_assert!(read_all(&mut s) == model, "content differs from the model");
    prop_assert_eq!(s.digest().unwrap(), model_digest(&model));
    let names: Vec<String> = s.snapshot_list().into_iter().map(|i| i.name).collect();
    let expected: Vec<String> = snaps.keys().cloned().collect();
    let mut sorted = names.clone();
    sorted.sort();
    prop_assert_eq!(sorted, expected);
    let clean = s.scrub(|_, _| {}).unwrap().is_empty();
    prop_assert!(clean);
    // Every remaining snapshot still has its content.
    for (name, content) in &snaps {
        s.snapshot_revert(name).unwrap();
        let mut c = content.clone();
        c.resize(size as usize, 0);
        prop_assert!(read_all(&mut s) == c, "snapshot {name} differs");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model_portable(actions in proptest::collection::vec(action(), 1..40)) {
        run_model(EngineChoice::Portable, &actions)?;
    }

    #[test]
    fn store_matches_model_uring(actions in proptest::collection::vec(action(), 1..40)) {
        if cairn_io::Io::new(EngineChoice::Uring).is_err() {
            eprintln!("io_uring unavailable here; the portable run covers the store");
            return Ok(());
        }
        run_model(EngineChoice::Uring, &actions)?;
    }
}

#[test]
fn digest_is_independent_of_layering() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let mut a = Store::create(d1.path(), "v", "a", 32 * 4096, EngineChoice::Portable).unwrap();
    let mut b = Store::create(d2.path(), "v", "b", 32 * 4096, EngineChoice::Portable).unwrap();
    let x = pattern(10, 8 * BSZ);
    write(&mut a, 0, &x).unwrap();
    a.snapshot_create("s", 0, vec![]).unwrap();
    a.write_zeroes(4096, 4096, true).unwrap();
    write(&mut b, 0, &x).unwrap();
    b.trim(4096, 4096).unwrap();
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    write(&mut b, 8192, &pattern(11, BSZ)).unwrap();
    assert_ne!(a.digest().unwrap(), b.digest().unwrap());
}
