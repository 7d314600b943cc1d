"""The host side of a non-cached normal-mode dispatch after notify (cupy_ep.normal), without a
GPU: the outputs' addresses and row count are published in the descriptor, its sequence number
last, before the per-expert counts are read; a cancelled call publishes "drop every row"."""
import contextlib
import types

import numpy as np
import pytest

from cupy_ep import limits
from cupy_ep.geometry import DESC_WORDS, HOST_OUT_INTS
from cupy_ep.normal import NormalEngine, _words


class _Array:
    def __init__(self, ptr):
        self.data = types.SimpleNamespace(ptr=ptr)


class _Spec(_Array):
    """A stand-in array: an address and what made it."""

    def __init__(self, ptr, spec):
        super().__init__(ptr)
        self.spec = spec


class _Status:
    status = limits.ST_OK
    from_layout = False

    def take(self):
        return None


def _engine(host_out):
    eng = NormalEngine.__new__(NormalEngine)   # no GPU memory: plain NumPy records
    eng.host_out, eng.desc = host_out, np.zeros(DESC_WORDS, np.uint64)
    eng._desc_words = _words(eng.desc)
    eng.status, eng.profile, eng.rank, eng.timeout_ns = _Status(), None, 0, np.uint64(10**9)
    published = []
    eng._alloc_outputs = lambda data, scales, num_topk, rows, call: (
        published.append(eng.desc.copy()) or (_Array(0x1000 + rows), None, _Array(0x3000), _Array(0x4000)))
    return eng, published


def _host_out(seq, rows, per_expert, cancelled=0, bad_rank=-1):
    out = np.zeros(HOST_OUT_INTS, np.int32)
    out[:4] = seq, rows, cancelled, bad_rank
    out[limits.HOST_EXPERT:limits.HOST_EXPERT + len(per_expert)] = per_expert
    return out


def test_outputs_published_then_counts_read():
    eng, before = _engine(_host_out(7, 42, [5, 0, 37]))
    handle = types.SimpleNamespace(num_rows=None)
    result = eng._finish_dispatch(7, None, None, 4, 3, handle, types.SimpleNamespace(stream=None))
    assert before[0][0] == 0   # nothing was published before the outputs existed
    assert eng.desc.tolist() == [7, 0x1000 + 42, 0, 0x3000, 0x4000, 42] + [0] * (DESC_WORDS - 6)
    assert result.num_recv_tokens_per_expert_list == [5, 0, 37] and handle.num_rows == 42
    assert result.recv_x.data.ptr == 0x1000 + 42 and result.recv_scales is None


def test_cancelled_call_publishes_drop_every_row():
    eng, _ = _engine(_host_out(3, 0, [1], cancelled=1, bad_rank=2))
    with pytest.raises(ValueError, match="rank 2 passed invalid input to dispatch"):
        eng._finish_dispatch(3, None, None, 4, 1, types.SimpleNamespace(num_rows=None), types.SimpleNamespace(stream=None))
    assert eng.desc[0] == 3 and eng.desc[5] == np.uint64(2**64 - 1) and not eng.desc[1:5].any()


def test_empty_together_carves_aligned_disjoint_arrays(monkeypatch):
    from cupy_ep import engine

    class Ptr:
        def __init__(self, ptr, size):
            self.ptr, self.size = ptr, size

        def __add__(self, offset):
            return Ptr(self.ptr + offset, self.size)

    allocs = []

    def alloc(size):
        allocs.append(size)
        return Ptr(0x10000, size)

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(alloc=alloc),
                                 ndarray=lambda shape, dtype, memptr: (shape, dtype, memptr.ptr))
    monkeypatch.setattr(engine, "cupy", fake)
    specs = [((5,), engine.I32), ((3, 100), engine.I64), ((0, 4), engine.F32), ((1,), engine.I32)]
    got = engine.empty_together(*specs)
    assert [(s, d) for s, d, _ in got] == specs and allocs == [256 + 2560 + 0 + 256]
    starts = [p - 0x10000 for _, _, p in got]
    assert starts == [0, 256, 2816, 2816] and all(s % 256 == 0 for s in starts)


def test_words_together_gives_the_addresses_of_empty_together(monkeypatch):
    from cupy_ep import engine

    class Base:
        ptr = 0x20000

    allocs = []
    monkeypatch.setattr(engine, "cupy", types.SimpleNamespace(
        cuda=types.SimpleNamespace(alloc=lambda size: allocs.append(size) or Base())))
    specs = (((5,), engine.I32), ((3, 100), engine.I64), ((0, 4), engine.F32), ((1,), engine.I32))
    for _ in range(2):   # the second from the memoised layout
        memory, addresses = engine.words_together(*specs)
        assert isinstance(memory, Base) and all(type(a) is int for a in addresses)
        assert [int(a) - 0x20000 for a in addresses] == [0, 256, 2816, 2816]
    assert allocs == [256 + 2560 + 0 + 256] * 2


