// Number formats (bf16, FP8 e4m3) without cuda_bf16.h / cuda_fp8.h, and warp reductions.
#pragma once
#include "ptx.cuh"

__device__ __forceinline__ float bf16_to_float(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Two floats -> packed bf16x2 (lo in the low half), round to nearest even, NaN kept.
__device__ __forceinline__ u32 f32x2_to_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u16 float_to_bf16(float f) { return (u16)(f32x2_to_bf16x2(f, 0.0f) & 0xffffu); }

// 16 bytes of bf16 (8 values) <-> 8 floats.
__device__ __forceinline__ void bf16x8_to_f32(const int4v& v, float* f) {
    const u32 w[4] = {(u32)v.x, (u32)v.y, (u32)v.z, (u32)v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ void add_bf16x8(float* acc, const int4v& v) {
    float f[8];
    bf16x8_to_f32(v, f);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += f[i];
}

__device__ __forceinline__ int4v f32x8_to_bf16x8(const float* f) {
    int4v v;
    v.x = (int)f32x2_to_bf16x2(f[0], f[1]);
    v.y = (int)f32x2_to_bf16x2(f[2], f[3]);
    v.z = (int)f32x2_to_bf16x2(f[4], f[5]);
    v.w = (int)f32x2_to_bf16x2(f[6], f[7]);
    return v;
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

// The FP8 scale of a block of 128 channels from its amax (the contract's per-token cast:
// amax floored at FP8_AMAX_FLOOR, scale = amax / FP8_MAX, optionally rounded up to a power of two).
template <bool ROUND_POW2>
__device__ __forceinline__ float fp8_scale(float amax) {
    float scale = __fdiv_rn(fmaxf(amax, FP8_AMAX_FLOOR), FP8_MAX);
    if (ROUND_POW2) {
        u32 bits = __float_as_uint(scale);
        if (bits & 0x7fffffu) bits = (bits & 0x7f800000u) + 0x800000u;
        scale = __uint_as_float(bits);
    }
    return scale;
}

// ---------------------------------------------------------------------------------------------
// Warp reductions (every lane gets the result).
// ---------------------------------------------------------------------------------------------
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

__device__ __forceinline__ u32 warp_or(u32 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
