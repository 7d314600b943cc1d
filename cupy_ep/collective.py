"""Bounded, cancellable host-side exchanges between the ranks of a communicator.

Every host-side collective step of cupy_ep goes through a :class:`Channel`: the reference
backend's calls, and the GPU Buffer's host steps. A call is a :class:`Step` of two rounds:

1. ``agree``: every rank sends every other rank a header (the call's sequence number and
   name, "ok" or "refused", the values that must be equal everywhere, and small payloads).
   When all headers are in, every rank has seen the same facts and takes the same decision:
   a refusal on some rank makes that rank raise its own error and the others
   :func:`cupy_ep.errors.cancelled_by_peers`; differing values raise ``ValueError`` naming the
   argument; another call on a peer raises :class:`cupy_ep.errors.CallMismatchError`.
2. ``exchange`` (data for each peer) or ``finish`` (nothing): the second round, which is also
   each rank's confirmation that it got through the first. A rank that gave up in the first
   round sends "gave up" in its place, so a late rank learns it and raises too.

Each round waits at most ``timeout_s``; a rank that does not arrive makes the waiting ranks
raise :class:`cupy_ep.errors.CommTimeoutError` naming the call, with ``.peers`` the ranks that
did not arrive. Nothing is left half-done: the Buffer stays usable.

Why point-to-point messages, not MPI collectives: a collective that one rank abandons after a
timeout cannot be cancelled, and it would match the next collective of the late rank (another
call, maybe of another size: undefined behaviour in MPI). Here every message carries its
call's sequence number in its tag and in its body: a message of an abandoned call is never
taken for another call's, only dropped when it is found. The channel needs a communicator no
one else sends on (a ``Dup``).

This module imports mpi4py lazily and nothing of the GPU side.
"""
from __future__ import annotations

import time

from .errors import CallMismatchError, CommTimeoutError, cancelled_by_peers, peers_gave_up

__all__ = ["Channel", "Step", "dup_bounded"]

_HEADER, _SECOND = 0, 1          # the two rounds' message kinds (the low bit of the tag)
_OK, _GAVE_UP = "ok", "gave up"  # what a rank sends in the second round
_POLL_MAX_S = 1e-3               # longest sleep between polls of a wait


def _wait(test, deadline: float) -> bool:
    """Polls ``test()`` until it returns True (then True) or ``deadline`` passes (then False);
    sleeps between polls, longer as the wait goes on, so that waiting ranks leave the CPU to
    the ranks they wait for."""
    pause = 1e-6
    while not test():
        if time.monotonic() > deadline:
            return test()
        time.sleep(pause)
        pause = min(pause * 2, _POLL_MAX_S)
    return True


def dup_bounded(comm, timeout_s: float, what: str):
    """``comm.Idup()`` waited for at most ``timeout_s`` (collective over ``comm``).

    Raises:
        CommTimeoutError naming ``what`` when some rank did not arrive in time.
    """
    dup, request = comm.Idup()
    if not _wait(request.Test, time.monotonic() + timeout_s):
        raise CommTimeoutError(what, comm.Get_rank(), -1, f"not every rank arrived within timeout_s={timeout_s:g} s")
    return dup


class Channel:
    """Host-side exchanges among the ranks of ``comm``, each bounded by ``timeout_s``.

    Args:
        comm: an mpi4py intracommunicator used by this channel alone (a ``Dup``); the channel
            does not free it.
        timeout_s: the bound of each round of a step, in seconds.
    """

    def __init__(self, comm, timeout_s: float):
        from mpi4py import MPI

        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout_s = float(timeout_s)
        self._seq = 0
        self._sends = []                          # requests of sends not known to be complete
        self._tags = (int(comm.Get_attr(MPI.TAG_UB)) + 1) // 2
        self._any_source = MPI.ANY_SOURCE

    def step(self, call: str) -> "Step":
        """The next step, for the call named ``call`` (every rank must make the same steps)."""
        self._seq += 1
        self._sends = [r for r in self._sends if not r.Test()]
        return Step(self, call, self._seq)

    # -- messages ---------------------------------------------------------------------------
    def _tag(self, seq: int, kind: int) -> int:
        return (seq % self._tags) * 2 + kind

    def _send_all(self, seq: int, kind: int, bodies) -> None:
        """Sends ``bodies[r]`` to every other rank r (nonblocking)."""
        tag = self._tag(seq, kind)
        for r in range(self.size):
            if r != self.rank:
                self._sends.append(self.comm.isend((seq, kind, bodies[r]), dest=r, tag=tag))

    def _receive_all(self, seq: int, kind: int, timeout_s: float) -> dict:
        """``{rank: body}`` of the messages of step ``seq``, round ``kind``, from every other
        rank that sent one before the deadline; messages of earlier steps found on the way (a
        peer's abandoned step) are dropped."""
        from mpi4py import MPI

        tag, got = self._tag(seq, kind), {}
        status = MPI.Status()
        wanted = self.size - 1

        def poll():
            while True:
                msg = self.comm.improbe(self._any_source, tag, status)
                if msg is None:
                    return len(got) == wanted
                src = status.Get_source()
                msg_seq, msg_kind, body = msg.recv()
                if msg_seq == seq and msg_kind == kind:
                    got[src] = body
                # else: a message of an earlier step with the same tag (tags wrap): dropped

        _wait(poll, time.monotonic() + timeout_s)
        return got

    def _absent(self, got: dict) -> list:
        return [r for r in range(self.size) if r != self.rank and r not in got]


