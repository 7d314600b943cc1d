"""The cupy_ep contract (docs/api.md) in NumPy over mpi4py: the CPU backend and the oracle.

``cupy_ep.reference.Buffer`` has the same constructor, methods, arguments and returned
tuples as the GPU ``cupy_ep.Buffer``, with NumPy arrays in and out:

- bf16 arrays are ``ml_dtypes.bfloat16``; FP8 data is ``ml_dtypes.float8_e4m3fn`` (``uint8``
  bit patterns are accepted too, and kept as given); FP8 scales are float32 ``[N, H/128]``.
- Every call is collective over the Buffer's communicator (a ``Dup`` of the one given),
  like the GPU calls: all ranks must make the same calls in the same order.
- Metadata and packed byte rows move as pickled point-to-point messages of the Buffer's
  :class:`cupy_ep.collective.Channel` (each round bounded by ``timeout_s``). Results are deterministic: normal-mode rows come ordered by source rank,
  then source token; low-latency rows per expert by source rank, then source token.
- Streams and events do not exist here: ``previous_event``, ``async_finish`` and
  ``allocate_on_comm_stream`` are accepted and ignored (``config`` is checked as on the GPU,
  then ignored); the returned events are ``cupy_ep.EventOverlap`` objects that hold no event
  (their methods do nothing).

The same inputs are accepted and rejected as on the GPU; the shared checks live in
:mod:`cupy_ep.validation`. That includes the buffer sizes: a normal-mode dispatch of more
tokens than ``num_nvl_bytes`` (or, across NVLink domains, ``num_rdma_bytes``) holds, or a
low-latency call that needs more than ``num_rdma_bytes``, raises here as it does on the GPU,
although the reference reserves no memory. Size the buffers with the static size hints.

Errors:

- Every call (and the constructor) is one step of the Buffer's :class:`cupy_ep.collective.Channel`:
  its first round agrees on the arguments, each round is bounded by ``timeout_s``. Bad input
  (wrong dtype, shape, contiguity, sizes, expert ids outside ``[-1, E)``, layout arrays that
  disagree with each other or with ``topk_idx``) is found on the host before anything is sent and
  cancels the call on every rank, as on the GPU: the rank with the bad input raises its own
  ``TypeError`` / ``ValueError`` naming the argument, the others
  ``ValueError("rank r passed invalid input to <call>; the call was cancelled on every rank ...")``
  (:func:`cupy_ep.errors.cancelled_by_peers`). The Buffer stays usable.
- A rank that does not arrive within ``timeout_s`` makes the others raise
  :class:`cupy_ep.errors.CommTimeoutError` naming the call (``.peers``: the absent ranks); when
  it arrives, it learns that they gave up and raises ``CommTimeoutError`` too. A rank that makes
  another call than its peers at the same point raises :class:`cupy_ep.errors.CallMismatchError`,
  as they do. In every case nothing was sent and the Buffer stays usable.
- ``get_dispatch_layout`` is local, as on the GPU: expert ids outside ``[-1, E)`` select nothing
  and are reported by :meth:`Buffer.check` or the next ``get_dispatch_layout`` of that rank, at
  once, else by the next non-cached dispatch, which is cancelled on every rank.
- Arguments that must agree between ranks (hidden size, FP8 or not, number of experts, top-k
  width, M, ...) are compared in the call's first collective; a disagreement raises
  ``ValueError`` on every rank.
- A worst-token dispatch in which some rank would receive more rows than its
  ``num_worst_tokens`` raises :class:`cupy_ep.errors.TokenOverflowError` on every rank
  (nothing is sent; the GPU drops the excess rows and raises the same error at
  :meth:`Buffer.check` or its next non-cached dispatch).
- Any call on a destroyed Buffer raises ``cupy_ep.errors.CupyEpError("this Buffer was
  destroyed")``.

This module needs NumPy, ml_dtypes and mpi4py; it never imports CuPy and runs without a
GPU or a CUDA driver.
"""

import numpy as np

from . import fp8 as _fp8
from . import logfmt as _logfmt
from . import limits
from . import validation as V
from .config import Config
from .collective import open_channel
from .errors import CupyEpError, TokenOverflowError
from .event import EventOverlap   # the public placeholder/event class; with event=None it does nothing

__all__ = ["Buffer", "EventOverlap", "DispatchHandle", "LowLatencyHandleInfo", "BF16_DTYPE", "FP8_DTYPE"]

BF16_DTYPE = V.BF16_DTYPE
FP8_DTYPE = V.FP8_DTYPE
_F32 = np.float32


class DispatchHandle:
    """Normal-mode handle of the reference (opaque to users; pass it to combine / dispatch).

    Attributes:
        num_ranks: R.
        num_tokens: N of this rank when the handle was made.
        hidden: H of the dispatch (combine and cached dispatch must use the same).
        num_topk: K of the dispatch's ``topk_idx`` (0 without one).
        num_experts: E of the dispatch.
        is_token_in_rank: bool ``[N, R]`` (a copy).
        send_counts: int64 ``[R]``: rows this rank sent to each rank.
        recv_counts: int64 ``[R]``: rows this rank received from each rank.
        send_order: int64 ``[sum(send_counts)]``: the token index of each sent row, grouped
            by destination rank, ascending within a destination.
        recv_src_rank: int32 ``[num_recv_tokens]``: source rank of each received row.
        recv_src_idx: int64 ``[num_recv_tokens]``: source token index of each received row.
        num_recv_tokens: rows received (valid rows of ``recv_x``).
        num_rows: rows of ``recv_x`` (``num_worst_tokens`` in worst-token mode).
        owner: the Buffer and dispatch that made it (:class:`cupy_ep.validation.HandleOwner`).
    """

    __slots__ = ("num_ranks", "num_tokens", "hidden", "num_topk", "num_experts", "is_token_in_rank",
                 "send_counts", "recv_counts", "send_order", "recv_src_rank", "recv_src_idx", "num_recv_tokens",
                 "num_rows", "owner")

    def __init__(self, **kw):
        self.owner = None
        for k in self.__slots__[:-1]:
            setattr(self, k, kw[k])

    def __repr__(self):
        return (f"DispatchHandle(num_ranks={self.num_ranks}, num_tokens={self.num_tokens}, hidden={self.hidden}, "
                f"num_topk={self.num_topk}, num_recv_tokens={self.num_recv_tokens}, num_rows={self.num_rows})")


class LowLatencyHandleInfo:
    """``handle[5]`` of a reference low-latency handle (the GPU's is ``LLHandlePrivate``).

    Attributes:
        num_tokens: N of the dispatch (``topk_idx`` / ``topk_weights`` of the combine must be
            ``[num_tokens, topk]``).
        topk: K of the dispatch.
        hidden, num_experts, m: H, E and M of the dispatch.
        sent: sorted int64 keys ``token * E + expert`` of the (token, expert) pairs the dispatch
            sent (a combine may only name those).
        owner: the Buffer and dispatch that made it (:class:`cupy_ep.validation.HandleOwner`).
    """

    __slots__ = ("num_tokens", "topk", "hidden", "num_experts", "m", "sent", "owner")

    def __init__(self, num_tokens, topk, hidden, num_experts, m, sent):
        self.num_tokens, self.topk, self.hidden = int(num_tokens), int(topk), int(hidden)
        self.num_experts, self.m, self.sent = int(num_experts), int(m), sent
        self.owner = None

    def __repr__(self):
        return (f"LowLatencyHandleInfo(num_tokens={self.num_tokens}, topk={self.topk}, hidden={self.hidden}, "
                f"num_experts={self.num_experts}, m={self.m})")


