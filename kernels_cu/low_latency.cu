// Low-latency (decode) MoE dispatch and combine: ll_dispatch, ll_combine.
//
// NVLink path: every byte for a peer is stored straight into the peer's symmetric buffer
// through its mapped address (peers[r] != 0). Compiled with LL_RDMA=1 (from
// low_latency_rdma.cu) the same kernels send to peers without a mapping (peers[r] == 0)
// through NVSHMEM puts from a local staging area instead.
//
// Compile-time constants (cupy_ep/low_latency.py passes them; derived sizes are recomputed here
// and, when the host passes them as LAYOUT_*, checked against the host's numbers):
//   NUM_RANKS R, NUM_EXPERTS E (E % R == 0), HIDDEN H (% 128 == 0), TOPK K (1..32),
//   MAX_TOKENS M (num_max_dispatch_tokens_per_rank, 1..65535), USE_FP8, ROUND_SCALE, USE_UE8M0,
//   LL_THREADS (threads per block, multiple of 32, default 512).
// Every launch of one call must use the same grid size on every rank (<= SM count).
//
// @constants NUM_RANKS=4 NUM_EXPERTS=288 HIDDEN=7168 TOPK=8 MAX_TOKENS=128 USE_FP8=1 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=2 NUM_EXPERTS=16 HIDDEN=2048 TOPK=1 MAX_TOKENS=512 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=3 NUM_EXPERTS=96 HIDDEN=2048 TOPK=9 MAX_TOKENS=64 USE_FP8=1 ROUND_SCALE=1 USE_UE8M0=1
// @constants NUM_RANKS=8 NUM_EXPERTS=256 HIDDEN=7168 TOPK=9 MAX_TOKENS=256 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0 LL_THREADS=1024
//
// ----------------------------------------------------------------------------------------------
// Symmetric buffer (identical offsets on every rank; the host computes the half offsets):
//   control area: u64 signals, per half and kind, [R] each (dispatch, combine-weights,
//     combine-partials). 0 = not arrived. The writer stores value+1 (dispatch: each sending
//     block adds (1 << 20) | the slots it wrote) with release/sys ordering
//     after its data; the receiver waits (bounded), reads, and ZEROES it itself once every block
//     of its grid has passed the wait (so no reset pass, graph-safe).
//   dispatch quarter (one per half), on receiver r:
//     slots [R src][M][SLOT_BYTES]    x (bf16 2H, or fp8 H + scales f32 H/128) + meta
//     meta  int32[1+K]: [0] source token; [1+k] (j << 16 | pos) when expert k of the token is
//           local expert j of r (pos: its index among src's rows for j), else -1.
//     staging (RDMA only): same layout indexed by destination instead of source.
//   combine quarter (one per half):
//     weights  [R src][WSTRIDE]       f32 [M][K] token owner's weights (SKIP bits: masked slot)
//     partials [R expert rank][M][H]  bf16 partial sums per (token, expert rank)
//     staging (RDMA only): weights [R dst][WSTRIDE], partials [R owner][M][H].
// ----------------------------------------------------------------------------------------------
#include "common.cuh"

#ifndef LL_RDMA
#define LL_RDMA 0
#endif
#ifndef LL_THREADS
#define LL_THREADS 512
#endif
#ifndef ROUND_SCALE
#define ROUND_SCALE 0
#endif
#ifndef USE_UE8M0
#define USE_UE8M0 0
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

static_assert(E % R == 0, "NUM_EXPERTS must be a multiple of NUM_RANKS");
static_assert(H % 128 == 0 && H > 0, "HIDDEN must be a positive multiple of 128");
static_assert(K >= 1 && K <= 32, "TOPK must be in 1..32");
static_assert(M >= 1 && M <= 65535, "MAX_TOKENS must be in 1..65535");
constexpr int SIG_BLOCK_SHIFT = 20;   // dispatch signal = (blocks << 20) | slots
static_assert(R >= 1 && R <= 32, "NUM_RANKS must be in 1..32");
static_assert(EL < 32768, "too many local experts");
static_assert(E <= 8192, "NUM_EXPERTS above 8192 (shared memory of the receive phase)");
static_assert(NT % 32 == 0 && NT >= 64 && NT <= 1024, "LL_THREADS must be a multiple of 32 in 64..1024");
static_assert(R <= NT && K <= NT, "too few threads");
static_assert((long long)EL * R * M < 2147483647LL, "E_local * R * M must fit in int32");

