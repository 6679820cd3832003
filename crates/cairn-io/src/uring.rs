//! The io_uring backend: one ring, one batch at a time.
//!
//! Every op of a batch becomes one SQE whose user_data is the op's index. The batch is
//! submitted with one `io_uring_enter` that also waits for the completions; short transfers
//! are resubmitted for their remainder in the next round. `run` returns only when no SQE of
//! the batch is in flight, so the borrowed buffers outlive every kernel access.

use std::io;

use io_uring::{opcode, squeue, types, IoUring};

use crate::Op;

/// Submission queue size; a larger batch runs in several rounds.
const RING_ENTRIES: u32 = 256;

pub(crate) struct Ring {
    ring: IoUring,
}

impl Ring {
    pub(crate) fn new() -> io::Result<Ring> {
        let mut ring = IoUring::new(RING_ENTRIES)?;
        // Probe with a NOP: some sandboxes let io_uring_setup through and refuse
        // io_uring_enter, which must also send us to the portable backend.
        let nop = opcode::Nop::new().build().user_data(0);
        // SAFETY: a NOP references no memory.
        unsafe { ring.submission().push(&nop) }
            .map_err(|_| io::Error::other("io_uring submission queue full on a new ring"))?;
        ring.submit_and_wait(1)?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("io_uring NOP did not complete"))?;
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(Ring { ring })
    }

    pub(crate) fn run(&mut self, ops: &mut [Op<'_>]) -> Vec<io::Result<usize>> {
        let n = ops.len();
        let mut done = vec![0usize; n];
        let mut results: Vec<Option<io::Result<usize>>> = (0..n).map(|_| None).collect();
        loop {
            // Push every unfinished op (its remainder) that fits in the queue.
            let mut in_flight = 0usize;
            {
                let mut sq = self.ring.submission();
                for (i, op) in ops.iter_mut().enumerate() {
                    if results[i].is_some() {
                        continue;
                    }
                    if sq.is_full() {
                        break;
                    }
                    let sqe = build_sqe(op, done[i]).user_data(i as u64);
                    // SAFETY: the SQE points into `op`'s buffer at `done[i]..`, which stays
                    // borrowed (and so alive and unmoved) until `run` returns, and `run` does
                    // not return while this SQE is in flight (see `wait_all`).
                    unsafe { sq.push(&sqe) }.expect("checked is_full above");
                    in_flight += 1;
                }
            }
            if in_flight == 0 {
                break;
            }
            self.wait_all(in_flight, |i, res| {
                let remaining = op_len(&ops[i]) - done[i];
                match res {
                    r if r >= 0 => {
                        let moved = usize::try_from(r).unwrap_or(0);
                        match &ops[i] {
                            Op::Fdatasync { .. } => results[i] = Some(Ok(0)),
                            Op::Recv { .. } => results[i] = Some(Ok(moved)),
                            _ if moved == 0 && remaining > 0 => {
                                let kind = if matches!(ops[i], Op::Read { .. }) {
                                    io::ErrorKind::UnexpectedEof
                                } else {
                                    io::ErrorKind::WriteZero
                                };
                                results[i] = Some(Err(io::Error::from(kind)));
                            }
                            _ => {
                                done[i] += moved;
                                if done[i] >= op_len(&ops[i]) {
                                    results[i] = Some(Ok(done[i]));
                                }
                            }
                        }
                    }
                    r if r == -libc::EINTR || r == -libc::EAGAIN => {}
                    r => results[i] = Some(Err(io::Error::from_raw_os_error(-r))),
                }
            });
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(0))).collect()
    }

    /// Submits what is queued and reaps exactly `count` completions, calling `on_cqe` for
    /// each. Never returns with a completion outstanding: if the kernel call fails for a
    /// reason that leaves SQEs in flight and cannot be retried, the process aborts rather than
    /// let the kernel write into freed memory.
    fn wait_all(&mut self, count: usize, mut on_cqe: impl FnMut(usize, i32)) {
        let mut reaped = 0;
        while reaped < count {
            match self.ring.submit_and_wait(count - reaped) {
                Ok(_) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EINTR)
                        || e.raw_os_error() == Some(libc::EBUSY)
                        || e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed with I/O in flight");
                    std::process::abort();
                }
            }
            for cqe in self.ring.completion() {
                let idx = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
                on_cqe(idx, cqe.result());
                reaped += 1;
            }
        }
    }
}

fn op_len(op: &Op<'_>) -> usize {
    match op {
        Op::Read { buf, .. } | Op::Recv { buf, .. } => buf.len(),
        Op::Write { buf, .. } | Op::Send { buf, .. } => buf.len(),
        Op::Fdatasync { .. } => 0,
    }
}

/// Clamps a remaining length to what one SQE can carry; the rest goes in a later round.
fn sqe_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn build_sqe(op: &mut Op<'_>, done: usize) -> squeue::Entry {
    match op {
        Op::Read { fd, buf, offset } => {
            let rest = &mut buf[done..];
            opcode::Read::new(types::Fd(*fd), rest.as_mut_ptr(), sqe_len(rest.len()))
                .offset(*offset + done as u64)
                .build()
        }
        Op::Write { fd, buf, offset } => {
            let rest = &buf[done..];
            opcode::Write::new(types::Fd(*fd), rest.as_ptr(), sqe_len(rest.len()))
                .offset(*offset + done as u64)
                .build()
        }
        Op::Fdatasync { fd } => opcode::Fsync::new(types::Fd(*fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Op::Send { fd, buf } => {
            let rest = &buf[done..];
            opcode::Send::new(types::Fd(*fd), rest.as_ptr(), sqe_len(rest.len()))
                .flags(libc::MSG_NOSIGNAL)
                .build()
        }
        Op::Recv { fd, buf } => {
            opcode::Recv::new(types::Fd(*fd), buf.as_mut_ptr(), sqe_len(buf.len())).build()
        }
    }
}
