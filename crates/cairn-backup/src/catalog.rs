//! Listing, reading and deleting backups, and garbage collection of blocks.
//!
//! Deletion removes the manifest first, then collects garbage: under the GC lock, a block
//! is deleted only if no manifest lists it and no backup is in progress (see `coord`). A
//! manifest that cannot be read stops the collection before anything is deleted.

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::coord::{CoordOptions, GcLock};
use crate::error::{BackupError, Result};
use crate::format::{validate_name, Manifest};
use crate::target::Target;

/// A backup as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    /// Backup name.
    pub name: String,
    /// Volume name.
    pub volume: String,
    /// Snapshot name.
    pub snapshot: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Parent backup of an incremental backup.
    pub parent: Option<String>,
    /// Number of data (non-hole) blocks.
    pub data_blocks: u64,
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Manifests read.
    pub manifests: u64,
    /// Block objects found.
    pub blocks_seen: u64,
    /// Block objects deleted.
    pub blocks_deleted: u64,
    /// Unreferenced blocks kept because a backup was in progress.
    pub blocks_kept_for_running_backups: u64,
    /// Backups in progress at the time.
    pub running_backups: u64,
}

pub(crate) fn checked_name(name: &str) -> Result<()> {
    validate_name(name).map_err(|reason| BackupError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

/// Reads and validates one manifest.
pub async fn read_manifest(t: &Target, name: &str) -> Result<Manifest> {
    checked_name(name)?;
    read_manifest_at(t, &t.manifest_key(name), name).await
}

async fn read_manifest_at(t: &Target, key: &Path, name: &str) -> Result<Manifest> {
    let bytes = match t.store.get(key).await {
        Ok(r) => r
            .bytes()
            .await
            .map_err(|e| BackupError::transport(key, e))?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(BackupError::NotFound(name.to_string()))
        }
        Err(e) => return Err(BackupError::transport(key, e)),
    };
    let corrupt = |reason: String| BackupError::CorruptManifest {
        key: key.to_string(),
        reason,
    };
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    m.validate().map_err(corrupt)?;
    if m.name != name {
        return Err(corrupt(format!("names backup {:?}", m.name)));
    }
    Ok(m)
}

async fn all_manifests(t: &Target) -> Result<Vec<Manifest>> {
    let prefix = t.key("manifests");
    let metas: Vec<_> = t
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| BackupError::transport(&prefix, e))?;
    let mut out = Vec::with_capacity(metas.len());
    let reads = futures::stream::iter(metas.into_iter().filter_map(|m| {
        let file = m.location.filename()?.to_string();
        let name = file.strip_suffix(".json")?.to_string();
        Some((m.location, name))
    }))
    .map(|(key, name)| async move { read_manifest_at(t, &key, &name).await })
    .buffer_unordered(16);
    futures::pin_mut!(reads);
    while let Some(m) = reads.next().await {
        match m {
            Ok(m) => out.push(m),
            // Deleted between the listing and the read.
            Err(BackupError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Lists complete backups (those whose manifest exists), oldest first.
pub async fn list(t: &Target) -> Result<Vec<BackupInfo>> {
    let mut v: Vec<BackupInfo> = all_manifests(t)
        .await?
        .into_iter()
        .map(|m| BackupInfo {
            data_blocks: m.blocks.len() as u64,
            name: m.name,
            volume: m.volume,
            snapshot: m.snapshot,
            size: m.size,
            created: m.created,
            created_unix: m.created_unix,
            parent: m.parent,
        })
        .collect();
    v.sort_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)));
    Ok(v)
}

/// Deletes a backup's manifest, then collects garbage. Other backups, including
/// incremental children of this one, stay restorable: they list every block they use.
pub async fn delete(t: &Target, name: &str, opts: &CoordOptions) -> Result<GcReport> {
    checked_name(name)?;
    let key = t.manifest_key(name);
    match t.store.head(&key).await {
        Ok(_) => {}
        Err(object_store::Error::NotFound { .. }) => {
            return Err(BackupError::NotFound(name.to_string()))
        }
        Err(e) => return Err(BackupError::transport(&key, e)),
    }
    match t.store.delete(&key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(BackupError::transport(&key, e)),
    }
    gc(t, opts).await
}

/// Deletes block objects no manifest references, unless a backup is in progress.
pub async fn gc(t: &Target, opts: &CoordOptions) -> Result<GcReport> {
    let lock = GcLock::acquire(t, opts).await?;
    let result = gc_locked(t, &lock, opts).await;
    let released = lock.release(t).await;
    let report = result?;
    released?;
    Ok(report)
}

async fn gc_locked(t: &Target, lock: &GcLock, opts: &CoordOptions) -> Result<GcReport> {
    let mut report = GcReport::default();
    // Markers first: a backup that writes its marker after this listing sees our lock
    // and waits, so it cannot reuse a block we are about to delete.
    let running = lock.live_markers(t, opts).await?;
    report.running_backups = running as u64;
    let manifests = all_manifests(t).await?;
    report.manifests = manifests.len() as u64;
    let mut used = HashSet::new();
    for m in &manifests {
        for b in &m.blocks {
            used.insert(b.hash.clone());
        }
    }
    let prefix = t.key("blocks");
    let blocks: Vec<_> = t
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| BackupError::transport(&prefix, e))?;
    report.blocks_seen = blocks.len() as u64;
    let garbage: Vec<Path> = blocks
        .into_iter()
        .filter(|m| {
            m.location
                .filename()
                .is_some_and(|f| f.len() == 64 && !used.contains(f))
        })
        .map(|m| m.location)
        .collect();
    if running > 0 {
        report.blocks_kept_for_running_backups = garbage.len() as u64;
        return Ok(report);
    }
    let mut deletes = futures::stream::iter(garbage)
        .map(|key| async move {
            match t.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(BackupError::transport(&key, e)),
            }
        })
        .buffer_unordered(16);
    while let Some(r) = deletes.next().await {
        r?;
        report.blocks_deleted += 1;
    }
    Ok(report)
}
