//! What a replica missed while it was out of the set: the engine's write-intent record.
//!
//! Every request that changes data (write, write-zeroes, trim) is registered here before it
//! is queued to any replica and unregistered once every target answered. When an RW replica
//! leaves the set its log starts with the regions of every request still in flight (it may
//! or may not have applied them), and from then on every newly registered request marks its
//! regions in the log. Both happen under one mutex, so whichever comes first, no request the
//! replica may have missed escapes the log. A returning replica is resynced by copying only
//! the regions its log marks.
//!
//! Regions are [`REGION`] (64 KiB) bytes: the smallest the design allows, because the cost of
//! a resync is the number of marked regions times the region size, and small random writes
//! are what databases do. Memory stays small: one bit per region in a roaring bitmap, at most
//! 2 MiB per TiB of volume (16 Mi regions) and a few bytes per marked run in practice.

use std::collections::HashMap;
use std::time::Instant;

use roaring::RoaringBitmap;

/// Bytes per region of an outage log.
pub const REGION: u64 = 64 << 10;

/// The regions written while one replica was out, and since when it is out.
#[derive(Debug, Clone)]
pub(crate) struct OutageLog {
    pub since: Instant,
    pub regions: RoaringBitmap,
}

impl OutageLog {
    fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = u32::try_from(offset / REGION).unwrap_or(u32::MAX);
        let end = u32::try_from((offset + len).div_ceil(REGION)).unwrap_or(u32::MAX);
        self.regions.insert_range(first..end);
    }

    /// Marked regions as byte ranges `(offset, len)` merged where adjacent, within `size`.
    pub fn ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in &self.regions {
            let start = u64::from(r) * REGION;
            if start >= size {
                break;
            }
            let len = REGION.min(size - start);
            match out.last_mut() {
                Some((o, l)) if *o + *l == start => *l += len,
                _ => out.push((start, len)),
            }
        }
        out
    }
}

/// Requests in flight and the logs of replicas that are out, keyed by slot index.
#[derive(Debug, Default)]
pub(crate) struct Outages {
    next_id: u64,
    inflight: HashMap<u64, (u64, u64)>,
    logs: HashMap<usize, OutageLog>,
}

impl Outages {
    /// Registers a data-changing request over `offset..offset+len` about to be queued, and
    /// marks it in every open log. Returns the id to pass to [`end`](Self::end).
    pub fn begin(&mut self, offset: u64, len: u64) -> u64 {
        self.next_id += 1;
        self.inflight.insert(self.next_id, (offset, len));
        for log in self.logs.values_mut() {
            log.mark(offset, len);
        }
        self.next_id
    }

    /// The request answered by every target.
    pub fn end(&mut self, id: u64) {
        self.inflight.remove(&id);
    }

    /// Replica `i` left the set while RW: opens its log with every request in flight. An
    /// open log is kept (the replica failed again before it was resynced).
    pub fn open(&mut self, i: usize) {
        if self.logs.contains_key(&i) {
            return;
        }
        let mut log = OutageLog {
            since: Instant::now(),
            regions: RoaringBitmap::new(),
        };
        for &(o, l) in self.inflight.values() {
            log.mark(o, l);
        }
        self.logs.insert(i, log);
    }

    /// Removes and returns replica `i`'s log.
    pub fn take(&mut self, i: usize) -> Option<OutageLog> {
        self.logs.remove(&i)
    }

    /// Regions marked for replica `i`, if it has a log.
    pub fn marked(&self, i: usize) -> Option<u64> {
        self.logs.get(&i).map(|l| l.regions.len())
    }

    /// Drops logs older than `window`: those replicas get a full rebuild.
    pub fn expire(&mut self, window: std::time::Duration) -> Vec<usize> {
        let old: Vec<usize> = self
            .logs
            .iter()
            .filter(|(_, l)| l.since.elapsed() > window)
            .map(|(&i, _)| i)
            .collect();
        for i in &old {
            self.logs.remove(i);
        }
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_opened_mid_request_holds_the_request() {
        let mut o = Outages::default();
        let a = o.begin(0, 4096);
        let b = o.begin(10 * REGION, 2 * REGION + 1);
        o.end(a);
        o.open(1);
        assert_eq!(
            o.take(1).unwrap().regions.iter().collect::<Vec<_>>(),
            vec![10, 11, 12]
        );
        o.end(b);
    }

    #[test]
    fn requests_after_the_failure_are_marked_until_taken() {
        let mut o = Outages::default();
        o.open(0);
        let id = o.begin(REGION - 4096, 8192);
        o.end(id);
        assert_eq!(o.marked(0), Some(2));
        let log = o.take(0).unwrap();
        assert_eq!(log.ranges(1 << 30), vec![(0, 2 * REGION)]);
        let id = o.begin(0, 4096);
        o.end(id);
        assert_eq!(o.marked(0), None);
    }

    #[test]
    fn ranges_merge_and_clip_to_the_volume() {
        let mut log = OutageLog {
            since: Instant::now(),
            regions: RoaringBitmap::new(),
        };
        log.mark(0, REGION);
        log.mark(REGION, 1);
        log.mark(5 * REGION, REGION);
        assert_eq!(
            log.ranges(5 * REGION + 4096),
            vec![(0, 2 * REGION), (5 * REGION, 4096)]
        );
    }

    #[test]
    fn logs_expire_after_the_window() {
        let mut o = Outages::default();
        o.open(3);
        assert!(o.expire(std::time::Duration::from_secs(3600)).is_empty());
        assert_eq!(o.expire(std::time::Duration::ZERO), vec![3]);
        assert_eq!(o.marked(3), None);
    }
}
