//! Moving a volume's data in bulk from the command line: reading a snapshot straight from
//! one of the volume's replicas (what backups and clones read), and filling a new volume
//! through its own engine (what restores and clones write).
//!
//! Guarantees:
//! - [`ReplicaSnapshot`] reads the content as of the snapshot (`LayerRef::MergedAt`: the
//!   snapshot's layer over its ancestors) from one RW replica, attached beside the engine
//!   at the replica's current epoch without taking it over, so it works whether the volume
//!   is attached or not and never disturbs the engine. Every 4 KiB block read is checked
//!   against the CRC the replica sent with it.
//! - [`fill_new_volume`] creates the volume, attaches it to one node, writes through that
//!   node's NBD export (so the engine sends every block to every replica, at an epoch meta
//!   raised for this attachment), flushes, and detaches. If anything fails after the
//!   volume was created, the volume is detached and deleted again: a half-filled volume is
//!   never left behind under the new name.
//!
//! Assumes the volume's snapshot layers are immutable while they are read (they are: only
//! the head takes writes; a snapshot deleted meanwhile makes the read fail, not lie).

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cairn_backup::{RestoreSink, SnapshotSource};
use cairn_engine::{Link, LinkError};
use cairn_nbd::NbdClient;
use cairn_proto::v1::{record, DataLocality, Kind, Node, NodeState, ReplicaMode, Volume};
use cairn_wire::{LayerRef, ReplyBody, Request, SnapshotInfo};

use crate::records::{self, user_error};
use crate::volume;

/// How long one request to a replica may take.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(30);
/// Extents are listed this many bytes at a time (bounds one reply).
const EXTENT_SLICE: u64 = 1 << 30;
/// Bytes per read and write when copying a volume.
pub const COPY_CHUNK: u64 = 2 << 20;

/// Snapshot `snapshot` of a volume, read from one of its replicas.
pub struct ReplicaSnapshot {
    link: Link,
    size: u64,
    layer: LayerRef,
    /// Replica read from.
    pub replica: String,
    /// The replica's snapshots (its whole layer tree), as listed when opened.
    pub snapshots: Vec<SnapshotInfo>,
}

/// Up nodes by name.
pub async fn up_nodes(meta: &str) -> anyhow::Result<BTreeMap<String, Node>> {
    Ok(records::list(meta, Kind::Node, None, None)
        .await?
        .into_iter()
        .filter_map(|r| match r {
            record::Record::Node(n) if n.state == NodeState::Up as i32 => Some((n.name.clone(), n)),
            _ => None,
        })
        .collect())
}

async fn answer(link: &Link, req: Request) -> Result<ReplyBody, LinkError> {
    tokio::time::timeout(REPLICA_TIMEOUT, link.submit(req))
        .await
        .unwrap_or(Err(LinkError::Timeout))
}

impl ReplicaSnapshot {
    /// Opens snapshot `snapshot` of volume `v` on the first RW replica (on an up node) that
    /// answers and holds it.
    pub async fn open(meta: &str, v: &Volume, snapshot: &str) -> anyhow::Result<Self> {
        let nodes = up_nodes(meta).await?;
        let replicas = records::list(meta, Kind::Replica, Some(&v.name), None).await?;
        let mut tried = Vec::new();
        for r in replicas {
            let record::Record::Replica(r) = r else {
                continue;
            };
            if r.deleted || r.volume != v.name || r.mode != ReplicaMode::Rw as i32 {
                continue;
            }
            let Some(addr) = nodes
                .get(&r.node)
                .and_then(|n| n.address.parse::<SocketAddr>().ok())
            else {
                tried.push(format!("{}: node {} is not up", r.name, r.node));
                continue;
            };
            match Self::open_at(addr, v, &r.name, snapshot).await {
                Ok(s) => return Ok(s),
                Err(e) => tried.push(format!("{}: {e:#}", r.name)),
            }
        }
        if tried.is_empty() {
            tried.push("no RW replica".into());
        }
        Err(user_error(format!(
            "cannot read snapshot {snapshot} of volume {}: {}",
            v.name,
            tried.join("; ")
        )))
    }

    async fn open_at(
        addr: SocketAddr,
        v: &Volume,
        replica: &str,
        snapshot: &str,
    ) -> anyhow::Result<Self> {
        let epoch = cairn_engine::probe_epoch(addr, &v.name, replica, REPLICA_TIMEOUT).await?;
        if epoch == 0 {
            anyhow::bail!("the replica holds no data yet");
        }
        let (link, status) = tokio::time::timeout(
            REPLICA_TIMEOUT,
            Link::connect(addr, &v.name, replica, 0, epoch, false),
        )
        .await
        .unwrap_or(Err(LinkError::Timeout))?;
        let snapshots = match answer(&link, Request::SnapshotList).await? {
            ReplyBody::Snapshots(s) => s,
            other => anyhow::bail!("SnapshotList answered {other:?}"),
        };
        if !snapshots.iter().any(|s| s.name == snapshot) {
            anyhow::bail!("it holds no snapshot {snapshot}");
        }
        Ok(ReplicaSnapshot {
            link,
            size: status.size,
            layer: LayerRef::MergedAt(snapshot.to_owned()),
            replica: replica.to_owned(),
            snapshots,
        })
    }