__host__ __device__ constexpr long long align_up(long long v, long long a) { return (v + a - 1) / a * a; }

// ---- slot layout (dispatch) ----
constexpr int X_BYTES = FP8 ? H : 2 * H;
constexpr int NSCALES = H / 128;
constexpr int SCALE_OFF = X_BYTES;
constexpr int SCALE_BYTES = FP8 ? (int)align_up(NSCALES * 4, 16) : 0;
constexpr int META_OFF = SCALE_OFF + SCALE_BYTES;
constexpr int META_BYTES = (int)align_up(4 * (1 + K), 16);
constexpr int SLOT_BYTES = META_OFF + META_BYTES;
constexpr long long D_SLOT_OFF = 0;
constexpr long long D_RECV_BYTES = align_up(D_SLOT_OFF + (long long)R * M * SLOT_BYTES, 256);
constexpr long long D_STAGE_OFF = D_RECV_BYTES;

// ---- combine layout ----
constexpr long long WSTRIDE = align_up((long long)M * K * 4, 256);
constexpr long long C_W_OFF = 0;
constexpr long long C_P_OFF = R * WSTRIDE;
constexpr long long ROW_BYTES = 2LL * H;
constexpr long long C_RECV_BYTES = align_up(C_P_OFF + (long long)R * M * ROW_BYTES, 256);
constexpr long long C_STAGE_W_OFF = C_RECV_BYTES;
constexpr long long C_STAGE_P_OFF = C_RECV_BYTES + R * WSTRIDE;

#ifdef LAYOUT_SLOT_BYTES
static_assert(LAYOUT_SLOT_BYTES == SLOT_BYTES, "host and device disagree on SLOT_BYTES");
#endif
#ifdef LAYOUT_D_RECV_BYTES
static_assert(LAYOUT_D_RECV_BYTES == D_RECV_BYTES, "host and device disagree on D_RECV_BYTES");
#endif
#ifdef LAYOUT_C_RECV_BYTES
static_assert(LAYOUT_C_RECV_BYTES == C_RECV_BYTES, "host and device disagree on C_RECV_BYTES");
#endif

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
// combine: units of COMB_G chunks of 256 channels (8 bf16 per lane)
constexpr int COMB_G = NT > 512 ? 1 : 2;
constexpr int COMB_UW = 256 * COMB_G;
constexpr int COMB_UPR = (H + COMB_UW - 1) / COMB_UW;       // units per row
// loads in flight per batch (registers: 512 threads/block leave 128 per thread, 1024 leave 64)
constexpr int LOADS_MAX = NT > 512 ? 4 : 8;
constexpr int KB = K < LOADS_MAX ? K : LOADS_MAX;           // top-k rows per batch (combine B)
constexpr int RB = R < LOADS_MAX ? R : LOADS_MAX;           // partial rows per batch (combine C)

// ---- scratch (device ints, engine-owned, zero between launches) ----
// dispatch scratch: [0,R) slot counters per destination; [R, R+E) per (dst, local expert)
// counters; then send_done, recv_done.
constexpr int SD_SLOT = 0;
constexpr int SD_CNT = R;
constexpr int SD_SEND_DONE = R + E;
constexpr int SD_RECV_DONE = R + E + 1;
constexpr int SD_INTS = R + E + 2;
// combine scratch: b_done, c_done
constexpr int SC_B_DONE = 0;
constexpr int SC_C_DONE = 1;

constexpr unsigned FULL = 0xffffffffu;
constexpr u32 SKIP_BITS = 0xffc0deadu;   // a NaN pattern: "weight slot masked out by topk_idx == -1"

__device__ __forceinline__ char* sym_at(u64 base, long long off) { return (char*)(base + (u64)off); }

// Where this rank writes slot `sl` of its rows for destination d: straight into d's dispatch
// quarter (peer != 0), or, RDMA build, into the local staging copy that a put then sends.
__device__ __forceinline__ char* dispatch_slot(u64 peer, char* own_q, long long data_off, int d, int rank, int sl) {
#if LL_RDMA
    if (peer == 0) return own_q + D_STAGE_OFF + D_SLOT_OFF + ((long long)d * M + sl) * SLOT_BYTES;
#endif
    return sym_at(peer, data_off) + D_SLOT_OFF + ((long long)rank * M + sl) * SLOT_BYTES;
}

