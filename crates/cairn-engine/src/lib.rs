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
//! - A replica that left the set comes back by itself (when healing is on): a partial
//!   resync from the engine's outage log if it returns within the resync window with the
//!   same identity and chain, else a full rebuild (see [`heal`] and docs/rebuild.md).
//! - The volume grows online ([`Engine::grow`], see [`grow`]): no request past the old end
//!   is accepted before every replica that takes writes has grown; a replica that does not
//!   grow goes to ERR; a replica found smaller than the volume is grown before it serves.
//!
//! The decisions are in [`set`] (no I/O); this file carries them out.

mod grow;
mod heal;
mod link;
mod outage;
pub mod set;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use cairn_blockdev::{check_range, BlockDevice, DevError};
use cairn_wire::{ErrorKind, LayerRef, ReplyBody, Request};
use serde::Serialize;

pub use grow::{grow_step, GrowError, GrowStep};
use heal::{HealState, Identity, Tracker};
pub use heal::{JobKind, JobState, JobStatus};
pub use link::{Link, LinkError};
use outage::Outages;
pub use outage::REGION as OUTAGE_REGION;
pub use set::{Fanout, Mode, Outcome, ReplicaSet};

/// Bytes of the volume one extent listing covers: at most 65,536 extents (1 MiB) per reply.
const EXTENT_SLICE: u64 = 256 << 20;
/// Longest snapshot name (the replicas' limit).
const MAX_SNAPSHOT_NAME: usize = 255;
/// A volume-long request (a digest) may take this many I/O timeouts.
const LONG_OP_FACTOR: u32 = 100;

/// One replica of the volume.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    pub id: String,
    pub addr: SocketAddr,
    /// Mode it starts in; `Err` replicas are not contacted.
    pub mode: Mode,
}

/// One member of the volume as persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRecord {
    pub id: String,
    pub addr: SocketAddr,
    pub mode: Mode,
}

/// Called with every member when membership changes; must persist it durably before
/// returning.
pub type MembershipHook = Arc<dyn Fn(Vec<ReplicaRecord>) -> std::io::Result<()> + Send + Sync>;

/// How replicas that left the set are brought back.
#[derive(Debug, Clone)]
pub struct HealConfig {
    /// Bring replicas back by themselves (resync or rebuild). Off: an ERR replica stays
    /// out until it is added again.
    pub enabled: bool,
    /// How long an outage log is kept: a replica back within it is resynced, a later one
    /// rebuilt.
    pub resync_window: Duration,
    /// Bytes per second a rebuild or resync may copy; 0 for no limit.
    pub rebuild_rate: u64,
    /// Flush every replica this often while writes come in, so the replicas' dirty-region
    /// logs (what an engine crash makes the next engine copy) cover only recent writes.
    pub flush_interval: Option<Duration>,
}

impl Default for HealConfig {
    fn default() -> Self {
        HealConfig {
            enabled: true,
            resync_window: Duration::from_secs(600),
            rebuild_rate: 0,
            flush_interval: Some(Duration::from_secs(2)),
        }
    }
}

/// How an engine runs.
#[derive(Clone)]
pub struct EngineConfig {
    pub volume: String,
    /// Size at start; [`Engine::grow`] raises it later ([`BlockDevice::size`] is current).
    pub size: u64,
    /// This engine's epoch: higher than any earlier engine's for the volume.
    pub epoch: u64,
    pub replicas: Vec<ReplicaSpec>,
    /// How long a replica may take to answer one request before it is failed.
    pub io_timeout: Duration,
    /// Persists membership changes.
    pub on_change: MembershipHook,
    pub heal: HealConfig,
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
    /// Bytes of data the last finished rebuild or resync wrote to this replica.
    pub last_resync_bytes: u64,
    /// Regions (of `outage_region_bytes`) written while this replica was out, if recorded.
    pub outage_regions: Option<u64>,
    /// The current or last rebuild / resync.
    pub rebuild: Option<JobStatus>,
    /// False after a cancelled rebuild: it waits for `rebuild start`.
    pub auto_heal: bool,
    /// Snapshot names of its chain, oldest first, as of its last attach or job.
    pub chain: Option<Vec<String>>,
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
    /// Bytes of data those copies wrote.
    pub resynced_bytes: u64,
    /// Flushes the engine sent by itself (see `HealConfig::flush_interval`).
    pub background_flushes: u64,
    /// True once two background flushes followed the last data-changing request: the
    /// replicas' dirty logs hold no mark then, so an engine crash would copy nothing.
    pub flushes_settled: bool,
    pub outage_region_bytes: u64,
    /// Rebuild rate limit in bytes per second, 0 for none.
    pub rebuild_rate: u64,
    /// The newer epoch a replica named when it refused this engine's: this engine is
    /// fenced out and brings no replica back.
    pub superseded_by_epoch: Option<u64>,
}

