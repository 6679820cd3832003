//! Transmission replies, encoded to bytes: simple replies, structured chunks (OFFSET_DATA,
//! BLOCK_STATUS, ERROR), and the conversion of a device's allocated extents into
//! `base:allocation` block descriptors. Pure: no I/O.
//!
//! Guarantees: every encoder produces one complete frame whose length fields match its
//! payload; [`descriptors`] returns at least one descriptor for a non-empty query, every
//! length nonzero, consecutive from the query offset, summing to at most the query length
//! (exactly one descriptor with `REQ_ONE`), whatever extents the device reports.

use bytes::{BufMut, Bytes, BytesMut};

use crate::proto::{
    Errno, MAX_STRING_LEN, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_DATA, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STATE_HOLE, STATE_ZERO,
    STRUCTURED_HEADER_LEN, STRUCTURED_REPLY_MAGIC,
};

/// Most descriptors sent in one BLOCK_STATUS reply; the spec lets a server describe less
/// than the whole range, and clients continue from where the reply stopped.
pub const MAX_DESCRIPTORS: usize = 1 << 14;

/// Descriptor status for allocated data.
pub const STATUS_DATA: u32 = 0;
/// Descriptor status for a hole (reads as zeros).
pub const STATUS_HOLE: u32 = STATE_HOLE | STATE_ZERO;

/// A simple reply header (followed by the data for a successful READ).
pub fn simple(cookie: u64, error: Option<Errno>) -> Bytes {
    let mut b = BytesMut::with_capacity(SIMPLE_REPLY_LEN);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error.map_or(0, Errno::code));
    b.put_u64(cookie);
    b.freeze()
}

fn chunk_header(b: &mut BytesMut, cookie: u64, kind: u16, len: u32) {
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(REPLY_FLAG_DONE);
    b.put_u16(kind);
    b.put_u64(cookie);
    b.put_u32(len);
}

/// The header and offset of a final OFFSET_DATA chunk carrying `data_len` bytes, which the
/// caller sends right after it. `data_len` must be at most `u32::MAX - 8` (the server caps its
/// maximum block size well below that).
pub fn offset_data(cookie: u64, offset: u64, data_len: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(STRUCTURED_HEADER_LEN + 8);
    chunk_header(
        &mut b,
        cookie,
        REPLY_TYPE_OFFSET_DATA,
        data_len.saturating_add(8),
    );
    b.put_u64(offset);
    b.freeze()
}

/// A final ERROR chunk with a human-readable message (cut to the protocol's string limit at
/// a character boundary).
pub fn error_chunk(cookie: u64, error: Errno, message: &str) -> Bytes {
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let msg = &msg[..usize::from(msg_len)];
    let mut b = BytesMut::with_capacity(STRUCTURED_HEADER_LEN + 6 + msg.len());
    chunk_header(&mut b, cookie, REPLY_TYPE_ERROR, 6 + u32::from(msg_len));
    b.put_u32(error.code());
    b.put_u16(msg_len);
    b.put_slice(msg);
    b.freeze()
}

/// A final BLOCK_STATUS chunk for one metadata context. `descriptors` holds at most
/// [`MAX_DESCRIPTORS`] `(length, status)` pairs.
pub fn block_status(cookie: u64, context: u32, descriptors: &[(u32, u32)]) -> Bytes {
    let n = descriptors.len().min(MAX_DESCRIPTORS);
    let len = 4 + 8 * u32::try_from(n).unwrap_or(0);
    let mut b = BytesMut::with_capacity(STRUCTURED_HEADER_LEN + 4 + 8 * n);
    chunk_header(&mut b, cookie, REPLY_TYPE_BLOCK_STATUS, len);
    b.put_u32(context);
    for &(length, status) in &descriptors[..n] {
        b.put_u32(length);
        b.put_u32(status);
    }
    b.freeze()
}

