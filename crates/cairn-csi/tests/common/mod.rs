//! Helpers shared by the integration tests of this crate (`tests/host.rs`, `tests/nbdfile.rs`,
//! `tests/kernel.rs`): data patterns, O_DIRECT I/O, an nbdkit server guard, mount and detach
//! guards, polling. Each test binary includes this module with `mod common;` and uses a subset.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_csi::host::attach::{AttachConfig, Attacher};
use cairn_csi::host::{have_tool, mount};

pub const MIB: u64 = 1 << 20;

/// Whether the test can run (root, and every one of `tools` installed); prints why not.
/// Held by every test that sets up loop devices, mounts or helper processes: they run one at
/// a time within a test binary. Loop device numbers are global; run side by side, one test's
/// freed device is another's new one, and checks about "the device" race.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn can_run(test: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root");
        return false;
    }
    if let Some(t) = tools.iter().find(|t| !have_tool(t)) {
        eprintln!("SKIP {test}: `{t}` is not installed");
        return false;
    }
    true
}

/// Deterministic bytes (xorshift64*), so a mismatch is a real mismatch.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Polls `f` (2 ms, backing off to 50 ms) for up to 20 s; panics on timeout.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not done after 20 s");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An `nbd://` URI of a loopback port nobody listens on (connections are refused).
pub fn refused_uri() -> String {
    format!("nbd://127.0.0.1:{}/x", free_port())
}

/// Writes `data` to a new file at `path` and syncs it.
pub fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// A 4096-aligned heap buffer for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        assert!(len > 0);
        // SAFETY: the layout is valid and of non-zero size (asserted above).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, layout }
    }

    pub fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in as_ref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this layout by alloc_zeroed and is freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Writes `data` at `offset` of `dev` with O_DIRECT, then syncs.
pub fn o_direct_write(dev: &Path, offset: u64, data: &[u8]) {
    try_o_direct_write(dev, offset, data).unwrap();
}

/// Writes `data` at `offset` of `dev` with O_DIRECT, then syncs; the first error.
pub fn try_o_direct_write(dev: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let mut buf = AlignedBuf::new(data.len());
    buf.as_mut().copy_from_slice(data);
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(buf.as_ref())?;
    f.sync_all()
}

/// Reads `len` bytes at `offset` of `dev` with O_DIRECT.
pub fn o_direct_read(dev: &Path, offset: u64, len: usize) -> Vec<u8> {
    try_o_direct_read(dev, offset, len).unwrap()
}

/// Reads `len` bytes at `offset` of `dev` with O_DIRECT; the first error.
pub fn try_o_direct_read(dev: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = AlignedBuf::new(len);
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf.as_mut())?;
    Ok(buf.as_ref().to_vec())
}

/// Live and not a zombie.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some(Some('Z' | 'X')))
        })
        .unwrap_or(false)
}

/// nbdkit serving `plugin_args` (plugin, filters, plugin parameters) on a free loopback port;
/// killed and reaped on drop. Can be restarted on the same port.
pub struct NbdKit {
    child: Child,
    pub port: u16,
    pub uri: String,
    plugin_args: Vec<String>,
    dir: PathBuf,
}

impl NbdKit {
    /// Starts nbdkit, its pidfile in `dir`; on a port someone took in between, on another.
    pub fn start(dir: &Path, plugin_args: &[&str]) -> NbdKit {
        let plugin_args: Vec<String> = plugin_args.iter().map(|s| s.to_string()).collect();
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn_nbdkit(dir, port, &plugin_args) {
                return NbdKit {
                    child,
                    port,
                    uri: format!("nbd://127.0.0.1:{port}/"),
                    plugin_args,
                    dir: dir.to_owned(),
                };
            }
        }
        panic!("nbdkit did not start");
    }

    /// Kills the server (its connections die with it) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// Kills the server (`SIGKILL`; its connections die with it) and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the killed server again on the same port.
    pub fn start_again(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = spawn_nbdkit(&self.dir, self.port, &self.plugin_args) {
                self.child = child;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nbdkit did not restart on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NbdKit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nbdkit on `port`, once it wrote its pidfile; `None` if it exited (port taken).
fn spawn_nbdkit(dir: &Path, port: u16, plugin_args: &[String]) -> Option<Child> {
    let pidfile = dir.join(format!("nbdkit-{port}.pid"));
    let _ = std::fs::remove_file(&pidfile);
    let mut child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg("-P")
        .arg(&pidfile)
        .args(plugin_args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let ready = wait_for(&format!("nbdkit on port {port}"), || {
        if let Some(status) = child.try_wait().unwrap() {
            eprintln!("nbdkit on port {port} exited ({status})");
            return Some(false);
        }
        std::fs::metadata(&pidfile)
            .is_ok_and(|m| m.len() > 0)
            .then_some(true)
    });
    ready.then_some(child)
}

/// An attacher configuration with its state in `dir/state` and 20 s to get ready or detach.
pub fn attach_config(dir: &Path) -> AttachConfig {
    let mut cfg = AttachConfig::new(dir.join("state"));
    cfg.ready_timeout = Duration::from_secs(20);
    cfg.detach_timeout = Duration::from_secs(20);
    cfg
}

/// The pid of the FUSE helper (nbdfuse or `cairn nbd-file`) of an attached `volume`.
pub fn helper_pid(attacher: &Attacher, volume: &str) -> u32 {
    let pidfile = attacher.state_dir().join(volume).join("nbdfuse.pid");
    std::fs::read_to_string(pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Detaches every volume an attacher knows on drop, unmounting what is mounted from them
/// (latest first). Unmount guards declared after it drop before it.
pub struct DetachAll<'a>(pub &'a Attacher);

impl Drop for DetachAll<'_> {
    fn drop(&mut self) {
        for st in self.0.list().unwrap_or_default() {
            if let Some(dev) = &st.device {
                let mut mps = mount::mount_points_of(dev).unwrap_or_default();
                mps.reverse();
                for mp in mps {
                    let _ = mount::unmount(&mp);
                }
            }
            if let Err(e) = self.0.detach(&st.volume_id) {
                eprintln!("cleanup: detach {}: {e}", st.volume_id);
            }
        }
    }
}

/// Unmounts a path on drop.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Err(e) = mount::unmount(&self.0) {
            eprintln!("cleanup: unmount {}: {e}", self.0.display());
        }
    }
}
