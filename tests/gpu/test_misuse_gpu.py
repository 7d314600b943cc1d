"""The misuse cases of tests/misuse_cases.py on the GPU Buffer (the reference runs the same list in
tests/test_misuse.py): each raises the same exception type as on the reference, naming the
argument, on every rank, and the Buffer keeps working (a checked round trip after each case)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from misuse_cases import ll_buffer_kwargs, misuse_cases, normal_buffer_kwargs, still_works  # noqa: E402


@pytest.fixture(scope="module")
def buffers(comm, nvl_peers):
    import cupy_ep
    from cupy_ep import reference

    kw = normal_buffer_kwargs(cupy_ep.Buffer, comm.Get_size(), nvl_peers)
    gpu = cupy_ep.Buffer(comm, **kw, timeout_s=20.0)
    ll = cupy_ep.Buffer(comm, **ll_buffer_kwargs(cupy_ep.Buffer, comm.Get_size()), timeout_s=20.0)
    ref = reference.Buffer(comm, **kw)
    yield gpu, ll, ref
    for b in (gpu, ll, ref):
        b.destroy()


def test_every_misuse_case(comm, agree, buffers):
    import cupy

    gpu, ll, ref = buffers
    rng = np.random.default_rng(comm.bcast(int(np.random.SeedSequence().entropy % 2 ** 31)) + comm.Get_rank())
    failures = []
    with misuse_cases(type(gpu), gpu, cupy, comm, ll_buf=ll) as cases:
        for case in cases:
            outcome = case.run()
            bad = comm.allgather(outcome)
            if any(o is not None for o in bad):
                failures.append(f"{case.name}: " + "; ".join(f"rank {r}: {o}" for r, o in enumerate(bad) if o))
            unusable = [r for r, alive in enumerate(comm.allgather(gpu.is_available())) if not alive]
            if unusable:  # decided together: a rank leaving the loop alone would hang the others
                failures.append(f"{case.name}: the Buffer became unusable on rank(s) {unusable}")
                break
            still_works(comm, rng, ref, gpu)
    agree(not failures, "\n".join(failures))
