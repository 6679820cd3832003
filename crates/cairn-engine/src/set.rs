//! The replica-set decisions, as a plain state machine with no I/O.
//!
//! Which replicas get a write, which one serves a read, what a failure does and when a
//! fanned-out request is answered are decided here from events; the engine's I/O code only
//! carries the decisions out. Invariants:
//! - a replica in `Err` never receives a request again (until a later rebuild adds it back);
//! - a write is acknowledged only when every replica it was sent to has answered or been
//!   failed, and at least one `Rw` replica took it;
//! - reads go only to `Rw` replicas (never `Wo`, which may be missing data).

use serde::{Deserialize, Serialize};

/// A replica's mode in the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Up to date: takes writes, serves reads.
    #[serde(rename = "RW")]
    Rw,
    /// Being rebuilt: takes writes, serves no reads.
    #[serde(rename = "WO")]
    Wo,
    /// Failed: out of the set.
    #[serde(rename = "ERR")]
    Err,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Rw => "RW",
            Mode::Wo => "WO",
            Mode::Err => "ERR",
        })
    }
}

/// Modes of every replica plus the read cursor.
#[derive(Debug, Clone)]
pub struct ReplicaSet {
    modes: Vec<Mode>,
    next_read: usize,
    local: Option<usize>,
}

impl ReplicaSet {
    /// A set with these modes; `local` (if any) is preferred for reads.
    pub fn new(modes: Vec<Mode>, local: Option<usize>) -> ReplicaSet {
        ReplicaSet {
            modes,
            next_read: 0,
            local,
        }
    }

    pub fn modes(&self) -> &[Mode] {
        &self.modes
    }

    pub fn mode(&self, i: usize) -> Mode {
        self.modes[i]
    }

    /// Replicas a write, trim or flush goes to: every `Rw` and `Wo` one.
    pub fn write_targets(&self) -> Vec<usize> {
        (0..self.modes.len())
            .filter(|&i| matches!(self.modes[i], Mode::Rw | Mode::Wo))
            .collect()
    }

    /// `Rw` replicas in the order a read tries them: the local one first, else round-robin.
    pub fn read_order(&mut self) -> Vec<usize> {
        let rw: Vec<usize> = (0..self.modes.len())
            .filter(|&i| self.modes[i] == Mode::Rw)
            .collect();
        if rw.is_empty() {
            return rw;
        }
        if let Some(l) = self.local.filter(|l| rw.contains(l)) {
            let mut out = vec![l];
            out.extend(rw.iter().copied().filter(|&i| i != l));
            return out;
        }
        let start = self.next_read % rw.len();
        self.next_read = self.next_read.wrapping_add(1);
        rw[start..].iter().chain(&rw[..start]).copied().collect()
    }

    /// Sets replica `i`'s mode (rebuild: ERR to WO, WO to RW).
    pub fn set_mode(&mut self, i: usize, mode: Mode) {
        self.modes[i] = mode;
    }

    /// Appends a replica in `mode`; returns its index.
    pub fn add(&mut self, mode: Mode) -> usize {
        self.modes.push(mode);
        self.modes.len() - 1
    }

    /// Takes replica `i` out of the set. Returns true when this changed its mode (the
    /// caller must persist the new membership before acknowledging anything `i` missed).
    pub fn fail(&mut self, i: usize) -> bool {
        let changed = self.modes[i] != Mode::Err;
        self.modes[i] = Mode::Err;
        changed
    }

    /// True when some replica can still serve reads.
    pub fn has_rw(&self) -> bool {
        self.modes.contains(&Mode::Rw)
    }
}

/// The state of one request fanned out to several replicas.
#[derive(Debug, Clone)]
pub struct Fanout {
    targets: Vec<(usize, Mode)>,
    answered: Vec<Option<bool>>,
}

/// What a fanned-out request ends as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// At least one `Rw` replica took it and every other target answered or failed.
    Done,
    /// No `Rw` replica took it.
    Failed,
}

impl Fanout {
    /// A request sent to `targets`, with their modes at send time.
    pub fn new(targets: Vec<(usize, Mode)>) -> Fanout {
        let n = targets.len();
        Fanout {
            targets,
            answered: vec![None; n],
        }
    }

    /// Records replica `i`'s answer (`ok`); returns the outcome once every target answered.
    pub fn complete(&mut self, i: usize, ok: bool) -> Option<Outcome> {
        if let Some(k) = self.targets.iter().position(|(t, _)| *t == i) {
            self.answered[k].get_or_insert(ok);
        }
        if self.answered.iter().any(Option::is_none) {
            return None;
        }
        let rw_ok = self
            .targets
            .iter()
            .zip(&self.answered)
            .any(|((_, m), a)| *m == Mode::Rw && *a == Some(true));
        Some(if rw_ok {
            Outcome::Done
        } else {
            Outcome::Failed
        })
    }

    /// Targets that answered with a failure (to be taken out of the set).
    pub fn failed(&self) -> Vec<usize> {
        self.targets
            .iter()
            .zip(&self.answered)
            .filter(|(_, a)| **a == Some(false))
            .map(|((t, _), _)| *t)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_go_to_rw_and_wo_reads_only_to_rw() {
        let mut s = ReplicaSet::new(vec![Mode::Rw, Mode::Wo, Mode::Err, Mode::Rw], None);
        assert_eq!(s.write_targets(), vec![0, 1, 3]);
        let a = s.read_order();
        let b = s.read_order();
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|i| [0, 3].contains(i)));
        assert_ne!(a[0], b[0], "round-robin moves on");
    }

    #[test]
    fn local_replica_is_read_first() {
        let mut s = ReplicaSet::new(vec![Mode::Rw, Mode::Rw, Mode::Rw], Some(2));
        assert_eq!(s.read_order(), vec![2, 0, 1]);
        assert_eq!(s.read_order(), vec![2, 0, 1]);
        s.fail(2);
        assert_eq!(s.read_order().len(), 2);
    }

    #[test]
    fn a_failure_is_reported_once() {
        let mut s = ReplicaSet::new(vec![Mode::Rw, Mode::Rw], None);
        assert!(s.fail(1));
        assert!(!s.fail(1));
        assert_eq!(s.write_targets(), vec![0]);
        assert!(s.has_rw());
        s.fail(0);
        assert!(!s.has_rw());
        assert!(s.write_targets().is_empty());
    }

    #[test]
    fn write_is_done_when_all_answered_and_one_rw_took_it() {
        let mut f = Fanout::new(vec![(0, Mode::Rw), (1, Mode::Rw), (2, Mode::Wo)]);
        assert_eq!(f.complete(1, false), None);
        assert_eq!(f.complete(2, true), None);
        assert_eq!(f.complete(0, true), Some(Outcome::Done));
        assert_eq!(f.failed(), vec![1]);
    }

    #[test]
    fn write_taken_only_by_wo_fails() {
        let mut f = Fanout::new(vec![(0, Mode::Rw), (1, Mode::Wo)]);
        assert_eq!(f.complete(1, true), None);
        assert_eq!(f.complete(0, false), Some(Outcome::Failed));
    }

    #[test]
    fn duplicate_answers_keep_the_first() {
        let mut f = Fanout::new(vec![(0, Mode::Rw), (1, Mode::Rw)]);
        assert_eq!(f.complete(0, true), None);
        assert_eq!(f.complete(0, false), None);
        assert_eq!(f.complete(1, false), Some(Outcome::Done));
        assert_eq!(f.failed(), vec![1]);
    }
}
