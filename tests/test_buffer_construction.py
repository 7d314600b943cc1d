"""A GPU Buffer whose construction fails, without a GPU: every construction step agrees on its
outcome between ranks, and what was made is released before the error reaches the caller.

The GPU resources are replaced by recording fakes; the communicator is a fake rank 0 of 2 whose
peer's contribution to each allgather is scripted, so that a peer's failure can be played."""

import pytest

pytest.importorskip("cupy")   # cupy_ep.buffer imports it inside __init__; CI installs it (NVRTC)

from cupy_ep import bootstrap, buffer, memory  # noqa: E402
from cupy_ep.bootstrap import Topology  # noqa: E402
from cupy_ep.errors import CupyEpError  # noqa: E402


class Comm:
    """Rank 0 of 2. ``peer`` holds what rank 1 contributes to each allgather, in order (default:
    the same as rank 0). Records collectives in ``log``."""

    def __init__(self, log, peer=()):
        self.log, self.peer = log, list(peer)

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def allgather(self, value):
        self.log.append("allgather")
        return [value, self.peer.pop(0) if self.peer else value]

    def Barrier(self):
        self.log.append("barrier")

    def Free(self):
        self.log.append("comm freed")


def fake(log, name, fail=None):
    """A class whose instances log their creation and release; ``fail``: raised on creation."""
    class Fake:
        def __init__(self, *args, **kwargs):
            if fail is not None:
                log.append(f"{name} failed")
                raise fail
            log.append(f"{name} made")
            self.num_bytes, self.ptr, self.peer_ptrs = 1 << 20, 0x1000, [0x1000, 0x2000]

        def open_peers(self):
            log.append(f"{name} opened")

        def free(self, *comm):
            log.append(f"{name} freed")

        def destroy(self):
            log.append(f"{name} destroyed")

    return Fake


@pytest.fixture
def gpu_fakes(monkeypatch):
    """Replaces every GPU resource of Buffer.__init__; returns (log, set_fake)."""
    import cupy

    log = []
    monkeypatch.setattr(cupy.cuda, "Stream", lambda **kw: object())
    monkeypatch.setattr(cupy.cuda.runtime, "deviceSynchronize", lambda: None)
    monkeypatch.setattr(bootstrap, "select_device", lambda topology: 0)

    def discover(comm, num_nvl_peers=None):
        return Topology(rank=0, num_ranks=2, nvl_rank=0, num_nvl_ranks=2, rdma_rank=0, num_rdma_ranks=1,
                        local_rank=0, num_local_ranks=2, nvl_comm=Comm(log))

    monkeypatch.setattr(bootstrap, "discover", discover)

    def set_fake(module, name, fail=None):
        monkeypatch.setattr(module, name, fake(log, name, fail))

    for name in ("StatusRecord", "LayoutEngine", "NVLinkBuffer", "IntranodeEngine"):
        set_fake(buffer, name)
    set_fake(memory, "SymmetricBuffer")
    return log, set_fake


def test_construction_and_destroy(gpu_fakes):
    """The steps in order, one agreement after each, then destroy releases everything once."""
    log, _ = gpu_fakes
    comm = Comm(log)
    buf = buffer.Buffer(comm, num_nvl_bytes=1 << 20)
    assert log == ["StatusRecord made", "LayoutEngine made", "NVLinkBuffer made", "allgather",
                   "NVLinkBuffer opened", "allgather", "IntranodeEngine made", "allgather"]
    log.clear()
    buf.destroy()
    buf.destroy()
    assert log == ["barrier", "LayoutEngine destroyed", "IntranodeEngine destroyed", "NVLinkBuffer freed",
                   "StatusRecord freed", "comm freed"]


def test_a_failed_step_releases_what_was_made(gpu_fakes):
    """NVSHMEM refusing the symmetric buffer (on every rank): the NVLink buffer, the status record
    and the domain communicator made before it are released, and the error reaches the caller."""
    log, set_fake = gpu_fakes
    set_fake(memory, "SymmetricBuffer", fail=ValueError("num_rdma_bytes: the heap cannot hold it"))
    comm = Comm(log, peer=[None, None, "ValueError: num_rdma_bytes: the heap cannot hold it"])
    with pytest.raises(ValueError, match="num_rdma_bytes"):
        buffer.Buffer(comm, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20, low_latency_mode=True)
    assert log[-6:] == ["SymmetricBuffer failed", "allgather", "LayoutEngine destroyed", "NVLinkBuffer freed",
                        "StatusRecord freed", "comm freed"]


