//! The leader-only controllers of one in-process member, driven through the
//! Meta client with heartbeats simulated: scheduling a volume's replicas onto
//! heartbeating nodes, a volume that cannot be fully placed, a node that stops
//! heartbeating, the replacement of its replicas after the replenish wait (or
//! not), the volume state as agents report replicas, best-effort data
//! locality moving a replica to the attached node, and volume deletion.
//!
//! Every wait polls a condition until a deadline, so a controller that does
//! not act fails the test instead of hanging it. A "nothing happened" check
//! waits for a canary the same controller tick would have acted on.

// tonic's calls return `tonic::Status` by value; the helpers pass it on.
#![allow(clippy::result_large_err)]

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::record::Record as R;
use cairn_proto::v1::{
    CreateRequest, DataLocality, Disk, GetRequest, HeartbeatRequest, Key, Kind, ListRequest, Node,
    NodeState, Record, Replica, ReplicaHealth, ReplicaMode, UpdateRequest, Volume, VolumeState,
};
use tonic::transport::Channel;

use common::One;

const GIB: u64 = 1 << 30;
const TICK: Duration = Duration::from_millis(100);
/// Node-down timeout of the tests where nodes fail.
const DOWN: Duration = Duration::from_secs(1);
/// Replica replenish wait of the tests where nodes fail.
const WAIT: Duration = Duration::from_secs(2);
/// Longest wait for a controller to act.
const LIMIT: Duration = Duration::from_secs(20);

const EMPTY: &str = "empty; created when the volume is first attached";
const REBUILD: &str = "waiting for a rebuild by the volume's engine";

type Client = MetaClient<Channel>;

async fn one(node_down_timeout: Duration, replenish_wait: Duration) -> One {
    common::one(|m| {
        m.with_node_down_timeout(node_down_timeout)
            .with_replica_replenish_wait(replenish_wait)
            .with_controller_tick(TICK)
    })
    .await
}

/// Free bytes of a node's only disk, `/d0`: nodes named `big-*` have more,
/// so they win placement.
fn free_of(node: &str) -> u64 {
    if node.starts_with("big-") {
        200 * GIB
    } else {
        100 * GIB
    }
}

