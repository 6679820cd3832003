#!/usr/bin/env bash
# Replica server benchmark: fio (io_uring) on a plain file against `cairn replica serve`
# driven by cairn-loadgen, with and without checksums, on the same filesystem in one run.
#
# Usage: bash bench/replica.sh            (see bench/README.md)
#
# Environment (all optional):
#   BENCH_SIZE       volume and file size, IEC suffix allowed (default 1G)
#   BENCH_SECONDS    measured seconds per run (default 10)
#   BENCH_RAMP       unmeasured seconds before each run (default 2)
#   BENCH_REPEAT     repetitions of the whole set of runs; the report gives medians (default 3)
#   BENCH_WORKLOADS  which workloads, space separated (default: all of
#                    "rw4k-qd1 rw4k-qd32 sw1m-qd8 rr4k-qd32")
#   BENCH_WORK       work directory, wiped at start (default bench/work/replica)
#   BENCH_RESULTS    where the report goes (default bench/results)
#
# Both sides are buffered (page cache): fio runs with direct=0 and the replica server writes
# through the page cache. Neither side flushes or fsyncs during a run. Before every run, all
# dirty data is written back and the page cache of every file in the work dir is dropped, so
# each run starts from the same cold, clean cache (see bench/README.md for why).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_SPEC=${BENCH_SIZE:-1G}
SECONDS_RUN=${BENCH_SECONDS:-10}
RAMP=${BENCH_RAMP:-2}
REPEAT=${BENCH_REPEAT:-3}
WORKLOADS=${BENCH_WORKLOADS:-"rw4k-qd1 rw4k-qd32 sw1m-qd8 rr4k-qd32"}
WORK=${BENCH_WORK:-$ROOT/bench/work/replica}
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results}

SIZE=$(numfmt --from=iec "${SIZE_SPEC^^}")
CAIRN=$ROOT/target/release/cairn
LOADGEN=$ROOT/target/release/cairn-loadgen
RAW=$WORK/raw.img
CLK_TCK=$(getconf CLK_TCK)

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

# name -> "fio_rw loadgen_pattern bs qd"
workload() {
    case "$1" in
        rw4k-qd1) echo "randwrite randwrite 4096 1" ;;
        rw4k-qd32) echo "randwrite randwrite 4096 32" ;;
        sw1m-qd8) echo "write seqwrite 1048576 8" ;;
        rr4k-qd32) echo "randread randread 4096 32" ;;
        *) die "unknown workload $1 (known: rw4k-qd1 rw4k-qd32 sw1m-qd8 rr4k-qd32)" ;;
    esac
}
for w in $WORKLOADS; do workload "$w" >/dev/null; done

