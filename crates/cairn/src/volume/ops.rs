//! The volume operations on meta that the CLI, the CSI driver, snapshots, backups, volume
//! fills and `cairn dev` share: create, get, update, attach (and wait until served),
//! detach, delete, and marking a fill done.
//!
//! Each operation validates its arguments with `cairn_proto` before any RPC. Errors that
//! are the caller's (no such volume, already exists, attached elsewhere, changed meanwhile)
//! are [`records::UserError`]s; meta being unreachable or failing is not. Assumes `addr` is
//! a meta address; waits are bounded (scheduling 5-10 s, deletion 60 s, serving `timeout`).

use std::net::SocketAddr;

use anyhow::Context;
use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::{
    record, CreateRequest, DataLocality, GetRequest, Key, Kind, Record, UpdateRequest, Volume,
    VolumeState,
};
use tonic::transport::Channel;

use crate::control::{self, ControlReply, ControlRequest};
use crate::records::{self, status_error, user_error};

/// Checks a new volume's name, size and replica count before any RPC.
pub fn validate_new(name: &str, size: u64, replicas: u32) -> anyhow::Result<()> {
    cairn_proto::validate_name("volume name", name).map_err(|e| user_error(e.to_string()))?;
    cairn_proto::validate_volume_size(size).map_err(|e| user_error(format!("--size: {e}")))?;
    if replicas == 0 {
        return Err(user_error(format!(
            "--replicas: {}",
            cairn_proto::ValidationError::ZeroReplicas
        )));
    }
    Ok(())
}

/// `Volume.stale_replica_timeout_seconds` for `--stale-replica-timeout`: 0 (the cluster
/// default) for `None`, else whole seconds from 1 s to
/// [`cairn_proto::MAX_STALE_REPLICA_TIMEOUT_SECS`]; anything else is a user error.
pub fn stale_timeout_seconds(timeout: Option<std::time::Duration>) -> anyhow::Result<u64> {
    let Some(t) = timeout else { return Ok(0) };
    if t.subsec_nanos() != 0 || t.as_secs() == 0 {
        return Err(user_error(format!(
            "--stale-replica-timeout: {} is not a whole number of seconds of at least 1s \
             (omit it for the cluster default)",
            humantime::format_duration(t)
        )));
    }
    cairn_proto::validate_stale_replica_timeout(t.as_secs())
        .map_err(|e| user_error(format!("--stale-replica-timeout: {e}")))?;
    Ok(t.as_secs())
}

/// Creates the volume record and waits (up to 5 s) until the scheduler placed it; prints a
/// warning when it could not place every replica. Returns the record as then stored.
/// `stale_replica_timeout`: how long a replica on a down node is waited for (after the
/// node-down timeout) before it is replaced; `None` for the cluster default.
pub async fn create_async(
    addr: &str,
    name: &str,
    size: u64,
    replicas: u32,
    data_locality: DataLocality,
    stale_replica_timeout: Option<std::time::Duration>,
) -> anyhow::Result<Volume> {
    create_filling_async(
        addr,
        name,
        size,
        replicas,
        data_locality,
        stale_replica_timeout,
        "",
    )
    .await
}

/// [`create_async`] of a volume that a fill will write next: the record carries
/// `filling_from` (what it is filled from) from its creation until [`fill_done`].
pub async fn create_filling_async(
    addr: &str,
    name: &str,
    size: u64,
    replicas: u32,
    data_locality: DataLocality,
    stale_replica_timeout: Option<std::time::Duration>,
    filling_from: &str,
) -> anyhow::Result<Volume> {
    validate_new(name, size, replicas)?;
    let stale_replica_timeout_seconds = stale_timeout_seconds(stale_replica_timeout)?;
    let rec = Record {
        record: Some(record::Record::Volume(Volume {
            name: name.to_owned(),
            size_bytes: size,
            replica_count: replicas,
            state: VolumeState::Creating as i32,
            state_reason: "waiting for scheduling".into(),
            data_locality: data_locality as i32,
            stale_replica_timeout_seconds,
            filling_from: filling_from.to_owned(),
            ..Default::default()
        })),
    };
    let mut client = records::client(addr)?;
    client
        .create(CreateRequest { record: Some(rec) })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::AlreadyExists => user_error(format!("volume {name} already exists")),
            _ => status_error(addr, &s),
        })?;
    // Say at once when the replicas cannot all be placed (too few nodes or space): the
    // scheduler decides within a tick; an answer after 5 s is left to `volume get`.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let placed = loop {
        let v = get_volume_async(&mut client, addr, name).await?;
        let scheduled =
            v.state != VolumeState::Creating as i32 || v.state_reason.contains("placed");
        if scheduled || tokio::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    if placed.state != VolumeState::Healthy as i32 && !placed.state_reason.is_empty() {
        eprintln!(
            "warning: volume {name} is {}: {}",
            VolumeState::try_from(placed.state).map_or("unknown", |s| s.cli_name()),
            placed.state_reason
        );
    }
    Ok(placed)
}

