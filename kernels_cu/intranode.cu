// Normal (high-throughput) dispatch and combine inside one NVLink domain.
//
// Every rank owns one NVLink buffer, opened by all peers through CUDA IPC. Its geometry (offsets
// come from cupy_ep/geometry.py as constants):
//   OFF_ARRIVALS       int[MAX_NVL_PEERS]  barrier arrivals from each peer
//   OFF_EPOCH          int                 this rank's barrier count
//   OFF_NOTIFY_FLAGS   int[MAX_NVL_PEERS]  notify data from peer p is ready (= epoch)
//   OFF_CANCELLED      int[2][MAX_NVL_PEERS]  [e & 1][p]: peer p cancelled its part of epoch e (= e)
//   OFF_GRID_RUN, OFF_GRID_ARRIVED, OFF_GRID_DONE  int each: this rank's grid barrier (grid_domain_barrier)
//   OFF_DISPATCH_TAILS u64[MAX_CHANNELS][MAX_NVL_PEERS]  rows arrived per (channel, source)
//   OFF_COMBINE_TAILS  u64[MAX_CHANNELS][MAX_NVL_PEERS]
//   OFF_NOTIFY         per source: a notify slot (see "Notify slot" below)
//   OFF_DATA           per source: a staging slot of CAP rows
// A token's rows in a staging slot sit at its position in the (source -> this rank) stream,
// which is also its order in recv_x, so each slot is a mirror of the rows recv_x receives from
// that source and senders never wait for receivers. Tails are tagged (epoch << 32 | rows), so
// stale values from earlier calls never satisfy a wait and nothing needs resetting (safe under
// CUDA-graph replay).
//
// Blocks 0..NUM_CHANNELS-1 send, one channel each; the NUM_RECEIVERS blocks after them
// receive, channels c = r, r + NUM_RECEIVERS, ... each. Channel c of a rank with n tokens covers
// tokens [n*c/C, n*(c+1)/C).
//
// Compile-time constants (KERNEL_* select which kernels the module holds):
//   NUM_RANKS NUM_CHANNELS NUM_RECEIVERS NUM_THREADS E_LOCAL  geometry offsets (OFF_*, NOTIFY_*)
//   notify:   TOPK (0: no topk_idx; else int64, the Buffer converts int32 ids)
//   dispatch: X_ROW_INT4 NUM_SCALES TOPK SLOT_BYTES SLOT_OFF_SCALES SLOT_OFF_IDX SLOT_OFF_W CHUNK
//             CACHED (1: a cached dispatch, which runs the domain barrier itself)
//   combine:  HIDDEN_INT4 TOPK NUM_BIAS SLOT_BYTES CSLOT_OFF_W
// Compiled by the CPU check for the shapes of tests/kernel_cases.py (constants from cupy_ep/geometry.py).
#include "normal.cuh"

#define NUM_WARPS (NUM_THREADS / 32)
#define FULL_MASK 0xffffffffu
#define COPY_UNROLL 4
#define COMBINE_UNROLL 2
#define COMBINE_ROWS_PER_WARP 2

static_assert(NUM_RANKS <= MAX_NVL_PEERS && NUM_RANKS <= 32, "one NVLink domain: at most MAX_NVL_PEERS ranks");
static_assert(NUM_CHANNELS <= MAX_CHANNELS, "at most MAX_CHANNELS channels");

// Notify slot (int32), written by source s into each destination's buffer:
//   [0] rows for you   [1] my input was bad   [2] my num_worst_tokens (0: none)
//   [NOTIFY_ROW + r]      my rows for every rank r (everyone learns every rank's total)
//   [NOTIFY_CHAN + c]     prefix over my channels of the rows for you (C + 1 entries)
//   [NOTIFY_EXPERT + j]   (token, slot) selections of your local expert j
#define NS_COUNT 0
#define NS_BAD 1
#define NS_WORST 2

__device__ __forceinline__ u64* tail_ptr(char* base, int offset, int channel, int src) {
    return reinterpret_cast<u64*>(base + offset) + channel * MAX_NVL_PEERS + src;
}

__device__ __forceinline__ char* slot_ptr(char* base, int src) { return base + OFF_DATA + (i64)src * SLOT_BYTES; }

__device__ __forceinline__ int* notify_slot(char* base, int src) {
    return reinterpret_cast<int*>(base + OFF_NOTIFY + src * NOTIFY_SLOT_BYTES);
}

// Loads the peer table into shared memory (all threads call it).
__device__ __forceinline__ void load_peers(const u64* table, char** s_peer) {
    if (threadIdx.x < NUM_RANKS) s_peer[threadIdx.x] = reinterpret_cast<char*>(table[threadIdx.x]);
    __syncthreads();
}

// Warps of a block serve sources round-robin: warp w serves source w % R.
struct SourceWarps {
    int src, index, count;
};

__device__ __forceinline__ SourceWarps source_warps(int warp) {
    SourceWarps s;
    s.src = warp % NUM_RANKS;
    s.index = warp / NUM_RANKS;
    s.count = (NUM_WARPS - s.src + NUM_RANKS - 1) / NUM_RANKS;
    return s;
}

