//! Filesystems on a node: probe, format, check, mount, bind, unmount, stat and grow.
//!
//! Guarantees:
//! - A device that holds anything `blkid` recognises (a filesystem, a partition table, a RAID
//!   member) is never formatted; a device `blkid` cannot read is an error, never "blank".
//! - Mounting and unmounting are idempotent: mounting what is already mounted at the target
//!   succeeds ([`MountOutcome::AlreadyMounted`]), mounting something else there fails, and
//!   unmounting a path that is not a mount point (or does not exist) succeeds.
//! - Every external tool runs with an argument vector (no shell) and its failure names the
//!   command, its exit status and its standard error.
//!
//! Assumes: Linux, root (CAP_SYS_ADMIN), util-linux (`blkid`, `mount`, `umount`), e2fsprogs;
//! xfsprogs for xfs. Every function blocks (it runs tools and waits for them): call them
//! from `tokio::task::spawn_blocking` in async code.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::cmd::Cmd;
use super::error::{HostError, Result};
use super::mountinfo::{self, MountEntry};

/// A filesystem Cairn formats, checks and grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsType {
    /// ext4 (the default).
    #[default]
    Ext4,
    /// xfs (needs xfsprogs).
    Xfs,
}

impl FsType {
    /// The name `mount -t` and `blkid` use.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsType {
    type Err = HostError;

    /// `ext4` or `xfs`; the empty string (CSI's "no fs_type given") is ext4.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "" | "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(HostError::UnsupportedFs(other.to_string())),
        }
    }
}

/// What a block device holds, according to `blkid -p`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Nothing `blkid` recognises: safe to format.
    Blank,
    /// A filesystem.
    Filesystem {
        /// Its type (`ext4`, `xfs`...).
        fs_type: String,
        /// Its UUID, if it has one.
        uuid: Option<String>,
    },
    /// Something else (partition table, RAID member, encrypted volume...), described.
    Other(String),
}

/// Probes `device` for a filesystem or other signature with `blkid -p` (low-level probing,
/// no cache). The device is opened first, so a missing or unreadable device is an error and
/// not mistaken for a blank one (`blkid` exits 2 for both).
pub fn probe(device: &Path) -> Result<Probe> {
    File::open(device).map_err(|e| HostError::io("open", device, e))?;
    let (out, line) = Cmd::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device)
        .output()?;
    match out.status.code() {
        Some(0) => Ok(parse_blkid_export(&String::from_utf8_lossy(&out.stdout))),
        // "No (specified) devices could be identified": nothing on it.
        Some(2) => Ok(Probe::Blank),
        _ => Err(super::cmd::failed(line, &out)),
    }
}

/// Interprets `blkid -p -o export` output (`KEY=value` lines).
pub fn parse_blkid_export(text: &str) -> Probe {
    let get = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.trim().to_string())
    };
    let usage = get("USAGE");
    match (get("TYPE"), get("PTTYPE")) {
        (Some(fs_type), _) if usage.as_deref().is_none_or(|u| u == "filesystem") => {
            Probe::Filesystem {
                fs_type,
                uuid: get("UUID"),
            }
        }
        (Some(t), _) => Probe::Other(format!("{} signature {t}", usage.unwrap_or_default())),
        (None, Some(pt)) => Probe::Other(format!("partition table {pt}")),
        (None, None) => Probe::Other(format!("unrecognised blkid output {:?}", text.trim())),
    }
}

/// What [`format_if_blank`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatOutcome {
    /// The device was blank and now holds a new filesystem.
    Formatted,
    /// The device already held a filesystem of the requested type; nothing was written.
    AlreadyFormatted,
}

