"""cupy_ep.torch (DeepEP's API on torch tensors) and cupy_ep.torch_comm, without a GPU.

Runs without torch: the adapter must import without it, and its pure parts (argument mapping,
handle packing, UE8M0 packing, the ProcessGroup communicator over a fake torch.distributed) are
checked on NumPy. Tests that need torch itself skip when it is missing.
"""
import inspect
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import cupy_ep.torch as ep_torch
from cupy_ep import bootstrap
from cupy_ep.fp8 import ue8m0_to_float32
from cupy_ep.torch import (Buffer, Config, DispatchHandle, EventOverlap, LowLatencyHandle, Missing, buffer_options,
                           column_major, float_to_ue8m0, pack_ue8m0, rank_prefix_matrix, refuse, unpack_ue8m0)


def test_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import cupy_ep, cupy_ep.torch, cupy_ep.torch_comm\n"
            "try:\n"
            "    cupy_ep.torch.Buffer(comm=object())\n"
            "except ImportError as e:\n"
            "    print('needs torch:', e.name)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs torch: torch" in out.stdout


# -- DeepEP's signatures (v1.2.1) ---------------------------------------------------------------
DEEPEP_SIGNATURES = {
    "__init__": ["group", "num_nvl_bytes", "num_rdma_bytes", "low_latency_mode", "num_qps_per_rank",
                 "allow_nvlink_for_low_latency_mode", "allow_mnnvl", "explicitly_destroy", "comm"],
    "get_dispatch_layout": ["topk_idx", "num_experts", "previous_event", "async_finish", "allocate_on_comm_stream"],
    "dispatch": ["x", "handle", "num_tokens_per_rank", "num_tokens_per_rdma_rank", "is_token_in_rank",
                 "num_tokens_per_expert", "topk_idx", "topk_weights", "expert_alignment", "num_worst_tokens",
                 "config", "previous_event", "async_finish", "allocate_on_comm_stream"],
    "combine": ["x", "handle", "topk_weights", "bias", "config", "previous_event", "async_finish",
                "allocate_on_comm_stream"],
    "low_latency_dispatch": ["x", "topk_idx", "num_max_dispatch_tokens_per_rank", "num_experts",
                             "cumulative_local_expert_recv_stats", "dispatch_wait_recv_cost_stats", "use_fp8",
                             "round_scale", "use_ue8m0", "async_finish", "return_recv_hook"],
    "low_latency_combine": ["x", "topk_idx", "topk_weights", "handle", "use_logfmt", "zero_copy", "async_finish",
                            "return_recv_hook", "out", "combine_wait_recv_cost_stats"],
    "get_next_low_latency_combine_buffer": ["handle"],
    "low_latency_update_mask_buffer": ["rank_to_mask", "mask"],   # shrink mode: DeepEP after v1.2.1
    "low_latency_query_mask_buffer": ["mask_status"],
    "low_latency_clean_mask_buffer": [],
    "clean_low_latency_buffer": ["num_max_dispatch_tokens_per_rank", "hidden", "num_experts"],
    "get_low_latency_rdma_size_hint": ["num_max_dispatch_tokens_per_rank", "hidden", "num_ranks", "num_experts"],
    "get_dispatch_config": ["num_ranks"],
    "get_combine_config": ["num_ranks"],
    "set_num_sms": ["new_num_sms"],
    "capture": [],
    "get_comm_stream": [],
    "get_local_buffer_tensor": ["dtype", "size", "offset", "use_rdma_buffer"],
    "destroy": [],
    "is_sm90_compiled": [],
}


