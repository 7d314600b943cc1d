"""cupy_ep.bootstrap without a GPU: topology discovery under mpiexec (1..4 ranks, NVLink
groups), layout validation, and the GPU probes reporting no GPU here. The CUDA IPC and NVSHMEM
parts need GPUs: tests/gpu covers them."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cupy_ep import bootstrap
from cupy_ep.bootstrap import _domain_size
from cupy_ep.errors import CupyEpError, GPUUnavailableError

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
HAS_GPU = bootstrap.gpu_available()


def run_check(nranks, num_nvl_peers=None):
    cmd = [MPIEXEC, "-n", str(nranks), sys.executable,
           str(REPO / "tests" / "mpi" / "bootstrap_check.py"),
           "none" if num_nvl_peers is None else str(num_nvl_peers)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert [res["rank"] for res in results] == list(range(nranks))
    return results


CASES = [(1, None), (2, None), (3, None), (4, None), (4, 1), (4, 2), (4, 4), (3, 3), (2, 1)]


@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec")
@pytest.mark.parametrize("nranks, num_nvl_peers", CASES)
def test_discover(nranks, num_nvl_peers):
    group = nranks if num_nvl_peers is None else num_nvl_peers  # one host here
    for res in run_check(nranks, num_nvl_peers):
        r = res["rank"]
        assert "error" not in res, res
        assert res["topology"] == {
            "rank": r, "num_ranks": nranks,
            "nvl_rank": r % group, "num_nvl_ranks": group,
            "rdma_rank": r // group, "num_rdma_ranks": nranks // group,
            "local_rank": r, "num_local_ranks": nranks}
        start = (r // group) * group
        assert res["nvl_comm"] == [r % group, group, list(range(start, start + group))]
        if not HAS_GPU:
            assert res["gpu_available"] is False
            assert res["select_device"][0] == "GPUUnavailableError"


@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec")
@pytest.mark.parametrize("nranks, num_nvl_peers", [(4, 3), (3, 2), (2, 0), (2, -1)])
def test_discover_rejects_bad_groups(nranks, num_nvl_peers):
    for res in run_check(nranks, num_nvl_peers):
        kind, msg = res["error"]  # every rank raises the same error
        assert kind == "ValueError"
        assert f"num_nvl_peers={num_nvl_peers}" in msg


def test_domain_size_layouts():
    # Host of each rank, named by its lowest rank.
    two_hosts = [0, 0, 0, 0, 4, 4, 4, 4]
    assert _domain_size(two_hosts, None) == 4
    assert _domain_size(two_hosts, 2) == 2
    assert _domain_size(two_hosts, 4) == 4
    assert _domain_size(two_hosts, 1) == 1
    with pytest.raises(ValueError, match="num_nvl_peers=8: ranks 0..7 do not share one host"):
        _domain_size(two_hosts, 8)
    with pytest.raises(ValueError, match="num_nvl_peers=3 must be >= 1 and divide"):
        _domain_size(two_hosts, 3)
    with pytest.raises(ValueError, match="consecutive"):
        _domain_size([0, 1, 0, 1], None)  # round-robin placement
    with pytest.raises(ValueError, match="same number"):
        _domain_size([0, 0, 0, 3, 3], None)  # unequal hosts
    with pytest.raises(ValueError, match="ranks 2..3 do not share"):
        _domain_size([0, 0, 0, 3, 3, 3], 2)


def test_discover_type_check():
    class NoComm:
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 1

    with pytest.raises(TypeError, match="num_nvl_peers"):
        bootstrap.discover(NoComm(), num_nvl_peers=2.0)
    with pytest.raises(TypeError, match="num_nvl_peers"):
        bootstrap.discover(NoComm(), num_nvl_peers=True)


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU behaviour")
def test_no_gpu_here():
    from mpi4py import MPI

    assert bootstrap.gpu_available() is False
    assert bootstrap.gpu_available(MPI.COMM_SELF) is False
    topo = bootstrap.discover(MPI.COMM_SELF)
    try:
        with pytest.raises(GPUUnavailableError, match="no usable GPU"):
            bootstrap.select_device(topo)
    finally:
        topo.free()


def _fake_cupy(monkeypatch, get_device_count):
    """A stand-in ``cupy`` whose runtime's getDeviceCount is ``get_device_count`` (undone after the test)."""
    import types

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    monkeypatch.setitem(sys.modules, "cupy", fake)


def _raise(text):
    def get_device_count():
        raise RuntimeError(text)
    return get_device_count


