"""cupy_ep.torch on the GPU against the reference backend, on random inputs (an MPI script).

    timeout 300 mpiexec -n R python tests/gpu/check_torch_adapter.py     (R >= 1; ranks may share GPUs)

Checks, every element and on every rank (a failure on one rank fails all, via ``agree``):
zero-copy conversions (the same device pointer both ways, bf16 / e4m3fn / bool / int); layout,
dispatch and combine bit for bit against ``cupy_ep.reference`` with bf16 and FP8 (row-major,
column-major and DeepEP-packed UE8M0 scales), the DeepEP-shaped handle (``rank_prefix_matrix``),
cached dispatch; ordering with a torch side stream (current stream, ``previous_event`` +
``async_finish``, FP8 inputs whose scales the adapter copies after ``previous_event``); low-latency dispatch/combine (FP8 with column-major and packed UE8M0 scales,
bf16, hooks, ``zero_copy`` with the buffer's own pointer, ``out=``, stats, LogFMT, the receive-wait
statistics); a CUDA graph of
normal mode with ``num_worst_tokens`` and one of the low-latency mode, replayed on new inputs;
the NotImplementedError of features cupy_ep lacks. Rank 0 prints
``SUMMARY check_torch_adapter: <n> checks passed on <R> ranks`` at the end.
"""
import ml_dtypes
import numpy as np
import torch
from mpi4py import MPI

import cupy_ep.torch as deep_ep
from cupy_ep import per_token_cast_to_fp8
from cupy_ep.testing import (_close_bf16, _ll_rows, _same_bits, agree, agreed, check, ll_combine_expected,
                             ll_expert_outputs, ll_expert_scale, make_routing, make_weights, make_x, reference_buffer,
                             run_or_abort)
from cupy_ep.fp8 import ue8m0_to_float32
from cupy_ep.torch import float_to_ue8m0, pack_ue8m0, rank_prefix_matrix, unpack_ue8m0

BF16, FP8 = np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)
N, H, K, M = 48, 512, 4, 64        # tokens per rank, hidden (DeepEP's UE8M0 packing needs H % 512), top-k, LL M


def to_t(a):
    """A CUDA tensor of a NumPy array (bf16 / FP8 through their bits)."""
    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).cuda().view(torch.bfloat16)
    if a.dtype == FP8:
        return torch.from_numpy(a.view(np.uint8)).cuda().view(torch.float8_e4m3fn)
    return torch.from_numpy(a).cuda()


