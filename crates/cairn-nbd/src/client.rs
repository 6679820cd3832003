//! An async NBD client that pipelines requests on one TCP connection.
//!
//! [`NbdClient::connect`] runs the fixed newstyle handshake (`NBD_FLAG_C_FIXED_NEWSTYLE`, plus
//! `NBD_FLAG_C_NO_ZEROES` when the server offers it) and `NBD_OPT_GO`, learning the export's
//! size and transmission flags from `NBD_INFO_EXPORT`. It never negotiates structured
//! replies, so every reply is a simple reply.
//!
//! # Guarantees
//! - Methods take `&self`: any number of tasks may share one client (`Arc<NbdClient>`), and
//!   their requests are in flight at once. Each request frame (header and payload) is
//!   written whole under one writer lock; one reader task matches replies to requests by
//!   cookie, so replies may arrive in any order.
//! - A request is registered before its first byte is sent, so its reply always finds it.
//! - Ranges are checked against the export size before sending ([`NbdClientError::OutOfRange`]);
//!   `write_zeroes` and `flush` are only sent when the server advertised them
//!   ([`NbdClientError::Unsupported`]). Alignment and size limits are the server's to check:
//!   its error reply becomes [`NbdClientError::Server`].
//! - Once the connection breaks (I/O error, server close, protocol violation, or a request
//!   cancelled halfway through being sent), every pending and every later request fails with
//!   [`NbdClientError::Closed`]; nothing waits forever on a dead connection.
//! - Cancelling a request future is safe: before sending it is forgotten; after sending its
//!   reply is read and dropped; in the middle of sending the connection is closed, since the
//!   stream can no longer be framed.
//! - [`NbdClient::disconnect`] refuses new requests, waits until every request in flight has
//!   its reply, then sends `NBD_CMD_DISC` and closes. Dropping the client aborts the reader
//!   task and closes the socket.
//!
//! # Assumptions
//! The server follows the protocol document
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>): it sends a simple
//! reply, with no payload on errors, to every request except `NBD_CMD_DISC`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::proto::*;

/// Largest option reply accepted during the handshake (the server limits its strings to 4 KiB).
const MAX_OPT_REPLY: u32 = 64 << 10;
/// Read buffer of the reply reader.
const READ_BUF: usize = 64 << 10;
/// Reason given to requests made after [`NbdClient::disconnect`].
const DISCONNECTED: &str = "the client disconnected";

/// Errors of [`NbdClient`].
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    /// The handshake's I/O failed.
    #[error("NBD connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol during the handshake.
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(String),
    /// The server refused the export (an `NBD_REP_ERR_*` reply); the server's message.
    #[error("NBD server refused the export: {0}")]
    Refused(String),
    /// The server answered the request with an error.
    #[error("NBD server failed {op} of {len} bytes at offset {offset}: {} ({errno})", errno_name(.errno))]
    Server {
        errno: u32,
        op: &'static str,
        offset: u64,
        len: u64,
    },
    /// The connection is gone (or disconnecting); the request may or may not have happened.
    #[error("NBD connection closed: {0}")]
    Closed(String),
    /// The range is outside the export (or too long for one request); nothing was sent.
    #[error("NBD {op} of {len} bytes at offset {offset} is outside the export ({size} bytes)")]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// The server did not advertise this command; nothing was sent.
    #[error("NBD server does not support {0}")]
    Unsupported(&'static str),
}

/// Name of an NBD error value.
fn errno_name(errno: &u32) -> &'static str {
    match *errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// A request waiting for its reply.
struct Pending {
    cmd: u16,
    offset: u64,
    len: u32,
    tx: oneshot::Sender<Result<Bytes, NbdClientError>>,
}

/// State shared by the requesters and the reader task.
#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Set once the connection is unusable; new requests fail with this reason.
    closed: Option<String>,
    /// Set by `disconnect`: new requests are refused, DISC follows the last reply.
    disconnecting: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Notified when `pending` becomes empty or the connection closes.
    idle: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection closed and fails every pending request with `reason`. The first
    /// reason wins.
    fn close(&self, reason: &str) {
        let drained: Vec<Pending> = {
            let mut st = self.lock();
            if st.closed.is_none() {
                tracing::debug!("NBD client connection closed: {reason}");
                st.closed = Some(reason.to_owned());
            }
            st.pending.drain().map(|(_, p)| p).collect()
        };
        let reason = self.lock().closed.clone().unwrap_or_default();
        for p in drained {
            let _ = p.tx.send(Err(NbdClientError::Closed(reason.clone())));
        }
        self.idle.notify_waiters();
    }

    /// Removes the request `cookie` if it is still pending.
    fn forget(&self, cookie: u64) {
        let mut st = self.lock();
        st.pending.remove(&cookie);
        if st.pending.is_empty() {
            self.idle.notify_waiters();
        }
    }
}

