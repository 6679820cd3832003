//! Bringing replicas back to RW while the volume serves: a partial resync of a replica that
//! returns within the resync window (only the regions its outage log marks), or a full
//! rebuild of a new, stale or changed one (every layer, from the oldest snapshot to the
//! head, comparing checksums where the target already holds data).
//!
//! How a copy and a client write to the same range end correctly (docs/rebuild.md): the
//! target takes every client write from the moment it turns WO. Each chunk copy is
//! registered in the [`Tracker`] under the submit lock, in the same critical section that
//! queues its reads to the source, so the source answers with the content as of that point
//! in the write order. Every client write queued later marks its blocks in the registered
//! chunks. When the data is back, again under the submit lock, the copy writes only the
//! blocks no later write touched; those writes are queued to the target after every client
//! write queued before, and each skipped block holds (or will hold) the newer client data on
//! the target. So every block ends with the newest value on the target, as on the source.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_wire::{LayerRef, ReplyBody, Request, StatusBody};
use futures::{StreamExt, TryStreamExt};
use roaring::RoaringBitmap;
use serde::Serialize;

use crate::link::{Link, LinkError};
use crate::{lock, Engine, Mode};

const BS: u64 = 4096;
const BLOCK: usize = 4096;
/// Bytes one chunk copy reads from the source at most (and the alignment of chunks).
pub(crate) const CHUNK: u64 = 1 << 20;
/// Bytes per checksum compared when the target already holds data.
const GRANULE: u32 = 64 << 10;
/// Chunk copies in flight at once.
const PARALLEL: usize = 8;
/// Bytes of the volume one extent listing covers.
const LIST_SLICE: u64 = 256 << 20;
/// Longest wait between two attempts to bring a replica back.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Copy every layer (comparing where the target holds data).
    Rebuild,
    /// Copy the regions written while the replica was out.
    Resync,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Done,
    Failed,
    Cancelled,
}

/// A rebuild or resync as status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub kind: JobKind,
    pub state: JobState,
    /// `snapshot NAME`, `head` or `finishing`.
    pub phase: String,
    /// The RW replica copied from.
    pub source: String,
    /// Bytes of ranges to go through (grows as layers are listed).
    pub bytes_total: u64,
    /// Bytes of ranges gone through.
    pub bytes_done: u64,
    /// Bytes of data written to the target.
    pub bytes_copied: u64,
    /// `bytes_done` per second since the start.
    pub rate_bytes_per_sec: u64,
    pub started_unix_ms: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
}

/// Per-replica healing state.
#[derive(Debug)]
pub(crate) struct HealState {
    pub job: Option<JobStatus>,
    pub started: Option<Instant>,
    pub running: bool,
    pub cancel: Arc<AtomicBool>,
    /// False after a cancel: the replica waits for an explicit start.
    pub auto: bool,
    next_attempt: Instant,
    backoff: Duration,
}

impl Default for HealState {
    fn default() -> Self {
        HealState {
            job: None,
            started: None,
            running: false,
            cancel: Arc::new(AtomicBool::new(false)),
            auto: true,
            next_attempt: Instant::now(),
            backoff: Duration::from_secs(1),
        }
    }
}

impl HealState {
    /// Makes the next attempt due now.
    pub fn poke(&mut self) {
        self.next_attempt = Instant::now();
        self.backoff = Duration::from_secs(1);
    }
}

/// What a replica was at its last attach: a new instance or another snapshot chain means
/// its outage log no longer describes what it misses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub instance: u64,
    /// `(name, created_unix_ms)` oldest first.
    pub chain: Vec<(String, u64)>,
}

/// Chunk copies in progress and the blocks client writes touched since each was read.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    next: u64,
    chunks: Vec<Tracked>,
}

#[derive(Debug)]
struct Tracked {
    id: u64,
    owner: usize,
    first: u64,
    count: u64,
    touched: RoaringBitmap,
}

impl Tracker {
    fn register(&mut self, owner: usize, offset: u64, len: u64) -> u64 {
        self.next += 1;
        self.chunks.push(Tracked {
            id: self.next,
            owner,
            first: offset / BS,
            count: len / BS,
            touched: RoaringBitmap::new(),
        });
        self.next
    }

