//! The Linux kernel NBD driver, configured over generic netlink: the production attach path.
//!
//! A node hands the kernel an NBD TCP socket that has already finished the handshake
//! (`NBD_OPT_GO`), and the kernel turns it into `/dev/nbdN`. This module speaks the kernel's
//! generic netlink family `"nbd"` (version 1, `include/uapi/linux/nbd-netlink.h`, handlers in
//! `drivers/block/nbd.c`):
//!
//! - pure encoders ([`encode_connect`], [`encode_reconfigure`], [`encode_resize`],
//!   [`encode_disconnect`], [`encode_status`], [`encode_get_family`]) that return the exact
//!   request bytes, and a pure decoder ([`decode`]) that turns received bytes into typed
//!   [`Message`]s;
//! - [`KernelNbd`], the runtime path (`CONNECT`, `RECONFIGURE` of a socket or of the size,
//!   `DISCONNECT`, `STATUS`), a [`LinkDeadWatch`] on the multicast group `"nbd_mc_group"`,
//!   and [`keep_connected`], the reconnect loop (`LINK_DEAD` for our device: new handshake, then `RECONFIGURE`).
//!
//! # Guarantees
//! - Every request carries `NLM_F_REQUEST | NLM_F_ACK` and waits for the kernel's ack (or its
//!   errno, [`NbdNetlinkError::Refused`]) on its own socket, with a receive timeout; nested
//!   attributes carry `NLA_F_NESTED`; every attribute is padded to 4 bytes.
//! - [`decode`] never panics, whatever the bytes (property-tested): it returns
//!   [`NbdNetlinkError::Malformed`] instead. It masks `NLA_F_NESTED` when reading, since the
//!   kernel builds `NBD_ATTR_DEVICE_LIST` without that flag, and it skips attributes it does
//!   not know, so newer kernels' additions do not break it.
//! - Netlink calls that may block in the kernel (`CONNECT` starts the device, `DISCONNECT`
//!   flushes the receive workqueue) run on tokio's blocking pool, never on a runtime thread.
//! - The NBD socket's file descriptor is passed by number and resolved by the kernel inside
//!   the `sendmsg` of this process; the kernel takes its own reference, so the caller's
//!   [`OwnedFd`] is dropped once the request is answered.
//!
//! # Assumptions
//! - The caller has done the NBD handshake and passes the export's size and transmission
//!   flags ([`ConnectParams::server_flags`]); the kernel speaks simple replies only, so the
//!   handshake must not negotiate structured replies.
//! - `CAP_SYS_ADMIN` (the kernel refuses with `EPERM` otherwise) and the `nbd` module loaded
//!   ([`available`]). Reconnecting keeps I/O waiting only while
//!   [`ConnectParams::dead_conn_timeout`] runs: with zero the kernel fails I/O at once.
//! - A [`LinkDeadWatch`] is opened before `CONNECT`, so no `LINK_DEAD` is missed.
//!
//! # Crates
//! Framing uses the rust-netlink crates: `netlink-packet-core` (nlmsghdr, `NLMSG_ERROR`,
//! attribute emission and bounds-checked attribute iteration), `netlink-packet-generic`
//! (genlmsghdr and the `nlctrl` `GETFAMILY` request) and `netlink-sys` (sockets, multicast
//! membership, a tokio socket). They are maintained, small and need no `unsafe` here. The
//! NBD attributes are this module's own `Nla` types, and the `nlctrl` reply is read with a
//! tolerant parser of ours: the crate's `GenlCtrl` parser rejects any attribute it does not
//! know, which would turn a future kernel's extra attribute into a failed attach. `neli` was
//! the alternative; its typed builders add a second attribute model and more API churn for
//! the five commands used here.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use netlink_packet_core::{
    parse_string, parse_u16, parse_u32, parse_u8, DecodeError, Emitable, NetlinkBuffer,
    NetlinkMessage, NetlinkPayload, Nla, NlaBuffer, NlasIterator, ParseableParametrized,
    NLA_F_NESTED, NLA_TYPE_MASK, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_generic::constants::{
    CTRL_ATTR_FAMILY_ID, CTRL_ATTR_MCAST_GROUPS, CTRL_ATTR_MCAST_GRP_ID, CTRL_ATTR_MCAST_GRP_NAME,
    GENL_ID_CTRL,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::protocols::NETLINK_GENERIC;
use netlink_sys::{AsyncSocket, AsyncSocketExt, Socket, SocketAddr, TokioSocket};

/// Generic netlink family of the kernel NBD driver.
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
/// Its version.
pub const NBD_GENL_VERSION: u8 = 1;
/// Its multicast group, where `NBD_CMD_LINK_DEAD` is announced.
pub const NBD_GENL_MCAST_GROUP_NAME: &str = "nbd_mc_group";

/// Commands (`enum { NBD_CMD_* }`).
pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_LINK_DEAD: u8 = 4;
pub const NBD_CMD_STATUS: u8 = 5;

/// Top-level attributes (`enum { NBD_ATTR_* }`).
const NBD_ATTR_INDEX: u16 = 1; // u32
const NBD_ATTR_SIZE_BYTES: u16 = 2; // u64
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3; // u64
const NBD_ATTR_TIMEOUT: u16 = 4; // u64, seconds
const NBD_ATTR_SERVER_FLAGS: u16 = 5; // u64
const NBD_ATTR_CLIENT_FLAGS: u16 = 6; // u64
const NBD_ATTR_SOCKETS: u16 = 7; // nested NBD_SOCK_ITEM
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8; // u64, seconds
const NBD_ATTR_DEVICE_LIST: u16 = 9; // nested NBD_DEVICE_ITEM
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10; // NUL-terminated string
/// `NBD_ATTR_SOCKETS` > `NBD_SOCK_ITEM` > `NBD_SOCK_FD` (u32).
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
/// `NBD_ATTR_DEVICE_LIST` > `NBD_DEVICE_ITEM` > `NBD_DEVICE_INDEX` (u32), `_CONNECTED` (u8).
const NBD_DEVICE_ITEM: u16 = 1;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;

/// Client flags (`include/uapi/linux/nbd.h`): remove the device on disconnect.
pub const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;
/// Client flags: disconnect when the last opener closes the device.
pub const NBD_CFLAG_DISCONNECT_ON_CLOSE: u64 = 1 << 1;

/// How long a request waits for the kernel's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Sequence number of the family lookup.
const GET_FAMILY_SEQ: u32 = 1;

/// Errors of the kernel NBD netlink path.
#[derive(Debug, thiserror::Error)]
pub enum NbdNetlinkError {
    /// A netlink socket operation failed (or timed out waiting for the kernel).
    #[error("netlink socket I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The kernel has no `nbd` generic netlink family: the module is not loaded.
    #[error("the kernel has no generic netlink family \"nbd\" (is the nbd module loaded?)")]
    FamilyNotFound,
    /// The `nbd` family has no `nbd_mc_group` multicast group.
    #[error("the nbd netlink family has no multicast group \"nbd_mc_group\"")]
    NoMulticastGroup,
    /// The kernel answered a request with an errno.
    #[error("the kernel refused {what}: {}", io::Error::from_raw_os_error(*.errno))]
    Refused { what: &'static str, errno: i32 },
    /// The kernel acknowledged a request without the reply it should carry.
    #[error("the kernel acknowledged {0} without a reply")]
    MissingReply(&'static str),
    /// Bytes received from the kernel are not a valid netlink message.
    #[error("malformed netlink message: {0}")]
    Malformed(String),
    /// Connection parameters the kernel would reject or misread.
    #[error("invalid NBD parameters: {0}")]
    InvalidParams(&'static str),
    /// The blocking-pool task running a request failed.
    #[error("netlink worker task failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
}

impl From<DecodeError> for NbdNetlinkError {
    fn from(e: DecodeError) -> Self {
        NbdNetlinkError::Malformed(e.to_string())
    }
}

type Result<T, E = NbdNetlinkError> = std::result::Result<T, E>;

/// True when this node can attach with the kernel NBD driver.
pub fn available() -> bool {
    Path::new("/dev/nbd0").exists() || Path::new("/sys/module/nbd").exists()
}

/// `/dev/nbdN` for device `index`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// What `NBD_CMD_CONNECT` configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// `Some(n)` asks for `/dev/nbdn`; `None` lets the kernel pick a free device.
    pub index: Option<u32>,
    /// Export size from the handshake.
    pub size_bytes: u64,
    /// Logical block size: a power of two from 512 to 64 KiB dividing `size_bytes` (the
    /// kernel may also cap it at the page size).
    pub block_size: u64,
    /// Transmission flags from the handshake (`NBD_FLAG_*`), e.g. read-only, flush, trim.
    pub server_flags: u64,
    /// `NBD_CFLAG_*`; sent only when non-zero.
    pub client_flags: u64,
    /// Per-request timeout, whole seconds (rounded up); zero keeps the kernel default.
    pub timeout: Duration,
    /// How long I/O waits for a `RECONFIGURE` after the connection dies, whole seconds.
    pub dead_conn_timeout: Duration,
    /// Names the backend (shown in `/sys/block/nbdN/backend`); a `RECONFIGURE` must then name
    /// the same one, so a reconnect cannot attach another volume to the device.
    pub backend: Option<String>,
}

impl ConnectParams {
    /// Defaults for an export of `size_bytes` with transmission flags `server_flags`:
    /// 4 KiB blocks, a 30 s request timeout, 120 s to reconnect, kernel-chosen index.
    pub fn new(size_bytes: u64, server_flags: u16) -> Self {
        ConnectParams {
            index: None,
            size_bytes,
            block_size: 4096,
            server_flags: u64::from(server_flags),
            client_flags: 0,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(120),
            backend: None,
        }
    }

    /// Checks what the kernel would reject or silently round.
    pub fn validate(&self) -> Result<()> {
        if self.size_bytes == 0 {
            return Err(NbdNetlinkError::InvalidParams("size is zero"));
        }
        if !self.block_size.is_power_of_two() || !(512..=65536).contains(&self.block_size) {
            return Err(NbdNetlinkError::InvalidParams(
                "block size is not a power of two from 512 to 65536",
            ));
        }
        if self.size_bytes.checked_rem(self.block_size) != Some(0) {
            return Err(NbdNetlinkError::InvalidParams(
                "size is not a multiple of the block size",
            ));
        }
        check_backend(self.backend.as_deref())
    }
}

fn check_backend(backend: Option<&str>) -> Result<()> {
    match backend {
        Some(b) if b.is_empty() || b.contains('\0') || b.len() > 1024 => Err(
            NbdNetlinkError::InvalidParams("backend identifier is empty, too long or has a NUL"),
        ),
        _ => Ok(()),
    }
}

/// Whole seconds, rounded up, as the kernel's u64 second attributes expect.
fn secs_ceil(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// One top-level attribute of an NBD request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReqAttr {
    Index(u32),
    SizeBytes(u64),
    BlockSize(u64),
    Timeout(u64),
    ServerFlags(u64),
    ClientFlags(u64),
    /// `NBD_ATTR_SOCKETS`, one `NBD_SOCK_ITEM { NBD_SOCK_FD }` per descriptor.
    Sockets(Vec<SockItem>),
    DeadConnTimeout(u64),
    Backend(String),
}

/// `NBD_SOCK_ITEM`, nesting one `NBD_SOCK_FD`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SockItem(u32);

/// `NBD_SOCK_FD`.
struct SockFd(u32);

impl Nla for SockFd {
    fn value_len(&self) -> usize {
        4
    }
    fn kind(&self) -> u16 {
        NBD_SOCK_FD
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        buffer.copy_from_slice(&self.0.to_ne_bytes());
    }
}

impl Nla for SockItem {
    fn value_len(&self) -> usize {
        SockFd(self.0).buffer_len()
    }
    fn kind(&self) -> u16 {
        NBD_SOCK_ITEM | NLA_F_NESTED
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        SockFd(self.0).emit(buffer);
    }
}

impl Nla for ReqAttr {
    fn value_len(&self) -> usize {
        match self {
            ReqAttr::Index(_) => 4,
            ReqAttr::Sockets(items) => items.as_slice().buffer_len(),
            ReqAttr::Backend(s) => s.len() + 1,
            _ => 8,
        }
    }

    fn kind(&self) -> u16 {
        match self {
            ReqAttr::Index(_) => NBD_ATTR_INDEX,
            ReqAttr::SizeBytes(_) => NBD_ATTR_SIZE_BYTES,
            ReqAttr::BlockSize(_) => NBD_ATTR_BLOCK_SIZE_BYTES,
            ReqAttr::Timeout(_) => NBD_ATTR_TIMEOUT,
            ReqAttr::ServerFlags(_) => NBD_ATTR_SERVER_FLAGS,
            ReqAttr::ClientFlags(_) => NBD_ATTR_CLIENT_FLAGS,
            ReqAttr::Sockets(_) => NBD_ATTR_SOCKETS | NLA_F_NESTED,
            ReqAttr::DeadConnTimeout(_) => NBD_ATTR_DEAD_CONN_TIMEOUT,
            ReqAttr::Backend(_) => NBD_ATTR_BACKEND_IDENTIFIER,
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            ReqAttr::Index(v) => buffer.copy_from_slice(&v.to_ne_bytes()),
            ReqAttr::SizeBytes(v)
            | ReqAttr::BlockSize(v)
            | ReqAttr::Timeout(v)
            | ReqAttr::ServerFlags(v)
            | ReqAttr::ClientFlags(v)
            | ReqAttr::DeadConnTimeout(v) => buffer.copy_from_slice(&v.to_ne_bytes()),
            ReqAttr::Sockets(items) => items.as_slice().emit(buffer),
            ReqAttr::Backend(s) => {
                buffer[..s.len()].copy_from_slice(s.as_bytes());
                buffer[s.len()] = 0;
            }
        }
    }
}

/// The generic netlink payload of an NBD request: a command and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NbdRequest {
    cmd: u8,
    attrs: Vec<ReqAttr>,
}

impl GenlFamily for NbdRequest {
    fn family_name() -> &'static str {
        NBD_GENL_FAMILY_NAME
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        NBD_GENL_VERSION
    }
}

impl Emitable for NbdRequest {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer);
    }
}

