//! cairn-blockdev: what a frontend (NBD, later iSCSI) needs from a volume.
//!
//! A frontend decodes and validates a client's request, then calls one method of
//! [`BlockDevice`]. It never knows about replicas: the volume engine implements the trait.
//! [`MemDevice`] implements it in memory for frontend tests.
//!
//! Contract every implementation keeps:
//! - offsets and lengths are multiples of [`BlockDevice::block_size`] and inside
//!   [`BlockDevice::size`]; anything else is refused with `Misaligned` / `OutOfRange` and
//!   changes nothing (frontends validate first, so this is a second line of defence);
//! - a write (or write-zeroes, trim) that returned `Ok` is seen by every later read on any
//!   connection; with `fua` it is durable before the call returns; `flush` makes every write
//!   that returned before it durable.

use std::future::Future;
use std::sync::Mutex;

use bytes::Bytes;

/// Errors a device reports. Frontends map each to their protocol's error (one place each).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevError {
    #[error("range {offset}+{len} is outside the device ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("range {offset}+{len} is not aligned to the block size")]
    Misaligned { offset: u64, len: u64 },
    #[error("no space left on the device")]
    NoSpace,
    #[error("request of {len} bytes is larger than the device accepts ({max})")]
    TooLarge { len: u64, max: u64 },
    #[error("I/O error: {0}")]
    Io(String),
}

/// A volume as frontends see it. Methods return `Send` futures so a frontend can drive many
/// requests of one connection concurrently on a multi-threaded runtime.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Minimum and preferred I/O size in bytes (a power of two, 4096 for Cairn volumes).
    fn block_size(&self) -> u32 {
        4096
    }
    /// Largest single read or write, in bytes.
    fn max_io(&self) -> u32 {
        32 << 20
    }
    /// True when several connections may use the device at once and a flush on one covers
    /// writes completed on all (NBD multi-conn).
    fn multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, DevError>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), DevError>> + Send;
    /// Makes the range read as zeros; with `no_hole` the space stays allocated.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> impl Future<Output = Result<(), DevError>> + Send;
    /// Discards the range; it reads back as zeros.
    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), DevError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), DevError>> + Send;
    /// The allocated extents `(offset, len)` inside `offset..offset+len`, ascending; the rest
    /// is holes that read as zeros.
    fn allocated(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<(u64, u64)>, DevError>> + Send;
}

/// Checks `offset..offset+len` against block alignment and `size`.
pub fn check_range(offset: u64, len: u64, size: u64, block: u32) -> Result<(), DevError> {
    let b = u64::from(block);
    if !offset.is_multiple_of(b) || !len.is_multiple_of(b) {
        return Err(DevError::Misaligned { offset, len });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DevError::OutOfRange { offset, len, size }),
    }
}

/// An in-memory device for tests: content plus a per-block allocation map.
pub struct MemDevice {
    inner: Mutex<Mem>,
    size: u64,
}

struct Mem {
    data: Vec<u8>,
    allocated: Vec<bool>,
    flushes: u64,
}

impl MemDevice {
    pub fn new(size: u64) -> MemDevice {
        let blocks = usize::try_from(size / 4096).unwrap_or(0);
        MemDevice {
            inner: Mutex::new(Mem {
                data: vec![0; usize::try_from(size).unwrap_or(0)],
                allocated: vec![false; blocks],
                flushes: 0,
            }),
            size,
        }
    }

    /// A copy of the whole content.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// Flushes seen so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn span(&self, offset: u64, len: u64) -> Result<(usize, usize), DevError> {
        check_range(offset, len, self.size, 4096)?;
        let a = usize::try_from(offset).map_err(|_| DevError::OutOfRange {
            offset,
            len,
            size: self.size,
        })?;
        let n = usize::try_from(len).map_err(|_| DevError::TooLarge {
            len,
            max: self.size,
        })?;
        Ok((a, a + n))
    }

    fn set(
        &self,
        offset: u64,
        len: u64,
        bytes: Option<&[u8]>,
        alloc: bool,
    ) -> Result<(), DevError> {
        let (a, z) = self.span(offset, len)?;
        let mut m = self.lock();
        match bytes {
            Some(b) => m.data[a..z].copy_from_slice(b),
            None => m.data[a..z].fill(0),
        }
        m.allocated[a / 4096..z / 4096].fill(alloc);
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DevError> {
        let (a, z) = self.span(offset, u64::from(len))?;
        Ok(Bytes::copy_from_slice(&self.lock().data[a..z]))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), DevError> {
        self.set(offset, data.len() as u64, Some(&data), true)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _fua: bool,
        no_hole: bool,
    ) -> Result<(), DevError> {
        self.set(offset, len, None, no_hole)
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DevError> {
        self.set(offset, len, None, false)
    }

    async fn flush(&self) -> Result<(), DevError> {
        self.lock().flushes += 1;
        Ok(())
    }

    async fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, DevError> {
        let (a, z) = self.span(offset, len)?;
        let m = self.lock();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in a / 4096..z / 4096 {
            if m.allocated[b] {
                let off = b as u64 * 4096;
                match out.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += 4096,
                    _ => out.push((off, 4096)),
                }
            }
        }
        Ok(out)
    }
}
