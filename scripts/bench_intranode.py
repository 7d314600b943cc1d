"""Normal-mode benchmark with DeepEP's accounting, and an NCCL all-to-all baseline.

    mpiexec -n 4 python scripts/bench_intranode.py [--sweep] [--json out.json]

Workload (DeepEP's test_intranode): 4096 tokens per rank, hidden 7168, top-8 of 256
experts. Logical bandwidth = bytes received by the rank (own rank included) over the
kernel time (FP8 counts data and scales); kernel times come from CUDA events around
the dispatch/combine kernel alone (like DeepEP's profiler-based numbers), and the
end-to-end call time (notify, host wait, allocation included) is shown beside them.
The baseline does the same exchange with NCCL grouped send/recv (cupy.cuda.nccl):
pack rows per destination, all-to-all, and for combine all-to-all back and a
scatter-add, timed end to end on the same GPUs in the same run.
"""
import argparse
import json

import ml_dtypes
import numpy as np
from mpi4py import MPI

BF16 = ml_dtypes.bfloat16


def timed_calls(fn, iters, comm):
    """Median end-to-end ms of fn() on the current stream."""
    import cupy

    pairs = []
    for _ in range(iters):
        comm.Barrier()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        pairs.append((start, end))
    return float(np.median([cupy.cuda.get_elapsed_time(s, e) for s, e in pairs]))


def kernel_ms(engine, name):
    import cupy

    times = [cupy.cuda.get_elapsed_time(s, e) for n, s, e in engine.kernel_timings if n == name]
    return float(np.median(times)) if times else float("nan")


class NcclAllToAll:
    """Dispatch/combine through NCCL grouped send/recv, for the baseline."""

    def __init__(self, comm):
        from cupy.cuda import nccl

        self.nccl = nccl
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        uid = comm.bcast(nccl.get_unique_id() if self.rank == 0 else None)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def exchange(self, send_parts, recv_parts):
        import cupy

        stream = cupy.cuda.get_current_stream().ptr
        self.nccl.groupStart()
        for peer in range(self.size):
            s, r = send_parts[peer], recv_parts[peer]
            if s.nbytes:
                self.comm.send(s.data.ptr, s.nbytes, self.nccl.NCCL_INT8, peer, stream)
            if r.nbytes:
                self.comm.recv(r.data.ptr, r.nbytes, self.nccl.NCCL_INT8, peer, stream)
        self.nccl.groupEnd()


