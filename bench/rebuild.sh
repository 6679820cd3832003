#!/usr/bin/env bash
# Rebuild and resync benchmark: how fast `cairn dev` rebuilds a new, empty replica next to a
# plain `cp --sparse=always` (and `dd conv=sparse`) of the same data on the same disk, and
# how much a replica that was down while the volume took writes costs to resync.
#
# Usage: bash bench/rebuild.sh            (see bench/README.md)
#
# Environment (all optional):
#   BENCH_SIZE         volume size, IEC suffix allowed (default 2G)
#   BENCH_FILL         data written before the rebuilds, at random 1 MiB-aligned places
#                      (default 1G)
#   BENCH_REPEAT       repetitions of each measurement; the report gives medians (default 3)
#   BENCH_RESYNC_PCTS  resync rounds, in percent of the volume written while r2 is down
#                      (default "1 10")
#   BENCH_WORK         work directory, wiped at start (default bench/work/rebuild)
#   BENCH_RESULTS      where the report goes (default bench/results)
#
# Needs root: everything after the build runs in a private network namespace (the script
# re-executes itself under `unshare -n`, so the replicas' 127.0.0.x addresses and the
# default ports meet nothing else), and every timed copy starts after
# `sync; echo 3 > /proc/sys/vm/drop_caches`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_SPEC=${BENCH_SIZE:-2G}
FILL_SPEC=${BENCH_FILL:-1G}
REPEAT=${BENCH_REPEAT:-3}
RESYNC_PCTS=${BENCH_RESYNC_PCTS:-"1 10"}
WORK=${BENCH_WORK:-$ROOT/bench/work/rebuild}
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results}

SIZE=$(numfmt --from=iec "${SIZE_SPEC^^}")
FILL=$(numfmt --from=iec "${FILL_SPEC^^}")
CAIRN=$ROOT/target/release/cairn
JSON=$WORK/json
DEV=$WORK/dev
NBD_ADDR=127.0.0.1:10809
# The `cairn volume` commands below use their default endpoint, which is this address.
CONTROL_ADDR=127.0.0.1:10810
URI=nbd://$NBD_ADDR/vol0
REPLICA_IPS=127.0.0.2,127.0.0.3,127.0.0.4
# Where the replica servers this script adds listen.
NEW_IP=127.0.0.9
# Resync rounds write 64 KiB at random 4 KiB-aligned offsets, from a seed of their own
# (fio 3.33 ignores --randseed unless --randrepeat=0).
RESYNC_BS=65536

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

[ $((SIZE % 1048576)) -eq 0 ] || die "BENCH_SIZE must be a multiple of 1 MiB"
[ $((FILL % 1048576)) -eq 0 ] && [ "$FILL" -le "$SIZE" ] ||
    die "BENCH_FILL must be a multiple of 1 MiB, at most BENCH_SIZE"
for p in $RESYNC_PCTS; do
    [[ $p =~ ^[0-9]+$ ]] && [ "$p" -ge 1 ] && [ "$p" -le 100 ] ||
        die "BENCH_RESYNC_PCTS: $p is not a whole percentage"
done

# --- outside the namespace: tools and build, then re-execute inside a private one ---------
if [ "${1:-}" != --in-netns ]; then
    [ "$(id -u)" -eq 0 ] || die "needs root (unshare -n, drop_caches)"
    need=()
    command -v fio >/dev/null || need+=(fio)
    command -v nbdinfo >/dev/null || need+=(libnbd-bin)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]} with apt-get"
        apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    command -v python3 >/dev/null || die "python3 is needed to write the report"
    command -v unshare >/dev/null && command -v ip >/dev/null ||
        die "unshare (util-linux) and ip (iproute2) are needed for the private network namespace"
    fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"

    log "building cairn (release)"
    (cd "$ROOT" && cargo build --release -p cairn)
    log "entering a private network namespace (unshare -n)"
    exec unshare -n -- bash "${BASH_SOURCE[0]}" --in-netns
fi
ip link set lo up

