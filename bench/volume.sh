#!/usr/bin/env bash
# Volume benchmark: fio against a raw file (io_uring), qemu-nbd, nbdkit's file plugin, and
# `cairn dev` with 1 and with 3 replicas, all on the same filesystem in one run.
#
# Usage: bash bench/volume.sh            (see bench/README.md)
#
# Environment (all optional):
#   BENCH_SIZE        volume and file size, IEC suffix allowed (default 1G)
#   BENCH_SECONDS     measured seconds per run (default 20)
#   BENCH_RAMP        unmeasured seconds before each run (default 3)
#   BENCH_REPEAT      repetitions of the whole set of runs; the report gives medians (default 1)
#   BENCH_WORKLOADS   which workloads, space separated (default: all of
#                     "rw4k-qd1 rw4k-qd32 rr4k-qd32 sw1m-qd8")
#   BENCH_TARGETS     which targets, space separated (default: all of
#                     "raw qemu nbdkit cairn1 cairn3"); the ratios need qemu
#   BENCH_QEMU_NBD_FLAGS  extra qemu-nbd flags (default "--cache=writeback --aio=io_uring")
#   BENCH_NBDKIT_FLAGS    extra nbdkit flags, before the plugin name (default none)
#   BENCH_WORK        work directory, wiped at start (default bench/work/volume)
#   BENCH_RESULTS     where the report goes (default bench/results)
#
# Every target is buffered (page cache) and nothing flushes during a run. Before every run all
# dirty data is written back and the page cache of every file in the work dir is dropped, so
# each run starts from the same cold, clean cache (as bench/replica.sh does).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_SPEC=${BENCH_SIZE:-1G}
SECONDS_RUN=${BENCH_SECONDS:-20}
RAMP=${BENCH_RAMP:-3}
REPEAT=${BENCH_REPEAT:-1}
WORKLOADS=${BENCH_WORKLOADS:-"rw4k-qd1 rw4k-qd32 rr4k-qd32 sw1m-qd8"}
TARGETS=${BENCH_TARGETS:-"raw qemu nbdkit cairn1 cairn3"}
QEMU_NBD_FLAGS=${BENCH_QEMU_NBD_FLAGS-"--cache=writeback --aio=io_uring"}
NBDKIT_FLAGS=${BENCH_NBDKIT_FLAGS-""}
WORK=${BENCH_WORK:-$ROOT/bench/work/volume}
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results}

SIZE=$(numfmt --from=iec "${SIZE_SPEC^^}")
CAIRN=$ROOT/target/release/cairn
JSON=$WORK/json

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

# name -> "fio_rw bs iodepth"
workload() {
    case "$1" in
        rw4k-qd1) echo "randwrite 4k 1" ;;
        rw4k-qd32) echo "randwrite 4k 32" ;;
        rr4k-qd32) echo "randread 4k 32" ;;
        sw1m-qd8) echo "write 1m 8" ;;
        *) die "unknown workload $1 (known: rw4k-qd1 rw4k-qd32 rr4k-qd32 sw1m-qd8)" ;;
    esac
}
for w in $WORKLOADS; do workload "$w" >/dev/null; done
for t in $TARGETS; do
    case "$t" in raw | qemu | nbdkit | cairn1 | cairn3) ;; *) die "unknown target $t" ;; esac
done
[ $((SIZE % 1048576)) -eq 0 ] || die "BENCH_SIZE must be a multiple of 1 MiB"

