//! Shared by the engine's integration tests: in-process replica servers on loopback, an
//! engine configuration over them, data patterns and whole-range reads.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_blockdev::BlockDevice;
use cairn_engine::{Engine, EngineConfig, HealConfig, Mode, ReplicaRecord, ReplicaSpec};

pub const MIB: u64 = 1 << 20;

/// A replica server on its own directory and loopback port, running until the test ends.
pub fn replica_server(dir: &std::path::Path) -> SocketAddr {
    let server = cairn_replica::Server::bind(cairn_replica::ServerConfig {
        dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        engine: cairn_io::EngineChoice::Auto,
        max_frame: cairn_wire::DEFAULT_MAX_FRAME,
        checksums: true,
    })
    .unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());
    addr
}

pub struct Cluster {
    pub _dirs: Vec<tempfile::TempDir>,
    pub addrs: Vec<SocketAddr>,
}

pub fn cluster(n: usize) -> Cluster {
    let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let addrs = dirs.iter().map(|d| replica_server(d.path())).collect();
    Cluster { _dirs: dirs, addrs }
}

pub fn config(addrs: &[SocketAddr], size: u64, epoch: u64, heal: bool) -> EngineConfig {
    EngineConfig {
        volume: "vol".into(),
        size,
        epoch,
        replicas: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| ReplicaSpec {
                id: format!("r{i}"),
                addr: *a,
                mode: Mode::Rw,
            })
            .collect(),
        io_timeout: Duration::from_millis(800),
        on_change: Arc::new(|_: Vec<ReplicaRecord>| Ok(())),
        heal: HealConfig {
            enabled: heal,
            resync_window: Duration::from_secs(600),
            rebuild_rate: 0,
            flush_interval: None,
        },
    }
}

pub fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap_or(0)))
            .collect::<Vec<u8>>(),
    )
}

pub async fn read_all(e: &Engine, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(MIB);
        out.extend_from_slice(&e.read(at, u32::try_from(n).unwrap()).await.unwrap());
        at += n;
    }
    out
}
