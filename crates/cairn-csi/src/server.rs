//! Serving the CSI Identity, Controller and Node services on a Unix socket.
//!
//! Guarantees:
//! - [`parse_endpoint`] accepts exactly `unix:///abs/path`, `unix:/abs/path` and a bare
//!   absolute path that fits in a `sockaddr_un`, and never panics.
//! - [`CsiServer::serve_unix`] replaces a stale socket left by a previous run, refuses to
//!   delete anything that is not a socket or a socket a live server still answers on, and
//!   removes its own socket when it returns.
//! - Every RPC is logged through `tracing` with its method, gRPC status code and duration
//!   (info for calls that change something, debug for read-only ones); request and
//!   response bodies are never logged, since CSI requests carry secrets.
//! - Requests whose `:authority` is not a valid HTTP authority are served, not reset.
//!   kubelet and the CSI sidecars are grpc-go clients that, depending on their version
//!   and how the endpoint was written, send `localhost`, the socket path
//!   (`/csi/csi.sock`), its percent-encoding (`%2Fcsi%2Fcsi.sock`) or an empty value.
//!   h2 (under tonic) resets a stream whose `:authority` does not parse as an authority,
//!   with no hook to relax it, so each connection's client-to-server bytes pass through
//!   [`AuthorityFix`], which re-encodes every request header block and replaces an
//!   invalid `:authority` with `localhost`.
//!
//! Assumes the peer speaks HTTP/2 with prior knowledge (gRPC does) and the server keeps
//! h2's default SETTINGS_MAX_FRAME_SIZE (16 KiB), the largest frame [`AuthorityFix`]
//! emits.

use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;
use tonic::codegen::http;
use tonic::transport::server::{Connected, Router, UdsConnectInfo};
use tower_layer::{Identity as NoLayer, Layer, Stack};

use crate::pb::controller_server::{Controller, ControllerServer};
use crate::pb::identity_server::{Identity, IdentityServer};
use crate::pb::node_server::{Node, NodeServer};

/// The longest socket path Linux binds: `sun_path` is 108 bytes with the trailing NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Why a `--csi-endpoint` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("empty CSI endpoint")]
    Empty,
    #[error(
        "CSI endpoint {0:?}: only unix sockets are served (unix:///path, unix:/path or /path)"
    )]
    UnsupportedScheme(String),
    #[error("CSI endpoint {0:?}: the socket path must be absolute")]
    NotAbsolute(String),
    #[error("CSI endpoint {0:?}: the socket path must not end with '/'")]
    Directory(String),
    #[error("CSI endpoint {0:?}: the socket path contains a NUL byte")]
    Nul(String),
    #[error("CSI endpoint {0:?}: socket paths are at most {MAX_SOCKET_PATH} bytes")]
    TooLong(String),
}

/// Parses a CSI endpoint (`unix:///csi/csi.sock`, `unix:/csi/csi.sock` or `/csi/csi.sock`)
/// into the socket path.
pub fn parse_endpoint(s: &str) -> Result<PathBuf, EndpointError> {
    if s.is_empty() {
        return Err(EndpointError::Empty);
    }
    let path = if let Some(rest) = s.strip_prefix("unix://") {
        // `unix://host/path` would name a host; only the empty host is meaningful here,
        // and the NotAbsolute check below refuses the rest.
        rest
    } else if let Some(rest) = s.strip_prefix("unix:") {
        rest
    } else if s.starts_with('/') {
        s
    } else if s.contains("://")
        || s.split_once(':')
            .is_some_and(|(scheme, _)| !scheme.contains('/'))
    {
        return Err(EndpointError::UnsupportedScheme(s.to_owned()));
    } else {
        return Err(EndpointError::NotAbsolute(s.to_owned()));
    };
    if !path.starts_with('/') {
        return Err(EndpointError::NotAbsolute(s.to_owned()));
    }
    if path.contains('\0') {
        return Err(EndpointError::Nul(s.to_owned()));
    }
    if path.ends_with('/') {
        return Err(EndpointError::Directory(s.to_owned()));
    }
    if path.len() > MAX_SOCKET_PATH {
        return Err(EndpointError::TooLong(s.to_owned()));
    }
    Ok(PathBuf::from(path))
}

