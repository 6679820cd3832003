//! What a backup reads from and a restore writes to, so this crate needs no engine.
//!
//! A [`SnapshotSource`] is a frozen image: its size and content do not change while a
//! backup reads it. `allocated` may over-report (a range listed as allocated that reads as
//! zeroes is still skipped as a hole) but must never under-report: bytes outside the
//! listed ranges are taken to be zero. A [`RestoreSink`] starts out reading as zeroes
//! (a new volume or a new sparse file); restore writes only the blocks that hold data.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A read-only snapshot image.
pub trait SnapshotSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Byte ranges that may hold data, sorted, not overlapping.
    fn allocated(&self) -> impl Future<Output = io::Result<Vec<Range<u64>>>> + Send;
    /// Reads `len` bytes at `offset` (the range is inside `size`).
    fn read(&self, offset: u64, len: usize) -> impl Future<Output = io::Result<Bytes>> + Send;
}

/// Where a restore writes. It reads as zeroes before the restore.
pub trait RestoreSink: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Writes `data` at `offset` (the range is inside `size`).
    fn write(&self, offset: u64, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes the writes durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }
}

/// An in-memory image (tests, small tools). Clones share the same bytes.
#[derive(Debug, Clone, Default)]
pub struct MemImage {
    data: Arc<Mutex<Vec<u8>>>,
    allocated: Option<Vec<Range<u64>>>,
}

impl MemImage {
    /// A zero-filled image of `size` bytes.
    pub fn zeroed(size: usize) -> Self {
        Self::from_vec(vec![0; size])
    }

    /// An image holding `data`; all of it reported as allocated.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemImage {
            data: Arc::new(Mutex::new(data)),
            allocated: None,
        }
    }

    /// Reports only these ranges as allocated (bytes elsewhere must be zero).
    pub fn with_allocated(mut self, ranges: Vec<Range<u64>>) -> Self {
        self.allocated = Some(ranges);
        self
    }

    /// A copy of the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        if end > self.lock().len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "range past the end of the image",
            ));
        }
        Ok(start..end)
    }
}

impl SnapshotSource for MemImage {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    async fn allocated(&self) -> io::Result<Vec<Range<u64>>> {
        Ok(self
            .allocated
            .clone()
            .unwrap_or_else(|| std::iter::once(0..SnapshotSource::size(self)).collect()))
    }
    async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let r = self.range(offset, len)?;
        Ok(Bytes::copy_from_slice(&self.lock()[r]))
    }
}

impl RestoreSink for MemImage {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let r = self.range(offset, data.len())?;
        self.lock()[r].copy_from_slice(&data);
        Ok(())
    }
}

/// A local image file (raw, possibly sparse). As a source it reports allocation with
/// SEEK_DATA/SEEK_HOLE; as a sink it is created sparse at the needed size.
#[derive(Debug, Clone)]
pub struct FileImage {
    file: Arc<std::fs::File>,
    size: u64,
}

impl FileImage {
    /// Opens an existing image read-only.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileImage {
            file: Arc::new(file),
            size,
        })
    }

    /// Creates (or truncates) an image of `size` bytes that reads as zeroes.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        Ok(FileImage {
            file: Arc::new(file),
            size,
        })
    }

    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        use rustix::fs::{seek, SeekFrom};
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let at = i64::try_from(pos).map_err(|_| io::ErrorKind::InvalidInput)?;
            let start = match seek(&*self.file, SeekFrom::Data(at)) {
                Ok(s) => s,
                Err(rustix::io::Errno::NXIO) => break,
                // File systems without SEEK_DATA: report everything.
                Err(rustix::io::Errno::INVAL) if out.is_empty() => {
                    return Ok(std::iter::once(0..self.size).collect())
                }
                Err(e) => return Err(e.into()),
            };
            let from = i64::try_from(start).map_err(|_| io::ErrorKind::InvalidInput)?;
            let end = seek(&*self.file, SeekFrom::Hole(from))?.min(self.size);
            if start >= end {
                break;
            }
            out.push(start..end);
            pos = end;
        }
        Ok(out)
    }
}

impl SnapshotSource for FileImage {
    fn size(&self) -> u64 {
        self.size
    }
    async fn allocated(&self) -> io::Result<Vec<Range<u64>>> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.data_ranges())
            .await
            .map_err(io::Error::other)?
    }
    async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl RestoreSink for FileImage {
    fn size(&self) -> u64 {
        self.size
    }
    async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
            .await
            .map_err(io::Error::other)?
    }
    async fn flush(&self) -> io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(io::Error::other)?
    }
}