    /// The replica's record of snapshot `name`.
    pub fn info(&self, name: &str) -> Option<&SnapshotInfo> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    /// Byte ranges that may differ between snapshot `parent` and the snapshot read: the
    /// extents of every layer after `parent` up to and including it. `None` when `parent`
    /// is not an ancestor of it (deleted, or on another branch after a revert).
    pub async fn changed_since(&self, parent: &str) -> anyhow::Result<Option<Vec<Range<u64>>>> {
        let LayerRef::MergedAt(me) = &self.layer else {
            unreachable!("a ReplicaSnapshot reads MergedAt");
        };
        let mut between = Vec::new();
        let mut cur = Some(me.clone());
        loop {
            match cur {
                None => return Ok(None),
                Some(n) if n == parent => break,
                Some(n) => {
                    let next = self.info(&n).and_then(|s| s.parent.clone());
                    between.push(n);
                    if between.len() > self.snapshots.len() {
                        return Ok(None); // a cycle: corrupt listing, read everything
                    }
                    cur = next;
                }
            }
        }
        let mut out: Vec<Range<u64>> = Vec::new();
        for name in between {
            out.extend(self.extents(&LayerRef::Snapshot(name)).await?);
        }
        out.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in out {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        Ok(Some(merged))
    }

    async fn extents(&self, layer: &LayerRef) -> io::Result<Vec<Range<u64>>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut at = 0;
        while at < self.size {
            let len = EXTENT_SLICE.min(self.size - at);
            let req = Request::ListExtents {
                layer: layer.clone(),
                offset: at,
                len,
            };
            match answer(&self.link, req).await.map_err(io::Error::other)? {
                ReplyBody::Extents(e) => {
                    for (o, l) in e {
                        match out.last_mut() {
                            Some(last) if last.end == o => last.end = o + l,
                            _ => out.push(o..o + l),
                        }
                    }
                }
                other => return Err(io::Error::other(format!("ListExtents answered {other:?}"))),
            }
            at += len;
        }
        Ok(out)
    }
}

impl SnapshotSource for ReplicaSnapshot {
    fn size(&self) -> u64 {
        self.size
    }

    async fn allocated(&self) -> io::Result<Vec<Range<u64>>> {
        self.extents(&self.layer).await
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let len32 = u32::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let req = Request::ReadLayer {
            layer: self.layer.clone(),
            offset,
            len: len32,
        };
        match answer(&self.link, req).await.map_err(io::Error::other)? {
            ReplyBody::Data { crcs, data } if data.len() == len => {
                if cairn_wire::block_crcs(&data) != crcs {
                    return Err(io::Error::other(format!(
                        "replica {} sent data at offset {offset} whose block CRCs do not match",
                        self.replica
                    )));
                }
                Ok(data)
            }
            other => Err(io::Error::other(format!(
                "ReadLayer of {len} bytes at {offset} answered {other:?}"
            ))),
        }
    }
}

/// A new volume's NBD export, as a restore target.
pub struct NbdSink {
    pub client: Arc<NbdClient>,
}

impl RestoreSink for NbdSink {
    fn size(&self) -> u64 {
        self.client.size()
    }

    async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        self.client
            .write(offset, data)
            .await
            .map_err(io::Error::other)
    }

    async fn flush(&self) -> io::Result<()> {
        self.client.flush().await.map_err(io::Error::other)
    }
}

/// A volume to create and fill.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub name: String,
    pub size: u64,
    pub replicas: u32,
    pub data_locality: DataLocality,
    /// Node to attach it to while it is filled; `None`: a node holding one of its replicas.
    pub node: Option<String>,
    /// See `Volume.stale_replica_timeout_seconds`; `None` for the cluster default.
    pub stale_replica_timeout: Option<Duration>,
    /// What it is filled from, e.g. "snapshot vol0/s1" (recorded as `Volume.filling_from`
    /// until the fill is complete).
    pub source: String,
}

