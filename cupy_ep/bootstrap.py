"""Process-level setup: MPI topology, GPU choice, CUDA IPC handle exchange and NVSHMEM.

Every function that takes ``comm`` is collective over it: all ranks must call it, and where a
step can fail on some ranks only (opening a peer's memory, importing NVSHMEM), the ranks first
agree on the outcome so that all of them raise instead of some waiting forever.

Nothing here needs a GPU at import time: CuPy device calls, ``nvshmem`` and ``cuda.core`` are
imported or used only inside the functions that need them.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cupy_ep import transport_env
from cupy_ep.collective import failures
from cupy_ep.errors import CupyEpError, GPUUnavailableError

__all__ = [
    "Topology",
    "close_ipc_handles",
    "discover",
    "exchange_ipc_handles",
    "finalize_nvshmem",
    "gpu_available",
    "gpu_unavailable_reason",
    "init_nvshmem",
    "nvshmem_bind_module",
    "nvshmem_peer_ptrs",
    "nvshmem_plan",
    "release_nvshmem",
    "run_agreed",
    "select_device",
]


# ---------------------------------------------------------------------------
# Topology
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    """Where this rank sits.

    Ranks form NVLink domains of ``num_nvl_ranks`` consecutive ranks each (the ranks of one
    host, or groups of ``num_nvl_peers``), so that
    ``rank == rdma_rank * num_nvl_ranks + nvl_rank``.

    Attributes:
        rank, num_ranks: in the communicator given to :func:`discover`.
        nvl_rank, num_nvl_ranks: in this rank's NVLink domain.
        rdma_rank, num_rdma_ranks: index of the domain, and the number of domains.
        local_rank, num_local_ranks: among the ranks of this host (chooses the GPU).
        nvl_comm: an mpi4py communicator over the NVLink domain (ranks ordered by nvl_rank).
    """

    rank: int
    num_ranks: int
    nvl_rank: int
    num_nvl_ranks: int
    rdma_rank: int
    num_rdma_ranks: int
    local_rank: int
    num_local_ranks: int
    nvl_comm: Any = field(repr=False, compare=False)

    def free(self) -> None:
        """Frees ``nvl_comm`` (collective over the domain)."""
        if self.nvl_comm is not None:
            self.nvl_comm.Free()


def _domain_size(leaders: list[int], num_nvl_peers: int | None) -> int:
    """Size of the NVLink domains, given each rank's host (as the host's lowest rank).

    Raises ValueError when hosts hold unequal or non-consecutive blocks of ranks (without
    ``num_nvl_peers``), or when ``num_nvl_peers`` does not divide the ranks or a group of
    that size would span hosts.
    """
    size = len(leaders)
    if num_nvl_peers is None:
        hosts = set(leaders)
        group = leaders.count(leaders[0])
        same_size = all(leaders.count(h) == group for h in hosts)
        consecutive = all(leaders[r] == leaders[(r // group) * group] for r in range(size))
        if not (same_size and consecutive):
            raise ValueError(
                "the ranks of each host must be consecutive and every host must hold the same "
                f"number of ranks (host of each rank, by lowest rank: {leaders}); "
                "place ranks by blocks or pass num_nvl_peers")
        return group
    if num_nvl_peers < 1 or size % num_nvl_peers != 0:
        raise ValueError(f"num_nvl_peers={num_nvl_peers} must be >= 1 and divide the number "
                         f"of ranks ({size})")
    for start in range(0, size, num_nvl_peers):
        if len(set(leaders[start:start + num_nvl_peers])) != 1:
            raise ValueError(
                f"num_nvl_peers={num_nvl_peers}: ranks {start}..{start + num_nvl_peers - 1} do "
                f"not share one host (host of each rank, by lowest rank: {leaders})")
    return num_nvl_peers


def _split_host(comm, key: int):
    """The ranks of ``comm`` on this host, ordered by ``key``. A communicator that is not mpi4py's
    (:class:`cupy_ep.torch_comm.TorchComm`) says so itself, through ``split_host``."""
    split_host = getattr(comm, "split_host", None)
    if split_host is not None:
        return split_host(key)
    from mpi4py import MPI

    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=key)


def discover(comm, num_nvl_peers: int | None = None) -> Topology:
    """Finds this rank's NVLink domain and host-local index (collective over ``comm``).

    Without ``num_nvl_peers`` the NVLink domain is the host (``MPI.COMM_TYPE_SHARED``); hosts
    must then hold equal numbers of consecutive ranks. With ``num_nvl_peers`` the domains are
    consecutive groups of that many ranks; it must divide the number of ranks, and each group
    must lie inside one host (so that one host can stand in for several in tests).

    Raises ValueError on every rank when the domains do not fit.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    if num_nvl_peers is not None and (isinstance(num_nvl_peers, bool)
                                      or not isinstance(num_nvl_peers, (int, np.integer))):
        raise TypeError(f"num_nvl_peers must be an int or None, not {type(num_nvl_peers).__name__}")
    host_comm = _split_host(comm, rank)
    try:
        local_rank, num_local = host_comm.Get_rank(), host_comm.Get_size()
        host_leader = host_comm.bcast(rank, root=0)  # lowest rank of the host (key=rank)
        info = comm.allgather((host_leader, None if num_nvl_peers is None else int(num_nvl_peers)))
    finally:
        host_comm.Free()
    leaders = [h for h, _ in info]
    requested = {n for _, n in info}
    if len(requested) != 1:
        raise ValueError(f"num_nvl_peers differs between ranks: {sorted(requested, key=str)}")

    group = _domain_size(leaders, None if num_nvl_peers is None else int(num_nvl_peers))
    rdma_rank, nvl_rank = divmod(rank, group)
    nvl_comm = comm.Split(color=rdma_rank, key=rank)
    return Topology(rank=rank, num_ranks=size, nvl_rank=nvl_rank, num_nvl_ranks=group,
                    rdma_rank=rdma_rank, num_rdma_ranks=size // group, local_rank=local_rank,
                    num_local_ranks=num_local, nvl_comm=nvl_comm)


