"""Normal-mode (high-throughput) dispatch and combine inside one NVLink domain.

The public entry points are the methods of :class:`cupy_ep.Buffer`; this module
holds the NVLink buffer layout, the kernel specialisation and the launches
(kernels in ``kernels_cu/layout.cu`` and ``kernels_cu/intranode.cu``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import jit
from .config import Config
from .errors import KERNEL_IDS, CommTimeoutError

MAX_RANKS = 8
MAX_CHANNELS = 64
NOTIFY_CHAN = 4          # int index of the channel prefix in a notify slot
NOTIFY_EXPERT = 128      # int index of the per-expert counts in a notify slot
NOTIFY_SLOT_BYTES = 32768

# Offsets inside the NVLink buffer (see the header of kernels_cu/intranode.cu).
BUFFER_OFFSETS = dict(
    OFF_ARRIVALS=0,
    OFF_EPOCH=64,
    OFF_NOTIFY_FLAGS=128,
    OFF_DISPATCH_TAILS=4096,
    OFF_COMBINE_TAILS=4096 + MAX_CHANNELS * MAX_RANKS * 8,
    OFF_NOTIFY=16384,
    OFF_DATA=1 << 20,
)
MAX_EXPERTS_PER_RANK = NOTIFY_SLOT_BYTES // 4 - NOTIFY_EXPERT
HOST_OUT_INTS = 2 + MAX_EXPERTS_PER_RANK

# Loaded kernel modules of this process (one GPU per process), by file and constants.
_MODULES = {}


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


@dataclass(frozen=True)
class SlotLayout:
    """Where rows, scales and top-k live inside one source's staging slot."""

    capacity: int      # rows a slot holds
    slot_bytes: int
    off_scales: int
    off_idx: int
    off_w: int
    coff_w: int        # combine: weights after bf16 rows


