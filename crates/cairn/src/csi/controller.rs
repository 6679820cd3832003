//! The CSI Controller service: volumes, attachments, snapshots and backups through meta.
//!
//! Every call is idempotent: a repeated CreateVolume with the same name and compatible
//! arguments returns the volume it made, a repeated publish to the same node returns the
//! same publish context, deleting or unpublishing what is gone succeeds. Two calls that
//! would change the same volume (or snapshot) at once are not run together: the second
//! gets ABORTED and the CO retries it ([`Inflight`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cairn_csi::pb;
use cairn_csi::pb::controller_server::Controller;
use cairn_proto::v1::{record, BackupState, Kind, Node, NodeState, Snapshot, Volume, VolumeState};
use tonic::{Request, Response, Status};

use super::ids::{cairn_name, SnapshotId};
use super::{check_capability, internal, Inflight, Params};
use crate::backup::{self, TargetArgs};
use crate::records::{self, UserError};
use crate::snapshot;
use crate::volume;
use crate::volume_data::{self, NewVolume, ReplicaSnapshot};

/// Size of a volume whose request gives no capacity: 1 GiB.
const DEFAULT_SIZE: u64 = 1 << 30;
/// How long a publish waits for the node's agent to serve the volume.
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Parallel block copies of a clone or restore.
const COPY_CONCURRENCY: usize = 8;

/// Publish-context key holding the NBD URI of the volume's export.
pub const NBD_URI_KEY: &str = "nbdUri";

pub struct ControllerService {
    meta: String,
    inflight: Inflight,
    /// Backups this process is writing, by backup name.
    backups: Arc<std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>>,
}

impl ControllerService {
    pub fn new(meta: String) -> Self {
        ControllerService {
            meta,
            inflight: Inflight::default(),
            backups: Arc::default(),
        }
    }

    async fn get<T>(
        &self,
        kind: Kind,
        name: &str,
        pick: impl Fn(record::Record) -> Option<T>,
    ) -> Result<Option<T>, Status> {
        let mut client = records::client(&self.meta).map_err(internal)?;
        match records::get(&mut client, &self.meta, kind, name).await {
            Ok(r) => Ok(r.and_then(pick)),
            Err(e) => Err(Status::unavailable(format!("{e:#}"))),
        }
    }

    async fn volume(&self, name: &str) -> Result<Option<Volume>, Status> {
        self.get(Kind::Volume, name, |r| match r {
            record::Record::Volume(v) => Some(v),
            _ => None,
        })
        .await
    }

    async fn node(&self, name: &str) -> Result<Option<Node>, Status> {
        self.get(Kind::Node, name, |r| match r {
            record::Record::Node(n) => Some(n),
            _ => None,
        })
        .await
    }

    async fn snapshot_record(&self, name: &str) -> Result<Option<Snapshot>, Status> {
        self.get(Kind::Snapshot, name, |r| match r {
            record::Record::Snapshot(s) => Some(s),
            _ => None,
        })
        .await
    }

    async fn backup_record(&self, name: &str) -> Result<Option<cairn_proto::v1::Backup>, Status> {
        self.get(Kind::Backup, name, |r| match r {
            record::Record::Backup(b) => Some(b),
            _ => None,
        })
        .await
    }

