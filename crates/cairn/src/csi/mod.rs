//! `cairn csi`: the CSI v1 driver (`csi.cairn.io`) on a Unix socket.
//!
//! One binary, three modes: `controller` (Identity + Controller: volumes, attachments,
//! snapshots and backups through meta; runs once per cluster beside the CSI sidecars),
//! `node` (Identity + Node: the volume as a local block device, formatted, mounted and
//! bind-mounted for pods; runs on every node beside the node-driver-registrar) and `all`
//! (both, for tests and small installs). The protobuf, the socket server and the node's
//! device and filesystem plumbing are in the `cairn-csi` crate; what the calls do to the
//! cluster is here, beside the CLI's volume, snapshot and backup code it shares.

// Every handler returns `tonic::Status` (the generated traits say so); the helpers they call
// return it too, so a check is one `?`. Its size is tonic's to choose.
#![allow(clippy::result_large_err)]

mod controller;
mod identity;
pub mod ids;
mod node;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use cairn_csi::pb;
use cairn_proto::v1::DataLocality;
use clap::{Args, ValueEnum};
use tonic::Status;

use crate::records::{self, UserError};

/// Which CSI services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Identity + Controller (one per cluster, beside the provisioner, attacher, resizer
    /// and snapshotter sidecars).
    Controller,
    /// Identity + Node (one per node, beside node-driver-registrar).
    Node,
    /// All three services in one process.
    All,
}

#[derive(Debug, Args)]
pub struct CsiArgs {
    /// Unix socket to serve CSI on: `unix:///path`, `unix:/path` or an absolute path. A
    /// stale socket left there by an earlier run is replaced.
    #[arg(long, default_value = "unix:///csi/csi.sock", env = "CSI_ENDPOINT")]
    endpoint: String,
    /// Services to serve.
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
    /// This node's name as registered in meta (the agent's `--node`); required in node and
    /// all modes. It is the CSI node id and the `topology.cairn.io/node` segment.
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// `host:port` of a member of the metadata service, or several separated by commas
    /// (calls go to any that is up).
    #[arg(long, value_name = "ADDRS", default_value = records::DEFAULT_META, env = "CAIRN_META")]
    meta: String,
    /// Driver name reported by GetPluginInfo (the CSIDriver object's name).
    #[arg(long, default_value = "csi.cairn.io")]
    driver_name: String,
    /// Node mode: directory keeping each attached volume's state (FUSE mountpoint, pid file,
    /// device), so a restarted `cairn csi` finds its attachments again.
    #[arg(long, default_value = "/var/lib/cairn/csi")]
    state_dir: PathBuf,
    /// Node mode: how a volume becomes a local block device. `kernel`: the kernel NBD
    /// driver over netlink (needs the nbd module; reconnects, grows online); `cairn-fuse`:
    /// `cairn nbd-file` + a loop device (grows online); `fuse`: nbdfuse + a loop device;
    /// `auto`: kernel when /dev/nbd0 exists or `modprobe nbd` works, else cairn-fuse.
    #[arg(long, value_enum, default_value = "auto")]
    attach_mode: node::AttachModeArg,
}

pub fn run(args: CsiArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    rt.block_on(serve(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: CsiArgs) -> anyhow::Result<()> {
    let path = cairn_csi::server::parse_endpoint(&args.endpoint)
        .map_err(|e| records::user_error(format!("--endpoint: {e}")))?;
    let controller = matches!(args.mode, Mode::Controller | Mode::All);
    let node = matches!(args.mode, Mode::Node | Mode::All);
    let identity = identity::IdentityService {
        driver_name: args.driver_name.clone(),
        meta: args.meta.clone(),
        controller,
    };
    let mut server = cairn_csi::server::CsiServer::new(identity);
    if controller {
        server = server.controller(controller::ControllerService::new(args.meta.clone()));
    }
    if node {
        let node_id = args
            .node_id
            .clone()
            .ok_or_else(|| records::user_error("--node-id is required in node and all modes"))?;
        server = server.node(node::NodeService::new(
            node_id,
            args.meta.clone(),
            args.state_dir.clone(),
            args.attach_mode,
        )?);
    }
    tracing::info!(endpoint = %path.display(), mode = ?args.mode, meta = args.meta, "serving CSI");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
    };
    server
        .serve_unix(&path, shutdown)
        .await
        .with_context(|| format!("serve CSI on {}", path.display()))
}

/// Volumes (and snapshots) with a call in progress: a second call for the same one gets
/// ABORTED, as the CSI specification asks, instead of racing the first.
#[derive(Clone, Default)]
pub struct Inflight(Arc<Mutex<HashSet<String>>>);

/// Holds one key of an [`Inflight`] until dropped.
pub struct Busy {
    set: Inflight,
    key: String,
}

impl Inflight {
    pub fn begin(&self, key: &str) -> Result<Busy, Status> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(key.to_owned()) {
            return Err(Status::aborted(format!(
                "an operation on {key} is already in progress"
            )));
        }
        Ok(Busy {
            set: self.clone(),
            key: key.to_owned(),
        })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut set = self.set.0.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.key);
    }
}

