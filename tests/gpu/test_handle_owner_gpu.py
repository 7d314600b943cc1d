"""Handles carry their owner on the GPU (issue 21, item 7): a handle of another Buffer, of the
same shapes, is refused with ValueError naming ``handle`` before any kernel runs, on every call
that takes one (cached dispatch, combine, low_latency_combine, the zero-copy buffer); both
Buffers keep working, and the handle still works on the Buffer that made it. The misuse cases
(tests/misuse_cases.py) check the same refusals on both backends."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from misuse_cases import (LL_EXPERTS_PER_RANK, LL_HIDDEN, LL_M, NORMAL_HIDDEN, NORMAL_TOPK,  # noqa: E402
                          ll_buffer_kwargs, normal_buffer_kwargs, still_works)

NEEDLE = "not made by a dispatch of this Buffer"


def _refused(call):
    try:
        call()
    except ValueError as e:
        return None if str(e).startswith("handle") and NEEDLE in str(e) else f"wrong message: {e}"
    except Exception as e:  # noqa: BLE001
        return f"expected ValueError, got {type(e).__name__}: {e}"
    return "nothing raised"


def test_normal_handle_of_another_buffer(comm, agree, rng, nvl_peers):
    import cupy_ep
    from cupy_ep import reference
    from cupy_ep.testing import make_routing, make_weights, make_x, to_device

    R = comm.Get_size()
    kw = normal_buffer_kwargs(cupy_ep.Buffer, R, nvl_peers)
    a, b, ref = cupy_ep.Buffer(comm, **kw), cupy_ep.Buffer(comm, **kw), reference.Buffer(comm, **kw)
    try:
        n, e = 8, 2 * R
        x = to_device(make_x(rng, n, NORMAL_HIDDEN))
        idx = to_device(make_routing(rng, n, e, NORMAL_TOPK, "random", R))
        w = to_device(make_weights(rng, n, NORMAL_TOPK))
        lay = a.get_dispatch_layout(idx, e)
        routing = dict(num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1], is_token_in_rank=lay[3],
                       num_tokens_per_expert=lay[2], topk_idx=idx, topk_weights=w)
        recv_x, _, _, _, handle, _ = a.dispatch(x, **routing)
        for what, call in (("combine", lambda: b.combine(recv_x, handle)),
                           ("cached dispatch", lambda: b.dispatch(x, handle=handle))):
            outcome = _refused(call)
            agree(outcome is None, f"{what} on another Buffer: {outcome}")
        out, _, _ = a.combine(recv_x, handle)          # the handle still works where it was made
        agree(out.shape == (n, NORMAL_HIDDEN), f"combine on the owner: shape {out.shape}")
        agree(handle.owner[1] == 1, f"the first dispatch of a Buffer stamps 1, got {handle.owner[1]}")
        still_works(comm, rng, ref, b)
    finally:
        for buf in (a, b, ref):
            buf.destroy()


def test_low_latency_handle_of_another_buffer(comm, agree, rng):
    import cupy_ep
    from cupy_ep.testing import make_routing, make_weights, make_x, to_device, to_host

    R = comm.Get_size()
    kw = ll_buffer_kwargs(cupy_ep.Buffer, R)
    a, b = cupy_ep.Buffer(comm, **kw), cupy_ep.Buffer(comm, **kw)
    try:
        e = LL_EXPERTS_PER_RANK * R
        x = to_device(make_x(rng, 5, LL_HIDDEN))
        idx = to_device(make_routing(rng, 5, e, 3, "holes", R))
        w = to_device(make_weights(rng, 5, 3))
        recv_x, _, handle, _, _ = a.low_latency_dispatch(x, idx, LL_M, e, use_fp8=False)
        for what, call in (("low_latency_combine", lambda: b.low_latency_combine(recv_x, idx, w, handle)),
                           ("zero-copy buffer", lambda: b.get_next_low_latency_combine_buffer(handle))):
            outcome = _refused(call)
            agree(outcome is None, f"{what} on another Buffer: {outcome}")
        out, _, _ = a.low_latency_combine(recv_x, idx, w, handle)
        agree(out.shape == (5, LL_HIDDEN) and bool(np.isfinite(to_host(out).astype(np.float32)).all()),
              "low_latency_combine on the owner")
        a.check()
        b.check()
    finally:
        for buf in (a, b):
            buf.destroy()
