"""The misuse cases of Buffer construction and modes, and of a destroyed Buffer
(tests/misuse_cases.py assembles the list)."""
from __future__ import annotations

from cupy_ep.errors import CupyEpError
from misuse_common import LL_HIDDEN, LL_M, Case, normal_buffer_kwargs
from misuse_normal import NormalInputs


def buffer_cases(buffer_cls, buf, comm, normal: NormalInputs) -> list:
    """Bad constructor arguments, a dispatch on a Buffer without its buffer, a low-latency call on
    ``buf`` (a normal-mode Buffer); across NVLink domains a Buffer without ``num_rdma_bytes``."""
    num_ranks, nvl_peers = comm.Get_size(), buf.num_nvl_ranks
    x, idx, lay, topk, e = normal.x, normal.idx, normal.lay, normal.topk, normal.num_experts

    def no_nvl_buffer():
        b = buffer_cls(comm)
        try:
            b.dispatch(x, **lay, **topk)
        finally:
            b.destroy()

    cases = [
        Case("Buffer: low_latency_mode without num_rdma_bytes", ValueError, ("num_rdma_bytes",),
             lambda: buffer_cls(comm, low_latency_mode=True), mode="buffer"),
        Case("Buffer: negative num_nvl_bytes", ValueError, ("num_nvl_bytes",),
             lambda: buffer_cls(comm, num_nvl_bytes=-1), mode="buffer"),
        Case("Buffer: num_nvl_peers that does not divide the ranks", ValueError, ("num_nvl_peers",),
             lambda: buffer_cls(comm, num_nvl_peers=num_ranks + 1), mode="buffer"),
        Case("Buffer: ll_transport not a transport", ValueError, ("ll_transport",),
             lambda: buffer_cls(comm, num_rdma_bytes=1 << 20, low_latency_mode=True, ll_transport="nvl"),
             mode="buffer"),
        Case("Buffer: timeout_s a string", ValueError, ("timeout_s",),
             lambda: buffer_cls(comm, timeout_s="5"), mode="buffer"),
        Case("Buffer: num_sms 1", ValueError, ("num_sms",), lambda: buffer_cls(comm, num_sms=1), mode="buffer"),
        Case("dispatch on a Buffer without num_nvl_bytes", ValueError, ("num_nvl_bytes",), no_nvl_buffer,
             mode="buffer"),
        Case("low-latency call on a normal-mode Buffer", ValueError, ("low_latency_mode",),
             lambda: buf.low_latency_dispatch(x, idx, LL_M, e)),
    ]
    if buf.num_rdma_ranks > 1:
        def no_rdma_bytes():
            kw = normal_buffer_kwargs(buffer_cls, num_ranks, nvl_peers)
            buffer_cls(comm, num_nvl_bytes=kw["num_nvl_bytes"], num_nvl_peers=nvl_peers)
        cases.append(Case("Buffer: across NVLink domains without num_rdma_bytes", ValueError, ("num_rdma_bytes",),
                          no_rdma_bytes, mode="buffer"))
    return cases


def destroyed_cases(dead, A, x_np, idx_np, e) -> list:
    """Every call on ``dead()``, a destroyed Buffer, raises CupyEpError."""
    x, idx = A(x_np), A(idx_np)
    calls = {
        "get_dispatch_layout": lambda: dead().get_dispatch_layout(idx, e),
        "dispatch": lambda: dead().dispatch(x),
        "combine": lambda: dead().combine(x, None),
        "check": lambda: dead().check(),
        "low_latency_dispatch": lambda: dead().low_latency_dispatch(x, idx, LL_M, e),
        "low_latency_combine": lambda: dead().low_latency_combine(x, idx, idx, None),
        "get_next_low_latency_combine_buffer": lambda: dead().get_next_low_latency_combine_buffer(None),
        "clean_low_latency_buffer": lambda: dead().clean_low_latency_buffer(LL_M, LL_HIDDEN, e),
    }
    return [Case(f"destroyed Buffer: {name}", CupyEpError, ("destroyed",), call, mode="buffer")
            for name, call in calls.items()]
