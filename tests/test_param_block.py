"""cupy_ep.engine.ParamBlock without a GPU: each launch's values land in the slots that the
kernel-params pointers point at (an int's low half first: what cuLaunchKernel reads for an
``int`` parameter), a launch with the wrong number of values is refused, and a thread without a
current CUDA context gets one and the launch made again."""
import ctypes
import types

import numpy as np
import pytest

pytest.importorskip("cupy")

from cupy_ep import engine  # noqa: E402


class _DriverError(Exception):
    pass


@pytest.fixture
def launches(monkeypatch):
    made = []

    def launch_kernel(f, gx, gy, gz, bx, by, bz, shared_mem, stream, kernel_params, extra):
        pointers = (ctypes.c_uint64 * 3).from_address(kernel_params)
        made.append((f, gx, bx, stream, ctypes.c_int32.from_address(pointers[0]).value,
                     ctypes.c_uint64.from_address(pointers[1]).value, ctypes.c_int32.from_address(pointers[2]).value))

    monkeypatch.setattr(engine.driver, "launchKernel", launch_kernel)
    return made


def test_values_land_in_the_slots_the_kernel_reads(launches):
    block = engine.ParamBlock(types.SimpleNamespace(ptr=77), 3)
    stream = types.SimpleNamespace(ptr=5)
    block.launch(24, 1024, (-3, 0x7F00_0000_1000, np.int32(9)), stream)
    block.launch(1, 32, (4, np.uint64(2**40), 0), stream)
    assert launches == [(77, 24, 1024, 5, -3, 0x7F00_0000_1000, 9), (77, 1, 32, 5, 4, 2**40, 0)]
    with pytest.raises(ValueError, match="2 launch values for a kernel of 3 parameters"):
        block.launch(1, 32, (1, 2), stream)


def test_a_thread_without_a_context_gets_one_and_launches_again(monkeypatch):
    calls = []

    def launch_kernel(*args):
        calls.append("launch")
        if len(calls) == 1:
            raise _DriverError("CUDA_ERROR_INVALID_CONTEXT: invalid device context")

    monkeypatch.setattr(engine.driver, "CUDADriverError", _DriverError)
    monkeypatch.setattr(engine.driver, "launchKernel", launch_kernel)
    monkeypatch.setattr(engine.cupy.cuda.runtime, "memGetInfo", lambda: calls.append("context") or (0, 0))
    block = engine.ParamBlock(types.SimpleNamespace(ptr=1), 1)
    block.launch(1, 32, (0,), types.SimpleNamespace(ptr=0))
    assert calls == ["launch", "context", "launch"]

    def other_error(*args):
        raise _DriverError("CUDA_ERROR_INVALID_VALUE: invalid argument")

    monkeypatch.setattr(engine.driver, "launchKernel", other_error)
    with pytest.raises(_DriverError, match="INVALID_VALUE"):
        block.launch(1, 32, (0,), types.SimpleNamespace(ptr=0))
