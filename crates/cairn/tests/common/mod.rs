//! Shared helpers for the end-to-end tests: a guard around a real `cairn replica serve`
//! process, the offline tools, a raw connection for malformed frames, a seeded PRNG and a
//! deterministic block pattern that names what it holds.
//!
//! Every test binary includes this module and uses a different subset of it.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use cairn_replica::ClientError;
use cairn_wire::{ErrorKind, FrameDecoder, Reply, ReplyError, Request, DEFAULT_MAX_FRAME};

/// Bytes per block.
pub const BS: u64 = 4096;
/// Bytes per block, as a buffer length.
pub const BSZ: usize = 4096;
/// How long a client waits for a reply before the test fails instead of hanging.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The `cairn` binary under test.
pub fn cairn_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cairn")
}

/// A running `cairn replica serve`; killed (SIGKILL) and reaped on drop.
///
/// When the server runs under a wrapper (strace), `child` is the wrapper and `server_pid`
/// the real server, found among the wrapper's children.
pub struct Server {
    child: Child,
    /// Held so the server never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
    /// `host:port` the server listens on.
    pub addr: String,
    /// The backend the server reported (`uring` or `portable`).
    pub io: String,
    server_pid: u32,
    log: PathBuf,
    reaped: bool,
}

/// Arguments of `cairn replica serve` for `dir` and `engine`.
pub fn serve_args(dir: &Path, engine: &str) -> Vec<String> {
    vec![
        "replica".into(),
        "serve".into(),
        "--dir".into(),
        dir.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--io-engine".into(),
        engine.into(),
    ]
}

impl Server {
    /// Starts a server on `dir` with `engine` and waits for its `listening on` line.
    /// Its log (stderr) goes to `DIR.log` beside the data directory.
    pub fn start(dir: &Path, engine: &str) -> Server {
        let mut cmd = Command::new(cairn_bin());
        cmd.args(serve_args(dir, engine));
        Server::spawn(cmd, &log_path(dir), false)
    }

