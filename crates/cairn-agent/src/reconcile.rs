//! The agent's reconcile loop: a view of the Node, Volume and Replica records kept current
//! by a List + Watch, and after every change one pass that compares what meta wants of this
//! node with what runs here and starts the tasks that close the gap. Tasks report back on a
//! channel; a task that failed is retried after a backoff.
//!
//! The view: each kind is listed (a consistent snapshot at that kind's revision), then
//! watched from the smallest of the three revisions + 1; an event of a kind at or below that
//! kind's list revision is already in the view and skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cairn_engine::{Engine, EngineConfig, Mode, ReplicaRecord, ReplicaSpec};
use cairn_proto::v1::record::Record as R;
use cairn_proto::v1::{
    DeleteRequest, EventType, GetRequest, Key, Kind, ListRequest, Node, Record, Replica,
    ReplicaHealth, ReplicaMode, UpdateRequest, Volume, WatchRequest,
};
use futures::FutureExt;
use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::meta::{retry, MetaConn};
use crate::{Engines, NodeInfo};

/// Records as last seen, with the revision each kind was listed at.
#[derive(Default)]
struct View {
    nodes: BTreeMap<String, Node>,
    volumes: BTreeMap<String, Volume>,
    replicas: BTreeMap<String, Replica>,
    /// List revision per kind: Node, Volume, Replica.
    listed: [u64; 3],
}

const KINDS: [Kind; 3] = [Kind::Node, Kind::Volume, Kind::Replica];

impl View {
    fn apply(&mut self, ev: &cairn_proto::v1::WatchEvent) {
        let Some(rec) = ev.record.as_ref().and_then(|r| r.record.as_ref()) else {
            return;
        };
        let put = ev.r#type == EventType::Put as i32;
        let (slot, name) = match rec {
            R::Node(n) => (0, n.name.clone()),
            R::Volume(v) => (1, v.name.clone()),
            R::Replica(r) => (2, r.name.clone()),
            _ => return,
        };
        if ev.revision <= self.listed[slot] {
            return;
        }
        match (rec, put) {
            (R::Node(n), true) => drop(self.nodes.insert(name, n.clone())),
            (R::Node(_), false) => drop(self.nodes.remove(&name)),
            (R::Volume(v), true) => drop(self.volumes.insert(name, v.clone())),
            (R::Volume(_), false) => drop(self.volumes.remove(&name)),
            (R::Replica(r), true) => drop(self.replicas.insert(name, r.clone())),
            (R::Replica(_), false) => drop(self.replicas.remove(&name)),
            _ => {}
        }
    }

    /// The replica server address of `node`, once it has registered one.
    fn node_addr(&self, node: &str) -> Option<SocketAddr> {
        self.nodes.get(node).and_then(|n| n.address.parse().ok())
    }
}

/// What tasks report back.
enum Event {
    Started {
        volume: String,
        engine: Arc<Engine>,
    },
    StartFailed {
        volume: String,
        error: String,
    },
    Stopped {
        volume: String,
    },
    /// A replica or volume task (delete data, add to or remove from an engine, grow an
    /// engine) ended.
    ReplicaDone {
        key: String,
        error: Option<String>,
    },
}

enum EngineState {
    Starting,
    Running(Arc<Engine>),
    Stopping,
}