// Runs the domain barrier of a kernel's block 0 and returns the new epoch (0 on timeout).
__device__ __forceinline__ int domain_barrier(char* const* s_peer, int rank, const WaitCtx& w) {
    __shared__ int* s_arrivals[NUM_RANKS];
    if (threadIdx.x < NUM_RANKS) s_arrivals[threadIdx.x] = reinterpret_cast<int*>(s_peer[threadIdx.x] + OFF_ARRIVALS);
    __syncthreads();
    char* me = s_peer[rank];
    return group_barrier(s_arrivals, reinterpret_cast<int*>(me + OFF_ARRIVALS), reinterpret_cast<int*>(me + OFF_EPOCH),
                         rank, NUM_RANKS, w);
}

// ---------------------------------------------------------------------------------------------
// The domain barrier inside a cached dispatch's or a combine's own kernel. Block 0 runs it; the
// other blocks must neither read the epoch (block 0 advances it) nor touch a peer's buffer before
// it is done, and cannot tell a stale epoch from a fresh one. So each kernel run is numbered: every
// block reads OFF_GRID_RUN, then counts itself in OFF_GRID_ARRIVED; the last to arrive zeroes the
// count and advances the number, after every block's read (their arrivals order them). Runs on
// one stream never overlap, so every block of a run reads the same number. Block 0 publishes
// (number + 1) << 1 | failed in OFF_GRID_DONE once the domain barrier is done; the others wait
// for their run's word. Nothing waits for a block that has not started (no co-residency needed,
// as before: block 0 is scheduled first), no per-block state (any grid size), device words only
// (CUDA-graph replays are safe). The other blocks wait twice the timeout, so that block 0's report
// (naming the late peer) comes first. Returns the same value in every thread of a block (false: a
// wait failed, recorded); all threads call it.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ bool grid_domain_barrier(char* const* s_peer, int rank, int kernel, StatusRecord* err,
                                                    u64 timeout_ns) {
    __shared__ int s_ok;
    char* me = s_peer[rank];
    int* run_word = reinterpret_cast<int*>(me + OFF_GRID_RUN);
    int* arrived = reinterpret_cast<int*>(me + OFF_GRID_ARRIVED);
    int* done = reinterpret_cast<int*>(me + OFF_GRID_DONE);
    __shared__ u32 s_run;
    if (threadIdx.x == 0) {
        const u32 run = *reinterpret_cast<volatile u32*>(run_word);
        if (atom_add_acq_rel_gpu(arrived, 1) == (int)gridDim.x - 1) {
            *reinterpret_cast<volatile int*>(arrived) = 0;
            *reinterpret_cast<volatile u32*>(run_word) = run + 1;
        }
        s_run = run;
    }
    __syncthreads();
    const u32 expect = (s_run + 1) << 1;   // this run's word, not failed
    if (blockIdx.x == 0) {
        const bool ok = domain_barrier(s_peer, rank, make_wait_ctx(err, timeout_ns, kernel, rank)) != 0;
        if (threadIdx.x == 0) {
            st_release_gpu(done, (int)(expect | (ok ? 0u : 1u)));
            s_ok = ok;
        }
    } else if (threadIdx.x == 0) {
        const WaitCtx w = make_wait_ctx(err, 2 * timeout_ns, kernel, rank);
        unsigned spins = 0;
        u32 v;
        bool waited = true;
        while (waited && ((v = (u32)ld_acquire_gpu(done)) | 1u) != (expect | 1u))
            waited = keep_waiting(w, spins, -1, (int)v);
        s_ok = waited && v == expect;
    }
    __syncthreads();
    return s_ok != 0;
}

// ---------------------------------------------------------------------------------------------
// Barrier kernel (one block): this rank's part in a cached dispatch's or a combine's domain
// barrier when it does not launch their kernel, having learnt in a compile agreement that a peer
// refused its arguments (the peers' kernel runs the barrier in its block 0, grid_domain_barrier).
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void group_barrier_kernel(const u64* peers, int rank, StatusRecord* err, u64 timeout_ns,
                                                int kernel_id) {
    __shared__ char* s_peer[NUM_RANKS];
    load_peers(peers, s_peer);
    domain_barrier(s_peer, rank, make_wait_ctx(err, timeout_ns, kernel_id, rank));
}

// ---------------------------------------------------------------------------------------------
// Cancelled barrier (one warp; the barrier kernel's module): this rank's part in a cached
// dispatch or a combine it does not make, its arguments refused on the host. It marks the call's
// epoch cancelled in every peer's buffer, then arrives at the domain barrier (each thread's mark
// is fenced before its arrival at the same peer, barrier.cuh cancel_mark); the peers' kernel after
// their barrier finds the mark (call_cancelled) and only reports.
// ---------------------------------------------------------------------------------------------

// After the call's domain barrier (notify's, or the kernel's own): the call's epoch, and whether a peer
// marked it cancelled (barrier_cancelled); then block 0 reports ST_PEER_BAD_INPUT naming the first
// such peer and the kernel must return without sending or receiving (its outputs unspecified).
// Threads 0..NUM_RANKS-1 read the marks with the epoch; one block barrier. All threads call it.
__device__ __forceinline__ bool call_cancelled(char* me, int rank, int kernel, StatusRecord* err, int& epoch) {
    epoch = *reinterpret_cast<const volatile int*>(me + OFF_EPOCH);
    const bool marked = threadIdx.x < NUM_RANKS && *cancel_mark(me + OFF_CANCELLED, epoch, threadIdx.x) == epoch;
    if (!__syncthreads_or(marked)) return false;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        int by = 0;
        while (by < NUM_RANKS - 1 && *cancel_mark(me + OFF_CANCELLED, epoch, by) != epoch) ++by;
        record_error(err, ST_PEER_BAD_INPUT, kernel, rank, by, 0);
    }
    return true;
}

