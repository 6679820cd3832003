//! cairn-store: one replica's copy of a volume on local disk.
//!
//! A replica is a directory holding a tree of layers (sparse data file + checksum file each):
//! immutable snapshot layers and one writable head. The head's ancestry is the volume's
//! content: a 4 KiB block reads from the newest layer of that chain that holds it, or as zeros.
//! Metadata (`replica.json`) is replaced atomically; a dirty-region log bounds crash recovery.
//!
//! Guarantees:
//! - Every block written carries the sender's CRC32; it is verified before anything is written
//!   and stored beside the data. Every read verifies data against its stored CRC and fails
//!   with [`StoreError::Corruption`] naming the block instead of returning bad data.
//! - After a crash (SIGKILL at any point), `open` yields a store in which every write that
//!   was acknowledged before the last acknowledged [`Store::flush`] reads back exactly, and no
//!   block is reported corrupt because of the crash.
//! - Requests must be aligned to [`BLOCK_SIZE`] and inside the volume; anything else is
//!   refused with a typed error and changes nothing.
//! - [`Store::recreate`] replaces the whole replica by an empty one with the same epoch in one
//!   atomic directory exchange: after a crash at any point `open` finds either the old replica
//!   or the new one, never a mix, and never a lower epoch.
//!
//! Assumptions: one `Store` per directory (the caller serialises access), a file system that
//! supports sparse files, hole punching and SEEK_DATA with allocation units of at most 4 KiB
//! (ext4, xfs, btrfs, tmpfs), and volumes of at most 16 TiB (block numbers are 32-bit).

mod data;
mod dirty;
mod error;
mod layer;
mod meta;
mod rebuild;
mod recovery;
mod recreate;
mod snapshot;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use cairn_io::{Backend, EngineChoice, Io};

pub use data::{zero_block_crc, ReadReq, WriteReq, MAX_IO_BYTES};
pub use error::{Result, StoreError};
pub use meta::write_atomic;
pub use rebuild::{MAX_DIGEST_GRANULES, MAX_DIGEST_RANGE};

use dirty::DirtyLog;
use layer::{Layer, LAYER_DIR};
use meta::Meta;

/// Bytes per block: the unit of allocation, checksums and alignment.
pub const BLOCK_SIZE: u32 = 4096;
const BS: u64 = BLOCK_SIZE as u64;
/// Bytes per dirty-log region.
pub const DEFAULT_REGION_SIZE: u64 = 1 << 20;
/// Largest volume: block numbers are 32-bit.
pub const MAX_VOLUME_SIZE: u64 = (u32::MAX as u64) * BS;
/// Longest snapshot name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

pub(crate) fn block_index(offset: u64) -> u64 {
    offset / BS
}

/// Which layer an extent listing or a layer read looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSel {
    /// The writable head alone.
    Head,
    /// One snapshot's own layer alone (not its ancestors).
    Snapshot(String),
    /// The volume's logical content (every layer of the head's chain).
    Merged,
    /// The content as of one snapshot: its layer and its ancestors'.
    MergedAt(String),
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// The next older snapshot this one sits on, if any.
    pub parent: Option<String>,
    pub created_unix_ms: u64,
    /// Bytes held by this snapshot's own layer.
    pub allocated_bytes: u64,
    pub labels: Vec<(String, String)>,
    /// Volume size when it was taken.
    pub size: u64,
}

/// A block whose stored data does not match its stored checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptBlock {
    /// `head` or the snapshot's name.
    pub layer: String,
    pub offset: u64,
}

/// Operation counters since open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub errors: u64,
    pub corruptions: u64,
}

/// What `open` found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Regions the dirty log had marked.
    pub dirty_regions: u64,
    /// Checksums rewritten because a crash had separated them from their data.
    pub checksums_repaired: u64,
    /// A snapshot merge interrupted by the crash was completed.
    pub merge_completed: bool,
}

