"""GPU suite: ``mpiexec -n R python -m pytest tests/gpu`` (R GPUs of one host, R >= 1).

Every test is collective and checks the GPU ``Buffer`` against the reference backend
(``cupy_ep.reference``) on the same inputs (``cupy_ep.testing``); checks go through ``agree`` so
that a failure on one rank fails the test on every rank instead of leaving the others in a
collective. Without a GPU for every rank (e.g. CI), the whole directory is skipped.

``CUPY_EP_TEST_NVL_PEERS=P`` runs the normal-mode tests with NVLink domains of P ranks
(``num_nvl_peers``): with P < R one host stands in for R / P hosts (internode mode).
``CUPY_EP_CHAOS=1`` compiles every kernel with the chaos pauses.
``CUPY_EP_TEST_LL_TRANSPORT=rdma`` (or ``nvlink``; default ``auto``) is the low-latency tests'
``ll_transport``: ``rdma`` sends to every other rank with NVSHMEM puts.
``CUPY_EP_TEST_PROXY_TRANSPORT=1`` makes NVSHMEM use its UCX transport with P2P off
(``cupy_ep.transport_env``).
``CUPY_EP_TEST_SHARE_GPU=1`` lets several ranks share one GPU (rank ``local_rank % GPUs``): the
driver time-slices their kernels, so the protocols are exercised across processes, slowly; a
check of correctness, never of speed.
"""
import os

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
        gpus = cupy.cuda.runtime.getDeviceCount()
        sharing = os.environ.get("CUPY_EP_TEST_SHARE_GPU") == "1"
        ok = gpus >= local.Get_size() or (sharing and gpus > 0)
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
    from cupy_ep.testing import agree as agree_all

    return lambda ok, message="": agree_all(comm, ok, message)


@pytest.fixture
def rng(comm):
    """A generator seeded freshly each run; each rank draws its own stream."""
    seed = comm.bcast(int(np.random.SeedSequence().entropy % (2**31)) if comm.Get_rank() == 0 else None)
    return np.random.default_rng([seed, comm.Get_rank()])


@pytest.fixture(scope="session")
def ll_transport():
    """The low-latency tests' ``ll_transport`` (``CUPY_EP_TEST_LL_TRANSPORT``, default "auto")."""
    return os.environ.get("CUPY_EP_TEST_LL_TRANSPORT", "auto")


@pytest.fixture(scope="session")
def nvl_peers(comm):
    """The NVLink domain size the normal-mode tests use (None: the host)."""
    value = os.environ.get("CUPY_EP_TEST_NVL_PEERS")
    if value is None:
        return None
    peers = int(value)
    if comm.Get_size() % peers:
        pytest.skip(f"CUPY_EP_TEST_NVL_PEERS={peers} does not divide {comm.Get_size()} ranks")
    return peers


@pytest.fixture(scope="module")
def normal_buffers(comm, nvl_peers):
    """(GPU Buffer, reference Buffer) of the normal mode, sized for the tests' largest calls."""
    from gpu_buffers import make_buffers

    gpu, ref = make_buffers(comm, nvl_peers)
    yield gpu, ref
    gpu.destroy()
    ref.destroy()
