//! Cairn's backup store: volume snapshots backed up to S3 (`s3://bucket/prefix`) or a
//! directory (`file:///dir`) as content-addressed, compressed 2 MiB blocks plus one JSON
//! manifest per backup. docs/backup.md describes the layout so a backup can be read
//! without Cairn.
//!
//! Guarantees: a listed backup is complete (its manifest is written last); restore checks
//! every block's BLAKE3 hash; deleting a backup never removes a block another backup, or a
//! backup in progress, uses. Assumes a strongly consistent store (S3 since 2020, local
//! file systems) and, for the GC lock, conditional create (`If-None-Match: *`).
//!
//! The crate needs no engine: callers give a [`SnapshotSource`] to back up and a
//! [`RestoreSink`] to restore into.

mod backup;
mod catalog;
mod coord;
mod error;
mod format;
mod restore;
mod source;
mod target;

pub use backup::{backup, BackupOptions, BackupResult, BackupSpec, Incremental, Progress};
pub use catalog::{delete, gc, list, read_manifest, BackupInfo, GcReport};
pub use coord::CoordOptions;
pub use error::{BackupError, Result};
pub use format::{
    decode_block, encode_block, validate_name, BlockRef, Compression, Manifest, BLOCK_HEADER_LEN,
    BLOCK_MAGIC, BLOCK_SIZE, MANIFEST_FORMAT,
};
pub use restore::{restore, RestoreOptions, RestoreResult};
pub use source::{FileImage, MemImage, RestoreSink, SnapshotSource};
pub use target::{parse_target, S3Config, Target, TargetUrl};
