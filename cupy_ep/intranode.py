"""Normal-mode (high-throughput) dispatch and combine inside one NVLink domain.

:class:`IntranodeEngine` owns the whole protocol of a call (kernels in
``kernels_cu/intranode.cu``); :class:`cupy_ep.Buffer` validates the arguments and orders the
streams. A non-cached dispatch runs:

1. ``notify_dispatch`` (one block): a barrier of the domain, this rank's rows per destination
   and channel, the routing checks the reference backend makes on the host (expert ids in range,
   layout arrays consistent with ``topk_idx``), and the exchange of counts. A call with bad
   input on any rank is cancelled on every rank.
2. ``intranode_dispatch``, queued right behind notify without waiting for the host: senders
   copy rows into the peers' staging slots, receivers copy them out into the outputs.
3. Meanwhile the host waits for notify's counts (host-mapped memory), allocates the outputs
   at their exact size and publishes their addresses in a host-mapped descriptor, which the
   receivers wait for. With ``num_worst_tokens`` the outputs are allocated up front and there
   is no host wait at all (CUDA-graph capturable).

A cached dispatch and a combine run one kernel each, whose block 0 runs the domain barrier
while the other blocks wait for it (``grid_domain_barrier``).

A rank whose non-cached dispatch is refused on the host (its arguments failed validation, or a
host step told it of a peer's refusal) launches ``notify_cancelled`` instead: the notify
protocol with zero rows and a cancel flag, so that the peers' notify cancels the call there and
raises promptly (:meth:`IntranodeEngine.join_cancelled_dispatch`). A rank whose cached dispatch
or combine is refused launches ``barrier_cancelled``: the barrier, after marking the call
cancelled in the peers' buffers, whose kernel then does nothing but report (raised by
``check()``); one told of a peer's refusal in its kernel's compile agreement launches
``group_barrier_kernel``. Their module, the barrier's, is loaded when the engine is made: the
cancelled parts never compile (a compile agreement the peers would not join).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import geometry, limits
from .config import Config
from .engine import I32, ptr, words_together
from .errors import PeerRefusalError
from .normal import DispatchResult, NormalEngine, NormalHandle

_KERNEL_ID = {name: np.int32(kid) for name, kid in limits.KERNEL_IDS.items()}   # launch arguments
NOTIFY_PHASES = {1: "checked", 2: "barrier passed", 3: "counts exchanged", limits.PROF_END: "end"}   # its marks


@dataclass
class IntranodeHandle(NormalHandle):
    """What combine and a cached dispatch need from an intranode dispatch. The routing state only
    the kernels read and write lies in one allocation (``memory``, :func:`cupy_ep.engine.words_together`);
    the fields hold the device addresses of its parts (ints)."""

    rank_prefix: object        # int32 [R + 1]: first row of each source in recv_x; [R] = rows received
    recv_chan_prefix: object   # int32 [R, C + 1]: per source, first row of each channel (source's stream)
    send_chan_prefix: object   # int32 [R, C + 1]: per destination, first row of each channel
    send_pos: object           # int32 [N, R]: row of each token in each destination's stream, or -1
    call_status: object        # int32 [1]: 1 when notify cancelled the call
    is_token_in_rank: object   # bool [N, R] (the caller's array)
    memory: object             # the allocation of the five parts above it


class IntranodeEngine(NormalEngine):
    """Normal-mode dispatch/combine for one rank of an NVLink domain.

    Args:
        nvl_comm: the NVLink domain's communicator.
        nvl: the :class:`cupy_ep.memory.NVLinkBuffer`.
        status, timeout_ns, chaos: see :class:`cupy_ep.engine.Engine`.
    """

    handle_type = IntranodeHandle

    def __init__(self, nvl_comm, nvl, status, timeout_ns: int, chaos: bool = False):
        super().__init__(nvl_comm, status, timeout_ns, chaos)
        self.nvl = nvl
        self._peers = ptr(nvl.peer_table)   # the launches' first value (the table never moves)
        # what a call launches when it cannot launch its own kernels (the barrier kernel, the
        # cancelled parts): their module is loaded once, here, so that none of them waits on a
        # compile agreement, which may tell of a peer's refusal first. Collective over nvl_comm
        # (the Buffer makes its engines on every rank).
        self._barrier_kernels = {name: self._function(name, *geometry.INTRANODE_BARRIER_SHAPE)
                                 for name in ("group_barrier_kernel", "notify_cancelled", "barrier_cancelled")}

    # -- kernels ----------------------------------------------------------------------------
    def _function(self, name: str, num_channels: int, num_threads: int, **kernel):
        """Kernel ``name`` of the module with these channels, threads and kernel constants
        (:func:`cupy_ep.geometry.intranode_constants`)."""
        key = (name, num_channels, num_threads, tuple(sorted(kernel.items())))
        fn = self._functions.get(key)
        if fn is None:
            consts = geometry.intranode_constants(self.num_ranks, num_channels, num_threads, **kernel)
            fn = self._functions[key] = self._entry(self._module("intranode.cu", consts), name)
        return fn

    def _kernel_or_barrier(self, build, kernel_name: str, stream):
        """``build()``: the (kernel, grid) of a cached dispatch or a combine, whose grid runs the
        call's domain barrier. When its compile agreement tells of a peer's refusal, this rank
        takes part in the barrier (``group_barrier_kernel``, unflagged: the epochs stay in step)
        before the refusal is raised."""
        try:
            return build()
        except PeerRefusalError:
            self._launch_barrier_kernel("group_barrier_kernel", kernel_name, stream)
            raise

    def _launch_barrier_kernel(self, name: str, kernel_name: str, stream, profile_name: str = "") -> None:
        """``group_barrier_kernel`` or ``barrier_cancelled``: this rank's part in the domain barrier
        of a ``kernel_name`` call (one warp, the module loaded with the engine)."""
        self._launch(self._barrier_kernels[name], *geometry.INTRANODE_BARRIER_SHAPE,
                     (self.nvl.peer_table, np.int32(self.rank), self.status_arg, self.timeout_ns,
                      _KERNEL_ID[kernel_name]), stream, profile_name)

    def join_cancelled_dispatch(self, stream, refused: bool, cached: bool = False) -> None:
        """As :meth:`cupy_ep.normal.NormalEngine.join_cancelled_dispatch`: ``notify_cancelled``,
        or for a cached dispatch ``barrier_cancelled`` (kernels_cu/intranode.cu; their module
        was loaded with the engine)."""
        if cached:
            self._join_cancelled_barrier("intranode_dispatch", stream)
            return
        self._launch(self._barrier_kernels["notify_cancelled"], 1, geometry.INTRANODE_BARRIER_SHAPE[1],
                     (self.nvl.peer_table, np.int32(self.rank), np.int32(refused), self.status_arg,
                      self.timeout_ns), stream, "notify")

    def join_cancelled_combine(self, stream) -> None:
        """As :meth:`cupy_ep.normal.NormalEngine.join_cancelled_combine`: ``barrier_cancelled``."""
        self._join_cancelled_barrier("intranode_combine", stream)

    def _join_cancelled_barrier(self, kernel_name: str, stream) -> None:
        self._launch_barrier_kernel("barrier_cancelled", kernel_name, stream, "barrier")

    # -- dispatch ---------------------------------------------------------------------------
    def dispatch(self, data, scales, topk_idx, topk_weights, routing, handle: Optional[IntranodeHandle],
                 num_worst_tokens: int, expert_alignment: int, config: Config, call) -> DispatchResult:
        """One dispatch (arguments validated by the Buffer, capacity included). ``routing``: the
        :class:`cupy_ep.validation.Routing` of a new dispatch, None with a cached ``handle``.
        ``call``: the :class:`cupy_ep.event.Call` (launch and allocation streams)."""
        num_tokens, hidden = (int(v) for v in data.shape)
        if handle is not None:
            return self._cached_dispatch(data, scales, handle, config, call)

        per_rank, in_rank = routing.num_tokens_per_rank, routing.is_token_in_rank
        per_expert = routing.num_tokens_per_expert
        num_experts, num_topk = routing.num_experts, routing.num_topk
        c = config.num_channels
        r = self.num_ranks
        with call.alloc:
            memory, (rank_prefix, recv_chan, send_chan, send_pos, call_status) = words_together(
                ((r + 1,), I32), ((r, c + 1), I32), ((r, c + 1), I32), ((num_tokens, r), I32), ((1,), I32))
        handle = IntranodeHandle(num_tokens, num_experts, hidden, num_topk, c, num_worst_tokens, rank_prefix,
                                 recv_chan, send_chan, send_pos, call_status, in_rank, memory)
        self._phase("handle allocated", call.stream)
        seq = self._next_seq()
        e_local = num_experts // r
        try:
            notify = self._memoised(("notify", c, config.num_threads, e_local, num_topk),
                                    lambda: self._function("notify_dispatch", c, config.num_threads,
                                                           **geometry.intranode_notify_kernel(e_local, num_topk)))
        except PeerRefusalError:   # told by the compile agreement: the refusing rank runs its cancelled part
            self.join_cancelled_dispatch(call.stream, refused=False)
            raise
        self._launch_values(notify, 1, config.num_threads,
                            (self._peers, self.rank, num_tokens, per_rank.data.ptr, per_expert.data.ptr,
                             in_rank.data.ptr, ptr(topk_idx), expert_alignment, num_worst_tokens, rank_prefix, recv_chan,
                             send_chan, call_status, self.host_out_arg, self.status_arg, self.timeout_ns, seq,
                             self._phase_buffer("notify_dispatch", 1, NOTIFY_PHASES, call.stream)), call.stream,
                            "notify")
        self._phase("notify launched", call.stream)
        outputs, out_args = self._dispatch_outputs(seq, data, scales, num_topk, num_worst_tokens, call)
        kernel, grid = self._dispatch_kernel(data, scales, handle, config)
        self._launch_values(kernel, grid, config.num_threads,
                            (self._peers, self.rank, num_tokens, data.data.ptr, ptr(scales), ptr(topk_idx),
                             ptr(topk_weights), in_rank.data.ptr, send_chan, recv_chan, rank_prefix, send_pos,
                             call_status, *out_args, self.status_arg, self.timeout_ns), call.stream, "dispatch")
        self._phase("dispatch launched", call.stream)
        if outputs is not None:   # num_worst_tokens: nothing waits for the host
            return DispatchResult(*outputs, [], handle)
        return self._finish_dispatch(seq, data, scales, num_topk, e_local, handle, call)

    def _cached_dispatch(self, data, scales, handle: IntranodeHandle, config: Config, call) -> DispatchResult:
        kernel, grid = self._kernel_or_barrier(lambda: self._dispatch_kernel(data, scales, handle, config, cached=True),
                                               "intranode_dispatch", call.stream)
        outputs = self._alloc_outputs(data, scales, 0, handle.num_rows, call)
        self._launch_values(kernel, grid, config.num_threads,
                            (self._peers, self.rank, handle.num_tokens, data.data.ptr, ptr(scales), 0, 0,
                             handle.is_token_in_rank.data.ptr, handle.send_chan_prefix, handle.recv_chan_prefix,
                             handle.rank_prefix, handle.send_pos, handle.call_status,
                             *self._given_outputs(outputs, handle.num_rows, False), self.status_arg, self.timeout_ns),
                            call.stream, "dispatch")
        self._phase("dispatch launched", call.stream)
        return DispatchResult(outputs[0], outputs[1], None, None, None, None)

    def _dispatch_kernel(self, data, scales, handle: IntranodeHandle, config: Config, cached: bool = False):
        """(kernel, grid) of a dispatch of this shape (memoised per shape and config)."""
        row_bytes = data.shape[1] * data.dtype.itemsize
        num_scales = 0 if scales is None else scales.shape[1]
        key = ("dispatch", handle.hidden, handle.num_topk, handle.num_experts, handle.num_channels, row_bytes,
               num_scales, cached, config)
        return self._memoised(key, lambda: self._build_dispatch_kernel(handle, row_bytes, num_scales, cached, config))

    def _build_dispatch_kernel(self, handle: IntranodeHandle, row_bytes: int, num_scales: int, cached: bool,
                               config: Config):
        slots = geometry.slot_geometry(self.nvl.num_bytes, self.num_ranks, handle.hidden, handle.num_topk)
        c = handle.num_channels
        receivers = min(config.num_receivers, c)
        fn = self._function("intranode_dispatch", c, config.num_threads, **geometry.intranode_dispatch_kernel(
            slots, row_bytes, num_scales, handle.num_topk, receivers, handle.num_experts // self.num_ranks,
            config.chunk_tokens, cached))
        return fn, c + receivers

    # -- combine ----------------------------------------------------------------------------
    def combine(self, x, handle: IntranodeHandle, topk_weights, biases, config: Config, call):
        """Returns ``(combined_x bf16 [N, H], combined_topk_weights float32 [N, K] or None)``."""
        num_topk = 0 if topk_weights is None else topk_weights.shape[1]
        key = ("combine", handle.hidden, handle.num_topk, handle.num_channels, num_topk, len(biases), config)
        fn, grid = self._kernel_or_barrier(
            lambda: self._memoised(key, lambda: self._build_combine_kernel(handle, num_topk, len(biases), config)),
            "intranode_combine", call.stream)
        combined_x, combined_w = self._combine_outputs(x, handle, topk_weights, call)
        self._launch_values(fn, grid, config.num_threads,
                            (self._peers, self.rank, handle.num_tokens, x.data.ptr, x.shape[0], ptr(topk_weights),
                             handle.rank_prefix, handle.recv_chan_prefix, handle.send_chan_prefix, handle.send_pos,
                             *self._bias_args(biases), combined_x.data.ptr, ptr(combined_w), self.status_arg,
                             self.timeout_ns), call.stream, "combine")
        self._phase("combine launched", call.stream)
        return combined_x, combined_w

    def _build_combine_kernel(self, handle: IntranodeHandle, num_topk: int, num_bias: int, config: Config):
        slots = geometry.slot_geometry(self.nvl.num_bytes, self.num_ranks, handle.hidden, handle.num_topk)
        c = handle.num_channels
        receivers = min(config.num_receivers, c)
        fn = self._function("intranode_combine", c, config.num_threads, **geometry.intranode_combine_kernel(
            slots, handle.hidden, num_topk, num_bias, receivers))
        return fn, c + receivers

