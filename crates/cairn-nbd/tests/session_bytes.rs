//! Property tests of whole sessions: arbitrary client bytes through `handle_connection` over
//! an in-memory pipe. The server must never panic or hang: once the client's input ends, the
//! connection ends (cleanly or with an error). With a valid handshake and well-framed
//! requests of random commands, flags, offsets and lengths, every reply frame must be
//! well formed and every request answered exactly once.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 256 << 10;

/// Feeds `input` to a fresh connection, closes the input, and returns the server's output
/// and whether the session ended without error.
async fn session(input: Vec<u8>) -> (Vec<u8>, bool) {
    let mut dev = TestDev::new(SIZE);
    dev.max_io = 64 << 10;
    let srv = server(Arc::new(dev));
    let (io, task) = pipe(&srv);
    let (mut rd, mut wr) = tokio::io::split(io);
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    });
    // The server may stop reading early (protocol error): ignore write errors.
    let _ = wr.write_all(&input).await;
    let _ = wr.shutdown().await;
    let result = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("server hung after the input ended")
        .expect("server task panicked");
    drop(wr);
    let out = reader.await.unwrap();
    (out, result.is_ok())
}

fn run(input: Vec<u8>) -> (Vec<u8>, bool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(session(input))
}

fn handshake() -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec();
    let opt = |b: &mut Vec<u8>, o: u32, d: &[u8]| {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&u32::try_from(d.len()).unwrap().to_be_bytes());
        b.extend_from_slice(d);
    };
    opt(&mut b, OPT_STRUCTURED_REPLY, &[]);
    opt(
        &mut b,
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    opt(&mut b, OPT_GO, &go_data("disk", &[]));
    b
}

#[derive(Debug, Clone)]
struct Req {
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u32,
}

fn req() -> impl Strategy<Value = Req> {
    let cmd = prop_oneof![
        4 => prop::sample::select(vec![0u16, 1, 3, 4, 6, 7]),
        1 => prop::sample::select(vec![5u16, 8, 99, 0xffff]),
    ];
    let flags = prop_oneof![3 => Just(0u16), 2 => 0u16..32, 1 => any::<u16>()];
    let offset = prop_oneof![
        4 => (0u64..70).prop_map(|b| b * 4096),
        1 => any::<u64>(),
        1 => 0u64..SIZE,
    ];
    let len = prop_oneof![
        4 => (0u32..20).prop_map(|b| b * 4096),
        1 => 0u32..140_000,
    ];
    (cmd, flags, offset, len).prop_map(|(cmd, flags, offset, len)| Req {
        cmd,
        flags,
        offset,
        len,
    })
}

/// Skips the greeting and option replies up to the GO's ACK; returns the rest.
fn after_handshake(out: &[u8]) -> &[u8] {
    let mut b = &out[18..];
    loop {
        assert_eq!(&b[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(b[12..16].try_into().unwrap());
        let len = usize::try_from(u32::from_be_bytes(b[16..20].try_into().unwrap())).unwrap();
        b = &b[20 + len..];
        if opt == OPT_GO && kind == REP_ACK {
            return b;
        }
    }
}

/// Parses reply frames (all self-describing once structured replies are on); returns the
/// cookies that got a final reply, asserting none gets two.
fn final_replies(mut b: &[u8]) -> Vec<u64> {
    let mut done = Vec::new();
    let mut seen = HashSet::new();
    while !b.is_empty() {
        let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
        let cookie;
        match magic {
            0x6744_6698 => {
                // Simple replies carry no data here: READ always answers structured.
                cookie = u64::from_be_bytes(b[8..16].try_into().unwrap());
                b = &b[16..];
            }
            0x668e_33ef => {
                let flags = u16::from_be_bytes([b[4], b[5]]);
                let kind = u16::from_be_bytes([b[6], b[7]]);
                cookie = u64::from_be_bytes(b[8..16].try_into().unwrap());
                let len =
                    usize::try_from(u32::from_be_bytes(b[16..20].try_into().unwrap())).unwrap();
                assert_eq!(flags, 1, "every reply is a single final chunk");
                match kind {
                    1 => assert!(len >= 9),
                    5 => assert!(len >= 12 && (len - 4) % 8 == 0),
                    0x8001 => {
                        let mlen = usize::from(u16::from_be_bytes([b[24], b[25]]));
                        assert_eq!(len, 6 + mlen);
                    }
                    other => panic!("unexpected chunk type {other}"),
                }
                b = &b[20 + len..];
            }
            other => panic!("bad reply magic {other:#x}"),
        }
        assert!(seen.insert(cookie), "two final replies for cookie {cookie}");
        done.push(cookie);
    }
    done
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_or_hang(data in prop::collection::vec(any::<u8>(), 0..600)) {
        run(data);
    }

    #[test]
    fn arbitrary_options_after_valid_flags(data in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&data);
        run(input);
    }

    #[test]
    fn arbitrary_bytes_after_handshake(data in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut input = handshake();
        input.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        input.extend_from_slice(&data);
        run(input);
    }

    #[test]
    fn every_framed_request_is_answered_once(reqs in prop::collection::vec(req(), 0..30), disc in any::<bool>()) {
        let mut input = handshake();
        for (i, r) in reqs.iter().enumerate() {
            input.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            input.extend_from_slice(&r.flags.to_be_bytes());
            input.extend_from_slice(&r.cmd.to_be_bytes());
            input.extend_from_slice(&(i as u64).to_be_bytes());
            input.extend_from_slice(&r.offset.to_be_bytes());
            input.extend_from_slice(&r.len.to_be_bytes());
            if r.cmd == CMD_WRITE {
                input.resize(input.len() + usize::try_from(r.len).unwrap(), 0xee);
            }
        }
        if disc {
            input.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            input.extend_from_slice(&[0, 0, 0, 2]);
            input.extend_from_slice(&[0; 20]);
        }
        let (out, ok) = run(input);
        prop_assert!(ok, "a well-framed session must end cleanly");
        let mut got = final_replies(after_handshake(&out));
        got.sort_unstable();
        prop_assert_eq!(got, (0..reqs.len() as u64).collect::<Vec<_>>());
    }
}
