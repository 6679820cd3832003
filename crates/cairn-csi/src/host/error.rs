//! The one error type of [`crate::host`].
//!
//! Every variant names what failed: the command with its arguments, exit status and standard
//! error for an external tool; the operation and path for a system call; the volume and state
//! for an attachment. The node service maps these to gRPC codes in one place.

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong on the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// An external command could not be started (missing binary, EACCES...).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line, as run (program and arguments).
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// An external command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, as run (program and arguments).
        command: String,
        /// `exit status N` or `killed by signal N`.
        status: String,
        /// Its standard error, then its standard output if any (trimmed, the last 4 KiB).
        stderr: String,
    },
    /// A system call on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted (`open`, `statvfs`, `BLKGETSIZE64`...).
        op: &'static str,
        /// The path it was attempted on.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A device holds something this module will not overwrite or cannot handle (a partition
    /// table, a RAID member, an ambiguous probe result...).
    #[error("{device}: {what}; refusing to format it")]
    UnknownContent {
        /// The block device.
        device: PathBuf,
        /// What `blkid` reported.
        what: String,
    },
    /// The device holds a filesystem of another type than the one asked for.
    #[error("{device} already holds a {found} filesystem, not {wanted}")]
    FsTypeMismatch {
        /// The block device.
        device: PathBuf,
        /// The filesystem found on it.
        found: String,
        /// The filesystem asked for.
        wanted: String,
    },
    /// A filesystem type this module does not format, check or grow.
    #[error("unsupported filesystem type {0:?} (supported: ext4, xfs)")]
    UnsupportedFs(String),
    /// The target is a mount point of something other than what was asked.
    #[error("{target} is already a mount point of something else ({what})")]
    MountedElsewhere {
        /// The mount target.
        target: PathBuf,
        /// What is mounted there (source and type from mountinfo).
        what: String,
    },
    /// A mount option that cannot be passed to mount(8) (empty, or with a NUL byte).
    #[error("invalid mount option {0:?}")]
    InvalidMountOption(String),
    /// A path that must be a block device node is not one.
    #[error("{0} is not a block device")]
    NotBlockDevice(PathBuf),
    /// A path that must be a mount point is not.
    #[error("{0} is not a mount point")]
    NotMounted(PathBuf),
    /// Something did not happen within its deadline.
    #[error("{what}: not done after {after:?}{detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline.
        after: Duration,
        /// Extra context (for example the helper's standard error), with a leading `: `.
        detail: String,
    },
    /// A volume id that cannot name a state directory.
    #[error("invalid volume id {0:?}: use 1 to 128 characters from [A-Za-z0-9._-], not starting with '.'")]
    InvalidVolumeId(String),
    /// An NBD URI this module does not accept.
    #[error("invalid NBD URI {uri:?}: {why}")]
    InvalidUri {
        /// The URI given.
        uri: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The volume is attached here already, to another export or mode.
    #[error("volume {volume} is already attached here as {existing}")]
    AttachConflict {
        /// The volume id.
        volume: String,
        /// The existing attachment (mode and URI).
        existing: String,
    },
    /// The helper serving the attachment (nbdfuse) exited.
    #[error("nbdfuse for volume {volume} exited ({status}): {stderr}")]
    HelperExited {
        /// The volume id.
        volume: String,
        /// Its exit status.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// The device is open exclusively (mounted, or held by another process).
    #[error("{device} is in use (mounted or held open); unmount it first")]
    DeviceBusy {
        /// The block device.
        device: PathBuf,
    },
    /// The state directory of an attachment holds something unexpected.
    #[error("attachment state {path}: {why}")]
    BadState {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Attach mode `kernel` on a node whose kernel has no NBD driver (no generic netlink
    /// family `nbd`: the module is not loaded).
    #[error(
        "the kernel has no NBD driver (load it with `modprobe nbd`), or use attach mode cairn-fuse"
    )]
    KernelNbdUnavailable,
    /// A kernel NBD request over netlink failed or was refused.
    #[error("kernel NBD {what}: {source}")]
    KernelNbd {
        /// What was asked (`NBD_CMD_CONNECT of volume v`, `NBD_CMD_DISCONNECT of /dev/nbd3`...).
        what: String,
        #[source]
        source: super::nbd_netlink::NbdNetlinkError,
    },
    /// Resolving, dialling or negotiating with an NBD server failed.
    #[error("NBD handshake with {uri}: {source}")]
    NbdHandshake {
        /// The export.
        uri: String,
        #[source]
        source: cairn_nbd::NbdClientError,
    },
    /// The attachment cannot show a new export size to the kernel (nbdfuse reads the size
    /// once, when it starts; a kernel before 5.3 cannot resize a connected NBD device).
    #[error("volume {volume}: attach mode {mode} cannot grow a device online; detach and attach it again")]
    GrowUnsupported {
        /// The volume id.
        volume: String,
        /// The attach mode.
        mode: &'static str,
    },
}

impl HostError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HostError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Result of a host operation.
pub type Result<T, E = HostError> = std::result::Result<T, E>;
