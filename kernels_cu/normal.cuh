// What the two normal-mode kernel files (intranode.cu, internode.cu) share: the channel split,
// the host-mapped notify results, and the output descriptor the receivers wait for.
#pragma once
#include "common.cuh"

// Channel c of a rank with n tokens covers tokens [n*c/C, n*(c+1)/C).
__device__ __forceinline__ int channel_begin(int num_tokens, int c) {
    return (int)(((i64)num_tokens * c) / NUM_CHANNELS);
}

// The checks of topk_idx the reference backend makes on the host, shared by both notify kernels
// (kernel: their id for the report): every expert id in [-1, E); the ranks holding a token's
// experts are exactly the ranks is_token_in_rank marks (detail 1); the selections per expert match
// num_tokens_per_expert (detail 2). Without topk_idx (TOPK == 0) only that those counts are not
// negative. Reports the first problem found; true in a thread that found one. It holds block
// barriers: every thread must call it (first in an ||, never after a per-thread condition).
__device__ __forceinline__ bool topk_disagrees(int kernel, int rank, int num_tokens, const i64* __restrict__ topk_idx,
                                               const u8* __restrict__ in_rank, const int* __restrict__ per_expert,
                                               StatusRecord* err) {
    constexpr int E = E_LOCAL * NUM_RANKS;
    bool bad = false;
#if TOPK == 0
    for (int e = threadIdx.x; e < E; e += NUM_THREADS)
        if (per_expert[e] < 0) {
            record_error(err, ST_BAD_LAYOUT, kernel, rank, -1, 2, e);
            bad = true;
        }
#else
    __shared__ int s_expert[E];
    for (int e = threadIdx.x; e < E; e += NUM_THREADS) s_expert[e] = 0;
    __syncthreads();
    // A thread judges its tokens TOKEN_BATCH at a time, every load of the batch issued before any
    // result is judged: each token's top-k row and its is_token_in_rank row. Up to 32 ranks the
    // row is kept as a bit mask, so that the mark at each slot's rank is read from registers; with
    // more ranks the marks at the slots that open a new rank are loaded after the ids. (One block
    // checks every token of the rank: at 4096 tokens, 1024 threads, 4 tokens a thread, this is 2
    // memory round trips a thread instead of 2 a token.)
    constexpr int TOKEN_BATCH = 2;
    for (int t0 = threadIdx.x; t0 < num_tokens; t0 += NUM_THREADS * TOKEN_BATCH) {
        i64 ids[TOKEN_BATCH][TOPK];
        u32 marks[TOKEN_BATCH];   // bit r: is_token_in_rank[t, r] (NUM_RANKS <= 32)
        int num_marked[TOKEN_BATCH];
#pragma unroll
        for (int b = 0; b < TOKEN_BATCH; ++b) {
            const int t = t0 + b * NUM_THREADS;
            marks[b] = 0;
            num_marked[b] = 0;
            if (t >= num_tokens) continue;
#pragma unroll
            for (int k = 0; k < TOPK; ++k) ids[b][k] = topk_idx[(i64)t * TOPK + k];
#pragma unroll 8
            for (int r = 0; r < NUM_RANKS; ++r) {
                const bool m = in_rank[(i64)t * NUM_RANKS + r] != 0;
                num_marked[b] += m ? 1 : 0;
                if (NUM_RANKS <= 32) marks[b] |= (m ? 1u : 0u) << (r & 31);
            }
        }
#pragma unroll
        for (int b = 0; b < TOKEN_BATCH; ++b) {
            const int t = t0 + b * NUM_THREADS;
            if (t >= num_tokens) continue;
            int rank_of[TOPK];   // the rank of slot k's expert, -1 for no or a bad expert
            bool opens[TOPK];    // slot k is the first slot on its rank (in top-k order)
#pragma unroll
            for (int k = 0; k < TOPK; ++k) {
                rank_of[k] = (ids[b][k] >= 0 && ids[b][k] < E) ? (int)ids[b][k] / E_LOCAL : -1;
                opens[k] = rank_of[k] >= 0;
#pragma unroll
                for (int j = 0; j < k; ++j) opens[k] = opens[k] && rank_of[j] != rank_of[k];
            }
            bool marked_at[TOPK];
#pragma unroll
            for (int k = 0; k < TOPK; ++k) {
                if (NUM_RANKS <= 32)
                    marked_at[k] = !opens[k] || ((marks[b] >> (rank_of[k] & 31)) & 1u);
                else
                    marked_at[k] = !opens[k] || in_rank[(i64)t * NUM_RANKS + rank_of[k]];
            }
            int num_token_ranks = 0;   // the distinct ranks of the token's experts
#pragma unroll
            for (int k = 0; k < TOPK; ++k) {
                const i64 e = ids[b][k];
                if (e == -1) continue;
                if (e < -1 || e >= E) {
                    record_error(err, ST_BAD_EXPERT, kernel, rank, -1, (int)e, t);
                    bad = true;
                    continue;
                }
                atomicAdd(&s_expert[e], 1);
                if (!opens[k]) continue;
                ++num_token_ranks;
                if (!marked_at[k]) {
                    record_error(err, ST_BAD_LAYOUT, kernel, rank, -1, 1, t);
                    bad = true;
                }
            }
            if (num_marked[b] != num_token_ranks) {
                record_error(err, ST_BAD_LAYOUT, kernel, rank, -1, 1, t);
                bad = true;
            }
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += NUM_THREADS)
        if (s_expert[e] != per_expert[e]) {
            record_error(err, ST_BAD_LAYOUT, kernel, rank, -1, 2, e);
            bad = true;
        }
#endif
    return bad;
}

// host_out (host-mapped int32, cupy_ep/normal.py; its size: cupy_ep/geometry.py): [HO_READY] =
// the call's ready value once the rest is written, [HO_ROWS] rows received, [HO_CANCELLED] 1 when
// bad input on some rank cancelled the call, [HO_BAD_RANK] the first such rank (or -1),
// [HOST_EXPERT + j] rows of local expert j rounded up to expert_alignment (HOST_EXPERT: a JIT
// constant of cupy_ep/limits.py).
#define HO_READY 0
#define HO_ROWS 1
#define HO_CANCELLED 2
#define HO_BAD_RANK 3
static_assert(HOST_EXPERT > HO_BAD_RANK, "host_out: the per-expert counts follow the outcome");

// Thread 0 of a notify kernel, once everything else the host reads is written: the call's outcome
// to the dispatch kernel (call_status) and to the host (host_out, ready last). bad_rank: the
// first rank whose input was bad, which cancels the call on every rank; over_rank: the first rank
// to receive more rows (over_total) than its num_worst_tokens (over_allowed). NUM_RANKS: none.
__device__ __forceinline__ void publish_notify_outcome(int kernel, int rank, int rows, int bad_rank, int over_rank,
                                                       int over_total, int over_allowed, int num_worst_tokens,
                                                       int* call_status, volatile int* host_out, StatusRecord* err,
                                                       int ready_value) {
    const bool cancelled = bad_rank < NUM_RANKS;
    *call_status = cancelled ? 1 : 0;
    host_out[HO_ROWS] = rows;
    host_out[HO_CANCELLED] = cancelled ? 1 : 0;
    host_out[HO_BAD_RANK] = cancelled ? bad_rank : -1;
    // Without a host wait (num_worst_tokens), the report is how the host learns.
    if (num_worst_tokens > 0 && cancelled && bad_rank != rank)
        record_error(err, ST_PEER_BAD_INPUT, kernel, rank, bad_rank, 0);
    if (!cancelled && over_rank < NUM_RANKS)
        record_error(err, ST_OVERFLOW, kernel, over_rank, -1, over_total, over_allowed);
    __threadfence_system();
    host_out[HO_READY] = ready_value;
}

// Where the receivers write: the arrays given at launch, or (non-worst-token dispatch, whose
// outputs are allocated once the host knows their size) the ones the host publishes in a
// host-mapped descriptor [seq, recv_x, recv_scales, recv_topk_idx, recv_topk_weights, rows].
struct RecvOut {
    int4v* x;
    float* scales;
    i64* topk_idx;
    float* topk_weights;
    int rows;
};

__device__ __forceinline__ bool receive_outputs(RecvOut& out, const volatile u64* desc, u64 desc_seq,
                                                const WaitCtx& w) {
    __shared__ RecvOut s_out;
    __shared__ int s_ok;
    if (desc == nullptr) return true;
    if (threadIdx.x == 0) {
        unsigned spins = 0;
        s_ok = 1;
        while (desc[0] != desc_seq) {
            if (!keep_waiting(w, spins, -1, 0)) {
                s_ok = 0;
                break;
            }
        }
        fence_sys();   // the fields after the sequence number the host wrote last
        if (s_ok) {
            s_out.x = reinterpret_cast<int4v*>(desc[1]);
            s_out.scales = reinterpret_cast<float*>(desc[2]);
            s_out.topk_idx = reinterpret_cast<i64*>(desc[3]);
            s_out.topk_weights = reinterpret_cast<float*>(desc[4]);
            s_out.rows = (int)(i64)desc[5];
        }
    }
    __syncthreads();
    if (!s_ok) return false;
    out = s_out;
    return true;
}
