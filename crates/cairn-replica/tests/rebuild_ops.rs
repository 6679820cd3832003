//! The rebuild operations (Unmap, RangeDigests, Recreate) and StaleEpoch details, end to end
//! over TCP: a real replica server on a loopback port, driven by the blocking client.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use cairn_replica::Client;
use cairn_wire::{ErrorKind, LayerRef, ReplyBody, Request, DEFAULT_MAX_FRAME};

use common::{pattern, remote, serve};

const BS: u64 = 4096;
const BSZ: usize = 4096;
const B32: u32 = 4096;
const SIZE: u64 = 64 * BS;

fn snapshot(c: &mut Client, name: &str) {
    c.call(&Request::SnapshotCreate {
        name: name.into(),
        created_unix_ms: 1,
        labels: vec![],
    })
    .unwrap();
}

/// Attaches to replica `id` at epoch 3, creating it.
fn attach(addr: SocketAddr, id: &str) -> Client {
    let mut c = Client::connect(addr, 3).unwrap();
    c.hello("vol", id, SIZE).unwrap();
    c
}

/// Same writes on replica `id`: snapshot `s1` over blocks 0..4 of `a`, then blocks 0..2 of
/// `b` and block 10 (`a`'s first block) in the head.
fn populate(addr: SocketAddr, id: &str, a: &Bytes, b: &Bytes) -> Client {
    let mut c = attach(addr, id);
    c.write(0, a.clone(), false).unwrap();
    snapshot(&mut c, "s1");
    c.write(0, b.clone(), false).unwrap();
    c.write(10 * BS, a.slice(..BSZ), false).unwrap();
    c
}

/// Granules of 4 blocks over the first 16 blocks.
const G: u32 = 4 * B32;

#[test]
fn unmap_range_digests_and_recreate_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let addr = serve(dir.path(), DEFAULT_MAX_FRAME);
    let (a, b) = (pattern(1, 4 * BSZ), pattern(2, 2 * BSZ));
    let mut c = populate(addr, "r1", &a, &b);
    let mut peer = populate(addr, "r2", &a, &b);
    // Holds exactly what r1's head holds in blocks 0..16, but in a single layer.
    let mut flat = attach(addr, "r3");
    flat.write(0, b.clone(), false).unwrap();
    flat.write(10 * BS, a.slice(..BSZ), false).unwrap();
    let mut empty = attach(addr, "r4");
    let holes = empty.range_digests(LayerRef::Head, 0, 16 * BS, G).unwrap();

    // RangeDigests: equal between replicas with the same layers.
    for layer in [
        LayerRef::Head,
        LayerRef::Snapshot("s1".into()),
        LayerRef::Merged,
    ] {
        let mine = c.range_digests(layer.clone(), 0, 16 * BS, G).unwrap();
        assert_eq!(mine.len(), 4);
        let theirs = peer.range_digests(layer.clone(), 0, 16 * BS, G).unwrap();
        assert_eq!(mine, theirs, "{layer:?}");
    }
    // Head looks at the head alone: the same as a replica holding just those blocks.
    let head = c.range_digests(LayerRef::Head, 0, 16 * BS, G).unwrap();
    assert_eq!(
        head,
        flat.range_digests(LayerRef::Head, 0, 16 * BS, G).unwrap()
    );
    assert_eq!(head[1], holes[1]);
    assert_ne!(head[0], holes[0]);
    // The snapshot alone differs from the head where they differ (granule 0, and 2 where
    // only the head holds block 10); granule 1 and 3 are holes in both.
    let snap = c
        .range_digests(LayerRef::Snapshot("s1".into()), 0, 16 * BS, G)
        .unwrap();
    let differ: Vec<usize> = (0..4).filter(|&i| snap[i] != head[i]).collect();
    assert_eq!(differ, vec![0, 2]);
    // The last granule may be shorter.
    assert_eq!(
        c.range_digests(LayerRef::Merged, 0, 10 * BS, G)
            .unwrap()
            .len(),
        3
    );

    // One differing block on the peer shows in exactly its granule.
    peer.write(5 * BS, pattern(9, BSZ), false).unwrap();
    let mine = c.range_digests(LayerRef::Merged, 0, 16 * BS, G).unwrap();
    let theirs = peer.range_digests(LayerRef::Merged, 0, 16 * BS, G).unwrap();
    let differ: Vec<usize> = (0..4).filter(|&i| mine[i] != theirs[i]).collect();
    assert_eq!(differ, vec![1]);

    // Unmap drops the head's blocks: the snapshot shows through, elsewhere zeros.
    c.unmap(0, 16 * BS).unwrap();
    assert_eq!(c.read(0, 4 * B32).unwrap(), a);
    assert!(c.read(10 * BS, B32).unwrap().iter().all(|&x| x == 0));
    assert_eq!(
        c.range_digests(LayerRef::Head, 0, 16 * BS, G).unwrap(),
        holes
    );
    assert_eq!(
        c.range_digests(LayerRef::Merged, 0, 16 * BS, G).unwrap(),
        snap,
        "merged content is now the snapshot's"
    );
    let e = remote(c.unmap(BS / 2, BS));
    assert_eq!(e.kind, ErrorKind::Misaligned);
    let e = remote(c.unmap(0, SIZE + BS));
    assert_eq!(e.kind, ErrorKind::OutOfRange);
    let e = remote(c.range_digests(LayerRef::Head, 0, BS, 100));
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    let e = remote(c.range_digests(LayerRef::Snapshot("nope".into()), 0, BS, G));
    assert_eq!(e.kind, ErrorKind::NotFound);

    // Recreate: empty, same epoch, new instance; the other replicas are untouched.
    let peer_instance = peer.status().unwrap().instance;
    let before = c.status().unwrap();
    assert_ne!(before.instance, 0);
    assert_ne!(before.instance, peer_instance);
    assert_eq!(before.chain, vec!["s1".to_owned()]);
    let after = c.recreate().unwrap();
    assert_eq!(after.epoch, before.epoch);
    assert_ne!(after.instance, before.instance);
    assert_ne!(after.instance, 0);
    assert_eq!(
        (after.size, after.volume.as_str(), after.replica_id.as_str()),
        (SIZE, "vol", "r1")
    );
    assert!(after.chain.is_empty());
    assert_eq!(after.counters.dirty_regions, 0);
    assert_eq!(c.status().unwrap().instance, after.instance);
    assert!(c.read(0, 64 * B32).unwrap().iter().all(|&x| x == 0));
    match c.call(&Request::SnapshotList).unwrap() {
        ReplyBody::Snapshots(s) => assert!(s.is_empty()),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.range_digests(LayerRef::Merged, 0, 16 * BS, G).unwrap(),
        holes
    );
    let e = remote(c.range_digests(LayerRef::Snapshot("s1".into()), 0, BS, G));
    assert_eq!(e.kind, ErrorKind::NotFound);
    // The replica serves on, to this connection and to new ones.
    c.write(0, b.clone(), true).unwrap();
    let mut other = Client::connect(addr, 3).unwrap();
    let status = other.hello("vol", "r1", 0).unwrap();
    assert_eq!(status.instance, after.instance);
    assert_eq!(other.read(0, 2 * B32).unwrap(), b);
    assert_eq!(peer.status().unwrap().instance, peer_instance);
    assert_eq!(peer.read(0, 2 * B32).unwrap(), b);
}

