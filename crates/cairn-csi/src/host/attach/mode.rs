//! [`AttachMode`]: how a volume becomes a block device on this node, by name (`fuse`,
//! `cairn-fuse`, `kernel`, or `auto` on the command line).
//!
//! Guarantees: [`AttachMode::as_str`] and [`AttachMode::from_name`] are inverse (the names
//! are what state files record); `auto` picks the kernel driver when it is there or loads.
//! Assumes: `auto` may run `modprobe nbd` (root).

use std::str::FromStr;

use crate::host::cmd::{self, Cmd};
use crate::host::nbd_netlink;

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
        AttachMode::choose(nbd_netlink::available, || {
            cmd::have_tool("modprobe") && Cmd::new("modprobe").arg("nbd").run().is_ok()
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
    pub(super) fn from_name(name: &str) -> Option<AttachMode> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
