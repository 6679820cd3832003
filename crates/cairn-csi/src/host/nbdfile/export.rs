//! The export behind `cairn nbd-file`'s file: the NBD connection in use, its size, the request
//! gate, and the two ways a connection is replaced (see the parent module's docs): a resize on
//! `SIGHUP`, and a reconnect after the connection broke.
//!
//! Guarantees: one swap at a time (the `swapping` lock), and never two connections in use at
//! once (a swap closes the gate and waits until no request is in flight). A request that failed
//! because its connection broke is retried on the connection that replaced it; a request that
//! the server answered with an error is not. Assumes requests are idempotent at their offsets
//! (reads, writes, write-zeroes and flushes are), so sending one twice is harmless.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use cairn_nbd::{NbdClient, NbdClientError};
use fuser::Errno;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

use super::NbdFileError;
use crate::host::attach::NbdUri;

/// Requests in flight at most (the gate's permits).
const MAX_IN_FLIGHT: u32 = 1024;
/// Longest `NBD_CMD_WRITE_ZEROES` sent for one fallocate: larger ranges are split.
const ZERO_CHUNK: u64 = 32 << 20;
/// First pause between reconnect attempts; it doubles up to [`RECONNECT_MAX_PAUSE`].
const RECONNECT_FIRST_PAUSE: Duration = Duration::from_millis(50);
const RECONNECT_MAX_PAUSE: Duration = Duration::from_secs(2);

/// Resolves the URI's host and opens the export on the first address that answers.
pub(super) async fn connect(uri: &NbdUri) -> Result<NbdClient, NbdFileError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((uri.host.as_str(), uri.port))
        .await
        .map_err(|source| NbdFileError::Resolve {
            host: uri.host.clone(),
            port: uri.port,
            source,
        })?
        .collect();
    let mut last = NbdClientError::Closed(format!("{} resolved to no address", uri.host));
    for addr in addrs {
        match NbdClient::connect(addr, &uri.export).await {
            Ok(c) => return Ok(c),
            Err(e) => last = e,
        }
    }
    Err(NbdFileError::Connect {
        uri: uri.to_string(),
        source: last,
    })
}

/// Why one attempt of a request failed.
enum Failed {
    /// Refused before anything was sent, or answered with an error: goes to the caller.
    Errno(Errno),
    /// The NBD request failed: a server error goes to the caller, a broken connection is
    /// replaced and the request retried.
    Nbd(NbdClientError),
}

impl From<NbdClientError> for Failed {
    fn from(e: NbdClientError) -> Failed {
        Failed::Nbd(e)
    }
}

/// Whether `e` means the connection is unusable (closed, or its socket failed), as opposed to
/// the server answering this one request with an error.
fn broken(e: &NbdClientError) -> bool {
    matches!(e, NbdClientError::Closed(_) | NbdClientError::Io(_))
}

/// The export behind the file: the connection in use, its size, and the request gate.
pub(super) struct Export {
    uri: NbdUri,
    pub(super) read_only: bool,
    /// How long a broken connection is retried before requests fail with `EIO`.
    dead_timeout: Duration,
    /// Swapped only while the gate is closed (every permit held by the swap).
    conn: RwLock<Arc<NbdClient>>,
    /// The size of `conn`'s export, for `getattr`.
    size: AtomicU64,
    gate: Semaphore,
    /// Held by whoever replaces the connection (a resize or a reconnect), and awaited by every
    /// request whose connection broke: a tokio mutex is a FIFO queue, so held requests go on
    /// in the order they failed. It guards no data, only "one swap at a time".
    swapping: Mutex<()>,
    /// Set when a reconnect gave up: the broken connection stays, every request fails `EIO`.
    gave_up: AtomicBool,
}

impl Export {
    pub(super) fn new(
        uri: NbdUri,
        client: NbdClient,
        read_only: bool,
        dead_timeout: Duration,
    ) -> Export {
        Export {
            uri,
            read_only,
            dead_timeout,
            size: AtomicU64::new(client.size()),
            conn: RwLock::new(Arc::new(client)),
            gate: Semaphore::new(MAX_IN_FLIGHT as usize),
            swapping: Mutex::new(()),
            gave_up: AtomicBool::new(false),
        }
    }

