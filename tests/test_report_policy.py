"""Which point of the GPU Buffer raises which device report (no GPU needed: the status record is
faked). A report raised by one rank where a peer may not have it in view yet would leave that
peer waiting in the call's kernels, so:

* a timeout is raised at the start of every call (the Buffer is broken on that rank anyway);
* a layout report (this rank's own) by local calls and by ``check()``;
* the reports of collective kernels (overflow, bad routing found by a worst-token dispatch) only
  by ``check()`` and by a non-cached dispatch after its host wait.
"""
from types import SimpleNamespace

import numpy as np
import pytest

from cupy_ep import limits
from cupy_ep.buffer import Buffer
from cupy_ep.errors import CommTimeoutError, PeerRefusalError, TokenOverflowError, status_error
from cupy_ep.memory import StatusRecord
from cupy_ep.normal import NormalEngine


class FakeStatus(StatusRecord):
    """A status record holding one report, in host memory only (no device record to clear)."""

    def __init__(self, status=limits.ST_OK, kernel="notify_dispatch", detail=0, detail2=0):
        self.fields = np.zeros(limits.STATUS_RECORD_INTS, np.int32)
        self.fields[:7] = [status, limits.KERNEL_IDS[kernel], 0, 1, detail, detail2, -1]

    def take(self):
        status, kernel, rank, peer, detail, detail2, channel = (int(v) for v in self.fields[:7])
        if status == limits.ST_OK:
            return None
        error = status_error(status, limits.KERNEL_NAMES[kernel], rank, peer, detail, detail2, channel)
        if status != limits.ST_TIMEOUT:
            self.fields[:] = 0
        return error


def buffer_with(status):
    return SimpleNamespace(_broken=None, _status=status)


def raised_at(buf, **point):
    try:
        Buffer._raise_reports(buf, **point)
    except Exception as e:  # noqa: BLE001 - the type is what the tests look at
        return type(e)
    return None


COLLECTIVE_CALL, LOCAL_CALL, CHECK = {}, dict(layout_reports=True), dict(every_report=True)


def test_overflow_waits_for_check():
    buf = buffer_with(FakeStatus(limits.ST_OVERFLOW, "notify_dispatch", detail=16, detail2=1))
    assert raised_at(buf, **COLLECTIVE_CALL) is None
    assert raised_at(buf, **LOCAL_CALL) is None
    assert raised_at(buf, **CHECK) is TokenOverflowError
    assert raised_at(buf, **CHECK) is None, "a report is raised once"


def test_peer_bad_input_waits_for_check():
    buf = buffer_with(FakeStatus(limits.ST_PEER_BAD_INPUT, "internode_notify"))
    assert raised_at(buf, **COLLECTIVE_CALL) is None
    assert raised_at(buf, **CHECK) is PeerRefusalError   # a ValueError naming the peer


def test_layout_report_raised_by_local_calls_only():
    buf = buffer_with(FakeStatus(limits.ST_BAD_EXPERT, "get_dispatch_layout", detail=99))
    assert raised_at(buf, **COLLECTIVE_CALL) is None
    assert raised_at(buf, **LOCAL_CALL) is ValueError


@pytest.mark.parametrize("point", [COLLECTIVE_CALL, LOCAL_CALL, CHECK])
def test_timeout_raised_everywhere_and_breaks_the_buffer(point):
    buf = buffer_with(FakeStatus(limits.ST_TIMEOUT, "intranode_dispatch"))
    assert raised_at(buf, **point) is CommTimeoutError
    assert buf._broken is not None
    assert raised_at(buf, **COLLECTIVE_CALL) is CommTimeoutError, "every later call raises too"


def test_non_cached_dispatch_raises_earlier_collective_reports_only():
    engine = SimpleNamespace(status=FakeStatus(limits.ST_OVERFLOW, "internode_notify", detail=9, detail2=4))
    with pytest.raises(TokenOverflowError):
        NormalEngine._raise_earlier_report(engine)
    engine = SimpleNamespace(status=FakeStatus(limits.ST_BAD_EXPERT, "get_dispatch_layout"))
    NormalEngine._raise_earlier_report(engine)   # this rank's own: notify already cancelled the call for it
    assert engine.status.status == limits.ST_BAD_EXPERT
