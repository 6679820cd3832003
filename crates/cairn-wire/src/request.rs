//! Requests from the volume engine to a replica: [`Request`] and its
//! payload codec.
//!
//! `Request::decode` checks structure only: op and flags, every length
//! against the bytes present, string limits and UTF-8, Write's block
//! alignment and CRC count, and that nothing trails the last field. It does
//! not check offsets against a volume, nor block CRCs against data; the
//! replica does both. Whatever `try_encode` accepts, `decode` returns
//! unchanged, and the reverse.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{put_labels, put_str, Reader};
use crate::frame::write_frame;
use crate::{
    block_count, block_crcs, op, Frame, WireError, BLOCK_SIZE, FLAG_FUA, FLAG_NO_HOLE,
    FLAG_TAKEOVER,
};

/// Layer tag: the writable head.
const LAYER_HEAD: u8 = 0;
/// Layer tag: a named snapshot (a `str` name follows).
const LAYER_SNAPSHOT: u8 = 1;
/// Layer tag: the merged logical content of the whole chain.
const LAYER_MERGED: u8 = 2;
/// Layer tag: the logical content as of a named snapshot (a `str` name follows).
const LAYER_MERGED_AT: u8 = 3;

/// Bytes before the block CRCs in a Write payload: u64 offset, u32 len.
const WRITE_FIXED_LEN: usize = 12;
/// Bytes per block CRC.
const CRC_LEN: usize = 4;

/// Which layer of a replica's snapshot chain a request looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerRef {
    /// The writable head alone.
    Head,
    /// One snapshot alone, by name.
    Snapshot(String),
    /// The logical content: head over its snapshots.
    Merged,
    /// The logical content as of one snapshot, by name: that snapshot over its ancestors
    /// (what the volume read when the snapshot was taken).
    MergedAt(String),
}

impl LayerRef {
    fn encode(&self, out: &mut BytesMut) -> Result<(), WireError> {
        match self {
            LayerRef::Head => out.put_u8(LAYER_HEAD),
            LayerRef::Snapshot(name) => {
                out.put_u8(LAYER_SNAPSHOT);
                put_str(out, name)?;
            }
            LayerRef::Merged => out.put_u8(LAYER_MERGED),
            LayerRef::MergedAt(name) => {
                out.put_u8(LAYER_MERGED_AT);
                put_str(out, name)?;
            }
        }
        Ok(())
    }

    fn decode(r: &mut Reader<'_>) -> Result<LayerRef, WireError> {
        match r.u8()? {
            LAYER_HEAD => Ok(LayerRef::Head),
            LAYER_SNAPSHOT => Ok(LayerRef::Snapshot(r.string()?)),
            LAYER_MERGED => Ok(LayerRef::Merged),
            LAYER_MERGED_AT => Ok(LayerRef::MergedAt(r.string()?)),
            tag => Err(WireError::UnknownLayer(tag)),
        }
    }
}

