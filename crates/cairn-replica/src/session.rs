//! One connection's protocol state: which replica it is bound to, at which epoch, and the
//! dispatch of decoded frames to the store, in arrival order.
//!
//! Runs of consecutive Write frames go to the store as one batch (the store keeps their
//! order where they overlap); everything else is applied one frame at a time. Every frame
//! but Hello and Ping needs a Hello first, the connection's epoch still current and the
//! connection not superseded by a takeover Hello of the same replica; a StaleEpoch refusal
//! carries the replica's accepted epoch as its detail. Each frame gets exactly one reply,
//! appended to `out` in arrival order.
//!
//! Fencing is atomic with application: a frame (or a batched run of frames) is checked
//! against the replica's epoch and takeover generation under the same hold of the replica's
//! lock that applies it. A takeover Hello takes that lock too, so a frame being applied when
//! it arrives finishes first, and every later frame of a superseded connection is refused.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use cairn_store::{LayerSel, ReadReq, Store, StoreError, WriteReq};
use cairn_wire::{
    Counters, ErrorKind, Frame, LayerRef, Reply, ReplyBody, ReplyError, Request, SnapshotInfo,
    StatusBody,
};

use crate::{valid_name, Registry, Replica, SharedStore};

pub(crate) struct Session {
    registry: Arc<Registry>,
    bound: Option<Bound>,
    /// Largest frame this side may send or receive: read replies must fit in it.
    max_frame: usize,
}

struct Bound {
    replica: SharedStore,
    epoch: u64,
    /// The replica's takeover generation when this connection attached.
    generation: u64,
}

impl Bound {
    /// May this connection apply `frame` to `r`? Judged under the caller's hold of the
    /// replica's lock, which must also cover the frame's application.
    fn admit(&self, frame: &Frame, r: &Replica) -> Result<(), ReplyError> {
        let current = r.store.epoch();
        if frame.header.epoch != self.epoch {
            return Err(stale(
                current,
                format!(
                    "frame epoch {} differs from the connection's {}",
                    frame.header.epoch, self.epoch
                ),
            ));
        }
        if self.epoch < current {
            return Err(stale(
                current,
                format!("epoch {} was superseded by {current}", self.epoch),
            ));
        }
        if self.generation != r.generation {
            return Err(stale(
                current,
                format!(
                    "connection superseded by a newer attach (takeover) of replica {}/{} \
                     at epoch {current}",
                    r.store.volume(),
                    r.store.replica_id()
                ),
            ));
        }
        Ok(())
    }
}

type Outcome = Result<ReplyBody, ReplyError>;
/// A frame's request, or why it does not decode.
type Decoded = Result<Request, cairn_wire::WireError>;

/// Maps a store error to its wire error kind: the one place this mapping lives.
pub(crate) fn reply_error(e: &StoreError) -> ReplyError {
    let (kind, detail) = match e {
        StoreError::OutOfRange { .. } => (ErrorKind::OutOfRange, 0),
        StoreError::Misaligned { .. } => (ErrorKind::Misaligned, 0),
        StoreError::ChecksumMismatch { offset } => (ErrorKind::ChecksumMismatch, *offset),
        StoreError::Corruption { offset, .. } => (ErrorKind::Corruption, *offset),
        StoreError::NoSpace => (ErrorKind::NoSpace, 0),
        StoreError::AlreadyExists(_) => (ErrorKind::AlreadyExists, 0),
        StoreError::NotFound(_) => (ErrorKind::NotFound, 0),
        StoreError::InvalidArgument(_) => (ErrorKind::InvalidArgument, 0),
        StoreError::BadMeta { .. } | StoreError::Io(_) => (ErrorKind::Io, 0),
    };
    ReplyError::new(kind, detail, e.to_string())
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> ReplyError {
    ReplyError::new(kind, 0, msg)
}

/// A StaleEpoch refusal; its detail is the replica's accepted epoch, the one to beat.
fn stale(accepted: u64, msg: String) -> ReplyError {
    ReplyError::new(ErrorKind::StaleEpoch, accepted, msg)
}

fn layer_sel(l: &LayerRef) -> LayerSel {
    match l {
        LayerRef::Head => LayerSel::Head,
        LayerRef::Snapshot(n) => LayerSel::Snapshot(n.clone()),
        LayerRef::Merged => LayerSel::Merged,
        LayerRef::MergedAt(n) => LayerSel::MergedAt(n.clone()),
    }
}

fn status(s: &Store) -> StatusBody {
    let c = s.counters();
    StatusBody {
        size: s.size(),
        epoch: s.epoch(),
        instance: s.instance(),
        volume: s.volume().to_owned(),
        replica_id: s.replica_id().to_owned(),
        chain: s.chain_names(),
        counters: Counters {
            reads: c.reads,
            writes: c.writes,
            bytes_read: c.bytes_read,
            bytes_written: c.bytes_written,
            flushes: c.flushes,
            errors: c.errors,
            corruptions: c.corruptions,
            dirty_regions: s.dirty_regions().1.len() as u64,
        },
    }
}

fn lock(replica: &Mutex<Replica>) -> MutexGuard<'_, Replica> {
    replica.lock().unwrap_or_else(|p| p.into_inner())
}