#if LL_RDMA
// NVSHMEM helpers (only in the RDMA build): symmetric address on this PE of `off`.
__device__ __forceinline__ void* sym_addr(u64 own, long long off) { return (void*)(own + (u64)off); }
#endif

}  // namespace ll

// ==============================================================================================
// ll_dispatch
//   phases & 1: send (every block takes tokens blockIdx.x, +gridDim.x, ...; the last block to
//               finish writes every destination's header and then its signal)
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
            int* __restrict__ scratch,            // SD_INTS zeroed ints
            void* __restrict__ recv_x,            // [EL][R*M][H] bf16 or e4m3 bytes
            void* __restrict__ recv_scales,       // [EL][R*M][H/128] f32, or u8 with UE8M0 (FP8 only)
            int* __restrict__ recv_src_info,      // [EL][R*M]
            i64* __restrict__ recv_layout,        // [EL][R] (begin << 32) | count
            int* __restrict__ recv_count,         // [EL]
            int* __restrict__ stats,              // [EL] or null
            int* __restrict__ h_slot_count,       // [R]   handle (expert side): slots per source
            int* __restrict__ h_slot_map,         // [R][M][1+K] handle: token, row per k (-1)
            int* __restrict__ h_dest_mask,        // [M]   handle (owner side): ranks of each token
            u64* __restrict__ prof,               // null, or [gridDim.x][16] globaltimer checkpoints
            ErrorRecord* err, u64 timeout_ns, int rank) {
    using namespace ll;
    __shared__ u64 s_peer[R];
    __shared__ int s_slot[R];
    __shared__ int s_nsl[R];        // slots this block wrote per destination
    __shared__ unsigned s_mask;
    __shared__ int s_flag;
    __shared__ int s_fail;
    __shared__ int s_pfx[R + 1];
    __shared__ int s_base[EL * R];  // counts per (local expert, source), then row bases
    __shared__ int s_tot[EL];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const WaitCtx wctx = make_wait_ctx(err, timeout_ns, KID_LOW_LATENCY_DISPATCH, rank);
    if (tid < R) {
        s_peer[tid] = peers[tid];
        s_nsl[tid] = 0;
    }
    if (tid == 0) s_fail = 0;
    __syncthreads();
    const u64 own = s_peer[rank];
    char* const own_q = sym_at(own, data_off);
    prof_mark(prof, 0);

    // ------------------------------------------------------------------ send
    if (phases & 1) {
        int* const slot_cnt = scratch + SD_SLOT;
        int* const exp_cnt = scratch + SD_CNT;
        for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
            // 1) every warp loads and converts its chunks of token t (independent of routing)
            int4v pay[SEND_CPW];
            float psc[SEND_CPW];
#pragma unroll
            for (int c = 0; c < SEND_CPW; ++c) {
                const int chunk = warp + c * NW;
                pay[c] = int4v{0, 0, 0, 0};
                psc[c] = 0.f;
                if (chunk < SEND_NCH) {
                    if constexpr (FP8) {
                        const int ch = chunk * 512 + lane * 16;
                        const bool valid = ch < H;   // 8-lane groups are all valid or all not
                        float f[16];
                        int4v a = {0, 0, 0, 0}, b = {0, 0, 0, 0};
                        if (valid) {
                            const int4v* src = (const int4v*)(x + (long long)t * H + ch);
                            a = ld_nc_v4(src);
                            b = ld_nc_v4(src + 1);
                        }
                        bf16x8_to_f32(a, f);
                        bf16x8_to_f32(b, f + 8);
                        float amax = 0.f;
#pragma unroll
                        for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(f[i]));
                        amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, 1));
                        amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, 2));
                        amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, 4));
                        amax = fmaxf(amax, 1e-4f);
                        float scale = __fdiv_rn(amax, 448.0f);
                        if constexpr (ROUND) {
                            u32 bits = __float_as_uint(scale);
                            if (bits & 0x7fffffu) bits = (bits & 0x7f800000u) + 0x800000u;
                            scale = __uint_as_float(bits);
                        }
                        u32 w[4];
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const u32 lo = float2_to_e4m3x2(__fdiv_rn(f[4 * i], scale), __fdiv_rn(f[4 * i + 1], scale));
                            const u32 hi = float2_to_e4m3x2(__fdiv_rn(f[4 * i + 2], scale), __fdiv_rn(f[4 * i + 3], scale));
                            w[i] = lo | (hi << 16);
                        }
                        pay[c] = int4v{(int)w[0], (int)w[1], (int)w[2], (int)w[3]};
                        psc[c] = scale;
                    } else {
                        const int ch = chunk * 256 + lane * 8;
                        if (ch < H) pay[c] = ld_nc_v4((const int4v*)(x + (long long)t * H + ch));
                    }
                }
            }
            // 2) warp 0 routes the token: destinations, slots, per-expert positions, meta
            if (warp == 0) {
                int e = -1;
                if (lane < K) {
                    const i64 v = topk_idx[(long long)t * K + lane];
                    e = (v >= 0 && v < E) ? (int)v : -1;
                }
                const int r = e >= 0 ? e / EL : -1;
                const int j = e >= 0 ? e - r * EL : -1;
                int firstk = lane;
#pragma unroll
                for (int k2 = K - 1; k2 >= 0; --k2) {
                    const int e2 = __shfl_sync(FULL, e, k2);
                    if (k2 < lane && e2 == e) firstk = k2;
                }
                const unsigned mask = warp_or(e >= 0 ? (1u << r) : 0u);
                int slot = 0, pos = 0;
                if (lane < R && ((mask >> lane) & 1u)) slot = atomicAdd(slot_cnt + lane, 1);
                if (e >= 0 && firstk == lane) pos = atomicAdd(exp_cnt + r * EL + j, 1);
                pos = __shfl_sync(FULL, pos, firstk);
                const int meta_val = e >= 0 ? ((j << 16) | pos) : -1;
                if (lane < R) {
                    s_slot[lane] = slot;
                    if ((mask >> lane) & 1u) ++s_nsl[lane];
                }
                if (lane == 0) {
                    s_mask = mask;
                    h_dest_mask[t] = (int)mask;
                }
                __syncwarp();
                for (int d = 0; d < R; ++d) {
                    if (!((mask >> d) & 1u)) continue;
                    int* meta = (int*)(dispatch_slot(s_peer[d], own_q, data_off, d, rank, s_slot[d]) + META_OFF);
                    if (lane < K) st_i32(meta + 1 + lane, r == d ? meta_val : -1);
                    if (lane == 0) st_i32(meta, t);
                }
            }
            __syncthreads();
            // 3) store the payload into each destination's slot
            const unsigned mask = s_mask;
            for (int d = 0; d < R; ++d) {
                if (!((mask >> d) & 1u)) continue;
                char* const slotp = dispatch_slot(s_peer[d], own_q, data_off, d, rank, s_slot[d]);
#pragma unroll
                for (int c = 0; c < SEND_CPW; ++c) {
                    const int chunk = warp + c * NW;
                    if (chunk < SEND_NCH) {
                        if constexpr (FP8) {
                            const int ch = chunk * 512 + lane * 16;
                            if (ch < H) {
                                st_v4((int4v*)(slotp + ch), pay[c]);
                                if ((lane & 7) == 0) *(float*)(slotp + SCALE_OFF + (ch / 128) * 4) = psc[c];
                            }
                        } else {
                            const int ch = chunk * 256 + lane * 8;
                            if (ch < H) st_v4((int4v*)(slotp + 2 * ch), pay[c]);
                        }
                    }
                }
            }
            __syncthreads();   // s_slot / s_mask are reused by the next token
