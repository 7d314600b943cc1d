"""The asymmetric cases of tests/asymmetric_cases.py that the GPU keeps across NVLink domains
(``case.internode``: refused dispatches and combines, whose refusing rank takes part in the call
through ``internode_notify_cancelled`` or, cached dispatch and combine, ``internode_barrier_cancelled``): on a normal-mode Buffer of several domains
(``CUPY_EP_TEST_NVL_PEERS=P`` below the rank count, the gpu_suite's internode step), the last
rank passes bad input, the others valid; every rank raises as expected, promptly, and the same
Buffer then makes a round trip checked against the reference. Skipped inside one domain
(tests/gpu/test_asymmetric_gpu.py runs those cases there)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asymmetric_cases import asymmetric_cases  # noqa: E402
from asymmetric_runner import TIMEOUT_S, forgetting_compiled, run_cases  # noqa: E402
from misuse_cases import normal_buffer_kwargs, still_works  # noqa: E402


def test_asymmetric_cases_across_domains(comm, agree, nvl_peers):
    import cupy

    import cupy_ep
    from cupy_ep import reference

    R = comm.Get_size()
    if nvl_peers is None or nvl_peers >= R:
        pytest.skip("needs several NVLink domains (CUPY_EP_TEST_NVL_PEERS below the rank count)")
    kw = normal_buffer_kwargs(cupy_ep.Buffer, R, nvl_peers)
    gpu = cupy_ep.Buffer(comm, **kw, timeout_s=TIMEOUT_S)
    ref = reference.Buffer(comm, **kw, timeout_s=TIMEOUT_S)
    rng = np.random.default_rng(comm.bcast(int(np.random.SeedSequence().entropy % 2 ** 31)) + comm.Get_rank())
    try:
        assert gpu.num_rdma_ranks > 1, "the Buffer spans one NVLink domain"
        still_works(comm, rng, ref, gpu, num_tokens=8)   # compiles the cases' shapes: not timed below
        with asymmetric_cases(cupy_ep.Buffer, gpu, None, cupy, comm, TIMEOUT_S,
                              as_new_shape=forgetting_compiled((gpu,))) as cases:
            failures, ran = run_cases(comm, [case for case in cases if case.internode], (gpu,),
                                      lambda case: still_works(comm, rng, ref, gpu))
    finally:
        for b in (gpu, ref):
            b.destroy()
    agree(not failures and ran > 0, "\n".join(failures) or "no case ran")
    if comm.Get_rank() == 0:
        print(f"OK asymmetric internode gpu ranks={R} nvl_peers={nvl_peers} cases={ran}", flush=True)
