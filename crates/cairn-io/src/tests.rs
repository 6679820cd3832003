use std::os::fd::AsRawFd;

use super::*;

fn backends() -> Vec<Io> {
    let mut v = vec![Io::new(EngineChoice::Portable).unwrap()];
    match Io::new(EngineChoice::Uring) {
        Ok(io) => v.push(io),
        Err(e) => eprintln!("skipping io_uring backend: {e}"),
    }
    v
}

#[test]
fn batch_of_writes_then_reads_round_trips() {
    for mut io in backends() {
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        // More ops than the ring holds, each a distinct 4 KiB block.
        let blocks: Vec<Vec<u8>> = (0..600u32)
            .map(|i| (0..4096u32).map(|j| (i * 7 + j) as u8).collect())
            .collect();
        let mut ops: Vec<Op<'_>> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| Op::Write {
                fd,
                buf: b,
                offset: i as u64 * 4096,
            })
            .collect();
        io.run_all(&mut ops).unwrap();
        io.fdatasync(&[fd]).unwrap();
        let mut back = vec![vec![0u8; 4096]; blocks.len()];
        let mut ops: Vec<Op<'_>> = back
            .iter_mut()
            .enumerate()
            .map(|(i, b)| Op::Read {
                fd,
                buf: b,
                offset: i as u64 * 4096,
            })
            .collect();
        io.run_all(&mut ops).unwrap();
        assert_eq!(back, blocks, "backend {}", io.backend());
    }
}

#[test]
fn read_past_end_is_unexpected_eof() {
    for mut io in backends() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(100).unwrap();
        let mut buf = vec![0u8; 4096];
        let err = io.read_at(f.as_raw_fd(), &mut buf, 0).unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof,
            "{}",
            io.backend()
        );
    }
}

#[test]
fn bad_fd_reports_error_per_op() {
    for mut io in backends() {
        let f = tempfile::tempfile().unwrap();
        let good = vec![1u8; 16];
        let mut ops = [
            Op::Write {
                fd: -1,
                buf: &good,
                offset: 0,
            },
            Op::Write {
                fd: f.as_raw_fd(),
                buf: &good,
                offset: 0,
            },
        ];
        let res = io.run(&mut ops);
        assert!(res[0].is_err());
        assert_eq!(res[1].as_ref().unwrap(), &16);
    }
}

#[test]
fn send_then_recv_in_one_batch() {
    for mut io in backends() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let peer = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut b = b;
            let mut got = vec![0u8; 200_000];
            b.read_exact(&mut got).unwrap();
            b.write_all(b"ok").unwrap();
            got
        });
        let mut reply = [0u8; 2];
        let mut ops = [
            Op::Send {
                fd: a.as_raw_fd(),
                buf: &msg,
            },
            Op::Recv {
                fd: a.as_raw_fd(),
                buf: &mut reply,
            },
        ];
        let res = io.run(&mut ops);
        assert_eq!(*res[0].as_ref().unwrap(), msg.len());
        let n = *res[1].as_ref().unwrap();
        assert!(n >= 1);
        assert_eq!(&reply[..n], &b"ok"[..n]);
        assert_eq!(peer.join().unwrap(), msg);
    }
}

#[test]
fn engine_choice_parses() {
    assert_eq!(
        "uring".parse::<EngineChoice>().unwrap(),
        EngineChoice::Uring
    );
    assert_eq!(
        "portable".parse::<EngineChoice>().unwrap(),
        EngineChoice::Portable
    );
    assert!("fast".parse::<EngineChoice>().is_err());
}