def to_np(t):
    """A NumPy copy of a tensor's values (row-major whatever its strides)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(FP8)
    return t.numpy()


class Checks:
    def __init__(self, comm):
        self.comm, self.passed = comm, 0

    def run(self, name, fn):
        """Runs a check on every rank; Mismatch everywhere when it failed anywhere."""
        result = agreed(self.comm, name, fn)
        self.passed += 1
        return result


def _bits_equal(a, b) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn else torch.equal(a, b)


def check_zero_copy():
    for t in (torch.randn(8, H, device="cuda").bfloat16(), torch.randn(8, H, device="cuda").to(torch.float8_e4m3fn),
              torch.rand(8, 4, device="cuda") < 0.5, torch.arange(12, device="cuda", dtype=torch.int32)):
        c = deep_ep.to_cupy(t)
        check(c.data.ptr == t.data_ptr(), f"to_cupy({t.dtype}) copied")
        back = deep_ep.to_torch(c, t.dtype)
        check(back.data_ptr() == t.data_ptr() and back.dtype == t.dtype and _bits_equal(back, t),
              f"to_torch(to_cupy({t.dtype})) is not the same memory")


def fp8_inputs(x, scales_kind):
    """(reference input, torch input) of an FP8 dispatch with scales row-major, column-major or packed UE8M0."""
    if scales_kind == "ue8m0":
        q, e = per_token_cast_to_fp8(x, use_ue8m0=True)
        return (q, ue8m0_to_float32(e)), (to_t(q), pack_ue8m0(to_t(e)))
    q, s = per_token_cast_to_fp8(x)
    ts = to_t(s)
    return (q, s), (to_t(q), ts.T.contiguous().T if scales_kind == "column" else ts)


def normal_trip(checks, comm, buf, ref, rng, E, scales_kind=None, kind="random"):
    """Layout, dispatch, combine and a cached dispatch on both; returns (ref handle, torch handle, rows)."""
    rank, R = comm.Get_rank(), comm.Get_size()
    x = make_x(rng, N, H)
    idx, w = make_routing(rng, N, E, K, kind, R), make_weights(rng, N, K)
    ref_in, t_in = fp8_inputs(x, scales_kind) if scales_kind else (x, to_t(x))
    per_rank, per_rdma, per_expert, in_rank, _ = ref.get_dispatch_layout(idx, E)
    r_x, r_idx, r_w, r_list, r_handle, _ = ref.dispatch(ref_in, num_tokens_per_rank=per_rank,
                                                        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                        topk_idx=idx, topk_weights=w)
    rows = r_handle.num_recv_tokens
    y_ref = ((r_x[0] if scales_kind else r_x).astype(np.float32) * (rank + 1)).astype(BF16)
    rc_x, rc_w, _ = ref.combine(y_ref, r_handle, topk_weights=r_w)
    expected_matrix = rank_prefix_matrix(comm.allgather(per_rank.tolist()))
    what = f"normal {kind}, scales={scales_kind}"

    t_idx, t_w = to_t(idx), to_t(w)
    g_rank, g_rdma, g_expert, g_in_rank, _ = buf.get_dispatch_layout(t_idx, E)
    g_x, g_idx, g_w, g_list, g_handle, _ = buf.dispatch(t_in, num_tokens_per_rank=g_rank, is_token_in_rank=g_in_rank,
                                                        num_tokens_per_expert=g_expert, topk_idx=t_idx,
                                                        topk_weights=t_w)
    torch.cuda.synchronize()

    def compare_dispatch():
        _same_bits(to_np(g_rank), per_rank, "num_tokens_per_rank")
        _same_bits(to_np(g_expert), per_expert, "num_tokens_per_expert")
        _same_bits(to_np(g_in_rank), in_rank, "is_token_in_rank")
        check(g_rdma is None and per_rdma is None, "num_tokens_per_rdma_rank: expected None in one domain")
        if scales_kind:
            check(g_x[0].dtype == torch.float8_e4m3fn, "recv_x[0]: expected float8_e4m3fn")
            _same_bits(to_np(g_x[0]), np.asarray(r_x[0]), "recv_x (FP8 data)")
            if scales_kind == "ue8m0":
                check(g_x[1].dtype == torch.int32 and tuple(g_x[1].shape) == (rows, H // 512),
                      f"recv_x[1]: expected packed int32 [{rows}, {H // 512}], got {g_x[1].dtype} {tuple(g_x[1].shape)}")
                _same_bits(to_np(g_x[1]), pack_ue8m0(float_to_ue8m0(r_x[1], np)), "recv_x (packed UE8M0 scales)")
            else:
                _same_bits(to_np(g_x[1]), r_x[1], "recv_x (scales)")
        else:
            check(g_x.dtype == torch.bfloat16, "recv_x: expected bf16")
            _same_bits(to_np(g_x), r_x, "recv_x")
        _same_bits(to_np(g_idx), r_idx, "recv_topk_idx")
        _same_bits(to_np(g_w), r_w, "recv_topk_weights")
        check(g_list == r_list, f"num_recv_tokens_per_expert_list {g_list} != {r_list}")
        check(len(g_handle) == 6 and g_handle[4] is g_in_rank, "handle: expected DeepEP's 6 entries")
        m = g_handle[0]
        check(m.dtype == torch.int32 and tuple(m.shape) == (R, R), "handle[0]: expected int32 [R, R]")
        _same_bits(to_np(m), expected_matrix, "handle[0] (rank_prefix_matrix)")
        check(int(m[R - 1, rank]) == rows, "rank_prefix_matrix[R-1, rank] != rows received")

    checks.run(f"{what}: layout and dispatch", compare_dispatch)
    data = g_x[0] if scales_kind else g_x
    y = (data.float() * (rank + 1)).bfloat16()
    c_x, c_w, _ = buf.combine(y, g_handle, topk_weights=g_w)
    torch.cuda.synchronize()
    checks.run(f"{what}: combine", lambda: (_same_bits(to_np(c_x), rc_x, "combined_x"),
                                             _same_bits(to_np(c_w), rc_w, "combined_topk_weights")))

    x2 = make_x(rng, N, H)
    ref_in2, t_in2 = fp8_inputs(x2, scales_kind) if scales_kind else (x2, to_t(x2))
    r_cached = ref.dispatch(ref_in2, handle=r_handle)[0]
    g_cached = buf.dispatch(t_in2, handle=g_handle)
    torch.cuda.synchronize()

    def compare_cached():
        check(all(v is None for v in g_cached[1:5]), "cached dispatch: expected (recv_x, None, None, None, None, event)")
        compare_recv_x(g_cached[0], r_cached, scales_kind, "cached recv_x")

    checks.run(f"{what}: cached dispatch", compare_cached)
    return r_handle, g_handle


def compare_recv_x(got, expected, scales_kind, what):
    """A received x (bf16, or the FP8 pair with scales of ``scales_kind``) against the reference's."""
    if not scales_kind:
        _same_bits(to_np(got), expected, what)
        return
    _same_bits(to_np(got[0]), np.asarray(expected[0]), f"{what} (FP8 data)")
    exp_s = pack_ue8m0(float_to_ue8m0(expected[1], np)) if scales_kind == "ue8m0" else expected[1]
    _same_bits(to_np(got[1]), exp_s, f"{what} (scales)")


