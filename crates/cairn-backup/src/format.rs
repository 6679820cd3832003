//! The on-target formats: block objects and manifests. docs/backup.md describes both
//! byte by byte; this module is the reference implementation.
//!
//! A block object is a 52-byte header then the payload. The header carries the BLAKE3
//! hash of the *uncompressed* block, which is also the object's name, so a block can be
//! checked with nothing but the object itself.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Block size of every backup written by this version.
pub const BLOCK_SIZE: u64 = 2 * 1024 * 1024;
/// First 8 bytes of every block object.
pub const BLOCK_MAGIC: &[u8; 8] = b"CAIRNBLK";
/// Block object format version.
pub const BLOCK_VERSION: u8 = 1;
/// Size of the block object header.
pub const BLOCK_HEADER_LEN: usize = 52;
/// `format` field of every manifest written by this version.
pub const MANIFEST_FORMAT: &str = "cairn-backup-manifest/1";

const CODEC_NONE: u8 = 0;
const CODEC_LZ4: u8 = 1;
const CODEC_ZSTD: u8 = 2;

/// Compression of block payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is.
    None,
    /// LZ4 block format (lz4_flex), the default: cheap enough to run at upload speed.
    #[default]
    Lz4,
    /// Zstandard frame at the given level (1-22).
    Zstd(i32),
}

impl std::str::FromStr for Compression {
    type Err = String;

    /// `none`, `lz4`, `zstd` (level 3) or `zstd:LEVEL` (1-22).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd(3)),
            _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(l)) if (1..=22).contains(&l) => Ok(Compression::Zstd(l)),
                Some(_) => Err(format!("zstd level in {s:?} must be 1-22")),
                None => Err(format!(
                    "unknown compression {s:?} (none, lz4, zstd or zstd:LEVEL)"
                )),
            },
        }
    }
}

/// Builds a block object for `data` whose BLAKE3 hash is `hash`. A payload that does not
/// shrink under compression is stored uncompressed.
pub fn encode_block(data: &[u8], hash: &blake3::Hash, compression: Compression) -> Bytes {
    let compression = if worth_compressing(data, compression) {
        compression
    } else {
        Compression::None
    };
    let compressed = match compression {
        Compression::None => None,
        Compression::Lz4 => Some((CODEC_LZ4, lz4_flex::block::compress(data))),
        Compression::Zstd(level) => zstd::bulk::compress(data, level)
            .ok()
            .map(|c| (CODEC_ZSTD, c)),
    };
    let (codec, payload): (u8, &[u8]) = match &compressed {
        Some((codec, c)) if c.len() < data.len() => (*codec, c),
        _ => (CODEC_NONE, data),
    };
    let mut out = BytesMut::with_capacity(BLOCK_HEADER_LEN + payload.len());
    out.put_slice(BLOCK_MAGIC);
    out.put_u8(BLOCK_VERSION);
    out.put_u8(codec);
    out.put_u16_le(0);
    out.put_u32_le(len32(data.len()));
    out.put_u32_le(len32(payload.len()));
    out.put_slice(hash.as_bytes());
    out.put_slice(payload);
    out.freeze()
}

/// Bytes of each sample [`worth_compressing`] compresses.
const SAMPLE: usize = 16 << 10;

/// Whether compressing `data` is likely to pay: four 16 KiB samples spread over a block
/// larger than 256 KiB are compressed first, and a block whose samples shrink by less than
/// 3 % is stored raw without compressing the rest (random or already compressed data would
/// cost a full compression pass for nothing). Smaller blocks are always tried.
fn worth_compressing(data: &[u8], compression: Compression) -> bool {
    if matches!(compression, Compression::None) || data.len() <= 16 * SAMPLE {
        return !matches!(compression, Compression::None);
    }
    let step = data.len() / 4;
    let mut raw = 0usize;
    let mut packed = 0usize;
    for k in 0..4 {
        let sample = &data[k * step..k * step + SAMPLE];
        raw += sample.len();
        packed += match compression {
            Compression::Lz4 => lz4_flex::block::compress(sample).len(),
            Compression::Zstd(level) => {
                zstd::bulk::compress(sample, level).map_or(sample.len(), |c| c.len())
            }
            Compression::None => sample.len(),
        };
    }
    packed * 100 < raw * 97
}