async fn heartbeat(client: &mut Client, node: &str) {
    client
        .heartbeat(HeartbeatRequest {
            node: node.into(),
            disks: vec![Disk {
                path: "/d0".into(),
                capacity_bytes: free_of(node),
                free_bytes: free_of(node),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Heartbeats the nodes in its set every 100 ms, in name order, until
/// dropped.
struct Keeper {
    nodes: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Keeper {
    fn start(client: &Client, nodes: &[&str]) -> Self {
        let set = Arc::new(Mutex::new(
            nodes
                .iter()
                .map(|n| (*n).to_owned())
                .collect::<BTreeSet<_>>(),
        ));
        let mut c = client.clone();
        let shared = set.clone();
        let task = tokio::spawn(async move {
            loop {
                let now: Vec<String> = shared.lock().unwrap().iter().cloned().collect();
                for n in &now {
                    heartbeat(&mut c, n).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { nodes: set, task }
    }

    fn stop(&self, nodes: &[&str]) {
        let mut set = self.nodes.lock().unwrap();
        for n in nodes {
            set.remove(*n);
        }
    }

    fn add(&self, node: &str) {
        self.nodes.lock().unwrap().insert(node.to_owned());
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `probe` until it returns `Some`, at most [`LIMIT`].
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(t) = probe().await {
            return t;
        }
        assert!(Instant::now() < deadline, "no {what} within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn create_volume(client: &mut Client, name: &str, replicas: u32) {
    create_volume_with(client, name, replicas, DataLocality::Unspecified).await;
}

async fn create_volume_with(
    client: &mut Client,
    name: &str,
    replicas: u32,
    locality: DataLocality,
) {
    client
        .create(CreateRequest {
            record: Some(Record {
                record: Some(R::Volume(Volume {
                    name: name.into(),
                    size_bytes: GIB,
                    replica_count: replicas,
                    state: VolumeState::Creating.into(),
                    state_reason: "waiting for scheduling".into(),
                    data_locality: locality.into(),
                    ..Default::default()
                })),
            }),
        })
        .await
        .unwrap();
}

async fn update(client: &mut Client, record: R) {
    client
        .update(UpdateRequest {
            record: Some(Record {
                record: Some(record),
            }),
        })
        .await
        .unwrap();
}

/// The volume, `None` once it is deleted.
async fn try_volume(client: &mut Client, name: &str) -> Option<Volume> {
    let r = client
        .get(GetRequest {
            key: Some(Key {
                kind: Kind::Volume.into(),
                name: name.into(),
            }),
        })
        .await;
    match r {
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => panic!("get volume {name}: {s}"),
        Ok(r) => match r.into_inner().record.and_then(|r| r.record) {
            Some(R::Volume(v)) => Some(v),
            other => panic!("not a volume: {other:?}"),
        },
    }
}

async fn get_volume(client: &mut Client, name: &str) -> Volume {
    try_volume(client, name)
        .await
        .unwrap_or_else(|| panic!("no volume {name}"))
}

async fn get_node(client: &mut Client, name: &str) -> Node {
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

/// The volume's replica records, by name.
async fn replicas_of(client: &mut Client, volume: &str) -> Vec<Replica> {
    let mut out: Vec<Replica> = client
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
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Waits until the volume's state is `state` and returns it.
async fn wait_state(client: &Client, name: &str, state: VolumeState) -> Volume {
    wait_for(&format!("volume {name} {state:?}"), || {
        let mut c = client.clone();
        async move {
            let v = get_volume(&mut c, name).await;
            (v.state == i32::from(state)).then_some(v)
        }
    })
    .await
}

/// Waits until the volume leaves CREATING and returns it.
async fn wait_scheduled(client: &Client, name: &str) -> Volume {
    wait_for(&format!("volume {name} scheduled"), || {
        let mut c = client.clone();
        async move {
            let v = get_volume(&mut c, name).await;
            (v.state != i32::from(VolumeState::Creating)).then_some(v)
        }
    })
    .await
}

/// A replica record as the scheduler creates it (version 1).
fn placed(name: &str, volume: &str, node: &str, empty: bool) -> Replica {
    let (mode, health, reason) = if empty {
        (ReplicaMode::Rw, ReplicaHealth::Healthy, EMPTY)
    } else {
        (ReplicaMode::Wo, ReplicaHealth::Rebuilding, REBUILD)
    };
    Replica {
        name: name.into(),
        version: 1,
        volume: volume.into(),
        node: node.into(),
        disk: "/d0".into(),
        mode: mode.into(),
        health: health.into(),
        health_reason: reason.into(),
        deleted: false,
    }
}

/// Sets a replica's mode and health as an agent would, from its version.
async fn report(
    client: &mut Client,
    r: &Replica,
    mode: ReplicaMode,
    health: ReplicaHealth,
    why: &str,
) {
    let mut next = r.clone();
    next.mode = mode.into();
    next.health = health.into();
    next.health_reason = why.into();
    update(client, R::Replica(next)).await;
}

/// Nodes a, b, c heartbeated once, and volume `vol` with 3 replicas placed on
/// them (vol-r0 on a, vol-r1 on b, vol-r2 on c), HEALTHY.
async fn healthy_vol_on_abc(one: &mut One) {
    for n in ["a", "b", "c"] {
        heartbeat(&mut one.client, n).await;
    }
    create_volume(&mut one.client, "vol", 3).await;
    let v = wait_scheduled(&one.client, "vol").await;
    assert_eq!(v.state, i32::from(VolumeState::Healthy), "{v:?}");
    assert_eq!(v.state_reason, "");
    assert_eq!(
        replicas_of(&mut one.client, "vol").await,
        [
            placed("vol-r0", "vol", "a", true),
            placed("vol-r1", "vol", "b", true),
            placed("vol-r2", "vol", "c", true),
        ]
    );
}

#[tokio::test]
async fn three_nodes_get_three_empty_rw_replicas() {
    let mut one = one(Duration::from_secs(60), WAIT).await;
    healthy_vol_on_abc(&mut one).await;
}

#[tokio::test]
async fn two_nodes_leave_the_volume_degraded_until_a_third_is_rebuilt() {
    let mut one = one(Duration::from_secs(60), WAIT).await;
    for n in ["a", "b"] {
        heartbeat(&mut one.client, n).await;
    }
    create_volume(&mut one.client, "vol", 3).await;
    // The first reason counts the nodes before the placement; the next tick's
    // is the steady one.
    let v = wait_for("vol placed on a and b", || {
        let mut c = one.client.clone();
        async move {
            let v = get_volume(&mut c, "vol").await;
            v.state_reason
                .ends_with("already holding a replica")
                .then_some(v)
        }
    })
    .await;
    assert_eq!(v.state, i32::from(VolumeState::Degraded), "{v:?}");
    assert_eq!(
        v.state_reason,
        "2 of 3 replicas RW: 2 of 3 replicas placed for volume vol: only 0 eligible nodes (up, \
         schedulable, holding no replica of the volume, with a disk that has 1.0 GiB free); 2 \
         nodes in total, 2 already holding a replica"
    );
    assert_eq!(
        replicas_of(&mut one.client, "vol").await,
        [
            placed("vol-r0", "vol", "a", true),
            placed("vol-r1", "vol", "b", true),
        ]
    );

    // A third node gets a replica that may need data: WO until rebuilt.
    heartbeat(&mut one.client, "c").await;
    let v = wait_for("vol-r2 placed", || {
        let mut c = one.client.clone();
        async move {
            let v = get_volume(&mut c, "vol").await;
            v.state_reason.contains("vol-r2").then_some(v)
        }
    })
    .await;
    assert_eq!(v.state, i32::from(VolumeState::Degraded));
    assert_eq!(v.state_reason, "2 of 3 replicas RW: vol-r2 on c rebuilding");
    let reps = replicas_of(&mut one.client, "vol").await;
    assert_eq!(reps[2], placed("vol-r2", "vol", "c", false));

    // The engine rebuilt it; its agent says so.
    report(
        &mut one.client,
        &reps[2],
        ReplicaMode::Rw,
        ReplicaHealth::Healthy,
        "",
    )
    .await;
    let v = wait_state(&one.client, "vol", VolumeState::Healthy).await;
    assert_eq!(v.state_reason, "");
}

#[tokio::test]
async fn silent_node_goes_down_and_its_replicas_err() {
    let mut one = one(DOWN, Duration::from_secs(600)).await;
    healthy_vol_on_abc(&mut one).await;

    // a and b keep heartbeating, c stops.
    let _keep = Keeper::start(&one.client, &["a", "b"]);
    let v = wait_state(&one.client, "vol", VolumeState::Degraded).await;
    let node = get_node(&mut one.client, "c").await;
    assert_eq!(node.state, i32::from(NodeState::Down));
    let why = node.state_reason.clone();
    assert!(
        why.starts_with("no heartbeat for ") && why.ends_with('s'),
        "{why}"
    );
    assert_eq!(
        v.state_reason,
        format!("2 of 3 replicas RW: vol-r2 on c ERR ({why})")
    );
    let reps = replicas_of(&mut one.client, "vol").await;
    assert_eq!(
        reps[2],
        Replica {
            version: 2,
            mode: ReplicaMode::Err.into(),
            health: ReplicaHealth::Failed.into(),
            health_reason: why,
            ..placed("vol-r2", "vol", "c", true)
        }
    );
    assert_eq!(
        reps[..2],
        [
            placed("vol-r0", "vol", "a", true),
            placed("vol-r1", "vol", "b", true)
        ]
    );
    for n in ["a", "b"] {
        assert_eq!(
            get_node(&mut one.client, n).await.state,
            i32::from(NodeState::Up)
        );
    }
}

#[tokio::test]
async fn down_replica_is_replaced_on_the_spare_node_after_the_wait() {
    let mut one = one(DOWN, WAIT).await;
    // Before c's last heartbeat.
    let started = Instant::now();
    healthy_vol_on_abc(&mut one).await;
    let _keep = Keeper::start(&one.client, &["a", "b", "d"]);

    let reps = wait_for("a replica on d", || {
        let mut c = one.client.clone();
        async move {
            let reps = replicas_of(&mut c, "vol").await;
            reps.iter().any(|r| r.node == "d").then_some(reps)
        }
    })
    .await;
    assert!(started.elapsed() >= DOWN + WAIT, "{:?}", started.elapsed());
    assert_eq!(reps.len(), 4, "{reps:?}");
    assert_eq!(
        reps[..2],
        [
            placed("vol-r0", "vol", "a", true),
            placed("vol-r1", "vol", "b", true)
        ]
    );
    // The old one: failed by node health (v2), then replaced (v3).
    let old = &reps[2];
    let down_for = old
        .health_reason
        .strip_prefix("replaced by vol-r3: node c down for ")
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{:?}", old.health_reason));
    assert!(down_for >= (DOWN + WAIT).as_secs(), "{down_for}");
    assert_eq!(
        *old,
        Replica {
            version: 3,
            mode: ReplicaMode::Err.into(),
            health: ReplicaHealth::Stale.into(),
            health_reason: old.health_reason.clone(),
            deleted: true,
            ..placed("vol-r2", "vol", "c", true)
        }
    );
    assert_eq!(reps[3], placed("vol-r3", "vol", "d", false));
    let live: BTreeSet<&str> = reps
        .iter()
        .filter(|r| !r.deleted)
        .map(|r| r.node.as_str())
        .collect();
    assert_eq!(live, BTreeSet::from(["a", "b", "d"]));
    let v = get_volume(&mut one.client, "vol").await;
    assert_eq!(v.state, i32::from(VolumeState::Degraded));
    assert_eq!(v.state_reason, "2 of 3 replicas RW: vol-r3 on d rebuilding");

    // Rebuilt: HEALTHY again; the deleted record stays for c's agent.
    report(
        &mut one.client,
        &reps[3],
        ReplicaMode::Rw,
        ReplicaHealth::Healthy,
        "",
    )
    .await;
    let v = wait_state(&one.client, "vol", VolumeState::Healthy).await;
    assert_eq!(v.state_reason, "");
    assert_eq!(replicas_of(&mut one.client, "vol").await[2], *old);
}

#[tokio::test]
async fn node_back_within_the_wait_keeps_its_replicas() {
    let mut one = one(DOWN, WAIT).await;
    healthy_vol_on_abc(&mut one).await;
    // The canary: a volume on big-d and big-e whose replica on big-d is
    // replaced once the wait is over (big-d stops heartbeating after c).
    for n in ["big-d", "big-e"] {
        heartbeat(&mut one.client, n).await;
    }
    create_volume(&mut one.client, "canary", 2).await;
    wait_state(&one.client, "canary", VolumeState::Healthy).await;
    let canary: Vec<String> = replicas_of(&mut one.client, "canary")
        .await
        .iter()
        .map(|r| r.node.clone())
        .collect();
    assert_eq!(canary, ["big-d", "big-e"]);

    let keep = Keeper::start(&one.client, &["a", "b", "big-d", "big-e", "c"]);
    keep.stop(&["big-d", "c"]);
    let why = wait_for("node c down", || {
        let mut cl = one.client.clone();
        async move {
            let n = get_node(&mut cl, "c").await;
            (n.state == i32::from(NodeState::Down)).then_some(n.state_reason)
        }
    })
    .await;
    heartbeat(&mut one.client, "c").await;
    keep.add("c");

    wait_for("the canary's replica replaced", || {
        let mut cl = one.client.clone();
        async move {
            let reps = replicas_of(&mut cl, "canary").await;
            reps.iter().any(|r| r.deleted).then_some(())
        }
    })
    .await;
    // The same tick would have replaced vol-r2 had c stayed silent.
    let reps = replicas_of(&mut one.client, "vol").await;
    assert_eq!(
        reps,
        [
            placed("vol-r0", "vol", "a", true),
            placed("vol-r1", "vol", "b", true),
            Replica {
                version: 2,
                mode: ReplicaMode::Err.into(),
                health: ReplicaHealth::Failed.into(),
                health_reason: why.clone(),
                ..placed("vol-r2", "vol", "c", true)
            },
        ]
    );
    assert_eq!(
        get_node(&mut one.client, "c").await.state,
        i32::from(NodeState::Up)
    );
    let v = get_volume(&mut one.client, "vol").await;
    assert_eq!(v.state, i32::from(VolumeState::Degraded));
    assert_eq!(
        v.state_reason,
        format!("2 of 3 replicas RW: vol-r2 on c ERR ({why})")
    );
}

#[tokio::test]
async fn only_copy_on_a_down_node_is_not_replaced() {
    let mut one = one(DOWN, WAIT).await;
    for n in ["a", "b"] {
        heartbeat(&mut one.client, n).await;
    }
    create_volume(&mut one.client, "vol", 1).await;
    wait_state(&one.client, "vol", VolumeState::Healthy).await;
    let _keep = Keeper::start(&one.client, &["b"]);

    // The note appears once the wait is over.
    let v = wait_for("the volume saying vol-r0 is not replaced", || {
        let mut c = one.client.clone();
        async move {
            let v = get_volume(&mut c, "vol").await;
            v.state_reason.contains("is not replaced").then_some(v)
        }
    })
    .await;
    assert_eq!(v.state, i32::from(VolumeState::Faulted));
    assert_eq!(
        v.state_reason,
        "no RW replica: vol-r0 on a RW but its node is down; replica vol-r0 on down node a is \
         not replaced: no other RW replica on an up node"
    );
    // The only copy holds every acknowledged write: node health leaves it RW (unwritten),
    // so an engine can start from it once its node is back.
    assert_eq!(
        replicas_of(&mut one.client, "vol").await,
        [placed("vol-r0", "vol", "a", true)]
    );
}

#[tokio::test]
async fn volume_state_follows_what_agents_report() {
    let mut one = one(Duration::from_secs(60), WAIT).await;
    healthy_vol_on_abc(&mut one).await;
    let r1 = replicas_of(&mut one.client, "vol").await[1].clone();

    report(
        &mut one.client,
        &r1,
        ReplicaMode::Err,
        ReplicaHealth::Failed,
        "io error",
    )
    .await;
    let v = wait_state(&one.client, "vol", VolumeState::Degraded).await;
    assert_eq!(
        v.state_reason,
        "2 of 3 replicas RW: vol-r1 on b ERR (io error)"
    );

    let failed = replicas_of(&mut one.client, "vol").await[1].clone();
    assert_eq!(
        failed,
        Replica {
            version: 2,
            mode: ReplicaMode::Err.into(),
            health: ReplicaHealth::Failed.into(),
            health_reason: "io error".into(),
            ..r1
        }
    );
    report(
        &mut one.client,
        &failed,
        ReplicaMode::Rw,
        ReplicaHealth::Healthy,
        "",
    )
    .await;
    let v = wait_state(&one.client, "vol", VolumeState::Healthy).await;
    assert_eq!(v.state_reason, "");
    // The controller wrote the volume only, never the replica.
    let r1 = replicas_of(&mut one.client, "vol").await[1].clone();
    assert_eq!(
        r1,
        Replica {
            version: 3,
            health_reason: String::new(),
            ..placed("vol-r1", "vol", "b", true)
        }
    );
}

#[tokio::test]
async fn deleting_volume_marks_replicas_deleted_and_goes() {
    let mut one = one(Duration::from_secs(60), WAIT).await;
    for n in ["a", "b"] {
        heartbeat(&mut one.client, n).await;
    }
    create_volume(&mut one.client, "vol", 2).await;
    let mut v = wait_state(&one.client, "vol", VolumeState::Healthy).await;
    v.state = VolumeState::Deleting.into();
    update(&mut one.client, R::Volume(v)).await;

    wait_for("volume vol deleted", || {
        let mut c = one.client.clone();
        async move { try_volume(&mut c, "vol").await.is_none().then_some(()) }
    })
    .await;
    let gone = |name: &str, node: &str| Replica {
        version: 2,
        health_reason: "volume vol deleted".into(),
        deleted: true,
        ..placed(name, "vol", node, true)
    };
    assert_eq!(
        replicas_of(&mut one.client, "vol").await,
        [gone("vol-r0", "a"), gone("vol-r1", "b")]
    );
}

#[tokio::test]
async fn attached_deleting_volume_waits_for_detach() {
    let mut one = one(Duration::from_secs(60), WAIT).await;
    heartbeat(&mut one.client, "a").await;
    for name in ["held", "free"] {
        create_volume(&mut one.client, name, 1).await;
        wait_state(&one.client, name, VolumeState::Healthy).await;
    }
    let mut held = get_volume(&mut one.client, "held").await;
    held.state = VolumeState::Deleting.into();
    held.attached_node = "a".into();
    update(&mut one.client, R::Volume(held)).await;
    let held = get_volume(&mut one.client, "held").await;
    // The canary, set DELETING after: its deletion proves a tick saw both.
    let mut free = get_volume(&mut one.client, "free").await;
    free.state = VolumeState::Deleting.into();
    update(&mut one.client, R::Volume(free)).await;
    wait_for("volume free deleted", || {
        let mut c = one.client.clone();
        async move { try_volume(&mut c, "free").await.is_none().then_some(()) }
    })
    .await;
    assert_eq!(get_volume(&mut one.client, "held").await, held);
    assert_eq!(
        replicas_of(&mut one.client, "held").await,
        [placed("held-r0", "held", "a", true)]
    );

    // Detached: deleted.
    let mut detached = held;
    detached.attached_node.clear();
    update(&mut one.client, R::Volume(detached)).await;
    wait_for("volume held deleted", || {
        let mut c = one.client.clone();
        async move { try_volume(&mut c, "held").await.is_none().then_some(()) }
    })
    .await;
    assert_eq!(
        replicas_of(&mut one.client, "held").await,
        [Replica {
            version: 2,
            health_reason: "volume held deleted".into(),
            deleted: true,
            ..placed("held-r0", "held", "a", true)
        }]
    );
}

#[tokio::test]
async fn best_effort_locality_moves_a_replica_to_the_attached_node() {
    let mut one = one(Duration::from_secs(60), WAIT).await;
    for n in ["a", "b", "c", "d"] {
        heartbeat(&mut one.client, n).await;
    }
    create_volume_with(&mut one.client, "vol", 2, DataLocality::BestEffort).await;
    let mut v = wait_state(&one.client, "vol", VolumeState::Healthy).await;
    assert_eq!(
        replicas_of(&mut one.client, "vol").await,
        [
            placed("vol-r0", "vol", "a", true),
            placed("vol-r1", "vol", "b", true),
        ]
    );

    // Attached on d, which holds none: one extra replica there, to rebuild.
    v.attached_node = "d".into();
    update(&mut one.client, R::Volume(v)).await;
    let local = wait_for("a replica on d", || {
        let mut c = one.client.clone();
        async move {
            let reps = replicas_of(&mut c, "vol").await;
            reps.into_iter().find(|r| r.node == "d")
        }
    })
    .await;
    assert_eq!(local, placed("vol-r2", "vol", "d", false));
    let v = get_volume(&mut one.client, "vol").await;
    assert_eq!(v.state, i32::from(VolumeState::Healthy), "{v:?}");
    assert_eq!(v.state_reason, "");

    // The engine rebuilt it; its agent says so. One of the others goes: a and
    // b have the same free space, so the smaller name, vol-r0.
    report(
        &mut one.client,
        &local,
        ReplicaMode::Rw,
        ReplicaHealth::Healthy,
        "",
    )
    .await;
    let reps = wait_for("a replica removed for data locality", || {
        let mut c = one.client.clone();
        async move {
            let reps = replicas_of(&mut c, "vol").await;
            reps.iter().any(|r| r.deleted).then_some(reps)
        }
    })
    .await;
    assert_eq!(
        reps,
        [
            Replica {
                version: 2,
                health: ReplicaHealth::Stale.into(),
                health_reason: "removed for data locality: vol-r2 on d holds the data".into(),
                deleted: true,
                ..placed("vol-r0", "vol", "a", true)
            },
            placed("vol-r1", "vol", "b", true),
            Replica {
                version: 2,
                mode: ReplicaMode::Rw.into(),
                health: ReplicaHealth::Healthy.into(),
                health_reason: String::new(),
                ..local
            },
        ]
    );
    let v = wait_state(&one.client, "vol", VolumeState::Healthy).await;
    assert_eq!(v.state_reason, "");
    assert_eq!(v.attached_node, "d");
    let live: BTreeSet<&str> = reps
        .iter()
        .filter(|r| !r.deleted)
        .map(|r| r.node.as_str())
        .collect();
    assert_eq!(live, BTreeSet::from(["b", "d"]));
    assert_eq!(replicas_of(&mut one.client, "vol").await, reps);
}
