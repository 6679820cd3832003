//! The local control endpoint of `cairn dev`: newline-delimited JSON over TCP on loopback.
//!
//! Request: one line such as `{"op":"status","volume":"vol0"}` (ops: status, verify,
//! replica_add, replica_remove, rebuild_cancel, rebuild_start, rebuild_rate,
//! snapshot_create, snapshot_delete, snapshot_list). Reply: one line, `{"status":...}`,
//! `{"verify":[...]}`, `{"done":"..."}`, `{"snapshots":[...]}`,
//! `{"snapshot_created":{...}}` or `{"error":"..."}`. Clients: the `cairn volume` and
//! `cairn snapshot` commands (which find a volume's endpoint through meta).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use cairn_engine::VolumeStatus;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Default address of the control endpoint.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:10810";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Status {
        volume: String,
    },
    Verify {
        volume: String,
    },
    ReplicaAdd {
        volume: String,
        address: SocketAddr,
        id: Option<String>,
    },
    ReplicaRemove {
        volume: String,
        replica: String,
    },
    RebuildCancel {
        volume: String,
        replica: String,
    },
    RebuildStart {
        volume: String,
        replica: String,
    },
    RebuildRate {
        volume: String,
        bytes_per_sec: u64,
    },
    /// Crash-consistent snapshot of every replica; replies `SnapshotCreated`.
    SnapshotCreate {
        volume: String,
        name: String,
        /// Key/value labels stored with the snapshot on every replica.
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    SnapshotDelete {
        volume: String,
        name: String,
    },
    SnapshotList {
        volume: String,
    },
}

impl ControlRequest {
    fn volume(&self) -> &str {
        match self {
            ControlRequest::Status { volume }
            | ControlRequest::Verify { volume }
            | ControlRequest::ReplicaAdd { volume, .. }
            | ControlRequest::ReplicaRemove { volume, .. }
            | ControlRequest::RebuildCancel { volume, .. }
            | ControlRequest::RebuildStart { volume, .. }
            | ControlRequest::RebuildRate { volume, .. }
            | ControlRequest::SnapshotCreate { volume, .. }
            | ControlRequest::SnapshotDelete { volume, .. }
            | ControlRequest::SnapshotList { volume } => volume,
        }
    }
}

/// One replica's digest as `verify` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaDigest {
    pub replica: String,
    pub digest: Option<String>,
    pub size: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlReply {
    Status(serde_json::Value),
    Verify(Vec<ReplicaDigest>),
    /// A change was made; what it was.
    Done(String),
    /// Snapshots, oldest first.
    Snapshots(Vec<SnapshotView>),
    /// A snapshot was taken.
    #[serde(rename = "snapshot_created")]
    SnapshotCreated(SnapshotCreatedView),
    Error(String),
}

pub use cairn_agent::Engines;

