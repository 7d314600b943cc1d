"""Normal mode inside one NVLink domain, timed as users time it, with an NCCL baseline.

    mpiexec -n 4 python scripts/bench_intranode.py [--tokens 1024,2048,4096] [--sms 4,8,12,16,24]
        [--receivers 1/2,1/4] [--configs 24/1024/12[/32],...] [--iters 20] [--json PATH] [--plot DIR]

Workload (DeepEP's test_intranode): 4096 tokens per rank, hidden 7168, top-8 of 256 experts
(rounded down to a multiple of the ranks; random distinct experts per token), 24 SMs by
default (the Buffer's default Config). Measured per point (token count x Config), after
warm-up calls (the first call of a shape compiles kernels):

* ``layout`` (get_dispatch_layout), ``dispatch FP8``, ``dispatch bf16`` (non-cached),
  ``dispatch bf16 cached`` (``handle=``), ``dispatch bf16 worst`` (``num_worst_tokens`` =
  ranks x tokens, no host wait), ``combine`` (bf16, the bf16 dispatch's handle);
* **kernel time**: ``with buf.profile() as prof`` -> ``prof.kernel_times_us()`` (CUDA events
  right around each kernel launch: "layout", "notify", "dispatch", "combine"), median. A
  dispatch that sizes its outputs from notify's counts is queued before the host allocates
  them and waits on the GPU for their addresses, so its kernel time includes that host work;
  the cached and worst-token dispatches never wait for the host and time the copy alone.
  Notify's event pair also holds its own launch (the GPU idles until it starts): its in-kernel
  ``%globaltimer`` marks give its duration alone (``notify krn``, ``prof.phase_marks_us()``);
* **whole-call time**: what a user measures: stream idle, MPI barrier, then CUDA events on
  the caller's stream right before and after the Python call, median over ``--iters``; the
  host time of the Python call (perf_counter) beside it. Measured in a pass without the
  profiler (the profiler's own events cost a few µs per call);
* **whole-call breakdown** (a second pass, inside ``buf.profile()``): ``prof.call_phases_us()``,
  printed as a table per op. Inside each call the Buffer records a CUDA event on the launch
  stream and a host clock reading at every phase boundary, each phase named after what it did:
  "checked" (argument checks, stream set-up), "handle allocated", "notify launched", "barrier
  launched", "layout/dispatch/combine launched", "host wait", "outputs allocated", "outputs
  published", "finished" (stream hand-over); "rest" is the profiled whole call minus the phases
  (the Python call's entry and return). A phase's GPU µs is the time between its boundary event
  and the previous one on the stream's timeline (an event completes when the work queued before
  it has, so e.g. "dispatch launched" covers the dispatch kernel, beside which the table puts the
  kernel's own time), its host µs the host clock between the two readings; medians over the
  calls. Below each op, its host time by kind: Python, launches, host wait. ``--plot`` draws the
  same as two bars per op (host: Python / launches / host wait; GPU: kernels / the rest of the
  whole call).

Numbers are per-rank medians; tables show the worst rank (largest time; GB/s = smallest over
ranks of that rank's bytes / its time) and ``--json`` also has the means over ranks and every
rank's values. Logical GB/s as DeepEP counts it: bytes received by the rank, own rank
included (FP8: data + one float32 scale per 128 channels; combine: the bf16 rows it sends
back = the bf16 dispatch's bytes), over the time.

Baseline (same run, same GPUs): NCCL grouped send/recv through ``cupy.cuda.nccl`` of the same
rows: pack rows per destination (``take``), all-to-all-v (FP8: data and scales), and for
combine the all-to-all back plus a float32 scatter-add and the cast to bf16; timed like the
whole call.

Sweeps: ``--sms`` (``Config(num_sms=s)`` with ``--receivers`` variants: fractions of the SMs
like ``1/2`` or counts; ``--threads``), ``--configs SMS/THREADS/RECEIVERS[/CHUNK]``, and
``--tokens`` (tokens per rank). Every Config runs at the largest token count and every token
count at the main Config (the Buffer's default if listed, else the first), or the full grid
with ``--full-grid``. New Configs compile new kernels (seconds each). ``--plot DIR`` draws GB/s
against SMs and against tokens and the whole-call breakdown (scripts/plot_bench.py, also runnable
on the JSON later).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

OPS = ("layout", "dispatch_fp8", "dispatch_bf16", "dispatch_bf16_cached", "dispatch_bf16_worst", "combine")
OP_LABELS = {"layout": "layout", "dispatch_fp8": "dispatch FP8", "dispatch_bf16": "dispatch bf16",
             "dispatch_bf16_cached": "dispatch bf16 cached", "dispatch_bf16_worst": "dispatch bf16 worst-tok",
             "combine": "combine bf16"}
MAIN_KERNEL = {op: op.split("_")[0] for op in OPS}   # the kernel whose time is an op's kernel_us


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096", help="tokens per rank, comma-separated (a sweep); default 4096")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256, help="rounded down to a multiple of the ranks")
    p.add_argument("--sms", default=None, help="SM counts to sweep, e.g. 4,8,12,16,24 (Config(num_sms=s))")
    p.add_argument("--receivers", default="1/2",
                   help="receiving blocks for each --sms value: fractions of the SMs (1/2, 1/4) or counts, "
                        "comma-separated; default 1/2 (the Config default)")
    p.add_argument("--threads", type=int, default=None, help="threads per block of the --sms configs (default 1024)")
    p.add_argument("--configs", default=None, help="explicit configs SMS/THREADS/RECEIVERS[/CHUNK], comma-separated")
    p.add_argument("--full-grid", action="store_true", help="every config at every token count")
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first compiles)")
    p.add_argument("--no-baseline", action="store_true", help="skip the NCCL baseline")
    p.add_argument("--timeout-s", type=float, default=60.0, help="Buffer timeout_s")
    p.add_argument("--json", default=None, help="write every number to this file")
    p.add_argument("--plot", default=None, metavar="DIR", help="draw PNGs into DIR (needs matplotlib)")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 1:
        p.error("--iters and --warmup must be >= 1")
    try:
        args.token_list = bc.parse_int_list(args.tokens, "--tokens")
        if min(args.token_list) < 1:
            raise ValueError("--tokens: counts must be >= 1")
        args.config_specs = config_specs(args)
        make_configs(args.config_specs)   # Config() checks every spec (no GPU needed)
    except ValueError as e:
        p.error(str(e))
    return args


def config_specs(args) -> list:
    """[(sms, threads, receivers, chunk, family label)] from --sms/--receivers/--threads and
    --configs; [] = the Buffer's default Config."""
    specs = []
    if args.sms:
        threads = args.threads or 1024
        for rspec in [r.strip() for r in args.receivers.split(",") if r.strip()]:
            for s in bc.parse_int_list(args.sms, "--sms"):
                specs.append((s, threads, bc.parse_receivers(rspec, s), None, f"{threads} thr, rcv {rspec}"))
    if args.configs:
        for spec in args.configs.split(","):
            if spec.strip():
                specs.append((*bc.parse_config_spec(spec), "configs"))
    return specs


