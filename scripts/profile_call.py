"""Where the host time of one cupy_ep call goes: a CPU-side profile of single calls.

    mpiexec -n 1 python scripts/profile_call.py [--calls 200] [--tokens 4096] [--low-latency]
        [--cprofile 15] [--json PATH]
    python scripts/profile_call.py --null-device [--cprofile 15]      # any machine, no GPU

Workload as ``bench_intranode.py`` (4096 tokens, hidden 7168, top-8 of 256 experts, the
Buffer's default Config) for ``get_dispatch_layout``, non-cached dispatch (FP8, bf16), cached
and worst-token dispatch and combine; with ``--low-latency`` also the low-latency calls of
``bench_low_latency.py`` (128 tokens, top-8 of 288 experts, FP8 dispatch, bf16 combine, and the
hook mode's send calls and receive hooks) on a second Buffer. Each call runs on an idle
non-default stream (the device synchronised and the ranks met in a barrier before it, untimed),
as a user times one call. Per op, medians over ``--calls`` calls:

* **host us**: the Python call alone (perf_counter around it), no instrumentation;
* **sections** (a second pass): timers around the functions of the call path, µs per call of
  each kind, each function counted without the timed functions it calls: ``checks``
  (Buffer._check_arrays/_check_config and every ``cupy_ep.validation`` function the Buffer
  calls), ``set-up`` (CallSteps.begin, Buffer._begin: pending reports, the call's streams),
  ``lookup`` (kernels and launch constants by call shape), ``alloc`` (cupy.empty/zeros and
  cupy_ep's ``empty_together`` and ``words_together``),
  ``launch`` (Engine._launch: CuPy's argument conversion and the launch), ``wait`` (the host
  wait for notify's counts), ``publish`` (the output descriptor, earlier reports), ``finish``
  (StreamOrder.finish), ``other`` (the rest of the Python code: the timed call minus the
  sections); ``timed`` is that pass's whole call, whose excess over ``host us`` is the
  timers' own cost (a few tenths of a µs per timed function);
* ``--cprofile N``: the N functions with the most own time under cProfile over the same calls
  (cProfile slows Python code down several times: read shares, not µs; CuPy's compiled
  functions appear only through the Python functions that call them).

For a GPU host at 1 rank (several ranks work too: rank 0 reports, and the host wait then
includes waiting for the peers). The GPU-side view of the same calls (kernels and the GPU
timeline per phase) is ``bench_intranode.py``'s whole-call breakdown.

``--null-device``: the normal-mode calls at 1 rank on a machine without a GPU, over
``scripts/null_device.py`` (CuPy's memory, streams and launches replaced by host stand-ins; CuPy's
argument conversion kept): what is left is cupy_ep's own Python and CuPy's array objects, the
share of the host time that changes in this project's code can remove. CuPy's memory pool and the
driver's launches, a few µs each on a GPU host, are not in it.
"""
from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import os
import pstats
import re
import statistics
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

SECTIONS = ("checks", "set-up", "lookup", "alloc", "launch", "wait", "publish", "finish")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank of the normal-mode calls")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256, help="normal mode; rounded down to a multiple of the ranks")
    p.add_argument("--calls", type=int, default=200, help="calls per op and pass (default 200)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (the first compiles)")
    p.add_argument("--low-latency", action="store_true", help="also the low-latency calls (NVSHMEM Buffer)")
    p.add_argument("--ll-tokens", type=int, default=128)
    p.add_argument("--ll-experts", type=int, default=288)
    p.add_argument("--cprofile", type=int, default=0, metavar="N", help="print cProfile's top N functions per op")
    p.add_argument("--json", default=None, help="write every number to this file")
    p.add_argument("--null-device", action="store_true",
                   help="no GPU: 1 rank over scripts/null_device.py (normal mode and layout only)")
    args = p.parse_args(argv)
    if args.calls < 1 or args.warmup < 1:
        p.error("--calls and --warmup must be >= 1")
    if args.null_device and args.low_latency:
        p.error("--null-device has no low-latency mode (NVSHMEM)")
    return args


