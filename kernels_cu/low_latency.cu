// Low-latency (decode) MoE dispatch and combine: ll_dispatch, ll_combine.
//
// NVLink path: every byte for a peer is stored straight into the peer's symmetric buffer
// through its mapped address (peers[r] != 0). Compiled with LL_RDMA=1 (from
// low_latency_rdma.cu) the same kernels send to peers without a mapping (peers[r] == 0)
// through NVSHMEM puts from a local staging area instead.
//
// Compile-time constants (cupy_ep/geometry.py ll_constants: the shape below and the buffer's
// offsets LL_*, which the geometry computes and the kernels only check):
//   NUM_RANKS R, NUM_EXPERTS E (E % R == 0), HIDDEN H (% 128 == 0), TOPK K (1..LL_MAX_TOPK),
//   MAX_TOKENS M (num_max_dispatch_tokens_per_rank, 1..LL_MAX_TOKENS), USE_FP8, ROUND_SCALE,
//   USE_UE8M0, LL_THREADS (threads per block, multiple of 32, default 512), USE_LOGFMT (combine
//   partial rows as LogFMT-10, logfmt.cuh; default 0: bf16), SHRINK (shrink mode, see "Shrink
//   mode" below; default 0: the kernels have no mask argument and no code of it).
// No limit on R of its own: the receive phase's R + E + E/R ints of shared memory must fit in
// LL_MAX_SMEM_BYTES (static_asserts below say which bound a configuration breaks).
// Every launch of one call must use the same grid size on every rank (<= SM count).
//
// @constants NUM_RANKS=4 NUM_EXPERTS=288 HIDDEN=7168 TOPK=8 MAX_TOKENS=128 USE_FP8=1 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=2 NUM_EXPERTS=16 HIDDEN=2048 TOPK=1 MAX_TOKENS=512 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=3 NUM_EXPERTS=96 HIDDEN=2048 TOPK=9 MAX_TOKENS=64 USE_FP8=1 ROUND_SCALE=1 USE_UE8M0=1
// @constants NUM_RANKS=8 NUM_EXPERTS=256 HIDDEN=7168 TOPK=9 MAX_TOKENS=256 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0 LL_THREADS=1024
// @constants NUM_RANKS=64 NUM_EXPERTS=256 HIDDEN=7168 TOPK=8 MAX_TOKENS=128 USE_FP8=1 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=256 NUM_EXPERTS=1024 HIDDEN=7168 TOPK=8 MAX_TOKENS=128 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=1024 NUM_EXPERTS=2048 HIDDEN=7168 TOPK=8 MAX_TOKENS=128 USE_FP8=1 ROUND_SCALE=1 USE_UE8M0=1
// @constants NUM_RANKS=1024 NUM_EXPERTS=8192 HIDDEN=7168 TOPK=32 MAX_TOKENS=128 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=4 NUM_EXPERTS=288 HIDDEN=7168 TOPK=8 MAX_TOKENS=128 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0 USE_LOGFMT=1
// @constants NUM_RANKS=3 NUM_EXPERTS=96 HIDDEN=1152 TOPK=9 MAX_TOKENS=64 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0 USE_LOGFMT=1 LL_THREADS=1024
// @constants NUM_RANKS=4 NUM_EXPERTS=288 HIDDEN=7168 TOPK=8 MAX_TOKENS=128 USE_FP8=1 ROUND_SCALE=0 USE_UE8M0=0 SHRINK=1
// @constants NUM_RANKS=3 NUM_EXPERTS=96 HIDDEN=1152 TOPK=9 MAX_TOKENS=64 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0 USE_LOGFMT=1 LL_THREADS=1024 SHRINK=1
// @constants NUM_RANKS=1024 NUM_EXPERTS=8192 HIDDEN=7168 TOPK=32 MAX_TOKENS=128 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0 SHRINK=1
//
// ----------------------------------------------------------------------------------------------
// Symmetric buffer (identical offsets on every rank; the host computes the half offsets):
//   control area: u64 signals, per half and kind, [R] each (dispatch, combine-weights,
//     combine-partials). 0 = not arrived. The writer stores value+1 (dispatch: each sending
//     block adds (1 << 20) | its slots) with release/sys ordering after its data; the receiver
//     waits (bounded), reads, and ZEROES it itself once every block of its grid has passed the
//     wait (so no reset pass, graph-safe). Values, and SIG_CANCELLED from a rank whose call was
//     refused (low_latency_cancel.cu; reported here, nothing read from it): ll_signals.cuh.
//   dispatch quarter (one per half), on receiver r:
//     slots [R src][M][SLOT_BYTES]    x (bf16 2H, or fp8 H + scales f32 H/128) + meta
//     meta  int32[1+K]: [0] source token; [1+k] (j << 16 | pos) when expert k of the token is
//           local expert j of r (pos: its index among src's rows for j), else -1.
//     staging (RDMA only): same geometry indexed by destination instead of source.
//   combine quarter (one per half):
//     weights  [R src][WSTRIDE]       f32 [M][K] token owner's weights (SKIP bits: masked slot)
//     partials [R expert rank][M][ROW_BYTES]  partial sums per (token, expert rank): bf16, or
//              LogFMT-10 (USE_LOGFMT: H/128 groups of 164 bytes, logfmt.cuh)
//     staging (RDMA only): weights [R dst][WSTRIDE], partials [R owner][M][H].
// Handle (device arrays the dispatch fills and the combine reads):
//   slot_count [R]                per source, slots received
//   slot_map   [R][M][1+K]        per received slot: the source token, its row per k (or -1)
//   dest_ranks [M][min(K, R)]     per own token, its destination ranks ascending, -1 padded
// ----------------------------------------------------------------------------------------------
// Shrink mode (SHRINK=1, Buffer(enable_shrink=True)): the kernels take `mask`, this rank's int32
// [R] (1 = masked). They neither send to a masked rank (its experts get no token, it gets no
// weights nor signal) nor wait for it, and a peer whose signal has not come by the deadline is
// masked (mask[r] = 1) instead of a timeout being recorded: the launch completes among the
// others. Counts, layouts and sums depend on who arrived, so every block must reach the same
// answer: the outcome of each wait for rank r is decided once per launch by the first thread
// that knows it (an atomicCAS on a scratch word: the signal value seen, or ABSENT) and every
// other thread follows that word (shrink_wait). The launch's last block zeroes the words.
// ----------------------------------------------------------------------------------------------
#include "common.cuh"
#include "logfmt.cuh"
#include "ll_signals.cuh"

#ifndef LL_THREADS
#define LL_THREADS 512
#endif
#ifndef ROUND_SCALE
#define ROUND_SCALE 0
#endif
#ifndef USE_UE8M0
#define USE_UE8M0 0
#endif
#ifndef USE_LOGFMT
#define USE_LOGFMT 0
#endif
#ifndef SHRINK
#define SHRINK 0
#endif