/// `base:allocation` descriptors for `offset..offset+len` from the device's allocated extents
/// (ascending `(offset, len)` pairs; anything outside the query or overlapping is clipped
/// away, so a misbehaving device cannot produce an invalid reply).
pub fn descriptors(
    offset: u64,
    len: u32,
    extents: &[(u64, u64)],
    req_one: bool,
) -> Vec<(u32, u32)> {
    let end = offset.saturating_add(u64::from(len));
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    let push = |out: &mut Vec<(u32, u32)>, from: u64, to: u64, status: u32| {
        // Every piece lies inside offset..end, so its length fits in u32 like `len`.
        let piece = u32::try_from(to - from).unwrap_or(u32::MAX);
        match out.last_mut() {
            Some((l, s)) if *s == status => *l = l.saturating_add(piece),
            _ => out.push((piece, status)),
        }
    };
    for &(e_off, e_len) in extents {
        if pos >= end {
            break;
        }
        let e_end = e_off.saturating_add(e_len).min(end);
        let start = e_off.max(pos);
        if e_end <= start {
            continue;
        }
        if start > pos {
            push(&mut out, pos, start, STATUS_HOLE);
        }
        push(&mut out, start, e_end, STATUS_DATA);
        pos = e_end;
    }
    if pos < end {
        push(&mut out, pos, end, STATUS_HOLE);
    }
    let keep = if req_one { 1 } else { MAX_DESCRIPTORS };
    out.truncate(keep);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_reply_layout() {
        let b = simple(0x0102_0304_0506_0708, Some(Errno::Inval));
        assert_eq!(
            &b[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(&simple(1, None)[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn offset_data_layout() {
        let b = offset_data(9, 4096, 8192);
        assert_eq!(b.len(), 28);
        assert_eq!(&b[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&b[4..6], &[0, 1]); // DONE
        assert_eq!(&b[6..8], &[0, 1]); // OFFSET_DATA
        assert_eq!(&b[8..16], &9u64.to_be_bytes());
        assert_eq!(&b[16..20], &(8192u32 + 8).to_be_bytes());
        assert_eq!(&b[20..28], &4096u64.to_be_bytes());
    }

    #[test]
    fn error_chunk_layout_and_message_limit() {
        let b = error_chunk(3, Errno::NoSpc, "full");
        assert_eq!(&b[6..8], &[0x80, 0x01]);
        assert_eq!(&b[16..20], &10u32.to_be_bytes());
        assert_eq!(&b[20..24], &28u32.to_be_bytes());
        assert_eq!(&b[24..26], &4u16.to_be_bytes());
        assert_eq!(&b[26..], b"full");
        let long = "é".repeat(5000);
        let b = error_chunk(3, Errno::Io, &long);
        let msg_len = usize::from(u16::from_be_bytes([b[24], b[25]]));
        assert!(msg_len <= MAX_STRING_LEN);
        assert!(std::str::from_utf8(&b[26..]).is_ok());
        assert_eq!(b.len(), 26 + msg_len);
    }

    #[test]
    fn block_status_layout() {
        let b = block_status(5, 1, &[(4096, STATUS_DATA), (8192, STATUS_HOLE)]);
        assert_eq!(&b[6..8], &[0, 5]);
        assert_eq!(&b[16..20], &20u32.to_be_bytes());
        assert_eq!(&b[20..24], &1u32.to_be_bytes());
        assert_eq!(&b[24..32], &[0, 0, 0x10, 0, 0, 0, 0, 0]);
        assert_eq!(&b[32..40], &[0, 0, 0x20, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn descriptors_fill_holes_and_merge() {
        let d = descriptors(
            0,
            40960,
            &[(4096, 4096), (8192, 4096), (20480, 4096)],
            false,
        );
        assert_eq!(
            d,
            vec![
                (4096, STATUS_HOLE),
                (8192, STATUS_DATA),
                (8192, STATUS_HOLE),
                (4096, STATUS_DATA),
                (16384, STATUS_HOLE),
            ]
        );
        assert_eq!(descriptors(0, 8192, &[], false), vec![(8192, STATUS_HOLE)]);
        assert_eq!(
            descriptors(0, 8192, &[(0, 8192)], true),
            vec![(8192, STATUS_DATA)]
        );
        assert_eq!(
            descriptors(0, 8192, &[(4096, 4096)], true),
            vec![(4096, STATUS_HOLE)]
        );
    }

    #[test]
    fn descriptors_clip_misbehaving_extents() {
        // Overlapping, unsorted and out-of-range extents still give a valid cover.
        let d = descriptors(
            4096,
            8192,
            &[(0, 8192), (4096, 4096), (0, 1), (10000, u64::MAX)],
            false,
        );
        assert_eq!(
            d,
            vec![
                (4096, STATUS_DATA),
                (1808, STATUS_HOLE),
                (2288, STATUS_DATA)
            ]
        );
        let total: u64 = d.iter().map(|&(l, _)| u64::from(l)).sum();
        assert_eq!(total, 8192);
    }
}
