"""Buffers created and destroyed many times: every one works, and no device memory is lost.

This module sorts after the other GPU modules on purpose: its low-latency Buffers are then the
only NVSHMEM users, so NVSHMEM stays initialised, idle, between them and each cycle reuses it
(what a user who recreates Buffers gets).
"""
from cupy_ep.testing import gpu_bytes_in_use, low_latency_round_trip, normal_round_trip
from gpu_buffers import buffer_sizes, make_buffers, num_experts_for

CYCLES = 8


def check_no_leak(comm, agree, cycle, slack=32 << 20):
    cycle()   # the first one compiles and loads the kernels and grows the memory pool
    before = gpu_bytes_in_use(comm)
    for _ in range(CYCLES):
        cycle()
    lost = gpu_bytes_in_use(comm) - before
    agree(lost <= slack, f"{lost >> 20} MiB of device memory lost over {CYCLES} create/destroy cycles")


def test_normal_mode_buffers(comm, agree, rng, nvl_peers):
    def cycle():
        gpu, ref = make_buffers(comm, nvl_peers, **buffer_sizes(comm.Get_size(), nvl_peers, 32, 256, 4))
        try:
            normal_round_trip(comm, ref, gpu, rng, num_tokens=16, hidden=256, num_topk=4,
                              num_experts=num_experts_for(comm), poison=False)
        finally:
            gpu.destroy()
            ref.destroy()

    check_no_leak(comm, agree, cycle)


def test_low_latency_buffers(comm, agree, rng):
    import cupy_ep
    from cupy_ep import reference

    r = comm.Get_size()
    m, h, k, e = 32, 256, 2, 4 * r

    def cycle():
        nbytes = cupy_ep.Buffer.get_low_latency_rdma_size_hint(m, h, r, e)
        with cupy_ep.Buffer(comm, num_rdma_bytes=nbytes, low_latency_mode=True) as gpu, \
                reference.Buffer(comm, num_rdma_bytes=nbytes, low_latency_mode=True) as ref:
            low_latency_round_trip(comm, ref, gpu, rng, num_tokens=int(rng.integers(1, m + 1)), hidden=h,
                                   num_topk=k, num_experts=e, m=m, use_fp8=False)

    check_no_leak(comm, agree, cycle)
