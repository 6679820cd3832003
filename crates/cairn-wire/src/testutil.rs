//! Helpers shared by the unit tests.

use bytes::BytesMut;

use crate::{Frame, FrameDecoder, DEFAULT_MAX_FRAME};

/// Decodes exactly one frame that fills `buf`.
pub(crate) fn decode_one(mut buf: BytesMut) -> Frame {
    let frame = FrameDecoder::new(DEFAULT_MAX_FRAME)
        .decode(&mut buf)
        .expect("valid frame")
        .expect("complete frame");
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    frame
}

/// Recomputes the CRC field of the single frame in `buf` after a test has
/// patched its header or payload.
pub(crate) fn fix_crc(buf: &mut [u8]) {
    let crc = crate::frame::frame_crc(&buf[..28], &buf[32..]);
    buf[28..32].copy_from_slice(&crc.to_le_bytes());
}