namespace ll {

constexpr int R = NUM_RANKS;
constexpr int E = NUM_EXPERTS;
constexpr int EL = NUM_EXPERTS / NUM_RANKS;
constexpr int H = HIDDEN;
constexpr int K = TOPK;
constexpr int M = MAX_TOKENS;
constexpr int NT = LL_THREADS;
constexpr int NW = NT / 32;
constexpr bool FP8 = USE_FP8 != 0;
constexpr bool ROUND = (ROUND_SCALE != 0) || (USE_UE8M0 != 0);
constexpr bool UE8M0 = USE_UE8M0 != 0;
constexpr bool LOGFMT = USE_LOGFMT != 0;
constexpr int MAX_DESTS = K < R ? K : R;   // destination ranks of one token, at most

__host__ __device__ constexpr int pow2_ceil(int v) { return v <= 1 ? 1 : 2 * pow2_ceil((v + 1) / 2); }
__host__ __device__ constexpr int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

static_assert(R >= 1, "NUM_RANKS must be positive");
static_assert(E % R == 0, "NUM_EXPERTS must be a multiple of NUM_RANKS");
static_assert(FP8_BLOCK == 128, "the FP8 cast gives each 8-lane group of 16 channels one 128-channel block");
static_assert(H % FP8_BLOCK == 0 && H > 0, "HIDDEN must be a positive multiple of 128");
static_assert(K >= 1 && K <= LL_MAX_TOPK && LL_MAX_TOPK <= 32, "TOPK must be in 1..LL_MAX_TOPK (one lane per top-k column)");
static_assert(M >= 1 && M <= LL_MAX_TOKENS && LL_MAX_TOKENS <= 65535, "MAX_TOKENS must be in 1..LL_MAX_TOKENS (16-bit positions)");
static_assert(EL < 32768, "too many local experts");
static_assert(NT % 32 == 0 && NT >= 64 && NT <= 1024, "LL_THREADS must be a multiple of 32 in 64..1024");
static_assert((long long)EL * R * M < 2147483647LL, "E_local * R * M must fit in int32");

// ---- row sizes ----
constexpr int X_BYTES = FP8 ? H : 2 * H;
constexpr int NSCALES = H / FP8_BLOCK;
// a combine partial row: bf16, or LogFMT-10
constexpr long long ROW_BYTES = LOGFMT ? (long long)(H / logfmt::GROUP) * logfmt::GROUP_BYTES : 2LL * H;
// Byte offset of channel ch (a multiple of 8) in a partial row.
__host__ __device__ constexpr long long row_byte_of(int ch) {
    return LOGFMT ? (long long)(ch / logfmt::GROUP) * logfmt::GROUP_BYTES : 2LL * ch;
}

// ---- buffer geometry: computed once, on the host (cupy_ep/geometry.py ll_offsets) ----
// dispatch quarter: slots [R][M][SLOT_BYTES] (x, scales at SCALE_OFF, meta at META_OFF), staging
constexpr int SCALE_OFF = LL_SCALE_OFF;
constexpr int META_OFF = LL_META_OFF;
constexpr int SLOT_BYTES = LL_SLOT_BYTES;
constexpr long long D_RECV_BYTES = LL_D_RECV_BYTES;
constexpr long long D_STAGE_OFF = LL_D_STAGE_OFF;
// combine quarter: weights [R][WSTRIDE], partials [R][M][ROW_BYTES], staging of both
constexpr long long WSTRIDE = LL_WSTRIDE;
constexpr long long C_W_OFF = LL_C_W_OFF;
constexpr long long C_P_OFF = LL_C_P_OFF;
constexpr long long C_RECV_BYTES = LL_C_RECV_BYTES;
constexpr long long C_STAGE_W_OFF = LL_C_STAGE_W_OFF;
constexpr long long C_STAGE_P_OFF = LL_C_STAGE_P_OFF;
// What the kernels rely on: 16-byte aligned areas that hold what they store.
static_assert(SCALE_OFF >= X_BYTES && META_OFF >= SCALE_OFF + (FP8 ? 4 * NSCALES : 0) &&
              SLOT_BYTES >= META_OFF + 4 * (1 + K), "dispatch slot geometry");
static_assert(SCALE_OFF % 16 == 0 && META_OFF % 16 == 0 && SLOT_BYTES % 16 == 0, "16-byte slot areas");
static_assert(D_RECV_BYTES >= (long long)R * M * SLOT_BYTES && D_STAGE_OFF >= D_RECV_BYTES, "dispatch quarter");
static_assert(WSTRIDE >= (long long)M * K * 4 && C_P_OFF >= C_W_OFF + R * WSTRIDE &&
              C_RECV_BYTES >= C_P_OFF + R * M * ROW_BYTES, "combine quarter");
static_assert(C_STAGE_W_OFF >= C_RECV_BYTES && C_STAGE_P_OFF >= C_STAGE_W_OFF + R * WSTRIDE, "combine staging");
static_assert(WSTRIDE % 16 == 0 && C_P_OFF % 16 == 0 && C_STAGE_W_OFF % 16 == 0 && C_STAGE_P_OFF % 16 == 0,
              "16-byte combine areas");

// ---- work decomposition ----
// dispatch send: per token, chunks of 512 channels (fp8: 16 ch per lane) or 256 (bf16: 8 per lane)
constexpr int SEND_CW = FP8 ? 512 : 256;
constexpr int SEND_NCH = (H + SEND_CW - 1) / SEND_CW;
constexpr int SEND_CPW = (SEND_NCH + NW - 1) / NW;   // chunks per warp per token (held in registers)
// dispatch receive: units of RECV_V4 16-byte vectors of one slot's x
constexpr int X_V4 = X_BYTES / 16;
constexpr int RECV_UNROLL = 4;
constexpr int RECV_V4 = 32 * RECV_UNROLL;
constexpr int RECV_UPS = (X_V4 + RECV_V4 - 1) / RECV_V4;    // units per slot
constexpr int META_BATCH = 8;                               // meta loads in flight per thread
// combine: units of COMB_G chunks of 256 channels (8 bf16 per lane)
constexpr int COMB_G = NT > 512 ? 1 : 2;
constexpr int COMB_UW = 256 * COMB_G;
constexpr int COMB_UPR = (H + COMB_UW - 1) / COMB_UW;       // units per row
// loads in flight per batch (registers: 512 threads/block leave 128 per thread, 1024 leave 64)
constexpr int LOADS_MAX = NT > 512 ? 4 : 8;
constexpr int KB = K < LOADS_MAX ? K : LOADS_MAX;                   // top-k rows per batch (combine B)
constexpr int RB = MAX_DESTS < LOADS_MAX ? MAX_DESTS : LOADS_MAX;   // partial rows per batch (combine C)
// (so does (source or rank) * M + slot or token, which the address helpers below rely on)
static_assert((long long)R * M * max3(K, RECV_UPS, COMB_UPR) < 2147483647LL,
              "R * M * max(TOPK, work units per row) must fit in int32");

// Prefix sums over sources: a group of SCAN_LANES lanes scans one row of R entries, each lane a
// run of SCAN_RUN consecutive ones.
constexpr int SCAN_LANES = pow2_ceil(R) < 32 ? pow2_ceil(R) : 32;
constexpr int SCAN_RUN = (R + SCAN_LANES - 1) / SCAN_LANES;
constexpr int SCAN_ROWS = 32 / SCAN_LANES;   // rows per warp

// ---- scratch (device ints, engine-owned, zero between launches) ----
// dispatch scratch: [0,R) slot counters per destination; [R, R+E) per (dst, local expert)
// counters; then send_done, recv_done.
constexpr int SD_SLOT = 0;
constexpr int SD_CNT = R;
constexpr int SD_SEND_DONE = R + E;
constexpr int SD_RECV_DONE = R + E + 1;
// combine scratch: b_done, c_done
constexpr int SC_B_DONE = 0;
constexpr int SC_C_DONE = 1;
#if SHRINK
// shrink mode: after those, the decision words of the waits (shrink_wait): dispatch [R] per
// source; combine [R] per source's weights, then [R] per expert rank's partials. (Enums: no
// device variables, which would change the module of SHRINK=0.)
enum : int { SD_DECIDE = R + E + 2, SC_W_DECIDE = 2, SC_P_DECIDE = 2 + R, ABSENT = -1 };
#endif

constexpr unsigned FULL = 0xffffffffu;
constexpr u32 SKIP_BITS = 0xffc0deadu;   // a NaN pattern: "weight slot masked out by topk_idx == -1"

// ---- shared memory of ll_dispatch: the send phase's, then the receive phase's ----
struct SendSmem {
    u64 peer[R];            // every rank's buffer base (0: reached through NVSHMEM)
    int sent[R];            // slots this block wrote per destination
    int dest[MAX_DESTS];        // the current token's destination ranks, ascending
    char* slot_at[MAX_DESTS];   // where this rank writes the token's slot for each (dispatch_slot)
#if LL_RDMA
    int slot[MAX_DESTS];        // the slot itself, which the put for an RDMA destination targets
#endif
#if SHRINK
    int masked[R];          // the mask at the launch's start: what the send phase skips
#endif
    int ndest;
};
struct RecvSmem {
    int pfx[R + 1];   // slots per source, then their exclusive prefix (pfx[R]: all slots)
    int base[E];      // [EL][R] rows per (local expert, source), then where they start in its rows
    int tot[EL];      // rows per local expert
};
// dispatch_send ends with a block barrier (last_block_done), so the receive phase may reuse it.
union DispatchSmem {
    SendSmem send;
    RecvSmem recv;
};
static_assert(sizeof(DispatchSmem) <= LL_MAX_SMEM_BYTES,
              "shared memory: the receive phase keeps R + E + E/R ints, the send phase 12 (shrink: 16) bytes per rank");

// ------------------------------------------------------------------------------------------
// Addresses
// ------------------------------------------------------------------------------------------
// Offsets inside a dispatch quarter: slot sl of source src's rows; its staging copy for dst.
__device__ __forceinline__ long long recv_slot_off(int src, int sl) { return (long long)(src * M + sl) * SLOT_BYTES; }
__device__ __forceinline__ long long stage_slot_off(int dst, int sl) { return D_STAGE_OFF + recv_slot_off(dst, sl); }

// Offsets inside a combine quarter: the weights from src (staged for dst); the partial row of
// token t from expert rank r (staged for owner).
__device__ __forceinline__ long long weights_off(int src) { return C_W_OFF + src * WSTRIDE; }
__device__ __forceinline__ long long stage_weights_off(int dst) { return C_STAGE_W_OFF + dst * WSTRIDE; }
__device__ __forceinline__ long long partial_off(int r, int t) { return C_P_OFF + (long long)(r * M + t) * ROW_BYTES; }
__device__ __forceinline__ long long stage_partial_off(int owner, int t) {
    return C_STAGE_P_OFF + (long long)(owner * M + t) * ROW_BYTES;
}

// Index of the handle's slot_map entry of received slot i of source s: the token, then its row per
// top-k column.
__device__ __forceinline__ long long slot_map_off(int s, int i) { return (long long)(s * M + i) * (1 + K); }

// Where this rank writes: straight into the peer's quarter (peer != 0) or, RDMA build, into the
// local staging copy that a put then sends. Slot sl of its rows for destination d:
__device__ __forceinline__ char* dispatch_slot(u64 peer, char* own_q, long long data_off, int d, int rank, int sl) {
#if LL_RDMA
    if (peer == 0) return own_q + stage_slot_off(d, sl);
#endif
    return sym_at(peer, data_off) + recv_slot_off(rank, sl);
}
// its top-k weights for rank d:
__device__ __forceinline__ char* weights_dst(u64 peer, char* own_q, long long data_off, int d, int rank) {
#if LL_RDMA
    if (peer == 0) return own_q + stage_weights_off(d);
#endif
    return sym_at(peer, data_off) + weights_off(rank);
}
// its partial row of token t for the token's owner s:
__device__ __forceinline__ char* partial_dst(u64 peer, char* own_q, long long data_off, int s, int rank, int t) {
#if LL_RDMA
    if (peer == 0) return own_q + stage_partial_off(s, t);
#endif
    return sym_at(peer, data_off) + partial_off(rank, t);
}

// ------------------------------------------------------------------------------------------
// Signals. The caller has fenced (system scope) the data a signal publishes.
// ------------------------------------------------------------------------------------------
// Adds v to this rank's word of rank d's signal array at sig_off. An RDMA destination gets
// per-block adds only with SIGNAL_AMO=1; otherwise the send phase's last block puts the total
// (signal_rdma_totals).
__device__ __forceinline__ void signal_add(u64 peer, u64 own, long long sig_off, int d, int rank, int v) {
#if LL_RDMA
    if (peer == 0) {
#if SIGNAL_AMO
        nvshmemx_signal_op((uint64_t*)signal_at(own, sig_off, rank), (uint64_t)v, NVSHMEM_SIGNAL_ADD, d);
#endif
        return;
    }
#endif
    red_add_release_sys((int*)signal_at(peer, sig_off, rank), v);
}

// After a wait saw a signal: the data it guards is visible (RDMA: also what NVSHMEM delivered).
__device__ __forceinline__ void signal_acquire() {
#if LL_RDMA
    xport::signal_acquire();
#endif
}

// Every block has passed its waits on the signals at sig_off: zero them for the next use of
// this half. (Last block only.)
__device__ __forceinline__ void zero_signals(u64 own, long long sig_off) {
    for (int r = threadIdx.x; r < R; r += NT) {
        chaos_pause();
        st_relaxed_sys_u64(signal_at(own, sig_off, r), 0ull);
    }
}

// Receive-wait statistics (wait_stats != null): block 0 adds to wait_stats[r] the nanoseconds
// (%globaltimer) from the start of its wait (t0) until rank r's signal was seen. Atomic: the
// send and receive kernels of a hook call, and calls on two streams, may add to one array.
__device__ __forceinline__ void add_wait_ns(i64* wait_stats, int r, u64 t0) {
    if (wait_stats != nullptr && blockIdx.x == 0)
        atomicAdd((unsigned long long*)(wait_stats + r), (unsigned long long)(global_timer_ns() - t0));
}

// Waits (bounded) until every rank's word of the signal array at sig_off is nonzero. The same
// answer in every thread; all threads must call it.
__device__ __forceinline__ bool wait_all_nonzero(u64 own, long long sig_off, const WaitCtx& w, i64* wait_stats) {
    const u64 t0 = global_timer_ns();
    bool ok = true;
    for (int r = threadIdx.x; r < R && ok; r += NT) {
        int v;
        ok = wait_nonzero_sys((const int*)signal_at(own, sig_off, r), &v, w, r);
        if (ok) add_wait_ns(wait_stats, r, t0);
    }
    if (ok) signal_acquire();
    return !__syncthreads_or(!ok);
}

#if SHRINK
// Shrink mode: waits until rank r's signal word `sig` satisfies arrived(v), rank r is masked,
// or the deadline passes, and returns the grid's decision for this wait (*decide): the value
// some thread saw (> 0), or ABSENT (then mask[r] = 1, set by the deciding thread). Never
// records a timeout. The fences make a decision a release/acquire pair, so that a thread that
// follows another's "arrived" also sees the data that thread's acquire of the signal made visible.
template <class Arrived>
__device__ __forceinline__ int shrink_wait(const int* sig, int* decide, int* mask, int r, const WaitCtx& w,
                                           Arrived arrived) {
    unsigned spins = 0;
    int mine = ABSENT;
    for (;;) {
        const int d = ld_acquire_gpu(decide);
        if (d != 0) return d;
        if (*(volatile int*)(mask + r) != 0) break;
        const int v = ld_acquire_sys(sig);
        if (arrived(v)) {
            mine = v;
            break;
        }
        if ((++spins & 1023u) == 0 && global_timer_ns() > w.deadline) break;
    }
    fence_gpu();
    const int old = atomicCAS(decide, 0, mine);
    fence_gpu();
    if (old != 0) return old;
    if (mine == ABSENT) atomicExch(mask + r, 1);
    return mine;
}

// Shrink mode's wait_all_nonzero: every rank's word of the signal array at sig_off, decided in
// decide[R]; s_live[r] (shared, may be null) = whether r arrived. All threads must call it.
__device__ __forceinline__ void shrink_wait_all(u64 own, long long sig_off, const WaitCtx& w, i64* wait_stats,
                                                int* mask, int* decide, int* s_live) {
    const u64 t0 = global_timer_ns();
    for (int r = threadIdx.x; r < R; r += NT) {
        const bool arrived = shrink_wait((const int*)signal_at(own, sig_off, r), decide + r, mask, r, w,
                                         [](int v) { return v != 0; }) != ABSENT;
        if (arrived) add_wait_ns(wait_stats, r, t0);
        if (s_live != nullptr) s_live[r] = arrived;
    }
    signal_acquire();
    __syncthreads();
}

// The launch's last block: the decision words for the next launch.
__device__ __forceinline__ void zero_decisions(int* decide) {
    for (int r = threadIdx.x; r < R; r += NT) decide[r] = 0;
}
#endif

// ------------------------------------------------------------------------------------------
// Prefix sums over sources
// ------------------------------------------------------------------------------------------
// The source of received slot g: the last s with pfx[s] <= g (pfx: exclusive prefix of the
// slots per source, g < pfx[R]).
__device__ __forceinline__ int source_of(const int* pfx, int g) {
    int s = 0;
#pragma unroll
    for (int step = pow2_ceil(R) / 2; step > 0; step >>= 1)
        if (s + step < R && pfx[s + step] <= g) s += step;
    return s;
}

// In-place exclusive prefix sums of `rows` rows of R ints in shared memory (row j: a[j*R] ..
// a[j*R + R-1]); row totals go to tot[j] and, with `layout`, (begin << 32 | count) of every
// entry to layout[j*R + s]. The caller synchronises before and after.
__device__ __forceinline__ void scan_rows(int* a, int* tot, int rows, i64* layout) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gl = lane % SCAN_LANES, s0 = gl * SCAN_RUN;
    for (int j0 = warp * SCAN_ROWS; j0 < rows; j0 += NW * SCAN_ROWS) {
        const int j = j0 + lane / SCAN_LANES;
        const bool live = j < rows;
        int* row = a + j * R;
        int run = 0;
#pragma unroll
        for (int q = 0; q < SCAN_RUN; ++q)
            if (live && s0 + q < R) run += row[s0 + q];
        int incl = run;
#pragma unroll
        for (int o = 1; o < SCAN_LANES; o <<= 1) {
            const int v = __shfl_up_sync(FULL, incl, o, SCAN_LANES);
            if (gl >= o) incl += v;
        }
        int begin = incl - run;
#pragma unroll
        for (int q = 0; q < SCAN_RUN; ++q) {
            const int s = s0 + q;
            if (!live || s >= R) continue;
            const int c = row[s];
            row[s] = begin;
            if (layout != nullptr) layout[(long long)j * R + s] = ((i64)begin << 32) | (i64)(u32)c;
            begin += c;
        }
        if (live && gl == SCAN_LANES - 1) tot[j] = incl;
    }
}

