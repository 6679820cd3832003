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

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::cmd::{describe_status, tail, Cmd};
use super::error::{HostError, Result};
use super::loopdev::{self, LoopOptions};
use super::mountinfo;
use super::wait::poll;

/// How a volume becomes a block device on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// nbdfuse + a loop device (no kernel NBD driver needed); cannot grow online.
    Fuse,
    /// `cairn nbd-file` + a loop device: like [`AttachMode::Fuse`], and the device grows
    /// online when the export does.
    CairnFuse,
    /// The kernel NBD driver, configured over netlink (`/dev/nbdN`).
    Kernel,
}

impl AttachMode {
    /// `auto`: [`AttachMode::Kernel`] when `/dev/nbd0` exists or the `nbd` module loads
    /// (`modprobe nbd`), else [`AttachMode::CairnFuse`] (no kernel module needed, and unlike
    /// [`AttachMode::Fuse`] it grows online).
    pub fn detect() -> AttachMode {
        AttachMode::choose(super::nbd_netlink::available, || {
            super::cmd::have_tool("modprobe") && Cmd::new("modprobe").arg("nbd").run().is_ok()
        })
    }

    /// [`AttachMode::detect`]'s decision: `available` says whether the kernel has NBD (asked
    /// again after `modprobe` succeeds), `modprobe` tries to load the module.
    fn choose(available: impl Fn() -> bool, modprobe: impl FnOnce() -> bool) -> AttachMode {
        if available() || (modprobe() && available()) {
            AttachMode::Kernel
        } else {
            AttachMode::CairnFuse
        }
    }

    /// `fuse`, `cairn-fuse` or `kernel`.
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Fuse => "fuse",
            AttachMode::CairnFuse => "cairn-fuse",
            AttachMode::Kernel => "kernel",
        }
    }

    /// The mode named `name` (what [`AttachMode::as_str`] returns).
    fn from_name(name: &str) -> Option<AttachMode> {
        [AttachMode::Fuse, AttachMode::CairnFuse, AttachMode::Kernel]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttachMode {
    type Err = String;

    /// `fuse`, `cairn-fuse`, `kernel`, or `auto` ([`AttachMode::detect`]).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(AttachMode::detect()),
            other => AttachMode::from_name(other).ok_or_else(|| {
                format!("unknown attach mode {other:?} (auto, fuse, cairn-fuse, kernel)")
            }),
        }
    }
}

/// A parsed `nbd://HOST[:PORT][/EXPORT]` URI (plain TCP; the form Cairn agents publish).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port (10809 when the URI has none).
    pub port: u16,
    /// Export name (empty: the default export).
    pub export: String,
    text: String,
}

impl NbdUri {
    /// Parses and checks `uri`. Only `nbd://` is accepted, without query or fragment, so
    /// the string handed to nbdfuse means exactly host, port and export.
    pub fn parse(uri: &str) -> Result<NbdUri> {
        let bad = |why| HostError::InvalidUri {
            uri: uri.to_string(),
            why,
        };
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or_else(|| bad("only nbd:// URIs are supported"))?;
        if uri.contains(['?', '#']) || uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "no query, fragment, whitespace or control characters allowed",
            ));
        }
        let (authority, export) = match rest.split_once('/') {
            Some((a, e)) => (a, e),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => 10809,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("bad port"))?,
        };
        Ok(NbdUri {
            host: host.to_string(),
            port,
            export: export.to_string(),
            text: uri.to_string(),
        })
    }

    /// The URI as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

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

