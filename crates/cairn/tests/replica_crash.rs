//! Crash consistency of the real server: SIGKILL it while pipelined writes are in flight,
//! restart it on the same directory, and check every block against a model of what the
//! store promises (`cairn-store`'s crate docs): writes acknowledged before the last
//! acknowledged flush read back exactly; later or unacknowledged writes may or may not have
//! landed, block by block; no block is ever reported corrupt because of a kill.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use cairn_replica::Client;
use cairn_wire::{ReplyBody, Request};
use common::{block_is, pattern, scrub, tag_of, Rng, Server, BS, BSZ};

const VOLUME_SIZE: u64 = 16 << 20;
const BLOCKS: u64 = VOLUME_SIZE / BS;
const ROUNDS: u64 = 12;
/// Writes kept in flight on the connection at most.
const WINDOW: usize = 32;
/// A flush after this many writes, on average.
const FLUSH_EVERY: u64 = 12;
/// Bytes per verification read.
const READ_CHUNK: u64 = 1 << 20;

/// What each block may hold. Tags name writes (0: never written, zeros).
struct Model {
    /// Per block: the content made durable by the last acknowledged flush.
    durable: Vec<u64>,
    /// Per block: `(sequence, tag)` of every write sent since, acknowledged or not.
    pending: Vec<Vec<(u64, u64)>>,
}

impl Model {
    fn new() -> Model {
        Model {
            durable: vec![0; BLOCKS as usize],
            pending: vec![Vec::new(); BLOCKS as usize],
        }
    }

    fn sent_write(&mut self, seq: u64, tag: u64, first: u64, n: u64) {
        for b in first..first + n {
            self.pending[b as usize].push((seq, tag));
        }
    }

    /// A flush sent as `seq` was acknowledged: every write sent before it (all applied, as
    /// replies come in order) is durable.
    fn flush_acked(&mut self, seq: u64) {
        for (d, p) in self.durable.iter_mut().zip(&mut self.pending) {
            if let Some(&(_, tag)) = p.iter().rev().find(|(s, _)| *s < seq) {
                *d = tag;
            }
            p.retain(|(s, _)| *s > seq);
        }
    }

    /// Checks block `b` read back as `data`, then takes what was read as the new durable
    /// content (the server has just recovered and nothing is in flight).
    fn verify(&mut self, b: u64, data: &[u8], round: u64) {
        let i = b as usize;
        let tag = tag_of(data);
        let allowed = tag == self.durable[i] || self.pending[i].iter().any(|(_, t)| *t == tag);
        assert!(
            allowed && block_is(data, tag, b),
            "round {round}: block {b} holds tag {tag} (exact: {}); durable tag {}, \
             tags sent since the last acknowledged flush {:?}",
            block_is(data, tag, b),
            self.durable[i],
            self.pending[i]
        );
        self.durable[i] = tag;
        self.pending[i].clear();
    }
}

/// A request in flight, as the model needs to know it.
enum Sent {
    Write { seq: u64 },
    Flush { seq: u64 },
}

/// Reads the whole volume and checks it against the model.
fn verify_volume(c: &mut Client, model: &mut Model, round: u64) {
    let mut off = 0;
    while off < VOLUME_SIZE {
        let data = c
            .read(off, READ_CHUNK as u32)
            .unwrap_or_else(|e| panic!("round {round}: read at {off}: {e}"));
        for (k, block) in data.chunks_exact(BSZ).enumerate() {
            model.verify(off / BS + k as u64, block, round);
        }
        off += READ_CHUNK;
    }
}

