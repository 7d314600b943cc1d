"""Kernel launch configuration of the normal (high-throughput) mode."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import limits
from .validation import check_num_sms


@dataclass(frozen=True)
class Config:
    """How many SMs and threads the normal-mode kernels use, and how often they signal.

    Args:
        num_sms: blocks of the dispatch/combine kernels (one per SM).
            Inside one NVLink domain ``num_sms - num_receivers`` of them send, one channel (a
            contiguous range of this rank's tokens) each, at most 64. Across domains (internode)
            the kernels use ``num_sms // 3`` channels, each with a sending, a forwarding and a
            receiving block.
        num_threads: threads per block (a multiple of 32, 128 to 1024).
        num_receivers: blocks that copy arrived rows out (dispatch) or sum them (combine) inside
            one domain; default ``num_sms // 2`` (one per channel). A receiver serves its channels
            one after another, so fewer receivers than channels is slower
            (docs/performance.md).
        chunk_tokens: tokens a block moves between two progress signals (tails, or puts and
            signals between domains), 1 to ``num_threads // 32``; default ``num_threads // 32``
            (one token per warp). Small chunks signal more often (lower latency, more fences).

    The configuration must be the same on every rank. Combine reuses the channels of the
    dispatch whose handle it gets; only its ``num_threads`` and ``num_receivers`` apply.

    ``Config()`` is the one default, for every number of ranks: 24 SMs as DeepEP's benchmark
    uses, measured on 4 x H100 with DeepEP's workload (docs/performance.md); there is no
    per-rank-count tuning.
    """

    num_sms: int = 24
    num_threads: int = 1024
    num_receivers: Optional[int] = None
    chunk_tokens: Optional[int] = None

    def __post_init__(self):
        check_num_sms(self.num_sms)
        if not isinstance(self.num_threads, int) or self.num_threads % 32 or not 128 <= self.num_threads <= 1024:
            raise ValueError(f"num_threads: expected a multiple of 32 in [128, 1024], got {self.num_threads!r}")
        if self.num_receivers is None:
            object.__setattr__(self, "num_receivers", self.num_sms // 2)
        if not isinstance(self.num_receivers, int) or not 1 <= self.num_receivers < self.num_sms:
            raise ValueError(f"num_receivers: expected an int in [1, num_sms), got {self.num_receivers!r}")
        if self.num_channels > limits.MAX_CHANNELS:
            raise ValueError(f"num_sms: at most {limits.MAX_CHANNELS} sending blocks, got {self.num_channels}")
        if self.chunk_tokens is None:
            object.__setattr__(self, "chunk_tokens", self.num_threads // 32)
        if not isinstance(self.chunk_tokens, int) or not 1 <= self.chunk_tokens <= self.num_threads // 32:
            raise ValueError(f"chunk_tokens: expected an int in [1, num_threads // 32 = {self.num_threads // 32}], "
                             f"got {self.chunk_tokens!r}")

    @property
    def num_channels(self) -> int:
        """Sending blocks of a dispatch inside one NVLink domain (channels)."""
        return self.num_sms - self.num_receivers

    @property
    def internode_channels(self) -> int:
        """Channels of the internode kernels (a sender, a forwarder and a receiver each)."""
        return max(1, self.num_sms // 3)
