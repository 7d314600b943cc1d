"""scripts/smoke_multihost.py without a GPU: its flow under mpiexec with the reference standing in
for the GPU Buffer (tests/mpi/check_smoke_multihost.py), and its pure parts."""
import sys

import pytest

from test_reference import REPO, _mpirun

sys.path.insert(0, str(REPO / "scripts"))
import smoke_multihost  # noqa: E402

CHECK = REPO / "tests" / "mpi" / "check_smoke_multihost.py"


def _result_lines(proc):
    return [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS smoke_multihost", "FAIL smoke_multihost"))]


def test_a_good_round_trip_across_domains_passes_in_one_line():
    proc = _mpirun(2, CHECK, "good", "--num-nvl-peers", "1", "--fp8")
    lines = _result_lines(proc)
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout[-4000:]
    assert lines[0].startswith("PASS smoke_multihost: 2 ranks on 1 host(s), 2 NVLink domains x 1, NVSHMEM ")
    assert "dispatch FP8 + combine" in lines[0] and "every element matches cupy_ep.reference" in lines[0]


def test_one_wrong_element_fails_naming_the_rank():
    proc = _mpirun(2, CHECK, "corrupt", "--num-nvl-peers", "1")
    lines = _result_lines(proc)
    assert proc.returncode == 1 and len(lines) == 1, proc.stdout[-4000:]
    assert lines[0].startswith("FAIL smoke_multihost: rank(s) [0, 1] failed; rank 0 in the round trip")
    assert "rank 1: combine" in lines[0] and "combined_x: 1 of" in lines[0]


def test_a_stuck_rank_ends_the_job_with_a_fail_line():
    proc = _mpirun(2, CHECK, "hang", "--num-nvl-peers", "1", "--time-limit", "3")
    lines = _result_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout[-4000:]
    assert lines[0].startswith("FAIL smoke_multihost: no result after 3 s (rank 0 was in: the round trip")


@pytest.mark.parametrize("ranks, expected", [(1, 32), (2, 32), (3, 33), (16, 32), (48, 48)])
def test_default_experts_is_the_smallest_multiple_of_the_ranks_from_32(ranks, expected):
    assert smoke_multihost.default_experts(ranks) == expected


@pytest.mark.parametrize("argv", [["--hidden", "100"], ["--tokens", "0"], ["--num-nvl-peers", "0"],
                                  ["--time-limit", "0"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        smoke_multihost.parse_args(argv)
    assert "error:" in capsys.readouterr().err
