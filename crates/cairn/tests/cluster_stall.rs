//! A replica that stops answering (SIGSTOP) while writes stream through a real `cairn dev`
//! with `--io-timeout 2s`: the writes in flight wait for it at most the timeout, then it is
//! dropped (ERR) and every write completes on the other two, whose content is exact.
//!
//! Alone in its binary: a timeout this short must not see other tests' load.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{
    all_zero, assert_modes, assert_same_bytes, enter_private_netns, have_tools, nbdcopy_out,
    pattern, replica_status, wait_until, Dev, NbdClient, BS, NBD_ADDR,
};

const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// 16 MiB written over and over, in 64 KiB writes.
const REGION_BLOCKS: u64 = 4096;
const CHUNK_BLOCKS: u64 = 16;
const ROUNDS: u64 = 3;
const WINDOW: usize = 16;

/// Writes the region `ROUNDS` times (round r's content is write tag r), pipelined, each
/// round ending with a flush. Every write and flush must succeed. Counts acknowledged writes
/// in `acked`; returns the longest time any write waited for its reply.
fn stream_writes(acked: &AtomicU64) -> Duration {
    let mut nbd = NbdClient::connect(NBD_ADDR, "vol0");
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    let mut longest = Duration::ZERO;
    let mut take = |nbd: &mut NbdClient, sent_at: &mut HashMap<u64, Instant>| {
        let r = nbd.recv();
        assert_eq!(
            r.error, 0,
            "a write or flush failed while r3 was stopped: {r:?}"
        );
        if let Some(t) = sent_at.remove(&r.cookie) {
            longest = longest.max(t.elapsed());
            acked.fetch_add(1, Ordering::SeqCst);
        }
    };
    for tag in 1..=ROUNDS {
        for first in (0..REGION_BLOCKS).step_by(CHUNK_BLOCKS as usize) {
            while nbd.in_flight() >= WINDOW {
                take(&mut nbd, &mut sent_at);
            }
            let data = pattern(tag, first, CHUNK_BLOCKS);
            let now = Instant::now();
            let cookie = nbd.send_write(first * BS, &data);
            sent_at.insert(cookie, now);
        }
        while nbd.in_flight() > 0 {
            take(&mut nbd, &mut sent_at);
        }
        nbd.flush().expect("flush after a round");
    }
    longest
}

#[test]
fn stopped_replica_is_dropped_after_the_io_timeout() {
    if !enter_private_netns() || !have_tools(&["nbdcopy"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut dev = Dev::start(&tmp.path().join("data"), "2s");

    let acked = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    {
        // The thread inherits this thread's network namespace.
        let acked = acked.clone();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(|| stream_writes(&acked));
            let _ = done_tx.send(r);
        });
    }
    let total = ROUNDS * REGION_BLOCKS / CHUNK_BLOCKS;
    wait_until(
        "64 writes to be acknowledged",
        Duration::from_secs(60),
        || acked.load(Ordering::SeqCst) >= 64,
    );
    let r3 = dev.signal_replica("r3", libc::SIGSTOP);
    let at_stop = acked.load(Ordering::SeqCst);
    assert!(at_stop < total, "all writes were done before r3 stopped");

    let longest = match done_rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(longest)) => longest,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(e) => panic!("the writes did not complete within 120 s of stopping r3: {e}"),
    };
    eprintln!("r3 (pid {r3}) stopped after {at_stop} of {total} writes; longest write {longest:?}");
    assert_eq!(acked.load(Ordering::SeqCst), total);
    assert!(
        longest < IO_TIMEOUT + Duration::from_secs(5),
        "a write waited {longest:?} with --io-timeout {IO_TIMEOUT:?}"
    );

    let status = dev.status();
    assert_modes(&status, &[("r1", "RW"), ("r2", "RW"), ("r3", "ERR")]);
    assert!(
        replica_status(&status, "r3")["last_error"].is_string(),
        "{status:#}"
    );

    // The last round's content, exactly, from r1 and r2 (two reads cover both in turn).
    let want = pattern(ROUNDS, 0, REGION_BLOCKS);
    for i in 0..2 {
        let back = nbdcopy_out(tmp.path());
        assert_same_bytes(
            &back[..want.len()],
            &want,
            &format!("read {i} of the region"),
        );
        assert!(all_zero(&back[want.len()..]), "read {i}: the rest is zeros");
    }
    dev.assert_verified("r1 and r2 after r3 was dropped");

    common::send_signal(r3, libc::SIGCONT);
    dev.stop();
}
