// The cross-domain transport of the internode kernels: every remote operation between NVLink
// domains goes through these few functions, which use NVSHMEM's public device API only, so
// that the same kernels run over any transport NVSHMEM has: P2P (one host), IBGDA, IBRC, UCX,
// libfabric.
//
//   put_signal_warp   one warp: bytes from this PE's symmetric memory to the same offsets on
//                     `pe`, then `*sig = value` there (after the data, and after this PE's earlier
//                     puts to `pe`)
//   signal_put        `*sig = value` on `pe` (after this PE's earlier puts to `pe`)
//   signal_read       a signal in this PE's symmetric memory, as NVSHMEM's consistency rules see it
//   signal_acquire    after a signal was seen: the data it guards is visible to this thread
//   quiet             every put this PE issued is complete
// Signals carry (epoch << 32 | count) values that only grow, so SET is enough and a late
// value of an earlier call never satisfies a wait.
//
// A signal is an 8-byte put (nvshmem_uint64_p) ordered after its data by nvshmem_fence, not a
// remote atomic: NVSHMEM's proxy transports (UCX, IBRC without GDRCopy, ...) cannot do remote
// atomics everywhere, while every transport orders puts to one PE across a fence. SIGNAL_AMO=1
// (CUPY_EP_SIGNAL_AMO=1, for comparison) restores nvshmemx_signal_op / put-with-signal.
//
// With CHAOS=1 (tests) a put_signal becomes put, fence, random pause, signal (with SIGNAL_AMO=0
// it always is), and every signal is preceded by a random pause: the P2P transport then no longer
// delivers data and signal together.
#pragma once
#if defined(__CUDACC_RTC__) && !defined(__NVSHMEM_NUMBA_SUPPORT__)
#define __NVSHMEM_NUMBA_SUPPORT__ 1
#endif
#include <nvshmem.h>
#include <nvshmemx.h>
#include "common.cuh"

#ifndef SIGNAL_AMO
#define SIGNAL_AMO 0
#endif

namespace xport {

__device__ __forceinline__ void signal_put(u64* sig, u64 value, int pe) {
    nvshmem_fence();
    chaos_pause();
#if SIGNAL_AMO
    nvshmemx_signal_op((uint64_t*)sig, (uint64_t)value, NVSHMEM_SIGNAL_SET, pe);
#else
    nvshmem_uint64_p((uint64_t*)sig, (uint64_t)value, pe);
#endif
}

__device__ __forceinline__ void put_signal_warp(void* dst, const void* src, size_t bytes, u64* sig, u64 value,
                                                int pe) {
    const int lane = threadIdx.x & 31;
    if (lane == 0) {
        fence_sys();         // this warp's (and, after a block barrier, the block's) stores to src first
        nvshmem_fence();     // after this PE's earlier puts to pe
    }
    __syncwarp();
#if SIGNAL_AMO && !CHAOS
    nvshmemx_putmem_signal_nbi_warp(dst, src, bytes, (uint64_t*)sig, (uint64_t)value, NVSHMEM_SIGNAL_SET, pe);
#else
    nvshmemx_putmem_nbi_warp(dst, src, bytes, pe);
    if (lane == 0) signal_put(sig, value, pe);
#endif
    __syncwarp();
}

__device__ __forceinline__ u64 signal_read(const u64* sig) {
    return (u64)nvshmem_signal_fetch((uint64_t*)sig);
}

// Loads after this one see what the signal's writer put before it (system-scope acquire: the
// writer may be a NIC or NVSHMEM's proxy thread, not a GPU thread).
__device__ __forceinline__ void signal_acquire() { fence_sys(); }

__device__ __forceinline__ void quiet() { nvshmem_quiet(); }

// Waits until the signal at `sig` (this PE's symmetric memory) is >= target; the data it guards
// is visible afterwards. False once the deadline passed (timeout recorded) or another thread
// recorded a timeout.
__device__ __forceinline__ bool wait_signal_geq(const u64* sig, u64 target, u64* seen, const WaitCtx& w, int peer) {
    unsigned spins = 0;
    u64 v;
    while ((v = signal_read(sig)) < target)
        if (!keep_waiting(w, spins, peer, (int)(v & 0x7fffffffu))) return false;
    signal_acquire();
    *seen = v;
    return true;
}

}  // namespace xport