class Sections:
    """Timers around functions: per kind, the µs spent in the timed functions of that kind,
    each without the timed functions it calls."""

    def __init__(self):
        self.ns = defaultdict(int)
        self._stack = []      # per active timed call: ns spent in timed functions it called
        self._patched = []    # (owner, name, original attribute)

    def wrap(self, owner, name: str, kind: str) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        static = isinstance(original, staticmethod)
        fn = original.__func__ if static else original
        ns, stack, clock = self.ns, self._stack, time.perf_counter_ns

        def timed(*a, **k):
            t0 = clock()
            stack.append(0)
            try:
                return fn(*a, **k)
            finally:
                dt = clock() - t0
                ns[kind] += dt - stack.pop()
                if stack:
                    stack[-1] += dt

        setattr(owner, name, staticmethod(timed) if static else timed)
        self._patched.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()


def instrument(sections: Sections) -> None:
    """Puts the timers of SECTIONS around the call path's functions."""
    import cupy

    from cupy_ep import buffer, collective, engine, event, internode, intranode, layout, low_latency, normal, validation

    called = set(re.findall(r"validation\.(check_\w+)\(", inspect.getsource(buffer)))
    for name in sorted(called):
        sections.wrap(validation, name, "checks")
    for name in ("_check_arrays", "_check_config"):
        sections.wrap(buffer.Buffer, name, "checks")
    sections.wrap(collective.CallSteps, "begin", "set-up")
    sections.wrap(buffer.Buffer, "_begin", "set-up")
    sections.wrap(engine.Engine, "_memoised", "lookup")
    sections.wrap(engine.Engine, "_launch", "launch")
    sections.wrap(engine.Engine, "_launch_values", "launch")
    sections.wrap(cupy, "empty", "alloc")
    sections.wrap(cupy, "zeros", "alloc")
    for module in (intranode, internode, layout, low_latency, normal):   # each imported them by name
        for name in ("empty_together", "words_together"):
            if name in vars(module):
                sections.wrap(module, name, "alloc")
    sections.wrap(normal.NormalEngine, "_wait_notify", "wait")
    sections.wrap(normal.NormalEngine, "_publish_outputs", "publish")
    sections.wrap(normal.NormalEngine, "_raise_earlier_report", "publish")
    sections.wrap(event.StreamOrder, "finish", "finish")


class Op:
    """One measured call: ``call(setup())`` is timed; ``teardown(result)`` runs after it, untimed
    (e.g. the receive hook of a timed send)."""

    def __init__(self, name, call, setup=lambda: None, teardown=lambda out: None):
        self.name, self.call, self.setup, self.teardown = name, call, setup, teardown

    def run(self, comm, calls: int, sections=None, profiler=None):
        """Median host µs per call over ``calls`` (with ``sections``: also their µs per call)."""
        import cupy

        times = []
        if sections is not None:
            sections.ns.clear()
        for _ in range(calls):
            state = self.setup()
            cupy.cuda.runtime.deviceSynchronize()
            comm.Barrier()
            if profiler is not None:
                profiler.enable()
            t0 = time.perf_counter_ns()
            out = self.call(state)
            t1 = time.perf_counter_ns()
            if profiler is not None:
                profiler.disable()
            times.append((t1 - t0) / 1e3)
            self.teardown(out)
        cupy.cuda.runtime.deviceSynchronize()
        per_call = {} if sections is None else {k: sections.ns[k] / calls / 1e3 for k in SECTIONS}
        return statistics.median(times), statistics.mean(times), per_call


