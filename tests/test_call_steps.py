"""The GPU Buffer's host steps (cupy_ep.collective.CallSteps), without a GPU or MPI: ranks are
threads over a fake communicator whose point-to-point messages really travel between them.

Checked: the compile agreement of a call is bounded by timeout_s (an absent rank makes the
others raise CommTimeoutError with ``.peers``, and nothing is cached), a rank that refused its
arguments makes the peers that compile raise ValueError naming it at once (before they
compile), and the calls after
either of them agree again (the call count keeps the ranks' steps matched). Shrink mode's host
steps: a rank absent from a barrier is left out and masked, and the rejoin brings the ranks'
call counts back together."""

import pickle
import threading
import time
import types

import numpy as np
import pytest

from cupy_ep import engine, jit
from cupy_ep.collective import CallSteps, Channel
from cupy_ep.errors import CommTimeoutError, CompileError

TIMEOUT_S = 0.5


class Mailboxes:
    """The messages in flight between the ranks of one fake communicator."""

    def __init__(self, size):
        self.size = size
        self.lock = threading.Lock()
        self.queues = [[] for _ in range(size)]   # per destination: (source, tag, pickled body)


class Done:
    def Test(self):
        return True


class Message:
    def __init__(self, body):
        self.body = body

    def recv(self):
        return pickle.loads(self.body)


class P2PComm:
    """A rank's handle: isend / improbe as mpi4py's (FIFO per source and tag)."""

    def __init__(self, boxes, rank):
        self.boxes, self.rank = boxes, rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.boxes.size

    def Get_attr(self, key):
        return 1 << 20

    def isend(self, obj, dest, tag):
        with self.boxes.lock:
            self.boxes.queues[dest].append((self.rank, tag, pickle.dumps(obj)))
        return Done()

    def improbe(self, source, tag, status):
        with self.boxes.lock:
            queue = self.boxes.queues[self.rank]
            for i, (src, t, body) in enumerate(queue):
                if t == tag:
                    del queue[i]
                    status.Set_source(src)
                    return Message(body)
        return None


def run_ranks(*mains, size=None):
    """Runs ``mains[r](steps)`` for each rank r in a thread; returns what each returned or raised
    and how long it took."""
    size = size or len(mains)
    boxes = Mailboxes(size)
    results = [None] * size

    def rank_main(rank):
        steps = CallSteps(Channel(P2PComm(boxes, rank), TIMEOUT_S))
        t0 = time.monotonic()
        try:
            out = mains[rank](steps)
        except Exception as e:  # noqa: BLE001 -- reported to the test
            out = e
        results[rank] = (out, time.monotonic() - t0)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a rank is still running"
    return results


def call(steps, name, obj, refuse=False):
    """One collective call: its checks, then (unless refused) a compile agreement."""
    with steps.begin(name):
        if refuse:
            raise ValueError(f"x: bad on rank {steps.Get_rank()}")
    return steps.allgather(obj)