extern "C" __global__ void barrier_cancelled(const u64* peers, int rank, StatusRecord* err, u64 timeout_ns,
                                             int kernel_id) {
    __shared__ char* s_peer[NUM_RANKS];
    load_peers(peers, s_peer);
    if (threadIdx.x < NUM_RANKS) {
        const int epoch = *reinterpret_cast<volatile int*>(s_peer[rank] + OFF_EPOCH) + 1;   // group_barrier's next
        *cancel_mark(s_peer[threadIdx.x] + OFF_CANCELLED, epoch, rank) = epoch;
    }
    __syncthreads();   // every read of the epoch before group_barrier advances it
    domain_barrier(s_peer, rank, make_wait_ctx(err, timeout_ns, kernel_id, rank));
}

// ---------------------------------------------------------------------------------------------
// Cancelled notify (one warp; in the barrier kernel's module, loaded with the engine): this
// rank's part in a non-cached dispatch it does not make, because the host refused its arguments
// (refused = 1) or learned that a peer refused theirs (refused = 0). It reads no argument of the
// call: the domain barrier, then in every peer's buffer a notify slot of zero rows for every
// rank and channel with NS_BAD = refused, then the notify signal, as notify_dispatch makes them.
// The peers' notify_dispatch completes and cancels the call (NS_BAD), their dispatch sends
// nothing, and the epochs stay in step. Nothing is written for this rank's host (its call
// raises without waiting) nor read from the peers' slots. The expert counts of the slot are
// left as they are: notify reads them only into the host's counts of a call it did not cancel.
// ---------------------------------------------------------------------------------------------
static_assert(NOTIFY_CHAN + MAX_CHANNELS + 1 <= NOTIFY_EXPERT, "notify slot: the header, rows and channels come first");

extern "C" __global__ void notify_cancelled(const u64* peers, int rank, int refused, StatusRecord* err,
                                            u64 timeout_ns) {
    __shared__ char* s_peer[NUM_RANKS];
    load_peers(peers, s_peer);
    const WaitCtx w = make_wait_ctx(err, timeout_ns, KID_NOTIFY_DISPATCH, rank);
    const int epoch = domain_barrier(s_peer, rank, w);
    if (epoch == 0) return;
    for (int i = threadIdx.x; i < NUM_RANKS * NOTIFY_EXPERT; i += blockDim.x) {
        const int r = i / NOTIFY_EXPERT, j = i % NOTIFY_EXPERT;
        notify_slot(s_peer[r], rank)[j] = j == NS_BAD ? refused : 0;
    }
    signal_peers_and_wait(s_peer, s_peer[rank], OFF_NOTIFY_FLAGS, rank, NUM_RANKS, epoch, w, 0);
}

#if KERNEL_NOTIFY
// Checks this rank's routing arrays against each other and against topk_idx (when given), as
// the reference backend does on the host. Reports the first problem found; true in a thread that
// found one.
__device__ __forceinline__ bool routing_is_bad(int rank, int num_tokens, const i64* __restrict__ topk_idx,
                                               const u8* __restrict__ is_token_in_rank,
                                               const int* __restrict__ num_tokens_per_rank,
                                               const int* __restrict__ num_tokens_per_expert,
                                               const int (*s_chan)[NUM_CHANNELS + 1], StatusRecord* err) {
    bool bad = false;
    if (threadIdx.x < NUM_RANKS && s_chan[threadIdx.x][NUM_CHANNELS] != num_tokens_per_rank[threadIdx.x]) {
        record_error(err, ST_BAD_LAYOUT, KID_NOTIFY_DISPATCH, rank, -1, 0, threadIdx.x);
        bad = true;
    }
    return topk_disagrees(KID_NOTIFY_DISPATCH, rank, num_tokens, topk_idx, is_token_in_rank, num_tokens_per_expert,
                          err) || bad;
}