/// nlmsghdr (`NLM_F_REQUEST | NLM_F_ACK`, `seq`, port 0) + genlmsghdr + attributes.
fn encode_request<F>(family_id: u16, seq: u32, payload: F) -> Vec<u8>
where
    F: GenlFamily + Emitable + Debug,
{
    let mut genl = GenlMessage::from_payload(payload);
    genl.set_resolved_family_id(family_id);
    let mut msg = NetlinkMessage::from(genl);
    msg.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    msg.header.sequence_number = seq;
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// `NBD_CMD_CONNECT` of one socket `sock_fd` with `p` (not validated here: see
/// [`ConnectParams::validate`]). Attributes in attribute-number order.
pub fn encode_connect(family_id: u16, seq: u32, sock_fd: u32, p: &ConnectParams) -> Vec<u8> {
    let mut attrs = Vec::with_capacity(9);
    if let Some(index) = p.index {
        attrs.push(ReqAttr::Index(index));
    }
    attrs.push(ReqAttr::SizeBytes(p.size_bytes));
    attrs.push(ReqAttr::BlockSize(p.block_size));
    attrs.push(ReqAttr::Timeout(secs_ceil(p.timeout)));
    attrs.push(ReqAttr::ServerFlags(p.server_flags));
    if p.client_flags != 0 {
        attrs.push(ReqAttr::ClientFlags(p.client_flags));
    }
    attrs.push(ReqAttr::Sockets(vec![SockItem(sock_fd)]));
    attrs.push(ReqAttr::DeadConnTimeout(secs_ceil(p.dead_conn_timeout)));
    if let Some(backend) = &p.backend {
        attrs.push(ReqAttr::Backend(backend.clone()));
    }
    let cmd = NBD_CMD_CONNECT;
    encode_request(family_id, seq, NbdRequest { cmd, attrs })
}

/// `NBD_CMD_RECONFIGURE` of device `index`: replace its dead socket with `sock_fd`.
/// `backend` must match the one given at connect, if any.
pub fn encode_reconfigure(
    family_id: u16,
    seq: u32,
    index: u32,
    sock_fd: u32,
    backend: Option<&str>,
) -> Vec<u8> {
    let mut attrs = vec![
        ReqAttr::Index(index),
        ReqAttr::Sockets(vec![SockItem(sock_fd)]),
    ];
    if let Some(backend) = backend {
        attrs.push(ReqAttr::Backend(backend.to_owned()));
    }
    let cmd = NBD_CMD_RECONFIGURE;
    encode_request(family_id, seq, NbdRequest { cmd, attrs })
}

/// `NBD_CMD_RECONFIGURE` of device `index` to `size_bytes` (Linux >= 5.3 resizes a connected
/// device; older kernels ignore the attribute). `backend` must match the one given at
/// connect: the kernel refuses a `RECONFIGURE` without it (`"must specify backend"`) when
/// the device has one.
pub fn encode_resize(
    family_id: u16,
    seq: u32,
    index: u32,
    size_bytes: u64,
    backend: Option<&str>,
) -> Vec<u8> {
    let mut attrs = vec![ReqAttr::Index(index), ReqAttr::SizeBytes(size_bytes)];
    if let Some(backend) = backend {
        attrs.push(ReqAttr::Backend(backend.to_owned()));
    }
    let cmd = NBD_CMD_RECONFIGURE;
    encode_request(family_id, seq, NbdRequest { cmd, attrs })
}

/// `NBD_CMD_DISCONNECT` of device `index`.
pub fn encode_disconnect(family_id: u16, seq: u32, index: u32) -> Vec<u8> {
    let attrs = vec![ReqAttr::Index(index)];
    let cmd = NBD_CMD_DISCONNECT;
    encode_request(family_id, seq, NbdRequest { cmd, attrs })
}

/// `NBD_CMD_STATUS` of device `index`, or of every device.
pub fn encode_status(family_id: u16, seq: u32, index: Option<u32>) -> Vec<u8> {
    let attrs = index.map(ReqAttr::Index).into_iter().collect();
    let cmd = NBD_CMD_STATUS;
    encode_request(family_id, seq, NbdRequest { cmd, attrs })
}

/// `CTRL_CMD_GETFAMILY` for [`NBD_GENL_FAMILY_NAME`].
pub fn encode_get_family(seq: u32) -> Vec<u8> {
    let ctrl = GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(NBD_GENL_FAMILY_NAME.to_owned())],
    };
    encode_request(GENL_ID_CTRL, seq, ctrl)
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// One device of an `NBD_CMD_STATUS` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    /// The device has a configuration (it is attached).
    pub connected: bool,
}