/// One replica's data. Not `Sync`: the caller serialises operations.
pub struct Store {
    dir: PathBuf,
    io: Io,
    meta: Meta,
    layers: HashMap<u64, Layer>,
    /// The head's ancestry, head first.
    chain: Vec<u64>,
    dirty: DirtyLog,
    counters: Counters,
    /// Set by a failed fdatasync: after it nothing is known durable, so every operation fails.
    failed: bool,
    recovery: RecoveryReport,
    /// False only for benchmarks that measure what checksums cost.
    checksums: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("size", &self.meta.size)
            .field("epoch", &self.meta.epoch)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Creates a new, empty replica of `size` bytes in `dir` (created if missing; must not
    /// already hold a replica).
    pub fn create(
        dir: &Path,
        volume: &str,
        replica_id: &str,
        size: u64,
        engine: EngineChoice,
    ) -> Result<Store> {
        check_size(size)?;
        fs::create_dir_all(dir)?;
        if dir.join(meta::META_FILE).exists() {
            return Err(StoreError::InvalidArgument(format!(
                "{} already holds a replica",
                dir.display()
            )));
        }
        let io = Io::new(engine).map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        let meta = Meta::new(volume, replica_id, size, DEFAULT_REGION_SIZE);
        // Start from a clean layers directory: a crash during an earlier create may have left
        // files behind, and nothing refers to them without replica.json.
        let _ = fs::remove_dir_all(dir.join(LAYER_DIR));
        let head = Layer::create(dir, meta.head, size)?;
        let dirty = DirtyLog::create(dir, size, meta.region_size)?;
        meta.save(dir)?;
        let mut layers = HashMap::new();
        layers.insert(head.id, head);
        Ok(Store {
            dir: dir.to_owned(),
            io,
            chain: vec![meta.head],
            meta,
            layers,
            dirty,
            counters: Counters::default(),
            failed: false,
            recovery: RecoveryReport::default(),
            checksums: true,
        })
    }

    /// Opens the replica in `dir`, repairing what a crash may have left (see
    /// [`Store::recovery_report`]).
    pub fn open(dir: &Path, engine: EngineChoice) -> Result<Store> {
        let io = Io::new(engine).map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        let meta = Meta::load(dir)?;
        // Whatever an interrupted recreate left beside the replica is garbage either way.
        if let Err(e) = recreate::remove_scratch(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove recreate leftovers");
        }
        recovery::remove_orphans(dir, &meta)?;
        let mut layers = HashMap::new();
        for l in &meta.layers {
            layers.insert(l.id, Layer::open(dir, l.id)?);
        }
        let dirty = DirtyLog::open(dir, meta.size, meta.region_size)?;
        let mut store = Store {
            dir: dir.to_owned(),
            io,
            chain: meta.ancestry(meta.head),
            meta,
            layers,
            dirty,
            counters: Counters::default(),
            failed: false,
            recovery: RecoveryReport::default(),
            checksums: true,
        };
        store.recover()?;
        Ok(store)
    }

    /// Turns checksum verification and storage off (`false`) or on. Only for measuring what
    /// checksums cost: blocks written while off read back as corrupt once it is on again.
    pub fn set_checksums(&mut self, enabled: bool) {
        self.checksums = enabled;
    }

    /// True when `dir` holds a replica.
    pub fn exists(dir: &Path) -> bool {
        dir.join(meta::META_FILE).is_file()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size(&self) -> u64 {
        self.meta.size
    }

    pub fn volume(&self) -> &str {
        &self.meta.volume
    }

    pub fn replica_id(&self) -> &str {
        &self.meta.replica_id
    }

    pub fn backend(&self) -> Backend {
        self.io.backend()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Random non-zero id of this incarnation of the replica, chosen when it was created or
    /// last recreated (0 for a replica created before instance ids existed).
    pub fn instance(&self) -> u64 {
        self.meta.instance
    }

    /// The highest engine epoch this replica has accepted.
    pub fn epoch(&self) -> u64 {
        self.meta.epoch
    }

    /// Persists a new accepted epoch; refuses to go backwards.
    pub fn set_epoch(&mut self, epoch: u64) -> Result<()> {
        self.check_ok()?;
        if epoch < self.meta.epoch {
            return Err(StoreError::InvalidArgument(format!(
                "epoch {epoch} is older than the accepted {}",
                self.meta.epoch
            )));
        }
        if epoch != self.meta.epoch {
            let mut m = self.meta.clone();
            m.epoch = epoch;
            m.save(&self.dir)?;
            self.meta = m;
        }
        Ok(())
    }

    /// Snapshot names of the head's chain, oldest first.
    pub fn chain_names(&self) -> Vec<String> {
        self.chain
            .iter()
            .rev()
            .filter_map(|id| self.meta.layer(*id)?.snapshot.as_ref())
            .map(|s| s.name.clone())
            .collect()
    }

    /// Regions marked in the dirty-region log (region size, region indices): the only places
    /// where this replica may differ from a peer after an engine crash.
    pub fn dirty_regions(&self) -> (u64, Vec<u64>) {
        (
            self.dirty.region_size(),
            self.dirty.marked().iter().map(u64::from).collect(),
        )
    }

    /// Grows the volume to `new_size` bytes; new space reads as zeros.
    pub fn grow(&mut self, new_size: u64) -> Result<()> {
        self.check_ok()?;
        check_size(new_size)?;
        if new_size < self.meta.size {
            return Err(StoreError::InvalidArgument(format!(
                "cannot shrink from {} to {new_size} bytes",
                self.meta.size
            )));
        }
        self.head().grow(new_size)?;
        self.dirty.grow(&mut self.io, new_size)?;
        let mut m = self.meta.clone();
        m.size = new_size;
        m.save(&self.dir)?;
        self.meta = m;
        Ok(())
    }

    fn head(&self) -> &Layer {
        &self.layers[&self.meta.head]
    }

    fn check_ok(&self) -> Result<()> {
        if self.failed {
            return Err(StoreError::Io(std::io::Error::other(
                "an earlier fdatasync failed; the replica must be rebuilt",
            )));
        }
        Ok(())
    }

    /// Validates `offset..offset+len` against alignment and the volume size.
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(BS) || !len.is_multiple_of(BS) {
            return Err(StoreError::Misaligned { offset, len });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.meta.size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                len,
                size: self.meta.size,
            }),
        }
    }

    /// Name of a layer for reports: `head` or its snapshot name.
    fn layer_name(&self, id: u64) -> String {
        match self.meta.layer(id).and_then(|l| l.snapshot.as_ref()) {
            Some(s) => s.name.clone(),
            None if id == self.meta.head => "head".to_owned(),
            None => format!("layer-{id}"),
        }
    }
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(BS) || size > MAX_VOLUME_SIZE {
        return Err(StoreError::InvalidArgument(format!(
            "volume size {size} must be a non-zero multiple of {BLOCK_SIZE} up to {MAX_VOLUME_SIZE}"
        )));
    }
    Ok(())
}

/// One CRC32 per 4 KiB block of `data` (a trailing partial block gets its own).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_SIZE as usize)
        .map(crc32fast::hash)
        .collect()
}
