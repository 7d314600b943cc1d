"""A GPU Buffer whose construction fails, without a GPU: every construction step agrees on its
outcome between ranks, so that all ranks leave through the same collectives, and what each
rank made is released before the error reaches the caller.

Two ranks run ``Buffer(...)`` in two threads over fake communicators whose collectives really
meet (a ``threading.Barrier`` with a timeout: a rank left waiting breaks it). The GPU, CUDA IPC
and NVSHMEM are replaced by fakes that count what is made and freed, and a failure is injected
on one rank at each step in turn; the real NVLinkBuffer, SymmetricBuffer and LowLatencyEngine
run over them."""

import sys
import threading
import types

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")   # cupy_ep.buffer imports it; CI installs it (NVRTC)

from cupy_ep import bootstrap, buffer, engine, jit, low_latency, memory  # noqa: E402
from cupy_ep.bootstrap import Topology  # noqa: E402
from cupy_ep.errors import CupyEpError  # noqa: E402

RANKS = 2
_thread = threading.local()   # .rank: the rank this thread plays


class Injected(RuntimeError):
    """The failure a test injects."""


class Group:
    """One communicator shared by the two ranks; collectives meet in a barrier."""

    def __init__(self, name):
        self.name = name
        self.meet = threading.Barrier(RANKS, timeout=5)
        self.slots = [None] * RANKS
        self.dups = []   # the groups of the ranks' first, second... Idup
        self.inboxes = {}   # rank -> [(source, tag, message)] in flight to it
        self.lock = threading.Lock()

    def dup(self, n):
        with self.lock:
            while len(self.dups) <= n:
                self.dups.append(Group(f"{self.name} dup {len(self.dups)}"))
            return self.dups[n]


class Done:
    """A request that is complete."""

    def Test(self):
        return True


class Collectives:
    """A rank's handle on a Group with collectives only (as ``cupy_ep.torch_comm.TorchComm``);
    records them in ``log``."""

    def __init__(self, group, rank, log):
        self.group, self.rank, self.log = group, rank, log
        self.num_dups = 0

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return RANKS

    def allgather(self, value):
        self.log.append((self.group.name, "allgather"))
        self.group.slots[self.rank] = value
        self.group.meet.wait()
        gathered = list(self.group.slots)
        self.group.meet.wait()
        return gathered

    def Barrier(self):
        self.log.append((self.group.name, "barrier"))
        self.group.meet.wait()

    def Free(self):
        self.log.append((self.group.name, "free"))
        self.group.meet.wait()


class Message:
    def __init__(self, body):
        self.body = body

    def recv(self):
        return self.body


class Comm(Collectives):
    """A rank's handle on a Group, with what mpi4py's communicators add: a Dup, a broadcast (the
    host steps' nonce) and point-to-point messages (the host steps: the construction's argument
    agreement)."""

    def Idup(self):
        self.log.append((self.group.name, "idup"))
        self.num_dups += 1
        return Comm(self.group.dup(self.num_dups - 1), self.rank, self.log), Done()

    def Ibcast(self, buf, root=0):
        data = buf[0]
        if self.rank == root:
            self.group.slots[root] = bytes(data)
        self.group.meet.wait()
        data[:] = self.group.slots[root]
        self.group.meet.wait()
        return Done()

    def isend(self, obj, dest, tag):
        with self.group.lock:
            self.group.inboxes.setdefault(dest, []).append((self.rank, tag, obj))
        return Done()

    def improbe(self, source, tag, status):
        with self.group.lock:
            inbox = self.group.inboxes.setdefault(self.rank, [])
            for i, (src, t, obj) in enumerate(inbox):
                if t == tag:
                    del inbox[i]
                    status.Set_source(src)
                    return Message(obj)
        return None

    def Get_attr(self, key):
        return 1 << 20


