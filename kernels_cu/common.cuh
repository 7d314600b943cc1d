// Shared device helpers for every cupy_ep kernel file.
//
// No CUDA headers are included on purpose: the kernels compile with NVRTC alone
// (no toolkit include directory needed), on a machine with or without a GPU.
#pragma once

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct alignas(16) int4v { int x, y, z, w; };

// ---------------------------------------------------------------------------
// Error record: one per Buffer, in device memory. The first kernel that gives
// up on a wait claims it (a device atomic) and copies the report into a
// host-mapped mirror with plain stores, status last; the host reads the mirror
// and raises CommTimeoutError (or another error) naming kernel, rank and peer.
// (Atomics on host memory are avoided: PCIe atomics may not be available.)
// ---------------------------------------------------------------------------
struct ErrorRecord {
    int claimed;          // 0 until a thread reports
    int pad;
    volatile int* host;   // host-mapped int[8]: status, kernel, rank, peer, detail
};

#define EP_TIMEOUT 1
#define EP_OVERFLOW 2

__device__ __forceinline__ u64 global_timer_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void record_error(ErrorRecord* err, int status, int kernel,
                                             int rank, int peer, int detail) {
    if (atomicCAS(&err->claimed, 0, 1) == 0) {
        volatile int* h = err->host;
        h[1] = kernel;
        h[2] = rank;
        h[3] = peer;
        h[4] = detail;
        __threadfence_system();
        h[0] = status;
        __threadfence_system();
    }
}