# ---------------------------------------------------------------------------
# GPUs
# ---------------------------------------------------------------------------
NO_GPU = "no NVIDIA driver/GPU found"


def _device_count() -> tuple[int, str]:
    """(number of GPUs CuPy sees, why none when 0, in words), never raising.

    CuPy and its runtime are looked up at each call, never at import, so that tests which
    replace or reload them see their own."""
    try:
        import cupy
    except ImportError:
        return 0, 'CuPy is not installed (pip install "cupy_ep[cuda13]")'
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 -- no driver, no CUDA runtime, broken install
        return 0, _no_device_reason(e)
    return n, "" if n else f"{NO_GPU} (the driver lists no device{_visible_devices()})"


def _no_device_reason(error: BaseException) -> str:
    """Why the CUDA runtime found no device. Without a driver it reports
    cudaErrorInsufficientDriver ("driver version is insufficient"), which reads as if a driver
    were there: that case, and cudaErrorNoDevice, are told as what they are."""
    text = f"{type(error).__name__}: {error}"
    if "cudaErrorNoDevice" in text:
        return f"{NO_GPU} (the driver lists no device{_visible_devices()})"
    if "cudaErrorInsufficientDriver" in text and not _driver_library_loads():
        return f"{NO_GPU} (libcuda.so.1, the NVIDIA driver's library, cannot be loaded)"
    return text


def _driver_library_loads() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _visible_devices() -> str:
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if v is None else f"; CUDA_VISIBLE_DEVICES={v!r}"


def gpu_unavailable_reason(comm=None) -> str | None:
    """None when this rank (with ``comm``: every rank, collective) has a usable GPU, else why not:
    the first failing rank's reason, prefixed with its rank when ``comm`` is given."""
    why = _device_count()[1] or None
    if comm is None:
        return why
    reasons = comm.allgather(why)
    bad = [(r, w) for r, w in enumerate(reasons) if w is not None]
    return None if not bad else f"rank {bad[0][0]}: {bad[0][1]}"


def gpu_available(comm=None) -> bool:
    """True when this rank (and, with ``comm``, every rank: collective) sees a usable GPU."""
    return gpu_unavailable_reason(comm) is None


