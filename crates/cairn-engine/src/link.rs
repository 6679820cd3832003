//! One engine's connection to one replica server.
//!
//! `submit` is synchronous and FIFO: requests reach the replica in exactly the order they
//! were submitted (one writer task drains the queue into the socket, batching whatever is
//! queued into one write). The replica answers in order; a reader task matches replies to
//! requests by id. When the connection breaks or `close` is called, every pending and later
//! request completes with `LinkError::Closed`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use cairn_wire::{
    FrameDecoder, Reply, ReplyBody, ReplyError, Request, StatusBody, DEFAULT_MAX_FRAME,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Why a request to one replica did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("connection to replica closed: {0}")]
    Closed(String),
    #[error("replica did not answer in time")]
    Timeout,
    #[error("replica refused: {0}")]
    Remote(ReplyError),
}

type ReplyTx = oneshot::Sender<Result<ReplyBody, LinkError>>;

/// Requests waiting for replies, and why the link closed once it has: after that, new
/// requests fail at once instead of waiting for a reply that cannot come.
#[derive(Default)]
struct PendingState {
    map: HashMap<u64, ReplyTx>,
    closed: Option<String>,
    /// Told once, when the link closes.
    on_close: Option<oneshot::Sender<String>>,
}

type Pending = Arc<Mutex<PendingState>>;

struct Outgoing {
    req: Request,
    reply: oneshot::Sender<Result<ReplyBody, LinkError>>,
}

/// A live connection to one replica.
pub struct Link {
    /// Unique among the links of this process.
    pub id: u64,
    tx: mpsc::UnboundedSender<Outgoing>,
    tasks: Vec<JoinHandle<()>>,
    pending: Pending,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close("link dropped");
    }
}

fn fail_all(pending: &Pending, why: &str) {
    let drained: Vec<_> = {
        let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
        p.closed.get_or_insert_with(|| why.to_owned());
        if let Some(tx) = p.on_close.take() {
            let _ = tx.send(why.to_owned());
        }
        p.map.drain().collect()
    };
    for (_, tx) in drained {
        let _ = tx.send(Err(LinkError::Closed(why.to_owned())));
    }
}

impl Link {
    /// Connects and attaches to `volume`/`replica_id` at `epoch` (creating the replica with
    /// `size` bytes if it does not exist). With `takeover`, the replica refuses every frame
    /// of sessions attached before this one (a stalled connection of ours cannot replay
    /// writes later). Returns the replica's status.
    pub async fn connect(
        addr: SocketAddr,
        volume: &str,
        replica_id: &str,
        size: u64,
        epoch: u64,
        takeover: bool,
    ) -> Result<(Link, StatusBody), LinkError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| LinkError::Closed(format!("connect {addr}: {e}")))?;
        stream
            .set_nodelay(true)
            .map_err(|e| LinkError::Closed(e.to_string()))?;
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        let pending: Pending = Arc::new(Mutex::new(PendingState::default()));

        let wp = pending.clone();
        let writer = tokio::spawn(async move {
            let mut next_id = 1u64;
            let mut buf = BytesMut::with_capacity(1 << 20);
            while let Some(first) = rx.recv().await {
                buf.clear();
                let mut batch = vec![first];
                while batch.len() < 256 {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                {
                    let mut p = wp.lock().unwrap_or_else(|p| p.into_inner());
                    for m in batch {
                        let id = next_id;
                        next_id += 1;
                        if let Some(why) = &p.closed {
                            let _ = m.reply.send(Err(LinkError::Closed(why.clone())));
                            continue;
                        }
                        match m.req.try_encode(id, epoch, &mut buf) {
                            Ok(()) => {
                                p.map.insert(id, m.reply);
                            }
                            Err(e) => {
                                let _ = m.reply.send(Err(LinkError::Closed(format!(
                                    "request does not encode: {e}"
                                ))));
                            }
                        }
                    }
                }
                if let Err(e) = wr.write_all(&buf).await {
                    fail_all(&wp, &format!("send: {e}"));
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });

        let rp = pending.clone();
        let reader = tokio::spawn(async move {
            let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
            let mut buf = BytesMut::with_capacity(1 << 20);
            let why = loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        let reply = match Reply::decode(&frame) {
                            Ok(r) => r,
                            Err(e) => break format!("bad reply: {e}"),
                        };
                        let tx = rp
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .map
                            .remove(&reply.request_id);
                        if let Some(tx) = tx {
                            let _ = tx.send(reply.result.map_err(LinkError::Remote));
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => break format!("bad frame from replica: {e}"),
                }
                if buf.capacity() - buf.len() < 64 * 1024 {
                    buf.reserve(1 << 20);
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) => break "replica closed the connection".to_owned(),
                    Ok(_) => {}
                    Err(e) => break format!("receive: {e}"),
                }
            };
            fail_all(&rp, &why);
        });

        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let link = Link {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            tx,
            tasks: vec![writer, reader],
            pending,
        };
        let status = match link
            .submit(Request::Hello {
                volume: volume.to_owned(),
                replica_id: replica_id.to_owned(),
                create_size: size,
                takeover,
            })
            .await
        {
            Ok(ReplyBody::Status(s)) => s,
            Ok(other) => {
                return Err(LinkError::Closed(format!(
                    "unexpected Hello reply {other:?}"
                )));
            }
            Err(e) => return Err(e),
        };
        Ok((link, status))
    }

    /// Queues `req`; the returned future completes with its reply.
    pub fn submit(
        &self,
        req: Request,
    ) -> impl std::future::Future<Output = Result<ReplyBody, LinkError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let queued = self.tx.send(Outgoing { req, reply }).is_ok();
        async move {
            if !queued {
                return Err(LinkError::Closed("link is closed".into()));
            }
            rx.await
                .unwrap_or_else(|_| Err(LinkError::Closed("link is closed".into())))
        }
    }

    /// Completes with the reason when the connection breaks or is closed (at once if it
    /// already is). Only the first caller is told.
    pub fn closed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match &p.closed {
                Some(why) => {
                    let _ = tx.send(why.clone());
                }
                None => p.on_close = Some(tx),
            }
        }
        async move { rx.await.unwrap_or_else(|_| "link dropped".to_owned()) }
    }

    /// Closes the connection; pending requests fail.
    pub fn close(&mut self, why: &str) {
        for t in &self.tasks {
            t.abort();
        }
        fail_all(&self.pending, why);
    }
}
