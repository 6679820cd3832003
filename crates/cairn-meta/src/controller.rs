//! Leader-only controllers: node health and replica scheduling.
//!
//! One tokio task per member ([`spawn`]) ticks every [`Settings::tick`]. On a
//! tick it acts only while this member is the leader according to
//! `raft.metrics()`; it first calls `raft.ensure_linearizable()` so the
//! applied records it reads (`StateMachineStore::list`) include every
//! acknowledged write. The decisions are pure functions of those records and
//! the clock ([`node_health`], [`schedule_volume`]); the loop only writes the
//! returned [`Command`]s through `raft.client_write`. Every write carries the
//! versions it was computed from, so a concurrent change makes it fail as a
//! conflict, which just means: decide again on the next tick.
//!
//! 1. **Node health.** A node whose `heartbeat_unix_ms` is older than the
//!    node-down timeout (0 = never heartbeated counts as old) becomes DOWN with
//!    the reason "no heartbeat for Ns" (N: whole seconds since its last
//!    heartbeat); every non-deleted replica on a stale node that is not
//!    already mode ERR and health FAILED gets both, with the same reason. The
//!    node and its replicas are written in one batch. A node that heartbeats
//!    again is set UP by Heartbeat itself; its replicas stay ERR until an
//!    agent rebuilds them.
//! 2. **Scheduling.** A volume in state CREATING, or DEGRADED, with fewer
//!    non-deleted replicas than `replica_count` gets new replicas from
//!    [`crate::schedule::place`]. Every non-deleted replica counts toward the
//!    target (replacing failed replicas is a later controller's job), and
//!    every node holding one is excluded, so a volume never gets two replicas
//!    on one node. A node is `up` when its state is UP and always schedulable
//!    (there is no cordon yet); its disks are the ones it last heartbeated.
//!    New replicas are named `<volume>-r<n>` with the smallest `n` not used by
//!    any replica record, and start with mode WO and health REBUILDING
//!    ("waiting for its node's agent to create it"): they hold no data yet.
//!    The replicas are created (expected version 0) in ONE batch with the
//!    volume's update: state HEALTHY when the volume has all its replicas —
//!    here HEALTHY means "fully placed"; real health will come from the
//!    agents — or DEGRADED with the schedule's shortfall reason. A CREATING
//!    volume that already has all its replicas just becomes HEALTHY; a
//!    DEGRADED one with nothing placeable and an unchanged reason is not
//!    rewritten.
//!
//! Assumes: the member's clock is roughly in step with the clock of the
//! leaders that stamped the heartbeats (after a leader change, heartbeats are
//! compared with another member's clock).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_proto::v1::record::Record as R;
use cairn_proto::v1::{
    Kind, Node, NodeState, Record, Replica, ReplicaHealth, ReplicaMode, Volume, VolumeState,
};
use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use tokio::sync::watch;

use crate::schedule::{self, DiskInfo, ExistingReplica, NodeInfo, VolumeSpec};
use crate::{Command, Raft, StateMachineStore};

/// Default of [`Settings::tick`].
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);

/// Health reason of a replica the scheduler just created.
pub const NEW_REPLICA_REASON: &str = "waiting for its node's agent to create it";

/// How the controllers run; read again on every tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Time between two ticks.
    pub tick: Duration,
    /// How long a node may stay silent before it is DOWN.
    pub node_down_timeout: Duration,
}

/// Starts the controller loop of a member. It ends when every sender of
/// `settings` is dropped.
pub fn spawn(
    raft: Raft,
    sm: StateMachineStore,
    settings: watch::Receiver<Settings>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(raft, sm, settings))
}

async fn run(raft: Raft, sm: StateMachineStore, mut settings: watch::Receiver<Settings>) {
    loop {
        let s = *settings.borrow_and_update();
        tokio::select! {
            () = tokio::time::sleep(s.tick) => {}
            changed = settings.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        }
        if !is_leader(&raft) {
            continue;
        }
        if let Err(e) = tick(&raft, &sm, s.node_down_timeout).await {
            tracing::debug!("controller tick stopped: {e}");
        }
    }
}

fn is_leader(raft: &Raft) -> bool {
    let m = raft.metrics().borrow().clone();
    m.current_leader == Some(m.id)
}

/// This member's clock, unix milliseconds (0 before 1970).
fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The applied records of one kind, decoded; undecodable ones are skipped.
fn list(sm: &StateMachineStore, kind: Kind) -> Result<Vec<Record>, String> {
    let recs = sm.list(kind.cli_name()).map_err(|e| e.to_string())?;
    Ok(recs
        .iter()
        .filter_map(|r| match crate::server::decode(r) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!("controller skips a record: {}", e.message());
                None
            }
        })
        .collect())
}

