//! Writing a backup: read the snapshot in 2 MiB blocks, skip holes, hash each block,
//! upload the blocks the target lacks (compressed, in parallel), write the manifest last.
//!
//! Guarantees: the manifest is created (with `PutMode::Create`, never overwriting) only
//! after every block it lists was stored or found stored under the protection of this
//! backup's in-progress marker. A failed backup leaves no manifest; its uploaded blocks
//! are unreferenced and are collected by a later GC. Incremental rule: a block index is
//! re-read only if it overlaps a changed range or lies beyond (or in the partial last
//! block of) the parent's size; every other index keeps the parent's entry.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use object_store::{ObjectStore, PutMode, PutPayload};
use serde::{Deserialize, Serialize};

use crate::catalog::{checked_name, read_manifest};
use crate::coord::{CoordOptions, Marker};
use crate::error::{BackupError, Result};
use crate::format::{
    encode_block, new_id, now, BlockRef, Compression, Manifest, BLOCK_SIZE, MANIFEST_FORMAT,
};
use crate::source::SnapshotSource;
use crate::target::Target;

/// Progress callback: (bytes done, bytes total). Called from the backup's task.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Make this backup from a previous one.
#[derive(Debug, Clone)]
pub struct Incremental {
    /// Name of the previous backup of the same volume.
    pub parent: String,
    /// Byte ranges written since the parent's snapshot (may be unaligned; may over-report).
    pub changed: Vec<Range<u64>>,
}

/// How to back up.
#[derive(Clone)]
pub struct BackupOptions {
    /// Compression of new blocks (lz4 by default).
    pub compression: Compression,
    /// Blocks read and uploaded at once (default 8).
    pub concurrency: usize,
    /// Incremental backup from a parent, or a full backup.
    pub incremental: Option<Incremental>,
    /// Progress callback.
    pub progress: Option<Progress>,
    /// GC lock and marker timing.
    pub coord: CoordOptions,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            compression: Compression::Lz4,
            concurrency: 8,
            incremental: None,
            progress: None,
            coord: CoordOptions::default(),
        }
    }
}

impl std::fmt::Debug for BackupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupOptions")
            .field("compression", &self.compression)
            .field("concurrency", &self.concurrency)
            .field("incremental", &self.incremental)
            .field("coord", &self.coord)
            .finish_non_exhaustive()
    }
}

/// What to call the backup and what it is of.
#[derive(Debug, Clone)]
pub struct BackupSpec {
    /// Backup name, unique in the target.
    pub name: String,
    /// Volume name (recorded in the manifest).
    pub volume: String,
    /// Snapshot name (recorded in the manifest).
    pub snapshot: String,
}

/// What a backup did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupResult {
    /// Backup name.
    pub name: String,
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Bytes sent to the target (block objects after compression, and the manifest).
    pub bytes_uploaded: u64,
    /// Blocks uploaded.
    pub blocks_new: u64,
    /// Blocks read whose content the target already had (not uploaded again).
    pub blocks_reused: u64,
    /// Blocks taken from the parent manifest without reading (incremental only).
    pub blocks_unchanged: u64,
    /// Blocks skipped as holes (unallocated or all zero).
    pub blocks_hole: u64,
    /// Wall-clock time.
    pub seconds: f64,
}

enum Outcome {
    Hole,
    New(blake3::Hash, u64, u64),
    Reused(blake3::Hash, u64),
}