fn len32(n: usize) -> u32 {
    // Blocks are at most BLOCK_SIZE (2 MiB); compressed payloads are smaller than that.
    u32::try_from(n).expect("block larger than 4 GiB")
}

/// Decodes and verifies a block object: header fields, payload length, decompression and
/// the BLAKE3 hash of the result against both the header and `expected`. The error string
/// says which check failed.
pub fn decode_block(obj: &[u8], expected: &blake3::Hash) -> Result<Bytes, String> {
    if obj.len() < BLOCK_HEADER_LEN {
        return Err(format!(
            "object is {} bytes, shorter than the header",
            obj.len()
        ));
    }
    if &obj[..8] != BLOCK_MAGIC {
        return Err("bad magic".into());
    }
    if obj[8] != BLOCK_VERSION {
        return Err(format!("unknown block version {}", obj[8]));
    }
    let codec = obj[9];
    let raw_len = u32::from_le_bytes([obj[12], obj[13], obj[14], obj[15]]) as usize;
    let stored_len = u32::from_le_bytes([obj[16], obj[17], obj[18], obj[19]]) as usize;
    let header_hash = &obj[20..52];
    if header_hash != expected.as_bytes() {
        return Err("header hash differs from the object name".into());
    }
    let payload = &obj[BLOCK_HEADER_LEN..];
    if payload.len() != stored_len {
        return Err(format!(
            "payload is {} bytes, header says {stored_len}",
            payload.len()
        ));
    }
    if raw_len as u64 > BLOCK_SIZE {
        return Err(format!(
            "uncompressed length {raw_len} exceeds the block size"
        ));
    }
    let data: Vec<u8> = match codec {
        CODEC_NONE => payload.to_vec(),
        CODEC_LZ4 => lz4_flex::block::decompress(payload, raw_len)
            .map_err(|e| format!("lz4 decompression failed: {e}"))?,
        CODEC_ZSTD => zstd::bulk::decompress(payload, raw_len)
            .map_err(|e| format!("zstd decompression failed: {e}"))?,
        c => return Err(format!("unknown codec {c}")),
    };
    if data.len() != raw_len {
        return Err(format!(
            "decompressed to {} bytes, header says {raw_len}",
            data.len()
        ));
    }
    if blake3::hash(&data) != *expected {
        return Err("BLAKE3 hash mismatch after decompression".into());
    }
    Ok(Bytes::from(data))
}

/// One data block of a backup. Blocks not listed are holes (zeroes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    /// Block index; the block covers bytes `index * block_size ..` of the volume.
    pub index: u64,
    /// BLAKE3 of the uncompressed block, 64 lowercase hex digits (= object name).
    pub hash: String,
}

impl BlockRef {
    /// The parsed hash.
    pub fn hash(&self) -> Result<blake3::Hash, String> {
        blake3::Hash::from_hex(&self.hash).map_err(|e| format!("block {}: {e}", self.index))
    }
}

/// A complete backup. Written last; its presence means every block it lists was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Backup name (unique in the target; also the object name).
    pub name: String,
    /// Random id of this backup, 32 hex digits.
    pub id: String,
    /// Volume the snapshot belongs to.
    pub volume: String,
    /// Snapshot name.
    pub snapshot: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Block size in bytes (2 MiB).
    pub block_size: u64,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Name of the backup this one was made incrementally from, if any.
    pub parent: Option<String>,
    /// Compression requested for new blocks (each block object says its own codec).
    pub compression: Compression,
    /// Data blocks sorted by index; missing indexes are holes.
    pub blocks: Vec<BlockRef>,
}

