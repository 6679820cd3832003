//! `cairn dev` (default mode): a whole cluster on this machine, in the foreground.
//!
//! It starts `--meta` metadata members (127.0.0.1:10811, :10812, ...) and `--nodes` agents,
//! each a separate process with its own data directory and its own loopback address
//! (127.0.0.2, 127.0.0.3, ... or `--replica-ips`), creates and attaches the volume on first
//! start, and prints its NBD URI. Node 1's agent serves NBD and its control endpoint on
//! `--nbd-listen` and `--control-listen` (the addresses `cairn volume` uses by default);
//! other nodes on port 10809 / 10810 of their own address.
//!
//! Layout under `--data-dir`: `meta/mN/` (member N's Raft log and records, `meta.pid`) and
//! `nodes/node-N/` (the node's disk: `replicas/<volume>/<replica>/`, `agent.pid`).
//!
//! Every child is killed with this process (PR_SET_PDEATHSIG) and started again with a
//! backoff (1 s doubling to 30 s) when it dies. Ctrl-C or SIGTERM stops the agents first
//! (they flush their engines), then the members.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use cairn_io::EngineChoice;
use cairn_proto::v1::{record, CreateRequest, Kind, NodeState, Record, Volume, VolumeState};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::dev::DevArgs;
use crate::{records, volume};

/// First meta member's port; member N listens on 127.0.0.1:(META_PORT + N - 1).
const META_PORT: u16 = 10811;

/// One supervised child process.
#[derive(Clone)]
struct ChildSpec {
    name: String,
    args: Vec<OsString>,
    pid_file: PathBuf,
}

