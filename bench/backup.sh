#!/usr/bin/env bash
# Backup benchmark (issue 6, "Measure"): backup and restore throughput of a 2 GiB image with
# 1 GiB of random data against a local S3 server (s3s-fs 0.14.1 on a loopback port), beside a
# plain parallel upload (and download) of the same bytes through the same client library
# (object_store, same concurrency, 2 MiB objects, no hashing or compression); lz4 vs zstd vs
# none; and the incremental cost at 1 % change.
#
# The source is a sparse file read through cairn_backup::FileImage (the `cairn backup` CLI is
# not wired to volumes yet): BENCH_DATA_MIB of /dev/urandom data in 2 MiB-aligned runs at
# random places over BENCH_SIZE_MIB, the rest holes.
#
# Usage: bash bench/backup.sh            (see bench/README.md)
#
# Environment (all optional):
#   BENCH_SIZE_MIB     image size in MiB (default 2048; a multiple of 2)
#   BENCH_DATA_MIB     random data in it, MiB (default 1024; a multiple of 2)
#   BENCH_CONCURRENCY  blocks in flight, backup, restore and the plain peers (default 8)
#   BENCH_REPEAT       repetitions of the whole set (default 2)
#   BENCH_RESULTS      where the report goes (default bench/results)
#
# The work dir (image, S3 data dir, restored files) is a fresh bench/work/backup-XXXX
# (git-ignored), removed at the end. Every process started is stopped by pid.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-2048}
DATA_MIB=${BENCH_DATA_MIB:-1024}
CONC=${BENCH_CONCURRENCY:-8}
REPEAT=${BENCH_REPEAT:-2}
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results}
BIN=$ROOT/target/release/examples/backup_bench
BUCKET=bench
AK=AKBENCH
SK=SKBENCH

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

((SIZE_MIB % 2 == 0 && DATA_MIB % 2 == 0 && DATA_MIB <= SIZE_MIB)) ||
    die "BENCH_SIZE_MIB and BENCH_DATA_MIB must be even, data <= size"
command -v s3s-fs >/dev/null ||
    die "s3s-fs is not on PATH; install it with: cargo install s3s-fs@0.14.1 --locked --features binary"
command -v python3 >/dev/null || die "python3 is needed to write the report"
S3S_VERSION=$(s3s-fs --version)

LOAD_START=$(cut -d " " -f 1-3 /proc/loadavg)
log "building backup_bench (release)"
(cd "$ROOT" && cargo build --release -p cairn-backup --example backup_bench)

mkdir -p "$ROOT/bench/work" "$RESULTS"
WORK=$(mktemp -d "$ROOT/bench/work/backup-XXXX")
JSON=$WORK/json
IMG=$WORK/image.img
OUT=$WORK/restored.img
S3DIR=$WORK/s3
mkdir -p "$JSON" "$S3DIR"
declare -a PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    PIDS=()
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Writes back everything dirty and empties the page cache (all of it as root, else the
# work dir's files), so every run reads its source from disk.
drop_caches() {
    sync
    if [ "$(id -u)" -eq 0 ] && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        DROP="sync; echo 3 > /proc/sys/vm/drop_caches"
    else
        settle
        DROP="sync + fdatasync and POSIX_FADV_DONTNEED of every file in the work dir"
    fi
}

# --- the image --------------------------------------------------------------------------------
log "image: $DATA_MIB MiB of random data in 2 MiB-aligned runs over $SIZE_MIB MiB"
truncate -s "${SIZE_MIB}M" "$IMG"
python3 - "$SIZE_MIB" "$DATA_MIB" >"$WORK/runs" <<'PY'
import random, sys
n, k = int(sys.argv[1]) // 2, int(sys.argv[2]) // 2
blocks = sorted(random.Random(6).sample(range(n), k))
runs = []
for b in blocks:
    if runs and runs[-1][0] + runs[-1][1] == b:
        runs[-1][1] += 1
    else:
        runs.append([b, 1])
for s, c in runs:
    print(s, c)
PY
while read -r start count; do
    dd if=/dev/urandom of="$IMG" bs=2M seek="$start" count="$count" conv=notrunc,fsync \
        iflag=fullblock status=none
done <"$WORK/runs"
RUNS=$(wc -l <"$WORK/runs")
ALLOC=$(du -B1 "$IMG" | cut -f 1)
log "image written: $RUNS runs, $ALLOC bytes allocated"

# --- s3s-fs -----------------------------------------------------------------------------------
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$S3DIR/$BUCKET" # s3s-fs: a bucket is a folder in its root
s3s-fs --host 127.0.0.1 --port "$PORT" --access-key "$AK" --secret-key "$SK" "$S3DIR" \
    >"$WORK/s3s-fs.log" 2>&1 &
S3PID=$!
PIDS+=("$S3PID")
for ((i = 0; ; i++)); do
    alive "$S3PID" || die "s3s-fs exited: $(cat "$WORK/s3s-fs.log")"
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    ((i < 400)) || die "s3s-fs does not listen on 127.0.0.1:$PORT"
    sleep 0.05
done
ENDPOINT=http://127.0.0.1:$PORT
log "s3s-fs (pid $S3PID) on $ENDPOINT, data dir $S3DIR"

# CPU ticks (user + system) of a pid, and the machine's busy / total ticks.
pid_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
machine_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }

