"""Prototype your own routing kernel with cupy_ep.jit.

This adds ``scripts/kernels`` to the kernel search path, specialises ``topk_histogram.cu``
with compile-time constants (number of experts and ranks, top-k, index type), compiles it
(collectively over MPI: if any rank fails, every rank raises CompileError), launches it on
CuPy arrays and checks it against NumPy. Without a GPU it only compiles the kernel for sm_90
and says so.

    python scripts/custom_kernel_example.py
    mpiexec -n 4 python scripts/custom_kernel_example.py --num-experts 64 --topk 6
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cupy_ep import bootstrap, jit  # noqa: E402

THREADS = 256


def make_topk_idx(rng, num_tokens, num_experts, topk):
    """Distinct experts per token, with about 5% of the slots empty (-1)."""
    idx = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :topk].astype(np.int64)
    idx[rng.random(idx.shape) < 0.05] = -1
    return idx


def reference(topk_idx, num_experts, num_ranks):
    """NumPy version of the kernel."""
    valid = topk_idx >= 0
    per_expert = np.bincount(topk_idx[valid], minlength=num_experts).astype(np.int32)
    ranks = np.where(valid, topk_idx // (num_experts // num_ranks), -1)
    per_rank = np.array([(ranks == r).any(axis=1).sum() for r in range(num_ranks)], np.int32)
    return per_expert, per_rank


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens on each rank")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.num_experts % num_ranks or args.topk > args.num_experts:
        say(f"--num-experts ({args.num_experts}) must be a multiple of the number of ranks "
            f"({num_ranks}) and at least --topk ({args.topk})")
        return 2

    jit.add_kernel_dir(Path(__file__).resolve().parent / "kernels")
    constants = {"NUM_EXPERTS": args.num_experts, "NUM_RANKS": num_ranks, "TOPK": args.topk,
                 "IDX_T": "i64", "NUM_THREADS": THREADS}

    if not bootstrap.gpu_available(comm):
        cubin = jit.compile_check("topk_histogram.cu", constants, arch="sm_90", comm=comm)
        say(f"no GPU on every rank: compiled topk_histogram.cu for sm_90 ({len(cubin)} bytes "
            f"of cubin, cached in {jit.cache_dir()}) but cannot launch it")
        return 0

    topology = bootstrap.discover(comm)
    device = bootstrap.select_device(topology)
    import cupy

    module = jit.compile_module("topk_histogram.cu", constants, comm=comm)
    kernel = module.get_function("topk_histogram")

    topk_idx = make_topk_idx(np.random.default_rng(args.seed + rank), args.tokens,
                             args.num_experts, args.topk)
    d_idx = cupy.asarray(topk_idx)
    per_expert = cupy.zeros(args.num_experts, cupy.int32)
    per_rank = cupy.zeros(num_ranks, cupy.int32)
    blocks = max(1, min(132, (args.tokens + THREADS - 1) // THREADS))
    kernel((blocks,), (THREADS,), (d_idx, np.int32(args.tokens), per_expert, per_rank))

    want_expert, want_rank = reference(topk_idx, args.num_experts, num_ranks)
    ok = (np.array_equal(cupy.asnumpy(per_expert), want_expert)
          and np.array_equal(cupy.asnumpy(per_rank), want_rank))
    all_ok = all(comm.allgather(ok))

    # Global load per expert and tokens each rank receives, summed over the source ranks.
    load = np.zeros(args.num_experts, np.int32)
    comm.Allreduce(cupy.asnumpy(per_expert), load, op=MPI.SUM)
    recv = np.zeros(num_ranks, np.int32)
    comm.Allreduce(cupy.asnumpy(per_rank), recv, op=MPI.SUM)
    say(f"{num_ranks} rank(s), GPU {device} on rank 0: {args.tokens} tokens per rank, "
        f"top-{args.topk} of {args.num_experts} experts")
    say(f"expert load min/mean/max: {load.min()}/{load.mean():.1f}/{load.max()}; "
        f"tokens received per rank: {recv.tolist()}")
    say("matches NumPy on every rank" if all_ok else "MISMATCH against NumPy")
    topology.free()
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
