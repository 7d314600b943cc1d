"""Plots of the benchmarks' JSON output (runs on a CPU; needs matplotlib).

    python scripts/plot_bench.py [RESULTS.json ...] [--out DIR]

Without a file it plots the real runs shipped in docs/data/, each file's figures in
DIR/<file name>/. The figures go to DIR (default: a new temporary directory, printed; nothing is
written into the source tree unless DIR says so). Every title names the ranks, the card and the
date of the run (the JSON's ``date``, which the benches' ``--json`` writes).

``bench_intranode.py --json`` output gives up to three PNGs:

* ``bench_intranode_sms.png``: logical GB/s (worst rank) of FP8 dispatch, bf16 dispatch and
  combine against the SM count (points at the largest token count; one marker per
  ``--receivers``/threads family), kernel time solid, whole call dashed;
* ``bench_intranode_tokens.png``: the same against tokens per rank (main Config);
* ``bench_intranode_breakdown.png``: the whole-call breakdown of each op at the main point (main
  Config, largest token count): two stacked bars per op, the host's time (Python, launches,
  host wait) and the GPU timeline (the kernels' own times, the rest of the whole call);

the first two with the NCCL all-to-all baseline of the same run (dash-dot) and, for 4 ranks, DeepEP
v1's kernel numbers on a 4 x H200 host (dotted; 255 / 262 / 358 GB/s at 24 SMs, 4096 tokens,
measured 2026-11-28 with DeepEP's own tests; no such lines at other rank counts). A plot with a
single x value is skipped.

``bench_low_latency.py --json`` output gives ``bench_low_latency.png``: µs per call of dispatch,
combine (bf16, LogFMT), dispatch + combine and its CUDA graph, one bar per expert count, with the
kernel's time beside it where the run had ``--profile`` (and, for 4 ranks, DeepEP v1's kernel
times on 4 x H200 as dotted lines); beside them hook mode's two halves (the send call and the
receive hook) stacked per op.

Other rank counts than 4 get a ``_<R>ranks`` suffix. Other benches' JSON files are accepted and
ignored (nothing to plot).
"""
from __future__ import annotations

import argparse
import glob
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
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "data")
LL_CALLS = ("dispatch_us", "combine_us", "combine_logfmt_us", "dispatch_combine_us", "graph_dispatch_combine_us")
LL_HOOK = (("dispatch", "dispatch_send_us", "dispatch_recv_us"), ("combine", "combine_send_us", "combine_recv_us"))
LL_DEEPEP = {"dispatch_us": "ll_dispatch_us", "combine_us": "ll_combine_us", "dispatch_combine_us": "ll_both_us"}
EXPERT_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def plot(data: dict, outdir: str) -> list:
    """Draws what ``data`` (a benchmark's JSON) supports into ``outdir``; returns the paths."""
    if data.get("bench") == "intranode":
        return plot_intranode(data, outdir)
    if data.get("bench") == "low_latency":
        return plot_low_latency(data, outdir)
    print(f"plot_bench: nothing to plot for bench {data.get('bench')!r}")
    return []


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_label(data: dict) -> str:
    """Ranks, card and date of the run, for every figure's title."""
    ranks = data.get("ranks")
    return (f"{ranks} rank{'' if ranks == 1 else 's'}, {data.get('device', '?')}, "
            f"{data.get('date') or 'date not recorded'}")


def _suffix(data: dict) -> str:
    return "" if data.get("ranks") == 4 else f"_{data.get('ranks')}ranks"


