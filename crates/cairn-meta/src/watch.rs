//! Changes to the applied records, for `Watch`: a bounded in-memory history
//! and a broadcast of live changes, fed by the state machine's apply.
//!
//! Guarantees: the state machine applies an entry inside
//! [`WatchHub::publish`], which holds the hub's lock while the entry is
//! written and while its changes are appended to the history and broadcast.
//! A subscription ([`WatchHub::subscribe_from`], [`WatchHub::subscribe_with`],
//! [`WatchHub::resume`]) takes the same lock, so what it replays and what it
//! then receives live are exactly all changes, in apply order, without gaps
//! or duplicates. Every change carries a sequence number (`seq`, +1 per
//! change, local to this process) and the revision (log index) of its entry;
//! the changes of one entry (a batch) share a revision.
//!
//! Assumes: revisions only grow; a change is published once its entry is
//! committed (the state machine applies only committed entries), possibly
//! before this member flushed it.
//!
//! The history starts empty when the member starts (`first_known` is then
//! last applied + 1) and drops its oldest changes beyond its capacity;
//! installing a snapshot replaces the records wholesale, so it clears the
//! history and ends every live watcher ([`Msg::Reset`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::broadcast;

use crate::Record;

/// Changes the history keeps by default.
pub(crate) const HISTORY: usize = 10_000;
/// Changes a live watcher may fall behind before it catches up from the
/// history.
const LIVE_BUFFER: usize = 1024;

/// One change to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    /// Position among all changes published by this hub.
    pub(crate) seq: u64,
    /// Log index of the entry that made it.
    pub(crate) revision: u64,
    /// Deleted (`record` is its last value) rather than created or updated.
    pub(crate) deleted: bool,
    /// The record, with its version.
    pub(crate) record: Record,
}

/// What live watchers receive.
#[derive(Debug, Clone)]
pub(crate) enum Msg {
    Change(Arc<Change>),
    /// A snapshot replaced the records: the watcher must List again.
    Reset,
}

/// What [`WatchHub::subscribe_from`] and [`WatchHub::resume`] return: the
/// changes to replay, the live receiver, and the seq of the last change
/// published before the receiver was created.
pub(crate) type Subscription = (Vec<Arc<Change>>, broadcast::Receiver<Msg>, u64);

#[derive(Debug)]
struct History {
    changes: VecDeque<Arc<Change>>,
    capacity: usize,
    /// The oldest revision whose changes are all in `changes`.
    first_known: u64,
    /// Seq of the next change.
    next_seq: u64,
}

/// The change feed of one member's state machine.
#[derive(Debug)]
pub(crate) struct WatchHub {
    history: Mutex<History>,
    live: broadcast::Sender<Msg>,
}

