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
one else sends on (a ``Dup``: :func:`open_channel`). MPI reuses a freed communicator's context
for a later ``Dup``, and a message sent on the old one that nobody received is then delivered on
the new one; so every message also carries its channel's nonce, agreed when the channel opens.

The GPU Buffer's calls make no host step unless they compile: :class:`CallSteps` numbers the
steps after the call (counted on every rank, valid or not) instead of after the steps made.

This module imports mpi4py lazily and nothing of the GPU side.
"""
from __future__ import annotations

import os
import time

from .errors import CallMismatchError, CommTimeoutError, CupyEpError, cancelled_by_peers, peers_gave_up

__all__ = ["CallSteps", "Channel", "Step", "dup_bounded", "failures", "open_channel"]

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


def failures(comm, message) -> dict:
    """``{rank: message}`` of the ranks whose ``message`` is not None (collective): every rank
    learns which ranks failed a step, and why. Over a :class:`CallSteps`, the gather is a step
    bounded by ``timeout_s``; over an mpi4py communicator, an ``allgather``."""
    return {r: m for r, m in enumerate(comm.allgather(message)) if m is not None}


def dup_bounded(comm, timeout_s: float, what: str):
    """``comm.Idup()`` waited for at most ``timeout_s`` (collective over ``comm``).

    Raises:
        CommTimeoutError naming ``what`` when some rank did not arrive in time.
    """
    dup, request = comm.Idup()
    if not _wait(request.Test, time.monotonic() + timeout_s):
        raise CommTimeoutError(what, comm.Get_rank(), -1, f"not every rank arrived within timeout_s={timeout_s:g} s",
                               host=True)
    return dup


def _agreed_nonce(comm, timeout_s: float, what: str) -> int:
    """Rank 0's random 64-bit number on every rank of ``comm``, within ``timeout_s``."""
    from mpi4py import MPI

    nonce = bytearray(os.urandom(8))
    request = comm.Ibcast([nonce, MPI.BYTE], root=0)
    if not _wait(request.Test, time.monotonic() + timeout_s):
        raise CommTimeoutError(what, comm.Get_rank(), 0, f"rank 0 did not arrive within timeout_s={timeout_s:g} s",
                               host=True)
    return int.from_bytes(nonce, "little")


def open_channel(comm, timeout_s: float, what: str) -> "Channel":
    """A :class:`Channel` over a ``Dup`` of ``comm`` with a nonce of its own (collective over
    ``comm``; both made within ``timeout_s``, ``what`` names them in the error). The caller frees
    ``channel.comm``.

    Raises:
        CommTimeoutError naming ``what`` when some rank did not arrive in time.
    """
    dup = dup_bounded(comm, timeout_s, what)
    try:
        return Channel(dup, timeout_s, _agreed_nonce(dup, timeout_s, what))
    except BaseException:
        dup.Free()
        raise


