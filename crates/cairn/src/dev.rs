//! `cairn dev`: a whole replicated volume on this machine, in the foreground.
//!
//! Layout under `--data-dir`:
//! - `volume.json`: the volume's size, the last engine epoch and each replica's mode (and
//!   address, for replicas served elsewhere), replaced atomically; the epoch is raised
//!   before every engine start, and a replica that failed stays `ERR` across restarts until
//!   it is rebuilt (it may have missed writes);
//! - `replicas/rN/`: replica N's server directory; `replicas/rN.pid` its process id.
//!
//! Each replica server runs as its own child process (killed with us, PR_SET_PDEATHSIG);
//! the engine, the NBD server and the control endpoint run in this process. A replica
//! process that dies is started again with a backoff (1 s doubling to 30 s), and the engine
//! resyncs or rebuilds it (unless `--no-heal`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cairn_engine::{Engine, EngineConfig, HealConfig, Mode, ReplicaSpec};
use cairn_io::EngineChoice;
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::control;

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Number of metadata service members to start (1, 3 or 5), on 127.0.0.1:10811 and up.
    #[arg(long, default_value_t = 1)]
    pub(crate) meta: u16,
    /// Number of storage nodes: agents, each its own process, data directory and loopback
    /// address (127.0.0.2, 127.0.0.3, ... unless --replica-ips gives them).
    #[arg(long, default_value_t = 3)]
    pub(crate) nodes: u16,
    /// Meta: how long a node may go without a heartbeat before it is DOWN.
    #[arg(long, default_value = "10s")]
    pub(crate) node_down_timeout: humantime::Duration,
    /// Meta: how long a DOWN node's replicas wait before they are replaced on another node
    /// (a node back sooner is resynced instead).
    #[arg(long, default_value = "10m")]
    pub(crate) replica_replenish_wait: humantime::Duration,
    /// No metadata service and no agents: one process runs the engine, the NBD server and
    /// the control endpoint, and starts one replica server process per replica (or uses
    /// --replica-addrs). Volume state lives in DIR/volume.json.
    #[arg(long)]
    pub(crate) standalone: bool,
    /// Directory holding everything: the volume state and every replica's data.
    #[arg(long, default_value = "./cairn-data")]
    pub(crate) data_dir: PathBuf,
    /// Number of replicas of the volume. Used when the volume is created.
    #[arg(long, default_value_t = 3)]
    pub(crate) replicas: usize,
    /// Volume size (e.g. 1GiB, 512MiB). Used when the volume is created.
    #[arg(long, default_value = "1GiB")]
    pub(crate) size: bytesize::ByteSize,
    /// Volume name, which is also the NBD export name.
    #[arg(long, default_value = "vol0")]
    pub(crate) volume: String,
    /// Address the NBD server listens on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub(crate) nbd_listen: SocketAddr,
    /// Address of the control endpoint that `cairn volume` commands use.
    #[arg(long, default_value = control::DEFAULT_ENDPOINT)]
    pub(crate) control_listen: SocketAddr,
    /// Comma-separated IP address of each node (agent) or, with --standalone, of each replica
    /// server (one for all, or one per replica; default 127.0.0.1), e.g.
    /// 127.0.0.2,127.0.0.3,127.0.0.4 inside a test network namespace.
    #[arg(long, value_delimiter = ',')]
    pub(crate) replica_ips: Vec<std::net::IpAddr>,
    /// How long a replica may take to answer one request before it is failed (ERR).
    #[arg(long, default_value = "5s")]
    pub(crate) io_timeout: humantime::Duration,
    /// I/O backend of the replica servers: auto, uring or portable.
    #[arg(long, default_value = "auto")]
    pub(crate) io_engine: EngineChoice,
    /// Worker threads of the runtime that runs the engine and the NBD server.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) threads: u16,
    /// Comma-separated addresses of replica servers started elsewhere (`cairn replica
    /// serve`), used instead of starting replica processes when the volume is created.
    #[arg(long, value_delimiter = ',')]
    pub(crate) replica_addrs: Vec<SocketAddr>,
    /// A replica back within this time after it failed is resynced from the regions
    /// written meanwhile; a later one is rebuilt in full.
    #[arg(long, default_value = "10m")]
    pub(crate) resync_window: humantime::Duration,
    /// Most bytes per second a rebuild or resync copies (e.g. 50MiB); 0 for no limit.
    #[arg(long, default_value = "0")]
    pub(crate) rebuild_rate: bytesize::ByteSize,
    /// How often the engine flushes the replicas while writes come in, which bounds what a
    /// restart after an engine crash has to compare; 0s to never flush unasked.
    #[arg(long, default_value = "2s")]
    pub(crate) flush_interval: humantime::Duration,
    /// Do not restart dead replica processes, do not rebuild or resync ERR replicas (they
    /// stay out of the volume, as when debugging a failure).
    #[arg(long)]
    pub(crate) no_heal: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DevState {
    volume: String,
    size: u64,
    epoch: u64,
    replicas: Vec<DevReplica>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DevReplica {
    id: String,
    mode: Mode,
    /// Served elsewhere at this address; `None`: a replica process this command starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<SocketAddr>,
}

const STATE_FILE: &str = "volume.json";

fn save_state(dir: &Path, state: &DevState) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    cairn_store::write_atomic(dir, STATE_FILE, &bytes).map_err(std::io::Error::other)
}

