//! CSI v1 for Cairn.
//!
//! - [`pb`]: the `csi.v1` messages and services Cairn implements, generated from
//!   `proto/csi/v1/csi.proto` (names and field numbers as the CSI specification defines them).
//! - [`server`]: serving the Identity, Controller and Node services on a Unix socket.
//! - [`host`]: what a node does to a volume: attach it as a local block device (kernel NBD
//!   over netlink, or nbdfuse + a loop device), format, check, mount, bind, stat and grow
//!   filesystems.
//!
//! The services themselves (what a CreateVolume does to the cluster) live in the `cairn`
//! binary, which holds the cluster operations the CLI uses too.

pub mod host;
pub mod pb;
pub mod server;
