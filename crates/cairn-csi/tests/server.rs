//! The CSI server on a real Unix socket: calls from tonic and from a hand-rolled HTTP/2
//! client that sends the `:authority` values kubelet and the CSI sidecars (grpc-go) send,
//! and the socket's lifecycle (stale socket, regular file, live server, removal).

use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, BytesMut};
use cairn_csi::pb::identity_client::IdentityClient;
use cairn_csi::pb::identity_server::{Identity, IdentityServer};
use cairn_csi::pb::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, ProbeRequest, ProbeResponse,
};
use cairn_csi::server::{parse_endpoint, CsiServer, ServeError};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

const PLUGIN: &str = "test.csi.cairn.io";

struct TestIdentity;

#[tonic::async_trait]
impl Identity for TestIdentity {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: PLUGIN.into(),
            vendor_version: "1.2.3".into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

/// A running server; dropping `stop` shuts it down, `done` yields its result.
struct Running {
    path: PathBuf,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<Result<(), ServeError>>,
}

async fn start(path: &Path) -> Running {
    let bound = CsiServer::new(TestIdentity)
        .bind_unix(path)
        .await
        .expect("bind");
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(bound.serve(async {
        let _ = stopped.await;
    }));
    Running {
        path: path.to_owned(),
        stop,
        done,
    }
}

impl Running {
    async fn stop(self) {
        drop(self.stop);
        self.done.await.expect("join").expect("serve");
        assert!(!self.path.exists(), "socket removed on shutdown");
    }
}

async fn tonic_client(path: &Path) -> IdentityClient<tonic::transport::Channel> {
    let path = path.to_owned();
    // The URI is required and ignored: the connector dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .expect("connect");
    IdentityClient::new(channel)
}

#[tokio::test]
async fn tonic_client_calls_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugins/cairn/csi.sock");
    let server = start(&path).await;
    let mut client = tonic_client(&path).await;
    let info = client
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo")
        .into_inner();
    assert_eq!(info.name, PLUGIN);
    assert_eq!(info.vendor_version, "1.2.3");
    let probe = client
        .probe(ProbeRequest {})
        .await
        .expect("Probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let err = client
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .expect_err("unimplemented");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    drop(client);
    server.stop().await;
}

// ------------------------------------------------------------ raw HTTP/2 client

const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const PING: u8 = 0x6;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap();
    out.put_slice(&len.to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
    out.put_slice(payload);
}

/// What the server answered on one stream.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The call completed: `:status`, `grpc-status` and the decoded response.
    Answered {
        status: String,
        grpc_status: String,
        name: String,
    },
    /// The server reset the stream with this HTTP/2 error code (1 = PROTOCOL_ERROR).
    Reset(u32),
}

/// A grpc-go-like client: HPACK with incremental indexing (so a second request refers
/// to the dynamic table), GetPluginInfo calls on streams 1, 3, ...
struct RawClient {
    sock: UnixStream,
    encoder: loona_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
    buf: BytesMut,
    next_stream: u32,
}

impl RawClient {
    async fn connect(path: &Path) -> Self {
        let mut sock = UnixStream::connect(path).await.expect("connect");
        let mut out = BytesMut::new();
        out.put_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        frame(&mut out, SETTINGS, 0, 0, &[]);
        sock.write_all(&out).await.unwrap();
        Self {
            sock,
            encoder: loona_hpack::Encoder::new(),
            decoder: loona_hpack::Decoder::new(),
            buf: BytesMut::new(),
            next_stream: 1,
        }
    }

    /// Calls GetPluginInfo with `authority` (None: no `:authority` at all).
    async fn get_plugin_info(&mut self, authority: Option<&str>) -> Outcome {
        let stream = self.next_stream;
        self.next_stream += 2;
        let mut headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/csi.v1.Identity/GetPluginInfo"),
        ];
        if let Some(a) = authority {
            headers.push((b":authority", a.as_bytes()));
        }
        headers.push((b"content-type", b"application/grpc"));
        headers.push((b"te", b"trailers"));
        let block = self.encoder.encode(headers);
        let mut msg = vec![0u8];
        let body = GetPluginInfoRequest {}.encode_to_vec();
        msg.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        msg.extend_from_slice(&body);
        let mut out = BytesMut::new();
        frame(&mut out, HEADERS, END_HEADERS, stream, &block);
        frame(&mut out, DATA, END_STREAM, stream, &msg);
        self.sock.write_all(&out).await.unwrap();
        self.read_outcome(stream).await
    }

    async fn read_frame(&mut self) -> (u8, u8, u32, BytesMut) {
        loop {
            if self.buf.len() >= 9 {
                let len = usize::from(self.buf[0]) << 16
                    | usize::from(self.buf[1]) << 8
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let mut h = self.buf.split_to(9);
                    let payload = self.buf.split_to(len);
                    h.advance(3);
                    let kind = h.get_u8();
                    let flags = h.get_u8();
                    let stream = h.get_u32() & 0x7fff_ffff;
                    return (kind, flags, stream, payload);
                }
            }
            let n = self.sock.read_buf(&mut self.buf).await.expect("read");
            assert_ne!(n, 0, "server closed the connection");
        }
    }

    async fn read_outcome(&mut self, stream: u32) -> Outcome {
        let mut status = String::new();
        let mut grpc_status = String::new();
        let mut data = BytesMut::new();
        loop {
            let (kind, flags, id, payload) = self.read_frame().await;
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    let mut out = BytesMut::new();
                    frame(&mut out, SETTINGS, ACK, 0, &[]);
                    self.sock.write_all(&out).await.unwrap();
                }
                PING if flags & ACK == 0 => {
                    let mut out = BytesMut::new();
                    frame(&mut out, PING, ACK, 0, &payload);
                    self.sock.write_all(&out).await.unwrap();
                }
                GOAWAY => panic!("GOAWAY: {payload:?}"),
                RST_STREAM if id == stream => {
                    return Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()))
                }
                HEADERS if id == stream => {
                    assert!(
                        flags & END_HEADERS != 0,
                        "test expects one-frame header blocks"
                    );
                    for (k, v) in self.decoder.decode(&payload).expect("HPACK") {
                        match &k[..] {
                            b":status" => status = String::from_utf8(v).unwrap(),
                            b"grpc-status" => grpc_status = String::from_utf8(v).unwrap(),
                            _ => {}
                        }
                    }
                    if flags & END_STREAM != 0 {
                        break;
                    }
                }
                HEADERS => {
                    // Another stream's headers still update the HPACK context.
                    self.decoder.decode(&payload).expect("HPACK");
                }
                DATA if id == stream => {
                    data.extend_from_slice(&payload);
                    if flags & END_STREAM != 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
        let name = if data.len() >= 5 {
            data.advance(5);
            GetPluginInfoResponse::decode(&data[..])
                .expect("response")
                .name
        } else {
            String::new()
        };
        Outcome::Answered {
            status,
            grpc_status,
            name,
        }
    }
}

