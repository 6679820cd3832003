//! `cairn-loadgen`: drives one replica server with one workload and prints one JSON line.
//!
//! Guarantees:
//! - Exactly `--qd` requests are in flight on one connection while the run lasts (fewer only
//!   while draining at the end): a request is sent as soon as a reply comes back. Replies
//!   come back in request order, and each one is checked against the id it answers.
//! - Every reply must be ok (and every read reply must match its block CRCs); anything else
//!   aborts the run with a message and a non-zero exit.
//! - The sender pays for checksums: the block CRCs of every write are computed when that
//!   write is sent, never cached per buffer. Data comes from a few buffers of random bytes
//!   made before the run, so the random generator costs nothing during it.
//! - Only completions inside the measured window (after `--ramp`, for `--seconds`) count
//!   towards `ios`, `iops`, `mib_s` and the latency percentiles.
//!
//! Assumes a Linux `/proc` for its own CPU time (`cpu_s` is null without it).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use cairn_replica::Client;
use cairn_wire::{Reply, ReplyBody, Request, BLOCK_SIZE};
use clap::{Parser, ValueEnum};

/// Drive one Cairn replica server with a single workload at a fixed queue depth on one
/// connection, then print one JSON line:
/// {"pattern","bs","qd","seconds","ios","iops","mib_s","lat_p50_us","lat_p99_us",...}.
#[derive(Debug, Parser)]
#[command(name = "cairn-loadgen", version, about, long_about = None)]
struct Args {
    /// Replica server address, HOST:PORT (what `cairn replica serve` printed after
    /// "listening on").
    #[arg(long, default_value = "127.0.0.1:10900")]
    addr: String,
    /// Volume name sent in Hello.
    #[arg(long, default_value = "bench")]
    volume: String,
    /// Replica id sent in Hello.
    #[arg(long, default_value = "r0")]
    replica: String,
    /// Epoch sent in Hello and in every request; must not be below the replica's accepted
    /// epoch.
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    /// Bytes of the volume the workload spans, from offset 0 (suffixes k, m, g, t are powers
    /// of 1024: 4k, 1m, 1g). The replica must be at least this large.
    #[arg(long, default_value = "1g", value_parser = parse_size)]
    size: u64,
    /// Size to create the replica with when it does not exist yet; 0 means it must already
    /// exist. Defaults to --size.
    #[arg(long, value_parser = parse_size)]
    create_size: Option<u64>,
    /// Workload: randwrite (uniform random offsets aligned to --bs), seqwrite (ascending
    /// offsets, wrapping at --size), randread, or fill (write the whole span once in order,
    /// then stop; --seconds and --ramp are ignored and the whole fill is measured).
    #[arg(long, value_enum, default_value_t = Pattern::Randwrite)]
    pattern: Pattern,
    /// Bytes per request: a multiple of 4 KiB (4k, 64k, 1m...).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests kept in flight on the connection.
    #[arg(long, default_value_t = 1)]
    qd: usize,
    /// Seconds measured, after the ramp.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds run before measuring starts (not counted).
    #[arg(long, default_value_t = 2.0)]
    ramp: f64,
    /// Seed for the random offsets and the data buffers.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Distinct random data buffers, written in rotation.
    #[arg(long, default_value_t = 8)]
    buffers: usize,
    /// Seconds to wait for any one reply before giving up.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pattern {
    Randwrite,
    Seqwrite,
    Randread,
    Fill,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Randwrite => "randwrite",
            Pattern::Seqwrite => "seqwrite",
            Pattern::Randread => "randread",
            Pattern::Fill => "fill",
        }
    }

    fn writes(self) -> bool {
        !matches!(self, Pattern::Randread)
    }
}

/// Parses a byte count: digits with an optional k/m/g/t suffix (powers of 1024; `KiB`, `K`
/// and `k` alike).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (digits and an optional k/m/g/t suffix)"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size suffix {other:?} in {s:?}")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} overflows 64 bits"))
}

