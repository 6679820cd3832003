//! `cairn nbd-file` (hidden): serve one NBD export as the file `MOUNTPOINT/disk` through FUSE,
//! growing it on `SIGHUP` when the export grew and reconnecting when the connection breaks. `cairn csi` starts it for attach mode
//! `cairn-fuse` (one process per attached volume, in its own session); the server itself is
//! `cairn_csi::host::nbdfile`.

use std::path::PathBuf;
use std::process::ExitCode;

use cairn_csi::host::nbdfile::{self, NbdFileOptions};

/// Flags of `cairn nbd-file`.
#[derive(Debug, clap::Args)]
pub struct NbdFileArgs {
    /// Write the server's pid here once the mount is ready.
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
    /// When the NBD connection breaks (e.g. the server restarted), keep reconnecting and hold
    /// requests for this long; after it, requests fail with EIO.
    #[arg(long, default_value = "120s", value_name = "DURATION")]
    dead_timeout: humantime::Duration,
    /// Existing directory to mount on; the export appears as MOUNTPOINT/disk.
    mountpoint: PathBuf,
    /// The export: nbd://HOST[:PORT][/EXPORT].
    uri: String,
}

pub fn run(args: NbdFileArgs) -> anyhow::Result<ExitCode> {
    nbdfile::run(NbdFileOptions {
        mountpoint: args.mountpoint,
        uri: args.uri,
        pidfile: args.pidfile,
        read_only: args.read_only,
        dead_timeout: args.dead_timeout.into(),
    })?;
    Ok(ExitCode::SUCCESS)
}