# --- processes we start, and their teardown -----------------------------------------------
declare -A PID URI FD
# Replica server pids of a `cairn dev` target (its own children, written to its data dir).
replica_pids() {
    local f
    for f in "$WORK/$1/replicas"/r*.pid; do
        # The files hold a bare number, no newline.
        [ -e "$f" ] && echo "$(<"$f")"
    done
    return 0
}
stop_target() {
    local t=$1 rpids p fd
    [ -n "${PID[$t]:-}" ] || return 0
    rpids=$(replica_pids "$t")
    stop_pid "${PID[$t]}"
    # cairn dev stops its replicas itself (and they die with it: PR_SET_PDEATHSIG); this is
    # only a fallback for replica processes that it started and that outlived it.
    for p in $rpids; do
        if alive "$p" && grep -q "replica" "/proc/$p/cmdline" 2>/dev/null; then
            stop_pid "$p"
        fi
    done
    if [ -n "${FD[$t]:-}" ]; then
        fd=${FD[$t]}
        exec {fd}<&-
        unset "FD[$t]"
    fi
    unset "PID[$t]"
}
cleanup() {
    local t
    for t in "${!PID[@]}"; do stop_target "$t"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_nbd NAME URI PIDFILE: polls until the NBD server answers a handshake for the export
# (and wrote its pid file, if one is given); fails as soon as the process is gone.
wait_nbd() {
    local name=$1 uri=$2 pidfile=${3:-} i
    for ((i = 0; i < 1200; i++)); do
        alive "${PID[$name]}" || die "$name exited during startup (see $WORK/$name.log)"
        if { [ -z "$pidfile" ] || [ -s "$pidfile" ]; } &&
            nbdinfo --size "$uri" >"$WORK/$name.size" 2>/dev/null; then
            [ "$(cat "$WORK/$name.size")" = "$SIZE" ] ||
                die "$name exports $(cat "$WORK/$name.size") bytes, not $SIZE"
            return 0
        fi
        sleep 0.05
    done
    die "$name did not answer on $uri within 60 s (see $WORK/$name.log)"
}

start_qemu() {
    local port=$1 file=$WORK/qemu.img pidfile=$WORK/qemu.pid
    truncate -s "$SIZE" "$file"
    # shellcheck disable=SC2086 # QEMU_NBD_FLAGS is a list of flags
    qemu-nbd -f raw -x vol -b 127.0.0.1 -p "$port" -t --pid-file="$pidfile" \
        $QEMU_NBD_FLAGS "$file" >"$WORK/qemu.log" 2>&1 &
    PID[qemu]=$!
    URI[qemu]=nbd://127.0.0.1:$port/vol
    wait_nbd qemu "${URI[qemu]}" "$pidfile"
    log "qemu-nbd (pid ${PID[qemu]}) serving ${URI[qemu]}"
}

start_nbdkit() {
    local port=$1 file=$WORK/nbdkit.img pidfile=$WORK/nbdkit.pid
    truncate -s "$SIZE" "$file"
    # shellcheck disable=SC2086 # NBDKIT_FLAGS is a list of flags
    nbdkit -f -i 127.0.0.1 -p "$port" -P "$pidfile" $NBDKIT_FLAGS file "$file" \
        >"$WORK/nbdkit.log" 2>&1 &
    PID[nbdkit]=$!
    URI[nbdkit]=nbd://127.0.0.1:$port/
    wait_nbd nbdkit "${URI[nbdkit]}" "$pidfile"
    log "nbdkit (pid ${PID[nbdkit]}) serving ${URI[nbdkit]}"
}

# start_cairn NAME REPLICAS NBD_PORT CONTROL_PORT: `cairn dev` on a fresh data dir; returns
# once it printed its nbd:// line (read through a FIFO, no sleep) and answers a handshake.
start_cairn() {
    local name=$1 n=$2 port=$3 cport=$4 fifo=$WORK/$1.stdout line fd
    mkfifo "$fifo"
    "$CAIRN" --log warn dev --standalone --data-dir "$WORK/$name" --replicas "$n" --size "${SIZE}B" \
        --nbd-listen "127.0.0.1:$port" --control-listen "127.0.0.1:$cport" \
        >"$fifo" 2>"$WORK/$name.log" &
    PID[$name]=$!
    exec {fd}<"$fifo"
    FD[$name]=$fd
    while :; do
        IFS= read -r -t 120 line <&"$fd" || die "$name stopped before printing its nbd:// line (see $WORK/$name.log)"
        case "$line" in nbd://*) break ;; esac
    done
    URI[$name]=$line
    wait_nbd "$name" "$line"
    log "cairn dev --replicas $n (pid ${PID[$name]}, replicas $(replica_pids "$name" | tr '\n' ' ')) serving $line"
}

# snapshot OUT ROLE:PID...: CPU ticks of the whole machine, of this script's finished children
# (fio once it has exited, its threads and io_uring workers included), and of each given
# process (all its threads, dead ones included) with a per-thread breakdown; plus wall time.
snapshot() {
    local out=$1
    shift
    python3 - "$$" "$out" "$@" <<'PY'
import json, os, sys, time
def fields(path):
    s = open(path).read()
    return s[s.rindex(")") + 2:].split(), s[s.index("(") + 1:s.rindex(")")]
parent, out, procs = sys.argv[1], sys.argv[2], sys.argv[3:]
with open("/proc/stat") as f:
    cpu = [int(x) for x in f.readline().split()[1:]]
snap = {
    "time": time.time(),
    "hz": os.sysconf("SC_CLK_TCK"),
    # user + nice + system + irq + softirq
    "machine": cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6],
    "children": (lambda f: int(f[13]) + int(f[14]))(fields(f"/proc/{parent}/stat")[0]),
    "procs": [],
}
for rp in procs:
    role, pid = rp.split(":")
    try:
        f, comm = fields(f"/proc/{pid}/stat")
    except OSError:
        continue
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            tf, tcomm = fields(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        threads[tid] = [tcomm, int(tf[11]) + int(tf[12])]
    snap["procs"].append({"role": role, "pid": int(pid), "comm": comm,
                          "ticks": int(f[11]) + int(f[12]), "threads": threads})
with open(out, "w") as fo:
    json.dump(snap, fo)
PY
}

# ROLE:PID list of a target's server processes.
target_procs() {
    local t=$1 p
    case "$t" in
        raw) ;;
        qemu | nbdkit) echo "server:${PID[$t]}" ;;
        cairn*)
            echo "server:${PID[$t]}"
            for p in $(replica_pids "$t"); do echo "replica:$p"; done
            ;;
    esac
}

