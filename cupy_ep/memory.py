"""Memory that ranks share: the NVLink buffer, host-mapped words, the NVSHMEM buffer.

Everything here is allocated once per :class:`cupy_ep.Buffer` and freed by
``Buffer.destroy()``. Kernels receive raw addresses (``int``) of these areas.
"""
from __future__ import annotations

import ctypes

import cupy
import numpy as np

from . import limits
from .errors import status_error

class HostMapped:
    """Pinned host memory mapped into the GPU's address space (zero-copy).

    With unified addressing the same address is valid on host and device, so
    kernels write here and the host reads ``.host`` without a copy.
    """

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        runtime = cupy.cuda.runtime
        self.ptr = runtime.hostAlloc(nbytes, runtime.hostAllocMapped | runtime.hostAllocPortable)
        raw = (ctypes.c_uint8 * nbytes).from_address(self.ptr)
        self.host = np.frombuffer(raw, dtype=np.uint8)
        self.host[:] = 0

    def view(self, dtype, count: int, offset: int = 0) -> np.ndarray:
        dtype = np.dtype(dtype)
        return self.host[offset:offset + count * dtype.itemsize].view(dtype)

    def free(self) -> None:
        if self.ptr:
            self.host = None
            cupy.cuda.runtime.freeHost(self.ptr)
            self.ptr = 0


class StatusRecord:
    """Where kernels report what went wrong (``struct StatusRecord`` in kernels_cu/status.cuh).

    The record kernels receive (``.ptr``) is in device memory; the reporting thread claims it
    with a device atomic and copies its report into a host-mapped mirror, which the host reads
    without synchronising (:attr:`status`). :meth:`take` turns a report into the exception to
    raise; every report but a timeout is then cleared, so that the Buffer stays usable.
    """

    def __init__(self):
        self._mirror = HostMapped(limits.STATUS_RECORD_INTS * 4)
        self.fields = self._mirror.view(np.int32, limits.STATUS_RECORD_INTS)
        try:
            self._device = cupy.zeros(2, dtype=cupy.uint64)  # (claimed, status), host mirror address
            self._device[1] = self._mirror.ptr
            cupy.cuda.get_current_stream().synchronize()
        except Exception:
            self._mirror.free()
            raise

    @property
    def ptr(self) -> int:
        return int(self._device.data.ptr)

    @property
    def status(self) -> int:
        """The reported status (0: none), read from the host mirror without synchronising."""
        return int(self.fields[0])

    @property
    def from_layout(self) -> bool:
        """The report comes from the layout kernel (this rank's own, not a collective's)."""
        return int(self.fields[1]) == limits.KERNEL_IDS["get_dispatch_layout"]

    def take(self):
        """The exception for the reported status (None when nothing was reported). Waits for the
        device first, so that the report is complete; clears every report but a timeout."""
        if self.status == limits.ST_OK:
            return None
        cupy.cuda.runtime.deviceSynchronize()
        status, kernel, rank, peer, detail, detail2, channel = (int(v) for v in self.fields[:7])
        error = status_error(status, limits.KERNEL_NAMES.get(kernel, f"kernel {kernel}"), rank, peer, detail,
                             detail2, channel)
        if status != limits.ST_TIMEOUT:
            self.fields[:] = 0
            cupy.cuda.runtime.memset(self.ptr, 0, 8)
            cupy.cuda.runtime.deviceSynchronize()
        return error

    def free(self) -> None:
        self._device = None
        self._mirror.free()


