//! Replica placement: which nodes and disks a volume's replicas go to (no I/O).
//!
//! A pure function of its inputs, like the state machines of the engine: the
//! scheduling controller converts meta records (`Node`, `Volume`, `Replica`)
//! into the plain types of this module, calls [`place`] or [`replace`], and
//! writes the returned [`Placement`]s as new replica records. Nothing here
//! reads a clock, a file or the network, so the same input always gives the
//! same output.
//!
//! Rules, in the order they apply:
//!
//! 1. **Eligibility.** A node can receive a replica only if it is up, is
//!    schedulable, holds no replica of the volume yet (healthy or not: a node
//!    is never used twice for one volume, and a failed replica's node is not
//!    a replacement target), and has a disk with `free_bytes >= size_bytes`.
//!    Volumes are thin-provisioned, but the check uses the full volume size so
//!    that a replica can always grow to the size it promises.
//! 2. **Disk choice.** On a node, the replica goes to the disk with the most
//!    free bytes among those that fit (ties: smallest path).
//! 3. **Data locality (best effort).** When [`VolumeSpec::locality`] names an
//!    eligible node, that node gets the first new replica. [`place_on`] asks
//!    for one replica on a given node only (rules 1 and 2), for the
//!    controller that moves a healthy volume's data next to its engine.
//! 4. **Zone spread.** Each further replica goes to a zone holding the fewest
//!    replicas of the volume so far (counting the live replicas and the ones
//!    placed in this call), so distinct zones are used first and replicas are
//!    then spread as evenly as the eligible nodes allow. Nodes without a zone
//!    label form one zone together; when no node has a label, this rule
//!    changes nothing.
//! 5. **Capacity.** Among the candidates that remain tied, the one whose
//!    chosen disk has the most free bytes wins; remaining ties go to the
//!    smallest node name.
//!
//! Too few eligible nodes is never silent: the result carries a `shortfall`
//! (replicas still missing) and a human `reason` naming why the other nodes
//! were excluded. Assumes node names are unique; a repeated name is ignored
//! after its first occurrence.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

/// One data disk of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Absolute path of the disk's directory on the node.
    pub path: String,
    /// Total size of the disk.
    pub capacity_bytes: u64,
    /// Bytes still free on the disk.
    pub free_bytes: u64,
}

/// What the scheduler needs to know about a storage node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name (unique in the cluster).
    pub name: String,
    /// Zone label, `None` when the node has none.
    pub zone: Option<String>,
    /// The node state is UP (heartbeat within the lease).
    pub up: bool,
    /// The node accepts new replicas (not cordoned / drained).
    pub schedulable: bool,
    /// The node's data disks.
    pub disks: Vec<DiskInfo>,
}

/// The volume being scheduled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Volume name, used in messages.
    pub name: String,
    /// Volume size; a disk must have this much free to take a replica.
    pub size_bytes: u64,
    /// Number of healthy replicas wanted.
    pub replica_count: u32,
    /// Attaching node, for best-effort data locality.
    pub locality: Option<String>,
}

/// A replica of the volume that already exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingReplica {
    /// Node holding it.
    pub node: String,
    /// Disk path on that node.
    pub disk: String,
    /// Whether the replica is healthy (counts toward `replica_count`).
    pub healthy: bool,
}

/// Where to create one new replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Node name.
    pub node: String,
    /// Disk path on that node.
    pub disk: String,
}

/// Outcome of [`place`] or [`replace`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlaceResult {
    /// New replicas to create, in the order they were chosen.
    pub placements: Vec<Placement>,
    /// Replicas that could not be placed (0 when the request was met).
    pub shortfall: u32,
    /// Why replicas are missing; `Some` exactly when `shortfall > 0`.
    pub reason: Option<String>,
}

impl PlaceResult {
    /// True when every requested replica got a placement.
    pub fn is_complete(&self) -> bool {
        self.shortfall == 0
    }
}

