//! The CSI Node service: a published volume becomes a local block device (the NBD export
//! of the node's agent, attached by `cairn_csi::host::attach`), formatted when blank,
//! checked and mounted at the staging path, then bind-mounted into each pod.
//!
//! Filesystem volumes: NodeStage attaches, formats (ext4 unless the capability or the
//! StorageClass says xfs), runs fsck and mounts at `staging_target_path`; NodePublish
//! bind-mounts that onto `target_path` (read-only when asked). Block volumes: NodeStage
//! attaches; NodePublish bind-mounts the device node onto the file `target_path`.
//! Every call is idempotent, and the host work (commands, mounts) runs off the runtime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_csi::host::attach::{AttachMode, Attacher};
use cairn_csi::host::mount::{self, FsType};
use cairn_csi::host::HostError;
use cairn_csi::pb;
use cairn_csi::pb::node_server::Node;
use clap::ValueEnum;
use tonic::{Request, Response, Status};

use super::controller::{condition, NBD_URI_KEY};
use super::{check_capability, Inflight};
use crate::records;

/// Topology key naming the node a volume's device is attached on.
pub const TOPOLOGY_NODE_KEY: &str = "topology.cairn.io/node";

/// `--attach-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttachModeArg {
    /// Kernel when the kernel has NBD (/dev/nbd0, or `modprobe nbd` works), else cairn-fuse.
    Auto,
    /// The kernel NBD driver over netlink (/dev/nbdN); reconnects when a link dies.
    Kernel,
    /// nbdfuse + a loop device; the size is fixed when it attaches.
    Fuse,
    /// `cairn nbd-file` + a loop device: like fuse, and grows online (NodeExpandVolume).
    CairnFuse,
}

pub struct NodeService {
    node_id: String,
    meta: String,
    attacher: Arc<Attacher>,
    mode: AttachMode,
    inflight: Inflight,
}

impl NodeService {
    pub fn new(
        node_id: String,
        meta: String,
        state_dir: PathBuf,
        mode: AttachModeArg,
    ) -> anyhow::Result<Self> {
        let mode = match mode {
            AttachModeArg::Kernel => AttachMode::Kernel,
            AttachModeArg::Fuse => AttachMode::Fuse,
            AttachModeArg::CairnFuse => AttachMode::CairnFuse,
            AttachModeArg::Auto => AttachMode::detect(),
        };
        let attacher = Attacher::new(&state_dir).map_err(|e| {
            records::user_error(format!("--state-dir {}: {e}", state_dir.display()))
        })?;
        // Kernel attachments' reconnect keepers run on this (the server's) runtime; after a
        // restart, those of the attachments found in the state directory start again.
        let attacher = match tokio::runtime::Handle::try_current() {
            Ok(rt) => attacher.with_runtime(rt),
            Err(_) => attacher,
        };
        attacher.resume_keepers()?;
        tracing::info!(node = node_id, ?mode, state_dir = %state_dir.display(), "node service");
        Ok(NodeService {
            node_id,
            meta,
            attacher: Arc::new(attacher),
            mode,
            inflight: Inflight::default(),
        })
    }

    /// The device volume `id` is attached as on this node, if it is.
    async fn device(&self, id: &str) -> Result<Option<PathBuf>, Status> {
        let (attacher, id) = (self.attacher.clone(), id.to_owned());
        blocking(move || Ok(attacher.get(&id)?.map(|a| a.device))).await
    }
}

/// Runs host work (commands, mounts, ioctls) on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HostError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(host_status),
        Err(e) => Err(Status::internal(format!("host task failed: {e}"))),
    }
}

/// A host error as a gRPC status: a path mounted with something else is ALREADY_EXISTS (the
/// spec's "incompatible" answer), a bad id or URI INVALID_ARGUMENT, the rest INTERNAL.
fn host_status(e: HostError) -> Status {
    let msg = e.to_string();
    match e {
        HostError::MountedElsewhere { .. }
        | HostError::AttachConflict { .. }
        | HostError::FsTypeMismatch { .. } => Status::already_exists(msg),
        HostError::InvalidVolumeId(_)
        | HostError::InvalidUri { .. }
        | HostError::UnsupportedFs(_)
        | HostError::InvalidMountOption(_) => Status::invalid_argument(msg),
        HostError::UnknownContent { .. } | HostError::DeviceBusy { .. } => {
            Status::failed_precondition(msg)
        }
        _ => Status::internal(msg),
    }
}

