//! Attach mode `kernel`: an NBD export as `/dev/nbdN` through the kernel NBD driver, the
//! steps [`super::attach::Attacher`] runs for [`super::attach::AttachMode::Kernel`].
//!
//! - [`connect`]: resolve the URI's host, do the NBD handshake ([`NbdClient::handshake_only`]:
//!   simple replies, what the kernel speaks), hand the socket to the kernel with
//!   `NBD_CMD_CONNECT`: 4 KiB blocks, a dead-connection timeout of [`DEAD_CONN_TIMEOUT`] (I/O
//!   waits that long for a reconnect instead of failing), the volume id as backend identifier
//!   (shown in `/sys/block/nbdN/backend`; a `RECONFIGURE` must name it, so a reconnect cannot
//!   put another volume under the device), and `NBD_FLAG_READ_ONLY` when asked.
//! - [`keep`]: the reconnect loop ([`keep_connected`]): on `LINK_DEAD` of the device, a new
//!   handshake and `RECONFIGURE`. It first checks the connection once (see
//!   [`LinkDeadWatch::inject`]), so a keeper started after the `CONNECT`, or by a restarted
//!   process, misses no death.
//! - [`resize`]: a fresh handshake learns the export's size; `RECONFIGURE` with it (Linux
//!   >= 5.3); then `BLKGETSIZE64` of the device must show it. Never shrinks.
//! - [`disconnect`], [`connected`], [`owned_by`], [`devices_of`]: teardown and what the kernel
//!   says about a device.
//!
//! Assumes `CAP_SYS_ADMIN` and the `nbd` module (else [`HostError::KernelNbdUnavailable`]).
//! Every function is async and runs its blocking parts (netlink requests, ioctls, sysfs) on
//! tokio's blocking pool.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_nbd::{NbdClient, NbdClientError};

use super::attach::NbdUri;
use super::error::{HostError, Result};
use super::nbd_netlink::{
    device_path, keep_connected, ConnectParams, KernelNbd, NbdNetlinkError, ReconnectPolicy,
    WatchEvent,
};

/// Transmission flag `NBD_FLAG_READ_ONLY` (the NBD protocol's bit 1): the kernel makes the
/// device read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// How long I/O on a device whose connection died waits for [`keep`] to reconnect it before
/// the kernel fails it.
pub const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(120);
/// The block size given to the kernel: Cairn exports refuse I/O not aligned to 4 KiB.
pub const BLOCK_SIZE: u64 = 4096;
/// How long [`resize`] waits for the device to show its new size, and [`disconnect`] for
/// the kernel to release the device, at most.
const SETTLE: Duration = Duration::from_secs(10);

/// The kernel's NBD netlink family; [`HostError::KernelNbdUnavailable`] without the module.
pub async fn open() -> Result<KernelNbd> {
    KernelNbd::open().await.map_err(|e| match e {
        NbdNetlinkError::FamilyNotFound => HostError::KernelNbdUnavailable,
        source => HostError::KernelNbd {
            what: "lookup of the netlink family".into(),
            source,
        },
    })
}

fn netlink(what: String) -> impl FnOnce(NbdNetlinkError) -> HostError {
    move |source| HostError::KernelNbd { what, source }
}

/// A socket to `uri` past the handshake (`NBD_OPT_GO`), in blocking mode as the kernel wants
/// it, with the export's size and transmission flags. Tries each address the host resolves to.
pub async fn handshake(uri: &NbdUri) -> Result<(OwnedFd, u64, u16)> {
    let err = |source| HostError::NbdHandshake {
        uri: uri.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((uri.host.as_str(), uri.port))
        .await
        .map_err(|e| err(NbdClientError::Io(e)))?
        .collect();
    let mut last = NbdClientError::Io(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} resolves to no address", uri.host),
    ));
    for addr in addrs {
        match NbdClient::handshake_only(addr, &uri.export).await {
            Ok((stream, size, flags)) => {
                let std = stream.into_std().map_err(|e| err(NbdClientError::Io(e)))?;
                std.set_nonblocking(false)
                    .map_err(|e| err(NbdClientError::Io(e)))?;
                return Ok((OwnedFd::from(std), size, flags));
            }
            Err(e) => {
                tracing::debug!(%uri, %addr, error = %e, "NBD handshake failed");
                last = e;
            }
        }
    }
    Err(err(last))
}