class Channel:
    """Host-side exchanges among the ranks of ``comm``, each bounded by ``timeout_s``.

    Args:
        comm: an mpi4py intracommunicator used by this channel alone (a ``Dup``); the channel
            does not free it.
        timeout_s: the bound of each round of a step, in seconds.
        nonce: this channel's number, the same on every rank (:func:`open_channel`): messages
            carrying another number (of a freed channel whose context MPI reused) are dropped.
    """

    def __init__(self, comm, timeout_s: float, nonce: int = 0):
        from mpi4py import MPI

        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout_s = float(timeout_s)
        self.nonce = nonce
        self._seq = 0
        self._sends = []                          # requests of sends not known to be complete
        self._tags = (int(comm.Get_attr(MPI.TAG_UB)) + 1) // 2
        self._any_source = MPI.ANY_SOURCE

    def step(self, call: str, peers=None) -> "Step":
        """The next step, for the call named ``call`` (every rank must make the same steps).
        ``peers``: None (every rank; a rank that does not arrive fails the step), or the ranks
        this step talks to (this rank included): a peer that does not arrive is left out of
        the step's later rounds and listed in ``step.absent`` instead of failing it (shrink mode)."""
        self._seq += 1
        self._sends = [r for r in self._sends if not r.Test()]
        return Step(self, call, self._seq, peers=peers)

    @property
    def seq(self) -> int:
        """The number of the last step :meth:`step` gave."""
        return self._seq

    def resume_at(self, seq: int) -> None:
        """Numbers the next steps after ``seq`` (ranks whose counts drifted apart, because some
        skipped calls, agree on a number and resume there)."""
        self._seq = int(seq)

    def step_at(self, call: str, seq: int, name: str = "", peers=None) -> "Step":
        """The step numbered ``seq`` (> every number :meth:`step` gave, or < 0: a series of its
        own), for the call named ``call``; errors name it ``name`` (default: ``call``);
        ``peers`` as in :meth:`step`."""
        self._sends = [r for r in self._sends if not r.Test()]
        return Step(self, call, seq, name, peers=peers)

    # -- messages ---------------------------------------------------------------------------
    def _tag(self, seq: int, kind: int) -> int:
        return (seq % self._tags) * 2 + kind

    def _send_all(self, seq: int, kind: int, bodies, peers=None) -> None:
        """Sends ``bodies[r]`` to every other rank r (of ``peers``, None: all; nonblocking)."""
        tag = self._tag(seq, kind)
        for r in range(self.size) if peers is None else peers:
            if r != self.rank:
                self._sends.append(self.comm.isend((self.nonce, seq, kind, bodies[r]), dest=r,
                                                   tag=tag))

    def _receive_all(self, seq: int, kind: int, timeout_s: float, waited=None, peers=None) -> dict:
        """``{rank: body}`` of the messages of step ``seq``, round ``kind``, from every other
        rank (of ``peers``, None: all) that sent one before the deadline; messages of earlier
        steps found on the way (a peer's abandoned step), of another channel and of ranks not
        in ``peers`` are dropped. ``waited[r]`` (a list) grows by the seconds from the start of
        this round until rank r's message was found."""
        from mpi4py import MPI

        tag, got = self._tag(seq, kind), {}
        start = time.monotonic()
        status = MPI.Status()
        senders = set(range(self.size) if peers is None else peers) - {self.rank}
        wanted = len(senders)

        def poll():
            while True:
                msg = self.comm.improbe(self._any_source, tag, status)
                if msg is None:
                    return len(got) == wanted
                src = status.Get_source()
                msg_nonce, msg_seq, msg_kind, body = msg.recv()
                if (msg_nonce, msg_seq, msg_kind) == (self.nonce, seq, kind) and src in senders:
                    got[src] = body
                    if waited is not None:
                        waited[src] += time.monotonic() - start
                # else: of an earlier step with the same tag (tags wrap) or another channel: dropped

        _wait(poll, time.monotonic() + timeout_s)
        return got

    def _absent(self, got: dict, peers=None) -> list:
        return [r for r in (range(self.size) if peers is None else peers) if r != self.rank and r not in got]


