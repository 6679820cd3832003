//! The replicated state machine on sled: [`openraft::storage::RaftStateMachine`]
//! and [`openraft::RaftSnapshotBuilder`], plus reads of the applied records.
//!
//! Layout: tree `records` maps `len(kind) (8 bytes BE) ++ kind ++ name` to
//! `version (8 bytes BE) ++ data`, so the records of one kind are contiguous
//! and sorted by name; tree `sm` holds the last applied log id and the last
//! membership (JSON); tree `snapshot` holds the current snapshot's meta
//! (JSON) and bytes.
//!
//! Guarantees: each log entry is applied in one sled transaction together
//! with the new last applied log id, so after a crash the records are exactly
//! those of the entries up to last applied. `apply` flushes before returning.
//! A snapshot is a consistent copy taken when the builder is created (while
//! no entry is being applied); installing one replaces records, meta and the
//! current snapshot in one transaction.

// openraft's storage traits return `StorageError` (224 bytes) by value; the
// helpers here share that error type rather than boxing and unboxing it.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::command::{decide, Write};
use crate::watch::{WatchHub, HISTORY};
use crate::{CommandResult, MetaError, NodeId, Record, TypeConfig};

const TREE_RECORDS: &str = "records";
const TREE_SM: &str = "sm";
const TREE_SNAPSHOT: &str = "snapshot";
const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_SNAP_META: &[u8] = b"meta";
const KEY_SNAP_DATA: &[u8] = b"data";

type StorageResult<T> = Result<T, StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// The applied record store of one member. Cheap to clone: clones share the
/// sled trees, so a clone kept outside openraft serves reads.
#[derive(Clone, Debug)]
pub struct StateMachineStore {
    db: sled::Db,
    records: sled::Tree,
    sm: sled::Tree,
    snapshot: sled::Tree,
    hub: Arc<WatchHub>,
}

/// Builds a snapshot from the copy of the state taken by
/// [`RaftStateMachine::get_snapshot_builder`].
#[derive(Debug)]
pub struct SnapshotBuilder {
    store: StateMachineStore,
    records: Vec<Record>,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    /// Why the copy could not be taken; `build_snapshot` then fails.
    copy_error: Option<String>,
}

/// What a snapshot's bytes hold.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    records: Vec<Record>,
}

fn record_prefix(kind: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + kind.len());
    key.extend_from_slice(&(kind.len() as u64).to_be_bytes());
    key.extend_from_slice(kind.as_bytes());
    key
}

fn record_key(kind: &str, name: &str) -> Vec<u8> {
    let mut key = record_prefix(kind);
    key.extend_from_slice(name.as_bytes());
    key
}

fn record_value(version: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + data.len());
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn corrupt(what: &'static str, detail: impl ToString) -> MetaError {
    MetaError::Corruption {
        what,
        detail: detail.to_string(),
    }
}

fn decode_version(value: &[u8]) -> Result<u64, MetaError> {
    let head: [u8; 8] = value
        .get(..8)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| corrupt("record", "value shorter than its version"))?;
    Ok(u64::from_be_bytes(head))
}

fn decode_record(key: &[u8], value: &[u8]) -> Result<Record, MetaError> {
    let len_bytes: [u8; 8] = key
        .get(..8)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| corrupt("record key", "too short"))?;
    let kind_len =
        usize::try_from(u64::from_be_bytes(len_bytes)).map_err(|e| corrupt("record key", e))?;
    let kind_end = 8usize
        .checked_add(kind_len)
        .filter(|end| *end <= key.len())
        .ok_or_else(|| corrupt("record key", "kind length out of range"))?;
    let kind = std::str::from_utf8(&key[8..kind_end]).map_err(|e| corrupt("record kind", e))?;
    let name = std::str::from_utf8(&key[kind_end..]).map_err(|e| corrupt("record name", e))?;
    Ok(Record {
        kind: kind.to_owned(),
        name: name.to_owned(),
        version: decode_version(value)?,
        data: value[8..].to_vec(),
    })
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

fn tx_err<E: std::error::Error + 'static>(e: TransactionError<E>) -> StorageError<NodeId> {
    match e {
        TransactionError::Abort(e) => write_err(e),
        TransactionError::Storage(e) => write_err(e),
    }
}

