//! The transmission phase of one connection: a reader that decodes, validates and dispatches
//! requests, tasks that execute them on the device concurrently, and a single writer that
//! sends replies (possibly out of order, matched by cookie).
//!
//! Guarantees:
//! - reply frames never interleave: only the writer touches the write half, and each reply
//!   is one channel message written whole;
//! - at most [`MAX_IN_FLIGHT`] requests and [`MAX_IN_FLIGHT_BYTES`] (or one maximum-size
//!   request, if larger) of READ/WRITE data are in flight per connection; a permit is held
//!   from before a write's payload is read until its reply has been written, so a client
//!   that stops reading replies stops being read from;
//! - a request that fails validation never reaches the device; a refused WRITE has its
//!   payload skipped so the connection stays usable, unless the payload exceeds
//!   [`MAX_WRITE_DRAIN`] (and the maximum block size), which closes the connection;
//! - on `NBD_CMD_DISC` or end of input, every request already read is executed and answered
//!   before the connection closes. On a protocol error (bad magic, truncated header or
//!   payload, oversized payload) the connection closes at once; device calls already started
//!   still run to completion in their own tasks, their replies discarded.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use cairn_blockdev::{BlockDevice, DevError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::proto::{cmd_name, CMD_WRITE, META_BASE_ALLOCATION_ID, REQUEST_LEN};
use crate::reply;
use crate::request::{errno, validate, Failure, Limits, RawRequest, Request};
use crate::{read_exact, read_exact_or_eof, skip, NbdError};

/// Requests a connection executes at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// READ/WRITE bytes a connection holds in memory at once (raised to the maximum block size
/// if that is larger, so any valid request can proceed).
pub const MAX_IN_FLIGHT_BYTES: u32 = 128 << 20;
/// Largest refused WRITE payload that is skipped rather than closing the connection (nbdkit
/// skips up to twice its 32 MiB request limit).
pub const MAX_WRITE_DRAIN: u32 = 64 << 20;

/// What transmission needs: the device and the negotiated limits.
pub struct Session<D> {
    pub dev: Arc<D>,
    pub limits: Limits,
}

/// One reply frame for the writer, with the permits it releases once written.
struct Outgoing {
    header: Bytes,
    data: Option<Bytes>,
    _permits: Option<Permits>,
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    fn new(header: Bytes) -> Outgoing {
        Outgoing {
            header,
            data: None,
            _permits: None,
        }
    }
}

/// Runs transmission until DISC, end of input, or an error.
pub async fn run<S, D>(io: S, session: Session<D>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    D: BlockDevice,
{
    let (rd, wr) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT + 16);
    let reader = read_loop(rd, tx, &session);
    let writer = write_loop(wr, rx);
    tokio::pin!(reader, writer);
    tokio::select! {
        r = &mut reader => match r {
            // The reader dropped its sender: the writer ends once every in-flight reply is out.
            Ok(()) => writer.await,
            Err(e) => Err(e),
        },
        w = &mut writer => match w {
            Ok(()) => reader.await,
            Err(e) => Err(e),
        },
    }
}

async fn read_loop<R, D>(
    mut rd: R,
    tx: mpsc::Sender<Outgoing>,
    s: &Session<D>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    D: BlockDevice,
{
    let limits = s.limits;
    let requests = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let budget = MAX_IN_FLIGHT_BYTES.max(limits.max_io);
    let bytes = Arc::new(Semaphore::new(
        usize::try_from(budget).unwrap_or(usize::MAX),
    ));
    let max_drain = MAX_WRITE_DRAIN.max(limits.max_io);
    loop {
        let mut head = [0u8; REQUEST_LEN];
        if !read_exact_or_eof(&mut rd, &mut head, "request header").await? {
            tracing::debug!("client closed the connection");
            return Ok(());
        }
        let raw = RawRequest::decode(&head).map_err(NbdError::BadRequestMagic)?;
        let req = match validate(&raw, &limits) {
            Ok(req) => req,
            Err(invalid) => {
                if raw.cmd == CMD_WRITE {
                    if raw.len > max_drain {
                        return Err(NbdError::PayloadTooLarge { len: raw.len });
                    }
                    skip(&mut rd, u64::from(raw.len), "write payload").await?;
                }
                tracing::debug!(
                    cmd = cmd_name(raw.cmd),
                    flags = raw.flags,
                    offset = raw.offset,
                    len = raw.len,
                    "request refused: {invalid}"
                );
                let out = failure_reply(&raw, &Failure::Invalid(invalid), limits.structured);
                if tx.send(out).await.is_err() {
                    return Ok(()); // the writer failed; run() reports its error
                }
                continue;
            }
        };
        if req == Request::Disc {
            tracing::debug!("client sent DISC");
            return Ok(());
        }

        let Ok(request_permit) = requests.clone().acquire_owned().await else {
            return Ok(());
        };
        let data_len = match req {
            Request::Read { len, .. } | Request::Write { len, .. } => len,
            _ => 0,
        };
        let bytes_permit = if data_len > 0 {
            let Ok(p) = bytes.clone().acquire_many_owned(data_len).await else {
                return Ok(());
            };
            Some(p)
        } else {
            None
        };
        let payload = if let Request::Write { len, .. } = req {
            let mut buf = BytesMut::zeroed(usize::try_from(len).unwrap_or_default());
            read_exact(&mut rd, &mut buf, "write payload").await?;
            Some(buf.freeze())
        } else {
            None
        };
        let permits = Permits {
            _request: request_permit,
            _bytes: bytes_permit,
        };
        let dev = Arc::clone(&s.dev);
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut out = execute(&*dev, &raw, req, payload, limits.structured).await;
            out._permits = Some(permits);
            // A send error means the connection is gone; the reply has nowhere to go.
            let _ = tx.send(out).await;
        });
    }
}

