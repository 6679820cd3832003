//! cairn-replica: serves every replica stored under one directory over TCP, speaking
//! cairn-wire frames.
//!
//! Layout: `DIR/<volume>/<replica_id>/` is one replica (a `cairn-store` directory). A replica
//! is created when an engine's Hello asks for it with a non-zero size.
//!
//! Guarantees:
//! - Frames of one connection are applied in the order they arrived; writes that overlap are
//!   never reordered, so replicas that receive the same frame sequence end byte-identical.
//! - Epoch fencing: a Hello with an epoch below the replica's persisted epoch is refused, and
//!   so is every later frame of a connection whose epoch has since been overtaken; a fenced
//!   frame is never applied.
//! - Takeover: once a Hello with the takeover flag is accepted, every frame of every other
//!   connection attached to the same replica before it is refused (StaleEpoch), even at the
//!   same epoch; the check and the frame's application happen under one hold of the
//!   replica's lock, so no frame of a superseded connection is applied after the takeover.
//! - A bad frame (magic, CRC, length...) closes only its connection, with a logged reason.
//!   A store error (no space, out of range, corruption...) is answered as that error kind and
//!   the server goes on serving.
//!
//! One thread per connection; socket and file I/O go through `cairn-io` (io_uring or the
//! portable fallback). Replicas are shared between connections behind a mutex.

mod client;
mod conn;
mod session;

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn_io::{Backend, EngineChoice, Io};
use cairn_store::{Store, StoreError};

pub use client::{Client, ClientError};

/// How a replica server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directory holding every replica this server serves.
    pub dir: PathBuf,
    /// TCP address to listen on.
    pub listen: SocketAddr,
    /// I/O backend for sockets and files.
    pub engine: EngineChoice,
    /// Largest frame accepted, header included.
    pub max_frame: usize,
    /// Verify and store block checksums (always, except to measure what they cost).
    pub checksums: bool,
}

/// Errors that stop a server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another replica server")]
    Locked(PathBuf),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("I/O backend: {0}")]
    Io(#[from] cairn_io::IoError),
    #[error("replica {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
}

/// A bound replica server.
pub struct Server {
    config: ServerConfig,
    listener: TcpListener,
    registry: Arc<Registry>,
    backend: Backend,
    _lock: File,
}

/// A replica shared by the connections attached to it.
pub(crate) type SharedStore = Arc<Mutex<Replica>>;

/// One open replica: its store, and which attachments may still use it.
pub(crate) struct Replica {
    pub(crate) store: Store,
    /// Bumped by every accepted takeover Hello. A connection remembers the generation it
    /// attached at, and may apply frames only while it is still the current one. Lives in
    /// memory only: after a restart there are no connections left to supersede.
    pub(crate) generation: u64,
}

/// The replicas this server has open, by (volume, replica id).
pub(crate) struct Registry {
    dir: PathBuf,
    engine: EngineChoice,
    checksums: bool,
    replicas: Mutex<HashMap<(String, String), SharedStore>>,
}

impl Registry {
    fn path(&self, volume: &str, replica_id: &str) -> PathBuf {
        self.dir.join(volume).join(replica_id)
    }

    /// The open replica, opening it from disk or creating it (when `create_size > 0`).
    pub(crate) fn get(
        &self,
        volume: &str,
        replica_id: &str,
        create_size: u64,
    ) -> Result<SharedStore, StoreError> {
        let key = (volume.to_owned(), replica_id.to_owned());
        let mut map = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(&key) {
            return Ok(s.clone());
        }
        let path = self.path(volume, replica_id);
        let store = if Store::exists(&path) {
            Store::open(&path, self.engine)?
        } else if create_size > 0 {
            tracing::info!(volume, replica_id, size = create_size, "creating replica");
            Store::create(&path, volume, replica_id, create_size, self.engine)?
        } else {
            return Err(StoreError::NotFound(format!(
                "replica {volume}/{replica_id}"
            )));
        };
        let mut store = store;
        store.set_checksums(self.checksums);
        let store = Arc::new(Mutex::new(Replica {
            store,
            generation: 0,
        }));
        map.insert(key, store.clone());
        Ok(store)
    }
}

