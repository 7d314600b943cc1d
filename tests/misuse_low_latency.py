"""The low-latency misuse cases (tests/misuse_cases.py assembles the list): low_latency_dispatch
and low_latency_combine arguments, and another Buffer's handle."""
from __future__ import annotations

import numpy as np

from cupy_ep import limits
from cupy_ep.testing import make_routing, make_weights, make_x
from misuse_common import LL_EXPERTS_PER_RANK, LL_HIDDEN, LL_M, Case


def ll_cases(ll, ll_twin, A, rng, num_ranks) -> list:
    """The low-latency cases on ``ll()`` (a Buffer made with :func:`misuse_common.ll_buffer_kwargs`);
    ``ll_twin()`` is a second one of the same sizes."""
    m, h = LL_M, LL_HIDDEN
    e = LL_EXPERTS_PER_RANK * num_ranks
    n, k = 5, 3
    x_np = make_x(rng, n, h)
    idx_np = make_routing(rng, n, e, k, "holes", num_ranks)
    w_np = make_weights(rng, n, k)
    x, idx, w = A(x_np), A(idx_np), A(w_np)

    def dispatch(**changes):
        kw = dict(x=x, topk_idx=idx, num_max_dispatch_tokens_per_rank=m, num_experts=e, use_fp8=False)
        kw.update(changes)
        return lambda: ll().low_latency_dispatch(**kw)

    def combine(make_args):
        def call():
            recv_x, _, handle, _, _ = ll().low_latency_dispatch(x, idx, m, e, use_fp8=False)
            args = dict(x=recv_x, topk_idx=idx, topk_weights=w, handle=handle)
            args.update(make_args(recv_x, handle))
            return ll().low_latency_combine(**args)
        return call

    big_h = 16384   # with M = LL_MAX_TOKENS: a size hint of many GiB, more than any test buffer

    cases = [
        Case("low_latency_dispatch: hidden not a multiple of 128", ValueError, ("x",),
             dispatch(x=A(make_x(rng, n, 64)))),
        Case("low_latency_dispatch: more tokens than M", ValueError, ("x", "num_max_dispatch_tokens_per_rank"),
             dispatch(x=A(make_x(rng, m + 1, h)), topk_idx=A(np.full((m + 1, k), -1, np.int64)))),
        Case("low_latency_dispatch: M = 0", ValueError, ("num_max_dispatch_tokens_per_rank",),
             dispatch(num_max_dispatch_tokens_per_rank=0)),
        Case("low_latency_dispatch: x float32", TypeError, ("x",), dispatch(x=A(x_np.astype(np.float32)))),
        Case("low_latency_dispatch: topk_idx rows differ from x", ValueError, ("topk_idx",),
             dispatch(topk_idx=A(idx_np[:-1].copy()))),
        Case("low_latency_dispatch: more top-k columns than the kernels serve", ValueError,
             ("topk_idx", str(limits.LL_MAX_TOPK)),
             dispatch(topk_idx=A(np.full((n, limits.LL_MAX_TOPK + 1), -1, np.int64)))),
        Case("low_latency_dispatch: request larger than num_rdma_bytes", ValueError, ("num_rdma_bytes",),
             dispatch(x=A(make_x(rng, 1, big_h)), topk_idx=A(np.zeros((1, 1), np.int64)),
                      num_max_dispatch_tokens_per_rank=limits.LL_MAX_TOKENS)),
        Case("low_latency_dispatch: cumulative stats int64", TypeError, ("cumulative_local_expert_recv_stats",),
             dispatch(cumulative_local_expert_recv_stats=A(np.zeros(LL_EXPERTS_PER_RANK, np.int64)))),
        Case("low_latency_combine: topk_idx with fewer rows than the dispatch", ValueError, ("topk_idx",),
             combine(lambda rx, hd: dict(topk_idx=A(idx_np[:-1].copy()), topk_weights=A(w_np[:-1].copy())))),
        Case("low_latency_combine: topk_idx with another top-k width", ValueError, ("topk_idx",),
             combine(lambda rx, hd: dict(topk_idx=A(idx_np[:, :-1].copy()), topk_weights=A(w_np[:, :-1].copy())))),
        Case("low_latency_combine: topk_weights with fewer rows", ValueError, ("topk_weights",),
             combine(lambda rx, hd: dict(topk_weights=A(w_np[:-1].copy())))),
        Case("low_latency_combine: no topk_weights", ValueError, ("topk_weights",),
             combine(lambda rx, hd: dict(topk_weights=None))),
        Case("low_latency_combine: x of the wrong shape", ValueError, ("x",),
             combine(lambda rx, hd: dict(x=rx[:, :-1]))),
        Case("low_latency_combine: out float32", TypeError, ("out",),
             combine(lambda rx, hd: dict(out=A(np.zeros((n, h), np.float32))))),
        Case("low_latency_combine: a truncated handle", TypeError, ("handle",),
             combine(lambda rx, hd: dict(handle=hd[:3]))),
        Case("low_latency_combine with another Buffer's handle of the same shapes", ValueError,
             ("handle", "not made by a dispatch of this Buffer"),
             combine(lambda rx, hd: dict(handle=ll_twin().low_latency_dispatch(x, idx, m, e, use_fp8=False)[2]))),
    ]
    if num_ranks > 1:
        cases.append(Case("low_latency_dispatch: num_experts not a multiple of the ranks", ValueError,
                          ("num_experts",), dispatch(num_experts=e + 1)))
    for c in cases:
        c.mode = "low_latency"
    return cases
