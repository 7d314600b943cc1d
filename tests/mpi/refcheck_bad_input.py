"""The bad-input cases of tests/mpi/check_reference.py: wrong arguments to every call of both
modes (every rank raises, the Buffer stays usable), routing bad on one rank only (the call is
cancelled on every rank), arguments that disagree between ranks, a destroyed Buffer."""

import numpy as np

from cupy_ep import limits, reference
from cupy_ep.errors import CupyEpError
from refcheck_common import (BF16, ME, R, check, comm, default_nvl_peers, expect_raise, make_topk, normal_buffer,
                             own_rng, random_bf16, same_bits)

def case_bad_input(case, buf):
    """The same bad input on every rank: every rank raises, the Buffer stays usable."""
    hidden, k = 128, 2
    e_local = 2
    num_experts = e_local * R
    rng = own_rng(case)
    n = 3
    x = random_bf16(rng, (n, hidden))
    ti = make_topk(rng, n, k, num_experts, e_local, p_empty_row=0.0, p_neg=0.0)
    tw = rng.random((n, k)).astype(np.float32)
    ntpr, _, ntpe, itr, _ = buf.get_dispatch_layout(ti, num_experts)
    lay = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itr, num_tokens_per_expert=ntpe)

    expect_raise(TypeError, "topk_idx", buf.get_dispatch_layout, ti.astype(np.float32), num_experts)
    for bad_id in (num_experts, -2):   # local call: reported by check(), as on the GPU
        buf.get_dispatch_layout(np.full((n, k), bad_id, np.int64), num_experts)
        expect_raise(ValueError, "topk_idx", buf.check)
    expect_raise(ValueError, "topk_idx", buf.get_dispatch_layout, ti[:, 0].copy(), num_experts)
    expect_raise(ValueError, "topk_idx", buf.get_dispatch_layout, np.asfortranarray(np.zeros((3, 2), np.int64)), num_experts)
    expect_raise(ValueError, "num_experts", buf.get_dispatch_layout, ti, 0)
    if R > 1:
        expect_raise(ValueError, "num_experts", buf.get_dispatch_layout, ti, R + 1)
    expect_raise(TypeError, "x", buf.dispatch, x.astype(np.float32), topk_idx=ti, topk_weights=tw, **lay)
    expect_raise(ValueError, "x", buf.dispatch, np.asfortranarray(x), topk_idx=ti, topk_weights=tw, **lay)
    expect_raise(ValueError, "x", buf.dispatch, random_bf16(rng, (n, 12)), topk_idx=ti, topk_weights=tw, **lay)
    expect_raise(ValueError, "x", buf.dispatch, (np.zeros((n, 64), np.uint8), np.ones((n, 1), np.float32)),
                 topk_idx=ti, topk_weights=tw, **lay)
    expect_raise(TypeError, "x[1]", buf.dispatch, (np.zeros((n, 128), np.uint8), np.ones((n, 1), np.float16)),
                 topk_idx=ti, topk_weights=tw, **lay)
    expect_raise(TypeError, "x[0]", buf.dispatch, (np.zeros((n, 128), np.int8), np.ones((n, 1), np.float32)),
                 topk_idx=ti, topk_weights=tw, **lay)
    expect_raise(ValueError, "is_token_in_rank", buf.dispatch, random_bf16(rng, (n + 1, hidden)), topk_idx=ti, topk_weights=tw, **lay)
    expect_raise(ValueError, "topk_weights", buf.dispatch, x, topk_idx=ti, topk_weights=tw[:, :1].copy(), **lay)
    expect_raise(TypeError, "topk_weights", buf.dispatch, x, topk_idx=ti, topk_weights=tw.astype(np.float64), **lay)
    expect_raise(TypeError, "is_token_in_rank", buf.dispatch, x, topk_idx=ti, num_tokens_per_rank=ntpr,
                 is_token_in_rank=itr.astype(np.int32), num_tokens_per_expert=ntpe)
    expect_raise(ValueError, "num_tokens_per_expert", buf.dispatch, x, topk_idx=ti, topk_weights=tw,
                 num_tokens_per_rank=ntpr, is_token_in_rank=itr, num_tokens_per_expert=ntpe + 1)
    expect_raise(ValueError, "num_tokens_per_rank", buf.dispatch, x, topk_idx=ti, topk_weights=tw,
                 num_tokens_per_rank=ntpr + 1, is_token_in_rank=itr, num_tokens_per_expert=ntpe)
    expect_raise(ValueError, "num_tokens_per_rank", buf.dispatch, x, topk_idx=ti)
    expect_raise(ValueError, "expert_alignment", buf.dispatch, x, topk_idx=ti, topk_weights=tw, expert_alignment=0,
                 **lay)
    expect_raise(ValueError, "topk_weights", buf.dispatch, x, topk_idx=ti, **lay)
    expect_raise(ValueError, "topk_weights", buf.dispatch, x, topk_weights=tw, **lay)
    expect_raise(ValueError, "num_worst_tokens", buf.dispatch, x, topk_idx=ti, topk_weights=tw, num_worst_tokens=-1,
                 **lay)

    # a good dispatch, then bad combines / cached dispatches with its handle
    recv_x, recv_ti, recv_tw, _, handle, _ = buf.dispatch(x, topk_idx=ti, topk_weights=tw, **lay)
    rows = recv_x.shape[0]
    expect_raise(ValueError, "x", buf.combine, random_bf16(rng, (rows + 1, hidden)), handle)
    expect_raise(TypeError, "x", buf.combine, recv_x.astype(np.float32), handle)
    expect_raise(TypeError, "x", buf.combine, (recv_x, recv_x), handle)
    expect_raise(ValueError, "bias", buf.combine, recv_x, handle, bias=random_bf16(rng, (n, hidden + 8)))
    expect_raise(ValueError, "bias", buf.combine, recv_x, handle, bias=(None, None, None))
    expect_raise(TypeError, "bias[1]", buf.combine, recv_x, handle, bias=(None, np.zeros((n, hidden), np.float32)))
    expect_raise(ValueError, "topk_weights", buf.combine, recv_x, handle, topk_weights=np.zeros((rows + 1, k), np.float32))
    expect_raise(TypeError, "handle", buf.combine, recv_x, (1, 2, 3))
    expect_raise(ValueError, "topk_idx", buf.dispatch, x, handle=handle, topk_idx=ti)
    expect_raise(ValueError, "x", buf.dispatch, random_bf16(rng, (n + 2, hidden)), handle=handle)
    expect_raise(ValueError, "x", buf.dispatch, random_bf16(rng, (n, hidden + 8)), handle=handle)
    expect_raise(ValueError, "x", buf.combine, random_bf16(rng, (rows, hidden + 8)), handle)

    # low-latency argument errors
    m = 4
    hint = reference.Buffer.get_low_latency_rdma_size_hint(m, hidden, R, num_experts)
    expect_raise(ValueError, "low_latency_mode", buf.low_latency_dispatch, x, ti, m, num_experts)
    expect_raise(ValueError, "num_rdma_bytes", reference.Buffer, comm, low_latency_mode=True)
    with reference.Buffer(comm) as no_nvl:
        expect_raise(ValueError, "num_nvl_bytes", no_nvl.dispatch, x, topk_idx=ti, topk_weights=tw, **lay)
        expect_raise(ValueError, "num_nvl_bytes", no_nvl.combine, recv_x, handle)
    if R > limits.LL_MAX_RANKS:   # the low-latency mode refuses more ranks (as the GPU does)
        expect_raise(ValueError, "comm", reference.Buffer, comm, num_rdma_bytes=hint, low_latency_mode=True)
    else:
        with reference.Buffer(comm, num_rdma_bytes=hint, low_latency_mode=True) as ll:
            expect_raise(ValueError, "x", ll.low_latency_dispatch, random_bf16(rng, (m + 1, hidden)),
                         np.zeros((m + 1, k), np.int64), m, num_experts)
            expect_raise(ValueError, "x", ll.low_latency_dispatch, random_bf16(rng, (n, 64)), ti, m, num_experts)
            expect_raise(TypeError, "x", ll.low_latency_dispatch, (x, x), ti, m, num_experts)
            expect_raise(ValueError, "num_max_dispatch_tokens_per_rank", ll.low_latency_dispatch, x, ti, 0, num_experts)
            expect_raise(ValueError, "topk_idx", ll.low_latency_dispatch, x, ti + num_experts, m, num_experts)
            expect_raise(TypeError, "cumulative_local_expert_recv_stats", ll.low_latency_dispatch, x, ti, m,
                         num_experts, cumulative_local_expert_recv_stats=np.zeros(e_local, np.int64))
            if R > 1:
                expect_raise(ValueError, "num_experts", ll.low_latency_dispatch, x, ti, m, R + 1)
            rx, cnt, lh, _, _ = ll.low_latency_dispatch(x, ti, m, num_experts, use_fp8=False)
            y = np.zeros(rx.shape, dtype=BF16)
            expect_raise(ValueError, "x", ll.low_latency_combine, y[:, :-1].copy(), ti, tw, lh)
            expect_raise(TypeError, "x", ll.low_latency_combine, y.astype(np.float32), ti, tw, lh)
            expect_raise(ValueError, "topk_weights", ll.low_latency_combine, y, ti, None, lh)
            expect_raise(TypeError, "out", ll.low_latency_combine, y, ti, tw, lh, out=np.zeros((n, hidden), np.float32))
            expect_raise(ValueError, "out", ll.low_latency_combine, y, ti, tw, lh, out=random_bf16(rng, (n, hidden + 128)))
            expect_raise(TypeError, "handle", ll.low_latency_combine, y, ti, tw, lh[:3])
            # the combine's routing must be the dispatch's [N, K]
            expect_raise(ValueError, "topk_idx", ll.low_latency_combine, y, ti[:-1].copy(), tw[:-1].copy(), lh)
            expect_raise(ValueError, "topk_idx", ll.low_latency_combine, y, ti[:, :1].copy(), tw[:, :1].copy(), lh)
            expect_raise(ValueError, "topk_weights", ll.low_latency_combine, y, ti, tw[:-1].copy(), lh)
            expect_raise(TypeError, "handle", ll.low_latency_combine, y, ti, tw, lh[:5])
            unsent = [(t, e) for t in range(n) for e in range(num_experts) if e not in ti[t].tolist()]
            if unsent:   # naming an expert the dispatch did not send the token to
                other = ti.copy()
                other[unsent[0][0], 0] = unsent[0][1]
                expect_raise(ValueError, "topk_idx", ll.low_latency_combine, y, other, tw, lh)
            # a request the buffer cannot hold (an M whose size hint exceeds the buffer's)
            big_m = m
            while reference.Buffer.get_low_latency_rdma_size_hint(big_m, hidden, R, num_experts) <= hint:
                big_m *= 2
            expect_raise(ValueError, "num_rdma_bytes", ll.low_latency_dispatch, x, ti, big_m, num_experts)
            # bad expert ids on rank 0 only: every rank raises (rank 0 naming topk_idx)
            bad_ti = ti.copy()
            if ME == 0:
                bad_ti[0, 0] = num_experts
            expect_raise(ValueError, "topk_idx" if ME == 0 else "rank 0 passed invalid input",
                         ll.low_latency_dispatch, x, bad_ti, m, num_experts)
            # still usable
            got, _, _ = ll.low_latency_combine(y, ti, tw, lh)
            check(got.shape == (n, hidden) and not got.astype(np.float32).any(), "LL combine of zeros")

    # routing values bad on one rank only: the call is cancelled on every rank
    bad_ti = ti.copy()
    if ME == 0:
        bad_ti[n - 1, 0] = -3
    expect_raise(ValueError, "topk_idx" if ME == 0 else "rank 0 passed invalid input", buf.dispatch, x,
                 topk_idx=bad_ti, topk_weights=tw, **lay)
    bad_lay = dict(lay)
    if ME == R - 1:
        bad_lay["num_tokens_per_expert"] = ntpe + 1
    expect_raise(ValueError, "num_tokens_per_expert" if ME == R - 1 else f"rank {R - 1} passed invalid input",
                 buf.dispatch, x, topk_idx=ti, topk_weights=tw, **bad_lay)
    # combine: weights of the dispatch's K only; cached dispatch: the handle's rows
    expect_raise(ValueError, "topk_weights", buf.combine, recv_x, handle, topk_weights=np.zeros((rows, k + 1), np.float32))
    expect_raise(ValueError, "num_worst_tokens", buf.dispatch, x, handle=handle, num_worst_tokens=rows + 1)
    expect_raise(ValueError, "topk_weights", buf.dispatch, x, handle=handle, topk_weights=tw)
    # more tokens than the buffers hold (sized for MAX_TOKENS per rank)
    big = 2048
    big_ti = make_topk(rng, big, k, num_experts, e_local)
    b_ntpr, b_ntprr, b_ntpe, b_itr, _ = buf.get_dispatch_layout(big_ti, num_experts)
    expect_raise(ValueError, "x", buf.dispatch, random_bf16(rng, (big, hidden)), num_tokens_per_rank=b_ntpr,
                 num_tokens_per_rdma_rank=b_ntprr, is_token_in_rank=b_itr, num_tokens_per_expert=b_ntpe)

    # arguments that disagree between ranks: every rank raises (detected in the first collective)
    if R > 1:
        h_r = 128 * (1 + ME % 2)
        xr = random_bf16(rng, (n, h_r))
        expect_raise(ValueError, "x", buf.dispatch, xr, topk_idx=ti, topk_weights=tw, **lay)
    if R % 2 == 0:   # 1 on even ranks, 2 on odd ones: each valid alone, but they disagree
        expect_raise(ValueError, "num_nvl_peers", reference.Buffer, comm, num_nvl_peers=1 + ME % 2)
    if R % 2 == 1 and R > 1:
        expect_raise(ValueError, "num_nvl_peers", reference.Buffer, comm, num_nvl_peers=2)

    # the Buffer still works after all that
    recv_x2, *_ = buf.dispatch(x, topk_idx=ti, topk_weights=tw, **lay)
    check(same_bits(recv_x2, recv_x), "dispatch after errors")


def case_destroy():
    b = normal_buffer(default_nvl_peers(), 4, 128, 2)
    b.destroy()
    b.destroy()
    check(not b.is_available(), "destroyed Buffer not available")
    x = np.zeros((1, 128), BF16)
    ti = np.zeros((1, 1), np.int64)
    calls = [lambda: b.get_dispatch_layout(ti, R), lambda: b.dispatch(x), lambda: b.combine(x, None), b.check,
             lambda: b.low_latency_dispatch(x, ti, 1, R), lambda: b.low_latency_combine(x, ti, ti, None),
             lambda: b.get_next_low_latency_combine_buffer(None), lambda: b.clean_low_latency_buffer(1, 128, R)]
    for call in calls:
        expect_raise(CupyEpError, "this Buffer was destroyed", call)
