"""What a :meth:`cupy_ep.Buffer.profile` block records: kernel times, the kernels' in-kernel
phase marks and the phases of each Python call.

Three views of the same calls:

* **kernel times**: CUDA events right before and after each main kernel launch (the layout,
  notify, dispatch, combine and low-latency kernels); when the GPU has caught up with the host,
  they also hold the launch latency (a few µs);
* **phase marks**: kernels that take a profiling buffer write ``%globaltimer`` checkpoints per
  block (``prof_mark`` in kernels_cu/status.cuh); a phase's time is the latest block's mark
  minus the earliest block's start, and the "end" mark is the kernel's duration on the GPU, the
  quantity DeepEP's tests report;
* **call phases**: inside each ``get_dispatch_layout``, ``dispatch`` and ``combine`` call, a CUDA
  event and a host clock reading at every phase boundary, each named after what the phase did:
  "checked" (argument checks and stream set-up), "handle allocated", "notify launched",
  "barrier launched", "layout launched", "dispatch launched", "combine launched", "host wait",
  "outputs allocated", "outputs published", "finished" (stream hand-over). The event times
  give the call's GPU timeline, host gaps included (a kernel's time falls in the phase its
  launch ends, as events complete when the work queued before them has); the host times say
  how long Python spent in each phase.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import cupy

from . import limits


class Profile:
    """Recorded while a ``with buffer.profile() as prof:`` block runs; read it after the block
    (the readers synchronise on the recorded events)."""

    def __init__(self):
        self._kernels = []    # (name, start event, end event)
        self._phases = []     # (kernel name, cupy uint64 [blocks, PROF_SLOTS], {slot: phase name})
        self._calls = []      # (call name, [(phase, event, host ns)])
        self._open = None     # the marks of the call in progress (None: none)

    # -- recording (engines and Buffer) -------------------------------------------------------
    @contextmanager
    def kernel(self, name: str, stream):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        yield
        end.record(stream)
        self._kernels.append((name, start, end))

    def phase_buffer(self, kernel: str, num_blocks: int, names: dict):
        """A zeroed device buffer for one launch's checkpoints (pass its pointer to the kernel)."""
        buf = cupy.zeros((num_blocks, limits.PROF_SLOTS), dtype=cupy.uint64)
        self._phases.append((kernel, buf, dict(names)))
        return buf

    def begin_call(self, name: str) -> None:
        """Opens call ``name`` (its "start" boundary, on the current stream); the call's later
        :meth:`phase` boundaries belong to it until :meth:`end_call` or the next call."""
        self._open = []
        self._calls.append((name, self._open))
        self.phase("start")

    def phase(self, phase: str, stream=None) -> None:
        """A boundary of the open call (nothing when none is open): an event on ``stream`` (the
        current stream when None) and the host clock."""
        if self._open is None:
            return
        event = cupy.cuda.Event()
        event.record(stream)
        self._open.append((phase, event, time.perf_counter_ns()))

    def end_call(self, stream=None) -> None:
        """The open call's last boundary, "finished" (after the stream hand-over)."""
        self.phase("finished", stream)
        self._open = None

    # -- reading ------------------------------------------------------------------------------
    def kernel_times_us(self) -> dict:
        """``{kernel name: [µs per launch]}``."""
        out = defaultdict(list)
        for name, start, end in self._kernels:
            end.synchronize()
            out[name].append(cupy.cuda.get_elapsed_time(start, end) * 1e3)
        return dict(out)

    def phase_marks_us(self) -> dict:
        """``{"kernel: phase": [µs from the kernel's earliest block start, per launch]}``; "end"
        is the kernel's duration on the GPU."""
        out = defaultdict(list)
        for kernel, buf, names in self._phases:
            marks = cupy.asnumpy(buf).astype("int64")
            start = marks[:, 0][marks[:, 0] > 0]
            if start.size == 0:
                continue
            for slot, phase in names.items():
                col = marks[:, slot][marks[:, slot] > 0]
                if col.size:
                    out[f"{kernel}: {phase}"].append((col.max() - start.min()) / 1e3)
        return dict(out)

    def call_phases_us(self) -> dict:
        """``{call name: {phase: (GPU µs, host µs)}}``, medians over the recorded calls: the time
        from the previous phase boundary to this one on the launch stream's timeline (host gaps
        included) and on the host's clock."""
        per_call = defaultdict(lambda: defaultdict(lambda: ([], [])))
        for name, marks in self._calls:
            for (_, e0, h0), (phase, e1, h1) in zip(marks, marks[1:]):
                e1.synchronize()
                gpu, host = per_call[name][phase]
                gpu.append(cupy.cuda.get_elapsed_time(e0, e1) * 1e3)
                host.append((h1 - h0) / 1e3)
        return {name: {phase: (statistics.median(g), statistics.median(h)) for phase, (g, h) in phases.items()}
                for name, phases in per_call.items()}
