"""Normal-mode dispatch/combine on GPUs against a brute-force NumPy computation.

Run: mpiexec -n R python -m pytest tests/gpu  (R = 2, 3, 4 ... GPUs of one host)
"""
import hashlib
import time

import ml_dtypes
import numpy as np
import pytest
from gpu_util import poison_pool

BF16 = ml_dtypes.bfloat16
NVL_BYTES = 1 << 30


@pytest.fixture(scope="module")
def buffer(comm):
    import cupy_ep

    buf = cupy_ep.Buffer(comm, num_nvl_bytes=NVL_BYTES)
    yield buf
    buf.destroy()


def make_routing(rng, num_tokens, num_experts, num_topk, kind, num_ranks):
    """Top-k expert ids without repeats inside a token; kinds: random, skewed, holes."""
    if kind == "skewed":
        # Most selections land on rank 0's experts.
        p = np.ones(num_experts)
        p[: num_experts // num_ranks] = 30.0
        p /= p.sum()
        idx = np.stack([rng.choice(num_experts, num_topk, replace=False, p=p) for _ in range(num_tokens)]) \
            if num_tokens else np.zeros((0, num_topk), dtype=np.int64)
    else:
        idx = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :num_topk]
    idx = idx.astype(np.int64)
    if kind == "holes" and num_tokens:
        idx[rng.random(idx.shape) < 0.25] = -1
        idx[:: 7] = -1  # some tokens go nowhere
    return idx


def expected_dispatch(all_x, all_idx, all_w, rank, num_ranks, num_experts):
    """Rows rank receives, ordered by source then token, with remapped top-k: (x rows [n, H],
    top-k ids [n, K], weights [n, K], list of (source rank, source token))."""
    e_local = num_experts // num_ranks
    rows, idx_rows, w_rows, src = [], [], [], []
    for s in range(num_ranks):
        idx = all_idx[s]
        for t in range(idx.shape[0]):
            local = (idx[t] >= rank * e_local) & (idx[t] < (rank + 1) * e_local)
            if local.any():
                rows.append(all_x[s][t])
                idx_rows.append(np.where(local, idx[t] - rank * e_local, -1))
                w_rows.append(np.where(local, all_w[s][t], 0.0).astype(np.float32))
                src.append((s, t))
    hidden, num_topk = all_x[0].shape[1], all_idx[0].shape[1]
    return (np.array(rows, dtype=all_x[0].dtype).reshape(-1, hidden),
            np.array(idx_rows, dtype=np.int64).reshape(-1, num_topk),
            np.array(w_rows, dtype=np.float32).reshape(-1, num_topk), src)


def bf16_bits(a):
    return np.ascontiguousarray(a).view(np.uint16)


