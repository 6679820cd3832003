//! `cairn-nbd`: an NBD server (fixed newstyle handshake) on tokio, serving any
//! [`cairn_blockdev::BlockDevice`] as a named export.
//!
//! Protocol reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>;
//! where the spec leaves a choice (errnos, limits), the server follows nbdkit
//! (`server/protocol.c`, `server/protocol-handshake-newstyle.c`, the blocksize-policy filter).
//!
//! # Handshake
//! The server offers `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`; client flags other than
//! `NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES` close the connection, and a client that
//! did not set `C_FIXED_NEWSTYLE` may only send `NBD_OPT_EXPORT_NAME`. Options:
//! - `NBD_OPT_GO` / `NBD_OPT_INFO`: `NBD_INFO_EXPORT` (size, transmission flags) and
//!   `NBD_INFO_BLOCK_SIZE` (minimum = preferred = the device block size, 4096 for Cairn;
//!   maximum = `max_io`, capped at 1 GiB) always; `NBD_INFO_NAME` and
//!   `NBD_INFO_DESCRIPTION` when asked. Unknown export: `NBD_REP_ERR_UNKNOWN`.
//! - `NBD_OPT_EXPORT_NAME`: size and flags (plus 124 zero bytes unless `C_NO_ZEROES`); an
//!   unknown export closes the connection, as the protocol has no way to refuse.
//! - `NBD_OPT_LIST` (one `NBD_REP_SERVER` per export: name, then description),
//!   `NBD_OPT_ABORT`, `NBD_OPT_STRUCTURED_REPLY`.
//! - `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` for `base:allocation` (LIST
//!   also matches `base:` and the empty query list); both need structured replies first,
//!   else `NBD_REP_ERR_INVALID`; unknown export: `NBD_REP_ERR_UNKNOWN`.
//! - Anything else (`STARTTLS`, `EXTENDED_HEADERS`, ...): `NBD_REP_ERR_UNSUP`.
//! - The empty export name means the first export added.
//! - Option data over 64 KiB is skipped and refused with `NBD_REP_ERR_TOO_BIG`; over 1 MiB
//!   (or any oversized `EXPORT_NAME`) closes the connection.
//!
//! # Transmission
//! Flags: `HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES`, plus `SEND_DF`
//! with structured replies and `CAN_MULTI_CONN` when [`BlockDevice::multi_conn`] says so.
//! Commands: READ (simple reply, or one `OFFSET_DATA` chunk with structured replies, so DF
//! always holds), WRITE (FUA), FLUSH, TRIM (FUA), WRITE_ZEROES (FUA, NO_HOLE), DISC (answers
//! every request already read, then closes), BLOCK_STATUS on `base:allocation` (descriptors
//! from [`BlockDevice::allocated`]: 0 for data, `HOLE|ZERO` = 3 for holes; never beyond the
//! requested range; one descriptor with REQ_ONE; at most 16384). Not supported: CACHE,
//! FAST_ZERO, RESIZE, extended headers, TLS.
//!
//! Each request is decoded, validated, executed, then answered. A connection executes up to
//! 64 requests concurrently and replies out of order; one writer sends whole reply frames.
//! With structured replies, every error is an `NBD_REPLY_TYPE_ERROR` chunk carrying a
//! message; without, a simple reply.
//!
//! # Errors
//! | condition                                               | errno |
//! |---------------------------------------------------------|-------|
//! | unknown command, unknown flag, flag not valid for the command, DF without structured replies | EINVAL |
//! | FLUSH with nonzero offset or length                     | EINVAL |
//! | BLOCK_STATUS without structured replies + `base:allocation` | EINVAL |
//! | zero length (READ, WRITE, TRIM, WRITE_ZEROES, BLOCK_STATUS) | EINVAL |
//! | beyond the end of the export (`checked_add`): WRITE, WRITE_ZEROES | ENOSPC |
//! | beyond the end: READ, TRIM, BLOCK_STATUS                 | EINVAL |
//! | offset or length not a multiple of the minimum block size | EINVAL |
//! | READ/WRITE longer than the maximum block size           | EINVAL |
//! | device `OutOfRange`                                     | as "beyond the end" |
//! | device `Misaligned`                                     | EINVAL |
//! | device `NoSpace`                                        | ENOSPC |
//! | device `TooLarge`                                       | EOVERFLOW if DF was set, else EINVAL |
//! | device `Io`                                             | EIO |
//!
//! Checks run in nbdkit's order (range, flags, negotiation, alignment, size), so a request
//! that is both misaligned and out of range gets the range error. The mapping lives in one
//! function (`request::errno`). A refused WRITE's payload is read and discarded, keeping the
//! connection usable, if it is at most 64 MiB (or the maximum block size); a larger one
//! closes the connection.
//!
//! # Closing
//! A malformed stream (bad option or request magic, truncated header or payload, absurd
//! lengths, unknown client flags) closes that connection only: [`NbdServer::handle_connection`]
//! returns the [`NbdError`] and [`NbdServer::serve`] logs it with `tracing`.

