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

The cases live by mode: ``misuse_normal.py`` (layout, dispatch, cached dispatch, combine),
``misuse_buffer.py`` (construction, modes, a destroyed Buffer), ``misuse_low_latency.py``;
``misuse_common.py`` holds :class:`Case`, the Buffers' sizes and the array converter.
"""
from __future__ import annotations

import numpy as np

from cupy_ep.testing import make_routing, make_weights, make_x, normal_round_trip
from misuse_buffer import buffer_cases, destroyed_cases
from misuse_common import (LL_EXPERTS_PER_RANK, LL_HIDDEN, LL_M, NORMAL_HIDDEN, NORMAL_TOKENS, NORMAL_TOPK,
                           Case, MisuseCases, array_converter, ll_buffer_kwargs, normal_buffer_kwargs)
from misuse_low_latency import ll_cases
from misuse_normal import normal_cases


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
    num_ranks, nvl_peers = comm.Get_size(), buf.num_nvl_ranks
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

    def ll_twin():
        if "ll_twin" not in owned:
            owned["ll_twin"] = buffer_cls(comm, **ll_buffer_kwargs(buffer_cls, num_ranks))
        return owned["ll_twin"]

    cases, normal = normal_cases(buf, A, comm, rng, twin)
    cases += buffer_cases(buffer_cls, buf, comm, normal)
    cases += ll_cases(ll, ll_twin, A, rng, num_ranks)
    cases += destroyed_cases(dead, A, normal.x_np, normal.idx_np, normal.num_experts)
    return MisuseCases(cases, owned)



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


__all__ = ["Case", "MisuseCases", "array_converter", "misuse_cases", "normal_buffer_kwargs", "ll_buffer_kwargs",
           "still_works", "reference_ll_round_trip", "run_reference_cases",
           "NORMAL_TOKENS", "NORMAL_HIDDEN", "NORMAL_TOPK", "LL_M", "LL_HIDDEN", "LL_EXPERTS_PER_RANK"]