def select_device(topology: Topology) -> int:
    """Makes GPU ``local_rank % device_count`` current (CuPy honours CUDA_VISIBLE_DEVICES)
    and returns its id. Raises GPUUnavailableError when there is no GPU or driver."""
    n, why = _device_count()
    if n == 0:
        raise GPUUnavailableError(f"rank {topology.rank}: no usable GPU: {why}")
    import cupy

    device_id = topology.local_rank % n
    cupy.cuda.Device(device_id).use()
    return device_id


def _agree(comm, what: str, error: BaseException | None, keep_own: bool = False) -> None:
    """Raises CupyEpError on every rank when ``error`` is set on any rank (collective); with
    ``keep_own`` a rank that has an ``error`` raises that error itself instead."""
    failed = failures(comm, None if error is None else f"{type(error).__name__}: {error}")
    if failed:
        if keep_own and error is not None:
            raise error
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed.items())
        raise CupyEpError(f"{what} failed on rank(s) {sorted(failed)}: {detail}") from error


def run_agreed(comm, what: str, step):
    """Runs ``step()`` on every rank of ``comm``, then agrees on the outcome (collective), and
    returns what ``step`` returned. When it raised on any rank, that rank raises its own error
    and every other rank raises CupyEpError naming the failed ranks: a failure leaves all ranks
    at the same point, so that they can release what they made together instead of some
    waiting in a collective the others left."""
    result, error = None, None
    try:
        result = step()
    except Exception as e:  # noqa: BLE001 -- agreed on below
        error = e
    _agree(comm, what, error, keep_own=True)
    return result


# ---------------------------------------------------------------------------
# CUDA IPC
# ---------------------------------------------------------------------------
def _allocation_base(ptr: int) -> int | None:
    """Base address of the allocation holding ``ptr`` (None when cuda.bindings is missing)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    err, base, _size = driver.cuMemGetAddressRange(ptr)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise CupyEpError(f"cuMemGetAddressRange(0x{ptr:x}) failed: {err}")
    return int(base)


def exchange_ipc_handles(comm, local_ptr: int) -> list[int]:
    """Maps every rank's allocation into this process (collective over ``comm``, normally
    ``Topology.nvl_comm``: CUDA IPC reaches only GPUs of the same host).

    ``local_ptr`` must be the base address of a plain device allocation (``cudaMalloc``, e.g.
    ``cupy.cuda.runtime.malloc``; not memory from CuPy's pool, which may hand out the middle
    of a larger block). Returns one pointer per rank of ``comm``: peers' allocations mapped
    here (``cudaIpcMemLazyEnablePeerAccess``), this rank's own ``local_ptr`` at its index.
    If any rank fails to export or open a handle, every rank raises CupyEpError (and what
    was opened is closed again). Release with :func:`close_ipc_handles`.
    """
    import cupy

    runtime = cupy.cuda.runtime
    me = comm.Get_rank()
    handle, error = None, None
    try:
        base = _allocation_base(int(local_ptr))
        if base is not None and base != int(local_ptr):
            raise ValueError(f"pointer 0x{int(local_ptr):x} is {int(local_ptr) - base} bytes into "
                             "its allocation; pass the allocation's base address")
        handle = bytes(runtime.ipcGetMemHandle(int(local_ptr)))
    except Exception as e:  # noqa: BLE001 -- agreed on below
        error = e
    _agree(comm, "cudaIpcGetMemHandle", error)
    handles = comm.allgather(handle)

    ptrs, error = [], None
    try:
        for r, h in enumerate(handles):
            ptrs.append(int(local_ptr) if r == me else int(runtime.ipcOpenMemHandle(h, 1)))
    except Exception as e:  # noqa: BLE001 -- agreed on below
        error = e
    try:
        _agree(comm, "cudaIpcOpenMemHandle", error)
    except CupyEpError:
        close_ipc_handles(ptrs, me)
        raise
    return ptrs


def close_ipc_handles(ptrs, self_index: int) -> None:
    """Unmaps the peers' allocations opened by :func:`exchange_ipc_handles` (all but
    ``ptrs[self_index]``, which this rank owns and frees itself)."""
    import cupy

    for r, p in enumerate(ptrs):
        if r != self_index and p:
            cupy.cuda.runtime.ipcCloseMemHandle(p)


# ---------------------------------------------------------------------------
# NVSHMEM (nvshmem4py), bootstrapped with a unique id broadcast over MPI
# ---------------------------------------------------------------------------
_nvshmem: dict = {"refs": 0, "device": None, "world": None, "heap_bytes": 0, "in_use": 0}
_bound_modules: dict = {}   # id(module) -> module bound to the current NVSHMEM initialisation

_HEAP_SLACK = 256 << 20     # symmetric heap beyond the Buffers' requests (NVSHMEM's own use)
_DEFAULT_HEAP = 1 << 30     # NVSHMEM's own default NVSHMEM_SYMMETRIC_SIZE


def _world_ranks(comm) -> tuple:
    """The ranks of ``comm`` in MPI.COMM_WORLD, in ``comm``'s order: the PEs of an NVSHMEM
    world made over ``comm`` (PE = rank in ``comm``). A communicator that is not mpi4py's
    (:class:`cupy_ep.torch_comm.TorchComm`) gives them through ``world_ranks``."""
    world_ranks = getattr(comm, "world_ranks", None)
    if world_ranks is not None:
        return tuple(world_ranks())
    from mpi4py import MPI

    group, world_group = comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        return tuple(MPI.Group.Translate_ranks(group, list(range(comm.Get_size())), world_group))
    finally:
        group.Free()
        world_group.Free()


def _heap_bytes_for(request: int) -> int | None:
    """The symmetric heap an initialisation for ``request`` bytes gets: the request plus slack,
    at least NVSHMEM's default; None when the user set NVSHMEM_SYMMETRIC_SIZE (NVSHMEM then
    enforces the user's size, and re-initialising could not give more)."""
    if "NVSHMEM_SYMMETRIC_SIZE" in os.environ and not _nvshmem.get("size_is_ours"):
        return None
    return max(_DEFAULT_HEAP, request + _HEAP_SLACK)


