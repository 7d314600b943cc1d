// Device helpers shared by every cupy_ep kernel file (and users' own kernels):
//   ptx.cuh      types, PTX memory ordering, 16-byte loads/stores, timers
//   numeric.cuh  bf16 / FP8 conversions, warp reductions
//   status.cuh   the status record, bounded waits, chaos pauses, profiling marks
//   barrier.cuh  barrier among the ranks of an NVLink domain, last-block-out of a grid
//
// No CUDA headers are included on purpose: the kernels compile with NVRTC alone (no toolkit
// include directory needed), on a machine with or without a GPU. The library's constants
// (status codes, kernel ids, FP8 constants: cupy_ep/limits.py) arrive as JIT constants.
#pragma once
#include "ptx.cuh"
#include "numeric.cuh"
#include "status.cuh"
#include "barrier.cuh"
