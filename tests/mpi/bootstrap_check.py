"""Run under mpiexec by tests/test_bootstrap.py: discover() and the GPU probes on every rank.

Usage: mpiexec -n K python tests/mpi/bootstrap_check.py [NUM_NVL_PEERS | none]
Rank 0 prints one JSON line: a list with, for each rank, its Topology fields, or the
exception it raised, plus what gpu_available() and select_device() did.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mpi4py import MPI  # noqa: E402

from cupy_ep import bootstrap  # noqa: E402


def main():
    comm = MPI.COMM_WORLD
    arg = sys.argv[1] if len(sys.argv) > 1 else "none"
    num_nvl_peers = None if arg == "none" else int(arg)
    out = {"rank": comm.Get_rank()}
    try:
        topo = bootstrap.discover(comm, num_nvl_peers=num_nvl_peers)
    except Exception as e:  # reported to the test
        out["error"] = [type(e).__name__, str(e)]
        topo = None
    if topo is not None:
        out["topology"] = {k: getattr(topo, k) for k in (
            "rank", "num_ranks", "nvl_rank", "num_nvl_ranks", "rdma_rank", "num_rdma_ranks",
            "local_rank", "num_local_ranks")}
        out["nvl_comm"] = [topo.nvl_comm.Get_rank(), topo.nvl_comm.Get_size(),
                           topo.nvl_comm.allgather(comm.Get_rank())]
        out["gpu_available"] = bootstrap.gpu_available(comm)
        try:
            out["select_device"] = bootstrap.select_device(topo)
        except Exception as e:  # reported to the test
            out["select_device"] = [type(e).__name__, str(e)]
        topo.free()
    results = comm.gather(out, root=0)
    if comm.Get_rank() == 0:
        print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
