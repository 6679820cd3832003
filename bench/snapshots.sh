#!/usr/bin/env bash
# Snapshot benchmarks of `cairn dev` (1 meta member, 3 agents, 3 replicas per volume):
#   1. pause: `cairn snapshot create` repeated under fio 4 KiB randwrite load on vol0; the
#      engine's pause (new writes held: drain, SnapshotCreate on every replica, resume)
#      p50/p99, the CLI's wall time, and fio's write IOPS / latency with and without them;
#   2. layers: a volume filled with data, then BENCH_LAYERS rounds of "write 1/LAYERS of the
#      volume (a 64 KiB stripe), take a snapshot": the time of those creates (1,000 on one
#      volume by default), and 4 KiB random reads (fio, nbd engine) at 0, 100 and LAYERS
#      snapshots beside the same reads on a volume with the same data and no snapshot.
#
# Usage: bash bench/snapshots.sh            (see bench/README.md)
#
# Environment (all optional):
#   BENCH_PAUSE_SNAPS  snapshots taken under load (default 50)
#   BENCH_LAYERS       snapshots on the layered volume (default 1000; read points at 0, 100
#                      and this)
#   BENCH_SECONDS      measured seconds per read run (default 10)
#   BENCH_REPEAT       read runs per volume, point and queue depth, plain and layered
#                      alternating; the report takes the median (default 3)
#   BENCH_REGION       size of the layered and plain volumes (default 256MiB)
#   BENCH_WORK         work directory, wiped at start, removed at the end
#                      (default bench/work/snapshots)
#   BENCH_RESULTS      where the report goes (default bench/results)
#
# Needs root: everything after the build runs in a private network namespace (the nodes
# listen on 127.0.0.2.. and the default ports); page caches are dropped before read runs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PAUSE_SNAPS=${BENCH_PAUSE_SNAPS:-50}
LAYERS=${BENCH_LAYERS:-1000}
SECONDS_RUN=${BENCH_SECONDS:-10}
REPEAT=${BENCH_REPEAT:-3}
REGION_SPEC=${BENCH_REGION:-256MiB}
WORK=${BENCH_WORK:-$ROOT/bench/work/snapshots}
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results}

CAIRN=$ROOT/target/release/cairn
JSON=$WORK/json
NBD_ADDR=127.0.0.1:10809
CONTROL_ADDR=127.0.0.1:10810
URI=nbd://$NBD_ADDR/vol0
VOL0_SIZE=1GiB
LOAD_SIZE=512M

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

[ "$LAYERS" -ge 100 ] || die "BENCH_LAYERS must be at least 100"

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
    command -v python3 >/dev/null || die "python3 is needed for the driver and the report"
    command -v unshare >/dev/null && command -v ip >/dev/null ||
        die "unshare (util-linux) and ip (iproute2) are needed"
    fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
    log "building cairn (release)"
    (cd "$ROOT" && cargo build --release -p cairn)
    log "entering a private network namespace (unshare -n)"
    exec unshare -n -- bash "${BASH_SOURCE[0]}" --in-netns
fi
ip link set lo up