// ---------------------------------------------------------------------------------------------
// Notify (one block): count this rank's rows per (destination, channel); check the routing;
// barrier; tell every peer its counts, this rank's counts for everyone and whether the input
// was bad; then read what peers sent and compute where each source's rows start in recv_x.
// A call any rank had bad input for is cancelled on every rank (call_status = 1, nothing is
// sent); with num_worst_tokens, a rank that would receive more rows than allowed is known to
// every rank, which all report it (ST_OVERFLOW).
// rank_prefix: [R + 1], rank_prefix[R] = rows received. prof: null, or [1][PROF_SLOTS]
// globaltimer checkpoints (1 checked, 2 barrier passed, 3 counts exchanged, PROF_END published).
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1)
notify_dispatch(const u64* peers, int rank, int num_tokens, const int* __restrict__ num_tokens_per_rank,
                const int* __restrict__ num_tokens_per_expert, const u8* __restrict__ is_token_in_rank,
                const i64* __restrict__ topk_idx, int expert_alignment, int num_worst_tokens,
                int* __restrict__ rank_prefix, int* __restrict__ recv_chan_prefix, int* __restrict__ send_chan_prefix,
                int* __restrict__ call_status, volatile int* host_out, StatusRecord* err, u64 timeout_ns,
                int ready_value, u64* __restrict__ prof) {
    prof_mark(prof, 0);
    __shared__ char* s_peer[NUM_RANKS];
    __shared__ int s_chan[NUM_RANKS][NUM_CHANNELS + 1];
    __shared__ int s_bad_rank, s_over_rank;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    constexpr int CP = NUM_CHANNELS + 1;

    if (tid == 0) *call_status = 1;   // until this notify completes: a dispatch after a failed notify sends nothing
    load_peers(peers, s_peer);
    char* me = s_peer[rank];
    const WaitCtx w = make_wait_ctx(err, timeout_ns, KID_NOTIFY_DISPATCH, rank);

    // The counts and checks read only this rank's arguments, so they come before the barrier:
    // a rank that arrives early checks while it would otherwise wait.
    // Rows this rank sends to each destination, per channel: each lane counts its tokens for
    // every rank (loads independent of each other, several in flight), then the warp sums.
    for (int c = warp; c < NUM_CHANNELS; c += NUM_WARPS) {
        const int b = channel_begin(num_tokens, c), e = channel_begin(num_tokens, c + 1);
        int count[NUM_RANKS];
#pragma unroll
        for (int r = 0; r < NUM_RANKS; ++r) count[r] = 0;
#pragma unroll 4
        for (int t = b + lane; t < e; t += 32) {
#pragma unroll
            for (int r = 0; r < NUM_RANKS; ++r) count[r] += is_token_in_rank[(i64)t * NUM_RANKS + r] ? 1 : 0;
        }
#pragma unroll
        for (int r = 0; r < NUM_RANKS; ++r) {
            const int sum = warp_sum(count[r]);
            if (lane == 0) s_chan[r][c + 1] = sum;
        }
    }
    if (tid < NUM_RANKS) s_chan[tid][0] = 0;
    __syncthreads();
    if (tid < NUM_RANKS)
        for (int c = 0; c < NUM_CHANNELS; ++c) s_chan[tid][c + 1] += s_chan[tid][c];
    __syncthreads();
    // one answer for the block: a report landing between two threads' reads must not split it
    const bool bad = __syncthreads_or(routing_is_bad(rank, num_tokens, topk_idx, is_token_in_rank,
                                                     num_tokens_per_rank, num_tokens_per_expert, s_chan, err) ||
                                      bad_input_pending(err));
    prof_mark(prof, 1);
    const int epoch = domain_barrier(s_peer, rank, w);   // the peers are done with this rank's slots
    if (epoch == 0) return;
    prof_mark(prof, 2);

    for (int i = tid; i < NUM_RANKS * CP; i += NUM_THREADS) {
        const int r = i / CP, c = i % CP;
        send_chan_prefix[i] = s_chan[r][c];
        notify_slot(s_peer[r], rank)[NOTIFY_CHAN + c] = s_chan[r][c];
    }
    for (int i = tid; i < NUM_RANKS * E_LOCAL; i += NUM_THREADS)
        notify_slot(s_peer[i / E_LOCAL], rank)[NOTIFY_EXPERT + i % E_LOCAL] = num_tokens_per_expert[i];
    for (int i = tid; i < NUM_RANKS * NUM_RANKS; i += NUM_THREADS)
        notify_slot(s_peer[i / NUM_RANKS], rank)[NOTIFY_ROW + i % NUM_RANKS] = s_chan[i % NUM_RANKS][NUM_CHANNELS];
    if (tid < NUM_RANKS) {
        int* slot = notify_slot(s_peer[tid], rank);
        slot[NS_COUNT] = s_chan[tid][NUM_CHANNELS];
        slot[NS_BAD] = bad ? 1 : 0;
        slot[NS_WORST] = num_worst_tokens;
    }
    if (tid == 0) {
        s_bad_rank = NUM_RANKS;
        s_over_rank = NUM_RANKS;
    }
    if (!signal_peers_and_wait(s_peer, me, OFF_NOTIFY_FLAGS, rank, NUM_RANKS, epoch, w, 0)) return;
    prof_mark(prof, 3);

    // Every rank's totals: rank d receives the sum over sources s of s's row entry d.
    if (tid < NUM_RANKS) {
        const int* slot = notify_slot(me, tid);
        if (slot[NS_BAD]) atomicMin(&s_bad_rank, tid);
        int total = 0;
        for (int s = 0; s < NUM_RANKS; ++s) total += notify_slot(me, s)[NOTIFY_ROW + tid];
        const int allowed = notify_slot(me, tid)[NS_WORST];
        if (allowed > 0 && total > allowed) atomicMin(&s_over_rank, tid);
    }
    __syncthreads();
    if (tid == 0) {
        int total = 0;
        for (int s = 0; s < NUM_RANKS; ++s) {
            rank_prefix[s] = total;
            total += notify_slot(me, s)[NS_COUNT];
        }
        rank_prefix[NUM_RANKS] = total;
    }
    for (int i = tid; i < NUM_RANKS * CP; i += NUM_THREADS)
        recv_chan_prefix[i] = notify_slot(me, i / CP)[NOTIFY_CHAN + i % CP];
    for (int j = tid; j < E_LOCAL; j += NUM_THREADS) {
        int sum = 0;
        for (int s = 0; s < NUM_RANKS; ++s) sum += notify_slot(me, s)[NOTIFY_EXPERT + j];
        host_out[HOST_EXPERT + j] = (sum + expert_alignment - 1) / expert_alignment * expert_alignment;
    }
    __syncthreads();
    if (tid == 0) {
        int over_total = 0, over_allowed = 0;
        if (s_over_rank < NUM_RANKS) {
            for (int s = 0; s < NUM_RANKS; ++s) over_total += notify_slot(me, s)[NOTIFY_ROW + s_over_rank];
            over_allowed = notify_slot(me, s_over_rank)[NS_WORST];
        }
        publish_notify_outcome(KID_NOTIFY_DISPATCH, rank, rank_prefix[NUM_RANKS], s_bad_rank, s_over_rank, over_total,
                               over_allowed, num_worst_tokens, call_status, host_out, err, ready_value);
        prof_mark(prof, PROF_END);
    }
}
#endif