/// Formats `device` with `fs` if (and only if) [`probe`] finds it blank. A filesystem of
/// another type, or any other signature, is an error and the device is left untouched.
///
/// ext4: `mkfs.ext4 -F -m0 -E lazy_itable_init=1,lazy_journal_init=1,nodiscard` (no reserved
/// blocks; inode tables and journal are not zeroed up front, which on a thin network volume
/// would write gigabytes; no discard pass, a new Cairn volume reads zeros already).
/// xfs: `mkfs.xfs -K` (no discard pass).
pub fn format_if_blank(device: &Path, fs: FsType) -> Result<FormatOutcome> {
    match probe(device)? {
        Probe::Blank => {
            mkfs(device, fs)?;
            Ok(FormatOutcome::Formatted)
        }
        Probe::Filesystem { fs_type, .. } if fs_type == fs.as_str() => {
            tracing::debug!(device = %device.display(), %fs_type, "already formatted");
            Ok(FormatOutcome::AlreadyFormatted)
        }
        Probe::Filesystem { fs_type, .. } => Err(HostError::FsTypeMismatch {
            device: device.into(),
            found: fs_type,
            wanted: fs.as_str().into(),
        }),
        Probe::Other(what) => Err(HostError::UnknownContent {
            device: device.into(),
            what,
        }),
    }
}

fn mkfs(device: &Path, fs: FsType) -> Result<()> {
    tracing::info!(device = %device.display(), fs = %fs, "formatting");
    match fs {
        FsType::Ext4 => Cmd::new("mkfs.ext4")
            .args([
                "-F",
                "-m0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ])
            .arg(device)
            .run()?,
        FsType::Xfs => Cmd::new("mkfs.xfs").arg("-K").arg(device).run()?,
    };
    Ok(())
}

/// What [`fsck`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsckOutcome {
    /// No errors.
    Clean,
    /// Errors were found and corrected.
    Corrected,
    /// Not checked (xfs checks itself at mount, replaying its log).
    Skipped,
}

/// Checks the filesystem on an unmounted `device` and repairs what is safe to repair
/// without questions: `e2fsck -p` for ext2/3/4, `fsck -a` for other types except xfs, which
/// is skipped. Exit status 0 is clean, 1 corrected; 2 and above is an error carrying the
/// tool's output (an ext4 that needs a manual `e2fsck` is not mounted).
pub fn fsck(device: &Path, fs_type: &str) -> Result<FsckOutcome> {
    let cmd = match fs_type {
        "xfs" => return Ok(FsckOutcome::Skipped),
        "ext2" | "ext3" | "ext4" => Cmd::new("e2fsck").arg("-p").arg(device),
        other => Cmd::new("fsck").args(["-a", "-t", other]).arg(device),
    };
    let (out, line) = cmd.output()?;
    match out.status.code() {
        Some(0) => Ok(FsckOutcome::Clean),
        Some(1) => {
            tracing::warn!(device = %device.display(), output = %String::from_utf8_lossy(&out.stdout).trim(),
                "fsck corrected errors");
            Ok(FsckOutcome::Corrected)
        }
        _ => Err(super::cmd::failed(line, &out)),
    }
}

/// What a mount call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOutcome {
    /// Mounted now.
    Mounted,
    /// The same thing was mounted there already; nothing was done.
    AlreadyMounted,
}

/// Mounts the filesystem on `device` at the directory `target` (created if missing) with
/// `mount -t FS_TYPE [-o OPTIONS] DEVICE TARGET`; `options` are mount(8) options such as
/// `ro`, `noatime`, `discard`. If `target` is already a mount point of `device` this returns
/// [`MountOutcome::AlreadyMounted`]; of anything else, [`HostError::MountedElsewhere`].
pub fn mount(
    device: &Path,
    target: &Path,
    fs_type: &str,
    options: &[&str],
) -> Result<MountOutcome> {
    let rdev = device_number(device)?;
    if let Some(e) = mountinfo::mount_at(target)? {
        if (e.major, e.minor) == rdev {
            return Ok(MountOutcome::AlreadyMounted);
        }
        return Err(mounted_elsewhere(target, &e));
    }
    std::fs::create_dir_all(target).map_err(|e| HostError::io("mkdir", target, e))?;
    let mut cmd = Cmd::new("mount").arg("-t").arg(fs_type);
    let opts = join_options(options)?;
    if !opts.is_empty() {
        cmd = cmd.arg("-o").arg(opts);
    }
    tracing::info!(device = %device.display(), target = %target.display(), fs_type, ?options, "mounting");
    cmd.arg(device).arg(target).run()?;
    Ok(MountOutcome::Mounted)
}