/// Why [`CsiServer::serve_unix`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("creating the socket directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("a server is already listening on {0}")]
    InUse(PathBuf),
    #[error("inspecting or removing the stale socket {path}: {source}")]
    Stale { path: PathBuf, source: io::Error },
    #[error("binding {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

type CsiRouter = Router<Stack<RpcLogLayer, NoLayer>>;

/// The CSI services of one process (the Identity service always, Controller and Node as
/// the process plays them), with RPC logging.
pub struct CsiServer {
    router: CsiRouter,
}

impl CsiServer {
    /// A server with the Identity service only.
    pub fn new<I: Identity>(identity: I) -> Self {
        let router = tonic::transport::Server::builder()
            .layer(RpcLogLayer)
            .add_service(IdentityServer::new(identity));
        Self { router }
    }

    /// Adds the Controller service.
    pub fn controller<C: Controller>(mut self, controller: C) -> Self {
        self.router = self.router.add_service(ControllerServer::new(controller));
        self
    }

    /// Adds the Node service.
    pub fn node<N: Node>(mut self, node: N) -> Self {
        self.router = self.router.add_service(NodeServer::new(node));
        self
    }

    /// Serves on the Unix socket `path` until `shutdown` completes (then lets in-flight
    /// calls finish), and removes the socket before returning.
    pub async fn serve_unix(
        self,
        path: &Path,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        self.bind_unix(path).await?.serve(shutdown).await
    }

    /// Binds the Unix socket `path` (see [`serve_unix`](Self::serve_unix)); clients may
    /// connect as soon as this returns, and are served once [`BoundCsiServer::serve`]
    /// runs.
    pub async fn bind_unix(self, path: &Path) -> Result<BoundCsiServer, ServeError> {
        let listener = bind_unix(path).await?;
        Ok(BoundCsiServer {
            router: self.router,
            listener,
            guard: SocketGuard::new(path),
        })
    }
}

/// A [`CsiServer`] whose socket is bound.
pub struct BoundCsiServer {
    router: CsiRouter,
    listener: UnixListener,
    guard: SocketGuard,
}

impl BoundCsiServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.guard.path
    }

    /// Serves until `shutdown` completes (then lets in-flight calls finish), and removes
    /// the socket before returning.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let Self {
            router,
            listener,
            guard,
        } = self;
        tracing::info!(socket = %guard.path.display(), "serving CSI");
        let incoming = UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityFix::new));
        let served = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        drop(guard);
        served.map_err(ServeError::from)
    }
}

/// Creates the parent directory, replaces a stale socket and binds `path`.
async fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A socket a live server answers on is not stale: two plugins on one
            // socket would take turns at random.
            if UnixStream::connect(path).await.is_ok() {
                return Err(ServeError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|source| ServeError::Stale {
                path: path.to_owned(),
                source,
            })?;
            tracing::info!(socket = %path.display(), "removed a stale socket");
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServeError::Stale {
                path: path.to_owned(),
                source,
            })
        }
    }
    UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Removes the socket this process bound when dropped, unless another process has since
/// put a different file at the path.
struct SocketGuard {
    path: PathBuf,
    inode: Option<(u64, u64)>,
}

impl SocketGuard {
    fn new(path: &Path) -> Self {
        let inode = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Self {
            path: path.to_owned(),
            inode,
        }
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.inode {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), error = %e, "removing the socket");
            }
        }
    }
}

// ---------------------------------------------------------------- RPC logging

/// CSI methods that change nothing; logged at debug (kubelet and the sidecars call some
/// of them every few seconds).
const READ_ONLY: &[&str] = &[
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "GetCapacity",
    "ControllerGetCapabilities",
    "ListSnapshots",
    "ControllerGetVolume",
    "NodeGetVolumeStats",
    "NodeGetCapabilities",
    "NodeGetInfo",
];

/// A tower layer that logs every RPC: method, gRPC status code, duration. Never the
/// bodies.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcLogLayer;

impl<S> Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;

    fn layer(&self, inner: S) -> RpcLog<S> {
        RpcLog { inner }
    }
}

/// The service [`RpcLogLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct RpcLog<S> {
    inner: S,
}

