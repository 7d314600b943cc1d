"""A GPU that does nothing: a normal-mode ``cupy_ep.Buffer``'s host code on a machine without one.

Inside ``with NullDevice(rows_received=...) as dev:`` the parts of CuPy that the intranode Buffer
and ``get_dispatch_layout`` use are host-only stand-ins:

* device memory: addresses in a range nobody dereferences, carried by real ``cupy.ndarray``
  objects (``cupy.empty``/``zeros``/``asarray``, ``cupy.cuda.alloc``), so that the Buffer's
  checks see the arrays they see on a GPU; no data is copied;
* host-mapped memory: real host memory (the host reads what the "kernels" write there);
* streams and events: objects that order nothing (a profiled call runs; its times mean nothing);
* kernels: compiled by nobody. A launch, through CuPy (``kernel(grid, block, args)``) or
  through the driver (``launchKernel`` with a parameter block, :class:`cupy_ep.engine.ParamBlock`),
  is read as the kernel's parameter list in ``kernels_cu`` says: as many arguments as parameters,
  and through CuPy each of the kind it declares (``int``: an ``np.int32``; ``u64``: an
  ``np.uint64``; a pointer: an array, None or an ``np.uint64`` address), which neither CuPy
  nor the driver checks. It is recorded in ``dev.launches`` as a :class:`Launch`. The notify
  kernel's one effect that the host waits for is played: ``rows_received`` rows,
  ``per_expert`` rows per local expert.

What a timed call measures here (``record=False``): the host's Python (checks, look-ups, handle
and output objects, launch values) and CuPy's array and scalar objects; not CuPy's memory pool,
the driver's launches or any kernel (``scripts/profile_call.py --null-device``; on a GPU host the same
script without the flag measures everything). One rank (``MPI.COMM_SELF``); not the NVSHMEM
modes.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import math
import re
import types
from dataclasses import dataclass

import numpy as np
from cupy._core._scalar import CScalar   # what CuPy makes of each scalar argument

_DEVICE_BASE = 0x7F00_0000_0000   # fake device addresses start here (never dereferenced)
_ALIGN = 512


@dataclass
class Launch:
    kernel: str
    grid: int
    block: int
    params: tuple   # the kernel's parameter names (kernels_cu)
    values: tuple   # per parameter: an address (of an array; None: 0) or the scalar's value

    def __getitem__(self, param: str) -> int:
        return self.values[self.params.index(param)]


_SIGNATURE = re.compile(r'extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')
_SCALAR_KINDS = {"int": np.int32, "u64": np.uint64}   # a parameter's type -> the NumPy type a launch passes


@functools.lru_cache(maxsize=None)
def kernel_signatures(filename: str) -> dict:
    """``{kernel: ((parameter name, kind), ...)}`` of the ``extern "C"`` kernels of a kernels_cu
    file; kinds: "ptr", "int", "u64" (any other type is refused: teach it here first)."""
    from cupy_ep import jit

    signatures = {}
    for name, params in _SIGNATURE.findall(jit.resolve_kernel(filename).read_text()):
        parsed = []
        for param in params.split(","):
            words = param.replace("*", " * ").split()
            kind = "ptr" if "*" in words else words[-2]
            if kind not in ("ptr", *_SCALAR_KINDS):
                raise ValueError(f"{filename}: {name}: parameter {param.strip()!r} of a type null_device does not know")
            parsed.append((words[-1], kind))
        signatures[name] = tuple(parsed)
    return signatures


class _Stream:
    def __init__(self, device, ptr: int):
        self._device, self.ptr = device, ptr

    def record(self, event=None):
        return _Event()

    def wait_event(self, event) -> None:
        pass

    def is_capturing(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        self._device.current.append(self)
        return self

    def __exit__(self, *exc):
        self._device.current.pop()
        return False


class _Event:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Kernel:
    """A ``cupy.cuda.Function`` stand-in: checks, converts and records each launch, whether
    CuPy's (``kernel(grid, block, args)``) or the driver's (``launchKernel`` on its ``ptr``)."""

    def __init__(self, device, name: str, signature: tuple):
        self._device, self.name, self._signature = device, name, signature
        self._params = tuple(p for p, _ in signature)
        self.ptr = device.register(self)

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if self._device.record:
            if len(args) != len(self._signature):
                raise TypeError(f"{self.name}: {len(args)} arguments for {len(self._signature)} parameters")
            values = [self._value(a, p, kind) for a, (p, kind) in zip(args, self._signature)]
            self._launched(grid[0], block[0], values, lambda param: values[self._params.index(param)])
            return
        for a in args:   # timing: CuPy's scalar objects, and what an effect reads
            if isinstance(a, np.generic):
                CScalar(a)
        self._launched(grid[0], block[0], None, lambda param: int(args[self._params.index(param)]))

    def launch_from_params(self, grid: int, block: int, kernel_params: int) -> None:
        """A driver launch: ``kernel_params`` is the address of one pointer per parameter, each
        to the parameter's value (as cuLaunchKernel reads them)."""
        slots = (ctypes.c_uint64 * len(self._signature)).from_address(kernel_params)

        def read(param: str) -> int:
            i = self._params.index(param)
            kind = self._signature[i][1]
            return (ctypes.c_int32 if kind == "int" else ctypes.c_uint64).from_address(slots[i]).value

        device = self._device
        values = [read(p) for p in self._params] if device.record else None   # timing: what an effect reads only
        self._launched(grid, block, values, read)

    def _launched(self, grid: int, block: int, values, read) -> None:
        device = self._device
        if device.record:
            device.launches.append(Launch(self.name, grid, block, self._params, tuple(values)))
        effect = device.effects.get(self.name)
        if effect is not None:
            effect(read)

    def _value(self, a, param: str, kind: str) -> int:
        """What CuPy passes for ``a`` (its conversion's cost included), if ``a`` suits the
        parameter: a pointer takes an array, None or an ``np.uint64`` address; ``int`` an
        ``np.int32``, ``u64`` an ``np.uint64`` (CuPy would pass any scalar at its own size)."""
        import cupy

        if kind == "ptr" and (a is None or isinstance(a, cupy.ndarray)):
            return 0 if a is None else a.data.ptr
        if type(a) is not _SCALAR_KINDS.get(kind, np.uint64):
            raise TypeError(f"{self.name}: parameter {param} ({kind}) given {type(a).__name__}")
        CScalar(a)
        return int(a)


