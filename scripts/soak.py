"""Soak / chaos run: many randomized round trips, every result checked, Buffers reused and recreated.

    mpiexec -n 4 python scripts/soak.py --iters 500 [--backend auto|reference|gpu] [--chaos]
    mpiexec -n 4 python scripts/soak.py --num-nvl-peers 4 2 1 --iters 200     # internode layouts too
    mpiexec -n 3 python scripts/soak.py --iters 20                            # CPU: the reference alone

Each iteration draws a normal-mode or a low-latency round trip with random shapes (the same on
every rank: hidden size, top-k 1..9, experts per rank, bf16 or FP8, routing kind: random,
skewed, -1 slots, duplicated experts; empty ranks), each rank its own number of tokens (0
included), and options: cached dispatch, worst-token mode (and, now and then, a deliberate
worst-token overflow that must raise ``TokenOverflowError`` on every rank and leave the Buffer
working), expert alignment, biases, receive hooks, zero-copy combine, FP8 scale rounding / UE8M0,
cumulative receive statistics.

* GPU backend (``--backend gpu``, or ``auto`` when every rank has a GPU): every call runs on the
  GPU Buffer and on the reference with the same inputs, compared element by element
  (``cupy_ep.testing.normal_round_trip``, ``cached_round_trip``, ``low_latency_round_trip``).
* Reference backend (``--backend reference``): the reference alone (``normal_round_trip`` with
  ``gpu_buf=None``) plus invariants checked here: identity experts (combine of the received rows
  gives each token times the number of ranks that received it, bit for bit; the low-latency
  combine gives ``sum_k w_k * x``), cached dispatch = the same rows, received counts = sent
  (token, expert) pairs, statistics.

Buffers are reused across iterations and recreated every ``--recreate-every`` iterations (and
after a failure); after each recreate the memory in use is recorded (GPU: device memory with the
CuPy pool emptied; CPU: this process's resident memory). Then ``--create-destroy-cycles`` Buffers
are created, used once and destroyed, and the memory growth over the cycles is reported (a
failure when it exceeds ``--leak-slack-mib``).

Every check is agreed on by all ranks (``cupy_ep.testing.agree``), so a failure on one rank is
reported on all and the run goes on; a watchdog aborts the job when an iteration makes no progress
for ``--stall-timeout`` seconds (a rank stuck in a collective). Rank 0 prints one line per failure,
a summary table last, and with ``--json PATH`` (``-``: stdout) the same numbers as JSON. Exit code:
0 when nothing failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from mpi4py import MPI

try:
    import cupy_ep  # noqa: F401
except ImportError:       # running from a source checkout without `pip install .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import cupy_ep  # noqa: F401

import ml_dtypes  # noqa: E402

from cupy_ep import limits, reference  # noqa: E402
from cupy_ep.errors import TokenOverflowError  # noqa: E402
from cupy_ep.fp8 import per_token_cast_back  # noqa: E402
from cupy_ep.testing import (Mismatch, agree, gpu_bytes_in_use, make_routing, make_weights, make_x,  # noqa: E402
                             normal_round_trip)

BF16 = ml_dtypes.bfloat16

# Shapes per backend. Every shape drawn from these lists is the same on all ranks; the token count
# is each rank's own (0 included). On GPUs every new (hidden, top-k, experts, M, FP8 mode) is a new
# kernel specialisation (compiled once, then cached on disk), hence shorter lists there.
SHAPES = {
    "reference": dict(max_tokens=24, hidden=(128, 256, 136, 384), topk=tuple(range(1, 10)), experts_per_rank=(1, 2, 3, 4, 6),
                ll_m=tuple(range(1, 17)), ll_hidden=(128, 256), ll_topk=tuple(range(1, 10))),
    "gpu": dict(max_tokens=256, hidden=(256, 2880, 7168), topk=(1, 4, 9), experts_per_rank=(2, 8),
                ll_m=(128,), ll_hidden=(256, 7168), ll_topk=(1, 8, 9)),
}
KINDS = ("random", "skewed", "holes", "dups")


# ---------------------------------------------------------------------------------------- setup
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=None,
                    help="round trips per NVLink layout (default: 50 on CPU, 500 on GPU)")
    ap.add_argument("--seed", type=int, default=None, help="shared seed (default: fresh, printed)")
    ap.add_argument("--backend", choices=("auto", "reference", "gpu", "cpu"), default="auto",
                    help="gpu: GPU Buffer checked against the reference; reference: the reference alone "
                         "('cpu' is an old name for it); auto (default): gpu when every rank has a GPU")
    ap.add_argument("--recreate-every", type=int, default=None,
                    help="destroy and recreate the Buffers every this many iterations (default 10 CPU, 50 GPU)")
    ap.add_argument("--create-destroy-cycles", type=int, default=None,
                    help="Buffers created, used once and destroyed at the end (default 200 on GPU, 20 on CPU)")
    ap.add_argument("--num-nvl-peers", nargs="+", default=None,
                    help="NVLink domain sizes to soak, one after another ('host' = ranks per host; default: "
                         "host, or the largest divisor of R up to 8 beyond 8 ranks); e.g. 2 1 on 4 ranks")
    ap.add_argument("--chaos", action="store_true", help="pass chaos=True to the GPU Buffers (random pauses)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--normal", action="store_true", help="normal mode only")
    mode.add_argument("--low-latency", action="store_true", help="low-latency mode only")
    ap.add_argument("--max-tokens", type=int, default=None, help="most tokens per rank (default per backend)")
    ap.add_argument("--overflow-prob", type=float, default=0.05,
                    help="share of normal iterations that overflow num_worst_tokens on purpose")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="stop the iterations after this many seconds (the cycles still run)")
    ap.add_argument("--stall-timeout", type=float, default=300.0,
                    help="abort the job when an iteration makes no progress for this many seconds")
    ap.add_argument("--leak-slack-mib", type=float, default=32.0,
                    help="memory growth over the create/destroy cycles that counts as a leak")
    ap.add_argument("--timeout-s", type=float, default=30.0, help="GPU Buffer timeout_s")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the summary as JSON ('-': stdout)")
    ap.add_argument("--quiet", action="store_true", help="no per-recreate lines")
    return ap.parse_args(argv)


def resolve_backend(comm, choice):
    if choice in ("reference", "cpu"):
        return "reference"
    ok = cupy_ep.gpu_available(comm)
    if choice == "gpu" and not ok:
        raise SystemExit("soak: --backend gpu, but not every rank has a usable GPU")
    return "gpu" if ok else "reference"


def nvl_layouts(comm, values):
    R = comm.Get_size()
    if values is None:
        return [None if R <= limits.MAX_NVL_PEERS else max(p for p in range(1, limits.MAX_NVL_PEERS + 1) if R % p == 0)]
    out = []
    for v in values:
        p = None if v in ("host", "none", "None", "0") else int(v)
        if p is not None and (p < 1 or R % p or p > limits.MAX_NVL_PEERS):
            raise SystemExit(f"soak: --num-nvl-peers {p}: must divide the {R} ranks and be at most "
                             f"{limits.MAX_NVL_PEERS}")
        out.append(p)
    return out


class Watchdog:
    """Aborts the job (every rank) when :meth:`tick` is not called for ``timeout`` seconds."""

    def __init__(self, comm, timeout):
        self.comm, self.timeout, self.what = comm, timeout, "start"
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def tick(self, what):
        self.what, self.last = what, time.monotonic()

    def _run(self):
        while not self._stop.wait(min(5.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                sys.stderr.write(f"soak: rank {self.comm.Get_rank()}: no progress for {self.timeout:.0f} s in "
                                 f"'{self.what}'; aborting the job\n")
                sys.stderr.flush()
                self.comm.Abort(3)

    def stop(self):
        self._stop.set()


def memory_in_use_mib(comm, backend):
    """The most over the ranks of: GPU: device memory in use, measured while no rank holds CuPy
    pool blocks (ranks sharing a GPU see each other's); CPU: the process's resident memory."""
    if backend == "gpu":
        mib = gpu_bytes_in_use(comm) / 2 ** 20
    else:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        mib = resident_pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    return max(comm.allgather(mib))


# ---------------------------------------------------------------------------------------- buffers
class Buffers:
    """The soak's Buffers of one NVLink layout: normal (GPU + reference) and low-latency ones."""

    def __init__(self, comm, backend, peers, shapes, args, stats):
        self.comm, self.backend, self.peers, self.shapes, self.args, self.stats = \
            comm, backend, peers, shapes, args, stats
        self.normal = self.ll = None   # (gpu or None, reference)

    def _make(self, **kw):
        """(gpu, ref) Buffers with these sizes; the reference mirrors the GPU's topology."""
        gpu = None
        if self.backend == "gpu":
            gpu = cupy_ep.Buffer(self.comm, num_nvl_peers=self.peers, chaos=self.args.chaos,
                                 timeout_s=self.args.timeout_s, **kw)
            self.stats["buffers_made"] += 1
        ref = reference.Buffer(self.comm, num_nvl_peers=self.peers if gpu is None else gpu.num_nvl_ranks, **kw)
        self.stats["buffers_made"] += 1
        return gpu, ref

    def normal_kwargs(self):
        R = self.comm.Get_size()
        peers = R if self.peers is None else self.peers
        n, h = self.shapes["max_tokens"], max(self.shapes["hidden"])
        k = max(self.shapes["topk"])
        return dict(num_nvl_bytes=reference.Buffer.get_nvl_buffer_size_hint(n, h, R, k, num_nvl_peers=peers),
                    num_rdma_bytes=reference.Buffer.get_rdma_buffer_size_hint(n, h, R, peers, k))

    def ll_kwargs(self):
        R = self.comm.Get_size()
        nbytes = reference.Buffer.get_low_latency_rdma_size_hint(
            max(self.shapes["ll_m"]), max(self.shapes["ll_hidden"]), R, max(self.shapes["experts_per_rank"]) * R)
        return dict(num_rdma_bytes=nbytes, low_latency_mode=True)

    def get_normal(self):
        if self.normal is None:
            self.normal = self._make(**self.normal_kwargs())
        return self.normal

    def get_ll(self):
        if self.ll is None:
            self.ll = self._make(**self.ll_kwargs())
        return self.ll

    def destroy(self):
        for pair in (self.normal, self.ll):
            if pair is not None:
                for b in pair:
                    if b is not None:
                        b.destroy()
        self.normal = self.ll = None


# ---------------------------------------------------------------------------------------- trips
def draw_tokens(rng, max_tokens):
    """This rank's token count: 0 now and then, else 1..max_tokens."""
    return 0 if rng.random() < 0.15 else int(rng.integers(1, max_tokens + 1))


def normal_trip(comm, bufs, shared, rng, shapes, args):
    """One normal-mode round trip (drawn), checked. Returns the label counted in the summary."""
    gpu, ref = bufs.get_normal()
    R = comm.Get_size()
    hidden = int(shared.choice(shapes["hidden"]))
    use_fp8 = hidden % 128 == 0 and shared.random() < 0.4
    num_topk = int(shared.choice(shapes["topk"]))
    e_local = int(shared.choice(shapes["experts_per_rank"]))
    num_experts = e_local * R
    kind = str(shared.choice(KINDS))
    with_topk = shared.random() < 0.85
    expert_alignment = int(shared.choice([1, 1, 2, 4, 16]))
    bias_count = int(shared.integers(0, 3))
    empty = (R - 1,) if (R > 1 and shared.random() < 0.1) else ()
    worst_mode = shared.random() < 0.25
    cached = shared.random() < 0.4
    overflow = shared.random() < args.overflow_prob
    n = draw_tokens(rng, shapes["max_tokens"])
    if overflow:
        return overflow_trip(comm, gpu, ref, shared, rng, hidden)
    num_worst = 0
    if worst_mode:   # enough for any rank: every token of every rank, plus some padding
        num_worst = max(1, sum(comm.allgather(n)) + int(shared.integers(0, 4)))
    trip = normal_round_trip(comm, ref, gpu, rng, num_tokens=n, hidden=hidden, num_topk=num_topk,
                             num_experts=num_experts, use_fp8=use_fp8, kind=kind, with_topk=with_topk,
                             expert_alignment=expert_alignment, num_worst_tokens=num_worst, bias_count=bias_count,
                             empty_ranks=empty)
    label = "normal" + ("/fp8" if use_fp8 else "") + ("/worst" if worst_mode else "")
    if gpu is not None:
        if cached:
            from cupy_ep.testing import cached_round_trip

            cached_round_trip(comm, ref, gpu, rng, trip, use_fp8=use_fp8)
            label += "/cached"
    else:
        identity_combine_check(comm, ref, trip, use_fp8)
        label += "/cached"   # the identity check dispatches through the handle
    return label


def identity_combine_check(comm, ref, trip, use_fp8):
    """CPU invariants: a cached dispatch of the same x gives rows whose combine (identity experts)
    is each token times the number of ranks that received it, bit for bit."""
    h = trip.ref_handle
    out = ref.dispatch(trip.x, handle=h)
    ok = all(v is None for v in out[1:5])
    recv = out[0]
    if use_fp8:
        y = per_token_cast_back(recv[0], recv[1], BF16)
        xq = per_token_cast_back(trip.x[0], trip.x[1], BF16)
    else:
        y, xq = recv, trip.x
    ok = ok and y.shape == (h.num_rows, h.hidden)
    combined, w, _ = ref.combine(y, h)
    copies = h.is_token_in_rank.sum(axis=1).astype(np.float32)
    want = (xq.astype(np.float32) * copies[:, None] + np.float32(0)).astype(BF16)   # + 0: no -0 for unsent tokens
    ok = ok and w is None and combined.shape == want.shape and np.array_equal(combined.view(np.uint16),
                                                                               want.view(np.uint16))
    sent = comm.allreduce(int(h.send_counts.sum()))
    got = comm.allreduce(int(h.num_recv_tokens))
    agree(comm, ok and sent == got, f"identity experts: combine of the received rows is not x * copies "
                                    f"(rows sent {sent}, received {got})")


def overflow_trip(comm, gpu, ref, shared, rng, hidden):
    """A worst-token dispatch that overflows on rank 0 (every token picks expert 0): raises
    TokenOverflowError on every rank (the GPU at check()), and the Buffer keeps working."""
    R = comm.Get_size()
    n = 2
    x = make_x(rng, n, hidden)
    idx = np.full((n, 2), -1, np.int64)
    idx[:, 0] = 0
    w = make_weights(rng, n, 2)
    outcomes = []
    for b, conv in ((ref, lambda a: a), (gpu, None)):
        if b is None:
            continue
        if conv is None:
            from cupy_ep.testing import to_device as conv
        d_idx = conv(idx)
        lay = b.get_dispatch_layout(d_idx, R)
        try:
            b.dispatch(conv(x), num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1], is_token_in_rank=lay[3],
                       num_tokens_per_expert=lay[2], topk_idx=d_idx, topk_weights=conv(w), num_worst_tokens=1)
            b.check()
            outcomes.append("nothing raised")
        except TokenOverflowError as e:
            outcomes.append(None if (e.rank, e.arrived, e.allowed) == (0, n * R, 1) else f"fields {e.rank, e.arrived, e.allowed}")
        except Exception as e:  # noqa: BLE001
            outcomes.append(f"{type(e).__name__}: {e}")
    bad = [o for o in outcomes if o is not None]
    agree(comm, not bad, f"worst-token overflow: {bad}")
    return "normal/overflow"