@pytest.mark.parametrize("case, driver_loads, expected", [
    ("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version", False,
     "no NVIDIA driver/GPU found (libcuda.so.1, the NVIDIA driver's library, cannot be loaded)"),
    ("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version", True,
     "RuntimeError: cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"),
    ("cudaErrorNoDevice: no CUDA-capable device is detected", True, "no NVIDIA driver/GPU found (the driver lists "
     "no device; CUDA_VISIBLE_DEVICES='')"),
    (0, True, "no NVIDIA driver/GPU found (the driver lists no device; CUDA_VISIBLE_DEVICES='')"),
    ("cudaErrorUnknown: unknown error", True, "RuntimeError: cudaErrorUnknown: unknown error"),
])
def test_no_gpu_reason_says_what_is_missing(monkeypatch, case, driver_loads, expected):
    """A missing driver is not told as "driver version insufficient" (what the CUDA runtime says)."""
    _fake_cupy(monkeypatch, (lambda: case) if isinstance(case, int) else _raise(case))
    monkeypatch.setattr(bootstrap, "_driver_library_loads", lambda: driver_loads)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert bootstrap.gpu_unavailable_reason() == expected
    assert bootstrap.gpu_available() is False
    topo = bootstrap.Topology(rank=3, num_ranks=4, nvl_rank=3, num_nvl_ranks=4, rdma_rank=0, num_rdma_ranks=1,
                              local_rank=3, num_local_ranks=4, nvl_comm=None)
    with pytest.raises(GPUUnavailableError) as info:
        bootstrap.select_device(topo)
    assert str(info.value) == f"rank 3: no usable GPU: {expected}"


def test_no_gpu_reason_without_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert bootstrap.gpu_unavailable_reason() == 'CuPy is not installed (pip install "cupy_ep[cuda13]")'


def test_no_gpu_reason_with_a_gpu_is_none(monkeypatch):
    _fake_cupy(monkeypatch, lambda: 2)
    assert bootstrap.gpu_unavailable_reason() is None and bootstrap.gpu_available() is True


