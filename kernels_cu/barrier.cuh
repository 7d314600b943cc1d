// Barriers: among the ranks of an NVLink domain (one block per rank), and "last block out"
// among the blocks of one grid.
#pragma once
#include "status.cuh"

// ---------------------------------------------------------------------------------------------
// Barrier among the ranks of a group (NVLink domain), one call by one block per rank.
// Each rank keeps `arrivals[num_ranks]` in its own buffer: arrivals[p] counts the barriers peer
// p has entered. Counts only grow, so no reset is needed and the barrier is safe inside CUDA
// graphs. `epoch` is this rank's own count, in device memory; every rank runs the same sequence
// of barriers, so all ranks agree on it, and kernels tag the words they signal with it.
// Returns the new epoch (> 0), or 0 on timeout (error recorded). Threads 0..num_ranks-1 of the
// block take part; all threads must call it.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ int group_barrier(int* const* peer_arrivals, int* my_arrivals, int* epoch, int rank,
                                             int num_ranks, const WaitCtx& w) {
    __shared__ int s_target;
    __shared__ int s_ok;
    if (threadIdx.x == 0) {
        s_target = *epoch + 1;
        *epoch = s_target;
        s_ok = 1;
    }
    __syncthreads();
    const int target = s_target;
    if (threadIdx.x < num_ranks) {
        fence_sys();
        chaos_pause();
        red_add_release_sys(peer_arrivals[threadIdx.x] + rank, 1);
        if (!wait_geq_sys(my_arrivals + threadIdx.x, target, w, threadIdx.x)) s_ok = 0;
    }
    __syncthreads();
    return s_ok ? target : 0;
}

// ---------------------------------------------------------------------------------------------
// Cancel marks of a domain barrier: int[2][MAX_NVL_PEERS] at `marks` in every rank's buffer,
// [e & 1][p] = e when peer p cancelled its part of the call of epoch e (its arguments refused on
// the host). A rank writes its marks into its peers' buffers before it arrives at the barrier of
// epoch e, each from the thread that arrives at that peer (group_barrier's fence orders them), and
// the peers read theirs after the barrier. Two words by parity: a peer cannot overwrite epoch e's
// before this rank has read it, since the peer's next-but-one barrier needs this rank's next arrival.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ volatile int* cancel_mark(char* marks, int epoch, int src) {
    return reinterpret_cast<volatile int*>(marks) + (epoch & 1) * MAX_NVL_PEERS + src;
}

// ---------------------------------------------------------------------------------------------
// After the block has written data into its domain peers' buffers: tells each of the
// num_peers peers (threads 0..num_peers-1, one each) that this rank's writes of this epoch are
// complete, by setting flag my_slot of the int[MAX_NVL_PEERS] at flags_off in that peer's buffer,
// and waits for every peer's flag in this rank's own buffer. peer_ranks_from: the global rank of
// peer 0, for the timeout report. Returns the same value in every thread (false: a wait timed
// out, error recorded); all threads must call it.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ bool signal_peers_and_wait(char* const* peers, char* me, int flags_off, int my_slot,
                                                      int num_peers, int epoch, const WaitCtx& w,
                                                      int peer_ranks_from) {
    __syncthreads();   // every thread's writes for the peers come before the signal
    bool ok = true;
    if (threadIdx.x < num_peers) {
        fence_sys();
        chaos_pause();
        st_release_sys(reinterpret_cast<int*>(peers[threadIdx.x] + flags_off) + my_slot, epoch);
        ok = wait_geq_sys(reinterpret_cast<int*>(me + flags_off) + threadIdx.x, epoch, w,
                          peer_ranks_from + threadIdx.x);
    }
    return !__syncthreads_or(!ok);
}

// ---------------------------------------------------------------------------------------------
// "Last block out" of a grid. Every thread's prior memory operations are ordered before the
// counter increment (bar.sync, then a fence by thread 0), and the block that sees
// count == gridDim.x - 1 orders its later operations after all of them. SYS: system scope (the
// blocks' stores to peers count); otherwise GPU scope (only this GPU's accesses need ordering,
// e.g. every block's reads of a signal before the last block resets it). The last block resets
// the counter. Returns the same value in every thread; all threads must call it.
// ---------------------------------------------------------------------------------------------
template <bool SYS>
__device__ __forceinline__ bool last_block_done(int* counter, int* s_flag) {
    __syncthreads();
    if (threadIdx.x == 0) {
        if (SYS) fence_sys(); else fence_gpu();
        const bool last = atomicAdd(counter, 1) == (int)gridDim.x - 1;
        if (last) {
            if (SYS) fence_sys(); else fence_gpu();
            atomicExch(counter, 0);
        }
        *s_flag = last ? 1 : 0;
    }
    __syncthreads();
    return *(volatile int*)s_flag != 0;
}
