// What the two normal-mode kernel files (intranode.cu, internode.cu) share: the channel split,
// the host-mapped notify results, and the output descriptor the receivers wait for.
#pragma once
#include "common.cuh"

// Channel c of a rank with n tokens covers tokens [n*c/C, n*(c+1)/C).
__device__ __forceinline__ int channel_begin(int num_tokens, int c) {
    return (int)(((i64)num_tokens * c) / NUM_CHANNELS);
}

// host_out (host-mapped int32, cupy_ep/normal.py): [HO_READY] = the call's ready value once the
// rest is written, [HO_ROWS] rows received, [HO_CANCELLED] 1 when bad input on some rank cancelled
// the call, [HO_BAD_RANK] the first such rank (or -1), [HOST_EXPERT + j] rows of local expert j
// rounded up to expert_alignment.
#define HO_READY 0
#define HO_ROWS 1
#define HO_CANCELLED 2
#define HO_BAD_RANK 3
#define HOST_EXPERT 4

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
