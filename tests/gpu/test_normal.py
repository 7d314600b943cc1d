"""Normal-mode dispatch/combine on GPUs, checked against the reference backend on the same inputs.

Inside one NVLink domain by default; with ``CUPY_EP_TEST_NVL_PEERS=P`` across R / P virtual
hosts (internode mode). Run: ``mpiexec -n R python -m pytest tests/gpu/test_normal.py``.
"""
import hashlib
import time

import numpy as np
import pytest

from cupy_ep.testing import (_same_bits, agreed, cached_round_trip, check_combine, make_routing, make_weights, make_x,
                             normal_round_trip, to_device, to_host)
from gpu_buffers import buffer_sizes, make_buffers, num_experts_for

@pytest.mark.parametrize("hidden", [7168, 2880])
@pytest.mark.parametrize("use_fp8", [False, True])
@pytest.mark.parametrize("kind", ["random", "skewed", "holes"])
def test_round_trip(comm, rng, normal_buffers, hidden, use_fp8, kind):
    if use_fp8 and hidden % 128:
        pytest.skip("FP8 needs hidden % 128 == 0")
    gpu, ref = normal_buffers
    num_tokens = int(rng.integers(50, 400)) if comm.Get_rank() != 1 else int(rng.integers(0, 3))
    normal_round_trip(comm, ref, gpu, rng, num_tokens=num_tokens, hidden=hidden, num_topk=8,
                      num_experts=num_experts_for(comm), use_fp8=use_fp8, kind=kind, bias_count=2)


@pytest.mark.parametrize("num_topk", [1, 2, 5, 9])
def test_topk_sizes(comm, rng, normal_buffers, num_topk):
    gpu, ref = normal_buffers
    normal_round_trip(comm, ref, gpu, rng, num_tokens=int(rng.integers(1, 300)), hidden=1024, num_topk=num_topk,
                      num_experts=num_experts_for(comm, 4), kind="dups", expert_alignment=4, bias_count=1)


def test_zero_tokens_everywhere(comm, rng, normal_buffers):
    gpu, ref = normal_buffers
    normal_round_trip(comm, ref, gpu, rng, num_tokens=0, hidden=256, num_topk=4, num_experts=num_experts_for(comm))


def test_empty_ranks_and_domains(comm, rng, normal_buffers):
    """Nobody selects the experts of the last rank (and, across domains, of the whole last domain)."""
    gpu, ref = normal_buffers
    r = comm.Get_size()
    empty = list(range(r - gpu.num_nvl_ranks, r)) if gpu.num_rdma_ranks > 1 else [r - 1]
    if len(empty) == r:
        pytest.skip("needs a rank (domain) left to select")
    normal_round_trip(comm, ref, gpu, rng, num_tokens=int(rng.integers(1, 200)), hidden=512, num_topk=3,
                      num_experts=num_experts_for(comm), empty_ranks=empty, bias_count=1)


def test_without_topk(comm, rng, normal_buffers):
    gpu, ref = normal_buffers
    normal_round_trip(comm, ref, gpu, rng, num_tokens=int(rng.integers(1, 200)), hidden=768, num_topk=4,
                      num_experts=num_experts_for(comm), with_topk=False)


def test_int32_topk_idx(comm, rng, agree, normal_buffers):
    """int32 expert ids: get_dispatch_layout reads them as they are (layout.cu with IDX_BYTES=4)
    and dispatch converts them to int64 (the notify kernel reads int64 only); both give what the
    same ids as int64 give."""
    gpu, _ = normal_buffers
    num_experts, num_tokens = num_experts_for(comm), int(rng.integers(1, 300))
    idx = make_routing(rng, num_tokens, num_experts, 6, "holes", comm.Get_size())
    d_x, d_w = to_device(make_x(rng, num_tokens, 512)), to_device(make_weights(rng, num_tokens, 6))
    results = []
    for ids in (to_device(idx), to_device(idx.astype(np.int32))):
        layout = gpu.get_dispatch_layout(ids, num_experts)
        recv_x, recv_idx, recv_w, counts, _, _ = gpu.dispatch(
            d_x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
            num_tokens_per_expert=layout[2], topk_idx=ids, topk_weights=d_w)
        results.append([None if a is None else to_host(a) for a in (*layout[:4], recv_x, recv_idx, recv_w)] + [counts])
    wide, narrow = results
    ok = all((a is None and b is None) or np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
             for a, b in zip(wide[:-1], narrow[:-1])) and wide[-1] == narrow[-1]
    agree(ok, "int32 topk_idx: layout or dispatch differs from int64 ids")


