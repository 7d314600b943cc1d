"""Shrink mode of the GPU Buffer (issue 25): DeepEP's mask test re-expressed, as
tests/mpi/check_ll_parity.py's ``case_shrink`` does for the reference backend.

Run: ``CUPY_EP_TEST_SHARE_GPU=1 mpiexec -n 3 python -m pytest tests/gpu/test_shrink_gpu.py``
(2 or more ranks; one GPU shared by all of them is enough).

The ranks in ``dead_at[call]`` stop at that call of a round (dispatch, combine,
clean_low_latency_buffer) and make no other GPU call until the rejoin. On the others, the
outputs equal the reference's (a plain Buffer whose calls leave out the dead ranks' tokens and
experts): dispatch rows bit for bit, the bf16 combine within the design's bound, the LogFMT
combine bit for bit, all written into NaN-poisoned outputs; every live rank's mask names exactly
the ranks dead so far; a call after the masking waits for nobody (the dead round of two cases
and the round after it go through return_recv_hook's separate send and receive kernels). Then
every rank calls ``low_latency_clean_mask_buffer``: the masks are empty and a full round trip
matches again.
"""
import time

import numpy as np
import pytest

from cupy_ep.testing import (_ll_rows, agree as agree_all, check_ll_combine, check_ll_dispatch, ll_combine_expected,
                             ll_expert_outputs, make_routing, make_weights, make_x, poison_pool, to_device, to_host)

TIMEOUT_S = 3.0   # time to mask a dead rank; far above the skew of ranks time-sliced on one GPU
N, HIDDEN, M, TOPK, E_LOCAL = 12, 256, 16, 3, 2


