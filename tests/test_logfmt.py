"""cupy_ep.logfmt: LogFMT-10 round trips on DeepEP's combine test data within DeepEP's bound,
never NaN on finite input (zeros, tiny, huge, signs, denormals), fixed bytes, and a model of
DeepEP's own format to show ours is no less accurate on the data where DeepEP encodes."""
import ml_dtypes
import numpy as np
import pytest

from cupy_ep import logfmt

BF16 = ml_dtypes.bfloat16
H = 7168


def calc_diff(x, y):
    """DeepEP's tests/utils.py calc_diff: 1 - cosine-like similarity, in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    denom = (x * x + y * y).sum()
    return 1 - 2 * (x * y).sum() / denom


def deepep_logfmt(x):
    """DeepEP's LogFMT-10 (legacy internode_ll.cu) modelled with exact log2/exp2: per 128
    channels, levels uniform in log2 between the group's min and max (clipped at 32 binades),
    rounding at the linear midpoint; groups with max >= 1 (or min == max) stay bf16."""
    g = np.asarray(x, np.float64).reshape(x.shape[0], -1, 128)
    a = np.abs(g)
    amax, amin = a.max(-1, keepdims=True), a.min(-1, keepdims=True)
    la = np.log2(np.maximum(amax, 1e-300))
    li = np.where(amin == 0, la - 32, np.maximum(np.log2(np.maximum(amin, 1e-300)), la - 32))
    cast = (la < 0) & (li < la)
    step = np.where(cast, (la - li) / 510, 1.0)
    rounding = 2 - np.log2((1 + 2 ** step) / 2) / step
    with np.errstate(divide="ignore"):
        q = np.floor(np.maximum(np.log2(a) / step + rounding - li / step, 0))
    dec = np.where(q == 0, 0, 2 ** ((q - 1) * step + li)) * np.sign(g)
    return np.where(cast, dec, g).reshape(x.shape), float(cast.mean())


def deepep_test_rows(rng, n=128, hidden=H):
    """The rows DeepEP's test_low_latency --use-logfmt feeds the combine (bf16)."""
    x = np.full((n, hidden), -128.0, np.float32)
    x[:, -128:] = np.arange(n, dtype=np.float32)[:, None]
    rows = [x] + [rng.standard_normal((n, hidden)) * 0.5 * rng.random() for _ in range(4)]
    rows.append(rng.standard_normal((n, hidden)) * 0.1)
    return [np.asarray(r, np.float32).astype(BF16).astype(np.float32) for r in rows]


def test_row_bytes_match_deepeps_count():
    assert logfmt.row_bytes(H) == H * 10 // 8 + H // 128 * 4 == 9184
    assert logfmt.encode(np.zeros((3, H), np.float32)).shape == (3, 9184)
    with pytest.raises(ValueError, match="hidden"):
        logfmt.row_bytes(100)


def test_deepep_test_data_within_bound_and_no_less_accurate():
    rng = np.random.default_rng(7)
    for i, x in enumerate(deepep_test_rows(rng)):
        got = logfmt.round_trip(x)
        assert not np.isnan(got).any()
        ours = calc_diff(x, got)
        assert ours < 1e-5, (i, ours)
        ref, cast_frac = deepep_logfmt(x)
        if cast_frac == 1.0:   # every group encoded by DeepEP too: compare like with like
            assert ours <= calc_diff(x, ref), (i, ours, calc_diff(x, ref))


def test_after_fp8_dispatch_within_bound():
    from cupy_ep import fp8

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, H)) * 0.3).astype(np.float32).astype(BF16)
    q, s = fp8.per_token_cast_to_fp8(x)
    back = fp8.per_token_cast_back(q, s, np.float32)
    assert calc_diff(x.astype(np.float32), logfmt.round_trip(back)) < 9e-4


def test_wide_gaussian_rows_no_worse_than_a_bf16_partial():
    rng = np.random.default_rng(1)
    for scale in (1e-30, 1e-3, 1.0, 1e3, 1e30):
        x = (rng.standard_normal((32, 1024)) * scale).astype(np.float32)
        assert calc_diff(x, logfmt.round_trip(x)) <= calc_diff(x, x.astype(BF16).astype(np.float32)) * 1.05


@pytest.mark.parametrize("kind", ["zeros", "tiny", "denormal", "huge", "max", "signs", "mixed", "one_value",
                                  "constant", "wide"])
def test_finite_inputs_never_nan_or_inf(kind):
    rng = np.random.default_rng(hash(kind) % 2**32)
    f32 = np.finfo(np.float32)
    x = {
        "zeros": np.zeros((4, 256)),
        "tiny": rng.standard_normal((4, 256)) * 1e-38,
        "denormal": rng.standard_normal((4, 256)) * 1e-42,
        "huge": rng.standard_normal((4, 256)) * 1e37,
        "max": np.full((4, 256), f32.max) * np.sign(rng.standard_normal((4, 256))),
        "signs": np.sign(rng.standard_normal((4, 256))) * 3.0,
        "mixed": rng.standard_normal((4, 256)) * 10.0 ** rng.integers(-40, 38, (4, 256)),
        "one_value": np.eye(4, 256) * 5.0,
        "constant": np.full((4, 256), -0.75),
        "wide": np.concatenate([np.full((4, 128), 1e-20), np.full((4, 128), 1e20)], 1),
    }[kind].astype(np.float32)
    got = logfmt.round_trip(x)
    assert np.isfinite(got).all()
    assert (np.signbit(got) == np.signbit(x))[got != 0].all()
    assert (got[x == 0] == 0).all()
    if kind != "zeros":   # denormals have few bits (bf16 loses them all)
        with np.errstate(invalid="ignore", over="ignore"):   # FLT_MAX is inf in bf16
            bf16_diff = np.nan_to_num(calc_diff(x, x.astype(BF16).astype(np.float32)))
        assert calc_diff(x, got) < max(1e-5, bf16_diff), calc_diff(x, got)


def test_constant_and_bf16_narrow_groups_come_back_exactly():
    x = np.full((2, 256), -128.0, np.float32)
    x[1, 128:] = 3.0
    np.testing.assert_array_equal(logfmt.round_trip(x), x)


def test_non_finite_group_decodes_as_nan_only_there():
    x = np.ones((1, 256), np.float32)
    x[0, 5] = np.inf
    got = logfmt.round_trip(x)
    assert np.isnan(got[0, :128]).all() and np.isfinite(got[0, 128:]).all()


def test_decode_checks_row_size():
    with pytest.raises(ValueError, match="bytes"):
        logfmt.decode(np.zeros((1, 100), np.uint8), 128)


def test_device_header_has_the_same_numbers():
    """kernels_cu/logfmt.cuh repeats this module's constants (a kernel cannot import them)."""
    import re
    from pathlib import Path

    text = (Path(logfmt.__file__).resolve().parents[1] / "kernels_cu" / "logfmt.cuh").read_text()
    dev = {m.group(1): int(eval(m.group(2))) for m in re.finditer(r"constexpr int (\w+) = ([^;]+);", text)}
    for name in ("GROUP", "GROUP_BYTES", "LEVELS", "CLIP_BINADES", "BINADE", "MAX_FINITE_CODE", "INF_CODE",
                 "LINEAR_MIN_HI"):
        assert dev[name] == getattr(logfmt, name), name
