//! Backup benchmark driver (bench/backup.sh runs it): one measured operation per run, one
//! JSON line of figures on stdout.
//!
//! ```text
//! backup_bench --mode backup|restore|plain-upload|plain-download|incremental|cpu \
//!     --target s3://bucket/prefix --endpoint http://127.0.0.1:PORT \
//!     --access-key AK --secret-key SK --file IMAGE [--concurrency 8] \
//!     [--compression lz4|none|zstd[:LEVEL]] [--name NAME] [--parent NAME] \
//!     [--changed START-END,START-END,...] [--out RESTORED_IMAGE]
//! ```
//!
//! - `backup`: full backup of the sparse file `--file` (a `FileImage`) as `--name`.
//! - `incremental`: backup `--name` from `--parent` with the `--changed` byte ranges.
//! - `restore`: restore `--name` into a new sparse file `--out` (flushed before the clock
//!   stops).
//! - `plain-upload`: the peer. The same bytes read the same way (the file's allocated
//!   ranges, 2 MiB blocks, `FileImage::read`), all-zero blocks skipped like the backup does,
//!   each block PUT as is to `<prefix>/plain/<index>` through the same object_store client
//!   with the same concurrency: no hashing, no compression, no HEAD, no manifest.
//! - `plain-download`: the peer of `restore`: GET every `plain-upload` object of the prefix
//!   and write it at its offset into a new sparse file `--out` (size of `--file`), fsync.
//! - `cpu`: no I/O to the target; single-thread cost of BLAKE3 and of building block
//!   objects (none/lz4/zstd) over the first 128 MiB of data blocks of `--file`, in memory.
//!
//! `cpu_s` in the output is this process's user+system CPU time over the operation.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use cairn_backup::{
    backup, encode_block, restore, BackupOptions, BackupSpec, Compression, FileImage, Incremental,
    RestoreOptions, RestoreSink, S3Config, SnapshotSource, Target, BLOCK_SIZE,
};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use serde_json::json;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn usage() -> ! {
    eprintln!(
        "usage: backup_bench --mode backup|restore|plain-upload|plain-download|incremental|cpu --file IMAGE \
         [--target URL --endpoint URL --access-key AK --secret-key SK] [--concurrency N] \
         [--compression lz4|none|zstd[:LEVEL]] [--name NAME] [--parent NAME] \
         [--changed START-END,...] [--out PATH]"
    );
    std::process::exit(2)
}

/// This process's user + system CPU seconds (from /proc/self/stat, in clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is index 0, utime 11, stime 12.
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn parse_compression(s: &str) -> Res<Compression> {
    Ok(match s {
        "none" => Compression::None,
        "lz4" => Compression::Lz4,
        "zstd" => Compression::Zstd(3),
        _ => match s.strip_prefix("zstd:") {
            Some(l) => Compression::Zstd(l.parse()?),
            None => return Err(format!("unknown compression {s:?}").into()),
        },
    })
}

fn parse_ranges(s: &str) -> Res<Vec<std::ops::Range<u64>>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (a, b) = p.split_once('-').ok_or("a range is START-END")?;
            Ok(a.parse()?..b.parse()?)
        })
        .collect()
}

/// Index and offset of every 2 MiB block of `src` that overlaps its allocated ranges.
async fn data_blocks(src: &FileImage) -> Res<Vec<u64>> {
    let alloc = src.allocated().await?;
    let n = SnapshotSource::size(src).div_ceil(BLOCK_SIZE);
    Ok((0..n)
        .filter(|i| {
            let (s, e) = (
                i * BLOCK_SIZE,
                ((i + 1) * BLOCK_SIZE).min(SnapshotSource::size(src)),
            );
            alloc.iter().any(|r| r.start < e && s < r.end)
        })
        .collect())
}

