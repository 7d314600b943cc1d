"""Process-level setup: MPI topology, GPU choice, CUDA IPC handle exchange and NVSHMEM.

Every function that takes ``comm`` is collective over it: all ranks must call it, and where a
step can fail on some ranks only (opening a peer's memory, importing NVSHMEM), the ranks first
agree on the outcome so that all of them raise instead of some waiting forever.

Nothing here needs a GPU at import time: CuPy device calls, ``nvshmem`` and ``cuda.core`` are
imported or used only inside the functions that need them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cupy_ep.errors import CupyEpError, GPUUnavailableError

__all__ = [
    "Topology",
    "close_ipc_handles",
    "discover",
    "exchange_ipc_handles",
    "finalize_nvshmem",
    "gpu_available",
    "init_nvshmem",
    "nvshmem_bind_module",
    "nvshmem_peer_ptrs",
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


def discover(comm, num_nvl_peers: int | None = None) -> Topology:
    """Finds this rank's NVLink domain and host-local index (collective over ``comm``).

    Without ``num_nvl_peers`` the NVLink domain is the host (``MPI.COMM_TYPE_SHARED``); hosts
    must then hold equal numbers of consecutive ranks. With ``num_nvl_peers`` the domains are
    consecutive groups of that many ranks; it must divide the number of ranks, and each group
    must lie inside one host (so that one host can stand in for several in tests).

    Raises ValueError on every rank when the layout does not fit.
    """
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    if num_nvl_peers is not None and (isinstance(num_nvl_peers, bool)
                                      or not isinstance(num_nvl_peers, (int, np.integer))):
        raise TypeError(f"num_nvl_peers must be an int or None, not {type(num_nvl_peers).__name__}")
    host_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
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
def _device_count() -> tuple[int, str]:
    """(number of GPUs CuPy sees, why none when 0), never raising."""
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 -- no driver, no CUDA runtime, broken install
        return 0, f"{type(e).__name__}: {e}"
    return n, "" if n else "no CUDA device"


def gpu_available(comm=None) -> bool:
    """True when this rank (and, with ``comm``, every rank: collective) sees a usable GPU."""
    ok = _device_count()[0] > 0
    return all(comm.allgather(ok)) if comm is not None else ok


def select_device(topology: Topology) -> int:
    """Makes GPU ``local_rank % device_count`` current (CuPy honours CUDA_VISIBLE_DEVICES)
    and returns its id. Raises GPUUnavailableError when there is no GPU or driver."""
    n, why = _device_count()
    if n == 0:
        raise GPUUnavailableError(f"rank {topology.rank}: no usable GPU ({why})")
    import cupy

    device_id = topology.local_rank % n
    cupy.cuda.Device(device_id).use()
    return device_id


def _agree(comm, what: str, error: BaseException | None) -> None:
    """Raises CupyEpError on every rank when ``error`` is set on any rank."""
    messages = comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
    failed = {r: m for r, m in enumerate(messages) if m is not None}
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed.items())
        raise CupyEpError(f"{what} failed on rank(s) {sorted(failed)}: {detail}") from error


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
_nvshmem = {"refs": 0, "device": None, "nranks": None}
_bound_modules: dict = {}   # id(module) -> module bound to the current NVSHMEM initialisation

_HEAP_SLACK = 256 << 20     # symmetric heap beyond the first Buffer's request (NVSHMEM's own use)


def init_nvshmem(comm, device_id: int, heap_bytes: int = 0) -> None:
    """Initialises NVSHMEM over the ranks of ``comm`` on GPU ``device_id`` (collective).

    Rank 0 creates a unique id and broadcasts it over ``comm``; every rank then calls
    ``nvshmem.core.init(..., initializer_method="uid")`` (MPI-library independent; never
    "mpi"). NVLink multicast is disabled (``NVSHMEM_DISABLE_NVLS=1``) unless the environment
    already says otherwise, and the symmetric heap is sized for ``heap_bytes`` (plus slack)
    unless ``NVSHMEM_SYMMETRIC_SIZE`` is set. Reference counted: further calls in the same process
    only count (they must name the same device and number of ranks); :func:`finalize_nvshmem`
    undoes one.
    """
    if _nvshmem["refs"] > 0:
        if (_nvshmem["device"], _nvshmem["nranks"]) != (device_id, comm.Get_size()):
            raise ValueError(
                f"NVSHMEM is already initialised on device {_nvshmem['device']} over "
                f"{_nvshmem['nranks']} ranks; cannot join device {device_id} over {comm.Get_size()}")
        _nvshmem["refs"] += 1
        return
    rank = comm.Get_rank()
    uid, error = None, None
    try:
        os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
        if heap_bytes + _HEAP_SLACK > (1 << 30):
            os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(heap_bytes + _HEAP_SLACK))
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
    except Exception as e:  # noqa: BLE001 -- agreed on below
        error = e
    _agree(comm, "nvshmem.core.init", error)
    _nvshmem.update(refs=1, device=device_id, nranks=comm.Get_size())


def finalize_nvshmem() -> None:
    """Drops one reference taken by :func:`init_nvshmem`; the last one finalises NVSHMEM
    (collective over the NVSHMEM ranks). A no-op when NVSHMEM is not initialised."""
    if _nvshmem["refs"] == 0:
        return
    _nvshmem["refs"] -= 1
    if _nvshmem["refs"] == 0:
        import nvshmem.bindings
        import nvshmem.core

        # nvshmem.core.module_finalize is broken in nvshmem4py 0.4.1: the binding is called directly.
        for module in _bound_modules.values():
            nvshmem.bindings.cumodule_finalize(int(module.module.ptr))
        _bound_modules.clear()
        nvshmem.core.finalize()
        _nvshmem.update(device=None, nranks=None)


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
