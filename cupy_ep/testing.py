"""Helpers to check a backend against the reference: inputs, poisoning, comparisons.

In the spirit of ``cupy.testing``: one test body runs the same calls on the GPU ``Buffer`` and on
:mod:`cupy_ep.reference` (NumPy, the independent oracle) with the same inputs, and compares
every element. Used by ``tests/gpu``, ``scripts/soak.py`` and the benchmarks.

* inputs: :func:`make_x`, :func:`make_routing`, :func:`make_weights` (fresh random data, with
  outliers, all-zero FP8 blocks, empty slots, skew, duplicates, empty ranks);
* :func:`poison_pool` fills free device memory with 0xFF (NaN in bf16/float32, -1 in ints)
  before a GPU call, so that unwritten outputs show;
* :func:`normal_round_trip` / :func:`low_latency_round_trip` run a layout + dispatch + combine on
  both backends and raise :class:`Mismatch` naming the first difference;
* :func:`agree` turns a per-rank result into the same outcome on every rank;
* :func:`run_or_abort` runs an MPI script's ``main`` and ends the whole job when a rank raises;
* :func:`gpu_bytes_in_use` measures device memory for leak checks;
* :class:`GraphInputs`: the inputs, capture and replays of low-latency calls in a CUDA graph.

The GPU parts import CuPy lazily; with ``gpu=None`` the helpers drive the reference alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import ml_dtypes
import numpy as np

from . import reference
from .collective import failures
from .fp8 import per_token_cast_back, per_token_cast_to_fp8

BF16 = ml_dtypes.bfloat16

__all__ = ["Mismatch", "agree", "gpu_bytes_in_use", "make_x", "make_routing", "make_weights", "poison_pool",
           "run_or_abort", "to_device", "to_host",
           "normal_round_trip", "low_latency_round_trip", "RoundTrip", "check_combine", "check_ll_dispatch",
           "check_ll_combine", "GraphInputs"]


class Mismatch(AssertionError):
    """A backend's output differs from the reference's."""


def agree(comm, ok: bool, message: str = "") -> None:
    """Raises :class:`Mismatch` on every rank when ``ok`` is false on any rank."""
    failed = failures(comm, None if ok else str(message))
    if failed:
        raise Mismatch("; ".join(f"rank {r}: {m}" for r, m in failed.items()))


def check(ok: bool, message) -> None:
    if not ok:
        raise Mismatch(message() if callable(message) else message)


def agreed(comm, context: str, fn):
    """Runs ``fn()`` (local work: comparisons, copies) and raises :class:`Mismatch` on every rank
    when it failed on any rank, with each failing rank's message: one rank's exception never
    leaves the others waiting in a collective."""
    try:
        result, message = fn(), None
    except Exception as e:  # noqa: BLE001 -- reported to every rank
        result, message = None, f"{type(e).__name__}: {e}"
    agree(comm, message is None, f"{context}: {message}")
    return result


def run_or_abort(main, note: str = ""):
    """Runs an MPI script's ``main()`` and returns its result. When it raises (anything but
    ``SystemExit``), prints the error with this rank (and ``note``, e.g. the seed to repeat the
    run) and aborts the whole MPI job, so that no rank is left waiting in a collective and
    mpiexec exits non-zero."""
    import os
    import sys
    import time
    import traceback

    try:
        return main()
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 -- report, then abort every rank
        try:
            from mpi4py import MPI

            rank = MPI.COMM_WORLD.Get_rank()
        except Exception:  # noqa: BLE001
            MPI, rank = None, "?"
        sys.stdout.flush()
        sys.stderr.write(f"\nFAILED on rank {rank}{note}:\n{traceback.format_exc()}")
        sys.stderr.flush()
        # mpiexec forwards output asynchronously: aborting at once can lose the traceback.
        time.sleep(1.0)
        try:
            if MPI is not None:
                MPI.COMM_WORLD.Abort(1)
        finally:
            os._exit(1)


# ---- inputs ----------------------------------------------------------------------------------
def make_x(rng, num_tokens: int, hidden: int):
    """bf16 ``[N, H]``: normal values, some large tokens, all-zero 128-blocks, scattered zeros."""
    x = rng.standard_normal((num_tokens, hidden), dtype=np.float32)
    if num_tokens:
        x[rng.random(num_tokens) < 0.2] *= 50.0
        if hidden % 128 == 0:
            blocks = x.reshape(num_tokens, hidden // 128, 128)
            blocks[rng.random((num_tokens, hidden // 128)) < 0.05] = 0.0
        x[rng.random((num_tokens, hidden)) < 0.01] = 0.0
    return x.astype(BF16)


def make_routing(rng, num_tokens: int, num_experts: int, num_topk: int, kind: str = "random", num_ranks: int = 1,
                 empty_ranks=()):
    """int64 ``[N, K]`` expert ids.

    kind: "random" (distinct experts per token), "skewed" (most selections on rank 0's experts),
    "holes" (-1 slots, tokens with no expert), "dups" (holes plus the same expert twice in a token).
    ``empty_ranks``: ranks whose experts nobody selects.
    """
    e_local = num_experts // num_ranks
    allowed = np.ones(num_experts, bool)
    for r in empty_ranks:
        allowed[r * e_local:(r + 1) * e_local] = False
    choices = np.flatnonzero(allowed)
    if num_tokens == 0 or choices.size == 0:
        return np.full((num_tokens, num_topk), -1, dtype=np.int64)
    k = min(num_topk, choices.size)
    if kind == "skewed":
        p = np.where(choices < e_local, 30.0, 1.0)
        p /= p.sum()
        idx = np.stack([rng.choice(choices, k, replace=False, p=p) for _ in range(num_tokens)])
    else:
        idx = choices[np.argsort(rng.random((num_tokens, choices.size)), axis=1)[:, :k]]
    idx = np.concatenate([idx, np.full((num_tokens, num_topk - k), -1)], axis=1).astype(np.int64)
    if kind in ("holes", "dups"):
        idx[rng.random(idx.shape) < 0.2] = -1
        idx[::7] = -1
    if kind == "dups" and num_topk >= 2:
        d = rng.random(num_tokens) < 0.3
        idx[d, 1] = idx[d, 0]
    return idx


def make_weights(rng, num_tokens: int, num_topk: int):
    return rng.uniform(0.05, 1.0, size=(num_tokens, num_topk)).astype(np.float32)


# ---- device helpers --------------------------------------------------------------------------
class GraphInputs:
    """Device inputs of low-latency calls captured in a CUDA graph, on ``stream``: bf16 ``x``
    ``[n, h]``, int64 ``idx`` and float32 ``w`` ``[n, k]``, refilled before each replay."""

    def __init__(self, stream, n: int, h: int, k: int):
        import cupy

        self.stream, self.n, self.h, self.k = stream, n, h, k
        with stream:
            self.x = cupy.zeros((n, h), dtype=BF16)
            self.idx = cupy.zeros((n, k), dtype=cupy.int64)
            self.w = cupy.zeros((n, k), dtype=cupy.float32)

    def load(self, rng, num_experts: int, num_ranks: int):
        """Fresh inputs ("holes" routing) copied in; returns them as NumPy arrays ``(x, idx, w)``."""
        import cupy

        x, w = make_x(rng, self.n, self.h), make_weights(rng, self.n, self.k)
        idx = make_routing(rng, self.n, num_experts, self.k, "holes", num_ranks)
        with self.stream:
            self.x.view(cupy.uint16).set(x.view(np.uint16))
            self.idx.set(idx)
            self.w.set(w)
        return x, idx, w

    def capture(self, comm, body):
        """Runs ``body()`` twice (its first call compiles, collectively), then captures it:
        ``(graph, what the captured body returned)``."""
        with self.stream:
            for _ in range(2):
                body()
            self.stream.synchronize()
            comm.Barrier()
            self.stream.begin_capture()
            result = body()
            graph = self.stream.end_capture()
        return graph, result

    def replay(self, comm, graph, out) -> None:
        """Fills the bf16 ``out`` with NaN, then replays ``graph`` on every rank together and waits."""
        import cupy

        with self.stream:
            out.view(cupy.uint16).fill(0x7FC0)
            comm.Barrier()
            graph.launch(self.stream)
            self.stream.synchronize()


def poison_pool(num_bytes: int = 1536 << 20) -> None:
    """Fills free memory-pool blocks with 0xFF (NaN in bf16/f32, -1 in ints) so that outputs a
    kernel failed to write show up in the checks."""
    import cupy

    junk = cupy.empty(num_bytes, dtype=cupy.uint8)
    junk.fill(0xFF)
    cupy.cuda.get_current_stream().synchronize()
    del junk


def gpu_bytes_in_use(comm) -> int:
    """Bytes in use on this rank's GPU (by every process on it), read while no rank of ``comm``
    holds CuPy pool blocks: ranks sharing a GPU then all read the same figure (collective)."""
    import cupy

    cupy.cuda.runtime.deviceSynchronize()
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()
    comm.Barrier()
    free, total = cupy.cuda.runtime.memGetInfo()
    comm.Barrier()
    return total - free


def to_device(a):
    """NumPy -> CuPy (FP8 as uint8 bits, pairs element-wise, None kept)."""
    import cupy

    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(to_device(v) for v in a)
    if a.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
        a = a.view(np.uint8)
    if a.dtype == np.dtype(BF16):
        return cupy.asarray(np.ascontiguousarray(a).view(np.uint16)).view(BF16)
    return cupy.asarray(a)


def to_host(a):
    import cupy

    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(to_host(v) for v in a)
    return cupy.asnumpy(a)


def _synchronized(result):
    """``result`` once the current stream is done (errors of the call surface here)."""
    import cupy

    cupy.cuda.get_current_stream().synchronize()
    return result


def _run_hook(hook, overlap) -> None:
    if hook is not None:
        if overlap is not None:
            overlap()
        hook()


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _same_bits(got, exp, what: str) -> None:
    check(got.shape == exp.shape, lambda: f"{what}: shape {got.shape}, expected {exp.shape}")
    if got.size == 0:
        return
    g, e = _bits(got), _bits(exp)
    bad = np.flatnonzero((g != e).reshape(g.shape[0], -1).any(axis=1)) if g.ndim > 1 else np.flatnonzero(g != e)
    check(bad.size == 0, lambda: f"{what}: {bad.size} of {g.shape[0]} rows differ (first: row {bad[0]})")


def _close_bf16(got, exp, bound, what: str) -> None:
    """|got - exp| <= bound elementwise (float64), NaN never passes."""
    g = got.astype(np.float64)
    bad = ~(np.abs(g - exp) <= bound)
    if bad.size == 0:
        return
    check(not bad.any(), lambda: (f"{what}: {int(bad.sum())} of {bad.size} elements off; worst at "
                                  f"{np.unravel_index(np.argmax(np.where(bad, np.abs(g - exp), 0)), bad.shape)}"))


# ---- normal mode -----------------------------------------------------------------------------
@dataclass
class RoundTrip:
    """What a normal round trip drew and returned (for cached dispatch and further checks)."""

    x: object
    topk_idx: object
    topk_weights: object
    ref_handle: object
    gpu_handle: object = None
    gpu_inputs: dict = field(default_factory=dict)
    num_recv: int = 0


def _num_domains(ref_buf) -> int:
    return ref_buf.num_rdma_ranks


def normal_round_trip(comm, ref_buf, gpu_buf, rng, *, num_tokens: int, hidden: int, num_topk: int,
                      num_experts: int, use_fp8: bool = False, kind: str = "random", with_topk: bool = True,
                      expert_alignment: int = 1, num_worst_tokens: int = 0, bias_count: int = 0,
                      empty_ranks=(), config=None, poison: bool = True) -> RoundTrip:
    """Layout, dispatch and combine on the reference and (``gpu_buf`` not None) on the GPU with
    the same inputs; raises :class:`Mismatch` (on every rank) at the first difference.

    Dispatch must match bit for bit (rows ordered by source rank, then source token); combine to
    the bf16 rounding of the design: exact inside one NVLink domain, within one bf16 rounding
    of each domain's partial sum across domains. The experts multiply their rows by
    ``rank + 1`` (exact in bf16 for small ranks), so every rank's contribution counts.
    """
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    x = make_x(rng, num_tokens, hidden)
    topk_idx = make_routing(rng, num_tokens, num_experts, num_topk, kind, num_ranks, empty_ranks)
    weights = make_weights(rng, num_tokens, num_topk)
    x_in = per_token_cast_to_fp8(x) if use_fp8 else x
    biases = [make_x(rng, num_tokens, hidden) for _ in range(bias_count)]
    bias_arg = None if bias_count == 0 else (biases[0] if bias_count == 1 else tuple(biases))

    per_rank, per_rdma, per_expert, in_rank, _ = ref_buf.get_dispatch_layout(topk_idx, num_experts)
    routing = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                   num_tokens_per_expert=per_expert)
    topk = dict(topk_idx=topk_idx, topk_weights=weights) if with_topk else {}
    ref = ref_buf.dispatch(x_in, **routing, **topk, expert_alignment=expert_alignment,
                           num_worst_tokens=num_worst_tokens)
    ref_x, ref_idx, ref_w, ref_list, ref_handle, _ = ref
    num_recv = ref_handle.num_recv_tokens
    data = ref_x[0] if use_fp8 else ref_x
    y = (data.astype(np.float32) * (rank + 1)).astype(BF16)
    ref_comb_x, ref_comb_w, _ = ref_buf.combine(y, ref_handle, topk_weights=ref_w, bias=bias_arg)
    trip = RoundTrip(x_in, topk_idx, weights, ref_handle, num_recv=num_recv)
    if gpu_buf is None:
        return trip

    d_idx = to_device(topk_idx)
    g_layout = agreed(comm, "GPU get_dispatch_layout", lambda: gpu_buf.get_dispatch_layout(d_idx, num_experts))
    for name, got, exp in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                               "is_token_in_rank"), g_layout[:4], (per_rank, per_rdma, per_expert, in_rank)):
        ok = (got is None and exp is None) or (got is not None and exp is not None
                                                and np.array_equal(to_host(got), exp))
        agree(comm, ok, f"layout {name} differs from the reference")
    g_routing = dict(num_tokens_per_rank=g_layout[0], num_tokens_per_rdma_rank=g_layout[1],
                     is_token_in_rank=g_layout[3], num_tokens_per_expert=g_layout[2])
    g_topk = dict(topk_idx=d_idx, topk_weights=to_device(weights)) if with_topk else {}
    d_x = to_device(x_in if not use_fp8 else (x_in[0], x_in[1]))
    if poison:
        poison_pool()
    g_x, g_idx, g_w, g_list, g_handle, _ = agreed(comm, "GPU dispatch", lambda: _synchronized(gpu_buf.dispatch(
        d_x, **g_routing, **g_topk, expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
        config=config)))
    rows = num_recv

    def compare_dispatch():
        if use_fp8:
            _same_bits(to_host(g_x[0])[:rows], np.asarray(ref_x[0])[:rows].view(np.uint8), "recv_x (FP8 data)")
            _same_bits(to_host(g_x[1])[:rows], ref_x[1][:rows], "recv_x (FP8 scales)")
        else:
            _same_bits(to_host(g_x)[:rows], ref_x[:rows], "recv_x")
        if with_topk:
            _same_bits(to_host(g_idx), ref_idx, "recv_topk_idx")
            _same_bits(to_host(g_w), ref_w, "recv_topk_weights")
        else:
            check(g_idx is None and g_w is None, "recv_topk_idx / weights: expected None without topk_idx")
        check(g_list == ref_list, lambda: f"num_recv_tokens_per_expert_list {g_list} != {ref_list}")

    agreed(comm, f"dispatch ({kind}, fp8={use_fp8}, H={hidden}, K={num_topk})", compare_dispatch)

    g_y = to_device(y)
    d_bias = None if bias_arg is None else to_device(bias_arg)
    if poison:
        poison_pool()
    g_comb_x, g_comb_w, _ = agreed(comm, "GPU combine", lambda: _synchronized(
        gpu_buf.combine(g_y, g_handle, topk_weights=g_w, bias=d_bias, config=config)))
    agreed(comm, f"combine ({kind}, H={hidden}, K={num_topk}, biases={bias_count})",
           lambda: check_combine(to_host(g_comb_x), ref_comb_x, to_host(g_comb_w), ref_comb_w, _num_domains(ref_buf)))
    trip.gpu_handle = g_handle
    trip.gpu_inputs = dict(x=d_x, **g_routing, **g_topk)
    return trip


def check_combine(got_x, ref_x, got_w, ref_w, num_domains: int) -> None:
    """A normal combine's host results against the reference's (``got_w`` / ``ref_w`` None without
    weights), as docs/api.md promises: bit for bit inside one NVLink domain, else within one bf16
    rounding of each domain's partial sum. Raises :class:`Mismatch`."""
    if num_domains == 1:   # the same float32 order as the reference: bit for bit
        _same_bits(got_x, ref_x, "combined_x")
        if ref_w is not None:
            _same_bits(got_w, ref_w, "combined_topk_weights")
        return
    # one extra bf16 rounding of each domain's partial sum (relative 2^-8 each), float32 otherwise
    exp = ref_x.astype(np.float64)
    bound = (np.abs(exp) + 1e-30) * 2.0 ** -8 * (num_domains + 1) + 1e-6
    _close_bf16(got_x, exp, np.maximum(bound, np.abs(exp).max(axis=1, keepdims=True) * 2.0 ** -8 * num_domains),
                "combined_x")
    if ref_w is not None:
        _close_bf16(got_w, ref_w.astype(np.float64), np.abs(ref_w) * 1e-6 + 1e-6, "combined_topk_weights")


def cached_round_trip(comm, ref_buf, gpu_buf, rng, trip: RoundTrip, use_fp8: bool = False) -> None:
    """A cached dispatch (new x, the handles of ``trip``) on both backends, compared bit for bit
    (``gpu_buf`` None: the reference alone)."""

    n, hidden = trip.ref_handle.num_tokens, trip.ref_handle.hidden
    x = make_x(rng, n, hidden)
    x_in = per_token_cast_to_fp8(x) if use_fp8 else x
    ref_x = ref_buf.dispatch(x_in, handle=trip.ref_handle)[0]
    if gpu_buf is None:
        return
    poison_pool()
    got = agreed(comm, "GPU cached dispatch",
                 lambda: _synchronized(gpu_buf.dispatch(to_device(x_in), handle=trip.gpu_handle)))
    rows = trip.num_recv

    def compare():
        check(all(v is None for v in got[1:5]), "a cached dispatch returns (recv_x, None, None, None, None, event)")
        if use_fp8:
            _same_bits(to_host(got[0][0])[:rows], np.asarray(ref_x[0])[:rows].view(np.uint8), "cached recv_x (FP8)")
            _same_bits(to_host(got[0][1])[:rows], ref_x[1][:rows], "cached recv_x (scales)")
        else:
            _same_bits(to_host(got[0])[:rows], ref_x[:rows], "cached recv_x")

    agreed(comm, "cached dispatch", compare)


# ---- low-latency mode --------------------------------------------------------------------------
def _ll_rows(recv_count, layout_range, src_info):
    """{(expert, source rank, source token): row} of the valid rows of a masked layout."""
    out = {}
    el, num_ranks = layout_range.shape
    for j in range(el):
        for s in range(num_ranks):
            b, c = int(layout_range[j, s]) >> 32, int(layout_range[j, s]) & 0xFFFFFFFF
            for row in range(b, b + c):
                out[(j, s, int(src_info[j, row]))] = row
        check(int(recv_count[j]) == sum(int(layout_range[j, s]) & 0xFFFFFFFF for s in range(num_ranks)),
              f"recv_count[{j}] does not match layout_range")
    return out


def ll_expert_scale(rank: int, num_local_experts: int):
    """float32 ``[E_local]``: the checks' expert j of ``rank`` multiplies its rows by a power of
    two, ``2 ** ((rank * E_local + j) % 3 - 1)`` (exact in bf16)."""
    return np.array([2.0 ** ((rank * num_local_experts + j) % 3 - 1) for j in range(num_local_experts)], np.float32)


def ll_expert_outputs(r_x, use_fp8: bool, rank: int, num_local_experts: int, ref_rows, got_rows):
    """The experts' outputs for a low-latency combine check, from the reference's received
    ``r_x``: ``(y_ref, y_gpu)``, bf16 ``[E_local, R*M, H]``. ``y_gpu`` holds each of ``y_ref``'s
    rows at the row the GPU received it in (``ref_rows`` / ``got_rows`` from :func:`_ll_rows`),
    NaN elsewhere: rows past a GPU count must never be read."""
    scale = ll_expert_scale(rank, num_local_experts)
    ref_in = per_token_cast_back(r_x[0], r_x[1], np.float32) if use_fp8 else np.asarray(r_x, np.float32)
    y_ref = (ref_in * scale[:, None, None]).astype(BF16)
    y_gpu = np.full(y_ref.shape, np.nan, dtype=BF16)
    for key, row in ref_rows.items():
        y_gpu[key[0], got_rows[key]] = y_ref[key[0], row]
    return y_ref, y_gpu


def ll_combine_expected(ref_buf, y_ref, topk_idx, weights, handle, use_logfmt: bool = False):
    """The reference's ``low_latency_combine`` of ``y_ref`` and the bound a GPU result must keep
    to: ``(out_ref, bound)``, bound float64 ``[N, H]``. Partial sums cross as bf16 (one rounding
    each, at most ``mag * 2**-8`` together, ``mag`` = the same combine of ``|y|`` with ``|w|``) and
    both results are rounded to bf16 once."""
    out_ref = ref_buf.low_latency_combine(y_ref, topk_idx, weights, handle, use_logfmt=use_logfmt)[0]
    mag = ref_buf.low_latency_combine(np.abs(y_ref.astype(np.float32)).astype(BF16), topk_idx, np.abs(weights),
                                      handle)[0].astype(np.float64)
    return out_ref, (mag + 2 * np.abs(out_ref.astype(np.float64))) * 2.0 ** -8 * 1.01 + 1e-6


def check_ll_dispatch(r_x, r_count, r_handle, g_x, g_count, g_handle):
    """A low-latency dispatch's results (GPU arrays ``g_*``) against the reference's (``r_*``):
    the same (expert, source rank, source token) rows, in any order within an expert, their data
    bit for bit (bf16, or the FP8 pair ``(data, scales)``). Returns ``(ref_rows, got_rows)`` of
    :func:`_ll_rows`. Raises :class:`Mismatch`."""
    ref_rows = _ll_rows(r_count, r_handle[1], r_handle[0])
    got_rows = _ll_rows(to_host(g_count), to_host(g_handle[1]), to_host(g_handle[0]))
    check(set(ref_rows) == set(got_rows), "low_latency_dispatch: the (expert, source, token) rows differ")
    keys = sorted(ref_rows)
    jj = np.array([k[0] for k in keys], dtype=np.int64)
    ref_r = np.array([ref_rows[k] for k in keys], dtype=np.int64)
    got_r = np.array([got_rows[k] for k in keys], dtype=np.int64)
    if isinstance(r_x, tuple):
        gd, gs = to_host(g_x[0]), to_host(g_x[1])
        _same_bits(gd[jj, got_r], np.asarray(r_x[0])[jj, ref_r].view(np.uint8), "recv_x (FP8 data)")
        _same_bits(gs[jj, got_r], r_x[1][jj, ref_r], "recv_x (scales)")
    else:
        _same_bits(to_host(g_x)[jj, got_r], r_x[jj, ref_r], "recv_x")
    return ref_rows, got_rows


def check_ll_combine(got, out_ref, bound, use_logfmt: bool = False) -> None:
    """A low-latency combine's host result against :func:`ll_combine_expected`'s ``(out_ref,
    bound)``: within the bound, or bit for bit with LogFMT. Raises :class:`Mismatch`."""
    if use_logfmt:
        _same_bits(got, out_ref, "combined_x")
    else:
        _close_bf16(got, out_ref.astype(np.float64), bound, "low_latency_combine")


def low_latency_round_trip(comm, ref_buf, gpu_buf, rng, *, num_tokens: int, hidden: int, num_topk: int,
                           num_experts: int, m: int, use_fp8: bool = True, round_scale: bool = False,
                           use_ue8m0: bool = False, kind: str = "random", hook: bool = False,
                           zero_copy: bool = False, overlap=None, stats=None, use_logfmt: bool = False) -> None:
    """Low-latency dispatch and combine on both backends with the same inputs. Rows of an expert
    may come in another order on the GPU (the contract allows it): they are matched by (expert,
    source rank, source token) through the handles; data bit for bit; combine within the design's
    bound (partial sums cross as bf16: one rounding per expert rank). ``overlap()`` runs between a
    hook call's send and receive; ``stats`` = (reference, GPU) ``cumulative_local_expert_recv_stats``.
    ``use_logfmt``: LogFMT combine on both, results bit for bit (the reference models the GPU's sums).
    ``gpu_buf`` None: the reference alone."""

    num_ranks = comm.Get_size()
    x = make_x(rng, num_tokens, hidden)
    topk_idx = make_routing(rng, num_tokens, num_experts, num_topk, kind, num_ranks)
    weights = make_weights(rng, num_tokens, num_topk)
    kw = dict(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0)
    r_stats, g_stats = stats if stats is not None else (None, None)
    r_x, r_count, r_handle, _, r_hook = ref_buf.low_latency_dispatch(
        x, topk_idx, m, num_experts, return_recv_hook=hook, cumulative_local_expert_recv_stats=r_stats, **kw)
    if r_hook:
        r_hook()
    if gpu_buf is None:
        ref_buf.low_latency_combine(np.asarray(r_x[0] if use_fp8 else r_x).astype(np.float32).astype(BF16),
                                    topk_idx, weights, r_handle)
        return
    poison_pool()
    def gpu_dispatch():
        out = gpu_buf.low_latency_dispatch(to_device(x), to_device(topk_idx), m, num_experts, return_recv_hook=hook,
                                           cumulative_local_expert_recv_stats=g_stats, **kw)
        _run_hook(out[4], overlap)
        return _synchronized(out)

    g_x, g_count, g_handle, _, _ = agreed(comm, "GPU low_latency_dispatch", gpu_dispatch)
    def compare_dispatch():
        rows = check_ll_dispatch(r_x, r_count, r_handle, g_x, g_count, g_handle)
        if stats is not None:
            _same_bits(to_host(g_stats), r_stats, "cumulative_local_expert_recv_stats")
        return rows

    ref_rows, got_rows = agreed(comm, "low_latency_dispatch", compare_dispatch)

    y_ref, y_gpu = ll_expert_outputs(r_x, use_fp8, comm.Get_rank(), num_experts // num_ranks, ref_rows, got_rows)
    out_ref, bound = ll_combine_expected(ref_buf, y_ref, topk_idx, weights, r_handle, use_logfmt)
    poison_pool()
    d_idx, d_w = to_device(topk_idx), to_device(weights)
    if zero_copy:
        y_arg = gpu_buf.get_next_low_latency_combine_buffer(g_handle)
        y_arg[...] = to_device(y_gpu)
    else:
        y_arg = to_device(y_gpu)
    def gpu_combine():
        out = gpu_buf.low_latency_combine(y_arg, d_idx, d_w, g_handle, zero_copy=zero_copy, return_recv_hook=hook,
                                          use_logfmt=use_logfmt)
        _run_hook(out[2], overlap)
        return _synchronized(out)

    out_gpu = agreed(comm, "GPU low_latency_combine", gpu_combine)[0]
    agreed(comm, "low_latency_combine" + (" (LogFMT)" if use_logfmt else ""),
           lambda: check_ll_combine(to_host(out_gpu), out_ref, bound, use_logfmt))


def reference_buffer(comm, gpu_buf=None, **kw) -> reference.Buffer:
    """A reference Buffer mirroring ``gpu_buf``'s topology (``num_nvl_peers``) and modes."""
    if gpu_buf is not None:
        kw.setdefault("num_nvl_peers", gpu_buf.num_nvl_ranks)
    return reference.Buffer(comm, **kw)

