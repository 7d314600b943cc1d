"""Asymmetric cases, backend-neutral: one rank (the last) passes bad input or is absent, the
others are valid. Every rank's call must raise (the odd rank its own error, the others the
error of a cancelled call, or of a timeout when the odd rank does not arrive), in bounded time,
and the same Buffer must then make a correct round trip (issue 21; docs/api.md, "Errors").

Run on the reference by ``tests/mpi/check_asymmetric.py`` (``tests/test_asymmetric.py``, 2 and 4
ranks) and on the GPU by ``tests/gpu/test_asymmetric_gpu.py``::

    with asymmetric_cases(buffer_cls, buf, ll, array, comm, timeout_s) as cases:
        for case in cases:
            outcome = case.run(comm.Get_rank() == case.odd_rank)   # None: as expected
            comm.Barrier()                                          # the harness's own sync
            ... round trip on the case's Buffer (case.mode) ...

The Buffers must be made with ``timeout_s`` (small: the absent cases wait for it) and
:func:`misuse_cases.normal_buffer_kwargs` / :func:`misuse_cases.ll_buffer_kwargs`.

The "new shape" cases make a call of shapes no earlier case used; on the GPU its first call
compiles, and the compile agreement is the host step where the peers learn of a refusal or an
absence. ``as_new_shape(call)`` (the GPU runner's) runs ``call`` on every rank, then makes the
process forget the kernels it compiled (not the compiler's disk cache), so that the timed call
agrees again without the minutes of compilation in its time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from cupy_ep.errors import CallMismatchError, CommTimeoutError
from cupy_ep.testing import make_routing, make_weights, make_x
from misuse_cases import LL_EXPERTS_PER_RANK, LL_HIDDEN, LL_M, NORMAL_HIDDEN, NORMAL_TOPK, MisuseCases, array_converter

#: A prompt call (cancelled by a peer's bad input) takes at most this share of timeout_s.
PROMPT_SHARE = 0.5
#: An absent rank arrives this many timeout_s late.
ABSENT_DELAY = 1.5


@dataclass
class Expect:
    """What one side of a case must raise: ``exc`` with every needle in its message, after about
    ``timeout_s`` (``waits``) or promptly; ``peers``: the ``CommTimeoutError.peers`` it must name."""

    exc: type
    needles: tuple
    waits: bool = False
    peers: Optional[Callable[[list], bool]] = None


@dataclass
class AsymmetricCase:
    """One asymmetric case.

    Attributes:
        name: what the odd rank does.
        odd: the odd rank's call. good: the other ranks' call.
        odd_expect, good_expect: what each side must raise.
        odd_delay_s: the odd rank arrives this late (an absent rank), not counted in its time.
        mode: "normal", "low_latency" or "buffer" (the Buffer the round trip after it exercises).
        gpu: whether the GPU backend keeps this case's contract yet (docs/api.md, "Errors").
        internode: whether it keeps it across NVLink domains too (a normal-mode Buffer of several
            domains, tests/gpu/test_asymmetric_internode_gpu.py).
        prepare: valid calls every rank makes first (for example the dispatch whose handle the
            odd rank's call uses).
    """

    name: str
    odd: Callable[[], object]
    good: Callable[[], object]
    odd_expect: Expect
    good_expect: Expect
    odd_rank: int
    timeout_s: float
    odd_delay_s: float = 0.0
    mode: str = "normal"
    gpu: bool = False
    internode: bool = False
    prepare: Optional[Callable[[], object]] = None

    def run(self, is_odd: bool) -> Optional[str]:
        """Runs ``prepare`` (every rank, valid calls, not timed), then this rank's side; None when
        it raised as expected in the expected time."""
        if self.prepare is not None:
            self.prepare()
        call, expect = (self.odd, self.odd_expect) if is_odd else (self.good, self.good_expect)
        if is_odd and self.odd_delay_s:
            time.sleep(self.odd_delay_s)
        start = time.monotonic()
        try:
            call()
        except expect.exc as e:
            took = time.monotonic() - start
            return _judge(e, expect, took, self.timeout_s)
        except Exception as e:  # noqa: BLE001 - report the wrong type
            return f"expected {expect.exc.__name__}, got {type(e).__name__}: {e}"
        return f"expected {expect.exc.__name__}, nothing raised"


def _judge(e, expect: Expect, took: float, timeout_s: float) -> Optional[str]:
    missing = [w for w in expect.needles if w not in str(e)]
    if missing:
        return f"{type(e).__name__} without {missing} in its message: {e}"
    if expect.waits and not 0.9 * timeout_s <= took <= 2 * timeout_s + 2:
        return f"raised after {took:.2f} s, expected about timeout_s={timeout_s} s: {e}"
    if not expect.waits and took > PROMPT_SHARE * timeout_s:
        return f"raised after {took:.2f} s, expected promptly (timeout_s={timeout_s} s): {e}"
    if expect.peers is not None and not expect.peers(list(getattr(e, "peers", []))):
        return f"peers {getattr(e, 'peers', None)} unexpected: {e}"
    return None


def asymmetric_cases(buffer_cls, buf, ll, array, comm, timeout_s: float, seed: int = 4321,
                     as_new_shape: Optional[Callable[[Callable[[], object]], None]] = None) -> MisuseCases:
    """The asymmetric cases for one backend (the odd rank is the last).

    Args:
        buffer_cls: the backend's Buffer class.
        buf: a normal-mode Buffer (``misuse_cases.normal_buffer_kwargs``, ``timeout_s``).
        ll: a low-latency Buffer (``misuse_cases.ll_buffer_kwargs``, ``timeout_s``).
        array: ``numpy``, ``cupy`` or a callable turning NumPy arrays into the backend's.
        comm: their communicator. timeout_s: the Buffers' ``timeout_s``.
        seed: seed of the inputs.
        as_new_shape: see the module's docstring (default: runs the call; the reference does
            not compile).
    Returns:
        a list of :class:`AsymmetricCase` (a context manager, like the misuse cases).
    """
    A = array_converter(array)
    as_new_shape = as_new_shape or (lambda call: call())
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    odd = num_ranks - 1
    others = [r for r in range(num_ranks) if r != odd]
    rng = np.random.default_rng([seed, rank])
    n, h, k, e = 8, NORMAL_HIDDEN, NORMAL_TOPK, 2 * num_ranks
    x_np = make_x(rng, n, h)
    idx_np = make_routing(rng, n, e, k, "random", num_ranks)
    w_np = make_weights(rng, n, k)
    x, idx, w = A(x_np), A(idx_np), A(w_np)

    def layout_of(topk_idx, experts=e):
        got = buf.get_dispatch_layout(topk_idx, experts)
        return dict(num_tokens_per_rank=got[0], num_tokens_per_rdma_rank=got[1], is_token_in_rank=got[3],
                    num_tokens_per_expert=got[2])

    def dispatch(x_arg=None, weights=None):
        return lambda: buf.dispatch(x if x_arg is None else x_arg, **layout_of(idx), topk_idx=idx,
                                    topk_weights=w if weights is None else weights)

    def worst_token_dispatch(x_arg=None):
        """A dispatch with num_worst_tokens (no host synchronisation), then check(): on the GPU the
        good ranks learn of the cancellation there."""
        def call():
            buf.dispatch(x if x_arg is None else x_arg, **layout_of(idx), topk_idx=idx, topk_weights=w,
                         num_worst_tokens=n * num_ranks)
            buf.check()
        return call

    # a normal-mode shape no other case uses: other experts per rank and top-k
    new_e, new_k = 3 * num_ranks, NORMAL_TOPK - 1
    new_idx = A(make_routing(rng, n, new_e, new_k, "random", num_ranks))
    new_w = A(make_weights(rng, n, new_k))
    new_shape = {}

    def new_dispatch(x_arg=None):
        return lambda: buf.dispatch(x if x_arg is None else x_arg, **layout_of(new_idx, new_e), topk_idx=new_idx,
                                    topk_weights=new_w)

    def new_round_trip():
        recv_x, _, _, _, handle, _ = new_dispatch()()
        buf.combine(recv_x, handle)

    def new_combine_prepared():
        as_new_shape(new_round_trip)
        recv_x, _, _, _, new_shape["handle"], _ = new_dispatch()()   # compiles notify and dispatch again
        new_shape["y"] = recv_x

    def layout_then_dispatch(bad):
        def call():
            ids = idx_np.copy()
            if bad:
                ids[0, 0] = e
            ids = A(ids)
            buf.dispatch(x, **layout_of(ids), topk_idx=ids, topk_weights=w)
        return call

    def combine(change=None):
        """A dispatch, then its combine (``change``: what the odd rank changes), then check(): on
        the GPU the good ranks learn of a cancelled combine there."""
        def call():
            recv_x, _, _, _, handle, _ = buf.dispatch(x, **layout_of(idx), topk_idx=idx, topk_weights=w)
            kw = {} if change is None else change(recv_x)
            buf.combine(kw.pop("x", recv_x), handle, **kw)
            buf.check()
        return call

    def cached_dispatch(x_arg=None):
        """A dispatch, then a cached dispatch of its handle, then check() (as combine)."""
        def call():
            handle = buf.dispatch(x, **layout_of(idx), topk_idx=idx, topk_weights=w)[4]
            buf.dispatch(x if x_arg is None else x_arg, handle=handle)
            buf.check()
        return call

    m, lh = LL_M, LL_HIDDEN
    le = LL_EXPERTS_PER_RANK * num_ranks
    lx_np = make_x(rng, 5, lh)
    lidx_np = make_routing(rng, 5, le, 3, "holes", num_ranks)
    lw_np = make_weights(rng, 5, 3)
    lx, lidx, lw = A(lx_np), A(lidx_np), A(lw_np)

    def ll_dispatch(x_arg=None, ids=None):
        return lambda: ll.low_latency_dispatch(lx if x_arg is None else x_arg, lidx if ids is None else ids, m, le,
                                               use_fp8=False)

    def ll_then_check(call):
        """``call``, then check(): on the GPU the good ranks learn of a cancelled low-latency call there."""
        def run():
            call()
            ll.check()
        return run

    new_lk = 2   # a low-latency top-k no other case uses
    new_lidx = A(make_routing(rng, 5, le, new_lk, "holes", num_ranks))
    new_lw = A(make_weights(rng, 5, new_lk))

    def new_ll_round_trip():
        recv_x, _, handle, _, _ = ll.low_latency_dispatch(lx, new_lidx, m, le, use_fp8=False)
        ll.low_latency_combine(recv_x, new_lidx, new_lw, handle)

    def ll_combine(bad, **kw):
        """A low-latency dispatch, then its combine (``bad``: of float32 expert outputs), then check()."""
        def call():
            recv_x, _, handle, _, _ = ll.low_latency_dispatch(lx, lidx, m, le, use_fp8=False)
            y = A(np.zeros(recv_x.shape, np.float32)) if bad else recv_x
            ll.low_latency_combine(y, lidx, lw, handle, **kw)
            ll.check()
        return call

    def new_ll_logfmt_round_trip():
        recv_x, _, handle, _, _ = ll.low_latency_dispatch(lx, lidx, m, le, use_fp8=False)
        ll.low_latency_combine(recv_x, lidx, lw, handle, use_logfmt=True)

    cancelled = Expect(ValueError, (f"rank {odd}", "invalid input"))
    timed_out = Expect(CommTimeoutError, ("timed out", f"peer rank {odd}"), waits=True,
                       peers=lambda p: p == [odd])
    gave_up = Expect(CommTimeoutError, ("gave up",), peers=lambda p: bool(p) and set(p) <= set(others))
    big_ll_np = make_x(rng, m + 1, lh)

    def case(name, odd_call, good_call, odd_expect, good_expect=cancelled, **kw):
        return AsymmetricCase(name, odd_call, good_call, odd_expect, good_expect, odd, timeout_s, **kw)

    cases = [
        case("get_dispatch_layout with an id >= num_experts, then dispatch", layout_then_dispatch(True),
             layout_then_dispatch(False), Expect(ValueError, ("topk_idx", "expert id")), gpu=True, internode=True),
        case("dispatch: x float32", dispatch(A(x_np.astype(np.float32))), dispatch(), Expect(TypeError, ("x",)),
             gpu=True, internode=True),
        case("dispatch: topk_weights of the wrong shape", dispatch(weights=A(w_np[:, :-1].copy())), dispatch(),
             Expect(ValueError, ("topk_weights",)), gpu=True, internode=True),
        case("dispatch with num_worst_tokens, then check(): x float32", worst_token_dispatch(A(x_np.astype(np.float32))),
             worst_token_dispatch(), Expect(TypeError, ("x",)), gpu=True, internode=True),
        case("cached dispatch, then check(): x float32", cached_dispatch(A(x_np.astype(np.float32))),
             cached_dispatch(), Expect(TypeError, ("x",)), gpu=True, internode=True),
        case("combine, then check(): one row fewer", combine(lambda rx: dict(x=rx[:-1])), combine(),
             Expect(ValueError, ("x",)), gpu=True, internode=True),
        case("combine, then check(): bias of the wrong shape", combine(lambda rx: dict(bias=A(make_x(rng, n, h + 8)))),
             combine(), Expect(ValueError, ("bias",)), gpu=True, internode=True),
        case("absent from dispatch (arrives after timeout_s)", dispatch(), dispatch(), gave_up, timed_out,
             odd_delay_s=ABSENT_DELAY * timeout_s),
        case("low_latency_dispatch, then check(): x float32", ll_dispatch(A(lx_np.astype(np.float32))),
             ll_then_check(ll_dispatch()), Expect(TypeError, ("x",)), mode="low_latency", gpu=True),
        case("low_latency_dispatch, then check(): N > M",
             ll_dispatch(A(big_ll_np), A(np.full((m + 1, 3), -1, np.int64))), ll_then_check(ll_dispatch()),
             Expect(ValueError, ("x", "num_max_dispatch_tokens_per_rank")), mode="low_latency", gpu=True),
        case("low_latency_combine, then check(): y float32", ll_combine(True), ll_combine(False),
             Expect(TypeError, ("x",)), mode="low_latency", gpu=True),
        case("absent from low_latency_dispatch (arrives after timeout_s)", ll_dispatch(), ll_dispatch(), gave_up,
             timed_out, odd_delay_s=ABSENT_DELAY * timeout_s, mode="low_latency"),
        case("dispatch of a new shape: x float32", new_dispatch(A(x_np.astype(np.float32))), new_dispatch(),
             Expect(TypeError, ("x",)), prepare=lambda: as_new_shape(new_round_trip), gpu=True, internode=True),
        case("combine of a new shape: one row fewer", lambda: buf.combine(new_shape["y"][:-1], new_shape["handle"]),
             lambda: buf.combine(new_shape["y"], new_shape["handle"]), Expect(ValueError, ("x",)),
             prepare=new_combine_prepared, gpu=True),
        case("absent from a dispatch of a new shape (arrives after timeout_s)", new_dispatch(), new_dispatch(),
             gave_up, timed_out, odd_delay_s=ABSENT_DELAY * timeout_s, prepare=lambda: as_new_shape(new_round_trip),
             gpu=True),
        case("low_latency_dispatch of a new shape: x float32",
             lambda: ll.low_latency_dispatch(A(lx_np.astype(np.float32)), new_lidx, m, le, use_fp8=False),
             lambda: ll.low_latency_dispatch(lx, new_lidx, m, le, use_fp8=False), Expect(TypeError, ("x",)),
             mode="low_latency", prepare=lambda: as_new_shape(new_ll_round_trip), gpu=True),
        case("low_latency_combine of a new shape (use_logfmt): y float32", ll_combine(True, use_logfmt=True),
             ll_combine(False, use_logfmt=True), Expect(TypeError, ("x",)), mode="low_latency",
             prepare=lambda: as_new_shape(new_ll_logfmt_round_trip), gpu=True),
        case("Buffer: num_sms 1", lambda: buffer_cls(comm, timeout_s=timeout_s, num_sms=1).destroy(),
             lambda: buffer_cls(comm, timeout_s=timeout_s).destroy(), Expect(ValueError, ("num_sms",)),
             mode="buffer"),
    ]
    if buffer_cls.__module__.startswith("cupy_ep.reference"):
        # the GPU's cached-shape calls have no host step that would see another call
        earlier = {}

        def keep_a_handle():
            recv_x, _, _, _, earlier["handle"], _ = buf.dispatch(x, **layout_of(idx), topk_idx=idx, topk_weights=w)
            earlier["y"] = recv_x

        mismatch = Expect(CallMismatchError, ("dispatch", "combine"))
        cases.append(case("combine where the others dispatch", lambda: buf.combine(earlier["y"], earlier["handle"]),
                          dispatch(), mismatch, mismatch, prepare=keep_a_handle))
    return MisuseCases(cases, {})