# bench ID ARGS...: drop caches, run backup_bench ARGS, save its JSON line plus the CPU
# s3s-fs and the machine used meanwhile as $JSON/ID.json.
bench() {
    local id=$1
    shift
    drop_caches
    local s0 m0 s1 m1
    s0=$(pid_ticks "$S3PID")
    m0=$(machine_ticks)
    "$BIN" --endpoint "$ENDPOINT" --access-key "$AK" --secret-key "$SK" --file "$IMG" \
        --concurrency "$CONC" "$@" >"$JSON/$id.raw" || die "run $id failed"
    s1=$(pid_ticks "$S3PID")
    m1=$(machine_ticks)
    python3 - "$JSON/$id.raw" "$id" "$s0" "$s1" "$m0" "$m1" "$(getconf CLK_TCK)" "$(nproc)" \
        >"$JSON/$id.json" <<'PY'
import json, sys
raw, id_, s0, s1, m0, m1, tck, ncpu = sys.argv[1:]
r = json.loads(open(raw).read().strip().splitlines()[-1])
tck = float(tck)
r["id"] = id_
r["s3s_cpu_s"] = (float(s1) - float(s0)) / tck
b0, t0 = map(float, m0.split())
b1, t1 = map(float, m1.split())
r["machine_busy_cores"] = (b1 - b0) / (t1 - t0) * int(ncpu) if t1 > t0 else 0.0
print(json.dumps(r))
PY
    python3 - "$JSON/$id.json" <<'PY' >&2
import json, sys
r = json.load(open(sys.argv[1]))
w = r["wall_s"]
print(f'    {r["id"]}: {r["wall_s"]:.2f} s, {r["data_mb_s"]:.0f} MB/s of data, '
      f'uploaded {r.get("bytes_uploaded", 0):,} B, downloaded {r.get("bytes_downloaded", 0):,} B; '
      f'CPU cores: client {r["cpu_s"] / w:.2f}, s3s-fs {r["s3s_cpu_s"] / w:.2f}, '
      f'machine {r["machine_busy_cores"]:.2f}')
PY
}

# verify: the restored file equals the image.
verify() {
    cmp "$IMG" "$OUT" || die "$1: the restored file differs from the image"
    log "    $1: restored file equals the image (cmp)"
    rm -f "$OUT"
}

