"""The asymmetric cases of tests/asymmetric_cases.py that the GPU backend keeps (``case.gpu``):
the last rank passes bad input, the others valid; every rank raises as expected, in bounded
time, and the same Buffers then make a round trip checked against the reference. The reference
runs the whole list in tests/test_asymmetric.py."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asymmetric_cases import asymmetric_cases  # noqa: E402
from misuse_cases import ll_buffer_kwargs, normal_buffer_kwargs, still_works  # noqa: E402

TIMEOUT_S = 20.0   # ranks sharing one GPU are slow; the prompt cases must take under half of it


def forgetting_compiled(buffers):
    """``as_new_shape`` of asymmetric_cases: runs a call, then the process forgets the modules it
    used (kept in the compiler's disk cache) and the Buffers' engines their kernel lookups, so
    that the next call of that shape is a first call again (a compile agreement, no compile)."""
    from cupy_ep import engine

    def forget_lookups():
        for buf in buffers:
            for eng in buf._engines:
                eng._memo.clear()
                getattr(eng, "_functions", {}).clear()

    def as_new_shape(call):
        # With the process's modules and the engines' lookups set aside, the call loads (from the
        # disk cache) every module it uses, also one an earlier case loaded: those are forgotten.
        kept = dict(engine._MODULES)
        engine._MODULES.clear()
        forget_lookups()
        call()
        used = set(engine._MODULES)
        engine._MODULES.clear()
        engine._MODULES.update({key: m for key, m in kept.items() if key not in used})
        forget_lookups()

    return as_new_shape


def test_asymmetric_cases_gpu(comm, agree):
    import cupy

    import cupy_ep
    from cupy_ep import reference

    R = comm.Get_size()
    if R < 2:
        pytest.skip("asymmetric cases need a second rank")
    kw = normal_buffer_kwargs(cupy_ep.Buffer, R)
    gpu = cupy_ep.Buffer(comm, **kw, timeout_s=TIMEOUT_S)
    ll = cupy_ep.Buffer(comm, **ll_buffer_kwargs(cupy_ep.Buffer, R), timeout_s=TIMEOUT_S)
    ref = reference.Buffer(comm, **kw, timeout_s=TIMEOUT_S)
    rng = np.random.default_rng(comm.bcast(int(np.random.SeedSequence().entropy % 2 ** 31)) + comm.Get_rank())
    failures, ran = [], 0
    try:
        still_works(comm, rng, ref, gpu, num_tokens=8)   # compiles the cases' shapes: not timed below
        with asymmetric_cases(cupy_ep.Buffer, gpu, ll, cupy, comm, TIMEOUT_S,
                              as_new_shape=forgetting_compiled((gpu, ll))) as cases:
            for case in cases:
                if not case.gpu:
                    continue
                ran += 1
                outcome = case.run(comm.Get_rank() == case.odd_rank)
                bad = comm.allgather(outcome)
                if any(o is not None for o in bad):
                    failures.append(f"{case.name}: " + "; ".join(f"rank {r}: {o}" for r, o in enumerate(bad) if o))
                unusable = [r for r, alive in enumerate(comm.allgather(gpu.is_available())) if not alive]
                if unusable:
                    failures.append(f"{case.name}: the Buffer became unusable on rank(s) {unusable}")
                    break
                still_works(comm, rng, ref, gpu)
    finally:
        for b in (gpu, ll, ref):
            b.destroy()
    agree(not failures and ran > 0, "\n".join(failures) or "no case ran")
    if comm.Get_rank() == 0:
        print(f"OK asymmetric gpu ranks={R} cases={ran}", flush=True)
