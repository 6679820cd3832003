//! The CLI side of the metadata service: a `cairn.v1.Meta` client (`--meta ADDR`), the
//! JSON views of records and the tables `cairn volume|node|replica list` print.
//!
//! Guarantees: the JSON shape of each record is the `*Json` struct below and nothing else
//! (field names are the proto field names; enums are the lowercase CLI names of
//! `cairn_proto::cli`, e.g. `"creating"`, `"best-effort"`, `"rw"`); listings print a JSON
//! array (empty when there are no records), `get` a single object. Errors the user can act
//! on (a duplicate name, an unknown record, a refused change) are printed as one line on
//! stderr with exit code 1 ([`UserError`]); a meta that cannot be reached is an error of
//! the binary (exit 2).
//!
//! Assumes: any meta member serves every call (members forward to the leader), so one
//! address is enough.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::{
    record, DataLocality, Disk, GetRequest, Key, Kind, ListRequest, Node, NodeState, Record,
    Replica, ReplicaHealth, ReplicaMode, Volume, VolumeState,
};
use clap::Args;
use serde::Serialize;
use tonic::transport::Channel;

/// Where the CLI finds meta when `--meta` is not given (the `cairn dev` cluster).
pub const DEFAULT_META: &str = "127.0.0.1:10811";

/// How long one call to meta may take before the CLI gives up.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The `--meta` flag shared by every command that talks to the metadata service.
#[derive(Debug, Clone, Args)]
pub struct MetaAddr {
    /// `host:port` of any member of the metadata service (`cairn meta --listen`), or several
    /// separated by commas (calls go to any that is up).
    #[arg(long = "meta", value_name = "ADDR", default_value = DEFAULT_META)]
    pub addr: String,
}

/// An error the user caused or can fix (exit code 1), as opposed to a failure of the tool.
#[derive(Debug)]
pub struct UserError(pub String);

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

/// Runs a CLI action: a [`UserError`] is printed and becomes exit code 1, other errors go
/// up to `main` (exit 2).
pub fn run_cli(f: impl FnOnce() -> anyhow::Result<ExitCode>) -> anyhow::Result<ExitCode> {
    match f() {
        Err(e) => match e.downcast_ref::<UserError>() {
            Some(u) => {
                eprintln!("error: {u}");
                Ok(ExitCode::from(1))
            }
            None => Err(e),
        },
        ok => ok,
    }
}

/// Shorthand for a [`UserError`].
pub fn user_error(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UserError(msg.into()))
}

/// Runs `fut` on a small runtime of its own (the CLI makes a few calls and exits).
pub fn block_on<T>(fut: impl Future<Output = T>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    Ok(rt.block_on(fut))
}

/// A Meta client for `addr` (connects on first use). Must be called inside a runtime.
/// `addr` may list several members separated by commas: calls then go to any member that
/// is up (every member answers; followers forward writes to the leader).
pub fn client(addr: &str) -> anyhow::Result<MetaClient<Channel>> {
    let endpoint = |a: &str| {
        anyhow::Ok(
            tonic::transport::Endpoint::from_shared(format!("http://{a}"))
                .with_context(|| format!("bad --meta address {a:?}"))?
                .connect_timeout(Duration::from_secs(3))
                .timeout(CALL_TIMEOUT),
        )
    };
    let addrs: Vec<&str> = addr
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    let ch = match addrs.as_slice() {
        [] => anyhow::bail!("bad --meta address {addr:?}: no address"),
        [one] => endpoint(one)?.connect_lazy(),
        many => Channel::balance_list(
            many.iter()
                .map(|a| endpoint(a))
                .collect::<anyhow::Result<Vec<_>>>()?
                .into_iter(),
        ),
    };
    Ok(MetaClient::new(ch))
}

/// Get of one record; `Ok(None)` when meta has none.
pub async fn get(
    client: &mut MetaClient<Channel>,
    addr: &str,
    kind: Kind,
    name: &str,
) -> anyhow::Result<Option<record::Record>> {
    let req = GetRequest {
        key: Some(Key {
            kind: kind as i32,
            name: name.to_owned(),
        }),
    };
    match client.get(req).await {
        Ok(r) => Ok(r.into_inner().record.and_then(|r| r.record)),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(status_error(addr, &s)),
    }
}

/// Turns a status meta returned into an error: the codes a user can act on become
/// [`UserError`]s with meta's message, the others an error naming the address.
pub fn status_error(addr: &str, s: &tonic::Status) -> anyhow::Error {
    use tonic::Code;
    match s.code() {
        Code::InvalidArgument
        | Code::AlreadyExists
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::Aborted => user_error(s.message().to_owned()),
        Code::Unavailable => {
            // A transport failure keeps its root cause (e.g. "Connection refused") at the end
            // of its source chain; the links in between repeat the message.
            let mut root = None;
            let mut src = std::error::Error::source(s);
            while let Some(e) = src {
                root = Some(e.to_string());
                src = e.source();
            }
            match root {
                Some(r) => anyhow::anyhow!("meta at {addr} is unavailable: {}: {r}", s.message()),
                None => anyhow::anyhow!("meta at {addr} is unavailable: {}", s.message()),
            }
        }
        code => anyhow::anyhow!("meta at {addr}: {code:?}: {}", s.message()),
    }
}

