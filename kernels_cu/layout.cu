// get_dispatch_layout: from topk_idx, how many tokens go to each rank and each
// expert, and which ranks each token goes to.
//
// Compile-time constants:
//   NUM_RANKS, NUM_EXPERTS, TOPK, NUM_THREADS, IDX_BYTES (8: int64 topk_idx, 4: int32)
// @constants NUM_RANKS=4 NUM_EXPERTS=256 TOPK=8 NUM_THREADS=256 IDX_BYTES=8
// @constants NUM_RANKS=3 NUM_EXPERTS=48 TOPK=9 NUM_THREADS=256 IDX_BYTES=4
// @constants NUM_RANKS=8 NUM_EXPERTS=288 TOPK=1 NUM_THREADS=256 IDX_BYTES=8
#include "common.cuh"

#define EXPERTS_PER_RANK (NUM_EXPERTS / NUM_RANKS)

#if IDX_BYTES == 8
typedef i64 idx_t;
#else
typedef int idx_t;
#endif

// One thread per token. Per-block counts in shared memory, then one global
// atomic per counter and block. `counts` = [num_tokens_per_rank R | per expert E],
// zeroed by the caller.
extern "C" __global__ void __launch_bounds__(NUM_THREADS)
dispatch_layout(const idx_t* __restrict__ topk_idx, int num_tokens, int* __restrict__ counts,
                u8* __restrict__ is_token_in_rank) {
    __shared__ int s_counts[NUM_RANKS + NUM_EXPERTS];
    for (int i = threadIdx.x; i < NUM_RANKS + NUM_EXPERTS; i += NUM_THREADS) s_counts[i] = 0;
    __syncthreads();

    const int t = blockIdx.x * NUM_THREADS + threadIdx.x;
    if (t < num_tokens) {
        u64 mask = 0;
#pragma unroll
        for (int k = 0; k < TOPK; ++k) {
            const int e = (int)topk_idx[(i64)t * TOPK + k];
            if (e < 0) continue;
            atomicAdd(&s_counts[NUM_RANKS + e], 1);
            mask |= 1ull << (e / EXPERTS_PER_RANK);
        }
#pragma unroll
        for (int r = 0; r < NUM_RANKS; ++r) {
            const bool in_rank = (mask >> r) & 1ull;
            is_token_in_rank[(i64)t * NUM_RANKS + r] = in_rank;
            if (in_rank) atomicAdd(&s_counts[r], 1);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < NUM_RANKS + NUM_EXPERTS; i += NUM_THREADS)
        if (s_counts[i]) atomicAdd(&counts[i], s_counts[i]);
}