/// A netlink message received from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `NLMSG_ERROR` with error 0: request `seq` succeeded.
    Ack { seq: u32 },
    /// `NLMSG_ERROR` with an errno (positive): request `seq` failed.
    Refused { seq: u32, errno: i32 },
    /// A message of the `nbd` family: a reply (`CONNECT` carries the index, `STATUS` the
    /// device list) or the `LINK_DEAD` event (sequence 0, the dead device's index).
    Nbd {
        seq: u32,
        cmd: u8,
        index: Option<u32>,
        devices: Vec<DeviceStatus>,
    },
    /// An `nlctrl` family description: its id and multicast groups (name, id).
    Family {
        seq: u32,
        id: Option<u16>,
        mcast_groups: Vec<(String, u32)>,
    },
    /// `NLMSG_DONE`, `NLMSG_NOOP` or another family's message.
    Other { seq: u32, message_type: u16 },
}

impl Message {
    /// The sequence number it answers (0 for events).
    pub fn seq(&self) -> u32 {
        match self {
            Message::Ack { seq }
            | Message::Refused { seq, .. }
            | Message::Nbd { seq, .. }
            | Message::Family { seq, .. }
            | Message::Other { seq, .. } => *seq,
        }
    }

    /// The dead device's index, when this is an `NBD_CMD_LINK_DEAD` event.
    pub fn link_dead_index(&self) -> Option<u32> {
        match self {
            Message::Nbd {
                cmd: NBD_CMD_LINK_DEAD,
                index,
                ..
            } => *index,
            _ => None,
        }
    }
}

