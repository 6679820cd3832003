//! Shared test support: a minimal NBD client written from the protocol document (not from
//! the server's code), and a test device wrapping `MemDevice` with knobs for limits, gated
//! reads and injected errors.

// Each test file uses a different subset of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use cairn_blockdev::{BlockDevice, DevError, MemDevice};
use cairn_nbd::{NbdError, NbdServer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const FLAG_HAS_FLAGS: u16 = 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_REQ_ONE: u16 = 8;
pub const FLAG_FAST_ZERO: u16 = 16;

pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;

// ------------------------------------------------------------------ test device

/// `MemDevice` plus knobs: a smaller `max_io`, reads of `gated_offset` that wait for a permit
/// on `gate`, a count of concurrent device calls, and an offset whose I/O fails with EIO.
pub struct TestDev {
    pub mem: MemDevice,
    pub max_io: u32,
    pub multi_conn: bool,
    pub gated_offset: Option<u64>,
    pub gate: Semaphore,
    pub active: AtomicUsize,
    pub max_active: AtomicUsize,
    pub fail_offset: Option<u64>,
}

impl TestDev {
    pub fn new(size: u64) -> TestDev {
        TestDev {
            mem: MemDevice::new(size),
            max_io: 32 << 20,
            multi_conn: true,
            gated_offset: None,
            gate: Semaphore::new(0),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            fail_offset: None,
        }
    }

    async fn enter(&self, offset: u64) -> Result<Active<'_>, DevError> {
        let n = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(n, Ordering::SeqCst);
        let guard = Active(&self.active);
        if Some(offset) == self.gated_offset {
            self.gate.acquire().await.expect("gate closed").forget();
        }
        if Some(offset) == self.fail_offset {
            return Err(DevError::Io("injected failure".into()));
        }
        Ok(guard)
    }
}

struct Active<'a>(&'a AtomicUsize);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlockDevice for TestDev {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn max_io(&self) -> u32 {
        self.max_io
    }
    fn multi_conn(&self) -> bool {
        self.multi_conn
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DevError> {
        let _a = self.enter(offset).await?;
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DevError> {
        let _a = self.enter(offset).await?;
        self.mem.write(offset, data, fua).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, fua: bool, no_hole: bool) -> Result<(), DevError> {
        let _a = self.enter(o).await?;
        self.mem.write_zeroes(o, l, fua, no_hole).await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        let _a = self.enter(offset).await?;
        self.mem.trim(offset, len, fua).await
    }
    async fn flush(&self) -> Result<(), DevError> {
        self.mem.flush().await
    }
    async fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, DevError> {
        let _a = self.enter(offset).await?;
        self.mem.allocated(offset, len).await
    }
}

/// A server with one export `disk` ("test disk").
pub fn server<D: BlockDevice>(dev: Arc<D>) -> Arc<NbdServer<D>> {
    let mut s = NbdServer::new();
    s.add_export("disk", "test disk", dev);
    Arc::new(s)
}

/// Starts `handle_connection` on one end of an in-memory pipe; returns the other end.
pub fn pipe<D: BlockDevice>(
    server: &Arc<NbdServer<D>>,
) -> (DuplexStream, JoinHandle<Result<(), NbdError>>) {
    let (client, srv) = tokio::io::duplex(1 << 20);
    let server = Arc::clone(server);
    let task = tokio::spawn(async move { server.handle_connection(srv).await });
    (client, task)
}

// ------------------------------------------------------------------- handshake

/// Reads the greeting; returns the handshake flags.
pub async fn greeting<S: AsyncRead + Unpin>(s: &mut S) -> u16 {
    assert_eq!(s.read_u64().await.unwrap(), NBDMAGIC);
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    s.read_u16().await.unwrap()
}

pub async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

/// One option reply: `(option, type, data)`.
pub async fn option_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
    let opt = s.read_u32().await.unwrap();
    let kind = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut data = vec![0; usize::try_from(len).unwrap()];
    s.read_exact(&mut data).await.unwrap();
    (opt, kind, data)
}

/// Replies up to and including the final one (ACK or an error).
pub async fn option_replies<S: AsyncRead + Unpin>(s: &mut S) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let r = option_reply(s).await;
        let last = r.1 == REP_ACK || r.1 & 0x8000_0000 != 0;
        out.push(r);
        if last {
            return out;
        }
    }
}

pub fn str32(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
    b.extend_from_slice(s);
}

pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    str32(&mut d, name.as_bytes());
    d.extend_from_slice(&u16::try_from(infos.len()).unwrap().to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    str32(&mut d, name.as_bytes());
    d.extend_from_slice(&u32::try_from(queries.len()).unwrap().to_be_bytes());
    for q in queries {
        str32(&mut d, q.as_bytes());
    }
    d
}