def fp8_stream_order(checks, buf, ref, rng, handles):
    """FP8 inputs whose scales the adapter copies (column-major, packed UE8M0), written late on a
    side stream and passed with that stream's event as ``previous_event``: the copy must wait for
    the event, and the dispatch for the copy. The late tensors start as NaN scales."""
    side = torch.cuda.Stream()
    for scales_kind in ("column", "ue8m0"):
        r_handle, g_handle = handles[scales_kind]
        ref_in, (t_data, t_scales) = fp8_inputs(make_x(rng, N, H), scales_kind)
        r_out = ref.dispatch(ref_in, handle=r_handle)[0]
        late_data = torch.empty_like(t_data)
        late_data.view(torch.uint8).zero_()
        late_scales = torch.empty_like(t_scales)           # keeps the column-major strides
        late_scales.fill_(float("nan") if late_scales.is_floating_point() else -1)   # -1: exponents 255 (NaN)
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)
            late_data.copy_(t_data)
            late_scales.copy_(t_scales)
            ready = deep_ep.Buffer.capture()
        out, _, _, _, _, event = buf.dispatch((late_data, late_scales), handle=g_handle, previous_event=ready,
                                              async_finish=True)
        event.current_stream_wait()
        torch.cuda.synchronize()
        checks.run(f"stream order, FP8 scales={scales_kind} after previous_event",
                   lambda: (check(late_scales.stride() == t_scales.stride(), "the late scales lost their layout"),
                            compare_recv_x(out, r_out, scales_kind, "recv_x")))


def stream_order(checks, buf, ref, rng, r_handle, g_handle):
    """Inputs written late on a side stream: a call on that stream, and one ordered by previous_event."""
    side = torch.cuda.Stream()
    for mode in ("current stream", "previous_event", "event as context manager"):
        x = make_x(rng, N, H)
        r_out = ref.dispatch(x, handle=r_handle)[0]
        src, late = to_t(x), torch.zeros((N, H), dtype=torch.bfloat16, device="cuda")
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)          # the copy below lands long after the call is queued
            late.copy_(src)
            if mode == "current stream":
                out = buf.dispatch(late, handle=g_handle)[0]
            else:
                ready = deep_ep.Buffer.capture()
        if mode != "current stream":
            out, _, _, _, _, event = buf.dispatch(late, handle=g_handle, previous_event=ready, async_finish=True)
            if mode == "previous_event":
                event.current_stream_wait()
            else:
                with event:
                    pass
        torch.cuda.synchronize()
        checks.run(f"stream order ({mode})", lambda: _same_bits(to_np(out), r_out, "recv_x"))


def replay_on_new_x(graph, static_x, rng, buf):
    """Writes a new random x into the graph's input, replays it, waits and checks the Buffer; returns x."""
    x = make_x(rng, N, H)
    static_x.copy_(to_t(x))
    graph.replay()
    torch.cuda.synchronize()
    buf.cupy_ep_buffer.check()
    return x


