"""Writes the markdown report of bench/snapshots.sh from the JSON it collected."""

import argparse
import json
import os

from report_common import load, num, ratio


def pct(values, p):
    """Nearest-rank percentile of a non-empty list."""
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fio_side(path, side):
    job = load(path)["jobs"][0][side]
    pc = job["clat_ns"].get("percentile", {})
    return {
        "iops": job["iops"],
        "p50": pc.get("50.000000", 0) / 1000.0,
        "p99": pc.get("99.000000", 0) / 1000.0,
        "p999": pc.get("99.900000", 0) / 1000.0,
        "max": job["clat_ns"]["max"] / 1000.0,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json-dir", required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fact", action="append", default=[])
    a = ap.parse_args()
    d = a.json_dir
    lines = ["# Snapshots: pause under load, 1,000 snapshots, reads through the layers", ""]

    # --- pause
    pause = jsonl(os.path.join(d, "pause.jsonl"))
    pus = [p["reply"]["pause_us"] for p in pause]
    cli = [p["cli_ns"] / 1e6 for p in pause]
    base = fio_side(os.path.join(d, "pause-base.json"), "write")
    load_ = fio_side(os.path.join(d, "pause-load.json"), "write")
    lines += [
        f"## Pause under 4 KiB randwrite load ({len(pus)} snapshots)",
        "",
        "| | p50 | p99 | max |",
        "|---|---:|---:|---:|",
        f"| engine pause (writes held), ms | {pct(pus, 50) / 1000:.2f} | {pct(pus, 99) / 1000:.2f} | {max(pus) / 1000:.2f} |",
        f"| `cairn snapshot create` wall time, ms | {pct(cli, 50):.1f} | {pct(cli, 99):.1f} | {max(cli):.1f} |",
        "",
        "| fio randwrite 4k QD16 | IOPS | clat p50 µs | p99 µs | p99.9 µs | max µs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in (("no snapshots (10 s)", base), ("with the snapshots", load_)):
        lines.append(
            f"| {name} | {num(s['iops'])} | {num(s['p50'])} | {num(s['p99'])} | {num(s['p999'])} | {num(s['max'])} |"
        )
    lines.append("")

    # --- creates
    rounds = jsonl(os.path.join(d, "layers.jsonl"))
    n = len(rounds)
    cli_ms = [r["cli_ns"] / 1e6 for r in rounds]
    pause_ms = [r["reply"]["pause_us"] / 1000.0 for r in rounds]
    total = load(os.path.join(d, "layers-total.json"))["rounds_ns"] / 1e9
    first = [r["cli_ns"] / 1e6 for r in rounds[:100]]
    last = [r["cli_ns"] / 1e6 for r in rounds[-100:]]
    lines += [
        f"## {n:,} snapshots on one volume",
        "",
        f"- creates alone (sum of the {n:,} `cairn snapshot create` calls, each a process: meta "
        f"lookups, the engine, the record): **{sum(cli_ms) / 1000:.1f} s**, "
        f"{n / (sum(cli_ms) / 1000):.0f} snapshots/s; with the stripe writes between them "
        f"{total:.1f} s",
        f"- per create, ms: p50 {pct(cli_ms, 50):.1f}, p99 {pct(cli_ms, 99):.1f}; "
        f"the first 100 p50 {pct(first, 50):.1f}, the last 100 p50 {pct(last, 50):.1f}",
        f"- engine pause, ms: p50 {pct(pause_ms, 50):.2f}, p99 {pct(pause_ms, 99):.2f}, "
        f"max {max(pause_ms):.2f}",
    ]
    try:
        files = open(os.path.join(d, "layers-files.txt"), encoding="utf-8").read().strip()
        du = int(open(os.path.join(d, "layers-du.txt"), encoding="utf-8").read().split()[0])
        lines.append(
            f"- one replica of the layered volume afterwards: {files} files, "
            f"{du / 2**20:.0f} MiB on disk"
        )
    except (OSError, ValueError, IndexError):
        pass
    lines.append("")

    # --- reads
    lines += [
        "## 4 KiB random reads through the layers (fio, nbd engine)",
        "",
        "Same data size on both volumes; `plain` never has a snapshot. Each cell is the "
        f"median of {a.repeat} runs (plain and layered alternating; lowest and highest IOPS "
        "in brackets, latencies of the median run). Ratio = layered / plain median IOPS at "
        "the same point.",
        "",
        "| snapshots | QD | plain IOPS | layered IOPS | ratio | plain p50 / p99 µs | layered p50 / p99 µs |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def median_run(vol, point, qd):
        runs = [
            fio_side(os.path.join(d, f"read-{vol}-{point}-qd{qd}-r{r}.json"), "read")
            for r in range(1, a.repeat + 1)
        ]
        runs.sort(key=lambda x: x["iops"])
        return runs[len(runs) // 2], runs[0]["iops"], runs[-1]["iops"]

    for point in (0, 100, a.layers):
        for qd in (1, 16):
            p, plo, phi = median_run("plain", point, qd)
            lay, llo, lhi = median_run("layered", point, qd)
            r = ratio(lay["iops"], p["iops"])
            lines.append(
                f"| {point:,} | {qd} | {num(p['iops'])} [{num(plo)}-{num(phi)}] | "
                f"{num(lay['iops'])} [{num(llo)}-{num(lhi)}] | "
                f"{num(r, '{:.2f}')} | {num(p['p50'])} / {num(p['p99'])} | "
                f"{num(lay['p50'])} / {num(lay['p99'])} |"
            )
    lines += ["", "## Conditions", ""]
    for f in a.fact:
        k, _, v = f.partition("=")
        lines.append(f"- {k}: {v}")
    lines.append("")
    with open(a.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