fn not_ready() -> ReplyError {
    err(ErrorKind::NotReady, "no Hello on this connection yet")
}

impl Session {
    pub(crate) fn new(registry: Arc<Registry>, max_frame: usize) -> Session {
        Session {
            registry,
            bound: None,
            max_frame,
        }
    }

    /// Refuses a read whose reply frame would not fit in the frame limit, before anything
    /// is allocated for it.
    fn check_read_len(&self, size: u64, offset: u64, len: u32) -> Result<(), ReplyError> {
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > size)
        {
            return Err(ReplyError::new(
                ErrorKind::OutOfRange,
                0,
                format!("read {offset}+{len} is outside the volume ({size} bytes)"),
            ));
        }
        let len = len as usize;
        let reply = cairn_wire::HEADER_LEN + 1 + 4 + 4 * cairn_wire::block_count(len) + len;
        if reply > self.max_frame {
            return Err(ReplyError::new(
                ErrorKind::TooLarge,
                0,
                format!(
                    "a read of {len} bytes needs a {reply}-byte reply; the frame limit is {}",
                    self.max_frame
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a RangeDigests request whose reply frame would not fit in the frame limit
    /// (the store checks the granule and its own limits).
    fn check_digests_len(&self, len: u64, granule: u32) -> Result<(), ReplyError> {
        if granule == 0 {
            return Ok(());
        }
        let count = len.div_ceil(u64::from(granule));
        let reply = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(cairn_wire::DIGEST_LEN))
            .and_then(|n| n.checked_add(cairn_wire::HEADER_LEN + 1 + 4));
        match reply {
            Some(reply) if reply <= self.max_frame => Ok(()),
            _ => Err(ReplyError::new(
                ErrorKind::TooLarge,
                0,
                format!(
                    "{count} digests do not fit in a reply; the frame limit is {}",
                    self.max_frame
                ),
            )),
        }
    }

    /// Applies `frames` in order and appends one reply per frame to `out`. Each frame is
    /// decoded once; runs of consecutive reads or writes go to the store as one batch.
    pub(crate) fn process(&mut self, frames: &[Frame], out: &mut BytesMut) {
        let mut decoded: Vec<Option<Decoded>> =
            frames.iter().map(|f| Some(Request::decode(f))).collect();
        let is_read = |d: &Option<Decoded>| matches!(d, Some(Ok(Request::Read { .. })));
        let is_write = |d: &Option<Decoded>| matches!(d, Some(Ok(Request::Write { .. })));
        let mut i = 0;
        while i < frames.len() {
            let reads = is_read(&decoded[i]);
            if self.bound.is_some() && (reads || is_write(&decoded[i])) {
                let same = |d: &Option<Decoded>| if reads { is_read(d) } else { is_write(d) };
                let mut j = i + 1;
                while j < frames.len() && same(&decoded[j]) {
                    j += 1;
                }
                let run: Vec<(usize, Decoded)> = (i..j)
                    .filter_map(|k| decoded[k].take().map(|d| (k, d)))
                    .collect();
                if reads {
                    self.read_run(frames, run, out);
                } else {
                    self.write_run(frames, run, out);
                }
                i = j;
                continue;
            }
            let outcome = match decoded[i].take() {
                Some(Ok(req)) => self.apply(&frames[i], req),
                Some(Err(e)) => Err(err(ErrorKind::InvalidArgument, format!("bad request: {e}"))),
                None => Err(err(ErrorKind::Io, "request decoded twice")),
            };
            self.reply(&frames[i], outcome, out);
            i += 1;
        }
    }

    fn reply(&self, frame: &Frame, result: Outcome, out: &mut BytesMut) {
        let epoch = self
            .bound
            .as_ref()
            .map_or(frame.header.epoch, |b| lock(&b.replica).store.epoch());
        let op = frame.header.op;
        let reply = Reply {
            request_id: frame.header.request_id,
            epoch,
            op,
            result,
        };
        if let Err(e) = reply.try_encode(out) {
            tracing::error!(error = %e, op, "reply does not encode; sending an error instead");
            Reply {
                request_id: frame.header.request_id,
                epoch,
                op,
                result: Err(err(ErrorKind::Io, format!("reply does not encode: {e}"))),
            }
            .encode(out);
        }
    }

    /// The bound replica, locked, after checking under that same hold that this connection
    /// may still apply `frame`: the caller applies it before letting go of the guard.
    fn current(&self, frame: &Frame) -> Result<MutexGuard<'_, Replica>, ReplyError> {
        let b = self.bound.as_ref().ok_or_else(not_ready)?;
        let r = lock(&b.replica);
        b.admit(frame, &r)?;
        Ok(r)
    }

    /// Attaches this connection to a replica. A takeover Hello also supersedes every other
    /// connection attached to it: it bumps the replica's generation under the lock that
    /// every frame's admission check takes.
    fn hello(
        &mut self,
        frame: &Frame,
        volume: &str,
        replica_id: &str,
        size: u64,
        takeover: bool,
    ) -> Outcome {
        if !valid_name(volume) || !valid_name(replica_id) {
            return Err(err(
                ErrorKind::InvalidArgument,
                "volume and replica id must be 1-128 of [A-Za-z0-9._-], not starting with '.'",
            ));
        }
        let replica = self
            .registry
            .get(volume, replica_id, size)
            .map_err(|e| reply_error(&e))?;
        let epoch = frame.header.epoch;
        let mut r = lock(&replica);
        let accepted = r.store.epoch();
        if epoch < accepted {
            return Err(stale(
                accepted,
                format!("epoch {epoch} is older than the accepted {accepted}"),
            ));
        }
        r.store.set_epoch(epoch).map_err(|e| reply_error(&e))?;
        if takeover {
            r.generation += 1;
        }
        let generation = r.generation;
        let body = status(&r.store);
        drop(r);
        tracing::info!(volume, replica_id, epoch, takeover, "engine attached");
        self.bound = Some(Bound {
            replica,
            epoch,
            generation,
        });
        Ok(ReplyBody::Status(body))
    }

    fn apply(&mut self, frame: &Frame, req: Request) -> Outcome {
        if let Request::Hello {
            volume,
            replica_id,
            create_size,
            takeover,
        } = &req
        {
            return self.hello(frame, volume, replica_id, *create_size, *takeover);
        }
        if matches!(req, Request::Ping) {
            return Ok(ReplyBody::Empty);
        }
        let mut guard = self.current(frame)?;
        let s = &mut guard.store;
        let e = |e: StoreError| reply_error(&e);
        match req {
            Request::Hello { .. } | Request::Ping | Request::Write { .. } => Err(err(
                ErrorKind::InvalidArgument,
                "request routed to the wrong handler",
            )),
            Request::Read { offset, len } => {
                self.check_read_len(s.size(), offset, len)?;
                read(s, &LayerSel::Merged, offset, len)
            }
            Request::ReadLayer { layer, offset, len } => {
                self.check_read_len(s.size(), offset, len)?;
                read(s, &layer_sel(&layer), offset, len)
            }
            Request::WriteZeroes {
                offset,
                len,
                fua,
                no_hole,
            } => {
                s.write_zeroes(offset, len, no_hole).map_err(e)?;
                if fua {
                    s.flush().map_err(e)?;
                }
                Ok(ReplyBody::Empty)
            }
            Request::Trim { offset, len, fua } => {
                s.trim(offset, len).map_err(e)?;
                if fua {
                    s.flush().map_err(e)?;
                }
                Ok(ReplyBody::Empty)
            }
            Request::Flush => s.flush().map(|()| ReplyBody::Empty).map_err(e),
            Request::SnapshotCreate {
                name,
                created_unix_ms,
                labels,
            } => s
                .snapshot_create(&name, created_unix_ms, labels)
                .map(|()| ReplyBody::Empty)
                .map_err(e),
            Request::SnapshotDelete { name } => s
                .snapshot_delete(&name)
                .map(|()| ReplyBody::Empty)
                .map_err(e),
            Request::SnapshotRevert { name } => s
                .snapshot_revert(&name)
                .map(|()| ReplyBody::Empty)
                .map_err(e),
            Request::SnapshotList => Ok(ReplyBody::Snapshots(
                s.snapshot_list()
                    .into_iter()
                    .map(|i| SnapshotInfo {
                        name: i.name,
                        parent: i.parent,
                        created_unix_ms: i.created_unix_ms,
                        allocated_bytes: i.allocated_bytes,
                        labels: i.labels,
                    })
                    .collect(),
            )),
            Request::Grow { new_size } => s.grow(new_size).map(|()| ReplyBody::Empty).map_err(e),
            Request::Status => Ok(ReplyBody::Status(status(s))),
            Request::ListExtents { layer, offset, len } => s
                .extents(&layer_sel(&layer), offset, len)
                .map(ReplyBody::Extents)
                .map_err(e),
            Request::Digest => {
                let size = s.size();
                s.digest()
                    .map(|digest| ReplyBody::Digest { digest, size })
                    .map_err(e)
            }
            Request::DirtyRegions => {
                let (region_size, regions) = s.dirty_regions();
                Ok(ReplyBody::DirtyRegions {
                    region_size,
                    regions,
                })
            }
            Request::Unmap { offset, len } => {
                s.unmap(offset, len).map(|()| ReplyBody::Empty).map_err(e)
            }
            Request::RangeDigests {
                layer,
                offset,
                len,
                granule,
            } => {
                self.check_digests_len(len, granule)?;
                s.range_digests(&layer_sel(&layer), offset, len, granule)
                    .map(ReplyBody::RangeDigests)
                    .map_err(e)
            }
            Request::Recreate => {
                s.recreate().map_err(e)?;
                Ok(ReplyBody::Status(status(s)))
            }
        }
    }

    /// Applies a run of Read frames as one store batch, so the disk sees them concurrently.
    /// The run is admitted and read under one hold of the replica's lock.
    fn read_run(&self, frames: &[Frame], run: Vec<(usize, Decoded)>, out: &mut BytesMut) {
        let mut outcomes: Vec<Option<Outcome>> = run.iter().map(|_| None).collect();
        match self.bound.as_ref() {
            None => outcomes.fill_with(|| Some(Err(not_ready()))),
            Some(b) => {
                let mut guard = lock(&b.replica);
                let mut bufs: Vec<(usize, u64, Vec<u8>)> = Vec::new();
                for (k, (i, d)) in run.iter().enumerate() {
                    let Ok(Request::Read { offset, len }) = d else {
                        continue;
                    };
                    let (offset, len) = (*offset, *len);
                    let admitted = b
                        .admit(&frames[*i], &guard)
                        .and_then(|()| self.check_read_len(guard.store.size(), offset, len));
                    match admitted {
                        Ok(()) => bufs.push((k, offset, vec![0u8; len as usize])),
                        Err(e) => outcomes[k] = Some(Err(e)),
                    }
                }
                if !bufs.is_empty() {
                    let mut reqs: Vec<ReadReq<'_>> = bufs
                        .iter_mut()
                        .map(|(_, offset, buf)| ReadReq {
                            offset: *offset,
                            buf,
                        })
                        .collect();
                    let results = guard.store.read_batch(&mut reqs);
                    drop(reqs);
                    for ((k, _, buf), r) in bufs.into_iter().zip(results) {
                        outcomes[k] = Some(match r {
                            Ok(crcs) => Ok(ReplyBody::Data {
                                crcs,
                                data: bytes::Bytes::from(buf),
                            }),
                            Err(e) => Err(reply_error(&e)),
                        });
                    }
                }
            }
        }
        for ((i, _), o) in run.iter().zip(outcomes) {
            let o = o.unwrap_or_else(|| Err(err(ErrorKind::Io, "read not applied")));
            self.reply(&frames[*i], o, out);
        }
    }

    /// Applies a run of Write frames as one store batch; FUA writes are followed by one
    /// flush before any of the run's replies go out. The run is admitted, written and
    /// flushed under one hold of the replica's lock, so a takeover Hello lands either
    /// before the whole run (which is then refused) or after it.
    fn write_run(&self, frames: &[Frame], run: Vec<(usize, Decoded)>, out: &mut BytesMut) {
        let mut outcomes: Vec<Option<Outcome>> = run.iter().map(|_| None).collect();
        match self.bound.as_ref() {
            None => outcomes.fill_with(|| Some(Err(not_ready()))),
            Some(b) => {
                let mut guard = lock(&b.replica);
                let mut reqs = Vec::new();
                let mut idx = Vec::new();
                let mut any_fua = false;
                for (k, (i, d)) in run.iter().enumerate() {
                    let Ok(Request::Write {
                        offset,
                        fua,
                        crcs,
                        data,
                    }) = d
                    else {
                        continue;
                    };
                    match b.admit(&frames[*i], &guard) {
                        Ok(()) => {
                            any_fua |= *fua;
                            reqs.push(WriteReq {
                                offset: *offset,
                                data,
                                crcs,
                            });
                            idx.push(k);
                        }
                        Err(e) => outcomes[k] = Some(Err(e)),
                    }
                }
                if !reqs.is_empty() {
                    let s = &mut guard.store;
                    let results = s.write_batch(&reqs);
                    let flushed = if any_fua && results.iter().any(Result::is_ok) {
                        s.flush().map_err(|e| reply_error(&e))
                    } else {
                        Ok(())
                    };
                    for (k, r) in idx.iter().zip(results) {
                        let fua = matches!(run[*k].1, Ok(Request::Write { fua: true, .. }));
                        outcomes[*k] = Some(match (r, &flushed) {
                            (Err(e), _) => Err(reply_error(&e)),
                            (Ok(()), Err(fe)) if fua => Err(fe.clone()),
                            (Ok(()), _) => Ok(ReplyBody::Empty),
                        });
                    }
                }
            }
        }
        for ((i, _), o) in run.iter().zip(outcomes) {
            let o = o.unwrap_or_else(|| Err(err(ErrorKind::Io, "write not applied")));
            self.reply(&frames[*i], o, out);
        }
    }
}

fn read(s: &mut Store, sel: &LayerSel, offset: u64, len: u32) -> Outcome {
    let mut buf = vec![0u8; len as usize];
    let crcs = match sel {
        LayerSel::Merged => s.read(offset, &mut buf),
        other => s.read_layer(other, offset, &mut buf),
    }
    .map_err(|e| reply_error(&e))?;
    Ok(ReplyBody::Data {
        crcs,
        data: bytes::Bytes::from(buf),
    })
}
