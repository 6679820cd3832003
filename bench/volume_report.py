#!/usr/bin/env python3
"""Writes the Markdown report of bench/volume.sh from the JSON files one run left.

Inputs in --json-dir, per workload W, target T and repetition R (1..--repeat):
  W-T-R.json        fio --output-format=json
  W-T-R.cpu0.json   CPU snapshot before the run, W-T-R.cpu1.json after it: machine busy
                    ticks, this script's finished children (fio), and each server process
                    (role "server": qemu-nbd, nbdkit or cairn dev; role "replica": a Cairn
                    replica server) with its threads
and prefill-T.json (+ .cpu0/.cpu1) for each target.

Targets: raw (fio io_uring on a file), qemu (qemu-nbd), nbdkit (file plugin), cairn1 and
cairn3 (`cairn dev` with 1 and 3 replicas). Ratios are against qemu-nbd.

Each figure is the median run over the repetitions (by IOPS; for an even count, the upper
middle run); latencies and CPU come from that same run. Standard library only.
"""

import argparse
import json
import os
import re
import sys

from report_common import load, num, ratio

TITLES = {
    "rw4k-qd1": "4 KiB random write, QD1",
    "rw4k-qd32": "4 KiB random write, QD32",
    "rr4k-qd32": "4 KiB random read, QD32",
    "sw1m-qd8": "1 MiB sequential write, QD8",
}

LABELS = {
    "raw": "raw file (fio io_uring)",
    "qemu": "qemu-nbd",
    "nbdkit": "nbdkit file",
    "cairn1": "Cairn, 1 replica",
    "cairn3": "Cairn, 3 replicas",
}

BASE = "qemu"
# A run whose "other" CPU (machine busy minus the run's own processes) exceeds this is flagged.
DISTURBED_CORES = 0.3
GB = 1e9


def pct(side, kind, p):
    v = side.get(kind, {}).get("percentile", {}).get(p)
    return None if v is None else v / 1000.0


