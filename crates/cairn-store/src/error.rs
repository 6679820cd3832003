//! The store's error kinds. Each maps to one wire error kind in the replica server.

use std::io;

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request reaches past the end of the volume.
    #[error("range {offset}+{len} is outside the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// Offset or length is not a multiple of the 4096-byte block.
    #[error("range {offset}+{len} is not aligned to {BLOCK} bytes", BLOCK = crate::BLOCK_SIZE)]
    Misaligned { offset: u64, len: u64 },
    /// The sender's CRC of a block does not match the data that arrived.
    #[error("checksum mismatch in the block at byte {offset} as received")]
    ChecksumMismatch { offset: u64 },
    /// Stored data does not match its stored checksum.
    #[error("corrupt block at byte {offset} in layer {layer}")]
    Corruption { offset: u64, layer: u64 },
    /// The file system is full.
    #[error("no space left on the replica's disk")]
    NoSpace,
    /// A snapshot name that must be new already exists.
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    /// The named snapshot does not exist.
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    /// A request that is well-formed but makes no sense for this store.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The directory does not hold a replica, or holds one in a format this build cannot read.
    #[error("bad replica metadata in {path}: {reason}")]
    BadMeta { path: String, reason: String },
    /// Any other I/O failure.
    #[error("I/O error: {0}")]
    Io(io::Error),
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        if e.raw_os_error() == Some(libc_enospc()) || e.kind() == io::ErrorKind::StorageFull {
            StoreError::NoSpace
        } else {
            StoreError::Io(e)
        }
    }
}

const fn libc_enospc() -> i32 {
    28
}

/// Result alias for store operations.
pub type Result<T> = std::result::Result<T, StoreError>;
