"""Low-latency (decode) dispatch and combine: launch logic for ``kernels_cu/low_latency*.cu``.

:class:`LowLatencyEngine` is what :class:`cupy_ep.Buffer` delegates its ``low_latency_*``
methods to. Argument validation is the Buffer's (``cupy_ep.validation``: shapes, the kernels'
limits, and the buffer's size against :func:`cupy_ep.geometry.ll_size_hint`, whose quarters hold
a dispatch and a combine of any top-k, dtype and transport); the engine checks nothing again.

Design (bytes first)
--------------------
* Dispatch sends ONE copy of a token per destination RANK (not one per selected expert, as
  DeepEP does): ~3.6 copies per token for top-8 of 288 experts over 4 ranks instead of 8. The
  receiving rank duplicates the row locally into each of its selected experts' rows of the
  masked layout ``[E_local, R*M, H]``. FP8 is cast on the fly while sending (per token and
  128 channels, bit-identical to :func:`cupy_ep.fp8.per_token_cast_to_fp8`).
* Combine: the expert rank reduces the outputs of ITS local experts for a token, weighted with
  the token's top-k weights, into one partial row per (token, expert rank) and sends that; the
  token's owner sums the partial rows of the ranks that held its experts. Partials cross the
  link as bf16 (one extra rounding per rank) while every sum accumulates in float32, so a
  result differs from a single float32 sum over all k by at most about one bf16 ulp per
  contributing rank.

Transport per peer: direct 16-byte stores through the peer's mapped address (NVLink/P2P,
``low_latency.cu``) or, for peers with no mapping, NVSHMEM puts from a local staging area
(``low_latency_rdma.cu``, needs ``jit.compile_module_nvshmem``). ``transport="auto"`` picks per
peer, ``"nvlink"`` requires every peer mapped, ``"rdma"`` forces NVSHMEM puts to every other
rank (on a host without a NIC NVSHMEM then carries them over P2P; only ``"nvlink"``/``"auto"``
were exercised on the 4xH100 test host).

Synchronisation
---------------
Every wait is bounded (``timeout_ns``); a missing peer makes the kernel record an error in the
Buffer's host-mapped ``StatusRecord`` (``CommTimeoutError`` on the host) instead of hanging.
In shrink mode (``shrink=True``: the kernels built with ``SHRINK=1``) it is masked instead:
:attr:`LowLatencyEngine.mask` (int32 ``[R]`` on the device, 1 = masked) is read and updated by
the kernels, which neither send to nor wait for a masked rank (kernels_cu/low_latency.cu,
"Shrink mode").
Signals are zeroed by their reader, so no reset pass is needed and CUDA-graph replays work.
Kernels launch at most one block per SM (grid <= SM count) because blocks of all ranks spin on
each other's results; nothing else may hold all the SMs while they run.

The symmetric buffer is split into a control area (signals) and four equal quarters: dispatch
half 0/1 and combine half 0/1. Dispatch and combine each toggle their half on every call
(host counters, identical on all ranks). A half is written again two calls later; that is safe
when, between the two, each rank waited for a signal the peer sent after finishing its read:

* non-hook calls: always (each kernel receives before the next one sends);
* ``return_recv_hook=True``: call the hook of dispatch n before issuing dispatch n+1 (same for
  combine), or put a combine between them whose receive follows the hook (the usual
  two-micro-batch overlap: dispatch a, dispatch b, hook a, hook b, combine a, combine b, ...);
* CUDA graphs replay the captured halves: capture dispatch and combine together (a graph that
  holds a dispatch and its combine, or two dispatches, is safe to replay back to back).

Refused calls
-------------
A rank whose call the host refused (its arguments failed validation, or the call's compile
agreement told it of a peer's refusal) still takes part in the call's protocol, marked
cancelled: :meth:`LowLatencyEngine.join_cancelled_dispatch` / :meth:`~LowLatencyEngine.join_cancelled_combine`
launch ``low_latency_cancel.cu``'s kernels, which read none of the call's arguments, send the
call's signals with zero slots or tokens (and the SIG_CANCELLED flag when this rank refused),
wait for the peers' signals and zero them (in shrink mode: not for masked ranks, and masking
absent ones, as the call's kernels do), and toggle the half as the call would. The peers'
kernels complete the call, report ST_PEER_BAD_INPUT naming the rank (``Buffer.check()`` raises
it) and leave their outputs unspecified. Valid calls read the flag in the signal values they
read anyway. The module is shape-free and loaded with the engine (a refusal must not compile).

Collectives on the host: the engine's constructor (grid size agreement) talks over ``comm``; the
first call of each specialisation (collective compilation) and ``clean`` talk through the
Buffer's :class:`cupy_ep.collective.CallSteps` (``compile_comm``, ``barrier``), bounded by
``timeout_s``: a rank that skips such a call makes the others raise CommTimeoutError.

Limits (cupy_ep.limits): ``H % 128 == 0``; ``1 <= K <= LL_MAX_TOPK``; ``1 <= M <= LL_MAX_TOKENS``;
``E % R == 0``, ``E <= LL_MAX_EXPERTS``; ``R <= LL_MAX_RANKS``; ``E_local * R * M < 2**31``; symmetric
buffer per :func:`cupy_ep.geometry.ll_size_hint`. Kernels: ``LL_THREADS`` threads per block, one block per
SM, grid = every SM unless ``num_sms`` is given. Measured numbers: docs/performance.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import cupy
import ml_dtypes
import numpy as np

from . import geometry, limits
from .bootstrap import run_agreed
from .engine import I32, I64, Engine, array_arg, empty_together
from .errors import PeerRefusalError

__all__ = ["LowLatencyEngine", "LLHandlePrivate"]

KERNEL_FILE = "low_latency.cu"
RDMA_KERNEL_FILE = "low_latency_rdma.cu"
CANCEL_FILE, RDMA_CANCEL_FILE = "low_latency_cancel.cu", "low_latency_cancel_rdma.cu"
CANCEL_THREADS = 256   # the cancelled parts' one block (any size: they loop over the ranks)
NUM_THREADS = limits.LL_THREADS
DISPATCH_PHASES = {1: "send: tokens stored", 2: "send: signals sent", 3: "recv: signals seen",
                   4: "recv: bases", 5: "recv: rows copied", limits.PROF_END: "end"}
COMBINE_PHASES = {1: "A: weights sent", 2: "B: partials stored", 3: "B: signals (last block)",
                  4: "C: signals seen", 5: "C: reduced", limits.PROF_END: "end"}

@dataclass
class LLHandlePrivate:
    """The engine's part of a low-latency handle (``handle[5]``)."""
    slot_count: object        # cupy int32 [R]: slots received from each source (expert side)
    slot_map: object          # cupy int32 [R, M, 1+K]: per (source, slot): token, row per k or -1
    dest_ranks: object        # cupy int32 [M, min(K, R)]: per own token, its experts' ranks ascending, -1 padded
    num_tokens: int
    topk: int
    hidden: int
    num_experts: int
    m: int


