//! Attach mode `cairn-fuse` on real devices: `cairn nbd-file` serving an nbdkit `file` export
//! (behind nbdkit's blocksize-policy filter, so unaligned I/O is refused as a Cairn export
//! refuses it) as a FUSE file, a 4 KiB direct-I/O loop device over it, filesystems on that,
//! and online growth after the export's file is made larger.
//!
//! The `cairn` binary is not built for this crate's tests, so the attacher runs this test
//! binary instead, through a two-line script: `nbd_file_server_process` below is the server
//! process (`cairn_csi::host::nbdfile::run` with the arguments after `nbd-file`). To run the
//! tests against the real binary: `CAIRN_TEST_CAIRN_BIN=target/debug/cairn cargo test ...`.
//!
//! Needs root, loop devices and FUSE; each test prints `SKIP` and returns when a tool or
//! privilege is missing. Every loop device, mount and process a test creates is released by a
//! guard, also when the test fails.

mod common;

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_csi::host::attach::{AttachConfig, AttachMode, Attacher, DetachOutcome};
use cairn_csi::host::loopdev;
use cairn_csi::host::mount::{self, FsType, MountOutcome};
use cairn_csi::host::nbdfile::{self, NbdFileOptions};
use cairn_csi::host::{have_tool, HostError};

use common::{
    attach_config, can_run, helper_pid, o_direct_read, o_direct_write, pattern, process_alive,
    refused_uri, try_o_direct_read, try_o_direct_write, wait_for, write_synced, DetachAll, NbdKit,
    Unmount, MIB,
};

/// Not a test on its own: the `cairn nbd-file` process of the other tests, run by the script
/// [`fake_cairn`] writes as `TEST_BINARY --exact nbd_file_server_process -- nbd-file ARGS`.
/// Without `nbd-file` among its arguments it does nothing.
#[test]
fn nbd_file_server_process() {
    let args: Vec<String> = std::env::args().collect();
    let Some(at) = args.iter().position(|a| a == "nbd-file") else {
        return;
    };
    let mut opts = NbdFileOptions {
        mountpoint: PathBuf::new(),
        uri: String::new(),
        pidfile: None,
        read_only: false,
        dead_timeout: Duration::from_secs(120),
    };
    let mut positional = Vec::new();
    let mut rest = args[at + 1..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--pidfile" => opts.pidfile = rest.next().map(PathBuf::from),
            "--read-only" => opts.read_only = true,
            "--dead-timeout" => {
                opts.dead_timeout = rest.next().map(|d| parse_duration(d)).expect("DURATION")
            }
            p => positional.push(p.to_string()),
        }
    }
    let [mountpoint, uri] = <[String; 2]>::try_from(positional).expect("MOUNTPOINT URI");
    opts.mountpoint = mountpoint.into();
    opts.uri = uri;
    if let Err(e) = nbdfile::run(opts) {
        panic!("nbd-file: {e}");
    }
}

/// `120s`, `1s` or `500ms` (what the tests pass; the real binary takes any humantime duration).
fn parse_duration(d: &str) -> Duration {
    match d.strip_suffix("ms") {
        Some(ms) => Duration::from_millis(ms.parse().expect("DURATION")),
        None => Duration::from_secs(d.trim_end_matches('s').parse().expect("DURATION")),
    }
}