def nvshmem_plan(state: dict, device_id: int, world: tuple, request: int) -> str:
    """What :func:`init_nvshmem` does on this rank for a Buffer of ``request`` bytes, from the
    process's NVSHMEM ``state``: "init" (none yet), "count" (in use by other Buffers over the
    same ranks and GPU, with room left: share it), "full" (the same, without room), "reuse" (idle,
    kept after its last Buffer, and large enough), "reinit" (idle over the same ranks but too
    small, or on another GPU: finalise it, then initialise), or "conflict" (in use, or idle, over
    other ranks)."""
    if state["world"] is None:
        return "init"
    heap = state["heap_bytes"]
    same = (state["device"], state["world"]) == (device_id, world)
    if same and state["refs"] > 0:
        # No slack here: NVSHMEM's own share of the heap is not known, and it refuses what it cannot hold.
        return "count" if heap is None or state["in_use"] + request <= heap else "full"
    if same and (heap is None or request + _HEAP_SLACK <= heap):
        return "reuse"
    if state["refs"] == 0 and sorted(state["world"]) == sorted(world):
        return "reinit"
    return "conflict"


def init_nvshmem(comm, device_id: int, heap_bytes: int = 0) -> None:
    """Initialises NVSHMEM over the ranks of ``comm`` on GPU ``device_id`` for a symmetric
    allocation of ``heap_bytes``, or joins the initialisation this process already has
    (collective).

    One NVSHMEM world per process (PE = rank in ``comm``), reference counted by the Buffers that
    use it (:func:`release_nvshmem` undoes one). When the last of them is released NVSHMEM stays
    initialised, idle, and the next Buffer over the same ranks and GPU whose ``heap_bytes`` fit
    its symmetric heap reuses it: re-initialising NVSHMEM keeps GPU memory each time (NVSHMEM's
    own, about 1 MiB with one rank per GPU, up to a GiB with ranks sharing a GPU). An idle world
    too small for ``heap_bytes`` is finalised and made again when ``comm`` has the same ranks.
    A Buffer that does not fit beside live ones raises ``ValueError`` (``num_rdma_bytes``), and
    one over other ranks needs :func:`finalize_nvshmem` on the old ranks first. Idle NVSHMEM is
    finalised at interpreter exit. After an initialisation that failed (on any rank), every later
    call raises ``CupyEpError`` at once, without a collective.

    A fresh initialisation: rank 0 creates a unique id and broadcasts it over ``comm``; every rank
    then calls ``nvshmem.core.init(..., initializer_method="uid")`` (MPI-library independent).
    NVLink multicast is disabled (``NVSHMEM_DISABLE_NVLS=1``) unless the environment says
    otherwise, ``CUPY_EP_TEST_PROXY_TRANSPORT=1`` selects the proxy-transport test mode
    (:mod:`cupy_ep.transport_env`), and the symmetric heap is sized for ``heap_bytes`` plus
    256 MiB (at least NVSHMEM's default 1 GiB) unless the user set ``NVSHMEM_SYMMETRIC_SIZE``.
    """
    if _nvshmem.get("unusable"):
        raise CupyEpError(f"NVSHMEM cannot be used in this process after its failed initialisation "
                          f"({_nvshmem['unusable']}); start a new job")
    world = _world_ranks(comm)
    plans = set(comm.allgather(nvshmem_plan(_nvshmem, device_id, world, heap_bytes)))
    if plans <= {"count", "reuse"}:
        _nvshmem["refs"] += 1
        _nvshmem["in_use"] += heap_bytes
        return
    if plans <= {"count", "full"}:
        raise ValueError(
            f"num_rdma_bytes: NVSHMEM's symmetric heap ({_nvshmem['heap_bytes']} bytes, sized when the "
            f"first of the live Buffers was created) cannot hold {heap_bytes} more bytes beside the "
            f"{_nvshmem['in_use']} its live Buffers use; create the largest Buffer first, or set "
            f"NVSHMEM_SYMMETRIC_SIZE")
    if plans == {"reinit"}:
        finalize_nvshmem()   # collective over the old world: the same ranks as comm
    elif plans != {"init"}:
        raise ValueError(
            f"NVSHMEM is initialised in this process over other ranks, or in use on another GPU (this "
            f"rank: device {_nvshmem['device']}, world ranks {_nvshmem['world']}; wanted device "
            f"{device_id}, ranks {world}); destroy the Buffers that use it and call "
            f"cupy_ep.finalize_nvshmem() on its ranks first")
    _initialise(comm, device_id, heap_bytes, world)


