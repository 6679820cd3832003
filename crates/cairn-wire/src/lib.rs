//! `cairn-wire`: the byte-exact frame format between Cairn's volume engine
//! and its replica servers. A pure codec: no I/O, no clocks, no volume state.
//!
//! A frame is a 32-byte [`Header`] (magic, version, op, flags, request id,
//! epoch, payload length, CRC32 over header and payload) followed by the
//! payload; every integer is little-endian. The format is specified byte by
//! byte in `docs/wire.md`.
//!
//! Layers, bottom up:
//! - [`FrameDecoder`] cuts CRC-checked [`Frame`]s off a receive buffer, never
//!   panicking or allocating whatever the bytes;
//! - [`Request::decode`] / [`Reply::decode`] turn a frame's payload into typed
//!   values, validating structure (lengths, counts, UTF-8, block alignment)
//!   but not volume bounds, which are the replica's business;
//! - [`Request::encode`] / [`Reply::encode`] append whole frames to a
//!   `BytesMut`, writing the CRC; `try_encode` variants report values the
//!   format cannot carry instead of panicking.
//!
//! Invariants kept by the codec and checked by its property tests and fuzz
//! target: whatever `try_encode` accepts decodes to an equal value; the
//! encoding is canonical (a payload that decodes re-encodes to the same
//! bytes); and every byte of a frame is covered by its CRC, so a frame
//! damaged in one byte is refused, never misread.

mod codec;
mod error;
mod frame;
pub mod op;
mod reply;
mod request;
#[cfg(test)]
mod testutil;

pub use error::{ErrorKind, WireError};
pub use frame::{Frame, FrameDecoder, Header, KNOWN_FLAGS};
pub use reply::{Counters, Reply, ReplyBody, ReplyError, SnapshotInfo, StatusBody, DIGEST_LEN};
pub use request::{LayerRef, Request};

/// Bytes 0..4 of every frame: `b"CARN"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"CARN");
/// Byte 4 of every frame.
pub const VERSION: u8 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 32;
/// Bytes per block: Write data is whole blocks, and one CRC32 covers each.
pub const BLOCK_SIZE: u32 = 4096;
/// Default frame size limit: a 16 MiB write plus room for its CRCs and header.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024 + 64 * 1024;
/// Header flag: make the write durable before replying (Write, WriteZeroes, Trim).
pub const FLAG_FUA: u16 = 1;
/// Header flag: WriteZeroes must allocate rather than punch a hole.
pub const FLAG_NO_HOLE: u16 = 2;
/// Header flag: this Hello takes the replica over, superseding every other connection
/// attached to the same replica (Hello only).
pub const FLAG_TAKEOVER: u16 = 4;
/// Longest `str` field, in bytes.
pub const MAX_STR_LEN: usize = 4096;

const BLOCK_BYTES: usize = BLOCK_SIZE as usize;

/// Number of blocks (and so of block CRCs) in `len` bytes: a final partial
/// block counts as one.
pub fn block_count(len: usize) -> usize {
    len.div_ceil(BLOCK_BYTES)
}

/// One CRC32 (crc32fast, IEEE) per 4096-byte block of `data`; a final
/// partial block gets its own CRC. Senders of Write requests and Read
/// replies use this.
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_BYTES).map(crc32fast::hash).collect()
}

/// Index of the first block of `data` whose CRC in `crcs` is wrong or
/// missing; if every block checks out but `crcs` has extra entries, the index
/// of the first extra one; `None` when `crcs` matches exactly. A replica uses
/// it to answer a Write with `ChecksumMismatch`, an engine to check a Read.
pub fn first_bad_block(data: &[u8], crcs: &[u32]) -> Option<usize> {
    let blocks = block_count(data.len());
    let bad = data
        .chunks(BLOCK_BYTES)
        .zip(crcs)
        .position(|(block, crc)| crc32fast::hash(block) != *crc);
    bad.or_else(|| (crcs.len() != blocks).then(|| crcs.len().min(blocks)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_spells_carn() {
        assert_eq!(MAGIC, 0x4E52_4143);
        assert_eq!(&MAGIC.to_le_bytes(), b"CARN");
    }

    #[test]
    fn block_crcs_cover_a_final_partial_block() {
        let data = vec![7u8; 2 * BLOCK_BYTES + 10];
        let crcs = block_crcs(&data);
        assert_eq!(crcs.len(), 3);
        assert_eq!(crcs[0], crc32fast::hash(&data[..BLOCK_BYTES]));
        assert_eq!(crcs[2], crc32fast::hash(&data[2 * BLOCK_BYTES..]));
        assert!(block_crcs(&[]).is_empty());
        assert_eq!(first_bad_block(&data, &crcs), None);
    }

    #[test]
    fn first_bad_block_finds_wrong_and_missing_crcs() {
        let data = vec![1u8; 3 * BLOCK_BYTES];
        let mut crcs = block_crcs(&data);
        crcs[1] ^= 1;
        assert_eq!(first_bad_block(&data, &crcs), Some(1));
        let crcs = block_crcs(&data);
        assert_eq!(first_bad_block(&data, &crcs[..2]), Some(2));
        let mut extra = crcs.clone();
        extra.push(0);
        assert_eq!(first_bad_block(&data, &extra), Some(3));
    }
}
