//! Self-healing across nodes with the metadata service and agents (`cairn dev` with
//! `--nodes`): a node killed under fio verify is declared down, its replica replaced on the
//! spare node and rebuilt while I/O goes on, and its stale replica removed when it returns; a
//! node cut off by nftables is replaced the same way and cleaned up when healed; the meta
//! leader of three is killed and a new one serves with every record and the controllers
//! still at work; an agent killed mid-rebuild has its rebuild restarted. Every test compares
//! the data read back with what was written and the replicas' digests with each other.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Writes `len` random bytes at 0 to vol0, flushes, and returns them.
fn write_data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let data = random_bytes(&mut rng, len);
    write_vol0(0, &data);
    data
}

/// A node holding a live replica of vol0 other than `not` (vol0's engine runs on node-1).
fn replica_node(c: &Cluster, not: &str) -> (String, String) {
    let reps = c.replicas();
    let r = live(&reps)
        .into_iter()
        .find(|r| s(r, "node") != not)
        .unwrap_or_else(|| panic!("a replica off {not}: {reps:#?}"))
        .clone();
    (s(&r, "node").to_owned(), s(&r, "name").to_owned())
}

/// Waits until `old` is marked deleted (stale) and vol0 is healthy again with 3 live RW
/// replicas on distinct nodes, none on `dead`; returns the replacement's (name, node): the
/// live replica with the highest number.
fn wait_replaced(c: &Cluster, old: &str, dead: &str, limit: Duration) -> (String, String) {
    let deadline = std::time::Instant::now() + limit;
    let last = loop {
        let reps = c.replicas();
        let vol = c.volume();
        let old_gone = reps
            .iter()
            .any(|r| s(r, "name") == old && r["deleted"] == true && s(r, "health") == "stale");
        let l = live(&reps);
        if old_gone
            && l.len() == 3
            && l.iter()
                .all(|r| s(r, "mode") == "rw" && s(r, "node") != dead)
            && s(&vol, "state") == "healthy"
        {
            break reps;
        }
        if std::time::Instant::now() > deadline {
            let log = c.log();
            let warnings: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("rebuil"))
                .collect();
            panic!(
                "timed out after {limit:?} waiting for {old} on {dead} to be replaced and vol0 \
                 healthy\nvolume: {vol:#}\nreplicas: {reps:#?}\nengine: {:#}\nlog (warnings):\n{}",
                c.status(),
                warnings[warnings.len().saturating_sub(80)..].join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let l = live(&last);
    let mut nodes: Vec<&str> = l.iter().map(|r| s(r, "node")).collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "replicas on distinct nodes: {last:#?}");
    let number = |r: &serde_json::Value| {
        s(r, "name")
            .rsplit('r')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let new = l.iter().max_by_key(|r| number(r)).expect("a live replica");
    (s(new, "name").to_owned(), s(new, "node").to_owned())
}

/// Waits until replica `name`'s record and its data directory on `node` are gone.
fn wait_cleaned_up(c: &Cluster, node: &str, name: &str, limit: Duration) {
    let dir = c.replica_dir(node, name);
    wait_until(
        &format!(
            "stale {name} on {node} to be removed (record and {})",
            dir.display()
        ),
        limit,
        || !dir.exists() && c.replicas().iter().all(|r| s(r, "name") != name),
    );
}

#[test]
fn node_killed_under_fio_is_replaced_rebuilt_and_cleaned_up_when_it_returns() {
    if !enter_private_netns() || !have_tools(&["fio"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(4).start(&tmp.path().join("data"));
    let want = write_data(64 << 20, 0x500);
    let fio = FioLoop::start("128M", "96M", "64k");
    wait_until("fio to write", Duration::from_secs(60), || {
        c.status()["replicas"][0]["writes"].as_u64().unwrap_or(0) > 200
    });
    let (victim, old) = replica_node(&c, "node-1");
    let spare = c
        .nodes()
        .iter()
        .map(|n| s(n, "name").to_owned())
        .find(|n| c.replicas().iter().all(|r| s(r, "node") != n))
        .expect("a node without a replica of vol0");
    let lock = c.kill_agent_and_hold(&victim);

    let (new, node) = wait_replaced(&c, &old, &victim, Duration::from_secs(180));
    assert_eq!(node, spare, "the replacement {new} went to the spare node");
    let runs = fio.finish();
    assert!(runs >= 1, "fio finished a run");
    let status = c.status();
    let job = &replica_status(&status, &new)["rebuild"];
    assert_eq!(job["kind"], "rebuild", "{status:#}");
    assert_eq!(job["state"], "done", "{status:#}");
    c.assert_verified("after the replacement");
    assert_vol0(&want, "data written before the node died");
    assert!(
        c.replica_dir(&victim, &old).exists(),
        "the dead node's data stays while it is away"
    );

    // The node returns: its replica was replaced, so its agent removes it.
    drop(lock);
    wait_cleaned_up(&c, &victim, &old, Duration::from_secs(90));
    wait_until(
        "the returned node to be up",
        Duration::from_secs(30),
        || {
            c.nodes()
                .iter()
                .any(|n| s(n, "name") == victim && s(n, "state") == "up")
        },
    );
    c.assert_verified("after the node returned");
    assert_vol0(&want, "data after the node returned");
    c.stop();
}

/// nftables inside the test's namespace: drops every packet from or to `ip`.
fn cut_off(ip: &str) {
    let rules = format!(
        "table inet cairn_cut {{\n\
           chain input {{ type filter hook input priority 0; ip saddr {ip} drop; ip daddr {ip} drop; }}\n\
           chain output {{ type filter hook output priority 0; ip saddr {ip} drop; ip daddr {ip} drop; }}\n\
         }}\n"
    );
    let path = std::env::temp_dir().join(format!("cairn-cut-{}.nft", std::process::id()));
    std::fs::write(&path, rules).unwrap();
    run_bounded(
        Command::new("nft").arg("-f").arg(&path),
        Duration::from_secs(10),
    )
    .expect_success("nft -f (cut off)");
    let _ = std::fs::remove_file(path);
}

fn heal_cut() {
    run_bounded(
        Command::new("nft").args(["delete", "table", "inet", "cairn_cut"]),
        Duration::from_secs(10),
    )
    .expect_success("nft delete table");
}

#[test]
fn partitioned_node_is_replaced_and_its_stale_replica_removed_when_healed() {
    if !enter_private_netns() || !have_tools(&["nft"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(4).start(&tmp.path().join("data"));
    let want = write_data(32 << 20, 0x501);
    let (victim, old) = replica_node(&c, "node-1");
    let ip = c
        .nodes()
        .iter()
        .find(|n| s(n, "name") == victim)
        .map(|n| s(n, "address").rsplit_once(':').unwrap().0.to_owned())
        .unwrap();
    let agent = c.agent_pid(&victim);
    cut_off(&ip);
    // Writes go on while the node is cut off: the engine fails its replica.
    let mut nbd = NbdClient::connect(CLUSTER_NBD, "vol0");
    let mut rng = Rng::new(0x502);
    let more = random_bytes(&mut rng, 8 << 20);
    nbd.write(32 << 20, &more)
        .expect("write while a node is cut off");
    nbd.flush().expect("flush");
    let mut want = want;
    want.extend_from_slice(&more);
    wait_until(
        &format!("{victim} to be down"),
        Duration::from_secs(60),
        || {
            c.nodes()
                .iter()
                .any(|n| s(n, "name") == victim && s(n, "state") == "down")
        },
    );
    let (new, node) = wait_replaced(&c, &old, &victim, Duration::from_secs(180));
    assert_ne!(node, victim);
    assert!(proc_alive(agent), "the cut-off agent kept running");
    c.assert_verified(&format!("with {new} rebuilt"));
    heal_cut();
    wait_cleaned_up(&c, &victim, &old, Duration::from_secs(90));
    assert_eq!(
        c.agent_pid(&victim),
        agent,
        "the same agent process cleaned up"
    );
    assert_vol0(&want, "data after the partition healed");
    c.assert_verified("after the partition healed");
    c.stop();
}

/// The leader id and term member `addr` reports, through the gRPC API.
fn leader_via(rt: &tokio::runtime::Runtime, addr: &str) -> Option<(u64, u64)> {
    use cairn_proto::v1::{meta_client::MetaClient, LeaderRequest};
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .ok()?;
        let r = MetaClient::new(ch).leader(LeaderRequest {}).await.ok()?;
        let r = r.into_inner();
        r.known.then_some((r.id, r.term))
    })
}

#[test]
fn meta_leader_killed_a_new_one_serves_every_record_and_controllers_go_on() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(4).meta(3).start(&tmp.path().join("data"));
    let want = write_data(16 << 20, 0x503);
    let before_nodes: Vec<String> = c.nodes().iter().map(|n| s(n, "name").to_owned()).collect();
    let before_reps: Vec<String> = c
        .replicas()
        .iter()
        .map(|r| s(r, "name").to_owned())
        .collect();
    assert_eq!(before_nodes.len(), 4);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addrs = ["127.0.0.1:10811", "127.0.0.1:10812", "127.0.0.1:10813"];
    let (mut leader, mut term) = (0, 0);
    wait_until("a leader", Duration::from_secs(30), || {
        (leader, term) = leader_via(&rt, addrs[0]).unwrap_or((0, 0));
        leader != 0
    });
    let pid_file = c
        .dir
        .join("meta")
        .join(format!("m{leader}"))
        .join("meta.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(children_of(c.pid()).contains(&pid));
    send_signal(pid, libc::SIGKILL);
    // Keep it down (its restart cannot take the directory's lock), so a survivor must lead.
    let meta_dir = pid_file.parent().unwrap().to_owned();
    let mut meta_lock = None;
    wait_until(
        "the killed member's lock",
        Duration::from_millis(800),
        || {
            meta_lock = cairn_replica::lock_data_dir(&meta_dir).expect("lock");
            meta_lock.is_some()
        },
    );
    let survivors: Vec<&str> = (1..=3u64)
        .filter(|i| *i != leader)
        .map(|i| addrs[(i - 1) as usize])
        .collect();
    // A leader of a newer term that both survivors know, and that takes a write through a
    // survivor.
    let killed_at = std::time::Instant::now();
    wait_until(
        "a leader of a newer term",
        Duration::from_secs(15),
        || match leader_via(&rt, survivors[0]) {
            Some((l, t)) if t > term && l != leader => {
                leader_via(&rt, survivors[1]).is_some_and(|(l2, _)| l2 == l)
            }
            _ => false,
        },
    );
    c.cli(&[
        "volume",
        "create",
        "after-kill",
        "--size",
        "64MiB",
        "--replicas",
        "1",
        "--meta",
        survivors[1],
    ]);
    let served = killed_at.elapsed();
    assert!(
        served < Duration::from_secs(20),
        "the API served a write {served:?} after the kill"
    );
    // Every record is still there (read through a survivor).
    let via = survivors[0];
    via.clone_into(&mut c.meta);
    let out = c.cli(&["node", "list", "--json", "--meta", via]);
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut names: Vec<String> = nodes.iter().map(|n| s(n, "name").to_owned()).collect();
    names.sort();
    assert_eq!(names, before_nodes);
    let out = c.cli(&["replica", "list", "--json", "--meta", via]);
    let reps: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let names: Vec<String> = reps
        .iter()
        .filter(|r| s(r, "volume") == "vol0")
        .map(|r| s(r, "name").to_owned())
        .collect();
    assert_eq!(names, before_reps);

    // The controllers run on the new leader: a dead node's replica is replaced.
    let (victim, old) = replica_node(&c, "node-1");
    let lock = c.kill_agent_and_hold(&victim);
    let (new, _) = wait_replaced(&c, &old, &victim, Duration::from_secs(180));
    assert!(!before_reps.contains(&new), "{new} is a new replica");
    c.assert_verified("after the replacement under the new leader");
    assert_vol0(&want, "data after the leader change and the replacement");
    drop(lock);
    wait_cleaned_up(&c, &victim, &old, Duration::from_secs(90));
    // The killed member comes back and catches up: reads through it see the new volume.
    drop(meta_lock);
    let killed_addr = addrs[(leader - 1) as usize];
    wait_until(
        "the killed member to serve again",
        Duration::from_secs(60),
        || {
            run_bounded(
                Command::new(cairn_bin()).args([
                    "volume",
                    "get",
                    "after-kill",
                    "--meta",
                    killed_addr,
                ]),
                Duration::from_secs(10),
            )
            .success()
        },
    );
    c.stop();
}

#[test]
fn agent_killed_mid_rebuild_has_the_rebuild_restarted_and_data_intact() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // 96 MiB at 16 MiB/s: the rebuild lasts about 6 s.
    let mut c = ClusterOpts::new(4)
        .arg("--rebuild-rate")
        .arg("16MiB")
        .start(&tmp.path().join("data"));
    let want = write_data(96 << 20, 0x504);
    let (victim, old) = replica_node(&c, "node-1");
    let lock = c.kill_agent_and_hold(&victim);
    // The replacement appears and its rebuild runs.
    let mut target = (String::new(), String::new());
    wait_until(
        "a replacement being rebuilt",
        Duration::from_secs(120),
        || {
            let reps = c.replicas();
            let Some(r) = live(&reps).into_iter().find(|r| {
                s(r, "node") != victim
                    && !c.status()["replicas"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|x| x["id"] != s(r, "name"))
                    && {
                        let st = c.status();
                        let j = &replica_status(&st, s(r, "name"))["rebuild"];
                        j["state"] == "running" && j["bytes_done"].as_u64().unwrap_or(0) > 8 << 20
                    }
            }) else {
                return false;
            };
            target = (s(r, "name").to_owned(), s(r, "node").to_owned());
            true
        },
    );
    let (new, node) = target;
    // Kill the agent holding the rebuild target; cairn dev restarts it.
    let pid = c.kill_agent(&node);
    wait_until(
        &format!("agent of {node} to be restarted"),
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(c.node_dir(&node).join("agent.pid"))
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .is_some_and(|p| p != pid && proc_alive(p))
        },
    );
    let (done, _) = wait_replaced(&c, &old, &victim, Duration::from_secs(180));
    assert_eq!(done, new, "the same replacement finished");
    let status = c.status();
    let job = &replica_status(&status, &new)["rebuild"];
    assert_eq!(job["state"], "done", "{status:#}");
    c.assert_verified("after the restarted rebuild");
    assert_vol0(&want, "data after the restarted rebuild");
    drop(lock);
    wait_cleaned_up(&c, &victim, &old, Duration::from_secs(90));
    c.stop();
}

#[test]
fn whole_cluster_restarted_after_every_node_was_down_serves_the_data() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut c = ClusterOpts::new(3).start(&dir);
    let want = write_data(16 << 20, 0x505);
    c.stop();
    drop(c);
    // Restart with every agent kept from starting until meta has declared every node down
    // (as after a power loss longer than the node-down timeout).
    let locks: Vec<std::fs::File> = (1..=3)
        .map(|j| {
            let d = dir.join("nodes").join(format!("node-{j}")).join("replicas");
            cairn_replica::lock_data_dir(&d)
                .expect("lock")
                .expect("no agent runs")
        })
        .collect();
    let starter = {
        let dir = dir.clone();
        std::thread::spawn(move || ClusterOpts::new(3).start(&dir))
    };
    wait_until("every node down", Duration::from_secs(60), || {
        let r = run_bounded(
            Command::new(cairn_bin()).args(["node", "list", "--json"]),
            Duration::from_secs(10),
        );
        r.success()
            && serde_json::from_str::<Vec<serde_json::Value>>(&r.stdout)
                .is_ok_and(|ns| ns.len() == 3 && ns.iter().all(|n| s(n, "state") == "down"))
    });
    drop(locks);
    let mut c = starter.join().expect("cairn dev serves again");
    assert_vol0(&want, "data after the whole-cluster restart");
    wait_until("vol0 healthy", Duration::from_secs(120), || {
        s(&c.volume(), "state") == "healthy"
    });
    c.assert_verified("after the whole-cluster restart");
    c.stop();
}

#[test]
fn best_effort_locality_moves_a_replica_to_the_attaching_node() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(4).start(&tmp.path().join("data"));
    c.cli(&[
        "volume",
        "create",
        "loc",
        "--size",
        "64MiB",
        "--replicas",
        "2",
        "--data-locality",
        "best-effort",
    ]);
    let replicas_of_loc = || -> Vec<serde_json::Value> {
        serde_json::from_str(&c.cli(&["replica", "list", "--volume", "loc", "--json"])).unwrap()
    };
    let placed = replicas_of_loc();
    assert_eq!(live(&placed).len(), 2, "{placed:#?}");
    let nodes = c.nodes();
    let target = nodes
        .iter()
        .find(|n| placed.iter().all(|r| s(r, "node") != s(n, "name")))
        .expect("a node without a replica of loc");
    let (name, nbd, control) = (
        s(target, "name").to_owned(),
        s(target, "nbd_address").to_owned(),
        s(target, "control_address").to_owned(),
    );
    let uri = c.cli(&["volume", "attach", "loc", "--node", &name]);
    assert_eq!(uri.trim(), format!("nbd://{nbd}/loc"));
    let mut rng = Rng::new(0x506);
    let data = random_bytes(&mut rng, 8 << 20);
    let mut nbd_client = NbdClient::connect(&nbd, "loc");
    for (k, piece) in data.chunks(4 << 20).enumerate() {
        nbd_client
            .write((k as u64) * (4 << 20), piece)
            .expect("write loc");
    }
    nbd_client.flush().expect("flush loc");

    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let last = loop {
        let reps = replicas_of_loc();
        let l = live(&reps);
        // The surplus replica is marked deleted ("removed for data locality"), then its
        // agent removes its data and its record: either may be seen here.
        for r in &reps {
            if r["deleted"] == true {
                assert!(
                    s(r, "health_reason").starts_with("removed for data locality"),
                    "{r:#}"
                );
            }
        }
        let gone = placed
            .iter()
            .filter(|p| !l.iter().any(|r| s(r, "name") == s(p, "name")))
            .count();
        if l.len() == 2
            && l.iter().all(|r| s(r, "mode") == "rw")
            && l.iter().any(|r| s(r, "node") == name)
            && gone == 1
        {
            break reps;
        }
        if std::time::Instant::now() > deadline {
            let vol = c.cli(&["volume", "get", "loc", "--json"]);
            let status = c.cli(&["volume", "status", "loc", "--json", "--endpoint", &control]);
            panic!(
                "no local replica RW with one other removed within 120 s\nvolume: {vol}\n\
                 replicas: {reps:#?}\nengine: {status}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let removed = placed
        .iter()
        .find(|p| !live(&last).iter().any(|r| s(r, "name") == s(p, "name")))
        .map(|r| (s(r, "node").to_owned(), s(r, "name").to_owned()))
        .unwrap();
    let dir = c
        .node_dir(&removed.0)
        .join("replicas")
        .join("loc")
        .join(&removed.1);
    wait_until(
        "the removed replica's data to be gone",
        Duration::from_secs(60),
        || !dir.exists() && replicas_of_loc().iter().all(|r| s(r, "name") != removed.1),
    );
    let r = run_bounded(
        Command::new(cairn_bin()).args(["volume", "verify", "loc", "--endpoint", &control]),
        Duration::from_secs(120),
    );
    assert!(r.success(), "verify loc:\n{}{}", r.stdout, r.stderr);
    let mut got = nbd_client.read(0, 4 << 20).expect("read loc");
    got.extend(nbd_client.read(4 << 20, 4 << 20).expect("read loc"));
    assert_same_bytes(&got, &data, "loc after the move");
    c.stop();
}

#[test]
fn deleted_volume_has_its_replicas_removed_from_every_node() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ClusterOpts::new(3).start(&tmp.path().join("data"));
    c.cli(&[
        "volume",
        "create",
        "gone",
        "--size",
        "64MiB",
        "--replicas",
        "3",
    ]);
    let uri = c.cli(&["volume", "attach", "gone", "--node", "node-2"]);
    let nbd = uri
        .trim()
        .trim_start_matches("nbd://")
        .trim_end_matches("/gone")
        .to_owned();
    let mut client = NbdClient::connect(&nbd, "gone");
    let mut rng = Rng::new(0x507);
    client
        .write(0, &random_bytes(&mut rng, 1 << 20))
        .expect("write gone");
    client.flush().expect("flush gone");
    drop(client);
    let reps: Vec<serde_json::Value> =
        serde_json::from_str(&c.cli(&["replica", "list", "--volume", "gone", "--json"])).unwrap();
    assert_eq!(reps.len(), 3);
    let dirs: Vec<std::path::PathBuf> = reps
        .iter()
        .map(|r| {
            c.node_dir(s(r, "node"))
                .join("replicas")
                .join("gone")
                .join(s(r, "name"))
        })
        .collect();
    assert!(dirs.iter().all(|d| d.exists()), "{dirs:?}");

    // The CLI finds the engine on node-2 through meta (no --endpoint).
    let status: serde_json::Value =
        serde_json::from_str(&c.cli(&["volume", "status", "gone", "--json"])).unwrap();
    assert_eq!(status["volume"], "gone", "{status:#}");
    assert_eq!(
        status["replicas"].as_array().map(Vec::len),
        Some(3),
        "{status:#}"
    );

    // Attached: refused, nothing removed.
    let r = run_bounded(
        Command::new(cairn_bin()).args(["volume", "delete", "gone"]),
        Duration::from_secs(30),
    );
    assert_eq!(r.status.and_then(|s| s.code()), Some(1), "{r:?}");
    assert!(r.stderr.contains("attached to node node-2"), "{}", r.stderr);
    assert!(dirs.iter().all(|d| d.exists()));

    c.cli(&["volume", "detach", "gone"]);
    let r = run_bounded(
        Command::new(cairn_bin()).args(["volume", "status", "gone"]),
        Duration::from_secs(30),
    );
    assert_eq!(r.status.and_then(|s| s.code()), Some(1), "{r:?}");
    assert!(
        r.stderr.contains("volume gone is not attached"),
        "{}",
        r.stderr
    );
    c.cli(&["volume", "delete", "gone"]);
    wait_until(
        "every replica of gone removed",
        Duration::from_secs(60),
        || {
            dirs.iter().all(|d| !d.exists())
                && c.cli(&["replica", "list", "--volume", "gone", "--json"])
                    .trim()
                    == "[]"
        },
    );
    // vol0 is untouched.
    c.assert_verified("vol0 after deleting another volume");
    c.stop();
}
