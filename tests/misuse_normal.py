"""The normal-mode misuse cases (tests/misuse_cases.py assembles the list): get_dispatch_layout,
dispatch (types and shapes, routing values, sizes), cached dispatch and combine, on a Buffer made
with :func:`misuse_common.normal_buffer_kwargs`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cupy_ep import limits
from cupy_ep.errors import TokenOverflowError
from cupy_ep.fp8 import per_token_cast_to_fp8
from cupy_ep.testing import make_routing, make_weights, make_x
from misuse_common import NORMAL_HIDDEN, NORMAL_TOPK, TOO_MANY_TOKENS, Case


@dataclass
class NormalInputs:
    """The normal-mode inputs of the cases (the same on every rank), for the other modes' cases."""

    x: object            # the backend's arrays
    idx: object
    lay: dict            # get_dispatch_layout's results as dispatch arguments
    topk: dict           # topk_idx, topk_weights
    num_experts: int
    x_np: np.ndarray     # NumPy originals
    idx_np: np.ndarray


def normal_cases(buf, A, comm, rng, twin) -> tuple[list, NormalInputs]:
    """The normal-mode cases on ``buf`` and the inputs they use. ``A`` converts NumPy arrays into
    the backend's, ``rng`` draws every input (the same seed on every rank), ``twin()`` is a second
    normal-mode Buffer of the same sizes."""
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    multi_domain = buf.num_rdma_ranks > 1
    n, h, k = 8, NORMAL_HIDDEN, NORMAL_TOPK
    e = 2 * num_ranks
    x_np = make_x(rng, n, h)
    idx_np = make_routing(rng, n, e, k, "random", num_ranks)
    idx_np[0, 0] = max(int(idx_np[0, 0]), 0)
    w_np = make_weights(rng, n, k)
    x, idx, w = A(x_np), A(idx_np), A(w_np)
    layout = buf.get_dispatch_layout(idx, e)
    lay = dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
               num_tokens_per_expert=layout[2])
    topk = dict(topk_idx=idx, topk_weights=w)

    def dispatch_with(**changes):
        def call():
            kw = dict(lay, **topk)
            kw.update(changes)
            return buf.dispatch(kw.pop("x", x), **kw)
        return call

    def good_dispatch(with_topk=True):
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, **lay, **(topk if with_topk else {}))
        return recv_x, recv_w, handle

    def cached(**changes):
        def call():
            handle = good_dispatch()[2]
            kw = dict(changes)
            return buf.dispatch(kw.pop("x", x), handle=handle, **kw)
        return call

    def combine(make_args, with_topk=True):
        def call():
            recv_x, recv_w, handle = good_dispatch(with_topk)
            args = make_args(recv_x, recv_w, handle)
            return buf.combine(args.pop("x", recv_x), args.pop("handle", handle), **args)
        return call

    def twin_dispatch():
        recv_x, _, recv_w, _, handle, _ = twin().dispatch(x, **lay, **topk)
        return recv_x, recv_w, handle

    def twin_combine():
        recv_x, _, handle = twin_dispatch()
        return buf.combine(recv_x, handle)

    def bad_ids(value):
        bad = idx_np.copy()
        bad[0, 0] = value
        return A(bad)

    other_np = idx_np.copy()
    other_np[0] = -1                        # token 0 goes nowhere here, somewhere in idx_np
    other = buf.get_dispatch_layout(A(other_np), e)

    def with_layout_check(call):
        def run():
            call()
            buf.check()
        return run

    # every rank's tokens all pick expert 0: rank 0 receives n * R rows, more than 1
    over_np = np.full((n, k), -1, np.int64)
    over_np[:, 0] = 0
    over_idx = A(over_np)
    over_layout = buf.get_dispatch_layout(over_idx, e)

    def overflow(worst=1):
        buf.dispatch(x, num_tokens_per_rank=over_layout[0], num_tokens_per_rdma_rank=over_layout[1],
                     is_token_in_rank=over_layout[3], num_tokens_per_expert=over_layout[2], topk_idx=over_idx,
                     topk_weights=w, num_worst_tokens=worst)
        buf.check()

    def overflow_fields(exc):
        got = (exc.rank, exc.arrived, exc.allowed)
        return None if got == (0, n * num_ranks, 1) else f"(rank, arrived, allowed) = {got}, want {(0, n * num_ranks, 1)}"

    big_np = make_routing(rng, TOO_MANY_TOKENS, e, k, "random", num_ranks)

    def too_many_tokens():
        big_idx = A(big_np)
        big = buf.get_dispatch_layout(big_idx, e)
        buf.dispatch(A(make_x(rng, TOO_MANY_TOKENS, h)), num_tokens_per_rank=big[0], num_tokens_per_rdma_rank=big[1],
                     is_token_in_rank=big[3], num_tokens_per_expert=big[2], topk_idx=big_idx,
                     topk_weights=A(make_weights(rng, TOO_MANY_TOKENS, k)))

    x2_np = make_x(rng, n, 2 * h)
    fp8 = per_token_cast_to_fp8(x_np)
    fp8_64 = per_token_cast_to_fp8(make_x(rng, n, 128))

    cases = [
        # ---- layout
        Case("layout: topk_idx float32", TypeError, ("topk_idx",),
             lambda: buf.get_dispatch_layout(A(idx_np.astype(np.float32)), e)),
        Case("layout: topk_idx 1-D", ValueError, ("topk_idx",), lambda: buf.get_dispatch_layout(A(idx_np[:, 0].copy()), e)),
        Case("layout: topk_idx not C-contiguous", ValueError, ("topk_idx", "C-contiguous"),
             lambda: buf.get_dispatch_layout(A(np.repeat(idx_np, 2, axis=1))[:, ::2], e)),
        Case("layout: num_experts 0", ValueError, ("num_experts",), lambda: buf.get_dispatch_layout(idx, 0)),
        Case("layout: more experts than the normal mode serves", ValueError, ("num_experts", str(limits.MAX_EXPERTS)),
             lambda: buf.get_dispatch_layout(idx, (limits.MAX_EXPERTS // num_ranks + 1) * num_ranks)),
        Case("layout: more top-k columns than the normal mode serves", ValueError,
             ("topk_idx", str(limits.MAX_NORMAL_TOPK)),
             lambda: buf.get_dispatch_layout(A(np.full((n, limits.MAX_NORMAL_TOPK + 1), -1, np.int64)), e)),
        Case("layout: expert id == num_experts (then check)", ValueError, ("topk_idx", "expert id"),
             with_layout_check(lambda: buf.get_dispatch_layout(bad_ids(e), e))),
        Case("layout: expert id -2 (then check)", ValueError, ("topk_idx", "expert id"),
             with_layout_check(lambda: buf.get_dispatch_layout(bad_ids(-2), e))),
        # ---- dispatch: types and shapes
        Case("dispatch: x float32", TypeError, ("x",), dispatch_with(x=A(x_np.astype(np.float32)))),
        Case("dispatch: hidden not a multiple of 8", ValueError, ("x",), dispatch_with(x=A(make_x(rng, n, 12)))),
        Case("dispatch: x not C-contiguous", ValueError, ("x", "C-contiguous"), dispatch_with(x=A(x2_np)[:, ::2])),
        Case("dispatch: x rows differ from the layout", ValueError, ("is_token_in_rank",),
             dispatch_with(x=A(make_x(rng, n + 1, h)))),
        Case("dispatch: FP8 scales of the wrong shape", ValueError, ("x[1]",),
             dispatch_with(x=A((fp8[0], np.ones((n, h // 128 + 1), np.float32))))),
        Case("dispatch: FP8 hidden not a multiple of 128", ValueError, ("x",),
             dispatch_with(x=A((fp8_64[0][:, :64].copy(), np.ones((n, 1), np.float32))))),
        Case("dispatch: FP8 data int8", TypeError, ("x[0]",),
             dispatch_with(x=(A(np.zeros((n, h), np.int8)), A(fp8[1])))),
        Case("dispatch: topk_weights with another K", ValueError, ("topk_weights",),
             dispatch_with(topk_weights=A(w_np[:, :k - 1].copy()))),
        Case("dispatch: topk_weights float64", TypeError, ("topk_weights",),
             dispatch_with(topk_weights=A(w_np.astype(np.float64)))),
        Case("dispatch: topk_idx without topk_weights", ValueError, ("topk_weights",), dispatch_with(topk_weights=None)),
        Case("dispatch: topk_weights without topk_idx", ValueError, ("topk_weights",), dispatch_with(topk_idx=None)),
        Case("dispatch: no layout arrays", ValueError, ("num_tokens_per_rank",),
             lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w)),
        Case("dispatch: is_token_in_rank int32", TypeError, ("is_token_in_rank",),
             dispatch_with(is_token_in_rank=A(np.ones((n, num_ranks), np.int32)))),
        Case("dispatch: expert_alignment 0", ValueError, ("expert_alignment",), dispatch_with(expert_alignment=0)),
        Case("dispatch: num_worst_tokens -1", ValueError, ("num_worst_tokens",), dispatch_with(num_worst_tokens=-1)),
        # ---- dispatch: routing values
        Case("dispatch: expert id == num_experts", ValueError, ("topk_idx",), dispatch_with(topk_idx=bad_ids(e))),
        Case("dispatch: expert id -2", ValueError, ("topk_idx",), dispatch_with(topk_idx=bad_ids(-2))),
        Case("dispatch: num_tokens_per_rank disagrees with is_token_in_rank", ValueError, ("num_tokens_per_rank",),
             dispatch_with(num_tokens_per_rank=layout[0] + 1)),
        Case("dispatch: is_token_in_rank disagrees with topk_idx", ValueError, ("is_token_in_rank",),
             dispatch_with(num_tokens_per_rank=other[0], num_tokens_per_rdma_rank=other[1],
                           is_token_in_rank=other[3])),
        Case("dispatch: num_tokens_per_expert disagrees with topk_idx", ValueError, ("num_tokens_per_expert",),
             dispatch_with(num_tokens_per_expert=layout[2] + 1)),
        Case("dispatch: expert id out of range on rank 0 only", ValueError,
             ("topk_idx",) if rank == 0 else ("rank 0", "invalid input"),
             dispatch_with(topk_idx=bad_ids(e) if rank == 0 else idx)),
        # ---- dispatch: sizes
        Case("dispatch: more tokens than the buffers hold", ValueError,
             ("x", "num_rdma_bytes" if multi_domain else "num_nvl_bytes"), too_many_tokens),
        Case("dispatch: a rank receives more rows than num_worst_tokens (then check)", TokenOverflowError,
             ("num_worst_tokens", "arrived"), overflow, verify=overflow_fields),
        Case("dispatch: rank 0 alone has a num_worst_tokens too small (then check)", TokenOverflowError,
             ("num_worst_tokens", "arrived"), lambda: overflow(1 if rank == 0 else n * num_ranks),
             verify=overflow_fields),
        # ---- cached dispatch
        Case("cached dispatch with topk_idx", ValueError, ("topk_idx",), cached(topk_idx=idx)),
        Case("cached dispatch with topk_weights", ValueError, ("topk_weights",), cached(topk_weights=w)),
        Case("cached dispatch with another [N, H]", ValueError, ("x",), cached(x=A(make_x(rng, n + 1, h)))),
        Case("cached dispatch with num_worst_tokens other than the handle's rows", ValueError, ("num_worst_tokens",),
             cached(num_worst_tokens=10 ** 6)),
        Case("cached dispatch with a foreign handle", TypeError, ("handle",),
             lambda: buf.dispatch(x, handle=(1, 2, 3))),
        Case("cached dispatch with another Buffer's handle of the same shapes", ValueError,
             ("handle", "not made by a dispatch of this Buffer"), lambda: buf.dispatch(x, handle=twin_dispatch()[2])),
        Case("combine with another Buffer's handle of the same shapes", ValueError,
             ("handle", "not made by a dispatch of this Buffer"),
             twin_combine),
        # ---- combine
        Case("combine: topk_weights with another K", ValueError, ("topk_weights",),
             combine(lambda rx, rw, hd: dict(topk_weights=A(np.zeros((rx.shape[0], k + 1), np.float32))))),
        Case("combine: topk_weights after a dispatch without topk_idx", ValueError, ("topk_weights",),
             combine(lambda rx, rw, hd: dict(topk_weights=A(np.zeros((rx.shape[0], k), np.float32))),
                     with_topk=False)),
        Case("combine: x with other rows", ValueError, ("x",),
             combine(lambda rx, rw, hd: dict(x=A(make_x(rng, rx.shape[0] + 1, h))))),
        Case("combine: x float32", TypeError, ("x",),
             combine(lambda rx, rw, hd: dict(x=A(np.zeros((rx.shape[0], h), np.float32))))),
        Case("combine: bias of the wrong shape", ValueError, ("bias",),
             combine(lambda rx, rw, hd: dict(bias=A(make_x(rng, n, h + 8))))),
        Case("combine: not a dispatch handle", TypeError, ("handle",), combine(lambda rx, rw, hd: dict(handle=(1, 2)))),
    ]
    if num_ranks > 1:
        cases.insert(3, Case("layout: num_experts not a multiple of the ranks", ValueError, ("num_experts",),
                             lambda: buf.get_dispatch_layout(idx, e + 1)))
    if not multi_domain:
        cases.append(Case("dispatch: num_tokens_per_rdma_rank inside one NVLink domain", ValueError,
                          ("num_tokens_per_rdma_rank",),
                          dispatch_with(num_tokens_per_rdma_rank=A(np.zeros(1, np.int32)))))
    return cases, NormalInputs(x, idx, lay, topk, e, x_np, idx_np)
