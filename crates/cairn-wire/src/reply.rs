//! Replies from a replica to the engine: [`Reply`] and its payload codec.
//!
//! A reply's op is `REPLY_BIT | request op` and its flags are 0. Its payload
//! starts with a status byte: 0, then the body the request op calls for
//! (see [`ReplyBody`]), or an [`ErrorKind`] code, then a u64 detail and a
//! `str` message. `Reply::decode` picks the body shape from the op and checks
//! every count against the bytes present before allocating; it does not
//! check block CRCs against data (the engine does). Whatever `try_encode`
//! accepts, `decode` returns unchanged.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{count_u16, count_u32, put_labels, put_str, Reader};
use crate::frame::write_frame;
use crate::{block_count, block_crcs, op, ErrorKind, Frame, WireError, MAX_STR_LEN};

/// Status byte of a successful reply.
const STATUS_OK: u8 = 0;
/// Bytes of a BLAKE3 digest.
pub const DIGEST_LEN: usize = 32;
/// The fewest bytes one snapshot entry takes: two empty `str`s, two u64s,
/// empty `labels`.
const MIN_SNAPSHOT_ENTRY_LEN: usize = 2 + 2 + 8 + 8 + 2;
/// The fewest bytes one chain entry (an empty `str`) takes.
const MIN_CHAIN_ENTRY_LEN: usize = 2;
/// Bytes of one extent: u64 offset, u64 len.
const EXTENT_LEN: usize = 16;
/// Bytes of one block CRC.
const CRC_LEN: usize = 4;

/// Replica activity counters, as reported by Hello and Status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counters {
    /// Read requests served.
    pub reads: u64,
    /// Write requests served.
    pub writes: u64,
    /// Bytes returned by reads.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Flushes served.
    pub flushes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Blocks found corrupt.
    pub corruptions: u64,
    /// Regions currently marked dirty.
    pub dirty_regions: u64,
}

/// Body of an ok reply to Hello or Status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusBody {
    /// Volume size in bytes.
    pub size: u64,
    /// The replica's accepted epoch.
    pub epoch: u64,
    /// Random non-zero id chosen when the replica was created (anew by Recreate); 0 for a
    /// replica created before instance ids existed. A different value means different
    /// content history, even under the same volume and replica id.
    pub instance: u64,
    /// Volume name.
    pub volume: String,
    /// Replica id.
    pub replica_id: String,
    /// Snapshot names, oldest first: the head's ancestors.
    pub chain: Vec<String>,
    /// Activity counters.
    pub counters: Counters,
}

/// One entry of a SnapshotList reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot name.
    pub name: String,
    /// The snapshot it was taken over, if any (never `Some("")`).
    pub parent: Option<String>,
    /// Creation time from the SnapshotCreate request.
    pub created_unix_ms: u64,
    /// Bytes allocated by this layer alone.
    pub allocated_bytes: u64,
    /// Labels from the SnapshotCreate request.
    pub labels: Vec<(String, String)>,
}

/// The body of an ok reply; which variant is legal depends on the op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    /// Write, WriteZeroes, Trim, Flush, SnapshotCreate/Delete/Revert, Grow, Ping, Unmap.
    Empty,
    /// Hello, Status and Recreate.
    Status(StatusBody),
    /// Read and ReadLayer: one CRC32 per 4096-byte block (a final partial
    /// block has its own), then the data.
    Data {
        /// Block CRCs, as [`block_crcs`](crate::block_crcs) computes them.
        crcs: Vec<u32>,
        /// The data.
        data: Bytes,
    },
    /// SnapshotList.
    Snapshots(Vec<SnapshotInfo>),
    /// ListExtents: `(offset, len)` in bytes.
    Extents(Vec<(u64, u64)>),
    /// Digest: BLAKE3 of the logical content and the size it covers.
    Digest {
        /// The digest.
        digest: [u8; DIGEST_LEN],
        /// Bytes covered.
        size: u64,
    },
    /// DirtyRegions: indexes of dirty regions of `region_size` bytes.
    DirtyRegions {
        /// Bytes per region.
        region_size: u64,
        /// Region indexes.
        regions: Vec<u64>,
    },
    /// RangeDigests: one BLAKE3 digest per granule, in order.
    RangeDigests(Vec<[u8; DIGEST_LEN]>),
}

