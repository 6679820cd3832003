//! `cairn member` against real `cairn meta` processes in a private network namespace: a
//! one-member cluster holding volumes grows to three with `member add` (the new members catch
//! up and serve every record), loses its first member with `member remove`, keeps taking
//! writes, and refuses to remove an unknown member or the last one. Every check runs the
//! `cairn` binary.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{cairn_bin, enter_private_netns, run_bounded, wait_until, Proc, Run};

const ADDRS: [&str; 3] = ["127.0.0.1:11821", "127.0.0.1:11822", "127.0.0.1:11823"];
const LIMIT: Duration = Duration::from_secs(30);
const VOLUMES: [&str; 5] = ["vol-1", "vol-2", "vol-3", "vol-4", "vol-5"];

fn addr(id: u64) -> &'static str {
    ADDRS[usize::try_from(id - 1).unwrap()]
}

/// Starts member `id` on its own data dir; only member 1 initializes (alone).
fn start(id: u64, dir: &Path) -> Proc {
    let mut cmd = Command::new(cairn_bin());
    cmd.args(["--log", "info", "meta", "--id", &id.to_string()])
        .args(["--listen", addr(id)])
        .arg("--data-dir")
        .arg(dir.join(format!("m{id}")));
    if id == 1 {
        cmd.args(["--init", "--members", &format!("1={}", addr(1))]);
    }
    Proc::spawn(&mut cmd, &format!("meta {id}"))
}

/// Runs `cairn ARGS... --meta <member via>`, bounded.
fn cli(via: u64, args: &[&str]) -> Run {
    run_bounded(
        Command::new(cairn_bin())
            .args(args)
            .args(["--meta", addr(via)]),
        Duration::from_secs(60),
    )
}

fn code(r: &Run) -> Option<i32> {
    r.status.and_then(|s| s.code())
}

fn json(r: &Run, what: &str) -> serde_json::Value {
    r.expect_success(what);
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", r.stdout))
}