def make_configs(specs):
    """(list of (Config, family), main Config); Config() validates each spec (on any machine)."""
    from cupy_ep import Config

    default = Config()
    if not specs:
        return [(default, "default")], default
    out, seen = [], set()
    for sms, threads, receivers, chunk, family in specs:
        cfg = Config(num_sms=sms, num_threads=threads, num_receivers=receivers, chunk_tokens=chunk)
        if cfg not in seen:
            seen.add(cfg)
            out.append((cfg, family))
    main = default if default in seen else out[0][0]
    return out, main


def plan_points(token_list, configs, main_cfg, full_grid: bool):
    """(tokens, Config, family) in measuring order: every config at the largest token count,
    every token count at the main config (or the full grid)."""
    t_main = max(token_list)
    fam = {cfg: f for cfg, f in configs}
    if full_grid:
        return [(t, cfg, f) for cfg, f in configs for t in token_list]
    pts = [(t_main, cfg, f) for cfg, f in configs]
    pts += [(t, main_cfg, fam[main_cfg]) for t in sorted(token_list) if t != t_main]
    return pts


class Inputs:
    """One token count's inputs on this rank (device arrays) and its layout."""

    def __init__(self, buf, rng, n, h, k, e):
        import cupy
        import cupy_ep
        from cupy_ep import testing

        self.n = n
        self.x = testing.to_device(testing.make_x(rng, n, h))
        self.x_fp8 = cupy_ep.per_token_cast_to_fp8(self.x)
        self.topk_idx = cupy.asarray(testing.make_routing(rng, n, e, k, "random"))
        self.topk_w = cupy.asarray(testing.make_weights(rng, n, k))
        self.per_rank, _, self.per_expert, self.in_rank, _ = buf.get_dispatch_layout(self.topk_idx, e)
        cupy.cuda.get_current_stream().synchronize()

    def routing(self):
        return dict(num_tokens_per_rank=self.per_rank, is_token_in_rank=self.in_rank,
                    num_tokens_per_expert=self.per_expert, topk_idx=self.topk_idx, topk_weights=self.topk_w)


