// LogFMT-10 rows of the low-latency combine (USE_LOGFMT): the device half of cupy_ep/logfmt.py,
// which documents the format. Every step uses the same integer and IEEE float32 operations
// (explicit _rn intrinsics, no contraction) in the same order as the NumPy codec, so both agree
// bit for bit. A 128-channel group is held by 16 lanes, 8 consecutive channels each (lane j of
// the group: channels 8j .. 8j+7); all 32 lanes of the warp must call these functions.
// The numbers below are cupy_ep/logfmt.py's (tests/test_logfmt.py compares them).
#pragma once
#include "common.cuh"

namespace logfmt {

constexpr int GROUP = 128;
constexpr int GROUP_BYTES = 164;          // 128 low bytes, 32 bytes of high bits, 4 meta bytes
constexpr int LEVELS = 511;
constexpr int CLIP_BINADES = 32;
constexpr int BINADE = 1 << 15;
constexpr int MAX_FINITE_CODE = 0x7F7FFF;
constexpr int INF_CODE = 0x7F8000;
constexpr int LINEAR_MIN_HI = 0x0800;
constexpr u32 LINEAR_FLAG = 1u << 31, NONFINITE_FLAG = 1u << 30;
constexpr u32 FULL_MASK = 0xffffffffu;

// Byte offset of channel ch (a multiple of 8) in an encoded row.
__device__ __forceinline__ long long byte_of(int ch) { return (long long)(ch / GROUP) * GROUP_BYTES; }

__device__ __forceinline__ int clamp_level(float f) {   // float level -> 0..LEVELS (floor, saturating)
    const float c = fminf(fmaxf(floorf(f), 0.f), (float)LEVELS);
    return (int)c;
}

__device__ __forceinline__ float log_decode(int q, int lo, int hi, float step) {
    if (q == 0) return 0.f;
    int code = (lo << 8) + (int)rintf(__fmul_rn((float)(q - 1), step));
    code = min(code, MAX_FINITE_CODE);
    return __uint_as_float((u32)code << 8);
}

// Sum over the group of this lane's 8 terms in order, then the 16-lane butterfly.
__device__ __forceinline__ float group_sum(const float (&sq)[8]) {
    float s = sq[0];
#pragma unroll
    for (int i = 1; i < 8; ++i) s = __fadd_rn(s, sq[i]);
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) s = __fadd_rn(s, __shfl_xor_sync(FULL_MASK, s, o));
    return s;
}

