//! One initialized single-member meta cluster on a loopback port, and a client of it.

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_meta::{start_member, MetaMember};
use cairn_proto::v1::meta_client::MetaClient;
use tempfile::TempDir;
use tonic::transport::Channel;

pub struct One {
    pub client: MetaClient<Channel>,
    /// Keeps the member running; not every test binary reads it.
    #[allow(dead_code)]
    pub member: MetaMember,
    _dir: TempDir,
}

/// Starts member 1 in a temporary directory, configured by `configure` (node-down
/// timeout, controller tick), serves it on 127.0.0.1, initializes it as the only member
/// and waits until it leads.
pub async fn one(configure: impl FnOnce(MetaMember) -> MetaMember) -> One {
    let dir = tempfile::tempdir().unwrap();
    let member = configure(start_member(1, dir.path()).await.unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming =
        tonic::transport::server::TcpIncoming::from_listener(listener, true, None).unwrap();
    tokio::spawn(member.router().serve_with_incoming(incoming));
    member
        .initialize(&BTreeMap::from([(1, addr.clone())]))
        .await
        .unwrap();
    member
        .raft
        .wait(Some(Duration::from_secs(10)))
        .current_leader(1, "leader elected")
        .await
        .unwrap();
    let client = MetaClient::connect(format!("http://{addr}")).await.unwrap();
    One {
        client,
        member,
        _dir: dir,
    }
}
