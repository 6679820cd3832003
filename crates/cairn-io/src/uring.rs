//! The io_uring backend: one ring, one batch at a time.
//!
//! Every op of a batch becomes one SQE whose user_data is the op's index. The batch is
//! submitted with one `io_uring_enter` that also waits for a first completion; a short
//! transfer is resubmitted for its remainder as soon as it completes, while the rest of the
//! batch is still in flight (a Send must not wait for a Recv of the same batch). `run`
//! returns only when no SQE of the batch is in flight, so the borrowed buffers outlive
//! every kernel access.

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
        let mut in_flight = vec![false; n];
        let mut outstanding = 0usize;
        loop {
            // Push every unfinished op that is not in flight (first tries and the remainders
            // of short transfers) while the queue has room.
            {
                let mut sq = self.ring.submission();
                for (i, op) in ops.iter_mut().enumerate() {
                    if results[i].is_some() || in_flight[i] {
                        continue;
                    }
                    if sq.is_full() {
                        break;
                    }
                    let sqe = build_sqe(op, done[i]).user_data(i as u64);
                    // SAFETY: the SQE points into `op`'s buffer at `done[i]..`, which stays
                    // borrowed (and so alive and unmoved) until `run` returns, and `run` does
                    // not return while any SQE is in flight (`outstanding` > 0).
                    unsafe { sq.push(&sqe) }.expect("checked is_full above");
                    in_flight[i] = true;
                    outstanding += 1;
                }
            }
            if outstanding == 0 {
                break;
            }
            // Wait for at least one completion, not all: a short Send must be resubmitted
            // while a Recv of the same batch is still waiting for the peer.
            self.wait_some(|i, res| {
                if i >= n || !in_flight[i] {
                    return;
                }
                in_flight[i] = false;
                outstanding -= 1;
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

    /// Submits what is queued, waits for at least one completion and reaps every completion
    /// available, calling `on_cqe` for each. If the kernel call fails for a reason that
    /// cannot be retried while SQEs are in flight, the process aborts rather than let the
    /// kernel write into freed memory.
    fn wait_some(&mut self, mut on_cqe: impl FnMut(usize, i32)) {
        loop {
            match self.ring.submit_and_wait(1) {
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
            let mut reaped = 0;
            for cqe in self.ring.completion() {
                let idx = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
                on_cqe(idx, cqe.result());
                reaped += 1;
            }
            if reaped > 0 {
                return;
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