fn load_or_create_state(args: &DevArgs) -> anyhow::Result<DevState> {
    let path = args.data_dir.join(STATE_FILE);
    if path.exists() {
        let state: DevState = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("reading {}", path.display()))?;
        if state.volume != args.volume {
            anyhow::bail!(
                "{} holds volume {:?}, not {:?}",
                args.data_dir.display(),
                state.volume,
                args.volume
            );
        }
        if state.size != args.size.as_u64() {
            tracing::warn!(
                saved = state.size,
                asked = args.size.as_u64(),
                "--size only applies when the volume is created; keeping the saved size"
            );
        }
        return Ok(state);
    }
    if args.replicas == 0 {
        anyhow::bail!("--replicas must be at least 1");
    }
    let size = args.size.as_u64();
    if size == 0 || !size.is_multiple_of(4096) {
        anyhow::bail!("--size must be a non-zero multiple of 4096 bytes");
    }
    let replicas = if args.replica_addrs.is_empty() {
        (1..=args.replicas)
            .map(|i| DevReplica {
                id: format!("r{i}"),
                mode: Mode::Rw,
                address: None,
            })
            .collect()
    } else {
        args.replica_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| DevReplica {
                id: format!("r{}", i + 1),
                mode: Mode::Rw,
                address: Some(*a),
            })
            .collect()
    };
    Ok(DevState {
        volume: args.volume.clone(),
        size,
        epoch: 0,
        replicas,
    })
}

/// Starts one replica server process and returns it with the address it listens on.
async fn spawn_replica(
    args: &DevArgs,
    id: &str,
    ip: std::net::IpAddr,
) -> anyhow::Result<(Child, SocketAddr)> {
    let dir = args.data_dir.join("replicas").join(id);
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("replica")
        .arg("serve")
        .arg("--dir")
        .arg(&dir)
        .arg("--listen")
        .arg(SocketAddr::new(ip, 0).to_string())
        .arg("--io-engine")
        .arg(match args.io_engine {
            EngineChoice::Auto => "auto",
            EngineChoice::Uring => "uring",
            EngineChoice::Portable => "portable",
        })
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting a replica server")?;
    let stdout = child.stdout.take().context("replica stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("replica server did not start within 30 s")??;
    let addr: SocketAddr = line
        .split_whitespace()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("replica {id} printed {line:?}"))?;
    if let Some(pid) = child.id() {
        std::fs::write(
            args.data_dir.join("replicas").join(format!("{id}.pid")),
            pid.to_string(),
        )?;
    }
    tracing::info!(replica = id, %addr, pid = child.id(), "replica server started");
    Ok((child, addr))
}

