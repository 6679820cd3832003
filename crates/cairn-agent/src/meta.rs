//! The agent's connection to the metadata service: any member will do (members forward
//! writes to the leader), so on a transport failure the next address is tried.
//!
//! Outgoing connections are bound to the node's own IP address, so that a node is one
//! address on the network: cutting that address off (a partition) cuts the agent off from
//! meta too, as on a real network.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_proto::v1::meta_client::MetaClient;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

/// Unary calls that take longer than this are treated as a lost member.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A shared, lazily (re)connected client of the metadata service.
#[derive(Clone)]
pub struct MetaConn {
    addrs: Arc<Vec<String>>,
    closed: Arc<std::sync::atomic::AtomicBool>,
    source: IpAddr,
    current: Arc<Mutex<Current>>,
}

#[derive(Default)]
struct Current {
    /// Index into `addrs` of the member to try next.
    next: usize,
    client: Option<MetaClient<Channel>>,
}

/// True for errors a retry (perhaps through another member) may cure.
pub fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Internal
    )
}

impl MetaConn {
    /// `addrs`: `host:port` of meta members; `source`: the IP outgoing connections bind to
    /// (unspecified: let the kernel choose).
    pub fn new(addrs: Vec<String>, source: IpAddr) -> MetaConn {
        MetaConn {
            addrs: Arc::new(addrs),
            closed: Arc::default(),
            source,
            current: Arc::new(Mutex::new(Current::default())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connected client, connecting to the members in turn if needed.
    pub async fn client(&self) -> Result<MetaClient<Channel>, Status> {
        if let Some(c) = self.lock().client.clone() {
            return Ok(c);
        }
        let start = self.lock().next;
        let mut last = String::from("no meta address given");
        for k in 0..self.addrs.len() {
            let i = (start + k) % self.addrs.len();
            let addr = &self.addrs[i];
            match connect(addr, self.source).await {
                Ok(ch) => {
                    let client = MetaClient::new(ch);
                    let mut cur = self.lock();
                    cur.next = i;
                    cur.client = Some(client.clone());
                    return Ok(client);
                }
                Err(e) => last = format!("meta {addr}: {e}"),
            }
        }
        Err(Status::unavailable(last))
    }

    /// Makes every later call fail at once with FAILED_PRECONDITION "agent is stopping".
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// True after [`close`](Self::close).
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forgets the current connection after a transport failure; the next call tries the
    /// next member.
    pub fn reset(&self) {
        let mut cur = self.lock();
        if cur.client.take().is_some() {
            cur.next = (cur.next + 1) % self.addrs.len().max(1);
        }
    }

    /// Runs one unary call with [`CALL_TIMEOUT`]; resets the connection when the failure
    /// may be the member's.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: FnOnce(MetaClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        if self.is_closed() {
            return Err(Status::failed_precondition("agent is stopping"));
        }
        let client = self.client().await?;
        let r = match tokio::time::timeout(CALL_TIMEOUT, f(client)).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded("meta did not answer in time")),
        };
        if let Err(s) = &r {
            if retryable(s) {
                self.reset();
            }
        }
        r
    }
}

/// Connects to `addr`, from `source` when it is a specified address of the same family.
async fn connect(addr: &str, source: IpAddr) -> Result<Channel, tonic::transport::Error> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(4))
        .keep_alive_while_idle(true);
    ep.connect_with_connector(tower::service_fn(move |uri: Uri| async move {
        let host = uri.host().unwrap_or("127.0.0.1").to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let target: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{host}: no address")))?;
        let sock = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if !source.is_unspecified() && source.is_ipv4() == target.is_ipv4() {
            sock.bind(SocketAddr::new(source, 0))?;
        }
        let stream = sock.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    }))
    .await
}

/// Retries `f` with a backoff (100 ms doubling to 2 s) while its error is retryable or
/// ABORTED (a version race: `f` re-reads), until `stop` fires.
pub async fn retry<T, F, Fut>(what: &str, mut f: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(s) if retryable(&s) || s.code() == Code::Aborted => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(what, code = ?s.code(), error = s.message(), failures, "meta call failed; retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(s) => return Err(s),
        }
    }
}
