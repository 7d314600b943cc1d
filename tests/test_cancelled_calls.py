"""A refused dispatch or combine still takes part in the call, cancelled (issue 21, item 3), host
side, without a GPU: which rank launches which cancelled part (``notify_cancelled`` and across
NVLink domains ``internode_notify_cancelled``, flagged or not, ``barrier_cancelled``, the
low-latency ``ll_dispatch_cancelled`` / ``ll_combine_cancelled`` on the call's half), and when
nothing is launched. The kernels run in tests/gpu/test_asymmetric_gpu.py.
"""
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from cupy_ep import geometry, limits, normal
from cupy_ep.bootstrap import Topology
from cupy_ep.buffer import Buffer
from cupy_ep.collective import CallSteps
from cupy_ep.config import Config
from cupy_ep.errors import CommTimeoutError, PeerRefusalError, cancelled_by_peers
from cupy_ep.geometry import LLGeometry
from cupy_ep.internode import InternodeEngine
from cupy_ep.intranode import IntranodeEngine
from cupy_ep.low_latency import LowLatencyEngine
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


class FakeLowLatencyEngine:
    """A low-latency engine that records the cancelled parts it was asked to launch."""

    def __init__(self):
        self.joined = []

    def join_cancelled_dispatch(self, stream, refused):
        self.joined.append(("low_latency_dispatch", stream, refused))

    def join_cancelled_combine(self, stream, refused):
        self.joined.append(("low_latency_combine", stream, refused))


class FakeStreams:
    def begin(self, previous_event=None, on_comm_stream=True, allocate_on_comm_stream=False):
        assert previous_event is None and not on_comm_stream, "the cancelled part goes as a synchronous call"
        return SimpleNamespace(stream="caller stream")


class OneRank:
    def Get_rank(self):  # noqa: N802 -- the mpi4py name
        return 0

    def Get_size(self):  # noqa: N802
        return 1


def fake_buffer(engine, broken=None, low_latency=None):
    """A GPU Buffer whose engines, streams and host steps are fakes (no channel: refusals untold)."""
    buf = object.__new__(Buffer)
    buf._destroyed, buf._broken, buf._nvl, buf._normal = False, broken, object(), engine
    buf._low_latency, buf.num_ranks = low_latency, 1
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


def test_refused_low_latency_calls_take_part_cancelled():
    engine = FakeLowLatencyEngine()
    buf = fake_buffer(None, low_latency=engine)
    with pytest.raises(TypeError, match="^x: expected a CuPy array"):
        buf.low_latency_dispatch(np.zeros((4, 128), np.float32), np.zeros((4, 1), np.int64), 8, 2)
    with pytest.raises(TypeError, match="^handle: "):
        buf.low_latency_combine(np.zeros((2, 8, 128), np.float32), None, None, handle=(1, 2))
    assert engine.joined == [("low_latency_dispatch", "caller stream", True),
                             ("low_latency_combine", "caller stream", True)]


def test_a_broken_buffer_launches_nothing():
    engine = FakeEngine()
    with pytest.raises(TypeError, match="^x: "):
        fake_buffer(engine, broken=CommTimeoutError("notify_dispatch", 0, 1)).dispatch(np.zeros((4, 8), np.float32))
    assert engine.joined == []


class FakeHostMapped:
    """memory.HostMapped without CUDA: zeroed host memory."""

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def view(self, dtype, count, offset=0):
        return np.zeros(count, dtype)


