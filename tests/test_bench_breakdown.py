"""The benchmarks' whole-call breakdown (scripts/bench_common.py, plot_bench.py) on made-up
phases: rows in call order, the rest of the call, host time by kind, kernels beside their launch."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_common as bc  # noqa: E402

PHASES = {"checked": [10.0, 9.0], "handle allocated": [6.0, 5.5], "notify launched": [40.0, 4.0],
          "dispatch launched": [230.0, 3.0], "host wait": [1.0, 7.0], "outputs allocated": [1.0, 8.0],
          "outputs published": [1.0, 2.0], "finished": [1.0, 1.5]}


def _op():
    return {"phases": PHASES, "phases_call_us": 300.0, "phases_host_us": 45.0, "phases_rank": 0,
            "kernel_us": 220.0, "notify_us": 35.0}


def test_rows_rest_kernels_and_host_kinds():
    rows, totals = bc.breakdown(_op(), "dispatch")
    assert [r[0] for r in rows] == [*PHASES, "rest"]
    kernels = {name: k for name, _, _, k in rows}
    assert kernels["notify launched"] == 35.0 and kernels["dispatch launched"] == 220.0
    assert kernels["checked"] is None and kernels["host wait"] is None
    rest = rows[-1]
    assert rest[1] == pytest.approx(300.0 - 290.0) and rest[2] == pytest.approx(45.0 - 40.0)
    assert totals["launches"] == pytest.approx(7.0) and totals["host wait"] == pytest.approx(7.0)
    assert totals["Python"] == pytest.approx(45.0 - 14.0)   # every other phase and the rest
    assert totals["kernels"] == pytest.approx(255.0) and totals["call"] == 300.0


def test_no_phases_no_breakdown(capsys):
    assert bc.breakdown({"kernel_us": 1.0}, "dispatch") is None
    bc.print_breakdown([("combine", {"kernel_us": 1.0}, "combine")])
    assert capsys.readouterr().out == ""


def test_table_has_every_phase(capsys):
    bc.print_breakdown([("dispatch bf16", _op(), "dispatch")])
    out = capsys.readouterr().out
    for name in (*PHASES, "rest", "= whole call", "host: Python 31.0, launches 7.0, host wait 7.0"):
        assert name in out
    assert "220.0" in out.split("dispatch launched")[1].splitlines()[0]


def test_plot_draws_the_breakdown(tmp_path):
    pytest.importorskip("matplotlib")
    import plot_bench

    point = {"tokens": 4096, "main_config": True, "config": {"num_sms": 24}, "ops": {"dispatch_bf16": _op()}}
    data = {"bench": "intranode", "ranks": 1, "device": "test", "points": [point], "main_tokens": 4096}
    paths = plot_bench.plot(data, str(tmp_path))
    assert [Path(p).name for p in paths] == ["bench_intranode_1ranks_breakdown.png"]
    assert Path(paths[0]).stat().st_size > 1000


def test_profile_call_sections_count_each_function_without_the_timed_ones_it_calls():
    import time

    import profile_call

    class Path_:
        def outer(self):
            time.sleep(0.02)
            return self.inner()

        @staticmethod
        def inner():
            time.sleep(0.01)
            return 7

    original = Path_.__dict__["inner"]
    s = profile_call.Sections()
    s.wrap(Path_, "outer", "checks")
    s.wrap(Path_, "inner", "launch")
    assert Path_().outer() == 7
    assert 0.02e9 <= s.ns["checks"] < 0.028e9 and 0.01e9 <= s.ns["launch"] < 0.018e9
    s.restore()
    assert Path_.__dict__["inner"] is original and Path_.outer.__name__ == "outer"


def test_notify_marks_of_the_slowest_rank_are_kept_and_printed_in_order(capsys):
    ranks = [{"call_us": 300.0, "notify_kernel_us": 20.0, "notify_marks": {"end": 20.0, "checked": 15.0}},
             {"call_us": 290.0, "notify_kernel_us": 24.0,
              "notify_marks": {"end": 24.0, "checked": 17.0, "barrier passed": 18.5}}]
    op = bc.aggregate_op(ranks)
    assert op["notify_kernel_us"] == 24.0 and op["notify_marks"] == ranks[1]["notify_marks"]
    assert "notify_marks" not in bc.aggregate_op([{"call_us": 1.0}])

    import bench_intranode

    bench_intranode.print_notify_marks({"tokens": 4096, "ops": {"dispatch_bf16": op}})
    assert capsys.readouterr().out.strip().endswith("checked 17.0, barrier passed 18.5, end 24.0")