/// Writes `dir/cairn`: a script that runs this test binary as the `cairn nbd-file` server,
/// passing `extra` flags after the attacher's arguments. With `CAIRN_TEST_CAIRN_BIN` set, that
/// binary is used instead (e.g. `target/debug/cairn`), itself if there are no extra flags.
fn fake_cairn(dir: &Path, extra: &[&str]) -> PathBuf {
    let real = std::env::var_os("CAIRN_TEST_CAIRN_BIN");
    if extra.is_empty() {
        if let Some(real) = real {
            return PathBuf::from(real);
        }
    }
    let exe = match &real {
        Some(real) => format!("'{}'", Path::new(real).display()),
        None => format!(
            "'{}' --exact --nocapture --test-threads=1 nbd_file_server_process --",
            std::env::current_exe().unwrap().display()
        ),
    };
    let path = dir.join("cairn");
    std::fs::write(
        &path,
        format!("#!/bin/sh\nexec {exe} \"$@\" {}\n", extra.join(" ")),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `nbdkit file IMAGE` on a free loopback port, refusing I/O not aligned to 4 KiB; killed
/// and reaped on drop. The export grows when the image does (nbdkit sizes each connection).
struct FileExport {
    kit: NbdKit,
    image: PathBuf,
}

impl FileExport {
    fn start(dir: &Path, size: u64) -> FileExport {
        let image = dir.join("export.img");
        File::create(&image).unwrap().set_len(size).unwrap();
        let kit = NbdKit::start(
            dir,
            &[
                "--filter=blocksize-policy",
                "file",
                image.to_str().unwrap(),
                "blocksize-minimum=4096",
                "blocksize-error-policy=error",
            ],
        );
        FileExport { kit, image }
    }

    /// Makes the export `size` bytes (new connections see it).
    fn grow(&self, size: u64) {
        OpenOptions::new()
            .write(true)
            .open(&self.image)
            .unwrap()
            .set_len(size)
            .unwrap();
    }

    /// The export's size as a new NBD connection sees it.
    fn size_for_new_connection(&self) -> u64 {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.kit.port));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = cairn_nbd::NbdClient::connect(addr, "").await.unwrap();
            let size = c.size();
            c.disconnect().await.unwrap();
            size
        })
    }

    /// `len` bytes of the export's image at `offset`, read from the file nbdkit serves.
    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        File::open(&self.image)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }
}

fn attacher(dir: &Path) -> (Attacher, AttachConfig) {
    attacher_with(dir, &[])
}

/// An attacher whose `cairn nbd-file` helpers get `extra` flags.
fn attacher_with(dir: &Path, extra: &[&str]) -> (Attacher, AttachConfig) {
    let mut cfg = attach_config(dir);
    cfg.cairn = fake_cairn(dir, extra);
    (Attacher::with_config(cfg.clone()).unwrap(), cfg)
}

fn disk_file(attacher: &Attacher, volume: &str) -> PathBuf {
    attacher.state_dir().join(volume).join("fuse/disk")
}

/// Detaches `volume` and checks that nothing is left: loop device, FUSE mount, helper, state.
fn detach_and_check_clean(attacher: &Attacher, volume: &str, device: &Path, pid: u32) {
    let fuse = attacher.state_dir().join(volume).join("fuse");
    assert_eq!(attacher.detach(volume).unwrap(), DetachOutcome::Detached);
    // Not backed by this volume's file any more (the freed number may serve another test).
    assert!(
        loopdev::devices_of(&disk_file(attacher, volume))
            .unwrap()
            .is_empty(),
        "{}",
        device.display()
    );
    assert!(!process_alive(pid), "helper {pid} still runs");
    assert!(!attacher.state_dir().join(volume).exists());
    assert!(!mount::is_mount_point(&fuse).unwrap_or(false));
    assert_eq!(attacher.detach(volume).unwrap(), DetachOutcome::NotAttached);
}

