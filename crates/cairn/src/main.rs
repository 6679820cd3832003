//! `cairn`: the one binary. Subcommands are grouped by what they act on; each lives in its
//! own module and keeps its flags documented for `--help`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod replica;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Replica(c) => replica::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
