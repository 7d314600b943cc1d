"""cupy_ep's progress messages, through Python ``logging`` (logger ``"cupy_ep"``).

Today one kind: a kernel compilation that took longer than :data:`COMPILE_NOTICE_S` (the first
call of a new shape compiles for seconds, a minute with nvcc) is told once, on rank 0 of
``MPI.COMM_WORLD``: what was compiled, why, where it is cached and how long it took.

Visible without configuration: when neither the ``cupy_ep`` logger nor the root logger has a
handler, a stderr handler at INFO is added on first use. Silenced the usual ways: a logging
configuration (``logging.getLogger("cupy_ep").setLevel(logging.WARNING)``, or a root logger
configured above INFO), or ``CUPY_EP_LOG=off`` in the environment.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("cupy_ep")

#: Compilations shorter than this many seconds are not told.
COMPILE_NOTICE_S = 1.0
#: Constants named in a message (the rest are counted).
_CONSTANTS_SHOWN = 6


def _silenced() -> bool:
    return os.environ.get("CUPY_EP_LOG", "").strip().lower() in ("off", "0", "false", "no", "none")


def _world_rank() -> int:
    """This process's rank in MPI.COMM_WORLD, 0 without MPI (mpi4py is never imported here)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return 0
    return mpi.COMM_WORLD.Get_rank()


def _ensure_handler() -> None:
    if logger.handlers or logging.getLogger().handlers:
        return                       # the application configured logging: its rules apply
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def _describe(constants: dict) -> str:
    items = [f"{k}={v}" for k, v in constants.items()]
    more = len(items) - _CONSTANTS_SHOWN
    return ", ".join(items[:_CONSTANTS_SHOWN]) + (f", {more} more" if more > 0 else "")


@contextmanager
def compile_notice(filename: str, compiler: str, arch: str, constants: dict, cached_at: Path):
    """Wraps one compilation (a cache miss); tells it on rank 0 when it took long enough."""
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    if seconds < COMPILE_NOTICE_S or _silenced() or _world_rank() != 0:
        return
    _ensure_handler()
    shape = f" ({_describe(constants)})" if constants else ""
    logger.info("compiled %s%s for %s with %s in %.1f s: first use of this shape (no cached build); "
                "cached in %s, later runs load it", filename, shape, arch, compiler, seconds, cached_at)
