//! `cairn volume ...`: volume records in the metadata service (`create`, `list`, `get`,
//! `delete`, through `--meta`), and a running volume looked at through the control endpoint
//! of `cairn dev` (`status`, `verify`, `replica`, `rebuild`, `snapshot`).
//!
//! The record commands validate names and sizes with `cairn_proto` before any RPC, so a bad
//! argument is refused with a message naming it even when meta is down.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::{
    record, CreateRequest, DataLocality, GetRequest, Key, Kind, Record, UpdateRequest, Volume,
    VolumeState,
};
use tonic::transport::Channel;

use crate::control::{self, ControlReply, ControlRequest, DEFAULT_ENDPOINT};
use crate::records::{self, block_on, run_cli, status_error, user_error, MetaAddr, VolumeJson};
use crate::volume_data::{self, NewVolume, ReplicaSnapshot};

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

/// Sends a request that changes something; prints what was done.
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

/// `cairn volume create`: validate, then create the record.
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

/// `cairn volume delete`: refused while attached; else the volume turns DELETING (meta's
/// controller marks its replicas deleted and removes the record), and this waits for that.
/// Deletes volume `name` (refused while attached) and waits until meta removed the record.
pub async fn delete_async(addr: &str, name: &str) -> anyhow::Result<()> {
    let mut client = records::client(addr)?;
    let mut v = get_volume_async(&mut client, addr, name).await?;
    if !v.attached_node.is_empty() {
        return Err(user_error(format!(
            "volume {name} is attached to node {}; detach it first",
            v.attached_node
        )));
    }
    if v.state != VolumeState::Deleting as i32 {
        v.state = VolumeState::Deleting as i32;
        v.state_reason = "deleting: replicas are being removed".into();
        update_volume(&mut client, addr, v).await?;
    }
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

fn delete(name: &str, meta: &MetaAddr) -> anyhow::Result<ExitCode> {
    block_on(delete_async(&meta.addr, name))??;
    println!("{name}");
    Ok(ExitCode::SUCCESS)
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

async fn get_record(
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

/// Marks the fill of volume `name` complete (clears `filling_from`).
pub async fn fill_done(addr: &str, name: &str) -> anyhow::Result<()> {
    let mut client = records::client(addr)?;
    for _ in 0..20 {
        let mut v = get_volume_async(&mut client, addr, name).await?;
        if v.filling_from.is_empty() {
            return Ok(());
        }
        v.filling_from.clear();
        match update_volume(&mut client, addr, v).await {
            Ok(_) => return Ok(()),
            // Changed meanwhile (an agent or a controller wrote it): read it again.
            Err(e) if e.to_string().contains("changed meanwhile") => continue,
            Err(e) => return Err(e),
        }
    }
    anyhow::bail!("volume {name} kept changing; its fill could not be marked complete")
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
    let endpoint: SocketAddr = node
        .control_address
        .parse()
        .with_context(|| format!("node {} has no control address", node.name))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let req = ControlRequest::Status {
            volume: v.name.clone(),
        };
        let r = tokio::task::spawn_blocking(move || control::call(endpoint, &req)).await?;
        let last = match r {
            Ok(ControlReply::Status(s)) => {
                let epoch = s
                    .get("epoch")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                if epoch >= v.epoch {
                    return Ok(());
                }
                format!("the engine runs at epoch {epoch}, below {}", v.epoch)
            }
            Ok(ControlReply::Error(e)) => e,
            Ok(other) => format!("{other:?}"),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "node {} did not serve volume {} within {:?}: {last}",
                node.name,
                v.name,
                timeout
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
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
#[allow(dead_code)] // Used by the CSI controller (ControllerExpandVolume).
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
    let endpoint: SocketAddr = n
        .control_address
        .parse()
        .with_context(|| format!("node {node} has no control address"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let req = ControlRequest::Status {
            volume: v.name.clone(),
        };
        let r = tokio::task::spawn_blocking(move || control::call(endpoint, &req)).await?;
        let last = match r {
            Ok(ControlReply::Status(s)) => {
                let size = s.get("size").and_then(serde_json::Value::as_u64);
                match size {
                    Some(size) if size >= v.size_bytes => return Ok(()),
                    Some(size) => format!("it serves {size} bytes"),
                    None => "its status has no size".to_owned(),
                }
            }
            Ok(ControlReply::Error(e)) => e,
            Ok(other) => format!("{other:?}"),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            return Err(ExpandError::NotServed {
                name: v.name.clone(),
                size: v.size_bytes,
                node: node.clone(),
                waited: timeout,
                last,
            }
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
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

/// Records that volume `name` is detached (its node's agent then flushes and stops the
/// engine). Detaching a detached volume changes nothing.
pub async fn detach_async(addr: &str, name: &str) -> anyhow::Result<()> {
    let mut client = records::client(addr)?;
    let mut v = get_volume_async(&mut client, addr, name).await?;
    if !v.attached_node.is_empty() {
        v.attached_node.clear();
        update_volume(&mut client, addr, v).await?;
    }
    Ok(())
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
        } => match control::call(at(endpoint, &volume)?, &ControlRequest::Status { volume })? {
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
                    "replica",
                    "address",
                    "mode",
                    "reads",
                    "writes",
                    "errors",
                    "corrupt",
                    "last resync"
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
        },
        VolumeCommand::Verify { volume, endpoint } => {
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
        VolumeCommand::Replica(ReplicaCommand::Add {
            volume,
            address,
            id,
            wait,
            endpoint,
        }) => {
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
        VolumeCommand::Replica(ReplicaCommand::Remove {
            volume,
            replica,
            endpoint,
        }) => report_change(
            at(endpoint, &volume)?,
            &ControlRequest::ReplicaRemove { volume, replica },
        ),
        VolumeCommand::Rebuild(RebuildCommand::Wait {
            volume,
            replica,
            timeout,
            endpoint,
        }) => wait_rw(at(endpoint, &volume)?, &volume, &replica, *timeout),
        VolumeCommand::Rebuild(RebuildCommand::Cancel {
            volume,
            replica,
            endpoint,
        }) => report_change(
            at(endpoint, &volume)?,
            &ControlRequest::RebuildCancel { volume, replica },
        ),
        VolumeCommand::Rebuild(RebuildCommand::Start {
            volume,
            replica,
            endpoint,
        }) => report_change(
            at(endpoint, &volume)?,
            &ControlRequest::RebuildStart { volume, replica },
        ),
        VolumeCommand::Snapshot(SnapshotCommand::Create {
            volume,
            name,
            endpoint,
        }) => crate::snapshot::create_at_endpoint(at(endpoint, &volume)?, &volume, &name),
        VolumeCommand::Snapshot(SnapshotCommand::Delete {
            volume,
            name,
            endpoint,
        }) => report_change(
            at(endpoint, &volume)?,
            &ControlRequest::SnapshotDelete { volume, name },
        ),
        VolumeCommand::Snapshot(SnapshotCommand::List { volume, endpoint }) => match control::call(
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
        VolumeCommand::Rebuild(RebuildCommand::Rate {
            volume,
            rate,
            endpoint,
        }) => {
            let endpoint = at(endpoint, &volume)?;
            let req = ControlRequest::RebuildRate {
                volume,
                bytes_per_sec: rate.as_u64(),
            };
            report_change(endpoint, &req)
        }
    }
}