/// What `NBD_OPT_GO` told the client.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum)
    pub block_size: Option<(u32, u32, u32)>,
    pub name: Option<String>,
    pub description: Option<String>,
}

pub fn parse_infos(replies: &[(u32, u32, Vec<u8>)]) -> ExportInfo {
    let mut info = ExportInfo::default();
    for (_, kind, d) in replies {
        if *kind != REP_INFO {
            continue;
        }
        let be32 = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
        match u16::from_be_bytes([d[0], d[1]]) {
            INFO_EXPORT => {
                assert_eq!(d.len(), 12);
                info.size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                info.flags = u16::from_be_bytes([d[10], d[11]]);
            }
            INFO_BLOCK_SIZE => {
                assert_eq!(d.len(), 14);
                info.block_size = Some((be32(2), be32(6), be32(10)));
            }
            INFO_NAME => info.name = Some(String::from_utf8(d[2..].to_vec()).unwrap()),
            INFO_DESCRIPTION => {
                info.description = Some(String::from_utf8(d[2..].to_vec()).unwrap())
            }
            other => panic!("unexpected info type {other}"),
        }
    }
    info
}

/// Options for [`Client::connect`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Opts {
    pub structured: bool,
    pub meta: bool,
}

// ----------------------------------------------------------------- transmission

/// A reply: cookie and result (`Err((errno, message))`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    pub result: Result<Payload, (u32, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    None,
    Data(Vec<u8>),
    /// Context id and `(length, flags)` descriptors.
    Status(u32, Vec<(u32, u32)>),
}