def test_no_gpu_reason_over_ranks_names_the_first_failing_rank(monkeypatch):
    class TwoRanks:
        def allgather(self, mine):
            return [None, mine]
    _fake_cupy(monkeypatch, lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert bootstrap.gpu_unavailable_reason(TwoRanks()) == "rank 1: no NVIDIA driver/GPU found (the driver lists no device)"
    assert bootstrap.gpu_available(TwoRanks()) is False


def test_nvshmem_finalize_without_init_is_a_noop():
    bootstrap.finalize_nvshmem()


def _state(refs, device=0, world=(0,), heap=2 << 30, in_use=0):
    return {"refs": refs, "device": device, "world": world, "heap_bytes": heap, "in_use": in_use}


@pytest.mark.parametrize("state, device, world, heap_request, plan", [
    ({"refs": 0, "device": None, "world": None, "heap_bytes": 0, "in_use": 0}, 0, (0, 1), 0, "init"),
    (_state(1, world=(0, 1), in_use=1 << 30), 0, (0, 1), 1 << 30, "count"),    # room beside the live one
    (_state(1, world=(0, 1), in_use=1 << 30), 0, (0, 1), 1 << 31, "full"),      # no room beside it
    (_state(1, world=(0, 1), heap=None, in_use=8 << 30), 0, (0, 1), 8 << 30, "count"),  # the user's size
    (_state(1, world=(0, 1)), 1, (0, 1), 0, "conflict"),           # live on another GPU
    (_state(1, world=(0, 1)), 0, (1, 0), 0, "conflict"),           # live, PEs in another order
    (_state(0, world=(0, 1)), 0, (0, 1), 1 << 30, "reuse"),        # idle, the heap fits
    (_state(0, world=(0, 1)), 0, (0, 1), 4 << 30, "reinit"),       # idle, the heap is too small
    (_state(0, world=(0, 1)), 0, (1, 0), 0, "reinit"),             # idle, same ranks, other order
    (_state(0, world=(0, 1)), 1, (0, 1), 0, "reinit"),             # idle, same ranks, other GPU
    (_state(0, world=(0, 1)), 0, (0, 2), 0, "conflict"),           # idle over other ranks
    (_state(0, world=(0, 1), heap=None), 0, (0, 1), 64 << 30, "reuse"),   # heap size set by the user
])
def test_nvshmem_plan(state, device, world, heap_request, plan):
    assert bootstrap.nvshmem_plan(state, device, world, heap_request) == plan


def test_nvshmem_kept_initialised_after_its_last_user(monkeypatch):
    from mpi4py import MPI

    # Initialised over this rank (no NVSHMEM here: a fresh initialisation would raise).
    world = bootstrap._world_ranks(MPI.COMM_SELF)
    monkeypatch.setattr(bootstrap, "_nvshmem", _state(1, world=world, in_use=1 << 20))
    bootstrap.init_nvshmem(MPI.COMM_SELF, 0, 1 << 20)           # a second live user: counted
    assert (bootstrap._nvshmem["refs"], bootstrap._nvshmem["in_use"]) == (2, 2 << 20)
    with pytest.raises(ValueError, match="num_rdma_bytes: NVSHMEM's symmetric heap"):
        bootstrap.init_nvshmem(MPI.COMM_SELF, 0, 2 << 30)       # no room beside the live ones
    with pytest.raises(ValueError, match="another GPU"):
        bootstrap.init_nvshmem(MPI.COMM_SELF, 1)
    with pytest.raises(CupyEpError, match="in use by 2 Buffer"):
        bootstrap.finalize_nvshmem()
    assert (bootstrap._nvshmem["refs"], bootstrap._nvshmem["in_use"]) == (2, 2 << 20)
    bootstrap.release_nvshmem(1 << 20)
    bootstrap.release_nvshmem(1 << 20)
    assert bootstrap._nvshmem["refs"] == 0 and bootstrap._nvshmem["world"] == world   # idle, kept
    bootstrap.init_nvshmem(MPI.COMM_SELF, 0, 1 << 20)           # reused, not re-initialised
    assert bootstrap._nvshmem["refs"] == 1


def test_nvshmem_heap_size(monkeypatch):
    monkeypatch.setattr(bootstrap, "_nvshmem", _state(0, world=None))
    monkeypatch.delenv("NVSHMEM_SYMMETRIC_SIZE", raising=False)
    assert bootstrap._heap_bytes_for(1 << 20) == 1 << 30
    assert bootstrap._heap_bytes_for(3 << 30) == (3 << 30) + bootstrap._HEAP_SLACK
    monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", str(5 << 30))
    assert bootstrap._heap_bytes_for(1 << 20) is None        # the user's: never re-initialised for size
    bootstrap._nvshmem["size_is_ours"] = True                # ... unless cupy_ep set it
    assert bootstrap._heap_bytes_for(3 << 30) == (3 << 30) + bootstrap._HEAP_SLACK


def _fake_nvshmem_bindings(status: str):
    """An ``nvshmem.bindings`` whose ``init_status()`` reports ``status`` (nvshmem4py's enum names)."""
    import enum
    import types

    codes = enum.IntEnum("Init_status", "STATUS_NOT_INITIALIZED STATUS_IS_BOOTSTRAPPED STATUS_IS_INITIALIZED "
                                        "STATUS_LIMITED_MPG STATUS_FULL_MPG", start=0)
    return types.SimpleNamespace(Init_status=codes, init_status=lambda: int(codes[status]))


@pytest.mark.parametrize("status, fails", [("STATUS_NOT_INITIALIZED", True), ("STATUS_IS_INITIALIZED", False),
                                           ("STATUS_LIMITED_MPG", False)])
def test_an_init_that_left_nvshmem_uninitialised_raises(monkeypatch, status, fails):
    """NVSHMEM's next call would end the process: the check after nvshmem.core.init raises instead."""
    import types

    bindings = _fake_nvshmem_bindings(status)
    package = types.ModuleType("nvshmem")
    package.bindings = bindings
    monkeypatch.setitem(sys.modules, "nvshmem", package)
    monkeypatch.setitem(sys.modules, "nvshmem.bindings", bindings)
    if fails:
        with pytest.raises(CupyEpError, match="not initialised"):
            bootstrap._check_initialised()
    else:
        bootstrap._check_initialised()


def test_a_failed_initialisation_makes_later_ones_fail_at_once(monkeypatch):
    """nvshmem.core.init returns but NVSHMEM is not initialised: the agreed error, then every later
    init_nvshmem raises before any collective (its ranks may now disagree about NVSHMEM's state)."""
    import os
    import types

    import numpy as np
    from mpi4py import MPI

    inits = []
    fakes = {
        "cupy": types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda i: types.SimpleNamespace(use=lambda: None))),
        "cuda": types.ModuleType("cuda"),
        "cuda.core": types.SimpleNamespace(Device=lambda i: types.SimpleNamespace(set_current=lambda: None)),
        "nvshmem": types.ModuleType("nvshmem"),
        "nvshmem.core": types.SimpleNamespace(
            get_unique_id=lambda empty=False: types.SimpleNamespace(_data=np.zeros(128, np.uint8)),
            init=lambda **kw: inits.append(kw)),
        "nvshmem.bindings": _fake_nvshmem_bindings("STATUS_NOT_INITIALIZED"),
    }
    fakes["cuda"].core = fakes["cuda.core"]
    fakes["nvshmem"].core, fakes["nvshmem"].bindings = fakes["nvshmem.core"], fakes["nvshmem.bindings"]
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(os, "environ", dict(os.environ))   # _initialise sets NVSHMEM_* variables
    monkeypatch.setattr(bootstrap, "_nvshmem", _state(0, world=None))
    with pytest.raises(CupyEpError, match="not initialised"):
        bootstrap.init_nvshmem(MPI.COMM_SELF, 0, 1 << 20)
    with pytest.raises(CupyEpError, match="cannot be used in this process"):
        bootstrap.init_nvshmem(MPI.COMM_SELF, 0, 1 << 20)
    assert len(inits) == 1 and bootstrap._nvshmem["world"] is None


