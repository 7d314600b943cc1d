"""DeepEP v1 low-latency parity on the reference backend (tests/mpi/check_ll_parity.py under
mpiexec): LogFMT combine within DeepEP's bounds and bit for bit against a model of the GPU's
partial sums; receive-wait statistics; shrink mode (ranks stopping at a dispatch, a combine or
a clean, masked, then back)."""
import pytest

from test_reference import REPO, _mpirun

SCRIPT = REPO / "tests" / "mpi" / "check_ll_parity.py"


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_ll_parity(num_ranks):
    proc = _mpirun(num_ranks, SCRIPT)
    assert proc.returncode == 0 and f"OK ll_parity ranks={num_ranks}" in proc.stdout, proc.stdout[-6000:]