def ll_trip(comm, bufs, shared, rng, shapes):
    gpu, ref = bufs.get_ll()
    R = comm.Get_size()
    hidden = int(shared.choice(shapes["ll_hidden"]))
    m = int(shared.choice(shapes["ll_m"]))
    num_topk = int(shared.choice(shapes["ll_topk"]))
    num_experts = int(shared.choice(shapes["experts_per_rank"])) * R
    use_fp8 = shared.random() < 0.6
    round_scale = use_fp8 and shared.random() < 0.3
    use_ue8m0 = round_scale and shared.random() < 0.5
    kind = str(shared.choice(KINDS))
    hook = shared.random() < 0.3
    zero_copy = shared.random() < 0.3
    n = 0 if rng.random() < 0.15 else int(rng.integers(1, m + 1))
    label = "low_latency" + ("/fp8" if use_fp8 else "") + ("/hook" if hook else "")
    if gpu is not None:
        from cupy_ep.testing import low_latency_round_trip

        low_latency_round_trip(comm, ref, gpu, rng, num_tokens=n, hidden=hidden, num_topk=num_topk,
                               num_experts=num_experts, m=m, use_fp8=use_fp8, round_scale=round_scale,
                               use_ue8m0=use_ue8m0, kind=kind, hook=hook, zero_copy=zero_copy)
    else:
        cpu_ll_check(comm, ref, shared, rng, n=n, hidden=hidden, num_topk=num_topk, num_experts=num_experts, m=m,
                     use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0, kind=kind, hook=hook,
                     zero_copy=zero_copy)
    if shared.random() < 0.1:
        for b in (gpu, ref):
            if b is not None:
                b.clean_low_latency_buffer(m, hidden, num_experts)
    return label