#if KERNEL_DISPATCH
// Copies one token's row (and its scales / top-k) to every destination whose position is
// >= 0. pos[r] is the row in destination r's slot for this rank.
__device__ __forceinline__ void send_token(int t, int lane, const int (&pos)[NUM_RANKS], char* const* dst_slot,
                                           const int4v* __restrict__ x, const float* __restrict__ x_scales,
                                           const i64* __restrict__ topk_idx, const float* __restrict__ topk_weights) {
    const int4v* src = x + (i64)t * X_ROW_INT4;
    for (int i = lane; i < X_ROW_INT4; i += 32 * COPY_UNROLL) {
        int4v v[COPY_UNROLL];
#pragma unroll
        for (int u = 0; u < COPY_UNROLL; ++u)
            if (i + u * 32 < X_ROW_INT4) v[u] = ld_nc_v4(src + i + u * 32);
#pragma unroll
        for (int r = 0; r < NUM_RANKS; ++r) {
            if (pos[r] < 0) continue;
            int4v* dst = reinterpret_cast<int4v*>(dst_slot[r]) + (i64)pos[r] * X_ROW_INT4;
#pragma unroll
            for (int u = 0; u < COPY_UNROLL; ++u)
                if (i + u * 32 < X_ROW_INT4) st_v4(dst + i + u * 32, v[u]);
        }
    }
#if NUM_SCALES > 0
    for (int i = lane; i < NUM_SCALES; i += 32) {
        const float v = x_scales[(i64)t * NUM_SCALES + i];
#pragma unroll
        for (int r = 0; r < NUM_RANKS; ++r)
            if (pos[r] >= 0) reinterpret_cast<float*>(dst_slot[r] + SLOT_OFF_SCALES)[(i64)pos[r] * NUM_SCALES + i] = v;
    }
#endif
#if TOPK > 0
    if (lane < TOPK) {
        const i64 e = topk_idx[(i64)t * TOPK + lane];
        const float wgt = topk_weights[(i64)t * TOPK + lane];
#pragma unroll
        for (int r = 0; r < NUM_RANKS; ++r) {
            if (pos[r] < 0) continue;
            const bool local = e >= (i64)r * E_LOCAL && e < (i64)(r + 1) * E_LOCAL;
            reinterpret_cast<i64*>(dst_slot[r] + SLOT_OFF_IDX)[(i64)pos[r] * TOPK + lane] = local ? e - (i64)r * E_LOCAL : -1;
            reinterpret_cast<float*>(dst_slot[r] + SLOT_OFF_W)[(i64)pos[r] * TOPK + lane] = local ? wgt : 0.0f;
        }
    }
#endif
}