/// An NBD connection in transmission phase. `Send + Sync`; share it with `Arc`.
pub struct NbdClient {
    size: u64,
    flags: u16,
    shared: Arc<Shared>,
    /// `None` once closed by `disconnect` or after the stream could no longer be framed.
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    next_cookie: AtomicU64,
    reader: JoinHandle<()>,
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("size", &self.size)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

impl NbdClient {
    /// Connects to `addr` and opens `export` with `NBD_OPT_GO`.
    pub async fn connect(addr: SocketAddr, export: &str) -> Result<NbdClient, NbdClientError> {
        let mut sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let (size, flags) = handshake(&mut sock, export).await?;
        tracing::debug!(%addr, export, size, flags, "NBD client in transmission");
        let (rd, wr) = sock.into_split();
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(read_replies(
            BufReader::with_capacity(READ_BUF, rd),
            Arc::clone(&shared),
        ));
        Ok(NbdClient {
            size,
            flags,
            shared,
            writer: tokio::sync::Mutex::new(Some(wr)),
            next_cookie: AtomicU64::new(1),
            reader,
        })
    }

    /// Connects and negotiates like [`NbdClient::connect`] (simple replies only), then hands
    /// back the socket in transmission phase with the export's size and transmission flags,
    /// for a kernel NBD device to take over (`NBD_CMD_CONNECT` / `NBD_CMD_RECONFIGURE`).
    /// Nothing past the server's last handshake reply has been read from it.
    pub async fn handshake_only(
        addr: SocketAddr,
        export: &str,
    ) -> Result<(TcpStream, u64, u16), NbdClientError> {
        let mut sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let (size, flags) = handshake(&mut sock, export).await?;
        Ok((sock, size, flags))
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server sent (`NBD_FLAG_*`).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdClientError> {
        self.check_range("READ", offset, u64::from(len))?;
        self.call(CMD_READ, offset, len, None).await
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), NbdClientError> {
        let len64 = u64::try_from(data.len()).unwrap_or(u64::MAX);
        self.check_range("WRITE", offset, len64)?;
        let len = u32::try_from(data.len()).map_err(|_| NbdClientError::OutOfRange {
            op: "WRITE",
            offset,
            len: len64,
            size: self.size,
        })?;
        self.call(CMD_WRITE, offset, len, Some(data)).await?;
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros; the server must advertise
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<(), NbdClientError> {
        if self.flags & FLAG_SEND_WRITE_ZEROES == 0 {
            return Err(NbdClientError::Unsupported("WRITE_ZEROES"));
        }
        self.check_range("WRITE_ZEROES", offset, u64::from(len))?;
        self.call(CMD_WRITE_ZEROES, offset, len, None).await?;
        Ok(())
    }

    /// Makes every write that completed before it durable; the server must advertise
    /// `NBD_FLAG_SEND_FLUSH`.
    pub async fn flush(&self) -> Result<(), NbdClientError> {
        if self.flags & FLAG_SEND_FLUSH == 0 {
            return Err(NbdClientError::Unsupported("FLUSH"));
        }
        self.call(CMD_FLUSH, 0, 0, None).await?;
        Ok(())
    }

    /// Refuses new requests, waits for the reply of every request in flight, sends
    /// `NBD_CMD_DISC` and closes the connection. Calling it again returns `Ok`.
    pub async fn disconnect(&self) -> Result<(), NbdClientError> {
        self.shared.lock().disconnecting = true;
        loop {
            let idle = self.shared.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let st = self.shared.lock();
                if let Some(reason) = &st.closed {
                    return if reason == DISCONNECTED {
                        Ok(())
                    } else {
                        Err(NbdClientError::Closed(reason.clone()))
                    };
                }
                if st.pending.is_empty() {
                    break;
                }
            }
            idle.await;
        }
        let mut w = self.writer.lock().await;
        let Some(mut wr) = w.take() else {
            // A concurrent disconnect won the race, or the stream was poisoned.
            let reason = self.shared.lock().closed.clone();
            return match reason {
                Some(r) if r != DISCONNECTED => Err(NbdClientError::Closed(r)),
                _ => Ok(()),
            };
        };
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let mut frame = request_header(CMD_DISC, cookie, 0, 0);
        let sent = async {
            wr.write_all_buf(&mut frame).await?;
            wr.shutdown().await
        }
        .await;
        drop(wr);
        self.reader.abort();
        self.shared.close(DISCONNECTED);
        match sent {
            Ok(()) => Ok(()),
            Err(e) => Err(NbdClientError::Closed(format!("sending DISC failed: {e}"))),
        }
    }

    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<(), NbdClientError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(NbdClientError::OutOfRange {
                op,
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Registers a request, sends it and waits for its reply (the data for READ).
    async fn call(
        &self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: Option<Bytes>,
    ) -> Result<Bytes, NbdClientError> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if let Some(reason) = &st.closed {
                return Err(NbdClientError::Closed(reason.clone()));
            }
            if st.disconnecting {
                return Err(NbdClientError::Closed(DISCONNECTED.into()));
            }
            st.pending.insert(
                cookie,
                Pending {
                    cmd,
                    offset,
                    len,
                    tx,
                },
            );
        }
        let mut guard = SendGuard {
            client: self,
            cookie,
            stage: Stage::Queued,
        };
        {
            let mut w = self.writer.lock().await;
            let closed = self.shared.lock().closed.clone();
            let wr = match (closed, w.as_mut()) {
                (None, Some(wr)) => wr,
                (closed, _) => {
                    // Drop the write half so the server sees the close too.
                    *w = None;
                    guard.stage = Stage::Done;
                    self.shared.forget(cookie);
                    return Err(NbdClientError::Closed(
                        closed.unwrap_or_else(|| DISCONNECTED.into()),
                    ));
                }
            };
            guard.stage = Stage::Sending;
            let mut frame =
                request_header(cmd, cookie, offset, len).chain(payload.unwrap_or_default());
            if let Err(e) = wr.write_all_buf(&mut frame).await {
                *w = None;
                guard.stage = Stage::Done;
                let reason = format!("sending {} failed: {e}", cmd_name(cmd));
                self.reader.abort();
                self.shared.close(&reason);
                return Err(NbdClientError::Closed(reason));
            }
            guard.stage = Stage::Done;
        }
        match rx.await {
            Ok(reply) => reply,
            // The reader drops senders only after failing them, so this is a lost race
            // with close: report the reason it recorded.
            Err(_) => Err(NbdClientError::Closed(
                self.shared.lock().closed.clone().unwrap_or_default(),
            )),
        }
    }
}

#[derive(PartialEq)]
enum Stage {
    /// Registered, not a byte sent: cancelling forgets the request.
    Queued,
    /// Partly sent: cancelling leaves the stream unframeable, so it closes the connection.
    Sending,
    /// Sent whole (or already cleaned up): the reader owns the rest.
    Done,
}

/// Cleans up after a request future dropped before its frame was sent whole.
struct SendGuard<'a> {
    client: &'a NbdClient,
    cookie: u64,
    stage: Stage,
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        match self.stage {
            Stage::Queued => self.client.shared.forget(self.cookie),
            Stage::Sending => {
                self.client.reader.abort();
                self.client
                    .shared
                    .close("a request was cancelled while being sent");
                // Best effort: the writer lock was released just before this guard drops.
                if let Ok(mut w) = self.client.writer.try_lock() {
                    *w = None;
                }
            }
            Stage::Done => {}
        }
    }
}

