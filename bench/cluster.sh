#!/usr/bin/env bash
# Cluster benchmarks of `cairn dev` (meta members + one agent process per node):
#   1. heal time: a node holding a replica of vol0 dies for good; time until meta marks it
#      DOWN, until the replica is replaced on another node, until the volume is healthy again
#      (rebuilt), with the rebuild next to a plain cp of the same data on the same disk;
#   2. idle agent: CPU and RSS of node-1's agent running 50 engines (and serving 50
#      replicas), and of node-2's agent serving 50 replicas, over 60 idle seconds.
#
# Usage: bash bench/cluster.sh            (see bench/README.md)
#
# Environment (all optional):
#   BENCH_REPEAT      heal-time repetitions, each on a fresh cluster (default 2)
#   BENCH_FILL        data written before the kill (default 500M)
#   BENCH_VOLUMES     volumes attached to node-1 in the idle benchmark (default 50)
#   BENCH_IDLE        measured idle seconds (default 60)
#   BENCH_PARTS       which parts run: "heal idle" (default both)
#   BENCH_WORK        work directory, wiped at start and removed at the end
#                     (default bench/work/cluster)
#   BENCH_RESULTS     where the report goes (default bench/results)
#
# Needs root: everything after the build runs in a private network namespace (the nodes
# listen on 127.0.0.2.. and the default ports), and the timed cp starts after
# `sync; echo 3 > /proc/sys/vm/drop_caches`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPEAT=${BENCH_REPEAT:-2}
FILL_SPEC=${BENCH_FILL:-500M}
VOLUMES=${BENCH_VOLUMES:-50}
IDLE=${BENCH_IDLE:-60}
PARTS=${BENCH_PARTS:-"heal idle"}
WORK=${BENCH_WORK:-$ROOT/bench/work/cluster}
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results}

FILL=$(numfmt --from=iec "${FILL_SPEC^^}")
CAIRN=$ROOT/target/release/cairn
JSON=$WORK/json
NBD_ADDR=127.0.0.1:10809
CONTROL_ADDR=127.0.0.1:10810
URI=nbd://$NBD_ADDR/vol0
# Heal-time cluster.
HEAL_NODES=4
HEAL_SIZE=1GiB
DOWN_TIMEOUT=5s
REPLENISH_WAIT=10s
# Idle cluster.
IDLE_NODES=3
IDLE_SIZE=64MiB

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

[ $((FILL % 1048576)) -eq 0 ] && [ "$FILL" -le $((1 << 30)) ] ||
    die "BENCH_FILL must be a multiple of 1 MiB, at most 1 GiB"
[ "$VOLUMES" -ge 1 ] && [ "$VOLUMES" -le 99 ] || die "BENCH_VOLUMES must be 1..99"

# --- outside the namespace: tools and build, then re-execute inside a private one ---------
if [ "${1:-}" != --in-netns ]; then
    [ "$(id -u)" -eq 0 ] || die "needs root (unshare -n, drop_caches)"
    need=()
    command -v fio >/dev/null || need+=(fio)
    command -v nbdinfo >/dev/null || need+=(libnbd-bin)
    command -v strace >/dev/null || need+=(strace)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]} with apt-get"
        apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    command -v python3 >/dev/null || die "python3 is needed to write the report"
    command -v unshare >/dev/null && command -v ip >/dev/null && command -v flock >/dev/null ||
        die "unshare, flock (util-linux) and ip (iproute2) are needed"
    fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"

    log "building cairn (release)"
    (cd "$ROOT" && cargo build --release -p cairn)
    log "entering a private network namespace (unshare -n)"
    exec unshare -n -- bash "${BASH_SOURCE[0]}" --in-netns
fi
ip link set lo up