def _save(plt, fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


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
    return _save(plt, fig, path)


def plot_intranode(data: dict, outdir: str) -> list:
    plt = _pyplot()
    suffix = _suffix(data)
    title = (f"cupy_ep intranode, {run_label(data)}: hidden {data.get('hidden')}, "
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
    return _save(plt, fig, path)


def plot_low_latency(data: dict, outdir: str) -> list:
    """One PNG: µs per call (whole call and kernel) of each op and hook mode's halves."""
    results = data.get("results", [])
    calls = [key for key in LL_CALLS if any(key in r for r in results)]
    if not calls:
        print("plot_bench: no low-latency results: no plot")
        return []
    plt = _pyplot()
    labels = {key: (label, kname) for key, label, kname, _ in bc.LL_ROWS}
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [len(calls), 2]})
    width, seen = 0.8 / (2 * len(results)), set()

    def bar(axis, x, value, label, bottom=None, **style):
        """A bar with its value on it (inside when stacked) and one legend entry per label."""
        bars = axis.bar(x, value, width, bottom=bottom or 0.0, label=None if label in seen else label, **style)
        axis.bar_label(bars, fmt="%.1f", fontsize=7, label_type="edge" if bottom is None else "center")
        seen.add(label)

    for ri, r in enumerate(results):
        color, e = EXPERT_COLORS[ri % len(EXPERT_COLORS)], r["num_experts"]
        for ci, key in enumerate(calls):
            x = ci - 0.4 + (2 * ri + 0.5) * width
            if key in r:
                bar(ax, x, r[key], f"{e} experts: whole call", color=color)
            kernel = bc.ll_kernel_time_us(r, labels[key][1])
            if kernel is not None:
                bar(ax, x + width, kernel, f"{e} experts: kernel", color=color, alpha=0.45)
        for hi, (_, send, recv) in enumerate(LL_HOOK):
            if send in r and recv in r:
                x = hi - 0.4 + (ri + 0.5) * 2 * width
                bar(hx, x, r[send], f"{e} experts: hook, send call", bottom=0.0, color=color)
                bar(hx, x, r[recv], f"{e} experts: hook, receive hook", bottom=r[send], color=color, alpha=0.45)
                hx.annotate(f"{r[send] + r[recv]:.1f}", (x, r[send] + r[recv]), ha="center", va="bottom", fontsize=7)
    if data.get("ranks") == 4:
        ref = data.get("deepep_v1_h200_4ranks") or bc.DEEPEP_V1_H200_4RANKS
        for ci, key in enumerate(calls):
            values = ref.get(LL_DEEPEP.get(key))
            for v in ([] if values is None else values if isinstance(values, (list, tuple)) else [values]):
                label = "DeepEP v1 kernel, 4 x H200, 288 experts (2026-11-28)"
                ax.hlines(v, ci - 0.45, ci + 0.45, colors="black", linestyles=":", label=None if label in seen
                          else label)
                seen.add(label)
    ax.set_xticks(range(len(calls)))
    ax.set_xticklabels([labels[key][0].replace("graph: ", "CUDA graph:\n") for key in calls], fontsize=8)
    ax.set_ylabel("µs per call (median, worst rank)")
    ax.set_title("per call: whole call and kernel", fontsize=9)
    hx.set_xticks(range(len(LL_HOOK)))
    hx.set_xticklabels([f"{op}\n(send + receive)" for op, _, _ in LL_HOOK], fontsize=8)
    hx.set_title("hook mode (return_recv_hook=True)", fontsize=9)
    for axis in (ax, hx):
        axis.grid(True, axis="y", alpha=0.3)
        axis.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left")
    hx.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"cupy_ep low latency, {run_label(data)}: {data.get('tokens')} tokens/rank, hidden "
                 f"{data.get('hidden')}, top-{data.get('topk')}, transport {data.get('transport')}", fontsize=10)
    fig.text(0.01, -0.04, f"Whole call: CUDA events between calls issued back to back on one stream, median of "
             f"{data.get('iters')}. Kernel: its in-kernel end mark in a separate profiled pass (--profile). "
             "Hook mode: the send call and the receive hook, each timed on its own.", fontsize=7)
    fig.tight_layout()
    return [_save(plt, fig, os.path.join(outdir, f"bench_low_latency{_suffix(data)}.png"))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="*", help="JSON written by a bench's --json (default: the runs in docs/data/)")
    p.add_argument("--out", default=None, help="output directory (default: a new temporary directory)")
    args = p.parse_args(argv)
    temporary = args.out is None
    if temporary:
        args.out = tempfile.mkdtemp(prefix="cupy_ep_plots_")
    paths = args.json or sorted(glob.glob(os.path.join(SHIPPED, "*.json")))
    if not paths:
        p.error(f"no JSON file given and none in {SHIPPED}")
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        outdir = args.out if args.json else os.path.join(args.out, os.path.splitext(os.path.basename(path))[0])
        for written in plot(data, outdir):
            print(written)
    if temporary and not os.listdir(args.out):
        os.rmdir(args.out)          # nothing was plotted: leave no empty directory behind


if __name__ == "__main__":
    main()