fn invalid(msg: &str) -> Status {
    Status::invalid_argument(msg.to_owned())
}

fn required<'a>(value: &'a str, what: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(invalid(&format!("{what} is required")))
    } else {
        Ok(value)
    }
}

fn is_block(c: &pb::VolumeCapability) -> bool {
    matches!(
        c.access_type,
        Some(pb::volume_capability::AccessType::Block(_))
    )
}

fn reader_only(c: &pb::VolumeCapability) -> bool {
    use pb::volume_capability::access_mode::Mode;
    c.access_mode
        .as_ref()
        .is_some_and(|m| m.mode == Mode::SingleNodeReaderOnly as i32)
}

/// The file system for a mount capability: its fs_type, else the volume context's, else ext4.
fn fs_type_of(
    c: &pb::VolumeCapability,
    context: &HashMap<String, String>,
) -> Result<FsType, Status> {
    let given = match &c.access_type {
        Some(pb::volume_capability::AccessType::Mount(m)) if !m.fs_type.is_empty() => {
            m.fs_type.clone()
        }
        _ => context.get("fsType").cloned().unwrap_or_default(),
    };
    given.parse::<FsType>().map_err(host_status)
}

fn mount_flags(c: &pb::VolumeCapability) -> Vec<String> {
    match &c.access_type {
        Some(pb::volume_capability::AccessType::Mount(m)) => m.mount_flags.clone(),
        _ => Vec::new(),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_owned();
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("volume_capability is required"))?;
        check_capability(cap)?;
        let uri = r.publish_context.get(NBD_URI_KEY).cloned().ok_or_else(|| {
            invalid("publish_context has no nbdUri: ControllerPublishVolume must run first")
        })?;
        let fs = if is_block(cap) {
            None
        } else {
            Some(fs_type_of(cap, &r.volume_context)?)
        };
        let _busy = self.inflight.begin(&id)?;
        let (attacher, mode, vid) = (self.attacher.clone(), self.mode, id.clone());
        // A reader-only volume is attached read-only: no write can reach it, not even
        // through a bind of the device node (which a read-only bind mount does not stop).
        let read_only = reader_only(cap);
        let device =
            blocking(move || Ok(attacher.attach(&vid, &uri, mode, read_only)?.device)).await?;
        if let Some(fs) = fs {
            let flags = mount_flags(cap);
            let ro = reader_only(cap);
            blocking(move || {
                let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
                mount::format_and_mount(&device, &staging, fs, &flags, ro)
            })
            .await?;
        }
        tracing::info!(volume = id, "staged");
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_owned();
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let _busy = self.inflight.begin(&id)?;
        let (attacher, vid) = (self.attacher.clone(), id.clone());
        blocking(move || {
            mount::unmount(&staging)?;
            attacher.detach(&vid)
        })
        .await?;
        tracing::info!(volume = id, "unstaged");
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_owned();
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("volume_capability is required"))?;
        check_capability(cap)?;
        let read_only = r.readonly || reader_only(cap);
        let _busy = self.inflight.begin(&id)?;
        let source = if is_block(cap) {
            self.device(&id).await?.ok_or_else(|| {
                Status::failed_precondition(format!("volume {id} is not staged on this node"))
            })?
        } else {
            let st = staging.clone();
            if !blocking(move || mount::is_mount_point(&st)).await? {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is not staged at {}",
                    staging.display()
                )));
            }
            staging
        };
        blocking(move || mount::bind_mount(&source, &target, read_only)).await?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_owned();
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let _busy = self.inflight.begin(&id)?;
        blocking(move || mount::unmount_and_remove(&target)).await?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_owned();
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        if !path.exists() {
            return Err(Status::not_found(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        let usage = blocking(move || usage_of(&path)).await?;
        // The volume's health as meta knows it; none when meta cannot be asked.
        let volume_condition = match self.volume_record(&id).await {
            Ok(Some(v)) => Some(condition(&v)),
            Ok(None) => {
                return Err(Status::not_found(format!("volume {id} does not exist")));
            }
            Err(e) => {
                tracing::warn!(volume = id, error = %e, "volume condition unknown");
                None
            }
        };
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition,
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_owned();
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let _busy = self.inflight.begin(&id)?;
        if self.device(&id).await?.is_none() {
            return Err(Status::not_found(format!(
                "volume {id} is not attached on this node"
            )));
        }
        let block = r.volume_capability.as_ref().is_some_and(is_block);
        // The size to reach: the request's, else what meta records for the volume.
        let want = match r.capacity_range.as_ref().map(|c| c.required_bytes) {
            Some(b) if b > 0 => b.unsigned_abs(),
            _ => match self.volume_record(&id).await {
                Ok(Some(v)) => v.size_bytes,
                Ok(None) => return Err(Status::not_found(format!("volume {id} does not exist"))),
                Err(e) => return Err(Status::unavailable(format!("{e:#}"))),
            },
        };
        let attacher = self.attacher.clone();
        let staging = r.staging_target_path.clone();
        let size = blocking(move || {
            // The device learns the volume's new size first, then the file system grows.
            attacher.grow_device(&id, want)?;
            let device = attacher
                .get(&id)?
                .map(|a| a.device)
                .ok_or_else(|| HostError::NotMounted(path.clone()))?;
            if !block && !path.metadata().is_ok_and(|m| is_block_file(&m)) {
                let at = if staging.is_empty() {
                    path
                } else {
                    PathBuf::from(staging)
                };
                let entry = mount::mount_at(&at)?.ok_or(HostError::NotMounted(at.clone()))?;
                mount::grow_filesystem(&device, Some(&at), &entry.fs_type)?;
            }
            mount::block_device_size(&device)
        })
        .await?;
        Ok(Response::new(pb::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::rpc::Type;
        let capabilities = [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
            Type::VolumeCondition,
        ]
        .into_iter()
        .map(|t| pb::NodeServiceCapability {
            r#type: Some(pb::node_service_capability::Type::Rpc(
                pb::node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(pb::Topology {
                segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_owned(), self.node_id.clone())]),
            }),
        }))
    }
}

