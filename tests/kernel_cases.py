"""Every kernel specialisation that the CPU compile check (tests/test_kernels_compile.py) and
``scripts/sass_digest.py`` compile.

Two sources:

* ``// @constants NAME=VALUE ...`` lines at the top of a kernel file, one configuration per
  line (a file without any is compiled once with no constants); a ``// @needs nvshmem`` line
  compiles it with the NVSHMEM headers. The low-latency files' lines give the shape only: the
  geometry's constants are added by :func:`cupy_ep.geometry.ll_constants`, as the engine adds them.
* the normal-mode files, whose constants are mostly buffer offsets: the shapes in
  :data:`INTRANODE_SHAPES` and :data:`INTERNODE_SHAPES`, turned into constants by the functions
  of :mod:`cupy_ep.geometry` that the engines call, so no offset is typed by hand.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cupy_ep import geometry, jit, limits

KERNEL_DIR = jit.builtin_kernel_dir()
EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "scripts" / "kernels"  # user-kernel example
LL_FILES = ("low_latency.cu", "low_latency_rdma.cu")


@dataclass(frozen=True)
class KernelCase:
    """One compilation: a kernel file, its constants, and whether it needs NVSHMEM."""

    path: Path
    constants: dict
    nvshmem: bool
    id: str


def parse_value(text: str):
    """'4' -> 4, '0.5' -> 0.5, 'true'/'false' -> bool, anything else stays text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_annotations(source: str):
    """([constants dict per '// @constants' line], needs_nvshmem) of a kernel file."""
    configs = []
    for line in re.findall(r"^\s*//\s*@constants\b(.*)$", source, re.MULTILINE):
        consts = {}
        for token in line.split():
            name, sep, value = token.partition("=")
            if not sep or not name:
                raise ValueError(f"bad @constants token {token!r} (want NAME=VALUE)")
            consts[name] = parse_value(value)
        configs.append(consts)
    needs = set()
    for line in re.findall(r"^\s*//\s*@needs\b(.*)$", source, re.MULTILINE):
        needs.update(line.split())
    return configs or [{}], "nvshmem" in needs


def _ll_constants(line: dict) -> dict:
    """A low-latency @constants line completed by the geometry (the line's values win)."""
    geom = geometry.ll_constants(line["NUM_RANKS"], line["NUM_EXPERTS"], line["HIDDEN"], line["TOPK"],
                                 line["MAX_TOKENS"], line["USE_FP8"], line.get("ROUND_SCALE", 0),
                                 line.get("USE_UE8M0", 0), line.get("LL_THREADS", limits.LL_THREADS),
                                 line.get("USE_LOGFMT", 0))
    return {**geom, **line}


# ---- normal mode: shapes ------------------------------------------------------------------------
#: (ranks, channels, receivers, threads, local experts, hidden, FP8, top-k (0: no topk_idx),
#:  biases, chunk, tokens per rank, chaos): all three kernels in one module.
INTRANODE_SHAPES = [
    (4, 12, 12, 1024, 64, 7168, False, 8, 2, 32, 4096, False),
    (3, 4, 3, 256, 3, 2048, True, 9, 0, 1, 77, False),
    (8, 16, 8, 768, 32, 3584, False, 0, 1, 24, 512, False),
    (4, 12, 12, 1024, 64, 7168, False, 8, 2, 32, 4096, True),
    (1, 12, 12, 1024, 256, 7168, False, 8, 0, 32, 4096, False),   # the 1-rank benchmark
]
#: (ranks, ranks per domain, channels, threads, local experts, hidden, FP8, top-k, chunk, tokens
#:  per rank, rows received, chaos).
INTERNODE_SHAPES = [
    (4, 2, 8, 1024, 64, 7168, True, 8, 32, 4096, 16384, False),
    (4, 1, 2, 256, 3, 256, False, 9, 1, 512, 1024, False),
    (4, 1, 2, 256, 2, 256, False, 0, 1, 512, 1024, False),
    (128, 8, 10, 1024, 2, 7168, False, 8, 32, 4096, 16384, False),
    (4, 2, 8, 1024, 64, 7168, True, 8, 32, 4096, 16384, True),
]
#: (ranks, ranks per domain, chaos) of the shape-free internode module (internode_notify_cancelled,
#: internode_barrier_cancelled).
INTERNODE_CANCEL_TOPOLOGIES = [(4, 2, False), (128, 8, False), (4, 2, True)]


