// Normal (high-throughput) dispatch and combine across NVLink domains.
//
// Ranks form N domains of P ranks (rank = dom * P + l). A token crosses between domains at most
// once per destination domain d: from its rank (s, l) to the rank with the same local index there,
// the forwarder F = (d, l), which copies it over NVLink into the NVLink buffer of every rank of d
// that needs it. Combine runs the same path backwards: each rank sends its rows back to their
// forwarder, which sums them per token (float32, rounded to bf16 once) and sends the sum across to
// the token's rank, which sums the domains' partial sums with the biases.
//
// Transport: the cross-domain leg goes through transport.cuh (NVSHMEM public API: put with
// signal, signal set, fence, quiet) between "column" peers (same l); the NVLink leg stores into
// the peers' CUDA-IPC buffers. Every buffer holds whole streams, positioned by prefix sums that
// notify computes, so no sender ever waits for a receiver: waits only go from consumer to
// producer (forwarder -> sender, receiver -> forwarder), and every wait is bounded.
//
// Symmetric (NVSHMEM) buffer, identical offsets on every rank (cupy_ep/geometry.py):
//   R_OFF_BARRIER   u64 [2][MAX_RDMA_RANKS]         column barrier, [e & 1][s]: from domain s,
//                                                   epoch e << BAD_BITS | its first cancelled rank + 1
//   R_OFF_VEC_SIG   u64 [MAX_RDMA_RANKS]            notify vector from domain s arrived (= epoch)
//   R_OFF_DTAIL     u64 [MAX_CHANNELS][MAX_RDMA_RANKS]  dispatch records arrived (channel, source domain)
//   R_OFF_CTAIL     u64 [MAX_CHANNELS][MAX_RDMA_RANKS]  combine partial sums arrived (channel, domain)
//   R_OFF_VEC_RECV  int [N][VEC_STRIDE]              notify vectors received, per source domain
//   R_OFF_VEC_SEND  int [N][VEC_STRIDE]              notify vectors to send, per destination domain
//   R_OFF_DATA      [N][CAP] records: received (dispatch: by source domain; combine: by domain of
//                   the partial sums), then [N][CAP] records staged for sending (by peer domain).
//                   A record sits at its token's position in the (rank -> domain) stream.
// NVLink (IPC) buffer of every rank:
//   OFF_ARRIVALS int[MAX_NVL_PEERS], OFF_EPOCH int  domain barrier (barrier.cuh)
//   OFF_CALL_BAD int[2]                               (first cancelled rank, epoch) of a call the
//                                                     barrier kernel found cancelled
//   OFF_CANCELLED int[2][MAX_NVL_PEERS]               domain peers' cancel marks (barrier.cuh)
//   OFF_SLOT_FLAGS int[P], OFF_FWD_FLAGS int[P]       notify: slot / fwd slot from local rank l written
//   OFF_DTAIL  u64 [MAX_CHANNELS][R]                  dispatch rows arrived (channel, source rank)
//   OFF_CTAIL  u64 [MAX_CHANNELS][N][P]               combine rows arrived at a forwarder
//                                                     (channel, source domain, local rank)
//   OFF_SLOT   int [P][SLOT_STRIDE]                   notify slot from forwarder l (this rank's counts)
//   OFF_FWD    int [P][N]                             from local rank m: where rows of (s, me) start
//   OFF_NX / OFF_NS / OFF_NI / OFF_NW                 NVL_ROWS rows: data (2H bytes), scales, top-k
//                                                     ids (i64), weights. Dispatch: a mirror of recv_x
//                                                     (row i of recv_x is row i here). Combine, at a
//                                                     forwarder: the rows its local ranks send back.
//
// Compile-time constants: NUM_RANKS NUM_NVL_RANKS NUM_CHANNELS NUM_THREADS E_LOCAL TOPK HIDDEN
// X_BYTES NUM_SCALES CHUNK, the geometry above (R_OFF_*, VEC_STRIDE, CAP,
// REC_BYTES, OFF_*, SLOT_STRIDE, NVL_ROWS), KERNEL_* (which kernels the module holds; KERNEL_CANCEL:
// the shape-free module of internode_notify_cancelled and internode_barrier_cancelled,
// cupy_ep/geometry.py internode_cancel_constants).
// @needs nvshmem
// Compiled by the CPU check for the shapes of tests/kernel_cases.py (constants from cupy_ep/geometry.py).
#include "transport.cuh"
#include "normal.cuh"

