//! `cairn snapshot create|list|delete`: first-class snapshots, recorded in meta and taken by
//! the engine of the node the volume is attached to (found through meta: the volume's
//! `attached_node`, that node's `control_address`).
//!
//! Guarantees:
//! - Names are checked before any call (a Snapshot record name: a DNS-1123 label, which the
//!   replicas accept too). A duplicate name (Snapshot names are unique across volumes), an
//!   unknown or detached volume and a snapshot of another volume are refused with one
//!   `error:` line and exit 1, before the engine is asked anything.
//! - `create` takes the snapshot first (crash-consistent across replicas, see
//!   `Engine::snapshot_create`) and records it second, so a Snapshot record always names
//!   data that exists. If recording fails because the name was taken meanwhile, the engine's
//!   snapshot is deleted again (its layer merges; content unchanged).
//! - `delete` deletes the engine's snapshot first (merging its layer: the volume's content
//!   is unchanged), then the record.
//!
//! Assumes: the engine on the attached node serves the volume (`cairn volume attach` waits
//! for that). A snapshot taken with `cairn volume snapshot create` (the engine alone) has no
//! record; `list` shows it as unrecorded.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use cairn_engine::Link;
use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::{
    record, CreateRequest, DeleteRequest, Key, Kind, Node, Record, Replica, ReplicaMode, Snapshot,
    UpdateRequest, Volume,
};
use cairn_wire::{ReplyBody, Request};
use clap::Subcommand;
use serde::Serialize;
use tonic::transport::Channel;

use crate::control::{self, ControlReply, ControlRequest, SnapshotView};
use crate::records::{self, block_on, run_cli, status_error, user_error, MetaAddr};