def _sm_count() -> int:
    return int(cupy.cuda.Device().attributes["MultiProcessorCount"])


class LowLatencyEngine(Engine):
    """Low-latency dispatch/combine over a symmetric buffer (see the module docstring).

    Args:
        comm: mpi4py communicator of the ranks (collective compilation, grid agreement, ``clean``).
        sym: the symmetric buffer: ``.ptr`` (this rank's base), ``.num_bytes`` (same on every
            rank), ``.peer_ptrs`` (list: each rank's buffer mapped here, 0 when not mapped):
            :class:`cupy_ep.memory.SymmetricBuffer`.
        status, timeout_ns, chaos: see :class:`cupy_ep.engine.Engine`.
        num_sms: blocks per kernel: None (recommended) = every SM of the GPU, else
            ``min(num_sms, SMs)``; the minimum over ranks is used (collective). Fewer blocks
            leave SMs to overlapping work but slow the kernels down roughly in proportion.
        transport: ``"auto"`` | ``"nvlink"`` | ``"rdma"``.
        shrink: shrink mode (see the module docstring); its kernels are separate modules.
    """

    def __init__(self, comm, sym, status, timeout_ns, num_sms=None, transport="auto", chaos=False, shrink=False):
        super().__init__(comm, status, timeout_ns, chaos)
        self.transport = transport   # checked by validation.check_buffer_args
        self.shrink = bool(shrink)
        #: shrink mode: this rank's mask (int32 [R] on the device, 1 = masked); None otherwise
        self.mask = cupy.zeros(self.num_ranks, dtype=np.int32) if self.shrink else None
        self.num_bytes = int(sym.num_bytes)
        self.base = int(sym.ptr)

        peers = [int(p or 0) for p in sym.peer_ptrs]
        peers[self.rank] = self.base
        if transport == "rdma":
            peers = [p if r == self.rank else 0 for r, p in enumerate(peers)]
        unmapped = [r for r, p in enumerate(peers) if p == 0] if transport == "nvlink" else []
        sm_count = run_agreed(comm, "reading the SM count", _sm_count)   # agreed before the grid's allgather
        blocks = sm_count if num_sms is None else max(1, min(int(num_sms), sm_count))
        # Agreed by every rank: the grid (a receiver counts its senders' blocks) and whether
        # 'nvlink' reaches every peer from every rank.
        views = comm.allgather((blocks, unmapped))
        unreachable = {r: u for r, (_, u) in enumerate(views) if u}
        if unreachable:
            raise ValueError("ll_transport='nvlink': some ranks are not mapped over NVLink/P2P ("
                             + "; ".join(f"rank {r} cannot reach {u}" for r, u in unreachable.items())
                             + "); use 'auto' or 'rdma'")
        self.num_blocks = min(b for b, _ in views)
        self.rdma = any(p == 0 for p in peers)
        # The cancelled parts of a refused call: compiled collectively (agreed), before any step
        # that can fail on one rank alone.
        cancel = self._module(RDMA_CANCEL_FILE if self.rdma else CANCEL_FILE, {}, nvshmem=self.rdma)
        self._cancelled = {name: self._entry(cancel, f"ll_{name}_cancelled") for name in ("dispatch", "combine")}
        self.peer_table = cupy.asarray(np.array(peers, dtype=np.uint64))

        self.geom = geometry.LLGeometry(self.num_ranks, self.num_bytes)
        self._functions: dict = {}
        # dispatch counters: [R] slots per destination, [E] per (destination, local expert), 2 done
        # counters, then (shrink mode) [R] wait decisions; sized for the largest E so that it never
        # has to grow under a running kernel. Combine: 2 done counters, then (shrink) [2R] decisions.
        R = self.num_ranks
        self._scratch_d = cupy.zeros(R + limits.LL_MAX_EXPERTS + 2 + R, dtype=np.int32)
        self._scratch_c = cupy.zeros(max(64, 2 + 2 * R), dtype=np.int32)
        self._combine_buffers: dict = {}
        self._halves = [0, 0]   # the next dispatch's and combine's half (see _next_half)

    # ------------------------------------------------------------------ kernels
    def _get_kernels(self, num_experts, hidden, topk, m, use_fp8, round_scale, use_ue8m0, use_logfmt=False):
        """(ll_dispatch, ll_combine) of this specialisation (``use_logfmt``: the combine's partial
        rows in LogFMT-10; the dispatch of that module is not used)."""
        key = (num_experts, hidden, topk, m, bool(use_fp8), bool(round_scale), bool(use_ue8m0), bool(use_logfmt))
        fns = self._functions.get(key)
        if fns is None:
            consts = geometry.ll_constants(self.num_ranks, num_experts, hidden, topk, m, use_fp8, round_scale,
                                           use_ue8m0, NUM_THREADS, use_logfmt)
            if self.shrink:   # only then: the modules without shrink mode stay those of before
                consts["SHRINK"] = 1
            module = self._module(RDMA_KERNEL_FILE if self.rdma else KERNEL_FILE, consts, nvshmem=self.rdma)
            fns = self._functions[key] = (self._entry(module, "ll_dispatch"), self._entry(module, "ll_combine"))
        return fns

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x, topk_idx, M, num_experts, use_fp8, round_scale, use_ue8m0, return_recv_hook, stats,
                 call, wait_stats=None):
        """Low-latency dispatch. See the module docstring and ``Buffer.low_latency_dispatch``.

        Returns ``(recv_x, recv_count, handle, hook_or_None)``; ``recv_x`` is bf16
        ``[E_local, R*M, H]`` or ``(uint8 e4m3 [E_local, R*M, H], scales)`` with scales float32
        ``[E_local, R*M, H/128]`` (uint8 UE8M0 exponents with ``use_ue8m0``). ``handle`` =
        ``(src_info int32 [E_local, R*M], layout_range int64 [E_local, R], M, H, E, LLHandlePrivate)``.
        ``call``: the :class:`cupy_ep.event.Call` (outputs allocated in ``call.alloc``, kernels
        launched on ``call.stream``). With ``return_recv_hook`` only the send kernel is launched;
        ``hook(call)`` launches the receive kernel on that call's stream.
        """
        R = self.num_ranks
        M, E = int(M), int(num_experts)
        N, H = (int(v) for v in x.shape)
        K = int(topk_idx.shape[1])
        use_fp8 = bool(use_fp8)
        use_ue8m0 = bool(use_ue8m0) and use_fp8
        round_scale = (bool(round_scale) or use_ue8m0) and use_fp8
        EL = E // R
        try:
            kernel = self._get_kernels(E, H, K, M, use_fp8, round_scale, use_ue8m0)[0]
        except PeerRefusalError:   # told by the compile agreement: this rank's part, cancelled
            self.join_cancelled_dispatch(call.stream, refused=False)
            raise
        half = self._next_half(0)
        sig_off = self.geom.signal_offset(half, 0)
        data_off = self.geom.quarter_offset(half)

        with call.alloc:
            if use_fp8:
                data = cupy.empty((EL, R * M, H), dtype=np.uint8)
                scales = cupy.empty((EL, R * M, H // limits.FP8_BLOCK), dtype=np.uint8 if use_ue8m0 else np.float32)
                recv_x = (data, scales)
            else:
                data = cupy.empty((EL, R * M, H), dtype=ml_dtypes.bfloat16)
                scales = None
                recv_x = data
            # the handle's arrays and the counts: one allocation
            src_info, layout_range, recv_count, slot_count, slot_map, dest_ranks = empty_together(
                ((EL, R * M), I32), ((EL, R), I64), ((EL,), I32), ((R,), I32), ((R, M, 1 + K), I32),
                ((M, min(K, R)), I32))

        def launch(phases, on_stream):
            prof = self._phase_buffer("low_latency_dispatch", self.num_blocks, DISPATCH_PHASES)
            self._launch(kernel, self.num_blocks, NUM_THREADS,
                         (x, topk_idx, np.int32(N), np.int32(phases), self.peer_table, np.int64(sig_off),
                          np.int64(data_off), self._scratch_d, data, array_arg(scales), src_info, layout_range,
                          recv_count, array_arg(stats), array_arg(wait_stats), slot_count, slot_map, dest_ranks, prof,
                          self.status_arg, self.timeout_ns, np.int32(self.rank), *self._shrink_args),
                         on_stream, ("low_latency_dispatch", "low_latency_dispatch_send",
                                     "low_latency_dispatch_recv")[phases % 3])

        priv = LLHandlePrivate(slot_count=slot_count, slot_map=slot_map, dest_ranks=dest_ranks, num_tokens=N,
                               topk=K, hidden=H, num_experts=E, m=M)
        handle = (src_info, layout_range, M, H, E, priv)
        if return_recv_hook:
            launch(1, call.stream)
            keep = (x, topk_idx, stats, wait_stats)

            def hook(recv_call):
                _ = keep
                launch(2, recv_call.stream)

            return recv_x, recv_count, handle, hook
        launch(3, call.stream)
        return recv_x, recv_count, handle, None

    # ------------------------------------------------------------------ refused calls
    def _next_half(self, kind: int) -> int:
        """The half of this call of ``kind`` (0 dispatch, 1 combine): toggled by every call,
        refused or not, so that it is the same on every rank."""
        half = self._halves[kind]
        self._halves[kind] ^= 1
        return half

    def _combine_signals(self, half: int):
        """(weights, partials) signal offsets of a combine half."""
        return self.geom.signal_offset(half, 1), self.geom.signal_offset(half, 2)

    def join_cancelled_dispatch(self, stream, refused: bool) -> None:
        """This rank's part in a dispatch the host refused (``refused``: this rank's arguments; else
        a peer's, learned in the call's compile agreement): ``ll_dispatch_cancelled`` on ``stream``
        (see the module docstring). Reads none of the call's arguments; nothing waits for it."""
        self._launch(self._cancelled["dispatch"], 1, CANCEL_THREADS,
                     (self.peer_table, np.int32(self.num_ranks), np.int64(self.geom.signal_offset(
                         self._next_half(0), 0)), np.int32(self.num_blocks), np.int32(refused),
                      array_arg(self.mask), self.status_arg, self.timeout_ns, np.int32(self.rank)),
                     stream, "low_latency_dispatch_cancelled")

    def join_cancelled_combine(self, stream, refused: bool) -> None:
        """As :meth:`join_cancelled_dispatch`, for a combine: ``ll_combine_cancelled``."""
        wsig_off, psig_off = self._combine_signals(self._next_half(1))
        self._launch(self._cancelled["combine"], 1, CANCEL_THREADS,
                     (self.peer_table, np.int32(self.num_ranks), np.int64(wsig_off), np.int64(psig_off),
                      np.int32(refused), array_arg(self.mask), self.status_arg, self.timeout_ns,
                      np.int32(self.rank)),
                     stream, "low_latency_combine_cancelled")

    # ------------------------------------------------------------------ combine
    def next_combine_buffer(self, handle):
        """The bf16 ``[E_local, R*M, H]`` array that ``combine(..., zero_copy=True)`` reads (the same
        array for every handle of that shape). The expert outputs are read only locally by this
        design, so it is ordinary device memory, not part of the symmetric buffer."""
        M, H, E = (int(v) for v in handle[2:5])
        shape = (E // self.num_ranks, self.num_ranks * M, H)
        buf = self._combine_buffers.get(shape)
        if buf is None:
            buf = self._combine_buffers[shape] = cupy.zeros(shape, dtype=ml_dtypes.bfloat16)
        return buf

    def combine(self, x, topk_idx, topk_weights, handle, return_recv_hook, out, call, use_logfmt=False,
                wait_stats=None):
        """Low-latency combine. Returns ``(combined_x bf16 [N, H], hook_or_None)``; with
        ``return_recv_hook`` the result is complete only after ``hook(recv_call)`` ran. ``call``
        as in :meth:`dispatch`.

        Partial sums cross the link as bf16 (one extra rounding per expert rank) or, with
        ``use_logfmt``, as LogFMT-10 rows (:mod:`cupy_ep.logfmt`, bit-identical to the reference);
        every accumulation is float32."""
        priv: LLHandlePrivate = handle[5]
        M, H, E, K, N = priv.m, priv.hidden, priv.num_experts, priv.topk, priv.num_tokens
        try:
            kernel = self._get_kernels(E, H, K, M, False, False, False, use_logfmt)[1]
        except PeerRefusalError:   # as in dispatch
            self.join_cancelled_combine(call.stream, refused=False)
            raise
        half = self._next_half(1)
        wsig_off, psig_off = self._combine_signals(half)
        data_off = self.geom.quarter_offset(2 + half)
        with call.alloc:
            result = out if out is not None else cupy.empty((N, H), dtype=ml_dtypes.bfloat16)

        def launch(phases, on_stream):
            prof = self._phase_buffer("low_latency_combine", self.num_blocks, COMBINE_PHASES)
            self._launch(kernel, self.num_blocks, NUM_THREADS,
                         (x, topk_idx, topk_weights, np.int32(N), np.int32(phases), self.peer_table,
                          np.int64(wsig_off), np.int64(psig_off), np.int64(data_off), self._scratch_c,
                          priv.slot_count, priv.slot_map, priv.dest_ranks, result, array_arg(wait_stats), prof,
                          self.status_arg,
                          self.timeout_ns, np.int32(self.rank), *self._shrink_args),
                         on_stream, ("low_latency_combine", "low_latency_combine_send",
                                     "low_latency_combine_recv")[phases % 3])

        if return_recv_hook:
            launch(1, call.stream)
            keep = (x, topk_idx, topk_weights, priv, wait_stats)

            def hook(recv_call):
                _ = keep
                launch(2, recv_call.stream)

            return result, hook
        launch(3, call.stream)
        return result, None

    @property
    def _shrink_args(self) -> tuple:
        """The kernels' last argument in shrink mode (the mask), none otherwise."""
        return (self.mask,) if self.shrink else ()

    # ------------------------------------------------------------------ reset
    def clean(self, barrier) -> None:
        """Zeroes every signal of both halves and the engine's counters, and resets the half
        toggles (collective: every rank must call it; synchronises the device and the ranks,
        through ``barrier()``: the Buffer's bounded host step)."""
        cupy.cuda.runtime.deviceSynchronize()
        barrier()
        self.reset()
        barrier()

    def reset(self) -> None:
        """:meth:`clean`'s local part, between its barriers: every signal, counter and half
        toggle back to its initial state (the device synchronised after)."""
        cupy.cuda.runtime.memset(self.base, 0, self.geom.ctrl_bytes)
        self._scratch_d.fill(0)
        self._scratch_c.fill(0)
        self._halves = [0, 0]
        cupy.cuda.runtime.deviceSynchronize()

    def masked_ranks(self) -> list:
        """Shrink mode: the ranks this rank's mask holds now (waits for the device)."""
        cupy.cuda.runtime.deviceSynchronize()
        return np.flatnonzero(cupy.asnumpy(self.mask)).tolist()

    def set_mask(self, ranks, value: int) -> None:
        """Shrink mode: ``mask[r] = value`` for each r of ``ranks`` (on the current stream)."""
        ranks = sorted(ranks)
        if ranks:
            self.mask[cupy.asarray(ranks)] = value

    def destroy(self) -> None:
        self._functions.clear()
        self._combine_buffers.clear()
