//! Leader-only controllers: node health, replica replacement, scheduling,
//! data locality, volume state and volume deletion.
//!
//! One tokio task per member ([`spawn`]) ticks every [`Settings::tick`]. On a
//! tick it acts only while this member is the leader according to
//! `raft.metrics()`; it first calls `raft.ensure_linearizable()` so the
//! applied records it reads (`StateMachineStore::list`) include every
//! acknowledged write. The decisions are pure functions of those records and
//! the clock ([`node_health`], [`reconcile_volume`]); the loop only writes the
//! returned [`Command`]s through `raft.client_write`. Every write carries the
//! versions it was computed from, so a concurrent change (an agent reporting
//! a replica, a client updating a volume) makes it fail as a conflict, which
//! just means: decide again on the next tick. Replica mode, health and
//! health reason are written by agents as the volume's engine reports them;
//! the controllers rewrite a record only from the version they read and keep
//! every field they do not decide.
//!
//! 1. **Node health.** A node whose `heartbeat_unix_ms` is older than the
//!    node-down timeout (0 = never heartbeated counts as old) becomes DOWN with
//!    the reason "no heartbeat for Ns" (N: whole seconds since its last
//!    heartbeat); every non-deleted replica on a stale node that is not
//!    already mode ERR and health FAILED gets both, with the same reason,
//!    except a volume's last RW replica: it holds every acknowledged write
//!    and stays RW (the volume is FAULTED while its node is down), so that
//!    after a whole-cluster outage an engine can start from it. The
//!    node and its replicas are written in one batch, and the tick ends there
//!    (the volumes are looked at on the next one). A node that heartbeats
//!    again is set UP by Heartbeat itself; its replicas stay ERR until its
//!    volume's engine resyncs them (no meta action).
//!
//! The other controllers run per volume, and write at most one batch per
//! volume and tick ([`reconcile_volume`]); a batch that writes replicas always
//! writes the volume too, from the version read.
//!
//! 2. **Deletion.** A volume a client set to DELETING and that is detached
//!    (`attached_node` empty) gets, in one batch, `deleted = true` on every
//!    replica record not deleted yet (health reason "volume V deleted"; the
//!    records stay so that each node's agent deletes the data, then the
//!    record) and its Volume record deleted. An attached DELETING volume is
//!    left alone until it is detached. Nothing else touches a DELETING volume.
//! 3. **Replacement.** A non-deleted replica whose node is DOWN with a last
//!    heartbeat older than node-down timeout + [`Settings::replica_replenish_wait`]
//!    (the volume's `stale_replica_timeout_seconds` instead when non-zero)
//!    is replaced, but only while the volume keeps another non-deleted RW
//!    replica on an UP node (what might be the only good copy is never
//!    thrown away) and only where [`crate::schedule::replace`] finds a node.
//!    The old record gets `deleted = true`, health STALE and the reason
//!    "replaced by NEW: node N down for Ns"; the new one is created as in 4.
//!    A replica that cannot be replaced stays, and the volume's reason says
//!    why ("replica R on down node N cannot be replaced: ..." or "... is not
//!    replaced: no other RW replica on an up node").
//! 4. **Scheduling.** A volume with fewer non-deleted replicas than
//!    `replica_count` gets new ones from [`crate::schedule::place`]; every
//!    node holding any replica record of the volume (deleted or not) is
//!    excluded, so a volume never gets two replicas on one node. A node is
//!    eligible when UP (always schedulable: there is no cordon yet) with a
//!    disk it last heartbeated that has room. New replicas are named
//!    `<volume>-r<n>` with the smallest `n` not used by any replica record.
//!    The attaching node goes first when the volume's `data_locality` is
//!    BEST_EFFORT and the node is eligible. For a CREATING volume (never
//!    attached, no data) they start RW/HEALTHY,
//!    [`EMPTY_REPLICA_REASON`]; for any other state (it may hold data) they
//!    start WO/REBUILDING, [`REBUILD_REPLICA_REASON`], until the volume's
//!    engine has rebuilt them.
//! 5. **Data locality**, only for a volume whose `data_locality` is
//!    BEST_EFFORT, that is attached (`attached_node` not empty), not
//!    CREATING, and only on a tick where 3 and 4 write nothing for it:
//!    - With no non-deleted replica on the attached node, while the volume is
//!      healthy (at least `replica_count` non-deleted replicas, every one RW
//!      on an UP node: load is never added to a degraded volume), and the
//!      attached node is eligible by the rules of 4
//!      ([`crate::schedule::place_on`]), ONE extra replica is created there,
//!      named and started as in 4 (WO/REBUILDING, [`REBUILD_REPLICA_REASON`]):
//!      the agent running the engine adds and rebuilds it. Scheduling leaves
//!      the surplus alone (it only adds below `replica_count`).
//!    - Once the replica on the attached node is RW on an UP node and the
//!      volume has more RW replicas on UP nodes than `replica_count`, ONE of
//!      the others is marked `deleted`, health STALE, reason
//!      "removed for data locality: R on N holds the data" (R, N: the local
//!      replica and the attached node). The one whose node has the least free
//!      bytes (summed over its disks) goes, ties by replica name; never the
//!      last RW replica of a zone unless the remaining ones still span at
//!      least `replica_count` zones (nodes without a zone form one zone, as in
//!      placement). When every candidate is protected that way, the surplus
//!      replica stays.
//!
//!    A local replica that does not become RW (rebuild failed, ERR) blocks
//!    both steps: nothing is removed, and nothing more is added.
//! 6. **Volume state** (every volume but a DELETING one), computed on the
//!    records as the batch leaves them: `rw` = non-deleted replicas in mode
//!    RW on an UP node. HEALTHY when `rw >= replica_count` (empty reason),
//!    DEGRADED when `1 <= rw < replica_count` ("2 of 3 replicas RW: ..."),
//!    FAULTED when `rw == 0` ("no RW replica: ..."); the reason lists every
//!    other replica ("R on N ERR (why)", "R on N rebuilding") and what could
//!    not be placed or replaced. A CREATING volume with no RW replica yet
//!    (nothing could be placed) stays CREATING with the shortfall as its
//!    reason: marking it FAULTED would make the replicas placed later start
//!    WO with nothing to rebuild them from. The volume is written only when
//!    its state or reason changes (or replicas are written with it); the
//!    reason holds no clock readings, so a steady state writes nothing.
//!
//! Timeline of a node that goes silent: DOWN and its replicas ERR after the
//! node-down timeout (volumes DEGRADED or FAULTED); back before the replenish
//! wait ends, it keeps its replicas and the engine resyncs them; otherwise
//! they are replaced (deleted/STALE) and the new ones rebuilt; back later,
//! its agent sees its old replicas deleted and removes their data.
//!
//! Assumes: the member's clock is roughly in step with the clock of the
//! leaders that stamped the heartbeats (after a leader change, heartbeats are
//! compared with another member's clock).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_proto::v1::record::Record as R;
use cairn_proto::v1::{
    DataLocality, Kind, Node, NodeState, Record, Replica, ReplicaHealth, ReplicaMode, Volume,
    VolumeState,
};
use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use tokio::sync::watch;