#if LL_RDMA
            if (warp == 0) {
                bool any = false;
                for (int d = 0; d < R; ++d) any |= ((mask >> d) & 1u) && s_peer[d] == 0;
                if (any) {
                    if (lane == 0) fence_sys();   // staging writes of all warps (bar.sync above) first
                    __syncwarp();
                    for (int d = 0; d < R; ++d) {
                        if (!((mask >> d) & 1u) || s_peer[d] != 0) continue;
                        const int sl = s_slot[d];
                        const long long stage = data_off + D_STAGE_OFF + D_SLOT_OFF + ((long long)d * M + sl) * SLOT_BYTES;
                        const long long dst = data_off + D_SLOT_OFF + ((long long)rank * M + sl) * SLOT_BYTES;
                        nvshmemx_putmem_nbi_warp(sym_addr(own, dst), sym_addr(own, stage), SLOT_BYTES, d);
                    }
                }
            }
            __syncthreads();
#endif
        }
#if LL_RDMA
        nvshmem_quiet();   // this block's puts are delivered before its signals
#endif
        prof_mark(prof, 1);
        // Every block signals every destination itself: (1 << 20) | slots it wrote there, added
        // with release semantics after a system fence (its writes, ordered by bar.sync, first).
        __syncthreads();
        if (tid < R) {
            const int d = tid;
            const int v = (1 << SIG_BLOCK_SHIFT) | s_nsl[d];
            fence_sys();
#if LL_RDMA
            if (s_peer[d] == 0) {
                nvshmemx_signal_op((uint64_t*)sym_addr(own, sig_off + 8LL * rank), (uint64_t)v, NVSHMEM_SIGNAL_ADD, d);
            } else
#endif
                red_add_release_sys((int*)sym_at(s_peer[d], sig_off + 8LL * rank), v);
        }
        prof_mark(prof, 2);
        // local counters back to zero for the next launch
        if (last_block_done<false>(scratch + SD_SEND_DONE, &s_flag)) {
            for (int idx = tid; idx < R * EL; idx += NT) atomicExch(exp_cnt + idx, 0);
            if (tid < R) atomicExch(slot_cnt + tid, 0);
        }
    }

    // ------------------------------------------------------------------ receive
    if (phases & 2) {
        if (tid < R) {
            const int* sig = (const int*)(own + (u64)(sig_off + 8LL * tid));
            // every block of the sender (same grid size on every rank) has added its share
            int v = 0;
            if (wait_geq_sys(sig, (int)gridDim.x << SIG_BLOCK_SHIFT, wctx, tid))
                v = ld_acquire_sys(sig);
            else
                s_fail = 1;
            s_pfx[tid + 1] = v & ((1 << SIG_BLOCK_SHIFT) - 1);   // slots from source tid
        }
        for (int idx = tid; idx < EL * R; idx += NT) s_base[idx] = 0;
        __syncthreads();
        if (s_fail) return;   // uniform: the error is recorded, the Buffer is unusable
        prof_mark(prof, 3);
        if (tid == 0) {
            s_pfx[0] = 0;
            for (int s = 0; s < R; ++s) s_pfx[s + 1] += s_pfx[s];
        }
        __syncthreads();
        // count(j, s) = 1 + the largest position any slot of s gives for expert j. The loads of
        // META_BATCH entries are issued before any of their atomics (one latency per batch).
        constexpr int META_BATCH = 8;
        const int num_entries = s_pfx[R] * K;
        for (int base = 0; base < num_entries; base += NT * META_BATCH) {
            int mv[META_BATCH], src[META_BATCH];
#pragma unroll
            for (int b = 0; b < META_BATCH; ++b) {
                const int idx = base + b * NT + tid;
                mv[b] = -1;
                src[b] = 0;
                if (idx < num_entries) {
                    const int g = idx / K, k = idx - g * K;
                    int s = 0;
#pragma unroll
                    for (int q = 1; q < R; ++q) s += (g >= s_pfx[q]) ? 1 : 0;
                    src[b] = s;
                    mv[b] = ld_cg_i32(own_q + D_SLOT_OFF + ((long long)s * M + (g - s_pfx[s])) * SLOT_BYTES + META_OFF +
                                      4 * (1 + k));
                }
            }
#pragma unroll
            for (int b = 0; b < META_BATCH; ++b)
                if (mv[b] >= 0) atomicMax(&s_base[(mv[b] >> 16) * R + src[b]], (mv[b] & 0xffff) + 1);
        }
        __syncthreads();
        // bases: rows of (j, s) start at sum over s' < s of count(j, s')
        for (int j = tid; j < EL; j += NT) {
            int acc = 0;
            for (int s = 0; s < R; ++s) {
                const int c = s_base[j * R + s];
                s_base[j * R + s] = acc;
                if (blockIdx.x == 0) recv_layout[(long long)j * R + s] = ((i64)acc << 32) | (i64)(u32)c;
                acc += c;
            }
            s_tot[j] = acc;
            if (blockIdx.x == 0) {
                recv_count[j] = acc;
                if (stats != nullptr) atomicAdd(stats + j, acc);
            }
        }
        __syncthreads();
        if (blockIdx.x == 0 && tid < R) h_slot_count[tid] = s_pfx[tid + 1] - s_pfx[tid];
        // src_info of the rows past recv_count[j]: -1
        for (int idx = blockIdx.x * NT + tid; idx < EL * R * M; idx += gridDim.x * NT) {
            const int j = idx / (R * M), p = idx - j * (R * M);
            if (p >= s_tot[j]) recv_src_info[idx] = -1;
        }

        prof_mark(prof, 4);
        const int total_units = s_pfx[R] * RECV_UPS;
        for (int u = blockIdx.x * NW + warp; u < total_units; u += gridDim.x * NW) {
            const int g = u / RECV_UPS, part = u - g * RECV_UPS;
            int s = 0;
#pragma unroll
            for (int q = 1; q < R; ++q) s += (g >= s_pfx[q]) ? 1 : 0;
            const int i = g - s_pfx[s];
            const char* slotp = own_q + D_SLOT_OFF + ((long long)s * M + i) * SLOT_BYTES;
            const int* meta = (const int*)(slotp + META_OFF);
            const int t = ld_cg_i32(meta);
            const int mv = lane < K ? ld_cg_i32(meta + 1 + lane) : -1;
            int row = -1;
            if (mv >= 0) {
                const int j = mv >> 16, pos = mv & 0xffff;
                row = j * (R * M) + s_base[j * R + s] + pos;
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
                int* hm = h_slot_map + ((long long)s * M + i) * (1 + K);
                if (lane < K) hm[1 + lane] = row;
                if (lane == 0) hm[0] = t;
                if (uniq) recv_src_info[row] = t;
                if constexpr (FP8) {
                    for (int q = lane; q < NSCALES; q += 32) {
                        const float sc = __int_as_float(ld_cg_i32(slotp + SCALE_OFF + 4 * q));
#pragma unroll
                        for (int k = 0; k < K; ++k) {
                            if (!((umask >> k) & 1u)) continue;
                            if constexpr (UE8M0)
                                ((u8*)recv_scales)[(long long)rows[k] * NSCALES + q] = (u8)((__float_as_uint(sc) >> 23) & 0xffu);
                            else
                                ((float*)recv_scales)[(long long)rows[k] * NSCALES + q] = sc;
                        }
                    }
                }
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
                    if (idx < X_V4) st_v4((int4v*)(dst + 16LL * idx), v[q]);
                }
            }
        }
        prof_mark(prof, 5);
        if (last_block_done<false>(scratch + SD_RECV_DONE, &s_flag)) {
            // every block has passed its signal wait: zero the signals for the next use of this half
            if (tid < R) st_relaxed_sys_u64((u64*)(own + (u64)(sig_off + 8LL * tid)), 0ull);
        }
    }
    prof_mark(prof, PROF_END);
}

