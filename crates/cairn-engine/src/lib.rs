//! cairn-engine: one volume's engine. It connects to the volume's replicas, fans every write,
//! write-zeroes, trim and flush out to all live replicas, reads from one, and takes failed
//! replicas out of the set. Frontends use it through [`cairn_blockdev::BlockDevice`].
//!
//! Guarantees:
//! - Overlapping requests reach every replica in one order: submission to all replicas
//!   happens under one lock, into per-replica FIFO links, and replicas apply frames in order.
//!   So replicas end byte-identical whatever the clients do.
//! - A request is answered when every replica it went to answered, failed or timed out
//!   (`io_timeout`); it succeeds when at least one RW replica took it. A replica that fails
//!   or times out goes to ERR, and the new membership is persisted (the `on_change` hook)
//!   *before* any request it missed is acknowledged, so a restarted engine never serves it.
//! - Reads go to one RW replica and fall over to the next on error; data whose block CRCs do
//!   not check out (on disk or on the wire) is never returned. A replica that reports a
//!   corrupt block gets the good data written back (read repair).
//! - With no RW replica left, requests fail at once with an I/O error.
//!
//! The decisions are in [`set`] (no I/O); this file carries them out.

mod link;
pub mod set;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cairn_blockdev::{check_range, BlockDevice, DevError};
use cairn_wire::{ErrorKind, LayerRef, ReplyBody, Request};
use serde::Serialize;

use link::Link;
pub use link::LinkError;
pub use set::{Fanout, Mode, Outcome, ReplicaSet};

/// Bytes of the volume one extent listing covers: at most 65,536 extents (1 MiB) per reply.
const EXTENT_SLICE: u64 = 256 << 20;

/// One replica of the volume.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    pub id: String,
    pub addr: SocketAddr,
    /// Mode it starts in; `Err` replicas are not contacted.
    pub mode: Mode,
}

/// Called with every replica's (id, mode) when membership changes; must persist it durably.
pub type MembershipHook = Arc<dyn Fn(Vec<(String, Mode)>) -> std::io::Result<()> + Send + Sync>;

/// How an engine runs.
#[derive(Clone)]
pub struct EngineConfig {
    pub volume: String,
    pub size: u64,
    /// This engine's epoch: higher than any earlier engine's for the volume.
    pub epoch: u64,
    pub replicas: Vec<ReplicaSpec>,
    /// How long a replica may take to answer one request before it is failed.
    pub io_timeout: Duration,
    /// Persists membership changes.
    pub on_change: MembershipHook,
}

/// Per-replica counters and state, as shown by status.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    pub id: String,
    pub addr: String,
    pub mode: Mode,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub corrupt_reads: u64,
    pub last_error: Option<String>,
}

/// The volume as status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    pub volume: String,
    pub size: u64,
    pub epoch: u64,
    pub replicas: Vec<ReplicaStatus>,
    pub read_repairs: u64,
    /// Regions copied from one replica to the others at start (after an engine crash).
    pub resynced_regions: u64,
}

#[derive(Default)]
struct Stats {
    reads: AtomicU64,
    writes: AtomicU64,
    errors: AtomicU64,
    corrupt_reads: AtomicU64,
}

struct Slot {
    spec: ReplicaSpec,
    link: Mutex<Option<Arc<Link>>>,
    stats: Stats,
    last_error: Mutex<Option<String>>,
}