def measure_point(comm, buf, inp: Inputs, cfg, layout_res, num_worst: int, args) -> dict:
    n_ops = {}
    h = args.hidden
    rt = inp.routing()
    n_ops["layout"] = dict(layout_res)

    res, out = bc.measure_call(comm, buf, lambda: buf.dispatch(inp.x_fp8, **rt, config=cfg), ("dispatch", "notify"),
                       args.iters, args.warmup)
    rows = int(out[0][0].shape[0])
    res["bytes"] = rows * bc.row_bytes(h, True)
    n_ops["dispatch_fp8"] = res
    del out

    res, out = bc.measure_call(comm, buf, lambda: buf.dispatch(inp.x, **rt, config=cfg), ("dispatch", "notify"),
                       args.iters, args.warmup)
    recv_x, handle = out[0], out[4]
    assert int(recv_x.shape[0]) == rows, "bf16 and FP8 dispatch received different row counts"
    res["bytes"] = rows * bc.row_bytes(h, False)
    n_ops["dispatch_bf16"] = res

    res, _ = bc.measure_call(comm, buf, lambda: buf.dispatch(inp.x, handle=handle, config=cfg), ("dispatch",),
                     args.iters, args.warmup)
    res["bytes"] = rows * bc.row_bytes(h, False)
    n_ops["dispatch_bf16_cached"] = res

    res, _ = bc.measure_call(comm, buf, lambda: buf.dispatch(inp.x, **rt, num_worst_tokens=num_worst, config=cfg),
                     ("dispatch", "notify"), args.iters, args.warmup)
    res["bytes"] = rows * bc.row_bytes(h, False)
    n_ops["dispatch_bf16_worst"] = res

    res, _ = bc.measure_call(comm, buf, lambda: buf.combine(recv_x, handle, config=cfg), ("combine",),
                     args.iters, args.warmup)
    res["bytes"] = rows * bc.row_bytes(h, False)
    n_ops["combine"] = res
    return dict(recv_rows=rows, ops=n_ops)


def measure_layout(comm, buf, inp: Inputs, e: int, args) -> dict:
    res, _ = bc.measure_call(comm, buf, lambda: buf.get_dispatch_layout(inp.topk_idx, e), ("layout",), args.iters,
                     args.warmup)
    return res


def aggregate_points(gathered, points_meta):
    """gathered[rank] = (list of per-point results, {tokens: baseline}) -> merged points, baselines."""
    merged = []
    for i, meta in enumerate(points_meta):
        per_rank = [g[0][i] for g in gathered]
        ops = {op: bc.aggregate_op([p["ops"][op] for p in per_rank]) for op in OPS}
        merged.append(dict(meta, recv_rows=[p["recv_rows"] for p in per_rank], ops=ops))
    baselines = []
    tokens = sorted(gathered[0][1])
    for t in tokens:
        per_rank = [g[1][t] for g in gathered]
        b = {"tokens": t, "recv_rows": [p["recv_rows"] for p in per_rank]}
        for op in ("dispatch_fp8", "dispatch_bf16", "combine"):
            b[op] = bc.aggregate_op([p[op] for p in per_rank])
        baselines.append(b)
    return merged, baselines


# ---- report ----------------------------------------------------------------------------------------
def print_point(pt: dict, baseline) -> None:
    c = pt["config"]
    rows = pt["recv_rows"]
    print(f"\n## {pt['tokens']} tokens/rank, config {c['num_sms']}/{c['num_threads']}/{c['num_receivers']}/"
          f"{c['chunk_tokens']} (SMs/threads/receivers/chunk), rows received per rank {min(rows)}-{max(rows)}")
    table = []
    for op in OPS:
        o = pt["ops"][op]
        nccl = (baseline or {}).get(op)
        table.append([OP_LABELS[op], bc.fmt(o.get("kernel_us")), bc.fmt(o.get("kernel_GBps"), ".0f", 6),
                      bc.fmt(o.get("notify_us")), bc.fmt(o.get("notify_kernel_us")), bc.fmt(o.get("call_us")),
                      bc.fmt(o.get("call_GBps"), ".0f", 6),
                      bc.fmt(o.get("host_us")),
                      bc.fmt(nccl.get("call_us") if nccl else None), bc.fmt(nccl.get("call_GBps") if nccl else None,
                                                                              ".0f", 6)])
    bc.print_table(["op", "kernel us", "GB/s", "notify us", "notify krn", "call us", "GB/s", "host us", "NCCL us",
                    "GB/s"], table, [24, 9, 6, 9, 10, 9, 6, 8, 9, 6])


