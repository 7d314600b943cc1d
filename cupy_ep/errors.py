"""Exception types of cupy_ep, and the exception each device status report becomes.

Bad input raises ``ValueError`` / ``TypeError`` naming the argument (before any kernel starts
where the host can tell; otherwise at the first point the library can, see
:func:`status_error`). Runtime failures raise subclasses of :class:`CupyEpError`.
"""
from . import limits


class CupyEpError(RuntimeError):
    """Base class of the runtime errors cupy_ep raises (bad input raises ValueError/TypeError)."""


class CommTimeoutError(CupyEpError):
    """A kernel gave up waiting for a peer rank (crashed, or skipped a collective call).

    The Buffer is unusable afterwards: destroy it and create another.

    Attributes:
        kernel: name of the kernel that gave up.
        rank: the rank that gave up.
        peer: the rank it was waiting for (-1 when the wait was not on one peer).
        channel: the channel (block) that waited, or -1.
    """

    def __init__(self, kernel: str, rank: int, peer: int, detail: str = "", channel: int = -1):
        self.kernel, self.rank, self.peer, self.channel = kernel, rank, peer, channel
        who = f"peer rank {peer}" if peer >= 0 else "other blocks or ranks"
        where = f" in channel {channel}" if channel >= 0 else ""
        msg = f"{kernel} on rank {rank} timed out{where} waiting for {who}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class TokenOverflowError(CupyEpError, ValueError):
    """More rows arrived than the call could hold (``num_worst_tokens``, or the NVLink buffer).

    Rows past the limit were dropped, nothing else was written, and the Buffer stays usable;
    the outputs of that call are incomplete. Also a ``ValueError``: the argument was too small.

    Attributes:
        kernel, rank: where it was seen.
        arrived: rows that were sent to this rank.
        allowed: rows the output or buffer could hold.
    """

    def __init__(self, kernel: str, rank: int, arrived: int, allowed: int):
        self.kernel, self.rank, self.arrived, self.allowed = kernel, rank, arrived, allowed
        super().__init__(f"{kernel} on rank {rank}: {arrived} rows arrived, room for {allowed}; the rows past "
                         f"{allowed} were not received (raise num_worst_tokens or the buffer size)")


class CompileError(CupyEpError):
    """A kernel failed to compile on at least one rank (raised on every rank)."""


class GPUUnavailableError(CupyEpError):
    """A GPU-only part of cupy_ep was used where no usable GPU/CUDA driver exists."""


def status_error(status: int, kernel: str, rank: int, peer: int, detail: int, detail2: int,
                 channel: int) -> Exception:
    """The exception for a device status report (kernels_cu/status.cuh, cupy_ep.limits.ST_*)."""
    if status == limits.ST_TIMEOUT:
        return CommTimeoutError(kernel, rank, peer, "the Buffer must be destroyed and recreated", channel)
    if status == limits.ST_OVERFLOW:
        return TokenOverflowError(kernel, rank, detail, detail2)
    if status == limits.ST_BAD_EXPERT:
        return ValueError(f"topk_idx: expert id {detail} of token {detail2} is outside [-1, num_experts) "
                          f"(seen by {kernel} on rank {rank}; that call's outputs are invalid)")
    if status == limits.ST_BAD_LAYOUT:
        what = {0: "num_tokens_per_rank does not match is_token_in_rank",
                1: "is_token_in_rank does not match topk_idx",
                2: "num_tokens_per_expert does not match topk_idx",
                3: "num_tokens_per_rdma_rank does not match is_token_in_rank"}.get(detail, "layout arrays disagree")
        return ValueError(f"{what} (seen by {kernel} on rank {rank}; use get_dispatch_layout; that call's "
                          "outputs are invalid)")
    if status == limits.ST_PEER_BAD_INPUT:
        return ValueError(f"rank {peer} passed invalid routing to {kernel}; the call was cancelled on every rank "
                          f"(seen on rank {rank})")
    return CupyEpError(f"{kernel} on rank {rank}: device status {status}")
