//! Attaching an NBD export as a local block device, by volume id.
//!
//! Mode [`AttachMode::Kernel`], the production path: the kernel NBD driver, configured over
//! netlink ([`super::kernel`]), serves the export as `/dev/nbdN`. The state file records the
//! device's index; the kernel names the device after the volume (its backend identifier), so
//! a device is found again, and never taken for another volume's, after a restart. One
//! reconnect keeper per attachment (a tokio task on the runtime given by
//! [`Attacher::with_runtime`], started again by [`Attacher::resume_keepers`] after a restart)
//! gives the kernel a new connection when one dies; I/O waits for it up to
//! [`super::kernel::DEAD_CONN_TIMEOUT`]. The device grows online ([`Attacher::grow_device`]).
//!
//! Modes [`AttachMode::Fuse`] and [`AttachMode::CairnFuse`], for nodes without the kernel NBD
//! driver: a FUSE helper serves the export as the file `STATE_DIR/<volume>/fuse/disk` (a FUSE
//! mount of its own), and a loop device (`losetup --find --show --direct-io=on`) turns that
//! file into `/dev/loopN`. The helper is `nbdfuse` (`fuse`) or `cairn nbd-file`
//! (`cairn-fuse`, [`super::nbdfile`]); both are handled by the same code (pidfile, log, mount,
//! loop device, teardown), only the command line and the online growth differ.
//!
//! Guarantees:
//! - Idempotent by volume id: attaching an attached volume (same URI, same read-only flag)
//!   returns its device; detaching a volume that is not attached succeeds. Attach and detach
//!   of one volume are serialised across threads and processes (a `flock` on
//!   `STATE_DIR/.locks/<volume>`).
//! - Restart-safe: what is attached is found again from `STATE_DIR` and the kernel alone
//!   (the `attachment` file, the helper's pidfile, the FUSE mount in mountinfo, the loop
//!   device in `/sys/block/loop*/loop/backing_file`). The helper runs in its own session
//!   (`setsid`), so it outlives the `cairn csi` process that started it; a restarted one
//!   re-attaches what it finds healthy and rebuilds what it finds half-done (a crash between
//!   the steps).
//! - Waits are conditions with deadlines (pidfile written, loop device released, helper
//!   exited, file grown), never fixed sleeps; a helper that dies is reported with its standard
//!   error (kept in `STATE_DIR/<volume>/nbdfuse.log`; the pidfile is `nbdfuse.pid`, whichever
//!   the helper).
//! - A loop device in use (a mounted filesystem) is never detached: detach fails with
//!   [`HostError::DeviceBusy`] and changes nothing.
//!
//! Assumes: root; for `kernel` the `nbd` module; for the FUSE modes FUSE and loop devices, `nbdfuse` (mode `fuse`) or the `cairn` binary
//! ([`AttachConfig::cairn`], mode `cairn-fuse`), `losetup`, `fusermount3`. `STATE_DIR`
//! should be on a filesystem that does not survive a reboot (e.g. under `/run`), like the
//! FUSE mounts and loop devices it describes; a state directory found after a reboot is
//! stale and rebuilt on the next attach. A `cairn csi` that runs as PID 1 of a container must
//! reap orphans (nbdfuse processes of an earlier incarnation exit as its children).
//! nbdfuse reads the export size once: a `fuse` attachment cannot grow online; a `cairn-fuse`
//! one can ([`Attacher::grow_device`]).
//!
//! Every method blocks (it runs tools and waits for them): call it from
//! `tokio::task::spawn_blocking` in async code, never from a runtime worker thread. Kernel NBD
//! steps are async; they run on the current runtime (`Handle::block_on` from its blocking
//! pool) or, outside any runtime, on a small current-thread runtime of their own.
//!
//! Layout: this module holds the [`Attacher`]'s orchestration (per-volume lock, attach,
//! detach, get, list, grow); `state` the state file; `fuse` the helper process and loop
//! device of the FUSE modes; `kernel_mode` kernel attachments and their reconnect keepers;
//! `mode` and `uri` the [`AttachMode`] and [`NbdUri`] types.

mod fuse;
mod kernel_mode;
mod mode;
mod state;
mod uri;

pub use mode::AttachMode;
pub use uri::NbdUri;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::time::Duration;