/// A minimal NBD client: sends requests (pipelined if wanted) and parses replies, checking
/// their framing strictly.
pub struct Client<S> {
    pub io: S,
    pub info: ExportInfo,
    pub structured: bool,
    pub meta_id: Option<u32>,
    /// Cookie → (command, offset, length) of requests not yet answered.
    pending: HashMap<u64, (u16, u64, u32)>,
    next_cookie: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Fixed newstyle handshake with NO_ZEROES, then GO on `name` asking for block sizes.
    pub async fn connect(mut io: S, name: &str, opts: Opts) -> Client<S> {
        let hflags = greeting(&mut io).await;
        assert_eq!(hflags, 3, "FIXED_NEWSTYLE | NO_ZEROES");
        io.write_u32(3).await.unwrap();
        let mut meta_id = None;
        if opts.structured {
            send_option(&mut io, OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(option_reply(&mut io).await.1, REP_ACK);
        }
        if opts.meta {
            send_option(
                &mut io,
                OPT_SET_META_CONTEXT,
                &meta_data(name, &["base:allocation"]),
            )
            .await;
            let r = option_replies(&mut io).await;
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].1, REP_META_CONTEXT);
            assert_eq!(&r[0].2[4..], b"base:allocation");
            meta_id = Some(u32::from_be_bytes(r[0].2[0..4].try_into().unwrap()));
        }
        send_option(&mut io, OPT_GO, &go_data(name, &[INFO_BLOCK_SIZE])).await;
        let r = option_replies(&mut io).await;
        assert_eq!(r.last().unwrap().1, REP_ACK, "{r:?}");
        let info = parse_infos(&r);
        Client {
            io,
            info,
            structured: opts.structured,
            meta_id,
            pending: HashMap::new(),
            next_cookie: 1,
        }
    }

    /// Sends a request (with `payload` for WRITE) without waiting; returns its cookie.
    pub async fn send(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.send_raw(REQUEST_MAGIC, cmd, flags, cookie, offset, len, payload)
            .await;
        if cmd != CMD_DISC {
            self.pending.insert(cookie, (cmd, offset, len));
        }
        cookie
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn send_raw(
        &mut self,
        magic: u32,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.io.write_all(&b).await.unwrap();
    }

    /// Reads one complete reply (all chunks of a structured reply).
    pub async fn recv(&mut self) -> Reply {
        let magic = self.io.read_u32().await.unwrap();
        match magic {
            SIMPLE_MAGIC => {
                let error = self.io.read_u32().await.unwrap();
                let cookie = self.io.read_u64().await.unwrap();
                let (cmd, _, len) = self.pending.remove(&cookie).expect("unknown cookie");
                if error != 0 {
                    return Reply {
                        cookie,
                        result: Err((error, String::new())),
                    };
                }
                if cmd == CMD_READ {
                    assert!(
                        !self.structured,
                        "simple reply to READ with structured replies"
                    );
                    let mut data = vec![0; usize::try_from(len).unwrap()];
                    self.io.read_exact(&mut data).await.unwrap();
                    return Reply {
                        cookie,
                        result: Ok(Payload::Data(data)),
                    };
                }
                Reply {
                    cookie,
                    result: Ok(Payload::None),
                }
            }
            STRUCTURED_MAGIC => {
                assert!(self.structured, "structured reply not negotiated");
                self.recv_structured().await
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    async fn recv_structured(&mut self) -> Reply {
        let mut first = true;
        let mut data: Option<(Vec<u8>, Vec<bool>)> = None;
        let mut status = None;
        let mut error = None;
        loop {
            if !first {
                assert_eq!(self.io.read_u32().await.unwrap(), STRUCTURED_MAGIC);
            }
            first = false;
            let flags = self.io.read_u16().await.unwrap();
            let kind = self.io.read_u16().await.unwrap();
            let cookie = self.io.read_u64().await.unwrap();
            let len = usize::try_from(self.io.read_u32().await.unwrap()).unwrap();
            let mut body = vec![0; len];
            self.io.read_exact(&mut body).await.unwrap();
            let &(cmd, offset, rlen) = self.pending.get(&cookie).expect("unknown cookie");
            match kind {
                0 => assert_eq!(len, 0),
                1 => {
                    assert_eq!(cmd, CMD_READ);
                    assert!(len >= 9);
                    let at = u64::from_be_bytes(body[0..8].try_into().unwrap());
                    let (buf, seen) = data.get_or_insert_with(|| {
                        let n = usize::try_from(rlen).unwrap();
                        (vec![0; n], vec![false; n])
                    });
                    let start = usize::try_from(at - offset).unwrap();
                    for (i, b) in body[8..].iter().enumerate() {
                        assert!(!seen[start + i], "overlapping chunks");
                        seen[start + i] = true;
                        buf[start + i] = *b;
                    }
                }
                5 => {
                    assert_eq!(cmd, CMD_BLOCK_STATUS);
                    assert!(len >= 12 && (len - 4) % 8 == 0);
                    let id = u32::from_be_bytes(body[0..4].try_into().unwrap());
                    let d = body[4..]
                        .chunks(8)
                        .map(|c| {
                            (
                                u32::from_be_bytes(c[0..4].try_into().unwrap()),
                                u32::from_be_bytes(c[4..8].try_into().unwrap()),
                            )
                        })
                        .collect();
                    status = Some((id, d));
                }
                0x8001 => {
                    let e = u32::from_be_bytes(body[0..4].try_into().unwrap());
                    let mlen = usize::from(u16::from_be_bytes([body[4], body[5]]));
                    assert_eq!(len, 6 + mlen);
                    let msg = String::from_utf8(body[6..].to_vec()).unwrap();
                    error = Some((e, msg));
                }
                other => panic!("unexpected chunk type {other}"),
            }
            if flags & 1 != 0 {
                self.pending.remove(&cookie);
                let result = if let Some(e) = error {
                    Err(e)
                } else if let Some((buf, seen)) = data {
                    assert!(seen.iter().all(|&s| s), "read not fully covered");
                    Ok(Payload::Data(buf))
                } else if let Some((id, d)) = status {
                    Ok(Payload::Status(id, d))
                } else {
                    assert_ne!(cmd, CMD_READ, "READ answered without data");
                    Ok(Payload::None)
                };
                return Reply { cookie, result };
            }
        }
    }

    /// Sends one request and waits for its reply.
    pub async fn call(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Payload, (u32, String)> {
        let cookie = self.send(cmd, flags, offset, len, payload).await;
        let r = self.recv().await;
        assert_eq!(r.cookie, cookie);
        r.result
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        match self.call(CMD_READ, 0, offset, len, &[]).await {
            Ok(Payload::Data(d)) => Ok(d),
            Ok(other) => panic!("read returned {other:?}"),
            Err((e, _)) => Err(e),
        }
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<(), u32> {
        let len = u32::try_from(data.len()).unwrap();
        self.call(CMD_WRITE, flags, offset, len, data)
            .await
            .map(|_| ())
            .map_err(|e| e.0)
    }

    /// A command without payload whose success carries no data.
    pub async fn simple(&mut self, cmd: u16, flags: u16, offset: u64, len: u32) -> Result<(), u32> {
        match self.call(cmd, flags, offset, len, &[]).await {
            Ok(Payload::None) => Ok(()),
            Ok(other) => panic!("unexpected payload {other:?}"),
            Err((e, _)) => Err(e),
        }
    }

    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> Result<Vec<(u32, u32)>, u32> {
        match self.call(CMD_BLOCK_STATUS, flags, offset, len, &[]).await {
            Ok(Payload::Status(id, d)) => {
                assert_eq!(Some(id), self.meta_id);
                Ok(d)
            }
            Ok(other) => panic!("unexpected payload {other:?}"),
            Err((e, _)) => Err(e),
        }
    }

    /// Sends DISC and expects the server to close without another byte.
    pub async fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 0, 0, &[]).await;
        let mut rest = Vec::new();
        self.io.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "bytes after DISC: {rest:?}");
    }
}