/// Received `nbd` family payload: the attributes replies and events carry.
#[derive(Debug)]
struct NbdReply {
    cmd: u8,
    index: Option<u32>,
    devices: Vec<DeviceStatus>,
}

impl ParseableParametrized<[u8], GenlHeader> for NbdReply {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let mut reply = NbdReply {
            cmd: header.cmd,
            index: None,
            devices: Vec::new(),
        };
        for nla in NlasIterator::new(buf) {
            let nla = nla?;
            match nla.kind() & NLA_TYPE_MASK {
                NBD_ATTR_INDEX => reply.index = Some(parse_u32(nla.value())?),
                NBD_ATTR_DEVICE_LIST => reply.devices = parse_device_list(nla.value())?,
                _ => {}
            }
        }
        Ok(reply)
    }
}

fn parse_device_list(buf: &[u8]) -> Result<Vec<DeviceStatus>, DecodeError> {
    let mut devices = Vec::new();
    for item in NlasIterator::new(buf) {
        let item = item?;
        if item.kind() & NLA_TYPE_MASK != NBD_DEVICE_ITEM {
            continue;
        }
        let (mut index, mut connected) = (None, false);
        for nla in NlasIterator::new(item.value()) {
            let nla = nla?;
            match nla.kind() & NLA_TYPE_MASK {
                NBD_DEVICE_INDEX => index = Some(parse_u32(nla.value())?),
                NBD_DEVICE_CONNECTED => connected = parse_u8(nla.value())? != 0,
                _ => {}
            }
        }
        let index = index.ok_or_else(|| DecodeError::from("NBD_DEVICE_ITEM without an index"))?;
        devices.push(DeviceStatus { index, connected });
    }
    Ok(devices)
}

/// Received `nlctrl` payload: only the family id and its multicast groups; other attributes
/// (operations, policies, whatever a newer kernel adds) are skipped.
#[derive(Debug)]
struct CtrlReply {
    id: Option<u16>,
    mcast_groups: Vec<(String, u32)>,
}