def print_notify_marks(pt: dict) -> None:
    """Where notify's own time goes: its in-kernel marks, µs from its start (the bf16 dispatch's)."""
    marks = pt["ops"]["dispatch_bf16"].get("notify_marks")
    if marks:
        print(f"\nnotify's marks ({pt['tokens']} tokens, bf16 dispatch, worst rank, medians; us from its start): "
              + ", ".join(f"{phase} {us:.1f}" for phase, us in sorted(marks.items(), key=lambda kv: kv[1])))


def print_phases(pt: dict) -> None:
    print(f"\nwhole-call breakdown ({pt['tokens']} tokens, worst rank of each op, medians): per phase of the call, "
          f"named after what it did, the GPU timeline's us (a kernel falls in the phase its launch ends), the "
          f"host's us, and the kernel's own time (profiler events around the launch)")
    bc.print_breakdown([(OP_LABELS[op], pt["ops"][op], MAIN_KERNEL[op]) for op in OPS])


def print_summary(points, baselines, ranks) -> None:
    print("\n=== summary table: kernel GB/s (whole-call GB/s), worst rank; NCCL = whole call")
    base = {b["tokens"]: b for b in baselines}
    table = []
    labels = list(dict.fromkeys(str(pt["config"]) for pt in points))
    for pt in sorted(points, key=lambda q: (labels.index(str(q["config"])), q["tokens"])):
        c = pt["config"]
        o = pt["ops"]
        b = base.get(pt["tokens"], {})

        def cell(op):
            return f"{o[op].get('kernel_GBps') or 0:.0f} ({o[op].get('call_GBps') or 0:.0f})"

        def nccl(op):
            v = b.get(op, {}).get("call_GBps")
            return "-" if v is None else f"{v:.0f}"
        table.append([str(pt["tokens"]), f"{c['num_sms']}/{c['num_threads']}/{c['num_receivers']}/{c['chunk_tokens']}",
                      cell("dispatch_fp8"), cell("dispatch_bf16"), cell("dispatch_bf16_cached"), cell("combine"),
                      f"{o['layout'].get('kernel_us') or 0:.0f} ({o['layout'].get('call_us') or 0:.0f})",
                      f"{nccl('dispatch_fp8')}/{nccl('dispatch_bf16')}/{nccl('combine')}"])
    bc.print_table(["tokens", "SMs/thr/rcv/chunk", "FP8 disp", "bf16 disp", "cached", "combine", "layout us",
                    "NCCL fp8/bf16/comb"], table, [7, 18, 11, 11, 11, 11, 10, 18])
    if ranks == 4:
        ref = bc.DEEPEP_V1_H200_4RANKS
        print(f"DeepEP v1, 4 x H200, 4096 tokens, 24 SMs (its own tests, 2026-11-28): FP8 {ref['dispatch_fp8']['GBps']:.0f}, "
              f"bf16 {ref['dispatch_bf16']['GBps']:.0f}, combine {ref['combine']['GBps']:.0f} GB/s (kernel); whole "
              f"call: layout {ref['call_us']['layout']:.0f} us, bf16 dispatch {ref['call_us']['dispatch_bf16']:.0f} us, "
              f"cached {ref['call_us']['dispatch_bf16_cached']:.0f} us, combine {ref['call_us']['combine']:.0f} us")


def summary_line(points, main_tokens, main_cfg_label, ranks) -> str:
    for pt in points:
        c = pt["config"]
        label = f"{c['num_sms']}/{c['num_threads']}/{c['num_receivers']}/{c['chunk_tokens']}"
        if pt["tokens"] == main_tokens and label == main_cfg_label:
            o = pt["ops"]
            return (f"SUMMARY intranode {ranks} ranks, {main_tokens} tok, {label}: kernel GB/s FP8 "
                    f"{o['dispatch_fp8'].get('kernel_GBps') or 0:.0f} / bf16 {o['dispatch_bf16'].get('kernel_GBps') or 0:.0f}"
                    f" / combine {o['combine'].get('kernel_GBps') or 0:.0f}; whole call "
                    f"{o['dispatch_fp8'].get('call_GBps') or 0:.0f} / {o['dispatch_bf16'].get('call_GBps') or 0:.0f} / "
                    f"{o['combine'].get('call_GBps') or 0:.0f} (worst rank)")
    return "SUMMARY intranode: no main point"


