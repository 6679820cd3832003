//! The 32-byte frame header, whole frames, and [`FrameDecoder`], which cuts
//! frames off the front of a byte stream.
//!
//! Guarantees of [`FrameDecoder::decode`], whatever the input bytes:
//! - it never panics, never grows or reserves buffer space and never
//!   allocates for a payload (the caller's read loop grows the buffer;
//!   [`FrameDecoder::bytes_needed`] says by how much, never more than
//!   `max_frame`), so a forged length cannot make it allocate;
//! - a frame is returned only if its magic, version, op, reserved flag bits,
//!   length (at most the decoder's `max_frame`, header included) and CRC are
//!   all valid; the payload is a zero-copy slice of the input;
//! - a header field that is wrong is reported as soon as its bytes are in the
//!   buffer, before the rest of the header or the payload has arrived;
//! - on error nothing is consumed: the stream cannot be resynchronised and the
//!   caller must drop the connection.
//!
//! It does not check op-specific flags or the payload's structure; that is
//! [`Request::decode`](crate::Request::decode) and
//! [`Reply::decode`](crate::Reply::decode)'s job.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{op, WireError, FLAG_FUA, FLAG_NO_HOLE, FLAG_TAKEOVER, HEADER_LEN, MAGIC, VERSION};

/// Every flag bit defined by this version; the others must be zero.
pub const KNOWN_FLAGS: u16 = FLAG_FUA | FLAG_NO_HOLE | FLAG_TAKEOVER;

/// Header field offsets (see docs/wire.md).
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_OP: usize = 5;
const OFF_FLAGS: usize = 6;
const OFF_REQUEST_ID: usize = 8;
const OFF_EPOCH: usize = 16;
const OFF_PAYLOAD_LEN: usize = 24;
/// The CRC field; the CRC covers the header bytes before it, then the payload.
const OFF_CRC: usize = 28;

/// The fields of a frame header that carry information (magic, version and
/// CRC are implied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request op, or `op::REPLY_BIT | op` for a reply.
    pub op: u8,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Chosen by the requester, echoed in the reply.
    pub request_id: u64,
    /// The engine's epoch (requests) or the replica's accepted epoch (replies).
    pub epoch: u64,
    /// Bytes of payload after the header.
    pub payload_len: u32,
}

impl Header {
    /// Does this header belong to a reply?
    pub fn is_reply(&self) -> bool {
        self.op & op::REPLY_BIT != 0
    }
}

/// One validated frame: its header and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header; `payload_len == payload.len()` for every decoded frame.
    pub header: Header,
    /// The payload bytes (a slice of the receive buffer, not a copy).
    pub payload: Bytes,
}

impl Frame {
    /// Writes this frame as it would appear on the wire, computing the CRC.
    ///
    /// `op` and `flags` are written as they are, valid or not (useful for
    /// relays and tests); fails with `LengthMismatch`, writing nothing, if
    /// `header.payload_len` is not the payload's length.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), WireError> {
        let expected = self.header.payload_len as usize;
        if expected != self.payload.len() {
            return Err(WireError::LengthMismatch {
                expected,
                actual: self.payload.len(),
            });
        }
        let h = &self.header;
        write_frame(
            out,
            h.op,
            h.flags,
            h.request_id,
            h.epoch,
            self.payload.len(),
            |out| {
                out.put_slice(&self.payload);
                Ok(())
            },
        )
    }
}

