//! Attach mode `kernel` on a real kernel NBD driver: nbdkit exports attached as `/dev/nbdN`
//! over netlink, O_DIRECT I/O compared byte for byte, idempotent attach, the reconnect keeper
//! replacing a connection whose server restarted, online growth, detach.
//!
//! Runs only where `/dev/nbd0` exists (the `nbd` module loaded) as root with nbdkit installed;
//! elsewhere it prints `SKIP: ...` and passes. Every device and process it creates is released
//! by a guard, also when the test fails.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_csi::host::attach::{AttachConfig, AttachMode, Attacher, DetachOutcome};
use cairn_csi::host::nbd_netlink::KernelNbd;
use cairn_csi::host::{have_tool, mount};

const MIB: u64 = 1 << 20;

/// Whether the test can run here; prints why not.
fn can_run() -> bool {
    if !Path::new("/dev/nbd0").exists() {
        eprintln!("SKIP: no kernel NBD (/dev/nbd0)");
        return false;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: kernel NBD needs root");
        return false;
    }
    if !have_tool("nbdkit") {
        eprintln!("SKIP: nbdkit is not installed");
        return false;
    }
    true
}

/// Deterministic bytes (xorshift64*), so a mismatch is a real mismatch.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
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

/// nbdkit with `plugin_args` on loopback port `port` (0: a free one), killed and reaped on
/// drop. Can be restarted on the same port.
struct NbdKit {
    child: Child,
    port: u16,
    plugin_args: Vec<String>,
    dir: PathBuf,
}

impl NbdKit {
    fn start(dir: &Path, plugin_args: &[&str]) -> NbdKit {
        let plugin_args: Vec<String> = plugin_args.iter().map(|s| s.to_string()).collect();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if let Some(child) = spawn_nbdkit(dir, port, &plugin_args) {
                return NbdKit {
                    child,
                    port,
                    plugin_args,
                    dir: dir.to_owned(),
                };
            }
        }
        panic!("nbdkit did not start");
    }

    fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (its connections die with it) and starts it again on the same port.
    fn restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            eprintln!("nbdkit on port {port} exited ({status})");
            return None;
        }
        if std::fs::metadata(&pidfile).is_ok_and(|m| m.len() > 0) {
            return Some(child);
        }
        assert!(Instant::now() < deadline, "nbdkit not ready after 20 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for NbdKit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Detaches every volume of a state directory on drop.
struct DetachAll(AttachConfig);

impl Drop for DetachAll {
    fn drop(&mut self) {
        let Ok(attacher) = Attacher::with_config(self.0.clone()) else {
            return;
        };
        for st in attacher.list().unwrap_or_default() {
            if let Err(e) = attacher.detach(&st.volume_id) {
                eprintln!("cleanup: detach {}: {e}", st.volume_id);
            }
        }
    }
}

/// A 4096-aligned heap buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        assert!(len > 0);
        // SAFETY: the layout is valid and of non-zero size (asserted above).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, layout }
    }

    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn as_mut(&mut self) -> &mut [u8] {
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

fn o_direct_write(dev: &Path, offset: u64, data: &[u8]) {
    let mut buf = AlignedBuf::new(data.len());
    buf.as_mut().copy_from_slice(data);
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(buf.as_ref()).unwrap();
    f.sync_all().unwrap();
}

fn o_direct_read(dev: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = AlignedBuf::new(len);
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(buf.as_mut()).unwrap();
    buf.as_ref().to_vec()
}

/// What `NBD_CMD_STATUS` says of `device` (`/dev/nbdN`).
fn kernel_connected(rt: &tokio::runtime::Runtime, device: &Path) -> bool {
    let index: u32 = device
        .to_str()
        .and_then(|d| d.strip_prefix("/dev/nbd"))
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("{} is not /dev/nbdN", device.display()));
    rt.block_on(async {
        let nbd = KernelNbd::open().await.unwrap();
        let devices = nbd.status(Some(index)).await.unwrap();
        devices.iter().any(|d| d.index == index && d.connected)
    })
}

