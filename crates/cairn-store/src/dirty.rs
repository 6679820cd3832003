//! The dirty-region log: which regions of the head may hold a data block and a checksum
//! that disagree because a crash came between writing one and the other.
//!
//! Invariant: before the first write to a region since the region was last cleared, its bit
//! is set in `dirty.log` and the file is fdatasynced (`mark`). A bit is cleared only after a
//! flush that covered every write to the region (`after_flush`); clearing needs no sync,
//! since a bit left set only costs recovery work. A region written in a flush interval
//! stays marked through the next flush, so a hot region is not re-marked (one fdatasync)
//! after every flush. The file is fully allocated at creation so marking never needs space.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;

use cairn_io::Io;
use roaring::RoaringBitmap;

use crate::error::Result;

pub(crate) const DIRTY_FILE: &str = "dirty.log";

/// Regions marked past the end of a write that ends on a region boundary.
pub(crate) const MARK_AHEAD: u32 = 8;
/// Smallest write that marks ahead.
const MARK_AHEAD_MIN_WRITE: u64 = 64 << 10;

pub(crate) struct DirtyLog {
    file: File,
    region_size: u64,
    /// Regions of the volume.
    count: u32,
    bits: Vec<u8>,
    /// Regions whose bit is set on disk.
    marked: RoaringBitmap,
    /// Regions written since the last flush.
    touched: RoaringBitmap,
}

fn region_count(size: u64, region_size: u64) -> u32 {
    u32::try_from(size.div_ceil(region_size)).unwrap_or(u32::MAX)
}

fn bytes_for(size: u64, region_size: u64) -> usize {
    usize::try_from(size.div_ceil(region_size).div_ceil(8)).unwrap_or(usize::MAX)
}

impl DirtyLog {
    pub(crate) fn create(dir: &Path, size: u64, region_size: u64) -> Result<DirtyLog> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(DIRTY_FILE))?;
        let bits = vec![0u8; bytes_for(size, region_size)];
        std::io::Write::write_all(&mut file, &bits)?;
        file.sync_all()?;
        Ok(DirtyLog {
            file,
            region_size,
            count: region_count(size, region_size),
            bits,
            marked: RoaringBitmap::new(),
            touched: RoaringBitmap::new(),
        })
    }

    pub(crate) fn open(dir: &Path, size: u64, region_size: u64) -> Result<DirtyLog> {
        let path = dir.join(DIRTY_FILE);
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Lost with a crash before the first sync: nothing can be dirty yet.
                return DirtyLog::create(dir, size, region_size);
            }
            Err(e) => return Err(e.into()),
        };
        let mut bits = Vec::new();
        file.read_to_end(&mut bits)?;
        bits.resize(bytes_for(size, region_size), 0);
        let mut marked = RoaringBitmap::new();
        for (i, byte) in bits.iter().enumerate() {
            for b in 0..8 {
                if byte & (1 << b) != 0 {
                    if let Ok(r) = u32::try_from(i * 8 + b) {
                        marked.insert(r);
                    }
                }
            }
        }
        Ok(DirtyLog {
            file,
            region_size,
            count: region_count(size, region_size),
            bits,
            marked,
            touched: RoaringBitmap::new(),
        })
    }

    pub(crate) fn region_size(&self) -> u64 {
        self.region_size
    }

    pub(crate) fn marked(&self) -> &RoaringBitmap {
        &self.marked
    }

    /// Regions covering bytes `offset..offset+len`.
    pub(crate) fn regions(&self, offset: u64, len: u64) -> std::ops::Range<u32> {
        let first = offset / self.region_size;
        let end = (offset + len).div_ceil(self.region_size);
        u32::try_from(first).unwrap_or(u32::MAX)..u32::try_from(end).unwrap_or(u32::MAX)
    }

    /// Regions a write of `offset..offset+len` must have marked. A large write (64 KiB or
    /// more) that ends exactly at a region boundary is most likely part of a sequential
    /// stream (a rebuild, a restore, a large file): the next [`MARK_AHEAD`] regions are
    /// marked with it, so such a stream pays one fdatasync per `MARK_AHEAD` regions instead
    /// of one per region. Small random writes never mark ahead, so what an engine crash
    /// makes the next engine copy stays proportional to them.
    pub(crate) fn regions_for_write(&self, offset: u64, len: u64) -> std::ops::Range<u32> {
        let r = self.regions(offset, len);
        let end = offset + len;
        if len < MARK_AHEAD_MIN_WRITE || !end.is_multiple_of(self.region_size) {
            return r;
        }
        r.start..r.end.saturating_add(MARK_AHEAD).min(self.count)
    }

    /// Makes every region in `ranges` durably marked before the caller writes to it.
    pub(crate) fn mark(&mut self, io: &mut Io, ranges: &[std::ops::Range<u32>]) -> Result<()> {
        let mut lo = usize::MAX;
        let mut hi = 0usize;
        for r in ranges {
            self.touched.insert_range(r.clone());
            for region in r.clone() {
                if self.marked.insert(region) {
                    let byte = region as usize / 8;
                    self.bits[byte] |= 1 << (region % 8);
                    lo = lo.min(byte);
                    hi = hi.max(byte + 1);
                }
            }
        }
        if lo < hi {
            let fd = self.file.as_raw_fd();
            io.write_at(fd, &self.bits[lo..hi], lo as u64)?;
            io.fdatasync(&[fd])?;
        }
        Ok(())
    }

    /// Called after a flush made every earlier write durable: clears regions not written in
    /// the interval that just ended.
    pub(crate) fn after_flush(&mut self, io: &mut Io) -> Result<()> {
        let cold = &self.marked - &self.touched;
        self.touched.clear();
        if cold.is_empty() {
            return Ok(());
        }
        let mut lo = usize::MAX;
        let mut hi = 0usize;
        for region in &cold {
            let byte = region as usize / 8;
            self.bits[byte] &= !(1 << (region % 8));
            lo = lo.min(byte);
            hi = hi.max(byte + 1);
        }
        self.marked -= cold;
        io.write_at(self.file.as_raw_fd(), &self.bits[lo..hi], lo as u64)?;
        Ok(())
    }

    /// Extends the log (fully allocated) to cover a volume of `size` bytes.
    pub(crate) fn grow(&mut self, io: &mut Io, size: u64) -> Result<()> {
        let old = self.bits.len();
        self.count = region_count(size, self.region_size);
        let new = bytes_for(size, self.region_size);
        if new > old {
            self.bits.resize(new, 0);
            let fd = self.file.as_raw_fd();
            io.write_at(fd, &self.bits[old..], old as u64)?;
            io.fdatasync(&[fd])?;
        }
        Ok(())
    }
}