def cpu_ll_check(comm, ref, shared, rng, *, n, hidden, num_topk, num_experts, m, use_fp8, round_scale, use_ue8m0,
                 kind, hook, zero_copy):
    """CPU invariants of a low-latency round trip with identity experts."""
    R = comm.Get_size()
    e_local = num_experts // R
    x = make_x(rng, n, hidden)
    idx = make_routing(rng, n, num_experts, num_topk, kind, R)
    w = make_weights(rng, n, num_topk)
    stats0 = rng.integers(0, 50, size=e_local).astype(np.int32)
    stats = stats0.copy() if shared.random() < 0.5 else None
    recv_x, count, handle, _, dhook = ref.low_latency_dispatch(
        x, idx, m, num_experts, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
        return_recv_hook=hook, cumulative_local_expert_recv_stats=stats)
    msgs = []
    if dhook is not None:
        dhook()
    pairs = sum(len({int(v) for v in row if v >= 0}) for row in idx)
    if comm.allreduce(int(count.sum())) != comm.allreduce(pairs):
        msgs.append("received rows != sent (token, expert) pairs")
    if stats is not None and not np.array_equal(stats, stats0 + count):
        msgs.append("cumulative statistics")
    if len(handle) != 6 or (handle[5].num_tokens, handle[5].topk) != (n, num_topk):
        msgs.append("handle[5] does not carry num_tokens / topk")
    y = per_token_cast_back(recv_x[0], recv_x[1], BF16) if use_fp8 else recv_x
    if zero_copy:
        buf = ref.get_next_low_latency_combine_buffer(handle)
        buf[...] = y
        y = buf
    out = np.full((n, hidden), np.nan, BF16) if shared.random() < 0.3 else None
    got, _, chook = ref.low_latency_combine(y, idx, w, handle, zero_copy=zero_copy, return_recv_hook=hook, out=out)
    if chook is not None:
        chook()
    if out is not None and got is not out:
        msgs.append("out= not returned")
    if use_fp8:
        q = cupy_ep.per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
        xq = per_token_cast_back(q[0], q[1], np.float32).astype(np.float64)
    else:
        xq = x.astype(np.float64)
    wsum = np.where(idx >= 0, w, 0).astype(np.float64).sum(axis=1)[:, None]
    want = wsum * xq
    bound = np.abs(wsum) * np.abs(xq) * 2.0 ** -7 + 1e-30
    if got.shape != (n, hidden) or not (np.abs(got.astype(np.float64) - want) <= bound).all():
        msgs.append("identity experts: combine != sum_k w_k * x")
    agree(comm, not msgs, f"low-latency (fp8={use_fp8}, K={num_topk}, E={num_experts}, kind={kind}): {msgs}")


