"""The asymmetric cases of tests/asymmetric_cases.py on the reference backend:

    mpiexec -n 4 python tests/mpi/check_asymmetric.py [--timeout-s 2]

In each case the last rank passes bad input (or arrives after timeout_s) while the others are
valid: every rank must raise what the case expects, in the expected time, and the same Buffer
must then make a checked round trip. Rank 0 prints one line per failing case and, when all
pass, "OK asymmetric ranks=R cases=C".
"""
import argparse
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from asymmetric_cases import asymmetric_cases  # noqa: E402
from misuse_cases import ll_buffer_kwargs, normal_buffer_kwargs, run_reference_cases  # noqa: E402

from cupy_ep import reference  # noqa: E402
from cupy_ep.testing import run_or_abort  # noqa: E402

comm = MPI.COMM_WORLD


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout-s", type=float, default=2.0)
    args = ap.parse_args()
    R, me = comm.Get_size(), comm.Get_rank()
    seed = comm.bcast(int(np.random.SeedSequence().entropy % (2 ** 31)) if me == 0 else None)
    rng = np.random.default_rng([seed, me])
    B = reference.Buffer
    buf = B(comm, **normal_buffer_kwargs(B, R), timeout_s=args.timeout_s)
    ll = B(comm, **ll_buffer_kwargs(B, R), timeout_s=args.timeout_s)
    with asymmetric_cases(B, buf, ll, np, comm, args.timeout_s, seed=seed) as cases:
        ok_line = f"OK asymmetric ranks={R} cases={len(cases)} seed={seed}"
        code = run_reference_cases(comm, cases, lambda case: case.run(me == case.odd_rank), buf, ll, rng, ok_line)
    ll.destroy()
    buf.destroy()
    return code


if __name__ == "__main__":
    sys.exit(run_or_abort(main))