@pytest.mark.parametrize("name", sorted(DEEPEP_SIGNATURES))
def test_signature_is_deepeps(name):
    params = [p.name for p in inspect.signature(getattr(Buffer, name)).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert params == DEEPEP_SIGNATURES[name]


def test_deepep_defaults():
    sig = inspect.signature(Buffer.low_latency_dispatch).parameters
    assert (sig["use_fp8"].default, sig["round_scale"].default, sig["use_ue8m0"].default) == (True, False, False)
    assert Buffer.num_sms == 20
    assert inspect.signature(EventOverlap).parameters.keys() >= {"event", "extra_tensors"}


# -- argument mapping -----------------------------------------------------------------------------
def test_buffer_options():
    assert buffer_options(False, 24, True, False) == {"ll_transport": "auto"}
    assert buffer_options(True, 24, False, False) == {"ll_transport": "rdma"}
    with pytest.raises(NotImplementedError, match="allow_mnnvl"):
        buffer_options(False, 24, True, True)
    with pytest.raises(ValueError, match="num_qps_per_rank"):
        buffer_options(True, 0, True, False)


def test_refuse_names_the_feature():
    refuse("allow_mnnvl=True (multi-node NVLink)", False)
    with pytest.raises(NotImplementedError, match="allow_mnnvl"):
        refuse("allow_mnnvl=True (multi-node NVLink)", True)


def test_config_maps_num_sms_and_checks_chunks():
    c = Config()
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == (20, 6, 256, 6, 256)
    inner = Config(24, 6, 256, 6, 128).to_cupy_ep()
    assert (inner.num_sms, inner.num_channels) == (24, 12)
    with pytest.raises(ValueError, match="nvl_chunked"):
        Config(20, 8, 8)
    with pytest.raises(ValueError, match="rdma_chunked"):
        Config(20, 6, 256, 0, 256)
    with pytest.raises(NotImplementedError, match="Buffer.get_nvl_buffer_size_hint"):
        c.get_nvl_buffer_size_hint(7168 * 2, 8)
    with pytest.raises(NotImplementedError, match="Buffer.get_rdma_buffer_size_hint"):
        c.get_rdma_buffer_size_hint(7168 * 2, 16)


def test_default_configs_follow_set_num_sms():
    old = Buffer.num_sms
    try:
        Buffer.set_num_sms(32)
        assert Buffer.get_dispatch_config(3).num_sms == 32 and Buffer.get_combine_config(8).num_sms == 32
        with pytest.raises(AssertionError, match="even"):
            Buffer.set_num_sms(7)
    finally:
        Buffer.num_sms = old


def test_size_hints_are_cupy_eps():
    from cupy_ep.buffer import Buffer as CupyEpBuffer

    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 4, 64) == \
        CupyEpBuffer.get_low_latency_rdma_size_hint(128, 7168, 4, 64)
    assert Buffer.get_nvl_buffer_size_hint(4096, 7168, 4, 8) == CupyEpBuffer.get_nvl_buffer_size_hint(4096, 7168, 4, 8)
    assert Buffer.is_sm90_compiled()


# -- handles ----------------------------------------------------------------------------------------
def test_rank_prefix_matrix_bounds_each_source():
    rng = np.random.default_rng(0)
    R = 5
    rows = rng.integers(0, 50, size=(R, R))          # rows[i][j]: tokens rank i sends to rank j
    m = rank_prefix_matrix(rows.tolist())
    assert m.dtype == np.int32 and m.shape == (R, R)
    for j in range(R):                               # on rank j, rows from i are [m[i-1, j], m[i, j])
        starts = np.concatenate([[0], m[:-1, j]])
        np.testing.assert_array_equal(m[:, j] - starts, rows[:, j])


def test_dispatch_handle_is_deepep_shaped():
    inner = object()
    matrix, in_rank = np.zeros((2, 2), np.int32), np.ones((3, 2), bool)
    h = DispatchHandle(inner, False, {"rank_prefix_matrix": matrix, "is_token_in_rank": in_rank})
    assert len(h) == 6 and h[0] is matrix and h[4] is in_rank and h.cupy_ep_handle is inner
    rank_prefix, _, _, recv_src_idx, _, _ = h          # unpacking works as with DeepEP's handle
    assert rank_prefix is matrix
    with pytest.raises(NotImplementedError, match="recv_src_idx"):
        recv_src_idx.size(0)
    with pytest.raises(NotImplementedError, match="send_head"):
        h[5][0]
    h2 = DispatchHandle(inner, True, {"is_token_in_rank": in_rank})
    assert len(h2) == 10 and h2[0] is in_rank and isinstance(h2[1], Missing)
    with pytest.raises(ValueError, match="unknown handle entries"):
        DispatchHandle(inner, True, {"rank_prefix_matrix": matrix})


