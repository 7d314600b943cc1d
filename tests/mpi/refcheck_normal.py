"""The normal mode's cases of tests/mpi/check_reference.py: get_dispatch_layout, dispatch and
combine (with cached dispatch) against the oracle, worst-token overflow, NVLink domains."""

import numpy as np

from cupy_ep import limits
from cupy_ep.errors import TokenOverflowError
from refcheck_common import (BF16, ME, R, SCALE, CheckFailed, allgather, bits, check, check_close, comm,
                             make_case, normal_buffer, oracle_layout, oracle_recv_rows, own_rng, random_bf16,
                             same_bits, shared_rng)

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