impl<S, B, R> tonic::codegen::Service<http::Request<B>> for RpcLog<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
            match &res {
                Ok(resp) => log_rpc(&method, grpc_code(resp), elapsed_ms),
                Err(_) => tracing::warn!(%method, elapsed_ms, "RPC failed in transport"),
            }
            res
        })
    }
}

/// The gRPC status of a unary response: tonic puts `grpc-status` in the headers of an
/// error (trailers-only response); a response without it is an OK whose status follows
/// in the trailers.
fn grpc_code<R>(resp: &http::Response<R>) -> tonic::Code {
    resp.headers()
        .get("grpc-status")
        .map_or(tonic::Code::Ok, |v| tonic::Code::from_bytes(v.as_bytes()))
}

fn log_rpc(method: &str, code: tonic::Code, elapsed_ms: f64) {
    let name = method.rsplit('/').next().unwrap_or(method);
    let code_str = format!("{code:?}");
    if READ_ONLY.contains(&name) {
        tracing::debug!(method, code = %code_str, elapsed_ms, "CSI RPC");
    } else {
        tracing::info!(method, code = %code_str, elapsed_ms, "CSI RPC");
    }
}

// ---------------------------------------------------------------- :authority fix

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The largest frame a peer may send before SETTINGS say otherwise (RFC 9113 4.2).
const DEFAULT_MAX_FRAME: usize = 16_384;
/// The largest frame the HTTP/2 length field can describe.
const MAX_FRAME_LEN: usize = (1 << 24) - 1;
/// An upper bound on one header block; grpc-go's default is 16 MiB.
const MAX_HEADER_BLOCK: usize = 16 << 20;
/// The `:authority` given to requests whose own is not a valid authority.
const FALLBACK_AUTHORITY: &[u8] = b"localhost";

/// A header block (HEADERS and its CONTINUATIONs) not yet complete.
struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: BytesMut,
}

/// A Unix connection whose client-to-server HTTP/2 stream is rewritten so that every
/// request carries a valid `:authority`: each header block is decoded with the client's
/// HPACK context and re-encoded as literals without indexing (so h2's decoder table stays
/// empty and never disagrees with ours), with an invalid `:authority` replaced by
/// `localhost`. Every other frame, and the server-to-client direction, pass through.
pub struct AuthorityFix {
    inner: UnixStream,
    /// Bytes read from the client, not yet rewritten.
    raw: BytesMut,
    /// Rewritten bytes for h2 to read.
    out: BytesMut,
    /// Preface bytes still to pass through before frames start.
    preface_left: usize,
    decoder: loona_hpack::Decoder<'static>,
    pending: Option<PendingBlock>,
    eof: bool,
}

impl AuthorityFix {
    /// Wraps an accepted connection.
    pub fn new(inner: UnixStream) -> Self {
        Self {
            inner,
            raw: BytesMut::with_capacity(8192),
            out: BytesMut::with_capacity(8192),
            preface_left: PREFACE.len(),
            decoder: loona_hpack::Decoder::new(),
            pending: None,
            eof: false,
        }
    }