use std::sync::Arc;

use cairn_blockdev::BlockDevice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufStream};
use tokio::net::TcpListener;
use tracing::Instrument;

pub mod client;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod handshake;
mod negotiate;
mod proto;
mod reply;
mod request;
mod transmission;

pub use client::{NbdClient, NbdClientError};
use negotiate::ExportMeta;
use request::Limits;

/// Largest maximum block size advertised, whatever the device accepts: keeps every READ
/// reply in one structured chunk (whose length field is 32 bits).
const MAX_IO_CAP: u32 = 1 << 30;
/// Socket buffer sizes for a connection.
const IO_BUF: usize = 64 << 10;

/// Why a connection ended abnormally. Every variant closes only the connection it
/// happened on.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("client closed the connection in the middle of the {0}")]
    Truncated(&'static str),
    #[error("client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} sent without fixed newstyle negotiation")]
    NotFixedNewstyle { option: u32 },
    #[error("option {option} carries {len} bytes, more than the server accepts")]
    OptionTooLarge { option: u32, len: u32 },
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error("refused write carries {len} bytes, too many to skip")]
    PayloadTooLarge { len: u32 },
}

struct Export<D> {
    name: String,
    description: String,
    dev: Arc<D>,
}

impl<D: BlockDevice> Export<D> {
    /// Samples what negotiation needs from the device.
    fn meta(&self) -> ExportMeta {
        let block = self.dev.block_size().max(1);
        let max_io = self.dev.max_io().min(MAX_IO_CAP);
        let max_io = (max_io - max_io % block).max(block);
        ExportMeta {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.dev.size(),
            block,
            max_io,
            multi_conn: self.dev.multi_conn(),
        }
    }
}

/// An NBD server with a set of named exports, which may change while it serves: a client
/// sees the exports as they are when its handshake starts, sizes included. A device that
/// grows (a volume expanded online) is seen at its new size by new connections only: NBD
/// cannot tell an open connection, which keeps its handshake's size (tests/resize.rs).
pub struct NbdServer<D: BlockDevice> {
    exports: std::sync::RwLock<Vec<Export<D>>>,
}

impl<D: BlockDevice> Default for NbdServer<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: BlockDevice> NbdServer<D> {
    /// A server with no exports.
    pub fn new() -> Self {
        NbdServer {
            exports: std::sync::RwLock::new(Vec::new()),
        }
    }

    /// Adds an export. The first one added is also the default export (empty name).
    ///
    /// # Panics
    /// If `name` is already exported, or is longer than the protocol's 4096-byte limit.
    pub fn add_export(&mut self, name: &str, description: &str, dev: Arc<D>) {
        if let Err(e) = self.insert_export(name, description, dev) {
            panic!("{e}");
        }
    }