impl StateMachineStore {
    pub(crate) fn new(db: &sled::Db) -> Result<Self, MetaError> {
        let mut store = Self {
            db: db.clone(),
            records: db.open_tree(TREE_RECORDS)?,
            sm: db.open_tree(TREE_SM)?,
            snapshot: db.open_tree(TREE_SNAPSHOT)?,
            hub: Arc::new(WatchHub::new(0, HISTORY)),
        };
        let applied = store.last_applied()?.map_or(0, |l| l.index);
        store.hub = Arc::new(WatchHub::new(applied, HISTORY));
        Ok(store)
    }

    /// The change feed of these records.
    pub(crate) fn hub(&self) -> &Arc<WatchHub> {
        &self.hub
    }

    /// The applied record `(kind, name)`, if it exists.
    pub fn get(&self, kind: &str, name: &str) -> Result<Option<Record>, MetaError> {
        let key = record_key(kind, name);
        match self.records.get(&key)? {
            Some(v) => Ok(Some(decode_record(&key, &v)?)),
            None => Ok(None),
        }
    }

    /// All applied records of `kind`, sorted by name.
    pub fn list(&self, kind: &str) -> Result<Vec<Record>, MetaError> {
        self.records
            .scan_prefix(record_prefix(kind))
            .map(|item| {
                let (k, v) = item?;
                decode_record(&k, &v)
            })
            .collect()
    }

    /// The id of the last log entry applied to the records.
    pub fn last_applied(&self) -> Result<Option<LogId<NodeId>>, MetaError> {
        Ok(self.read_meta()?.0)
    }

