//! Recovery at open and offline verification.
//!
//! After a crash the only places where a block's data and its checksum can disagree without
//! real corruption are the regions marked in the dirty-region log, in the head and in the
//! target of an interrupted merge. `recover` recomputes the checksums of the blocks those
//! layers hold there, makes them durable and completes the merge. It leaves the marks in
//! place: until the next flush clears them they tell a restarted engine which regions may
//! differ between replicas. Anywhere
//! else a mismatch is reported as corruption, by reads and by [`Store::scrub`].

use std::fs;
use std::path::Path;

use cairn_io::Op;

use crate::error::Result;
use crate::layer::LAYER_DIR;
use crate::meta::Meta;
use crate::{CorruptBlock, Store, BLOCK_SIZE, BS};

/// Removes layer files no metadata names (left by a crash between creating a layer and
/// saving the metadata, or between saving and deleting) and stale temp files.
pub(crate) fn remove_orphans(dir: &Path, meta: &Meta) -> Result<()> {
    let _ = fs::remove_file(dir.join(format!(".{}.tmp", crate::meta::META_FILE)));
    let entries = match fs::read_dir(dir.join(LAYER_DIR)) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let id = name.split('.').next().and_then(|s| s.parse::<u64>().ok());
        if id.is_none_or(|id| meta.layer(id).is_none()) {
            tracing::warn!(file = %name, "removing orphan layer file");
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

impl Store {
    pub(crate) fn recover(&mut self) -> Result<()> {
        let marked: Vec<u32> = self.dirty.marked().iter().collect();
        self.recovery.dirty_regions = marked.len() as u64;
        let mut targets = vec![self.meta.head];
        if let Some(m) = self.meta.merging {
            if !targets.contains(&m.into) {
                targets.push(m.into);
            }
        }
        if !marked.is_empty() {
            let region_blocks = self.dirty.region_size() / BS;
            for &id in &targets {
                for &region in &marked {
                    let first = u64::from(region) * region_blocks;
                    let repaired = self.recompute_checksums(id, first, region_blocks)?;
                    self.recovery.checksums_repaired += repaired;
                }
                let l = &self.layers[&id];
                let fds = [l.crc_fd()];
                self.io.fdatasync(&fds)?;
            }
            // The marks stay until a flush clears them: they also tell an engine that restarts
            // after a crash which regions may differ between replicas.
            tracing::info!(
                regions = marked.len(),
                repaired = self.recovery.checksums_repaired,
                "dirty regions recovered"
            );
        }
        if let Some(m) = self.meta.merging {
            tracing::info!(from = m.from, into = m.into, "completing interrupted merge");
            self.merge(m)?;
            self.recovery.merge_completed = true;
        }
        self.collect_removed()
    }

    /// Rewrites the stored checksum of every block layer `id` holds in
    /// `first..first+count` whose data no longer matches it. Returns how many it rewrote.
    fn recompute_checksums(&mut self, id: u64, first: u64, count: u64) -> Result<u64> {
        let mut repaired = 0;
        let blocks: Vec<u32> = {
            let lo = u32::try_from(first).unwrap_or(u32::MAX);
            let hi = u32::try_from(first + count).unwrap_or(u32::MAX);
            self.layers[&id].blocks.range(lo..hi).collect()
        };
        let cfd = self.layers[&id].crc_fd();
        let mut data = vec![0u8; BLOCK_SIZE as usize];
        let mut crc = [0u8; 4];
        for b in blocks {
            let b = u64::from(b);
            if !self
                .read_run_checked(id, b, &mut data, &mut crc)?
                .is_empty()
            {
                let actual = crc32fast::hash(&data);
                self.io.write_at(cfd, &actual.to_le_bytes(), b * 4)?;
                repaired += 1;
            }
        }
        Ok(repaired)
    }

    /// Restores agreement between data and checksums after a write to layer `id` over blocks
    /// `first..first+count` failed part-way (no space, I/O error): blocks the layer held
    /// before keep whatever data they now have, with a matching checksum; blocks it did not
    /// hold are punched out again. A failed write leaves its range undefined, as on any disk,
    /// but never makes it read as corrupt. If this fails too, the store fails.
    pub(crate) fn reconcile(&mut self, id: u64, first: u64, count: u64) {
        let r = self.recompute_checksums(id, first, count).and_then(|_| {
            let mut b = first;
            while b < first + count {
                let held = |s: &Store, b: u64| {
                    s.layers[&id]
                        .blocks
                        .contains(u32::try_from(b).unwrap_or(u32::MAX))
                };
                if held(self, b) {
                    b += 1;
                    continue;
                }
                let mut n = 1;
                while b + n < first + count && !held(self, b + n) {
                    n += 1;
                }
                self.layers
                    .get_mut(&id)
                    .expect("layer being written is open")
                    .punch(b, n)?;
                b += n;
            }
            Ok(())
        });
        if let Err(e) = r {
            self.failed = true;
            tracing::error!(error = %e, "cannot reconcile after a failed write; replica failed");
        }
    }

    /// Reads blocks `first..` of layer `id` into `data` (whole blocks) and their stored
    /// checksums into `crcs` (4 bytes each), in one batch, and returns the indices within the
    /// run of the blocks whose data does not match its checksum.
    pub(crate) fn read_run_checked(
        &mut self,
        id: u64,
        first: u64,
        data: &mut [u8],
        crcs: &mut [u8],
    ) -> Result<Vec<usize>> {
        let (dfd, cfd) = (self.layers[&id].data_fd(), self.layers[&id].crc_fd());
        self.io.run_all(&mut [
            Op::Read {
                fd: dfd,
                buf: data,
                offset: first * BS,
            },
            Op::Read {
                fd: cfd,
                buf: crcs,
                offset: first * 4,
            },
        ])?;
        Ok(data
            .chunks(BLOCK_SIZE as usize)
            .zip(crcs.chunks(4))
            .enumerate()
            .filter(|(_, (block, c))| {
                crc32fast::hash(block) != u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            })
            .map(|(k, _)| k)
            .collect())
    }

    /// Verifies every block every layer holds against its checksum and lists the bad ones.
    /// `progress` is called with (blocks checked, blocks in all).
    pub fn scrub(&mut self, mut progress: impl FnMut(u64, u64)) -> Result<Vec<CorruptBlock>> {
        let total: u64 = self.layers.values().map(|l| l.blocks.len()).sum();
        let mut done = 0u64;
        let mut bad = Vec::new();
        let mut ids: Vec<u64> = self.layers.keys().copied().collect();
        ids.sort_unstable();
        let mut data = vec![0u8; 256 * BLOCK_SIZE as usize];
        let mut crcs = vec![0u8; 256 * 4];
        for id in ids {
            let blocks: Vec<u32> = self.layers[&id].blocks.iter().collect();
            let name = self.layer_name(id);
            let mut i = 0;
            while i < blocks.len() {
                let start = blocks[i];
                let mut n = 1usize;
                while n < 256
                    && i + n < blocks.len()
                    && u64::from(blocks[i + n]) == u64::from(start) + n as u64
                {
                    n += 1;
                }
                let first = u64::from(start);
                let (d, c) = (&mut data[..n * BLOCK_SIZE as usize], &mut crcs[..n * 4]);
                for k in self.read_run_checked(id, first, d, c)? {
                    bad.push(CorruptBlock {
                        layer: name.clone(),
                        offset: (first + k as u64) * BS,
                    });
                }
                i += n;
                done += n as u64;
                progress(done, total);
            }
        }
        Ok(bad)
    }
}
