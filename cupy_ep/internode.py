"""Normal-mode (high-throughput) dispatch and combine across NVLink domains.

:class:`InternodeEngine` owns the protocol (kernels in ``kernels_cu/internode.cu``, transport in
``kernels_cu/transport.cuh``): a token crosses between domains at most once per destination
domain, to the rank with the same local index there (its forwarder), which copies it over
NVLink to every rank of its domain that needs it; combine runs the same path backwards (sum
inside the domain first, then across domains).

A non-cached dispatch runs ``internode_notify`` (one block: barriers of the domain and of the
"column" of ranks with the same local index; counts per rank, domain and channel; the routing
checks; a vector of counts to every domain's forwarder over NVSHMEM, relayed over NVLink to the
ranks of the domain) and ``internode_dispatch`` (per channel a sending, a forwarding and a
receiving block), queued without waiting for the host; the host waits for notify's counts,
allocates the outputs at their exact size and publishes them to the receivers through a
host-mapped descriptor. With ``num_worst_tokens`` nothing waits for the host. A cached dispatch
and a combine run ``internode_barrier`` and then their kernel.

A rank whose non-cached dispatch is refused on the host (its arguments failed validation, or a
host step told it of a peer's refusal) launches ``internode_notify_cancelled`` instead: notify's
steps with zero rows and a cancel flag in the vectors it sends (its slots name the flagged rank),
so that the peers' notify cancels the call there and raises promptly
(:meth:`InternodeEngine.join_cancelled_dispatch`). A rank whose cached dispatch or combine is
refused launches ``internode_barrier_cancelled``: the barrier, after marking the call cancelled in
its domain peers' buffers; the barrier carries the mark to every domain, and the peers' kernel
then only reports (raised by ``check()``). Their module is shape-free
(:func:`cupy_ep.geometry.internode_cancel_constants`) and loaded when the engine is made: a
cancelled part never compiles (a compile agreement the peers would not join).

Every buffer holds whole streams (no rings): the symmetric buffer holds ``2 * N * T`` records
(received and staged, T tokens per rank), the NVLink buffer the rows a rank receives (and, at a
forwarder, the rows its domain sends back). Offsets and sizes: :mod:`cupy_ep.geometry`
(``rdma_control``, ``nvl_rows``, ``internode_rdma_size_hint``, ``internode_nvl_size_hint``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import geometry, limits
from .config import Config
from .engine import I32, array_arg, empty_together
from .errors import PeerRefusalError
from .normal import DispatchResult, NormalEngine, NormalHandle


@dataclass
class InternodeHandle(NormalHandle):
    """What combine and a cached dispatch need from an internode dispatch."""

    is_token_in_rank: object   # bool [T, R]
    send_chan: object          # int32 [R, C + 1]: per destination rank, prefix of this rank's rows over channels
    rdma_chan: object          # int32 [N, C + 1]: per destination domain, prefix of this rank's records
    send_rdma_pos: object      # int32 [T, N]: record position of each token in each domain's stream, or -1
    rank_prefix: object        # int32 [R + 1]: first row of each source rank in recv_x
    recv_chan: object          # int32 [R, C + 1]: per source rank, prefix of its rows for this rank over channels
    comb_base: object          # int32 [R]: combine row at the forwarder = comb_base[q] + recv row
    fwd_rchan: object          # int32 [N, C + 1]: as forwarder, per source domain, prefix of records over channels
    fwd_chan: object           # int32 [N, P, C + 1]: per (source domain, local rank), prefix of rows over channels
    fwd_comb: object           # int32 [N, P]: where the combine rows of (source domain, local rank) start here
    fwd_base: object           # int32 [N, P]: where rows of (source domain, this column) start at local rank m
    fwd_pos: object            # int32 [N, CAP, P]: per received record, its row in each target's stream, or -1
    call_status: object        # int32 [1]: 1 when notify cancelled the call


class InternodeEngine(NormalEngine):
    """Normal-mode dispatch/combine across NVLink domains.

    Args:
        comm: all ranks of the Buffer (one NVSHMEM world, PE = rank).
        topology: the Buffer's :class:`cupy_ep.bootstrap.Topology`.
        nvl: the domain's :class:`cupy_ep.memory.NVLinkBuffer`.
        sym: the :class:`cupy_ep.memory.SymmetricBuffer`.
        status, timeout_ns, chaos: see :class:`cupy_ep.engine.Engine`.
    """

    handle_type = InternodeHandle

    def __init__(self, comm, topology, nvl, sym, status, timeout_ns: int, chaos: bool = False):
        super().__init__(comm, status, timeout_ns, chaos)
        self.nvl, self.sym = nvl, sym
        self.num_nvl_ranks, self.num_rdma_ranks = topology.num_nvl_ranks, topology.num_rdma_ranks
        # collective over comm (the Buffer makes its engines on every rank, agreed)
        cancel = self._module("internode.cu", geometry.internode_cancel_constants(self.num_ranks, self.num_nvl_ranks),
                              nvshmem=True)
        self._notify_cancelled = self._entry(cancel, "internode_notify_cancelled")
        self._barrier_cancelled = self._entry(cancel, "internode_barrier_cancelled")

    # -- kernels ----------------------------------------------------------------------------
    def _kernels(self, hidden: int, num_topk: int, x_bytes: int, num_scales: int, num_experts: int,
                 channels: int, num_threads: int, chunk_tokens: int):
        """(notify, dispatch, combine, barrier) of this specialisation (one module)."""
        c = channels
        key = (hidden, num_topk, x_bytes, num_scales, num_experts, c, num_threads, chunk_tokens)
        fns = self._functions.get(key)
        if fns is None:
            consts = geometry.internode_constants(self.nvl.num_bytes, self.sym.num_bytes, self.num_ranks,
                                                  self.num_nvl_ranks, hidden, num_topk, x_bytes, num_scales,
                                                  num_experts, c, num_threads, chunk_tokens)
            module = self._module("internode.cu", consts, nvshmem=True)
            fns = self._functions[key] = tuple(self._entry(module, name) for name in (
                "internode_notify", "internode_dispatch", "internode_combine", "internode_barrier"))
        return fns

    def _common_args(self):
        return self.nvl.peer_table, np.uint64(self.sym.ptr), np.int32(self.rank)

    def _barrier(self, fn, kernel_name: str, stream) -> None:
        self._launch(fn, 1, 32, (*self._common_args(), self.status_arg, self.timeout_ns,
                                 np.int32(limits.KERNEL_IDS[kernel_name])), stream)
        self._phase("barrier launched", stream)

    def join_cancelled_dispatch(self, stream, refused: bool, cached: bool = False) -> None:
        """As :meth:`cupy_ep.normal.NormalEngine.join_cancelled_dispatch`: ``internode_notify_cancelled``,
        or for a cached dispatch ``internode_barrier_cancelled`` (their module was loaded with the engine)."""
        if cached:
            self._join_cancelled_barrier("internode_dispatch", stream, refused)
            return
        self._launch(self._notify_cancelled, 1, geometry.INTERNODE_CANCEL_THREADS,
                     (*self._common_args(), np.int32(refused), self.status_arg, self.timeout_ns), stream, "notify")

    def join_cancelled_combine(self, stream) -> None:
        """As :meth:`cupy_ep.normal.NormalEngine.join_cancelled_combine`: ``internode_barrier_cancelled``."""
        self._join_cancelled_barrier("internode_combine", stream, refused=True)

    def _join_cancelled_barrier(self, kernel_name: str, stream, refused: bool) -> None:
        self._launch(self._barrier_cancelled, 1, geometry.INTERNODE_CANCEL_THREADS,
                     (*self._common_args(), np.int32(refused), self.status_arg, self.timeout_ns,
                      np.int32(limits.KERNEL_IDS[kernel_name])), stream, "barrier")

    def _cached_kernels(self, stream, kernel_name: str, *shape):
        """The module of a cached dispatch or a combine (``_kernels``' arguments); when its compile
        agreement tells of a peer's refusal, this rank's part, cancelled, before the raise."""
        try:
            return self._kernels(*shape)
        except PeerRefusalError:
            self._join_cancelled_barrier(kernel_name, stream, refused=False)
            raise

    # -- dispatch ---------------------------------------------------------------------------
    def dispatch(self, data, scales, topk_idx, topk_weights, routing, handle, num_worst_tokens: int,
                 expert_alignment: int, config: Config, call) -> DispatchResult:
        """As :meth:`cupy_ep.intranode.IntranodeEngine.dispatch`."""
        num_tokens, hidden = (int(v) for v in data.shape)
        x_bytes = hidden * data.dtype.itemsize
        num_scales = 0 if scales is None else int(scales.shape[1])
        if handle is not None:
            _, dispatch, _, barrier = self._cached_kernels(call.stream, "internode_dispatch", hidden, handle.num_topk,
                                                           x_bytes, num_scales, handle.num_experts, handle.num_channels,
                                                           config.num_threads, config.chunk_tokens)
            self._barrier(barrier, "internode_dispatch", call.stream)
            outputs = self._alloc_outputs(data, scales, 0, handle.num_rows, call)
            self._launch_dispatch(dispatch, data, scales, None, None, handle, config,
                                  self._given_outputs(outputs, handle.num_rows, False), call.stream)
            self._phase("dispatch launched", call.stream)
            return DispatchResult(outputs[0], outputs[1], None, None, None, None)

        per_rank, in_rank = routing.num_tokens_per_rank, routing.is_token_in_rank
        per_expert = routing.num_tokens_per_expert
        num_experts, num_topk, per_rdma = routing.num_experts, routing.num_topk, routing.num_tokens_per_rdma_rank
        c = config.internode_channels
        try:
            notify, dispatch, _, _ = self._kernels(hidden, num_topk, x_bytes, num_scales, num_experts, c,
                                                   config.num_threads, config.chunk_tokens)
        except PeerRefusalError:   # told by the compile agreement: the refusing rank runs its cancelled part
            self.join_cancelled_dispatch(call.stream, refused=False)
            raise
        handle = self._new_handle(num_tokens, num_experts, hidden, num_topk, c, num_worst_tokens, in_rank, call)
        self._phase("handle allocated", call.stream)
        h = handle
        seq = self._next_seq()
        self._launch(notify, 1, config.num_threads,
                     (*self._common_args(), np.int32(num_tokens), per_rank, array_arg(per_rdma), per_expert, in_rank,
                      array_arg(topk_idx), np.int32(expert_alignment), np.int32(num_worst_tokens), h.send_chan,
                      h.rdma_chan, h.rank_prefix, h.recv_chan, h.comb_base, h.fwd_rchan, h.fwd_chan, h.fwd_comb,
                      h.fwd_base, h.call_status, self.host_out_arg, self.status_arg, self.timeout_ns,
                      np.int32(seq)), call.stream, "notify")
        self._phase("notify launched", call.stream)
        outputs, out_args = self._dispatch_outputs(seq, data, scales, num_topk, num_worst_tokens, call)
        self._launch_dispatch(dispatch, data, scales, topk_idx, topk_weights, handle, config, out_args, call.stream)
        self._phase("dispatch launched", call.stream)
        if outputs is not None:   # num_worst_tokens: nothing waits for the host
            return DispatchResult(*outputs, [], handle)
        return self._finish_dispatch(seq, data, scales, num_topk, num_experts // self.num_ranks, handle, call)

    def _new_handle(self, num_tokens, num_experts, hidden, num_topk, c, num_rows, in_rank, call) -> InternodeHandle:
        r, n, p = self.num_ranks, self.num_rdma_ranks, self.num_nvl_ranks
        cap = geometry.rdma_capacity(self.sym.num_bytes, hidden, r, p, num_topk)
        names_shapes = dict(send_chan=(r, c + 1), rdma_chan=(n, c + 1), send_rdma_pos=(num_tokens, n),
                            rank_prefix=(r + 1,), recv_chan=(r, c + 1), comb_base=(r,), fwd_rchan=(n, c + 1),
                            fwd_chan=(n, p, c + 1), fwd_comb=(n, p), fwd_base=(n, p), fwd_pos=(n, cap, p),
                            call_status=(1,))
        with call.alloc:   # one allocation for the handle's int32 arrays
            arrays = empty_together(*((shape, I32) for shape in names_shapes.values()))
        return InternodeHandle(num_tokens, num_experts, hidden, num_topk, c, num_rows, in_rank,
                               **dict(zip(names_shapes, arrays)))

    def _launch_dispatch(self, fn, data, scales, topk_idx, topk_weights, h: InternodeHandle, config: Config,
                         out_args, stream) -> None:
        self._launch(fn, 3 * h.num_channels, config.num_threads,
                     (*self._common_args(), np.int32(h.num_tokens), data, array_arg(scales), array_arg(topk_idx),
                      array_arg(topk_weights), h.is_token_in_rank, h.send_chan, h.rdma_chan, h.send_rdma_pos,
                      h.rank_prefix, h.recv_chan, h.fwd_rchan, h.fwd_base, h.fwd_pos, h.call_status, *out_args,
                      self.status_arg, self.timeout_ns), stream, "dispatch")

    # -- combine ----------------------------------------------------------------------------
    def combine(self, x, handle: InternodeHandle, topk_weights, biases, config: Config, call):
        """Returns ``(combined_x bf16 [N, H], combined_topk_weights float32 [N, K] or None)``."""
        h = handle
        _, _, combine, barrier = self._cached_kernels(call.stream, "internode_combine", h.hidden, h.num_topk,
                                                      2 * h.hidden, 0, h.num_experts, h.num_channels,
                                                      config.num_threads, config.chunk_tokens)
        self._barrier(barrier, "internode_combine", call.stream)
        combined_x, combined_w = self._combine_outputs(x, h, topk_weights, call)
        self._launch(combine, 3 * h.num_channels, config.num_threads,
                     (*self._common_args(), np.int32(h.num_tokens), x, np.int32(x.shape[0]), array_arg(topk_weights),
                      h.rank_prefix, h.recv_chan, h.comb_base, h.fwd_rchan, h.fwd_chan, h.fwd_comb, h.fwd_pos,
                      h.rdma_chan, h.send_rdma_pos, *self._bias_args(biases), combined_x, array_arg(combined_w),
                      self.status_arg, self.timeout_ns), call.stream, "combine")
        self._phase("combine launched", call.stream)
        return combined_x, combined_w