/// Places new replicas so that `spec` reaches `replica_count` healthy ones.
///
/// Healthy existing replicas count toward the target; unhealthy ones do not,
/// but their nodes are still excluded (they are replaced elsewhere, see
/// [`replace`] for replacing specific ones).
pub fn place(spec: &VolumeSpec, nodes: &[NodeInfo], existing: &[ExistingReplica]) -> PlaceResult {
    let healthy = count_u32(existing.iter().filter(|r| r.healthy).count());
    let needed = spec.replica_count.saturating_sub(healthy);
    let live: Vec<&ExistingReplica> = existing.iter().filter(|r| r.healthy).collect();
    let plan = plan(spec, nodes, existing, &live, needed);
    let have = healthy.saturating_add(plan.placed());
    let summary = format!(
        "{have} of {} replicas placed for volume {}",
        spec.replica_count, spec.name
    );
    plan.into_result(needed, summary, spec.size_bytes)
}

/// Places replacements for the replicas at indices `failed` of `existing`.
///
/// One placement per distinct valid index (out-of-range indices are
/// ignored). The failed replicas' nodes are excluded like every node holding
/// a replica; the zones of the healthy replicas not being replaced count for
/// the zone spread (an unhealthy one, e.g. a record marked deleted, only
/// excludes its node).
pub fn replace(
    spec: &VolumeSpec,
    nodes: &[NodeInfo],
    existing: &[ExistingReplica],
    failed: &[usize],
) -> PlaceResult {
    let failed: BTreeSet<usize> = failed
        .iter()
        .copied()
        .filter(|&i| i < existing.len())
        .collect();
    let needed = count_u32(failed.len());
    let live: Vec<&ExistingReplica> = existing
        .iter()
        .enumerate()
        .filter(|(i, r)| !failed.contains(i) && r.healthy)
        .map(|(_, r)| r)
        .collect();
    let plan = plan(spec, nodes, existing, &live, needed);
    let summary = format!(
        "{} of {needed} failed replicas replaced for volume {}",
        plan.placed(),
        spec.name
    );
    plan.into_result(needed, summary, spec.size_bytes)
}

/// One more replica of `spec` on the node named `node` itself, when that
/// node is eligible (rule 1; the disk by rule 2); `None` otherwise, including
/// when no node has that name. `existing` excludes nodes as in [`place`];
/// `replica_count` and `locality` are not looked at.
pub fn place_on(
    spec: &VolumeSpec,
    nodes: &[NodeInfo],
    existing: &[ExistingReplica],
    node: &str,
) -> Option<Placement> {
    let holding: BTreeSet<&str> = existing.iter().map(|r| r.node.as_str()).collect();
    let n = nodes.iter().find(|n| n.name == node)?;
    let disk = eligibility(n, &holding, spec.size_bytes).ok()?;
    Some(Placement {
        node: n.name.clone(),
        disk: disk.path.clone(),
    })
}

/// Why a node cannot take a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ineligible {
    HoldsReplica,
    Down,
    Unschedulable,
    NoRoom,
}

/// Counts of excluded nodes, for the shortfall reason.
#[derive(Debug, Default)]
struct Exclusions {
    holds_replica: u32,
    down: u32,
    unschedulable: u32,
    no_room: u32,
}

struct Plan {
    placements: Vec<Placement>,
    total_nodes: u32,
    eligible: u32,
    excluded: Exclusions,
}

impl Plan {
    fn placed(&self) -> u32 {
        count_u32(self.placements.len())
    }

