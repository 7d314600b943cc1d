// Low-latency dispatch/combine with the RDMA transport: the kernels of low_latency.cu built
// with LL_RDMA=1. Peers whose entry in the peer table is 0 (no NVLink/P2P mapping) are reached
// through NVSHMEM: the data is staged in this rank's own symmetric buffer (staging areas of
// the geometry described in low_latency.cu) and put to the same offsets of the peer's buffer
// with nvshmemx_putmem_nbi_warp; signals are 8-byte puts after nvshmem_fence (xport::signal_put
// in transport.cuh: no remote atomics, so any NVSHMEM transport carries them; the signal word is
// a u64 whose low 32 bits the waits read). A block's puts are complete (nvshmem_quiet) before it
// signals or counts itself done, so a signal follows its data. The dispatch signal, which
// direct stores build by one add per block, is one put by the send phase's last block of the
// total (SIGNAL_AMO=1: one remote add per block, as before). Peers with a mapping still get
// direct stores.
//
// Build: NVRTC with NVSHMEM >= 3.8 headers and -D__NVSHMEM_NUMBA_SUPPORT__ (everything inlined,
// what CI compiles), or nvcc -rdc + device link with libnvshmem_device (jit.compile_module_nvshmem);
// either way the module must be bound with nvshmem cumodule_init before its first launch.
// It cannot be exercised on a host without a NIC except by forcing transport="rdma", which
// makes NVSHMEM carry the puts over P2P.
//
// @needs nvshmem
// @constants NUM_RANKS=4 NUM_EXPERTS=288 HIDDEN=7168 TOPK=8 MAX_TOKENS=128 USE_FP8=1 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=2 NUM_EXPERTS=16 HIDDEN=2048 TOPK=1 MAX_TOKENS=512 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=8 NUM_EXPERTS=256 HIDDEN=7168 TOPK=9 MAX_TOKENS=256 USE_FP8=1 ROUND_SCALE=1 USE_UE8M0=1
// @constants NUM_RANKS=64 NUM_EXPERTS=256 HIDDEN=7168 TOPK=8 MAX_TOKENS=128 USE_FP8=1 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=256 NUM_EXPERTS=1024 HIDDEN=7168 TOPK=8 MAX_TOKENS=128 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=1024 NUM_EXPERTS=2048 HIDDEN=7168 TOPK=8 MAX_TOKENS=128 USE_FP8=1 ROUND_SCALE=1 USE_UE8M0=1
// @constants NUM_RANKS=1024 NUM_EXPERTS=8192 HIDDEN=7168 TOPK=32 MAX_TOKENS=128 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0
// @constants NUM_RANKS=4 NUM_EXPERTS=288 HIDDEN=1152 TOPK=8 MAX_TOKENS=128 USE_FP8=0 ROUND_SCALE=0 USE_UE8M0=0 USE_LOGFMT=1
// @constants NUM_RANKS=8 NUM_EXPERTS=256 HIDDEN=7168 TOPK=9 MAX_TOKENS=256 USE_FP8=1 ROUND_SCALE=1 USE_UE8M0=1 SHRINK=1
#include "transport.cuh"

#define LL_RDMA 1
#include "low_latency.cu"
