//! Helpers for the `cluster_*` tests: a private network namespace per test thread, a guard
//! around a real `cairn dev` (replica processes, engine, NBD server), bounded runs of the
//! real clients (qemu-io, nbdcopy, fio...), and polling with a deadline.
//!
//! Every cluster test first calls [`enter_private_netns`]: inside the namespace nothing else
//! listens, so `cairn dev` uses its default ports and the replicas 127.0.0.2-4, and tests in
//! one binary run in parallel threads without meeting each other. Children spawned from the
//! test thread (and threads it starts) inherit its namespace.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{cairn_bin, log_path, ToolOutput};

/// Where `cairn dev` serves NBD inside a test's namespace (its default).
pub const NBD_ADDR: &str = "127.0.0.1:10809";
/// Its control endpoint (the default of `cairn volume`).
pub const CONTROL_ADDR: &str = "127.0.0.1:10810";
/// The export every cluster test uses.
pub const NBD_URI: &str = "nbd://127.0.0.1:10809/vol0";
/// One loopback address per replica server.
pub const REPLICA_IPS: &str = "127.0.0.2,127.0.0.3,127.0.0.4";
/// The volume size every cluster test uses.
pub const DEV_SIZE: u64 = 256 << 20;

/// Moves the calling test thread into a new, private network namespace with `lo` up.
///
/// Returns false (after printing `SKIP: ...`) when that is not possible here (not root, no
/// namespaces, no `ip`): the test should return early.
pub fn enter_private_netns() -> bool {
    // SAFETY: geteuid(2) has no preconditions and touches no memory of ours.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: needs root for a private network namespace");
        return false;
    }
    // SAFETY: unshare(2) with CLONE_NEWNET only moves the calling thread into a new network
    // namespace; it touches no memory of ours. Threads and processes started from this thread
    // afterwards inherit the namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        println!(
            "SKIP: needs root for a private network namespace (unshare: {})",
            std::io::Error::last_os_error()
        );
        return false;
    }
    match Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .stdin(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => true,
        other => {
            println!(
                "SKIP: needs root for a private network namespace (ip link set lo up: {other:?})"
            );
            false
        }
    }
}

/// True when `tool` is an executable in `PATH`.
pub fn have_tool(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            std::fs::metadata(d.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// True when every tool is installed; otherwise prints `SKIP: ...` naming the missing ones.
pub fn have_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    if missing.is_empty() {
        return true;
    }
    println!(
        "SKIP: {} not installed (apt-get install -y libnbd-bin nbdkit fio e2fsprogs fuse3 qemu-utils)",
        missing.join(", ")
    );
    false
}

/// Polls `cond` until it holds; panics naming `what` when `limit` passes first. The pause
/// between polls only paces the polling: nothing relies on it for ordering.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------ processes

/// State letter of process `pid` from `/proc/PID/stat`, `None` when it is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    stat_state(&format!("/proc/{pid}/stat"))
}

fn stat_state(path: &str) -> Option<char> {
    let stat = std::fs::read_to_string(path).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

fn exited(state: Option<char>) -> bool {
    matches!(state, None | Some('Z' | 'X' | 'x'))
}

/// True while any thread of `pid` runs (or is stopped). A killed process whose leader is
/// already a zombie still counts while other threads (io_uring workers, say) are exiting:
/// they share its file table, so its files and locks are only released when the last goes.
pub fn proc_alive(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return !exited(proc_state(pid));
    };
    tasks.flatten().any(|task| {
        let path = task.path().join("stat");
        !exited(stat_state(&path.to_string_lossy()))
    })
}

/// Process ids whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so cut after the last ')'.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        if after.split_whitespace().nth(1).and_then(|s| s.parse().ok()) == Some(parent) {
            found.push(pid);
        }
    }
    found
}

/// Sends `sig` to `pid`.
pub fn send_signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) touches no memory of ours; callers pass pids of processes they started
    // (directly or through `cairn dev`) and have checked are still there.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// What a bounded run of a command left.
