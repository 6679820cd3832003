//! The CSI driver end to end: `cairn csi` processes (controller + node on node-1, node on
//! node-2) in front of a three-node `cairn dev`, called over their Unix sockets with the
//! gRPC clients generated from proto/csi/v1/csi.proto, as kubelet and the sidecars would.
//! Volumes become real block devices through nbdfuse + loop devices, get ext4 and are
//! mounted; every byte written through one node is read back through the other.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cairn_csi::pb;
use common::*;
use tonic::Code;

const MIB: i64 = 1 << 20;
const META: &str = "127.0.0.1:10811";

/// The tools a node needs on this machine; tests skip (saying so) without them.
fn node_tools() -> bool {
    have_tools(&[
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "blkid",
        "resize2fs",
    ])
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    cluster: Cluster,
    /// Controller + node on node-1.
    a: CsiProc,
    /// Node on node-2.
    b: CsiProc,
}

fn setup() -> Option<Setup> {
    setup_attaching("fuse")
}

/// [`setup`] with both node services attaching through `--attach-mode ATTACH`.
fn setup_attaching(attach: &str) -> Option<Setup> {
    if !enter_private_netns() || !node_tools() {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let cluster = ClusterOpts::new(3).start(&dir.join("cluster"));
    let a = CsiProc::start_attaching(&dir, "all", "node-1", META, attach);
    let b = CsiProc::start_attaching(&dir, "node", "node-2", META, attach);
    Some(Setup {
        _tmp: tmp,
        dir,
        cluster,
        a,
        b,
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn create_req(name: &str, size: i64, cap: pb::VolumeCapability) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: HashMap::from([("numberOfReplicas".to_owned(), "2".to_owned())]),
        ..Default::default()
    }
}

/// The pod-side paths of one volume on one node.
struct Paths {
    staging: PathBuf,
    target: PathBuf,
}

fn paths(dir: &Path, node: &str, volume: &str, pod: &str) -> Paths {
    let staging = dir.join(format!("kubelet-{node}/staging/{volume}"));
    let target = dir.join(format!("kubelet-{node}/pods/{pod}/{volume}"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    Paths { staging, target }
}

/// ControllerPublish on `node` (through `ctl`), NodeStage and NodePublish on `csi`; every
/// call made twice (the second must be a no-op success). Returns the publish context.
async fn bring_up(
    ctl: &CsiProc,
    csi: &CsiProc,
    id: &str,
    cap: &pb::VolumeCapability,
    p: &Paths,
) -> HashMap<String, String> {
    let mut c = ctl.controller().await;
    let mut n = csi.node().await;
    let publish = pb::ControllerPublishVolumeRequest {
        volume_id: id.to_owned(),
        node_id: csi.node.clone(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let ctx = c
        .controller_publish_volume(publish.clone())
        .await
        .unwrap()
        .into_inner();
    let again = c
        .controller_publish_volume(publish)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ctx.publish_context, again.publish_context,
        "publish is idempotent"
    );
    let stage = pb::NodeStageVolumeRequest {
        volume_id: id.to_owned(),
        publish_context: ctx.publish_context.clone(),
        staging_target_path: p.staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    n.node_stage_volume(stage.clone()).await.unwrap();
    n.node_stage_volume(stage).await.unwrap();
    let publish = pb::NodePublishVolumeRequest {
        volume_id: id.to_owned(),
        publish_context: ctx.publish_context.clone(),
        staging_target_path: p.staging.display().to_string(),
        target_path: p.target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    n.node_publish_volume(publish.clone()).await.unwrap();
    n.node_publish_volume(publish).await.unwrap();
    ctx.publish_context
}

/// NodeUnpublish, NodeUnstage on `csi` and ControllerUnpublish from its node, each twice.
async fn tear_down(ctl: &CsiProc, csi: &CsiProc, id: &str, p: &Paths) {
    let mut c = ctl.controller().await;
    let mut n = csi.node().await;
    for _ in 0..2 {
        n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: id.to_owned(),
            target_path: p.target.display().to_string(),
        })
        .await
        .unwrap();
    }
    assert!(!p.target.exists(), "NodeUnpublish removes the target");
    for _ in 0..2 {
        n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: id.to_owned(),
            staging_target_path: p.staging.display().to_string(),
        })
        .await
        .unwrap();
    }
    for _ in 0..2 {
        c.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: id.to_owned(),
            node_id: csi.node.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// Deterministic file contents: `len` bytes named by `seed`.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The files the tests write into a mounted volume: name and content.
fn files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("small.txt".into(), b"written through node-1\n".to_vec()),
        ("one-mib.bin".into(), content(1, 1 << 20)),
        ("dir/odd-size.bin".into(), content(2, 3 * 4096 + 17)),
    ]
}

fn write_files(root: &Path) {
    for (name, data) in files() {
        let path = root.join(&name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
}

fn assert_files(root: &Path, what: &str) {
    for (name, want) in files() {
        let got =
            std::fs::read(root.join(&name)).unwrap_or_else(|e| panic!("{what}: read {name}: {e}"));
        assert!(
            got == want,
            "{what}: {name} differs ({} bytes read, {} written)",
            got.len(),
            want.len()
        );
    }
}

/// Writes `data` at `offset` of the block device published at `path`, with O_DIRECT, and
/// syncs it.
fn write_block(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut buf = AlignedBuf::new(data.len());
    buf.as_mut().copy_from_slice(data);
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(buf.as_ref()).unwrap();
    f.sync_all().unwrap();
}

fn read_block(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut buf = AlignedBuf::new(len);
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(buf.as_mut()).unwrap();
    buf.as_ref().to_vec()
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: len is non-zero in every caller; the layout is valid.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr holds len initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in new with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

async fn volume_ids(ctl: &CsiProc) -> Vec<String> {
    let mut c = ctl.controller().await;
    c.list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.volume.map(|v| v.volume_id))
        .collect()
}

async fn delete_twice(ctl: &CsiProc, id: &str) {
    let mut c = ctl.controller().await;
    for _ in 0..2 {
        c.delete_volume(pb::DeleteVolumeRequest {
            volume_id: id.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(
        !volume_ids(ctl).await.contains(&id.to_owned()),
        "{id} still listed"
    );
}

#[test]
fn filesystem_volume_lifecycle_across_two_nodes() {
    let Some(s) = setup() else { return };
    runtime().block_on(async {
        let cap = mount_cap("ext4");
        let mut c = s.a.controller().await;
        let req = create_req("pvc-fs", 64 * MIB, cap.clone());
        let v = c
            .create_volume(req.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.volume_id, "pvc-fs");
        assert_eq!(v.capacity_bytes, 64 * MIB);
        let again = c
            .create_volume(req.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(again.volume_id, v.volume_id, "CreateVolume is idempotent");
        assert_code(
            c.create_volume(create_req("pvc-fs", 128 * MIB, cap.clone()))
                .await,
            Code::AlreadyExists,
            "pvc-fs",
            "same name, bigger size",
        );

        let p1 = paths(&s.dir, "node-1", "pvc-fs", "pod-1");
        let ctx = bring_up(&s.a, &s.a, "pvc-fs", &cap, &p1).await;
        assert!(ctx["nbdUri"].starts_with("nbd://"), "{ctx:?}");
        // Single-node access: node-2 is refused while node-1 holds it, and told which node.
        assert_code(
            c.controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: "pvc-fs".into(),
                node_id: "node-2".into(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
            "node-1",
            "publish on a second node",
        );
        write_files(&p1.target);
        // A read-only publish of the same staged volume refuses writes.
        let ro_target = s.dir.join("kubelet-node-1/pods/pod-ro/pvc-fs");
        let mut n1 = s.a.node().await;
        n1.node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: "pvc-fs".into(),
            publish_context: ctx.clone(),
            staging_target_path: p1.staging.display().to_string(),
            target_path: ro_target.display().to_string(),
            volume_capability: Some(cap.clone()),
            readonly: true,
            ..Default::default()
        })
        .await
        .unwrap();
        assert_files(&ro_target, "read-only publish");
        let err = std::fs::write(ro_target.join("nope"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        n1.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: "pvc-fs".into(),
            target_path: ro_target.display().to_string(),
        })
        .await
        .unwrap();

        let stats = n1
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: "pvc-fs".into(),
                volume_path: p1.target.display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let bytes = stats
            .usage
            .iter()
            .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
            .expect("bytes usage");
        assert!(
            bytes.total > 50 * MIB && bytes.total <= 64 * MIB,
            "{stats:?}"
        );
        assert!(bytes.used >= MIB, "the files use space: {stats:?}");
        assert!(
            stats
                .usage
                .iter()
                .any(|u| u.unit == pb::volume_usage::Unit::Inodes as i32 && u.used > 0),
            "{stats:?}"
        );
        assert!(!stats.volume_condition.unwrap().abnormal);
        let listed = c
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        let entry = listed
            .entries
            .iter()
            .find(|e| e.volume.as_ref().unwrap().volume_id == "pvc-fs")
            .unwrap();
        assert_eq!(
            entry.status.as_ref().unwrap().published_node_ids,
            vec!["node-1".to_owned()]
        );

        tear_down(&s.a, &s.a, "pvc-fs", &p1).await;
        let p2 = paths(&s.dir, "node-2", "pvc-fs", "pod-2");
        bring_up(&s.a, &s.b, "pvc-fs", &cap, &p2).await;
        assert_files(&p2.target, "files after moving to node-2");
        tear_down(&s.a, &s.b, "pvc-fs", &p2).await;
        delete_twice(&s.a, "pvc-fs").await;
    });
}

#[test]
fn block_volume_lifecycle_across_two_nodes() {
    let Some(s) = setup() else { return };
    runtime().block_on(async {
        let cap = block_cap();
        let mut c = s.a.controller().await;
        c.create_volume(create_req("pvc-block", 32 * MIB, cap.clone()))
            .await
            .unwrap();
        let p1 = paths(&s.dir, "node-1", "pvc-block", "pod-1");
        bring_up(&s.a, &s.a, "pvc-block", &cap, &p1).await;
        let data = content(7, 1 << 20);
        let tail = content(8, 4096);
        write_block(&p1.target, 3 << 20, &data);
        write_block(&p1.target, (32 << 20) - 4096, &tail);
        tear_down(&s.a, &s.a, "pvc-block", &p1).await;

        let p2 = paths(&s.dir, "node-2", "pvc-block", "pod-2");
        bring_up(&s.a, &s.b, "pvc-block", &cap, &p2).await;
        assert!(
            read_block(&p2.target, 3 << 20, 1 << 20) == data,
            "data moved to node-2"
        );
        assert!(
            read_block(&p2.target, (32 << 20) - 4096, 4096) == tail,
            "last block"
        );
        assert!(
            read_block(&p2.target, 0, 1 << 20).iter().all(|&b| b == 0),
            "unwritten reads zeros"
        );
        tear_down(&s.a, &s.b, "pvc-block", &p2).await;

        // A reader-only capability attaches the device read-only: reads work, writes fail.
        let ro_cap = pb::VolumeCapability {
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: pb::volume_capability::access_mode::Mode::SingleNodeReaderOnly as i32,
            }),
            ..cap.clone()
        };
        let p3 = paths(&s.dir, "node-1", "pvc-block", "pod-ro");
        bring_up(&s.a, &s.a, "pvc-block", &ro_cap, &p3).await;
        assert!(
            read_block(&p3.target, 3 << 20, 1 << 20) == data,
            "read-only device reads"
        );
        let denied = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p3.target)
            .and_then(|mut f| {
                let mut buf = AlignedBuf::new(4096);
                buf.as_mut().fill(0xee);
                f.write_all(buf.as_ref())?;
                f.sync_all()
            });
        assert!(
            denied.is_err(),
            "a write through a read-only device succeeded"
        );
        assert!(
            read_block(&p3.target, 0, 4096).iter().all(|&b| b == 0),
            "and changed nothing"
        );
        tear_down(&s.a, &s.a, "pvc-block", &p3).await;
        delete_twice(&s.a, "pvc-block").await;
    });
}

/// Every RPC's required fields and the error codes the CSI specification asks for, through
/// the real socket, plus the answers that must be OK for things already gone.
#[test]
fn argument_validation_and_error_codes() {
    let Some(s) = setup() else { return };
    runtime().block_on(async {
        use Code::{AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, OutOfRange};
        let cap = mount_cap("ext4");
        let mut id = s.a.identity().await;
        let info = id
            .get_plugin_info(pb::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "csi.cairn.io");
        assert!(!info.vendor_version.is_empty());
        let caps = id
            .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(caps.capabilities.len(), 3, "{caps:?}");
        let probe = id.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
        assert_eq!(probe.ready, Some(true), "meta is up");

        let mut c = s.a.controller().await;
        let mut n = s.a.node().await;
        let bad_caps = |mode: i32| pb::VolumeCapability {
            access_mode: Some(pb::volume_capability::AccessMode { mode }),
            ..cap.clone()
        };
        // CreateVolume.
        let ok = create_req("pvc-args", 16 * MIB, cap.clone());
        for (what, req, code) in [
            (
                "no name",
                pb::CreateVolumeRequest {
                    name: String::new(),
                    ..ok.clone()
                },
                InvalidArgument,
            ),
            (
                "no capabilities",
                pb::CreateVolumeRequest {
                    volume_capabilities: vec![],
                    ..ok.clone()
                },
                InvalidArgument,
            ),
            (
                "multi-node writer",
                pb::CreateVolumeRequest {
                    volume_capabilities: vec![bad_caps(
                        pb::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
                    )],
                    ..ok.clone()
                },
                InvalidArgument,
            ),
            (
                "unknown parameter",
                pb::CreateVolumeRequest {
                    parameters: HashMap::from([("replicas".into(), "3".into())]),
                    ..ok.clone()
                },
                InvalidArgument,
            ),
            (
                "limit below required",
                pb::CreateVolumeRequest {
                    capacity_range: Some(pb::CapacityRange {
                        required_bytes: 8 * MIB,
                        limit_bytes: 4 * MIB,
                    }),
                    ..ok.clone()
                },
                OutOfRange,
            ),
            (
                "unknown snapshot source",
                pb::CreateVolumeRequest {
                    volume_content_source: Some(pb::VolumeContentSource {
                        r#type: Some(pb::volume_content_source::Type::Snapshot(
                            pb::volume_content_source::SnapshotSource {
                                snapshot_id: "nope/nope".into(),
                            },
                        )),
                    }),
                    ..ok.clone()
                },
                NotFound,
            ),
            (
                "unknown volume source",
                pb::CreateVolumeRequest {
                    volume_content_source: Some(pb::VolumeContentSource {
                        r#type: Some(pb::volume_content_source::Type::Volume(
                            pb::volume_content_source::VolumeSource {
                                volume_id: "nope".into(),
                            },
                        )),
                    }),
                    ..ok.clone()
                },
                NotFound,
            ),
        ] {
            assert_code(c.create_volume(req).await, code, "", what);
        }
        c.create_volume(ok.clone()).await.unwrap();
        assert_code(
            c.create_volume(pb::CreateVolumeRequest {
                parameters: HashMap::from([("numberOfReplicas".into(), "3".into())]),
                ..ok.clone()
            })
            .await,
            AlreadyExists,
            "replicas",
            "same name, other replica count",
        );
        // A clone smaller than its source.
        assert_code(
            c.create_volume(pb::CreateVolumeRequest {
                name: "pvc-args-small-clone".into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 8 * MIB,
                    limit_bytes: 8 * MIB,
                }),
                volume_content_source: Some(pb::VolumeContentSource {
                    r#type: Some(pb::volume_content_source::Type::Volume(
                        pb::volume_content_source::VolumeSource {
                            volume_id: "pvc-args".into(),
                        },
                    )),
                }),
                ..ok.clone()
            })
            .await,
            OutOfRange,
            "pvc-args",
            "clone smaller than its source",
        );

        // Publish / unpublish.
        let publish = pb::ControllerPublishVolumeRequest {
            volume_id: "pvc-args".into(),
            node_id: "node-1".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        for (what, req, code) in [
            (
                "no volume id",
                pb::ControllerPublishVolumeRequest {
                    volume_id: String::new(),
                    ..publish.clone()
                },
                InvalidArgument,
            ),
            (
                "no node id",
                pb::ControllerPublishVolumeRequest {
                    node_id: String::new(),
                    ..publish.clone()
                },
                InvalidArgument,
            ),
            (
                "no capability",
                pb::ControllerPublishVolumeRequest {
                    volume_capability: None,
                    ..publish.clone()
                },
                InvalidArgument,
            ),
            (
                "unknown volume",
                pb::ControllerPublishVolumeRequest {
                    volume_id: "nope".into(),
                    ..publish.clone()
                },
                NotFound,
            ),
            (
                "unknown node",
                pb::ControllerPublishVolumeRequest {
                    node_id: "node-9".into(),
                    ..publish.clone()
                },
                NotFound,
            ),
        ] {
            assert_code(c.controller_publish_volume(req).await, code, "", what);
        }
        assert_code(
            c.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest::default())
                .await,
            InvalidArgument,
            "volume_id",
            "unpublish without a volume id",
        );
        c.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: "nope".into(),
            node_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .expect("unpublishing an unknown volume is OK");
        c.controller_publish_volume(publish.clone()).await.unwrap();
        assert_code(
            c.delete_volume(pb::DeleteVolumeRequest {
                volume_id: "pvc-args".into(),
                ..Default::default()
            })
            .await,
            FailedPrecondition,
            "node-1",
            "delete of a published volume",
        );
        c.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: "pvc-args".into(),
            node_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();

        // Validate, list, capacity, get.
        assert_code(
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: "nope".into(),
                volume_capabilities: vec![cap.clone()],
                ..Default::default()
            })
            .await,
            NotFound,
            "nope",
            "validate an unknown volume",
        );
        assert_code(
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: "pvc-args".into(),
                ..Default::default()
            })
            .await,
            InvalidArgument,
            "",
            "validate without capabilities",
        );
        let v = c
            .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: "pvc-args".into(),
                volume_capabilities: vec![cap.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(v.confirmed.is_some(), "{v:?}");
        let v = c
            .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: "pvc-args".into(),
                volume_capabilities: vec![bad_caps(
                    pb::volume_capability::access_mode::Mode::MultiNodeReaderOnly as i32,
                )],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(v.confirmed.is_none() && !v.message.is_empty(), "{v:?}");
        assert_code(
            c.list_volumes(pb::ListVolumesRequest {
                max_entries: 1,
                starting_token: "garbage".into(),
            })
            .await,
            Code::Aborted,
            "garbage",
            "list with a bad token",
        );
        let first = c
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(first.entries.len(), 1);
        assert!(
            !first.next_token.is_empty(),
            "vol0 and pvc-args: a second page"
        );
        let cap_resp = c
            .get_capacity(pb::GetCapacityRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(cap_resp.available_capacity > 0, "{cap_resp:?}");
        assert_code(
            c.controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: "nope".into(),
            })
            .await,
            NotFound,
            "nope",
            "get an unknown volume",
        );

        // Snapshots.
        let snap = pb::CreateSnapshotRequest {
            source_volume_id: "pvc-args".into(),
            name: "snapshot-args".into(),
            ..Default::default()
        };
        for (what, req, code) in [
            (
                "no source",
                pb::CreateSnapshotRequest {
                    source_volume_id: String::new(),
                    ..snap.clone()
                },
                InvalidArgument,
            ),
            (
                "no name",
                pb::CreateSnapshotRequest {
                    name: String::new(),
                    ..snap.clone()
                },
                InvalidArgument,
            ),
            (
                "unknown source",
                pb::CreateSnapshotRequest {
                    source_volume_id: "nope".into(),
                    ..snap.clone()
                },
                NotFound,
            ),
            (
                "bad type",
                pb::CreateSnapshotRequest {
                    parameters: HashMap::from([("type".into(), "tape".into())]),
                    ..snap.clone()
                },
                InvalidArgument,
            ),
            (
                "backup without target",
                pb::CreateSnapshotRequest {
                    parameters: HashMap::from([("type".into(), "backup".into())]),
                    ..snap.clone()
                },
                InvalidArgument,
            ),
        ] {
            assert_code(c.create_snapshot(req).await, code, "", what);
        }
        // A detached volume is attached for the moment of the snapshot.
        let taken = c
            .create_snapshot(snap.clone())
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(taken.snapshot_id, "pvc-args/snapshot-args");
        assert!(taken.ready_to_use);
        let again = c
            .create_snapshot(snap.clone())
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(
            again.snapshot_id, taken.snapshot_id,
            "CreateSnapshot is idempotent"
        );
        assert_code(
            c.create_snapshot(pb::CreateSnapshotRequest {
                source_volume_id: "vol0".into(),
                ..snap.clone()
            })
            .await,
            AlreadyExists,
            "pvc-args",
            "snapshot name taken by another volume",
        );
        let listed = c
            .list_snapshots(pb::ListSnapshotsRequest {
                source_volume_id: "pvc-args".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.entries.len(), 1, "{listed:?}");
        assert_code(
            c.delete_snapshot(pb::DeleteSnapshotRequest::default())
                .await,
            InvalidArgument,
            "snapshot_id",
            "delete snapshot without an id",
        );
        for _ in 0..2 {
            c.delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: taken.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        c.delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: "not an id".into(),
            ..Default::default()
        })
        .await
        .expect("deleting an unknown snapshot is OK");

        // Expansion.
        assert_code(
            c.controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: "pvc-args".into(),
                ..Default::default()
            })
            .await,
            InvalidArgument,
            "capacity_range",
            "expand without a capacity",
        );
        assert_code(
            c.controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: "nope".into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 32 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
            NotFound,
            "nope",
            "expand an unknown volume",
        );

        // Node calls.
        for (what, r) in [
            (
                "stage without a volume id",
                n.node_stage_volume(pb::NodeStageVolumeRequest {
                    staging_target_path: "/tmp/x".into(),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
            (
                "stage without a staging path",
                n.node_stage_volume(pb::NodeStageVolumeRequest {
                    volume_id: "pvc-args".into(),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
            (
                "stage without a capability",
                n.node_stage_volume(pb::NodeStageVolumeRequest {
                    volume_id: "pvc-args".into(),
                    staging_target_path: "/tmp/x".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
            (
                "stage without a publish context",
                n.node_stage_volume(pb::NodeStageVolumeRequest {
                    volume_id: "pvc-args".into(),
                    staging_target_path: "/tmp/x".into(),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
            (
                "publish without a target",
                n.node_publish_volume(pb::NodePublishVolumeRequest {
                    volume_id: "pvc-args".into(),
                    staging_target_path: "/tmp/x".into(),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
            (
                "unpublish without a target",
                n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                    volume_id: "pvc-args".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
            (
                "unstage without a volume id",
                n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
                    staging_target_path: "/tmp/x".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
            (
                "stats without a path",
                n.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                    volume_id: "pvc-args".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ] {
            assert_code(r, InvalidArgument, "", what);
        }
        assert_code(
            n.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: "pvc-args".into(),
                volume_path: s.dir.join("not-there").display().to_string(),
                ..Default::default()
            })
            .await,
            NotFound,
            "not-there",
            "stats of a missing path",
        );
        assert_code(
            n.node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: "pvc-args".into(),
                volume_path: s.dir.display().to_string(),
                ..Default::default()
            })
            .await,
            NotFound,
            "pvc-args",
            "expand a volume not staged here",
        );
        // Unpublish and unstage of what is not there succeed.
        n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: "pvc-args".into(),
            target_path: s.dir.join("never-published").display().to_string(),
        })
        .await
        .unwrap();
        n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: "pvc-args".into(),
            staging_target_path: s.dir.join("never-staged").display().to_string(),
        })
        .await
        .unwrap();
        let info = n
            .node_get_info(pb::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.node_id, "node-1");
        assert_eq!(
            info.accessible_topology
                .unwrap()
                .segments
                .get("topology.cairn.io/node")
                .map(String::as_str),
            Some("node-1")
        );
        delete_twice(&s.a, "pvc-args").await;
    });
}

/// Snapshots as Kubernetes takes them: a `type: snap` VolumeSnapshot of a mounted volume, a
/// new volume from it and a clone of the volume itself, and a `type: backup` VolumeSnapshot
/// to S3 (s3s-fs) restored into a third volume. Each new volume, mounted on node-2, holds
/// exactly the files of the source at the time of the snapshot.
#[test]
fn snapshot_clone_and_backup_restore_hold_the_same_files() {
    let Some(s) = setup() else { return };
    let Some(s3) = S3Server::start(&s.dir.join("s3"), "csi-backups") else {
        return;
    };
    runtime().block_on(async {
        let cap = mount_cap("ext4");
        let mut c = s.a.controller().await;
        c.create_volume(create_req("pvc-src", 32 * MIB, cap.clone()))
            .await
            .unwrap();
        let p = paths(&s.dir, "node-1", "pvc-src", "pod-src");
        bring_up(&s.a, &s.a, "pvc-src", &cap, &p).await;
        write_files(&p.target);

        // A local snapshot of the published volume, taken twice (idempotent).
        let snap_req = pb::CreateSnapshotRequest {
            source_volume_id: "pvc-src".into(),
            name: "snapshot-1".into(),
            parameters: HashMap::from([("type".into(), "snap".into())]),
            ..Default::default()
        };
        let snap = c
            .create_snapshot(snap_req.clone())
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert!(snap.ready_to_use);
        assert_eq!(snap.source_volume_id, "pvc-src");
        assert_eq!(snap.size_bytes, 32 * MIB);
        let again = c
            .create_snapshot(snap_req)
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(again.snapshot_id, snap.snapshot_id);

        // A backup to S3, credentials from the snapshotter secrets; ready once uploaded.
        let secrets = HashMap::from([
            ("endpoint".to_owned(), s3.endpoint()),
            ("region".to_owned(), S3_REGION.to_owned()),
            ("access_key_id".to_owned(), S3_ACCESS_KEY.to_owned()),
            ("secret_access_key".to_owned(), S3_SECRET_KEY.to_owned()),
        ]);
        let backup_req = pb::CreateSnapshotRequest {
            source_volume_id: "pvc-src".into(),
            name: "backup-1".into(),
            parameters: HashMap::from([
                ("type".into(), "backup".into()),
                ("target".into(), s3.url("cluster")),
            ]),
            secrets: secrets.clone(),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let backup = loop {
            let b = c
                .create_snapshot(backup_req.clone())
                .await
                .unwrap()
                .into_inner()
                .snapshot
                .unwrap();
            assert_eq!(b.snapshot_id, "backup:backup-1");
            if b.ready_to_use {
                break b;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "backup-1 not ready after 120 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        // Files written after the snapshots are in neither copy.
        std::fs::write(p.target.join("later.txt"), b"after the snapshots").unwrap();
        tear_down(&s.a, &s.a, "pvc-src", &p).await;

        let from = |name: &str, source: pb::volume_content_source::Type| pb::CreateVolumeRequest {
            volume_content_source: Some(pb::VolumeContentSource {
                r#type: Some(source),
            }),
            secrets: secrets.clone(),
            ..create_req(name, 32 * MIB, cap.clone())
        };
        let sources = [
            (
                "pvc-from-snap",
                pb::volume_content_source::Type::Snapshot(
                    pb::volume_content_source::SnapshotSource {
                        snapshot_id: snap.snapshot_id.clone(),
                    },
                ),
            ),
            (
                "pvc-from-backup",
                pb::volume_content_source::Type::Snapshot(
                    pb::volume_content_source::SnapshotSource {
                        snapshot_id: backup.snapshot_id.clone(),
                    },
                ),
            ),
            (
                "pvc-clone",
                pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
                    volume_id: "pvc-src".into(),
                }),
            ),
        ];
        for (name, source) in sources {
            let v = c
                .create_volume(from(name, source.clone()))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap();
            assert!(v.content_source.is_some(), "{name}: content source echoed");
            let again = c
                .create_volume(from(name, source))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap();
            assert_eq!(again.volume_id, v.volume_id, "{name}: idempotent");
            let p2 = paths(&s.dir, "node-2", name, "pod-2");
            bring_up(&s.a, &s.b, name, &cap, &p2).await;
            assert_files(&p2.target, name);
            let later = p2.target.join("later.txt").exists();
            // The clone copies the volume as it is now; the snapshot and backup as before.
            assert_eq!(
                later,
                name == "pvc-clone",
                "{name}: later.txt present: {later}"
            );
            tear_down(&s.a, &s.b, name, &p2).await;
            delete_twice(&s.a, name).await;
        }
        // The clone's temporary snapshot is gone; the two taken by the CO are listed.
        let listed: Vec<String> = c
            .list_snapshots(pb::ListSnapshotsRequest {
                source_volume_id: "pvc-src".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|e| e.snapshot.unwrap().snapshot_id)
            .collect();
        assert_eq!(
            listed,
            vec![
                "backup:backup-1".to_owned(),
                "pvc-src/backup-1".to_owned(),
                "pvc-src/snapshot-1".to_owned()
            ]
        );
        assert!(
            files_under(&s3.dir("cluster").join("blocks")) > 0,
            "the backup's blocks are in the bucket"
        );
        for id in [&backup.snapshot_id, &snap.snapshot_id] {
            for _ in 0..2 {
                c.delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    secrets: secrets.clone(),
                })
                .await
                .unwrap();
            }
        }
        let left = c
            .list_snapshots(pb::ListSnapshotsRequest {
                source_volume_id: "pvc-src".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(left.entries.is_empty(), "{left:?}");
        assert_eq!(
            files_under(&s3.dir("cluster").join("blocks")),
            0,
            "the deleted backup's blocks are garbage-collected"
        );
        delete_twice(&s.a, "pvc-src").await;
    });
}

/// Regular files under `dir`, recursively (0 when it does not exist).
fn files_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                files_under(&path)
            } else {
                1
            }
        })
        .sum()
}

/// Single-node access holds when the old node does not cooperate: node-1's agent is frozen
/// (SIGSTOP) while the volume is published there, the CO force-unpublishes it and publishes
/// it on node-2, then node-1 wakes up. A write node-1's engine then tries through its
/// export must fail (fenced by the epoch), and node-2 reads the data as it was.
#[test]
fn forced_unpublish_fences_the_old_nodes_engine() {
    let Some(s) = setup() else { return };
    runtime().block_on(async {
        let cap = block_cap();
        let mut c = s.a.controller().await;
        c.create_volume(create_req("pvc-rwo", 16 * MIB, cap.clone()))
            .await
            .unwrap();
        let p1 = paths(&s.dir, "node-1", "pvc-rwo", "pod-1");
        let ctx = bring_up(&s.a, &s.a, "pvc-rwo", &cap, &p1).await;
        let before = content(21, 1 << 20);
        write_block(&p1.target, 0, &before);
        // A second client of node-1's export, as a pod on node-1 would keep using it.
        let uri = ctx["nbdUri"].strip_prefix("nbd://").unwrap();
        let (addr, export) = uri.split_once('/').unwrap();
        let old = cairn_nbd::NbdClient::connect(addr.parse().unwrap(), export)
            .await
            .unwrap();
        old.write(1 << 20, bytes::Bytes::from(content(22, 4096)))
            .await
            .expect("node-1 writes while it holds the volume");

        let agent = s.cluster.agent_pid("node-1");
        send_signal(agent, libc::SIGSTOP);
        c.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: "pvc-rwo".into(),
            node_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let moved = c
            .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: "pvc-rwo".into(),
                node_id: "node-2".into(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await;
        send_signal(agent, libc::SIGCONT);
        let moved = moved.expect("publish on node-2 while node-1 is frozen");
        assert_ne!(moved.into_inner().publish_context["nbdUri"], ctx["nbdUri"]);

        let late = old.write(0, bytes::Bytes::from(content(23, 1 << 20))).await;
        assert!(
            late.is_err(),
            "node-1's engine acknowledged a write after losing the volume"
        );

        let p2 = paths(&s.dir, "node-2", "pvc-rwo", "pod-2");
        bring_up(&s.a, &s.b, "pvc-rwo", &cap, &p2).await;
        assert!(
            read_block(&p2.target, 0, 1 << 20) == before,
            "node-2 reads what node-1 wrote before"
        );
        assert!(
            read_block(&p2.target, 1 << 20, 4096) == content(22, 4096),
            "and its last write"
        );
        tear_down(&s.a, &s.b, "pvc-rwo", &p2).await;
        // node-1 cleans up its side (the CO unstages there once the node is back).
        let mut n1 = s.a.node().await;
        n1.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: "pvc-rwo".into(),
            target_path: p1.target.display().to_string(),
        })
        .await
        .unwrap();
        n1.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: "pvc-rwo".into(),
            staging_target_path: p1.staging.display().to_string(),
        })
        .await
        .unwrap();
        delete_twice(&s.a, "pvc-rwo").await;
    });
}

/// Online expansion as the resizer sidecar and kubelet drive it: ControllerExpandVolume of a
/// volume mounted on node-1 (the replicas, engine and export grow), then NodeExpandVolume
/// (the attached device and the xfs file system grow while mounted). Needs the resizable
/// attach mode (`cairn-fuse`; nbdfuse keeps its first size) and xfsprogs (online ext4 growth
/// needs CAP_SYS_RESOURCE, which this machine's root lacks).
#[test]
fn expand_while_mounted_grows_the_file_system() {
    if !have_tools(&["mkfs.xfs", "xfs_growfs"]) {
        println!("SKIP: xfsprogs is not installed");
        return;
    }
    let Some(s) = setup_attaching("cairn-fuse") else {
        return;
    };
    runtime().block_on(async {
        let cap = mount_cap("xfs");
        let mut c = s.a.controller().await;
        c.create_volume(create_req("pvc-grow", 320 * MIB, cap.clone()))
            .await
            .unwrap();
        let p = paths(&s.dir, "node-1", "pvc-grow", "pod-1");
        let ctx = bring_up(&s.a, &s.a, "pvc-grow", &cap, &p).await;
        write_files(&p.target);
        let stats = |n: &mut pb::node_client::NodeClient<tonic::transport::Channel>| {
            let req = pb::NodeGetVolumeStatsRequest {
                volume_id: "pvc-grow".into(),
                volume_path: p.target.display().to_string(),
                ..Default::default()
            };
            let mut n = n.clone();
            async move {
                let u = n
                    .node_get_volume_stats(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .usage;
                u.iter()
                    .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
                    .unwrap()
                    .total
            }
        };
        let mut n = s.a.node().await;
        let before = stats(&mut n).await;

        let expand = pb::ControllerExpandVolumeRequest {
            volume_id: "pvc-grow".into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 640 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        for _ in 0..2 {
            let r = c
                .controller_expand_volume(expand.clone())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.capacity_bytes, 640 * MIB);
            assert!(r.node_expansion_required);
        }
        // A new connection to the export sees the new size.
        let uri = ctx["nbdUri"].strip_prefix("nbd://").unwrap();
        let (addr, export) = uri.split_once('/').unwrap();
        let probe = cairn_nbd::NbdClient::connect(addr.parse().unwrap(), export)
            .await
            .unwrap();
        assert_eq!(probe.size(), 640 << 20);
        probe.disconnect().await.unwrap();

        let node_expand = pb::NodeExpandVolumeRequest {
            volume_id: "pvc-grow".into(),
            volume_path: p.target.display().to_string(),
            staging_target_path: p.staging.display().to_string(),
            capacity_range: expand.capacity_range,
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        for _ in 0..2 {
            let r = n
                .node_expand_volume(node_expand.clone())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.capacity_bytes, 640 * MIB);
        }
        let after = stats(&mut n).await;
        assert!(
            after > before + 250 * MIB,
            "the file system grew while mounted: {before} -> {after} bytes"
        );
        assert_files(&p.target, "files after growing");
        // The new space takes data.
        let big = content(31, 400 << 20);
        std::fs::write(p.target.join("big.bin"), &big).unwrap();
        assert!(
            std::fs::read(p.target.join("big.bin")).unwrap() == big,
            "big.bin"
        );
        tear_down(&s.a, &s.a, "pvc-grow", &p).await;
        delete_twice(&s.a, "pvc-grow").await;
    });
}

/// Volume health as kubelet sees it: NodeGetVolumeStats (and ControllerGetVolume) report the
/// volume abnormal while a replica's node is down, and normal again once it is back and
/// resynced.
#[test]
fn volume_condition_follows_replica_health() {
    let Some(s) = setup() else { return };
    runtime().block_on(async {
        let cap = mount_cap("ext4");
        let mut c = s.a.controller().await;
        let mut req = create_req("pvc-health", 16 * MIB, cap.clone());
        req.parameters.insert("numberOfReplicas".into(), "3".into());
        c.create_volume(req).await.unwrap();
        let p = paths(&s.dir, "node-1", "pvc-health", "pod-1");
        bring_up(&s.a, &s.a, "pvc-health", &cap, &p).await;
        let mut n = s.a.node().await;
        let condition = |n: &pb::node_client::NodeClient<tonic::transport::Channel>| {
            let mut n = n.clone();
            let req = pb::NodeGetVolumeStatsRequest {
                volume_id: "pvc-health".into(),
                volume_path: p.target.display().to_string(),
                ..Default::default()
            };
            async move {
                n.node_get_volume_stats(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .volume_condition
                    .unwrap()
            }
        };
        assert!(!condition(&n).await.abnormal);

        let held = s.cluster.kill_agent_and_hold("node-3");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let down = loop {
            let cond = condition(&n).await;
            if cond.abnormal {
                break cond;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still normal: {cond:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        assert!(down.message.starts_with("degraded"), "{down:?}");
        let got = c
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: "pvc-health".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(got.status.unwrap().volume_condition.unwrap().abnormal);
        // The volume keeps serving: the files written while degraded read back.
        write_files(&p.target);
        assert_files(&p.target, "files written while degraded");

        drop(held);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let cond = condition(&n).await;
            if !cond.abnormal {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still abnormal: {cond:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        tear_down(&s.a, &s.a, "pvc-health", &p).await;
        n.node_get_info(pb::NodeGetInfoRequest {}).await.unwrap();
        delete_twice(&s.a, "pvc-health").await;
    });
}

/// Probe is ready only while meta answers.
#[test]
fn probe_is_not_ready_without_meta() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens on port 1 of the loopback address.
    let csi = CsiProc::start_attaching(tmp.path(), "controller", "node-1", "127.0.0.1:1", "fuse");
    runtime().block_on(async {
        let mut id = csi.identity().await;
        let probe = id.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
        assert_eq!(probe.ready, Some(false));
        let caps = id
            .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            caps.capabilities.len(),
            3,
            "controller mode offers the controller service"
        );
    });
}

/// A second call on a volume while one is in flight gets ABORTED (the CO retries it) instead
/// of racing it. Meta is frozen (SIGSTOP) for a moment, so whichever of two calls on one
/// volume takes it first waits there; the other must be refused at once.
#[test]
fn a_call_on_a_busy_volume_is_aborted() {
    let Some(s) = setup() else { return };
    runtime().block_on(async {
        let cap = mount_cap("ext4");
        let c = s.a.controller().await;
        c.clone()
            .create_volume(create_req("pvc-busy", 16 * MIB, cap.clone()))
            .await
            .unwrap();
        let pid_file = s.cluster.dir.join("meta/m1/meta.pid");
        let meta: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // An unpublish from node-3 changes nothing (the volume is not there).
        let unpublish = |mut c: pb::controller_client::ControllerClient<
            tonic::transport::Channel,
        >| async move {
            c.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: "pvc-busy".into(),
                node_id: "node-3".into(),
                ..Default::default()
            })
            .await
        };
        send_signal(meta, libc::SIGSTOP);
        let first = tokio::spawn(unpublish(c.clone()));
        let second = tokio::spawn(unpublish(c.clone()));
        let (done, other) = match futures::future::select(first, second).await {
            futures::future::Either::Left((r, other))
            | futures::future::Either::Right((r, other)) => (r.unwrap(), other),
        };
        send_signal(meta, libc::SIGCONT);
        let refused = done.expect_err("the call that did not wait for meta was refused");
        assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
        assert!(refused.message().contains("pvc-busy"), "{refused:?}");
        other
            .await
            .unwrap()
            .expect("the call that held the volume completes once meta is back");
        delete_twice(&s.a, "pvc-busy").await;
    });
}

/// A restore interrupted by a crash of the controller is not taken for a complete copy: the
/// volume record keeps saying what it is being filled from, and the CO's retry of
/// CreateVolume (to a restarted controller) discards it and fills it again. Every byte of
/// the copy is then compared with the source.
#[test]
fn a_fill_cut_short_by_a_controller_crash_is_made_again() {
    let Some(mut s) = setup() else { return };
    runtime().block_on(async {
        let cap = block_cap();
        let mut c = s.a.controller().await;
        c.create_volume(create_req("pvc-src", 192 * MIB, cap.clone()))
            .await
            .unwrap();
        let p = paths(&s.dir, "node-1", "pvc-src", "pod-1");
        bring_up(&s.a, &s.a, "pvc-src", &cap, &p).await;
        for k in 0..160u64 {
            write_block(&p.target, k << 20, &content(k, 1 << 20));
        }
        tear_down(&s.a, &s.a, "pvc-src", &p).await;
        let snap = c
            .create_snapshot(pb::CreateSnapshotRequest {
                source_volume_id: "pvc-src".into(),
                name: "snapshot-src".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        let req = pb::CreateVolumeRequest {
            volume_content_source: Some(pb::VolumeContentSource {
                r#type: Some(pb::volume_content_source::Type::Snapshot(
                    pb::volume_content_source::SnapshotSource {
                        snapshot_id: snap.snapshot_id.clone(),
                    },
                )),
            }),
            ..create_req("pvc-copy", 192 * MIB, cap.clone())
        };
        let mut first = c.clone();
        let first_req = req.clone();
        let interrupted = tokio::spawn(async move { first.create_volume(first_req).await });
        let filling = || {
            let out = std::process::Command::new(cairn_bin())
                .args(["volume", "get", "pvc-copy", "--json", "--meta", META])
                .output()
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v["filling_from"].as_str().map(str::to_owned))
        };
        wait_until(
            "pvc-copy to be filling",
            std::time::Duration::from_secs(60),
            || filling().is_some(),
        );
        s.a.kill();
        assert!(
            interrupted.await.unwrap().is_err(),
            "the call died with its controller"
        );
        assert_eq!(
            filling().as_deref(),
            Some("snapshot pvc-src/snapshot-src"),
            "the unfinished fill is on record"
        );

        s.a = CsiProc::start_attaching(&s.dir, "all", "node-1", META, "fuse");
        let mut c = s.a.controller().await;
        let v = c
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.volume_id, "pvc-copy");
        assert_eq!(filling(), None, "the new fill completed");
        let p2 = paths(&s.dir, "node-2", "pvc-copy", "pod-2");
        bring_up(&s.a, &s.b, "pvc-copy", &cap, &p2).await;
        for k in 0..192u64 {
            let want = if k < 160 {
                content(k, 1 << 20)
            } else {
                vec![0; 1 << 20]
            };
            assert!(
                read_block(&p2.target, k << 20, 1 << 20) == want,
                "MiB {k} of the copy"
            );
        }
        tear_down(&s.a, &s.b, "pvc-copy", &p2).await;
        delete_twice(&s.a, "pvc-copy").await;
    });
}