// Sends channel c: CHUNK tokens at a time (one per warp), then each destination's tail.
__device__ __forceinline__ void dispatch_sender(int c, int rank, int epoch, int num_tokens, char* const* s_peer,
                                                const int4v* __restrict__ x, const float* __restrict__ x_scales,
                                                const i64* __restrict__ topk_idx, const float* __restrict__ topk_weights,
                                                const u8* __restrict__ is_token_in_rank,
                                                const int* __restrict__ send_chan_prefix, int* __restrict__ send_pos) {
    __shared__ u32 s_mask[NUM_WARPS];
    __shared__ int s_sent[NUM_RANKS];
    __shared__ char* s_dst_slot[NUM_RANKS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int tb = channel_begin(num_tokens, c), te = channel_begin(num_tokens, c + 1);
    if (tid < NUM_RANKS) {
        s_sent[tid] = 0;
        s_dst_slot[tid] = slot_ptr(s_peer[tid], rank);
    }
    __syncthreads();

    for (int batch = tb; batch < te; batch += CHUNK) {
        const int t = batch + warp;
        const bool valid = warp < CHUNK && t < te;
        const u32 mask = __ballot_sync(FULL_MASK, valid && lane < NUM_RANKS && is_token_in_rank[(i64)t * NUM_RANKS + lane]);
        if (lane == 0) s_mask[warp] = mask;
        __syncthreads();
        if (valid) {
            int my_pos = -1;
            if (lane < NUM_RANKS && ((mask >> lane) & 1u)) {
                int before = 0;
                for (int w2 = 0; w2 < warp; ++w2) before += (s_mask[w2] >> lane) & 1u;
                my_pos = send_chan_prefix[lane * (NUM_CHANNELS + 1) + c] + s_sent[lane] + before;
            }
            if (lane < NUM_RANKS) send_pos[(i64)t * NUM_RANKS + lane] = my_pos;
            int pos[NUM_RANKS];
#pragma unroll
            for (int r = 0; r < NUM_RANKS; ++r) pos[r] = __shfl_sync(FULL_MASK, my_pos, r);
            send_token(t, lane, pos, s_dst_slot, x, x_scales, topk_idx, topk_weights);
        }
        __syncthreads();
        if (tid < NUM_RANKS) {
            int added = 0;
            for (int w2 = 0; w2 < NUM_WARPS && w2 < CHUNK; ++w2) added += (s_mask[w2] >> tid) & 1u;
            if (added) {
                s_sent[tid] += added;
                fence_sys();
                chaos_pause();
                st_release_sys_u64(tail_ptr(s_peer[tid], OFF_DISPATCH_TAILS, c, rank), tagged(epoch, s_sent[tid]));
            }
        }
        __syncthreads();
    }
}

// Worst-token mode: rows past those received get no expert.
__device__ __forceinline__ void fill_padding_rows(int receiver, const int* __restrict__ rank_prefix,
                                                  const RecvOut& out) {
#if TOPK > 0
    for (int row = rank_prefix[NUM_RANKS] + receiver * NUM_THREADS + threadIdx.x; row < out.rows;
         row += NUM_RECEIVERS * NUM_THREADS) {
        for (int k = 0; k < TOPK; ++k) {
            out.topk_idx[(i64)row * TOPK + k] = -1;
            out.topk_weights[(i64)row * TOPK + k] = 0.0f;
        }
    }
#endif
}

// Copies channel c's rows out of the staging slots into the outputs as they arrive (rows past
// out.rows are dropped: worst-token overflow, reported by notify). False when a wait timed out.
__device__ __forceinline__ bool dispatch_receiver(int c, int rank, int epoch, const WaitCtx& w, char* const* s_peer,
                                                  const int* __restrict__ recv_chan_prefix,
                                                  const int* __restrict__ rank_prefix, const RecvOut& out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const SourceWarps sw = source_warps(warp);
    const int s = sw.src;
    const int cb = recv_chan_prefix[s * (NUM_CHANNELS + 1) + c];
    const int n = recv_chan_prefix[s * (NUM_CHANNELS + 1) + c + 1] - cb;
    const int out0 = rank_prefix[s] + cb;
    char* slot = slot_ptr(s_peer[rank], s);
    const u64* tail = tail_ptr(s_peer[rank], OFF_DISPATCH_TAILS, c, s);
    int arrived = 0;
    for (int i = sw.index; i < n; i += sw.count) {
        if (arrived <= i) {
            u64 seen = 0;
            bool ok = true;
            if (lane == 0) ok = wait_geq_sys_u64(tail, tagged(epoch, i + 1), &seen, w, s);
            if (!__shfl_sync(FULL_MASK, ok, 0)) return false;
            arrived = (int)(u32)__shfl_sync(FULL_MASK, (u32)seen, 0);
        }
        const int row = out0 + i;
        if (row >= out.rows) continue;
        const int4v* src = reinterpret_cast<const int4v*>(slot) + (i64)(cb + i) * X_ROW_INT4;
        int4v* dst = out.x + (i64)row * X_ROW_INT4;
        for (int j = lane; j < X_ROW_INT4; j += 32 * COPY_UNROLL) {
            int4v v[COPY_UNROLL];
#pragma unroll
            for (int u = 0; u < COPY_UNROLL; ++u)
                if (j + u * 32 < X_ROW_INT4) v[u] = ld_cg_v4(src + j + u * 32);
#pragma unroll
            for (int u = 0; u < COPY_UNROLL; ++u)
                if (j + u * 32 < X_ROW_INT4) dst[j + u * 32] = v[u];
        }
#if NUM_SCALES > 0
        for (int j = lane; j < NUM_SCALES; j += 32)
            out.scales[(i64)row * NUM_SCALES + j] =
                __int_as_float(ld_cg_i32(slot + SLOT_OFF_SCALES + 4 * ((i64)(cb + i) * NUM_SCALES + j)));
#endif
#if TOPK > 0
        if (lane < TOPK) {
            out.topk_idx[(i64)row * TOPK + lane] = ld_cg_i64(slot + SLOT_OFF_IDX + 8 * ((i64)(cb + i) * TOPK + lane));
            out.topk_weights[(i64)row * TOPK + lane] =
                __int_as_float(ld_cg_i32(slot + SLOT_OFF_W + 4 * ((i64)(cb + i) * TOPK + lane)));
        }
#endif
    }
    return true;
}

// ---------------------------------------------------------------------------------------------
// Dispatch. A non-cached one needs notify to have run just before on this stream: the epoch it
// set tags the tails; a cached one runs the domain barrier first (grid_domain_barrier). A call
// notify cancelled (bad input on some rank), or a cached one a peer's barrier_cancelled marked,
// does nothing.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1)
intranode_dispatch(const u64* peers, int rank, int num_tokens, const int4v* __restrict__ x,
                   const float* __restrict__ x_scales, const i64* __restrict__ topk_idx,
                   const float* __restrict__ topk_weights, const u8* __restrict__ is_token_in_rank,
                   const int* __restrict__ send_chan_prefix, const int* __restrict__ recv_chan_prefix,
                   const int* __restrict__ rank_prefix, int* __restrict__ send_pos, const int* __restrict__ call_status,
                   int4v* __restrict__ recv_x, float* __restrict__ recv_scales, i64* __restrict__ recv_topk_idx,
                   float* __restrict__ recv_topk_weights, int num_out_rows, int fill_padding,
                   const volatile u64* out_desc, u64 desc_seq, StatusRecord* err, u64 timeout_ns) {
    __shared__ char* s_peer[NUM_RANKS];
    if (!CACHED && *call_status != 0) return;
    load_peers(peers, s_peer);
    if (CACHED && !grid_domain_barrier(s_peer, rank, KID_INTRANODE_DISPATCH, err, timeout_ns)) return;
    int epoch;
    if (call_cancelled(s_peer[rank], rank, KID_INTRANODE_DISPATCH, err, epoch)) return;
    if (blockIdx.x < NUM_CHANNELS) {
        dispatch_sender(blockIdx.x, rank, epoch, num_tokens, s_peer, x, x_scales, topk_idx, topk_weights,
                        is_token_in_rank, send_chan_prefix, send_pos);
    } else {
        const int receiver = blockIdx.x - NUM_CHANNELS;
        const WaitCtx w = make_wait_ctx(err, timeout_ns, KID_INTRANODE_DISPATCH, rank, receiver);
        RecvOut out = {recv_x, recv_scales, recv_topk_idx, recv_topk_weights, num_out_rows};
        if (!receive_outputs(out, out_desc, desc_seq, w)) return;
        if (fill_padding) fill_padding_rows(receiver, rank_prefix, out);
        for (int c = receiver; c < NUM_CHANNELS; c += NUM_RECEIVERS)
            if (!dispatch_receiver(c, rank, epoch, WaitCtx{w.err, w.deadline, w.kernel, w.rank, c}, s_peer,
                                   recv_chan_prefix, rank_prefix, out))
                return;
    }
}
#endif

#if KERNEL_COMBINE
// Sends back the rows this rank received in channel c, source by source, into each source's
// slot for this rank at the same positions dispatch used. Rows at or past num_x_rows (dropped
// by a worst-token overflow) are not read.
__device__ __forceinline__ void combine_sender(int c, int rank, int epoch, char* const* s_peer,
                                               const int4v* __restrict__ x, int num_x_rows,
                                               const float* __restrict__ topk_weights,
                                               const int* __restrict__ rank_prefix,
                                               const int* __restrict__ recv_chan_prefix) {
    __shared__ int s_begin[NUM_RANKS], s_count[NUM_RANKS], s_rounds;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) {
        int rounds = 0;
        for (int s = 0; s < NUM_RANKS; ++s) {
            const int b = recv_chan_prefix[s * (NUM_CHANNELS + 1) + c];
            s_begin[s] = b;
            s_count[s] = recv_chan_prefix[s * (NUM_CHANNELS + 1) + c + 1] - b;
            const int g = COMBINE_ROWS_PER_WARP * source_warps(s).count;
            rounds = max(rounds, (s_count[s] + g - 1) / g);
        }
        s_rounds = rounds;
    }
    __syncthreads();
    const SourceWarps sw = source_warps(warp);
    const int s = sw.src, cb = s_begin[s], n = s_count[s];
    const int row0 = rank_prefix[s] + cb;
    const int4v* src_rows = x + (i64)row0 * HIDDEN_INT4;
    char* dst_slot = slot_ptr(s_peer[s], rank);
    // A round moves COMBINE_ROWS_PER_WARP rows per warp (their loads in flight together), then
    // publishes the tails: fewer rounds, fewer stalls on the system fence before each tail.
    for (int round = 0; round < s_rounds; ++round) {
        const int i0 = round * COMBINE_ROWS_PER_WARP * sw.count + sw.index;
        if (i0 < n) {
            for (int j = lane; j < HIDDEN_INT4; j += 32 * COPY_UNROLL) {
                int4v v[COMBINE_ROWS_PER_WARP][COPY_UNROLL];
#pragma unroll
                for (int q = 0; q < COMBINE_ROWS_PER_WARP; ++q) {
                    const int i = i0 + q * sw.count;
                    const int4v* src = src_rows + (i64)i * HIDDEN_INT4;
#pragma unroll
                    for (int u = 0; u < COPY_UNROLL; ++u)
                        if (i < n && row0 + i < num_x_rows && j + u * 32 < HIDDEN_INT4) v[q][u] = ld_nc_v4(src + j + u * 32);
                }
#pragma unroll
                for (int q = 0; q < COMBINE_ROWS_PER_WARP; ++q) {
                    const int i = i0 + q * sw.count;
                    int4v* dst = reinterpret_cast<int4v*>(dst_slot) + (i64)(cb + i) * HIDDEN_INT4;
#pragma unroll
                    for (int u = 0; u < COPY_UNROLL; ++u)
                        if (i < n && row0 + i < num_x_rows && j + u * 32 < HIDDEN_INT4) st_v4(dst + j + u * 32, v[q][u]);
                }
            }
#if TOPK > 0
            for (int q = 0; q < COMBINE_ROWS_PER_WARP; ++q) {
                const int i = i0 + q * sw.count;
                if (i < n && row0 + i < num_x_rows && lane < TOPK && topk_weights != nullptr)
                    reinterpret_cast<float*>(dst_slot + CSLOT_OFF_W)[(i64)(cb + i) * TOPK + lane] =
                        topk_weights[(i64)(row0 + i) * TOPK + lane];
            }
#endif
        }
        __syncthreads();
        if (tid < NUM_RANKS) {
            const int rows_per_round = COMBINE_ROWS_PER_WARP * source_warps(tid).count;
            const int done = min((round + 1) * rows_per_round, s_count[tid]);
            if (done > round * rows_per_round) {
                fence_sys();
                chaos_pause();
                st_release_sys_u64(tail_ptr(s_peer[tid], OFF_COMBINE_TAILS, c, rank), tagged(epoch, done));
            }
        }
    }
}

