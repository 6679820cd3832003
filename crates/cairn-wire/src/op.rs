//! Operation codes carried in byte 5 of every frame header.
//!
//! A request carries one of the codes below (`0x01..=0x14`); its reply carries
//! the same code with [`REPLY_BIT`] set. Every other byte value is refused by
//! [`FrameDecoder`](crate::FrameDecoder) before the payload is looked at.

use crate::{FLAG_FUA, FLAG_NO_HOLE, FLAG_TAKEOVER};

/// Set in the op byte of every reply: a reply to op `x` carries `REPLY_BIT | x`.
pub const REPLY_BIT: u8 = 0x80;

/// Open a session on a volume (and create the replica if asked).
pub const HELLO: u8 = 0x01;
/// Read a block-aligned range of the head.
pub const READ: u8 = 0x02;
/// Write whole blocks, each with its CRC32.
pub const WRITE: u8 = 0x03;
/// Write zeroes over a range (may punch a hole unless `NO_HOLE`).
pub const WRITE_ZEROES: u8 = 0x04;
/// Discard a range.
pub const TRIM: u8 = 0x05;
/// Make every acknowledged write durable.
pub const FLUSH: u8 = 0x06;
/// Freeze the head as a named snapshot.
pub const SNAPSHOT_CREATE: u8 = 0x07;
/// Delete a snapshot, merging it into its child.
pub const SNAPSHOT_DELETE: u8 = 0x08;
/// Discard the head and restart it from a snapshot.
pub const SNAPSHOT_REVERT: u8 = 0x09;
/// List the snapshots of the volume.
pub const SNAPSHOT_LIST: u8 = 0x0A;
/// Grow the volume.
pub const GROW: u8 = 0x0B;
/// Report size, epoch, chain and counters.
pub const STATUS: u8 = 0x0C;
/// List the allocated extents of one layer.
pub const LIST_EXTENTS: u8 = 0x0D;
/// Read a range of one layer.
pub const READ_LAYER: u8 = 0x0E;
/// Liveness check.
pub const PING: u8 = 0x0F;
/// BLAKE3 digest of the logical content.
pub const DIGEST: u8 = 0x10;
/// Regions written since the last clean point.
pub const DIRTY_REGIONS: u8 = 0x11;
/// Drop a range from the head layer only, so older snapshot layers show through.
pub const UNMAP: u8 = 0x12;
/// BLAKE3 digests of a range of one layer (or the merged content), one per granule.
pub const RANGE_DIGESTS: u8 = 0x13;
/// Discard the whole replica and start again empty, with a new instance id.
pub const RECREATE: u8 = 0x14;

/// The lowest request op.
pub const FIRST_REQUEST: u8 = HELLO;
/// The highest request op.
pub const LAST_REQUEST: u8 = RECREATE;

/// Is `op` a known request op (reply bit clear)?
pub fn is_request(op: u8) -> bool {
    (FIRST_REQUEST..=LAST_REQUEST).contains(&op)
}

/// Is `op` a known reply op (`REPLY_BIT` set over a known request op)?
pub fn is_reply(op: u8) -> bool {
    op & REPLY_BIT != 0 && is_request(op & !REPLY_BIT)
}

/// Is `op` acceptable in a frame header at all?
pub fn is_known(op: u8) -> bool {
    is_request(op) || is_reply(op)
}

/// The flag bits a request with this op may carry; replies carry none.
pub fn allowed_flags(op: u8) -> u16 {
    match op {
        WRITE | TRIM => FLAG_FUA,
        WRITE_ZEROES => FLAG_FUA | FLAG_NO_HOLE,
        HELLO => FLAG_TAKEOVER,
        _ => 0,
    }
}

/// A short name for logs (`"write"`, `"snapshot-list"`...), ignoring the
/// reply bit; `None` for unknown ops.
pub fn name(op: u8) -> Option<&'static str> {
    Some(match op & !REPLY_BIT {
        HELLO => "hello",
        READ => "read",
        WRITE => "write",
        WRITE_ZEROES => "write-zeroes",
        TRIM => "trim",
        FLUSH => "flush",
        SNAPSHOT_CREATE => "snapshot-create",
        SNAPSHOT_DELETE => "snapshot-delete",
        SNAPSHOT_REVERT => "snapshot-revert",
        SNAPSHOT_LIST => "snapshot-list",
        GROW => "grow",
        STATUS => "status",
        LIST_EXTENTS => "list-extents",
        READ_LAYER => "read-layer",
        PING => "ping",
        DIGEST => "digest",
        DIRTY_REGIONS => "dirty-regions",
        UNMAP => "unmap",
        RANGE_DIGESTS => "range-digests",
        RECREATE => "recreate",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ops_are_exactly_the_request_range_and_its_replies() {
        for op in 0..=u8::MAX {
            let expected = (0x01..=0x14).contains(&op) || (0x81..=0x94).contains(&op);
            assert_eq!(is_known(op), expected, "op {op:#04x}");
            assert_eq!(name(op).is_some(), expected, "op {op:#04x}");
        }
    }
}
