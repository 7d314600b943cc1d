"""cupy_ep.log: a long compilation is told once, on rank 0, through the "cupy_ep" logger, visible
without configuration and silenced by logging configuration or CUPY_EP_LOG=off."""
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cupy_ep import log

REPO = Path(__file__).resolve().parents[1]
KERNEL = 'extern "C" __global__ void fill(int* p) { p[threadIdx.x] = VALUE; }\n'


@pytest.fixture
def quick(monkeypatch):
    """Every compilation counts as long; logging as an application would leave it: unconfigured."""
    monkeypatch.setattr(log, "COMPILE_NOTICE_S", 0.0)
    monkeypatch.delenv("CUPY_EP_LOG", raising=False)
    monkeypatch.setattr(log.logger, "handlers", [])
    monkeypatch.setattr(log.logger, "level", logging.NOTSET)
    monkeypatch.setattr(log.logger, "propagate", True)


def _notice(name="k.cu", constants=None):
    with log.compile_notice(name, "NVRTC", "sm_90", {"A": 1} if constants is None else constants,
                            Path("/cache/k-123.cubin")):
        pass


def test_message_says_what_why_where_and_how_long(quick, caplog):
    caplog.set_level(logging.INFO, logger="cupy_ep")
    _notice(constants={f"C{i}": i for i in range(8)})
    [rec] = [r for r in caplog.records if r.name == "cupy_ep"]
    text = rec.getMessage()
    assert text.startswith("compiled k.cu (C0=0, C1=1, C2=2, C3=3, C4=4, C5=5, 2 more) for sm_90 with NVRTC in ")
    assert "first use of this shape" in text and "cached in /cache/k-123.cubin" in text


def test_short_compilations_other_ranks_and_off_are_quiet(quick, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="cupy_ep")
    monkeypatch.setattr(log, "COMPILE_NOTICE_S", 3600.0)
    _notice()
    monkeypatch.setattr(log, "COMPILE_NOTICE_S", 0.0)
    monkeypatch.setattr(log, "_world_rank", lambda: 1)
    _notice()
    monkeypatch.setattr(log, "_world_rank", lambda: 0)
    monkeypatch.setenv("CUPY_EP_LOG", "off")
    _notice()
    assert [r for r in caplog.records if r.name == "cupy_ep"] == []


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k != "CUPY_EP_LOG"}
    full.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=full)


NOTICE = ("import logging\n{setup}\nfrom pathlib import Path\nfrom cupy_ep import log\nlog.COMPILE_NOTICE_S = 0\n"
          "with log.compile_notice('k.cu', 'NVRTC', 'sm_90', {{}}, Path('/c/k.cubin')):\n    pass\n")


@pytest.mark.parametrize("setup, env, shown", [
    ("", {}, True),                                                           # no configuration: shown
    ("", {"CUPY_EP_LOG": "off"}, False),                                      # the environment variable
    ("logging.basicConfig(level=logging.WARNING)", {}, False),                # an application's configuration
    ("logging.getLogger('cupy_ep').setLevel(logging.WARNING)", {}, False),    # the logger's own level
    ("logging.basicConfig(level=logging.INFO)", {}, True),
])
def test_visible_without_configuration_and_silenced_the_usual_ways(setup, env, shown):
    proc = _python(NOTICE.format(setup=setup), **env)
    assert proc.returncode == 0, proc.stderr
    assert ("compiled k.cu for sm_90 with NVRTC" in proc.stderr) == shown, proc.stderr
    assert proc.stderr.count("compiled k.cu") == (1 if shown else 0)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="NVRTC comes with the cuda13 extra")
def test_a_real_compilation_is_told_once_then_loaded_from_the_cache(quick, caplog, tmp_path, monkeypatch):
    from cupy_ep import jit

    caplog.set_level(logging.INFO, logger="cupy_ep")
    monkeypatch.setenv("CUPY_EP_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "fill.cu").write_text(KERNEL)
    for _ in range(2):
        jit.compile_check(str(tmp_path / "fill.cu"), {"VALUE": 7}, arch="sm_90")
    records = [r.getMessage() for r in caplog.records if r.name == "cupy_ep"]
    assert len(records) == 1, records
    assert records[0].startswith("compiled fill.cu (VALUE=7) for sm_90 with NVRTC in ")
    assert f"cached in {tmp_path / 'cache'}" in records[0]