/// A request from the engine to a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Open a session; `create_size` 0 means the replica must already exist.
    Hello {
        /// Volume name.
        volume: String,
        /// This replica's id.
        replica_id: String,
        /// Size to create the replica with, or 0.
        create_size: u64,
        /// Take the replica over (header flag `FLAG_TAKEOVER`): once this Hello is
        /// accepted, every other connection attached to the same replica is refused.
        takeover: bool,
    },
    /// Read `len` bytes of the head at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes to read.
        len: u32,
    },
    /// Write whole blocks; `crcs[i]` is the CRC32 of block `i` of `data`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Durable before the reply.
        fua: bool,
        /// One CRC32 per 4096-byte block of `data`.
        crcs: Vec<u32>,
        /// The data, a multiple of 4096 bytes.
        data: Bytes,
    },
    /// Write zeroes over a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes to zero.
        len: u64,
        /// Durable before the reply.
        fua: bool,
        /// Allocate the zeroes rather than punch a hole.
        no_hole: bool,
    },
    /// Discard a range.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Bytes to discard.
        len: u64,
        /// Durable before the reply.
        fua: bool,
    },
    /// Make every acknowledged write durable.
    Flush,
    /// Freeze the head as snapshot `name`.
    SnapshotCreate {
        /// Snapshot name.
        name: String,
        /// Creation time chosen by the engine (same on every replica).
        created_unix_ms: u64,
        /// Free-form key/value labels.
        labels: Vec<(String, String)>,
    },
    /// Delete snapshot `name`.
    SnapshotDelete {
        /// Snapshot name.
        name: String,
    },
    /// Restart the head from snapshot `name`.
    SnapshotRevert {
        /// Snapshot name.
        name: String,
    },
    /// List snapshots.
    SnapshotList,
    /// Grow the volume to `new_size` bytes.
    Grow {
        /// New size in bytes.
        new_size: u64,
    },
    /// Report size, epoch, chain and counters.
    Status,
    /// List allocated extents of `layer` within a range.
    ListExtents {
        /// Which layer.
        layer: LayerRef,
        /// Byte offset.
        offset: u64,
        /// Bytes to cover.
        len: u64,
    },
    /// Read a range of one layer.
    ReadLayer {
        /// Which layer.
        layer: LayerRef,
        /// Byte offset.
        offset: u64,
        /// Bytes to read.
        len: u32,
    },
    /// Liveness check.
    Ping,
    /// BLAKE3 digest of the logical content.
    Digest,
    /// Regions written since the last clean point.
    DirtyRegions,
    /// Drop a range from the head layer only (no explicit zeros), so that older snapshot
    /// layers show through.
    Unmap {
        /// Byte offset.
        offset: u64,
        /// Bytes to drop.
        len: u64,
    },
    /// One BLAKE3 digest per `granule` bytes of a range of `layer` (the last granule may be
    /// shorter); see docs/wire.md for what each digest covers.
    RangeDigests {
        /// Which layer.
        layer: LayerRef,
        /// Byte offset.
        offset: u64,
        /// Bytes to cover.
        len: u64,
        /// Bytes per digest.
        granule: u32,
    },
    /// Discard the whole replica (every layer, snapshot and dirty mark) and start again
    /// empty, with the same volume, id, size and epoch and a new instance id.
    Recreate,
}

fn flag(set: bool, bit: u16) -> u16 {
    if set {
        bit
    } else {
        0
    }
}

impl Request {
    /// A Write of `data` at `offset`, with its block CRCs computed.
    pub fn write(offset: u64, fua: bool, data: Bytes) -> Request {
        Request::Write {
            offset,
            fua,
            crcs: block_crcs(&data),
            data,
        }
    }

    /// The op code of this request (reply bit clear).
    pub fn op(&self) -> u8 {
        match self {
            Request::Hello { .. } => op::HELLO,
            Request::Read { .. } => op::READ,
            Request::Write { .. } => op::WRITE,
            Request::WriteZeroes { .. } => op::WRITE_ZEROES,
            Request::Trim { .. } => op::TRIM,
            Request::Flush => op::FLUSH,
            Request::SnapshotCreate { .. } => op::SNAPSHOT_CREATE,
            Request::SnapshotDelete { .. } => op::SNAPSHOT_DELETE,
            Request::SnapshotRevert { .. } => op::SNAPSHOT_REVERT,
            Request::SnapshotList => op::SNAPSHOT_LIST,
            Request::Grow { .. } => op::GROW,
            Request::Status => op::STATUS,
            Request::ListExtents { .. } => op::LIST_EXTENTS,
            Request::ReadLayer { .. } => op::READ_LAYER,
            Request::Ping => op::PING,
            Request::Digest => op::DIGEST,
            Request::DirtyRegions => op::DIRTY_REGIONS,
            Request::Unmap { .. } => op::UNMAP,
            Request::RangeDigests { .. } => op::RANGE_DIGESTS,
            Request::Recreate => op::RECREATE,
        }
    }

    /// The header flags this request carries.
    pub fn flags(&self) -> u16 {
        match self {
            Request::Write { fua, .. } | Request::Trim { fua, .. } => flag(*fua, FLAG_FUA),
            Request::WriteZeroes { fua, no_hole, .. } => {
                flag(*fua, FLAG_FUA) | flag(*no_hole, FLAG_NO_HOLE)
            }
            Request::Hello { takeover, .. } => flag(*takeover, FLAG_TAKEOVER),
            _ => 0,
        }
    }