pub async fn run(args: DevArgs) -> anyhow::Result<std::process::ExitCode> {
    if !matches!(args.meta, 1 | 3 | 5) {
        anyhow::bail!("--meta must be 1, 3 or 5");
    }
    if args.nodes == 0 {
        anyhow::bail!("--nodes must be at least 1");
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let _lock = cairn_replica::lock_data_dir(&data_dir)?
        .with_context(|| format!("another cairn dev is running on {}", data_dir.display()))?;
    let exe = std::env::current_exe()?;

    let members: Vec<(u64, String)> = (1..=args.meta)
        .map(|i| (u64::from(i), format!("127.0.0.1:{}", META_PORT + i - 1)))
        .collect();
    let member_list = members
        .iter()
        .map(|(i, a)| format!("{i}={a}"))
        .collect::<Vec<_>>()
        .join(",");
    let meta_addrs = members
        .iter()
        .map(|(_, a)| a.clone())
        .collect::<Vec<_>>()
        .join(",");
    let mut metas = Vec::new();
    for (id, addr) in &members {
        let dir = data_dir.join("meta").join(format!("m{id}"));
        std::fs::create_dir_all(&dir)?;
        let mut a: Vec<OsString> = vec![
            "meta".into(),
            "--id".into(),
            id.to_string().into(),
            "--listen".into(),
            addr.into(),
            "--data-dir".into(),
            dir.clone().into(),
            "--node-down-timeout".into(),
            args.node_down_timeout.to_string().into(),
            "--replica-replenish-wait".into(),
            args.replica_replenish_wait.to_string().into(),
        ];
        if *id == 1 {
            a.extend([
                "--init".into(),
                "--members".into(),
                member_list.clone().into(),
            ]);
        }
        metas.push(ChildSpec {
            name: format!("meta-{id}"),
            args: a,
            pid_file: dir.join("meta.pid"),
        });
    }

    let mut agents = Vec::new();
    let mut node1 = None;
    for j in 1..=args.nodes {
        let ip = match args.replica_ips.get(usize::from(j - 1)) {
            Some(ip) => *ip,
            None if !args.replica_ips.is_empty() => {
                anyhow::bail!(
                    "--replica-ips gives {} addresses for {} nodes",
                    args.replica_ips.len(),
                    args.nodes
                )
            }
            None => IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                u8::try_from(j + 1).context("--nodes is at most 253")?,
            )),
        };
        let name = format!("node-{j}");
        let dir = data_dir.join("nodes").join(&name);
        std::fs::create_dir_all(&dir)?;
        let (nbd, control) = if j == 1 {
            (args.nbd_listen, args.control_listen)
        } else {
            (SocketAddr::new(ip, 10809), SocketAddr::new(ip, 10810))
        };
        if j == 1 {
            node1 = Some(name.clone());
        }
        let mut a: Vec<OsString> = vec![
            "agent".into(),
            "--node".into(),
            name.clone().into(),
            "--data-dir".into(),
            dir.clone().into(),
            "--meta".into(),
            meta_addrs.clone().into(),
            "--replica-listen".into(),
            SocketAddr::new(ip, 10900).to_string().into(),
            "--nbd-listen".into(),
            nbd.to_string().into(),
            "--control-listen".into(),
            control.to_string().into(),
            "--io-timeout".into(),
            args.io_timeout.to_string().into(),
            "--io-engine".into(),
            match args.io_engine {
                EngineChoice::Auto => "auto",
                EngineChoice::Uring => "uring",
                EngineChoice::Portable => "portable",
            }
            .into(),
            "--resync-window".into(),
            args.resync_window.to_string().into(),
            "--rebuild-rate".into(),
            args.rebuild_rate.as_u64().to_string().into(),
            "--flush-interval".into(),
            args.flush_interval.to_string().into(),
            "--threads".into(),
            args.threads.to_string().into(),
        ];
        if args.no_heal {
            a.push("--no-heal".into());
        }
        agents.push(ChildSpec {
            name,
            args: a,
            pid_file: dir.join("agent.pid"),
        });
    }

    let (stop_metas, metas_rx) = tokio::sync::watch::channel(false);
    let mut meta_tasks = Vec::new();
    for spec in metas {
        let child = spawn(&exe, &spec).await?;
        meta_tasks.push(tokio::spawn(supervise(
            exe.clone(),
            spec,
            child,
            metas_rx.clone(),
        )));
    }
    let mut agent_tasks = Vec::new();
    for spec in agents {
        let child = spawn(&exe, &spec).await?;
        let (stop, rx) = tokio::sync::watch::channel(false);
        let name = spec.name.clone();
        agent_tasks.push((
            name,
            stop,
            tokio::spawn(supervise(exe.clone(), spec, child, rx)),
        ));
    }

    let meta = members[0].1.clone();
    let node1 = node1.context("no node")?;
    let ready = tokio::time::timeout(
        Duration::from_secs(120),
        prepare_volume(&args, &meta, &node1),
    )
    .await;
    let uri = match ready {
        Ok(Ok(uri)) => Some(uri),
        Ok(Err(e)) => {
            tracing::error!(error = %format!("{e:#}"), "cannot prepare the volume");
            None
        }
        Err(_) => {
            tracing::error!("the volume was not ready within 120 s");
            None
        }
    };
    if let Some(uri) = &uri {
        use std::io::Write;
        println!("{uri}");
        std::io::stdout().flush()?;
    }
    if uri.is_some() {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
            _ = term.recv() => tracing::info!("terminated; stopping"),
        }
    }
    // Agents running engines first (they flush them while every replica still serves),
    // then the other agents, then the members.
    let engine_nodes: Vec<String> = match tokio::time::timeout(
        Duration::from_secs(5),
        records::list(&meta, Kind::Volume, None, None),
    )
    .await
    {
        Ok(Ok(vols)) => vols
            .iter()
            .filter_map(|v| match v {
                record::Record::Volume(v) if !v.attached_node.is_empty() => {
                    Some(v.attached_node.clone())
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let (first, rest): (Vec<_>, Vec<_>) = agent_tasks
        .into_iter()
        .partition(|(name, _, _)| engine_nodes.contains(name));
    for group in [first, rest] {
        for (_, stop, _) in &group {
            let _ = stop.send(true);
        }
        for (_, _, task) in group {
            let _ = task.await;
        }
    }
    let _ = stop_metas.send(true);
    for t in meta_tasks {
        let _ = t.await;
    }
    Ok(if uri.is_some() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}

/// Waits for every node, creates the volume if it is new, attaches it to node 1 if it is
/// attached nowhere, waits for the export; returns its URI.
async fn prepare_volume(args: &DevArgs, meta: &str, node1: &str) -> anyhow::Result<String> {
    let mut client = records::client(meta)?;
    // Nodes up.
    loop {
        match records::list(meta, Kind::Node, None, None).await {
            Ok(nodes) => {
                let up = nodes
                    .iter()
                    .filter(|n| matches!(n, record::Record::Node(n) if n.state == NodeState::Up as i32 && !n.nbd_address.is_empty()))
                    .count();
                if up >= usize::from(args.nodes) {
                    break;
                }
            }
            Err(e) => tracing::debug!(error = %e, "waiting for meta"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The volume.
    let name = args.volume.as_str();
    let v = match volume::get_volume_async(&mut client, meta, name).await {
        Ok(v) => {
            if v.size_bytes != args.size.as_u64() {
                tracing::warn!(
                    saved = v.size_bytes,
                    asked = args.size.as_u64(),
                    "--size only applies when the volume is created; keeping its size"
                );
            }
            v
        }
        Err(e) if e.downcast_ref::<records::UserError>().is_some() => {
            cairn_proto::validate_name("--volume", name).map_err(|e| anyhow::anyhow!("{e}"))?;
            cairn_proto::validate_volume_size(args.size.as_u64())
                .map_err(|e| anyhow::anyhow!("--size: {e}"))?;
            let rec = Record {
                record: Some(record::Record::Volume(Volume {
                    name: name.to_owned(),
                    size_bytes: args.size.as_u64(),
                    replica_count: u32::try_from(args.replicas).context("--replicas")?,
                    state: VolumeState::Creating as i32,
                    state_reason: "waiting for scheduling".into(),
                    ..Default::default()
                })),
            };
            client
                .create(CreateRequest { record: Some(rec) })
                .await
                .map_err(|s| records::status_error(meta, &s))?;
            tracing::info!(
                volume = name,
                size = args.size.as_u64(),
                replicas = args.replicas,
                "volume created"
            );
            volume::get_volume_async(&mut client, meta, name).await?
        }
        Err(e) => return Err(e),
    };
    let mut v = v;
    while v.state == VolumeState::Creating as i32 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        v = volume::get_volume_async(&mut client, meta, name).await?;
    }
    let node = if v.attached_node.is_empty() {
        node1.to_owned()
    } else {
        v.attached_node.clone()
    };
    let (v, n) = volume::attach_async(meta, name, &node).await?;
    volume::wait_served(&n, &v, Duration::from_secs(60)).await?;
    Ok(format!("nbd://{}/{}", n.nbd_address, v.name))
}

/// Starts one child and waits for its first stdout line (it prints one when it serves).
async fn spawn(exe: &Path, spec: &ChildSpec) -> anyhow::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.args(&spec.args)
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
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", spec.name))?;
    if let Some(pid) = child.id() {
        std::fs::write(&spec.pid_file, pid.to_string())?;
    }
    let stdout = child.stdout.take().context("child stdout")?;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stdout);
    match tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => anyhow::bail!("{} exited while starting (see its log above)", spec.name),
        Err(_) => anyhow::bail!("{} did not start within 30 s", spec.name),
    }
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move {
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut reader, &mut sink).await;
    });
    tracing::info!(child = %spec.name, pid = child.id(), "started");
    Ok(child)
}

/// Owns one child: when it dies, starts it again after a backoff (1 s doubling to 30 s;
/// back to 1 s once it ran for a minute). Stops it (SIGTERM, then SIGKILL after 30 s) when
/// `stop` turns true.
async fn supervise(
    exe: PathBuf,
    spec: ChildSpec,
    child: Child,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut child = Some(child);
    let mut spawned = std::time::Instant::now();
    let mut backoff = Duration::from_secs(1);
    loop {
        if let Some(c) = child.as_mut() {
            tokio::select! {
                status = c.wait() => {
                    tracing::error!(child = %spec.name, ?status, "exited");
                    if spawned.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_secs(1);
                    }
                }
                () = crate::dev::stopped(&mut stop) => {
                    crate::dev::terminate(&spec.name, c, Duration::from_secs(30)).await;
                    break;
                }
            }
            child = None;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = crate::dev::stopped(&mut stop) => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
        match spawn(&exe, &spec).await {
            Ok(c) => {
                child = Some(c);
                spawned = std::time::Instant::now();
            }
            Err(e) => {
                tracing::error!(child = %spec.name, error = %format!("{e:#}"), "cannot restart")
            }
        }
    }
    let _ = std::fs::remove_file(&spec.pid_file);
}