namespace inter {

constexpr int R = NUM_RANKS;
constexpr int P = NUM_NVL_RANKS;
constexpr int N = NUM_RANKS / NUM_NVL_RANKS;
constexpr int C = NUM_CHANNELS;
constexpr int NT = NUM_THREADS;
constexpr int NW = NUM_THREADS / 32;
constexpr int E = E_LOCAL * NUM_RANKS;
constexpr int K = TOPK;
constexpr unsigned FULL = 0xffffffffu;

static_assert(R % P == 0 && P >= 1 && P <= MAX_NVL_PEERS, "domains of 1..MAX_NVL_PEERS ranks");
static_assert(N <= MAX_RDMA_RANKS && C <= MAX_CHANNELS, "limits");
static_assert(K <= MAX_NORMAL_TOPK && MAX_NORMAL_TOPK <= 32 && CHUNK >= 1 && CHUNK <= NW, "top-k (a lane each) and chunk sizes");
static_assert(REC_BYTES % 16 == 0 && X_BYTES % 16 == 0, "16-byte rows");

// ---- record (one token for one destination domain) in the symmetric buffer --------------------
// dispatch: x (X_BYTES) | scales f32 [NUM_SCALES] | expert ids int32 [K] | weights f32 [K] |
//           position of the token in each target's stream int32 [P] (-1: not a target)
// combine:  partial sum bf16 [HIDDEN] | weight sums f32 [K]
constexpr int REC_SCALES = X_BYTES;
constexpr int REC_IDX = REC_SCALES + 4 * NUM_SCALES;
constexpr int REC_W = REC_IDX + 4 * K;
constexpr int REC_POS = REC_W + 4 * K;
constexpr int CREC_W = 2 * HIDDEN;
static_assert(REC_POS + 4 * P <= REC_BYTES && CREC_W + 4 * K <= REC_BYTES, "record geometry");
constexpr int X_INT4 = X_BYTES / 16;
constexpr int H_INT4 = 2 * HIDDEN / 16;

// ---- notify vector (rank (s, l) -> forwarder (d, l)), int32 ---------------------------------------
constexpr int V_BAD = 0;                       // the sender's input was bad
constexpr int V_WORST = 1;                     // the sender's num_worst_tokens
constexpr int V_CNT = 2;                       // [P] rows for each rank of d
constexpr int V_CHAN = V_CNT + P;              // [P][C + 1] their channel prefix
constexpr int V_RCHAN = V_CHAN + P * (C + 1);  // [C + 1] channel prefix of the records for d
constexpr int V_EXP = V_RCHAN + C + 1;         // [P * E_LOCAL] selections of d's experts
constexpr int V_ROW = V_EXP + P * E_LOCAL;     // [R] rows for every rank (everyone learns every total)
constexpr int V_INTS = V_ROW + R;
static_assert(V_INTS <= VEC_STRIDE, "notify vector");

// ---- notify slot (forwarder (d, l) -> rank (d, m)), int32 -----------------------------------------
constexpr int S_BAD = 0;                       // first rank with bad input among column l (or R)
constexpr int S_CNT = 1;                       // [N] rows of (s, l) for m
constexpr int S_CHAN = S_CNT + N;              // [N][C + 1] their channel prefix
constexpr int S_EXP = S_CHAN + N * (C + 1);    // [E_LOCAL] selections of m's experts by column l
constexpr int S_TOT = S_EXP + E_LOCAL;         // [R] rows every rank gets from column l
constexpr int S_WORST = S_TOT + R;             // [N] num_worst_tokens of (s, l)
constexpr int S_FCOMB = S_WORST + N;           // [N] where m's combine rows of (s, l) go at the forwarder
constexpr int S_INTS = S_FCOMB + N;
static_assert(S_INTS <= SLOT_STRIDE, "notify slot");

__device__ __forceinline__ int column_pe(int dom, int l) { return dom * P + l; }

// Symmetric buffer.
__device__ __forceinline__ u64* r_u64(char* sym, int off, int i) { return reinterpret_cast<u64*>(sym + off) + i; }
__device__ __forceinline__ int* r_vec(char* sym, int off, int d) {
    return reinterpret_cast<int*>(sym + off) + (i64)d * VEC_STRIDE;
}
__device__ __forceinline__ char* r_record(char* sym, bool staged, int dom, int pos) {
    return sym + R_OFF_DATA + ((i64)((staged ? N : 0) + dom) * CAP + pos) * REC_BYTES;
}

// NVLink buffer.
__device__ __forceinline__ u64* n_dtail(char* nvl, int c, int q) {
    return reinterpret_cast<u64*>(nvl + OFF_DTAIL) + c * R + q;
}
__device__ __forceinline__ u64* n_ctail(char* nvl, int c, int s, int m) {
    return reinterpret_cast<u64*>(nvl + OFF_CTAIL) + (c * N + s) * P + m;
}
__device__ __forceinline__ int* n_slot(char* nvl, int l) { return reinterpret_cast<int*>(nvl + OFF_SLOT) + l * SLOT_STRIDE; }
__device__ __forceinline__ int* n_fwd(char* nvl, int m) { return reinterpret_cast<int*>(nvl + OFF_FWD) + m * N; }
__device__ __forceinline__ int4v* n_row(char* nvl, int row) {
    return reinterpret_cast<int4v*>(nvl + OFF_NX + (i64)row * 2 * HIDDEN);
}
__device__ __forceinline__ float* n_scales(char* nvl, int row) {
    return reinterpret_cast<float*>(nvl + OFF_NS) + (i64)row * NUM_SCALES;
}
__device__ __forceinline__ i64* n_idx(char* nvl, int row) { return reinterpret_cast<i64*>(nvl + OFF_NI) + (i64)row * K; }
__device__ __forceinline__ float* n_w(char* nvl, int row) { return reinterpret_cast<float*>(nvl + OFF_NW) + (i64)row * K; }

struct Peers {
    char* nvl[P];   // NVLink buffers of the domain, by local rank
    char* sym;      // this rank's symmetric buffer
};

__device__ __forceinline__ void load_peers(const u64* nvl_table, u64 sym, Peers& s_peers) {
    if (threadIdx.x < P) s_peers.nvl[threadIdx.x] = reinterpret_cast<char*>(nvl_table[threadIdx.x]);
    if (threadIdx.x == 0) s_peers.sym = reinterpret_cast<char*>(sym);
    __syncthreads();
}

__device__ __forceinline__ int read_epoch(const Peers& peers, int l) {
    return *reinterpret_cast<const volatile int*>(peers.nvl[l] + OFF_EPOCH);
}

// (source, row) pairs of channel c flattened in source order: the list index of source q's first row.
// s_list[R + 1] (shared) from per-source counts.
__device__ __forceinline__ int find_source(const int* s_list, int idx) {
    int lo = 0, hi = R;   // s_list[lo] <= idx < s_list[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (s_list[mid] <= idx) lo = mid; else hi = mid;
    }
    return lo;
}

// ---------------------------------------------------------------------------------------------
// Barriers: the domain (IPC, barrier.cuh) and the column (NVSHMEM signals). Block-wide; returns
// the new epoch, 0 on timeout, and in `*bad_rank` (where given) the first rank of any domain that
// cancelled its part of the call (R: none). cancel_self: this rank cancels its part (internode_barrier_cancelled):
// it marks the call in its domain peers' buffers before it arrives. After the domain barrier every
// rank of a domain knows its domain's first cancelled rank (the marks); its column word carries it
// to the same local rank of every domain, so after the column barrier every rank knows the first
// of all. The column words alternate by the epoch's parity: a column peer may signal epoch e + 1
// before this rank has read its word of epoch e, never e + 2 (that needs this rank's e + 1).
// ---------------------------------------------------------------------------------------------
constexpr int BAD_BITS = 16;
static_assert(R < (1 << BAD_BITS) - 1, "a rank + 1 fits below the epoch in a column word");

__device__ __forceinline__ u64* column_word(char* sym, int epoch, int dom) {
    return r_u64(sym, R_OFF_BARRIER, (epoch & 1) * MAX_RDMA_RANKS + dom);
}

__device__ __forceinline__ int full_barrier(const Peers& peers, int dom, int l, const WaitCtx& w,
                                            bool cancel_self = false, int* bad_rank = nullptr) {
    __shared__ int* s_arrivals[P];
    __shared__ int s_domain_bad, s_bad;
    if (threadIdx.x < P) {
        s_arrivals[threadIdx.x] = reinterpret_cast<int*>(peers.nvl[threadIdx.x] + OFF_ARRIVALS);
        if (cancel_self) {
            const int next = read_epoch(peers, l) + 1;   // the epoch group_barrier is about to start
            *cancel_mark(peers.nvl[threadIdx.x] + OFF_CANCELLED, next, l) = next;
        }
    }
    if (threadIdx.x == 0) {
        xport::quiet();   // every put this rank issued is delivered before its peers go on
        s_domain_bad = s_bad = R;
    }
    __syncthreads();
    const int epoch = group_barrier(s_arrivals, reinterpret_cast<int*>(peers.nvl[l] + OFF_ARRIVALS),
                                    reinterpret_cast<int*>(peers.nvl[l] + OFF_EPOCH), l, P, w);
    if (epoch == 0) return 0;
    if (threadIdx.x < P && *cancel_mark(peers.nvl[l] + OFF_CANCELLED, epoch, threadIdx.x) == epoch)
        atomicMin(&s_domain_bad, column_pe(dom, threadIdx.x));
    __syncthreads();
    const u64 base = (u64)epoch << BAD_BITS;
    const u64 word = base | (u64)(s_domain_bad < R ? s_domain_bad + 1 : 0);
    for (int d = threadIdx.x; d < N; d += blockDim.x)
        xport::signal_put(column_word(peers.sym, epoch, dom), word, column_pe(d, l));
    bool column_in = true;
    for (int d = threadIdx.x; d < N; d += blockDim.x) {
        u64 seen;
        if (!xport::wait_signal_geq(column_word(peers.sym, epoch, d), base, &seen, w, column_pe(d, l))) {
            column_in = false;
            continue;
        }
        const int bad_plus_one = (int)(seen & ((1u << BAD_BITS) - 1));
        if (bad_plus_one) atomicMin(&s_bad, bad_plus_one - 1);
    }
    if (__syncthreads_or(!column_in)) return 0;
    if (bad_rank) *bad_rank = s_bad;   // each domain's first, its own included (its column word came back)
    return epoch;
}

