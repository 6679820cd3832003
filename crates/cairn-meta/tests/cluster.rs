//! A 3-member in-process cluster: the network routes RPCs straight to the
//! other members' `Raft` handles. Shows that a write on the leader is applied
//! on every member and that the survivors elect a new leader when the leader
//! stops.

// openraft's network trait returns `RPCError` by value; the helpers share it.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_meta::{open_store, Command, CommandResult, NodeId, Raft, StateMachineStore, TypeConfig};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config};
use tempfile::TempDir;

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// Routes RPCs to the members registered in it; a removed member is
/// unreachable.
#[derive(Clone, Default)]
struct Router {
    members: Arc<Mutex<BTreeMap<NodeId, Raft>>>,
}

struct Client {
    router: Router,
    target: NodeId,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Client {
    fn raft<E: std::error::Error>(&self) -> RpcResult<Raft, E> {
        let members = self.router.members.lock().unwrap();
        members.get(&self.target).cloned().ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&io::Error::other("member stopped")))
        })
    }

    fn remote<T, E: std::error::Error>(
        &self,
        r: Result<T, RaftError<NodeId, E>>,
    ) -> RpcResult<T, E> {
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetworkFactory<TypeConfig> for Router {
    type Network = Client;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Client {
        Client {
            router: self.clone(),
            target,
        }
    }
}

impl RaftNetwork<TypeConfig> for Client {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let raft = self.raft()?;
        self.remote(raft.append_entries(rpc).await)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let raft = self.raft()?;
        self.remote(raft.install_snapshot(rpc).await)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let raft = self.raft()?;
        self.remote(raft.vote(rpc).await)
    }
}

struct Member {
    raft: Raft,
    sm: StateMachineStore,
    _dir: TempDir,
}

async fn start_cluster(router: &Router) -> BTreeMap<NodeId, Member> {
    let config = Arc::new(
        Config {
            heartbeat_interval: 50,
            election_timeout_min: 200,
            election_timeout_max: 400,
            ..Default::default()
        }
        .validate()
        .unwrap(),
    );
    let mut members = BTreeMap::new();
    for id in 1..=3 {
        let dir = TempDir::new().unwrap();
        let (log, sm) = open_store(dir.path()).unwrap();
        let raft = Raft::new(id, config.clone(), router.clone(), log, sm.clone())
            .await
            .unwrap();
        router.members.lock().unwrap().insert(id, raft.clone());
        members.insert(
            id,
            Member {
                raft,
                sm,
                _dir: dir,
            },
        );
    }
    let voters: BTreeMap<NodeId, BasicNode> =
        (1..=3).map(|id| (id, BasicNode::default())).collect();
    members[&1].raft.initialize(voters).await.unwrap();
    members
}

async fn leader_of(members: &BTreeMap<NodeId, Member>, not: Option<NodeId>) -> NodeId {
    let any = members.values().next().unwrap();
    let m = any
        .raft
        .wait(WAIT)
        .metrics(
            |m| m.current_leader.is_some() && m.current_leader != not,
            "a leader",
        )
        .await
        .unwrap();
    m.current_leader.unwrap()
}

fn put(name: &str, expected_version: Option<u64>) -> Command {
    Command::Put {
        kind: "volume".into(),
        name: name.into(),
        data: name.as_bytes().to_vec(),
        expected_version,
    }
}

/// Writes on the leader and waits until every member applied it.
async fn write_everywhere(
    members: &BTreeMap<NodeId, Member>,
    leader: NodeId,
    cmd: Command,
) -> CommandResult {
    let resp = members[&leader].raft.client_write(cmd).await.unwrap();
    for m in members.values() {
        m.raft
            .wait(WAIT)
            .applied_index_at_least(Some(resp.log_id.index), "write applied")
            .await
            .unwrap();
    }
    resp.data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_on_leader_is_applied_everywhere_and_leader_loss_elects_new_leader() {
    let router = Router::default();
    let mut members = start_cluster(&router).await;
    let leader = leader_of(&members, None).await;

    let res = write_everywhere(&members, leader, put("vol0", Some(0))).await;
    assert_eq!(res, CommandResult::Ok { version: 1 });
    for m in members.values() {
        let rec = m.sm.get("volume", "vol0").unwrap().unwrap();
        assert_eq!((rec.version, rec.data.as_slice()), (1, &b"vol0"[..]));
    }
    // A conflicting create is a result, replicated like any other.
    let res = write_everywhere(&members, leader, put("vol0", Some(0))).await;
    assert_eq!(res, CommandResult::Conflict { current: Some(1) });

    // Stop the leader: unreachable for the others, then shut down.
    router.members.lock().unwrap().remove(&leader);
    let old = members.remove(&leader).unwrap();
    old.raft.shutdown().await.unwrap();

    let new_leader = leader_of(&members, Some(leader)).await;
    assert_ne!(new_leader, leader);
    let res = write_everywhere(&members, new_leader, put("vol0", Some(1))).await;
    assert_eq!(res, CommandResult::Ok { version: 2 });
    let versions: BTreeSet<u64> = members
        .values()
        .map(|m| m.sm.get("volume", "vol0").unwrap().unwrap().version)
        .collect();
    assert_eq!(versions, BTreeSet::from([2]));
}