    /// Moves every complete unit of `raw` (preface bytes, whole frames) to `out`.
    fn process(&mut self) -> io::Result<()> {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.raw.len());
            if self.raw[..n] != PREFACE[PREFACE.len() - self.preface_left..][..n] {
                return Err(invalid("not an HTTP/2 prior-knowledge connection preface"));
            }
            self.out.extend_from_slice(&self.raw.split_to(n));
            self.preface_left -= n;
        }
        while self.preface_left == 0 && self.raw.len() >= FRAME_HEADER_LEN {
            let len = usize::from(self.raw[0]) << 16
                | usize::from(self.raw[1]) << 8
                | usize::from(self.raw[2]);
            if self.raw.len() < FRAME_HEADER_LEN + len {
                self.raw.reserve(FRAME_HEADER_LEN + len - self.raw.len());
                break;
            }
            let header = self.raw.split_to(FRAME_HEADER_LEN);
            let payload = self.raw.split_to(len).freeze();
            let kind = header[3];
            let flags = header[4];
            let stream_id =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            let continuing = self.pending.as_ref().map(|p| p.stream_id);
            match (kind, continuing) {
                (FRAME_HEADERS, None) => self.headers(flags, stream_id, payload)?,
                (FRAME_CONTINUATION, Some(id)) if id == stream_id => {
                    let Some(mut block) = self.pending.take() else {
                        unreachable!("continuing is Some")
                    };
                    if block.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
                        return Err(invalid("header block too large"));
                    }
                    block.fragment.extend_from_slice(&payload);
                    if flags & FLAG_END_HEADERS != 0 {
                        self.emit_block(block)?;
                    } else {
                        self.pending = Some(block);
                    }
                }
                // RFC 9113 6.10: nothing may come between a HEADERS without END_HEADERS
                // and its CONTINUATIONs; a CONTINUATION needs one to continue.
                (_, Some(_)) | (FRAME_CONTINUATION, None) => {
                    return Err(invalid("CONTINUATION out of sequence"))
                }
                _ => {
                    self.out.extend_from_slice(&header);
                    self.out.extend_from_slice(&payload);
                }
            }
        }
        Ok(())
    }

    /// Takes a HEADERS frame apart (padding and priority) and emits or holds its block.
    fn headers(&mut self, flags: u8, stream_id: u32, mut payload: Bytes) -> io::Result<()> {
        let mut pad = 0;
        if flags & FLAG_PADDED != 0 {
            if payload.is_empty() {
                return Err(invalid("HEADERS: PADDED without a pad length"));
            }
            pad = usize::from(payload.get_u8());
        }
        let mut priority = None;
        if flags & FLAG_PRIORITY != 0 {
            if payload.len() < 5 {
                return Err(invalid("HEADERS: PRIORITY without its 5 bytes"));
            }
            let mut p = [0; 5];
            payload.copy_to_slice(&mut p);
            priority = Some(p);
        }
        if pad > payload.len() {
            return Err(invalid("HEADERS: padding longer than the payload"));
        }
        payload.truncate(payload.len() - pad);
        let block = PendingBlock {
            stream_id,
            end_stream: flags & FLAG_END_STREAM != 0,
            priority,
            fragment: BytesMut::from(&payload[..]),
        };
        if flags & FLAG_END_HEADERS != 0 {
            self.emit_block(block)
        } else {
            self.pending = Some(block);
            Ok(())
        }
    }

    /// Decodes a complete header block, fixes `:authority` and writes it out as a
    /// HEADERS frame (plus CONTINUATIONs if it does not fit in one frame).
    fn emit_block(&mut self, block: PendingBlock) -> io::Result<()> {
        let mut encoded = Vec::with_capacity(block.fragment.len() + 16);
        let mut fixed = false;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                let value = if name.as_ref() == b":authority" && !valid_authority(&value) {
                    fixed = true;
                    Cow::Borrowed(FALLBACK_AUTHORITY)
                } else {
                    value
                };
                encode_literal(&name, &value, &mut encoded);
            })
            .map_err(|e| invalid(&format!("HPACK: {e:?}")))?;
        if fixed {
            tracing::debug!(
                stream = block.stream_id,
                "replaced an invalid :authority with localhost"
            );
        }

        let prio_len = if block.priority.is_some() { 5 } else { 0 };
        let first = encoded.len().min(DEFAULT_MAX_FRAME - prio_len);
        let mut flags = 0;
        if block.end_stream {
            flags |= FLAG_END_STREAM;
        }
        if block.priority.is_some() {
            flags |= FLAG_PRIORITY;
        }
        if first == encoded.len() {
            flags |= FLAG_END_HEADERS;
        }
        self.frame_header(prio_len + first, FRAME_HEADERS, flags, block.stream_id);
        if let Some(p) = block.priority {
            self.out.extend_from_slice(&p);
        }
        self.out.extend_from_slice(&encoded[..first]);
        let mut rest = &encoded[first..];
        while !rest.is_empty() {
            let n = rest.len().min(DEFAULT_MAX_FRAME);
            let end = if n == rest.len() { FLAG_END_HEADERS } else { 0 };
            self.frame_header(n, FRAME_CONTINUATION, end, block.stream_id);
            self.out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        Ok(())
    }

    fn frame_header(&mut self, len: usize, kind: u8, flags: u8, stream_id: u32) {
        debug_assert!(len <= MAX_FRAME_LEN);
        let len = u32::try_from(len).expect("frames are at most 16 KiB");
        self.out.put_slice(&len.to_be_bytes()[1..]);
        self.out.put_u8(kind);
        self.out.put_u8(flags);
        self.out.put_u32(stream_id);
    }
}