/// The node to fill `v` through: `wanted`, or an up node holding one of its replicas
/// (the writes then have one fewer network hop), or any up node serving NBD.
pub async fn fill_node(meta: &str, v: &Volume, wanted: Option<&str>) -> anyhow::Result<String> {
    if let Some(n) = wanted {
        return Ok(n.to_owned());
    }
    let nodes = up_nodes(meta).await?;
    let serving = |n: &str| nodes.get(n).is_some_and(|n| !n.nbd_address.is_empty());
    for r in records::list(meta, Kind::Replica, Some(&v.name), None).await? {
        if let record::Record::Replica(r) = r {
            if !r.deleted && serving(&r.node) {
                return Ok(r.node);
            }
        }
    }
    nodes
        .values()
        .find(|n| !n.nbd_address.is_empty())
        .map(|n| n.name.clone())
        .ok_or_else(|| user_error("no up node serves NBD"))
}

/// Creates `spec` (marked as being filled from `spec.source`), attaches it, runs `fill` with
/// a client of its NBD export, flushes, marks the fill complete and detaches. On any failure
/// after the create, the volume is detached and deleted again; if this process dies, the
/// mark stays and tells that the volume is not a complete copy.
pub async fn fill_new_volume<T, F, Fut>(meta: &str, spec: &NewVolume, fill: F) -> anyhow::Result<T>
where
    F: FnOnce(Arc<NbdClient>) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let v = volume::create_filling_async(
        meta,
        &spec.name,
        spec.size,
        spec.replicas,
        spec.data_locality,
        spec.stale_replica_timeout,
        &spec.source,
    )
    .await?;
    let filled =
        async {
            let node = fill_node(meta, &v, spec.node.as_deref()).await?;
            let (v, n) = volume::attach_async(meta, &spec.name, &node).await?;
            volume::wait_served(&n, &v, Duration::from_secs(60)).await?;
            let addr: SocketAddr = n
                .nbd_address
                .parse()
                .with_context(|| format!("node {node} has no usable NBD address"))?;
            let client = Arc::new(NbdClient::connect(addr, &spec.name).await.with_context(
                || format!("connect to the NBD export of {} on {node}", spec.name),
            )?);
            let out = fill(client.clone()).await?;
            client.flush().await.context("flush the new volume")?;
            client.disconnect().await.context("disconnect")?;
            volume::fill_done(meta, &spec.name).await?;
            anyhow::Ok(out)
        }
        .await;
    match filled {
        Ok(out) => {
            volume::detach_async(meta, &spec.name).await?;
            Ok(out)
        }
        Err(e) => {
            let cleanup = async {
                volume::detach_async(meta, &spec.name).await?;
                volume::delete_async(meta, &spec.name).await
            }
            .await;
            match cleanup {
                Ok(()) => Err(e.context(format!("volume {} was deleted again", spec.name))),
                Err(c) => Err(e.context(format!(
                    "volume {} is left half-filled; deleting it failed: {c:#}",
                    spec.name
                ))),
            }
        }
    }
}

/// What a clone copied.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CopyResult {
    /// Bytes of allocated extents read from the source replica.
    pub bytes_read: u64,
    /// Bytes written to the new volume (chunks that were not all zeros).
    pub bytes_written: u64,
    pub seconds: f64,
}

/// Copies every allocated extent of `src` into `dst` in [`COPY_CHUNK`] pieces,
/// `concurrency` at a time; all-zero pieces are skipped (the new volume reads as zeros).
pub async fn copy_snapshot(
    src: &ReplicaSnapshot,
    dst: &NbdClient,
    concurrency: usize,
    progress: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<CopyResult> {
    use futures::StreamExt;
    let start = std::time::Instant::now();
    let ranges = src
        .allocated()
        .await
        .context("list the snapshot's extents")?;
    let mut pieces = Vec::new();
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let len = COPY_CHUNK.min(r.end - at);
            pieces.push((at, len));
            at += len;
        }
    }
    let total: u64 = pieces.iter().map(|p| p.1).sum();
    if let Some(p) = progress {
        p.set_length(total);
    }
    let mut out = CopyResult::default();
    let mut copies = futures::stream::iter(pieces)
        .map(|(at, len)| async move {
            let n = usize::try_from(len).context("chunk size")?;
            let data = src.read(at, n).await.with_context(|| {
                format!("read {len} bytes at {at} from replica {}", src.replica)
            })?;
            let written = if data.iter().all(|&b| b == 0) {
                0
            } else {
                dst.write(at, data)
                    .await
                    .with_context(|| format!("write {len} bytes at {at}"))?;
                len
            };
            anyhow::Ok((len, written))
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(r) = copies.next().await {
        let (read, written) = r?;
        out.bytes_read += read;
        out.bytes_written += written;
        if let Some(p) = progress {
            p.inc(read);
        }
    }
    out.seconds = start.elapsed().as_secs_f64();
    Ok(out)
}
