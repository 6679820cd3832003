#!/usr/bin/env bash
# Meta API latency benchmark: Create latency of the metadata service (`cairn meta`, 3 members
# on loopback) for 1,000 volume creates, sequential through the leader, sequential through a
# follower (which forwards to the leader), and 16 at a time through the leader; next to the
# fsync latency of the disk the members write to, the floor a Raft write cannot beat.
#
# Usage: bash bench/meta_api.sh            (see bench/README.md)
#
# Environment (all optional):
#   BENCH_COUNT        creates per run (default 1000)
#   BENCH_CONCURRENCY  creates in flight in the concurrent run (default 16)
#   BENCH_PORTS        first of the ports to try for the members (default 11930; the script
#                      takes the first three free ports from there up)
#   BENCH_RESULTS      where the report goes (default bench/results)
#
# The work dir is a fresh bench/work/meta-api-XXXX (git-ignored), removed at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COUNT=${BENCH_COUNT:-1000}
CONC=${BENCH_CONCURRENCY:-16}
PORT0=${BENCH_PORTS:-11930}
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results}
CAIRN=$ROOT/target/release/cairn
LOAD=$ROOT/target/release/cairn-meta-load

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

[[ $COUNT =~ ^[1-9][0-9]*$ ]] || die "BENCH_COUNT must be a positive integer"
[[ $CONC =~ ^[1-9][0-9]*$ ]] || die "BENCH_CONCURRENCY must be a positive integer"
command -v fio >/dev/null || {
    log "installing fio with apt-get"
    apt-get update -qq && apt-get install -y -qq fio >/dev/null
}
command -v python3 >/dev/null || die "python3 is needed to write the report"

log "building cairn and cairn-meta-load (release)"
(cd "$ROOT" && cargo build --release -p cairn -p cairn-loadgen)

mkdir -p "$ROOT/bench/work" "$RESULTS"
WORK=$(mktemp -d "$ROOT/bench/work/meta-api-XXXX")
JSON=$WORK/json
mkdir -p "$JSON"
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