// The barrier kernel's part: full_barrier, and a call some rank cancelled recorded in OFF_CALL_BAD
// for the kernel that follows on this stream (cancelled_at_barrier). Block-wide.
__device__ __forceinline__ void call_barrier(const Peers& peers, int rank, const WaitCtx& w, bool cancel_self) {
    int bad_rank;
    const int epoch = full_barrier(peers, rank / P, rank % P, w, cancel_self, &bad_rank);
    if (epoch != 0 && bad_rank < R && threadIdx.x == 0) {
        volatile int* call_bad = reinterpret_cast<volatile int*>(peers.nvl[rank % P] + OFF_CALL_BAD);
        call_bad[0] = bad_rank;
        call_bad[1] = epoch;
    }
}

// In a cached dispatch or a combine, after the barrier kernel: whether it found the call of this
// epoch cancelled; then block 0 reports ST_PEER_BAD_INPUT naming the first cancelled rank, and the
// kernel must neither send nor receive (its outputs unspecified). The same in every thread.
__device__ __forceinline__ bool cancelled_at_barrier(const Peers& peers, int l, int epoch, int kernel, int rank,
                                                     StatusRecord* err) {
    const volatile int* call_bad = reinterpret_cast<const volatile int*>(peers.nvl[l] + OFF_CALL_BAD);
    if (call_bad[1] != epoch) return false;
    if (blockIdx.x == 0 && threadIdx.x == 0) record_error(err, ST_PEER_BAD_INPUT, kernel, rank, call_bad[0], 0);
    return true;
}

}  // namespace inter

using namespace inter;

#if !KERNEL_CANCEL   // the shape-free module holds the cancelled parts only
extern "C" __global__ void internode_barrier(const u64* nvl_table, u64 sym, int rank, StatusRecord* err,
                                             u64 timeout_ns, int kernel_id) {
    __shared__ Peers s_peers;
    load_peers(nvl_table, sym, s_peers);
    call_barrier(s_peers, rank, make_wait_ctx(err, timeout_ns, kernel_id, rank), false);
}
#endif

#if KERNEL_CANCEL
// ---------------------------------------------------------------------------------------------
// Cancelled notify (one block of any size; the shape-free module, loaded with the engine: its
// shape constants are placeholders, only the control offsets of R and P are read). This rank's
// part in a non-cached dispatch it does not make, because the host refused its arguments
// (refused = 1) or learned that a peer refused theirs (refused = 0). It reads no argument of the
// call and makes internode_notify's steps with zero rows, so that every wait of the peers' notify
// is met and the epochs and signals stay in step: the barriers; to every domain's forwarder a
// vector with V_BAD = refused; as forwarder, to every local rank a slot naming the first flagged
// rank of the column (S_BAD, as notify computes it); as receiver, zero bases to the forwarders.
// Vectors and slots are whole strides of zeros (every shape's fields lie within them). The peers'
// notify cancels the call, so their dispatch sends nothing. Nothing is written for this rank's
// host (its call raises without waiting).
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void internode_notify_cancelled(const u64* nvl_table, u64 sym, int rank, int refused,
                                                      StatusRecord* err, u64 timeout_ns) {
    __shared__ Peers s_peers;
    __shared__ int s_bad_rank;
    const int tid = threadIdx.x, warp = tid >> 5, num_warps = blockDim.x >> 5;
    const int dom = rank / P, l = rank % P;
    load_peers(nvl_table, sym, s_peers);
    char* const me_sym = s_peers.sym;
    char* const me_nvl = s_peers.nvl[l];
    const WaitCtx w = make_wait_ctx(err, timeout_ns, KID_INTERNODE_NOTIFY, rank);
    if (tid == 0) s_bad_rank = R;
    const int epoch = full_barrier(s_peers, dom, l, w);
    if (epoch == 0) return;
    for (int i = tid; i < N * VEC_STRIDE; i += blockDim.x)
        r_vec(me_sym, R_OFF_VEC_SEND, i / VEC_STRIDE)[i % VEC_STRIDE] = i % VEC_STRIDE == V_BAD ? refused : 0;
    __syncthreads();
    for (int d = warp; d < N; d += num_warps)
        xport::put_signal_warp(r_vec(me_sym, R_OFF_VEC_RECV, dom), r_vec(me_sym, R_OFF_VEC_SEND, d), VEC_STRIDE * 4,
                               r_u64(me_sym, R_OFF_VEC_SIG, dom), (u64)epoch, column_pe(d, l));
    bool vectors_in = true;
    for (int s = tid; s < N; s += blockDim.x) {
        u64 seen;
        vectors_in &= xport::wait_signal_geq(r_u64(me_sym, R_OFF_VEC_SIG, s), (u64)epoch, &seen, w, column_pe(s, l));
        if (vectors_in && r_vec(me_sym, R_OFF_VEC_RECV, s)[V_BAD]) atomicMin(&s_bad_rank, column_pe(s, l));
    }
    if (__syncthreads_or(!vectors_in)) return;
    for (int i = tid; i < P * SLOT_STRIDE; i += blockDim.x)
        n_slot(s_peers.nvl[i / SLOT_STRIDE], l)[i % SLOT_STRIDE] = i % SLOT_STRIDE == S_BAD ? s_bad_rank : 0;
    if (!signal_peers_and_wait(s_peers.nvl, me_nvl, OFF_SLOT_FLAGS, l, P, epoch, w, dom * P)) return;
    for (int i = tid; i < P * N; i += blockDim.x) n_fwd(s_peers.nvl[i / N], l)[i % N] = 0;
    signal_peers_and_wait(s_peers.nvl, me_nvl, OFF_FWD_FLAGS, l, P, epoch, w, dom * P);
}

// ---------------------------------------------------------------------------------------------
// Cancelled barrier (one block of any size; the shape-free module): this rank's part in a cached
// dispatch or a combine it does not make. refused = 1: its arguments were refused on the host,
// and it marks the call cancelled in its domain peers' buffers before the barrier; refused = 0:
// it learned of a peer's refusal in a host step (a compile agreement) and only keeps the barriers
// in step. The peers' barrier finds the marks (full_barrier) and their kernel only reports
// (cancelled_at_barrier). kernel_id: the call's kernel, for a timeout's report.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void internode_barrier_cancelled(const u64* nvl_table, u64 sym, int rank, int refused,
                                                       StatusRecord* err, u64 timeout_ns, int kernel_id) {
    __shared__ Peers s_peers;
    load_peers(nvl_table, sym, s_peers);
    call_barrier(s_peers, rank, make_wait_ctx(err, timeout_ns, kernel_id, rank), refused != 0);
}
#endif

#if KERNEL_NOTIFY

// Per channel, per destination rank and per destination domain: the prefix over channels of this
// rank's rows (send_chan [R][C + 1], rdma_chan [N][C + 1], global memory). One warp per channel.
__device__ __forceinline__ void count_channels(int num_tokens, const u8* __restrict__ in_rank,
                                               int* __restrict__ send_chan, int* __restrict__ rdma_chan) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int c = warp; c < C; c += NW) {
        const int tb = channel_begin(num_tokens, c), te = channel_begin(num_tokens, c + 1);
        for (int r0 = 0; r0 < R; r0 += 32) {
            const int r = r0 + lane;
            int count = 0;
            for (int t = tb; t < te; ++t) count += (r < R && in_rank[(i64)t * R + r]) ? 1 : 0;
            if (r < R) send_chan[r * (C + 1) + c + 1] = count;
        }
        for (int d0 = 0; d0 < N; d0 += 32) {
            const int d = d0 + lane;
            int count = 0;
            if (d < N)
                for (int t = tb; t < te; ++t) {
                    bool any = false;
                    for (int m = 0; m < P; ++m) any |= in_rank[(i64)t * R + d * P + m] != 0;
                    count += any ? 1 : 0;
                }
            if (d < N) rdma_chan[d * (C + 1) + c + 1] = count;
        }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < R + N; r += NT) {
        int* row = r < R ? send_chan + r * (C + 1) : rdma_chan + (r - R) * (C + 1);
        row[0] = 0;
        for (int c = 0; c < C; ++c) row[c + 1] += row[c];
    }
    __syncthreads();
}

