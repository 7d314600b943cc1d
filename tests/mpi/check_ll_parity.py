"""DeepEP-parity features of the reference low-latency mode, on every rank of an MPI job:
LogFMT combine against the bf16 combine and an independent model of the partial sums;
receive-wait statistics (checked arguments, growth, a delayed rank as the largest entry);
shrink mode (DeepEP's mask test: ranks that stop at a call are masked, results against a plain
Buffer without their tokens and experts, then every rank back).
Prints ``OK ll_parity ranks=R`` on rank 0 when every check passed (tests/test_ll_parity.py)."""
import time

import ml_dtypes
import numpy as np
from mpi4py import MPI

from cupy_ep import fp8, logfmt, reference
from cupy_ep.testing import make_routing, make_weights, run_or_abort

BF16 = ml_dtypes.bfloat16
comm = MPI.COMM_WORLD
R, ME = comm.Get_size(), comm.Get_rank()


def calc_diff(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 1 - 2 * (x * y).sum() / max((x * x + y * y).sum(), 1e-300)


def require(ok, what):
    bad = comm.allgather(None if ok else what)
    msgs = [f"rank {r}: {m}" for r, m in enumerate(bad) if m]
    if msgs:
        raise AssertionError("; ".join(msgs))


def deepep_rows(rng, kind, n, hidden):
    """DeepEP test_low_latency's inputs: constant rows (rank - 128) with arange in the last 128
    channels, or random normal rows."""
    if kind == "const":
        x = np.full((n, hidden), ME - 128.0, np.float32)
        x[:, -128:] = np.arange(n, dtype=np.float32)[:, None]
    else:
        x = rng.standard_normal((n, hidden)).astype(np.float32) * {"randn": 0.5 * rng.random(), "perf": 0.1}[kind]
    return x.astype(BF16)


def model_logfmt_combine(all_y, all_meta, idx, w, e_local, hidden):
    """Independent model of the GPU's LogFMT combine for this rank's tokens: all_y[(token, expert)]
    is the expert's output row (float32); per expert rank, a partial sum in slot order, its
    LogFMT round trip, then the float32 sum over ranks ascending."""
    n = idx.shape[0]
    out = np.zeros((n, hidden), np.float32)
    for t in range(n):
        for d in sorted({int(e) // e_local for e in idx[t] if e >= 0}):
            part = np.zeros(hidden, np.float32)
            for kk in range(idx.shape[1]):
                e = int(idx[t, kk])
                if e >= 0 and e // e_local == d:
                    part = part + np.float32(w[t, kk]) * all_y[(t, e)]
            out[t] = out[t] + logfmt.round_trip(part[None])[0]
    return out.astype(BF16)


def case_logfmt(seed, kind, use_fp8, hook, n=24, hidden=512, k=8, e_local=3):
    rng = np.random.default_rng(seed * 1000 + ME)
    num_experts = e_local * R
    m = 32
    hint = reference.Buffer.get_low_latency_rdma_size_hint(m, hidden, R, num_experts)
    with reference.Buffer(comm, num_rdma_bytes=hint, low_latency_mode=True) as buf:
        x = deepep_rows(rng, kind, n, hidden)
        idx = make_routing(rng, n, num_experts, min(k, num_experts), "holes", R)
        w = make_weights(rng, n, idx.shape[1])
        recv_x, cnt, handle, _, hk = buf.low_latency_dispatch(x, idx, m, num_experts, use_fp8=use_fp8,
                                                              return_recv_hook=hook)
        if hk:
            hk()
        y = fp8.per_token_cast_back(recv_x[0], recv_x[1], np.float32).astype(BF16) if use_fp8 else recv_x
        plain = buf.low_latency_combine(y, idx, w, handle)[0]
        out, _, hk = buf.low_latency_combine(y, idx, w, handle, use_logfmt=True, return_recv_hook=hook)
        if hk:
            hk()
        src = np.asarray(fp8.per_token_cast_back(*fp8.per_token_cast_to_fp8(x), np.float32)) if use_fp8 else x
        want = src.astype(np.float64) * np.where(idx >= 0, w, 0).sum(1, keepdims=True)
        require(not np.isnan(out.astype(np.float32)).any(), "LogFMT combine produced NaN")
        bound = 9e-4 if use_fp8 else 1e-5
        d_fmt, d_plain = calc_diff(want, out), calc_diff(plain, out)
        require(d_fmt < bound, f"{kind} fp8={use_fp8}: calc_diff vs x*sum(w) {d_fmt:.3g} >= {bound}")
        require(d_plain < 1e-5, f"{kind} fp8={use_fp8}: calc_diff vs bf16 combine {d_plain:.3g}")

        # bit for bit against the model, from every expert's rows gathered to their tokens' owners
        src_info, layout = handle[0], handle[1]
        rows = {}
        for j in range(e_local):
            for s in range(R):
                b, c = int(layout[j, s]) >> 32, int(layout[j, s]) & 0xFFFFFFFF
                for i in range(b, b + c):
                    rows.setdefault(s, []).append((int(src_info[j, i]), ME * e_local + j,
                                                   np.asarray(y[j, i], np.float32)))
        got = comm.alltoall([rows.get(s, []) for s in range(R)])
        all_y = {(t, e): row for part in got for t, e, row in part}
        exp = model_logfmt_combine(all_y, None, idx, w, e_local, hidden)
        require(np.array_equal(out.view(np.uint16), exp.view(np.uint16)),
                f"{kind} fp8={use_fp8}: LogFMT combine differs from the model of the partial sums")


def expect_error(exc_type, arg, fn):
    try:
        fn()
    except exc_type as e:
        require(str(e).startswith(arg), f"{arg}: unexpected message {e}")
        return
    require(False, f"{arg}: {exc_type.__name__} not raised")


def case_wait_stats(delay_s=0.25, n=8, hidden=256, e_local=2):
    """Stats grow on every call, never shrink; a rank that arrives delay_s late shows up on every
    other rank as the largest entry, of at least delay_s; bad arrays raise on every rank."""
    num_experts, m = e_local * R, 16
    hint = reference.Buffer.get_low_latency_rdma_size_hint(m, hidden, R, num_experts)
    rng = np.random.default_rng(5 + ME)
    late = R - 1
    with reference.Buffer(comm, num_rdma_bytes=hint, low_latency_mode=True) as buf:
        x = rng.standard_normal((n, hidden)).astype(BF16)
        idx = make_routing(rng, n, num_experts, 2, "random", R)
        w = make_weights(rng, n, 2)
        d_stats, c_stats = np.zeros(R, np.int64), np.zeros(R, np.int64)
        expect_error(ValueError, "dispatch_wait_recv_cost_stats",
                     lambda: buf.low_latency_dispatch(x, idx, m, num_experts, dispatch_wait_recv_cost_stats=np.zeros(R + 1, np.int64)))
        expect_error(TypeError, "dispatch_wait_recv_cost_stats",
                     lambda: buf.low_latency_dispatch(x, idx, m, num_experts, dispatch_wait_recv_cost_stats=np.zeros(R, np.int32)))
        prev_d, prev_c = d_stats.copy(), c_stats.copy()
        for rep in range(3):
            delayed = rep == 2
            if delayed and ME == late:
                time.sleep(delay_s)
            recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, m, num_experts, use_fp8=False,
                                                               dispatch_wait_recv_cost_stats=d_stats)
            if delayed and ME == late:
                time.sleep(delay_s)
            expect_bad = rep == 0
            if expect_bad:
                expect_error(TypeError, "combine_wait_recv_cost_stats",
                             lambda: buf.low_latency_combine(recv_x, idx, w, handle,
                                                             combine_wait_recv_cost_stats=np.zeros((R, R), np.float32)))
            buf.low_latency_combine(recv_x, idx, w, handle, combine_wait_recv_cost_stats=c_stats)
            require((d_stats >= prev_d).all() and (c_stats >= prev_c).all(), f"stats shrank: {d_stats}, {c_stats}")
            require(d_stats[ME] == 0 and c_stats[ME] == 0, f"this rank waited for itself: {d_stats}, {c_stats}")
            if delayed:   # require is collective: every rank calls it, the late one with nothing to check
                for name, st, before in (("dispatch", d_stats, prev_d), ("combine", c_stats, prev_c)):
                    grew = st - before
                    require(ME == late or (int(np.argmax(grew)) == late and grew[late] >= delay_s * 0.8e9),
                            f"{name}: the delayed rank {late} is not the largest entry: {grew.tolist()} ns")
            prev_d, prev_c = d_stats.copy(), c_stats.copy()


def drop_experts_of(idx, ranks, e_local):
    """``idx`` with the slots of experts on ``ranks`` set to -1."""
    out = idx.copy()
    for r in ranks:
        out[(idx >= 0) & (idx // e_local == r)] = -1
    return out


def case_shrink(dead_at, timeout_s=1.0, n=12, hidden=256, e_local=2, k=3):
    """Shrink mode, DeepEP's mask test: the ranks in ``dead_at[call]`` stop at that call of the
    round (dispatch, combine, clean_low_latency_buffer) and make no other until the rejoin. The
    others' results equal a plain Buffer's with the dead ranks' tokens (dead at dispatch) and
    experts removed, bit for bit, into NaN-poisoned outputs; every live rank's mask names exactly
    the ranks dead so far; a call after the masking waits for nobody. Then every rank calls
    low_latency_clean_mask_buffer, the masks are empty and a full round trip matches again."""
    num_experts, m = e_local * R, 16
    hint = reference.Buffer.get_low_latency_rdma_size_hint(m, hidden, R, num_experts)
    rng = np.random.default_rng(11 + ME)
    with reference.Buffer(comm, num_rdma_bytes=hint, low_latency_mode=True, enable_shrink=True,
                          timeout_s=timeout_s) as buf, \
            reference.Buffer(comm, num_rdma_bytes=hint, low_latency_mode=True) as plain:
        mask = np.zeros(R, np.int32)
        problems = []   # this rank's; require() (collective) runs once per round on every rank

        def mask_is(ranks, what):
            buf.low_latency_query_mask_buffer(mask)
            if set(np.flatnonzero(mask).tolist()) != set(ranks):
                problems.append(f"{what}: mask {mask.tolist()}, expected ranks {sorted(ranks)}")

        def expect(ok, what):
            if not ok:
                problems.append(what)

        def round_trip(dead_d=(), dead_c=(), dead_clean=()):
            x = rng.standard_normal((n, hidden)).astype(BF16)
            idx = make_routing(rng, n, num_experts, k, "random", R)
            w = make_weights(rng, n, k)
            gone = set(dead_d)
            # the expectation: every rank in plain calls, the dead ranks' tokens and experts left out
            px, pidx = (x[:0], idx[:0]) if ME in gone else (x, drop_experts_of(idx, gone, e_local))
            want_x, want_cnt, want_h, _, _ = plain.low_latency_dispatch(px, pidx, m, num_experts, use_fp8=False)
            gone_c = gone | set(dead_c)
            want_out = plain.low_latency_combine(want_x, drop_experts_of(pidx, gone_c, e_local),
                                                 w[:pidx.shape[0]], want_h)[0]
            if ME not in gone:
                got = buf.low_latency_dispatch(x, idx, m, num_experts, use_fp8=False)
                expect(np.array_equal(got[0].view(np.uint16), want_x.view(np.uint16))
                       and np.array_equal(got[1], want_cnt) and np.array_equal(got[2][0], want_h[0])
                       and np.array_equal(got[2][1], want_h[1]), f"dead {sorted(gone)}: dispatch differs")
                mask_is(gone, "after dispatch")
            gone = gone_c
            if ME not in gone:
                out = np.full((n, hidden), np.nan, BF16)
                buf.low_latency_combine(got[0], idx, w, got[2], out=out)
                expect(not np.isnan(out.astype(np.float32)).any()
                       and np.array_equal(out.view(np.uint16), want_out.view(np.uint16)),
                       f"dead {sorted(gone)}: combine differs from the plain combine without their experts")
                mask_is(gone, "after combine")
            gone |= set(dead_clean)
            if ME not in gone:
                t0 = time.monotonic()
                buf.clean_low_latency_buffer(m, hidden, num_experts)
                waited = time.monotonic() - t0
                mask_is(gone, "after clean_low_latency_buffer")
                expect(bool(dead_clean) or waited < timeout_s / 2,
                       f"clean_low_latency_buffer waited {waited:.2f} s for masked ranks")
            require(not problems, "; ".join(problems))

        round_trip()
        mask_is((), "full round trip")
        round_trip(**dead_at)
        buf.low_latency_clean_mask_buffer()
        mask_is((), "after low_latency_clean_mask_buffer")
        round_trip()
        mask_is((), "round trip after the rejoin")


def shrink_cases():
    """Who stops where: one rank at each call, and (3+ ranks) two at once."""
    cases = [dict(dead_d=(R - 1,)), dict(dead_c=(R - 1,)), dict(dead_clean=(R - 1,))]
    if R >= 3:
        cases.append(dict(dead_d=(R - 1,), dead_c=(R - 2,)))
    return cases


def case_shrink_misuse(hidden=256):
    hint = reference.Buffer.get_low_latency_rdma_size_hint(16, hidden, R, 2 * R)
    expect_error(ValueError, "enable_shrink", lambda: reference.Buffer(comm, num_rdma_bytes=hint, enable_shrink=True))
    with reference.Buffer(comm, num_rdma_bytes=hint, low_latency_mode=True) as plain:
        expect_error(ValueError, "enable_shrink", lambda: plain.low_latency_query_mask_buffer(np.zeros(R, np.int32)))
    with reference.Buffer(comm, num_rdma_bytes=hint, low_latency_mode=True, enable_shrink=True) as buf:
        expect_error(TypeError, "mask_status", lambda: buf.low_latency_query_mask_buffer(np.zeros(R, np.int64)))
        expect_error(ValueError, "rank_to_mask", lambda: buf.low_latency_update_mask_buffer(R))
        expect_error(ValueError, "rank_to_mask", lambda: buf.low_latency_update_mask_buffer(ME, True))
        if R > 1:   # masked by hand on every rank: the call runs among the others
            other = (ME + 1) % R if ME != R - 1 else 0
            buf.low_latency_update_mask_buffer(R - 1 if ME != R - 1 else other, True)
            status = np.zeros(R, np.int32)
            buf.low_latency_query_mask_buffer(status)
            require(status.sum() == 1, f"update_mask_buffer: mask {status.tolist()}")
            buf.low_latency_update_mask_buffer(R - 1 if ME != R - 1 else other, False)
            buf.low_latency_query_mask_buffer(status)
            require(status.sum() == 0, f"update_mask_buffer(mask=False): mask {status.tolist()}")


def main():
    case_shrink_misuse()
    if R > 1:
        case_wait_stats()
        for dead_at in shrink_cases():
            case_shrink(dead_at)
    seed = 0
    for kind in ("const", "randn", "perf"):
        for use_fp8 in (False, True):
            seed += 1
            case_logfmt(seed, kind, use_fp8, hook=seed % 2 == 0)
    if ME == 0:
        print(f"OK ll_parity ranks={R}", flush=True)


if __name__ == "__main__":
    run_or_abort(main)
