"""Unit tests of cupy_ep.validation: each check passes good input and rejects the bad input it guards."""

import re

import ml_dtypes
import numpy as np
import pytest

from cupy_ep import validation as V

BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn


def bf16(shape):
    return np.zeros(shape, dtype=BF16)


def raises(exc, prefix):
    """pytest.raises whose message must start with the argument name ``prefix``."""
    return pytest.raises(exc, match="^" + re.escape(prefix))


def test_dtype_predicates():
    assert V.is_bf16_dtype(BF16) and V.is_bf16_dtype(np.dtype(BF16))
    assert not V.is_bf16_dtype(np.float16) and not V.is_bf16_dtype(np.uint16)
    assert V.is_fp8_dtype(E4M3) and V.is_fp8_dtype(np.uint8)
    assert not V.is_fp8_dtype(np.int8) and not V.is_fp8_dtype(ml_dtypes.float8_e5m2)
    assert not V.is_fp8_dtype("not a dtype")


def test_check_int():
    assert V.check_int(np.int64(3), "a", 1) == 3
    with raises(TypeError, "a"):
        V.check_int(True, "a")
    with raises(TypeError, "a"):
        V.check_int(2.0, "a")
    with raises(ValueError, "a"):
        V.check_int(0, "a", 1)
    with raises(ValueError, "a"):
        V.check_int(9, "a", max_value=8)


def test_check_num_experts():
    assert V.check_num_experts(8, 4) == 2
    with raises(ValueError, "num_experts"):
        V.check_num_experts(6, 4)
    with raises(ValueError, "num_experts"):
        V.check_num_experts(0, 1)
    with raises(TypeError, "num_experts"):
        V.check_num_experts(8.0, 4)
    with raises(ValueError, "num_ranks"):
        V.check_num_experts(8, 0)


def test_check_topk_idx():
    ti = np.zeros((5, 3), np.int64)
    assert V.check_topk_idx(ti, 5) == (5, 3)
    assert V.check_topk_idx(ti.astype(np.int32)) == (5, 3)
    assert V.check_topk_idx(np.zeros((0, 2), np.int64), 0) == (0, 2)
    with raises(TypeError, "topk_idx: expected int64 or int32, got float32"):
        V.check_topk_idx(ti.astype(np.float32))
    with raises(TypeError, "topk_idx"):
        V.check_topk_idx(ti.tolist())
    with raises(ValueError, "topk_idx"):
        V.check_topk_idx(ti[:, 0].copy())
    with raises(ValueError, "topk_idx"):
        V.check_topk_idx(ti, 4)
    with raises(ValueError, "topk_idx"):
        V.check_topk_idx(np.zeros((4, 0), np.int64))
    with raises(ValueError, "topk_idx: must be C-contiguous"):
        V.check_topk_idx(np.asfortranarray(ti))
    with raises(ValueError, "topk_idx"):
        V.check_topk_idx(ti[:, ::2])


def test_check_topk_range():
    ti = np.array([[0, -1], [7, 3]], np.int64)
    V.check_topk_range(ti, 8)
    with raises(ValueError, "topk_idx: expert id 7 of token 1 is outside [-1, 7)"):
        V.check_topk_range(ti, 7)
    V.check_topk_range(np.zeros((0, 2), np.int64), 8)
    with raises(ValueError, "topk_idx"):
        V.check_topk_range(ti, 7)
    with raises(ValueError, "topk_idx"):
        V.check_topk_range(np.array([[-2]], np.int32), 8)


def test_check_topk_weights():
    ti = np.zeros((4, 2), np.int64)
    V.check_topk_weights(np.zeros((4, 2), np.float32), ti)
    with raises(TypeError, "topk_weights"):
        V.check_topk_weights(np.zeros((4, 2), np.float64), ti)
    with raises(ValueError, "topk_weights"):
        V.check_topk_weights(np.zeros((4, 3), np.float32), ti)
    with raises(ValueError, "topk_weights"):
        V.check_topk_weights(np.asfortranarray(np.zeros((4, 2), np.float32)), ti)