/// Bind-mounts `source` (a directory, a file, or a device node such as `/dev/loop0` for a
/// block-mode volume) onto `target`. A missing target is created: a directory for a
/// directory source, an empty file otherwise (its parent directory must exist or is
/// created). With `read_only`, the bind is remounted `remount,bind,ro` (the source stays
/// writable); if that fails the bind is undone. If `target` is already a mount point showing
/// the same inode as `source` this returns [`MountOutcome::AlreadyMounted`].
///
/// A read-only mount does not stop writes through a device node (Linux applies EROFS to
/// files, directories and links only): a read-only block-mode volume needs a read-only
/// device (`LoopOptions::read_only`, nbdfuse `-r`).
pub fn bind_mount(source: &Path, target: &Path, read_only: bool) -> Result<MountOutcome> {
    let src = std::fs::metadata(source).map_err(|e| HostError::io("stat", source, e))?;
    if let Some(e) = mountinfo::mount_at(target)? {
        let same = std::fs::metadata(target)
            .map(|t| t.dev() == src.dev() && t.ino() == src.ino())
            .unwrap_or(false);
        if same && e.is_read_only() == read_only {
            return Ok(MountOutcome::AlreadyMounted);
        }
        return Err(mounted_elsewhere(target, &e));
    }
    if src.is_dir() {
        std::fs::create_dir_all(target).map_err(|e| HostError::io("mkdir", target, e))?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| HostError::io("mkdir", parent, e))?;
        }
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(target)
            .map_err(|e| HostError::io("create", target, e))?;
    }
    tracing::info!(source = %source.display(), target = %target.display(), read_only, "bind mounting");
    Cmd::new("mount")
        .arg("--bind")
        .arg(source)
        .arg(target)
        .run()?;
    if read_only {
        if let Err(e) = Cmd::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(target)
            .run()
        {
            if let Err(undo) = Cmd::new("umount").arg(target).run() {
                tracing::error!(target = %target.display(), error = %undo, "cannot undo the bind mount");
            }
            return Err(e);
        }
    }
    Ok(MountOutcome::Mounted)
}

/// What [`unmount`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmountOutcome {
    /// One or more mounts were removed from the path.
    Unmounted,
    /// The path was not a mount point (or did not exist).
    NotMounted,
}

/// Unmounts everything mounted at `target` (`umount TARGET`, repeated while mounts are
/// stacked there). Not a mount point, or missing: [`UnmountOutcome::NotMounted`]. A busy
/// filesystem is an error; there is no lazy fallback.
pub fn unmount(target: &Path) -> Result<UnmountOutcome> {
    let mut outcome = UnmountOutcome::NotMounted;
    // Bounded: each round removes one mount or fails.
    for _ in 0..64 {
        if !mountinfo::is_mount_point(target)? {
            return Ok(outcome);
        }
        tracing::info!(target = %target.display(), "unmounting");
        if let Err(e) = Cmd::new("umount").arg(mountinfo::normalize(target)).run() {
            // Someone else may have unmounted it meanwhile.
            if mountinfo::is_mount_point(target)? {
                return Err(e);
            }
        }
        outcome = UnmountOutcome::Unmounted;
    }
    Err(HostError::BadState {
        path: target.into(),
        why: "still a mount point after 64 unmounts".into(),
    })
}

/// [`unmount`], then removes `target` (an empty directory or a file) if it exists: what a
/// CSI NodeUnpublish / NodeUnstage leaves behind.
pub fn unmount_and_remove(target: &Path) -> Result<UnmountOutcome> {
    let outcome = unmount(target)?;
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir(target).map_err(|e| HostError::io("rmdir", target, e))?
        }
        Ok(_) => std::fs::remove_file(target).map_err(|e| HostError::io("unlink", target, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(HostError::io("stat", target, e)),
    }
    Ok(outcome)
}

/// Whether `path` is a mount point (per `/proc/self/mountinfo`, so a dead FUSE mount counts).
pub fn is_mount_point(path: &Path) -> Result<bool> {
    mountinfo::is_mount_point(path)
}

/// The topmost mount at `path`, if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    mountinfo::mount_at(path)
}