def intranode_case(r, c, receivers, threads, e_local, hidden, fp8, topk, num_bias, chunk, tokens, chaos,
                   cached=False) -> dict:
    """The constants of an intranode module holding notify, dispatch (``cached``: a cached
    dispatch's) and combine."""
    slots = geometry.slot_geometry(geometry.intranode_nvl_size_hint(tokens, hidden, r, topk), r, hidden, topk)
    kernels = {
        **geometry.intranode_notify_kernel(e_local, topk),
        **geometry.intranode_combine_kernel(slots, hidden, topk, num_bias, receivers),
        **geometry.intranode_dispatch_kernel(slots, hidden * (1 if fp8 else 2), hidden // limits.FP8_BLOCK if fp8
                                             else 0, topk, receivers, e_local, chunk, cached),
    }
    return dict(geometry.intranode_constants(r, c, threads, **kernels), **({"CHAOS": 1} if chaos else {}))


def internode_case(r, p, c, threads, e_local, hidden, fp8, topk, chunk, tokens, rows, chaos) -> dict:
    """The constants of an internode module (its buffers sized by the hints for these tokens)."""
    nvl = geometry.internode_nvl_size_hint(rows, hidden, r, p, topk)
    rdma = geometry.internode_rdma_size_hint(tokens, hidden, r, p, topk)
    consts = geometry.internode_constants(nvl, rdma, r, p, hidden, topk, hidden * (1 if fp8 else 2),
                                          hidden // limits.FP8_BLOCK if fp8 else 0, e_local * r, c, threads, chunk)
    return dict(consts, **({"CHAOS": 1} if chaos else {}))


def internode_cancel_case(r, p, chaos) -> dict:
    """The constants of the shape-free internode module."""
    return dict(geometry.internode_cancel_constants(r, p), **({"CHAOS": 1} if chaos else {}))


def kernel_cases() -> list[KernelCase]:
    """Every specialisation, in a stable order (file, then configuration)."""
    cases = []
    for path in sorted(KERNEL_DIR.glob("*.cu")) + sorted(EXAMPLE_DIR.glob("*.cu")):
        configs, nvshmem = parse_annotations(path.read_text())
        if path.name == "intranode.cu":
            configs = [intranode_case(*shape) for shape in INTRANODE_SHAPES] + [
                intranode_case(*INTRANODE_SHAPES[0], cached=True), intranode_case(*INTRANODE_SHAPES[-1], cached=True),
                geometry.intranode_constants(limits.MAX_NVL_PEERS, *geometry.INTRANODE_BARRIER_SHAPE)]
        elif path.name == "internode.cu":
            configs = [internode_case(*shape) for shape in INTERNODE_SHAPES] + [
                internode_cancel_case(*topology) for topology in INTERNODE_CANCEL_TOPOLOGIES]
        elif path.name in LL_FILES:
            configs = [_ll_constants(line) for line in configs]
        if nvshmem:   # the remote-atomic signals too (CUPY_EP_SIGNAL_AMO=1), with and without chaos
            configs = configs + [{**configs[0], "SIGNAL_AMO": 1}, {**configs[0], "SIGNAL_AMO": 1, "CHAOS": 1}]
        for i, consts in enumerate(configs):
            cases.append(KernelCase(path, consts, nvshmem, f"{path.name}[{i}]"))
    return cases
