"""One rank's bad input or absence never hangs or breaks the job (issue 21), on the reference:
the cases of tests/asymmetric_cases.py at 2 and 4 ranks (tests/mpi/check_asymmetric.py), each
followed by a checked round trip on the same Buffer; the whole run bounded by _mpirun's timeout."""
import pytest

from test_reference import REPO, _mpirun

SCRIPT = REPO / "tests" / "mpi" / "check_asymmetric.py"


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_asymmetric_cases(num_ranks):
    proc = _mpirun(num_ranks, SCRIPT, "--timeout-s", "2")
    ok = [ln for ln in proc.stdout.splitlines() if ln.startswith("OK asymmetric")]
    assert proc.returncode == 0 and ok, f"exit code {proc.returncode}\n{proc.stdout[-8000:]}"
    assert f"ranks={num_ranks}" in ok[0]