def _initialise(comm, device_id: int, heap_bytes: int, world: tuple) -> None:
    rank = comm.Get_rank()
    uid, error = None, None
    try:
        os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
        transport_env.apply()   # CUPY_EP_TEST_PROXY_TRANSPORT=1: NVSHMEM's UCX transport, P2P off
        heap = _heap_bytes_for(heap_bytes)
        if heap is not None:
            os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(heap)
            _nvshmem["size_is_ours"] = True
        import cupy
        import nvshmem.core
        from cuda.core import Device

        cupy.cuda.Device(device_id).use()
        device = Device(device_id)
        device.set_current()
        uid = nvshmem.core.get_unique_id(empty=rank != 0)
    except Exception as e:  # noqa: BLE001 -- agreed on below
        error = e
    _agree(comm, "NVSHMEM setup (nvshmem4py, cuda.core, device)", error)
    comm.Bcast(uid._data.view(np.int8), root=0)
    try:
        nvshmem.core.init(device=device, uid=uid, rank=rank, nranks=comm.Get_size(),
                          initializer_method="uid")
        _check_initialised()
    except Exception as e:  # noqa: BLE001 -- agreed on below
        error = e
    try:
        _agree(comm, "nvshmem.core.init", error)
    except CupyEpError as e:
        # Some ranks may now hold an initialised NVSHMEM and others not, and no collective can
        # bring them back together: every later initialisation in this process fails at once.
        _nvshmem["unusable"] = str(e)
        raise
    _nvshmem.update(refs=1, device=device_id, world=world, heap_bytes=heap, in_use=heap_bytes)
    if not _nvshmem.get("exit_hook"):
        atexit.register(_finalize_at_exit)
        _watch_mpi4py_abort()
        _nvshmem["exit_hook"] = True


def _check_initialised() -> None:
    """Raises when ``nvshmem.core.init`` returned but NVSHMEM does not count itself initialised:
    its next call (the symmetric allocation) would end the process with "nvshmem API called before
    nvshmem_init" instead of raising. Seen now and then with several ranks sharing one GPU."""
    import nvshmem.bindings

    status = nvshmem.bindings.init_status()
    if status == nvshmem.bindings.Init_status.STATUS_NOT_INITIALIZED:
        raise CupyEpError("nvshmem.core.init returned, but NVSHMEM reports itself not initialised "
                          "(nvshmemx_init_status() == NOT_INITIALIZED); NVSHMEM cannot be used in "
                          "this job any more")


