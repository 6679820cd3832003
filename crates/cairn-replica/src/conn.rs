//! The I/O loop of one connection: receive bytes, cut frames, apply them, send the replies.
//!
//! Each turn submits the replies of the previous turn and a receive for the next bytes in one
//! I/O batch (on io_uring, one system call). A frame the decoder refuses ends the connection
//! after the replies to the frames before it have been sent.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use bytes::BytesMut;
use cairn_io::{Io, Op};
use cairn_wire::FrameDecoder;

use crate::session::Session;
use crate::{Registry, ServerConfig};

/// Bytes received per turn at most.
const RECV_CHUNK: usize = 1 << 20;

pub(crate) fn serve_connection(stream: TcpStream, registry: Arc<Registry>, config: &ServerConfig) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    let mut io = match Io::new(config.engine) {
        Ok(io) => io,
        Err(e) => {
            tracing::error!(%peer, error = %e, "no I/O backend for connection");
            return;
        }
    };
    tracing::debug!(%peer, io = %io.backend(), "connection accepted");
    let reason = run(&stream, &mut io, registry, config.max_frame);
    tracing::info!(%peer, %reason, "connection closed");
}

fn run(stream: &TcpStream, io: &mut Io, registry: Arc<Registry>, max_frame: usize) -> String {
    let fd = stream.as_raw_fd();
    let mut decoder = FrameDecoder::new(max_frame);
    let mut session = Session::new(registry, max_frame);
    let mut inbuf = BytesMut::with_capacity(RECV_CHUNK);
    let mut scratch = vec![0u8; RECV_CHUNK];
    let mut out = BytesMut::with_capacity(RECV_CHUNK);
    loop {
        let received = if out.is_empty() {
            io.run(&mut [Op::Recv {
                fd,
                buf: &mut scratch,
            }])
            .pop()
        } else {
            let mut r = io.run(&mut [
                Op::Send { fd, buf: &out },
                Op::Recv {
                    fd,
                    buf: &mut scratch,
                },
            ]);
            if let Err(e) = &r[0] {
                return format!("send failed: {e}");
            }
            out.clear();
            r.pop()
        };
        let n = match received {
            Some(Ok(0)) => return "peer closed".to_owned(),
            Some(Ok(n)) => n,
            Some(Err(e)) => return format!("receive failed: {e}"),
            None => return "no receive completion".to_owned(),
        };
        inbuf.extend_from_slice(&scratch[..n]);
        let mut frames = Vec::new();
        let mut refused = None;
        loop {
            match decoder.decode(&mut inbuf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        session.process(&frames, &mut out);
        if let Some(e) = refused {
            if !out.is_empty() {
                let _ = io.run_all(&mut [Op::Send { fd, buf: &out }]);
            }
            tracing::warn!(error = %e, "refusing invalid frame");
            return format!("invalid frame: {e}");
        }
    }
}
