//! `Engine::grow` against real replica servers (in-process, on loopback): every write target
//! grows before the new size is served, a replica that does not answer the Grow goes to ERR,
//! a superseded engine cannot grow, an engine started with a larger size grows smaller
//! replicas, and a replica that missed the grow is grown when it is healed.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_blockdev::{BlockDevice, DevError};
use cairn_engine::{Engine, GrowError, GrowStep, Mode};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OLD: u64 = 4 * MIB;
const NEW: u64 = 12 * MIB;

/// A TCP proxy that stops passing engine -> replica bytes while frozen (a replica that no
/// longer answers). Connections made after it thaws pass again.
struct Proxy {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
}

async fn proxy(upstream: SocketAddr) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let f = f.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if f.load(Ordering::SeqCst) {
                        // Frozen: swallow this and everything after, answer nothing.
                        std::future::pending::<()>().await;
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    Proxy { addr, frozen }
}

/// Every RW replica's digest and size: all equal, of `size`.
async fn assert_identical(e: &Engine, size: u64, rw: usize) {
    let d = e.digests().await;
    assert_eq!(d.len(), rw, "{d:?}");
    let first = d[0].1.clone().unwrap();
    assert_eq!(first.1, size, "{d:?}");
    for (id, r) in &d {
        assert_eq!(r.as_ref().unwrap(), &first, "replica {id} differs: {d:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_reaches_every_replica_before_the_new_space_is_served() {
    let c = cluster(3);
    let e = Engine::start(config(&c.addrs, OLD, 1, false)).await;
    let old = pattern(7, usize::try_from(OLD).unwrap());
    for (k, chunk) in old.chunks(usize::try_from(MIB).unwrap()).enumerate() {
        e.write(k as u64 * MIB, Bytes::copy_from_slice(chunk), false)
            .await
            .unwrap();
    }
    // Past the old end: refused before the grow.
    let past = e.write(OLD, pattern(1, 4096), false).await;
    assert!(matches!(past, Err(DevError::OutOfRange { .. })), "{past:?}");

    assert_eq!(e.grow(NEW).await, Ok(GrowStep::Grow));
    assert_eq!(e.size(), NEW);
    assert_eq!(e.current_size(), NEW);
    assert_eq!(e.status().size, NEW);
    assert!(e.status().replicas.iter().all(|r| r.mode == Mode::Rw));

    // Old data intact, new space zeros, then written and read back past the old end.
    assert_eq!(read_all(&e, 0, OLD).await, old.to_vec());
    assert!(read_all(&e, OLD, NEW - OLD).await.iter().all(|b| *b == 0));
    let tail = pattern(99, 2 * usize::try_from(MIB).unwrap());
    e.write(NEW - 2 * MIB, tail.clone(), true).await.unwrap();
    assert_eq!(read_all(&e, NEW - 2 * MIB, 2 * MIB).await, tail.to_vec());
    e.flush().await.unwrap();
    assert_identical(&e, NEW, 3).await;

    // The same size again: nothing to do. Smaller, or not a block multiple: refused.
    assert_eq!(e.grow(NEW).await, Ok(GrowStep::Unchanged));
    assert_eq!(
        e.grow(OLD).await,
        Err(GrowError::Shrink {
            current: NEW,
            requested: OLD
        })
    );
    assert_eq!(e.grow(NEW + 1).await, Err(GrowError::BadSize(NEW + 1)));
    assert_eq!(e.size(), NEW);
    e.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_does_not_grow_goes_err_and_is_grown_when_healed() {
    let c = cluster(3);
    let p = proxy(c.addrs[2]).await;
    let addrs = [c.addrs[0], c.addrs[1], p.addr];
    let e = Engine::start(config(&addrs, OLD, 1, true)).await;
    let old = pattern(3, usize::try_from(MIB).unwrap());
    e.write(MIB, old.clone(), false).await.unwrap();

    p.frozen.store(true, Ordering::SeqCst);
    assert_eq!(e.grow(NEW).await, Ok(GrowStep::Grow));
    let st = e.status();
    assert_eq!(st.size, NEW);
    let modes: Vec<Mode> = st.replicas.iter().map(|r| r.mode).collect();
    assert_eq!(modes[..2], [Mode::Rw, Mode::Rw]);
    assert_ne!(modes[2], Mode::Rw, "r2 did not answer the Grow: {st:?}");
    // Writes past the old end go on with the two grown replicas.
    let tail = pattern(42, usize::try_from(MIB).unwrap());
    e.write(NEW - MIB, tail.clone(), false).await.unwrap();

    // Back: healing grows it (it missed the Grow) and resyncs what it missed.
    p.frozen.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while e.status().replicas.iter().any(|r| r.mode != Mode::Rw) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "r2 not healed: {:?}",
            e.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    e.flush().await.unwrap();
    assert_identical(&e, NEW, 3).await;
    assert_eq!(read_all(&e, MIB, MIB).await, old.to_vec());
    assert_eq!(read_all(&e, NEW - MIB, MIB).await, tail.to_vec());
    e.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_superseded_engine_cannot_grow_the_replicas() {
    let c = cluster(2);
    let old_engine = Engine::start(config(&c.addrs, OLD, 1, false)).await;
    let data = pattern(5, 4096);
    old_engine.write(0, data.clone(), true).await.unwrap();
    // A newer engine takes the replicas over at epoch 2.
    let new_engine = Engine::start(config(&c.addrs, OLD, 2, false)).await;

    let r = old_engine.grow(NEW).await;
    assert!(matches!(r, Err(GrowError::Failed { .. })), "{r:?}");
    assert_eq!(old_engine.size(), OLD, "a refused grow leaves the size");
    assert_eq!(old_engine.status().superseded_by_epoch, Some(2));
    // The replicas did not grow: the newer engine still sees them at the old size.
    assert_identical(&new_engine, OLD, 2).await;
    assert_eq!(read_all(&new_engine, 0, 4096).await, data.to_vec());
    old_engine.shutdown();
    new_engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_started_larger_grows_smaller_replicas() {
    let c = cluster(2);
    let first = Engine::start(config(&c.addrs, OLD, 1, false)).await;
    let data = pattern(11, usize::try_from(MIB).unwrap());
    first.write(OLD - MIB, data.clone(), true).await.unwrap();
    first.shutdown();
    drop(first);

    // The record grew while detached: the next engine starts at the new size.
    let second = Engine::start(config(&c.addrs, NEW, 2, false)).await;
    let st = second.status();
    assert!(st.replicas.iter().all(|r| r.mode == Mode::Rw), "{st:?}");
    assert_eq!(second.size(), NEW);
    assert_eq!(read_all(&second, OLD - MIB, MIB).await, data.to_vec());
    assert!(read_all(&second, OLD, MIB).await.iter().all(|b| *b == 0));
    second
        .write(NEW - 4096, pattern(1, 4096), true)
        .await
        .unwrap();
    assert_identical(&second, NEW, 2).await;
    second.shutdown();
}