/// The block device whose filesystem is mounted at `path` (`/dev/loop0`), or the device node
/// bind-mounted there (a block-mode volume; found by its device number in `/sys/dev/block`,
/// whatever filesystem `/dev` is). `None` when `path` is not a mount point or its source is
/// not a device (tmpfs, FUSE).
pub fn device_mounted_at(path: &Path) -> Result<Option<PathBuf>> {
    let Some(e) = mountinfo::mount_at(path)? else {
        return Ok(None);
    };
    if let Ok(m) = std::fs::metadata(path) {
        if m.file_type().is_block_device() {
            return device_node(libc::major(m.rdev()), libc::minor(m.rdev())).map(Some);
        }
    }
    if e.source.starts_with("/dev/") {
        return Ok(Some(PathBuf::from(e.source)));
    }
    Ok(None)
}

/// `/dev/NAME` of block device `major:minor`, from `/sys/dev/block/MAJOR:MINOR/uevent`.
fn device_node(major: u32, minor: u32) -> Result<PathBuf> {
    let uevent = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/uevent"));
    let text = std::fs::read_to_string(&uevent).map_err(|e| HostError::io("read", &uevent, e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(|name| Path::new("/dev").join(name))
        .ok_or_else(|| HostError::BadState {
            path: uevent.clone(),
            why: "no DEVNAME".into(),
        })
}

/// The mount points of the filesystem on block device `device`.
pub fn mount_points_of(device: &Path) -> Result<Vec<PathBuf>> {
    let (major, minor) = device_number(device)?;
    mountinfo::mount_points_of(major, minor)
}

/// Space and inodes of a mounted filesystem, from `statvfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// Size of the filesystem's data area.
    pub total_bytes: u64,
    /// Free to unprivileged users (what CSI reports as available).
    pub available_bytes: u64,
    /// `total - free`.
    pub used_bytes: u64,
    /// Inodes in the filesystem.
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
    /// `total - free`.
    pub used_inodes: u64,
}

/// [`FsStats`] of the filesystem containing `path`.
pub fn fs_stats(path: &Path) -> Result<FsStats> {
    let s = rustix::fs::statvfs(path).map_err(|e| HostError::io("statvfs", path, e.into()))?;
    let unit = s.f_frsize;
    Ok(FsStats {
        total_bytes: s.f_blocks.saturating_mul(unit),
        available_bytes: s.f_bavail.saturating_mul(unit),
        used_bytes: s.f_blocks.saturating_sub(s.f_bfree).saturating_mul(unit),
        total_inodes: s.f_files,
        free_inodes: s.f_ffree,
        used_inodes: s.f_files.saturating_sub(s.f_ffree),
    })
}

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes (linux/fs.h). This
/// encoding (read = 2 in the top two bits) is that of x86, arm and riscv.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64"
))]
const BLKGETSIZE64: libc::c_ulong = (2 << 30) | (8 << 16) | (0x12 << 8) | 114;

