//! `cairn`: the one binary. Subcommands are grouped by what they act on; each lives in its
//! own module and keeps its flags documented for `--help`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent;
mod backup;
mod control;
mod csi;
mod dev;
mod dev_cluster;
mod member;
mod meta;
mod nbd_file;
mod records;
mod replica;
mod snapshot;
mod volume;
mod volume_data;

/// Cairn: a replicated block store for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing-subscriber syntax, e.g. `info`, `cairn_replica=debug`).
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replica server and offline replica tools.
    #[command(subcommand)]
    Replica(replica::ReplicaCommand),
    /// Run a whole cluster on this machine in the foreground: metadata members, one agent
    /// per node (each its own process and loopback address), and a replicated volume
    /// exported over NBD. Ctrl-C or SIGTERM stops everything.
    Dev(dev::DevArgs),
    /// Create, list, show and delete volumes in the metadata service (`--meta`), and inspect
    /// a running volume through its control endpoint.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Storage nodes registered with the metadata service.
    #[command(subcommand)]
    Node(records::NodeCommand),
    /// Run one member of the metadata service (Raft group + `cairn.v1.Meta` API) in the
    /// foreground.
    Meta(meta::MetaArgs),
    /// Members of the metadata service (`--meta`): list them, add one (it catches up, then
    /// votes), remove one.
    #[command(subcommand)]
    Member(member::MemberCommand),
    /// Run the node agent in the foreground: registers the node with the metadata service,
    /// serves the replicas placed on it and runs the engine and NBD export of the volumes
    /// attached to it.
    Agent(agent::AgentArgs),
    /// Snapshots of volumes, recorded in the metadata service (`--meta`): create
    /// (crash-consistent across replicas; prints how long writes paused), list, delete
    /// (merges the layer; the volume's content is unchanged), revert (detached volumes only).
    /// Clone one with `cairn volume create NEW --from-snapshot VOLUME/SNAPSHOT`.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Backups of volume snapshots to S3 (`s3://bucket/prefix`) or a directory
    /// (`file:///dir`): create (incremental when it can be), list, restore into a new
    /// volume, delete (garbage-collects unused blocks). Layout: docs/backup.md.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Serve the CSI v1 driver (`csi.cairn.io`) on a Unix socket: the Controller service
    /// (volumes, attachments, snapshots, backups, expansion through meta), the Node service
    /// (attach, format, mount, bind for pods), or both. See docs/kubernetes.md.
    Csi(csi::CsiArgs),
    /// Serve one NBD export as the file MOUNTPOINT/disk through FUSE, growing on SIGHUP (run
    /// by `cairn csi` for attach mode cairn-fuse).
    #[command(hide = true)]
    NbdFile(nbd_file::NbdFileArgs),
}

impl Command {
    /// Long-running servers, as opposed to one-shot commands.
    fn is_daemon(&self) -> bool {
        match self {
            Command::Dev(_) | Command::Meta(_) | Command::Agent(_) | Command::Csi(_) => true,
            Command::Replica(r) => r.is_daemon(),
            _ => false,
        }
    }
}

fn main() -> ExitCode {
    // Frames of up to 16 MiB are allocated and freed all the time (engine links, replica
    // sessions). Past glibc's mmap threshold each would be a fresh mapping, page-faulted and
    // zeroed on every use; from the heap they are reused. Measured: a 1 GiB rebuild went
    // from 3.4-4.2 s to 3.1 s (docs/rebuild.md).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
    let cli = Cli::parse();
    // A one-shot command dies quietly on a closed stdout (`cairn volume status | head`), as
    // command-line tools do. A daemon keeps Rust's SIGPIPE = ignored: a peer that hangs up
    // (a CSI probe, an NBD client) must cost it one connection (EPIPE), not the process.
    if !cli.command.is_daemon() {
        // SAFETY: setting a signal disposition to SIG_DFL before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Replica(c) => replica::run(c),
        Command::Volume(c) => volume::run(c),
        Command::Node(c) => records::run_node(c),
        Command::Dev(a) => dev::run(a),
        Command::Meta(a) => meta::run(a),
        Command::Member(c) => member::run(c),
        Command::Agent(a) => agent::run(a),
        Command::Snapshot(c) => snapshot::run(c),
        Command::Backup(c) => backup::run(c),
        Command::Csi(a) => csi::run(a),
        Command::NbdFile(a) => nbd_file::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A mistake the user can fix exits 1, anything else 2 (as `run_cli` does).
            if e.downcast_ref::<records::UserError>().is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::from(2)
            }
        }
    }
}