def fio_figures(doc):
    job = doc["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
    return {
        "iops": side["iops"],
        "bw": side["bw_bytes"],
        "mib_s": side["bw_bytes"] / 2**20,
        "clat50": pct(side, "clat_ns", "50.000000"),
        "clat99": pct(side, "clat_ns", "99.000000"),
        "lat50": pct(side, "lat_ns", "50.000000"),
        "lat99": pct(side, "lat_ns", "99.000000"),
        "errors": job.get("error", 0),
    }


def thread_group(comm):
    """Groups thread names: 'iou-wrk-1234' -> 'iou-wrk', 'tokio-runtime-w' stays."""
    return re.sub(r"[-_:]?\d+$", "", comm) or comm


def cpu_figures(c0, c1):
    hz = c0["hz"]
    wall = c1["time"] - c0["time"]
    f = {"wall": wall}
    if wall <= 0:
        return f
    f["machine"] = (c1["machine"] - c0["machine"]) / hz / wall
    f["fio"] = (c1["children"] - c0["children"]) / hz / wall
    before = {p["pid"]: p for p in c0["procs"]}
    f["server"] = 0.0
    f["replicas"] = 0.0
    groups = {}
    for p in c1["procs"]:
        b = before.get(p["pid"])
        if b is None:
            continue
        cores = (p["ticks"] - b["ticks"]) / hz / wall
        f["server" if p["role"] == "server" else "replicas"] += cores
        who = "replicas" if p["role"] == "replica" else (
            "cairn dev" if p["comm"] == "cairn" else p["comm"])
        seen = 0.0
        for tid, (comm, ticks) in p["threads"].items():
            t0 = b["threads"].get(tid, [comm, 0])[1]
            c = (ticks - t0) / hz / wall
            seen += c
            key = (who, thread_group(comm))
            groups[key] = groups.get(key, 0.0) + c
        if cores - seen > 0.005:
            key = (who, "(exited threads)")
            groups[key] = groups.get(key, 0.0) + cores - seen
    f["groups"] = groups
    f["other"] = max(0.0, f["machine"] - f["fio"] - f["server"] - f["replicas"])
    return f


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json-dir", required=True)
    ap.add_argument("--workloads", required=True)
    ap.add_argument("--targets", required=True)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fact", action="append", default=[], help="KEY=VALUE machine fact")
    a = ap.parse_args()
    targets = a.targets.split()
    workloads = a.workloads.split()

    def j(name):
        return os.path.join(a.json_dir, name)

    def one(base):
        fig = fio_figures(load(j(base + ".json")))
        fig.update(cpu_figures(load(j(base + ".cpu0.json")), load(j(base + ".cpu1.json"))))
        return fig

    def median_run(runs):
        ordered = sorted(runs, key=lambda f: f["iops"])
        med = dict(ordered[len(ordered) // 2])
        med["min"] = ordered[0]["iops"]
        med["max"] = ordered[-1]["iops"]
        return med

    reps = range(1, a.repeat + 1)
    runs = {}  # (w, t) -> [fig per rep]
    med = {}  # (w, t) -> median fig
    for w in workloads:
        for t in targets:
            runs[(w, t)] = [one(f"{w}-{t}-{r}") for r in reps]
            for r, f in zip(reps, runs[(w, t)]):
                f["rep"] = r
            med[(w, t)] = median_run(runs[(w, t)])

    def get(w, t):
        return med.get((w, t))

    out = []
    out.append("# Volume benchmark: Cairn vs qemu-nbd, nbdkit and a raw file (fio)")
    out.append("")
    out.append("Written by `bash bench/volume.sh`; see `bench/README.md` for what is measured.")
    out.append("")

    # --- goals ---------------------------------------------------------------------------
    out.append("## Goals")
    out.append("")
    goal_lines = []

    def goal(text, ok):
        if ok is None:
            goal_lines.append(f"- {text}: **no verdict** (workload or target not in this run)")
        else:
            goal_lines.append(f"- {text}: **{'MET' if ok else 'NOT MET'}**")

    for w in ("rw4k-qd32", "rr4k-qd32"):
        c, q = get(w, "cairn1"), get(w, BASE)
        r = ratio(c and c["iops"], q and q["iops"])
        goal(
            f"1 replica >= 1.3x qemu-nbd IOPS at QD32, {TITLES[w]}: "
            f"{num(c and c['iops'])} vs {num(q and q['iops'])} IOPS = {num(r, '{:.2f}x')}",
            None if r is None else r >= 1.3,
        )
    c, q = get("rw4k-qd1", "cairn1"), get("rw4k-qd1", BASE)
    if c and q and None not in (c["lat50"], c["lat99"], q["lat50"], q["lat99"]):
        ok = c["lat50"] <= q["lat50"] and c["lat99"] <= q["lat99"]
        goal(
            "1 replica QD1 latency no worse than qemu-nbd (4 KiB random write QD1, latency "
            f"p50 and p99): p50 {c['lat50']:,.1f} vs {q['lat50']:,.1f} µs, "
            f"p99 {c['lat99']:,.1f} vs {q['lat99']:,.1f} µs "
            f"(IOPS {c['iops']:,.0f} vs {q['iops']:,.0f})",
            ok,
        )
    else:
        goal("1 replica QD1 latency no worse than qemu-nbd", None)
    for w in ("rw4k-qd32", "rr4k-qd32"):
        c, q = get(w, "cairn3"), get(w, BASE)
        r = ratio(c and c["iops"], q and q["iops"])
        goal(
            f"3 replicas >= 0.8x qemu-nbd IOPS at QD32, {TITLES[w]}: "
            f"{num(c and c['iops'])} vs {num(q and q['iops'])} IOPS = {num(r, '{:.2f}x')}",
            None if r is None else r >= 0.8,
        )
    c = get("sw1m-qd8", "cairn3")
    goal(
        "1 MiB sequential write (QD8) with 3 replicas >= 0.9 GB/s: "
        + (f"{c['bw'] / GB:.2f} GB/s ({c['mib_s']:,.0f} MiB/s)" if c else "n/a"),
        None if c is None else c["bw"] >= 0.9 * GB,
    )
    out.extend(goal_lines)
    out.append("")
    out.append(
        "\"At QD32\" is checked on both 4 KiB QD32 workloads (random write and random read); "
        "GB is 10^9 bytes. Latency is fio's total latency `lat` (from the moment fio "
        "submits a request until it sees it complete); see below for why not `clat`."
    )
    out.append("")

    disturbed = [
        (w, t, f["other"])
        for w in workloads
        for t in targets
        for f in [get(w, t)]
        if f.get("other") is not None and f["other"] > DISTURBED_CORES
    ]
    if disturbed:
        out.append(
            f"**Disturbed runs** (other CPU above {DISTURBED_CORES} cores: something besides "
            "the run's own processes was busy, such as kernel writeback or other programs; "
            "treat these figures, and ratios built on them, with care): "
            + "; ".join(
                f"{TITLES.get(w, w)} on {LABELS.get(t, t)} ({o:.2f})" for w, t, o in disturbed
            )
            + "."
        )
        out.append("")

    # --- per-workload tables -------------------------------------------------------------
    out.append("## Results per workload")
    out.append("")
    note = (
        "IOPS and MiB/s over the measured window. Latency in microseconds: p50/p99 of fio's "
        "`lat` (slat + clat: from the start of submission until fio sees the completion). "
        "`clat` alone is shown for reference but is not comparable across targets: with the "
        "nbd engine, libnbd sends the request inside fio's submit call and may already read "
        "replies there, so part of the round trip lands in `slat` (nbdkit at QD1 shows a "
        "clat p50 of a few µs against a lat p50 of tens). "
        "`x qemu` is the target's figure over qemu-nbd's (IOPS: higher is better; latency: "
        "lower is better). CPU in cores busy over the run (the machine has "
        f"{os.cpu_count()}), ramp included: fio (with its io_uring workers), the server "
        "process (qemu-nbd, nbdkit, or `cairn dev` = engine + NBD server), Cairn's replica "
        "server processes (summed), and other = the whole machine's busy CPU minus those "
        "(kernel writeback, other programs: well above 0.1 means the run was disturbed)."
    )
    if a.repeat > 1:
        note += (
            f" Medians of {a.repeat} repetitions (by IOPS), lowest and highest IOPS in "
            "brackets; latency and CPU are those of the median run."
        )
    out.append(note)
    out.append("")
    for w in workloads:
        q = get(w, BASE)
        out.append(f"### {TITLES.get(w, w)}")
        out.append("")
        out.append(
            "| target | IOPS | MiB/s | IOPS x qemu | lat p50 | lat p99 | p50 x qemu "
            "| clat p50 / p99 | CPU fio / server / replicas / other |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in targets:
            f = get(w, t)
            iops = num(f["iops"])
            if a.repeat > 1:
                iops += f" ({num(f['min'])}-{num(f['max'])})"
            f1, f2 = "{:,.1f}", "{:.2f}"
            cpu = " / ".join(
                num(f.get(k), f2) if (k != "replicas" or t.startswith("cairn")) and
                (k != "server" or t != "raw") else "-"
                for k in ("fio", "server", "replicas", "other")
            )
            out.append(
                f"| {LABELS.get(t, t)} | {iops} | {num(f['mib_s'], f1)} "
                f"| {num(ratio(f['iops'], q and q['iops']), '{:.2f}x')} "
                f"| {num(f['lat50'], f1)} | {num(f['lat99'], f1)} "
                f"| {num(ratio(f['lat50'], q and q['lat50']), '{:.2f}x')} "
                f"| {num(f['clat50'], f1)} / {num(f['clat99'], f1)} | {cpu} |"
            )
        out.append("")

    # --- summary matrix ------------------------------------------------------------------
    out.append("## Summary: IOPS relative to qemu-nbd")
    out.append("")
    out.append("| workload | " + " | ".join(LABELS.get(t, t) for t in targets) + " |")
    out.append("|---|" + "---:|" * len(targets))
    for w in workloads:
        q = get(w, BASE)
        cells = [num(ratio(get(w, t)["iops"], q and q["iops"]), "{:.2f}x") for t in targets]
        out.append(f"| {TITLES.get(w, w)} | " + " | ".join(cells) + " |")
    out.append("")

    # --- CPU by thread for the servers ---------------------------------------------------
    out.append("## Server CPU by thread")
    out.append("")
    out.append(
        "Cores busy per thread group over the median run (ramp included), for every process "
        "a target runs: qemu-nbd / nbdkit / `cairn dev` (engine + NBD) and, for Cairn, the "
        "replica servers summed. Thread names as the kernel shows them (`iou-wrk` are "
        "io_uring workers; exited threads are counted from the process totals)."
    )
    out.append("")
    out.append("| workload | target | threads (cores) |")
    out.append("|---|---|---|")
    for w in workloads:
        for t in targets:
            if t == "raw":
                continue
            g = get(w, t).get("groups", {})
            parts = [
                f"{who}: {name} {c:.2f}"
                for (who, name), c in sorted(g.items(), key=lambda kv: (kv[0][0], -kv[1]))
                if c >= 0.01
            ]
            out.append(f"| {TITLES.get(w, w)} | {LABELS.get(t, t)} | {'; '.join(parts) or '-'} |")
    out.append("")

    # --- prefill -------------------------------------------------------------------------
    pre = []
    for t in targets:
        p = j(f"prefill-{t}.json")
        if os.path.exists(p):
            pre.append(f"{LABELS.get(t, t)} {fio_figures(load(p))['mib_s']:,.0f} MiB/s")
    if pre:
        out.append("## Prefill")
        out.append("")
        out.append(
            "Sequential 1 MiB writes, QD8, over the whole size, the first write of every block "
            "(not part of the ratios): " + "; ".join(pre) + "."
        )
        out.append("")

    # --- every run -----------------------------------------------------------------------
    if a.repeat > 1:
        out.append("## Every run")
        out.append("")
        out.append("IOPS of each repetition (one repetition runs every target back to back).")
        out.append("")
        out.append("| workload | rep | " + " | ".join(LABELS.get(t, t) for t in targets) + " |")
        out.append("|---|---:|" + "---:|" * len(targets))
        for w in workloads:
            for i in range(a.repeat):
                cells = [num(runs[(w, t)][i]["iops"]) for t in targets]
                out.append(f"| {TITLES.get(w, w)} | {i + 1} | " + " | ".join(cells) + " |")
        out.append("")

    out.append("## Machine and run")
    out.append("")
    for fact in a.fact:
        k, _, v = fact.partition("=")
        out.append(f"- {k}: {v}")
    out.append("")

    with open(a.out, "w", encoding="utf-8") as f:
        f.write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