def test_handles_are_checked():
    ll = LowLatencyHandle("inner", ("src_info", "layout_range", 128, 7168, 64))
    assert tuple(ll) == ("src_info", "layout_range", 128, 7168, 64) and ll.cupy_ep_handle == "inner"
    with pytest.raises(TypeError, match="DispatchHandle"):
        ep_torch._inner_handle(ll, DispatchHandle)
    with pytest.raises(TypeError, match="LowLatencyHandle"):
        ep_torch._inner_handle((1, 2, 3, 4, 5), LowLatencyHandle)


# -- UE8M0 and scale layouts (as DeepEP packs them) ----------------------------------------------------
def test_pack_ue8m0_is_deepeps_word_layout():
    rng = np.random.default_rng(1)
    e = rng.integers(0, 255, size=(3, 5, 16), dtype=np.uint8)
    words = pack_ue8m0(e)
    assert words.dtype == np.int32 and words.shape == (3, 5, 4) and np.shares_memory(words, e)
    u = words.view(np.uint32).astype(np.uint64)
    for i in range(4):          # word p holds group 4p + i in bits 8i..8i+7
        np.testing.assert_array_equal((u >> (8 * i)) & 0xFF, e[..., i::4])
    np.testing.assert_array_equal(unpack_ue8m0(words), e)
    np.testing.assert_array_equal(unpack_ue8m0(column_major(words)), e)


def test_ue8m0_float_round_trip_is_exact():
    e = np.arange(0, 255, dtype=np.uint8)
    f = ue8m0_to_float32(e)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f.astype(np.float64), np.ldexp(1.0, e.astype(np.int64) - 127))
    np.testing.assert_array_equal(float_to_ue8m0(f, np), e)


def test_column_major_keeps_values_swaps_memory():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    c = column_major(a)
    np.testing.assert_array_equal(c, a)
    assert c.strides == (3 * 4 * 4, 4, 3 * 4)


# -- TorchComm over a fake torch.distributed (ranks in threads) ------------------------------------------
class _World:
    """A fake torch.distributed job: ranks are threads, collectives meet at a barrier."""

    def __init__(self, size, hosts):
        self.size, self.hosts = size, hosts
        self.local = threading.local()
        self.lock = threading.Lock()
        self.slots = {}
        self.groups = {}

    def exchange(self, group, obj):
        """Every member of ``group`` contributes ``obj``; returns them in group order."""
        key = (group.ranks, group.calls.setdefault(self.local.rank, 0))
        group.calls[self.local.rank] += 1
        with self.lock:
            self.slots.setdefault(key, {})[self.local.rank] = obj
        while len(self.slots[key]) < len(group.ranks):
            threading.Event().wait(0.001)
        return [self.slots[key][r] for r in group.ranks]


class _Group:
    def __init__(self, world, ranks, backend):
        self.world, self.ranks, self.backend, self.calls = world, tuple(ranks), backend, {}

    def rank(self):
        return self.ranks.index(self.world.local.rank)

    def size(self):
        return len(self.ranks)


def _fake_dist(world):
    dist = types.ModuleType("torch.distributed")

    def all_gather_object(out, obj, group):
        out[:] = world.exchange(group, obj)

    def broadcast_object_list(box, src, group):
        box[0] = world.exchange(group, box[0])[group.ranks.index(src)]

    def new_group(ranks, backend=None, use_local_synchronization=False):
        assert use_local_synchronization and world.local.rank in ranks
        with world.lock:
            return world.groups.setdefault(tuple(sorted(ranks)), _Group(world, sorted(ranks), backend))

    dist.all_gather_object = all_gather_object
    dist.broadcast_object_list = broadcast_object_list
    dist.new_group = new_group
    dist.barrier = lambda group: world.exchange(group, None)
    dist.get_process_group_ranks = lambda group: list(group.ranks)
    dist.get_backend = lambda group: group.backend
    return dist


