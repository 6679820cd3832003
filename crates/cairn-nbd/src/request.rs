//! Transmission requests: decode a 28-byte header into a [`RawRequest`], validate it against
//! the connection's [`Limits`] into a typed [`Request`], and map every failure, whether found
//! by validation or reported by the device, to an NBD errno in one place ([`errno`]).
//!
//! Pure: no I/O. Guarantees: a [`Request`] that carries a range is non-empty, inside the
//! export (checked with `checked_add`), aligned to the minimum block size, and a READ/WRITE
//! is no longer than the advertised maximum; so the device never sees a request the NBD
//! handshake told the client it may not send.

use cairn_blockdev::DevError;

use crate::proto::{
    Errno, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, REQUEST_LEN,
    REQUEST_MAGIC,
};

/// A request header as the client sent it, before any validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRequest {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RawRequest {
    /// Decodes a header; the only way it can fail is a wrong magic, after which the stream
    /// cannot be resynchronised (the caller closes the connection).
    pub fn decode(buf: &[u8; REQUEST_LEN]) -> Result<RawRequest, u32> {
        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        let mut cookie = [0; 8];
        cookie.copy_from_slice(&buf[8..16]);
        let mut offset = [0; 8];
        offset.copy_from_slice(&buf[16..24]);
        Ok(RawRequest {
            flags: u16::from_be_bytes([buf[4], buf[5]]),
            cmd: u16::from_be_bytes([buf[6], buf[7]]),
            cookie: u64::from_be_bytes(cookie),
            offset: u64::from_be_bytes(offset),
            len: u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]),
        })
    }

    /// The header bytes (for tests: the server never sends requests).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// What validation needs to know about the connection, fixed when transmission starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Advertised minimum block size: offsets and lengths must be multiples of it.
    pub block: u32,
    /// Advertised maximum block size for READ and WRITE.
    pub max_io: u32,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected for this export.
    pub base_allocation: bool,
}

/// A validated request. Ranges satisfy the guarantees in the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disc,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// Why validation refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("unknown command flags {0:#x}")]
    UnknownFlags(u16),
    #[error("flag {flag} is not valid for this command")]
    FlagNotForCommand { flag: &'static str },
    #[error("DF flag needs structured replies")]
    DfWithoutStructured,
    #[error("FLUSH must have zero offset and length")]
    FlushWithRange,
    #[error("BLOCK_STATUS needs structured replies and base:allocation")]
    BlockStatusNotNegotiated,
    #[error("zero-length request")]
    ZeroLength,
    #[error("range {offset}+{len} is outside the export ({size} bytes)")]
    OutOfRange { offset: u64, len: u32, size: u64 },
    #[error("range {offset}+{len} is not aligned to {block} bytes")]
    Misaligned { offset: u64, len: u32, block: u32 },
    #[error("length {len} exceeds the maximum block size {max}")]
    TooLarge { len: u32, max: u32 },
}

/// A failed request: refused by validation, or by the device while executing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    Device(#[from] DevError),
}

/// The one place a failure becomes an NBD errno (choices follow nbdkit's
/// `server/protocol.c` and its blocksize-policy filter):
///
/// | failure                                   | errno                         |
/// |-------------------------------------------|-------------------------------|
/// | out of range (validation or device)       | ENOSPC for WRITE/WRITE_ZEROES, EINVAL otherwise |
/// | misaligned, zero length, over max size    | EINVAL                        |
/// | unknown command or flag, bad flag use     | EINVAL                        |
/// | device `NoSpace`                          | ENOSPC                        |
/// | device `TooLarge`                         | EOVERFLOW with DF, else EINVAL |
/// | device `Io`                               | EIO                           |
pub fn errno(failure: &Failure, cmd: u16, flags: u16) -> Errno {
    let writes = cmd == CMD_WRITE || cmd == CMD_WRITE_ZEROES;
    match failure {
        Failure::Invalid(Invalid::OutOfRange { .. })
        | Failure::Device(DevError::OutOfRange { .. }) => {
            if writes {
                Errno::NoSpc
            } else {
                Errno::Inval
            }
        }
        Failure::Invalid(_) => Errno::Inval,
        Failure::Device(DevError::Misaligned { .. }) => Errno::Inval,
        Failure::Device(DevError::NoSpace) => Errno::NoSpc,
        Failure::Device(DevError::TooLarge { .. }) => {
            if flags & CMD_FLAG_DF != 0 {
                Errno::Overflow
            } else {
                Errno::Inval
            }
        }
        Failure::Device(DevError::Io(_)) => Errno::Io,
    }
}

const KNOWN_FLAGS: u16 = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE;

