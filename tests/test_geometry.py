"""The buffers' geometry (cupy_ep.geometry), size hints and configuration, checked without a GPU."""
import pytest

from cupy_ep import Config, limits
from cupy_ep.geometry import (INTRANODE_OFFSETS, NOTIFY_SLOT_BYTES, internode_nvl_size_hint, internode_rdma_size_hint,
                              intranode_nvl_size_hint, nvl_control, nvl_rows, rdma_capacity, rdma_control,
                              rdma_record_bytes, slot_geometry)


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("hidden,num_topk", [(7168, 8), (2880, 9), (128, 1), (256, 0)])
@pytest.mark.parametrize("num_tokens", [1, 77, 4096])
def test_intranode_size_hint_holds_the_tokens(num_ranks, hidden, num_topk, num_tokens):
    nbytes = intranode_nvl_size_hint(num_tokens, hidden, num_ranks, num_topk)
    slots = slot_geometry(nbytes, num_ranks, hidden, num_topk)
    assert slots.capacity >= num_tokens
    # The hint is not over-provisioned: 16 bf16 rows less per slot no longer holds the tokens.
    assert slot_geometry(nbytes - num_ranks * 16 * (hidden * 2), num_ranks, hidden, num_topk).capacity < num_tokens


@pytest.mark.parametrize("hidden,num_topk", [(7168, 8), (2880, 9), (4096, 0)])
def test_intranode_slot_areas_are_aligned_and_disjoint(hidden, num_topk):
    slots = slot_geometry(1 << 30, 4, hidden, num_topk)
    cap = slots.capacity
    ends = [(0, cap * hidden * 2), (slots.off_scales, slots.off_scales + cap * (hidden // 128) * 4),
            (slots.off_idx, slots.off_idx + cap * num_topk * 8), (slots.off_w, slots.off_w + cap * num_topk * 4)]
    for begin, end in ends:
        assert begin % 16 == 0 and end <= slots.slot_bytes
    for (b0, e0), (b1, e1) in zip(ends, ends[1:]):
        assert e0 <= b1
    assert slots.slot_bytes % 16 == 0
    assert INTRANODE_OFFSETS["OFF_DATA"] + 4 * slots.slot_bytes <= 1 << 30


def test_intranode_control_areas_do_not_overlap():
    tails = limits.MAX_CHANNELS * limits.MAX_NVL_PEERS * 8
    assert INTRANODE_OFFSETS["OFF_NOTIFY_FLAGS"] + 4 * limits.MAX_NVL_PEERS <= INTRANODE_OFFSETS["OFF_CANCELLED"]
    assert INTRANODE_OFFSETS["OFF_CANCELLED"] + 2 * 4 * limits.MAX_NVL_PEERS <= INTRANODE_OFFSETS["OFF_GRID_RUN"]
    assert INTRANODE_OFFSETS["OFF_GRID_RUN"] + 4 <= INTRANODE_OFFSETS["OFF_GRID_ARRIVED"]
    assert INTRANODE_OFFSETS["OFF_GRID_ARRIVED"] + 4 <= INTRANODE_OFFSETS["OFF_GRID_DONE"]
    assert INTRANODE_OFFSETS["OFF_GRID_DONE"] + 4 <= INTRANODE_OFFSETS["OFF_DISPATCH_TAILS"]
    assert INTRANODE_OFFSETS["OFF_DISPATCH_TAILS"] + tails <= INTRANODE_OFFSETS["OFF_COMBINE_TAILS"]
    assert INTRANODE_OFFSETS["OFF_COMBINE_TAILS"] + tails <= INTRANODE_OFFSETS["OFF_NOTIFY"]
    assert INTRANODE_OFFSETS["OFF_NOTIFY"] + limits.MAX_NVL_PEERS * NOTIFY_SLOT_BYTES <= INTRANODE_OFFSETS["OFF_DATA"]
    assert NOTIFY_SLOT_BYTES >= 4 * (128 + limits.MAX_EXPERTS)   # the per-expert counts of any E


DOMAINS = [(4, 2), (4, 1), (2, 1), (16, 8), (64, 8), (128, 8), (24, 3), (512, 8)]


@pytest.mark.parametrize("num_ranks,num_nvl_ranks", DOMAINS)
@pytest.mark.parametrize("hidden,num_topk", [(7168, 8), (2880, 9), (256, 1)])
@pytest.mark.parametrize("num_tokens", [1, 333, 4096])
def test_internode_hints_hold_the_tokens(num_ranks, num_nvl_ranks, hidden, num_topk, num_tokens):
    rdma = internode_rdma_size_hint(num_tokens, hidden, num_ranks, num_nvl_ranks, num_topk)
    assert rdma_capacity(rdma, hidden, num_ranks, num_nvl_ranks, num_topk) >= num_tokens
    assert rdma % (1 << 20) == 0 and rdma < (num_tokens + 64) * 2 * (num_ranks // num_nvl_ranks) * \
        rdma_record_bytes(hidden, num_topk, num_nvl_ranks) + (16 << 20)
    rows = num_ranks * num_tokens
    nvl = internode_nvl_size_hint(rows, hidden, num_ranks, num_nvl_ranks, num_topk)
    assert nvl_rows(nvl, num_ranks, num_nvl_ranks, hidden, num_topk)["NVL_ROWS"] >= rows


@pytest.mark.parametrize("num_ranks,num_nvl_ranks", DOMAINS)
def test_internode_geometry_is_aligned_and_disjoint(num_ranks, num_nvl_ranks):
    n = num_ranks // num_nvl_ranks
    r = rdma_control(num_ranks, num_nvl_ranks)
    tails = limits.MAX_CHANNELS * limits.MAX_RDMA_RANKS * 8
    assert r["R_OFF_VEC_SIG"] >= r["R_OFF_BARRIER"] + 16 * limits.MAX_RDMA_RANKS
    assert r["R_OFF_DTAIL"] >= r["R_OFF_VEC_SIG"] + 8 * limits.MAX_RDMA_RANKS
    assert r["R_OFF_CTAIL"] >= r["R_OFF_DTAIL"] + tails and r["R_OFF_VEC_RECV"] >= r["R_OFF_CTAIL"] + tails
    assert r["R_OFF_DATA"] >= r["R_OFF_VEC_SEND"] + 4 * n * r["VEC_STRIDE"] and r["R_OFF_DATA"] % 4096 == 0
    # a notify vector of the largest call fits (as the kernel's static_assert checks per call)
    c = limits.MAX_CHANNELS
    assert 2 + num_nvl_ranks * (c + 2) + c + 1 + limits.MAX_EXPERTS // n + num_ranks <= r["VEC_STRIDE"]
    v = nvl_control(num_ranks, num_nvl_ranks)
    words = [(v["OFF_ARRIVALS"], 4 * limits.MAX_NVL_PEERS), (v["OFF_EPOCH"], 4), (v["OFF_CALL_BAD"], 8),
             (v["OFF_SLOT_FLAGS"], 4 * num_nvl_ranks), (v["OFF_FWD_FLAGS"], 4 * num_nvl_ranks),
             (v["OFF_CANCELLED"], 8 * limits.MAX_NVL_PEERS), (v["OFF_DTAIL"], 0)]
    for (b0, s0), (b1, _) in zip(words, words[1:]):
        assert b0 % 4 == 0 and b0 + s0 <= b1
    assert v["OFF_CTAIL"] >= v["OFF_DTAIL"] + limits.MAX_CHANNELS * num_ranks * 8
    assert v["OFF_SLOT"] >= v["OFF_CTAIL"] + limits.MAX_CHANNELS * n * num_nvl_ranks * 8
    assert 1 + n * (c + 4) + limits.MAX_EXPERTS // num_ranks + num_ranks <= v["SLOT_STRIDE"]
    assert v["OFF_FWD"] >= v["OFF_SLOT"] + 4 * num_nvl_ranks * v["SLOT_STRIDE"]
    assert v["OFF_NX"] >= v["OFF_FWD"] + 4 * num_nvl_ranks * n
    for hidden, num_topk in ((7168, 8), (2880, 9)):
        nbytes = 1 << 30
        rows_geom = nvl_rows(nbytes, num_ranks, num_nvl_ranks, hidden, num_topk)
        rows = rows_geom["NVL_ROWS"]
        regions = [(rows_geom["OFF_NX"], rows * 2 * hidden), (rows_geom["OFF_NS"], rows * 4 * (hidden // 128)),
                   (rows_geom["OFF_NI"], rows * 8 * num_topk), (rows_geom["OFF_NW"], rows * 4 * num_topk)]
        for (b0, s0), (b1, _) in zip(regions, regions[1:]):
            assert b0 % 16 == 0 and b0 + s0 <= b1
        assert regions[-1][0] + regions[-1][1] <= nbytes


def test_config_defaults_and_errors():
    c = Config()
    assert (c.num_sms, c.num_threads, c.num_receivers, c.num_channels, c.chunk_tokens) == (24, 1024, 12, 12, 32)
    assert Config(num_sms=24, num_receivers=8).num_channels == 16
    assert Config(num_sms=24).internode_channels == 8
    assert Config(num_threads=256, chunk_tokens=1).chunk_tokens == 1
    for bad in (dict(num_sms=1), dict(num_threads=100), dict(num_threads=2048), dict(num_receivers=24),
                dict(num_sms=128, num_receivers=1), dict(chunk_tokens=0), dict(num_threads=256, chunk_tokens=9)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Config(**bad)


def test_limits_reach_the_kernels_and_the_errors():
    from cupy_ep.errors import status_error

    consts = limits.device_constants()
    for kid, name in limits.KERNEL_NAMES.items():
        assert consts[f"KID_{name.upper()}"] == kid
    for code in (limits.ST_TIMEOUT, limits.ST_OVERFLOW, limits.ST_BAD_EXPERT, limits.ST_BAD_LAYOUT,
                 limits.ST_PEER_BAD_INPUT):
        err = status_error(code, "some_kernel", 3, 1, 7, 9, 2)
        assert "some_kernel" in str(err) and "rank 3" in str(err)


@pytest.mark.parametrize("num_ranks", [1, 3, 16, 1024])
@pytest.mark.parametrize("m,hidden", [(1, 128), (128, 7168), (512, 2048)])
def test_low_latency_size_hint_holds_every_call(num_ranks, m, hidden):
    """The hint's quarters hold a dispatch and a combine of any top-k, dtype, combine format and
    transport; the offsets the kernels receive (ll_offsets) give 16-byte aligned, disjoint areas."""
    from cupy_ep import geometry as G

    geom = G.LLGeometry(num_ranks, G.ll_size_hint(m, hidden, num_ranks))
    assert geom.quarter_offset(0) >= geom.signal_offset(1, G.LL_SIG_KINDS - 1) + 8 * num_ranks
    assert geom.quarter_offset(3) + geom.quarter_bytes <= geom.num_bytes
    for topk in (1, 9, limits.LL_MAX_TOPK):
        for fp8, logfmt in ((False, False), (True, False), (False, True)):
            off = G.ll_offsets(num_ranks, m, hidden, topk, fp8, logfmt)
            row = G.ll_partial_row_bytes(hidden, logfmt)
            assert all(v % 16 == 0 for v in off.values())
            assert off["LL_SCALE_OFF"] >= (hidden if fp8 else 2 * hidden)
            assert off["LL_META_OFF"] >= off["LL_SCALE_OFF"] + (4 * hidden // limits.FP8_BLOCK if fp8 else 0)
            assert off["LL_META_OFF"] + 4 * (1 + topk) <= off["LL_SLOT_BYTES"]
            assert num_ranks * m * off["LL_SLOT_BYTES"] <= off["LL_D_RECV_BYTES"] <= off["LL_D_STAGE_OFF"]
            assert off["LL_WSTRIDE"] >= m * topk * 4
            assert off["LL_C_P_OFF"] >= off["LL_C_W_OFF"] + num_ranks * off["LL_WSTRIDE"]
            assert off["LL_C_P_OFF"] + num_ranks * m * row <= off["LL_C_RECV_BYTES"] <= off["LL_C_STAGE_W_OFF"]
            assert off["LL_C_STAGE_W_OFF"] + num_ranks * off["LL_WSTRIDE"] <= off["LL_C_STAGE_P_OFF"]
            for rdma in (False, True):
                d = G.ll_dispatch_quarter_bytes(num_ranks, m, hidden, topk, fp8, rdma)
                c = G.ll_combine_quarter_bytes(num_ranks, m, hidden, topk, rdma, logfmt)
                assert d >= (off["LL_D_STAGE_OFF"] + off["LL_D_RECV_BYTES"] if rdma else off["LL_D_RECV_BYTES"])
                assert c >= (off["LL_C_STAGE_P_OFF"] + num_ranks * m * row if rdma else off["LL_C_RECV_BYTES"])
                assert d <= geom.quarter_bytes and c <= geom.quarter_bytes


PURE_MODULES = {"geometry": {"limits", "logfmt"}, "validation": {"limits", "geometry", "config"},
                "reference": {"limits", "geometry", "validation", "config", "errors", "event", "fp8", "logfmt",
                              "collective"},
                "logfmt": set()}


@pytest.mark.parametrize("module", sorted(PURE_MODULES))
def test_pure_modules_import_no_engine(module):
    """The geometry, the checks and the reference import (anywhere, function bodies included)
    neither CuPy nor a GPU engine module: only the pure modules listed here."""
    import ast
    from pathlib import Path

    import cupy_ep

    tree = ast.parse((Path(cupy_ep.__file__).parent / f"{module}.py").read_text())
    relative, absolute = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            relative |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            absolute.add(node.module)
        elif isinstance(node, ast.Import):
            absolute |= {a.name for a in node.names}
    assert not {m for m in absolute if m.split(".")[0] in ("cupy", "cupy_ep")}, absolute
    assert relative <= PURE_MODULES[module], relative - PURE_MODULES[module]