def test_check_x_bf16():
    assert V.check_x(bf16((3, 64))) == (False, 3, 64)
    assert V.check_x(bf16((0, 8))) == (False, 0, 8)
    with raises(TypeError, "x: expected bf16"):
        V.check_x(np.zeros((3, 64), np.float32))
    with raises(ValueError, "x"):
        V.check_x(bf16((3, 12)))
    with raises(ValueError, "x"):
        V.check_x(bf16((3, 0)))
    with raises(ValueError, "x"):
        V.check_x(bf16((3, 64)), require_fp8_hidden=True)
    with raises(ValueError, "x"):
        V.check_x(bf16((3, 4, 8)))
    with raises(ValueError, "x"):
        V.check_x(np.asfortranarray(bf16((3, 64))))
    with raises(ValueError, "x"):
        V.check_x(bf16((3, 64)), num_tokens=4)
    with raises(TypeError, "y"):
        V.check_x("nope", name="y")


def test_check_x_fp8():
    for dt in (E4M3, np.uint8):
        pair = (np.zeros((3, 256), dt), np.zeros((3, 2), np.float32))
        assert V.check_x(pair) == (True, 3, 256)
    with raises(ValueError, "x"):
        V.check_x((np.zeros((3, 64), np.uint8), np.zeros((3, 1), np.float32)))
    with raises(TypeError, "x[0]"):
        V.check_x((np.zeros((3, 128), np.int8), np.zeros((3, 1), np.float32)))
    with raises(TypeError, "x[1]"):
        V.check_x((np.zeros((3, 128), np.uint8), np.zeros((3, 1), np.float16)))
    with raises(ValueError, "x[1]"):
        V.check_x((np.zeros((3, 128), np.uint8), np.zeros((3, 2), np.float32)))
    with raises(ValueError, "x[1]"):
        V.check_x((np.zeros((3, 256), np.uint8), np.asfortranarray(np.zeros((3, 2), np.float32))))
    with raises(TypeError, "x"):
        V.check_x((np.zeros((3, 128), np.uint8),))
    with raises(TypeError, "x"):
        V.check_x((np.zeros((3, 128), np.uint8), np.zeros((3, 1), np.float32)), allow_fp8=False)


def test_check_bias():
    b = bf16((3, 16))
    assert V.check_bias(None, 3, 16) == ()
    assert len(V.check_bias(b, 3, 16)) == 1
    assert len(V.check_bias((b, b), 3, 16)) == 2
    assert len(V.check_bias((None, b), 3, 16)) == 1
    with raises(ValueError, "bias"):
        V.check_bias(bf16((3, 8)), 3, 16)
    with raises(TypeError, "bias[1]"):
        V.check_bias((b, np.zeros((3, 16), np.float32)), 3, 16)
    with raises(ValueError, "bias"):
        V.check_bias((b, b, b), 3, 16)


def test_alignment_and_worst_tokens():
    assert V.check_expert_alignment(4) == 4
    assert V.check_num_worst_tokens(0) == 0
    with raises(ValueError, "expert_alignment"):
        V.check_expert_alignment(0)
    with raises(TypeError, "expert_alignment"):
        V.check_expert_alignment(None)
    with raises(ValueError, "num_worst_tokens"):
        V.check_num_worst_tokens(-1)


