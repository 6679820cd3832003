//! `cairn-meta-load`: creates volume records through one member of the metadata service
//! and prints the latency of each Create as one JSON line.
//!
//! Guarantees:
//! - Exactly `--count` Creates are sent, each for a new volume `<prefix><index>` (index
//!   zero-padded to 4 digits: `bench-0000`...), size `--size` bytes, `--replicas` replicas,
//!   state CREATING, as `cairn volume create` builds it. Any error (ALREADY_EXISTS included)
//!   aborts the run with a message and a non-zero exit: every counted Create succeeded.
//! - At most `--concurrency` Creates are in flight at once (1: strictly sequential, the
//!   next one goes out when the previous answer came back). All of them share one gRPC
//!   channel (one HTTP/2 connection to `--meta`).
//! - Latency is measured per Create, from just before the call to the answer; the
//!   percentiles are nearest-rank over every Create of the run.
//! - `revision_before` / `revision_after` are the revisions `List` returned just before and
//!   just after the run: their difference is how many Raft writes were applied meanwhile
//!   (the Creates plus whatever meta's own controllers wrote).
//!
//! With `--print-leader` it only waits until `--meta` knows a leader and prints it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_proto::v1::meta_client::MetaClient;
use cairn_proto::v1::{
    record, CreateRequest, DataLocality, Kind, LeaderRequest, ListRequest, Record, Volume,
    VolumeState,
};
use clap::Parser;
use serde_json::json;
use tonic::transport::Channel;

/// Create `--count` volume records through one meta member and print one JSON line:
/// {"meta","count","concurrency","seconds","creates_per_s","lat_p50_ms","lat_p90_ms",
/// "lat_p99_ms","lat_max_ms","lat_mean_ms","revision_before","revision_after"}.
#[derive(Debug, Parser)]
#[command(name = "cairn-meta-load", version, about, long_about = None)]
struct Args {
    /// `host:port` of the meta member to send every request to (leader or follower).
    #[arg(long, default_value = "127.0.0.1:10811")]
    meta: String,
    /// Number of volumes to create.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Creates in flight at once; 1 is sequential.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Volume name prefix; names are the prefix followed by the zero-padded index.
    #[arg(long, default_value = "bench-")]
    prefix: String,
    /// Volume size in bytes (a non-zero multiple of 4096).
    #[arg(long, default_value_t = 1 << 30)]
    size: u64,
    /// Replicas per volume.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Timeout of each call.
    #[arg(long, default_value = "10s")]
    timeout: humantime::Duration,
    /// Only wait (up to `--wait`) until the member knows a leader, print
    /// {"leader_id","leader_address","term"} and exit.
    #[arg(long)]
    print_leader: bool,
    /// How long `--print-leader` waits for a leader.
    #[arg(long, default_value = "30s")]
    wait: humantime::Duration,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cairn-meta-load: error: tokio runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match rt.block_on(run(&args)) {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cairn-meta-load: error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.meta))
        .with_context(|| format!("bad --meta address {:?}", args.meta))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(args.timeout.into())
        .connect_lazy();
    let client = MetaClient::new(channel);
    if args.print_leader {
        return wait_leader(client, args.wait.into()).await;
    }
    let revision_before = revision(client.clone()).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, next) = (client.clone(), next.clone());
        let (prefix, count, size, replicas) =
            (args.prefix.clone(), args.count, args.size, args.replicas);
        workers.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(lat);
                }
                let name = format!("{prefix}{i:04}");
                let req = CreateRequest {
                    record: Some(Record {
                        record: Some(record::Record::Volume(Volume {
                            name: name.clone(),
                            size_bytes: size,
                            replica_count: replicas,
                            state: VolumeState::Creating as i32,
                            state_reason: "waiting for scheduling".into(),
                            data_locality: DataLocality::Disabled as i32,
                            ..Default::default()
                        })),
                    }),
                };
                let t0 = Instant::now();
                client.clone().create(req).await.map_err(|s| {
                    anyhow::anyhow!("create {name}: {:?}: {}", s.code(), s.message())
                })?;
                lat.push(t0.elapsed());
            }
        });
    }
    let mut lat = Vec::with_capacity(args.count);
    while let Some(r) = workers.join_next().await {
        lat.extend(r.context("worker task")??);
    }
    let seconds = start.elapsed().as_secs_f64();
    let revision_after = revision(client).await?;
    if lat.len() != args.count {
        bail!("{} creates answered, {} expected", lat.len(), args.count);
    }
    lat.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // Nearest rank: the smallest latency with at least p of the creates at or below it.
    let pct = |p: usize| {
        let rank = (p * lat.len()).div_ceil(100).max(1);
        lat.get(rank - 1).copied().map(ms)
    };
    let mean =
        (!lat.is_empty()).then(|| lat.iter().map(|d| ms(*d)).sum::<f64>() / lat.len() as f64);
    Ok(json!({
        "meta": args.meta,
        "count": lat.len(),
        "concurrency": args.concurrency,
        "seconds": seconds,
        "creates_per_s": lat.len() as f64 / seconds,
        "lat_p50_ms": pct(50),
        "lat_p90_ms": pct(90),
        "lat_p99_ms": pct(99),
        "lat_max_ms": lat.last().copied().map(ms),
        "lat_mean_ms": mean,
        "revision_before": revision_before,
        "revision_after": revision_after,
    })
    .to_string())
}

/// The revision a `List` of volumes reflects.
async fn revision(mut client: MetaClient<Channel>) -> anyhow::Result<u64> {
    let resp = client
        .list(ListRequest {
            kind: Kind::Volume as i32,
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("list volumes: {:?}: {}", s.code(), s.message()))?;
    Ok(resp.into_inner().revision)
}

/// Polls `Leader` every 100 ms until the member knows one, for at most `wait`.
async fn wait_leader(mut client: MetaClient<Channel>, wait: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + wait;
    loop {
        let last = match client.leader(LeaderRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.known {
                    return Ok(json!({
                        "leader_id": r.id,
                        "leader_address": r.address,
                        "term": r.term,
                    })
                    .to_string());
                }
                "no leader known".to_owned()
            }
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        if Instant::now() >= deadline {
            bail!("no leader after {wait:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