// ------------------------------------------------------------------------------------------
// Dispatch, send phase
// ------------------------------------------------------------------------------------------
// Max over the 8 lanes that share a 128-channel block (lanes 8i .. 8i+7).
__device__ __forceinline__ float block128_max(float v) {
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

// FP8 cast of the lane's channels [ch, ch + 16) of a bf16 row into 16 e4m3 bytes; the scale of
// their 128-channel block goes to *scale. Lanes past H (whole 8-lane groups) produce zeros.
__device__ __forceinline__ int4v cast_fp8_16(const u16* row, int ch, float* scale) {
    int4v a = {0, 0, 0, 0}, b = {0, 0, 0, 0};
    if (ch < H) {
        a = ld_nc_v4(row + ch);
        b = ld_nc_v4(row + ch + 8);
    }
    float f[16];
    bf16x8_to_f32(a, f);
    bf16x8_to_f32(b, f + 8);
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(f[i]));
    const float s = fp8_scale<ROUND>(block128_max(amax));
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 lo = float2_to_e4m3x2(__fdiv_rn(f[4 * i], s), __fdiv_rn(f[4 * i + 1], s));
        const u32 hi = float2_to_e4m3x2(__fdiv_rn(f[4 * i + 2], s), __fdiv_rn(f[4 * i + 3], s));
        w[i] = lo | (hi << 16);
    }
    *scale = s;
    return int4v{(int)w[0], (int)w[1], (int)w[2], (int)w[3]};
}