// ==============================================================================================
// ll_combine
//   phases & 1: A) send my topk weights to every rank; B) as expert rank, reduce my local
//               experts' rows of each received token into one bf16 partial row and store it
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
           const int* __restrict__ h_dest_mask,      // [M]
           u16* __restrict__ out,                    // [N][H] bf16
           u64* __restrict__ prof,                   // null, or [gridDim.x][16] globaltimer checkpoints
           ErrorRecord* err, u64 timeout_ns, int rank) {
    using namespace ll;
    __shared__ u64 s_peer[R];
    __shared__ int s_flag;
    __shared__ int s_fail;
    __shared__ int s_pfx[R + 1];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const WaitCtx wctx = make_wait_ctx(err, timeout_ns, KID_LOW_LATENCY_COMBINE, rank);
    if (tid < R) s_peer[tid] = peers[tid];
    if (tid == 0) {
        s_fail = 0;
        s_pfx[0] = 0;
        for (int s = 0; s < R; ++s) s_pfx[s + 1] = s_pfx[s] + h_slot_count[s];
    }
    __syncthreads();
    const u64 own = s_peer[rank];
    char* const own_q = sym_at(own, data_off);
    prof_mark(prof, 0);

    if (phases & 1) {
        // -------------------------------------------------------------- A: weights to every rank
        for (int d = blockIdx.x; d < R; d += gridDim.x) {
            float* dst;
#if LL_RDMA
            if (s_peer[d] == 0)
                dst = (float*)(own_q + C_STAGE_W_OFF + d * WSTRIDE);
            else
#endif
                dst = (float*)(sym_at(s_peer[d], data_off) + C_W_OFF + rank * WSTRIDE);
            for (int idx = tid; idx < num_tokens * K; idx += NT) {
                const i64 e = topk_idx[idx];
                const float w = topk_weights[idx];
                dst[idx] = (e >= 0 && e < E) ? w : __uint_as_float(SKIP_BITS);
            }
            __syncthreads();
            if (tid == 0) {
                fence_sys();
#if LL_RDMA
                if (s_peer[d] == 0) {
                    nvshmem_putmem_signal_nbi(sym_addr(own, data_off + C_W_OFF + rank * WSTRIDE),
                                              sym_addr(own, data_off + C_STAGE_W_OFF + d * WSTRIDE),
                                              (size_t)num_tokens * K * 4, (uint64_t*)sym_addr(own, wsig_off + 8LL * rank),
                                              (uint64_t)(num_tokens + 1), NVSHMEM_SIGNAL_SET, d);
                    nvshmem_quiet();
                } else
#endif
                    st_release_sys((int*)sym_at(s_peer[d], wsig_off + 8LL * rank), num_tokens + 1);
            }
        }

        // -------------------------------------------------------------- B: partial rows
        prof_mark(prof, 1);
        unsigned waited = 0;   // sources whose weights this warp has acquired
        const int total_units = s_pfx[R] * COMB_UPR;
        for (int u = blockIdx.x * NW + warp; u < total_units; u += gridDim.x * NW) {
            const int g = u / COMB_UPR, cu = u - g * COMB_UPR;
            int s = 0;
#pragma unroll
            for (int q = 1; q < R; ++q) s += (g >= s_pfx[q]) ? 1 : 0;
            const int i = g - s_pfx[s];
            if (!((waited >> s) & 1u)) {
                int ok = 1, v;
                if (lane == 0) ok = wait_nonzero_sys((const int*)(own + (u64)(wsig_off + 8LL * s)), &v, wctx, s) ? 1 : 0;
                ok = __shfl_sync(FULL, ok, 0);
                __syncwarp();
                if (!ok) {
                    s_fail = 1;
                    break;
                }
                waited |= 1u << s;
            }
            // the whole warp leaves together: another warp may set s_fail between two lanes' reads
            if (__any_sync(FULL, *(volatile int*)&s_fail)) break;
            const int* hm = h_slot_map + ((long long)s * M + i) * (1 + K);
            const int t = hm[0];
            const float* wrow = (const float*)(own_q + C_W_OFF + s * WSTRIDE) + (long long)t * K;
            float acc[COMB_G][8];
#pragma unroll
            for (int gg = 0; gg < COMB_G; ++gg)
#pragma unroll
                for (int q = 0; q < 8; ++q) acc[gg][q] = 0.f;
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
                        if (rowk[kk] >= 0 && ch < H) v[kk][gg] = ld_nc_v4((const int4v*)(x + (long long)rowk[kk] * H + ch));
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
                        for (int q = 0; q < 8; ++q) acc[gg][q] = fmaf(wk[kk], f[q], acc[gg][q]);
                    }
                }
            }
            char* dstrow;