def normal_ops(buf, comm, args, null_device=None) -> list:
    """The normal-mode ops. With a ``null_device`` (1 rank), its notify reports what the
    routing sends to this rank, and the FP8 input is made without a kernel."""
    import cupy

    import cupy_ep
    from cupy_ep import testing

    n, h, k = args.tokens, args.hidden, args.topk
    e = bc.round_experts(args.experts, comm.Get_size())
    rng = np.random.default_rng([1234, comm.Get_rank(), n])
    x = testing.to_device(testing.make_x(rng, n, h))
    routing = testing.make_routing(rng, n, e, k, "random")
    if null_device is None:
        x_fp8 = cupy_ep.per_token_cast_to_fp8(x)
    else:
        x_fp8 = cupy.empty((n, h), cupy.uint8), cupy.empty((n, h // 128), cupy.float32)
        null_device.rows_received = int((routing >= 0).any(axis=1).sum())
        null_device.per_expert = np.bincount(routing[routing >= 0], minlength=e).astype(np.int32)
    idx = cupy.asarray(routing)
    w = cupy.asarray(testing.make_weights(rng, n, k))
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, e)
    rt = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
              topk_idx=idx, topk_weights=w)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, **rt)
    worst = comm.Get_size() * n
    return [Op("layout", lambda _: buf.get_dispatch_layout(idx, e)),
            Op("dispatch FP8", lambda _: buf.dispatch(x_fp8, **rt)),
            Op("dispatch bf16", lambda _: buf.dispatch(x, **rt)),
            Op("dispatch bf16 cached", lambda _: buf.dispatch(x, handle=handle)),
            Op("dispatch bf16 worst-tok", lambda _: buf.dispatch(x, **rt, num_worst_tokens=worst)),
            Op("combine bf16", lambda _: buf.combine(recv_x, handle))]


def low_latency_ops(buf, comm, args) -> list:
    import cupy
    import ml_dtypes

    from cupy_ep import testing

    r, rank = comm.Get_size(), comm.Get_rank()
    m, h, k = args.ll_tokens, args.hidden, args.topk
    e = bc.round_experts(args.ll_experts, r)
    rng = np.random.default_rng([4321, rank, e])
    x = testing.to_device(testing.make_x(rng, m, h))
    idx = cupy.asarray(testing.make_routing(rng, m, e, k, "random"))
    w = cupy.asarray(testing.make_weights(rng, m, k))
    y = cupy.random.RandomState(1000 + rank).standard_normal((e // r, r * m, h), dtype=cupy.float32).astype(
        ml_dtypes.bfloat16)

    def dispatch(hook=False):
        return buf.low_latency_dispatch(x, idx, m, e, use_fp8=True, return_recv_hook=hook)

    def combine(handle, hook=False):
        return buf.low_latency_combine(y, idx, w, handle, return_recv_hook=hook)

    handle = dispatch()[2]
    return [Op("LL dispatch FP8", lambda _: dispatch()),
            Op("LL combine bf16", lambda _: combine(handle)),
            Op("LL hook: dispatch send", lambda _: dispatch(hook=True), teardown=lambda out: out[4]()),
            Op("LL hook: dispatch recv", lambda hook: hook(), setup=lambda: dispatch(hook=True)[4]),
            Op("LL hook: combine send", lambda _: combine(handle, hook=True), teardown=lambda out: out[2]()),
            Op("LL hook: combine recv", lambda hook: hook(), setup=lambda: combine(handle, hook=True)[2])]


def profile_ops(comm, ops, args) -> list:
    """[(name, host us median, host us mean, {section: µs}, timed us mean, cProfile text)]."""
    results = []
    for op in ops:
        op.run(comm, args.warmup)
        host, host_mean, _ = op.run(comm, args.calls)
        sections = Sections()
        instrument(sections)
        try:
            _, timed_mean, per_call = op.run(comm, args.calls, sections=sections)
        finally:
            sections.restore()
        text = ""
        if args.cprofile:
            prof = cProfile.Profile()
            op.run(comm, args.calls, profiler=prof)
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.cprofile)
            text = out.getvalue()
        results.append((op.name, host, host_mean, per_call, timed_mean, text))
    return results