    /// A client request changes `offset..offset+len`: marks it in every overlapping chunk.
    pub fn touch(&mut self, offset: u64, len: u64) {
        if self.chunks.is_empty() || len == 0 {
            return;
        }
        let (a, b) = (offset / BS, (offset + len).div_ceil(BS));
        for c in &mut self.chunks {
            let lo = a.max(c.first);
            let hi = b.min(c.first + c.count);
            if lo < hi {
                let rel = |x: u64| u32::try_from(x - c.first).unwrap_or(u32::MAX);
                c.touched.insert_range(rel(lo)..rel(hi));
            }
        }
    }

    /// Unregisters a chunk; returns the blocks (relative to its start) touched meanwhile.
    fn finish(&mut self, id: u64) -> RoaringBitmap {
        match self.chunks.iter().position(|c| c.id == id) {
            Some(k) => self.chunks.swap_remove(k).touched,
            None => RoaringBitmap::new(),
        }
    }

    /// Drops every chunk of a job that ended.
    fn forget(&mut self, owner: usize) {
        self.chunks.retain(|c| c.owner != owner);
    }
}

/// Why a job stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HealError {
    #[error("source replica: {0}")]
    Source(LinkError),
    #[error("target replica: {0}")]
    Target(LinkError),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Other(String),
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn unexpected(what: &str, body: &ReplyBody) -> LinkError {
    LinkError::Closed(format!("unexpected reply to {what}: {body:?}"))
}

/// Splits the union of two extent lists into chunks inside `CHUNK`-aligned windows:
/// `(offset, len, target_holds_data)`.
fn chunks_of(source: &[(u64, u64)], target: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut windows: BTreeMap<u64, (u64, u64, bool)> = BTreeMap::new();
    for (list, is_target) in [(source, false), (target, true)] {
        for &(o, l) in list {
            let mut at = o;
            let end = o + l;
            while at < end {
                let w = at / CHUNK;
                let stop = end.min((w + 1) * CHUNK);
                let e = windows.entry(w).or_insert((at, stop, false));
                e.0 = e.0.min(at);
                e.1 = e.1.max(stop);
                e.2 |= is_target;
                at = stop;
            }
        }
    }
    windows
        .into_values()
        .map(|(a, b, t)| (a, b - a, t))
        .collect()
}

/// Splits byte ranges into pieces that do not cross a `CHUNK` boundary.
fn split_ranges(ranges: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    for &(o, l) in ranges {
        let mut at = o;
        while at < o + l {
            let stop = (o + l).min((at / CHUNK + 1) * CHUNK);
            out.push((at, stop - at, true));
            at = stop;
        }
    }
    out
}

/// One running job's shared counters.
struct Job {
    target: usize,
    source: usize,
    started: Instant,
    reserved: AtomicU64,
    done: AtomicU64,
    copied: AtomicU64,
    cancel: Arc<AtomicBool>,
}

impl Engine {
    /// Runs forever (while the engine lives): every second, or when poked, starts a job for
    /// each ERR replica that is due, and drops outage logs older than the resync window.
    pub(crate) async fn heal_loop(engine: std::sync::Weak<Engine>, wake: Arc<tokio::sync::Notify>) {
        loop {
            let Some(e) = engine.upgrade() else { return };
            if e.closing.load(Ordering::Relaxed) || e.superseded.load(Ordering::Relaxed) > 0 {
                return;
            }
            for i in lock(&e.outages).expire(e.cfg.heal.resync_window) {
                tracing::info!(replica = %e.slot(i).id, "resync window passed; the replica will get a full rebuild");
            }
            // Any replica out: tick every second (backoffs, window expiry); none: sleep
            // until a failure or a change wakes us.
            let mut pending = false;
            for (i, slot) in e.slots().into_iter().enumerate() {
                if slot.removed.load(Ordering::Relaxed) || lock(&e.set).mode(i) != Mode::Err {
                    continue;
                }
                pending = true;
                if lock(&slot.addr).port() == 0 {
                    continue;
                }
                {
                    let mut h = lock(&slot.heal);
                    if h.running || !h.auto || Instant::now() < h.next_attempt {
                        continue;
                    }
                    h.running = true;
                    h.cancel = Arc::new(AtomicBool::new(false));
                }
                let e2 = e.clone();
                tokio::spawn(async move { e2.heal_one(i).await });
            }
            drop(e);
            if pending {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            } else {
                wake.notified().await;
            }
        }
    }

