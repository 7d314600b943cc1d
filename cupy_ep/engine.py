"""What every communication engine shares: compiled modules, launches, profiling.

An engine owns one mode's whole protocol (its buffers' geometry, its kernels and the host steps
between them); :class:`cupy_ep.Buffer` validates arguments, picks the engine and orders the
streams. Engines: :class:`cupy_ep.intranode.IntranodeEngine`,
:class:`cupy_ep.internode.InternodeEngine`, :class:`cupy_ep.low_latency.LowLatencyEngine`,
and the layout kernel :class:`cupy_ep.layout.LayoutEngine`.
"""
from __future__ import annotations

import ctypes
import os
from contextlib import nullcontext
from math import prod

import cupy
import numpy as np
from cupy_backends.cuda.api import driver

from . import jit

# Loaded kernel modules of this process (one GPU per process), by file, constants and kind.
# The first use of a specialisation compiles it collectively (over the engine's compile_comm:
# every rank must make that call); later engines of the process reuse it without talking. A
# module whose agreement failed is not kept, so that every rank compiles it again next time.
_MODULES: dict = {}


def array_arg(a):
    """A kernel argument for an optional array: the array, or a null pointer for None."""
    return np.uint64(0) if a is None else a


def empty_together(*specs) -> list:
    """Empty CuPy arrays ``(shape, np.dtype)`` carved out of one allocation on the current
    stream, each at a 256-byte boundary: one call into the memory pool (a few µs of host time
    each) instead of one per array (a view costs about a µs). The memory returns to the pool
    when the last of them is freed, so only arrays that live about as long as each other (a
    handle's, or a call's small outputs) belong together."""
    offsets, total = _layout(specs)
    base = cupy.cuda.alloc(total)
    return [cupy.ndarray(shape, dtype, memptr=base + offset) for (shape, dtype), offset in zip(specs, offsets)]


def words_together(*specs) -> tuple:
    """As :func:`empty_together`, for device memory that only kernels read and write (a handle's
    routing state): ``(allocation, [address of each part, an int])``, no array object per part
    (≈ 1 µs of host time each). The memory lives as long as the allocation (a
    ``cupy.cuda.MemoryPointer``) is referenced."""
    offsets, total = _layout(specs)
    base = cupy.cuda.alloc(total)
    start = base.ptr
    return base, [start + offset for offset in offsets]