#if LL_RDMA
            const bool rdma = s_peer[s] == 0;
            if (rdma)
                dstrow = own_q + C_STAGE_P_OFF + ((long long)s * M + t) * ROW_BYTES;
            else
#endif
                dstrow = sym_at(s_peer[s], data_off) + C_P_OFF + ((long long)rank * M + t) * ROW_BYTES;
#pragma unroll
            for (int gg = 0; gg < COMB_G; ++gg) {
                const int ch = (cu * COMB_G + gg) * 256 + lane * 8;
                if (ch < H) st_v4((int4v*)(dstrow + 2LL * ch), f32x8_to_bf16x8(acc[gg]));
            }
#if LL_RDMA
            if (rdma) {
                const int ch0 = cu * COMB_UW;
                const int nbytes = 2 * ((H - ch0) < COMB_UW ? (H - ch0) : COMB_UW);
                __syncwarp();
                if (lane == 0) fence_sys();
                __syncwarp();
                nvshmemx_putmem_nbi_warp(sym_addr(own, data_off + C_P_OFF + ((long long)rank * M + t) * ROW_BYTES + 2LL * ch0),
                                         sym_addr(own, data_off + C_STAGE_P_OFF + ((long long)s * M + t) * ROW_BYTES + 2LL * ch0),
                                         nbytes, s);
            }
