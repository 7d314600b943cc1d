"""A refused dispatch or combine still takes part in the call, cancelled (issue 21, item 3), host
side, without a GPU: which rank launches which cancelled part (``notify_cancelled`` flagged or
not, ``barrier_cancelled``), and when nothing is launched. The kernels run in
tests/gpu/test_asymmetric_gpu.py.
"""
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from cupy_ep.buffer import Buffer
from cupy_ep.collective import CallSteps
from cupy_ep.errors import CommTimeoutError, PeerRefusalError, cancelled_by_peers
from cupy_ep.intranode import IntranodeEngine
from cupy_ep.normal import NormalEngine
from cupy_ep.validation import Routing


class FakeEngine:
    """An intranode engine that records the cancelled parts it was asked to launch."""

    handle_type = object

    def __init__(self):
        self.joined = []

    def join_cancelled_dispatch(self, stream, refused, cached=False):
        self.joined.append(("dispatch", stream, refused, cached))
        return True

    def join_cancelled_combine(self, stream):
        self.joined.append(("combine", stream))
        return True


class FakeStreams:
    def begin(self, previous_event=None, on_comm_stream=True, allocate_on_comm_stream=False):
        assert previous_event is None and not on_comm_stream, "the cancelled part goes as a synchronous call"
        return SimpleNamespace(stream="caller stream")


class OneRank:
    def Get_rank(self):  # noqa: N802 -- the mpi4py name
        return 0

    def Get_size(self):  # noqa: N802
        return 1


def fake_buffer(engine, broken=None):
    """A GPU Buffer whose engine, streams and host steps are fakes (no channel: refusals untold)."""
    buf = object.__new__(Buffer)
    buf._destroyed, buf._broken, buf._nvl, buf._normal = False, broken, object(), engine
    buf._calls, buf._streams, buf.device_id, buf._profile = CallSteps(None, OneRank()), FakeStreams(), 0, None
    return buf


def test_a_refused_dispatch_takes_part_cancelled():
    engine = FakeEngine()
    with pytest.raises(TypeError, match="^x: expected a CuPy array"):
        fake_buffer(engine).dispatch(np.zeros((4, 8), np.float32))
    assert engine.joined == [("dispatch", "caller stream", True, False)]


def test_a_refused_cached_dispatch_takes_part_cancelled():
    engine = FakeEngine()
    with pytest.raises(TypeError, match="^x: "):
        fake_buffer(engine).dispatch(np.zeros((4, 8), np.float32), handle=object())
    assert engine.joined == [("dispatch", "caller stream", True, True)]


def test_a_refused_combine_takes_part_cancelled():
    engine = FakeEngine()
    with pytest.raises(TypeError, match="^x: "):
        fake_buffer(engine).combine(np.zeros((4, 8), np.float32), object())
    assert engine.joined == [("combine", "caller stream")]


def test_a_broken_buffer_launches_nothing():
    engine = FakeEngine()
    with pytest.raises(TypeError, match="^x: "):
        fake_buffer(engine, broken=CommTimeoutError("notify_dispatch", 0, 1)).dispatch(np.zeros((4, 8), np.float32))
    assert engine.joined == []


def test_the_internode_engine_has_no_cancelled_part():
    assert NormalEngine.join_cancelled_dispatch(object(), "stream", True) is False
    assert NormalEngine.join_cancelled_combine(object(), "stream") is False


def test_peer_refusal_is_a_value_error_naming_the_ranks():
    e = cancelled_by_peers("dispatch", [3, 1], 0)
    assert isinstance(e, ValueError) and e.ranks == [1, 3]
    assert str(e) == "ranks 1, 3 passed invalid input to dispatch; the call was cancelled on every rank (seen on rank 0)"


@pytest.fixture
def fake_cupy(monkeypatch):
    """A cupy module whose arrays are placeholders (the engine allocates before its notify)."""
    module = ModuleType("cupy")
    module.int32 = np.int32
    module.empty = lambda shape, dtype=None: SimpleNamespace(shape=shape, dtype=dtype)
    module.cuda = SimpleNamespace(alloc=lambda size: 0)   # engine.empty_together: one allocation, views in it
    module.ndarray = lambda shape, dtype=None, memptr=None: SimpleNamespace(shape=shape, dtype=dtype)
    monkeypatch.setitem(sys.modules, "cupy", module)


class NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def intranode_engine(notify_error):
    """An IntranodeEngine of 2 ranks whose notify lookup raises ``notify_error`` (a host step
    of its compile) and whose launches are recorded."""
    engine = object.__new__(IntranodeEngine)
    engine.rank, engine.num_ranks, engine.profile, engine._memo, engine._seq = 0, 2, None, {}, 0
    engine.joined, engine.launched = [], []

    def function(name, *args, **kw):
        raise notify_error

    engine._function = function
    engine.join_cancelled_dispatch = lambda stream, refused, cached=False: engine.joined.append((stream, refused))
    engine._launch = lambda *args: engine.launched.append(args)
    return engine


def dispatch_on(engine):
    routing = Routing(None, None, None, num_experts=4, num_topk=0)
    call = SimpleNamespace(stream="call stream", alloc=NullContext())
    config = SimpleNamespace(num_channels=2, num_threads=128)
    x = np.zeros((4, 8), np.uint16)
    engine.dispatch(x, None, None, None, routing, None, 0, 1, config, call)


def test_a_peer_told_of_a_refusal_before_its_notify_takes_part_cancelled(fake_cupy):
    engine = intranode_engine(cancelled_by_peers("dispatch (compile agreement)", [1], 0))
    with pytest.raises(PeerRefusalError, match="rank 1 passed invalid input"):
        dispatch_on(engine)
    assert engine.joined == [("call stream", False)] and engine.launched == []


@pytest.mark.parametrize("error", [CommTimeoutError("dispatch (compile agreement)", 0, 1, host=True),
                                   ValueError("a ValueError that is not a peer's refusal")])
def test_other_host_step_errors_launch_nothing(fake_cupy, error):
    engine = intranode_engine(error)
    with pytest.raises(type(error)):
        dispatch_on(engine)
    assert engine.joined == [] and engine.launched == []
