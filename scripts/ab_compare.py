"""Before/after table from alternating benchmark runs (runs on a CPU).

    python scripts/ab_compare.py --before 'OUT/ab_before_*.json' --after 'OUT/ab_after_*.json'

Each file is one ``bench_intranode.py --json``, ``bench_internode.py --json`` or
``bench_low_latency.py --json`` run; the two trees (or settings) are run in turns
(``gpu_suite.sh ab``, ``gpu_suite.sh signal_cost``) so that drift of the host or the GPU over
the run falls on both. For every operation and time field the table shows the median over the runs of
each tree (each run's own figure is already a median over its calls, worst rank), the spread
(min–max) over the runs, and after / before. A difference smaller than both spreads is noise.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys

FIELDS = ("kernel_us", "notify_us", "notify_kernel_us", "call_us", "host_us")   # intranode fields compared


def op_figures(path: str) -> dict:
    """{(op, field): value} of one run. Intranode: the main-config point at its largest token
    count. Internode (``bench_internode.py --json``): its one point. Low latency: the first experts count, per-call times ("call_us") and the in-kernel
    phase marks ("phase_us", end of each kernel included)."""
    with open(path) as f:
        data = json.load(f)
    if data.get("bench") in ("intranode", "internode"):
        if data["bench"] == "internode":
            ops = data["ops"]
        else:
            points = [p for p in data["points"] if p.get("main_config")] or data["points"]
            ops = max(points, key=lambda p: p["tokens"])["ops"]
        return {(op, k): float(v) for op, figs in ops.items() if isinstance(figs, dict)
                for k, v in figs.items() if k in FIELDS and isinstance(v, (int, float))}
    first = data["results"][0]
    out = {(k[:-3], "call_us"): float(v) for k, v in first.items()
           if k.endswith("_us") and isinstance(v, (int, float))}
    out.update({(mark, "phase_us"): float(v) for mark, v in first.get("phase_us", {}).items()})
    return out


def collect(pattern: str) -> list:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"ab_compare: no file matches {pattern!r}")
    return [op_figures(p) for p in paths]


def table(before: list, after: list) -> list:
    keys = [k for k in before[0] if all(k in r for r in before + after)]
    w = max([len(op) for op, _ in keys] + [2]) + 2
    lines = [f"runs: {len(before)} before, {len(after)} after; medians over runs (min-max)",
             f"{'op':<{w}}{'field':<17}{'before':>22}{'after':>22}{'after/before':>14}"]
    for op, field in keys:
        b = [r[(op, field)] for r in before]
        a = [r[(op, field)] for r in after]
        mb, ma = statistics.median(b), statistics.median(a)
        ratio = f"{ma / mb:.3f}" if mb else "-"
        lines.append(f"{op:<{w}}{field:<17}{mb:>9.1f} ({min(b):.1f}-{max(b):.1f})"
                     f"{ma:>9.1f} ({min(a):.1f}-{max(a):.1f}){ratio:>14}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="glob of the old tree's JSON files")
    ap.add_argument("--after", required=True, help="glob of the new tree's JSON files")
    args = ap.parse_args(argv)
    print("\n".join(table(collect(args.before), collect(args.after))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