def test_check_layout_args():
    itr = np.array([[True, False], [True, True], [False, False]])
    ntpr = itr.sum(0).astype(np.int32)
    ntpe = np.zeros(4, np.int32)
    assert V.check_layout_args(ntpr, itr, ntpe, 3, 2) == 4
    with raises(ValueError, "num_tokens_per_rank"):
        V.check_layout_args(None, itr, ntpe, 3, 2)
    with raises(TypeError, "num_tokens_per_rank"):
        V.check_layout_args(ntpr.astype(np.int64), itr, ntpe, 3, 2)
    with raises(ValueError, "num_tokens_per_rank"):
        V.check_layout_args(ntpr + 1, itr, ntpe, 3, 2)
    with raises(TypeError, "is_token_in_rank"):
        V.check_layout_args(ntpr, itr.astype(np.int32), ntpe, 3, 2)
    with raises(ValueError, "is_token_in_rank"):
        V.check_layout_args(ntpr, itr, ntpe, 4, 2)
    with raises(ValueError, "num_tokens_per_expert"):
        V.check_layout_args(ntpr, itr, np.zeros(3, np.int32), 3, 2)
    with raises(ValueError, "num_tokens_per_expert"):
        V.check_layout_args(ntpr, itr, ntpe - 1, 3, 2)
    with raises(ValueError, "num_tokens_per_rdma_rank"):
        V.check_layout_args(ntpr, itr, ntpe, 3, 2, np.zeros(3, np.int32), 2)


def test_check_ll_dispatch_args():
    x = bf16((4, 256))
    ti = np.zeros((4, 2), np.int64)
    assert V.check_ll_dispatch_args(x, ti, 4, 8, 2) == (4, 256, 2, 4)
    with raises(ValueError, "x"):
        V.check_ll_dispatch_args(x, ti, 3, 8, 2)
    with raises(ValueError, "x"):
        V.check_ll_dispatch_args(bf16((4, 64)), ti, 4, 8, 2)
    with raises(TypeError, "x"):
        V.check_ll_dispatch_args((x, x), ti, 4, 8, 2)
    with raises(ValueError, "num_max_dispatch_tokens_per_rank"):
        V.check_ll_dispatch_args(x, ti, 0, 8, 2)
    with raises(ValueError, "num_experts"):
        V.check_ll_dispatch_args(x, ti, 4, 7, 2)
    with raises(ValueError, "topk_idx"):
        V.check_ll_dispatch_args(x, ti + 8, 4, 8, 2)
    with raises(ValueError, "topk_idx"):
        V.check_ll_dispatch_args(x, ti[:3].copy(), 4, 8, 2)


class _Info:
    """Stands for handle[5] (the GPU's LLHandlePrivate, the reference's LowLatencyHandleInfo)."""

    def __init__(self, num_tokens, topk):
        self.num_tokens, self.topk = num_tokens, topk


def _ll_handle(e_local=2, R=2, m=4, h=128, n=3, k=2):
    return (np.full((e_local, R * m), -1, np.int32), np.zeros((e_local, R), np.int64), m, h, e_local * R,
            _Info(n, k))


