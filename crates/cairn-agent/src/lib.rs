//! cairn-agent: one per storage node. It registers its node and disk with the metadata
//! service, heartbeats, watches the records, and reconciles:
//!
//! - it serves every replica placed on the node (one replica server for the node's disk;
//!   a replica is created by the first engine Hello that asks for it);
//! - it runs the engine, NBD export and control entry of every volume attached to the node,
//!   at an epoch it raises in meta first (a Raft write, so no two engines share one);
//! - it keeps each engine's replica set equal to the volume's replica records (adds new
//!   ones, which the engine rebuilds; removes deleted ones) and writes the engine's view of
//!   each replica (RW / WO / ERR) back to its record before the engine goes on;
//! - it grows a running engine online when the volume record's size grows (`cairn volume
//!   expand`): the replicas first, then the engine's size, which new NBD connections see
//!   (a detached volume's replicas grow when its next engine starts);
//! - it stops what meta no longer wants: an engine whose volume is detached or moved, the
//!   data of a replica meta marked `deleted` (and then deletes that record). It never
//!   deletes replica data that meta has not marked deleted.
//!
//! Restarting an agent does not touch data: replicas reopen from disk, and engines start
//! again at a new epoch and recover as after an engine crash.

mod engines;
pub mod meta;
mod reconcile;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cairn_engine::{Engine, HealConfig};
use cairn_io::EngineChoice;
use cairn_proto::v1::{Disk, HeartbeatRequest};

pub use engines::Engines;

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name (a DNS-1123 subdomain), the key of its Node record.
    pub node: String,
    /// The node's disk: replicas live under `data_dir/replicas/<volume>/<replica>/`.
    pub data_dir: PathBuf,
    /// `host:port` of meta members.
    pub meta: Vec<String>,
    /// Replica server address; its IP is the node's address (also the source address of
    /// connections to meta).
    pub replica_listen: SocketAddr,
    /// NBD server address for volumes attached here.
    pub nbd_listen: SocketAddr,
    /// Control endpoint address (served by the caller; published in the Node record).
    pub control_listen: SocketAddr,
    /// Zone label; empty for none.
    pub zone: String,
    /// Time between heartbeats (capped at a third of meta's node-down timeout).
    pub heartbeat_interval: Duration,
    /// Engines: how long a replica may take to answer one request.
    pub io_timeout: Duration,
    /// Replica server I/O backend.
    pub io_engine: EngineChoice,
    /// Engines: rebuild / resync settings.
    pub heal: HealConfig,
}

/// Runs the agent until `stop` turns true: then stops every engine it runs (flushing
/// them) and returns. The replica server thread ends with the process.
pub async fn run(
    cfg: AgentConfig,
    engines: Arc<Engines>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let replica_dir = cfg.data_dir.join("replicas");
    let server = cairn_replica::Server::bind(cairn_replica::ServerConfig {
        dir: replica_dir.clone(),
        listen: cfg.replica_listen,
        engine: cfg.io_engine,
        max_frame: cairn_wire::DEFAULT_MAX_FRAME,
        checksums: true,
    })
    .context("starting the replica server")?;
    let replica_addr = server.local_addr()?;
    let handle = server.handle();
    std::thread::Builder::new()
        .name("cairn-replica-accept".into())
        .spawn(move || {
            if let Err(e) = server.run() {
                tracing::error!(error = %e, "replica server stopped");
            }
        })?;

    let nbd = Arc::new(cairn_nbd::NbdServer::<Engine>::new());
    let nbd_listener = tokio::net::TcpListener::bind(cfg.nbd_listen)
        .await
        .with_context(|| format!("NBD listen on {}", cfg.nbd_listen))?;
    let nbd_addr = nbd_listener.local_addr()?;
    let nbd_task = tokio::spawn(nbd.clone().serve(nbd_listener));

    let conn = meta::MetaConn::new(cfg.meta.clone(), replica_addr.ip());
    let node = Arc::new(NodeInfo {
        cfg: cfg.clone(),
        replica_addr,
        nbd_addr,
        replica_dir,
    });
    tracing::info!(node = %cfg.node, replica = %replica_addr, nbd = %nbd_addr, control = %cfg.control_listen, "agent started");
    let hb = tokio::spawn(heartbeat(node.clone(), conn.clone(), stop.clone()));
    let mut rec = reconcile::Reconciler::new(node, conn, engines, nbd, handle);
    rec.run(&mut stop).await;
    hb.abort();
    nbd_task.abort();
    Ok(())
}

/// What the tasks of one agent share about its node.
pub(crate) struct NodeInfo {
    pub(crate) cfg: AgentConfig,
    pub(crate) replica_addr: SocketAddr,
    pub(crate) nbd_addr: SocketAddr,
    pub(crate) replica_dir: PathBuf,
}

/// Capacity and free bytes of the filesystem holding `dir`.
fn disk(dir: &std::path::Path) -> Disk {
    let (capacity_bytes, free_bytes) = match rustix::fs::statvfs(dir) {
        Ok(s) => (
            s.f_blocks.saturating_mul(s.f_frsize),
            s.f_bavail.saturating_mul(s.f_frsize),
        ),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "statvfs failed");
            (0, 0)
        }
    };
    Disk {
        path: dir.display().to_string(),
        capacity_bytes,
        free_bytes,
    }
}

/// Heartbeats until `stop`: the first one registers the node with its addresses.
async fn heartbeat(
    node: Arc<NodeInfo>,
    conn: meta::MetaConn,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut interval = node.cfg.heartbeat_interval;
    let mut failing = false;
    loop {
        let req = HeartbeatRequest {
            node: node.cfg.node.clone(),
            disks: vec![disk(&node.replica_dir)],
            address: node.replica_addr.to_string(),
            zone: node.cfg.zone.clone(),
            nbd_address: node.nbd_addr.to_string(),
            control_address: node.cfg.control_listen.to_string(),
        };
        match conn
            .call(|mut c| async move { c.heartbeat(req).await })
            .await
        {
            Ok(r) => {
                if failing {
                    tracing::info!("heartbeats accepted again");
                    failing = false;
                }
                let down = Duration::from_millis(r.node_down_timeout_ms);
                interval = node
                    .cfg
                    .heartbeat_interval
                    .min(down / 3)
                    .max(Duration::from_millis(50));
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(code = ?e.code(), error = e.message(), "heartbeat failed");
                    failing = true;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
