//! The `cairn.v1.Meta` service of one member ([`MetaServer`]) and the start of
//! a member ([`start_member`]).
//!
//! Writes (Create, Update, Delete, AddMember, RemoveMember) go through
//! `raft.client_write` on the leader. A follower forwards the request to the
//! leader over the Meta gRPC API, marked with the `cairn-forwarded` metadata
//! so a request is forwarded at most once; without a known leader, or when a
//! forwarded request lands on a non-leader, the answer is `UNAVAILABLE` (with
//! the `cairn-leader` trailer when a leader address is known).
//!
//! Reads (Get, List, Members, Leader): Get and List are answered by the
//! leader after `raft.ensure_linearizable()` (so they see every write
//! acknowledged before the call); a follower forwards them like writes.
//! Members and Leader are answered locally from the member's Raft metrics.
//!
//! Records are stored under their kind's `Kind::cli_name()` and name; the data
//! is the protobuf encoding of the record with version 0 (the store's version
//! is authoritative and set on every answer).
//!
//! Heartbeat is a write: the leader reads the Node record, sets its disks,
//! state UP and `heartbeat_unix_ms` from its own clock, and writes it back at
//! the version it read (retrying when another write came in between). An
//! unknown node is created with just its name and disks (an upsert).
//!
//! Watch is served by the member called, from its applied records
//! (`watch_rpc`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::meta_server;
use cairn_proto::v1::record::Record as R;
use cairn_proto::v1::{
    AddMemberRequest, CreateRequest, CreateResponse, DeleteRequest, DeleteResponse, GetRequest,
    GetResponse, HeartbeatRequest, HeartbeatResponse, Key, Kind, LeaderRequest, LeaderResponse,
    ListRequest, ListResponse, Member, MembersRequest, MembersResponse, Node, NodeState,
    RemoveMemberRequest, UpdateRequest, UpdateResponse, WatchRequest,
};
use cairn_proto::{validate_node_name, validate_record, version_of, with_version};
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use openraft::{BasicNode, Config};
use prost::Message;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::network::{lazy_channel, Network, RaftService};
use crate::{open_store, Command, CommandResult, MetaError, NodeId, Raft, StateMachineStore};

/// Metadata key marking a request one member forwarded to the leader.
pub const FORWARDED: &str = "cairn-forwarded";
/// Trailer naming the leader's address when forwarding was not possible.
pub const LEADER_TRAILER: &str = "cairn-leader";

type Res<T> = Result<Response<T>, Status>;
type Forward = ForwardToLeader<NodeId, BasicNode>;

/// Default of [`MetaServer::with_node_down_timeout`].
pub const DEFAULT_NODE_DOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The `cairn.v1.Meta` service of one member.
#[derive(Clone)]
pub struct MetaServer {
    raft: Raft,
    sm: StateMachineStore,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    node_down_timeout: Duration,
}

/// Why a request could not be handled here.
enum Fail {
    /// Another member (or none known) leads: forward there.
    NotLeader(Forward),
    /// Answer with this status.
    Status(Status),
}

impl From<Status> for Fail {
    fn from(s: Status) -> Self {
        Fail::Status(s)
    }
}

fn internal(e: impl std::fmt::Display) -> Fail {
    Fail::Status(Status::internal(e.to_string()))
}

fn from_meta(e: &MetaError) -> Fail {
    internal(e)
}

fn write_err(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Fail {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Fail::NotLeader(f),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Fail::Status(Status::failed_precondition(c.to_string()))
        }
        RaftError::Fatal(f) => internal(f),
    }
}

#[allow(clippy::result_large_err)]
fn kind_of_key(key: Option<&Key>) -> Result<(Kind, String), Status> {
    let key = key.ok_or_else(|| Status::invalid_argument("key is missing"))?;
    Ok((kind_from(key.kind)?, key.name.clone()))
}

