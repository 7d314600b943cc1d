"""Exception types of cupy_ep, and the exception each device status report becomes.

Bad input raises ``ValueError`` / ``TypeError`` naming the argument (before any kernel starts
where the host can tell; otherwise at the first point the library can, see
:func:`status_error`). Runtime failures raise subclasses of :class:`CupyEpError`.
"""
from . import limits


class CupyEpError(RuntimeError):
    """Base class of the runtime errors cupy_ep raises (bad input raises ValueError/TypeError)."""


class CommTimeoutError(CupyEpError):
    """A wait for a peer rank (crashed, late, or it skipped a collective call) passed ``timeout_s``.

    Raised by a kernel (then the Buffer is unusable: destroy it and create another) or by a
    host-side step of a call (:mod:`cupy_ep.collective`: then nothing was sent and the Buffer
    stays usable).

    Attributes:
        kernel: name of the kernel or call that gave up.
        rank: the rank that gave up.
        peer: the rank it was waiting for (-1 when the wait was not on one peer).
        channel: the channel (block) that waited, or -1.
        peers: the ranks it was waiting for (``[peer]`` for a kernel's wait; for a host step,
            every rank that did not arrive, or the ranks that gave up waiting for this one).
        host: True when a host-side step gave up (the Buffer stays usable).
    """

    def __init__(self, kernel: str, rank: int, peer: int, detail: str = "", channel: int = -1, peers=None,
                 host: bool = False):
        self.kernel, self.rank, self.peer, self.channel, self.host = kernel, rank, peer, channel, host
        self.peers = list(peers) if peers is not None else ([peer] if peer >= 0 else [])
        if len(self.peers) > 1:
            who = "peer ranks " + ", ".join(map(str, self.peers))
        else:
            who = f"peer rank {peer}" if peer >= 0 else "other blocks or ranks"
        where = f" in channel {channel}" if channel >= 0 else ""
        msg = f"{kernel} on rank {rank} timed out{where} waiting for {who}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class CallMismatchError(CupyEpError):
    """The ranks made different collective calls at the same point (the call was cancelled).

    Every rank must make the same calls of a Buffer in the same order; a rank that skipped a
    call finds the others' next call here instead of its own.
    """


def peers_gave_up(call: str, rank: int, ranks, timeout_s: float) -> CommTimeoutError:
    """The error of a rank that arrived in ``call`` after ``ranks`` had stopped waiting for it."""
    ranks = sorted(ranks)
    error = CommTimeoutError(call, rank, ranks[0], peers=ranks, host=True)
    error.args = (f"{call} on rank {rank}: rank(s) {', '.join(map(str, ranks))} gave up waiting for this rank "
                  f"(timeout_s={timeout_s:g} s) before it arrived; the call was cancelled on every rank",)
    return error


class PeerRefusalError(ValueError):
    """The ``ValueError`` of a rank whose own input was fine, when other ranks refused theirs in a
    collective call (the call was cancelled on every rank). ``ranks``: those ranks."""

    def __init__(self, message: str, ranks=()):
        super().__init__(message)
        self.ranks = list(ranks)


def cancelled_by_peers(call: str, ranks, rank: int) -> PeerRefusalError:
    """The error of a rank whose own input was fine, when ``ranks`` refused theirs in ``call``."""
    ranks = sorted(ranks)
    who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
    return PeerRefusalError(f"{who} passed invalid input to {call}; the call was cancelled on every rank "
                            f"(seen on rank {rank})", ranks)


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
        return cancelled_by_peers(kernel, [peer], rank)
    return CupyEpError(f"{kernel} on rank {rank}: device status {status}")