class Step:
    """One call's exchange on a :class:`Channel` (made by :meth:`Channel.step`)."""

    def __init__(self, channel: Channel, call: str, seq: int, name: str = "", peers=None):
        self.channel, self.call, self.seq = channel, call, seq
        self.name = name or call   # the step in error messages
        self.shrink = peers is not None   # absent peers are left out instead of failing the step
        self.peers = sorted(set(peers) | {channel.rank}) if self.shrink else None   # None: every rank
        self.absent = set()        # shrink: the peers that did not arrive in some round
        self.waited_s = [0.0] * channel.size   # per rank: seconds this step waited for its messages

    def validated(self, checks):
        """Runs this rank's argument checks ``checks()`` and returns what they returned. When they
        raise ``TypeError`` / ``ValueError``, this rank refuses the call in the first round: the
        error is raised here and the call is cancelled on every rank."""
        try:
            return checks()
        except (TypeError, ValueError) as e:
            self.agree(refusal=e)
            raise AssertionError("unreachable: agree raises a refusal")  # pragma: no cover

    def refuse_now(self) -> None:
        """Tells every peer that this rank refused the call, without waiting for theirs: both
        rounds' messages of a refusal, so that a peer in this step raises at once."""
        ch = self.channel
        ch._send_all(self.seq, _HEADER, [(self.call, True, (), None, None)] * ch.size)
        ch._send_all(self.seq, _SECOND, [(_GAVE_UP, None)] * ch.size)

    def agree(self, common=(), private=None, payloads=None, refusal: BaseException | None = None):
        """The first round: every rank learns every rank's arguments and whether it refused them.

        Args:
            common: ``(arg, what, value)`` triples that must be equal on every rank.
            private: a picklable object every rank gets from every rank.
            payloads: None or a list (one per rank) of picklable objects: rank r gets the r-th.
            refusal: this rank's error for its arguments (the call is then cancelled).
        Returns:
            ``(privates, received)``: lists indexed by rank (``received[r]``: what rank r sent here;
            None from a rank outside a shrink step or absent from it).
        Raises:
            ``refusal`` on the rank that refused, :func:`cupy_ep.errors.cancelled_by_peers` on the
            others; ``ValueError`` naming the first ``common`` value that differs;
            :class:`CallMismatchError` when a peer is in another call;
            :class:`CommTimeoutError` when a peer did not arrive (after telling the others; a
            shrink step lists it in ``absent`` instead).
        """
        ch, me = self.channel, self.channel.rank
        values = tuple(v for _, _, v in common)
        mine = (self.call, refusal is not None, values, private)
        payloads = [None] * ch.size if payloads is None else list(payloads)
        live = self._live()
        ch._send_all(self.seq, _HEADER, [mine + (p,) for p in payloads], live)
        got = ch._receive_all(self.seq, _HEADER, ch.timeout_s, self.waited_s, live)
        absent = ch._absent(got, live)
        if absent and self.shrink:
            self.absent.update(absent)
        elif absent:
            ch._send_all(self.seq, _SECOND, [(_GAVE_UP, None)] * ch.size)
            raise CommTimeoutError(self.name, me, absent[0], f"did not arrive within timeout_s={ch.timeout_s:g} s; "
                                   "the call was cancelled on this rank", peers=absent, host=True)
        got[me] = mine + (payloads[me],)
        headers = [got.get(r) for r in range(ch.size)]
        other = [(r, h[0]) for r, h in enumerate(headers) if h is not None and h[0] != self.call]
        if other:
            r, theirs = other[0]
            raise CallMismatchError(f"{self.name}: rank {r} made {theirs} as call {self.seq} of this Buffer while "
                                    f"rank {me} made {self.call}; every rank must make the same calls in the same "
                                    "order (the call was cancelled on this rank)")
        refused = [r for r, h in enumerate(headers) if h is not None and h[1]]
        if refused:
            if refusal is not None:
                raise refusal
            raise cancelled_by_peers(self.name, refused, me)
        for i, (arg, what, _) in enumerate(common):
            by_rank = [h[2][i] for h in headers if h is not None]
            if any(v != by_rank[0] for v in by_rank):
                raise ValueError(f"{arg}: {what} must be the same on every rank, got {by_rank} (by rank)")
        return [None if h is None else h[3] for h in headers], [None if h is None else h[4] for h in headers]

    def _live(self):
        """The ranks this step still talks to (None: every rank)."""
        return None if self.peers is None else [r for r in self.peers if r not in self.absent]

    def exchange(self, bodies):
        """The second round with data: ``bodies[r]`` (picklable) goes to rank r; returns the list,
        by source rank, of what each rank sent here (``bodies[self]`` for this rank; None from a
        rank outside a shrink step or absent from it, which joins ``absent``)."""
        ch, me = self.channel, self.channel.rank
        live = self._live()
        ch._send_all(self.seq, _SECOND, [(_OK, b) for b in bodies], live)
        got = ch._receive_all(self.seq, _SECOND, ch.timeout_s, self.waited_s, live)
        gave_up = [r for r, m in got.items() if m[0] == _GAVE_UP]
        if gave_up and not self.shrink:
            raise peers_gave_up(self.name, me, gave_up, ch.timeout_s)
        absent = ch._absent(got, live)
        if absent and not self.shrink:
            raise CommTimeoutError(self.name, me, absent[0], f"did not send its data within timeout_s="
                                   f"{ch.timeout_s:g} s", peers=absent, host=True)
        self.absent.update(absent + gave_up)
        return [bodies[r] if r == me else None if r in self.absent or r not in got else got[r][1]
                for r in range(ch.size)]

    def finish(self) -> None:
        """The second round without data: every rank confirms it got through the first."""
        self.exchange([None] * self.channel.size)