/// The transmission flags handed to the kernel: the server's, plus read-only when asked.
pub fn server_flags(from_server: u16, read_only: bool) -> u16 {
    if read_only {
        from_server | NBD_FLAG_READ_ONLY
    } else {
        from_server
    }
}

/// Connects export `uri` as a new kernel NBD device named after `volume_id`; returns its
/// index, its path and the export's size.
pub async fn connect(
    volume_id: &str,
    uri: &NbdUri,
    read_only: bool,
) -> Result<(u32, PathBuf, u64)> {
    let nbd = open().await?;
    let (socket, size, flags) = handshake(uri).await?;
    let mut params = ConnectParams::new(size, server_flags(flags, read_only));
    params.block_size = BLOCK_SIZE;
    params.dead_conn_timeout = DEAD_CONN_TIMEOUT;
    params.backend = Some(volume_id.to_owned());
    let index = nbd.connect(socket, params).await.map_err(netlink(format!(
        "NBD_CMD_CONNECT of volume {volume_id} ({uri})"
    )))?;
    let device = device_path(index);
    tracing::info!(volume = volume_id, %uri, device = %device.display(), size, read_only, "kernel NBD attached");
    Ok((index, device, size))
}

/// Whether the kernel has device `index` configured (`NBD_CMD_STATUS`). No NBD driver, or no
/// such device: false.
pub async fn connected(index: u32) -> Result<bool> {
    let nbd = match open().await {
        Err(HostError::KernelNbdUnavailable) => return Ok(false),
        r => r?,
    };
    let devices = nbd
        .status(Some(index))
        .await
        .map_err(netlink(format!("NBD_CMD_STATUS of /dev/nbd{index}")))?;
    Ok(devices.iter().any(|d| d.index == index && d.connected))
}