class Fakes:
    """The GPU side of a Buffer, per rank: what is held (``held[rank]``: name -> count) and a
    failure injected at step ``fail_at`` on rank ``fail_rank``."""

    def __init__(self, fail_at=None, fail_rank=None):
        self.fail_at, self.fail_rank = fail_at, fail_rank
        self.held = [dict() for _ in range(RANKS)]
        self.nvl_group = Group("nvl_comm")

    def step(self, name):
        if name == self.fail_at and _thread.rank == self.fail_rank:
            raise Injected(name)

    def take(self, name):
        held = self.held[_thread.rank]
        held[name] = held.get(name, 0) + 1

    def give(self, name):
        held = self.held[_thread.rank]
        held[name] -= 1

    def install(self, monkeypatch):
        fakes = self

        def discover(comm, num_nvl_peers=None):
            return Topology(rank=comm.rank, num_ranks=RANKS, nvl_rank=comm.rank, num_nvl_ranks=RANKS, rdma_rank=0,
                            num_rdma_ranks=1, local_rank=comm.rank, num_local_ranks=RANKS,
                            nvl_comm=Comm(fakes.nvl_group, comm.rank, comm.log))

        def select_device(topology):
            fakes.step("select_device")
            return 0

        class StatusRecord:
            ptr = 0

            def __init__(self):
                fakes.step("StatusRecord")
                fakes.take("status record")

            def free(self):
                fakes.give("status record")

        class IntranodeEngine:
            def __init__(self, *args):
                fakes.step("IntranodeEngine")
                fakes.take("host-mapped words")

            def destroy(self):
                fakes.give("host-mapped words")

        def malloc(nbytes):
            fakes.step("cudaMalloc")
            fakes.take("NVLink memory")
            return 0x1000

        def exchange_ipc_handles(comm, ptr):   # as the real one: agreed, then the pointers
            error = None
            try:
                fakes.step("IPC exchange")
            except Injected as e:
                error = e
            bootstrap._agree(comm, "cudaIpcOpenMemHandle", error)
            return comm.allgather(ptr)

        def init_nvshmem(comm, device_id, heap_bytes):   # as the real one: the plan is agreed
            refused = comm.allgather(fakes.fail_at == "NVSHMEM plan" and _thread.rank == fakes.fail_rank)
            if any(refused):
                raise ValueError("num_rdma_bytes: NVSHMEM's symmetric heap cannot hold it")
            fakes.take("NVSHMEM reference")

        def nvshmem_peer_ptrs(ptr, num_pes):
            fakes.step("NVSHMEM peer pointers")
            return [ptr + pe for pe in range(num_pes)]

        class SymmetricArray:
            def __init__(self, shape):
                fakes.take("NVSHMEM memory")
                self.data = types.SimpleNamespace(ptr=0x8000)

            def fill(self, value):
                pass

        nvcupy = types.ModuleType("nvshmem.core.interop.cupy")
        nvcupy.bytearray = SymmetricArray
        nvcupy.free_array = lambda array: fakes.give("NVSHMEM memory")
        for name in ("nvshmem", "nvshmem.core", "nvshmem.core.interop"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "nvshmem.core.interop.cupy", nvcupy)

        def sm_count():
            fakes.step("SM count")
            return 132

        def zeros(*args, **kwargs):
            fakes.step("low-latency scratch")
            return np.zeros(*args, **kwargs)

        def compile_module(filename, constants=None, comm=None, **kwargs):   # agreed as the real one
            def build():
                fakes.step("low-latency kernels")
                return types.SimpleNamespace(get_function=lambda name: types.SimpleNamespace(kernel=name))
            return jit._agree(comm, f"compiling {filename}", build)

        patches = [
            (bootstrap, "discover", discover), (bootstrap, "select_device", select_device),
            (bootstrap, "exchange_ipc_handles", exchange_ipc_handles), (bootstrap, "init_nvshmem", init_nvshmem),
            (bootstrap, "release_nvshmem", lambda heap_bytes=0: fakes.give("NVSHMEM reference")),
            (bootstrap, "nvshmem_peer_ptrs", nvshmem_peer_ptrs),
            (buffer, "StatusRecord", StatusRecord), (buffer, "IntranodeEngine", IntranodeEngine),
            (buffer, "LayoutEngine", lambda *args: types.SimpleNamespace()),
            (low_latency, "_sm_count", sm_count), (jit, "compile_module", compile_module), (engine, "_MODULES", {}),
            (cupy, "zeros", zeros), (cupy, "asarray", np.asarray),
            (cupy.cuda, "Stream", lambda **kwargs: object()),
            (cupy.cuda.runtime, "malloc", malloc), (cupy.cuda.runtime, "memset", lambda *args: None),
            (cupy.cuda.runtime, "deviceSynchronize", lambda: None),
            (cupy.cuda.runtime, "ipcCloseMemHandle", lambda ptr: None),
            (cupy.cuda.runtime, "free", lambda ptr: fakes.give("NVLink memory")),
        ]
        for module, name, value in patches:
            monkeypatch.setattr(module, name, value)