/// Backs up `src` to `t`. See the module documentation for the guarantees.
pub async fn backup<S: SnapshotSource>(
    t: &Target,
    src: &S,
    spec: &BackupSpec,
    opts: &BackupOptions,
) -> Result<BackupResult> {
    let started = Instant::now();
    checked_name(&spec.name)?;
    if let Some(inc) = &opts.incremental {
        checked_name(&inc.parent)?;
    }
    let key = t.manifest_key(&spec.name);
    match t.store.head(&key).await {
        Ok(_) => return Err(BackupError::AlreadyExists(spec.name.clone())),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(BackupError::transport(&key, e)),
    }
    let mut marker = Marker::begin(t, &spec.name, &opts.coord).await?;
    let result = run(t, src, spec, opts, &mut marker).await;
    let finished = marker.finish(t).await;
    let mut result = result?;
    if let Err(e) = finished {
        // The manifest is written; a leftover marker only delays GC until it goes stale.
        tracing::warn!(error = %e, "could not remove the in-progress marker");
    }
    result.seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

fn overlaps(ranges: &[Range<u64>], r: &Range<u64>) -> bool {
    ranges.iter().any(|x| x.start < r.end && r.start < x.end)
}

async fn run<S: SnapshotSource>(
    t: &Target,
    src: &S,
    spec: &BackupSpec,
    opts: &BackupOptions,
    marker: &mut Marker,
) -> Result<BackupResult> {
    let size = src.size();
    let nblocks = size.div_ceil(BLOCK_SIZE);
    let block_range = |i: u64| i * BLOCK_SIZE..((i + 1) * BLOCK_SIZE).min(size);

    // Which indexes to read; the rest come from the parent.
    let mut inherited: Vec<BlockRef> = Vec::new();
    let mut dirty: Vec<u64> = Vec::new();
    let parent = match &opts.incremental {
        None => {
            dirty.extend(0..nblocks);
            None
        }
        Some(inc) => {
            // Read after the marker is in place: if the parent manifest exists now, no
            // GC can have deleted its blocks and none will until we finish.
            let p = read_manifest(t, &inc.parent).await?;
            let mismatch = |reason: String| BackupError::ParentMismatch {
                parent: inc.parent.clone(),
                reason,
            };
            if p.block_size != BLOCK_SIZE {
                return Err(mismatch(format!("block size {}", p.block_size)));
            }
            if p.volume != spec.volume {
                return Err(mismatch(format!("it is a backup of volume {:?}", p.volume)));
            }
            let parent_full_blocks = if p.size == size {
                nblocks
            } else {
                p.size.min(size) / BLOCK_SIZE
            };
            let mut pi = p.blocks.iter().peekable();
            for i in 0..nblocks {
                while pi.peek().is_some_and(|b| b.index < i) {
                    pi.next();
                }
                if i >= parent_full_blocks || overlaps(&inc.changed, &block_range(i)) {
                    dirty.push(i);
                } else if let Some(b) = pi.peek().filter(|b| b.index == i) {
                    inherited.push((*b).clone());
                }
            }
            Some(p.name)
        }
    };
    let unchanged = nblocks - dirty.len() as u64;

    let allocated = src
        .allocated()
        .await
        .map_err(|source| BackupError::Source { offset: 0, source })?;
    let total: u64 = dirty
        .iter()
        .map(|&i| block_range(i).end - block_range(i).start)
        .sum();
    let claimed: Arc<Mutex<HashSet<[u8; 32]>>> = Arc::default();

    let one_block = |i: u64| {
        let r = block_range(i);
        let claimed = claimed.clone();
        let allocated = &allocated;
        async move {
            if !overlaps(allocated, &r) {
                return Ok((i, Outcome::Hole));
            }
            let len = usize::try_from(r.end - r.start).expect("block fits in memory");
            let data = src
                .read(r.start, len)
                .await
                .map_err(|source| BackupError::Source {
                    offset: r.start,
                    source,
                })?;
            let hashed = tokio::task::spawn_blocking(move || {
                let zero = data.iter().all(|&b| b == 0);
                let hash = (!zero).then(|| blake3::hash(&data));
                (data, hash)
            })
            .await
            .expect("hash task panicked");
            let (data, Some(hash)) = hashed else {
                return Ok((i, Outcome::Hole));
            };
            let read = len as u64;
            let first = claimed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(*hash.as_bytes());
            if !first {
                return Ok((i, Outcome::Reused(hash, read)));
            }
            let key = t.block_key(&hash);
            match t.store.head(&key).await {
                Ok(_) => return Ok((i, Outcome::Reused(hash, read))),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(BackupError::transport(&key, e)),
            }
            let compression = opts.compression;
            let obj: Bytes =
                tokio::task::spawn_blocking(move || encode_block(&data, &hash, compression))
                    .await
                    .expect("compress task panicked");
            let sent = obj.len() as u64;
            t.store
                .put(&key, PutPayload::from(obj))
                .await
                .map_err(|e| BackupError::transport(&key, e))?;
            Ok::<_, BackupError>((i, Outcome::New(hash, read, sent)))
        }
    };

    let mut res = BackupResult {
        name: spec.name.clone(),
        blocks_unchanged: unchanged,
        ..Default::default()
    };
    let mut entries = inherited;
    let mut done = 0u64;
    let mut stream = futures::stream::iter(dirty.iter().copied())
        .map(one_block)
        .buffer_unordered(opts.concurrency.max(1));
    if let Some(p) = &opts.progress {
        p(0, total);
    }
    while let Some(r) = stream.next().await {
        let (i, outcome) = r?;
        let hash = match outcome {
            Outcome::Hole => {
                res.blocks_hole += 1;
                None
            }
            Outcome::New(h, read, sent) => {
                res.blocks_new += 1;
                res.bytes_read += read;
                res.bytes_uploaded += sent;
                Some(h)
            }
            Outcome::Reused(h, read) => {
                res.blocks_reused += 1;
                res.bytes_read += read;
                Some(h)
            }
        };
        if let Some(h) = hash {
            entries.push(BlockRef {
                index: i,
                hash: h.to_hex().to_string(),
            });
        }
        done += block_range(i).end - block_range(i).start;
        if let Some(p) = &opts.progress {
            p(done, total);
        }
        marker.refresh(t, &opts.coord).await?;
    }
    drop(stream);
    entries.sort_by_key(|b| b.index);

    let (created, created_unix) = now();
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        name: spec.name.clone(),
        id: new_id(),
        volume: spec.volume.clone(),
        snapshot: spec.snapshot.clone(),
        size,
        block_size: BLOCK_SIZE,
        created,
        created_unix,
        parent,
        compression: opts.compression,
        blocks: entries,
    };
    let body = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    res.bytes_uploaded += body.len() as u64;
    let key = t.manifest_key(&spec.name);
    match t
        .store
        .put_opts(&key, PutPayload::from(body), PutMode::Create.into())
        .await
    {
        Ok(_) => Ok(res),
        Err(object_store::Error::AlreadyExists { .. }) => {
            Err(BackupError::AlreadyExists(spec.name.clone()))
        }
        Err(e) => Err(BackupError::transport(&key, e)),
    }
}
