# Shell helpers shared by bench/replica.sh and bench/volume.sh (sourced; $WORK must be set
# before settle runs).

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Writes back everything dirty on the work dir's filesystem, then drops the page cache of
# every file under the work dir (fdatasync + POSIX_FADV_DONTNEED), Cairn's layer files
# included: each run starts cold and clean.
settle() {
    sync -f "$WORK"
    python3 - "$WORK" <<'PY'
import os, sys
for d, _, files in os.walk(sys.argv[1]):
    for f in files:
        p = os.path.join(d, f)
        if not os.path.isfile(p):
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
PY
}

# True while PID $1 exists and is not a zombie.
alive() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [ "${s%% *}" != Z ]
}
# stop_pid PID: SIGTERM, up to 20 s for it to exit, then SIGKILL; reaps it if it is our child.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 400; i++)); do
        alive "$pid" || break
        sleep 0.05
    done
    if alive "$pid"; then
        log "pid $pid did not stop on SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