#[test]
fn kernel_attach_io_reconnect_grow_detach() {
    if !can_run() {
        return;
    }
    // The runtime the reconnect keepers run on, as `cairn csi`'s.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut memory = NbdKit::start(dir.path(), &["memory", "64M"]);
    let mut cfg = AttachConfig::new(dir.path().join("state"));
    cfg.ready_timeout = Duration::from_secs(20);
    let cleanup = DetachAll(cfg.clone());
    let first = Attacher::with_config(cfg.clone())
        .unwrap()
        .with_runtime(rt.handle().clone());

    // Attach, byte-exact O_DIRECT I/O.
    let a = first
        .attach("vol-k", &memory.uri(), AttachMode::Kernel, false)
        .unwrap();
    assert_eq!(a.mode, AttachMode::Kernel);
    assert!(a.device.to_str().unwrap().starts_with("/dev/nbd"), "{a:?}");
    assert_eq!(mount::block_device_size(&a.device).unwrap(), 64 * MIB);
    assert!(kernel_connected(&rt, &a.device));
    let data = pattern(1, 1 << 20);
    o_direct_write(&a.device, 3 * MIB, &data);
    assert!(o_direct_read(&a.device, 3 * MIB, data.len()) == data);

    // Idempotent: the same device.
    assert_eq!(
        first
            .attach("vol-k", &memory.uri(), AttachMode::Kernel, false)
            .unwrap(),
        a
    );
    assert_eq!(first.get("vol-k").unwrap(), Some(a.clone()));

    // A restarted `cairn csi`: the first attacher and its keeper are gone; a new one on the
    // same state finds the attachment and resumes its keeper.
    drop(first);
    let attacher = Attacher::with_config(cfg.clone())
        .unwrap()
        .with_runtime(rt.handle().clone());
    assert_eq!(attacher.resume_keepers().unwrap(), 1);
    let listed = attacher.list().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].healthy, "{listed:?}");
    assert_eq!(listed[0].device.as_deref(), Some(a.device.as_path()));
    assert_eq!(
        attacher
            .attach("vol-k", &memory.uri(), AttachMode::Kernel, false)
            .unwrap(),
        a
    );
    assert!(matches!(
        attacher.attach("vol-k", &memory.uri(), AttachMode::Kernel, true),
        Err(cairn_csi::host::HostError::AttachConflict { .. })
    ));

    // The server dies and comes back on the same port: the resumed keeper reconnects, and I/O that
    // waited (dead-connection timeout) or comes after succeeds. nbdkit memory starts empty.
    memory.restart();
    let data2 = pattern(2, 256 << 10);
    o_direct_write(&a.device, 5 * MIB, &data2);
    assert!(o_direct_read(&a.device, 5 * MIB, data2.len()) == data2);
    assert!(kernel_connected(&rt, &a.device));

    // Online growth: an nbdkit file export whose image grows.
    let image = dir.path().join("grow.img");
    File::create(&image).unwrap().set_len(32 * MIB).unwrap();
    let file = NbdKit::start(dir.path(), &["file", image.to_str().unwrap()]);
    let g = attacher
        .attach("vol-g", &file.uri(), AttachMode::Kernel, false)
        .unwrap();
    assert_ne!(g.device, a.device);
    assert_eq!(mount::block_device_size(&g.device).unwrap(), 32 * MIB);
    let tail = pattern(3, 64 << 10);
    o_direct_write(&g.device, 32 * MIB - tail.len() as u64, &tail);
    // Already large enough: nothing to do.
    assert_eq!(attacher.grow_device("vol-g", 16 * MIB).unwrap(), 32 * MIB);
    OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    assert_eq!(attacher.grow_device("vol-g", 64 * MIB).unwrap(), 64 * MIB);
    assert_eq!(mount::block_device_size(&g.device).unwrap(), 64 * MIB);
    assert!(o_direct_read(&g.device, 32 * MIB - tail.len() as u64, tail.len()) == tail);
    let past = pattern(4, 64 << 10);
    o_direct_write(&g.device, 60 * MIB, &past);
    assert!(o_direct_read(&g.device, 60 * MIB, past.len()) == past);

    // Detach: devices disconnected, state gone; again: nothing to do.
    assert_eq!(attacher.detach("vol-g").unwrap(), DetachOutcome::Detached);
    assert_eq!(attacher.detach("vol-k").unwrap(), DetachOutcome::Detached);
    assert!(!kernel_connected(&rt, &a.device));
    assert!(!kernel_connected(&rt, &g.device));
    assert_eq!(attacher.get("vol-k").unwrap(), None);
    assert!(attacher.list().unwrap().is_empty());
    assert_eq!(
        attacher.detach("vol-k").unwrap(),
        DetachOutcome::NotAttached
    );
    drop(cleanup);
}