    fn into_result(self, needed: u32, summary: String, size_bytes: u64) -> PlaceResult {
        let shortfall = needed.saturating_sub(self.placed());
        let reason = (shortfall > 0).then(|| {
            let mut s = format!(
                "{summary}: only {} eligible node{} (up, schedulable, holding no replica of the \
                 volume, with a disk that has {} free)",
                self.eligible,
                plural(self.eligible),
                format_bytes(size_bytes),
            );
            let e = &self.excluded;
            let parts: Vec<String> = [
                (e.holds_replica, "already holding a replica"),
                (e.down, "down"),
                (e.unschedulable, "unschedulable"),
                (e.no_room, "without a disk with room"),
            ]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
            let _ = write!(
                s,
                "; {} node{} in total",
                self.total_nodes,
                plural(self.total_nodes)
            );
            if !parts.is_empty() {
                let _ = write!(s, ", {}", parts.join(", "));
            }
            s
        });
        PlaceResult {
            placements: self.placements,
            shortfall,
            reason,
        }
    }
}

struct Candidate<'a> {
    node: &'a NodeInfo,
    disk: &'a DiskInfo,
}

/// The greedy core shared by [`place`] and [`replace`].
fn plan(
    spec: &VolumeSpec,
    nodes: &[NodeInfo],
    existing: &[ExistingReplica],
    live: &[&ExistingReplica],
    needed: u32,
) -> Plan {
    let holding: BTreeSet<&str> = existing.iter().map(|r| r.node.as_str()).collect();
    let mut seen = BTreeSet::new();
    let mut zone_of: HashMap<&str, Option<&str>> = HashMap::new();
    let mut candidates = Vec::new();
    let mut excluded = Exclusions::default();
    for node in nodes {
        if !seen.insert(node.name.as_str()) {
            continue;
        }
        zone_of.insert(node.name.as_str(), node.zone.as_deref());
        match eligibility(node, &holding, spec.size_bytes) {
            Ok(disk) => candidates.push(Candidate { node, disk }),
            Err(Ineligible::HoldsReplica) => excluded.holds_replica += 1,
            Err(Ineligible::Down) => excluded.down += 1,
            Err(Ineligible::Unschedulable) => excluded.unschedulable += 1,
            Err(Ineligible::NoRoom) => excluded.no_room += 1,
        }
    }
    let total_nodes = count_u32(seen.len());
    let eligible = count_u32(candidates.len());

    // Replicas per zone, live replicas on known nodes first.
    let mut zone_count: HashMap<Option<&str>, u32> = HashMap::new();
    for r in live {
        if let Some(zone) = zone_of.get(r.node.as_str()) {
            *zone_count.entry(*zone).or_default() += 1;
        }
    }

    let mut placements = Vec::new();
    let mut remaining = needed;
    if remaining > 0 {
        if let Some(local) = spec.locality.as_deref() {
            if let Some(i) = candidates.iter().position(|c| c.node.name == local) {
                take(candidates.swap_remove(i), &mut zone_count, &mut placements);
                remaining -= 1;
            }
        }
    }
    while remaining > 0 {
        let best = candidates
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| {
                let za = zone_count
                    .get(&a.node.zone.as_deref())
                    .copied()
                    .unwrap_or(0);
                let zb = zone_count
                    .get(&b.node.zone.as_deref())
                    .copied()
                    .unwrap_or(0);
                za.cmp(&zb)
                    .then(b.disk.free_bytes.cmp(&a.disk.free_bytes))
                    .then(a.node.name.cmp(&b.node.name))
            })
            .map(|(i, _)| i);
        let Some(i) = best else { break };
        take(candidates.swap_remove(i), &mut zone_count, &mut placements);
        remaining -= 1;
    }
    Plan {
        placements,
        total_nodes,
        eligible,
        excluded,
    }
}

/// Records `c` as the next placement and counts it in its zone.
fn take<'a>(
    c: Candidate<'a>,
    zone_count: &mut HashMap<Option<&'a str>, u32>,
    placements: &mut Vec<Placement>,
) {
    *zone_count.entry(c.node.zone.as_deref()).or_default() += 1;
    placements.push(Placement {
        node: c.node.name.clone(),
        disk: c.disk.path.clone(),
    });
}

