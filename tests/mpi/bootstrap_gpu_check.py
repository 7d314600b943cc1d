"""Run under mpiexec (one rank per GPU) by tests/test_bootstrap.py: CUDA IPC exchange, NVSHMEM
bootstrap, NVSHMEM peer pointers and kernels with NVSHMEM device code, on real GPUs.

Usage: mpiexec -n K python tests/mpi/bootstrap_gpu_check.py [ipc] [nvshmem] [nvshmem-device]
Rank 0 prints one JSON line: for each rank, {check: "ok" or an error text}. Exit status 0
when every check passed on every rank.
"""

import json
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cupy  # noqa: E402
import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from cupy_ep import bootstrap, jit  # noqa: E402
from cupy_ep.errors import CupyEpError  # noqa: E402

PEER_WRITE = r'''
extern "C" __global__ void write_peers(int* const* peers, int num_peers, int value, int offset) {
    int p = blockIdx.x;
    if (p < num_peers && peers[p] != nullptr && threadIdx.x == 0) peers[p][offset] = value;
}
'''

NVSHMEM_PUT = r'''
#include <nvshmem.h>
#include <nvshmemx.h>
// Every PE puts COUNT ints (value = its PE + 1) into the next PE's buffer, then signals.
extern "C" __global__ void ring_put(int* dst, int* src, unsigned long long* sig) {
    const int me = nvshmem_my_pe(), n = nvshmem_n_pes();
    for (int i = threadIdx.x; i < COUNT; i += blockDim.x) src[i] = me + 1;
    __syncthreads();
    if (threadIdx.x < 32)
        nvshmemx_int_put_signal_nbi_warp(dst, src, COUNT, (uint64_t*)sig, 1, NVSHMEM_SIGNAL_ADD,
                                         (me + 1) % n);
    if (threadIdx.x == 0) nvshmem_quiet();
}
'''