const STATE_FILE: &str = "attachment";
const PID_FILE: &str = "nbdfuse.pid";
const LOG_FILE: &str = "nbdfuse.log";
const FUSE_DIR: &str = "fuse";
const DISK: &str = "disk";
const LOCKS: &str = ".locks";
/// How often [`Attacher::grow_device`] repeats its `SIGHUP` while the file has not grown.
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
                    if let Some(device) = self.resume(volume_id, &dir, read_only)? {
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
            self.attach_fresh(volume_id, &dir, &wanted)
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
        if a.mode == AttachMode::Kernel {
            return self.grow_kernel(&a, new_size);
        }
        if a.mode != AttachMode::CairnFuse {
            return Err(HostError::GrowUnsupported {
                volume: volume_id.into(),
                mode: a.mode.as_str(),
            });
        }
        let _lock = self.lock(volume_id)?;
        let dir = self.volume_dir(volume_id);
        let fuse = dir.join(FUSE_DIR);
        let disk = fuse.join(DISK);
        let pid = read_pid(&dir.join(PID_FILE))
            .filter(|p| pid_is_helper(*p, &fuse))
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| HostError::BadState {
                path: dir.clone(),
                why: "the cairn nbd-file helper is not running".into(),
            })?;
        tracing::info!(
            volume = volume_id,
            pid,
            new_size,
            "asking cairn nbd-file to resize"
        );
        let mut signalled: Option<Instant> = None;
        let file_size = poll(
            &format!("FUSE file of volume {volume_id} to reach {new_size} bytes",),
            self.cfg.ready_timeout,
            || {
                if signalled.is_none_or(|t| t.elapsed() >= RESIZE_SIGNAL_EVERY) {
                    // SAFETY: kill(2) has no memory effects; pid was checked to be our helper.
                    if unsafe { libc::kill(pid, libc::SIGHUP) } < 0 {
                        return Err(HostError::HelperExited {
                            volume: volume_id.into(),
                            status: format!(
                                "cannot signal pid {pid}: {}",
                                std::io::Error::last_os_error()
                            ),
                            stderr: read_log(&dir),
                        });
                    }
                    signalled = Some(Instant::now());
                }
                let len = std::fs::metadata(&disk)
                    .map_err(|e| HostError::io("stat", &disk, e))?
                    .len();
                Ok((len >= new_size).then_some(len))
            },
            || read_log(&dir),
        )?;
        loopdev::set_capacity(&a.device)?;
        let size = super::mount::block_device_size(&a.device)?;
        if size < new_size {
            return Err(HostError::BadState {
                path: a.device.clone(),
                why: format!(
                    "after losetup -c the device has {size} bytes, its file {file_size}, wanted {new_size}"
                ),
            });
        }
        tracing::info!(volume = volume_id, device = %a.device.display(), size, "device grown");
        Ok(size)
    }

    /// Reaps FUSE helper children of this process that have exited (their attachment was torn
    /// down by another process, or they died), so none lingers as a zombie.
    fn reap(&self) {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children.retain(|volume, c| match c.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                tracing::debug!(volume, %status, "reaped a FUSE helper");
                false
            }
            Err(_) => false,
        });
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

    /// A live attachment's device, setting up the loop device if the previous attach
    /// stopped before it. `None` if the helper or its mount is gone.
    fn resume(&self, volume_id: &str, dir: &Path, read_only: bool) -> Result<Option<PathBuf>> {
        let fuse = dir.join(FUSE_DIR);
        if !helper_alive(dir) || !mountinfo::is_mount_point(&fuse)? {
            return Ok(None);
        }
        let disk = fuse.join(DISK);
        let mut devices = loopdev::devices_of(&disk)?;
        if let Some(dev) = devices.pop() {
            for extra in devices {
                tracing::warn!(volume = volume_id, device = %extra.display(), "second loop device over one attachment; detaching it");
                loopdev::detach(&extra, self.cfg.detach_timeout)?;
            }
            tracing::debug!(volume = volume_id, device = %dev.display(), "already attached");
            return Ok(Some(dev));
        }
        tracing::info!(
            volume = volume_id,
            "the FUSE helper runs but no loop device; setting it up"
        );
        Ok(Some(self.loop_attach(&disk, read_only)?))
    }

    fn attach_fresh(&self, volume_id: &str, dir: &Path, st: &State) -> Result<PathBuf> {
        let fuse = dir.join(FUSE_DIR);
        std::fs::create_dir_all(&fuse).map_err(|e| HostError::io("mkdir", &fuse, e))?;
        write_state(dir, st)?;
        let pidfile = dir.join(PID_FILE);
        match std::fs::remove_file(&pidfile) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(HostError::io("unlink", &pidfile, e))
            }
            _ => {}
        }
        let log_path = dir.join(LOG_FILE);
        let log = File::create(&log_path).map_err(|e| HostError::io("create", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HostError::io("dup", &log_path, e))?;
        let disk = fuse.join(DISK);
        let (mut cmd, line) = self.helper_command(st, &pidfile, &fuse);
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        // SAFETY: the closure runs in the forked child before exec and calls only setsid(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        tracing::info!(volume = volume_id, command = %line, "starting the FUSE helper");
        let mut child = cmd.spawn().map_err(|source| HostError::Spawn {
            command: line,
            source,
        })?;
        let pid = child.id();
        let ready = poll(
            &format!("{} for volume {volume_id} to serve {}", st.mode, st.uri),
            self.cfg.ready_timeout,
            || {
                if let Some(status) = child
                    .try_wait()
                    .map_err(|e| HostError::io("wait", &disk, e))?
                {
                    return Err(HostError::HelperExited {
                        volume: volume_id.into(),
                        status: describe_status(status),
                        stderr: read_log(dir),
                    });
                }
                Ok((read_pid(&pidfile) == Some(pid)).then_some(()))
            },
            || read_log(dir),
        );
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(volume_id.into(), child);
        ready?;
        let dev = self.loop_attach(&disk, st.read_only)?;
        tracing::info!(volume = volume_id, device = %dev.display(), pid, "attached");
        Ok(dev)
    }

    /// The FUSE helper's command line for `st` (and how to log it): `nbdfuse -P PIDFILE [-r]
    /// FUSE/disk URI` or `cairn nbd-file --pidfile PIDFILE [--read-only] FUSE URI`.
    fn helper_command(&self, st: &State, pidfile: &Path, fuse: &Path) -> (Command, String) {
        let (program, args): (&Path, Vec<&OsStr>) = if st.mode == AttachMode::CairnFuse {
            let mut args = vec![OsStr::new("nbd-file"), OsStr::new("--pidfile")];
            args.push(pidfile.as_os_str());
            if st.read_only {
                args.push(OsStr::new("--read-only"));
            }
            args.push(fuse.as_os_str());
            (&self.cfg.cairn, args)
        } else {
            let mut args = vec![OsStr::new("-P"), pidfile.as_os_str()];
            if st.read_only {
                args.push(OsStr::new("-r"));
            }
            (&self.cfg.nbdfuse, args)
        };
        let disk = fuse.join(DISK);
        let mut cmd = Command::new(program);
        cmd.args(&args);
        if st.mode == AttachMode::CairnFuse {
            // Its log is a file that errors quote: no terminal colour codes in it.
            cmd.env("NO_COLOR", "1");
        } else {
            cmd.arg(&disk);
        }
        cmd.arg(&st.uri);
        let line = std::iter::once(program.as_os_str())
            .chain(args.iter().copied())
            .chain((st.mode != AttachMode::CairnFuse).then_some(disk.as_os_str()))
            .map(|a| a.to_string_lossy())
            .chain(std::iter::once(st.uri.as_str().into()))
            .collect::<Vec<_>>()
            .join(" ");
        (cmd, line)
    }

    fn loop_attach(&self, disk: &Path, read_only: bool) -> Result<PathBuf> {
        loopdev::attach(
            disk,
            LoopOptions {
                direct_io: self.cfg.direct_io,
                read_only,
                sector_size: Some(self.cfg.sector_size),
            },
        )
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

    /// The FUSE modes' [`Attacher::teardown`].
    fn teardown_fuse(&self, volume_id: &str, dir: &Path) -> Result<()> {
        let fuse = dir.join(FUSE_DIR);
        for dev in loopdev::devices_of(&fuse.join(DISK))? {
            loopdev::detach(&dev, self.cfg.detach_timeout)?;
        }
        let pid = read_pid(&dir.join(PID_FILE));
        if mountinfo::is_mount_point(&fuse)? {
            tracing::info!(volume = volume_id, "unmounting the FUSE helper");
            if let Err(e) = Cmd::new("fusermount3").arg("-u").arg(&fuse).run() {
                if mountinfo::is_mount_point(&fuse)? {
                    return Err(e);
                }
            }
        }
        self.wait_helper_exit(volume_id, pid, &fuse)?;
        remove_state_dir(volume_id, dir)
    }

    /// Waits for the FUSE helper to exit after its unmount; kills it past the deadline.
    fn wait_helper_exit(&self, volume_id: &str, pid: Option<u32>, fuse: &Path) -> Result<()> {
        let mut child = self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume_id);
        let Some(pid) = pid.or(child.as_ref().map(Child::id)) else {
            return Ok(());
        };
        let mut exited = || -> Result<Option<()>> {
            Ok(match child.as_mut() {
                Some(c) => c
                    .try_wait()
                    .map_err(|e| HostError::io("wait", format!("pid {pid}"), e))?
                    .map(|_| ()),
                None => (!pid_is_helper(pid, fuse)).then_some(()),
            })
        };
        let what = format!("FUSE helper (pid {pid}) of volume {volume_id} to exit");
        if poll(&what, self.cfg.detach_timeout, &mut exited, String::new).is_ok() {
            return Ok(());
        }
        tracing::warn!(
            volume = volume_id,
            pid,
            "FUSE helper did not exit after its unmount; killing it"
        );
        if pid_is_helper(pid, fuse) {
            if let Ok(p) = i32::try_from(pid) {
                // SAFETY: kill(2) has no memory effects; the pid was checked to be the helper.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        poll(&what, self.cfg.detach_timeout, exited, String::new)
    }

    fn inspect(&self, volume_id: &str, dir: &Path) -> Result<AttachmentState> {
        let st = read_state(dir).ok();
        if let Some(st) = st.as_ref().filter(|s| s.mode == AttachMode::Kernel) {
            let connected = match st.index {
                Some(index) => block_on(super::kernel::connected(index))??,
                None => false,
            };
            let owned = st
                .index
                .is_some_and(|i| super::kernel::owned_by(i, volume_id) != Some(false));
            return Ok(AttachmentState {
                volume_id: volume_id.into(),
                uri: Some(st.uri.clone()),
                read_only: st.read_only,
                device: st
                    .index
                    .filter(|_| connected)
                    .map(super::nbd_netlink::device_path),
                helper_alive: connected,
                healthy: connected && owned,
            });
        }
        let fuse = dir.join(FUSE_DIR);
        let device = loopdev::devices_of(&fuse.join(DISK))?.pop();
        let alive = helper_alive(dir);
        let healthy = alive && device.is_some() && mountinfo::is_mount_point(&fuse)?;
        Ok(AttachmentState {
            volume_id: volume_id.into(),
            read_only: st.as_ref().is_some_and(|s| s.read_only),
            uri: st.map(|s| s.uri),
            device,
            helper_alive: alive,
            healthy,
        })
    }

    /// A kernel attachment's device if the kernel has it configured for this volume (and a
    /// keeper running for it); `None` if it is gone or serves something else now.
    fn resume_kernel(&self, volume_id: &str, uri: &NbdUri, st: &State) -> Result<Option<PathBuf>> {
        let Some(index) = st.index else {
            return Ok(None);
        };
        if !block_on(super::kernel::connected(index))??
            || super::kernel::owned_by(index, volume_id) == Some(false)
        {
            return Ok(None);
        }
        self.spawn_keeper(volume_id, uri, index);
        let device = super::nbd_netlink::device_path(index);
        tracing::debug!(volume = volume_id, device = %device.display(), "already attached");
        Ok(Some(device))
    }

    /// Mode `kernel`: state file first (no index: a crash after `CONNECT` leaves a device
    /// found by its backend identifier), then `CONNECT`, then the index, then the keeper.
    fn attach_fresh_kernel(
        &self,
        volume_id: &str,
        dir: &Path,
        uri: &NbdUri,
        st: &mut State,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| HostError::io("mkdir", dir, e))?;
        // A device of this volume without a state file (a crash before it was written).
        self.teardown_kernel(volume_id, None)?;
        write_state(dir, st)?;
        let (index, device, _) = block_on(super::kernel::connect(volume_id, uri, st.read_only))??;
        st.index = Some(index);
        write_state(dir, st)?;
        self.spawn_keeper(volume_id, uri, index);
        Ok(device)
    }

    /// Disconnects the kernel devices of `volume_id` (device `index`, and any whose backend
    /// identifier names the volume), after stopping its keeper. A device mounted or open
    /// exclusively: [`HostError::DeviceBusy`], nothing changed.
    fn teardown_kernel(&self, volume_id: &str, index: Option<u32>) -> Result<()> {
        let mut indices = super::kernel::devices_of(volume_id);
        if let Some(i) = index {
            if !indices.contains(&i) && super::kernel::owned_by(i, volume_id) != Some(false) {
                indices.push(i);
            }
        }
        let mut live = Vec::new();
        for i in indices {
            if block_on(super::kernel::connected(i))?? {
                live.push(i);
            }
        }
        for i in &live {
            let device = super::nbd_netlink::device_path(*i);
            if super::kernel::busy(&device)? {
                return Err(HostError::DeviceBusy { device });
            }
        }
        self.stop_keeper(volume_id);
        for i in live {
            tracing::info!(
                volume = volume_id,
                index = i,
                "disconnecting the kernel NBD device"
            );
            block_on(super::kernel::disconnect(i))??;
        }
        Ok(())
    }

    /// [`Attacher::grow_device`] in mode `kernel`.
    fn grow_kernel(&self, a: &Attachment, new_size: u64) -> Result<u64> {
        let _lock = self.lock(&a.volume_id)?;
        let dir = self.volume_dir(&a.volume_id);
        let index = read_state(&dir)?.index.ok_or_else(|| HostError::BadState {
            path: dir.clone(),
            why: "kernel attachment without a device index".into(),
        })?;
        let uri = NbdUri::parse(&a.uri)?;
        let mut tried: Option<Instant> = None;
        poll(
            &format!(
                "{} of volume {} to reach {new_size} bytes",
                a.device.display(),
                a.volume_id
            ),
            self.cfg.ready_timeout,
            || {
                if tried.is_some_and(|t| t.elapsed() < RESIZE_SIGNAL_EVERY) {
                    return Ok(None);
                }
                tried = Some(Instant::now());
                let size = block_on(super::kernel::resize(&a.volume_id, index, &uri))??;
                Ok((size >= new_size).then_some(size))
            },
            String::new,
        )
    }

    /// Starts the reconnect keeper of kernel device `index` of `volume_id` unless one runs.
    /// Returns whether it started one.
    fn spawn_keeper(&self, volume_id: &str, uri: &NbdUri, index: u32) -> bool {
        let mut keepers = self.keepers.lock().unwrap_or_else(|p| p.into_inner());
        if keepers.get(volume_id).is_some_and(|k| !k.is_finished()) {
            return false;
        }
        let Some(rt) = self
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
        else {
            tracing::warn!(
                volume = volume_id,
                index,
                "no tokio runtime for a reconnect keeper: a dead connection will not be replaced"
            );
            return false;
        };
        let (id, uri) = (volume_id.to_owned(), uri.clone());
        let task = rt.spawn(async move {
            let Err(e) = super::kernel::keep(&id, &uri, index).await;
            tracing::error!(volume = id, index, error = %e, "reconnect keeper stopped");
        });
        keepers.insert(volume_id.into(), task.abort_handle());
        true
    }

    /// Aborts the reconnect keeper of `volume_id`, if any.
    fn stop_keeper(&self, volume_id: &str) {
        let keeper = self
            .keepers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume_id);
        if let Some(k) = keeper {
            k.abort();
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

/// Runs an async kernel NBD step from blocking code: on the current runtime when called from
/// its blocking pool, else on a current-thread runtime of its own. Must not be called from a
/// runtime worker thread (`Handle::block_on` panics there).
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        return Ok(handle.block_on(f));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| HostError::io("start a tokio runtime", "/", e))?;
    Ok(rt.block_on(f))
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

#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    mode: AttachMode,
    uri: String,
    read_only: bool,
    /// Mode `kernel`: the device's index (`/dev/nbdN`), once `CONNECT` has answered. A state
    /// file without it is an attach that stopped before (its device, if any, is found by its
    /// backend identifier).
    index: Option<u32>,
}