def test_check_ll_handle_and_combine_args():
    handle = _ll_handle()
    y = bf16((2, 8, 128))
    ti = np.zeros((3, 2), np.int64)
    tw = np.zeros((3, 2), np.float32)
    assert V.check_ll_combine_args(y, ti, tw, handle, 2) == (3, 128, 2)
    assert V.check_ll_combine_args(y, ti, tw, handle, 2, out=bf16((3, 128))) == (3, 128, 2)
    with raises(TypeError, "handle"):
        V.check_ll_combine_args(y, ti, tw, handle[:4], 2)
    with raises(TypeError, "handle"):   # handle[5] carries the dispatch's N and K
        V.check_ll_combine_args(y, ti, tw, handle[:5], 2)
    with raises(TypeError, "handle"):
        V.check_ll_combine_args(y, ti, tw, handle[:5] + (None,), 2)
    # fewer (or more) tokens, or another K, than the dispatch: refused, naming the argument
    with raises(ValueError, "topk_idx: expected shape [3, 2]"):
        V.check_ll_combine_args(y, ti[:2].copy(), tw[:2].copy(), handle, 2)
    with raises(ValueError, "topk_idx: expected shape [3, 2]"):
        V.check_ll_combine_args(y, ti[:, :1].copy(), tw[:, :1].copy(), handle, 2)
    with raises(ValueError, "topk_weights"):
        V.check_ll_combine_args(y, ti, tw[:2].copy(), handle, 2)
    with raises(ValueError, "handle[0]"):
        V.check_ll_combine_args(y, ti, tw, (handle[0][:, :4].copy(),) + handle[1:], 2)
    with raises(TypeError, "handle[1]"):
        V.check_ll_combine_args(y, ti, tw, (handle[0], handle[1].astype(np.int32)) + handle[2:], 2)
    with raises(ValueError, "x"):
        V.check_ll_combine_args(bf16((2, 8, 256)), ti, tw, handle, 2)
    with raises(TypeError, "x"):
        V.check_ll_combine_args(np.zeros((2, 8, 128), np.float32), ti, tw, handle, 2)
    with raises(ValueError, "topk_idx"):
        V.check_ll_combine_args(y, np.zeros((5, 2), np.int64), np.zeros((5, 2), np.float32), handle, 2)
    assert V.check_ll_combine_args(y, ti + 9, tw, handle, 2, check_values=False) == (3, 128, 2)
    with raises(ValueError, "topk_idx"):
        V.check_ll_combine_args(y, ti + 4, tw, handle, 2)
    with raises(ValueError, "topk_weights"):
        V.check_ll_combine_args(y, ti, None, handle, 2)
    with raises(ValueError, "topk_weights"):
        V.check_ll_combine_args(y, ti, tw[:, :1].copy(), handle, 2)
    with raises(TypeError, "out"):
        V.check_ll_combine_args(y, ti, tw, handle, 2, out=np.zeros((3, 128), np.float32))
    with raises(ValueError, "out"):
        V.check_ll_combine_args(y, ti, tw, handle, 2, out=bf16((4, 128)))


def test_check_cumulative_stats():
    V.check_cumulative_stats(None, 3)
    V.check_cumulative_stats(np.zeros(3, np.int32), 3)
    with raises(TypeError, "cumulative_local_expert_recv_stats"):
        V.check_cumulative_stats(np.zeros(3, np.int64), 3)
    with raises(ValueError, "cumulative_local_expert_recv_stats"):
        V.check_cumulative_stats(np.zeros(4, np.int32), 3)


def test_duck_typed_arrays():
    """Checks only use .shape/.dtype/.ndim/.flags and reductions (as CuPy arrays have)."""

    class Fake:
        def __init__(self, a):
            self._a = a
            self.shape, self.dtype, self.ndim, self.flags = a.shape, a.dtype, a.ndim, a.flags

        def min(self):
            return self._a.min()

        def max(self):
            return self._a.max()

    ti = Fake(np.array([[0, 1], [2, -1]], np.int64))
    assert V.check_topk_idx(ti, 2) == (2, 2)
    V.check_topk_range(ti, 3)
    with raises(ValueError, "topk_idx: expert id 2 is outside [-1, 2)"):   # min/max only: no token
        V.check_topk_range(ti, 2)
    assert V.check_x(Fake(bf16((2, 16)))) == (False, 2, 16)


def test_check_ll_dispatch_limits():
    """The low-latency kernels' limits are host checks shared by both backends."""
    from cupy_ep import limits

    x = bf16((4, 128))
    with raises(ValueError, "topk_idx: the low-latency kernels serve"):
        V.check_ll_dispatch_args(x, np.zeros((4, limits.LL_MAX_TOPK + 1), np.int64), 4, 64, 2)
    with raises(ValueError, "num_max_dispatch_tokens_per_rank"):
        V.check_ll_dispatch_args(x, np.zeros((4, 2), np.int64), limits.LL_MAX_TOKENS + 1, 8, 2)
    with raises(ValueError, "num_experts: the low-latency kernels serve at most"):
        V.check_ll_dispatch_args(x, np.zeros((4, 2), np.int64), 4, limits.LL_MAX_EXPERTS + 2, 2)


