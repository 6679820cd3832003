//! The volume, node and replica CLI against one real `cairn meta` member in a private network
//! namespace: create, duplicate and invalid creates, list/get as JSON, unknown volumes,
//! delete, and the empty node and replica listings. Every check runs the `cairn` binary.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{cairn_bin, enter_private_netns, run_bounded, wait_until, Proc, Run};

const META: &str = "127.0.0.21:10811";
const LIMIT: Duration = Duration::from_secs(30);

/// Runs `cairn ARGS... --meta META`, bounded.
fn cli(args: &[&str]) -> Run {
    run_bounded(
        Command::new(cairn_bin()).args(args).args(["--meta", META]),
        LIMIT,
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

#[test]
fn volume_node_replica_cli_against_meta() {
    if !enter_private_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _meta = Proc::spawn(
        Command::new(cairn_bin())
            .args(["--log", "info", "meta", "--id", "1", "--listen", META])
            .arg("--data-dir")
            .arg(tmp.path().join("m1"))
            .args(["--init", "--members", &format!("1={META}")]),
        "meta 1",
    );
    // The first list that succeeds means meta has a leader and serves the API.
    wait_until("meta serves volume list", LIMIT, || {
        cli(&["volume", "list", "--json"]).success()
    });

    let r = cli(&["volume", "create", "vol-a", "--size", "1GiB"]);
    r.expect_success("create vol-a");
    assert_eq!(r.stdout.trim(), "vol-a");
    // No node: the create says so instead of succeeding silently.
    assert!(
        r.stderr.contains("warning: volume vol-a is creating")
            && r.stderr.contains("0 of 3 replicas placed"),
        "{}",
        r.stderr
    );

    let r = cli(&["volume", "create", "vol-a", "--size", "1GiB"]);
    assert_eq!(code(&r), Some(1), "duplicate: {r:?}");
    assert!(
        r.stderr.contains("volume vol-a already exists"),
        "{}",
        r.stderr
    );

    let r = cli(&["volume", "create", "vol-b", "--size", "1000"]);
    assert!(!r.success(), "size 1000: {r:?}");
    assert!(r.stderr.contains("size"), "{}", r.stderr);
    assert!(r.stderr.contains("4096"), "{}", r.stderr);

    let r = cli(&["volume", "create", "Bad_Name", "--size", "1GiB"]);
    assert!(!r.success(), "Bad_Name: {r:?}");
    assert!(r.stderr.contains("name"), "{}", r.stderr);
    assert!(r.stderr.contains("Bad_Name"), "{}", r.stderr);

    // Created as `creating`; with no node in the cluster the scheduling controller then
    // gives the reason it cannot place replicas (one update: version 2). It stays `creating`
    // (nothing to rebuild from if it turned faulted).
    let mut list = serde_json::Value::Null;
    wait_until(
        "the scheduler to give vol-a's shortfall",
        Duration::from_secs(30),
        || {
            list = json(&cli(&["volume", "list", "--json"]), "volume list");
            list[0]["state"] == "creating"
                && list[0]["state_reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("0 of 3 replicas placed"))
        },
    );
    let vols = list.as_array().expect("an array");
    assert_eq!(vols.len(), 1, "{list}");
    assert_eq!(vols[0]["name"], "vol-a");
    assert_eq!(vols[0]["size_bytes"], 1u64 << 30);
    assert_eq!(vols[0]["replica_count"], 3);
    assert!(
        vols[0]["state_reason"]
            .as_str()
            .is_some_and(|r| r.contains("0 of 3 replicas placed")),
        "{list}"
    );
    assert_eq!(vols[0]["data_locality"], "disabled");

    let v = json(&cli(&["volume", "get", "vol-a", "--json"]), "volume get");
    assert_eq!(v["name"], "vol-a");
    assert_eq!(v["version"], 2);

    let r = cli(&["volume", "get", "vol-x"]);
    assert_eq!(code(&r), Some(1), "get unknown: {r:?}");
    assert!(r.stderr.contains("no volume vol-x"), "{}", r.stderr);

    let r = cli(&["volume", "delete", "vol-x"]);
    assert_eq!(code(&r), Some(1), "delete unknown: {r:?}");

    cli(&["volume", "delete", "vol-a"]).expect_success("delete vol-a");
    let list = json(&cli(&["volume", "list", "--json"]), "volume list");
    assert_eq!(list, serde_json::json!([]));

    let nodes = json(&cli(&["node", "list", "--json"]), "node list");
    assert_eq!(nodes, serde_json::json!([]));
    let reps = json(&cli(&["replica", "list", "--json"]), "replica list");
    assert_eq!(reps, serde_json::json!([]));
    let reps = json(
        &cli(&["replica", "list", "--json", "--volume", "vol-a"]),
        "replica list --volume",
    );
    assert_eq!(reps, serde_json::json!([]));
    // The tables print a header even when empty.
    cli(&["node", "list"]).expect_success("node list");
}
