//! What a node does to a volume, below the CSI Node service.
//!
//! - [`attach`]: an NBD export as a local block device, by volume id (kernel NBD, or a FUSE
//!   helper + a loop device), idempotent and found again after a restart.
//! - [`kernel`]: the kernel NBD steps of an attachment (connect, keep connected, resize,
//!   disconnect).
//! - [`mount`]: probe, format (ext4, xfs), check, mount, bind (directory, file or device
//!   node), read-only bind, unmount, statistics and online growth of filesystems.
//! - [`loopdev`]: loop devices over files (attach, find by backing file, refresh the size,
//!   detach).
//! - [`mountinfo`]: `/proc/self/mountinfo`, parsed (mount points, devices, options).
//! - [`nbd_netlink`]: kernel NBD devices configured over generic netlink.
//! - [`nbdfile`]: `cairn nbd-file`, an NBD export served as a FUSE file that can grow online.
//!
//! Every function here is synchronous and may block for seconds (it runs `mkfs`, `e2fsck`,
//! `mount`, `losetup` and waits for them): async callers run it in
//! `tokio::task::spawn_blocking`. Failures are [`HostError`]s naming the command or system
//! call, its status and its standard error. Everything assumes Linux and root.

pub mod attach;
mod cmd;
mod error;
pub mod kernel;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;
pub mod nbd_netlink;
pub mod nbdfile;
mod wait;

pub use cmd::have_tool;
pub use error::{HostError, Result};