class CallSteps:
    """The host steps inside the collective calls of a GPU Buffer, on a :class:`Channel`.

    A GPU call makes a host step only when it compiles a kernel shape new to the process, so the
    steps cannot be numbered in the order they are made: a rank whose arguments were refused
    makes none. Instead every rank counts the Buffer's collective calls (:meth:`begin`, valid or
    not: every rank makes the same calls) and numbers the steps of call n after n. A rank whose
    arguments fail validation tells the peers at once (:meth:`refuse`), in the place of the
    call's first step: a peer that makes a step in that call raises ``ValueError`` naming it,
    a peer that makes none never reads the message.

    Quacks like a communicator for :func:`failures` and :func:`cupy_ep.jit.compile_module`'s
    ``comm`` (``allgather``, ``Get_rank``, ``Get_size``).

    Args:
        channel: the steps' :class:`Channel`, or None: a communicator without point-to-point
            messages (``cupy_ep.torch_comm.TorchComm``), whose ``allgather`` makes the steps
            (bounded by its own timeout, not ``timeout_s``; refusals are not told).
        comm: that communicator, when ``channel`` is None.
    """

    STEPS_PER_CALL = 64   # host steps one call may make (compile agreements)

    def __init__(self, channel: Channel | None, comm=None):
        self.channel, self._comm = channel, comm
        self.call, self._calls, self._steps = "", 0, 0
        self._rejoins = 0   # rejoin() steps made (numbers them, in a series of their own)

    @classmethod
    def over(cls, comm, timeout_s: float, what: str) -> "CallSteps":
        """The host steps of an object that spans ``comm`` (collective): over a ``Dup`` of an
        mpi4py communicator, made within ``timeout_s`` (:func:`open_channel`; ``what`` names it
        in the error), else over ``comm`` itself."""
        if not hasattr(comm, "Idup"):
            return cls(None, comm)
        return cls(open_channel(comm, timeout_s, what))

    def free(self) -> None:
        """Frees the channel's communicator (collective)."""
        if self.channel is not None:
            self.channel.comm.Free()

    def Get_rank(self) -> int:  # noqa: N802 -- the mpi4py name
        return self._comm.Get_rank() if self.channel is None else self.channel.rank

    def Get_size(self) -> int:  # noqa: N802
        return self._comm.Get_size() if self.channel is None else self.channel.size

    def begin(self, call: str) -> "CallSteps":
        """Counts a collective call named ``call`` (at its start, before its arguments are checked)
        and returns this object, a context manager for the call's argument checks: when the
        ``with`` block raises TypeError / ValueError, :meth:`refuse` tells the peers first."""
        self.call, self._calls, self._steps = call, self._calls + 1, 0
        return self

    def __enter__(self) -> "CallSteps":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None and issubclass(kind, (TypeError, ValueError)):
            self.refuse()
        return False

    def _next(self, what: str, peers=None) -> Step:
        if self._steps == self.STEPS_PER_CALL:
            raise CupyEpError(f"{self.call}: more than {self.STEPS_PER_CALL} host steps in one call")
        seq = self._calls * self.STEPS_PER_CALL + self._steps
        self._steps += 1
        return self.channel.step_at(self.call, seq, f"{self.call} ({what})" if what else self.call, peers=peers)

    def agree_arguments(self, call: str, refusal: BaseException | None) -> None:
        """Counts the collective call ``call`` and makes its one step: whether some rank refused its
        arguments (``refusal``: this rank's error, or None), within ``timeout_s``. For a call whose
        arguments must be agreed before its first collective (the Buffer's construction).

        Raises:
            ``refusal`` on the rank that refused, ``ValueError`` naming the refusing ranks on the
            others; :class:`CommTimeoutError` when a peer did not arrive in time.
        """
        self.begin(call)
        if self.channel is None:
            refused = [r for r, bad in enumerate(self._comm.allgather(refusal is not None)) if bad]
            if refused:
                raise refusal if refusal is not None else cancelled_by_peers(call, refused, self.Get_rank())
            return
        step = self._next("")
        step.agree(refusal=refusal)
        step.finish()

    def refuse(self) -> None:
        """Tells the peers that this rank refused the current call's arguments (no wait; before
        any step of the call)."""
        if self.channel is not None:
            self._next("").refuse_now()

    def allgather(self, obj, what: str = "compile agreement") -> list:
        """Every rank's ``obj`` (a step of two rounds, each bounded by ``timeout_s``).

        Raises:
            ``ValueError`` naming the rank(s) that refused the call; :class:`CommTimeoutError`
            (``.peers``: the ranks that did not arrive) when a peer did not arrive in time.
        """
        if self.channel is None:
            return self._comm.allgather(obj)
        step = self._next(what)
        privates, _ = step.agree(private=obj)
        step.finish()
        return privates

    def present(self, peers, what: str = "barrier") -> set:
        """A step among ``peers`` (ranks, this one included) in which a peer that does not arrive
        within ``timeout_s`` is left out instead of failing it (shrink mode): returns the ranks
        left out. Without a channel, every rank of the communicator takes part (none is left out)."""
        if self.channel is None:
            self._comm.allgather(None)
            return set()
        step = self._next(what, peers=peers)
        step.agree()
        step.finish()
        return set(step.absent)

    def rejoin(self, call: str, between) -> set:
        """Brings every rank back into step for the call named ``call`` (collective over all
        ranks, in a series of steps of its own: ranks that skipped calls have counted fewer):
        the first round agrees how many calls each rank counted, ``between()`` runs, the second
        round confirms it ran everywhere, and every rank resumes counting after the largest
        count. A rank that does not arrive is left out; returns the ranks left out."""
        self._rejoins += 1
        if self.channel is None:
            counts = self._comm.allgather(self._calls)
            between()
            self._comm.allgather(None)
            self._calls = max(counts)
            return set()
        step = self.channel.step_at(call, -self._rejoins, peers=range(self.channel.size))
        counts, _ = step.agree(private=self._calls)
        between()
        step.finish()
        self._calls = max(c for c in counts if c is not None)
        return set(step.absent)