impl NodeService {
    async fn volume_record(&self, id: &str) -> anyhow::Result<Option<cairn_proto::v1::Volume>> {
        let mut client = records::client(&self.meta)?;
        match crate::volume::get_volume_async(&mut client, &self.meta, id).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.downcast_ref::<records::UserError>().is_some() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn is_block_file(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    m.file_type().is_block_device()
}

/// Usage of a published volume: bytes and inodes of a mounted file system, or the size of a
/// block device (bytes only).
fn usage_of(path: &Path) -> Result<Vec<pb::VolumeUsage>, HostError> {
    use pb::volume_usage::Unit;
    let clamp = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
    let meta = path.metadata().map_err(|e| HostError::Io {
        op: "stat",
        path: path.to_owned(),
        source: e,
    })?;
    if is_block_file(&meta) {
        let size = mount::block_device_size(path)?;
        return Ok(vec![pb::VolumeUsage {
            available: 0,
            total: clamp(size),
            used: 0,
            unit: Unit::Bytes as i32,
        }]);
    }
    let s = mount::fs_stats(path)?;
    Ok(vec![
        pb::VolumeUsage {
            available: clamp(s.available_bytes),
            total: clamp(s.total_bytes),
            used: clamp(s.used_bytes),
            unit: Unit::Bytes as i32,
        },
        pb::VolumeUsage {
            available: clamp(s.free_inodes),
            total: clamp(s.total_inodes),
            used: clamp(s.used_inodes),
            unit: Unit::Inodes as i32,
        },
    ])
}
