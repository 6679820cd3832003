//! The FUSE modes of an [`Attacher`] ([`AttachMode::Fuse`], [`AttachMode::CairnFuse`]): a
//! helper process (`nbdfuse` or `cairn nbd-file`) serves the export as the file
//! `STATE_DIR/<volume>/fuse/disk`, and a loop device turns that file into `/dev/loopN`.
//! Both helpers share everything here (spawn, pidfile readiness, log, reaping, teardown,
//! identification); only the command line and the online growth differ.
//!
//! Guarantees: the helper runs in its own session (it outlives this process); it is ready
//! when its pidfile names it; a pid is taken for a helper only if `/proc` says it is one (a
//! recycled pid is not), so only helpers are ever signalled; a helper that does not exit
//! after its unmount is killed past [`super::AttachConfig::detach_timeout`]; errors carry the
//! end of the helper's standard error (`nbdfuse.log`).
//! Assumes: the caller holds the volume's lock; FUSE, loop devices, `losetup`, `fusermount3`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::state::{write_state, State};
use super::RESIZE_SIGNAL_EVERY;
use super::{remove_state_dir, AttachMode, Attacher, Attachment, AttachmentState};
use crate::host::cmd::{describe_status, tail, Cmd};
use crate::host::error::{HostError, Result};
use crate::host::loopdev::{self, LoopOptions};
use crate::host::mountinfo;
use crate::host::wait::poll;

const PID_FILE: &str = "nbdfuse.pid";
const LOG_FILE: &str = "nbdfuse.log";
const FUSE_DIR: &str = "fuse";
const DISK: &str = "disk";

impl Attacher {
    /// Reaps FUSE helper children of this process that have exited (their attachment was torn
    /// down by another process, or they died), so none lingers as a zombie.
    pub(super) fn reap(&self) {
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

    /// A live attachment's device, setting up the loop device if the previous attach
    /// stopped before it. `None` if the helper or its mount is gone.
    pub(super) fn resume_fuse(
        &self,
        volume_id: &str,
        dir: &Path,
        read_only: bool,
    ) -> Result<Option<PathBuf>> {
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

    /// The FUSE modes' attach: state file, helper started and waited for (its pidfile names
    /// it), then the loop device.
    pub(super) fn attach_fresh_fuse(
        &self,
        volume_id: &str,
        dir: &Path,
        st: &State,
    ) -> Result<PathBuf> {
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

    /// The FUSE modes' [`Attacher::teardown`].
    pub(super) fn teardown_fuse(&self, volume_id: &str, dir: &Path) -> Result<()> {
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

    /// The FUSE modes' [`Attacher::inspect`] (`st`: the state file, if it could be read).
    pub(super) fn inspect_fuse(
        &self,
        volume_id: &str,
        dir: &Path,
        st: Option<State>,
    ) -> Result<AttachmentState> {
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

    /// [`Attacher::grow_device`] in mode `cairn-fuse`.
    pub(super) fn grow_fuse(&self, a: &Attachment, new_size: u64) -> Result<u64> {
        let volume_id = a.volume_id.as_str();
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
        let size = crate::host::mount::block_device_size(&a.device)?;
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
    fn our_pid_is_not_a_helper() {
        let fuse = Path::new("/run/cairn/vol/fuse");
        assert!(!pid_is_helper(std::process::id(), fuse));
        assert!(!pid_is_helper(u32::MAX, fuse));
    }
}
