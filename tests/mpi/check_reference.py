"""Multi-rank check of cupy_ep.reference against a brute-force oracle. Run under mpiexec:

    mpiexec -n 4 python tests/mpi/check_reference.py [--quick | --scale]

``--quick`` runs a subset of the cases; ``--scale`` a small subset meant for many ranks
(e.g. 64 on a 2-core machine: layouts, one normal round trip across NVLink domains of 8,
low-latency round trips, routing errors on one rank, a destroyed Buffer).

Every rank draws its own random inputs from a seed shared over the communicator (fresh
each run; set CUPY_EP_TEST_SEED to repeat one), the inputs are allgathered, and an
independent computation written here with plain Python loops over ranks, tokens and
experts gives the expected outputs of every call. On success rank 0 prints a line
starting with "OK"; any failure prints the seed and a traceback and aborts all ranks.
"""

import math
import os
import sys

import ml_dtypes
import numpy as np
from mpi4py import MPI

from cupy_ep import limits, reference
from cupy_ep.errors import CupyEpError, TokenOverflowError
from cupy_ep.testing import run_or_abort

BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn

comm = MPI.COMM_WORLD
R = comm.Get_size()
ME = comm.Get_rank()
SCALE = "--scale" in sys.argv
QUICK = "--quick" in sys.argv or SCALE

_seed = None
if ME == 0:
    env = os.environ.get("CUPY_EP_TEST_SEED")
    _seed = int(env) if env else int(np.random.SeedSequence().entropy % (2 ** 62))
SEED = comm.bcast(_seed, root=0)
NUM_CHECKS = 0


class CheckFailed(AssertionError):
    pass


def check(cond, what):
    global NUM_CHECKS
    NUM_CHECKS += 1
    if not cond:
        raise CheckFailed(what)


def run_hook(hook, hook_mode, what):
    """Calls the receive hook a low-latency call returned under return_recv_hook; without it, none."""
    if hook_mode:
        check(callable(hook), f"{what} hook must be callable")
        hook()
    else:
        check(hook is None, f"{what} hook must be None without return_recv_hook")


def shared_rng(case):
    """The same stream on every rank."""
    return np.random.default_rng([SEED, case])


def own_rng(case):
    """This rank's own stream."""
    return np.random.default_rng([SEED, case, 1000 + ME])


def allgather(obj):
    return comm.allgather(obj)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize and np.array_equal(bits(a), bits(b))