def normal_graph(checks, comm, buf, ref, rng, E):
    """dispatch(num_worst_tokens) + experts + combine captured in a torch CUDA graph, replayed on new x."""
    rank, R = comm.Get_rank(), comm.Get_size()
    W = N * R
    idx, w = make_routing(rng, N, E, K, "random", R), make_weights(rng, N, K)
    static_x, t_idx, t_w = to_t(make_x(rng, N, H)), to_t(idx), to_t(w)
    layout = buf.get_dispatch_layout(t_idx, E)
    routing = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])

    def step():
        rx, _, rw, lst, handle, _ = buf.dispatch(static_x, **routing, topk_idx=t_idx, topk_weights=t_w,
                                                 num_worst_tokens=W)
        comb, comb_w, _ = buf.combine((rx.float() * (rank + 1)).bfloat16(), handle, topk_weights=rw)
        return rx, lst, handle, comb, comb_w

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                   # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rx, lst, handle, comb, comb_w = step()
    r_layout = ref.get_dispatch_layout(idx, E)
    for trial in range(2):
        x = replay_on_new_x(graph, static_x, rng, buf)
        r_x, _, r_w, _, r_handle, _ = ref.dispatch(x, num_tokens_per_rank=r_layout[0], is_token_in_rank=r_layout[3],
                                                   num_tokens_per_expert=r_layout[2], topk_idx=idx, topk_weights=w,
                                                   num_worst_tokens=W)
        rows = r_handle.num_recv_tokens
        rc_x, rc_w, _ = ref.combine((r_x.astype(np.float32) * (rank + 1)).astype(BF16), r_handle, topk_weights=r_w)

        def compare():
            check(lst == [] and tuple(rx.shape) == (W, H), "worst-token dispatch: expected [W, H] and []")
            _same_bits(to_np(rx)[:rows], r_x[:rows], "graph recv_x")
            _same_bits(to_np(comb), rc_x, "graph combined_x")
            _same_bits(to_np(comb_w), rc_w, "graph combined_topk_weights")
            try:
                handle[0].shape
            except NotImplementedError as e:
                check("rank_prefix_matrix" in str(e), "handle[0]: the error should name rank_prefix_matrix")
            else:
                check(False, "handle[0] with num_worst_tokens: expected NotImplementedError")

        checks.run(f"CUDA graph, normal mode, num_worst_tokens (replay {trial})", compare)


