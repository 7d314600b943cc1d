"""What the two normal-mode engines (intranode, internode) share on the host side.

A non-cached dispatch queues its notify and dispatch kernels without waiting; the notify kernel
writes its counts into host-mapped memory (``host_out``); the host waits for them, allocates
the outputs at their exact size and publishes their addresses in a host-mapped descriptor,
which the dispatch kernel's receiving blocks wait for. The two records (int32 / uint64; sizes in
:mod:`cupy_ep.geometry`), as in the kernels:

* host_out: [0] ready value, [1] rows received, [2] 1 when the call was cancelled (bad input on
  some rank), [3] the first rank whose input was bad, [HOST_EXPERT + j] rows of local expert j rounded up
  to ``expert_alignment``;
* descriptor: [0] sequence number (written last), [1] recv_x, [2] recv_scales, [3]
  recv_topk_idx, [4] recv_topk_weights, [5] rows (-1: drop every row).
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Optional

import cupy
import numpy as np

from . import limits
from .engine import F32, I64, Engine, empty_together, ptr
from .errors import CommTimeoutError, cancelled_by_peers
from .geometry import DESC_WORDS, HOST_OUT_INTS
from .memory import HostMapped


@dataclass
class NormalHandle:
    """What every normal-mode handle records about its dispatch (what the shared argument checks
    of cached dispatch and combine read; opaque to users)."""

    num_tokens: int
    num_experts: int
    hidden: int
    num_topk: int
    num_channels: int
    num_rows: int              # rows of the dispatch's outputs (num_worst_tokens in that mode)


@dataclass
class DispatchResult:
    recv_x: object
    recv_scales: object
    recv_topk_idx: object
    recv_topk_weights: object
    num_recv_tokens_per_expert_list: Optional[list]
    handle: object


class NormalEngine(Engine):
    """Base of the normal-mode engines: host-out counts, output descriptor, call sequence."""

    def __init__(self, comm, status, timeout_ns: int, chaos: bool = False):
        super().__init__(comm, status, timeout_ns, chaos)
        self._host_out_mem = HostMapped(HOST_OUT_INTS * 4)
        self._desc_mem = HostMapped(DESC_WORDS * 8)
        self.host_out = self._host_out_mem.view(np.int32, HOST_OUT_INTS)
        self.desc = self._desc_mem.view(np.uint64, DESC_WORDS)
        self._desc_words = _words(self.desc)   # the same words, written without NumPy (a µs less per publication)
        self.host_out_arg = np.uint64(self.host_out.ctypes.data)   # kernel arguments (fixed addresses)
        self.desc_arg = np.uint64(self.desc.ctypes.data)
        self._seq = 0
        self._functions = {}

    def destroy(self) -> None:
        self._host_out_mem.free()
        self._desc_mem.free()

    def join_cancelled_dispatch(self, stream, refused: bool, cached: bool = False) -> None:
        """This rank's part in a dispatch (``cached``: with a handle) whose arguments were refused
        on the host (``refused``: this rank's; else a peer's, learned in a host step before any
        launch), so that the peers' kernels complete the call and cancel it; nothing is read of
        the call's arguments and nothing waits."""
        raise NotImplementedError

    def join_cancelled_combine(self, stream) -> None:
        """As :meth:`join_cancelled_dispatch`, for a combine this rank refused."""
        raise NotImplementedError

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _combine_outputs(self, x, handle: NormalHandle, topk_weights, call):
        """combined_x bf16 ``[N, H]`` and combined_topk_weights float32 ``[N, K]`` (None without weights)."""
        with call.alloc:
            combined_x = cupy.empty((handle.num_tokens, handle.hidden), dtype=x.dtype)
            combined_w = None if topk_weights is None else \
                cupy.empty((handle.num_tokens, handle.num_topk), dtype=cupy.float32)
        self._phase("outputs allocated", call.stream)
        return combined_x, combined_w

    @staticmethod
    def _bias_args(biases) -> tuple:
        """The two bias pointers of the combine kernels (0 where absent; addresses, as both
        launch paths take them)."""
        return tuple(ptr(biases[i]) if i < len(biases) else 0 for i in range(2))

    @staticmethod
    def _given_outputs(outputs, rows: int, fill_padding: bool) -> list:
        """Dispatch kernel arguments for outputs allocated before the launch (worst-token and
        cached dispatch): recv_x, recv_scales, recv_topk_idx, recv_topk_weights (addresses), rows,
        padding flag, no descriptor."""
        return [ptr(outputs[0]), ptr(outputs[1]), ptr(outputs[2]), ptr(outputs[3]), np.int32(rows),
                _FLAGS[bool(fill_padding)], *_NO_DESCRIPTOR]

    def _described_outputs(self, seq: int) -> list:
        """Dispatch kernel arguments for outputs the host publishes later in the descriptor."""
        return [*_NO_OUTPUTS, self.desc_arg, np.uint64(seq)]

    def _dispatch_outputs(self, seq: int, data, scales, num_topk: int, num_worst_tokens: int, call):
        """(outputs, kernel arguments) of a non-cached dispatch: with ``num_worst_tokens`` the
        outputs now (padding rows filled by the kernel), else None and the descriptor of ``seq``
        (:meth:`_finish_dispatch` allocates and publishes them)."""
        if num_worst_tokens > 0:
            outputs = self._alloc_outputs(data, scales, num_topk, num_worst_tokens, call)
            return outputs, self._given_outputs(outputs, num_worst_tokens, True)
        return None, self._described_outputs(seq)

    def _alloc_outputs(self, data, scales, num_topk: int, rows: int, call):
        specs = ([((rows, scales.shape[1]), F32)] if scales is not None else []) + \
            ([((rows, num_topk), I64), ((rows, num_topk), F32)] if num_topk else [])
        with call.alloc:
            recv_x = cupy.empty((rows, data.shape[1]), dtype=data.dtype)
            small = empty_together(*specs) if specs else []   # the rows' scales and top-k: one allocation
        recv_scales = small.pop(0) if scales is not None else None
        recv_idx, recv_w = small if num_topk else (None, None)
        self._phase("outputs allocated", call.stream)
        return recv_x, recv_scales, recv_idx, recv_w

    def _finish_dispatch(self, seq: int, data, scales, num_topk: int, num_local_experts: int, handle,
                         call) -> DispatchResult:
        """Waits for notify's counts, allocates the outputs, publishes them to the receivers (the
        dispatch kernel's receivers wait for that: nothing else comes first), then reads the
        per-expert counts."""
        try:
            num_recv = self._wait_notify(seq)
            self._phase("host wait", call.stream)
            outputs = self._alloc_outputs(data, scales, num_topk, num_recv, call)
        except BaseException:
            self._publish_outputs(seq, (None, None, None, None), -1)   # receivers drop the rows
            raise
        self._publish_outputs(seq, outputs, num_recv)
        self._phase("outputs published", call.stream)
        handle.num_rows = num_recv
        per_expert_list = self.host_out[limits.HOST_EXPERT:limits.HOST_EXPERT + num_local_experts].tolist()
        self._raise_earlier_report()
        return DispatchResult(*outputs, per_expert_list, handle)

    def _raise_earlier_report(self) -> None:
        """Raises a report an earlier call left pending (e.g. a worst-token overflow). After the
        host wait every earlier kernel of every rank has finished, so every rank has the same
        report in view and raises it; this call's kernels have their outputs and finish too."""
        status = self.status
        if status.status != limits.ST_OK and not status.from_layout:
            raise status.take()

    def _publish_outputs(self, seq: int, outputs, rows: int) -> None:
        desc = self._desc_words
        desc[1:6] = [ptr(a) for a in outputs] + [rows & 0xFFFFFFFFFFFFFFFF]
        desc[0] = seq   # last: the receivers wait for it

    def _wait_notify(self, seq: int) -> int:
        """Waits on the host for notify's counts and returns the rows received (the per-expert
        counts stay in ``host_out`` until the next call). When notify cancelled the call (bad
        input on some rank), raises this rank's report, or says which rank's input was bad."""
        out = self.host_out
        deadline = time.monotonic() + float(self.timeout_ns) / 1e9 + 5.0
        while out[0] != seq:
            if self.status.status == limits.ST_TIMEOUT:
                raise self.status.take()
            if time.monotonic() > deadline:
                raise CommTimeoutError("notify_dispatch", self.rank, -1, "host wait for the receive counts")
        if out[2]:
            raise self.status.take() or cancelled_by_peers("dispatch", [int(out[3])], self.rank)
        return int(out[1])


def _words(array: np.ndarray):
    """A ctypes uint64 array over the memory of a uint64 NumPy array."""
    return (ctypes.c_uint64 * array.size).from_address(array.ctypes.data)


_NO_OUTPUTS = (np.uint64(0),) * 4 + (np.int32(0), np.int32(0))   # outputs, rows, padding flag: from the descriptor
_NO_DESCRIPTOR = (np.uint64(0), np.uint64(0))                     # descriptor, sequence: outputs given
_FLAGS = (np.int32(0), np.int32(1))
