//! Helpers shared by the end-to-end tests: a real replica server on a loopback port, data
//! patterns, and error-reply extraction.

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use cairn_io::EngineChoice;
use cairn_replica::{ClientError, Server, ServerConfig};

/// Binds a server on a free loopback port and serves it from a background thread (it runs
/// until the test process ends).
pub fn serve(dir: &Path, max_frame: usize) -> SocketAddr {
    let server = Server::bind(ServerConfig {
        dir: dir.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        engine: EngineChoice::Portable,
        max_frame,
        checksums: true,
    })
    .unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());
    addr
}

/// `len` bytes that differ with `seed` and along the buffer.
pub fn pattern(seed: u8, len: usize) -> Bytes {
    (0..len)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed) ^ i.to_le_bytes()[1])
        .collect::<Vec<u8>>()
        .into()
}

/// The error reply `r` must be.
pub fn remote(r: Result<impl std::fmt::Debug, ClientError>) -> cairn_wire::ReplyError {
    match r {
        Err(ClientError::Remote(e)) => e,
        other => panic!("expected an error reply, got {other:?}"),
    }
}