use super::error::{HostError, Result};
use kernel_mode::block_on;
use state::{read_state, State};

/// Settings of an [`Attacher`].
#[derive(Debug, Clone)]
pub struct AttachConfig {
    /// Where attachments keep their state, one directory per volume.
    pub state_dir: PathBuf,
    /// The nbdfuse program (`nbdfuse`, looked up in `PATH`).
    pub nbdfuse: PathBuf,
    /// The `cairn` binary whose hidden `nbd-file` subcommand serves [`AttachMode::CairnFuse`]
    /// (default: this process's executable, `std::env::current_exe`).
    pub cairn: PathBuf,
    /// How long the FUSE helper may take to connect and mount, and a `cairn-fuse` file to
    /// show a grown export (default 30 s).
    pub ready_timeout: Duration,
    /// How long a detach waits for the loop device to be released and nbdfuse to exit
    /// (default 30 s); nbdfuse still running then is killed.
    pub detach_timeout: Duration,
    /// Loop device with `--direct-io=on` (default true): no second page cache.
    pub direct_io: bool,
    /// Logical sector size of the loop device (default 4096: Cairn exports refuse I/O that
    /// is not 4 KiB aligned, and nbdfuse passes requests through unchanged).
    pub sector_size: u32,
}

impl AttachConfig {
    /// Defaults, with state under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        AttachConfig {
            state_dir: state_dir.into(),
            nbdfuse: PathBuf::from("nbdfuse"),
            cairn: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cairn")),
            ready_timeout: Duration::from_secs(30),
            detach_timeout: Duration::from_secs(30),
            direct_io: true,
            sector_size: 4096,
        }
    }
}

/// An attached volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The volume id.
    pub volume_id: String,
    /// How it is attached.
    pub mode: AttachMode,
    /// The export.
    pub uri: String,
    /// Attached read-only.
    pub read_only: bool,
    /// The block device (`/dev/loopN`, `/dev/nbdN`).
    pub device: PathBuf,
}

/// What the state directory and the kernel say about one volume ([`Attacher::list`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentState {
    /// The volume id.
    pub volume_id: String,
    /// The export, if the state file could be read.
    pub uri: Option<String>,
    /// Attached read-only.
    pub read_only: bool,
    /// The block device, if one is set up.
    pub device: Option<PathBuf>,
    /// The FUSE helper (nbdfuse or `cairn nbd-file`) is running; in mode `kernel`, the kernel
    /// reports the device configured.
    pub helper_alive: bool,
    /// The helper running, its FUSE mount present and a device set up (in mode `kernel`: the
    /// device configured for this volume): usable as is.
    pub healthy: bool,
}

/// What [`Attacher::detach`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachOutcome {
    /// The volume was attached (at least partly) and is no longer.
    Detached,
    /// Nothing was attached.
    NotAttached,
}

/// Attaches and detaches volumes on this node, keeping state under one directory.
#[derive(Debug)]
pub struct Attacher {
    cfg: AttachConfig,
    /// FUSE helper processes this process started, kept to reap them.
    children: Mutex<HashMap<String, Child>>,
    /// Where reconnect keepers of kernel attachments run ([`Attacher::with_runtime`]).
    runtime: Option<tokio::runtime::Handle>,
    /// The reconnect keeper of each kernel attachment, by volume id.
    keepers: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

const LOCKS: &str = ".locks";
/// How often [`Attacher::grow_device`] repeats its `SIGHUP` (mode `cairn-fuse`) or its
/// resize (mode `kernel`) while the device has not grown.
const RESIZE_SIGNAL_EVERY: Duration = Duration::from_secs(1);

impl Attacher {
    /// An attacher with default settings and state under `state_dir` (created).
    pub fn new(state_dir: impl Into<PathBuf>) -> Result<Attacher> {
        Attacher::with_config(AttachConfig::new(state_dir))
    }

    /// An attacher with `cfg` (its state directory is created and made absolute).
    pub fn with_config(mut cfg: AttachConfig) -> Result<Attacher> {
        let dir = &cfg.state_dir;
        std::fs::create_dir_all(dir.join(LOCKS)).map_err(|e| HostError::io("mkdir", dir, e))?;
        cfg.state_dir =
            std::fs::canonicalize(dir).map_err(|e| HostError::io("canonicalize", dir, e))?;
        Ok(Attacher {
            cfg,
            children: Mutex::new(HashMap::new()),
            runtime: None,
            keepers: Mutex::new(HashMap::new()),
        })
    }

