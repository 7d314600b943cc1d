"""The asymmetric cases of tests/asymmetric_cases.py that the GPU backend keeps (``case.gpu``):
the last rank passes bad input, the others valid; every rank raises as expected, in bounded
time, and the same Buffers then make a round trip checked against the reference (the low-latency
Buffer's after a low-latency case). The reference runs the whole list in tests/test_asymmetric.py.
The low-latency Buffers use ``CUPY_EP_TEST_LL_TRANSPORT`` (conftest's ``ll_transport``: ``rdma``
covers the NVSHMEM path)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asymmetric_cases import asymmetric_cases  # noqa: E402
from misuse_cases import (LL_EXPERTS_PER_RANK, LL_HIDDEN, LL_M, ll_buffer_kwargs,  # noqa: E402
                          normal_buffer_kwargs, still_works)
from asymmetric_runner import TIMEOUT_S, forgetting_compiled, run_cases  # noqa: E402

def ll_still_works(comm, rng, ref_ll, ll, num_tokens=None, **kw) -> None:
    """A low-latency round trip of the cases' shapes (bf16, top-3) on ``ll``, checked against the
    reference Buffer ``ref_ll`` (``cupy_ep.testing.low_latency_round_trip``, its ``kw``)."""
    from cupy_ep.testing import low_latency_round_trip

    n = int(rng.integers(1, LL_M + 1)) if num_tokens is None else num_tokens
    low_latency_round_trip(comm, ref_ll, ll, rng, num_tokens=n, hidden=LL_HIDDEN, num_topk=3,
                           num_experts=LL_EXPERTS_PER_RANK * comm.Get_size(), m=LL_M, use_fp8=False, kind="holes",
                           **kw)


def refused_on_last_rank(comm, agree, ll, what, odd_call, good_call, stream=None) -> None:
    """The last rank runs ``odd_call``, which must raise TypeError naming x; every other rank
    ``good_call`` and then ``ll.check()``, which must raise ValueError naming the last rank (on
    ``stream`` when given). Fails on every rank otherwise."""
    import contextlib

    rank, odd = comm.Get_rank(), comm.Get_size() - 1
    want, start = (TypeError, "x") if rank == odd else (ValueError, f"rank {odd} passed invalid input")
    outcome = "nothing raised"
    try:
        with stream if stream is not None else contextlib.nullcontext():
            (odd_call if rank == odd else good_call)()
            ll.check()
    except want as exc:
        outcome = None if str(exc).startswith(start) else f"wrong message: {exc}"
    except Exception as exc:  # noqa: BLE001 - report the wrong type
        outcome = f"{type(exc).__name__}: {exc}"
    bad = [f"rank {r}: {o}" for r, o in enumerate(comm.allgather(outcome)) if o is not None]
    agree(not bad, f"refused {what}: {'; '.join(bad)}")


def test_asymmetric_cases_gpu(comm, agree, ll_transport):
    import cupy

    import cupy_ep
    from cupy_ep import reference

    R = comm.Get_size()
    if R < 2:
        pytest.skip("asymmetric cases need a second rank")
    kw = normal_buffer_kwargs(cupy_ep.Buffer, R)
    gpu = cupy_ep.Buffer(comm, **kw, timeout_s=TIMEOUT_S)
    ll = cupy_ep.Buffer(comm, **ll_buffer_kwargs(cupy_ep.Buffer, R), timeout_s=TIMEOUT_S, ll_transport=ll_transport)
    ref = reference.Buffer(comm, **kw, timeout_s=TIMEOUT_S)
    ref_ll = reference.Buffer(comm, **ll_buffer_kwargs(reference.Buffer, R), timeout_s=TIMEOUT_S)
    rng = np.random.default_rng(comm.bcast(int(np.random.SeedSequence().entropy % 2 ** 31)) + comm.Get_rank())
    try:
        still_works(comm, rng, ref, gpu, num_tokens=8)   # compiles the cases' shapes: not timed below
        ll_still_works(comm, rng, ref_ll, ll, num_tokens=5)

        def round_trip(case):
            if case.mode == "low_latency":
                ll_still_works(comm, rng, ref_ll, ll)
            else:
                still_works(comm, rng, ref, gpu)

        with asymmetric_cases(cupy_ep.Buffer, gpu, ll, cupy, comm, TIMEOUT_S,
                              as_new_shape=forgetting_compiled((gpu, ll))) as cases:
            failures, ran = run_cases(comm, [case for case in cases if case.gpu], (gpu, ll), round_trip)
    finally:
        for b in (gpu, ll, ref, ref_ll):
            b.destroy()
    agree(not failures and ran > 0, "\n".join(failures) or "no case ran")
    if comm.Get_rank() == 0:
        print(f"OK asymmetric gpu ranks={R} cases={ran}", flush=True)


def test_graph_replay_after_cancelled_ll_calls(comm, agree, ll_transport):
    """A CUDA graph of a low-latency dispatch and its combine is replayed; then a dispatch and a
    combine are each refused on the last rank (x / y float32: it raises TypeError, every other
    rank's check() a ValueError naming it); then the graph is replayed again. Each replay matches
    the reference: the cancelled calls left the alternating halves and the signals in step."""
    import cupy

    import cupy_ep
    from cupy_ep import reference
    from cupy_ep.testing import GraphInputs, agreed, check_ll_combine, ll_combine_expected, to_host

    R, rank = comm.Get_size(), comm.Get_rank()
    if R < 2:
        pytest.skip("needs a second rank to refuse")
    e = LL_EXPERTS_PER_RANK * R
    ll = cupy_ep.Buffer(comm, **ll_buffer_kwargs(cupy_ep.Buffer, R), timeout_s=TIMEOUT_S, ll_transport=ll_transport)
    ref = reference.Buffer(comm, **ll_buffer_kwargs(reference.Buffer, R))
    rng = np.random.default_rng(comm.bcast(int(np.random.SeedSequence().entropy % 2 ** 31)) + rank)
    inputs = GraphInputs(cupy.cuda.Stream(non_blocking=True), LL_M - rank % 2, LL_HIDDEN, 3)

    def dispatch(x):
        return lambda: ll.low_latency_dispatch(x, inputs.idx, LL_M, e, use_fp8=False)

    def combine(bad):
        def call():
            recv_x, _, handle, _, _ = dispatch(inputs.x)()
            y = cupy.zeros(recv_x.shape, cupy.float32) if bad else recv_x
            return ll.low_latency_combine(y, inputs.idx, inputs.w, handle)[0]
        return call

    def check_replay(graph, out, what):
        """Replays the graph on fresh inputs; its combine (of the received rows: identity experts)
        within the design's bound of the reference's, else Mismatch on every rank."""
        x, idx, w = inputs.load(rng, e, R)
        inputs.replay(comm, graph, out)
        ll.check()
        r_x, _, r_handle, _, _ = ref.low_latency_dispatch(x, idx, LL_M, e, use_fp8=False)
        out_ref, bound = ll_combine_expected(ref, r_x, idx, w, r_handle)
        agreed(comm, what, lambda: check_ll_combine(to_host(out), out_ref, bound))

    try:
        inputs.load(rng, e, R)
        graph, out = inputs.capture(comm, combine(False))
        check_replay(graph, out, "the first replay")
        x32 = cupy.zeros(inputs.x.shape, cupy.float32)
        refused_on_last_rank(comm, agree, ll, "dispatch", dispatch(x32), dispatch(inputs.x), inputs.stream)
        refused_on_last_rank(comm, agree, ll, "combine", combine(True), combine(False), inputs.stream)
        check_replay(graph, out, "the replay after the cancelled calls")
    finally:
        ll.destroy()
        ref.destroy()


def test_hooked_peers_of_refused_ll_calls(comm, agree, ll_transport):
    """The good ranks split their calls (``return_recv_hook=True``: the send kernel, then the
    hook's receive kernel) while the last rank refuses its dispatch, then its combine: the
    cancelled parts pair with the split kernels too, check() names the last rank, and a checked
    round trip with hooks follows on the same Buffer."""
    import cupy

    import cupy_ep
    from cupy_ep import reference
    from cupy_ep.testing import make_routing, make_weights, make_x, to_device

    R = comm.Get_size()
    if R < 2:
        pytest.skip("needs a second rank to refuse")
    e = LL_EXPERTS_PER_RANK * R
    ll = cupy_ep.Buffer(comm, **ll_buffer_kwargs(cupy_ep.Buffer, R), timeout_s=TIMEOUT_S, ll_transport=ll_transport)
    ref_ll = reference.Buffer(comm, **ll_buffer_kwargs(reference.Buffer, R))
    rng = np.random.default_rng(comm.bcast(int(np.random.SeedSequence().entropy % 2 ** 31)) + comm.Get_rank())
    x, w = to_device(make_x(rng, 5, LL_HIDDEN)), to_device(make_weights(rng, 5, 3))
    idx = to_device(make_routing(rng, 5, e, 3, "holes", R))

    def dispatch(x_arg):
        def call():
            out = ll.low_latency_dispatch(x_arg, idx, LL_M, e, use_fp8=False, return_recv_hook=True)
            out[4]()
            return out
        return call

    def combine(bad):
        def call():
            recv_x, _, handle, _, _ = dispatch(x)()
            y = cupy.zeros(recv_x.shape, cupy.float32) if bad else recv_x
            ll.low_latency_combine(y, idx, w, handle, return_recv_hook=True)[2]()
        return call

    try:
        ll_still_works(comm, rng, ref_ll, ll, hook=True)   # compiles the shape: not in the calls below
        refused_on_last_rank(comm, agree, ll, "dispatch", dispatch(cupy.zeros(x.shape, cupy.float32)), dispatch(x))
        refused_on_last_rank(comm, agree, ll, "combine", combine(True), combine(False))
        ll_still_works(comm, rng, ref_ll, ll, hook=True)
    finally:
        ll.destroy()
        ref_ll.destroy()
