//! `cairn-meta`: the replicated metadata store of a Cairn cluster.
//!
//! A Raft group (openraft 0.9, `storage-v2`) of 1, 3 or 5 members replicates
//! a versioned record store: records keyed by `(kind, name)` hold opaque
//! bytes (the protobuf encoding of a typed record) and a version (1 on create,
//! +1 per update). Writes are [`Command`]s with optimistic version checks;
//! [`Command::Batch`] applies several atomically.
//!
//! Storage: each member keeps one sled database in its own directory, with
//! separate trees for log entries, vote / committed / last purged log id,
//! records, state machine meta and the current snapshot
//! ([`open_store`]).
//!
//! Durability guarantee: every change openraft relies on is flushed to disk
//! before it is acknowledged. An append calls openraft's `log_io_completed`
//! only after `flush_async` returned; vote saves, truncations, purges, applied
//! entries, installed and built snapshots are flushed before the call
//! returns. The committed log id is written but not flushed on its own (it is
//! an optimization openraft may lose).
//!
//! Assumes: one process opens a member directory at a time (sled locks it).

mod command;
pub mod controller;
mod error;
mod log_store;
pub mod network;
pub mod schedule;
pub mod server;
mod state_machine;
mod watch;
mod watch_rpc;

use std::io::Cursor;
use std::path::Path;

pub use command::{Command, CommandResult, Record};
pub use error::MetaError;
pub use log_store::LogStore;
pub use server::{start_member, MetaMember, MetaServer};
pub use state_machine::{SnapshotBuilder, StateMachineStore};

openraft::declare_raft_types!(
    /// openraft type configuration of the metadata group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Raft node id of a meta member.
pub type NodeId = u64;

/// The openraft instance of a meta member.
pub type Raft = openraft::Raft<TypeConfig>;

/// Open (or create) the sled database of one member in `dir` and return its
/// log store and state machine, both backed by that database.
pub fn open_store(dir: &Path) -> Result<(LogStore, StateMachineStore), MetaError> {
    let db = sled::Config::new().path(dir).open()?;
    let log = LogStore::new(&db)?;
    let sm = StateMachineStore::new(&db)?;
    Ok((log, sm))
}
