"""DeepEP-parity features of the reference low-latency mode, on every rank of an MPI job:
LogFMT combine against the bf16 combine and an independent model of the partial sums;
receive-wait statistics (checked arguments, growth, a delayed rank as the largest entry).
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


def main():
    if R > 1:
        case_wait_stats()
    seed = 0
    for kind in ("const", "randn", "perf"):
        for use_fp8 in (False, True):
            seed += 1
            case_logfmt(seed, kind, use_fp8, hook=seed % 2 == 0)
    if ME == 0:
        print(f"OK ll_parity ranks={R}", flush=True)


if __name__ == "__main__":
    run_or_abort(main)
