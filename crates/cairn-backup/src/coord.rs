//! Coordination between backups and garbage collection through two kinds of objects:
//! the GC lock `gc.lock` (created with `PutMode::Create`, so at most one holder) and the
//! in-progress markers `inprogress/<name>.<id>.json` written by each running backup.
//!
//! The protocol is a Dekker-style handshake over a strongly consistent store (S3 and
//! the local file system both are): a backup writes its marker, *then* waits until no
//! live lock exists; a GC takes the lock, *then* lists markers and deletes nothing if a
//! live one exists. Whichever writes second sees the other's object, so a GC never
//! deletes while a backup that may reuse blocks is running. Staleness is judged on the
//! store's own `last_modified` clock: a lock or marker older than `stale_after` compared
//! with an object just written by the caller is abandoned (its process died).

use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{BackupError, Result};
use crate::format::{new_id, now};
use crate::target::Target;

/// Timing of the GC lock and in-progress markers.
#[derive(Debug, Clone)]
pub struct CoordOptions {
    /// A lock or marker not refreshed for this long is abandoned. Backups refresh their
    /// marker every `stale_after / 4`. Default 6 h.
    pub stale_after: Duration,
    /// How long to wait for a held GC lock before failing with `GcBusy`. Default 5 min.
    pub lock_wait: Duration,
}

impl Default for CoordOptions {
    fn default() -> Self {
        CoordOptions {
            stale_after: Duration::from_secs(6 * 3600),
            lock_wait: Duration::from_secs(300),
        }
    }
}

/// Content of the lock and marker objects (informational; only existence and
/// `last_modified` matter to the protocol).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Holder {
    pub what: String,
    pub id: String,
    pub pid: u32,
    pub created: String,
}

impl Holder {
    fn new(what: &str) -> Holder {
        Holder {
            what: what.to_string(),
            id: new_id(),
            pid: std::process::id(),
            created: now().0,
        }
    }
    fn payload(&self) -> PutPayload {
        PutPayload::from(Bytes::from(
            serde_json::to_vec(self).expect("holder serializes"),
        ))
    }
}

pub(crate) fn lock_key(t: &Target) -> Path {
    t.key("gc.lock")
}

pub(crate) fn marker_prefix(t: &Target) -> Path {
    t.key("inprogress")
}

/// Server-side modification time of `key` in milliseconds since the epoch.
async fn mtime_ms(t: &Target, key: &Path) -> Result<Option<i64>> {
    match t.store.head(key).await {
        Ok(meta) => Ok(Some(meta.last_modified.timestamp_millis())),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(BackupError::transport(key, e)),
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Polls with exponential backoff (10 ms .. 1 s) until `deadline`.
struct Backoff {
    next: Duration,
    deadline: tokio::time::Instant,
}

impl Backoff {
    fn new(limit: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(10),
            deadline: tokio::time::Instant::now() + limit,
        }
    }
    /// Waits before the next poll; false when the time is up.
    async fn wait(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now >= self.deadline {
            return false;
        }
        tokio::time::sleep(self.next.min(self.deadline - now)).await;
        self.next = (self.next * 2).min(Duration::from_secs(1));
        true
    }
}

/// A running backup's marker. [`Marker::finish`] removes it; if the marker is dropped
/// unfinished (the backup future was cancelled), a task removes it in the background.
pub(crate) struct Marker {
    key: Path,
    holder: Holder,
    written: tokio::time::Instant,
    store: std::sync::Arc<dyn ObjectStore>,
    finished: bool,
}

impl Drop for Marker {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (store, key) = (self.store.clone(), self.key.clone());
            rt.spawn(async move {
                if let Err(e) = store.delete(&key).await {
                    tracing::warn!(key = %key, error = %e, "could not remove the marker of a cancelled backup");
                }
            });
        }
    }
}

impl Marker {
    /// Writes the marker, then waits until no live GC lock exists. After this returns,
    /// no GC deletes blocks until the marker is removed or goes stale.
    pub async fn begin(t: &Target, name: &str, opts: &CoordOptions) -> Result<Marker> {
        let holder = Holder::new(&format!("backup {name}"));
        let key = t.key(&format!("inprogress/{name}.{}.json", holder.id));
        t.store
            .put_opts(&key, holder.payload(), PutMode::Create.into())
            .await
            .map_err(|e| BackupError::transport(&key, e))?;
        let marker = Marker {
            key,
            holder,
            written: tokio::time::Instant::now(),
            store: t.store.clone(),
            finished: false,
        };
        if let Err(e) = marker.wait_for_no_lock(t, opts).await {
            marker.finish(t).await.ok();
            return Err(e);
        }
        Ok(marker)
    }

