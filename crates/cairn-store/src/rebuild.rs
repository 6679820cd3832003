//! Operations a replica rebuild needs besides plain reads and writes: [`Store::unmap`] drops
//! a range from the head alone, and [`Store::range_digests`] lets two replicas compare a
//! range of one layer without moving its data.
//!
//! Guarantees:
//! - Unmap follows trim's crash rules: the range's dirty-log regions are durably marked before
//!   anything is punched, and a punch that fails part-way is reconciled so that no block reads
//!   back as corrupt. It never writes data: blocks the head held become holes, so whatever an
//!   older layer of the chain holds there shows through again.
//! - Range digests read through the verified read path: a held block whose data fails its
//!   stored checksum fails the call with [`StoreError::Corruption`], as a read would. Blocks
//!   the selection does not hold are not read at all.
//! - A digest depends only on which blocks the selection holds and their bytes, never on how
//!   they are laid out in files or layers (for `Merged`): two replicas whose selection holds
//!   the same blocks with the same bytes give equal digests, and a held block of zeros
//!   differs from a hole.

use crate::error::{Result, StoreError};
use crate::{LayerSel, Store, BLOCK_SIZE, BS};

/// Most bytes one [`Store::range_digests`] call covers.
pub const MAX_DIGEST_RANGE: u64 = 256 << 20;
/// Most digests one [`Store::range_digests`] call returns.
pub const MAX_DIGEST_GRANULES: u64 = 65536;
/// Blocks read per I/O batch while digesting (1 MiB).
const DIGEST_BATCH_BLOCKS: u64 = 256;
/// Marker hashed before a block the selection holds (its 4096 bytes follow).
const HELD: [u8; 1] = [1];
/// Marker hashed for a block the selection does not hold (nothing follows).
const HOLE: [u8; 1] = [0];

impl Store {
    /// Drops `offset..offset+len` from the head layer only: the head's blocks there become
    /// holes, so the range reads as whatever older snapshot layers hold (zeros where none
    /// does). Unlike [`Store::trim`] it never writes explicit zeros.
    pub fn unmap(&mut self, offset: u64, len: u64) -> Result<()> {
        let r = self.check_ok().and_then(|()| self.check_range(offset, len));
        let r = match r {
            Ok(()) => {
                let r = self.unmap_inner(offset, len);
                if let Err(StoreError::NoSpace | StoreError::Io(_)) = r {
                    self.reconcile(self.meta.head, offset / BS, len / BS);
                }
                r
            }
            Err(e) => Err(e),
        };
        self.count_result(&r);
        r
    }

    fn unmap_inner(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let regions = [self.dirty.regions(offset, len)];
        self.dirty.mark(&mut self.io, &regions)?;
        let head = self.meta.head;
        self.layers
            .get_mut(&head)
            .expect("head layer is open")
            .punch(offset / BS, len / BS)?;
        self.counters.writes += 1;
        Ok(())
    }

    /// One BLAKE3 digest per `granule` bytes of `offset..offset+len` (the last granule may be
    /// shorter). Each digest hashes, for every 4 KiB block of its granule in order, the byte
    /// 1 followed by the block's 4096 bytes if `sel` holds the block, else the byte 0.
    ///
    /// `Head` and `Snapshot` look at that one layer alone (data as [`Store::read_layer`]
    /// reads it); `Merged` holds a block when any layer of the head's chain does, with the
    /// volume's logical content as its data.
    ///
    /// Refused: a granule that is not a non-zero multiple of 4096 and a range over
    /// [`MAX_DIGEST_RANGE`] bytes or [`MAX_DIGEST_GRANULES`] granules (`InvalidArgument`), a
    /// misaligned or out-of-volume range, an unknown snapshot.
    pub fn range_digests(
        &mut self,
        sel: &LayerSel,
        offset: u64,
        len: u64,
        granule: u32,
    ) -> Result<Vec<[u8; 32]>> {
        self.check_ok()?;
        if granule == 0 || !granule.is_multiple_of(BLOCK_SIZE) {
            return Err(StoreError::InvalidArgument(format!(
                "digest granule {granule} must be a non-zero multiple of {BLOCK_SIZE}"
            )));
        }
        self.check_range(offset, len)?;
        if len > MAX_DIGEST_RANGE {
            return Err(StoreError::InvalidArgument(format!(
                "digest range of {len} bytes exceeds {MAX_DIGEST_RANGE}"
            )));
        }
        let count = len.div_ceil(u64::from(granule));
        if count > MAX_DIGEST_GRANULES {
            return Err(StoreError::InvalidArgument(format!(
                "{count} digest granules exceed {MAX_DIGEST_GRANULES}"
            )));
        }
        let chain = self.select(sel)?;
        let granule_blocks = u64::from(granule) / BS;
        let (first, end) = (offset / BS, (offset + len) / BS);
        let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        let mut hasher = blake3::Hasher::new();
        let mut in_granule = 0u64;
        let mut buf = vec![0u8; usize::try_from(DIGEST_BATCH_BLOCKS * BS).unwrap_or(0)];
        let block_len = BLOCK_SIZE as usize;
        let mut b = first;
        while b < end {
            let n = DIGEST_BATCH_BLOCKS.min(end - b);
            let runs = self.runs(&chain, b, b + n);
            let bytes = usize::try_from(n * BS).unwrap_or(0);
            if runs.iter().any(|r| r.layer.is_some()) {
                // Reads only the held runs (holes are not read), every block verified.
                self.read_chain(&chain, b * BS, &mut buf[..bytes])?;
            }
            for run in &runs {
                for k in run.first..run.first + run.count {
                    if run.layer.is_some() {
                        let at = usize::try_from(k - b).unwrap_or(0) * block_len;
                        hasher.update(&HELD);
                        hasher.update(&buf[at..at + block_len]);
                    } else {
                        hasher.update(&HOLE);
                    }
                    in_granule += 1;
                    if in_granule == granule_blocks {
                        out.push(*hasher.finalize().as_bytes());
                        hasher.reset();
                        in_granule = 0;
                    }
                }
            }
            b += n;
        }
        if in_granule > 0 {
            out.push(*hasher.finalize().as_bytes());
        }
        Ok(out)
    }
}
