//! Growing a volume (`cairn volume expand`, CSI ControllerExpandVolume): the record's size
//! is raised (never lowered), then, when the volume is attached, the attached node's engine
//! is waited for until it serves the new size.
//!
//! The size only changes through a compare-and-set Update of the version read, so a
//! concurrent writer (controllers, agents) is retried, never overwritten. Errors that are
//! the caller's carry an [`ExpandError`].

use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::{record, GetRequest, Key, Kind, Record, UpdateRequest, Volume, VolumeState};
use tonic::transport::Channel;

use super::ops::{get_record, poll_status};
use crate::records::{self, status_error, user_error};

/// Why [`expand_async`] refused or did not finish. The CSI controller maps these to gRPC
/// codes (NotFound, OutOfRange / InvalidArgument, FailedPrecondition, DeadlineExceeded);
/// the CLI prints all but `NotServed` as a user error (exit 1).
#[derive(Debug)]
pub enum ExpandError {
    /// No such volume.
    NotFound(String),
    /// Not a valid volume size.
    BadSize(cairn_proto::ValidationError),
    /// Below the current size.
    Shrink {
        name: String,
        current: u64,
        requested: u64,
    },
    /// The volume is being deleted.
    Deleting(String),
    /// The record holds the new size, but the attached engine did not serve it in time
    /// (it may still: the agent retries).
    NotServed {
        name: String,
        size: u64,
        node: String,
        waited: std::time::Duration,
        last: String,
    },
}

impl std::fmt::Display for ExpandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpandError::NotFound(v) => write!(f, "volume {v} not found"),
            ExpandError::BadSize(e) => write!(f, "--size: {e}"),
            ExpandError::Shrink {
                name,
                current,
                requested,
            } => write!(
                f,
                "volume {name} is {current} bytes; it cannot shrink to {requested} bytes \
                 (volumes only grow)"
            ),
            ExpandError::Deleting(v) => write!(f, "volume {v} is being deleted"),
            ExpandError::NotServed {
                name,
                size,
                node,
                waited,
                last,
            } => write!(
                f,
                "volume {name} is recorded at {size} bytes, but the engine on node {node} did \
                 not serve that size within {}: {last}",
                humantime::format_duration(*waited)
            ),
        }
    }
}

impl std::error::Error for ExpandError {}

/// How long [`expand_async`] waits for the attached engine.
pub const EXPAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Grows volume `name` to `new_size` bytes (see `cairn volume expand`) and returns the
/// volume's size afterwards. Writes the record's size (from the version read; retried on a
/// concurrent change), then, when the volume is attached, waits (up to [`EXPAND_TIMEOUT`])
/// until the attached node's engine serves the new size. The current size is a no-op
/// success (it still waits for an attached engine that has not caught up). Errors that
/// are the caller's carry an [`ExpandError`].
pub async fn expand_async(meta_addr: &str, name: &str, new_size: u64) -> anyhow::Result<u64> {
    expand_with_timeout(meta_addr, name, new_size, EXPAND_TIMEOUT).await
}

/// [`expand_async`] with a chosen wait for the attached engine.
pub async fn expand_with_timeout(
    meta_addr: &str,
    name: &str,
    new_size: u64,
    timeout: std::time::Duration,
) -> anyhow::Result<u64> {
    cairn_proto::validate_name("volume name", name).map_err(|e| user_error(e.to_string()))?;
    cairn_proto::validate_volume_size(new_size).map_err(ExpandError::BadSize)?;
    let mut client = records::client(meta_addr)?;
    let mut conflicts = 0;
    let v = loop {
        let got = client
            .get(GetRequest {
                key: Some(Key {
                    kind: Kind::Volume as i32,
                    name: name.to_owned(),
                }),
            })
            .await;
        let v = match got.map(|r| r.into_inner().record.and_then(|r| r.record)) {
            Ok(Some(record::Record::Volume(v))) => v,
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(ExpandError::NotFound(name.to_owned()).into())
            }
            Err(s) => return Err(status_error(meta_addr, &s)),
            Ok(other) => anyhow::bail!("meta answered Get of volume {name} with {other:?}"),
        };
        if v.state == VolumeState::Deleting as i32 {
            return Err(ExpandError::Deleting(name.to_owned()).into());
        }
        if new_size < v.size_bytes {
            return Err(ExpandError::Shrink {
                name: name.to_owned(),
                current: v.size_bytes,
                requested: new_size,
            }
            .into());
        }
        if new_size == v.size_bytes {
            break v;
        }
        let mut grown = v;
        grown.size_bytes = new_size;
        let req = UpdateRequest {
            record: Some(Record {
                record: Some(record::Record::Volume(grown)),
            }),
        };
        match client.update(req).await {
            Ok(r) => match r.into_inner().record.and_then(|r| r.record) {
                Some(record::Record::Volume(v)) => break v,
                other => anyhow::bail!("meta answered Update of volume {name} with {other:?}"),
            },
            // Changed since it was read (the controllers write its state, agents its
            // epoch): read it again.
            Err(s) if s.code() == tonic::Code::Aborted && conflicts < 20 => conflicts += 1,
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(ExpandError::NotFound(name.to_owned()).into())
            }
            Err(s) => return Err(status_error(meta_addr, &s)),
        }
    };
    if !v.attached_node.is_empty() {
        wait_size(&mut client, meta_addr, &v, timeout).await?;
    }
    Ok(v.size_bytes)
}

/// Waits until the engine of attached volume `v` (on its node, through the control
/// endpoint) serves at least `v.size_bytes`.
async fn wait_size(
    client: &mut MetaClient<Channel>,
    meta_addr: &str,
    v: &Volume,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let node = &v.attached_node;
    let n = match get_record(client, meta_addr, Kind::Node, node).await? {
        record::Record::Node(n) => n,
        other => anyhow::bail!("meta answered Get of node {node} with {other:?}"),
    };
    let served = poll_status(&n, &v.name, timeout, |s| {
        match s.get("size").and_then(serde_json::Value::as_u64) {
            Some(size) if size >= v.size_bytes => None,
            Some(size) => Some(format!("it serves {size} bytes")),
            None => Some("its status has no size".to_owned()),
        }
    })
    .await?;
    served.map_err(|last| {
        ExpandError::NotServed {
            name: v.name.clone(),
            size: v.size_bytes,
            node: node.clone(),
            waited: timeout,
            last,
        }
        .into()
    })
}
