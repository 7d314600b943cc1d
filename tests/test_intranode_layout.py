"""The normal mode's NVLink buffer layout and configuration, checked without a GPU."""
import pytest

from cupy_ep import Config
from cupy_ep.intranode import BUFFER_OFFSETS, MAX_CHANNELS, MAX_RANKS, nvl_buffer_size_hint, slot_layout


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("hidden,num_topk", [(7168, 8), (2880, 9), (128, 1), (256, 0)])
@pytest.mark.parametrize("num_tokens", [1, 77, 4096])
def test_size_hint_holds_the_tokens(num_ranks, hidden, num_topk, num_tokens):
    nbytes = nvl_buffer_size_hint(num_tokens, hidden, num_ranks, num_topk)
    layout = slot_layout(nbytes, num_ranks, hidden, num_topk)
    assert layout.capacity >= num_tokens
    # The hint is not over-provisioned: 16 bf16 rows less per slot no longer holds the tokens.
    assert slot_layout(nbytes - num_ranks * 16 * (hidden * 2), num_ranks, hidden, num_topk).capacity < num_tokens


@pytest.mark.parametrize("hidden,num_topk", [(7168, 8), (2880, 9), (4096, 0)])
def test_slot_areas_are_aligned_and_disjoint(hidden, num_topk):
    layout = slot_layout(1 << 30, 4, hidden, num_topk)
    cap = layout.capacity
    ends = [(0, cap * hidden * 2), (layout.off_scales, layout.off_scales + cap * (hidden // 128) * 4),
            (layout.off_idx, layout.off_idx + cap * num_topk * 8), (layout.off_w, layout.off_w + cap * num_topk * 4)]
    for begin, end in ends:
        assert begin % 16 == 0 and end <= layout.slot_bytes
    for (b0, e0), (b1, e1) in zip(ends, ends[1:]):
        assert e0 <= b1
    assert layout.slot_bytes % 16 == 0
    assert BUFFER_OFFSETS["OFF_DATA"] + 4 * layout.slot_bytes <= 1 << 30


def test_control_areas_do_not_overlap():
    tails = MAX_CHANNELS * MAX_RANKS * 8
    assert BUFFER_OFFSETS["OFF_NOTIFY_FLAGS"] + 4 * MAX_RANKS <= BUFFER_OFFSETS["OFF_DISPATCH_TAILS"]
    assert BUFFER_OFFSETS["OFF_DISPATCH_TAILS"] + tails <= BUFFER_OFFSETS["OFF_COMBINE_TAILS"]
    assert BUFFER_OFFSETS["OFF_COMBINE_TAILS"] + tails <= BUFFER_OFFSETS["OFF_NOTIFY"]


def test_config_defaults_and_errors():
    c = Config()
    assert (c.num_sms, c.num_threads, c.num_receivers, c.num_channels) == (24, 1024, 12, 12)
    assert Config(num_sms=24, num_receivers=8).num_channels == 16
    for bad in (dict(num_sms=1), dict(num_threads=100), dict(num_threads=2048), dict(num_receivers=24),
                dict(num_sms=128, num_receivers=1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Config(**bad)