use crate::schedule::{self, DiskInfo, ExistingReplica, NodeInfo, Placement, VolumeSpec};
use crate::{Command, Raft, StateMachineStore};

/// Default of [`Settings::tick`].
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);

/// Default of [`Settings::replica_replenish_wait`].
pub const DEFAULT_REPLICA_REPLENISH_WAIT: Duration = Duration::from_secs(600);

/// Health reason of a replica placed for a CREATING volume (RW, HEALTHY).
pub const EMPTY_REPLICA_REASON: &str = "empty; created when the volume is first attached";

/// Health reason of a replica placed for a volume that may hold data (WO,
/// REBUILDING).
pub const REBUILD_REPLICA_REASON: &str = "waiting for a rebuild by the volume's engine";

/// How the controllers run; read again on every tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Time between two ticks.
    pub tick: Duration,
    /// How long a node may stay silent before it is DOWN.
    pub node_down_timeout: Duration,
    /// How long a DOWN node's replicas are waited for (after the node-down
    /// timeout) before they are replaced elsewhere.
    pub replica_replenish_wait: Duration,
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
        if let Err(e) = tick(&raft, &sm, &s).await {
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

async fn tick(raft: &Raft, sm: &StateMachineStore, s: &Settings) -> Result<(), String> {
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
    let now_ms = now_unix_ms();
    let health = node_health(now_ms, s.node_down_timeout, &nodes, &replicas);
    let changed_nodes = !health.is_empty();
    for cmd in health {
        write(raft, cmd).await?;
    }
    if changed_nodes {
        // Look at the volumes with the new node states, read on the next tick.
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
        if let Some(cmd) = reconcile_volume(now_ms, s, v, &nodes, &replicas) {
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
    // RW replicas per volume still left RW by the records and the fails decided so far.
    let mut rw_left: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for r in replicas
        .iter()
        .filter(|r| !r.deleted && r.mode == i32::from(ReplicaMode::Rw))
    {
        *rw_left.entry(r.volume.as_str()).or_default() += 1;
    }
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
            if r.mode == i32::from(ReplicaMode::Rw) {
                let left = rw_left.entry(r.volume.as_str()).or_default();
                if *left <= 1 {
                    // The volume's last RW replica holds every acknowledged write: it stays
                    // RW so that an engine can start from it when its node is back (a
                    // whole-cluster restart must not leave a volume with no RW replica).
                    continue;
                }
                *left -= 1;
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn node_up(nodes: &[Node], name: &str) -> bool {
    nodes
        .iter()
        .any(|n| n.name == name && n.state == i32::from(NodeState::Up))
}

/// Counts toward the volume's health: not deleted, mode RW, node UP.
fn is_rw_up(r: &Replica, nodes: &[Node]) -> bool {
    !r.deleted && r.mode == i32::from(ReplicaMode::Rw) && node_up(nodes, &r.node)
}

/// The replica's records as the scheduler sees them: every record excludes
/// its node; the non-deleted ones count as the volume's replicas.
fn existing(reps: &[Replica]) -> Vec<ExistingReplica> {
    reps.iter()
        .map(|r| ExistingReplica {
            node: r.node.clone(),
            disk: r.disk.clone(),
            healthy: !r.deleted,
        })
        .collect()
}

/// The write of the deletion controller for a DELETING volume `v`: every
/// replica record of it marked deleted and the volume record deleted, in one
/// batch; `None` while the volume is attached (or not DELETING).
#[must_use]
pub fn delete_volume(v: &Volume, replicas: &[Replica]) -> Option<Command> {
    if v.state != i32::from(VolumeState::Deleting) || !v.attached_node.is_empty() {
        return None;
    }
    let mut batch = Vec::new();
    for r in replicas.iter().filter(|r| r.volume == v.name && !r.deleted) {
        let mut gone = r.clone();
        gone.deleted = true;
        gone.health_reason = format!("volume {} deleted", v.name);
        batch.push(put(Kind::Replica, &r.name, R::Replica(gone), r.version));
    }
    batch.push(Command::Delete {
        kind: Kind::Volume.cli_name().to_owned(),
        name: v.name.clone(),
        expected_version: Some(v.version),
    });
    Some(Command::Batch(batch))
}

/// Replica records being written for one volume in one batch.
struct VolumePlan<'a> {
    v: &'a Volume,
    /// The volume's replica records as the batch leaves them.
    reps: Vec<Replica>,
    /// Every replica name in use (any volume), for new names.
    taken: BTreeSet<String>,
    /// Puts of replica records, in order.
    writes: Vec<Command>,
    /// What could not be placed or replaced, for the volume's reason.
    notes: Vec<String>,
}

impl VolumePlan<'_> {
    /// Adds a new replica at `p`, returning its name.
    fn create(&mut self, p: &Placement) -> String {
        let mut n = 0u64;
        let name = loop {
            let candidate = format!("{}-r{n}", self.v.name);
            n += 1;
            if !self.taken.contains(&candidate) {
                break candidate;
            }
        };
        self.taken.insert(name.clone());
        let empty = self.v.state == i32::from(VolumeState::Creating);
        let (mode, health, reason) = if empty {
            (
                ReplicaMode::Rw,
                ReplicaHealth::Healthy,
                EMPTY_REPLICA_REASON,
            )
        } else {
            (
                ReplicaMode::Wo,
                ReplicaHealth::Rebuilding,
                REBUILD_REPLICA_REASON,
            )
        };
        let replica = Replica {
            name: name.clone(),
            version: 0,
            volume: self.v.name.clone(),
            node: p.node.clone(),
            disk: p.disk.clone(),
            mode: mode.into(),
            health: health.into(),
            health_reason: reason.to_owned(),
            deleted: false,
        };
        self.writes
            .push(put(Kind::Replica, &name, R::Replica(replica.clone()), 0));
        self.reps.push(replica);
        name
    }
}

/// The write for volume `v` at `now_ms`, if any: its deletion (see
/// [`delete_volume`]), or one batch with the replacements of its replicas on
/// long-down nodes, its new replicas, or else its data-locality step, and its
/// new state (see the module doc).
#[must_use]
pub fn reconcile_volume(
    now_ms: u64,
    s: &Settings,
    v: &Volume,
    nodes: &[Node],
    replicas: &[Replica],
) -> Option<Command> {
    if v.state == i32::from(VolumeState::Deleting) {
        return delete_volume(v, replicas);
    }
    let infos: Vec<NodeInfo> = nodes.iter().map(node_info).collect();
    let spec = VolumeSpec {
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        replica_count: v.replica_count,
        locality: (best_effort(v) && !v.attached_node.is_empty()).then(|| v.attached_node.clone()),
    };
    let mut plan = VolumePlan {
        v,
        reps: replicas
            .iter()
            .filter(|r| r.volume == v.name)
            .cloned()
            .collect(),
        taken: replicas.iter().map(|r| r.name.clone()).collect(),
        writes: Vec::new(),
        notes: Vec::new(),
    };
    replace_down(now_ms, s, &mut plan, nodes, &spec, &infos);
    let have = plan.reps.iter().filter(|r| !r.deleted).count();
    if u32::try_from(have).unwrap_or(u32::MAX) < v.replica_count {
        let result = schedule::place(&spec, &infos, &existing(&plan.reps));
        for p in &result.placements {
            plan.create(p);
        }
        plan.notes.extend(result.reason);
    }
    if plan.writes.is_empty() {
        data_locality(&mut plan, nodes, &spec, &infos);
    }
    let (state, reason) = volume_state(v, &plan.reps, nodes, &plan.notes);
    if plan.writes.is_empty() && i32::from(state) == v.state && reason == v.state_reason {
        return None;
    }
    let mut next = v.clone();
    next.state = state.into();
    next.state_reason = reason;
    let mut batch = plan.writes;
    batch.push(put(Kind::Volume, &v.name, R::Volume(next), v.version));
    Some(Command::Batch(batch))
}

fn best_effort(v: &Volume) -> bool {
    v.data_locality == i32::from(DataLocality::BestEffort)
}

/// Free bytes of node `name`, summed over its disks (0 when unknown).
fn node_free(nodes: &[Node], name: &str) -> u64 {
    nodes.iter().find(|n| n.name == name).map_or(0, |n| {
        n.disks
            .iter()
            .fold(0, |sum: u64, d| sum.saturating_add(d.free_bytes))
    })
}

/// Zone of node `name`; `None` for no label (or an unknown node).
fn node_zone<'a>(nodes: &'a [Node], name: &str) -> Option<&'a str> {
    nodes
        .iter()
        .find(|n| n.name == name)
        .and_then(|n| (!n.zone.is_empty()).then_some(n.zone.as_str()))
}

/// The data-locality controller's part of `plan` (module doc, 5); acts only
/// on a plan that writes nothing yet.
fn data_locality(plan: &mut VolumePlan<'_>, nodes: &[Node], spec: &VolumeSpec, infos: &[NodeInfo]) {
    let v = plan.v;
    let here = v.attached_node.as_str();
    let count = usize::try_from(v.replica_count).unwrap_or(usize::MAX);
    if !best_effort(v)
        || here.is_empty()
        || count == 0
        || v.state == i32::from(VolumeState::Creating)
        || !plan.writes.is_empty()
    {
        return;
    }
    let live: Vec<&Replica> = plan.reps.iter().filter(|r| !r.deleted).collect();
    let Some(local) = live.iter().find(|r| r.node == here) else {
        let healthy = live.len() >= count && live.iter().all(|r| is_rw_up(r, nodes));
        if healthy {
            if let Some(p) = schedule::place_on(spec, infos, &existing(&plan.reps), here) {
                plan.create(&p);
            }
        }
        return;
    };
    if !is_rw_up(local, nodes) {
        return;
    }
    let local = local.name.clone();
    let rw: Vec<&Replica> = live
        .iter()
        .copied()
        .filter(|r| is_rw_up(r, nodes))
        .collect();
    if rw.len() <= count {
        return;
    }
    let mut per_zone: BTreeMap<Option<&str>, usize> = BTreeMap::new();
    for r in &rw {
        *per_zone.entry(node_zone(nodes, &r.node)).or_default() += 1;
    }
    let victim = rw
        .iter()
        .filter(|r| r.node != here)
        .filter(|r| {
            let shared = per_zone
                .get(&node_zone(nodes, &r.node))
                .is_some_and(|&n| n > 1);
            shared || per_zone.len() > count
        })
        .min_by(|a, b| {
            node_free(nodes, &a.node)
                .cmp(&node_free(nodes, &b.node))
                .then(a.name.cmp(&b.name))
        })
        .map(|r| r.name.clone());
    let Some(victim) = victim else { return };
    let Some(old) = plan.reps.iter_mut().find(|r| r.name == victim) else {
        return;
    };
    old.deleted = true;
    old.health = ReplicaHealth::Stale.into();
    old.health_reason = format!("removed for data locality: {local} on {here} holds the data");
    let write = put(
        Kind::Replica,
        &old.name,
        R::Replica(old.clone()),
        old.version,
    );
    plan.writes.push(write);
}

/// How long, after the node-down timeout, a replica of `v` on a DOWN node is waited for:
/// the volume's own `stale_replica_timeout_seconds` when set, else the cluster's
/// [`Settings::replica_replenish_wait`].
fn replenish_wait_ms(s: &Settings, v: &Volume) -> u64 {
    match v.stale_replica_timeout_seconds {
        0 => millis(s.replica_replenish_wait),
        secs => secs.saturating_mul(1000),
    }
}

/// The replacement controller's part of `plan`.
fn replace_down(
    now_ms: u64,
    s: &Settings,
    plan: &mut VolumePlan<'_>,
    nodes: &[Node],
    spec: &VolumeSpec,
    infos: &[NodeInfo],
) {
    let wait_ms = millis(s.node_down_timeout).saturating_add(replenish_wait_ms(s, plan.v));
    let due: Vec<(usize, String)> = plan
        .reps
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.deleted)
        .filter_map(|(i, r)| {
            let n = nodes.iter().find(|n| n.name == r.node)?;
            let silent_ms = now_ms.saturating_sub(n.heartbeat_unix_ms);
            let long_down = n.state == i32::from(NodeState::Down)
                && (n.heartbeat_unix_ms == 0 || silent_ms > wait_ms);
            let why = if n.heartbeat_unix_ms == 0 {
                format!("node {} never heartbeated", n.name)
            } else {
                format!("node {} down for {}s", n.name, silent_ms / 1000)
            };
            long_down.then_some((i, why))
        })
        .collect();
    if due.is_empty() {
        return;
    }
    if !plan.reps.iter().any(|r| is_rw_up(r, nodes)) {
        for (i, _) in &due {
            let r = &plan.reps[*i];
            plan.notes.push(format!(
                "replica {} on down node {} is not replaced: no other RW replica on an up node",
                r.name, r.node
            ));
        }
        return;
    }
    let failed: Vec<usize> = due.iter().map(|(i, _)| *i).collect();
    let result = schedule::replace(spec, infos, &existing(&plan.reps), &failed);
    for (k, (i, why)) in due.iter().enumerate() {
        let Some(p) = result.placements.get(k) else {
            let r = &plan.reps[*i];
            let note = format!(
                "replica {} on down node {} cannot be replaced: {}",
                r.name,
                r.node,
                result.reason.as_deref().unwrap_or("no eligible node")
            );
            plan.notes.push(note);
            continue;
        };
        let new = plan.create(p);
        let old = &mut plan.reps[*i];
        old.deleted = true;
        old.health = ReplicaHealth::Stale.into();
        old.health_reason = format!("replaced by {new}: {why}");
        let write = put(
            Kind::Replica,
            &old.name,
            R::Replica(old.clone()),
            old.version,
        );
        plan.writes.push(write);
    }
}