    /// Adds an export to a running server; new handshakes see it. Refused when `name` is
    /// already exported or a string is longer than the protocol's 4096-byte limit.
    pub fn insert_export(&self, name: &str, description: &str, dev: Arc<D>) -> Result<(), String> {
        if name.len() > proto::MAX_STRING_LEN || description.len() > proto::MAX_STRING_LEN {
            return Err("NBD export name and description are limited to 4096 bytes".into());
        }
        let mut exports = self.exports.write().unwrap_or_else(|p| p.into_inner());
        if exports.iter().any(|e| e.name == name) {
            return Err(format!("NBD export {name:?} added twice"));
        }
        exports.push(Export {
            name: name.to_owned(),
            description: description.to_owned(),
            dev,
        });
        Ok(())
    }

    /// Removes an export; new handshakes no longer see it (connections already in
    /// transmission keep their device). Returns whether it existed.
    pub fn remove_export(&self, name: &str) -> bool {
        let mut exports = self.exports.write().unwrap_or_else(|p| p.into_inner());
        let before = exports.len();
        exports.retain(|e| e.name != name);
        exports.len() != before
    }

    /// Names of the current exports, in the order they were added.
    pub fn export_names(&self) -> Vec<String> {
        let exports = self.exports.read().unwrap_or_else(|p| p.into_inner());
        exports.iter().map(|e| e.name.clone()).collect()
    }

    /// Accepts connections until the listener fails, serving each in its own task. Transient
    /// accept errors (connection aborted or reset before accept) are logged and skipped.
    /// Dropping the returned future closes every connection it accepted.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            // Reap finished connection tasks so the set does not grow.
            while conns.try_join_next().is_some() {}
            let (sock, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    tracing::debug!("accept: {e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Err(e) = sock.set_nodelay(true) {
                tracing::debug!(%peer, "set_nodelay: {e}");
            }
            let server = Arc::clone(&self);
            let span = tracing::info_span!("nbd", %peer);
            conns.spawn(
                async move {
                    tracing::debug!("connected");
                    match server.handle_connection(sock).await {
                        Ok(()) => tracing::debug!("disconnected"),
                        Err(e) => tracing::warn!("connection closed: {e}"),
                    }
                }
                .instrument(span),
            );
        }
    }

    /// Serves one client on `stream` from the handshake to disconnection.
    pub async fn handle_connection<S>(self: &Arc<Self>, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (metas, devs): (Vec<ExportMeta>, Vec<Arc<D>>) = {
            let exports = self.exports.read().unwrap_or_else(|p| p.into_inner());
            exports
                .iter()
                .map(|e| (e.meta(), Arc::clone(&e.dev)))
                .unzip()
        };
        let mut io = BufStream::with_capacity(IO_BUF, IO_BUF, stream);
        let Some((idx, neg)) = handshake::negotiate(&mut io, &metas).await? else {
            return Ok(());
        };
        let meta = &metas[idx];
        tracing::debug!(export = %meta.name, structured = neg.structured(), "transmission");
        let session = transmission::Session {
            dev: Arc::clone(&devs[idx]),
            limits: Limits {
                size: meta.size,
                block: meta.block,
                max_io: meta.max_io,
                structured: neg.structured(),
                base_allocation: neg.base_allocation(idx),
            },
        };
        transmission::run(io, session).await
    }
}

/// Fills `buf`; end of input anywhere is a truncated `what`.
async fn read_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), NbdError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(NbdError::Truncated(what)),
        Err(e) => Err(e.into()),
    }
}

/// Fills `buf`, or returns `false` if input ended before its first byte (a clean close).
async fn read_exact_or_eof<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<bool, NbdError> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(false)
            } else {
                Err(NbdError::Truncated(what))
            };
        }
        filled += n;
    }
    Ok(true)
}

/// Reads and discards `n` bytes.
async fn skip<R: AsyncRead + Unpin>(r: &mut R, n: u64, what: &'static str) -> Result<(), NbdError> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(NbdError::Truncated(what));
    }
    Ok(())
}
