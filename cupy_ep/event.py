"""Events and streams: how communication overlaps with the caller's work."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional


class EventOverlap:
    """A CUDA event recorded on the communication stream, DeepEP-style.

    Args:
        event: a ``cupy.cuda.Event`` or None (nothing to wait for).
        extra_arrays: arrays kept alive until the event is waited on (outputs and
            inputs still in use by the communication stream).

    ``current_stream_wait()`` makes the caller's current stream wait for the event.
    Used as a context manager, the wait happens when the ``with`` block exits, so that
    work inside the block overlaps with the communication.
    """

    def __init__(self, event=None, extra_arrays=()):
        self.event = event
        self.extra_arrays = tuple(extra_arrays)

    def current_stream_wait(self) -> None:
        if self.event is not None:
            import cupy

            cupy.cuda.get_current_stream().wait_event(self.event)
            self.extra_arrays = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait()
        return False


@dataclass
class Call:
    """One communication call: the caller's stream, the stream its kernels go to, and
    ``alloc``, the context its outputs are allocated in (``with call.alloc:``): the comm stream
    with ``allocate_on_comm_stream``, else nothing to switch (the caller's stream is current)."""

    caller: Any
    stream: Any
    alloc: Any


_CURRENT_STREAM = nullcontext()   # allocations on the current (the caller's) stream: no switch


class StreamOrder:
    """Orders a Buffer's communication kernels with respect to the caller's streams.

    Kernels go to the Buffer's communication stream, after the caller's current stream (or
    after ``previous_event``), and the caller's stream waits for them before the call returns
    (``async_finish=False``) or the call returns an event to wait on. A call may instead launch
    on the caller's stream itself (``on_comm_stream=False``): the same order, without the two
    cross-stream waits. Whatever the streams, every call also follows the previous call's
    kernels: a call from another stream waits for them.
    """

    def __init__(self, comm_stream):
        self.comm_stream = comm_stream
        self._last_stream = None   # the stream the last communication kernel went to
        self._last_event = None    # an event after it (None: record one when needed)

    def begin(self, previous_event: Optional[EventOverlap] = None, on_comm_stream: bool = True,
              allocate_on_comm_stream: bool = False) -> Call:
        import cupy

        caller = cupy.cuda.get_current_stream()
        if not on_comm_stream:
            self._after_last(caller, covered_by=None)
            self._last_stream, self._last_event = caller, None
            return Call(caller, caller, _CURRENT_STREAM)
        comm = self.comm_stream
        if previous_event is not None and previous_event.event is not None:
            comm.wait_event(previous_event.event)
            self._after_last(comm, covered_by=None)
        else:
            comm.wait_event(caller.record())
            self._after_last(comm, covered_by=caller)
        return Call(caller, comm, comm if allocate_on_comm_stream else _CURRENT_STREAM)

    def finish(self, call: Call, async_finish: bool = False, keep_alive=()) -> EventOverlap:
        if call.stream is call.caller:
            return EventOverlap(None)
        event = call.stream.record()
        self._last_stream, self._last_event = call.stream, event
        if async_finish:
            return EventOverlap(event, keep_alive)
        call.caller.wait_event(event)
        return EventOverlap(None)

    def _after_last(self, stream, covered_by) -> None:
        """Makes ``stream`` wait for the last communication kernel, unless it went to ``stream``
        itself or to ``covered_by`` (a stream ``stream`` already waits for).

        Inside a CUDA-graph capture, work outside the capture cannot be waited for; it must have
        been ordered before the capture began (as any graph input must)."""
        last = self._last_stream
        if last is None or last.ptr == stream.ptr or (covered_by is not None and last.ptr == covered_by.ptr):
            return
        if stream.is_capturing() and not last.is_capturing():
            return
        stream.wait_event(self._last_event if self._last_event is not None else last.record())