def test_check_buffer_args_and_topology():
    from cupy_ep import limits

    V.check_buffer_args(0, 0, False)
    V.check_buffer_args(1, 2, True)
    with raises(ValueError, "num_rdma_bytes"):
        V.check_buffer_args(1, 0, True)
    with raises(ValueError, "num_nvl_bytes"):
        V.check_buffer_args(-1, 0, False)
    with raises(TypeError, "num_rdma_bytes"):
        V.check_buffer_args(0, 1.5, False)
    for bad in (1, 129):
        with raises(ValueError, "num_sms"):
            V.check_buffer_args(0, 0, False, num_sms=bad)
    assert V.check_num_sms(np.int64(24)) == 24
    from cupy_ep import reference

    with raises(ValueError, "num_sms"):              # the same range as the GPU Buffer's
        reference.Buffer.set_num_sms(1)
    with raises(ValueError, "timeout_s: expected a positive, finite number"):
        V.check_buffer_args(0, 0, False, timeout_s=float("nan"))
    V.check_buffer_topology(1 << 20, 0, False, 8, 8)
    V.check_buffer_topology(0, 0, False, 16, 16)                 # no normal mode: any domain size
    with raises(ValueError, "num_nvl_peers: the normal mode serves NVLink domains of at most"):
        V.check_buffer_topology(1 << 20, 1 << 20, False, 2 * limits.MAX_NVL_PEERS, 2 * limits.MAX_NVL_PEERS)
    with raises(ValueError, "num_rdma_bytes: the ranks span 2 NVLink domains"):
        V.check_buffer_topology(1 << 20, 0, False, 4, 2)
    V.check_buffer_topology(1 << 20, 1 << 20, True, 4, 2)         # the symmetric buffer is the LL mode's
    with raises(ValueError, "num_nvl_peers: the normal mode serves at most"):
        V.check_internode_args(limits.MAX_RDMA_RANKS + 1, 1 << 20)
    with raises(ValueError, "comm"):
        V.check_buffer_topology(0, 1 << 20, True, limits.LL_MAX_RANKS + 1, 1)


def test_check_config():
    from cupy_ep import Config

    assert V.check_config(None, 8) is None
    cfg = Config(num_sms=8, num_threads=256)
    assert V.check_config(cfg, 8) is cfg
    with raises(TypeError, "config"):
        V.check_config({"num_sms": 8}, 2)
    with raises(ValueError, "config"):
        V.check_config(Config(num_sms=8, num_threads=128), 8)


def test_check_layout_call():
    from cupy_ep import limits

    assert V.check_layout_call(np.zeros((3, 2), np.int64), 8, 4) == (3, 2)
    with raises(ValueError, "num_experts"):
        V.check_layout_call(np.zeros((3, 2), np.int64), 6, 4)
    with raises(ValueError, "num_experts: the normal mode serves at most"):
        V.check_layout_call(np.zeros((3, 2), np.int64), limits.MAX_EXPERTS + 4, 4)
    with raises(ValueError, "topk_idx: the normal mode serves at most"):
        V.check_layout_call(np.zeros((3, limits.MAX_NORMAL_TOPK + 1), np.int64), 8, 4)


class _Handle:
    def __init__(self, num_tokens=3, hidden=64, num_topk=2, num_rows=5):
        self.num_tokens, self.hidden, self.num_topk, self.num_rows = num_tokens, hidden, num_topk, num_rows


