"""Buffers created and destroyed many times: every one works, and no device memory is lost.

This module sorts after the other GPU modules on purpose: its low-latency test finalises
NVSHMEM and initialises it again, which needs no other low-latency Buffer to be alive.
"""
import ml_dtypes
import numpy as np
from test_intranode import run_case

BF16 = ml_dtypes.bfloat16
CYCLES = 8


def free_device_bytes():
    import cupy

    cupy.cuda.runtime.deviceSynchronize()
    cupy.get_default_memory_pool().free_all_blocks()
    return cupy.cuda.runtime.memGetInfo()[0]


def check_no_leak(comm, agree, cycle, slack=32 << 20):
    cycle()   # the first one compiles and loads the kernels and grows the memory pool
    before = free_device_bytes()
    for _ in range(CYCLES):
        cycle()
    lost = before - free_device_bytes()
    agree(lost <= slack, f"{lost >> 20} MiB of device memory lost over {CYCLES} create/destroy cycles")


def test_normal_mode_buffers(comm, agree, rng):
    import cupy_ep

    def cycle():
        with cupy_ep.Buffer(comm, num_nvl_bytes=64 << 20) as buf:
            run_case(comm, agree, rng, buf, hidden=256, num_topk=4, use_fp8=False, kind="random", num_tokens=16)

    check_no_leak(comm, agree, cycle)


def test_low_latency_buffers(comm, agree, rng):
    """Identity experts: combine must return sum_k w_k * x (bf16 partials, float32 sums)."""
    import cupy

    import cupy_ep

    R = comm.Get_size()
    M, H, K, E = 32, 256, 2, 4 * R

    def cycle():
        n = int(rng.integers(1, M + 1))
        x = rng.standard_normal((n, H)).astype(np.float32).astype(BF16)
        idx = np.argsort(rng.random((n, E)), axis=1)[:, :K].astype(np.int64)
        w = rng.random((n, K)).astype(np.float32)
        nbytes = cupy_ep.Buffer.get_low_latency_rdma_size_hint(M, H, R, E)
        with cupy_ep.Buffer(comm, num_rdma_bytes=nbytes, low_latency_mode=True) as buf:
            recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(cupy.asarray(x), cupy.asarray(idx), M, E,
                                                                        use_fp8=False)
            out, _, _ = buf.low_latency_combine(recv_x, cupy.asarray(idx), cupy.asarray(w), handle)
            got = cupy.asnumpy(out).astype(np.float64)
            received = int(cupy.asnumpy(recv_count).sum())
        expected_rows = sum(int(((i // (E // R)) == comm.Get_rank()).sum()) for i in comm.allgather(idx))
        want = w.sum(axis=1, dtype=np.float64)[:, None] * x.astype(np.float64)
        bound = np.abs(want) * 2.0 ** -7 + 1e-6
        agree(received == expected_rows, f"received {received} rows, expected {expected_rows}")
        agree(bool((np.abs(got - want) <= bound).all()), "combine of identity experts is wrong")

    check_no_leak(comm, agree, cycle)