NBLOCKS=$((SIZE_MIB / 2))
NCHANGE=$(((NBLOCKS + 50) / 100))
((NCHANGE > 0)) || NCHANGE=1
for ((r = 1; r <= REPEAT; r++)); do
    log "repetition $r of $REPEAT"
    bench "r$r-plain-upload" --mode plain-upload --target "s3://$BUCKET/plain-r$r"
    bench "r$r-plain-download" --mode plain-download --target "s3://$BUCKET/plain-r$r" --out "$OUT"
    verify "r$r-plain-download"
    rm -rf "${S3DIR:?}/$BUCKET/plain-r$r"
    for c in lz4 zstd none; do
        bench "r$r-backup-$c" --mode backup --compression "$c" --target "s3://$BUCKET/$c-r$r" --name full
    done
    rm -rf "${S3DIR:?}/$BUCKET/zstd-r$r" "${S3DIR:?}/$BUCKET/none-r$r"
    # 1 % change: NCHANGE data blocks (of the volume's NBLOCKS) rewritten with new random data.
    python3 - "$WORK/runs" "$NCHANGE" "$r" >"$WORK/changed" <<'PY'
import random, sys
blocks = [s + i for s, c in (map(int, l.split()) for l in open(sys.argv[1])) for i in range(c)]
for b in sorted(random.Random(100 + int(sys.argv[3])).sample(blocks, int(sys.argv[2]))):
    print(b)
PY
    CHANGED=
    while read -r b; do
        dd if=/dev/urandom of="$IMG" bs=2M seek="$b" count=1 conv=notrunc,fsync iflag=fullblock status=none
        CHANGED+="${CHANGED:+,}$((b * 2097152))-$(((b + 1) * 2097152))"
    done <"$WORK/changed"
    log "    changed $NCHANGE of $NBLOCKS blocks (2 MiB each) with new random data"
    bench "r$r-incremental" --mode incremental --target "s3://$BUCKET/lz4-r$r" --name inc \
        --parent full --changed "$CHANGED"
    bench "r$r-restore" --mode restore --target "s3://$BUCKET/lz4-r$r" --name inc --out "$OUT"
    verify "r$r-restore"
    rm -rf "${S3DIR:?}/$BUCKET/lz4-r$r"
done
log "CPU cost of hashing and block encoding (one thread, in memory)"
"$BIN" --mode cpu --file "$IMG" >"$JSON/cpu.json"
cat "$JSON/cpu.json" >&2
S3RSS=$(awk '/VmHWM/ { print $2 " kB" }' "/proc/$S3PID/status")
stop_pid "$S3PID"
PIDS=()

# --- report -----------------------------------------------------------------------------------
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain -- crates/cairn-backup bench/backup.sh bench/backup_report.py 2>/dev/null)" ]; then
    COMMIT="$COMMIT (with uncommitted changes)"
fi
REPORT=$RESULTS/backup-$STAMP.md
FSTYPE=$(df --output=fstype "$WORK" | tail -n 1 | tr -d ' ')
FSSRC=$(df --output=source "$WORK" | tail -n 1 | tr -d ' ')
FACTS="date (UTC)=$(date -u '+%Y-%m-%d %H:%M:%S')
commit=$COMMIT
nproc=$(nproc)
CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)
memory=$(free -g | awk '/^Mem:/ { print $2 " GiB" }')
kernel=$(uname -r)
work dir=$FSTYPE ($FSSRC), a fresh bench/work/backup-XXXX (image, S3 data dir, restored files)
image=sparse file, $SIZE_MIB MiB, $DATA_MIB MiB of /dev/urandom data in $RUNS 2 MiB-aligned runs at random places ($ALLOC bytes allocated)
S3 server=$S3S_VERSION, \`s3s-fs --host 127.0.0.1 --port P --access-key AK --secret-key SK DIR\`, writing to the work dir; peak RSS $S3RSS
client=target/release/examples/backup_bench (object_store S3 client, path-style, http://127.0.0.1:P), concurrency $CONC
cache=dropped before every run: $DROP
repetitions=$REPEAT
load average at start / end=$LOAD_START / $(cut -d " " -f 1-3 /proc/loadavg)" \
    python3 "$ROOT/bench/backup_report.py" "$JSON" "$REPORT" "$SIZE_MIB" "$DATA_MIB" "$REPEAT" "$NCHANGE"
cp "$REPORT" "$RESULTS/backup-latest.md"
log "report: $REPORT (copied to backup-latest.md)"
cat "$REPORT"