def test_check_cached_dispatch_and_combine():
    h = _Handle()
    V.check_cached_dispatch(h, 3, 64, None, None, 0)
    V.check_cached_dispatch(h, 3, 64, None, None, 5)
    with raises(ValueError, "topk_idx: must be None in a cached dispatch"):
        V.check_cached_dispatch(h, 3, 64, np.zeros((3, 2), np.int64), None)
    with raises(ValueError, "topk_weights: must be None in a cached dispatch"):
        V.check_cached_dispatch(h, 3, 64, None, np.zeros((3, 2), np.float32))
    with raises(ValueError, "x: the cached handle was made for [3, 64]"):
        V.check_cached_dispatch(h, 4, 64, None, None)
    with raises(ValueError, "num_worst_tokens"):
        V.check_cached_dispatch(h, 3, 64, None, None, 6)

    assert V.check_normal_combine(bf16((5, 64)), h, np.zeros((5, 2), np.float32), None) == ()
    assert len(V.check_normal_combine(bf16((5, 64)), h, None, (bf16((3, 64)), None))) == 1
    with raises(ValueError, "x: expected 5 rows"):
        V.check_normal_combine(bf16((4, 64)), h, None, None)
    with raises(ValueError, "x: expected hidden size 64"):
        V.check_normal_combine(bf16((5, 72)), h, None, None)
    with raises(ValueError, "topk_weights: expected shape [5, 2]"):
        V.check_normal_combine(bf16((5, 64)), h, np.zeros((5, 3), np.float32), None)
    with raises(ValueError, "topk_weights: the dispatch that made handle had no topk_idx"):
        V.check_normal_combine(bf16((5, 64)), _Handle(num_topk=0), np.zeros((5, 2), np.float32), None)


def test_check_normal_dispatch():
    itr = np.ones((3, 2), bool)
    lay = (itr.sum(0).astype(np.int32), None, itr, np.zeros(4, np.int32))
    ti, tw = np.zeros((3, 2), np.int64), np.zeros((3, 2), np.float32)
    assert V.check_normal_dispatch(3, *lay, ti, tw, 1, 0, 2, 1) == 4
    assert V.check_normal_dispatch(3, *lay, None, None, 1, 0, 2, 1) == 4
    with raises(ValueError, "topk_weights: required with topk_idx"):
        V.check_normal_dispatch(3, *lay, ti, None, 1, 0, 2, 1)
    with raises(ValueError, "topk_weights: given without topk_idx"):
        V.check_normal_dispatch(3, *lay, None, tw, 1, 0, 2, 1)
    with raises(ValueError, "num_tokens_per_rdma_rank: must be None inside one NVLink domain"):
        V.check_normal_dispatch(3, lay[0], np.zeros(1, np.int32), itr, lay[3], ti, tw, 1, 0, 2, 1)
    # values are the backends' business: an inconsistent count passes here
    assert V.check_normal_dispatch(3, lay[0] + 1, None, itr, lay[3], ti, tw, 1, 0, 2, 1) == 4


def test_passed_checks_are_remembered_by_the_facts_they_read(monkeypatch):
    """check_dispatch_call, check_normal_combine and check_layout_call remember what passed by
    the arguments' types, shapes, dtypes, contiguity and scalars: new arrays of the same facts
    pass without the checks (and are the ones returned), others are checked, a refusal is not
    remembered."""
    itr = np.ones((3, 2), bool)

    def dispatch(x, ti, alignment=1, handle=None):
        lay = (None,) * 4 if handle else (itr.sum(0).astype(np.int32), None, itr, np.zeros(4, np.int32))
        tw = None if ti is None else np.zeros(ti.shape, np.float32)
        return V.check_dispatch_call(x, handle, *lay, ti, tw, alignment, 0, num_ranks=2, num_nvl_ranks=2,
                                     num_nvl_bytes=1 << 30, num_rdma_bytes=0)

    first, again = dispatch(bf16((3, 64)), np.zeros((3, 2), np.int64)), dispatch(bf16((3, 64)), np.zeros((3, 2),
                                                                                                      np.int64))
    assert (again.is_fp8, again.num_tokens, again.hidden, again.num_topk) == (False, 3, 64, 2)
    assert again.routing.num_experts == 4 and again.routing.is_token_in_rank is itr
    assert again.routing.num_tokens_per_rank is not first.routing.num_tokens_per_rank   # this call's arrays
    with raises(ValueError, "topk_idx: must be C-contiguous"):
        dispatch(bf16((3, 64)), np.zeros((2, 3), np.int64).T)
    with raises(TypeError, "expert_alignment"):
        dispatch(bf16((3, 64)), np.zeros((3, 2), np.int64), alignment=True)
    assert dispatch(bf16((3, 64)), None, handle=_Handle()).routing is None
    with raises(ValueError, "x: the cached handle was made for [3, 72]"):
        dispatch(bf16((3, 64)), None, handle=_Handle(hidden=72))
    for _ in range(2):   # refused twice: not remembered
        with raises(ValueError, "expert_alignment"):
            dispatch(bf16((3, 64)), np.zeros((3, 2), np.int64), alignment=0)

    h = _Handle()
    checked = []
    real_check_x = V.check_x
    monkeypatch.setattr(V, "check_x", lambda *a, **kw: checked.append(1) or real_check_x(*a, **kw))
    for _ in range(2):
        assert V.check_normal_combine(bf16((5, 64)), h, None, (bf16((3, 64)), None))[0].shape == (3, 64)
    assert len(checked) <= 1   # the second call's checks did not run
    h.num_rows = 4   # a handle's facts are part of the key
    with raises(ValueError, "x: expected 4 rows"):
        V.check_normal_combine(bf16((5, 64)), h, None, None)
    for _ in range(2):
        assert V.check_layout_call(np.zeros((3, 2), np.int32), 8, 4) == (3, 2)
    with raises(ValueError, "num_experts"):
        V.check_layout_call(np.zeros((3, 2), np.int32), 6, 4)