    /// Runs the reconnect keepers of kernel attachments on `runtime`, which must outlive
    /// them (the `cairn csi` runtime). Without one, a keeper runs on the runtime current at
    /// attach time, if any; outside any runtime a kernel device is attached without a keeper
    /// (a warning says so) and a dead connection is not replaced.
    pub fn with_runtime(mut self, runtime: tokio::runtime::Handle) -> Attacher {
        self.runtime = Some(runtime);
        self
    }

    /// Starts a reconnect keeper for every kernel attachment of the state directory that has
    /// none: what a restarted `cairn csi` calls once. A keeper of a device that is no longer
    /// configured for its volume ends at its first check. Returns how many were started.
    /// Does not block on the kernel (callable from async code).
    pub fn resume_keepers(&self) -> Result<usize> {
        let root = &self.cfg.state_dir;
        let mut started = 0;
        for entry in std::fs::read_dir(root).map_err(|e| HostError::io("read_dir", root, e))? {
            let entry = entry.map_err(|e| HostError::io("read_dir", root, e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str() else { continue };
            if validate_volume_id(id).is_err() || !entry.path().is_dir() {
                continue;
            }
            let Ok(st) = read_state(&entry.path()) else {
                continue;
            };
            if let (AttachMode::Kernel, Some(index), Ok(uri)) =
                (st.mode, st.index, NbdUri::parse(&st.uri))
            {
                started += usize::from(self.spawn_keeper(id, &uri, index));
            }
        }
        tracing::info!(started, "reconnect keepers of kernel NBD attachments");
        Ok(started)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }

    /// Attaches export `uri` as volume `volume_id` and returns its block device. Attaching an
    /// attached volume returns the same device; the same id with another URI, mode or
    /// read-only flag is [`HostError::AttachConflict`]. A half-done or dead attachment (FUSE
    /// helper gone) is torn down and made again; if its old device is still in use that fails with
    /// [`HostError::DeviceBusy`].
    pub fn attach(
        &self,
        volume_id: &str,
        uri: &str,
        mode: AttachMode,
        read_only: bool,
    ) -> Result<Attachment> {
        validate_volume_id(volume_id)?;
        let uri = NbdUri::parse(uri)?;
        if mode == AttachMode::Kernel {
            // Fail before touching anything on a node without the driver.
            block_on(super::kernel::open())??;
        }
        self.reap();
        let _lock = self.lock(volume_id)?;
        let dir = self.volume_dir(volume_id);
        let mut wanted = State {
            mode,
            uri: uri.to_string(),
            read_only,
            index: None,
        };
        if dir.exists() {
            match read_state(&dir) {
                Ok(st) if !st.same_target(&wanted) => {
                    return Err(HostError::AttachConflict {
                        volume: volume_id.into(),
                        existing: format!(
                            "{} {}{}",
                            st.mode,
                            st.uri,
                            if st.read_only { " (read-only)" } else { "" }
                        ),
                    })
                }
                Ok(st) if mode == AttachMode::Kernel => {
                    if let Some(device) = self.resume_kernel(volume_id, &uri, &st)? {
                        return Ok(self.attachment(volume_id, &wanted, device));
                    }
                }
                Ok(_) => {
                    if let Some(device) = self.resume_fuse(volume_id, &dir, read_only)? {
                        return Ok(self.attachment(volume_id, &wanted, device));
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = volume_id, error = %e, "unreadable attachment state; rebuilding")
                }
            }
            tracing::warn!(
                volume = volume_id,
                "stale attachment; tearing it down before attaching again"
            );
            self.teardown(volume_id, &dir)?;
        }
        let fresh = if mode == AttachMode::Kernel {
            self.attach_fresh_kernel(volume_id, &dir, &uri, &mut wanted)
        } else {
            self.attach_fresh_fuse(volume_id, &dir, &wanted)
        };
        let device = fresh.inspect_err(|_| {
            if let Err(e) = self.teardown(volume_id, &dir) {
                tracing::error!(volume = volume_id, error = %e, "cleanup of a failed attach");
            }
        })?;
        Ok(self.attachment(volume_id, &wanted, device))
    }

    /// Detaches volume `volume_id`: loop device(s) released (`losetup -d`, waiting until the
    /// kernel lets go), FUSE mount unmounted (`fusermount3 -u`), the helper exited (killed past
    /// the deadline), state directory removed. Mode `kernel`: the reconnect keeper stopped,
    /// the device disconnected (`NBD_CMD_DISCONNECT`, waiting until the kernel drops its
    /// configuration), state directory removed. Not attached: [`DetachOutcome::NotAttached`].
    /// A device still in use (mounted): [`HostError::DeviceBusy`], nothing changed.
    pub fn detach(&self, volume_id: &str) -> Result<DetachOutcome> {
        validate_volume_id(volume_id)?;
        self.reap();
        let lock = self.lock(volume_id)?;
        let dir = self.volume_dir(volume_id);
        let outcome = if dir.exists() {
            self.teardown(volume_id, &dir)?;
            DetachOutcome::Detached
        } else {
            DetachOutcome::NotAttached
        };
        lock.remove();
        Ok(outcome)
    }

    /// The volume's attachment, if it is attached and healthy.
    pub fn get(&self, volume_id: &str) -> Result<Option<Attachment>> {
        validate_volume_id(volume_id)?;
        let dir = self.volume_dir(volume_id);
        if !dir.exists() {
            return Ok(None);
        }
        let mode = read_state(&dir).map_or(AttachMode::Fuse, |s| s.mode);
        let st = self.inspect(volume_id, &dir)?;
        if st.healthy && mode == AttachMode::Kernel {
            // The device is ours: make sure it has a keeper (one may have died with an error).
            if let (Some(index), Some(uri)) = (read_state(&dir)?.index, &st.uri) {
                self.spawn_keeper(volume_id, &NbdUri::parse(uri)?, index);
            }
        }
        Ok(match (st.healthy, st.device, st.uri) {
            (true, Some(device), Some(uri)) => Some(Attachment {
                volume_id: volume_id.into(),
                mode,
                uri,
                read_only: st.read_only,
                device,
            }),
            _ => None,
        })
    }

    /// Every volume with a state directory, healthy or not: what a restarted `cairn csi`
    /// reconciles against (sorted by volume id).
    pub fn list(&self) -> Result<Vec<AttachmentState>> {
        self.reap();
        let root = &self.cfg.state_dir;
        let mut out = Vec::new();
        for entry in std::fs::read_dir(root).map_err(|e| HostError::io("read_dir", root, e))? {
            let entry = entry.map_err(|e| HostError::io("read_dir", root, e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str() else { continue };
            if validate_volume_id(id).is_err() || !entry.path().is_dir() {
                continue;
            }
            out.push(self.inspect(id, &entry.path())?);
        }
        out.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        Ok(out)
    }

    /// Makes the device of an attached volume at least `new_size` bytes, returning its size.
    /// A device already that large is left as is.
    ///
    /// [`AttachMode::CairnFuse`]: sends `SIGHUP` to the `cairn nbd-file` helper (again every
    /// second while waiting, in case the export had not grown yet), waits until the FUSE file
    /// reports at least `new_size` bytes (up to [`AttachConfig::ready_timeout`]; the helper's
    /// log on timeout), runs `losetup -c` and returns the device's new size.
    ///
    /// [`AttachMode::Kernel`]: a fresh handshake learns the export's size, `NBD_CMD_RECONFIGURE`
    /// gives it to the kernel (Linux >= 5.3), `BLKGETSIZE64` must show it; repeated every
    /// second while the export is still smaller than `new_size`, up to
    /// [`AttachConfig::ready_timeout`].
    ///
    /// [`AttachMode::Fuse`] cannot grow online: [`HostError::GrowUnsupported`]. nbdfuse (libnbd 1.14) takes the size from the NBD
    /// handshake once, at start, and its FUSE `getattr` returns that value for ever; NBD has
    /// no message announcing a new size, and nbdfuse has no option or signal to reconnect.
    /// `losetup -c` re-reads the file's size, so it sees the old size (checked: an nbdkit
    /// `file` export grown from 32 to 64 MiB shows 64 MiB to a new connection, 32 MiB on the
    /// nbdfuse file and, after `losetup -c`, on the loop device).
    pub fn grow_device(&self, volume_id: &str, new_size: u64) -> Result<u64> {
        let a = self.get(volume_id)?.ok_or_else(|| HostError::BadState {
            path: self.volume_dir(volume_id),
            why: "volume is not attached (or its attachment is broken)".into(),
        })?;
        let size = super::mount::block_device_size(&a.device)?;
        if size >= new_size {
            return Ok(size);
        }
        match a.mode {
            AttachMode::Kernel => self.grow_kernel(&a, new_size),
            AttachMode::CairnFuse => self.grow_fuse(&a, new_size),
            AttachMode::Fuse => Err(HostError::GrowUnsupported {
                volume: volume_id.into(),
                mode: a.mode.as_str(),
            }),
        }
    }

    fn volume_dir(&self, volume_id: &str) -> PathBuf {
        self.cfg.state_dir.join(volume_id)
    }

    fn attachment(&self, volume_id: &str, st: &State, device: PathBuf) -> Attachment {
        Attachment {
            volume_id: volume_id.into(),
            mode: st.mode,
            uri: st.uri.clone(),
            read_only: st.read_only,
            device,
        }
    }

    /// Undoes whatever part of an attachment exists, in reverse order, then removes `dir`.
    /// An unreadable state file: both kinds of leftovers are looked for.
    fn teardown(&self, volume_id: &str, dir: &Path) -> Result<()> {
        let st = read_state(dir).ok();
        if st.as_ref().is_none_or(|s| s.mode == AttachMode::Kernel) {
            self.teardown_kernel(volume_id, st.as_ref().and_then(|s| s.index))?;
            if st.is_some() {
                return remove_state_dir(volume_id, dir);
            }
        }
        self.teardown_fuse(volume_id, dir)
    }

    /// What the state directory `dir` and the kernel say about volume `volume_id`.
    fn inspect(&self, volume_id: &str, dir: &Path) -> Result<AttachmentState> {
        match read_state(dir).ok() {
            Some(st) if st.mode == AttachMode::Kernel => self.inspect_kernel(volume_id, &st),
            st => self.inspect_fuse(volume_id, dir, st),
        }
    }

    /// Takes the per-volume lock, blocking while another thread or process holds it.
    fn lock(&self, volume_id: &str) -> Result<VolumeLock> {
        let path = self.cfg.state_dir.join(LOCKS).join(volume_id);
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| HostError::io("open", &path, e))?;
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
                .map_err(|e| HostError::io("flock", &path, e.into()))?;
            // A detach that held the lock before us may have removed the file: then our lock
            // is on an orphan inode and another caller may lock a new file. Retry.
            let held = file
                .metadata()
                .map_err(|e| HostError::io("stat", &path, e))?;
            match std::fs::metadata(&path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(VolumeLock { file, path })
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(HostError::io("stat", &path, e)),
            }
        }
    }
}

impl Drop for Attacher {
    /// Stops the reconnect keepers this attacher started (the devices stay attached; a new
    /// attacher on the same state resumes them, [`Attacher::resume_keepers`]).
    fn drop(&mut self) {
        let keepers = self.keepers.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, k) in keepers.drain() {
            k.abort();
        }
    }
}

/// Removes an attachment's state directory (gone already: fine).
fn remove_state_dir(volume_id: &str, dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(HostError::io("rm -r", dir, e))
        }
        _ => {}
    }
    tracing::info!(volume = volume_id, "detached");
    Ok(())
}

/// An exclusive `flock` on `.locks/<volume>`, released when dropped.
struct VolumeLock {
    #[allow(dead_code)] // Held for its lock.
    file: File,
    path: PathBuf,
}

impl VolumeLock {
    /// Removes the lock file while still holding the lock (see [`Attacher::lock`]).
    fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove lock file");
        }
    }
}

/// A volume id usable as a directory name: `[A-Za-z0-9._-]{1,128}`, not starting with `.`.
pub fn validate_volume_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(HostError::InvalidVolumeId(id.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids() {
        for ok in ["vol0", "pvc-1234abcd-ef", "a.b_c", "x"] {
            validate_volume_id(ok).unwrap();
        }
        let long = "a".repeat(129);
        for bad in ["", ".", "..", ".locks", "a/b", "a b", long.as_str(), "é"] {
            assert!(validate_volume_id(bad).is_err(), "{bad}");
        }
    }
}