    async fn list_kind(&self, kind: Kind) -> Result<Vec<record::Record>, Status> {
        records::list(&self.meta, kind, None, None)
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))
    }

    /// Runs `f` while `v` is attached: as it is, or attached for the call to a node that
    /// holds one of its replicas and detached again after (snapshots are taken by the
    /// volume's engine).
    async fn with_engine<T, F, Fut>(&self, v: &Volume, f: F) -> anyhow::Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        if !v.attached_node.is_empty() {
            return f().await;
        }
        let node = volume_data::fill_node(&self.meta, v, None).await?;
        let (att, n) = volume::attach_async(&self.meta, &v.name, &node).await?;
        let out = async {
            volume::wait_served(&n, &att, SERVE_TIMEOUT).await?;
            f().await
        }
        .await;
        let detached = volume::detach_async(&self.meta, &v.name).await;
        let out = out?;
        detached?;
        Ok(out)
    }

    /// Creates `name` with its content from `source` (or empty).
    async fn make_volume(
        &self,
        name: &str,
        size: u64,
        params: &Params,
        source: Option<&Source>,
    ) -> Result<(), Status> {
        let spec = NewVolume {
            name: name.to_owned(),
            size,
            replicas: params.replicas,
            data_locality: params.data_locality,
            node: None,
            stale_replica_timeout: params.stale_timeout,
            source: source.map(Source::describe).unwrap_or_default(),
        };
        let made = match source {
            None => volume::create_async(
                &self.meta,
                name,
                size,
                params.replicas,
                params.data_locality,
                params.stale_timeout,
            )
            .await
            .map(drop),
            Some(Source::Snapshot { volume: src, snap }) => {
                self.clone_snapshot(src, snap, &spec).await
            }
            Some(Source::Backup {
                name: backup,
                target,
            }) => {
                let target = target_args(target, &params.secrets);
                backup::restore(&self.meta, &target, backup, spec.clone(), COPY_CONCURRENCY)
                    .await
                    .map(drop)
            }
            Some(Source::Volume(src)) => self.clone_volume(src, &spec).await,
        };
        made.map_err(internal)?;
        // A restore takes the backup's size; the request may ask for more.
        if let Some(v) = self.volume(name).await? {
            if v.size_bytes < size {
                volume::expand_async(&self.meta, name, size)
                    .await
                    .map_err(expand_status)?;
            }
        }
        Ok(())
    }

    async fn clone_snapshot(&self, src: &str, snap: &str, spec: &NewVolume) -> anyhow::Result<()> {
        let mut client = records::client(&self.meta)?;
        let source = volume::get_volume_async(&mut client, &self.meta, src).await?;
        let reader = ReplicaSnapshot::open(&self.meta, &source, snap).await?;
        let mut spec = spec.clone();
        spec.size = spec.size.max(cairn_backup::SnapshotSource::size(&reader));
        volume_data::fill_new_volume(&self.meta, &spec, |dst| {
            let reader = &reader;
            async move { volume_data::copy_snapshot(reader, &dst, COPY_CONCURRENCY, None).await }
        })
        .await
        .map(drop)
    }

    /// A clone of a volume: a snapshot of it, copied, then deleted again.
    async fn clone_volume(&self, src: &str, spec: &NewVolume) -> anyhow::Result<()> {
        let mut client = records::client(&self.meta)?;
        let source = volume::get_volume_async(&mut client, &self.meta, src).await?;
        let snap = cairn_name(&format!("clone-{}", spec.name));
        let meta = self.meta.clone();
        let taken = self
            .with_engine(&source, || {
                snapshot::create_async(&meta, src, &snap, BTreeMap::new())
            })
            .await;
        if let Err(e) = taken {
            // Taken by an earlier attempt of this clone that did not finish: use it.
            if e.downcast_ref::<UserError>().is_none()
                || self.snapshot_record(&snap).await.ok().flatten().is_none()
            {
                return Err(e);
            }
        }
        let copied = self.clone_snapshot(src, &snap, spec).await;
        let source = volume::get_volume_async(&mut client, &self.meta, src).await?;
        let dropped = self
            .with_engine(&source, || snapshot::delete_async(&meta, src, &snap))
            .await;
        copied?;
        if let Err(e) = dropped {
            tracing::warn!(volume = src, snapshot = snap, error = %format!("{e:#}"), "could not delete the clone's temporary snapshot");
        }
        Ok(())
    }

    fn csi_volume(&self, v: &Volume, context: HashMap<String, String>) -> pb::Volume {
        pb::Volume {
            capacity_bytes: i64::try_from(v.size_bytes).unwrap_or(i64::MAX),
            volume_id: v.name.clone(),
            volume_context: context,
            ..Default::default()
        }
    }

    fn backup_running(&self, name: &str) -> bool {
        let mut map = self.backups.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, h| !h.is_finished());
        map.contains_key(name)
    }

    /// Starts writing backup `name` of `volume`'s snapshot `name` in the background.
    fn start_backup(&self, volume: &str, name: &str, target: TargetArgs) {
        let (meta, volume, backup) = (self.meta.clone(), volume.to_owned(), name.to_owned());
        let args = backup::CreateArgs {
            volume: volume.clone(),
            snapshot: backup.clone(),
            name: backup.clone(),
            concurrency: COPY_CONCURRENCY,
            compression: cairn_backup::Compression::default(),
            full: false,
        };
        let task = tokio::spawn(async move {
            match backup::create(&meta, &target, &args).await {
                Ok(_) => tracing::info!(volume, backup, "backup completed"),
                Err(e) => {
                    tracing::warn!(volume, backup, error = %format!("{e:#}"), "backup failed")
                }
            }
        });
        self.backups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), task);
    }

    async fn delete_local_snapshot(&self, volume: &str, name: &str) -> Result<(), Status> {
        let Some(v) = self.volume(volume).await? else {
            return Ok(());
        };
        let meta = self.meta.clone();
        self.with_engine(&v, || snapshot::delete_async(&meta, volume, name))
            .await
            .map_err(internal)
    }

    fn volume_status(v: &Volume) -> (Vec<String>, Option<pb::VolumeCondition>) {
        let nodes = if v.attached_node.is_empty() {
            vec![]
        } else {
            vec![v.attached_node.clone()]
        };
        (nodes, Some(condition(v)))
    }
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone)]
enum Source {
    Snapshot { volume: String, snap: String },
    Backup { name: String, target: String },
    Volume(String),
}

