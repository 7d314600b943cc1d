"""cupy_ep: expert-parallel (MoE) dispatch and combine for CuPy, DeepEP-compatible.

``cupy_ep.Buffer`` runs on GPUs (NVLink inside a host, NVSHMEM for the low-latency
mode); ``cupy_ep.reference`` runs the same contract in NumPy on CPUs. Importing
this package needs no GPU: GPU-only parts fail when used, saying why.
"""
from .bootstrap import finalize_nvshmem, gpu_available
from .buffer import Buffer
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
