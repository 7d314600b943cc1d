"""``get_dispatch_layout`` on the GPU (``kernels_cu/layout.cu``), for every topology.

The layout is local (no communication): counts per rank, per NVLink domain and per expert,
and which ranks each token goes to. Expert ids out of range are found by the kernel and
reported through the Buffer's status record (no host synchronisation); the next dispatch
cancels itself on every rank because of it (see :mod:`cupy_ep.intranode`).
"""
from __future__ import annotations

import cupy

from .engine import BOOL, I32, Engine, empty_together, ptr

LAYOUT_THREADS = 256
LAYOUT_MAX_BLOCKS = 32


class LayoutEngine(Engine):
    """Launches ``dispatch_layout`` for a Buffer's ranks.

    Args:
        comm: the Buffer's communicator (all ranks: R and the domain size come from it).
        num_nvl_ranks: ranks per NVLink domain.
        status, timeout_ns, chaos: see :class:`cupy_ep.engine.Engine`.
    """

    def __init__(self, comm, num_nvl_ranks: int, status, timeout_ns: int, chaos: bool = False):
        super().__init__(comm, status, timeout_ns, chaos)
        self.num_nvl_ranks = num_nvl_ranks
        self.num_rdma_ranks = self.num_ranks // num_nvl_ranks
        self._scratch = {}   # num_experts -> zeroed int32 [R + N + E + 1] (the last: block counter)

    def _kernel(self, num_experts: int, num_topk: int, idx_bytes: int):
        return self._memoised(("layout", num_experts, num_topk, idx_bytes), lambda: self._entry(self._module(
            "layout.cu", dict(NUM_RANKS=self.num_ranks, NUM_NVL_RANKS=self.num_nvl_ranks, NUM_EXPERTS=num_experts,
                              TOPK=num_topk, NUM_THREADS=LAYOUT_THREADS, IDX_BYTES=idx_bytes)), "dispatch_layout"))

    def run(self, topk_idx, num_experts: int, call):
        """Returns ``(per_rank int32 [R], per_rdma_rank int32 [N] or None, per_expert int32 [E],
        is_token_in_rank bool [T, R])``. ``call``: the :class:`cupy_ep.event.Call` (outputs
        allocated in ``call.alloc``, the kernel launched on ``call.stream``)."""
        num_tokens, num_topk = topk_idx.shape
        r, n = self.num_ranks, self.num_rdma_ranks
        stream = call.stream
        with call.alloc:   # one allocation for the outputs (one NVLink domain: no per-domain counts)
            per_rank, per_expert, in_rank, *per_rdma = empty_together(
                ((r,), I32), ((num_experts,), I32), ((num_tokens, r), BOOL), *([((n,), I32)] if n > 1 else []))
        scratch = self._scratch.get(num_experts)
        if scratch is None:   # zeroed on the kernel's stream: call.alloc may be another stream, not waited for
            with stream:
                scratch = self._scratch[num_experts] = cupy.zeros(r + n + num_experts + 1, dtype=cupy.int32)
        per_rdma = per_rdma[0] if per_rdma else None
        self._phase("outputs allocated", stream)
        blocks = max(1, min(-(-num_tokens // LAYOUT_THREADS), LAYOUT_MAX_BLOCKS))
        kernel = self._kernel(num_experts, num_topk, topk_idx.dtype.itemsize)
        self._launch_values(kernel, blocks, LAYOUT_THREADS,
                            (topk_idx.data.ptr, num_tokens, scratch.data.ptr, per_rank.data.ptr, ptr(per_rdma),
                             per_expert.data.ptr, in_rank.data.ptr, self.status_arg, self.rank), stream, "layout")
        self._phase("layout launched", stream)
        return per_rank, per_rdma, per_expert, in_rank
