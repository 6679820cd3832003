//! `cairn volume status|verify|replica|rebuild|snapshot`: a running volume looked at and
//! changed through the control endpoint of the node running its engine.
//!
//! The endpoint is `--endpoint` when given, else the attached node's (asked of meta at its
//! default address), else the standalone `cairn dev`'s. Nothing here writes meta.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::{record, Kind};
use clap::Subcommand;

use super::ops::{get_record, get_volume_async};
use crate::control::{self, ControlReply, ControlRequest, DEFAULT_ENDPOINT};
use crate::records::{self, block_on, user_error};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Freeze the volume's current content as snapshot NAME on every replica.
    Create {
        /// Volume name.
        volume: String,
        /// Snapshot name: 1-255 of [A-Za-z0-9._:-].
        name: String,
        /// Control endpoint of the node running the volume's engine. Default: the attached
        /// node's, asked of meta at 127.0.0.1:10811; without meta (`cairn dev --standalone`)
        /// 127.0.0.1:10810.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
    /// Delete snapshot NAME (its data merges into the next layer; content is unchanged).
    Delete {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
        /// Control endpoint of the node running the volume's engine. Default: the attached
        /// node's, asked of meta at 127.0.0.1:10811; without meta (`cairn dev --standalone`)
        /// 127.0.0.1:10810.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
    /// List snapshots, oldest first.
    List {
        /// Volume name.
        volume: String,
        /// Control endpoint of the node running the volume's engine. Default: the attached
        /// node's, asked of meta at 127.0.0.1:10811; without meta (`cairn dev --standalone`)
        /// 127.0.0.1:10810.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Add the replica server at ADDR to the volume: it is rebuilt from an RW replica while
    /// the volume serves, then turns RW. Prints the new replica's id.
    Add {
        /// Volume name.
        volume: String,
        /// Address of a running `cairn replica serve`.
        #[arg(long)]
        address: SocketAddr,
        /// Id of the new replica (default: the next free rN).
        #[arg(long)]
        id: Option<String>,
        /// Wait (showing progress) until the replica is RW.
        #[arg(long)]
        wait: bool,
        /// Control endpoint of the node running the volume's engine. Default: the attached
        /// node's, asked of meta at 127.0.0.1:10811; without meta (`cairn dev --standalone`)
        /// 127.0.0.1:10810.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
    /// Take a replica out of the volume (its data stays on its server). The last RW replica
    /// cannot be removed.
    Remove {
        /// Volume name.
        volume: String,
        /// Replica id.
        replica: String,
        /// Control endpoint of the node running the volume's engine. Default: the attached
        /// node's, asked of meta at 127.0.0.1:10811; without meta (`cairn dev --standalone`)
        /// 127.0.0.1:10810.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RebuildCommand {
    /// Show a replica's rebuild progress until it is RW; exit 1 if its rebuild is
    /// cancelled or the time runs out.
    Wait {
        /// Volume name.
        volume: String,
        /// Replica id.
        replica: String,
        /// Give up after this long.
        #[arg(long, default_value = "1h")]
        timeout: humantime::Duration,
        /// Control endpoint of the node running the volume's engine. Default: the attached
        /// node's, asked of meta at 127.0.0.1:10811; without meta (`cairn dev --standalone`)
        /// 127.0.0.1:10810.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
    /// Stop a running rebuild or resync; the replica goes to ERR and waits for `start`.
    Cancel {
        /// Volume name.
        volume: String,
        /// Replica id.
        replica: String,
        /// Control endpoint of the node running the volume's engine. Default: the attached
        /// node's, asked of meta at 127.0.0.1:10811; without meta (`cairn dev --standalone`)
        /// 127.0.0.1:10810.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
    /// Bring an ERR replica back now (after a cancel, or to skip the retry backoff).
    Start {
        /// Volume name.
        volume: String,
        /// Replica id.
        replica: String,
        /// Control endpoint of the node running the volume's engine. Default: the attached
        /// node's, asked of meta at 127.0.0.1:10811; without meta (`cairn dev --standalone`)
        /// 127.0.0.1:10810.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
    /// Limit the bytes per second rebuilds copy (e.g. 20MiB; 0 for no limit).
    Rate {
        /// Volume name.
        volume: String,
        /// Bytes per second.
        rate: bytesize::ByteSize,
        /// Control endpoint of the node running the volume's engine. Default: the attached
        /// node's, asked of meta at 127.0.0.1:10811; without meta (`cairn dev --standalone`)
        /// 127.0.0.1:10810.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
}

/// `cairn volume status`.
pub(super) fn status(
    volume: String,
    json: bool,
    endpoint: Option<SocketAddr>,
) -> anyhow::Result<ExitCode> {
    match control::call(at(endpoint, &volume)?, &ControlRequest::Status { volume })? {
        ControlReply::Status(v) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let s = control::parse_status(v)?;
            println!(
                "volume {}  size {} ({})  epoch {}  read repairs {}",
                s.volume,
                s.size,
                bytesize::ByteSize::b(s.size).to_string_as(true),
                s.epoch,
                s.read_repairs
            );
            println!(
                "{:<8} {:<22} {:<4} {:>10} {:>10} {:>7} {:>8} {:>12}  last error",
                "replica", "address", "mode", "reads", "writes", "errors", "corrupt", "last resync"
            );
            for r in s.replicas {
                println!(
                    "{:<8} {:<22} {:<4} {:>10} {:>10} {:>7} {:>8} {:>12}  {}",
                    r.id,
                    r.addr,
                    r.mode,
                    r.reads,
                    r.writes,
                    r.errors,
                    r.corrupt_reads,
                    bytesize::ByteSize::b(r.last_resync_bytes).to_string_as(true),
                    r.last_error.unwrap_or_default()
                );
                if let Some(j) = r.rebuild {
                    #[allow(clippy::cast_precision_loss)]
                    let pct = if j.bytes_total > 0 {
                        100.0 * j.bytes_done as f64 / j.bytes_total as f64
                    } else {
                        0.0
                    };
                    println!(
                        "         {} {} ({}) from {}: {:.1}% of {}, {} copied, {}/s{}",
                        j.kind,
                        j.state,
                        j.phase,
                        j.source,
                        pct,
                        bytesize::ByteSize::b(j.bytes_total).to_string_as(true),
                        bytesize::ByteSize::b(j.bytes_copied).to_string_as(true),
                        bytesize::ByteSize::b(j.rate_bytes_per_sec).to_string_as(true),
                        j.error.map(|e| format!(": {e}")).unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ControlReply::Error(e) => anyhow::bail!(e),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

/// `cairn volume verify`.
pub(super) fn verify(volume: String, endpoint: Option<SocketAddr>) -> anyhow::Result<ExitCode> {
    match control::call(at(endpoint, &volume)?, &ControlRequest::Verify { volume })? {
        ControlReply::Verify(digests) => {
            let mut seen = std::collections::BTreeSet::new();
            let mut failed = digests.is_empty();
            for d in &digests {
                match (&d.digest, &d.error) {
                    (Some(h), _) => {
                        println!("{}  {}  {}", d.replica, h, d.size.unwrap_or(0));
                        seen.insert((h.clone(), d.size));
                    }
                    (None, e) => {
                        println!("{}  error: {}", d.replica, e.clone().unwrap_or_default());
                        failed = true;
                    }
                }
            }
            if failed || seen.len() != 1 {
                println!("replicas DIFFER or could not be read");
                Ok(ExitCode::from(1))
            } else {
                println!("{} RW replicas identical", digests.len());
                Ok(ExitCode::SUCCESS)
            }
        }
        ControlReply::Error(e) => anyhow::bail!(e),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

/// `cairn volume replica ...`.
pub(super) fn replica(cmd: ReplicaCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ReplicaCommand::Add {
            volume,
            address,
            id,
            wait,
            endpoint,
        } => {
            let req = ControlRequest::ReplicaAdd {
                volume: volume.clone(),
                address,
                id,
            };
            let endpoint = at(endpoint, &volume)?;
            let id = change(endpoint, &req)?;
            println!("{id}");
            if wait {
                return wait_rw(endpoint, &volume, &id, std::time::Duration::from_secs(3600));
            }
            Ok(ExitCode::SUCCESS)
        }
        ReplicaCommand::Remove {
            volume,
            replica,
            endpoint,
        } => report_change(
            at(endpoint, &volume)?,
            &ControlRequest::ReplicaRemove { volume, replica },
        ),
    }
}

/// `cairn volume rebuild ...`.
pub(super) fn rebuild(cmd: RebuildCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RebuildCommand::Wait {
            volume,
            replica,
            timeout,
            endpoint,
        } => wait_rw(at(endpoint, &volume)?, &volume, &replica, *timeout),
        RebuildCommand::Cancel {
            volume,
            replica,
            endpoint,
        } => report_change(
            at(endpoint, &volume)?,
            &ControlRequest::RebuildCancel { volume, replica },
        ),
        RebuildCommand::Start {
            volume,
            replica,
            endpoint,
        } => report_change(
            at(endpoint, &volume)?,
            &ControlRequest::RebuildStart { volume, replica },
        ),
        RebuildCommand::Rate {
            volume,
            rate,
            endpoint,
        } => {
            let endpoint = at(endpoint, &volume)?;
            let req = ControlRequest::RebuildRate {
                volume,
                bytes_per_sec: rate.as_u64(),
            };
            report_change(endpoint, &req)
        }
    }
}

/// `cairn volume snapshot ...`.
pub(super) fn snapshot(cmd: SnapshotCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCommand::Create {
            volume,
            name,
            endpoint,
        } => crate::snapshot::create_at_endpoint(at(endpoint, &volume)?, &volume, &name),
        SnapshotCommand::Delete {
            volume,
            name,
            endpoint,
        } => report_change(
            at(endpoint, &volume)?,
            &ControlRequest::SnapshotDelete { volume, name },
        ),
        SnapshotCommand::List { volume, endpoint } => match control::call(
            at(endpoint, &volume)?,
            &ControlRequest::SnapshotList { volume },
        )? {
            ControlReply::Snapshots(list) => {
                for s in list {
                    println!(
                        "{}  created {}  {} bytes",
                        s.name, s.created_unix_ms, s.allocated_bytes
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            ControlReply::Error(e) => anyhow::bail!(e),
            other => anyhow::bail!("unexpected reply {other:?}"),
        },
    }
}

/// Sends a request that changes something and prints what was done.
fn report_change(endpoint: SocketAddr, req: &ControlRequest) -> anyhow::Result<ExitCode> {
    println!("{}", change(endpoint, req)?);
    Ok(ExitCode::SUCCESS)
}

fn change(endpoint: SocketAddr, req: &ControlRequest) -> anyhow::Result<String> {
    match control::call(endpoint, req)? {
        ControlReply::Done(what) => Ok(what),
        ControlReply::Error(e) => anyhow::bail!(e),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

fn status_of(endpoint: SocketAddr, volume: &str) -> anyhow::Result<control::VolumeStatusView> {
    match control::call(
        endpoint,
        &ControlRequest::Status {
            volume: volume.to_owned(),
        },
    )? {
        ControlReply::Status(v) => control::parse_status(v),
        ControlReply::Error(e) => anyhow::bail!(e),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

/// Polls the status until `replica` is RW, drawing its job's progress.
fn wait_rw(
    endpoint: SocketAddr,
    volume: &str,
    replica: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )?
        .progress_chars("=> "),
    );
    bar.set_prefix(replica.to_owned());
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let s = status_of(endpoint, volume)?;
        let r = s
            .replicas
            .iter()
            .find(|r| r.id == replica)
            .with_context(|| format!("no replica {replica} in {volume}"))?;
        if let Some(j) = &r.rebuild {
            bar.set_length(j.bytes_total);
            bar.set_position(j.bytes_done);
            bar.set_message(format!("{} {} from {}", j.kind, j.phase, j.source));
        }
        if r.mode == "RW" {
            bar.finish_with_message("RW");
            println!(
                "{replica} is RW; last rebuild/resync copied {} bytes",
                r.last_resync_bytes
            );
            return Ok(ExitCode::SUCCESS);
        }
        if !r.auto_heal {
            bar.abandon_with_message("cancelled");
            println!("{replica} is {}: its rebuild was cancelled", r.mode);
            return Ok(ExitCode::from(1));
        }
        if std::time::Instant::now() > deadline {
            bar.abandon_with_message("timed out");
            let err = r.rebuild.as_ref().and_then(|j| j.error.clone());
            println!(
                "{replica} is still {} ({})",
                r.mode,
                err.unwrap_or_default()
            );
            return Ok(ExitCode::from(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The control endpoint for `volume`: `given`, else the attached node's (asked of meta at
/// its default address), else the standalone `cairn dev`'s default endpoint.
fn at(given: Option<SocketAddr>, volume: &str) -> anyhow::Result<SocketAddr> {
    if let Some(e) = given {
        return Ok(e);
    }
    let fallback: SocketAddr = DEFAULT_ENDPOINT.parse()?;
    let meta = records::DEFAULT_META;
    let found = block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{meta}"))?
            .connect_timeout(std::time::Duration::from_secs(1))
            .timeout(std::time::Duration::from_secs(5))
            .connect()
            .await;
        // No meta here: a standalone `cairn dev`.
        let Ok(ch) = ch else { return anyhow::Ok(None) };
        let mut client = MetaClient::new(ch);
        let v = match get_volume_async(&mut client, meta, volume).await {
            Ok(v) => v,
            Err(e) if e.downcast_ref::<records::UserError>().is_some() => return Ok(None),
            Err(e) => return Err(e),
        };
        if v.attached_node.is_empty() {
            return Err(user_error(format!(
                "volume {volume} is not attached, so no engine runs it (cairn volume attach {volume} --node NODE)"
            )));
        }
        match get_record(&mut client, meta, Kind::Node, &v.attached_node).await? {
            record::Record::Node(n) => Ok(n.control_address.parse().ok()),
            _ => Ok(None),
        }
    })??;
    Ok(found.unwrap_or(fallback))
}
