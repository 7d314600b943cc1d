"""The phases a profiled call records (``Buffer.profile()``, ``prof.call_phases_us()``): each
kind of normal-mode call has its boundaries in call order, with finite, non-negative times, and
the results stay right while profiling (checked against the reference)."""
import math

from cupy_ep.testing import cached_round_trip, normal_round_trip
from gpu_buffers import num_experts_for

LAYOUT = ["checked", "outputs allocated", "layout launched", "finished"]
DISPATCH = ["checked", "handle allocated", "notify launched", "dispatch launched", "host wait", "outputs allocated",
            "outputs published", "finished"]
WORST = ["checked", "handle allocated", "notify launched", "outputs allocated", "dispatch launched", "finished"]
# intranode, the barrier runs inside the kernel; across NVLink domains it is a kernel of its own
CACHED = ["checked", "outputs allocated", "dispatch launched", "finished"]
COMBINE = ["checked", "outputs allocated", "combine launched", "finished"]


def _with_barrier_kernel(phases: list, comm, nvl_peers) -> list:
    """The phases of a cached dispatch or a combine: across NVLink domains (``nvl_peers`` smaller
    than the job) the barrier kernel is launched first."""
    if nvl_peers is None or nvl_peers == comm.Get_size():
        return phases
    return phases[:1] + ["barrier launched"] + phases[1:]


def _phases(agree, prof, expected: dict):
    phases = prof.call_phases_us()
    agree({name: list(phases.get(name, {})) for name in expected} == expected,
          f"phases {({name: list(p) for name, p in phases.items()})}, expected {expected}")
    agree(all(math.isfinite(v) and v >= 0 for p in phases.values() for g_h in p.values() for v in g_h),
          f"a phase time is negative or not finite: {phases}")


def test_every_call_kind_records_its_phases(comm, rng, agree, normal_buffers, nvl_peers):
    gpu, ref = normal_buffers
    args = dict(num_tokens=int(rng.integers(50, 300)), hidden=1024, num_topk=4, num_experts=num_experts_for(comm))
    with gpu.profile() as prof:
        trip = normal_round_trip(comm, ref, gpu, rng, **args)
    _phases(agree, prof, {"get_dispatch_layout": LAYOUT, "dispatch": DISPATCH,
                          "combine": _with_barrier_kernel(COMBINE, comm, nvl_peers)})
    with gpu.profile() as prof:
        cached_round_trip(comm, ref, gpu, rng, trip)
    _phases(agree, prof, {"dispatch": _with_barrier_kernel(CACHED, comm, nvl_peers)})
    worst = comm.allreduce(args["num_tokens"]) + 3
    with gpu.profile() as prof:
        normal_round_trip(comm, ref, gpu, rng, **args, num_worst_tokens=worst)
    _phases(agree, prof, {"dispatch": WORST})