/// A volume's state and reason given its replica records `reps` (see the
/// module doc, 6); `notes` say what could not be placed or replaced.
fn volume_state(
    v: &Volume,
    reps: &[Replica],
    nodes: &[Node],
    notes: &[String],
) -> (VolumeState, String) {
    let rw = reps.iter().filter(|r| is_rw_up(r, nodes)).count();
    let mut parts: Vec<String> = reps
        .iter()
        .filter(|r| !r.deleted && !is_rw_up(r, nodes))
        .map(|r| {
            let mode = ReplicaMode::try_from(r.mode).unwrap_or(ReplicaMode::Unspecified);
            let what = match mode {
                ReplicaMode::Rw => "RW but its node is down".to_owned(),
                ReplicaMode::Wo => "rebuilding".to_owned(),
                ReplicaMode::Err if r.health_reason.is_empty() => "ERR".to_owned(),
                ReplicaMode::Err => format!("ERR ({})", r.health_reason),
                ReplicaMode::Unspecified => "not reported yet".to_owned(),
            };
            format!("{} on {} {what}", r.name, r.node)
        })
        .collect();
    parts.extend(notes.iter().cloned());
    let detail = parts.join("; ");
    let count = usize::try_from(v.replica_count).unwrap_or(usize::MAX);
    if v.state == i32::from(VolumeState::Creating) && rw == 0 {
        let reason = if detail.is_empty() {
            v.state_reason.clone()
        } else {
            detail
        };
        (VolumeState::Creating, reason)
    } else if rw >= count {
        (VolumeState::Healthy, String::new())
    } else if rw >= 1 {
        (
            VolumeState::Degraded,
            format!("{rw} of {count} replicas RW: {detail}"),
        )
    } else {
        (VolumeState::Faulted, format!("no RW replica: {detail}"))
    }
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

    #[test]
    fn whole_cluster_down_keeps_one_rw_replica_per_volume() {
        let nodes = [
            node("a", 10_000, NodeState::Up),
            node("b", 10_000, NodeState::Up),
            node("c", 10_000, NodeState::Up),
        ];
        let reps = [
            replica("r0", "a", ReplicaMode::Rw, ReplicaHealth::Healthy),
            replica("r1", "b", ReplicaMode::Rw, ReplicaHealth::Healthy),
            replica("r2", "c", ReplicaMode::Rw, ReplicaHealth::Healthy),
        ];
        let out = node_health(60_000, Duration::from_secs(1), &nodes, &reps);
        let failed: Vec<String> = out
            .iter()
            .flat_map(puts)
            .filter(|p| p.0 == "replica")
            .map(|p| p.1)
            .collect();
        assert_eq!(failed, ["r0", "r1"], "r2, the last RW one, stays RW");
        // With r0 and r1 written ERR, r2 is still left alone on later ticks.
        let later = [
            replica("r0", "a", ReplicaMode::Err, ReplicaHealth::Failed),
            replica("r1", "b", ReplicaMode::Err, ReplicaHealth::Failed),
            reps[2].clone(),
        ];
        let out = node_health(70_000, Duration::from_secs(1), &nodes, &later);
        assert!(out.iter().flat_map(puts).all(|p| p.0 != "replica"));
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

    const S: Settings = Settings {
        tick: Duration::from_secs(1),
        node_down_timeout: Duration::from_secs(10),
        replica_replenish_wait: Duration::from_secs(60),
    };

    fn the_volume(p: &[(String, String, Option<u64>, Record)]) -> Volume {
        let last = p.last().unwrap();
        assert_eq!((last.0.as_str(), last.2), ("volume", Some(5)));
        let Some(R::Volume(v)) = &last.3.record else {
            panic!()
        };
        v.clone()
    }

    fn replica_puts(p: &[(String, String, Option<u64>, Record)]) -> Vec<(Option<u64>, Replica)> {
        p.iter()
            .filter_map(|(_, _, v, rec)| match &rec.record {
                Some(R::Replica(r)) => Some((*v, r.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn schedules_on_free_nodes_only_with_next_free_names() {
        let nodes = [
            node("a", 1, NodeState::Up),
            node("b", 1, NodeState::Up),
            node("c", 1, NodeState::Down),
            node("d", 1, NodeState::Up),
        ];
        let reps = [
            replica("vol-r0", "a", ReplicaMode::Rw, ReplicaHealth::Healthy),
            Replica {
                deleted: true,
                ..replica("vol-r1", "d", ReplicaMode::Err, ReplicaHealth::Stale)
            },
        ];
        let v = volume(VolumeState::Degraded, 3);
        let cmd = reconcile_volume(2, &S, &v, &nodes, &reps).unwrap();
        let p = puts(&cmd);
        let placed: Vec<(&str, &str, Option<u64>)> = p[..p.len() - 1]
            .iter()
            .map(|(_, name, v, rec)| {
                let Some(R::Replica(r)) = &rec.record else {
                    panic!()
                };
                assert_eq!(r.mode, i32::from(ReplicaMode::Wo));
                assert_eq!(r.health, i32::from(ReplicaHealth::Rebuilding));
                assert_eq!(r.health_reason, REBUILD_REPLICA_REASON);
                (name.as_str(), r.node.as_str(), *v)
            })
            .collect();
        // d holds a deleted record of the volume: excluded; c is down.
        assert_eq!(placed, [("vol-r2", "b", Some(0))]);
        let v = the_volume(&p);
        assert_eq!(v.state, i32::from(VolumeState::Degraded));
        assert!(
            v.state_reason.starts_with(
                "1 of 3 replicas RW: vol-r2 on b rebuilding; 2 of 3 replicas placed for volume vol"
            ),
            "{}",
            v.state_reason
        );
    }

    #[test]
    fn creating_volume_gets_empty_rw_replicas_and_is_healthy() {
        let nodes = [node("a", 1, NodeState::Up), node("b", 1, NodeState::Up)];
        let cmd = reconcile_volume(2, &S, &volume(VolumeState::Creating, 2), &nodes, &[]).unwrap();
        let p = puts(&cmd);
        let reps = replica_puts(&p);
        assert_eq!(reps.len(), 2);
        for (i, (v, r)) in reps.iter().enumerate() {
            assert_eq!(*v, Some(0));
            assert_eq!(r.name, format!("vol-r{i}"));
            assert_eq!(r.mode, i32::from(ReplicaMode::Rw));
            assert_eq!(r.health, i32::from(ReplicaHealth::Healthy));
            assert_eq!(r.health_reason, EMPTY_REPLICA_REASON);
        }
        let v = the_volume(&p);
        assert_eq!(v.state, i32::from(VolumeState::Healthy));
        assert_eq!(v.state_reason, "");
    }

    #[test]
    fn creating_volume_without_nodes_stays_creating_until_placed() {
        let v = volume(VolumeState::Creating, 2);
        let cmd = reconcile_volume(2, &S, &v, &[], &[]).unwrap();
        let p = puts(&cmd);
        assert_eq!(p.len(), 1);
        let next = the_volume(&p);
        assert_eq!(next.state, i32::from(VolumeState::Creating));
        assert!(
            next.state_reason.starts_with("0 of 2 replicas placed"),
            "{}",
            next.state_reason
        );
        // Unchanged: not rewritten.
        assert!(reconcile_volume(3, &S, &next, &[], &[]).is_none());
    }

    #[test]
    fn state_follows_rw_replicas_on_up_nodes() {
        let nodes = [
            node("a", 1, NodeState::Up),
            node("b", 1, NodeState::Up),
            node("c", 1, NodeState::Down),
        ];
        let rw = |n: &str, node: &str| replica(n, node, ReplicaMode::Rw, ReplicaHealth::Healthy);
        let mut failed = replica("vol-r1", "b", ReplicaMode::Err, ReplicaHealth::Failed);
        failed.health_reason = "io error".into();
        let healthy = volume(VolumeState::Healthy, 3);
        let all = [rw("vol-r0", "a"), rw("vol-r1", "b"), rw("vol-r2", "a")];
        assert!(reconcile_volume(2, &S, &healthy, &nodes, &all).is_none());

        let reps = [rw("vol-r0", "a"), failed.clone(), rw("vol-r2", "c")];
        let v = the_volume(&puts(
            &reconcile_volume(2, &S, &healthy, &nodes, &reps).unwrap(),
        ));
        assert_eq!(v.state, i32::from(VolumeState::Degraded));
        assert_eq!(
            v.state_reason,
            "1 of 3 replicas RW: vol-r1 on b ERR (io error); vol-r2 on c RW but its node is down"
        );

        let reps = [failed];
        let v = the_volume(&puts(
            &reconcile_volume(2, &S, &volume(VolumeState::Degraded, 1), &nodes, &reps).unwrap(),
        ));
        assert_eq!(v.state, i32::from(VolumeState::Faulted));
        assert_eq!(v.state_reason, "no RW replica: vol-r1 on b ERR (io error)");
    }

    #[test]
    fn volume_stale_replica_timeout_overrides_the_replenish_wait() {
        let now = 100_000;
        // Silent for 40 s: DOWN after 10 s, so 30 s into the wait.
        let down = node("c", now - 40_000, NodeState::Down);
        let nodes = [
            node("a", now, NodeState::Up),
            node("b", now, NodeState::Up),
            down,
        ];
        let err = replica("vol-r1", "c", ReplicaMode::Err, ReplicaHealth::Failed);
        let rw = replica("vol-r0", "a", ReplicaMode::Rw, ReplicaHealth::Healthy);
        let reps = [rw, err];
        let replaced = |v: &Volume, at: u64| {
            reconcile_volume(at, &S, v, &nodes, &reps).is_some_and(|c| {
                replica_puts(&puts(&c))
                    .iter()
                    .any(|(_, r)| r.name == "vol-r1" && r.deleted)
            })
        };
        // The cluster default (60 s) has not passed: kept.
        let default = volume(VolumeState::Degraded, 2);
        assert_eq!(default.stale_replica_timeout_seconds, 0);
        assert!(!replaced(&default, now));
        assert!(replaced(&default, now + 31_000), "10 s + 60 s passed");
        // 20 s of its own: replaced now (10 s + 20 s < 40 s), not at 29 s of silence.
        let short = Volume {
            stale_replica_timeout_seconds: 20,
            ..default.clone()
        };
        assert!(replaced(&short, now));
        assert!(
            !replaced(&short, now - 11_000),
            "silent 29 s, 30 s not passed"
        );
        // 3600 s of its own: kept long after the cluster default.
        let long = Volume {
            stale_replica_timeout_seconds: 3600,
            ..default
        };
        assert!(!replaced(&long, now + 31_000));
        assert!(
            !replaced(&long, now + 3_569_000),
            "exactly 10 s + 3600 s: not yet"
        );
        assert!(replaced(&long, now + 3_571_000));
    }

    #[test]
    fn long_down_replica_is_replaced_only_after_the_wait_and_with_another_rw() {
        let now = 100_000;
        let mut down = node("c", now - 71_000, NodeState::Down);
        down.state_reason = "no heartbeat for 10s".into();
        let nodes = [
            node("a", now, NodeState::Up),
            node("b", now, NodeState::Up),
            down,
            node("d", now, NodeState::Up),
        ];
        let mut err = replica("vol-r1", "c", ReplicaMode::Err, ReplicaHealth::Failed);
        err.health_reason = "no heartbeat for 10s".into();
        let rw = replica("vol-r0", "a", ReplicaMode::Rw, ReplicaHealth::Healthy);
        let v = volume(VolumeState::Degraded, 2);

        // Not yet: 10 s + 60 s not passed (or exactly).
        let early = reconcile_volume(now - 1_000, &S, &v, &nodes, &[rw.clone(), err.clone()]);
        let deg = the_volume(&puts(&early.unwrap()));
        assert_eq!(
            deg.state_reason,
            "1 of 2 replicas RW: vol-r1 on c ERR (no heartbeat for 10s)"
        );

        let cmd = reconcile_volume(now, &S, &v, &nodes, &[rw.clone(), err.clone()]).unwrap();
        let p = puts(&cmd);
        let reps = replica_puts(&p);
        assert_eq!(reps.len(), 2, "{reps:?}");
        let (new_v, new) = &reps[0];
        assert_eq!(*new_v, Some(0));
        assert_eq!(
            (new.name.as_str(), new.node.as_str(), new.deleted),
            ("vol-r2", "b", false)
        );
        assert_eq!(new.mode, i32::from(ReplicaMode::Wo));
        assert_eq!(new.health, i32::from(ReplicaHealth::Rebuilding));
        let (old_v, old) = &reps[1];
        assert_eq!(*old_v, Some(2));
        assert_eq!(
            *old,
            Replica {
                deleted: true,
                health: ReplicaHealth::Stale.into(),
                health_reason: "replaced by vol-r2: node c down for 71s".into(),
                version: 0,
                ..err.clone()
            }
        );
        let next = the_volume(&p);
        assert_eq!(
            next.state_reason,
            "1 of 2 replicas RW: vol-r2 on b rebuilding"
        );

        // No other RW copy: kept, and the volume says why.
        let lone = volume(VolumeState::Faulted, 1);
        let p = puts(&reconcile_volume(now, &S, &lone, &nodes, &[err.clone()]).unwrap());
        assert_eq!(p.len(), 1);
        assert_eq!(
            the_volume(&p).state_reason,
            "no RW replica: vol-r1 on c ERR (no heartbeat for 10s); replica vol-r1 on down \
             node c is not replaced: no other RW replica on an up node"
        );

        // Nowhere to go: kept, and the volume says why.
        let few = [nodes[0].clone(), nodes[2].clone()];
        let p = puts(&reconcile_volume(now, &S, &v, &few, &[rw, err]).unwrap());
        assert_eq!(p.len(), 1);
        assert!(
            the_volume(&p).state_reason.starts_with(
                "1 of 2 replicas RW: vol-r1 on c ERR (no heartbeat for 10s); replica vol-r1 on \
                 down node c cannot be replaced: 0 of 1 failed replicas replaced"
            ),
            "{}",
            the_volume(&p).state_reason
        );
    }

    fn local_volume(locality: DataLocality, attached: &str) -> Volume {
        Volume {
            data_locality: locality.into(),
            attached_node: attached.into(),
            ..volume(VolumeState::Healthy, 2)
        }
    }

    fn with_free(mut n: Node, free: u64) -> Node {
        n.disks[0].free_bytes = free;
        n.disks[0].capacity_bytes = free;
        n
    }

    #[test]
    fn best_effort_adds_a_local_replica_only_when_healthy_and_eligible() {
        let nodes = [
            node("a", 1, NodeState::Up),
            node("b", 1, NodeState::Up),
            node("c", 1, NodeState::Up),
        ];
        let rw = |n: &str, node: &str| replica(n, node, ReplicaMode::Rw, ReplicaHealth::Healthy);
        let reps = [rw("vol-r0", "a"), rw("vol-r1", "b")];
        let v = local_volume(DataLocality::BestEffort, "c");
        let p = puts(&reconcile_volume(2, &S, &v, &nodes, &reps).unwrap());
        let added = replica_puts(&p);
        assert_eq!(added.len(), 1, "{added:?}");
        assert_eq!(
            added[0],
            (
                Some(0),
                Replica {
                    name: "vol-r2".into(),
                    version: 0,
                    volume: "vol".into(),
                    node: "c".into(),
                    disk: "/d0".into(),
                    mode: ReplicaMode::Wo.into(),
                    health: ReplicaHealth::Rebuilding.into(),
                    health_reason: REBUILD_REPLICA_REASON.into(),
                    deleted: false,
                }
            )
        );
        let next = the_volume(&p);
        assert_eq!(next.state, i32::from(VolumeState::Healthy));
        assert_eq!(next.state_reason, "");

        // Steady once added: a WO local replica is waited for.
        let mut grown = reps.to_vec();
        grown.push(added[0].1.clone());
        assert!(reconcile_volume(3, &S, &v, &nodes, &grown).is_none());

        // Not while degraded (a replica not RW, or too few), not on an ineligible node.
        let degraded = [
            rw("vol-r0", "a"),
            replica("vol-r1", "b", ReplicaMode::Wo, ReplicaHealth::Rebuilding),
        ];
        let d = Volume {
            state: VolumeState::Degraded.into(),
            state_reason: "1 of 2 replicas RW: vol-r1 on b rebuilding".into(),
            ..v.clone()
        };
        assert!(reconcile_volume(2, &S, &d, &nodes, &degraded).is_none());
        let b_down = [
            nodes[0].clone(),
            node("b", 1, NodeState::Down),
            nodes[2].clone(),
        ];
        let cmd = reconcile_volume(2, &S, &v, &b_down, &reps).unwrap();
        assert!(
            replica_puts(&puts(&cmd)).is_empty(),
            "vol-r1's node is down"
        );
        let full = [
            nodes[0].clone(),
            nodes[1].clone(),
            with_free(node("c", 1, NodeState::Up), 0),
        ];
        assert!(reconcile_volume(2, &S, &v, &full, &reps).is_none());
        let down = [
            nodes[0].clone(),
            nodes[1].clone(),
            node("c", 1, NodeState::Down),
        ];
        assert!(reconcile_volume(2, &S, &v, &down, &reps).is_none());
        let held = [
            rw("vol-r0", "a"),
            rw("vol-r1", "b"),
            Replica {
                deleted: true,
                ..replica("vol-r2", "c", ReplicaMode::Err, ReplicaHealth::Stale)
            },
        ];
        assert!(reconcile_volume(2, &S, &v, &nodes, &held).is_none());

        // Disabled, unspecified, detached: untouched.
        for off in [
            local_volume(DataLocality::Disabled, "c"),
            local_volume(DataLocality::Unspecified, "c"),
            local_volume(DataLocality::BestEffort, ""),
        ] {
            assert!(reconcile_volume(2, &S, &off, &nodes, &reps).is_none());
        }
    }

    #[test]
    fn best_effort_removes_one_surplus_once_the_local_replica_is_rw() {
        let nodes = [
            with_free(node("a", 1, NodeState::Up), 50),
            with_free(node("b", 1, NodeState::Up), 20),
            with_free(node("c", 1, NodeState::Up), 20),
            node("d", 1, NodeState::Up),
        ];
        let rw = |n: &str, node: &str| replica(n, node, ReplicaMode::Rw, ReplicaHealth::Healthy);
        let v = local_volume(DataLocality::BestEffort, "d");
        let reps = [
            rw("vol-r0", "a"),
            rw("vol-r1", "c"),
            rw("vol-r2", "b"),
            rw("vol-r3", "d"),
        ];
        // b and c have the least free bytes: the tie goes to the smaller name, vol-r1.
        let v3 = Volume {
            replica_count: 3,
            ..v.clone()
        };
        let p = puts(&reconcile_volume(2, &S, &v3, &nodes, &reps).unwrap());
        let removed = replica_puts(&p);
        assert_eq!(
            removed,
            [(
                Some(2),
                Replica {
                    deleted: true,
                    health: ReplicaHealth::Stale.into(),
                    health_reason: "removed for data locality: vol-r3 on d holds the data".into(),
                    version: 0,
                    ..reps[1].clone()
                }
            )]
        );
        let next = the_volume(&p);
        assert_eq!(next.state, i32::from(VolumeState::Healthy));
        assert_eq!(next.state_reason, "");
        // One per tick: with vol-r1 deleted, 3 RW for 3 wanted: nothing more.
        let after = [
            rw("vol-r0", "a"),
            removed[0].1.clone(),
            rw("vol-r2", "b"),
            rw("vol-r3", "d"),
        ];
        assert!(reconcile_volume(3, &S, &v3, &nodes, &after).is_none());

        // Only while the local replica is RW.
        let wo = [
            rw("vol-r0", "a"),
            rw("vol-r1", "c"),
            replica("vol-r3", "d", ReplicaMode::Wo, ReplicaHealth::Rebuilding),
        ];
        assert!(reconcile_volume(2, &S, &v, &nodes, &wo).is_none());

        // Disabled: the surplus stays.
        let off = local_volume(DataLocality::Disabled, "d");
        assert!(reconcile_volume(2, &S, &off, &nodes, &reps[1..]).is_none());
    }

    #[test]
    fn best_effort_keeps_the_last_replica_of_a_zone() {
        let zoned = |name: &str, zone: &str, free: u64| Node {
            zone: zone.into(),
            ..with_free(node(name, 1, NodeState::Up), free)
        };
        // b has the least free bytes but is z2's only replica; a shares z1 with d.
        let nodes = [
            zoned("a", "z1", 50),
            zoned("b", "z2", 10),
            zoned("d", "z1", 50),
        ];
        let rw = |n: &str, node: &str| replica(n, node, ReplicaMode::Rw, ReplicaHealth::Healthy);
        let reps = [rw("vol-r0", "a"), rw("vol-r1", "b"), rw("vol-r2", "d")];
        let v = local_volume(DataLocality::BestEffort, "d");
        let p = puts(&reconcile_volume(2, &S, &v, &nodes, &reps).unwrap());
        let removed: Vec<String> = replica_puts(&p).into_iter().map(|(_, r)| r.name).collect();
        assert_eq!(removed, ["vol-r0"]);

        // Three zones for two replicas: b (least free) may go, two zones remain.
        let nodes = [
            zoned("a", "z1", 50),
            zoned("b", "z2", 10),
            zoned("d", "z3", 50),
        ];
        let p = puts(&reconcile_volume(2, &S, &v, &nodes, &reps).unwrap());
        let removed: Vec<String> = replica_puts(&p).into_iter().map(|(_, r)| r.name).collect();
        assert_eq!(removed, ["vol-r1"]);
    }

    #[test]
    fn deleting_volume_marks_replicas_deleted_once_detached() {
        let mut v = volume(VolumeState::Deleting, 2);
        v.attached_node = "a".into();
        let reps = [
            replica("vol-r0", "a", ReplicaMode::Rw, ReplicaHealth::Healthy),
            Replica {
                deleted: true,
                ..replica("vol-r1", "b", ReplicaMode::Err, ReplicaHealth::Stale)
            },
        ];
        assert!(reconcile_volume(1, &S, &v, &[], &reps).is_none());
        v.attached_node.clear();
        let cmd = reconcile_volume(1, &S, &v, &[], &reps).unwrap();
        let Command::Batch(cmds) = &cmd else { panic!() };
        assert_eq!(cmds.len(), 2);
        assert_eq!(
            cmds[1],
            Command::Delete {
                kind: "volume".into(),
                name: "vol".into(),
                expected_version: Some(5),
            }
        );
        let p = puts(&Command::Batch(vec![cmds[0].clone()]));
        let Some(R::Replica(r)) = &p[0].3.record else {
            panic!()
        };
        assert_eq!(p[0].2, Some(2));
        assert_eq!(
            *r,
            Replica {
                deleted: true,
                health_reason: "volume vol deleted".into(),
                version: 0,
                ..reps[0].clone()
            }
        );
    }
}