class Step:
    """One call's exchange on a :class:`Channel` (made by :meth:`Channel.step`)."""

    def __init__(self, channel: Channel, call: str, seq: int):
        self.channel, self.call, self.seq = channel, call, seq

    def validated(self, checks):
        """Runs this rank's argument checks ``checks()`` and returns what they returned. When they
        raise ``TypeError`` / ``ValueError``, this rank refuses the call in the first round: the
        error is raised here and the call is cancelled on every rank."""
        try:
            return checks()
        except (TypeError, ValueError) as e:
            self.agree(refusal=e)
            raise AssertionError("unreachable: agree raises a refusal")  # pragma: no cover

    def agree(self, common=(), private=None, payloads=None, refusal: BaseException | None = None):
        """The first round: every rank learns every rank's arguments and whether it refused them.

        Args:
            common: ``(arg, what, value)`` triples that must be equal on every rank.
            private: a picklable object every rank gets from every rank.
            payloads: None or a list (one per rank) of picklable objects: rank r gets the r-th.
            refusal: this rank's error for its arguments (the call is then cancelled).
        Returns:
            ``(privates, received)``: lists indexed by rank (``received[r]``: what rank r sent here).
        Raises:
            ``refusal`` on the rank that refused, :func:`cupy_ep.errors.cancelled_by_peers` on the
            others; ``ValueError`` naming the first ``common`` value that differs;
            :class:`CallMismatchError` when a peer is in another call;
            :class:`CommTimeoutError` when a peer did not arrive (after telling the others).
        """
        ch, me = self.channel, self.channel.rank
        values = tuple(v for _, _, v in common)
        mine = (self.call, refusal is not None, values, private)
        payloads = [None] * ch.size if payloads is None else list(payloads)
        ch._send_all(self.seq, _HEADER, [mine + (p,) for p in payloads])
        got = ch._receive_all(self.seq, _HEADER, ch.timeout_s)
        absent = ch._absent(got)
        if absent:
            ch._send_all(self.seq, _SECOND, [(_GAVE_UP, None)] * ch.size)
            raise CommTimeoutError(self.call, me, absent[0], f"did not arrive within timeout_s={ch.timeout_s:g} s; "
                                   "the call was cancelled on this rank", peers=absent)
        got[me] = mine + (payloads[me],)
        headers = [got[r] for r in range(ch.size)]
        other = [(r, h[0]) for r, h in enumerate(headers) if h[0] != self.call]
        if other:
            r, theirs = other[0]
            raise CallMismatchError(f"{self.call}: rank {r} made {theirs} as call {self.seq} of this Buffer while "
                                    f"rank {me} made {self.call}; every rank must make the same calls in the same "
                                    "order (the call was cancelled on this rank)")
        refused = [r for r, h in enumerate(headers) if h[1]]
        if refused:
            if refusal is not None:
                raise refusal
            raise cancelled_by_peers(self.call, refused, me)
        for i, (arg, what, _) in enumerate(common):
            by_rank = [h[2][i] for h in headers]
            if any(v != by_rank[0] for v in by_rank):
                raise ValueError(f"{arg}: {what} must be the same on every rank, got {by_rank} (by rank)")
        return [h[3] for h in headers], [h[4] for h in headers]

    def exchange(self, bodies):
        """The second round with data: ``bodies[r]`` (picklable) goes to rank r; returns the list,
        by source rank, of what each rank sent here (``bodies[self]`` for this rank)."""
        ch, me = self.channel, self.channel.rank
        ch._send_all(self.seq, _SECOND, [(_OK, b) for b in bodies])
        got = ch._receive_all(self.seq, _SECOND, ch.timeout_s)
        gave_up = [r for r, m in got.items() if m[0] == _GAVE_UP]
        if gave_up:
            raise peers_gave_up(self.call, me, gave_up, ch.timeout_s)
        absent = ch._absent(got)
        if absent:
            raise CommTimeoutError(self.call, me, absent[0], f"did not send its data within timeout_s="
                                   f"{ch.timeout_s:g} s", peers=absent)
        return [bodies[r] if r == me else got[r][1] for r in range(ch.size)]

    def finish(self) -> None:
        """The second round without data: every rank confirms it got through the first."""
        self.exchange([None] * self.channel.size)