def internode_engine_made(monkeypatch, rank=1, num_ranks=4, num_nvl_ranks=2):
    """An InternodeEngine made by its constructor, with fake host memory and modules: ``loaded``
    lists the modules it compiled, ``launched`` its launches."""
    loaded = []
    monkeypatch.setattr(normal, "HostMapped", FakeHostMapped)
    monkeypatch.setattr(InternodeEngine, "_module", lambda self, filename, consts, nvshmem=False:
                        loaded.append((filename, consts, nvshmem)) or "module")
    monkeypatch.setattr(InternodeEngine, "_entry", staticmethod(lambda module, name: (module, name)))
    comm = SimpleNamespace(Get_rank=lambda: rank, Get_size=lambda: num_ranks)
    topology = Topology(rank, num_ranks, rank % num_nvl_ranks, num_nvl_ranks, rank // num_nvl_ranks,
                        num_ranks // num_nvl_ranks, rank, num_ranks, None)
    nvl, sym = SimpleNamespace(num_bytes=1 << 26, peer_table="peers"), SimpleNamespace(num_bytes=1 << 28, ptr=4096)
    engine = InternodeEngine(comm, topology, nvl, sym, SimpleNamespace(ptr=7), 5)
    engine.launched = []
    engine._launch = lambda kernel, grid, block, args, stream, name="": engine.launched.append(
        (kernel, grid, block, args, stream))
    return engine, loaded


def test_the_internode_engine_loads_its_cancelled_part_when_made(monkeypatch):
    engine, loaded = internode_engine_made(monkeypatch)
    assert loaded == [("internode.cu", geometry.internode_cancel_constants(4, 2), True)]
    assert engine._notify_cancelled == ("module", "internode_notify_cancelled")
    assert engine._barrier_cancelled == ("module", "internode_barrier_cancelled")


@pytest.mark.parametrize("refused", [True, False])
def test_a_refused_internode_dispatch_launches_its_cancelled_notify(monkeypatch, refused):
    engine, _ = internode_engine_made(monkeypatch)
    engine.join_cancelled_dispatch("s", refused=refused)
    [(kernel, grid, block, args, stream)] = engine.launched
    assert (kernel, grid, block, stream) == (engine._notify_cancelled, 1, geometry.INTERNODE_CANCEL_THREADS, "s")
    assert args[0] == "peers" and [int(a) for a in args[1:]] == [4096, 1, int(refused), 7, 5]


@pytest.mark.parametrize("call,kernel_name", [("cached dispatch", "internode_dispatch"),
                                               ("combine", "internode_combine")])
def test_a_refused_internode_cached_dispatch_or_combine_launches_its_cancelled_barrier(monkeypatch, call,
                                                                                       kernel_name):
    engine, _ = internode_engine_made(monkeypatch)
    if call == "combine":
        engine.join_cancelled_combine("s")
    else:
        engine.join_cancelled_dispatch("s", refused=True, cached=True)
    [(kernel, grid, block, args, stream)] = engine.launched
    assert (kernel, grid, block, stream) == (engine._barrier_cancelled, 1, geometry.INTERNODE_CANCEL_THREADS, "s")
    assert args[0] == "peers" and [int(a) for a in args[1:]] == [4096, 1, 1, 7, 5, limits.KERNEL_IDS[kernel_name]]


@pytest.mark.parametrize("call", ["cached dispatch", "combine"])
def test_an_internode_peer_refusal_in_a_compile_agreement_joins_the_barrier_unflagged(monkeypatch, call):
    """A cached dispatch or combine whose module's compile agreement tells of a peer's refusal
    takes part in the call's barrier, unflagged, before it raises (the epochs stay in step)."""
    engine, _ = internode_engine_made(monkeypatch)

    def refused_by_a_peer(*shape):
        raise cancelled_by_peers("combine", [3], 1)
    engine._kernels = refused_by_a_peer
    handle = SimpleNamespace(hidden=256, num_topk=2, num_experts=8, num_channels=2)
    cached_call = SimpleNamespace(stream="s")
    with pytest.raises(PeerRefusalError):
        if call == "combine":
            engine.combine(None, handle, None, (), SimpleNamespace(num_threads=256, chunk_tokens=1), cached_call)
        else:
            engine.dispatch(SimpleNamespace(shape=(4, 256), dtype=np.dtype(np.uint16)), None, None, None, None, handle,
                            0, 1, SimpleNamespace(num_threads=256, chunk_tokens=1), cached_call)
    [(kernel, _, _, args, stream)] = engine.launched
    assert (kernel, stream, int(args[3])) == (engine._barrier_cancelled, "s", 0)


@pytest.mark.parametrize("shape", [(4, 2, 8, 1024, 64, 7168, 8), (16, 8, 2, 256, 3, 256, 0)])
def test_the_cancelled_notify_reads_the_offsets_of_every_internode_shape(shape):
    """The shape-free module's control offsets (all that internode_notify_cancelled reads) are
    those of the modules of any shape, on buffers of any size."""
    r, p, c, threads, e_local, hidden, topk = shape
    nvl, rdma = 1 << 26, 1 << 28
    real = geometry.internode_constants(nvl, rdma, r, p, hidden, topk, 2 * hidden, 0, e_local * r, c, threads, 1)
    cancel = geometry.internode_cancel_constants(r, p)
    control = [k for k in real if k.startswith(("R_OFF_", "OFF_")) and k not in ("R_OFF_DATA", "OFF_NX", "OFF_NS",
                                                                               "OFF_NI", "OFF_NW")]
    control += ["VEC_STRIDE", "SLOT_STRIDE", "NUM_RANKS", "NUM_NVL_RANKS"]
    assert {k: cancel[k] for k in control} == {k: real[k] for k in control}
    assert (cancel["KERNEL_CANCEL"], real["KERNEL_CANCEL"]) == (1, 0)
    assert not (cancel["KERNEL_NOTIFY"] or cancel["KERNEL_DISPATCH"] or cancel["KERNEL_COMBINE"])


def test_peer_refusal_is_a_value_error_naming_the_ranks():
    e = cancelled_by_peers("dispatch", [3, 1], 0)
    assert isinstance(e, ValueError) and e.ranks == [1, 3]
    assert str(e) == "ranks 1, 3 passed invalid input to dispatch; the call was cancelled on every rank (seen on rank 0)"


class _Address(int):
    """A fake allocation: an address with CuPy's ``ptr`` (views at an offset: ``base + offset``)."""

    @property
    def ptr(self):
        return int(self)


@pytest.fixture
def fake_cupy(monkeypatch):
    """A cupy module whose arrays are placeholders (the engine allocates before its notify), in
    every loaded cupy_ep module that imports CuPy at its top."""
    module = ModuleType("cupy")
    module.int32 = np.int32
    module.empty = lambda shape, dtype=None: SimpleNamespace(shape=shape, dtype=dtype)
    module.cuda = SimpleNamespace(alloc=lambda size: _Address(0))   # engine.empty_together / words_together
    module.ndarray = lambda shape, dtype=None, memptr=None: SimpleNamespace(shape=shape, dtype=dtype)
    for name, loaded in list(sys.modules.items()):
        if name.startswith("cupy_ep.") and getattr(loaded, "cupy", None) is not None:
            monkeypatch.setattr(loaded, "cupy", module)


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


def internode_engine(kernels_error):
    """An InternodeEngine of 4 ranks in 2 domains whose kernel lookup raises ``kernels_error`` (a
    host step of its compile) and whose launches are recorded."""
    engine = object.__new__(InternodeEngine)
    engine.rank, engine.num_ranks, engine.num_nvl_ranks, engine.num_rdma_ranks = 0, 4, 2, 2
    engine.profile, engine._memo, engine._seq = None, {}, 0
    engine.joined, engine.launched = [], []

    def kernels(*args):
        raise kernels_error

    engine._kernels = kernels
    engine.join_cancelled_dispatch = lambda stream, refused, cached=False: engine.joined.append((stream, refused))
    engine._launch = lambda *args: engine.launched.append(args)
    return engine


ENGINES = {"intranode": intranode_engine, "internode": internode_engine}


def dispatch_on(engine):
    routing = Routing(None, None, None, num_experts=4, num_topk=0)
    call = SimpleNamespace(stream="call stream", alloc=NullContext())
    config = SimpleNamespace(num_channels=2, internode_channels=2, num_threads=128, chunk_tokens=1)
    x = np.zeros((4, 8), np.uint16)
    engine.dispatch(x, None, None, None, routing, None, 0, 1, config, call)


@pytest.mark.parametrize("kind", ENGINES)
def test_a_peer_told_of_a_refusal_before_its_notify_takes_part_cancelled(fake_cupy, kind):
    engine = ENGINES[kind](cancelled_by_peers("dispatch (compile agreement)", [1], 0))
    with pytest.raises(PeerRefusalError, match="rank 1 passed invalid input"):
        dispatch_on(engine)
    assert engine.joined == [("call stream", False)] and engine.launched == []


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("error", [CommTimeoutError("dispatch (compile agreement)", 0, 1, host=True),
                                   ValueError("a ValueError that is not a peer's refusal")])
def test_other_host_step_errors_launch_nothing(fake_cupy, kind, error):
    engine = ENGINES[kind](error)
    with pytest.raises(type(error)):
        dispatch_on(engine)
    assert engine.joined == [] and engine.launched == []


def low_latency_engine(kernels_error=None):
    """A LowLatencyEngine of 2 ranks (rank 0, grids of 3 blocks) whose launches are recorded and
    whose kernel lookup raises ``kernels_error`` (a host step of its compile) when given."""
    engine = object.__new__(LowLatencyEngine)
    engine.rank, engine.num_ranks, engine.num_blocks, engine.profile = 0, 2, 3, None
    engine.geom, engine._halves, engine.mask, engine.shrink = LLGeometry(2, 1 << 20), [0, 0], None, False
    engine.peer_table, engine.status_arg, engine.timeout_ns = "peers", np.uint64(7), np.uint64(5)
    engine._cancelled = {"dispatch": "ll_dispatch_cancelled", "combine": "ll_combine_cancelled"}
    engine._scratch_d, engine._scratch_c = "scratch_d", "scratch_c"
    engine.launched = []

    def get_kernels(*args):
        if kernels_error is not None:
            raise kernels_error
        return "ll_dispatch", "ll_combine"

    engine._get_kernels = get_kernels
    engine._launch = lambda kernel, grid, block, args, stream, name="": engine.launched.append((kernel, grid, args))
    return engine


def ll_dispatch_on(engine):
    x, idx = np.zeros((4, 128), np.uint16), np.zeros((4, 2), np.int64)
    call = SimpleNamespace(stream="call stream", alloc=NullContext())
    return engine.dispatch(x, idx, 8, 4, False, False, False, False, None, call)


def test_low_latency_cancelled_parts_keep_the_halves_in_step(fake_cupy):
    """Every call toggles its kind's half, cancelled or not: a refused dispatch signals half 0 with
    the call's grid and the cancel flag, the next (valid) dispatch uses half 1; combines alike."""
    engine, geom = low_latency_engine(), LLGeometry(2, 1 << 20)
    engine.join_cancelled_dispatch("s", refused=True)
    ll_dispatch_on(engine)
    engine.join_cancelled_combine("s", refused=False)
    (k0, g0, a0), (k1, _, a1), (k2, g2, a2) = engine.launched
    assert (k0, g0, k1, k2, g2) == ("ll_dispatch_cancelled", 1, "ll_dispatch", "ll_combine_cancelled", 1)
    assert [int(v) for v in a0[1:5]] == [2, geom.signal_offset(0, 0), 3, 1]   # ranks, half 0, grid, cancel
    assert int(a1[5]) == geom.signal_offset(1, 0)                             # the valid call: half 1
    assert [int(v) for v in a2[1:5]] == [2, geom.signal_offset(0, 1), geom.signal_offset(0, 2), 0]
    assert engine._halves == [0, 1]


def test_a_low_latency_peer_told_of_a_refusal_takes_part_cancelled(fake_cupy):
    engine = low_latency_engine(cancelled_by_peers("low_latency_dispatch (compile agreement)", [1], 0))
    with pytest.raises(PeerRefusalError, match="rank 1 passed invalid input"):
        ll_dispatch_on(engine)
    assert [(k, int(a[4])) for k, _, a in engine.launched] == [("ll_dispatch_cancelled", 0)]   # not flagged
    assert engine._halves == [1, 0]


def test_other_low_latency_host_step_errors_launch_nothing(fake_cupy):
    engine = low_latency_engine(CommTimeoutError("low_latency_dispatch (compile agreement)", 0, 1, host=True))
    with pytest.raises(CommTimeoutError):
        ll_dispatch_on(engine)
    assert engine.launched == [] and engine._halves == [0, 0]


def test_low_latency_cancelled_parts_get_the_shrink_mask():
    engine = low_latency_engine()
    engine.join_cancelled_dispatch("s", refused=True)
    engine.mask = "mask"   # shrink mode: the device mask
    engine.join_cancelled_dispatch("s", refused=True)
    engine.join_cancelled_combine("s", refused=True)
    assert [a[5] for _, _, a in engine.launched] == [0, "mask", "mask"]   # 0: a null pointer


def intranode_engine_compiling(error):
    """:func:`intranode_engine` with what a cached dispatch or a combine reads before its kernel's
    lookup raises ``error``, and the barrier kernel loaded with the engine."""
    engine = intranode_engine(error)
    engine.nvl = SimpleNamespace(peer_table="peers", num_bytes=1 << 24)
    engine.status_arg, engine.timeout_ns = "status", np.uint64(5)
    engine._barrier_kernels = {"group_barrier_kernel": "group_barrier_kernel"}
    engine._launch = lambda kernel, grid, block, args, stream, name="": engine.launched.append(
        (kernel, grid, block, args, stream))
    return engine


def cached_call_on(engine, call):
    """A cached dispatch or a combine of a 2-rank handle (its kernels' lookups raise)."""
    handle = SimpleNamespace(hidden=256, num_topk=2, num_experts=8, num_channels=2, num_tokens=4, num_rows=4)
    config = Config(num_sms=4, num_threads=256)
    call_ = SimpleNamespace(stream="s", alloc=NullContext())
    if call == "combine":
        engine.combine(np.zeros((4, 256), np.uint16), handle, None, (), config, call_)
    else:
        engine.dispatch(np.zeros((4, 256), np.uint16), None, None, None, None, handle, 0, 1, config, call_)


@pytest.mark.parametrize("call,kernel_name", [("cached dispatch", "intranode_dispatch"),
                                               ("combine", "intranode_combine")])
def test_an_intranode_peer_refusal_in_a_compile_agreement_joins_the_barrier_unflagged(call, kernel_name):
    """The cached dispatch's and the combine's kernel runs the call's domain barrier itself; when its
    compile agreement tells of a peer's refusal, this rank takes part in the barrier with the
    barrier kernel (unflagged) before it raises, and launches nothing else."""
    engine = intranode_engine_compiling(cancelled_by_peers(call, [1], 0))
    with pytest.raises(PeerRefusalError):
        cached_call_on(engine, call)
    [(kernel, grid, block, args, stream)] = engine.launched
    assert (kernel, (grid, block), stream) == ("group_barrier_kernel", geometry.INTRANODE_BARRIER_SHAPE, "s")
    assert args[0] == "peers" and int(args[1]) == 0 and int(args[4]) == limits.KERNEL_IDS[kernel_name]


@pytest.mark.parametrize("call", ["cached dispatch", "combine"])
def test_other_compile_errors_of_a_cached_dispatch_or_combine_launch_nothing(call):
    engine = intranode_engine_compiling(CommTimeoutError("combine (compile agreement)", 0, 1, host=True))
    with pytest.raises(CommTimeoutError):
        cached_call_on(engine, call)
    assert engine.launched == []