/// Whether h2 accepts `value` as an `:authority` (the check h2's server makes).
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// HPACK "literal header field without indexing, new name" (RFC 7541 6.2.2), no Huffman.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    for s in [name, value] {
        out.extend_from_slice(&loona_hpack::encoder::encode_integer(s.len(), 7));
        out.extend_from_slice(s);
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

impl AsyncRead for AuthorityFix {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A frame cut short by EOF is h2's to report as a broken connection.
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.raw.extend_from_slice(rb.filled());
            this.process()?;
        }
    }
}

impl AsyncWrite for AuthorityFix {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for AuthorityFix {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn endpoints() {
        let p = |s| parse_endpoint(s);
        assert_eq!(
            p("unix:///csi/csi.sock"),
            Ok(PathBuf::from("/csi/csi.sock"))
        );
        assert_eq!(p("unix:/csi/csi.sock"), Ok(PathBuf::from("/csi/csi.sock")));
        assert_eq!(p("/csi/csi.sock"), Ok(PathBuf::from("/csi/csi.sock")));
        assert_eq!(p(""), Err(EndpointError::Empty));
        assert!(matches!(
            p("tcp://127.0.0.1:10000"),
            Err(EndpointError::UnsupportedScheme(_))
        ));
        assert!(matches!(
            p("dns:///x"),
            Err(EndpointError::UnsupportedScheme(_))
        ));
        assert!(matches!(p("csi.sock"), Err(EndpointError::NotAbsolute(_))));
        assert!(matches!(
            p("./csi.sock"),
            Err(EndpointError::NotAbsolute(_))
        ));
        assert!(matches!(
            p("unix://csi.sock"),
            Err(EndpointError::NotAbsolute(_))
        ));
        assert!(matches!(
            p("unix://host/csi.sock"),
            Err(EndpointError::NotAbsolute(_))
        ));
        assert!(matches!(
            p("unix:csi.sock"),
            Err(EndpointError::NotAbsolute(_))
        ));
        assert!(matches!(p("/csi/"), Err(EndpointError::Directory(_))));
        assert!(matches!(p("/csi\0.sock"), Err(EndpointError::Nul(_))));
        let long = format!("/{}", "a".repeat(MAX_SOCKET_PATH));
        assert!(matches!(p(&long), Err(EndpointError::TooLong(_))));
        let longest = format!("/{}", "a".repeat(MAX_SOCKET_PATH - 1));
        assert!(p(&longest).is_ok());
    }

    #[test]
    fn service_names_are_the_spec_ones() {
        use crate::pb::{controller_server, identity_server, node_server};
        assert_eq!(identity_server::SERVICE_NAME, "csi.v1.Identity");
        assert_eq!(controller_server::SERVICE_NAME, "csi.v1.Controller");
        assert_eq!(node_server::SERVICE_NAME, "csi.v1.Node");
    }

    #[test]
    fn authorities_h2_refuses_are_invalid_here() {
        for ok in ["localhost", "localhost:80", "127.0.0.1"] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in ["/csi/csi.sock", "unix:///csi/csi.sock", ""] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = parse_endpoint(&s);
        }

        #[test]
        fn valid_paths_round_trip(path in "(/[a-zA-Z0-9._-]{1,20}){1,4}") {
            let expected = Ok(PathBuf::from(&path));
            prop_assert_eq!(parse_endpoint(&path), expected.clone());
            prop_assert_eq!(parse_endpoint(&format!("unix:{path}")), expected.clone());
            prop_assert_eq!(parse_endpoint(&format!("unix://{path}")), expected);
        }

        #[test]
        fn accepted_paths_are_absolute_sockets(s in "(unix:(//)?)?/?[a-z/\0:]{0,120}") {
            if let Ok(p) = parse_endpoint(&s) {
                let bytes = p.as_os_str().len();
                prop_assert!(p.is_absolute());
                prop_assert!(bytes <= MAX_SOCKET_PATH);
                prop_assert!(!p.to_string_lossy().contains('\0'));
            }
        }
    }
}