def _run_ranks(world, fn, monkeypatch):
    fake_torch = types.ModuleType("torch")
    fake_torch.distributed = _fake_dist(world)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setitem(sys.modules, "torch.distributed", fake_torch.distributed)
    monkeypatch.setattr(ep_torch_comm().socket, "gethostname", lambda: world.hosts[world.local.rank])
    results, errors = [None] * world.size, []

    def main(r):
        world.local.rank = r
        try:
            results[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=main, args=(r,)) for r in range(world.size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return results


def ep_torch_comm():
    import cupy_ep.torch_comm as torch_comm

    return torch_comm


def test_torch_comm_collectives(monkeypatch):
    world = _World(3, ["a", "a", "a"])
    nccl = _Group(world, [0, 1, 2], "nccl")

    def body(r):
        comm = ep_torch_comm().TorchComm(nccl)
        assert comm._cpu is not nccl and comm._cpu.backend == "gloo"   # objects travel over gloo
        buf = np.arange(4, dtype=np.int8) if r == 0 else np.zeros(4, np.int8)
        comm.Bcast(buf, root=0)
        comm.Barrier()
        return comm.Get_rank(), comm.Get_size(), comm.allgather(r * 10), comm.bcast(f"from {r}", root=2), buf.tolist()

    for r, (rank, size, gathered, b, buf) in enumerate(_run_ranks(world, body, monkeypatch)):
        assert (rank, size, gathered, b, buf) == (r, 3, [0, 10, 20], "from 2", [0, 1, 2, 3])


def test_torch_comm_topology_for_bootstrap(monkeypatch):
    world = _World(4, ["a", "a", "b", "b"])
    gloo = _Group(world, [0, 1, 2, 3], "gloo")

    def body(r):
        comm = ep_torch_comm().TorchComm(gloo)
        assert comm._cpu is gloo
        topo = bootstrap.discover(comm)
        whole = comm.Split(color=0, key=r)
        with pytest.raises(NotImplementedError, match="key order"):
            comm.Split(color=0, key=-r)
        return (topo.nvl_rank, topo.num_nvl_ranks, topo.rdma_rank, topo.local_rank, topo.nvl_comm.world_ranks(),
                bootstrap._world_ranks(comm), whole.group is gloo)

    got = _run_ranks(world, body, monkeypatch)
    for r, (nvl_rank, nvl_ranks, rdma_rank, local_rank, nvl_world, world_ranks, same) in enumerate(got):
        assert (nvl_rank, nvl_ranks, rdma_rank, local_rank) == (r % 2, 2, r // 2, r % 2)
        assert nvl_world == ((0, 1) if r < 2 else (2, 3)) and world_ranks == (0, 1, 2, 3) and same


# -- with torch (CPU tensors) --------------------------------------------------------------------------------
def test_torch_ue8m0_matches_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    e = rng.integers(0, 255, size=(2, 8, 8), dtype=np.uint8)
    t = torch.from_numpy(e.copy())
    np.testing.assert_array_equal(pack_ue8m0(t).numpy(), pack_ue8m0(e))
    col = column_major(pack_ue8m0(t))
    assert col.stride() == (2 * 8, 1, 8)
    np.testing.assert_array_equal(unpack_ue8m0(col).numpy(), e)
    f = torch.from_numpy(ue8m0_to_float32(e))
    np.testing.assert_array_equal(float_to_ue8m0(f, torch).numpy(), e)


@pytest.fixture
def stream_log(monkeypatch):
    """A Buffer shell whose normal-mode FP8 input preparation runs on CPU tensors, with the
    streams, events and CuPy views replaced by fakes that log what the adapter asks for."""
    torch = pytest.importorskip("torch")
    from contextlib import contextmanager

    log = []

    @contextmanager
    def on(kind, stream):
        log.append((kind, stream))
        yield

    monkeypatch.setattr(ep_torch, "_on_stream", lambda stream: on("cupy stream", stream))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: on("torch stream", stream))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "current")
    monkeypatch.setattr(ep_torch, "_wait_event", lambda stream, overlap: log.append(("wait", stream, overlap)))
    monkeypatch.setattr(Buffer, "capture", staticmethod(lambda: log.append(("capture",)) or "captured"))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: log.append(("record", stream)))
    monkeypatch.setattr(ep_torch, "to_cupy", lambda t: t.numpy())
    monkeypatch.setattr(ep_torch, "to_torch", torch.from_numpy)
    buf = object.__new__(Buffer)
    buf._copy_stream, buf.device = "side", None
    buf.get_comm_stream = lambda: "comm"
    return torch, buf, log


