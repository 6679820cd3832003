//! Model-based property test: random sequences of writes, trims, write-zeroes, reads,
//! flushes and block-status queries (valid and invalid) go through the NBD protocol to a
//! `MemDevice`, and every reply, the final contents and the allocation map must match a
//! `Vec<u8>` model that applies nbdkit's validation rules.

mod common;

use std::sync::Arc;

use cairn_blockdev::BlockDevice;

use common::*;
use proptest::prelude::*;

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 64;
const SIZE: u64 = BLOCK * BLOCKS;
const MAX_IO: u32 = 16 * 4096;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: u32,
        seed: u8,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u32,
    },
    Zero {
        offset: u64,
        len: u32,
        no_hole: bool,
    },
    Read {
        offset: u64,
        len: u32,
    },
    Flush,
    Status {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// Mostly aligned ranges near and past the end, sometimes misaligned or empty.
fn range() -> impl Strategy<Value = (u64, u32)> {
    prop_oneof![
        8 => (0..BLOCKS + 4, 1u32..20).prop_map(|(b, n)| (b * BLOCK, n * 4096)),
        1 => (0..SIZE + 8192, 0u32..70_000),
        1 => (0..BLOCKS, Just(0u32)).prop_map(|(b, n)| (b * BLOCK, n)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>(), any::<bool>())
            .prop_map(|((offset, len), seed, fua)| Op::Write { offset, len, seed, fua }),
        2 => range().prop_map(|(offset, len)| Op::Trim { offset, len }),
        2 => (range(), any::<bool>())
            .prop_map(|((offset, len), no_hole)| Op::Zero { offset, len, no_hole }),
        3 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => Just(Op::Flush),
        2 => (range(), any::<bool>())
            .prop_map(|((offset, len), req_one)| Op::Status { offset, len, req_one }),
    ]
}

struct Model {
    data: Vec<u8>,
    alloc: Vec<bool>,
}

impl Model {
    /// The errno nbdkit's rules give this range, if any (checks in the server's order).
    fn refuse(&self, offset: u64, len: u32, writes: bool, data_cmd: bool) -> Option<u32> {
        if len == 0 {
            return Some(EINVAL);
        }
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= SIZE => {}
            _ => return Some(if writes { ENOSPC } else { EINVAL }),
        }
        if !offset.is_multiple_of(BLOCK) || !u64::from(len).is_multiple_of(BLOCK) {
            return Some(EINVAL);
        }
        if data_cmd && len > MAX_IO {
            return Some(EINVAL);
        }
        None
    }

    fn span(offset: u64, len: u32) -> (usize, usize) {
        let a = usize::try_from(offset).unwrap();
        (a, a + usize::try_from(len).unwrap())
    }

    /// Applies a write (`data`) or a zeroing (`None`) with the allocation MemDevice gives it.
    fn set(&mut self, offset: u64, len: u32, data: Option<&[u8]>, alloc: bool) {
        let (a, z) = Model::span(offset, len);
        match data {
            Some(d) => self.data[a..z].copy_from_slice(d),
            None => self.data[a..z].fill(0),
        }
        let bs = usize::try_from(BLOCK).unwrap();
        self.alloc[a / bs..z / bs].fill(alloc);
    }

    fn status(&self, offset: u64, len: u32, req_one: bool) -> Vec<(u32, u32)> {
        let bs = usize::try_from(BLOCK).unwrap();
        let (a, z) = Model::span(offset, len);
        let mut out: Vec<(u32, u32)> = Vec::new();
        for b in a / bs..z / bs {
            let s = if self.alloc[b] { 0 } else { 3 };
            match out.last_mut() {
                Some((l, st)) if *st == s => *l += 4096,
                _ => out.push((4096, s)),
            }
        }
        if req_one {
            out.truncate(1);
        }
        out
    }
}

fn pattern(len: u32, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 253) as u8))
        .collect()
}

async fn check(ops: Vec<Op>, structured: bool) {
    let mut dev = TestDev::new(SIZE);
    dev.max_io = MAX_IO;
    let dev = Arc::new(dev);
    let srv = server(Arc::clone(&dev));
    let (io, task) = pipe(&srv);
    let opts = Opts {
        structured,
        meta: structured,
    };
    let mut c = Client::connect(io, "disk", opts).await;
    let mut m = Model {
        data: vec![0; usize::try_from(SIZE).unwrap()],
        alloc: vec![false; usize::try_from(BLOCKS).unwrap()],
    };
    for op in ops {
        match op {
            Op::Write {
                offset,
                len,
                seed,
                fua,
            } => {
                let data = pattern(len, seed);
                let got = c.write(offset, &data, if fua { FLAG_FUA } else { 0 }).await;
                let want = m.refuse(offset, len, true, true);
                assert_eq!(got.err(), want, "{op:?}");
                if want.is_none() {
                    m.set(offset, len, Some(&data), true);
                }
            }
            Op::Trim { offset, len } => {
                let got = c.simple(CMD_TRIM, 0, offset, len).await;
                let want = m.refuse(offset, len, false, false);
                assert_eq!(got.err(), want, "{op:?}");
                if want.is_none() {
                    m.set(offset, len, None, false);
                }
            }
            Op::Zero {
                offset,
                len,
                no_hole,
            } => {
                let flags = if no_hole { FLAG_NO_HOLE } else { 0 };
                let got = c.simple(CMD_WRITE_ZEROES, flags, offset, len).await;
                let want = m.refuse(offset, len, true, false);
                assert_eq!(got.err(), want, "{op:?}");
                if want.is_none() {
                    m.set(offset, len, None, no_hole);
                }
            }
            Op::Read { offset, len } => {
                let got = c.read(offset, len).await;
                match m.refuse(offset, len, false, true) {
                    Some(e) => assert_eq!(got, Err(e), "{op:?}"),
                    None => {
                        let (a, z) = Model::span(offset, len);
                        assert!(got.unwrap() == m.data[a..z], "{op:?}: data differs");
                    }
                }
            }
            Op::Flush => c.simple(CMD_FLUSH, 0, 0, 0).await.unwrap(),
            Op::Status {
                offset,
                len,
                req_one,
            } => {
                let flags = if req_one { FLAG_REQ_ONE } else { 0 };
                let got = c.block_status(offset, len, flags).await;
                let want = if structured {
                    m.refuse(offset, len, false, false)
                } else {
                    Some(EINVAL)
                };
                match want {
                    Some(e) => assert_eq!(got, Err(e), "{op:?}"),
                    None => assert_eq!(got.unwrap(), m.status(offset, len, req_one), "{op:?}"),
                }
            }
        }
    }
    c.disconnect().await;
    task.await.unwrap().unwrap();
    assert!(dev.mem.contents() == m.data, "final contents differ");
    let mut alloc = vec![false; m.alloc.len()];
    for (o, l) in dev.mem.allocated(0, SIZE).await.unwrap() {
        for b in o / BLOCK..(o + l) / BLOCK {
            alloc[usize::try_from(b).unwrap()] = true;
        }
    }
    assert_eq!(alloc, m.alloc, "allocation maps differ");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn nbd_matches_vec_model(ops in prop::collection::vec(op(), 1..40), structured in any::<bool>()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(check(ops, structured));
    }
}
