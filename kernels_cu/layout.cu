// get_dispatch_layout: from topk_idx, how many tokens go to each rank, NVLink domain and expert,
// and which ranks each token goes to. Expert ids outside [-1, E) are reported to the status
// record (ST_BAD_EXPERT: the id and the token) and select nothing.
//
// Compile-time constants:
//   NUM_RANKS R, NUM_NVL_RANKS P (ranks per NVLink domain, R % P == 0), NUM_EXPERTS E (E % R == 0),
//   TOPK K, NUM_THREADS, IDX_BYTES (8: int64 topk_idx, 4: int32)
// @constants NUM_RANKS=4 NUM_NVL_RANKS=4 NUM_EXPERTS=256 TOPK=8 NUM_THREADS=256 IDX_BYTES=8
// @constants NUM_RANKS=3 NUM_NVL_RANKS=3 NUM_EXPERTS=48 TOPK=9 NUM_THREADS=256 IDX_BYTES=4
// @constants NUM_RANKS=128 NUM_NVL_RANKS=8 NUM_EXPERTS=256 TOPK=8 NUM_THREADS=256 IDX_BYTES=8
// @constants NUM_RANKS=4 NUM_NVL_RANKS=1 NUM_EXPERTS=4096 TOPK=1 NUM_THREADS=512 IDX_BYTES=8
#include "common.cuh"

constexpr int R = NUM_RANKS;
constexpr int P = NUM_NVL_RANKS;
constexpr int N = NUM_RANKS / NUM_NVL_RANKS;
constexpr int E = NUM_EXPERTS;
constexpr int EL = NUM_EXPERTS / NUM_RANKS;
constexpr int RANK_WORDS = (R + 31) / 32;
constexpr int DOM_WORDS = (N + 31) / 32;
static_assert(R % P == 0 && E % R == 0, "ranks must split into domains and experts over ranks");

#if IDX_BYTES == 8
typedef i64 idx_t;
#else
typedef int idx_t;
#endif

// Sets bit i of a small bitset held in registers; returns whether it was set already.
template <int WORDS>
__device__ __forceinline__ bool test_and_set(u32 (&words)[WORDS], int i) {
    const u32 bit = 1u << (i & 31);
    u32& word = WORDS == 1 ? words[0] : words[i >> 5];
    const bool was = (word & bit) != 0;
    word |= bit;
    return was;
}

// Grid-stride over tokens, one thread per token. Counts go to shared memory, then to the
// zeroed `scratch` [R | N | E] with one atomic per counter and block; the last block copies
// scratch to the outputs and zeroes it again (no memset before the launch).
extern "C" __global__ void __launch_bounds__(NUM_THREADS)
dispatch_layout(const idx_t* __restrict__ topk_idx, int num_tokens, int* __restrict__ scratch,
                int* __restrict__ per_rank, int* __restrict__ per_rdma_rank, int* __restrict__ per_expert,
                u8* __restrict__ is_token_in_rank, StatusRecord* err, int rank) {
    __shared__ int s_counts[R + N + E];
    __shared__ int s_last;
    for (int i = threadIdx.x; i < R + N + E; i += NUM_THREADS) s_counts[i] = 0;
    __syncthreads();

    for (int t = blockIdx.x * NUM_THREADS + threadIdx.x; t < num_tokens; t += gridDim.x * NUM_THREADS) {
        u32 ranks[RANK_WORDS], doms[DOM_WORDS];
#pragma unroll
        for (int w = 0; w < RANK_WORDS; ++w) ranks[w] = 0;
#pragma unroll
        for (int w = 0; w < DOM_WORDS; ++w) doms[w] = 0;
        i64 ids[TOPK];   // the whole row first: every load in flight before any is judged
#pragma unroll
        for (int k = 0; k < TOPK; ++k) ids[k] = (i64)topk_idx[(i64)t * TOPK + k];
#pragma unroll
        for (int k = 0; k < TOPK; ++k) {
            const i64 e = ids[k];
            if (e == -1) continue;
            if (e < -1 || e >= E) {
                record_error(err, ST_BAD_EXPERT, KID_GET_DISPATCH_LAYOUT, rank, -1, (int)e, t);
                continue;
            }
            atomicAdd(&s_counts[R + N + (int)e], 1);
            const int r = (int)e / EL;
            if (!test_and_set(ranks, r)) atomicAdd(&s_counts[r], 1);
            if (!test_and_set(doms, r / P)) atomicAdd(&s_counts[R + r / P], 1);
        }
        u8* row = is_token_in_rank + (i64)t * R;
#pragma unroll 8
        for (int r = 0; r < R; ++r) row[r] = ((RANK_WORDS == 1 ? ranks[0] : ranks[r >> 5]) >> (r & 31)) & 1u;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < R + N + E; i += NUM_THREADS)
        if (s_counts[i]) atomicAdd(&scratch[i], s_counts[i]);
    if (last_block_done<false>(scratch + R + N + E, &s_last)) {
        for (int i = threadIdx.x; i < R + N + E; i += NUM_THREADS) {
            const int v = atomicExch(&scratch[i], 0);
            if (i < R) per_rank[i] = v;
            else if (i < R + N) { if (per_rdma_rank != nullptr) per_rdma_rank[i - R] = v; }
            else per_expert[i - R - N] = v;
        }
    }
}
