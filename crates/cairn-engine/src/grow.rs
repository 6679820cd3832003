//! Online growth of a volume: [`Engine::grow`].
//!
//! Guarantees:
//! - No request past the old end is accepted until every replica that takes writes (RW and
//!   WO) has answered the Grow: the engine holds its submit lock from the moment it queues
//!   Grow on every write target until it raises its size, and the range check of every
//!   request reads that size. Requests queued before the Grow (all inside the old size)
//!   reach each replica first (FIFO links).
//! - A replica that refuses Grow, fails or times out goes to ERR exactly as after a failed
//!   write, and is out of the set before the new size is visible. The grow succeeds when at
//!   least one RW replica grew; otherwise the size stays as it was.
//! - Grow frames carry the engine's epoch: a superseded engine cannot grow a replica.
//! - A replica that is not in the write set when the volume grows is grown before it takes
//!   part again: when an engine starts (a smaller replica is grown at attach), when healing
//!   attaches to it, and when it turns WO (a Grow to the current size is queued ahead of the
//!   first write it gets, under the submit lock).
//! - Shrinking is refused; growing to the current size changes nothing. Existing data is
//!   untouched and new space reads as zeros (the store's `grow`).
//!
//! Frontends: [`cairn_blockdev::BlockDevice::size`] returns the new size at once, so a new
//! NBD connection sees it; a connection already open keeps the size of its handshake (NBD
//! cannot announce a size change) and must reconnect to use the new space.

use std::sync::atomic::Ordering;
use std::time::Duration;

use cairn_wire::{ReplyBody, Request};

use crate::{lock, Engine, Fanout, Link, LinkError, Mode, Outcome};

/// Largest volume the replicas' stores hold: `4096 * (2^32 - 1)` bytes.
pub const MAX_SIZE: u64 = BLOCK * u32::MAX as u64;
const BLOCK: u64 = 4096;

/// Why a grow was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrowError {
    /// The requested size is below the current one.
    #[error("a volume cannot shrink: it has {current} bytes, {requested} were asked for")]
    Shrink { current: u64, requested: u64 },
    /// Zero, not a multiple of 4096, or above [`MAX_SIZE`].
    #[error("size {0} is not a non-zero multiple of 4096 bytes up to {MAX_SIZE}")]
    BadSize(u64),
    /// No RW replica grew (those that failed are ERR now).
    #[error("no RW replica grew to {size} bytes: {why}")]
    Failed { size: u64, why: String },
    /// The engine is being shut down.
    #[error("the engine is shutting down")]
    Closing,
}

/// What a grow request means given the current size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrowStep {
    /// Already that size: nothing to do.
    Unchanged,
    /// Larger: grow every replica.
    Grow,
}

/// Decides a grow from `current` to `requested` bytes (no I/O).
///
/// # Errors
/// [`GrowError::BadSize`] or [`GrowError::Shrink`].
pub fn grow_step(current: u64, requested: u64) -> Result<GrowStep, GrowError> {
    if requested == 0 || !requested.is_multiple_of(BLOCK) || requested > MAX_SIZE {
        return Err(GrowError::BadSize(requested));
    }
    match requested.cmp(&current) {
        std::cmp::Ordering::Less => Err(GrowError::Shrink { current, requested }),
        std::cmp::Ordering::Equal => Ok(GrowStep::Unchanged),
        std::cmp::Ordering::Greater => Ok(GrowStep::Grow),
    }
}

/// The answer to a Grow as a result.
pub(crate) fn grown(r: Result<ReplyBody, LinkError>) -> Result<(), LinkError> {
    match r? {
        ReplyBody::Empty => Ok(()),
        other => Err(LinkError::Closed(format!(
            "unexpected reply to Grow: {other:?}"
        ))),
    }
}

/// Grows the replica behind `link` (not in any engine's set yet) to `new_size`.
pub(crate) async fn grow_link(
    link: &Link,
    new_size: u64,
    timeout: Duration,
) -> Result<(), LinkError> {
    let r = tokio::time::timeout(timeout, link.submit(Request::Grow { new_size }))
        .await
        .unwrap_or(Err(LinkError::Timeout));
    grown(r)
}

impl Engine {
    /// The volume's size now (what [`cairn_blockdev::BlockDevice::size`] returns).
    pub fn current_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the volume to `new_size` bytes online (see the module doc). Returns
    /// [`GrowStep::Unchanged`] when it has that size already.
    ///
    /// # Errors
    /// A shrink or a bad size (nothing sent), or no RW replica grew (size unchanged).
    pub async fn grow(&self, new_size: u64) -> Result<GrowStep, GrowError> {
        let _g = self.submit.lock().await;
        let current = self.current_size();
        if grow_step(current, new_size)? == GrowStep::Unchanged {
            return Ok(GrowStep::Unchanged);
        }
        if self.closing.load(Ordering::Relaxed) {
            return Err(GrowError::Closing);
        }
        let targets: Vec<(usize, Mode)> = {
            let set = lock(&self.set);
            set.write_targets()
                .into_iter()
                .map(|i| (i, set.mode(i)))
                .collect()
        };
        if targets.is_empty() {
            return Err(GrowError::Failed {
                size: new_size,
                why: "no replica is left".into(),
            });
        }
        let futs = targets.iter().map(|&(i, _)| {
            let f = self.send(i, Request::Grow { new_size });
            async move { (i, grown(self.answer(f).await)) }
        });
        let results = futures::future::join_all(futs).await;
        let mut fan = Fanout::new(targets);
        let mut outcome = None;
        let mut failed = Vec::new();
        for (i, r) in results {
            outcome = fan.complete(i, r.is_ok()).or(outcome);
            if let Err(e) = r {
                failed.push((i, e));
            }
        }
        // Out of the set before any request past the old end can be queued.
        for (i, e) in &failed {
            tracing::error!(replica = %self.slot(*i).id, error = %e, new_size, "replica did not grow");
            self.fail(*i, e).await;
        }
        if outcome != Some(Outcome::Done) {
            let why = failed.first().map_or_else(
                || "no RW replica took it".to_owned(),
                |(_, e)| e.to_string(),
            );
            return Err(GrowError::Failed {
                size: new_size,
                why,
            });
        }
        self.size.store(new_size, Ordering::Release);
        tracing::info!(volume = %self.cfg.volume, from = current, to = new_size, "volume grown");
        Ok(GrowStep::Grow)
    }

    /// Queues a Grow to the current size on replica `i`'s link. Called under the submit
    /// lock when `i` turns WO, so it reaches the replica before any write of the new space
    /// (a no-op when the replica has that size already).
    pub(crate) fn grow_queued(
        &self,
        i: usize,
    ) -> impl std::future::Future<Output = Result<ReplyBody, LinkError>> + Send + 'static {
        self.send(
            i,
            Request::Grow {
                new_size: self.current_size(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_steps() {
        let g = 1 << 30;
        assert_eq!(grow_step(g, g), Ok(GrowStep::Unchanged));
        assert_eq!(grow_step(g, g + 4096), Ok(GrowStep::Grow));
        assert_eq!(grow_step(g, MAX_SIZE), Ok(GrowStep::Grow));
        assert_eq!(
            grow_step(g, g - 4096),
            Err(GrowError::Shrink {
                current: g,
                requested: g - 4096
            })
        );
        for bad in [0, 4095, g + 1, MAX_SIZE + 4096, u64::MAX] {
            assert_eq!(grow_step(g, bad), Err(GrowError::BadSize(bad)), "{bad}");
        }
    }
}