def test_capacity_checks():
    """The buffer sizes the size hints give hold what they were computed for, and no more."""
    from cupy_ep import geometry as G

    nvl = G.intranode_nvl_size_hint(64, 256, 4, 4)
    V.check_normal_capacity(64, 256, 4, nvl, 4, 4, 0)
    with raises(ValueError, "x: 65 tokens do not fit the NVLink buffer"):
        V.check_normal_capacity(65, 256, 4, nvl, 4, 4, 0)
    rdma = G.internode_rdma_size_hint(64, 256, 4, 2, 4)
    cap = G.rdma_capacity(rdma, 256, 4, 2, 4)
    assert cap >= 64
    V.check_normal_capacity(cap, 256, 4, nvl, 4, 2, rdma)
    with raises(ValueError, "x: "):
        V.check_normal_capacity(cap + 1, 256, 4, nvl, 4, 2, rdma)
    assert V.normal_recv_capacity(nvl, 4, 4, 256, 4) is None
    assert V.normal_recv_capacity(G.internode_nvl_size_hint(100, 256, 4, 2, 4), 4, 2, 256, 4) >= 100

    need = G.ll_size_hint(8, 256, 4)
    V.check_ll_capacity(need, 4, 16, 8, 256)
    with raises(ValueError, "num_rdma_bytes"):
        V.check_ll_capacity(need - 1, 4, 16, 8, 256)


def test_shrink_mode_checks():
    """enable_shrink (a bool, with low_latency_mode only), the mask calls' Buffer and
    low_latency_update_mask_buffer's arguments: the one check of both backends."""
    V.check_enable_shrink(True, True)
    V.check_enable_shrink(np.bool_(False), False)
    with pytest.raises(TypeError, match="^enable_shrink"):
        V.check_enable_shrink(1, True)
    with pytest.raises(ValueError, match="^enable_shrink: .*low_latency_mode=True"):
        V.check_enable_shrink(True, False)
    V.check_shrink_call(True)
    with pytest.raises(ValueError, match="^enable_shrink: the mask calls"):
        V.check_shrink_call(False)
    assert V.check_mask_update(3, True, 0, 4) == (3, 1)
    assert V.check_mask_update(np.int64(0), False, 0, 4) == (0, 0)   # unmasking oneself is harmless
    for bad in (4, -1):
        with pytest.raises(ValueError, match="^rank_to_mask"):
            V.check_mask_update(bad, True, 0, 4)
    with pytest.raises(TypeError, match="^rank_to_mask"):
        V.check_mask_update(1.0, True, 0, 4)
    with pytest.raises(ValueError, match="^rank_to_mask: a rank cannot mask itself"):
        V.check_mask_update(2, True, 2, 4)