def random_bf16(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(BF16)


def check_close(got, exp64, mag64, what):
    """bf16 result vs float64 expectation: bf16 rounding + float32 accumulation; NaN fails."""
    g = np.asarray(got).astype(np.float64)
    check(g.shape == exp64.shape, f"{what}: shape {g.shape} != {exp64.shape}")
    check(bool(np.isfinite(g).all()), f"{what}: non-finite values")
    tol = 2.0 ** -8 * np.abs(exp64) + 2.0 ** -18 * mag64 + 1e-35
    err = np.abs(g - exp64)
    ok = err <= tol
    if not ok.all():
        i = np.argwhere(~ok)[0]
        raise CheckFailed(f"{what}: mismatch at {tuple(i)}: got {g[tuple(i)]}, expected {exp64[tuple(i)]}")
    check(True, what)


# --------------------------------------------------------------------------- buffers
MAX_TOKENS, MAX_HIDDEN, MAX_TOPK = 16, 256, 9


def default_nvl_peers():
    """None (the host: all ranks) up to MAX_NVL_PEERS ranks, else the largest divisor of R that
    fits an NVLink domain (what a GPU cluster of that size has)."""
    if R <= limits.MAX_NVL_PEERS:
        return None
    return max(p for p in range(1, limits.MAX_NVL_PEERS + 1) if R % p == 0)


def normal_buffer(nvl_peers=None, num_tokens=MAX_TOKENS, hidden=MAX_HIDDEN, num_topk=MAX_TOPK):
    """A normal-mode Buffer sized with the size hints for these shapes (and for nvl_peers)."""
    peers = R if nvl_peers is None else nvl_peers
    nvl = reference.Buffer.get_nvl_buffer_size_hint(num_tokens, hidden, R, num_topk, num_nvl_peers=peers)
    rdma = reference.Buffer.get_rdma_buffer_size_hint(num_tokens, hidden, R, peers, num_topk)
    return reference.Buffer(comm, num_nvl_bytes=nvl, num_rdma_bytes=rdma, num_nvl_peers=nvl_peers)


# --------------------------------------------------------------------------- input generation
def make_topk(rng, n, k, num_experts, e_local, p_neg=0.2, p_empty_row=0.15, dup=False, skew_rank=None):
    """Routing with -1 slots, all -1 rows, optional duplicates and a skew to one rank."""
    ti = np.full((n, k), -1, dtype=np.int64)
    for t in range(n):
        if rng.random() < p_empty_row:
            continue
        used = set()
        for kk in range(k):
            if rng.random() < p_neg:
                continue
            for _ in range(50):
                if skew_rank is not None and rng.random() < 0.85:
                    e = skew_rank * e_local + int(rng.integers(0, e_local))
                else:
                    e = int(rng.integers(0, num_experts))
                if dup or e not in used:
                    break
            else:
                continue
            if not dup and e in used:
                continue
            used.add(e)
            ti[t, kk] = e
    return ti


def make_case(case, n_max=8, k_range=(1, 9), e_local_range=(1, 3), hidden_choices=(128, 256),
              zero_ranks=(), skew=False, dup=False, fp8=False, fp8_uint8=None, idx32=False):
    """Global parameters from the shared stream, this rank's inputs from its own stream."""
    srng = shared_rng(case)
    k = int(srng.integers(k_range[0], k_range[1] + 1))
    e_local = int(srng.integers(e_local_range[0], e_local_range[1] + 1))
    num_experts = e_local * R
    hidden = int(srng.choice(hidden_choices))
    skew_rank = int(srng.integers(0, R)) if skew else None
    rng = own_rng(case)
    n = 0 if ME in zero_ranks else int(rng.integers(0, n_max + 1))
    ti = make_topk(rng, n, k, num_experts, e_local, dup=dup, skew_rank=skew_rank)
    if idx32:
        ti = ti.astype(np.int32)
    tw = rng.random((n, k)).astype(np.float32) + np.float32(0.25)
    if fp8:
        raw = rng.integers(0, 256, size=(n, hidden), dtype=np.uint8)
        use_u8 = fp8_uint8 if fp8_uint8 is not None else bool(ME % 2)
        data = raw if use_u8 else raw.view(E4M3)
        scales = (rng.random((n, hidden // 128)) + 0.5).astype(np.float32)
        x = (data, scales)
    else:
        x = random_bf16(rng, (n, hidden))
    return dict(k=k, e_local=e_local, num_experts=num_experts, hidden=hidden, n=n, x=x, topk_idx=ti,
                topk_weights=tw, fp8=fp8)


# --------------------------------------------------------------------------- brute-force oracle
def oracle_layout(ti, num_experts, nvl):
    e_local = num_experts // R
    n = ti.shape[0]
    per_rank = [0] * R
    per_expert = [0] * num_experts
    in_rank = np.zeros((n, R), dtype=bool)
    for t in range(n):
        for kk in range(ti.shape[1]):
            e = int(ti[t, kk])
            if e >= 0:
                per_expert[e] += 1
                in_rank[t, e // e_local] = True
        for r in range(R):
            if in_rank[t, r]:
                per_rank[r] += 1
    per_domain = None
    if R // nvl > 1:
        per_domain = [0] * (R // nvl)
        for t in range(n):
            for d in range(R // nvl):
                if any(in_rank[t, r] for r in range(d * nvl, (d + 1) * nvl)):
                    per_domain[d] += 1
    return per_rank, per_domain, per_expert, in_rank


def oracle_recv_rows(all_ti, e_local, dst):
    """(source rank, source token) pairs that rank dst receives, in order."""
    rows = []
    for s in range(R):
        for t in range(all_ti[s].shape[0]):
            if any(int(e) >= 0 and int(e) // e_local == dst for e in all_ti[s][t]):
                rows.append((s, t))
    return rows


def oracle_ll_rows(all_ti, e_local, dst, j):
    """(source rank, source token) pairs that local expert j of rank dst receives (one per pair)."""
    e = dst * e_local + j
    return [(s, t) for s in range(R) for t in range(all_ti[s].shape[0])
            if e in [int(v) for v in all_ti[s][t]]]


def oracle_fp8_row(row_f32, round_scale, use_ue8m0):
    """Per-128 block cast of one row, written out independently (math.frexp for the power of two)."""
    h = row_f32.shape[0]
    q = np.zeros(h, dtype=E4M3)
    scales, ue = [], []
    for b in range(h // 128):
        blk = row_f32[b * 128:(b + 1) * 128].astype(np.float32)
        amax = np.float32(max(float(np.max(np.abs(blk))), float(np.float32(1e-4))))
        scale = np.float32(amax / np.float32(448.0))
        if round_scale or use_ue8m0:
            m, ex = math.frexp(float(scale))      # scale = m * 2**ex, 0.5 <= m < 1
            p = ex - 1 if m == 0.5 else ex        # ceil(log2(scale))
            scale = np.float32(2.0 ** p)
            ue.append(p + 127)
        scales.append(scale)
        q[b * 128:(b + 1) * 128] = (blk / scale).astype(np.float32).astype(E4M3)   # elementwise IEEE division
    if use_ue8m0:
        return q, np.array(ue, dtype=np.uint8)
    return q, np.array(scales, dtype=np.float32)


# --------------------------------------------------------------------------- cases
def case_layout(case, buf, nvl):
    c = make_case(case, n_max=10, dup=(case % 2 == 0))
    ntpr, ntprr, ntpe, itr, ev = buf.get_dispatch_layout(c["topk_idx"], c["num_experts"])
    per_rank, per_domain, per_expert, in_rank = oracle_layout(c["topk_idx"], c["num_experts"], nvl)
    check(ntpr.dtype == np.int32 and ntpr.tolist() == per_rank, f"num_tokens_per_rank {ntpr} != {per_rank}")
    check(ntpe.dtype == np.int32 and ntpe.tolist() == per_expert, "num_tokens_per_expert")
    check(itr.dtype == np.bool_ and np.array_equal(itr, in_rank), "is_token_in_rank")
    if per_domain is None:
        check(ntprr is None, "num_tokens_per_rdma_rank should be None with one NVLink domain")
    else:
        check(ntprr is not None and ntprr.dtype == np.int32 and ntprr.tolist() == per_domain,
              f"num_tokens_per_rdma_rank {ntprr} != {per_domain}")
    check(hasattr(ev, "current_stream_wait"), "event placeholder")


def case_dispatch_combine(case, buf, label, **kw):
    """Normal-mode dispatch + combine (+ cached dispatch) against the oracle."""
    expert_alignment = kw.pop("expert_alignment", 1)
    worst = kw.pop("worst", False)
    with_weights = kw.pop("with_weights", True)
    bias_kind = kw.pop("bias_kind", "pair")
    c = make_case(case, **kw)
    k, e_local, num_experts, hidden = c["k"], c["e_local"], c["num_experts"], c["hidden"]
    x, ti, tw = c["x"], c["topk_idx"], c["topk_weights"]
    everyone = allgather((x, ti, tw))
    all_x = [a for a, _, _ in everyone]
    all_ti = [b for _, b, _ in everyone]
    all_tw = [w for _, _, w in everyone]
    mine = oracle_recv_rows(all_ti, e_local, ME)
    all_counts = allgather(len(mine))
    nrecv = len(mine)
    num_worst = 0
    if worst:
        num_worst = max(all_counts) + int(shared_rng(case + 77).integers(0, 4))
        num_worst = max(num_worst, 1)
    rows = num_worst if worst else nrecv

    ntpr, _, ntpe, itr, _ = buf.get_dispatch_layout(ti, num_experts)
    recv_x, recv_ti, recv_tw, counts, handle, ev = buf.dispatch(
        x, num_tokens_per_rank=ntpr, is_token_in_rank=itr, num_tokens_per_expert=ntpe,
        topk_idx=ti if with_weights else None, topk_weights=tw if with_weights else None,
        expert_alignment=expert_alignment, num_worst_tokens=num_worst)
    tag = f"[{label}]"

    # recv_x
    if c["fp8"]:
        data, scales = recv_x
        check(data.shape == (rows, hidden) and data.dtype == x[0].dtype, f"{tag} fp8 recv data shape/dtype")
        check(scales.shape == (rows, hidden // 128) and scales.dtype == np.float32, f"{tag} fp8 recv scales")
        for i, (s, t) in enumerate(mine):
            check(same_bits(data[i], all_x[s][0][t]), f"{tag} recv fp8 row {i} from ({s},{t})")
            check(same_bits(scales[i], all_x[s][1][t]), f"{tag} recv scales row {i}")
        for i in range(nrecv, rows):
            check(not bits(data[i]).any() and not scales[i].any(), f"{tag} padding row {i} not zero")
    else:
        check(recv_x.shape == (rows, hidden) and recv_x.dtype == BF16, f"{tag} recv_x shape/dtype")
        for i, (s, t) in enumerate(mine):
            check(same_bits(recv_x[i], all_x[s][t]), f"{tag} recv_x row {i} from ({s},{t})")
        for i in range(nrecv, rows):
            check(not bits(recv_x[i]).any(), f"{tag} padding row {i} not zero")
    # recv_topk_idx / weights (absent without topk_idx)
    if not with_weights:
        check(recv_ti is None and recv_tw is None, f"{tag} recv_topk_idx/weights should be None without topk_idx")
    else:
        check(recv_ti.shape == (rows, k) and recv_ti.dtype == np.int64, f"{tag} recv_topk_idx shape/dtype")
    for i in range(rows if with_weights else 0):
        for kk in range(k):
            if i < nrecv:
                s, t = mine[i]
                e = int(all_ti[s][t, kk])
                keep = e >= 0 and e // e_local == ME
                want_i = e - ME * e_local if keep else -1
                want_w = float(all_tw[s][t, kk]) if keep else 0.0
            else:
                want_i, want_w = -1, 0.0
            check(int(recv_ti[i, kk]) == want_i, f"{tag} recv_topk_idx[{i},{kk}]={recv_ti[i, kk]} want {want_i}")
            check(float(recv_tw[i, kk]) == want_w, f"{tag} recv_topk_weights[{i},{kk}]")
    if with_weights:
        check(recv_tw.dtype == np.float32 and recv_tw.shape == (rows, k), f"{tag} recv_topk_weights dtype")
    # counts per local expert
    if worst:
        check(counts == [], f"{tag} num_recv_tokens_per_expert_list should be [] in worst-token mode")
    else:
        want = []
        for j in range(e_local):
            cnt = 0
            for s in range(R):
                for t in range(all_ti[s].shape[0]):
                    for kk in range(k):
                        if int(all_ti[s][t, kk]) == ME * e_local + j:
                            cnt += 1
            want.append((cnt + expert_alignment - 1) // expert_alignment * expert_alignment)
        check(counts == want and all(isinstance(v, int) for v in counts), f"{tag} counts {counts} != {want}")

    # combine: every rank makes its own expert outputs y (padding rows are NaN: must be ignored)
    rng = own_rng(case + 500)
    y = random_bf16(rng, (rows, hidden))
    y[nrecv:] = np.float32(np.nan)
    yw = (rng.random((rows, k)).astype(np.float32) + np.float32(0.5))
    yw[nrecv:] = np.float32(np.nan)
    n = c["n"]
    b0, b1 = random_bf16(rng, (n, hidden)), random_bf16(rng, (n, hidden))
    bias = {"pair": (b0, b1), "one": b0, "none": None, "second": (None, b1)}[bias_kind]
    # each rank hands every source rank the rows it holds of that source's tokens
    back = comm.alltoall([{t: (y[i], yw[i]) for i, (s, t) in enumerate(mine) if s == dst} for dst in range(R)])
    out_x, out_w, ev = buf.combine(y, handle, topk_weights=yw if with_weights else None, bias=bias)
    exp = np.zeros((n, hidden), dtype=np.float64)
    mag = np.zeros((n, hidden), dtype=np.float64)
    expw = np.zeros((n, k), dtype=np.float64)
    for t in range(n):
        terms = []
        if bias_kind in ("pair", "one"):
            terms.append(b0[t].astype(np.float64))
        if bias_kind in ("pair", "second"):
            terms.append(b1[t].astype(np.float64))
        for r in range(R):
            if t in back[r]:
                terms.append(back[r][t][0].astype(np.float64))
                expw[t] += back[r][t][1].astype(np.float64)
        for term in terms:
            exp[t] += term
            mag[t] += np.abs(term)
    check(out_x.dtype == BF16 and out_x.shape == (n, hidden), f"{tag} combined_x dtype/shape")
    check_close(out_x, exp, mag, f"{tag} combined_x")
    if with_weights:
        check(out_w.dtype == np.float32, f"{tag} combined_topk_weights dtype")
        check_close(out_w, expw, np.abs(expw), f"{tag} combined_topk_weights")
    else:
        check(out_w is None, f"{tag} combined_topk_weights should be None")

    # cached dispatch: new x, same routing
    rng2 = own_rng(case + 900)
    if c["fp8"]:
        x2 = (rng2.integers(0, 256, size=(n, hidden), dtype=np.uint8).view(x[0].dtype),
              rng2.random((n, hidden // 128)).astype(np.float32))
    else:
        x2 = random_bf16(rng2, (n, hidden))
    all_x2 = allgather(x2)
    cx, cti, ctw, ccounts, chandle, _ = buf.dispatch(x2, handle=handle)
    check(cti is None and ctw is None and ccounts is None and chandle is None, f"{tag} cached returns Nones")
    cdata = cx[0] if c["fp8"] else cx
    check(cdata.shape == (rows, hidden), f"{tag} cached recv shape {cdata.shape}")
    for i, (s, t) in enumerate(mine):
        src = all_x2[s][0][t] if c["fp8"] else all_x2[s][t]
        check(same_bits(cdata[i], src), f"{tag} cached recv row {i}")
        if c["fp8"]:
            check(same_bits(cx[1][i], all_x2[s][1][t]), f"{tag} cached scales row {i}")


def case_worst_too_small(case, buf):
    """num_worst_tokens below what some rank receives: TokenOverflowError on every rank, naming
    the first such rank, its rows and its limit; the Buffer stays usable."""
    c = make_case(case, n_max=6, k_range=(1, 3))
    everyone = allgather(c["topk_idx"])
    received = allgather(len(oracle_recv_rows(everyone, c["e_local"], ME)))
    most = max(received)
    if most < 2:
        return
    worst = most - 1
    first = min(r for r in range(R) if received[r] > worst)
    ntpr, ntprr, ntpe, itr, _ = buf.get_dispatch_layout(c["topk_idx"], c["num_experts"])
    try:
        buf.dispatch(c["x"], num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntprr, is_token_in_rank=itr,
                     num_tokens_per_expert=ntpe, topk_idx=c["topk_idx"], topk_weights=c["topk_weights"],
                     num_worst_tokens=worst)
        raise CheckFailed("worst-token overflow: nothing raised")
    except TokenOverflowError as e:
        check(isinstance(e, ValueError), "TokenOverflowError is a ValueError")
        check((e.kernel, e.rank, e.arrived, e.allowed) == ("dispatch", first, received[first], worst),
              f"TokenOverflowError fields {(e.kernel, e.rank, e.arrived, e.allowed)}, want "
              f"{('dispatch', first, received[first], worst)}")
        check("num_worst_tokens" in str(e), f"message names num_worst_tokens: {e}")
    # enough rows everywhere: fine
    buf.dispatch(c["x"], num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntprr, is_token_in_rank=itr,
                 num_tokens_per_expert=ntpe, topk_idx=c["topk_idx"], topk_weights=c["topk_weights"],
                 num_worst_tokens=most)


def case_low_latency(case, label, use_fp8=False, round_scale=False, use_ue8m0=False, hook_mode=False,
                     with_stats=False, use_out=False, zero_copy=False, dup=True, idx32=False, zero_ranks=(),
                     skew=False):
    srng = shared_rng(case)
    c = make_case(case, n_max=6, k_range=(1, 9), e_local_range=(1, 3), hidden_choices=(128, 256),
                  dup=dup, idx32=idx32, zero_ranks=zero_ranks, skew=skew)
    k, e_local, num_experts, hidden = c["k"], c["e_local"], c["num_experts"], c["hidden"]
    x, ti, tw = c["x"], c["topk_idx"], c["topk_weights"]
    everyone = allgather((x, ti, tw))
    all_x = [a for a, _, _ in everyone]
    all_ti = [b for _, b, _ in everyone]
    m = max(a.shape[0] for a in all_x) + int(srng.integers(0, 3))
    m = max(m, 1)
    hint = reference.Buffer.get_low_latency_rdma_size_hint(m, hidden, R, num_experts)
    tag = f"[{label}]"
    with reference.Buffer(comm, num_rdma_bytes=hint, low_latency_mode=True) as buf:
        stats0 = own_rng(case + 3).integers(0, 100, size=e_local).astype(np.int32)
        stats = stats0.copy() if with_stats else None
        recv_x, recv_count, handle, ev, hook = buf.low_latency_dispatch(
            x, ti, m, num_experts, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
            return_recv_hook=hook_mode, cumulative_local_expert_recv_stats=stats)
        run_hook(hook, hook_mode, f"{tag} dispatch")
        check(isinstance(handle, tuple) and len(handle) >= 5, f"{tag} handle is a tuple of >= 5")
        src_info, layout_range, hm, hh, he = handle[:5]
        check((hm, hh, he) == (m, hidden, num_experts), f"{tag} handle scalars")
        check(src_info.dtype == np.int32 and src_info.shape == (e_local, R * m), f"{tag} src_info shape/dtype")
        check(layout_range.dtype == np.int64 and layout_range.shape == (e_local, R), f"{tag} layout_range")
        check(recv_count.dtype == np.int32 and recv_count.shape == (e_local,), f"{tag} recv_count shape/dtype")
        if use_fp8:
            data, scales = recv_x
            check(data.shape == (e_local, R * m, hidden), f"{tag} fp8 data shape")
            check(scales.shape == (e_local, R * m, hidden // 128), f"{tag} scales shape")
            check(scales.dtype == (np.uint8 if use_ue8m0 else np.float32), f"{tag} scales dtype {scales.dtype}")
        else:
            check(recv_x.shape == (e_local, R * m, hidden) and recv_x.dtype == BF16, f"{tag} recv_x shape/dtype")
        expected_rows = []
        for j in range(e_local):
            rows = oracle_ll_rows(all_ti, e_local, ME, j)
            expected_rows.append(rows)
            check(int(recv_count[j]) == len(rows), f"{tag} recv_count[{j}]={recv_count[j]} want {len(rows)}")
            begin = 0
            for s in range(R):
                cnt = sum(1 for (ss, _) in rows if ss == s)
                lr = int(layout_range[j, s])
                check((lr >> 32) == begin and (lr & 0xFFFFFFFF) == cnt,
                      f"{tag} layout_range[{j},{s}] = ({lr >> 32},{lr & 0xFFFFFFFF}) want ({begin},{cnt})")
                begin += cnt
            for i, (s, t) in enumerate(rows):
                check(int(src_info[j, i]) == t, f"{tag} src_info[{j},{i}]={src_info[j, i]} want {t}")
                if use_fp8:
                    q, sc = oracle_fp8_row(all_x[s][t].astype(np.float32), round_scale, use_ue8m0)
                    check(same_bits(data[j, i], q), f"{tag} fp8 data expert {j} row {i} from ({s},{t})")
                    check(same_bits(scales[j, i], sc), f"{tag} fp8 scales expert {j} row {i}: "
                                                        f"{scales[j, i]} want {sc}")
                else:
                    check(same_bits(recv_x[j, i], all_x[s][t]), f"{tag} recv_x expert {j} row {i}")
            for i in range(len(rows), R * m):
                check(int(src_info[j, i]) == -1, f"{tag} src_info[{j},{i}] should be -1")
        if with_stats:
            check(np.array_equal(stats, stats0 + recv_count), f"{tag} cumulative stats {stats} vs {stats0}+{recv_count}")

        # low-latency combine: expert outputs y (invalid rows NaN: must not be read)
        rng = own_rng(case + 700)
        y = random_bf16(rng, (e_local, R * m, hidden))
        for j in range(e_local):
            y[j, int(recv_count[j]):] = np.float32(np.nan)
        # each rank hands every source rank its experts' rows of that source's tokens
        send = [dict() for _ in range(R)]
        for j in range(e_local):
            for i, (s, t) in enumerate(expected_rows[j]):
                send[s][(j, t)] = y[j, i]
        back = comm.alltoall(send)
        n = c["n"]
        out = np.full((n, hidden), np.nan, dtype=BF16) if use_out else None
        if zero_copy:
            zbuf = buf.get_next_low_latency_combine_buffer(handle)
            check(zbuf.shape == y.shape and zbuf.dtype == BF16, f"{tag} combine buffer shape/dtype")
            zbuf[...] = y
            x_in = np.zeros_like(y)
        else:
            x_in = y
        got, ev, chook = buf.low_latency_combine(x_in, ti, tw, handle, zero_copy=zero_copy,
                                                 return_recv_hook=hook_mode, out=out)
        run_hook(chook, hook_mode, f"{tag} combine")
        if use_out:
            check(got is out, f"{tag} out= must be returned")
        exp = np.zeros((n, hidden), dtype=np.float64)
        mag = np.zeros((n, hidden), dtype=np.float64)
        for t in range(n):
            for kk in range(k):
                e = int(ti[t, kk])
                if e < 0:
                    continue
                r, j = e // e_local, e % e_local
                term = float(tw[t, kk]) * back[r][(j, t)].astype(np.float64)
                exp[t] += term
                mag[t] += np.abs(term)
        check_close(got, exp, mag, f"{tag} low_latency_combine")
        buf.clean_low_latency_buffer(m, hidden, num_experts)


# --------------------------------------------------------------------------- bad input
def expect_raise(exc_type, prefix, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        check(str(e).startswith(prefix), f"message {str(e)!r} should start with {prefix!r}")
        return
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"expected {exc_type.__name__} starting {prefix!r}, got {type(e).__name__}: {e}")
    raise CheckFailed(f"expected {exc_type.__name__} starting {prefix!r}, nothing raised")


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


def case_nvl_domains(case):
    """num_nvl_peers splits the ranks into NVLink domains: num_tokens_per_rdma_rank appears."""
    for nvl in sorted({1, 2, R}):
        if R % nvl or nvl > limits.MAX_NVL_PEERS:
            continue
        with normal_buffer(nvl) as b:
            check(b.num_rdma_ranks == R // nvl, "num_rdma_ranks")
            case_layout(case + nvl, b, nvl)
            if nvl < R and not SCALE:
                case_dispatch_combine(case + 50 + nvl, b, f"domains of {nvl}", worst=bool(nvl % 2))


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


# --------------------------------------------------------------------------- main
def main():
    case = 0

    def nxt():
        nonlocal case
        case += 1
        return case * 10

    buf = normal_buffer(default_nvl_peers())
    for _ in range(1 if SCALE else 2 if QUICK else 4):
        case_layout(nxt(), buf, buf.num_nvl_ranks)
    case_nvl_domains(nxt())
    plans = [
        ("random bf16", dict()),
        ("random bf16 int32 idx", dict(idx32=True)),
        ("uneven + zero ranks", dict(n_max=10, zero_ranks=(R - 1,))),
        ("all ranks zero", dict(zero_ranks=tuple(range(R)))),
        ("skewed", dict(skew=True, n_max=10)),
        ("duplicates", dict(dup=True)),
        ("fp8", dict(fp8=True)),
        ("fp8 uint8", dict(fp8=True, fp8_uint8=True)),
        ("alignment", dict(expert_alignment=4)),
        ("alignment 3 fp8", dict(expert_alignment=3, fp8=True)),
        ("worst tokens", dict(worst=True)),
        ("worst tokens fp8 skew", dict(worst=True, fp8=True, skew=True)),
        ("no topk_idx/weights, one bias", dict(with_weights=False, bias_kind="one")),
        ("no topk_idx, worst tokens, fp8", dict(with_weights=False, worst=True, fp8=True)),
        ("no bias", dict(bias_kind="none")),
        ("second bias only", dict(bias_kind="second")),
        ("top-1", dict(k_range=(1, 1))),
        ("top-9", dict(k_range=(9, 9), e_local_range=(3, 5))),
    ]
    if SCALE:
        plans = plans[:1] + plans[10:11]
    elif QUICK:
        plans = plans[:1] + plans[2:3] + plans[6:7] + plans[10:11]
    for label, kw in plans:
        case_dispatch_combine(nxt(), buf, label, **kw)
    case_worst_too_small(nxt(), buf)
    ll_plans = [
        ("ll bf16", dict()),
        ("ll bf16 int32 idx, zero rank", dict(idx32=True, zero_ranks=(0,))),
        ("ll fp8", dict(use_fp8=True)),
        ("ll fp8 round_scale", dict(use_fp8=True, round_scale=True)),
        ("ll fp8 ue8m0", dict(use_fp8=True, round_scale=True, use_ue8m0=True)),
        ("ll hook + stats", dict(hook_mode=True, with_stats=True)),
        ("ll stats + out", dict(with_stats=True, use_out=True, skew=True)),
        ("ll zero_copy + hook fp8", dict(zero_copy=True, hook_mode=True, use_fp8=True, use_out=True)),
        ("ll no duplicates", dict(dup=False)),
    ]
    if QUICK:
        ll_plans = ll_plans[:1] + ll_plans[4:6]
    if R > limits.LL_MAX_RANKS:   # the low-latency mode refuses more ranks (as the GPU does)
        ll_plans = []
    for label, kw in ll_plans:
        case_low_latency(nxt(), label, **kw)
    case_bad_input(nxt(), buf)
    case_destroy()
    buf.destroy()
    total = comm.allreduce(NUM_CHECKS)
    if ME == 0:
        print(f"OK reference ranks={R} seed={SEED} checks={total}", flush=True)


if __name__ == "__main__":
    run_or_abort(main, note=f" (seed {SEED}, rerun with CUPY_EP_TEST_SEED={SEED})")