/// An error of the cluster code as a gRPC status: what the user can fix (a
/// [`UserError`]) is FAILED_PRECONDITION, the rest INTERNAL; both keep the whole message.
pub fn internal(e: anyhow::Error) -> Status {
    let msg = format!("{e:#}");
    if e.downcast_ref::<UserError>().is_some() {
        Status::failed_precondition(msg)
    } else {
        Status::internal(msg)
    }
}

/// File systems NodeStageVolume can make.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];

/// Checks one volume capability: single-node access (a Cairn volume is served by one
/// node's engine at a time), block or a mount with a file system Cairn can make.
pub fn check_capability(c: &pb::VolumeCapability) -> Result<(), Status> {
    use pb::volume_capability::access_mode::Mode;
    use pb::volume_capability::AccessType;
    match &c.access_type {
        None => {
            return Err(Status::invalid_argument(
                "volume capability: access_type (block or mount) is required",
            ))
        }
        Some(AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() && !FS_TYPES.contains(&m.fs_type.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "volume capability: fs_type {:?} is not supported (ext4 or xfs)",
                    m.fs_type
                )));
            }
        }
        Some(AccessType::Block(_)) => {}
    }
    let mode = c
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .ok_or_else(|| Status::invalid_argument("volume capability: access_mode is required"))?;
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => Ok(()),
        Mode::Unknown => Err(Status::invalid_argument(
            "volume capability: access_mode.mode is required",
        )),
        other => Err(Status::invalid_argument(format!(
            "volume capability: access mode {} is not supported: a Cairn volume is served by one node at a time",
            other.as_str_name()
        ))),
    }
}

/// StorageClass parameters of CreateVolume (and GetCapacity).
#[derive(Debug, Clone)]
pub struct Params {
    pub replicas: u32,
    pub data_locality: DataLocality,
    /// How long a replica on a down node is waited for before it is replaced.
    pub stale_timeout: Option<std::time::Duration>,
    /// Backup to fill the volume from (`fromBackup`).
    pub from_backup: Option<String>,
    /// Backup target URL overriding the one the Backup record names (`backupTarget`).
    pub backup_target: Option<String>,
    pub fs_type: String,
    /// CreateVolume's secrets (S3 credentials of a backup target).
    pub secrets: HashMap<String, String>,
}

impl Params {
    pub fn parse(p: &HashMap<String, String>) -> Result<Params, Status> {
        let bad =
            |key: &str, why: String| Status::invalid_argument(format!("parameter {key}: {why}"));
        let mut out = Params {
            replicas: 3,
            data_locality: DataLocality::Disabled,
            stale_timeout: None,
            from_backup: None,
            backup_target: None,
            fs_type: "ext4".to_owned(),
            secrets: HashMap::new(),
        };
        for (k, v) in p {
            match k.as_str() {
                "numberOfReplicas" => {
                    out.replicas = match v.parse::<u32>() {
                        Ok(n) if (1..=16).contains(&n) => n,
                        _ => return Err(bad(k, format!("{v:?} is not a number from 1 to 16"))),
                    }
                }
                "dataLocality" => {
                    out.data_locality = match v.as_str() {
                        "disabled" => DataLocality::Disabled,
                        "best-effort" => DataLocality::BestEffort,
                        _ => return Err(bad(k, format!("{v:?} is not disabled or best-effort"))),
                    }
                }
                "staleReplicaTimeout" => {
                    // Minutes, as Longhorn's StorageClasses give it, or a duration ("90s").
                    let d = match v.parse::<u64>() {
                        Ok(min) => std::time::Duration::from_secs(min.saturating_mul(60)),
                        Err(_) => humantime::parse_duration(v).map_err(|e| {
                            bad(k, format!("{v:?} is neither minutes nor a duration: {e}"))
                        })?,
                    };
                    out.stale_timeout = Some(d);
                }
                "fromBackup" => {
                    cairn_proto::validate_name("backup", v).map_err(|e| bad(k, e.to_string()))?;
                    out.from_backup = Some(v.clone());
                }
                "backupTarget" => out.backup_target = Some(v.clone()),
                "csi.storage.k8s.io/fstype" | "fsType" => {
                    if !FS_TYPES.contains(&v.as_str()) {
                        return Err(bad(k, format!("{v:?} is not ext4 or xfs")));
                    }
                    out.fs_type = v.clone();
                }
                // The provisioner's --extra-create-metadata (PVC name and namespace, PV name).
                _ if k.starts_with("csi.storage.k8s.io/") => {}
                _ => return Err(bad(k, "unknown parameter".to_owned())),
            }
        }
        Ok(out)
    }