/// xorshift64*: enough randomness for offsets and data, and deterministic per seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Never zero, or the generator sticks at zero.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `0..n` for n far below 2^64.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Where the next request goes.
struct Offsets {
    pattern: Pattern,
    bs: u64,
    slots: u64,
    next_seq: u64,
    rng: Rng,
}

impl Offsets {
    /// The next offset, or `None` once a fill has covered the span.
    fn next(&mut self) -> Option<u64> {
        match self.pattern {
            Pattern::Randwrite | Pattern::Randread => Some(self.rng.below(self.slots) * self.bs),
            Pattern::Seqwrite => {
                let slot = self.next_seq % self.slots;
                self.next_seq += 1;
                Some(slot * self.bs)
            }
            Pattern::Fill => {
                if self.next_seq >= self.slots {
                    return None;
                }
                let slot = self.next_seq;
                self.next_seq += 1;
                Some(slot * self.bs)
            }
        }
    }
}

/// This thread's CPU time so far (user + system), from the scheduler's own accounting.
fn thread_cpu() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// The `q`-quantile (0..=1) of sorted samples, in microseconds.
fn percentile_us(sorted_ns: &[u64], q: f64) -> Option<f64> {
    if sorted_ns.is_empty() {
        return None;
    }
    let n = sorted_ns.len();
    let rank = (q * n as f64).ceil().max(1.0);
    // `rank` is at most n, which came from a usize.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let idx = (rank as usize).min(n) - 1;
    Some(sorted_ns[idx] as f64 / 1000.0)
}

fn json_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "null".to_owned(), |x| format!("{x:.decimals$}"))
}