impl ParseableParametrized<[u8], GenlHeader> for CtrlReply {
    fn parse_with_param(buf: &[u8], _header: GenlHeader) -> Result<Self, DecodeError> {
        let mut reply = CtrlReply {
            id: None,
            mcast_groups: Vec::new(),
        };
        for nla in NlasIterator::new(buf) {
            let nla = nla?;
            match nla.kind() & NLA_TYPE_MASK {
                CTRL_ATTR_FAMILY_ID => reply.id = Some(parse_u16(nla.value())?),
                CTRL_ATTR_MCAST_GROUPS => {
                    for group in NlasIterator::new(nla.value()) {
                        if let Some(g) = parse_mcast_group(&group?)? {
                            reply.mcast_groups.push(g);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(reply)
    }
}

fn parse_mcast_group(group: &NlaBuffer<&[u8]>) -> Result<Option<(String, u32)>, DecodeError> {
    let (mut name, mut id) = (None, None);
    for nla in NlasIterator::new(group.value()) {
        let nla = nla?;
        match nla.kind() & NLA_TYPE_MASK {
            CTRL_ATTR_MCAST_GRP_NAME => name = Some(parse_string(nla.value())?),
            CTRL_ATTR_MCAST_GRP_ID => id = Some(parse_u32(nla.value())?),
            _ => {}
        }
    }
    Ok(name.zip(id))
}

/// Decodes every netlink message in one datagram. `nbd_family` is the resolved id of the
/// `nbd` family (0 before it is known). Never panics.
pub fn decode(buf: &[u8], nbd_family: u16) -> Result<Vec<Message>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        let rest = &buf[off..];
        let len = usize::try_from(NetlinkBuffer::new_checked(rest)?.length())
            .map_err(|_| NbdNetlinkError::Malformed("length does not fit usize".into()))?;
        out.push(decode_one(&rest[..len], nbd_family)?);
        // Messages are 4-byte aligned; `len` is at least a header, so this advances.
        off = off.saturating_add(len.saturating_add(3) & !3);
    }
    Ok(out)
}

fn decode_one(msg: &[u8], nbd_family: u16) -> Result<Message> {
    let header = NetlinkBuffer::new_checked(msg)?;
    let (seq, message_type) = (header.sequence_number(), header.message_type());
    match message_type {
        NLMSG_ERROR => {
            let parsed = NetlinkMessage::<GenlMessage<NbdReply>>::deserialize(msg)?;
            match parsed.payload {
                NetlinkPayload::Error(e) => Ok(match e.code {
                    None => Message::Ack { seq },
                    Some(code) => Message::Refused {
                        seq,
                        errno: code.get().saturating_neg(),
                    },
                }),
                _ => Err(NbdNetlinkError::Malformed(
                    "NLMSG_ERROR not parsed as one".into(),
                )),
            }
        }
        NLMSG_DONE | NLMSG_NOOP => Ok(Message::Other { seq, message_type }),
        GENL_ID_CTRL => {
            let parsed = NetlinkMessage::<GenlMessage<CtrlReply>>::deserialize(msg)?;
            match parsed.payload {
                NetlinkPayload::InnerMessage(m) => Ok(Message::Family {
                    seq,
                    id: m.payload.id,
                    mcast_groups: m.payload.mcast_groups,
                }),
                _ => Ok(Message::Other { seq, message_type }),
            }
        }
        t if t == nbd_family && nbd_family != 0 => {
            let parsed = NetlinkMessage::<GenlMessage<NbdReply>>::deserialize(msg)?;
            match parsed.payload {
                NetlinkPayload::InnerMessage(m) => Ok(Message::Nbd {
                    seq,
                    cmd: m.payload.cmd,
                    index: m.payload.index,
                    devices: m.payload.devices,
                }),
                _ => Ok(Message::Other { seq, message_type }),
            }
        }
        _ => Ok(Message::Other { seq, message_type }),
    }
}

// ---------------------------------------------------------------------------------------
// Runtime
// ---------------------------------------------------------------------------------------

/// Sends `request` on a fresh generic netlink socket and collects the messages answering
/// `seq` until its ack. Blocking: run on the blocking pool.
fn transact(nbd_family: u16, request: &[u8], seq: u32, what: &'static str) -> Result<Vec<Message>> {
    let mut sock = Socket::new(NETLINK_GENERIC)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    rustix::net::sockopt::set_socket_timeout(
        &sock,
        rustix::net::sockopt::Timeout::Recv,
        Some(REPLY_TIMEOUT),
    )
    .map_err(io::Error::from)?;
    sock.send(request, 0)?;
    let mut replies = Vec::new();
    loop {
        let (buf, _) = sock.recv_from_full()?;
        for m in decode(&buf, nbd_family)? {
            match m {
                Message::Ack { seq: s } if s == seq => return Ok(replies),
                Message::Refused { seq: s, errno } if s == seq => {
                    return Err(NbdNetlinkError::Refused { what, errno })
                }
                m if m.seq() == seq => replies.push(m),
                other => tracing::trace!(?other, what, "ignoring unrelated netlink message"),
            }
        }
    }
}

async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}

/// The descriptor number of `fd`, in blocking mode (as `nbd-client` hands it over).
fn socket_for_kernel(fd: &OwnedFd) -> Result<u32> {
    let flags = rustix::fs::fcntl_getfl(fd.as_fd()).map_err(io::Error::from)?;
    rustix::fs::fcntl_setfl(fd.as_fd(), flags - rustix::fs::OFlags::NONBLOCK)
        .map_err(io::Error::from)?;
    u32::try_from(fd.as_raw_fd())
        .map_err(|_| NbdNetlinkError::InvalidParams("negative socket descriptor"))
}

/// The kernel NBD driver's netlink family, resolved.
#[derive(Debug)]
pub struct KernelNbd {
    family_id: u16,
    mcast_group: u32,
    next_seq: AtomicU32,
}

impl KernelNbd {
    /// Resolves the `nbd` family and its multicast group with `CTRL_CMD_GETFAMILY`.
    pub async fn open() -> Result<KernelNbd> {
        blocking(|| {
            let request = encode_get_family(GET_FAMILY_SEQ);
            let replies = match transact(0, &request, GET_FAMILY_SEQ, "CTRL_CMD_GETFAMILY") {
                Err(NbdNetlinkError::Refused { errno, .. }) if errno == libc::ENOENT => {
                    return Err(NbdNetlinkError::FamilyNotFound)
                }
                r => r?,
            };
            let (id, groups) = replies
                .into_iter()
                .find_map(|m| match m {
                    Message::Family {
                        id: Some(id),
                        mcast_groups,
                        ..
                    } => Some((id, mcast_groups)),
                    _ => None,
                })
                .ok_or(NbdNetlinkError::MissingReply("CTRL_CMD_GETFAMILY"))?;
            let mcast_group = groups
                .into_iter()
                .find(|(name, _)| name == NBD_GENL_MCAST_GROUP_NAME)
                .map(|(_, gid)| gid)
                .ok_or(NbdNetlinkError::NoMulticastGroup)?;
            tracing::debug!(
                family_id = id,
                mcast_group,
                "resolved the nbd netlink family"
            );
            Ok(KernelNbd {
                family_id: id,
                mcast_group,
                next_seq: AtomicU32::new(GET_FAMILY_SEQ + 1),
            })
        })
        .await
    }

    /// The resolved family id.
    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    fn seq(&self) -> u32 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Attaches `socket` (an NBD connection past `NBD_OPT_GO`) as a new device and returns
    /// its index (`/dev/nbdN`, see [`device_path`]). The socket is handed to the kernel.
    pub async fn connect(&self, socket: OwnedFd, params: ConnectParams) -> Result<u32> {
        params.validate()?;
        let (family, seq) = (self.family_id, self.seq());
        let index = blocking(move || {
            let fd = socket_for_kernel(&socket)?;
            let request = encode_connect(family, seq, fd, &params);
            let replies = transact(family, &request, seq, "NBD_CMD_CONNECT")?;
            // The kernel holds its own reference to the socket now.
            drop(socket);
            replies
                .iter()
                .find_map(|m| match m {
                    Message::Nbd {
                        cmd: NBD_CMD_CONNECT,
                        index: Some(i),
                        ..
                    } => Some(*i),
                    _ => None,
                })
                .or(params.index)
                .ok_or(NbdNetlinkError::MissingReply("NBD_CMD_CONNECT"))
        })
        .await?;
        tracing::info!(index, "kernel NBD device connected");
        Ok(index)
    }

    /// Gives device `index` the new connection `socket` in place of its dead one. The kernel
    /// answers success without using the socket when no connection of the device is dead.
    pub async fn reconfigure(
        &self,
        index: u32,
        socket: OwnedFd,
        backend: Option<String>,
    ) -> Result<()> {
        check_backend(backend.as_deref())?;
        let (family, seq) = (self.family_id, self.seq());
        blocking(move || {
            let fd = socket_for_kernel(&socket)?;
            let request = encode_reconfigure(family, seq, index, fd, backend.as_deref());
            transact(family, &request, seq, "NBD_CMD_RECONFIGURE")?;
            drop(socket);
            Ok(())
        })
        .await?;
        tracing::info!(
            index,
            "kernel NBD device reconfigured with a new connection"
        );
        Ok(())
    }

    /// Sets the size of connected device `index` to `size_bytes` (keeping its block size).
    /// `backend` must be the one given at connect. Linux < 5.3 acknowledges without resizing:
    /// callers check the device's size afterwards.
    pub async fn resize(&self, index: u32, size_bytes: u64, backend: Option<String>) -> Result<()> {
        if size_bytes == 0 {
            return Err(NbdNetlinkError::InvalidParams("size is zero"));
        }
        check_backend(backend.as_deref())?;
        let (family, seq) = (self.family_id, self.seq());
        blocking(move || {
            let request = encode_resize(family, seq, index, size_bytes, backend.as_deref());
            transact(family, &request, seq, "NBD_CMD_RECONFIGURE (size)").map(drop)
        })
        .await?;
        tracing::info!(index, size_bytes, "kernel NBD device resized");
        Ok(())
    }

    /// Disconnects device `index`: the kernel sends `NBD_CMD_DISC`, closes the socket and
    /// fails any further I/O on the device.
    pub async fn disconnect(&self, index: u32) -> Result<()> {
        let (family, seq) = (self.family_id, self.seq());
        blocking(move || {
            let request = encode_disconnect(family, seq, index);
            transact(family, &request, seq, "NBD_CMD_DISCONNECT").map(drop)
        })
        .await?;
        tracing::info!(index, "kernel NBD device disconnected");
        Ok(())
    }

    /// The status of device `index`, or of every device the kernel has.
    pub async fn status(&self, index: Option<u32>) -> Result<Vec<DeviceStatus>> {
        let (family, seq) = (self.family_id, self.seq());
        blocking(move || {
            let request = encode_status(family, seq, index);
            let replies = transact(family, &request, seq, "NBD_CMD_STATUS")?;
            replies
                .into_iter()
                .find_map(|m| match m {
                    Message::Nbd {
                        cmd: NBD_CMD_STATUS,
                        devices,
                        ..
                    } => Some(devices),
                    _ => None,
                })
                .ok_or(NbdNetlinkError::MissingReply("NBD_CMD_STATUS"))
        })
        .await
    }

    /// Subscribes to `NBD_CMD_LINK_DEAD` events. Call inside a tokio runtime, and before the
    /// `connect` whose device it watches.
    pub fn watch_link_dead(&self) -> Result<LinkDeadWatch> {
        let mut sock = TokioSocket::new(NETLINK_GENERIC)?;
        sock.socket_mut().bind_auto()?;
        sock.socket_mut().add_membership(self.mcast_group)?;
        Ok(LinkDeadWatch {
            sock,
            family_id: self.family_id,
            queued: VecDeque::new(),
        })
    }
}

/// What a [`LinkDeadWatch`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEvent {
    /// Device `index` lost a connection.
    LinkDead(u32),
    /// The socket's receive buffer overflowed (`ENOBUFS`): events may have been lost.
    Overrun,
}

/// A subscription to the `nbd_mc_group` multicast group.
pub struct LinkDeadWatch {
    sock: TokioSocket,
    family_id: u16,
    queued: VecDeque<WatchEvent>,
}

impl Debug for LinkDeadWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkDeadWatch")
            .field("family_id", &self.family_id)
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

impl LinkDeadWatch {
    /// Queues `event` as if the kernel had sent it. A keeper that starts after its device was
    /// connected (a restarted process, or a watch opened after `CONNECT`) injects
    /// `LinkDead(index)` so that [`keep_connected`] checks the connection once: a `LINK_DEAD`
    /// sent before the watch existed is lost, and a `RECONFIGURE` of a healthy device is a
    /// no-op.
    pub fn inject(&mut self, event: WatchEvent) {
        self.queued.push_back(event);
    }