/// Disconnects device `index` and waits (a few seconds at most) until the kernel has dropped
/// its configuration. Returns whether it did; a device still open somewhere keeps its (dead)
/// configuration until closed, its I/O failing.
pub async fn disconnect(index: u32) -> Result<bool> {
    let nbd = open().await?;
    nbd.disconnect(index)
        .await
        .map_err(netlink(format!("NBD_CMD_DISCONNECT of /dev/nbd{index}")))?;
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        let devices = nbd
            .status(Some(index))
            .await
            .map_err(netlink(format!("NBD_CMD_STATUS of /dev/nbd{index}")))?;
        if !devices.iter().any(|d| d.index == index && d.connected) {
            return Ok(true);
        }
        if start.elapsed() >= SETTLE {
            tracing::warn!(
                index,
                "device still configured after NBD_CMD_DISCONNECT (open somewhere?)"
            );
            return Ok(false);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Makes device `index` (connected for `volume_id`) as large as export `uri` is now and
/// returns the device's size. A device already that large is left as is; an export smaller
/// than the device is [`HostError::BadState`] (a mounted file system must never shrink).
pub async fn resize(volume_id: &str, index: u32, uri: &NbdUri) -> Result<u64> {
    let device = device_path(index);
    let (socket, size, _) = handshake(uri).await?;
    drop(socket);
    let current = device_size(&device).await?;
    if size == current {
        return Ok(size);
    }
    if size < current {
        return Err(HostError::BadState {
            path: device,
            why: format!(
                "export {uri} has {size} bytes, less than the device's {current}; not shrinking"
            ),
        });
    }
    if size % BLOCK_SIZE != 0 {
        return Err(HostError::BadState {
            path: device,
            why: format!("export {uri} has {size} bytes, not a multiple of {BLOCK_SIZE}"),
        });
    }
    let nbd = open().await?;
    nbd.resize(index, size, Some(volume_id.to_owned()))
        .await
        .map_err(netlink(format!(
            "NBD_CMD_RECONFIGURE of {} to {size} bytes",
            device.display()
        )))?;
    let start = Instant::now();
    loop {
        let now = device_size(&device).await?;
        if now == size {
            tracing::info!(volume = volume_id, device = %device.display(), size, "kernel NBD device grown");
            return Ok(size);
        }
        if start.elapsed() >= SETTLE {
            return Err(HostError::GrowUnsupported {
                volume: volume_id.into(),
                mode: "kernel (this kernel acknowledged the new size without applying it; Linux >= 5.3 is needed)",
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn device_size(device: &Path) -> Result<u64> {
    let d = device.to_owned();
    tokio::task::spawn_blocking(move || super::mount::block_device_size(&d))
        .await
        .map_err(|e| HostError::KernelNbd {
            what: format!("BLKGETSIZE64 of {}", device.display()),
            source: NbdNetlinkError::Worker(e),
        })?
}

/// Keeps device `index` of `volume_id` connected to `uri`: a future that runs until dropped
/// (abort its task before disconnecting the device), or until the kernel refuses a
/// `RECONFIGURE` (the device was disconnected or now belongs to another volume), which it
/// returns.
pub async fn keep(volume_id: &str, uri: &NbdUri, index: u32) -> Result<Infallible> {
    let nbd = open().await?;
    let mut watch = nbd
        .watch_link_dead()
        .map_err(netlink("subscription to LINK_DEAD events".into()))?;
    if owned_by(index, volume_id) == Some(false) {
        return Err(HostError::BadState {
            path: device_path(index),
            why: format!("the device no longer serves volume {volume_id}"),
        });
    }
    watch.inject(WatchEvent::LinkDead(index));
    let reconnect = || {
        let uri = uri.clone();
        async move {
            handshake(&uri)
                .await
                .map(|(socket, _, _)| socket)
                .map_err(io::Error::other)
        }
    };
    tracing::debug!(
        volume = volume_id,
        index,
        "keeping the kernel NBD device connected"
    );
    keep_connected(
        &nbd,
        index,
        &mut watch,
        ReconnectPolicy::default(),
        Some(volume_id),
        reconnect,
    )
    .await
    .map_err(netlink(format!(
        "reconnect of /dev/nbd{index} for volume {volume_id}"
    )))
}

/// `/sys/block/nbdN/backend` of device `index`: `Some(true)` when it names `volume_id`,
/// `Some(false)` when it names something else, `None` when there is no such file (device not
/// configured, or a kernel before 5.12).
pub fn owned_by(index: u32, volume_id: &str) -> Option<bool> {
    let text = std::fs::read_to_string(format!("/sys/block/nbd{index}/backend")).ok()?;
    Some(text.trim_end_matches('\n') == volume_id)
}

/// The devices whose backend identifier is `volume_id` (found in sysfs): what a crash between
/// `CONNECT` and writing the state file leaves behind.
pub fn devices_of(volume_id: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = entries
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("nbd")?
                .parse()
                .ok()
        })
        .filter(|i| owned_by(*i, volume_id) == Some(true))
        .collect();
    out.sort_unstable();
    out
}

/// Whether `device` is mounted or open exclusively (an `O_EXCL` open fails with `EBUSY`).
pub fn busy(device: &Path) -> Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
    {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(HostError::io("open", device, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_sets_the_flag() {
        // NBD_FLAG_HAS_FLAGS | SEND_FLUSH | SEND_TRIM, as a Cairn agent sends them.
        let from_server = 1 | (1 << 2) | (1 << 5);
        assert_eq!(server_flags(from_server, false), from_server);
        assert_eq!(server_flags(from_server, true), from_server | 2);
        assert_eq!(server_flags(from_server | 2, false), from_server | 2);
    }

    #[test]
    fn no_device_is_owned_by_an_unknown_volume() {
        assert_eq!(owned_by(u32::MAX, "vol"), None);
        assert!(devices_of("cairn-test-no-such-volume").is_empty());
    }
}