# ---- main --------------------------------------------------------------------------------------------
def main():
    args = parse_args()
    bc.set_env_defaults()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    bc.exit_unless_gpus(comm, "bench_intranode.py")
    import cupy

    import cupy_ep

    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    configs, main_cfg = make_configs(args.config_specs)
    h, k = args.hidden, args.topk
    e = bc.round_experts(args.experts, num_ranks)
    t_max = max(args.token_list)
    t0 = time.time()
    buf = cupy_ep.Buffer(comm, num_nvl_bytes=cupy_ep.Buffer.get_nvl_buffer_size_hint(t_max, h, num_ranks, k),
                         timeout_s=args.timeout_s)
    nc = None if args.no_baseline else bc.NcclAllToAll(comm)
    points = plan_points(args.token_list, configs, main_cfg, args.full_grid)
    if rank == 0:
        print(f"# bench_intranode: {num_ranks} x {bc.device_name()}, hidden {h}, top-{k} of {e} experts, "
              f"{len(points)} points, {args.iters} iterations (+{args.warmup} warm-up) per measurement", flush=True)

    inputs, layouts, baselines, results, meta = {}, {}, {}, [], []
    for t, cfg, family in points:
        if t not in inputs:
            rng = np.random.default_rng([1234, rank, t])
            inputs[t] = Inputs(buf, rng, t, h, k, e)
            layouts[t] = measure_layout(comm, buf, inputs[t], e, args)
            if nc is not None:
                baselines[t] = bc.nccl_normal_baseline(comm, nc, inputs[t].x, inputs[t].x_fp8, inputs[t].in_rank, h,
                                                       args.iters)
        results.append(measure_point(comm, buf, inputs[t], cfg, layouts[t], num_ranks * t, args))
        meta.append(dict(tokens=t, config=bc.config_dict(cfg), family=family, main_config=(cfg == main_cfg)))
        if rank == 0:
            print(f"# [{len(results)}/{len(points)}] measured {t} tokens, config {bc.config_label(cfg)} "
                  f"({time.time() - t0:.0f} s)", flush=True)

    gathered = comm.gather((results, baselines), root=0)
    comm.Barrier()
    if nc is not None:
        nc.destroy()
    inputs.clear()
    buf.destroy()
    cupy.cuda.runtime.deviceSynchronize()
    if rank != 0:
        return
    merged, base_list = aggregate_points(gathered, meta)
    base = {b["tokens"]: b for b in base_list}
    print(f"\n# cupy_ep intranode, {num_ranks} x {bc.device_name()}, hidden {h}, top-{k} of {e} experts; "
          f"medians over {args.iters} calls, worst rank; total {time.time() - t0:.0f} s")
    print("# kernel us: the kernel alone (profiler events; dispatch ops: the dispatch kernel, notify beside it; "
          "dispatch FP8/bf16 also wait inside the kernel for the host to publish the outputs); notify krn: notify's "
          "own duration from its in-kernel marks (its event pair also holds its launch); "
          "call us: CUDA events around the Python call after an MPI barrier; host us: the Python call on the host")
    for pt in merged:
        print_point(pt, base.get(pt["tokens"]))
        print_notify_marks(pt)
    for pt in merged:
        if pt["main_config"] and pt["tokens"] == t_max:
            print_phases(pt)
    data = dict(bench="intranode", device=bc.device_name(), ranks=num_ranks, hidden=h, topk=k, experts=e,
                iters=args.iters, warmup=args.warmup, main_tokens=t_max, main_config=bc.config_dict(main_cfg),
                points=merged, baselines=base_list, deepep_v1_h200_4ranks=bc.DEEPEP_V1_H200_4RANKS,
                argv=sys.argv[1:], total_s=time.time() - t0)
    if args.json:
        bc.write_json(args.json, data)
        print(f"\n# wrote {args.json}")
    if args.plot:
        try:
            import plot_bench

            for path in plot_bench.plot(data, args.plot):
                print(f"# plot: {path}")
        except Exception as exc:  # noqa: BLE001 -- the numbers are out already; say so loudly
            print(f"# WARNING: plotting failed: {type(exc).__name__}: {exc}")
    print_summary(merged, base_list, num_ranks)
    print(summary_line(merged, t_max, bc.config_label(main_cfg), num_ranks))


if __name__ == "__main__":
    from cupy_ep.testing import run_or_abort

    run_or_abort(main)