class NVLinkBuffer:
    """A raw device allocation per rank, opened by every peer of the NVLink domain.

    Made in two steps, so that a Buffer can agree on each before the next: the constructor
    allocates and zeroes this rank's memory (local), :meth:`open_peers` maps the peers'
    (collective over the domain). ``peer_ptrs[i]`` is then the address, valid on this GPU, of
    rank i's allocation (this rank's own for i == nvl_rank), and ``peer_table`` the same list as
    a device array of uint64 for kernels.
    """

    def __init__(self, nvl_comm, num_bytes: int):
        self.num_bytes = num_bytes
        self.nvl_comm = nvl_comm
        self.rank = nvl_comm.Get_rank()
        self.peer_ptrs = self.peer_table = None
        self.local_ptr = cupy.cuda.runtime.malloc(num_bytes)
        try:
            cupy.cuda.runtime.memset(self.local_ptr, 0, num_bytes)
            cupy.cuda.runtime.deviceSynchronize()
        except Exception:
            cupy.cuda.runtime.free(self.local_ptr)
            raise

    def open_peers(self) -> None:
        """Maps every peer's allocation (collective over the domain). When any rank fails, every
        rank raises CupyEpError, with its own allocation freed once no peer has it open."""
        from .bootstrap import exchange_ipc_handles

        try:
            self.peer_ptrs = exchange_ipc_handles(self.nvl_comm, self.local_ptr)
        except Exception:
            self._free_after_barrier()   # agreed: every rank of the domain is here
            raise
        self.peer_table = cupy.asarray(np.array(self.peer_ptrs, dtype=np.uint64))

    def free(self) -> None:
        """Unmaps the peers' allocations and frees this rank's: collective over the domain once
        :meth:`open_peers` succeeded, local before (no peer has it open then)."""
        if not self.local_ptr:
            return
        if self.peer_ptrs is None:
            cupy.cuda.runtime.free(self.local_ptr)
            self.local_ptr = 0
            return
        from .bootstrap import close_ipc_handles

        try:
            cupy.cuda.runtime.deviceSynchronize()
            close_ipc_handles(self.peer_ptrs, self.rank)
        finally:   # the peers wait in the barrier: reach it whatever failed here
            self._free_after_barrier()

    def _free_after_barrier(self) -> None:
        # Freeing an allocation that a peer still has open is undefined (cudaIpcCloseMemHandle
        # documentation); on one shared GPU it kept the memory allocated.
        self.nvl_comm.Barrier()
        cupy.cuda.runtime.free(self.local_ptr)
        self.local_ptr = 0


class SymmetricBuffer:
    """The NVSHMEM symmetric buffer (same size and offsets on every rank).

    ``peer_ptrs[pe]`` is pe's buffer mapped on this GPU (NVLink/P2P), or 0 when
    pe is only reachable through NVSHMEM's network transport.
    """

    def __init__(self, comm, device_id: int, num_bytes: int):
        from .bootstrap import init_nvshmem, release_nvshmem, run_agreed

        init_nvshmem(comm, device_id, num_bytes)
        import nvshmem.core.interop.cupy as nvcupy

        self.num_bytes = num_bytes
        try:
            self.array = nvcupy.bytearray((num_bytes,))
        except BaseException:
            release_nvshmem(num_bytes)
            raise
        try:
            run_agreed(comm, "setting up the NVSHMEM buffer", lambda: self._map(comm.Get_size()))
        except Exception:
            self.free(comm)   # agreed: every rank is here
            raise

    def _map(self, num_ranks: int) -> None:
        """Zeroes this rank's buffer and finds the peers' (local)."""
        from .bootstrap import nvshmem_peer_ptrs

        self.array.fill(0)
        cupy.cuda.runtime.deviceSynchronize()
        self.ptr = int(self.array.data.ptr)
        self.peer_ptrs = nvshmem_peer_ptrs(self.ptr, num_ranks)
        self.peer_table = cupy.asarray(np.array(self.peer_ptrs, dtype=np.uint64))

    def free(self, comm) -> None:
        if self.array is not None:
            import nvshmem.core.interop.cupy as nvcupy

            from .bootstrap import release_nvshmem

            try:
                cupy.cuda.runtime.deviceSynchronize()
            finally:   # the peers wait in the barrier and in NVSHMEM's collective free
                comm.Barrier()
                nvcupy.free_array(self.array)
                self.array = None
                release_nvshmem(self.num_bytes)