/// How long one replica may take to answer during a revert.
const REVERT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a crash-consistent snapshot of an attached volume on every replica (new writes
    /// are held while in-flight ones drain and every replica freezes its layer) and record
    /// it in meta. Prints the pause writes saw.
    Create {
        /// Volume name.
        volume: String,
        /// Snapshot name, unique across volumes: 1-63 of [a-z0-9-], starting and ending
        /// with a letter or digit.
        name: String,
        /// A label `KEY=VALUE` stored with the snapshot; repeat for more.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Print {name, volume, pause_us, created_unix_ms} as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// List a volume's snapshots: the records in meta and, when the volume is attached, what
    /// its replicas hold (oldest first).
    List {
        /// Volume name.
        volume: String,
        /// Print the snapshots as a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Delete a snapshot of an attached volume: its layer merges into the next one on every
    /// replica (the volume's content is unchanged), then its record goes.
    Delete {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Make a detached volume's content that of one of its snapshots again: every write
    /// since the snapshot is discarded (the snapshot and every other snapshot are kept).
    /// Refused while the volume is attached, and when an RW replica cannot be reached (a
    /// replica left behind would hold other data).
    Revert {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
        #[command(flatten)]
        meta: MetaAddr,
    },
}

/// `cairn snapshot create --json`.
#[derive(Debug, Serialize)]
pub(crate) struct CreatedJson {
    name: String,
    volume: String,
    pause_us: u64,
    created_unix_ms: u64,
}

/// One snapshot as `cairn snapshot list --json` prints it.
#[derive(Debug, Serialize)]
struct SnapshotJson {
    name: String,
    volume: String,
    created_unix_ms: u64,
    labels: BTreeMap<String, String>,
    /// Bytes the snapshot's own layer holds (as recorded, or as the replicas report).
    size_bytes: u64,
    /// True when meta has a Snapshot record for it.
    recorded: bool,
    /// Whether the volume's replicas hold it; null when the volume is detached.
    on_replicas: Option<bool>,
}

pub fn run(cmd: SnapshotCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCommand::Create {
            volume,
            name,
            labels,
            json,
            meta,
        } => run_cli(|| create(&volume, &name, &labels, json, &meta)),
        SnapshotCommand::List { volume, json, meta } => run_cli(|| list(&volume, json, &meta)),
        SnapshotCommand::Delete { volume, name, meta } => run_cli(|| delete(&volume, &name, &meta)),
        SnapshotCommand::Revert { volume, name, meta } => run_cli(|| revert(&volume, &name, &meta)),
    }
}

fn parse_labels(labels: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in labels {
        let Some((k, v)) = l.split_once('=') else {
            return Err(user_error(format!("label {l:?} is not KEY=VALUE")));
        };
        if k.is_empty() {
            return Err(user_error(format!("label {l:?} has an empty key")));
        }
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(user_error(format!("label {k:?} given twice")));
        }
    }
    Ok(out)
}

fn validate(volume: &str, name: Option<&str>) -> anyhow::Result<()> {
    cairn_proto::validate_name("volume", volume).map_err(|e| user_error(e.to_string()))?;
    if let Some(n) = name {
        cairn_proto::validate_name("snapshot", n).map_err(|e| user_error(e.to_string()))?;
    }
    Ok(())
}

async fn volume_record(
    client: &mut MetaClient<Channel>,
    addr: &str,
    name: &str,
) -> anyhow::Result<Volume> {
    match records::get(client, addr, Kind::Volume, name).await? {
        Some(record::Record::Volume(v)) => Ok(v),
        Some(other) => anyhow::bail!("meta answered Get of volume {name} with {other:?}"),
        None => Err(user_error(format!("no volume {name}"))),
    }
}

async fn snapshot_record(
    client: &mut MetaClient<Channel>,
    addr: &str,
    name: &str,
) -> anyhow::Result<Option<Snapshot>> {
    match records::get(client, addr, Kind::Snapshot, name).await? {
        Some(record::Record::Snapshot(s)) => Ok(Some(s)),
        Some(other) => anyhow::bail!("meta answered Get of snapshot {name} with {other:?}"),
        None => Ok(None),
    }
}

/// The control endpoint of the node `v` is attached to; `None` when detached.
async fn endpoint_of(
    client: &mut MetaClient<Channel>,
    addr: &str,
    v: &Volume,
) -> anyhow::Result<Option<SocketAddr>> {
    if v.attached_node.is_empty() {
        return Ok(None);
    }
    let node: Node = match records::get(client, addr, Kind::Node, &v.attached_node).await? {
        Some(record::Record::Node(n)) => n,
        _ => {
            return Err(user_error(format!(
                "volume {} is attached to node {}, which meta does not know",
                v.name, v.attached_node
            )))
        }
    };
    let ep = node.control_address.parse().with_context(|| {
        format!(
            "node {} has no usable control address ({:?})",
            node.name, node.control_address
        )
    })?;
    Ok(Some(ep))
}

/// Calls the control endpoint off the runtime (the client is blocking).
async fn call(endpoint: SocketAddr, req: ControlRequest) -> anyhow::Result<ControlReply> {
    tokio::task::spawn_blocking(move || control::call(endpoint, &req)).await?
}

async fn engine_list(endpoint: SocketAddr, volume: &str) -> anyhow::Result<Vec<SnapshotView>> {
    let req = ControlRequest::SnapshotList {
        volume: volume.to_owned(),
    };
    match call(endpoint, req).await? {
        ControlReply::Snapshots(list) => Ok(list),
        ControlReply::Error(e) => Err(user_error(format!("engine of {volume}: {e}"))),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

pub(crate) async fn create_async(
    addr: &str,
    volume: &str,
    name: &str,
    labels: BTreeMap<String, String>,
) -> anyhow::Result<CreatedJson> {
    let mut client = records::client(addr)?;
    let v = volume_record(&mut client, addr, volume).await?;
    let Some(endpoint) = endpoint_of(&mut client, addr, &v).await? else {
        return Err(user_error(format!(
            "volume {volume} is not attached; attach it to take a snapshot"
        )));
    };
    if let Some(s) = snapshot_record(&mut client, addr, name).await? {
        return Err(user_error(format!(
            "snapshot {name} already exists (volume {})",
            s.volume
        )));
    }
    let req = ControlRequest::SnapshotCreate {
        volume: volume.to_owned(),
        name: name.to_owned(),
        labels: labels.clone(),
    };
    let created = match call(endpoint, req).await? {
        ControlReply::SnapshotCreated(c) => c,
        ControlReply::Error(e) => return Err(user_error(e)),
        other => anyhow::bail!("unexpected reply {other:?}"),
    };
    let size_bytes = engine_list(endpoint, volume)
        .await
        .ok()
        .and_then(|l| l.into_iter().find(|s| s.name == name))
        .map_or(0, |s| s.allocated_bytes);
    let rec = Snapshot {
        name: name.to_owned(),
        version: 0,
        volume: volume.to_owned(),
        created_unix_ms: created.created_unix_ms,
        labels: labels.into_iter().collect(),
        size_bytes,
    };
    let r = client
        .create(CreateRequest {
            record: Some(Record {
                record: Some(record::Record::Snapshot(rec)),
            }),
        })
        .await;
    if let Err(s) = r {
        if s.code() == tonic::Code::AlreadyExists {
            // Taken meanwhile by another client: undo ours so no layer is left unrecorded.
            let undo = ControlRequest::SnapshotDelete {
                volume: volume.to_owned(),
                name: name.to_owned(),
            };
            let _ = call(endpoint, undo).await;
            return Err(user_error(format!(
                "snapshot {name} already exists (created meanwhile); this one was deleted again"
            )));
        }
        return Err(status_error(addr, &s).context(format!(
            "snapshot {name} was taken but could not be recorded in meta"
        )));
    }
    Ok(CreatedJson {
        name: name.to_owned(),
        volume: volume.to_owned(),
        pause_us: created.pause_us,
        created_unix_ms: created.created_unix_ms,
    })
}

fn create(
    volume: &str,
    name: &str,
    labels: &[String],
    json: bool,
    meta: &MetaAddr,
) -> anyhow::Result<ExitCode> {
    validate(volume, Some(name))?;
    let labels = parse_labels(labels)?;
    let c = block_on(create_async(&meta.addr, volume, name, labels))??;
    if json {
        records::print_json(&c)?;
    } else {
        #[allow(clippy::cast_precision_loss)]
        let ms = c.pause_us as f64 / 1000.0;
        println!(
            "snapshot {} of {} created; writes paused {ms:.1} ms",
            c.name, c.volume
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn list_async(addr: &str, volume: &str) -> anyhow::Result<Vec<SnapshotJson>> {
    let mut client = records::client(addr)?;
    let v = volume_record(&mut client, addr, volume).await?;
    let recs: Vec<Snapshot> = records::list(addr, Kind::Snapshot, Some(volume), None)
        .await?
        .into_iter()
        .filter_map(|r| match r {
            record::Record::Snapshot(s) if s.volume == volume => Some(s),
            _ => None,
        })
        .collect();
    let engine = match endpoint_of(&mut client, addr, &v).await? {
        Some(ep) => Some(engine_list(ep, volume).await?),
        None => None,
    };
    let on = engine
        .as_ref()
        .map(|l| l.iter().map(|s| s.name.clone()).collect::<BTreeSet<_>>());
    let mut out: Vec<SnapshotJson> = Vec::new();
    // The replicas' order (oldest first), then records they do not hold.
    for s in engine.iter().flatten() {
        let rec = recs.iter().find(|r| r.name == s.name);
        out.push(SnapshotJson {
            name: s.name.clone(),
            volume: volume.to_owned(),
            created_unix_ms: s.created_unix_ms,
            labels: s.labels.clone(),
            size_bytes: s.allocated_bytes,
            recorded: rec.is_some(),
            on_replicas: Some(true),
        });
    }
    let mut rest: Vec<&Snapshot> = recs
        .iter()
        .filter(|r| !out.iter().any(|o| o.name == r.name))
        .collect();
    rest.sort_by_key(|r| (r.created_unix_ms, r.name.clone()));
    for r in rest {
        out.push(SnapshotJson {
            name: r.name.clone(),
            volume: volume.to_owned(),
            created_unix_ms: r.created_unix_ms,
            labels: r.labels.clone().into_iter().collect(),
            size_bytes: r.size_bytes,
            recorded: true,
            on_replicas: on.as_ref().map(|n| n.contains(&r.name)),
        });
    }
    Ok(out)
}

fn list(volume: &str, json: bool, meta: &MetaAddr) -> anyhow::Result<ExitCode> {
    validate(volume, None)?;
    let snaps = block_on(list_async(&meta.addr, volume))??;
    if json {
        records::print_json(&snaps)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<32} {:<24} {:>10} {:<8} {:<11} labels",
        "name", "created (unix ms)", "size", "recorded", "on replicas"
    );
    for s in &snaps {
        let on = match s.on_replicas {
            Some(true) => "yes",
            Some(false) => "MISSING",
            None => "-",
        };
        let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<32} {:<24} {:>10} {:<8} {:<11} {}",
            s.name,
            s.created_unix_ms,
            bytesize::ByteSize::b(s.size_bytes).to_string_as(true),
            if s.recorded { "yes" } else { "no" },
            on,
            labels.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn delete_async(addr: &str, volume: &str, name: &str) -> anyhow::Result<()> {
    let mut client = records::client(addr)?;
    let v = volume_record(&mut client, addr, volume).await?;
    let rec = snapshot_record(&mut client, addr, name).await?;
    if let Some(r) = &rec {
        if r.volume != volume {
            return Err(user_error(format!(
                "snapshot {name} belongs to volume {}, not {volume}",
                r.volume
            )));
        }
    }
    let Some(endpoint) = endpoint_of(&mut client, addr, &v).await? else {
        return Err(user_error(format!(
            "volume {volume} is not attached; attach it to delete a snapshot"
        )));
    };
    let on_replicas = engine_list(endpoint, volume)
        .await?
        .iter()
        .any(|s| s.name == name);
    if !on_replicas && rec.is_none() {
        return Err(user_error(format!("no snapshot {name} of volume {volume}")));
    }
    if on_replicas {
        let req = ControlRequest::SnapshotDelete {
            volume: volume.to_owned(),
            name: name.to_owned(),
        };
        match call(endpoint, req).await? {
            ControlReply::Done(_) => {}
            ControlReply::Error(e) => return Err(user_error(e)),
            other => anyhow::bail!("unexpected reply {other:?}"),
        }
    }
    if let Some(r) = rec {
        let req = DeleteRequest {
            key: Some(Key {
                kind: Kind::Snapshot as i32,
                name: name.to_owned(),
            }),
            expected_version: r.version,
        };
        match client.delete(req).await {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(status_error(addr, &s)),
        }
    }
    Ok(())
}

fn delete(volume: &str, name: &str, meta: &MetaAddr) -> anyhow::Result<ExitCode> {
    validate(volume, Some(name))?;
    block_on(delete_async(&meta.addr, volume, name))??;
    println!("snapshot {name} of {volume} deleted");
    Ok(ExitCode::SUCCESS)
}

/// One replica a revert acts on.
struct RevertTarget {
    record: Replica,
    link: Link,
}

async fn revert_async(addr: &str, volume: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let mut client = records::client(addr)?;
    let mut v = volume_record(&mut client, addr, volume).await?;
    if !v.attached_node.is_empty() {
        return Err(user_error(format!(
            "volume {volume} is attached to node {}; detach it before reverting (a revert \
             discards every write since the snapshot)",
            v.attached_node
        )));
    }
    if let Some(r) = snapshot_record(&mut client, addr, name).await? {
        if r.volume != volume {
            return Err(user_error(format!(
                "snapshot {name} belongs to volume {}, not {volume}",
                r.volume
            )));
        }
    }
    // A new epoch, recorded before any replica is touched: an attach racing with this
    // revert raises it again, and its engine's takeover then fences these connections.
    v.epoch += 1;
    let v = crate::volume::update_volume(&mut client, addr, v).await?;
    let nodes = crate::volume_data::up_nodes(addr).await?;
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for r in records::list(addr, Kind::Replica, Some(volume), None).await? {
        let record::Record::Replica(r) = r else {
            continue;
        };
        if r.deleted || r.volume != volume {
            continue;
        }
        let rw = r.mode == ReplicaMode::Rw as i32;
        let reached = match nodes.get(&r.node).map(|n| n.address.parse::<SocketAddr>()) {
            Some(Ok(a)) => tokio::time::timeout(
                REVERT_TIMEOUT,
                Link::connect(a, volume, &r.name, 0, v.epoch, true),
            )
            .await
            .map_err(|_| "no answer".to_owned())
            .and_then(|c| c.map_err(|e| e.to_string())),
            _ => Err(format!("node {} is not up", r.node)),
        };
        let link = match reached {
            Ok((link, _)) => link,
            Err(e) if rw => {
                return Err(user_error(format!(
                    "cannot revert {volume}: RW replica {} is unreachable ({e}); nothing was \
                     changed",
                    r.name
                )))
            }
            Err(e) => {
                skipped.push(format!("{} ({e}; it is rebuilt when it returns)", r.name));
                continue;
            }
        };
        let holds =
            match tokio::time::timeout(REVERT_TIMEOUT, link.submit(Request::SnapshotList)).await {
                Ok(Ok(ReplyBody::Snapshots(l))) => l.iter().any(|s| s.name == name),
                other => anyhow::bail!("replica {}: SnapshotList answered {other:?}", r.name),
            };
        if !holds {
            if rw {
                return Err(user_error(format!(
                    "no snapshot {name} on replica {} of volume {volume}; nothing was changed",
                    r.name
                )));
            }
            skipped.push(format!(
                "{} (lacks {name}; it is rebuilt at the next attach)",
                r.name
            ));
            continue;
        }
        targets.push(RevertTarget { record: r, link });
    }
    if targets.is_empty() {
        return Err(user_error(format!(
            "volume {volume} has no replica to revert"
        )));
    }
    let mut failed = Vec::new();
    for t in &targets {
        let req = Request::SnapshotRevert {
            name: name.to_owned(),
        };
        match tokio::time::timeout(REVERT_TIMEOUT, t.link.submit(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failed.push((t.record.clone(), e.to_string())),
            Err(_) => failed.push((t.record.clone(), "no answer".into())),
        }
    }
    if failed.len() == targets.len() {
        let why: Vec<String> = failed
            .iter()
            .map(|(r, e)| format!("{}: {e}", r.name))
            .collect();
        anyhow::bail!("no replica reverted: {}", why.join("; "));
    }
    // A replica that did not revert holds other data than the rest: out until rebuilt.
    for (mut r, e) in failed {
        tracing::warn!(replica = %r.name, error = %e, "revert failed; marking the replica ERR");
        skipped.push(format!(
            "{} (revert failed: {e}; marked ERR, rebuilt at the next attach)",
            r.name
        ));
        r.mode = ReplicaMode::Err as i32;
        let rec = Record {
            record: Some(record::Record::Replica(r)),
        };
        client
            .update(UpdateRequest { record: Some(rec) })
            .await
            .map_err(|s| status_error(addr, &s))?;
    }
    Ok(skipped)
}

fn revert(volume: &str, name: &str, meta: &MetaAddr) -> anyhow::Result<ExitCode> {
    validate(volume, Some(name))?;
    let skipped = block_on(revert_async(&meta.addr, volume, name))??;
    for s in &skipped {
        eprintln!("warning: replica {s}");
    }
    println!("volume {volume} reverted to snapshot {name}");
    Ok(ExitCode::SUCCESS)
}

/// `cairn volume snapshot create` (a control endpoint directly, no record): prints what the
/// engine did and the pause.
pub fn create_at_endpoint(
    endpoint: SocketAddr,
    volume: &str,
    name: &str,
) -> anyhow::Result<ExitCode> {
    let req = ControlRequest::SnapshotCreate {
        volume: volume.to_owned(),
        name: name.to_owned(),
        labels: BTreeMap::new(),
    };
    match control::call(endpoint, &req)? {
        ControlReply::SnapshotCreated(c) => {
            println!(
                "snapshot {} created (writes paused {} us)",
                c.name, c.pause_us
            );
            Ok(ExitCode::SUCCESS)
        }
        ControlReply::Error(e) => anyhow::bail!(e),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}