    async fn wait_for_no_lock(&self, t: &Target, opts: &CoordOptions) -> Result<()> {
        let lock = lock_key(t);
        let mine = mtime_ms(t, &self.key).await?.unwrap_or(i64::MAX);
        let mut backoff = Backoff::new(opts.lock_wait);
        loop {
            match mtime_ms(t, &lock).await? {
                None => return Ok(()),
                Some(held) if held.saturating_add(ms(opts.stale_after)) < mine => {
                    tracing::warn!(key = %lock, "ignoring a stale GC lock");
                    return Ok(());
                }
                Some(_) => {
                    if !backoff.wait().await {
                        return Err(BackupError::GcBusy {
                            key: lock.to_string(),
                            holder: read_holder(t, &lock).await,
                        });
                    }
                }
            }
        }
    }

    /// Rewrites the marker if a quarter of `stale_after` has passed since it was written.
    pub async fn refresh(&mut self, t: &Target, opts: &CoordOptions) -> Result<()> {
        if self.written.elapsed() < opts.stale_after / 4 {
            return Ok(());
        }
        t.store
            .put(&self.key, self.holder.payload())
            .await
            .map_err(|e| BackupError::transport(&self.key, e))?;
        self.written = tokio::time::Instant::now();
        Ok(())
    }

    /// Removes the marker.
    pub async fn finish(mut self, t: &Target) -> Result<()> {
        self.finished = true;
        match t.store.delete(&self.key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(BackupError::transport(&self.key, e)),
        }
    }
}

async fn read_holder(t: &Target, key: &Path) -> String {
    match t.store.get(key).await {
        Ok(r) => match r.bytes().await {
            Ok(b) => serde_json::from_slice::<Holder>(&b)
                .map(|h| format!("{} (pid {}, since {})", h.what, h.pid, h.created))
                .unwrap_or_else(|_| "unknown".into()),
            Err(_) => "unknown".into(),
        },
        Err(_) => "unknown (released)".into(),
    }
}

/// The held GC lock. Release it with [`GcLock::release`].
pub(crate) struct GcLock {
    key: Path,
    /// Server time the lock was written, in ms since the epoch.
    pub taken_ms: i64,
}

impl GcLock {
    /// Takes the lock, waiting up to `lock_wait` for another holder; breaks a lock that
    /// has been held longer than `stale_after` (judged by this machine's clock).
    pub async fn acquire(t: &Target, opts: &CoordOptions) -> Result<GcLock> {
        let key = lock_key(t);
        let holder = Holder::new("garbage collection");
        let mut backoff = Backoff::new(opts.lock_wait);
        loop {
            let put = t
                .store
                .put_opts(&key, holder.payload(), PutOptions::from(PutMode::Create))
                .await;
            match put {
                Ok(_) => {
                    let taken_ms = match mtime_ms(t, &key).await {
                        Ok(Some(m)) => m,
                        Ok(None) => i64::MAX,
                        Err(e) => {
                            t.store.delete(&key).await.ok();
                            return Err(e);
                        }
                    };
                    return Ok(GcLock { key, taken_ms });
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let now_ms = ms(std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default());
                    if let Some(held) = mtime_ms(t, &key).await? {
                        if held.saturating_add(ms(opts.stale_after)) < now_ms {
                            tracing::warn!(key = %key, "breaking a stale GC lock");
                            t.store.delete(&key).await.ok();
                            continue;
                        }
                    }
                    if !backoff.wait().await {
                        return Err(BackupError::GcBusy {
                            key: key.to_string(),
                            holder: read_holder(t, &key).await,
                        });
                    }
                }
                Err(e) => return Err(BackupError::transport(&key, e)),
            }
        }
    }

    /// Lists in-progress markers; deletes the stale ones. Returns how many are live.
    pub async fn live_markers(&self, t: &Target, opts: &CoordOptions) -> Result<usize> {
        use futures::TryStreamExt;
        let prefix = marker_prefix(t);
        let metas: Vec<_> = t
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| BackupError::transport(&prefix, e))?;
        let mut live = 0;
        for m in metas {
            let age_limit = m
                .last_modified
                .timestamp_millis()
                .saturating_add(ms(opts.stale_after));
            if age_limit < self.taken_ms {
                tracing::warn!(key = %m.location, "removing a stale in-progress marker");
                match t.store.delete(&m.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(BackupError::transport(&m.location, e)),
                }
            } else {
                live += 1;
            }
        }
        Ok(live)
    }

    /// Releases the lock.
    pub async fn release(self, t: &Target) -> Result<()> {
        match t.store.delete(&self.key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(BackupError::transport(&self.key, e)),
        }
    }
}
