"""Per-token FP8 (e4m3fn) cast and cast-back, for NumPy and CuPy arrays.

The cast works per token and per block of 128 channels (the last axis):

- ``amax = max(|x_block|, 1e-4)`` in float32,
- ``scale = amax / 448`` (IEEE float32 division),
- with ``round_scale``: ``scale = 2 ** ceil(log2(amax / 448))`` (a power of two),
- ``x_fp8 = e4m3fn(x / scale)`` (IEEE float32 division, then round to nearest even),
- with ``use_ue8m0`` (implies ``round_scale``): scales are returned as ``uint8`` exponent
  bytes ``e`` with ``scale = 2 ** (e - 127)``.

``x ≈ x_fp8 * scales[..., c // 128]``.

NumPy arrays give FP8 data as ``ml_dtypes.float8_e4m3fn``; CuPy arrays (CuPy has no float8
dtype) give the same bit patterns as ``uint8``. Both kinds are accepted back. The float32 ->
e4m3fn rounding is done with integer arithmetic that is the same on both libraries (and
bit-identical to ``ml_dtypes``' ``astype``), so the CuPy path needs no custom kernel. This
module imports CuPy only when it is handed a CuPy array.
"""

import ml_dtypes
import numpy as np

__all__ = ["FP8_DTYPE", "BF16_DTYPE", "FP8_MAX", "FP8_BLOCK", "FP8_AMAX_FLOOR",
           "per_token_cast_to_fp8", "per_token_cast_back", "float32_to_e4m3_bits",
           "e4m3_bits_to_float32", "ue8m0_to_float32"]

#: FP8 dtype on the NumPy side.
FP8_DTYPE = ml_dtypes.float8_e4m3fn
#: bf16 dtype.
BF16_DTYPE = ml_dtypes.bfloat16
#: Largest finite e4m3fn value.
FP8_MAX = 448.0
#: Channels per scale.
FP8_BLOCK = 128
#: Floor of the block amax (keeps all-zero blocks finite).
FP8_AMAX_FLOOR = 1e-4

_E4M3_TO_F32 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _xp(arr):
    """NumPy or CuPy, after the array's type (CuPy imported only for CuPy arrays)."""
    if type(arr).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return np


def _is_numpy(xp):
    return xp is np


def float32_to_e4m3_bits(v):
    """Round float32 values to e4m3fn (nearest even) and return the bit patterns as uint8.

    Same results as ``v.astype(ml_dtypes.float8_e4m3fn).view(uint8)``: magnitudes that
    round past 448 (above 464; 464 itself ties to 448), infinities and NaN become NaN (0x7F / 0xFF). Works on NumPy and
    CuPy float32 arrays.
    """
    xp = _xp(v)
    v = xp.ascontiguousarray(v, dtype=xp.float32)
    u = v.view(xp.uint32)
    sign = ((u >> 31) & 1).astype(xp.uint8) << 7
    a = u & xp.uint32(0x7FFFFFFF)
    # Normal range: keep 3 mantissa bits, round to nearest even on the integer bits.
    rounded = (a + xp.uint32(0x7FFFF) + ((a >> 20) & xp.uint32(1))) >> 20
    normal = rounded.astype(xp.int64) - (120 << 3)      # rebias exponent 127 -> 7
    # Subnormal range (|v| < 2**-6): multiples of 2**-9, exact scaling then rint (RNE).
    small = a < xp.uint32(0x3C800000)                          # 0x3C800000 = 2**-6
    absv = xp.where(small, xp.abs(v), xp.float32(0.0))
    sub = xp.rint(absv * xp.float32(512.0)).astype(xp.int64)
    bits = xp.where(small, sub, normal)
    bits = xp.where((bits > 0x7E) | (a >= xp.uint32(0x7F800000)), 0x7F, bits)
    return bits.astype(xp.uint8) | sign


def e4m3_bits_to_float32(bits):
    """Decode e4m3fn bit patterns (uint8, or float8_e4m3fn on NumPy) to float32."""
    xp = _xp(bits)
    if np.dtype(bits.dtype) == np.dtype(FP8_DTYPE):
        bits = bits.view(np.uint8)
    if np.dtype(bits.dtype) != np.dtype(np.uint8):
        raise TypeError(f"x_fp8: expected float8_e4m3fn or uint8, got {np.dtype(bits.dtype).name}")
    lut = _E4M3_TO_F32 if _is_numpy(xp) else xp.asarray(_E4M3_TO_F32)
    return lut[bits]


