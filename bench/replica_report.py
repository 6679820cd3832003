#!/usr/bin/env python3
"""Writes the Markdown report of bench/replica.sh from the JSON files one run left.

Inputs in --json-dir, per workload W and repetition R (1..--repeat):
  W-raw-R.json           fio --output-format=json on the plain file
  W-ck-R.json            cairn-loadgen against the server with checksums
  W-nock-R.json          cairn-loadgen against the server with --no-checksums
  W-{ck,nock}-R.server.json  the server's CPU seconds over that loadgen run
  W-{raw,ck,nock}-R.machine.json  whole-machine busy CPU seconds and wall seconds of the run
and prefill-raw.json, prefill-ck.json, prefill-nock.json.

Each figure in the main tables is the median over the repetitions (for an even count, the
upper middle run); latencies and CPU come from that same median-IOPS run. Standard library
only.
"""

import argparse
import json
import os
import sys

from report_common import load, num, ratio

GOAL_WORKLOAD = "rw4k-qd32"
GOAL_RATIO = 0.7

TITLES = {
    "rw4k-qd1": "4 KiB random write, QD1",
    "rw4k-qd32": "4 KiB random write, QD32",
    "sw1m-qd8": "1 MiB sequential write, QD8",
    "rr4k-qd32": "4 KiB random read, QD32 (bonus)",
}