impl WatchHub {
    /// A hub whose history starts after `last_applied` and keeps at most
    /// `capacity` changes.
    pub(crate) fn new(last_applied: u64, capacity: usize) -> Self {
        Self {
            history: Mutex::new(History {
                changes: VecDeque::new(),
                capacity: capacity.max(1),
                first_known: last_applied.saturating_add(1),
                next_seq: 1,
            }),
            live: broadcast::channel(LIVE_BUFFER).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `apply` (the write of the entry at `revision`) under the lock,
    /// then records and broadcasts the changes it returns as `(deleted,
    /// record)` pairs.
    pub(crate) fn publish<T, E>(
        &self,
        revision: u64,
        apply: impl FnOnce() -> Result<(T, Vec<(bool, Record)>), E>,
    ) -> Result<T, E> {
        let mut h = self.lock();
        let (out, changes) = apply()?;
        for (deleted, record) in changes {
            let change = Arc::new(Change {
                seq: h.next_seq,
                revision,
                deleted,
                record,
            });
            h.next_seq = h.next_seq.saturating_add(1);
            if h.changes.len() >= h.capacity {
                if let Some(old) = h.changes.pop_front() {
                    h.first_known = h.first_known.max(old.revision.saturating_add(1));
                }
            }
            h.changes.push_back(change.clone());
            // No receiver is not an error: nobody watches.
            let _ = self.live.send(Msg::Change(change));
        }
        Ok(out)
    }

    /// Runs `install` (a snapshot install that leaves `last_applied` applied)
    /// under the lock, then clears the history and ends live watchers.
    pub(crate) fn reset<T, E>(
        &self,
        last_applied: u64,
        install: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let mut h = self.lock();
        let out = install()?;
        h.changes.clear();
        h.first_known = last_applied.saturating_add(1);
        // The reset takes a seq of its own, so no watcher from before it can
        // resume across it.
        h.next_seq = h.next_seq.saturating_add(1);
        let _ = self.live.send(Msg::Reset);
        Ok(out)
    }

    /// The changes from `from_revision` on and a receiver of the later ones;
    /// `Err(first_known)` when the history no longer holds them all.
    pub(crate) fn subscribe_from(&self, from_revision: u64) -> Result<Subscription, u64> {
        let h = self.lock();
        if from_revision < h.first_known {
            return Err(h.first_known);
        }
        let replay = h
            .changes
            .iter()
            .filter(|c| c.revision >= from_revision)
            .cloned()
            .collect();
        Ok((replay, self.live.subscribe(), h.next_seq.saturating_sub(1)))
    }

    /// Runs `read` (a read of the current records) with no entry being
    /// applied meanwhile, and returns its answer with a receiver of every
    /// change after it.
    pub(crate) fn subscribe_with<T>(
        &self,
        read: impl FnOnce() -> T,
    ) -> (T, broadcast::Receiver<Msg>, u64) {
        let h = self.lock();
        let out = read();
        (out, self.live.subscribe(), h.next_seq.saturating_sub(1))
    }

    /// For a watcher that fell behind: the changes after seq `after` and a
    /// new receiver; `None` when the history no longer holds them all.
    pub(crate) fn resume(&self, after: u64) -> Option<Subscription> {
        let h = self.lock();
        let next = after.checked_add(1)?;
        let complete = match h.changes.front() {
            Some(c) => c.seq <= next,
            None => h.next_seq == next,
        };
        if !complete {
            return None;
        }
        let replay = h
            .changes
            .iter()
            .filter(|c| c.seq > after)
            .cloned()
            .collect();
        Some((replay, self.live.subscribe(), h.next_seq.saturating_sub(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, version: u64) -> Record {
        Record {
            kind: "volume".into(),
            name: name.into(),
            version,
            data: vec![],
        }
    }

    fn put(hub: &WatchHub, revision: u64, names: &[&str]) {
        hub.publish(revision, || {
            Ok::<_, ()>(((), names.iter().map(|n| (false, rec(n, 1))).collect()))
        })
        .unwrap();
    }

    fn revisions(changes: &[Arc<Change>]) -> Vec<u64> {
        changes.iter().map(|c| c.revision).collect()
    }

    #[test]
    fn history_drops_oldest_and_refuses_older_revisions() {
        let hub = WatchHub::new(4, 3);
        assert_eq!(hub.subscribe_from(4).unwrap_err(), 5);
        put(&hub, 5, &["a"]);
        put(&hub, 6, &["b", "c"]);
        let (replay, _, last) = hub.subscribe_from(5).unwrap();
        assert_eq!((revisions(&replay), last), (vec![5, 6, 6], 3));
        put(&hub, 8, &["d"]);
        assert_eq!(hub.subscribe_from(5).unwrap_err(), 6);
        let (replay, _, _) = hub.subscribe_from(6).unwrap();
        assert_eq!(revisions(&replay), [6, 6, 8]);
        let (replay, _, _) = hub.subscribe_from(7).unwrap();
        assert_eq!(revisions(&replay), [8]);
        // Partly dropped batch: revision 6 is no longer complete.
        put(&hub, 9, &["e"]);
        assert_eq!(hub.subscribe_from(6).unwrap_err(), 7);
    }

    #[test]
    fn live_follows_replay_and_resume_fills_gaps() {
        let hub = WatchHub::new(0, 10);
        put(&hub, 1, &["a"]);
        let (replay, mut rx, last) = hub.subscribe_from(1).unwrap();
        assert_eq!((replay.len(), last), (1, 1));
        put(&hub, 2, &["b"]);
        match rx.try_recv().unwrap() {
            Msg::Change(c) => assert_eq!((c.seq, c.revision), (2, 2)),
            Msg::Reset => panic!("reset"),
        }
        let (replay, _, last) = hub.resume(1).unwrap();
        assert_eq!((revisions(&replay), last), (vec![2], 2));
        assert!(hub.resume(2).unwrap().0.is_empty());
        hub.reset(7, || Ok::<_, ()>(())).unwrap();
        assert!(matches!(rx.try_recv().unwrap(), Msg::Reset));
        assert!(hub.resume(2).is_none());
        assert_eq!(hub.subscribe_from(7).unwrap_err(), 8);
    }
}