def ue8m0_to_float32(scales):
    """Decode UE8M0 exponent bytes ``e`` to float32 ``2 ** (e - 127)`` (e = 255 gives NaN)."""
    xp = _xp(scales)
    e = scales.astype(xp.uint32)
    # bits of 2**(e-127): exponent field e for e >= 1; e == 0 is the subnormal 2**-127.
    bits = xp.where(e == 0, xp.uint32(0x00400000), e << 23)
    bits = xp.where(e == 255, xp.uint32(0x7FC00000), bits)
    return bits.astype(xp.uint32).view(xp.float32)


def _ceil_log2_f32(v):
    """Exact ``ceil(log2(v))`` of positive normal float32 values (int32)."""
    xp = _xp(v)
    u = xp.ascontiguousarray(v, dtype=xp.float32).view(xp.uint32)
    exp = ((u >> 23) & xp.uint32(0xFF)).astype(xp.int32) - 127
    man = u & xp.uint32(0x7FFFFF)
    return exp + (man != 0).astype(xp.int32)


def per_token_cast_to_fp8(x, round_scale=False, use_ue8m0=False):
    """Cast ``x`` to FP8 e4m3fn per token and per 128 channels.

    Args:
        x: ``[..., H]`` array (bf16, float16 or float32; NumPy or CuPy), ``H % 128 == 0``.
        round_scale: make each scale a power of two, ``2 ** ceil(log2(amax / 448))``.
        use_ue8m0: return the (power-of-two) scales as UE8M0 exponent bytes (implies
            ``round_scale``).

    Returns:
        ``(x_fp8, scales)``: ``x_fp8`` ``[..., H]`` (``float8_e4m3fn`` for NumPy, ``uint8``
        bit patterns for CuPy); ``scales`` ``[..., H/128]`` float32, or uint8 with
        ``use_ue8m0`` (``scale = 2 ** (e - 127)``).
    """
    xp = _xp(x)
    if x.ndim < 1:
        raise ValueError("x: expected at least one dimension")
    h = int(x.shape[-1])
    if h <= 0 or h % FP8_BLOCK != 0:
        raise ValueError(f"x: hidden size must be a positive multiple of {FP8_BLOCK}, got {h}")
    round_scale = bool(round_scale) or bool(use_ue8m0)
    lead = tuple(int(s) for s in x.shape[:-1])
    nb = h // FP8_BLOCK
    xf = x.astype(xp.float32).reshape(lead + (nb, FP8_BLOCK))
    if xf.size:
        amax = xp.abs(xf).max(axis=-1)
    else:
        amax = xp.zeros(lead + (nb,), dtype=xp.float32)
    amax = xp.maximum(amax, xp.float32(FP8_AMAX_FLOOR)).astype(xp.float32)
    scale = (amax / xp.float32(FP8_MAX)).astype(xp.float32)
    if round_scale:
        e = _ceil_log2_f32(scale)
        scale = ue8m0_to_float32((e + 127).astype(xp.uint8))
    q = (xf / scale[..., None]).astype(xp.float32)
    bits = float32_to_e4m3_bits(q).reshape(lead + (h,))
    data = bits.view(FP8_DTYPE) if _is_numpy(xp) else bits
    if use_ue8m0:
        return data, (e + 127).astype(xp.uint8)
    return data, scale


def per_token_cast_back(x_fp8, scales, out_dtype=BF16_DTYPE):
    """Undo :func:`per_token_cast_to_fp8`: ``x = x_fp8 * scales[..., c // 128]``.

    Args:
        x_fp8: ``[..., H]`` ``float8_e4m3fn`` or ``uint8`` (e4m3fn bit patterns).
        scales: ``[..., H/128]`` float32, or uint8 UE8M0 exponent bytes.
        out_dtype: result dtype (default bf16; float32 gives the exact products).

    Returns:
        ``[..., H]`` array of ``out_dtype``.
    """
    xp = _xp(x_fp8)
    h = int(x_fp8.shape[-1])
    if h % FP8_BLOCK != 0:
        raise ValueError(f"x_fp8: hidden size must be a multiple of {FP8_BLOCK}, got {h}")
    want = tuple(int(s) for s in x_fp8.shape[:-1]) + (h // FP8_BLOCK,)
    if tuple(int(s) for s in scales.shape) != want:
        raise ValueError(f"scales: expected shape {list(want)}, got {list(scales.shape)}")
    if np.dtype(scales.dtype) == np.dtype(np.uint8):
        s = ue8m0_to_float32(scales)
    elif np.dtype(scales.dtype) == np.dtype(np.float32):
        s = scales
    else:
        raise TypeError(f"scales: expected float32 or uint8 (UE8M0), got {np.dtype(scales.dtype).name}")
    xf = e4m3_bits_to_float32(x_fp8).reshape(want + (FP8_BLOCK,))
    y = (xf * s[..., None]).astype(xp.float32).reshape(x_fp8.shape)
    return y.astype(out_dtype)