/// Executes a validated request and builds its reply.
async fn execute<D: BlockDevice>(
    dev: &D,
    raw: &RawRequest,
    req: Request,
    payload: Option<Bytes>,
    structured: bool,
) -> Outgoing {
    let cookie = raw.cookie;
    let ok = || Outgoing::new(reply::simple(cookie, None));
    let result: Result<Outgoing, DevError> = match req {
        Request::Read { offset, len, .. } => match dev.read(offset, len).await {
            Ok(data) if data.len() as u64 == u64::from(len) => Ok(Outgoing {
                header: if structured {
                    reply::offset_data(cookie, offset, len)
                } else {
                    reply::simple(cookie, None)
                },
                data: Some(data),
                _permits: None,
            }),
            Ok(data) => Err(DevError::Io(format!(
                "device returned {} bytes for a {len}-byte read",
                data.len()
            ))),
            Err(e) => Err(e),
        },
        Request::Write { offset, fua, .. } => dev
            .write(offset, payload.unwrap_or_default(), fua)
            .await
            .map(|()| ok()),
        Request::Flush => dev.flush().await.map(|()| ok()),
        Request::Trim { offset, len, fua } => {
            dev.trim(offset, u64::from(len), fua).await.map(|()| ok())
        }
        Request::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
        } => dev
            .write_zeroes(offset, u64::from(len), fua, no_hole)
            .await
            .map(|()| ok()),
        Request::BlockStatus {
            offset,
            len,
            req_one,
        } => dev.allocated(offset, u64::from(len)).await.map(|extents| {
            let d = reply::descriptors(offset, len, &extents, req_one);
            Outgoing::new(reply::block_status(cookie, META_BASE_ALLOCATION_ID, &d))
        }),
        // Never dispatched: the reader stops on DISC.
        Request::Disc => Ok(ok()),
    };
    result.unwrap_or_else(|e| {
        tracing::warn!(
            cmd = cmd_name(raw.cmd),
            offset = raw.offset,
            len = raw.len,
            "device error: {e}"
        );
        failure_reply(raw, &Failure::Device(e), structured)
    })
}

/// The error reply for a failed request: an ERROR chunk with a message when structured
/// replies are on (required for READ, preferred by the spec for the rest), else a simple reply.
fn failure_reply(raw: &RawRequest, failure: &Failure, structured: bool) -> Outgoing {
    let code = errno(failure, raw.cmd, raw.flags);
    Outgoing::new(if structured {
        reply::error_chunk(raw.cookie, code, &failure.to_string())
    } else {
        reply::simple(raw.cookie, Some(code))
    })
}

async fn write_loop<W>(mut wr: W, mut rx: mpsc::Receiver<Outgoing>) -> Result<(), NbdError>
where
    W: AsyncWrite + Unpin,
{
    async fn send<W: AsyncWrite + Unpin>(wr: &mut W, out: Outgoing) -> std::io::Result<()> {
        wr.write_all(&out.header).await?;
        if let Some(data) = &out.data {
            wr.write_all(data).await?;
        }
        Ok(()) // `out` (and its permits) dropped here, after the frame is written
    }
    while let Some(first) = rx.recv().await {
        send(&mut wr, first).await?;
        while let Ok(next) = rx.try_recv() {
            send(&mut wr, next).await?;
        }
        wr.flush().await?;
    }
    if let Err(e) = wr.shutdown().await {
        tracing::debug!("shutdown after the last reply failed: {e}");
    }
    Ok(())
}