def outcome(steps, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return e


def test_every_rank_gets_every_rank_object():
    results = run_ranks(*[lambda s: [call(s, "dispatch", s.Get_rank()), call(s, "combine", -s.Get_rank())]] * 3)
    assert [out for out, _ in results] == [[[0, 1, 2], [0, -1, -2]]] * 3


def test_an_absent_rank_times_out_the_others_and_the_next_call_agrees():
    arrived = threading.Event()

    def present(s):
        first = outcome(s, lambda: call(s, "dispatch", 0))
        arrived.wait(30)
        return first, call(s, "combine", "ok")

    def late(s):
        time.sleep(TIMEOUT_S * 3)   # arrives after the others gave up
        first = outcome(s, lambda: call(s, "dispatch", 1))
        arrived.set()
        return first, call(s, "combine", "ok")

    (early, t_early), (slow, _) = run_ranks(present, late)
    assert isinstance(early[0], CommTimeoutError) and early[0].peers == [1] and early[0].host, early[0]
    assert "dispatch (compile agreement) on rank 0" in str(early[0])
    assert TIMEOUT_S <= t_early
    # the late rank learns that rank 0 gave up; both agree on the next call
    assert isinstance(slow[0], CommTimeoutError) and slow[0].peers == [0] and "gave up" in str(slow[0]), slow[0]
    assert early[1] == slow[1] == ["ok", "ok"]


def test_a_refused_rank_cancels_the_call_on_the_others_at_once():
    def good(s):
        first = outcome(s, lambda: call(s, "low_latency_dispatch", 0))
        return first, call(s, "low_latency_dispatch", s.Get_rank())

    def bad(s):
        first = outcome(s, lambda: call(s, "low_latency_dispatch", 1, refuse=True))
        return first, call(s, "low_latency_dispatch", s.Get_rank())

    results = run_ranks(good, bad, good)
    for rank in (0, 2):
        (first, second), took = results[rank]
        assert isinstance(first, ValueError) and "rank 1 passed invalid input to low_latency_dispatch" in str(first)
        assert second == [0, 1, 2]
        assert took < TIMEOUT_S, took   # promptly, not after a timeout
    (first, second), _ = results[1]
    assert str(first) == "x: bad on rank 1" and second == [0, 1, 2]


def test_a_refusal_is_learnt_before_anything_compiles():
    """The refusing rank's cancelled part waits on the device for its peers' kernels: a peer
    must not compile (maybe for longer than timeout_s) before it learns of the refusal."""
    built = []

    def good(s):
        with s.begin("low_latency_dispatch"):
            pass
        return outcome(s, lambda: jit._agree(s, "compiling low_latency.cu", lambda: built.append(s.Get_rank())))

    results = run_ranks(good, lambda s: outcome(s, lambda: call(s, "low_latency_dispatch", 1, refuse=True)))
    assert isinstance(results[0][0], ValueError) and "rank 1 passed invalid input" in str(results[0][0])
    assert built == []


def test_a_refusal_that_no_peer_reads_leaves_the_later_calls_matched():
    """The good rank's first call makes no host step (its kernels were compiled); the refusal
    it never read does not disturb the compile agreement of the next call."""
    def good(s):
        with s.begin("combine"):
            pass
        return call(s, "dispatch", "a")

    def bad(s):
        outcome(s, lambda: call(s, "combine", None, refuse=True))
        return call(s, "dispatch", "b")

    assert [out for out, _ in run_ranks(good, bad)] == [["a", "b"]] * 2


def test_different_calls_raise_call_mismatch():
    results = run_ranks(lambda s: outcome(s, lambda: call(s, "dispatch", 0)),
                        lambda s: outcome(s, lambda: call(s, "combine", 0)))
    assert all(type(out).__name__ == "CallMismatchError" for out, _ in results), results


def test_compile_agreement_over_call_steps_names_the_failing_rank():
    def compile_on(s):
        with s.begin("dispatch"):
            pass

        def build():
            if s.Get_rank() == 1:
                raise RuntimeError("nvrtc: GOOD must be 1")
            return "module"

        return outcome(s, lambda: jit._agree(s, "compiling intranode.cu", build))

    results = run_ranks(compile_on, compile_on)
    for out, _ in results:
        assert isinstance(out, CompileError) and out.ranks == [1], out
        assert "compiling intranode.cu failed on rank(s) 1 of 2" in str(out) and "GOOD must be 1" in str(out)


def test_a_module_whose_agreement_timed_out_is_not_kept(monkeypatch):
    """Else the absent rank, compiling it later, would agree alone while the others launch."""
    monkeypatch.setattr(engine, "_MODULES", {})
    monkeypatch.setattr(engine.jit, "compile_module",
                        lambda filename, constants, comm: jit._agree(comm, f"compiling {filename}", lambda: filename))

    def compiling(s):
        eng = engine.Engine(s, types.SimpleNamespace(ptr=0), 1)
        eng.compile_comm = s
        with s.begin("dispatch"):
            pass
        return outcome(s, lambda: eng._module("a.cu", {}))

    (out, _), _ = run_ranks(compiling, lambda s: None)
    assert isinstance(out, CommTimeoutError) and out.peers == [1], out
    assert engine._MODULES == {}
    (out, _), _ = run_ranks(compiling, compiling)
    assert out == "a.cu" and len(engine._MODULES) == 1


def test_a_host_step_timeout_leaves_the_buffer_usable():
    pytest.importorskip("cupy")
    from cupy_ep.buffer import Buffer

    buf = object.__new__(Buffer)
    buf._broken = None

    def timed_out(host):
        raise CommTimeoutError("dispatch", 0, 1, host=host)

    with pytest.raises(CommTimeoutError):
        buf._guarded(lambda: timed_out(True))
    assert buf._broken is None
    with pytest.raises(CommTimeoutError):
        buf._guarded(lambda: timed_out(False))
    assert buf._broken is not None


def test_over_a_communicator_without_messages_the_steps_are_its_allgather():
    """cupy_ep.torch_comm.TorchComm has no point-to-point messages: its own collectives serve."""
    class Gathering:
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 1

        def allgather(self, obj):
            return [obj]

    steps = CallSteps.over(Gathering(), TIMEOUT_S, "Buffer")
    with pytest.raises(ValueError, match="bad"):
        with steps.begin("dispatch"):
            raise ValueError("bad")
    assert steps.allgather("module") == ["module"] and steps.Get_size() == 1
    steps.free()


def test_a_freed_channels_unread_refusal_does_not_reach_the_next_channel():
    """Over real MPI (tests/mpi/check_channel.py): MPI reuses a freed communicator's context, so
    only the channel's nonce keeps the old refusal from cancelling the new channel's call."""
    from test_reference import REPO, _mpirun

    proc = _mpirun(2, REPO / "tests" / "mpi" / "check_channel.py")
    assert proc.returncode == 0 and "OK channel ranks=2" in proc.stdout, proc.stdout[-6000:]


def test_shrink_steps_leave_out_an_absent_rank_and_rejoin_resynchronises_the_counts():
    """Shrink mode's host steps: present() among the given ranks lists a rank that does not come
    instead of failing; that rank skipped calls (its count lags), and after rejoin() on every
    rank (between() run on each) the next call agrees again among all of them."""
    ran = []

    def live(s):
        with s.begin("low_latency_dispatch"):
            pass
        with s.begin("clean_low_latency_buffer"):
            pass
        left_out = s.present([0, 1, 2])
        again = s.present([0, 1])   # rank 2 masked: not waited for
        back = s.rejoin("low_latency_clean_mask_buffer", lambda: ran.append(s.Get_rank()))
        return left_out, again, back, call(s, "low_latency_dispatch", s.Get_rank())

    def dead(s):
        time.sleep(TIMEOUT_S * 1.5)   # skips both calls, then comes back within the rejoin's bound
        back = s.rejoin("low_latency_clean_mask_buffer", lambda: ran.append(s.Get_rank()))
        return None, None, back, call(s, "low_latency_dispatch", s.Get_rank())

    results = run_ranks(live, live, dead)
    outs = [out for out, _ in results]
    assert outs[0][:3] == outs[1][:3] == ({2}, set(), set()), outs
    assert outs[2][2] == set()
    assert [out[3] for out in outs] == [[0, 1, 2]] * 3
    assert sorted(ran) == [0, 1, 2]
    assert results[0][1] < TIMEOUT_S * 6


class MaskingEngine:
    """The low-latency engine's shrink-mode surface, on the host: a NumPy mask; clean and reset
    recorded."""

    def __init__(self, size):
        self.mask = np.zeros(size, np.int32)
        self.resets = 0

    def masked_ranks(self):
        return np.flatnonzero(self.mask).tolist()

    def set_mask(self, ranks, value):
        self.mask[sorted(ranks)] = value

    def clean(self, barrier):
        barrier()
        self.reset()
        barrier()

    def reset(self):
        self.resets += 1


def shrink_buffer(steps):
    """A GPU Buffer in shrink mode around ``steps`` and a MaskingEngine (no GPU)."""
    from cupy_ep.buffer import Buffer

    buf = object.__new__(Buffer)
    buf._destroyed, buf._broken, buf.enable_shrink = False, None, True
    buf.rank, buf.num_ranks = steps.Get_rank(), steps.Get_size()
    buf._calls, buf._low_latency = steps, MaskingEngine(steps.Get_size())
    return buf


def test_shrink_buffer_masks_a_rank_absent_from_clean_and_clean_mask_brings_it_back(monkeypatch):
    """The GPU Buffer's shrink-mode host flow: clean_low_latency_buffer's barriers run among the
    unmasked ranks and mask the one that does not come; low_latency_clean_mask_buffer on every
    rank resets each engine between its rounds and empties the masks; then a clean waits for
    every rank again."""
    cupy = pytest.importorskip("cupy")
    monkeypatch.setattr(cupy.cuda.runtime, "deviceSynchronize", lambda: None)

    def live(s):
        buf = shrink_buffer(s)
        buf.clean_low_latency_buffer(16, 256, 6)
        after_clean = buf._low_latency.masked_ranks()
        buf.low_latency_clean_mask_buffer()
        after_rejoin = buf._low_latency.masked_ranks()
        buf.clean_low_latency_buffer(16, 256, 6)
        return after_clean, after_rejoin, buf._low_latency.masked_ranks(), buf._low_latency.resets

    def dead(s):
        buf = shrink_buffer(s)
        time.sleep(TIMEOUT_S * 1.5)   # skips the first clean
        buf.low_latency_clean_mask_buffer()
        after_rejoin = buf._low_latency.masked_ranks()
        buf.clean_low_latency_buffer(16, 256, 6)
        return None, after_rejoin, buf._low_latency.masked_ranks(), buf._low_latency.resets

    outs = [out for out, _ in run_ranks(live, live, dead)]
    assert outs[:2] == [([2], [], [], 3)] * 2, outs
    assert outs[2] == (None, [], [], 2), outs
