"""DeepEP v1's ``Buffer`` API on torch tensors, over cupy_ep (``import cupy_ep.torch as deep_ep``).

The calls, argument names and order, and returned tuples are DeepEP v1.2.1's; tensors go in and
come out as torch tensors that view cupy_ep's memory (DLPack, no copy; bf16 and FP8 e4m3fn travel
as their bit patterns, which is how CuPy carries them), and torch's current stream is the
caller's stream. Outputs are allocated by torch's caching allocator on the stream cupy_ep
allocates them on (so CUDA-graph capture uses the graph's private pool). ``group`` may be a
``torch.distributed`` ProcessGroup (no MPI needed: :class:`cupy_ep.torch_comm.TorchComm`) or,
as in DeepEP, ``comm=`` an mpi4py communicator.

What differs from DeepEP, and what is not supported: ``docs/torch.md``. Features cupy_ep lacks
raise ``NotImplementedError`` naming them. Importing this module needs neither torch nor a GPU;
torch (``pip install 'cupy_ep[torch]'``) is imported when a Buffer is made.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .fp8 import ue8m0_to_float32

__all__ = ["Buffer", "Config", "EventOverlap"]


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------------------------------------
# Pure parts (NumPy or torch arrays alike; tested without torch)
# ---------------------------------------------------------------------------------------------
def pack_ue8m0(exponents):
    """UE8M0 exponent bytes ``uint8 [..., G]`` (C-contiguous, ``G % 4 == 0``) as DeepEP packs them:
    int32 ``[..., G / 4]`` whose word ``p`` holds the exponent of scale group ``4p + i`` in bits
    ``8i..8i+7``. A view (little-endian bytes), no copy."""
    return exponents.view(_dtype_of(exponents, "int32"))


def unpack_ue8m0(packed):
    """The inverse of :func:`pack_ue8m0`: int32 ``[..., G / 4]`` -> uint8 ``[..., G]`` (a view of a
    C-contiguous copy when ``packed`` is not C-contiguous)."""
    return _contiguous(packed).view(_dtype_of(packed, "uint8"))


def float_to_ue8m0(scales, xp):
    """UE8M0 exponent bytes of power-of-two float32 scales (the inverse of
    :func:`cupy_ep.fp8.ue8m0_to_float32`)."""
    return xp.asarray((_contiguous(scales).view(xp.int32) >> 23) & 0xFF, dtype=xp.uint8)


def column_major(a):
    """A copy of ``a`` with its last two dimensions swapped in memory (DeepEP's "column-major"
    scales: ``a.transpose(-1, -2).contiguous().transpose(-1, -2)``), values unchanged."""
    return _swap_last(_contiguous(_swap_last(a)))


def rank_prefix_matrix(rows) -> np.ndarray:
    """DeepEP's ``rank_prefix_matrix`` int32 ``[R, R]`` from every rank's ``num_tokens_per_rank``
    (``rows[i][j]``: tokens rank i sends to rank j): entry ``[i, j]`` counts the tokens ranks
    ``0..i`` send to rank j, so that on rank j the rows from rank i end at ``[i, j]``."""
    return np.cumsum(np.asarray(rows, dtype=np.int64), axis=0).astype(np.int32)


def _dtype_of(a, name: str):
    return getattr(np, name) if isinstance(a, np.ndarray) else getattr(_torch(), name)


def _contiguous(a):
    return np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a.contiguous()


def _swap_last(a):
    return np.swapaxes(a, -1, -2) if isinstance(a, np.ndarray) else a.transpose(-1, -2)


class Missing:
    """A handle entry DeepEP has and cupy_ep does not keep: any use raises NotImplementedError
    naming it (unpacking a handle still works)."""

    def __init__(self, name: str, why: str):
        self._what = f"handle entry {name!r} is not available from cupy_ep.torch: {why}"

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise NotImplementedError(self._what)

    def __getitem__(self, item):
        raise NotImplementedError(self._what)

    def __repr__(self):
        return f"Missing({self._what!r})"


_INTRANODE_ENTRIES = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix",
                      "recv_src_idx", "is_token_in_rank", "send_head")
_INTERNODE_ENTRIES = ("is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix",
                      "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum",
                      "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum", "recv_src_meta",
                      "send_rdma_head", "send_nvl_head")
_KEPT_BY_CUPY_EP = "cupy_ep keeps its own routing state (pass the handle back as it is)"


class DispatchHandle(tuple):
    """A normal-mode handle shaped as DeepEP's: its 6 (one NVLink domain) or 10 (several) entries,
    where DeepEP users read them (``handle[0]``: ``rank_prefix_matrix`` int32 ``[R, R]`` in one
    domain; ``is_token_in_rank`` at DeepEP's place); the entries cupy_ep does not keep are
    :class:`Missing`. ``cupy_ep_handle`` is the handle cupy_ep's calls take."""

    def __new__(cls, cupy_ep_handle, internode: bool, known: dict):
        names = _INTERNODE_ENTRIES if internode else _INTRANODE_ENTRIES
        unknown = set(known) - set(names)
        if unknown:
            raise ValueError(f"unknown handle entries {sorted(unknown)}")
        self = super().__new__(cls, tuple(known[n] if n in known else Missing(n, _KEPT_BY_CUPY_EP)
                                          for n in names))
        self.cupy_ep_handle = cupy_ep_handle
        return self


class LowLatencyHandle(tuple):
    """DeepEP's low-latency handle ``(src_info, layout_range, M, hidden, num_experts)`` (torch views of
    cupy_ep's arrays); ``cupy_ep_handle`` is the handle cupy_ep's calls take."""

    def __new__(cls, cupy_ep_handle, entries):
        self = super().__new__(cls, tuple(entries))
        self.cupy_ep_handle = cupy_ep_handle
        return self


def _inner_handle(handle, kind):
    if not isinstance(handle, kind):
        raise TypeError(f"handle: expected the {kind.__name__} returned by this Buffer, got {type(handle).__name__}")
    return handle.cupy_ep_handle


def refuse(feature: str, used: bool) -> None:
    """NotImplementedError naming a DeepEP feature that cupy_ep does not have, when it is used."""
    if used:
        raise NotImplementedError(f"{feature} is not supported by cupy_ep.torch (see docs/torch.md)")


def buffer_options(low_latency_mode: bool, num_qps_per_rank: int, allow_nvlink_for_low_latency_mode: bool,
                   allow_mnnvl: bool) -> dict:
    """cupy_ep.Buffer keyword arguments for DeepEP's constructor options. ``num_qps_per_rank`` is
    an RDMA tuning knob cupy_ep has no use for (checked as DeepEP does, then ignored)."""
    refuse("allow_mnnvl=True (multi-node NVLink)", bool(allow_mnnvl))
    if low_latency_mode and not (isinstance(num_qps_per_rank, int) and num_qps_per_rank > 0):
        raise ValueError(f"num_qps_per_rank: expected a positive int, got {num_qps_per_rank!r}")
    return {"ll_transport": "auto" if allow_nvlink_for_low_latency_mode else "rdma"}


# ---------------------------------------------------------------------------------------------
# Config, EventOverlap
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """DeepEP's normal-mode kernel configuration.

    ``num_sms`` is cupy_ep's (:class:`cupy_ep.Config`: ``num_sms / 2`` channels, as DeepEP). The
    chunk sizes are checked as DeepEP checks them and otherwise ignored: cupy_ep sizes its staging
    from ``num_nvl_bytes`` and signals once per warp's token.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self):
        if not 0 < self.num_max_nvl_chunked_send_tokens < self.num_max_nvl_chunked_recv_tokens:
            raise ValueError("Config: expected 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens")
        if not 0 < self.num_max_rdma_chunked_send_tokens < self.num_max_rdma_chunked_recv_tokens:
            raise ValueError("Config: expected 0 < num_max_rdma_chunked_send_tokens < num_max_rdma_chunked_recv_tokens")

    def to_cupy_ep(self):
        """The :class:`cupy_ep.Config` of this configuration."""
        from .config import Config as CupyEpConfig

        return CupyEpConfig(num_sms=int(self.num_sms))

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        raise NotImplementedError(
            "Config.get_nvl_buffer_size_hint: cupy_ep's NVLink buffer holds every token of a call, so its size "
            "depends on the token count; use cupy_ep.torch.Buffer.get_nvl_buffer_size_hint(num_max_tokens_per_rank, "
            "hidden, num_ranks, num_topk)")

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        raise NotImplementedError(
            "Config.get_rdma_buffer_size_hint: use cupy_ep.torch.Buffer.get_rdma_buffer_size_hint("
            "num_max_tokens_per_rank, hidden, num_ranks, num_nvl_peers, num_topk)")


class EventOverlap:
    """DeepEP's event wrapper: ``current_stream_wait()`` makes torch's current stream wait for the
    communication; as a context manager it waits when the block exits.

    Args:
        event: a :class:`cupy_ep.EventOverlap` holding a CUDA event, or None.
        extra_tensors: tensors kept alive until then (DeepEP's stand-in for ``record_stream``).
        on_wait: callables run on the current stream right after the wait (outputs the adapter
            still has to rearrange once the data is there).
    """

    def __init__(self, event=None, extra_tensors=None, on_wait=()):
        self.event = event
        self.extra_tensors = extra_tensors
        self._on_wait = list(on_wait)

    def current_stream_wait(self) -> None:
        assert self.event is not None, "this call returned no event (async_finish=False)"
        self._wait()

    def _wait(self) -> None:
        torch = _torch()
        with _on_stream(torch.cuda.current_stream()):
            self.event.current_stream_wait()
            for fn in self._on_wait:
                fn()
        self._on_wait = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.event is not None:
            self._wait()
        return False


# ---------------------------------------------------------------------------------------------
# torch <-> CuPy (DLPack views), streams, allocation
# ---------------------------------------------------------------------------------------------
def _bit_dtypes():
    """torch dtype -> (the torch and NumPy dtypes of its bits, the dtype CuPy carries it as)."""
    import ml_dtypes

    torch = _torch()
    return {torch.bfloat16: (torch.int16, np.int16, ml_dtypes.bfloat16),
            torch.float8_e4m3fn: (torch.uint8, np.uint8, np.uint8),
            torch.bool: (torch.uint8, np.uint8, np.bool_)}


def to_cupy(t):
    """A CuPy view of a CUDA tensor (None stays None, tuples item by item). bf16, e4m3fn and bool
    go through their bit patterns (CuPy carries bf16 as ``ml_dtypes.bfloat16``, FP8 as uint8)."""
    import cupy

    if t is None:
        return None
    if isinstance(t, (tuple, list)):
        return tuple(to_cupy(a) for a in t)
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch tensor, got {type(t).__module__}.{type(t).__name__}")
    if t.device.type != "cuda":
        raise TypeError(f"expected a CUDA tensor, got one on {t.device}")
    carrier = _bit_dtypes().get(t.dtype)
    if carrier is None:
        return cupy.from_dlpack(t)
    torch_bits, _, carried = carrier
    return cupy.from_dlpack(t.view(torch_bits)).view(carried)


def to_torch(a, dtype=None):
    """A torch view of a CuPy array (None stays None); ``dtype``: the torch dtype its bits carry
    (default: bf16 for ``ml_dtypes.bfloat16``, bool for bool, else the array's own)."""
    if a is None:
        return None
    import ml_dtypes

    torch = _torch()
    if dtype is None:
        dtype = torch.bfloat16 if a.dtype == ml_dtypes.bfloat16 else torch.bool if a.dtype == np.bool_ else None
    carrier = _bit_dtypes().get(dtype)
    if carrier is None:
        return torch.from_dlpack(a)
    _, numpy_bits, _ = carrier
    return torch.from_dlpack(a.view(numpy_bits)).view(dtype)


_external_streams: dict = {}


def _cupy_stream(torch_stream):
    """A cupy ExternalStream on the same CUDA stream as ``torch_stream`` (cached by handle)."""
    import cupy

    key = (int(torch_stream.cuda_stream), torch_stream.device.index)
    stream = _external_streams.get(key)
    if stream is None:
        stream = _external_streams[key] = cupy.cuda.ExternalStream(key[0], key[1])
    return stream


def _torch_alloc(size: int):
    """CuPy allocator drawing from torch's caching allocator, on the stream CuPy allocates on."""
    import cupy

    torch = _torch()
    if size == 0:
        return cupy.cuda.MemoryPointer(cupy.cuda.Memory(0), 0)
    device = cupy.cuda.Device().id
    ptr = cupy.cuda.get_current_stream().ptr
    current = torch.cuda.current_stream(device)
    if ptr == current.cuda_stream:
        block = torch.empty(size, dtype=torch.uint8, device=f"cuda:{device}")
    else:
        with torch.cuda.stream(torch.cuda.ExternalStream(ptr, device=f"cuda:{device}")):
            block = torch.empty(size, dtype=torch.uint8, device=f"cuda:{device}")
    memory = cupy.cuda.UnownedMemory(block.data_ptr(), size, block, device)
    return cupy.cuda.MemoryPointer(memory, 0)


@contextmanager
def _on_stream(torch_stream):
    """CuPy work inside runs on ``torch_stream`` (its device current) and allocates through torch."""
    import cupy

    with cupy.cuda.Device(torch_stream.device.index), _cupy_stream(torch_stream), \
            cupy.cuda.using_allocator(_torch_alloc):
        yield


def _has_event(overlap) -> bool:
    """Whether ``overlap`` (an :class:`EventOverlap` or None) holds an event to wait for."""
    return overlap is not None and overlap.event is not None


def _wait_event(torch_stream, overlap) -> None:
    """Makes ``torch_stream`` wait for the event of ``overlap`` (an :class:`EventOverlap`)."""
    with _on_stream(torch_stream):
        _cupy_stream(torch_stream).wait_event(overlap.event.event)


# ---------------------------------------------------------------------------------------------
# Buffer
# ---------------------------------------------------------------------------------------------
class Buffer:
    """DeepEP v1's ``deep_ep.Buffer`` over :class:`cupy_ep.Buffer` (same calls, torch tensors).

    Args (DeepEP's, in its order):
        group: a ``torch.distributed`` ProcessGroup (the job needs no MPI), or None with ``comm``.
        num_nvl_bytes, num_rdma_bytes, low_latency_mode: as DeepEP; size them with this class's
            static hints (cupy_ep's sizes differ from DeepEP's).
        num_qps_per_rank: accepted, unused (no RDMA queue pairs of cupy_ep's own).
        allow_nvlink_for_low_latency_mode: False makes the low-latency mode use NVSHMEM puts only.
        allow_mnnvl: True raises NotImplementedError.
        explicitly_destroy: as DeepEP, :meth:`destroy` needs it. Without it the Buffer is released
            at process exit (cupy_ep frees nothing in a destructor: freeing is collective).
        comm: an mpi4py communicator, used when ``group`` is None.
        **options: cupy_ep.Buffer's own keyword arguments (``num_nvl_peers``, ``timeout_s``, ...).

    Attributes: ``rank``, ``group_size``, ``group``, ``num_nvl_bytes``, ``num_rdma_bytes``,
    ``low_latency_mode``, ``explicitly_destroy`` (DeepEP's); ``cupy_ep_buffer``, the Buffer it drives.
    """

    num_sms: int = 20

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False, comm=None, **options):
        from . import buffer as cupy_ep_buffer

        torch = _torch()
        kwargs = buffer_options(low_latency_mode, num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl)
        kwargs.update(options)
        if group is not None:
            from .torch_comm import TorchComm

            communicator = TorchComm(group)
        elif comm is not None:
            communicator = comm
        else:
            raise ValueError("Either 'group' or 'comm' must be provided.")
        self.group = group if group is not None else comm
        self.comm = communicator
        self.num_nvl_bytes, self.num_rdma_bytes = int(num_nvl_bytes), int(num_rdma_bytes)
        self.low_latency_mode, self.explicitly_destroy = bool(low_latency_mode), bool(explicitly_destroy)
        inner = cupy_ep_buffer.Buffer(communicator, num_nvl_bytes, num_rdma_bytes, low_latency_mode, **kwargs)
        same_device = torch.cuda.is_available() and torch.cuda.current_device() == inner.device_id
        if not all(communicator.allgather(same_device)):
            inner.destroy()
            raise ValueError(f"torch's current CUDA device must be the GPU cupy_ep picked for each rank (here "
                             f"cuda:{inner.device_id}, the rank's index on its host modulo the GPUs it sees); "
                             f"call torch.cuda.set_device(...) accordingly on every rank first")
        self.cupy_ep_buffer = inner
        self.rank, self.group_size = inner.rank, inner.num_ranks
        self.device = torch.device("cuda", inner.device_id)
        self._copy_stream = torch.cuda.Stream(self.device)   # reads num_tokens_per_rank for the handle

    # -- life cycle, streams -------------------------------------------------------------------
    def destroy(self) -> None:
        """Frees the Buffer (collective); needs ``explicitly_destroy=True``, as in DeepEP."""
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        self.cupy_ep_buffer.destroy()

    def is_available(self) -> bool:
        return self.cupy_ep_buffer.is_available()

    @staticmethod
    def is_sm90_compiled() -> bool:
        return True   # cupy_ep compiles its kernels for the GPU it runs on, at run time

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets the SMs of the normal-mode kernels used when no ``config`` is given (even, as DeepEP)."""
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded now on torch's current stream."""
        from .event import EventOverlap as CupyEpEvent

        torch = _torch()
        stream = torch.cuda.current_stream()
        with _on_stream(stream):
            return EventOverlap(CupyEpEvent(_cupy_stream(stream).record()))

    def get_comm_stream(self):
        """The communication stream, as a torch stream."""
        torch = _torch()
        return torch.cuda.ExternalStream(self.cupy_ep_buffer.comm_stream.ptr, device=self.device)

    def get_local_buffer_tensor(self, dtype, size=None, offset: int = 0, use_rdma_buffer: bool = False):
        refuse("get_local_buffer_tensor (the raw communication buffer)", True)

    @contextmanager
    def _call(self):
        """cupy_ep work on torch's current stream, allocating through torch."""
        torch = _torch()
        with _on_stream(torch.cuda.current_stream(self.device)):
            yield

    # -- configuration and size hints ------------------------------------------------------------
    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """The configuration ``dispatch`` uses without ``config``: ``Buffer.num_sms`` SMs, any rank count."""
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """The configuration ``combine`` uses without ``config``."""
        return Config(Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of ``num_rdma_bytes`` the low-latency mode needs (cupy_ep's own sizes)."""
        from .buffer import Buffer as CupyEpBuffer

        return CupyEpBuffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks,
                                                           num_experts)

    @staticmethod
    def get_nvl_buffer_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_topk: int = 9,
                                 num_nvl_peers: Optional[int] = None) -> int:
        """cupy_ep's: bytes of ``num_nvl_bytes`` for dispatches of up to ``num_max_tokens_per_rank`` tokens."""
        from .buffer import Buffer as CupyEpBuffer

        return CupyEpBuffer.get_nvl_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk,
                                                     num_nvl_peers)

    @staticmethod
    def get_rdma_buffer_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_nvl_peers: int,
                                  num_topk: int = 9) -> int:
        """cupy_ep's: bytes of ``num_rdma_bytes`` for the normal mode across NVLink domains."""
        from .buffer import Buffer as CupyEpBuffer

        return CupyEpBuffer.get_rdma_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_nvl_peers,
                                                      num_topk)

    @staticmethod
    def _config(config: Optional[Config], default: Config):
        config = default if config is None else config
        if not isinstance(config, Config):
            raise TypeError(f"config: expected a cupy_ep.torch.Config, got {type(config).__name__}")
        return config.to_cupy_ep()

    @staticmethod
    def _event(previous_event):
        return None if previous_event is None else previous_event.event

    # -- layout ----------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """As DeepEP: ``(num_tokens_per_rank, num_tokens_per_rdma_rank or None, num_tokens_per_expert,
        is_token_in_rank, event)``."""
        with self._call():
            per_rank, per_rdma, per_expert, in_rank, event = self.cupy_ep_buffer.get_dispatch_layout(
                to_cupy(topk_idx), num_experts, previous_event=self._event(previous_event), async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream)
            outputs = tuple(to_torch(a) for a in (per_rank, per_rdma, per_expert, in_rank))
        return (*outputs, self._overlap(event, async_finish, (topk_idx, *outputs)))

    def _overlap(self, event, async_finish: bool, tensors, on_wait=()) -> EventOverlap:
        if not async_finish:
            for fn in on_wait:
                fn()
            return EventOverlap(None)
        return EventOverlap(event, tuple(t for t in tensors if t is not None), on_wait)

    # -- normal mode -----------------------------------------------------------------------------
    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """As DeepEP: ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)``; a cached dispatch (``handle=``) returns ``(recv_x, None, None, None, None, event)``.

        ``x``: bf16 ``[N, H]``, or ``(e4m3fn [N, H], scales)`` with float32 ``[N, H/128]`` scales in
        any layout (column-major included) or DeepEP's packed UE8M0 int32 ``[N, H/512]``; received
        scales come back in the same type, row-major (as DeepEP)."""
        torch = _torch()
        inner = self.cupy_ep_buffer
        cupy_handle = None if handle is None else _inner_handle(handle, DispatchHandle)
        x_in, packed, previous_event = self._normal_x(x, previous_event)
        counts = None
        if handle is None and num_worst_tokens == 0 and inner.num_rdma_ranks == 1 and num_tokens_per_rank is not None:
            counts = self._read_counts(num_tokens_per_rank, previous_event)
        with self._call():
            recv_x, recv_idx, recv_w, per_expert, inner_handle, event = inner.dispatch(
                to_cupy(x_in), handle=cupy_handle, num_tokens_per_rank=to_cupy(num_tokens_per_rank),
                num_tokens_per_rdma_rank=to_cupy(num_tokens_per_rdma_rank),
                is_token_in_rank=to_cupy(is_token_in_rank), num_tokens_per_expert=to_cupy(num_tokens_per_expert),
                topk_idx=to_cupy(topk_idx), topk_weights=to_cupy(topk_weights), expert_alignment=expert_alignment,
                num_worst_tokens=num_worst_tokens,
                config=self._config(config, self.get_dispatch_config(self.group_size)),
                previous_event=self._event(previous_event), async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream)
            if isinstance(recv_x, tuple):
                out_x, on_wait = self._normal_recv_fp8(recv_x, packed)
            else:
                out_x, on_wait = to_torch(recv_x), ()
            recv_idx, recv_w = to_torch(recv_idx), to_torch(recv_w)
            tensors = (*(x_in if isinstance(x_in, tuple) else (x_in,)), topk_idx, topk_weights, recv_idx, recv_w)
            overlap = self._overlap(event, async_finish, tensors, on_wait)
        if handle is not None:
            return out_x, None, None, None, None, overlap
        internode = inner.num_rdma_ranks > 1
        known = {"is_token_in_rank": is_token_in_rank}
        if num_worst_tokens > 0 and not internode:
            known["rank_prefix_matrix"] = Missing("rank_prefix_matrix", "not made with num_worst_tokens > 0 (it "
                                                  "would need a host collective)")
        if counts is not None:
            host, ready = counts
            ready.synchronize()
            matrix = rank_prefix_matrix(self.comm.allgather(host.tolist()))
            known["rank_prefix_matrix"] = torch.from_numpy(matrix).to(self.device)
        return (out_x, recv_idx, recv_w, per_expert, DispatchHandle(inner_handle, internode, known),
                overlap)

    def _read_counts(self, num_tokens_per_rank, previous_event):
        """Starts copying ``num_tokens_per_rank`` to the host, on a side stream ordered as the dispatch
        is (after ``previous_event``, else after the current stream): (pinned tensor, ready event)."""
        torch = _torch()
        side = self._copy_stream
        if _has_event(previous_event):
            _wait_event(side, previous_event)
        else:
            side.wait_stream(torch.cuda.current_stream(self.device))
        host = torch.empty(num_tokens_per_rank.shape, dtype=num_tokens_per_rank.dtype, pin_memory=True)
        with torch.cuda.stream(side):
            host.copy_(num_tokens_per_rank, non_blocking=True)
            num_tokens_per_rank.record_stream(side)
            ready = torch.cuda.Event()
            ready.record(side)
        return host, ready

    def _normal_x(self, x, previous_event):
        """(x as cupy_ep takes it, whether the scales were DeepEP's packed UE8M0, the event the call
        waits for): scales made row-major float32, a copy only when they are column-major or packed.

        The copy is ordered as the call is: after ``previous_event`` when given (on a side stream,
        whose end the call then waits for instead: the communication stream waits for the event
        alone, not for the current stream), else on the current stream (which the call follows).
        """
        if not isinstance(x, (tuple, list)):
            return x, False, previous_event
        torch = _torch()
        if len(x) != 2:
            raise TypeError(f"x: an FP8 input is a pair (x_fp8, scales), got {len(x)} items")
        data, scales = x
        if not isinstance(scales, torch.Tensor):
            raise TypeError(f"x[1]: expected a torch tensor, got {type(scales).__name__}")
        packed = scales.dtype == torch.int32
        if not packed and scales.is_contiguous():
            return x, False, previous_event
        after_event = _has_event(previous_event)
        stream = self._copy_stream if after_event else torch.cuda.current_stream(self.device)
        with _on_stream(stream), torch.cuda.stream(stream):
            if after_event:
                _wait_event(stream, previous_event)
                scales.record_stream(stream)
            if packed:
                row_major = to_torch(ue8m0_to_float32(to_cupy(unpack_ue8m0(scales))))
            else:
                row_major = scales.contiguous()
            row_major.record_stream(self.get_comm_stream())
            if after_event:
                previous_event = Buffer.capture()
        return (data, row_major), packed, previous_event

    def _normal_recv_fp8(self, recv_x, packed: bool):
        """The received FP8 pair as torch tensors; packed UE8M0 scales are rebuilt once the rows arrived."""
        torch = _torch()
        data, scales = to_torch(recv_x[0], torch.float8_e4m3fn), to_torch(recv_x[1])
        if not packed:
            return (data, scales), ()
        out = torch.empty((scales.shape[0], scales.shape[1] // 4), dtype=torch.int32, device=self.device)

        def repack():
            out.copy_(pack_ue8m0(float_to_ue8m0(scales, torch)))

        return (data, out), (repack,)

    def combine(self, x, handle, topk_weights=None, bias=None, config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """As DeepEP: ``(combined_x, combined_topk_weights or None, event)``, a plain sum over the ranks."""
        cupy_handle = _inner_handle(handle, DispatchHandle)
        with self._call():
            combined_x, combined_w, event = self.cupy_ep_buffer.combine(
                to_cupy(x), cupy_handle, topk_weights=to_cupy(topk_weights), bias=to_cupy(bias),
                config=self._config(config, self.get_combine_config(self.group_size)),
                previous_event=self._event(previous_event), async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream)
            combined_x, combined_w = to_torch(combined_x), to_torch(combined_w)
        return combined_x, combined_w, self._overlap(event, async_finish, (x, topk_weights, combined_x, combined_w))

    # DeepEP's internode entry points: dispatch and combine pick the topology themselves.
    def internode_dispatch(self, *args, **kwargs):
        return self.dispatch(*args, **kwargs)

    def internode_combine(self, *args, **kwargs):
        return self.combine(*args, **kwargs)

    # -- low-latency mode ------------------------------------------------------------------------
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        with self._call():
            self.cupy_ep_buffer.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        """As DeepEP: ``(recv_x, recv_count, handle, event, hook)``. With ``use_fp8`` the scales are
        column-major in their last two dimensions, float32 ``[E_local, R*M, H/128]`` or, with
        ``use_ue8m0``, packed int32 ``[E_local, R*M, H/512]`` (one copy of the scales, made once
        the rows arrived: at once, in the hook, or when the event is waited on)."""
        if use_ue8m0 and not round_scale:
            raise ValueError("use_ue8m0: needs round_scale=True (as in DeepEP)")
        torch = _torch()
        with self._call():
            recv_x, recv_count, inner_handle, event, hook = self.cupy_ep_buffer.low_latency_dispatch(
                to_cupy(x), to_cupy(topk_idx), num_max_dispatch_tokens_per_rank, num_experts, use_fp8=use_fp8,
                round_scale=round_scale, use_ue8m0=use_ue8m0, async_finish=async_finish,
                return_recv_hook=return_recv_hook,
                cumulative_local_expert_recv_stats=to_cupy(cumulative_local_expert_recv_stats),
                dispatch_wait_recv_cost_stats=to_cupy(dispatch_wait_recv_cost_stats))
            finish = ()
            if use_fp8:
                data, scales = to_torch(recv_x[0], torch.float8_e4m3fn), to_torch(recv_x[1])
                scales_out, finish = self._ll_scales(scales, use_ue8m0)
                out_x = (data, scales_out)
            else:
                out_x = to_torch(recv_x)
            recv_count = to_torch(recv_count)
            handle = LowLatencyHandle(inner_handle, (to_torch(inner_handle[0]), to_torch(inner_handle[1]),
                                                     *inner_handle[2:5]))
        if hook is not None:
            hook, finish = self._torch_hook(hook, finish), ()
        tensors = (x, topk_idx, *(out_x if use_fp8 else (out_x,)), recv_count, handle[0], handle[1],
                   cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats)
        return out_x, recv_count, handle, self._overlap(event, async_finish, tensors, finish), hook

    def _ll_scales(self, scales, use_ue8m0: bool):
        """DeepEP's column-major (packed) scales, allocated now, filled by the returned callable."""
        torch = _torch()
        src = pack_ue8m0(scales) if use_ue8m0 else scales
        e, t, g = src.shape
        out = torch.empty_strided((e, t, g), (g * t, 1, t), dtype=src.dtype, device=self.device)
        return out, (lambda: out.copy_(src),)

    def _torch_hook(self, hook, finish=()):
        """The receive hook, run on torch's current stream, then what the outputs still need."""

        def run():
            with self._call():
                hook()
                for fn in finish:
                    fn()

        return run

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out=None, combine_wait_recv_cost_stats=None):
        """As DeepEP: ``(combined_x, event, hook)``, ``combined_x[t] = sum_k w[t, k] * y_k(t)``."""
        cupy_handle = _inner_handle(handle, LowLatencyHandle)
        with self._call():
            combined, event, hook = self.cupy_ep_buffer.low_latency_combine(
                to_cupy(x), to_cupy(topk_idx), to_cupy(topk_weights), cupy_handle, use_logfmt=use_logfmt,
                zero_copy=zero_copy, async_finish=async_finish, return_recv_hook=return_recv_hook, out=to_cupy(out),
                combine_wait_recv_cost_stats=to_cupy(combine_wait_recv_cost_stats))
            combined_x = out if out is not None else to_torch(combined)
        if hook is not None:
            hook = self._torch_hook(hook)
        tensors = (x, topk_idx, topk_weights, handle[0], handle[1], combined_x, combine_wait_recv_cost_stats)
        return combined_x, self._overlap(event, async_finish, tensors), hook

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Shrink mode (``enable_shrink=True``, passed through to cupy_ep): masks or unmasks a rank here."""
        with self._call():
            self.cupy_ep_buffer.low_latency_update_mask_buffer(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status) -> None:
        """Shrink mode: this rank's mask into ``mask_status`` (int32 CUDA tensor ``[R]``, 1 = masked)."""
        with self._call():
            self.cupy_ep_buffer.low_latency_query_mask_buffer(to_cupy(mask_status))

    def low_latency_clean_mask_buffer(self) -> None:
        """Shrink mode: unmasks the ranks that make this call too (collective, unlike DeepEP's)."""
        with self._call():
            self.cupy_ep_buffer.low_latency_clean_mask_buffer()

    def get_next_low_latency_combine_buffer(self, handle):
        """The bf16 ``[E_local, R*M, H]`` tensor to write expert outputs into for ``zero_copy=True``."""
        with self._call():
            return to_torch(self.cupy_ep_buffer.get_next_low_latency_combine_buffer(
                _inner_handle(handle, LowLatencyHandle)))

