//! Loop devices over files: attach (`losetup --find --show`), find by backing file, refresh
//! the size (`losetup -c`), detach and wait until the kernel has let go.
//!
//! Backing files are found through `/sys/block/loop*/loop/backing_file`, which does not stat
//! the file: it works when the file sits on a dead FUSE mount. Functions block.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cmd::Cmd;
use super::error::{HostError, Result};
use super::mountinfo::normalize;
use super::wait::poll;

/// How to set up a loop device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopOptions {
    /// `--direct-io=on`: the loop driver does O_DIRECT I/O on the backing file, so the data
    /// is not cached twice (once for the loop device, once for the file).
    pub direct_io: bool,
    /// `--read-only`.
    pub read_only: bool,
    /// `--sector-size N` (logical block size); `None`: the kernel's 512. A Cairn export
    /// refuses I/O not aligned to 4096 bytes, so its devices use 4096.
    pub sector_size: Option<u32>,
}

/// Attaches `file` to a free loop device and returns the device (`/dev/loopN`).
pub fn attach(file: &Path, opts: LoopOptions) -> Result<PathBuf> {
    let mut cmd = Cmd::new("losetup").args(["--find", "--show"]);
    if opts.direct_io {
        cmd = cmd.arg("--direct-io=on");
    }
    if opts.read_only {
        cmd = cmd.arg("--read-only");
    }
    if let Some(n) = opts.sector_size {
        cmd = cmd.arg("--sector-size").arg(n.to_string());
    }
    let out = cmd.arg(file).run()?;
    let dev = out.trim();
    if !dev.starts_with("/dev/") {
        return Err(HostError::BadState {
            path: file.into(),
            why: format!("losetup printed {dev:?} instead of a device"),
        });
    }
    tracing::info!(file = %file.display(), device = dev, "loop device attached");
    Ok(PathBuf::from(dev))
}

/// The file backing loop device `device`, or `None` if it has none (detached, or gone).
pub fn backing_file(device: &Path) -> Result<Option<PathBuf>> {
    let Some(name) = device.file_name() else {
        return Ok(None);
    };
    let attr = Path::new("/sys/block").join(name).join("loop/backing_file");
    match std::fs::read(&attr) {
        Ok(mut b) => {
            while b.last() == Some(&b'\n') {
                b.pop();
            }
            use std::os::unix::ffi::OsStringExt;
            Ok(Some(PathBuf::from(std::ffi::OsString::from_vec(b))))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(HostError::io("read", attr, e)),
    }
}

/// The loop devices backed by `file` (sorted). A file deleted since shows as `PATH (deleted)`
/// in sysfs and still matches.
pub fn devices_of(file: &Path) -> Result<Vec<PathBuf>> {
    let want = normalize(file);
    let deleted = {
        let mut p = want.clone().into_os_string();
        p.push(" (deleted)");
        PathBuf::from(p)
    };
    let dir = Path::new("/sys/block");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| HostError::io("read_dir", dir, e))? {
        let entry = entry.map_err(|e| HostError::io("read_dir", dir, e))?;
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("loop") {
            continue;
        }
        let dev = Path::new("/dev").join(&name);
        if let Some(b) = backing_file(&dev)? {
            if b == want || b == deleted {
                found.push(dev);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Re-reads the size of the backing file into the loop device (`losetup -c`), for a file
/// that grew.
pub fn set_capacity(device: &Path) -> Result<()> {
    Cmd::new("losetup").arg("-c").arg(device).run()?;
    Ok(())
}

/// Detaches loop device `device` and waits (up to `timeout`) until the kernel has released
/// it. A device that is mounted or open exclusively is [`HostError::DeviceBusy`] and is left
/// attached (`losetup -d` would only mark it for auto-clear). Detaching a device that has no
/// backing file is a no-op.
pub fn detach(device: &Path, timeout: Duration) -> Result<()> {
    let Some(file) = backing_file(device)? else {
        return Ok(());
    };
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
    {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(HostError::DeviceBusy {
                device: device.into(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(HostError::io("open", device, e)),
    }
    // Released means: no longer backed by *this* file. Another attach may take the freed
    // device number for its own file at once; that is not ours to wait for.
    let still_ours =
        || Ok::<_, HostError>(backing_file(device)?.as_deref() == Some(file.as_path()));
    if let Err(e) = Cmd::new("losetup").arg("-d").arg(device).run() {
        // It may have been detached meanwhile.
        if still_ours()? {
            return Err(e);
        }
    }
    poll(
        &format!("release of {}", device.display()),
        timeout,
        || Ok((!still_ours()?).then_some(())),
        || "it is still open somewhere (auto-clear pending)".into(),
    )?;
    tracing::info!(device = %device.display(), "loop device detached");
    Ok(())
}
