#!/usr/bin/env bash
# Backup benchmark of a real Cairn volume through the CLI (issue 6, "Measure"): backup and
# restore throughput of a 2 GiB volume holding 1 GiB of random data against a local S3 server
# (s3s-fs on a loopback port), beside a plain parallel upload / download of the same bytes
# with the same client library (object_store, same concurrency, 2 MiB objects:
# `backup_bench --mode plain-upload|plain-download`), and the incremental cost at 1 % change.
#
#   1. `cairn dev --nodes 3 --replicas 3 --size 2GiB` in a private network namespace; vol0 is
#      filled through NBD (nbdcopy --destination-is-zero from a sparse image: BENCH_DATA_MIB of
#      /dev/urandom data in 2 MiB-aligned runs at random places, generated exactly like
#      bench/backup.sh does, same seed), compared with the image, then `snapshot create vol0 s1`.
#   2. BENCH_REPEAT times, page cache dropped before each run: plain upload of the image's
#      data blocks; `cairn backup create vol0 --snapshot s1 --name full-rN --target
#      s3://bench/vol-rN --json` (a fresh prefix per repetition, so nothing is deduplicated
#      across repetitions); plain download (compared with the image); `cairn backup restore
#      full-rN --to rN --json` (a new 3-replica volume written through its engine over NBD),
#      then rN attached and compared with the image, detached and deleted.
#   3. 1 % change: BENCH_CHANGE_MIB MiB of new random data written to vol0 at random 1 MiB-
#      aligned places (qemu-io over NBD), `snapshot create vol0 s2`, then `cairn backup create
#      vol0 --snapshot s2 --name inc-rN --target s3://bench/vol-rN` for every N (each one
#      incremental from full-rN in its own prefix).
#   Every measured run records wall time and the CPU of every process meanwhile (/proc ticks:
#   the CLI, each agent, meta, s3s-fs, the rest of the machine).
#
# Usage: bash bench/backup_volume.sh            (needs root: unshare -n, drop_caches)
#
# Environment (all optional):
#   BENCH_DATA_MIB     random data written to vol0, MiB (default 1024; even)
#   BENCH_CHANGE_MIB   MiB changed for the incremental (default 20, 1 % of 2 GiB)
#   BENCH_CONCURRENCY  blocks in flight: backup, restore and the plain peers (default 8)
#   BENCH_REPEAT       repetitions (default 3; the report takes medians)
#   BENCH_DIAG_CONC    concurrency of one extra (diagnostic) backup and restore run after the
#                      repetitions, to see whether they are bound by requests in flight
#                      (default 32; 0 skips them)
#   BENCH_WORK         work directory, wiped at start, removed at the end
#                      (default bench/work/backup-volume; KEEP_WORK=1 keeps it)
#   BENCH_RESULTS      where the report goes (default bench/results)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=2048
DATA_MIB=${BENCH_DATA_MIB:-1024}
CHANGE_MIB=${BENCH_CHANGE_MIB:-20}
CONC=${BENCH_CONCURRENCY:-8}
DIAG_CONC=${BENCH_DIAG_CONC:-32}
REPEAT=${BENCH_REPEAT:-3}
WORK=${BENCH_WORK:-$ROOT/bench/work/backup-volume}
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results}

CAIRN=$ROOT/target/release/cairn
BBENCH=$ROOT/target/release/examples/backup_bench
JSON=$WORK/json
NBD_ADDR=127.0.0.1:10809
URI=nbd://$NBD_ADDR/vol0
BUCKET=bench
AK=AKBENCH
SK=SKBENCH

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

((DATA_MIB % 2 == 0 && DATA_MIB <= SIZE_MIB)) || die "BENCH_DATA_MIB must be even, <= $SIZE_MIB"

