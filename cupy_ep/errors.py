"""Exception types of cupy_ep and the kernel ids used in device error records."""


class CupyEpError(RuntimeError):
    """Base class of the runtime errors cupy_ep raises (bad input raises ValueError/TypeError)."""


class CommTimeoutError(CupyEpError):
    """A kernel gave up waiting for a peer rank (crashed, or skipped a collective call).

    Attributes:
        kernel: name of the kernel that gave up.
        rank: the rank that gave up.
        peer: the rank it was waiting for (-1 when the wait was not on one peer).
    """

    def __init__(self, kernel: str, rank: int, peer: int, detail: str = ""):
        self.kernel, self.rank, self.peer = kernel, rank, peer
        who = f"peer rank {peer}" if peer >= 0 else "other blocks or ranks"
        msg = f"{kernel} on rank {rank} timed out waiting for {who}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class CompileError(CupyEpError):
    """A kernel failed to compile on at least one rank (raised on every rank)."""


class GPUUnavailableError(CupyEpError):
    """A GPU-only part of cupy_ep was used where no usable GPU/CUDA driver exists."""


# Kernel ids written into ErrorRecord.kernel by the device code (common.cuh).
KERNEL_NAMES = {
    1: "notify_dispatch",
    2: "intranode_dispatch",
    3: "intranode_combine",
    4: "cached_notify",
    5: "low_latency_dispatch",
    6: "low_latency_combine",
    7: "barrier",
}
KERNEL_IDS = {name: kid for kid, name in KERNEL_NAMES.items()}
