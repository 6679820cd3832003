//! The crate's one error type. Every variant names what failed (object key, block index,
//! backup name) so the CLI can print it as is.

use std::io;

/// Errors from the backup store.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The target URL or its configuration is not usable.
    #[error("invalid backup target {url:?}: {reason}")]
    InvalidTarget {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A backup name that cannot be used as an object key.
    #[error("invalid backup name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The object store failed (network, server, permissions).
    #[error("object store error on {key}: {source}")]
    Transport {
        /// The object key of the failed request (or the listed prefix).
        key: String,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },
    /// Reading the snapshot failed.
    #[error("reading the snapshot at offset {offset}: {source}")]
    Source {
        /// Byte offset of the failed read.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing the restore target failed.
    #[error("writing the restore target at offset {offset}: {source}")]
    Sink {
        /// Byte offset of the failed write.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A block object exists but its content is wrong.
    #[error("corrupt block {index} (offset {offset}, object {key}): {reason}")]
    CorruptBlock {
        /// Block index in the volume.
        index: u64,
        /// Byte offset of the block in the volume.
        offset: u64,
        /// Object key of the block.
        key: String,
        /// What check failed.
        reason: String,
    },
    /// A block the manifest references is not in the target.
    #[error("missing block {index} (offset {offset}, object {key})")]
    MissingBlock {
        /// Block index in the volume.
        index: u64,
        /// Byte offset of the block in the volume.
        offset: u64,
        /// Object key of the block.
        key: String,
    },
    /// No manifest with this name.
    #[error("no backup named {0:?} in the target")]
    NotFound(String),
    /// A backup with this name already exists (names are never overwritten).
    #[error("a backup named {0:?} already exists in the target")]
    AlreadyExists(String),
    /// A manifest that cannot be parsed or is inconsistent.
    #[error("corrupt manifest {key}: {reason}")]
    CorruptManifest {
        /// Object key of the manifest.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The incremental request does not fit the previous backup.
    #[error("incremental backup does not fit its parent {parent:?}: {reason}")]
    ParentMismatch {
        /// Parent backup name.
        parent: String,
        /// Why it does not fit.
        reason: String,
    },
    /// The restore target is smaller than the backup.
    #[error("restore target is {sink} bytes, the backup needs {needed}")]
    SinkTooSmall {
        /// Size of the sink.
        sink: u64,
        /// Size of the backed-up volume.
        needed: u64,
    },
    /// Another garbage collection holds the lock and did not release it in time.
    #[error("garbage collection lock {key} is held (by {holder}); try again later")]
    GcBusy {
        /// Object key of the lock.
        key: String,
        /// Holder description from the lock object.
        holder: String,
    },
}

impl BackupError {
    pub(crate) fn transport(key: impl ToString, source: object_store::Error) -> Self {
        BackupError::Transport {
            key: key.to_string(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = BackupError> = std::result::Result<T, E>;
