// The device status record, bounded waits, and the test-only chaos delays.
//
// Status codes (ST_*), kernel ids (KID_*) and the record's host fields come from
// cupy_ep/limits.py as JIT constants; cupy_ep/memory.py reads the record on the host.
#pragma once
#include "ptx.cuh"

#ifndef CHAOS
#define CHAOS 0
#endif

// ---------------------------------------------------------------------------------------------
// Status record: one per Buffer, in device memory. The first thread that reports claims it
// (a device atomic) and copies its report into a host-mapped mirror with plain stores, status
// last; the host reads the mirror without synchronising. (No atomics on host memory: PCIe
// atomics may be missing.) Reports of bad input or overflow are soft: the protocol goes on and
// the Buffer stays usable. A timeout is hard and replaces a soft report, so that the host always
// learns that the Buffer is broken. (A soft and a hard report written at the same moment could
// mix fields; soft reports come at a kernel's start, timeouts only after timeout_ns.)
// Mirror fields (int32): [0] status, [1] kernel, [2] rank, [3] peer, [4] detail, [5] detail2,
// [6] channel.
// ---------------------------------------------------------------------------------------------
struct StatusRecord {
    int claimed;          // 0 until a thread reports, 1 for a soft report, 2 for a timeout
    int status;           // the reported status, for kernels that act on an earlier report
    volatile int* host;   // host-mapped int[8]
};

__device__ __forceinline__ bool claim_record(StatusRecord* err, int status) {
    if (status == ST_TIMEOUT) return atomicExch(&err->claimed, 2) != 2;
    return atomicCAS(&err->claimed, 0, 1) == 0;
}

__device__ __forceinline__ void record_error(StatusRecord* err, int status, int kernel, int rank, int peer,
                                             int detail, int detail2 = 0, int channel = -1) {
    if (claim_record(err, status)) {
        *(volatile int*)&err->status = status;
        volatile int* h = err->host;
        h[1] = kernel;
        h[2] = rank;
        h[3] = peer;
        h[4] = detail;
        h[5] = detail2;
        h[6] = channel;
        __threadfence_system();
        h[0] = status;
        __threadfence_system();
    }
}

// ---------------------------------------------------------------------------------------------
// Chaos (compile-time, tests only): random pauses before signals and between chunks, so that
// ordering bugs the fast NVLink path hides have a chance to show.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void chaos_pause() {
#if CHAOS
    u32 h = (u32)global_timer_ns() * 2654435761u ^ (blockIdx.x * 40503u + threadIdx.x * 9973u);
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    if ((h & 3u) != 0) sleep_ns(h % CHAOS_MAX_PAUSE_NS);
#endif
}

// ---------------------------------------------------------------------------------------------
// Bounded waits. Every wait on another rank goes through these: they give up at `deadline`
// (globaltimer ns), record a timeout once and return false. They also return false early when
// another thread already recorded a timeout, so that a whole kernel drains once one wait failed.
// A soft report (bad input, overflow) never stops a wait: the ranks must still finish the call's
// protocol together, or the peers would time out.
// ---------------------------------------------------------------------------------------------
struct WaitCtx {
    StatusRecord* err;
    u64 deadline;
    int kernel;
    int rank;
    int channel;
};

__device__ __forceinline__ WaitCtx make_wait_ctx(StatusRecord* err, u64 timeout_ns, int kernel, int rank,
                                                 int channel = -1) {
    WaitCtx w;
    w.err = err;
    w.deadline = global_timer_ns() + timeout_ns;
    w.kernel = kernel;
    w.rank = rank;
    w.channel = channel;
    return w;
}

__device__ __forceinline__ bool timeout_seen(const WaitCtx& w) { return *(volatile int*)&w.err->claimed == 2; }

// A report of bad input (not a timeout) is pending: the next collective call must be cancelled.
__device__ __forceinline__ bool bad_input_pending(const StatusRecord* err) {
    const int st = *(const volatile int*)&err->status;
    return st == ST_BAD_EXPERT || st == ST_BAD_LAYOUT || st == ST_PEER_BAD_INPUT;
}

// One step of a polling loop: false (and the timeout recorded) once the deadline passed or
// another thread recorded a timeout. Checks the clock every 1024 calls.
__device__ __forceinline__ bool keep_waiting(const WaitCtx& w, unsigned& spins, int peer, int seen) {
    if ((++spins & 1023u) != 0) return true;
    if (timeout_seen(w)) return false;
    if (global_timer_ns() > w.deadline) {
        record_error(w.err, ST_TIMEOUT, w.kernel, w.rank, peer, seen, 0, w.channel);
        return false;
    }
    return true;
}

// Waits until *flag >= target (acquire, system scope).
__device__ __forceinline__ bool wait_geq_sys(const int* flag, int target, const WaitCtx& w, int peer) {
    unsigned spins = 0;
    int v;
    while ((v = ld_acquire_sys(flag)) < target)
        if (!keep_waiting(w, spins, peer, v)) return false;
    return true;
}

// Waits until *flag >= target for a 64-bit flag (acquire, system scope); returns the value seen
// through *seen. Used for (epoch << 32 | count) words.
__device__ __forceinline__ bool wait_geq_sys_u64(const u64* flag, u64 target, u64* seen, const WaitCtx& w,
                                                 int peer) {
    unsigned spins = 0;
    u64 v;
    while ((v = ld_acquire_sys_u64(flag)) < target)
        if (!keep_waiting(w, spins, peer, (int)(v & 0x7fffffffu))) return false;
    *seen = v;
    return true;
}

// Waits until *flag != 0 and returns it through *value (acquire, system scope).
__device__ __forceinline__ bool wait_nonzero_sys(const int* flag, int* value, const WaitCtx& w, int peer) {
    unsigned spins = 0;
    int v;
    while ((v = ld_acquire_sys(flag)) == 0)
        if (!keep_waiting(w, spins, peer, 0)) return false;
    *value = v;
    return true;
}

// Waits until *flag >= target for a flag written by other blocks of this GPU.
__device__ __forceinline__ bool wait_geq_gpu(const int* flag, int target, const WaitCtx& w) {
    unsigned spins = 0;
    int v;
    while ((v = ld_acquire_gpu(flag)) < target)
        if (!keep_waiting(w, spins, -1, v)) return false;
    return true;
}

// (epoch << 32 | count): tags a count with the call it belongs to, so that a stale value from
// an earlier call never satisfies a wait and nothing needs resetting (CUDA-graph safe).
__device__ __forceinline__ u64 tagged(int epoch, int count) { return ((u64)(u32)epoch << 32) | (u32)count; }

// Profiling checkpoint (thread 0 of the block; prof == null: nothing). Slot 0 is the block's
// start, PROF_END its end: max(end) - min(start) over blocks is the kernel's duration.
__device__ __forceinline__ void prof_mark(u64* prof, int slot) {
    if (prof != nullptr && threadIdx.x == 0) prof[blockIdx.x * PROF_SLOTS + slot] = global_timer_ns();
}