# --------------------------------------------------------------------------- helpers
def _row_bytes(arr, nrows):
    """View an array with ``nrows`` leading rows as uint8 ``[nrows, bytes_per_row]``."""
    per_row = int(np.prod(arr.shape[1:], dtype=np.int64)) if arr.ndim > 1 else 1
    a = np.ascontiguousarray(arr).reshape(nrows, per_row)
    return a.view(np.uint8).reshape(nrows, per_row * arr.dtype.itemsize)


def _pack(fields, nrows):
    """Pack arrays with ``nrows`` rows side by side into one uint8 ``[nrows, B]`` array."""
    parts = [_row_bytes(f, nrows) for f in fields]
    spec = [(np.dtype(f.dtype), tuple(int(s) for s in f.shape[1:]), p.shape[1]) for f, p in zip(fields, parts)]
    packed = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return np.ascontiguousarray(packed), spec


def _unpack(buf, spec):
    out, col = [], 0
    m = buf.shape[0]
    for dtype, rowshape, nbytes in spec:
        part = np.ascontiguousarray(buf[:, col:col + nbytes])
        out.append(part.view(dtype).reshape((m,) + rowshape))
        col += nbytes
    return out


def _alltoallv_rows(step, fields, send_counts, recv_counts):
    """The second round of ``step``: exchange rows. ``fields`` (arrays of equal row count, grouped
    by destination rank with ``send_counts[r]`` rows for rank r) -> the same fields received,
    grouped by source rank (``recv_counts[r]`` rows from rank r, as agreed in the first round)."""
    nsend = int(np.sum(send_counts))
    sendbuf, spec = _pack(fields, nsend)
    bounds = np.concatenate([[0], np.cumsum(send_counts)]).astype(np.int64)
    got = step.exchange([sendbuf[bounds[r]:bounds[r + 1]] for r in range(len(send_counts))])
    got = [sendbuf[:0] if rows is None else rows for rows in got]   # a shrink step's absent ranks: nothing
    for r, (rows, want) in enumerate(zip(got, recv_counts)):
        if r in step.absent or step.peers is not None and r not in step.peers:
            continue
        if rows.shape[0] != int(want):
            raise CupyEpError(f"{step.call}: rank {r} sent {rows.shape[0]} rows, {int(want)} were agreed")
    recvbuf = np.concatenate(got) if got else sendbuf[:0]
    return _unpack(recvbuf.reshape(-1, sendbuf.shape[1]), spec)


def _local_checks(checks):
    """Runs this rank's argument checks ``checks()``; returns ``(result, None)``, or ``(None, error)``
    when they raised TypeError / ValueError (the call's first round then cancels it everywhere)."""
    try:
        return checks(), None
    except (TypeError, ValueError) as e:
        return None, e


