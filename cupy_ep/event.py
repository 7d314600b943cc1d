"""Events and streams: how communication overlaps with the caller's work."""
from __future__ import annotations


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
