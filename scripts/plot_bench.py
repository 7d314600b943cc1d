"""Plots of the benchmarks' JSON output (runs on a CPU; needs matplotlib).

    python scripts/plot_bench.py RESULTS.json [RESULTS2.json ...] [--out DIR]

``bench_intranode.py --json`` output gives two PNGs in DIR (default: a new temporary directory,
printed; nothing is written into the source tree unless DIR says so):

* ``bench_intranode_sms.png``: logical GB/s (worst rank) of FP8 dispatch, bf16 dispatch and
  combine against the SM count (points at the largest token count; one marker per
  ``--receivers``/threads family), kernel time solid, whole call dashed;
* ``bench_intranode_tokens.png``: the same against tokens per rank (main Config);
* ``bench_intranode_breakdown.png``: the whole-call breakdown of each op at the main point (main
  Config, largest token count): two stacked bars per op, the host's time (Python, launches,
  host wait) and the GPU timeline (the kernels' own times, the rest of the whole call);

the first two with the NCCL all-to-all baseline of the same run (dash-dot) and, for 4 ranks, DeepEP
v1's kernel numbers on a 4 x H200 host (dotted; 255 / 262 / 358 GB/s at 24 SMs, 4096 tokens,
measured 2026-11-28 with DeepEP's own tests). Other rank counts get a ``_<R>ranks`` suffix. A plot with a single
x value is skipped. Other benches' JSON files are accepted and ignored (nothing to plot).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

BREAKDOWN_OPS = (("layout", "layout"), ("dispatch_fp8", "dispatch FP8"), ("dispatch_bf16", "dispatch bf16"),
                 ("dispatch_bf16_cached", "cached"), ("dispatch_bf16_worst", "worst-token"), ("combine", "combine"))
HOST_COLORS = {"Python": "tab:red", "launches": "tab:purple", "host wait": "tab:gray"}
PLOT_OPS = (("dispatch_fp8", "FP8 dispatch", "tab:blue"), ("dispatch_bf16", "bf16 dispatch", "tab:orange"),
            ("combine", "combine", "tab:green"))
FAMILY_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot(data: dict, outdir: str) -> list:
    """Draws what ``data`` (a benchmark's JSON) supports into ``outdir``; returns the paths."""
    if data.get("bench") == "intranode":
        return plot_intranode(data, outdir)
    print(f"plot_bench: nothing to plot for bench {data.get('bench')!r}")
    return []


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _reference_lines(ax, data, note: str) -> None:
    if data.get("ranks") != 4:
        return
    ref = data.get("deepep_v1_h200_4ranks") or bc.DEEPEP_V1_H200_4RANKS
    for op, label, color in PLOT_OPS:
        v = ref.get(op, {}).get("GBps")
        if v:
            ax.axhline(v, color=color, linestyle=":", linewidth=1.2, label=f"DeepEP v1 {label} {v:.0f} ({note})")


def _finish(plt, fig, ax, title, xlabel, path) -> str:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("logical GB/s per rank (worst rank)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_intranode(data: dict, outdir: str) -> list:
    plt = _pyplot()
    ranks = data.get("ranks")
    suffix = "" if ranks == 4 else f"_{ranks}ranks"
    title = (f"cupy_ep intranode, {ranks} x {data.get('device', '?')}, hidden {data.get('hidden')}, "
             f"top-{data.get('topk')} of {data.get('experts')}")
    points = data.get("points", [])
    baselines = {b["tokens"]: b for b in data.get("baselines", [])}
    t_main = data.get("main_tokens") or max(p["tokens"] for p in points)
    written = []

    # GB/s against SMs, at the main token count
    at_main = [p for p in points if p["tokens"] == t_main]
    sms = sorted({p["config"]["num_sms"] for p in at_main})
    if len(sms) >= 2:
        fig, ax = plt.subplots(figsize=(10, 5.5))
        families = []
        for p in at_main:
            if p.get("family") not in families:
                families.append(p.get("family"))
        for fi, fam in enumerate(families):
            pts = sorted((p for p in at_main if p.get("family") == fam), key=lambda p: p["config"]["num_sms"])
            x = [p["config"]["num_sms"] for p in pts]
            marker = FAMILY_MARKERS[fi % len(FAMILY_MARKERS)]
            for op, label, color in PLOT_OPS:
                ax.plot(x, [p["ops"][op].get("kernel_GBps") for p in pts], color=color, marker=marker,
                        linestyle="-", label=f"{label}, kernel ({fam})")
                ax.plot(x, [p["ops"][op].get("call_GBps") for p in pts], color=color, marker=marker,
                        linestyle="--", alpha=0.6, markerfacecolor="none", label=f"{label}, whole call ({fam})")
        base = baselines.get(t_main)
        if base:
            for op, label, color in PLOT_OPS:
                v = base.get(op, {}).get("call_GBps")
                if v:
                    ax.axhline(v, color=color, linestyle="-.", alpha=0.6, linewidth=1.0,
                               label=f"NCCL all-to-all {label} {v:.0f} (same run)")
        _reference_lines(ax, data, "24 SMs, 4096 tok, 4 x H200")
        ax.set_xticks(sms)
        written.append(_finish(plt, fig, ax, f"{title}, {t_main} tokens/rank", "SMs (Config.num_sms)",
                               os.path.join(outdir, f"bench_intranode{suffix}_sms.png")))
    else:
        print("plot_bench: one SM count only: no SM plot")

    # GB/s against tokens per rank, at the main config
    at_cfg = sorted((p for p in points if p.get("main_config")), key=lambda p: p["tokens"])
    tokens = [p["tokens"] for p in at_cfg]
    if len(set(tokens)) >= 2:
        fig, ax = plt.subplots(figsize=(10, 5.5))
        c = at_cfg[0]["config"]
        for op, label, color in PLOT_OPS:
            ax.plot(tokens, [p["ops"][op].get("kernel_GBps") for p in at_cfg], color=color, marker="o",
                    linestyle="-", label=f"{label}, kernel")
            ax.plot(tokens, [p["ops"][op].get("call_GBps") for p in at_cfg], color=color, marker="o",
                    markerfacecolor="none", linestyle="--", alpha=0.6, label=f"{label}, whole call")
            bt = [t for t in tokens if baselines.get(t, {}).get(op, {}).get("call_GBps")]
            if bt:
                ax.plot(bt, [baselines[t][op]["call_GBps"] for t in bt], color=color, marker="x", linestyle="-.",
                        alpha=0.6, label=f"NCCL all-to-all {label} (same run)")
        _reference_lines(ax, data, "4096 tok, 24 SMs, 4 x H200")
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens)
        ax.set_xticklabels([str(t) for t in tokens])
        written.append(_finish(plt, fig, ax, f"{title}, config {c['num_sms']}/{c['num_threads']}/"
                                             f"{c['num_receivers']}/{c['chunk_tokens']}",
                               "tokens per rank", os.path.join(outdir, f"bench_intranode{suffix}_tokens.png")))
    else:
        print("plot_bench: one token count only: no token plot")
    main = [p for p in points if p.get("main_config") and p["tokens"] == t_main]
    if main:
        path = plot_breakdown(plt, main[0], f"{title}, {t_main} tokens/rank",
                              os.path.join(outdir, f"bench_intranode{suffix}_breakdown.png"))
        if path:
            written.append(path)
    return written


def plot_breakdown(plt, point: dict, title: str, path: str):
    """Two stacked bars per op of ``point``: host µs by kind and the GPU timeline (kernels, the
    rest of the whole call); None when the point has no phases."""
    bars = []
    for op, label in BREAKDOWN_OPS:
        b = bc.breakdown(point["ops"].get(op, {}), op.split("_")[0])
        if b is not None:
            bars.append((label, b[1]))
    if not bars:
        print("plot_bench: no call phases: no breakdown plot")
        return None
    fig, ax = plt.subplots(figsize=(10, 5.5))
    width, seen = 0.38, set()

    def segment(x, bottom, value, label, color):
        ax.bar(x, value, width, bottom=bottom, color=color, label=None if label in seen else label)
        seen.add(label)
        return bottom + value

    for i, (label, t) in enumerate(bars):
        bottom = 0.0
        for kind in ("Python", "launches", "host wait"):
            bottom = segment(i - width / 2, bottom, max(t[kind], 0.0), f"host: {kind}", HOST_COLORS[kind])
        kernels = min(t["kernels"], t["call"] or 0.0)
        segment(i + width / 2, segment(i + width / 2, 0.0, kernels, "GPU: kernels", "tab:green"),
                max((t["call"] or 0.0) - kernels, 0.0), "GPU: rest of the whole call", "tab:olive")
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([f"{label}\n(host | GPU)" for label, _ in bars], fontsize=8)
    ax.set_ylabel("µs per call (profiled pass, worst rank)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="JSON written by a bench's --json")
    p.add_argument("--out", default=None, help="output directory (default: a new temporary directory)")
    args = p.parse_args(argv)
    temporary = args.out is None
    if temporary:
        args.out = tempfile.mkdtemp(prefix="cupy_ep_plots_")
    for path in args.json:
        with open(path) as f:
            data = json.load(f)
        for written in plot(data, args.out):
            print(written)
    if temporary and not os.listdir(args.out):
        os.rmdir(args.out)          # nothing was plotted: leave no empty directory behind


if __name__ == "__main__":
    main()
