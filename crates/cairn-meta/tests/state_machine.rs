//! Semantics of the replicated record store: optimistic versions, atomic
//! batches, durability across reopen, snapshot build and install.

use cairn_meta::{open_store, Command, CommandResult, StateMachineStore, TypeConfig};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder};
use tempfile::TempDir;

fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(1, 0), index)
}

fn put(name: &str, data: &str, expected_version: Option<u64>) -> Command {
    Command::Put {
        kind: "volume".into(),
        name: name.into(),
        data: data.as_bytes().to_vec(),
        expected_version,
    }
}

fn delete(name: &str, expected_version: Option<u64>) -> Command {
    Command::Delete {
        kind: "volume".into(),
        name: name.into(),
        expected_version,
    }
}

/// Applies commands as consecutive log entries.
struct Applier {
    sm: StateMachineStore,
    next: u64,
}

impl Applier {
    fn new(sm: StateMachineStore) -> Self {
        Self { sm, next: 1 }
    }

    async fn apply(&mut self, cmd: Command) -> CommandResult {
        let entry = Entry::<TypeConfig> {
            log_id: log_id(self.next),
            payload: EntryPayload::Normal(cmd),
        };
        self.next += 1;
        let mut res = self.sm.apply([entry]).await.unwrap();
        assert_eq!(res.len(), 1);
        res.remove(0)
    }
}

fn version(sm: &StateMachineStore, name: &str) -> Option<u64> {
    sm.get("volume", name).unwrap().map(|r| r.version)
}

#[tokio::test]
async fn create_conflicts_with_existing_name() {
    let dir = TempDir::new().unwrap();
    let (_log, sm) = open_store(dir.path()).unwrap();
    let mut a = Applier::new(sm.clone());
    assert_eq!(
        a.apply(put("v0", "a", Some(0))).await,
        CommandResult::Ok { version: 1 }
    );
    assert_eq!(
        a.apply(put("v0", "b", Some(0))).await,
        CommandResult::Conflict { current: Some(1) }
    );
    let rec = sm.get("volume", "v0").unwrap().unwrap();
    assert_eq!((rec.version, rec.data.as_slice()), (1, &b"a"[..]));
}

#[tokio::test]
async fn stale_update_conflicts_and_fresh_update_bumps_version() {
    let dir = TempDir::new().unwrap();
    let (_log, sm) = open_store(dir.path()).unwrap();
    let mut a = Applier::new(sm.clone());
    a.apply(put("v0", "a", Some(0))).await;
    assert_eq!(
        a.apply(put("v0", "b", Some(1))).await,
        CommandResult::Ok { version: 2 }
    );
    assert_eq!(
        a.apply(put("v0", "c", Some(1))).await,
        CommandResult::Conflict { current: Some(2) }
    );
    assert_eq!(
        a.apply(put("missing", "c", Some(3))).await,
        CommandResult::Conflict { current: None }
    );
    assert_eq!(
        a.apply(put("v0", "d", None)).await,
        CommandResult::Ok { version: 3 }
    );
    assert_eq!(sm.get("volume", "v0").unwrap().unwrap().data, b"d");
    assert_eq!(version(&sm, "missing"), None);
}

#[tokio::test]
async fn delete_checks_version() {
    let dir = TempDir::new().unwrap();
    let (_log, sm) = open_store(dir.path()).unwrap();
    let mut a = Applier::new(sm.clone());
    a.apply(put("v0", "a", Some(0))).await;
    a.apply(put("v0", "b", None)).await;
    assert_eq!(
        a.apply(delete("v0", Some(1))).await,
        CommandResult::Conflict { current: Some(2) }
    );
    assert_eq!(version(&sm, "v0"), Some(2));
    assert_eq!(
        a.apply(delete("v0", Some(2))).await,
        CommandResult::Ok { version: 2 }
    );
    assert_eq!(version(&sm, "v0"), None);
    assert_eq!(a.apply(delete("v0", None)).await, CommandResult::NotFound);
}