def run_ranks(fakes, destroy=True, comm_class=Comm, **buffer_kwargs):
    """Both ranks construct (and, when that worked, destroy) a Buffer over a ``comm_class``;
    returns per rank (exception or None, the communicators' operations in order)."""
    world = Group("comm")
    results = [None] * RANKS

    def rank_main(rank):
        _thread.rank = rank
        log = []
        error = None
        try:
            buf = buffer.Buffer(comm_class(world, rank, log), **buffer_kwargs)
            if destroy:
                buf.destroy()
        except BaseException as e:  # noqa: BLE001 -- reported to the test
            error = e
        results[rank] = (error, log)

    _run_threads(rank_main)
    return results


def _run_threads(rank_main):
    """``rank_main(rank)`` for every rank, each in a thread; fails when one still runs after 30 s."""
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(RANKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a rank is still running"


NORMAL = dict(num_nvl_bytes=1 << 20)
LOW_LATENCY = dict(num_rdma_bytes=1 << 20, low_latency_mode=True)
BOTH = dict(num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20, low_latency_mode=True)
STEPS = [
    ("select_device", NORMAL), ("StatusRecord", NORMAL), ("cudaMalloc", NORMAL), ("IPC exchange", NORMAL),
    ("IntranodeEngine", NORMAL), ("NVSHMEM plan", BOTH), ("NVSHMEM peer pointers", BOTH), ("SM count", BOTH),
    ("low-latency kernels", BOTH), ("low-latency scratch", BOTH), ("cudaMalloc", BOTH), ("IntranodeEngine", BOTH),
]


@pytest.mark.parametrize("kwargs", [NORMAL, LOW_LATENCY, BOTH], ids=["normal", "low-latency", "both"])
def test_construction_and_destroy_release_everything(monkeypatch, kwargs):
    fakes = Fakes()
    fakes.install(monkeypatch)
    results = run_ranks(fakes, **kwargs)
    assert [error for error, _ in results] == [None, None]
    assert results[0][1] == results[1][1]
    assert all(count == 0 for held in fakes.held for count in held.values()), fakes.held
    assert any(held for held in fakes.held[0])   # something was made


@pytest.mark.parametrize("kwargs", [NORMAL, LOW_LATENCY, BOTH], ids=["normal", "low-latency", "both"])
def test_construction_over_collectives_only(monkeypatch, kwargs):
    """A communicator without point-to-point messages or Dup (cupy_ep.torch's TorchComm over a
    ProcessGroup): the Buffer's host steps use its collectives; a failure on one rank still
    fails both and releases everything."""
    fakes = Fakes()
    fakes.install(monkeypatch)
    results = run_ranks(fakes, comm_class=Collectives, **kwargs)
    assert [error for error, _ in results] == [None, None]
    assert results[0][1] == results[1][1]
    assert all(op != "idup" for _, op in results[0][1]), results[0][1]
    assert all(count == 0 for held in fakes.held for count in held.values()), fakes.held

    fakes = Fakes("select_device", 1)
    fakes.install(monkeypatch)
    errors = [error for error, _ in run_ranks(fakes, comm_class=Collectives, **kwargs)]
    assert isinstance(errors[1], Injected) and isinstance(errors[0], CupyEpError), errors
    assert all(count == 0 for held in fakes.held for count in held.values()), fakes.held


@pytest.mark.parametrize("fail_rank", [0, 1])
@pytest.mark.parametrize("fail_at, kwargs", STEPS, ids=[f"{s}-{'both' if k is BOTH else 'normal'}" for s, k in STEPS])
def test_a_failure_on_one_rank_fails_both_and_releases_everything(monkeypatch, fail_at, kwargs, fail_rank):
    """No rank waits for another (the barriers would break), both ranks ran the same collectives,
    both raise (the failing rank its own error), and nothing is left allocated or referenced."""
    fakes = Fakes(fail_at, fail_rank)
    fakes.install(monkeypatch)
    results = run_ranks(fakes, **kwargs)
    errors = [error for error, _ in results]
    assert results[0][1] == results[1][1], "the ranks ran different collectives"
    assert all(error is not None for error in errors), errors
    assert not any(isinstance(error, threading.BrokenBarrierError) for error in errors), errors
    if fail_at in ("IPC exchange", "NVSHMEM plan", "low-latency kernels"):   # failures the step itself agrees on
        assert all(isinstance(error, (CupyEpError, ValueError)) for error in errors), errors
    else:
        assert isinstance(errors[fail_rank], Injected), errors
        other = errors[1 - fail_rank]
        assert isinstance(other, CupyEpError) and f"rank(s) [{fail_rank}]" in str(other), other
    assert all(count == 0 for held in fakes.held for count in held.values()), fakes.held


def test_buffer_arguments_must_agree(monkeypatch):
    fakes = Fakes()
    fakes.install(monkeypatch)
    world = Group("comm")
    errors = [None] * RANKS

    def rank_main(rank):
        _thread.rank = rank
        try:
            buffer.Buffer(Comm(world, rank, []), num_nvl_bytes=(1 + rank) << 20)
        except ValueError as e:
            errors[rank] = e

    _run_threads(rank_main)
    assert all(e is not None and "num_nvl_bytes: must be the same on every rank" in str(e) for e in errors), errors
    assert all(count == 0 for held in fakes.held for count in held.values()), fakes.held


@pytest.mark.parametrize("kwargs, match", [(dict(ll_transport="nvl"), "ll_transport"),
                                           (dict(timeout_s="5"), "timeout_s"),
                                           (dict(timeout_s=float("inf")), "timeout_s"), (dict(num_sms=1), "num_sms"),
                                           (dict(num_sms=2.5), "num_sms"), (dict(enable_shrink=1), "enable_shrink")])
def test_bad_arguments_on_one_rank_cancel_the_construction_on_every_rank(monkeypatch, kwargs, match):
    """The last rank's bad argument: it raises its own error, the other ``ValueError`` naming it,
    both before discovering the topology (the first collective after the argument agreement),
    and the Buffer's own communicator is freed on both."""
    discovered = []
    monkeypatch.setattr(bootstrap, "discover", lambda comm, peers=None: discovered.append(comm))
    world, results = Group("comm"), [None] * RANKS

    def rank_main(rank):
        log = []
        try:
            buffer.Buffer(Comm(world, rank, log), num_rdma_bytes=1 << 20, low_latency_mode=True,
                          **(kwargs if rank == RANKS - 1 else {}))
        except BaseException as e:  # noqa: BLE001 -- reported to the test
            results[rank] = (e, log)

    _run_threads(rank_main)
    (good, good_log), (bad, bad_log) = results
    assert isinstance(bad, (TypeError, ValueError)) and match in str(bad), bad
    assert isinstance(good, ValueError) and "rank 1 passed invalid input to Buffer" in str(good), good
    assert discovered == []
    for log in (good_log, bad_log):
        assert log == [("comm", "idup"), ("comm dup 0", "free")], log


def test_enable_shrink_builds_a_masking_engine_and_must_agree(monkeypatch):
    """enable_shrink=True: the low-latency engine in shrink mode, its mask all zero; every rank
    must pass the same value (ValueError on both, everything released)."""
    fakes = Fakes()
    fakes.install(monkeypatch)
    world = Group("comm")
    got = [None] * RANKS

    def rank_main(rank, shrink_on):
        _thread.rank = rank
        try:
            buf = buffer.Buffer(Comm(world, rank, []), enable_shrink=shrink_on(rank), **LOW_LATENCY)
            got[rank] = (buf.enable_shrink, buf._low_latency.shrink, buf._low_latency.mask.tolist())
            buf.destroy()
        except ValueError as e:
            got[rank] = e

    _run_threads(lambda rank: rank_main(rank, lambda r: True))
    assert got == [(True, True, [0] * RANKS)] * RANKS
    _run_threads(lambda rank: rank_main(rank, lambda r: r == 0))
    assert all("enable_shrink: must be the same on every rank" in str(e) for e in got), got
    assert all(count == 0 for held in fakes.held for count in held.values()), fakes.held


class Domain:
    def __init__(self, calls):
        self.calls = calls

    def Get_rank(self):
        return 1

    def Barrier(self):
        self.calls.append("barrier")


@pytest.fixture
def runtime_calls(monkeypatch):
    calls = []
    runtime = cupy.cuda.runtime
    monkeypatch.setattr(runtime, "malloc", lambda n: calls.append(f"malloc {n}") or 0x200)
    monkeypatch.setattr(runtime, "memset", lambda p, v, n: None)
    monkeypatch.setattr(runtime, "deviceSynchronize", lambda: calls.append("sync"))
    monkeypatch.setattr(runtime, "ipcCloseMemHandle", lambda p: calls.append(f"close {p:#x}"))
    monkeypatch.setattr(runtime, "free", lambda p: calls.append(f"free {p:#x}"))
    return calls


def test_nvlink_buffer_never_opened_is_freed_alone(runtime_calls):
    """No peer opened it: free() needs no barrier (the peers may have failed before allocating)."""
    buf = memory.NVLinkBuffer(Domain(runtime_calls), 64)
    buf.free()
    buf.free()
    assert runtime_calls == ["malloc 64", "sync", "free 0x200"]


def test_nvlink_buffer_whose_mapping_failed_is_freed_after_the_peers(runtime_calls, monkeypatch):
    """The IPC exchange failed (on every rank of the domain): the allocation is freed after a
    barrier, when no peer can still be closing its mapping of it."""
    def exchange(comm, ptr):
        raise CupyEpError("cudaIpcOpenMemHandle failed on rank(s) [2]")

    monkeypatch.setattr(bootstrap, "exchange_ipc_handles", exchange)
    buf = memory.NVLinkBuffer(Domain(runtime_calls), 64)
    with pytest.raises(CupyEpError, match="cudaIpcOpenMemHandle"):
        buf.open_peers()
    buf.free()
    assert runtime_calls == ["malloc 64", "sync", "barrier", "free 0x200"]


def test_nvlink_buffer_reaches_the_barrier_when_its_sync_fails(runtime_calls, monkeypatch):
    """The peers wait in free()'s barrier: a rank whose device sync raises still reaches it."""
    def failing_sync():
        raise RuntimeError("sticky CUDA error")

    buf = memory.NVLinkBuffer(Domain(runtime_calls), 64)
    buf.peer_ptrs = [0x100, 0x200]
    monkeypatch.setattr(cupy.cuda.runtime, "deviceSynchronize", failing_sync)
    with pytest.raises(RuntimeError, match="sticky"):
        buf.free()
    assert runtime_calls[-2:] == ["barrier", "free 0x200"]


def test_status_record_frees_its_pinned_page_when_the_device_half_fails(monkeypatch):
    freed = []

    class Pinned:
        ptr = 0x10

        def __init__(self, nbytes):
            self.host = np.zeros(nbytes, np.uint8)

        def view(self, dtype, count, offset=0):
            return self.host[:count * np.dtype(dtype).itemsize].view(dtype)

        def free(self):
            freed.append(True)

    def zeros(*args, **kwargs):
        raise cupy.cuda.memory.OutOfMemoryError(16, 0, 0)

    monkeypatch.setattr(memory, "HostMapped", Pinned)
    monkeypatch.setattr(cupy, "zeros", zeros)
    with pytest.raises(cupy.cuda.memory.OutOfMemoryError):
        memory.StatusRecord()
    assert freed == [True]