/// The shape of body an op's ok reply carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Empty,
    Status,
    Data,
    Snapshots,
    Extents,
    Digest,
    DirtyRegions,
    RangeDigests,
}

fn body_kind(request_op: u8) -> Option<BodyKind> {
    Some(match request_op {
        op::HELLO | op::STATUS | op::RECREATE => BodyKind::Status,
        op::READ | op::READ_LAYER => BodyKind::Data,
        op::WRITE
        | op::WRITE_ZEROES
        | op::TRIM
        | op::FLUSH
        | op::SNAPSHOT_CREATE
        | op::SNAPSHOT_DELETE
        | op::SNAPSHOT_REVERT
        | op::GROW
        | op::PING
        | op::UNMAP => BodyKind::Empty,
        op::SNAPSHOT_LIST => BodyKind::Snapshots,
        op::LIST_EXTENTS => BodyKind::Extents,
        op::DIGEST => BodyKind::Digest,
        op::DIRTY_REGIONS => BodyKind::DirtyRegions,
        op::RANGE_DIGESTS => BodyKind::RangeDigests,
        _ => return None,
    })
}

impl ReplyBody {
    /// A Data body for `data`, with its block CRCs computed.
    pub fn data(data: Bytes) -> ReplyBody {
        ReplyBody::Data {
            crcs: block_crcs(&data),
            data,
        }
    }

    fn kind(&self) -> BodyKind {
        match self {
            ReplyBody::Empty => BodyKind::Empty,
            ReplyBody::Status(_) => BodyKind::Status,
            ReplyBody::Data { .. } => BodyKind::Data,
            ReplyBody::Snapshots(_) => BodyKind::Snapshots,
            ReplyBody::Extents(_) => BodyKind::Extents,
            ReplyBody::Digest { .. } => BodyKind::Digest,
            ReplyBody::DirtyRegions { .. } => BodyKind::DirtyRegions,
            ReplyBody::RangeDigests(_) => BodyKind::RangeDigests,
        }
    }

    /// Payload bytes worth reserving before encoding (the bulk data).
    fn size_hint(&self) -> usize {
        match self {
            ReplyBody::Data { crcs, data } => 1 + 4 + CRC_LEN * crcs.len() + data.len(),
            _ => 0,
        }
    }
}

/// An error reported by the replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message} (detail {detail})")]
pub struct ReplyError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// For `Corruption` and `ChecksumMismatch`, the byte offset of the bad block; for
    /// `StaleEpoch`, the replica's accepted epoch (the one to beat); else 0.
    pub detail: u64,
    /// Human-readable detail, at most 4096 bytes.
    pub message: String,
}

impl ReplyError {
    /// An error with `message` cut to at most [`MAX_STR_LEN`] bytes (at a
    /// char boundary) so that it always encodes.
    pub fn new(kind: ErrorKind, detail: u64, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_STR_LEN {
            let mut cut = MAX_STR_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        ReplyError {
            kind,
            detail,
            message,
        }
    }
}

/// A reply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's id.
    pub request_id: u64,
    /// The replica's accepted epoch.
    pub epoch: u64,
    /// The request op (without the reply bit).
    pub op: u8,
    /// The body, or the error.
    pub result: Result<ReplyBody, ReplyError>,
}

impl Reply {
    /// Appends this reply as one frame to `out`.
    ///
    /// # Panics
    /// If the reply cannot be represented (see [`try_encode`](Self::try_encode)).
    pub fn encode(&self, out: &mut BytesMut) {
        if let Err(err) = self.try_encode(out) {
            panic!("cannot encode reply to op {:#04x}: {err}", self.op);
        }
    }

