//! `cairn volume ...`: volume records in the metadata service (`create`, `list`, `get`,
//! `delete`, through `--meta`), and a running volume looked at through the control endpoint
//! of `cairn dev` (`status`, `verify`, `replica`, `rebuild`, `snapshot`).
//!
//! The record commands validate names and sizes with `cairn_proto` before any RPC, so a bad
//! argument is refused with a message naming it even when meta is down.
//!
//! The cluster operations behind the record commands live in `ops` (and `expand`), shared
//! with the CSI driver, snapshots, backups and `cairn dev` through the re-exports below;
//! the running-volume commands in `running`.

mod expand;
mod ops;
mod running;

pub use expand::{expand_async, expand_with_timeout, ExpandError};
pub use ops::{
    attach_async, create_async, create_filling_async, delete_async, detach_async, fill_done,
    get_volume_async, stale_timeout_seconds, update_volume, validate_new, wait_served,
};

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use cairn_proto::v1::{record, DataLocality, GetRequest, Key, Kind, Volume};

use crate::records::{self, block_on, run_cli, status_error, user_error, MetaAddr, VolumeJson};
use crate::volume_data::{self, NewVolume, ReplicaSnapshot};
use running::{RebuildCommand, ReplicaCommand, SnapshotCommand};

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume record in meta (state `creating` until it is scheduled); prints its
    /// name. With `--from-snapshot` the new volume is a clone: it gets its own replicas and
    /// is filled with the snapshot's content (attached to a node while it is copied, then
    /// detached; deleted again if the copy fails).
    Create {
        /// Volume name: 1-63 of [a-z0-9-], starting and ending with a letter or digit.
        name: String,
        /// Size, e.g. `1GiB` or `4096`: a non-zero multiple of 4096 bytes, at most 16 TiB - 4 KiB.
        /// Required unless `--from-snapshot` is given (a clone defaults to the source's size
        /// and may not be smaller).
        #[arg(long, required_unless_present = "from_snapshot")]
        size: Option<bytesize::ByteSize>,
        /// Clone snapshot SNAPSHOT of volume VOLUME (read from one of its RW replicas; the
        /// source may be attached and taking writes).
        #[arg(long, value_name = "VOLUME/SNAPSHOT")]
        from_snapshot: Option<String>,
        /// Clone only: the node to attach the new volume to while it is filled. Default: a
        /// node holding one of its replicas.
        #[arg(long, requires = "from_snapshot")]
        node: Option<String>,
        /// Clone only: chunks of 2 MiB copied at once.
        #[arg(long, default_value_t = 8, requires = "from_snapshot")]
        concurrency: usize,
        /// Number of replicas, at least 1.
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// Where replicas go: `disabled` (wherever there is space) or `best-effort` (one on
        /// the attaching node when it has room).
        #[arg(long, default_value = "disabled")]
        data_locality: DataLocality,
        /// How long a replica on a down node is waited for (after the node-down timeout)
        /// before it is replaced on another node and rebuilt, e.g. `30m` or `2h`: whole
        /// seconds, 1s to 365 days. Default: the cluster's `--replica-replenish-wait`.
        #[arg(long, value_name = "DURATION")]
        stale_replica_timeout: Option<humantime::Duration>,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// List the volume records in meta: size, replicas, state, attachment.
    List {
        /// Print the volumes as a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Show one volume record; exit 1 when there is no such volume.
    Get {
        /// Volume name.
        name: String,
        /// Print the volume as a JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Delete a volume: its replicas' data is removed by their nodes' agents. Refused (exit
    /// 1) while the volume is attached. Waits until meta has deleted the record.
    Delete {
        /// Volume name.
        name: String,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Attach a volume to a node: that node's agent runs its engine (at a new epoch, which
    /// fences any earlier engine) and exports it over NBD. Prints the NBD URI once the export
    /// serves. One attachment at a time: refused while attached to another node.
    Attach {
        /// Volume name.
        name: String,
        /// Node to attach to (a name from `cairn node list`).
        #[arg(long)]
        node: String,
        /// Return after recording the attachment, without waiting for the export.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the node's agent to serve the volume.
        #[arg(long, default_value = "60s")]
        timeout: humantime::Duration,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Grow a volume to SIZE, online when it is attached: the attached node's agent grows
    /// every replica, then the engine and its NBD export; this waits until the engine serves
    /// the new size. New NBD connections see it; connections already open keep the old size
    /// until they reconnect (NBD has no size-change notice). A detached volume's replicas
    /// grow when it is next attached. Shrinking is refused; the current size is a no-op.
    Expand {
        /// Volume name.
        name: String,
        /// New size, e.g. `20GiB`: a multiple of 4096 bytes, at most 16 TiB - 4 KiB, not
        /// below the current size.
        #[arg(long)]
        size: bytesize::ByteSize,
        /// How long to wait for the attached engine to serve the new size.
        #[arg(long, default_value = "60s")]
        timeout: humantime::Duration,
        /// Print the result as a JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Detach a volume: its node's agent flushes and stops the engine and the NBD export.
    Detach {
        /// Volume name.
        name: String,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Show size, epoch and every replica's address, mode (RW / WO / ERR) and counters.
    Status {
        /// Volume name.
        #[arg(default_value = "vol0")]
        volume: String,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        /// Control endpoint of the node running the volume's engine. Default: the attached
        /// node's, asked of meta at 127.0.0.1:10811; without meta (`cairn dev --standalone`)
        /// 127.0.0.1:10810.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
    /// Compare the content digests of every RW replica, read online; exit 0 when all are
    /// identical, 1 otherwise.
    Verify {
        /// Volume name.
        #[arg(default_value = "vol0")]
        volume: String,
        /// Control endpoint of the node running the volume's engine. Default: the attached
        /// node's, asked of meta at 127.0.0.1:10811; without meta (`cairn dev --standalone`)
        /// 127.0.0.1:10810.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
    /// Add or remove replicas of a running volume.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Follow, cancel, restart or pace rebuilds and resyncs.
    #[command(subcommand)]
    Rebuild(RebuildCommand),
    /// Create, delete or list snapshots of a running volume.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

/// `cairn volume create`: validate, then create the record.
fn create(
    name: &str,
    size: u64,
    replicas: u32,
    data_locality: DataLocality,
    stale_replica_timeout: Option<std::time::Duration>,
    meta: &MetaAddr,
) -> anyhow::Result<ExitCode> {
    validate_new(name, size, replicas)?;
    stale_timeout_seconds(stale_replica_timeout)?;
    block_on(create_async(
        &meta.addr,
        name,
        size,
        replicas,
        data_locality,
        stale_replica_timeout,
    ))??;
    println!("{name}");
    Ok(ExitCode::SUCCESS)
}

/// `cairn volume create NEW --from-snapshot VOLUME/SNAPSHOT`.
fn clone(
    from: &str,
    mut spec: NewVolume,
    concurrency: usize,
    meta: &MetaAddr,
) -> anyhow::Result<ExitCode> {
    let Some((src_vol, snap)) = from.split_once('/') else {
        return Err(user_error(format!(
            "--from-snapshot {from:?} is not VOLUME/SNAPSHOT"
        )));
    };
    cairn_proto::validate_name("volume name", src_vol).map_err(|e| user_error(e.to_string()))?;
    cairn_proto::validate_name("snapshot name", snap).map_err(|e| user_error(e.to_string()))?;
    validate_new(&spec.name, 4096, spec.replicas)?;
    stale_timeout_seconds(spec.stale_replica_timeout)?;
    if concurrency == 0 {
        return Err(user_error("--concurrency must be at least 1"));
    }
    let addr = &meta.addr;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let copied = rt.block_on(async {
        let mut client = records::client(addr)?;
        let source = get_volume_async(&mut client, addr, src_vol).await?;
        let src = ReplicaSnapshot::open(addr, &source, snap).await?;
        let src_size = cairn_backup::SnapshotSource::size(&src);
        if spec.size == 0 {
            spec.size = src_size;
        } else if spec.size < src_size {
            return Err(user_error(format!(
                "--size {} is smaller than volume {src_vol} ({src_size} bytes)",
                spec.size
            )));
        }
        validate_new(&spec.name, spec.size, spec.replicas)?;
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ({eta} left)",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(spec.name.clone());
        let out = volume_data::fill_new_volume(addr, &spec, |dst| {
            let (src, bar) = (&src, &bar);
            async move { volume_data::copy_snapshot(src, &dst, concurrency, Some(bar)).await }
        })
        .await;
        bar.finish_and_clear();
        out
    })?;
    eprintln!(
        "cloned {from} into {}: {} of extents read, {} written in {:.1} s",
        spec.name,
        bytesize::ByteSize::b(copied.bytes_read).to_string_as(true),
        bytesize::ByteSize::b(copied.bytes_written).to_string_as(true),
        copied.seconds
    );
    println!("{}", spec.name);
    Ok(ExitCode::SUCCESS)
}

/// The volume record `name`; a [`records::UserError`] when there is none.
fn get_volume(addr: &str, name: &str) -> anyhow::Result<Volume> {
    let resp = block_on(async {
        records::client(addr)?
            .get(GetRequest {
                key: Some(Key {
                    kind: Kind::Volume as i32,
                    name: name.to_owned(),
                }),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => user_error(format!("no volume {name}")),
                _ => status_error(addr, &s),
            })
    })??;
    match resp.into_inner().record.and_then(|r| r.record) {
        Some(record::Record::Volume(v)) => Ok(v),
        other => anyhow::bail!("meta answered Get of volume {name} with {other:?}"),
    }
}

/// `cairn volume delete`: refused while attached; else the volume turns DELETING (meta's
/// controller marks its replicas deleted and removes the record), and this waits for that.
fn delete(name: &str, meta: &MetaAddr) -> anyhow::Result<ExitCode> {
    block_on(delete_async(&meta.addr, name))??;
    println!("{name}");
    Ok(ExitCode::SUCCESS)
}

fn attach(
    name: &str,
    node: &str,
    wait: bool,
    timeout: std::time::Duration,
    meta: &MetaAddr,
) -> anyhow::Result<ExitCode> {
    let (v, n) = block_on(attach_async(&meta.addr, name, node))??;
    if wait {
        block_on(wait_served(&n, &v, timeout))??;
    }
    println!("nbd://{}/{}", n.nbd_address, v.name);
    Ok(ExitCode::SUCCESS)
}

/// `cairn volume expand`.
fn expand(
    name: &str,
    size: u64,
    timeout: std::time::Duration,
    json: bool,
    meta: &MetaAddr,
) -> anyhow::Result<ExitCode> {
    let size = block_on(expand_with_timeout(&meta.addr, name, size, timeout))?.map_err(|e| {
        match e.downcast_ref::<ExpandError>() {
            Some(ExpandError::NotServed { .. }) | None => e,
            Some(user) => user_error(user.to_string()),
        }
    })?;
    if json {
        records::print_json(&serde_json::json!({ "name": name, "size_bytes": size }))?;
    } else {
        println!(
            "{name} {size} ({})",
            bytesize::ByteSize::b(size).to_string_as(true)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn detach(name: &str, meta: &MetaAddr) -> anyhow::Result<ExitCode> {
    block_on(detach_async(&meta.addr, name))??;
    println!("{name}");
    Ok(ExitCode::SUCCESS)
}

/// `cairn volume list`.
fn list(json: bool, meta: &MetaAddr) -> anyhow::Result<ExitCode> {
    let recs = block_on(records::list(&meta.addr, Kind::Volume, None, None))??;
    let vols: Vec<VolumeJson> = recs
        .iter()
        .filter_map(|r| match r {
            record::Record::Volume(v) => Some(VolumeJson::from(v)),
            _ => None,
        })
        .collect();
    if json {
        records::print_json(&vols)?;
    } else {
        records::print_volumes(&vols);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(cmd: VolumeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            from_snapshot: Some(from),
            node,
            concurrency,
            replicas,
            data_locality,
            stale_replica_timeout,
            meta,
        } => run_cli(|| {
            let spec = NewVolume {
                name,
                size: size.map_or(0, |s| s.as_u64()),
                replicas,
                data_locality,
                node,
                stale_replica_timeout: stale_replica_timeout.map(Into::into),
                source: format!("snapshot {from}"),
            };
            clone(&from, spec, concurrency, &meta)
        }),
        VolumeCommand::Create {
            name,
            size,
            from_snapshot: None,
            replicas,
            data_locality,
            stale_replica_timeout,
            meta,
            ..
        } => run_cli(|| {
            let size = size.map_or(0, |s| s.as_u64());
            let stale = stale_replica_timeout.map(Into::into);
            create(&name, size, replicas, data_locality, stale, &meta)
        }),
        VolumeCommand::List { json, meta } => run_cli(|| list(json, &meta)),
        VolumeCommand::Get { name, json, meta } => run_cli(|| {
            let v = VolumeJson::from(&get_volume(&meta.addr, &name)?);
            if json {
                records::print_json(&v)?;
            } else {
                records::print_volume(&v);
            }
            Ok(ExitCode::SUCCESS)
        }),
        VolumeCommand::Delete { name, meta } => run_cli(|| delete(&name, &meta)),
        VolumeCommand::Attach {
            name,
            node,
            no_wait,
            timeout,
            meta,
        } => run_cli(|| attach(&name, &node, !no_wait, *timeout, &meta)),
        VolumeCommand::Expand {
            name,
            size,
            timeout,
            json,
            meta,
        } => run_cli(|| expand(&name, size.as_u64(), *timeout, json, &meta)),
        VolumeCommand::Detach { name, meta } => run_cli(|| detach(&name, &meta)),
        VolumeCommand::Status {
            volume,
            json,
            endpoint,
        } => running::status(volume, json, endpoint),
        VolumeCommand::Verify { volume, endpoint } => running::verify(volume, endpoint),
        VolumeCommand::Replica(c) => running::replica(c),
        VolumeCommand::Rebuild(c) => running::rebuild(c),
        VolumeCommand::Snapshot(c) => running::snapshot(c),
    }
}
