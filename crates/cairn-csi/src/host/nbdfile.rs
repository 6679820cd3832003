//! `cairn nbd-file`: one NBD export served as the file `MOUNTPOINT/disk` in a FUSE mount of
//! its own, like nbdfuse, except that the file can grow while it is in use.
//!
//! The mount holds a root directory with one regular file, `disk`, whose bytes are the export's.
//! Every read, write, fsync, flush and fallocate of that file becomes NBD requests on a
//! pipelined [`NbdClient`](cairn_nbd::NbdClient); FUSE requests are answered from tokio tasks,
//! so as many are in flight as the kernel sends (the loop driver with direct I/O sends them in
//! parallel).
//!
//! # Resizing: SIGHUP
//! NBD has no message announcing a new size, and a connection keeps the size of its handshake.
//! On `SIGHUP` the server opens a new connection, learns the export's current size from it
//! and, if the export grew, swaps it in:
//! 1. it closes the request gate (a semaphore every request holds a permit of) and waits until
//!    no request is in flight; new requests wait behind it;
//! 2. it flushes the old connection (without `NBD_FLAG_CAN_MULTI_CONN` a flush on the new
//!    connection need not cover writes completed on the old one), then swaps;
//! 3. it opens the gate: from then on every request, and `getattr`, use the new connection
//!    and its size; the old connection is disconnected.
//!
//! I/O beyond the old size therefore only ever goes through a connection that knows the new
//! size, and two connections are never in use at once. A signal while nothing changed does
//! nothing; a smaller export is refused (logged, old connection kept), as is a failed flush of
//! the old connection. The resize is observed through `stat` of the file (attributes are never
//! cached by the kernel: time-to-live zero); after that, `losetup -c` updates a loop device.
//!
//! # Reconnecting
//! When a request fails because the connection broke (closed, or its socket failed; not an
//! error reply, which goes to the caller), the server reconnects to the same URI, pausing
//! 50 ms doubling to 2 s between attempts, for up to the dead-connection timeout
//! (`--dead-timeout`), like the kernel NBD client's dead-connection timeout. Meanwhile new
//! requests are held: they fail at once on the broken connection and wait in line with the
//! ones that failed before them. The new connection is swapped in as for a resize (without the
//! flush, impossible on a dead connection) and must be of the same size or larger; then the
//! held requests are sent again, in the order they failed (only requests that arrive during
//! the swap itself, a moment with no request in flight, go before them). Reads, writes,
//! write-zeroes and flushes are idempotent at their offsets, so a request the old server may
//! have carried out is safe to repeat. Past the timeout, or if the export shrank, the server
//! gives up (logged): every request fails with `EIO` from then on. One swap (resize or
//! reconnect) at a time.
//!
//! # Guarantees
//! - The file is opened with `FOPEN_DIRECT_IO`: no page cache; a write is acknowledged once the
//!   export acknowledged it, and fsync or flush (close) sends `NBD_CMD_FLUSH`.
//! - Requests are passed through unchanged: alignment is the export's to check (a Cairn export
//!   refuses I/O not aligned to 4 KiB with `EINVAL`, which the caller receives). As for a block
//!   device, a read past the end is short, a write past the end short or `ENOSPC`.
//! - `fallocate` punch-hole and zero-range become `NBD_CMD_WRITE_ZEROES` (`EOPNOTSUPP` if the
//!   export has none); allocation inside the file is a no-op; other modes are `EOPNOTSUPP`.
//! - The pidfile is written (atomically) once the mount is ready; `SIGTERM`/`SIGINT` unmount
//!   (lazily) and the process exits when the kernel ends the session, as it does after
//!   `fusermount3 -u`.
//!
//! Assumes: Linux, root (the mount is made directly, else through `fusermount3`), a plain
//! `nbd://` URI. The process should run in its own session (the attacher `setsid`s it).

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cairn_nbd::NbdClientError;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, WriteFlags,
};
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};

use super::attach::NbdUri;
use super::error::HostError;
use export::{connect, Export};

mod export;