/// Every record of `kind` matching the filters, sorted by name (as meta returns them).
pub async fn list(
    addr: &str,
    kind: Kind,
    volume: Option<&str>,
    node: Option<&str>,
) -> anyhow::Result<Vec<record::Record>> {
    let resp = client(addr)?
        .list(ListRequest {
            kind: kind as i32,
            volume: volume.unwrap_or_default().to_owned(),
            node: node.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(|s| status_error(addr, &s))?;
    Ok(resp
        .into_inner()
        .records
        .into_iter()
        .filter_map(|r: Record| r.record)
        .collect())
}

/// Prints `items` as a pretty JSON array (or object, for one record).
pub fn print_json<T: Serialize + ?Sized>(items: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(items)?);
    Ok(())
}

fn enum_name<E: TryFrom<i32> + Copy>(
    v: i32,
    unspecified: E,
    name: fn(E) -> &'static str,
) -> String {
    name(E::try_from(v).unwrap_or(unspecified)).to_owned()
}

/// A Volume record as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct VolumeJson {
    /// The volume's name.
    pub name: String,
    /// Record version (1 on create, +1 per update).
    pub version: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Desired number of replicas.
    pub replica_count: u32,
    /// `creating`, `healthy`, `degraded`, `faulted` or `deleting`.
    pub state: String,
    /// Why the volume is in `state`.
    pub state_reason: String,
    /// Engine epoch, raised on every attach.
    pub epoch: u64,
    /// Node running the engine; empty when detached.
    pub attached_node: String,
    /// `disabled`, `best-effort` (or `unspecified`, treated as disabled).
    pub data_locality: String,
    /// What the volume is being filled from (a clone or restore in progress, or one whose
    /// process died); empty once complete.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub filling_from: String,
}

impl From<&Volume> for VolumeJson {
    fn from(v: &Volume) -> Self {
        VolumeJson {
            name: v.name.clone(),
            version: v.version,
            size_bytes: v.size_bytes,
            replica_count: v.replica_count,
            state: enum_name(v.state, VolumeState::Unspecified, VolumeState::cli_name),
            state_reason: v.state_reason.clone(),
            epoch: v.epoch,
            attached_node: v.attached_node.clone(),
            data_locality: enum_name(
                v.data_locality,
                DataLocality::Unspecified,
                DataLocality::cli_name,
            ),
            filling_from: v.filling_from.clone(),
        }
    }
}

/// One disk of a node as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct DiskJson {
    /// Directory on the node.
    pub path: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Free bytes at the last heartbeat.
    pub free_bytes: u64,
}

impl From<&Disk> for DiskJson {
    fn from(d: &Disk) -> Self {
        DiskJson {
            path: d.path.clone(),
            capacity_bytes: d.capacity_bytes,
            free_bytes: d.free_bytes,
        }
    }
}

/// A Node record as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct NodeJson {
    /// The node's name.
    pub name: String,
    /// Record version.
    pub version: u64,
    /// `host:port` of the agent's replica server.
    pub address: String,
    /// Zone label; empty when none.
    pub zone: String,
    /// Data disks.
    pub disks: Vec<DiskJson>,
    /// Last accepted heartbeat, unix milliseconds (meta's clock).
    pub heartbeat_unix_ms: u64,
    /// `up` or `down`.
    pub state: String,
    /// Why the node is in `state`.
    pub state_reason: String,
    /// `host:port` of the agent's NBD server.
    pub nbd_address: String,
    /// `host:port` of the agent's control endpoint.
    pub control_address: String,
}

impl From<&Node> for NodeJson {
    fn from(n: &Node) -> Self {
        NodeJson {
            name: n.name.clone(),
            version: n.version,
            address: n.address.clone(),
            zone: n.zone.clone(),
            disks: n.disks.iter().map(DiskJson::from).collect(),
            heartbeat_unix_ms: n.heartbeat_unix_ms,
            state: enum_name(n.state, NodeState::Unspecified, NodeState::cli_name),
            state_reason: n.state_reason.clone(),
            nbd_address: n.nbd_address.clone(),
            control_address: n.control_address.clone(),
        }
    }
}