/// The disk a replica of `size_bytes` would go to on `node`, or why none.
fn eligibility<'a>(
    node: &'a NodeInfo,
    holding: &BTreeSet<&str>,
    size_bytes: u64,
) -> Result<&'a DiskInfo, Ineligible> {
    if holding.contains(node.name.as_str()) {
        return Err(Ineligible::HoldsReplica);
    }
    if !node.up {
        return Err(Ineligible::Down);
    }
    if !node.schedulable {
        return Err(Ineligible::Unschedulable);
    }
    pick_disk(node, size_bytes).ok_or(Ineligible::NoRoom)
}

/// The fitting disk with the most free bytes (ties: smallest path).
fn pick_disk(node: &NodeInfo, size_bytes: u64) -> Option<&DiskInfo> {
    node.disks
        .iter()
        .filter(|d| d.free_bytes >= size_bytes)
        .min_by(|a, b| b.free_bytes.cmp(&a.free_bytes).then(a.path.cmp(&b.path)))
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Human size with binary units, one decimal: "1.0 GiB", "512.0 MiB", "10 B".
fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    #[allow(clippy::cast_precision_loss)] // display only
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, zone: Option<&str>, free: u64) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            zone: zone.map(str::to_string),
            up: true,
            schedulable: true,
            disks: vec![DiskInfo {
                path: "/d0".to_string(),
                capacity_bytes: 100 * GIB,
                free_bytes: free,
            }],
        }
    }

    fn spec(size: u64, count: u32) -> VolumeSpec {
        VolumeSpec {
            name: "vol0".to_string(),
            size_bytes: size,
            replica_count: count,
            locality: None,
        }
    }

    fn replica(node: &str, healthy: bool) -> ExistingReplica {
        ExistingReplica {
            node: node.to_string(),
            disk: "/d0".to_string(),
            healthy,
        }
    }

    fn names(r: &PlaceResult) -> Vec<&str> {
        r.placements.iter().map(|p| p.node.as_str()).collect()
    }

    #[test]
    fn picks_most_free_then_name() {
        let nodes = [
            node("c", None, 5 * GIB),
            node("b", None, 9 * GIB),
            node("a", None, 5 * GIB),
            node("d", None, 2 * GIB),
        ];
        let r = place(&spec(GIB, 3), &nodes, &[]);
        assert_eq!(names(&r), ["b", "a", "c"]);
        assert!(r.is_complete());
        assert_eq!(r.reason, None);
    }

    #[test]
    fn nothing_needed() {
        let nodes = [node("a", None, GIB)];
        let r = place(&spec(GIB, 0), &nodes, &[]);
        assert_eq!(r, PlaceResult::default());
        let r = place(&spec(GIB, 1), &nodes, &[replica("x", true)]);
        assert_eq!(r, PlaceResult::default());
    }

    #[test]
    fn one_replica_per_node_healthy_or_not() {
        let nodes = [
            node("a", None, 9 * GIB),
            node("b", None, 8 * GIB),
            node("c", None, 7 * GIB),
            node("d", None, GIB),
        ];
        // a healthy (counts), b unhealthy (does not count, node still excluded).
        let r = place(
            &spec(GIB, 3),
            &nodes,
            &[replica("a", true), replica("b", false)],
        );
        assert_eq!(names(&r), ["c", "d"]);
        assert_eq!(r.shortfall, 0);
    }

    #[test]
    fn excludes_down_unschedulable_and_full_with_reason() {
        let mut down = node("n3", None, 9 * GIB);
        down.up = false;
        let mut cordoned = node("n4", None, 9 * GIB);
        cordoned.schedulable = false;
        let nodes = [
            node("n1", None, 2 * GIB),
            node("n2", None, 2 * GIB),
            down,
            cordoned,
            node("n5", None, 512 << 20),
        ];
        let r = place(&spec(GIB, 3), &nodes, &[]);
        assert_eq!(names(&r), ["n1", "n2"]);
        assert_eq!(r.shortfall, 1);
        assert_eq!(
            r.reason.as_deref(),
            Some(
                "2 of 3 replicas placed for volume vol0: only 2 eligible nodes (up, schedulable, \
                 holding no replica of the volume, with a disk that has 1.0 GiB free); 5 nodes in \
                 total, 1 down, 1 unschedulable, 1 without a disk with room"
            )
        );
    }

    #[test]
    fn reason_counts_holders_and_existing_healthy() {
        let nodes = [node("a", None, 9 * GIB)];
        let r = place(&spec(GIB, 3), &nodes, &[replica("a", true)]);
        assert!(r.placements.is_empty());
        assert_eq!(r.shortfall, 2);
        assert_eq!(
            r.reason.as_deref(),
            Some(
                "1 of 3 replicas placed for volume vol0: only 0 eligible nodes (up, schedulable, \
                 holding no replica of the volume, with a disk that has 1.0 GiB free); 1 node in \
                 total, 1 already holding a replica"
            )
        );
    }

    #[test]
    fn exact_fit_is_enough_thin_volume_checks_full_size() {
        let nodes = [node("a", None, GIB), node("b", None, GIB - 1)];
        let r = place(&spec(GIB, 2), &nodes, &[]);
        assert_eq!(names(&r), ["a"]);
        assert_eq!(r.shortfall, 1);
    }

    #[test]
    fn spreads_over_zones_first() {
        let nodes = [
            node("a1", Some("a"), 9 * GIB),
            node("a2", Some("a"), 8 * GIB),
            node("b1", Some("b"), 2 * GIB),
            node("c1", Some("c"), GIB),
        ];
        let r = place(&spec(GIB, 3), &nodes, &[]);
        assert_eq!(names(&r), ["a1", "b1", "c1"]);
        // Then fill: the fourth goes back to zone a.
        let r = place(&spec(GIB, 4), &nodes, &[]);
        assert_eq!(names(&r), ["a1", "b1", "c1", "a2"]);
    }

    #[test]
    fn spreads_evenly_over_two_zones() {
        let nodes = [
            node("a1", Some("a"), 9 * GIB),
            node("a2", Some("a"), 8 * GIB),
            node("a3", Some("a"), 7 * GIB),
            node("b1", Some("b"), 2 * GIB),
            node("b2", Some("b"), GIB),
        ];
        let r = place(&spec(GIB, 4), &nodes, &[]);
        assert_eq!(names(&r), ["a1", "b1", "a2", "b2"]);
    }

    #[test]
    fn zones_of_healthy_existing_replicas_count() {
        let nodes = [
            node("a1", Some("a"), 9 * GIB),
            node("a2", Some("a"), 8 * GIB),
            node("b1", Some("b"), GIB),
        ];
        let r = place(&spec(GIB, 2), &nodes, &[replica("a1", true)]);
        assert_eq!(names(&r), ["b1"]);
    }

    #[test]
    fn unlabeled_nodes_form_one_zone() {
        let nodes = [
            node("x", None, 9 * GIB),
            node("y", None, 8 * GIB),
            node("z", Some("a"), GIB),
        ];
        let r = place(&spec(GIB, 2), &nodes, &[]);
        assert_eq!(names(&r), ["x", "z"]);
    }

    #[test]
    fn locality_goes_first() {
        let nodes = [
            node("a", Some("z1"), 9 * GIB),
            node("b", Some("z1"), GIB),
            node("c", Some("z2"), 5 * GIB),
        ];
        let mut s = spec(GIB, 2);
        s.locality = Some("b".to_string());
        let r = place(&s, &nodes, &[]);
        assert_eq!(names(&r), ["b", "c"]);
    }

    #[test]
    fn locality_ignored_when_ineligible_or_holding() {
        let mut down = node("d", None, 9 * GIB);
        down.up = false;
        let nodes = [node("a", None, 5 * GIB), node("b", None, GIB), down];
        let mut s = spec(GIB, 1);
        s.locality = Some("d".to_string());
        assert_eq!(names(&place(&s, &nodes, &[])), ["a"]);
        s.locality = Some("unknown".to_string());
        assert_eq!(names(&place(&s, &nodes, &[])), ["a"]);
        s.locality = Some("b".to_string());
        s.replica_count = 2;
        let r = place(&s, &nodes, &[replica("b", false)]);
        assert_eq!(names(&r), ["a"]);
        assert_eq!(r.shortfall, 1);
    }

    #[test]
    fn place_on_only_an_eligible_named_node() {
        let mut down = node("d", None, 9 * GIB);
        down.up = false;
        let nodes = [node("a", None, 5 * GIB), node("b", None, GIB / 2), down];
        let s = spec(GIB, 1);
        let on = |n: &str, existing: &[ExistingReplica]| place_on(&s, &nodes, existing, n);
        assert_eq!(
            on("a", &[replica("x", true)]),
            Some(Placement {
                node: "a".into(),
                disk: "/d0".into()
            })
        );
        assert_eq!(on("a", &[replica("a", false)]), None, "holds a deleted one");
        assert_eq!(on("b", &[]), None, "no room");
        assert_eq!(on("d", &[]), None, "down");
        assert_eq!(on("unknown", &[]), None);
    }

    #[test]
    fn disk_with_most_free_that_fits() {
        let mut n = node("a", None, 0);
        n.disks = vec![
            DiskInfo {
                path: "/d2".to_string(),
                capacity_bytes: 10 * GIB,
                free_bytes: 3 * GIB,
            },
            DiskInfo {
                path: "/d1".to_string(),
                capacity_bytes: 10 * GIB,
                free_bytes: 3 * GIB,
            },
            DiskInfo {
                path: "/d0".to_string(),
                capacity_bytes: 10 * GIB,
                free_bytes: GIB,
            },
        ];
        let r = place(&spec(GIB, 1), &[n.clone()], &[]);
        assert_eq!(
            r.placements,
            [Placement {
                node: "a".to_string(),
                disk: "/d1".to_string()
            }]
        );
        assert_eq!(pick_disk(&n, 4 * GIB), None);
    }

    #[test]
    fn replace_excludes_failed_nodes() {
        let nodes = [
            node("a", Some("z1"), 9 * GIB),
            node("b", Some("z2"), 9 * GIB),
            node("c", Some("z3"), 9 * GIB),
            node("d", Some("z1"), 5 * GIB),
            node("e", Some("z3"), GIB),
        ];
        let existing = [replica("a", true), replica("b", true), replica("c", false)];
        // c failed: c is excluded, z1 and z2 are taken, so e (z3) wins over d.
        let r = replace(&spec(GIB, 3), &nodes, &existing, &[2, 2, 7]);
        assert_eq!(names(&r), ["e"]);
        assert!(r.is_complete());
    }

    #[test]
    fn replace_shortfall_reason() {
        let nodes = [node("a", None, 9 * GIB), node("b", None, 9 * GIB)];
        let existing = [replica("a", true), replica("b", false)];
        let r = replace(&spec(GIB, 2), &nodes, &existing, &[1]);
        assert!(r.placements.is_empty());
        assert_eq!(
            r.reason.as_deref(),
            Some(
                "0 of 1 failed replicas replaced for volume vol0: only 0 eligible nodes (up, \
                 schedulable, holding no replica of the volume, with a disk that has 1.0 GiB \
                 free); 2 nodes in total, 2 already holding a replica"
            )
        );
    }

    #[test]
    fn formats_bytes() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(GIB), "1.0 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    // ---- randomized properties (seeded, deterministic) ----

    /// splitmix64: small, seeded, good enough for test inputs.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
        }

        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
    }

    struct Case {
        spec: VolumeSpec,
        nodes: Vec<NodeInfo>,
        existing: Vec<ExistingReplica>,
    }

    fn gen_case(rng: &mut Rng) -> Case {
        let zones = [None, Some("a"), Some("b"), Some("c"), Some("d")];
        let frees = [0, 1, 2, 3, 4, 8];
        let labeled = rng.chance(70);
        let nodes: Vec<NodeInfo> = (0..rng.below(9))
            .map(|i| NodeInfo {
                name: format!("n{i}"),
                zone: if labeled {
                    zones[rng.below(zones.len())].map(str::to_string)
                } else {
                    None
                },
                up: rng.chance(80),
                schedulable: rng.chance(90),
                disks: (0..rng.below(4))
                    .map(|d| DiskInfo {
                        path: format!("/d{d}"),
                        capacity_bytes: 8,
                        free_bytes: frees[rng.below(frees.len())],
                    })
                    .collect(),
            })
            .collect();
        let mut existing = Vec::new();
        for n in &nodes {
            if rng.chance(25) {
                existing.push(ExistingReplica {
                    node: n.name.clone(),
                    disk: "/d0".to_string(),
                    healthy: rng.chance(60),
                });
            }
        }
        if rng.chance(10) {
            existing.push(replica("gone", rng.chance(50)));
        }
        let locality = match rng.below(3) {
            0 if !nodes.is_empty() => Some(nodes[rng.below(nodes.len())].name.clone()),
            1 => Some("elsewhere".to_string()),
            _ => None,
        };
        let spec = VolumeSpec {
            name: "v".to_string(),
            size_bytes: [0, 1, 2, 4][rng.below(4)],
            replica_count: u32::try_from(rng.below(6)).unwrap(),
            locality,
        };
        Case {
            spec,
            nodes,
            existing,
        }
    }

    /// Independent oracle: names of eligible nodes, with their best disk.
    fn eligible_oracle(c: &Case) -> BTreeMap<String, (Option<String>, u64)> {
        let mut out = BTreeMap::new();
        for n in &c.nodes {
            if !n.up || !n.schedulable || c.existing.iter().any(|r| r.node == n.name) {
                continue;
            }
            let best = n
                .disks
                .iter()
                .filter(|d| d.free_bytes >= c.spec.size_bytes)
                .map(|d| d.free_bytes)
                .max();
            if let Some(free) = best {
                out.insert(n.name.clone(), (n.zone.clone(), free));
            }
        }
        out
    }

    fn check(c: &Case, live: &[&ExistingReplica], needed: u32, r: &PlaceResult) {
        let eligible = eligible_oracle(c);
        let zone_of: BTreeMap<&str, Option<String>> = c
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.zone.clone()))
            .collect();

        // Count and shortfall.
        let placed = u32::try_from(r.placements.len()).unwrap();
        assert_eq!(placed + r.shortfall, needed);
        assert_eq!(r.reason.is_some(), r.shortfall > 0);
        let possible = u32::try_from(eligible.len()).unwrap().min(needed);
        assert_eq!(placed, possible, "never fewer than possible");

        // Distinct nodes, none already holding a replica, all eligible, best disk.
        let mut used = BTreeSet::new();
        for p in &r.placements {
            assert!(used.insert(p.node.as_str()), "node reused: {}", p.node);
            assert!(!c.existing.iter().any(|e| e.node == p.node));
            let (_, best_free) = eligible.get(&p.node).expect("eligible node");
            let n = c.nodes.iter().find(|n| n.name == p.node).unwrap();
            assert!(n.up && n.schedulable);
            let d = n.disks.iter().find(|d| d.path == p.disk).expect("disk");
            assert!(d.free_bytes >= c.spec.size_bytes);
            assert_eq!(d.free_bytes, *best_free);
        }

        // Locality first when possible.
        let local_first = match (&c.spec.locality, r.placements.first()) {
            (Some(l), Some(first)) if eligible.contains_key(l) => {
                assert_eq!(&first.node, l);
                true
            }
            _ => false,
        };

        // Distinct zones: as many as possible.
        let mut zones: BTreeSet<Option<String>> = live
            .iter()
            .filter_map(|e| zone_of.get(e.node.as_str()).cloned())
            .collect();
        let mut rest = placed;
        if local_first {
            zones.insert(zone_of[r.placements[0].node.as_str()].clone());
            rest -= 1;
        }
        let fresh = eligible
            .values()
            .map(|(z, _)| z.clone())
            .filter(|z| !zones.contains(z))
            .collect::<BTreeSet<_>>()
            .len();
        let expected = zones.len() + usize::try_from(rest).unwrap().min(fresh);
        let mut actual: BTreeSet<Option<String>> = live
            .iter()
            .filter_map(|e| zone_of.get(e.node.as_str()).cloned())
            .collect();
        actual.extend(
            r.placements
                .iter()
                .map(|p| zone_of[p.node.as_str()].clone()),
        );
        assert_eq!(actual.len(), expected, "distinct zones");

        // Evenness: a zone that got a (non-locality) placement holds at most one
        // more replica than any zone with an eligible node left unused.
        let mut count: BTreeMap<Option<String>, u32> = BTreeMap::new();
        for e in live {
            if let Some(z) = zone_of.get(e.node.as_str()) {
                *count.entry(z.clone()).or_default() += 1;
            }
        }
        for p in &r.placements {
            *count.entry(zone_of[p.node.as_str()].clone()).or_default() += 1;
        }
        let skip = usize::from(local_first);
        for p in &r.placements[skip..] {
            let za = &zone_of[p.node.as_str()];
            for (name, (zb, _)) in &eligible {
                if used.contains(name.as_str()) {
                    continue;
                }
                let cb = count.get(zb).copied().unwrap_or(0);
                assert!(count[za] <= cb + 1, "zone {za:?} overfilled vs {zb:?}");
            }
        }
    }

    fn shuffled(rng: &mut Rng, nodes: &[NodeInfo]) -> Vec<NodeInfo> {
        let mut v = nodes.to_vec();
        for i in (1..v.len()).rev() {
            v.swap(i, rng.below(i + 1));
        }
        v
    }

    #[test]
    fn place_properties() {
        let mut rng = Rng(0x5eed_cafe);
        for _ in 0..20_000 {
            let c = gen_case(&mut rng);
            let r = place(&c.spec, &c.nodes, &c.existing);
            let healthy = u32::try_from(c.existing.iter().filter(|e| e.healthy).count()).unwrap();
            let live: Vec<&ExistingReplica> = c.existing.iter().filter(|e| e.healthy).collect();
            check(&c, &live, c.spec.replica_count.saturating_sub(healthy), &r);
            // Deterministic, and independent of the order nodes are listed in.
            assert_eq!(place(&c.spec, &c.nodes, &c.existing), r);
            let nodes = shuffled(&mut rng, &c.nodes);
            assert_eq!(place(&c.spec, &nodes, &c.existing), r);
        }
    }

    #[test]
    fn replace_properties() {
        let mut rng = Rng(0x0dd_ba11);
        for _ in 0..20_000 {
            let c = gen_case(&mut rng);
            let failed: Vec<usize> = (0..rng.below(4))
                .map(|_| rng.below(c.existing.len() + 2))
                .collect();
            let r = replace(&c.spec, &c.nodes, &c.existing, &failed);
            let set: BTreeSet<usize> = failed
                .iter()
                .copied()
                .filter(|&i| i < c.existing.len())
                .collect();
            let live: Vec<&ExistingReplica> = c
                .existing
                .iter()
                .enumerate()
                .filter(|(i, e)| !set.contains(i) && e.healthy)
                .map(|(_, e)| e)
                .collect();
            check(&c, &live, u32::try_from(set.len()).unwrap(), &r);
            assert_eq!(replace(&c.spec, &c.nodes, &c.existing, &failed), r);
            let nodes = shuffled(&mut rng, &c.nodes);
            assert_eq!(replace(&c.spec, &nodes, &c.existing, &failed), r);
        }
    }
}