    /// The next event. Cancel-safe: an event is only taken from the queue when returned.
    /// Malformed datagrams are logged and skipped.
    pub async fn next(&mut self) -> Result<WatchEvent> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Ok(event);
            }
            let buf = match self.sock.recv_from_full().await {
                Ok((buf, _)) => buf,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Ok(WatchEvent::Overrun)
                }
                Err(e) => return Err(e.into()),
            };
            match decode(&buf, self.family_id) {
                Ok(messages) => self.queued.extend(
                    messages
                        .iter()
                        .filter_map(Message::link_dead_index)
                        .map(WatchEvent::LinkDead),
                ),
                Err(e) => tracing::warn!(%e, "skipping a malformed nbd multicast message"),
            }
        }
    }
}

/// Delays between reconnect attempts: doubling from `first` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    pub first: Duration,
    pub max: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            first: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl ReconnectPolicy {
    /// The wait after failed attempt number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.max)
    }
}

/// Whether `event` asks for a new connection for device `index`: its own `LINK_DEAD`, or an
/// overrun that may have swallowed one (a `RECONFIGURE` of a healthy device is a no-op).
pub fn needs_reconnect(event: WatchEvent, index: u32) -> bool {
    match event {
        WatchEvent::LinkDead(i) => i == index,
        WatchEvent::Overrun => true,
    }
}

