//! The `cairn.v1.Meta` service of one in-process member on a loopback port,
//! driven by the generated client: the gRPC status code of each kind of
//! failure, List filters, Heartbeat and Watch.
//!
//! Watch streams are read with a timeout, so a missing event fails the test
//! instead of hanging it.

// tonic's calls return `tonic::Status` by value; the helpers pass it on.
#![allow(clippy::result_large_err)]

mod common;

use std::time::Duration;

use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::record::Record as R;
use cairn_proto::v1::{
    CreateRequest, DeleteRequest, Disk, EventType, GetRequest, HeartbeatRequest, Key, Kind,
    ListRequest, Node, NodeState, Record, RemoveMemberRequest, Replica, UpdateRequest, Volume,
    WatchEvent, WatchRequest,
};
use tonic::transport::Channel;
use tonic::Code;

use common::One;

async fn one() -> One {
    one_with(cairn_meta::server::DEFAULT_NODE_DOWN_TIMEOUT).await
}

async fn one_with(node_down_timeout: Duration) -> One {
    common::one(|m| m.with_node_down_timeout(node_down_timeout)).await
}

fn volume(name: &str, size: u64) -> Record {
    Record {
        record: Some(R::Volume(Volume {
            name: name.into(),
            size_bytes: size,
            replica_count: 1,
            ..Default::default()
        })),
    }
}

fn replica(name: &str, volume: &str, node: &str) -> Record {
    Record {
        record: Some(R::Replica(Replica {
            name: name.into(),
            volume: volume.into(),
            node: node.into(),
            disk: "/d".into(),
            ..Default::default()
        })),
    }
}

fn with_version(r: Record, v: u64) -> Record {
    cairn_proto::with_version(r, v)
}

fn key(kind: Kind, name: &str) -> Option<Key> {
    Some(Key {
        kind: kind.into(),
        name: name.into(),
    })
}

