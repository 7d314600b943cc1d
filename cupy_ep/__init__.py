"""cupy_ep: expert-parallel (MoE) dispatch and combine for CuPy, DeepEP-compatible.

``cupy_ep.Buffer`` runs on GPUs (NVLink inside a host, NVSHMEM for the low-latency
mode) and needs the GPU extra (``pip install "cupy_ep[cuda13]"``); ``cupy_ep.reference``
runs the same contract in NumPy on CPUs with the plain install. Importing this package
never imports CuPy and needs no GPU: GPU-only parts fail when used, saying why.
"""
import importlib.util

from .bootstrap import finalize_nvshmem, gpu_available
from .config import Config
from .errors import CallMismatchError, CommTimeoutError, CompileError, CupyEpError, GPUUnavailableError, TokenOverflowError
from .event import EventOverlap
from .fp8 import per_token_cast_back, per_token_cast_to_fp8

__all__ = [
    "Buffer", "Config", "EventOverlap",
    "CupyEpError", "CallMismatchError", "CommTimeoutError", "CompileError", "GPUUnavailableError", "TokenOverflowError",
    "finalize_nvshmem", "gpu_available", "per_token_cast_to_fp8", "per_token_cast_back",
]
__version__ = "0.1.0"

GPU_STACK_MISSING = ('cupy_ep.Buffer needs the GPU stack: pip install "cupy_ep[cuda13]" '
                     '(the reference backend, cupy_ep.reference.Buffer, runs without it)')


def __getattr__(name):
    # The GPU Buffer is loaded on first use, so that a CPU-only install (no CuPy) imports
    # cupy_ep and its reference backend, and learns what to install when it asks for more.
    if name == "Buffer":
        if importlib.util.find_spec("cupy") is None:
            raise ImportError(GPU_STACK_MISSING)
        from .buffer import Buffer
        globals()["Buffer"] = Buffer
        return Buffer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