// The checks the reference backend makes on the host; reports the first problem; true in a
// thread that found one.
__device__ __forceinline__ bool routing_is_bad(int rank, int num_tokens, const i64* __restrict__ topk_idx,
                                               const u8* __restrict__ in_rank, const int* __restrict__ per_rank,
                                               const int* __restrict__ per_rdma_rank,
                                               const int* __restrict__ per_expert, const int* __restrict__ send_chan,
                                               const int* __restrict__ rdma_chan, StatusRecord* err) {
    bool bad = false;
    for (int r = threadIdx.x; r < R; r += NT)
        if (send_chan[r * (C + 1) + C] != per_rank[r]) {
            record_error(err, ST_BAD_LAYOUT, KID_INTERNODE_NOTIFY, rank, -1, 0, r);
            bad = true;
        }
    if (per_rdma_rank != nullptr)
        for (int d = threadIdx.x; d < N; d += NT)
            if (rdma_chan[d * (C + 1) + C] != per_rdma_rank[d]) {
                record_error(err, ST_BAD_LAYOUT, KID_INTERNODE_NOTIFY, rank, -1, 3, d);
                bad = true;
            }
    return topk_disagrees(KID_INTERNODE_NOTIFY, rank, num_tokens, topk_idx, in_rank, per_expert, err) || bad;
}

// ---------------------------------------------------------------------------------------------
// Notify (one block). 1) barriers of the domain and of the column; 2) this rank's rows per
// (rank, channel) and (domain, channel), and the routing checks; 3) a vector of counts to each
// domain's forwarder (NVSHMEM); 4) as forwarder: the columns' counts to each local rank (NVLink);
// 5) as receiver: where each source's rows start; their bases back to the forwarders; 6) as
// forwarder: those bases. Bad input on any rank cancels the call on every rank.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1)
internode_notify(const u64* nvl_table, u64 sym, int rank, int num_tokens, const int* __restrict__ per_rank,
                 const int* __restrict__ per_rdma_rank, const int* __restrict__ per_expert,
                 const u8* __restrict__ in_rank, const i64* __restrict__ topk_idx, int expert_alignment,
                 int num_worst_tokens,
                 int* __restrict__ send_chan, int* __restrict__ rdma_chan,          // as sender
                 int* __restrict__ rank_prefix, int* __restrict__ recv_chan,        // as receiver
                 int* __restrict__ comb_base,
                 int* __restrict__ fwd_rchan, int* __restrict__ fwd_chan,           // as forwarder
                 int* __restrict__ fwd_comb, int* __restrict__ fwd_base,
                 int* __restrict__ call_status, volatile int* host_out, StatusRecord* err, u64 timeout_ns,
                 int ready_value) {
    __shared__ Peers s_peers;
    __shared__ int s_bad_rank, s_over_rank;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int dom = rank / P, l = rank % P;
    if (tid == 0) *call_status = 1;   // until this notify completes: a dispatch after a failed notify sends nothing
    load_peers(nvl_table, sym, s_peers);
    char* const me_sym = s_peers.sym;
    char* const me_nvl = s_peers.nvl[l];
    const WaitCtx w = make_wait_ctx(err, timeout_ns, KID_INTERNODE_NOTIFY, rank);
    if (tid == 0) {
        s_bad_rank = R;
        s_over_rank = R;
    }
    const int epoch = full_barrier(s_peers, dom, l, w);
    if (epoch == 0) return;

    // 2) counts and checks
    count_channels(num_tokens, in_rank, send_chan, rdma_chan);
    // one answer for the block: a report landing between two threads' reads must not split it
    const bool bad = __syncthreads_or(routing_is_bad(rank, num_tokens, topk_idx, in_rank, per_rank, per_rdma_rank,
                                                     per_expert, send_chan, rdma_chan, err) || bad_input_pending(err));

    // 3) one vector per destination domain, staged in the symmetric buffer and put to its forwarder
    for (int d = 0; d < N; ++d) {
        int* v = r_vec(me_sym, R_OFF_VEC_SEND, d);
        for (int i = tid; i < P * (C + 1); i += NT) v[V_CHAN + i] = send_chan[d * P * (C + 1) + i];
        for (int i = tid; i < P; i += NT) v[V_CNT + i] = send_chan[(d * P + i) * (C + 1) + C];
        for (int i = tid; i <= C; i += NT) v[V_RCHAN + i] = rdma_chan[d * (C + 1) + i];
        for (int i = tid; i < P * E_LOCAL; i += NT) v[V_EXP + i] = per_expert[d * P * E_LOCAL + i];
        for (int i = tid; i < R; i += NT) v[V_ROW + i] = send_chan[i * (C + 1) + C];
        if (tid == 0) {
            v[V_BAD] = bad ? 1 : 0;
            v[V_WORST] = num_worst_tokens;
        }
    }
    __syncthreads();
    for (int d = warp; d < N; d += NW)
        xport::put_signal_warp(r_vec(me_sym, R_OFF_VEC_RECV, dom), r_vec(me_sym, R_OFF_VEC_SEND, d), V_INTS * 4,
                               r_u64(me_sym, R_OFF_VEC_SIG, dom), (u64)epoch, column_pe(d, l));
    bool vectors_in = true;
    for (int s = tid; s < N; s += NT) {
        u64 seen;
        vectors_in &= xport::wait_signal_geq(r_u64(me_sym, R_OFF_VEC_SIG, s), (u64)epoch, &seen, w, column_pe(s, l));
    }
    if (__syncthreads_or(!vectors_in)) return;

    // 4) as forwarder of column l in this domain: what each local rank m gets from the column
    for (int i = tid; i < N * (C + 1); i += NT) fwd_rchan[i] = r_vec(me_sym, R_OFF_VEC_RECV, i / (C + 1))[V_RCHAN + i % (C + 1)];
    for (int i = tid; i < N * P * (C + 1); i += NT) {
        const int s = i / (P * (C + 1)), rest = i % (P * (C + 1));
        fwd_chan[i] = r_vec(me_sym, R_OFF_VEC_RECV, s)[V_CHAN + rest];
    }
    if (tid < N && r_vec(me_sym, R_OFF_VEC_RECV, tid)[V_BAD]) atomicMin(&s_bad_rank, column_pe(tid, l));
    __syncthreads();
    for (int m = warp; m < P; m += NW) {
        // combine rows of (s, l) for m go to rows [fwd_comb[s][m], ...) of this forwarder's buffer:
        // grouped by m, then by s
        int base = 0;
        for (int m2 = 0; m2 < m; ++m2)
            for (int s = 0; s < N; ++s) base += r_vec(me_sym, R_OFF_VEC_RECV, s)[V_CNT + m2];
        int* slot = n_slot(s_peers.nvl[m], l);
        for (int s = lane; s < N; s += 32) {
            int before = 0;
            for (int s2 = 0; s2 < s; ++s2) before += r_vec(me_sym, R_OFF_VEC_RECV, s2)[V_CNT + m];
            const int* v = r_vec(me_sym, R_OFF_VEC_RECV, s);
            fwd_comb[s * P + m] = base + before;
            slot[S_FCOMB + s] = base + before;
            slot[S_CNT + s] = v[V_CNT + m];
            slot[S_WORST + s] = v[V_WORST];
        }
        for (int i = lane; i < N * (C + 1); i += 32)
            slot[S_CHAN + i] = r_vec(me_sym, R_OFF_VEC_RECV, i / (C + 1))[V_CHAN + m * (C + 1) + i % (C + 1)];
        for (int j = lane; j < E_LOCAL; j += 32) {
            int sum = 0;
            for (int s = 0; s < N; ++s) sum += r_vec(me_sym, R_OFF_VEC_RECV, s)[V_EXP + m * E_LOCAL + j];
            slot[S_EXP + j] = sum;
        }
        for (int r = lane; r < R; r += 32) {
            int sum = 0;
            for (int s = 0; s < N; ++s) sum += r_vec(me_sym, R_OFF_VEC_RECV, s)[V_ROW + r];
            slot[S_TOT + r] = sum;
        }
        if (lane == 0) slot[S_BAD] = s_bad_rank;
    }
    if (tid == 0) {   // the rows the local ranks will send back through this forwarder in combine
        int total = 0;
        for (int s = 0; s < N; ++s)
            for (int m = 0; m < P; ++m) total += r_vec(me_sym, R_OFF_VEC_RECV, s)[V_CNT + m];
        if (total > NVL_ROWS) record_error(err, ST_OVERFLOW, KID_INTERNODE_NOTIFY, rank, -1, total, NVL_ROWS);
    }
    if (!signal_peers_and_wait(s_peers.nvl, me_nvl, OFF_SLOT_FLAGS, l, P, epoch, w, dom * P)) return;

    // 5) as receiver: sources q = (s, l') in rank order; their rows come through forwarder l'
    if (tid == 0) {
        int total = 0;
        for (int q = 0; q < R; ++q) {
            rank_prefix[q] = total;
            total += n_slot(me_nvl, q % P)[S_CNT + q / P];
        }
        rank_prefix[R] = total;
        for (int lp = 0; lp < P; ++lp) s_bad_rank = min(s_bad_rank, n_slot(me_nvl, lp)[S_BAD]);
    }
    for (int r = tid; r < R; r += NT) {
        int total = 0;
        for (int lp = 0; lp < P; ++lp) total += n_slot(me_nvl, lp)[S_TOT + r];
        const int allowed = n_slot(me_nvl, r % P)[S_WORST + r / P];
        if (allowed > 0 && total > allowed) atomicMin(&s_over_rank, r);
    }
    __syncthreads();
    for (int i = tid; i < R * (C + 1); i += NT) {
        const int q = i / (C + 1), c = i % (C + 1);
        recv_chan[i] = n_slot(me_nvl, q % P)[S_CHAN + (q / P) * (C + 1) + c];
    }
    for (int q = tid; q < R; q += NT) comb_base[q] = n_slot(me_nvl, q % P)[S_FCOMB + q / P] - rank_prefix[q];
    for (int j = tid; j < E_LOCAL; j += NT) {
        int sum = 0;
        for (int lp = 0; lp < P; ++lp) sum += n_slot(me_nvl, lp)[S_EXP + j];
        host_out[HOST_EXPERT + j] = (sum + expert_alignment - 1) / expert_alignment * expert_alignment;
    }
    for (int i = tid; i < P * N; i += NT) {   // to forwarder l' = i / N: where rows of (s, l') start here
        const int lp = i / N, s = i % N;
        n_fwd(s_peers.nvl[lp], l)[s] = rank_prefix[s * P + lp];
    }
    if (!signal_peers_and_wait(s_peers.nvl, me_nvl, OFF_FWD_FLAGS, l, P, epoch, w, dom * P)) return;

    // 6) as forwarder: where the rows of (s, l) start at each local rank m
    for (int i = tid; i < N * P; i += NT) fwd_base[i] = n_fwd(me_nvl, i % P)[i / P];   // [s][m]
    __syncthreads();
    if (tid == 0) {
        const int rows = rank_prefix[R];
        int over_total = 0, over_allowed = 0;
        if (s_over_rank < R) {
            for (int lp = 0; lp < P; ++lp) over_total += n_slot(me_nvl, lp)[S_TOT + s_over_rank];
            over_allowed = n_slot(me_nvl, s_over_rank % P)[S_WORST + s_over_rank / P];
        } else if (s_bad_rank == R && rows > NVL_ROWS) {
            record_error(err, ST_OVERFLOW, KID_INTERNODE_NOTIFY, rank, -1, rows, NVL_ROWS);
        }
        publish_notify_outcome(KID_INTERNODE_NOTIFY, rank, rows, s_bad_rank, s_over_rank, over_total, over_allowed,
                               num_worst_tokens, call_status, host_out, err, ready_value);
    }
}
#endif

