//! Snapshots: create (O(1): the head becomes immutable, a new empty head goes on top),
//! list, delete (merge the layer into its only child, content unchanged) and revert (a new
//! empty head on top of the snapshot; the old head is discarded, newer snapshots are kept).
//!
//! Every change of the layer tree is one atomic metadata replace. Files are created before
//! the metadata that names them and removed after the metadata that dropped them, so a crash
//! leaves at worst orphan files, which `open` removes. A merge is recorded in the metadata
//! before it starts and is completed by `open` if a crash interrupts it.

use cairn_io::Op;

use crate::error::{Result, StoreError};
use crate::layer::Layer;
use crate::meta::{LayerMeta, Merge, SnapMeta};
use crate::{SnapshotInfo, Store, BLOCK_SIZE, BS, MAX_NAME_LEN};

/// Blocks copied per I/O batch during a merge.
const MERGE_BATCH_BLOCKS: u32 = 256;

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidArgument(format!(
            "snapshot name {name:?} must be 1-{MAX_NAME_LEN} characters of [A-Za-z0-9._:-]"
        )))
    }
}

impl Store {
    /// Takes a snapshot of the current content. The head is flushed first, so the snapshot
    /// holds every write acknowledged before this call.
    pub fn snapshot_create(
        &mut self,
        name: &str,
        created_unix_ms: u64,
        labels: Vec<(String, String)>,
    ) -> Result<()> {
        self.check_ok()?;
        check_name(name)?;
        if self.meta.snapshot_id(name).is_some() {
            return Err(StoreError::AlreadyExists(name.to_owned()));
        }
        self.flush()?;
        let mut m = self.meta.clone();
        let new_id = m.next_layer_id;
        m.next_layer_id += 1;
        let old_head = m.head;
        let size = m.size;
        m.layer_mut(old_head)
            .expect("head is in the metadata")
            .snapshot = Some(SnapMeta {
            name: name.to_owned(),
            created_unix_ms,
            labels,
            size,
        });
        m.layers.push(LayerMeta {
            id: new_id,
            parent: Some(old_head),
            snapshot: None,
            removed: false,
        });
        m.head = new_id;
        let layer = Layer::create(&self.dir, new_id, size)?;
        m.save(&self.dir)?;
        self.meta = m;
        self.layers.insert(new_id, layer);
        self.chain.insert(0, new_id);
        tracing::info!(snapshot = name, "snapshot created");
        Ok(())
    }

    /// Every snapshot not deleted, oldest first.
    pub fn snapshot_list(&self) -> Vec<SnapshotInfo> {
        let mut out: Vec<SnapshotInfo> = self
            .meta
            .layers
            .iter()
            .filter(|l| !l.removed)
            .filter_map(|l| {
                let s = l.snapshot.as_ref()?;
                Some(SnapshotInfo {
                    name: s.name.clone(),
                    parent: self.visible_parent(l.parent),
                    created_unix_ms: s.created_unix_ms,
                    allocated_bytes: self.layers.get(&l.id).map_or(0, Layer::allocated_bytes),
                    labels: s.labels.clone(),
                    size: s.size,
                })
            })
            .collect();
        out.sort_by_key(|s| (s.created_unix_ms, s.name.clone()));
        out
    }

    /// The nearest ancestor starting at `id` that is a listed snapshot.
    fn visible_parent(&self, mut id: Option<u64>) -> Option<String> {
        while let Some(i) = id {
            let l = self.meta.layer(i)?;
            if !l.removed {
                if let Some(s) = &l.snapshot {
                    return Some(s.name.clone());
                }
            }
            id = l.parent;
        }
        None
    }

    /// Deletes a snapshot without changing the content of the volume or of any other
    /// snapshot: its blocks move into its child. A snapshot with several children (after a
    /// revert) disappears from the list at once and is merged when it has one child left.
    pub fn snapshot_delete(&mut self, name: &str) -> Result<()> {
        self.check_ok()?;
        let id = self
            .meta
            .snapshot_id(name)
            .ok_or_else(|| StoreError::NotFound(name.to_owned()))?;
        let mut m = self.meta.clone();
        m.layer_mut(id).expect("found above").removed = true;
        m.save(&self.dir)?;
        self.meta = m;
        self.collect_removed()?;
        tracing::info!(snapshot = name, "snapshot deleted");
        Ok(())
    }