impl State {
    /// Same mode, export and read-only flag: the same attachment asked for again.
    fn same_target(&self, other: &State) -> bool {
        (self.mode, &self.uri, self.read_only) == (other.mode, &other.uri, other.read_only)
    }
}

fn write_state(dir: &Path, st: &State) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut text = format!(
        "mode={}\nuri={}\nread_only={}\n",
        st.mode,
        st.uri,
        u8::from(st.read_only)
    );
    if let Some(index) = st.index {
        text.push_str(&format!("index={index}\n"));
    }
    let mut f = File::create(&tmp).map_err(|e| HostError::io("create", &tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| HostError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| HostError::io("rename", &path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| HostError::io("fsync", dir, e))
}

fn read_state(dir: &Path) -> Result<State> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| HostError::io("read", &path, e))?;
    parse_state(&text).map_err(|why| HostError::BadState { path, why })
}

fn parse_state(text: &str) -> std::result::Result<State, String> {
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .ok_or_else(|| format!("no {k}="))
    };
    Ok(State {
        mode: {
            let m = get("mode")?;
            AttachMode::from_name(m).ok_or_else(|| format!("unknown mode {m:?}"))?
        },
        uri: get("uri")?.to_string(),
        read_only: match get("read_only")? {
            "0" => false,
            "1" => true,
            v => return Err(format!("bad read_only {v:?}")),
        },
        // Absent in state files of the FUSE modes and of earlier versions.
        index: match get("index") {
            Err(_) => None,
            Ok(v) => Some(v.parse().map_err(|_| format!("bad index {v:?}"))?),
        },
    })
}

