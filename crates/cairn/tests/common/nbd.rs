//! A minimal blocking NBD client over TCP for the cluster tests: fixed-newstyle handshake
//! with `NBD_OPT_GO`, then simple replies only (no structured replies are negotiated, so a
//! read's data follows its reply header). Requests can be pipelined: `send_*` returns the
//! cookie, `recv` returns the next reply, in whatever order the server answers.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;

use super::CLIENT_TIMEOUT;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// One reply: the request's cookie, the NBD error (0: success) and a read's data.
#[derive(Debug)]
pub struct NbdReply {
    pub cookie: u64,
    pub error: u32,
    pub data: Option<Vec<u8>>,
}

/// One NBD connection in transmission phase.
pub struct NbdClient {
    stream: TcpStream,
    /// Export size from `NBD_INFO_EXPORT`.
    pub size: u64,
    /// Transmission flags from `NBD_INFO_EXPORT`.
    pub flags: u16,
    next_cookie: u64,
    /// Cookie -> read length, for every read in flight.
    reads: HashMap<u64, u32>,
    in_flight: usize,
}

/// A request header (plus a write's payload).
fn request(cmd: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(28 + payload.len());
    h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&cmd.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn read_u16(s: &mut TcpStream) -> u16 {
    let mut b = [0u8; 2];
    s.read_exact(&mut b).expect("NBD: read u16");
    u16::from_be_bytes(b)
}

fn read_u32(s: &mut TcpStream) -> u32 {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).expect("NBD: read u32");
    u32::from_be_bytes(b)
}

fn read_u64(s: &mut TcpStream) -> u64 {
    let mut b = [0u8; 8];
    s.read_exact(&mut b).expect("NBD: read u64");
    u64::from_be_bytes(b)
}

impl NbdClient {
    /// Connects to `addr` and selects `export` with `NBD_OPT_GO`.
    pub fn connect(addr: &str, export: &str) -> NbdClient {
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("NBD connect {addr}: {e}"));
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(CLIENT_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(CLIENT_TIMEOUT)).expect("timeout");
        assert_eq!(read_u64(&mut s), NBDMAGIC, "NBD greeting");
        assert_eq!(read_u64(&mut s), IHAVEOPT, "NBD greeting: not newstyle");
        let hs = read_u16(&mut s);
        assert!(
            hs & FLAG_FIXED_NEWSTYLE != 0,
            "server is not fixed-newstyle"
        );
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hs & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        let mut out = Vec::new();
        out.extend_from_slice(&cflags.to_be_bytes());
        // NBD_OPT_GO: name length, name, no information requests.
        let name = export.as_bytes();
        let mut data = Vec::new();
        data.extend_from_slice(&u32::try_from(name.len()).expect("short name").to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&u32::try_from(data.len()).expect("short").to_be_bytes());
        out.extend_from_slice(&data);
        s.write_all(&out).expect("NBD: send option");
        let (mut size, mut flags) = (None, 0);
        loop {
            assert_eq!(read_u64(&mut s), OPT_REPLY_MAGIC, "NBD option reply magic");
            assert_eq!(
                read_u32(&mut s),
                OPT_GO,
                "NBD option reply to another option"
            );
            let kind = read_u32(&mut s);
            let len = read_u32(&mut s);
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body).expect("NBD: option reply body");
            assert!(
                kind & REP_ERR_BIT == 0,
                "NBD_OPT_GO {export:?} refused: {kind:#x} {}",
                String::from_utf8_lossy(&body)
            );
            match kind {
                REP_ACK => break,
                REP_INFO if body.len() >= 12 && body[..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(body[2..10].try_into().expect("8 bytes")));
                    flags = u16::from_be_bytes(body[10..12].try_into().expect("2 bytes"));
                }
                _ => {}
            }
        }
        NbdClient {
            stream: s,
            size: size.expect("NBD_INFO_EXPORT before NBD_REP_ACK"),
            flags,
            next_cookie: 1,
            reads: HashMap::new(),
            in_flight: 0,
        }
    }

    fn send(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let req = request(cmd, cookie, offset, len, payload);
        self.stream.write_all(&req).expect("NBD: send request");
        self.in_flight += 1;
        cookie
    }

    /// Sends a write of `data` at `offset`; returns its cookie.
    pub fn send_write(&mut self, offset: u64, data: &[u8]) -> u64 {
        let len = u32::try_from(data.len()).expect("write fits u32");
        self.send(CMD_WRITE, offset, len, data)
    }

    /// Sends a read of `len` bytes at `offset`; returns its cookie.
    pub fn send_read(&mut self, offset: u64, len: u32) -> u64 {
        let c = self.send(CMD_READ, offset, len, &[]);
        self.reads.insert(c, len);
        c
    }

    /// Sends a flush; returns its cookie.
    pub fn send_flush(&mut self) -> u64 {
        self.send(CMD_FLUSH, 0, 0, &[])
    }

    /// Requests sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The next reply (panics if none comes within the client timeout).
    pub fn recv(&mut self) -> NbdReply {
        assert_eq!(
            read_u32(&mut self.stream),
            SIMPLE_REPLY_MAGIC,
            "NBD simple reply magic"
        );
        let error = read_u32(&mut self.stream);
        let cookie = read_u64(&mut self.stream);
        self.in_flight -= 1;
        let data = self.reads.remove(&cookie).and_then(|len| {
            if error != 0 {
                return None;
            }
            let mut d = vec![0u8; len as usize];
            self.stream.read_exact(&mut d).expect("NBD: read data");
            Some(d)
        });
        NbdReply {
            cookie,
            error,
            data,
        }
    }

    /// Writes and waits; `Err(errno)` when the server refused.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        let c = self.send_write(offset, data);
        let r = self.recv();
        assert_eq!(r.cookie, c, "reply to another request");
        if r.error == 0 {
            Ok(())
        } else {
            Err(r.error)
        }
    }

    /// Reads and waits; `Err(errno)` when the server refused.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let c = self.send_read(offset, len);
        let r = self.recv();
        assert_eq!(r.cookie, c, "reply to another request");
        r.data.ok_or(r.error)
    }

    /// Flushes and waits; `Err(errno)` when the server refused.
    pub fn flush(&mut self) -> Result<(), u32> {
        let c = self.send_flush();
        let r = self.recv();
        assert_eq!(r.cookie, c, "reply to another request");
        if r.error == 0 {
            Ok(())
        } else {
            Err(r.error)
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // A polite disconnect; the server may be gone already, which is fine.
        let _ = self.stream.write_all(&request(CMD_DISC, 0, 0, 0, &[]));
    }
}