def _fp8_pair(torch, packed):
    rng = np.random.default_rng(5)
    data = torch.zeros((6, 1024), dtype=torch.uint8)
    if packed:
        e = rng.integers(100, 150, size=(6, 8), dtype=np.uint8)
        return data, column_major(pack_ue8m0(torch.from_numpy(e))), ue8m0_to_float32(e)
    s = rng.random((6, 8), dtype=np.float32)
    return data, column_major(torch.from_numpy(s)), s


def test_normal_fp8_input_needs_no_copy_when_row_major(stream_log):
    torch, buf, log = stream_log
    x = torch.zeros((6, 1024), dtype=torch.bfloat16)
    assert buf._normal_x(x, "prev") == (x, False, "prev")
    pair = (torch.zeros((6, 1024), dtype=torch.uint8), torch.ones((6, 8)))
    assert buf._normal_x(pair, "prev") == (pair, False, "prev") and log == []


@pytest.mark.parametrize("packed", [False, True], ids=["column-major", "packed UE8M0"])
def test_normal_fp8_scales_copied_on_the_current_stream(stream_log, packed):
    torch, buf, log = stream_log
    data, scales, expected = _fp8_pair(torch, packed)
    for previous in (None, EventOverlap(None)):
        log.clear()
        (got_data, got_scales), got_packed, event = buf._normal_x((data, scales), previous)
        assert got_data is data and got_packed == packed and event is previous
        assert got_scales.dtype == torch.float32 and got_scales.is_contiguous()
        np.testing.assert_array_equal(got_scales.numpy(), expected)
        assert log == [("cupy stream", "current"), ("torch stream", "current"), ("record", "comm")], log


@pytest.mark.parametrize("packed", [False, True], ids=["column-major", "packed UE8M0"])
def test_normal_fp8_scales_copied_after_previous_event(stream_log, packed):
    """With previous_event the communication stream waits for that event alone: the copy goes on a
    side stream after it, and the call waits for the copy's end instead."""
    torch, buf, log = stream_log
    data, scales, expected = _fp8_pair(torch, packed)
    previous = EventOverlap("event")
    (_, got_scales), _, event = buf._normal_x((data, scales), previous)
    np.testing.assert_array_equal(got_scales.numpy(), expected)
    assert event == "captured"
    assert log == [("cupy stream", "side"), ("torch stream", "side"), ("wait", "side", previous),
                   ("record", "side"), ("record", "comm"), ("capture",)], log


# -- every DeepEP argument reaches cupy_ep's parameter of the same name -------------------------------------
class _Inner:
    """Stands for the cupy_ep.Buffer underneath: binds each call to the real method's signature
    (so a positional argument in the wrong place shows under the wrong name) and records it."""

    num_rdma_ranks = 1
    results = {"get_dispatch_layout": ("per_rank", None, "per_expert", "in_rank", None),
               "dispatch": ("recv_x", None, None, None, None, None),
               "combine": ("combined_x", None, None),
               "low_latency_dispatch": ("recv_x", "recv_count", ("src_info", "layout_range", 1, 2, 3), None, None),
               "low_latency_combine": ("combined_x", None, None),
               "low_latency_update_mask_buffer": None, "low_latency_query_mask_buffer": None}

    def __init__(self):
        self.bound = {}

    def __getattr__(self, name):
        from cupy_ep.buffer import Buffer as CupyEpBuffer

        signature = inspect.signature(getattr(CupyEpBuffer, name))

        def call(*args, **kwargs):
            self.bound[name] = signature.bind(self, *args, **kwargs).arguments
            return self.results[name]

        return call


@pytest.fixture
def mapped(monkeypatch):
    pytest.importorskip("cupy")   # cupy_ep.buffer (the real signatures) imports it
    from contextlib import nullcontext

    monkeypatch.setattr(ep_torch, "to_cupy", lambda a: a)
    monkeypatch.setattr(ep_torch, "to_torch", lambda a, dtype=None: a)
    monkeypatch.setattr(ep_torch, "_torch", lambda: types.SimpleNamespace())
    monkeypatch.setattr(Buffer, "_call", lambda self: nullcontext())
    buf = object.__new__(Buffer)
    buf.cupy_ep_buffer, buf.group_size = _Inner(), 2
    return buf