#[allow(clippy::result_large_err)]
pub(crate) fn kind_from(kind: i32) -> Result<Kind, Status> {
    match Kind::try_from(kind) {
        Ok(Kind::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "kind {kind} is not a record kind"
        ))),
        Ok(k) => Ok(k),
    }
}

/// Decodes a stored record and sets its stored version.
#[allow(clippy::result_large_err)]
pub(crate) fn decode(rec: &crate::Record) -> Result<cairn_proto::v1::Record, Status> {
    let r = cairn_proto::v1::Record::decode(rec.data.as_slice()).map_err(|e| {
        Status::internal(format!(
            "stored {} {:?} does not decode: {e}",
            rec.kind, rec.name
        ))
    })?;
    Ok(with_version(r, rec.version))
}

/// Checks `record` and returns its kind and name.
#[allow(clippy::result_large_err)]
fn checked(record: Option<&cairn_proto::v1::Record>) -> Result<(Kind, String, u64), Status> {
    let record = record.ok_or_else(|| Status::invalid_argument("record is missing"))?;
    validate_record(record).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let kind =
        cairn_proto::kind_of(record).ok_or_else(|| Status::invalid_argument("empty record"))?;
    let name = cairn_proto::name_of(record).unwrap_or_default().to_owned();
    Ok((kind, name, version_of(record).unwrap_or(0)))
}

fn matches_filter(r: &cairn_proto::v1::Record, volume: &str, node: &str) -> bool {
    let (v, n) = match r.record.as_ref() {
        Some(R::Replica(x)) => (Some(x.volume.as_str()), Some(x.node.as_str())),
        Some(R::Snapshot(x)) => (Some(x.volume.as_str()), None),
        Some(R::Backup(x)) => (Some(x.volume.as_str()), None),
        Some(R::Volume(x)) => (None, Some(x.attached_node.as_str())),
        _ => (None, None),
    };
    (volume.is_empty() || v == Some(volume)) && (node.is_empty() || n == Some(node))
}

impl MetaServer {
    /// Serves the records of `sm` through `raft`.
    #[must_use]
    pub fn new(raft: Raft, sm: StateMachineStore) -> Self {
        Self {
            raft,
            sm,
            channels: Arc::default(),
            node_down_timeout: DEFAULT_NODE_DOWN_TIMEOUT,
        }
    }

    /// Sets how long a node may stay silent before it is DOWN; Heartbeat
    /// answers it so agents heartbeat well within it.
    #[must_use]
    pub fn with_node_down_timeout(mut self, timeout: Duration) -> Self {
        self.node_down_timeout = timeout;
        self
    }

    /// The tonic server of this service.
    #[must_use]
    pub fn into_server(self) -> meta_server::MetaServer<Self> {
        meta_server::MetaServer::new(self)
    }

    /// A client of the leader named by `f`, or the status to answer.
    #[allow(clippy::result_large_err)]
    fn leader_client(&self, f: &Forward, forwarded: bool) -> Result<MetaClient<Channel>, Status> {
        let addr = f.leader_node.as_ref().map(|n| n.addr.clone());
        let unavailable = |msg: &str| {
            let mut s = Status::unavailable(msg.to_owned());
            if let Some(a) = addr.as_deref().and_then(|a| a.parse().ok()) {
                s.metadata_mut().insert(LEADER_TRAILER, a);
            }
            s
        };
        if forwarded {
            return Err(unavailable("forwarded to a member that is not the leader"));
        }
        let Some(addr) = addr.clone() else {
            return Err(unavailable("no leader (election in progress)"));
        };
        let mut map = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ch = match map.get(&addr) {
            Some(c) => c.clone(),
            None => {
                let c = lazy_channel(&addr).map_err(|e| unavailable(&e.to_string()))?;
                map.insert(addr, c.clone());
                c
            }
        };
        Ok(MetaClient::new(ch))
    }

    async fn write(&self, cmd: Command) -> Result<CommandResult, Fail> {
        self.raft
            .client_write(cmd)
            .await
            .map(|r| r.data)
            .map_err(write_err)
    }

