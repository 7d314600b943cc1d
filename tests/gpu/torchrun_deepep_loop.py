"""A DeepEP-style MoE loop on cupy_ep.torch under torchrun (no MPI): the code a DeepEP user runs,
with ``import cupy_ep.torch as deep_ep`` as its only change.

    timeout 300 torchrun --standalone --nproc-per-node R tests/gpu/torchrun_deepep_loop.py [--backend gloo|nccl]

Ranks may share GPUs (rank ``local_rank % GPUs``). Each iteration: layout -> dispatch -> experts ->
combine in normal mode (bf16 and FP8 with DeepGEMM's column-major scales, then a cached dispatch
and an async one with ``previous_event``), low-latency mode (FP8 with a receive hook, bf16), and a
CUDA graph of normal mode with ``num_worst_tokens``. Every rank checks its own tokens against a
direct computation: expert e multiplies a row by ``c(e) = 2 ** (e % 3 - 1)``, so a token comes
back as ``x * sum_k w_k c(e_k)`` (up to bf16 roundings). Rank 0 prints
``SUMMARY torchrun_deepep_loop: <iterations> iterations passed on <R> ranks (<backend>)``.

With ``--backend nccl`` NCCL itself never runs (cupy_ep's collectives go over a gloo group of
the same ranks), so ranks may share a GPU there too.
"""
import argparse
import os

import torch
import torch.distributed as dist

import cupy_ep.torch as deep_ep

H, K, N, M = 1024, 4, 64, 64          # hidden, top-k, tokens per rank, low-latency tokens per rank


def per_token_cast_to_fp8(x):
    """DeepEP-style: e4m3fn per token and 128 channels, scales float32 [N, H/128]."""
    blocks = x.float().view(x.shape[0], -1, 128)
    amax = blocks.abs().amax(dim=2).clamp(min=1e-4)
    q = (blocks * (448.0 / amax.unsqueeze(2))).to(torch.float8_e4m3fn).view_as(x)
    return q, amax / 448.0


def cast_back(q, scales):
    return (q.float().view(*q.shape[:-1], -1, 128) * scales.unsqueeze(-1)).view(q.shape)


def routing(num_experts, gen):
    scores = torch.rand((N, num_experts), generator=gen, device="cuda")
    topk_idx = scores.topk(K, dim=1).indices
    topk_idx[torch.rand((N, K), generator=gen, device="cuda") < 0.1] = -1
    weights = torch.rand((N, K), generator=gen, device="cuda") + 0.1
    return topk_idx.to(torch.int64), weights.float()


def expert_factor(expert_ids):
    return torch.where(expert_ids >= 0, torch.exp2((expert_ids % 3 - 1).float()), torch.zeros_like(expert_ids).float())


def expected(x, topk_idx, weights):
    return x.float() * (weights * expert_factor(topk_idx)).sum(dim=1, keepdim=True)


def check_close(name, got, exp, rel=2.0 ** -6):
    bound = exp.abs() * rel + exp.abs().amax(dim=1, keepdim=True) * 2.0 ** -8 + 1e-4
    bad = ~((got.float() - exp).abs() <= bound)
    assert not bad.any(), f"{name}: {int(bad.sum())} of {bad.numel()} elements off (rank {dist.get_rank()})"


def normal_experts(recv_x, recv_topk_idx, recv_topk_weights, rank, num_local):
    """Each received row times sum_k w_k c(e_k) over this rank's experts (bf16 out, as experts return)."""
    local = recv_topk_idx >= 0      # recv_topk_idx is local (-1 elsewhere)
    ids = torch.where(local, recv_topk_idx + rank * num_local, -1)
    return (recv_x.float() * (recv_topk_weights * expert_factor(ids)).sum(dim=1, keepdim=True)).bfloat16()