fn answered() -> Outcome {
    Outcome::Answered {
        status: "200".into(),
        grpc_status: "0".into(),
        name: PLUGIN.into(),
    }
}

/// The `:authority` values seen from kubelet and the CSI sidecars over Unix sockets:
/// `localhost` (kubelet since 1.26, grpc-go's unix resolver), the socket path (grpc-go
/// passthrough target with a custom dialer), its percent-encoding (newer grpc
/// libraries), `unix://` target text, and empty or absent.
fn authorities(socket: &Path) -> Vec<Option<String>> {
    let socket = socket.display().to_string();
    vec![
        Some("localhost".into()),
        Some("/csi/csi.sock".into()),
        Some(socket.clone()),
        Some("%2Fcsi%2Fcsi.sock".into()),
        Some(socket.replace('/', "%2F")),
        Some("unix:///csi/csi.sock".into()),
        Some(format!("unix://{socket}")),
        Some("unix:%2F%2F%2Fcsi%2Fcsi.sock".into()),
        Some("csi.sock".into()),
        Some(String::new()),
        None,
    ]
}

#[tokio::test]
async fn every_kubelet_authority_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");
    let server = start(&path).await;
    for authority in authorities(&path) {
        // Each on a fresh connection, then again on the same one, where the client's
        // HPACK encoder refers to the dynamic-table entries of the first call.
        let mut client = RawClient::connect(&path).await;
        for call in 0..2 {
            let got = client.get_plugin_info(authority.as_deref()).await;
            assert_eq!(got, answered(), "authority {authority:?}, call {call}");
        }
    }
    // All of them on one connection, interleaved.
    let mut client = RawClient::connect(&path).await;
    for authority in authorities(&path).iter().chain(authorities(&path).iter()) {
        let got = client.get_plugin_info(authority.as_deref()).await;
        assert_eq!(
            got,
            answered(),
            "authority {authority:?} on a shared connection"
        );
    }
    drop(client);
    server.stop().await;
}

/// Why [`cairn_csi::server::AuthorityFix`] exists: tonic alone (h2 0.4) resets a request
/// whose `:authority` is a socket path. If this starts failing, h2 has relaxed its check
/// and the fix may be removable.
#[tokio::test]
async fn plain_tonic_resets_a_path_authority() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(TestIdentity))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let mut client = RawClient::connect(&path).await;
    assert_eq!(client.get_plugin_info(Some("localhost")).await, answered());
    assert_eq!(
        client.get_plugin_info(Some("/csi/csi.sock")).await,
        Outcome::Reset(1),
        "h2 resets a path :authority with PROTOCOL_ERROR"
    );
    assert_eq!(
        client.get_plugin_info(Some("%2Fcsi%2Fcsi.sock")).await,
        Outcome::Reset(1),
        "h2 resets a percent-encoded path :authority with PROTOCOL_ERROR"
    );
    drop(client);
    drop(stop);
    server.await.unwrap().unwrap();
}

// ------------------------------------------------------------ socket lifecycle

#[tokio::test]
async fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");
    // A socket nobody listens on, as a killed plugin leaves it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = start(&path).await;
    let mut client = RawClient::connect(&path).await;
    assert_eq!(client.get_plugin_info(Some("localhost")).await, answered());
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn regular_file_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");
    std::fs::write(&path, b"keep me").unwrap();
    let err = CsiServer::new(TestIdentity)
        .bind_unix(&path)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, ServeError::NotASocket(ref p) if p == &path),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
}

#[tokio::test]
async fn live_socket_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");
    let server = start(&path).await;
    let err = CsiServer::new(TestIdentity)
        .bind_unix(&path)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, ServeError::InUse(ref p) if p == &path),
        "{err}"
    );
    // The first server still answers.
    let mut client = RawClient::connect(&path).await;
    assert_eq!(client.get_plugin_info(Some("localhost")).await, answered());
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn endpoint_forms_reach_the_same_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");
    let server = start(&path).await;
    for endpoint in [
        format!("unix://{}", path.display()),
        format!("unix:{}", path.display()),
        path.display().to_string(),
    ] {
        let parsed = parse_endpoint(&endpoint).expect("valid endpoint");
        let mut client = tonic_client(&parsed).await;
        let info = client.get_plugin_info(GetPluginInfoRequest {}).await;
        assert_eq!(info.expect("GetPluginInfo").into_inner().name, PLUGIN);
    }
    server.stop().await;
}
