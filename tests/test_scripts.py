"""The scripts a user meets first: every one has a full --help, and the GPU-only benchmarks (and
the example asked for the GPU) on a machine without a GPU end with one line that says so and what
to run instead (no traceback)."""
import subprocess
import sys

import pytest

from cupy_ep import bootstrap
from test_reference import REPO, _env

SCRIPTS = sorted(p for p in (REPO / "scripts").glob("*.py") if p.name not in ("bench_common.py", "null_device.py"))
GPU_ONLY = ["bench_intranode.py", "bench_low_latency.py", "bench_internode.py", "profile_call.py",
            "smoke_multihost.py"]


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_is_whole(script):
    proc = _run(script, "--help")
    if script.name == "plot_bench.py" and "matplotlib" in proc.stderr:
        pytest.skip("plot_bench needs matplotlib (the plot extra)")
    assert proc.returncode == 0, proc.stderr
    # the docstring's last paragraph is in the help: nothing was cut off
    last = [ln.strip() for ln in script.read_text().split('"""')[1].strip().splitlines() if ln.strip()][-1]
    assert " ".join(last.split()[:4]) in " ".join(proc.stdout.split()), proc.stdout


@pytest.mark.skipif(bootstrap.gpu_available(), reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("script", GPU_ONLY)
def test_gpu_only_script_says_so_in_one_line(script):
    extra = ["--num-nvl-peers", "1"] if script == "bench_internode.py" else []
    proc = _run(REPO / "scripts" / script, *extra)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{script} needs a GPU on every rank (rank 0: ")
    assert "moe_example.py --backend reference" in lines[0] and proc.stdout == ""


@pytest.mark.skipif(bootstrap.gpu_available(), reason="checks the behaviour without a GPU")
def test_the_example_asked_for_the_gpu_without_one_says_so_in_one_line():
    proc = _run(REPO / "scripts" / "moe_example.py", "--backend", "gpu")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and proc.stdout == "", proc.stderr
    assert lines[0].startswith("--backend gpu needs a GPU on every rank (rank 0: ")
    assert "--backend reference runs anywhere" in lines[0]
