#!/usr/bin/env python3
"""Writes the Markdown report (and a JSON summary) of bench/rebuild.sh from what one run left.

Inputs in --json-dir, per repetition R (1..--repeat) and resync percentage P (--pcts):
  fill.json                  fio --output-format=json of the fill
  rebuild-R.time.json        {start, end (Unix s, around `replica add --wait`), id, addr, replaced}
  rebuild-R.status.json      `cairn volume status --json` once the new replica is RW
  cp-R.json, dd-R.json       {start, copied, synced (Unix s), src_alloc, dst_alloc (bytes)}
  resync-P-R.kill            Unix time of the kill -9 of r2 (seconds, one line)
  resync-P-R.fio.json        fio's JSON of the writes made while r2 was down
  resync-P-R_lat.log         fio's per-write log: completion (Unix ms), latency, direction,
                             length, offset
  resync-P-R.status.json     status once r2 is RW again

Each figure is the median run over the repetitions (for an even count, the upper middle
run). MB is 10^6 bytes. Standard library only.
"""

import argparse
import json
import os
import sys

from report_common import load, num, ratio

GOAL_RATIO = 0.7
# A timed step during which the rest of the machine kept more cores than this busy is flagged.
DISTURBED_CORES = 0.3
# Granularity of the engine's outage log (the status reports it as outage_region_bytes).
REGION = 64 << 10
MB = 1e6


