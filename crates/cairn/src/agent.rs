//! `cairn agent`: the node agent in the foreground (see `cairn_agent`), with the node's
//! control endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use cairn_engine::HealConfig;
use cairn_io::EngineChoice;
use clap::Args;

use crate::control;

/// Flags of `cairn agent`.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Name of this node (a DNS-1123 subdomain, as a Kubernetes node name); its Node record's
    /// key. Must be unique in the cluster.
    #[arg(long)]
    pub node: String,
    /// The node's data disk: replicas are stored under DIR/replicas/<volume>/<replica>/.
    /// One agent per directory.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Comma-separated `host:port` of the metadata service's members; any one will do.
    #[arg(long, value_delimiter = ',', default_value = crate::records::DEFAULT_META)]
    pub meta: Vec<String>,
    /// Address of the node's replica server (engines connect here). Its IP is the node's
    /// address: connections to meta are made from it too.
    #[arg(long, default_value = "127.0.0.1:10900")]
    pub replica_listen: SocketAddr,
    /// Address of the NBD server exporting the volumes attached to this node.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: SocketAddr,
    /// Address of the control endpoint (`cairn volume status`, `verify`, `rebuild ...`) of
    /// the volumes attached to this node.
    #[arg(long, default_value = control::DEFAULT_ENDPOINT)]
    pub control_listen: SocketAddr,
    /// Zone label of the node (topology.kubernetes.io/zone); replicas of a volume are spread
    /// over zones first.
    #[arg(long, default_value = "")]
    pub zone: String,
    /// Time between heartbeats; never more than a third of meta's --node-down-timeout.
    #[arg(long, default_value = "1s")]
    pub heartbeat_interval: humantime::Duration,
    /// Engines: how long a replica may take to answer one request before it is failed.
    #[arg(long, default_value = "5s")]
    pub io_timeout: humantime::Duration,
    /// I/O backend of the replica server: auto, uring or portable.
    #[arg(long, default_value = "auto")]
    pub io_engine: EngineChoice,
    /// Engines: a replica back within this time after it failed is resynced from the regions
    /// written meanwhile; a later one is rebuilt in full.
    #[arg(long, default_value = "10m")]
    pub resync_window: humantime::Duration,
    /// Engines: most bytes per second a rebuild or resync copies (e.g. 50MiB); 0 for no limit.
    #[arg(long, default_value = "0")]
    pub rebuild_rate: bytesize::ByteSize,
    /// Engines: how often to flush replicas while writes come in; 0s to never flush unasked.
    #[arg(long, default_value = "2s")]
    pub flush_interval: humantime::Duration,
    /// Engines: do not rebuild or resync ERR replicas (debugging only).
    #[arg(long)]
    pub no_heal: bool,
    /// Worker threads of the runtime running engines and the NBD server.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    cairn_proto::validate_node_name("--node", &args.node).map_err(|e| anyhow::anyhow!("{e}"))?;
    if args.meta.is_empty() {
        anyhow::bail!("--meta needs at least one address");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.threads))
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: AgentArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let engines = Arc::new(control::Engines::managed());
    let control_listener = tokio::net::TcpListener::bind(args.control_listen)
        .await
        .with_context(|| format!("control listen on {}", args.control_listen))?;
    let control_task = tokio::spawn(control::serve(control_listener, engines.clone()));
    let cfg = cairn_agent::AgentConfig {
        node: args.node.clone(),
        data_dir,
        meta: args.meta.clone(),
        replica_listen: args.replica_listen,
        nbd_listen: args.nbd_listen,
        control_listen: args.control_listen,
        zone: args.zone.clone(),
        heartbeat_interval: *args.heartbeat_interval,
        io_timeout: *args.io_timeout,
        io_engine: args.io_engine,
        heal: HealConfig {
            enabled: !args.no_heal,
            resync_window: *args.resync_window,
            rebuild_rate: args.rebuild_rate.as_u64(),
            flush_interval: (!args.flush_interval.is_zero()).then_some(*args.flush_interval),
        },
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(cairn_agent::run(cfg, engines, stop_rx));
    {
        use std::io::Write;
        println!("agent {} started", args.node);
        std::io::stdout().flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut agent = agent;
    let result = tokio::select! {
        r = &mut agent => r,
        _ = tokio::signal::ctrl_c() => { let _ = stop_tx.send(true); agent.await }
        _ = term.recv() => { let _ = stop_tx.send(true); agent.await }
    };
    control_task.abort();
    result.context("agent task")??;
    Ok(ExitCode::SUCCESS)
}
