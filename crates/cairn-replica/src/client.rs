//! A blocking client for one replica: the tools', tests' and load generator's way in.
//!
//! `send` and `recv` can be interleaved to keep many requests in flight on one connection
//! (replies come back in request order); `call` is one request and its reply.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cairn_wire::{
    block_crcs, FrameDecoder, LayerRef, Reply, ReplyBody, ReplyError, Request, StatusBody,
    WireError, DEFAULT_MAX_FRAME, DIGEST_LEN,
};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame from replica: {0}")]
    Wire(#[from] WireError),
    #[error("replica refused: {0}")]
    Remote(ReplyError),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

/// One connection to a replica server.
pub struct Client {
    stream: TcpStream,
    decoder: FrameDecoder,
    inbuf: BytesMut,
    outbuf: BytesMut,
    next_id: u64,
    epoch: u64,
}

impl Client {
    /// Connects; requests carry `epoch`.
    pub fn connect(addr: impl ToSocketAddrs, epoch: u64) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME),
            inbuf: BytesMut::with_capacity(1 << 20),
            outbuf: BytesMut::with_capacity(1 << 20),
            next_id: 1,
            epoch,
        })
    }

    /// Bounds how long `recv` waits.
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<(), ClientError> {
        self.stream.set_read_timeout(t)?;
        self.stream.set_write_timeout(t)?;
        Ok(())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sends one request (and anything queued before it); returns its id.
    pub fn send(&mut self, req: &Request) -> Result<u64, ClientError> {
        let id = self.queue(req)?;
        self.send_queued()?;
        Ok(id)
    }

    /// Encodes a request into the send buffer without sending it; `send_queued` (or the next
    /// `send`) sends everything queued in one write. Returns its id.
    pub fn queue(&mut self, req: &Request) -> Result<u64, ClientError> {
        let id = self.next_id;
        req.try_encode(id, self.epoch, &mut self.outbuf)?;
        self.next_id += 1;
        Ok(id)
    }

    /// Sends every queued request in one write.
    pub fn send_queued(&mut self) -> Result<(), ClientError> {
        if !self.outbuf.is_empty() {
            let r = self.stream.write_all(&self.outbuf);
            self.outbuf.clear();
            r?;
        }
        Ok(())
    }

    /// The next reply if it has already arrived in full, without waiting.
    pub fn recv_buffered(&mut self) -> Result<Option<Reply>, ClientError> {
        match self.decoder.decode(&mut self.inbuf)? {
            Some(frame) => Ok(Some(Reply::decode(&frame)?)),
            None => Ok(None),
        }
    }

    /// Sends raw bytes (tests use it to send malformed frames).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Receives the next reply.
    pub fn recv(&mut self) -> Result<Reply, ClientError> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.inbuf)? {
                return Ok(Reply::decode(&frame)?);
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            self.inbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// One request and its reply; an error reply becomes `ClientError::Remote`.
    pub fn call(&mut self, req: &Request) -> Result<ReplyBody, ClientError> {
        let id = self.send(req)?;
        let reply = self.recv()?;
        if reply.request_id != id {
            return Err(ClientError::Unexpected(format!(
                "reply to {} while waiting for {id}",
                reply.request_id
            )));
        }
        reply.result.map_err(ClientError::Remote)
    }

    /// Attaches to (or creates, when `create_size > 0`) a replica, alongside any other
    /// connection attached to it.
    pub fn hello(
        &mut self,
        volume: &str,
        replica_id: &str,
        create_size: u64,
    ) -> Result<StatusBody, ClientError> {
        self.attach(volume, replica_id, create_size, false)
    }

    /// Like [`hello`](Self::hello), but takes the replica over: once the replica answers,
    /// every other connection attached to it is refused (StaleEpoch), even at this epoch.
    pub fn hello_takeover(
        &mut self,
        volume: &str,
        replica_id: &str,
        create_size: u64,
    ) -> Result<StatusBody, ClientError> {
        self.attach(volume, replica_id, create_size, true)
    }

    fn attach(
        &mut self,
        volume: &str,
        replica_id: &str,
        create_size: u64,
        takeover: bool,
    ) -> Result<StatusBody, ClientError> {
        match self.call(&Request::Hello {
            volume: volume.to_owned(),
            replica_id: replica_id.to_owned(),
            create_size,
            takeover,
        })? {
            ReplyBody::Status(s) => Ok(s),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Writes `data` (whole blocks) at `offset`, computing the block CRCs.
    pub fn write(&mut self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        let crcs = block_crcs(&data);
        self.call(&Request::Write {
            offset,
            fua,
            crcs,
            data,
        })
        .map(|_| ())
    }

    /// Reads `len` bytes at `offset`, checking the CRCs the replica sent.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        match self.call(&Request::Read { offset, len })? {
            ReplyBody::Data { crcs, data } => {
                if let Some(b) = cairn_wire::first_bad_block(&data, &crcs) {
                    return Err(ClientError::Unexpected(format!(
                        "block {b} of the read reply fails its CRC"
                    )));
                }
                Ok(data)
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.call(&Request::Flush).map(|_| ())
    }

    pub fn status(&mut self) -> Result<StatusBody, ClientError> {
        match self.call(&Request::Status)? {
            ReplyBody::Status(s) => Ok(s),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The replica's content digest and size.
    pub fn digest(&mut self) -> Result<([u8; 32], u64), ClientError> {
        match self.call(&Request::Digest)? {
            ReplyBody::Digest { digest, size } => Ok((digest, size)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Drops `offset..offset+len` from the replica's head layer only.
    pub fn unmap(&mut self, offset: u64, len: u64) -> Result<(), ClientError> {
        match self.call(&Request::Unmap { offset, len })? {
            ReplyBody::Empty => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// One digest per `granule` bytes of `offset..offset+len` of `layer`.
    pub fn range_digests(
        &mut self,
        layer: LayerRef,
        offset: u64,
        len: u64,
        granule: u32,
    ) -> Result<Vec<[u8; DIGEST_LEN]>, ClientError> {
        match self.call(&Request::RangeDigests {
            layer,
            offset,
            len,
            granule,
        })? {
            ReplyBody::RangeDigests(d) => Ok(d),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Discards the whole replica; returns the status of the new, empty one.
    pub fn recreate(&mut self) -> Result<StatusBody, ClientError> {
        match self.call(&Request::Recreate)? {
            ReplyBody::Status(s) => Ok(s),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}