def release_nvshmem(heap_bytes: int = 0) -> None:
    """Drops one reference taken by :func:`init_nvshmem` (for ``heap_bytes``); NVSHMEM stays
    initialised (idle once no reference is left)."""
    if _nvshmem["refs"] > 0:
        _nvshmem["refs"] -= 1
        _nvshmem["in_use"] = max(0, _nvshmem["in_use"] - heap_bytes)


def finalize_nvshmem() -> None:
    """Finalises this process's idle NVSHMEM (collective over the ranks it was initialised on)
    and releases its symmetric heap. A no-op when NVSHMEM is not initialised; an error while a
    Buffer still uses it. Needed only to free the heap early or to move NVSHMEM to other ranks:
    idle NVSHMEM is finalised at interpreter exit."""
    if _nvshmem["world"] is None:
        return
    if _nvshmem["refs"] > 0:
        raise CupyEpError(f"NVSHMEM is in use by {_nvshmem['refs']} Buffer(s) of this process: destroy them first")
    import nvshmem.bindings
    import nvshmem.core

    # nvshmem.core.module_finalize is broken in nvshmem4py 0.4.1: the binding is called directly.
    for module in _bound_modules.values():
        nvshmem.bindings.cumodule_finalize(int(module.module.ptr))
    _bound_modules.clear()
    nvshmem.core.finalize()
    _nvshmem.update(device=None, world=None, heap_bytes=0, in_use=0)


def _exit_is_failing() -> bool:
    """The interpreter is ending after a reported exception (``sys.last_exc``: an uncaught one,
    or one a test runner reported), or ``python -m mpi4py`` is about to abort the job."""
    reported = getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None) is not None
    return reported or _nvshmem.get("aborting", False)


def _finalize_at_exit() -> None:
    """Finalises idle NVSHMEM at interpreter exit (NVSHMEM wants every init matched by a
    finalize; its network transports can crash at exit without one). Skipped when the exit is
    failing, since peers that never arrive would leave this rank waiting in the collective
    finalize instead of exiting, and while Buffers that were never destroyed still hold it."""
    if _nvshmem["refs"] == 0 and not _exit_is_failing():
        finalize_nvshmem()


def _watch_mpi4py_abort() -> None:
    """``python -m mpi4py`` ends the job with MPI_Abort after an uncaught exception or a non-zero
    ``SystemExit``, but only after the atexit hooks have run; its ``mpi4py.run.set_abort_status``
    is wrapped so that :func:`_finalize_at_exit` knows and does not wait for peers first."""
    run = sys.modules.get("mpi4py.run")
    if run is None or getattr(run.set_abort_status, "cupy_ep_watch", False):
        return
    original = run.set_abort_status

    def set_abort_status(status):
        code = status.code if isinstance(status, SystemExit) else status
        if isinstance(status, KeyboardInterrupt) or (code not in (None, 0) and code is not False):
            _nvshmem["aborting"] = True
        return original(status)

    set_abort_status.cupy_ep_watch = True
    run.set_abort_status = set_abort_status


def nvshmem_peer_ptrs(arr_ptr: int, num_pes: int) -> list[int]:
    """The address of symmetric address ``arr_ptr`` on each PE, as this GPU can load/store it
    directly (NVLink P2P), or 0 for a PE it cannot reach that way."""
    import nvshmem.bindings

    return [int(nvshmem.bindings.ptr(int(arr_ptr), pe) or 0) for pe in range(num_pes)]


def nvshmem_bind_module(module) -> None:
    """Binds a loaded module with NVSHMEM device code (``jit.compile_module_nvshmem``) to the
    initialised NVSHMEM runtime, once per initialisation; needed before its first launch."""
    if id(module) in _bound_modules:
        return
    import nvshmem.bindings

    status = nvshmem.bindings.cumodule_init(int(module.module.ptr))
    if status not in (None, 0):
        raise CupyEpError(f"nvshmemx_cumodule_init failed with status {status}")
    _bound_modules[id(module)] = module
