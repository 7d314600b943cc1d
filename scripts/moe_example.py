"""A mixture-of-experts layer on cupy_ep, checked against a direct NumPy computation.

    mpiexec -n 4 python scripts/moe_example.py --backend reference   # any Linux machine
    mpiexec -n 4 python scripts/moe_example.py                       # GPUs when every rank has one

Each rank routes its tokens to the top-k of E experts (E/R experts per rank), sends them
to the experts' ranks, applies the experts there and brings the results back, four ways:
normal mode and low-latency mode, each with bf16 and with FP8 data. Every rank then checks
its own tokens against y[t] = sum_k w[t, k] * x[t] @ W[e[t, k]] computed directly.
"""
import argparse
import sys

import ml_dtypes
import numpy as np
from mpi4py import MPI

import cupy_ep
from cupy_ep import per_token_cast_back, per_token_cast_to_fp8
from cupy_ep.bootstrap import gpu_unavailable_reason

BF16 = ml_dtypes.bfloat16


def expert_matrix(e, hidden):
    """Expert e's weights (float32 [H, H]), the same on every rank."""
    rng = np.random.default_rng(1000 + e)
    return (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)


def route(rng, num_tokens, num_experts, k):
    """Top-k of random scores: expert ids int64 [N, k] and softmax weights float32 [N, k]."""
    scores = rng.standard_normal((num_tokens, num_experts)).astype(np.float32)
    topk_idx = np.argsort(-scores, axis=1)[:, :k]
    top = np.take_along_axis(scores, topk_idx, axis=1)
    w = np.exp(top - top.max(axis=1, keepdims=True))
    return topk_idx.astype(np.int64), (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def as_float32(x):
    """Rows as float32, from bf16 or from an FP8 pair (data, scales)."""
    return per_token_cast_back(*x, out_dtype=np.float32) if isinstance(x, tuple) else x.astype(np.float32)


def normal_layer(buf, xp, x, topk_idx, topk_w, num_experts, experts):
    """Normal mode: dispatch, experts weighted by recv_topk_weights on the expert side, combine (a sum)."""
    per_rank, per_rdma_rank, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_w)
    rows = as_float32(recv_x)
    y = xp.zeros(rows.shape, dtype=xp.float32)
    for j, w_j in enumerate(experts):            # recv_idx holds local expert ids, -1 elsewhere
        for k in range(recv_idx.shape[1]):
            sel = xp.nonzero(recv_idx[:, k] == j)[0]
            y[sel] += recv_w[sel, k][:, None] * (rows[sel] @ w_j)
    combined, _, _ = buf.combine(y.astype(BF16), handle)
    return combined


def low_latency_layer(buf, xp, x, topk_idx, topk_w, m, num_experts, experts, use_fp8):
    """Low-latency mode: rows arrive per local expert ([E_local, R*M, H], recv_count valid rows);
    combine applies the top-k weights."""
    recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, m, num_experts, use_fp8=use_fp8)
    shape = (recv_x[0] if use_fp8 else recv_x).shape
    y = xp.zeros(shape, dtype=BF16)
    for j, (w_j, c) in enumerate(zip(experts, recv_count.tolist())):
        rows = as_float32((recv_x[0][j, :c], recv_x[1][j, :c]) if use_fp8 else recv_x[j, :c])
        y[j, :c] = (rows @ w_j).astype(BF16)
    combined, _, _ = buf.low_latency_combine(y, topk_idx, topk_w, handle)
    return combined


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["auto", "gpu", "reference"], default="auto",
                    help="gpu: cupy_ep.Buffer (CuPy arrays); reference: cupy_ep.reference.Buffer (NumPy); "
                         "auto (default): gpu when every rank has a GPU, else reference")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per rank (default 64)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size, a multiple of 128 (default 256)")
    ap.add_argument("--experts-per-rank", type=int, default=2, help="experts on each rank (default 2)")
    ap.add_argument("--topk", type=int, default=3, help="experts per token (default 3, at most all experts)")
    args = ap.parse_args()

    comm = MPI.COMM_WORLD
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    why_no_gpu = None if args.backend == "reference" else gpu_unavailable_reason(comm)
    if args.backend == "gpu" and why_no_gpu is not None:
        if rank == 0:
            print(f"--backend gpu needs a GPU on every rank ({why_no_gpu}); --backend reference runs anywhere",
                  file=sys.stderr)
        sys.exit(2)
    use_gpu = args.backend != "reference" and why_no_gpu is None
    if use_gpu:
        import cupy as xp
        Buffer = cupy_ep.Buffer
    else:
        from cupy_ep.reference import Buffer
        xp = np
    num_experts = args.experts_per_rank * num_ranks
    n, h, k = args.tokens, args.hidden, min(args.topk, num_experts)

    rng = np.random.default_rng(rank)
    x_host = rng.standard_normal((n, h)).astype(BF16)
    idx_host, w_host = route(rng, n, num_experts, k)
    everyone = [expert_matrix(e, h) for e in range(num_experts)]
    mine = [xp.asarray(everyone[e]) for e in range(rank * args.experts_per_rank, (rank + 1) * args.experts_per_rank)]

    buf = Buffer(comm, num_nvl_bytes=Buffer.get_nvl_buffer_size_hint(n, h, num_ranks, k),
                 num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(n, h, num_ranks, num_experts),
                 low_latency_mode=True)
    x, topk_idx, topk_w = xp.asarray(x_host), xp.asarray(idx_host), xp.asarray(w_host)
    x_fp8 = per_token_cast_to_fp8(x)
    outputs = {
        "normal bf16": normal_layer(buf, xp, x, topk_idx, topk_w, num_experts, mine),
        "normal FP8": normal_layer(buf, xp, x_fp8, topk_idx, topk_w, num_experts, mine),
        "low-latency bf16": low_latency_layer(buf, xp, x, topk_idx, topk_w, n, num_experts, mine, False),
        "low-latency FP8": low_latency_layer(buf, xp, x, topk_idx, topk_w, n, num_experts, mine, True),
    }
    buf.destroy()

    # The same layer computed directly, for this rank's tokens (FP8 paths from the FP8-rounded x).
    x_rounded = {"bf16": x_host.astype(np.float32), "FP8": as_float32(per_token_cast_to_fp8(x_host))}
    to_numpy = getattr(xp, "asnumpy", np.asarray)
    stacked = np.stack(everyone)
    errors = {}
    for name, got in outputs.items():
        xs = x_rounded[name.split()[-1]]
        want = sum(w_host[:, [s]] * np.einsum("th,thg->tg", xs, stacked[idx_host[:, s]]) for s in range(k))
        errors[name] = float(np.max(np.abs(to_numpy(got).astype(np.float32) - want)) / np.max(np.abs(want)))
    worst = comm.allreduce(max(errors.values()), op=MPI.MAX)   # NaN compares False: it fails below
    ok = comm.allreduce(all(e <= 1e-2 for e in errors.values()), op=MPI.LAND)
    if rank == 0:
        backend = "GPU (cupy_ep.Buffer)" if use_gpu else "reference (cupy_ep.reference.Buffer, NumPy)"
        print(f"MoE layer on {num_ranks} ranks, {backend}: {num_experts} experts, top-{k}, hidden {h}, "
              f"{n} tokens per rank")
        for name, err in errors.items():
            print(f"  {name:17s} max error {err:.1e} of max |y| (rank 0)")
        verdict = "OK: every rank's output matches" if ok else "FAILED: some rank's output differs from"
        print(f"{verdict} the direct computation (worst {worst:.1e}, tolerance 1e-2)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
