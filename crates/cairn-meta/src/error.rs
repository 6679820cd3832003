//! The crate's error type for opening the store and reading records.
//! Errors inside openraft's storage traits are reported as
//! [`openraft::StorageError`] instead, as openraft requires.

/// Errors of the metadata store outside openraft's storage traits.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The sled database could not be opened, read or written.
    #[error("metadata database: {0}")]
    Db(#[from] sled::Error),
    /// A stored value does not decode: the database is damaged or was written
    /// by an incompatible version.
    #[error("corrupt metadata {what}: {detail}")]
    Corruption {
        /// Which value failed to decode.
        what: &'static str,
        /// Why.
        detail: String,
    },
}