# ---------------------------------------------------------------------------------------- run
def attempt(comm, fn):
    """Runs ``fn`` on every rank; returns (result, None) or (None, message) on every rank."""
    try:
        result, err = fn(), None
    except Mismatch as e:        # raised on every rank by agree
        result, err = None, str(e)
    except Exception as e:  # noqa: BLE001 - an unexpected error on some rank: tell every rank
        result, err = None, f"{type(e).__name__}: {e}"
    errs = comm.allgather(err)
    if any(m is not None for m in errs):
        return None, _compress(errs)
    return result, None


def _compress(errs):
    """One line for the ranks' errors: identical messages (also inside agree's "rank r: ...; ..."
    lists) are named once with their ranks."""
    by_msg = OrderedDict()
    for r, m in enumerate(errs):
        if m is None:
            continue
        parts = m.split("; rank ") if m.startswith("rank ") else [m]
        for i, part in enumerate(parts):
            text = ("rank " + part) if (i > 0 or m.startswith("rank ")) and not part.startswith("rank ") else part
            who, sep, what = text.partition(": ")
            if sep and who.startswith("rank ") and who[5:].isdigit():
                by_msg.setdefault(what, set()).add(int(who[5:]))
            else:
                by_msg.setdefault(text, set()).add(r)
    return "; ".join(f"ranks {sorted(rs)}: {what}" for what, rs in by_msg.items())


