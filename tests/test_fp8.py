"""Unit tests of cupy_ep.fp8 (NumPy; the CuPy path runs too when a GPU is present)."""

import math

import ml_dtypes
import numpy as np
import pytest

from cupy_ep import fp8

BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn


def _rand(shape, seed=0, scale=4.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    # blocks of very different magnitudes
    x *= 10.0 ** rng.integers(-6, 4, size=shape[:-1] + (1,))
    return x.astype(np.float32).astype(BF16)


def test_exports():
    assert fp8.FP8_DTYPE is ml_dtypes.float8_e4m3fn
    assert fp8.BF16_DTYPE is ml_dtypes.bfloat16


def test_e4m3_rounding_matches_ml_dtypes_random_bits():
    rng = np.random.default_rng(1)
    v = rng.integers(0, 2 ** 32, size=400_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(all="ignore"):
        ref = v.astype(E4M3).view(np.uint8)
    np.testing.assert_array_equal(fp8.float32_to_e4m3_bits(v), ref)


def test_e4m3_rounding_matches_ml_dtypes_edges():
    vals = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
    s = np.unique(vals[np.isfinite(vals)])
    mids = ((s[:-1].astype(np.float64) + s[1:]) / 2).astype(np.float32)
    cand = np.concatenate([
        s, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
        np.array([448, 464, 464.0001, 480, 1e30, np.inf, -np.inf, np.nan, 2 ** -9, 2 ** -10, 3 * 2 ** -11,
                  -0.0, 1e-45], np.float32)]).astype(np.float32)
    with np.errstate(all="ignore"):
        ref = cand.astype(E4M3).view(np.uint8)
    np.testing.assert_array_equal(fp8.float32_to_e4m3_bits(cand), ref)


def test_e4m3_decode_all_patterns():
    b = np.arange(256, dtype=np.uint8)
    got = fp8.e4m3_bits_to_float32(b)
    ref = b.view(E4M3).astype(np.float32)
    np.testing.assert_array_equal(got, ref)   # NaN positions compare equal
    np.testing.assert_array_equal(fp8.e4m3_bits_to_float32(b.view(E4M3)), ref)


@pytest.mark.parametrize("dtype", [BF16, np.float32, np.float16])
def test_cast_definition_and_round_trip(dtype):
    x = _rand((7, 512)).astype(dtype)
    q, s = fp8.per_token_cast_to_fp8(x)
    assert q.dtype == E4M3 and q.shape == x.shape
    assert s.dtype == np.float32 and s.shape == (7, 4)
    xf = x.astype(np.float32)
    for t in range(7):
        for b in range(4):
            blk = xf[t, b * 128:(b + 1) * 128]
            amax = np.float32(max(np.abs(blk).max(), np.float32(1e-4)))
            scale = np.float32(amax / np.float32(448))
            assert s[t, b] == scale
            want = (blk / scale).astype(np.float32).astype(E4M3)
            assert np.array_equal(q[t, b * 128:(b + 1) * 128].view(np.uint8), want.view(np.uint8))
    back = fp8.per_token_cast_back(q, s, out_dtype=np.float32)
    bound = 2.0 ** -4 * np.abs(xf) + 2.0 ** -10 * np.repeat(s, 128, axis=1) * 1.0001
    assert np.all(np.abs(back - xf) <= bound)
    assert fp8.per_token_cast_back(q, s).dtype == BF16


def test_round_scale_powers_of_two():
    x = _rand((9, 256), seed=3)
    q, s = fp8.per_token_cast_to_fp8(x, round_scale=True)
    xf = x.astype(np.float32)
    for t in range(9):
        for b in range(2):
            m, _ = math.frexp(float(s[t, b]))
            assert m == 0.5, s[t, b]
            amax = max(float(np.abs(xf[t, b * 128:(b + 1) * 128]).max()), float(np.float32(1e-4)))
            ratio = float(np.float32(np.float32(amax) / np.float32(448)))
            assert ratio <= s[t, b] < 2 * ratio
    back = fp8.per_token_cast_back(q, s, out_dtype=np.float32)
    assert np.all(np.abs(back - xf) <= 2.0 ** -4 * np.abs(xf) + 2.0 ** -10 * np.repeat(s, 128, axis=1))
    assert np.all(np.abs(back) <= 448 * np.repeat(s, 128, axis=1))


def test_ue8m0_decoding():
    x = _rand((5, 384), seed=4)
    q_r, s_r = fp8.per_token_cast_to_fp8(x, round_scale=True)
    for rs in (False, True):          # use_ue8m0 implies round_scale
        q_u, s_u = fp8.per_token_cast_to_fp8(x, round_scale=rs, use_ue8m0=True)
        assert s_u.dtype == np.uint8 and s_u.shape == (5, 3)
        np.testing.assert_array_equal(q_u.view(np.uint8), q_r.view(np.uint8))
        np.testing.assert_array_equal(fp8.ue8m0_to_float32(s_u), s_r)
        np.testing.assert_array_equal(np.ldexp(np.float32(1), s_u.astype(np.int32) - 127).astype(np.float32), s_r)
        np.testing.assert_array_equal(fp8.per_token_cast_back(q_u, s_u, out_dtype=np.float32),
                                      fp8.per_token_cast_back(q_r, s_r, out_dtype=np.float32))
    np.testing.assert_array_equal(fp8.ue8m0_to_float32(np.array([127, 128, 1, 0], np.uint8)),
                                  np.array([1, 2, 2.0 ** -126, 2.0 ** -127], np.float32))


def test_zero_rows_use_amax_floor():
    x = np.zeros((3, 256), dtype=BF16)
    x[1, :128] = 1.0
    q, s = fp8.per_token_cast_to_fp8(x)
    floor = np.float32(np.float32(1e-4) / np.float32(448))
    assert s[0, 0] == floor and s[0, 1] == floor and s[1, 1] == floor and s[2, 0] == floor
    assert s[1, 0] == np.float32(1) / np.float32(448)
    assert not q.view(np.uint8)[[0, 2]].any()
    assert np.isfinite(s).all()
    _, su = fp8.per_token_cast_to_fp8(x, use_ue8m0=True)
    # ceil(log2(1e-4 / 448)) = -22
    assert su[0, 0] == 127 - 22


def test_cast_back_accepts_uint8_and_3d():
    x = _rand((2, 3, 256), seed=5)
    q, s = fp8.per_token_cast_to_fp8(x)
    assert q.shape == (2, 3, 256) and s.shape == (2, 3, 2)
    a = fp8.per_token_cast_back(q, s, out_dtype=np.float32)
    b = fp8.per_token_cast_back(q.view(np.uint8), s, out_dtype=np.float32)
    np.testing.assert_array_equal(a, b)
    default = fp8.per_token_cast_back(q, s)          # bf16 unless asked otherwise (docs/api.md)
    assert default.dtype == BF16 and default.shape == (2, 3, 256)
    np.testing.assert_array_equal(default, a.astype(BF16))
    q2, s2 = fp8.per_token_cast_to_fp8(x.reshape(6, 256))
    np.testing.assert_array_equal(q2.view(np.uint8).reshape(q.shape), q.view(np.uint8))
    empty_q, empty_s = fp8.per_token_cast_to_fp8(np.zeros((0, 128), BF16))
    assert empty_q.shape == (0, 128) and empty_s.shape == (0, 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="^x"):
        fp8.per_token_cast_to_fp8(np.zeros((2, 100), np.float32))
    q, s = fp8.per_token_cast_to_fp8(np.ones((2, 128), np.float32))
    with pytest.raises(ValueError, match="^scales"):
        fp8.per_token_cast_back(q, s[:1])
    with pytest.raises(TypeError, match="^scales"):
        fp8.per_token_cast_back(q, s.astype(np.float64))
    with pytest.raises(TypeError, match="^x_fp8"):
        fp8.per_token_cast_back(q.view(np.int8), s)


def _cupy_with_gpu():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # noqa: BLE001 - no cupy, no driver, no device
        return None


def test_cupy_path_matches_numpy():
    cupy = _cupy_with_gpu()
    if cupy is None:
        pytest.skip("no GPU: the CuPy path of fp8 is not exercised")
    x = _rand((16, 512), seed=6)
    for rs, ue in ((False, False), (True, False), (True, True)):
        qn, sn = fp8.per_token_cast_to_fp8(x, rs, ue)
        qc, sc = fp8.per_token_cast_to_fp8(cupy.asarray(x.astype(np.float32)), rs, ue)
        assert qc.dtype == np.uint8
        np.testing.assert_array_equal(cupy.asnumpy(qc), qn.view(np.uint8))
        np.testing.assert_array_equal(cupy.asnumpy(sc), sn)
        back = fp8.per_token_cast_back(qc, sc, out_dtype=np.float32)
        np.testing.assert_array_equal(cupy.asnumpy(back), fp8.per_token_cast_back(qn, sn, out_dtype=np.float32))
