//! Errors of the codec itself ([`WireError`]) and the error kinds a replica
//! reports to the engine inside a reply ([`ErrorKind`]).
//!
//! A [`WireError`] means the bytes (or the value being encoded) break the
//! format: the frame is refused and never applied. An [`ErrorKind`] travels in
//! a well-formed reply and keeps its meaning across the RPC boundary.

use std::fmt;

use crate::{MAGIC, VERSION};

/// Why a frame or payload was refused, or a value could not be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Bytes 0..4 of a header are not [`MAGIC`].
    #[error("bad magic {0:#010x}, expected {MAGIC:#010x}")]
    BadMagic(u32),
    /// Byte 4 of a header is not [`VERSION`].
    #[error("unsupported wire version {0}, expected {VERSION}")]
    BadVersion(u8),
    /// The op byte is neither a known request op nor `0x80 |` one.
    #[error("unknown op {0:#04x}")]
    UnknownOp(u8),
    /// Reserved flag bits are set, or a flag the op does not take.
    #[error("flags {0:#06x} not allowed here")]
    BadFlags(u16),
    /// The whole frame (header + payload) would exceed the size limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Header plus payload, in bytes.
        len: usize,
        /// The limit in force, in bytes.
        max: usize,
    },
    /// The CRC field does not match the header and payload.
    #[error("frame CRC mismatch: header says {expected:#010x}, content hashes to {actual:#010x}")]
    BadCrc {
        /// The CRC carried in header bytes 28..32.
        expected: u32,
        /// The CRC computed over the received bytes.
        actual: u32,
    },
    /// The payload ends inside a field.
    #[error("payload ends inside a field")]
    Truncated,
    /// The payload continues after its last field.
    #[error("{0} unexpected bytes after the last field")]
    TrailingBytes(usize),
    /// A length does not agree with the bytes present.
    #[error("length mismatch: expected {expected} bytes, found {actual}")]
    LengthMismatch {
        /// The length the fields imply.
        expected: usize,
        /// The length actually present.
        actual: usize,
    },
    /// A string field is not valid UTF-8.
    #[error("string field is not valid UTF-8")]
    BadUtf8,
    /// A string field is longer than [`MAX_STR_LEN`](crate::MAX_STR_LEN).
    #[error("string of {len} bytes exceeds the limit of {max}")]
    StringTooLong {
        /// Length of the string in bytes.
        len: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// Write data whose length is not a multiple of [`BLOCK_SIZE`](crate::BLOCK_SIZE).
    #[error("data length {len} is not a multiple of the block size")]
    Misaligned {
        /// The offending length, in bytes.
        len: u64,
    },
    /// The number of block CRCs does not match the number of blocks.
    #[error("{actual} block CRCs for {expected} blocks")]
    CrcCountMismatch {
        /// Blocks in the data.
        expected: usize,
        /// CRCs given.
        actual: usize,
    },
    /// A layer reference with an unknown tag.
    #[error("unknown layer tag {0}")]
    UnknownLayer(u8),
    /// A reply status byte that is neither 0 nor a known [`ErrorKind`].
    #[error("unknown error kind {0}")]
    UnknownErrorKind(u8),
    /// A reply frame was given where a request was expected.
    #[error("reply op {0:#04x} where a request was expected")]
    UnexpectedReply(u8),
    /// A request frame was given where a reply was expected.
    #[error("request op {0:#04x} where a reply was expected")]
    UnexpectedRequest(u8),
    /// A reply body of the wrong shape for its op (encoding only).
    #[error("reply body does not match op {op:#04x}")]
    BodyMismatch {
        /// The request op of the reply.
        op: u8,
    },
    /// A list has more entries than its count field can hold (encoding only).
    #[error("{count} {what} exceed the wire limit of {max}")]
    TooMany {
        /// What the list holds.
        what: &'static str,
        /// Entries in the list.
        count: usize,
        /// The most the count field can hold.
        max: usize,
    },
    /// A snapshot parent of `Some("")`, which the wire cannot tell from no
    /// parent (encoding only).
    #[error("empty snapshot parent name (the wire spells \"no parent\" as empty)")]
    EmptyParent,
    /// A structural fault with no more specific variant (this version of
    /// the codec has none; kept so callers can match on it).
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
}

/// An error a replica reports in a reply: byte 0 of an error reply's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorKind {
    /// The range lies (partly) beyond the volume.
    OutOfRange = 1,
    /// Offset or length is not a multiple of the block size.
    Misaligned = 2,
    /// The replica's disk is full.
    NoSpace = 3,
    /// The request's epoch is not the replica's accepted epoch (older, or overtaken since
    /// the connection's Hello), or the connection was superseded by a takeover Hello of the
    /// same replica; `detail` is the replica's accepted epoch.
    StaleEpoch = 4,
    /// An I/O error on the replica.
    Io = 5,
    /// Stored data failed its checksum; `detail` is the byte offset of the bad block.
    Corruption = 6,
    /// A block's CRC in a Write does not match its data.
    ChecksumMismatch = 7,
    /// The named volume or snapshot does not exist.
    NotFound = 8,
    /// The named snapshot (or volume) exists already.
    AlreadyExists = 9,
    /// A request that is well-formed but makes no sense.
    InvalidArgument = 10,
    /// No Hello yet on this connection.
    NotReady = 11,
    /// The replica does not implement this.
    Unsupported = 12,
    /// The request exceeds a size limit.
    TooLarge = 13,
}

impl ErrorKind {
    /// Every kind, in wire order.
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::OutOfRange,
        ErrorKind::Misaligned,
        ErrorKind::NoSpace,
        ErrorKind::StaleEpoch,
        ErrorKind::Io,
        ErrorKind::Corruption,
        ErrorKind::ChecksumMismatch,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::InvalidArgument,
        ErrorKind::NotReady,
        ErrorKind::Unsupported,
        ErrorKind::TooLarge,
    ];

    /// The kind with this wire code, if any (0 is "ok", not a kind).
    pub fn from_u8(code: u8) -> Option<ErrorKind> {
        Self::ALL.into_iter().find(|kind| kind.as_u8() == code)
    }

    /// The wire code of this kind.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// A short lowercase description.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::Misaligned => "misaligned",
            ErrorKind::NoSpace => "no space",
            ErrorKind::StaleEpoch => "stale epoch",
            ErrorKind::Io => "i/o error",
            ErrorKind::Corruption => "corruption",
            ErrorKind::ChecksumMismatch => "checksum mismatch",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NotReady => "not ready",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::TooLarge => "too large",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kind_codes_round_trip() {
        for code in 0..=u8::MAX {
            match ErrorKind::from_u8(code) {
                Some(kind) => assert_eq!(kind.as_u8(), code),
                None => assert!(code == 0 || code > 13, "code {code}"),
            }
        }
        assert_eq!(ErrorKind::from_u8(7), Some(ErrorKind::ChecksumMismatch));
        assert_eq!(ErrorKind::StaleEpoch.to_string(), "stale epoch");
    }
}