def drop_experts_of(idx, ranks):
    """``idx`` with the slots of the experts on ``ranks`` set to -1."""
    out = idx.copy()
    for r in ranks:
        out[(idx >= 0) & (idx // E_LOCAL == r)] = -1
    return out


@pytest.fixture(scope="module")
def buffers(comm, ll_transport):
    import cupy_ep
    from cupy_ep import reference

    r = comm.Get_size()
    if r < 2:
        pytest.skip("shrink mode needs a second rank to mask")
    nbytes = cupy_ep.Buffer.get_low_latency_rdma_size_hint(M, HIDDEN, r, E_LOCAL * r)
    gpu = cupy_ep.Buffer(comm, num_rdma_bytes=nbytes, low_latency_mode=True, timeout_s=TIMEOUT_S,
                         ll_transport=ll_transport, enable_shrink=True)
    ref = reference.Buffer(comm, num_rdma_bytes=nbytes, low_latency_mode=True)
    yield gpu, ref
    gpu.destroy()
    ref.destroy()


class Round:
    """One round of calls on every rank: the reference's calls (all ranks, the dead ones with
    what the live ranks must see) and the GPU's (the live ranks only); problems collected."""

    def __init__(self, comm, gpu, ref, rng):
        self.comm, self.gpu, self.ref, self.rng = comm, gpu, ref, rng
        self.me, self.r = comm.Get_rank(), comm.Get_size()
        self.problems = []

    def mask_is(self, ranks, what):
        import cupy

        mask = cupy.full(self.r, -1, cupy.int32)
        self.gpu.low_latency_query_mask_buffer(mask)
        got = set(np.flatnonzero(to_host(mask)).tolist())
        if got != set(ranks):
            self.problems.append(f"{what}: mask {to_host(mask).tolist()}, expected ranks {sorted(ranks)}")

    @staticmethod
    def synced(result):
        import cupy

        cupy.cuda.Device().synchronize()
        return result

    def timed(self, what, fn, limit_s):
        t0 = time.monotonic()
        result = fn()
        waited = time.monotonic() - t0
        if limit_s is not None and waited > limit_s:
            self.problems.append(f"{what} waited {waited:.2f} s for masked ranks")
        return result

    def run(self, dead_d=(), dead_c=(), dead_clean=(), masked_before=(), hook=False):
        """The round (``hook``: the GPU's dispatch and combine with ``return_recv_hook``); returns
        the ranks masked after it."""
        num_experts = E_LOCAL * self.r
        rng, me = self.rng, self.me
        x, idx, w = make_x(rng, N, HIDDEN), make_routing(rng, N, num_experts, TOPK, "random", self.r), \
            make_weights(rng, N, TOPK)
        # the bound of a call that has nobody left to mask (none in a round without dead ranks:
        # its first calls compile)
        quick = TIMEOUT_S / 2 if dead_d or dead_c or dead_clean or masked_before else None
        gone = set(dead_d) | set(masked_before)
        px, pidx = (x[:0], idx[:0]) if me in gone else (x, drop_experts_of(idx, gone))
        r_x, r_cnt, r_h, _, _ = self.ref.low_latency_dispatch(px, pidx, M, num_experts, use_fp8=False)
        ref_rows = _ll_rows(r_cnt, r_h[1], r_h[0])
        got = None
        if me not in gone:
            got = self.guarded("dispatch", lambda: self.dispatch(x, idx, num_experts, r_x, r_cnt, r_h,
                                                                 None if dead_d else quick, hook))
            self.mask_is(gone, "after dispatch")
        gone_c = gone | set(dead_c)
        cidx = drop_experts_of(pidx, gone_c)
        got_rows = got[2] if got is not None else ref_rows
        y_ref, y_gpu = ll_expert_outputs(r_x, False, me, E_LOCAL, ref_rows, got_rows)
        out_ref, bound = ll_combine_expected(self.ref, y_ref, cidx, w[:pidx.shape[0]], r_h)
        out_fmt = self.ref.low_latency_combine(y_ref, cidx, w[:pidx.shape[0]], r_h, use_logfmt=True)[0]
        if me not in gone_c and got is not None:
            self.guarded("combine", lambda: self.combine(y_gpu, idx, w, got[1], out_ref, bound, out_fmt,
                                                         None if dead_c else quick, quick, hook))
            self.mask_is(gone_c, "after combine")
        gone_clean = gone_c | set(dead_clean)
        if me not in gone_clean:
            self.guarded("clean_low_latency_buffer", lambda: self.timed(
                "clean_low_latency_buffer", lambda: self.gpu.clean_low_latency_buffer(M, HIDDEN, num_experts),
                None if dead_clean else TIMEOUT_S / 2))
            self.mask_is(gone_clean, "after clean_low_latency_buffer")
        agree_all(self.comm, not self.problems, "; ".join(self.problems))
        return gone_clean

    def guarded(self, what, fn):
        """``fn()``, or None and a problem when it raised (the peers still meet this rank in the
        reference's calls and in the final agreement)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- reported to every rank
            self.problems.append(f"{what}: {type(e).__name__}: {e}")
            return None

    @staticmethod
    def received(result):
        """A call's result once its receive ran: the hook (the result's last item) called."""
        if result[-1] is not None:
            result[-1]()
        return result

    def dispatch(self, x, idx, num_experts, r_x, r_cnt, r_h, limit_s, hook):
        """The GPU dispatch against the reference's: ``(recv_x, handle, rows)``."""
        poison_pool(64 << 20)
        d_x, d_idx = to_device(x), to_device(idx)
        g_x, g_cnt, g_h, _, _ = self.timed("dispatch", lambda: self.synced(self.received(self.gpu.low_latency_dispatch(
            d_x, d_idx, M, num_experts, use_fp8=False, return_recv_hook=hook))), limit_s)
        _, got_rows = check_ll_dispatch(r_x, r_cnt, r_h, g_x, g_cnt, g_h)
        return g_x, g_h, got_rows

    def combine(self, y_gpu, idx, w, handle, out_ref, bound, out_fmt, limit_s, logfmt_limit_s, hook):
        """The GPU's bf16 combine (within the bound of the reference's) and LogFMT combine (bit
        for bit; a later call: whoever the first masked is masked already), into NaN."""
        import cupy

        d_y, d_idx, d_w = to_device(y_gpu), to_device(idx), to_device(w)
        for use_logfmt, limit in ((False, limit_s), (True, logfmt_limit_s)):
            out = cupy.full((N, HIDDEN), np.nan, dtype=out_ref.dtype)
            self.timed(f"combine (use_logfmt={use_logfmt})", lambda: self.synced(self.received(
                self.gpu.low_latency_combine(d_y, d_idx, d_w, handle, out=out, use_logfmt=use_logfmt,
                                             return_recv_hook=hook))), limit)
            check_ll_combine(to_host(out), out_fmt if use_logfmt else out_ref, bound, use_logfmt)


def shrink_cases(num_ranks):
    """Who stops where: one rank at each call, and (3+ ranks) two at once."""
    last = max(num_ranks - 1, 1)
    cases = [dict(dead_d=(last,)), dict(dead_c=(last,)), dict(dead_clean=(last,))]
    if num_ranks >= 3:
        cases.append(dict(dead_d=(last,), dead_c=(last - 1,)))
    return cases


@pytest.mark.parametrize("case", range(4), ids=["dispatch", "combine", "clean", "dispatch_and_combine"])
def test_mask_dead_ranks(comm, rng, buffers, case):
    gpu, ref = buffers
    cases = shrink_cases(comm.Get_size())
    if case >= len(cases):
        pytest.skip("two dead ranks need 3 ranks")
    dead_at = cases[case]
    Round(comm, gpu, ref, rng).run()                        # every rank: compiles, nobody masked
    dead = Round(comm, gpu, ref, rng).run(**dead_at, hook=case % 2 == 1)   # masks them
    Round(comm, gpu, ref, rng).run(masked_before=dead, hook=True)         # a later round: waits for nobody
    gpu.low_latency_clean_mask_buffer()
    back = Round(comm, gpu, ref, rng)
    back.mask_is((), "after low_latency_clean_mask_buffer")
    back.run()                                              # every rank again


def test_mask_calls(comm, buffers):
    """update (local) and query; the arguments refused as on the reference."""
    import cupy

    gpu, _ = buffers
    r, me = comm.Get_size(), comm.Get_rank()
    problems = []
    for call, exc in ((lambda: gpu.low_latency_query_mask_buffer(cupy.zeros(r, cupy.int64)), TypeError),
                      (lambda: gpu.low_latency_query_mask_buffer(np.zeros(r, np.int32)), TypeError),
                      (lambda: gpu.low_latency_query_mask_buffer(cupy.zeros(r + 1, cupy.int32)), ValueError),
                      (lambda: gpu.low_latency_update_mask_buffer(r), ValueError),
                      (lambda: gpu.low_latency_update_mask_buffer(me, True), ValueError)):
        try:
            call()
            problems.append(f"accepted ({exc.__name__} expected)")
        except exc:
            pass
    other = (me + 1) % r
    mask = cupy.zeros(r, cupy.int32)
    gpu.low_latency_update_mask_buffer(other, True)
    gpu.low_latency_query_mask_buffer(mask)
    if to_host(mask).tolist() != [int(q == other) for q in range(r)]:
        problems.append(f"after masking rank {other}: {to_host(mask).tolist()}")
    gpu.low_latency_update_mask_buffer(other, False)
    gpu.low_latency_query_mask_buffer(mask)
    if to_host(mask).any():
        problems.append(f"after unmasking rank {other}: {to_host(mask).tolist()}")
    agree_all(comm, not problems, "; ".join(problems))