/// Name of the one file in the mount.
pub const DISK_NAME: &str = "disk";

const DISK_INO: INodeNo = INodeNo(2);
/// Largest FUSE write (and read): 1 MiB, what the loop driver sends at most anyway.
const MAX_WRITE: u32 = 1 << 20;
/// Background (async direct I/O) requests the kernel may queue.
const MAX_BACKGROUND: u16 = 128;
/// How long the final disconnect may take once the mount is gone.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to serve, and where.
#[derive(Debug, Clone)]
pub struct NbdFileOptions {
    /// Directory to mount on (exists); the export appears as `MOUNTPOINT/disk`.
    pub mountpoint: PathBuf,
    /// The export, `nbd://HOST[:PORT][/EXPORT]`.
    pub uri: String,
    /// Written with the server's pid once the mount is ready.
    pub pidfile: Option<PathBuf>,
    /// Mount read-only.
    pub read_only: bool,
    /// How long a broken connection is retried (requests held) before they fail with `EIO`.
    pub dead_timeout: Duration,
}

/// Why [`run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdFileError {
    /// The URI is not a plain `nbd://` URI.
    #[error(transparent)]
    Uri(#[from] HostError),
    /// The host name did not resolve.
    #[error("resolve {host}:{port}: {source}")]
    Resolve {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    /// No connection to the export could be made.
    #[error("connect to {uri}: {source}")]
    Connect { uri: String, source: NbdClientError },
    /// The tokio runtime did not start, or a signal handler could not be installed.
    #[error("start the runtime: {0}")]
    Runtime(std::io::Error),
    /// The FUSE mount failed.
    #[error("mount FUSE on {path}: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The pidfile could not be written.
    #[error("write pidfile {path}: {source}")]
    Pidfile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The FUSE session ended with an error.
    #[error("FUSE session on {path}: {source}")]
    Session {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A resize or reconnect found the export smaller than the connection in use.
    #[error("the export shrank from {old} to {new} bytes; keeping the old connection")]
    Shrunk { old: u64, new: u64 },
    /// A resize could not flush the old connection, so it keeps it.
    #[error("flush of the old connection before a resize failed: {0}")]
    ResizeFlush(NbdClientError),
}

/// Serves `opts.uri` as `opts.mountpoint/disk` until the mount goes away (unmounted, or
/// `SIGTERM`/`SIGINT`). Blocks; call it from the process's main thread, before any other
/// thread starts (it sets `SIGPIPE` to ignored).
pub fn run(opts: NbdFileOptions) -> Result<(), NbdFileError> {
    // SAFETY: changes a signal disposition; the caller runs this before starting threads.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let uri = NbdUri::parse(&opts.uri)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nbd-file")
        .build()
        .map_err(NbdFileError::Runtime)?;
    let client = rt.block_on(connect(&uri))?;
    tracing::info!(uri = %uri, size = client.size(), mountpoint = %opts.mountpoint.display(), "connected");
    let export = Arc::new(Export::new(uri, client, opts.read_only, opts.dead_timeout));
    // Signal handlers first: SIGHUP's default action would kill a server signalled early.
    let (mut hup, mut term, mut int) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::hangup())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .map_err(NbdFileError::Runtime)?;

    let fs = NbdFile {
        export: Arc::clone(&export),
        rt: rt.handle().clone(),
        started: SystemTime::now(),
        // SAFETY: geteuid/getegid have no preconditions and cannot fail.
        uid: unsafe { libc::geteuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getegid() },
    };
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("cairn-nbd".into()),
        MountOption::Subtype("cairn".into()),
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
        MountOption::NoAtime,
        if opts.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    cfg.n_threads = Some(2);
    let mut session =
        fuser::Session::new(fs, &opts.mountpoint, &cfg).map_err(|source| NbdFileError::Mount {
            path: opts.mountpoint.clone(),
            source,
        })?;
    let mut unmounter = session.unmount_callable();
    let mountpoint = opts.mountpoint.clone();
    let resizer = Arc::clone(&export);
    rt.spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => match resizer.resize().await {
                    Ok(Some((old, new))) => tracing::info!(old, new, "export grew; serving the new size"),
                    Ok(None) => tracing::info!(size = resizer.size(), "SIGHUP: export size unchanged"),
                    Err(e) => tracing::error!(error = %e, "resize failed"),
                },
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!(mountpoint = %mountpoint.display(), "signalled; unmounting");
        if let Err(e) = unmounter.unmount() {
            tracing::error!(error = %e, "unmount failed");
        }
    });
    if let Some(path) = &opts.pidfile {
        write_pidfile(path).map_err(|source| NbdFileError::Pidfile {
            path: path.clone(),
            source,
        })?;
    }
    tracing::info!(mountpoint = %opts.mountpoint.display(), "serving");
    let served = session.run();
    tracing::info!(mountpoint = %opts.mountpoint.display(), "FUSE session ended");
    let client = export.current();
    rt.block_on(async {
        match tokio::time::timeout(DISCONNECT_TIMEOUT, client.disconnect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "NBD disconnect"),
            Err(_) => tracing::warn!("NBD disconnect timed out"),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    served.map_err(|source| NbdFileError::Session {
        path: opts.mountpoint,
        source,
    })
}

/// Writes `PID\n` to a temporary file and renames it over `path`: a reader sees all or nothing.
fn write_pidfile(path: &Path) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{}", std::process::id())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The FUSE filesystem: `/` and `/disk`.
struct NbdFile {
    export: Arc<Export>,
    rt: Handle,
    started: SystemTime,
    uid: u32,
    gid: u32,
}

/// Attributes are not cached: a resize must show in the next `stat`.
const TTL: Duration = Duration::ZERO;

impl NbdFile {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0, 0o755, 2)
        } else if ino == DISK_INO {
            let perm = if self.export.read_only { 0o400 } else { 0o600 };
            (FileType::RegularFile, self.export.size(), perm, 1)
        } else {
            return None;
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn spawn_empty<F>(&self, reply: ReplyEmpty, f: F)
    where
        F: std::future::Future<Output = Result<(), Errno>> + Send + 'static,
    {
        // Replies are one write(2) to /dev/fuse each, made from the task that finished.
        self.rt.spawn(async move {
            match f.await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }
}

impl Filesystem for NbdFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(MAX_BACKGROUND);
        // Async direct I/O lets one loop request be several FUSE requests in flight.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO) {
            tracing::debug!(?missing, "kernel lacks FUSE_ASYNC_DIO");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(DISK_INO) {
            Some(attr) if parent == INodeNo::ROOT && name == DISK_NAME => {
                reply.entry(&TTL, &attr, fuser::Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The size is the export's; owner, mode and times are fixed and changes ignored.
        match self.attr(ino) {
            Some(attr) if size.is_none_or(|s| s == attr.size) => reply.attr(&TTL, &attr),
            Some(_) => reply.error(Errno::EPERM),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.export.read_only && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        let export = Arc::clone(&self.export);
        self.rt.spawn(async move {
            match export.read(offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.export.read_only {
            return reply.error(Errno::EROFS);
        }
        let export = Arc::clone(&self.export);
        let data = Bytes::copy_from_slice(data);
        self.rt.spawn(async move {
            match export.write(offset, data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.export.read_only {
            return reply.ok();
        }
        let export = Arc::clone(&self.export);
        self.spawn_empty(reply, async move { export.flush().await });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let export = Arc::clone(&self.export);
        self.spawn_empty(reply, async move { export.flush().await });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.export.read_only {
            return reply.error(Errno::EROFS);
        }
        let export = Arc::clone(&self.export);
        self.spawn_empty(reply, async move {
            export.fallocate(offset, length, mode).await
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate() {
            let next = i as u64 + 1;
            if next > offset && reply.add(ino, next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // No extended attributes; ENOTSUP makes the kernel stop asking.
        reply.error(Errno::ENOTSUP);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOTSUP);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.export.size() / 4096;
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }
}