/// Handles the reply to the oldest request in flight.
fn on_reply(c: &mut Client, inflight: &mut VecDeque<Sent>, model: &mut Model) -> bool {
    let Ok(reply) = c.recv() else {
        return false;
    };
    let sent = inflight
        .pop_front()
        .expect("a reply with nothing in flight");
    if let Err(e) = &reply.result {
        panic!("request {} failed: {e}", reply.request_id);
    }
    assert_eq!(reply.result, Ok(ReplyBody::Empty));
    match sent {
        Sent::Write { seq } | Sent::Flush { seq } => assert_eq!(reply.request_id, seq),
    }
    if let Sent::Flush { seq } = sent {
        model.flush_acked(seq);
    }
    true
}

fn crash_rounds(engine: &str, seed: u64) {
    let started = Instant::now();
    println!("{engine}: seed {seed:#x}");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let replica = dir.join("vol").join("r1");
    let mut rng = Rng::new(seed);
    let mut model = Model::new();
    let mut next_tag = 1u64;
    let (mut writes, mut kills_in_flight) = (0u64, 0u64);
    for round in 0..ROUNDS {
        let mut server = Server::start(&dir, engine);
        assert_eq!(server.io, engine);
        let mut c = server.client(round + 1);
        let create = if round == 0 { VOLUME_SIZE } else { 0 };
        let st = c.hello("vol", "r1", create).unwrap();
        assert_eq!((st.size, st.epoch), (VOLUME_SIZE, round + 1));
        verify_volume(&mut c, &mut model, round);

        // Request ids increase by one per request on a connection: they order the model.
        let kill_after = rng.range(60, 400);
        let mut inflight: VecDeque<Sent> = VecDeque::new();
        for _ in 0..kill_after {
            while inflight.len() >= WINDOW {
                assert!(on_reply(&mut c, &mut inflight, &mut model), "server died");
            }
            if rng.chance(FLUSH_EVERY) {
                let seq = c.send(&Request::Flush).unwrap();
                inflight.push_back(Sent::Flush { seq });
            } else {
                let n = rng.range(1, 17);
                let first = rng.below(BLOCKS - n + 1);
                let tag = next_tag;
                next_tag += 1;
                let data = Bytes::from(pattern(tag, first, n));
                let fua = rng.chance(20);
                let seq = c.send(&Request::write(first * BS, fua, data)).unwrap();
                model.sent_write(seq, tag, first, n);
                inflight.push_back(Sent::Write { seq });
                writes += 1;
            }
        }
        // Kill with a full window in flight, after letting a few more replies through so
        // the server is caught at a different point each round.
        for _ in 0..rng.below(6) {
            assert!(on_reply(&mut c, &mut inflight, &mut model), "server died");
        }
        kills_in_flight += inflight.len() as u64;
        server.sigkill();
        while !inflight.is_empty() && on_reply(&mut c, &mut inflight, &mut model) {}
        server.kill_and_wait();
    }

    let server = Server::start(&dir, engine);
    let mut c = server.client(ROUNDS + 1);
    c.hello("vol", "r1", 0).unwrap();
    verify_volume(&mut c, &mut model, ROUNDS);
    // A last overwrite after all the recoveries must behave.
    let probe = pattern(next_tag, 7, 3);
    c.write(7 * BS, Bytes::from(probe.clone()), true).unwrap();
    assert_eq!(&c.read(7 * BS, 3 * BSZ as u32).unwrap()[..], &probe[..]);
    drop(c);
    drop(server);

    let out = scrub(&replica);
    assert_eq!(
        out.code,
        Some(0),
        "scrub after {ROUNDS} kills reports corruption:\n{}{}",
        out.stdout,
        out.stderr
    );
    println!(
        "{engine}: {ROUNDS} kills, {writes} writes, {kills_in_flight} requests in flight at \
         the kills, {:?}",
        started.elapsed()
    );
}

#[test]
fn crash_sigkill_mid_stream_keeps_flushed_writes_portable() {
    crash_rounds("portable", 0xC0FF_EE00_0000_0001);
}

#[test]
fn crash_sigkill_mid_stream_keeps_flushed_writes_uring() {
    crash_rounds("uring", 0xC0FF_EE00_0000_0002);
}
