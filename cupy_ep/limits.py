"""One home for cupy_ep's limits, kernel ids, status codes and format constants.

Python code imports them from here; the kernels receive them as JIT constants
(:func:`device_constants`, added by :mod:`cupy_ep.jit` to every compilation), so the two
sides cannot drift apart. This module imports nothing but the standard library.
"""
from __future__ import annotations

# ---- FP8 (e4m3fn) per-token cast ---------------------------------------------------------
FP8_BLOCK = 128            # channels per scale
FP8_MAX = 448.0            # largest finite e4m3fn value
FP8_AMAX_FLOOR = 1e-4      # amax of an all-zero block

# ---- normal mode --------------------------------------------------------------------------
MAX_NVL_PEERS = 8          # ranks of one NVLink domain
MAX_CHANNELS = 64          # sending blocks of a normal-mode kernel
MAX_RDMA_RANKS = 64        # NVLink domains of an internode Buffer
MAX_NORMAL_TOPK = 32       # top-k columns the normal-mode kernels carry (one warp lane each)
MIN_NUM_SMS = 2            # blocks of a normal-mode kernel (Config.num_sms): a sender and a receiver
MAX_NUM_SMS = 128
MAX_EXPERTS = 8192         # experts of a layout / normal dispatch (shared-memory counters)
HOST_EXPERT = 4            # host_out int index of the per-expert counts (cupy_ep.geometry, normal.cuh)

# ---- low-latency mode ---------------------------------------------------------------------
LL_MAX_RANKS = 1024         # rank lists, not masks (kernels_cu/low_latency.cu); compile-checked up to here
LL_MAX_TOPK = 32           # one warp lane per top-k slot
LL_MAX_EXPERTS = 8192      # shared memory of the receive phase: 4 bytes per expert
LL_MAX_TOKENS = 65535      # positions travel as 16-bit fields
LL_THREADS = 512           # threads per block of the low-latency kernels
LL_MAX_SMEM_BYTES = 48 * 1024 - 64   # ll_dispatch's union of phase buffers: the 48 KB of static shared
                                     # memory a block gets without opt-in, 64 left to its other variables

# ---- kernels (ids in status records) -------------------------------------------------------
KERNEL_NAMES = {
    1: "get_dispatch_layout",
    2: "notify_dispatch",
    3: "intranode_dispatch",
    4: "intranode_combine",
    5: "barrier",
    6: "low_latency_dispatch",
    7: "low_latency_combine",
    8: "internode_notify",
    9: "internode_dispatch",
    10: "internode_combine",
}
KERNEL_IDS = {name: kid for kid, name in KERNEL_NAMES.items()}

# ---- status codes of the device status record ------------------------------------------------
ST_OK = 0
ST_TIMEOUT = 1             # a wait on a peer gave up: the Buffer is unusable afterwards
ST_OVERFLOW = 2            # more rows arrived than the output (num_worst_tokens) or buffer holds
ST_BAD_EXPERT = 3          # an expert id outside [-1, num_experts)
ST_BAD_LAYOUT = 4          # layout arrays that disagree with topk_idx / each other
ST_PEER_BAD_INPUT = 5      # another rank's bad input cancelled a collective call
STATUS_RECORD_INTS = 8     # host mirror: status, kernel, rank, peer, detail, detail2, channel, pad

# ---- profiling --------------------------------------------------------------------------------
PROF_SLOTS = 16            # globaltimer checkpoints per block
PROF_END = PROF_SLOTS - 1  # the block's last checkpoint

# ---- test-only chaos mode ------------------------------------------------------------------
CHAOS_MAX_PAUSE_NS = 20000

DEFAULT_TIMEOUT_S = 30.0


def device_constants() -> dict:
    """The constants every kernel compilation receives (``#define NAME value``)."""
    consts = {f"KID_{name.upper()}": kid for kid, name in KERNEL_NAMES.items()}
    consts.update(
        ST_TIMEOUT=ST_TIMEOUT, ST_OVERFLOW=ST_OVERFLOW, ST_BAD_EXPERT=ST_BAD_EXPERT,
        ST_BAD_LAYOUT=ST_BAD_LAYOUT, ST_PEER_BAD_INPUT=ST_PEER_BAD_INPUT,
        FP8_BLOCK=FP8_BLOCK, FP8_MAX=FP8_MAX, FP8_AMAX_FLOOR=FP8_AMAX_FLOOR,
        MAX_NVL_PEERS=MAX_NVL_PEERS, MAX_CHANNELS=MAX_CHANNELS, MAX_RDMA_RANKS=MAX_RDMA_RANKS, HOST_EXPERT=HOST_EXPERT,
        MAX_NORMAL_TOPK=MAX_NORMAL_TOPK, LL_MAX_TOPK=LL_MAX_TOPK, LL_MAX_TOKENS=LL_MAX_TOKENS,
        LL_MAX_SMEM_BYTES=LL_MAX_SMEM_BYTES,
        PROF_SLOTS=PROF_SLOTS, PROF_END=PROF_END, CHAOS_MAX_PAUSE_NS=CHAOS_MAX_PAUSE_NS,
    )
    return consts