// Every warp loads its chunks (warp + c * NW) of token t and converts them: e4m3 bytes and
// their block scales, or the bf16 as is. Independent of the routing.
__device__ __forceinline__ void load_token(const u16* __restrict__ x, int t, int4v (&pay)[SEND_CPW],
                                           float (&psc)[SEND_CPW]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u16* row = x + (long long)t * H;
#pragma unroll
    for (int c = 0; c < SEND_CPW; ++c) {
        const int chunk = warp + c * NW;
        pay[c] = int4v{0, 0, 0, 0};
        psc[c] = 0.f;
        if (chunk < SEND_NCH) {
            if constexpr (FP8) {
                pay[c] = cast_fp8_16(row, chunk * SEND_CW + lane * 16, &psc[c]);
            } else {
                const int ch = chunk * SEND_CW + lane * 8;
                if (ch < H) pay[c] = ld_nc_v4(row + ch);
            }
        }
    }
}

// Warp 0 routes token t: its destination ranks (the distinct ranks of its valid experts,
// ascending) with the slot each gives it go to shared memory and the handle, and every
// destination slot gets the token's meta.
__device__ __forceinline__ void route_token(int t, const i64* __restrict__ topk_idx, int* slot_cnt, int* exp_cnt,
                                            int* __restrict__ h_dest_ranks, SendSmem& s, char* own_q,
                                            long long data_off, int rank) {
    const int lane = threadIdx.x & 31;
    int e = -1;
    if (lane < K) {
        const i64 v = topk_idx[(long long)t * K + lane];
        e = (v >= 0 && v < E) ? (int)v : -1;
#if SHRINK
        if (e >= 0 && s.masked[e / EL]) e = -1;   // a masked rank's experts get no token
#endif
    }
    const int r = e >= 0 ? e / EL : -1;
    const unsigned lanes_below = (1u << lane) - 1;
    const int first_k = __ffs(__match_any_sync(FULL, e)) - 1;   // first column with this expert
    const unsigned same_r = __match_any_sync(FULL, r);   // every lane: a full-mask primitive
    const bool new_rank = r >= 0 && (same_r & lanes_below) == 0;
    const unsigned new_ranks = __ballot_sync(FULL, new_rank);
    const int ndest = __popc(new_ranks);
    int idx = 0;   // r's place among the token's destination ranks
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int rk = __shfl_sync(FULL, r, k);
        idx += ((new_ranks >> k) & 1u) && rk < r ? 1 : 0;
    }
    int pos = 0;
    if (e >= 0 && first_k == lane) pos = atomicAdd(exp_cnt + e, 1);
    if (new_rank) {
        const int slot = atomicAdd(slot_cnt + r, 1);
        s.dest[idx] = r;
        s.slot_at[idx] = dispatch_slot(s.peer[r], own_q, data_off, r, rank, slot);
#if LL_RDMA
        s.slot[idx] = slot;
#endif
        ++s.sent[r];
    }
    pos = __shfl_sync(FULL, pos, first_k);
    int* const dest_row = h_dest_ranks + (long long)t * MAX_DESTS;
    if (new_rank) dest_row[idx] = r;
    if (lane >= ndest && lane < MAX_DESTS) dest_row[lane] = -1;
    if (lane == 0) s.ndest = ndest;
    const int meta_val = e >= 0 ? (((e - r * EL) << 16) | pos) : -1;
    __syncwarp();
    for (int i = 0; i < ndest; ++i) {
        int* meta = (int*)(s.slot_at[i] + META_OFF);
        if (lane < K) st_i32(meta + 1 + lane, r == s.dest[i] ? meta_val : -1);
        if (lane == 0) st_i32(meta, t);
    }
}

// Every warp stores its chunks of the token into each destination's slot.
__device__ __forceinline__ void store_payload(const SendSmem& s, const int4v (&pay)[SEND_CPW],
                                              const float (&psc)[SEND_CPW]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int ndest = s.ndest;
    for (int i = 0; i < ndest; ++i) {
        char* const slotp = s.slot_at[i];
#pragma unroll
        for (int c = 0; c < SEND_CPW; ++c) {
            const int chunk = warp + c * NW;
            if (chunk >= SEND_NCH) continue;
            if constexpr (FP8) {
                const int ch = chunk * SEND_CW + lane * 16;
                if (ch < H) {
                    st_v4(slotp + ch, pay[c]);
                    if ((lane & 7) == 0) *(float*)(slotp + SCALE_OFF + (ch / FP8_BLOCK) * 4) = psc[c];
                }
            } else {
                const int ch = chunk * SEND_CW + lane * 8;
                if (ch < H) st_v4(slotp + 2 * ch, pay[c]);
            }
        }
    }
}

#if LL_RDMA
// Warp 0, after the block's stores of the token: puts the staged slots of its RDMA destinations.
__device__ __forceinline__ void put_staged_slots(const SendSmem& s, u64 own, long long data_off, int rank) {
    const int lane = threadIdx.x & 31;
    const int ndest = s.ndest;
    bool any = false;
    for (int i = 0; i < ndest; ++i) any |= s.peer[s.dest[i]] == 0;
    if (!any) return;
    if (lane == 0) fence_sys();   // staging writes of all warps (bar.sync before) first
    __syncwarp();
    for (int i = 0; i < ndest; ++i) {
        const int d = s.dest[i];
        if (s.peer[d] != 0) continue;
        nvshmemx_putmem_nbi_warp(sym_at(own, data_off + recv_slot_off(rank, s.slot[i])), s.slot_at[i], SLOT_BYTES, d);
    }
}
#endif