def _check_mapped(buf, name, call_kwargs, converted=()):
    """Calls ``name`` with ``call_kwargs`` (DeepEP's names; distinct values) and checks that each one
    arrived under the same name in cupy_ep's call (``converted``: name -> the value cupy_ep gets)."""
    getattr(buf, name)(**call_kwargs)
    got = buf.cupy_ep_buffer.bound[name]
    expected = {**call_kwargs, **dict(converted)}
    assert {k: got.get(k, "<not passed>") for k in expected} == expected


def test_layout_and_normal_calls_pass_arguments_by_name(mapped):
    event = EventOverlap("previous event")
    common = dict(previous_event=event, async_finish="async_finish", allocate_on_comm_stream="on comm stream")
    _check_mapped(mapped, "get_dispatch_layout", dict(topk_idx="topk_idx", num_experts=8, **common),
                  {"previous_event": "previous event"})
    handle = DispatchHandle("cupy_ep handle", False, {})
    config = Config(24)
    _check_mapped(mapped, "dispatch", dict(x="x", handle=handle, num_tokens_per_rank="per rank",
                                           num_tokens_per_rdma_rank="per rdma rank", is_token_in_rank="in rank",
                                           num_tokens_per_expert="per expert", topk_idx="topk_idx",
                                           topk_weights="topk_weights", expert_alignment=4,
                                           num_worst_tokens="worst", config=config, **common),
                  {"handle": "cupy_ep handle", "config": config.to_cupy_ep(), "previous_event": "previous event"})
    _check_mapped(mapped, "combine", dict(x="x", handle=handle, topk_weights="topk_weights", bias="bias",
                                          config=config, **common),
                  {"handle": "cupy_ep handle", "config": config.to_cupy_ep(), "previous_event": "previous event"})


def test_low_latency_calls_pass_arguments_by_name(mapped):
    _check_mapped(mapped, "low_latency_dispatch",
                  dict(x="x", topk_idx="topk_idx", num_max_dispatch_tokens_per_rank=64, num_experts=8,
                       cumulative_local_expert_recv_stats="recv stats", dispatch_wait_recv_cost_stats="wait stats",
                       use_fp8=False, round_scale="round_scale", use_ue8m0="use_ue8m0", async_finish="async_finish",
                       return_recv_hook="return_recv_hook"))
    handle = LowLatencyHandle("cupy_ep handle", ("src_info", "layout_range", 64, 7168, 8))
    _check_mapped(mapped, "low_latency_combine",
                  dict(x="x", topk_idx="topk_idx", topk_weights="topk_weights", handle=handle, use_logfmt="use_logfmt",
                       zero_copy="zero_copy", async_finish="async_finish", return_recv_hook="return_recv_hook",
                       out="out", combine_wait_recv_cost_stats="wait stats"),
                  {"handle": "cupy_ep handle"})
    _check_mapped(mapped, "low_latency_update_mask_buffer", dict(rank_to_mask=1, mask="mask"))
    _check_mapped(mapped, "low_latency_query_mask_buffer", dict(mask_status="mask status"))


@pytest.mark.parametrize("num_rdma_ranks", [1, 2], ids=["one domain", "two domains"])
def test_worst_token_dispatch_handle(mapped, num_rdma_ranks):
    """With num_worst_tokens > 0 no rank_prefix_matrix is made (no host collective): inside one
    NVLink domain handle[0] says so; across domains DeepEP's handle has no such entry at all."""
    mapped.cupy_ep_buffer.num_rdma_ranks = num_rdma_ranks
    handle = mapped.dispatch("x", num_tokens_per_rank="per rank", is_token_in_rank="in rank",
                             num_tokens_per_expert="per expert", topk_idx="topk_idx", topk_weights="topk_weights",
                             num_worst_tokens=64)[4]
    assert isinstance(handle, DispatchHandle) and len(handle) == (6 if num_rdma_ranks == 1 else 10)
    if num_rdma_ranks == 1:
        assert handle[4] == "in rank"
        with pytest.raises(NotImplementedError, match="rank_prefix_matrix"):
            handle[0].shape
    else:
        assert handle[0] == "in rank"
