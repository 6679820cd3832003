//! `cairn replica ...`: serve replicas over TCP, check a replica directory offline, and list
//! the replica records of the metadata service.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cairn_io::EngineChoice;
use cairn_replica::{Server, ServerConfig};
use cairn_store::Store;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Serve every replica stored under a directory over TCP (engine <-> replica frames).
    ///
    /// Prints `listening on ADDR` on stdout once connections are accepted.
    Serve {
        /// Directory holding the replicas (DIR/<volume>/<replica-id>/); created if missing.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:10900")]
        listen: SocketAddr,
        /// I/O backend for disk and socket I/O: auto (io_uring when the kernel allows it),
        /// uring, or portable (plain syscalls).
        #[arg(long, default_value = "auto")]
        io_engine: EngineChoice,
        /// Largest frame accepted from an engine, in bytes (header included).
        #[arg(long, default_value_t = cairn_wire::DEFAULT_MAX_FRAME)]
        max_frame: usize,
        /// Benchmarking only: skip block checksum verification and storage, to measure
        /// what checksums cost. Blocks written this way read back as corrupt once the server
        /// runs with checksums again. Never use on data you keep.
        #[arg(long)]
        no_checksums: bool,
    },
    /// Verify every allocated block of one replica offline; lists corrupt blocks, exits 1 when
    /// there is any.
    Scrub {
        /// One replica's directory (DIR/<volume>/<replica-id>).
        path: PathBuf,
        /// I/O backend: auto, uring or portable.
        #[arg(long, default_value = "auto")]
        io_engine: EngineChoice,
    },
    /// Print a digest of the replica's logical content and its size: `HEX  SIZE`.
    /// Replicas with equal content print equal lines whatever their snapshot layering.
    Checksum {
        /// One replica's directory (DIR/<volume>/<replica-id>).
        path: PathBuf,
        /// I/O backend: auto, uring or portable.
        #[arg(long, default_value = "auto")]
        io_engine: EngineChoice,
    },
    /// List the replica records of the metadata service: volume, node, mode and health.
    List {
        /// Only the replicas of this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Only the replicas on this node.
        #[arg(long)]
        node: Option<String>,
        /// Print the replicas as a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        meta: crate::records::MetaAddr,
    },
}

impl ReplicaCommand {
    /// `serve` runs until stopped; the others are one-shot tools.
    pub fn is_daemon(&self) -> bool {
        matches!(self, ReplicaCommand::Serve { .. })
    }
}

pub fn run(cmd: ReplicaCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ReplicaCommand::List {
            volume,
            node,
            json,
            meta,
        } => crate::records::run_replica_list(&meta, volume.as_deref(), node.as_deref(), json),
        ReplicaCommand::Serve {
            dir,
            listen,
            io_engine,
            max_frame,
            no_checksums,
        } => {
            if no_checksums {
                tracing::warn!("block checksums are OFF (--no-checksums): benchmarking only");
            }
            if max_frame < cairn_wire::HEADER_LEN + 4096 {
                anyhow::bail!(
                    "--max-frame must be at least {}",
                    cairn_wire::HEADER_LEN + 4096
                );
            }
            let server = Server::bind(ServerConfig {
                dir,
                listen,
                engine: io_engine,
                max_frame,
                checksums: !no_checksums,
            })?;
            let addr = server.local_addr()?;
            println!("listening on {addr} (io: {})", server.backend());
            std::io::stdout().flush()?;
            server.run()?;
            Ok(ExitCode::SUCCESS)
        }
        ReplicaCommand::Scrub { path, io_engine } => {
            let mut store = open(&path, io_engine)?;
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "scrub {bar:40} {pos}/{len} blocks ({eta} left)",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let bad = store.scrub(|done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            for b in &bad {
                println!("corrupt block at byte {} in layer {}", b.offset, b.layer);
            }
            if bad.is_empty() {
                println!("ok: no corrupt blocks");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{} corrupt block(s)", bad.len());
                Ok(ExitCode::from(1))
            }
        }
        ReplicaCommand::Checksum { path, io_engine } => {
            let mut store = open(&path, io_engine)?;
            let digest = store.digest()?;
            println!("{}  {}", hex::encode(digest), store.size());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Opens a replica offline, holding its data directory's lock so that no replica server can
/// open it at the same time.
fn open(path: &std::path::Path, engine: EngineChoice) -> anyhow::Result<Store> {
    if !Store::exists(path) {
        anyhow::bail!(
            "{} does not hold a replica (no replica.json)",
            path.display()
        );
    }
    if let Some(data_dir) = path.parent().and_then(|p| p.parent()) {
        match cairn_replica::lock_data_dir(data_dir)? {
            // Leaked on purpose: the lock must last as long as the process.
            Some(lock) => std::mem::forget(lock),
            None => anyhow::bail!(
                "a replica server is running on {}; stop it before checking replicas offline",
                data_dir.display()
            ),
        }
    }
    Store::open(path, engine).with_context(|| format!("opening replica {}", path.display()))
}
