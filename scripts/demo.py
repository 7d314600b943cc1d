"""A toy MoE layer on cupy_ep, checked against a direct computation. Run under MPI:

    mpiexec -n 2 python scripts/demo.py

Each rank holds a few tokens (bf16), routes each to its top-k of E experts (random
scores, softmax weights), and the experts (one small float32 matrix each, E/R per rank)
transform the tokens they receive. Two ways through the same layer:

1. normal mode: get_dispatch_layout -> dispatch -> each rank applies its experts to the
   rows it received, weighted with recv_topk_weights (combine is a plain sum, so the
   weighting happens on the expert side, as DeepEP users do) -> combine;
2. low-latency mode: low_latency_dispatch with FP8 -> per-expert compute on the masked
   layout -> low_latency_combine (which applies the top-k weights itself).

Rank 0 gathers inputs and outputs and recomputes the layer directly in one process.
The GPU backend (cupy_ep.Buffer, CuPy arrays) runs when every rank has a GPU; otherwise
the NumPy reference backend (cupy_ep.reference.Buffer) does. The report says which.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

try:
    import cupy_ep  # noqa: F401
except ImportError:       # running from a source checkout without `pip install .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import cupy_ep  # noqa: F401

import ml_dtypes  # noqa: E402

from cupy_ep import fp8  # noqa: E402

BF16 = ml_dtypes.bfloat16


def choose_backend(comm, force=None):
    """('gpu', cupy_ep.Buffer, cupy) when every rank has a GPU, else ('reference', ..., numpy)."""
    use_gpu = False
    if force != "reference":
        try:
            use_gpu = bool(cupy_ep.gpu_available(comm))     # collective: all ranks agree
        except AttributeError:                              # a cupy_ep without the GPU backend
            use_gpu = False
    if force == "gpu" and not use_gpu:
        raise SystemExit("--backend gpu: not every rank has a usable GPU")
    if use_gpu:
        import cupy
        return "gpu", cupy_ep.Buffer, cupy
    from cupy_ep import reference
    return "reference", reference.Buffer, np


def expert_weights(e, hidden):
    """Expert e's matrix (float32 [H, H]); every rank can make any expert's."""
    rng = np.random.default_rng(10_000 + e)
    return (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)


def apply_expert(xp, w, rows_f32):
    """rows @ w without BLAS (a broadcast product and a sum: fine for a toy)."""
    return (rows_f32[:, :, None] * w[None, :, :]).sum(axis=1)


def route(rng, n, num_experts, k):
    scores = rng.standard_normal((n, num_experts)).astype(np.float32)
    topk_idx = np.argsort(-scores, axis=1)[:, :k].astype(np.int64)
    top = np.take_along_axis(scores, topk_idx, axis=1)
    w = np.exp(top - top.max(axis=1, keepdims=True))
    return topk_idx, (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=12, help="tokens on rank 0 (rank r has tokens + r)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts-per-rank", type=int, default=2)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--backend", choices=["auto", "gpu", "reference"], default="auto")
    args = ap.parse_args()

    comm = MPI.COMM_WORLD
    rank, R = comm.Get_rank(), comm.Get_size()
    backend, Buffer, xp = choose_backend(comm, None if args.backend == "auto" else args.backend)
    H, e_local, K = args.hidden, args.experts_per_rank, args.topk
    E = e_local * R
    if K > E:
        raise SystemExit(f"--topk {K} exceeds the {E} experts")
    to_host = (lambda a: xp.asnumpy(a)) if xp is not np else (lambda a: a)

    # This rank's tokens and routing (host side), then the device copies.
    N = args.tokens + rank
    rng = np.random.default_rng(rank)
    x_host = rng.standard_normal((N, H)).astype(np.float32).astype(BF16)
    topk_host, w_host = route(rng, N, E, K)
    M = comm.allreduce(N, op=MPI.MAX)

    t0 = time.perf_counter()
    buf = Buffer(comm, num_nvl_bytes=Buffer.get_nvl_buffer_size_hint(M, H, R, K),
                 num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(M, H, R, E), low_latency_mode=True)
    x, topk_idx, topk_w = xp.asarray(x_host), xp.asarray(topk_host), xp.asarray(w_host)
    my_w = {j: xp.asarray(expert_weights(rank * e_local + j, H)) for j in range(e_local)}

    # 1. normal mode: weights applied on the expert side, combine sums.
    ntpr, ntprr, ntpe, in_rank, _ = buf.get_dispatch_layout(topk_idx, E)
    recv_x, recv_idx, recv_w, per_expert, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntprr, is_token_in_rank=in_rank,
        num_tokens_per_expert=ntpe, topk_idx=topk_idx, topk_weights=topk_w)
    rows = recv_x.astype(xp.float32)
    out = xp.zeros(rows.shape, dtype=xp.float32)
    for j in range(e_local):
        for kk in range(K):
            sel = xp.nonzero(recv_idx[:, kk] == j)[0]
            if sel.size:
                out[sel] += recv_w[sel, kk][:, None] * apply_expert(xp, my_w[j], rows[sel])
    y_normal, _, _ = buf.combine(out.astype(BF16), handle)

    # 2. low-latency mode with FP8: combine applies the top-k weights.
    recv_q, recv_count, ll_handle, _, _ = buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True)
    counts = [int(c) for c in to_host(recv_count)]
    y_ll_in = xp.zeros((e_local, R * M, H), dtype=BF16)
    for j in range(e_local):
        c = counts[j]
        if c:
            rows_j = fp8.per_token_cast_back(recv_q[0][j, :c], recv_q[1][j, :c], out_dtype=np.float32)
            y_ll_in[j, :c] = apply_expert(xp, my_w[j], rows_j).astype(BF16)
    y_ll, _, _ = buf.low_latency_combine(y_ll_in, topk_idx, topk_w, ll_handle)
    elapsed = time.perf_counter() - t0
    buf.destroy()

    # Rank 0 recomputes the layer directly from everyone's inputs.
    gathered = comm.gather((x_host, topk_host, w_host, to_host(y_normal), to_host(y_ll), per_expert), root=0)
    ok, report = True, ""
    if rank == 0:
        experts = [expert_weights(e, H) for e in range(E)]
        err_n = err_l = 0.0
        for xs, ti, tw, yn, yl, _ in gathered:
            xf = xs.astype(np.float32)
            q, s = fp8.per_token_cast_to_fp8(xs)
            xq = fp8.per_token_cast_back(q, s, out_dtype=np.float32)
            want_n = np.zeros(xf.shape, np.float64)
            want_l = np.zeros(xf.shape, np.float64)
            for t in range(xf.shape[0]):
                for kk in range(ti.shape[1]):
                    e = int(ti[t, kk])
                    want_n[t] += tw[t, kk] * (xf[t].astype(np.float64) @ experts[e])
                    want_l[t] += tw[t, kk] * (xq[t].astype(np.float64) @ experts[e])
            scale = max(np.abs(want_n).max(), 1e-30)
            err_n = max(err_n, float(np.abs(yn.astype(np.float64) - want_n).max() / scale))
            err_l = max(err_l, float(np.abs(yl.astype(np.float64) - want_l).max() / scale))
        ok = err_n < 2e-2 and err_l < 2e-2 and all(np.isfinite(g[3]).all() and np.isfinite(g[4]).all()
                                                     for g in gathered)
        what = ("GPU backend (cupy_ep.Buffer, CuPy arrays)" if backend == "gpu"
                else "reference backend (cupy_ep.reference: NumPy over MPI; not every rank has a GPU)")
        report = "\n".join([
            f"cupy_ep demo: {R} ranks, {E} experts ({e_local} per rank), top-{K}, hidden {H}",
            f"  backend: {what}",
            f"  tokens per rank: {[g[0].shape[0] for g in gathered]}; rows per local expert on rank 0 "
            f"(normal mode): {gathered[0][5]}",
            f"  normal mode (bf16 dispatch, expert-side weights, combine): max error {err_n:.2e} of max |y|",
            f"  low-latency mode (FP8 dispatch, weighted combine):         max error {err_l:.2e} of max |y|",
            f"  time on rank 0: {elapsed * 1e3:.1f} ms (includes setup{' and kernel compilation' if backend == 'gpu' else ''})",
            "  result: " + ("OK, matches the direct computation" if ok else "MISMATCH"),
        ])
        print(report, flush=True)
    ok = comm.bcast(ok, root=0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
