"""Benchmark of the low-latency dispatch/combine (DeepEP's decode workload) and an NCCL baseline.

Run: mpiexec -n 4 python3 scripts/bench_low_latency.py [--json PATH] [--front auto|engine|buffer]

Workload: 128 tokens per rank, hidden 7168, top-8 of 288 and of 256 experts; FP8 dispatch,
bf16 combine. Times are CUDA-event medians per operation over many iterations issued back to
back behind a spin kernel (so host launch overhead stays out of the numbers), after warm-up,
the worst rank reported; also CUDA-graph replays of dispatch + combine and the send/receive
split of hook mode. Byte accounting follows DeepEP's test: dispatch = selections *
(H + H/128*4 + 16), combine = selections * H*2 ("logical" bandwidth); the bytes this design
really moves (one copy per destination rank) are printed too. The NCCL baseline moves this
design's per-rank bytes with a grouped send/recv all-to-all (cupy.cuda.nccl), timed the same way.

Front ends: ``engine`` (LowLatencyEngine over a CUDA-IPC buffer, no NVSHMEM needed) or ``buffer``
(public cupy_ep.Buffer; needs nvshmem4py); ``auto`` = buffer when nvshmem4py imports.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

BF16 = ml_dtypes.bfloat16
M, H, K = 128, 7168, 8


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    p.add_argument("--front", default="auto", choices=["auto", "engine", "buffer"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--experts", default="288,256")
    p.add_argument("--num-sms", type=int, default=None)
    p.add_argument("--profile", action="store_true",
                   help="per-phase breakdown and kernel durations from in-kernel globaltimer checkpoints")
    return p.parse_args()


_spin = None


def spin(ns):
    """A kernel that keeps the stream busy for ns nanoseconds."""
    import cupy

    global _spin
    if _spin is None:
        _spin = cupy.RawKernel(r'''
        extern "C" __global__ void ll_bench_spin(unsigned long long ns) {
            unsigned long long t0, t;
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
            do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
        }''', "ll_bench_spin")
    _spin((1,), (32,), (np.uint64(ns),))


def timed(comm, fn, iters, warm=5, spin_ns=10_000_000, chunk=20):
    """Median µs of fn() per call on this rank (events around each call, calls back to back)."""
    import cupy

    for _ in range(warm):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    done = 0
    while done < iters:
        n = min(chunk, iters - done)
        comm.Barrier()
        spin(spin_ns)
        evs = [cupy.cuda.Event() for _ in range(n + 1)]
        evs[0].record()
        for i in range(n):
            fn()
            evs[i + 1].record()
        evs[-1].synchronize()
        times += [cupy.cuda.get_elapsed_time(evs[i], evs[i + 1]) * 1e3 for i in range(n)]
        done += n
    return statistics.median(times)


def timed_pair(comm, fn_a, fn_b, iters, warm=5, spin_ns=10_000_000, chunk=20):
    """Median µs of fn_a() and of fn_b() issued alternately (e.g. send then hook)."""
    import cupy

    for _ in range(warm):
        fn_b(fn_a())
    cupy.cuda.get_current_stream().synchronize()
    ta, tb = [], []
    done = 0
    while done < iters:
        n = min(chunk, iters - done)
        comm.Barrier()
        spin(spin_ns)
        evs = [cupy.cuda.Event() for _ in range(2 * n + 1)]
        evs[0].record()
        for i in range(n):
            r = fn_a()
            evs[2 * i + 1].record()
            fn_b(r)
            evs[2 * i + 2].record()
        evs[-1].synchronize()
        ta += [cupy.cuda.get_elapsed_time(evs[2 * i], evs[2 * i + 1]) * 1e3 for i in range(n)]
        tb += [cupy.cuda.get_elapsed_time(evs[2 * i + 1], evs[2 * i + 2]) * 1e3 for i in range(n)]
        done += n
    return statistics.median(ta), statistics.median(tb)


class Front:
    def __init__(self, comm, kind, num_bytes, num_sms):
        import cupy

        self.comm, self.kind = comm, kind
        self.rank, self.R = comm.Get_rank(), comm.Get_size()
        if kind == "engine":
            from cupy_ep.low_latency import LowLatencyEngine
            from cupy_ep.memory import ErrorRecord, NVLinkBuffer

            self.nvl = NVLinkBuffer(comm, num_bytes)
            self.err = ErrorRecord()
            sym = SimpleNamespace(ptr=self.nvl.local_ptr, num_bytes=num_bytes, peer_ptrs=list(self.nvl.peer_ptrs))
            self.eng = LowLatencyEngine(comm, self.rank, self.R, sym, self.err, 60 * 10**9, num_sms, "nvlink")
        else:
            import cupy_ep

            self.buf = cupy_ep.Buffer(comm, num_rdma_bytes=num_bytes, low_latency_mode=True, timeout_s=60.0)
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def dispatch(self, x, idx, E, fp8=True, hook=False):
        import cupy

        if self.kind == "engine":
            return self.eng.dispatch(x, idx, M, E, fp8, False, False, hook, None, cupy.cuda.get_current_stream())
        rx, cnt, h, _ev, hk = self.buf.low_latency_dispatch(x, idx, M, E, use_fp8=fp8, return_recv_hook=hook)
        return rx, cnt, h, hk

    def combine(self, y, idx, w, handle, hook=False):
        import cupy

        if self.kind == "engine":
            return self.eng.combine(y, idx, w, handle, False, hook, None, cupy.cuda.get_current_stream())
        out, _ev, hk = self.buf.low_latency_combine(y, idx, w, handle, return_recv_hook=hook)
        return out, hk

    def engine(self):
        """The LowLatencyEngine behind this front (for the in-kernel profile)."""
        return self.eng if self.kind == "engine" else self.buf._low_latency

    def run_hook(self, hk):
        import cupy

        if self.kind == "engine":
            hk(cupy.cuda.get_current_stream())
        else:
            hk()

    def check(self):
        if self.kind == "engine":
            self.err.check()
        else:
            self.buf._err.check()

    def destroy(self):
        import cupy

        cupy.cuda.runtime.deviceSynchronize()
        self.comm.Barrier()
        if self.kind == "engine":
            self.eng.destroy()
            self.nvl.free()
        else:
            self.buf.destroy()


def profile_phases(comm, front, x, idx, w, y, E, iters=20):
    """Medians (µs from the kernel's earliest block start) of the kernels' globaltimer checkpoints,
    dispatch + combine issued back to back behind a spin kernel (steady state). The last one,
    "kernel end", is the kernel's duration on the GPU: what DeepEP's tests report (profiler
    kernel times), without the launch gaps that the event timings include."""
    import cupy

    eng = front.engine()
    nb = eng.num_blocks
    pd = cupy.zeros((iters, nb * 16), cupy.uint64)
    pc = cupy.zeros((iters, nb * 16), cupy.uint64)
    d_names = {1: "send: tokens stored (all blocks)", 2: "send: signals sent",
               3: "recv: signals seen (all blocks)", 4: "recv: bases (all blocks)", 5: "recv: rows copied (all blocks)",
               15: "kernel end (all blocks)"}
    c_names = {1: "A: weights sent (all blocks)", 2: "B: partials stored (all blocks)",
               3: "B: signals (last block)", 4: "C: signals seen (all blocks)", 5: "C: reduced (all blocks)",
               15: "kernel end (all blocks)"}
    for _ in range(3):
        front.combine(y, idx, w, front.dispatch(x, idx, E)[2])
    cupy.cuda.get_current_stream().synchronize()
    comm.Barrier()
    spin(10_000_000)
    for i in range(iters):
        eng.prof_dispatch, eng.prof_combine = pd[i], pc[i]
        h = front.dispatch(x, idx, E)[2]
        front.combine(y, idx, w, h)
    eng.prof_dispatch = eng.prof_combine = None
    cupy.cuda.get_current_stream().synchronize()
    rec = {}
    for tag, arr, names in (("dispatch", pd, d_names), ("combine", pc, c_names)):
        a = cupy.asnumpy(arr).reshape(iters, nb, 16).astype(np.int64)[iters // 4:]   # skip the first ones
        for k, name in names.items():
            vals = []
            for p in a:
                v = p[:, k][p[:, k] > 0]
                if v.size:
                    vals.append((v.max() - p[:, 0].min()) / 1e3)
            if vals:
                rec[f"{tag} {name}"] = statistics.median(vals)
    return rec


def nccl_comm(comm):
    from cupy.cuda import nccl

    uid = nccl.get_unique_id() if comm.Get_rank() == 0 else None
    uid = comm.bcast(uid)
    return nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())


def nccl_alltoallv(nc, send, send_counts, recv, recv_counts, stream):
    """Grouped send/recv of byte ranges (uint8 buffers), like an all-to-all-v."""
    from cupy.cuda import nccl

    R = len(send_counts)
    so = np.concatenate([[0], np.cumsum(send_counts)])
    ro = np.concatenate([[0], np.cumsum(recv_counts)])
    nccl.groupStart()
    for p in range(R):
        if send_counts[p]:
            nc.send(send.data.ptr + int(so[p]), int(send_counts[p]), nccl.NCCL_UINT8, p, stream.ptr)
        if recv_counts[p]:
            nc.recv(recv.data.ptr + int(ro[p]), int(recv_counts[p]), nccl.NCCL_UINT8, p, stream.ptr)
    nccl.groupEnd()


def bench_experts(comm, front, E, iters, nc, profile=False):
    import cupy

    from cupy_ep.low_latency import slot_bytes

    R, rank = comm.Get_size(), comm.Get_rank()
    EL = E // R
    rng = np.random.default_rng(1234 + rank)
    x = cupy.asarray(rng.standard_normal((M, H), dtype=np.float32).astype(BF16).view(np.uint16)).view(BF16)
    idx_np = np.argsort(rng.random((M, E)), axis=1)[:, :K].astype(np.int64)
    idx = cupy.asarray(idx_np)
    w = cupy.asarray(rng.uniform(0.1, 1, (M, K)).astype(np.float32))
    res = {"num_experts": E}

    # bytes (DeepEP's accounting, and this design's)
    num_sel = int((idx_np >= 0).sum())
    dests = np.zeros((M, R), bool)
    for r in range(R):
        dests[:, r] = ((idx_np >= r * EL) & (idx_np < (r + 1) * EL)).any(axis=1)
    per_rank_tokens = dests.sum(axis=0)            # tokens this rank sends to each rank
    res["deepep_dispatch_bytes"] = num_sel * (H + H // 128 * 4 + 16)
    res["deepep_combine_bytes"] = num_sel * H * 2
    res["copies_per_token"] = float(dests.sum() / M)
    res["own_dispatch_bytes_remote"] = int(sum(per_rank_tokens[r] for r in range(R) if r != rank)
                                           * slot_bytes(H, K, True))
    res["own_combine_bytes_remote"] = int(sum(per_rank_tokens[r] for r in range(R) if r != rank) * H * 2)

    # a fixed expert output
    y = cupy.asarray(rng.standard_normal((EL, R * M, H), dtype=np.float32).astype(BF16).view(np.uint16)).view(BF16)

    d = lambda: front.dispatch(x, idx, E)                        # noqa: E731
    res["dispatch_us"] = timed(comm, d, iters)
    handle = front.dispatch(x, idx, E)[2]
    res["combine_us"] = timed(comm, lambda: front.combine(y, idx, w, handle), iters)
    res["dispatch_combine_us"] = timed(comm, lambda: front.combine(y, idx, w, front.dispatch(x, idx, E)[2]), iters)
    front.check()

    # hook mode: send / receive split
    res["dispatch_send_us"], res["dispatch_recv_us"] = timed_pair(
        comm, lambda: front.dispatch(x, idx, E, hook=True)[3], front.run_hook, iters)
    handle = front.dispatch(x, idx, E)[2]
    res["combine_send_us"], res["combine_recv_us"] = timed_pair(
        comm, lambda: front.combine(y, idx, w, handle, hook=True)[1], front.run_hook, iters)
    front.check()

    # CUDA graph of dispatch + combine
    s = cupy.cuda.get_current_stream()
    for _ in range(2):
        front.combine(y, idx, w, front.dispatch(x, idx, E)[2])
    s.synchronize()
    s.begin_capture()
    keep = front.combine(y, idx, w, front.dispatch(x, idx, E)[2])
    g = s.end_capture()
    res["graph_dispatch_combine_us"] = timed(comm, lambda: g.launch(s), iters)
    del keep
    front.check()

    if profile:
        res["profile"] = profile_phases(comm, front, x, idx, w, y, E)

    # NCCL baseline: the same per-rank bytes through a grouped send/recv all-to-all
    if nc is not None:
        sd = [int(per_rank_tokens[r]) * slot_bytes(H, K, True) for r in range(R)]
        rd = comm.alltoall(sd)
        sc = [int(per_rank_tokens[r]) * H * 2 for r in range(R)]
        rc = comm.alltoall(sc)
        sbuf = cupy.zeros(max(sum(sd), sum(sc)) + 1, cupy.uint8)
        rbuf = cupy.zeros(max(sum(rd), sum(rc)) + 1, cupy.uint8)
        res["nccl_dispatch_us"] = timed(comm, lambda: nccl_alltoallv(nc, sbuf, sd, rbuf, rd, s), iters)
        res["nccl_combine_us"] = timed(comm, lambda: nccl_alltoallv(nc, sbuf, sc, rbuf, rc, s), iters)
    return res


def main():
    args = parse()
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from mpi4py import MPI

    import cupy

    comm = MPI.COMM_WORLD
    rank, R = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cupy.cuda.Device(local.Get_rank() % cupy.cuda.runtime.getDeviceCount()).use()
    kind = args.front
    if kind == "auto":
        try:
            import nvshmem.core

            kind = "buffer" if nvshmem.core is not None else "engine"
        except Exception:  # noqa: BLE001
            kind = "engine"
        kind = "buffer" if comm.allreduce(1 if kind == "buffer" else 0, op=MPI.MIN) else "engine"
    experts = [int(e) for e in args.experts.split(",")]
    from cupy_ep.low_latency import LowLatencyEngine

    nbytes = max(LowLatencyEngine.size_hint(M, H, R, e) for e in experts)
    t0 = time.time()
    front = Front(comm, kind, nbytes, args.num_sms)
    try:
        nc = nccl_comm(comm)
    except Exception as e:  # noqa: BLE001
        if rank == 0:
            print(f"NCCL baseline unavailable: {e}")
        nc = None
    results = []
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        for E in experts:
            r = bench_experts(comm, front, E, args.iters, nc, args.profile)
            allr = comm.gather(r, root=0)
            if rank == 0:
                merged = dict(r)
                if "profile" in r:
                    merged["profile"] = {k: max(x["profile"][k] for x in allr) for k in r["profile"]}
                for key in r:
                    if key.endswith("_us"):
                        merged[key] = max(x[key] for x in allr)
                        merged[key + "_mean"] = sum(x[key] for x in allr) / len(allr)
                merged["own_dispatch_bytes_remote"] = max(x["own_dispatch_bytes_remote"] for x in allr)
                merged["own_combine_bytes_remote"] = max(x["own_combine_bytes_remote"] for x in allr)
                results.append(merged)
    front.destroy()
    if rank == 0:
        dev = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
        print(f"\nlow-latency bench: {R} ranks, {dev}, front={kind}, {M} tokens/rank, hidden {H}, top-{K}; "
              f"medians over {args.iters} iterations, worst rank; total {time.time() - t0:.0f} s")
        for r in results:
            E = r["num_experts"]
            gbps = lambda b, us: b / (us * 1e-6) / 1e9  # noqa: E731
            print(f"\n== top-{K} of {E} experts: {r['copies_per_token']:.2f} destination ranks per token")
            print(f"{'op':<28}{'us':>9}{'DeepEP GB/s':>13}")
            rows = [("dispatch (FP8)", r["dispatch_us"], r["deepep_dispatch_bytes"]),
                    ("combine (bf16)", r["combine_us"], r["deepep_combine_bytes"]),
                    ("dispatch + combine", r["dispatch_combine_us"], None),
                    ("graph: dispatch + combine", r["graph_dispatch_combine_us"], None),
                    ("hook: dispatch send", r["dispatch_send_us"], None),
                    ("hook: dispatch recv", r["dispatch_recv_us"], None),
                    ("hook: combine send", r["combine_send_us"], None),
                    ("hook: combine recv", r["combine_recv_us"], None)]
            if "nccl_dispatch_us" in r:
                rows += [("NCCL a2a, dispatch bytes", r["nccl_dispatch_us"], None),
                         ("NCCL a2a, combine bytes", r["nccl_combine_us"], None)]
            for name, us, b in rows:
                bw = f"{gbps(b, us):>13.0f}" if b else f"{'':>13}"
                print(f"{name:<28}{us:>9.1f}{bw}")
            for name, us in r.get("profile", {}).items():
                print(f"  profile (worst rank) {name:<44}{us:>7.1f} us")
            print(f"bytes to other ranks per rank: dispatch {r['own_dispatch_bytes_remote'] / 1e6:.2f} MB, "
                  f"combine {r['own_combine_bytes_remote'] / 1e6:.2f} MB (DeepEP's count: "
                  f"{r['deepep_dispatch_bytes'] / 1e6:.2f} / {r['deepep_combine_bytes'] / 1e6:.2f} MB incl. own rank)")
        print("\nreference (DeepEP LL on this host, 288 experts): dispatch 33-39 us, combine 57 us, both 98 us")
        if args.json:
            Path(args.json).write_text(json.dumps({"ranks": R, "device": dev, "front": kind, "results": results},
                                                  indent=1))


if __name__ == "__main__":
    main()