fn read_pid(pidfile: &Path) -> Option<u32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Whether the FUSE helper of this attachment runs.
fn helper_alive(dir: &Path) -> bool {
    let fuse = dir.join(FUSE_DIR);
    read_pid(&dir.join(PID_FILE)).is_some_and(|pid| pid_is_helper(pid, &fuse))
}

/// Whether `pid` is a live (not zombie) FUSE helper, so that a recycled pid is not taken for
/// ours: a process named nbdfuse, or one whose arguments are `nbd-file` and the mount point
/// `fuse` (`cairn nbd-file`; its name is that of whatever binary runs it).
fn pid_is_helper(pid: u32, fuse: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": comm may hold spaces and parentheses; take the last ')'.
    let Some((head, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
    let state = rest.trim_start().chars().next();
    if matches!(state, Some('Z' | 'X' | 'x')) {
        return false;
    }
    if comm == "nbdfuse" {
        return true;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0);
    let want = fuse.as_os_str().as_bytes();
    args.any(|a| a == b"nbd-file") && args.any(|a| a == want)
}

/// The end of nbdfuse's standard error.
fn read_log(dir: &Path) -> String {
    let path = dir.join(LOG_FILE);
    let mut text = String::new();
    if let Ok(mut f) = File::open(&path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let _ = f.read_to_string(&mut text);
    }
    tail(text.trim(), 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        let u = NbdUri::parse("nbd://127.0.0.1:10809/vol0").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.export.as_str()),
            ("127.0.0.1", 10809, "vol0")
        );
        let u = NbdUri::parse("nbd://[::1]:2000/a/b").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.export.as_str()),
            ("::1", 2000, "a/b")
        );
        let u = NbdUri::parse("nbd://node-1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.export.as_str()),
            ("node-1", 10809, "")
        );
        assert_eq!(NbdUri::parse("nbd://[::1]/x").unwrap().port, 10809);
        for bad in [
            "nbds://h/x",
            "nbd+unix:///x?socket=/s",
            "nbd://h:0/x",
            "nbd://h:99999/x",
            "nbd://:1/x",
            "nbd://h/x?tls=on",
            "nbd://h/x y",
            "nbd://[::1/x",
            "http://h/x",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
    }

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

    #[test]
    fn state_round_trips() {
        let st = State {
            mode: AttachMode::Fuse,
            uri: "nbd://h:1/v".into(),
            read_only: true,
            index: None,
        };
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), &st).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), st);
        let st = State {
            mode: AttachMode::CairnFuse,
            ..st
        };
        write_state(dir.path(), &st).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), st);
        // Kernel mode, before and after CONNECT answered.
        let st = State {
            mode: AttachMode::Kernel,
            read_only: false,
            ..st
        };
        write_state(dir.path(), &st).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), st);
        let st = State {
            index: Some(7),
            ..st
        };
        write_state(dir.path(), &st).unwrap();
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(text, "mode=kernel\nuri=nbd://h:1/v\nread_only=0\nindex=7\n");
        assert_eq!(read_state(dir.path()).unwrap(), st);
        // A state file of an earlier version (no index) still reads.
        assert_eq!(
            parse_state("mode=fuse\nuri=x\nread_only=0\n")
                .unwrap()
                .index,
            None
        );
        assert!(parse_state("mode=kernel\nuri=x\nread_only=0\nindex=-1\n").is_err());
        assert!(parse_state("mode=fuse\nuri=x\n").is_err());
        assert!(parse_state("mode=tape\nuri=x\nread_only=0\n").is_err());
        // Same target whatever the index.
        let other = State {
            index: None,
            ..st.clone()
        };
        assert!(st.same_target(&other));
        assert!(!st.same_target(&State {
            read_only: true,
            ..other
        }));
    }

    #[test]
    fn modes_parse() {
        assert_eq!("fuse".parse::<AttachMode>().unwrap(), AttachMode::Fuse);
        assert_eq!("kernel".parse::<AttachMode>().unwrap(), AttachMode::Kernel);
        assert_eq!(
            "cairn-fuse".parse::<AttachMode>().unwrap(),
            AttachMode::CairnFuse
        );
        for m in [AttachMode::Fuse, AttachMode::CairnFuse, AttachMode::Kernel] {
            assert_eq!(m.to_string().parse::<AttachMode>().unwrap(), m);
        }
        assert!("auto".parse::<AttachMode>().is_ok());
        assert!("nbd".parse::<AttachMode>().is_err());
    }

    #[test]
    fn detect_prefers_kernel_then_cairn_fuse() {
        use std::cell::Cell;
        // The device is there: no modprobe.
        let probed = Cell::new(false);
        let m = AttachMode::choose(
            || true,
            || {
                probed.set(true);
                true
            },
        );
        assert_eq!((m, probed.get()), (AttachMode::Kernel, false));
        // modprobe loads it.
        let loaded = Cell::new(false);
        let m = AttachMode::choose(
            || loaded.get(),
            || {
                loaded.set(true);
                true
            },
        );
        assert_eq!(m, AttachMode::Kernel);
        // modprobe fails, or "succeeds" without the driver showing up: cairn-fuse.
        assert_eq!(
            AttachMode::choose(|| false, || false),
            AttachMode::CairnFuse
        );
        assert_eq!(AttachMode::choose(|| false, || true), AttachMode::CairnFuse);
    }

    #[test]
    fn our_pid_is_not_a_helper() {
        let fuse = Path::new("/run/cairn/vol/fuse");
        assert!(!pid_is_helper(std::process::id(), fuse));
        assert!(!pid_is_helper(u32::MAX, fuse));
    }
}