    /// Appends this reply as one frame to `out`, or fails (leaving `out` as
    /// it was) if `op` is unknown, the body's shape does not match the op,
    /// a string is over 4096 bytes, a list is too long for its count field,
    /// a parent is `Some("")`, or Data has the wrong number of CRCs.
    pub fn try_encode(&self, out: &mut BytesMut) -> Result<(), WireError> {
        let kind = body_kind(self.op).ok_or(WireError::UnknownOp(self.op))?;
        let hint = match &self.result {
            Ok(body) => {
                if body.kind() != kind {
                    return Err(WireError::BodyMismatch { op: self.op });
                }
                body.size_hint()
            }
            Err(_) => 0,
        };
        let frame_op = op::REPLY_BIT | self.op;
        write_frame(
            out,
            frame_op,
            0,
            self.request_id,
            self.epoch,
            hint,
            |out| match &self.result {
                Ok(body) => {
                    out.put_u8(STATUS_OK);
                    encode_body(body, out)
                }
                Err(err) => {
                    out.put_u8(err.kind.as_u8());
                    out.put_u64_le(err.detail);
                    put_str(out, &err.message)
                }
            },
        )
    }

    /// Decodes a reply frame; the body shape comes from the op.
    pub fn decode(frame: &Frame) -> Result<Reply, WireError> {
        let header = &frame.header;
        if op::is_request(header.op) {
            return Err(WireError::UnexpectedRequest(header.op));
        }
        if !op::is_reply(header.op) {
            return Err(WireError::UnknownOp(header.op));
        }
        let request_op = header.op & !op::REPLY_BIT;
        let kind = body_kind(request_op).ok_or(WireError::UnknownOp(header.op))?;
        if header.flags != 0 {
            return Err(WireError::BadFlags(header.flags));
        }
        if header.payload_len as usize != frame.payload.len() {
            return Err(WireError::LengthMismatch {
                expected: header.payload_len as usize,
                actual: frame.payload.len(),
            });
        }
        let mut r = Reader::new(&frame.payload);
        let result = match r.u8()? {
            STATUS_OK => Ok(decode_body(kind, &mut r)?),
            code => {
                let kind = ErrorKind::from_u8(code).ok_or(WireError::UnknownErrorKind(code))?;
                Err(ReplyError {
                    kind,
                    detail: r.u64()?,
                    message: r.string()?,
                })
            }
        };
        r.finish()?;
        Ok(Reply {
            request_id: header.request_id,
            epoch: header.epoch,
            op: request_op,
            result,
        })
    }
}

fn encode_body(body: &ReplyBody, out: &mut BytesMut) -> Result<(), WireError> {
    match body {
        ReplyBody::Empty => {}
        ReplyBody::Status(status) => {
            out.put_u64_le(status.size);
            out.put_u64_le(status.epoch);
            out.put_u64_le(status.instance);
            put_str(out, &status.volume)?;
            put_str(out, &status.replica_id)?;
            out.put_u16_le(count_u16("chain entries", status.chain.len())?);
            for name in &status.chain {
                put_str(out, name)?;
            }
            let c = &status.counters;
            for value in [
                c.reads,
                c.writes,
                c.bytes_read,
                c.bytes_written,
                c.flushes,
                c.errors,
                c.corruptions,
                c.dirty_regions,
            ] {
                out.put_u64_le(value);
            }
        }
        ReplyBody::Data { crcs, data } => {
            let len = u32::try_from(data.len()).map_err(|_| WireError::TooLarge {
                len: data.len(),
                max: u32::MAX as usize,
            })?;
            let blocks = block_count(data.len());
            if crcs.len() != blocks {
                return Err(WireError::CrcCountMismatch {
                    expected: blocks,
                    actual: crcs.len(),
                });
            }
            out.put_u32_le(len);
            for crc in crcs {
                out.put_u32_le(*crc);
            }
            out.put_slice(data);
        }
        ReplyBody::Snapshots(snapshots) => {
            out.put_u16_le(count_u16("snapshots", snapshots.len())?);
            for snap in snapshots {
                put_str(out, &snap.name)?;
                match snap.parent.as_deref() {
                    Some("") => return Err(WireError::EmptyParent),
                    parent => put_str(out, parent.unwrap_or(""))?,
                }
                out.put_u64_le(snap.created_unix_ms);
                out.put_u64_le(snap.allocated_bytes);
                put_labels(out, &snap.labels)?;
            }
        }
        ReplyBody::Extents(extents) => {
            out.put_u32_le(count_u32("extents", extents.len())?);
            for (offset, len) in extents {
                out.put_u64_le(*offset);
                out.put_u64_le(*len);
            }
        }
        ReplyBody::Digest { digest, size } => {
            out.put_slice(digest);
            out.put_u64_le(*size);
        }
        ReplyBody::DirtyRegions {
            region_size,
            regions,
        } => {
            out.put_u64_le(*region_size);
            out.put_u32_le(count_u32("dirty regions", regions.len())?);
            for region in regions {
                out.put_u64_le(*region);
            }
        }
        ReplyBody::RangeDigests(digests) => {
            out.put_u32_le(count_u32("range digests", digests.len())?);
            for digest in digests {
                out.put_slice(digest);
            }
        }
    }
    Ok(())
}