impl Manifest {
    /// Number of blocks covering `size`.
    pub fn block_count(&self) -> u64 {
        self.size.div_ceil(self.block_size)
    }

    /// Checks the invariants a reader relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!("unknown format {:?}", self.format));
        }
        if self.block_size == 0 || self.block_size > BLOCK_SIZE {
            return Err(format!("bad block size {}", self.block_size));
        }
        let n = self.block_count();
        let mut prev = None;
        for b in &self.blocks {
            if b.index >= n {
                return Err(format!("block index {} past the end ({n} blocks)", b.index));
            }
            if prev.is_some_and(|p| b.index <= p) {
                return Err(format!("block index {} out of order", b.index));
            }
            prev = Some(b.index);
            b.hash()?;
        }
        Ok(())
    }
}

pub(crate) fn now() -> (String, u64) {
    let t = SystemTime::now();
    let unix = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    (humantime::format_rfc3339_seconds(t).to_string(), unix)
}

/// A fresh random-enough id (time, pid, a counter and a stack address through BLAKE3).
pub(crate) fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let local = 0u8;
    let mut h = blake3::Hasher::new();
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(&(std::ptr::addr_of!(local) as usize).to_le_bytes());
    h.finalize().to_hex()[..32].to_string()
}

/// Checks a backup name: 1-128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if name.starts_with('.') {
        return Err("must not start with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_roundtrip_all_codecs_and_corruption() {
        let mut data = vec![0u8; 100_000];
        for (i, b) in data.iter_mut().enumerate() {
            *b = u8::try_from(i % 251).unwrap();
        }
        let h = blake3::hash(&data);
        for c in [Compression::None, Compression::Lz4, Compression::Zstd(3)] {
            let obj = encode_block(&data, &h, c);
            assert_eq!(&decode_block(&obj, &h).unwrap()[..], &data[..]);
            if c != Compression::None {
                assert!(obj.len() < data.len() / 2, "{c:?} did not compress");
            }
            let mut bad = obj.to_vec();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(decode_block(&bad, &h).is_err());
            assert!(decode_block(&obj[..obj.len() - 1], &h).is_err());
        }
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let data: Vec<u8> = (0..4096u32)
            .flat_map(|i| blake3::hash(&i.to_le_bytes()).as_bytes().to_vec())
            .collect();
        let h = blake3::hash(&data);
        let obj = encode_block(&data, &h, Compression::Lz4);
        assert_eq!(obj[9], CODEC_NONE);
        assert_eq!(obj.len(), BLOCK_HEADER_LEN + data.len());
    }

    #[test]
    fn sampling_skips_random_blocks_and_keeps_compressible_ones() {
        let random: Vec<u8> = (0..(2u32 << 20) / 32)
            .flat_map(|i| blake3::hash(&i.to_le_bytes()).as_bytes().to_vec())
            .collect();
        assert!(!worth_compressing(&random, Compression::Lz4));
        assert!(!worth_compressing(&random, Compression::Zstd(3)));
        let h = blake3::hash(&random);
        let obj = encode_block(&random, &h, Compression::Lz4);
        assert_eq!(obj[9], CODEC_NONE);
        assert_eq!(&decode_block(&obj, &h).unwrap()[..], &random[..]);

        // Half random, half zeros: the samples in the zero half make it worth it, and the
        // whole block is compressed.
        let mut half = random.clone();
        half[1 << 20..].fill(0);
        assert!(worth_compressing(&half, Compression::Lz4));
        let h = blake3::hash(&half);
        let obj = encode_block(&half, &h, Compression::Lz4);
        assert_eq!(obj[9], CODEC_LZ4);
        assert!(obj.len() < half.len() * 6 / 10);
        assert_eq!(&decode_block(&obj, &h).unwrap()[..], &half[..]);
        assert!(!worth_compressing(&half, Compression::None));
    }

    #[test]
    fn names() {
        assert!(validate_name("db-2026.11.23_1").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