def slot_layout(num_nvl_bytes: int, num_ranks: int, hidden: int, num_topk: int) -> SlotLayout:
    """The staging layout for rows of ``hidden`` channels and ``num_topk`` experts.

    One capacity serves dispatch (bf16 or FP8 rows with scales) and combine (bf16
    rows and weights), so that a dispatch that fits always has a combine that fits.
    """
    data_bytes = num_nvl_bytes - BUFFER_OFFSETS["OFF_DATA"]
    slot_bytes = max(0, data_bytes // num_ranks // 16 * 16)
    row_bytes = hidden * 2 + (hidden // 128) * 4 + num_topk * 12
    capacity = max(0, (slot_bytes - 64) // row_bytes)
    off_scales = capacity * hidden * 2
    off_idx = _align16(off_scales + capacity * (hidden // 128) * 4)
    off_w = _align16(off_idx + capacity * num_topk * 8)
    return SlotLayout(capacity, slot_bytes, off_scales, off_idx, off_w, off_scales)


def nvl_buffer_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_topk: int = 9) -> int:
    """Bytes of NVLink buffer needed to dispatch up to ``num_max_tokens_per_rank`` tokens."""
    row_bytes = hidden * 2 + (hidden // 128) * 4 + num_topk * 12
    slot = _align16(num_max_tokens_per_rank * row_bytes + 64 + 64)
    return BUFFER_OFFSETS["OFF_DATA"] + num_ranks * slot


@dataclass
class IntranodeHandle:
    """What combine and a cached dispatch need from a dispatch (opaque to users)."""

    num_tokens: int
    num_experts: int
    hidden: int
    num_topk: int
    num_channels: int
    num_recv_tokens: int
    rank_prefix: object        # int32 [R + 1]: first row of each source in recv_x; [R] = rows received
    recv_chan_prefix: object   # int32 [R, C + 1]: per source, first row of each channel (source's stream)
    send_chan_prefix: object   # int32 [R, C + 1]: per destination, first row of each channel
    send_pos: object           # int32 [N, R]: row of each token in each destination's stream, or -1
    is_token_in_rank: object   # bool [N, R]


class IntranodeEngine:
    """Launches the normal-mode kernels for one rank of an NVLink domain.

    Outputs are allocated on the current stream; kernels run on the ``stream`` given.

    Args:
        comm: the NVLink domain's communicator (kernel compiles agree over it).
        nvl: the :class:`cupy_ep.memory.NVLinkBuffer`.
        err: the :class:`cupy_ep.memory.ErrorRecord`.
        host_out: a :class:`cupy_ep.memory.HostMapped` of ``HOST_OUT_INTS`` int32.
        timeout_ns: bound of every wait inside the kernels.
    """

    def __init__(self, comm, nvl, err, host_out, timeout_ns: int):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.num_ranks = comm.Get_size()
        self.nvl = nvl
        self.err = err
        self.host_out = host_out.view(np.int32, HOST_OUT_INTS)
        self.timeout_ns = np.uint64(timeout_ns)
        self._ready_seq = 0
        # When a list, every main kernel launch appends (name, start_event, end_event): benchmarks read
        # kernel-only times from it (DeepEP's accounting) without a profiler.
        self.kernel_timings = None

    # -- compilation --------------------------------------------------------
    def _module(self, filename: str, constants: dict):
        """The module for these constants. The first use of a specialisation in this process
        compiles it collectively over the domain (every rank must make that call); later
        Buffers of the process reuse it without communicating."""
        key = (filename, tuple(sorted(constants.items())))
        if key not in _MODULES:
            _MODULES[key] = jit.compile_module(filename, constants, comm=self.comm)
        return _MODULES[key]

    def _base_constants(self, num_channels: int, num_threads: int, num_receivers: int = 1) -> dict:
        return dict(BUFFER_OFFSETS, NUM_RANKS=self.num_ranks, MAX_RANKS=MAX_RANKS, NUM_CHANNELS=num_channels,
                    NUM_RECEIVERS=num_receivers, NUM_THREADS=num_threads, NOTIFY_SLOT_BYTES=NOTIFY_SLOT_BYTES, NOTIFY_CHAN=NOTIFY_CHAN,
                    NOTIFY_EXPERT=NOTIFY_EXPERT, KERNEL_NOTIFY=0, KERNEL_DISPATCH=0, KERNEL_COMBINE=0,
                    E_LOCAL=1, X_ROW_INT4=0, NUM_SCALES=0, TOPK=0, SLOT_BYTES=0, SLOT_OFF_SCALES=0,
                    SLOT_OFF_IDX=0, SLOT_OFF_W=0, HIDDEN_INT4=0, NUM_BIAS=0, CSLOT_OFF_W=0)

    def _kernel(self, name: str, **constants):
        return self._module("intranode.cu", constants).get_function(name)

    def _launch(self, kernel, grid: int, block: int, args, stream, timed: str = "") -> None:
        import cupy

        with stream:
            if timed and self.kernel_timings is not None:
                start = cupy.cuda.Event()
                start.record(stream)
                kernel((grid,), (block,), args)
                end = cupy.cuda.Event()
                end.record(stream)
                self.kernel_timings.append((timed, start, end))
            else:
                kernel((grid,), (block,), args)

    def capacity(self, hidden: int, num_topk: int) -> int:
        return slot_layout(self.nvl.num_bytes, self.num_ranks, hidden, num_topk).capacity

    # -- layout -------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts: int, stream):
        import cupy

        num_tokens, num_topk = topk_idx.shape
        with stream:
            counts = cupy.zeros(self.num_ranks + num_experts, dtype=cupy.int32)
        is_token_in_rank = cupy.empty((num_tokens, self.num_ranks), dtype=cupy.bool_)
        threads = 256
        module = self._module("layout.cu", dict(NUM_RANKS=self.num_ranks, NUM_EXPERTS=num_experts, TOPK=num_topk,
                                                NUM_THREADS=threads, IDX_BYTES=topk_idx.dtype.itemsize))
        if num_tokens > 0:
            self._launch(module.get_function("dispatch_layout"), (num_tokens + threads - 1) // threads, threads,
                         (topk_idx, np.int32(num_tokens), counts, is_token_in_rank), stream, timed="layout")
        return counts[:self.num_ranks], counts[self.num_ranks:], is_token_in_rank

    # -- barrier ------------------------------------------------------------
    def _barrier(self, kernel_name: str, num_channels: int, stream) -> None:
        kernel = self._kernel("group_barrier_kernel", **self._base_constants(num_channels, 32))
        self._launch(kernel, 1, 32, (self.nvl.peer_table, np.int32(self.rank), np.uint64(self.err.ptr),
                                     self.timeout_ns, np.int32(KERNEL_IDS[kernel_name])), stream)

    # -- dispatch -----------------------------------------------------------
    def notify(self, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, num_experts: int,
               expert_alignment: int, num_worst_tokens: int, config: Config, stream):
        """Exchanges counts; returns the partly filled handle (device arrays)."""
        import cupy

        num_tokens = is_token_in_rank.shape[0]
        c = config.num_channels
        rank_prefix = cupy.empty(self.num_ranks + 1, dtype=cupy.int32)
        recv_chan_prefix = cupy.empty((self.num_ranks, c + 1), dtype=cupy.int32)
        send_chan_prefix = cupy.empty((self.num_ranks, c + 1), dtype=cupy.int32)
        constants = self._base_constants(c, config.num_threads)
        constants.update(KERNEL_NOTIFY=1, E_LOCAL=num_experts // self.num_ranks)
        self._ready_seq += 1
        self.host_out[0] = 0
        self._launch(self._kernel("notify_dispatch", **constants), 1, config.num_threads,
                     (self.nvl.peer_table, np.int32(self.rank), np.int32(num_tokens), num_tokens_per_rank,
                      num_tokens_per_expert, is_token_in_rank, np.int32(expert_alignment),
                      np.int32(num_worst_tokens), rank_prefix, recv_chan_prefix, send_chan_prefix,
                      np.uint64(self.host_out.ctypes.data), np.uint64(self.err.ptr), self.timeout_ns,
                      np.int32(self._ready_seq)), stream, timed="notify")
        return rank_prefix, recv_chan_prefix, send_chan_prefix

    def wait_notify(self, num_local_experts: int, timeout_s: float):
        """Waits on the host for the notify results: (rows received, per-expert list)."""
        deadline = time.monotonic() + timeout_s
        while self.host_out[0] != self._ready_seq:
            if self.err.fields[0] != 0:
                self.err.check()
            if time.monotonic() > deadline:
                raise CommTimeoutError("notify_dispatch", self.rank, -1, "host wait for the receive counts")
        return int(self.host_out[1]), [int(v) for v in self.host_out[2:2 + num_local_experts]]

    def dispatch(self, x, x_scales, topk_idx, topk_weights, handle: IntranodeHandle, num_out_rows: int,
                 config: Config, cached: bool, stream):
        """Launches the dispatch kernel (after notify, or after a barrier when cached)."""
        import cupy

        hidden = handle.hidden
        num_topk = 0 if topk_idx is None else topk_idx.shape[1]
        layout = slot_layout(self.nvl.num_bytes, self.num_ranks, hidden, handle.num_topk)
        row_bytes = x.shape[1] * x.dtype.itemsize
        num_scales = 0 if x_scales is None else x_scales.shape[1]
        c = handle.num_channels
        if cached:
            self._barrier("intranode_dispatch", c, stream)
        recv_x = cupy.empty((num_out_rows, x.shape[1]), dtype=x.dtype)
        recv_scales = None if x_scales is None else cupy.empty((num_out_rows, num_scales), dtype=cupy.float32)
        recv_topk_idx = None if num_topk == 0 else cupy.empty((num_out_rows, num_topk), dtype=cupy.int64)
        recv_topk_weights = None if num_topk == 0 else cupy.empty((num_out_rows, num_topk), dtype=cupy.float32)
        num_receivers = min(config.num_receivers, c)
        constants = self._base_constants(c, config.num_threads, num_receivers)
        constants.update(KERNEL_DISPATCH=1, E_LOCAL=handle.num_experts // self.num_ranks,
                         X_ROW_INT4=row_bytes // 16, NUM_SCALES=num_scales, TOPK=num_topk,
                         SLOT_BYTES=layout.slot_bytes, SLOT_OFF_SCALES=layout.off_scales,
                         SLOT_OFF_IDX=layout.off_idx, SLOT_OFF_W=layout.off_w)
        null = np.uint64(0)
        self._launch(self._kernel("intranode_dispatch", **constants), c + num_receivers, config.num_threads,
                     (self.nvl.peer_table, np.int32(self.rank), np.int32(handle.num_tokens), x,
                      null if x_scales is None else x_scales, null if topk_idx is None else topk_idx,
                      null if topk_weights is None else topk_weights, handle.is_token_in_rank,
                      handle.send_chan_prefix, handle.recv_chan_prefix, handle.rank_prefix, handle.send_pos,
                      recv_x, null if recv_scales is None else recv_scales,
                      null if recv_topk_idx is None else recv_topk_idx,
                      null if recv_topk_weights is None else recv_topk_weights, np.int32(num_out_rows),
                      np.uint64(self.err.ptr), self.timeout_ns), stream, timed="dispatch")
        return recv_x, recv_scales, recv_topk_idx, recv_topk_weights

    # -- combine ------------------------------------------------------------
    def combine(self, x, handle: IntranodeHandle, topk_weights, biases, config: Config, stream):
        import cupy

        hidden = handle.hidden
        num_topk = 0 if topk_weights is None else topk_weights.shape[1]
        layout = slot_layout(self.nvl.num_bytes, self.num_ranks, hidden, handle.num_topk)
        c = handle.num_channels
        self._barrier("intranode_combine", c, stream)
        combined_x = cupy.empty((handle.num_tokens, hidden), dtype=x.dtype)
        combined_w = None if num_topk == 0 else cupy.empty((handle.num_tokens, num_topk), dtype=cupy.float32)
        num_receivers = min(config.num_receivers, c)
        constants = self._base_constants(c, config.num_threads, num_receivers)
        constants.update(KERNEL_COMBINE=1, HIDDEN_INT4=hidden * 2 // 16, TOPK=num_topk, NUM_BIAS=len(biases),
                         SLOT_BYTES=layout.slot_bytes, CSLOT_OFF_W=layout.coff_w)
        null = np.uint64(0)
        bias0 = biases[0] if len(biases) > 0 else null
        bias1 = biases[1] if len(biases) > 1 else null
        self._launch(self._kernel("intranode_combine", **constants), c + num_receivers, config.num_threads,
                     (self.nvl.peer_table, np.int32(self.rank), np.int32(handle.num_tokens), x,
                      null if topk_weights is None else topk_weights, handle.rank_prefix, handle.recv_chan_prefix,
                      handle.send_chan_prefix, handle.send_pos, bias0, bias1, combined_x,
                      null if combined_w is None else combined_w, np.uint64(self.err.ptr), self.timeout_ns),
                     stream, timed="combine")
        return combined_x, combined_w