#[derive(Debug)]
pub struct Run {
    /// `None` when the command was killed at the deadline.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Panics (showing the output) unless the command exited 0.
    pub fn expect_success(&self, what: &str) -> &Run {
        assert!(
            self.success(),
            "{what}: {:?} after {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.elapsed,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A running child process whose output is collected; killed (SIGKILL) and reaped on drop.
pub struct Proc {
    child: Option<Child>,
    what: String,
    started: Instant,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
}

fn collect(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout/stderr collected.
    pub fn spawn(cmd: &mut Command, what: &str) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
        let out = child.stdout.take().map(collect);
        let err = child.stderr.take().map(collect);
        Proc {
            child: Some(child),
            what: what.to_owned(),
            started: Instant::now(),
            out,
            err,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// True once the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Waits for the process to exit, at most `limit` from its start; kills it at the
    /// deadline (then `status` is `None`).
    pub fn finish(mut self, limit: Duration) -> Run {
        let mut child = self.child.take().expect("not finished yet");
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if self.started.elapsed() >= limit => {
                    eprintln!("{}: still running after {limit:?}; killing it", self.what);
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("{}: wait: {e}", self.what),
            }
        };
        let elapsed = self.started.elapsed();
        let stdout = self
            .out
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let stderr = self
            .err
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        Run {
            status,
            stdout,
            stderr,
            elapsed,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` to completion, killing it after `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Run {
    let what = format!("{cmd:?}");
    Proc::spawn(cmd, &what).finish(limit)
}

/// Runs `program ARGS...`, bounded by two minutes, and asserts it exits 0.
pub fn run_ok(program: &str, args: &[&str]) -> Run {
    let r = run_bounded(Command::new(program).args(args), Duration::from_secs(120));
    r.expect_success(&format!("{program} {}", args.join(" ")));
    r
}

/// `/proc/net/tcp` state of an established connection.
pub const TCP_ESTABLISHED: u8 = 0x01;

/// States (as `/proc/net/tcp` numbers them) of the TCP sockets in the calling thread's network
/// namespace whose remote end is `peer` (`IPv4:PORT`).
pub fn tcp_states_to(peer: &str) -> Vec<u8> {
    let peer: std::net::SocketAddrV4 = peer.parse().expect("an IPv4 peer address");
    // The kernel prints the address as the raw (network order) word in host order, and the
    // port in host order.
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(peer.ip().octets()),
        peer.port()
    );
    // thread-self: network namespaces are per thread, and this one has its own.
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp").expect("read net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[2] == want).then(|| u8::from_str_radix(f[3], 16).unwrap_or(0))
        })
        .collect()
}

// ------------------------------------------------------------------- cairn dev

/// A running `cairn dev` on a data directory, with its NBD export ready.
///
/// On drop (also when a test panics) its replica servers are resumed (SIGCONT), it gets
/// SIGTERM, then SIGKILL if it is still there after 20 s, and is reaped; replica servers still
/// alive after that are SIGKILLed by pid.
pub struct Dev {
    child: Child,
    /// Held so `cairn dev` never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
    /// The `--data-dir`.
    pub dir: PathBuf,
    log: PathBuf,
    stopped: bool,
    /// Its control endpoint.
    pub control: String,
    /// Its export.
    pub uri: String,
}

/// A `cairn dev` that printed its URI: the process, its stdout (held so it never writes to a
/// closed pipe) and its log (`DIR.log`, stderr appended).
pub struct StartedDev {
    pub child: Child,
    pub stdout: BufReader<ChildStdout>,
    pub log: PathBuf,
}

/// Spawns `cairn dev --data-dir DIR` plus what `args` adds, and waits up to `limit` for its
/// first stdout line to be `uri`; otherwise kills it and panics with its log.
pub fn start_dev(
    dir: &Path,
    uri: &str,
    limit: Duration,
    args: impl FnOnce(&mut Command),
) -> StartedDev {
    let log = log_path(dir);
    let log_file = File::options()
        .create(true)
        .append(true)
        .open(&log)
        .expect("open cairn dev log");
    let mut cmd = Command::new(cairn_bin());
    cmd.arg("dev").arg("--data-dir").arg(dir);
    args(&mut cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .expect("spawn cairn dev");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let n = stdout.read_line(&mut line);
        let _ = tx.send((n, line, stdout));
    });
    match rx.recv_timeout(limit) {
        Ok((Ok(n), line, stdout)) if n > 0 && line.trim() == uri => {
            StartedDev { child, stdout, log }
        }
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let first = other.map(|(_, line, _)| line);
            panic!(
                "cairn dev did not print {uri} (first stdout line {first:?}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
}

/// How a test's `cairn dev` runs: healing on unless [`no_heal`](Self::no_heal), the default
/// ports, 256 MiB.
#[derive(Debug, Clone)]
pub struct DevOpts {
    io_timeout: String,
    size: Option<String>,
    nbd: String,
    control: String,
    extra: Vec<String>,
}

impl DevOpts {
    pub fn new(io_timeout: &str) -> DevOpts {
        DevOpts {
            io_timeout: io_timeout.to_owned(),
            size: None,
            nbd: NBD_ADDR.to_owned(),
            control: CONTROL_ADDR.to_owned(),
            extra: Vec::new(),
        }
    }

    /// `--no-heal`: failed replicas stay out.
    pub fn no_heal(mut self) -> DevOpts {
        self.extra.push("--no-heal".into());
        self
    }

    /// Volume size when the directory is new, e.g. `1GiB`.
    pub fn size(mut self, size: &str) -> DevOpts {
        self.size = Some(size.to_owned());
        self
    }

    /// Other NBD and control addresses (a second `cairn dev` in the namespace).
    pub fn ports(mut self, nbd: &str, control: &str) -> DevOpts {
        nbd.clone_into(&mut self.nbd);
        control.clone_into(&mut self.control);
        self
    }

    /// More `cairn dev` arguments.
    pub fn arg(mut self, a: &str) -> DevOpts {
        self.extra.push(a.to_owned());
        self
    }

    pub fn start(&self, dir: &Path) -> Dev {
        Dev::spawn(dir, self)
    }
}

impl Dev {
    /// Starts `cairn dev` with 3 replicas on 127.0.0.2-4, a 256 MiB volume (when the directory
    /// is new), `--io-timeout io_timeout` and `--no-heal` (a failed replica stays out);
    /// returns once it printed the export's URI. Its log (stderr) is appended to `DIR.log`.
    pub fn start(dir: &Path, io_timeout: &str) -> Dev {
        DevOpts::new(io_timeout).no_heal().start(dir)
    }

    fn spawn(dir: &Path, opts: &DevOpts) -> Dev {
        let size = opts.size.clone().unwrap_or_else(|| "256MiB".to_owned());
        let uri = format!("nbd://{}/vol0", opts.nbd);
        let started = start_dev(dir, &uri, Duration::from_secs(60), |cmd| {
            cmd.arg("--standalone")
                .args(["--replicas", "3", "--size", &size])
                .args(["--nbd-listen", &opts.nbd, "--control-listen", &opts.control])
                .args([
                    "--io-timeout",
                    &opts.io_timeout,
                    "--replica-ips",
                    REPLICA_IPS,
                ])
                .args(&opts.extra);
        });
        Dev {
            child: started.child,
            _stdout: started.stdout,
            dir: dir.to_owned(),
            log: started.log,
            stopped: false,
            control: opts.control.clone(),
            uri,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replica `id`'s data directory (`DIR/replicas/ID/vol0/ID`).
    pub fn replica_dir(&self, id: &str) -> PathBuf {
        self.dir.join("replicas").join(id).join("vol0").join(id)
    }

    /// Replica `id`'s head data file.
    pub fn head_data_file(&self, id: &str) -> PathBuf {
        self.replica_dir(id).join("layers").join("00000001.data")
    }

    /// The pid of replica `id`'s server (from its pid file), checked to be our child.
    pub fn replica_pid(&self, id: &str) -> u32 {
        let path = self.dir.join("replicas").join(format!("{id}.pid"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let pid: u32 = text.trim().parse().expect("pid file holds a pid");
        assert!(
            children_of(self.pid()).contains(&pid),
            "replica {id} (pid {pid}) is not a child of cairn dev {}",
            self.pid()
        );
        pid
    }

    /// Sends `sig` to replica `id`'s server; returns its pid.
    pub fn signal_replica(&self, id: &str, sig: libc::c_int) -> u32 {
        let pid = self.replica_pid(id);
        send_signal(pid, sig);
        pid
    }

    /// SIGKILLs replica `id`'s server and waits until it is dead.
    pub fn kill_replica(&self, id: &str) {
        let pid = self.signal_replica(id, libc::SIGKILL);
        wait_until(
            &format!("replica {id} (pid {pid}) to die"),
            Duration::from_secs(10),
            || !proc_alive(pid),
        );
    }

    /// `cairn volume status vol0 --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let r = run_ok(
            cairn_bin(),
            &[
                "volume",
                "status",
                "vol0",
                "--json",
                "--endpoint",
                &self.control,
            ],
        );
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", r.stdout))
    }

    /// `cairn volume verify vol0`.
    pub fn verify(&self) -> ToolOutput {
        let r = run_bounded(
            Command::new(cairn_bin()).args([
                "volume",
                "verify",
                "vol0",
                "--endpoint",
                &self.control,
            ]),
            Duration::from_secs(120),
        );
        ToolOutput {
            code: r.status.and_then(|s| s.code()),
            stdout: r.stdout,
            stderr: r.stderr,
        }
    }

    /// Asserts `cairn volume verify` exits 0 (all RW replicas identical).
    pub fn assert_verified(&self, what: &str) {
        let out = self.verify();
        assert_eq!(
            out.code,
            Some(0),
            "{what}: cairn volume verify:\n{}{}",
            out.stdout,
            out.stderr
        );
    }

    /// Stops `cairn dev` with SIGTERM and asserts it exits 0 within 30 s with every replica
    /// server it started gone.
    pub fn stop(&mut self) {
        let replicas = children_of(self.pid());
        send_signal(self.pid(), libc::SIGTERM);
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait cairn dev") {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "cairn dev did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.stopped = true;
        assert!(
            status.success(),
            "cairn dev exited with {status}; log:\n{}",
            self.log()
        );
        for pid in replicas {
            wait_until(
                &format!("replica server {pid} to exit with cairn dev"),
                Duration::from_secs(10),
                || !proc_alive(pid),
            );
        }
    }
}

/// Replica `id`'s entry in a status.
pub fn replica_status<'a>(status: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    status["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["id"] == id))
        .unwrap_or_else(|| panic!("no replica {id} in status {status}"))
}

/// Replica `id`'s mode (`RW`, `WO`, `ERR`) in a status.
pub fn mode_of(status: &serde_json::Value, id: &str) -> String {
    replica_status(status, id)["mode"]
        .as_str()
        .unwrap_or_else(|| panic!("replica {id} has no mode in {status}"))
        .to_owned()
}

/// Asserts every replica's mode, e.g. `[("r1", "RW"), ("r2", "ERR")]`.
pub fn assert_modes(status: &serde_json::Value, want: &[(&str, &str)]) {
    for (id, mode) in want {
        assert_eq!(
            &mode_of(status, id),
            mode,
            "replica {id} in status {status:#}"
        );
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        let replicas = children_of(self.pid());
        for &pid in &replicas {
            send_signal(pid, libc::SIGCONT);
        }
        send_signal(self.pid(), libc::SIGTERM);
        let start = Instant::now();
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Replica servers die with cairn dev (PR_SET_PDEATHSIG); make sure of it.
        for pid in replicas {
            if proc_alive(pid) {
                send_signal(pid, libc::SIGKILL);
            }
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- last lines of the cairn dev log {}:",
                self.log.display()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

// ----------------------------------------------------------------- data helpers

/// `len` pseudo-random bytes from `rng`.
pub fn random_bytes(rng: &mut super::Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for w in v.chunks_mut(8) {
        let x = rng.next_u64().to_le_bytes();
        w.copy_from_slice(&x[..w.len()]);
    }
    v
}

/// Asserts `got == want` byte for byte; on a mismatch names the first differing offset and
/// how many bytes differ instead of printing megabytes.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
    panic!(
        "{what}: {differing} bytes differ, the first at offset {first} (block {}): got {:02x?}, want {:02x?}",
        first / 4096,
        &got[first..(first + 16).min(got.len())],
        &want[first..(first + 16).min(want.len())]
    );
}

/// True when `b` holds only zeros (compared in chunks with memcmp: fast in debug builds).
pub fn all_zero(b: &[u8]) -> bool {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    b.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// The whole volume as read through `nbdcopy URI FILE` (FILE under `scratch`).
pub fn nbdcopy_out(scratch: &Path) -> Vec<u8> {
    let out = scratch.join("nbdcopy-out.img");
    let _ = std::fs::remove_file(&out);
    run_ok("nbdcopy", &[NBD_URI, &out.display().to_string()]);
    let data = std::fs::read(&out).expect("read nbdcopy output");
    std::fs::remove_file(&out).expect("remove nbdcopy output");
    assert_eq!(
        data.len() as u64,
        DEV_SIZE,
        "nbdcopy copied the whole volume"
    );
    data
}
