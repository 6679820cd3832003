//! Restoring a backup into a sink that reads as zeroes: every listed block is fetched,
//! decoded and checked (header, length, BLAKE3 after decompression) before it is written;
//! holes are left alone. The first bad or missing block fails the restore with its index,
//! offset and object key.

use std::time::Instant;

use futures::StreamExt;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::backup::Progress;
use crate::catalog::read_manifest;
use crate::error::{BackupError, Result};
use crate::format::decode_block;
use crate::source::RestoreSink;
use crate::target::Target;

/// How to restore.
#[derive(Clone)]
pub struct RestoreOptions {
    /// Blocks fetched at once (default 8).
    pub concurrency: usize,
    /// Progress callback: (bytes done, volume size).
    pub progress: Option<Progress>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            concurrency: 8,
            progress: None,
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreResult {
    /// Backup name.
    pub name: String,
    /// Volume size.
    pub size: u64,
    /// Bytes written to the sink (data blocks).
    pub bytes_written: u64,
    /// Bytes fetched from the target.
    pub bytes_downloaded: u64,
    /// Data blocks restored.
    pub blocks: u64,
    /// Wall-clock time.
    pub seconds: f64,
}

/// Restores backup `name` into `sink`, which must be at least the backup's size and
/// read as zeroes.
pub async fn restore<K: RestoreSink>(
    t: &Target,
    name: &str,
    sink: &K,
    opts: &RestoreOptions,
) -> Result<RestoreResult> {
    let started = Instant::now();
    let m = read_manifest(t, name).await?;
    if sink.size() < m.size {
        return Err(BackupError::SinkTooSmall {
            sink: sink.size(),
            needed: m.size,
        });
    }
    let bs = m.block_size;
    let size = m.size;
    let one = |b: &crate::format::BlockRef| {
        let index = b.index;
        let offset = index * bs;
        let want_len = (offset + bs).min(size) - offset;
        let hash = b.hash();
        async move {
            let hash = hash.map_err(|reason| BackupError::CorruptManifest {
                key: t.manifest_key(name).to_string(),
                reason,
            })?;
            let key = t.block_key(&hash);
            let obj = match t.store.get(&key).await {
                Ok(r) => r
                    .bytes()
                    .await
                    .map_err(|e| BackupError::transport(&key, e))?,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(BackupError::MissingBlock {
                        index,
                        offset,
                        key: key.to_string(),
                    })
                }
                Err(e) => return Err(BackupError::transport(&key, e)),
            };
            let fetched = obj.len() as u64;
            let data = tokio::task::spawn_blocking(move || decode_block(&obj, &hash))
                .await
                .expect("decode task panicked");
            let corrupt = |reason: String| BackupError::CorruptBlock {
                index,
                offset,
                key: key.to_string(),
                reason,
            };
            let data = data.map_err(corrupt)?;
            if data.len() as u64 != want_len {
                return Err(corrupt(format!(
                    "{} bytes, the block at this offset has {want_len}",
                    data.len()
                )));
            }
            sink.write(offset, data)
                .await
                .map_err(|source| BackupError::Sink { offset, source })?;
            Ok::<_, BackupError>((want_len, fetched))
        }
    };
    let mut res = RestoreResult {
        name: name.to_string(),
        size,
        ..Default::default()
    };
    let mut stream = futures::stream::iter(m.blocks.iter())
        .map(one)
        .buffer_unordered(opts.concurrency.max(1));
    if let Some(p) = &opts.progress {
        p(0, size);
    }
    let holes = size
        - m.blocks
            .iter()
            .map(|b| (b.index * bs + bs).min(size) - b.index * bs)
            .sum::<u64>();
    while let Some(r) = stream.next().await {
        let (written, fetched) = r?;
        res.blocks += 1;
        res.bytes_written += written;
        res.bytes_downloaded += fetched;
        if let Some(p) = &opts.progress {
            p(holes + res.bytes_written, size);
        }
    }
    drop(stream);
    sink.flush()
        .await
        .map_err(|source| BackupError::Sink { offset: 0, source })?;
    res.seconds = started.elapsed().as_secs_f64();
    Ok(res)
}