/// One volume's engine. Cheap to clone handles via `Arc`.
pub struct Engine {
    cfg: EngineConfig,
    slots: Vec<Slot>,
    set: Mutex<ReplicaSet>,
    /// Held while a request is queued to every target, so overlapping requests keep one
    /// order on all replicas. Never held across a wait for replies, except by read repair.
    submit: tokio::sync::Mutex<()>,
    read_repairs: AtomicU64,
    /// Dirty regions copied between replicas at start.
    resynced: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn dev_error(e: &LinkError) -> DevError {
    match e {
        LinkError::Remote(r) => match r.kind {
            ErrorKind::NoSpace => DevError::NoSpace,
            ErrorKind::OutOfRange => DevError::OutOfRange {
                offset: 0,
                len: 0,
                size: 0,
            },
            _ => DevError::Io(r.to_string()),
        },
        other => DevError::Io(other.to_string()),
    }
}

impl Engine {
    /// Connects to every replica not in `Err` and attaches at the config's epoch. Replicas
    /// that cannot be reached or refuse (stale epoch, wrong size) start in `Err`.
    pub async fn start(cfg: EngineConfig) -> Arc<Engine> {
        let mut slots = Vec::new();
        let mut modes = Vec::new();
        for spec in &cfg.replicas {
            let slot = Slot {
                spec: spec.clone(),
                link: Mutex::new(None),
                stats: Stats::default(),
                last_error: Mutex::new(None),
            };
            let mut mode = spec.mode;
            if mode != Mode::Err {
                let attached = tokio::time::timeout(
                    cfg.io_timeout,
                    Link::connect(spec.addr, &cfg.volume, &spec.id, cfg.size, cfg.epoch),
                )
                .await
                .unwrap_or(Err(LinkError::Timeout));
                match attached {
                    Ok((link, status)) if status.size == cfg.size => {
                        *lock(&slot.link) = Some(Arc::new(link));
                    }
                    Ok((_, status)) => {
                        *lock(&slot.last_error) = Some(format!(
                            "replica has size {}, volume has {}",
                            status.size, cfg.size
                        ));
                        mode = Mode::Err;
                    }
                    Err(e) => {
                        tracing::warn!(replica = %spec.id, addr = %spec.addr, error = %e, "replica unavailable at start");
                        *lock(&slot.last_error) = Some(e.to_string());
                        mode = Mode::Err;
                    }
                }
            }
            modes.push(mode);
            slots.push(slot);
        }
        let changed = modes.iter().zip(&cfg.replicas).any(|(m, s)| *m != s.mode);
        let engine = Arc::new(Engine {
            set: Mutex::new(ReplicaSet::new(modes, None)),
            slots,
            submit: tokio::sync::Mutex::new(()),
            read_repairs: AtomicU64::new(0),
            resynced: AtomicU64::new(0),
            cfg,
        });
        if changed {
            engine.persist().await;
        }
        // A source that fails mid-resync is out; start over from the next RW replica.
        while engine.resync_dirty().await {}
        engine
    }

    /// After a restart, makes every RW replica equal to the first one in every region some
    /// replica's dirty-region log marks: only there can writes that were in flight when the
    /// previous engine died have reached some replicas and not others. Runs before the
    /// volume is served. A replica that fails during it goes to ERR. Returns true when the
    /// source failed, so the caller must run it again with the next source.
    async fn resync_dirty(&self) -> bool {
        let rw: Vec<usize> = {
            let set = lock(&self.set);
            (0..self.slots.len())
                .filter(|&i| set.mode(i) == Mode::Rw)
                .collect()
        };
        let Some((&source, targets)) = rw.split_first() else {
            return false;
        };
        if targets.is_empty() {
            return false;
        }
        let mut regions = std::collections::BTreeSet::new();
        let mut region_size = 0;
        for &i in &rw {
            match self.answer(self.send(i, Request::DirtyRegions)).await {
                Ok(ReplyBody::DirtyRegions {
                    region_size: rs,
                    regions: r,
                }) => {
                    region_size = rs;
                    regions.extend(r);
                }
                Ok(other) => {
                    let e = LinkError::Closed(format!("unexpected reply {other:?}"));
                    self.fail(i, &e).await;
                }
                Err(e) => self.fail(i, &e).await,
            }
        }
        if regions.is_empty() || region_size == 0 {
            return false;
        }
        tracing::info!(regions = regions.len(), source = %self.slots[source].spec.id, "resyncing dirty regions after restart");
        let _g = self.submit.lock().await;
        for r in regions {
            let offset = r * region_size;
            if offset >= self.cfg.size {
                continue;
            }
            let len = region_size.min(self.cfg.size - offset);
            match self.copy_region(source, targets, offset, len).await {
                Ok(()) => {
                    self.resynced.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // Without the source's copy the targets cannot be trusted to match it.
                    tracing::error!(error = %e, offset, "resync source failed");
                    self.fail(source, &e).await;
                    return true;
                }
            }
        }
        false
    }