def fio_figures(doc):
    job = doc["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
    pct = side.get("lat_ns", {}).get("percentile") or side.get("clat_ns", {}).get("percentile", {})
    runtime_s = job.get("job_runtime", side.get("runtime", 0)) / 1000.0
    return {
        "iops": side["iops"],
        "mib_s": side["bw_bytes"] / 2**20,
        "p50": pct.get("50.000000", 0) / 1000.0 or None,
        "p99": pct.get("99.000000", 0) / 1000.0 or None,
        "fio_own_cores": (job["usr_cpu"] + job["sys_cpu"]) / 100.0,
        "seconds": runtime_s,
    }


def loadgen_figures(doc, server, machine):
    wall = machine["wall_s"]
    cores_server = server["server_cpu_s"] / wall if wall > 0 else None
    cores_gen = machine["client_cpu_s"] / wall if wall > 0 else None
    return {
        "iops": doc["iops"],
        "mib_s": doc["mib_s"],
        "p50": doc["lat_p50_us"],
        "p99": doc["lat_p99_us"],
        "cores_server": cores_server,
        "cores_gen": cores_gen,
        "seconds": doc["seconds"],
    }


def other(f):
    """Busy cores of the machine not used by the run's own processes."""
    own = f.get("cores")
    if own is None:
        if f.get("cores_server") is None or f.get("cores_gen") is None:
            return None
        own = f["cores_server"] + f["cores_gen"]
    if f.get("machine_cores") is None:
        return None
    return max(0.0, f["machine_cores"] - own)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json-dir", required=True)
    ap.add_argument("--workloads", required=True)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fact", action="append", default=[], help="KEY=VALUE machine fact")
    a = ap.parse_args()

    def j(name):
        return os.path.join(a.json_dir, name)

    def one(w, t, r):
        machine = load(j(f"{w}-{t}-{r}.machine.json"))
        if t == "raw":
            fig = fio_figures(load(j(f"{w}-raw-{r}.json")))
            wall = machine["wall_s"]
            fig["cores"] = machine["client_cpu_s"] / wall if wall > 0 else None
        else:
            fig = loadgen_figures(
                load(j(f"{w}-{t}-{r}.json")), load(j(f"{w}-{t}-{r}.server.json")), machine
            )
        fig["machine_cores"] = (
            machine["machine_busy_s"] / machine["wall_s"] if machine["wall_s"] > 0 else None
        )
        fig["rep"] = r
        return fig

    def median_run(runs):
        ordered = sorted(runs, key=lambda f: f["iops"])
        med = dict(ordered[len(ordered) // 2])
        med["min"] = ordered[0]["iops"]
        med["max"] = ordered[-1]["iops"]
        return med

    reps = range(1, a.repeat + 1)
    rows = []
    all_runs = []
    for w in a.workloads.split():
        per = {t: [one(w, t, r) for r in reps] for t in ("raw", "ck", "nock")}
        all_runs.append((w, per))
        rows.append((w, median_run(per["raw"]), median_run(per["ck"]), median_run(per["nock"])))

    out = []
    out.append("# Replica server vs raw file (fio io_uring)")
    out.append("")
    out.append("Written by `bash bench/replica.sh`; see `bench/README.md` for what is measured.")
    out.append("")
    out.append("## Throughput")
    out.append("")
    if a.repeat > 1:
        out.append(
            f"Medians of {a.repeat} repetitions, with the lowest and highest run in brackets; "
            "ratios are ratios of the medians."
        )
        out.append("")
    out.append(
        "| workload | raw file IOPS (fio) | replica IOPS | replica / raw "
        "| replica IOPS, no checksums | checksum cost (with / without) "
        "| MiB/s raw / replica / no checksums |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    def iops_cell(f):
        if a.repeat > 1:
            return f"{num(f['iops'])} ({num(f['min'])}-{num(f['max'])})"
        return num(f["iops"])

    for w, raw, ck, nock in rows:
        mib = "{} / {} / {}".format(
            num(raw["mib_s"], "{:,.1f}"), num(ck["mib_s"], "{:,.1f}"), num(nock["mib_s"], "{:,.1f}")
        )
        out.append(
            f"| {TITLES.get(w, w)} | {iops_cell(raw)} | {iops_cell(ck)} "
            f"| {num(ratio(ck['iops'], raw['iops']), '{:.2f}x')} | {iops_cell(nock)} "
            f"| {num(ratio(ck['iops'], nock['iops']), '{:.2f}x')} | {mib} |"
        )
    out.append("")
    out.append("## Latency and CPU")
    out.append("")
    out.append(
        "Latency is per request, from submission to completion (fio `lat_ns`, loadgen: send to "
        "reply), in microseconds. CPU is in cores busy (the machine has "
        f"{os.cpu_count()}) over the whole run, ramp included: fio with its io_uring worker "
        "threads; for the replica, the server process (its io_uring workers included) plus the "
        "load generator. Machine is the whole machine's busy CPU over the run: more than the "
        "run's own shows kernel writeback or something else running."
    )
    out.append("")
    out.append(
        "| workload | p50 raw / replica / no ck (µs) | p99 raw / replica / no ck (µs) "
        "| CPU raw (fio) | CPU replica: server + loadgen | CPU no ck: server + loadgen "
        "| machine raw / replica / no ck |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for w, raw, ck, nock in rows:
        f1 = "{:,.1f}"
        p50 = " / ".join(num(x[k], f1) for x in (raw, ck, nock) for k in ["p50"])
        p99 = " / ".join(num(x[k], f1) for x in (raw, ck, nock) for k in ["p99"])
        f2 = "{:.2f}"
        out.append(
            f"| {TITLES.get(w, w)} | {p50} | {p99} | {num(raw['cores'], f2)} "
            f"| {num(ck['cores_server'], f2)} + {num(ck['cores_gen'], f2)} "
            f"| {num(nock['cores_server'], f2)} + {num(nock['cores_gen'], f2)} "
            f"| {' / '.join(num(x['machine_cores'], f2) for x in (raw, ck, nock))} |"
        )
    out.append("")

    goal = [r for r in rows if r[0] == GOAL_WORKLOAD]
    out.append("## Goal")
    out.append("")
    if goal:
        _, raw, ck, nock = goal[0]
        r = ratio(ck["iops"], raw["iops"])
        verdict = "MET" if r is not None and r >= GOAL_RATIO else "NOT MET"
        out.append(
            f"Replica at 4 KiB random write QD32, checksums on, reaches "
            f"{num(r, '{:.2f}x')} of the raw file's IOPS (goal >= {GOAL_RATIO}x): **{verdict}**. "
            f"Checksums cost: with / without = {num(ratio(ck['iops'], nock['iops']), '{:.2f}x')}."
        )
    else:
        out.append(f"Workload {GOAL_WORKLOAD} was not part of this run: no verdict.")
    out.append("")

    pre = []
    for t, label in (("raw", "raw file (fio)"), ("ck", "replica"), ("nock", "replica, no checksums")):
        p = os.path.join(a.json_dir, f"prefill-{t}.json")
        if not os.path.exists(p):
            continue
        d = load(p)
        mib = fio_figures(d)["mib_s"] if t == "raw" else d["mib_s"]
        pre.append(f"{label} {mib:,.0f} MiB/s")
    if pre:
        out.append(
            "Prefill (sequential 1 MiB writes over the whole size, QD8, first write of every "
            "block, not part of the ratios): " + "; ".join(pre) + "."
        )
        out.append("")

    out.append("## Every run")
    out.append("")
    out.append(
        "IOPS of each repetition (runs of one repetition ran back to back: raw, replica, "
        "replica without checksums), the paired ratio, and other CPU: the whole machine's "
        "busy cores minus those of the run's own processes (kernel writeback, and anything "
        "else that was running; well above 0.1 on a 4 KiB run means the run was disturbed)."
    )
    out.append("")
    out.append(
        "| workload | rep | raw IOPS | replica IOPS | no-ck IOPS | replica / raw "
        "| with / without ck | other CPU raw / replica / no ck |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for w, per in all_runs:
        for i in range(a.repeat):
            raw, ck, nock = per["raw"][i], per["ck"][i], per["nock"][i]
            out.append(
                f"| {TITLES.get(w, w)} | {i + 1} | {num(raw['iops'])} | {num(ck['iops'])} "
                f"| {num(nock['iops'])} | {num(ratio(ck['iops'], raw['iops']), '{:.2f}x')} "
                f"| {num(ratio(ck['iops'], nock['iops']), '{:.2f}x')} "
                f"| {' / '.join(num(other(x), '{:.2f}') for x in (raw, ck, nock))} |"
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