def ll_trip(checks, comm, buf, ref, rng, E, use_fp8=True, use_ue8m0=False, hook=False, zero_copy=False,
            async_finish=False, use_out=False, use_logfmt=False, wait_stats=False):
    """A low-latency round trip against the reference. ``use_logfmt``: LogFMT combine, bit for bit
    with the reference's; ``wait_stats``: both receive-wait statistics given (misshapen ones refused
    first, as cupy_ep refuses them; int64 [R], never negative)."""
    rank, R = comm.Get_rank(), comm.Get_size()
    EL, T = E // R, R * M
    x, idx, w = make_x(rng, N, H), make_routing(rng, N, E, K, "holes", R), make_weights(rng, N, K)
    kw = dict(use_fp8=use_fp8, round_scale=use_ue8m0, use_ue8m0=use_ue8m0)
    r_stats = np.zeros(EL, np.int32)
    r_x, r_count, r_handle, _, _ = ref.low_latency_dispatch(x, idx, M, E, cumulative_local_expert_recv_stats=r_stats,
                                                            **kw)
    stats = torch.zeros(EL, dtype=torch.int32, device="cuda")
    t_x, t_idx, t_w = to_t(x), to_t(idx), to_t(w)
    d_wait, c_wait = (torch.zeros(R, dtype=torch.int64, device="cuda") for _ in range(2)) if wait_stats else (None, None)
    if wait_stats:
        checks.run("misshapen dispatch_wait_recv_cost_stats refused", lambda: expect_error(
            ValueError, "dispatch_wait_recv_cost_stats", lambda: buf.low_latency_dispatch(
                t_x, t_idx, M, E, dispatch_wait_recv_cost_stats=torch.zeros(R + 1, dtype=torch.int64, device="cuda"),
                **kw)))
    g_x, g_count, g_handle, event, g_hook = buf.low_latency_dispatch(
        t_x, t_idx, M, E, stats, d_wait, async_finish=async_finish, return_recv_hook=hook, **kw)
    if hook:
        g_hook()
    if async_finish:
        event.current_stream_wait()
    torch.cuda.synchronize()
    what = (f"low latency fp8={use_fp8} ue8m0={use_ue8m0} hook={hook} zero_copy={zero_copy} async={async_finish} "
            f"logfmt={use_logfmt} wait_stats={wait_stats}")

    def compare_dispatch():
        check(len(g_handle) == 5 and tuple(g_handle[2:]) == (M, H, E), "handle: expected DeepEP's 5 entries")
        ref_rows = _ll_rows(r_count, r_handle[1], r_handle[0])
        got_rows = _ll_rows(to_np(g_count), to_np(g_handle[1]), to_np(g_handle[0]))
        check(set(ref_rows) == set(got_rows), "the (expert, source, token) rows differ")
        keys = sorted(ref_rows)
        jj = np.array([k[0] for k in keys], np.int64)
        rr, gr = (np.array([rows[k] for k in keys], np.int64) for rows in (ref_rows, got_rows))
        if use_fp8:
            s = g_x[1]
            g = H // 512 if use_ue8m0 else H // 128
            check(s.dtype == (torch.int32 if use_ue8m0 else torch.float32) and tuple(s.shape) == (EL, T, g)
                  and s.stride() == (T * g, 1, T), f"scales: expected DeepEP's column-major layout, got {s.dtype} "
                                                   f"{tuple(s.shape)} strides {s.stride()}")
            _same_bits(to_np(g_x[0])[jj, gr], np.asarray(r_x[0])[jj, rr], "recv_x (FP8 data)")
            got_s = unpack_ue8m0(to_np(s)) if use_ue8m0 else to_np(s)
            _same_bits(got_s[jj, gr], r_x[1][jj, rr], "recv_x (scales)")
        else:
            _same_bits(to_np(g_x)[jj, gr], r_x[jj, rr], "recv_x")
        _same_bits(to_np(stats), r_stats, "cumulative_local_expert_recv_stats")
        return ref_rows, got_rows

    ref_rows, got_rows = checks.run(f"{what}: dispatch", compare_dispatch)
    y_ref, y_gpu = ll_expert_outputs(r_x, use_fp8, rank, EL, ref_rows, got_rows)
    out_ref, bound = ll_combine_expected(ref, y_ref, idx, w, r_handle, use_logfmt)
    if zero_copy:
        y_t = buf.get_next_low_latency_combine_buffer(g_handle)
        inner = buf.cupy_ep_buffer.get_next_low_latency_combine_buffer(g_handle.cupy_ep_handle)
        checks.run("zero_copy buffer is cupy_ep's memory", lambda: check(y_t.data_ptr() == inner.data.ptr,
                                                                          "get_next_low_latency_combine_buffer copied"))
        y_t.copy_(to_t(y_gpu))
    else:
        y_t = to_t(y_gpu)
    out = torch.empty((N, H), dtype=torch.bfloat16, device="cuda") if use_out else None
    if wait_stats:
        checks.run("misshapen combine_wait_recv_cost_stats refused", lambda: expect_error(
            ValueError, "combine_wait_recv_cost_stats", lambda: buf.low_latency_combine(
                y_t, t_idx, t_w, g_handle, combine_wait_recv_cost_stats=torch.zeros((R, R), dtype=torch.int64,
                                                                                    device="cuda"))))
    combined, event, c_hook = buf.low_latency_combine(y_t, t_idx, t_w, g_handle, use_logfmt=use_logfmt,
                                                      zero_copy=zero_copy, async_finish=async_finish,
                                                      return_recv_hook=hook, out=out,
                                                      combine_wait_recv_cost_stats=c_wait)
    if hook:
        c_hook()
    if async_finish:
        event.current_stream_wait()
    torch.cuda.synchronize()

    def compare_combine():
        check(out is None or combined is out, "out=: expected the same tensor back")
        if use_logfmt:
            _same_bits(to_np(combined), out_ref, "low_latency_combine (LogFMT)")
        else:
            _close_bf16(to_np(combined), out_ref.astype(np.float64), bound, "low_latency_combine")
        for name, a in (("dispatch_wait_recv_cost_stats", d_wait), ("combine_wait_recv_cost_stats", c_wait)):
            if a is not None:
                check(a.dtype == torch.int64 and tuple(a.shape) == (R,) and bool((a >= 0).all()),
                      f"{name}: expected int64 [{R}] of non-negative nanoseconds, got {a.dtype} {a.tolist()}")

    checks.run(f"{what}: combine", compare_combine)