# --- processes we start, and their teardown -----------------------------------------------
DEV_PID=
DEV_FD=
LOCK_PIDS=()
# stop_dev: SIGTERM to `cairn dev` (it stops its agents, which flush their engines, then the
# members), up to 90 s for it to exit, then SIGKILL (its children die with it:
# PR_SET_PDEATHSIG); then the lock holders.
stop_dev() {
    local i p
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
    for p in "${LOCK_PIDS[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    LOCK_PIDS=()
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

# hold_lock NODE_DIR: a background shell that blocks until it holds flock -x on the node's
# replicas/.lock (the agent holds it while it runs), then writes NODE_DIR/../NAME.locked and
# sleeps: a restarted agent then cannot open its replica directory. One process (the shell
# execs sleep with the locked descriptor), its pid in LOCK_PIDS.
hold_lock() {
    local dir=$1 mark=$WORK/$(basename "$1").locked
    rm -f "$mark"
    (
        exec 9>>"$dir/replicas/.lock"
        flock -x 9
        : >"$mark"
        exec sleep 100000
    ) &
    LOCK_PIDS+=($!)
}

# cold: writes back everything dirty and drops the whole page cache.
cold() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# alloc FILE: bytes allocated to FILE on disk.
alloc() { echo $(($(stat -c '%b * %B' "$1"))); }

rm -rf "$WORK"
mkdir -p "$JSON" "$RESULTS"
FSTYPE=$(df --output=fstype "$WORK" | tail -n 1 | tr -d ' ')
LOAD_START=$(cut -d ' ' -f 1-3 /proc/loadavg)
log "work dir $WORK on $FSTYPE; parts: $PARTS; load $LOAD_START"

# --- 1. heal time --------------------------------------------------------------------------
heal_round() {
    local rep=$1 dir=$WORK/heal$rep base=$JSON/heal-$rep victim node pid t_kill src dst t0 t1 t2 i
    log "[heal $rep/$REPEAT] cairn dev --nodes $HEAL_NODES --replicas 3 --size $HEAL_SIZE --node-down-timeout $DOWN_TIMEOUT --replica-replenish-wait $REPLENISH_WAIT"
    start_dev "$dir" --nodes "$HEAL_NODES" --replicas 3 --size "$HEAL_SIZE" \
        --node-down-timeout "$DOWN_TIMEOUT" --replica-replenish-wait "$REPLENISH_WAIT"
    log "[heal $rep] fill: $FILL bytes of random data (sequential 1 MiB writes, QD8), then a flush"
    fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 --numjobs=1 \
        --size="$FILL" --refill_buffers --end_fsync=1 \
        --output-format=json --output="$base.fill.json" || die "fio fill failed (see $base.fill.json)"
    "$CAIRN" --log warn volume verify vol0 >"$base.verify-before.txt" 2>&1 ||
        die "verify failed before the kill (see $base.verify-before.txt)"
    "$CAIRN" --log warn replica list --volume vol0 --json >"$base.replicas-before.json"
    "$CAIRN" --log warn node list --json >"$base.nodes-before.json"
    # The victim: the first (by name) non-deleted replica of vol0 on a node other than node-1.
    victim=$(python3 -c 'import json, sys
rs = [r for r in json.load(open(sys.argv[1])) if not r["deleted"] and r["node"] != "node-1"]
rs.sort(key=lambda r: r["name"])
print(rs[0]["name"], rs[0]["node"]) if rs else sys.exit(1)' "$base.replicas-before.json") ||
        die "no replica of vol0 outside node-1 (see $base.replicas-before.json)"
    node=${victim#* }
    victim=${victim%% *}
    pid=$(<"$dir/nodes/$node/agent.pid")
    alive "$pid" || die "$node's agent (pid $pid) is not running"
    # The rebuild's source is read cold, as cp's is: everything written back, page cache dropped.
    cold
    hold_lock "$dir/nodes/$node"
    sleep 0.2
    [ ! -e "$WORK/$node.locked" ] || die "took $node's replica lock while its agent runs"
    log "[heal $rep] SIGKILL $node's agent (pid $pid), which holds $victim; its lock stays held"
    t_kill=$EPOCHREALTIME
    kill -KILL "$pid"
    for ((i = 0; i < 200; i++)); do
        [ -e "$WORK/$node.locked" ] && break
        sleep 0.01
    done
    [ -e "$WORK/$node.locked" ] || die "did not get $node's replica lock within 2 s of the kill"
    python3 - "$CAIRN" "$node" "$victim" "$t_kill" "$base.replicas-before.json" "$dir" <<'PY' >"$base.heal.json" ||
import glob, json, os, subprocess, sys, time
cairn, node, victim, t_kill, before = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
data = sys.argv[6]
old = {r["name"] for r in json.load(open(before))}
def ticks(pid):
    try:
        s = open(f"/proc/{pid}/stat").read()
    except OSError:
        return 0
    f = s[s.rindex(")") + 2:].split()
    return int(f[11]) + int(f[12])
def cpu():
    """Busy ticks: the whole machine, every cairn process of the cluster, this poller's CLI calls."""
    with open("/proc/stat") as f:
        c = [int(x) for x in f.readline().split()[1:]]
    pids = set()
    for p in glob.glob(f"{data}/nodes/*/agent.pid") + glob.glob(f"{data}/meta/*/meta.pid"):
        try:
            pids.add(open(p).read().strip())
        except OSError:
            pass
    t = os.times()
    return {"time": time.time(), "machine": c[0] + c[1] + c[2] + c[5] + c[6],
            "cairn": sum(ticks(p) for p in pids),
            "poller": round((t.children_user + t.children_system + t.user + t.system) * os.sysconf("SC_CLK_TCK"))}
def cli(*a):
    return json.loads(subprocess.run([cairn, "--log", "warn", *a, "--json"], check=True,
                                     capture_output=True, text=True).stdout)
out = {"kill": t_kill, "node": node, "victim": victim, "polls": 0, "hz": os.sysconf("SC_CLK_TCK"),
       "cpu_kill": cpu()}
deadline = t_kill + 600
while time.time() < deadline:
    t = time.time()
    nodes = cli("node", "list")
    reps = cli("replica", "list", "--volume", "vol0")
    vol = cli("volume", "get", "vol0")
    out["polls"] += 1
    n = next((n for n in nodes if n["name"] == node), None)
    if "down" not in out and n and n["state"] == "down":
        out["down"] = t; out["down_reason"] = n["state_reason"]
    new = [r for r in reps if r["name"] not in old and not r["deleted"]]
    if "replaced" not in out and new:
        out["replaced"] = t; out["replacement"] = new[0]["name"]; out["replacement_node"] = new[0]["node"]
        v = next((r for r in reps if r["name"] == victim), {})
        out["victim_after"] = v
        out["cpu_replaced"] = cpu()
    live = [r for r in reps if not r["deleted"]]
    if ("replaced" in out and "healthy" not in out and vol["state"] == "healthy"
            and len(live) >= vol["replica_count"] and all(r["mode"] == "rw" for r in live)):
        out["healthy"] = t; out["replicas_after"] = reps; out["volume_after"] = vol
        out["cpu_healthy"] = cpu()
        break
    time.sleep(max(0, 0.1 - (time.time() - t)))
out["poll_interval_s"] = 0.1
print(json.dumps(out))
sys.exit(0 if "healthy" in out else 1)
PY
        die "vol0 did not become healthy within 600 s of the kill (see $base.heal.json, $WORK/dev.log)"
    python3 - "$base.heal.json" <<'PY' >&2
import json, sys
h = json.load(open(sys.argv[1])); k = h["kill"]
print(f'    {h["node"]} down after {h["down"] - k:.1f} s, {h["victim"]} replaced by {h["replacement"]} on '
      f'{h["replacement_node"]} after {h["replaced"] - k:.1f} s, healthy after {h["healthy"] - k:.1f} s')
PY
    "$CAIRN" --log warn volume status vol0 --json --endpoint "$CONTROL_ADDR" >"$base.status.json"
    "$CAIRN" --log warn volume verify vol0 >"$base.verify.txt" 2>&1 ||
        die "cairn volume verify failed after the heal (see $base.verify.txt)"
    log "[heal $rep] verify after the heal: $(tr '\n' ' ' <"$base.verify.txt" | cut -c 1-200)"
    # The peer: cp of node-1's replica data file (the head layer holding the fill).
    src=$(find "$dir/nodes/node-1/replicas/vol0" -name '*.data' -printf '%b %p\n' | sort -n | tail -n 1 | cut -d ' ' -f 2-)
    [ -n "$src" ] || die "no data file under $dir/nodes/node-1/replicas/vol0"
    dst=$WORK/cp.data
    rm -f "$dst"
    cold
    t0=$EPOCHREALTIME
    cp --sparse=always "$src" "$dst"
    t1=$EPOCHREALTIME
    sync "$dst"
    t2=$EPOCHREALTIME
    printf '{"start": %s, "copied": %s, "synced": %s, "src": "%s", "src_alloc": %s, "dst_alloc": %s}\n' \
        "$t0" "$t1" "$t2" "${src#"$dir"/}" "$(alloc "$src")" "$(alloc "$dst")" >"$base.cp.json"
    cmp -s "$src" "$dst" || die "cp made a copy that differs from $src"
    rm -f "$dst"
    python3 - "$base.cp.json" <<'PY' >&2
import json, sys
c = json.load(open(sys.argv[1]))
print(f'    cp: {c["dst_alloc"]:,} bytes in {c["synced"] - c["start"]:.2f} s with fsync')
PY
    cp "$WORK/dev.log" "$base.dev.log"
    stop_dev
    rm -rf "$dir"
}

if [[ " $PARTS " == *" heal "* ]]; then
    for rep in $(seq 1 "$REPEAT"); do heal_round "$rep"; done
fi

# --- 2. idle agent -------------------------------------------------------------------------
# proc_sample PID...: JSON of each process's utime+stime, VmRSS, threads and per-thread
# (name, ticks), with the time.
proc_sample() {
    python3 - "$@" <<'PY'
import json, os, sys, time
def stat(path):
    s = open(path).read()
    f = s[s.rindex(")") + 2:].split()
    return s[s.index("(") + 1:s.rindex(")")], int(f[11]) + int(f[12])
with open("/proc/stat") as f:
    c = [int(x) for x in f.readline().split()[1:]]
out = {"time": time.time(), "hz": os.sysconf("SC_CLK_TCK"), "procs": {},
       "machine": c[0] + c[1] + c[2] + c[5] + c[6]}
for pid in sys.argv[1:]:
    _, ticks = stat(f"/proc/{pid}/stat")
    status = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status") if ":" in l)
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name, t = stat(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        threads[tid] = [name, t]
    out["procs"][pid] = {"ticks": ticks, "rss_kib": int(status["VmRSS"].split()[0]),
                         "threads": threads}
print(json.dumps(out))
PY
}

if [[ " $PARTS " == *" idle "* ]]; then
    dir=$WORK/idle
    log "[idle] cairn dev --nodes $IDLE_NODES --replicas 3 --size $IDLE_SIZE"
    start_dev "$dir" --nodes "$IDLE_NODES" --replicas 3 --size "$IDLE_SIZE"
    t0=$EPOCHREALTIME
    # Create them all, wait until meta placed their replicas (attach refuses a volume that is
    # still `creating`: "has no replicas placed yet"), then attach them one by one.
    for ((i = 1; i < VOLUMES; i++)); do
        v=$(printf 'v%02d' "$i")
        "$CAIRN" --log warn volume create "$v" --size "$IDLE_SIZE" --replicas 3 >/dev/null ||
            die "volume create $v failed"
    done
    for ((i = 0; ; i++)); do
        "$CAIRN" --log warn volume list --json >"$JSON/idle-created.json"
        python3 -c 'import json, sys; sys.exit(any(v["state"] == "creating" for v in json.load(open(sys.argv[1]))))' \
            "$JSON/idle-created.json" && break
        [ "$i" -lt 600 ] || die "volumes still creating after 60 s (see $JSON/idle-created.json)"
        sleep 0.1
    done
    t_created=$EPOCHREALTIME
    for ((i = 1; i < VOLUMES; i++)); do
        v=$(printf 'v%02d' "$i")
        "$CAIRN" --log warn volume attach "$v" --node node-1 >"$JSON/idle-attach-$v.txt" 2>&1 ||
            die "volume attach $v failed (see $JSON/idle-attach-$v.txt, $WORK/dev.log)"
        ((i % 10 == 0)) && log "[idle] $((i + 1)) volumes attached"
    done
    t1=$EPOCHREALTIME
    # All served: every export answers a handshake, every volume healthy with 3 RW replicas.
    for ((i = 0; i < VOLUMES; i++)); do
        if [ "$i" -eq 0 ]; then v=vol0; else v=$(printf 'v%02d' "$i"); fi
        nbdinfo --size "nbd://$NBD_ADDR/$v" >/dev/null 2>&1 || die "nbd://$NBD_ADDR/$v does not answer"
    done
    "$CAIRN" --log warn volume list --json >"$JSON/idle-volumes.json"
    "$CAIRN" --log warn replica list --json >"$JSON/idle-replicas.json"
    python3 - "$JSON/idle-volumes.json" "$JSON/idle-replicas.json" "$VOLUMES" <<'PY' ||
import json, sys
vols = json.load(open(sys.argv[1])); reps = json.load(open(sys.argv[2])); n = int(sys.argv[3])
bad = [v["name"] for v in vols if v["state"] != "healthy" or v["attached_node"] != "node-1"]
rw = [r for r in reps if not r["deleted"] and r["mode"] == "rw"]
if len(vols) != n or bad or len(rw) != 3 * n:
    print(f"{len(vols)} volumes (want {n}), not healthy on node-1: {bad}, {len(rw)} RW replicas", file=sys.stderr)
    sys.exit(1)
PY
        die "not every volume is served (see $JSON/idle-volumes.json)"
    printf '{"start": %s, "created": %s, "end": %s, "volumes": %s}\n' "$t0" "$t_created" "$t1" "$VOLUMES" >"$JSON/idle-setup.json"
    log "[idle] $VOLUMES volumes served, healthy, 3 RW replicas each; idling 10 s, then measuring ${IDLE} s"
    sleep 10
    a1=$(<"$dir/nodes/node-1/agent.pid")
    a2=$(<"$dir/nodes/node-2/agent.pid")
    m1=$(<"$dir/meta/m1/meta.pid")
    printf '{"node-1": %s, "node-2": %s, "meta-1": %s, "dev": %s}\n' "$a1" "$a2" "$m1" "$DEV_PID" >"$JSON/idle-pids.json"
    : >"$JSON/idle-samples.jsonl"
    for ((i = 0; i <= IDLE; i += 5)); do
        [ "$i" -eq 0 ] || sleep 5
        proc_sample "$a1" "$a2" "$m1" "$DEV_PID" >>"$JSON/idle-samples.jsonl"
    done
    log "[idle] measured; now 10 s of strace -c -f on each agent (after the measurement)"
    for p in "$a1" "$a2"; do
        timeout -s INT 10 strace -c -f -p "$p" -o "$JSON/idle-strace-$p.txt" >/dev/null 2>&1 || true
    done
    alive "$a1" && alive "$a2" || die "an agent died during the idle measurement"
    cp "$WORK/dev.log" "$JSON/idle.dev.log"
    stop_dev
    rm -rf "$dir"
fi
LOAD_END=$(cut -d ' ' -f 1-3 /proc/loadavg)

# --- report -------------------------------------------------------------------------------
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain -- crates 2>/dev/null)" ]; then COMMIT="$COMMIT (with uncommitted changes under crates/)"; fi
PYTHONDONTWRITEBYTECODE=1 python3 "$ROOT/bench/cluster_report.py" \
    --json-dir "$JSON" \
    --repeat "$REPEAT" \
    --parts "$PARTS" \
    --down-timeout "$DOWN_TIMEOUT" \
    --replenish-wait "$REPLENISH_WAIT" \
    --out "$RESULTS/cluster-$STAMP.md" \
    --fact "date (UTC)=$(date -u '+%Y-%m-%d %H:%M:%S')" \
    --fact "commit=$COMMIT" \
    --fact "nproc=$(nproc)" \
    --fact "CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)" \
    --fact "memory=$(free -g | awk '/^Mem:/ { print $2 " GiB" }')" \
    --fact "kernel=$(uname -r)" \
    --fact "work dir filesystem=$FSTYPE ($(df --output=source "$WORK" | tail -n 1)); every node's data dir and the cp copy under $WORK" \
    --fact "fio=$(fio --version)" \
    --fact "network=a private network namespace (unshare -n, lo up): meta 127.0.0.1:10811, node-1 NBD $NBD_ADDR and control $CONTROL_ADDR, node-J replica server 127.0.0.(J+1):10900" \
    --fact "heal cluster=cairn --log info dev --nodes $HEAL_NODES --replicas 3 --size $HEAL_SIZE --node-down-timeout $DOWN_TIMEOUT --replica-replenish-wait $REPLENISH_WAIT (1 meta member; defaults: --rebuild-rate 0, --io-timeout 5s, --flush-interval 2s)" \
    --fact "fill=fio --ioengine=nbd --rw=write --bs=1m --iodepth=8 --size=$FILL --refill_buffers --end_fsync=1" \
    --fact "before the kill=cairn volume verify vol0; sync; echo 3 > /proc/sys/vm/drop_caches (the rebuild reads its source cold, like cp)" \
    --fact "kill=flock -x on the victim node's replicas/.lock (blocks until the agent dies), kill -KILL the agent; cairn dev's restarts then fail on the lock" \
    --fact "polling=every 0.1 s: cairn node list --json, cairn replica list --volume vol0 --json, cairn volume get vol0 --json (times are when a poll first saw the change)" \
    --fact "cp=sync; echo 3 > /proc/sys/vm/drop_caches; time { cp --sparse=always node-1's vol0 head .data file; sync DST; }" \
    --fact "idle cluster=cairn --log info dev --nodes $IDLE_NODES --replicas 3 --size $IDLE_SIZE, then cairn volume create vNN --size $IDLE_SIZE --replicas 3 and cairn volume attach vNN --node node-1 for NN=01..$(printf '%02d' $((VOLUMES - 1)))" \
    --fact "idle measurement=10 s after the last volume is served, /proc/PID/stat utime+stime and /proc/PID/status VmRSS every 5 s for ${IDLE} s; strace -c -f -p for 10 s afterwards" \
    --fact "load average at start / end=$LOAD_START / $LOAD_END"
cp "$RESULTS/cluster-$STAMP.md" "$RESULTS/cluster-latest.md"
log "report: $RESULTS/cluster-$STAMP.md (copied to cluster-latest.md)"
cat "$RESULTS/cluster-latest.md"