pub fn run(args: DevArgs) -> anyhow::Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.threads))
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: DevArgs) -> anyhow::Result<std::process::ExitCode> {
    if !args.standalone && args.replica_addrs.is_empty() {
        return crate::dev_cluster::run(args).await;
    }
    std::fs::create_dir_all(args.data_dir.join("replicas"))
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let _lock = cairn_replica::lock_data_dir(&args.data_dir)?.with_context(|| {
        format!(
            "another cairn dev is running on {}",
            args.data_dir.display()
        )
    })?;
    let mut state = load_or_create_state(&args)?;
    let heal = !args.no_heal;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut supervisors = Vec::new();
    let mut specs = Vec::new();
    let mut managed = Vec::new();
    for (i, r) in state.replicas.iter().enumerate() {
        if let Some(addr) = r.address {
            specs.push(ReplicaSpec {
                id: r.id.clone(),
                addr,
                mode: r.mode,
            });
            continue;
        }
        let ip = args
            .replica_ips
            .get(i)
            .or(args.replica_ips.first())
            .copied()
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        if r.mode == Mode::Err && !heal {
            tracing::warn!(replica = %r.id, "replica is ERR (it may have missed writes); not started (--no-heal)");
            specs.push(ReplicaSpec {
                id: r.id.clone(),
                addr: SocketAddr::new(ip, 0),
                mode: Mode::Err,
            });
            continue;
        }
        let (child, addr) = spawn_replica(&args, &r.id, ip).await?;
        managed.push((r.id.clone(), ip, child));
        specs.push(ReplicaSpec {
            id: r.id.clone(),
            addr,
            mode: r.mode,
        });
    }

    // Start above every epoch a replica has accepted: replicas served elsewhere may have
    // seen an engine this directory does not know of.
    let mut epoch = state.epoch;
    for s in &specs {
        if s.mode == Mode::Err {
            continue;
        }
        match cairn_engine::probe_epoch(s.addr, &state.volume, &s.id, *args.io_timeout).await {
            Ok(e) => epoch = epoch.max(e),
            Err(e) => tracing::warn!(replica = %s.id, error = %e, "cannot ask the replica's epoch"),
        }
    }
    state.epoch = epoch + 1;
    save_state(&args.data_dir, &state)?;

    let hook_dir = args.data_dir.clone();
    let hook_state = std::sync::Mutex::new(state.clone());
    let engine = Engine::start(EngineConfig {
        volume: state.volume.clone(),
        size: state.size,
        epoch: state.epoch,
        replicas: specs,
        io_timeout: *args.io_timeout,
        on_change: Arc::new(move |members| {
            let mut s = hook_state.lock().unwrap_or_else(|p| p.into_inner());
            let old = std::mem::take(&mut s.replicas);
            s.replicas = members
                .into_iter()
                .map(|m| {
                    let managed = old.iter().any(|r| r.id == m.id && r.address.is_none());
                    DevReplica {
                        id: m.id,
                        mode: m.mode,
                        address: (!managed).then_some(m.addr),
                    }
                })
                .collect();
            save_state(&hook_dir, &s)
        }),
        heal: HealConfig {
            enabled: heal,
            resync_window: *args.resync_window,
            rebuild_rate: args.rebuild_rate.as_u64(),
            flush_interval: (!args.flush_interval.is_zero()).then_some(*args.flush_interval),
        },
    })
    .await;

    for (id, ip, child) in managed {
        supervisors.push(tokio::spawn(supervise(
            args.clone(),
            id,
            ip,
            child,
            engine.clone(),
            heal,
            stop_rx.clone(),
        )));
    }

    let mut nbd = cairn_nbd::NbdServer::new();
    let engines = Arc::new(control::Engines::default());
    engines.insert(&state.volume, engine.clone());
    nbd.add_export(&state.volume, "Cairn replicated volume", engine.clone());
    let nbd = Arc::new(nbd);
    let nbd_listener = tokio::net::TcpListener::bind(args.nbd_listen)
        .await
        .with_context(|| format!("NBD listen on {}", args.nbd_listen))?;
    let control_listener = tokio::net::TcpListener::bind(args.control_listen)
        .await
        .with_context(|| format!("control listen on {}", args.control_listen))?;
    let nbd_task = tokio::spawn(nbd.serve(nbd_listener));
    let control_task = tokio::spawn(control::serve(control_listener, engines));

    let status = engine.status();
    let live = status
        .replicas
        .iter()
        .filter(|r| r.mode == Mode::Rw)
        .count();
    tracing::info!(volume = %state.volume, epoch = state.epoch, live, replicas = status.replicas.len(), "volume ready");
    println!("nbd://{}/{}", args.nbd_listen, state.volume);
    use std::io::Write;
    std::io::stdout().flush()?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
        _ = term.recv() => tracing::info!("terminated; stopping"),
    }
    nbd_task.abort();
    control_task.abort();
    use cairn_blockdev::BlockDevice;
    if let Err(e) = tokio::time::timeout(*args.io_timeout, engine.flush()).await {
        tracing::warn!(error = %e, "final flush timed out");
    }
    engine.shutdown();
    let _ = stop_tx.send(true);
    for s in supervisors {
        let _ = s.await;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Owns one replica process: when it dies, starts it again after a backoff (1 s, doubling
/// to 30 s; back to 1 s once it ran for a minute) and gives the engine its new address.
/// Stops it (SIGTERM, then SIGKILL after 10 s) when `stop` turns true.
async fn supervise(
    args: DevArgs,
    id: String,
    ip: std::net::IpAddr,
    child: Child,
    engine: Arc<Engine>,
    restart: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let pid_file = args.data_dir.join("replicas").join(format!("{id}.pid"));
    let mut child = Some(child);
    let mut spawned = std::time::Instant::now();
    let mut backoff = Duration::from_secs(1);
    loop {
        if let Some(c) = child.as_mut() {
            tokio::select! {
                status = c.wait() => {
                    tracing::error!(replica = %id, ?status, "replica server exited");
                    if spawned.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_secs(1);
                    }
                }
                () = stopped(&mut stop) => {
                    terminate(&id, c, Duration::from_secs(10)).await;
                    break;
                }
            }
            child = None;
            if !restart {
                stopped(&mut stop).await;
                break;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut stop) => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
        match spawn_replica(&args, &id, ip).await {
            Ok((c, addr)) => {
                child = Some(c);
                spawned = std::time::Instant::now();
                engine.set_replica_addr(&id, addr);
            }
            Err(e) => {
                tracing::error!(replica = %id, error = %e, "cannot restart the replica server")
            }
        }
    }
    let _ = std::fs::remove_file(pid_file);
}

/// Returns once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// SIGTERM, then SIGKILL if the process is still there after `grace`.
pub(crate) async fn terminate(id: &str, child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(_) => tracing::info!(child = %id, "stopped"),
        Err(_) => {
            let _ = child.kill().await;
        }
    }
}