// Sums, for each token of channel c of this rank, the rows every destination sent back (plus
// the biases), in float32.
__device__ __forceinline__ bool combine_receiver(int c, int rank, int epoch, int num_tokens, const WaitCtx& w,
                                                 char* const* s_peer, const int* __restrict__ send_chan_prefix,
                                                 const int* __restrict__ send_pos, const int4v* __restrict__ bias0,
                                                 const int4v* __restrict__ bias1, int4v* __restrict__ combined_x,
                                                 float* __restrict__ combined_w) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int tb = channel_begin(num_tokens, c), te = channel_begin(num_tokens, c + 1);
    char* me = s_peer[rank];
    // Lane r < R tracks destination r: its channel start and rows seen so far.
    const int chan_start = lane < NUM_RANKS ? send_chan_prefix[lane * (NUM_CHANNELS + 1) + c] : 0;
    const u64* tail = tail_ptr(me, OFF_COMBINE_TAILS, c, lane < NUM_RANKS ? lane : 0);
    int arrived = 0;
    for (int t = tb + warp; t < te; t += NUM_WARPS) {
        const int my_pos = lane < NUM_RANKS ? send_pos[(i64)t * NUM_RANKS + lane] : -1;
        bool ok = true;
        if (my_pos >= 0 && my_pos - chan_start >= arrived) {
            u64 seen = 0;
            ok = wait_geq_sys_u64(tail, tagged(epoch, my_pos - chan_start + 1), &seen, w, lane);
            arrived = (int)(u32)seen;
        }
        if (__any_sync(FULL_MASK, !ok)) return false;
        int pos[NUM_RANKS];
#pragma unroll
        for (int r = 0; r < NUM_RANKS; ++r) pos[r] = __shfl_sync(FULL_MASK, my_pos, r);

        // All ranks' chunks are loaded before any is summed, so that up to NUM_RANKS *
        // COMBINE_UNROLL 16-byte loads per lane are in flight.
        for (int j0 = lane; j0 < HIDDEN_INT4; j0 += 32 * COMBINE_UNROLL) {
            float acc[COMBINE_UNROLL][8];
            int4v v[NUM_RANKS][COMBINE_UNROLL];
#pragma unroll
            for (int r = 0; r < NUM_RANKS; ++r) {
                const int4v* row = reinterpret_cast<const int4v*>(slot_ptr(me, r)) + (i64)pos[r] * HIDDEN_INT4;
#pragma unroll
                for (int u = 0; u < COMBINE_UNROLL; ++u)
                    if (pos[r] >= 0 && j0 + u * 32 < HIDDEN_INT4) v[r][u] = ld_cg_v4(row + j0 + u * 32);
            }
#pragma unroll
            for (int u = 0; u < COMBINE_UNROLL; ++u) {
                const int j = j0 + u * 32;
#pragma unroll
                for (int q = 0; q < 8; ++q) acc[u][q] = 0.0f;
                if (j >= HIDDEN_INT4) continue;
#if NUM_BIAS > 0
                add_bf16x8(acc[u], ld_nc_v4(bias0 + (i64)t * HIDDEN_INT4 + j));
#endif
#if NUM_BIAS > 1
                add_bf16x8(acc[u], ld_nc_v4(bias1 + (i64)t * HIDDEN_INT4 + j));
#endif
#pragma unroll
                for (int r = 0; r < NUM_RANKS; ++r)
                    if (pos[r] >= 0) add_bf16x8(acc[u], v[r][u]);
                combined_x[(i64)t * HIDDEN_INT4 + j] = f32x8_to_bf16x8(acc[u]);
            }
        }
#if TOPK > 0
        if (combined_w != nullptr && lane < TOPK) {
            float sum = 0.0f;
#pragma unroll
            for (int r = 0; r < NUM_RANKS; ++r)
                if (pos[r] >= 0)
                    sum += __int_as_float(ld_cg_i32(slot_ptr(me, r) + CSLOT_OFF_W + 4 * ((i64)pos[r] * TOPK + lane)));
            combined_w[(i64)t * TOPK + lane] = sum;
        }
#endif
    }
    return true;
}