#if KERNEL_DISPATCH
// ---------------------------------------------------------------------------------------------
// Dispatch sender (block c): this rank's tokens of channel c, CHUNK at a time (one per warp).
// Each token becomes one record per destination domain, staged in the symmetric buffer at its
// position in the (rank -> domain) stream, and each chunk goes to the domain's forwarder with
// one put + signal.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void dispatch_sender(int c, int rank, int epoch, int num_tokens, const Peers& peers,
                                                const int4v* __restrict__ x, const float* __restrict__ x_scales,
                                                const i64* __restrict__ topk_idx,
                                                const float* __restrict__ topk_weights, const u8* __restrict__ in_rank,
                                                const int* __restrict__ send_chan, const int* __restrict__ rdma_chan,
                                                int* __restrict__ send_rdma_pos) {
    __shared__ u8 s_bits[CHUNK][R];        // token of warp w goes to rank r
    __shared__ u8 s_dbits[CHUNK][N];       // ... to domain d
    __shared__ int s_rank_sent[R], s_dom_sent[N], s_dom_before[N];
    __shared__ int s_dest[CHUNK][N];       // record position per destination domain, or -1
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int dom = rank / P, l = rank % P;
    const int tb = channel_begin(num_tokens, c), te = channel_begin(num_tokens, c + 1);
    for (int i = tid; i < R; i += NT) s_rank_sent[i] = 0;
    for (int i = tid; i < N; i += NT) s_dom_sent[i] = 0;
    __syncthreads();

    for (int batch = tb; batch < te; batch += CHUNK) {
        const int t = batch + warp;
        const bool valid = warp < CHUNK && t < te;
        if (warp < CHUNK) {
            for (int r = lane; r < R; r += 32) s_bits[warp][r] = valid ? in_rank[(i64)t * R + r] : 0;
            __syncwarp();
            for (int d = lane; d < N; d += 32) {
                u8 any = 0;
                for (int m = 0; m < P; ++m) any |= s_bits[warp][d * P + m];
                s_dbits[warp][d] = any;
            }
        }
        __syncthreads();
        if (valid) {
            // positions: in each destination domain's record stream, and in each target rank's row stream
            for (int d = lane; d < N; d += 32) {
                int pos = -1;
                if (s_dbits[warp][d]) {
                    int before = 0;
                    for (int w2 = 0; w2 < warp; ++w2) before += s_dbits[w2][d];
                    pos = rdma_chan[d * (C + 1) + c] + s_dom_sent[d] + before;
                }
                s_dest[warp][d] = pos;
                send_rdma_pos[(i64)t * N + d] = pos;
            }
            __syncwarp();
            for (int d = 0; d < N; ++d) {
                const int rp = s_dest[warp][d];
                if (rp < 0) continue;
                char* rec = r_record(peers.sym, true, d, rp);
                if (lane < P) {
                    const int r = d * P + lane;
                    int pos = -1;
                    if (s_bits[warp][r]) {
                        int before = 0;
                        for (int w2 = 0; w2 < warp; ++w2) before += s_bits[w2][r];
                        pos = send_chan[r * (C + 1) + c] + s_rank_sent[r] + before;
                    }
                    reinterpret_cast<int*>(rec + REC_POS)[lane] = pos;
                }
#if TOPK > 0
                if (lane < K && topk_idx != nullptr) {   // null: a cached dispatch (no top-k)
                    reinterpret_cast<int*>(rec + REC_IDX)[lane] = (int)topk_idx[(i64)t * K + lane];
                    reinterpret_cast<float*>(rec + REC_W)[lane] = topk_weights[(i64)t * K + lane];
                }
#endif
#if NUM_SCALES > 0
                for (int i = lane; i < NUM_SCALES; i += 32)
                    reinterpret_cast<float*>(rec + REC_SCALES)[i] = x_scales[(i64)t * NUM_SCALES + i];
#endif
            }
            // the row: each 16-byte chunk loaded once, stored into every destination's record
            const int4v* src = x + (i64)t * X_INT4;
            for (int i = lane; i < X_INT4; i += 32) {
                const int4v v = ld_nc_v4(src + i);
                for (int d = 0; d < N; ++d) {
                    const int rp = s_dest[warp][d];
                    if (rp >= 0) st_v4(reinterpret_cast<int4v*>(r_record(peers.sym, true, d, rp)) + i, v);
                }
            }
        }
        __syncthreads();
        for (int r = tid; r < R; r += NT) {
            int added = 0;
            for (int w2 = 0; w2 < CHUNK; ++w2) added += s_bits[w2][r];
            s_rank_sent[r] += added;
        }
        for (int d = tid; d < N; d += NT) {
            int added = 0;
            for (int w2 = 0; w2 < CHUNK; ++w2) added += s_dbits[w2][d];
            s_dom_before[d] = s_dom_sent[d];
            s_dom_sent[d] += added;
        }
        __syncthreads();
        // this chunk's new records of domain d, to its forwarder (d, l): one warp per domain
        for (int d = warp; d < N; d += NW) {
            const int from = s_dom_before[d], to = s_dom_sent[d];
            if (to == from) continue;
            const int rp = rdma_chan[d * (C + 1) + c] + from;
            xport::put_signal_warp(r_record(peers.sym, false, dom, rp), r_record(peers.sym, true, d, rp),
                                   (size_t)(to - from) * REC_BYTES, r_u64(peers.sym, R_OFF_DTAIL, c * MAX_RDMA_RANKS + dom),
                                   tagged(epoch, to), column_pe(d, l));
        }
        chaos_pause();
    }
    __syncthreads();
    if (tid == 0) xport::quiet();
}

