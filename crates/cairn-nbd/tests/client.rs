//! Tests of the async pipelined `NbdClient` against the crate's own `NbdServer` on a loopback
//! port, against a hand-written misbehaving server, and against `nbdkit memory` when nbdkit is
//! installed (otherwise that test prints SKIP and passes). Timeouts only bound the tests.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_blockdev::BlockDevice;
use cairn_nbd::{NbdClient, NbdClientError};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const LIMIT: Duration = Duration::from_secs(30);

/// Serves `dev` as export `disk` on 127.0.0.1; aborting the task closes every connection.
async fn start<D: BlockDevice>(dev: Arc<D>) -> (SocketAddr, JoinHandle<std::io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(server(dev).serve(listener)))
}

/// Bounds a test step; a hang fails the test instead of blocking it.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    seed |= 1;
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed.to_le_bytes()[0]
        })
        .collect()
}

fn assert_closed<T: std::fmt::Debug>(r: Result<T, NbdClientError>) -> String {
    match r {
        Err(NbdClientError::Closed(reason)) => reason,
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[test]
fn client_is_send_and_sync() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<NbdClient>();
    shareable::<NbdClientError>();
}

#[tokio::test]
async fn connect_reports_size_and_flags_then_disconnects() {
    let (addr, _srv) = start(Arc::new(TestDev::new(SIZE))).await;
    let c = NbdClient::connect(addr, "disk").await.unwrap();
    assert_eq!(c.size(), SIZE);
    let want = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_WRITE_ZEROES;
    assert_eq!(c.flags() & want, want);
    // The empty name is the default export.
    let d = NbdClient::connect(addr, "").await.unwrap();
    assert_eq!(d.size(), SIZE);
    drop(d);

    c.disconnect().await.unwrap();
    c.disconnect().await.unwrap();
    assert_closed(c.read(0, 4096).await);
    assert_closed(c.flush().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_from_many_tasks_read_back() {
    let dev = Arc::new(TestDev::new(SIZE));
    let (addr, _srv) = start(Arc::clone(&dev)).await;
    let c = Arc::new(NbdClient::connect(addr, "disk").await.unwrap());
    let chunk = SIZE / 64;
    let chunk_len = usize::try_from(chunk).unwrap();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = Arc::clone(&c);
        tasks.push(tokio::spawn(async move {
            let data = Bytes::from(pseudo_random(chunk_len, i + 1));
            c.write(i * chunk, data).await
        }));
    }
    bounded("64 writes", async {
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    })
    .await;
    let flushes = dev.mem.flushes();
    bounded("flush", c.flush()).await.unwrap();
    assert_eq!(dev.mem.flushes(), flushes + 1);

    // Read back concurrently too, in 512 KiB pieces.
    let piece = 512 << 10;
    let mut reads = Vec::new();
    for off in (0..SIZE).step_by(piece) {
        let c = Arc::clone(&c);
        reads.push(tokio::spawn(async move {
            (off, c.read(off, u32::try_from(piece).unwrap()).await)
        }));
    }
    let mut got = vec![0u8; chunk_len * 64];
    bounded("reads", async {
        for r in reads {
            let (off, data) = r.await.unwrap();
            let off = usize::try_from(off).unwrap();
            got[off..off + piece].copy_from_slice(&data.unwrap());
        }
    })
    .await;
    for i in 0..64 {
        let want = pseudo_random(chunk_len, u64::try_from(i).unwrap() + 1);
        assert!(
            got[i * chunk_len..(i + 1) * chunk_len] == want[..],
            "chunk {i} differs"
        );
    }
    assert!(got == dev.mem.contents(), "device content differs");
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_does_not_block_the_others() {
    let mut dev = TestDev::new(SIZE);
    dev.gated_offset = Some(0);
    let dev = Arc::new(dev);
    let (addr, _srv) = start(Arc::clone(&dev)).await;
    let c = Arc::new(NbdClient::connect(addr, "disk").await.unwrap());
    let data = Bytes::from(pseudo_random(4096, 7));
    let stalled = {
        let c = Arc::clone(&c);
        let data = data.clone();
        tokio::spawn(async move { c.write(0, data).await })
    };
    wait_for("the gated write", || dev.active.load(Ordering::SeqCst) == 1).await;
    // Later requests on the same connection complete while the first is pending.
    for i in 1..16u64 {
        bounded("write", c.write(i * 4096, data.clone()))
            .await
            .unwrap();
    }
    let back = bounded("read", c.read(4096, 4096)).await.unwrap();
    assert_eq!(back, data);
    assert!(!stalled.is_finished());

    // Disconnect waits for the stalled write, and refuses new requests meanwhile.
    let disc = {
        let c = Arc::clone(&c);
        tokio::spawn(async move { c.disconnect().await })
    };
    // Until disconnect starts, new requests still go through; then they are refused.
    bounded("disconnect to start", async {
        loop {
            match c.read(4096, 4096).await {
                Ok(_) => tokio::task::yield_now().await,
                Err(NbdClientError::Closed(_)) => break,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert!(!disc.is_finished());
    dev.gate.add_permits(1);
    bounded("stalled write", stalled).await.unwrap().unwrap();
    bounded("disconnect", disc).await.unwrap().unwrap();
    assert_eq!(&dev.mem.contents()[..4096], &data[..]);
}

#[tokio::test]
async fn out_of_range_is_refused_before_sending() {
    let dev = Arc::new(TestDev::new(SIZE));
    let (addr, _srv) = start(Arc::clone(&dev)).await;
    let c = NbdClient::connect(addr, "disk").await.unwrap();
    let cases = [
        c.write(SIZE - 4096, Bytes::from(vec![1u8; 8192])).await,
        c.write(SIZE, Bytes::from(vec![1u8; 4096])).await,
        c.write(u64::MAX - 100, Bytes::from(vec![1u8; 4096])).await,
        c.write_zeroes(SIZE - 4096, 8192).await,
        c.read(SIZE - 4096, 8192).await.map(drop),
        c.read(u64::MAX, 1).await.map(drop),
    ];
    for r in cases {
        match r {
            Err(NbdClientError::OutOfRange { size, .. }) => assert_eq!(size, SIZE),
            other => panic!("expected OutOfRange, got {other:?}"),
        }
    }
    assert!(dev.mem.contents().iter().all(|&b| b == 0));
    // The connection is untouched: the last block is still usable.
    c.write(SIZE - 4096, Bytes::from(vec![9u8; 4096]))
        .await
        .unwrap();
    assert_eq!(c.read(SIZE - 4096, 4096).await.unwrap(), vec![9u8; 4096]);
    c.write_zeroes(SIZE - 4096, 4096).await.unwrap();
    assert_eq!(c.read(SIZE - 4096, 4096).await.unwrap(), vec![0u8; 4096]);
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn unknown_export_is_refused() {
    let (addr, _srv) = start(Arc::new(TestDev::new(SIZE))).await;
    match NbdClient::connect(addr, "nope").await {
        Err(NbdClientError::Refused(msg)) => assert!(!msg.is_empty()),
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[tokio::test]
async fn error_replies_become_server_errors_and_keep_the_connection() {
    let mut dev = TestDev::new(SIZE);
    dev.fail_offset = Some(8192);
    let (addr, _srv) = start(Arc::new(dev)).await;
    let c = NbdClient::connect(addr, "disk").await.unwrap();
    match c.write(8192, Bytes::from(vec![1u8; 4096])).await {
        Err(NbdClientError::Server {
            errno,
            op,
            offset,
            len,
        }) => assert_eq!((errno, op, offset, len), (EIO, "WRITE", 8192, 4096)),
        other => panic!("expected a Server error, got {other:?}"),
    }
    // Misaligned: the server checks alignment, the client does not.
    let err = c.read(512, 4096).await.unwrap_err();
    assert!(
        matches!(
            err,
            NbdClientError::Server {
                errno: EINVAL,
                op: "READ",
                offset: 512,
                len: 4096
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("READ") && msg.contains("512") && msg.contains("EINVAL"),
        "{msg}"
    );
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_death_fails_pending_and_later_requests() {
    let mut dev = TestDev::new(SIZE);
    dev.gated_offset = Some(4096);
    let dev = Arc::new(dev);
    let (addr, srv) = start(Arc::clone(&dev)).await;
    let c = Arc::new(NbdClient::connect(addr, "disk").await.unwrap());
    let pending: Vec<_> = (0..4)
        .map(|_| {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.read(4096, 4096).await })
        })
        .collect();
    wait_for("the gated reads", || dev.active.load(Ordering::SeqCst) == 4).await;
    srv.abort();
    for p in pending {
        assert_closed(bounded("pending read", p).await.unwrap());
    }
    assert_closed(bounded("later write", c.write(0, Bytes::from(vec![0u8; 4096]))).await);
    assert_closed(bounded("later flush", c.flush()).await);
    assert_closed(bounded("disconnect", c.disconnect()).await);
}

#[tokio::test]
async fn protocol_violation_closes_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_u64(NBDMAGIC).await.unwrap();
        s.write_u64(IHAVEOPT).await.unwrap();
        s.write_u16(3).await.unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
        assert_eq!(s.read_u32().await.unwrap(), 3);
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(s.read_u32().await.unwrap(), OPT_GO);
        let len = s.read_u32().await.unwrap();
        let mut opt = vec![0u8; usize::try_from(len).unwrap()];
        s.read_exact(&mut opt).await.unwrap();
        let mut info = Vec::new();
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&SIZE.to_be_bytes());
        info.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).to_be_bytes());
        for (rep, data) in [(REP_INFO, &info[..]), (REP_ACK, &[][..])] {
            s.write_u64(OPT_REPLY_MAGIC).await.unwrap();
            s.write_u32(OPT_GO).await.unwrap();
            s.write_u32(rep).await.unwrap();
            s.write_u32(u32::try_from(data.len()).unwrap())
                .await
                .unwrap();
            s.write_all(data).await.unwrap();
        }
        // Answer the first request with a cookie nobody used, then keep the socket open.
        let mut req = [0u8; 28];
        s.read_exact(&mut req).await.unwrap();
        s.write_u32(0x6744_6698).await.unwrap();
        s.write_u32(0).await.unwrap();
        s.write_u64(u64::MAX).await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let c = NbdClient::connect(addr, "x").await.unwrap();
    assert_eq!(c.size(), SIZE);
    assert!(matches!(
        c.write_zeroes(0, 4096).await,
        Err(NbdClientError::Unsupported("WRITE_ZEROES"))
    ));
    let reason = assert_closed(bounded("flush", c.flush()).await);
    assert!(reason.contains("unknown cookie"), "{reason}");
    assert_closed(c.read(0, 4096).await);
    drop(c);
    // Dropping the client closed the socket, so the fake server's read ends.
    bounded("fake server", fake).await.unwrap();
}

/// Against nbdkit's memory plugin, when nbdkit is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdkit_memory_roundtrip() {
    match std::process::Command::new("nbdkit")
        .arg("--version")
        .output()
    {
        Ok(out) if out.status.success() => {}
        _ => {
            println!("SKIP: nbdkit is not installed");
            return;
        }
    }
    // Take a free port, then let nbdkit bind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["memory", "64M"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = tokio::time::Instant::now() + LIMIT;
    let c = loop {
        match NbdClient::connect(addr, "").await {
            Ok(c) => break Arc::new(c),
            Err(NbdClientError::Io(e)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!("nbdkit not up yet: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connecting to nbdkit: {e}"),
        }
    };
    assert_eq!(c.size(), 64 * MIB);
    let chunk = 2 * MIB;
    let chunk_len = usize::try_from(chunk).unwrap();
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                c.write(i * chunk, Bytes::from(pseudo_random(chunk_len, i + 100)))
                    .await
            })
        })
        .collect();
    for t in tasks {
        bounded("nbdkit write", t).await.unwrap().unwrap();
    }
    c.flush().await.unwrap();
    for i in 0..16u64 {
        let got = c
            .read(i * chunk, u32::try_from(chunk).unwrap())
            .await
            .unwrap();
        assert!(
            got == pseudo_random(chunk_len, i + 100),
            "chunk {i} differs"
        );
    }
    c.write_zeroes(0, 4096).await.unwrap();
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
    bounded("nbdkit disconnect", c.disconnect()).await.unwrap();
    child.kill().await.unwrap();
}

/// `handshake_only` leaves the socket at the first transmission byte, as the kernel NBD
/// driver needs it: a raw simple-reply READ sent on it gets the device's bytes back.
#[tokio::test]
async fn handshake_only_hands_over_a_socket_in_transmission() {
    let dev = Arc::new(TestDev::new(SIZE));
    let (addr, _srv) = start(Arc::clone(&dev)).await;
    let c = NbdClient::connect(addr, "disk").await.unwrap();
    let data = pseudo_random(8192, 5);
    c.write(MIB, Bytes::from(data.clone())).await.unwrap();
    c.flush().await.unwrap();

    let (mut sock, size, flags) = bounded("handshake", NbdClient::handshake_only(addr, "disk"))
        .await
        .unwrap();
    assert_eq!(size, SIZE);
    assert_eq!(flags, c.flags());
    // NBD_CMD_READ (0), cookie 7, offset 1 MiB, 8 KiB.
    let mut req = Vec::with_capacity(28);
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&MIB.to_be_bytes());
    req.extend_from_slice(&8192u32.to_be_bytes());
    sock.write_all(&req).await.unwrap();
    let mut header = [0u8; 16];
    bounded("reply header", sock.read_exact(&mut header))
        .await
        .unwrap();
    assert_eq!(
        header[..4],
        0x6744_6698u32.to_be_bytes(),
        "simple reply magic"
    );
    assert_eq!(header[4..8], [0, 0, 0, 0], "no error");
    assert_eq!(header[8..], 7u64.to_be_bytes(), "cookie");
    let mut got = vec![0u8; 8192];
    bounded("reply data", sock.read_exact(&mut got))
        .await
        .unwrap();
    assert!(got == data, "the bytes written through the client");
}