// Every block signals every destination itself: (1 << SIG_BLOCK_SHIFT) | slots it wrote there,
// added with release semantics after a system fence (its writes, ordered by bar.sync, first).
__device__ __forceinline__ void signal_destinations(const SendSmem& s, u64 own, long long sig_off, int rank) {
    __syncthreads();
    if (threadIdx.x >= R) return;
    fence_sys();
    for (int d = threadIdx.x; d < R; d += NT) {
#if SHRINK
        if (s.masked[d]) continue;
#endif
        chaos_pause();
        signal_add(s.peer[d], own, sig_off, d, rank, (1 << SIG_BLOCK_SHIFT) | s.sent[d]);
    }
}

// Send phase: every block takes tokens blockIdx.x, +gridDim.x, ...; then signals every
// destination (shrink mode: every destination unmasked when the block started); the last block
// zeroes the slot and position counters for the next launch.
__device__ __forceinline__ void dispatch_send(const u16* __restrict__ x, const i64* __restrict__ topk_idx,
                                              int num_tokens, const u64* __restrict__ peers, long long sig_off,
                                              long long data_off, int* __restrict__ scratch,
                                              int* __restrict__ h_dest_ranks, u64* prof, int rank, u64 own,
                                              SendSmem& s, int* s_flag, const int* mask) {
    int* const slot_cnt = scratch + SD_SLOT;
    int* const exp_cnt = scratch + SD_CNT;
    char* const own_q = sym_at(own, data_off);
    for (int d = threadIdx.x; d < R; d += NT) {
        s.peer[d] = peers[d];
        s.sent[d] = 0;
#if SHRINK
        s.masked[d] = *(const volatile int*)(mask + d);
#endif
    }
    __syncthreads();
    for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        int4v pay[SEND_CPW];
        float psc[SEND_CPW];
        load_token(x, t, pay, psc);
        if (threadIdx.x < 32) route_token(t, topk_idx, slot_cnt, exp_cnt, h_dest_ranks, s, own_q, data_off, rank);
        __syncthreads();
        store_payload(s, pay, psc);
        __syncthreads();   // s.dest / s.slot are reused by the next token
#if LL_RDMA
        if (threadIdx.x < 32) put_staged_slots(s, own, data_off, rank);
        __syncthreads();
#endif
        chaos_pause();
    }
#if LL_RDMA
    nvshmem_quiet();   // this block's puts are delivered before it signals
#endif
    prof_mark(prof, 1);
    signal_destinations(s, own, sig_off, rank);
    prof_mark(prof, 2);
    if (last_block_done<false>(scratch + SD_SEND_DONE, s_flag)) {
        for (int i = threadIdx.x; i < E; i += NT) atomicExch(exp_cnt + i, 0);
        for (int d = threadIdx.x; d < R; d += NT) {
            const int total = atomicExch(slot_cnt + d, 0);   // every block's slots for d
#if LL_RDMA && !SIGNAL_AMO
            // every block's puts are complete (its quiet precedes its count in last_block_done)
#if SHRINK
            if (s.masked[d]) continue;
#endif
            if (s.peer[d] == 0) xport::signal_put(signal_at(own, sig_off, rank), (u64)(((int)gridDim.x << SIG_BLOCK_SHIFT) | total), d);
#else
            (void)total;
#endif
        }
#if LL_RDMA && !SIGNAL_AMO
        nvshmem_quiet();
#endif
    }
}

// ------------------------------------------------------------------------------------------
// Dispatch, receive phase
// ------------------------------------------------------------------------------------------
// Waits until every block of every source has signalled (same grid size on every rank); the
// slots of each source go to pfx[s]. The same answer in every thread; all threads must call it.
// Shrink mode: a masked or absent source has sent nothing (pfx[s] = 0); always true.
__device__ __forceinline__ bool wait_sources(int* pfx, u64 own, long long sig_off, const WaitCtx& w,
                                             i64* wait_stats, int* mask, int* decide) {
    const u64 t0 = global_timer_ns();
    bool ok = true;
    for (int s = threadIdx.x; s < R && ok; s += NT) {
        const int* sig = (const int*)signal_at(own, sig_off, s);
#if SHRINK
        const int all_blocks = (int)gridDim.x << SIG_BLOCK_SHIFT;
        const int v = shrink_wait(sig, decide + s, mask, s, w, [all_blocks](int v) { return v >= all_blocks; });
        pfx[s] = v == ABSENT ? 0 : dispatch_slots(v, w, s);
        if (v != ABSENT) add_wait_ns(wait_stats, s, t0);
#else
        ok = wait_geq_sys(sig, (int)gridDim.x << SIG_BLOCK_SHIFT, w, s);
        if (ok) {
            pfx[s] = dispatch_slots(ld_acquire_sys(sig), w, s);
            add_wait_ns(wait_stats, s, t0);
        }
#endif
    }
    if (ok) signal_acquire();
    return !__syncthreads_or(!ok);
}

// count(j, s) = 1 + the largest position any slot of s gives for local expert j, into the
// zeroed base[j * R + s]. The loads of META_BATCH entries are issued before any of their
// atomics (one latency per batch).
__device__ __forceinline__ void count_rows(const int* pfx, const char* own_q, int* base) {
    const int num_entries = pfx[R] * K;
    for (int first = 0; first < num_entries; first += NT * META_BATCH) {
        int mv[META_BATCH], src[META_BATCH];
#pragma unroll
        for (int b = 0; b < META_BATCH; ++b) {
            const int idx = first + b * NT + threadIdx.x;
            mv[b] = -1;
            src[b] = 0;
            if (idx < num_entries) {
                const int g = idx / K, k = idx - g * K;
                const int s = source_of(pfx, g);
                src[b] = s;
                mv[b] = ld_cg_i32(own_q + recv_slot_off(s, g - pfx[s]) + META_OFF + 4 * (1 + k));
            }
        }
#pragma unroll
        for (int b = 0; b < META_BATCH; ++b)
            if (mv[b] >= 0) atomicMax(&base[(mv[b] >> 16) * R + src[b]], (mv[b] & 0xffff) + 1);
    }
}

// Block 0 publishes recv_count, the stats and the handle's slot counts; every block writes
// src_info = -1 into its share of the rows past recv_count[j].
__device__ __forceinline__ void publish_counts(const RecvSmem& s, int* __restrict__ recv_count,
                                               int* __restrict__ stats, int* __restrict__ h_slot_count,
                                               int* __restrict__ recv_src_info) {
    if (blockIdx.x == 0) {
        for (int j = threadIdx.x; j < EL; j += NT) {
            recv_count[j] = s.tot[j];
            if (stats != nullptr) atomicAdd(stats + j, s.tot[j]);
        }
        for (int src = threadIdx.x; src < R; src += NT) h_slot_count[src] = s.pfx[src + 1] - s.pfx[src];
    }
    for (int idx = blockIdx.x * NT + threadIdx.x; idx < EL * R * M; idx += gridDim.x * NT) {
        const int j = idx / (R * M), p = idx - j * (R * M);
        if (p >= s.tot[j]) recv_src_info[idx] = -1;
    }
}

// The scales of a received slot to each row of rows[k] with bit k of umask (UE8M0: exponents).
// All of the lane's loads are issued first; then one row at a time keeps one address live.
__device__ __forceinline__ void copy_scales(const char* slotp, const int (&rows)[K], unsigned umask,
                                            void* __restrict__ recv_scales) {
    constexpr int PER_LANE = (NSCALES + 31) / 32;
    const int lane = threadIdx.x & 31;
    float sc[PER_LANE];
#pragma unroll
    for (int p = 0; p < PER_LANE; ++p) {
        const int q = lane + 32 * p;
        sc[p] = q < NSCALES ? __int_as_float(ld_cg_i32(slotp + SCALE_OFF + 4 * q)) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
        if (!((umask >> k) & 1u)) continue;
#pragma unroll
        for (int p = 0; p < PER_LANE; ++p) {
            const int q = lane + 32 * p;
            if (q >= NSCALES) continue;
            if constexpr (UE8M0)
                ((u8*)recv_scales)[(long long)rows[k] * NSCALES + q] = (u8)((__float_as_uint(sc[p]) >> 23) & 0xffu);
            else
                ((float*)recv_scales)[(long long)rows[k] * NSCALES + q] = sc[p];
        }
    }
}