    /// Makes the volume's content that of snapshot `name`. Writes since then are discarded;
    /// every snapshot, older or newer, is kept.
    pub fn snapshot_revert(&mut self, name: &str) -> Result<()> {
        self.check_ok()?;
        let target = self
            .meta
            .snapshot_id(name)
            .ok_or_else(|| StoreError::NotFound(name.to_owned()))?;
        let mut m = self.meta.clone();
        let old_head = m.head;
        let new_id = m.next_layer_id;
        m.next_layer_id += 1;
        m.layers.retain(|l| l.id != old_head);
        m.layers.push(LayerMeta {
            id: new_id,
            parent: Some(target),
            snapshot: None,
            removed: false,
        });
        m.head = new_id;
        let layer = Layer::create(&self.dir, new_id, m.size)?;
        m.save(&self.dir)?;
        self.meta = m;
        self.layers.remove(&old_head);
        Layer::remove_files(&self.dir, old_head)?;
        self.layers.insert(new_id, layer);
        self.chain = self.meta.ancestry(new_id);
        self.collect_removed()?;
        tracing::info!(snapshot = name, "volume reverted");
        Ok(())
    }

    /// Merges or drops every removed layer that has at most one child, until none is left.
    pub(crate) fn collect_removed(&mut self) -> Result<()> {
        loop {
            let next = self.meta.layers.iter().find_map(|l| {
                let children = self.meta.children(l.id);
                (l.removed && children.len() <= 1).then(|| (l.id, children.first().copied()))
            });
            match next {
                None => return Ok(()),
                Some((id, None)) => self.drop_layer(id)?,
                Some((id, Some(child))) => self.merge(Merge {
                    from: id,
                    into: child,
                })?,
            }
        }
    }

    fn drop_layer(&mut self, id: u64) -> Result<()> {
        let mut m = self.meta.clone();
        m.layers.retain(|l| l.id != id);
        m.save(&self.dir)?;
        self.meta = m;
        self.layers.remove(&id);
        Layer::remove_files(&self.dir, id)
    }

    /// Copies every block of `from` that `into` lacks into `into`, then drops `from` and
    /// re-parents `into`. Idempotent: `open` runs it again after a crash.
    pub(crate) fn merge(&mut self, merge: Merge) -> Result<()> {
        if self.meta.merging != Some(merge) {
            let mut m = self.meta.clone();
            m.merging = Some(merge);
            m.save(&self.dir)?;
            self.meta = m;
        }
        let todo = &self.layers[&merge.from].blocks - &self.layers[&merge.into].blocks;
        let (dd, dc) = (
            self.layers[&merge.into].data_fd(),
            self.layers[&merge.into].crc_fd(),
        );
        let mut buf = vec![0u8; MERGE_BATCH_BLOCKS as usize * BLOCK_SIZE as usize];
        let mut crcs = vec![0u8; MERGE_BATCH_BLOCKS as usize * 4];
        let mut iter = todo.iter().peekable();
        while let Some(start) = iter.next() {
            let mut n = 1u32;
            while n < MERGE_BATCH_BLOCKS && iter.peek() == Some(&(start + n)) {
                iter.next();
                n += 1;
            }
            let first = u64::from(start);
            let bytes = n as usize * BLOCK_SIZE as usize;
            let (d, c) = (&mut buf[..bytes], &mut crcs[..n as usize * 4]);
            if let Some(&i) = self.read_run_checked(merge.from, first, d, c)?.first() {
                return Err(StoreError::Corruption {
                    offset: (first + i as u64) * BS,
                    layer: merge.from,
                });
            }
            let regions = [self.dirty.regions(first * BS, u64::from(n) * BS)];
            self.dirty.mark(&mut self.io, &regions)?;
            let copied = self.io.run_all(&mut [
                Op::Write {
                    fd: dd,
                    buf: d,
                    offset: first * BS,
                },
                Op::Write {
                    fd: dc,
                    buf: c,
                    offset: first * 4,
                },
            ]);
            if let Err(e) = copied {
                self.reconcile(merge.into, first, u64::from(n));
                return Err(e.into());
            }
            self.layers
                .get_mut(&merge.into)
                .expect("merge target is open")
                .blocks
                .insert_range(start..start + n);
        }
        if let Err(e) = self.io.fdatasync(&[dd, dc]) {
            self.failed = true;
            return Err(e.into());
        }
        let mut m = self.meta.clone();
        let parent = m.layer(merge.from).and_then(|l| l.parent);
        m.layer_mut(merge.into)
            .expect("merge target is in the metadata")
            .parent = parent;
        m.layers.retain(|l| l.id != merge.from);
        m.merging = None;
        m.save(&self.dir)?;
        self.meta = m;
        self.layers.remove(&merge.from);
        Layer::remove_files(&self.dir, merge.from)?;
        self.chain = self.meta.ancestry(self.meta.head);
        Ok(())
    }
}
