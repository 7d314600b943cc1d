"""Misuse and faults on the GPU Buffer: clear errors, raised before anything is sent where the host
can tell (else at the first point the library can know), on every rank, and a Buffer that keeps
working afterwards (every case ends with a round trip checked against the reference)."""
import numpy as np

from cupy_ep.testing import make_routing, make_x, normal_round_trip, to_device
from gpu_buffers import buffer_sizes, make_buffers, num_experts_for


def outcome_of(call, expected, *needles):
    """None when ``call()`` raises ``expected`` with every needle in its message, else what happened."""
    try:
        call()
    except expected as exc:
        missing = [n for n in needles if n not in str(exc)]
        return f"{type(exc).__name__} without {missing}: {exc}" if missing else None
    except Exception as exc:  # noqa: BLE001 - report the wrong type
        return f"{type(exc).__name__}: {exc}"
    return "no exception"


def still_works(comm, rng, gpu, ref):
    normal_round_trip(comm, ref, gpu, rng, num_tokens=int(rng.integers(1, 64)), hidden=256, num_topk=4,
                      num_experts=num_experts_for(comm))


def layout_args(gpu, idx, num_experts):
    layout = gpu.get_dispatch_layout(idx, num_experts)
    return dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                num_tokens_per_expert=layout[2])


def test_numpy_and_wrong_gpu_arrays(comm, rng, agree, normal_buffers):
    """Host arrays (a NumPy slip) and arrays on another GPU: TypeError naming the argument, before
    any kernel."""
    import cupy

    gpu, ref = normal_buffers
    num_experts = num_experts_for(comm)
    idx = make_routing(rng, 16, num_experts, 4, "random", comm.Get_size())
    x = make_x(rng, 16, 256)
    args = layout_args(gpu, to_device(idx), num_experts)
    outcomes = [
        outcome_of(lambda: gpu.get_dispatch_layout(idx, num_experts), TypeError, "topk_idx", "CuPy"),
        outcome_of(lambda: gpu.dispatch(x, **args), TypeError, "x", "CuPy"),
        outcome_of(lambda: gpu.dispatch(to_device(x), **dict(args, is_token_in_rank=cupy.asnumpy(
            args["is_token_in_rank"]))), TypeError, "is_token_in_rank"),
    ]
    if cupy.cuda.runtime.getDeviceCount() > 1:
        with cupy.cuda.Device((gpu.device_id + 1) % cupy.cuda.runtime.getDeviceCount()):
            elsewhere = cupy.asarray(idx)
        outcomes.append(outcome_of(lambda: gpu.get_dispatch_layout(elsewhere, num_experts), TypeError, "topk_idx",
                                   "device"))
    bad = [o for o in outcomes if o is not None]
    agree(not bad, bad)
    still_works(comm, rng, gpu, ref)


def test_expert_ids_out_of_range(comm, rng, agree, normal_buffers):
    """Bad ids on one rank: dispatch with topk_idx raises ValueError on every rank (the call is
    cancelled everywhere, nothing is sent); through the layout, the next dispatch does."""
    gpu, ref = normal_buffers
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    num_experts = num_experts_for(comm)
    idx = make_routing(rng, 32, num_experts, 4, "random", num_ranks)
    x = to_device(make_x(rng, 32, 256))
    good = layout_args(gpu, to_device(idx), num_experts)
    bad_idx = idx.copy()
    if rank == 0:
        bad_idx[3, 1] = num_experts + 5
    w = to_device(np.ones(idx.shape, np.float32))
    expect = ("topk_idx",) if rank == 0 else ("rank 0",)
    o1 = outcome_of(lambda: gpu.dispatch(x, **good, topk_idx=to_device(bad_idx), topk_weights=w), ValueError, *expect)
    agree(o1 is None, o1)
    args = layout_args(gpu, to_device(bad_idx), num_experts)   # reported on rank 0's status record
    o2 = outcome_of(lambda: gpu.dispatch(x, **args), ValueError, *expect)
    agree(o2 is None, o2)
    still_works(comm, rng, gpu, ref)


def test_inconsistent_layout(comm, rng, agree, normal_buffers):
    gpu, ref = normal_buffers
    num_experts = num_experts_for(comm)
    idx = to_device(make_routing(rng, 32, num_experts, 4, "random", comm.Get_size()))
    x = to_device(make_x(rng, 32, 256))
    args = layout_args(gpu, idx, num_experts)
    if comm.Get_rank() == comm.Get_size() - 1:
        args["num_tokens_per_rank"] = args["num_tokens_per_rank"] + 1
    o = outcome_of(lambda: gpu.dispatch(x, **args), ValueError)
    agree(o is None, o)
    still_works(comm, rng, gpu, ref)


def test_worst_tokens_overflow(comm, rng, agree, normal_buffers):
    """num_worst_tokens below the rows one rank receives: no row past the limit is written, the
    error names the call, rows and limit; check() raises it at once, on every rank, else the next
    non-cached dispatch does; the Buffer keeps working."""
    import cupy

    import cupy_ep

    gpu, ref = normal_buffers
    num_experts = num_experts_for(comm)
    idx = to_device(make_routing(rng, 64, num_experts, 4, "random", comm.Get_size()))
    x = to_device(make_x(rng, 64, 256))
    args = layout_args(gpu, idx, num_experts)
    received = comm.allgather(int(cupy.asnumpy(args["num_tokens_per_rank"]).sum()))
    worst = 5
    recv_x, _, _, _, handle, _ = gpu.dispatch(x, **args, num_worst_tokens=worst)
    cupy.cuda.Device().synchronize()
    outcomes = [recv_x.shape[0] == worst or f"recv_x has {recv_x.shape[0]} rows",
                outcome_of(gpu.check, cupy_ep.TokenOverflowError, "arrived", str(worst)),
                outcome_of(gpu.check, Exception) == "no exception" or "the report was raised twice"]
    bad = [o for o in outcomes if o is not True and o is not None]
    agree(not bad, f"{bad} (rows sent per rank: {received})")
    # a report not taken: calls without a host wait run on (a rank raising before its peers have
    # the report in view would leave them waiting); the next non-cached dispatch raises it everywhere
    gpu.dispatch(x, **args, num_worst_tokens=worst)
    o = outcome_of(lambda: gpu.combine(to_device(make_x(rng, worst, 256)), handle), Exception)
    agree(o == "no exception", o)
    o = outcome_of(lambda: gpu.dispatch(x, **args), cupy_ep.TokenOverflowError, "arrived", str(worst))
    agree(o is None, o)
    still_works(comm, rng, gpu, ref)


def test_destroyed_buffer(comm, rng, agree, nvl_peers):
    import cupy_ep

    gpu, ref = make_buffers(comm, nvl_peers, **buffer_sizes(comm.Get_size(), nvl_peers, 16, 256, 4))
    idx = to_device(make_routing(rng, 8, num_experts_for(comm), 4, "random", comm.Get_size()))
    gpu.destroy()
    ref.destroy()
    calls = [lambda: gpu.get_dispatch_layout(idx, num_experts_for(comm)), lambda: gpu.dispatch(idx),
             lambda: gpu.combine(idx, None), gpu.check,
             lambda: gpu.low_latency_dispatch(idx, idx, 8, 8), lambda: gpu.get_next_low_latency_combine_buffer(None)]
    bad = [o for o in (outcome_of(c, cupy_ep.CupyEpError, "destroyed") for c in calls) if o is not None]
    agree(not bad, bad)