def _ceil_div(a, b):
    return -(-a // b)


def _require_numpy(arr, name):
    if arr is not None and not isinstance(arr, np.ndarray):
        raise TypeError(f"{name}: the reference backend takes NumPy arrays, got {type(arr).__module__}.{type(arr).__name__}")


def _require_numpy_items(arr, name):
    """``_require_numpy`` for an array or a tuple/list of them (FP8 pair, biases)."""
    if isinstance(arr, (tuple, list)):
        for i, a in enumerate(arr):
            _require_numpy(a, f"{name}[{i}]")
    else:
        _require_numpy(arr, name)


def _make_hook(finish, return_recv_hook):
    """Run ``finish`` now (no hook) or return a hook that runs it once."""
    if not return_recv_hook:
        finish()
        return None
    state = {"done": False}

    def hook():
        """Complete the receive (fills the arrays returned by the call)."""
        if not state["done"]:
            state["done"] = True
            finish()
    return hook


def _routing_error(n, num_ranks, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                   num_experts, num_tokens_per_rdma_rank, num_nvl_ranks):
    """The first inconsistency of a dispatch's routing values (the checks the GPU's notify kernel
    makes, in its order), as a message naming the argument; None when the routing is valid."""
    if not np.array_equal(is_token_in_rank.sum(axis=0), num_tokens_per_rank):
        return ("num_tokens_per_rank: does not match is_token_in_rank (tokens per rank); "
                "use get_dispatch_layout")
    if num_tokens_per_rdma_rank is not None:
        per_domain = is_token_in_rank.reshape(n, num_ranks // num_nvl_ranks, num_nvl_ranks).any(axis=2).sum(axis=0)
        if not np.array_equal(per_domain, num_tokens_per_rdma_rank):
            return ("num_tokens_per_rdma_rank: does not match is_token_in_rank (tokens per NVLink domain); "
                    "use get_dispatch_layout")
    if topk_idx is None:
        if num_tokens_per_expert.size and int(num_tokens_per_expert.min()) < 0:
            return f"num_tokens_per_expert: counts must be >= 0, found {int(num_tokens_per_expert.min())}"
        return None
    try:
        V.check_topk_range(topk_idx, num_experts)
    except ValueError as e:
        return str(e)
    e_local = num_experts // num_ranks
    idx = topk_idx.astype(np.int64)
    valid = idx >= 0
    expect_in_rank = np.zeros((n, num_ranks), dtype=bool)
    expect_in_rank[np.nonzero(valid)[0], idx[valid] // e_local] = True
    if not np.array_equal(expect_in_rank, is_token_in_rank):
        t = int(np.flatnonzero((expect_in_rank != is_token_in_rank).any(axis=1))[0])
        return f"is_token_in_rank: does not match topk_idx (token {t}); use get_dispatch_layout"
    per_expert = np.bincount(idx[valid], minlength=num_experts)
    if not np.array_equal(per_expert, num_tokens_per_expert):
        e = int(np.flatnonzero(per_expert != num_tokens_per_expert)[0])
        return f"num_tokens_per_expert: does not match topk_idx (expert {e}); use get_dispatch_layout"
    return None


# --------------------------------------------------------------------------- Buffer
def _add_waits(stats, step):
    """Adds the nanoseconds ``step`` waited for each rank's messages to ``stats`` (or nothing)."""
    if stats is not None:
        stats += np.array([int(w * 1e9) for w in step.waited_s], dtype=np.int64)


def _logfmt_partial_sums(idx, topk_weights, y, slots, e_local, num_ranks, hidden):
    """The GPU's LogFMT combine of one rank's tokens (float32 [N, H]): per expert rank d
    ascending, the partial row ``sum_k w * y`` over the token's slots on d (unfused, slot order)
    goes through the LogFMT-10 round trip and is added to the result."""
    n = idx.shape[0]
    acc = np.zeros((n, hidden), dtype=_F32)
    for d in range(num_ranks):
        part = np.zeros((n, hidden), dtype=_F32)
        has = np.zeros(n, dtype=bool)
        for kk, (valid, rows) in enumerate(slots):
            on_d = idx[valid, kk] // e_local == d
            t, r = valid[on_d], rows[on_d]
            part[t] = part[t] + topk_weights[t, kk].astype(_F32)[:, None] * y[r]
            has[t] = True
        if has.any():
            acc[has] = acc[has] + _logfmt.round_trip(part[has])
    return acc


class Buffer:
    """Expert-parallel communication buffer, NumPy reference backend.

    Same API as ``cupy_ep.Buffer`` (itself modelled on DeepEP's ``deep_ep.Buffer``). No
    memory is reserved, but the byte sizes are enforced as on the GPU: the normal mode needs
    ``num_nvl_bytes`` large enough for the call (:meth:`get_nvl_buffer_size_hint`) and, across
    NVLink domains, ``num_rdma_bytes`` (:meth:`get_rdma_buffer_size_hint`); the low-latency mode
    needs ``low_latency_mode=True`` and ``num_rdma_bytes`` (:meth:`get_low_latency_rdma_size_hint`).

    Args:
        comm: mpi4py communicator (None: ``MPI.COMM_WORLD``). Collective over it.
        num_nvl_bytes: NVLink buffer size of the GPU Buffer (>= 0), the same on every rank.
        num_rdma_bytes: NVSHMEM buffer size of the GPU Buffer (>= 0), the same on every rank.
        low_latency_mode: enable the low-latency calls. Across NVLink domains the symmetric
            buffer then belongs to the low-latency mode (no normal mode), as on the GPU.
        num_nvl_peers: ranks per NVLink domain (None: the ranks sharing this host); must divide
            the number of ranks. The normal mode serves domains of at most
            ``limits.MAX_NVL_PEERS`` ranks, like the GPU: with more ranks on one host, give
            ``num_nvl_peers`` (and ``num_rdma_bytes``) as a GPU cluster would need.
        num_sms: SMs the GPU kernels may use (kept, unused).
        timeout_s: the bound of each round of a call's exchange (:mod:`cupy_ep.collective`).
        ll_transport: the GPU's low-latency transport (checked with ``low_latency_mode``, unused).
        chaos: the GPU's test-only chaos mode (unused).
        enable_shrink: DeepEP's shrink mode (needs ``low_latency_mode``): a rank that does not
            arrive in a low-latency call (or ``clean_low_latency_buffer``) within ``timeout_s``
            is masked instead of failing the call; the call completes among the others, the
            tokens routed to a masked rank's experts are dropped (a combine sums the other
            experts: masked experts' weights count as 0), later calls neither send to nor wait
            for it; :meth:`low_latency_query_mask_buffer` tells who is masked,
            :meth:`low_latency_clean_mask_buffer` brings every arriving rank back.
    """

    #: The SM count of the GPU Buffer's default Config (kept for API compatibility, unused here).
    num_sms = Config.num_sms

    def __init__(self, comm=None, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False,
                 num_nvl_peers=None, num_sms=None, timeout_s=limits.DEFAULT_TIMEOUT_S, ll_transport="auto",
                 chaos=None, enable_shrink=False):
        from mpi4py import MPI
        self.comm = None
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Comm):
            raise TypeError(f"comm: expected an mpi4py communicator, got {type(comm).__name__}")
        self.rank = comm.Get_rank()
        self.group_size = comm.Get_size()
        _, refusal = _local_checks(lambda: self._check_args(num_nvl_bytes, num_rdma_bytes, low_latency_mode,
                                                            num_nvl_peers, num_sms, timeout_s, ll_transport,
                                                            enable_shrink))
        self.timeout_s = limits.DEFAULT_TIMEOUT_S if refusal is not None else float(timeout_s)
        self.chaos = bool(chaos)
        self._chan = open_channel(comm, self.timeout_s, "Buffer")
        dup = self._chan.comm
        try:
            step = self._chan.step("Buffer")
            common = [] if refusal is not None else [
                ("low_latency_mode", "value", self.low_latency_mode), ("num_nvl_bytes", "value", self.num_nvl_bytes),
                ("num_rdma_bytes", "value", self.num_rdma_bytes), ("num_nvl_peers", "value", num_nvl_peers),
                ("ll_transport", "value", ll_transport if self.low_latency_mode else None),
                ("enable_shrink", "value", self.enable_shrink)]
            hosts, _ = step.agree(common, private=MPI.Get_processor_name(), refusal=refusal)
            nvl = num_nvl_peers if num_nvl_peers is not None else self._ranks_per_host(hosts)
            V.check_buffer_topology(self.num_nvl_bytes, self.num_rdma_bytes, self.low_latency_mode,
                                    self.group_size, nvl)
            step.finish()
        except BaseException:
            dup.Free()
            raise
        self.comm = dup
        self._ll_combine_buffers = {}
        self._layout_error = None      # bad expert ids seen by get_dispatch_layout, reported later
        self._owner = V.HandleOwner()
        self._mask = np.zeros(self.group_size, dtype=np.int32)   # shrink mode: 1 = masked rank
        self._mask_cleans = 0      # low_latency_clean_mask_buffer calls made (numbers their steps)
        self.num_nvl_ranks = nvl
        self.num_rdma_ranks = self.group_size // nvl

    def _check_args(self, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_nvl_peers, num_sms, timeout_s,
                    ll_transport, enable_shrink):
        """The constructor's local checks; keeps the sizes and modes."""
        V.check_buffer_args(num_nvl_bytes, num_rdma_bytes, low_latency_mode, timeout_s, ll_transport, num_sms)
        V.check_enable_shrink(enable_shrink, low_latency_mode)
        self.enable_shrink = bool(enable_shrink)
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.low_latency_mode = bool(low_latency_mode)
        if num_nvl_peers is not None:
            num_nvl_peers = V.check_int(num_nvl_peers, "num_nvl_peers", 1)
            if self.group_size % num_nvl_peers != 0:
                raise ValueError(f"num_nvl_peers: must divide the number of ranks ({self.group_size}), "
                                 f"got {num_nvl_peers}")
        if num_sms is not None:
            self.num_sms = int(num_sms)

    def _ranks_per_host(self, hosts):
        """The NVLink domain size when none is given: the ranks sharing this host, when every host
        has as many and they divide the ranks; else all ranks (one domain)."""
        local = hosts.count(hosts[self.rank])
        same = all(hosts.count(h) == local for h in hosts)
        return local if same and self.group_size % local == 0 else self.group_size

    # ----------------------------------------------------------------- lifetime
    def destroy(self):
        """Free the Buffer's communicator (collective; idempotent). Later calls raise
        ``CupyEpError("this Buffer was destroyed")``."""
        if self.comm is not None:
            self.comm.Free()
            self.comm = None
            self._ll_combine_buffers = {}

    def is_available(self):
        """True until :meth:`destroy`."""
        return self.comm is not None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.destroy()
        return False

    def _check_alive(self):
        if self.comm is None:
            raise CupyEpError("this Buffer was destroyed")

    def check(self, synchronize=True):
        """Raise what the GPU Buffer would report since the last call (API parity).

        The only report the reference keeps for later is the GPU's: bad expert ids given to
        :meth:`get_dispatch_layout` (raised here, by the next ``get_dispatch_layout`` on this
        rank, or by the next non-cached dispatch on every rank). Raises ``CupyEpError`` on a
        destroyed Buffer.

        Args:
            synchronize: accepted for parity (nothing runs asynchronously here).
        """
        self._check_alive()
        self._raise_layout_error()

    def _take_layout_error(self):
        error, self._layout_error = self._layout_error, None
        return error

    def _raise_layout_error(self):
        error = self._take_layout_error()
        if error is not None:
            raise error

    def _check_low_latency(self):
        if not self.low_latency_mode:
            raise ValueError("low_latency_mode: this Buffer was created without low_latency_mode=True and "
                             "num_rdma_bytes > 0")

    def _check_normal(self):
        if self.num_nvl_bytes == 0:
            raise ValueError("num_nvl_bytes: this Buffer has no NVLink buffer (created with num_nvl_bytes=0)")
        if self.num_rdma_ranks > 1 and self.low_latency_mode:
            raise ValueError("low_latency_mode: across NVLink domains the symmetric buffer of a low-latency Buffer "
                             "belongs to the low-latency mode; create a second Buffer (low_latency_mode=False, "
                             "num_rdma_bytes=get_rdma_buffer_size_hint(...)) for the normal mode")

    @property
    def num_ranks(self):
        """R (same as ``group_size``)."""
        return self.group_size

    @staticmethod
    def set_num_sms(num_sms):
        """Checks and keeps the default SM count, as the GPU Buffer does (unused here; class-wide,
        as in DeepEP)."""
        Buffer.num_sms = V.check_num_sms(num_sms)

    @staticmethod
    def capture():
        """An :class:`EventOverlap` for "the current stream" (a placeholder here)."""
        return EventOverlap()

    # ----------------------------------------------------------------- size hints
    @staticmethod
    def get_nvl_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk=9, num_nvl_peers=None,
                                 num_max_recv_tokens=None):
        """Bytes of ``num_nvl_bytes`` the normal mode needs (the GPU Buffer's formula and value).

        Args:
            num_max_tokens_per_rank: most tokens a rank dispatches in one call.
            hidden: H (bf16 or FP8 rows).
            num_ranks: ranks of the Buffer.
            num_topk: most top-k columns.
            num_nvl_peers: ranks per NVLink domain (default: ``num_ranks``, one domain).
            num_max_recv_tokens: across domains only: most rows a rank receives in one call
                (default: the worst case, every token of every rank).
        Returns:
            an int.
        """
        return V.nvl_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk, num_nvl_peers,
                                      num_max_recv_tokens)

    @staticmethod
    def get_rdma_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_nvl_peers, num_topk=9):
        """Bytes of ``num_rdma_bytes`` the normal mode needs across NVLink domains (0 for one
        domain; the GPU Buffer's formula and value).

        Args:
            num_max_tokens_per_rank: most tokens a rank dispatches in one call.
            hidden: H.
            num_ranks: ranks of the Buffer.
            num_nvl_peers: ranks per NVLink domain.
            num_topk: most top-k columns.
        Returns:
            an int.
        """
        return V.rdma_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_nvl_peers, num_topk)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        """Bytes of ``num_rdma_bytes`` the low-latency mode needs for these sizes (the GPU Buffer's
        formula and value: any top-k up to ``limits.LL_MAX_TOPK``, bf16 or FP8).

        Args:
            num_max_dispatch_tokens_per_rank: M.
            hidden: H.
            num_ranks: R.
            num_experts: E.
        Returns:
            an int.
        """
        return V.ll_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ----------------------------------------------------------------- layout
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        """Count, for the given routing, what goes where (local, no communication).

        Args:
            topk_idx: int64 (or int32) ``[N, K]`` expert ids, -1 for an empty slot;
                ``K <= limits.MAX_NORMAL_TOPK``.
            num_experts: E, a multiple of R, at most ``limits.MAX_EXPERTS``.
            previous_event, async_finish, allocate_on_comm_stream: ignored (no streams).

        Returns:
            num_tokens_per_rank: int32 ``[R]``: tokens with an expert on each rank (a token
                counts once per rank).
            num_tokens_per_rdma_rank: int32 ``[R / num_nvl_ranks]`` (tokens with an expert in
                each NVLink domain), or None when there is a single domain.
            num_tokens_per_expert: int32 ``[E]``: (token, top-k slot) selections per expert.
            is_token_in_rank: bool ``[N, R]``.
            event: :class:`EventOverlap` placeholder.

        Expert ids outside ``[-1, E)`` select nothing here and are reported later, as on the GPU:
        :meth:`check` or the next ``get_dispatch_layout`` of this rank raise ``ValueError`` naming
        ``topk_idx`` at once, else the next non-cached dispatch is cancelled on every rank.
        """
        self._check_alive()
        self._raise_layout_error()
        _require_numpy(topk_idx, "topk_idx")
        R = self.group_size
        n, _ = V.check_layout_call(topk_idx, num_experts, R)
        _, self._layout_error = _local_checks(lambda: V.check_topk_range(topk_idx, num_experts))
        e_local = num_experts // R
        idx = topk_idx.astype(np.int64)
        valid = (idx >= 0) & (idx < num_experts)
        num_tokens_per_expert = np.bincount(idx[valid], minlength=num_experts).astype(np.int32)
        is_token_in_rank = np.zeros((n, R), dtype=bool)
        rows = np.nonzero(valid)[0]
        is_token_in_rank[rows, idx[valid] // e_local] = True
        num_tokens_per_rank = is_token_in_rank.sum(axis=0).astype(np.int32)
        num_tokens_per_rdma_rank = None
        if self.num_rdma_ranks > 1:
            per_domain = is_token_in_rank.reshape(n, self.num_rdma_ranks, self.num_nvl_ranks).any(axis=2)
            num_tokens_per_rdma_rank = per_domain.sum(axis=0).astype(np.int32)
        return (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert,
                is_token_in_rank, EventOverlap())

    # ----------------------------------------------------------------- normal mode
    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None,
                 async_finish=False, allocate_on_comm_stream=False):
        """Send each token to every rank that holds one of its experts (normal mode).

        Args:
            x: bf16 ``[N, H]`` (``H % 8 == 0``), or an FP8 pair ``(x_fp8 [N, H] float8_e4m3fn
                or uint8, scales float32 [N, H/128])`` with ``H % 128 == 0``. N must fit the
                buffers (:meth:`get_nvl_buffer_size_hint`, across domains
                :meth:`get_rdma_buffer_size_hint`).
            handle: a handle from an earlier dispatch with the same routing ("cached"
                dispatch): then the layout arguments are not used, ``topk_idx`` /
                ``topk_weights`` must be None, x must be ``[N, H]`` of that dispatch and
                ``num_worst_tokens`` 0 or the handle's rows.
            num_tokens_per_rank: int32 ``[R]`` (from :meth:`get_dispatch_layout`).
            num_tokens_per_rdma_rank: None inside one NVLink domain, else None or int32
                ``[R / num_nvl_ranks]`` (checked against ``is_token_in_rank`` when given).
            is_token_in_rank: bool ``[N, R]``.
            num_tokens_per_expert: int32 ``[E]``.
            topk_idx: None or int64/int32 ``[N, K]``; must match the layout arrays.
            topk_weights: float32 ``[N, K]``, required with ``topk_idx`` (None without).
            expert_alignment: round each entry of ``num_recv_tokens_per_expert_list`` up to a
                multiple of this.
            num_worst_tokens: > 0: outputs have exactly this many rows (padding rows: zeros,
                ``recv_topk_idx = -1``, weight 0) and the list is empty. Raises
                :class:`cupy_ep.errors.TokenOverflowError` on every rank when some rank would
                receive more rows than its ``num_worst_tokens``.
            config: None or a :class:`cupy_ep.Config` (checked as on the GPU, unused).
            previous_event, async_finish, allocate_on_comm_stream: ignored.

        Returns:
            recv_x: bf16 ``[num_recv, H]`` or the FP8 pair (data ``[num_recv, H]`` of the input
                data dtype, scales float32 ``[num_recv, H/128]``); rows ordered by source rank,
                then source token index.
            recv_topk_idx: int64 ``[num_recv, K]``: local expert ids (``topk_idx - rank *
                E_local``) of the experts on this rank, else -1; None without ``topk_idx`` and
                in cached mode.
            recv_topk_weights: float32 ``[num_recv, K]``: the weights where the id is kept,
                else 0; None without ``topk_idx`` and in cached mode.
            num_recv_tokens_per_expert_list: list of E_local ints (rows per local expert,
                counted per top-k slot, summed over sources, rounded up to
                ``expert_alignment``); ``[]`` with ``num_worst_tokens``; None in cached mode.
            handle: :class:`DispatchHandle` for :meth:`combine` and cached dispatch (None in
                cached mode, as in DeepEP).
            event: :class:`EventOverlap` placeholder.
        """
        self._check_alive()
        self._check_normal()
        R = self.group_size
        if handle is not None:
            return self._cached_dispatch(x, handle, topk_idx, topk_weights, num_worst_tokens, config)
        step = self._chan.step("dispatch")

        def checks():
            _require_numpy_items(x, "x")
            for a, nm in ((num_tokens_per_rank, "num_tokens_per_rank"), (is_token_in_rank, "is_token_in_rank"),
                          (num_tokens_per_expert, "num_tokens_per_expert"),
                          (num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank"),
                          (topk_idx, "topk_idx"), (topk_weights, "topk_weights")):
                _require_numpy(a, nm)
            V.check_config(config, self.num_nvl_ranks)
            c = self._check_dispatch_call(x, None, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                                          num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                                          num_worst_tokens)
            n, num_experts = c.num_tokens, c.routing.num_experts
            layout_error = self._take_layout_error()
            if layout_error is not None:
                raise layout_error
            bad = _routing_error(n, R, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                                 num_experts, num_tokens_per_rdma_rank, self.num_nvl_ranks)
            if bad is not None:
                raise ValueError(bad)
            return c.is_fp8, n, c.hidden, c.num_topk, num_experts

        is_fp8, n, h, k, num_experts = step.validated(checks)
        data, scales = (x[0], x[1]) if is_fp8 else (x, None)
        e_local = num_experts // R
        send_counts = num_tokens_per_rank.astype(np.int64)
        payloads = [(int(send_counts[r]), num_tokens_per_expert[r * e_local:(r + 1) * e_local].astype(np.int64))
                    for r in range(R)]
        common = [("x", "FP8 or bf16", is_fp8), ("x", "hidden size", h),
                  ("num_tokens_per_expert", "length (num_experts)", num_experts),
                  ("topk_idx", "presence", topk_idx is not None), ("topk_idx", "number of columns", k)]
        privates, got = step.agree(common, (int(num_worst_tokens), send_counts.tolist()), payloads)
        recv_totals = np.sum([c for _, c in privates], axis=0)
        for r, (w, _) in enumerate(privates):
            if w > 0 and recv_totals[r] > w:
                raise TokenOverflowError("dispatch", r, int(recv_totals[r]), int(w))
        limit = V.normal_recv_capacity(self.num_nvl_bytes, R, self.num_nvl_ranks, h, k)
        if limit is not None:
            for r in range(R):
                if recv_totals[r] > limit:
                    raise TokenOverflowError("dispatch", r, int(recv_totals[r]), limit)
        recv_counts = np.array([c for c, _ in got], dtype=np.int64)
        per_expert = np.sum([p for _, p in got], axis=0)

        send_order = np.concatenate([np.flatnonzero(is_token_in_rank[:, r]) for r in range(R)]).astype(np.int64)
        dest = np.repeat(np.arange(R, dtype=np.int64), send_counts)
        fields = [data[send_order], send_order]
        if is_fp8:
            fields.append(scales[send_order])
        if topk_idx is not None:
            sel = topk_idx[send_order].astype(np.int64)
            local = sel - dest[:, None] * e_local
            keep = (sel >= 0) & (local >= 0) & (local < e_local)
            fields.append(np.where(keep, local, -1).astype(np.int64))
            fields.append(np.where(keep, topk_weights[send_order], np.float32(0)).astype(_F32))
        recv = _alltoallv_rows(step, fields, send_counts, recv_counts)

        num_recv = int(recv_counts.sum())
        rows = num_worst_tokens if num_worst_tokens > 0 else num_recv
        recv_data = np.zeros((rows, h), dtype=data.dtype)
        recv_data[:num_recv] = recv[0]
        recv_src_idx = recv[1].astype(np.int64)
        pos = 2
        if is_fp8:
            recv_scales = np.zeros((rows, h // 128), dtype=_F32)
            recv_scales[:num_recv] = recv[pos]
            pos += 1
            recv_x = (recv_data, recv_scales)
        else:
            recv_x = recv_data
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_topk_idx = np.full((rows, k), -1, dtype=np.int64)
            recv_topk_idx[:num_recv] = recv[pos]
            recv_topk_weights = np.zeros((rows, k), dtype=_F32)
            recv_topk_weights[:num_recv] = recv[pos + 1]
        if num_worst_tokens > 0:
            counts_list = []
        else:
            counts_list = [int(_ceil_div(int(c), expert_alignment) * expert_alignment) for c in per_expert]
        new_handle = DispatchHandle(
            num_ranks=R, num_tokens=n, hidden=h, num_topk=k, num_experts=num_experts,
            is_token_in_rank=is_token_in_rank.copy(), send_counts=send_counts, recv_counts=recv_counts,
            send_order=send_order, recv_src_rank=np.repeat(np.arange(R, dtype=np.int32), recv_counts),
            recv_src_idx=recv_src_idx, num_recv_tokens=num_recv, num_rows=rows)
        self._owner.stamp(new_handle)
        return recv_x, recv_topk_idx, recv_topk_weights, counts_list, new_handle, EventOverlap()

    def _check_handle(self, handle):
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle: expected the handle returned by this Buffer's dispatch, got "
                            f"{type(handle).__name__}")
        V.check_handle_owner(handle, self._owner)

    def _check_dispatch_call(self, *args) -> V.DispatchCall:
        """:func:`cupy_ep.validation.check_dispatch_call` with this Buffer's ranks and sizes."""
        return V.check_dispatch_call(*args, num_ranks=self.group_size, num_nvl_ranks=self.num_nvl_ranks,
                                     num_nvl_bytes=self.num_nvl_bytes, num_rdma_bytes=self.num_rdma_bytes)

    def _cached_dispatch(self, x, handle, topk_idx, topk_weights, num_worst_tokens, config):
        step = self._chan.step("dispatch")

        def checks():
            _require_numpy_items(x, "x")
            _require_numpy(topk_idx, "topk_idx")
            _require_numpy(topk_weights, "topk_weights")
            V.check_config(config, self.num_nvl_ranks)
            self._check_handle(handle)
            c = self._check_dispatch_call(x, handle, None, None, None, None, topk_idx, topk_weights, None,
                                          num_worst_tokens)
            return c.is_fp8, c.hidden

        is_fp8, h = step.validated(checks)
        data, scales = (x[0], x[1]) if is_fp8 else (x, None)
        step.agree([("x", "FP8 or bf16", is_fp8), ("x", "hidden size", h)])
        fields = [data[handle.send_order]]
        if is_fp8:
            fields.append(scales[handle.send_order])
        recv = _alltoallv_rows(step, fields, handle.send_counts, handle.recv_counts)
        nr, rows = handle.num_recv_tokens, handle.num_rows
        recv_data = np.zeros((rows, h), dtype=data.dtype)
        recv_data[:nr] = recv[0]
        if is_fp8:
            recv_scales = np.zeros((rows, h // 128), dtype=_F32)
            recv_scales[:nr] = recv[1]
            recv_x = (recv_data, recv_scales)
        else:
            recv_x = recv_data
        return recv_x, None, None, None, None, EventOverlap()

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish=False, allocate_on_comm_stream=False):
        """Send each received row back to its source rank and sum there (normal mode).

        Args:
            x: bf16 ``[num_rows, H]`` in dispatch's receive order (``num_rows`` = the rows
                dispatch returned; padding rows of worst-token mode are ignored; H = the
                dispatch's).
            handle: the handle dispatch returned.
            topk_weights: None or float32 ``[num_rows, K]`` with the dispatch's K (e.g.
                ``recv_topk_weights``); a dispatch without ``topk_idx`` takes none.
            bias: None, one bf16 ``[N, H]`` array or a pair (entries may be None).
            config: None or a :class:`cupy_ep.Config` (checked, unused).
            previous_event, async_finish, allocate_on_comm_stream: ignored.

        Returns:
            combined_x: bf16 ``[N, H]``: ``bias_0[t] + bias_1[t] + sum_r x_r[row of t on r]``,
                accumulated in float32 (biases first, then ranks in ascending order).
            combined_topk_weights: float32 ``[N, K]``, the same sum of ``topk_weights``
                (None without ``topk_weights``).
            event: :class:`EventOverlap` placeholder.
        """
        self._check_alive()
        self._check_normal()
        step = self._chan.step("combine")

        def checks():
            _require_numpy_items(x, "x")
            _require_numpy(topk_weights, "topk_weights")
            _require_numpy_items(bias, "bias")
            self._check_handle(handle)
            V.check_config(config, self.num_nvl_ranks)
            return V.check_normal_combine(x, handle, topk_weights, bias)

        biases = step.validated(checks)
        h, k = handle.hidden, (handle.num_topk if topk_weights is not None else 0)
        common = [("x", "hidden size", h), ("topk_weights", "presence", topk_weights is not None),
                  ("topk_weights", "number of columns", k)]
        step.agree(common)
        nr = handle.num_recv_tokens
        fields = [x[:nr]]
        if topk_weights is not None:
            fields.append(topk_weights[:nr])
        back = _alltoallv_rows(step, fields, handle.recv_counts, handle.send_counts)
        n = handle.num_tokens
        acc = np.zeros((n, h), dtype=_F32)
        for b in biases:
            acc += b.astype(_F32)
        wacc = np.zeros((n, k), dtype=_F32) if topk_weights is not None else None
        off = 0
        for r in range(self.group_size):
            c = int(handle.send_counts[r])
            idx = handle.send_order[off:off + c]
            acc[idx] += back[0][off:off + c].astype(_F32)
            if wacc is not None:
                wacc[idx] += back[1][off:off + c]
            off += c
        return acc.astype(BF16_DTYPE), wacc, EventOverlap()

    # ----------------------------------------------------------------- low latency
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False, cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None):
        """Send each token to each of its experts, into a masked per-expert layout.

        Args:
            x: bf16 ``[N, H]``, ``H % 128 == 0``, ``N <= M``.
            topk_idx: int64/int32 ``[N, K]``, values in ``[-1, E)`` (checked on the host: a bad
                id cancels the call on every rank; the GPU does not check them). A token that names an expert in several
                slots is sent to it once.
            num_max_dispatch_tokens_per_rank: M, the same on every rank; ``num_rdma_bytes`` must
                hold it (:meth:`get_low_latency_rdma_size_hint`).
            num_experts: E, a multiple of R.
            use_fp8: cast to FP8 (per token, per 128 channels) before sending.
            round_scale: power-of-two scales.
            use_ue8m0: scales as UE8M0 bytes (implies ``round_scale``).
            async_finish: ignored.
            return_recv_hook: return at once with a ``hook``; the returned arrays (and the
                handle's arrays, and ``cumulative_local_expert_recv_stats``) are filled only
                when ``hook()`` is called.
            cumulative_local_expert_recv_stats: None or int32 NumPy ``[E_local]``, increased
                in place by ``recv_count``.
            dispatch_wait_recv_cost_stats: None or int64 NumPy ``[R]``, accumulated: entry r
                grows by the nanoseconds (wall clock) this call waited for rank r's messages (both
                rounds of the call's exchange, made at the call also with a hook; 0 for this rank).

        Returns:
            recv_x: bf16 ``[E_local, R*M, H]``, or with ``use_fp8`` the pair (``float8_e4m3fn``
                ``[E_local, R*M, H]``, scales float32 ``[E_local, R*M, H/128]`` or uint8 UE8M0
                with ``use_ue8m0``). For local expert j the first ``recv_count[j]`` rows are
                valid, ordered by source rank, then source token; the rest are zeros.
            recv_count: int32 ``[E_local]``.
            handle: ``(src_info int32 [E_local, R*M] (source token per row, -1 where invalid),
                layout_range int64 [E_local, R] ((begin << 32) | count per source rank), M, H,
                E, info)`` with ``info`` a :class:`LowLatencyHandleInfo` (``num_tokens``,
                ``topk``: what the combine's ``topk_idx`` / ``topk_weights`` must match).
            event: :class:`EventOverlap` placeholder.
            hook: a callable with ``return_recv_hook=True``, else None.
        """
        self._check_alive()
        self._check_low_latency()
        R = self.group_size
        stats = cumulative_local_expert_recv_stats
        step = self._ll_step("low_latency_dispatch")

        def checks():
            _require_numpy(x, "x")
            _require_numpy(topk_idx, "topk_idx")
            _require_numpy(stats, "cumulative_local_expert_recv_stats")
            _require_numpy(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats")
            V.check_wait_stats(dispatch_wait_recv_cost_stats, R, "dispatch_wait_recv_cost_stats")
            n, h, k, e_local = V.check_ll_dispatch_args(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                                        R, check_values=False)
            V.check_ll_capacity(self.num_rdma_bytes, R, int(num_experts), int(num_max_dispatch_tokens_per_rank), h)
            V.check_cumulative_stats(stats, e_local)
            V.check_topk_range(topk_idx, num_experts)
            return n, h, k, e_local

        n, h, k, e_local = step.validated(checks)
        m = int(num_max_dispatch_tokens_per_rank)
        num_experts = int(num_experts)
        use_fp8 = bool(use_fp8)
        use_ue8m0 = bool(use_ue8m0) and use_fp8
        round_scale = (bool(round_scale) or use_ue8m0) and use_fp8

        idx = self._unmasked(topk_idx.astype(np.int64), e_local)
        chosen = np.zeros((n, num_experts), dtype=bool)
        tok = np.nonzero(idx >= 0)[0]
        chosen[tok, idx[idx >= 0]] = True
        t_of, e_of = np.nonzero(chosen)                      # sorted by token, then expert
        sent = (t_of.astype(np.int64) * num_experts + e_of)      # sorted keys (token-major)
        d_of = e_of // e_local
        order = np.lexsort((e_of, t_of, d_of))               # by destination, token, expert
        t_of, e_of, d_of = t_of[order], e_of[order], d_of[order]
        send_counts = np.bincount(d_of, minlength=R).astype(np.int64)

        common = [("num_max_dispatch_tokens_per_rank", "value", m), ("num_experts", "value", num_experts),
                  ("x", "hidden size", h), ("use_fp8", "value", use_fp8), ("round_scale", "value", round_scale),
                  ("use_ue8m0", "value", use_ue8m0)]
        _, got = step.agree(common, payloads=[int(c) for c in send_counts])
        self._mask_absent(step)
        recv_counts = np.array([c or 0 for c in got], dtype=np.int64)
        meta = np.stack([(e_of - d_of * e_local), t_of], axis=1).astype(np.int32)
        if use_fp8:
            q, s = _fp8.per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
            fields = [meta, q[t_of], s[t_of]]
        else:
            fields = [meta, x[t_of]]
        recv = _alltoallv_rows(step, fields, send_counts, recv_counts)
        self._mask_absent(step)
        recv_counts[self._mask == 1] = 0
        sent = sent[self._mask[sent % num_experts // e_local] == 0]   # what reached unmasked ranks
        _add_waits(dispatch_wait_recv_cost_stats, step)

        rm = R * m
        if use_fp8:
            out_data = np.zeros((e_local, rm, h), dtype=FP8_DTYPE)
            out_scales = np.zeros((e_local, rm, h // 128), dtype=np.uint8 if use_ue8m0 else _F32)
            recv_x = (out_data, out_scales)
        else:
            out_data = np.zeros((e_local, rm, h), dtype=BF16_DTYPE)
            recv_x = out_data
        recv_count = np.zeros(e_local, dtype=np.int32)
        src_info = np.full((e_local, rm), -1, dtype=np.int32)
        layout_range = np.zeros((e_local, R), dtype=np.int64)

        def finish():
            rj, rt = recv[0][:, 0].astype(np.int64), recv[0][:, 1]
            rs = np.repeat(np.arange(R, dtype=np.int64), recv_counts)
            for j in range(e_local):
                begin = 0
                for s in range(R):
                    rows = np.flatnonzero((rj == j) & (rs == s))    # already in token order
                    c = rows.size
                    out_data[j, begin:begin + c] = recv[1][rows]
                    if use_fp8:
                        out_scales[j, begin:begin + c] = recv[2][rows]
                    src_info[j, begin:begin + c] = rt[rows]
                    layout_range[j, s] = (begin << 32) | c
                    begin += c
                recv_count[j] = begin
            if stats is not None:
                np.add(stats, recv_count, out=stats)

        hook = _make_hook(finish, return_recv_hook)
        info = LowLatencyHandleInfo(n, k, h, num_experts, m, sent)
        self._owner.stamp(info)
        handle = (src_info, layout_range, m, h, num_experts, info)
        return recv_x, recv_count, handle, EventOverlap(), hook

    def get_next_low_latency_combine_buffer(self, handle):
        """The array that ``low_latency_combine(..., zero_copy=True)`` reads the expert outputs from.

        Args:
            handle: the handle low_latency_dispatch returned.
        Returns:
            bf16 NumPy ``[E_local, R*M, H]`` (the same array on every call with the same shape).
        """
        self._check_alive()
        self._check_low_latency()
        _, _, m, h, e = V.check_ll_handle(handle, self.group_size)
        V.check_handle_owner(handle, self._owner)
        shape = (e // self.group_size, self.group_size * m, h)
        buf = self._ll_combine_buffers.get(shape)
        if buf is None:
            buf = self._ll_combine_buffers[shape] = np.zeros(shape, dtype=BF16_DTYPE)
        return buf

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None):
        """Bring the expert outputs back and reduce them with the top-k weights.

        Args:
            x: bf16 ``[E_local, R*M, H]``: expert outputs in dispatch's masked layout (ignored
                with ``zero_copy``, which reads ``get_next_low_latency_combine_buffer(handle)``).
            topk_idx: int64/int32 ``[N, K]``: the routing given to the dispatch (N and K of the
                dispatch; a slot may be -1 to leave its expert out, but may not name an expert
                the dispatch did not send the token to).
            topk_weights: float32 ``[N, K]``.
            handle: the handle low_latency_dispatch returned.
            use_logfmt: the partial sums cross in LogFMT-10 (:mod:`cupy_ep.logfmt`), modelled as
                the GPU computes them: per token and expert rank (ascending), the float32 sum over
                the token's slots (ascending) on that rank of ``weight * y`` (a product, then an
                add, unfused), encoded and decoded; the decoded partials summed in float32. The
                result is bit-identical to the GPU's.
            zero_copy: the expert outputs were written into the combine buffer.
            async_finish: ignored.
            return_recv_hook: return at once; the result is written when ``hook()`` is called.
            out: None or bf16 NumPy ``[N, H]`` to write the result into.
            combine_wait_recv_cost_stats: as ``dispatch_wait_recv_cost_stats`` of
                :meth:`low_latency_dispatch`, for this call.

        Returns:
            combined_x: bf16 ``[N, H]`` (``out`` when given): ``sum_k topk_weights[t, k] *
                y_k(t)`` over the slots with ``topk_idx[t, k] >= 0`` (a duplicated expert counts
                once per slot), float32 accumulation in slot order (``use_logfmt``: see there).
            event: :class:`EventOverlap` placeholder.
            hook: a callable with ``return_recv_hook=True``, else None.
        """
        self._check_alive()
        self._check_low_latency()
        R, rank = self.group_size, self.rank
        step = self._ll_step("low_latency_combine")
        wait_stats = combine_wait_recv_cost_stats

        def checks():
            _require_numpy(wait_stats, "combine_wait_recv_cost_stats")
            V.check_wait_stats(wait_stats, R, "combine_wait_recv_cost_stats")
            return self._ll_combine_plan(x, topk_idx, topk_weights, handle, zero_copy, out)

        x, idx, n, h, k, m, num_experts, sel_j, sel_row, tokens, send_counts = step.validated(checks)
        e_local = num_experts // R
        common = [("handle", "num_max_dispatch_tokens_per_rank", m), ("x", "hidden size", h),
                  ("handle", "num_experts", num_experts)]
        _, got = step.agree(common, payloads=[int(c) for c in send_counts])
        self._mask_absent(step)
        recv_counts = np.array([c or 0 for c in got], dtype=np.int64)
        meta = np.stack([sel_j + rank * e_local, tokens.astype(np.int64)], axis=1)
        recv = _alltoallv_rows(step, [meta, x[sel_j, sel_row]], send_counts, recv_counts)
        self._mask_absent(step)
        idx = self._unmasked(idx, e_local)   # also the expert ranks masked during this call
        _add_waits(wait_stats, step)
        result = out if out is not None else np.zeros((n, h), dtype=BF16_DTYPE)

        def finish():
            r_e, r_t = recv[0][:, 0], recv[0][:, 1]
            keys = r_t * num_experts + r_e
            order = np.argsort(keys, kind="stable")
            skeys = keys[order]
            y = recv[1].astype(_F32)
            acc = np.zeros((n, h), dtype=_F32)
            slots = []   # per k: (tokens, rows of y) of the slots with an expert
            for kk in range(k):
                e = idx[:, kk]
                valid = np.flatnonzero(e >= 0)
                want = valid * num_experts + e[valid]
                p = np.searchsorted(skeys, want)
                found = (p < skeys.size) & (skeys[np.minimum(p, max(skeys.size - 1, 0))] == want) \
                    if skeys.size else np.zeros(want.size, bool)
                if not found.all():
                    miss = int(np.flatnonzero(~found)[0])
                    raise ValueError(f"topk_idx: token {int(valid[miss])} selects expert {int(e[valid[miss]])}, "
                                     f"which did not receive it in the dispatch that made handle")
                slots.append((valid, order[p]))
            if use_logfmt:
                acc = _logfmt_partial_sums(idx, topk_weights, y, slots, e_local, R, h)
            else:
                for kk, (valid, rows) in enumerate(slots):
                    acc[valid] += topk_weights[valid, kk].astype(_F32)[:, None] * y[rows]
            result[...] = acc.astype(BF16_DTYPE)

        hook = _make_hook(finish, return_recv_hook)
        return result, EventOverlap(), hook

    def _ll_combine_plan(self, x, topk_idx, topk_weights, handle, zero_copy, out):
        """low_latency_combine's local checks, and the rows it sends: ``(x, N, H, K, M, E, expert of
        each row, row in x, its source token, rows per destination rank)``."""
        R = self.group_size
        if zero_copy:
            V.check_ll_handle(handle, R)
            x = self.get_next_low_latency_combine_buffer(handle)
        for a, nm in ((x, "x"), (topk_idx, "topk_idx"), (topk_weights, "topk_weights"), (out, "out")):
            _require_numpy(a, nm)
        V.check_ll_handle(handle, R)
        V.check_handle_owner(handle, self._owner)
        n, h, k = V.check_ll_combine_args(x, topk_idx, topk_weights, handle, R, out, check_values=False)
        src_info, layout_range, m, _, num_experts = V.check_ll_handle(handle, R)
        info = handle[5]
        e_local = num_experts // R
        if out is not None and not out.flags.writeable:
            raise ValueError("out: must be writeable")
        begins = (layout_range >> 32).astype(np.int64)
        counts = (layout_range & 0xFFFFFFFF).astype(np.int64)
        if (begins < 0).any() or (begins + counts > R * m).any():
            raise ValueError("handle: layout_range is out of bounds")
        V.check_topk_range(topk_idx, num_experts)
        idx = self._unmasked(topk_idx.astype(np.int64), e_local)
        if isinstance(info, LowLatencyHandleInfo):
            t_sel, k_sel = np.nonzero(idx >= 0)
            want = t_sel * num_experts + idx[t_sel, k_sel]
            p = np.searchsorted(info.sent, want)
            ok = (p < info.sent.size) & (info.sent[np.minimum(p, max(info.sent.size - 1, 0))] == want) \
                if info.sent.size else np.zeros(want.size, bool)
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise ValueError(f"topk_idx: token {int(t_sel[i])} selects expert {int(idx[t_sel[i], k_sel[i]])} "
                                 f"in slot {int(k_sel[i])}, which the dispatch that made handle did not send it to")
        sel_j, sel_s, sel_row = [], [], []
        for s in range(R):
            for j in range(e_local):
                b, c = int(begins[j, s]), int(counts[j, s])
                sel_j.append(np.full(c, j, np.int64))
                sel_s.append(np.full(c, s, np.int64))
                sel_row.append(np.arange(b, b + c, dtype=np.int64))
        sel_j = np.concatenate(sel_j) if sel_j else np.zeros(0, np.int64)
        sel_row = np.concatenate(sel_row) if sel_row else np.zeros(0, np.int64)
        sel_s = np.concatenate(sel_s) if sel_s else np.zeros(0, np.int64)
        tokens = src_info[sel_j, sel_row]
        if (tokens < 0).any():
            raise ValueError("handle: src_info has -1 inside a layout_range")
        send_counts = np.bincount(sel_s, minlength=R).astype(np.int64)
        return x, idx, n, h, k, m, num_experts, sel_j, sel_row, tokens, send_counts

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """Reset the low-latency signalling state (collective; an agreement and nothing else here).

        Args:
            num_max_dispatch_tokens_per_rank: M.
            hidden: H.
            num_experts: E.
        """
        self._check_alive()
        self._check_low_latency()
        step = self._ll_step("clean_low_latency_buffer")

        def checks():
            V.check_num_max_dispatch_tokens_per_rank(num_max_dispatch_tokens_per_rank)
            V.check_int(hidden, "hidden", 1)
            V.check_num_experts(num_experts, self.group_size)

        step.validated(checks)
        step.agree()
        self._mask_absent(step)
        step.finish()
        self._mask_absent(step)

    # ----------------------------------------------------------------- shrink mode
    def _ll_step(self, call):
        """The step of a low-latency call; in shrink mode among the unmasked ranks only."""
        if not self.enable_shrink:
            return self._chan.step(call)
        return self._chan.step(call, peers=np.flatnonzero(self._mask == 0).tolist())

    def _mask_absent(self, step):
        """Shrink mode: masks the ranks that did not arrive in a round of ``step``."""
        for r in step.absent:
            self._mask[r] = 1

    def _unmasked(self, idx, e_local):
        """``idx`` (int64 ``[N, K]``) with the slots of masked ranks' experts set to -1."""
        if not self._mask.any():
            return idx
        return np.where((idx >= 0) & (self._mask[np.maximum(idx, 0) // e_local] == 1), -1, idx)

    def _check_shrink(self):
        self._check_alive()
        self._check_low_latency()
        V.check_shrink_call(self.enable_shrink)

    def low_latency_update_mask_buffer(self, rank_to_mask, mask=False):
        """Masks (``mask=True``) or unmasks rank ``rank_to_mask`` on this rank (local, as in
        DeepEP): later low-latency calls of this rank neither send to nor wait for a masked rank.
        Unmasking one rank alone does not resynchronise it; to bring ranks back, use
        :meth:`low_latency_clean_mask_buffer` on every rank."""
        self._check_shrink()
        r, value = V.check_mask_update(rank_to_mask, mask, self.rank, self.group_size)
        self._mask[r] = value

    def low_latency_query_mask_buffer(self, mask_status):
        """Writes this rank's mask into ``mask_status`` (int32 NumPy ``[R]``): 1 = masked."""
        self._check_shrink()
        _require_numpy(mask_status, "mask_status")
        V.check_array(mask_status, "mask_status", dtypes=np.int32, shape=(self.group_size,))
        mask_status[...] = self._mask

    def low_latency_clean_mask_buffer(self):
        """Unmasks every rank that makes this call too (collective over all ranks, masked ones
        included, bounded by ``timeout_s``; DeepEP's is local): the arriving ranks agree on
        where to resume numbering their calls (a masked rank skipped some), every rank that
        did not arrive stays (or becomes) masked."""
        self._check_shrink()
        self._mask_cleans += 1
        step = self._chan.step_at("low_latency_clean_mask_buffer", -self._mask_cleans,
                                  peers=range(self.group_size))
        seqs, _ = step.agree(private=self._chan.seq)
        step.finish()
        self._mask[:] = 0
        self._mask_absent(step)
        self._chan.resume_at(max(s for s in seqs if s is not None))