/// The size in bytes of the block device at `path` (ioctl BLKGETSIZE64); of a regular file,
/// its length.
pub fn block_device_size(path: &Path) -> Result<u64> {
    let f = File::open(path).map_err(|e| HostError::io("open", path, e))?;
    let meta = f.metadata().map_err(|e| HostError::io("stat", path, e))?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live,
    // writable u64 for the duration of the call; the fd is open (owned by `f`).
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(HostError::io(
            "BLKGETSIZE64",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(size)
}

/// Grows the filesystem on `device` to fill the device.
///
/// Mounted (`mount_point` given), online: `resize2fs DEVICE` for ext2/3/4 (the kernel wants
/// CAP_SYS_RESOURCE for it, which a privileged CSI node container has), `xfs_growfs -d
/// MOUNT_POINT` for xfs. Unmounted (`None`): ext2/3/4 only, `e2fsck -f -p DEVICE` (which
/// resize2fs insists on) then `resize2fs DEVICE`.
pub fn grow_filesystem(device: &Path, mount_point: Option<&Path>, fs_type: &str) -> Result<()> {
    tracing::info!(device = %device.display(), mount_point = ?mount_point, fs_type, "growing filesystem");
    match (fs_type, mount_point) {
        ("ext2" | "ext3" | "ext4", Some(_)) => Cmd::new("resize2fs").arg(device).run()?,
        ("ext2" | "ext3" | "ext4", None) => {
            let (out, line) = Cmd::new("e2fsck").args(["-f", "-p"]).arg(device).output()?;
            if !matches!(out.status.code(), Some(0 | 1)) {
                return Err(super::cmd::failed(line, &out));
            }
            Cmd::new("resize2fs").arg(device).run()?
        }
        ("xfs", Some(mp)) => Cmd::new("xfs_growfs").arg("-d").arg(mp).run()?,
        ("xfs", None) => return Err(HostError::NotMounted(device.into())),
        (other, _) => return Err(HostError::UnsupportedFs(other.into())),
    };
    Ok(())
}

/// Prepares and mounts a filesystem volume, the NodeStage sequence: [`format_if_blank`]
/// (only when not `read_only`: a read-only stage never writes), [`fsck`] of what was
/// already there, then [`mount`] (with `ro` added when `read_only`).
pub fn format_and_mount(
    device: &Path,
    target: &Path,
    fs: FsType,
    options: &[&str],
    read_only: bool,
) -> Result<MountOutcome> {
    if let Some(e) = mountinfo::mount_at(target)? {
        if (e.major, e.minor) == device_number(device)? {
            return Ok(MountOutcome::AlreadyMounted);
        }
        return Err(mounted_elsewhere(target, &e));
    }
    let fs_type = if read_only {
        match probe(device)? {
            Probe::Filesystem { fs_type, .. } => fs_type,
            Probe::Blank => fs.as_str().to_string(),
            Probe::Other(what) => {
                return Err(HostError::UnknownContent {
                    device: device.into(),
                    what,
                })
            }
        }
    } else {
        if format_if_blank(device, fs)? == FormatOutcome::AlreadyFormatted {
            fsck(device, fs.as_str())?;
        }
        fs.as_str().to_string()
    };
    let mut opts = options.to_vec();
    if read_only && !opts.contains(&"ro") {
        opts.push("ro");
    }
    mount(device, target, &fs_type, &opts)
}

fn join_options(options: &[&str]) -> Result<String> {
    if let Some(bad) = options.iter().find(|o| o.is_empty() || o.contains('\0')) {
        return Err(HostError::InvalidMountOption((*bad).to_string()));
    }
    Ok(options.join(","))
}

/// `(major, minor)` of the block device node `device`.
fn device_number(device: &Path) -> Result<(u32, u32)> {
    let m = std::fs::metadata(device).map_err(|e| HostError::io("stat", device, e))?;
    if !m.file_type().is_block_device() {
        return Err(HostError::NotBlockDevice(device.into()));
    }
    let rdev = m.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

fn mounted_elsewhere(target: &Path, e: &MountEntry) -> HostError {
    HostError::MountedElsewhere {
        target: target.into(),
        what: format!(
            "{} ({}, {}:{}{})",
            e.source,
            e.fs_type,
            e.major,
            e.minor,
            if e.root == Path::new("/") {
                String::new()
            } else {
                format!(", root {}", e.root.display())
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_export_is_interpreted() {
        assert_eq!(
            parse_blkid_export(
                "DEVNAME=/dev/loop0\nUUID=abc\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n"
            ),
            Probe::Filesystem {
                fs_type: "ext4".into(),
                uuid: Some("abc".into())
            }
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/loop0\nPTUUID=x\nPTTYPE=gpt\n"),
            Probe::Other("partition table gpt".into())
        );
        assert_eq!(
            parse_blkid_export("TYPE=linux_raid_member\nUSAGE=raid\n"),
            Probe::Other("raid signature linux_raid_member".into())
        );
        assert!(matches!(
            parse_blkid_export("DEVNAME=/dev/x\n"),
            Probe::Other(_)
        ));
    }

    #[test]
    fn fs_type_parses() {
        assert_eq!("".parse::<FsType>().unwrap(), FsType::Ext4);
        assert_eq!("xfs".parse::<FsType>().unwrap(), FsType::Xfs);
        assert!(matches!(
            "btrfs".parse::<FsType>(),
            Err(HostError::UnsupportedFs(_))
        ));
    }

    #[test]
    fn blkgetsize64_matches_linux() {
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
    }
}
