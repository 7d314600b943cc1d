"""Every kernel specialisation of tests/kernel_cases.py compiles for sm_90 with NVRTC, without a GPU.

The cases come from ``// @constants`` lines at the top of the kernel files (one configuration
per line, annotated as ``// @constants NUM_RANKS=4 HIDDEN=7168 USE_FP8=true``) and, for the
normal-mode files, from shapes turned into constants by :mod:`cupy_ep.geometry`, the code the
engines use (no offset is typed by hand). A file with a ``// @needs nvshmem`` line is compiled
with the NVSHMEM headers (jit's NVRTC route for NVSHMEM device code). ``common.cuh`` and the
headers it includes are checked by a generated file that takes the address of every
non-template device function they declare, which makes NVRTC and ptxas generate code for all
of them.
"""

import re

import pytest

from cupy_ep import jit
from kernel_cases import KERNEL_DIR, kernel_cases, parse_annotations

ARCH = "sm_90"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CUPY_EP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernel-cache"))


@pytest.mark.parametrize("path, constants, nvshmem",
                         [pytest.param(c.path, c.constants, c.nvshmem, id=c.id) for c in kernel_cases()])
def test_kernel_compiles(path, constants, nvshmem):
    if nvshmem:
        try:
            jit.nvshmem_include_dir()
        except FileNotFoundError as e:
            pytest.skip(str(e))
    cubin = jit.compile_check(path, constants, arch=ARCH, nvshmem=nvshmem)
    assert cubin[:4] == b"\x7fELF"


def test_parse_annotations():
    src = ("// Kernel.\n// @constants A=4 B=0.5 C=true NAME=float\n"
           "//   @constants A=8 B=1 C=false NAME=u16\n// @needs nvshmem\n")
    configs, nvshmem = parse_annotations(src)
    assert configs == [{"A": 4, "B": 0.5, "C": True, "NAME": "float"},
                       {"A": 8, "B": 1, "C": False, "NAME": "u16"}]
    assert nvshmem
    assert parse_annotations("__global__ void k() {}\n") == ([{}], False)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_annotations("// @constants A 4\n")


# ---------------------------------------------------------------------------
# common.cuh
# ---------------------------------------------------------------------------
def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", " ", text)


def common_headers():
    """common.cuh and the headers it includes."""
    text = (KERNEL_DIR / "common.cuh").read_text()
    return ["common.cuh", *re.findall(r'^#include "([^"]+)"', text, re.MULTILINE)]


def common_device_functions():
    """Names of the non-template __device__ functions of common.cuh and its headers."""
    text = "".join(_strip_comments((KERNEL_DIR / h).read_text()) for h in common_headers())
    names = []
    for m in re.finditer(r"(template\s*<[^>]*>\s*)?__device__\b[^;{}()=]*?\b([A-Za-z_]\w*)\s*\(",
                         text):
        if m.group(1) is None and m.group(2) not in names:
            names.append(m.group(2))
    return names


def test_common_cuh_compiles(tmp_path):
    assert len(common_headers()) >= 4   # ptx, numeric, status, barrier
    names = common_device_functions()
    assert len(names) >= 25, names  # the parser found the helpers
    stores = "".join(f"    out[{i}] = (const void*)&{n};\n" for i, n in enumerate(names))
    (tmp_path / "common_check.cu").write_text(
        '#include "common.cuh"\n'
        "// Taking each helper's address makes NVRTC and ptxas generate code for all of them.\n"
        'extern "C" __global__ void common_check(const void** out) {\n'
        f"{stores}}}\n")
    cubin = jit.compile_check(tmp_path / "common_check.cu", arch=ARCH)
    assert cubin[:4] == b"\x7fELF"
    for n in names:
        assert n.encode() in cubin, f"{n} was not compiled"
