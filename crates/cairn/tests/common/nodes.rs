//! A multi-node `cairn dev` (meta members + one agent process per node) for tests, and the
//! record views its CLI prints.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command};
use std::time::Duration;

use super::{cairn_bin, children_of, proc_alive, run_bounded, send_signal, wait_until};

/// A running multi-node `cairn dev`; SIGKILLed when dropped.
pub struct Cluster {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    pub dir: PathBuf,
    log: PathBuf,
    stopped: bool,
    pub uri: String,
    /// The meta member the record commands ask (any member answers).
    pub meta: String,
}

/// Options of a test cluster: `nodes` agents, `meta` members, a 256 MiB volume of 3 replicas,
/// a 2 s node-down timeout, a 3 s replenish wait and a 2 s I/O timeout.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub nodes: u16,
    pub meta: u16,
    pub size: String,
    pub extra: Vec<String>,
}

impl ClusterOpts {
    pub fn new(nodes: u16) -> ClusterOpts {
        ClusterOpts {
            nodes,
            meta: 1,
            size: "256MiB".into(),
            extra: Vec::new(),
        }
    }

    pub fn meta(mut self, members: u16) -> ClusterOpts {
        self.meta = members;
        self
    }

    pub fn size(mut self, size: &str) -> ClusterOpts {
        size.clone_into(&mut self.size);
        self
    }

    pub fn arg(mut self, a: &str) -> ClusterOpts {
        self.extra.push(a.to_owned());
        self
    }

    /// Starts `cairn dev` and returns once it printed the volume's URI.
    pub fn start(&self, dir: &Path) -> Cluster {
        let uri = "nbd://127.0.0.1:10809/vol0".to_owned();
        let started = super::start_dev(dir, &uri, Duration::from_secs(120), |cmd| {
            cmd.args([
                "--nodes",
                &self.nodes.to_string(),
                "--meta",
                &self.meta.to_string(),
            ])
            .args(["--replicas", "3", "--size", &self.size])
            .args([
                "--node-down-timeout",
                "2s",
                "--replica-replenish-wait",
                "3s",
            ])
            .args(["--io-timeout", "2s"])
            .args(&self.extra);
        });
        Cluster {
            child: started.child,
            _stdout: started.stdout,
            dir: dir.to_owned(),
            log: started.log,
            stopped: false,
            uri,
            meta: "127.0.0.1:10811".into(),
        }
    }
}

impl Cluster {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `cairn ARGS` (default meta and control endpoints); panics unless it exits 0.
    pub fn cli(&self, args: &[&str]) -> String {
        let r = run_bounded(
            Command::new(cairn_bin()).args(args),
            Duration::from_secs(120),
        );
        r.expect_success(&format!("cairn {}", args.join(" ")));
        r.stdout
    }