impl Source {
    /// What the volume record's `filling_from` says while it is filled.
    fn describe(&self) -> String {
        match self {
            Source::Snapshot { volume, snap } => format!("snapshot {volume}/{snap}"),
            Source::Backup { name, .. } => format!("backup {name}"),
            Source::Volume(v) => format!("volume {v}"),
        }
    }
}

/// The volume condition CSI reports for `v`: abnormal while degraded or faulted.
pub fn condition(v: &Volume) -> pb::VolumeCondition {
    let state = VolumeState::try_from(v.state).unwrap_or(VolumeState::Unspecified);
    let abnormal = matches!(state, VolumeState::Degraded | VolumeState::Faulted);
    let message = if v.state_reason.is_empty() {
        state.cli_name().to_owned()
    } else {
        format!("{}: {}", state.cli_name(), v.state_reason)
    };
    pb::VolumeCondition { abnormal, message }
}

/// The S3 settings of a backup target from CSI secrets (`endpoint`, `region`,
/// `access_key_id`, `secret_access_key`), falling back to the environment.
fn target_args(target: &str, secrets: &HashMap<String, String>) -> TargetArgs {
    TargetArgs {
        target: target.to_owned(),
        s3_endpoint: secrets.get("endpoint").cloned(),
        s3_region: secrets.get("region").cloned(),
        s3_access_key_id: secrets.get("access_key_id").cloned(),
        s3_secret_access_key: secrets.get("secret_access_key").cloned(),
        target_config: None,
    }
}

/// An expansion error as the CSI specification codes it.
fn expand_status(e: anyhow::Error) -> Status {
    use volume::ExpandError;
    let msg = format!("{e:#}");
    match e.downcast_ref::<ExpandError>() {
        Some(ExpandError::NotFound(_)) => Status::not_found(msg),
        Some(ExpandError::BadSize(_) | ExpandError::Shrink { .. }) => Status::out_of_range(msg),
        Some(ExpandError::Deleting(_)) => Status::failed_precondition(msg),
        Some(ExpandError::NotServed { .. }) => Status::unavailable(msg),
        _ => internal(e),
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

/// The size for a capacity range: `required` rounded up to 4 KiB (1 GiB when unset),
/// refused when that exceeds `limit`.
fn size_for(range: Option<&pb::CapacityRange>) -> Result<u64, Status> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(invalid("capacity_range: bytes must not be negative"));
    }
    let (required, limit) = (required.unsigned_abs(), limit.unsigned_abs());
    let want = if required == 0 {
        if limit != 0 {
            DEFAULT_SIZE.min(limit / 4096 * 4096)
        } else {
            DEFAULT_SIZE
        }
    } else {
        required
            .checked_next_multiple_of(4096)
            .ok_or_else(|| Status::out_of_range("capacity_range.required_bytes is too large"))?
    };
    if want == 0 || (limit != 0 && want > limit) {
        return Err(Status::out_of_range(format!(
            "capacity_range: no size of whole 4 KiB blocks is ≥ {required} and ≤ {limit} bytes"
        )));
    }
    cairn_proto::validate_volume_size(want).map_err(|e| Status::out_of_range(e.to_string()))?;
    Ok(want)
}

