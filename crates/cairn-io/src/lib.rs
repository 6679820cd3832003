//! Batched file and socket I/O for Cairn's hot paths.
//!
//! An [`Io`] belongs to one thread. A caller hands it a batch of [`Op`]s and gets back when
//! every op of the batch has finished. On io_uring the batch's reads, fdatasyncs, sends and
//! receives go to the kernel in one `io_uring_enter` and may run concurrently and complete in
//! any order; its buffered file writes run inline with `pwrite` first (measured faster than
//! the ring's worker-thread hand-off for page-cache writes). The portable backend runs every
//! op one after another, in the order given, with plain syscalls.
//!
//! Guarantees:
//! - [`Io::run`] completes short reads, writes and sends by resubmitting the remainder, so
//!   an `Ok` means every byte moved. A `Recv` completes with whatever arrived (0 = peer closed).
//! - Buffers are borrowed for the whole call and the call does not return while the kernel
//!   may still touch them, whatever error happens.
//!
//! Assumptions the caller keeps:
//! - ops in one batch do not overlap (two writes to the same bytes, a read of bytes another op
//!   writes): io_uring gives them no order. Split such ops into successive batches.
//! - in one batch, a `Send` that the peer waits for is placed before a `Recv` of its answer,
//!   because the portable backend runs ops in order.

use std::io;
use std::os::fd::RawFd;

mod uring;

/// Which kernel interface carries the I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring, one ring per [`Io`].
    Uring,
    /// Plain positional syscalls (`pread`, `pwrite`, `fdatasync`, `send`, `recv`).
    Portable,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Uring => "uring",
            Backend::Portable => "portable",
        })
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring when the kernel allows it, else portable.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// Portable syscalls even when io_uring works.
    Portable,
}

impl std::str::FromStr for EngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(EngineChoice::Uring),
            "portable" => Ok(EngineChoice::Portable),
            other => Err(format!(
                "unknown I/O engine {other:?} (expected auto, uring or portable)"
            )),
        }
    }
}

/// Errors from setting up an I/O backend.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// io_uring was asked for explicitly and the kernel refused it.
    #[error("io_uring is unavailable: {0}")]
    UringUnavailable(io::Error),
}

/// One operation of a batch.
#[derive(Debug)]
pub enum Op<'a> {
    /// Fill `buf` from `fd` at `offset`; reaching end of file is an `UnexpectedEof` error.
    Read {
        fd: RawFd,
        buf: &'a mut [u8],
        offset: u64,
    },
    /// Write all of `buf` to `fd` at `offset`.
    Write {
        fd: RawFd,
        buf: &'a [u8],
        offset: u64,
    },
    /// `fdatasync(fd)`.
    Fdatasync { fd: RawFd },
    /// Send all of `buf` on a connected socket.
    Send { fd: RawFd, buf: &'a [u8] },
    /// Receive up to `buf.len()` bytes; completes with the count (0 = peer closed).
    Recv { fd: RawFd, buf: &'a mut [u8] },
}

/// A per-thread I/O executor.
pub struct Io {
    inner: Inner,
}

enum Inner {
    Uring(Box<uring::Ring>),
    Portable,
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Io({})", self.backend())
    }
}

