"""The host side of a non-cached normal-mode dispatch after notify (cupy_ep.normal), without a
GPU: the outputs' addresses and row count are published in the descriptor, its sequence number
last, before the per-expert counts are read; a cancelled call publishes "drop every row"."""
import types

import numpy as np
import pytest

from cupy_ep import limits
from cupy_ep.geometry import DESC_WORDS, HOST_OUT_INTS
from cupy_ep.normal import NormalEngine


class _Array:
    def __init__(self, ptr):
        self.data = types.SimpleNamespace(ptr=ptr)


class _Status:
    status = limits.ST_OK
    from_layout = False

    def take(self):
        return None


def _engine(host_out):
    eng = NormalEngine.__new__(NormalEngine)   # no GPU memory: plain NumPy records
    eng.host_out, eng.desc = host_out, np.zeros(DESC_WORDS, np.uint64)
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