fn fits(size: u64, range: Option<&pb::CapacityRange>) -> bool {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    size >= required.unsigned_abs() && (limit == 0 || size <= limit.unsigned_abs())
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// Pagination over `items`: the token is the index of the next entry.
fn page<T>(items: Vec<T>, max: i32, token: &str) -> Result<(Vec<T>, String), Status> {
    if max < 0 {
        return Err(invalid("max_entries must not be negative"));
    }
    let start = if token.is_empty() {
        0
    } else {
        match token.parse::<usize>() {
            Ok(n) if n <= items.len() => n,
            _ => {
                return Err(Status::aborted(format!(
                    "starting_token {token:?} is not valid"
                )))
            }
        }
    };
    let max = if max == 0 {
        usize::MAX
    } else {
        usize::try_from(max).unwrap_or(usize::MAX)
    };
    let end = start.saturating_add(max).min(items.len());
    let next = if end < items.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok((
        items.into_iter().skip(start).take(end - start).collect(),
        next,
    ))
}

fn snapshot_entry(s: &Snapshot, size: u64) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        snapshot_id: SnapshotId::Local {
            volume: s.volume.clone(),
            name: s.name.clone(),
        }
        .to_id(),
        source_volume_id: s.volume.clone(),
        creation_time: Some(timestamp(s.created_unix_ms)),
        ready_to_use: true,
        ..Default::default()
    }
}

