//! `cairn backup create|list|restore|delete`: volume snapshots backed up to an S3 bucket or
//! a directory (crate `cairn-backup`; layout in docs/backup.md), and restored into new
//! volumes.
//!
//! Guarantees:
//! - `create` reads the snapshot straight from an RW replica (see `volume_data`), so the
//!   volume may be attached and taking writes, or detached. A backup is listed in the
//!   target only once complete (its manifest is written last). It is incremental when an
//!   earlier completed backup of the same volume in the same target was taken from a
//!   snapshot the volume still holds as an ancestor of this one (same name and creation
//!   time, so a reused name never counts): then only the extents written between the two
//!   snapshots are read, and only blocks the target lacks are uploaded. Otherwise every
//!   allocated extent is read (blocks already stored are still not uploaded again).
//! - The backup is recorded in meta as a Backup record: IN_PROGRESS, then COMPLETED with
//!   the bytes uploaded, or FAILED with the reason. A retry under the same name replaces a
//!   record that did not complete; a completed name is refused.
//! - `restore` creates the new volume, writes every block through its engine after
//!   checking the block's hash, and deletes the volume again if anything fails (the error
//!   names the corrupt or missing block).
//! - `delete` removes the manifest, then garbage-collects the blocks no remaining manifest
//!   (and no backup in progress) uses; concurrent deletes serialise on the target's GC lock.
//!
//! Target settings: flags first, then a TOML file (`--target-config`), then the standard
//! AWS_* environment variables.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use cairn_backup::{
    BackupError, BackupOptions, BackupSpec, Compression, CoordOptions, Incremental, RestoreOptions,
    S3Config, Target,
};
use cairn_proto::v1::{
    record, Backup, BackupState, CreateRequest, DataLocality, DeleteRequest, Kind, Record,
    UpdateRequest,
};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::records::{self, run_cli, status_error, user_error, MetaAddr};
use crate::volume;
use crate::volume_data::{self, NbdSink, NewVolume, ReplicaSnapshot};

/// Where backups go and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Backup target: `s3://BUCKET/PREFIX` or `file:///DIR`.
    #[arg(long)]
    pub target: String,
    /// S3 endpoint URL, e.g. `http://127.0.0.1:9000` (plain http allowed; path-style
    /// addressing). Default: the config file, then AWS_ENDPOINT_URL, then AWS itself.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region. Default: the config file, then AWS_REGION / AWS_DEFAULT_REGION, then
    /// us-east-1.
    #[arg(long)]
    pub s3_region: Option<String>,
    /// S3 access key id. Default: the config file, then AWS_ACCESS_KEY_ID.
    #[arg(long)]
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key (prefer the config file or AWS_SECRET_ACCESS_KEY: a flag is
    /// visible to other users in the process list).
    #[arg(long)]
    pub s3_secret_access_key: Option<String>,
    /// TOML file with any of `endpoint`, `region`, `access_key_id`, `secret_access_key`,
    /// `session_token` (strings).
    #[arg(long, value_name = "FILE", env = "CAIRN_BACKUP_CONFIG")]
    pub target_config: Option<PathBuf>,
}

/// The `--target-config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetConfigFile {
    endpoint: Option<String>,
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
}