    /// Copies `offset..offset+len` of replica `source` over every replica in `targets`:
    /// the targets' range is discarded, then the source's allocated extents written.
    async fn copy_region(
        &self,
        source: usize,
        targets: &[usize],
        offset: u64,
        len: u64,
    ) -> Result<(), LinkError> {
        let extents = match self
            .answer(self.send(
                source,
                Request::ListExtents {
                    layer: LayerRef::Merged,
                    offset,
                    len,
                },
            ))
            .await?
        {
            ReplyBody::Extents(e) => e,
            other => return Err(LinkError::Closed(format!("unexpected reply {other:?}"))),
        };
        let mut writes = vec![Request::Trim {
            offset,
            len,
            fua: false,
        }];
        for (o, l) in extents {
            let l32 = u32::try_from(l).map_err(|_| LinkError::Closed("extent too large".into()))?;
            match self
                .answer(self.send(
                    source,
                    Request::Read {
                        offset: o,
                        len: l32,
                    },
                ))
                .await?
            {
                ReplyBody::Data { crcs, data }
                    if cairn_wire::first_bad_block(&data, &crcs).is_none() =>
                {
                    writes.push(Request::write(o, false, data));
                }
                _ => return Err(LinkError::Closed("bad read from the resync source".into())),
            }
        }
        for &t in targets {
            if lock(&self.set).mode(t) != Mode::Rw {
                continue;
            }
            let futs: Vec<_> = writes.iter().map(|w| self.send(t, w.clone())).collect();
            for f in futs {
                if let Err(e) = self.answer(f).await {
                    self.fail(t, &e).await;
                    break;
                }
            }
        }
        Ok(())
    }

    pub fn status(&self) -> VolumeStatus {
        let set = lock(&self.set).clone();
        VolumeStatus {
            volume: self.cfg.volume.clone(),
            size: self.cfg.size,
            epoch: self.cfg.epoch,
            replicas: self
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| ReplicaStatus {
                    id: s.spec.id.clone(),
                    addr: s.spec.addr.to_string(),
                    mode: set.mode(i),
                    reads: s.stats.reads.load(Ordering::Relaxed),
                    writes: s.stats.writes.load(Ordering::Relaxed),
                    errors: s.stats.errors.load(Ordering::Relaxed),
                    corrupt_reads: s.stats.corrupt_reads.load(Ordering::Relaxed),
                    last_error: lock(&s.last_error).clone(),
                })
                .collect(),
            read_repairs: self.read_repairs.load(Ordering::Relaxed),
            resynced_regions: self.resynced.load(Ordering::Relaxed),
        }
    }

