// Signal words of the low-latency kernels: those of low_latency.cu, and the cancelled parts of a
// call (low_latency_cancel.cu) that a rank runs instead when the host refused its arguments.
// Include after common.cuh and, with LL_RDMA=1, transport.cuh.
//
// A signal is a u64 word of the symmetric buffer's control area (this rank's word of rank d's
// [R] array, per half and kind: cupy_ep/geometry.py LLGeometry.signal_offset); waits read its
// low 32 bits, nonzero once set, and the reader zeroes it. Values:
//   dispatch          (blocks << SIG_BLOCK_SHIFT) | slots: each sending block adds its own share
//                     (RDMA without SIGNAL_AMO: the send phase's last block puts the total)
//   combine weights   tokens + 1
//   combine partials  1
// A rank whose call was refused sends the same words with zero slots (every block's share) or
// zero tokens and SIG_CANCELLED set; a receiver reports ST_PEER_BAD_INPUT naming it (check()
// raises it) and goes on with nothing from it, its outputs unspecified. Valid calls send and
// read the same words as before; only the mask of the slots is narrower.
#pragma once

#ifndef LL_RDMA
#define LL_RDMA 0
#endif

namespace ll {

constexpr int SIG_BLOCK_SHIFT = 20;            // dispatch signal: blocks above, slots below
constexpr int SIG_CANCELLED = 1 << 19;         // set by a rank whose call was refused
constexpr int SIG_COUNT = SIG_CANCELLED - 1;   // the slots (dispatch) or tokens + 1 (combine weights)
static_assert(LL_MAX_TOKENS + 1 <= SIG_COUNT, "a signal's count must fit below SIG_CANCELLED");

__device__ __forceinline__ char* sym_at(u64 base, long long off) { return (char*)(base + (u64)off); }

// Signal word of rank r in the signal array at sig_off.
__device__ __forceinline__ u64* signal_at(u64 base, long long sig_off, int r) {
    return (u64*)sym_at(base, sig_off + 8LL * r);
}

// Sets this rank's word of rank d's signal array at sig_off to v (peer: d's mapped buffer, 0 for
// an RDMA destination; RDMA: delivered on return).
__device__ __forceinline__ void signal_set(u64 peer, u64 own, long long sig_off, int d, int rank, int v) {
#if LL_RDMA
    if (peer == 0) {
        xport::signal_put(signal_at(own, sig_off, rank), (u64)(u32)v, d);
        nvshmem_quiet();
        return;
    }
#endif
    st_release_sys((int*)signal_at(peer, sig_off, rank), v);
}

// A signal value v seen from rank src: a refused call's (SIG_CANCELLED) is reported.
__device__ __forceinline__ void report_if_cancelled(int v, const WaitCtx& w, int src) {
    if (v & SIG_CANCELLED) record_error(w.err, ST_PEER_BAD_INPUT, w.kernel, w.rank, src, 0);
}

// The slots a dispatch signal value v from source src counts (a refusal reported: none).
__device__ __forceinline__ int dispatch_slots(int v, const WaitCtx& w, int src) {
    report_if_cancelled(v, w, src);
    return v & SIG_COUNT;
}

}  // namespace ll