DEV_PID=
DEV_FD=
FIO_PID=
stop_dev() {
    local i
    if [ -n "$FIO_PID" ]; then
        kill -KILL "$FIO_PID" 2>/dev/null || true
        wait "$FIO_PID" 2>/dev/null || true
        FIO_PID=
    fi
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
}
cleanup() {
    stop_dev
    [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_dev DIR ARGS...: `cairn dev` on a fresh data dir; returns once it printed its nbd://
# line and answers an NBD handshake.
start_dev() {
    local dir=$1 fifo=$WORK/dev.stdout line i
    shift
    rm -rf "$dir" "$fifo"
    mkfifo "$fifo"
    "$CAIRN" --log info dev --data-dir "$dir" --nbd-listen "$NBD_ADDR" \
        --control-listen "$CONTROL_ADDR" "$@" >"$fifo" 2>"$WORK/dev.log" &
    DEV_PID=$!
    exec {DEV_FD}<"$fifo"
    while :; do
        IFS= read -r -t 180 line <&"$DEV_FD" ||
            die "cairn dev stopped before printing its nbd:// line (see $WORK/dev.log)"
        [[ $line == nbd://* ]] && break
    done
    [ "$line" = "$URI" ] || die "cairn dev printed $line, not $URI"
    for ((i = 0; i < 1200; i++)); do
        alive "$DEV_PID" || die "cairn dev exited during startup (see $WORK/dev.log)"
        nbdinfo --size "$URI" >/dev/null 2>&1 && {
            log "cairn dev (pid $DEV_PID) serving $URI"
            return 0
        }
        sleep 0.05
    done
    die "cairn dev did not answer on $URI within 60 s"
}

cold() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# randread VOLUME LABEL QD: 4 KiB random reads over the whole volume, 2 s ramp.
randread() {
    local vol=$1 label=$2 qd=$3
    cold
    fio --name="$label" --ioengine=nbd --uri="nbd://$NBD_ADDR/$vol" --rw=randread --bs=4k \
        --iodepth="$qd" --numjobs=1 --norandommap --randrepeat=0 --time_based \
        --ramp_time=2 --runtime="$SECONDS_RUN" \
        --output-format=json --output="$JSON/read-$label.json" ||
        die "fio $label failed (see $JSON/read-$label.json)"
    log "[layers] read $label done"
}

rm -rf "$WORK"
mkdir -p "$JSON" "$RESULTS"
FSTYPE=$(df --output=fstype "$WORK" | tail -n 1 | tr -d ' ')
LOAD_START=$(cut -d ' ' -f 1-3 /proc/loadavg)
log "work dir $WORK on $FSTYPE; load $LOAD_START"

start_dev "$WORK/data" --nodes 3 --replicas 3 --size "$VOL0_SIZE"

# --- 1. pause under randwrite load ---------------------------------------------------------
log "[pause] fill $LOAD_SIZE of vol0, then 10 s of 4 KiB randwrite QD16 without snapshots"
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 --size="$LOAD_SIZE" \
    --refill_buffers --end_fsync=1 --output-format=json --output="$JSON/pause-fill.json" ||
    die "fio fill failed"
LOAD_ARGS=(--ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 --numjobs=1
    --size="$LOAD_SIZE" --norandommap --randrepeat=0 --time_based --refill_buffers)
fio --name=base "${LOAD_ARGS[@]}" --runtime=10 \
    --output-format=json --output="$JSON/pause-base.json" || die "fio base load failed"
# Long enough for every snapshot; stopped (SIGINT: fio writes its report) once they are done.
log "[pause] randwrite load with $PAUSE_SNAPS snapshots, one every 0.2 s after 3 s"
fio --name=load "${LOAD_ARGS[@]}" --runtime=600 \
    --output-format=json --output="$JSON/pause-load.json" &
FIO_PID=$!
sleep 3
: >"$JSON/pause.jsonl"
for ((i = 0; i < PAUSE_SNAPS; i++)); do
    alive "$FIO_PID" || die "fio stopped during the snapshots"
    t0=$(date +%s%N)
    out=$("$CAIRN" --log warn snapshot create vol0 "p$i" --json) || die "snapshot p$i failed"
    t1=$(date +%s%N)
    printf '{"cli_ns": %s, "reply": %s}\n' "$((t1 - t0))" "$(tr -d '\n' <<<"$out")" \
        >>"$JSON/pause.jsonl"
    sleep 0.2
done
# fio exits 128 after SIGINT; its report says whether the job itself failed.
kill -INT "$FIO_PID"
wait "$FIO_PID" || true
FIO_PID=
python3 -c 'import json, sys
t = open(sys.argv[1]).read()
sys.exit(json.loads(t[t.find("{"):])["jobs"][0]["error"] != 0)' "$JSON/pause-load.json" ||
    die "fio load failed (see $JSON/pause-load.json)"
"$CAIRN" --log warn volume verify vol0 >"$JSON/pause-verify.txt" 2>&1 ||
    die "replicas differ after the pause run (see $JSON/pause-verify.txt)"
log "[pause] done; replicas verified identical"

# --- 2. layers: create time and reads ------------------------------------------------------
for v in layered plain; do
    "$CAIRN" --log warn volume create "$v" --size "$REGION_SPEC" --replicas 3 >/dev/null
    "$CAIRN" --log warn volume attach "$v" --node node-1 >/dev/null
    fio --name="fill-$v" --ioengine=nbd --uri="nbd://$NBD_ADDR/$v" --rw=write --bs=1m \
        --iodepth=8 --refill_buffers --end_fsync=1 \
        --output-format=json --output="$JSON/fill-$v.json" || die "fio fill $v failed"
done
log "[layers] layered and plain filled ($REGION_SPEC each); reads at 0 snapshots"
read_point() {
    local n=$1 r qd
    for ((r = 1; r <= REPEAT; r++)); do
        for qd in 1 16; do
            randread plain "plain-$n-qd$qd-r$r" "$qd"
            randread layered "layered-$n-qd$qd-r$r" "$qd"
        done
    done
}
read_point 0

# The driver: one NBD connection; round k writes the 64 KiB chunks j with j % LAYERS == k
# (so after LAYERS rounds the newest copy of every chunk is in one of LAYERS layers), flushes
# and runs `cairn snapshot create layered lNNNN --json`, timing it.
layers_rounds() {
    python3 - "$CAIRN" "$NBD_ADDR" "$1" "$2" "$LAYERS" "$JSON/layers.jsonl" <<'PY'
import json, os, socket, struct, subprocess, sys, time
cairn, addr, first, end, layers, out = sys.argv[1:]
first, end, layers = int(first), int(end), int(layers)
host, port = addr.rsplit(":", 1)
s = socket.create_connection((host, int(port)))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def rx(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("NBD connection closed")
        b += c
    return b
magic, opt, hs = struct.unpack(">QQH", rx(18))
assert magic == 0x4E42444D41474943 and opt == 0x49484156454F5054 and hs & 1
s.sendall(struct.pack(">I", 1 | (hs & 2)))
name = b"layered"
data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
size = None
while True:
    m, o, kind, ln = struct.unpack(">QIII", rx(20))
    body = rx(ln)
    assert kind & (1 << 31) == 0, f"NBD_OPT_GO refused: {kind:#x} {body!r}"
    if kind == 1:
        break
    if kind == 3 and body[:2] == b"\0\0":
        size = struct.unpack(">Q", body[2:10])[0]
cookie = 0
def cmd(c, off, ln, payload=b""):
    global cookie
    cookie += 1
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, c, cookie, off, ln) + payload)
    m, err, ck = struct.unpack(">IIQ", rx(16))
    assert m == 0x67446698 and ck == cookie and err == 0, f"NBD error {err}"
CHUNK = 64 << 10
chunks = size // CHUNK
with open(out, "a") as f:
    for k in range(first, end):
        nbytes = 0
        for j in range(k, chunks, layers):
            cmd(1, j * CHUNK, CHUNK, os.urandom(CHUNK))
            nbytes += CHUNK
        cmd(3, 0, 0)
        t0 = time.monotonic_ns()
        r = subprocess.run([cairn, "--log", "warn", "snapshot", "create", "layered",
                            f"l{k:04d}", "--json"], capture_output=True, text=True)
        t1 = time.monotonic_ns()
        if r.returncode != 0:
            raise SystemExit(f"snapshot l{k:04d}: {r.stderr}")
        f.write(json.dumps({"k": k, "bytes": nbytes, "cli_ns": t1 - t0,
                            "reply": json.loads(r.stdout)}) + "\n")
PY
}
: >"$JSON/layers.jsonl"
log "[layers] rounds 0..99 (write a stripe, snapshot)"
t0=$(date +%s%N)
layers_rounds 0 100
t1=$(date +%s%N)
read_point 100
log "[layers] rounds 100..$((LAYERS - 1))"
t2=$(date +%s%N)
layers_rounds 100 "$LAYERS"
t3=$(date +%s%N)
printf '{"rounds_ns": %s}\n' "$((t1 - t0 + t3 - t2))" >"$JSON/layers-total.json"
read_point "$LAYERS"
"$CAIRN" --log warn snapshot list layered --json >"$JSON/layers-list.json"
"$CAIRN" --log warn volume status layered --json >"$JSON/layers-status.json"
for v in layered plain; do
    "$CAIRN" --log warn volume verify "$v" >"$JSON/verify-$v.txt" 2>&1 ||
        die "replicas of $v differ (see $JSON/verify-$v.txt)"
done
du -s --block-size=1 "$WORK/data/nodes/node-1/replicas/layered" >"$JSON/layers-du.txt" || true
find "$WORK/data/nodes/node-1/replicas/layered" -type f | wc -l >"$JSON/layers-files.txt"
LOAD_END=$(cut -d ' ' -f 1-3 /proc/loadavg)
stop_dev

# --- report -------------------------------------------------------------------------------
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain -- crates/cairn crates/cairn-engine crates/cairn-store crates/cairn-replica 2>/dev/null)" ]; then
    COMMIT="$COMMIT (with uncommitted changes under crates/)"
fi
PYTHONDONTWRITEBYTECODE=1 python3 "$ROOT/bench/snapshots_report.py" \
    --json-dir "$JSON" --layers "$LAYERS" --repeat "$REPEAT" \
    --out "$RESULTS/snapshots-$STAMP.md" \
    --fact "date (UTC)=$(date -u '+%Y-%m-%d %H:%M:%S')" \
    --fact "commit=$COMMIT" \
    --fact "nproc=$(nproc)" \
    --fact "CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)" \
    --fact "memory=$(free -g | awk '/^Mem:/ { print $2 " GiB" }')" \
    --fact "kernel=$(uname -r)" \
    --fact "work dir filesystem=$FSTYPE ($(df --output=source "$WORK" | tail -n 1)); every node's data dir under $WORK" \
    --fact "fio=$(fio --version)" \
    --fact "cluster=cairn --log info dev --nodes 3 --replicas 3 --size $VOL0_SIZE (1 meta member, one agent process per node on 127.0.0.2-4, a private network namespace; defaults: --io-timeout 5s, --flush-interval 2s)" \
    --fact "pause load=fio --name=load ${LOAD_ARGS[*]} (vol0, $LOAD_SIZE filled first); 10 s without snapshots first; then $PAUSE_SNAPS x cairn snapshot create vol0 pN --json, 0.2 s apart, starting 3 s into the load" \
    --fact "pause=the engine's pause_us: from taking the submit lock (new writes wait) to releasing it: a Ping to every replica (drain), SnapshotCreate to every replica, every answer in" \
    --fact "layered / plain=cairn volume create NAME --size $REGION_SPEC --replicas 3, attached to node-1, filled with fio --rw=write --bs=1m --refill_buffers" \
    --fact "rounds=round k (0..$((LAYERS - 1))) writes the 64 KiB chunks j of layered with j % $LAYERS == k (random data, one NBD connection, then a flush) and runs cairn snapshot create layered lNNNN --json (a process each; timed around it)" \
    --fact "reads=fio --rw=randread --bs=4k --ioengine=nbd --norandommap --time_based --ramp_time=2 --runtime=$SECONDS_RUN over the whole volume, iodepth 1 and 16; sync; echo 3 > /proc/sys/vm/drop_caches before each; $REPEAT rounds of plain then layered at each point (medians)" \
    --fact "load average at start / end=$LOAD_START / $LOAD_END"
cp "$RESULTS/snapshots-$STAMP.md" "$RESULTS/snapshots-latest.md"
log "report: $RESULTS/snapshots-$STAMP.md (copied to snapshots-latest.md)"
cat "$RESULTS/snapshots-latest.md"