    /// Appends this request as one frame to `out`.
    ///
    /// # Panics
    /// If the request cannot be represented (see [`try_encode`](Self::try_encode)):
    /// a string over 4096 bytes, more than 65535 labels, or Write data that
    /// is not whole blocks with one CRC each or is 4 GiB or more.
    pub fn encode(&self, request_id: u64, epoch: u64, out: &mut BytesMut) {
        if let Err(err) = self.try_encode(request_id, epoch, out) {
            panic!(
                "cannot encode {} request: {err}",
                op::name(self.op()).unwrap_or("?")
            );
        }
    }

    /// Appends this request as one frame to `out`, or fails (leaving `out`
    /// as it was) if the request cannot be represented or would not decode.
    /// Write data is copied into `out` exactly once.
    pub fn try_encode(
        &self,
        request_id: u64,
        epoch: u64,
        out: &mut BytesMut,
    ) -> Result<(), WireError> {
        let hint = match self {
            Request::Write { crcs, data, .. } => {
                check_write_shape(data.len(), crcs.len())?;
                WRITE_FIXED_LEN + CRC_LEN * crcs.len() + data.len()
            }
            _ => 0,
        };
        write_frame(
            out,
            self.op(),
            self.flags(),
            request_id,
            epoch,
            hint,
            |out| self.encode_payload(out),
        )
    }

    fn encode_payload(&self, out: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Request::Hello {
                volume,
                replica_id,
                create_size,
                ..
            } => {
                put_str(out, volume)?;
                put_str(out, replica_id)?;
                out.put_u64_le(*create_size);
            }
            Request::Read { offset, len } => {
                out.put_u64_le(*offset);
                out.put_u32_le(*len);
            }
            Request::Write {
                offset, crcs, data, ..
            } => {
                let len = u32::try_from(data.len()).map_err(|_| WireError::Misaligned {
                    len: data.len() as u64,
                })?;
                out.put_u64_le(*offset);
                out.put_u32_le(len);
                for crc in crcs {
                    out.put_u32_le(*crc);
                }
                out.put_slice(data);
            }
            Request::WriteZeroes { offset, len, .. }
            | Request::Trim { offset, len, .. }
            | Request::Unmap { offset, len } => {
                out.put_u64_le(*offset);
                out.put_u64_le(*len);
            }
            Request::SnapshotCreate {
                name,
                created_unix_ms,
                labels,
            } => {
                put_str(out, name)?;
                out.put_u64_le(*created_unix_ms);
                put_labels(out, labels)?;
            }
            Request::SnapshotDelete { name } | Request::SnapshotRevert { name } => {
                put_str(out, name)?;
            }
            Request::Grow { new_size } => out.put_u64_le(*new_size),
            Request::ListExtents { layer, offset, len } => {
                layer.encode(out)?;
                out.put_u64_le(*offset);
                out.put_u64_le(*len);
            }
            Request::ReadLayer { layer, offset, len } => {
                layer.encode(out)?;
                out.put_u64_le(*offset);
                out.put_u32_le(*len);
            }
            Request::RangeDigests {
                layer,
                offset,
                len,
                granule,
            } => {
                layer.encode(out)?;
                out.put_u64_le(*offset);
                out.put_u64_le(*len);
                out.put_u32_le(*granule);
            }
            Request::Flush
            | Request::SnapshotList
            | Request::Status
            | Request::Ping
            | Request::Digest
            | Request::DirtyRegions
            | Request::Recreate => {}
        }
        Ok(())
    }

    /// Decodes a request frame, checking its structure (see the module docs).
    pub fn decode(frame: &Frame) -> Result<Request, WireError> {
        let header = &frame.header;
        if op::is_reply(header.op) {
            return Err(WireError::UnexpectedReply(header.op));
        }
        if !op::is_request(header.op) {
            return Err(WireError::UnknownOp(header.op));
        }
        if header.payload_len as usize != frame.payload.len() {
            return Err(WireError::LengthMismatch {
                expected: header.payload_len as usize,
                actual: frame.payload.len(),
            });
        }
        if header.flags & !op::allowed_flags(header.op) != 0 {
            return Err(WireError::BadFlags(header.flags));
        }
        let fua = header.flags & FLAG_FUA != 0;
        let no_hole = header.flags & FLAG_NO_HOLE != 0;
        let mut r = Reader::new(&frame.payload);
        let request = match header.op {
            op::HELLO => Request::Hello {
                volume: r.string()?,
                replica_id: r.string()?,
                create_size: r.u64()?,
                takeover: header.flags & FLAG_TAKEOVER != 0,
            },
            op::READ => Request::Read {
                offset: r.u64()?,
                len: r.u32()?,
            },
            op::WRITE => decode_write(&mut r, fua)?,
            op::WRITE_ZEROES => Request::WriteZeroes {
                offset: r.u64()?,
                len: r.u64()?,
                fua,
                no_hole,
            },
            op::TRIM => Request::Trim {
                offset: r.u64()?,
                len: r.u64()?,
                fua,
            },
            op::FLUSH => Request::Flush,
            op::SNAPSHOT_CREATE => Request::SnapshotCreate {
                name: r.string()?,
                created_unix_ms: r.u64()?,
                labels: r.labels()?,
            },
            op::SNAPSHOT_DELETE => Request::SnapshotDelete { name: r.string()? },
            op::SNAPSHOT_REVERT => Request::SnapshotRevert { name: r.string()? },
            op::SNAPSHOT_LIST => Request::SnapshotList,
            op::GROW => Request::Grow { new_size: r.u64()? },
            op::STATUS => Request::Status,
            op::LIST_EXTENTS => Request::ListExtents {
                layer: LayerRef::decode(&mut r)?,
                offset: r.u64()?,
                len: r.u64()?,
            },
            op::READ_LAYER => Request::ReadLayer {
                layer: LayerRef::decode(&mut r)?,
                offset: r.u64()?,
                len: r.u32()?,
            },
            op::PING => Request::Ping,
            op::DIGEST => Request::Digest,
            op::DIRTY_REGIONS => Request::DirtyRegions,
            op::UNMAP => Request::Unmap {
                offset: r.u64()?,
                len: r.u64()?,
            },
            op::RANGE_DIGESTS => Request::RangeDigests {
                layer: LayerRef::decode(&mut r)?,
                offset: r.u64()?,
                len: r.u64()?,
                granule: r.u32()?,
            },
            op::RECREATE => Request::Recreate,
            other => return Err(WireError::UnknownOp(other)),
        };
        r.finish()?;
        Ok(request)
    }
}

