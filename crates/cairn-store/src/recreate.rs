//! Recreate: discard a replica's whole content (every layer, snapshot and dirty mark) and
//! start it again empty, in place, under the same volume, replica id, size and epoch and a
//! new instance id.
//!
//! Scheme, for a replica in `P/NAME`:
//! 1. build the new replica completely in the sibling scratch directory `P/.NAME.recreate`
//!    (empty head layer, clean dirty log, `replica.json` carrying the old epoch), every file
//!    and directory in it fsynced;
//! 2. swap `P/NAME` and the scratch directory in one atomic `renameat2(RENAME_EXCHANGE)`,
//!    then fsync `P`;
//! 3. delete the scratch directory, which now holds the old replica.
//!
//! Crash safety: before step 2 `P/NAME` is the untouched old replica; from step 2 on it is the
//! complete new one (the exchange is one atomic directory operation, and no step rewrites a
//! file inside `P/NAME`). The scratch directory, whatever it holds at a crash, is never needed
//! again: [`Store::open`] and the next recreate delete it. So after a crash at any point the
//! replica opens as either the old replica or the new empty one, and the epoch it reports is
//! never lower than the one accepted before the recreate.
//!
//! The new layer and dirty-log files are created in the scratch directory and stay open
//! across the exchange (a rename does not change which inode a descriptor refers to), so
//! nothing that can fail is left once the exchange is done but the fsync of `P`.
//!
//! Assumes a file system with `RENAME_EXCHANGE` (ext4, xfs, btrfs, tmpfs); elsewhere recreate
//! fails cleanly and the old replica stays as it was.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::dirty::DirtyLog;
use crate::error::{Result, StoreError};
use crate::layer::{Layer, LAYER_DIR};
use crate::meta::{sync_dir, Meta};
use crate::{RecoveryReport, Store};

/// Suffix of the scratch directory beside a replica's directory.
const SCRATCH_SUFFIX: &str = ".recreate";

/// A new empty replica, complete and durable in the scratch directory.
pub(crate) struct Fresh {
    pub scratch: PathBuf,
    meta: Meta,
    head: Layer,
    dirty: DirtyLog,
}

/// The directory holding `dir` (`.` for a bare relative name).
fn parent_of(dir: &Path) -> &Path {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `P/.NAME.recreate` for a replica in `P/NAME`.
pub(crate) fn scratch_dir(dir: &Path) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| {
        StoreError::InvalidArgument(format!("{} has no directory name", dir.display()))
    })?;
    Ok(parent_of(dir).join(format!(".{}{SCRATCH_SUFFIX}", name.to_string_lossy())))
}

/// Deletes what an interrupted recreate left beside `dir`, if anything.
pub(crate) fn remove_scratch(dir: &Path) -> Result<()> {
    let scratch = scratch_dir(dir)?;
    match fs::remove_dir_all(&scratch) {
        Ok(()) => {
            tracing::warn!(dir = %scratch.display(), "removed a leftover recreate directory");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Atomically exchanges the directories `a` and `b`, then makes the exchange durable.
pub(crate) fn exchange(a: &Path, b: &Path) -> Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        a,
        rustix::fs::CWD,
        b,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(io::Error::from)?;
    Ok(())
}

impl Store {
    /// Discards the whole replica and makes this store an empty replica with the same volume,
    /// replica id, size and accepted epoch and a new [`instance`](Store::instance) id. See the
    /// module docs for why a crash at any point leaves either the old replica or the new one.
    ///
    /// Allowed on a store that an earlier failed fdatasync put out of service: nothing of the
    /// old files is kept, so this is how such a replica is rebuilt in place. Operation counters
    /// carry on; the recovery report is reset.
    pub fn recreate(&mut self) -> Result<()> {
        let fresh = self.prepare_recreate()?;
        if let Err(e) = exchange(&fresh.scratch, &self.dir) {
            let _ = fs::remove_dir_all(&fresh.scratch);
            return Err(e);
        }
        let scratch = fresh.scratch.clone();
        let synced = sync_dir(parent_of(&self.dir));
        self.adopt(fresh);
        if let Err(e) = synced {
            // The exchange may or may not be durable: nothing is known durable any more. The
            // scratch directory (old replica) stays for the next open or recreate to delete.
            self.failed = true;
            tracing::error!(error = %e, "fsync after recreate failed; replica is now failed");
            return Err(e);
        }
        if let Err(e) = fs::remove_dir_all(&scratch) {
            tracing::warn!(dir = %scratch.display(), error = %e, "cannot remove the old replica");
        }
        tracing::info!(
            volume = %self.meta.volume,
            replica_id = %self.meta.replica_id,
            instance = self.meta.instance,
            epoch = self.meta.epoch,
            "replica recreated empty"
        );
        Ok(())
    }

    /// Step 1: builds the new replica, complete and durable, in the scratch directory
    /// (deleting whatever an earlier attempt left there). On error the scratch directory is
    /// removed again, best effort.
    pub(crate) fn prepare_recreate(&self) -> Result<Fresh> {
        let scratch = scratch_dir(&self.dir)?;
        remove_scratch(&self.dir)?;
        let built = self.build_fresh(&scratch);
        if built.is_err() {
            let _ = fs::remove_dir_all(&scratch);
        }
        built
    }

    fn build_fresh(&self, scratch: &Path) -> Result<Fresh> {
        let old = &self.meta;
        let mut meta = Meta::new(&old.volume, &old.replica_id, old.size, old.region_size);
        meta.epoch = old.epoch;
        while meta.instance == old.instance {
            meta.instance = crate::meta::new_instance();
        }
        fs::create_dir(scratch)?;
        let head = Layer::create(scratch, meta.head, meta.size)?;
        sync_dir(&scratch.join(LAYER_DIR))?;
        let dirty = DirtyLog::create(scratch, meta.size, meta.region_size)?;
        // Saves replica.json last and fsyncs the scratch directory itself.
        meta.save(scratch)?;
        Ok(Fresh {
            scratch: scratch.to_owned(),
            meta,
            head,
            dirty,
        })
    }

    /// Step 2 done: serves the new replica, whose files the exchange moved to `self.dir`.
    fn adopt(&mut self, fresh: Fresh) {
        let Fresh {
            meta, head, dirty, ..
        } = fresh;
        self.chain = vec![meta.head];
        self.layers.clear();
        self.layers.insert(head.id, head);
        self.meta = meta;
        self.dirty = dirty;
        self.failed = false;
        self.recovery = RecoveryReport::default();
    }
}
