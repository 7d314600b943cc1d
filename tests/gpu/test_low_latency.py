"""Low-latency dispatch/combine on GPUs, checked against the reference backend on the same inputs.

Run: ``mpiexec -n R python -m pytest tests/gpu/test_low_latency.py`` (R = 1..4 GPUs of one host).
Rows of an expert may arrive in another order than on the reference: they are matched through
the handles (expert, source rank, source token); data bit for bit, combine within the bf16
bound of the design.
"""
import time

import numpy as np
import pytest

from cupy_ep.testing import (GraphInputs, _same_bits, agree as agree_all, agreed, check, check_ll_combine,
                             check_ll_dispatch, ll_combine_expected, low_latency_round_trip, make_routing,
                             make_weights, make_x, to_device, to_host)

M = 128
HIDDEN = 7168
TOPK = 8


def experts_for(num_ranks):
    """288 experts (DeepEP's decode workload) where the ranks divide it."""
    return 288 if 288 % num_ranks == 0 else 64 * num_ranks


def small_experts(num_ranks):
    return max(16, 8 * num_ranks)


@pytest.fixture(scope="module")
def buffers(comm, ll_transport):
    import cupy_ep
    from cupy_ep import reference

    r = comm.Get_size()
    nbytes = max(cupy_ep.Buffer.get_low_latency_rdma_size_hint(M, HIDDEN, r, experts_for(r)),
                 cupy_ep.Buffer.get_low_latency_rdma_size_hint(256, 2048, r, small_experts(r)),
                 cupy_ep.Buffer.get_low_latency_rdma_size_hint(512, 1152, r, small_experts(r)))
    gpu = cupy_ep.Buffer(comm, num_rdma_bytes=nbytes, low_latency_mode=True, timeout_s=20.0,
                         ll_transport=ll_transport)
    ref = reference.Buffer(comm, num_rdma_bytes=nbytes, low_latency_mode=True)
    yield gpu, ref
    gpu.destroy()
    ref.destroy()


