//! `cairn meta`: one member of the metadata service. It serves the `cairn.v1.Meta` API
//! (clients) and the `cairn.v1.Raft` service (other members) on one gRPC address and keeps
//! its Raft log and records in `--data-dir`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

/// Flags of `cairn meta`.
#[derive(Debug, Args)]
pub struct MetaArgs {
    /// Raft id of this member: a positive integer, unique in the cluster and never reused.
    #[arg(long)]
    id: u64,
    /// `host:port` to serve gRPC on (Meta and Raft). Other members and clients reach this
    /// member at this address, so it must not be a wildcard address.
    #[arg(long, default_value = "127.0.0.1:10811")]
    listen: String,
    /// Directory of this member's Raft log and records (created if missing). One process per
    /// directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// Initialize a new cluster made of `--members`. Give it to one member, once; a member
    /// that is already initialized ignores it.
    #[arg(long, requires = "members")]
    init: bool,
    /// The initial members with `--init`: `ID=HOST:PORT` pairs separated by commas, e.g.
    /// `1=10.0.0.1:7400,2=10.0.0.2:7400,3=10.0.0.3:7400`. Must include this member.
    #[arg(long, value_parser = parse_members)]
    members: Option<BTreeMap<u64, String>>,
    /// How long a node may go without a heartbeat before it is DOWN, e.g. `10s` or `500ms`.
    /// Heartbeat answers it, so agents heartbeat well within it.
    #[arg(long, default_value = "10s")]
    node_down_timeout: humantime::Duration,
    /// How long the replicas of a DOWN node are waited for, counted after `--node-down-timeout`,
    /// before meta replaces them on other nodes and has them rebuilt, e.g. `10m` or `30s`. A
    /// node back sooner keeps its replicas (its volumes' engines resync them); one back later
    /// finds them deleted and its agent removes their data.
    #[arg(long, default_value = "10m")]
    replica_replenish_wait: humantime::Duration,
}

fn parse_members(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|e| format!("{part:?}: bad id: {e}"))?;
        if id == 0 || addr.trim().is_empty() {
            return Err(format!("{part:?}: expected a positive ID and an address"));
        }
        if out.insert(id, addr.trim().to_owned()).is_some() {
            return Err(format!("member {id} given twice"));
        }
    }
    if out.is_empty() {
        return Err("no members given".into());
    }
    Ok(out)
}

/// Runs the member until killed.
pub fn run(args: MetaArgs) -> anyhow::Result<ExitCode> {
    if args.id == 0 {
        bail!("--id must be positive");
    }
    if args.node_down_timeout.is_zero() {
        bail!("--node-down-timeout must be positive");
    }
    if let Some(m) = &args.members {
        if m.get(&args.id) != Some(&args.listen) {
            bail!(
                "--members must list this member as {}={}",
                args.id,
                args.listen
            );
        }
    }
    let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: MetaArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create {}", args.data_dir.display()))?;
    let _lock = cairn_replica::lock_data_dir(&args.data_dir)?.with_context(|| {
        format!(
            "another cairn meta is running on {}",
            args.data_dir.display()
        )
    })?;
    let member = cairn_meta::start_member(args.id, &args.data_dir)
        .await
        .map_err(|e| anyhow::anyhow!("start member {}: {e}", args.id))?
        .with_node_down_timeout(args.node_down_timeout.into())
        .with_replica_replenish_wait(args.replica_replenish_wait.into());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
        .map_err(|e| anyhow::anyhow!("listen on {}: {e}", args.listen))?;
    let server = tokio::spawn(member.router().serve_with_incoming(incoming));
    if args.init {
        let members = args.members.as_ref().context("--init needs --members")?;
        member
            .initialize(members)
            .await
            .map_err(|e| anyhow::anyhow!("initialize: {e}"))?;
    }
    let mut out = std::io::stdout();
    writeln!(out, "meta {} listening on {}", args.id, args.listen)?;
    out.flush()?;
    server
        .await
        .context("gRPC server task")?
        .context("gRPC server")?;
    Ok(ExitCode::SUCCESS)
}