    pub(super) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(super) fn current(&self) -> Arc<NbdClient> {
        Arc::clone(&self.conn.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs one request on the current connection, holding a permit of the gate throughout.
    /// If the connection broke, waits until it is replaced and runs the request again; if it
    /// cannot be replaced, fails with `EIO`.
    async fn with_conn<T, F, Fut>(&self, f: F) -> Result<T, Errno>
    where
        F: Fn(Arc<NbdClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failed>>,
    {
        loop {
            let conn = {
                // The gate is never closed: acquire fails only then.
                let _permit = self.gate.acquire().await.map_err(|_| Errno::EIO)?;
                let conn = self.current();
                match f(Arc::clone(&conn)).await {
                    Ok(v) => return Ok(v),
                    Err(Failed::Errno(e)) => return Err(e),
                    Err(Failed::Nbd(e)) if !broken(&e) => return Err(errno(&e)),
                    Err(Failed::Nbd(e)) => {
                        tracing::debug!(error = %e, "request failed on a broken connection");
                        conn
                    }
                }
                // The permit goes here: a swap waits for every request to give its back.
            };
            if !self.recover(&conn).await {
                return Err(Errno::EIO);
            }
        }
    }

    /// After a request failed on the broken connection `dead`: waits for the swap lock, then
    /// replaces `dead` unless another request already did. Whether to retry.
    async fn recover(&self, dead: &Arc<NbdClient>) -> bool {
        let _swap = self.swapping.lock().await;
        if !Arc::ptr_eq(&self.current(), dead) {
            return true;
        }
        if self.gave_up.load(Ordering::Acquire) {
            return false;
        }
        match self.reconnect(dead).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(
                    uri = %self.uri,
                    error = %e,
                    dead_timeout = ?self.dead_timeout,
                    "gave up reconnecting; every request fails with EIO"
                );
                self.gave_up.store(true, Ordering::Release);
                false
            }
        }
    }

    /// Opens a new connection to the export, with backoff, for up to the dead-connection
    /// timeout, and swaps it in for `dead`. Call with the swap lock held.
    async fn reconnect(&self, dead: &Arc<NbdClient>) -> Result<(), NbdFileError> {
        tracing::warn!(uri = %self.uri, "NBD connection broken; reconnecting");
        let started = Instant::now();
        let deadline = started + self.dead_timeout;
        let mut pause = RECONNECT_FIRST_PAUSE;
        let mut attempts = 0u32;
        let new = loop {
            attempts += 1;
            // An attempt may outlast the timeout a little: the last one starts at it.
            let limit = deadline.max(Instant::now() + RECONNECT_MAX_PAUSE);
            let failed = match tokio::time::timeout_at(limit, self.probe(dead)).await {
                Ok(Ok(new)) => break new,
                // A smaller export is not a transient failure.
                Ok(Err(e @ NbdFileError::Shrunk { .. })) => return Err(e),
                Ok(Err(e)) => e,
                Err(_) => NbdFileError::Connect {
                    uri: self.uri.to_string(),
                    source: NbdClientError::Closed("connecting timed out".into()),
                },
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(failed);
            }
            tracing::debug!(attempts, error = %failed, "reconnect attempt failed");
            tokio::time::sleep_until((now + pause).min(deadline)).await;
            pause = (pause * 2).min(RECONNECT_MAX_PAUSE);
        };
        let size = new.size();
        // The dead connection cannot be flushed; what it acknowledged, the server has.
        self.swap_in(dead, new, false).await?;
        tracing::info!(
            uri = %self.uri,
            size,
            attempts,
            after = ?started.elapsed(),
            "reconnected; retrying the requests that failed"
        );
        Ok(())
    }

    /// A new connection to the export, refused (and closed) if it is smaller than `old`'s.
    async fn probe(&self, old: &NbdClient) -> Result<NbdClient, NbdFileError> {
        let new = connect(&self.uri).await?;
        let (old_size, new_size) = (old.size(), new.size());
        if new_size < old_size {
            if let Err(e) = new.disconnect().await {
                tracing::debug!(error = %e, "disconnect of the refused connection");
            }
            return Err(NbdFileError::Shrunk {
                old: old_size,
                new: new_size,
            });
        }
        Ok(new)
    }

    /// Swaps `new` in for `old` (the connection in use): closes the gate and waits until no
    /// request is in flight, flushes `old` if `flush_old` (else a failed flush keeps `old`),
    /// swaps, opens the gate and disconnects `old`. Call with the swap lock held.
    async fn swap_in(
        &self,
        old: &NbdClient,
        new: NbdClient,
        flush_old: bool,
    ) -> Result<(), NbdFileError> {
        let all = self
            .gate
            .acquire_many(MAX_IN_FLIGHT)
            .await
            .map_err(|_| NbdFileError::ResizeFlush(NbdClientError::Closed("gate".into())))?;
        if flush_old {
            match old.flush().await {
                Ok(()) | Err(NbdClientError::Unsupported(_)) => {}
                Err(e) => {
                    drop(all);
                    let _ = new.disconnect().await;
                    return Err(NbdFileError::ResizeFlush(e));
                }
            }
        }
        let new_size = new.size();
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        self.size.store(new_size, Ordering::Release);
        drop(all);
        // Nothing uses the old connection any more: every request that took it has finished.
        if let Err(e) = old.disconnect().await {
            if flush_old {
                tracing::warn!(error = %e, "disconnect of the old connection");
            } else {
                tracing::debug!(error = %e, "disconnect of the broken connection");
            }
        }
        Ok(())
    }

    /// Reconnects and, if the export grew, swaps the new connection in (see the module docs).
    /// Returns the old and new sizes when it swapped.
    pub(super) async fn resize(&self) -> Result<Option<(u64, u64)>, NbdFileError> {
        let _swap = self.swapping.lock().await;
        let old = self.current();
        let new = self.probe(&old).await?;
        let (old_size, new_size) = (old.size(), new.size());
        if new_size == old_size {
            if let Err(e) = new.disconnect().await {
                tracing::debug!(error = %e, "disconnect of the probe connection");
            }
            return Ok(None);
        }
        tracing::info!(
            old_size,
            new_size,
            "export grew; draining requests to swap connections"
        );
        self.swap_in(&old, new, true).await?;
        Ok(Some((old_size, new_size)))
    }

    pub(super) async fn read(&self, offset: u64, len: u32) -> Result<Bytes, Errno> {
        self.with_conn(|c| async move {
            match clip(offset, u64::from(len), c.size()) {
                0 => Ok(Bytes::new()),
                n => {
                    let n = u32::try_from(n).map_err(|_| Failed::Errno(Errno::EINVAL))?;
                    Ok(c.read(offset, n).await?)
                }
            }
        })
        .await
    }

    pub(super) async fn write(&self, offset: u64, data: Bytes) -> Result<u32, Errno> {
        self.with_conn(|c| {
            let data = data.clone();
            async move {
                let len = data.len() as u64;
                let n = clip(offset, len, c.size());
                if n == 0 && len > 0 {
                    return Err(Failed::Errno(Errno::ENOSPC));
                }
                let n32 = u32::try_from(n).map_err(|_| Failed::Errno(Errno::EINVAL))?;
                c.write(offset, data.slice(..n32 as usize)).await?;
                Ok(n32)
            }
        })
        .await
    }

    pub(super) async fn flush(&self) -> Result<(), Errno> {
        self.with_conn(|c| async move {
            match c.flush().await {
                Ok(()) | Err(NbdClientError::Unsupported(_)) => Ok(()),
                Err(e) => Err(Failed::Nbd(e)),
            }
        })
        .await
    }

    /// A retry after a broken connection zeroes the whole range again, from its start.
    pub(super) async fn fallocate(&self, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        self.with_conn(|c| async move {
            let Some((start, len)) =
                fallocate_zero_range(offset, length, mode, c.size()).map_err(Failed::Errno)?
            else {
                return Ok(());
            };
            let mut at = start;
            let end = start + len;
            while at < end {
                let n = (end - at).min(ZERO_CHUNK);
                let n = u32::try_from(n).map_err(|_| Failed::Errno(Errno::EINVAL))?;
                c.write_zeroes(at, n).await?;
                at += u64::from(n);
            }
            Ok(())
        })
        .await
    }
}

/// How many of `len` bytes at `offset` lie inside a file of `size` bytes.
fn clip(offset: u64, len: u64, size: u64) -> u64 {
    size.saturating_sub(offset).min(len)
}

const FALLOC_FL_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const FALLOC_FL_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
const FALLOC_FL_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// What a fallocate of a file of `size` bytes amounts to: `None` (nothing to do) or a range to
/// zero, clipped to the file; errors for what a fixed-size file cannot do.
fn fallocate_zero_range(
    offset: u64,
    length: u64,
    mode: i32,
    size: u64,
) -> Result<Option<(u64, u64)>, Errno> {
    let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
    if length == 0 {
        return Err(Errno::EINVAL);
    }
    let zero = mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE);
    if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0
        || zero == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
    {
        return Err(Errno::ENOTSUP);
    }
    if zero == 0 {
        // Plain allocation: the export is all there; it cannot grow the file.
        return if end > size && mode & FALLOC_FL_KEEP_SIZE == 0 {
            Err(Errno::ENOSPC)
        } else {
            Ok(None)
        };
    }
    if zero == FALLOC_FL_PUNCH_HOLE && mode & FALLOC_FL_KEEP_SIZE == 0 {
        return Err(Errno::EINVAL); // As fallocate(2) demands.
    }
    Ok(match clip(offset, length, size) {
        0 => None,
        n => Some((offset, n)),
    })
}

