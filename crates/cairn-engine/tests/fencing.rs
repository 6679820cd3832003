//! A fenced-out engine serves nothing: once a replica refuses its epoch because a newer
//! engine attached, every later read, write and flush fails — including a write that a
//! replica the new engine has not reached yet would still accept. Otherwise the old owner
//! (a node that lost its publish) could acknowledge writes the new owner never sees.

mod common;

use cairn_blockdev::BlockDevice;
use cairn_engine::Engine;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_superseded_engine_acknowledges_nothing_even_where_a_replica_would_take_it() {
    let c = cluster(2);
    let old = Engine::start(config(&c.addrs, 4 * MIB, 1, false)).await;
    let before = pattern(3, 4096);
    old.write(0, before.clone(), true).await.unwrap();

    // The new owner reaches only r0 (r1's node is cut off from it): r0 moves to epoch 2,
    // r1 still accepts epoch 1.
    let new = Engine::start(config(&c.addrs[..1], 4 * MIB, 2, false)).await;

    let late = pattern(9, 4096);
    let r = old.write(0, late.clone(), true).await;
    assert!(
        r.is_err(),
        "a write of the fenced engine was acknowledged: {r:?}"
    );
    assert_eq!(old.status().superseded_by_epoch, Some(2));
    for (what, r) in [
        (
            "write",
            old.write(8192, late.clone(), false).await.map(drop),
        ),
        ("read", old.read(0, 4096).await.map(drop)),
        ("flush", old.flush().await),
    ] {
        let e = r.expect_err(what).to_string();
        assert!(e.contains("fenced"), "{what}: {e}");
    }
    // The new owner sees the data as it was before it took over.
    assert_eq!(read_all(&new, 0, 4096).await, before.to_vec());
    old.shutdown();
    new.shutdown();
}