    /// `cairn ARGS` (must exit 0) parsed as JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("cairn {args:?}: not JSON ({e}): {out}"))
    }

    /// `cairn replica list --volume vol0 --json`.
    pub fn replicas(&self) -> Vec<serde_json::Value> {
        self.json(&[
            "replica", "list", "--volume", "vol0", "--json", "--meta", &self.meta,
        ])
        .as_array()
        .cloned()
        .unwrap_or_default()
    }

    /// `cairn volume get vol0 --json`.
    pub fn volume(&self) -> serde_json::Value {
        self.json(&["volume", "get", "vol0", "--json", "--meta", &self.meta])
    }

    /// `cairn node list --json`.
    pub fn nodes(&self) -> Vec<serde_json::Value> {
        self.json(&["node", "list", "--json"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The engine's status of vol0 (node-1's control endpoint).
    pub fn status(&self) -> serde_json::Value {
        self.json(&["volume", "status", "vol0", "--json"])
    }

    /// Asserts `cairn volume verify vol0` exits 0: every RW replica has the same digest.
    pub fn assert_verified(&self, what: &str) {
        let r = run_bounded(
            Command::new(cairn_bin()).args(["volume", "verify", "vol0"]),
            Duration::from_secs(300),
        );
        assert!(
            r.success(),
            "{what}: cairn volume verify:\n{}{}",
            r.stdout,
            r.stderr
        );
    }

    /// Node `name`'s data directory.
    pub fn node_dir(&self, name: &str) -> PathBuf {
        self.dir.join("nodes").join(name)
    }

    /// Directory of replica `replica` of vol0 on node `node`.
    pub fn replica_dir(&self, node: &str, replica: &str) -> PathBuf {
        self.node_dir(node)
            .join("replicas")
            .join("vol0")
            .join(replica)
    }

    /// The pid of node `name`'s agent, checked to be a child of `cairn dev`.
    pub fn agent_pid(&self, name: &str) -> u32 {
        let path = self.node_dir(name).join("agent.pid");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let pid: u32 = text.trim().parse().expect("pid file holds a pid");
        assert!(
            children_of(self.pid()).contains(&pid),
            "agent of {name} (pid {pid}) is not a child of cairn dev {}",
            self.pid()
        );
        pid
    }

    /// SIGKILLs node `name`'s agent and waits until it is dead; returns its pid.
    pub fn kill_agent(&self, name: &str) -> u32 {
        let pid = self.agent_pid(name);
        send_signal(pid, libc::SIGKILL);
        wait_until(
            &format!("agent of {name} (pid {pid}) to die"),
            Duration::from_secs(10),
            || !proc_alive(pid),
        );
        pid
    }

    /// Kills node `name`'s agent and takes its replica directory's lock, so the agent
    /// `cairn dev` restarts cannot start until the returned lock is dropped (the node stays
    /// dead). `cairn dev` restarts an agent 1 s after it died at the earliest.
    pub fn kill_agent_and_hold(&self, name: &str) -> File {
        self.kill_agent(name);
        let dir = self.node_dir(name).join("replicas");
        let mut lock = None;
        wait_until(
            &format!("the dead agent's lock of {name} (before cairn dev restarts it)"),
            Duration::from_millis(800),
            || {
                lock = cairn_replica::lock_data_dir(&dir).expect("lock the replica directory");
                lock.is_some()
            },
        );
        lock.expect("held")
    }

    /// Stops `cairn dev` with SIGTERM and asserts it exits 0 within 60 s with every process
    /// it started gone.
    pub fn stop(&mut self) {
        let children = children_of(self.pid());
        send_signal(self.pid(), libc::SIGTERM);
        let mut status = None;
        wait_until(
            "cairn dev to exit after SIGTERM",
            Duration::from_secs(60),
            || {
                status = self.child.try_wait().expect("wait");
                status.is_some()
            },
        );
        self.stopped = true;
        assert!(
            status.is_some_and(|s| s.success()),
            "cairn dev exit: {status:?}\n{}",
            self.log()
        );
        for pid in children {
            wait_until(
                &format!("child {pid} to be gone"),
                Duration::from_secs(10),
                || !proc_alive(pid),
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            let children = children_of(self.pid());
            let _ = self.child.kill();
            let _ = self.child.wait();
            for pid in children {
                send_signal(pid, libc::SIGKILL);
            }
        }
    }
}

/// The non-deleted replica records in `replicas`.
pub fn live(replicas: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    replicas.iter().filter(|r| r["deleted"] == false).collect()
}

/// A record field as a string.
pub fn s<'a>(v: &'a serde_json::Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or("")
}

/// node-1's NBD server in a test cluster (vol0's export).
pub const CLUSTER_NBD: &str = "127.0.0.1:10809";

/// Writes `data` at `offset` to vol0 through NBD in 4 MiB pieces, then flushes.
pub fn write_vol0(offset: u64, data: &[u8]) {
    let mut nbd = super::NbdClient::connect(CLUSTER_NBD, "vol0");
    for (k, piece) in data.chunks(4 << 20).enumerate() {
        let at = offset + (k as u64) * (4 << 20);
        nbd.write(at, piece)
            .unwrap_or_else(|e| panic!("write at {at}: NBD error {e}"));
    }
    nbd.flush().expect("flush");
}

/// Reads `want.len()` bytes of vol0 at 0 through NBD (4 MiB at a time) and compares them
/// with `want`.
pub fn assert_vol0(want: &[u8], what: &str) {
    let mut nbd = super::NbdClient::connect(CLUSTER_NBD, "vol0");
    let mut got = Vec::with_capacity(want.len());
    let mut at = 0u64;
    while at < want.len() as u64 {
        let n = u32::try_from((4u64 << 20).min(want.len() as u64 - at)).expect("<= 4 MiB");
        got.extend(
            nbd.read(at, n)
                .unwrap_or_else(|e| panic!("read at {at}: NBD error {e}")),
        );
        at += u64::from(n);
    }
    super::assert_same_bytes(&got, want, what);
}

/// fio writing and verifying vol0 (`size` from `offset`, blocks of `bs`) in a loop until
/// stopped; every run must verify.
pub struct FioLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    runs: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl FioLoop {
    pub fn start(offset: &str, size: &str, bs: &str) -> FioLoop {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop2, runs2) = (stop.clone(), runs.clone());
        let (offset, size, bs) = (offset.to_owned(), size.to_owned(), bs.to_owned());
        let thread = std::thread::spawn(move || {
            let mut seed = 1;
            while !stop2.load(Ordering::Relaxed) {
                let r = run_bounded(
                    Command::new("fio").args([
                        "--name=verify",
                        "--ioengine=nbd",
                        "--uri=nbd://127.0.0.1:10809/vol0",
                        "--rw=randwrite",
                        &format!("--bs={bs}"),
                        &format!("--offset={offset}"),
                        &format!("--size={size}"),
                        "--iodepth=8",
                        "--verify=crc32c",
                        "--verify_fatal=1",
                        "--do_verify=1",
                        "--verify_state_save=0",
                        &format!("--randseed={seed}"),
                    ]),
                    Duration::from_secs(300),
                );
                r.expect_success(&format!("fio write+verify run {seed}"));
                runs2.fetch_add(1, Ordering::Relaxed);
                seed += 1;
            }
        });
        FioLoop { stop, runs, thread }
    }

    /// Runs finished so far.
    pub fn runs(&self) -> u64 {
        self.runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops after the current run; panics if any run failed to verify. Returns the runs.
    pub fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("every fio run verified");
        self.runs.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// `cairn ARGS` expected to fail with exit 1 (a user error) and `why` on stderr.
pub fn refused(args: &[&str], why: &str) {
    let r = run_bounded(
        Command::new(cairn_bin()).args(args),
        Duration::from_secs(60),
    );
    assert_eq!(
        r.status.and_then(|s| s.code()),
        Some(1),
        "cairn {}: exit 1 expected: {r:?}",
        args.join(" ")
    );
    assert!(
        r.stderr.contains(why),
        "cairn {}: stderr should say {why:?}: {r:?}",
        args.join(" ")
    );
}
