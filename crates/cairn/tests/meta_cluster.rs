//! Three `cairn meta` processes on 127.0.0.11-13 in a private network namespace: records
//! created through a follower (forwarded) and the leader survive a SIGKILL of the leader,
//! a new leader takes writes, and the killed member catches up when restarted.

// tonic's calls return `tonic::Status` by value; the helpers pass it on.
#![allow(clippy::result_large_err)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::{
    record, CreateRequest, GetRequest, Key, Kind, LeaderRequest, ListRequest, Record, Volume,
};
use common::{cairn_bin, enter_private_netns, send_signal, wait_until, Proc};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

const ADDRS: [&str; 3] = ["127.0.0.11:7400", "127.0.0.12:7400", "127.0.0.13:7400"];
const MEMBERS: &str = "1=127.0.0.11:7400,2=127.0.0.12:7400,3=127.0.0.13:7400";
const LIMIT: Duration = Duration::from_secs(30);

fn start(id: u64, dir: &Path, init: bool) -> Proc {
    let mut cmd = Command::new(cairn_bin());
    cmd.args(["--log", "info", "meta", "--id", &id.to_string()])
        .args(["--listen", ADDRS[usize::try_from(id - 1).unwrap()]])
        .arg("--data-dir")
        .arg(dir.join(format!("m{id}")));
    if init {
        cmd.args(["--init", "--members", MEMBERS]);
    }
    Proc::spawn(&mut cmd, &format!("meta {id}"))
}

fn client(rt: &Runtime, id: u64) -> MetaClient<Channel> {
    let addr = ADDRS[usize::try_from(id - 1).unwrap()];
    let _guard = rt.enter();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    MetaClient::new(ch)
}

/// The leader `id` reported by member `via`, when it knows one.
fn leader_via(rt: &Runtime, via: u64) -> Option<u64> {
    let r = rt.block_on(client(rt, via).leader(LeaderRequest {})).ok()?;
    let r = r.into_inner();
    r.known.then_some(r.id)
}

fn volume(name: &str) -> Record {
    Record {
        record: Some(record::Record::Volume(Volume {
            name: name.into(),
            size_bytes: 1 << 20,
            replica_count: 3,
            ..Default::default()
        })),
    }
}

fn create(rt: &Runtime, via: u64, name: &str) -> Result<Record, tonic::Status> {
    let r = rt.block_on(client(rt, via).create(CreateRequest {
        record: Some(volume(name)),
    }))?;
    Ok(r.into_inner().record.unwrap())
}

fn get(rt: &Runtime, via: u64, name: &str) -> Result<Record, tonic::Status> {
    let r = rt.block_on(client(rt, via).get(GetRequest {
        key: Some(Key {
            kind: Kind::Volume as i32,
            name: name.into(),
        }),
    }))?;
    Ok(r.into_inner().record.unwrap())
}

fn version(r: &Record) -> u64 {
    cairn_proto::version_of(r).unwrap()
}

#[test]
fn meta_cluster_survives_leader_kill_and_member_catches_up() {
    if !enter_private_netns() {
        return;
    }
    // Threads of the runtime inherit this thread's network namespace.
    let rt = Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut procs: Vec<Option<Proc>> = vec![
        Some(start(1, tmp.path(), true)),
        Some(start(2, tmp.path(), false)),
        Some(start(3, tmp.path(), false)),
    ];

    let mut leader = 0;
    wait_until("a leader known to every member", LIMIT, || {
        let seen: Vec<Option<u64>> = (1..=3).map(|id| leader_via(&rt, id)).collect();
        if let Some(Some(l)) = seen.first() {
            if seen.iter().all(|s| *s == Some(*l)) {
                leader = *l;
                return true;
            }
        }
        false
    });
    let follower = (1..=3).find(|id| *id != leader).unwrap();

    // 10 through a follower (forwarded to the leader), 10 through the leader.
    let mut created = Vec::new();
    for i in 0..20 {
        let name = format!("vol{i}");
        let via = if i < 10 { follower } else { leader };
        let r = create(&rt, via, &name).unwrap_or_else(|e| panic!("create {name} via {via}: {e}"));
        assert_eq!(version(&r), 1, "{name}");
        created.push(name);
    }
    // A second create of the same name conflicts, also through a follower.
    let e = create(&rt, follower, "vol0").unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    // Reads through a follower see every record.
    let list = rt
        .block_on(client(&rt, follower).list(ListRequest {
            kind: Kind::Volume as i32,
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(list.records.len(), 20);
    assert!(list.revision > 0);

    // SIGKILL the leader.
    let killed = leader;
    let p = procs[usize::try_from(killed - 1).unwrap()].take().unwrap();
    send_signal(p.pid(), libc::SIGKILL);
    let run = p.finish(LIMIT);
    assert!(run.status.is_some(), "killed leader exited");
    assert!(
        run.stdout.contains(&format!("meta {killed} listening on")),
        "stdout: {}",
        run.stdout
    );
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != killed).collect();

    let mut new_leader = 0;
    wait_until("a new leader", LIMIT, || {
        match leader_via(&rt, survivors[0]) {
            Some(l) if l != killed && leader_via(&rt, survivors[1]) == Some(l) => {
                new_leader = l;
                true
            }
            _ => false,
        }
    });
    let other = survivors
        .iter()
        .copied()
        .find(|id| *id != new_leader)
        .unwrap();
    // Every record is there, the same through both survivors (the scheduling controller
    // may have updated a volume since it was created: versions are compared, not fixed).
    for name in &created {
        let a = get(&rt, new_leader, name)
            .unwrap_or_else(|e| panic!("get {name} via {new_leader}: {e}"));
        let b = get(&rt, other, name).unwrap_or_else(|e| panic!("get {name} via {other}: {e}"));
        assert!(version(&a) >= 1, "{name}: {a:?}");
        assert_eq!(a, b, "{name} through {new_leader} and {other}");
    }
    for i in 20..25 {
        let via = if i % 2 == 0 { other } else { new_leader };
        let name = format!("vol{i}");
        create(&rt, via, &name).unwrap_or_else(|e| panic!("create {name} via {via}: {e}"));
        created.push(name);
    }

    // The killed member, restarted on its data, catches up: its Gets (forwarded to the
    // leader) and its own applied state agree once it has rejoined.
    procs[usize::try_from(killed - 1).unwrap()] = Some(start(killed, tmp.path(), false));
    wait_until("the restarted member follows the new leader", LIMIT, || {
        leader_via(&rt, killed) == Some(new_leader)
    });
    wait_until("the restarted member serves every record", LIMIT, || {
        created
            .iter()
            .all(|n| get(&rt, killed, n).is_ok_and(|r| version(&r) >= 1))
    });
    let list = rt
        .block_on(client(&rt, killed).list(ListRequest {
            kind: Kind::Volume as i32,
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(list.records.len(), 25);

    // Its log holds everything: with the other survivor killed, a write commits only when
    // the restarted member has the whole log up to it.
    let p = procs[usize::try_from(other - 1).unwrap()].take().unwrap();
    send_signal(p.pid(), libc::SIGKILL);
    let _ = p.finish(LIMIT);
    let r =
        create(&rt, killed, "vol25").expect("create with only the leader and the restarted member");
    assert_eq!(version(&r), 1);
}
