//! The data path: read, write, write-zeroes / trim, flush, extents and content digest.
//!
//! Every write marks its dirty-log regions durably before touching the head, writes data and
//! checksums in one I/O batch, and records the blocks in the head's block set only after both
//! landed. Reads resolve each block to the newest layer of a chain holding it, read data and
//! checksums in one batch, and verify every block before returning.

use std::sync::OnceLock;

use cairn_io::Op;
use roaring::RoaringBitmap;

use crate::error::{Result, StoreError};
use crate::{LayerSel, Store, BLOCK_SIZE, BS};

/// Largest single read or write the store accepts in one call.
pub const MAX_IO_BYTES: u64 = 32 << 20;
const ZERO_CHUNK: usize = 1 << 20;

fn zeros() -> &'static [u8] {
    static Z: OnceLock<Vec<u8>> = OnceLock::new();
    Z.get_or_init(|| vec![0u8; ZERO_CHUNK])
}

/// CRC32 of an all-zero block: the checksum a hole reads back with.
pub fn zero_block_crc() -> u32 {
    static C: OnceLock<u32> = OnceLock::new();
    *C.get_or_init(|| crc32fast::hash(&zeros()[..BLOCK_SIZE as usize]))
}

/// One write of a batch: `crcs` holds the sender's CRC32 of each 4 KiB block of `data`.
#[derive(Debug, Clone, Copy)]
pub struct WriteReq<'a> {
    pub offset: u64,
    pub data: &'a [u8],
    pub crcs: &'a [u32],
}

/// One read of a batch: fill `buf` from the volume at `offset`.
#[derive(Debug)]
pub struct ReadReq<'a> {
    pub offset: u64,
    pub buf: &'a mut [u8],
}

/// A run of consecutive blocks that resolve to the same layer (`None`: no layer, zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub first: u64,
    pub count: u64,
    pub layer: Option<u64>,
}

fn crc_bytes(crcs: &[u32]) -> Vec<u8> {
    crcs.iter().flat_map(|c| c.to_le_bytes()).collect()
}