async fn plain_upload(t: &Target, src: &FileImage, prefix: &str, conc: usize) -> Res<(u64, u64)> {
    let blocks = data_blocks(src).await?;
    let size = SnapshotSource::size(src);
    let store = t.store().clone();
    let sent: Vec<(u64, u64)> = futures::stream::iter(blocks)
        .map(|i| {
            let store = store.clone();
            let key = Path::from(format!("{prefix}/plain/{i:08}"));
            async move {
                let off = i * BLOCK_SIZE;
                let len = usize::try_from(BLOCK_SIZE.min(size - off))?;
                let data = src.read(off, len).await?;
                // The backup skips all-zero blocks too; checking costs about what its
                // zero check does, so keep it on both sides.
                let data = tokio::task::spawn_blocking(move || {
                    (!data.iter().all(|&b| b == 0)).then_some(data)
                })
                .await?;
                let Some(data) = data else {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>((len as u64, 0));
                };
                let n = data.len() as u64;
                store.put(&key, PutPayload::from(data)).await?;
                Ok((len as u64, n))
            }
        })
        .buffer_unordered(conc.max(1))
        .try_collect()
        .await?;
    Ok(sent.iter().fold((0, 0), |(r, s), (a, b)| (r + a, s + b)))
}

/// The peer of a restore: GET every object `plain-upload` stored and write it at its
/// offset, `conc` at a time, then fsync. No decoding or hash check.
async fn plain_download(t: &Target, sink: &FileImage, prefix: &str, conc: usize) -> Res<u64> {
    let store = t.store().clone();
    let keys: Vec<Path> = store
        .list(Some(&Path::from(format!("{prefix}/plain"))))
        .map_ok(|m| m.location)
        .try_collect()
        .await?;
    let got: Vec<u64> = futures::stream::iter(keys)
        .map(|key| {
            let store = store.clone();
            async move {
                let i: u64 = key.filename().ok_or("no file name")?.parse()?;
                let data = store.get(&key).await?.bytes().await?;
                let n = data.len() as u64;
                sink.write(i * BLOCK_SIZE, data).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(n)
            }
        })
        .buffer_unordered(conc.max(1))
        .try_collect()
        .await?;
    sink.flush().await?;
    Ok(got.iter().sum())
}

fn s3_prefix(url: &str) -> Res<String> {
    Ok(match cairn_backup::parse_target(url)? {
        cairn_backup::TargetUrl::S3 { prefix, .. } => prefix.trim_matches('/').to_string(),
        cairn_backup::TargetUrl::File { .. } => String::new(),
    })
}

fn cpu_costs(path: &std::path::Path, src: &FileImage) -> Res<serde_json::Value> {
    use std::os::unix::fs::FileExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let blocks = rt.block_on(data_blocks(src))?;
    let f = std::fs::File::open(path)?;
    let mut data: Vec<Bytes> = Vec::new();
    for &i in blocks.iter().take(64) {
        let mut buf = vec![0u8; usize::try_from(BLOCK_SIZE)?];
        f.read_exact_at(&mut buf, i * BLOCK_SIZE)?;
        data.push(Bytes::from(buf));
    }
    let nbytes = data.len() as u64 * BLOCK_SIZE;
    let bytes = nbytes as f64;
    let time = |f: &dyn Fn(&Bytes)| {
        let t = Instant::now();
        for d in &data {
            f(d);
        }
        bytes / t.elapsed().as_secs_f64() / 1e6
    };
    let hashes: Vec<blake3::Hash> = data.iter().map(|d| blake3::hash(d)).collect();
    let hmap: HashMap<*const u8, blake3::Hash> = data
        .iter()
        .zip(&hashes)
        .map(|(d, h)| (d.as_ptr(), *h))
        .collect();
    let enc = |c: Compression| {
        time(&|d: &Bytes| {
            std::hint::black_box(encode_block(d, &hmap[&d.as_ptr()], c));
        })
    };
    Ok(json!({
        "mode": "cpu",
        "bytes": nbytes,
        "zero_check_mb_s": time(&|d: &Bytes| { std::hint::black_box(d.iter().all(|&b| b == 0)); }),
        "blake3_mb_s": time(&|d: &Bytes| { std::hint::black_box(blake3::hash(d)); }),
        "encode_none_mb_s": enc(Compression::None),
        "encode_lz4_mb_s": enc(Compression::Lz4),
        "encode_zstd3_mb_s": enc(Compression::Zstd(3)),
    }))
}