// ---------------------------------------------------------------------------------------------
// Dispatch forwarder (block c): records of channel c from every source domain, as they arrive,
// copied into the NVLink buffers of their target ranks at their rows (the targets' recv_x rows),
// then the targets' tails for (channel, source rank).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ bool dispatch_forwarder(int c, int rank, int epoch, const Peers& peers, const WaitCtx& w,
                                                   const int* __restrict__ fwd_rchan, const int* __restrict__ fwd_base,
                                                   int* __restrict__ fwd_pos) {
    __shared__ int s_done[N], s_sent[N][P];
    __shared__ int s_src, s_from, s_to, s_ok;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int l = rank % P;
    for (int i = tid; i < N; i += NT) s_done[i] = 0;
    for (int i = tid; i < N * P; i += NT) s_sent[i / P][i % P] = 0;
    if (tid == 0) s_ok = 1;
    __syncthreads();
    int next = 0;   // round-robin start over source domains
    while (true) {
        if (tid == 0) {
            unsigned spins = 0;
            int pending = -1;
            s_src = -1;
            while (s_src < 0) {
                pending = -1;
                for (int k = 0; k < N && s_src < 0; ++k) {
                    const int s = (next + k) % N;
                    const int n = fwd_rchan[s * (C + 1) + c + 1] - fwd_rchan[s * (C + 1) + c];
                    if (s_done[s] >= n) continue;
                    pending = s;
                    const u64 seen = xport::signal_read(r_u64(peers.sym, R_OFF_DTAIL, c * MAX_RDMA_RANKS + s));
                    const int arrived = seen >= tagged(epoch, 0) ? (int)(u32)seen : 0;
                    if (arrived > s_done[s]) {
                        xport::signal_acquire();
                        s_src = s;
                        s_from = s_done[s];
                        s_to = min(arrived, s_from + NW);
                    }
                }
                if (pending < 0) break;   // every source domain done
                if (s_src < 0 && !keep_waiting(w, spins, column_pe(pending, l), s_done[pending])) {
                    s_ok = 0;
                    break;
                }
            }
        }
        __syncthreads();
        if (!s_ok) return false;
        const int s = s_src;
        if (s < 0) return true;
        next = s + 1;
        const int k = s_from + warp;
        if (k < s_to) {
            const int rp = fwd_rchan[s * (C + 1) + c] + k;
            const char* rec = r_record(peers.sym, false, s, rp);
            const int pos = lane < P ? ld_cg_i32(rec + REC_POS + 4 * lane) : -1;
            if (lane < P) {
                fwd_pos[((i64)s * CAP + rp) * P + lane] = pos;
                if (pos >= 0) atomicAdd(&s_sent[s][lane], 1);
            }
            for (int m = 0; m < P; ++m) {
                const int pos_m = __shfl_sync(FULL, pos, m);
                if (pos_m < 0) continue;
                const int row = fwd_base[s * P + m] + pos_m;
                if (row >= NVL_ROWS) continue;   // reported by notify (ST_OVERFLOW)
                char* nvl = peers.nvl[m];
                const int4v* src = reinterpret_cast<const int4v*>(rec);
                int4v* dst = n_row(nvl, row);
                for (int i = lane; i < X_INT4; i += 32) st_v4(dst + i, ld_cg_v4(src + i));
#if NUM_SCALES > 0
                for (int i = lane; i < NUM_SCALES; i += 32)
                    n_scales(nvl, row)[i] = __int_as_float(ld_cg_i32(rec + REC_SCALES + 4 * i));
#endif
#if TOPK > 0
                if (lane < K) {
                    const int e = ld_cg_i32(rec + REC_IDX + 4 * lane);
                    const int first = (rank - l + m) * E_LOCAL;   // m's first expert (same domain)
                    const bool local = e >= first && e < first + E_LOCAL;
                    n_idx(nvl, row)[lane] = local ? (i64)(e - first) : (i64)-1;
                    n_w(nvl, row)[lane] = local ? __int_as_float(ld_cg_i32(rec + REC_W + 4 * lane)) : 0.0f;
                }
#endif
            }
        }
        __syncthreads();
        if (tid < P) {
            const int q = s * P + l;
            fence_sys();
            chaos_pause();
            st_release_sys_u64(n_dtail(peers.nvl[tid], c, q), tagged(epoch, s_sent[s][tid]));
        }
        if (tid == 0) s_done[s] = s_to;
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch receiver (block c): the rows of channel c of every source rank, copied from this
// rank's NVLink buffer (a mirror of recv_x) to the outputs as the forwarders' tails advance.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ bool dispatch_receiver(int c, const Peers& peers, int epoch, const WaitCtx& w, int l,
                                                  const int* __restrict__ rank_prefix,
                                                  const int* __restrict__ recv_chan, const RecvOut& out,
                                                  int fill_padding) {
    __shared__ int s_list[R + 1];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    char* me = peers.nvl[l];
    if (tid == 0) {
        s_list[0] = 0;
        for (int q = 0; q < R; ++q) s_list[q + 1] = s_list[q] + recv_chan[q * (C + 1) + c + 1] - recv_chan[q * (C + 1) + c];
    }
    __syncthreads();
#if TOPK > 0
    if (fill_padding && out.topk_idx != nullptr)   // worst-token mode: rows past those received get no expert
        for (int row = rank_prefix[R] + c * NT + tid; row < out.rows; row += C * NT)
            for (int k = 0; k < K; ++k) {
                out.topk_idx[(i64)row * K + k] = -1;
                out.topk_weights[(i64)row * K + k] = 0.0f;
            }
#endif
    const int limit = min(out.rows, NVL_ROWS);
    int cur_q = -1, arrived = 0;
    for (int idx = warp; idx < s_list[R]; idx += NW) {
        const int q = find_source(s_list, idx);
        const int i = idx - s_list[q];
        if (q != cur_q) {
            cur_q = q;
            arrived = 0;
        }
        if (arrived <= i) {
            u64 seen = 0;
            bool ok = true;
            if (lane == 0) ok = wait_geq_sys_u64(n_dtail(me, c, q), tagged(epoch, i + 1), &seen, w, q);
            if (!__shfl_sync(FULL, ok, 0)) return false;
            arrived = (int)(u32)__shfl_sync(FULL, (u32)seen, 0);
        }
        const int row = rank_prefix[q] + recv_chan[q * (C + 1) + c] + i;
        if (row >= limit) continue;
        const int4v* src = n_row(me, row);
        int4v* dst = out.x + (i64)row * X_INT4;
        for (int j = lane; j < X_INT4; j += 32) dst[j] = ld_cg_v4(src + j);
#if NUM_SCALES > 0
        for (int j = lane; j < NUM_SCALES; j += 32)
            out.scales[(i64)row * NUM_SCALES + j] = __int_as_float(ld_cg_i32(n_scales(me, row) + j));
#endif
#if TOPK > 0
        if (lane < K && out.topk_idx != nullptr) {
            out.topk_idx[(i64)row * K + lane] = ld_cg_i64(n_idx(me, row) + lane);
            out.topk_weights[(i64)row * K + lane] = __int_as_float(ld_cg_i32(n_w(me, row) + lane));
        }
#endif
    }
    return true;
}

// ---------------------------------------------------------------------------------------------
// Dispatch: blocks [0, C) send, [C, 2C) forward, [2C, 3C) receive. Needs notify (or, cached,
// the barrier kernel) just before on this stream. A call notify or the barrier cancelled does nothing.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1)
internode_dispatch(const u64* nvl_table, u64 sym, int rank, int num_tokens, const int4v* __restrict__ x,
                   const float* __restrict__ x_scales, const i64* __restrict__ topk_idx,
                   const float* __restrict__ topk_weights, const u8* __restrict__ in_rank,
                   const int* __restrict__ send_chan, const int* __restrict__ rdma_chan, int* __restrict__ send_rdma_pos,
                   const int* __restrict__ rank_prefix, const int* __restrict__ recv_chan,
                   const int* __restrict__ fwd_rchan, const int* __restrict__ fwd_base, int* __restrict__ fwd_pos,
                   const int* __restrict__ call_status, int4v* __restrict__ recv_x, float* __restrict__ recv_scales,
                   i64* __restrict__ recv_topk_idx, float* __restrict__ recv_topk_weights, int num_out_rows,
                   int fill_padding, const volatile u64* out_desc, u64 desc_seq, StatusRecord* err, u64 timeout_ns) {
    __shared__ Peers s_peers;
    if (*call_status != 0) return;
    load_peers(nvl_table, sym, s_peers);
    const int l = rank % P;
    const int epoch = read_epoch(s_peers, l);
    if (cancelled_at_barrier(s_peers, l, epoch, KID_INTERNODE_DISPATCH, rank, err)) return;
    const int role = blockIdx.x / C, c = blockIdx.x % C;
    const WaitCtx w = make_wait_ctx(err, timeout_ns, KID_INTERNODE_DISPATCH, rank, c);
    if (role == 0) {
        dispatch_sender(c, rank, epoch, num_tokens, s_peers, x, x_scales, topk_idx, topk_weights, in_rank, send_chan,
                        rdma_chan, send_rdma_pos);
    } else if (role == 1) {
        dispatch_forwarder(c, rank, epoch, s_peers, w, fwd_rchan, fwd_base, fwd_pos);
    } else {
        RecvOut out = {recv_x, recv_scales, recv_topk_idx, recv_topk_weights, num_out_rows};
        if (!receive_outputs(out, out_desc, desc_seq, w)) return;
        dispatch_receiver(c, s_peers, epoch, w, l, rank_prefix, recv_chan, out, fill_padding);
    }
}
#endif

#if KERNEL_COMBINE
// ---------------------------------------------------------------------------------------------
// Combine sender (block c, on every rank): the rows it received in channel c, back to their
// forwarder's NVLink buffer (rows grouped by target, then source domain), CHUNK rows per warp
// round; then the forwarder's tails for (channel, source domain, this rank).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void combine_sender(int c, int rank, int epoch, const Peers& peers,
                                               const int4v* __restrict__ x, int num_x_rows,
                                               const float* __restrict__ topk_weights,
                                               const int* __restrict__ rank_prefix, const int* __restrict__ recv_chan,
                                               const int* __restrict__ comb_base) {
    __shared__ int s_list[R + 1];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int m = rank % P;
    if (tid == 0) {
        s_list[0] = 0;
        for (int q = 0; q < R; ++q) s_list[q + 1] = s_list[q] + recv_chan[q * (C + 1) + c + 1] - recv_chan[q * (C + 1) + c];
    }
    __syncthreads();
    const int total = s_list[R];
    for (int b0 = 0; b0 < total; b0 += NW) {
        const int idx = b0 + warp;
        if (idx < total) {
            const int q = find_source(s_list, idx);
            const int i = recv_chan[q * (C + 1) + c] + idx - s_list[q];
            const int row = rank_prefix[q] + i;
            const int frow = comb_base[q] + row;
            if (row < num_x_rows && frow < NVL_ROWS) {
                char* nvl = peers.nvl[q % P];
                const int4v* src = x + (i64)row * H_INT4;
                int4v* dst = n_row(nvl, frow);
                for (int j = lane; j < H_INT4; j += 32) st_v4(dst + j, ld_nc_v4(src + j));
#if TOPK > 0
                if (lane < K && topk_weights != nullptr) n_w(nvl, frow)[lane] = topk_weights[(i64)row * K + lane];
#endif
            }
        }
        __syncthreads();
        // sources whose rows this round touched: their counts so far (a prefix of their rows)
        const int end = min(b0 + NW, total);
        for (int q = find_source(s_list, b0) + tid; q < R && s_list[q] < end; q += NT) {
            const int done = min(end, s_list[q + 1]) - s_list[q];
            fence_sys();
            chaos_pause();
            st_release_sys_u64(n_ctail(peers.nvl[q % P], c, q / P, m), tagged(epoch, done));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Combine forwarder (block c): per record of channel c, the rows its targets sent back, summed
// in float32 and rounded to bf16 once, staged, and put to the token's rank with its signal.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ bool combine_forwarder(int c, int rank, int epoch, const Peers& peers, const WaitCtx& w,
                                                  const int* __restrict__ fwd_rchan, const int* __restrict__ fwd_chan,
                                                  const int* __restrict__ fwd_comb, const int* __restrict__ fwd_pos) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int dom = rank / P, l = rank % P;
    char* me = peers.nvl[l];
    for (int s = 0; s < N; ++s) {
        const int start = fwd_rchan[s * (C + 1) + c], n = fwd_rchan[s * (C + 1) + c + 1] - start;
        for (int k0 = 0; k0 < n; k0 += NW) {
            const int k = k0 + warp;
            bool failed = false;
            if (k < n) {
                const int rp = start + k;
                const int pos = lane < P ? fwd_pos[((i64)s * CAP + rp) * P + lane] : -1;
                bool ok = true;
                if (pos >= 0) {   // lane m waits for m's rows of (s, l) in this channel up to this one
                    const int first = fwd_chan[(s * P + lane) * (C + 1) + c];
                    u64 seen;
                    ok = wait_geq_sys_u64(n_ctail(me, c, s, lane), tagged(epoch, pos - first + 1), &seen, w,
                                          dom * P + lane);
                }
                failed = __any_sync(FULL, !ok);
                if (!failed) {
                    char* rec = r_record(peers.sym, true, s, rp);
                    // Rows of this token at the forwarder, one per local rank (-1: none), shuffled
                    // out here with the whole warp: lanes leave the row loop below at different j.
                    int frows[P];
#pragma unroll
                    for (int m = 0; m < P; ++m) {
                        const int pos_m = __shfl_sync(FULL, pos, m);
                        const int frow = fwd_comb[s * P + m] + pos_m;
                        frows[m] = pos_m >= 0 && frow < NVL_ROWS ? frow : -1;
                    }
                    for (int j = lane; j < H_INT4; j += 32) {
                        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
                        for (int m = 0; m < P; ++m)
                            if (frows[m] >= 0) add_bf16x8(acc, ld_cg_v4(n_row(me, frows[m]) + j));
                        st_v4(reinterpret_cast<int4v*>(rec) + j, f32x8_to_bf16x8(acc));
                    }
#if TOPK > 0
                    float wsum = 0.0f;
#pragma unroll
                    for (int m = 0; m < P; ++m)
                        if (lane < K && frows[m] >= 0) wsum += __int_as_float(ld_cg_i32(n_w(me, frows[m]) + lane));
                    if (lane < K) reinterpret_cast<float*>(rec + CREC_W)[lane] = wsum;
#endif
                }
            }
            // one decision for the block (a flag in shared memory could change between the
            // reads of warp 0's lanes, splitting the warp before its warp-wide put)
            if (__syncthreads_or(failed)) return false;
            if (warp == 0) {
                const int to = min(k0 + NW, n);
                xport::put_signal_warp(r_record(peers.sym, false, dom, start + k0), r_record(peers.sym, true, s, start + k0),
                                       (size_t)(to - k0) * REC_BYTES,
                                       r_u64(peers.sym, R_OFF_CTAIL, c * MAX_RDMA_RANKS + dom), tagged(epoch, to),
                                       column_pe(s, l));
            }
            chaos_pause();
        }
    }
    __syncthreads();
    if (tid == 0) xport::quiet();
    return true;
}

// ---------------------------------------------------------------------------------------------
// Combine receiver (block c): each token of channel c of this rank: the partial sums of the
// domains it went to, plus the biases, summed in float32.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ bool combine_receiver(int c, int epoch, int num_tokens, const Peers& peers, const WaitCtx& w,
                                                 int l, const int* __restrict__ rdma_chan,
                                                 const int* __restrict__ send_rdma_pos, const int4v* __restrict__ bias0,
                                                 const int4v* __restrict__ bias1, int4v* __restrict__ combined_x,
                                                 float* __restrict__ combined_w, int num_w) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tb = channel_begin(num_tokens, c), te = channel_begin(num_tokens, c + 1);
    for (int t = tb + warp; t < te; t += NW) {
        // lane d waits for domain d's partial sum of t (lanes cover domains 32 at a time)
        bool ok = true;
        for (int d = lane; d < N; d += 32) {
            const int rp = send_rdma_pos[(i64)t * N + d];
            if (rp < 0) continue;
            u64 seen;
            ok &= xport::wait_signal_geq(r_u64(peers.sym, R_OFF_CTAIL, c * MAX_RDMA_RANKS + d),
                                         tagged(epoch, rp - rdma_chan[d * (C + 1) + c] + 1), &seen, w,
                                         column_pe(d, l));
        }
        if (__any_sync(FULL, !ok)) return false;
        for (int j = lane; j < H_INT4; j += 32) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (bias0 != nullptr) add_bf16x8(acc, ld_nc_v4(bias0 + (i64)t * H_INT4 + j));
            if (bias1 != nullptr) add_bf16x8(acc, ld_nc_v4(bias1 + (i64)t * H_INT4 + j));
            for (int d = 0; d < N; ++d) {
                const int rp = send_rdma_pos[(i64)t * N + d];
                if (rp >= 0) add_bf16x8(acc, ld_cg_v4(reinterpret_cast<const int4v*>(r_record(peers.sym, false, d, rp)) + j));
            }
            combined_x[(i64)t * H_INT4 + j] = f32x8_to_bf16x8(acc);
        }
        if (combined_w != nullptr && lane < num_w) {
            float sum = 0.0f;
            for (int d = 0; d < N; ++d) {
                const int rp = send_rdma_pos[(i64)t * N + d];
                if (rp >= 0) sum += __int_as_float(ld_cg_i32(r_record(peers.sym, false, d, rp) + CREC_W + 4 * lane));
            }
            combined_w[(i64)t * num_w + lane] = sum;
        }
    }
    return true;
}