#[test]
fn cairn_fuse_attach_writes_grows_online_and_detaches() {
    let _serial = common::serial();
    if !can_run(
        "cairn_fuse_attach_writes_grows_online_and_detaches",
        &["nbdkit", "fusermount3", "losetup", "mkfs.ext4"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = FileExport::start(dir.path(), 64 * MIB);
    let (attacher, cfg) = attacher(dir.path());
    let _cleanup = DetachAll(&attacher);

    // Attach: a 4 KiB-sector block device of the export's size, served by a helper in its
    // own session.
    let a = attacher
        .attach("vol-g", &server.kit.uri, AttachMode::CairnFuse, false)
        .unwrap();
    assert_eq!(a.mode, AttachMode::CairnFuse);
    assert!(a.device.to_string_lossy().starts_with("/dev/loop"), "{a:?}");
    assert_eq!(mount::block_device_size(&a.device).unwrap(), 64 * MIB);
    let pid = helper_pid(&attacher, "vol-g");
    assert!(process_alive(pid));
    // SAFETY: getsid has no memory effects.
    let sid = unsafe { libc::getsid(i32::try_from(pid).unwrap()) };
    assert_eq!(u32::try_from(sid).unwrap(), pid);

    // O_DIRECT writes through the device reach the export; read back through both.
    let first = pattern(1, 1 << 20);
    let last = pattern(2, 256 << 10);
    o_direct_write(&a.device, MIB, &first);
    o_direct_write(&a.device, 64 * MIB - (256 << 10), &last);
    assert!(o_direct_read(&a.device, MIB, first.len()) == first);
    assert!(
        server.image_bytes(MIB, first.len()) == first,
        "export differs"
    );
    assert!(server.image_bytes(64 * MIB - (256 << 10), last.len()) == last);
    assert!(server.image_bytes(0, 1 << 20).iter().all(|b| *b == 0));

    // Many writers at once (requests in flight together), each its own region.
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let dev = a.device.clone();
            s.spawn(move || {
                let data = pattern(100 + t, 512 << 10);
                o_direct_write(&dev, 8 * MIB + t * (512 << 10), &data);
            });
        }
    });
    for t in 0..8u64 {
        let want = pattern(100 + t, 512 << 10);
        assert!(o_direct_read(&a.device, 8 * MIB + t * (512 << 10), want.len()) == want);
    }

    // Idempotent; a restarted `cairn csi` finds the attachment, in its mode.
    assert_eq!(
        attacher
            .attach("vol-g", &server.kit.uri, AttachMode::CairnFuse, false)
            .unwrap(),
        a
    );
    assert!(matches!(
        attacher.attach("vol-g", &server.kit.uri, AttachMode::Fuse, false),
        Err(HostError::AttachConflict { .. })
    ));
    let restarted = Attacher::with_config(cfg).unwrap();
    let listed = restarted.list().unwrap();
    assert!(listed.len() == 1 && listed[0].healthy, "{listed:?}");
    assert_eq!(restarted.get("vol-g").unwrap(), Some(a.clone()));

    // A filesystem with files on it.
    let mnt = dir.path().join("mnt");
    assert_eq!(
        mount::format_and_mount(&a.device, &mnt, FsType::Ext4, &[], false).unwrap(),
        MountOutcome::Mounted
    );
    let mnt_guard = Unmount(mnt.clone());
    let files: Vec<(PathBuf, Vec<u8>)> = (0..4)
        .map(|i| (mnt.join(format!("f{i}")), pattern(200 + i, 3 << 20)))
        .collect();
    for (p, d) in &files {
        write_synced(p, d).unwrap();
    }

    // The export grows: new connections see it, the attached file does not yet.
    server.grow(128 * MIB);
    assert_eq!(server.size_for_new_connection(), 128 * MIB);
    let disk = disk_file(&attacher, "vol-g");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 64 * MIB);

    // Grow the device while mounted (from the restarted attacher).
    assert_eq!(
        restarted.grow_device("vol-g", 128 * MIB).unwrap(),
        128 * MIB
    );
    assert_eq!(mount::block_device_size(&a.device).unwrap(), 128 * MIB);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 128 * MIB);
    assert_eq!(attacher.grow_device("vol-g", 100 * MIB).unwrap(), 128 * MIB);
    assert_eq!(helper_pid(&attacher, "vol-g"), pid, "same helper");

    // Data intact; the new space works, through the device and on the export.
    for (p, d) in &files {
        assert!(std::fs::read(p).unwrap() == *d, "{} differs", p.display());
    }
    let tail = pattern(3, 1 << 20);
    o_direct_write(&a.device, 127 * MIB, &tail);
    assert!(o_direct_read(&a.device, 127 * MIB, tail.len()) == tail);
    assert!(server.image_bytes(127 * MIB, tail.len()) == tail);

    // Mounted: not detached. Unmounted: detached, nothing left.
    assert!(matches!(
        attacher.detach("vol-g"),
        Err(HostError::DeviceBusy { .. })
    ));
    drop(mnt_guard);
    detach_and_check_clean(&attacher, "vol-g", &a.device, pid);

    // The data outlives the attachment, at the new size.
    let b = attacher
        .attach("vol-g", &server.kit.uri, AttachMode::CairnFuse, false)
        .unwrap();
    assert_eq!(mount::block_device_size(&b.device).unwrap(), 128 * MIB);
    mount::format_and_mount(&b.device, &mnt, FsType::Ext4, &[], false).unwrap();
    let mnt_guard = Unmount(mnt.clone());
    assert!(std::fs::read(&files[0].0).unwrap() == files[0].1);
    drop(mnt_guard);
    let pid = helper_pid(&attacher, "vol-g");
    detach_and_check_clean(&attacher, "vol-g", &b.device, pid);
}

