"""Buffers of the normal-mode GPU tests (shared by the test modules and conftest's fixture)."""

MAX_TOKENS = 512
MAX_HIDDEN = 7168
MAX_TOPK = 9


def buffer_sizes(num_ranks, nvl_peers, num_tokens=MAX_TOKENS, hidden=MAX_HIDDEN, num_topk=MAX_TOPK):
    """Constructor sizes for ``num_tokens`` tokens per rank (the hints), and the domain size."""
    import cupy_ep

    peers = num_ranks if nvl_peers is None else nvl_peers
    nvl = cupy_ep.Buffer.get_nvl_buffer_size_hint(num_tokens, hidden, num_ranks, num_topk, num_nvl_peers=peers)
    rdma = cupy_ep.Buffer.get_rdma_buffer_size_hint(num_tokens, hidden, num_ranks, peers, num_topk)
    return dict(num_nvl_bytes=nvl, num_rdma_bytes=rdma, num_nvl_peers=nvl_peers)


def make_buffers(comm, nvl_peers, **kw):
    """A GPU Buffer and a reference Buffer of the same sizes and topology (``chaos`` goes to the GPU)."""
    import cupy_ep
    from cupy_ep import reference

    sizes = dict(buffer_sizes(comm.Get_size(), nvl_peers), **kw)
    gpu = cupy_ep.Buffer(comm, **sizes, timeout_s=20.0)
    ref = reference.Buffer(comm, **{k: v for k, v in sizes.items() if k != "chaos"})
    return gpu, ref


def num_experts_for(comm, per_rank=8, min_experts=16):
    r = comm.Get_size()
    return max(per_rank * r, -(-min_experts // r) * r)