fn decode_body(kind: BodyKind, r: &mut Reader<'_>) -> Result<ReplyBody, WireError> {
    Ok(match kind {
        BodyKind::Empty => ReplyBody::Empty,
        BodyKind::Status => {
            let size = r.u64()?;
            let epoch = r.u64()?;
            let instance = r.u64()?;
            let volume = r.string()?;
            let replica_id = r.string()?;
            let count = usize::from(r.u16()?);
            r.ensure_room(count, MIN_CHAIN_ENTRY_LEN)?;
            let chain = (0..count).map(|_| r.string()).collect::<Result<_, _>>()?;
            let counters = Counters {
                reads: r.u64()?,
                writes: r.u64()?,
                bytes_read: r.u64()?,
                bytes_written: r.u64()?,
                flushes: r.u64()?,
                errors: r.u64()?,
                corruptions: r.u64()?,
                dirty_regions: r.u64()?,
            };
            ReplyBody::Status(StatusBody {
                size,
                epoch,
                instance,
                volume,
                replica_id,
                chain,
                counters,
            })
        }
        BodyKind::Data => {
            let len = r.u32()? as usize;
            let crcs = r.u32s(block_count(len))?;
            let data = r.bytes(len)?;
            ReplyBody::Data { crcs, data }
        }
        BodyKind::Snapshots => {
            let count = usize::from(r.u16()?);
            r.ensure_room(count, MIN_SNAPSHOT_ENTRY_LEN)?;
            let mut snapshots = Vec::with_capacity(count);
            for _ in 0..count {
                let name = r.string()?;
                let parent = Some(r.string()?).filter(|p| !p.is_empty());
                snapshots.push(SnapshotInfo {
                    name,
                    parent,
                    created_unix_ms: r.u64()?,
                    allocated_bytes: r.u64()?,
                    labels: r.labels()?,
                });
            }
            ReplyBody::Snapshots(snapshots)
        }
        BodyKind::Extents => {
            let count = r.u32()? as usize;
            r.ensure_room(count, EXTENT_LEN)?;
            let extents = (0..count)
                .map(|_| Ok((r.u64()?, r.u64()?)))
                .collect::<Result<_, WireError>>()?;
            ReplyBody::Extents(extents)
        }
        BodyKind::Digest => ReplyBody::Digest {
            digest: r.fixed::<DIGEST_LEN>()?,
            size: r.u64()?,
        },
        BodyKind::DirtyRegions => {
            let region_size = r.u64()?;
            let count = r.u32()? as usize;
            ReplyBody::DirtyRegions {
                region_size,
                regions: r.u64s(count)?,
            }
        }
        BodyKind::RangeDigests => {
            let count = r.u32()? as usize;
            r.ensure_room(count, DIGEST_LEN)?;
            let digests = (0..count)
                .map(|_| r.fixed::<DIGEST_LEN>())
                .collect::<Result<_, _>>()?;
            ReplyBody::RangeDigests(digests)
        }
    })
}

#[cfg(test)]
mod tests;