# --- outside the namespace: tools and build, then re-execute inside a private one ---------
if [ "${1:-}" != --in-netns ]; then
    [ "$(id -u)" -eq 0 ] || die "needs root (unshare -n, drop_caches)"
    need=()
    command -v nbdcopy >/dev/null || need+=(libnbd-bin)
    command -v qemu-io >/dev/null || need+=(qemu-utils)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]} with apt-get"
        apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    command -v s3s-fs >/dev/null ||
        die "s3s-fs is not on PATH; install it with: cargo install s3s-fs@0.14.1 --locked --features binary"
    command -v python3 >/dev/null || die "python3 is needed for the driver and the report"
    command -v unshare >/dev/null && command -v ip >/dev/null ||
        die "unshare (util-linux) and ip (iproute2) are needed"
    log "building cairn and backup_bench (release)"
    (cd "$ROOT" && cargo build --release -p cairn &&
        cargo build --release -p cairn-backup --example backup_bench)
    log "entering a private network namespace (unshare -n)"
    exec unshare -n -- bash "${BASH_SOURCE[0]}" --in-netns
fi
ip link set lo up

# --- processes we start, and their teardown -----------------------------------------------
DEV_PID=
DEV_FD=
S3PID=
cleanup() {
    local i
    if [ -n "$DEV_PID" ]; then
        kill -TERM "$DEV_PID" 2>/dev/null || true
        for ((i = 0; i < 1800; i++)); do
            alive "$DEV_PID" || break
            sleep 0.05
        done
        if alive "$DEV_PID"; then
            log "cairn dev (pid $DEV_PID) did not stop within 90 s of SIGTERM; killing it"
            kill -KILL "$DEV_PID" 2>/dev/null || true
        fi
        wait "$DEV_PID" 2>/dev/null || true
        DEV_PID=
    fi
    if [ -n "$DEV_FD" ]; then
        exec {DEV_FD}<&-
        DEV_FD=
    fi
    if [ -n "$S3PID" ]; then
        stop_pid "$S3PID"
        S3PID=
    fi
    [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$WORK"
mkdir -p "$JSON" "$WORK/s3/$BUCKET" "$RESULTS" # s3s-fs: a bucket is a folder in its root
IMG=$WORK/image.img
OUT=$WORK/restored.img
FSTYPE=$(df --output=fstype "$WORK" | tail -n 1 | tr -d ' ')
FSSRC=$(df --output=source "$WORK" | tail -n 1 | tr -d ' ')
DISK=$(basename "$FSSRC")
LOAD_START=$(cut -d ' ' -f 1-3 /proc/loadavg)
log "work dir $WORK on $FSTYPE ($FSSRC); load $LOAD_START"

cold() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# --- the image (as bench/backup.sh makes it) ------------------------------------------------
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
s3s-fs --host 127.0.0.1 --port "$PORT" --access-key "$AK" --secret-key "$SK" "$WORK/s3" \
    >"$WORK/s3s-fs.log" 2>&1 &
S3PID=$!
for ((i = 0; ; i++)); do
    alive "$S3PID" || die "s3s-fs exited: $(cat "$WORK/s3s-fs.log")"
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    ((i < 400)) || die "s3s-fs does not listen on 127.0.0.1:$PORT"
    sleep 0.05
done
ENDPOINT=http://127.0.0.1:$PORT
export AWS_ACCESS_KEY_ID=$AK AWS_SECRET_ACCESS_KEY=$SK AWS_ENDPOINT_URL=$ENDPOINT AWS_REGION=us-east-1
log "s3s-fs (pid $S3PID) on $ENDPOINT, data dir $WORK/s3"

# --- cairn dev --------------------------------------------------------------------------------
fifo=$WORK/dev.stdout
mkfifo "$fifo"
"$CAIRN" --log info dev --data-dir "$WORK/data" --nodes 3 --replicas 3 --size "${SIZE_MIB}MiB" \
    >"$fifo" 2>"$WORK/dev.log" &
DEV_PID=$!
exec {DEV_FD}<"$fifo"
while :; do
    IFS= read -r -t 180 line <&"$DEV_FD" ||
        die "cairn dev stopped before printing its nbd:// line (see $WORK/dev.log)"
    [[ $line == nbd://* ]] && break
done
[ "$line" = "$URI" ] || die "cairn dev printed $line, not $URI"
for ((i = 0; ; i++)); do
    alive "$DEV_PID" || die "cairn dev exited during startup (see $WORK/dev.log)"
    nbdinfo --size "$URI" >/dev/null 2>&1 && break
    ((i < 1200)) || die "cairn dev did not answer on $URI within 60 s"
    sleep 0.05
done
log "cairn dev (pid $DEV_PID) serving $URI"

# --- measured runs ----------------------------------------------------------------------------
# measure ID CMD...: runs CMD (stdout to $JSON/ID.out), timing it and taking the CPU ticks of
# every process before and after (and the CLI's own CPU from rusage); $JSON/ID.json.
measure() {
    local id=$1
    shift
    python3 - "$JSON/$id" "$S3PID" "$DISK" "$WORK" "$@" <<'PY' || die "run $id failed (see $JSON/$id.err)"
import json, os, resource, subprocess, sys, time
base, s3pid, disk, work, cmd = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
tck = os.sysconf("SC_CLK_TCK")
def label(pid):
    try:
        a = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return None
    a = [x.decode(errors="replace") for x in a if x]
    if not a:
        return None
    if pid == s3pid:
        return "s3s-fs"
    exe = os.path.basename(a[0])
    if exe == "cairn" and not any(work in x for x in a):
        return "foreign cairn (not this bench's cluster)"
    if exe == "cairn" and len(a) > 1:
        if "agent" in a:
            i = a.index("--node-id") if "--node-id" in a else (a.index("--node") if "--node" in a else -1)
            return "agent " + (a[i + 1] if i >= 0 else " ".join(a[1:4]))
        if "meta" in a or "member" in a:
            return "meta"
        if "dev" in a:
            return "cairn dev"
        return "cairn " + " ".join(a[1:3])
    return exe
def snap():
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            s = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        f = s.rsplit(") ", 1)[1].split()
        out[p] = int(f[11]) + int(f[12])
    return out
def machine():
    f = list(map(int, open("/proc/stat").readline().split()[1:]))
    t = sum(f)
    return t - f[3] - f[4], t, f[4]
def diskstats():
    for l in open("/proc/diskstats"):
        f = l.split()
        if f[2] == disk:
            return int(f[5]) * 512, int(f[9]) * 512, int(f[12])
    return 0, 0, 0
p0, m0, d0, t0 = snap(), machine(), diskstats(), time.monotonic()
r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(base + ".out", "w") as o, open(base + ".err", "w") as e:
    rc = subprocess.run(cmd, stdout=o, stderr=e).returncode
t1 = time.monotonic()
r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
p1, m1, d1 = snap(), machine(), diskstats()
if rc != 0:
    sys.exit(1)
procs = {}
for p, v in p1.items():
    d = v - p0.get(p, 0)
    if d <= 0:
        continue
    l = label(p) or "kernel thread or exited"
    procs[l] = procs.get(l, 0) + d / tck
wall = t1 - t0
child = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
ncpu = os.cpu_count()
busy = (m1[0] - m0[0]) / (m1[1] - m0[1]) * ncpu if m1[1] > m0[1] else 0.0
iowait = (m1[2] - m0[2]) / (m1[1] - m0[1]) * ncpu if m1[1] > m0[1] else 0.0
disk_io = {"read_bytes": d1[0] - d0[0], "written_bytes": d1[1] - d0[1],
           "busy_ms": d1[2] - d0[2], "iowait_cores": iowait}
lines = [l for l in open(base + ".out").read().splitlines() if l.strip()]
try:
    res = json.loads("\n".join(lines))
except ValueError:
    res = json.loads(lines[-1]) if lines else {}
json.dump({"id": os.path.basename(base), "cmd": cmd, "wall_s": wall, "client_cpu_s": child,
           "procs_cpu_s": procs, "machine_busy_cores": busy, "disk": disk_io, "result": res},
          open(base + ".json", "w"))
r = res
mb = r.get("bytes_read", r.get("bytes_written", 0)) / 1e6
print(f"    {os.path.basename(base)}: {wall:.2f} s wall, {mb:.0f} MB data "
      f"({mb / wall:.0f} MB/s wall), client CPU {child / wall:.2f} cores, "
      f"machine {busy:.2f} cores, iowait {iowait:.2f}; disk {disk_io['written_bytes'] / 1e6:.0f} MB "
      f"written, busy {disk_io['busy_ms'] / 10 / wall:.0f} %; " +
      ", ".join(f"{k} {v / wall:.2f}" for k, v in sorted(procs.items(), key=lambda x: -x[1])[:5]),
      file=sys.stderr)
PY
}

BB=("$BBENCH" --endpoint "$ENDPOINT" --access-key "$AK" --secret-key "$SK" --file "$IMG"
    --concurrency "$CONC")

log "fill vol0: nbdcopy --destination-is-zero --flush image -> $URI"
t0=$EPOCHREALTIME
nbdcopy --destination-is-zero --flush "$IMG" "$URI"
t1=$EPOCHREALTIME
log "    filled in $(python3 -c "print(f'{$t1 - $t0:.1f}')") s; comparing vol0 with the image"
nbdcopy "$URI" - | cmp - "$IMG" || die "vol0 differs from the image"
"$CAIRN" --log warn snapshot create vol0 s1 --json >"$JSON/snap-s1.json"
log "snapshot s1: $(tr -d '\n' <"$JSON/snap-s1.json")"
ps -eo pid,ppid,rss,args --sort=pid | grep -E "cairn|s3s-fs" | grep -v grep >"$JSON/ps.txt" || true

for ((r = 1; r <= REPEAT; r++)); do
    log "repetition $r of $REPEAT"
    cold
    measure "r$r-plain-upload" "${BB[@]}" --mode plain-upload --target "s3://$BUCKET/plain-r$r"
    cold
    measure "r$r-backup" "$CAIRN" --log warn backup create vol0 --snapshot s1 --name "full-r$r" \
        --target "s3://$BUCKET/vol-r$r" --concurrency "$CONC" --json
    cold
    measure "r$r-plain-download" "${BB[@]}" --mode plain-download --target "s3://$BUCKET/plain-r$r" \
        --out "$OUT"
    cmp "$OUT" "$IMG" || die "r$r: the plain download differs from the image"
    rm -f "$OUT"
    rm -rf "${WORK:?}/s3/$BUCKET/plain-r$r"
    cold
    measure "r$r-restore" "$CAIRN" --log warn backup restore "full-r$r" \
        --target "s3://$BUCKET/vol-r$r" --to "r$r" --concurrency "$CONC" --json
    "$CAIRN" --log warn volume attach "r$r" --node node-1 >/dev/null
    nbdcopy "nbd://$NBD_ADDR/r$r" - | cmp - "$IMG" || die "restored volume r$r differs from the image"
    "$CAIRN" --log warn volume detach "r$r" >/dev/null
    "$CAIRN" --log warn volume delete "r$r" >/dev/null
    log "    r$r: restored volume equals the image (nbdcopy | cmp); detached and deleted"
done

# --- diagnostic: the same at a higher concurrency, once ----------------------------------------
if [ "$DIAG_CONC" -gt 0 ]; then
    log "diagnostic: backup and restore at --concurrency $DIAG_CONC"
    cold
    measure "d-backup" "$CAIRN" --log warn backup create vol0 --snapshot s1 --name "full-d" \
        --target "s3://$BUCKET/vol-d" --concurrency "$DIAG_CONC" --json
    cold
    measure "d-restore" "$CAIRN" --log warn backup restore "full-d" \
        --target "s3://$BUCKET/vol-d" --to "rd" --concurrency "$DIAG_CONC" --json
    "$CAIRN" --log warn volume delete "rd" >/dev/null
    rm -rf "${WORK:?}/s3/$BUCKET/vol-d"
fi

# --- 1 % change and the incremental backups ---------------------------------------------------
python3 - "$SIZE_MIB" "$CHANGE_MIB" >"$WORK/changed" <<'PY'
import random, sys
for m in sorted(random.Random(101).sample(range(int(sys.argv[1])), int(sys.argv[2]))):
    print(m)
PY
qio=()
while read -r m; do
    head -c 1M /dev/urandom >"$WORK/chg-$m"
    qio+=(-c "write -s $WORK/chg-$m ${m}M 1M")
done <"$WORK/changed"
qemu-io -f raw "$URI" "${qio[@]}" -c flush >"$JSON/change.txt" || die "qemu-io change failed"
TOUCHED=$(awk '{ print int($1 / 2) }' "$WORK/changed" | sort -u | wc -l)
log "changed $CHANGE_MIB MiB at random 1 MiB-aligned places ($TOUCHED distinct 2 MiB blocks)"
"$CAIRN" --log warn snapshot create vol0 s2 --json >"$JSON/snap-s2.json"
for ((r = 1; r <= REPEAT; r++)); do
    cold
    measure "r$r-incremental" "$CAIRN" --log warn backup create vol0 --snapshot s2 --name "inc-r$r" \
        --target "s3://$BUCKET/vol-r$r" --concurrency "$CONC" --json
done
S3RSS=$(awk '/VmHWM/ { print $2 " kB" }' "/proc/$S3PID/status")
LOAD_END=$(cut -d ' ' -f 1-3 /proc/loadavg)
"$CAIRN" --log warn volume verify vol0 >"$JSON/verify.txt" 2>&1 || die "replicas of vol0 differ"

# --- report -----------------------------------------------------------------------------------
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain -- crates 2>/dev/null)" ]; then
    COMMIT="$COMMIT (with uncommitted changes under crates/)"
fi
REPORT=$RESULTS/backup-volume-$STAMP.md
FACTS="date (UTC)=$(date -u '+%Y-%m-%d %H:%M:%S')
commit=$COMMIT
nproc=$(nproc)
CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)
memory=$(free -g | awk '/^Mem:/ { print $2 " GiB" }')
kernel=$(uname -r)
work dir=$FSTYPE ($FSSRC), $WORK: the image, every node's data dir and the S3 data dir (the same disk as bench/backup.sh; not tmpfs)
cluster=cairn --log info dev --nodes 3 --replicas 3 --size ${SIZE_MIB}MiB in a private network namespace (meta 127.0.0.1:10811, agents 127.0.0.2-4, vol0 on nbd://$NBD_ADDR/vol0 served by node-1)
vol0 content=nbdcopy --destination-is-zero --flush of a sparse ${SIZE_MIB} MiB image: $DATA_MIB MiB of /dev/urandom data in $RUNS 2 MiB-aligned runs at random places (bench/backup.sh's generator and seed; $ALLOC bytes allocated); compared with the image before snapshot s1
S3 server=$(s3s-fs --version), s3s-fs --host 127.0.0.1 --port P --access-key AK --secret-key SK DIR; peak RSS $S3RSS
backup=cairn --log warn backup create vol0 --snapshot s1 --name full-rN --target s3://$BUCKET/vol-rN --concurrency $CONC --json (AWS_ENDPOINT_URL=http://127.0.0.1:P, AWS_REGION=us-east-1, keys in AWS_*; default lz4)
restore=cairn --log warn backup restore full-rN --target s3://$BUCKET/vol-rN --to rN --concurrency $CONC --json (new volume, 3 replicas); then attached to node-1, nbdcopy | cmp with the image, detached, deleted
plain peers=target/release/examples/backup_bench --mode plain-upload|plain-download --target s3://$BUCKET/plain-rN --file IMAGE --concurrency $CONC (object_store, 2 MiB objects, reads the image file; download writes a sparse file and fsyncs; compared with the image)
incremental=$CHANGE_MIB x 1 MiB of new random data at random 1 MiB-aligned places of vol0 (qemu-io write -s over NBD, then flush; $TOUCHED distinct 2 MiB blocks), snapshot s2, cairn backup create vol0 --snapshot s2 --name inc-rN --target s3://$BUCKET/vol-rN (parent full-rN)
cache=sync; echo 3 > /proc/sys/vm/drop_caches before every measured run
fio=$(fio --version 2>/dev/null || echo none) (not used here)
tools=$(nbdcopy --version | head -n 1), $(qemu-io --version | head -n 1)
repetitions=$REPEAT
load average at start / end=$LOAD_START / $LOAD_END" \
    DIAG_CONC=$DIAG_CONC python3 - "$JSON" "$REPORT" "$REPEAT" "$SIZE_MIB" "$ROOT/bench/results/snapshots-latest.md" \
    "$ROOT/bench/results/backup-latest.md" <<'PY'
import glob, json, os, re, statistics, sys
jdir, out, rep, size_mib, snapmd, bkmd = sys.argv[1:]
rep, size = int(rep), int(size_mib) << 20
R = {os.path.basename(f)[:-5]: json.load(open(f)) for f in glob.glob(jdir + "/r*.json")}
D = {os.path.basename(f)[:-5]: json.load(open(f)) for f in glob.glob(jdir + "/d-*.json")}
def runs(kind):
    return [R[f"r{i}-{kind}"] for i in range(1, rep + 1)]
def data_bytes(r):
    res = r["result"]
    return res.get("bytes_read") if "bytes_read" in res and r["id"].split("-", 1)[1] != "restore" \
        else res.get("bytes_written", 0)
def mbs(r):
    return data_bytes(r) / r["wall_s"] / 1e6
def med(xs):
    return statistics.median(xs)
def inproc(r):
    res = r["result"]
    return data_bytes(r) / res.get("seconds", res.get("wall_s")) / 1e6
L = []
w = L.append
bk = runs("backup")
w(f"# Backup benchmark of a Cairn volume through the CLI: {size >> 20} MiB volume, "
  f"{bk[0]['result']['bytes_read'] >> 20} MiB random data, s3s-fs on loopback\n")
w("Source: vol0 of `cairn dev` (3 agents, 3 replicas), 2 GiB, holding 1 GiB of random data in "
  "2 MiB-aligned runs written through NBD (the default BENCH_DATA_MIB), snapshot `s1`; `cairn backup create` reads the "
  "snapshot from one RW replica (`ReadLayer`, 2 MiB) and uploads through object_store to s3s-fs. "
  "The peer is a plain parallel upload of the same bytes (the same image file the volume was "
  "filled from, its 2 MiB data blocks) through the same object_store client, same concurrency, "
  "no hashing, compression, HEAD or manifest (`backup_bench --mode plain-upload`). Restore is "
  "`cairn backup restore` into a new 3-replica volume written through its engine over NBD; its "
  "peer is a plain parallel download of the plain objects into a sparse file, fsynced. "
  "MB/s = 10^6 bytes of data (1 GiB) per second of wall time of the command, start to finish "
  "(for the CLI: process start, meta lookups, volume create / attach / detach for a restore, "
  "included). Page cache dropped before every run. Medians of %d repetitions.\n" % rep)
bk, pu, rs, pd = runs("backup"), runs("plain-upload"), runs("restore"), runs("plain-download")
b_m, p_m = med([mbs(r) for r in bk]), med([mbs(r) for r in pu])
ratio = b_m / p_m
met = b_m >= 300 or ratio >= 0.8
w("## Goal: backup >= 300 MB/s or >= 0.8x the plain upload\n")
w(f"**{'MET' if met else 'NOT MET'}**: backup of the volume {b_m:.0f} MB/s, plain upload {p_m:.0f} MB/s, "
  f"ratio **{ratio:.2f}x** (medians of {rep}).\n")
bi, pi = med([inproc(r) for r in bk]), med([inproc(r) for r in pu])
w(f"Timed inside the process instead (the CLI's `seconds`, the library call alone; backup_bench's "
  f"`wall_s`): backup {bi:.0f} MB/s, plain upload {pi:.0f} MB/s, ratio {bi / pi:.2f}x.\n")
w("Per repetition (backup / plain upload of the same repetition): " + ", ".join(
    f"r{i + 1}: {mbs(b):.0f} / {mbs(p):.0f} = {mbs(b) / mbs(p):.2f}x" for i, (b, p) in enumerate(zip(bk, pu))) + ".\n")
w("## Throughput\n")
w("| run | MB/s (median, wall) | every run | seconds wall (median) | seconds in the library (median) | bytes read / written | bytes sent / fetched | vs peer | MB/s in-process (median) | vs peer, in-process |")
w("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
def row(name, rs_, peer):
    m = med([mbs(r) for r in rs_])
    lib = [r["result"]["seconds"] for r in rs_ if "seconds" in r["result"]]
    res = rs_[0]["result"]
    sent = res.get("bytes_uploaded", res.get("bytes_downloaded", 0))
    vs = "1.00x (peer)" if peer is None else f"{m / med([mbs(r) for r in peer]):.2f}x"
    ip = med([inproc(r) for r in rs_])
    vi = "1.00x (peer)" if peer is None else f"{ip / med([inproc(r) for r in peer]):.2f}x"
    tail = f" {ip:.0f} | {vi} |"
    w(f"| {name} | {m:.0f} | {', '.join(f'{mbs(r):.0f}' for r in rs_)} | {med([r['wall_s'] for r in rs_]):.2f} | "
      f"{med(lib):.2f} | {data_bytes(rs_[0]):,} | {sent:,} | {vs} |" + tail if lib else
      f"| {name} | {m:.0f} | {', '.join(f'{mbs(r):.0f}' for r in rs_)} | {med([r['wall_s'] for r in rs_]):.2f} | - | "
      f"{data_bytes(rs_[0]):,} | {sent:,} | {vs} |" + tail)
row("plain upload (peer)", pu, None)
row("`cairn backup create` (lz4, default)", bk, pu)
row("plain download (peer)", pd, None)
row("`cairn backup restore` (new 3-replica volume)", rs, pd)
w("")
w("\"seconds in the library\" is the `seconds` field of the CLI's JSON (the cairn-backup "
  "backup / restore call alone); backup_bench's in-process time is its own `wall_s`. Wall time adds process start, meta calls, reading the "
  "replica's extent list, and for a restore creating, attaching and detaching the new volume.\n")
w("### Where the CPU goes (cores busy over the run, medians)\n")
labels = sorted({k for r in R.values() for k in r["procs_cpu_s"]})
def cores(rs_, key):
    return med([r["procs_cpu_s"].get(key, 0) / r["wall_s"] for r in rs_])
main = [k for k in labels if k in ("s3s-fs", "meta", "cairn dev")]
def agents(r):
    a = sorted((v for k, v in r["procs_cpu_s"].items() if k.startswith("agent")), reverse=True) or [0]
    return a[0] / r["wall_s"], sum(a[1:]) / r["wall_s"]
w("| run | client (CLI / backup_bench) | busiest agent | other agents | " + " | ".join(main) +
  " | machine busy | other | iowait | disk written MB | disk read MB | disk busy |")
w("|---|---:|---:|---:|" + "---:|" * len(main) + "---:|---:|---:|---:|---:|---:|")
for name, rs_ in (("plain upload", pu), ("backup", bk), ("plain download", pd), ("restore", rs),
                  ("incremental", runs("incremental"))):
    cl = med([r["client_cpu_s"] / r["wall_s"] for r in rs_])
    mach = med([r["machine_busy_cores"] for r in rs_])
    a1, a2 = med([agents(r)[0] for r in rs_]), med([agents(r)[1] for r in rs_])
    known = cl + a1 + a2 + sum(cores(rs_, k) for k in main)
    dk = [r["disk"] for r in rs_]
    w(f"| {name} | {cl:.2f} | {a1:.2f} | {a2:.2f} | " + " | ".join(f"{cores(rs_, k):.2f}" for k in main) +
      f" | {mach:.2f} | {max(0.0, mach - known):.2f} | {med([d['iowait_cores'] for d in dk]):.2f} | "
      f"{med([d['written_bytes'] for d in dk]) / 1e6:,.0f} | {med([d['read_bytes'] for d in dk]) / 1e6:,.0f} | "
      f"{med([d['busy_ms'] / 10 / r['wall_s'] for d, r in zip(dk, rs_)]):.0f} % |")
w("")
w("Cores = CPU seconds (user + system, /proc ticks) / wall seconds. The client column is the "
  "measured command (rusage of the child). \"other\" = machine busy minus the named processes: "
  "kernel threads (writeback, loopback networking softirqs are mostly charged to the processes) "
  "and anything else running on the machine. The machine has 2 cores. \"busiest agent\" is the "
  "agent serving the replica the backup reads, or for a restore the one running the new "
  "volume's engine (on whichever node the CLI attached it to). iowait is idle time with I/O pending, "
  "in cores. Disk columns are /proc/diskstats of the work dir's device over the run: bytes "
  "read and written, and busy = time with I/O in flight / wall time.\n")
if D:
    dc = os.environ.get("DIAG_CONC", "?")
    w(f"### Diagnostic: one backup and one restore at --concurrency {dc}\n")
    w("| run | MB/s (wall) | seconds wall | seconds in the library | client cores | busiest agent | s3s-fs | machine busy | iowait | disk written MB |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, name in (("d-backup", "backup"), ("d-restore", "restore")):
        if k not in D:
            continue
        r = D[k]
        a = max([v for n, v in r["procs_cpu_s"].items() if n.startswith("agent")] or [0])
        w(f"| {name}, concurrency {dc} | {mbs(r):.0f} | {r['wall_s']:.2f} | {r['result']['seconds']:.2f} | "
          f"{r['client_cpu_s'] / r['wall_s']:.2f} | {a / r['wall_s']:.2f} | "
          f"{r['procs_cpu_s'].get('s3s-fs', 0) / r['wall_s']:.2f} | {r['machine_busy_cores']:.2f} | "
          f"{r['disk']['iowait_cores']:.2f} | {r['disk']['written_bytes'] / 1e6:,.0f} |")
    w("")
w("## Incremental at 1 % change\n")
inc = runs("incremental")
w("| repetition | seconds (library) | seconds wall | bytes read | bytes uploaded | uploaded / volume | blocks new | blocks reused | blocks unchanged | blocks hole | parent |")
w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for i, r in enumerate(inc):
    x = r["result"]
    w(f"| r{i + 1} | {x['seconds']:.3f} | {r['wall_s']:.2f} | {x['bytes_read']:,} | {x['bytes_uploaded']:,} | "
      f"{x['bytes_uploaded'] / size * 100:.2f} % | {x['blocks_new']} | {x['blocks_reused']} | "
      f"{x['blocks_unchanged']} | {x['blocks_hole']} | {x.get('parent')} |")
w("")
w("The change is 1 MiB writes of random data at random 1 MiB-aligned places anywhere in the "
  "volume (some in holes); a backup block is 2 MiB, so every touched block is read whole "
  "(bytes read = touched blocks x 2 MiB). A touched block that was a hole before is half "
  "zeroes and lz4 halves it, so bytes uploaded can be below bytes read. Bytes uploaded include "
  "the manifest (it lists every data block of the volume).\n")
w("## Snapshot pause under load\n")
try:
    t = open(snapmd).read()
    m = re.search(r"^## Pause.*?(?=^## )", t, re.S | re.M)
    d = re.search(r"date \(UTC\)\W+([0-9][0-9: -]+[0-9])", t)
    w("Not re-measured here; from `bench/results/snapshots-latest.md` (bench/snapshots.sh, "
      f"run {d.group(1) if d else '?'}):\n")
    w(m.group(0).strip().replace("## ", "### ", 1) if m else "(no pause section found)")
except OSError:
    w("bench/results/snapshots-latest.md not found.")
w("")
w("## Setup\n")
w("| | |")
w("|---|---|")
for line in os.environ["FACTS"].splitlines():
    k, v = line.split("=", 1)
    w(f"| {k} | {v} |")
w("")
w("Reproduce: `bash bench/backup_volume.sh` (root; BENCH_REPEAT, BENCH_CONCURRENCY, "
  "BENCH_DATA_MIB, BENCH_CHANGE_MIB, BENCH_WORK, BENCH_RESULTS optional).\n")
w("## Raw output\n")
w("```")
for k in sorted(R) + sorted(D):
    r = R.get(k) or D[k]
    w(json.dumps({"id": r["id"], "wall_s": round(r["wall_s"], 4), "client_cpu_s": round(r["client_cpu_s"], 2),
                  "machine_busy_cores": round(r["machine_busy_cores"], 2),
                  "procs_cpu_s": {a: round(b, 2) for a, b in sorted(r["procs_cpu_s"].items(), key=lambda x: -x[1])[:8]},
                  "result": r["result"]}))
w("```")
open(out, "w").write("\n".join(L) + "\n")
PY
cp "$REPORT" "$RESULTS/backup-volume-latest.md"
log "report: $REPORT (copied to backup-volume-latest.md)"
cat "$REPORT"