    fn read_meta(&self) -> Result<(Option<LogId<NodeId>>, Membership), MetaError> {
        let last_applied = match self.sm.get(KEY_LAST_APPLIED)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt("last applied", e))?,
            None => None,
        };
        let membership = match self.sm.get(KEY_MEMBERSHIP)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt("membership", e))?,
            None => Membership::default(),
        };
        Ok((last_applied, membership))
    }

    fn all_records(&self) -> Result<Vec<Record>, MetaError> {
        self.records
            .iter()
            .map(|item| {
                let (k, v) = item?;
                decode_record(&k, &v)
            })
            .collect()
    }

    /// Apply one entry and its last applied id in one transaction.
    fn apply_entry(&self, entry: &Entry<TypeConfig>) -> StorageResult<CommandResult> {
        let last_applied = serde_json::to_vec(&Some(entry.log_id)).map_err(write_err)?;
        let membership = match &entry.payload {
            EntryPayload::Membership(m) => Some(
                serde_json::to_vec(&Membership::new(Some(entry.log_id), m.clone()))
                    .map_err(write_err)?,
            ),
            _ => None,
        };
        let write = || {
            (&self.records, &self.sm).transaction(|(records, sm)| {
                let mut changes = Vec::new();
                let result = match &entry.payload {
                    EntryPayload::Normal(cmd) => {
                        let mut lookup =
                            |kind: &str, name: &str| match records.get(record_key(kind, name))? {
                                Some(v) => decode_version(&v)
                                    .map(Some)
                                    .map_err(ConflictableTransactionError::Abort),
                                None => Ok(None),
                            };
                        let (result, writes) = decide(cmd, &mut lookup)?;
                        for w in writes {
                            match w {
                                Write::Put {
                                    kind,
                                    name,
                                    version,
                                    data,
                                } => {
                                    records.insert(
                                        record_key(&kind, &name),
                                        record_value(version, &data),
                                    )?;
                                    changes.push((
                                        false,
                                        Record {
                                            kind,
                                            name,
                                            version,
                                            data,
                                        },
                                    ));
                                }
                                Write::Delete { kind, name } => {
                                    let key = record_key(&kind, &name);
                                    if let Some(old) = records.remove(key.as_slice())? {
                                        let old = decode_record(&key, &old)
                                            .map_err(ConflictableTransactionError::Abort)?;
                                        changes.push((true, old));
                                    }
                                }
                            }
                        }
                        result
                    }
                    EntryPayload::Blank | EntryPayload::Membership(_) => CommandResult::Noop,
                };
                sm.insert(KEY_LAST_APPLIED, last_applied.as_slice())?;
                if let Some(m) = &membership {
                    sm.insert(KEY_MEMBERSHIP, m.as_slice())?;
                }
                Ok((result, changes))
            })
        };
        self.hub
            .publish(entry.log_id.index, write)
            .map_err(tx_err::<MetaError>)
    }

    fn read_current_snapshot(&self) -> Result<Option<(Meta, Vec<u8>)>, MetaError> {
        let Some(meta) = self.snapshot.get(KEY_SNAP_META)? else {
            return Ok(None);
        };
        let meta: Meta = serde_json::from_slice(&meta).map_err(|e| corrupt("snapshot meta", e))?;
        let data = self
            .snapshot
            .get(KEY_SNAP_DATA)?
            .ok_or_else(|| corrupt("snapshot", "meta without data"))?;
        Ok(Some((meta, data.to_vec())))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let snap_err = |e: &dyn std::error::Error| -> StorageError<NodeId> {
            StorageIOError::write_snapshot(None, openraft::AnyError::error(e.to_string())).into()
        };
        if let Some(e) = &self.copy_error {
            return Err(StorageIOError::read_state_machine(openraft::AnyError::error(e)).into());
        }
        let data = serde_json::to_vec(&SnapshotData {
            records: std::mem::take(&mut self.records),
        })
        .map_err(|e| snap_err(&e))?;
        let id = self.store.db.generate_id().map_err(|e| snap_err(&e))?;
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{id}", l.leader_id, l.index),
            None => format!("--{id}"),
        };
        let meta = Meta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let meta_bytes = serde_json::to_vec(&meta).map_err(|e| snap_err(&e))?;
        // Keep the newer snapshot if one was installed meanwhile.
        let newer_exists = self
            .store
            .read_current_snapshot()
            .map_err(|e| snap_err(&e))?
            .is_some_and(|(cur, _)| cur.last_log_id > meta.last_log_id);
        if !newer_exists {
            let mut batch = sled::Batch::default();
            batch.insert(KEY_SNAP_META, meta_bytes);
            batch.insert(KEY_SNAP_DATA, data.as_slice());
            self.store
                .snapshot
                .apply_batch(batch)
                .map_err(|e| snap_err(&e))?;
            self.store
                .db
                .flush_async()
                .await
                .map_err(|e| snap_err(&e))?;
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, Membership)> {
        self.read_meta().map_err(read_err)
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut results = Vec::new();
        for entry in entries {
            results.push(self.apply_entry(&entry)?);
        }
        self.db.flush_async().await.map_err(write_err)?;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        // openraft's signature is infallible; a read failure here surfaces
        // from build_snapshot instead, which then stores nothing.
        let copy = self
            .all_records()
            .and_then(|records| Ok((records, self.read_meta()?)));
        let ((records, (last_applied, membership)), copy_error) = match copy {
            Ok(c) => (c, None),
            Err(e) => {
                tracing::error!(error = %e, "cannot copy the state machine for a snapshot");
                (
                    (Vec::new(), (None, Membership::default())),
                    Some(e.to_string()),
                )
            }
        };
        SnapshotBuilder {
            store: self.clone(),
            records,
            last_applied,
            membership,
            copy_error,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let sig = Some(meta.signature());
        let snap_err = |e: &dyn std::error::Error| -> StorageError<NodeId> {
            StorageIOError::read_snapshot(sig.clone(), openraft::AnyError::error(e.to_string()))
                .into()
        };
        let data: SnapshotData = serde_json::from_slice(&bytes).map_err(|e| snap_err(&e))?;
        let meta_bytes = serde_json::to_vec(meta).map_err(|e| snap_err(&e))?;
        let last_applied = serde_json::to_vec(&meta.last_log_id).map_err(|e| snap_err(&e))?;
        let membership = serde_json::to_vec(&meta.last_membership).map_err(|e| snap_err(&e))?;
        // No entry is applied concurrently (&mut self), so these are all the
        // keys to drop.
        let old_keys = self
            .records
            .iter()
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| snap_err(&e))?;
        let installed = meta.last_log_id.map_or(0, |l| l.index);
        let install = || {
            (&self.records, &self.sm, &self.snapshot).transaction(|(records, sm, snap)| {
                for k in &old_keys {
                    records.remove(k.clone())?;
                }
                for r in &data.records {
                    records.insert(
                        record_key(&r.kind, &r.name),
                        record_value(r.version, &r.data),
                    )?;
                }
                sm.insert(KEY_LAST_APPLIED, last_applied.as_slice())?;
                sm.insert(KEY_MEMBERSHIP, membership.as_slice())?;
                snap.insert(KEY_SNAP_META, meta_bytes.as_slice())?;
                snap.insert(KEY_SNAP_DATA, bytes.as_slice())?;
                Ok::<_, ConflictableTransactionError<MetaError>>(())
            })
        };
        self.hub
            .reset(installed, install)
            .map_err(tx_err::<MetaError>)?;
        self.db.flush_async().await.map_err(write_err)?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let current = self.read_current_snapshot().map_err(read_err)?;
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