#endif
        }
#if LL_RDMA
        nvshmem_quiet();
#endif
        __syncthreads();
        if (s_fail) return;
        prof_mark(prof, 2);
        if (last_block_done<true>(scratch + SC_B_DONE, &s_flag)) {
            if (tid < R) {
                const int s = tid;
                // Every block is past its weight waits; a source none of them waited for (no token
                // for this rank) is waited for here, so its late signal cannot outlive the reset.
                int v;
                if (!wait_nonzero_sys((const int*)(own + (u64)(wsig_off + 8LL * s)), &v, wctx, s)) {
                    s_fail = 1;
                } else {
                    st_relaxed_sys_u64((u64*)(own + (u64)(wsig_off + 8LL * s)), 0ull);
                    fence_sys();
#if LL_RDMA
                    if (s_peer[s] == 0) {
                        nvshmemx_signal_op((uint64_t*)sym_addr(own, psig_off + 8LL * rank), (uint64_t)1,
                                           NVSHMEM_SIGNAL_SET, s);
                        nvshmem_quiet();
                    } else
#endif
                        st_release_sys((int*)sym_at(s_peer[s], psig_off + 8LL * rank), 1);
                }
            }
            __syncthreads();
            if (s_fail) return;
            prof_mark(prof, 3);
        }
    }

    if (phases & 2) {
        // -------------------------------------------------------------- C: sum the partials
        if (tid < R) {
            int v;
            if (!wait_nonzero_sys((const int*)(own + (u64)(psig_off + 8LL * tid)), &v, wctx, tid)) s_fail = 1;
        }
        __syncthreads();
        if (s_fail) return;
        prof_mark(prof, 4);
        const int total_units = num_tokens * COMB_UPR;
        for (int u = blockIdx.x * NW + warp; u < total_units; u += gridDim.x * NW) {
            const int t = u / COMB_UPR, cu = u - t * COMB_UPR;
            const unsigned mask = (unsigned)h_dest_mask[t];
            float acc[COMB_G][8];
#pragma unroll
            for (int gg = 0; gg < COMB_G; ++gg)
#pragma unroll
                for (int q = 0; q < 8; ++q) acc[gg][q] = 0.f;
#pragma unroll
            for (int r0 = 0; r0 < R; r0 += RB) {
                int4v v[RB][COMB_G];
#pragma unroll
                for (int rr = 0; rr < RB; ++rr)
#pragma unroll
                    for (int gg = 0; gg < COMB_G; ++gg) {
                        const int r = r0 + rr;
                        const int ch = (cu * COMB_G + gg) * 256 + lane * 8;
                        v[rr][gg] = int4v{0, 0, 0, 0};
                        if (r < R && ((mask >> r) & 1u) && ch < H)
                            v[rr][gg] = ld_cg_v4(own_q + C_P_OFF + ((long long)r * M + t) * ROW_BYTES + 2LL * ch);
                    }
#pragma unroll
                for (int rr = 0; rr < RB; ++rr) {
                    const int r = r0 + rr;
                    if (r >= R || !((mask >> r) & 1u)) continue;
#pragma unroll
                    for (int gg = 0; gg < COMB_G; ++gg) {
                        float f[8];
                        bf16x8_to_f32(v[rr][gg], f);
#pragma unroll
                        for (int q = 0; q < 8; ++q) acc[gg][q] += f[q];
                    }
                }
            }
#pragma unroll
            for (int gg = 0; gg < COMB_G; ++gg) {
                const int ch = (cu * COMB_G + gg) * 256 + lane * 8;
                if (ch < H) st_v4((int4v*)(out + (long long)t * H + ch), f32x8_to_bf16x8(acc[gg]));
            }
        }
        prof_mark(prof, 5);
        if (last_block_done<false>(scratch + SC_C_DONE, &s_flag)) {
            if (tid < R) st_relaxed_sys_u64((u64*)(own + (u64)(psig_off + 8LL * tid)), 0ull);
        }
    }
    prof_mark(prof, PROF_END);
}
