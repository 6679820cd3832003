//! The leader-only controllers of one in-process member, driven through the
//! Meta client: scheduling a volume's replicas onto heartbeating nodes, a
//! volume that cannot be fully placed, and a node that stops heartbeating.
//!
//! Every wait polls with a bounded number of attempts, so a controller that
//! does not act fails the test instead of hanging it.

// tonic's calls return `tonic::Status` by value; the helpers pass it on.
#![allow(clippy::result_large_err)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::record::Record as R;
use cairn_proto::v1::{
    CreateRequest, Disk, GetRequest, HeartbeatRequest, Key, Kind, ListRequest, Node, NodeState,
    Record, Replica, ReplicaHealth, ReplicaMode, Volume, VolumeState,
};
use tonic::transport::Channel;

use common::One;

const GIB: u64 = 1 << 30;
const TICK: Duration = Duration::from_millis(100);

async fn one(node_down_timeout: Duration) -> One {
    common::one(|m| {
        m.with_node_down_timeout(node_down_timeout)
            .with_controller_tick(TICK)
    })
    .await
}

async fn heartbeat(client: &mut MetaClient<Channel>, node: &str) {
    client
        .heartbeat(HeartbeatRequest {
            node: node.into(),
            disks: vec![Disk {
                path: "/d0".into(),
                capacity_bytes: 100 * GIB,
                free_bytes: 100 * GIB,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn create_volume(client: &mut MetaClient<Channel>, name: &str, replicas: u32) {
    client
        .create(CreateRequest {
            record: Some(Record {
                record: Some(R::Volume(Volume {
                    name: name.into(),
                    size_bytes: GIB,
                    replica_count: replicas,
                    state: VolumeState::Creating.into(),
                    ..Default::default()
                })),
            }),
        })
        .await
        .unwrap();
}

async fn get_volume(client: &mut MetaClient<Channel>, name: &str) -> Volume {
    let r = client
        .get(GetRequest {
            key: Some(Key {
                kind: Kind::Volume.into(),
                name: name.into(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    match r.record.and_then(|r| r.record) {
        Some(R::Volume(v)) => v,
        other => panic!("not a volume: {other:?}"),
    }
}

async fn get_node(client: &mut MetaClient<Channel>, name: &str) -> Node {
    let r = client
        .get(GetRequest {
            key: Some(Key {
                kind: Kind::Node.into(),
                name: name.into(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    match r.record.and_then(|r| r.record) {
        Some(R::Node(n)) => n,
        other => panic!("not a node: {other:?}"),
    }
}

async fn replicas_of(client: &mut MetaClient<Channel>, volume: &str) -> Vec<Replica> {
    client
        .list(ListRequest {
            kind: Kind::Replica.into(),
            volume: volume.into(),
            node: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .records
        .into_iter()
        .filter_map(|r| match r.record {
            Some(R::Replica(x)) => Some(x),
            _ => None,
        })
        .collect()
}

/// Polls until the volume leaves CREATING, at most 10 s.
async fn wait_scheduled(client: &mut MetaClient<Channel>, name: &str) -> Volume {
    for _ in 0..200 {
        let v = get_volume(client, name).await;
        if v.state != i32::from(VolumeState::Creating) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("volume {name} still CREATING after 10 s");
}

#[tokio::test]
async fn three_nodes_get_three_replicas() {
    let mut one = one(Duration::from_secs(60)).await;
    for n in ["a", "b", "c"] {
        heartbeat(&mut one.client, n).await;
    }
    create_volume(&mut one.client, "vol", 3).await;
    let v = wait_scheduled(&mut one.client, "vol").await;
    assert_eq!(v.state, i32::from(VolumeState::Healthy), "{v:?}");
    assert!(v.state_reason.is_empty());
    let reps = replicas_of(&mut one.client, "vol").await;
    assert_eq!(reps.len(), 3, "{reps:?}");
    let nodes: BTreeSet<&str> = reps.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["a", "b", "c"]));
    let names: BTreeSet<&str> = reps.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["vol-r0", "vol-r1", "vol-r2"]));
    for r in &reps {
        assert_eq!(r.disk, "/d0");
        assert_eq!(r.mode, i32::from(ReplicaMode::Wo));
        assert_eq!(r.health, i32::from(ReplicaHealth::Rebuilding));
    }
    // Nothing more is placed on later ticks.
    tokio::time::sleep(TICK * 3).await;
    assert_eq!(replicas_of(&mut one.client, "vol").await.len(), 3);
}

#[tokio::test]
async fn two_nodes_leave_the_volume_degraded() {
    let mut one = one(Duration::from_secs(60)).await;
    for n in ["a", "b"] {
        heartbeat(&mut one.client, n).await;
    }
    create_volume(&mut one.client, "vol", 3).await;
    let v = wait_scheduled(&mut one.client, "vol").await;
    assert_eq!(v.state, i32::from(VolumeState::Degraded), "{v:?}");
    assert!(
        v.state_reason.contains("2 of 3 replicas placed"),
        "{}",
        v.state_reason
    );
    let reps = replicas_of(&mut one.client, "vol").await;
    let nodes: BTreeSet<&str> = reps.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(reps.len(), 2);
    assert_eq!(nodes, BTreeSet::from(["a", "b"]));

    // A third node lets the DEGRADED volume reach its count.
    heartbeat(&mut one.client, "c").await;
    let mut healthy = false;
    for _ in 0..200 {
        if get_volume(&mut one.client, "vol").await.state == i32::from(VolumeState::Healthy) {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healthy, "volume not HEALTHY after a third node joined");
    let reps = replicas_of(&mut one.client, "vol").await;
    let nodes: BTreeSet<&str> = reps.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["a", "b", "c"]));
}

#[tokio::test]
async fn silent_node_goes_down_and_its_replicas_err() {
    let mut one = one(Duration::from_secs(1)).await;
    for n in ["a", "b", "c"] {
        heartbeat(&mut one.client, n).await;
    }
    create_volume(&mut one.client, "vol", 3).await;
    let v = wait_scheduled(&mut one.client, "vol").await;
    assert_eq!(v.state, i32::from(VolumeState::Healthy), "{v:?}");

    // a and b keep heartbeating, c stops.
    let mut hb = one.client.clone();
    let keep = tokio::spawn(async move {
        loop {
            heartbeat(&mut hb, "a").await;
            heartbeat(&mut hb, "b").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut down = None;
    for _ in 0..200 {
        let n = get_node(&mut one.client, "c").await;
        let reps = replicas_of(&mut one.client, "vol").await;
        let c_rep = reps.iter().find(|r| r.node == "c").cloned();
        if n.state == i32::from(NodeState::Down)
            && c_rep
                .as_ref()
                .is_some_and(|r| r.mode == i32::from(ReplicaMode::Err))
        {
            down = Some((n, c_rep.unwrap(), reps));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    keep.abort();
    let (node, rep, reps) = down.expect("node c not DOWN with an ERR replica within 10 s");
    assert!(
        node.state_reason.starts_with("no heartbeat for ") && node.state_reason.ends_with('s'),
        "{}",
        node.state_reason
    );
    assert_eq!(rep.health, i32::from(ReplicaHealth::Failed));
    assert_eq!(rep.health_reason, node.state_reason);
    for r in reps.iter().filter(|r| r.node != "c") {
        assert_eq!(r.mode, i32::from(ReplicaMode::Wo), "{r:?}");
    }
    for n in ["a", "b"] {
        assert_eq!(
            get_node(&mut one.client, n).await.state,
            i32::from(NodeState::Up)
        );
    }
}