#[test]
fn recreate_needs_a_hello_and_the_current_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let addr = serve(dir.path(), DEFAULT_MAX_FRAME);
    let mut fresh = Client::connect(addr, 1).unwrap();
    let e = remote(fresh.recreate());
    assert_eq!(e.kind, ErrorKind::NotReady);

    let mut old = Client::connect(addr, 4).unwrap();
    old.hello("vol", "r1", SIZE).unwrap();
    old.write(0, pattern(3, BSZ), false).unwrap();
    let mut new = Client::connect(addr, 6).unwrap();
    new.hello("vol", "r1", 0).unwrap();

    // Per-frame check: the old connection is fenced; detail carries the accepted epoch.
    for e in [
        remote(old.recreate()),
        remote(old.unmap(0, BS)),
        remote(old.range_digests(LayerRef::Head, 0, BS, 4096)),
        remote(old.read(0, B32)),
    ] {
        assert_eq!((e.kind, e.detail), (ErrorKind::StaleEpoch, 6), "{e:?}");
    }
    // Hello check: an older engine is refused with the same detail.
    let mut older = Client::connect(addr, 5).unwrap();
    let e = remote(older.hello("vol", "r1", 0));
    assert_eq!((e.kind, e.detail), (ErrorKind::StaleEpoch, 6));
    // The fenced recreate did nothing.
    assert_eq!(new.read(0, B32).unwrap(), pattern(3, BSZ));
    let s = new.recreate().unwrap();
    assert_eq!(s.epoch, 6);
    let e = remote(older.hello("vol", "r1", 0));
    assert_eq!(
        (e.kind, e.detail),
        (ErrorKind::StaleEpoch, 6),
        "epoch survives recreate"
    );
}

#[test]
fn range_digests_must_fit_in_a_reply_frame() {
    let dir = tempfile::tempdir().unwrap();
    let addr = serve(dir.path(), 64 * 1024);
    let mut c = Client::connect(addr, 1).unwrap();
    c.hello("vol", "r1", 4096 * BS).unwrap();
    // 1024 digests: 32 KiB of body, fits.
    assert_eq!(
        c.range_digests(LayerRef::Merged, 0, 1024 * BS, 4096)
            .unwrap()
            .len(),
        1024
    );
    // 4096 digests: 128 KiB, over the 64 KiB frame limit.
    let e = remote(c.range_digests(LayerRef::Merged, 0, 4096 * BS, 4096));
    assert_eq!(e.kind, ErrorKind::TooLarge);
    // The connection is still usable.
    c.write(0, pattern(4, BSZ), false).unwrap();
}