@pytest.mark.parametrize("use_fp8", [False, True])
def test_cached_dispatch(comm, rng, normal_buffers, use_fp8):
    gpu, ref = normal_buffers
    trip = normal_round_trip(comm, ref, gpu, rng, num_tokens=int(rng.integers(10, 300)), hidden=2048, num_topk=6,
                             num_experts=num_experts_for(comm), use_fp8=use_fp8)
    for _ in range(2):
        cached_round_trip(comm, ref, gpu, rng, trip, use_fp8=use_fp8)


def test_worst_tokens(comm, rng, normal_buffers):
    gpu, ref = normal_buffers
    num_tokens = int(rng.integers(0, 200))
    worst = comm.allreduce(num_tokens) + 5
    normal_round_trip(comm, ref, gpu, rng, num_tokens=num_tokens, hidden=512, num_topk=4,
                      num_experts=num_experts_for(comm), kind="holes", num_worst_tokens=worst, bias_count=1)


def test_small_chunks_and_configs(comm, rng, normal_buffers):
    """Signals after every token (chunk 1), few threads, few SMs: the same results."""
    import cupy_ep

    gpu, ref = normal_buffers
    for config in (cupy_ep.Config(num_sms=6, num_threads=256, chunk_tokens=1),
                   cupy_ep.Config(num_sms=12, num_threads=512, num_receivers=3)):
        normal_round_trip(comm, ref, gpu, rng, num_tokens=int(rng.integers(1, 300)), hidden=1024, num_topk=5,
                          num_experts=num_experts_for(comm), kind="holes", config=config, bias_count=1)


@pytest.mark.parametrize("mode", ["async", "previous_event", "comm_stream_alloc", "side_stream"])
def test_stream_modes(comm, rng, normal_buffers, mode):
    import cupy

    gpu, ref = normal_buffers
    num_experts = num_experts_for(comm)
    num_tokens = int(rng.integers(1, 300))
    x = make_x(rng, num_tokens, 1024)
    idx = make_routing(rng, num_tokens, num_experts, 8, "random", comm.Get_size())
    per_rank, per_rdma, per_expert, in_rank, _ = ref.get_dispatch_layout(idx, num_experts)
    ref_x, _, _, _, ref_handle, _ = ref.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                                                 is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    ref_c = ref.combine(ref_x, ref_handle)[0]
    stream = cupy.cuda.Stream(non_blocking=True) if mode == "side_stream" else cupy.cuda.get_current_stream()
    with stream:
        d_x, d_idx = to_device(x), to_device(idx)
        kwargs = {}
        if mode == "async":
            kwargs = dict(async_finish=True)
        elif mode == "previous_event":
            kwargs = dict(previous_event=gpu.capture())
        elif mode == "comm_stream_alloc":
            kwargs = dict(allocate_on_comm_stream=True)
        layout = gpu.get_dispatch_layout(d_idx, num_experts, **kwargs)
        if mode == "async":
            layout[4].current_stream_wait()
            kwargs["previous_event"] = gpu.capture()
        recv_x, _, _, _, handle, ev = gpu.dispatch(d_x, num_tokens_per_rank=layout[0],
                                                   num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                                                   num_tokens_per_expert=layout[2], **kwargs)
        if mode == "async":
            with ev:
                pass
        combined, _, ev = gpu.combine(recv_x, handle, **kwargs)
        if mode == "async":
            ev.current_stream_wait()
        got_x, got_c = to_host(recv_x), to_host(combined)

    def compare():
        _same_bits(got_x, ref_x, "recv_x")
        check_combine(got_c, ref_c, None, None, gpu.num_rdma_ranks)

    agreed(comm, mode, compare)


