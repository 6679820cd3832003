//! Field-level primitives shared by the request and reply codecs.
//!
//! [`Reader`] walks a payload front to back. Every read checks the bytes left
//! first, so a short payload yields [`WireError::Truncated`], never a panic; a
//! list is only allocated after its count has been checked against the bytes
//! left, so a forged count cannot make the reader allocate more than the
//! payload's own size. Byte ranges come out as [`Bytes`] slices of the
//! payload (no copy).
//!
//! The `put_*` writers check that a value is representable (string length,
//! list count) before writing anything of it.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{WireError, MAX_STR_LEN};

/// Bytes taken by a `str` field's length prefix.
const STR_LEN_BYTES: usize = 2;
/// Bytes taken by a `labels` field's count prefix.
const LABEL_COUNT_BYTES: usize = 2;
/// The fewest bytes one label (two empty strings) takes.
const MIN_LABEL_BYTES: usize = 2 * STR_LEN_BYTES;

/// A cursor over a payload.
pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes, borrowed.
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.remaining() {
            return Err(WireError::Truncated);
        }
        let buf: &'a Bytes = self.buf;
        let out = &buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(u64::from_le_bytes)
    }

    /// `N` raw bytes.
    pub(crate) fn fixed<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.array()
    }

    /// The next `n` bytes as a zero-copy slice of the payload.
    pub(crate) fn bytes(&mut self, n: usize) -> Result<Bytes, WireError> {
        if n > self.remaining() {
            return Err(WireError::Truncated);
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    /// Fails with `Truncated` unless `count` items of at least `item_len`
    /// bytes each can still follow. Call before allocating for a list.
    pub(crate) fn ensure_room(&self, count: usize, item_len: usize) -> Result<(), WireError> {
        match count.checked_mul(item_len) {
            Some(need) if need <= self.remaining() => Ok(()),
            _ => Err(WireError::Truncated),
        }
    }

    /// `count` little-endian u32s.
    pub(crate) fn u32s(&mut self, count: usize) -> Result<Vec<u32>, WireError> {
        self.ensure_room(count, 4)?;
        (0..count).map(|_| self.u32()).collect()
    }

    /// `count` little-endian u64s.
    pub(crate) fn u64s(&mut self, count: usize) -> Result<Vec<u64>, WireError> {
        self.ensure_room(count, 8)?;
        (0..count).map(|_| self.u64()).collect()
    }

    /// A `str`: u16 length, then that many UTF-8 bytes (at most `MAX_STR_LEN`).
    pub(crate) fn string(&mut self) -> Result<String, WireError> {
        let len = usize::from(self.u16()?);
        if len > MAX_STR_LEN {
            return Err(WireError::StringTooLong {
                len,
                max: MAX_STR_LEN,
            });
        }
        let raw = self.take(len)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| WireError::BadUtf8)
    }

    /// `labels`: u16 count, then count x (`str` key, `str` value).
    pub(crate) fn labels(&mut self) -> Result<Vec<(String, String)>, WireError> {
        let count = usize::from(self.u16()?);
        self.ensure_room(count, MIN_LABEL_BYTES)?;
        let mut labels = Vec::with_capacity(count);
        for _ in 0..count {
            let key = self.string()?;
            let value = self.string()?;
            labels.push((key, value));
        }
        Ok(labels)
    }

    /// Fails unless the whole payload has been read.
    pub(crate) fn finish(self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(WireError::TrailingBytes(extra)),
        }
    }
}

/// The u16 count of a list, or `TooMany`.
pub(crate) fn count_u16(what: &'static str, count: usize) -> Result<u16, WireError> {
    u16::try_from(count).map_err(|_| WireError::TooMany {
        what,
        count,
        max: usize::from(u16::MAX),
    })
}

/// The u32 count of a list, or `TooMany`.
pub(crate) fn count_u32(what: &'static str, count: usize) -> Result<u32, WireError> {
    u32::try_from(count).map_err(|_| WireError::TooMany {
        what,
        count,
        max: usize::try_from(u32::MAX).unwrap_or(usize::MAX),
    })
}

/// Writes a `str`, or fails (writing nothing) if it is over `MAX_STR_LEN`.
pub(crate) fn put_str(out: &mut BytesMut, s: &str) -> Result<(), WireError> {
    if s.len() > MAX_STR_LEN {
        return Err(WireError::StringTooLong {
            len: s.len(),
            max: MAX_STR_LEN,
        });
    }
    let len = u16::try_from(s.len()).map_err(|_| WireError::StringTooLong {
        len: s.len(),
        max: MAX_STR_LEN,
    })?;
    out.reserve(STR_LEN_BYTES + s.len());
    out.put_u16_le(len);
    out.put_slice(s.as_bytes());
    Ok(())
}

/// Writes `labels`. On error the caller discards the partial frame.
pub(crate) fn put_labels(out: &mut BytesMut, labels: &[(String, String)]) -> Result<(), WireError> {
    let count = count_u16("labels", labels.len())?;
    out.reserve(LABEL_COUNT_BYTES);
    out.put_u16_le(count);
    for (key, value) in labels {
        put_str(out, key)?;
        put_str(out, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_short_fields_and_trailing_bytes() {
        let buf = Bytes::from_static(&[1, 2, 3]);
        let mut r = Reader::new(&buf);
        assert_eq!(r.u32(), Err(WireError::Truncated));
        assert_eq!(r.u16(), Ok(0x0201));
        assert_eq!(r.finish(), Err(WireError::TrailingBytes(1)));
    }

    #[test]
    fn forged_counts_fail_before_allocating() {
        let buf = Bytes::from_static(&[0xFF, 0xFF, 0, 0]);
        assert_eq!(Reader::new(&buf).labels(), Err(WireError::Truncated));
        assert_eq!(
            Reader::new(&buf).u64s(usize::MAX),
            Err(WireError::Truncated)
        );
    }

    #[test]
    fn strings_are_bounded_and_utf8() {
        let mut out = BytesMut::new();
        put_str(&mut out, &"x".repeat(MAX_STR_LEN)).unwrap();
        let buf = out.freeze();
        assert_eq!(Reader::new(&buf).string().unwrap().len(), MAX_STR_LEN);

        let mut out = BytesMut::new();
        assert!(matches!(
            put_str(&mut out, &"x".repeat(MAX_STR_LEN + 1)),
            Err(WireError::StringTooLong { .. })
        ));
        assert!(out.is_empty());

        let long = Bytes::from_static(&[0x01, 0x10]); // 4097
        assert_eq!(
            Reader::new(&long).string(),
            Err(WireError::StringTooLong {
                len: MAX_STR_LEN + 1,
                max: MAX_STR_LEN
            })
        );
        let bad = Bytes::from_static(&[2, 0, 0xC3, 0x28]);
        assert_eq!(Reader::new(&bad).string(), Err(WireError::BadUtf8));
    }
}