def main():
    import cupy

    import cupy_ep

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256,
                   help="rounded down to a multiple of the number of ranks")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sweep", action="store_true",
                   help="sweep SM counts, threads per block (chunk size) and receiving blocks")
    p.add_argument("--configs", default=None,
                   help="comma-separated SMS/THREADS/RECEIVERS triples to measure, e.g. 24/768/12,24/768/8")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    comm = MPI.COMM_WORLD
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    n, h, k, e = args.tokens, args.hidden, args.topk, args.experts
    e -= e % num_ranks   # experts must split evenly over the ranks (3 ranks: 255 of 256)
    buf = cupy_ep.Buffer(comm, num_nvl_bytes=cupy_ep.Buffer.get_nvl_buffer_size_hint(n, h, num_ranks, k))
    engine = buf._intranode
    rng = np.random.default_rng(1234 + rank)
    scores = rng.random((n, e))
    topk_idx = cupy.asarray(np.argsort(-scores, axis=1)[:, :k].astype(np.int64))
    topk_w = cupy.asarray(rng.random((n, k)).astype(np.float32))
    x_host = rng.standard_normal((n, h)).astype(np.float32).astype(BF16)
    x = cupy.asarray(x_host)
    fp8_data, fp8_scales = cupy_ep.per_token_cast_to_fp8(x_host)
    x_fp8 = (cupy.asarray(np.ascontiguousarray(fp8_data).view(np.uint8)), cupy.asarray(fp8_scales))

    engine.kernel_timings = []
    layout_e2e = timed_calls(lambda: buf.get_dispatch_layout(topk_idx, e), args.iters, comm)
    layout_k = kernel_ms(engine, "layout")
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, e)

    def run_config(config):
        result = {"num_sms": config.num_sms, "num_threads": config.num_threads, "num_receivers": config.num_receivers}
        for name, data in (("dispatch_fp8", x_fp8), ("dispatch_bf16", x)):
            engine.kernel_timings = []
            holder = {}

            def call():
                holder["out"] = buf.dispatch(data, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                             num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                             topk_weights=topk_w, config=config)
            result[name + "_e2e_ms"] = timed_calls(call, args.iters, comm)
            result[name + "_ms"] = kernel_ms(engine, "dispatch")
        recv_x, _, recv_w, _, handle, _ = holder["out"]
        engine.kernel_timings = []
        result["combine_e2e_ms"] = timed_calls(lambda: buf.combine(recv_x, handle, config=config), args.iters, comm)
        result["combine_ms"] = kernel_ms(engine, "combine")
        recv_tokens = handle.num_recv_tokens
        bytes_bf16 = recv_tokens * h * 2
        bytes_fp8 = recv_tokens * (h + h // 128 * 4)
        result["recv_tokens"] = recv_tokens
        result["dispatch_fp8_GBps"] = bytes_fp8 / result["dispatch_fp8_ms"] / 1e6
        result["dispatch_bf16_GBps"] = bytes_bf16 / result["dispatch_bf16_ms"] / 1e6
        result["combine_GBps"] = bytes_bf16 / result["combine_ms"] / 1e6
        return result

    configs = [buf._config]
    if args.sweep:
        configs = [cupy_ep.Config(s, t, s // d) for s in (24, 32) for t in (768, 1024) for d in (2, 3, 4)]
    if args.configs:
        configs = [cupy_ep.Config(*map(int, triple.split("/"))) for triple in args.configs.split(",")]
    results = [run_config(c) for c in configs]

    # NCCL baseline: same rows, same bytes.
    nccl_a2a = NcclAllToAll(comm)
    in_rank_h = cupy.asnumpy(in_rank)
    send_idx = [cupy.asarray(np.nonzero(in_rank_h[:, r])[0]) for r in range(num_ranks)]
    counts = np.array([len(i) for i in send_idx])
    recv_counts = comm.alltoall(list(counts))
    recv_bf16 = [cupy.empty((c, h), dtype=BF16) for c in recv_counts]
    send_bufs = [cupy.empty((len(i), h), dtype=BF16) for i in send_idx]

    def nccl_dispatch():
        for r in range(num_ranks):
            cupy.take(x, send_idx[r], axis=0, out=send_bufs[r])
        nccl_a2a.exchange(send_bufs, recv_bf16)

    back = [cupy.empty((len(i), h), dtype=BF16) for i in send_idx]
    acc = cupy.empty((n, h), dtype=cupy.float32)

    def nccl_combine():
        nccl_a2a.exchange(recv_bf16, back)
        acc.fill(0)
        for r in range(num_ranks):
            cupy.add.at(acc, send_idx[r], back[r].astype(cupy.float32))
        acc.astype(BF16)

    nccl_dispatch_ms = timed_calls(nccl_dispatch, args.iters, comm)
    nccl_combine_ms = timed_calls(nccl_combine, args.iters, comm)
    nccl_recv_bytes = sum(recv_counts) * h * 2
    baseline = {"nccl_dispatch_bf16_ms": nccl_dispatch_ms, "nccl_combine_ms": nccl_combine_ms,
                "nccl_dispatch_bf16_GBps": nccl_recv_bytes / nccl_dispatch_ms / 1e6,
                "nccl_combine_GBps": nccl_recv_bytes / nccl_combine_ms / 1e6}

    all_results = comm.gather((results, baseline, layout_k, layout_e2e), root=0)
    buf.destroy()
    if rank != 0:
        return
    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"\n# cupy_ep intranode, {num_ranks} x {device}, {n} tokens/rank, hidden {h}, top-{k} of {e} experts")
    print(f"# layout kernel {np.mean([r[2] for r in all_results]) * 1e3:.0f} us "
          f"(call incl. host range check {np.mean([r[3] for r in all_results]) * 1e3:.0f} us)")
    print("# GB/s: logical (bytes received incl. own rank) / kernel time, mean over ranks; "
          "(e2e) = whole call incl. notify + host wait")
    print(f"{'SMs':>4} {'thr':>5} {'rcv':>4} | {'FP8 disp':>9} {'us':>6} | {'bf16 disp':>9} {'us':>6} | "
          f"{'combine':>9} {'us':>6} | {'e2e disp bf16 us':>16} {'e2e comb us':>11}")
    summary = []
    for i, cfg in enumerate(results):
        per = [r[0][i] for r in all_results]

        def mean(key):
            return float(np.mean([q[key] for q in per]))
        row = {key: mean(key) for key in per[0] if isinstance(per[0][key], float)}
        row.update(num_sms=cfg["num_sms"], num_threads=cfg["num_threads"], num_receivers=cfg["num_receivers"])
        summary.append(row)
        print(f"{cfg['num_sms']:>4} {cfg['num_threads']:>5} {cfg['num_receivers']:>4} | {row['dispatch_fp8_GBps']:>9.1f} "
              f"{row['dispatch_fp8_ms'] * 1e3:>6.0f} | {row['dispatch_bf16_GBps']:>9.1f} "
              f"{row['dispatch_bf16_ms'] * 1e3:>6.0f} | {row['combine_GBps']:>9.1f} {row['combine_ms'] * 1e3:>6.0f} | "
              f"{row['dispatch_bf16_e2e_ms'] * 1e3:>16.0f} {row['combine_e2e_ms'] * 1e3:>11.0f}")
    base = {key: float(np.mean([r[1][key] for r in all_results])) for key in all_results[0][1]}
    print(f"NCCL baseline (same run): dispatch bf16 {base['nccl_dispatch_bf16_GBps']:.1f} GB/s "
          f"({base['nccl_dispatch_bf16_ms'] * 1e3:.0f} us), combine {base['nccl_combine_GBps']:.1f} GB/s "
          f"({base['nccl_combine_ms'] * 1e3:.0f} us)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "ranks": num_ranks, "tokens": n, "hidden": h, "topk": k, "experts": e,
                       "configs": summary, "baseline": base,
                       "layout_us": float(np.mean([r[2] for r in all_results]) * 1e3)}, f, indent=1)


if __name__ == "__main__":
    main()
