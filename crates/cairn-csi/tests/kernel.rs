//! Attach mode `kernel` on a real kernel NBD driver: nbdkit exports attached as `/dev/nbdN`
//! over netlink, O_DIRECT I/O compared byte for byte, idempotent attach, the reconnect keeper
//! replacing a connection whose server restarted, online growth, detach.
//!
//! Runs only where `/dev/nbd0` exists (the `nbd` module loaded) as root with nbdkit installed;
//! elsewhere it prints `SKIP: ...` and passes. Every device and process it creates is released
//! by a guard, also when the test fails.

mod common;

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::Duration;

use cairn_csi::host::attach::{AttachConfig, AttachMode, Attacher, DetachOutcome};
use cairn_csi::host::nbd_netlink::KernelNbd;
use cairn_csi::host::{have_tool, mount};

use common::{o_direct_read, o_direct_write, pattern, NbdKit, MIB};

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
    let _serial = common::serial();
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
        .attach("vol-k", &memory.uri, AttachMode::Kernel, false)
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
            .attach("vol-k", &memory.uri, AttachMode::Kernel, false)
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
            .attach("vol-k", &memory.uri, AttachMode::Kernel, false)
            .unwrap(),
        a
    );
    assert!(matches!(
        attacher.attach("vol-k", &memory.uri, AttachMode::Kernel, true),
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
        .attach("vol-g", &file.uri, AttachMode::Kernel, false)
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
