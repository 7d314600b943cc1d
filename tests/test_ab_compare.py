"""scripts/ab_compare.py: the before/after table of alternating benchmark runs."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import ab_compare  # noqa: E402


def _intranode(path, kernel_us, tokens=4096):
    point = {"tokens": tokens, "main_config": True,
             "ops": {"combine": {"kernel_us": kernel_us, "call_us": 2 * kernel_us, "per_rank": {}}}}
    small = {"tokens": 1024, "main_config": True, "ops": {"combine": {"kernel_us": 1.0, "call_us": 1.0}}}
    path.write_text(json.dumps({"bench": "intranode", "points": [small, point]}))


def _low_latency(path, dispatch_us, end_us):
    path.write_text(json.dumps({"bench": "low_latency", "results": [
        {"num_experts": 288, "dispatch_us": dispatch_us, "dispatch_us_per_rank": [1, 2],
         "phase_us": {"low_latency_dispatch: end": end_us}},
        {"num_experts": 256, "dispatch_us": 99.0}]}))


def test_medians_spreads_and_ratio_per_op(tmp_path, capsys):
    for i, us in enumerate((100.0, 110.0, 90.0)):
        _intranode(tmp_path / f"ab_before_intranode_{i}.json", us)
    for i, us in enumerate((120.0, 130.0)):
        _intranode(tmp_path / f"ab_after_intranode_{i}.json", us)
    assert ab_compare.main(["--before", str(tmp_path / "ab_before_*"), "--after", str(tmp_path / "ab_after_*")]) == 0
    rows = {tuple(line.split()[:2]): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "100.0 (90.0-110.0)" in rows[("combine", "kernel_us")]        # the 4096-token point only
    assert "125.0 (120.0-130.0)" in rows[("combine", "kernel_us")]
    assert rows[("combine", "kernel_us")].split()[-1] == "1.250"
    assert rows[("combine", "call_us")].split()[-1] == "1.250"


def test_low_latency_runs_give_call_times_and_phase_marks(tmp_path):
    _low_latency(tmp_path / "b.json", 20.0, 15.0)
    figures = ab_compare.op_figures(str(tmp_path / "b.json"))
    assert figures == {("dispatch", "call_us"): 20.0, ("low_latency_dispatch: end", "phase_us"): 15.0}


def test_internode_runs_give_their_one_point(tmp_path):
    (tmp_path / "i.json").write_text(json.dumps({"bench": "internode", "ops": {
        "combine": {"kernel_us": 50.0, "call_us": 60.0, "rdma_kernel_GBps": 9.0, "per_rank": {}}}}))
    assert ab_compare.op_figures(str(tmp_path / "i.json")) == {("combine", "kernel_us"): 50.0,
                                                               ("combine", "call_us"): 60.0}


def test_no_matching_file_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no file matches"):
        ab_compare.main(["--before", str(tmp_path / "none*"), "--after", str(tmp_path / "none*")])
