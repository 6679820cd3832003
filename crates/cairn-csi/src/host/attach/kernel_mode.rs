//! Mode [`super::AttachMode::Kernel`] of an [`Attacher`]: the glue between the state directory and
//! the kernel NBD steps of [`crate::host::kernel`] (connect, keep connected, resize,
//! disconnect), and the reconnect keepers, one tokio task per attachment.
//!
//! Guarantees: the state file is written before `CONNECT` and again with the device's index
//! after it, so a crash in between leaves a device found by its backend identifier (the
//! volume id), never one taken for another volume's; a device mounted or open exclusively is
//! never disconnected ([`HostError::DeviceBusy`]); at most one keeper runs per volume, and
//! it is stopped before its device is disconnected.
//! Assumes: the caller holds the volume's lock; the `nbd` module; blocking callers not on a
//! runtime worker thread ([`block_on`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::state::{read_state, write_state, State};
use super::RESIZE_SIGNAL_EVERY;
use super::{Attacher, Attachment, AttachmentState, NbdUri};
use crate::host::error::{HostError, Result};
use crate::host::wait::poll;
use crate::host::{kernel, nbd_netlink};

impl Attacher {
    /// A kernel attachment's device if the kernel has it configured for this volume (and a
    /// keeper running for it); `None` if it is gone or serves something else now.
    pub(super) fn resume_kernel(
        &self,
        volume_id: &str,
        uri: &NbdUri,
        st: &State,
    ) -> Result<Option<PathBuf>> {
        let Some(index) = st.index else {
            return Ok(None);
        };
        if !block_on(kernel::connected(index))??
            || kernel::owned_by(index, volume_id) == Some(false)
        {
            return Ok(None);
        }
        self.spawn_keeper(volume_id, uri, index);
        let device = nbd_netlink::device_path(index);
        tracing::debug!(volume = volume_id, device = %device.display(), "already attached");
        Ok(Some(device))
    }

    /// Mode `kernel`: state file first (no index: a crash after `CONNECT` leaves a device
    /// found by its backend identifier), then `CONNECT`, then the index, then the keeper.
    pub(super) fn attach_fresh_kernel(
        &self,
        volume_id: &str,
        dir: &Path,
        uri: &NbdUri,
        st: &mut State,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| HostError::io("mkdir", dir, e))?;
        // A device of this volume without a state file (a crash before it was written).
        self.teardown_kernel(volume_id, None)?;
        write_state(dir, st)?;
        let (index, device, _) = block_on(kernel::connect(volume_id, uri, st.read_only))??;
        st.index = Some(index);
        write_state(dir, st)?;
        self.spawn_keeper(volume_id, uri, index);
        Ok(device)
    }

    /// Disconnects the kernel devices of `volume_id` (device `index`, and any whose backend
    /// identifier names the volume), after stopping its keeper. A device mounted or open
    /// exclusively: [`HostError::DeviceBusy`], nothing changed.
    pub(super) fn teardown_kernel(&self, volume_id: &str, index: Option<u32>) -> Result<()> {
        let mut indices = kernel::devices_of(volume_id);
        if let Some(i) = index {
            if !indices.contains(&i) && kernel::owned_by(i, volume_id) != Some(false) {
                indices.push(i);
            }
        }
        let mut live = Vec::new();
        for i in indices {
            if block_on(kernel::connected(i))?? {
                live.push(i);
            }
        }
        for i in &live {
            let device = nbd_netlink::device_path(*i);
            if kernel::busy(&device)? {
                return Err(HostError::DeviceBusy { device });
            }
        }
        self.stop_keeper(volume_id);
        for i in live {
            tracing::info!(
                volume = volume_id,
                index = i,
                "disconnecting the kernel NBD device"
            );
            block_on(kernel::disconnect(i))??;
        }
        Ok(())
    }

    /// Mode `kernel`'s [`Attacher::inspect`]: healthy when the kernel reports device
    /// `st.index` configured and not owned by another volume.
    pub(super) fn inspect_kernel(&self, volume_id: &str, st: &State) -> Result<AttachmentState> {
        let connected = match st.index {
            Some(index) => block_on(kernel::connected(index))??,
            None => false,
        };
        let owned = st
            .index
            .is_some_and(|i| kernel::owned_by(i, volume_id) != Some(false));
        Ok(AttachmentState {
            volume_id: volume_id.into(),
            uri: Some(st.uri.clone()),
            read_only: st.read_only,
            device: st.index.filter(|_| connected).map(nbd_netlink::device_path),
            helper_alive: connected,
            healthy: connected && owned,
        })
    }

    /// [`Attacher::grow_device`] in mode `kernel`.
    pub(super) fn grow_kernel(&self, a: &Attachment, new_size: u64) -> Result<u64> {
        let _lock = self.lock(&a.volume_id)?;
        let dir = self.volume_dir(&a.volume_id);
        let index = read_state(&dir)?.index.ok_or_else(|| HostError::BadState {
            path: dir.clone(),
            why: "kernel attachment without a device index".into(),
        })?;
        let uri = NbdUri::parse(&a.uri)?;
        let mut tried: Option<Instant> = None;
        poll(
            &format!(
                "{} of volume {} to reach {new_size} bytes",
                a.device.display(),
                a.volume_id
            ),
            self.cfg.ready_timeout,
            || {
                if tried.is_some_and(|t| t.elapsed() < RESIZE_SIGNAL_EVERY) {
                    return Ok(None);
                }
                tried = Some(Instant::now());
                let size = block_on(kernel::resize(&a.volume_id, index, &uri))??;
                Ok((size >= new_size).then_some(size))
            },
            String::new,
        )
    }

    /// Starts the reconnect keeper of kernel device `index` of `volume_id` unless one runs.
    /// Returns whether it started one.
    pub(super) fn spawn_keeper(&self, volume_id: &str, uri: &NbdUri, index: u32) -> bool {
        let mut keepers = self.keepers.lock().unwrap_or_else(|p| p.into_inner());
        if keepers.get(volume_id).is_some_and(|k| !k.is_finished()) {
            return false;
        }
        let Some(rt) = self
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
        else {
            tracing::warn!(
                volume = volume_id,
                index,
                "no tokio runtime for a reconnect keeper: a dead connection will not be replaced"
            );
            return false;
        };
        let (id, uri) = (volume_id.to_owned(), uri.clone());
        let task = rt.spawn(async move {
            let Err(e) = kernel::keep(&id, &uri, index).await;
            tracing::error!(volume = id, index, error = %e, "reconnect keeper stopped");
        });
        keepers.insert(volume_id.into(), task.abort_handle());
        true
    }

    /// Aborts the reconnect keeper of `volume_id`, if any.
    fn stop_keeper(&self, volume_id: &str) {
        let keeper = self
            .keepers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume_id);
        if let Some(k) = keeper {
            k.abort();
        }
    }
}

/// Runs an async kernel NBD step from blocking code: on the current runtime when called from
/// its blocking pool, else on a current-thread runtime of its own. Must not be called from a
/// runtime worker thread (`Handle::block_on` panics there).
pub(super) fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        return Ok(handle.block_on(f));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| HostError::io("start a tokio runtime", "/", e))?;
    Ok(rt.block_on(f))
}
