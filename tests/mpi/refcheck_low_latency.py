"""The low-latency cases of tests/mpi/check_reference.py: dispatch (bf16, FP8 and its scales,
hooks, statistics) and combine (out=, zero copy) against the oracle."""

import numpy as np

from cupy_ep import reference
from refcheck_common import (BF16, ME, R, allgather, check, check_close, comm, make_case, oracle_fp8_row,
                             oracle_ll_rows, own_rng, random_bf16, run_hook, same_bits, shared_rng)

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
