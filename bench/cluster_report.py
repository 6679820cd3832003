#!/usr/bin/env python3
"""Writes the Markdown report of bench/cluster.sh from what one run left.

Inputs in --json-dir:
  heal-R.heal.json        the poller's view of repetition R: kill, down, replaced, healthy
                          (Unix s, when a 0.1 s poll first saw the change), victim, replacement
  heal-R.status.json      `cairn volume status vol0 --json` on node-1 once vol0 is healthy
  heal-R.cp.json          {start, copied, synced (Unix s), src, src_alloc, dst_alloc (bytes)}
  heal-R.verify.txt       `cairn volume verify vol0` after the heal
  idle-setup.json         {start, end (Unix s, creating and attaching the volumes), volumes}
  idle-pids.json          {"node-1": PID, "node-2": PID, "meta-1": PID, "dev": PID}
  idle-samples.jsonl      one proc sample per line: time, hz, per pid ticks, rss_kib, threads
  idle-strace-PID.txt     strace -c -f -p PID over 10 s, after the measurement

MB is 10^6 bytes, MiB 2^20. Standard library only.
"""

import argparse
import json
import os
import statistics

from report_common import load, num, ratio

GOAL_CPU_PCT = 1.0
GOAL_RSS_PER_VOLUME_MIB = 16.0
MB = 1e6
MIB = 1 << 20


def rebuild_job(status, name):
    """The replacement's engine view: by id if it matches, else the last rebuild job."""
    reps = status.get("replicas", [])
    for r in reps:
        if r.get("id") == name:
            return r
    jobs = [r for r in reps if (r.get("rebuild") or {}).get("kind") == "rebuild"]
    jobs.sort(key=lambda r: (r.get("rebuild") or {}).get("started_unix_ms", 0))
    return jobs[-1] if jobs else None


def heal_run(j, r):
    h = load(j(f"heal-{r}.heal.json"))
    st = load(j(f"heal-{r}.status.json"))
    cp = load(j(f"heal-{r}.cp.json"))
    k = h["kill"]
    rep = rebuild_job(st, h["replacement"]) or {}
    job = rep.get("rebuild") or {}
    copied = rep.get("last_resync_bytes") or job.get("bytes_copied")
    elapsed = job.get("elapsed_ms")
    cp_s = cp["synced"] - cp["start"]
    started = job.get("started_unix_ms")
    verify = open(j(f"heal-{r}.verify.txt"), encoding="utf-8").read().strip()
    c0, c1 = h.get("cpu_replaced"), h.get("cpu_healthy")
    cores = {}
    if c0 and c1 and c1["time"] > c0["time"]:
        w = (c1["time"] - c0["time"]) * h["hz"]
        cores = {k: (c1[k] - c0[k]) / w for k in ("machine", "cairn", "poller")}
        cores["other"] = max(0.0, cores["machine"] - cores["cairn"] - cores["poller"])
    return {
        "rep": r,
        "node": h["node"],
        "victim": h["victim"],
        "replacement": h["replacement"],
        "replacement_node": h["replacement_node"],
        "down_s": h["down"] - k,
        "replaced_s": h["replaced"] - k,
        "wait_s": h["replaced"] - h["down"],
        "healthy_s": h["healthy"] - k,
        "rebuild_wall_s": h["healthy"] - h["replaced"],
        "job_start_after_replace_s": None if started is None else started / 1000 - h["replaced"],
        "job_s": None if elapsed is None else elapsed / 1000,
        "job_id": rep.get("id"),
        "job_kind": job.get("kind"),
        "job_state": job.get("state"),
        "job_source": job.get("source"),
        "copied": copied,
        "job_rate": job.get("rate_bytes_per_sec"),
        "cp_s": cp_s,
        "cp_bytes": cp["src_alloc"],
        "cp_rate": cp["src_alloc"] / cp_s if cp_s > 0 else None,
        "time_ratio": ratio(elapsed / 1000 if elapsed else None, cp_s),
        "rate_ratio": ratio(copied / (elapsed / 1000) if copied and elapsed else None,
                            cp["src_alloc"] / cp_s if cp_s > 0 else None),
        "down_reason": h.get("down_reason"),
        "victim_after": h.get("victim_after", {}),
        "polls": h.get("polls"),
        "verify": verify,
        "cores": cores,
    }