// ---------------------------------------------------------------------------
// Memory ordering (PTX). "sys" scope: the other side is another GPU reached
// over NVLink (peer-mapped memory) or the host.
// ---------------------------------------------------------------------------
__device__ __forceinline__ int ld_acquire_sys(const int* p) {
    int v;
    asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ int ld_relaxed_sys(const int* p) {
    int v;
    asm volatile("ld.relaxed.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release_sys(int* p, int v) {
    asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void st_relaxed_sys(int* p, int v) {
    asm volatile("st.relaxed.sys.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ u64 ld_acquire_sys_u64(const u64* p) {
    u64 v;
    asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release_sys_u64(u64* p, u64 v) {
    asm volatile("st.release.sys.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void red_add_release_sys(int* p, int v) {
    asm volatile("red.release.sys.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ int atomic_add_release_gpu(int* p, int v) {
    int old;
    asm volatile("atom.release.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

__device__ __forceinline__ void fence_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void fence_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// ---------------------------------------------------------------------------
// 16-byte loads and stores.
// ---------------------------------------------------------------------------
// Read-only input that no one writes during the kernel: non-coherent path.
__device__ __forceinline__ int4v ld_nc_v4(const int4v* p) {
    int4v v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Data another GPU wrote (visibility established by an acquire before it).
__device__ __forceinline__ int4v ld_v4(const int4v* p) {
    int4v v;
    asm volatile("ld.global.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_v4(int4v* p, const int4v& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1,%2,%3,%4};"
                 ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// ---------------------------------------------------------------------------
// Bounded waits. Every wait on another rank goes through these: they give up
// at `deadline` (globaltimer ns), record the error once and return false.
// They also return false early when another thread already recorded an error,
// so that a whole kernel drains quickly once one wait failed.
// ---------------------------------------------------------------------------
struct WaitCtx {
    ErrorRecord* err;
    u64 deadline;
    int kernel;
    int rank;
};

__device__ __forceinline__ WaitCtx make_wait_ctx(ErrorRecord* err, u64 timeout_ns, int kernel, int rank) {
    WaitCtx w;
    w.err = err;
    w.deadline = global_timer_ns() + timeout_ns;
    w.kernel = kernel;
    w.rank = rank;
    return w;
}

__device__ __forceinline__ bool error_seen(const WaitCtx& w) {
    return *(volatile int*)&w.err->claimed != 0;
}

// Waits until *flag >= target (acquire, system scope).
__device__ __forceinline__ bool wait_geq_sys(const int* flag, int target, const WaitCtx& w, int peer) {
    unsigned spins = 0;
    while (ld_acquire_sys(flag) < target) {
        if ((++spins & 1023u) == 0) {
            if (error_seen(w)) return false;
            if (global_timer_ns() > w.deadline) {
                record_error(w.err, EP_TIMEOUT, w.kernel, w.rank, peer, ld_relaxed_sys(flag));
                return false;
            }
        }
    }
    return true;
}

// Waits until *flag >= target for a 64-bit flag (acquire, system scope) and
// returns the value seen through *seen. Used for (epoch << 32 | count) words.
__device__ __forceinline__ bool wait_geq_sys_u64(const u64* flag, u64 target, u64* seen, const WaitCtx& w,
                                                 int peer) {
    unsigned spins = 0;
    u64 v;
    while ((v = ld_acquire_sys_u64(flag)) < target) {
        if ((++spins & 1023u) == 0) {
            if (error_seen(w)) return false;
            if (global_timer_ns() > w.deadline) {
                record_error(w.err, EP_TIMEOUT, w.kernel, w.rank, peer, (int)(v & 0x7fffffffu));
                return false;
            }
        }
    }
    *seen = v;
    return true;
}

// Waits until *flag != 0 and returns it through *value (acquire, system scope).
__device__ __forceinline__ bool wait_nonzero_sys(const int* flag, int* value, const WaitCtx& w, int peer) {
    unsigned spins = 0;
    int v;
    while ((v = ld_acquire_sys(flag)) == 0) {
        if ((++spins & 1023u) == 0) {
            if (error_seen(w)) return false;
            if (global_timer_ns() > w.deadline) {
                record_error(w.err, EP_TIMEOUT, w.kernel, w.rank, peer, 0);
                return false;
            }
        }
    }
    *value = v;
    return true;
}

// Waits until *flag >= target for a flag written by other blocks of this GPU.
__device__ __forceinline__ bool wait_geq_gpu(const int* flag, int target, const WaitCtx& w) {
    unsigned spins = 0;
    while (ld_acquire_gpu(flag) < target) {
        if ((++spins & 1023u) == 0) {
            if (error_seen(w)) return false;
            if (global_timer_ns() > w.deadline) {
                record_error(w.err, EP_TIMEOUT, w.kernel, w.rank, -1, ld_acquire_gpu(flag));
                return false;
            }
        }
    }
    return true;
}

// ---------------------------------------------------------------------------
// Barrier among the ranks of a group (NVLink domain), one call by one block.
// Each rank keeps `arrivals[num_ranks]` in its own buffer: arrivals[p] counts
// the barriers peer p has entered. Counts only grow, so no reset is needed
// and the barrier is safe inside CUDA graphs. `epoch` is this rank's own
// count, in device memory; every rank runs the same sequence of barriers, so
// all ranks agree on it, and kernels use it to tag the words they signal with.
// Returns the new epoch (> 0), or 0 on timeout (error recorded).
// Threads 0..num_ranks-1 of the block take part; all threads must call it.
// ---------------------------------------------------------------------------
__device__ __forceinline__ int group_barrier(int* const* peer_arrivals, int* my_arrivals, int* epoch,
                                             int rank, int num_ranks, const WaitCtx& w) {
    __shared__ int s_target;
    __shared__ int s_ok;
    if (threadIdx.x == 0) {
        s_target = *epoch + 1;
        *epoch = s_target;
        s_ok = 1;
    }
    __syncthreads();
    const int target = s_target;
    if (threadIdx.x < num_ranks) {
        fence_sys();
        red_add_release_sys(peer_arrivals[threadIdx.x] + rank, 1);
        if (!wait_geq_sys(my_arrivals + threadIdx.x, target, w, threadIdx.x)) s_ok = 0;
    }
    __syncthreads();
    return s_ok ? target : 0;
}

// ---------------------------------------------------------------------------
// Number formats. bf16 and FP8 e4m3 conversions without cuda_bf16.h/cuda_fp8.h.
// ---------------------------------------------------------------------------
__device__ __forceinline__ float bf16_to_float(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 float_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                        // round to nearest even
    return (u16)(u >> 16);
}

// Two floats -> two e4m3 bytes (lo in the low byte), round to nearest, saturating.
__device__ __forceinline__ u16 float2_to_e4m3x2(float lo, float hi) {
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// Two e4m3 bytes -> two floats.
__device__ __forceinline__ void e4m3x2_to_float2(u16 v, float* lo, float* hi) {
    u32 h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(v));
    u16 l16 = (u16)(h2 & 0xffffu), h16 = (u16)(h2 >> 16);
    float a, b;
    asm("cvt.f32.f16 %0, %1;" : "=f"(a) : "h"(l16));
    asm("cvt.f32.f16 %0, %1;" : "=f"(b) : "h"(h16));
    *lo = a;
    *hi = b;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