# fio_cmd T: the fio arguments that select target T.
fio_target() {
    case "$1" in
        raw) echo "--ioengine=io_uring --direct=0 --filename=$WORK/raw.img --invalidate=0 --fadvise_hint=0" ;;
        *) echo "--ioengine=nbd --uri=${URI[$1]}" ;;
    esac
}

# run_fio T BASE [fio args]: one fio job on target T; fio JSON in BASE.json, CPU snapshots
# around it in BASE.cpu0.json / BASE.cpu1.json.
run_fio() {
    local t=$1 base=$2 procs
    shift 2
    procs=$(target_procs "$t")
    settle
    # shellcheck disable=SC2086 # procs and fio_target are word lists
    snapshot "$base.cpu0.json" $procs
    # shellcheck disable=SC2046
    fio --name="$(basename "$base")" $(fio_target "$t") --size="$SIZE" --numjobs=1 \
        --output-format=json --output="$base.json" "$@" ||
        die "fio failed on $t (see $base.json)"
    # shellcheck disable=SC2086
    snapshot "$base.cpu1.json" $procs
}

# --- preparation --------------------------------------------------------------------------
need=()
command -v fio >/dev/null || need+=(fio)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]} with apt-get"
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v qemu-nbd >/dev/null || die "qemu-nbd is missing (package qemu-utils)"
command -v python3 >/dev/null || die "python3 is needed to write the report"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"

log "building cairn (release)"
(cd "$ROOT" && cargo build --release -p cairn)

rm -rf "$WORK"
mkdir -p "$JSON" "$RESULTS"
FSTYPE=$(df --output=fstype "$WORK" | tail -n 1 | tr -d ' ')
LOAD_START=$(cut -d ' ' -f 1-3 /proc/loadavg)
log "work dir $WORK on $FSTYPE; size $SIZE bytes; ${SECONDS_RUN}s measured after ${RAMP}s ramp; load $LOAD_START"

# Six free loopback ports, taken at once so that they differ.
read -r P_QEMU P_NBDKIT P_C1 P_C1C P_C3 P_C3C <<<"$(python3 -c '
import socket
ss = [socket.socket() for _ in range(6)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))
for s in ss: s.close()')"

for t in $TARGETS; do
    case "$t" in
        raw) truncate -s "$SIZE" "$WORK/raw.img" ;;
        qemu) start_qemu "$P_QEMU" ;;
        nbdkit) start_nbdkit "$P_NBDKIT" ;;
        cairn1) start_cairn cairn1 1 "$P_C1" "$P_C1C" ;;
        cairn3) start_cairn cairn3 3 "$P_C3" "$P_C3C" ;;
    esac
done

# Fill every target once, through its own path (not measured in the tables), so that every
# run overwrites allocated blocks and reads read real data, alike on every target.
for t in $TARGETS; do
    log "prefill: sequential 1 MiB writes, QD8, over the whole of $t"
    run_fio "$t" "$JSON/prefill-$t" --rw=write --bs=1m --iodepth=8
done