/// The errno a FUSE caller gets for a failed NBD request. The server's NBD error values are
/// Linux errno values; anything else (a dead connection) is `EIO`.
fn errno(e: &NbdClientError) -> Errno {
    match e {
        NbdClientError::Server { errno, .. } => match *errno {
            1 => Errno::EPERM,
            12 => Errno::ENOMEM,
            22 => Errno::EINVAL,
            28 => Errno::ENOSPC,
            75 => Errno::from_i32(libc::EOVERFLOW),
            95 => Errno::ENOTSUP,
            108 => Errno::from_i32(libc::ESHUTDOWN),
            _ => Errno::EIO,
        },
        NbdClientError::OutOfRange { .. } => Errno::EINVAL,
        NbdClientError::Unsupported(_) => Errno::ENOTSUP,
        _ => Errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_is_that_of_a_block_device() {
        assert_eq!(clip(0, 4096, 8192), 4096);
        assert_eq!(clip(4096, 8192, 8192), 4096);
        assert_eq!(clip(8192, 4096, 8192), 0);
        assert_eq!(clip(u64::MAX, 4096, 8192), 0);
    }

    #[test]
    fn fallocate_modes() {
        let size = 1 << 20;
        let punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        assert_eq!(
            fallocate_zero_range(4096, 8192, punch, size),
            Ok(Some((4096, 8192)))
        );
        // Clipped to the file; past it, nothing to do.
        assert_eq!(
            fallocate_zero_range(size - 4096, 8192, punch, size),
            Ok(Some((size - 4096, 4096)))
        );
        assert_eq!(fallocate_zero_range(size, 4096, punch, size), Ok(None));
        assert_eq!(
            fallocate_zero_range(0, 4096, FALLOC_FL_ZERO_RANGE, size),
            Ok(Some((0, 4096)))
        );
        assert_eq!(
            fallocate_zero_range(0, 4096, FALLOC_FL_PUNCH_HOLE, size),
            Err(Errno::EINVAL)
        );
        assert_eq!(fallocate_zero_range(0, size, 0, size), Ok(None));
        assert_eq!(
            fallocate_zero_range(0, size + 1, 0, size),
            Err(Errno::ENOSPC)
        );
        assert_eq!(
            fallocate_zero_range(0, size + 1, FALLOC_FL_KEEP_SIZE, size),
            Ok(None)
        );
        assert_eq!(
            fallocate_zero_range(0, 4096, libc::FALLOC_FL_COLLAPSE_RANGE, size),
            Err(Errno::ENOTSUP)
        );
        assert_eq!(
            fallocate_zero_range(u64::MAX, 2, punch, size),
            Err(Errno::EFBIG)
        );
        assert_eq!(fallocate_zero_range(0, 0, punch, size), Err(Errno::EINVAL));
    }

    #[test]
    fn nbd_errors_map_to_errnos() {
        let server = |errno| NbdClientError::Server {
            errno,
            op: "WRITE",
            offset: 1,
            len: 1,
        };
        assert_eq!(errno(&server(22)), Errno::EINVAL);
        assert_eq!(errno(&server(28)), Errno::ENOSPC);
        assert_eq!(errno(&server(1)), Errno::EPERM);
        assert_eq!(errno(&server(5)), Errno::EIO);
        assert_eq!(errno(&server(12345)), Errno::EIO);
        assert_eq!(errno(&NbdClientError::Closed("x".into())), Errno::EIO);
        assert_eq!(errno(&NbdClientError::Unsupported("FLUSH")), Errno::ENOTSUP);
    }

    #[test]
    fn only_a_broken_connection_is_retried() {
        assert!(broken(&NbdClientError::Closed("x".into())));
        assert!(broken(&NbdClientError::Io(
            std::io::ErrorKind::BrokenPipe.into()
        )));
        let server = NbdClientError::Server {
            errno: 28,
            op: "WRITE",
            offset: 0,
            len: 4096,
        };
        assert!(!broken(&server));
        assert!(!broken(&NbdClientError::Unsupported("WRITE_ZEROES")));
        assert!(!broken(&NbdClientError::OutOfRange {
            op: "READ",
            offset: 0,
            len: 1,
            size: 0
        }));
    }
}