def _layout(specs: tuple) -> tuple:
    """``(offsets, total bytes)`` of ``specs`` one after another at _ALIGN boundaries, memoised
    (the same shapes recur call after call; the table is emptied when full)."""
    layout = _LAYOUTS.get(specs)
    if layout is None:
        offsets, total = [], 0
        for shape, dtype in specs:
            offsets.append(total)
            total += -(-prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            _LAYOUTS.clear()
        layout = _LAYOUTS[specs] = (offsets, total)
    return layout


_ALIGN = 256   # bytes: every array of empty_together starts at such a boundary (as vector loads need)
_LAYOUTS: dict = {}
_LAYOUTS_MAX = 256
I32, I64, F32, BOOL = (np.dtype(t) for t in (np.int32, np.int64, np.float32, np.bool_))   # empty_together's dtypes


def ptr(a) -> int:
    """An array's device address as a launch value (:meth:`Engine._launch_values`), 0 for None."""
    return 0 if a is None else a.data.ptr


class ParamBlock:
    """The parameters of one kernel's launches, one 8-byte slot each, kept from launch to launch.

    A launch writes its values (plain ints in the kernel's parameter order: addresses and
    numbers) into the slots in one assignment, and cuLaunchKernel reads each parameter from its
    slot at the parameter's own size (an ``int`` from the slot's low half: little-endian). CuPy's
    launch instead makes an object per argument (a NumPy scalar from the caller, a CuPy scalar or
    array record from it) on every launch. The driver copies the parameters during the call, so
    the next launch may rewrite the slots at once (and a CUDA-graph capture keeps the values of
    its launch); one Buffer's calls are not made from two threads at once, so neither are its
    launches."""

    def __init__(self, kernel, num_params: int):
        self.function = kernel.ptr
        self.num_params = num_params
        self._slots = (ctypes.c_int64 * num_params)()
        base = ctypes.addressof(self._slots)
        self._pointers = (ctypes.c_uint64 * num_params)(*(base + 8 * i for i in range(num_params)))
        self.kernel_params = ctypes.addressof(self._pointers)

    def launch(self, grid: int, block: int, values, stream) -> None:
        if len(values) != self.num_params:
            raise ValueError(f"{len(values)} launch values for a kernel of {self.num_params} parameters")
        self._slots[:] = values
        try:
            driver.launchKernel(self.function, grid, 1, 1, block, 1, 1, 0, stream.ptr, self.kernel_params, 0)
        except driver.CUDADriverError as e:
            if "CUDA_ERROR_INVALID_CONTEXT" not in str(e):
                raise
            # A thread whose first CUDA call this is has no current context yet (CuPy's own launches
            # make one first): the runtime makes it current, then the launch is made again.
            cupy.cuda.runtime.memGetInfo()
            driver.launchKernel(self.function, grid, 1, 1, block, 1, 1, 0, stream.ptr, self.kernel_params, 0)


def signal_amo() -> int:
    """1 when ``CUPY_EP_SIGNAL_AMO=1``: the NVSHMEM kernels signal with remote atomics
    (nvshmemx_signal_op, put-with-signal) instead of fenced 8-byte puts, for comparison; the
    atomics need a transport that has them (P2P, IBGDA; not UCX without GDRCopy)."""
    return int(os.environ.get("CUPY_EP_SIGNAL_AMO", "0") == "1")


class Engine:
    """Base of the engines.

    Args:
        comm: the communicator the engine's kernels span.
        status: the Buffer's :class:`cupy_ep.memory.StatusRecord`.
        timeout_ns: bound of every wait inside the kernels.
        chaos: compile the kernels with the test-only chaos pauses.
    """

    def __init__(self, comm, status, timeout_ns: int, chaos: bool = False):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.num_ranks = comm.Get_size()
        self.status = status
        self.status_arg = np.uint64(status.ptr)   # kernel argument (the record never moves)
        self.timeout_ns = np.uint64(timeout_ns)
        self.chaos = bool(chaos)
        self.profile = None   # a cupy_ep.profiling.Profile while Buffer.profile() runs
        # What compilation agrees over: the Buffer's cupy_ep.collective.CallSteps (bounded by
        # timeout_s), or None for a local call's kernels (compiled without talking).
        self.compile_comm = comm
        self._memo = {}       # per-call lookups by call shape (see _memoised)
        self._param_blocks = {}   # kernel -> its ParamBlock (_launch_values)

    def _module(self, filename: str, constants: dict, nvshmem: bool = False):
        constants = dict(constants, CHAOS=int(self.chaos))
        if nvshmem:
            constants["SIGNAL_AMO"] = signal_amo()
        key = (filename, tuple(sorted(constants.items())), nvshmem)
        module = _MODULES.get(key)
        if module is None:
            if nvshmem:
                module = jit.compile_module_nvshmem(filename, constants, comm=self.compile_comm)
            else:
                module = jit.compile_module(filename, constants, comm=self.compile_comm)
            _MODULES[key] = module
        if nvshmem:
            from .bootstrap import nvshmem_bind_module

            nvshmem_bind_module(module)
        return module

    def _memoised(self, key, build):
        """``build()`` once per ``key`` (a tuple of the call's shapes): the kernels and launch
        constants of a call shape, so that a repeated call builds no constant dict and looks up
        no function."""
        value = self._memo.get(key)
        if value is None:
            value = self._memo[key] = build()
        return value

    @staticmethod
    def _entry(module, name: str):
        """Kernel ``name`` of a loaded module as the ``cupy.cuda.Function`` that launches it on a
        given stream (no stream context switch per launch)."""
        return module.get_function(name).kernel

    def _launch(self, kernel, grid: int, block: int, args, stream, name: str = "") -> None:
        """Launches ``kernel`` (from :meth:`_entry`) on ``stream``; timed when profiling and named."""
        if name and self.profile is not None:
            with self.profile.kernel(name, stream):
                kernel((grid,), (block,), args, stream=stream)
        else:
            kernel((grid,), (block,), args, stream=stream)

    def _launch_values(self, kernel, grid: int, block: int, values: tuple, stream, name: str = "") -> None:
        """As :meth:`_launch`, with ``values`` plain ints (:func:`ptr` of each array) written into
        the kernel's :class:`ParamBlock`: the launch of the calls made again and again (layout,
        intranode dispatch and combine), without an argument object per parameter."""
        block_of = self._param_blocks.get(kernel)
        if block_of is None:
            block_of = self._param_blocks[kernel] = ParamBlock(kernel, len(values))
        if name and self.profile is not None:
            with self.profile.kernel(name, stream):
                block_of.launch(grid, block, values, stream)
        else:
            block_of.launch(grid, block, values, stream)

    def _phase(self, phase: str, stream) -> None:
        """A boundary of the profiled call in progress (:meth:`cupy_ep.profiling.Profile.phase`)."""
        if self.profile is not None:
            self.profile.phase(phase, stream)

    def _phase_buffer(self, kernel: str, num_blocks: int, names: dict, stream=None):
        """Pointer (np.uint64) of a checkpoint buffer for this launch, 0 when not profiling;
        zeroed on ``stream`` (the launch's, when it is not the current stream)."""
        if self.profile is None:
            return np.uint64(0)
        with nullcontext() if stream is None else stream:
            return np.uint64(self.profile.phase_buffer(kernel, num_blocks, names).data.ptr)