CASES = [
    # name,            fp8,   round, ue8m0, kind,     k,  h,      m,   zero_rank
    ("fp8",            True,  False, False, "random", 8,  HIDDEN, M,   None),
    ("bf16",           False, False, False, "random", 8,  HIDDEN, M,   None),
    ("fp8_round",      True,  True,  False, "holes",  8,  HIDDEN, M,   1),
    ("fp8_ue8m0",      True,  True,  True,  "skewed", 8,  HIDDEN, M,   None),
    ("bf16_k9_dups",   False, False, False, "dups",   9,  2048,   256, 1),
    ("fp8_k1",         True,  False, False, "random", 1,  2048,   256, 0),
    ("bf16_m512",      False, False, False, "skewed", 4,  1152,   512, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_round_trip(comm, rng, buffers, case):
    _, use_fp8, round_scale, use_ue8m0, kind, k, h, m, zero_rank = case
    gpu, ref = buffers
    r, rank = comm.Get_size(), comm.Get_rank()
    num_experts = experts_for(r) if h == HIDDEN else small_experts(r)
    for rep in range(3):   # the two buffer halves flip many times over the cases
        n = 0 if rank == zero_rank and rep % 2 == 0 else int(rng.integers(m // 2, m + 1))
        low_latency_round_trip(comm, ref, gpu, rng, num_tokens=n, hidden=h, num_topk=k, num_experts=num_experts,
                               m=m, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0, kind=kind)


LOGFMT_CASES = [
    # name,               fp8,   kind,     k, h,      m,   zero_copy, hook
    ("logfmt_bf16",       False, "random", 8, HIDDEN, M,   False,     False),
    ("logfmt_fp8_hook",   True,  "holes",  8, HIDDEN, M,   False,     True),
    ("logfmt_k9_dups_zc", False, "dups",   9, 2048,   256, True,      False),
    ("logfmt_h1152",      True,  "skewed", 4, 1152,   512, False,     True),
]


@pytest.mark.parametrize("case", LOGFMT_CASES, ids=[c[0] for c in LOGFMT_CASES])
def test_logfmt_combine_bit_exact(comm, rng, buffers, case):
    """use_logfmt=True: the GPU's LogFMT-10 combine equals the reference's bit for bit (same
    encoding, same unfused float32 partial sums, same order)."""
    _, use_fp8, kind, k, h, m, zero_copy, hook = case
    gpu, ref = buffers
    r = comm.Get_size()
    num_experts = experts_for(r) if h == HIDDEN else small_experts(r)
    for rep in range(2):
        low_latency_round_trip(comm, ref, gpu, rng, num_tokens=int(rng.integers(m // 2, m + 1)), hidden=h,
                               num_topk=k, num_experts=num_experts, m=m, use_fp8=use_fp8, kind=kind,
                               zero_copy=zero_copy, hook=hook, use_logfmt=True)


def test_hooks_zero_copy_and_stats(comm, rng, buffers):
    """return_recv_hook with a matmul between send and receive; zero_copy; cumulative stats."""
    import cupy

    gpu, ref = buffers
    r = comm.Get_size()
    num_experts = experts_for(r)
    a = cupy.random.random((2048, 2048), dtype=cupy.float32)
    stats = (np.zeros(num_experts // r, np.int32), cupy.zeros(num_experts // r, cupy.int32))
    for rep in range(4):
        low_latency_round_trip(comm, ref, gpu, rng, num_tokens=int(rng.integers(1, M + 1)), hidden=HIDDEN,
                               num_topk=TOPK, num_experts=num_experts, m=M, use_fp8=rep % 2 == 0,
                               kind="holes" if rep % 3 else "random", hook=True, zero_copy=rep % 2 == 1,
                               overlap=lambda: a @ a, stats=stats)


def test_streams(comm, rng, buffers):
    """Synchronous calls (on the caller's stream), async_finish events, and calls from two streams
    interleaved: the results of the default path."""
    import cupy

    gpu, ref = buffers
    r = comm.Get_size()
    num_experts = experts_for(r)
    other = cupy.cuda.Stream(non_blocking=True)
    for rep in range(4):
        use_async = rep % 2 == 1
        stream = other if rep >= 2 else cupy.cuda.get_current_stream()
        n = int(rng.integers(1, M + 1))
        x, idx, w = make_x(rng, n, HIDDEN), make_routing(rng, n, num_experts, TOPK, "holes", r), make_weights(rng, n, TOPK)
        r_x, r_count, r_handle, _, _ = ref.low_latency_dispatch(x, idx, M, num_experts, use_fp8=False)
        out_ref, bound = ll_combine_expected(ref, r_x, idx, w, r_handle)
        with stream:
            d_idx, d_w = to_device(idx), to_device(w)
            g_x, g_count, g_handle, event, _ = gpu.low_latency_dispatch(to_device(x), d_idx, M, num_experts,
                                                                         use_fp8=False, async_finish=use_async)
            dispatch_async = event.event is not None
            event.current_stream_wait()
        with other if stream is not other else cupy.cuda.get_current_stream():
            out, event, _ = gpu.low_latency_combine(g_x, d_idx, d_w, g_handle, async_finish=use_async)
            event.current_stream_wait()
            got = to_host(out)

        def compare():
            check(dispatch_async == use_async, f"dispatch event {'missing' if use_async else 'given'}")
            _same_bits(to_host(g_count), r_count, "recv_count")
            check_ll_combine(got, out_ref, bound)

        agreed(comm, f"stream rep {rep}", compare)


def test_cuda_graph(comm, rng, buffers):
    """FP8 dispatch + bf16 dispatch + combine captured in one graph; replays on new inputs match the
    reference: both dispatches' rows bit for bit, the combine within the design's bound."""
    import cupy

    gpu, ref = buffers
    r, rank = comm.Get_size(), comm.Get_rank()
    num_experts = experts_for(r)
    inputs = GraphInputs(cupy.cuda.Stream(non_blocking=True), M - rank, HIDDEN, TOPK)

    def body():
        d8 = gpu.low_latency_dispatch(inputs.x, inputs.idx, M, num_experts, use_fp8=True)
        db = gpu.low_latency_dispatch(inputs.x, inputs.idx, M, num_experts, use_fp8=False)
        out = gpu.low_latency_combine(db[0], inputs.idx, inputs.w, db[2])[0]
        return d8, db, out

    inputs.load(rng, num_experts, r)
    graph, (d8, db, out) = inputs.capture(comm, body)
    for _ in range(3):
        x, idx, w = inputs.load(rng, num_experts, r)
        inputs.replay(comm, graph, out)
        gpu.check()
        r8 = ref.low_latency_dispatch(x, idx, M, num_experts, use_fp8=True)
        rb = ref.low_latency_dispatch(x, idx, M, num_experts, use_fp8=False)
        out_ref, bound = ll_combine_expected(ref, rb[0], idx, w, rb[2])

        def compare():
            check_ll_dispatch(r8[0], r8[1], r8[2], d8[0], d8[1], d8[2])
            check_ll_dispatch(rb[0], rb[1], rb[2], db[0], db[1], db[2])
            check_ll_combine(to_host(out), out_ref, bound)

        agreed(comm, "graph replay", compare)


def test_skipped_call_times_out(comm, rng, ll_transport):
    """One rank skips a dispatch: the others' kernels time out; Buffer.check() raises CommTimeoutError
    at once (naming the kernel and the missing peer), and so does the next call."""
    import cupy

    import cupy_ep

    r, rank = comm.Get_size(), comm.Get_rank()
    if r < 2:
        pytest.skip("needs a second rank to skip the dispatch")
    num_experts = 8 * r
    buf = cupy_ep.Buffer(comm, num_rdma_bytes=cupy_ep.Buffer.get_low_latency_rdma_size_hint(16, 256, r, num_experts),
                         low_latency_mode=True, timeout_s=2.0, ll_transport=ll_transport)
    try:
        x = to_device(make_x(rng, 4, 256))
        idx = cupy.arange(8, dtype=cupy.int64).reshape(4, 2) % num_experts
        buf.low_latency_dispatch(x, idx, 16, num_experts, use_fp8=False)   # compiles collectively
        cupy.cuda.Device().synchronize()
        comm.Barrier()
        outcome = None
        if rank != 0:
            buf.low_latency_dispatch(x, idx, 16, num_experts, use_fp8=False)
            try:
                buf.check()
                outcome = "check() raised nothing"
            except cupy_ep.CommTimeoutError as exc:
                if exc.peer != 0 or exc.kernel != "low_latency_dispatch":
                    outcome = f"wrong report: {exc}"
            try:
                buf.low_latency_dispatch(x, idx, 16, num_experts, use_fp8=False)
                outcome = outcome or "the next call raised nothing"
            except cupy_ep.CommTimeoutError:
                pass
        comm.Barrier()
        agree_all(comm, outcome is None, outcome)
    finally:
        buf.destroy()


def test_wait_recv_cost_stats(comm, rng, buffers):
    """dispatch/combine_wait_recv_cost_stats: bad arrays refused on every rank; int64 [R] entries
    that never shrink; a rank that starts its dispatch and its combine DELAY_S late is, on every
    other rank, the largest entry of both, by at least half the delay (ranks sharing one GPU are
    time-sliced, hence the margin). Every wait of the kernels stays bounded by the Buffer's
    timeout_s (20 s), far above the delay."""
    import cupy

    gpu, _ = buffers
    r, rank = comm.Get_size(), comm.Get_rank()
    if r < 2:
        pytest.skip("needs a second rank to wait for")
    delay_s, late, h, m = 0.3, r - 1, 2048, 64
    num_experts = small_experts(r)
    n = 32
    x = to_device(make_x(rng, n, h))
    idx = to_device(make_routing(rng, n, num_experts, 4, "random", r))
    w = to_device(make_weights(rng, n, 4))
    problems = []
    for bad, exc in ((cupy.zeros(r + 1, cupy.int64), ValueError), (cupy.zeros(r, cupy.int32), TypeError),
                     (np.zeros(r, np.int64), TypeError)):
        try:
            gpu.low_latency_dispatch(x, idx, m, num_experts, use_fp8=False, dispatch_wait_recv_cost_stats=bad)
            problems.append(f"dispatch accepted {bad.dtype} {bad.shape}")
        except exc:
            pass
    d_stats, c_stats = cupy.zeros(r, cupy.int64), cupy.zeros(r, cupy.int64)
    prev_d, prev_c = np.zeros(r, np.int64), np.zeros(r, np.int64)
    for rep in range(4):
        delayed = rep == 3
        cupy.cuda.Device().synchronize()
        comm.Barrier()
        if delayed and rank == late:
            time.sleep(delay_s)
        recv_x, _, handle, _, hook = gpu.low_latency_dispatch(x, idx, m, num_experts, use_fp8=False,
                                                              return_recv_hook=rep == 1,
                                                              dispatch_wait_recv_cost_stats=d_stats)
        if hook:
            hook()
        if delayed and rank == late:
            cupy.cuda.Device().synchronize()
            time.sleep(delay_s)
        if rep == 0:
            try:
                gpu.low_latency_combine(recv_x, idx, w, handle, combine_wait_recv_cost_stats=cupy.zeros((r, r), cupy.int64))
                problems.append("combine accepted a [R, R] array")
            except ValueError:
                pass
        _, _, hook = gpu.low_latency_combine(recv_x, idx, w, handle, return_recv_hook=rep == 2,
                                             use_logfmt=rep == 2, combine_wait_recv_cost_stats=c_stats)
        if hook:
            hook()
        gpu.check()
        d, c = to_host(d_stats), to_host(c_stats)
        if (d < prev_d).any() or (c < prev_c).any():
            problems.append(f"rep {rep}: stats shrank: {prev_d.tolist()} -> {d.tolist()}, {prev_c.tolist()} -> {c.tolist()}")
        if delayed and rank != late:
            for name, grew in (("dispatch", d - prev_d), ("combine", c - prev_c)):
                if int(np.argmax(grew)) != late or grew[late] < delay_s * 0.5e9:
                    problems.append(f"{name}: the delayed rank {late} is not the largest entry: {grew.tolist()} ns")
        prev_d, prev_c = d, c
    agree_all(comm, not problems, "; ".join(problems))
