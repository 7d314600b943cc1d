"""GPU suite: run with `mpiexec -n R python -m pytest tests/gpu` (R GPUs of one host, R >= 1).

Every test is collective. Checks go through `agree(...)` so that a failure on one
rank fails the test on every rank instead of leaving the others in a collective.
Without GPUs for every rank (e.g. CI), the whole directory is skipped.
"""
import numpy as np
import pytest


def _gpu_suite_skip_reason():
    try:
        from mpi4py import MPI
    except Exception as exc:  # pragma: no cover - mpi4py is a dependency
        return f"mpi4py unavailable: {exc}"
    comm = MPI.COMM_WORLD
    try:
        import cupy

        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        ok = cupy.cuda.runtime.getDeviceCount() >= local.Get_size()
        local.Free()
    except Exception:
        ok = False
    if not comm.allreduce(ok, op=MPI.LAND):
        return "not every rank has a GPU"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_suite_skip_reason()
    if reason:
        for item in items:
            if "tests/gpu" in str(item.fspath).replace("\\", "/"):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture(scope="session")
def agree(comm):
    """agree(ok, message): fails on every rank when ``ok`` is false on any rank."""

    def check(ok, message=""):
        bad = comm.allgather(None if ok else str(message))
        failures = [f"rank {r}: {m}" for r, m in enumerate(bad) if m is not None]
        assert not failures, "; ".join(failures)

    return check


@pytest.fixture
def rng(comm):
    """A generator seeded freshly each run; each rank draws its own stream."""
    seed = comm.bcast(int(np.random.SeedSequence().entropy % (2**31)) if comm.Get_rank() == 0 else None)
    return np.random.default_rng([seed, comm.Get_rank()])