// ---------------------------------------------------------------------------------------------
// Combine: blocks [0, C) send rows back, [C, 2C) forward sums, [2C, 3C) receive. Needs the
// barrier kernel just before on this stream. A call the barrier cancelled does nothing.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1)
internode_combine(const u64* nvl_table, u64 sym, int rank, int num_tokens, const int4v* __restrict__ x, int num_x_rows,
                  const float* __restrict__ topk_weights, const int* __restrict__ rank_prefix,
                  const int* __restrict__ recv_chan, const int* __restrict__ comb_base,
                  const int* __restrict__ fwd_rchan, const int* __restrict__ fwd_chan, const int* __restrict__ fwd_comb,
                  const int* __restrict__ fwd_pos, const int* __restrict__ rdma_chan,
                  const int* __restrict__ send_rdma_pos, const int4v* __restrict__ bias0,
                  const int4v* __restrict__ bias1, int4v* __restrict__ combined_x, float* __restrict__ combined_w,
                  StatusRecord* err, u64 timeout_ns) {
    __shared__ Peers s_peers;
    load_peers(nvl_table, sym, s_peers);
    const int l = rank % P;
    const int epoch = read_epoch(s_peers, l);
    if (cancelled_at_barrier(s_peers, l, epoch, KID_INTERNODE_COMBINE, rank, err)) return;
    const int role = blockIdx.x / C, c = blockIdx.x % C;
    const WaitCtx w = make_wait_ctx(err, timeout_ns, KID_INTERNODE_COMBINE, rank, c);
    if (role == 0) {
        combine_sender(c, rank, epoch, s_peers, x, num_x_rows, topk_weights, rank_prefix, recv_chan, comb_base);
    } else if (role == 1) {
        combine_forwarder(c, rank, epoch, s_peers, w, fwd_rchan, fwd_chan, fwd_comb, fwd_pos);
    } else {
        combine_receiver(c, epoch, num_tokens, s_peers, w, l, rdma_chan, send_rdma_pos, bias0, bias1, combined_x,
                         combined_w, K);
    }
}
#endif
