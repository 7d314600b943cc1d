"""The first check on a new cluster: one normal-mode round trip over every rank, every element checked against the reference, one line of result.

    mpiexec -n 16 -ppn 8 -hosts a,b python scripts/smoke_multihost.py      # MPICH: 2 hosts x 8 GPUs
    mpirun -np 16 --map-by ppr:8:node python scripts/smoke_multihost.py    # Open MPI
    srun -N 2 --ntasks-per-node 8 --gpus-per-node 8 python scripts/smoke_multihost.py
    mpiexec -n 2 python scripts/smoke_multihost.py --num-nvl-peers 1        # one host standing in for 2

Each rank draws random bf16 tokens (outliers and zero blocks included) and a random top-k of
E experts, makes a GPU Buffer sized by the size hints, and runs get_dispatch_layout, dispatch
and combine; cupy_ep.reference (NumPy) runs the same calls on the same inputs. Before each GPU
call the free GPU memory is filled with NaN, so an unwritten output shows. Dispatch must match
the reference bit for bit; combine within one bf16 rounding of each NVLink domain's partial
sum (cupy_ep.testing.normal_round_trip). ``--fp8`` dispatches FP8.

When the ranks span several hosts (or ``--num-nvl-peers`` is below the ranks per host), every
token crosses between domains over NVSHMEM, on the transport its environment selects; the
result line names it (docs/multihost.md has the settings per network).

Result, on rank 0's standard output: ``PASS smoke_multihost: ...`` and exit status 0, or
``FAIL smoke_multihost: ...`` naming the step and the first failing rank's error, exit status
1. A run that has no result after ``--time-limit`` seconds (a rank stuck in NVSHMEM's
initialisation, say) ends the whole job with a FAIL line naming the step it was in.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

NAME = "smoke_multihost"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-nvl-peers", type=int, default=None,
                   help="ranks per NVLink domain (default: the ranks of a host)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank (default 128)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size, a multiple of 128 (default 2048)")
    p.add_argument("--topk", type=int, default=8, help="experts per token (default 8, at most the experts)")
    p.add_argument("--experts", type=int, default=None,
                   help="experts, a multiple of the ranks (default: the smallest multiple >= 32)")
    p.add_argument("--fp8", action="store_true", help="dispatch FP8 instead of bf16")
    p.add_argument("--timeout-s", type=float, default=60.0, help="Buffer timeout_s (default 60)")
    p.add_argument("--time-limit", type=float, default=300.0,
                   help="seconds before a run without result is ended (default 300)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one)")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.topk < 1 or args.hidden < 128 or args.hidden % 128:
        p.error("--tokens and --topk must be >= 1, --hidden a positive multiple of 128")
    if args.num_nvl_peers is not None and args.num_nvl_peers < 1:
        p.error("--num-nvl-peers must be >= 1")
    if args.time_limit <= 0 or args.timeout_s <= 0:
        p.error("--time-limit and --timeout-s must be > 0")
    return args


def default_experts(num_ranks: int, minimum: int = 32) -> int:
    """The smallest multiple of ``num_ranks`` that is at least ``minimum``."""
    return -(-minimum // num_ranks) * num_ranks


class Watchdog:
    """Ends the job when the run has no result after ``seconds``: rank 0 prints the FAIL line
    with the step this rank was in, every rank then aborts (rank 0 first)."""

    def __init__(self, comm, seconds: float):
        self.comm, self.seconds, self.step = comm, seconds, "start"
        delay = seconds if comm.Get_rank() == 0 else seconds + 5.0
        self.timer = threading.Timer(delay, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self):
        if self.comm.Get_rank() == 0:
            print(f"FAIL {NAME}: no result after {self.seconds:.0f} s (rank 0 was in: {self.step}); "
                  f"a rank is stuck, see the processes' output above", flush=True)
            time.sleep(1.0)
        try:
            self.comm.Abort(1)
        finally:
            os._exit(1)

    def cancel(self):
        self.timer.cancel()


def host_layout(comm) -> tuple:
    """(hosts, ranks per host) from the processor names; ranks per host is None when the hosts
    hold different numbers of ranks."""
    from mpi4py import MPI

    names = comm.allgather(MPI.Get_processor_name())
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    per_host = set(counts.values())
    return len(counts), per_host.pop() if len(per_host) == 1 else None


def round_trip(comm, args, watchdog) -> str:
    """Builds the Buffers, runs the checked round trip, destroys them; returns the PASS detail."""
    import cupy_ep
    from cupy_ep import testing, transport_env

    r = comm.Get_size()
    hosts, per_host = host_layout(comm)
    peers = args.num_nvl_peers or per_host
    if peers is None:
        raise ValueError(f"the {hosts} hosts hold different numbers of ranks: pass --num-nvl-peers")
    if r % peers:
        raise ValueError(f"--num-nvl-peers {peers} does not divide the {r} ranks")
    experts = args.experts or default_experts(r)
    topk = min(args.topk, experts)
    t, h = args.tokens, args.hidden
    seed = args.seed if args.seed is not None else comm.bcast(int(np.random.SeedSequence().entropy % 2**31))
    sizes = dict(num_nvl_bytes=cupy_ep.Buffer.get_nvl_buffer_size_hint(t, h, r, topk, num_nvl_peers=peers),
                 num_rdma_bytes=cupy_ep.Buffer.get_rdma_buffer_size_hint(t, h, r, peers, topk))
    watchdog.step = "creating the GPU Buffer (NVSHMEM initialisation when the ranks span domains)"
    gpu = cupy_ep.Buffer(comm, num_nvl_peers=args.num_nvl_peers, timeout_s=args.timeout_s, **sizes)
    ref = testing.reference_buffer(comm, gpu, **sizes)
    try:
        watchdog.step = "the round trip (layout, dispatch, combine)"
        t0 = time.perf_counter()
        testing.normal_round_trip(comm, ref, gpu, np.random.default_rng([seed, comm.Get_rank()]), num_tokens=t,
                                  hidden=h, num_topk=topk, num_experts=experts, use_fp8=args.fp8)
        dt = time.perf_counter() - t0
        watchdog.step = "destroying the Buffers"
    finally:
        ref.destroy()
        gpu.destroy()
    domains, nvl = gpu.num_rdma_ranks, gpu.num_nvl_ranks
    path = (f"{domains} NVLink domains x {nvl}, {transport_env.describe()}" if domains > 1
            else "1 NVLink domain: no NVSHMEM traffic (pass --num-nvl-peers to cross domains on one host)")
    return (f"{r} ranks on {hosts} host(s), {path}; dispatch {'FP8' if args.fp8 else 'bf16'} + combine of {t} "
            f"tokens x {h}, top-{topk} of {experts} experts, seed {seed}: every element matches cupy_ep.reference "
            f"({dt:.1f} s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    bc.set_env_defaults()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    bc.exit_unless_gpus(comm, "smoke_multihost.py")
    from cupy_ep.collective import failures

    watchdog = Watchdog(comm, args.time_limit)
    detail, error = None, None
    try:
        detail = round_trip(comm, args, watchdog)
    except Exception as e:  # noqa: BLE001 -- every rank's outcome is gathered below
        error = f"in {watchdog.step}: {type(e).__name__}: {' '.join(str(e).split())}"[:600]
    failed = failures(comm, error)
    watchdog.cancel()
    if comm.Get_rank() == 0:
        if failed:
            first = min(failed)
            print(f"FAIL {NAME}: rank(s) {sorted(failed)} failed; rank {first} {failed[first]}", flush=True)
        else:
            print(f"PASS {NAME}: {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