/// Marks the fill of volume `name` complete (clears `filling_from`).
pub async fn fill_done(addr: &str, name: &str) -> anyhow::Result<()> {
    let mut client = records::client(addr)?;
    change_volume(&mut client, addr, name, |v| {
        Ok(!std::mem::take(&mut v.filling_from).is_empty())
    })
    .await
    .map(drop)
}

/// Reads volume `name`, lets `change` edit it (it returns whether it changed anything) and
/// writes it back from the version read; a concurrent write (an agent or a controller
/// updating the record) makes it read and decide again. Returns the record as stored.
pub async fn change_volume(
    client: &mut MetaClient<Channel>,
    addr: &str,
    name: &str,
    mut change: impl FnMut(&mut Volume) -> anyhow::Result<bool>,
) -> anyhow::Result<Volume> {
    for _ in 0..20 {
        let mut v = get_volume_async(client, addr, name).await?;
        if !change(&mut v)? {
            return Ok(v);
        }
        let req = UpdateRequest {
            record: Some(Record {
                record: Some(record::Record::Volume(v)),
            }),
        };
        match client.update(req).await {
            Ok(r) => match r.into_inner().record.and_then(|r| r.record) {
                Some(record::Record::Volume(v)) => return Ok(v),
                other => anyhow::bail!("meta answered Update of volume {name} with {other:?}"),
            },
            // A version conflict: read it again.
            Err(s) if s.code() == tonic::Code::Aborted => continue,
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(user_error(format!("no volume {name}")))
            }
            Err(s) => return Err(status_error(addr, &s)),
        }
    }
    anyhow::bail!("volume {name} kept changing under 20 attempts to update it")
}

/// The volume record `name`; a [`records::UserError`] when there is none.
pub async fn get_volume_async(
    client: &mut MetaClient<Channel>,
    addr: &str,
    name: &str,
) -> anyhow::Result<Volume> {
    get_record(client, addr, Kind::Volume, name)
        .await
        .and_then(|r| match r {
            record::Record::Volume(v) => Ok(v),
            other => anyhow::bail!("meta answered Get of volume {name} with {other:?}"),
        })
}

/// Record `name` of `kind`; a [`records::UserError`] when there is none.
pub(super) async fn get_record(
    client: &mut MetaClient<Channel>,
    addr: &str,
    kind: Kind,
    name: &str,
) -> anyhow::Result<record::Record> {
    let resp = client
        .get(GetRequest {
            key: Some(Key {
                kind: kind as i32,
                name: name.to_owned(),
            }),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => user_error(format!("no {} {name}", kind.cli_name())),
            _ => status_error(addr, &s),
        })?;
    resp.into_inner()
        .record
        .and_then(|r| r.record)
        .with_context(|| {
            format!(
                "meta answered Get of {} {name} with nothing",
                kind.cli_name()
            )
        })
}

pub async fn update_volume(
    client: &mut MetaClient<Channel>,
    addr: &str,
    v: Volume,
) -> anyhow::Result<Volume> {
    let name = v.name.clone();
    let resp = client
        .update(UpdateRequest {
            record: Some(Record {
                record: Some(record::Record::Volume(v)),
            }),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => user_error(format!("no volume {name}")),
            tonic::Code::Aborted => {
                user_error(format!("volume {name} changed meanwhile; try again"))
            }
            _ => status_error(addr, &s),
        })?;
    match resp.into_inner().record.and_then(|r| r.record) {
        Some(record::Record::Volume(v)) => Ok(v),
        other => anyhow::bail!("meta answered Update of volume {name} with {other:?}"),
    }
}

