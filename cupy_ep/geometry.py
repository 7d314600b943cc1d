"""Buffer geometry: where every byte of cupy_ep's buffers lives, how big they must be, and the
JIT constants that tell the kernels.

One home for the arrangement of

* the normal mode's host-mapped records (``host_out``, the output descriptor),
* the intranode NVLink buffer (control area, notify slots, one staging slot per source),
* the internode symmetric (NVSHMEM) and NVLink buffers (control areas, records, rows),
* the low-latency symmetric buffer (signals, four quarters),

with their size hints and capacities. The engines build their kernels' constants here, the
validation and the reference backend read the same capacities, and the compile check
(``tests/kernel_cases.py``) builds its specialisations with the same functions, so a formula
exists once. Pure Python: imports :mod:`cupy_ep.limits` and :mod:`cupy_ep.logfmt` (its row size)
only (no CuPy, no engine).

Vocabulary: "geometry" is the arrangement of a buffer; "layout" is kept for
``get_dispatch_layout``'s routing counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from . import limits, logfmt


def align(value: int, alignment: int) -> int:
    """``value`` rounded up to a multiple of ``alignment``."""
    return (int(value) + alignment - 1) // alignment * alignment


def _scale_count(hidden: int) -> int:
    return hidden // limits.FP8_BLOCK


def row_bytes(hidden: int, fp8: bool) -> int:
    """Logical bytes of one token's row, as DeepEP's tests count them (the benchmarks' basis):
    bf16 data, or FP8 data plus one float32 scale per ``FP8_BLOCK`` channels."""
    return hidden + _scale_count(hidden) * 4 if fp8 else 2 * hidden


# ==== normal mode: host-mapped records (normal.py, kernels_cu/normal.cuh) =========================
#: host_out ints: [0] ready value, [1] rows received, [2] cancelled, [3] first bad rank,
#: [HOST_EXPERT + j] rows of local expert j.
HOST_OUT_INTS = limits.HOST_EXPERT + limits.MAX_EXPERTS
#: descriptor u64 words: [0] sequence number, [1..4] output pointers, [5] rows.
DESC_WORDS = 6


# ==== intranode NVLink buffer (intranode.py, kernels_cu/intranode.cu) ===============================
NOTIFY_ROW = 8           # int index of the sender's rows for every rank in a notify slot
NOTIFY_CHAN = 16         # int index of the channel prefix
NOTIFY_EXPERT = 128      # int index of the per-expert counts
NOTIFY_SLOT_BYTES = align(4 * (NOTIFY_EXPERT + limits.MAX_EXPERTS), 4096)
INTRANODE_OFFSETS = dict(
    OFF_ARRIVALS=0,
    OFF_EPOCH=64,
    OFF_NOTIFY_FLAGS=128,
    OFF_CANCELLED=192,
    OFF_GRID_RUN=256,
    OFF_GRID_ARRIVED=320,
    OFF_GRID_DONE=384,
    OFF_DISPATCH_TAILS=4096,
    OFF_COMBINE_TAILS=4096 + limits.MAX_CHANNELS * limits.MAX_NVL_PEERS * 8,
    OFF_NOTIFY=16384,
    OFF_DATA=1 << 20,
)
assert INTRANODE_OFFSETS["OFF_NOTIFY"] + limits.MAX_NVL_PEERS * NOTIFY_SLOT_BYTES <= INTRANODE_OFFSETS["OFF_DATA"]


def _intranode_row_bytes(hidden: int, num_topk: int) -> int:
    """Staging bytes per row: bf16 data (FP8 uses half), FP8 scales, top-k ids and weights."""
    return hidden * 2 + _scale_count(hidden) * 4 + num_topk * 12


@dataclass(frozen=True)
class SlotGeometry:
    """Where rows, scales and top-k live inside one source's staging slot (intranode)."""

    capacity: int      # rows a slot holds
    slot_bytes: int
    off_scales: int
    off_idx: int
    off_w: int
    coff_w: int        # combine: weights after bf16 rows


def slot_geometry(num_nvl_bytes: int, num_ranks: int, hidden: int, num_topk: int) -> SlotGeometry:
    """The staging slots of an intranode NVLink buffer for rows of ``hidden`` channels and
    ``num_topk`` experts.

    One capacity serves dispatch (bf16 or FP8 rows with scales) and combine (bf16 rows and
    weights), so that a dispatch that fits always has a combine that fits.
    """
    data_bytes = num_nvl_bytes - INTRANODE_OFFSETS["OFF_DATA"]
    slot_bytes = max(0, data_bytes // num_ranks // 16 * 16)
    capacity = max(0, (slot_bytes - 64) // _intranode_row_bytes(hidden, num_topk))
    off_scales = capacity * hidden * 2
    off_idx = align(off_scales + capacity * _scale_count(hidden) * 4, 16)
    off_w = align(off_idx + capacity * num_topk * 8, 16)
    return SlotGeometry(capacity, slot_bytes, off_scales, off_idx, off_w, off_scales)


def intranode_nvl_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_topk: int) -> int:
    """Bytes of intranode NVLink buffer to dispatch up to ``num_max_tokens_per_rank`` tokens."""
    slot = align(num_max_tokens_per_rank * _intranode_row_bytes(hidden, num_topk) + 64 + 64, 16)
    return INTRANODE_OFFSETS["OFF_DATA"] + num_ranks * slot


def intranode_constants(num_ranks: int, num_channels: int, num_threads: int, **kernel) -> dict:
    """JIT constants of an ``intranode.cu`` module: the buffer's offsets, the shape, and the
    selected kernel's own constants (``kernel``; the others' are 0)."""
    consts = dict(INTRANODE_OFFSETS, NUM_RANKS=num_ranks, NUM_CHANNELS=num_channels, NUM_THREADS=num_threads,
                  NOTIFY_SLOT_BYTES=NOTIFY_SLOT_BYTES, NOTIFY_ROW=NOTIFY_ROW, NOTIFY_CHAN=NOTIFY_CHAN,
                  NOTIFY_EXPERT=NOTIFY_EXPERT, KERNEL_NOTIFY=0, KERNEL_DISPATCH=0, KERNEL_COMBINE=0,
                  NUM_RECEIVERS=1, E_LOCAL=1, X_ROW_INT4=0, NUM_SCALES=0, TOPK=0, SLOT_BYTES=0,
                  SLOT_OFF_SCALES=0, SLOT_OFF_IDX=0, SLOT_OFF_W=0, HIDDEN_INT4=0, NUM_BIAS=0, CSLOT_OFF_W=0,
                  CHUNK=num_threads // 32, CACHED=0)
    consts.update(kernel)
    return consts


#: (channels, threads) of the intranode module without a selected kernel: group_barrier_kernel,
#: barrier_cancelled and notify_cancelled (one warp each).
INTRANODE_BARRIER_SHAPE = (1, 32)


def intranode_notify_kernel(e_local: int, num_topk: int) -> dict:
    """The notify kernel's constants (``num_topk`` 0: no topk_idx; else it is int64)."""
    return dict(KERNEL_NOTIFY=1, E_LOCAL=e_local, TOPK=num_topk)


def intranode_dispatch_kernel(slots: SlotGeometry, x_row_bytes: int, num_scales: int, num_topk: int,
                              num_receivers: int, e_local: int, chunk: int, cached: bool = False) -> dict:
    """The dispatch kernel's constants (``num_topk`` 0: no top-k travels; ``cached``: a cached
    dispatch, no top-k either, which runs the domain barrier in its own grid)."""
    return dict(KERNEL_DISPATCH=1, NUM_RECEIVERS=num_receivers, E_LOCAL=e_local, X_ROW_INT4=x_row_bytes // 16,
                NUM_SCALES=num_scales, TOPK=0 if cached else num_topk, SLOT_BYTES=slots.slot_bytes,
                SLOT_OFF_SCALES=slots.off_scales, SLOT_OFF_IDX=slots.off_idx, SLOT_OFF_W=slots.off_w, CHUNK=chunk,
                CACHED=int(cached))


def intranode_combine_kernel(slots: SlotGeometry, hidden: int, num_topk: int, num_bias: int,
                             num_receivers: int) -> dict:
    """The combine kernel's constants (``num_topk`` 0: no weights)."""
    return dict(KERNEL_COMBINE=1, NUM_RECEIVERS=num_receivers, HIDDEN_INT4=hidden * 2 // 16, TOPK=num_topk,
                NUM_BIAS=num_bias, SLOT_BYTES=slots.slot_bytes, CSLOT_OFF_W=slots.coff_w)


# ==== internode: the symmetric buffer (internode.py, kernels_cu/internode.cu) =======================
def _vec_stride(num_ranks: int, num_nvl_ranks: int) -> int:
    n = num_ranks // num_nvl_ranks
    c1 = limits.MAX_CHANNELS + 1
    return align(2 + num_nvl_ranks + num_nvl_ranks * c1 + c1 + limits.MAX_EXPERTS // n + num_ranks, 64)


def rdma_control(num_ranks: int, num_nvl_ranks: int) -> dict:
    """Offsets of the control areas of the internode symmetric buffer."""
    n = num_ranks // num_nvl_ranks
    vec = _vec_stride(num_ranks, num_nvl_ranks)
    tails = limits.MAX_CHANNELS * limits.MAX_RDMA_RANKS * 8
    # the column barrier's words alternate by the epoch's parity (they carry a cancelled rank too)
    off = dict(R_OFF_BARRIER=0, R_OFF_VEC_SIG=16 * limits.MAX_RDMA_RANKS, R_OFF_DTAIL=24 * limits.MAX_RDMA_RANKS)
    off["R_OFF_CTAIL"] = off["R_OFF_DTAIL"] + tails
    off["R_OFF_VEC_RECV"] = off["R_OFF_CTAIL"] + tails
    off["R_OFF_VEC_SEND"] = off["R_OFF_VEC_RECV"] + n * vec * 4
    off["R_OFF_DATA"] = align(off["R_OFF_VEC_SEND"] + n * vec * 4, 4096)
    off["VEC_STRIDE"] = vec
    return off


def rdma_record_bytes(hidden: int, num_topk: int, num_nvl_ranks: int) -> int:
    """Bytes per record: the largest of a dispatch record (bf16 or FP8 row, scales, top-k,
    positions) and a combine record (bf16 partial sum, weight sums)."""
    return align(2 * hidden + 4 * _scale_count(hidden) + 8 * num_topk + 4 * num_nvl_ranks, 16)


def rdma_capacity(num_rdma_bytes: int, hidden: int, num_ranks: int, num_nvl_ranks: int, num_topk: int) -> int:
    """Tokens per rank the internode symmetric buffer holds for rows of this shape."""
    n = num_ranks // num_nvl_ranks
    data = num_rdma_bytes - rdma_control(num_ranks, num_nvl_ranks)["R_OFF_DATA"]
    return max(0, data // (2 * n * rdma_record_bytes(hidden, num_topk, num_nvl_ranks)))


def internode_rdma_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_nvl_ranks: int,
                             num_topk: int) -> int:
    """Bytes of internode symmetric buffer for up to ``num_max_tokens_per_rank`` tokens per rank."""
    n = num_ranks // num_nvl_ranks
    need = rdma_control(num_ranks, num_nvl_ranks)["R_OFF_DATA"] + \
        2 * n * num_max_tokens_per_rank * rdma_record_bytes(hidden, num_topk, num_nvl_ranks)
    return align(need, 1 << 20)


# ==== internode: the NVLink buffer ===================================================================
def _internode_row_bytes(hidden: int, num_topk: int) -> int:
    return 2 * hidden + 4 * _scale_count(hidden) + 12 * num_topk


def nvl_control(num_ranks: int, num_nvl_ranks: int) -> dict:
    """Offsets of the control areas of the internode NVLink buffer."""
    n = num_ranks // num_nvl_ranks
    slot = align(1 + n + n * (limits.MAX_CHANNELS + 1) + limits.MAX_EXPERTS // num_ranks + num_ranks + 2 * n, 64)
    tails = limits.MAX_CHANNELS * num_ranks * 8
    off = dict(OFF_ARRIVALS=0, OFF_EPOCH=64, OFF_CALL_BAD=96, OFF_SLOT_FLAGS=128, OFF_FWD_FLAGS=192,
               OFF_CANCELLED=256, OFF_DTAIL=512)
    off["OFF_CTAIL"] = off["OFF_DTAIL"] + tails
    off["OFF_SLOT"] = off["OFF_CTAIL"] + tails
    off["OFF_FWD"] = off["OFF_SLOT"] + num_nvl_ranks * slot * 4
    off["OFF_NX"] = align(off["OFF_FWD"] + num_nvl_ranks * n * 4, 1 << 20)
    off["SLOT_STRIDE"] = slot
    return off


def nvl_rows(num_nvl_bytes: int, num_ranks: int, num_nvl_ranks: int, hidden: int, num_topk: int) -> dict:
    """The internode NVLink buffer's row regions for rows of this shape: its control offsets and
    ``NVL_ROWS`` rows of data (``OFF_NX``), scales (``OFF_NS``), top-k ids (``OFF_NI``) and
    weights (``OFF_NW``)."""
    off = nvl_control(num_ranks, num_nvl_ranks)
    rows = max(0, (num_nvl_bytes - off["OFF_NX"] - 64) // _internode_row_bytes(hidden, num_topk))
    off["OFF_NS"] = off["OFF_NX"] + align(rows * 2 * hidden, 16)
    off["OFF_NI"] = off["OFF_NS"] + align(rows * 4 * _scale_count(hidden), 16)
    off["OFF_NW"] = off["OFF_NI"] + align(rows * 8 * num_topk, 16)
    off["NVL_ROWS"] = rows
    return off


def internode_nvl_size_hint(num_max_recv_tokens: int, hidden: int, num_ranks: int, num_nvl_ranks: int,
                            num_topk: int) -> int:
    """Bytes of internode NVLink buffer for up to ``num_max_recv_tokens`` rows received by a rank
    (and sent back through it as forwarder)."""
    need = nvl_control(num_ranks, num_nvl_ranks)["OFF_NX"] + 64 + \
        num_max_recv_tokens * _internode_row_bytes(hidden, num_topk)
    return align(need + 48, 1 << 20)


def internode_constants(num_nvl_bytes: int, num_rdma_bytes: int, num_ranks: int, num_nvl_ranks: int, hidden: int,
                        num_topk: int, x_bytes: int, num_scales: int, num_experts: int, num_channels: int,
                        num_threads: int, chunk: int) -> dict:
    """JIT constants of an ``internode.cu`` module (notify, dispatch, combine and barrier)."""
    r, p = num_ranks, num_nvl_ranks
    return dict(rdma_control(r, p), **nvl_rows(num_nvl_bytes, r, p, hidden, num_topk),
                KERNEL_NOTIFY=1, KERNEL_DISPATCH=1, KERNEL_COMBINE=1, KERNEL_CANCEL=0, NUM_RANKS=r, NUM_NVL_RANKS=p,
                NUM_CHANNELS=num_channels, NUM_THREADS=num_threads, E_LOCAL=num_experts // r, TOPK=num_topk,
                HIDDEN=hidden, X_BYTES=x_bytes, NUM_SCALES=num_scales, CHUNK=chunk,
                CAP=rdma_capacity(num_rdma_bytes, hidden, r, p, num_topk),
                REC_BYTES=rdma_record_bytes(hidden, num_topk, p))


#: Threads of the one block of internode_notify_cancelled and internode_barrier_cancelled (any size:
#: they loop over the strides).
INTERNODE_CANCEL_THREADS = 32


def internode_cancel_constants(num_ranks: int, num_nvl_ranks: int) -> dict:
    """JIT constants of the shape-free ``internode.cu`` module: only ``internode_notify_cancelled``
    and ``internode_barrier_cancelled`` (KERNEL_CANCEL), which read the control offsets of
    ``num_ranks`` / ``num_nvl_ranks`` alone (the same for every buffer size). The shape constants
    are the smallest that the file's checks accept (one channel, one warp, no top-k, 16-byte rows,
    no data rows): no kernel of this module reads them."""
    consts = internode_constants(0, 0, num_ranks, num_nvl_ranks, hidden=8, num_topk=0,
                                 x_bytes=16, num_scales=0, num_experts=num_ranks, num_channels=1,
                                 num_threads=INTERNODE_CANCEL_THREADS, chunk=1)
    return dict(consts, KERNEL_NOTIFY=0, KERNEL_DISPATCH=0, KERNEL_COMBINE=0, KERNEL_CANCEL=1)


# ==== normal mode by topology (what both Buffers' size hints and capacity checks read) ============
def normal_nvl_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_topk: int,
                         num_nvl_ranks: int, num_max_recv_tokens: int | None = None) -> int:
    """``num_nvl_bytes`` of the normal mode: the intranode slots for one NVLink domain, else the
    internode receive rows (``num_max_recv_tokens``, by default every token of every rank)."""
    if num_nvl_ranks >= num_ranks:
        return intranode_nvl_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk)
    rows = num_ranks * num_max_tokens_per_rank if num_max_recv_tokens is None else num_max_recv_tokens
    return internode_nvl_size_hint(rows, hidden, num_ranks, num_nvl_ranks, num_topk)


def normal_rdma_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_nvl_ranks: int,
                          num_topk: int) -> int:
    """``num_rdma_bytes`` of the normal mode: 0 inside one NVLink domain."""
    if num_nvl_ranks >= num_ranks:
        return 0
    return internode_rdma_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_nvl_ranks, num_topk)


@lru_cache(maxsize=256)   # read by every dispatch's capacity check (pure, small int arguments)
def normal_send_capacity(num_nvl_bytes: int, num_rdma_bytes: int, num_ranks: int, num_nvl_ranks: int,
                         hidden: int, num_topk: int) -> int:
    """Tokens per rank one normal-mode dispatch can send: the intranode staging slot, or across
    domains the symmetric buffer's records."""
    if num_nvl_ranks == num_ranks:
        return slot_geometry(num_nvl_bytes, num_ranks, hidden, num_topk).capacity
    return rdma_capacity(num_rdma_bytes, hidden, num_ranks, num_nvl_ranks, num_topk)


def normal_recv_capacity(num_nvl_bytes: int, num_ranks: int, num_nvl_ranks: int, hidden: int,
                         num_topk: int) -> int | None:
    """Rows a rank can receive in one normal-mode dispatch, None when the geometry does not bound
    them (inside one domain the staging slots bound what each rank sends, not what it
    receives). Across domains every received row lands in the NVLink buffer (``NVL_ROWS``)."""
    if num_nvl_ranks == num_ranks:
        return None
    return nvl_rows(num_nvl_bytes, num_ranks, num_nvl_ranks, hidden, num_topk)["NVL_ROWS"]


# ==== low-latency symmetric buffer (low_latency.py, kernels_cu/low_latency.cu) ======================
LL_SIG_KINDS = 3           # dispatch, combine weights, combine partials
_LL_SIG_STRIDE = 16        # u64 signals per (half, kind): a multiple of 16 ranks
_LL_CTRL_ALIGN = 4096


def _ll_sig_stride(num_ranks: int) -> int:
    return align(max(num_ranks, 1), _LL_SIG_STRIDE)


def ll_ctrl_bytes(num_ranks: int) -> int:
    """Bytes of the control area (signals of both halves and every kind)."""
    return align(2 * LL_SIG_KINDS * _ll_sig_stride(num_ranks) * 8, _LL_CTRL_ALIGN)


def ll_partial_row_bytes(hidden: int, use_logfmt: bool = False) -> int:
    """Bytes of one combine partial row: bf16, or LogFMT-10 (:func:`cupy_ep.logfmt.row_bytes`)."""
    return logfmt.row_bytes(hidden) if use_logfmt else 2 * hidden


def ll_offsets(num_ranks: int, m: int, hidden: int, topk: int, use_fp8: bool, use_logfmt: bool = False) -> dict:
    """Byte offsets inside the low-latency quarters, as the kernels' ``LL_*`` constants (the
    kernels take them as they are and only check that the areas hold what they store).

    Dispatch quarter: ``[R][M]`` slots of ``LL_SLOT_BYTES`` (the row: bf16, or FP8 and its scales
    at ``LL_SCALE_OFF``; the meta ints at ``LL_META_OFF``), then (RDMA) a staging copy of the same
    geometry at ``LL_D_STAGE_OFF``. Combine quarter: ``[R]`` weight blocks of ``LL_WSTRIDE`` at
    ``LL_C_W_OFF``, ``[R][M]`` partial rows (:func:`ll_partial_row_bytes`) at ``LL_C_P_OFF``, then
    (RDMA) staged weights at ``LL_C_STAGE_W_OFF`` and staged partial rows at ``LL_C_STAGE_P_OFF``."""
    x_bytes = hidden if use_fp8 else 2 * hidden
    meta_off = x_bytes + (align(_scale_count(hidden) * 4, 16) if use_fp8 else 0)
    slot = meta_off + align(4 * (1 + topk), 16)
    d_recv = align(num_ranks * m * slot, 256)
    wstride = align(m * topk * 4, 256)
    c_partials = num_ranks * wstride
    c_recv = align(c_partials + num_ranks * m * ll_partial_row_bytes(hidden, use_logfmt), 256)
    return dict(LL_SCALE_OFF=x_bytes, LL_META_OFF=meta_off, LL_SLOT_BYTES=slot, LL_D_RECV_BYTES=d_recv,
                LL_D_STAGE_OFF=d_recv, LL_WSTRIDE=wstride, LL_C_W_OFF=0, LL_C_P_OFF=c_partials,
                LL_C_RECV_BYTES=c_recv, LL_C_STAGE_W_OFF=c_recv, LL_C_STAGE_P_OFF=c_recv + num_ranks * wstride)


def ll_dispatch_quarter_bytes(num_ranks: int, m: int, hidden: int, topk: int, use_fp8: bool, rdma: bool) -> int:
    """Bytes a dispatch needs of its quarter (RDMA: the staging copy too)."""
    off = ll_offsets(num_ranks, m, hidden, topk, use_fp8)
    return off["LL_D_STAGE_OFF"] + off["LL_D_RECV_BYTES"] if rdma else off["LL_D_RECV_BYTES"]


def ll_combine_quarter_bytes(num_ranks: int, m: int, hidden: int, topk: int, rdma: bool,
                             use_logfmt: bool = False) -> int:
    """Bytes a combine needs of its quarter (RDMA: the staged weights and partial rows too)."""
    off = ll_offsets(num_ranks, m, hidden, topk, False, use_logfmt)
    if not rdma:
        return off["LL_C_RECV_BYTES"]
    return off["LL_C_STAGE_P_OFF"] + num_ranks * m * ll_partial_row_bytes(hidden, use_logfmt)


@lru_cache(maxsize=256)   # read by every low-latency dispatch's capacity check
def ll_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int) -> int:
    """Bytes of symmetric buffer the low-latency mode needs (any number of experts, any top-k up
    to ``LL_MAX_TOPK``, bf16 or FP8, NVLink or RDMA transport)."""
    m, h, r = (int(v) for v in (num_max_dispatch_tokens_per_rank, hidden, num_ranks))
    d = ll_dispatch_quarter_bytes(r, m, h, limits.LL_MAX_TOPK, False, True)
    c = ll_combine_quarter_bytes(r, m, h, limits.LL_MAX_TOPK, True)
    return align(ll_ctrl_bytes(r) + 4 * align(max(d, c), 256), 1 << 20)


@dataclass(frozen=True)
class LLGeometry:
    """The low-latency symmetric buffer of ``num_bytes`` bytes over ``num_ranks`` ranks: a control
    area of signals, then four equal quarters (dispatch halves 0/1, combine halves 0/1)."""

    num_ranks: int
    num_bytes: int

    @property
    def ctrl_bytes(self) -> int:
        return ll_ctrl_bytes(self.num_ranks)

    @property
    def quarter_bytes(self) -> int:
        return (max(self.num_bytes - self.ctrl_bytes, 0) // 4) // 256 * 256

    def signal_offset(self, half: int, kind: int) -> int:
        """Byte offset of the ``[R]`` signals of ``half`` (0/1) and ``kind`` (0 dispatch, 1
        combine weights, 2 combine partials)."""
        return (half * LL_SIG_KINDS + kind) * _ll_sig_stride(self.num_ranks) * 8

    def quarter_offset(self, index: int) -> int:
        """Byte offset of quarter ``index`` (0/1 dispatch halves, 2/3 combine halves)."""
        return self.ctrl_bytes + index * self.quarter_bytes


def ll_constants(num_ranks: int, num_experts: int, hidden: int, topk: int, m: int, use_fp8: bool,
                 round_scale: bool, use_ue8m0: bool, num_threads: int = limits.LL_THREADS,
                 use_logfmt: bool = False) -> dict:
    """JIT constants of a ``low_latency*.cu`` module: the shape and :func:`ll_offsets`."""
    return {
        "NUM_RANKS": num_ranks, "NUM_EXPERTS": num_experts, "HIDDEN": hidden, "TOPK": topk, "MAX_TOKENS": m,
        "USE_FP8": int(bool(use_fp8)), "ROUND_SCALE": int(bool(round_scale)),
        "USE_UE8M0": int(bool(use_ue8m0)), "USE_LOGFMT": int(bool(use_logfmt)), "LL_THREADS": num_threads,
        **ll_offsets(num_ranks, m, hidden, topk, use_fp8, use_logfmt),
    }