// ---------------------------------------------------------------------------------------------
// Combine. Runs the domain barrier first (grid_domain_barrier); a call a peer's
// barrier_cancelled marked does nothing.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1)
intranode_combine(const u64* peers, int rank, int num_tokens, const int4v* __restrict__ x, int num_x_rows,
                  const float* __restrict__ topk_weights, const int* __restrict__ rank_prefix,
                  const int* __restrict__ recv_chan_prefix, const int* __restrict__ send_chan_prefix,
                  const int* __restrict__ send_pos, const int4v* __restrict__ bias0, const int4v* __restrict__ bias1,
                  int4v* __restrict__ combined_x, float* __restrict__ combined_w, StatusRecord* err,
                  u64 timeout_ns) {
    __shared__ char* s_peer[NUM_RANKS];
    load_peers(peers, s_peer);
    if (!grid_domain_barrier(s_peer, rank, KID_INTRANODE_COMBINE, err, timeout_ns)) return;
    int epoch;
    if (call_cancelled(s_peer[rank], rank, KID_INTRANODE_COMBINE, err, epoch)) return;
    if (blockIdx.x < NUM_CHANNELS) {
        combine_sender(blockIdx.x, rank, epoch, s_peer, x, num_x_rows, topk_weights, rank_prefix, recv_chan_prefix);
    } else {
        const int receiver = blockIdx.x - NUM_CHANNELS;
        for (int c = receiver; c < NUM_CHANNELS; c += NUM_RECEIVERS)
            if (!combine_receiver(c, rank, epoch, num_tokens,
                                  make_wait_ctx(err, timeout_ns, KID_INTRANODE_COMBINE, rank, c), s_peer,
                                  send_chan_prefix, send_pos, bias0, bias1, combined_x, combined_w))
                return;
    }
}
#endif