// One unit of the row copy: vectors [part * RECV_V4, +RECV_V4) of received slot i of source s
// go to the row of each distinct local expert that selected the token (rows: j * R * M +
// base(j, s) + pos). The unit with part 0 also writes the slot's handle entry, src_info and
// scales.
__device__ __forceinline__ void copy_unit(const RecvSmem& sm, const char* own_q, int s, int i, int part,
                                          void* __restrict__ recv_x, void* __restrict__ recv_scales,
                                          int* __restrict__ recv_src_info, int* __restrict__ h_slot_map) {
    const int lane = threadIdx.x & 31;
    const char* slotp = own_q + recv_slot_off(s, i);
    const int* meta = (const int*)(slotp + META_OFF);
    const int t = ld_cg_i32(meta);
    const int mv = lane < K ? ld_cg_i32(meta + 1 + lane) : -1;
    int row = -1;
    if (mv >= 0) {
        const int j = mv >> 16, pos = mv & 0xffff;
        row = j * (R * M) + sm.base[j * R + s] + pos;
    }
    bool uniq = mv >= 0;
#pragma unroll
    for (int k2 = 0; k2 < K; ++k2) {
        const int m2 = __shfl_sync(FULL, mv, k2);
        if (k2 < lane && m2 == mv) uniq = false;
    }
    const unsigned umask = __ballot_sync(FULL, uniq);
    int rows[K];
#pragma unroll
    for (int k = 0; k < K; ++k) rows[k] = __shfl_sync(FULL, row, k);

    if (part == 0) {
        int* hm = h_slot_map + slot_map_off(s, i);
        if (lane < K) hm[1 + lane] = row;
        if (lane == 0) hm[0] = t;
        if (uniq) recv_src_info[row] = t;
        if constexpr (FP8) copy_scales(slotp, rows, umask, recv_scales);
    }
    int4v v[RECV_UNROLL];
#pragma unroll
    for (int q = 0; q < RECV_UNROLL; ++q) {
        const int idx = part * RECV_V4 + q * 32 + lane;
        if (idx < X_V4) v[q] = ld_cg_v4(slotp + 16LL * idx);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
        if (!((umask >> k) & 1u)) continue;
        char* dst = (char*)recv_x + (long long)rows[k] * X_BYTES;
#pragma unroll
        for (int q = 0; q < RECV_UNROLL; ++q) {
            const int idx = part * RECV_V4 + q * 32 + lane;
            if (idx < X_V4) st_v4(dst + 16LL * idx, v[q]);
        }
    }
}

// Receive phase: waits for every source, computes the row bases per (local expert, source)
// from the slot metas, fills the handle and places every received slot into the masked layout;
// the last block zeroes the signals. False when a wait failed.
__device__ __forceinline__ bool dispatch_recv(u64 own, long long sig_off, long long data_off, int* __restrict__ scratch,
                                              void* __restrict__ recv_x, void* __restrict__ recv_scales,
                                              int* __restrict__ recv_src_info, i64* __restrict__ recv_layout,
                                              int* __restrict__ recv_count, int* __restrict__ stats,
                                              i64* __restrict__ wait_stats, int* __restrict__ h_slot_count,
                                              int* __restrict__ h_slot_map, u64* prof, const WaitCtx& w, RecvSmem& s,
                                              int* s_flag, int* mask) {
    const int warp = threadIdx.x >> 5;
    const char* own_q = sym_at(own, data_off);
    for (int i = threadIdx.x; i < E; i += NT) s.base[i] = 0;
#if SHRINK
    int* const decide = scratch + SD_DECIDE;
#else
    int* const decide = nullptr;
#endif
    if (!wait_sources(s.pfx, own, sig_off, w, wait_stats, mask, decide))
        return false;   // the error is recorded, the Buffer is unusable
    prof_mark(prof, 3);
    scan_rows(s.pfx, s.pfx + R, 1, nullptr);
    __syncthreads();
    count_rows(s.pfx, own_q, s.base);
    __syncthreads();
    scan_rows(s.base, s.tot, EL, blockIdx.x == 0 ? recv_layout : nullptr);
    __syncthreads();
    publish_counts(s, recv_count, stats, h_slot_count, recv_src_info);
    prof_mark(prof, 4);
    const int total_units = s.pfx[R] * RECV_UPS;
    for (int u = blockIdx.x * NW + warp; u < total_units; u += gridDim.x * NW) {
        const int g = u / RECV_UPS, part = u - g * RECV_UPS;
        const int src = source_of(s.pfx, g);
        copy_unit(s, own_q, src, g - s.pfx[src], part, recv_x, recv_scales, recv_src_info, h_slot_map);
    }
    prof_mark(prof, 5);
    if (last_block_done<false>(scratch + SD_RECV_DONE, s_flag)) {
        zero_signals(own, sig_off);
#if SHRINK
        zero_decisions(decide);
#endif
    }
    return true;
}

// ------------------------------------------------------------------------------------------
// Combine
// ------------------------------------------------------------------------------------------
// A) This rank's top-k weights to every rank (columns with no valid expert as SKIP_BITS), each
// followed by its signal (tokens + 1). Blocks take destinations blockIdx.x, +gridDim.x, ...
// Shrink mode: not to the ranks masked at the launch's start (s_live[d] == 0).
__device__ __forceinline__ void send_weights(const i64* __restrict__ topk_idx, const float* __restrict__ topk_weights,
                                             int num_tokens, const u64* s_peer, u64 own, char* own_q,
                                             long long wsig_off, long long data_off, int rank, const int* s_live) {
    for (int d = blockIdx.x; d < R; d += gridDim.x) {
#if SHRINK
        if (!s_live[d]) continue;
#endif
        float* dst = (float*)weights_dst(s_peer[d], own_q, data_off, d, rank);
        for (int idx = threadIdx.x; idx < num_tokens * K; idx += NT) {
            const i64 e = topk_idx[idx];
            const float w = topk_weights[idx];
            dst[idx] = (e >= 0 && e < E) ? w : __uint_as_float(SKIP_BITS);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            fence_sys();
            chaos_pause();
#if LL_RDMA
            if (s_peer[d] == 0) {
#if SIGNAL_AMO
                nvshmem_putmem_signal_nbi(sym_at(own, data_off + weights_off(rank)),
                                          sym_at(own, data_off + stage_weights_off(d)), (size_t)num_tokens * K * 4,
                                          (uint64_t*)signal_at(own, wsig_off, rank), (uint64_t)(num_tokens + 1),
                                          NVSHMEM_SIGNAL_SET, d);
#else
                nvshmem_putmem_nbi(sym_at(own, data_off + weights_off(rank)),
                                   sym_at(own, data_off + stage_weights_off(d)), (size_t)num_tokens * K * 4, d);
                xport::signal_put(signal_at(own, wsig_off, rank), (u64)(num_tokens + 1), d);
#endif
                nvshmem_quiet();
            } else
#endif
                st_release_sys((int*)signal_at(s_peer[d], wsig_off, rank), num_tokens + 1);
        }
    }
}

__device__ __forceinline__ void zero_acc(float (&acc)[COMB_G][8]) {
#pragma unroll
    for (int gg = 0; gg < COMB_G; ++gg)
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[gg][q] = 0.f;
}

// B, one unit: channels [cu * COMB_UW, +COMB_UW) of a received slot's partial row: over its
// top-k columns that chose one of this rank's experts, the sum of that expert's output row (x)
// times the owner's weight of the column.
__device__ __forceinline__ void weighted_sum_unit(const u16* __restrict__ x, const int* hm, const float* wrow, int cu,
                                                  float (&acc)[COMB_G][8]) {
    const int lane = threadIdx.x & 31;
    zero_acc(acc);
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += KB) {
        int4v v[KB][COMB_G];
        int rowk[KB];
        float wk[KB];
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
            const int k = k0 + kk;
            rowk[kk] = -1;
            wk[kk] = 0.f;
            if (k < K) {
                const int rw = hm[1 + k];
                const int wb = ld_cg_i32(wrow + k);
                if (rw >= 0 && (u32)wb != SKIP_BITS) {
                    rowk[kk] = rw;
                    wk[kk] = __int_as_float(wb);
                }
            }
#pragma unroll
            for (int gg = 0; gg < COMB_G; ++gg) {
                const int ch = (cu * COMB_G + gg) * 256 + lane * 8;
                v[kk][gg] = int4v{0, 0, 0, 0};
                if (rowk[kk] >= 0 && ch < H) v[kk][gg] = ld_nc_v4(x + (long long)rowk[kk] * H + ch);
            }
        }
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
            if (rowk[kk] < 0) continue;
