"""The normal-mode Buffer's host side at 1 rank without a GPU (scripts/null_device.py): every
launch of get_dispatch_layout, dispatch (bf16, FP8, cached, worst-token) and combine matches its
kernel's parameter list in kernels_cu (count and kinds, checked by the null device), and passes
the arrays of the call, the handle of the dispatch that made it and the engine's records where
the kernels expect them."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

pytest.importorskip("cupy")
pytest.importorskip("mpi4py")

N, H, K, E = 256, 1024, 4, 16


@pytest.fixture
def null_buffer():
    from mpi4py import MPI

    from null_device import NullDevice
    from cupy_ep import testing

    routing = testing.make_routing(np.random.default_rng(3), N, E, K, "random")
    rows = int((routing >= 0).any(axis=1).sum())
    per_expert = np.bincount(routing[routing >= 0], minlength=E).tolist()
    with NullDevice(rows_received=rows, per_expert=per_expert) as device:
        import cupy
        import cupy_ep

        buf = cupy_ep.Buffer(MPI.COMM_SELF, num_nvl_bytes=cupy_ep.Buffer.get_nvl_buffer_size_hint(N, H, 1, K))
        try:
            yield buf, device, cupy.asarray(routing), rows, per_expert
        finally:
            buf.destroy()


def _one(device, kernel):
    launches = [la for la in device.launches if la.kernel == kernel]
    assert len(launches) == 1, [la.kernel for la in device.launches]
    device.launches.clear()
    return launches[0]


def _ptr(a):
    return 0 if a is None else a.data.ptr


def test_signatures_are_read_from_kernels_cu():
    from null_device import kernel_signatures

    sig = dict(kernel_signatures("intranode.cu")["intranode_combine"])
    assert list(sig)[:3] == ["peers", "rank", "num_tokens"] and len(sig) == 16
    assert (sig["peers"], sig["rank"], sig["timeout_ns"]) == ("ptr", "int", "u64")
    assert set(kernel_signatures("layout.cu")) == {"dispatch_layout"}


def test_a_launch_that_disagrees_with_its_kernel_is_refused():
    from null_device import NullDevice

    with NullDevice() as device:
        from cupy_ep import jit

        kernel = jit.compile_module("intranode.cu", {}).get_function("group_barrier_kernel").kernel
        args = [np.uint64(1), np.int32(0), np.uint64(2), np.uint64(3), np.int32(4)]
        kernel((1,), (32,), args)
        assert device.launches[-1]["kernel_id"] == 4
        with pytest.raises(TypeError, match="4 arguments for 5 parameters"):
            kernel((1,), (32,), args[:4])
        with pytest.raises(TypeError, match="parameter rank .int. given int64"):
            kernel((1,), (32,), [args[0], np.int64(0), *args[2:]])


def test_every_launch_of_a_round_trip_passes_the_call_arrays(null_buffer):
    import cupy

    from cupy_ep import testing

    buf, device, idx, rows, per_expert = null_buffer
    eng = buf._normal
    x = cupy.empty((N, H), dtype=testing.BF16)
    w = cupy.empty((N, K), cupy.float32)

    per_rank, per_rdma, per_expert_out, in_rank, _ = buf.get_dispatch_layout(idx, E)
    layout = _one(device, "dispatch_layout")
    assert per_rdma is None
    assert (layout["topk_idx"], layout["num_tokens"], layout["per_rank"], layout["per_expert"],
            layout["is_token_in_rank"], layout["rank"]) == (_ptr(idx), N, _ptr(per_rank), _ptr(per_expert_out),
                                                             _ptr(in_rank), 0)

    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert_out,
        topk_idx=idx, topk_weights=w)
    notify, dispatch = device.launches
    device.launches.clear()
    assert (notify.kernel, dispatch.kernel) == ("notify_dispatch", "intranode_dispatch")
    assert recv_x.shape == (rows, H) and recv_idx.shape == (rows, K) and counts == per_expert
    assert (notify["num_tokens"], notify["num_tokens_per_rank"], notify["num_tokens_per_expert"],
            notify["is_token_in_rank"], notify["topk_idx"], notify["host_out"], notify["err"]) == \
        (N, _ptr(per_rank), _ptr(per_expert_out), _ptr(in_rank), _ptr(idx), int(eng.host_out_arg), buf._status.ptr)
    routing_state = {p: notify[p] for p in ("rank_prefix", "recv_chan_prefix", "send_chan_prefix", "call_status")}
    assert (dispatch["x"], dispatch["topk_idx"], dispatch["topk_weights"], dispatch["is_token_in_rank"]) == \
        (_ptr(x), _ptr(idx), _ptr(w), _ptr(in_rank))
    assert all(dispatch[p] == v for p, v in routing_state.items())
    assert (dispatch["recv_x"], dispatch["out_desc"], dispatch["desc_seq"]) == (0, int(eng.desc_arg),
                                                                               notify["ready_value"])
    assert eng.desc[:6].tolist() == [notify["ready_value"], _ptr(recv_x), 0, _ptr(recv_idx), _ptr(recv_w), rows]
    send_pos = dispatch["send_pos"]

    worst = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                         num_tokens_per_expert=per_expert_out, topk_idx=idx, topk_weights=w, num_worst_tokens=N)
    notify_w, dispatch_w = device.launches
    device.launches.clear()
    assert notify_w["num_worst_tokens"] == N and worst[0].shape == (N, H) and worst[3] == []
    assert (dispatch_w["recv_x"], dispatch_w["recv_topk_idx"], dispatch_w["recv_topk_weights"],
            dispatch_w["num_out_rows"], dispatch_w["fill_padding"], dispatch_w["out_desc"]) == \
        (_ptr(worst[0]), _ptr(worst[1]), _ptr(worst[2]), N, 1, 0)

    x_fp8 = cupy.empty((N, H), cupy.uint8), cupy.empty((N, H // 128), cupy.float32)
    fp8 = buf.dispatch(x_fp8, handle=handle)
    cached = _one(device, "intranode_dispatch")
    assert (cached["x"], cached["x_scales"], cached["topk_idx"], cached["recv_x"], cached["recv_scales"],
            cached["num_out_rows"], cached["fill_padding"], cached["out_desc"], cached["send_pos"]) == \
        (_ptr(x_fp8[0]), _ptr(x_fp8[1]), 0, _ptr(fp8[0][0]), _ptr(fp8[0][1]), rows, 0, 0, send_pos)
    assert all(cached[p] == v for p, v in routing_state.items())

    y = cupy.empty((rows, H), x.dtype)
    bias = cupy.empty((N, H), x.dtype)
    combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=bias)
    comb = _one(device, "intranode_combine")
    assert (comb["x"], comb["num_x_rows"], comb["topk_weights"], comb["bias0"], comb["bias1"], comb["combined_x"],
            comb["combined_w"], comb["send_pos"], comb["num_tokens"]) == \
        (_ptr(y), rows, _ptr(recv_w), _ptr(bias), 0, _ptr(combined), _ptr(combined_w), send_pos, N)
    assert all(comb[p] == routing_state[p] for p in ("rank_prefix", "recv_chan_prefix", "send_chan_prefix"))
    assert combined.shape == (N, H) and combined_w.shape == (N, K)


def test_profile_call_times_the_host_code_on_the_null_device():
    import subprocess

    from test_reference import REPO, _env

    proc = subprocess.run([sys.executable, "scripts/profile_call.py", "--null-device", "--calls", "3", "--warmup", "1",
                           "--tokens", "256", "--hidden", "1024"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("layout", "dispatch", "combine"))]
    assert [r[0] for r in rows] == ["layout", "dispatch", "dispatch", "dispatch", "dispatch", "combine"]
    assert all(float(r[-1]) > 0 for r in rows)


def test_a_profiled_notify_gets_its_marks_buffer_and_an_unprofiled_one_none(null_buffer):
    import cupy

    from cupy_ep import testing

    buf, device, idx, rows, _ = null_buffer
    x = cupy.empty((N, H), dtype=testing.BF16)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    routing = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                   topk_idx=idx, topk_weights=cupy.empty((N, K), cupy.float32))
    device.launches.clear()
    buf.dispatch(x, **routing)
    with buf.profile():
        buf.dispatch(x, **routing)
    plain, profiled = (la["prof"] for la in device.launches if la.kernel == "notify_dispatch")
    assert plain == 0 and profiled != 0