def median_run(runs, key):
    ordered = sorted(runs, key=key)
    return ordered[len(ordered) // 2]


def replica(status, rid):
    return next(r for r in status["replicas"] if r["id"] == rid)


def cpu(j, base):
    """Cores busy over a timed step: its own processes, and the rest of the machine."""
    c0, c1 = load(j(f"{base}.cpu0.json")), load(j(f"{base}.cpu1.json"))
    wall = c1["time"] - c0["time"]
    if wall <= 0:
        return {"own_cores": None, "other_cores": None}
    hz = c0["hz"]
    own = (c1["children"] - c0["children"] + c1["cairn"] - c0["cairn"]) / hz / wall
    machine = (c1["machine"] - c0["machine"]) / hz / wall
    return {"own_cores": own, "other_cores": max(0.0, machine - own)}


def rebuild_run(j, r):
    t = load(j(f"rebuild-{r}.time.json"))
    st = load(j(f"rebuild-{r}.status.json"))
    rep = replica(st, t["id"])
    job = rep["rebuild"]
    wall = t["end"] - t["start"]
    copied = rep["last_resync_bytes"]
    return {
        "rep": r,
        "id": t["id"],
        "replaced": t["replaced"],
        "source": job["source"],
        "wall_s": wall,
        "bytes_copied": copied,
        "job_bytes_copied": job["bytes_copied"],
        "job_bytes_total": job["bytes_total"],
        "job_elapsed_ms": job["elapsed_ms"],
        "job_rate_bytes_per_sec": job["rate_bytes_per_sec"],
        "mb_s_wall": copied / wall / MB,
        "mb_s_job": job["bytes_copied"] / (job["elapsed_ms"] / 1000) / MB
        if job["elapsed_ms"]
        else None,
        **cpu(j, f"rebuild-{r}"),
    }


def copy_run(j, tool, r):
    c = load(j(f"{tool}-{r}.json"))
    total = c["synced"] - c["start"]
    return {
        "rep": r,
        "tool": tool,
        "s": total,
        "s_without_fsync": c["copied"] - c["start"],
        "src_alloc": c["src_alloc"],
        "dst_alloc": c["dst_alloc"],
        "mb_s": c["src_alloc"] / total / MB,
        **cpu(j, f"{tool}-{r}"),
    }


def lat_log(path):
    """(completion Unix ms, length, offset) of every write in a fio log with log_offset=1."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            p = [x.strip() for x in line.split(",")]
            if len(p) >= 5 and p[2] == "1":
                out.append((int(p[0]), int(p[3]), int(p[4])))
    return out


def regions(writes):
    s = set()
    for _, length, off in writes:
        s.update(range(off // REGION, (off + length - 1) // REGION + 1))
    return s


def resync_run(j, pct, r, full_elapsed_ms):
    base = f"resync-{pct}-{r}"
    fio = load(j(f"{base}.fio.json"))["jobs"][0]["write"]
    with open(j(f"{base}.kill"), encoding="utf-8") as f:
        kill_ms = float(f.read()) * 1000
    st = load(j(f"{base}.status.json"))
    rep = replica(st, "r2")
    job = rep["rebuild"]
    back_ms = job["started_unix_ms"]
    writes = lat_log(j(f"{base}_lat.log"))
    before = [w for w in writes if w[0] <= back_ms]
    after = [w for w in writes if w[0] > back_ms]
    ideal = len(regions(before)) * REGION
    client = fio["io_bytes"]
    copied = rep["last_resync_bytes"]
    return {
        "rep": r,
        "pct": pct,
        "client_bytes": client,
        "client_mb_s": fio["bw_bytes"] / MB,
        "write_ms": fio["runtime"],
        "writes": len(writes),
        "bytes_before_back": sum(w[1] for w in before),
        "bytes_after_back": sum(w[1] for w in after),
        "last_write_to_back_ms": back_ms - max(w[0] for w in writes) if writes else None,
        "outage_ms": back_ms - kill_ms,
        "regions_bytes": ideal,
        "job_bytes_total": job["bytes_total"],
        "bytes_copied": copied,
        "job_bytes_copied": job["bytes_copied"],
        "job_elapsed_ms": job["elapsed_ms"],
        "job_rate_bytes_per_sec": job["rate_bytes_per_sec"],
        "kill_to_rw_ms": back_ms + job["elapsed_ms"] - kill_ms,
        "copied_per_client": ratio(copied, client),
        "total_per_regions": ratio(job["bytes_total"], ideal),
        "vs_full_rebuild": ratio(job["elapsed_ms"], full_elapsed_ms),
        "errors_r2": rep["errors"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json-dir", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pcts", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--json-out", required=True)
    ap.add_argument("--fact", action="append", default=[], help="KEY=VALUE machine fact")
    a = ap.parse_args()
    pcts = [int(p) for p in a.pcts.split()]
    reps = range(1, a.repeat + 1)

    def j(name):
        return os.path.join(a.json_dir, name)

    fill = load(j("fill.json"))["jobs"][0]["write"]
    rb = [rebuild_run(j, r) for r in reps]
    cps = [copy_run(j, "cp", r) for r in reps]
    dds = [copy_run(j, "dd", r) for r in reps]
    m_rb = median_run(rb, lambda x: x["wall_s"])
    m_job = median_run(rb, lambda x: x["job_elapsed_ms"])
    m_cp = median_run(cps, lambda x: x["s"])
    m_dd = median_run(dds, lambda x: x["s"])
    goal_ratio = ratio(m_rb["mb_s_wall"], m_cp["mb_s"])
    job_ratio = ratio(m_job["mb_s_job"], m_cp["mb_s"])
    rs = {p: [resync_run(j, p, r, m_job["job_elapsed_ms"]) for r in reps] for p in pcts}
    m_rs = {p: median_run(rs[p], lambda x: x["job_elapsed_ms"]) for p in pcts}

    f0, f1, f2 = "{:,.0f}", "{:,.1f}", "{:.2f}"
    out = []
    out.append("# Rebuild and resync benchmark: Cairn against cp --sparse=always")
    out.append("")
    out.append("Written by `bash bench/rebuild.sh`; see `bench/README.md` for what is measured.")
    out.append("")
    out.append("## Goal")
    out.append("")
    verdict = "no verdict" if goal_ratio is None else (
        "MET" if goal_ratio >= GOAL_RATIO else "NOT MET")
    out.append(
        f"- Rebuild throughput >= {GOAL_RATIO}x `cp --sparse=always` of the same data on the "
        f"same disk (medians, both timed until the copy is on disk): Cairn "
        f"{num(m_rb['mb_s_wall'])} MB/s ({num(m_rb['bytes_copied'])} bytes in "
        f"{num(m_rb['wall_s'], f2)} s, wall time of `replica add --wait`) vs cp "
        f"{num(m_cp['mb_s'])} MB/s ({num(m_cp['src_alloc'])} bytes in {num(m_cp['s'], f2)} s) "
        f"= {num(goal_ratio, '{:.2f}x')}: **{verdict}**"
    )
    out.append(
        f"- The same on the job's own clock (`elapsed_ms`, from the engine's attach to RW, "
        f"without the CLI's 200 ms polling): {num(m_job['mb_s_job'])} MB/s = "
        f"{num(job_ratio, '{:.2f}x')} cp; against dd: "
        f"{num(ratio(m_rb['mb_s_wall'], m_dd['mb_s']), '{:.2f}x')} (wall) / "
        f"{num(ratio(m_job['mb_s_job'], m_dd['mb_s']), '{:.2f}x')} (job)."
    )
    out.append("")

    out.append("## 1. Full rebuild of an empty replica")
    out.append("")
    out.append(
        f"Volume of {a.size:,} bytes holding {fill['io_bytes']:,} bytes of random data at "
        "random 1 MiB-aligned places (half the volume, each MiB written once; the rest are "
        "holes), flushed. Each repetition starts an empty `cairn replica serve` at 127.0.0.9, "
        "removes the replica added last (r3 first) so the volume keeps three, drops the page "
        "cache and times `cairn volume replica add --wait` until the new replica is RW. The "
        "peers copy r1's head data file (`layers/*.data`, the same bytes, holes included) to "
        "a new file on the same filesystem after the same cache drop, and are timed until an "
        "fsync of the copy returns (the rebuild also ends with a flush of the new replica). "
        "MB/s counts the data bytes: Cairn's `last_resync_bytes`, the source file's "
        "allocated bytes for cp and dd."
    )
    out.append("")
    out.append("| copy | bytes | time s | MB/s | x cp |")
    out.append("|---|---:|---:|---:|---:|")
    out.append(
        f"| Cairn rebuild, wall (`replica add --wait`) | {num(m_rb['bytes_copied'])} "
        f"| {num(m_rb['wall_s'], f2)} | {num(m_rb['mb_s_wall'])} | {num(goal_ratio, f2)} |"
    )
    out.append(
        f"| Cairn rebuild, job `elapsed_ms` | {num(m_job['job_bytes_copied'])} "
        f"| {num(m_job['job_elapsed_ms'] / 1000, f2)} | {num(m_job['mb_s_job'])} "
        f"| {num(job_ratio, f2)} |"
    )
    out.append(
        f"| `cp --sparse=always` + fsync | {num(m_cp['src_alloc'])} | {num(m_cp['s'], f2)} "
        f"| {num(m_cp['mb_s'])} | 1.00 |"
    )
    out.append(
        f"| `dd bs=1M conv=sparse` + fsync | {num(m_dd['src_alloc'])} | {num(m_dd['s'], f2)} "
        f"| {num(m_dd['mb_s'])} | {num(ratio(m_dd['mb_s'], m_cp['mb_s']), f2)} |"
    )
    out.append("")
    out.append(
        f"Medians of {a.repeat} repetitions. Without the final fsync, cp took "
        f"{num(m_cp['s_without_fsync'], f2)} s and dd {num(m_dd['s_without_fsync'], f2)} s "
        "(their median runs). The rebuild's own rate field (`rate_bytes_per_sec`, bytes done "
        f"over elapsed) read {num(m_job['job_rate_bytes_per_sec'] / MB)} MB/s; its "
        f"`bytes_total` was {num(m_job['job_bytes_total'])}."
    )
    out.append("")
    out.append(
        "Every repetition. CPU in cores busy over the timed step: own = the step's processes "
        "(Cairn: `cairn dev`, its replicas, the added server and the CLI; cp or dd and the "
        "`sync`), other = the rest of the machine (other programs, kernel threads such as "
        f"writeback; above {DISTURBED_CORES} the step was disturbed)."
    )
    out.append("")
    out.append(
        "| rep | new replica (replaced) | source | bytes copied | wall s | MB/s wall "
        "| job ms | job MB/s | cp s (no fsync) | cp MB/s | dd s (no fsync) | dd MB/s "
        "| Cairn wall x cp | CPU own / other: Cairn, cp, dd |"
    )
    out.append("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for x, c, d in zip(rb, cps, dds):
        cores = ", ".join(
            f"{num(y['own_cores'], f2)} / {num(y['other_cores'], f2)}" for y in (x, c, d))
        out.append(
            f"| {x['rep']} | {x['id']} ({x['replaced']}) | {x['source']} "
            f"| {num(x['bytes_copied'])} | {num(x['wall_s'], f2)} | {num(x['mb_s_wall'])} "
            f"| {num(x['job_elapsed_ms'])} | {num(x['mb_s_job'])} "
            f"| {num(c['s'], f2)} ({num(c['s_without_fsync'], f2)}) | {num(c['mb_s'])} "
            f"| {num(d['s'], f2)} ({num(d['s_without_fsync'], f2)}) | {num(d['mb_s'])} "
            f"| {num(ratio(x['mb_s_wall'], c['mb_s']), f2)} | {cores} |"
        )
    out.append("")
    disturbed = [
        f"{name} rep {y['rep']} ({y['other_cores']:.2f})"
        for name, ys in (("Cairn rebuild", rb), ("cp", cps), ("dd", dds))
        for y in ys
        if y["other_cores"] is not None and y["other_cores"] > DISTURBED_CORES
    ]
    if disturbed:
        out.append(
            f"**Disturbed steps** (other CPU above {DISTURBED_CORES} cores): "
            + "; ".join(disturbed)
            + ". Treat these runs, and medians built on them, with care."
        )
        out.append("")

    out.append("## 2. Resync of a replica that was down during writes")
    out.append("")
    out.append(
        "Each round waits until r2 has run a minute (so `cairn dev` restarts it after 1 s), "
        "drops the page cache, and runs fio (64 KiB random writes at 4 KiB-aligned offsets "
        "over the whole volume, QD32, one NBD connection); fio's `exec_prerun` kills r2 with "
        "SIGKILL after fio connected, right before its first write. The engine marks r2 ERR "
        "on the first write it fails to send, logs the 64 KiB regions written meanwhile, and "
        "resyncs r2 once `cairn dev` restarted it; the round ends when "
        "`cairn volume rebuild wait vol0 r2` returns (r2 RW) and `cairn volume verify` shows "
        "one digest. \"Written while out\" counts the writes fio saw complete before the "
        "resync job started (`started_unix_ms`); later writes reached r2 directly. \"Regions "
        "touched\" is 64 KiB times the distinct 64 KiB regions those writes touched (a "
        "4 KiB-aligned 64 KiB write spans two regions unless it is 64 KiB-aligned): what an "
        "exact outage log holds. `bytes_total` is what the job had to bring over (regions "
        "logged); bytes copied (`last_resync_bytes`) leaves out blocks that were never "
        "written (holes in the source) and blocks that clients overwrote during the copy."
    )
    out.append("")
    out.append(
        "| written | client bytes | written while out | regions touched | job bytes_total "
        "| bytes copied | copied x written | resync ms | MB/s | x full rebuild time "
        "| kill -> RW ms |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in pcts:
        x = m_rs[p]
        out.append(
            f"| {p} % | {num(x['client_bytes'])} | {num(x['bytes_before_back'])} "
            f"| {num(x['regions_bytes'])} | {num(x['job_bytes_total'])} "
            f"| {num(x['bytes_copied'])} | {num(x['copied_per_client'], f2)} "
            f"| {num(x['job_elapsed_ms'])} | {num(x['job_rate_bytes_per_sec'] / MB)} "
            f"| {num(x['vs_full_rebuild'], f2)} | {num(x['kill_to_rw_ms'])} |"
        )
    out.append("")
    out.append(
        f"Medians of {a.repeat} rounds each (by resync time). \"x full rebuild time\" is "
        f"the resync's `elapsed_ms` over the median full rebuild's "
        f"({num(m_job['job_elapsed_ms'])} ms for {num(m_job['job_bytes_copied'])} bytes, "
        "section 1). MB/s is the job's rate field (bytes of regions done over elapsed)."
    )
    out.append("")
    out.append("Every round:")
    out.append("")
    out.append(
        "| written | rep | client bytes | client MB/s | write ms | r2 back after kill, ms "
        "| last write -> r2 back, ms | written after r2 back | regions touched "
        "| job bytes_total | bytes copied | resync ms | kill -> RW ms |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in pcts:
        for x in rs[p]:
            out.append(
                f"| {p} % | {x['rep']} | {num(x['client_bytes'])} | {num(x['client_mb_s'])} "
                f"| {num(x['write_ms'])} | {num(x['outage_ms'])} "
                f"| {num(x['last_write_to_back_ms'])} | {num(x['bytes_after_back'])} "
                f"| {num(x['regions_bytes'])} | {num(x['job_bytes_total'])} "
                f"| {num(x['bytes_copied'])} | {num(x['job_elapsed_ms'])} "
                f"| {num(x['kill_to_rw_ms'])} |"
            )
    out.append("")
    overlap = [x for p in pcts for x in rs[p] if x["bytes_after_back"] > 0]
    if overlap:
        out.append(
            "**Overlap**: in "
            + "; ".join(f"{x['pct']} % round {x['rep']}" for x in overlap)
            + " fio was still writing when r2 came back (its restart after the 1 s backoff "
            "came before the last writes): the writes after that point went to r2 directly "
            "and are not in the outage log; compare bytes copied with \"written while out\" "
            "and \"regions touched\" there, not with all client bytes."
        )
    else:
        out.append(
            "Every write of every round completed before r2 came back (\"last write -> r2 "
            "back\" > 0): all client bytes were written while r2 was out."
        )
    out.append("")
    out.append(
        f"Fill before section 1: {fill['io_bytes']:,} bytes at {fill['bw_bytes'] / MB:,.0f} "
        "MB/s through NBD to three replicas."
    )
    out.append("")

    out.append("## Machine and run")
    out.append("")
    for fact in a.fact:
        k, _, v = fact.partition("=")
        out.append(f"- {k}: {v}")
    out.append("")

    with open(a.out, "w", encoding="utf-8") as f:
        f.write("\n".join(out))
    summary = {
        "goal": {"ratio_min": GOAL_RATIO, "ratio_wall": goal_ratio, "ratio_job": job_ratio,
                 "met": None if goal_ratio is None else goal_ratio >= GOAL_RATIO},
        "volume_bytes": a.size,
        "fill_bytes": fill["io_bytes"],
        "rebuild": rb,
        "cp": cps,
        "dd": dds,
        "resync": {str(p): rs[p] for p in pcts},
        "medians": {
            "rebuild_wall": m_rb,
            "rebuild_job": m_job,
            "cp": m_cp,
            "dd": m_dd,
            "resync": {str(p): m_rs[p] for p in pcts},
        },
        "facts": dict(f.partition("=")[::2] for f in a.fact),
    }
    with open(a.json_out, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
