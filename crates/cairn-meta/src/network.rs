//! Raft traffic between members over gRPC (`cairn.v1.Raft`).
//!
//! [`RaftService`] serves the three Raft RPCs of one member; [`Network`] is the
//! openraft network of a member, one [`NetworkClient`] per target.
//!
//! Payloads are the serde-JSON of openraft's request types; a reply is the
//! serde-JSON of `Result<response, RaftError>`. Transport failures are gRPC
//! statuses: the client reports a connection failure (`UNAVAILABLE`) as
//! [`Unreachable`] (openraft backs off), a request that outlives openraft's
//! hard TTL as [`RPCError::Timeout`], and any other status or undecodable
//! payload as [`NetworkError`].
//!
//! Assumes: a member's `BasicNode::addr` is the `host:port` of its gRPC server.
//! Channels connect lazily, on the first RPC, and reconnect by themselves.

use std::collections::HashMap;
use std::time::Duration;

use cairn_proto::v1::raft_client::RaftClient;
use cairn_proto::v1::raft_server;
use cairn_proto::v1::{RaftReply, RaftRequest};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::{NodeId, Raft, TypeConfig};

/// How long connecting to a member may take before the RPC fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A lazily connecting channel to `addr` (`host:port`), with a connect timeout.
///
/// # Errors
/// `addr` does not form a valid URI.
pub fn lazy_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy())
}

// ------------------------------------------------------------------ server

/// The `cairn.v1.Raft` service of one member: hands each request to its Raft.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
}

impl RaftService {
    /// Serves `raft`.
    #[must_use]
    pub fn new(raft: Raft) -> Self {
        Self { raft }
    }

    /// The tonic server of this service.
    #[must_use]
    pub fn into_server(self) -> raft_server::RaftServer<Self> {
        raft_server::RaftServer::new(self)
    }
}

// tonic's service traits fix the error type to `tonic::Status`.
#[allow(clippy::result_large_err)]
fn decode<T: DeserializeOwned>(req: Request<RaftRequest>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().payload)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft request: {e}")))
}

#[allow(clippy::result_large_err)]
fn reply<T: Serialize>(result: &T) -> Result<Response<RaftReply>, Status> {
    let payload = serde_json::to_vec(result)
        .map_err(|e| Status::internal(format!("cannot encode raft reply: {e}")))?;
    Ok(Response::new(RaftReply { payload }))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: VoteRequest<NodeId> = decode(req)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}

// ------------------------------------------------------------------ client

/// The openraft network of member `id`: one lazily connected gRPC channel per
/// target address, shared by the clients openraft creates for it.
#[derive(Clone)]
pub struct Network {
    id: NodeId,
    channels: std::sync::Arc<std::sync::Mutex<HashMap<String, Channel>>>,
}

impl Network {
    /// The network of member `id`.
    #[must_use]
    pub fn new(id: NodeId) -> Self {
        Self {
            id,
            channels: std::sync::Arc::default(),
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let c = lazy_channel(addr)?;
        map.insert(addr.to_owned(), c.clone());
        Ok(c)
    }
}

/// Sends Raft RPCs from one member to one target.
pub struct NetworkClient {
    id: NodeId,
    target: NodeId,
    addr: String,
    client: Result<RaftClient<Channel>, String>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = NetworkClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> NetworkClient {
        let client = self
            .channel(&node.addr)
            .map(RaftClient::new)
            .map_err(|e| format!("bad address {:?} of member {target}: {e}", node.addr));
        NetworkClient {
            id: self.id,
            target,
            addr: node.addr.clone(),
            client,
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

#[derive(Debug, thiserror::Error)]
#[error("member {target} at {addr}: {detail}")]
struct TransportError {
    target: NodeId,
    addr: String,
    detail: String,
}

impl NetworkClient {
    fn err(&self, detail: impl ToString) -> TransportError {
        TransportError {
            target: self.target,
            addr: self.addr.clone(),
            detail: detail.to_string(),
        }
    }

    #[allow(clippy::result_large_err)]
    async fn call<Req, Resp, E>(
        &mut self,
        action: RPCTypes,
        rpc: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&self.err(e)))),
        };
        let payload = serde_json::to_vec(rpc)
            .map_err(|e| RPCError::Network(NetworkError::new(&self.err(e))))?;
        let req = RaftRequest { payload };
        let ttl = option.hard_ttl();
        let fut = async {
            match action {
                RPCTypes::AppendEntries => client.append_entries(req).await,
                RPCTypes::InstallSnapshot => client.install_snapshot(req).await,
                RPCTypes::Vote => client.vote(req).await,
            }
        };
        let resp = match tokio::time::timeout(ttl, fut).await {
            Err(_) => {
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: self.id,
                    target: self.target,
                    timeout: ttl,
                }))
            }
            Ok(Err(status)) => {
                let e = self.err(format!("{:?}: {}", status.code(), status.message()));
                return Err(if status.code() == tonic::Code::Unavailable {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&resp.payload)
            .map_err(|e| {
                RPCError::Network(NetworkError::new(
                    &self.err(format!("undecodable reply: {e}")),
                ))
            })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for NetworkClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        self.call(RPCTypes::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(RPCTypes::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        self.call(RPCTypes::Vote, &rpc, &option).await
    }
}