#pragma unroll
            for (int gg = 0; gg < COMB_G; ++gg) {
                float f[8];
                bf16x8_to_f32(v[kk][gg], f);
#pragma unroll
                for (int q = 0; q < 8; ++q)   // LogFMT: unfused, as the reference computes it (bit-exact)
                    acc[gg][q] = LOGFMT ? __fadd_rn(acc[gg][q], __fmul_rn(wk[kk], f[q]))
                                        : fmaf(wk[kk], f[q], acc[gg][q]);
            }
        }
    }
}

// B) As expert rank: every received slot's weighted sum becomes one bf16 partial row in the
// token owner's buffer. A warp's units run through the sources in order, so it waits for a
// source's weights once, before its first unit from that source. False when a wait failed.
// Shrink mode: the units of a source whose weights did not come (decided in decide[s]) are skipped.
__device__ __forceinline__ bool reduce_partials(const u16* __restrict__ x, const u64* s_peer, const int* s_pfx,
                                                const int* __restrict__ h_slot_map, u64 own, char* own_q,
                                                long long wsig_off, long long data_off, int rank, const WaitCtx& w,
                                                int* s_fail, int* mask, int* decide) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int waited = -1;   // the last source whose weights this warp has acquired
#if SHRINK
    int waited_ok = 0;   // whether they came
#endif
    const int total_units = s_pfx[R] * COMB_UPR;
    for (int u = blockIdx.x * NW + warp; u < total_units; u += gridDim.x * NW) {
        const int g = u / COMB_UPR, cu = u - g * COMB_UPR;
        const int s = source_of(s_pfx, g);
        const int i = g - s_pfx[s];
        if (s != waited) {
            int ok = 1, v;
            if (lane == 0) {
#if SHRINK
                ok = shrink_wait((const int*)signal_at(own, wsig_off, s), decide + s, mask, s, w,
                                 [](int v) { return v != 0; }) != ABSENT;
                (void)v;
#else
                ok = wait_nonzero_sys((const int*)signal_at(own, wsig_off, s), &v, w, s) ? 1 : 0;
#endif
                if (ok) signal_acquire();
            }
            ok = __shfl_sync(FULL, ok, 0);
            __syncwarp();
#if SHRINK
            waited_ok = ok;
#else
            if (!ok) {
                *s_fail = 1;
                break;
            }
#endif
            waited = s;
        }
#if SHRINK
        if (!waited_ok) continue;
#endif
        if (__any_sync(FULL, *(volatile int*)s_fail)) break;
        const int* hm = h_slot_map + slot_map_off(s, i);
        const int t = hm[0];
        const float* wrow = (const float*)(own_q + weights_off(s)) + (long long)t * K;
        float acc[COMB_G][8];
        weighted_sum_unit(x, hm, wrow, cu, acc);
        const u64 peer = s_peer[s];
        char* dstrow = partial_dst(peer, own_q, data_off, s, rank, t);
#pragma unroll
        for (int gg = 0; gg < COMB_G; ++gg) {
            const int ch = (cu * COMB_G + gg) * 256 + lane * 8;
            if constexpr (LOGFMT) {
                if ((cu * COMB_G + gg) * 256 < H)   // warp-uniform: the group's lanes shuffle
                    logfmt::encode_store(acc[gg], dstrow + logfmt::byte_of(ch), ch < H);
            } else if (ch < H) {
                st_v4(dstrow + 2LL * ch, f32x8_to_bf16x8(acc[gg]));
            }
        }
#if LL_RDMA
        if (peer == 0) {
            const int ch0 = cu * COMB_UW;
            const int ch1 = (H - ch0) < COMB_UW ? H : ch0 + COMB_UW;
            const int nbytes = (int)(row_byte_of(ch1) - row_byte_of(ch0));
            __syncwarp();
            if (lane == 0) fence_sys();
            __syncwarp();
            nvshmemx_putmem_nbi_warp(sym_at(own, data_off + partial_off(rank, t) + row_byte_of(ch0)),
                                     sym_at(own, data_off + stage_partial_off(s, t) + row_byte_of(ch0)), nbytes, s);
        }
#endif
        chaos_pause();
    }
#if LL_RDMA
    nvshmem_quiet();
#endif
    __syncthreads();
    return *(volatile int*)s_fail == 0;
}

// B, last block (every block is past its weight waits and its partial stores): waits for every
// source's weights (also those of a source no block waited for, having no token for this rank,
// so that its late signal cannot outlive the reset), zeroes them and tells each source that
// its partials are complete. False when a wait failed. Shrink mode: skips the sources whose
// weights did not come, then zeroes the decisions.
__device__ __forceinline__ bool signal_owners(const u64* s_peer, u64 own, long long wsig_off, long long psig_off,
                                              int rank, const WaitCtx& w, int* mask, int* decide) {
    bool ok = true;
    for (int s = threadIdx.x; s < R; s += NT) {
        int v;
#if SHRINK
        v = shrink_wait((const int*)signal_at(own, wsig_off, s), decide + s, mask, s, w,
                        [](int v) { return v != 0; });
        if (v == ABSENT) continue;
#else
        ok = wait_nonzero_sys((const int*)signal_at(own, wsig_off, s), &v, w, s);
        if (!ok) break;
#endif
        report_if_cancelled(v, w, s);
        st_relaxed_sys_u64(signal_at(own, wsig_off, s), 0ull);
        fence_sys();
        chaos_pause();
        signal_set(s_peer[s], own, psig_off, s, rank, 1);
    }
#if SHRINK
    __syncthreads();   // every thread's waits on the decisions first
    zero_decisions(decide);
#endif
    return !__syncthreads_or(!ok);
}

// C) Every token's output: the sum of the partial rows of its destination ranks, in ascending
// rank order, in float32 (LogFMT rows decoded first). Shrink mode: of those whose partials came
// (s_live), so a masked rank's experts count as weight 0.
__device__ __forceinline__ void sum_partials(const int* __restrict__ h_dest_ranks, int num_tokens, const char* own_q,
                                             u16* __restrict__ out, const int* s_live) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int total_units = num_tokens * COMB_UPR;
    for (int u = blockIdx.x * NW + warp; u < total_units; u += gridDim.x * NW) {
        const int t = u / COMB_UPR, cu = u - t * COMB_UPR;
        int my_dest = lane < MAX_DESTS ? h_dest_ranks[(long long)t * MAX_DESTS + lane] : -1;
#if SHRINK
        if (my_dest >= 0 && !s_live[my_dest]) my_dest = -1;
#endif
        float acc[COMB_G][8];
        zero_acc(acc);
#pragma unroll
        for (int i0 = 0; i0 < MAX_DESTS; i0 += RB) {
            int4v v[RB][COMB_G];
            int rr[RB];
#pragma unroll
            for (int ii = 0; ii < RB; ++ii) {
                rr[ii] = i0 + ii < MAX_DESTS ? __shfl_sync(FULL, my_dest, i0 + ii) : -1;
#pragma unroll
                for (int gg = 0; gg < COMB_G; ++gg) {
                    const int ch = (cu * COMB_G + gg) * 256 + lane * 8;
                    v[ii][gg] = int4v{0, 0, 0, 0};
                    if (!LOGFMT && rr[ii] >= 0 && ch < H) v[ii][gg] = ld_cg_v4(own_q + partial_off(rr[ii], t) + 2LL * ch);
                }
            }
#pragma unroll
            for (int ii = 0; ii < RB; ++ii) {
                if (rr[ii] < 0) continue;
#pragma unroll
                for (int gg = 0; gg < COMB_G; ++gg) {
                    const int ch = (cu * COMB_G + gg) * 256 + lane * 8;
                    if constexpr (LOGFMT) {
                        if (ch < H) logfmt::load_decode_add(own_q + partial_off(rr[ii], t) + logfmt::byte_of(ch), acc[gg]);
                    } else {
                        add_bf16x8(acc[gg], v[ii][gg]);
                    }
                }
            }
        }
#pragma unroll
        for (int gg = 0; gg < COMB_G; ++gg) {
            const int ch = (cu * COMB_G + gg) * 256 + lane * 8;
            if (ch < H) st_v4(out + (long long)t * H + ch, f32x8_to_bf16x8(acc[gg]));
        }
    }
}

}  // namespace ll