def test_a_peers_failure_fails_this_rank_too(gpu_fakes):
    """Rank 1 could not allocate: rank 0, which could, raises too (naming rank 1) instead of waiting
    for rank 1 in the next collective, and frees its own allocation."""
    log, _ = gpu_fakes
    comm = Comm(log, peer=["OutOfMemoryError: out of memory allocating 1048576 bytes"])
    with pytest.raises(CupyEpError, match=r"allocating the Buffer failed on rank\(s\) \[1\]: rank 1: OutOfMemoryError"):
        buffer.Buffer(comm, num_nvl_bytes=1 << 20)
    assert "NVLinkBuffer opened" not in log
    assert log[-4:] == ["LayoutEngine destroyed", "NVLinkBuffer freed", "StatusRecord freed", "comm freed"]


def test_bad_arguments_raise_before_anything_is_made(gpu_fakes):
    log, _ = gpu_fakes
    for kwargs, match in [(dict(ll_transport="nvl"), "ll_transport"), (dict(timeout_s="5"), "timeout_s"),
                          (dict(num_sms=1), "num_sms"), (dict(num_sms=2.5), "num_sms")]:
        with pytest.raises((ValueError, TypeError), match=match):
            buffer.Buffer(Comm(log), num_rdma_bytes=1 << 20, low_latency_mode=True, **kwargs)
    assert log == []


class Domain:
    def __init__(self, calls):
        self.calls = calls

    def Get_rank(self):
        return 1

    def Barrier(self):
        self.calls.append("barrier")


@pytest.fixture
def runtime_calls(monkeypatch):
    runtime = pytest.importorskip("cupy.cuda.runtime")
    calls = []
    monkeypatch.setattr(runtime, "malloc", lambda n: calls.append(f"malloc {n}") or 0x200)
    monkeypatch.setattr(runtime, "memset", lambda p, v, n: None)
    monkeypatch.setattr(runtime, "deviceSynchronize", lambda: None)
    monkeypatch.setattr(runtime, "ipcCloseMemHandle", lambda p: calls.append(f"close {p:#x}"))
    monkeypatch.setattr(runtime, "free", lambda p: calls.append(f"free {p:#x}"))
    return calls


def test_nvlink_buffer_never_opened_is_freed_alone(runtime_calls):
    """No peer opened it: free() needs no barrier (the peers may have failed before allocating)."""
    buf = memory.NVLinkBuffer(Domain(runtime_calls), 64)
    buf.free()
    buf.free()
    assert runtime_calls == ["malloc 64", "free 0x200"]


def test_nvlink_buffer_whose_mapping_failed_is_freed_after_the_peers(runtime_calls, monkeypatch):
    """The IPC exchange failed (on every rank of the domain): the allocation is freed after a barrier,
    when no peer can still be closing its mapping of it."""
    def exchange(comm, ptr):
        raise CupyEpError("cudaIpcOpenMemHandle failed on rank(s) [2]")

    monkeypatch.setattr(bootstrap, "exchange_ipc_handles", exchange)
    buf = memory.NVLinkBuffer(Domain(runtime_calls), 64)
    with pytest.raises(CupyEpError, match="cudaIpcOpenMemHandle"):
        buf.open_peers()
    buf.free()
    assert runtime_calls == ["malloc 64", "barrier", "free 0x200"]


@pytest.mark.parametrize("mine, peers, raised", [
    (None, [None], None),
    (KeyError("mine"), [None], KeyError),
    (None, ["MemoryError: peer"], CupyEpError),
    (KeyError("mine"), ["MemoryError: peer"], KeyError),
])
def test_run_agreed(mine, peers, raised):
    log = []

    def step():
        if mine is not None:
            raise mine

    comm = Comm(log, peer=peers)
    if raised is None:
        bootstrap.run_agreed(comm, "step", step)
    else:
        with pytest.raises(raised):
            bootstrap.run_agreed(comm, "step", step)
    assert log == ["allgather"]