/// `member list --json` through `via`, when it succeeds.
fn members(via: u64) -> Option<Vec<serde_json::Value>> {
    let r = cli(via, &["member", "list", "--json"]);
    if !r.success() {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(&r.stdout)
        .ok()?
        .as_array()
        .cloned()
}

/// (id, address, role) of each member, and the leader's id, from a `--json` listing.
fn summary(list: &[serde_json::Value]) -> (Vec<(u64, String, String)>, Option<u64>) {
    let rows = list
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["address"].as_str().unwrap().to_owned(),
                m["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let leader = list
        .iter()
        .find(|m| m["leader"] == true)
        .and_then(|m| m["id"].as_u64());
    (rows, leader)
}

fn voters(ids: &[u64]) -> Vec<(u64, String, String)> {
    ids.iter()
        .map(|id| (*id, addr(*id).to_owned(), "voter".to_owned()))
        .collect()
}

/// Waits until `via` lists exactly the voters `ids` and knows a leader among them.
fn wait_voters(via: u64, ids: &[u64]) {
    wait_until(
        &format!("member {via} to list voters {ids:?} and a leader"),
        LIMIT,
        || {
            members(via).is_some_and(|l| {
                let (rows, leader) = summary(&l);
                rows == voters(ids) && leader.is_some_and(|id| ids.contains(&id))
            })
        },
    );
}

fn volume_json(via: u64, name: &str) -> Option<serde_json::Value> {
    let r = cli(via, &["volume", "get", name, "--json"]);
    r.success()
        .then(|| serde_json::from_str(&r.stdout).ok())
        .flatten()
}

#[test]
fn member_add_list_remove_through_the_cli() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _m1 = start(1, tmp.path());
    // The first list that succeeds means member 1 has made itself leader.
    wait_voters(1, &[1]);
    for name in VOLUMES {
        cli(1, &["volume", "create", name, "--size", "1GiB"])
            .expect_success(&format!("create {name}"));
    }

    // Refused before any RPC: nothing listens at the --meta address given here.
    for (args, want) in [
        (
            &["member", "add", "--id", "0", "--address", ADDRS[1]][..],
            "--id",
        ),
        (
            &["member", "add", "--id", "2", "--address", ""][..],
            "--address",
        ),
        (&["member", "remove", "--id", "0"][..], "--id"),
    ] {
        let r = run_bounded(
            Command::new(cairn_bin())
                .args(args)
                .args(["--meta", "127.0.0.1:1"]),
            LIMIT,
        );
        assert_eq!(code(&r), Some(1), "{args:?}: {r:?}");
        assert!(r.stderr.starts_with("error: "), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
    }

    let _m2 = start(2, tmp.path());
    let _m3 = start(3, tmp.path());
    // Each add waits for the new member to catch up; its output is the new member list.
    for id in [2u64, 3] {
        let r = cli(
            1,
            &[
                "member",
                "add",
                "--id",
                &id.to_string(),
                "--address",
                addr(id),
            ],
        );
        r.expect_success(&format!("member add {id}"));
        assert!(
            r.stdout
                .lines()
                .any(|l| l.contains(addr(id)) && l.contains("voter")),
            "add {id}: {}",
            r.stdout
        );
    }
    let list = members(1).expect("member list through member 1");
    let (rows, leader) = summary(&list);
    assert_eq!(rows, voters(&[1, 2, 3]), "{list:?}");
    assert_eq!(leader, Some(1), "{list:?}");
    wait_voters(3, &[1, 2, 3]);
    // The table names the leader too.
    let r = cli(3, &["member", "list"]);
    r.expect_success("member list (table)");
    assert!(
        r.stdout
            .lines()
            .any(|l| l.contains(ADDRS[0]) && l.trim_end().ends_with('*')),
        "{}",
        r.stdout
    );

    // Member 3 serves every volume as member 1 does (a controller update may land between
    // two reads, so compare until both agree).
    for name in VOLUMES {
        wait_until(&format!("{name} read alike via 1 and 3"), LIMIT, || {
            let a = volume_json(1, name);
            a.is_some() && a == volume_json(3, name)
        });
        let v = volume_json(3, name).unwrap();
        assert_eq!(v["name"], name);
        assert_eq!(v["size_bytes"], 1u64 << 30);
    }

    // Remove the first member (the leader) through member 2.
    let r = cli(2, &["member", "remove", "--id", "1"]);
    r.expect_success("member remove 1");
    assert!(!r.stdout.contains(ADDRS[0]), "{}", r.stdout);
    wait_voters(2, &[2, 3]);
    wait_voters(3, &[2, 3]);

    // The two left take writes, through either of them.
    let r = cli(3, &["volume", "create", "vol-6", "--size", "1GiB"]);
    r.expect_success("create vol-6 via 3");
    assert_eq!(r.stdout.trim(), "vol-6");
    let v = json(&cli(2, &["volume", "get", "vol-6", "--json"]), "get vol-6");
    assert_eq!(v["name"], "vol-6");
    let list = json(&cli(2, &["volume", "list", "--json"]), "volume list");
    assert_eq!(list.as_array().map(Vec::len), Some(6), "{list}");

    // An unknown member is refused, naming it.
    let r = cli(2, &["member", "remove", "--id", "9"]);
    assert_eq!(code(&r), Some(1), "remove 9: {r:?}");
    assert!(r.stderr.contains("no member 9"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);

    // Down to one member, then the last one stays.
    cli(2, &["member", "remove", "--id", "3"]).expect_success("member remove 3");
    wait_voters(2, &[2]);
    let r = cli(2, &["member", "remove", "--id", "2"]);
    assert_eq!(code(&r), Some(1), "remove the last member: {r:?}");
    assert!(
        r.stderr.contains("member 2") && r.stderr.contains("last member"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    wait_voters(2, &[2]);
    cli(2, &["volume", "create", "vol-7", "--size", "1GiB"]).expect_success("create vol-7");
}
