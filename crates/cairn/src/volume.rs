//! `cairn volume ...`: look at a running volume through the control endpoint.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Subcommand;

use crate::control::{self, ControlReply, ControlRequest, DEFAULT_ENDPOINT};

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Show size, epoch and every replica's address, mode (RW / WO / ERR) and counters.
    Status {
        /// Volume name.
        #[arg(default_value = "vol0")]
        volume: String,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        /// Control endpoint of the running `cairn dev`.
        #[arg(long, default_value = DEFAULT_ENDPOINT)]
        endpoint: SocketAddr,
    },
    /// Compare the content digests of every RW replica, read online; exit 0 when all are
    /// identical, 1 otherwise.
    Verify {
        /// Volume name.
        #[arg(default_value = "vol0")]
        volume: String,
        /// Control endpoint of the running `cairn dev`.
        #[arg(long, default_value = DEFAULT_ENDPOINT)]
        endpoint: SocketAddr,
    },
}

pub fn run(cmd: VolumeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VolumeCommand::Status {
            volume,
            json,
            endpoint,
        } => match control::call(endpoint, &ControlRequest::Status { volume })? {
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
                    "{:<8} {:<22} {:<4} {:>10} {:>10} {:>7} {:>8}  last error",
                    "replica", "address", "mode", "reads", "writes", "errors", "corrupt"
                );
                for r in s.replicas {
                    println!(
                        "{:<8} {:<22} {:<4} {:>10} {:>10} {:>7} {:>8}  {}",
                        r.id,
                        r.addr,
                        r.mode,
                        r.reads,
                        r.writes,
                        r.errors,
                        r.corrupt_reads,
                        r.last_error.unwrap_or_default()
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            ControlReply::Error(e) => anyhow::bail!(e),
            other => anyhow::bail!("unexpected reply {other:?}"),
        },
        VolumeCommand::Verify { volume, endpoint } => {
            match control::call(endpoint, &ControlRequest::Verify { volume })? {
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
    }
}
