// Low-latency dispatch/combine with the RDMA transport: the kernels of low_latency.cu built
// with LL_RDMA=1. Peers whose entry in the peer table is 0 (no NVLink/P2P mapping) are reached
// through NVSHMEM: the data is staged in this rank's own symmetric buffer (staging areas of
// the layout described in low_latency.cu) and put to the same offsets of the peer's buffer
// with nvshmemx_putmem_nbi_warp; the combine weights go with nvshmem_putmem_signal_nbi and the
// other signals with nvshmemx_signal_op (the signal word is a u64 whose low 32 bits the waits
// read); a block signals only after nvshmem_quiet(), so its signal follows its data. Peers with
// a mapping still get direct stores.
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
#if defined(__CUDACC_RTC__) && !defined(__NVSHMEM_NUMBA_SUPPORT__)
#define __NVSHMEM_NUMBA_SUPPORT__ 1
#endif
#include <nvshmem.h>
#include <nvshmemx.h>

#define LL_RDMA 1
#include "low_latency.cu"
