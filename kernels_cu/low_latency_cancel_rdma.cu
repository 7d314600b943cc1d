// The cancelled parts of the low-latency calls (low_latency_cancel.cu) built with LL_RDMA=1, for
// an engine whose kernels are those of low_latency_rdma.cu: peers without a mapping get their
// signals as NVSHMEM puts (xport::signal_put), delivered before the kernel waits. Built and bound
// as low_latency_rdma.cu is (jit.compile_module_nvshmem, then nvshmem cumodule_init).
//
// @needs nvshmem
#include "transport.cuh"

#define LL_RDMA 1
#include "low_latency_cancel.cu"