@pytest.mark.parametrize("fp8, num_topk", [(True, 8), (False, 8), (True, 0), (False, 0)])
def test_dispatch_outputs_have_the_shapes_and_dtypes_of_separate_allocations(monkeypatch, fp8, num_topk):
    import cupy_ep.normal as normal

    monkeypatch.setattr(normal, "empty_together", lambda *specs: [("together", s, d) for s, d in specs])
    fake = types.SimpleNamespace(empty=lambda shape, dtype: ("alone", shape, np.dtype(dtype)), float32=np.float32)
    monkeypatch.setattr(normal, "cupy", fake)
    eng, _ = _engine(_host_out(1, 0, []))
    del eng._alloc_outputs   # the real one
    data = np.zeros((4, 256), np.uint8 if fp8 else np.float32)
    scales = np.zeros((4, 2), np.float32) if fp8 else None
    out = eng._alloc_outputs(data, scales, num_topk, 9, types.SimpleNamespace(alloc=contextlib.nullcontext(),
                                                                              stream=None))
    assert out[0] == ("alone", (9, 256), data.dtype)
    assert out[1] == (("together", (9, 2), np.dtype(np.float32)) if fp8 else None)
    assert out[2:] == ((("together", (9, num_topk), np.dtype(np.int64)), ("together", (9, num_topk),
                                                                          np.dtype(np.float32))) if num_topk else (None, None))


@pytest.mark.parametrize("ranks, rdma_ranks", [(1, 1), (4, 2)])
def test_layout_outputs_and_launch_arguments(monkeypatch, ranks, rdma_ranks):
    import cupy_ep.layout as layout

    def views(*specs):
        return [_Spec(0x100 * (i + 1), ("view", s, d)) for i, (s, d) in enumerate(specs)]

    monkeypatch.setattr(layout, "empty_together", views)
    current = ["the caller's stream"]

    class Stream(contextlib.AbstractContextManager):   # entering makes it the current stream
        def __enter__(self):
            current.append("the call's stream")

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(layout, "cupy", types.SimpleNamespace(
        zeros=lambda n, dtype: _Spec(0x9000, ("zeros", n, current[-1])), int32=np.int32))
    eng = layout.LayoutEngine.__new__(layout.LayoutEngine)
    eng.num_ranks, eng.num_rdma_ranks, eng.rank, eng.profile = ranks, rdma_ranks, 0, None
    eng._scratch, eng.status_arg = {}, np.uint64(99)
    launches = []
    eng._kernel = lambda e, k, b: ("kernel", e, k, b)
    eng._launch_values = lambda kernel, grid, block, values, stream, name: launches.append(
        (kernel, grid, block, values, stream, name))
    topk_idx = _Spec(0x5000, np.zeros((300, 8), np.int64))
    topk_idx.shape, topk_idx.dtype = topk_idx.spec.shape, topk_idx.spec.dtype
    call = types.SimpleNamespace(alloc=contextlib.nullcontext(), stream=Stream())
    per_rank, per_rdma, per_expert, in_rank = eng.run(topk_idx, 64, call)
    i32, b = np.dtype(np.int32), np.dtype(np.bool_)
    assert per_rank.spec == ("view", (ranks,), i32) and per_expert.spec == ("view", (64,), i32)
    assert in_rank.spec == ("view", (300, ranks), b)
    assert (per_rdma.spec == ("view", (rdma_ranks,), i32)) if rdma_ranks > 1 else per_rdma is None
    (kernel, grid, block, values, stream, name), = launches
    assert kernel == ("kernel", 64, 8, 8) and (grid, block, name) == (2, layout.LAYOUT_THREADS, "layout")
    assert stream is call.stream
    # the scratch is zeroed on the kernel's stream (the outputs' allocation stream may be another)
    assert eng._scratch[64].spec == ("zeros", ranks + rdma_ranks + 64 + 1, "the call's stream")
    assert values[:4] == (0x5000, 300, 0x9000, per_rank.data.ptr)
    assert values[5:] == (per_expert.data.ptr, in_rank.data.ptr, 99, 0)
    assert values[4] == (per_rdma.data.ptr if per_rdma is not None else 0)