// ==============================================================================================
// ll_dispatch
//   phases & 1: send (every block takes tokens blockIdx.x, +gridDim.x, ... and then signals
//               every destination with its share)
//   phases & 2: receive (wait for all R signals, place rows into the masked layout, fill the
//               handle; the last block zeroes the signals)
// ==============================================================================================
extern "C" __global__ void __launch_bounds__(LL_THREADS, 1)
ll_dispatch(const u16* __restrict__ x,            // [N][H] bf16
            const i64* __restrict__ topk_idx,     // [N][K]
            int num_tokens, int phases,
            const u64* __restrict__ peers,        // [R] peer base of the symmetric buffer (0: RDMA)
            long long sig_off,                    // this half's dispatch signals: u64 [R src]
            long long data_off,                   // this half's dispatch quarter
            int* __restrict__ scratch,            // SD_* zeroed ints
            void* __restrict__ recv_x,            // [EL][R*M][H] bf16 or e4m3 bytes
            void* __restrict__ recv_scales,       // [EL][R*M][H/128] f32, or u8 with UE8M0 (FP8 only)
            int* __restrict__ recv_src_info,      // [EL][R*M]
            i64* __restrict__ recv_layout,        // [EL][R] (begin << 32) | count
            int* __restrict__ recv_count,         // [EL]
            int* __restrict__ stats,              // [EL] or null
            i64* __restrict__ wait_stats,         // [R] or null: ns waited per source (block 0's receive wait)
            int* __restrict__ h_slot_count,       // [R]   handle (expert side): slots per source
            int* __restrict__ h_slot_map,         // [R][M][1+K] handle: token, row per k (-1)
            int* __restrict__ h_dest_ranks,       // [M][MAX_DESTS] handle (owner side): ranks of each token
            u64* __restrict__ prof,               // null, or [gridDim.x][PROF_SLOTS] globaltimer checkpoints
            StatusRecord* err, u64 timeout_ns, int rank
#if SHRINK
            , int* __restrict__ mask              // [R] this rank's mask (1: masked), updated here
#endif
            ) {
    using namespace ll;
#if !SHRINK
    int* const mask = nullptr;
#endif
    __shared__ DispatchSmem smem;
    __shared__ int s_flag;
    const WaitCtx wctx = make_wait_ctx(err, timeout_ns, KID_LOW_LATENCY_DISPATCH, rank);
    const u64 own = peers[rank];
    prof_mark(prof, 0);
    if (phases & 1)
        dispatch_send(x, topk_idx, num_tokens, peers, sig_off, data_off, scratch, h_dest_ranks, prof, rank, own,
                      smem.send, &s_flag, mask);
    if ((phases & 2) && !dispatch_recv(own, sig_off, data_off, scratch, recv_x, recv_scales, recv_src_info,
                                       recv_layout, recv_count, stats, wait_stats, h_slot_count, h_slot_map, prof, wctx,
                                       smem.recv, &s_flag, mask))
        return;
    prof_mark(prof, PROF_END);
}

// ==============================================================================================
// ll_combine
//   phases & 1: A) send my topk weights to every rank; B) as expert rank, reduce my local
//               experts' rows of each received token into one partial row (bf16 or LogFMT) and store it
//               into the token owner's buffer; the last block signals every owner.
//   phases & 2: C) wait for every rank's partials and sum them into out (float32 -> bf16).
// ==============================================================================================
extern "C" __global__ void __launch_bounds__(LL_THREADS, 1)
ll_combine(const u16* __restrict__ x,                // [EL][R*M][H] bf16 expert outputs
           const i64* __restrict__ topk_idx,         // [N][K]
           const float* __restrict__ topk_weights,   // [N][K]
           int num_tokens, int phases,
           const u64* __restrict__ peers,            // [R]
           long long wsig_off,                       // this half's weight signals u64 [R src]
           long long psig_off,                       // this half's partial signals u64 [R expert rank]
           long long data_off,                       // this half's combine quarter
           int* __restrict__ scratch,                // 2 zeroed ints
           const int* __restrict__ h_slot_count,     // [R]
           const int* __restrict__ h_slot_map,       // [R][M][1+K]
           const int* __restrict__ h_dest_ranks,     // [M][MAX_DESTS]
           u16* __restrict__ out,                    // [N][H] bf16
           i64* __restrict__ wait_stats,             // [R] or null: ns waited per rank (block 0: its weights, its partials)
           u64* __restrict__ prof,                   // null, or [gridDim.x][PROF_SLOTS] globaltimer checkpoints
           StatusRecord* err, u64 timeout_ns, int rank
#if SHRINK
           , int* __restrict__ mask                  // [R] this rank's mask (1: masked), updated here
#endif
           ) {
    using namespace ll;
    __shared__ u64 s_peer[R];
    __shared__ int s_pfx[R + 1];
    __shared__ int s_flag;
    __shared__ int s_fail;
#if SHRINK
    // per rank: unmasked at the start (phase A), then whether its partials came (phase C)
    __shared__ int s_live[R];
    int* const w_decide = scratch + SC_W_DECIDE;
#else
    int* const mask = nullptr;
    int* const s_live = nullptr;
    int* const w_decide = nullptr;
#endif

    const WaitCtx wctx = make_wait_ctx(err, timeout_ns, KID_LOW_LATENCY_COMBINE, rank);
    for (int r = threadIdx.x; r < R; r += NT) {
        s_peer[r] = peers[r];
        s_pfx[r] = h_slot_count[r];
#if SHRINK
        s_live[r] = *(volatile int*)(mask + r) == 0;
#endif
    }
    if (threadIdx.x == 0) s_fail = 0;
    __syncthreads();
    scan_rows(s_pfx, s_pfx + R, 1, nullptr);
    __syncthreads();
    const u64 own = s_peer[rank];
    char* const own_q = sym_at(own, data_off);
    prof_mark(prof, 0);

    if (phases & 1) {
        send_weights(topk_idx, topk_weights, num_tokens, s_peer, own, own_q, wsig_off, data_off, rank, s_live);
        prof_mark(prof, 1);
        // Statistics: block 0 times each source's weights (the combine's first message from it)
        // before it reduces, so that a late source is charged alone, not every source behind it.
#if SHRINK
        if (wait_stats != nullptr && blockIdx.x == 0) shrink_wait_all(own, wsig_off, wctx, wait_stats, mask, w_decide, nullptr);
#else
        if (wait_stats != nullptr && blockIdx.x == 0 && !wait_all_nonzero(own, wsig_off, wctx, wait_stats))
            return;
#endif
        if (!reduce_partials(x, s_peer, s_pfx, h_slot_map, own, own_q, wsig_off, data_off, rank, wctx, &s_fail, mask,
                             w_decide))
            return;
        prof_mark(prof, 2);
        if (last_block_done<true>(scratch + SC_B_DONE, &s_flag)) {
            if (!signal_owners(s_peer, own, wsig_off, psig_off, rank, wctx, mask, w_decide)) return;
            prof_mark(prof, 3);
        }
    }

    if (phases & 2) {
#if SHRINK
        // A deadline of its own: the partials come after the peers' phase B, which may itself
        // have waited timeout_ns for a rank it then masked.
        shrink_wait_all(own, psig_off, make_wait_ctx(err, timeout_ns, KID_LOW_LATENCY_COMBINE, rank), wait_stats,
                        mask, scratch + SC_P_DECIDE, s_live);
#else
        if (!wait_all_nonzero(own, psig_off, wctx, wait_stats)) return;
#endif
        prof_mark(prof, 4);
        sum_partials(h_dest_ranks, num_tokens, own_q, out, s_live);
        prof_mark(prof, 5);
        if (last_block_done<false>(scratch + SC_C_DONE, &s_flag)) {
            zero_signals(own, psig_off);
#if SHRINK
            zero_decisions(scratch + SC_P_DECIDE);
#endif
        }
    }
    prof_mark(prof, PROF_END);
}
