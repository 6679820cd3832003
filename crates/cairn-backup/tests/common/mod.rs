//! Helpers shared by the integration tests: deterministic volume images and a source
//! that pauses at a chosen block so tests can interleave operations without sleeping.
#![allow(dead_code)]

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use cairn_backup::{MemImage, SnapshotSource};
use tokio::sync::{Notify, Semaphore};

pub const MIB: usize = 1024 * 1024;
pub const BS: usize = 2 * MIB;

/// Fills `buf` with incompressible bytes derived from `seed`.
pub fn random_fill(buf: &mut [u8], seed: u64) {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(buf);
}

/// A volume of `blocks` random 2 MiB blocks (each distinct).
pub fn random_volume(blocks: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; blocks * BS];
    random_fill(&mut v, seed);
    v
}

/// Overwrites block `i` of `v` with new random bytes; returns its byte range.
pub fn change_block(v: &mut [u8], i: usize, seed: u64) -> Range<u64> {
    random_fill(&mut v[i * BS..(i + 1) * BS], seed);
    (i * BS) as u64..((i + 1) * BS) as u64
}

/// Asserts two images are equal, naming the first differing byte.
pub fn assert_same(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "sizes differ");
    if got == want {
        return;
    }
    if let Some(pos) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("restored image differs at byte {pos} (block {})", pos / BS);
    }
}

/// A source that runs `on_read(n)` before its n-th read (0-based) and can hold reads
/// from number `hold_from` on until `release` is called.
#[derive(Clone)]
pub struct GatedSource {
    pub inner: MemImage,
    pub reads: Arc<AtomicU64>,
    pub hold_from: u64,
    pub reached: Arc<Notify>,
    pub gate: Arc<Semaphore>,
    pub on_read: Arc<dyn Fn(u64) + Send + Sync>,
}

impl GatedSource {
    pub fn new(inner: MemImage, hold_from: u64) -> Self {
        GatedSource {
            inner,
            reads: Arc::default(),
            hold_from,
            reached: Arc::new(Notify::new()),
            gate: Arc::new(Semaphore::new(0)),
            on_read: Arc::new(|_| {}),
        }
    }
    /// Lets held reads go.
    pub fn release(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

impl SnapshotSource for GatedSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn allocated(&self) -> io::Result<Vec<Range<u64>>> {
        self.inner.allocated().await
    }
    async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst);
        (self.on_read)(n);
        if n >= self.hold_from {
            self.reached.notify_one();
            let _permit = self.gate.acquire().await.expect("gate open");
        }
        self.inner.read(offset, len).await
    }
}