/// Keeps device `index` connected: on each [`needs_reconnect`] event from `watch`, calls
/// `reconnect` (which dials and redoes the NBD handshake, returning the socket past
/// `NBD_OPT_GO`) until it succeeds, waiting `policy` between failures, then `RECONFIGURE`s the
/// device with it. Returns only with an error: the watch failed, or the kernel refused the
/// `RECONFIGURE` (the device was disconnected, or `backend` does not match). Stop it by
/// dropping the future (abort its task) before disconnecting the device.
pub async fn keep_connected<F, Fut>(
    nbd: &KernelNbd,
    index: u32,
    watch: &mut LinkDeadWatch,
    policy: ReconnectPolicy,
    backend: Option<&str>,
    mut reconnect: F,
) -> Result<Infallible>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<OwnedFd>>,
{
    loop {
        let event = watch.next().await?;
        if !needs_reconnect(event, index) {
            continue;
        }
        tracing::warn!(index, ?event, "NBD connection lost: reconnecting");
        let mut attempt = 0u32;
        loop {
            match reconnect().await {
                Ok(socket) => {
                    match nbd
                        .reconfigure(index, socket, backend.map(str::to_owned))
                        .await
                    {
                        Ok(()) => break,
                        Err(e @ NbdNetlinkError::Refused { .. }) => return Err(e),
                        Err(e) => tracing::warn!(index, attempt, %e, "RECONFIGURE failed"),
                    }
                }
                Err(e) => tracing::warn!(index, attempt, %e, "NBD reconnect failed"),
            }
            tokio::time::sleep(policy.delay(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Expected bytes are written out from the header layouts (little-endian x86/arm):
    //! nlmsghdr { u32 len, u16 type, u16 flags, u32 seq, u32 pid }, genlmsghdr { u8 cmd,
    //! u8 version, u16 reserved }, nlattr { u16 len (header + value, unpadded), u16 type }.
    use super::*;
    use proptest::prelude::*;

    const FAMILY: u16 = 0x1c;

    fn connect_params() -> ConnectParams {
        ConnectParams {
            index: None,
            size_bytes: 1 << 30,
            block_size: 4096,
            server_flags: 0x0d,
            client_flags: 0,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(120),
            backend: None,
        }
    }

    #[test]
    fn connect_bytes() {
        #[rustfmt::skip]
        let expected: [u8; 96] = [
            96, 0, 0, 0,  0x1c, 0,  0x05, 0,  7, 0, 0, 0,  0, 0, 0, 0, // nlmsghdr, REQUEST|ACK
            1, 1, 0, 0,                                  // NBD_CMD_CONNECT, version 1
            12, 0, 2, 0,  0, 0, 0, 0x40, 0, 0, 0, 0,     // SIZE_BYTES 1 GiB
            12, 0, 3, 0,  0, 0x10, 0, 0, 0, 0, 0, 0,     // BLOCK_SIZE_BYTES 4096
            12, 0, 4, 0,  30, 0, 0, 0, 0, 0, 0, 0,       // TIMEOUT 30 s
            12, 0, 5, 0,  0x0d, 0, 0, 0, 0, 0, 0, 0,     // SERVER_FLAGS
            16, 0, 7, 0x80,                              // SOCKETS | NLA_F_NESTED
              12, 0, 1, 0x80,                            //   SOCK_ITEM | NLA_F_NESTED
                8, 0, 1, 0,  5, 0, 0, 0,                 //     SOCK_FD 5
            12, 0, 8, 0,  120, 0, 0, 0, 0, 0, 0, 0,      // DEAD_CONN_TIMEOUT 120 s
        ];
        assert_eq!(encode_connect(FAMILY, 7, 5, &connect_params()), expected);
    }

    #[test]
    fn connect_bytes_with_index_client_flags_and_backend() {
        let p = ConnectParams {
            index: Some(2),
            client_flags: NBD_CFLAG_DESTROY_ON_DISCONNECT,
            timeout: Duration::from_millis(1500), // rounds up to 2 s
            backend: Some("vol-1".into()),
            ..connect_params()
        };
        #[rustfmt::skip]
        let expected: [u8; 128] = [
            128, 0, 0, 0,  0x1c, 0,  0x05, 0,  8, 0, 0, 0,  0, 0, 0, 0,
            1, 1, 0, 0,
            8, 0, 1, 0,  2, 0, 0, 0,                     // INDEX 2
            12, 0, 2, 0,  0, 0, 0, 0x40, 0, 0, 0, 0,
            12, 0, 3, 0,  0, 0x10, 0, 0, 0, 0, 0, 0,
            12, 0, 4, 0,  2, 0, 0, 0, 0, 0, 0, 0,        // TIMEOUT 2 s
            12, 0, 5, 0,  0x0d, 0, 0, 0, 0, 0, 0, 0,
            12, 0, 6, 0,  1, 0, 0, 0, 0, 0, 0, 0,        // CLIENT_FLAGS
            16, 0, 7, 0x80,  12, 0, 1, 0x80,  8, 0, 1, 0,  5, 0, 0, 0,
            12, 0, 8, 0,  120, 0, 0, 0, 0, 0, 0, 0,
            10, 0, 10, 0,  b'v', b'o', b'l', b'-', b'1', 0,  0, 0, // BACKEND "vol-1\0" + pad
        ];
        assert_eq!(encode_connect(FAMILY, 8, 5, &p), expected);
    }

    #[test]
    fn disconnect_bytes() {
        #[rustfmt::skip]
        let expected: [u8; 28] = [
            28, 0, 0, 0,  0x1c, 0,  0x05, 0,  9, 0, 0, 0,  0, 0, 0, 0,
            2, 1, 0, 0,                                  // NBD_CMD_DISCONNECT
            8, 0, 1, 0,  3, 0, 0, 0,                     // INDEX 3
        ];
        assert_eq!(encode_disconnect(FAMILY, 9, 3), expected);
    }

    #[test]
    fn reconfigure_bytes() {
        #[rustfmt::skip]
        let expected: [u8; 56] = [
            56, 0, 0, 0,  0x1c, 0,  0x05, 0,  10, 0, 0, 0,  0, 0, 0, 0,
            3, 1, 0, 0,                                  // NBD_CMD_RECONFIGURE
            8, 0, 1, 0,  3, 0, 0, 0,                     // INDEX 3
            16, 0, 7, 0x80,  12, 0, 1, 0x80,  8, 0, 1, 0,  9, 0, 0, 0, // SOCK_FD 9
            10, 0, 10, 0,  b'v', b'o', b'l', b'-', b'1', 0,  0, 0,
        ];
        assert_eq!(
            encode_reconfigure(FAMILY, 10, 3, 9, Some("vol-1")),
            expected
        );
        // Without a backend the message ends after the sockets.
        let short = encode_reconfigure(FAMILY, 10, 3, 9, None);
        assert_eq!(short[0], 44);
        assert_eq!(short[4..], expected[4..44]);
    }

    #[test]
    fn resize_bytes() {
        #[rustfmt::skip]
        let expected: [u8; 52] = [
            52, 0, 0, 0,  0x1c, 0,  0x05, 0,  12, 0, 0, 0,  0, 0, 0, 0,
            3, 1, 0, 0,                                  // NBD_CMD_RECONFIGURE
            8, 0, 1, 0,  3, 0, 0, 0,                     // INDEX 3
            12, 0, 2, 0,  0, 0, 0, 0x80, 0, 0, 0, 0,     // SIZE_BYTES 2 GiB
            10, 0, 10, 0,  b'v', b'o', b'l', b'-', b'1', 0,  0, 0, // BACKEND "vol-1\0" + pad
        ];
        assert_eq!(
            encode_resize(FAMILY, 12, 3, 2 << 30, Some("vol-1")),
            expected
        );
        // Without a backend the message ends after the size.
        let short = encode_resize(FAMILY, 12, 3, 2 << 30, None);
        assert_eq!(short[0], 40);
        assert_eq!(short[4..], expected[4..40]);
        // Sizes above 4 GiB use all eight bytes.
        let big = encode_resize(FAMILY, 12, 3, 0x0102_0304_0506_7000, None);
        assert_eq!(big[32..40], [0, 0x70, 6, 5, 4, 3, 2, 1]);
    }

    #[test]
    fn status_and_get_family_bytes() {
        #[rustfmt::skip]
        let status: [u8; 20] = [
            20, 0, 0, 0,  0x1c, 0,  0x05, 0,  11, 0, 0, 0,  0, 0, 0, 0,
            5, 1, 0, 0,                                  // NBD_CMD_STATUS, no index: all
        ];
        assert_eq!(encode_status(FAMILY, 11, None), status);
        #[rustfmt::skip]
        let get_family: [u8; 28] = [
            28, 0, 0, 0,  0x10, 0,  0x05, 0,  1, 0, 0, 0,  0, 0, 0, 0, // GENL_ID_CTRL
            3, 2, 0, 0,                                  // CTRL_CMD_GETFAMILY, version 2
            8, 0, 2, 0,  b'n', b'b', b'd', 0,            // CTRL_ATTR_FAMILY_NAME "nbd"
        ];
        assert_eq!(encode_get_family(1), get_family);
    }

    /// NLMSG_ERROR with `code`, echoing the header of a 28-byte request `seq`.
    fn error_msg(seq: u8, code: i32) -> Vec<u8> {
        let mut m = vec![36, 0, 0, 0, 2, 0, 0x00, 0x01, seq, 0, 0, 0, 0x2a, 0, 0, 0];
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&[28, 0, 0, 0, 0x1c, 0, 5, 0, seq, 0, 0, 0, 0, 0, 0, 0]);
        m
    }

    #[test]
    fn decodes_ack_and_error() {
        assert_eq!(
            decode(&error_msg(7, 0), FAMILY).unwrap(),
            [Message::Ack { seq: 7 }]
        );
        assert_eq!(
            decode(&error_msg(7, -16), FAMILY).unwrap(),
            [Message::Refused {
                seq: 7,
                errno: libc::EBUSY
            }]
        );
        // An errno no negation can represent does not panic.
        assert!(decode(&error_msg(7, i32::MIN), FAMILY).is_ok());
    }

    #[test]
    fn decodes_connect_reply_then_ack_in_one_datagram() {
        #[rustfmt::skip]
        let mut buf = vec![
            28, 0, 0, 0,  0x1c, 0,  0, 0,  7, 0, 0, 0,  0x2a, 0, 0, 0,
            1, 1, 0, 0,
            8, 0, 1, 0,  2, 0, 0, 0,                     // INDEX 2
        ];
        buf.extend(error_msg(7, 0));
        let expected = [
            Message::Nbd {
                seq: 7,
                cmd: NBD_CMD_CONNECT,
                index: Some(2),
                devices: vec![],
            },
            Message::Ack { seq: 7 },
        ];
        assert_eq!(decode(&buf, FAMILY).unwrap(), expected);
    }

    #[test]
    fn decodes_link_dead_event() {
        #[rustfmt::skip]
        let buf = [
            28, 0, 0, 0,  0x1c, 0,  0, 0,  0, 0, 0, 0,  0, 0, 0, 0,
            4, 1, 0, 0,                                  // NBD_CMD_LINK_DEAD
            8, 0, 1, 0,  5, 0, 0, 0,                     // INDEX 5
        ];
        let msgs = decode(&buf, FAMILY).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].link_dead_index(), Some(5));
        // Another family's message with the same layout is not ours.
        let other = decode(&buf, FAMILY + 1).unwrap();
        assert_eq!(other[0].link_dead_index(), None);
    }

    #[test]
    fn decodes_status_device_list_without_nested_flags() {
        #[rustfmt::skip]
        let buf = [
            64, 0, 0, 0,  0x1c, 0,  0, 0,  11, 0, 0, 0,  0x2a, 0, 0, 0,
            5, 1, 0, 0,
            44, 0, 9, 0,                                 // DEVICE_LIST (kernel: no flag)
              20, 0, 1, 0,                               //   DEVICE_ITEM
                8, 0, 1, 0,  0, 0, 0, 0,                 //     INDEX 0
                5, 0, 2, 0,  1, 0, 0, 0,                 //     CONNECTED 1 (+3 pad)
              20, 0, 1, 0,
                8, 0, 1, 0,  1, 0, 0, 0,
                5, 0, 2, 0,  0, 0, 0, 0,
        ];
        let expected = vec![
            DeviceStatus {
                index: 0,
                connected: true,
            },
            DeviceStatus {
                index: 1,
                connected: false,
            },
        ];
        match &decode(&buf, FAMILY).unwrap()[..] {
            [Message::Nbd {
                cmd: NBD_CMD_STATUS,
                devices,
                ..
            }] => assert_eq!(devices, &expected),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn decodes_family_reply_skipping_unknown_attributes() {
        #[rustfmt::skip]
        let buf = [
            80, 0, 0, 0,  0x10, 0,  0, 0,  1, 0, 0, 0,  0x2a, 0, 0, 0,
            1, 2, 0, 0,                                  // CTRL_CMD_NEWFAMILY
            6, 0, 1, 0,  0x1c, 0, 0, 0,                  // FAMILY_ID 0x1c (+2 pad)
            8, 0, 2, 0,  b'n', b'b', b'd', 0,            // FAMILY_NAME
            8, 0, 99, 0,  1, 2, 3, 4,                    // an attribute from the future
            36, 0, 7, 0x80,                              // MCAST_GROUPS
              32, 0, 1, 0x80,                            //   group #1
                17, 0, 1, 0,  b'n', b'b', b'd', b'_', b'm', b'c', b'_', b'g', b'r', b'o',
                b'u', b'p', 0,  0, 0, 0,                 //     GRP_NAME (+3 pad)
                8, 0, 2, 0,  5, 0, 0, 0,                 //     GRP_ID 5
        ];
        let expected = Message::Family {
            seq: 1,
            id: Some(0x1c),
            mcast_groups: vec![(NBD_GENL_MCAST_GROUP_NAME.to_owned(), 5)],
        };
        assert_eq!(decode(&buf, 0).unwrap(), [expected]);
    }

    #[test]
    fn decode_rejects_truncated_and_bad_lengths() {
        let mut ack = error_msg(7, 0);
        ack.truncate(30);
        assert!(matches!(
            decode(&ack, FAMILY),
            Err(NbdNetlinkError::Malformed(_))
        ));
        // An attribute whose length runs past its message.
        #[rustfmt::skip]
        let bad = [
            28, 0, 0, 0,  0x1c, 0,  0, 0,  0, 0, 0, 0,  0, 0, 0, 0,
            4, 1, 0, 0,  80, 0, 1, 0,  5, 0, 0, 0,
        ];
        assert!(decode(&bad, FAMILY).is_err());
        // A u32 attribute of the wrong size.
        #[rustfmt::skip]
        let short = [
            26, 0, 0, 0,  0x1c, 0,  0, 0,  0, 0, 0, 0,  0, 0, 0, 0,
            4, 1, 0, 0,  6, 0, 1, 0,  5, 0,
        ];
        assert!(decode(&short, FAMILY).is_err());
    }

    #[test]
    fn requests_decode_as_their_own_command() {
        let msgs = decode(&encode_disconnect(FAMILY, 3, 42), FAMILY).unwrap();
        assert_eq!(
            msgs,
            [Message::Nbd {
                seq: 3,
                cmd: NBD_CMD_DISCONNECT,
                index: Some(42),
                devices: vec![]
            }]
        );
    }

    #[test]
    fn validate_checks_sizes_and_backend() {
        assert!(connect_params().validate().is_ok());
        let bad = [
            ConnectParams {
                size_bytes: 0,
                ..connect_params()
            },
            ConnectParams {
                block_size: 3000,
                ..connect_params()
            },
            ConnectParams {
                block_size: 256,
                ..connect_params()
            },
            ConnectParams {
                block_size: 1 << 17,
                ..connect_params()
            },
            ConnectParams {
                size_bytes: (1 << 30) + 512,
                ..connect_params()
            },
            ConnectParams {
                backend: Some("a\0b".into()),
                ..connect_params()
            },
            ConnectParams {
                backend: Some(String::new()),
                ..connect_params()
            },
        ];
        for p in bad {
            assert!(
                matches!(p.validate(), Err(NbdNetlinkError::InvalidParams(_))),
                "{p:?}"
            );
        }
        let small = ConnectParams {
            size_bytes: (1 << 30) + 512,
            block_size: 512,
            ..connect_params()
        };
        assert!(small.validate().is_ok());
    }

    #[test]
    fn reconnect_decisions() {
        assert!(needs_reconnect(WatchEvent::LinkDead(3), 3));
        assert!(!needs_reconnect(WatchEvent::LinkDead(4), 3));
        assert!(needs_reconnect(WatchEvent::Overrun, 3));
        let p = ReconnectPolicy {
            first: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(p.delay(0), Duration::from_millis(100));
        assert_eq!(p.delay(1), Duration::from_millis(200));
        assert_eq!(p.delay(5), Duration::from_millis(3200));
        assert_eq!(p.delay(6), Duration::from_secs(5));
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(5));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                               family in any::<u16>()) {
            let _ = decode(&bytes, family);
        }

        /// Mutations of valid messages reach deeper than random bytes.
        #[test]
        fn decode_of_mutated_messages_never_panics(
            which in 0usize..4,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
        ) {
            let mut msg = match which {
                0 => encode_connect(FAMILY, 1, 5, &ConnectParams {
                    backend: Some("vol".into()), ..connect_params()
                }),
                1 => error_msg(1, -22),
                2 => encode_get_family(1),
                _ => encode_status(FAMILY, 1, Some(1)),
            };
            for (at, byte) in flips {
                let i = at % msg.len();
                msg[i] = byte;
            }
            msg.truncate(cut % (msg.len() + 1));
            let _ = decode(&msg, FAMILY);
            let _ = decode(&msg, GENL_ID_CTRL);
        }
    }
}
