"""The misuse cases of tests/misuse_cases.py on the reference backend, on every rank together:

    mpiexec -n 4 python tests/mpi/check_misuse.py [--nvl-peers P]

Every case must raise the same exception type on every rank, with a message naming the
argument; after each one the Buffer must still work (a checked round trip of the mode the
case used). Failures are agreed on by all ranks (no rank is left in a collective). Rank 0
prints one line per failing case and, when all pass, "OK misuse ranks=R cases=C".
"""
import argparse
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from misuse_cases import ll_buffer_kwargs, misuse_cases, normal_buffer_kwargs, run_reference_cases  # noqa: E402

from cupy_ep import reference  # noqa: E402
from cupy_ep.testing import run_or_abort  # noqa: E402

comm = MPI.COMM_WORLD


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvl-peers", type=int, default=None, help="ranks per NVLink domain (default: all)")
    args = ap.parse_args()
    R, me = comm.Get_size(), comm.Get_rank()
    seed = comm.bcast(int(np.random.SeedSequence().entropy % (2 ** 31)) if me == 0 else None)
    rng = np.random.default_rng([seed, me])
    buf = reference.Buffer(comm, **normal_buffer_kwargs(reference.Buffer, R, args.nvl_peers))
    ll = reference.Buffer(comm, **ll_buffer_kwargs(reference.Buffer, R))
    with misuse_cases(reference.Buffer, buf, np, comm, ll_buf=ll, seed=seed) as cases:
        ok_line = f"OK misuse ranks={R} nvl_peers={args.nvl_peers} cases={len(cases)} seed={seed}"
        code = run_reference_cases(comm, cases, lambda case: case.run(), buf, ll, rng, ok_line)
    ll.destroy()
    buf.destroy()
    return code


if __name__ == "__main__":
    sys.exit(run_or_abort(main))
