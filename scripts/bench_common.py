"""What the benchmarks in scripts/ share: timing, NCCL baseline, byte accounting, reports.

Not a public module: ``scripts/bench_intranode.py``, ``scripts/bench_internode.py`` and
``scripts/bench_low_latency.py`` import it from their own directory. Nothing here touches
cupy_ep's private attributes: the benches drive ``cupy_ep.Buffer`` and its ``profile()``.

The byte-accounting helpers are plain NumPy (no GPU, no MPI) so that they can be checked on
a CPU.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np

from cupy_ep.geometry import row_bytes   # the byte basis of every benchmark (pure Python)

# DeepEP v1 (567632d) measured on a 4 x H200 host with its own tests (2026-11-28): normal mode, 4096 tokens/rank, hidden 7168, top-8 of 256 experts, 24 SMs, kernel times.
DEEPEP_V1_H200_4RANKS = {
    "dispatch_fp8": {"GBps": 255.0, "us": 428.0},
    "dispatch_bf16": {"GBps": 262.0, "us": 810.0},
    "combine": {"GBps": 358.0, "us": 592.0},
    # whole Python call (CUDA events after an MPI barrier, medians), same host and workload
    "call_us": {"layout": 47.0, "dispatch_bf16": 870.0, "dispatch_bf16_cached": 857.0, "combine": 629.0},
    # low latency, 128 tokens, top-8 of 288, NVLink (kernel times)
    "ll_dispatch_us": (31.5, 36.8), "ll_combine_us": (56.0, 58.0), "ll_both_us": 94.7,
}
# DeepEP's published internode numbers (H800, CX7 400 Gb/s, one NIC per GPU): "RDMA" logical GB/s
# per rank at EP16 to EP64.
DEEPEP_INTERNODE_PUBLISHED_RDMA_GBPS = (43.0, 58.0)


# ---- process and MPI ---------------------------------------------------------------------------
def set_env_defaults() -> None:
    """Environment every GPU run of this project keeps (NVLink multicast off)."""
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


CPU_ALTERNATIVE = "on CPUs, run: mpiexec -n 4 python scripts/moe_example.py --backend reference"


def exit_unless_gpus(comm, script: str) -> None:
    """Ends the job with one line on rank 0 (no traceback) when some rank has no usable GPU
    (collective). Call it before anything imports CuPy."""
    from cupy_ep.bootstrap import gpu_unavailable_reason

    why = gpu_unavailable_reason(comm)
    if why is not None:
        if comm.Get_rank() == 0:
            print(f"{script} needs a GPU on every rank ({why}); {CPU_ALTERNATIVE}", file=sys.stderr, flush=True)
        sys.exit(2)


def device_name() -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def write_json(path: str, obj: dict) -> None:
    """Writes a bench's results to ``path``, with the UTC date of the run as ``date``
    (YYYY-MM-DD; the plots' captions show it) unless ``obj`` has one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump({**obj, "date": obj.get("date") or time.strftime("%Y-%m-%d", time.gmtime())}, f, indent=1,
                  default=_json_default)
        f.write("\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- argument parsing ----------------------------------------------------------------------------
def parse_int_list(text: str, what: str = "list") -> list:
    """``"4,8, 12"`` -> ``[4, 8, 12]`` (order kept, duplicates dropped)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = int(part)
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not an integer") from None
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError(f"{what}: empty")
    return out


def parse_receivers(spec: str, num_sms: int) -> int:
    """Receiving blocks for ``num_sms`` SMs: ``"1/2"`` = ``num_sms // 2`` (a fraction), ``"6"`` = 6;
    clamped to ``[1, num_sms - 1]``."""
    spec = spec.strip()
    try:
        if "/" in spec:
            num, den = spec.split("/", 1)
            value = num_sms * int(num) // int(den)
        else:
            value = int(spec)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--receivers: expected a fraction like 1/2 or a count, got {spec!r}") from None
    return max(1, min(num_sms - 1, value))


def parse_config_spec(spec: str) -> tuple:
    """``"SMS/THREADS/RECEIVERS[/CHUNK]"`` -> ``(sms, threads, receivers, chunk or None)``."""
    parts = [p.strip() for p in spec.strip().split("/")]
    if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts):
        raise ValueError(f"--configs: expected SMS/THREADS/RECEIVERS[/CHUNK], got {spec!r}")
    vals = [int(p) for p in parts]
    return vals[0], vals[1], vals[2], (vals[3] if len(vals) == 4 else None)


def config_label(cfg) -> str:
    """``sms/threads/receivers/chunk`` of a :class:`cupy_ep.Config`."""
    return f"{cfg.num_sms}/{cfg.num_threads}/{cfg.num_receivers}/{cfg.chunk_tokens}"


def config_dict(cfg) -> dict:
    return dict(num_sms=cfg.num_sms, num_threads=cfg.num_threads, num_receivers=cfg.num_receivers,
                chunk_tokens=cfg.chunk_tokens)


# ---- statistics ----------------------------------------------------------------------------------
def median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def gbps(num_bytes, us):
    """Bytes over microseconds, in GB/s (1e9 bytes per second)."""
    if num_bytes is None or not us:
        return None
    return float(num_bytes) / float(us) / 1e3


def worst_and_mean(values, larger_is_worse: bool = True):
    """(worst, mean) of per-rank values (None entries ignored); (None, None) when there are none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return (max(vals) if larger_is_worse else min(vals)), float(sum(vals) / len(vals))


def aggregate_op(per_rank: list) -> dict:
    """Merges one operation's per-rank results (dicts with ``*_us`` medians, ``bytes`` and maybe
    ``phases`` and ``notify_marks``) into the worst rank (largest time, smallest GB/s) and the mean
    over ranks."""
    out = {}
    keys = sorted({k for r in per_rank for k in r if k.endswith("_us")})
    for key in keys:
        worst, mean = worst_and_mean([r.get(key) for r in per_rank])
        if worst is not None:
            out[key] = worst
            out[key + "_mean"] = mean
    byte_keys = sorted({k for r in per_rank for k in r if k == "bytes" or k.endswith("_bytes")})
    for bkey in byte_keys:
        out[bkey] = [r.get(bkey) for r in per_rank]
    for bkey, prefix in (("bytes", ""), ("rdma_bytes", "rdma_"), ("nvl_bytes", "nvl_")):
        if not any(r.get(bkey) for r in per_rank):
            continue
        for kind in ("kernel", "call"):
            vals = [gbps(r.get(bkey), r.get(kind + "_us")) for r in per_rank]
            worst, mean = worst_and_mean(vals, larger_is_worse=False)
            if worst is not None:
                out[f"{prefix}{kind}_GBps"] = worst
                out[f"{prefix}{kind}_GBps_mean"] = mean
    out["per_rank"] = {k: [r.get(k) for r in per_rank] for k in keys}
    marked = [r for r in per_rank if r.get("notify_marks")]
    if marked:   # the marks of the rank whose notify took longest
        out["notify_marks"] = max(marked, key=lambda r: r["notify_kernel_us"])["notify_marks"]
    calls = [r.get("call_us") or 0.0 for r in per_rank]
    if any(r.get("phases") for r in per_rank):
        w = int(np.argmax(calls))
        out["phases_rank"] = w
        out["phases"] = per_rank[w].get("phases")
        out["phases_call_us"] = per_rank[w].get("prof_call_us")
        out["phases_host_us"] = per_rank[w].get("prof_host_us")
    return out


# ---- timing --------------------------------------------------------------------------------------
def time_calls(comm, fn, iters: int):
    """Times ``fn()`` as a user does: per iteration the stream is idle, the ranks meet in an MPI
    barrier, then CUDA events are recorded on the current stream right before and after the
    Python call (plus host clock readings around it). Returns ``(GPU µs medians, host µs median,
    last result)``: the GPU number is the whole call on the stream's timeline (launch gaps and
    host waits included), the host number how long the Python call took to return."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    gpu, host = [], []
    out = None
    for _ in range(iters):
        stream.synchronize()
        comm.Barrier()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        t0 = time.perf_counter_ns()
        out = fn()
        t1 = time.perf_counter_ns()
        end.record(stream)
        end.synchronize()
        gpu.append(cupy.cuda.get_elapsed_time(start, end) * 1e3)
        host.append((t1 - t0) / 1e3)
    stream.synchronize()
    return median(gpu), median(host), out


def measure_call(comm, buf, fn, kernels, iters: int, warmup: int):
    """One operation of a normal-mode Buffer on this rank: ``warmup`` untimed calls (the first
    compiles), :meth:`Buffer.check`, a whole-call pass (:func:`time_calls`), then the same inside
    ``buf.profile()``: kernel times of ``kernels`` (the first is ``kernel_us``, the others
    ``<name>_us``) and the call's phases. Returns (per-rank result dict, last outputs)."""
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    buf.check()
    call_us, host_us, out = time_calls(comm, fn, iters)
    with buf.profile() as prof:
        prof_call_us, prof_host_us, out = time_calls(comm, fn, iters)
    buf.check()
    ktimes = prof.kernel_times_us()
    res = dict(call_us=call_us, host_us=host_us, prof_call_us=prof_call_us, prof_host_us=prof_host_us)
    for i, name in enumerate(kernels):
        res["kernel_us" if i == 0 else f"{name}_us"] = median(ktimes.get(name, []))
    notify_marks = {name.split(": ", 1)[1]: median(us) for name, us in prof.phase_marks_us().items()
                    if name.startswith("notify_dispatch: ")}
    if "end" in notify_marks:   # the intranode notify on the GPU, from its start (its event pair also holds its launch)
        res["notify_kernel_us"] = notify_marks["end"]
        res["notify_marks"] = notify_marks
    phases = prof.call_phases_us()
    if phases:
        res["phases"] = {ph: [g, h] for ph, (g, h) in next(iter(phases.values())).items()}
    return res, out


_SPIN = {}


def spin(ns: int) -> None:
    """A one-block kernel that keeps the current stream busy for ``ns`` nanoseconds, so that
    the calls issued behind it run back to back on the GPU, without host gaps."""
    import cupy

    kernel = _SPIN.get("k")
    if kernel is None:
        kernel = _SPIN["k"] = cupy.RawKernel(r'''
        extern "C" __global__ void bench_spin(unsigned long long ns) {
            unsigned long long t0, t;
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
            do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
        }''', "bench_spin")
    kernel((1,), (32,), (np.uint64(ns),))


def time_back_to_back(comm, fn, iters: int, warm: int = 5, spin_ns: int = 10_000_000, chunk: int = 20) -> float:
    """Median µs per call of ``fn()`` issued back to back behind a spin kernel (events between
    consecutive calls on the current stream): what a call costs in a steady stream of calls,
    launch gaps included, host overhead hidden as long as the host keeps ahead."""
    import cupy

    for _ in range(warm):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times, done = [], 0
    while done < iters:
        n = min(chunk, iters - done)
        comm.Barrier()
        spin(spin_ns)
        evs = [cupy.cuda.Event() for _ in range(n + 1)]
        evs[0].record()
        for i in range(n):
            fn()
            evs[i + 1].record()
        evs[-1].synchronize()
        times += [cupy.cuda.get_elapsed_time(evs[i], evs[i + 1]) * 1e3 for i in range(n)]
        done += n
    return median(times)


def time_pair_back_to_back(comm, fn_a, fn_b, iters: int, warm: int = 5, spin_ns: int = 10_000_000,
                           chunk: int = 20):
    """Median µs of ``r = fn_a()`` and of ``fn_b(r)``, issued alternately back to back behind a
    spin kernel (e.g. a hook-mode send and its receive hook)."""
    import cupy

    for _ in range(warm):
        fn_b(fn_a())
    cupy.cuda.get_current_stream().synchronize()
    ta, tb, done = [], [], 0
    while done < iters:
        n = min(chunk, iters - done)
        comm.Barrier()
        spin(spin_ns)
        evs = [cupy.cuda.Event() for _ in range(2 * n + 1)]
        evs[0].record()
        for i in range(n):
            r = fn_a()
            evs[2 * i + 1].record()
            fn_b(r)
            evs[2 * i + 2].record()
        evs[-1].synchronize()
        ta += [cupy.cuda.get_elapsed_time(evs[2 * i], evs[2 * i + 1]) * 1e3 for i in range(n)]
        tb += [cupy.cuda.get_elapsed_time(evs[2 * i + 1], evs[2 * i + 2]) * 1e3 for i in range(n)]
        done += n
    return median(ta), median(tb)


# ---- NCCL baseline ---------------------------------------------------------------------------------
class NcclAllToAll:
    """All-to-all(-v) through NCCL grouped send/recv (``cupy.cuda.nccl``): the baseline a user
    without an EP library would write. Create it after the Buffer (which picks the GPU)."""

    def __init__(self, comm):
        from cupy.cuda import nccl

        self.nccl = nccl
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        uid = comm.bcast(nccl.get_unique_id() if self.rank == 0 else None)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def exchange(self, send_parts, recv_parts, stream=None) -> None:
        """``send_parts[peer]`` / ``recv_parts[peer]``: a CuPy array or a list of them (sent and
        received in that order, as raw bytes); empty arrays are skipped (the peer's matching
        part is empty too)."""
        import cupy

        s = (stream or cupy.cuda.get_current_stream()).ptr
        nccl = self.nccl
        nccl.groupStart()
        try:
            for peer in range(self.size):
                for a in _as_list(send_parts[peer]):
                    if a.nbytes:
                        self.comm.send(a.data.ptr, a.nbytes, nccl.NCCL_UINT8, peer, s)
                for a in _as_list(recv_parts[peer]):
                    if a.nbytes:
                        self.comm.recv(a.data.ptr, a.nbytes, nccl.NCCL_UINT8, peer, s)
        finally:
            nccl.groupEnd()

    def exchange_bytes(self, send, send_counts, recv, recv_counts, stream=None) -> None:
        """All-to-all-v of byte ranges of two flat uint8 buffers (counts per peer, in order)."""
        so = np.concatenate([[0], np.cumsum(send_counts)]).astype(np.int64)
        ro = np.concatenate([[0], np.cumsum(recv_counts)]).astype(np.int64)
        self.exchange([send[so[p]:so[p + 1]] for p in range(self.size)],
                      [recv[ro[p]:ro[p + 1]] for p in range(self.size)], stream)

    def destroy(self) -> None:
        try:
            self.comm.destroy()
        except Exception:  # noqa: BLE001
            pass


def nccl_normal_baseline(comm, nc, x, x_fp8, is_token_in_rank, h: int, iters: int) -> dict:
    """Normal-mode baseline: the same rows as a dispatch (token t to every rank r with
    ``is_token_in_rank[t, r]``) through NCCL: dispatch bf16 / FP8 (pack rows per destination with
    ``take``, all-to-all-v; FP8 sends data and scales), combine (all-to-all back, float32
    scatter-add, cast to bf16); each timed as a whole call (:func:`time_calls`). GB/s basis:
    rows received by this rank x logical row bytes (as for cupy_ep)."""
    import cupy
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    r = comm.Get_size()
    n = int(x.shape[0])
    in_rank = cupy.asnumpy(is_token_in_rank)
    send_idx = [cupy.asarray(np.nonzero(in_rank[:, p])[0]) for p in range(r)]
    send_counts = [int(i.size) for i in send_idx]
    recv_counts = comm.alltoall(send_counts)
    rows = int(sum(recv_counts))
    nsc = h // 128
    s_bf = [cupy.empty((c, h), dtype=bf16) for c in send_counts]
    r_bf = [cupy.empty((c, h), dtype=bf16) for c in recv_counts]
    s_q = [cupy.empty((c, h), dtype=cupy.uint8) for c in send_counts]
    s_s = [cupy.empty((c, nsc), dtype=cupy.float32) for c in send_counts]
    r_q = [cupy.empty((c, h), dtype=cupy.uint8) for c in recv_counts]
    r_s = [cupy.empty((c, nsc), dtype=cupy.float32) for c in recv_counts]
    back = [cupy.empty((c, h), dtype=bf16) for c in send_counts]
    acc = cupy.empty((n, h), dtype=cupy.float32)
    xq, xs = x_fp8

    def dispatch_bf16():
        for p in range(r):
            cupy.take(x, send_idx[p], axis=0, out=s_bf[p])
        nc.exchange(s_bf, r_bf)

    def dispatch_fp8():
        for p in range(r):
            cupy.take(xq, send_idx[p], axis=0, out=s_q[p])
            cupy.take(xs, send_idx[p], axis=0, out=s_s[p])
        nc.exchange([[s_q[p], s_s[p]] for p in range(r)], [[r_q[p], r_s[p]] for p in range(r)])

    def combine():
        nc.exchange(r_bf, back)
        acc.fill(0)
        for p in range(r):
            cupy.add.at(acc, send_idx[p], back[p].astype(cupy.float32))
        return acc.astype(bf16)

    out = {"recv_rows": rows}
    for name, fn, fp8 in (("dispatch_fp8", dispatch_fp8, True), ("dispatch_bf16", dispatch_bf16, False),
                          ("combine", combine, False)):
        fn()
        call_us, host_us, _ = time_calls(comm, fn, iters)
        out[name] = dict(call_us=call_us, host_us=host_us, bytes=rows * row_bytes(h, fp8))
    return out


def _as_list(a):
    return a if isinstance(a, (list, tuple)) else [a]


# ---- workloads and byte accounting (NumPy only) ----------------------------------------------------
def round_experts(num_experts: int, num_ranks: int) -> int:
    """Experts rounded down to a multiple of the ranks (3 ranks: 255 of 256)."""
    return num_experts - num_experts % num_ranks


def ranks_of_tokens(topk_idx: np.ndarray, num_experts: int, num_ranks: int) -> np.ndarray:
    """bool ``[N, R]``: token t has an expert on rank r (-1 slots select nothing)."""
    idx = np.asarray(topk_idx)
    e_local = num_experts // num_ranks
    out = np.zeros((idx.shape[0], num_ranks), dtype=bool)
    valid = idx >= 0
    rows = np.nonzero(valid)[0]
    out[rows, idx[valid] // e_local] = True
    return out


def group_limited_topk(rng, num_tokens: int, num_experts: int, num_topk: int, num_groups: int,
                       max_groups: int = 4) -> np.ndarray:
    """DeepEP's internode workload routing: scores ``|N(0,1)| + 1``; each token keeps the
    ``min(max_groups, num_groups)`` groups (NVLink domains, each a contiguous range of
    experts) with the highest best score and takes its top-k experts among them. With
    ``num_groups <= max_groups`` this is a plain random top-k. int64 ``[N, K]``, distinct
    experts per token."""
    scores = np.abs(rng.standard_normal((num_tokens, num_experts))) + 1.0
    keep = min(max_groups, num_groups)
    if keep < num_groups:
        per_group = scores.reshape(num_tokens, num_groups, num_experts // num_groups)
        best = per_group.max(axis=2)
        chosen = np.argpartition(-best, keep - 1, axis=1)[:, :keep]
        mask = np.zeros((num_tokens, num_groups), dtype=bool)
        np.put_along_axis(mask, chosen, True, axis=1)
        scores = np.where(np.repeat(mask, num_experts // num_groups, axis=1), scores, 0.0)
    top = np.argpartition(-scores, num_topk - 1, axis=1)[:, :num_topk]
    return np.sort(top, axis=1).astype(np.int64)


def domain_traffic(topk_idx, num_experts: int, num_ranks: int, num_nvl_peers: int, rank: int) -> dict:
    """What this rank's tokens send across NVLink domains (rank = domain * P + local index).

    Returns counts of (token, destination) pairs:
      ``tokens``; ``domain_pairs`` (destination domains, own domain included: DeepEP's
      ``num_rdma_token_sent``, the basis of its "RDMA" GB/s); ``remote_domain_pairs`` (domains
      other than this rank's: what crosses between domains when a token goes once per
      destination domain, as cupy_ep and DeepEP forward it); ``rank_pairs`` (destination ranks,
      own included: rows a per-rank all-to-all sends); ``remote_rank_pairs`` (destination
      ranks in other domains: what a per-rank all-to-all sends across domains);
      ``domain_counts`` (tokens per destination domain, own included); and
      ``domain_rank_counts`` (rows a per-rank all-to-all sends to the ranks of each domain).
    """
    in_rank = ranks_of_tokens(topk_idx, num_experts, num_ranks)
    n_dom = num_ranks // num_nvl_peers
    my_dom = rank // num_nvl_peers
    in_dom = in_rank.reshape(in_rank.shape[0], n_dom, num_nvl_peers).any(axis=2)
    remote_dom = np.ones(n_dom, dtype=bool)
    remote_dom[my_dom] = False
    remote_rank = np.repeat(remote_dom, num_nvl_peers)
    return dict(
        tokens=int(in_rank.shape[0]),
        domain_pairs=int(in_dom.sum()),
        remote_domain_pairs=int(in_dom[:, remote_dom].sum()),
        rank_pairs=int(in_rank.sum()),
        remote_rank_pairs=int(in_rank[:, remote_rank].sum()),
        domain_counts=[int(v) for v in in_dom.sum(axis=0)],
        domain_rank_counts=[int(v) for v in in_rank.reshape(-1, n_dom, num_nvl_peers).sum(axis=(0, 2))],
    )


def inbound_cross_domain(traffic_of_all: list, num_nvl_peers: int) -> list:
    """Per destination domain d, what enters it from the other domains' ranks: ``records`` (one
    per (token, d), as forwarded) and ``a2a_rows`` (one per (token, rank of d), as a per-rank
    all-to-all sends). ``traffic_of_all[s]``: :func:`domain_traffic` of source rank s."""
    n_dom = len(traffic_of_all[0]["domain_counts"])
    out = []
    for d in range(n_dom):
        others = [tr for s, tr in enumerate(traffic_of_all) if s // num_nvl_peers != d]
        out.append(dict(domain=d, records=sum(tr["domain_counts"][d] for tr in others),
                        a2a_rows=sum(tr["domain_rank_counts"][d] for tr in others)))
    return out


def forwarded_records(domain_counts_of_all: list, num_nvl_peers: int, rank: int) -> int:
    """Records rank ``rank`` receives as forwarder: from every source rank with the same local
    index (one per domain, own domain included), that rank's tokens bound for ``rank``'s domain.
    ``domain_counts_of_all[s]``: ``domain_traffic(...)["domain_counts"]`` of source rank s."""
    local, dom = rank % num_nvl_peers, rank // num_nvl_peers
    return int(sum(counts[dom] for s, counts in enumerate(domain_counts_of_all) if s % num_nvl_peers == local))


def nic_time_us(num_bytes: float, nic_gbps: float = 50.0) -> float:
    """µs that ``num_bytes`` take through one NIC of ``nic_gbps`` GB/s (400 Gb/s CX7: 50)."""
    return float(num_bytes) / (nic_gbps * 1e3)


def ll_traffic(topk_idx, num_experts: int, num_ranks: int, rank: int) -> dict:
    """Low-latency bytes basis: selections (DeepEP counts one copy per selected expert),
    tokens sent to each rank (this design: one copy per destination rank)."""
    idx = np.asarray(topk_idx)
    in_rank = ranks_of_tokens(idx, num_experts, num_ranks)
    per_rank = in_rank.sum(axis=0)
    return dict(selections=int((idx >= 0).sum()), tokens=int(idx.shape[0]),
                tokens_per_rank=[int(v) for v in per_rank],
                copies_per_token=float(in_rank.sum() / max(1, idx.shape[0])),
                remote_copies=int(per_rank.sum() - per_rank[rank]))


# ---- report formatting ---------------------------------------------------------------------------
# Low-latency results: (JSON key, label, kernel name in the profile, DeepEP byte count), in table order.
LL_ROWS = (("dispatch_us", "dispatch (FP8)", "low_latency_dispatch", "dispatch"),
           ("combine_us", "combine (bf16)", "low_latency_combine", "combine"),
           ("combine_logfmt_us", "combine (LogFMT)", "low_latency_combine_logfmt", "combine_logfmt"),
           ("dispatch_combine_us", "dispatch + combine", None, None),
           ("graph_dispatch_combine_us", "graph: dispatch + combine", None, None),
           ("dispatch_send_us", "hook: dispatch send", "low_latency_dispatch_send", None),
           ("dispatch_recv_us", "hook: dispatch recv", "low_latency_dispatch_recv", None),
           ("combine_send_us", "hook: combine send", "low_latency_combine_send", None),
           ("combine_recv_us", "hook: combine recv", "low_latency_combine_recv", None),
           ("nccl_dispatch_us", "NCCL a2a, dispatch bytes", None, None),
           ("nccl_combine_us", "NCCL a2a, combine bytes", None, None))


def ll_kernel_time_us(r: dict, kname: str | None):
    """The kernel's duration on the GPU in a low-latency result ``r``: its in-kernel "end" mark,
    else the events around its launch; None without a kernel name or a profile."""
    if kname is None:
        return None
    end = r.get("phase_us", {}).get(f"{kname}: end")
    return end if end is not None else r.get("kernel_us", {}).get(kname)


def fmt(v, spec: str = ".1f", width: int = 8) -> str:
    """A number right-aligned in ``width``, or ``-`` for None."""
    if v is None:
        return f"{'-':>{width}}"
    return f"{v:>{width}{spec}}"


def print_table(header: list, rows: list, widths: list) -> None:
    """Columns: the first left-aligned, the rest right-aligned; cells already strings."""
    def line(cells):
        out = [f"{cells[0]:<{widths[0]}}"]
        out += [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])]
        return " ".join(out).rstrip()

    print(line(header))
    print("-" * (sum(widths) + len(widths) - 1))
    for r in rows:
        print(line(r))


# What the host does in each phase of a call (Profile.call_phases_us names), for the breakdown's
# host bar: the launches, the host wait for notify's counts, and Python (everything else).
HOST_WAIT_PHASES = ("host wait",)


def host_category(phase: str) -> str:
    """"launches", "host wait" or "Python" for a call phase's host time."""
    if phase.endswith(" launched"):
        return "launches"
    return "host wait" if phase in HOST_WAIT_PHASES else "Python"


def kernel_of_phase(phase: str, op: dict, main_kernel: str):
    """The kernel time (µs) measured for the kernel whose launch ends ``phase``, or None: the
    op's main kernel is ``kernel_us``, the others ``<name>_us`` (:func:`measure_call`)."""
    if not phase.endswith(" launched"):
        return None
    name = phase[:-len(" launched")]
    return op.get("kernel_us") if name == main_kernel else op.get(f"{name}_us")


def breakdown(op: dict, main_kernel: str):
    """An op's whole-call breakdown from its ``phases`` ({phase: (GPU-timeline µs, host µs)},
    :func:`aggregate_op`): ``(rows, totals)`` with rows ``(phase, GPU µs, host µs, kernel µs or
    None)`` in call order, a "rest" row (the profiled whole call minus the phases: the Python call's
    entry and return) and totals ``{"call", "host", "kernels", "Python", "launches", "host wait"}``;
    None without phases."""
    phases = op.get("phases")
    if not phases:
        return None
    rows = [(name, g, h, kernel_of_phase(name, op, main_kernel)) for name, (g, h) in phases.items()]
    call, host = op.get("phases_call_us"), op.get("phases_host_us")
    if call is not None and host is not None:
        rows.append(("rest", call - sum(r[1] for r in rows), host - sum(r[2] for r in rows), None))
    totals = {"call": call, "host": host, "kernels": sum(r[3] for r in rows if r[3] is not None),
              "Python": 0.0, "launches": 0.0, "host wait": 0.0}
    for name, _, h, _ in rows:
        totals[host_category(name)] += h
    return rows, totals


def print_breakdown(ops, width: int = 26) -> None:
    """The whole-call breakdown table of ``ops`` = [(label, op dict, main kernel name)]: per phase
    its GPU-timeline µs, host µs and the kernel time of the kernel whose launch ends it."""
    table = []
    for label, op, main_kernel in ops:
        b = breakdown(op, main_kernel)
        if b is None:
            continue
        rows, totals = b
        table.append([f"{label} (rank {op.get('phases_rank')})", "", "", ""])
        table += [[f"  {name}", fmt(g), fmt(h), "" if k is None else fmt(k)] for name, g, h, k in rows]
        table.append(["  = whole call", fmt(totals["call"]), fmt(totals["host"]), fmt(totals["kernels"] or None)])
        table.append([f"  host: Python {totals['Python']:.1f}, launches {totals['launches']:.1f}, "
                      f"host wait {totals['host wait']:.1f}", "", "", ""])
    if table:
        print_table(["op / phase", "GPU us", "host us", "kernel us"], table, [width, 9, 9, 10])
