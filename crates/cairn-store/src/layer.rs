//! One layer of a replica: a sparse data file of the volume's size, a checksum file with
//! 4 bytes (CRC32, little-endian) per 4 KiB block, and the in-memory set of blocks it holds.
//!
//! Guarantees: `blocks` is rebuilt at open from the data file's allocation (SEEK_DATA /
//! SEEK_HOLE), so it never claims a block the file does not hold after a clean close; blocks
//! the file holds but a crash left without a valid checksum are dealt with by the dirty-region
//! log, not here. Assumes the file system allocates in units of at most 4 KiB.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use roaring::RoaringBitmap;
use rustix::fs::{FallocateFlags, SeekFrom};

use crate::error::Result;
use crate::{block_index, BLOCK_SIZE};

pub(crate) const LAYER_DIR: &str = "layers";

pub(crate) struct Layer {
    pub id: u64,
    pub data: File,
    pub crc: File,
    /// Block indices this layer holds.
    pub blocks: RoaringBitmap,
}

fn paths(dir: &Path, id: u64) -> (PathBuf, PathBuf) {
    let base = dir.join(LAYER_DIR);
    (
        base.join(format!("{id:08}.data")),
        base.join(format!("{id:08}.crc")),
    )
}

fn open_rw(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
}

impl Layer {
    /// Creates an empty layer of `size` bytes (sparse: no space used).
    pub(crate) fn create(dir: &Path, id: u64, size: u64) -> Result<Layer> {
        fs::create_dir_all(dir.join(LAYER_DIR))?;
        let (d, c) = paths(dir, id);
        let data = open_rw(&d, true)?;
        let crc = open_rw(&c, true)?;
        data.set_len(size)?;
        crc.set_len(size / u64::from(BLOCK_SIZE) * 4)?;
        data.sync_all()?;
        crc.sync_all()?;
        Ok(Layer {
            id,
            data,
            crc,
            blocks: RoaringBitmap::new(),
        })
    }

    /// Opens an existing layer and rebuilds its block set from the data file's allocation.
    pub(crate) fn open(dir: &Path, id: u64) -> Result<Layer> {
        let (d, c) = paths(dir, id);
        let data = open_rw(&d, false)?;
        let crc = open_rw(&c, false)?;
        let blocks = allocated_blocks(&data)?;
        Ok(Layer {
            id,
            data,
            crc,
            blocks,
        })
    }

    pub(crate) fn remove_files(dir: &Path, id: u64) -> Result<()> {
        let (d, c) = paths(dir, id);
        for p in [d, c] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    pub(crate) fn data_fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }

    pub(crate) fn crc_fd(&self) -> RawFd {
        self.crc.as_raw_fd()
    }

    /// Grows both files to hold a volume of `size` bytes.
    pub(crate) fn grow(&self, size: u64) -> Result<()> {
        self.data.set_len(size)?;
        self.crc.set_len(size / u64::from(BLOCK_SIZE) * 4)?;
        Ok(())
    }

    /// Deallocates blocks `first..first+count` in both files: they read back as zeros with a
    /// zero checksum, and the layer no longer holds them.
    pub(crate) fn punch(&mut self, first: u64, count: u64) -> Result<()> {
        let bs = u64::from(BLOCK_SIZE);
        punch_hole(&self.data, first * bs, count * bs)?;
        punch_hole(&self.crc, first * 4, count * 4)?;
        if let (Ok(a), Ok(b)) = (u32::try_from(first), u32::try_from(first + count)) {
            self.blocks.remove_range(a..b);
        }
        Ok(())
    }

    /// Bytes of data this layer holds.
    pub(crate) fn allocated_bytes(&self) -> u64 {
        self.blocks.len() * u64::from(BLOCK_SIZE)
    }
}

fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    rustix::fs::fallocate(
        f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(io::Error::from)
}

/// The 4 KiB blocks that hold data in `f`, from SEEK_DATA / SEEK_HOLE. A file-system block
/// of data anywhere inside a 4 KiB block counts the whole block.
fn allocated_blocks(f: &File) -> Result<RoaringBitmap> {
    let len = f.metadata()?.len();
    let mut set = RoaringBitmap::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match rustix::fs::seek(f, SeekFrom::Data(to_i64(pos))) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(io::Error::from(e).into()),
        };
        let end = match rustix::fs::seek(f, SeekFrom::Hole(to_i64(start))) {
            Ok(e) => e.min(len),
            Err(e) => return Err(io::Error::from(e).into()),
        };
        let first = block_index(start);
        let last = block_index(end.div_ceil(u64::from(BLOCK_SIZE)) * u64::from(BLOCK_SIZE));
        if let (Ok(a), Ok(b)) = (u32::try_from(first), u32::try_from(last)) {
            set.insert_range(a..b);
        }
        if end <= start {
            break;
        }
        pos = end;
    }
    Ok(set)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