fn main() -> Res<()> {
    let mut args: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let Some(k) = k.strip_prefix("--") else {
            usage()
        };
        if k == "help" {
            usage()
        }
        let v = it.next().unwrap_or_else(|| usage());
        args.insert(k.to_string(), v);
    }
    let get = |k: &str| args.get(k).cloned();
    let need = |k: &str| get(k).unwrap_or_else(|| usage());
    let mode = need("mode");
    let file = PathBuf::from(need("file"));
    let conc: usize = get("concurrency").unwrap_or_else(|| "8".into()).parse()?;
    let compression = parse_compression(&get("compression").unwrap_or_else(|| "lz4".into()))?;
    let name = get("name").unwrap_or_else(|| "full".into());

    if mode == "cpu" {
        let src = FileImage::open(&file)?;
        println!("{}", cpu_costs(&file, &src)?);
        return Ok(());
    }

    let url = need("target");
    let cfg = S3Config {
        endpoint: get("endpoint"),
        region: Some("us-east-1".into()),
        access_key_id: get("access-key"),
        secret_access_key: get("secret-key"),
        ..Default::default()
    };
    let t = Target::open(&url, &cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let mut out = rt.block_on(async {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(match mode.as_str() {
            "backup" | "incremental" => {
                let src = FileImage::open(&file)?;
                let incremental = if mode == "incremental" {
                    Some(Incremental {
                        parent: need("parent"),
                        changed: parse_ranges(&need("changed"))?,
                    })
                } else {
                    None
                };
                let spec = BackupSpec {
                    name: name.clone(),
                    volume: "bench".into(),
                    snapshot: name.clone(),
                };
                let opts = BackupOptions {
                    compression,
                    concurrency: conc,
                    incremental,
                    ..Default::default()
                };
                let r = backup(&t, &src, &spec, &opts).await?;
                let mut v = serde_json::to_value(&r)?;
                v["compression"] = serde_json::to_value(compression)?;
                v
            }
            "restore" => {
                let m = cairn_backup::read_manifest(&t, &name).await?;
                let sink = FileImage::create(&PathBuf::from(need("out")), m.size)?;
                let opts = RestoreOptions {
                    concurrency: conc,
                    ..Default::default()
                };
                // restore() flushes (fsyncs) the sink before it returns.
                serde_json::to_value(restore(&t, &name, &sink, &opts).await?)?
            }
            "plain-upload" => {
                let src = FileImage::open(&file)?;
                let prefix = s3_prefix(&url)?;
                let (read, sent) = plain_upload(&t, &src, &prefix, conc).await?;
                json!({ "bytes_read": read, "bytes_uploaded": sent })
            }
            "plain-download" => {
                let prefix = s3_prefix(&url)?;
                let size = SnapshotSource::size(&FileImage::open(&file)?);
                let sink = FileImage::create(&PathBuf::from(need("out")), size)?;
                let got = plain_download(&t, &sink, &prefix, conc).await?;
                json!({ "bytes_written": got, "bytes_downloaded": got })
            }
            _ => usage(),
        })
    })?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    out["mode"] = json!(mode);
    out["concurrency"] = json!(conc);
    out["wall_s"] = json!(secs);
    out["cpu_s"] = json!(cpu);
    let data = out
        .get("bytes_read")
        .or_else(|| out.get("bytes_written"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    out["data_mb_s"] = json!(data as f64 / secs / 1e6);
    println!("{out}");
    Ok(())
}