class _Module:
    def __init__(self, device, filename: str):
        self._device, self._signatures = device, kernel_signatures(filename)

    def get_function(self, name: str):
        return types.SimpleNamespace(kernel=_Kernel(self._device, name, self._signatures[name]))


class NullDevice:
    """Replaces CuPy's device with host stand-ins while in a ``with`` block (see the module).

    Args:
        rows_received: the rows a non-cached dispatch's notify reports (what the host allocates).
        per_expert: rows per local expert it reports (a list; default: none).
        record: keep every launch in ``launches`` (off for timing: it costs an append).
    """

    def __init__(self, rows_received: int = 0, per_expert=(), record: bool = True):
        self.rows_received, self.per_expert = int(rows_received), per_expert
        self.record = record
        self.launches: list = []
        self.current: list = []
        self.effects = {"notify_dispatch": self._play_notify}
        self._kernels: dict = {}    # fake CUfunction handle -> _Kernel
        self._top = _DEVICE_BASE
        self._host: dict = {}       # host-mapped allocations by address: the ctypes buffer
        self._views: dict = {}      # host_out views by address (notify's effect)
        self._undo: list = []

    def register(self, kernel) -> int:
        handle = len(self._kernels) + 1
        self._kernels[handle] = kernel
        return handle

    def _launch_kernel(self, f, gx, gy, gz, bx, by, bz, shared_mem, stream, kernel_params, extra) -> None:
        """``cupy_backends.cuda.api.driver.launchKernel``'s stand-in."""
        if extra or (gy, gz, by, bz) != (1, 1, 1, 1):
            raise NotImplementedError("null_device: only 1-D launches with kernel_params")
        self._kernels[f].launch_from_params(gx, bx, kernel_params)

    # -- memory ---------------------------------------------------------------------------
    def _address(self, nbytes: int) -> int:
        """A fresh device address range of ``nbytes`` (never reused, never dereferenced)."""
        ptr = self._top
        self._top += -(-max(int(nbytes), 1) // _ALIGN) * _ALIGN
        return ptr

    def alloc(self, nbytes: int):
        from cupy.cuda import memory

        return memory.MemoryPointer(memory.UnownedMemory(self._address(nbytes), max(int(nbytes), 1), None, 0), 0)

    def empty(self, shape, dtype=np.float32, order="C"):
        import cupy

        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        dtype = np.dtype(dtype)
        return cupy.ndarray(shape, dtype, memptr=self.alloc(math.prod(shape) * dtype.itemsize))

    def asarray(self, a, dtype=None):
        a = np.asarray(a, dtype=dtype)
        return self.empty(a.shape, a.dtype)

    def host_alloc(self, nbytes: int, flags: int = 0) -> int:
        buf = (ctypes.c_uint8 * nbytes)()
        ptr = ctypes.addressof(buf)
        self._host[ptr] = buf
        return ptr

    def host_words(self, ptr: int, dtype, count: int) -> np.ndarray:
        """A NumPy view of host-mapped memory at ``ptr`` (what a kernel would write through)."""
        base = max(p for p in self._host if p <= ptr)
        return np.frombuffer(self._host[base], dtype=np.uint8)[ptr - base:].view(dtype)[:count]

    # -- the kernels' effects on the host -----------------------------------------------
    def _play_notify(self, read) -> None:
        """What notify_dispatch writes to host_out: the rows received and per-expert counts, then
        the call's sequence number (its ready_value)."""
        from cupy_ep import limits
        from cupy_ep.geometry import HOST_OUT_INTS

        ptr = read("host_out")
        host_out = self._views.get(ptr)
        if host_out is None:
            host_out = self._views[ptr] = self.host_words(ptr, np.int32, HOST_OUT_INTS)
        host_out[1], host_out[2] = self.rows_received, 0
        per_expert = np.asarray(self.per_expert, np.int32)
        host_out[limits.HOST_EXPERT:limits.HOST_EXPERT + len(per_expert)] = per_expert
        host_out[0] = read("ready_value")

    # -- installing -----------------------------------------------------------------------
    def _patch(self, owner, name: str, value) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __enter__(self):
        import cupy
        from cupy_backends.cuda.api import driver

        from cupy_ep import bootstrap, buffer, engine, jit, memory

        device = self
        runtime = cupy.cuda.runtime
        default = _Stream(self, 1)
        self.current = [default]
        for name, fn in dict(getDeviceCount=lambda: 1, hostAlloc=self.host_alloc, freeHost=lambda ptr: None,
                             malloc=self._address, free=lambda ptr: None, memset=lambda ptr, value, n: None,
                             deviceSynchronize=lambda: None, ipcGetMemHandle=lambda ptr: bytes(64)).items():
            self._patch(runtime, name, fn)
        streams = itertools.count(2)
        self._patch(cupy.cuda, "Stream", lambda non_blocking=False: _Stream(device, next(streams)))
        self._patch(cupy.cuda, "get_current_stream", lambda: device.current[-1])
        self._patch(cupy.cuda, "Event", _Event)
        self._patch(cupy.cuda, "Device", lambda device_id=0: types.SimpleNamespace(use=lambda: None, id=device_id))
        self._patch(cupy.cuda, "alloc", self.alloc)
        self._patch(cupy, "empty", self.empty)
        self._patch(cupy, "zeros", self.empty)
        self._patch(cupy, "asarray", self.asarray)
        self._patch(driver, "launchKernel", self._launch_kernel)
        self._patch(bootstrap, "_device_count", lambda: (1, ""))
        self._patch(bootstrap, "_allocation_base", lambda ptr: ptr)
        self._patch(jit, "compile_module", lambda filename, constants=None, **kw: _Module(device, filename))
        self._patch(engine, "_MODULES", {})   # the null modules are not kept for a real GPU later
        self._patch(buffer, "StatusRecord", _null_status_record(memory.StatusRecord))
        return self

    def __exit__(self, *exc):
        for owner, name, value in reversed(self._undo):
            setattr(owner, name, value)
        self._undo.clear()
        return False


def _null_status_record(real):
    """StatusRecord without its one device write (the host mirror's address)."""

    class NullStatusRecord(real):
        def __init__(self):
            import cupy

            from cupy_ep import limits
            from cupy_ep.memory import HostMapped

            self._mirror = HostMapped(limits.STATUS_RECORD_INTS * 4)
            self.fields = self._mirror.view(np.int32, limits.STATUS_RECORD_INTS)
            self._device = cupy.zeros(2, dtype=cupy.uint64)

    return NullStatusRecord