    async fn linearizable(&self) -> Result<(), Fail> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(Fail::NotLeader(f))
            }
            Err(e) => Err(internal(e)),
        }
    }

    async fn create_here(&self, req: &CreateRequest) -> Result<CreateResponse, Fail> {
        let (kind, name, version) = checked(req.record.as_ref())?;
        if version != 0 {
            return Err(Status::invalid_argument("create: record.version must be 0").into());
        }
        let record = req.record.clone().unwrap_or_default();
        let cmd = Command::Put {
            kind: kind.cli_name().to_owned(),
            name: name.clone(),
            data: record.encode_to_vec(),
            expected_version: Some(0),
        };
        match self.write(cmd).await? {
            CommandResult::Ok { version } => Ok(CreateResponse {
                record: Some(with_version(record, version)),
            }),
            CommandResult::Conflict { .. } => Err(Status::already_exists(format!(
                "{} {name:?} already exists",
                kind.cli_name()
            ))
            .into()),
            other => Err(internal(format!("unexpected result {other:?}"))),
        }
    }

    async fn update_here(&self, req: &UpdateRequest) -> Result<UpdateResponse, Fail> {
        let (kind, name, version) = checked(req.record.as_ref())?;
        if version == 0 {
            return Err(Status::invalid_argument("update: record.version must not be 0").into());
        }
        let record = with_version(req.record.clone().unwrap_or_default(), 0);
        let cmd = Command::Put {
            kind: kind.cli_name().to_owned(),
            name: name.clone(),
            data: record.encode_to_vec(),
            expected_version: Some(version),
        };
        match self.write(cmd).await? {
            CommandResult::Ok { version } => Ok(UpdateResponse {
                record: Some(with_version(record, version)),
            }),
            CommandResult::Conflict { current: None } => {
                Err(Status::not_found(format!("{} {name:?} not found", kind.cli_name())).into())
            }
            CommandResult::Conflict { current: Some(cur) } => Err(Status::aborted(format!(
                "{} {name:?} is at version {cur}, not {version}",
                kind.cli_name()
            ))
            .into()),
            other => Err(internal(format!("unexpected result {other:?}"))),
        }
    }

    async fn delete_here(&self, req: &DeleteRequest) -> Result<DeleteResponse, Fail> {
        let (kind, name) = kind_of_key(req.key.as_ref())?;
        let k = kind.cli_name();
        // Read the record, then delete exactly that version, so the answer is
        // the record as deleted; an unconditional delete retries on a race.
        for _ in 0..16 {
            self.linearizable().await?;
            let Some(stored) = self.sm.get(k, &name).map_err(|e| from_meta(&e))? else {
                return Err(Status::not_found(format!("{k} {name:?} not found")).into());
            };
            if req.expected_version != 0 && req.expected_version != stored.version {
                return Err(Status::aborted(format!(
                    "{k} {name:?} is at version {}, not {}",
                    stored.version, req.expected_version
                ))
                .into());
            }
            let cmd = Command::Delete {
                kind: k.to_owned(),
                name: name.clone(),
                expected_version: Some(stored.version),
            };
            match self.write(cmd).await? {
                CommandResult::Ok { .. } => {
                    return Ok(DeleteResponse {
                        record: Some(decode(&stored)?),
                    })
                }
                CommandResult::NotFound => {
                    return Err(Status::not_found(format!("{k} {name:?} not found")).into())
                }
                CommandResult::Conflict { current } if req.expected_version != 0 => {
                    return Err(Status::aborted(format!(
                        "{k} {name:?} is at version {current:?}, not {}",
                        req.expected_version
                    ))
                    .into())
                }
                CommandResult::Conflict { .. } => continue,
                other => return Err(internal(format!("unexpected result {other:?}"))),
            }
        }
        Err(Status::aborted(format!("{k} {name:?} changes too fast to delete")).into())
    }

    async fn get_here(&self, req: &GetRequest) -> Result<GetResponse, Fail> {
        let (kind, name) = kind_of_key(req.key.as_ref())?;
        self.linearizable().await?;
        match self
            .sm
            .get(kind.cli_name(), &name)
            .map_err(|e| from_meta(&e))?
        {
            Some(r) => Ok(GetResponse {
                record: Some(decode(&r)?),
            }),
            None => {
                Err(Status::not_found(format!("{} {name:?} not found", kind.cli_name())).into())
            }
        }
    }

    async fn list_here(&self, req: &ListRequest) -> Result<ListResponse, Fail> {
        let kind = kind_from(req.kind)?;
        self.linearizable().await?;
        // The revision is read before the records: the records reflect at
        // least this revision, so a Watch from revision + 1 misses nothing.
        let revision = self
            .sm
            .last_applied()
            .map_err(|e| from_meta(&e))?
            .map_or(0, |l| l.index);
        let mut records = Vec::new();
        for r in self.sm.list(kind.cli_name()).map_err(|e| from_meta(&e))? {
            let r = decode(&r)?;
            if matches_filter(&r, &req.volume, &req.node) {
                records.push(r);
            }
        }
        Ok(ListResponse { records, revision })
    }

    async fn heartbeat_here(&self, req: &HeartbeatRequest) -> Result<HeartbeatResponse, Fail> {
        validate_node_name("heartbeat.node", &req.node)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let k = Kind::Node.cli_name();
        let timeout_ms = u64::try_from(self.node_down_timeout.as_millis()).unwrap_or(u64::MAX);
        // Read-modify-write at the version read; retry when a write to the
        // node came in between (the other fields are not ours to overwrite).
        for _ in 0..16 {
            self.linearizable().await?;
            let stored = self.sm.get(k, &req.node).map_err(|e| from_meta(&e))?;
            let (mut node, expected) = match &stored {
                Some(r) => match decode(r)?.record {
                    Some(R::Node(n)) => (n, r.version),
                    _ => return Err(internal(format!("stored node {:?} is no Node", req.node))),
                },
                None => (
                    Node {
                        name: req.node.clone(),
                        ..Node::default()
                    },
                    0,
                ),
            };
            node.version = 0;
            node.disks.clone_from(&req.disks);
            for (field, given) in [
                (&mut node.address, &req.address),
                (&mut node.zone, &req.zone),
                (&mut node.nbd_address, &req.nbd_address),
                (&mut node.control_address, &req.control_address),
            ] {
                if !given.is_empty() {
                    field.clone_from(given);
                }
            }
            node.state = NodeState::Up.into();
            node.state_reason.clear();
            node.heartbeat_unix_ms = now_unix_ms();
            let data = cairn_proto::v1::Record {
                record: Some(R::Node(node.clone())),
            }
            .encode_to_vec();
            let cmd = Command::Put {
                kind: k.to_owned(),
                name: req.node.clone(),
                data,
                expected_version: Some(expected),
            };
            match self.write(cmd).await? {
                CommandResult::Ok { version } => {
                    node.version = version;
                    return Ok(HeartbeatResponse {
                        node: Some(node),
                        node_down_timeout_ms: timeout_ms,
                    });
                }
                CommandResult::Conflict { .. } => continue,
                other => return Err(internal(format!("unexpected result {other:?}"))),
            }
        }
        Err(Status::aborted(format!("{k} {:?} changes too fast to heartbeat", req.node)).into())
    }

    fn members_now(&self) -> MembersResponse {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| Member {
                id: *id,
                address: n.addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        MembersResponse { members }
    }

    async fn add_member_here(&self, req: &AddMemberRequest) -> Result<MembersResponse, Fail> {
        if req.address.is_empty() {
            return Err(Status::invalid_argument("address is empty").into());
        }
        self.raft
            .add_learner(req.id, BasicNode::new(&req.address), true)
            .await
            .map_err(write_err)?;
        let mut voters: BTreeSet<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        voters.insert(req.id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(write_err)?;
        Ok(self.members_now())
    }

    async fn remove_member_here(&self, req: &RemoveMemberRequest) -> Result<MembersResponse, Fail> {
        let (voters, known) = {
            let m = self.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            let known = membership.nodes().any(|(id, _)| *id == req.id);
            (voters, known)
        };
        if !known {
            return Err(Status::not_found(format!("no member {}", req.id)).into());
        }
        let mut rest = voters.clone();
        rest.remove(&req.id);
        if rest.is_empty() {
            return Err(Status::failed_precondition("cannot remove the last member").into());
        }
        if voters.contains(&req.id) {
            self.raft
                .change_membership(rest, false)
                .await
                .map_err(write_err)?;
        } else {
            let change = openraft::ChangeMembers::RemoveNodes(BTreeSet::from([req.id]));
            self.raft
                .change_membership(change, false)
                .await
                .map_err(write_err)?;
        }
        Ok(self.members_now())
    }
}

/// This member's clock, unix milliseconds (0 before 1970).
fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

fn mark<T>(inner: T) -> Request<T> {
    let mut r = Request::new(inner);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

/// Runs `$here` locally; when this member is not the leader, forwards the
/// request with `$call` on a client of the leader.
macro_rules! serve {
    ($self:ident, $req:ident, $here:ident, $call:ident) => {{
        let fwd = forwarded(&$req);
        let inner = $req.into_inner();
        match $self.$here(&inner).await {
            Ok(r) => Ok(Response::new(r)),
            Err(Fail::Status(s)) => Err(s),
            Err(Fail::NotLeader(f)) => {
                let mut client = $self.leader_client(&f, fwd)?;
                client.$call(mark(inner)).await
            }
        }
    }};
}

#[tonic::async_trait]
impl meta_server::Meta for MetaServer {
    type WatchStream = crate::watch_rpc::WatchStream;

    async fn create(&self, req: Request<CreateRequest>) -> Res<CreateResponse> {
        serve!(self, req, create_here, create)
    }

    async fn get(&self, req: Request<GetRequest>) -> Res<GetResponse> {
        serve!(self, req, get_here, get)
    }

    async fn list(&self, req: Request<ListRequest>) -> Res<ListResponse> {
        serve!(self, req, list_here, list)
    }

    async fn update(&self, req: Request<UpdateRequest>) -> Res<UpdateResponse> {
        serve!(self, req, update_here, update)
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Res<DeleteResponse> {
        serve!(self, req, delete_here, delete)
    }

    async fn watch(&self, req: Request<WatchRequest>) -> Res<Self::WatchStream> {
        crate::watch_rpc::watch(&self.sm, req.get_ref()).map(Response::new)
    }

    async fn add_member(&self, req: Request<AddMemberRequest>) -> Res<MembersResponse> {
        serve!(self, req, add_member_here, add_member)
    }

    async fn remove_member(&self, req: Request<RemoveMemberRequest>) -> Res<MembersResponse> {
        serve!(self, req, remove_member_here, remove_member)
    }

    async fn members(&self, _req: Request<MembersRequest>) -> Res<MembersResponse> {
        Ok(Response::new(self.members_now()))
    }

    async fn leader(&self, _req: Request<LeaderRequest>) -> Res<LeaderResponse> {
        let m = self.raft.metrics().borrow().clone();
        let resp = match m.current_leader {
            Some(id) => LeaderResponse {
                known: true,
                id,
                address: m
                    .membership_config
                    .membership()
                    .nodes()
                    .find(|(n, _)| **n == id)
                    .map(|(_, n)| n.addr.clone())
                    .unwrap_or_default(),
                term: m.current_term,
            },
            None => LeaderResponse::default(),
        };
        Ok(Response::new(resp))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Res<HeartbeatResponse> {
        serve!(self, req, heartbeat_here, heartbeat)
    }
}

// ------------------------------------------------------------------ member

/// A running member: its Raft and the gRPC services to serve on its address.
pub struct MetaMember {
    /// The member's Raft.
    pub raft: Raft,
    /// Its applied records.
    pub sm: StateMachineStore,
    node_down_timeout: Duration,
    /// Settings of the controller loop (`crate::controller`); dropping the
    /// member ends the loop.
    controller: tokio::sync::watch::Sender<crate::controller::Settings>,
}

/// The Raft timing of meta members: heartbeats every 100 ms, an election
/// after 0.5-1 s without one.
#[must_use]
pub fn raft_config() -> Config {
    Config {
        cluster_name: "cairn-meta".into(),
        heartbeat_interval: 100,
        election_timeout_min: 500,
        election_timeout_max: 1000,
        ..Default::default()
    }
}

/// Opens the store in `dir` and starts the Raft of member `id`.
///
/// # Errors
/// The store cannot be opened or Raft cannot start.
pub async fn start_member(
    id: NodeId,
    dir: &Path,
) -> Result<MetaMember, Box<dyn std::error::Error + Send + Sync>> {
    let (log, sm) = open_store(dir)?;
    let config = Arc::new(raft_config().validate()?);
    let raft = Raft::new(id, config, Network::new(id), log, sm.clone()).await?;
    let (controller, settings) = tokio::sync::watch::channel(crate::controller::Settings {
        tick: crate::controller::DEFAULT_TICK,
        node_down_timeout: DEFAULT_NODE_DOWN_TIMEOUT,
        replica_replenish_wait: crate::controller::DEFAULT_REPLICA_REPLENISH_WAIT,
    });
    crate::controller::spawn(raft.clone(), sm.clone(), settings);
    Ok(MetaMember {
        raft,
        sm,
        node_down_timeout: DEFAULT_NODE_DOWN_TIMEOUT,
        controller,
    })
}

impl MetaMember {
    /// Sets the node-down timeout of the Meta service [`Self::router`] serves
    /// (see [`MetaServer::with_node_down_timeout`]).
    #[must_use]
    pub fn with_node_down_timeout(mut self, timeout: Duration) -> Self {
        self.node_down_timeout = timeout;
        self.controller
            .send_modify(|s| s.node_down_timeout = timeout);
        self
    }

    /// Sets how long the controllers wait, after a node went DOWN, before its
    /// replicas are replaced on other nodes (default
    /// [`crate::controller::DEFAULT_REPLICA_REPLENISH_WAIT`]).
    #[must_use]
    pub fn with_replica_replenish_wait(self, wait: Duration) -> Self {
        self.controller
            .send_modify(|s| s.replica_replenish_wait = wait);
        self
    }

    /// Sets the time between two ticks of the controller loop (default
    /// [`crate::controller::DEFAULT_TICK`]).
    #[must_use]
    pub fn with_controller_tick(self, tick: Duration) -> Self {
        self.controller.send_modify(|s| s.tick = tick);
        self
    }

    /// Initializes a new cluster with `members` (id → address). A member that
    /// is already initialized ignores this (logged).
    ///
    /// # Errors
    /// Raft refuses for another reason than "already initialized".
    pub async fn initialize(
        &self,
        members: &BTreeMap<NodeId, String>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, a)| (*id, BasicNode::new(a)))
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(e))) => {
                tracing::info!("cluster already initialized: {e}");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The Meta and Raft services of this member, for one tonic server.
    #[must_use]
    pub fn router(&self) -> tonic::transport::server::Router {
        tonic::transport::Server::builder()
            .add_service(
                MetaServer::new(self.raft.clone(), self.sm.clone())
                    .with_node_down_timeout(self.node_down_timeout)
                    .into_server(),
            )
            .add_service(RaftService::new(self.raft.clone()).into_server())
    }
}