    /// Starts `cmd`, which must run a server that prints `listening on ADDR (io: X)` first.
    /// `wrapped`: `cmd` is a wrapper (strace) whose only child is the server.
    pub fn spawn(mut cmd: Command, log: &Path, wrapped: bool) -> Server {
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open server log");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn cairn replica serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let n = stdout.read_line(&mut line).unwrap_or(0);
        if n == 0 || !line.starts_with("listening on ") {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "server did not start (first stdout line {line:?}); log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        // `listening on 127.0.0.1:PORT (io: uring)`
        let mut words = line.split_whitespace();
        let addr = words.nth(2).expect("address").to_owned();
        let io = words
            .nth(1)
            .map(|w| w.trim_end_matches(')').to_owned())
            .unwrap_or_default();
        let server_pid = if wrapped {
            only_child_of(child.id())
        } else {
            child.id()
        };
        Server {
            child,
            _stdout: stdout,
            addr,
            io,
            server_pid,
            log: log.to_owned(),
            reaped: false,
        }
    }

    /// The server process id (not the wrapper's).
    pub fn pid(&self) -> u32 {
        self.server_pid
    }

    /// Sends SIGKILL to the server now, without waiting for it.
    pub fn sigkill(&self) {
        if self.reaped {
            return;
        }
        let pid = libc::pid_t::try_from(self.server_pid).expect("pid fits pid_t");
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet (so it cannot have been
        // reused); it touches no memory of ours.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }

    /// SIGKILLs the server and waits until it (and its wrapper) are gone.
    pub fn kill_and_wait(&mut self) {
        if self.reaped {
            return;
        }
        self.sigkill();
        if self.server_pid != self.child.id() {
            // A wrapper exits once its only tracee is gone; make sure anyway.
            let _ = wait_exit(&mut self.child, Duration::from_secs(10));
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client connected with `epoch` (not attached to a replica yet), with a timeout set.
    pub fn client(&self, epoch: u64) -> cairn_replica::Client {
        let c = cairn_replica::Client::connect(&self.addr, epoch).expect("connect");
        c.set_timeout(Some(CLIENT_TIMEOUT)).expect("set timeout");
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill_and_wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of the server log {}:", self.log.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// `DIR.log` beside a data directory.
pub fn log_path(dir: &Path) -> PathBuf {
    let mut p = dir.as_os_str().to_owned();
    p.push(".log");
    PathBuf::from(p)
}

/// Waits (polling, bounded) for `child` to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// The pid of the only child process of `parent` (from `/proc/*/stat`).
fn only_child_of(parent: u32) -> u32 {
    let found = children_of(parent);
    assert_eq!(found.len(), 1, "children of {parent}: {found:?}");
    found[0]
}

/// Output of an offline tool run.
pub struct ToolOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cairn ARGS...` to completion.
pub fn cairn_tool(args: &[&str]) -> ToolOutput {
    let out = Command::new(cairn_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cairn");
    ToolOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `cairn replica scrub PATH`.
pub fn scrub(replica: &Path) -> ToolOutput {
    cairn_tool(&["replica", "scrub", &replica.display().to_string()])
}

/// `cairn replica checksum PATH`.
pub fn checksum(replica: &Path) -> ToolOutput {
    cairn_tool(&["replica", "checksum", &replica.display().to_string()])
}

/// The error kind of a refused call, or a panic naming what came back instead.
pub fn remote_err<T: std::fmt::Debug>(r: Result<T, ClientError>, what: &str) -> ReplyError {
    match r {
        Err(ClientError::Remote(e)) => e,
        other => panic!("{what}: expected an error reply, got {other:?}"),
    }
}

/// Asserts that `r` is an error reply of `kind`; returns it.
pub fn expect_kind<T: std::fmt::Debug>(
    r: Result<T, ClientError>,
    kind: ErrorKind,
    what: &str,
) -> ReplyError {
    let e = remote_err(r, what);
    assert_eq!(e.kind, kind, "{what}: {e:?}");
    e
}

/// SplitMix64: a small seeded PRNG, so failures replay from the printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform-ish in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The content of block `block` as written by the write tagged `tag` (tag 0: zeros).
///
/// Bytes 0..8 hold the tag and 8..16 the block index, both little-endian, so a block read
/// back names the write it came from; the rest is pseudo-random from both.
pub fn fill_block(tag: u64, block: u64, out: &mut [u8]) {
    assert_eq!(out.len(), BSZ);
    if tag == 0 {
        out.fill(0);
        return;
    }
    out[..8].copy_from_slice(&tag.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    let base = mix(tag ^ mix(block.wrapping_add(0x5151)));
    for (i, w) in out[16..].chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&mix(base.wrapping_add(i as u64)).to_le_bytes());
    }
}

/// `nblocks` blocks starting at block `first`, as written by write `tag`.
pub fn pattern(tag: u64, first: u64, nblocks: u64) -> Vec<u8> {
    let mut v = vec![0u8; usize::try_from(nblocks).expect("small") * BSZ];
    for (i, b) in v.chunks_exact_mut(BSZ).enumerate() {
        fill_block(tag, first + i as u64, b);
    }
    v
}

/// The tag a block read back claims (0 for an all-zero block).
pub fn tag_of(block: &[u8]) -> u64 {
    u64::from_le_bytes(block[..8].try_into().expect("8 bytes"))
}

/// True when `block` is exactly block `index` of write `tag`.
pub fn block_is(block: &[u8], tag: u64, index: u64) -> bool {
    let mut want = [0u8; BSZ];
    fill_block(tag, index, &mut want);
    block == want
}

/// Asserts `data` (starting at block `first`) is exactly write `tag`'s content.
pub fn assert_pattern(data: &[u8], tag: u64, first: u64, what: &str) {
    assert_eq!(data.len() % BSZ, 0, "{what}: length {}", data.len());
    for (i, b) in data.chunks_exact(BSZ).enumerate() {
        let idx = first + i as u64;
        assert!(
            block_is(b, tag, idx),
            "{what}: block {idx} holds tag {} (block field {}), expected tag {tag}",
            tag_of(b),
            u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        );
    }
}

/// A plain TCP connection speaking frames by hand, for malformed input and for closing only
/// the write side.
pub struct RawConn {
    pub stream: TcpStream,
    decoder: FrameDecoder,
    inbuf: BytesMut,
    next_id: u64,
    pub epoch: u64,
}

/// What a read on a connection the server should have dropped found.
#[derive(Debug)]
pub enum Closed {
    /// End of stream.
    Eof,
    /// The peer reset the connection (it closed with our bytes unread).
    Reset(std::io::ErrorKind),
}

impl RawConn {
    pub fn connect(addr: &str, epoch: u64) -> RawConn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .expect("timeout");
        stream
            .set_write_timeout(Some(CLIENT_TIMEOUT))
            .expect("timeout");
        RawConn {
            stream,
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME),
            inbuf: BytesMut::new(),
            next_id: 1,
            epoch,
        }
    }

    /// The frame of `req` as this connection would send it next.
    pub fn frame(&mut self, req: &Request) -> BytesMut {
        let mut out = BytesMut::new();
        req.encode(self.next_id, self.epoch, &mut out);
        self.next_id += 1;
        out
    }

    /// Sends `req` and returns its reply.
    pub fn call(&mut self, req: &Request) -> Reply {
        let f = self.frame(req);
        self.stream.write_all(&f).expect("send request");
        self.recv().expect("reply")
    }

    /// The next reply, or `Err` when the connection ends instead.
    pub fn recv(&mut self) -> Result<Reply, Closed> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.inbuf).expect("reply frame") {
                return Ok(Reply::decode(&frame).expect("reply decodes"));
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Closed::Eof),
                Ok(n) => self.inbuf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("no reply and no close within {CLIENT_TIMEOUT:?}")
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Closed::Reset(e.kind())),
            }
        }
    }

    /// Sends raw bytes; a send error is fine (the server may already have dropped us).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Closes our sending side: the server sees end of stream.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Asserts the server closed this connection without sending any reply.
    pub fn expect_closed(&mut self, what: &str) -> Closed {
        match self.recv() {
            Ok(r) => panic!("{what}: the server replied ({r:?}) instead of closing"),
            Err(c) => c,
        }
    }
}

// The cluster tests' helpers (`cairn dev`, network namespaces, real clients, an NBD client).
mod cluster;
mod csi;
mod nbd;
mod nodes;
mod s3;
#[allow(unused_imports)] // Test binaries that start no cluster use neither.
pub use cluster::*;
#[allow(unused_imports)]
pub use csi::*;
#[allow(unused_imports)]
pub use nbd::*;
#[allow(unused_imports)]
pub use nodes::*;
#[allow(unused_imports)]
pub use s3::*;