/// A snapshot taken by [`Engine::snapshot_create`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SnapshotCreated {
    /// Creation time recorded on every replica.
    pub created_unix_ms: u64,
    /// How long new writes were held: drain, SnapshotCreate on every replica, resume.
    pub pause_us: u64,
}

#[derive(Default)]
struct Stats {
    reads: AtomicU64,
    writes: AtomicU64,
    errors: AtomicU64,
    corrupt_reads: AtomicU64,
}

struct Slot {
    id: String,
    addr: Mutex<SocketAddr>,
    link: Mutex<Option<Arc<Link>>>,
    stats: Stats,
    last_error: Mutex<Option<String>>,
    /// Taken out by `remove_replica`: kept only so indexes stay stable.
    removed: AtomicBool,
    /// Instance and chain at the last attach while in the set.
    identity: Mutex<Option<Identity>>,
    heal: Mutex<HealState>,
    last_resync_bytes: AtomicU64,
}

impl Slot {
    fn new(id: String, addr: SocketAddr) -> Slot {
        Slot {
            id,
            addr: Mutex::new(addr),
            link: Mutex::new(None),
            stats: Stats::default(),
            last_error: Mutex::new(None),
            removed: AtomicBool::new(false),
            identity: Mutex::new(None),
            heal: Mutex::new(HealState::default()),
            last_resync_bytes: AtomicU64::new(0),
        }
    }
}