    async fn heal_one(self: Arc<Engine>, i: usize) {
        let slot = self.slot(i);
        let r = self.heal_inner(i).await;
        lock(&self.tracker).forget(i);
        let mut h = lock(&slot.heal);
        h.running = false;
        match r {
            Ok(()) => h.backoff = Duration::from_secs(1),
            Err(e) => {
                let cancelled = matches!(e, HealError::Cancelled);
                if let Some(job) = &mut h.job {
                    if job.state == JobState::Running {
                        job.state = if cancelled {
                            JobState::Cancelled
                        } else {
                            JobState::Failed
                        };
                        job.error = (!cancelled).then(|| e.to_string());
                    }
                }
                if cancelled {
                    h.auto = false;
                } else {
                    tracing::warn!(replica = %slot.id, error = %e, retry_in = ?h.backoff, "could not bring the replica back");
                    *lock(&slot.last_error) = Some(e.to_string());
                }
                h.next_attempt = Instant::now() + h.backoff;
                h.backoff = (h.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Attaches to replica `i` and brings it back with a resync or a rebuild.
    async fn heal_inner(self: &Arc<Engine>, i: usize) -> Result<(), HealError> {
        let slot = self.slot(i);
        let addr = *lock(&slot.addr);
        let attached = tokio::time::timeout(
            self.cfg.io_timeout,
            Link::connect(
                addr,
                &self.cfg.volume,
                &slot.id,
                self.current_size(),
                self.cfg.epoch,
                true,
            ),
        )
        .await
        .unwrap_or(Err(LinkError::Timeout));
        if let Err(LinkError::Remote(e)) = &attached {
            if e.kind == cairn_wire::ErrorKind::StaleEpoch && e.detail > self.cfg.epoch {
                self.superseded.fetch_max(e.detail, Ordering::Relaxed);
            }
        }
        let (link, status) = attached.map_err(HealError::Target)?;
        let size = self.current_size();
        if status.size > size {
            return Err(HealError::Other(format!(
                "replica has size {}, volume has {size}",
                status.size
            )));
        }
        if status.size < size {
            // It missed a grow while out: grow it first (new space reads as zeros; what it
            // missed there is in the outage log or found by the rebuild). A grow that lands
            // later is sent again when it turns WO (`grow::grow_queued`).
            crate::grow::grow_link(&link, size, self.cfg.io_timeout)
                .await
                .map_err(HealError::Target)?;
        }
        let link = Arc::new(link);
        *lock(&slot.link) = Some(link.clone());
        self.watch(i, &link);
        let result = self.heal_attached(i, &status).await;
        if let Err(e) = &result {
            // Out of the set again (WO or not); the link goes with it.
            let why = match e {
                HealError::Target(l) | HealError::Source(l) => l.clone(),
                other => LinkError::Closed(other.to_string()),
            };
            self.fail(i, &why).await;
            *lock(&slot.link) = None;
        }
        result
    }

    async fn heal_attached(&self, i: usize, status: &StatusBody) -> Result<(), HealError> {
        let identity = self.identify(i, status).await.map_err(HealError::Target)?;
        let slot = self.slot(i);
        let known = lock(&slot.identity).clone();
        let has_log = lock(&self.outages).marked(i).is_some();
        let source = self.pick_source(i)?;
        // The source's chain may have changed while the replica was out (a snapshot).
        let source_chain = lock(&self.slot(source).identity)
            .as_ref()
            .map(|s| s.chain.clone());
        let partial = has_log
            && known.as_ref() == Some(&identity)
            && source_chain.as_ref() == Some(&identity.chain);
        if has_log && !partial {
            tracing::info!(replica = %slot.id, "replica returned with another identity or chain; full rebuild");
        }
        let job = Arc::new(Job {
            target: i,
            source,
            started: Instant::now(),
            reserved: AtomicU64::new(0),
            done: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            cancel: lock(&slot.heal).cancel.clone(),
        });
        {
            let mut h = lock(&slot.heal);
            h.started = Some(Instant::now());
            h.job = Some(JobStatus {
                kind: if partial {
                    JobKind::Resync
                } else {
                    JobKind::Rebuild
                },
                state: JobState::Running,
                phase: "starting".into(),
                source: self.slot(source).id.clone(),
                bytes_total: 0,
                bytes_done: 0,
                bytes_copied: 0,
                rate_bytes_per_sec: 0,
                started_unix_ms: unix_ms(),
                elapsed_ms: 0,
                error: None,
            });
        }
        tracing::info!(replica = %slot.id, source = %self.slot(source).id, kind = if partial { "resync" } else { "rebuild" }, "bringing replica back");
        if partial {
            self.resync(&job).await?;
        } else {
            self.rebuild(&job, identity).await?;
        }
        self.finish(&job).await
    }

    /// The replica's instance and chain, with each snapshot's creation time.
    async fn identify(&self, i: usize, status: &StatusBody) -> Result<Identity, LinkError> {
        let list = match self.answer(self.send(i, Request::SnapshotList)).await? {
            ReplyBody::Snapshots(s) => s,
            other => return Err(unexpected("SnapshotList", &other)),
        };
        let chain = status
            .chain
            .iter()
            .map(|name| {
                let created = list
                    .iter()
                    .find(|s| &s.name == name)
                    .map_or(0, |s| s.created_unix_ms);
                (name.clone(), created)
            })
            .collect();
        Ok(Identity {
            instance: status.instance,
            chain,
        })
    }

    /// Records what replica `i` is now (after an attach in the set).
    pub(crate) async fn remember_identity(&self, i: usize, status: &StatusBody) {
        if let Ok(id) = self.identify(i, status).await {
            *lock(&self.slot(i).identity) = Some(id);
        }
    }

    fn pick_source(&self, target: usize) -> Result<usize, HealError> {
        let set = lock(&self.set);
        (0..set.modes().len())
            .find(|&s| s != target && set.mode(s) == Mode::Rw)
            .ok_or_else(|| HealError::Other("no RW replica to copy from".into()))
    }

    fn set_phase(&self, job: &Job, phase: &str) {
        if let Some(j) = &mut lock(&self.slot(job.target).heal).job {
            j.phase = phase.to_owned();
        }
    }

    fn add_total(&self, job: &Job, bytes: u64) {
        if let Some(j) = &mut lock(&self.slot(job.target).heal).job {
            j.bytes_total += bytes;
        }
    }

    fn progress(&self, job: &Job) {
        let done = job.done.load(Ordering::Relaxed);
        let elapsed = job.started.elapsed();
        if let Some(j) = &mut lock(&self.slot(job.target).heal).job {
            j.bytes_done = done;
            j.bytes_copied = job.copied.load(Ordering::Relaxed);
            j.elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
            let secs = elapsed.as_secs_f64();
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            if secs > 0.0 {
                j.rate_bytes_per_sec = (done as f64 / secs) as u64;
            }
        }
    }

    /// Turns the target WO, taking its outage log in the same step: every write queued
    /// after this reaches the target, every earlier one is in the log or on the source.
    /// Also queues a Grow to the current size ahead of those writes (see
    /// [`Engine::grow_queued`]); the caller awaits it.
    async fn enter_wo(
        &self,
        i: usize,
    ) -> (
        Option<crate::outage::OutageLog>,
        impl std::future::Future<Output = Result<ReplyBody, LinkError>>,
    ) {
        let (log, grown) = {
            let _g = self.submit.lock().await;
            let mut o = lock(&self.outages);
            let log = o.take(i);
            lock(&self.set).set_mode(i, Mode::Wo);
            (log, self.grow_queued(i))
        };
        self.persist().await;
        (log, grown)
    }

    async fn resync(&self, job: &Arc<Job>) -> Result<(), HealError> {
        let (log, grown) = self.enter_wo(job.target).await;
        crate::grow::grown(self.answer(grown).await).map_err(HealError::Target)?;
        let Some(log) = log else {
            return Err(HealError::Other("the outage log expired".into()));
        };
        let ranges = log.ranges(self.current_size());
        self.set_phase(job, "head");
        let chunks = split_ranges(&ranges);
        self.add_total(job, chunks.iter().map(|c| c.1).sum());
        self.copy_chunks(job, LayerRef::Head, chunks, true).await
    }

    async fn rebuild(&self, job: &Arc<Job>, identity: Identity) -> Result<(), HealError> {
        let (src, tgt) = (job.source, job.target);
        let src_chain = self.source_chain(src).await?;
        let mut keep = identity
            .chain
            .iter()
            .zip(&src_chain)
            .take_while(|(t, s)| t.0 == s.0 && t.1 == s.1)
            .count();
        if keep < identity.chain.len() {
            self.recreate(job).await?;
            keep = 0;
        }
        for snap in src_chain.iter().take(keep) {
            let layer = LayerRef::Snapshot(snap.0.clone());
            self.set_phase(job, &format!("verify snapshot {}", snap.0));
            if !self.layer_equal(job, &layer).await? {
                tracing::warn!(replica = %self.slot(tgt).id, snapshot = %snap.0, "snapshot layer differs from the source; recreating the replica");
                self.recreate(job).await?;
                keep = 0;
                break;
            }
        }
        for snap in &src_chain[keep..] {
            let layer = LayerRef::Snapshot(snap.0.clone());
            self.set_phase(job, &format!("snapshot {}", snap.0));
            let src_ext = self.list(src, &layer).await.map_err(HealError::Source)?;
            let tgt_ext = self
                .list(tgt, &LayerRef::Head)
                .await
                .map_err(HealError::Target)?;
            let chunks = chunks_of(&src_ext, &tgt_ext);
            self.add_total(job, chunks.iter().map(|c| c.1).sum());
            self.copy_chunks(job, layer, chunks, false).await?;
            let req = Request::SnapshotCreate {
                name: snap.0.clone(),
                created_unix_ms: snap.1,
                labels: snap.2.clone(),
            };
            self.answer(self.send(tgt, req))
                .await
                .map_err(HealError::Target)?;
        }
        // The head: from here on the target takes every client write.
        let (grown, src_f, tgt_f) = {
            let _g = self.submit.lock().await;
            drop(lock(&self.outages).take(tgt));
            lock(&self.set).set_mode(tgt, Mode::Wo);
            (
                self.grow_queued(tgt),
                self.list_queued(src, &LayerRef::Head),
                self.list_queued(tgt, &LayerRef::Head),
            )
        };
        self.persist().await;
        crate::grow::grown(self.answer(grown).await).map_err(HealError::Target)?;
        self.set_phase(job, "head");
        let src_ext = Self::collect_list(self, src_f)
            .await
            .map_err(HealError::Source)?;
        let tgt_ext = Self::collect_list(self, tgt_f)
            .await
            .map_err(HealError::Target)?;
        let chunks = chunks_of(&src_ext, &tgt_ext);
        self.add_total(job, chunks.iter().map(|c| c.1).sum());
        self.copy_chunks(job, LayerRef::Head, chunks, true).await
    }

    /// The source's snapshot chain, oldest first, with creation times and labels.
    async fn source_chain(
        &self,
        src: usize,
    ) -> Result<Vec<(String, u64, Vec<(String, String)>)>, HealError> {
        let status = match self
            .answer(self.send(src, Request::Status))
            .await
            .map_err(HealError::Source)?
        {
            ReplyBody::Status(s) => s,
            other => return Err(HealError::Source(unexpected("Status", &other))),
        };
        let list = match self
            .answer(self.send(src, Request::SnapshotList))
            .await
            .map_err(HealError::Source)?
        {
            ReplyBody::Snapshots(s) => s,
            other => return Err(HealError::Source(unexpected("SnapshotList", &other))),
        };
        status
            .chain
            .iter()
            .map(|name| {
                list.iter()
                    .find(|s| &s.name == name)
                    .map(|s| (s.name.clone(), s.created_unix_ms, s.labels.clone()))
                    .ok_or_else(|| {
                        HealError::Source(LinkError::Closed(format!(
                            "snapshot {name} of the chain is not listed"
                        )))
                    })
            })
            .collect()
    }

    async fn recreate(&self, job: &Job) -> Result<(), HealError> {
        self.set_phase(job, "recreate");
        tracing::info!(replica = %self.slot(job.target).id, "discarding the replica's old chain");
        match self
            .answer(self.send(job.target, Request::Recreate))
            .await
            .map_err(HealError::Target)?
        {
            ReplyBody::Status(_) => Ok(()),
            other => Err(HealError::Target(unexpected("Recreate", &other))),
        }
    }

    /// True when the target's copy of a snapshot layer equals the source's.
    async fn layer_equal(&self, job: &Job, layer: &LayerRef) -> Result<bool, HealError> {
        let src_ext = self
            .list(job.source, layer)
            .await
            .map_err(HealError::Source)?;
        let tgt_ext = self
            .list(job.target, layer)
            .await
            .map_err(HealError::Target)?;
        if src_ext != tgt_ext {
            return Ok(false);
        }
        for (o, l, _) in chunks_of(&src_ext, &[]) {
            let (a, b) = (
                self.send(job.source, digests(layer, o, l)),
                self.send(job.target, digests(layer, o, l)),
            );
            let a = self.answer(a).await.map_err(HealError::Source)?;
            let b = self.answer(b).await.map_err(HealError::Target)?;
            if a != b {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Queues extent listings of a whole layer (in slices).
    fn list_queued(
        &self,
        i: usize,
        layer: &LayerRef,
    ) -> Vec<impl std::future::Future<Output = Result<ReplyBody, LinkError>> + Send + 'static> {
        let mut out = Vec::new();
        let mut at = 0;
        let size = self.current_size();
        while at < size {
            let len = LIST_SLICE.min(size - at);
            out.push(self.send(
                i,
                Request::ListExtents {
                    layer: layer.clone(),
                    offset: at,
                    len,
                },
            ));
            at += len;
        }
        out
    }

    async fn collect_list(
        &self,
        futs: Vec<impl std::future::Future<Output = Result<ReplyBody, LinkError>>>,
    ) -> Result<Vec<(u64, u64)>, LinkError> {
        let mut out = Vec::new();
        for f in futs {
            match self.answer(f).await? {
                ReplyBody::Extents(e) => out.extend(e),
                other => return Err(unexpected("ListExtents", &other)),
            }
        }
        Ok(out)
    }

    async fn list(&self, i: usize, layer: &LayerRef) -> Result<Vec<(u64, u64)>, LinkError> {
        let futs = self.list_queued(i, layer);
        self.collect_list(futs).await
    }

    /// Copies chunks with up to `PARALLEL` in flight, paced by the rebuild rate.
    async fn copy_chunks(
        &self,
        job: &Arc<Job>,
        layer: LayerRef,
        chunks: Vec<(u64, u64, bool)>,
        tracked: bool,
    ) -> Result<(), HealError> {
        futures::stream::iter(chunks)
            .map(|(o, l, target_has)| {
                let layer = layer.clone();
                async move {
                    if job.cancel.load(Ordering::Relaxed) {
                        return Err(HealError::Cancelled);
                    }
                    self.pace(job, l).await;
                    if job.cancel.load(Ordering::Relaxed) {
                        return Err(HealError::Cancelled);
                    }
                    if target_has {
                        for (a, n) in self.differing(job, &layer, o, l, tracked).await? {
                            self.copy(job, &layer, a, n, tracked, false).await?;
                        }
                    } else {
                        self.copy(job, &layer, o, l, tracked, true).await?;
                    }
                    job.done.fetch_add(l, Ordering::Relaxed);
                    self.progress(job);
                    Ok(())
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Waits until copying `len` more bytes keeps the job under the rebuild rate.
    async fn pace(&self, job: &Job, len: u64) {
        let before = job.reserved.fetch_add(len, Ordering::Relaxed);
        let rate = self.rebuild_rate.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        #[allow(clippy::cast_precision_loss)]
        let due = job.started + Duration::from_secs_f64(before as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
    }

    /// Granule ranges of `offset..offset+len` where the target's head differs from the
    /// source's `layer` (both digested at the same point of the write order).
    async fn differing(
        &self,
        job: &Job,
        layer: &LayerRef,
        offset: u64,
        len: u64,
        tracked: bool,
    ) -> Result<Vec<(u64, u64)>, HealError> {
        let (a, b) = {
            let _g = if tracked {
                Some(self.submit.lock().await)
            } else {
                None
            };
            (
                self.send(job.source, digests(layer, offset, len)),
                self.send(job.target, digests(&LayerRef::Head, offset, len)),
            )
        };
        let a = match self.answer(a).await.map_err(HealError::Source)? {
            ReplyBody::RangeDigests(d) => d,
            other => return Err(HealError::Source(unexpected("RangeDigests", &other))),
        };
        let b = match self.answer(b).await.map_err(HealError::Target)? {
            ReplyBody::RangeDigests(d) => d,
            other => return Err(HealError::Target(unexpected("RangeDigests", &other))),
        };
        let g = u64::from(GRANULE);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            if x == y && a.len() == b.len() {
                continue;
            }
            let start = offset + k as u64 * g;
            let n = g.min(offset + len - start);
            match out.last_mut() {
                Some((o, l)) if *o + *l == start => *l += n,
                _ => out.push((start, n)),
            }
        }
        Ok(out)
    }

    /// Makes the target's head equal to the source's `layer` over `offset..offset+len`,
    /// except blocks client writes touched since the source was read (see the module doc).
    /// `target_empty`: the target's head holds nothing here, so no unmap is needed.
    async fn copy(
        &self,
        job: &Job,
        layer: &LayerRef,
        offset: u64,
        len: u64,
        tracked: bool,
        target_empty: bool,
    ) -> Result<(), HealError> {
        let len32 = u32::try_from(len).map_err(|_| HealError::Other("chunk too large".into()))?;
        let (ext_f, data_f, tid) = {
            let _g = if tracked {
                Some(self.submit.lock().await)
            } else {
                None
            };
            let tid = tracked.then(|| lock(&self.tracker).register(job.target, offset, len));
            let ext = self.send(
                job.source,
                Request::ListExtents {
                    layer: layer.clone(),
                    offset,
                    len,
                },
            );
            let data = self.send(
                job.source,
                Request::ReadLayer {
                    layer: layer.clone(),
                    offset,
                    len: len32,
                },
            );
            (ext, data, tid)
        };
        let read = async {
            let ext = match self.answer(ext_f).await? {
                ReplyBody::Extents(e) => e,
                other => return Err(unexpected("ListExtents", &other)),
            };
            match self.answer(data_f).await? {
                // Block CRCs are not checked here: they travel with the data to the target,
                // which checks every block against them before writing (end to end).
                ReplyBody::Data { crcs, data }
                    if data.len() as u64 == len && crcs.len() as u64 == len / BS =>
                {
                    Ok((ext, crcs, data))
                }
                _ => Err(LinkError::Closed("bad data from the source".into())),
            }
        }
        .await;
        let (ext, crcs, data) = match read {
            Ok(v) => v,
            Err(e) => {
                if let Some(t) = tid {
                    lock(&self.tracker).finish(t);
                }
                return Err(HealError::Source(e));
            }
        };
        let blocks = usize::try_from(len / BS).unwrap_or(0);
        let mut held = vec![false; blocks];
        for (o, l) in ext {
            let a = usize::try_from((o.max(offset) - offset) / BS).unwrap_or(0);
            let b = usize::try_from(((o + l).min(offset + len) - offset) / BS).unwrap_or(0);
            for h in held.iter_mut().take(b).skip(a) {
                *h = true;
            }
        }
        let (futs, copied) = {
            let _g = if tracked {
                Some(self.submit.lock().await)
            } else {
                None
            };
            let touched = tid
                .map(|t| lock(&self.tracker).finish(t))
                .unwrap_or_default();
            // Runs of blocks: Some(true) write, Some(false) unmap, None skip (touched).
            let what = |b: usize| {
                let rel = u32::try_from(b).unwrap_or(u32::MAX);
                if touched.contains(rel) {
                    None
                } else {
                    Some(held[b])
                }
            };
            let mut futs = Vec::new();
            let mut copied = 0;
            let mut b = 0;
            while b < blocks {
                let kind = what(b);
                let mut e = b + 1;
                while e < blocks && what(e) == kind {
                    e += 1;
                }
                let (o, n) = (offset + b as u64 * BS, (e - b) as u64 * BS);
                match kind {
                    Some(true) => {
                        let bytes = data.slice(b * BLOCK..e * BLOCK);
                        copied += n;
                        // The source's block CRCs were checked against the data above.
                        let req = Request::Write {
                            offset: o,
                            fua: false,
                            crcs: crcs[b..e].to_vec(),
                            data: bytes,
                        };
                        futs.push(self.send(job.target, req));
                    }
                    Some(false) if !target_empty => {
                        futs.push(self.send(job.target, Request::Unmap { offset: o, len: n }));
                    }
                    _ => {}
                }
                b = e;
            }
            (futs, copied)
        };
        for f in futs {
            self.answer(f).await.map_err(HealError::Target)?;
        }
        job.copied.fetch_add(copied, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the target durable, then RW.
    async fn finish(&self, job: &Job) -> Result<(), HealError> {
        self.set_phase(job, "finishing");
        self.answer(self.send(job.target, Request::Flush))
            .await
            .map_err(HealError::Target)?;
        let status = match self
            .answer(self.send(job.target, Request::Status))
            .await
            .map_err(HealError::Target)?
        {
            ReplyBody::Status(s) => s,
            other => return Err(HealError::Target(unexpected("Status", &other))),
        };
        let identity = self.identify(job.target, &status).await;
        let slot = self.slot(job.target);
        let copied = job.copied.load(Ordering::Relaxed);
        self.progress(job);
        {
            let _g = self.submit.lock().await;
            if job.cancel.load(Ordering::Relaxed) {
                return Err(HealError::Cancelled);
            }
            let mut set = lock(&self.set);
            if set.mode(job.target) != Mode::Wo {
                return Err(HealError::Other("the replica left the set".into()));
            }
            // Everything status shows about the job is in place before it shows RW.
            slot.last_resync_bytes.store(copied, Ordering::Relaxed);
            *lock(&slot.last_error) = None;
            if let Ok(id) = &identity {
                *lock(&slot.identity) = Some(id.clone());
            }
            if let Some(j) = &mut lock(&slot.heal).job {
                j.state = JobState::Done;
                j.phase = "done".into();
            }
            set.set_mode(job.target, Mode::Rw);
        }
        self.persist().await;
        tracing::info!(replica = %slot.id, copied, elapsed = ?job.started.elapsed(), "replica is RW again");
        Ok(())
    }

    /// Copies the head layer of `offset..offset+len` from `source` to `target` before the
    /// volume serves (engine crash recovery): no client write can race.
    pub(crate) async fn copy_unserved(
        &self,
        source: usize,
        target: usize,
        offset: u64,
        len: u64,
    ) -> Result<u64, HealError> {
        let job = Job {
            target,
            source,
            started: Instant::now(),
            reserved: AtomicU64::new(0),
            done: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            cancel: Arc::new(AtomicBool::new(false)),
        };
        for (o, l, _) in split_ranges(&[(offset, len)]) {
            self.copy(&job, &LayerRef::Head, o, l, false, false).await?;
        }
        Ok(job.copied.load(Ordering::Relaxed))
    }
}

fn digests(layer: &LayerRef, offset: u64, len: u64) -> Request {
    Request::RangeDigests {
        layer: layer.clone(),
        offset,
        len,
        granule: GRANULE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_union_within_aligned_windows() {
        let src = [(0, 8192), (CHUNK - 4096, 8192), (5 * CHUNK, 3 * CHUNK)];
        let tgt = [(4096, 4096), (9 * CHUNK + 4096, 4096)];
        assert_eq!(
            chunks_of(&src, &tgt),
            vec![
                (0, CHUNK, true),
                (CHUNK, 4096, false),
                (5 * CHUNK, CHUNK, false),
                (6 * CHUNK, CHUNK, false),
                (7 * CHUNK, CHUNK, false),
                (9 * CHUNK + 4096, 4096, true),
            ]
        );
    }

    #[test]
    fn split_keeps_chunks_inside_windows() {
        assert_eq!(
            split_ranges(&[(CHUNK / 2, CHUNK)]),
            vec![(CHUNK / 2, CHUNK / 2, true), (CHUNK, CHUNK / 2, true)]
        );
    }

    #[test]
    fn tracker_marks_only_overlapping_blocks_of_registered_chunks() {
        let mut t = Tracker::default();
        t.touch(0, 4096);
        let a = t.register(0, CHUNK, CHUNK);
        let b = t.register(1, 3 * CHUNK, CHUNK);
        t.touch(CHUNK - 4096, 3 * 4096);
        t.touch(3 * CHUNK + CHUNK - 4096, 4096);
        assert_eq!(t.finish(a).iter().collect::<Vec<_>>(), vec![0, 1]);
        t.forget(1);
        assert!(t.finish(b).is_empty());
        assert!(t.chunks.is_empty());
    }
}