def cycles(comm, backend, peers, shapes, args, stats, modes, rng, watchdog):
    """Create, use once and destroy ``--create-destroy-cycles`` Buffers; memory growth in MiB."""
    num = args.create_destroy_cycles
    series = []
    for i in range(num):
        watchdog.tick(f"create/destroy cycle {i}")
        mode = modes[i % len(modes)]
        bufs = Buffers(comm, backend, peers, shapes, args, stats)
        shared = np.random.default_rng([args.seed, 7, i])

        def one():
            R = comm.Get_size()
            if mode == "normal":
                gpu, ref = bufs.get_normal()
                normal_round_trip(comm, ref, gpu, rng, num_tokens=int(rng.integers(0, 9)), hidden=shapes["hidden"][0],
                                  num_topk=shapes["topk"][-1], num_experts=shapes["experts_per_rank"][0] * R,
                                  kind="holes")
            else:
                gpu, ref = bufs.get_ll()
                kw = dict(hidden=shapes["ll_hidden"][0], num_topk=shapes["ll_topk"][0],
                          num_experts=shapes["experts_per_rank"][0] * R, m=max(shapes["ll_m"]), use_fp8=False)
                n = int(rng.integers(0, min(4, kw["m"]) + 1))
                if gpu is not None:
                    from cupy_ep.testing import low_latency_round_trip

                    low_latency_round_trip(comm, ref, gpu, rng, num_tokens=n, **kw)
                else:
                    cpu_ll_check(comm, ref, shared, rng, n=n, round_scale=False, use_ue8m0=False, kind="random",
                                 hook=False, zero_copy=False, **kw)

        _, err = attempt(comm, one)
        bufs.destroy()
        stats["counts"]["create/destroy"] = stats["counts"].get("create/destroy", 0) + 1
        if err is not None:
            stats["failures"].append(f"create/destroy cycle {i} ({mode}): {err}")
            stats["fail_counts"]["create/destroy"] = stats["fail_counts"].get("create/destroy", 0) + 1
        series.append(memory_in_use_mib(comm, backend))
        if not args.quiet and comm.Get_rank() == 0 and (i + 1) % 10 == 0:
            print(f"  create/destroy cycle {i + 1}/{num}: {series[-1]:.1f} MiB", flush=True)
    return series