    /// The volume context handed back with a new volume (passed to the node calls).
    pub fn context(&self) -> HashMap<String, String> {
        HashMap::from([("fsType".to_owned(), self.fs_type.clone())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::volume_capability::{
        access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
    };

    fn cap(access: Option<AccessType>, mode: Mode) -> pb::VolumeCapability {
        pb::VolumeCapability {
            access_type: access,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume {
            fs_type: fs.to_owned(),
            ..Default::default()
        }))
    }

    #[test]
    fn capabilities_single_node_block_or_ext4_xfs() {
        let block = Some(AccessType::Block(BlockVolume {}));
        for ok in [
            cap(block.clone(), Mode::SingleNodeWriter),
            cap(mount(""), Mode::SingleNodeReaderOnly),
            cap(mount("xfs"), Mode::SingleNodeSingleWriter),
            cap(mount("ext4"), Mode::SingleNodeMultiWriter),
        ] {
            check_capability(&ok).unwrap();
        }
        for bad in [
            cap(None, Mode::SingleNodeWriter),
            cap(mount("zfs"), Mode::SingleNodeWriter),
            cap(block.clone(), Mode::MultiNodeMultiWriter),
            cap(block, Mode::Unknown),
        ] {
            assert_eq!(
                check_capability(&bad).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
        let no_mode = pb::VolumeCapability {
            access_type: mount(""),
            access_mode: None,
        };
        assert_eq!(
            check_capability(&no_mode).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn parameters_parse_or_name_the_bad_one() {
        let p = |kv: &[(&str, &str)]| {
            Params::parse(
                &kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            )
        };
        let ok = p(&[
            ("numberOfReplicas", "2"),
            ("dataLocality", "best-effort"),
            ("staleReplicaTimeout", "30"),
            ("csi.storage.k8s.io/fstype", "xfs"),
            ("csi.storage.k8s.io/pvc/name", "data-pg-0"),
        ])
        .unwrap();
        assert_eq!(ok.replicas, 2);
        assert_eq!(ok.data_locality, DataLocality::BestEffort);
        assert_eq!(ok.stale_timeout, Some(std::time::Duration::from_secs(1800)));
        assert_eq!(ok.fs_type, "xfs");
        assert_eq!(
            p(&[("staleReplicaTimeout", "90s")]).unwrap().stale_timeout,
            Some(std::time::Duration::from_secs(90))
        );
        for (k, v) in [
            ("numberOfReplicas", "0"),
            ("numberOfReplicas", "three"),
            ("dataLocality", "strict"),
            ("staleReplicaTimeout", "soon"),
            ("fromBackup", "Not A Name"),
            ("csi.storage.k8s.io/fstype", "btrfs"),
            ("replicas", "3"),
        ] {
            let e = p(&[(k, v)]).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(k), "{}", e.message());
        }
    }

    #[test]
    fn a_second_call_on_a_busy_volume_is_aborted_until_the_first_ends() {
        let f = Inflight::default();
        let first = f.begin("vol0").unwrap();
        assert_eq!(f.begin("vol0").err().unwrap().code(), tonic::Code::Aborted);
        let _other = f.begin("vol1").unwrap();
        drop(first);
        f.begin("vol0").unwrap();
    }
}
