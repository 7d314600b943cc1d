"""scripts/plot_bench.py on the real runs shipped in docs/data/ and on sweeps made from them
(CPU; needs matplotlib, the plot extra): the default plots the shipped files into a temporary
directory, every title names ranks, card and date, DeepEP's reference lines only at 4 ranks."""
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bench_common as bc  # noqa: E402

pytest.importorskip("matplotlib")
import plot_bench  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

SHIPPED = sorted((REPO / "docs" / "data").glob("*.json"))


def _load(bench: str) -> dict:
    for path in SHIPPED:
        data = json.loads(path.read_text())
        if data["bench"] == bench:
            return data
    raise AssertionError(f"no shipped {bench} run in docs/data/")


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _labels(monkeypatch, method: str) -> list:
    """Records the label of every ``Axes.<method>`` call (the reference lines)."""
    seen, original = [], getattr(Axes, method)

    def record(self, *args, **kwargs):
        seen.append(kwargs.get("label"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, method, record)
    return seen


def test_shipped_runs_name_card_ranks_date_and_no_local_path():
    assert {json.loads(p.read_text())["bench"] for p in SHIPPED} >= {"intranode", "low_latency"}
    for path in SHIPPED:
        data = json.loads(path.read_text())
        assert data["device"] and data["ranks"] >= 1 and time.strptime(data["date"], "%Y-%m-%d"), path
        assert data["date"] in path.name, path
        local = [s for s in _strings(data) if s.startswith("/") or "shared/" in s or "../" in s]
        assert not local, (path, local)


def test_default_plots_every_shipped_run_into_its_own_directory(tmp_path, capsys):
    plot_bench.main(["--out", str(tmp_path)])
    written = [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert {p.parent.name for p in written} == {p.stem for p in SHIPPED}
    assert all(p.stat().st_size > 10_000 for p in written)
    ll = next(p.stem for p in SHIPPED if json.loads(p.read_text())["bench"] == "low_latency")
    assert tmp_path / ll / "bench_low_latency_1ranks.png" in written


def test_default_output_is_a_temporary_directory(capsys):
    plot_bench.main([])
    written = [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    outdirs = {p.parents[1] for p in written}
    try:
        assert written and len(outdirs) == 1
        outdir = outdirs.pop()
        assert outdir.parent == Path(tempfile.gettempdir()) and outdir.name.startswith("cupy_ep_plots_")
        assert REPO not in outdir.parents
    finally:
        for d in {p.parents[1] for p in written}:
            shutil.rmtree(d)


def test_an_explicit_file_plots_into_out_itself(tmp_path, capsys):
    path = next(p for p in SHIPPED if json.loads(p.read_text())["bench"] == "low_latency")
    plot_bench.main([str(path), "--out", str(tmp_path)])
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "bench_low_latency_1ranks.png")]


def _sweep(ranks: int) -> dict:
    """The shipped intranode point as a sweep over tokens 1024/2048/4096 and SMs 8/16/24."""
    data = _load("intranode")
    base, points = data["points"][0], []
    for tokens in (1024, 2048, 4096):
        for sms in (8, 16, 24):
            p = copy.deepcopy(base)
            p["tokens"], p["main_config"] = tokens, sms == 24
            p["config"]["num_sms"] = sms
            for op in p["ops"].values():
                for key in ("kernel_GBps", "call_GBps"):
                    if key in op:
                        op[key] *= sms / 24 * tokens / 4096
            points.append(p)
    return {**data, "ranks": ranks, "points": points, "main_tokens": 4096}


@pytest.mark.parametrize("ranks", [1, 4])
def test_sweep_plots_and_deepep_lines_only_at_4_ranks(tmp_path, monkeypatch, ranks):
    labels = _labels(monkeypatch, "axhline")
    paths = plot_bench.plot(_sweep(ranks), str(tmp_path))
    suffix = "" if ranks == 4 else "_1ranks"
    assert [Path(p).name for p in paths] == [f"bench_intranode{suffix}_{kind}.png"
                                             for kind in ("sms", "tokens", "breakdown")]
    deepep = [label for label in labels if label and label.startswith("DeepEP")]
    assert len(deepep) == (6 if ranks == 4 else 0), labels


@pytest.mark.parametrize("ranks", [1, 4])
def test_low_latency_without_profile_and_deepep_lines_only_at_4_ranks(tmp_path, monkeypatch, ranks):
    labels = _labels(monkeypatch, "hlines")
    data = _load("low_latency")
    data["ranks"] = ranks
    for r in data["results"]:
        del r["kernel_us"], r["phase_us"]
    paths = plot_bench.plot(data, str(tmp_path))
    assert [Path(p).name for p in paths] == ["bench_low_latency.png" if ranks == 4 else "bench_low_latency_1ranks.png"]
    assert len([label for label in labels if label]) == (1 if ranks == 4 else 0)   # one legend entry
    assert len(labels) == (5 if ranks == 4 else 0)   # dispatch's range, combine's range, both


def test_titles_name_ranks_card_and_date():
    data = _load("low_latency")
    assert plot_bench.run_label(data) == f"1 rank, {data['device']}, {data['date']}"
    assert plot_bench.run_label({"ranks": 4, "device": "X"}) == "4 ranks, X, date not recorded"


def test_bench_json_records_the_date(tmp_path):
    bc.write_json(str(tmp_path / "a.json"), {"bench": "x"})
    bc.write_json(str(tmp_path / "b.json"), {"bench": "x", "date": "2026-01-02"})
    assert json.loads((tmp_path / "a.json").read_text())["date"] == time.strftime("%Y-%m-%d", time.gmtime())
    assert json.loads((tmp_path / "b.json").read_text())["date"] == "2026-01-02"