def run(args):
    comm = MPI.COMM_WORLD
    rank, R = comm.Get_rank(), comm.Get_size()
    backend = resolve_backend(comm, args.backend)
    shapes = dict(SHAPES[backend])
    if args.max_tokens is not None:
        shapes["max_tokens"] = args.max_tokens
    if args.iters is None:
        args.iters = 50 if backend == "reference" else 500
    if args.recreate_every is None:
        args.recreate_every = 10 if backend == "reference" else 50
    if args.create_destroy_cycles is None:
        args.create_destroy_cycles = 20 if backend == "reference" else 200
    if args.seed is None:
        args.seed = comm.bcast(int(np.random.SeedSequence().entropy % (2 ** 31)) if rank == 0 else None)
    modes = ["normal"] if args.normal else ["low_latency"] if args.low_latency else ["normal", "low_latency"]
    layouts = nvl_layouts(comm, args.num_nvl_peers)
    rng = np.random.default_rng([args.seed, 1000 + rank])   # this rank's own draws (token counts, data)
    stats = dict(buffers_made=0, counts=OrderedDict(), fail_counts={}, failures=[], memory_after_recreate=[])
    watchdog = Watchdog(comm, args.stall_timeout)
    t0 = time.monotonic()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    say(f"soak: backend={backend} ranks={R} seed={args.seed} layouts={layouts} iters={args.iters}/layout "
        f"modes={modes} chaos={args.chaos}")
    mem_label = "GPU memory in use" if backend == "gpu" else "host resident memory (max over ranks)"
    total_iters = 0
    stop = False
    for li, peers in enumerate(layouts):
        bufs = Buffers(comm, backend, peers, shapes, args, stats)
        shared = np.random.default_rng([args.seed, li])        # the same draws on every rank
        for it in range(args.iters):
            if args.time_budget is not None:
                stop = comm.bcast(time.monotonic() - t0 > args.time_budget if rank == 0 else None)
                if stop:
                    break
            mode = modes[int(shared.integers(0, len(modes)))]
            watchdog.tick(f"layout {peers} iteration {it} ({mode})")
            if mode == "normal":
                label, err = attempt(comm, lambda: normal_trip(comm, bufs, shared, rng, shapes, args))
            else:
                label, err = attempt(comm, lambda: ll_trip(comm, bufs, shared, rng, shapes))
            label = label or mode
            total_iters += 1
            stats["counts"][label] = stats["counts"].get(label, 0) + 1
            recreate = (it + 1) % args.recreate_every == 0
            if err is not None:
                stats["failures"].append(f"layout {peers} iteration {it} ({label}): {err}")
                stats["fail_counts"][label] = stats["fail_counts"].get(label, 0) + 1
                say(f"FAIL layout {peers} iteration {it} ({label}): {err}")
                shared = np.random.default_rng([args.seed, li, it])   # resynchronise the shared draws
                recreate = True
            if recreate:
                watchdog.tick(f"layout {peers} recreate after iteration {it}")
                bufs.destroy()
                mib = memory_in_use_mib(comm, backend)
                stats["memory_after_recreate"].append(round(mib, 1))
                if not args.quiet:
                    say(f"  layout {peers}: {it + 1} iterations, {stats['buffers_made']} Buffers made, "
                        f"{mem_label}: {mib:.1f} MiB")
        bufs.destroy()
        if stop:
            break
    t_iters = time.monotonic() - t0
    series = cycles(comm, backend, layouts[0], shapes, args, stats, modes, rng, watchdog) \
        if args.create_destroy_cycles > 0 else []
    watchdog.stop()
    growth = (series[-1] - series[0]) if len(series) > 1 else 0.0
    leak = growth > args.leak_slack_mib
    if leak:
        stats["failures"].append(f"memory grew {growth:.1f} MiB over {len(series)} create/destroy cycles "
                                 f"(slack {args.leak_slack_mib} MiB)")
    summary = dict(backend=backend, ranks=R, seed=args.seed, layouts=layouts, modes=modes, chaos=args.chaos,
                   iterations=total_iters, failures=len(stats["failures"]), buffers_made=stats["buffers_made"],
                   runs=dict(stats["counts"]), failed_runs=stats["fail_counts"], failure_messages=stats["failures"],
                   memory_label=mem_label, memory_after_recreate_mib=stats["memory_after_recreate"],
                   create_destroy_cycles=len(series),
                   cycle_memory_mib=dict(first=round(series[0], 1), last=round(series[-1], 1),
                                         max=round(max(series), 1)) if series else None,
                   cycle_memory_series_mib=[round(v, 1) for v in series],
                   cycle_memory_growth_mib=round(growth, 1), seconds_iterations=round(t_iters, 1),
                   seconds_total=round(time.monotonic() - t0, 1))
    if rank == 0:
        if args.json:
            text = json.dumps(summary, indent=2)
            if args.json == "-":
                print(text, flush=True)
            else:
                Path(args.json).write_text(text + "\n")
        print_summary(summary)   # last
    return 0 if not stats["failures"] else 1