def test_cuda_graph_capture_and_replay(comm, rng, normal_buffers):
    """Worst-token dispatch + fake experts + combine captured once, replayed on new inputs; each replay
    checked against the reference."""
    import cupy

    gpu, ref = normal_buffers
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    num_experts, num_tokens, hidden, num_topk = num_experts_for(comm), 128, 1024, 4
    worst = num_tokens * num_ranks
    stream = cupy.cuda.Stream(non_blocking=True)

    def inputs():
        return (make_x(rng, num_tokens, hidden), make_routing(rng, num_tokens, num_experts, num_topk, "random",
                                                              num_ranks), make_weights(rng, num_tokens, num_topk))

    with stream:
        x, idx, w = inputs()
        d_x, d_idx, d_w = to_device(x), to_device(idx), to_device(w)
        layout = gpu.get_dispatch_layout(d_idx, num_experts)

        def step():
            recv_x, _, recv_w, _, handle, _ = gpu.dispatch(
                d_x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                num_tokens_per_expert=layout[2], topk_idx=d_idx, topk_weights=d_w, num_worst_tokens=worst)
            y = (recv_x.astype(cupy.float32) * (rank + 1)).astype(recv_x.dtype)
            return gpu.combine(y, handle, topk_weights=recv_w)[:2]

        step()   # compiles, warms the memory pool
        stream.synchronize()
        comm.Barrier()
        stream.begin_capture()
        combined, combined_w = step()
        graph = stream.end_capture()
        stream.synchronize()
        for _ in range(3):
            x, idx, w = inputs()
            d_x.view(cupy.uint16).set(x.view(np.uint16))
            d_idx.set(idx)
            d_w.set(w)
            new_layout = gpu.get_dispatch_layout(d_idx, num_experts)
            for old, new in zip(layout[:4], new_layout[:4]):
                if old is not None:
                    old[...] = new
            combined.fill(0)
            comm.Barrier()
            graph.launch(stream)
            stream.synchronize()
            gpu.check()
            per_rank, per_rdma, per_expert, in_rank, _ = ref.get_dispatch_layout(idx, num_experts)
            ref_x, _, ref_w, _, ref_handle, _ = ref.dispatch(
                x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w, num_worst_tokens=worst)
            y = (ref_x.astype(np.float32) * (rank + 1)).astype(ref_x.dtype)
            ref_c, ref_cw, _ = ref.combine(y, ref_handle, topk_weights=ref_w)
            agreed(comm, "graph replay", lambda: check_combine(to_host(combined), ref_c, to_host(combined_w), ref_cw,
                                                               gpu.num_rdma_ranks))


def test_fifty_iterations_hash_the_same(comm, rng, agree, normal_buffers):
    import cupy

    gpu, ref = normal_buffers
    trip = normal_round_trip(comm, ref, gpu, rng, num_tokens=512, hidden=7168, num_topk=8,
                             num_experts=num_experts_for(comm))
    inp = trip.gpu_inputs
    digests = set()
    for _ in range(50):
        recv_x, _, recv_w, _, handle, _ = gpu.dispatch(**inp)
        combined, combined_w, _ = gpu.combine(recv_x, handle, topk_weights=recv_w)
        h = hashlib.sha256()
        for a in (recv_x, recv_w, combined, combined_w):
            h.update(cupy.asnumpy(a).tobytes())
        digests.add(h.hexdigest())
    agree(len(digests) == 1, f"{len(digests)} different results over 50 runs")


def test_chaos_mode(comm, rng, nvl_peers):
    """Kernels compiled with random pauses before signals and between chunks, one token per chunk and
    the smallest normal_buffers these calls fit in: the same results as the reference."""
    import cupy_ep

    num_tokens, hidden, num_topk = 96, 512, 4
    gpu, ref = make_buffers(comm, nvl_peers, chaos=True,
                            **buffer_sizes(comm.Get_size(), nvl_peers, num_tokens, hidden, num_topk))
    try:
        config = cupy_ep.Config(num_sms=6, num_threads=256, chunk_tokens=1)
        for kind in ("random", "holes", "skewed"):
            trip = normal_round_trip(comm, ref, gpu, rng, num_tokens=int(rng.integers(0, num_tokens + 1)),
                                     hidden=hidden, num_topk=num_topk, num_experts=num_experts_for(comm),
                                     kind=kind, config=config, bias_count=1)
        cached_round_trip(comm, ref, gpu, rng, trip)
    finally:
        gpu.destroy()
        ref.destroy()


def test_skipped_dispatch_times_out(comm, rng, agree, nvl_peers):
    import cupy

    import cupy_ep

    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    if num_ranks < 2:
        pytest.skip("needs a second rank to skip the dispatch")
    sizes = buffer_sizes(num_ranks, nvl_peers, 64, 256, 4)
    buf = cupy_ep.Buffer(comm, **sizes, timeout_s=2.0)
    try:
        num_experts = num_experts_for(comm)
        idx = to_device(make_routing(rng, 32, num_experts, 4, "random", num_ranks))
        layout = buf.get_dispatch_layout(idx, num_experts)
        args = dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                    num_tokens_per_expert=layout[2])
        x = to_device(make_x(rng, 32, 256))
        buf.dispatch(x, **args)   # every rank: a new kernel shape compiles collectively
        cupy.cuda.get_current_stream().synchronize()
        outcome = None
        if rank != num_ranks - 1:
            start = time.monotonic()
            try:
                buf.dispatch(x, **args)
                cupy.cuda.Device().synchronize()
                buf.check()
                outcome = "no exception"
            except cupy_ep.CommTimeoutError as exc:
                elapsed = time.monotonic() - start
                if exc.rank != rank or "notify" not in exc.kernel or elapsed > 15:
                    outcome = f"wrong report: {exc} after {elapsed:.1f}s"
        comm.Barrier()
        agree(outcome is None, outcome)
    finally:
        buf.destroy()