async fn tick(
    raft: &Raft,
    sm: &StateMachineStore,
    node_down_timeout: Duration,
) -> Result<(), String> {
    raft.ensure_linearizable()
        .await
        .map_err(|e| e.to_string())?;
    let nodes: Vec<Node> = list(sm, Kind::Node)?
        .into_iter()
        .filter_map(|r| match r.record {
            Some(R::Node(n)) => Some(n),
            _ => None,
        })
        .collect();
    let replicas: Vec<Replica> = list(sm, Kind::Replica)?
        .into_iter()
        .filter_map(|r| match r.record {
            Some(R::Replica(x)) => Some(x),
            _ => None,
        })
        .collect();
    let health = node_health(now_unix_ms(), node_down_timeout, &nodes, &replicas);
    let changed_nodes = !health.is_empty();
    for cmd in health {
        write(raft, cmd).await?;
    }
    if changed_nodes {
        // Schedule on the new node states, read on the next tick.
        return Ok(());
    }
    let volumes: Vec<Volume> = list(sm, Kind::Volume)?
        .into_iter()
        .filter_map(|r| match r.record {
            Some(R::Volume(v)) => Some(v),
            _ => None,
        })
        .collect();
    for v in &volumes {
        if let Some(cmd) = schedule_volume(v, &nodes, &replicas) {
            write(raft, cmd).await?;
        }
    }
    Ok(())
}

/// Proposes `cmd`; a conflict is logged and left to the next tick. An error
/// (for instance lost leadership) ends this tick.
async fn write(raft: &Raft, cmd: Command) -> Result<(), String> {
    match raft.client_write(cmd).await {
        Ok(r) if r.data.is_applied() => Ok(()),
        Ok(r) => {
            tracing::debug!(
                "controller write not applied ({:?}), next tick retries",
                r.data
            );
            Ok(())
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            Err("no longer the leader".to_owned())
        }
        Err(e) => Err(e.to_string()),
    }
}

fn put(kind: Kind, name: &str, record: R, expected_version: u64) -> Command {
    let data = cairn_proto::with_version(
        Record {
            record: Some(record),
        },
        0,
    )
    .encode_to_vec();
    Command::Put {
        kind: kind.cli_name().to_owned(),
        name: name.to_owned(),
        data,
        expected_version: Some(expected_version),
    }
}

/// The writes of the node-health controller at `now_ms`: one batch per stale
/// node that is not DOWN yet or still has replicas to fail.
#[must_use]
pub fn node_health(
    now_ms: u64,
    node_down_timeout: Duration,
    nodes: &[Node],
    replicas: &[Replica],
) -> Vec<Command> {
    let timeout_ms = u64::try_from(node_down_timeout.as_millis()).unwrap_or(u64::MAX);
    let mut out = Vec::new();
    for n in nodes {
        let silent_ms = now_ms.saturating_sub(n.heartbeat_unix_ms);
        if n.heartbeat_unix_ms != 0 && silent_ms <= timeout_ms {
            continue;
        }
        let is_down = n.state == i32::from(NodeState::Down);
        let reason = if is_down && !n.state_reason.is_empty() {
            n.state_reason.clone()
        } else if n.heartbeat_unix_ms == 0 {
            "no heartbeat received".to_owned()
        } else {
            format!("no heartbeat for {}s", silent_ms / 1000)
        };
        let mut batch = Vec::new();
        if !is_down {
            let mut down = n.clone();
            down.state = NodeState::Down.into();
            down.state_reason.clone_from(&reason);
            batch.push(put(Kind::Node, &n.name, R::Node(down), n.version));
        }
        for r in replicas.iter().filter(|r| r.node == n.name && !r.deleted) {
            if r.mode == i32::from(ReplicaMode::Err) && r.health == i32::from(ReplicaHealth::Failed)
            {
                continue;
            }
            let mut failed = r.clone();
            failed.mode = ReplicaMode::Err.into();
            failed.health = ReplicaHealth::Failed.into();
            failed.health_reason.clone_from(&reason);
            batch.push(put(Kind::Replica, &r.name, R::Replica(failed), r.version));
        }
        if !batch.is_empty() {
            out.push(Command::Batch(batch));
        }
    }
    out
}

