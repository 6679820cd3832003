//! Fuzz target `session`: arbitrary client bytes through a whole connection
//! (`NbdServer::handle_connection` over an in-memory pipe, on a `MemDevice`). With the first
//! byte's top bit set, a valid handshake (structured replies, base:allocation, GO) is sent
//! first so the bytes exercise the transmission phase.
//!
//! Properties checked: no panic, and the connection ends once the input ends (no hang).

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cairn_blockdev::MemDevice;
use cairn_nbd::NbdServer;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn server() -> &'static Arc<NbdServer<MemDevice>> {
    static SERVER: OnceLock<Arc<NbdServer<MemDevice>>> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut s = NbdServer::new();
        s.add_export("disk", "fuzz", Arc::new(MemDevice::new(256 << 10)));
        Arc::new(s)
    })
}

fn handshake() -> Vec<u8> {
    fn opt(b: &mut Vec<u8>, o: u32, d: &[u8]) {
        b.extend_from_slice(b"IHAVEOPT");
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&u32::try_from(d.len()).unwrap().to_be_bytes());
        b.extend_from_slice(d);
    }
    let mut b = 3u32.to_be_bytes().to_vec();
    opt(&mut b, 8, &[]);
    let mut meta = vec![0, 0, 0, 4];
    meta.extend_from_slice(b"disk");
    meta.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 15]);
    meta.extend_from_slice(b"base:allocation");
    opt(&mut b, 10, &meta);
    opt(&mut b, 7, &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0]);
    b
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = if mode & 0x80 != 0 { handshake() } else { Vec::new() };
    input.extend_from_slice(rest);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (client, srv) = tokio::io::duplex(1 << 20);
        let server = Arc::clone(server());
        let task = tokio::spawn(async move { server.handle_connection(srv).await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
        });
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
        let ended = tokio::time::timeout(Duration::from_secs(10), task).await;
        ended
            .expect("connection did not end after its input did")
            .expect("connection task panicked")
            .ok();
        drop(wr);
        let _ = drain.await;
    });
});