fn backup_entry(b: &cairn_proto::v1::Backup, size: u64) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        snapshot_id: SnapshotId::Backup {
            name: b.name.clone(),
        }
        .to_id(),
        source_volume_id: b.volume.clone(),
        creation_time: Some(timestamp(if b.snapshot_created_unix_ms != 0 {
            b.snapshot_created_unix_ms
        } else {
            b.created_unix_ms
        })),
        ready_to_use: b.state == BackupState::Completed as i32,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(invalid("name is required"));
        }
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities are required"));
        }
        for c in &r.volume_capabilities {
            check_capability(c)?;
        }
        let size = size_for(r.capacity_range.as_ref())?;
        let mut params = Params::parse(&r.parameters)?;
        params.secrets = r.secrets.clone();
        let name = cairn_name(&r.name);
        let source = match r
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            None => params.from_backup.clone().map(|b| Source::Backup {
                name: b,
                target: String::new(),
            }),
            Some(pb::volume_content_source::Type::Snapshot(s)) => {
                match SnapshotId::parse(&s.snapshot_id) {
                    Some(SnapshotId::Local { volume, name }) => {
                        Some(Source::Snapshot { volume, snap: name })
                    }
                    Some(SnapshotId::Backup { name }) => Some(Source::Backup {
                        name,
                        target: String::new(),
                    }),
                    None => {
                        return Err(Status::not_found(format!(
                            "snapshot {:?} does not exist",
                            s.snapshot_id
                        )))
                    }
                }
            }
            Some(pb::volume_content_source::Type::Volume(v)) => {
                Some(Source::Volume(v.volume_id.clone()))
            }
        };
        let _busy = self.inflight.begin(&name)?;
        let context = params.context();
        let mut existing = self.volume(&name).await?;
        if let Some(v) = existing.as_ref().filter(|v| !v.filling_from.is_empty()) {
            // A fill that no call is running (this one holds the name): its process died.
            // The volume is not a complete copy; make it again from the start.
            tracing::warn!(
                volume = name,
                from = v.filling_from,
                "discarding a volume whose fill did not finish"
            );
            volume::detach_async(&self.meta, &name)
                .await
                .map_err(internal)?;
            volume::delete_async(&self.meta, &name)
                .await
                .map_err(internal)?;
            existing = None;
        }
        if let Some(v) = existing {
            if v.state == VolumeState::Deleting as i32 {
                return Err(Status::aborted(format!("volume {name} is being deleted")));
            }
            if !fits(v.size_bytes, r.capacity_range.as_ref()) || v.replica_count != params.replicas
            {
                return Err(Status::already_exists(format!(
                    "volume {name} exists with {} bytes and {} replicas, which this request does not accept",
                    v.size_bytes, v.replica_count
                )));
            }
            let mut vol = self.csi_volume(&v, context);
            vol.content_source = r.volume_content_source;
            return Ok(Response::new(pb::CreateVolumeResponse {
                volume: Some(vol),
            }));
        }
        // Resolve the source: it must exist, and fit in the size asked for.
        let source = match source {
            Some(Source::Snapshot { volume, snap }) => {
                let found = self.snapshot_record(&snap).await?;
                if found.as_ref().is_none_or(|s| s.volume != volume) {
                    return Err(Status::not_found(format!(
                        "snapshot {volume}/{snap} does not exist"
                    )));
                }
                let src = self.volume(&volume).await?.ok_or_else(|| {
                    Status::not_found(format!("volume {volume} of snapshot {snap} does not exist"))
                })?;
                if src.size_bytes > size {
                    return Err(Status::out_of_range(format!(
                        "snapshot {volume}/{snap} holds {} bytes, more than the {size} asked for",
                        src.size_bytes
                    )));
                }
                Some(Source::Snapshot { volume, snap })
            }
            Some(Source::Backup { name: b, .. }) => {
                let rec = self
                    .backup_record(&b)
                    .await?
                    .filter(|r| r.state == BackupState::Completed as i32)
                    .ok_or_else(|| Status::not_found(format!("no completed backup {b}")))?;
                Some(Source::Backup {
                    name: b,
                    target: params.backup_target.clone().unwrap_or(rec.target),
                })
            }
            Some(Source::Volume(src)) => {
                let v = self.volume(&src).await?.ok_or_else(|| {
                    Status::not_found(format!("source volume {src} does not exist"))
                })?;
                if v.size_bytes > size {
                    return Err(Status::out_of_range(format!(
                        "source volume {src} holds {} bytes, more than the {size} asked for",
                        v.size_bytes
                    )));
                }
                let _src_busy = self.inflight.begin(&src)?;
                self.make_volume(&name, size, &params, Some(&Source::Volume(src.clone())))
                    .await?;
                return self.created(&name, context, r.volume_content_source).await;
            }
            None => None,
        };
        self.make_volume(&name, size, &params, source.as_ref())
            .await?;
        self.created(&name, context, r.volume_content_source).await
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        if id.is_empty() {
            return Err(invalid("volume_id is required"));
        }
        let _busy = self.inflight.begin(&id)?;
        let Some(v) = self.volume(&id).await? else {
            return Ok(Response::new(pb::DeleteVolumeResponse {}));
        };
        if !v.attached_node.is_empty() {
            return Err(Status::failed_precondition(format!(
                "volume {id} is published on node {}; unpublish it first",
                v.attached_node
            )));
        }
        volume::delete_async(&self.meta, &id)
            .await
            .map_err(internal)?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        req: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id is required"));
        }
        if r.node_id.is_empty() {
            return Err(invalid("node_id is required"));
        }
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("volume_capability is required"))?;
        check_capability(cap)?;
        let _busy = self.inflight.begin(&r.volume_id)?;
        let v = self
            .volume(&r.volume_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {} does not exist", r.volume_id)))?;
        let n = self
            .node(&r.node_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("node {} does not exist", r.node_id)))?;
        if !v.attached_node.is_empty() && v.attached_node != r.node_id {
            return Err(Status::failed_precondition(format!(
                "volume {} is published on node {} (single-node access); unpublish it there first",
                v.name, v.attached_node
            )));
        }
        if v.state == VolumeState::Deleting as i32 {
            return Err(Status::not_found(format!(
                "volume {} is being deleted",
                v.name
            )));
        }
        if n.state != NodeState::Up as i32 {
            return Err(Status::failed_precondition(format!(
                "node {} is down ({})",
                n.name, n.state_reason
            )));
        }
        let (v, n) = volume::attach_async(&self.meta, &v.name, &n.name)
            .await
            .map_err(internal)?;
        volume::wait_served(&n, &v, SERVE_TIMEOUT)
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
        // Only what stays the same while the attachment lasts: a repeated publish must
        // return the same context.
        let context = HashMap::from([(
            NBD_URI_KEY.to_owned(),
            format!("nbd://{}/{}", n.nbd_address, v.name),
        )]);
        Ok(Response::new(pb::ControllerPublishVolumeResponse {
            publish_context: context,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id is required"));
        }
        let _busy = self.inflight.begin(&r.volume_id)?;
        let done = Response::new(pb::ControllerUnpublishVolumeResponse {});
        let Some(v) = self.volume(&r.volume_id).await? else {
            return Ok(done);
        };
        if v.attached_node.is_empty() || (!r.node_id.is_empty() && v.attached_node != r.node_id) {
            return Ok(done);
        }
        volume::detach_async(&self.meta, &v.name)
            .await
            .map_err(internal)?;
        Ok(done)
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id is required"));
        }
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities are required"));
        }
        if self.volume(&r.volume_id).await?.is_none() {
            return Err(Status::not_found(format!(
                "volume {} does not exist",
                r.volume_id
            )));
        }
        let unsupported = r
            .volume_capabilities
            .iter()
            .find_map(|c| check_capability(c).err());
        let resp = match unsupported {
            Some(s) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: s.message().to_owned(),
            },
            None => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    ..Default::default()
                }),
                message: String::new(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let vols: Vec<Volume> = self
            .list_kind(Kind::Volume)
            .await?
            .into_iter()
            .filter_map(|r| match r {
                record::Record::Volume(v) if v.state != VolumeState::Deleting as i32 => Some(v),
                _ => None,
            })
            .collect();
        let (vols, next) = page(vols, r.max_entries, &r.starting_token)?;
        let entries = vols
            .iter()
            .map(|v| {
                let (published_node_ids, volume_condition) = Self::volume_status(v);
                pb::list_volumes_response::Entry {
                    volume: Some(self.csi_volume(v, HashMap::new())),
                    status: Some(pb::list_volumes_response::VolumeStatus {
                        published_node_ids,
                        volume_condition,
                    }),
                }
            })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse {
            entries,
            next_token: next,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        for c in &r.volume_capabilities {
            check_capability(c)?;
        }
        let params = Params::parse(&r.parameters)?;
        let mut free: Vec<u64> = self
            .list_kind(Kind::Node)
            .await?
            .into_iter()
            .filter_map(|r| match r {
                record::Record::Node(n) if n.state == NodeState::Up as i32 => {
                    Some(n.disks.iter().map(|d| d.free_bytes).sum())
                }
                _ => None,
            })
            .collect();
        free.sort_unstable_by(|a, b| b.cmp(a));
        let replicas = params.replicas as usize;
        // Every replica of a volume needs its own node: the largest volume fits on the
        // `replicas`-th roomiest node; all volumes together use `replicas` times their size.
        let max = free.get(replicas.saturating_sub(1)).copied().unwrap_or(0);
        let total = if free.len() >= replicas {
            free.iter().sum::<u64>() / params.replicas.max(1) as u64
        } else {
            0
        };
        let clamp = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: clamp(total),
            maximum_volume_size: Some(clamp(max)),
            minimum_volume_size: Some(4096),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::rpc::Type;
        let capabilities = [
            Type::CreateDeleteVolume,
            Type::PublishUnpublishVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::CloneVolume,
            Type::ExpandVolume,
            Type::ListVolumesPublishedNodes,
            Type::VolumeCondition,
            Type::GetVolume,
        ]
        .into_iter()
        .map(|t| pb::ControllerServiceCapability {
            r#type: Some(pb::controller_service_capability::Type::Rpc(
                pb::controller_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.source_volume_id.is_empty() {
            return Err(invalid("source_volume_id is required"));
        }
        if r.name.is_empty() {
            return Err(invalid("name is required"));
        }
        let backup_target = match r.parameters.get("type").map(String::as_str) {
            None | Some("snap") => None,
            Some("backup") => Some(
                r.parameters
                    .get("target")
                    .filter(|t| !t.is_empty())
                    .cloned()
                    .ok_or_else(|| invalid("parameter target is required for type backup"))?,
            ),
            Some(other) => {
                return Err(invalid(format!(
                    "parameter type must be snap or backup, not {other:?}"
                )))
            }
        };
        let name = cairn_name(&r.name);
        let _busy = self.inflight.begin(&format!("snapshot/{name}"))?;
        let v = self.volume(&r.source_volume_id).await?.ok_or_else(|| {
            Status::not_found(format!("volume {} does not exist", r.source_volume_id))
        })?;
        // The snapshot on the replicas (a backup reads it).
        let snap = match self.snapshot_record(&name).await? {
            Some(s) if s.volume == v.name => s,
            Some(s) => {
                return Err(Status::already_exists(format!(
                    "snapshot {} exists for volume {}, not {}",
                    r.name, s.volume, v.name
                )))
            }
            None => {
                let _vol_busy = self.inflight.begin(&v.name)?;
                let meta = self.meta.clone();
                self.with_engine(&v, || {
                    snapshot::create_async(&meta, &v.name, &name, BTreeMap::new())
                })
                .await
                .map_err(internal)?;
                self.snapshot_record(&name).await?.ok_or_else(|| {
                    Status::internal(format!("snapshot {name} was taken but is not recorded"))
                })?
            }
        };
        let Some(target) = backup_target else {
            return Ok(Response::new(pb::CreateSnapshotResponse {
                snapshot: Some(snapshot_entry(&snap, v.size_bytes)),
            }));
        };
        let entry = match self.backup_record(&name).await? {
            Some(b) if b.volume != v.name => {
                return Err(Status::already_exists(format!(
                    "backup {} exists for volume {}, not {}",
                    r.name, b.volume, v.name
                )))
            }
            Some(b) if b.state == BackupState::Completed as i32 => backup_entry(&b, v.size_bytes),
            Some(b) if b.state == BackupState::InProgress as i32 && self.backup_running(&name) => {
                backup_entry(&b, v.size_bytes)
            }
            Some(b) if b.state == BackupState::Failed as i32 && self.backup_running(&name) => {
                return Err(Status::internal(format!(
                    "backup {name} failed: {}",
                    b.state_reason
                )));
            }
            _ => {
                // New, or failed / left unfinished by an earlier process: write it (again).
                if !self.backup_running(&name) {
                    self.start_backup(&v.name, &name, target_args(&target, &r.secrets));
                }
                pb::Snapshot {
                    ready_to_use: false,
                    ..backup_entry(
                        &cairn_proto::v1::Backup {
                            name: name.clone(),
                            volume: v.name.clone(),
                            snapshot_created_unix_ms: snap.created_unix_ms,
                            ..Default::default()
                        },
                        v.size_bytes,
                    )
                }
            }
        };
        Ok(Response::new(pb::CreateSnapshotResponse {
            snapshot: Some(entry),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.snapshot_id.is_empty() {
            return Err(invalid("snapshot_id is required"));
        }
        let done = Response::new(pb::DeleteSnapshotResponse {});
        let Some(id) = SnapshotId::parse(&r.snapshot_id) else {
            return Ok(done);
        };
        match id {
            SnapshotId::Local { volume, name } => {
                let _busy = self.inflight.begin(&format!("snapshot/{name}"))?;
                match self.snapshot_record(&name).await? {
                    Some(s) if s.volume == volume => {
                        let _vol_busy = self.inflight.begin(&volume)?;
                        self.delete_local_snapshot(&volume, &name).await?;
                    }
                    _ => {}
                }
            }
            SnapshotId::Backup { name } => {
                let _busy = self.inflight.begin(&format!("snapshot/{name}"))?;
                if self.backup_running(&name) {
                    return Err(Status::aborted(format!(
                        "backup {name} is still being written"
                    )));
                }
                let Some(b) = self.backup_record(&name).await? else {
                    return Ok(done);
                };
                backup::delete(&self.meta, &target_args(&b.target, &r.secrets), &name)
                    .await
                    .map_err(internal)?;
                if let Some(s) = self.snapshot_record(&name).await? {
                    if s.volume == b.volume {
                        if let Err(e) = self.delete_local_snapshot(&b.volume, &name).await {
                            tracing::warn!(snapshot = name, error = %e.message(), "backup deleted; its snapshot on the volume stays");
                        }
                    }
                }
            }
        }
        Ok(done)
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let vols: HashMap<String, u64> = self
            .list_kind(Kind::Volume)
            .await?
            .into_iter()
            .filter_map(|r| match r {
                record::Record::Volume(v) => Some((v.name, v.size_bytes)),
                _ => None,
            })
            .collect();
        let size = |v: &str| vols.get(v).copied().unwrap_or(0);
        let mut all = Vec::new();
        for rec in self.list_kind(Kind::Snapshot).await? {
            if let record::Record::Snapshot(s) = rec {
                all.push(snapshot_entry(&s, size(&s.volume)));
            }
        }
        for rec in self.list_kind(Kind::Backup).await? {
            if let record::Record::Backup(b) = rec {
                if b.state == BackupState::Completed as i32
                    || b.state == BackupState::InProgress as i32
                {
                    all.push(backup_entry(&b, size(&b.volume)));
                }
            }
        }
        all.retain(|s| {
            (r.snapshot_id.is_empty() || s.snapshot_id == r.snapshot_id)
                && (r.source_volume_id.is_empty() || s.source_volume_id == r.source_volume_id)
        });
        all.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        let (page, next) = page(all, r.max_entries, &r.starting_token)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            entries: page
                .into_iter()
                .map(|s| pb::list_snapshots_response::Entry { snapshot: Some(s) })
                .collect(),
            next_token: next,
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id is required"));
        }
        if r.capacity_range.is_none() {
            return Err(invalid("capacity_range is required"));
        }
        let size = size_for(r.capacity_range.as_ref())?;
        let _busy = self.inflight.begin(&r.volume_id)?;
        let v = self
            .volume(&r.volume_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {} does not exist", r.volume_id)))?;
        let block = matches!(
            r.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(pb::volume_capability::AccessType::Block(_))
        );
        let capacity = if v.size_bytes >= size {
            v.size_bytes
        } else {
            volume::expand_async(&self.meta, &v.name, size)
                .await
                .map_err(expand_status)?
        };
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: i64::try_from(capacity).unwrap_or(i64::MAX),
            node_expansion_required: !block,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        if id.is_empty() {
            return Err(invalid("volume_id is required"));
        }
        let v = self
            .volume(&id)
            .await?
            .filter(|v| v.state != VolumeState::Deleting as i32)
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        let (published_node_ids, volume_condition) = Self::volume_status(&v);
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(self.csi_volume(&v, HashMap::new())),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids,
                volume_condition,
            }),
        }))
    }
}