def med(runs, key):
    vals = [x[key] for x in runs if x[key] is not None]
    return statistics.median(vals) if vals else None


def heal_section(j, repeat, down_timeout, replenish_wait):
    runs = []
    for r in range(1, repeat + 1):
        if os.path.exists(j(f"heal-{r}.heal.json")):
            runs.append(heal_run(j, r))
    out = ["## 1. Heal time after a node dies", ""]
    if not runs:
        return out + ["No heal run completed.", ""]
    s = "{:.1f}"
    out += [
        f"`--node-down-timeout {down_timeout} --replica-replenish-wait {replenish_wait}`, 4 nodes, "
        f"vol0 1 GiB with 3 replicas attached to node-1; the agent of a node holding a replica "
        f"of vol0 (not node-1) is SIGKILLed and kept dead. Seconds from the kill, medians over "
        f"{len(runs)} run(s) (each run below):",
        "",
        "| phase | seconds | what it is |",
        "|---|---:|---|",
        f"| detection | {num(med(runs, 'down_s'), s)} | kill to node DOWN (timeout {down_timeout}, "
        f"controller ticks every 1 s) |",
        f"| replenish wait | {num(med(runs, 'wait_s'), s)} | DOWN to the replacement replica record "
        f"(wait {replenish_wait}, counted from the last heartbeat) |",
        f"| rebuild (wall) | {num(med(runs, 'rebuild_wall_s'), s)} | replacement record to vol0 "
        f"healthy, all replicas RW: agent start of the replica, engine attach, copy, report |",
        f"| of which the rebuild job | {num(med(runs, 'job_s'), '{:.2f}')} | the engine's own "
        f"`elapsed_ms` |",
        f"| **total** | **{num(med(runs, 'healthy_s'), s)}** | kill to vol0 healthy |",
        "",
        f"Rebuild against cp of the same data (node-1's replica data file, "
        f"{num(med(runs, 'cp_bytes'))} bytes allocated): job "
        f"{num(med(runs, 'job_s'), '{:.2f}')} s for {num(med(runs, 'copied'))} bytes copied, cp "
        f"{num(med(runs, 'cp_s'), '{:.2f}')} s (with fsync, cold cache). "
        f"**Rebuild time / cp time = {num(med(runs, 'time_ratio'), '{:.2f}')}**; throughput "
        f"ratio (bytes copied per job second over cp's bytes per second) = "
        f"{num(med(runs, 'rate_ratio'), '{:.2f}')}. "
        f"On the wall clock (replacement record to healthy) the rebuild takes "
        f"{num(ratio(med(runs, 'rebuild_wall_s'), med(runs, 'cp_s')), '{:.1f}')}x cp's time.",
        "",
        "### Every run",
        "",
        "| run | killed | replica | replaced by | down s | replaced s | healthy s | job start - record seen s | job s | copied bytes | job MB/s | cp s | cp MB/s | job/cp time | polls |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in runs:
        out.append(
            f"| {x['rep']} | {x['node']} | {x['victim']} | {x['replacement']} on "
            f"{x['replacement_node']} | {x['down_s']:.2f} | {x['replaced_s']:.2f} | "
            f"{x['healthy_s']:.2f} | {num(x['job_start_after_replace_s'], '{:.2f}')} | "
            f"{num(x['job_s'], '{:.2f}')} | {num(x['copied'])} | "
            f"{num(x['job_rate'] / MB if x['job_rate'] else None)} | {x['cp_s']:.2f} | "
            f"{num(x['cp_rate'] / MB if x['cp_rate'] else None)} | "
            f"{num(x['time_ratio'], '{:.2f}')} | {x['polls']} |"
        )
    out += ["", "CPU over the rebuild phase (replacement record seen to healthy), in cores busy "
            "(2 would be all of a 2-core machine):", "",
            "| run | machine | cluster's cairn processes | poller's CLI calls | other |",
            "|---|---:|---:|---:|---:|"]
    for x in runs:
        c = x["cores"]
        out.append(f"| {x['rep']} | {num(c.get('machine'), '{:.2f}')} | {num(c.get('cairn'), '{:.2f}')} | "
                   f"{num(c.get('poller'), '{:.2f}')} | {num(c.get('other'), '{:.2f}')} |")
    out += ["", "Other above about 0.3 cores means something else ran on the machine during the "
            "rebuild (a build, tests, kernel writeback) and slowed it.", ""]
    out += ["\"job start - record seen\" is the job's `started_unix_ms` minus the poll that "
            "first saw the replacement record: a poll can be up to 0.1 s late, so it can be "
            "slightly negative.", "", "Details:", ""]
    for x in runs:
        va = x["victim_after"]
        out.append(
            f"- run {x['rep']}: down reason \"{x['down_reason']}\"; {x['victim']} after the "
            f"replacement: mode {va.get('mode')}, health {va.get('health')}, deleted "
            f"{va.get('deleted')}, \"{va.get('health_reason')}\"; engine job on "
            f"{x['job_id']}: {x['job_kind']} {x['job_state']} from {x['job_source']}; verify: "
            f"`{' / '.join(x['verify'].splitlines())}`"
        )
    out.append("")
    return out


def idle_section(j):
    if not os.path.exists(j("idle-samples.jsonl")):
        return ["## 2. Idle agent", "", "Not run.", ""]
    setup = load(j("idle-setup.json"))
    out = [f"## 2. Idle agent with {setup['volumes']} volumes", ""]
    pids = load(j("idle-pids.json"))
    nvol = setup["volumes"]
    with open(j("idle-samples.jsonl"), encoding="utf-8") as f:
        samples = [json.loads(line) for line in f if line.strip()]
    a, b = samples[0], samples[-1]
    wall = b["time"] - a["time"]
    hz = a["hz"]
    rows = []
    res = {}
    for label, what in (("node-1", f"agent: {nvol} engines + NBD exports, {nvol} replicas"),
                        ("node-2", f"agent: {nvol} replicas, no engine"),
                        ("meta-1", "meta member (the only one)"),
                        ("dev", "`cairn dev` supervisor")):
        pid = str(pids[label])
        if pid not in a["procs"] or pid not in b["procs"]:
            continue
        cpu = (b["procs"][pid]["ticks"] - a["procs"][pid]["ticks"]) / hz / wall * 100
        rss = [s["procs"][pid]["rss_kib"] / 1024 for s in samples if pid in s["procs"]]
        threads = len(b["procs"][pid]["threads"])
        res[label] = {"cpu": cpu, "rss_last": rss[-1], "rss_max": max(rss), "threads": threads}
        per = f"{rss[-1] / nvol:.2f}" if label in ("node-1", "node-2") else "-"
        ticks = b["procs"][pid]["ticks"] - a["procs"][pid]["ticks"]
        rows.append(f"| {label} | {what} | {pid} | {cpu:.3f} ({ticks} ticks) | {rss[0]:.1f} | {rss[-1]:.1f} | "
                    f"{max(rss):.1f} | {per} | {threads} |")
    own = sum((b["procs"][p]["ticks"] - a["procs"][p]["ticks"]) for p in b["procs"] if p in a["procs"])
    machine_cores = (b["machine"] - a["machine"]) / hz / wall if "machine" in a else None
    other_cores = None if machine_cores is None else max(0.0, machine_cores - own / hz / wall)
    n1 = res.get("node-1", {})
    cpu_ok = n1.get("cpu", 1e9) < GOAL_CPU_PCT
    rss_ok = n1.get("rss_max", 1e9) / nvol < GOAL_RSS_PER_VOLUME_MIB
    out += [
        f"`cairn dev --nodes 3 --replicas 3 --size 64MiB`, then {nvol - 1} more 64 MiB volumes "
        f"with 3 replicas created and attached to node-1 "
        f"({setup['created'] - setup['start']:.1f} s to create them and see them placed, "
        f"{setup['end'] - setup['created']:.1f} s to attach them one by one, each attach "
        f"returning once its export serves); "
        f"after 10 s of idling, {wall:.0f} s measured (samples every 5 s).",
        "",
        f"**Goal (node-1's agent): < {GOAL_CPU_PCT:g} % of a core: "
        f"{'MET' if cpu_ok else 'NOT MET'} ({num(n1.get('cpu'), '{:.3f}')} %); "
        f"< {GOAL_RSS_PER_VOLUME_MIB:g} MiB RSS per volume: {'MET' if rss_ok else 'NOT MET'} "
        f"({num(n1.get('rss_max', 0) / nvol, '{:.2f}')} MiB, max RSS over the window / {nvol}).**",
        "",
        "| process | role | pid | CPU % of one core | RSS MiB first | RSS MiB last | RSS MiB max | RSS MiB per volume (last) | threads |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"CPU is (utime + stime) over the window from `/proc/PID/stat` (one tick = 1/{hz} s, "
        f"so {100 / hz / wall:.3f} % over this window), RSS is `VmRSS`. The whole machine "
        f"was {num(machine_cores, '{:.2f}')} cores busy over the window, "
        f"{num(other_cores, '{:.2f}')} of them outside these four processes (the rest of the "
        f"machine: anything well above 0.05 means other work ran beside the idle cluster).",
        "",
        "### CPU by thread name over the window",
        "",
    ]
    for label in ("node-1", "node-2"):
        pid = str(pids[label])
        if pid not in a["procs"] or pid not in b["procs"]:
            continue
        ta, tb = a["procs"][pid]["threads"], b["procs"][pid]["threads"]
        by = {}
        for tid, (name, t) in tb.items():
            d = t - ta.get(tid, [name, 0])[1]
            n, c = by.get(name, (0, 0))
            by[name] = (n + 1, c + d)
        top = sorted(by.items(), key=lambda kv: -kv[1][1])
        cells = ", ".join(f"`{name}` x{n}: {c / hz / wall * 100:.2f} %" for name, (n, c) in top[:8])
        out.append(f"- {label}: {cells}")
    out += ["", "### strace -c -f, 10 s after the window", ""]
    for label in ("node-1", "node-2"):
        path = j(f"idle-strace-{pids[label]}.txt")
        if not os.path.exists(path):
            continue
        lines = [l.rstrip() for l in open(path, encoding="utf-8")]
        lines = [l for l in lines if l.strip()]
        waits = next((int(l.split()[3]) for l in lines if l.split()[-1:] == ["epoll_wait"]), None)
        if waits is not None:
            out += [f"{label}: {waits / 10:.0f} `epoll_wait` calls per second (each one a wake-up "
                    f"of a runtime worker), {waits / 10 / nvol:.2f} per volume.", ""]
        out += [f"{label} (pid {pids[label]}), by time spent in system calls:", "", "```",
                *lines[:14], *([lines[-1]] if len(lines) > 14 else []), "```", ""]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json-dir", required=True)
    ap.add_argument("--repeat", type=int, required=True)
    ap.add_argument("--parts", default="heal idle")
    ap.add_argument("--down-timeout", default="5s")
    ap.add_argument("--replenish-wait", default="10s")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fact", action="append", default=[])
    args = ap.parse_args()

    def j(name):
        return os.path.join(args.json_dir, name)

    out = ["# Cluster: heal time after a node dies, and an idle agent", ""]
    parts = args.parts.split()
    if "heal" in parts:
        out += heal_section(j, args.repeat, args.down_timeout, args.replenish_wait)
    if "idle" in parts:
        out += idle_section(j)
    out += ["## Setup", "", "| | |", "|---|---|"]
    for f in args.fact:
        k, _, v = f.partition("=")
        v = v.replace("|", "/")
        out.append(f"| {k} | {v} |")
    out.append("")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main()