fn node_info(n: &Node) -> NodeInfo {
    NodeInfo {
        name: n.name.clone(),
        zone: (!n.zone.is_empty()).then(|| n.zone.clone()),
        up: n.state == i32::from(NodeState::Up),
        schedulable: true,
        disks: n
            .disks
            .iter()
            .map(|d| DiskInfo {
                path: d.path.clone(),
                capacity_bytes: d.capacity_bytes,
                free_bytes: d.free_bytes,
            })
            .collect(),
    }
}

/// The write of the scheduling controller for volume `v`, if any: new
/// replica records and the volume's new state, in one batch.
#[must_use]
pub fn schedule_volume(v: &Volume, nodes: &[Node], replicas: &[Replica]) -> Option<Command> {
    let creating = v.state == i32::from(VolumeState::Creating);
    let degraded = v.state == i32::from(VolumeState::Degraded);
    if !creating && !degraded {
        return None;
    }
    let existing: Vec<ExistingReplica> = replicas
        .iter()
        .filter(|r| r.volume == v.name && !r.deleted)
        .map(|r| ExistingReplica {
            node: r.node.clone(),
            disk: r.disk.clone(),
            healthy: true,
        })
        .collect();
    let have = u32::try_from(existing.len()).unwrap_or(u32::MAX);
    if have >= v.replica_count {
        if !creating {
            return None;
        }
        let mut done = v.clone();
        done.state = VolumeState::Healthy.into();
        done.state_reason.clear();
        return Some(put(Kind::Volume, &v.name, R::Volume(done), v.version));
    }
    let spec = VolumeSpec {
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        replica_count: v.replica_count,
        locality: (!v.attached_node.is_empty()).then(|| v.attached_node.clone()),
    };
    let infos: Vec<NodeInfo> = nodes.iter().map(node_info).collect();
    let result = schedule::place(&spec, &infos, &existing);
    let mut next = v.clone();
    if result.is_complete() {
        next.state = VolumeState::Healthy.into();
        next.state_reason.clear();
    } else {
        next.state = VolumeState::Degraded.into();
        next.state_reason = result.reason.clone().unwrap_or_default();
    }
    if result.placements.is_empty() && next.state == v.state && next.state_reason == v.state_reason
    {
        return None;
    }
    let taken: BTreeSet<&str> = replicas.iter().map(|r| r.name.as_str()).collect();
    let mut batch = Vec::new();
    let mut n = 0u64;
    for p in &result.placements {
        let name = loop {
            let candidate = format!("{}-r{n}", v.name);
            n += 1;
            if !taken.contains(candidate.as_str()) {
                break candidate;
            }
        };
        let replica = Replica {
            name: name.clone(),
            version: 0,
            volume: v.name.clone(),
            node: p.node.clone(),
            disk: p.disk.clone(),
            mode: ReplicaMode::Wo.into(),
            health: ReplicaHealth::Rebuilding.into(),
            health_reason: NEW_REPLICA_REASON.to_owned(),
            deleted: false,
        };
        batch.push(put(Kind::Replica, &name, R::Replica(replica), 0));
    }
    batch.push(put(Kind::Volume, &v.name, R::Volume(next), v.version));
    Some(Command::Batch(batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, heartbeat_unix_ms: u64, state: NodeState) -> Node {
        Node {
            name: name.into(),
            version: 3,
            heartbeat_unix_ms,
            state: state.into(),
            disks: vec![cairn_proto::v1::Disk {
                path: "/d0".into(),
                capacity_bytes: 10,
                free_bytes: 10,
            }],
            ..Node::default()
        }
    }

    fn replica(name: &str, node: &str, mode: ReplicaMode, health: ReplicaHealth) -> Replica {
        Replica {
            name: name.into(),
            version: 2,
            volume: "vol".into(),
            node: node.into(),
            disk: "/d0".into(),
            mode: mode.into(),
            health: health.into(),
            ..Replica::default()
        }
    }

    fn puts(cmd: &Command) -> Vec<(String, String, Option<u64>, Record)> {
        let Command::Batch(cmds) = cmd else {
            panic!("not a batch: {cmd:?}")
        };
        cmds.iter()
            .map(|c| match c {
                Command::Put {
                    kind,
                    name,
                    data,
                    expected_version,
                } => (
                    kind.clone(),
                    name.clone(),
                    *expected_version,
                    Record::decode(data.as_slice()).unwrap(),
                ),
                other => panic!("not a put: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn fresh_nodes_are_left_alone() {
        let nodes = [node("a", 10_000, NodeState::Up)];
        let reps = [replica("r", "a", ReplicaMode::Rw, ReplicaHealth::Healthy)];
        assert!(node_health(10_500, Duration::from_secs(1), &nodes, &reps).is_empty());
        assert!(node_health(11_000, Duration::from_secs(1), &nodes, &reps).is_empty());
    }

    #[test]
    fn stale_node_goes_down_with_its_replicas_once() {
        let nodes = [
            node("a", 10_000, NodeState::Up),
            node("b", 13_000, NodeState::Up),
        ];
        let reps = [
            replica("r0", "a", ReplicaMode::Rw, ReplicaHealth::Healthy),
            replica("r1", "b", ReplicaMode::Rw, ReplicaHealth::Healthy),
        ];
        let out = node_health(13_500, Duration::from_secs(1), &nodes, &reps);
        assert_eq!(out.len(), 1);
        let p = puts(&out[0]);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].0.as_str(), p[0].1.as_str(), p[0].2),
            ("node", "a", Some(3))
        );
        let Some(R::Node(n)) = &p[0].3.record else {
            panic!()
        };
        assert_eq!(n.state, i32::from(NodeState::Down));
        assert_eq!(n.state_reason, "no heartbeat for 3s");
        assert_eq!(
            (p[1].0.as_str(), p[1].1.as_str(), p[1].2),
            ("replica", "r0", Some(2))
        );
        let Some(R::Replica(r)) = &p[1].3.record else {
            panic!()
        };
        assert_eq!(r.mode, i32::from(ReplicaMode::Err));
        assert_eq!(r.health, i32::from(ReplicaHealth::Failed));
        assert_eq!(r.health_reason, "no heartbeat for 3s");

        // Once written, nothing more to do.
        let mut down = nodes[0].clone();
        down.state = NodeState::Down.into();
        down.state_reason = "no heartbeat for 3s".into();
        let failed = replica("r0", "a", ReplicaMode::Err, ReplicaHealth::Failed);
        assert!(node_health(20_000, Duration::from_secs(1), &[down], &[failed]).is_empty());
    }

    fn volume(state: VolumeState, count: u32) -> Volume {
        Volume {
            name: "vol".into(),
            version: 5,
            size_bytes: 1,
            replica_count: count,
            state: state.into(),
            ..Volume::default()
        }
    }

    #[test]
    fn schedules_on_free_nodes_only_with_next_free_names() {
        let nodes = [
            node("a", 1, NodeState::Up),
            node("b", 1, NodeState::Up),
            node("c", 1, NodeState::Down),
            node("d", 1, NodeState::Up),
        ];
        let reps = [replica(
            "vol-r0",
            "a",
            ReplicaMode::Wo,
            ReplicaHealth::Rebuilding,
        )];
        let cmd = schedule_volume(&volume(VolumeState::Degraded, 3), &nodes, &reps).unwrap();
        let p = puts(&cmd);
        let placed: Vec<(&str, &str)> = p[..2]
            .iter()
            .map(|(_, name, v, rec)| {
                assert_eq!(*v, Some(0));
                let Some(R::Replica(r)) = &rec.record else {
                    panic!()
                };
                (name.as_str(), r.node.as_str())
            })
            .collect();
        assert_eq!(placed, [("vol-r1", "b"), ("vol-r2", "d")]);
        let Some(R::Volume(v)) = &p[2].3.record else {
            panic!()
        };
        assert_eq!(p[2].2, Some(5));
        assert_eq!(v.state, i32::from(VolumeState::Healthy));
    }

    #[test]
    fn unchanged_shortfall_is_not_rewritten() {
        let nodes = [node("a", 1, NodeState::Up)];
        let reps = [replica(
            "vol-r0",
            "a",
            ReplicaMode::Wo,
            ReplicaHealth::Rebuilding,
        )];
        let cmd = schedule_volume(&volume(VolumeState::Creating, 2), &nodes, &reps).unwrap();
        let p = puts(&cmd);
        assert_eq!(p.len(), 1);
        let Some(R::Volume(v)) = &p[0].3.record else {
            panic!()
        };
        assert_eq!(v.state, i32::from(VolumeState::Degraded));
        assert!(v.state_reason.starts_with("1 of 2 replicas placed"));
        let mut again = v.clone();
        again.version = 6;
        assert!(schedule_volume(&again, &nodes, &reps).is_none());
        assert!(schedule_volume(&volume(VolumeState::Healthy, 2), &nodes, &reps).is_none());
    }
}