/// Write data must be whole blocks, fit the u32 length, and carry one CRC per block.
fn check_write_shape(data_len: usize, crc_count: usize) -> Result<(), WireError> {
    if !data_len.is_multiple_of(BLOCK_SIZE as usize) || u32::try_from(data_len).is_err() {
        return Err(WireError::Misaligned {
            len: data_len as u64,
        });
    }
    let blocks = block_count(data_len);
    if crc_count != blocks {
        return Err(WireError::CrcCountMismatch {
            expected: blocks,
            actual: crc_count,
        });
    }
    Ok(())
}

/// Write payload: u64 offset, u32 len, len/4096 x u32 CRC, len bytes data,
/// and nothing else.
fn decode_write(r: &mut Reader<'_>, fua: bool) -> Result<Request, WireError> {
    let offset = r.u64()?;
    let len = r.u32()?;
    if !len.is_multiple_of(BLOCK_SIZE) {
        return Err(WireError::Misaligned { len: len.into() });
    }
    let len = len as usize;
    let blocks = block_count(len);
    let expected = CRC_LEN * blocks + len;
    if r.remaining() != expected {
        return Err(WireError::LengthMismatch {
            expected: WRITE_FIXED_LEN + expected,
            actual: WRITE_FIXED_LEN + r.remaining(),
        });
    }
    let crcs = r.u32s(blocks)?;
    let data = r.bytes(len)?;
    Ok(Request::Write {
        offset,
        fua,
        crcs,
        data,
    })
}

#[cfg(test)]
mod tests;
