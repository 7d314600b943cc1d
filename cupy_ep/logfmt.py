"""LogFMT-10: the 10-bit row format of ``low_latency_combine(..., use_logfmt=True)``.

The combine's partial rows (float32 sums, one per token and expert rank) cross the link in this
format instead of bf16: 164 bytes per 128 channels (``hidden * 10 / 8 + hidden / 128 * 4`` per
row, DeepEP's LogFMT-10 count, 64 % of bf16), always (DeepEP sends a group as bf16 when its
maximum reaches 1). The GPU kernel (``kernels_cu/low_latency.cu`` with ``USE_LOGFMT``) encodes
and decodes with the same integer and IEEE float32 operations, in the same order, as this module,
so the two agree bit for bit. Pure NumPy.

Each group of 128 channels travels as a sign bit and a 9-bit level ``q`` per value (0 = zero)
in one of two modes, whichever loses less (sum of squared errors over the group in units of ``A / 511``,
float32, see :func:`_group_error`; ties and non-finite groups take the log mode):

* **log**: the *code* of a value is ``(float32 bits of |v|) >> 8`` (23 bits, monotone, 2**15
  codes per binade, linear in the mantissa: a piecewise-linear log2). The group's range is
  ``hi = (max code >> 8) + 1`` and ``lo = (min nonzero code, at least max code - 32 binades)
  >> 8`` (15 bits each); ``q = 1 + round((code - base) * 510 / D)`` with ``base = lo << 8``,
  ``D = (hi - lo) << 8``, decoded as the code ``base + rint((q - 1) * D / 510)``. Levels are
  ``range / 510`` binades apart, so narrow groups (within ~4 binades) keep more than bf16's
  precision and constant groups come back exactly (to 2**-15).
* **linear**: ``A`` = the bf16 value with bits ``hi`` (>= the group's max), ``q = round(|v| *
  511 / A)``, decoded as ``q * (A / 511)``: best for Gaussian-like groups (6x less squared error
  than the log mode on ``randn``). Only for groups with ``A >= 2**-111`` (finite scales).

The 4-byte meta word of a group: ``lo | hi << 15 | nonfinite << 30 | linear << 31``. A group
holding an inf or NaN decodes as NaN (the fault stays visible); every finite input decodes
finite (never above the largest finite float32).

Byte format of a group (little-endian; channel ``8j + i`` is lane ``j``'s value ``i`` on the
GPU): ``[0, 128)`` the low 8 bits of each value's 10 bits (sign << 9 | q), channel order;
``[128, 160)`` their high 2 bits, 8 channels per 16-bit word (value ``i`` at bits ``2i``);
``[160, 164)`` the meta word. A row is its groups in channel order. Measured errors:
docs/low_latency.md.
"""
from __future__ import annotations

import numpy as np

__all__ = ["GROUP", "GROUP_BYTES", "row_bytes", "encode", "decode", "round_trip"]

GROUP = 128                        #: channels per group (one meta word)
GROUP_BYTES = GROUP * 10 // 8 + 4  #: 164 bytes per group
LANES, PER_LANE = 16, 8            # a group is 16 lanes x 8 channels on the GPU (error sums follow it)
LEVELS = 511                       # nonzero levels, q in 1..511
CLIP_BINADES = 32                  # a log-mode group spans at most this many binades below its max
BINADE = 1 << 15                   # codes per binade
MAX_FINITE_CODE = 0x7F7FFF         # code of the largest finite float32
INF_CODE = 0x7F8000
LINEAR_MIN_HI = 0x0800             # linear mode needs A >= 2**-111 (511 / A stays finite)
LINEAR_FLAG, NONFINITE_FLAG = 1 << 31, 1 << 30
_F32 = np.float32


def row_bytes(hidden: int) -> int:
    """Bytes of one encoded row of ``hidden`` channels (``hidden % 128 == 0``)."""
    hidden = int(hidden)
    if hidden <= 0 or hidden % GROUP:
        raise ValueError(f"hidden: must be a positive multiple of {GROUP}, got {hidden}")
    return hidden // GROUP * GROUP_BYTES


def _f32_from_bits(bits):
    return np.asarray(bits, dtype=np.int64).astype(np.uint32).view(np.float32)


def _log_decode(q, lo, hi):
    """Magnitudes of log-mode levels (float32, 0 for q == 0)."""
    step = ((hi - lo) << 8).astype(_F32) / _F32(LEVELS - 1)
    off = np.rint((q - 1).astype(_F32) * step).astype(np.int64)
    code = np.minimum((lo << 8) + off, MAX_FINITE_CODE)
    return _f32_from_bits(np.where(q == 0, 0, code << 8))


def _linear_scale(hi):
    return _f32_from_bits(np.minimum(hi, 0x7F7F) << 16)


def _linear_decode(q, hi):
    return q.astype(_F32) * (_linear_scale(hi) / _F32(LEVELS))