# --- processes we start, and their teardown -----------------------------------------------
declare -A PID ADDR FD
# stop NAME: stops a process this script started (`cairn dev` stops its own replicas, which
# also die with it: PR_SET_PDEATHSIG) and closes the FIFO it printed its first line to.
stop() {
    local name=$1 fd
    [ -n "${PID[$name]:-}" ] || return 0
    stop_pid "${PID[$name]}"
    if [ -n "${FD[$name]:-}" ]; then
        fd=${FD[$name]}
        exec {fd}<&-
        unset "FD[$name]"
    fi
    unset "PID[$name]"
}
cleanup() {
    local n
    for n in "${!PID[@]}"; do stop "$n"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# first_line NAME PATTERN: reads NAME's stdout FIFO until a line matching PATTERN (no sleep)
# and leaves it in LINE.
first_line() {
    local name=$1 pattern=$2
    while :; do
        IFS= read -r -t 120 LINE <&"${FD[$name]}" ||
            die "$name stopped before printing \"$pattern\" (see $WORK/$name.log)"
        # shellcheck disable=SC2053 # PATTERN is a glob
        [[ $LINE == $pattern ]] && return 0
    done
}

# start_dev: `cairn dev`, 3 replicas on 127.0.0.2-4, a fresh data dir; returns once it
# printed its nbd:// line and answers an NBD handshake with the right size.
start_dev() {
    local fifo=$WORK/dev.stdout fd i
    mkfifo "$fifo"
    "$CAIRN" --log info dev --standalone --data-dir "$DEV" --size "${SIZE}B" --replica-ips "$REPLICA_IPS" \
        --nbd-listen "$NBD_ADDR" --control-listen "$CONTROL_ADDR" \
        >"$fifo" 2>"$WORK/dev.log" &
    PID[dev]=$!
    exec {fd}<"$fifo"
    FD[dev]=$fd
    first_line dev 'nbd://*'
    [ "$LINE" = "$URI" ] || die "cairn dev printed $LINE, not $URI"
    for ((i = 0; i < 1200; i++)); do
        alive "${PID[dev]}" || die "cairn dev exited during startup (see $WORK/dev.log)"
        if nbdinfo --size "$URI" >"$WORK/dev.size" 2>/dev/null; then
            [ "$(cat "$WORK/dev.size")" = "$SIZE" ] ||
                die "cairn dev exports $(cat "$WORK/dev.size") bytes, not $SIZE"
            log "cairn dev (pid ${PID[dev]}) serving $URI"
            return 0
        fi
        sleep 0.05
    done
    die "cairn dev did not answer on $URI within 60 s"
}

# start_server NAME: an empty `cairn replica serve` on $NEW_IP, port picked by the kernel;
# returns once it printed "listening on ADDR".
start_server() {
    local name=$1 fifo=$WORK/$1.stdout fd line
    mkfifo "$fifo"
    "$CAIRN" --log warn replica serve --dir "$WORK/$name" --listen "$NEW_IP:0" \
        >"$fifo" 2>"$WORK/$name.log" &
    PID[$name]=$!
    exec {fd}<"$fifo"
    FD[$name]=$fd
    first_line "$name" 'listening on *'
    line=${LINE#listening on }
    ADDR[$name]=${line%% *}
    log "replica server $name (pid ${PID[$name]}) listening on ${ADDR[$name]}"
}

# Writes back everything dirty and drops the whole page cache: each timed copy starts cold.
cold() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

status() { "$CAIRN" --log warn volume status vol0 --json >"$1"; }

# verify WHEN: `cairn volume verify` must report 3 RW replicas with one digest.
verify() {
    local out=$JSON/$1.verify.txt n d
    if ! "$CAIRN" --log warn volume verify vol0 >"$out" 2>&1; then
        cat "$out" >&2
        die "cairn volume verify failed after $1 (see $out)"
    fi
    n=$(grep -cE '^r[0-9]+ ' "$out" || true)
    d=$(awk '/^r[0-9]+ / { print $2 }' "$out" | sort -u | wc -l)
    if [ "$n" -ne 3 ] || [ "$d" -ne 1 ]; then
        cat "$out" >&2
        die "after $1: $n replicas verified, $d distinct digests (want 3 and 1)"
    fi
    log "verify after $1: 3 RW replicas, digest $(awk '/^r[0-9]+ / { print substr($2, 1, 16); exit }' "$out")..."
}

# job_check STATUS REPLICA KIND: the replica is RW and its last job is KIND and done.
job_check() {
    python3 - "$@" <<'PY' || die "$(cat "$1.problem" 2>/dev/null || echo "cannot check $1")"
import json, sys
path, rid, kind = sys.argv[1:]
v = json.load(open(path))
r = next((r for r in v["replicas"] if r["id"] == rid), None)
j = (r or {}).get("rebuild") or {}
problem = None
if r is None:
    problem = f"no replica {rid} in the status ({path})"
elif r["mode"] != "RW" or j.get("kind") != kind or j.get("state") != "done":
    problem = (f"{rid}: mode {r['mode']}, job kind {j.get('kind')} state {j.get('state')} "
               f"error {j.get('error')} (want RW, {kind}, done; see {path})")
else:
    missing = [k for k in ("bytes_total", "bytes_done", "bytes_copied", "rate_bytes_per_sec",
                           "elapsed_ms", "started_unix_ms", "source", "phase") if k not in j]
    if "last_resync_bytes" not in r:
        missing.append("last_resync_bytes")
    if missing:
        problem = f"{rid}: the status lacks {', '.join(missing)} ({path})"
if problem:
    open(path + ".problem", "w").write(problem)
    sys.exit(1)
PY
}

# cpu_mark: JSON of the busy CPU ticks (user + nice + system + irq + softirq) of the whole
# machine, of this script's finished children (cp, dd, the cairn CLI), and of every Cairn
# server process (cairn dev, its replicas, the added servers), with the time: two marks
# around a timed step tell what else kept the machine busy meanwhile.
cpu_mark() {
    local pids=() f
    for f in "$DEV"/replicas/r*.pid; do
        # The files hold a bare number, no newline.
        [ -e "$f" ] && pids+=("$(<"$f")")
    done
    python3 - "$$" "${PID[@]}" "${pids[@]}" <<'PY'
import json, os, sys, time
def ticks(pid, first):
    try:
        s = open(f"/proc/{pid}/stat").read()
    except OSError:
        return 0
    f = s[s.rindex(")") + 2:].split()
    return int(f[first]) + int(f[first + 1])
with open("/proc/stat") as f:
    cpu = [int(x) for x in f.readline().split()[1:]]
print(json.dumps({
    "time": time.time(), "hz": os.sysconf("SC_CLK_TCK"),
    "machine": cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6],
    "children": ticks(sys.argv[1], 13),
    "cairn": sum(ticks(p, 11) for p in set(sys.argv[2:])),
}))
PY
}

# alloc FILE: bytes allocated to FILE on disk.
alloc() { echo $(($(stat -c '%b * %B' "$1"))); }

# --- preparation --------------------------------------------------------------------------
rm -rf "$WORK"
mkdir -p "$JSON" "$RESULTS"
FSTYPE=$(df --output=fstype "$WORK" | tail -n 1 | tr -d ' ')
LOAD_START=$(cut -d ' ' -f 1-3 /proc/loadavg)
log "work dir $WORK on $FSTYPE; volume $SIZE bytes, $FILL written; $REPEAT repetitions; load $LOAD_START"

start_dev
log "fill: $FILL bytes of random data at random 1 MiB-aligned places (each written once), then a flush"
fio --name=fill --ioengine=nbd --uri="$URI" --rw=randwrite --bs=1m --iodepth=8 --numjobs=1 \
    --size="$SIZE" --io_size="$FILL" --refill_buffers --end_fsync=1 \
    --output-format=json --output="$JSON/fill.json" || die "fio fill failed (see $JSON/fill.json)"
verify fill
SRC=$(find "$DEV/replicas/r1/vol0/r1/layers" -name '*.data' | sort | tail -n 1)
[ -n "$SRC" ] || die "no head data file under $DEV/replicas/r1/vol0/r1/layers"
log "r1's head data file: $SRC ($(alloc "$SRC") bytes allocated)"

# --- 1. full rebuild of an empty replica, against cp and dd of r1's head file -------------
prev=r3
prev_server=
for rep in $(seq 1 "$REPEAT"); do
    name=new$rep
    start_server "$name"
    # Keep three replicas: the new one replaces the last one (r3, then the previous new one).
    "$CAIRN" --log warn volume replica remove vol0 "$prev" >"$JSON/rebuild-$rep.remove.txt"
    if [ -n "$prev_server" ]; then
        stop "$prev_server"
        rm -rf "${WORK:?}/$prev_server"
    fi
    cold
    log "[$rep/$REPEAT] rebuild: replica add vol0 --address ${ADDR[$name]} --wait (replaces $prev)"
    cpu_mark >"$JSON/rebuild-$rep.cpu0.json"
    t0=$EPOCHREALTIME
    "$CAIRN" --log warn volume replica add vol0 --address "${ADDR[$name]}" --wait \
        >"$JSON/rebuild-$rep.add.txt" 2>"$JSON/rebuild-$rep.add.err" ||
        die "replica add failed (see $JSON/rebuild-$rep.add.txt, .add.err and $WORK/dev.log)"
    t1=$EPOCHREALTIME
    cpu_mark >"$JSON/rebuild-$rep.cpu1.json"
    id=$(head -n 1 "$JSON/rebuild-$rep.add.txt")
    [[ $id =~ ^r[0-9]+$ ]] || die "replica add printed \"$id\" instead of the new replica's id"
    status "$JSON/rebuild-$rep.status.json"
    job_check "$JSON/rebuild-$rep.status.json" "$id" rebuild
    printf '{"start": %s, "end": %s, "id": "%s", "addr": "%s", "replaced": "%s"}\n' \
        "$t0" "$t1" "$id" "${ADDR[$name]}" "$prev" >"$JSON/rebuild-$rep.time.json"
    verify "rebuild-$rep"
    python3 - "$JSON/rebuild-$rep.status.json" "$id" "$t0" "$t1" <<'PY' >&2
import json, sys
v = json.load(open(sys.argv[1])); rid = sys.argv[2]; wall = float(sys.argv[4]) - float(sys.argv[3])
r = next(r for r in v["replicas"] if r["id"] == rid); j = r["rebuild"]
print(f'    {rid}: {r["last_resync_bytes"]:,} bytes in {wall:.2f} s wall = '
      f'{r["last_resync_bytes"] / wall / 1e6:,.0f} MB/s; job {j["elapsed_ms"]} ms, '
      f'{j["rate_bytes_per_sec"] / 1e6:,.0f} MB/s, from {j["source"]}')
PY
    prev=$id
    prev_server=$name

    for tool in cp dd; do
        dst=$WORK/$tool.data
        rm -f "$dst"
        cold
        cpu_mark >"$JSON/$tool-$rep.cpu0.json"
        t0=$EPOCHREALTIME
        case $tool in
            cp) cp --sparse=always "$SRC" "$dst" ;;
            dd) dd if="$SRC" of="$dst" bs=1M conv=sparse status=none ;;
        esac
        t1=$EPOCHREALTIME
        # `sync FILE` is fsync(FILE): the rebuild also ends with a flush of the new replica.
        sync "$dst"
        t2=$EPOCHREALTIME
        cpu_mark >"$JSON/$tool-$rep.cpu1.json"
        printf '{"start": %s, "copied": %s, "synced": %s, "src_alloc": %s, "dst_alloc": %s}\n' \
            "$t0" "$t1" "$t2" "$(alloc "$SRC")" "$(alloc "$dst")" >"$JSON/$tool-$rep.json"
        cmp -s "$SRC" "$dst" || die "$tool made a copy that differs from $SRC"
        python3 -c 'import sys; a, b, c, n = map(float, sys.argv[2:]); print(
            f"    {sys.argv[1]}: {n:,.0f} bytes in {c - a:.2f} s with fsync ({b - a:.2f} s without) "
            f"= {n / (c - a) / 1e6:,.0f} MB/s")' "$tool" "$t0" "$t1" "$t2" "$(alloc "$dst")" >&2
        rm -f "$dst"
    done
