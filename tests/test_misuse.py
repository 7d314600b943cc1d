"""Misuse of the reference backend: every case of tests/misuse_cases.py raises the expected type with
a message naming the argument, and the Buffer works afterwards. One rank in this process (one test
per case), and several ranks under mpiexec (tests/mpi/check_misuse.py) for the collective cases
(bad routing or a worst-token overflow on one rank only: every rank raises)."""

import numpy as np
import pytest

from misuse_cases import (ll_buffer_kwargs, misuse_cases, normal_buffer_kwargs, reference_ll_round_trip,
                          still_works)
from test_reference import REPO, _mpirun

SCRIPT = REPO / "tests" / "mpi" / "check_misuse.py"


def _comm():
    from mpi4py import MPI

    return MPI.COMM_SELF


class _Suite:
    """The Buffers and cases of this process (built once: collection needs the names)."""

    def __init__(self):
        from cupy_ep import reference

        comm = _comm()
        self.buf = reference.Buffer(comm, **normal_buffer_kwargs(reference.Buffer, 1))
        self.ll = reference.Buffer(comm, **ll_buffer_kwargs(reference.Buffer, 1))
        self.cases = misuse_cases(reference.Buffer, self.buf, np, comm, ll_buf=self.ll)
        self.by_name = {c.name: c for c in self.cases}
        assert len(self.by_name) == len(self.cases), "case names must be unique"


_SUITE = None


def _suite():
    global _SUITE
    if _SUITE is None:
        _SUITE = _Suite()
    return _SUITE


def pytest_generate_tests(metafunc):
    if "case_name" in metafunc.fixturenames:
        metafunc.parametrize("case_name", [c.name for c in _suite().cases])


@pytest.fixture(scope="module")
def suite():
    return _suite()


def test_case(suite, case_name):
    case = suite.by_name[case_name]
    outcome = case.run()
    assert outcome is None, outcome
    assert case.needles and case.needles[0], "every case names the argument"
    rng = np.random.default_rng(abs(hash(case_name)) % (2 ** 32))
    if case.mode == "low_latency":
        reference_ll_round_trip(_comm(), suite.ll, rng)
    else:
        still_works(_comm(), rng, suite.buf)


def test_cases_cover_the_issue(suite):
    """The items of the issue each have a case (the lead's GPU suite runs the same list)."""
    names = " | ".join(suite.by_name)
    for words in ("more tokens than the buffers hold", "request larger than num_rdma_bytes",
                  "low_latency_combine: topk_idx with fewer rows", "destroyed Buffer: dispatch",
                  "more rows than num_worst_tokens", "x float32", "x not C-contiguous", "expert id == num_experts",
                  "num_tokens_per_expert disagrees", "cached dispatch with topk_idx", "combine: topk_weights with another K",
                  "layout: more top-k columns", "combine with another Buffer's handle",
                  "low_latency_combine with another Buffer's handle"):
        assert words in names, words


def test_destroyed_buffer_raises_before_any_other_check():
    from cupy_ep import reference
    from cupy_ep.errors import CupyEpError

    b = reference.Buffer(_comm())
    b.destroy()
    for call in (lambda: b.dispatch("not an array"), lambda: b.get_dispatch_layout(None, -1),
                 lambda: b.low_latency_combine(None, None, None, None, zero_copy=True), lambda: b.check(False)):
        with pytest.raises(CupyEpError, match="^this Buffer was destroyed$"):
            call()
    b.destroy()                         # idempotent
    assert not b.is_available()


def test_handles_carry_what_the_shared_checks_need(suite):
    """Normal handles: num_topk and num_rows; low-latency handles: 6-tuples whose handle[5] has
    num_tokens and topk (as the GPU's LLHandlePrivate)."""
    buf, ll = suite.buf, suite.ll
    from cupy_ep.testing import make_routing, make_weights, make_x

    rng = np.random.default_rng(7)

    x = make_x(rng, 5, 256)
    idx = make_routing(rng, 5, 2, 2, "random", 1)
    w = make_weights(rng, 5, 2)
    layout = buf.get_dispatch_layout(idx, 2)
    out = buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                       topk_idx=idx, topk_weights=w, num_worst_tokens=7)
    h = out[4]
    assert (h.num_topk, h.num_rows, h.num_tokens, h.hidden) == (2, 7, 5, 256)
    _, _, handle, _, _ = ll.low_latency_dispatch(x, idx, 8, 2, use_fp8=False)
    assert isinstance(handle, tuple) and len(handle) == 6
    assert (handle[2], handle[3], handle[4]) == (8, 256, 2)
    assert (handle[5].num_tokens, handle[5].topk) == (5, 2)


@pytest.mark.parametrize("backend", ["reference", "gpu"])
def test_size_hints_match_the_gpu_formulas(backend):
    """Both Buffers' static size hints give the geometry's values (pure-Python formulas, no GPU)."""
    import cupy_ep
    from cupy_ep import reference
    from cupy_ep.geometry import (internode_nvl_size_hint as inter_nvl, internode_rdma_size_hint as rdma_buffer_size_hint,
                                  intranode_nvl_size_hint as nvl_buffer_size_hint, ll_size_hint)

    if backend == "gpu":
        pytest.importorskip("cupy", reason="the GPU Buffer needs the cuda13 extra")
    B = reference.Buffer if backend == "reference" else cupy_ep.Buffer
    assert B.get_nvl_buffer_size_hint(128, 7168, 8, 8) == nvl_buffer_size_hint(128, 7168, 8, 8)
    assert B.get_nvl_buffer_size_hint(128, 7168, 8, 8, num_nvl_peers=8) == nvl_buffer_size_hint(128, 7168, 8, 8)
    assert B.get_nvl_buffer_size_hint(128, 7168, 16, 8, num_nvl_peers=8) == inter_nvl(16 * 128, 7168, 16, 8, 8)
    assert B.get_nvl_buffer_size_hint(128, 7168, 16, 8, num_nvl_peers=8, num_max_recv_tokens=300) == \
        inter_nvl(300, 7168, 16, 8, 8)
    assert B.get_rdma_buffer_size_hint(128, 7168, 8, 8) == 0
    assert B.get_rdma_buffer_size_hint(128, 7168, 16, 8, 8) == rdma_buffer_size_hint(128, 7168, 16, 8, 8)
    assert B.get_low_latency_rdma_size_hint(128, 7168, 16, 288) == ll_size_hint(128, 7168, 16)
    with pytest.raises(ValueError, match="^num_nvl_peers"):
        B.get_rdma_buffer_size_hint(128, 7168, 16, 3, 8)
    with pytest.raises(ValueError, match="^num_experts"):
        B.get_low_latency_rdma_size_hint(128, 7168, 16, 100)


@pytest.mark.parametrize("num_ranks, nvl_peers", [(2, None), (3, None), (4, 2)])
def test_misuse_multi_rank(num_ranks, nvl_peers):
    proc = _mpirun(num_ranks, SCRIPT, *([] if nvl_peers is None else ["--nvl-peers", str(nvl_peers)]))
    ok = [ln for ln in proc.stdout.splitlines() if ln.startswith("OK misuse")]
    assert proc.returncode == 0 and ok, f"exit code {proc.returncode}\n{proc.stdout[-8000:]}"
    assert f"ranks={num_ranks}" in ok[0]