/// A Replica record as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct ReplicaJson {
    /// The replica's name.
    pub name: String,
    /// Record version.
    pub version: u64,
    /// Volume it belongs to.
    pub volume: String,
    /// Node holding it.
    pub node: String,
    /// Disk path on that node.
    pub disk: String,
    /// `rw`, `wo` or `err`.
    pub mode: String,
    /// `healthy`, `rebuilding`, `failed` or `stale`.
    pub health: String,
    /// Last failure or progress note.
    pub health_reason: String,
    /// True when meta allows the agent to remove its data.
    pub deleted: bool,
}

impl From<&Replica> for ReplicaJson {
    fn from(r: &Replica) -> Self {
        ReplicaJson {
            name: r.name.clone(),
            version: r.version,
            volume: r.volume.clone(),
            node: r.node.clone(),
            disk: r.disk.clone(),
            mode: enum_name(r.mode, ReplicaMode::Unspecified, ReplicaMode::cli_name),
            health: enum_name(
                r.health,
                ReplicaHealth::Unspecified,
                ReplicaHealth::cli_name,
            ),
            health_reason: r.health_reason.clone(),
            deleted: r.deleted,
        }
    }
}

fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).to_string_as(true)
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Prints volumes as a table.
pub fn print_volumes(vols: &[VolumeJson]) {
    println!(
        "{:<24} {:>10} {:>8} {:<10} {:<20} reason",
        "name", "size", "replicas", "state", "attached"
    );
    for v in vols {
        println!(
            "{:<24} {:>10} {:>8} {:<10} {:<20} {}",
            v.name,
            human(v.size_bytes),
            v.replica_count,
            v.state,
            or_dash(&v.attached_node),
            v.state_reason
        );
    }
}

/// Prints one volume, a field per line.
pub fn print_volume(v: &VolumeJson) {
    println!("name:          {}", v.name);
    println!(
        "size:          {} ({} bytes)",
        human(v.size_bytes),
        v.size_bytes
    );
    println!("replicas:      {}", v.replica_count);
    println!("state:         {}", v.state);
    println!("reason:        {}", v.state_reason);
    println!("attached to:   {}", or_dash(&v.attached_node));
    println!("epoch:         {}", v.epoch);
    println!("data locality: {}", v.data_locality);
    if !v.filling_from.is_empty() {
        println!(
            "filling from:  {} (not a complete copy yet)",
            v.filling_from
        );
    }
    println!("version:       {}", v.version);
}

/// Prints nodes as a table.
pub fn print_nodes(nodes: &[NodeJson]) {
    println!(
        "{:<28} {:<22} {:<12} {:<6} {:>5} {:>10}  reason",
        "name", "address", "zone", "state", "disks", "free"
    );
    for n in nodes {
        let free: u64 = n.disks.iter().map(|d| d.free_bytes).sum();
        println!(
            "{:<28} {:<22} {:<12} {:<6} {:>5} {:>10}  {}",
            n.name,
            n.address,
            or_dash(&n.zone),
            n.state,
            n.disks.len(),
            human(free),
            n.state_reason
        );
    }
}

/// Prints replicas as a table.
pub fn print_replicas(reps: &[ReplicaJson]) {
    println!(
        "{:<28} {:<24} {:<28} {:<4} {:<10}  reason",
        "name", "volume", "node", "mode", "health"
    );
    for r in reps {
        let deleted = if r.deleted { " (deleted)" } else { "" };
        println!(
            "{:<28} {:<24} {:<28} {:<4} {:<10}  {}{deleted}",
            r.name, r.volume, r.node, r.mode, r.health, r.health_reason
        );
    }
}

/// `cairn node ...`: the storage nodes meta knows.
#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// List the nodes registered with meta: address, zone, state, disks and free space.
    List {
        /// Print the nodes as a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        meta: MetaAddr,
    },
}

/// Runs `cairn node ...`.
pub fn run_node(cmd: NodeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NodeCommand::List { json, meta } => run_cli(|| {
            let recs = block_on(list(&meta.addr, Kind::Node, None, None))??;
            let nodes: Vec<NodeJson> = recs
                .iter()
                .filter_map(|r| match r {
                    record::Record::Node(n) => Some(NodeJson::from(n)),
                    _ => None,
                })
                .collect();
            if json {
                print_json(&nodes)?;
            } else {
                print_nodes(&nodes);
            }
            Ok(ExitCode::SUCCESS)
        }),
    }
}

/// Runs `cairn replica list`: replica records, optionally of one volume and/or one node.
pub fn run_replica_list(
    meta: &MetaAddr,
    volume: Option<&str>,
    node: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    run_cli(|| {
        let recs = block_on(list(&meta.addr, Kind::Replica, volume, node))??;
        let reps: Vec<ReplicaJson> = recs
            .iter()
            .filter_map(|r| match r {
                record::Record::Replica(x) => Some(ReplicaJson::from(x)),
                _ => None,
            })
            .collect();
        if json {
            print_json(&reps)?;
        } else {
            print_replicas(&reps);
        }
        Ok(ExitCode::SUCCESS)
    })
}