# --- servers we start, and their teardown --------------------------------------------------
declare -A SERVER_PID SERVER_ADDR SERVER_FD
cleanup() {
    local name pid
    for name in "${!SERVER_PID[@]}"; do
        pid=${SERVER_PID[$name]}
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server NAME DIR [extra flags]: starts `cairn replica serve` on a free loopback port
# and returns once it printed "listening on ADDR" (read through a FIFO: no polling, no sleep).
start_server() {
    local name=$1 dir=$2 fifo line fd
    shift 2
    fifo=$WORK/$name.stdout
    mkfifo "$fifo"
    "$CAIRN" --log warn replica serve --dir "$dir" --listen 127.0.0.1:0 "$@" \
        >"$fifo" 2>"$WORK/$name.log" &
    SERVER_PID[$name]=$!
    exec {fd}<"$fifo"
    SERVER_FD[$name]=$fd
    if ! IFS= read -r -t 120 line <&"$fd"; then
        die "server $name did not report listening (see $WORK/$name.log)"
    fi
    case "$line" in
        "listening on "*) ;;
        *) die "server $name printed \"$line\" instead of \"listening on ...\"" ;;
    esac
    line=${line#listening on }
    SERVER_ADDR[$name]=${line%% *}
    SERVER_IO=${line#* (io: }; SERVER_IO=${SERVER_IO%)}
    log "server $name (pid ${SERVER_PID[$name]}) listening on ${SERVER_ADDR[$name]} $SERVER_IO"
}

stop_server() {
    local name=$1 pid=${SERVER_PID[$1]} fd=${SERVER_FD[$1]}
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    exec {fd}<&-
    unset "SERVER_PID[$name]"
}

# Busy CPU ticks of the whole machine (user, nice, system, irq, softirq).
machine_ticks() {
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat
}

# CPU ticks (user + system, every thread that ever ran) of a process.
cpu_ticks() {
    local stat rest
    stat=$(<"/proc/$1/stat")
    rest=${stat##*) }
    # After "pid (comm) ", utime and stime are fields 12 and 13.
    awk '{ print $12 + $13 }' <<<"$rest"
}

# CPU ticks of this script's finished children (cutime + cstime): the whole CPU cost of a
# foreground fio or cairn-loadgen once it has exited, its threads and io_uring workers included.
children_ticks() {
    local stat rest
    stat=$(<"/proc/$$/stat")
    rest=${stat##*) }
    awk '{ print $14 + $15 }' <<<"$rest"
}

# --- preparation --------------------------------------------------------------------------
if ! command -v fio >/dev/null; then
    log "fio missing: installing it with apt-get"
    apt-get update -qq && apt-get install -y -qq fio >/dev/null
fi
command -v python3 >/dev/null || die "python3 is needed to write the report"

log "building release binaries"
(cd "$ROOT" && cargo build --release -p cairn -p cairn-loadgen)

rm -rf "$WORK"
mkdir -p "$WORK/json" "$RESULTS"
FSTYPE=$(df --output=fstype "$WORK" | tail -n 1 | tr -d ' ')
log "work dir $WORK on $FSTYPE; size $SIZE bytes; ${SECONDS_RUN}s measured after ${RAMP}s ramp"

start_server ck "$WORK/replica-ck"
start_server nock "$WORK/replica-nock" --no-checksums

# Fill the file and both replicas once (not measured), so that every run overwrites
# allocated blocks and reads read real data, the same on both sides.
log "prefill: fio sequential 1 MiB writes over $RAW"
fio --name=prefill --filename="$RAW" --size="$SIZE" --ioengine=io_uring --direct=0 \
    --rw=write --bs=1m --iodepth=8 --output-format=json --output="$WORK/json/prefill-raw.json"
for t in ck nock; do
    log "prefill: cairn-loadgen fill on replica $t"
    "$LOADGEN" --addr "${SERVER_ADDR[$t]}" --size "$SIZE" --pattern fill --bs 1m --qd 8 \
        >"$WORK/json/prefill-$t.json"
done

# --- runs ---------------------------------------------------------------------------------
# run_target W T REP: one measured run of workload W on target T (raw, ck or nock).
run_target() {
    local w=$1 t=$2 rep=$3 fio_rw pattern bs qd pid t0 t1 m0 m1 c0 c1 w0 w1 base
    read -r fio_rw pattern bs qd <<<"$(workload "$w")"
    base=$WORK/json/$w-$t-$rep
    settle
    m0=$(machine_ticks)
    c0=$(children_ticks)
    w0=$(date +%s.%N)
    if [ "$t" = raw ]; then
        log "[$rep/$REPEAT] $w: fio $fio_rw bs=$bs iodepth=$qd on the raw file"
        fio --name="$w" --filename="$RAW" --size="$SIZE" --ioengine=io_uring --direct=0 \
            --rw="$fio_rw" --bs="$bs" --iodepth="$qd" --norandommap --invalidate=0 \
            --fadvise_hint=0 --time_based --runtime="$SECONDS_RUN" --ramp_time="$RAMP" \
            --lat_percentiles=1 --output-format=json --output="$base.json"
    else
        log "[$rep/$REPEAT] $w: cairn-loadgen $pattern bs=$bs qd=$qd on replica $t"
        pid=${SERVER_PID[$t]}
        t0=$(cpu_ticks "$pid")
        "$LOADGEN" --addr "${SERVER_ADDR[$t]}" --size "$SIZE" --pattern "$pattern" --bs "$bs" \
            --qd "$qd" --seconds "$SECONDS_RUN" --ramp "$RAMP" >"$base.json"
        t1=$(cpu_ticks "$pid")
        # Server CPU over the whole loadgen run (ramp included).
        awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" \
            'BEGIN { printf "{\"server_cpu_s\":%.3f}\n", (b - a) / hz }' >"$base.server.json"
        cat "$base.json" >&2
    fi
    w1=$(date +%s.%N)
    c1=$(children_ticks)
    m1=$(machine_ticks)
    # The client's whole CPU (fio or loadgen, ramp included) and the whole machine's over the
    # run: the difference shows when something else was running too.
    awk -v a="$m0" -v b="$m1" -v c="$c0" -v d="$c1" -v hz="$CLK_TCK" -v w0="$w0" -v w1="$w1" \
        'BEGIN { printf "{\"machine_busy_s\":%.3f,\"client_cpu_s\":%.3f,\"wall_s\":%.3f}\n",
                 (b - a) / hz, (d - c) / hz, w1 - w0 }' >"$base.machine.json"
}

for rep in $(seq 1 "$REPEAT"); do
    for w in $WORKLOADS; do
        for t in raw ck nock; do
            run_target "$w" "$t" "$rep"
        done
    done
done

stop_server ck
stop_server nock

# --- report -------------------------------------------------------------------------------
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]; then COMMIT="$COMMIT (with uncommitted changes)"; fi
python3 "$ROOT/bench/replica_report.py" \
    --json-dir "$WORK/json" \
    --workloads "$WORKLOADS" \
    --repeat "$REPEAT" \
    --out "$RESULTS/replica-$STAMP.md" \
    --fact "date (UTC)=$(date -u '+%Y-%m-%d %H:%M:%S')" \
    --fact "commit=$COMMIT" \
    --fact "nproc=$(nproc)" \
    --fact "CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)" \
    --fact "memory=$(free -g | awk '/^Mem:/ { print $2 " GiB" }')" \
    --fact "kernel=$(uname -r)" \
    --fact "work dir filesystem=$FSTYPE ($(df --output=source "$WORK" | tail -n 1))" \
    --fact "fio=$(fio --version)" \
    --fact "replica server I/O backend=$SERVER_IO" \
    --fact "volume / file size=$SIZE bytes" \
    --fact "measured / ramp=${SECONDS_RUN} s / ${RAMP} s per run, ${REPEAT} repetition(s), medians reported" \
    --fact "buffering=both buffered: fio direct=0, replica server through the page cache; no fsync in any run" \
    --fact "cache state=every run starts after writeback and POSIX_FADV_DONTNEED of every file (cold, clean page cache); file and replicas were filled once beforehand" \
    --fact "load average at the end=$(cut -d ' ' -f 1-3 /proc/loadavg)"
cp "$RESULTS/replica-$STAMP.md" "$RESULTS/replica-latest.md"
log "report: $RESULTS/replica-$STAMP.md (copied to replica-latest.md)"
cat "$RESULTS/replica-latest.md"