struct Outcome {
    ios: u64,
    measured: Duration,
    lat_ns: Vec<u64>,
    cpu: Option<Duration>,
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("cairn-loadgen: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn validate(a: &Args) -> anyhow::Result<()> {
    let block = u64::from(BLOCK_SIZE);
    if a.bs == 0 || !a.bs.is_multiple_of(block) {
        bail!("--bs {} must be a non-zero multiple of {block}", a.bs);
    }
    if a.bs > u64::from(u32::MAX) {
        bail!("--bs {} does not fit one request", a.bs);
    }
    if a.size < a.bs || !a.size.is_multiple_of(a.bs) {
        bail!(
            "--size {} must be a non-zero multiple of --bs {}",
            a.size,
            a.bs
        );
    }
    if a.qd == 0 {
        bail!("--qd must be at least 1");
    }
    if a.pattern != Pattern::Fill && (!a.seconds.is_finite() || a.seconds <= 0.0) {
        bail!("--seconds must be positive");
    }
    if !a.ramp.is_finite() || a.ramp < 0.0 {
        bail!("--ramp must be zero or positive");
    }
    if a.buffers == 0 {
        bail!("--buffers must be at least 1");
    }
    Ok(())
}

fn run(a: &Args) -> anyhow::Result<String> {
    validate(a)?;
    let bs = usize::try_from(a.bs).context("--bs does not fit in memory")?;
    let len = u32::try_from(a.bs).context("--bs does not fit one request")?;

    let mut client = Client::connect(a.addr.as_str(), a.epoch)
        .with_context(|| format!("connecting to {}", a.addr))?;
    client.set_timeout(Some(Duration::from_secs(a.timeout.max(1))))?;
    let create = a.create_size.unwrap_or(a.size);
    let status = client
        .hello(&a.volume, &a.replica, create)
        .with_context(|| format!("Hello for {}/{}", a.volume, a.replica))?;
    if status.size < a.size {
        bail!(
            "replica {}/{} is {} bytes, smaller than --size {}",
            a.volume,
            a.replica,
            status.size,
            a.size
        );
    }

    let mut rng = Rng::new(a.seed);
    let buffers: Vec<Bytes> = if a.pattern.writes() {
        (0..a.buffers)
            .map(|_| {
                let mut v = Vec::with_capacity(bs + 8);
                while v.len() < bs {
                    v.extend_from_slice(&rng.next().to_le_bytes());
                }
                v.truncate(bs);
                Bytes::from(v)
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut offsets = Offsets {
        pattern: a.pattern,
        bs: a.bs,
        slots: a.size / a.bs,
        next_seq: 0,
        rng: Rng::new(a.seed ^ 0x5EED),
    };

    let out = drive(a, &mut client, &mut offsets, &buffers, len)?;

    let mut lat = out.lat_ns;
    lat.sort_unstable();
    let secs = out.measured.as_secs_f64();
    let iops = if secs > 0.0 {
        out.ios as f64 / secs
    } else {
        0.0
    };
    let mib_s = iops * a.bs as f64 / f64::from(1u32 << 20);
    let mean = if lat.is_empty() {
        None
    } else {
        Some(lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64 / 1000.0)
    };
    let mut line = String::new();
    write!(
        line,
        "{{\"pattern\":\"{}\",\"bs\":{},\"qd\":{},\"seconds\":{:.3},\"ios\":{},\"iops\":{:.1},\
         \"mib_s\":{:.2},\"lat_p50_us\":{},\"lat_p99_us\":{},\"lat_p999_us\":{},\
         \"lat_mean_us\":{},\"cpu_s\":{}}}",
        a.pattern.name(),
        a.bs,
        a.qd,
        secs,
        out.ios,
        iops,
        mib_s,
        json_opt(percentile_us(&lat, 0.50), 1),
        json_opt(percentile_us(&lat, 0.99), 1),
        json_opt(percentile_us(&lat, 0.999), 1),
        json_opt(mean, 1),
        json_opt(out.cpu.map(|d| d.as_secs_f64()), 3),
    )?;
    Ok(line)
}

/// Queues the request for `offset`; writes compute their block CRCs here, per request.
fn send_one(
    client: &mut Client,
    pattern: Pattern,
    offset: u64,
    len: u32,
    data: Option<&Bytes>,
) -> anyhow::Result<u64> {
    let req = match (pattern.writes(), data) {
        (true, Some(data)) => Request::Write {
            offset,
            fua: false,
            crcs: cairn_wire::block_crcs(data),
            data: data.clone(),
        },
        _ => Request::Read { offset, len },
    };
    client
        .queue(&req)
        .with_context(|| format!("queueing the request at offset {offset}"))
}

/// Checks one reply against the request it must answer.
fn check_reply(
    reply: Reply,
    id: u64,
    offset: u64,
    pattern: Pattern,
    len: u32,
) -> anyhow::Result<()> {
    if reply.request_id != id {
        bail!(
            "reply to request {} while request {id} was the oldest in flight",
            reply.request_id
        );
    }
    let body = match reply.result {
        Ok(b) => b,
        Err(e) => bail!("request {id} at offset {offset} failed: {e}"),
    };
    match (pattern.writes(), body) {
        (true, ReplyBody::Empty) => Ok(()),
        (false, ReplyBody::Data { crcs, data }) => {
            if data.len() != len as usize {
                bail!(
                    "read at offset {offset} returned {} bytes, not {len}",
                    data.len()
                );
            }
            if let Some(b) = cairn_wire::first_bad_block(&data, &crcs) {
                bail!("read at offset {offset}: block {b} does not match its CRC");
            }
            Ok(())
        }
        (_, other) => bail!("request {id} at offset {offset}: unexpected reply {other:?}"),
    }
}

/// Runs the workload: keeps `qd` requests in flight until the window closes, then drains.
fn drive(
    a: &Args,
    client: &mut Client,
    offsets: &mut Offsets,
    buffers: &[Bytes],
    len: u32,
) -> anyhow::Result<Outcome> {
    let fill = a.pattern == Pattern::Fill;
    let start = Instant::now();
    let (measure_start, end) = if fill {
        (start, None)
    } else {
        let ms = start + Duration::from_secs_f64(a.ramp);
        (ms, Some(ms + Duration::from_secs_f64(a.seconds)))
    };
    let mut inflight: VecDeque<(u64, u64, Instant)> = VecDeque::with_capacity(a.qd);
    let mut lat_ns: Vec<u64> = Vec::with_capacity(1 << 20);
    let mut ios = 0u64;
    let mut sent = 0usize;
    let mut cpu_at_start = if fill { thread_cpu() } else { None };
    let mut measuring = fill;
    let mut last_done = start;

    let issue = |client: &mut Client,
                 offsets: &mut Offsets,
                 sent: &mut usize,
                 inflight: &mut VecDeque<(u64, u64, Instant)>|
     -> anyhow::Result<bool> {
        let Some(offset) = offsets.next() else {
            return Ok(false);
        };
        let data = buffers.get(*sent % buffers.len().max(1));
        let t = Instant::now();
        let id = send_one(client, a.pattern, offset, len, data)?;
        *sent += 1;
        inflight.push_back((id, offset, t));
        Ok(true)
    };

    while inflight.len() < a.qd {
        if !issue(client, offsets, &mut sent, &mut inflight)? {
            break;
        }
    }
    while let Some(&(id, offset, t_sent)) = inflight.front() {
        // Replies that already arrived are taken first; requests queued for them go out in
        // one write just before waiting for more (as an engine batches its sends).
        let reply = match client.recv_buffered()? {
            Some(r) => r,
            None => {
                client.send_queued().context("sending queued requests")?;
                client
                    .recv()
                    .with_context(|| format!("waiting for the reply to request {id}"))?
            }
        };
        let now = Instant::now();
        inflight.pop_front();
        check_reply(reply, id, offset, a.pattern, len)?;
        if !measuring && now >= measure_start {
            measuring = true;
            cpu_at_start = thread_cpu();
        }
        let open = end.is_none_or(|e| now < e);
        if measuring && open {
            ios += 1;
            lat_ns.push(u64::try_from((now - t_sent).as_nanos()).unwrap_or(u64::MAX));
            last_done = now;
        }
        if open {
            issue(client, offsets, &mut sent, &mut inflight)?;
        }
    }
    let cpu = match (cpu_at_start, thread_cpu()) {
        (Some(a0), Some(a1)) => Some(a1.saturating_sub(a0)),
        _ => None,
    };
    let measured = match end {
        Some(e) => e.saturating_duration_since(measure_start),
        None => last_done.saturating_duration_since(start),
    };
    Ok(Outcome {
        ios,
        measured,
        lat_ns,
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("1x").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999t").is_err());
    }

    #[test]
    fn percentiles_pick_the_rank() {
        let v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile_us(&v, 0.50), Some(50.0));
        assert_eq!(percentile_us(&v, 0.99), Some(99.0));
        assert_eq!(percentile_us(&[], 0.5), None);
    }

    #[test]
    fn fill_covers_the_span_once_in_order() {
        let mut o = Offsets {
            pattern: Pattern::Fill,
            bs: 4096,
            slots: 3,
            next_seq: 0,
            rng: Rng::new(1),
        };
        let got: Vec<u64> = std::iter::from_fn(|| o.next()).collect();
        assert_eq!(got, vec![0, 4096, 8192]);
    }

    #[test]
    fn random_offsets_stay_aligned_and_in_range() {
        let mut o = Offsets {
            pattern: Pattern::Randwrite,
            bs: 8192,
            slots: 100,
            next_seq: 0,
            rng: Rng::new(7),
        };
        for _ in 0..1000 {
            let off = o.next().unwrap();
            assert_eq!(off % 8192, 0);
            assert!(off < 100 * 8192);
        }
    }
}
