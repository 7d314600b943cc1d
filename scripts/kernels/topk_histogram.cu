// Routing statistics of a top-k selection: how many (token, expert) pairs each expert gets,
// and how many tokens each rank gets (a token counts once per rank however many of its
// experts live there). An example of a user kernel file compiled with cupy_ep.jit.
//
// Compile-time constants (cupy_ep.jit.compile_module(..., constants)):
//   NUM_EXPERTS  number of experts E (shared-memory histogram size)
//   NUM_RANKS    number of ranks R, E % R == 0, R <= 64; expert e lives on rank e / (E / R)
//   TOPK         experts per token K
//   IDX_T        element type of topk_idx: i64 or int (-1 = no expert in that slot)
//   NUM_THREADS  threads per block (the launch must use this many)
// @constants NUM_EXPERTS=256 NUM_RANKS=8 TOPK=8 IDX_T=i64 NUM_THREADS=256
// @constants NUM_EXPERTS=48 NUM_RANKS=3 TOPK=9 IDX_T=int NUM_THREADS=128
#include "common.cuh"

static_assert(NUM_EXPERTS % NUM_RANKS == 0, "NUM_EXPERTS must be a multiple of NUM_RANKS");
static_assert(NUM_RANKS <= 64, "the per-token rank mask has 64 bits");
constexpr int EXPERTS_PER_RANK = NUM_EXPERTS / NUM_RANKS;

// Grid-stride over tokens. Outputs must be zeroed before the launch (counts are added).
extern "C" __global__ void __launch_bounds__(NUM_THREADS)
topk_histogram(const IDX_T* __restrict__ topk_idx, int num_tokens,
               int* __restrict__ tokens_per_expert, int* __restrict__ tokens_per_rank) {
    __shared__ int s_expert[NUM_EXPERTS];
    __shared__ int s_rank[NUM_RANKS];
    for (int i = threadIdx.x; i < NUM_EXPERTS; i += NUM_THREADS) s_expert[i] = 0;
    for (int i = threadIdx.x; i < NUM_RANKS; i += NUM_THREADS) s_rank[i] = 0;
    __syncthreads();

    for (int t = blockIdx.x * NUM_THREADS + threadIdx.x; t < num_tokens; t += gridDim.x * NUM_THREADS) {
        u64 ranks = 0;
#pragma unroll
        for (int k = 0; k < TOPK; ++k) {
            const long long e = (long long)topk_idx[(i64)t * TOPK + k];
            if (e < 0 || e >= NUM_EXPERTS) continue;
            atomicAdd(&s_expert[e], 1);
            ranks |= 1ull << (e / EXPERTS_PER_RANK);
        }
        while (ranks) {
            const int r = __ffsll((long long)ranks) - 1;
            atomicAdd(&s_rank[r], 1);
            ranks &= ranks - 1;
        }
    }
    __syncthreads();

    for (int i = threadIdx.x; i < NUM_EXPERTS; i += NUM_THREADS)
        if (s_expert[i]) atomicAdd(&tokens_per_expert[i], s_expert[i]);
    for (int i = threadIdx.x; i < NUM_RANKS; i += NUM_THREADS)
        if (s_rank[i]) atomicAdd(&tokens_per_rank[i], s_rank[i]);
}