def run_case(comm, agree, rng, buffer, *, hidden, num_topk, use_fp8, kind, num_tokens, experts_per_rank=8,
             expert_alignment=1, bias_count=2):
    import cupy

    from cupy_ep.fp8 import per_token_cast_to_fp8

    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    num_experts = experts_per_rank * num_ranks
    x = rng.standard_normal((num_tokens, hidden)).astype(np.float32).astype(BF16)
    topk_idx = make_routing(rng, num_tokens, num_experts, num_topk, kind, num_ranks)
    topk_w = rng.random((num_tokens, num_topk)).astype(np.float32)
    all_x, all_idx, all_w = comm.allgather(x), comm.allgather(topk_idx), comm.allgather(topk_w)

    # Layout against brute force.
    d_idx = cupy.asarray(topk_idx)
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(d_idx, num_experts)
    e_local = num_experts // num_ranks
    owner = np.where(topk_idx >= 0, topk_idx // e_local, -1)
    exp_in_rank = np.stack([(owner == r).any(axis=1) for r in range(num_ranks)], axis=1) \
        if num_tokens else np.zeros((0, num_ranks), bool)
    exp_per_expert = np.bincount(topk_idx[topk_idx >= 0], minlength=num_experts)
    agree(per_rdma is None and np.array_equal(cupy.asnumpy(in_rank), exp_in_rank)
          and np.array_equal(cupy.asnumpy(per_rank), exp_in_rank.sum(0))
          and np.array_equal(cupy.asnumpy(per_expert), exp_per_expert), "layout mismatch")

    if use_fp8:
        x_fp8, scales = per_token_cast_to_fp8(x)
        d_x = (cupy.asarray(np.ascontiguousarray(x_fp8).view(np.uint8)), cupy.asarray(scales))
        payload = [(np.ascontiguousarray(a).view(np.uint8), b) for a, b in comm.allgather((x_fp8, scales))]
    else:
        d_x = cupy.asarray(x)
    poison_pool()
    recv_x, recv_idx, recv_w, per_expert_list, handle, _ = buffer.dispatch(
        d_x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=d_idx, topk_weights=cupy.asarray(topk_w), expert_alignment=expert_alignment)
    rows, idx_rows, w_rows, src = expected_dispatch(all_x, all_idx, all_w, rank, num_ranks, num_experts)
    n = len(rows)
    got_idx, got_w = cupy.asnumpy(recv_idx), cupy.asnumpy(recv_w)
    ok = got_idx.shape == (n, num_topk) and np.array_equal(got_idx, idx_rows)
    ok = ok and np.array_equal(got_w, w_rows)
    if use_fp8:
        exp_bits = np.array([payload[s][0][t] for s, t in src], np.uint8).reshape(n, hidden)
        exp_scales = np.array([payload[s][1][t] for s, t in src], np.float32).reshape(n, hidden // 128)
        ok = ok and np.array_equal(cupy.asnumpy(recv_x[0]), exp_bits)
        ok = ok and np.array_equal(cupy.asnumpy(recv_x[1]), exp_scales)
    else:
        ok = ok and np.array_equal(bf16_bits(cupy.asnumpy(recv_x)), bf16_bits(rows))
    counts = np.zeros(e_local, np.int64)
    for row in idx_rows:
        for j in set(int(v) for v in row if v >= 0):
            counts[j] += 1
    exp_list = [int(-(-c // expert_alignment) * expert_alignment) for c in counts]
    agree(ok and per_expert_list == exp_list, f"dispatch mismatch ({kind}, fp8={use_fp8}, H={hidden}, K={num_topk})")

    # Combine: each rank scales what it got by (rank + 1); sources sum those plus biases.
    y = (rows.astype(np.float32) * (rank + 1)).astype(BF16)
    biases = [rng.standard_normal((num_tokens, hidden)).astype(np.float32).astype(BF16) for _ in range(bias_count)]
    all_y = comm.allgather(y)
    all_src = comm.allgather(src)
    expected = np.zeros((num_tokens, hidden), np.float32)
    for b in biases:
        expected += b.astype(np.float32)
    for r in range(num_ranks):
        for i, (s, t) in enumerate(all_src[r]):
            if s == rank:
                expected[t] += all_y[r][i].astype(np.float32)
    poison_pool()
    bias_arg = None if bias_count == 0 else (cupy.asarray(biases[0]) if bias_count == 1
                                              else tuple(cupy.asarray(b) for b in biases))
    combined, combined_w, _ = buffer.combine(cupy.asarray(y), handle, topk_weights=recv_w, bias=bias_arg)
    got = cupy.asnumpy(combined).astype(np.float32)
    ok = np.isfinite(got).all() and np.allclose(got, expected, rtol=2**-7, atol=1e-5)
    exp_w = np.where(topk_idx >= 0, topk_w, 0.0)
    ok = ok and np.allclose(cupy.asnumpy(combined_w), exp_w, rtol=1e-6, atol=0)
    agree(ok, f"combine mismatch ({kind}, H={hidden}, K={num_topk})")
    return dict(handle=handle, rows=rows, src=src, d_x=d_x, per_rank=per_rank, in_rank=in_rank,
                per_expert=per_expert, d_idx=d_idx, topk_w=topk_w, n=n, num_experts=num_experts)


@pytest.mark.parametrize("hidden", [7168, 2880])
@pytest.mark.parametrize("use_fp8", [False, True])
@pytest.mark.parametrize("kind", ["random", "skewed", "holes"])
def test_dispatch_combine(comm, agree, rng, buffer, hidden, use_fp8, kind):
    if use_fp8 and hidden % 128:
        pytest.skip("FP8 needs hidden % 128 == 0")
    num_tokens = int(rng.integers(50, 400)) if comm.Get_rank() != 1 else int(rng.integers(0, 3))
    run_case(comm, agree, rng, buffer, hidden=hidden, num_topk=8, use_fp8=use_fp8, kind=kind, num_tokens=num_tokens)


@pytest.mark.parametrize("num_topk", [1, 2, 5, 9])
def test_topk_sizes(comm, agree, rng, buffer, num_topk):
    experts_per_rank = max(4, -(-num_topk // comm.Get_size()))
    run_case(comm, agree, rng, buffer, hidden=1024, num_topk=num_topk, use_fp8=False, kind="random",
             num_tokens=int(rng.integers(1, 300)), experts_per_rank=experts_per_rank, expert_alignment=4,
             bias_count=1)


def test_zero_tokens_everywhere(comm, agree, rng, buffer):
    run_case(comm, agree, rng, buffer, hidden=256, num_topk=4, use_fp8=False, kind="random", num_tokens=0,
             bias_count=0)


def test_cached_dispatch(comm, agree, rng, buffer):
    import cupy

    case = run_case(comm, agree, rng, buffer, hidden=2048, num_topk=6, use_fp8=False, kind="random",
                    num_tokens=int(rng.integers(10, 300)))
    x2 = rng.standard_normal((case["d_idx"].shape[0], 2048)).astype(np.float32).astype(BF16)
    all_x2 = comm.allgather(x2)
    poison_pool()
    recv_x, recv_idx, recv_w, per_list, handle2, _ = buffer.dispatch(cupy.asarray(x2), handle=case["handle"])
    exp = np.array([all_x2[s][t] for s, t in case["src"]], dtype=BF16).reshape(case["n"], 2048)
    agree(recv_idx is None and recv_w is None and per_list is None and handle2 is None
          and np.array_equal(bf16_bits(cupy.asnumpy(recv_x)), bf16_bits(exp)), "cached dispatch mismatch")


def test_worst_tokens(comm, agree, rng, buffer):
    import cupy

    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    num_tokens = int(rng.integers(0, 200))
    worst = comm.allreduce(num_tokens) + 5
    num_experts = 8 * num_ranks
    x = rng.standard_normal((num_tokens, 512)).astype(np.float32).astype(BF16)
    topk_idx = make_routing(rng, num_tokens, num_experts, 4, "holes", num_ranks)
    topk_w = rng.random((num_tokens, 4)).astype(np.float32)
    all_x, all_idx, all_w = comm.allgather(x), comm.allgather(topk_idx), comm.allgather(topk_w)
    d_idx = cupy.asarray(topk_idx)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(d_idx, num_experts)
    poison_pool()
    recv_x, recv_idx, recv_w, per_list, handle, _ = buffer.dispatch(
        cupy.asarray(x), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=d_idx, topk_weights=cupy.asarray(topk_w), num_worst_tokens=worst)
    rows, idx_rows, w_rows, _ = expected_dispatch(all_x, all_idx, all_w, rank, num_ranks, num_experts)
    n = len(rows)
    got_idx, got_w = cupy.asnumpy(recv_idx), cupy.asnumpy(recv_w)
    ok = recv_x.shape == (worst, 512) and per_list == []
    ok = ok and np.array_equal(bf16_bits(cupy.asnumpy(recv_x[:n])), bf16_bits(rows))
    ok = ok and np.array_equal(got_idx[:n], idx_rows) and (got_idx[n:] == -1).all()
    ok = ok and np.array_equal(got_w[:n], w_rows) and (got_w[n:] == 0).all()
    agree(ok, "worst-token dispatch mismatch")
    combined, _, _ = buffer.combine(recv_x, handle)
    num_owners = [len(set(topk_idx[t][topk_idx[t] >= 0] // 8)) for t in range(num_tokens)]
    expected = x.astype(np.float32) * np.array(num_owners, np.float32).reshape(num_tokens, 1)
    agree(np.allclose(cupy.asnumpy(combined).astype(np.float32), expected, rtol=2**-7, atol=1e-5),
          "worst-token combine mismatch")


@pytest.mark.parametrize("mode", ["async", "previous_event", "comm_stream_alloc", "side_stream"])
def test_stream_modes(comm, agree, rng, buffer, mode):
    import cupy

    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    num_experts = 8 * num_ranks
    num_tokens = int(rng.integers(1, 300))
    x = rng.standard_normal((num_tokens, 1024)).astype(np.float32).astype(BF16)
    topk_idx = make_routing(rng, num_tokens, num_experts, 8, "random", num_ranks)
    topk_w = rng.random((num_tokens, 8)).astype(np.float32)
    all_x, all_idx, all_w = comm.allgather(x), comm.allgather(topk_idx), comm.allgather(topk_w)
    stream = cupy.cuda.Stream(non_blocking=True) if mode == "side_stream" else cupy.cuda.get_current_stream()
    with stream:
        d_x = cupy.asarray(x)
        d_idx = cupy.asarray(topk_idx)
        kwargs = {}
        if mode == "async":
            kwargs = dict(async_finish=True)
        elif mode == "previous_event":
            kwargs = dict(previous_event=buffer.capture())
        elif mode == "comm_stream_alloc":
            kwargs = dict(allocate_on_comm_stream=True)
        per_rank, _, per_expert, in_rank, ev = buffer.get_dispatch_layout(d_idx, num_experts, **kwargs)
        if mode == "async":
            ev.current_stream_wait()
            kwargs["previous_event"] = buffer.capture()
        recv_x, recv_idx, recv_w, _, handle, ev = buffer.dispatch(
            d_x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=d_idx, topk_weights=cupy.asarray(topk_w), **kwargs)
        if mode == "async":
            with ev:
                pass
        combined, _, ev = buffer.combine(recv_x, handle, **kwargs)
        if mode == "async":
            ev.current_stream_wait()
        got_x = cupy.asnumpy(recv_x)
        got_c = cupy.asnumpy(combined)
    rows, _, _, _ = expected_dispatch(all_x, all_idx, all_w, rank, num_ranks, num_experts)
    owners = [len(set(topk_idx[t] // 8)) for t in range(num_tokens)]
    expected = x.astype(np.float32) * np.array(owners, np.float32).reshape(num_tokens, 1)
    agree(np.array_equal(bf16_bits(got_x), bf16_bits(rows))
          and np.allclose(got_c.astype(np.float32), expected, rtol=2**-7, atol=1e-5), f"{mode} mismatch")


def test_cuda_graph_capture_and_replay(comm, agree, rng, buffer):
    import cupy

    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    num_experts, num_tokens, hidden, num_topk = 8 * num_ranks, 128, 1024, 4
    worst = num_tokens * num_ranks
    stream = cupy.cuda.Stream(non_blocking=True)

    def new_inputs():
        x = rng.standard_normal((num_tokens, hidden)).astype(np.float32).astype(BF16)
        idx = make_routing(rng, num_tokens, num_experts, num_topk, "random", num_ranks)
        return x, idx, rng.random((num_tokens, num_topk)).astype(np.float32)

    with stream:
        x, idx, w = new_inputs()
        d_x, d_idx, d_w = cupy.asarray(x), cupy.asarray(idx), cupy.asarray(w)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(d_idx, num_experts)

        def step():
            recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
                d_x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=d_idx, topk_weights=d_w, num_worst_tokens=worst)
            y = (recv_x.astype(cupy.float32) * (rank + 1)).astype(recv_x.dtype)
            return buffer.combine(y, handle, topk_weights=recv_w)[:2]

        step()  # compile and warm the memory pool
        stream.synchronize()
        comm.Barrier()
        stream.begin_capture()
        combined, combined_w = step()
        graph = stream.end_capture()
        stream.synchronize()
        for _ in range(4):
            x, idx, w = new_inputs()
            d_x.set(x)
            d_idx.set(idx)
            d_w.set(w)
            new_rank, _, new_expert, new_in_rank, _ = buffer.get_dispatch_layout(d_idx, num_experts)
            per_rank[...] = new_rank
            per_expert[...] = new_expert
            in_rank[...] = new_in_rank
            combined.fill(0)
            comm.Barrier()
            graph.launch(stream)
            stream.synchronize()
            expected = np.zeros((num_tokens, hidden), np.float32)
            for t in range(num_tokens):
                for r in set(int(e) // 8 for e in idx[t] if e >= 0):
                    expected[t] += (x[t].astype(np.float32) * (r + 1)).astype(BF16).astype(np.float32)
            got = cupy.asnumpy(combined).astype(np.float32)
            exp_w = np.where(idx >= 0, w, 0)
            agree(np.allclose(got, expected, rtol=2**-7, atol=1e-5)
                  and np.allclose(cupy.asnumpy(combined_w), exp_w, rtol=1e-6), "graph replay mismatch")


def test_fifty_iterations_hash_the_same(comm, agree, rng, buffer):
    import cupy

    case = run_case(comm, agree, rng, buffer, hidden=7168, num_topk=8, use_fp8=False, kind="random",
                    num_tokens=512)
    digests = set()
    for _ in range(50):
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
            case["d_x"], num_tokens_per_rank=case["per_rank"], is_token_in_rank=case["in_rank"],
            num_tokens_per_expert=case["per_expert"], topk_idx=case["d_idx"],
            topk_weights=cupy.asarray(case["topk_w"]))
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
        h = hashlib.sha256()
        for a in (recv_x, recv_w, combined, combined_w):
            h.update(cupy.asnumpy(a).tobytes())
        digests.add(h.hexdigest())
    agree(len(digests) == 1, f"{len(digests)} different results over 50 runs")


def test_bad_input_raises_everywhere_and_buffer_survives(comm, agree, rng, buffer):
    import cupy

    num_ranks = comm.Get_size()
    idx = cupy.asarray(make_routing(rng, 16, 8 * num_ranks, 4, "random", num_ranks))
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 8 * num_ranks)
    x = cupy.zeros((16, 256), dtype=BF16)
    cases = [
        (TypeError, lambda: buffer.dispatch(x.astype(cupy.float32), num_tokens_per_rank=per_rank,
                                            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)),
        (ValueError, lambda: buffer.dispatch(x[:8], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                             num_tokens_per_expert=per_expert)),
        (ValueError, lambda: buffer.get_dispatch_layout(idx, 0)),
        (ValueError, lambda: buffer.get_dispatch_layout(idx + 8 * num_ranks, 8 * num_ranks)),
        (ValueError, lambda: buffer.dispatch(cupy.zeros((16, 250), dtype=BF16), num_tokens_per_rank=per_rank,
                                             is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)),
        (ValueError, lambda: buffer.dispatch(cupy.zeros((1 << 20, 256), dtype=BF16),
                                             num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                             num_tokens_per_expert=per_expert)),
    ]
    if num_ranks > 1:   # experts that do not split evenly over the ranks
        cases.append((ValueError, lambda: buffer.get_dispatch_layout(idx, 8 * num_ranks + 1)))
    for expected, call in cases:
        try:
            call()
            outcome = "no exception"
        except expected:
            outcome = None
        except Exception as exc:  # noqa: BLE001 - report the wrong type
            outcome = f"{type(exc).__name__}: {exc}"
        agree(outcome is None, f"expected {expected.__name__}, got {outcome}")
    run_case(comm, agree, rng, buffer, hidden=256, num_topk=4, use_fp8=False, kind="random", num_tokens=16)


def test_skipped_dispatch_times_out(comm, agree, rng):
    import cupy

    import cupy_ep

    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    if num_ranks < 2:
        pytest.skip("needs a second rank to skip the dispatch")
    buf = cupy_ep.Buffer(comm, num_nvl_bytes=64 << 20, timeout_s=2.0)
    try:
        idx = cupy.asarray(make_routing(rng, 32, 8 * num_ranks, 4, "random", num_ranks))
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 8 * num_ranks)
        x = cupy.zeros((32, 256), dtype=BF16)
        # Every rank makes the first call: a new kernel specialisation compiles collectively.
        buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        cupy.cuda.get_current_stream().synchronize()
        outcome = None
        if rank != num_ranks - 1:
            start = time.monotonic()
            try:
                buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                             num_tokens_per_expert=per_expert)
                outcome = "no exception"
            except cupy_ep.CommTimeoutError as exc:
                elapsed = time.monotonic() - start
                if exc.peer != num_ranks - 1 or exc.rank != rank or "notify" not in exc.kernel or elapsed > 15:
                    outcome = f"wrong report: {exc} after {elapsed:.1f}s"
        comm.Barrier()
        agree(outcome is None, outcome)
    finally:
        buf.destroy()