#[tokio::test]
async fn batch_is_all_or_nothing() {
    let dir = TempDir::new().unwrap();
    let (_log, sm) = open_store(dir.path()).unwrap();
    let mut a = Applier::new(sm.clone());
    a.apply(put("taken", "x", Some(0))).await;
    let res = a
        .apply(Command::Batch(vec![
            put("new", "n", Some(0)),
            delete("taken", None),
            put("taken", "again", Some(1)),
        ]))
        .await;
    assert_eq!(
        res,
        CommandResult::BatchRejected {
            index: 2,
            reason: Box::new(CommandResult::Conflict { current: None }),
        }
    );
    assert_eq!(version(&sm, "new"), None);
    assert_eq!(version(&sm, "taken"), Some(1));

    let res = a
        .apply(Command::Batch(vec![
            put("new", "n", Some(0)),
            put("taken", "y", Some(1)),
        ]))
        .await;
    assert_eq!(
        res,
        CommandResult::Batch(vec![
            CommandResult::Ok { version: 1 },
            CommandResult::Ok { version: 2 },
        ])
    );
    let names: Vec<_> = sm
        .list("volume")
        .unwrap()
        .into_iter()
        .map(|r| (r.name, r.version))
        .collect();
    assert_eq!(names, [("new".to_owned(), 1), ("taken".to_owned(), 2)]);
    assert_eq!(sm.last_applied().unwrap(), Some(log_id(3)));
}

#[tokio::test]
async fn list_is_per_kind_and_sorted() {
    let dir = TempDir::new().unwrap();
    let (_log, sm) = open_store(dir.path()).unwrap();
    let mut a = Applier::new(sm.clone());
    for name in ["b", "a", "c"] {
        a.apply(put(name, name, None)).await;
    }
    a.apply(Command::Put {
        kind: "node".into(),
        name: "a".into(),
        data: vec![],
        expected_version: None,
    })
    .await;
    // A kind that is a prefix of another must not see its records.
    a.apply(Command::Put {
        kind: "volum".into(),
        name: "ez".into(),
        data: vec![],
        expected_version: None,
    })
    .await;
    let names: Vec<_> = sm
        .list("volume")
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(sm.list("node").unwrap().len(), 1);
    assert_eq!(sm.list("volum").unwrap().len(), 1);
    assert!(sm.list("replica").unwrap().is_empty());
}

#[tokio::test]
async fn versions_survive_reopen() {
    let dir = TempDir::new().unwrap();
    {
        let (_log, sm) = open_store(dir.path()).unwrap();
        let mut a = Applier::new(sm);
        a.apply(put("v0", "a", Some(0))).await;
        a.apply(put("v0", "b", Some(1))).await;
        a.apply(put("v1", "c", Some(0))).await;
    }
    let (_log, mut sm) = open_store(dir.path()).unwrap();
    assert_eq!(version(&sm, "v0"), Some(2));
    assert_eq!(version(&sm, "v1"), Some(1));
    let (last_applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(last_applied, Some(log_id(3)));
    let mut a = Applier {
        sm: sm.clone(),
        next: 4,
    };
    assert_eq!(
        a.apply(put("v0", "c", Some(2))).await,
        CommandResult::Ok { version: 3 }
    );
}

#[tokio::test]
async fn snapshot_installs_same_records_on_fresh_store() {
    let dir = TempDir::new().unwrap();
    let (_log, mut sm) = open_store(dir.path()).unwrap();
    let mut a = Applier::new(sm.clone());
    a.apply(put("v0", "a", Some(0))).await;
    a.apply(put("v0", "b", Some(1))).await;
    a.apply(put("v1", "c", Some(0))).await;
    a.apply(put("gone", "d", Some(0))).await;
    a.apply(delete("gone", None)).await;

    let mut builder = sm.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(5)));
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);

    let dir2 = TempDir::new().unwrap();
    let (_log2, mut fresh) = open_store(dir2.path()).unwrap();
    // A record the snapshot does not hold must disappear on install.
    Applier::new(fresh.clone())
        .apply(put("stale", "s", None))
        .await;
    let mut data = fresh.begin_receiving_snapshot().await.unwrap();
    *data = current.snapshot.as_ref().clone();
    fresh.install_snapshot(&snap.meta, data).await.unwrap();

    assert_eq!(fresh.list("volume").unwrap(), sm.list("volume").unwrap());
    assert_eq!(fresh.list("volume").unwrap().len(), 2);
    assert_eq!(
        fresh.applied_state().await.unwrap(),
        sm.applied_state().await.unwrap()
    );
    let installed = fresh.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(installed.meta, snap.meta);
    assert_eq!(installed.snapshot.into_inner(), snap.snapshot.into_inner());
}
