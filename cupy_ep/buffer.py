"""The public GPU communication buffer (DeepEP-compatible ``Buffer``).

``Buffer`` validates arguments (:mod:`cupy_ep.validation`, shared with the reference backend),
picks the engine that owns the call's protocol (by topology, and by handle type for cached
dispatch and combine) and orders the call's streams (:class:`cupy_ep.event.StreamOrder`):

* :class:`cupy_ep.layout.LayoutEngine`: ``get_dispatch_layout``, any topology;
* :class:`cupy_ep.intranode.IntranodeEngine`: normal mode inside one NVLink domain;
* :class:`cupy_ep.internode.InternodeEngine`: normal mode across NVLink domains (NVSHMEM);
* :class:`cupy_ep.low_latency.LowLatencyEngine`: the low-latency mode (NVSHMEM).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Optional

import cupy
import numpy as np

from . import bootstrap, limits, validation
from .collective import CallSteps
from .config import Config
from .errors import CommTimeoutError, CupyEpError
from .event import EventOverlap, StreamOrder
from .intranode import IntranodeEngine
from .layout import LayoutEngine
from .memory import NVLinkBuffer, StatusRecord


class Buffer:
    """Communication buffer for MoE expert parallelism on GPUs (one per process).

    Collective over ``comm``: every rank must create it, call its communication methods in the
    same order with compatible arguments, and destroy it. The first call of a new kernel shape
    compiles collectively too (every rank must make it).

    Args:
        comm: an mpi4py communicator; one rank per GPU (the GPU is picked from the rank's index
            on its host).
        num_nvl_bytes: bytes of the NVLink buffer of the normal (high-throughput) mode; see
            :meth:`get_nvl_buffer_size_hint`. 0: no normal mode.
        num_rdma_bytes: bytes of the NVSHMEM symmetric buffer: the low-latency mode's
            (:meth:`get_low_latency_rdma_size_hint`) or, when the ranks span several NVLink
            domains, the normal mode's (:meth:`get_rdma_buffer_size_hint`). 0: none.
        low_latency_mode: enables the low-latency methods (needs ``num_rdma_bytes``). The
            symmetric buffer then belongs to the low-latency mode: normal mode across domains
            needs a Buffer of its own.
        num_nvl_peers: size of an NVLink domain (default: the ranks sharing a host). Smaller
            domains let one host stand in for several hosts (internode mode on one machine).
        num_sms: SMs of the normal-mode kernels (default: ``Config()``'s, one default for every
            rank count) and of the low-latency kernels (default: every SM).
        timeout_s: bound of every wait on another rank; past it the waiting ranks raise
            :class:`cupy_ep.CommTimeoutError` (after a kernel's wait the Buffer must then be
            destroyed; after a host step's, ``.host`` is True and the Buffer stays usable).
        ll_transport: low-latency transport, ``"auto"`` (NVLink stores to peers mapped over
            NVLink/P2P, NVSHMEM puts to the others), ``"nvlink"`` or ``"rdma"``.
        chaos: tests only: compile the kernels with random pauses before signals and between
            chunks (default: the ``CUPY_EP_CHAOS`` environment variable, off).
        enable_shrink: DeepEP's shrink mode (needs ``low_latency_mode``): a rank that does not
            arrive in a low-latency call within ``timeout_s`` is masked on the waiting rank
            instead of failing the call, which completes among the others; later calls neither
            send to nor wait for it. :meth:`low_latency_query_mask_buffer` tells who is masked,
            :meth:`low_latency_clean_mask_buffer` brings every rank back (docs/low_latency.md).
    """

    def __init__(self, comm, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_nvl_peers: Optional[int] = None, num_sms: Optional[int] = None,
                 timeout_s: float = limits.DEFAULT_TIMEOUT_S, ll_transport: str = "auto",
                 chaos: Optional[bool] = None, enable_shrink: bool = False):
        try:
            validation.check_buffer_args(num_nvl_bytes, num_rdma_bytes, low_latency_mode, timeout_s, ll_transport,
                                         num_sms)
            validation.check_enable_shrink(enable_shrink, low_latency_mode)
            refusal = None
        except (TypeError, ValueError) as e:
            refusal = e
        self._destroyed = True   # until construction completes
        self.comm = comm
        self.low_latency_mode = bool(low_latency_mode)
        self.enable_shrink = refusal is None and bool(enable_shrink)
        self.timeout_s = limits.DEFAULT_TIMEOUT_S if refusal is not None else float(timeout_s)
        self.chaos = os.environ.get("CUPY_EP_CHAOS", "0") == "1" if chaos is None else bool(chaos)
        self._broken: Optional[CommTimeoutError] = None
        self._owner = validation.HandleOwner()
        self._status = self._streams = self._layout = self._nvl = self._sym = None
        self._normal = self._low_latency = None
        self._profile = None   # the Profile of a Buffer.profile() block in progress
        # The host steps of the collective calls; the first agrees on the arguments, so that one
        # rank's bad argument cancels the construction on every rank before any other collective.
        self._calls = CallSteps.over(comm, self.timeout_s, "Buffer")
        try:
            self._calls.agree_arguments("Buffer", refusal)
            self.topology = bootstrap.discover(comm, num_nvl_peers)
        except BaseException:
            self._calls.free()
            raise
        self.rank, self.num_ranks = self.topology.rank, self.topology.num_ranks
        self.num_nvl_ranks, self.num_rdma_ranks = self.topology.num_nvl_ranks, self.topology.num_rdma_ranks
        self._config = Config(num_sms=int(num_sms)) if num_sms is not None else Config()
        try:
            self._create(num_nvl_bytes, num_rdma_bytes, num_sms, ll_transport)
        except Exception:
            self._release()   # every step below agrees on its outcome: all ranks release together
            raise
        self._destroyed = False

    def _create(self, num_nvl_bytes, num_rdma_bytes, num_sms, ll_transport) -> None:
        """Makes the Buffer's memory and engines (collective). Each step either succeeds on every
        rank or raises on every rank (:func:`cupy_ep.bootstrap.run_agreed`), so that no rank is
        left waiting in a collective that a failed rank never reaches."""
        comm = self.comm
        validation.check_same_on_every_rank(comm, low_latency_mode=self.low_latency_mode, num_nvl_bytes=num_nvl_bytes,
                                            num_rdma_bytes=num_rdma_bytes,
                                            ll_transport=ll_transport if self.low_latency_mode else None,
                                            enable_shrink=self.enable_shrink)
        validation.check_buffer_topology(num_nvl_bytes, num_rdma_bytes, self.low_latency_mode, self.num_ranks,
                                         self.num_nvl_ranks)
        bootstrap.run_agreed(comm, "allocating the Buffer", lambda: self._create_local(num_nvl_bytes))
        if self._nvl is not None:
            bootstrap.run_agreed(comm, "mapping the NVLink peers' buffers", self._nvl.open_peers)
        if num_rdma_bytes > 0:
            bootstrap.run_agreed(comm, "creating the NVSHMEM buffer", lambda: self._create_symmetric(num_rdma_bytes))
        bootstrap.run_agreed(comm, "creating the engines", lambda: self._create_engines(num_sms, ll_transport))

    def _create_local(self, num_nvl_bytes) -> None:
        """This rank's GPU, status record, stream, layout engine and NVLink memory (no peer)."""
        self.device_id = bootstrap.select_device(self.topology)
        self._status = StatusRecord()
        self._streams = StreamOrder(cupy.cuda.Stream(non_blocking=True))
        self._layout = LayoutEngine(self.comm, self.num_nvl_ranks, self._status, self._timeout_ns, self.chaos)
        if num_nvl_bytes > 0:
            self._nvl = NVLinkBuffer(self.topology.nvl_comm, num_nvl_bytes)

    def _create_symmetric(self, num_rdma_bytes) -> None:
        from .memory import SymmetricBuffer

        self._sym = SymmetricBuffer(self.comm, self.device_id, num_rdma_bytes)

    def _create_engines(self, num_sms, ll_transport) -> None:
        """The low-latency engine first: its one collective (the grid) must come before any
        step that can fail on one rank alone."""
        if self.low_latency_mode:
            from .low_latency import LowLatencyEngine

            # Low-latency kernels use every SM unless num_sms was given.
            self._low_latency = LowLatencyEngine(self.comm, self._sym, self._status, self._timeout_ns, num_sms,
                                                 ll_transport, self.chaos, self.enable_shrink)
        if self._nvl is not None and self.num_rdma_ranks == 1:
            self._normal = IntranodeEngine(self.topology.nvl_comm, self._nvl, self._status, self._timeout_ns,
                                           self.chaos)
        elif self._nvl is not None and not self.low_latency_mode:
            from .internode import InternodeEngine

            self._normal = InternodeEngine(self.comm, self.topology, self._nvl, self._sym, self._status,
                                           self._timeout_ns, self.chaos)
        # The first call of a kernel shape compiles it: the collective calls' kernels agree through
        # the Buffer's bounded host steps; get_dispatch_layout is local and compiles alone.
        self._layout.compile_comm = None
        for engine in (self._normal, self._low_latency):
            if engine is not None:
                engine.compile_comm = self._calls

    @property
    def _engines(self) -> list:
        """The engines made so far (none after destroy)."""
        return [e for e in (self._layout, self._normal, self._low_latency) if e is not None]

    @property
    def _timeout_ns(self) -> int:
        return int(self.timeout_s * 1e9)

    @property
    def comm_stream(self):
        """The stream the communication kernels of asynchronous calls run on (``async_finish``,
        ``previous_event`` or ``allocate_on_comm_stream``); synchronous calls launch on the
        caller's stream."""
        return self._streams.comm_stream

    # -- life cycle -----------------------------------------------------------------------
    def destroy(self) -> None:
        """Frees every buffer, stream and handle (collective). Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        cupy.cuda.runtime.deviceSynchronize()
        self.comm.Barrier()
        self._release()

    def _release(self) -> None:
        """Frees what exists of the Buffer (collective; after a failed construction too)."""
        for engine in self._engines:
            if hasattr(engine, "destroy"):
                engine.destroy()
        if self._nvl is not None:
            self._nvl.free()
        if self._sym is not None:
            self._sym.free(self.comm)
        if self._status is not None:
            self._status.free()
        if self._calls is not None:
            self._calls.free()
        self.topology.free()
        self._layout = self._normal = self._low_latency = self._nvl = self._sym = self._status = self._calls = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
        return False

    def is_available(self) -> bool:
        """True until :meth:`destroy` (and while no timeout made the Buffer unusable)."""
        return not self._destroyed and self._broken is None

    # -- errors, profiling ------------------------------------------------------------------
    def check(self, synchronize: bool = True) -> None:
        """Raises what a kernel reported since the last call, at once: a timeout
        (:class:`CommTimeoutError`: a peer skipped a call), rows that did not fit
        (:class:`cupy_ep.TokenOverflowError`, e.g. after a CUDA-graph replay with
        ``num_worst_tokens``), bad routing found on the device, or a peer's refusal of a call
        that never synchronises with the host (cached dispatch, combine, the low-latency calls:
        ``ValueError`` naming the rank).

        Args:
            synchronize: first wait for the Buffer's kernels queued so far (the device), so that
                every report of the calls made so far is seen; False reads what is already known.
        """
        self._require_alive()
        if synchronize:
            cupy.cuda.runtime.deviceSynchronize()
        self._raise_reports(every_report=True)

    @contextmanager
    def profile(self):
        """``with buffer.profile() as prof:`` records kernel times, the kernels' in-kernel phase
        marks and the phases of each call (:class:`cupy_ep.profiling.Profile`)."""
        from .profiling import Profile

        prof = self._profile = Profile()
        for engine in self._engines:
            engine.profile = prof
        try:
            yield prof
        finally:
            self._profile = None
            for engine in self._engines:
                engine.profile = None

    def _begin_phases(self, name: str) -> None:
        """Opens a profiled call's phases (:meth:`cupy_ep.profiling.Profile.begin_call`)."""
        if self._profile is not None:
            self._profile.begin_call(name)

    def _phase(self, phase: str, stream=None) -> None:
        if self._profile is not None:
            self._profile.phase(phase, stream)

    def _end_phases(self, stream) -> None:
        if self._profile is not None:
            self._profile.end_call(stream)

    def _raise_reports(self, every_report: bool = False, layout_reports: bool = False) -> None:
        """Raises a pending device report, if it is one this point may raise.

        A timeout is always raised (the Buffer is broken anyway). Reports of the layout kernel are
        this rank's alone: local calls (``layout_reports``) raise them; a non-cached dispatch
        cancels itself on every rank because of them instead. The other reports (rows that did not
        fit, bad routing found by a worst-token dispatch) are made on every rank, but reach each
        host when its kernels finish: raised at the start of a call, they would stop one rank
        while a peer that has not seen its report yet goes on and waits. So only points that every
        rank reaches with them in view raise them: :meth:`check` (``every_report``) and a
        non-cached dispatch once its host wait is over and its outputs are published
        (:meth:`cupy_ep.normal.NormalEngine._raise_earlier_report`)."""
        if self._broken is not None:
            raise CommTimeoutError(self._broken.kernel, self._broken.rank, self._broken.peer,
                                   "an earlier call timed out; destroy this Buffer and create another",
                                   self._broken.channel)
        status = self._status
        if status.status == limits.ST_OK:
            return
        if not (every_report or status.status == limits.ST_TIMEOUT or (layout_reports and status.from_layout)):
            return
        error = status.take()
        if isinstance(error, CommTimeoutError):
            self._broken = error
        if error is not None:
            raise error

    def _require_alive(self) -> None:
        if self._destroyed:
            raise CupyEpError("this Buffer was destroyed")

    def _begin(self, previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False,
               layout_reports: bool = False):
        """The call's streams. A synchronous call (no ``async_finish``, ``previous_event`` or
        ``allocate_on_comm_stream``) launches on the caller's stream itself: the same order as
        the Buffer's stream would give, without two event records and two cross-stream waits."""
        self._require_alive()
        self._raise_reports(layout_reports=layout_reports)
        has_event = previous_event is not None and previous_event.event is not None
        on_comm_stream = async_finish or has_event or allocate_on_comm_stream
        return self._streams.begin(previous_event if has_event else None, on_comm_stream, allocate_on_comm_stream)

    def _guarded(self, fn):
        """Runs engine code that may wait for kernels; a kernel's timeout makes the Buffer unusable
        (a host step's does not: nothing of the call was sent)."""
        try:
            return fn()
        except CommTimeoutError as e:
            if not e.host:
                self._broken = e
            raise

    def _check_arrays(self, **arrays) -> None:
        """TypeError unless every given array is a CuPy array on this rank's GPU (None: absent;
        tuples: an FP8 pair or biases, checked item by item)."""
        for name, arr in arrays.items():
            if arr is None:
                continue
            if isinstance(arr, (tuple, list)):
                for i, a in enumerate(arr):
                    if a is not None:
                        self._check_array(f"{name}[{i}]", a)
            else:
                self._check_array(name, arr)

    def _check_array(self, name: str, a) -> None:
        if not isinstance(a, cupy.ndarray):
            raise TypeError(f"{name}: expected a CuPy array on this rank's GPU (device "
                            f"{self.device_id}), got {type(a).__module__}.{type(a).__name__}")
        device = a.data.device_id   # what a.device.id reads, without making a Device object
        if device != self.device_id:
            raise TypeError(f"{name}: expected a CuPy array on this rank's GPU (device "
                            f"{self.device_id}), got one on device {device}")

    # -- configuration and size hints -----------------------------------------------------------
    def set_num_sms(self, num_sms: int) -> None:
        """Sets the SMs (blocks) of the normal-mode kernels used when no ``config`` is given
        (receivers: half of them)."""
        self._config = Config(num_sms=validation.check_num_sms(num_sms), num_threads=self._config.num_threads)

    @staticmethod
    def get_nvl_buffer_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_topk: int = 9,
                                 num_nvl_peers: Optional[int] = None, num_max_recv_tokens: Optional[int] = None) -> int:
        """Bytes of ``num_nvl_bytes`` the normal mode needs.

        Args:
            num_max_tokens_per_rank: most tokens a rank dispatches in one call.
            hidden: H (bf16 or FP8 rows).
            num_ranks: ranks of the Buffer.
            num_topk: most top-k columns.
            num_nvl_peers: ranks per NVLink domain (default: ``num_ranks``, one domain).
            num_max_recv_tokens: across domains only: most rows a rank receives in one call
                (default: the worst case, every token of every rank).
        """
        return validation.nvl_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk, num_nvl_peers,
                                               num_max_recv_tokens)

    @staticmethod
    def get_rdma_buffer_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_nvl_peers: int,
                                  num_topk: int = 9) -> int:
        """Bytes of ``num_rdma_bytes`` the normal mode needs across NVLink domains (0 for one domain).

        Args:
            num_max_tokens_per_rank: most tokens a rank dispatches in one call.
            hidden: H. num_ranks: ranks of the Buffer. num_nvl_peers: ranks per NVLink domain.
            num_topk: most top-k columns.
        """
        return validation.rdma_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_nvl_peers, num_topk)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of ``num_rdma_bytes`` the low-latency mode needs for these sizes."""
        return validation.ll_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # -- streams ------------------------------------------------------------------------------
    @staticmethod
    def capture() -> EventOverlap:
        """An :class:`EventOverlap` recorded now on the current stream (for ``previous_event=``)."""
        return EventOverlap(cupy.cuda.get_current_stream().record())

    # -- layout -------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Counts, from the routing, what each rank, NVLink domain and expert receives (local: no
        communication, no host synchronisation).

        Args:
            topk_idx: int64 (or int32) ``[N, K]`` expert of each top-k slot; -1: none.
            num_experts: E, a multiple of the number of ranks.

        Returns:
            ``(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [R / num_nvl_ranks] or None,
            num_tokens_per_expert int32 [E], is_token_in_rank bool [N, R], event)``.
            ``num_tokens_per_rdma_rank`` is None inside one NVLink domain. Expert ids outside
            ``[-1, E)`` select nothing and are reported without a host synchronisation: the next
            dispatch raises ``ValueError`` on every rank (or :meth:`check` does).
        """
        self._begin_phases("get_dispatch_layout")
        call = self._begin(previous_event, async_finish, allocate_on_comm_stream, layout_reports=True)
        self._check_arrays(topk_idx=topk_idx)
        validation.check_layout_call(topk_idx, num_experts, self.num_ranks)
        self._phase("checked", call.stream)
        per_rank, per_rdma, per_expert, in_rank = self._layout.run(topk_idx, num_experts, call)
        event = self._streams.finish(call, async_finish, (topk_idx, per_rank, per_expert, in_rank))
        self._end_phases(call.stream)
        return per_rank, per_rdma, per_expert, in_rank, event

    # -- normal dispatch/combine ----------------------------------------------------------------
    def _require_normal(self):
        self._require_alive()
        if self._normal is None:
            if self._nvl is None:
                raise ValueError("num_nvl_bytes: this Buffer has no NVLink buffer (created with num_nvl_bytes=0)")
            raise ValueError("low_latency_mode: across NVLink domains the symmetric buffer of a low-latency Buffer "
                             "belongs to the low-latency mode; create a second Buffer (low_latency_mode=False, "
                             "num_rdma_bytes=get_rdma_buffer_size_hint(...)) for the normal mode")
        return self._normal

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                 num_tokens_per_expert=None, topk_idx=None, topk_weights=None, expert_alignment: int = 1,
                 num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """Sends each token to every rank that holds one of its experts (normal mode).

        Args:
            x: bf16 ``[N, H]`` (``ml_dtypes.bfloat16``, ``H % 8 == 0``), or an FP8 pair ``(x_fp8 uint8
                [N, H], scales float32 [N, H / 128])`` (e4m3fn bit patterns; ``H % 128 == 0``).
            handle: a previous dispatch's handle: repeat that dispatch for new ``x`` (cached mode; no routing
                arguments, no layout or notify step, no host synchronisation).
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert: from
                :meth:`get_dispatch_layout` (``num_tokens_per_rdma_rank`` may be None; inside one NVLink
                domain it must be).
            topk_idx: int64 ``[N, K]`` (optional); received remapped to local expert ids, -1 elsewhere.
            topk_weights: float32 ``[N, K]`` (with ``topk_idx``).
            expert_alignment: rounds each ``num_recv_tokens_per_expert_list`` entry up to a multiple of it.
            num_worst_tokens: > 0: outputs have exactly this many rows and nothing synchronises with the host
                (CUDA-graph capturable); padding rows have ``recv_topk_idx == -1`` and weight 0, their
                ``recv_x`` is unspecified; ``num_recv_tokens_per_expert_list`` is ``[]``. If some rank
                receives more rows, the rows past the limit are dropped and :meth:`check` (or else
                the next non-cached dispatch) raises :class:`cupy_ep.TokenOverflowError` on every rank.
            config: :class:`Config` (default: the Buffer's, ``Config(num_sms)`` or ``Config()``, the
                same for every rank count).
            previous_event, async_finish, allocate_on_comm_stream: see docs/api.md, "Streams and events".

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``:
            ``recv_x`` ``[num_recv, H]`` (or the FP8 pair) ordered by source rank then source token;
            ``recv_topk_idx`` int64 ``[num_recv, K]``, ``recv_topk_weights`` float32 ``[num_recv, K]`` (None
            without ``topk_idx``); the per-local-expert row counts (a list of int). A cached dispatch
            returns ``(recv_x, None, None, None, None, event)``.

        Raises:
            ValueError / TypeError for bad input, before anything is sent. Routing values (expert ids
            out of range, layout arrays that disagree with ``topk_idx``) are checked on the GPU: the
            call is cancelled on every rank and raises there (with ``num_worst_tokens``: at
            :meth:`check` or the next non-cached dispatch). A dispatch whose arguments this rank
            refused still takes part in the call, cancelled, so that the peers raise ``ValueError``
            naming this rank in the same way (a cached dispatch's peers at :meth:`check`;
            docs/api.md, "Errors").
        """
        self._begin_phases("dispatch")
        engine = self._require_normal()
        try:
            args = self._check_dispatch(engine, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                                        is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                                        expert_alignment, num_worst_tokens, config)
        except (TypeError, ValueError):
            self._join_cancelled(lambda stream: engine.join_cancelled_dispatch(stream, True, handle is not None))
            raise
        is_fp8, data, scales, topk_idx, routing, config = args
        call = self._begin(previous_event, async_finish, allocate_on_comm_stream)
        self._phase("checked", call.stream)
        result = self._guarded(lambda: engine.dispatch(data, scales, topk_idx, topk_weights, routing, handle,
                                                       num_worst_tokens, expert_alignment, config, call))
        event = self._streams.finish(call, async_finish, (x, topk_idx, topk_weights, result.recv_x,
                                                          result.recv_scales, result.recv_topk_idx,
                                                          result.recv_topk_weights))
        self._end_phases(call.stream)
        out_x = (result.recv_x, result.recv_scales) if is_fp8 else result.recv_x
        if handle is not None:   # as DeepEP: a cached dispatch returns only the data
            return out_x, None, None, None, None, event
        self._owner.stamp(result.handle)
        return (out_x, result.recv_topk_idx, result.recv_topk_weights, result.num_recv_tokens_per_expert_list,
                result.handle, event)

    def _check_dispatch(self, engine, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                        num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, config):
        """dispatch's argument checks (a refusal is told to the peers' host steps):
        ``(is_fp8, data, scales, topk_idx as int64, routing, config)``."""
        with self._calls.begin("dispatch"):
            self._check_arrays(x=x, num_tokens_per_rank=num_tokens_per_rank,
                               num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                               num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
                               topk_weights=topk_weights)
            config = self._check_config(config)
            if handle is not None:
                if not isinstance(handle, engine.handle_type):
                    raise TypeError("handle: expected the handle returned by this Buffer's dispatch")
                validation.check_handle_owner(handle, self._owner)
            checked = validation.check_dispatch_call(
                x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
                topk_idx, topk_weights, expert_alignment, num_worst_tokens, num_ranks=self.num_ranks,
                num_nvl_ranks=self.num_nvl_ranks, num_nvl_bytes=self._nvl.num_bytes,
                num_rdma_bytes=0 if self._sym is None else self._sym.num_bytes)
            is_fp8, routing = checked.is_fp8, checked.routing
            data, scales = (x if is_fp8 else (x, None))
            if topk_idx is not None and topk_idx.dtype != np.int64:
                topk_idx = topk_idx.astype(np.int64)
        return is_fp8, data, scales, topk_idx, routing, config

    def _join_cancelled(self, launch) -> None:
        """After this rank refused a call's arguments: ``launch(stream)`` launches its part in the
        call's protocol, marked cancelled and reading none of them, so that the peers' kernels
        complete the call and report this rank (docs/api.md, "Errors"). It follows this Buffer's
        earlier kernels, as a synchronous call does, and nothing waits for it. Not on a Buffer an
        earlier timeout broke (its peers are not in step)."""
        if self._broken is None:
            launch(self._streams.begin(None, on_comm_stream=False).stream)

    def combine(self, x, handle, topk_weights=None, bias=None, config: Optional[Config] = None,
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
            accumulated in float32 (across NVLink domains the sum inside a domain is rounded to bf16
            once before it crosses).

        Raises:
            ValueError / TypeError for bad input, before anything is sent. A rank that refused its
            arguments still takes part in the call, cancelled: the peers' outputs are unspecified
            and :meth:`check` raises ``ValueError`` naming that rank there.
        """
        self._begin_phases("combine")
        engine = self._require_normal()
        try:
            with self._calls.begin("combine"):
                self._check_arrays(x=x, topk_weights=topk_weights, bias=bias)
                if not isinstance(handle, engine.handle_type):
                    raise TypeError("handle: expected the handle returned by this Buffer's dispatch")
                validation.check_handle_owner(handle, self._owner)
                config = self._check_config(config)
                biases = validation.check_normal_combine(x, handle, topk_weights, bias)
        except (TypeError, ValueError):
            self._join_cancelled(engine.join_cancelled_combine)
            raise
        call = self._begin(previous_event, async_finish, allocate_on_comm_stream)
        self._phase("checked", call.stream)
        combined_x, combined_w = self._guarded(lambda: engine.combine(x, handle, topk_weights, biases, config, call))
        event = self._streams.finish(call, async_finish, (x, topk_weights, *biases, combined_x, combined_w))
        self._end_phases(call.stream)
        return combined_x, combined_w, event

    def _check_config(self, config: Optional[Config]) -> Config:
        return validation.check_config(self._config if config is None else config, self.num_nvl_ranks)

    # -- low-latency mode ---------------------------------------------------------------------
    def _require_low_latency(self):
        self._require_alive()
        if self._low_latency is None:
            raise ValueError("low_latency_mode: this Buffer was created without low_latency_mode=True and "
                             "num_rdma_bytes > 0")
        return self._low_latency

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None):
        """Low-latency dispatch into a masked per-expert layout (no host synchronisation).

        Args:
            x: bf16 ``[N, H]``, ``N <= num_max_dispatch_tokens_per_rank`` (M), ``H % 128 == 0``.
            topk_idx: int64 ``[N, K]``, -1 allowed. Ids outside ``[-1, E)`` select no expert (no host
                synchronisation checks them in this mode).
            num_max_dispatch_tokens_per_rank: M, the same on every rank.
            num_experts: E, a multiple of the number of ranks.
            use_fp8: cast to FP8 e4m3 on the fly (per token, per 128 channels); else bf16.
            round_scale: scales are powers of two. use_ue8m0: scales as UE8M0 bytes (implies round_scale).
            async_finish: run on the Buffer's stream and return an event instead of making the
                current stream wait. Without it the kernel runs on the current stream itself, which
                orders it the same way at less cost.
            return_recv_hook: only issue the sends; the returned hook receives (both on the current
                stream, as in DeepEP). Call the hook of dispatch n before issuing dispatch n + 1.
            cumulative_local_expert_recv_stats: int32 ``[E_local]``, increased by the received counts.
            dispatch_wait_recv_cost_stats: int64 ``[R]`` (the shape DeepEP's code checks), accumulated:
                entry r grows by the nanoseconds (``%globaltimer``) from the start of the receive
                (the hook's kernel with ``return_recv_hook``) until rank r's tokens had arrived,
                timed by the kernel's first block; the own entry is the own sends' time. The
                largest entry names a slow GPU or link.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` bf16 ``[E_local, R*M, H]`` or the FP8
            pair ``(uint8 [E_local, R*M, H], scales float32 [E_local, R*M, H/128] or uint8 UE8M0)``; only
            the first ``recv_count[j]`` rows of expert j are valid; ``recv_count`` int32 ``[E_local]``;
            ``handle[:5] = (src_info int32 [E_local, R*M], layout_range int64 [E_local, R], M, H, E)``.

        Raises:
            ValueError / TypeError for bad input on this rank, which still takes part in the call,
            cancelled, so that the peers' kernels complete it: their outputs are unspecified and
            :meth:`check` raises ``ValueError`` naming this rank there (docs/api.md, "Errors").
            A rank that skips a call makes the others' kernels time out; the error is raised by
            the next call or, at once, by :meth:`check`. In shrink mode it is masked instead: it
            sends no token, its experts receive none.
        """
        engine = self._require_low_latency()
        try:
            with self._calls.begin("low_latency_dispatch"):
                self._check_arrays(x=x, topk_idx=topk_idx,
                                   cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
                                   dispatch_wait_recv_cost_stats=dispatch_wait_recv_cost_stats)
                validation.check_ll_dispatch_args(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                                  self.num_ranks, check_values=False)
                validation.check_ll_capacity(self._sym.num_bytes, self.num_ranks, num_experts,
                                             num_max_dispatch_tokens_per_rank, x.shape[1])
                validation.check_cumulative_stats(cumulative_local_expert_recv_stats, num_experts // self.num_ranks)
                validation.check_wait_stats(dispatch_wait_recv_cost_stats, self.num_ranks,
                                            "dispatch_wait_recv_cost_stats")
                if topk_idx.dtype != np.int64:
                    topk_idx = topk_idx.astype(np.int64)
        except (TypeError, ValueError):
            self._join_cancelled(lambda stream: engine.join_cancelled_dispatch(stream, refused=True))
            raise
        call = self._begin(None, async_finish)
        recv_x, recv_count, handle, hook = engine.dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0,
            return_recv_hook, cumulative_local_expert_recv_stats, call, wait_stats=dispatch_wait_recv_cost_stats)
        self._owner.stamp(handle[5])
        event = self._streams.finish(call, async_finish, (x, topk_idx))
        return recv_x, recv_count, handle, event, self._wrap_hook(hook)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out=None, combine_wait_recv_cost_stats=None):
        """Low-latency combine: ``out[t] = sum_k topk_weights[t, k] * y_k(t)`` (float32 accumulation).

        Args:
            x: bf16 ``[E_local, R*M, H]`` expert outputs in the dispatch's masked layout (ignored with
                ``zero_copy=True``: then they were written into :meth:`get_next_low_latency_combine_buffer`).
            topk_idx: int64 ``[N, K]`` and topk_weights float32 ``[N, K]``: the routing of the dispatch.
            handle: from :meth:`low_latency_dispatch`.
            use_logfmt: the partial sums cross the link as LogFMT-10 rows (164 bytes per 128
                channels instead of 256; :mod:`cupy_ep.logfmt`, bit-identical to the reference).
            out: optional bf16 ``[N, H]`` written in place.
            combine_wait_recv_cost_stats: int64 ``[R]``, accumulated nanoseconds as
                ``dispatch_wait_recv_cost_stats``: entry r grows by the wait for rank r's top-k
                weights (from the end of this rank's own sends) plus the wait for r's partial sums
                (from the start of the receive). To time the weights, the kernel's first block
                waits for every rank's before it reduces (only when this array is given).
            async_finish, return_recv_hook: as in :meth:`low_latency_dispatch`.

        Returns:
            ``(combined_x bf16 [N, H], event, hook)``. In shrink mode the sum leaves out the
            experts of the ranks masked on this rank (before or during the call).

        Raises:
            ValueError / TypeError for bad input on this rank, which still takes part in the call,
            cancelled, as in :meth:`low_latency_dispatch`.
        """
        engine = self._require_low_latency()
        try:
            with self._calls.begin("low_latency_combine"):
                validation.check_ll_handle(handle, self.num_ranks)
                validation.check_handle_owner(handle, self._owner)
                if zero_copy:
                    x = self.get_next_low_latency_combine_buffer(handle)
                self._check_arrays(x=x, topk_idx=topk_idx, topk_weights=topk_weights, out=out,
                                   combine_wait_recv_cost_stats=combine_wait_recv_cost_stats)
                validation.check_wait_stats(combine_wait_recv_cost_stats, self.num_ranks,
                                            "combine_wait_recv_cost_stats")
                validation.check_ll_combine_args(x, topk_idx, topk_weights, handle, self.num_ranks, out,
                                                 check_values=False)
                if topk_idx.dtype != np.int64:
                    topk_idx = topk_idx.astype(np.int64)
        except (TypeError, ValueError):
            self._join_cancelled(lambda stream: engine.join_cancelled_combine(stream, refused=True))
            raise
        call = self._begin(None, async_finish)
        combined, hook = engine.combine(x, topk_idx, topk_weights, handle, return_recv_hook, out, call,
                                        use_logfmt=bool(use_logfmt), wait_stats=combine_wait_recv_cost_stats)
        event = self._streams.finish(call, async_finish, (x, topk_idx, topk_weights))
        return combined, event, self._wrap_hook(hook)

    def _wrap_hook(self, hook):
        """A hook runs its receive kernel as a synchronous call: on the stream current when it is called."""
        if hook is None:
            return None

        def run_hook():
            call = self._begin(None)
            hook(call)
            self._streams.finish(call)

        return run_hook

    def get_next_low_latency_combine_buffer(self, handle):
        """The bf16 ``[E_local, R*M, H]`` array to write expert outputs into for ``zero_copy=True``."""
        engine = self._require_low_latency()
        validation.check_ll_handle(handle, self.num_ranks)
        validation.check_handle_owner(handle, self._owner)
        return engine.next_combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Resets the low-latency signalling state (collective; in shrink mode over the unmasked
        ranks, and a rank that does not arrive within ``timeout_s`` is masked)."""
        engine = self._require_low_latency()
        with self._calls.begin("clean_low_latency_buffer"):
            validation.check_num_max_dispatch_tokens_per_rank(num_max_dispatch_tokens_per_rank)
            validation.check_int(hidden, "hidden", 1)
            validation.check_num_experts(num_experts, self.num_ranks)
        engine.clean(self._shrink_barrier if self.enable_shrink else lambda: self._calls.allgather(None, "barrier"))

    # -- shrink mode ----------------------------------------------------------------------------
    def _shrink_barrier(self) -> None:
        """A host barrier among the ranks unmasked here; a rank that does not arrive is masked."""
        engine = self._low_latency
        masked = set(engine.masked_ranks())
        engine.set_mask(self._calls.present([r for r in range(self.num_ranks) if r not in masked]), 1)

    def _require_shrink(self):
        engine = self._require_low_latency()
        validation.check_shrink_call(self.enable_shrink)
        return engine

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks (``mask=True``) or unmasks rank ``rank_to_mask`` on this rank (local, as in
        DeepEP; ordered after this Buffer's earlier kernels): later low-latency calls of this rank
        neither send to nor wait for a masked rank. Unmasking one rank alone does not bring it
        back into step; use :meth:`low_latency_clean_mask_buffer` on every rank."""
        engine = self._require_shrink()
        r, value = validation.check_mask_update(rank_to_mask, mask, self.rank, self.num_ranks)
        call = self._begin(None)
        engine.set_mask([r], value)
        self._streams.finish(call)

    def low_latency_query_mask_buffer(self, mask_status) -> None:
        """Copies this rank's mask into ``mask_status`` (CuPy int32 ``[R]``: 1 = masked), on the
        current stream after this Buffer's earlier kernels (which may mask ranks themselves)."""
        engine = self._require_shrink()
        self._check_arrays(mask_status=mask_status)
        validation.check_array(mask_status, "mask_status", dtypes=np.int32, shape=(self.num_ranks,))
        call = self._begin(None)
        mask_status[...] = engine.mask
        self._streams.finish(call)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank that makes this call too (collective over all ranks, masked ones
        included, bounded by ``timeout_s``; DeepEP's is local): the ranks synchronise their
        devices, agree where to resume numbering their calls (a masked rank skipped some), reset
        the low-latency signalling state (as :meth:`clean_low_latency_buffer`) and their masks;
        a rank that does not arrive stays (or becomes) masked."""
        engine = self._require_shrink()
        cupy.cuda.runtime.deviceSynchronize()
        absent = self._calls.rejoin("low_latency_clean_mask_buffer", engine.reset)
        engine.mask.fill(0)
        engine.set_mask(absent, 1)