def view(ptr, nbytes, dtype, owner, device):
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, owner, device)
    return cupy.ndarray((nbytes // np.dtype(dtype).itemsize,), dtype, cupy.cuda.MemoryPointer(mem, 0))


def check_ipc(comm, topo, device):
    rank, n = comm.Get_rank(), comm.Get_size()
    nbytes = 1 << 20
    base = cupy.cuda.runtime.malloc(nbytes)
    try:
        mine = view(base, nbytes, np.int32, None, device)
        mine.fill(-1)
        cupy.cuda.runtime.deviceSynchronize()
        ptrs = bootstrap.exchange_ipc_handles(topo.nvl_comm, base)
        assert len(ptrs) == topo.num_nvl_ranks and ptrs[topo.nvl_rank] == base
        # Each rank writes its rank into slot [rank] of every peer's buffer through NVLink.
        mod = jit.compile_module(Path(TMP, "peer_write.cu"), comm=comm)
        table = cupy.asarray(np.array(ptrs, np.uint64))
        mod.get_function("write_peers")((len(ptrs),), (32,),
                                        (table, np.int32(len(ptrs)), np.int32(rank + 100),
                                         np.int32(rank)))
        cupy.cuda.runtime.deviceSynchronize()
        comm.Barrier()
        got = cupy.asnumpy(mine[:n])
        first = topo.rdma_rank * topo.num_nvl_ranks
        want = np.full(n, -1, np.int32)
        want[first:first + topo.num_nvl_ranks] = np.arange(first, first + topo.num_nvl_ranks) + 100
        assert np.array_equal(got, want), (got, want)
        comm.Barrier()
        bootstrap.close_ipc_handles(ptrs, topo.nvl_rank)
        # An interior pointer on rank 0 only: every rank must raise, none may hang.
        try:
            bootstrap.exchange_ipc_handles(topo.nvl_comm, base + (256 if rank == 0 else 0))
            raise AssertionError("interior pointer accepted")
        except CupyEpError as e:
            assert "base address" in str(e), e
    finally:
        cupy.cuda.runtime.free(base)


def check_nvshmem(comm, topo, device):
    import nvshmem.core

    bootstrap.init_nvshmem(comm, device)
    bootstrap.init_nvshmem(comm, device)  # reference counted
    try:
        arr = nvshmem.core.interop.cupy.array((1024,), dtype="int32")
        arr.fill(0)
        cupy.cuda.runtime.deviceSynchronize()
        peers = bootstrap.nvshmem_peer_ptrs(int(arr.data.ptr), comm.Get_size())
        assert peers[comm.Get_rank()] == int(arr.data.ptr), peers
        assert all(peers), f"some PE not reachable by P2P: {peers}"
        mod = jit.compile_module(Path(TMP, "peer_write.cu"), comm=comm)
        mod.get_function("write_peers")((len(peers),), (32,),
                                        (cupy.asarray(np.array(peers, np.uint64)),
                                         np.int32(len(peers)), np.int32(comm.Get_rank() + 7),
                                         np.int32(comm.Get_rank())))
        cupy.cuda.runtime.deviceSynchronize()
        comm.Barrier()
        got = cupy.asnumpy(arr[:comm.Get_size()])
        assert np.array_equal(got, np.arange(comm.Get_size()) + 7), got
        comm.Barrier()
        nvshmem.core.free_array(arr)
    finally:
        bootstrap.release_nvshmem()
        bootstrap.release_nvshmem()
    idle = bootstrap._nvshmem["refs"] == 0 and bootstrap._nvshmem["world"] is not None
    bootstrap.finalize_nvshmem()
    assert idle and bootstrap._nvshmem["world"] is None, "NVSHMEM not kept idle after its last release"


def check_nvshmem_device(comm, topo, device, backend):
    import nvshmem.core

    count = 4096
    bootstrap.init_nvshmem(comm, device)
    try:
        mod = jit.compile_module_nvshmem(Path(TMP, "ring_put.cu"), {"COUNT": count}, comm=comm,
                                         backend=backend)
        bootstrap.nvshmem_bind_module(mod)
        dst = nvshmem.core.interop.cupy.array((count,), dtype="int32")
        src = nvshmem.core.interop.cupy.array((count,), dtype="int32")
        sig = nvshmem.core.interop.cupy.array((1,), dtype="uint64")
        dst.fill(0)
        sig.fill(0)
        cupy.cuda.runtime.deviceSynchronize()
        comm.Barrier()
        mod.get_function("ring_put")((1,), (128,), (dst, src, sig))
        cupy.cuda.runtime.deviceSynchronize()
        comm.Barrier()
        prev = (comm.Get_rank() - 1) % comm.Get_size()
        assert int(sig.get()[0]) == 1, sig.get()
        assert np.array_equal(cupy.asnumpy(dst), np.full(count, prev + 1, np.int32))
        comm.Barrier()
        for a in (dst, src, sig):
            nvshmem.core.free_array(a)
    finally:
        bootstrap.release_nvshmem()
        bootstrap.finalize_nvshmem()


TMP = tempfile.mkdtemp(prefix="cupy_ep_gpu_check_")


def main():
    comm = MPI.COMM_WORLD
    Path(TMP, "peer_write.cu").write_text(PEER_WRITE)
    Path(TMP, "ring_put.cu").write_text(NVSHMEM_PUT)
    out = {}
    assert bootstrap.gpu_available(comm)
    topo = bootstrap.discover(comm)
    device = bootstrap.select_device(topo)
    out["device"] = device
    wanted = sys.argv[1:] or ["ipc", "nvshmem", "nvshmem-device"]
    checks = []
    if "ipc" in wanted:
        checks.append(("ipc", lambda: check_ipc(comm, topo, device)))
    if "nvshmem" in wanted:
        checks.append(("nvshmem", lambda: check_nvshmem(comm, topo, device)))
    if "nvshmem-device" in wanted:
        backends = ["nvrtc"] if jit.nvshmem_version() >= (3, 8, 0) else []
        try:
            jit._find_nvcc(), jit._nvshmem_device_lib()
            backends.append("nvcc")
        except FileNotFoundError:
            pass
        out["nvshmem_headers"] = ".".join(map(str, jit.nvshmem_version()))
        for b in backends:
            checks.append((f"nvshmem-device-{b}", lambda b=b: check_nvshmem_device(comm, topo, device, b)))
    for name, fn in checks:
        try:
            fn()
            out[name] = "ok"
        except Exception:  # reported
            out[name] = traceback.format_exc(limit=6)
        # Stop when a check failed anywhere: the next one could hang on a half-done state.
        if not all(comm.allgather(out[name] == "ok")):
            break
    topo.free()
    results = comm.gather(out, root=0)
    if comm.Get_rank() == 0:
        print(json.dumps(results), flush=True)
    ok = all(v == "ok" for r in (results or []) for k, v in r.items()
             if k not in ("device", "nvshmem_headers"))
    sys.exit(0 if comm.bcast(ok, root=0) else 1)


if __name__ == "__main__":
    main()
