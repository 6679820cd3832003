//! The node's host plumbing on real devices: loop devices over sparse files, real mkfs,
//! e2fsck, mount, bind mounts, resize2fs; and nbdfuse attachments of an nbdkit export.
//!
//! Needs root, loop devices and FUSE; each test prints `SKIP` and returns when a tool or
//! privilege is missing. Every loop device, mount and process a test creates is released by
//! a guard, also when the test fails.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_csi::host::loopdev::{self, LoopOptions};
use cairn_csi::host::mount::{
    self, FormatOutcome, FsType, FsckOutcome, MountOutcome, Probe, UnmountOutcome,
};
use cairn_csi::host::{have_tool, HostError};

const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;

/// Whether the test can run; prints why not.
fn can_run(test: &str, tools: &[&str]) -> bool {
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

/// Whether this process may resize an ext4 filesystem online (CAP_SYS_RESOURCE, bit 24).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    eff & (1 << 24) != 0
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

/// A loop device over a sparse file; on drop, unmounts whatever is mounted from it (latest
/// first) and detaches it.
struct LoopDev {
    dev: PathBuf,
    file: PathBuf,
}

impl LoopDev {
    fn new(dir: &Path, name: &str, size: u64) -> LoopDev {
        let file = dir.join(name);
        File::create(&file).unwrap().set_len(size).unwrap();
        let dev = loopdev::attach(&file, LoopOptions::default()).unwrap();
        LoopDev { dev, file }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if let Ok(mut mps) = mount::mount_points_of(&self.dev) {
            mps.reverse();
            for mp in mps {
                if let Err(e) = mount::unmount(&mp) {
                    eprintln!("cleanup: unmount {}: {e}", mp.display());
                }
            }
        }
        if let Err(e) = loopdev::detach(&self.dev, Duration::from_secs(10)) {
            eprintln!("cleanup: detach {}: {e}", self.dev.display());
        }
    }
}

/// Unmounts a path on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Err(e) = mount::unmount(&self.0) {
            eprintln!("cleanup: unmount {}: {e}", self.0.display());
        }
    }
}

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[test]
fn ext4_lifecycle_on_a_loop_device() {
    if !can_run(
        "ext4_lifecycle_on_a_loop_device",
        &[
            "losetup",
            "blkid",
            "mkfs.ext4",
            "e2fsck",
            "resize2fs",
            "mount",
            "umount",
        ],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lo = LoopDev::new(dir.path(), "disk.img", 64 * MIB);
    let dev = lo.dev.as_path();
    let mnt = dir.path().join("mnt");
    let bind = dir.path().join("bind");
    let ro = dir.path().join("ro");

    // Blank, formatted once, checked.
    assert_eq!(mount::block_device_size(dev).unwrap(), 64 * MIB);
    assert_eq!(mount::probe(dev).unwrap(), Probe::Blank);
    assert_eq!(
        mount::format_if_blank(dev, FsType::Ext4).unwrap(),
        FormatOutcome::Formatted
    );
    match mount::probe(dev).unwrap() {
        Probe::Filesystem { fs_type, uuid } => {
            assert_eq!(fs_type, "ext4");
            assert!(uuid.is_some());
        }
        other => panic!("probe after mkfs: {other:?}"),
    }
    assert_eq!(mount::fsck(dev, "ext4").unwrap(), FsckOutcome::Clean);
    assert!(matches!(
        mount::format_if_blank(dev, FsType::Xfs),
        Err(HostError::FsTypeMismatch { .. })
    ));

    // Mount (idempotent), write.
    assert!(!mount::is_mount_point(&mnt).unwrap());
    assert_eq!(
        mount::mount(dev, &mnt, "ext4", &["noatime"]).unwrap(),
        MountOutcome::Mounted
    );
    let _mnt_guard = Unmount(mnt.clone());
    assert_eq!(
        mount::mount(dev, &mnt, "ext4", &["noatime"]).unwrap(),
        MountOutcome::AlreadyMounted
    );
    assert!(mount::is_mount_point(&mnt).unwrap());
    assert_eq!(
        mount::device_mounted_at(&mnt).unwrap().as_deref(),
        Some(dev)
    );
    assert_eq!(
        mount::mount_points_of(dev).unwrap(),
        vec![std::fs::canonicalize(&mnt).unwrap()]
    );
    let data = pattern(1, 3 * MIB_USIZE + 123);
    write_synced(&mnt.join("data"), &data).unwrap();

    // Bind mount (idempotent) shows the same bytes.
    assert_eq!(
        mount::bind_mount(&mnt, &bind, false).unwrap(),
        MountOutcome::Mounted
    );
    let _bind_guard = Unmount(bind.clone());
    assert_eq!(
        mount::bind_mount(&mnt, &bind, false).unwrap(),
        MountOutcome::AlreadyMounted
    );
    assert_eq!(std::fs::read(bind.join("data")).unwrap(), data);
    write_synced(&bind.join("via-bind"), b"hello").unwrap();
    assert_eq!(std::fs::read(mnt.join("via-bind")).unwrap(), b"hello");

    // Read-only bind: reads work, writes fail with EROFS, the source stays writable.
    assert_eq!(
        mount::bind_mount(&mnt, &ro, true).unwrap(),
        MountOutcome::Mounted
    );
    let _ro_guard = Unmount(ro.clone());
    assert!(mount::mount_at(&ro).unwrap().unwrap().is_read_only());
    assert!(matches!(
        mount::bind_mount(&mnt, &ro, false),
        Err(HostError::MountedElsewhere { .. })
    ));
    assert_eq!(std::fs::read(ro.join("data")).unwrap(), data);
    let err = File::create(ro.join("nope")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = OpenOptions::new()
        .write(true)
        .open(ro.join("data"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    write_synced(&mnt.join("still-writable"), b"x").unwrap();

    // Mounting another device at a mount point is refused.
    let other = LoopDev::new(dir.path(), "other.img", 16 * MIB);
    assert!(matches!(
        mount::mount(&other.dev, &mnt, "ext4", &[]),
        Err(HostError::MountedElsewhere { .. })
    ));

    // Stats.
    let st = mount::fs_stats(&mnt).unwrap();
    assert!(
        st.total_bytes > 40 * MIB && st.total_bytes <= 64 * MIB,
        "{st:?}"
    );
    assert!(st.used_bytes >= 3 * MIB, "{st:?}");
    assert!(
        st.available_bytes + st.used_bytes <= st.total_bytes,
        "{st:?}"
    );
    assert!(st.total_inodes > 1000, "{st:?}");
    assert!(st.used_inodes >= 13 && st.used_inodes < 100, "{st:?}");
    assert_eq!(st.used_inodes + st.free_inodes, st.total_inodes);

    // Asking to format the mounted, formatted device does nothing.
    assert_eq!(
        mount::format_if_blank(dev, FsType::Ext4).unwrap(),
        FormatOutcome::AlreadyFormatted
    );
    assert_eq!(std::fs::read(mnt.join("data")).unwrap(), data);

    // Unmount is idempotent; unmount_and_remove removes the target.
    assert_eq!(mount::unmount(&ro).unwrap(), UnmountOutcome::Unmounted);
    assert_eq!(mount::unmount(&ro).unwrap(), UnmountOutcome::NotMounted);
    assert_eq!(
        mount::unmount_and_remove(&bind).unwrap(),
        UnmountOutcome::Unmounted
    );
    assert!(!bind.exists());
    assert_eq!(
        mount::unmount_and_remove(&bind).unwrap(),
        UnmountOutcome::NotMounted
    );
    assert_eq!(
        mount::unmount(&dir.path().join("never-existed")).unwrap(),
        UnmountOutcome::NotMounted
    );
    // Online growth: the file grows, the loop device learns it, resize2fs fills it.
    File::options()
        .write(true)
        .open(&lo.file)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    assert_eq!(mount::block_device_size(dev).unwrap(), 64 * MIB);
    loopdev::set_capacity(dev).unwrap();
    assert_eq!(mount::block_device_size(dev).unwrap(), 128 * MIB);
    if has_cap_sys_resource() {
        mount::grow_filesystem(dev, Some(&mnt), "ext4").unwrap();
    } else {
        // The kernel refuses online ext4 resizes without CAP_SYS_RESOURCE (EPERM); a
        // privileged CSI node container has it, this sandbox may not.
        eprintln!("NOTE ext4_lifecycle_on_a_loop_device: no CAP_SYS_RESOURCE, growing offline");
        assert_eq!(mount::unmount(&mnt).unwrap(), UnmountOutcome::Unmounted);
        mount::grow_filesystem(dev, None, "ext4").unwrap();
        assert_eq!(
            mount::mount(dev, &mnt, "ext4", &[]).unwrap(),
            MountOutcome::Mounted
        );
    }
    let grown = mount::fs_stats(&mnt).unwrap();
    assert!(
        grown.total_bytes >= st.total_bytes + 56 * MIB,
        "{st:?} -> {grown:?}"
    );
    assert!(grown.total_inodes > st.total_inodes, "{st:?} -> {grown:?}");
    assert_eq!(std::fs::read(mnt.join("data")).unwrap(), data);

    assert_eq!(mount::unmount(&mnt).unwrap(), UnmountOutcome::Unmounted);
    assert!(!mount::is_mount_point(&mnt).unwrap());
    // The device is free again: a clean check, no reformat, the same bytes.
    assert_eq!(mount::fsck(dev, "ext4").unwrap(), FsckOutcome::Clean);
    assert_eq!(
        mount::format_and_mount(dev, &mnt, FsType::Ext4, &[], false).unwrap(),
        MountOutcome::Mounted
    );
    assert_eq!(std::fs::read(mnt.join("data")).unwrap(), data);
    assert_eq!(std::fs::read(mnt.join("via-bind")).unwrap(), b"hello");
    assert_eq!(mount::unmount(&mnt).unwrap(), UnmountOutcome::Unmounted);

    // Read-only stage: mounted ro, writes refused.
    assert_eq!(
        mount::format_and_mount(dev, &mnt, FsType::Ext4, &[], true).unwrap(),
        MountOutcome::Mounted
    );
    assert!(mount::mount_at(&mnt).unwrap().unwrap().is_read_only());
    let err = File::create(mnt.join("nope")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_eq!(std::fs::read(mnt.join("data")).unwrap(), data);
    assert_eq!(mount::unmount(&mnt).unwrap(), UnmountOutcome::Unmounted);
}

#[test]
fn fsck_reports_an_unrepairable_filesystem() {
    if !can_run(
        "fsck_reports_an_unrepairable_filesystem",
        &["losetup", "blkid", "mkfs.ext4", "e2fsck"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lo = LoopDev::new(dir.path(), "disk.img", 32 * MIB);
    mount::format_if_blank(&lo.dev, FsType::Ext4).unwrap();
    // Garbage over the group descriptors, bitmaps and inode tables (the superblock at 1024
    // stays, so the device still probes as ext4), written through the device itself.
    let mut f = OpenOptions::new().write(true).open(&lo.dev).unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.write_all(&pattern(7, 2 * MIB_USIZE)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let err = mount::fsck(&lo.dev, "ext4").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HostError::Command { .. }), "{msg}");
    assert!(msg.contains("e2fsck -p"), "{msg}");
    assert!(msg.contains("exit status"), "{msg}");
}

#[test]
fn block_mode_bind_of_a_device_node() {
    if !can_run(
        "block_mode_bind_of_a_device_node",
        &["losetup", "mount", "umount"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lo = LoopDev::new(dir.path(), "disk.img", 8 * MIB);
    let target = dir.path().join("pod/volumes/dev");
    assert_eq!(
        mount::bind_mount(&lo.dev, &target, false).unwrap(),
        MountOutcome::Mounted
    );
    let _guard = Unmount(target.clone());
    assert_eq!(
        mount::bind_mount(&lo.dev, &target, false).unwrap(),
        MountOutcome::AlreadyMounted
    );
    assert!(mount::is_mount_point(&target).unwrap());
    assert_eq!(
        mount::device_mounted_at(&target).unwrap().as_deref(),
        Some(lo.dev.as_path())
    );
    assert_eq!(mount::block_device_size(&target).unwrap(), 8 * MIB);

    // Bytes written through the bound node, O_DIRECT, are the device's bytes.
    let data = pattern(3, 1 << 20);
    let mut buf = AlignedBuf::new(data.len());
    buf.as_mut().copy_from_slice(&data);
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&target)
        .unwrap();
    f.seek(SeekFrom::Start(MIB)).unwrap();
    f.write_all(buf.as_ref()).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut back = vec![0u8; data.len()];
    let mut d = File::open(&lo.file).unwrap();
    d.seek(SeekFrom::Start(MIB)).unwrap();
    d.read_exact(&mut back).unwrap();
    assert!(back == data, "bytes differ");

    assert_eq!(
        mount::unmount_and_remove(&target).unwrap(),
        UnmountOutcome::Unmounted
    );
    assert!(!target.exists());
}

#[test]
fn xfs_format_mount_and_grow() {
    if !can_run(
        "xfs_format_mount_and_grow",
        &["losetup", "blkid", "mkfs.xfs", "xfs_growfs"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // mkfs.xfs refuses filesystems under 300 MB; the file is sparse.
    let lo = LoopDev::new(dir.path(), "disk.img", 320 * MIB);
    let mnt = dir.path().join("mnt");
    assert_eq!(
        mount::format_and_mount(&lo.dev, &mnt, FsType::Xfs, &[], false).unwrap(),
        MountOutcome::Mounted
    );
    let _guard = Unmount(mnt.clone());
    let data = pattern(5, MIB_USIZE);
    write_synced(&mnt.join("data"), &data).unwrap();
    let st = mount::fs_stats(&mnt).unwrap();
    File::options()
        .write(true)
        .open(&lo.file)
        .unwrap()
        .set_len(640 * MIB)
        .unwrap();
    loopdev::set_capacity(&lo.dev).unwrap();
    mount::grow_filesystem(&lo.dev, Some(&mnt), "xfs").unwrap();
    let grown = mount::fs_stats(&mnt).unwrap();
    assert!(
        grown.total_bytes >= st.total_bytes + 300 * MIB,
        "{st:?} -> {grown:?}"
    );
    assert_eq!(std::fs::read(mnt.join("data")).unwrap(), data);
    assert_eq!(mount::unmount(&mnt).unwrap(), UnmountOutcome::Unmounted);
    assert_eq!(mount::fsck(&lo.dev, "xfs").unwrap(), FsckOutcome::Skipped);
    assert_eq!(
        mount::format_if_blank(&lo.dev, FsType::Xfs).unwrap(),
        FormatOutcome::AlreadyFormatted
    );
}

#[test]
fn probe_of_a_missing_device_is_an_error_not_blank() {
    let err = mount::probe(Path::new("/dev/cairn-no-such-device")).unwrap_err();
    assert!(matches!(err, HostError::Io { op: "open", .. }), "{err}");
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
