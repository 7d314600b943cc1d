"""The public GPU communication buffer (DeepEP-compatible ``Buffer``)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import bootstrap, validation
from .config import Config, default_config
from .errors import CupyEpError
from .event import EventOverlap
from .intranode import (HOST_OUT_INTS, MAX_EXPERTS_PER_RANK, MAX_RANKS, IntranodeEngine, IntranodeHandle,
                        nvl_buffer_size_hint)
from .memory import ErrorRecord, HostMapped, NVLinkBuffer


class Buffer:
    """Communication buffer for MoE expert parallelism on GPUs (one per process).

    Collective over ``comm``: every rank must create it, call its communication
    methods in the same order with compatible arguments, and destroy it.

    Args:
        comm: an mpi4py communicator; one rank per GPU.
        num_nvl_bytes: bytes of the NVLink buffer for the normal (high-throughput)
            mode; see :meth:`get_nvl_buffer_size_hint`. 0: no normal mode.
        num_rdma_bytes: bytes of the NVSHMEM symmetric buffer for the low-latency mode;
            see :meth:`get_low_latency_rdma_size_hint`. 0: no low-latency mode.
        low_latency_mode: enables the low-latency methods (needs ``num_rdma_bytes``).
        num_nvl_peers: size of an NVLink domain (default: the ranks sharing a host).
        num_sms: SMs of the normal-mode kernels (default: tuned per rank count) and of the
            low-latency kernels (default: every SM).
        timeout_s: bound of every wait on another rank; past it the waiting ranks
            raise :class:`cupy_ep.CommTimeoutError` (the Buffer must then be destroyed).
        ll_transport: low-latency transport, ``"auto"`` (NVLink stores to peers mapped
            over NVLink/P2P, NVSHMEM puts to the others), ``"nvlink"`` or ``"rdma"``.
    """

    def __init__(self, comm, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_nvl_peers: Optional[int] = None, num_sms: Optional[int] = None, timeout_s: float = 30.0,
                 ll_transport: str = "auto"):
        validation.check_int(num_nvl_bytes, "num_nvl_bytes", 0)
        validation.check_int(num_rdma_bytes, "num_rdma_bytes", 0)
        if low_latency_mode and num_rdma_bytes == 0:
            raise ValueError("num_rdma_bytes: low_latency_mode needs an NVSHMEM buffer (num_rdma_bytes > 0)")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        self.comm = comm
        self.topology = bootstrap.discover(comm, num_nvl_peers)
        self.rank, self.num_ranks = self.topology.rank, self.topology.num_ranks
        self.device_id = bootstrap.select_device(self.topology)
        self.low_latency_mode = low_latency_mode
        self.timeout_s = float(timeout_s)
        self._config = Config(num_sms=num_sms) if num_sms is not None else default_config(self.topology.num_nvl_ranks)
        self._destroyed = False
        self._broken = False

        import cupy

        self.comm_stream = cupy.cuda.Stream(non_blocking=True)
        # The stream that the last communication kernel was queued on, and an event after it
        # (None: record one on that stream when another stream needs to wait for it).
        self._last_stream = None
        self._last_event = None
        self._err = ErrorRecord()
        self._host_out = HostMapped(HOST_OUT_INTS * 4)
        self._nvl = self._intranode = self._sym = self._low_latency = None
        timeout_ns = int(self.timeout_s * 1e9)
        if num_nvl_bytes > 0:
            if self.topology.num_nvl_ranks > MAX_RANKS:
                raise ValueError(f"num_nvl_peers: the normal mode serves NVLink domains of at most {MAX_RANKS} "
                                 f"ranks, got {self.topology.num_nvl_ranks}")
            self._nvl = NVLinkBuffer(self.topology.nvl_comm, num_nvl_bytes)
            self._intranode = IntranodeEngine(self.topology.nvl_comm, self._nvl, self._err, self._host_out, timeout_ns)
        if num_rdma_bytes > 0:
            from .low_latency import LowLatencyEngine
            from .memory import SymmetricBuffer

            self._sym = SymmetricBuffer(comm, self.device_id, num_rdma_bytes)
            # Low-latency kernels use every SM unless num_sms was given.
            self._low_latency = LowLatencyEngine(comm, self.rank, self.num_ranks, self._sym, self._err, timeout_ns,
                                                 num_sms, transport=ll_transport)
        comm.Barrier()

    # -- life cycle ---------------------------------------------------------
    def destroy(self) -> None:
        """Frees every buffer, stream and handle (collective). Idempotent."""
        if self._destroyed:
            return
        import cupy

        self.comm_stream.synchronize()
        cupy.cuda.runtime.deviceSynchronize()
        self.comm.Barrier()
        if self._nvl is not None:
            self._nvl.free()
        if self._low_latency is not None:
            self._low_latency.destroy()
        if self._sym is not None:
            self._sym.free(self.comm)
        self._err.free()
        self._host_out.free()
        self.topology.free()
        self._intranode = self._low_latency = self._nvl = self._sym = None
        self._destroyed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
        return False

    # -- configuration and size hints ----------------------------------------
    def set_num_sms(self, num_sms: int) -> None:
        """Sets the SMs (blocks) of the normal-mode kernels used when no ``config`` is given
        (receivers: half of them)."""
        self._config = Config(num_sms=num_sms, num_threads=self._config.num_threads)

    @staticmethod
    def get_nvl_buffer_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_topk: int = 9) -> int:
        """Bytes of ``num_nvl_bytes`` needed to dispatch up to ``num_max_tokens_per_rank`` tokens of ``hidden``
        channels (bf16 or FP8) with up to ``num_topk`` experts each, among ``num_ranks`` NVLink ranks."""
        return nvl_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of ``num_rdma_bytes`` the low-latency mode needs for these sizes."""
        from .low_latency import LowLatencyEngine

        return LowLatencyEngine.size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # -- streams --------------------------------------------------------------
    @staticmethod
    def capture() -> EventOverlap:
        """An :class:`EventOverlap` recorded now on the current stream (for ``previous_event=``)."""
        import cupy

        return EventOverlap(cupy.cuda.get_current_stream().record())

    def _check_usable(self):
        """Raises if the Buffer was destroyed or broken; returns the caller's current stream."""
        import cupy

        if self._destroyed:
            raise CupyEpError("this Buffer was destroyed")
        if self._broken:
            raise CupyEpError("this Buffer is unusable after a communication timeout; destroy it and create another")
        self._check_device_error()
        return cupy.cuda.get_current_stream()

    def _begin(self, previous_event: Optional[EventOverlap]):
        """Checks the Buffer is usable and orders the comm stream after the caller's work."""
        caller = self._check_usable()
        if previous_event is not None and previous_event.event is not None:
            self.comm_stream.wait_event(previous_event.event)
            self._after_last(self.comm_stream)
        else:
            self.comm_stream.wait_event(caller.record())
            if self._last_stream is not None and self._last_stream.ptr != caller.ptr:
                self._after_last(self.comm_stream)
        return caller

    def _finish(self, caller, async_finish: bool, keep_alive) -> EventOverlap:
        event = self.comm_stream.record()
        self._last_stream, self._last_event = self.comm_stream, event
        if async_finish:
            return EventOverlap(event, keep_alive)
        caller.wait_event(event)
        return EventOverlap(None)

    def _after_last(self, stream) -> None:
        """Orders ``stream`` after the last communication kernel if that was queued on another stream.

        Inside a CUDA-graph capture, work outside the capture cannot be waited for; it must have
        been ordered before the capture began (as any graph input must)."""
        last = self._last_stream
        if last is None or last.ptr == stream.ptr:
            return
        if stream.is_capturing() and not last.is_capturing():
            return
        stream.wait_event(self._last_event if self._last_event is not None else last.record())

    def _begin_low_latency(self, on_comm_stream: bool):
        """Returns ``(caller, stream to launch on)``. Synchronous low-latency calls run on the
        caller's stream itself: the ordering is that of a comm-stream round trip, without its two
        cross-stream waits (a few µs per call, measured in docs/performance.md)."""
        if on_comm_stream:
            return self._begin(None), self.comm_stream
        caller = self._check_usable()
        self._after_last(caller)
        self._last_stream, self._last_event = caller, None
        return caller, caller

    def _finish_low_latency(self, caller, stream, async_finish: bool, keep_alive) -> EventOverlap:
        if stream is caller:
            return EventOverlap(None)
        return self._finish(caller, async_finish, keep_alive)

    def _check_device_error(self) -> None:
        if self._err.fields[0] != 0:
            self._broken = True
            self._err.check()

    def _alloc_stream(self, caller, allocate_on_comm_stream: bool):
        return self.comm_stream if allocate_on_comm_stream else caller

    def _require_intranode(self) -> IntranodeEngine:
        if self._intranode is None:
            raise ValueError("num_nvl_bytes: this Buffer has no NVLink buffer (created with num_nvl_bytes=0)")
        if self.topology.num_rdma_ranks > 1:
            raise NotImplementedError("normal mode across several NVLink domains (internode) is not implemented; "
                                      "use one NVLink domain or the low-latency mode")
        return self._intranode

    def _check_config(self, config: Config) -> None:
        if not isinstance(config, Config):
            raise TypeError(f"config: expected a cupy_ep.Config, got {type(config).__name__}")
        if config.num_threads // 32 < self.topology.num_nvl_ranks:
            raise ValueError(f"config: num_threads {config.num_threads} gives fewer warps than the "
                             f"{self.topology.num_nvl_ranks} ranks (blocks serve each peer with at least one warp)")

    def _require_low_latency(self):
        if self._low_latency is None or not self.low_latency_mode:
            raise ValueError("low_latency_mode: this Buffer was created without low_latency_mode=True and "
                             "num_rdma_bytes > 0")
        return self._low_latency

    def _run_guarded(self, fn):
        """Runs host code that waits for kernels; a timeout marks the Buffer broken."""
        try:
            return fn()
        except CupyEpError:
            self._broken = True
            raise

    # -- layout ---------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Counts, from the routing, what each rank and expert receives.

        Args:
            topk_idx: int64 (or int32) ``[N, K]`` expert of each top-k slot; -1: none.
            num_experts: E, a multiple of the number of ranks.

        Returns:
            ``(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank None, num_tokens_per_expert int32 [E],
            is_token_in_rank bool [N, R], event)``. ``num_tokens_per_rdma_rank`` is None inside one
            NVLink domain. Experts out of range raise ValueError (this checks values on the host, a sync).
        """
        engine = self._require_intranode()
        validation.check_num_experts(num_experts, self.num_ranks)
        validation.check_topk_idx(topk_idx)
        validation.check_topk_range(topk_idx, num_experts)
        caller = self._begin(previous_event)
        stream = self._alloc_stream(caller, allocate_on_comm_stream)
        with stream:
            per_rank, per_expert, in_rank = engine.get_dispatch_layout(topk_idx, num_experts, self.comm_stream)
        event = self._finish(caller, async_finish, (topk_idx, per_rank, per_expert, in_rank))
        return per_rank, None, per_expert, in_rank, event

    # -- normal dispatch/combine ---------------------------------------------
    def dispatch(self, x, handle: Optional[IntranodeHandle] = None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None,
                 topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Sends each token to every rank that holds one of its experts (normal mode).

        Args:
            x: bf16 ``[N, H]`` (``ml_dtypes.bfloat16``), or an FP8 pair ``(x_fp8 uint8 [N, H], scales float32
                [N, H / 128])`` (e4m3fn bit patterns; ``H % 128 == 0``). ``H % 8 == 0``.
            handle: a previous dispatch's handle: repeat that dispatch for new ``x`` (cached mode; no routing
                arguments, no layout or notify step, no host synchronisation).
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: from :meth:`get_dispatch_layout`.
            num_tokens_per_rdma_rank: must be None (one NVLink domain).
            topk_idx: int64 ``[N, K]`` (optional); received remapped to local expert ids, -1 elsewhere.
            topk_weights: float32 ``[N, K]`` (with ``topk_idx``).
            expert_alignment: rounds each ``num_recv_tokens_per_expert_list`` entry up to a multiple of it.
            num_worst_tokens: > 0: outputs have exactly this many rows, nothing synchronises with the host
                (CUDA-graph capturable); padding rows have ``recv_topk_idx == -1`` and weight 0, their
                ``recv_x`` is unspecified; ``num_recv_tokens_per_expert_list`` is ``[]``. More rows than that
                is reported as an error by the next call.
            config: :class:`Config` (default: tuned for this rank count).
            previous_event, async_finish, allocate_on_comm_stream: see the README's "Streams and events".

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``:
            ``recv_x`` ``[num_recv, H]`` (or the FP8 pair) ordered by source rank then source token;
            ``recv_topk_idx`` int64 ``[num_recv, K]``, ``recv_topk_weights`` float32 ``[num_recv, K]`` (None
            without ``topk_idx``); the per-local-expert row counts (a list of int). A cached dispatch
            returns ``(recv_x, None, None, None, None, event)``.
        """
        engine = self._require_intranode()
        config = config or self._config
        is_fp8, num_tokens, hidden = validation.check_x(x)
        data, scales = (x if is_fp8 else (x, None))
        cached = handle is not None
        if cached:
            if not isinstance(handle, IntranodeHandle):
                raise TypeError("handle: expected the handle returned by Buffer.dispatch")
            if num_tokens != handle.num_tokens or hidden != handle.hidden:
                raise ValueError(f"x: the cached handle was made for [{handle.num_tokens}, {handle.hidden}], "
                                 f"got [{num_tokens}, {hidden}]")
            topk_idx = topk_weights = None
            num_out_rows = handle.num_recv_tokens
        else:
            if num_tokens_per_rdma_rank is not None:
                raise ValueError("num_tokens_per_rdma_rank: must be None inside one NVLink domain")
            validation.check_num_worst_tokens(num_worst_tokens)
            # The value check synchronises with the host: skipped where no synchronisation is allowed.
            num_experts = validation.check_layout_args(num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                                                       num_tokens, self.num_ranks,
                                                       check_values=num_worst_tokens == 0)
            if num_experts // self.num_ranks > MAX_EXPERTS_PER_RANK:
                raise ValueError(f"num_tokens_per_expert: at most {MAX_EXPERTS_PER_RANK} experts per rank")
            if topk_idx is not None:
                validation.check_topk_idx(topk_idx, num_tokens)
                topk_idx = topk_idx.astype(np.int64, copy=False)
                if topk_weights is None:
                    raise ValueError("topk_weights: required with topk_idx")
                validation.check_topk_weights(topk_weights, topk_idx)
            elif topk_weights is not None:
                raise ValueError("topk_weights: given without topk_idx")
            validation.check_expert_alignment(expert_alignment)
        self._check_config(config)
        num_topk = handle.num_topk if cached else (0 if topk_idx is None else topk_idx.shape[1])
        capacity = engine.capacity(hidden, num_topk)
        if num_tokens > capacity:
            raise ValueError(f"x: {num_tokens} tokens do not fit the NVLink buffer (room for {capacity} per rank "
                             f"at hidden {hidden}); raise num_nvl_bytes (get_nvl_buffer_size_hint)")

        caller = self._begin(previous_event)
        stream = self._alloc_stream(caller, allocate_on_comm_stream)
        with stream:
            if not cached:
                import cupy

                rank_prefix, recv_chan, send_chan = engine.notify(
                    num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, num_experts, expert_alignment,
                    num_worst_tokens, config, self.comm_stream)
                if num_worst_tokens > 0:
                    num_recv, per_expert = num_worst_tokens, []
                else:
                    num_recv, per_expert = self._run_guarded(
                        lambda: engine.wait_notify(num_experts // self.num_ranks, self.timeout_s + 5.0))
                send_pos = cupy.empty((num_tokens, self.num_ranks), dtype=cupy.int32)
                handle = IntranodeHandle(num_tokens, num_experts, hidden, num_topk, config.num_channels,
                                         num_recv if num_worst_tokens == 0 else -1, rank_prefix, recv_chan,
                                         send_chan, send_pos, is_token_in_rank)
                num_out_rows = num_recv
            recv_x, recv_scales, recv_idx, recv_w = engine.dispatch(
                data, scales, topk_idx, topk_weights, handle, num_out_rows, config, cached, self.comm_stream)
        if handle.num_recv_tokens < 0:
            handle.num_recv_tokens = num_out_rows
        event = self._finish(caller, async_finish, (x, topk_idx, topk_weights, recv_x, recv_scales, recv_idx,
                                                    recv_w))
        out_x = (recv_x, recv_scales) if is_fp8 else recv_x
        if cached:  # as DeepEP: a cached dispatch returns only the data
            return out_x, None, None, None, None, event
        return out_x, recv_idx, recv_w, per_expert, handle, event

    def combine(self, x, handle: IntranodeHandle, topk_weights=None, bias=None, config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """Sends rows back to the ranks they came from and sums them there (normal mode).

        Args:
            x: bf16 ``[num_recv, H]`` in the receive order of the dispatch that made ``handle``.
            handle: from :meth:`dispatch`.
            topk_weights: float32 ``[num_recv, K]`` (optional), summed the same way.
            bias: None, one bf16 ``[N, H]`` array or a pair, added on the source rank.
            config: only ``num_threads`` and ``num_receivers`` apply (the channels are the dispatch's).

        Returns:
            ``(combined_x bf16 [N, H], combined_topk_weights float32 [N, K] or None, event)`` where
            ``combined_x[t] = bias_0[t] + bias_1[t] + sum over ranks r that received t of x_r[row of t]``,
            accumulated in float32.
        """
        engine = self._require_intranode()
        config = config or self._config
        if not isinstance(handle, IntranodeHandle):
            raise TypeError("handle: expected the handle returned by Buffer.dispatch")
        self._check_config(config)
        validation.check_x(x, "x", allow_fp8=False, num_tokens=handle.num_recv_tokens)
        if x.shape[1] != handle.hidden:
            raise ValueError(f"x: expected hidden size {handle.hidden} (the dispatch's), got {x.shape[1]}")
        if topk_weights is not None:
            validation.check_array(topk_weights, "topk_weights", dtypes=np.float32, ndim=2,
                                   shape=(handle.num_recv_tokens, None))
        biases = validation.check_bias(bias, handle.num_tokens, handle.hidden)
        caller = self._begin(previous_event)
        stream = self._alloc_stream(caller, allocate_on_comm_stream)
        with stream:
            combined_x, combined_w = engine.combine(x, handle, topk_weights, biases, config, self.comm_stream)
        event = self._finish(caller, async_finish, (x, topk_weights, *biases, combined_x, combined_w))
        return combined_x, combined_w, event

    # -- low-latency mode --------------------------------------------------------
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False,
                             cumulative_local_expert_recv_stats=None):
        """Low-latency dispatch into a masked per-expert layout (no host synchronisation).

        Args:
            x: bf16 ``[N, H]``, ``N <= num_max_dispatch_tokens_per_rank`` (M), ``H % 128 == 0``.
            topk_idx: int64 ``[N, K]``, -1 allowed.
            num_max_dispatch_tokens_per_rank: M, the same on every rank.
            num_experts: E, a multiple of the number of ranks.
            use_fp8: cast to FP8 e4m3 on the fly (per token, per 128 channels); else bf16.
            round_scale: scales are powers of two. use_ue8m0: scales as UE8M0 bytes (implies round_scale).
            async_finish: run on the Buffer's stream and return an event instead of making the
                current stream wait. Without it (and without a hook) the kernel runs on the current
                stream itself, which orders it the same way at less cost.
            return_recv_hook: only issue the sends (on the Buffer's stream); the returned hook
                receives.
            cumulative_local_expert_recv_stats: int32 ``[E_local]``, increased by the received counts.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` bf16 ``[E_local, R*M, H]`` or the FP8
            pair ``(uint8 [E_local, R*M, H], scales float32 [E_local, R*M, H/128] or uint8 UE8M0)``; only
            the first ``recv_count[j]`` rows of expert j are valid; ``recv_count`` int32 ``[E_local]``;
            ``handle[:5] = (src_info int32 [E_local, R*M], layout_range int64 [E_local, R], M, H, E)``.
        """
        engine = self._require_low_latency()
        # No host synchronisation in this mode, so expert ids are not range-checked on the host:
        # ids outside [0, num_experts) select no expert.
        validation.check_ll_dispatch_args(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                          self.num_ranks, check_values=False)
        round_scale = round_scale or use_ue8m0
        validation.check_cumulative_stats(cumulative_local_expert_recv_stats, num_experts // self.num_ranks)
        topk_idx = topk_idx.astype(np.int64, copy=False)
        caller, stream = self._begin_low_latency(async_finish or return_recv_hook)
        recv_x, recv_count, handle, hook = engine.dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0,
            return_recv_hook, cumulative_local_expert_recv_stats, stream)
        event = self._finish_low_latency(caller, stream, async_finish, (x, topk_idx))
        return recv_x, recv_count, handle, event, self._wrap_hook(hook)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False, out=None):
        """Low-latency combine: ``out[t] = sum_k topk_weights[t, k] * y_k(t)`` (float32 accumulation).

        Args:
            x: bf16 ``[E_local, R*M, H]`` expert outputs in the dispatch's masked layout (ignored with
                ``zero_copy=True``: then they were written into :meth:`get_next_low_latency_combine_buffer`).
            topk_idx: int64 ``[N, K]`` and topk_weights float32 ``[N, K]``: the routing of the dispatch.
            handle: from :meth:`low_latency_dispatch`.
            out: optional bf16 ``[N, H]`` written in place.
            async_finish, return_recv_hook: as in :meth:`low_latency_dispatch`.

        Returns:
            ``(combined_x bf16 [N, H], event, hook)``.
        """
        engine = self._require_low_latency()
        if zero_copy:
            x = engine.next_combine_buffer(handle)
        validation.check_ll_combine_args(x, topk_idx, topk_weights, handle, self.num_ranks, out,
                                         check_values=False)
        topk_idx = topk_idx.astype(np.int64, copy=False)
        caller, stream = self._begin_low_latency(async_finish or return_recv_hook)
        combined, hook = engine.combine(x, topk_idx, topk_weights, handle, zero_copy, return_recv_hook, out,
                                        stream)
        event = self._finish_low_latency(caller, stream, async_finish, (x, topk_idx, topk_weights))
        return combined, event, self._wrap_hook(hook)

    def _wrap_hook(self, hook):
        """Hooks run their receive kernel on the comm stream and order the caller after it."""
        if hook is None:
            return None

        def run_hook():
            import cupy

            caller = cupy.cuda.get_current_stream()
            self.comm_stream.wait_event(caller.record())
            self._after_last(self.comm_stream)
            hook(self.comm_stream)
            self._last_stream, self._last_event = self.comm_stream, self.comm_stream.record()
            caller.wait_event(self._last_event)

        return run_hook

    def get_next_low_latency_combine_buffer(self, handle):
        """The bf16 ``[E_local, R*M, H]`` array to write expert outputs into for ``zero_copy=True``."""
        return self._require_low_latency().next_combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Resets the low-latency signalling state (collective)."""
        self._require_low_latency().clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)