def report(results, header: str, args) -> None:
    print(header)
    print("# host us: median of the Python call; sections: mean us per call of the instrumented pass (each "
          "function without the timed functions it calls); other = timed - sections; timed: that pass's mean call")
    rows = []
    for name, host, host_mean, per_call, timed_mean, _ in results:
        other = timed_mean - sum(per_call.values())
        rows.append([name, bc.fmt(host, ".1f", 7), bc.fmt(host_mean, ".1f", 7),
                     *(bc.fmt(per_call[s], ".1f", 7) for s in SECTIONS), bc.fmt(other, ".1f", 7),
                     bc.fmt(timed_mean, ".1f", 7)])
    bc.print_table(["op", "host us", "mean", *SECTIONS, "other", "timed"], rows, [24] + [7] * (len(SECTIONS) + 4))
    for name, *_, text in results:
        if text:
            print(f"\n## cProfile, {name} ({args.calls} calls; own time first)")
            print("\n".join(line for line in text.splitlines()[4:] if line.strip()))


def write_results(args, results, device: str, ranks: int) -> None:
    """Every number into ``--json`` (when given)."""
    if not args.json:
        return
    bc.write_json(args.json, dict(bench="profile_call", device=device, ranks=ranks, argv=sys.argv[1:],
                                  ops=[dict(op=n, host_us=h, host_us_mean=hm, sections_us=s, timed_us_mean=t)
                                       for n, h, hm, s, t, _ in results]))
    print(f"# wrote {args.json}")


def main_null_device(args) -> None:
    from null_device import NullDevice   # beside this script (on sys.path, as bench_common)
    from mpi4py import MPI

    comm = MPI.COMM_SELF
    with NullDevice(record=False) as device:
        import cupy_ep

        buf = cupy_ep.Buffer(comm, num_nvl_bytes=cupy_ep.Buffer.get_nvl_buffer_size_hint(args.tokens, args.hidden, 1,
                                                                                          args.topk))
        try:
            results = profile_ops(comm, normal_ops(buf, comm, args, device), args)
        finally:
            buf.destroy()
    report(results, f"# profile_call --null-device (no GPU: cupy_ep's Python and CuPy's array objects only), normal "
                    f"mode {args.tokens} tokens, hidden {args.hidden}, top-{args.topk} of {args.experts} experts; "
                    f"{args.calls} calls per op and pass", args)
    write_results(args, results, "null", 1)


def main():
    args = parse_args()
    if args.null_device:
        main_null_device(args)
        return
    bc.set_env_defaults()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    bc.exit_unless_gpus(comm, "profile_call.py")
    import cupy

    import cupy_ep

    r = comm.Get_size()
    results = []
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        buf = cupy_ep.Buffer(comm, num_nvl_bytes=cupy_ep.Buffer.get_nvl_buffer_size_hint(args.tokens, args.hidden, r,
                                                                                          args.topk))
        try:
            results += profile_ops(comm, normal_ops(buf, comm, args), args)
        finally:
            buf.destroy()
        if args.low_latency:
            e = bc.round_experts(args.ll_experts, r)
            ll = cupy_ep.Buffer(comm, low_latency_mode=True, num_rdma_bytes=cupy_ep.Buffer.get_low_latency_rdma_size_hint(
                args.ll_tokens, args.hidden, r, e))
            try:
                results += profile_ops(comm, low_latency_ops(ll, comm, args), args)
            finally:
                ll.destroy()
    if comm.Get_rank() != 0:
        return
    report(results, f"# profile_call: {r} x {bc.device_name()}, normal mode {args.tokens} tokens, hidden {args.hidden}, "
                    f"top-{args.topk} of {bc.round_experts(args.experts, r)} experts; {args.calls} calls per op and pass",
           args)
    write_results(args, results, bc.device_name(), r)


if __name__ == "__main__":
    from cupy_ep.testing import run_or_abort

    run_or_abort(main)
