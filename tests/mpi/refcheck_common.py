"""What the multi-rank checks of cupy_ep.reference share (tests/mpi/check_reference.py runs
them; refcheck_normal.py, refcheck_low_latency.py and refcheck_bad_input.py hold the cases of
each mode): the communicator, the seed shared over it, the counted check, the Buffers sized by
the size hints, the random inputs, and the brute-force oracle written with plain Python loops
over ranks, tokens and experts.
"""

import math
import os
import sys

import ml_dtypes
import numpy as np
from mpi4py import MPI

from cupy_ep import limits, reference

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


def expect_raise(exc_type, prefix, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        check(str(e).startswith(prefix), f"message {str(e)!r} should start with {prefix!r}")
        return
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"expected {exc_type.__name__} starting {prefix!r}, got {type(e).__name__}: {e}")
    raise CheckFailed(f"expected {exc_type.__name__} starting {prefix!r}, nothing raised")