@pytest.mark.parametrize("failing", [False, True])
def test_idle_nvshmem_is_finalised_at_exit_unless_the_exit_fails(monkeypatch, failing):
    finalised = []
    monkeypatch.setattr(bootstrap, "finalize_nvshmem", lambda: finalised.append(True))
    monkeypatch.setattr(bootstrap, "_nvshmem", _state(0, world=(0, 1)))
    monkeypatch.setattr(bootstrap, "_exit_is_failing", lambda: failing)
    bootstrap._finalize_at_exit()
    assert finalised == ([] if failing else [True])
    bootstrap._nvshmem["refs"] = 1                           # a Buffer never destroyed: left alone
    bootstrap._finalize_at_exit()
    assert len(finalised) == (0 if failing else 1)


@pytest.mark.parametrize("status, aborting", [
    (SystemExit(0), False), (SystemExit(None), False), (SystemExit(3), True), (SystemExit("bad"), True),
    (KeyboardInterrupt(), True), (1, True),
])
def test_an_mpi4py_abort_is_a_failing_exit(monkeypatch, status, aborting):
    import mpi4py.run

    seen = []
    monkeypatch.setattr(mpi4py.run, "set_abort_status", lambda s: seen.append(s))   # not the real abort
    monkeypatch.setattr(bootstrap, "_nvshmem", _state(0, world=(0, 1)))
    monkeypatch.delattr(sys, "last_value", raising=False)
    monkeypatch.delattr(sys, "last_exc", raising=False)
    bootstrap._watch_mpi4py_abort()
    bootstrap._watch_mpi4py_abort()                          # wraps once
    mpi4py.run.set_abort_status(status)
    assert seen == [status]
    assert bootstrap._exit_is_failing() is aborting


def test_import_needs_no_gpu_libraries():
    code = ("import sys, cupy_ep.bootstrap, cupy_ep.jit; "
            "bad = [m for m in ('nvshmem', 'nvshmem.core', 'cuda.core') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _gpu_count():
    return bootstrap._device_count()[0]


@pytest.mark.skipif(MPIEXEC is None or _gpu_count() < 2, reason="needs mpiexec and 2+ GPUs")
def test_ipc_and_nvshmem_on_gpus():
    """CUDA IPC exchange, NVSHMEM bootstrap/peer pointers/device code, one rank per GPU."""
    checks = ["ipc", "nvshmem", "nvshmem-device"] if importlib.util.find_spec("nvshmem") else ["ipc"]
    nranks = min(_gpu_count(), 4)
    cmd = [MPIEXEC, "-n", str(nranks), sys.executable,
           str(REPO / "tests" / "mpi" / "bootstrap_gpu_check.py"), *checks]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for res in results:
        for check in checks:
            assert any(k.startswith(check) and v == "ok" for k, v in res.items()), res


def test_nvlink_buffer_is_freed_only_after_every_peer_unmapped_it(monkeypatch):
    """cudaFree of an allocation a peer still has open is undefined: unmap, barrier, then free."""
    runtime = pytest.importorskip("cupy.cuda.runtime")
    from cupy_ep.memory import NVLinkBuffer

    calls = []
    monkeypatch.setattr(runtime, "deviceSynchronize", lambda: calls.append("sync"))
    monkeypatch.setattr(runtime, "ipcCloseMemHandle", lambda p: calls.append(f"close {p:#x}"))
    monkeypatch.setattr(runtime, "free", lambda p: calls.append(f"free {p:#x}"))

    class Domain:
        def Barrier(self):
            calls.append("barrier")

    buf = NVLinkBuffer.__new__(NVLinkBuffer)   # as after __init__ on nvl_rank 1 of 3
    buf.nvl_comm, buf.rank, buf.local_ptr, buf.peer_ptrs = Domain(), 1, 0x200, [0x100, 0x200, 0x300]
    buf.free()
    assert calls == ["sync", "close 0x100", "close 0x300", "barrier", "free 0x200"]
    buf.free()                                  # idempotent
    assert len(calls) == 5