/// True for names usable as a path component: 1-128 of `[A-Za-z0-9._-]`, not starting with a
/// dot.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Server {
    /// Locks the data directory, opens (and recovers) every replica in it, and binds.
    pub fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let dir_err = |source| ServerError::DataDir {
            path: config.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&config.dir).map_err(dir_err)?;
        let lock = lock_data_dir(&config.dir)
            .map_err(dir_err)?
            .ok_or_else(|| ServerError::Locked(config.dir.clone()))?;
        let backend = Io::new(config.engine)?.backend();
        let registry = Arc::new(Registry {
            dir: config.dir.clone(),
            engine: config.engine,
            checksums: config.checksums,
            replicas: Mutex::new(HashMap::new()),
        });
        for (volume, replica_id) in list_replicas(&config.dir).map_err(dir_err)? {
            let s = registry
                .get(&volume, &replica_id, 0)
                .map_err(|source| ServerError::Store {
                    path: registry.path(&volume, &replica_id),
                    source,
                })?;
            let r = s.lock().unwrap_or_else(|p| p.into_inner());
            let s = &r.store;
            tracing::info!(
                volume,
                replica_id,
                size = s.size(),
                epoch = s.epoch(),
                recovery = ?s.recovery_report(),
                "replica opened"
            );
        }
        let listener = TcpListener::bind(config.listen).map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
        Ok(Server {
            config,
            listener,
            registry,
            backend,
            _lock: lock,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that can close replicas while the server runs.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            registry: self.registry.clone(),
        }
    }

    /// The I/O backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Accepts connections until the process ends; one thread each.
    pub fn run(self) -> std::io::Result<()> {
        tracing::info!(
            listen = %self.local_addr()?,
            dir = %self.config.dir.display(),
            io = %self.backend,
            "replica server ready"
        );
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let registry = self.registry.clone();
            let config = self.config.clone();
            std::thread::Builder::new()
                .name("cairn-conn".into())
                .spawn(move || conn::serve_connection(stream, registry, &config))?;
        }
        Ok(())
    }
}

/// Closes replicas of a running server (see [`Server::handle`]).
#[derive(Clone)]
pub struct ServerHandle {
    registry: Arc<Registry>,
}

impl ServerHandle {
    /// Forgets the open replica `volume/replica_id` so that its directory can be removed: the
    /// next Hello for that name opens (or creates) it afresh. Connections attached to it keep
    /// their handle until they close. Returns whether it was open.
    pub fn close(&self, volume: &str, replica_id: &str) -> bool {
        let mut map = self
            .registry
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.remove(&(volume.to_owned(), replica_id.to_owned()))
            .is_some()
    }

    /// Directory of replica `volume/replica_id`.
    pub fn path(&self, volume: &str, replica_id: &str) -> PathBuf {
        self.registry.path(volume, replica_id)
    }
}

/// Takes the data directory's exclusive lock (`DIR/.lock`), held while the returned file is
/// open. `Ok(None)` when another process holds it: a replica must never be opened twice.
pub fn lock_data_dir(dir: &Path) -> std::io::Result<Option<File>> {
    let lock = File::create(dir.join(".lock"))?;
    match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(lock)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `(volume, replica_id)` of every replica directory under `dir`.
fn list_replicas(dir: &Path) -> std::io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for vol in std::fs::read_dir(dir)? {
        let vol = vol?;
        if !vol.file_type()?.is_dir() {
            continue;
        }
        for rep in std::fs::read_dir(vol.path())? {
            let rep = rep?;
            // Names a Hello cannot use are not replicas: a dot-named directory beside a
            // replica is what an interrupted recreate left, which opening the replica deletes.
            let usable = valid_name(&rep.file_name().to_string_lossy());
            if usable && Store::exists(&rep.path()) {
                out.push((
                    vol.file_name().to_string_lossy().into_owned(),
                    rep.file_name().to_string_lossy().into_owned(),
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}
