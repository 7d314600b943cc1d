"""Low-latency mode benchmark (DeepEP's decode workload) through ``cupy_ep.Buffer``, with an NCCL baseline.

    mpiexec -n 4 python scripts/bench_low_latency.py [--experts 288,256] [--transport auto|nvlink|rdma]
        [--enable-shrink] [--profile] [--iters 50] [--json PATH]

Workload: 128 tokens per rank (M), hidden 7168, top-8 of 288 and of 256 experts (rounded
down to a multiple of the ranks), FP8 dispatch, bf16 combine and LogFMT combine
(``use_logfmt=True``, the same handle and expert outputs); 2 or more ranks.

* **per call**: CUDA events between calls issued back to back on one stream behind a spin
  kernel (the GPU never waits for the host; launch gaps between kernels included), after
  warm-up, median over ``--iters``; dispatch, combine (fixed handle), dispatch + combine,
  dispatch + combine replayed as a CUDA graph, and hook mode (``return_recv_hook=True``: the
  send call and the hook, each on its own);
* **kernel** (``--profile``, a separate pass inside ``buf.profile()``): kernel times from
  ``prof.kernel_times_us()`` (CUDA events around each launch: "low_latency_dispatch",
  "low_latency_combine", and "..._send"/"..._recv" in hook mode) and the kernels' in-kernel
  ``%globaltimer`` checkpoints from ``prof.phase_marks_us()`` (µs from the earliest block's
  start; "end" = the kernel's duration on the GPU, what DeepEP's tests report). The tables'
  "kernel us" is that "end" mark where the kernel has one; "events us" is the event pair, which
  also holds the launch latency whenever the GPU has caught up with the host;
* **NCCL**: a grouped send/recv all-to-all-v (``cupy.cuda.nccl``) of the same logical bytes
  this design moves (one row per (token, destination rank), own rank included: FP8 data +
  scales for dispatch, bf16 for combine), timed per call the same way.

``--enable-shrink`` measures a shrink-mode Buffer (``enable_shrink=True``: the SHRINK=1 kernels,
every rank present): run it beside a run without to see what shrink mode costs.

Every number is a per-rank median; the worst rank is shown (``--json`` has the means too).
GB/s as DeepEP's test counts it: dispatch = selections x (H + H/128*4 + 16) bytes, combine =
selections x 2H, LogFMT combine = selections x (H*10/8 + H/128*4) ("logical": one copy per
selected expert, although this design sends one per destination rank). The header of each
table gives the bytes that do cross to other ranks (one partial row per destination rank).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

from cupy_ep import logfmt  # noqa: E402  (pure: the LogFMT row size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank = num_max_dispatch_tokens_per_rank (M)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", default="288,256", help="comma-separated; each rounded down to a multiple of the ranks")
    p.add_argument("--transport", default="auto", choices=["auto", "nvlink", "rdma"], help="Buffer ll_transport")
    p.add_argument("--num-sms", type=int, default=None, help="Buffer num_sms (default: every SM)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--profile", action="store_true", help="kernel times and in-kernel phase marks (buf.profile())")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph measurement")
    p.add_argument("--no-baseline", action="store_true", help="skip the NCCL baseline")
    p.add_argument("--timeout-s", type=float, default=60.0, help="Buffer timeout_s")
    p.add_argument("--enable-shrink", action="store_true", help="a shrink-mode Buffer (enable_shrink=True)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.iters < 1 or args.tokens < 1:
        p.error("--iters and --tokens must be >= 1")
    try:
        args.expert_list = bc.parse_int_list(args.experts, "--experts")
    except ValueError as e:
        p.error(str(e))
    return args


def expert_counts(expert_list, num_ranks: int) -> list:
    out = []
    for e in expert_list:
        e = bc.round_experts(e, num_ranks)
        if e > 0 and e not in out:
            out.append(e)
    return out


def deepep_bytes(selections: int, hidden: int) -> tuple:
    """(dispatch, combine, LogFMT combine) logical bytes as DeepEP's low-latency test counts them."""
    return (selections * (hidden + hidden // 128 * 4 + 16), selections * hidden * 2,
            selections * logfmt.row_bytes(hidden))


def bench_experts(comm, buf, nc, e: int, args) -> dict:
    import cupy
    import ml_dtypes

    from cupy_ep import testing

    r, rank = comm.Get_size(), comm.Get_rank()
    m, h, k = args.tokens, args.hidden, args.topk
    el = e // r
    rng = np.random.default_rng([4321, rank, e])
    x = testing.to_device(testing.make_x(rng, m, h))
    idx_np = testing.make_routing(rng, m, e, k, "random")
    idx = cupy.asarray(idx_np)
    w = cupy.asarray(testing.make_weights(rng, m, k))
    y = cupy.random.RandomState(1000 + rank).standard_normal((el, r * m, h), dtype=cupy.float32).astype(
        ml_dtypes.bfloat16)
    traffic = bc.ll_traffic(idx_np, e, r, rank)
    res = dict(num_experts=e, **traffic)
    (res["deepep_dispatch_bytes"], res["deepep_combine_bytes"],
     res["deepep_combine_logfmt_bytes"]) = deepep_bytes(traffic["selections"], h)
    res["remote_dispatch_bytes"] = traffic["remote_copies"] * bc.row_bytes(h, True)
    res["remote_combine_bytes"] = traffic["remote_copies"] * bc.row_bytes(h, False)
    res["remote_combine_logfmt_bytes"] = traffic["remote_copies"] * logfmt.row_bytes(h)

    def dispatch(hook=False):
        return buf.low_latency_dispatch(x, idx, m, e, use_fp8=True, return_recv_hook=hook)

    def combine(handle, hook=False, use_logfmt=False):
        return buf.low_latency_combine(y, idx, w, handle, use_logfmt=use_logfmt, return_recv_hook=hook)

    res["dispatch_us"] = bc.time_back_to_back(comm, lambda: dispatch(), args.iters)
    handle = dispatch()[2]
    res["combine_us"] = bc.time_back_to_back(comm, lambda: combine(handle), args.iters)
    combine(handle, use_logfmt=True)   # compiles the LogFMT kernels outside the timing
    res["combine_logfmt_us"] = bc.time_back_to_back(comm, lambda: combine(handle, use_logfmt=True), args.iters)
    res["dispatch_combine_us"] = bc.time_back_to_back(comm, lambda: combine(dispatch()[2]), args.iters)
    buf.check()

    res["dispatch_send_us"], res["dispatch_recv_us"] = bc.time_pair_back_to_back(
        comm, lambda: dispatch(hook=True)[4], lambda hk: hk(), args.iters)
    handle = dispatch()[2]
    res["combine_send_us"], res["combine_recv_us"] = bc.time_pair_back_to_back(
        comm, lambda: combine(handle, hook=True)[2], lambda hk: hk(), args.iters)
    buf.check()

    s = cupy.cuda.get_current_stream()
    if not args.no_graph:
        for _ in range(2):
            combine(dispatch()[2])
        s.synchronize()
        comm.Barrier()
        captured = []   # the graph's inputs and outputs stay alive while it is replayed
        s.begin_capture()
        try:
            captured.append(dispatch())
            captured.append(combine(captured[0][2]))
        finally:
            graph = s.end_capture()
        res["graph_dispatch_combine_us"] = bc.time_back_to_back(comm, lambda: graph.launch(s), args.iters)
        s.synchronize()
        del captured, graph
        buf.check()

    if args.profile:
        with buf.profile() as prof:
            comm.Barrier()
            bc.spin(10_000_000)
            for _ in range(args.iters):
                combine(dispatch()[2])
            s.synchronize()
        with buf.profile() as prof_hook:
            comm.Barrier()
            for _ in range(args.iters):
                dispatch(hook=True)[4]()
            handle = dispatch()[2]
            for _ in range(args.iters):
                combine(handle, hook=True)[2]()
            s.synchronize()
        with buf.profile() as prof_logfmt:
            comm.Barrier()
            bc.spin(10_000_000)
            for _ in range(args.iters):
                combine(handle, use_logfmt=True)
            s.synchronize()
        buf.check()
        kt = prof.kernel_times_us()
        kt.update(prof_hook.kernel_times_us())
        marks = prof.phase_marks_us()

        def as_logfmt(name):   # the same kernel name as the bf16 combine's, told apart here
            return name.replace("low_latency_combine", "low_latency_combine_logfmt")

        kt.update({as_logfmt(n): v for n, v in prof_logfmt.kernel_times_us().items()})
        marks.update({as_logfmt(n): v for n, v in prof_logfmt.phase_marks_us().items()})
        res["kernel_us"] = {name: bc.median(v) for name, v in kt.items()}
        res["phase_us"] = {name: bc.median(v) for name, v in marks.items()}

    if nc is not None:
        sd = [c * bc.row_bytes(h, True) for c in traffic["tokens_per_rank"]]
        sc = [c * bc.row_bytes(h, False) for c in traffic["tokens_per_rank"]]
        rd, rc = comm.alltoall(sd), comm.alltoall(sc)
        sbuf = cupy.zeros(max(sum(sd), sum(sc)) + 1, cupy.uint8)
        rbuf = cupy.zeros(max(sum(rd), sum(rc)) + 1, cupy.uint8)
        res["nccl_dispatch_us"] = bc.time_back_to_back(comm, lambda: nc.exchange_bytes(sbuf, sd, rbuf, rd), args.iters)
        res["nccl_combine_us"] = bc.time_back_to_back(comm, lambda: nc.exchange_bytes(sbuf, sc, rbuf, rc), args.iters)
    return res


def merge(per_rank: list) -> dict:
    """Worst rank (max µs) and mean of every timing; the traffic of the busiest rank."""
    r0 = per_rank[0]
    out = dict(num_experts=r0["num_experts"])
    for key in r0:
        if key.endswith("_us") and isinstance(r0[key], (int, float)):
            out[key], out[key + "_mean"] = bc.worst_and_mean([p.get(key) for p in per_rank])
            out[key + "_per_rank"] = [p.get(key) for p in per_rank]
        elif key in ("kernel_us", "phase_us"):
            names = list(dict.fromkeys(n for p in per_rank for n in p.get(key, {})))   # first-seen order
            out[key] = {n: bc.worst_and_mean([p.get(key, {}).get(n) for p in per_rank])[0] for n in names}
    for key in ("selections", "remote_copies", "deepep_dispatch_bytes", "deepep_combine_bytes",
                "deepep_combine_logfmt_bytes", "remote_dispatch_bytes", "remote_combine_bytes",
                "remote_combine_logfmt_bytes"):
        out[key] = max(p[key] for p in per_rank)
        out[key + "_per_rank"] = [p[key] for p in per_rank]
    out["copies_per_token"] = float(np.mean([p["copies_per_token"] for p in per_rank]))
    return out


def print_experts(r: dict, ranks: int, args) -> None:
    e = r["num_experts"]
    kt = r.get("kernel_us", {})
    print(f"\n== top-{args.topk} of {e} experts: {r['copies_per_token']:.2f} destination ranks per token; bytes to "
          f"other ranks per rank (max): dispatch {r['remote_dispatch_bytes'] / 1e6:.2f} MB, combine "
          f"{r['remote_combine_bytes'] / 1e6:.2f} MB, LogFMT combine {r['remote_combine_logfmt_bytes'] / 1e6:.2f} MB "
          f"(DeepEP's count: {r['deepep_dispatch_bytes'] / 1e6:.2f} / {r['deepep_combine_bytes'] / 1e6:.2f} / "
          f"{r['deepep_combine_logfmt_bytes'] / 1e6:.2f} MB incl. own rank)")
    table = []
    for key, label, kname, bytes_of in bc.LL_ROWS:
        if key not in r:
            continue
        call = r[key]
        kern = bc.ll_kernel_time_us(r, kname)
        events = kt.get(kname) if kname else None
        b = r.get(f"deepep_{bytes_of}_bytes") if bytes_of else None
        table.append([label, bc.fmt(call), bc.fmt(kern), bc.fmt(events), bc.fmt(bc.gbps(b, call), ".0f", 9),
                      bc.fmt(bc.gbps(b, kern), ".0f", 9)])
    bc.print_table(["op", "per call us", "kernel us", "events us", "GB/s call", "GB/s kern"], table,
                   [28, 11, 9, 9, 9, 9])
    for name, us in r.get("phase_us", {}).items():
        print(f"  phase (worst rank) {name:<52}{us:>7.1f} us")


def print_summary(results, ranks, transport) -> None:
    print(f"\n=== summary table: low latency, {ranks} ranks, transport {transport}; per call us (kernel us), worst rank")
    table = []
    for r in results:
        def cell(key, kname):
            v, kv = r.get(key), bc.ll_kernel_time_us(r, kname)
            return "-" if v is None else (f"{v:.1f}" + (f" ({kv:.1f})" if kv is not None else ""))
        table.append([str(r["num_experts"]), cell("dispatch_us", "low_latency_dispatch"),
                      cell("combine_us", "low_latency_combine"),
                      cell("combine_logfmt_us", "low_latency_combine_logfmt"), cell("dispatch_combine_us", None),
                      cell("graph_dispatch_combine_us", None),
                      f"{cell('dispatch_send_us', None)} + {cell('dispatch_recv_us', None)}",
                      f"{cell('nccl_dispatch_us', None)} / {cell('nccl_combine_us', None)}"])
    bc.print_table(["experts", "dispatch", "combine", "comb LogFMT", "both", "graph", "hook disp send+recv",
                    "NCCL disp / comb"], table, [7, 13, 13, 13, 8, 8, 20, 16])
    if ranks == 4:
        ref = bc.DEEPEP_V1_H200_4RANKS
        print(f"DeepEP v1, 4 x H200, 288 experts, NVLink (its own tests, 2026-11-28, kernel times): dispatch "
              f"{ref['ll_dispatch_us'][0]}-{ref['ll_dispatch_us'][1]} us, combine {ref['ll_combine_us'][0]:.0f}-"
              f"{ref['ll_combine_us'][1]:.0f} us, dispatch + combine {ref['ll_both_us']} us")


def main():
    args = parse_args()
    bc.set_env_defaults()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    bc.exit_unless_gpus(comm, "bench_low_latency.py")
    import cupy

    import cupy_ep

    rank, r = comm.Get_rank(), comm.Get_size()
    experts = expert_counts(args.expert_list, r)
    if not experts:
        raise ValueError(f"--experts: no count left after rounding to a multiple of {r} ranks")
    t0 = time.time()
    nbytes = max(cupy_ep.Buffer.get_low_latency_rdma_size_hint(args.tokens, args.hidden, r, e) for e in experts)
    buf = cupy_ep.Buffer(comm, num_rdma_bytes=nbytes, low_latency_mode=True, num_sms=args.num_sms,
                         ll_transport=args.transport, timeout_s=args.timeout_s, enable_shrink=args.enable_shrink)
    nc = None if args.no_baseline else bc.NcclAllToAll(comm)
    if rank == 0:
        print(f"# bench_low_latency: {r} x {bc.device_name()}, transport {args.transport}"
              f"{', shrink mode' if args.enable_shrink else ''}, {args.tokens} tokens/rank, "
              f"hidden {args.hidden}, top-{args.topk} of {experts}", flush=True)
    results = []
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for e in experts:
            res = bench_experts(comm, buf, nc, e, args)
            per_rank = comm.gather(res, root=0)
            if rank == 0:
                results.append(merge(per_rank))
                print(f"# measured {e} experts ({time.time() - t0:.0f} s)", flush=True)
        stream.synchronize()
    comm.Barrier()
    if nc is not None:
        nc.destroy()
    buf.destroy()
    if rank != 0:
        return
    print(f"\n# cupy_ep low latency: {r} x {bc.device_name()}, transport {args.transport}"
          f"{', shrink mode' if args.enable_shrink else ''}, {args.tokens} tokens/rank, "
          f"hidden {args.hidden}, top-{args.topk}; medians over {args.iters} calls, worst rank; total "
          f"{time.time() - t0:.0f} s")
    for res in results:
        print_experts(res, r, args)
    if args.json:
        bc.write_json(args.json, dict(bench="low_latency", device=bc.device_name(), ranks=r, transport=args.transport,
                                      enable_shrink=args.enable_shrink, tokens=args.tokens, hidden=args.hidden,
                                      topk=args.topk, iters=args.iters,
                                      results=results, deepep_v1_h200_4ranks=bc.DEEPEP_V1_H200_4RANKS,
                                      argv=sys.argv[1:], total_s=time.time() - t0))
        print(f"\n# wrote {args.json}")
    print_summary(results, r, args.transport)
    first = results[0]
    kd, kc = bc.ll_kernel_time_us(first, "low_latency_dispatch"), bc.ll_kernel_time_us(first, "low_latency_combine")
    kern = "" if kd is None else f" (kernel {kd:.1f} / {kc or 0:.1f})"
    print(f"SUMMARY low_latency {r} ranks, {first['num_experts']} experts, {args.transport}"
          f"{' shrink' if args.enable_shrink else ''}: per call dispatch "
          f"{first['dispatch_us']:.1f} us, combine {first['combine_us']:.1f} us (LogFMT "
          f"{first['combine_logfmt_us']:.1f} us), both "
          f"{first['dispatch_combine_us']:.1f} us{kern}; NCCL "
          + (f"{first['nccl_dispatch_us']:.1f} / {first['nccl_combine_us']:.1f} us" if "nccl_dispatch_us" in first
             else "not run"))


if __name__ == "__main__":
    from cupy_ep.testing import run_or_abort

    run_or_abort(main)
