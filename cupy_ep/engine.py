"""What every communication engine shares: compiled modules, launches, profiling.

An engine owns one mode's whole protocol (its buffers' layout, its kernels and the host steps
between them); :class:`cupy_ep.Buffer` validates arguments, picks the engine and orders the
streams. Engines: :class:`cupy_ep.intranode.IntranodeEngine`,
:class:`cupy_ep.internode.InternodeEngine`, :class:`cupy_ep.low_latency.LowLatencyEngine`,
and the layout kernel :class:`cupy_ep.layout.LayoutEngine`.
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from . import jit

# Loaded kernel modules of this process (one GPU per process), by file, constants and kind.
# The first use of a specialisation compiles it collectively (every rank of the engine's
# communicator must make that call); later engines of the process reuse it without talking.
_MODULES: dict = {}


class Engine:
    """Base of the engines.

    Args:
        comm: the communicator the engine's kernels span (compilation agrees over it).
        status: the Buffer's :class:`cupy_ep.memory.StatusRecord`.
        timeout_ns: bound of every wait inside the kernels.
        chaos: compile the kernels with the test-only chaos pauses.
    """

    def __init__(self, comm, status, timeout_ns: int, chaos: bool = False):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.num_ranks = comm.Get_size()
        self.status = status
        self.timeout_ns = np.uint64(timeout_ns)
        self.chaos = bool(chaos)
        self.profile = None   # a cupy_ep.profiling.Profile while Buffer.profile() runs

    def _module(self, filename: str, constants: dict, nvshmem: bool = False):
        constants = dict(constants, CHAOS=int(self.chaos))
        key = (filename, tuple(sorted(constants.items())), nvshmem)
        module = _MODULES.get(key)
        if module is None:
            if nvshmem:
                module = jit.compile_module_nvshmem(filename, constants, comm=self.comm)
            else:
                module = jit.compile_module(filename, constants, comm=self.comm)
            _MODULES[key] = module
        if nvshmem:
            from .bootstrap import nvshmem_bind_module

            nvshmem_bind_module(module)
        return module

    def _launch(self, kernel, grid: int, block: int, args, stream, name: str = "") -> None:
        timed = self.profile.kernel(name, stream) if (name and self.profile is not None) else nullcontext()
        with stream, timed:
            kernel((grid,), (block,), args)

    def _phase_buffer(self, kernel: str, num_blocks: int, names: dict):
        """Pointer (np.uint64) of a checkpoint buffer for this launch, 0 when not profiling."""
        if self.profile is None:
            return np.uint64(0)
        return np.uint64(self.profile.phase_buffer(kernel, num_blocks, names).data.ptr)