def ll_graph(checks, comm, buf, ref, rng, E):
    """Low-latency dispatch (bf16) + experts + combine in a torch CUDA graph, replayed on new x."""
    rank, R = comm.Get_rank(), comm.Get_size()
    EL = E // R
    idx, w = make_routing(rng, N, E, K, "random", R), make_weights(rng, N, K)
    static_x, t_idx, t_w = to_t(make_x(rng, N, H)), to_t(idx), to_t(w)
    scale = ll_expert_scale(rank, EL)
    t_scale = to_t(scale)

    def step():
        rx, _, handle, _, _ = buf.low_latency_dispatch(static_x, t_idx, M, E, use_fp8=False)
        y = (rx.float() * t_scale[:, None, None]).bfloat16()
        return buf.low_latency_combine(y, t_idx, t_w, handle)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        combined = step()
    for trial in range(2):
        x = replay_on_new_x(graph, static_x, rng, buf)
        r_x, _, r_handle, _, _ = ref.low_latency_dispatch(x, idx, M, E, use_fp8=False)
        y_ref = (np.asarray(r_x, np.float32) * scale[:, None, None]).astype(BF16)
        out_ref, bound = ll_combine_expected(ref, y_ref, idx, w, r_handle)
        checks.run(f"CUDA graph, low latency (replay {trial})",
                   lambda: _close_bf16(to_np(combined), out_ref.astype(np.float64), bound, "graph low_latency_combine"))


def expect_error(kind, word, fn):
    """``fn()`` raises ``kind`` with a message naming ``word``."""
    try:
        fn()
    except kind as e:
        check(word in str(e), f"{kind.__name__} should name {word!r}: {e}")
    else:
        check(False, f"expected {kind.__name__} naming {word}")


def refusals(checks, buf):
    checks.run("not supported: named NotImplementedError", lambda: (
        expect_error(NotImplementedError, "get_local_buffer_tensor", lambda: buf.get_local_buffer_tensor(torch.bfloat16)),
        expect_error(NotImplementedError, "get_nvl_buffer_size_hint",
                     lambda: deep_ep.Config().get_nvl_buffer_size_hint(2 * H, 2))))


def main():
    comm = MPI.COMM_WORLD
    rank, R = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    torch.cuda.set_device(local.Get_rank() % torch.cuda.device_count())
    local.Free()
    rng = np.random.default_rng(20261207 + rank)
    E = 8 * R
    checks = Checks(comm)
    checks.run("zero-copy conversions", check_zero_copy)

    nvl_bytes = deep_ep.Buffer.get_nvl_buffer_size_hint(N * R, H, R, K)
    buf = deep_ep.Buffer(None, nvl_bytes, comm=comm, explicitly_destroy=True)
    ref = reference_buffer(comm, buf.cupy_ep_buffer, num_nvl_bytes=nvl_bytes)
    handles = {kind: normal_trip(checks, comm, buf, ref, rng, E, kind) for kind in (None, "row", "column", "ue8m0")}
    fp8_stream_order(checks, buf, ref, rng, handles)
    normal_trip(checks, comm, buf, ref, rng, E, None, kind="dups")
    stream_order(checks, buf, ref, rng, *normal_trip(checks, comm, buf, ref, rng, E))
    normal_graph(checks, comm, buf, ref, rng, E)

    ll_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(M, H, R, E)
    ll = deep_ep.Buffer(None, 0, ll_bytes, low_latency_mode=True, comm=comm, explicitly_destroy=True)
    ll_ref = reference_buffer(comm, ll.cupy_ep_buffer, num_rdma_bytes=ll_bytes, low_latency_mode=True)
    ll_trip(checks, comm, ll, ll_ref, rng, E)
    ll_trip(checks, comm, ll, ll_ref, rng, E, use_ue8m0=True, hook=True)
    ll_trip(checks, comm, ll, ll_ref, rng, E, use_fp8=False, zero_copy=True, use_out=True)
    ll_trip(checks, comm, ll, ll_ref, rng, E, async_finish=True)
    ll_trip(checks, comm, ll, ll_ref, rng, E, hook=True, use_logfmt=True, wait_stats=True)
    ll_graph(checks, comm, ll, ll_ref, rng, E)
    refusals(checks, buf)

    for b in (buf, ll):
        b.destroy()
    for r in (ref, ll_ref):
        r.destroy()
    agree(comm, True)
    if rank == 0:
        print(f"SUMMARY check_torch_adapter: {checks.passed} checks passed on {R} ranks", flush=True)


if __name__ == "__main__":
    run_or_abort(main)