impl TargetArgs {
    /// The S3 settings: flags, then the config file, then the environment.
    fn s3_config(&self) -> anyhow::Result<S3Config> {
        let file: TargetConfigFile = match &self.target_config {
            None => TargetConfigFile::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| user_error(format!("--target-config {}: {e}", p.display())))?;
                toml::from_str(&text)
                    .map_err(|e| user_error(format!("--target-config {}: {e}", p.display())))?
            }
        };
        Ok(S3Config {
            endpoint: self.s3_endpoint.clone().or(file.endpoint),
            region: self.s3_region.clone().or(file.region),
            access_key_id: self.s3_access_key_id.clone().or(file.access_key_id),
            secret_access_key: self.s3_secret_access_key.clone().or(file.secret_access_key),
            session_token: file.session_token,
            ..S3Config::default()
        }
        .with_env_defaults())
    }

    fn open(&self) -> anyhow::Result<Target> {
        Target::open(&self.target, &self.s3_config()?).map_err(backup_error)
    }
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up a snapshot of a volume: 2 MiB blocks, holes skipped, each block stored once
    /// per target under its BLAKE3 hash (lz4 by default), uploads in parallel, manifest
    /// last. Incremental from the volume's previous backup in the target when that backup's
    /// snapshot is an ancestor of this one. Shows a progress bar on a terminal.
    Create {
        /// Volume name.
        volume: String,
        /// Snapshot to back up (`cairn snapshot create` makes one).
        #[arg(long)]
        snapshot: String,
        /// Backup name, unique in meta and in the target. Default: VOLUME-SNAPSHOT.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        target: TargetArgs,
        /// Blocks read, compressed and uploaded at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Compression of new blocks: `lz4`, `zstd`, `zstd:LEVEL` (1-22) or `none`.
        #[arg(long, default_value = "lz4")]
        compression: Compression,
        /// Read every allocated extent even when an incremental backup is possible.
        #[arg(long)]
        full: bool,
        /// Print the result as JSON: bytes read and uploaded, blocks new / reused /
        /// unchanged / hole, seconds, parent.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// List the complete backups in a target (read from the target alone: meta is not
    /// needed).
    List {
        #[command(flatten)]
        target: TargetArgs,
        /// Print the backups as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a new volume: creates it, attaches it to a node while every
    /// block is fetched, checked against its hash and written through the volume's engine,
    /// then detaches it. A corrupt or missing block fails the restore, names the block, and
    /// the new volume is deleted again.
    Restore {
        /// Backup name.
        backup: String,
        #[command(flatten)]
        target: TargetArgs,
        /// Name of the new volume.
        #[arg(long)]
        to: String,
        /// Replicas of the new volume.
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// Node to attach the new volume to while it is filled. Default: a node holding one
        /// of its replicas.
        #[arg(long)]
        node: Option<String>,
        /// Blocks fetched and written at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Delete a backup from its target, then garbage-collect the blocks no remaining backup
    /// uses; its record in meta goes too.
    Delete {
        /// Backup name.
        backup: String,
        #[command(flatten)]
        target: TargetArgs,
        /// Print the garbage collection's report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        meta: MetaAddr,
    },
}

pub fn run(cmd: BackupCommand) -> anyhow::Result<ExitCode> {
    run_cli(|| match cmd {
        BackupCommand::Create {
            volume,
            snapshot,
            name,
            target,
            concurrency,
            compression,
            full,
            json,
            meta,
        } => {
            let name = name.unwrap_or_else(|| format!("{volume}-{snapshot}"));
            let req = CreateArgs {
                volume,
                snapshot,
                name,
                concurrency,
                compression,
                full,
            };
            let out = block_on_multi(create(&meta.addr, &target, &req))??;
            if json {
                records::print_json(&out)?;
            } else {
                print_created(&out);
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::List { target, json } => {
            let t = target.open()?;
            let list =
                block_on_multi(async { cairn_backup::list(&t).await })?.map_err(backup_error)?;
            if json {
                records::print_json(&list)?;
            } else {
                println!(
                    "{:<32} {:<20} {:<24} {:>10} {:>8} {:<20} parent",
                    "name", "volume", "snapshot", "size", "blocks", "created"
                );
                for b in &list {
                    println!(
                        "{:<32} {:<20} {:<24} {:>10} {:>8} {:<20} {}",
                        b.name,
                        b.volume,
                        b.snapshot,
                        bytesize::ByteSize::b(b.size).to_string_as(true),
                        b.data_blocks,
                        b.created,
                        b.parent.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Restore {
            backup,
            target,
            to,
            replicas,
            node,
            concurrency,
            json,
            meta,
        } => {
            let out = block_on_multi(restore(
                &meta.addr,
                &target,
                &backup,
                NewVolume {
                    name: to,
                    size: 0,
                    replicas,
                    data_locality: DataLocality::Disabled,
                    node,
                    stale_replica_timeout: None,
                    source: format!("backup {backup}"),
                },
                concurrency,
            ))??;
            if json {
                records::print_json(&out)?;
            } else {
                println!(
                    "backup {} restored into volume {}: {} written in {:.1} s",
                    out.backup,
                    out.volume,
                    bytesize::ByteSize::b(out.result.bytes_written).to_string_as(true),
                    out.result.seconds
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Delete {
            backup,
            target,
            json,
            meta,
        } => {
            let report = block_on_multi(delete(&meta.addr, &target, &backup))??;
            if json {
                records::print_json(&report)?;
            } else {
                println!(
                    "backup {backup} deleted; {} unreferenced blocks removed",
                    report.blocks_deleted
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    })
}

/// A runtime with worker threads: hashing and compression run on every core.
fn block_on_multi<T>(fut: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    Ok(rt.block_on(fut))
}

/// A backup error as the CLI reports it: the user's mistakes (a bad target or name, a name
/// that exists, one that does not) exit 1; transport and data errors exit 2.
fn backup_error(e: BackupError) -> anyhow::Error {
    match e {
        BackupError::InvalidTarget { .. }
        | BackupError::InvalidName { .. }
        | BackupError::NotFound(_)
        | BackupError::AlreadyExists(_) => user_error(e.to_string()),
        other => anyhow::Error::new(other),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ({eta} left)",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_owned());
    bar
}

fn progress_of(bar: &indicatif::ProgressBar) -> cairn_backup::Progress {
    let bar = bar.clone();
    Arc::new(move |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
}

pub(crate) struct CreateArgs {
    pub(crate) volume: String,
    pub(crate) snapshot: String,
    pub(crate) name: String,
    pub(crate) concurrency: usize,
    pub(crate) compression: Compression,
    pub(crate) full: bool,
}

/// `cairn backup create --json`.
#[derive(Debug, Serialize)]
pub(crate) struct CreatedJson {
    name: String,
    volume: String,
    snapshot: String,
    target: String,
    /// Backup this one was made incrementally from.
    parent: Option<String>,
    /// Replica the snapshot was read from.
    replica: String,
    #[serde(flatten)]
    result: cairn_backup::BackupResult,
}

fn print_created(c: &CreatedJson) {
    #[allow(clippy::cast_precision_loss)]
    let mb_s = if c.result.seconds > 0.0 {
        c.result.bytes_read as f64 / c.result.seconds / 1e6
    } else {
        0.0
    };
    println!(
        "backup {} of {}@{} complete{}: read {}, uploaded {} ({} new blocks, {} already stored, \
         {} unchanged, {} holes) in {:.1} s ({mb_s:.0} MB/s read)",
        c.name,
        c.volume,
        c.snapshot,
        c.parent
            .as_ref()
            .map_or(String::new(), |p| format!(" (incremental from {p})")),
        bytesize::ByteSize::b(c.result.bytes_read).to_string_as(true),
        bytesize::ByteSize::b(c.result.bytes_uploaded).to_string_as(true),
        c.result.blocks_new,
        c.result.blocks_reused,
        c.result.blocks_unchanged,
        c.result.blocks_hole,
        c.result.seconds
    );
}

async fn backup_records(addr: &str) -> anyhow::Result<Vec<Backup>> {
    Ok(records::list(addr, Kind::Backup, None, None)
        .await?
        .into_iter()
        .filter_map(|r| match r {
            record::Record::Backup(b) => Some(b),
            _ => None,
        })
        .collect())
}

async fn put_backup(addr: &str, b: Backup, create: bool) -> anyhow::Result<Backup> {
    let mut client = records::client(addr)?;
    let rec = Some(Record {
        record: Some(record::Record::Backup(b)),
    });
    let stored = if create {
        client
            .create(CreateRequest { record: rec })
            .await
            .map(|r| r.into_inner().record)
    } else {
        client
            .update(UpdateRequest { record: rec })
            .await
            .map(|r| r.into_inner().record)
    };
    match stored.map_err(|s| status_error(addr, &s))? {
        Some(Record {
            record: Some(record::Record::Backup(b)),
        }) => Ok(b),
        other => anyhow::bail!("meta answered a Backup write with {other:?}"),
    }
}

/// The parent for an incremental backup of `src`: the closest ancestor snapshot with a
/// completed backup of this volume in this target, recorded with the same snapshot creation
/// time, whose manifest the target still has.
async fn find_parent(
    t: &Target,
    target_url: &str,
    volume: &str,
    src: &ReplicaSnapshot,
    snapshot: &str,
    done: &[Backup],
) -> anyhow::Result<Option<Incremental>> {
    let mut by_snapshot: BTreeMap<&str, Vec<&Backup>> = BTreeMap::new();
    for b in done {
        if b.volume == volume && b.target == target_url && b.state == BackupState::Completed as i32
        {
            by_snapshot.entry(b.snapshot.as_str()).or_default().push(b);
        }
    }
    let mut cur = src.info(snapshot).and_then(|s| s.parent.clone());
    let mut steps = 0;
    while let Some(name) = cur {
        steps += 1;
        if steps > src.snapshots.len() {
            break;
        }
        let info = src.info(&name);
        let created = info.map_or(0, |i| i.created_unix_ms);
        let mut candidates: Vec<&&Backup> = by_snapshot
            .get(name.as_str())
            .into_iter()
            .flatten()
            .filter(|b| b.snapshot_created_unix_ms == created)
            .collect();
        candidates.sort_by_key(|b| std::cmp::Reverse(b.created_unix_ms));
        for b in candidates {
            match cairn_backup::read_manifest(t, &b.name).await {
                Ok(m) if m.volume == volume && m.snapshot == name && m.size == src_size(src) => {
                    if let Some(changed) = src.changed_since(&name).await? {
                        return Ok(Some(Incremental {
                            parent: b.name.clone(),
                            changed,
                        }));
                    }
                }
                Ok(_) | Err(BackupError::NotFound(_)) => {}
                Err(e) => return Err(anyhow::Error::new(e).context("read the parent manifest")),
            }
        }
        cur = info.and_then(|i| i.parent.clone());
    }
    Ok(None)
}

fn src_size(src: &ReplicaSnapshot) -> u64 {
    use cairn_backup::SnapshotSource;
    src.size()
}

pub(crate) async fn create(
    addr: &str,
    target: &TargetArgs,
    a: &CreateArgs,
) -> anyhow::Result<CreatedJson> {
    cairn_proto::validate_name("volume", &a.volume).map_err(|e| user_error(e.to_string()))?;
    cairn_proto::validate_name("snapshot", &a.snapshot).map_err(|e| user_error(e.to_string()))?;
    cairn_proto::validate_name("backup", &a.name).map_err(|e| user_error(e.to_string()))?;
    if a.concurrency == 0 {
        return Err(user_error("--concurrency must be at least 1"));
    }
    let t = target.open()?;
    let mut client = records::client(addr)?;
    let v = volume::get_volume_async(&mut client, addr, &a.volume).await?;
    let all = backup_records(addr).await?;
    let existing = all.iter().find(|b| b.name == a.name).cloned();
    if let Some(b) = &existing {
        if b.state == BackupState::Completed as i32 || b.state == BackupState::Deleting as i32 {
            return Err(user_error(format!(
                "backup {} already exists (volume {}, snapshot {}, target {})",
                b.name, b.volume, b.snapshot, b.target
            )));
        }
    }
    let src = ReplicaSnapshot::open(addr, &v, &a.snapshot).await?;
    let snap_created = src.info(&a.snapshot).map_or(0, |s| s.created_unix_ms);
    let incremental = if a.full {
        None
    } else {
        find_parent(&t, &target.target, &a.volume, &src, &a.snapshot, &all).await?
    };
    let parent = incremental.as_ref().map(|i| i.parent.clone());
    let mut rec = Backup {
        name: a.name.clone(),
        version: existing.as_ref().map_or(0, |b| b.version),
        volume: a.volume.clone(),
        snapshot: a.snapshot.clone(),
        target: target.target.clone(),
        state: BackupState::InProgress as i32,
        state_reason: parent
            .as_ref()
            .map_or("full".into(), |p| format!("incremental from {p}")),
        size_bytes: 0,
        created_unix_ms: now_ms(),
        snapshot_created_unix_ms: snap_created,
    };
    rec = put_backup(addr, rec, existing.is_none()).await?;
    let progress = bar(&a.name);
    let opts = BackupOptions {
        compression: a.compression,
        concurrency: a.concurrency,
        incremental,
        progress: Some(progress_of(&progress)),
        coord: CoordOptions::default(),
    };
    let spec = BackupSpec {
        name: a.name.clone(),
        volume: a.volume.clone(),
        snapshot: a.snapshot.clone(),
    };
    let done = cairn_backup::backup(&t, &src, &spec, &opts).await;
    progress.finish_and_clear();
    match done {
        Ok(result) => {
            rec.state = BackupState::Completed as i32;
            rec.size_bytes = result.bytes_uploaded;
            put_backup(addr, rec, false)
                .await
                .context("the backup is complete in the target but its record was not updated")?;
            Ok(CreatedJson {
                name: a.name.clone(),
                volume: a.volume.clone(),
                snapshot: a.snapshot.clone(),
                target: target.target.clone(),
                parent,
                replica: src.replica.clone(),
                result,
            })
        }
        Err(e) => {
            rec.state = BackupState::Failed as i32;
            rec.state_reason = e.to_string();
            if let Err(m) = put_backup(addr, rec, false).await {
                tracing::warn!(error = %m, "could not record the failure in meta");
            }
            Err(backup_error(e).context(format!("backup {} failed", a.name)))
        }
    }
}

/// `cairn backup restore --json`.
#[derive(Debug, Serialize)]
pub(crate) struct RestoredJson {
    backup: String,
    volume: String,
    #[serde(flatten)]
    result: cairn_backup::RestoreResult,
}

pub(crate) async fn restore(
    addr: &str,
    target: &TargetArgs,
    backup: &str,
    mut spec: NewVolume,
    concurrency: usize,
) -> anyhow::Result<RestoredJson> {
    volume::validate_new(&spec.name, 4096, spec.replicas)?;
    if concurrency == 0 {
        return Err(user_error("--concurrency must be at least 1"));
    }
    let t = target.open()?;
    let m = cairn_backup::read_manifest(&t, backup)
        .await
        .map_err(backup_error)?;
    spec.size = m.size;
    let result = volume_data::fill_new_volume(addr, &spec, |client| async {
        let progress = bar(backup);
        let opts = RestoreOptions {
            concurrency,
            progress: Some(progress_of(&progress)),
        };
        let r = cairn_backup::restore(&t, backup, &NbdSink { client }, &opts).await;
        progress.finish_and_clear();
        r.map_err(|e| anyhow::Error::new(e).context(format!("restore of backup {backup} failed")))
    })
    .await?;
    Ok(RestoredJson {
        backup: backup.to_owned(),
        volume: spec.name,
        result,
    })
}

pub(crate) async fn delete(
    addr: &str,
    target: &TargetArgs,
    backup: &str,
) -> anyhow::Result<cairn_backup::GcReport> {
    cairn_proto::validate_name("backup", backup).map_err(|e| user_error(e.to_string()))?;
    let t = target.open()?;
    let report = cairn_backup::delete(&t, backup, &CoordOptions::default()).await;
    // The record goes whether or not the target had the manifest (a failed backup has none).
    let mut record_gone = false;
    match records::client(addr) {
        Ok(mut client) => {
            let rec = backup_records(addr)
                .await
                .map(|all| all.into_iter().find(|b| b.name == backup));
            match rec {
                Ok(Some(b)) => {
                    let req = DeleteRequest {
                        key: Some(cairn_proto::v1::Key {
                            kind: Kind::Backup as i32,
                            name: b.name.clone(),
                        }),
                        expected_version: b.version,
                    };
                    match client.delete(req).await {
                        Ok(_) => record_gone = true,
                        Err(s) => tracing::warn!(error = %s, "could not delete the backup record"),
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "meta unreachable; backup records unchanged"),
            }
        }
        Err(e) => tracing::warn!(error = %e, "meta unreachable; backup records unchanged"),
    }
    match report {
        Ok(r) => Ok(r),
        Err(BackupError::NotFound(_)) if record_gone => {
            eprintln!("backup {backup} had no manifest in the target (it never completed); its record was removed");
            Ok(cairn_backup::GcReport::default())
        }
        Err(e) => Err(backup_error(e)),
    }
}