def _group_error(dec, mag, unit):
    """Sum of ((dec - mag) * unit)**2 over a group [..., 16, 8] in the GPU's order: each lane's 8
    values in turn, then a pairwise tree over the 16 lanes (the shuffle butterfly). ``unit`` =
    511 / A keeps the terms near 1 whatever the group's scale (no underflow, no overflow)."""
    d = (dec - mag) * unit
    sq = d * d
    s = sq[..., 0]
    for i in range(1, PER_LANE):
        s = s + sq[..., i]
    while s.shape[-1] > 1:
        s = s[..., 0::2] + s[..., 1::2]
    return s[..., 0]


def _encode_groups(g):
    """float32 [..., 16, 8] groups -> (10-bit values int64 [..., 16, 8], meta int64 [...])."""
    bits = g.view(np.uint32).astype(np.int64)
    sign = bits >> 31
    mag = _f32_from_bits(bits & 0x7FFFFFFF)
    code = (bits & 0x7FFFFFFF) >> 8
    cmax = code.max(axis=(-2, -1))
    cmin = np.where(code > 0, code, cmax[..., None, None]).min(axis=(-2, -1))
    nonfinite = cmax >= INF_CODE
    lo = np.maximum(cmin, cmax - CLIP_BINADES * BINADE) >> 8
    hi = np.minimum((cmax >> 8) + 1, INF_CODE >> 8)
    lo_, hi_ = lo[..., None, None], hi[..., None, None]
    scale = _F32(LEVELS - 1) / ((hi_ - lo_) << 8).astype(_F32)
    t = (code - (lo_ << 8)).astype(_F32) * scale
    q_log = np.where(code == 0, 0, np.clip(np.floor(t + _F32(1.5)), 0, LEVELS).astype(np.int64))
    lin_ok = (hi_ >= LINEAR_MIN_HI) & ~nonfinite[..., None, None]
    lin_scale = _F32(LEVELS) / np.where(lin_ok, _linear_scale(hi_), _F32(1))
    q_lin = np.clip(np.floor(mag * lin_scale + _F32(0.5)), 0, LEVELS).astype(np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        e_log = _group_error(_log_decode(q_log, lo_, hi_), mag, lin_scale)
        e_lin = _group_error(_linear_decode(q_lin, hi_), mag, lin_scale)
    linear = lin_ok[..., 0, 0] & (e_lin < e_log)
    q = np.where(linear[..., None, None], q_lin, q_log)
    meta = np.where(linear, (hi << 15) | LINEAR_FLAG, lo | (hi << 15) | (nonfinite.astype(np.int64) << 30))
    return (sign << 9) | q, meta


def encode(x) -> np.ndarray:
    """float32 ``[..., H]`` -> uint8 ``[..., row_bytes(H)]``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    row_bytes(x.shape[-1])
    lead = x.shape[:-1]
    g = x.reshape(lead + (x.shape[-1] // GROUP, LANES, PER_LANE))
    v10, meta = _encode_groups(g)
    low = (v10 & 0xFF).astype(np.uint8).reshape(g.shape[:-2] + (GROUP,))
    high = ((v10 >> 8) << (2 * np.arange(PER_LANE))).sum(axis=-1).astype(np.uint16)
    out = np.concatenate([low, high.view(np.uint8), meta.astype(np.uint32)[..., None].view(np.uint8)], axis=-1)
    return out.reshape(lead + (-1,))


def decode(b, hidden: int) -> np.ndarray:
    """uint8 ``[..., row_bytes(hidden)]`` -> float32 ``[..., hidden]``."""
    b = np.ascontiguousarray(b, dtype=np.uint8)
    if b.shape[-1] != row_bytes(hidden):
        raise ValueError(f"b: rows of {row_bytes(hidden)} bytes expected for hidden={hidden}, got {b.shape[-1]}")
    g = b.reshape(b.shape[:-1] + (hidden // GROUP, GROUP_BYTES))
    low = g[..., :GROUP].astype(np.int64).reshape(g.shape[:-1] + (LANES, PER_LANE))
    high = np.ascontiguousarray(g[..., GROUP:GROUP + 2 * LANES]).view(np.uint16).astype(np.int64)
    high = (high[..., None] >> (2 * np.arange(PER_LANE))) & 3
    meta = np.ascontiguousarray(g[..., GROUP + 2 * LANES:]).view(np.uint32)[..., 0].astype(np.int64)
    v10 = low | (high << 8)
    q, sign = v10 & 0x1FF, v10 >> 9
    lo, hi = (meta & 0x7FFF)[..., None, None], ((meta >> 15) & 0x7FFF)[..., None, None]
    linear = ((meta >> 31) & 1)[..., None, None] == 1
    nonfinite = ((meta >> 30) & 1)[..., None, None] == 1
    mag = np.where(linear, _linear_decode(q, hi), _log_decode(q, lo, hi))
    bits = mag.view(np.uint32).astype(np.int64) | (sign << 31)
    bits = np.where(nonfinite, 0x7FC00000, bits)
    return _f32_from_bits(bits).reshape(b.shape[:-1] + (hidden,))


def round_trip(x) -> np.ndarray:
    """``decode(encode(x))``: what a float32 row becomes after crossing the link."""
    x = np.asarray(x, dtype=np.float32)
    return decode(encode(x), x.shape[-1])
