//! A device that grows while exported (a volume expanded online): each new connection's
//! handshake reports the device's size at that moment; a connection opened before keeps its
//! handshake's size and is refused (ENOSPC) past it, since NBD cannot announce a new size.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use cairn_blockdev::{check_range, BlockDevice, DevError, MemDevice};
use cairn_nbd::client::NbdClient;
use cairn_nbd::NbdServer;

/// A [`MemDevice`] of `max` bytes of which only the first `size` are exposed.
struct Growing {
    mem: MemDevice,
    size: AtomicU64,
}

impl Growing {
    fn check(&self, offset: u64, len: u64) -> Result<(), DevError> {
        check_range(offset, len, self.size.load(Ordering::Acquire), 4096)
    }
}

impl BlockDevice for Growing {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DevError> {
        self.check(offset, u64::from(len))?;
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DevError> {
        self.check(offset, data.len() as u64)?;
        self.mem.write(offset, data, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), DevError> {
        self.check(offset, len)?;
        self.mem.write_zeroes(offset, len, fua, no_hole).await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.check(offset, len)?;
        self.mem.trim(offset, len, fua).await
    }
    async fn flush(&self) -> Result<(), DevError> {
        self.mem.flush().await
    }
    async fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, DevError> {
        self.check(offset, len)?;
        self.mem.allocated(offset, len).await
    }
}

#[tokio::test]
async fn new_connections_see_a_grown_device_open_ones_keep_their_size() {
    const OLD: u64 = 1 << 20;
    const NEW: u64 = 4 << 20;
    let dev = Arc::new(Growing {
        mem: MemDevice::new(NEW),
        size: AtomicU64::new(OLD),
    });
    let mut server = NbdServer::new();
    server.add_export("vol", "growing", dev.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let serving = tokio::spawn(Arc::new(server).serve(listener));

    let before = NbdClient::connect(addr, "vol").await.unwrap();
    assert_eq!(before.size(), OLD);
    let data = Bytes::from(vec![7u8; 4096]);
    before.write(OLD - 4096, data.clone()).await.unwrap();

    dev.size.store(NEW, Ordering::Release);
    let after = NbdClient::connect(addr, "vol").await.unwrap();
    assert_eq!(after.size(), NEW, "a new handshake samples the device");
    after.write(NEW - 4096, data.clone()).await.unwrap();
    assert_eq!(after.read(NEW - 4096, 4096).await.unwrap(), data);
    assert_eq!(after.read(OLD - 4096, 4096).await.unwrap(), data);
    assert_eq!(
        after.read(OLD, 4096).await.unwrap(),
        Bytes::from(vec![0u8; 4096])
    );

    // The connection opened before keeps its size: past it is refused, inside still works.
    assert_eq!(before.size(), OLD);
    let past = before.write(OLD, data.clone()).await;
    assert!(past.is_err(), "write past the handshake size: {past:?}");
    assert_eq!(before.read(OLD - 4096, 4096).await.unwrap(), data);
    before.disconnect().await.unwrap();
    after.disconnect().await.unwrap();
    serving.abort();
}