impl ControllerService {
    async fn created(
        &self,
        name: &str,
        context: HashMap<String, String>,
        source: Option<pb::VolumeContentSource>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let v = self
            .volume(name)
            .await?
            .ok_or_else(|| Status::internal(format!("volume {name} vanished after it was made")))?;
        let mut vol = self.csi_volume(&v, context);
        vol.content_source = source;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(vol),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> pb::CapacityRange {
        pb::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }
    }

    #[test]
    fn sizes_round_up_to_whole_blocks_within_the_limit() {
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&range(1, 0))).unwrap(), 4096);
        assert_eq!(size_for(Some(&range(4097, 8192))).unwrap(), 8192);
        assert_eq!(size_for(Some(&range(0, 8192))).unwrap(), 8192);
        assert_eq!(
            size_for(Some(&range(4097, 5000))).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(Some(&range(-1, 0))).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            size_for(Some(&range(i64::MAX, 0))).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
    }

    #[test]
    fn pages_cover_every_entry_once() {
        let items: Vec<u32> = (0..7).collect();
        let (a, t) = page(items.clone(), 3, "").unwrap();
        let (b, t2) = page(items.clone(), 3, &t).unwrap();
        let (c, t3) = page(items.clone(), 3, &t2).unwrap();
        assert_eq!([a, b, c].concat(), items);
        assert_eq!(t3, "");
        assert_eq!(page(items.clone(), 0, "").unwrap().0.len(), 7);
        assert_eq!(
            page(items.clone(), 1, "x").unwrap_err().code(),
            tonic::Code::Aborted
        );
        assert_eq!(
            page(items.clone(), 1, "8").unwrap_err().code(),
            tonic::Code::Aborted
        );
        assert_eq!(
            page(items, -1, "").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn only_degraded_and_faulted_volumes_are_abnormal() {
        let v = |state: VolumeState| Volume {
            state: state as i32,
            ..Default::default()
        };
        assert!(!condition(&v(VolumeState::Healthy)).abnormal);
        assert!(condition(&v(VolumeState::Degraded)).abnormal);
        assert!(condition(&v(VolumeState::Faulted)).abnormal);
    }

    #[test]
    fn ms_become_timestamps() {
        let t = timestamp(1_700_000_000_123);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_000_000));
    }
}