fn request_header(cmd: u16, cookie: u64, offset: u64, len: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(REQUEST_LEN);
    b.put_u32(REQUEST_MAGIC);
    b.put_u16(0);
    b.put_u16(cmd);
    b.put_u64(cookie);
    b.put_u64(offset);
    b.put_u32(len);
    b.freeze()
}

/// The reader task: completes pending requests until the connection ends, then fails the
/// rest.
async fn read_replies<R: AsyncRead + Unpin>(mut rd: R, shared: Arc<Shared>) {
    let reason = match read_loop(&mut rd, &shared).await {
        Ok(()) => "the server closed the connection".to_owned(),
        Err(e) => e,
    };
    shared.close(&reason);
}

/// Reads replies until a clean end of stream (`Ok`) or a failure (its reason).
async fn read_loop<R: AsyncRead + Unpin>(rd: &mut R, shared: &Shared) -> Result<(), String> {
    let mut hdr = [0u8; SIMPLE_REPLY_LEN];
    loop {
        // A close between replies is clean; inside one it is truncation.
        let n = rd
            .read(&mut hdr)
            .await
            .map_err(|e| format!("reading reply: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        rd.read_exact(&mut hdr[n..])
            .await
            .map_err(|e| format!("reading reply header: {e}"))?;
        let mut h = &hdr[..];
        let magic = h.get_u32();
        let errno = h.get_u32();
        let cookie = h.get_u64();
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(format!("bad reply magic {magic:#010x}"));
        }
        let Some(p) = shared.lock().pending.remove(&cookie) else {
            return Err(format!("reply for unknown cookie {cookie}"));
        };
        let reply = if errno != 0 {
            Err(NbdClientError::Server {
                errno,
                op: cmd_name(p.cmd),
                offset: p.offset,
                len: u64::from(p.len),
            })
        } else if p.cmd == CMD_READ {
            let len = usize::try_from(p.len).map_err(|_| "read length overflows usize")?;
            let mut data = BytesMut::zeroed(len);
            if let Err(e) = rd.read_exact(&mut data).await {
                let reason = format!("reading READ payload: {e}");
                // Not pending any more, so `close` would miss it.
                let _ = p.tx.send(Err(NbdClientError::Closed(reason.clone())));
                return Err(reason);
            }
            Ok(data.freeze())
        } else {
            Ok(Bytes::new())
        };
        // The requester may have given up waiting; its reply is dropped.
        let _ = p.tx.send(reply);
        if shared.lock().pending.is_empty() {
            shared.idle.notify_waiters();
        }
    }
}

// ------------------------------------------------------------------ handshake

/// Fixed newstyle handshake and `NBD_OPT_GO`; returns the export size and transmission flags.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
) -> Result<(u64, u16), NbdClientError> {
    let magic = s.read_u64().await?;
    if magic != NBDMAGIC {
        return Err(NbdClientError::Protocol(format!(
            "bad server magic {magic:#018x}"
        )));
    }
    let magic = s.read_u64().await?;
    if magic != IHAVEOPT {
        return Err(NbdClientError::Protocol(format!(
            "not a newstyle server (magic {magic:#018x})"
        )));
    }
    let server_flags = s.read_u16().await?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdClientError::Protocol(
            "server does not offer fixed newstyle negotiation".into(),
        ));
    }
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    let name_len = u32::try_from(export.len())
        .ok()
        .filter(|_| export.len() <= MAX_STRING_LEN)
        .ok_or_else(|| NbdClientError::Protocol("export name longer than 4096 bytes".into()))?;
    let mut out = BytesMut::new();
    out.put_u32(client_flags);
    out.put_u64(IHAVEOPT);
    out.put_u32(OPT_GO);
    // Name length, name, and zero information requests.
    out.put_u32(4 + name_len + 2);
    out.put_u32(name_len);
    out.put_slice(export.as_bytes());
    out.put_u16(0);
    s.write_all(&out).await?;
    s.flush().await?;

    let mut export_info = None;
    loop {
        let magic = s.read_u64().await?;
        if magic != OPT_REPLY_MAGIC {
            return Err(NbdClientError::Protocol(format!(
                "bad option reply magic {magic:#018x}"
            )));
        }
        let opt = s.read_u32().await?;
        let rep = s.read_u32().await?;
        let len = s.read_u32().await?;
        if opt != OPT_GO {
            return Err(NbdClientError::Protocol(format!(
                "reply to option {opt}, expected GO"
            )));
        }
        if len > MAX_OPT_REPLY {
            return Err(NbdClientError::Protocol(format!(
                "option reply of {len} bytes"
            )));
        }
        let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
        s.read_exact(&mut data).await?;
        match rep {
            REP_ACK => break,
            REP_INFO => {
                if data.len() < 2 {
                    return Err(NbdClientError::Protocol(
                        "NBD_REP_INFO without a type".into(),
                    ));
                }
                let mut d = &data[..];
                if d.get_u16() == INFO_EXPORT {
                    if d.len() != 10 {
                        return Err(NbdClientError::Protocol(format!(
                            "NBD_INFO_EXPORT of {} bytes",
                            data.len()
                        )));
                    }
                    export_info = Some((d.get_u64(), d.get_u16()));
                }
            }
            _ if rep & (1 << 31) != 0 => {
                let text = String::from_utf8_lossy(&data).into_owned();
                tracing::debug!(
                    export,
                    rep = format!("{rep:#x}"),
                    "NBD_OPT_GO refused: {text}"
                );
                let text = if text.is_empty() {
                    format!("error {rep:#x} for export {export:?}")
                } else {
                    text
                };
                return Err(NbdClientError::Refused(text));
            }
            _ => tracing::debug!(rep, "ignoring NBD_OPT_GO reply type"),
        }
    }
    export_info.ok_or_else(|| NbdClientError::Protocol("NBD_OPT_GO without NBD_INFO_EXPORT".into()))
}