#[test]
fn cairn_fuse_xfs_grows_while_mounted() {
    let _serial = common::serial();
    if !can_run(
        "cairn_fuse_xfs_grows_while_mounted",
        &["nbdkit", "fusermount3", "losetup"],
    ) {
        return;
    }
    if !have_tool("mkfs.xfs") || !have_tool("xfs_growfs") {
        eprintln!(
            "SKIP cairn_fuse_xfs_grows_while_mounted: mkfs.xfs/xfs_growfs not installed \
             (apt-get install xfsprogs); online filesystem growth not checked"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // mkfs.xfs wants at least 300 MiB.
    let server = FileExport::start(dir.path(), 512 * MIB);
    let (attacher, _) = attacher(dir.path());
    let _cleanup = DetachAll(&attacher);
    let a = attacher
        .attach("vol-x", &server.kit.uri, AttachMode::CairnFuse, false)
        .unwrap();
    let mnt = dir.path().join("mnt");
    mount::format_and_mount(&a.device, &mnt, FsType::Xfs, &[], false).unwrap();
    let mnt_guard = Unmount(mnt.clone());
    let data = pattern(7, 5 << 20);
    write_synced(&mnt.join("before"), &data).unwrap();
    let total = |p: &Path| {
        let st = rustix::fs::statvfs(p).unwrap();
        st.f_blocks * st.f_frsize
    };
    let before = total(&mnt);

    server.grow(1024 * MIB);
    assert_eq!(
        attacher.grow_device("vol-x", 1024 * MIB).unwrap(),
        1024 * MIB
    );
    mount::grow_filesystem(&a.device, Some(&mnt), "xfs").unwrap();
    let after = total(&mnt);
    assert!(
        after > before + 400 * MIB,
        "xfs did not grow: {before} -> {after} bytes"
    );
    assert!(std::fs::read(mnt.join("before")).unwrap() == data);
    // Fill past the old end of the device.
    let big = pattern(8, 64 << 20);
    for i in 0..8 {
        write_synced(&mnt.join(format!("after{i}")), &big).unwrap();
    }
    for i in 0..8 {
        assert!(std::fs::read(mnt.join(format!("after{i}"))).unwrap() == big);
    }
    drop(mnt_guard);
    if have_tool("xfs_repair") {
        let out = std::process::Command::new("xfs_repair")
            .arg("-n")
            .arg(&a.device)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "xfs_repair -n: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pid = helper_pid(&attacher, "vol-x");
    detach_and_check_clean(&attacher, "vol-x", &a.device, pid);
}

#[test]
fn cairn_fuse_file_refuses_unaligned_and_out_of_range_io() {
    let _serial = common::serial();
    if !can_run(
        "cairn_fuse_file_refuses_unaligned_and_out_of_range_io",
        &["nbdkit", "fusermount3", "losetup"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = FileExport::start(dir.path(), 16 * MIB);
    let (attacher, _) = attacher(dir.path());
    let _cleanup = DetachAll(&attacher);
    let a = attacher
        .attach("vol-u", &server.kit.uri, AttachMode::CairnFuse, false)
        .unwrap();
    let data = pattern(9, 64 << 10);
    o_direct_write(&a.device, 0, &data);

    // Straight on the FUSE file (no page cache: every call is a request to the export).
    let disk = disk_file(&attacher, "vol-u");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let einval = |r: std::io::Result<usize>| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));
    };
    einval(f.write_at(b"unaligned", 5));
    einval(f.write_at(&[1; 512], 512));
    let mut buf = vec![0; 100];
    einval(f.read_at(&mut buf, 5));
    assert!(
        server.image_bytes(0, data.len()) == data,
        "unaligned I/O changed data"
    );
    assert!(o_direct_read(&a.device, 0, data.len()) == data);

    // Past the end: reads are short, writes ENOSPC, as on a block device.
    let mut buf = vec![0; 8192];
    assert_eq!(f.read_at(&mut buf, 16 * MIB).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, 16 * MIB - 4096).unwrap(), 4096);
    let err = f.write_at(&[0; 4096], 16 * MIB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 16 * MIB);
    let err = f.set_len(32 * MIB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));

    // Punching a hole zeroes the range (NBD_CMD_WRITE_ZEROES); the rest is untouched.
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate(2) on an open descriptor; no memory is passed.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), punch, 4096, 8192) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let got = server.image_bytes(0, data.len());
    assert!(got[..4096] == data[..4096]);
    assert!(got[4096..12288].iter().all(|b| *b == 0));
    assert!(got[12288..] == data[12288..]);
    // Discard through the loop device reaches the export the same way.
    if have_tool("blkdiscard") {
        let out = std::process::Command::new("blkdiscard")
            .args(["-o", "32768", "-l", "16384"])
            .arg(&a.device)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = server.image_bytes(0, data.len());
        assert!(got[32768..49152].iter().all(|b| *b == 0));
        assert!(got[49152..] == data[49152..]);
    }
    drop(f);
    let pid = helper_pid(&attacher, "vol-u");
    detach_and_check_clean(&attacher, "vol-u", &a.device, pid);
}