def print_summary(s):
    lines = [f"soak summary: backend={s['backend']} ranks={s['ranks']} seed={s['seed']} layouts={s['layouts']} "
             f"chaos={s['chaos']}",
             f"  {'run':<34}{'runs':>7}{'failed':>8}"]
    for label, num in sorted(s["runs"].items()):
        lines.append(f"  {label:<34}{num:>7}{s['failed_runs'].get(label, 0):>8}")
    mem = s["memory_after_recreate_mib"]
    lines.append(f"  iterations {s['iterations']}, failures {s['failures']}, Buffers made {s['buffers_made']}, "
                 f"{s['seconds_iterations']} s of iterations, {s['seconds_total']} s in all")
    if mem:
        lines.append(f"  {s['memory_label']} after each recreate (MiB): first {mem[0]}, last {mem[-1]}, "
                     f"max {max(mem)} over {len(mem)} recreates")
    if s["cycle_memory_mib"]:
        c = s["cycle_memory_mib"]
        lines.append(f"  create/destroy cycles: {s['create_destroy_cycles']}, {s['memory_label']} first {c['first']} "
                     f"MiB, last {c['last']} MiB, growth {s['cycle_memory_growth_mib']} MiB")
    lines.append("RESULT: " + ("OK" if s["failures"] == 0 else f"FAILED ({s['failures']} failures)"))
    print("\n".join(lines), flush=True)


def main(argv=None):
    args = parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