impl Store {
    /// Splits blocks `first..end` into runs by the newest layer of `chain` holding each.
    pub(crate) fn runs(&self, chain: &[u64], first: u64, end: u64) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        for b in first..end {
            let idx = u32::try_from(b).unwrap_or(u32::MAX);
            let layer = chain
                .iter()
                .copied()
                .find(|id| self.layers[id].blocks.contains(idx));
            match out.last_mut() {
                Some(r) if r.layer == layer => r.count += 1,
                _ => out.push(Run {
                    first: b,
                    count: 1,
                    layer,
                }),
            }
        }
        out
    }

    /// Reads `buf.len()` bytes at `offset` and returns the CRC32 of each block, every block
    /// verified against its stored checksum.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<Vec<u32>> {
        let chain = self.chain.clone();
        let res = self.read_chain(&chain, offset, buf);
        self.count_result(&res);
        if res.is_ok() {
            self.counters.reads += 1;
            self.counters.bytes_read += buf.len() as u64;
        }
        res
    }

    /// Reads only what one layer holds (`LayerSel::Merged`: the logical content); blocks the
    /// layer does not hold read as zeros.
    pub fn read_layer(&mut self, sel: &LayerSel, offset: u64, buf: &mut [u8]) -> Result<Vec<u32>> {
        let chain = self.select(sel)?;
        self.read_chain(&chain, offset, buf)
    }

    pub(crate) fn read_chain(
        &mut self,
        chain: &[u64],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Vec<u32>> {
        self.read_many(chain, &mut [ReadReq { offset, buf }])
            .pop()
            .unwrap_or_else(|| Err(StoreError::Io(std::io::Error::other("no read result"))))
    }

    /// Reads several ranges of the volume's content in one I/O batch (so the disk sees them
    /// concurrently); one result per request, as [`Store::read`] would give.
    pub fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Vec<Result<Vec<u32>>> {
        let chain = self.chain.clone();
        let out = self.read_many(&chain, reqs);
        for (r, req) in out.iter().zip(reqs.iter()) {
            match r {
                Ok(_) => {
                    self.counters.reads += 1;
                    self.counters.bytes_read += req.buf.len() as u64;
                }
                Err(_) => self.counters.errors += 1,
            }
        }
        out
    }

    fn validate_read(&self, offset: u64, len: u64) -> Result<()> {
        self.check_ok()?;
        self.check_range(offset, len)?;
        if len > MAX_IO_BYTES {
            return Err(StoreError::InvalidArgument(format!(
                "read of {len} bytes exceeds {MAX_IO_BYTES}"
            )));
        }
        Ok(())
    }

    fn read_many(&mut self, chain: &[u64], reqs: &mut [ReadReq<'_>]) -> Vec<Result<Vec<u32>>> {
        let mut results: Vec<Option<Result<Vec<u32>>>> = reqs.iter().map(|_| None).collect();
        let mut plans: Vec<Vec<Run>> = Vec::with_capacity(reqs.len());
        let mut stored: Vec<Vec<u8>> = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            let len = r.buf.len() as u64;
            match self.validate_read(r.offset, len) {
                Ok(()) => {
                    let first = r.offset / BS;
                    plans.push(self.runs(chain, first, first + len / BS));
                    stored.push(vec![0u8; usize::try_from(len / BS * 4).unwrap_or(0)]);
                }
                Err(e) => {
                    results[i] = Some(Err(e));
                    plans.push(Vec::new());
                    stored.push(Vec::new());
                }
            }
        }
        {
            let mut ops = Vec::new();
            let mut owner = Vec::new();
            for (i, ((req, runs), st)) in reqs
                .iter_mut()
                .zip(&plans)
                .zip(stored.iter_mut())
                .enumerate()
            {
                if results[i].is_some() {
                    continue;
                }
                let mut data_rest: &mut [u8] = req.buf;
                let mut crc_rest: &mut [u8] = st;
                for run in runs {
                    let n = usize::try_from(run.count).unwrap_or(0);
                    let (d, rest) =
                        std::mem::take(&mut data_rest).split_at_mut(n * BLOCK_SIZE as usize);
                    data_rest = rest;
                    let (c, rest) = std::mem::take(&mut crc_rest).split_at_mut(n * 4);
                    crc_rest = rest;
                    let Some(id) = run.layer else {
                        d.fill(0);
                        continue;
                    };
                    let l = &self.layers[&id];
                    ops.push(Op::Read {
                        fd: l.data_fd(),
                        buf: d,
                        offset: run.first * BS,
                    });
                    owner.push(i);
                    if self.checksums {
                        ops.push(Op::Read {
                            fd: l.crc_fd(),
                            buf: c,
                            offset: run.first * 4,
                        });
                        owner.push(i);
                    }
                }
            }
            for (r, i) in self.io.run(&mut ops).into_iter().zip(owner) {
                if let Err(e) = r {
                    results[i].get_or_insert(Err(StoreError::from(e)));
                }
            }
        }
        let mut out = Vec::with_capacity(reqs.len());
        for (i, req) in reqs.iter().enumerate() {
            out.push(match results[i].take() {
                Some(r) => r,
                None => self.verify(&plans[i], req.buf, &stored[i]),
            });
        }
        out
    }

    /// Checks every block read from a layer against its stored checksum; returns the CRC of
    /// every block (for the wire).
    fn verify(&mut self, runs: &[Run], buf: &[u8], stored: &[u8]) -> Result<Vec<u32>> {
        let mut crcs = Vec::with_capacity(buf.len() / BLOCK_SIZE as usize);
        let mut i = 0usize;
        for run in runs {
            for b in run.first..run.first + run.count {
                let block = &buf[i * BLOCK_SIZE as usize..(i + 1) * BLOCK_SIZE as usize];
                let actual = crc32fast::hash(block);
                if let Some(layer) = run.layer.filter(|_| self.checksums) {
                    let s = &stored[i * 4..i * 4 + 4];
                    let expected = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    if actual != expected {
                        self.counters.corruptions += 1;
                        tracing::error!(offset = b * BS, layer, "stored checksum mismatch");
                        return Err(StoreError::Corruption {
                            offset: b * BS,
                            layer,
                        });
                    }
                }
                crcs.push(actual);
                i += 1;
            }
        }
        Ok(crcs)
    }

    /// Writes `data` at `offset`; `crcs` holds the sender's CRC32 of each block.
    pub fn write(&mut self, offset: u64, data: &[u8], crcs: &[u32]) -> Result<()> {
        self.write_batch(&[WriteReq { offset, data, crcs }])
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Writes a batch in order: the outcome is that of applying the writes one after another.
    /// Non-overlapping neighbours share one I/O submission. One result per request.
    pub fn write_batch(&mut self, reqs: &[WriteReq<'_>]) -> Vec<Result<()>> {
        let mut results: Vec<Option<Result<()>>> = reqs.iter().map(|_| None).collect();
        let mut group: Vec<usize> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            if let Err(e) = self.validate_write(r) {
                results[i] = Some(Err(e));
                continue;
            }
            let overlaps = group.iter().any(|&j| {
                let o = &reqs[j];
                r.offset < o.offset + o.data.len() as u64
                    && o.offset < r.offset + r.data.len() as u64
            });
            if overlaps {
                self.write_group(reqs, &group, &mut results);
                group.clear();
            }
            group.push(i);
        }
        self.write_group(reqs, &group, &mut results);
        let out: Vec<Result<()>> = results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect();
        for r in &out {
            self.count_result(r);
        }
        out
    }

    fn validate_write(&self, r: &WriteReq<'_>) -> Result<()> {
        self.check_ok()?;
        let len = r.data.len() as u64;
        self.check_range(r.offset, len)?;
        if len > MAX_IO_BYTES {
            return Err(StoreError::InvalidArgument(format!(
                "write of {len} bytes exceeds {MAX_IO_BYTES}"
            )));
        }
        if r.crcs.len() as u64 != len / BS {
            return Err(StoreError::InvalidArgument(format!(
                "{} checksums for {} blocks",
                r.crcs.len(),
                len / BS
            )));
        }
        if !self.checksums {
            return Ok(());
        }
        for (i, (block, crc)) in r.data.chunks(BLOCK_SIZE as usize).zip(r.crcs).enumerate() {
            if crc32fast::hash(block) != *crc {
                return Err(StoreError::ChecksumMismatch {
                    offset: r.offset + i as u64 * BS,
                });
            }
        }
        Ok(())
    }

    fn write_group(
        &mut self,
        reqs: &[WriteReq<'_>],
        group: &[usize],
        results: &mut [Option<Result<()>>],
    ) {
        if group.is_empty() {
            return;
        }
        let regions: Vec<_> = group
            .iter()
            .map(|&i| {
                self.dirty
                    .regions_for_write(reqs[i].offset, reqs[i].data.len() as u64)
            })
            .collect();
        if let Err(e) = self.dirty.mark(&mut self.io, &regions) {
            let msg = e.to_string();
            for &i in group {
                results[i] = Some(Err(StoreError::Io(std::io::Error::other(msg.clone()))));
            }
            return;
        }
        let (dfd, cfd) = (self.head().data_fd(), self.head().crc_fd());
        let crc_bufs: Vec<Vec<u8>> = group.iter().map(|&i| crc_bytes(reqs[i].crcs)).collect();
        let mut ops = Vec::with_capacity(group.len() * 2);
        for (k, &i) in group.iter().enumerate() {
            ops.push(Op::Write {
                fd: dfd,
                buf: reqs[i].data,
                offset: reqs[i].offset,
            });
            if self.checksums {
                ops.push(Op::Write {
                    fd: cfd,
                    buf: &crc_bufs[k],
                    offset: reqs[i].offset / BS * 4,
                });
            }
        }
        let mut outcome = self.io.run(&mut ops).into_iter();
        let per_req = if self.checksums { 2 } else { 1 };
        let head = self.meta.head;
        for &i in group {
            let d = outcome.next();
            let c = if per_req == 2 {
                outcome.next()
            } else {
                Some(Ok(0))
            };
            let r = match (d, c) {
                (Some(Ok(_)), Some(Ok(_))) => {
                    let first = u32::try_from(reqs[i].offset / BS).unwrap_or(u32::MAX);
                    let n = u32::try_from(reqs[i].data.len() as u64 / BS).unwrap_or(0);
                    if let Some(l) = self.layers.get_mut(&head) {
                        l.blocks.insert_range(first..first + n);
                    }
                    self.counters.writes += 1;
                    self.counters.bytes_written += reqs[i].data.len() as u64;
                    Ok(())
                }
                (Some(Err(e)), _) | (_, Some(Err(e))) => {
                    self.reconcile(head, reqs[i].offset / BS, reqs[i].data.len() as u64 / BS);
                    Err(StoreError::from(e))
                }
                _ => Err(StoreError::Io(std::io::Error::other("missing completion"))),
            };
            results[i] = Some(r);
        }
    }

    /// Makes `offset..offset+len` read as zeros. Blocks no older layer holds are deallocated
    /// (unless `no_hole`); blocks an older layer holds get explicit zeros in the head so the
    /// older data stays hidden.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, no_hole: bool) -> Result<()> {
        let r = self.write_zeroes_inner(offset, len, no_hole);
        if let Err(StoreError::NoSpace | StoreError::Io(_)) = r {
            self.reconcile(self.meta.head, offset / BS, len / BS);
        }
        self.count_result(&r);
        r
    }

    /// Discards `offset..offset+len`: it reads back as zeros afterwards.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, false)
    }

    fn write_zeroes_inner(&mut self, offset: u64, len: u64, no_hole: bool) -> Result<()> {
        self.check_ok()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let regions = [self.dirty.regions(offset, len)];
        self.dirty.mark(&mut self.io, &regions)?;
        let older: Vec<u64> = self.chain[1..].to_vec();
        let first = offset / BS;
        let end = first + len / BS;
        // Runs of blocks that need explicit zeros (true) or can be holes (false).
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for b in first..end {
            let idx = u32::try_from(b).unwrap_or(u32::MAX);
            let explicit = no_hole || older.iter().any(|id| self.layers[id].blocks.contains(idx));
            match runs.last_mut() {
                Some((_, n, e)) if *e == explicit => *n += 1,
                _ => runs.push((b, 1, explicit)),
            }
        }
        let head = self.meta.head;
        let zero_crc = zero_block_crc().to_le_bytes();
        for (start, count, explicit) in runs {
            if !explicit {
                self.layers
                    .get_mut(&head)
                    .expect("head layer is open")
                    .punch(start, count)?;
                continue;
            }
            let (dfd, cfd) = (self.head().data_fd(), self.head().crc_fd());
            let per_chunk = (ZERO_CHUNK as u64) / BS;
            let mut b = start;
            while b < start + count {
                let n = per_chunk.min(start + count - b);
                let bytes = usize::try_from(n * BS).unwrap_or(0);
                let crcs: Vec<u8> = (0..n).flat_map(|_| zero_crc).collect();
                self.io.run_all(&mut [
                    Op::Write {
                        fd: dfd,
                        buf: &zeros()[..bytes],
                        offset: b * BS,
                    },
                    Op::Write {
                        fd: cfd,
                        buf: &crcs,
                        offset: b * 4,
                    },
                ])?;
                let (a, z) = (
                    u32::try_from(b).unwrap_or(u32::MAX),
                    u32::try_from(b + n).unwrap_or(u32::MAX),
                );
                self.layers
                    .get_mut(&head)
                    .expect("head layer is open")
                    .blocks
                    .insert_range(a..z);
                b += n;
            }
        }
        self.counters.writes += 1;
        Ok(())
    }

    /// Makes every earlier write durable (fdatasync of the head's data and checksums). A
    /// failure is final: the store refuses all further work.
    pub fn flush(&mut self) -> Result<()> {
        self.check_ok()?;
        let fds = [self.head().data_fd(), self.head().crc_fd()];
        if let Err(e) = self.io.fdatasync(&fds) {
            self.failed = true;
            self.counters.errors += 1;
            tracing::error!(error = %e, "fdatasync failed; replica is now failed");
            return Err(e.into());
        }
        self.dirty.after_flush(&mut self.io)?;
        self.counters.flushes += 1;
        Ok(())
    }

    /// Byte extents `(offset, len)` that `sel` holds inside `offset..offset+len`.
    pub fn extents(&self, sel: &LayerSel, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        self.check_range(offset, len)?;
        let chain = self.select(sel)?;
        let set = self.union(&chain);
        let (first, end) = (offset / BS, (offset + len) / BS);
        let lo = u32::try_from(first).unwrap_or(u32::MAX);
        let hi = u32::try_from(end).unwrap_or(u32::MAX);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in set.range(lo..hi) {
            let b = u64::from(b);
            match out.last_mut() {
                Some((o, l)) if *o + *l == b * BS => *l += BS,
                _ => out.push((b * BS, BS)),
            }
        }
        Ok(out)
    }

    /// Blocks held by any layer of `chain`.
    pub(crate) fn union(&self, chain: &[u64]) -> RoaringBitmap {
        let mut set = RoaringBitmap::new();
        for id in chain {
            set |= &self.layers[id].blocks;
        }
        set
    }

    /// The layer ids a selector reads through, newest first.
    pub(crate) fn select(&self, sel: &LayerSel) -> Result<Vec<u64>> {
        Ok(match sel {
            LayerSel::Head => vec![self.meta.head],
            LayerSel::Merged => self.chain.clone(),
            LayerSel::Snapshot(name) => vec![self
                .meta
                .snapshot_id(name)
                .ok_or_else(|| StoreError::NotFound(name.clone()))?],
            LayerSel::MergedAt(name) => self.meta.ancestry(
                self.meta
                    .snapshot_id(name)
                    .ok_or_else(|| StoreError::NotFound(name.clone()))?,
            ),
        })
    }

    /// BLAKE3 digest of the logical content: the size, then the index and bytes of every
    /// block that is not all zeros. Equal content gives an equal digest whatever the layering.
    pub fn digest(&mut self) -> Result<[u8; 32]> {
        let mut h = blake3::Hasher::new();
        h.update(&self.meta.size.to_le_bytes());
        let chain = self.chain.clone();
        let set = self.union(&chain);
        let mut buf = vec![0u8; 256 * BLOCK_SIZE as usize];
        let mut iter = set.iter().peekable();
        while let Some(start) = iter.next() {
            let mut n = 1u32;
            while n < 256 && iter.peek() == Some(&(start + n)) {
                iter.next();
                n += 1;
            }
            let bytes = n as usize * BLOCK_SIZE as usize;
            self.read_chain(&chain, u64::from(start) * BS, &mut buf[..bytes])?;
            for (i, block) in buf[..bytes].chunks(BLOCK_SIZE as usize).enumerate() {
                if block.iter().any(|&x| x != 0) {
                    h.update(&(u64::from(start) + i as u64).to_le_bytes());
                    h.update(block);
                }
            }
        }
        Ok(*h.finalize().as_bytes())
    }

    pub(crate) fn count_result<T>(&mut self, r: &Result<T>) {
        if r.is_err() {
            self.counters.errors += 1;
        }
    }
}