done

# --- 2. resync of r2 after it was killed while the volume took writes ---------------------
# The kill happens in fio's exec_prerun: after fio connected, right before its first write,
# so every write of the round goes out while r2's process is dead. `cairn dev` starts r2
# again after its restart backoff (1 s, doubling when the process dies again within a
# minute of its start); each round first waits until r2 has run a minute, so that every
# outage gets the same 1 s backoff.
R2PID_FILE=$DEV/replicas/r2.pid
printf '#!/bin/sh\n# kill-r2.sh PID OUT: writes the time, then SIGKILLs PID.\ndate +%%s.%%N >"$2"\nkill -9 "$1"\n' \
    >"$WORK/kill-r2.sh"
for rep in $(seq 1 "$REPEAT"); do
    for pct in $RESYNC_PCTS; do
        base=resync-$pct-$rep
        bytes=$((SIZE * pct / 100 / RESYNC_BS * RESYNC_BS))
        age=$(($(date +%s) - $(stat -c %Y "$R2PID_FILE")))
        if [ "$age" -lt 62 ]; then
            log "waiting $((62 - age)) s until r2 has run a minute (restart backoff back to 1 s)"
            sleep $((62 - age))
        fi
        r2pid=$(<"$R2PID_FILE")
        cold
        log "[$rep/$REPEAT] resync $pct %: kill -9 r2 (pid $r2pid), then $bytes bytes of 64 KiB random writes, QD32"
        (cd "$JSON" && fio --name="$base" --ioengine=nbd --uri="$URI" --rw=randwrite \
            --bs="$RESYNC_BS" --blockalign=4k --iodepth=32 --numjobs=1 --size="$SIZE" \
            --io_size="$bytes" --norandommap --randrepeat=0 --randseed=$((rep * 1000 + pct)) \
            --exec_prerun="sh $WORK/kill-r2.sh $r2pid $JSON/$base.kill" \
            --write_lat_log="$JSON/$base" --log_offset=1 --log_unix_epoch=1 --per_job_logs=0 \
            --output-format=json --output="$JSON/$base.fio.json") ||
            die "fio failed in $base (see $JSON/$base.fio.json)"
        [ -s "$JSON/$base.kill" ] || die "fio's exec_prerun did not run the kill ($JSON/$base.prerun.txt)"
        ! alive "$r2pid" || die "r2 (pid $r2pid) survived kill -9"
        status "$JSON/$base.status-written.json"
        "$CAIRN" --log warn volume rebuild wait vol0 r2 --timeout 10m \
            >"$JSON/$base.wait.txt" 2>"$JSON/$base.wait.err" ||
            die "r2 did not come back RW (see $JSON/$base.wait.txt and $WORK/dev.log)"
        status "$JSON/$base.status.json"
        job_check "$JSON/$base.status.json" r2 resync
        verify "$base"
        python3 - "$JSON/$base.status.json" "$JSON/$base.kill" "$bytes" <<'PY' >&2