/// Records the attachment of `name` to `node` (raising the epoch) and returns the volume as
/// stored and the node. Attaching to the node it is attached to already changes nothing.
pub async fn attach_async(
    addr: &str,
    name: &str,
    node: &str,
) -> anyhow::Result<(Volume, cairn_proto::v1::Node)> {
    cairn_proto::validate_name("volume name", name).map_err(|e| user_error(e.to_string()))?;
    let mut client = records::client(addr)?;
    let n = match get_record(&mut client, addr, Kind::Node, node).await? {
        record::Record::Node(n) => n,
        other => anyhow::bail!("meta answered Get of node {node} with {other:?}"),
    };
    let mut v = get_volume_async(&mut client, addr, name).await?;
    // Just created: the scheduler places its replicas within a tick.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while v.state == VolumeState::Creating as i32
        && !v.state_reason.contains("placed")
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        v = get_volume_async(&mut client, addr, name).await?;
    }
    if v.attached_node == node {
        return Ok((v, n));
    }
    if !v.attached_node.is_empty() {
        return Err(user_error(format!(
            "volume {name} is attached to node {}; detach it first (one attachment at a time)",
            v.attached_node
        )));
    }
    match VolumeState::try_from(v.state) {
        Ok(VolumeState::Deleting) => {
            return Err(user_error(format!("volume {name} is being deleted")))
        }
        Ok(VolumeState::Creating) => {
            return Err(user_error(format!(
                "volume {name} has no replicas placed yet ({})",
                v.state_reason
            )))
        }
        _ => {}
    }
    if n.state != cairn_proto::v1::NodeState::Up as i32 {
        return Err(user_error(format!(
            "node {node} is down ({})",
            n.state_reason
        )));
    }
    if n.nbd_address.is_empty() {
        return Err(user_error(format!("node {node} has no agent serving NBD")));
    }
    v.attached_node = node.to_owned();
    v.epoch += 1;
    let v = update_volume(&mut client, addr, v).await?;
    Ok((v, n))
}

/// Waits until the node's agent serves volume `v` at or above its epoch.
pub async fn wait_served(
    node: &cairn_proto::v1::Node,
    v: &Volume,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let served = poll_status(node, &v.name, timeout, |s| {
        let epoch = s
            .get("epoch")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        (epoch < v.epoch).then(|| format!("the engine runs at epoch {epoch}, below {}", v.epoch))
    })
    .await?;
    served.map_err(|last| {
        anyhow::anyhow!(
            "node {} did not serve volume {} within {timeout:?}: {last}",
            node.name,
            v.name
        )
    })
}

/// Asks `node`'s control endpoint for the status of volume `name` every 100 ms until
/// `pending` finds nothing missing in it (returns `None`), or `timeout` passes: then
/// `Ok(Err(last))`, with what `pending` or the endpoint said last.
pub(super) async fn poll_status(
    node: &cairn_proto::v1::Node,
    name: &str,
    timeout: std::time::Duration,
    pending: impl Fn(&serde_json::Value) -> Option<String>,
) -> anyhow::Result<Result<(), String>> {
    let endpoint: SocketAddr = node
        .control_address
        .parse()
        .with_context(|| format!("node {} has no control address", node.name))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let req = ControlRequest::Status {
            volume: name.to_owned(),
        };
        let r = tokio::task::spawn_blocking(move || control::call(endpoint, &req)).await?;
        let last = match r {
            Ok(ControlReply::Status(s)) => match pending(&s) {
                None => return Ok(Ok(())),
                Some(why) => why,
            },
            Ok(ControlReply::Error(e)) => e,
            Ok(other) => format!("{other:?}"),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            return Ok(Err(last));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Records that volume `name` is detached (its node's agent then flushes and stops the
/// engine). Detaching a detached volume changes nothing.
pub async fn detach_async(addr: &str, name: &str) -> anyhow::Result<()> {
    let mut client = records::client(addr)?;
    change_volume(&mut client, addr, name, |v| {
        Ok(!std::mem::take(&mut v.attached_node).is_empty())
    })
    .await
    .map(drop)
}

/// Deletes volume `name` (refused while attached) and waits until meta removed the record.
pub async fn delete_async(addr: &str, name: &str) -> anyhow::Result<()> {
    let mut client = records::client(addr)?;
    change_volume(&mut client, addr, name, |v| {
        if !v.attached_node.is_empty() {
            return Err(user_error(format!(
                "volume {name} is attached to node {}; detach it first",
                v.attached_node
            )));
        }
        if v.state == VolumeState::Deleting as i32 {
            return Ok(false);
        }
        v.state = VolumeState::Deleting as i32;
        v.state_reason = "deleting: replicas are being removed".into();
        Ok(true)
    })
    .await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match get_volume_async(&mut client, addr, name).await {
            Err(e) if e.downcast_ref::<records::UserError>().is_some() => return Ok(()),
            Err(e) => return Err(e),
            Ok(_) if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("volume {name} is still DELETING after 60 s (is meta's leader running its controllers?)")
            }
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}