/// Serves the endpoint for the volumes in `engines` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, engines: Arc<Engines>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let engines = engines.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<ControlRequest>(&line) {
                    Ok(req) => handle(req, &engines).await,
                    Err(e) => ControlReply::Error(format!("bad request: {e}")),
                };
                let mut out = serde_json::to_string(&reply)
                    .unwrap_or_else(|e| format!("{{\"error\":\"cannot encode reply: {e}\"}}"));
                out.push('\n');
                if wr.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn handle(req: ControlRequest, engines: &Engines) -> ControlReply {
    let asked = req.volume();
    let Some(engine) = engines.get(asked) else {
        let here = engines.names();
        return ControlReply::Error(if here.is_empty() {
            format!("no volume {asked:?} here (no volume is attached to this node)")
        } else {
            format!(
                "no volume {asked:?} here (this node serves {})",
                here.join(", ")
            )
        });
    };
    if engines.is_managed()
        && matches!(
            req,
            ControlRequest::ReplicaAdd { .. } | ControlRequest::ReplicaRemove { .. }
        )
    {
        return ControlReply::Error(
            "replicas of this volume are placed by the metadata service; change the volume's \
             replica count there instead"
                .into(),
        );
    }
    match req {
        ControlRequest::Status { .. } => match serde_json::to_value(engine.status()) {
            Ok(v) => ControlReply::Status(v),
            Err(e) => ControlReply::Error(e.to_string()),
        },
        ControlRequest::Verify { .. } => ControlReply::Verify(
            engine
                .digests()
                .await
                .into_iter()
                .map(|(replica, r)| match r {
                    Ok((digest, size)) => ReplicaDigest {
                        replica,
                        digest: Some(digest),
                        size: Some(size),
                        error: None,
                    },
                    Err(e) => ReplicaDigest {
                        replica,
                        digest: None,
                        size: None,
                        error: Some(e),
                    },
                })
                .collect(),
        ),
        ControlRequest::ReplicaAdd { address, id, .. } => {
            match engine.add_replica(id, address).await {
                Ok(id) => ControlReply::Done(id),
                Err(e) => ControlReply::Error(e),
            }
        }
        ControlRequest::ReplicaRemove { replica, .. } => done(
            engine.remove_replica(&replica).await,
            format!("removed {replica}"),
        ),
        ControlRequest::RebuildCancel { replica, .. } => done(
            engine.cancel_rebuild(&replica),
            format!("cancelling the rebuild of {replica}"),
        ),
        ControlRequest::RebuildStart { replica, .. } => done(
            engine.start_rebuild(&replica),
            format!("rebuild of {replica} requested"),
        ),
        ControlRequest::SnapshotCreate { name, labels, .. } => {
            match engine
                .snapshot_create(&name, labels.into_iter().collect())
                .await
            {
                Ok(c) => ControlReply::SnapshotCreated(SnapshotCreatedView {
                    name,
                    created_unix_ms: c.created_unix_ms,
                    pause_us: c.pause_us,
                }),
                Err(e) => ControlReply::Error(e),
            }
        }
        ControlRequest::SnapshotDelete { name, .. } => done(
            engine.snapshot_delete(&name).await,
            format!("snapshot {name} deleted"),
        ),
        ControlRequest::SnapshotList { .. } => match engine.snapshots().await {
            Ok(list) => ControlReply::Snapshots(
                list.into_iter()
                    .map(|s| SnapshotView {
                        name: s.name,
                        parent: s.parent,
                        created_unix_ms: s.created_unix_ms,
                        allocated_bytes: s.allocated_bytes,
                        labels: s.labels.into_iter().collect(),
                    })
                    .collect(),
            ),
            Err(e) => ControlReply::Error(e.to_string()),
        },
        ControlRequest::RebuildRate { bytes_per_sec, .. } => {
            engine.set_rebuild_rate(bytes_per_sec);
            ControlReply::Done(format!("rebuild rate {bytes_per_sec} B/s"))
        }
    }
}

fn done(r: Result<(), String>, what: String) -> ControlReply {
    match r {
        Ok(()) => ControlReply::Done(what),
        Err(e) => ControlReply::Error(e),
    }
}

/// Sends one request to a running `cairn dev` and returns its reply.
pub fn call(endpoint: SocketAddr, req: &ControlRequest) -> anyhow::Result<ControlReply> {
    use std::io::{BufRead, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&endpoint, std::time::Duration::from_secs(5))
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach cairn dev at {endpoint}: {e} (is it running? --endpoint)"
                )
            })?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply)?;
    Ok(serde_json::from_str(&reply)?)
}

/// Status as parsed back by the CLI.
pub fn parse_status(v: serde_json::Value) -> anyhow::Result<VolumeStatusView> {
    Ok(serde_json::from_value(v)?)
}

/// The fields of [`VolumeStatus`] the CLI prints.
#[derive(Debug, Deserialize)]
pub struct VolumeStatusView {
    pub volume: String,
    pub size: u64,
    pub epoch: u64,
    pub replicas: Vec<ReplicaView>,
    pub read_repairs: u64,
}

#[derive(Debug, Deserialize)]
pub struct ReplicaView {
    pub id: String,
    pub addr: String,
    pub mode: String,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub corrupt_reads: u64,
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_resync_bytes: u64,
    #[serde(default)]
    pub rebuild: Option<JobView>,
    #[serde(default = "yes")]
    pub auto_heal: bool,
}

fn yes() -> bool {
    true
}

/// A snapshot as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotView {
    pub name: String,
    pub parent: Option<String>,
    pub created_unix_ms: u64,
    pub allocated_bytes: u64,
    /// Labels given at creation (every replica stores them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What `snapshot_create` replies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotCreatedView {
    pub name: String,
    /// Creation time recorded on every replica.
    pub created_unix_ms: u64,
    /// How long the engine held new writes (drain, snapshot every replica, resume).
    pub pause_us: u64,
}

/// A rebuild or resync job as the CLI prints it.
#[derive(Debug, Deserialize)]
pub struct JobView {
    pub kind: String,
    pub state: String,
    pub phase: String,
    pub source: String,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub bytes_copied: u64,
    pub rate_bytes_per_sec: u64,
    pub error: Option<String>,
}

// Keep the view in step with the engine's type at compile time.
#[allow(dead_code)]
fn _same_fields(s: VolumeStatus) -> (String, u64, u64, u64) {
    (s.volume, s.size, s.epoch, s.read_repairs)
}