pub(crate) struct Reconciler {
    node: Arc<NodeInfo>,
    conn: MetaConn,
    engines: Arc<Engines>,
    nbd: Arc<cairn_nbd::NbdServer<Engine>>,
    server: cairn_replica::ServerHandle,
    view: View,
    running: HashMap<String, EngineState>,
    /// Replica and volume tasks in flight, by key (`delete/<replica>`,
    /// `add/<volume>/<replica>`, `grow/<volume>`, ...).
    busy: BTreeSet<String>,
    /// Conditions already logged once (a record smaller than its engine).
    warned: BTreeSet<String>,
    /// Failed tasks wait until this instant before they are tried again.
    retry_at: Option<tokio::time::Instant>,
    backoff: Duration,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Reconciler {
    pub(crate) fn new(
        node: Arc<NodeInfo>,
        conn: MetaConn,
        engines: Arc<Engines>,
        nbd: Arc<cairn_nbd::NbdServer<Engine>>,
        server: cairn_replica::ServerHandle,
    ) -> Reconciler {
        let (tx, rx) = mpsc::unbounded_channel();
        Reconciler {
            node,
            conn,
            engines,
            nbd,
            server,
            view: View::default(),
            running: HashMap::new(),
            busy: BTreeSet::new(),
            warned: BTreeSet::new(),
            retry_at: None,
            backoff: Duration::from_secs(1),
            tx,
            rx,
        }
    }

    fn me(&self) -> &str {
        &self.node.cfg.node
    }

    /// Lists, watches and reconciles until `stop`; then stops every engine.
    pub(crate) async fn run(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        'outer: loop {
            if *stop.borrow() {
                break;
            }
            let mut stream = match self.list_and_watch().await {
                Ok(s) => {
                    backoff = Duration::from_millis(100);
                    s
                }
                Err(e) => {
                    tracing::warn!(code = ?e.code(), error = e.message(), "cannot read meta; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => break 'outer,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            self.reconcile();
            loop {
                let retry = self.retry_at;
                tokio::select! {
                    msg = stream.message() => match msg {
                        Ok(Some(ev)) => {
                            self.view.apply(&ev);
                            // Take every event already here before one pass.
                            while let Some(Ok(Some(ev))) = stream.message().now_or_never() {
                                self.view.apply(&ev);
                            }
                            self.reconcile();
                        }
                        Ok(None) => {
                            tracing::warn!("meta closed the watch; listing again");
                            self.conn.reset();
                            continue 'outer;
                        }
                        Err(e) => {
                            tracing::warn!(code = ?e.code(), error = e.message(), "watch failed; listing again");
                            self.conn.reset();
                            continue 'outer;
                        }
                    },
                    Some(ev) = self.rx.recv() => {
                        self.on_event(ev);
                        self.reconcile();
                    }
                    () = sleep_until(retry) => {
                        self.retry_at = None;
                        self.reconcile();
                    }
                    _ = stop.wait_for(|s| *s) => break 'outer,
                }
            }
        }
        self.stop_all().await;
        self.conn.close();
    }

    async fn list_and_watch(
        &mut self,
    ) -> Result<tonic::Streaming<cairn_proto::v1::WatchEvent>, Status> {
        let mut view = View::default();
        for (slot, kind) in KINDS.iter().enumerate() {
            let req = ListRequest {
                kind: *kind as i32,
                ..Default::default()
            };
            let r = self
                .conn
                .call(|mut c| async move { c.list(req).await })
                .await?;
            view.listed[slot] = r.revision;
            for rec in r.records {
                match rec.record {
                    Some(R::Node(n)) => drop(view.nodes.insert(n.name.clone(), n)),
                    Some(R::Volume(v)) => drop(view.volumes.insert(v.name.clone(), v)),
                    Some(R::Replica(x)) => drop(view.replicas.insert(x.name.clone(), x)),
                    _ => {}
                }
            }
        }
        let from = view.listed.iter().copied().min().unwrap_or(0) + 1;
        let mut client = self.conn.client().await?;
        let stream = client
            .watch(WatchRequest {
                kinds: KINDS.iter().map(|k| *k as i32).collect(),
                from_revision: from,
            })
            .await;
        let stream = match stream {
            Ok(s) => s.into_inner(),
            Err(e) => {
                self.conn.reset();
                return Err(e);
            }
        };
        self.view = view;
        Ok(stream)
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Started { volume, engine } => {
                let wanted = self.wants_engine(&volume);
                self.running
                    .insert(volume.clone(), EngineState::Running(engine.clone()));
                if wanted {
                    tracing::info!(%volume, epoch = engine.status().epoch, "volume attached: engine and NBD export running");
                    self.backoff = Duration::from_secs(1);
                }
            }
            Event::StartFailed { volume, error } => {
                tracing::warn!(%volume, %error, "cannot start the volume's engine; will retry");
                self.running.remove(&volume);
                self.fail_later();
            }
            Event::Stopped { volume } => {
                self.running.remove(&volume);
                tracing::info!(%volume, "engine stopped");
            }
            Event::ReplicaDone { key, error } => {
                self.busy.remove(&key);
                if let Some(error) = error {
                    tracing::warn!(task = %key, %error, "replica task failed; will retry");
                    self.fail_later();
                }
            }
        }
    }

    fn fail_later(&mut self) {
        let at = tokio::time::Instant::now() + self.backoff;
        self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
    }

    fn wants_engine(&self, volume: &str) -> bool {
        self.view
            .volumes
            .get(volume)
            .is_some_and(|v| v.attached_node == self.me())
    }

    /// One pass: start, stop and change what differs from the view.
    fn reconcile(&mut self) {
        let me = self.me().to_owned();
        // Replicas meta gave up on: remove the data, then the record.
        let doomed: Vec<Replica> = self
            .view
            .replicas
            .values()
            .filter(|r| r.node == me && r.deleted)
            .cloned()
            .collect();
        for r in doomed {
            let key = format!("delete/{}", r.name);
            if self.busy.insert(key.clone()) {
                let (conn, server, tx) = (self.conn.clone(), self.server.clone(), self.tx.clone());
                tokio::spawn(async move {
                    let error = delete_replica(&conn, &server, &r).await.err();
                    let _ = tx.send(Event::ReplicaDone { key, error });
                });
            }
        }
        // Engines of volumes attached here.
        let attached: Vec<String> = self
            .view
            .volumes
            .values()
            .filter(|v| v.attached_node == me)
            .map(|v| v.name.clone())
            .collect();
        for volume in &attached {
            match self.running.get(volume) {
                None => {
                    if self.retry_at.is_some() {
                        continue;
                    }
                    self.running.insert(volume.clone(), EngineState::Starting);
                    let (node, conn, engines, nbd, tx) = (
                        self.node.clone(),
                        self.conn.clone(),
                        self.engines.clone(),
                        self.nbd.clone(),
                        self.tx.clone(),
                    );
                    let volume = volume.clone();
                    tokio::spawn(async move {
                        let ev = match start_engine(&node, &conn, &volume).await {
                            Ok(engine) => {
                                engines.insert(&volume, engine.clone());
                                if let Err(e) =
                                    nbd.insert_export(&volume, "Cairn volume", engine.clone())
                                {
                                    tracing::warn!(%volume, error = %e, "NBD export");
                                }
                                Event::Started { volume, engine }
                            }
                            Err(error) => Event::StartFailed { volume, error },
                        };
                        let _ = tx.send(ev);
                    });
                }
                Some(EngineState::Running(engine)) => {
                    let engine = engine.clone();
                    self.sync_replicas(volume, &engine);
                    self.sync_size(volume, &engine);
                }
                Some(EngineState::Starting | EngineState::Stopping) => {}
            }
        }
        // Engines meta no longer wants here.
        let unwanted: Vec<(String, Arc<Engine>)> = self
            .running
            .iter()
            .filter(|(v, _)| !attached.contains(v))
            .filter_map(|(v, s)| match s {
                EngineState::Running(e) => Some((v.clone(), e.clone())),
                _ => None,
            })
            .collect();
        for (volume, engine) in unwanted {
            self.running.insert(volume.clone(), EngineState::Stopping);
            let (engines, nbd, tx, timeout) = (
                self.engines.clone(),
                self.nbd.clone(),
                self.tx.clone(),
                self.node.cfg.io_timeout,
            );
            tokio::spawn(async move {
                stop_engine(&engines, &nbd, &volume, &engine, timeout).await;
                let _ = tx.send(Event::Stopped { volume });
            });
        }
    }

    /// Makes a running engine's replicas those of the volume's records.
    fn sync_replicas(&mut self, volume: &str, engine: &Arc<Engine>) {
        let wanted: Vec<&Replica> = self
            .view
            .replicas
            .values()
            .filter(|r| r.volume == volume && !r.deleted)
            .collect();
        let status = engine.status();
        for r in &wanted {
            let Some(addr) = self.view.node_addr(&r.node) else {
                continue;
            };
            match status.replicas.iter().find(|s| s.id == r.name) {
                Some(s) => {
                    if s.addr != addr.to_string() {
                        engine.set_replica_addr(&r.name, addr);
                    }
                }
                None => {
                    let key = format!("add/{volume}/{}", r.name);
                    if self.busy.insert(key.clone()) {
                        let (engine, tx, id) = (engine.clone(), self.tx.clone(), r.name.clone());
                        tokio::spawn(async move {
                            let error = engine.add_replica(Some(id), addr).await.err();
                            let _ = tx.send(Event::ReplicaDone { key, error });
                        });
                    }
                }
            }
        }
        for s in &status.replicas {
            if wanted.iter().any(|r| r.name == s.id) {
                continue;
            }
            let key = format!("remove/{volume}/{}", s.id);
            if self.busy.insert(key.clone()) {
                let (engine, tx, id) = (engine.clone(), self.tx.clone(), s.id.clone());
                tokio::spawn(async move {
                    let error = engine.remove_replica(&id).await.err();
                    let _ = tx.send(Event::ReplicaDone { key, error });
                });
            }
        }
    }

    /// Grows a running engine (its replicas, then its size and NBD export) to the volume
    /// record's size when the record is larger: `cairn volume expand` writes the record,
    /// this carries it out online. A record smaller than the engine is never acted on
    /// (volumes do not shrink).
    fn sync_size(&mut self, volume: &str, engine: &Arc<Engine>) {
        let Some(wanted) = self.view.volumes.get(volume).map(|v| v.size_bytes) else {
            return;
        };
        let current = engine.current_size();
        if wanted < current {
            let key = format!("shrink/{volume}/{wanted}");
            if self.warned.insert(key) {
                tracing::warn!(%volume, record = wanted, engine = current, "volume record is smaller than the running engine; volumes do not shrink, ignored");
            }
            return;
        }
        if wanted == current {
            return;
        }
        let key = format!("grow/{volume}");
        if self.busy.insert(key.clone()) {
            let (engine, tx, volume) = (engine.clone(), self.tx.clone(), volume.to_owned());
            tokio::spawn(async move {
                tracing::info!(%volume, from = current, to = wanted, "growing the volume online");
                let error = engine.grow(wanted).await.err().map(|e| e.to_string());
                if error.is_some() {
                    // The next pass tries again: not at once.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let _ = tx.send(Event::ReplicaDone { key, error });
            });
        }
    }

    async fn stop_all(&mut self) {
        for (volume, state) in self.running.drain() {
            if let EngineState::Running(engine) = state {
                stop_engine(
                    &self.engines,
                    &self.nbd,
                    &volume,
                    &engine,
                    self.node.cfg.io_timeout,
                )
                .await;
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn engine_mode(m: i32) -> Mode {
    match ReplicaMode::try_from(m) {
        Ok(ReplicaMode::Rw) => Mode::Rw,
        Ok(ReplicaMode::Wo) => Mode::Wo,
        _ => Mode::Err,
    }
}

/// Raises the volume's epoch in meta (only while it is attached here), then starts its
/// engine with the replicas of its records.
async fn start_engine(
    node: &NodeInfo,
    conn: &MetaConn,
    volume: &str,
) -> Result<Arc<Engine>, String> {
    let me = node.cfg.node.as_str();
    let vol = retry("raise the volume epoch", || async {
        let key = Key {
            kind: Kind::Volume as i32,
            name: volume.to_owned(),
        };
        let got = conn
            .call(|mut c| async move { c.get(GetRequest { key: Some(key) }).await })
            .await?;
        let Some(R::Volume(mut v)) = got.record.and_then(|r| r.record) else {
            return Err(Status::not_found(format!("volume {volume} is gone")));
        };
        if v.attached_node != me {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is attached to {:?} now",
                v.attached_node
            )));
        }
        v.epoch += 1;
        let rec = Record {
            record: Some(R::Volume(v)),
        };
        let up = conn
            .call(|mut c| async move { c.update(UpdateRequest { record: Some(rec) }).await })
            .await?;
        match up.record.and_then(|r| r.record) {
            Some(R::Volume(v)) => Ok(v),
            _ => Err(Status::internal("update answered no volume")),
        }
    })
    .await
    .map_err(|e| e.message().to_owned())?;

    let nodes = list(conn, Kind::Node, "")
        .await
        .map_err(|e| e.message().to_owned())?;
    let replicas = list(conn, Kind::Replica, volume)
        .await
        .map_err(|e| e.message().to_owned())?;
    let addr_of = |n: &str| {
        nodes.iter().find_map(|r| match &r.record {
            Some(R::Node(x)) if x.name == n => x.address.parse::<SocketAddr>().ok(),
            _ => None,
        })
    };
    let mut specs = Vec::new();
    for r in replicas {
        let Some(R::Replica(r)) = r.record else {
            continue;
        };
        if r.deleted {
            continue;
        }
        let (addr, mode) = match addr_of(&r.node) {
            Some(a) => (a, engine_mode(r.mode)),
            // Not registered yet: out until the node has an address.
            None => (SocketAddr::from(([0, 0, 0, 0], 0)), Mode::Err),
        };
        specs.push(ReplicaSpec {
            id: r.name,
            addr,
            mode,
        });
    }
    if specs.is_empty() {
        return Err(format!("volume {volume} has no replica placed yet"));
    }
    tracing::info!(%volume, epoch = vol.epoch, replicas = specs.len(), "starting engine");
    let engine = Engine::start(EngineConfig {
        volume: volume.to_owned(),
        size: vol.size_bytes,
        epoch: vol.epoch,
        replicas: specs,
        io_timeout: node.cfg.io_timeout,
        on_change: membership_hook(conn.clone(), volume.to_owned(), me.to_owned()),
        heal: node.cfg.heal.clone(),
    })
    .await;
    let status = engine.status();
    if !status.replicas.iter().any(|r| r.mode == Mode::Rw) {
        engine.shutdown();
        let why: Vec<String> = status
            .replicas
            .iter()
            .map(|r| format!("{}: {}", r.id, r.last_error.as_deref().unwrap_or("not RW")))
            .collect();
        return Err(format!("no RW replica reachable ({})", why.join("; ")));
    }
    Ok(engine)
}

async fn list(conn: &MetaConn, kind: Kind, volume: &str) -> Result<Vec<Record>, Status> {
    retry("list records", || async {
        let req = ListRequest {
            kind: kind as i32,
            volume: volume.to_owned(),
            node: String::new(),
        };
        conn.call(|mut c| async move { c.list(req).await })
            .await
            .map(|r| r.records)
    })
    .await
}

/// Writes the engine's view of each replica to its record before the engine goes on (the
/// engine calls this from a blocking thread and waits): while meta cannot be reached, the
/// change waits, as acknowledging writes past a replica failure meta does not know of
/// could let a later engine read a stale replica.
fn membership_hook(conn: MetaConn, volume: String, me: String) -> cairn_engine::MembershipHook {
    let rt = tokio::runtime::Handle::current();
    Arc::new(move |members: Vec<ReplicaRecord>| {
        match rt.block_on(write_modes(&conn, &volume, &me, &members)) {
            Ok(()) => Ok(()),
            // Stopping: the engine is shut down, and the next one recovers from the replicas.
            Err(_) if conn.is_closed() => Ok(()),
            Err(e) => Err(std::io::Error::other(e.message().to_owned())),
        }
    })
}

fn wanted_fields(mode: Mode, me: &str) -> (ReplicaMode, ReplicaHealth, String) {
    match mode {
        Mode::Rw => (ReplicaMode::Rw, ReplicaHealth::Healthy, String::new()),
        Mode::Wo => (
            ReplicaMode::Wo,
            ReplicaHealth::Rebuilding,
            format!("being rebuilt by the engine on {me}"),
        ),
        Mode::Err => (
            ReplicaMode::Err,
            ReplicaHealth::Failed,
            format!("failed by the engine on {me}"),
        ),
    }
}

async fn write_modes(
    conn: &MetaConn,
    volume: &str,
    me: &str,
    members: &[ReplicaRecord],
) -> Result<(), Status> {
    retry("record replica modes", || async {
        for rec in list(conn, Kind::Replica, volume).await? {
            let Some(R::Replica(mut r)) = rec.record else {
                continue;
            };
            let Some(m) = members.iter().find(|m| m.id == r.name) else {
                continue;
            };
            if r.deleted {
                continue;
            }
            let (mode, health, reason) = wanted_fields(m.mode, me);
            if r.mode == mode as i32 && r.health == health as i32 && r.health_reason == reason {
                continue;
            }
            r.mode = mode as i32;
            r.health = health as i32;
            r.health_reason = reason;
            let req = UpdateRequest {
                record: Some(Record {
                    record: Some(R::Replica(r)),
                }),
            };
            match conn.call(|mut c| async move { c.update(req).await }).await {
                Ok(_) => {}
                Err(e) if e.code() == Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await
}

/// Removes the data of a replica meta marked deleted, then its record.
async fn delete_replica(
    conn: &MetaConn,
    server: &cairn_replica::ServerHandle,
    r: &Replica,
) -> Result<(), String> {
    debug_assert!(r.deleted);
    server.close(&r.volume, &r.name);
    let path = server.path(&r.volume, &r.name);
    match std::fs::remove_dir_all(&path) {
        Ok(()) => tracing::info!(replica = %r.name, path = %path.display(), "replica data deleted"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing {}: {e}", path.display())),
    }
    let req = DeleteRequest {
        key: Some(Key {
            kind: Kind::Replica as i32,
            name: r.name.clone(),
        }),
        expected_version: r.version,
    };
    match conn.call(|mut c| async move { c.delete(req).await }).await {
        Ok(_) => Ok(()),
        // Gone already, or changed since (the watch brings the new version).
        Err(e) if matches!(e.code(), Code::NotFound | Code::Aborted) => Ok(()),
        Err(e) => Err(e.message().to_owned()),
    }
}

async fn stop_engine(
    engines: &Engines,
    nbd: &cairn_nbd::NbdServer<Engine>,
    volume: &str,
    engine: &Arc<Engine>,
    timeout: Duration,
) {
    use cairn_blockdev::BlockDevice;
    nbd.remove_export(volume);
    engines.remove(volume);
    if tokio::time::timeout(timeout, engine.flush()).await.is_err() {
        tracing::warn!(%volume, "final flush timed out");
    }
    engine.shutdown();
}