def normal_mode(buffer, num_experts, gen, rank, num_local):
    x = torch.randn((N, H), generator=gen, device="cuda").bfloat16()
    topk_idx, topk_weights = routing(num_experts, gen)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx, num_experts)
    for use_fp8 in (False, True):
        if use_fp8:
            q, s = per_token_cast_to_fp8(x)
            dispatch_x, ref_x = (q, s.T.contiguous().T), cast_back(q, s)
        else:
            dispatch_x, ref_x = x, x
        recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, _ = buffer.dispatch(
            dispatch_x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
            topk_weights=topk_weights)
        rows = recv_x[0].shape[0] if use_fp8 else recv_x.shape[0]
        assert handle[0][-1, rank].item() == rows, "handle[0] (rank_prefix_matrix) does not end at the rows received"
        assert sum(num_recv_tokens_per_expert_list) == int((recv_topk_idx >= 0).sum())
        data = cast_back(*recv_x) if use_fp8 else recv_x
        y = normal_experts(data, recv_topk_idx, recv_topk_weights, rank, num_local)
        combined_x, _, _ = buffer.combine(y, handle)
        check_close(f"normal combine (fp8={use_fp8})", combined_x, expected(ref_x, topk_idx, topk_weights))

    # cached dispatch of new data, ordered after a side stream by previous_event, async
    x2 = torch.randn((N, H), generator=gen, device="cuda").bfloat16()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())   # x2 was made on the current stream
    with torch.cuda.stream(side):
        x2_late = x2 * 1.0
        ready = deep_ep.Buffer.capture()
    recv_x2, _, _, _, _, event = buffer.dispatch(x2_late, handle=handle, previous_event=ready, async_finish=True)
    event.current_stream_wait()
    y2 = normal_experts(recv_x2, recv_topk_idx, recv_topk_weights, rank, num_local)
    combined_x2, _, event = buffer.combine(y2, handle, async_finish=True)
    with event:
        pass
    check_close("cached dispatch + async combine", combined_x2, expected(x2, topk_idx, topk_weights))


def low_latency_mode(buffer, num_experts, gen, rank, num_local):
    x = torch.randn((N, H), generator=gen, device="cuda").bfloat16()
    topk_idx, topk_weights = routing(num_experts, gen)
    factors = expert_factor(torch.arange(num_local, device="cuda") + rank * num_local)
    for use_fp8 in (True, False):
        recv_x, recv_count, handle, _, hook = buffer.low_latency_dispatch(
            x, topk_idx, M, num_experts, use_fp8=use_fp8, return_recv_hook=use_fp8)
        if hook is not None:
            hook()
        data = cast_back(recv_x[0], recv_x[1]) if use_fp8 else recv_x.float()
        y = (data * factors[:, None, None]).bfloat16()
        combined_x, _, _ = buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
        # FP8 e4m3 keeps 3 mantissa bits: each term within 2^-4 of x, relative
        check_close(f"low-latency combine (fp8={use_fp8})", combined_x, expected(x, topk_idx, topk_weights),
                    rel=2.0 ** -3 if use_fp8 else 2.0 ** -6)


def graph_mode(buffer, num_experts, gen, rank, num_local, group_size):
    """Normal mode with num_worst_tokens in a CUDA graph, replayed on new data."""
    static_x = torch.randn((N, H), generator=gen, device="cuda").bfloat16()
    topk_idx, topk_weights = routing(num_experts, gen)
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)

    def step():
        recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
            static_x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
            topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=N * group_size)
        return buffer.combine(normal_experts(recv_x, recv_idx, recv_w, rank, num_local), handle)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(2):
        static_x.copy_(torch.randn((N, H), generator=gen, device="cuda").bfloat16())
        graph.replay()
        check_close("CUDA graph (num_worst_tokens)", out, expected(static_x, topk_idx, topk_weights))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(args.backend)
    group = dist.group.WORLD
    rank, group_size = dist.get_rank(), dist.get_world_size()
    num_experts = 8 * group_size
    num_local = num_experts // group_size
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1000 + rank)

    normal = deep_ep.Buffer(group, deep_ep.Buffer.get_nvl_buffer_size_hint(N * group_size, H, group_size, K),
                            explicitly_destroy=True)
    low_latency = deep_ep.Buffer(group, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(M, H, group_size,
                                                                                         num_experts),
                                 low_latency_mode=True, num_qps_per_rank=num_local, explicitly_destroy=True)
    for _ in range(args.iterations):
        normal_mode(normal, num_experts, gen, rank, num_local)
        low_latency_mode(low_latency, num_experts, gen, rank, num_local)
    graph_mode(normal, num_experts, gen, rank, num_local, group_size)
    torch.cuda.synchronize()
    normal.cupy_ep_buffer.check()
    low_latency.cupy_ep_buffer.check()
    normal.destroy()          # collective: every rank is done once it returns
    low_latency.destroy()
    if rank == 0:
        print(f"SUMMARY torchrun_deepep_loop: {args.iterations} iterations passed on {group_size} ranks ({args.backend})",
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
