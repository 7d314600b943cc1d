"""Misuse cases, backend-neutral: one list for the reference backend and for the GPU Buffer.

Each case is a call that must raise a given exception type whose message names the argument
(and, for some, more words), the same on both backends. Run on the reference by
``tests/test_misuse.py``; the GPU suite imports the same factory::

    from misuse_cases import misuse_cases, normal_buffer_kwargs, ll_buffer_kwargs, still_works
    buf = cupy_ep.Buffer(comm, **normal_buffer_kwargs(cupy_ep.Buffer, comm.Get_size(), num_nvl_peers))
    ll = cupy_ep.Buffer(comm, **ll_buffer_kwargs(cupy_ep.Buffer, comm.Get_size()))
    with misuse_cases(cupy_ep.Buffer, buf, cupy, comm, ll_buf=ll) as cases:
        for case in cases:
            outcome = case.run()          # None: raised as expected; else what happened
            agree(outcome is None, f"{case.name}: {outcome}")
            still_works(comm, rng, ref_buf, buf)

Rules the cases follow:

* Every rank runs every case, in list order, with the same (bad) arguments, so that calls
  which communicate before raising (a dispatch made to get a handle, a Buffer created and
  destroyed) stay collective. A case never leaves a rank inside a collective when it raised
  as expected on every rank.
* Where the GPU only learns of a problem on the device (expert ids out of range given to
  ``get_dispatch_layout``, a worst-token overflow), the case calls ``buf.check()`` after the
  call: the GPU raises there, the reference already raised in the call (its ``check`` is a
  no-op).
* ``needles[0]`` is the argument the message must name.

``array`` turns NumPy arrays (and FP8 pairs) into the backend's: the ``numpy`` module (kept as
is), the ``cupy`` module (:func:`cupy_ep.testing.to_device`) or any callable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import ml_dtypes
import numpy as np

from cupy_ep import limits
from cupy_ep.errors import CupyEpError, TokenOverflowError
from cupy_ep.fp8 import per_token_cast_to_fp8
from cupy_ep.testing import make_routing, make_weights, make_x, normal_round_trip

BF16 = ml_dtypes.bfloat16

#: Shapes the normal-mode Buffer of the cases is sized for (:func:`normal_buffer_kwargs`).
NORMAL_TOKENS, NORMAL_HIDDEN, NORMAL_TOPK = 16, 256, 4
#: Shapes of the low-latency Buffer (:func:`ll_buffer_kwargs`): M, H, experts per rank.
LL_M, LL_HIDDEN, LL_EXPERTS_PER_RANK = 8, 256, 2
#: Tokens of the "buffer too small" case: far more than any Buffer sized for NORMAL_TOKENS holds.
TOO_MANY_TOKENS = 4096


def normal_buffer_kwargs(buffer_cls, num_ranks: int, num_nvl_peers: Optional[int] = None) -> dict:
    """Constructor arguments of a normal-mode Buffer for the cases (and :func:`still_works`)."""
    peers = num_ranks if num_nvl_peers is None else num_nvl_peers
    nvl = buffer_cls.get_nvl_buffer_size_hint(NORMAL_TOKENS, NORMAL_HIDDEN, num_ranks, NORMAL_TOPK,
                                              num_nvl_peers=peers)
    rdma = buffer_cls.get_rdma_buffer_size_hint(NORMAL_TOKENS, NORMAL_HIDDEN, num_ranks, peers, NORMAL_TOPK)
    return dict(num_nvl_bytes=nvl, num_rdma_bytes=rdma, num_nvl_peers=num_nvl_peers)


def ll_buffer_kwargs(buffer_cls, num_ranks: int) -> dict:
    """Constructor arguments of the low-latency Buffer of the cases."""
    nbytes = buffer_cls.get_low_latency_rdma_size_hint(LL_M, LL_HIDDEN, num_ranks, LL_EXPERTS_PER_RANK * num_ranks)
    return dict(num_rdma_bytes=nbytes, low_latency_mode=True)


@dataclass
class Case:
    """One misuse: ``call()`` must raise ``exc`` with every needle in its message.

    Attributes:
        name: what is wrong.
        exc: the exception type both backends raise.
        needles: words the message must contain; the first is the argument's name.
        call: the misuse (runs on every rank, in list order).
        verify: optional extra check of the exception: returns None or what is wrong.
        mode: "normal", "low_latency" or "buffer" (the Buffer :func:`still_works` should exercise).
    """

    name: str
    exc: type
    needles: tuple
    call: Callable[[], object]
    verify: Optional[Callable[[BaseException], Optional[str]]] = None
    mode: str = "normal"

    def run(self) -> Optional[str]:
        """None when ``call()`` raised as expected, else a description of what happened."""
        try:
            self.call()
        except self.exc as e:
            missing = [w for w in self.needles if w not in str(e)]
            if missing:
                return f"{type(e).__name__} without {missing} in its message: {e}"
            return self.verify(e) if self.verify is not None else None
        except Exception as e:  # noqa: BLE001 - report the wrong type
            return f"expected {self.exc.__name__}, got {type(e).__name__}: {e}"
        return f"expected {self.exc.__name__}, nothing raised"


class MisuseCases(list):
    """The list of :class:`Case`; :meth:`close` (collective) destroys the Buffers the cases made."""

    def __init__(self, cases, owned):
        super().__init__(cases)
        self._owned = owned

    def close(self) -> None:
        for b in self._owned.values():
            b.destroy()
        self._owned.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def array_converter(array):
    name = getattr(array, "__name__", None)
    if name == "numpy":
        return lambda a: a
    if name == "cupy":
        from cupy_ep.testing import to_device

        return to_device
    if callable(array):
        return array
    raise TypeError(f"array: expected numpy, cupy or a callable, got {array!r}")


def misuse_cases(buffer_cls, buf, array, comm, ll_buf=None, seed: int = 1234) -> MisuseCases:
    """Build the misuse cases for one backend.

    Args:
        buffer_cls: the backend's Buffer class (``cupy_ep.Buffer`` or ``cupy_ep.reference.Buffer``).
        buf: a normal-mode Buffer of that class made with :func:`normal_buffer_kwargs` (any
            topology: one NVLink domain or several).
        array: ``numpy``, ``cupy`` or a callable turning a NumPy array into the backend's.
        comm: the mpi4py communicator of ``buf``.
        ll_buf: a low-latency Buffer made with :func:`ll_buffer_kwargs`; None: the cases make
            one when first needed (destroyed by ``close()``).
        seed: seed of the inputs (the same on every rank: every rank passes the same misuse).
    Returns:
        a :class:`MisuseCases` list (close it, or use it as a context manager).
    """
    A = array_converter(array)
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    nvl_peers, multi_domain = buf.num_nvl_ranks, buf.num_rdma_ranks > 1
    rng = np.random.default_rng(seed)
    owned = {}

    def ll():
        if ll_buf is not None:
            return ll_buf
        if "ll" not in owned:
            owned["ll"] = buffer_cls(comm, **ll_buffer_kwargs(buffer_cls, num_ranks))
        return owned["ll"]

    def twin():
        """A second normal-mode Buffer of the same sizes (its handles have the same shapes)."""
        if "twin" not in owned:
            owned["twin"] = buffer_cls(comm, **normal_buffer_kwargs(buffer_cls, num_ranks, nvl_peers))
        return owned["twin"]

    def dead():
        if "dead" not in owned:
            b = buffer_cls(comm, **normal_buffer_kwargs(buffer_cls, num_ranks, nvl_peers))
            b.destroy()
            owned["dead"] = b
        return owned["dead"]

    # ---- normal-mode inputs (the same on every rank)
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

    def no_nvl_buffer():
        b = buffer_cls(comm)
        try:
            b.dispatch(x, **lay, **topk)
        finally:
            b.destroy()

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
        # ---- Buffer construction and modes
        Case("Buffer: low_latency_mode without num_rdma_bytes", ValueError, ("num_rdma_bytes",),
             lambda: buffer_cls(comm, low_latency_mode=True), mode="buffer"),
        Case("Buffer: negative num_nvl_bytes", ValueError, ("num_nvl_bytes",),
             lambda: buffer_cls(comm, num_nvl_bytes=-1), mode="buffer"),
        Case("Buffer: num_nvl_peers that does not divide the ranks", ValueError, ("num_nvl_peers",),
             lambda: buffer_cls(comm, num_nvl_peers=num_ranks + 1), mode="buffer"),
        Case("Buffer: ll_transport not a transport", ValueError, ("ll_transport",),
             lambda: buffer_cls(comm, num_rdma_bytes=1 << 20, low_latency_mode=True, ll_transport="nvl"),
             mode="buffer"),
        Case("Buffer: timeout_s a string", ValueError, ("timeout_s",),
             lambda: buffer_cls(comm, timeout_s="5"), mode="buffer"),
        Case("Buffer: num_sms 1", ValueError, ("num_sms",), lambda: buffer_cls(comm, num_sms=1), mode="buffer"),
        Case("dispatch on a Buffer without num_nvl_bytes", ValueError, ("num_nvl_bytes",), no_nvl_buffer,
             mode="buffer"),
        Case("low-latency call on a normal-mode Buffer", ValueError, ("low_latency_mode",),
             lambda: buf.low_latency_dispatch(x, idx, LL_M, e)),
    ]
    if num_ranks > 1:
        cases.insert(3, Case("layout: num_experts not a multiple of the ranks", ValueError, ("num_experts",),
                             lambda: buf.get_dispatch_layout(idx, e + 1)))
    if not multi_domain:
        cases.append(Case("dispatch: num_tokens_per_rdma_rank inside one NVLink domain", ValueError,
                          ("num_tokens_per_rdma_rank",),
                          dispatch_with(num_tokens_per_rdma_rank=A(np.zeros(1, np.int32)))))
    else:
        def no_rdma_bytes():
            kw = normal_buffer_kwargs(buffer_cls, num_ranks, nvl_peers)
            buffer_cls(comm, num_nvl_bytes=kw["num_nvl_bytes"], num_nvl_peers=nvl_peers)
        cases.append(Case("Buffer: across NVLink domains without num_rdma_bytes", ValueError, ("num_rdma_bytes",),
                          no_rdma_bytes, mode="buffer"))

    def ll_twin():
        if "ll_twin" not in owned:
            owned["ll_twin"] = buffer_cls(comm, **ll_buffer_kwargs(buffer_cls, num_ranks))
        return owned["ll_twin"]

    cases += _ll_cases(ll, ll_twin, A, rng, num_ranks, x, idx, e)
    cases += _destroyed_cases(dead, A, x_np, idx_np, e)
    return MisuseCases(cases, owned)


def _ll_cases(ll, ll_twin, A, rng, num_ranks, x_normal, idx_normal, e_normal):
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


def _destroyed_cases(dead, A, x_np, idx_np, e):
    x, idx = A(x_np), A(idx_np)
    calls = {
        "get_dispatch_layout": lambda: dead().get_dispatch_layout(idx, e),
        "dispatch": lambda: dead().dispatch(x),
        "combine": lambda: dead().combine(x, None),
        "check": lambda: dead().check(),
        "low_latency_dispatch": lambda: dead().low_latency_dispatch(x, idx, LL_M, e),
        "low_latency_combine": lambda: dead().low_latency_combine(x, idx, idx, None),
        "get_next_low_latency_combine_buffer": lambda: dead().get_next_low_latency_combine_buffer(None),
        "clean_low_latency_buffer": lambda: dead().clean_low_latency_buffer(LL_M, LL_HIDDEN, e),
    }
    return [Case(f"destroyed Buffer: {name}", CupyEpError, ("destroyed",), call, mode="buffer")
            for name, call in calls.items()]


def still_works(comm, rng, ref_buf, gpu_buf=None, num_tokens=None) -> None:
    """A small normal-mode round trip, checked (``cupy_ep.testing.normal_round_trip``), on Buffers
    made with :func:`normal_buffer_kwargs`; raises ``Mismatch`` on every rank when it fails."""
    num_ranks = comm.Get_size()
    n = int(rng.integers(0, NORMAL_TOKENS + 1)) if num_tokens is None else num_tokens
    normal_round_trip(comm, ref_buf, gpu_buf, rng, num_tokens=n, hidden=NORMAL_HIDDEN, num_topk=NORMAL_TOPK,
                      num_experts=2 * num_ranks, kind="holes", bias_count=1)


def reference_ll_round_trip(comm, ll_buf, rng, num_tokens=None) -> None:
    """A small low-latency dispatch + combine on a reference Buffer made with :func:`ll_buffer_kwargs`,
    with identity experts: ``combined[t] == sum_k w[t, k] * x[t]`` over the valid slots (within bf16
    rounding). Raises ``Mismatch`` on every rank when it fails."""
    from cupy_ep.testing import agree

    num_ranks = comm.Get_size()
    e = LL_EXPERTS_PER_RANK * num_ranks
    n = int(rng.integers(0, LL_M + 1)) if num_tokens is None else num_tokens
    x = make_x(rng, n, LL_HIDDEN)
    idx = make_routing(rng, n, e, min(3, e), "holes", num_ranks)
    w = make_weights(rng, n, idx.shape[1])
    recv_x, recv_count, handle, _, _ = ll_buf.low_latency_dispatch(x, idx, LL_M, e, use_fp8=False)
    out, _, _ = ll_buf.low_latency_combine(recv_x, idx, w, handle)
    want = (np.where(idx >= 0, w, 0).astype(np.float64).sum(axis=1)[:, None]) * x.astype(np.float64)
    bound = np.abs(want) * 2.0 ** -7 + 1e-6
    received = comm.allreduce(int(np.asarray(recv_count).sum()))
    sent = comm.allreduce(int((idx >= 0).sum()))
    ok = out.shape == (n, LL_HIDDEN) and bool((np.abs(out.astype(np.float64) - want) <= bound).all())
    agree(comm, ok and received == sent, f"low-latency round trip: shape {out.shape}, {received} rows received "
                                         f"for {sent} sent, values ok={ok}")


def run_reference_cases(comm, cases, run, buf, ll_buf, rng, ok_line: str) -> int:
    """Runs each case on every rank (``run(case)``: None, or what went wrong on this rank), then a
    checked round trip on the Buffer of the case's mode (``buf`` or ``ll_buf``, reference Buffers).
    Rank 0 prints ``FAIL ...`` per failing case, or ``ok_line`` when all passed; returns the exit
    code (0: all passed)."""
    from cupy_ep.testing import Mismatch

    failures = []
    for case in cases:
        outcome = run(case)
        bad = [f"rank {r}: {o}" for r, o in enumerate(comm.allgather(outcome)) if o is not None]
        if bad:
            failures.append(f"{case.name}: {'; '.join(bad)}")
        try:
            if case.mode == "low_latency":
                reference_ll_round_trip(comm, ll_buf, rng)
            else:
                still_works(comm, rng, buf)
        except Mismatch as e:
            failures.append(f"{case.name}: the Buffer no longer works: {e}")
    if comm.Get_rank() == 0:
        for f in failures:
            print(f"FAIL {f}", flush=True)
        if not failures:
            print(ok_line, flush=True)
    return 1 if failures else 0


__all__ = ["Case", "MisuseCases", "misuse_cases", "normal_buffer_kwargs", "ll_buffer_kwargs", "still_works",
           "reference_ll_round_trip", "run_reference_cases",
           "NORMAL_TOKENS", "NORMAL_HIDDEN", "NORMAL_TOPK", "LL_M", "LL_HIDDEN", "LL_EXPERTS_PER_RANK"]
