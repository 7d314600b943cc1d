"""What the misuse cases of every mode share (tests/misuse_cases.py assembles the list): the
shapes the cases' Buffers are sized for and their constructor arguments, :class:`Case` (one
call that must raise), :class:`MisuseCases` (the list, owning the Buffers the cases made) and
the array converter of a backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


#: Shapes the normal-mode Buffer of the cases is sized for (:func:`normal_buffer_kwargs`).
NORMAL_TOKENS, NORMAL_HIDDEN, NORMAL_TOPK = 16, 256, 4
#: Shapes of the low-latency Buffer (:func:`ll_buffer_kwargs`): M, H, experts per rank.
LL_M, LL_HIDDEN, LL_EXPERTS_PER_RANK = 8, 256, 2
#: Tokens of the "buffer too small" case: far more than any Buffer sized for NORMAL_TOKENS holds.
TOO_MANY_TOKENS = 4096


def normal_buffer_kwargs(buffer_cls, num_ranks: int, num_nvl_peers: Optional[int] = None) -> dict:
    """Constructor arguments of a normal-mode Buffer for the cases (and :func:`still_works`)."""
    peers = num_ranks if num_nvl_peers is None else num_nvl_peers
    nvl = buffer_cls.get_nvl_buffer_size_hint(NORMAL_TOKENS, NORMAL_HIDDEN, num_ranks, NORMAL_TOPK,
                                              num_nvl_peers=peers)
    rdma = buffer_cls.get_rdma_buffer_size_hint(NORMAL_TOKENS, NORMAL_HIDDEN, num_ranks, peers, NORMAL_TOPK)
    return dict(num_nvl_bytes=nvl, num_rdma_bytes=rdma, num_nvl_peers=num_nvl_peers)


def ll_buffer_kwargs(buffer_cls, num_ranks: int) -> dict:
    """Constructor arguments of the low-latency Buffer of the cases."""
    nbytes = buffer_cls.get_low_latency_rdma_size_hint(LL_M, LL_HIDDEN, num_ranks, LL_EXPERTS_PER_RANK * num_ranks)
    return dict(num_rdma_bytes=nbytes, low_latency_mode=True)


@dataclass
class Case:
    """One misuse: ``call()`` must raise ``exc`` with every needle in its message.

    Attributes:
        name: what is wrong.
        exc: the exception type both backends raise.
        needles: words the message must contain; the first is the argument's name.
        call: the misuse (runs on every rank, in list order).
        verify: optional extra check of the exception: returns None or what is wrong.
        mode: "normal", "low_latency" or "buffer" (the Buffer :func:`still_works` should exercise).
    """

    name: str
    exc: type
    needles: tuple
    call: Callable[[], object]
    verify: Optional[Callable[[BaseException], Optional[str]]] = None
    mode: str = "normal"

    def run(self) -> Optional[str]:
        """None when ``call()`` raised as expected, else a description of what happened."""
        try:
            self.call()
        except self.exc as e:
            missing = [w for w in self.needles if w not in str(e)]
            if missing:
                return f"{type(e).__name__} without {missing} in its message: {e}"
            return self.verify(e) if self.verify is not None else None
        except Exception as e:  # noqa: BLE001 - report the wrong type
            return f"expected {self.exc.__name__}, got {type(e).__name__}: {e}"
        return f"expected {self.exc.__name__}, nothing raised"


class MisuseCases(list):
    """The list of :class:`Case`; :meth:`close` (collective) destroys the Buffers the cases made."""

    def __init__(self, cases, owned):
        super().__init__(cases)
        self._owned = owned

    def close(self) -> None:
        for b in self._owned.values():
            b.destroy()
        self._owned.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def array_converter(array):
    name = getattr(array, "__name__", None)
    if name == "numpy":
        return lambda a: a
    if name == "cupy":
        from cupy_ep.testing import to_device

        return to_device
    if callable(array):
        return array
    raise TypeError(f"array: expected numpy, cupy or a callable, got {array!r}")