# --- runs ---------------------------------------------------------------------------------
for rep in $(seq 1 "$REPEAT"); do
    for w in $WORKLOADS; do
        read -r rw bs qd <<<"$(workload "$w")"
        for t in $TARGETS; do
            log "[$rep/$REPEAT] $w: fio $rw bs=$bs iodepth=$qd on $t"
            run_fio "$t" "$JSON/$w-$t-$rep" --rw="$rw" --bs="$bs" --iodepth="$qd" \
                --norandommap --time_based --runtime="$SECONDS_RUN" --ramp_time="$RAMP" \
                --lat_percentiles=1
            python3 - "$JSON/$w-$t-$rep.json" <<'PY' >&2
import json, sys
t = open(sys.argv[1]).read(); j = json.loads(t[t.index("{"):])["jobs"][0]
s = j["write"] if j["write"]["io_bytes"] else j["read"]
p = s["lat_ns"]["percentile"]
print(f'    {s["iops"]:,.0f} IOPS, {s["bw_bytes"] / 2**20:,.1f} MiB/s, '
      f'latency p50 {p["50.000000"] / 1000:,.1f} us p99 {p["99.000000"] / 1000:,.1f} us')
PY
        done
    done
done
LOAD_END=$(cut -d ' ' -f 1-3 /proc/loadavg)

for t in $TARGETS; do stop_target "$t"; done

# --- report -------------------------------------------------------------------------------
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]; then COMMIT="$COMMIT (with uncommitted changes)"; fi
python3 "$ROOT/bench/volume_report.py" \
    --json-dir "$JSON" \
    --workloads "$WORKLOADS" \
    --targets "$TARGETS" \
    --repeat "$REPEAT" \
    --out "$RESULTS/volume-$STAMP.md" \
    --fact "date (UTC)=$(date -u '+%Y-%m-%d %H:%M:%S')" \
    --fact "commit=$COMMIT" \
    --fact "nproc=$(nproc)" \
    --fact "CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)" \
    --fact "memory=$(free -g | awk '/^Mem:/ { print $2 " GiB" }')" \
    --fact "kernel=$(uname -r)" \
    --fact "work dir filesystem=$FSTYPE ($(df --output=source "$WORK" | tail -n 1)), every target's files under $WORK" \
    --fact "fio=$(fio --version)" \
    --fact "qemu-nbd=$(qemu-nbd --version | head -n 1)" \
    --fact "nbdkit=$(nbdkit --version | head -n 1)" \
    --fact "libnbd (fio's nbd engine)=$(nbdinfo --version 2>/dev/null | sed -n 's/^libnbd //p' | head -n 1)" \
    --fact "raw file=fio --ioengine=io_uring --direct=0 --invalidate=0 --fadvise_hint=0 --filename=raw.img" \
    --fact "qemu-nbd flags=qemu-nbd -f raw -x vol -b 127.0.0.1 -p PORT -t --pid-file=PIDFILE $QEMU_NBD_FLAGS qemu.img" \
    --fact "nbdkit flags=nbdkit -f -i 127.0.0.1 -p PORT -P PIDFILE ${NBDKIT_FLAGS:+$NBDKIT_FLAGS }file nbdkit.img (plugin defaults: cache=default, fadvise=normal)" \
    --fact "cairn flags=cairn --log warn dev --standalone --data-dir DIR --replicas N --size ${SIZE}B --nbd-listen 127.0.0.1:P --control-listen 127.0.0.1:P2 (defaults: --io-engine auto, --io-timeout 5s)" \
    --fact "fio over NBD=--ioengine=nbd --uri=URI --numjobs=1: one NBD connection (fio's nbd engine opens one connection per job), iodepth requests in flight on it" \
    --fact "fio common=--size=$SIZE --norandommap --time_based --runtime=$SECONDS_RUN --ramp_time=$RAMP --lat_percentiles=1" \
    --fact "volume / file size=$SIZE bytes" \
    --fact "measured / ramp=${SECONDS_RUN} s / ${RAMP} s per run, ${REPEAT} repetition(s), medians reported" \
    --fact "buffering=every target through the page cache; no fsync/flush in any run" \
    --fact "cache state=every run starts after writeback and POSIX_FADV_DONTNEED of every file in the work dir (cold, clean page cache); every target filled once beforehand through its own path" \
    --fact "load average at start / end=$LOAD_START / $LOAD_END"
cp "$RESULTS/volume-$STAMP.md" "$RESULTS/volume-latest.md"
log "report: $RESULTS/volume-$STAMP.md (copied to volume-latest.md)"
cat "$RESULTS/volume-latest.md"