/// CRC32 (IEEE, as crc32fast computes it) of header bytes 0..28 then the payload.
pub(crate) fn frame_crc(header_prefix: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header_prefix);
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one frame to `out`: a header, then whatever `body` writes, then
/// patches in the payload length and CRC. `payload_hint` is reserved up
/// front so a large payload is copied into `out` once. If `body` fails, or
/// the payload does not fit the u32 length field, `out` is left as it was.
pub(crate) fn write_frame(
    out: &mut BytesMut,
    op: u8,
    flags: u16,
    request_id: u64,
    epoch: u64,
    payload_hint: usize,
    body: impl FnOnce(&mut BytesMut) -> Result<(), WireError>,
) -> Result<(), WireError> {
    let start = out.len();
    out.reserve(HEADER_LEN.saturating_add(payload_hint));
    out.put_u32_le(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(op);
    out.put_u16_le(flags);
    out.put_u64_le(request_id);
    out.put_u64_le(epoch);
    out.put_u32_le(0); // payload_len, patched below
    out.put_u32_le(0); // crc, patched below
    if let Err(err) = body(out) {
        out.truncate(start);
        return Err(err);
    }
    let payload_len = out.len() - start - HEADER_LEN;
    let Ok(len_field) = u32::try_from(payload_len) else {
        out.truncate(start);
        return Err(WireError::TooLarge {
            len: HEADER_LEN.saturating_add(payload_len),
            max: HEADER_LEN + u32::MAX as usize,
        });
    };
    let frame = &mut out[start..];
    frame[OFF_PAYLOAD_LEN..OFF_CRC].copy_from_slice(&len_field.to_le_bytes());
    let crc = frame_crc(&frame[..OFF_CRC], &frame[HEADER_LEN..]);
    frame[OFF_CRC..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// Checks every header field (except the length) whose bytes are all in
/// `prefix`, which may be shorter than a header.
fn check_header_prefix(prefix: &[u8]) -> Result<(), WireError> {
    if prefix.len() >= OFF_VERSION {
        let magic = le_u32(prefix, OFF_MAGIC);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
    }
    if let Some(&version) = prefix.get(OFF_VERSION) {
        if version != VERSION {
            return Err(WireError::BadVersion(version));
        }
    }
    if let Some(&op) = prefix.get(OFF_OP) {
        if !op::is_known(op) {
            return Err(WireError::UnknownOp(op));
        }
    }
    if prefix.len() >= OFF_REQUEST_ID {
        let flags = le_u16(prefix, OFF_FLAGS);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(WireError::BadFlags(flags));
        }
    }
    Ok(())
}

/// Cuts validated frames off the front of a receive buffer.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(crate::DEFAULT_MAX_FRAME)
    }
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `max_frame` bytes, header
    /// included. A `max_frame` below `HEADER_LEN` is raised to `HEADER_LEN`
    /// (frames with an empty payload only).
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            max_frame: max_frame.max(HEADER_LEN),
        }
    }

    /// The largest frame accepted, header included.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn max_payload(&self) -> usize {
        self.max_frame - HEADER_LEN
    }

    /// Validates a complete header; returns it with its CRC field.
    fn parse_header(&self, raw: &[u8]) -> Result<(Header, u32), WireError> {
        check_header_prefix(raw)?;
        let payload_len = le_u32(raw, OFF_PAYLOAD_LEN);
        if payload_len as usize > self.max_payload() {
            return Err(WireError::TooLarge {
                len: HEADER_LEN.saturating_add(payload_len as usize),
                max: self.max_frame,
            });
        }
        let header = Header {
            op: raw[OFF_OP],
            flags: le_u16(raw, OFF_FLAGS),
            request_id: le_u64(raw, OFF_REQUEST_ID),
            epoch: le_u64(raw, OFF_EPOCH),
            payload_len,
        };
        Ok((header, le_u32(raw, OFF_CRC)))
    }

    /// Takes one complete frame off the front of `buf` if there is one.
    /// `Ok(None)` means more bytes are needed. On error nothing is consumed
    /// and the connection must be dropped.
    ///
    /// Validates magic, version, op (a known request op or `0x80 |` one),
    /// reserved flag bits, `payload_len <= max_frame - HEADER_LEN` and the
    /// CRC. Never panics, never grows `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if buf.len() < HEADER_LEN {
            check_header_prefix(buf)?;
            return Ok(None);
        }
        let (header, expected) = self.parse_header(&buf[..HEADER_LEN])?;
        let total = HEADER_LEN + header.payload_len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let actual = frame_crc(&buf[..OFF_CRC], &buf[HEADER_LEN..total]);
        if actual != expected {
            return Err(WireError::BadCrc { expected, actual });
        }
        let payload = buf.split_to(total).freeze().slice(HEADER_LEN..);
        Ok(Some(Frame { header, payload }))
    }

    /// Bytes still missing before `buf` holds the next whole frame: first
    /// the rest of the header, then the rest of the payload. 0 means
    /// [`decode`](Self::decode) can make progress now (a frame or an error),
    /// including when the header is already known to be invalid. Never more
    /// than `max_frame`.
    pub fn bytes_needed(&self, buf: &[u8]) -> usize {
        if buf.len() < HEADER_LEN {
            return match check_header_prefix(buf) {
                Ok(()) => HEADER_LEN - buf.len(),
                Err(_) => 0,
            };
        }
        match self.parse_header(&buf[..HEADER_LEN]) {
            Ok((header, _)) => (HEADER_LEN + header.payload_len as usize).saturating_sub(buf.len()),
            Err(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests;