fn names(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| cairn_proto::name_of(r).unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn status_codes() {
    let mut m = one().await;
    let c = &mut m.client;
    let created = c
        .create(CreateRequest {
            record: Some(volume("v1", 1 << 20)),
        })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(cairn_proto::version_of(&created), Some(1));

    // Duplicate create.
    let e = c
        .create(CreateRequest {
            record: Some(volume("v1", 1 << 20)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");

    // Stale version: bring it to 2, then update expecting 1.
    c.update(UpdateRequest {
        record: Some(with_version(volume("v1", 2 << 20), 1)),
    })
    .await
    .unwrap();
    let e = c
        .update(UpdateRequest {
            record: Some(with_version(volume("v1", 3 << 20), 1)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    let e = c
        .delete(DeleteRequest {
            key: key(Kind::Volume, "v1"),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");

    // Missing records.
    let e = c
        .update(UpdateRequest {
            record: Some(with_version(volume("nope", 4096), 1)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = c
        .get(GetRequest {
            key: key(Kind::Volume, "nope"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = c
        .delete(DeleteRequest {
            key: key(Kind::Volume, "nope"),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // Invalid arguments name the field.
    let e = c
        .create(CreateRequest {
            record: Some(volume("Bad_Name", 4096)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("volume.name"), "{e}");
    let e = c
        .create(CreateRequest {
            record: Some(volume("v2", 4097)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("size"), "{e}");
    let e = c
        .create(CreateRequest {
            record: Some(replica("r1", "v1", "Node_A")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("replica.node"), "{e}");
    let e = c
        .update(UpdateRequest {
            record: Some(volume("v1", 4096)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = c
        .get(GetRequest {
            key: key(Kind::Unspecified, "v1"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // Delete with the right version, then the record is gone.
    c.delete(DeleteRequest {
        key: key(Kind::Volume, "v1"),
        expected_version: 2,
    })
    .await
    .unwrap();
    let e = c
        .get(GetRequest {
            key: key(Kind::Volume, "v1"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
}

#[tokio::test]
async fn list_filters_by_volume_and_node() {
    let mut m = one().await;
    let c = &mut m.client;
    for (r, v, n) in [
        ("r1", "va", "n1"),
        ("r2", "va", "n2"),
        ("r3", "vb", "n1"),
        ("r4", "vb", "n2"),
    ] {
        c.create(CreateRequest {
            record: Some(replica(r, v, n)),
        })
        .await
        .unwrap();
    }
    let mut attached = volume("vc", 4096);
    if let Some(R::Volume(v)) = attached.record.as_mut() {
        v.attached_node = "n1".into();
    }
    c.create(CreateRequest {
        record: Some(attached),
    })
    .await
    .unwrap();
    c.create(CreateRequest {
        record: Some(volume("vd", 4096)),
    })
    .await
    .unwrap();

    let list = |kind: Kind, volume: &str, node: &str| ListRequest {
        kind: kind.into(),
        volume: volume.into(),
        node: node.into(),
    };
    let all = c
        .list(list(Kind::Replica, "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&all.records), ["r1", "r2", "r3", "r4"]);
    assert!(all.revision > 0);
    let by_vol = c.list(list(Kind::Replica, "va", "")).await.unwrap();
    assert_eq!(names(&by_vol.into_inner().records), ["r1", "r2"]);
    let by_node = c.list(list(Kind::Replica, "", "n2")).await.unwrap();
    assert_eq!(names(&by_node.into_inner().records), ["r2", "r4"]);
    let both = c.list(list(Kind::Replica, "vb", "n1")).await.unwrap();
    assert_eq!(names(&both.into_inner().records), ["r3"]);
    let vols = c.list(list(Kind::Volume, "", "n1")).await.unwrap();
    assert_eq!(names(&vols.into_inner().records), ["vc"]);
    let vols = c.list(list(Kind::Volume, "", "")).await.unwrap();
    assert_eq!(names(&vols.into_inner().records), ["vc", "vd"]);
    let e = c.list(list(Kind::Unspecified, "", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
}

#[tokio::test]
async fn remove_last_member_fails() {
    let mut m = one().await;
    let e = m
        .client
        .remove_member(RemoveMemberRequest { id: 1 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let e = m
        .client
        .remove_member(RemoveMemberRequest { id: 9 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(m.member.raft.current_leader().await == Some(1));
}

fn now_ms() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(d.as_millis()).unwrap()
}

fn disk(path: &str, free: u64) -> Disk {
    Disk {
        path: path.into(),
        capacity_bytes: 1 << 30,
        free_bytes: free,
    }
}

#[tokio::test]
async fn heartbeat_upserts_the_node() {
    let mut m = one_with(Duration::from_millis(2500)).await;
    let c = &mut m.client;
    let node = Node {
        name: "n1.example".into(),
        address: "127.0.0.2:7000".into(),
        zone: "z1".into(),
        disks: vec![disk("/old", 1)],
        state: NodeState::Down.into(),
        state_reason: "no heartbeat".into(),
        ..Default::default()
    };
    c.create(CreateRequest {
        record: Some(Record {
            record: Some(R::Node(node)),
        }),
    })
    .await
    .unwrap();

    let before = now_ms();
    let r = c
        .heartbeat(HeartbeatRequest {
            node: "n1.example".into(),
            disks: vec![disk("/d1", 7), disk("/d2", 8)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let after = now_ms();
    assert_eq!(r.node_down_timeout_ms, 2500);
    let n = r.node.unwrap();
    assert_eq!(n.version, 2);
    assert_eq!(n.state(), NodeState::Up);
    assert_eq!(n.state_reason, "");
    assert_eq!(n.zone, "z1");
    assert_eq!(n.address, "127.0.0.2:7000");
    assert_eq!(n.disks, vec![disk("/d1", 7), disk("/d2", 8)]);
    assert!(
        (before..=after).contains(&n.heartbeat_unix_ms),
        "{before} <= {} <= {after}",
        n.heartbeat_unix_ms
    );
    // The stored record is the answered one.
    let got = c
        .get(GetRequest {
            key: key(Kind::Node, "n1.example"),
        })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(got.record, Some(R::Node(n)));

    // An unknown node is created from the heartbeat.
    let r = c
        .heartbeat(HeartbeatRequest {
            node: "n2".into(),
            disks: vec![disk("/d", 1)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let n = r.node.unwrap();
    assert_eq!((n.name.as_str(), n.version), ("n2", 1));
    assert_eq!(n.state(), NodeState::Up);
    assert_eq!(r.node_down_timeout_ms, 2500);

    let e = c
        .heartbeat(HeartbeatRequest {
            node: "Bad_Node".into(),
            disks: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("heartbeat.node"), "{e}");
}

#[tokio::test]
async fn heartbeat_timeout_defaults_to_10s() {
    let mut m = one().await;
    let r = m
        .client
        .heartbeat(HeartbeatRequest {
            node: "n1".into(),
            disks: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.node_down_timeout_ms, 10_000);
}

const EVENT_WAIT: Duration = Duration::from_secs(10);

async fn next(s: &mut tonic::Streaming<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(EVENT_WAIT, s.message())
        .await
        .expect("no event in time")
        .unwrap()
        .expect("stream ended")
}

/// (type, name, version) of an event.
fn summary(e: &WatchEvent) -> (EventType, String, u64) {
    let r = e.record.as_ref().unwrap();
    (
        e.r#type(),
        cairn_proto::name_of(r).unwrap().to_owned(),
        cairn_proto::version_of(r).unwrap(),
    )
}

async fn watch(
    c: &mut MetaClient<Channel>,
    kinds: &[Kind],
    from: u64,
) -> tonic::Streaming<WatchEvent> {
    c.watch(WatchRequest {
        kinds: kinds.iter().map(|k| i32::from(*k)).collect(),
        from_revision: from,
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn watch_sees_changes_in_order_and_resumes() {
    let m = one().await;
    let mut c = m.client.clone();
    c.create(CreateRequest {
        record: Some(volume("pre", 4096)),
    })
    .await
    .unwrap();
    let listed = c
        .list(ListRequest {
            kind: Kind::Volume.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // From 0: the current volumes at the current revision, then changes.
    let mut w = watch(&mut c, &[Kind::Volume], 0).await;
    let e = next(&mut w).await;
    assert_eq!(summary(&e), (EventType::Put, "pre".into(), 1));
    assert_eq!(e.revision, listed.revision);

    c.create(CreateRequest {
        record: Some(volume("v1", 4096)),
    })
    .await
    .unwrap();
    c.create(CreateRequest {
        record: Some(replica("r1", "v1", "n1")),
    })
    .await
    .unwrap();
    c.update(UpdateRequest {
        record: Some(with_version(volume("v1", 8192), 1)),
    })
    .await
    .unwrap();
    c.delete(DeleteRequest {
        key: key(Kind::Volume, "v1"),
        expected_version: 0,
    })
    .await
    .unwrap();
    c.create(CreateRequest {
        record: Some(volume("v2", 4096)),
    })
    .await
    .unwrap();

    let want = [
        (EventType::Put, "v1".to_owned(), 1),
        (EventType::Put, "v1".to_owned(), 2),
        (EventType::Delete, "v1".to_owned(), 2),
        (EventType::Put, "v2".to_owned(), 1),
    ];
    let mut seen = Vec::new();
    for _ in 0..want.len() {
        seen.push(next(&mut w).await);
    }
    assert_eq!(seen.iter().map(summary).collect::<Vec<_>>(), want);
    let revs: Vec<u64> = seen.iter().map(|e| e.revision).collect();
    assert!(revs[0] > listed.revision, "{revs:?}");
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    // The deleted record comes with its last value.
    match seen[2].record.as_ref().unwrap().record.as_ref() {
        Some(R::Volume(v)) => assert_eq!(v.size_bytes, 8192),
        other => panic!("{other:?}"),
    }

    // Resume from the update: the same events again, same revisions.
    let mut again = watch(&mut c, &[Kind::Volume], revs[1]).await;
    for e in &seen[1..] {
        assert_eq!(&next(&mut again).await, e);
    }
    // All kinds from the first create: the replica is in between.
    let mut all = watch(&mut c, &[], revs[0]).await;
    let first_two: Vec<_> = [next(&mut all).await, next(&mut all).await]
        .iter()
        .map(summary)
        .collect();
    assert_eq!(
        first_two,
        [
            (EventType::Put, "v1".to_owned(), 1),
            (EventType::Put, "r1".to_owned(), 1)
        ]
    );

    // Live changes reach every open stream.
    c.heartbeat(HeartbeatRequest {
        node: "n1".into(),
        disks: vec![],
        ..Default::default()
    })
    .await
    .unwrap();
    c.create(CreateRequest {
        record: Some(volume("v3", 4096)),
    })
    .await
    .unwrap();
    assert_eq!(
        summary(&next(&mut w).await),
        (EventType::Put, "v3".into(), 1)
    );
    assert_eq!(
        summary(&next(&mut again).await),
        (EventType::Put, "v3".into(), 1)
    );
    for _ in 0..3 {
        next(&mut all).await; // update, delete, v2
    }
    assert_eq!(
        summary(&next(&mut all).await),
        (EventType::Put, "n1".into(), 1)
    );
    assert_eq!(
        summary(&next(&mut all).await),
        (EventType::Put, "v3".into(), 1)
    );

    let e = c
        .watch(WatchRequest {
            kinds: vec![Kind::Unspecified.into()],
            from_revision: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
}