import json, sys
v = json.load(open(sys.argv[1])); kill_ms = float(open(sys.argv[2]).read()) * 1000
r = next(r for r in v["replicas"] if r["id"] == "r2"); j = r["rebuild"]
print(f'    r2 back {j["started_unix_ms"] - kill_ms:,.0f} ms after the kill; resynced '
      f'{r["last_resync_bytes"]:,} bytes ({r["last_resync_bytes"] / int(sys.argv[3]):.2f}x the '
      f'{int(sys.argv[3]):,} written) in {j["elapsed_ms"]} ms')
PY
    done
done
LOAD_END=$(cut -d ' ' -f 1-3 /proc/loadavg)
cp "$WORK/dev.log" "$JSON/dev.log"
stop dev
cleanup

# --- report -------------------------------------------------------------------------------
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]; then COMMIT="$COMMIT (with uncommitted changes)"; fi
python3 "$ROOT/bench/rebuild_report.py" \
    --json-dir "$JSON" \
    --repeat "$REPEAT" \
    --pcts "$RESYNC_PCTS" \
    --size "$SIZE" \
    --out "$RESULTS/rebuild-$STAMP.md" \
    --json-out "$RESULTS/rebuild-$STAMP.json" \
    --fact "date (UTC)=$(date -u '+%Y-%m-%d %H:%M:%S')" \
    --fact "commit=$COMMIT" \
    --fact "nproc=$(nproc)" \
    --fact "CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)" \
    --fact "memory=$(free -g | awk '/^Mem:/ { print $2 " GiB" }')" \
    --fact "kernel=$(uname -r)" \
    --fact "work dir filesystem=$FSTYPE ($(df --output=source "$WORK" | tail -n 1)); replicas, new servers and cp/dd copies all under $WORK" \
    --fact "fio=$(fio --version)" \
    --fact "libnbd (fio's nbd engine)=$(nbdinfo --version 2>/dev/null | sed -n 's/^libnbd //p' | head -n 1)" \
    --fact "cp=$(cp --version | head -n 1) (with --sparse=always it reads and writes 128 KiB at a time and skips holes with SEEK_DATA/SEEK_HOLE)" \
    --fact "dd=$(dd --version | head -n 1)" \
    --fact "network=a private network namespace (unshare -n, lo up): NBD $NBD_ADDR, control $CONTROL_ADDR, replicas $REPLICA_IPS, added replica servers $NEW_IP" \
    --fact "cairn dev=cairn --log info dev --data-dir DIR --size ${SIZE}B --replica-ips $REPLICA_IPS --nbd-listen $NBD_ADDR --control-listen $CONTROL_ADDR (defaults: --rebuild-rate 0, --resync-window 10m, --io-timeout 5s, --flush-interval 2s)" \
    --fact "fill=fio --ioengine=nbd --rw=randwrite --bs=1m --iodepth=8 --size=$SIZE --io_size=$FILL --refill_buffers --end_fsync=1 (random map: each 1 MiB block at most once)" \
    --fact "rebuild=cairn replica serve --dir NEW --listen $NEW_IP:0; cairn volume replica remove vol0 PREVIOUS; sync; echo 3 > /proc/sys/vm/drop_caches; time cairn volume replica add vol0 --address ADDR --wait" \
    --fact "cp=sync; echo 3 > /proc/sys/vm/drop_caches; time { cp --sparse=always r1/layers/HEAD.data DST; sync DST; }" \
    --fact "dd=sync; echo 3 > /proc/sys/vm/drop_caches; time { dd if=r1/layers/HEAD.data of=DST bs=1M conv=sparse; sync DST; }" \
    --fact "resync round=wait until r2 ran 60 s; sync; echo 3 > /proc/sys/vm/drop_caches; fio --ioengine=nbd --rw=randwrite --bs=64k --blockalign=4k --iodepth=32 --size=$SIZE --io_size=PCT% --norandommap --randrepeat=0 --randseed=1000*REP+PCT --exec_prerun='kill -9 R2PID'; cairn volume rebuild wait vol0 r2" \
    --fact "repetitions=$REPEAT of each measurement, medians reported" \
    --fact "load average at start / end=$LOAD_START / $LOAD_END"
cp "$RESULTS/rebuild-$STAMP.md" "$RESULTS/rebuild-latest.md"
cp "$RESULTS/rebuild-$STAMP.json" "$RESULTS/rebuild-latest.json"
log "report: $RESULTS/rebuild-$STAMP.md (copied to rebuild-latest.md)"
cat "$RESULTS/rebuild-latest.md"
