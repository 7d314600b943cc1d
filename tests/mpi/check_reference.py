"""Multi-rank check of cupy_ep.reference against a brute-force oracle. Run under mpiexec:

    mpiexec -n 4 python tests/mpi/check_reference.py [--quick | --scale]

``--quick`` runs a subset of the cases; ``--scale`` a small subset meant for many ranks
(e.g. 64 on a 2-core machine: layouts, one normal round trip across NVLink domains of 8,
low-latency round trips, routing errors on one rank, a destroyed Buffer).

Every rank draws its own random inputs from a seed shared over the communicator (fresh
each run; set CUPY_EP_TEST_SEED to repeat one), the inputs are allgathered, and an
independent computation (refcheck_common.py) with plain Python loops over ranks, tokens and
experts gives the expected outputs of every call. On success rank 0 prints a line
starting with "OK"; any failure prints the seed and a traceback and aborts all ranks.
"""

import refcheck_common as common
from cupy_ep import limits
from cupy_ep.testing import run_or_abort
from refcheck_bad_input import case_bad_input, case_destroy
from refcheck_common import ME, QUICK, R, SCALE, SEED, comm, default_nvl_peers, normal_buffer
from refcheck_low_latency import case_low_latency
from refcheck_normal import case_dispatch_combine, case_layout, case_nvl_domains, case_worst_too_small


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
    total = comm.allreduce(common.NUM_CHECKS)
    if ME == 0:
        print(f"OK reference ranks={R} seed={SEED} checks={total}", flush=True)


if __name__ == "__main__":
    run_or_abort(main, note=f" (seed {SEED}, rerun with CUPY_EP_TEST_SEED={SEED})")