/// One volume's engine. Cheap to clone handles via `Arc`.
///
/// Lock order: `submit`, then `outages`, then `set`, then `tracker`; `slots` and the
/// per-slot mutexes are only held briefly and never across another of these.
pub struct Engine {
    cfg: EngineConfig,
    /// The volume's size now: `cfg.size` at start, raised by [`Engine::grow`] (under the
    /// submit lock, once every write target has grown).
    size: AtomicU64,
    slots: RwLock<Vec<Arc<Slot>>>,
    set: Mutex<ReplicaSet>,
    /// Held while a request is queued to every target, so overlapping requests keep one
    /// order on all replicas. Never held across a wait for replies, except by read repair.
    submit: tokio::sync::Mutex<()>,
    /// Requests in flight and what replicas that are out missed.
    outages: Mutex<Outages>,
    /// Rebuild chunk copies in flight and the client writes that raced them.
    tracker: Mutex<Tracker>,
    /// Serialises membership persists so that the last one written is the newest.
    persisting: tokio::sync::Mutex<()>,
    read_repairs: AtomicU64,
    /// Dirty regions copied between replicas at start, and the bytes written.
    resynced: AtomicU64,
    resynced_bytes: AtomicU64,
    /// Data-changing requests since the background flush last looked.
    unflushed: AtomicU64,
    /// Woken by the first data-changing request after a quiet period (the background flush
    /// sleeps on it while nothing is written).
    write_wake: Arc<tokio::sync::Notify>,
    background_flushes: AtomicU64,
    /// See `VolumeStatus::flushes_settled`.
    settled: AtomicBool,
    rebuild_rate: AtomicU64,
    heal_wake: Arc<tokio::sync::Notify>,
    /// Volume-long requests (digests) in flight.
    long_ops: AtomicU64,
    /// Set by `shutdown`: replicas going away now are not failures.
    closing: AtomicBool,
    /// A replica refused our epoch in favour of this newer one: another engine owns the
    /// volume now, so this one stops bringing replicas back.
    superseded: AtomicU64,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The background loops hold weak references and may be asleep on these.
        self.heal_wake.notify_one();
        self.write_wake.notify_one();
    }
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
    /// Connects to every replica not in `Err` or `Wo` and attaches at the config's epoch.
    /// Replicas that cannot be reached or refuse (stale epoch, wrong size) start in `Err`;
    /// a `Wo` replica (its rebuild was interrupted) starts in `Err` and is rebuilt. Before
    /// returning, regions the replicas' dirty logs mark are made identical (engine crash
    /// recovery); with healing on, background tasks then bring ERR replicas back and flush
    /// periodically.
    pub async fn start(cfg: EngineConfig) -> Arc<Engine> {
        let mut slots = Vec::new();
        let mut modes = Vec::new();
        let mut statuses = Vec::new();
        // The volume grew while no engine ran (or a grow missed a replica): a smaller replica
        // is grown here, fenced by this engine's epoch, before it serves anything.
        for spec in &cfg.replicas {
            let slot = Slot::new(spec.id.clone(), spec.addr);
            let mut mode = if spec.mode == Mode::Wo {
                Mode::Err
            } else {
                spec.mode
            };
            if mode != Mode::Err {
                let attached = tokio::time::timeout(
                    cfg.io_timeout,
                    Link::connect(spec.addr, &cfg.volume, &spec.id, cfg.size, cfg.epoch, true),
                )
                .await
                .unwrap_or(Err(LinkError::Timeout));
                let attached = match attached {
                    Ok((link, status)) if status.size < cfg.size => {
                        grow::grow_link(&link, cfg.size, cfg.io_timeout)
                            .await
                            .map(|()| (link, cfg.size, status))
                    }
                    Ok((link, status)) => Ok((link, status.size, status)),
                    Err(e) => Err(e),
                };
                match attached {
                    Ok((link, size, status)) if size == cfg.size => {
                        *lock(&slot.link) = Some(Arc::new(link));
                        statuses.push((slots.len(), status));
                    }
                    Ok((_, _, status)) => {
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
            slots.push(Arc::new(slot));
        }
        // With no RW replica reachable the changes are not recorded: the unreachable RW
        // replicas still hold every acknowledged write, and the next start needs them RW.
        let any_rw = modes.contains(&Mode::Rw);
        if !any_rw && cfg.replicas.iter().any(|s| s.mode == Mode::Rw) {
            tracing::error!(volume = %cfg.volume, "no RW replica reachable; serving nothing until one is back (membership left as recorded)");
        }
        let changed = any_rw && modes.iter().zip(&cfg.replicas).any(|(m, s)| *m != s.mode);
        let engine = Arc::new(Engine {
            set: Mutex::new(ReplicaSet::new(modes, None)),
            size: AtomicU64::new(cfg.size),
            slots: RwLock::new(slots),
            submit: tokio::sync::Mutex::new(()),
            outages: Mutex::new(Outages::default()),
            tracker: Mutex::new(Tracker::default()),
            persisting: tokio::sync::Mutex::new(()),
            read_repairs: AtomicU64::new(0),
            resynced: AtomicU64::new(0),
            resynced_bytes: AtomicU64::new(0),
            unflushed: AtomicU64::new(0),
            write_wake: Arc::new(tokio::sync::Notify::new()),
            background_flushes: AtomicU64::new(0),
            settled: AtomicBool::new(false),
            rebuild_rate: AtomicU64::new(cfg.heal.rebuild_rate),
            heal_wake: Arc::new(tokio::sync::Notify::new()),
            long_ops: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            superseded: AtomicU64::new(0),
            cfg,
        });
        for (i, status) in statuses {
            engine.remember_identity(i, &status).await;
            if let Some(link) = lock(&engine.slot(i).link).clone() {
                engine.watch(i, &link);
            }
        }
        if changed {
            engine.persist().await;
        }
        // A source that fails mid-resync is out; start over from the next RW replica.
        while engine.resync_dirty().await {}
        if engine.cfg.heal.enabled {
            tokio::spawn(Engine::heal_loop(
                Arc::downgrade(&engine),
                engine.heal_wake.clone(),
            ));
        }
        if let Some(every) = engine.cfg.heal.flush_interval {
            tokio::spawn(Engine::flush_loop(
                Arc::downgrade(&engine),
                engine.write_wake.clone(),
                every,
            ));
        }
        engine
    }

    /// Fails replica `i` as soon as `link` breaks while it is still the replica's link, so
    /// a replica that dies while idle leaves the set (and starts its recovery) at once.
    fn watch(self: &Arc<Engine>, i: usize, link: &Arc<Link>) {
        let closed = link.closed();
        let (engine, id) = (Arc::downgrade(self), link.id);
        tokio::spawn(async move {
            let why = closed.await;
            let Some(e) = engine.upgrade() else { return };
            let current = lock(&e.slot(i).link).as_ref().is_some_and(|l| l.id == id);
            if current {
                e.fail(i, &LinkError::Closed(why)).await;
            }
        });
    }

    /// Waits for a reply within the I/O timeout; while a volume-long request (a digest) is
    /// in flight, requests queued behind it wait for it instead of timing out.
    async fn answer(
        &self,
        f: impl std::future::Future<Output = Result<ReplyBody, LinkError>>,
    ) -> Result<ReplyBody, LinkError> {
        let mut f = std::pin::pin!(f);
        let mut waited = Duration::ZERO;
        loop {
            match tokio::time::timeout(self.cfg.io_timeout, &mut f).await {
                Ok(r) => return r,
                Err(_) => {
                    waited += self.cfg.io_timeout;
                    let long = self.long_ops.load(Ordering::Relaxed) > 0;
                    if !long || waited >= self.cfg.io_timeout * LONG_OP_FACTOR {
                        return Err(LinkError::Timeout);
                    }
                }
            }
        }
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn slot(&self, i: usize) -> Arc<Slot> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())[i].clone()
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.slots()
            .iter()
            .position(|s| s.id == id && !s.removed.load(Ordering::Relaxed))
    }

    /// Flushes every replica each `every` while data-changing requests come in, and once
    /// more after they stop: a replica clears a dirty-log mark at the second flush that saw
    /// no write to the region, so two flushes after the last write leave no mark behind.
    async fn flush_loop(
        engine: std::sync::Weak<Engine>,
        wake: Arc<tokio::sync::Notify>,
        every: Duration,
    ) {
        let mut one_more = false;
        loop {
            tokio::time::sleep(every).await;
            let Some(e) = engine.upgrade() else { return };
            if e.closing.load(Ordering::Relaxed) {
                return;
            }
            let wrote = e.unflushed.swap(0, Ordering::Relaxed) > 0;
            if !wrote && !one_more {
                // Quiet: sleep until a request changes data (no timer per idle volume).
                drop(e);
                wake.notified().await;
                continue;
            }
            one_more = wrote;
            if e.fanout(Request::Flush).await.is_ok() {
                e.background_flushes.fetch_add(1, Ordering::Relaxed);
                if !wrote && e.unflushed.load(Ordering::Relaxed) == 0 {
                    e.settled.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// After a restart, makes every RW replica equal to the first one in every region some
    /// replica's dirty-region log marks: only there can writes that were in flight when the
    /// previous engine died have reached some replicas and not others. Runs before the
    /// volume is served. A replica that fails during it goes to ERR. Returns true when the
    /// source failed, so the caller must run it again with the next source.
    async fn resync_dirty(&self) -> bool {
        let rw: Vec<usize> = {
            let set = lock(&self.set);
            (0..set.modes().len())
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
        tracing::info!(regions = regions.len(), source = %self.slot(source).id, "resyncing dirty regions after restart");
        for r in regions {
            let offset = r * region_size;
            let size = self.size.load(Ordering::Acquire);
            if offset >= size {
                continue;
            }
            let len = region_size.min(size - offset);
            for &t in targets {
                if lock(&self.set).mode(t) != Mode::Rw {
                    continue;
                }
                match self.copy_unserved(source, t, offset, len).await {
                    Ok(bytes) => {
                        self.resynced_bytes.fetch_add(bytes, Ordering::Relaxed);
                    }
                    Err(heal::HealError::Target(e)) => self.fail(t, &e).await,
                    Err(e) => {
                        // Without the source's copy the targets cannot be trusted to match.
                        tracing::error!(error = %e, offset, "resync source failed");
                        let why = match e {
                            heal::HealError::Source(l) => l,
                            other => LinkError::Closed(other.to_string()),
                        };
                        self.fail(source, &why).await;
                        return true;
                    }
                }
            }
            self.resynced.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    pub fn status(&self) -> VolumeStatus {
        let set = lock(&self.set).clone();
        let outages: Vec<Option<u64>> = {
            let o = lock(&self.outages);
            (0..set.modes().len()).map(|i| o.marked(i)).collect()
        };
        VolumeStatus {
            volume: self.cfg.volume.clone(),
            size: self.size.load(Ordering::Acquire),
            epoch: self.cfg.epoch,
            replicas: self
                .slots()
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.removed.load(Ordering::Relaxed))
                .map(|(i, s)| {
                    let h = lock(&s.heal);
                    let rebuild = h.job.clone().map(|mut j| {
                        if j.state == JobState::Running {
                            if let Some(t) = h.started {
                                j.elapsed_ms =
                                    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
                            }
                        }
                        j
                    });
                    ReplicaStatus {
                        id: s.id.clone(),
                        addr: lock(&s.addr).to_string(),
                        mode: set.mode(i),
                        reads: s.stats.reads.load(Ordering::Relaxed),
                        writes: s.stats.writes.load(Ordering::Relaxed),
                        errors: s.stats.errors.load(Ordering::Relaxed),
                        corrupt_reads: s.stats.corrupt_reads.load(Ordering::Relaxed),
                        last_error: lock(&s.last_error).clone(),
                        last_resync_bytes: s.last_resync_bytes.load(Ordering::Relaxed),
                        outage_regions: outages.get(i).copied().flatten(),
                        rebuild,
                        auto_heal: h.auto,
                        chain: lock(&s.identity)
                            .as_ref()
                            .map(|id| id.chain.iter().map(|c| c.0.clone()).collect()),
                    }
                })
                .collect(),
            read_repairs: self.read_repairs.load(Ordering::Relaxed),
            resynced_regions: self.resynced.load(Ordering::Relaxed),
            resynced_bytes: self.resynced_bytes.load(Ordering::Relaxed),
            background_flushes: self.background_flushes.load(Ordering::Relaxed),
            flushes_settled: self.settled.load(Ordering::Relaxed),
            outage_region_bytes: OUTAGE_REGION,
            rebuild_rate: self.rebuild_rate.load(Ordering::Relaxed),
            superseded_by_epoch: match self.superseded.load(Ordering::Relaxed) {
                0 => None,
                e => Some(e),
            },
        }
    }

    /// Content digest of every RW replica, asked after every write submitted before this
    /// call: `(replica id, Ok((hex digest, size)) or error)`.
    pub async fn digests(&self) -> Vec<(String, Result<(String, u64), String>)> {
        self.long_ops.fetch_add(1, Ordering::Relaxed);
        let _done = LongOp(&self.long_ops);
        let futs = {
            let _g = self.submit.lock().await;
            let targets: Vec<usize> = {
                let set = lock(&self.set);
                (0..set.modes().len())
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
            let r = match tokio::time::timeout(self.cfg.io_timeout * LONG_OP_FACTOR, f).await {
                Ok(Ok(ReplyBody::Digest { digest, size })) => Ok((hex::encode(digest), size)),
                Ok(Ok(other)) => Err(format!("unexpected reply {other:?}")),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_owned()),
            };
            out.push((self.slot(i).id.clone(), r));
        }
        out
    }

    /// Replica `id` now listens on `addr` (its server was restarted): the next attempt to
    /// bring it back is due at once.
    pub fn set_replica_addr(&self, id: &str, addr: SocketAddr) {
        if let Some(i) = self.index_of(id) {
            let slot = self.slot(i);
            *lock(&slot.addr) = addr;
            lock(&slot.heal).poke();
            self.heal_wake.notify_one();
        }
    }

    /// Adds a replica served at `addr` (created there if missing); it is rebuilt from an RW
    /// replica and turns RW when done. Returns its id (`id`, or the next free `rN`).
    pub async fn add_replica(
        &self,
        id: Option<String>,
        addr: SocketAddr,
    ) -> Result<String, String> {
        if !self.cfg.heal.enabled {
            return Err("healing is off (--no-heal): replicas cannot be added".into());
        }
        let id = {
            let _g = self.submit.lock().await;
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            let live = |name: &str| {
                slots
                    .iter()
                    .any(|s| s.id == name && !s.removed.load(Ordering::Relaxed))
            };
            let id = match id {
                Some(id) if live(&id) => return Err(format!("replica {id} already exists")),
                Some(id) => id,
                None => (1..)
                    .map(|n| format!("r{n}"))
                    .find(|c| !slots.iter().any(|s| &s.id == c))
                    .unwrap_or_default(),
            };
            if !id_is_valid(&id) {
                return Err(format!(
                    "replica id {id:?} must be 1-128 of [A-Za-z0-9._-], not starting with '.'"
                ));
            }
            if slots
                .iter()
                .filter(|s| !s.removed.load(Ordering::Relaxed))
                .any(|s| *lock(&s.addr) == addr)
            {
                return Err(format!("a replica of this volume already uses {addr}"));
            }
            slots.push(Arc::new(Slot::new(id.clone(), addr)));
            lock(&self.set).add(Mode::Err);
            id
        };
        self.persist().await;
        self.heal_wake.notify_one();
        tracing::info!(replica = %id, %addr, "replica added; rebuilding");
        Ok(id)
    }

    /// Takes replica `id` out of the volume (its data stays where it is). Refused when it
    /// is the last RW replica.
    pub async fn remove_replica(&self, id: &str) -> Result<(), String> {
        let i = self
            .index_of(id)
            .ok_or_else(|| format!("no replica {id}"))?;
        let slot = self.slot(i);
        lock(&slot.heal).cancel.store(true, Ordering::Relaxed);
        {
            let _g = self.submit.lock().await;
            let mut o = lock(&self.outages);
            let mut set = lock(&self.set);
            let rw = (0..set.modes().len())
                .filter(|&k| set.mode(k) == Mode::Rw)
                .count();
            if set.mode(i) == Mode::Rw && rw == 1 {
                lock(&slot.heal).cancel.store(false, Ordering::Relaxed);
                return Err(format!("{id} is the last RW replica"));
            }
            set.fail(i);
            drop(o.take(i));
            slot.removed.store(true, Ordering::Relaxed);
        }
        drop(lock(&slot.link).take());
        self.persist().await;
        tracing::info!(replica = %id, "replica removed from the volume");
        Ok(())
    }

    /// Stops replica `id`'s running rebuild or resync; the replica goes to ERR and waits
    /// for [`start_rebuild`](Self::start_rebuild).
    pub fn cancel_rebuild(&self, id: &str) -> Result<(), String> {
        let i = self
            .index_of(id)
            .ok_or_else(|| format!("no replica {id}"))?;
        let slot = self.slot(i);
        let h = lock(&slot.heal);
        if !h.running {
            return Err(format!("{id} has no rebuild running"));
        }
        h.cancel.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Lets an ERR replica be brought back again (after a cancel), at once.
    pub fn start_rebuild(&self, id: &str) -> Result<(), String> {
        if !self.cfg.heal.enabled {
            return Err("healing is off (--no-heal)".into());
        }
        let i = self
            .index_of(id)
            .ok_or_else(|| format!("no replica {id}"))?;
        if lock(&self.set).mode(i) != Mode::Err {
            return Err(format!("{id} is not ERR"));
        }
        let slot = self.slot(i);
        let mut h = lock(&slot.heal);
        h.auto = true;
        h.poke();
        drop(h);
        self.heal_wake.notify_one();
        Ok(())
    }

    /// Changes the rebuild rate limit (bytes per second, 0 for none); applies to running
    /// jobs from their next chunk.
    pub fn set_rebuild_rate(&self, bytes_per_sec: u64) {
        self.rebuild_rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Snapshots of the volume, oldest first, as the first RW replica lists them.
    pub async fn snapshots(&self) -> Result<Vec<cairn_wire::SnapshotInfo>, DevError> {
        let order = lock(&self.set).read_order();
        for i in order {
            match self.answer(self.send(i, Request::SnapshotList)).await {
                Ok(ReplyBody::Snapshots(s)) => return Ok(s),
                Ok(other) => {
                    let e = LinkError::Closed(format!("unexpected reply {other:?}"));
                    self.fail(i, &e).await;
                }
                Err(e) => self.fail(i, &e).await,
            }
        }
        Err(DevError::Io("no replica could list snapshots".into()))
    }

    /// Takes snapshot `name` on every RW and WO replica, crash-consistent: new writes are
    /// held (the submit lock), the requests already queued are drained (every target has
    /// answered them), then SnapshotCreate goes to every target under one name and creation
    /// time, and writes resume once every target answered. So every replica's snapshot holds
    /// the same writes: all that were submitted before, none after. Refused while a rebuild
    /// or resync runs (its target would miss it) and for a name in use. Succeeds when at
    /// least one RW replica took it; a replica that fails it goes to ERR (and is rebuilt
    /// with the chain).
    pub async fn snapshot_create(
        &self,
        name: &str,
        labels: Vec<(String, String)>,
    ) -> Result<SnapshotCreated, String> {
        self.snapshot_check(name, true).await?;
        // Each replica flushes its head before freezing it. Flushing first, while writes
        // still flow, leaves only what comes in meanwhile for that flush: under a random
        // write load this cut the pause from ~140 ms to a few (bench/snapshots.sh).
        self.fanout(Request::Flush)
            .await
            .map_err(|e| format!("flush before the snapshot failed: {e}"))?;
        let created_unix_ms = heal::unix_ms();
        let req = Request::SnapshotCreate {
            name: name.to_owned(),
            created_unix_ms,
            labels,
        };
        let (pause, failed, outcome) = {
            let _g = self.submit.lock().await;
            let held = std::time::Instant::now();
            if self.slots().iter().any(|s| lock(&s.heal).running) {
                return Err("a rebuild or resync is running; try again when it is done".into());
            }
            let modes: Vec<(usize, Mode)> = {
                let set = lock(&self.set);
                set.write_targets()
                    .into_iter()
                    .map(|i| (i, set.mode(i)))
                    .collect()
            };
            if modes.is_empty() {
                return Err("no replica is left".into());
            }
            // Drain: a replica answers in order, so its answer to a Ping queued now means it
            // has answered every request queued before.
            let drains = modes.iter().map(|&(i, _)| {
                let f = self.send(i, Request::Ping);
                async move { (i, self.answer(f).await) }
            });
            let mut failed = Vec::new();
            let mut live = Vec::new();
            for (i, r) in futures::future::join_all(drains).await {
                match r {
                    Ok(_) => live.push(i),
                    Err(e) => failed.push((i, e)),
                }
            }
            let creates = live.iter().map(|&i| {
                let f = self.send(i, req.clone());
                async move { (i, self.answer(f).await) }
            });
            let results = futures::future::join_all(creates).await;
            let mut fan = Fanout::new(modes);
            let mut outcome = None;
            for &(i, _) in &failed {
                outcome = fan.complete(i, false).or(outcome);
            }
            for (i, r) in results {
                outcome = fan.complete(i, r.is_ok()).or(outcome);
                if let Err(e) = r {
                    failed.push((i, e));
                }
            }
            // Replicas that missed the snapshot leave the set before any later write
            // reaches them (their chain differs: they are rebuilt with it).
            for (i, e) in &failed {
                self.fail(*i, e).await;
            }
            (held.elapsed(), failed, outcome)
        };
        if outcome != Some(Outcome::Done) {
            let why = failed
                .first()
                .map_or_else(|| "no replica took it".to_owned(), |(_, e)| e.to_string());
            return Err(format!("snapshot {name} failed: {why}"));
        }
        self.remember_chains().await;
        Ok(SnapshotCreated {
            created_unix_ms,
            pause_us: u64::try_from(pause.as_micros()).unwrap_or(u64::MAX),
        })
    }

    /// Deletes snapshot `name` on every RW and WO replica (its data merges into its child).
    pub async fn snapshot_delete(&self, name: &str) -> Result<(), String> {
        self.snapshot_op(name, false, || Request::SnapshotDelete {
            name: name.to_owned(),
        })
        .await
    }

    async fn snapshot_op(
        &self,
        name: &str,
        create: bool,
        req: impl Fn() -> Request,
    ) -> Result<(), String> {
        self.snapshot_check(name, create).await?;
        self.fanout(req()).await.map_err(|e| e.to_string())?;
        self.remember_chains().await;
        Ok(())
    }

    /// Refuses a bad name, a running job, a name in use (`create`) or an unknown one.
    async fn snapshot_check(&self, name: &str, create: bool) -> Result<(), String> {
        // Checked here, not left to the replicas: a request every replica refuses would
        // fail them all.
        let valid = !name.is_empty()
            && name.len() <= MAX_SNAPSHOT_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if !valid {
            return Err(format!(
                "snapshot name {name:?} must be 1-{MAX_SNAPSHOT_NAME} characters of [A-Za-z0-9._:-]"
            ));
        }
        if self.slots().iter().any(|s| lock(&s.heal).running) {
            return Err("a rebuild or resync is running; try again when it is done".into());
        }
        let exists = self
            .snapshots()
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .any(|s| s.name == name);
        if create && exists {
            return Err(format!("snapshot {name} already exists"));
        }
        if !create && !exists {
            return Err(format!("no snapshot {name}"));
        }
        Ok(())
    }

    /// The RW replicas' chains changed: remember them, so a replica that missed the change
    /// is not taken for one that can be resynced.
    async fn remember_chains(&self) {
        let rw: Vec<usize> = {
            let set = lock(&self.set);
            (0..set.modes().len())
                .filter(|&i| set.mode(i) == Mode::Rw)
                .collect()
        };
        for i in rw {
            if let Ok(ReplyBody::Status(st)) = self.answer(self.send(i, Request::Status)).await {
                self.remember_identity(i, &st).await;
            }
        }
    }

    /// Queues `req` on replica `i`'s link (FIFO).
    fn send(
        &self,
        i: usize,
        req: Request,
    ) -> impl std::future::Future<Output = Result<ReplyBody, LinkError>> + Send + 'static {
        let link = lock(&self.slot(i).link).clone();
        let fut = link.map(|l| l.submit(req));
        async move {
            match fut {
                Some(f) => f.await,
                None => Err(LinkError::Closed("replica is out of the set".into())),
            }
        }
    }

    /// Before a clean stop: from now on the engine changes no replica's mode (so stopping
    /// the replica servers next does not record them as failed) and starts no job.
    pub fn shutdown(&self) {
        self.closing.store(true, Ordering::Relaxed);
        for s in self.slots() {
            lock(&s.heal).cancel.store(true, Ordering::Relaxed);
        }
        // Let the background loops see it and end.
        self.heal_wake.notify_one();
        self.write_wake.notify_one();
    }

    /// Takes replica `i` out of the set, closes its link and persists the membership. An
    /// RW replica's outage log opens in the same step (see [`outage`]).
    async fn fail(&self, i: usize, why: &LinkError) {
        if self.closing.load(Ordering::Relaxed) {
            return;
        }
        if let LinkError::Remote(e) = why {
            if e.kind == ErrorKind::StaleEpoch
                && e.detail > self.cfg.epoch
                && self.superseded.fetch_max(e.detail, Ordering::Relaxed) == 0
            {
                tracing::error!(
                    epoch = self.cfg.epoch,
                    newer = e.detail,
                    "another engine attached with a newer epoch; this one is fenced out"
                );
            }
        }
        let (changed, was_last) = {
            let mut o = lock(&self.outages);
            let mut set = lock(&self.set);
            let was_rw = set.mode(i) == Mode::Rw;
            let changed = set.fail(i);
            if changed && was_rw && self.cfg.heal.enabled {
                o.open(i);
            }
            (changed, was_rw && !set.has_rw())
        };
        let slot = self.slot(i);
        slot.stats.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&slot.last_error) = Some(why.to_string());
        if changed {
            tracing::error!(replica = %slot.id, error = %why, "replica failed; now ERR");
            let link = lock(&slot.link).take();
            drop(link);
            self.persist_keeping(was_last.then_some(i)).await;
            let mut h = lock(&slot.heal);
            if !h.running {
                h.poke();
            }
            drop(h);
            self.heal_wake.notify_one();
        }
    }

    async fn persist(&self) {
        self.persist_keeping(None).await;
    }

    /// Persists the membership. `last` is a replica that failed while being the last RW
    /// one: it is recorded as RW all the same, since it holds every acknowledged write and
    /// a restarted engine must be able to serve from it.
    async fn persist_keeping(&self, last: Option<usize>) {
        let _p = self.persisting.lock().await;
        let members: Vec<ReplicaRecord> = {
            let slots = self.slots();
            let set = lock(&self.set);
            slots
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.removed.load(Ordering::Relaxed))
                .map(|(i, s)| ReplicaRecord {
                    id: s.id.clone(),
                    addr: *lock(&s.addr),
                    mode: if Some(i) == last {
                        Mode::Rw
                    } else {
                        set.mode(i)
                    },
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

    /// `Some(error)` once a replica refused this engine's epoch as older than its own: another
    /// engine attached (a publish on another node). From then on this engine serves no I/O,
    /// so nothing it acknowledges can be lost to the new owner — not even a write that a
    /// replica the new engine could not reach yet still accepted.
    fn fenced(&self) -> Option<DevError> {
        match self.superseded.load(Ordering::Relaxed) {
            0 => None,
            newer => Some(DevError::Io(format!(
                "fenced: an engine with epoch {newer} owns the volume (this one has epoch {})",
                self.cfg.epoch
            ))),
        }
    }

    /// Sends `req` to every write target and waits for all of them.
    async fn fanout(&self, req: Request) -> Result<(), DevError> {
        if let Some(e) = self.fenced() {
            return Err(e);
        }
        let range = match &req {
            Request::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            Request::WriteZeroes { offset, len, .. } | Request::Trim { offset, len, .. } => {
                Some((*offset, *len))
            }
            _ => None,
        };
        let (mut fan, futs, intent) = {
            let _g = self.submit.lock().await;
            let intent = range.map(|(o, l)| lock(&self.outages).begin(o, l));
            let (targets, modes) = {
                let set = lock(&self.set);
                let t = set.write_targets();
                let m: Vec<(usize, Mode)> = t.iter().map(|&i| (i, set.mode(i))).collect();
                (t, m)
            };
            if let Some((o, l)) = range {
                lock(&self.tracker).touch(o, l);
            }
            if targets.is_empty() {
                if let Some(id) = intent {
                    lock(&self.outages).end(id);
                }
                return Err(DevError::Io("no replica is left".into()));
            }
            let futs: Vec<_> = targets
                .iter()
                .map(|&i| {
                    let f = self.send(i, req.clone());
                    async move { (i, self.answer(f).await) }
                })
                .collect();
            (Fanout::new(modes), futs, intent)
        };
        let results = futures::future::join_all(futs).await;
        let mut first_err = None;
        let mut outcome = None;
        for (i, r) in results {
            match &r {
                Ok(_) => {
                    self.slot(i).stats.writes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    first_err.get_or_insert_with(|| dev_error(e));
                    self.fail(i, e).await;
                }
            }
            outcome = fan.complete(i, r.is_ok()).or(outcome);
        }
        if let Some(id) = intent {
            lock(&self.outages).end(id);
            if self.unflushed.fetch_add(1, Ordering::Relaxed) == 0 {
                self.write_wake.notify_one();
            }
            self.settled.store(false, Ordering::Relaxed);
        }
        if let Some(e) = self.fenced() {
            return Err(e);
        }
        match outcome {
            Some(Outcome::Done) => Ok(()),
            _ => {
                Err(first_err.unwrap_or_else(|| DevError::Io("no replica took the request".into())))
            }
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DevError> {
        check_range(offset, len, self.size.load(Ordering::Acquire), 4096)
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
                    tracing::warn!(replica = %self.slot(i).id, offset, len, "read repair");
                }
                Err(e) => self.fail(i, &e).await,
            }
        }
    }
}

/// Counts a volume-long request until dropped.
struct LongOp<'a>(&'a AtomicU64);

impl Drop for LongOp<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Same rule as the replica server's names: 1-128 of `[A-Za-z0-9._-]`, no leading dot.
fn id_is_valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl BlockDevice for Engine {
    /// The current size: new NBD connections sample it at their handshake.
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn max_io(&self) -> u32 {
        16 << 20
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DevError> {
        self.check(offset, u64::from(len))?;
        if let Some(e) = self.fenced() {
            return Err(e);
        }
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
                    self.slot(i).stats.reads.fetch_add(1, Ordering::Relaxed);
                    if !corrupt.is_empty() {
                        self.repair(offset, len, i, &corrupt).await;
                    }
                    return Ok(data);
                }
                Ok(_) => {
                    // Damaged on the wire or a bad reply: never returned.
                    self.slot(i)
                        .stats
                        .corrupt_reads
                        .fetch_add(1, Ordering::Relaxed);
                    corrupt.push(i);
                }
                Err(LinkError::Remote(e)) if e.kind == ErrorKind::Corruption => {
                    tracing::warn!(replica = %self.slot(i).id, offset = e.detail, "replica reports a corrupt block");
                    self.slot(i)
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

/// The epoch replica `replica_id` of `volume` at `addr` has accepted (0 when it does not
/// exist yet), asked without attaching: a Hello at epoch 0 that a used replica refuses.
/// An engine that shares replicas with others starts above the highest of these.
pub async fn probe_epoch(
    addr: SocketAddr,
    volume: &str,
    replica_id: &str,
    timeout: Duration,
) -> Result<u64, LinkError> {
    let attached = tokio::time::timeout(
        timeout,
        Link::connect(addr, volume, replica_id, 0, 0, false),
    )
    .await
    .unwrap_or(Err(LinkError::Timeout));
    match attached {
        Ok((_, status)) => Ok(status.epoch),
        Err(LinkError::Remote(e)) if e.kind == ErrorKind::StaleEpoch => Ok(e.detail),
        Err(LinkError::Remote(e)) if e.kind == ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}