    /// Content digest of every RW replica, asked after every write submitted before this
    /// call: `(replica id, Ok((hex digest, size)) or error)`.
    pub async fn digests(&self) -> Vec<(String, Result<(String, u64), String>)> {
        let futs = {
            let _g = self.submit.lock().await;
            let targets: Vec<usize> = {
                let set = lock(&self.set);
                (0..self.slots.len())
                    .filter(|&i| set.mode(i) == Mode::Rw)
                    .collect()
            };
            targets
                .into_iter()
                .map(|i| (i, self.send(i, Request::Digest)))
                .collect::<Vec<_>>()
        };
        let mut out = Vec::new();
        for (i, f) in futs {
            // Digests read the whole volume: allow far longer than one I/O.
            let r = match tokio::time::timeout(self.cfg.io_timeout * 100, f).await {
                Ok(Ok(ReplyBody::Digest { digest, size })) => Ok((hex::encode(digest), size)),
                Ok(Ok(other)) => Err(format!("unexpected reply {other:?}")),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_owned()),
            };
            out.push((self.slots[i].spec.id.clone(), r));
        }
        out
    }

    /// Queues `req` on replica `i`'s link (FIFO).
    fn send(
        &self,
        i: usize,
        req: Request,
    ) -> impl std::future::Future<Output = Result<ReplyBody, LinkError>> + Send + 'static {
        let link = lock(&self.slots[i].link).clone();
        let fut = link.map(|l| l.submit(req));
        async move {
            match fut {
                Some(f) => f.await,
                None => Err(LinkError::Closed("replica is out of the set".into())),
            }
        }
    }

    /// Waits for a reply within the I/O timeout.
    async fn answer(
        &self,
        f: impl std::future::Future<Output = Result<ReplyBody, LinkError>>,
    ) -> Result<ReplyBody, LinkError> {
        tokio::time::timeout(self.cfg.io_timeout, f)
            .await
            .unwrap_or(Err(LinkError::Timeout))
    }

    /// Takes replica `i` out of the set, closes its link and persists the membership.
    async fn fail(&self, i: usize, why: &LinkError) {
        let (changed, was_last) = {
            let mut set = lock(&self.set);
            let was_rw = set.mode(i) == Mode::Rw;
            let changed = set.fail(i);
            (changed, was_rw && !set.has_rw())
        };
        self.slots[i].stats.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.slots[i].last_error) = Some(why.to_string());
        if changed {
            tracing::error!(replica = %self.slots[i].spec.id, error = %why, "replica failed; now ERR");
            let link = lock(&self.slots[i].link).take();
            drop(link);
            self.persist_keeping(was_last.then_some(i)).await;
        }
    }

    async fn persist(&self) {
        self.persist_keeping(None).await;
    }

    /// Persists the membership. `last` is a replica that failed while being the last RW
    /// one: it is recorded as RW all the same, since it holds every acknowledged write and
    /// a restarted engine must be able to serve from it.
    async fn persist_keeping(&self, last: Option<usize>) {
        let members: Vec<(String, Mode)> = {
            let set = lock(&self.set);
            self.slots
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mode = if Some(i) == last {
                        Mode::Rw
                    } else {
                        set.mode(i)
                    };
                    (s.spec.id.clone(), mode)
                })
                .collect()
        };
        let hook = self.cfg.on_change.clone();
        let r = tokio::task::spawn_blocking(move || hook(members)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // Without a durable membership record we cannot promise a restart will not
                // read a stale replica: stop serving rather than risk it.
                tracing::error!(error = %e, "cannot persist replica membership; aborting");
                std::process::abort();
            }
            Err(e) => {
                tracing::error!(error = %e, "membership persist task failed; aborting");
                std::process::abort();
            }
        }
    }

    /// Sends `req` to every write target and waits for all of them.
    async fn fanout(&self, req: Request) -> Result<(), DevError> {
        let (mut fan, futs) = {
            let _g = self.submit.lock().await;
            let (targets, modes) = {
                let set = lock(&self.set);
                let t = set.write_targets();
                let m: Vec<(usize, Mode)> = t.iter().map(|&i| (i, set.mode(i))).collect();
                (t, m)
            };
            if targets.is_empty() {
                return Err(DevError::Io("no replica is left".into()));
            }
            let futs: Vec<_> = targets
                .iter()
                .map(|&i| {
                    let f = self.send(i, req.clone());
                    async move { (i, self.answer(f).await) }
                })
                .collect();
            (Fanout::new(modes), futs)
        };
        let results = futures::future::join_all(futs).await;
        let mut first_err = None;
        let mut outcome = None;
        for (i, r) in results {
            match &r {
                Ok(_) => {
                    self.slots[i].stats.writes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    first_err.get_or_insert_with(|| dev_error(e));
                    self.fail(i, e).await;
                }
            }
            outcome = fan.complete(i, r.is_ok()).or(outcome);
        }
        match outcome {
            Some(Outcome::Done) => Ok(()),
            _ => {
                Err(first_err.unwrap_or_else(|| DevError::Io("no replica took the request".into())))
            }
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DevError> {
        check_range(offset, len, self.cfg.size, 4096)
    }

    /// Allocated extents of one slice, from the first RW replica that answers.
    async fn allocated_slice(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, DevError> {
        let order = lock(&self.set).read_order();
        for i in order {
            let req = Request::ListExtents {
                layer: LayerRef::Merged,
                offset,
                len,
            };
            match self.answer(self.send(i, req)).await {
                Ok(ReplyBody::Extents(e)) => return Ok(e),
                Ok(other) => {
                    let e = LinkError::Closed(format!("unexpected reply {other:?}"));
                    self.fail(i, &e).await;
                }
                Err(e) => self.fail(i, &e).await,
            }
        }
        Err(DevError::Io("no replica could list extents".into()))
    }

    /// Writes the good data to every replica that reported corruption, in the ordered path:
    /// under the submit lock it re-reads the range from a good replica (which has applied
    /// every earlier write) and queues the write before any later write can be queued.
    async fn repair(&self, offset: u64, len: u32, good: usize, bad: &[usize]) {
        let _g = self.submit.lock().await;
        let fresh = self
            .answer(self.send(good, Request::Read { offset, len }))
            .await;
        let data = match fresh {
            Ok(ReplyBody::Data { crcs, data })
                if cairn_wire::first_bad_block(&data, &crcs).is_none() =>
            {
                data
            }
            _ => return,
        };
        let futs: Vec<_> = bad
            .iter()
            .map(|&i| (i, self.send(i, Request::write(offset, false, data.clone()))))
            .collect();
        drop(_g);
        for (i, f) in futs {
            match self.answer(f).await {
                Ok(_) => {
                    self.read_repairs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(replica = %self.slots[i].spec.id, offset, len, "read repair");
                }
                Err(e) => self.fail(i, &e).await,
            }
        }
    }
}

impl BlockDevice for Engine {
    fn size(&self) -> u64 {
        self.cfg.size
    }

    fn max_io(&self) -> u32 {
        16 << 20
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DevError> {
        self.check(offset, u64::from(len))?;
        let order = lock(&self.set).read_order();
        let mut corrupt = Vec::new();
        for i in order {
            let r = self
                .answer(self.send(i, Request::Read { offset, len }))
                .await;
            match r {
                Ok(ReplyBody::Data { crcs, data })
                    if data.len() == len as usize
                        && cairn_wire::first_bad_block(&data, &crcs).is_none() =>
                {
                    self.slots[i].stats.reads.fetch_add(1, Ordering::Relaxed);
                    if !corrupt.is_empty() {
                        self.repair(offset, len, i, &corrupt).await;
                    }
                    return Ok(data);
                }
                Ok(_) => {
                    // Damaged on the wire or a bad reply: never returned.
                    self.slots[i]
                        .stats
                        .corrupt_reads
                        .fetch_add(1, Ordering::Relaxed);
                    corrupt.push(i);
                }
                Err(LinkError::Remote(e)) if e.kind == ErrorKind::Corruption => {
                    tracing::warn!(replica = %self.slots[i].spec.id, offset = e.detail, "replica reports a corrupt block");
                    self.slots[i]
                        .stats
                        .corrupt_reads
                        .fetch_add(1, Ordering::Relaxed);
                    corrupt.push(i);
                }
                Err(e) => self.fail(i, &e).await,
            }
        }
        Err(DevError::Io("no replica could serve the read".into()))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DevError> {
        self.check(offset, data.len() as u64)?;
        self.fanout(Request::write(offset, fua, data)).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), DevError> {
        self.check(offset, len)?;
        self.fanout(Request::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
        })
        .await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.check(offset, len)?;
        self.fanout(Request::Trim { offset, len, fua }).await
    }

    async fn flush(&self) -> Result<(), DevError> {
        self.fanout(Request::Flush).await
    }

    async fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, DevError> {
        self.check(offset, len)?;
        // Ask in slices so that one reply stays far below the frame limit whatever the
        // fragmentation (a slice holds at most EXTENT_SLICE / 4096 extents of 16 bytes).
        let mut out: Vec<(u64, u64)> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = EXTENT_SLICE.min(end - at);
            for (o, l) in self.allocated_slice(at, n).await? {
                match out.last_mut() {
                    Some((po, pl)) if *po + *pl == o => *pl += l,
                    _ => out.push((o, l)),
                }
            }
            at += n;
        }
        Ok(out)
    }
}
