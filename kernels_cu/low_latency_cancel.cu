// The cancelled parts of the low-latency calls: ll_dispatch_cancelled, ll_combine_cancelled.
//
// A rank whose low_latency_dispatch or low_latency_combine the host refused (its arguments
// failed validation, or a compile agreement told it of a peer's refusal) launches one of these
// instead of the call's kernels, so that its peers' kernels complete the call without waiting
// for a timeout. It reads no argument of the call and no data: it sends the signals the call's
// kernels would send, with nothing behind them (zero slots, zero tokens) and, when this rank
// refused (cancel = 1), SIG_CANCELLED (ll_signals.cuh), which the peers' kernels report; and it
// waits for (bounded) and zeroes the signals the peers send it, as the call's receiver would, so
// that the signal words, and the halves that alternate between calls, stay in step.
//
// Shrink mode (mask != null: this rank's mask, int32 [R], 1 = masked): as the call's kernels
// built with SHRINK=1, nothing is sent to a masked rank nor awaited from it, and a rank whose
// signal has not come by the deadline is masked instead of a timeout being recorded.
//
// Shape-free (the ranks and the grid size are arguments), so one module serves every call of a
// Buffer; it is loaded when the engine is made (cupy_ep/low_latency.py), as a refusal must not
// compile (a compile agreement the peers would not join). One block; any block size.
// Compiled with LL_RDMA=1 (from low_latency_cancel_rdma.cu) it signals peers without a mapping
// (peers[r] == 0) through NVSHMEM, as the call's kernels of low_latency_rdma.cu do.
//
// @constants CHAOS=0
// @constants CHAOS=1
#include "common.cuh"
#include "ll_signals.cuh"

namespace {

enum Arrival { ARRIVED, SKIPPED, TIMED_OUT };

__device__ __forceinline__ bool is_masked(const int* mask, int r) {
    return mask != nullptr && *(const volatile int*)(mask + r) != 0;
}

// Waits until rank r's word `sig` holds at least `least` (> 0). Without a mask, a rank that does
// not come by the deadline records a timeout (TIMED_OUT); in shrink mode a masked rank is
// SKIPPED, and so is one that does not come by the deadline, which is masked.
__device__ __forceinline__ Arrival await_rank(const int* sig, int least, int r, int* mask, const WaitCtx& w) {
    unsigned spins = 0;
    int v;
    while ((v = ld_acquire_sys(sig)) < least) {
        if (mask == nullptr) {
            if (!keep_waiting(w, spins, r, v)) return TIMED_OUT;
        } else if (is_masked(mask, r)) {
            return SKIPPED;
        } else if ((++spins & 1023u) == 0 && global_timer_ns() > w.deadline) {
            atomicExch(mask + r, 1);
            return SKIPPED;
        }
    }
    return ARRIVED;
}

}  // namespace

// Dispatch: every rank gets this rank's signal of all `num_blocks` blocks and zero slots; then
// every source's signal is awaited and zeroed.
extern "C" __global__ void ll_dispatch_cancelled(const u64* __restrict__ peers, int num_ranks,
                                                 long long sig_off,   // this half's dispatch signals
                                                 int num_blocks,      // the call's grid on every rank
                                                 int cancel, int* mask, StatusRecord* err, u64 timeout_ns,
                                                 int rank) {
    using namespace ll;
    const WaitCtx w = make_wait_ctx(err, timeout_ns, KID_LOW_LATENCY_DISPATCH, rank);
    const u64 own = peers[rank];
    const int all_blocks = num_blocks << SIG_BLOCK_SHIFT;
    for (int d = threadIdx.x; d < num_ranks; d += blockDim.x) {
        if (is_masked(mask, d)) continue;
        chaos_pause();
        signal_set(peers[d], own, sig_off, d, rank, all_blocks | (cancel ? SIG_CANCELLED : 0));
    }
    for (int s = threadIdx.x; s < num_ranks; s += blockDim.x) {
        if (await_rank((const int*)signal_at(own, sig_off, s), all_blocks, s, mask, w) == TIMED_OUT) return;
        st_relaxed_sys_u64(signal_at(own, sig_off, s), 0ull);
    }
}

// Combine: every rank gets this rank's weights signal of zero tokens; for every source, its
// weights signal is awaited and zeroed and the source told that this rank's (no) partials are
// complete; then every rank's partials signal is awaited (a deadline of its own: they follow the
// peers' waits for weights) and zeroed.
extern "C" __global__ void ll_combine_cancelled(const u64* __restrict__ peers, int num_ranks,
                                                long long wsig_off,   // this half's weight signals
                                                long long psig_off,   // this half's partial signals
                                                int cancel, int* mask, StatusRecord* err, u64 timeout_ns,
                                                int rank) {
    using namespace ll;
    const WaitCtx w = make_wait_ctx(err, timeout_ns, KID_LOW_LATENCY_COMBINE, rank);
    const u64 own = peers[rank];
    for (int d = threadIdx.x; d < num_ranks; d += blockDim.x) {
        if (is_masked(mask, d)) continue;
        chaos_pause();
        signal_set(peers[d], own, wsig_off, d, rank, 1 | (cancel ? SIG_CANCELLED : 0));
    }
    for (int s = threadIdx.x; s < num_ranks; s += blockDim.x) {
        const Arrival got = await_rank((const int*)signal_at(own, wsig_off, s), 1, s, mask, w);
        if (got == TIMED_OUT) return;
        if (got == SKIPPED) continue;
        st_relaxed_sys_u64(signal_at(own, wsig_off, s), 0ull);
        fence_sys();
        chaos_pause();
        signal_set(peers[s], own, psig_off, s, rank, 1);
    }
    const WaitCtx wp = make_wait_ctx(err, timeout_ns, KID_LOW_LATENCY_COMBINE, rank);
    for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) {
        if (await_rank((const int*)signal_at(own, psig_off, r), 1, r, mask, wp) == TIMED_OUT) return;
        st_relaxed_sys_u64(signal_at(own, psig_off, r), 0ull);
    }
}