impl Io {
    /// Sets up the backend `choice` names. `Auto` falls back to portable when the kernel
    /// refuses io_uring (ENOSYS, EPERM: seccomp profiles, disabled by sysctl).
    pub fn new(choice: EngineChoice) -> Result<Io, IoError> {
        match choice {
            EngineChoice::Portable => Ok(Io {
                inner: Inner::Portable,
            }),
            EngineChoice::Uring => uring::Ring::new()
                .map(|r| Io {
                    inner: Inner::Uring(Box::new(r)),
                })
                .map_err(IoError::UringUnavailable),
            EngineChoice::Auto => match uring::Ring::new() {
                Ok(r) => Ok(Io {
                    inner: Inner::Uring(Box::new(r)),
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable, using portable I/O");
                    Ok(Io {
                        inner: Inner::Portable,
                    })
                }
            },
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Uring(_) => Backend::Uring,
            Inner::Portable => Backend::Portable,
        }
    }

    /// Runs every op of `ops` to completion. Returns one result per op, in the same order:
    /// the bytes moved (all of them, except for `Recv`) or the op's error.
    pub fn run(&mut self, ops: &mut [Op<'_>]) -> Vec<io::Result<usize>> {
        match &mut self.inner {
            Inner::Uring(ring) => {
                // Buffered file writes run inline: the kernel cannot complete them from the
                // ring without handing each to an io-wq worker thread (ext4), which measured
                // about 2x slower per write than pwrite on this thread (bench/README.md).
                // Everything else (reads, fdatasync, sockets) goes through the ring.
                if !ops.iter().any(|op| matches!(op, Op::Write { .. })) {
                    return ring.run(ops);
                }
                let mut results: Vec<Option<io::Result<usize>>> =
                    ops.iter().map(|_| None).collect();
                let mut rest_idx = Vec::new();
                let mut rest: Vec<Op<'_>> = Vec::new();
                for (i, op) in ops.iter_mut().enumerate() {
                    if matches!(op, Op::Write { .. }) {
                        results[i] = Some(portable_op(op));
                    } else {
                        rest_idx.push(i);
                        rest.push(reborrow(op));
                    }
                }
                if !rest.is_empty() {
                    for (i, r) in rest_idx.into_iter().zip(ring.run(&mut rest)) {
                        results[i] = Some(r);
                    }
                }
                results.into_iter().map(|r| r.unwrap_or(Ok(0))).collect()
            }
            Inner::Portable => ops.iter_mut().map(portable_op).collect(),
        }
    }

    /// Runs `ops` and returns the first error, if any (every op still ran to completion).
    pub fn run_all(&mut self, ops: &mut [Op<'_>]) -> io::Result<()> {
        self.run(ops).into_iter().try_for_each(|r| r.map(|_| ()))
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.run_all(&mut [Op::Read { fd, buf, offset }])
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&mut self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
        self.run_all(&mut [Op::Write { fd, buf, offset }])
    }

    /// `fdatasync` on every fd of `fds`, concurrently where the backend can.
    pub fn fdatasync(&mut self, fds: &[RawFd]) -> io::Result<()> {
        let mut ops: Vec<Op<'_>> = fds.iter().map(|&fd| Op::Fdatasync { fd }).collect();
        self.run_all(&mut ops)
    }
}

/// A shorter-lived copy of `op` that borrows its buffer.
fn reborrow<'b>(op: &'b mut Op<'_>) -> Op<'b> {
    match op {
        Op::Read { fd, buf, offset } => Op::Read {
            fd: *fd,
            buf,
            offset: *offset,
        },
        Op::Write { fd, buf, offset } => Op::Write {
            fd: *fd,
            buf,
            offset: *offset,
        },
        Op::Fdatasync { fd } => Op::Fdatasync { fd: *fd },
        Op::Send { fd, buf } => Op::Send { fd: *fd, buf },
        Op::Recv { fd, buf } => Op::Recv { fd: *fd, buf },
    }
}

fn portable_op(op: &mut Op<'_>) -> io::Result<usize> {
    let total = match op {
        Op::Read { buf, .. } | Op::Recv { buf, .. } => buf.len(),
        Op::Write { buf, .. } | Op::Send { buf, .. } => buf.len(),
        Op::Fdatasync { .. } => 0,
    };
    let mut done = 0usize;
    loop {
        // SAFETY: every pointer below is into the op's buffer at `done..`, a live slice
        // borrowed for this whole call, and the length passed is that of the remainder.
        let r = unsafe {
            match op {
                Op::Read { fd, buf, offset } => libc::pread(
                    *fd,
                    buf[done..].as_mut_ptr().cast(),
                    total - done,
                    file_offset(*offset, done)?,
                ),
                Op::Write { fd, buf, offset } => libc::pwrite(
                    *fd,
                    buf[done..].as_ptr().cast(),
                    total - done,
                    file_offset(*offset, done)?,
                ),
                Op::Fdatasync { fd } => libc::fdatasync(*fd) as isize,
                Op::Send { fd, buf } => libc::send(
                    *fd,
                    buf[done..].as_ptr().cast(),
                    total - done,
                    libc::MSG_NOSIGNAL,
                ),
                Op::Recv { fd, buf } => libc::recv(*fd, buf.as_mut_ptr().cast(), total, 0),
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let moved = usize::try_from(r).unwrap_or(0);
        match op {
            Op::Fdatasync { .. } => return Ok(0),
            Op::Recv { .. } => return Ok(moved),
            Op::Read { .. } if moved == 0 && done < total => {
                return Err(io::ErrorKind::UnexpectedEof.into())
            }
            _ if moved == 0 && done < total => return Err(io::ErrorKind::WriteZero.into()),
            _ => {}
        }
        done += moved;
        if done >= total {
            return Ok(done);
        }
    }
}

fn file_offset(offset: u64, done: usize) -> io::Result<libc::off_t> {
    offset
        .checked_add(done as u64)
        .and_then(|o| libc::off_t::try_from(o).ok())
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests;