// Encodes this lane's 8 values v of its group; stores its bytes into the group at g (the row's
// bytes of the group, 4-byte aligned): low bytes, its share of the high bits (even lanes store a
// pair's), the meta word (lane 0 of the group). `store` false: shuffles only (lanes past H).
__device__ __forceinline__ void encode_store(const float (&v)[8], char* g, bool store) {
    const int j = threadIdx.x & 15;
    int code[8];
    float mag[8];
    u32 sign[8];
    int cmax = 0, cmin = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u32 b = __float_as_uint(v[i]);
        sign[i] = b >> 31;
        mag[i] = __uint_as_float(b & 0x7fffffffu);
        code[i] = (int)((b & 0x7fffffffu) >> 8);
        cmax = max(cmax, code[i]);
        if (code[i] > 0) cmin = min(cmin, code[i]);
    }
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) {
        cmax = max(cmax, __shfl_xor_sync(FULL_MASK, cmax, o));
        cmin = min(cmin, __shfl_xor_sync(FULL_MASK, cmin, o));
    }
    if (cmin == 0x7fffffff) cmin = cmax;
    const bool nonfinite = cmax >= INF_CODE;
    const int lo = max(cmin, cmax - CLIP_BINADES * BINADE) >> 8;
    const int hi = min((cmax >> 8) + 1, INF_CODE >> 8);
    const float span = (float)((hi - lo) << 8);
    const float scale = __fdiv_rn((float)(LEVELS - 1), span);
    const float log_step = __fdiv_rn(span, (float)(LEVELS - 1));
    const bool lin_ok = hi >= LINEAR_MIN_HI && !nonfinite;
    const float a = __uint_as_float((u32)min(hi, 0x7F7F) << 16);
    const float lin_scale = __fdiv_rn((float)LEVELS, lin_ok ? a : 1.f);
    const float lin_step = __fdiv_rn(a, (float)LEVELS);

    int q_log[8], q_lin[8];
    float sq_log[8], sq_lin[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float t = __fmul_rn((float)(code[i] - (lo << 8)), scale);
        q_log[i] = code[i] == 0 ? 0 : clamp_level(__fadd_rn(t, 1.5f));
        q_lin[i] = clamp_level(__fadd_rn(__fmul_rn(mag[i], lin_scale), 0.5f));
        const float dl = __fmul_rn(__fsub_rn(log_decode(q_log[i], lo, hi, log_step), mag[i]), lin_scale);
        const float dn = __fmul_rn(__fsub_rn(__fmul_rn((float)q_lin[i], lin_step), mag[i]), lin_scale);
        sq_log[i] = __fmul_rn(dl, dl);
        sq_lin[i] = __fmul_rn(dn, dn);
    }
    const float e_log = group_sum(sq_log), e_lin = group_sum(sq_lin);
    const bool linear = lin_ok && e_lin < e_log;

    u32 low[2] = {0u, 0u}, high = 0u;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u32 v10 = (sign[i] << 9) | (u32)(linear ? q_lin[i] : q_log[i]);
        low[i / 4] |= (v10 & 0xffu) << (8 * (i % 4));
        high |= (v10 >> 8) << (2 * i);
    }
    const u32 partner = __shfl_down_sync(FULL_MASK, high, 1);
    if (!store) return;
    st_i32(g + 8 * j, (int)low[0]);
    st_i32(g + 8 * j + 4, (int)low[1]);
    if ((j & 1) == 0) st_i32(g + GROUP + 2 * j, (int)(high | (partner << 16)));
    if (j == 0) {
        const u32 meta = linear ? (((u32)hi << 15) | LINEAR_FLAG)
                                : ((u32)lo | ((u32)hi << 15) | (nonfinite ? NONFINITE_FLAG : 0u));
        st_i32(g + GROUP + 32, (int)meta);
    }
}

// Decodes this lane's 8 values of the group at g (written by peers: L2-coherent loads) and adds
// them to acc in order.
__device__ __forceinline__ void load_decode_add(const char* g, float* acc) {
    const int j = threadIdx.x & 15;
    const u32 low[2] = {(u32)ld_cg_i32(g + 8 * j), (u32)ld_cg_i32(g + 8 * j + 4)};
    const u32 high = ((u32)ld_cg_i32(g + GROUP + 4 * (j >> 1)) >> (16 * (j & 1))) & 0xffffu;
    const u32 meta = (u32)ld_cg_i32(g + GROUP + 32);
    const int lo = (int)(meta & 0x7fffu), hi = (int)((meta >> 15) & 0x7fffu);
    const bool linear = (meta & LINEAR_FLAG) != 0, nonfinite = (meta & NONFINITE_FLAG) != 0;
    const float log_step = __fdiv_rn((float)((hi - lo) << 8), (float)(LEVELS - 1));
    const float lin_step = __fdiv_rn(__uint_as_float((u32)min(hi, 0x7F7F) << 16), (float)LEVELS);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u32 v10 = ((low[i / 4] >> (8 * (i % 4))) & 0xffu) | (((high >> (2 * i)) & 3u) << 8);
        const int q = (int)(v10 & 0x1ffu);
        const float m = linear ? __fmul_rn((float)q, lin_step) : log_decode(q, lo, hi, log_step);
        float x = __uint_as_float(__float_as_uint(m) | ((v10 >> 9) << 31));
        if (nonfinite) x = __uint_as_float(0x7fc00000u);
        acc[i] = __fadd_rn(acc[i], x);
    }
}

}  // namespace logfmt
