//! The replica's metadata file, `replica.json`, and the atomic replace that writes it.
//!
//! Guarantee: after `save` returns, a crash at any point leaves either the old or the new
//! file in place, never a mix (temp file, fsync, rename, fsync of the directory).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

pub(crate) const META_FILE: &str = "replica.json";
const FORMAT: u32 = 1;

/// What a snapshot layer remembers about the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SnapMeta {
    pub name: String,
    pub created_unix_ms: u64,
    pub labels: Vec<(String, String)>,
    /// Volume size when the snapshot was taken.
    pub size: u64,
}

/// One layer: the head (no `snapshot`) or an immutable snapshot layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct LayerMeta {
    pub id: u64,
    pub parent: Option<u64>,
    pub snapshot: Option<SnapMeta>,
    /// Deleted by the user but still needed by more than one child; merged away later.
    #[serde(default)]
    pub removed: bool,
}

/// A merge of layer `from` into its only child `into`, recorded before it starts so that
/// recovery knows `into` may hold half-copied blocks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Merge {
    pub from: u64,
    pub into: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Meta {
    pub format: u32,
    pub volume: String,
    pub replica_id: String,
    pub size: u64,
    pub epoch: u64,
    /// Random non-zero id of this incarnation of the replica, chosen at create and recreate;
    /// 0 in files written before instance ids existed.
    #[serde(default)]
    pub instance: u64,
    pub region_size: u64,
    pub next_layer_id: u64,
    pub head: u64,
    pub layers: Vec<LayerMeta>,
    #[serde(default)]
    pub merging: Option<Merge>,
}

impl Meta {
    pub(crate) fn new(volume: &str, replica_id: &str, size: u64, region_size: u64) -> Meta {
        Meta {
            format: FORMAT,
            volume: volume.to_owned(),
            replica_id: replica_id.to_owned(),
            size,
            epoch: 0,
            instance: new_instance(),
            region_size,
            next_layer_id: 2,
            head: 1,
            layers: vec![LayerMeta {
                id: 1,
                parent: None,
                snapshot: None,
                removed: false,
            }],
            merging: None,
        }
    }

    pub(crate) fn load(dir: &Path) -> Result<Meta> {
        let path = dir.join(META_FILE);
        let bad = |reason: String| StoreError::BadMeta {
            path: path.display().to_string(),
            reason,
        };
        let text = fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let meta: Meta = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if meta.format != FORMAT {
            return Err(bad(format!(
                "format {} (this build reads {FORMAT})",
                meta.format
            )));
        }
        if !meta
            .layers
            .iter()
            .any(|l| l.id == meta.head && l.snapshot.is_none())
        {
            return Err(bad(format!("head layer {} is missing", meta.head)));
        }
        Ok(meta)
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
        write_atomic(dir, META_FILE, &bytes)
    }

    pub(crate) fn layer(&self, id: u64) -> Option<&LayerMeta> {
        self.layers.iter().find(|l| l.id == id)
    }

    pub(crate) fn layer_mut(&mut self, id: u64) -> Option<&mut LayerMeta> {
        self.layers.iter_mut().find(|l| l.id == id)
    }

    /// Layer ids from `id` down to the root, `id` first.
    pub(crate) fn ancestry(&self, id: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut cur = Some(id);
        while let Some(c) = cur {
            if out.contains(&c) {
                break; // a cycle would be corrupt metadata; never loop on it
            }
            out.push(c);
            cur = self.layer(c).and_then(|l| l.parent);
        }
        out
    }

    pub(crate) fn children(&self, id: u64) -> Vec<u64> {
        self.layers
            .iter()
            .filter(|l| l.parent == Some(id))
            .map(|l| l.id)
            .collect()
    }

    pub(crate) fn snapshot_id(&self, name: &str) -> Option<u64> {
        self.layers
            .iter()
            .find(|l| !l.removed && l.snapshot.as_ref().is_some_and(|s| s.name == name))
            .map(|l| l.id)
    }
}

/// A random non-zero instance id. std only: a `RandomState` is keyed from the OS's random
/// source once per thread and differs per call, and the time and process id are mixed in
/// on top.
pub(crate) fn new_instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        h.write_u128(now);
        h.write_u32(std::process::id());
        let id = h.finish();
        if id != 0 {
            return id;
        }
    }
}

/// Removes the temp file if the write does not reach its rename.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Replaces `dir/name` with `bytes` atomically and durably.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut guard = TempGuard(Some(tmp.clone()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    guard.0 = None;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}
