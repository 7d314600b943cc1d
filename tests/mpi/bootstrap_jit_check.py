"""Run under mpiexec by tests/test_jit.py: collective compilation agreement without a GPU.

Usage: mpiexec -n K python tests/mpi/bootstrap_jit_check.py KERNEL_FILE CACHE_DIR BAD_RANKS
Every rank compile_check()s KERNEL_FILE (which static_asserts GOOD == 1) collectively; the
ranks listed in BAD_RANKS (comma separated, may be empty) pass GOOD=0 and so fail to compile.
Rank 0 prints one JSON line: for each rank, "ok" or the CompileError's message and ranks.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mpi4py import MPI  # noqa: E402

from cupy_ep import jit  # noqa: E402
from cupy_ep.errors import CompileError  # noqa: E402


def main():
    comm = MPI.COMM_WORLD
    kernel, cache, bad = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ["CUPY_EP_CACHE_DIR"] = cache
    bad_ranks = {int(r) for r in bad.split(",") if r}
    good = 0 if comm.Get_rank() in bad_ranks else 1
    try:
        jit.compile_check(kernel, {"GOOD": good}, arch="sm_90", comm=comm)
        out = "ok"
    except CompileError as e:
        out = {"message": str(e), "ranks": e.ranks}
    results = comm.gather(out, root=0)
    if comm.Get_rank() == 0:
        print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