/// Validates a request in nbdkit's order: command, range, flags, negotiation, then block-size
/// constraints (alignment, maximum).
pub fn validate(raw: &RawRequest, limits: &Limits) -> Result<Request, Invalid> {
    let RawRequest {
        flags,
        cmd,
        offset,
        len,
        ..
    } = *raw;
    match cmd {
        CMD_DISC => return Ok(Request::Disc),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => {
            if len == 0 {
                return Err(Invalid::ZeroLength);
            }
            match offset.checked_add(u64::from(len)) {
                Some(end) if end <= limits.size => {}
                _ => {
                    return Err(Invalid::OutOfRange {
                        offset,
                        len,
                        size: limits.size,
                    })
                }
            }
        }
        CMD_FLUSH => {
            if offset != 0 || len != 0 {
                return Err(Invalid::FlushWithRange);
            }
        }
        other => return Err(Invalid::UnknownCommand(other)),
    }

    if flags & !KNOWN_FLAGS != 0 {
        return Err(Invalid::UnknownFlags(flags & !KNOWN_FLAGS));
    }
    if flags & CMD_FLAG_NO_HOLE != 0 && cmd != CMD_WRITE_ZEROES {
        return Err(Invalid::FlagNotForCommand { flag: "NO_HOLE" });
    }
    if flags & CMD_FLAG_DF != 0 {
        if cmd != CMD_READ {
            return Err(Invalid::FlagNotForCommand { flag: "DF" });
        }
        if !limits.structured {
            return Err(Invalid::DfWithoutStructured);
        }
    }
    if flags & CMD_FLAG_REQ_ONE != 0 && cmd != CMD_BLOCK_STATUS {
        return Err(Invalid::FlagNotForCommand { flag: "REQ_ONE" });
    }
    if cmd == CMD_BLOCK_STATUS && !(limits.structured && limits.base_allocation) {
        return Err(Invalid::BlockStatusNotNegotiated);
    }
    if cmd == CMD_FLUSH {
        return Ok(Request::Flush);
    }

    let block = u64::from(limits.block.max(1));
    if !offset.is_multiple_of(block) || !u64::from(len).is_multiple_of(block) {
        return Err(Invalid::Misaligned {
            offset,
            len,
            block: limits.block,
        });
    }
    if (cmd == CMD_READ || cmd == CMD_WRITE) && len > limits.max_io {
        return Err(Invalid::TooLarge {
            len,
            max: limits.max_io,
        });
    }

    let fua = flags & CMD_FLAG_FUA != 0;
    Ok(match cmd {
        CMD_READ => Request::Read {
            offset,
            len,
            df: flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Request::Write { offset, len, fua },
        CMD_TRIM => Request::Trim { offset, len, fua },
        CMD_WRITE_ZEROES => Request::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: flags & CMD_FLAG_NO_HOLE != 0,
        },
        _ => Request::BlockStatus {
            offset,
            len,
            req_one: flags & CMD_FLAG_REQ_ONE != 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        size: 1 << 20,
        block: 4096,
        max_io: 64 << 10,
        structured: true,
        base_allocation: true,
    };

    fn raw(cmd: u16, flags: u16, offset: u64, len: u32) -> RawRequest {
        RawRequest {
            flags,
            cmd,
            cookie: 7,
            offset,
            len,
        }
    }

    fn check(r: RawRequest) -> Result<Request, Invalid> {
        validate(&r, &LIMITS)
    }

    #[test]
    fn decode_reads_big_endian_fields() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&[0x25, 0x60, 0x95, 0x13]);
        b[4..6].copy_from_slice(&[0, 1]);
        b[6..8].copy_from_slice(&[0, 1]);
        b[8..16].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        b[16..24].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0]);
        b[24..28].copy_from_slice(&[0, 0, 0x10, 0]);
        let r = RawRequest::decode(&b).unwrap();
        assert_eq!(
            r,
            RawRequest {
                flags: CMD_FLAG_FUA,
                cmd: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                len: 4096,
            }
        );
        assert_eq!(r.encode(), b);
    }

    #[test]
    fn decode_refuses_bad_magic() {
        let mut b = raw(CMD_READ, 0, 0, 4096).encode();
        b[0] ^= 1;
        assert_eq!(RawRequest::decode(&b), Err(0x2460_9513));
    }

    #[test]
    fn valid_requests_become_typed() {
        assert_eq!(
            check(raw(CMD_READ, CMD_FLAG_DF, 4096, 8192)),
            Ok(Request::Read {
                offset: 4096,
                len: 8192,
                df: true
            })
        );
        assert_eq!(
            check(raw(CMD_WRITE, CMD_FLAG_FUA, 0, 4096)),
            Ok(Request::Write {
                offset: 0,
                len: 4096,
                fua: true
            })
        );
        assert_eq!(
            check(raw(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20)),
            Ok(Request::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: false,
                no_hole: true
            })
        );
        assert_eq!(check(raw(CMD_FLUSH, 0, 0, 0)), Ok(Request::Flush));
        assert_eq!(check(raw(CMD_DISC, 0xffff, 9, 9)), Ok(Request::Disc));
        assert_eq!(
            check(raw(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20)),
            Ok(Request::BlockStatus {
                offset: 0,
                len: 1 << 20,
                req_one: true
            })
        );
        // FUA is accepted (and ignored) on any command, as the spec requires.
        assert!(check(raw(CMD_READ, CMD_FLAG_FUA, 0, 4096)).is_ok());
    }

    #[test]
    fn range_checks_use_checked_add() {
        let e = check(raw(CMD_READ, 0, u64::MAX - 4095, 8192)).unwrap_err();
        assert!(matches!(e, Invalid::OutOfRange { .. }));
        let e = check(raw(CMD_WRITE, 0, 1 << 20, 4096)).unwrap_err();
        assert!(matches!(e, Invalid::OutOfRange { .. }));
        assert!(check(raw(CMD_WRITE, 0, (1 << 20) - 4096, 4096)).is_ok());
        assert_eq!(check(raw(CMD_TRIM, 0, 0, 0)), Err(Invalid::ZeroLength));
    }

    #[test]
    fn alignment_and_size_limits() {
        assert!(matches!(
            check(raw(CMD_WRITE, 0, 512, 512)),
            Err(Invalid::Misaligned { .. })
        ));
        assert!(matches!(
            check(raw(CMD_BLOCK_STATUS, 0, 0, 100)),
            Err(Invalid::Misaligned { .. })
        ));
        assert_eq!(
            check(raw(CMD_READ, 0, 0, 128 << 10)),
            Err(Invalid::TooLarge {
                len: 128 << 10,
                max: 64 << 10
            })
        );
        // The maximum applies to data-carrying commands only (as nbdkit).
        assert!(check(raw(CMD_TRIM, 0, 0, 128 << 10)).is_ok());
        assert!(check(raw(CMD_WRITE_ZEROES, 0, 0, 128 << 10)).is_ok());
    }

    #[test]
    fn flag_rules() {
        assert_eq!(
            check(raw(CMD_READ, 1 << 9, 0, 4096)),
            Err(Invalid::UnknownFlags(1 << 9))
        );
        assert!(matches!(
            check(raw(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 4096)),
            Err(Invalid::FlagNotForCommand { flag: "NO_HOLE" })
        ));
        assert!(matches!(
            check(raw(CMD_WRITE, CMD_FLAG_DF, 0, 4096)),
            Err(Invalid::FlagNotForCommand { flag: "DF" })
        ));
        assert!(matches!(
            check(raw(CMD_READ, CMD_FLAG_REQ_ONE, 0, 4096)),
            Err(Invalid::FlagNotForCommand { flag: "REQ_ONE" })
        ));
        let simple = Limits {
            structured: false,
            base_allocation: false,
            ..LIMITS
        };
        assert_eq!(
            validate(&raw(CMD_READ, CMD_FLAG_DF, 0, 4096), &simple),
            Err(Invalid::DfWithoutStructured)
        );
        assert_eq!(
            validate(&raw(CMD_BLOCK_STATUS, 0, 0, 4096), &simple),
            Err(Invalid::BlockStatusNotNegotiated)
        );
        assert_eq!(
            check(raw(CMD_FLUSH, 0, 4096, 0)),
            Err(Invalid::FlushWithRange)
        );
        assert_eq!(check(raw(5, 0, 0, 4096)), Err(Invalid::UnknownCommand(5)));
    }

    #[test]
    fn errno_table() {
        let oor = Failure::Invalid(Invalid::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        });
        assert_eq!(errno(&oor, CMD_WRITE, 0), Errno::NoSpc);
        assert_eq!(errno(&oor, CMD_WRITE_ZEROES, 0), Errno::NoSpc);
        assert_eq!(errno(&oor, CMD_READ, 0), Errno::Inval);
        assert_eq!(errno(&oor, CMD_TRIM, 0), Errno::Inval);
        assert_eq!(errno(&oor, CMD_BLOCK_STATUS, 0), Errno::Inval);
        let dev_oor = Failure::Device(DevError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        });
        assert_eq!(errno(&dev_oor, CMD_WRITE, 0), Errno::NoSpc);
        assert_eq!(errno(&dev_oor, CMD_READ, 0), Errno::Inval);
        let mis = Failure::Device(DevError::Misaligned { offset: 1, len: 1 });
        assert_eq!(errno(&mis, CMD_WRITE, 0), Errno::Inval);
        assert_eq!(
            errno(&Failure::Device(DevError::NoSpace), CMD_WRITE, 0),
            Errno::NoSpc
        );
        let big = Failure::Device(DevError::TooLarge { len: 2, max: 1 });
        assert_eq!(errno(&big, CMD_READ, 0), Errno::Inval);
        assert_eq!(errno(&big, CMD_READ, CMD_FLAG_DF), Errno::Overflow);
        let io = Failure::Device(DevError::Io("disk".into()));
        assert_eq!(errno(&io, CMD_FLUSH, 0), Errno::Io);
        let inval = Failure::Invalid(Invalid::Misaligned {
            offset: 1,
            len: 1,
            block: 4096,
        });
        assert_eq!(errno(&inval, CMD_WRITE, 0), Errno::Inval);
    }
}