# --- ports: the first three free ones from $PORT0 up ----------------------------------------
PORTS=()
for ((p = PORT0; p < PORT0 + 100 && ${#PORTS[@]} < 3; p++)); do
    ss -Htln "sport = :$p" | grep -q . || PORTS+=("$p")
done
[ ${#PORTS[@]} -eq 3 ] || die "no three free ports from $PORT0 up"
ADDR=()
for i in 1 2 3; do ADDR[i]=127.0.0.1:${PORTS[i - 1]}; done
MEMBERS="1=${ADDR[1]},2=${ADDR[2]},3=${ADDR[3]}"

FSTYPE=$(df --output=fstype "$WORK" | tail -n 1 | tr -d ' ')
FSSRC=$(df --output=source "$WORK" | tail -n 1 | tr -d ' ')
LOAD_START=$(cut -d ' ' -f 1-3 /proc/loadavg)
log "work dir $WORK on $FSTYPE ($FSSRC); members $MEMBERS; load $LOAD_START"

# fsync_floor NAME: 4 KiB writes, each followed by an fsync, on a file in the work dir.
fsync_floor() {
    mkdir -p "$WORK/fio"
    fio --name=fsync --directory="$WORK/fio" --ioengine=sync --rw=write --bs=4k --size=4m \
        --fsync=1 --output-format=json --output="$JSON/$1.json" >/dev/null ||
        die "fio failed (see $JSON/$1.json)"
    rm -rf "$WORK/fio"
    python3 - "$JSON/$1.json" <<'PY' >&2
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
p = j["sync"]["lat_ns"]["percentile"]
print(f'    fsync: p50 {p["50.000000"] / 1e6:.3f} ms, p99 {p["99.000000"] / 1e6:.3f} ms, '
      f'{j["write"]["iops"]:,.0f} write+fsync/s')
PY
}

log "fsync floor (before): fio 4 KiB write + fsync, 1024 times, in the work dir"
fsync_floor fsync-before

# --- the three members ------------------------------------------------------------------------
for i in 1 2 3; do
    extra=()
    [ "$i" -eq 1 ] && extra=(--init --members "$MEMBERS")
    "$CAIRN" --log warn meta --id "$i" --listen "${ADDR[i]}" --data-dir "$WORK/m$i" "${extra[@]}" \
        >"$WORK/m$i.out" 2>"$WORK/m$i.log" &
    PIDS+=($!)
done
log "members started (pids ${PIDS[*]}); waiting for a leader"
"$LOAD" --meta "${ADDR[1]}" --print-leader --wait 60s >"$JSON/leader.json" ||
    die "no leader (see $WORK/m*.log)"
LEADER=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["leader_address"])' "$JSON/leader.json")
LEADER_ID=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["leader_id"])' "$JSON/leader.json")
FOLLOWER=
for i in 1 2 3; do
    if [ "${ADDR[i]}" != "$LEADER" ]; then FOLLOWER=${ADDR[i]}; FOLLOWER_ID=$i; break; fi
done
# Every member must agree on the leader before the runs start.
for i in 1 2 3; do
    "$LOAD" --meta "${ADDR[i]}" --print-leader --wait 30s >"$JSON/leader-m$i.json" ||
        die "member $i knows no leader"
    grep -q "\"leader_address\":\"$LEADER\"" "$JSON/leader-m$i.json" ||
        die "member $i names another leader: $(cat "$JSON/leader-m$i.json")"
done
log "leader: member $LEADER_ID at $LEADER; follower used: member $FOLLOWER_ID at $FOLLOWER"

# run NAME ADDR CONCURRENCY PREFIX
run() {
    log "run $1: $COUNT creates through $2, concurrency $3"
    "$LOAD" --meta "$2" --count "$COUNT" --concurrency "$3" --prefix "$4" >"$JSON/$1.json" ||
        die "run $1 failed (see $WORK/m*.log)"
    python3 - "$JSON/$1.json" <<'PY' >&2
import json, sys
r = json.load(open(sys.argv[1]))
print(f'    {r["count"]} creates in {r["seconds"]:.2f} s = {r["creates_per_s"]:,.0f}/s; '
      f'p50 {r["lat_p50_ms"]:.2f} ms, p90 {r["lat_p90_ms"]:.2f}, p99 {r["lat_p99_ms"]:.2f}, '
      f'max {r["lat_max_ms"]:.2f}; revisions {r["revision_after"] - r["revision_before"]}')
PY
}
run leader-seq "$LEADER" 1 bench-l-
run follower-seq "$FOLLOWER" 1 bench-f-
run leader-c$CONC "$LEADER" "$CONC" bench-c-
# The leader must not have changed during the runs.
"$LOAD" --meta "$LEADER" --print-leader >"$JSON/leader-end.json"
grep -q "\"leader_address\":\"$LEADER\"" "$JSON/leader-end.json" ||
    die "the leader changed during the runs: $(cat "$JSON/leader-end.json")"
VOLUMES=$("$CAIRN" --log warn volume list --meta "$LEADER" --json 2>/dev/null |
    python3 -c 'import json, sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo "?")
DATA_BYTES=$(du -sb "$WORK/m$LEADER_ID" | cut -f 1)
for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
PIDS=()

log "fsync floor (after): the same fio job"
fsync_floor fsync-after
LOAD_END=$(cut -d ' ' -f 1-3 /proc/loadavg)

# --- report -----------------------------------------------------------------------------------
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain -- bench/loadgen bench/meta_api.sh crates proto 2>/dev/null)" ]; then
    COMMIT="$COMMIT (with uncommitted changes)"
fi
OUT=$RESULTS/meta-api-$STAMP.md
FACTS="date (UTC)=$(date -u '+%Y-%m-%d %H:%M:%S')
commit=$COMMIT
nproc=$(nproc)
CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)
memory=$(free -g | awk '/^Mem:/ { print $2 " GiB" }')
kernel=$(uname -r)
data dirs=$FSTYPE ($FSSRC), one per member under a fresh bench/work/meta-api-XXXX
members=cairn --log warn meta --id N --listen 127.0.0.1:PORT --data-dir DIR (member 1: --init --members $MEMBERS)
leader / follower=member $LEADER_ID ($LEADER) / member $FOLLOWER_ID ($FOLLOWER)
load generator=cairn-meta-load --meta ADDR --count $COUNT --concurrency C --prefix P (one gRPC channel; volumes of 1 GiB, 3 replicas, state CREATING)
volumes in meta at the end=$VOLUMES
leader data dir at the end=$DATA_BYTES bytes
fsync floor=fio --ioengine=sync --rw=write --bs=4k --size=4m --fsync=1 --directory=WORK/fio ($(fio --version))
load average at start / end=$LOAD_START / $LOAD_END" \
python3 - "$JSON" "$CONC" "$OUT" <<'PY'
import json, os, sys
d, conc, out = sys.argv[1], sys.argv[2], sys.argv[3]
ld = lambda n: json.load(open(os.path.join(d, n + ".json")))
fio = {k: ld("fsync-" + k)["jobs"][0] for k in ("before", "after")}
def fs(k, p):
    return fio[k]["sync"]["lat_ns"]["percentile"][p] / 1e6
floor50 = fs("before", "50.000000")
runs = [("leader-seq", "sequential, through the leader"),
        ("follower-seq", "sequential, through a follower (forwarded)"),
        (f"leader-c{conc}", f"{conc} in flight, through the leader")]
L = []
w = L.append
w("# Meta API latency: volume creates on 3 members")
w("")
w("3 `cairn meta` members on one machine (loopback), each with its own data dir on the same")
w("filesystem. Every Create is a Raft write: the leader appends it to its log and flushes it,")
w("the followers append and flush it before they acknowledge, the leader commits it on a")
w("majority (itself + 1 follower) and applies it to its records (and flushes them) before it")
w("answers. So a Create costs at least one fsync on the leader and one on a follower, plus")
w("the apply flush; the fio figure below is one 4 KiB write + fsync on the same filesystem.")
w("")
w("| run | creates | seconds | creates/s | p50 ms | p90 ms | p99 ms | max ms | mean ms | p50 / fsync p50 | Raft writes applied |")
w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, desc in runs:
    r = ld(name)
    w(f"| {desc} | {r['count']} | {r['seconds']:.2f} | {r['creates_per_s']:,.0f} | "
      f"{r['lat_p50_ms']:.2f} | {r['lat_p90_ms']:.2f} | {r['lat_p99_ms']:.2f} | {r['lat_max_ms']:.2f} | "
      f"{r['lat_mean_ms']:.2f} | {r['lat_p50_ms'] / floor50:.1f}x | {r['revision_after'] - r['revision_before']} |")
w("")
w("\"Raft writes applied\" is the difference of the revisions `List` returned before and after")
w("the run: the Creates plus what meta's own controllers wrote meanwhile (the scheduling")
w("controller updates each new volume: no nodes are registered, so it marks it DEGRADED).")
w("")
w("## fsync floor (fio, same filesystem)")
w("")
w("| when | write+fsync/s | fsync p50 ms | p90 ms | p99 ms | max ms | write p50 ms |")
w("|---|---:|---:|---:|---:|---:|---:|")
for k in ("before", "after"):
    j = fio[k]
    w(f"| {k} the members ran | {j['write']['iops']:,.0f} | {fs(k, '50.000000'):.3f} | "
      f"{fs(k, '90.000000'):.3f} | {fs(k, '99.000000'):.3f} | {j['sync']['lat_ns']['max'] / 1e6:.3f} | "
      f"{j['write']['clat_ns']['percentile']['50.000000'] / 1e6:.3f} |")
w("")
w(f"Ratios use the fsync p50 measured before the members started ({floor50:.3f} ms).")
w("")
w("## Setup")
w("")
w("| | |")
w("|---|---|")
facts = [l.split("=", 1) for l in os.environ["FACTS"].split("\n") if l]
for k, v in facts:
    w(f"| {k} | {v} |")
w("")
w("## Raw output")
w("")
w("```")
for name, _ in runs:
    w(open(os.path.join(d, name + ".json")).read().strip())
w(open(os.path.join(d, "leader.json")).read().strip())
w("```")
open(out, "w").write("\n".join(L) + "\n")
PY
cp "$OUT" "$RESULTS/meta-api-latest.md"
log "report: $OUT (copied to meta-api-latest.md)"
cat "$OUT"