#[test]
fn cairn_fuse_dead_helper_is_rebuilt() {
    let _serial = common::serial();
    if !can_run(
        "cairn_fuse_dead_helper_is_rebuilt",
        &["nbdkit", "fusermount3", "losetup"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = FileExport::start(dir.path(), 16 * MIB);
    let (attacher, _) = attacher(dir.path());
    let _cleanup = DetachAll(&attacher);
    let a = attacher
        .attach("vol-d", &server.kit.uri, AttachMode::CairnFuse, false)
        .unwrap();
    let data = pattern(10, 128 << 10);
    o_direct_write(&a.device, 4096, &data);

    let pid = helper_pid(&attacher, "vol-d");
    // SAFETY: kill(2) has no memory effects; the pid is the helper this test started.
    let rc = unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
    assert_eq!(rc, 0);
    wait_for("the killed helper to die", || {
        (!process_alive(pid)).then_some(())
    });
    let st = &attacher.list().unwrap()[0];
    assert!(!st.helper_alive && !st.healthy, "{st:?}");
    // Growing a broken attachment fails cleanly.
    assert!(attacher.grow_device("vol-d", 32 * MIB).is_err());

    let b = attacher
        .attach("vol-d", &server.kit.uri, AttachMode::CairnFuse, false)
        .unwrap();
    let pid = helper_pid(&attacher, "vol-d");
    assert!(process_alive(pid));
    assert!(o_direct_read(&b.device, 4096, data.len()) == data);
    detach_and_check_clean(&attacher, "vol-d", &b.device, pid);

    // A server that is not there: the helper's error is reported; nothing is left.
    let refused = refused_uri();
    let err = attacher
        .attach("vol-r", &refused, AttachMode::CairnFuse, false)
        .unwrap_err();
    assert!(matches!(err, HostError::HelperExited { .. }), "{err}");
    assert!(err.to_string().contains("connect"), "{err}");
    assert!(attacher.list().unwrap().is_empty());
}

/// How long nbdkit stays down in the reconnect tests: the outage under test, not a wait.
const OUTAGE: Duration = Duration::from_millis(300);

#[test]
fn cairn_fuse_reconnects_when_the_server_restarts() {
    let _serial = common::serial();
    if !can_run(
        "cairn_fuse_reconnects_when_the_server_restarts",
        &["nbdkit", "fusermount3", "losetup"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = FileExport::start(dir.path(), 16 * MIB);
    let (attacher, _) = attacher(dir.path());
    let _cleanup = DetachAll(&attacher);
    let a = attacher
        .attach("vol-c", &server.kit.uri, AttachMode::CairnFuse, false)
        .unwrap();
    let pid = helper_pid(&attacher, "vol-c");
    let before = pattern(20, 1 << 20);
    o_direct_write(&a.device, 0, &before);
    assert!(o_direct_read(&a.device, 0, before.len()) == before);

    // The server dies; a write is issued while it is gone and held until it is back.
    server.kit.kill();
    let during = pattern(21, 1 << 20);
    let writer = {
        let (dev, data) = (a.device.clone(), during.clone());
        std::thread::spawn(move || try_o_direct_write(&dev, 4 * MIB, &data))
    };
    std::thread::sleep(OUTAGE);
    assert!(!writer.is_finished(), "a write completed without a server");
    server.kit.start_again();
    writer.join().unwrap().expect("the held write fails");

    // Everything is there, through the device and in the export's file; the same helper
    // serves it, and goes on serving after a second restart with writes in flight.
    assert!(o_direct_read(&a.device, 0, before.len()) == before);
    assert!(o_direct_read(&a.device, 4 * MIB, during.len()) == during);
    assert!(server.image_bytes(0, before.len()) == before);
    assert!(server.image_bytes(4 * MIB, during.len()) == during);
    assert_eq!(helper_pid(&attacher, "vol-c"), pid);
    assert!(process_alive(pid));

    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = a.device.clone();
            std::thread::spawn(move || {
                try_o_direct_write(&dev, 8 * MIB + t * MIB, &pattern(30 + t, 1 << 20))
            })
        })
        .collect();
    server.kit.restart();
    for w in writers {
        w.join().unwrap().expect("a write across the restart fails");
    }
    for t in 0..4u64 {
        let want = pattern(30 + t, 1 << 20);
        assert!(o_direct_read(&a.device, 8 * MIB + t * MIB, want.len()) == want);
        assert!(server.image_bytes(8 * MIB + t * MIB, want.len()) == want);
    }
    assert!(o_direct_read(&a.device, 0, before.len()) == before);
    detach_and_check_clean(&attacher, "vol-c", &a.device, pid);
}

#[test]
fn cairn_fuse_fails_io_after_the_dead_timeout() {
    let _serial = common::serial();
    if !can_run(
        "cairn_fuse_fails_io_after_the_dead_timeout",
        &["nbdkit", "fusermount3", "losetup"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = FileExport::start(dir.path(), 16 * MIB);
    let (attacher, _) = attacher_with(dir.path(), &["--dead-timeout", "1s"]);
    let _cleanup = DetachAll(&attacher);
    let a = attacher
        .attach("vol-t", &server.kit.uri, AttachMode::CairnFuse, false)
        .unwrap();
    let pid = helper_pid(&attacher, "vol-t");
    let data = pattern(40, 256 << 10);
    o_direct_write(&a.device, 0, &data);

    // Gone for longer than the timeout: the write is held for about that long, then fails.
    server.kit.kill();
    let started = Instant::now();
    let err = try_o_direct_write(&a.device, MIB, &pattern(41, 256 << 10)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let held = started.elapsed();
    assert!(held >= Duration::from_millis(900), "failed after {held:?}");
    let err = try_o_direct_read(&a.device, 0, data.len()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // It gave up: a server back later does not bring the file back (as before reconnects).
    server.kit.start_again();
    let err = try_o_direct_read(&a.device, 0, data.len()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(server.image_bytes(0, data.len()) == data);
    assert!(process_alive(pid));
    detach_and_check_clean(&attacher, "vol-t", &a.device, pid);
}
