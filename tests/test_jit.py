"""cupy_ep.jit: constants, options, cache, search path, collective agreement (no GPU needed),
and, where a GPU exists, compiling, loading and launching."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cupy_ep import bootstrap, jit
from cupy_ep.errors import CompileError, GPUUnavailableError

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
HAS_GPU = bootstrap.gpu_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")

KERNEL = r'''
#include "common.cuh"
static_assert(GOOD == 1, "GOOD must be 1");
extern "C" __global__ void scale(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] * FACTOR + OFFSET;
}
'''


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Own cache directory and an empty user search path for every test."""
    monkeypatch.setenv("CUPY_EP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(jit, "_user_kernel_dirs", [])


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "src" / "scale.cu"
    path.parent.mkdir()
    path.write_text(KERNEL)
    return path


@pytest.fixture
def nvrtc_calls(monkeypatch):
    """Counts real NVRTC compilations (cache misses)."""
    calls = []
    real = jit._nvrtc_cubin

    def counting(source, name, options):
        calls.append(name)
        return real(source, name, options)

    monkeypatch.setattr(jit, "_nvrtc_cubin", counting)
    return calls


CONSTS = {"GOOD": 1, "FACTOR": 2.0, "OFFSET": 0.5}


# ---------------------------------------------------------------------------
# Constants and options
# ---------------------------------------------------------------------------
def test_format_constants():
    text = jit.format_constants({"B": True, "A": 7168, "NEG": -3, "F": 0.25, "G": -1.5,
                                 "T": " float ", "NP": np.int64(5), "NB": np.bool_(False),
                                 "NF": np.float32(0.5), "BIG": 2**40})
    assert text.splitlines() == [
        "#define A 7168", "#define B 1", "#define BIG 1099511627776", "#define F 0.25",
        "#define G (-1.5)", "#define NB 0", "#define NEG (-3)", "#define NF 0.5",
        "#define NP 5", "#define T float"]
    assert jit.format_constants(None) == jit.format_constants({}) == ""


@pytest.mark.parametrize("constants, exc, match", [
    ({"1A": 1}, ValueError, "C identifier"),
    ({"A-B": 1}, ValueError, "C identifier"),
    ({"": 1}, ValueError, "C identifier"),
    ({"A": float("nan")}, ValueError, "not finite"),
    ({"A": float("inf")}, ValueError, "not finite"),
    ({"A": "1\n#include <x>"}, ValueError, "one non-empty line"),
    ({"A": ""}, ValueError, "one non-empty line"),
    ({"A": None}, TypeError, "unsupported type"),
    ({"A": [1]}, TypeError, "unsupported type"),
    ([("A", 1)], TypeError, "must be a dict"),
])
def test_format_constants_rejects(constants, exc, match):
    with pytest.raises(exc, match=match):
        jit.format_constants(constants)


def test_constants_reach_the_source_and_errors_point_at_the_file(kernel, nvrtc_calls):
    assert jit.compile_check(kernel, CONSTS)[:4] == b"\x7fELF"
    with pytest.raises(CompileError) as info:
        jit.compile_check(kernel, {**CONSTS, "GOOD": 0})
    msg = str(info.value)
    assert "GOOD must be 1" in msg
    assert f"{kernel}(3)" in msg  # #line keeps the real file name and line number
    with pytest.raises(CompileError, match="identifier \"FACTOR\" is undefined"):
        jit.compile_check(kernel, {"GOOD": 1, "OFFSET": 0})


def test_options(kernel, tmp_path):
    with pytest.raises(ValueError, match="arch="):
        jit.compile_check(kernel, CONSTS, options=("-arch=sm_80",))
    with pytest.raises(TypeError, match="sequence of strings"):
        jit.compile_check(kernel, CONSTS, options="-lineinfo")
    cxx17 = tmp_path / "cxx17.cu"
    cxx17.write_text('extern "C" __global__ void k(int* p) { if constexpr (sizeof(int) == 4) *p = 1; }\n')
    jit.compile_check(cxx17)  # -std=c++17 by default
    with pytest.raises(CompileError):
        jit.compile_check(cxx17, options=("-std=c++14", "-Werror", "all-warnings"))
    jit.compile_check(kernel, CONSTS, options=("-lineinfo", "--use_fast_math"))


@pytest.mark.parametrize("arch", ["sm_90", 90, "90", "sm_90a", "sm_80"])
def test_arch_forms(kernel, arch):
    assert jit.compile_check(kernel, CONSTS, arch=arch)[:4] == b"\x7fELF"


@pytest.mark.parametrize("arch", ["compute_90", "sm9", "hopper", ""])
def test_bad_arch(kernel, arch):
    with pytest.raises(ValueError, match="architecture"):
        jit.compile_check(kernel, CONSTS, arch=arch)


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------
def test_cache_hits_and_invalidation(tmp_path, nvrtc_calls):
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "helper.cuh").write_text('#include "deeper.cuh"\n')
    (inc / "deeper.cuh").write_text("#define HELPER_VALUE 1\n")
    src = tmp_path / "k.cu"
    src.write_text('#include <helper.cuh>\n'
                   'extern "C" __global__ void k(int* p) { *p = HELPER_VALUE + N; }\n')

    first = jit.compile_check(src, {"N": 1}, include_dirs=[inc])
    assert jit.compile_check(src, {"N": 1}, include_dirs=[inc]) == first
    assert len(nvrtc_calls) == 1

    jit.compile_check(src, {"N": 2}, include_dirs=[inc])  # constants
    jit.compile_check(src, {"N": 1}, include_dirs=[inc], options=("-lineinfo",))  # options
    jit.compile_check(src, {"N": 1}, include_dirs=[inc], arch="sm_80")  # arch
    assert len(nvrtc_calls) == 4
    (inc / "deeper.cuh").write_text("#define HELPER_VALUE 2\n")  # a header two levels down
    assert jit.compile_check(src, {"N": 1}, include_dirs=[inc]) != first
    assert len(nvrtc_calls) == 5

    cache = Path(os.environ["CUPY_EP_CACHE_DIR"])
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 5 and all(f.startswith("k-") and f.endswith(".cubin") for f in files)


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("CUPY_EP_CACHE_DIR")
    assert jit.cache_dir() == Path.home() / ".cache" / "cupy_ep" / "kernels"


def test_concurrent_processes_share_the_cache(kernel):
    """Several processes compiling the same kernel at once all succeed, leaving one cubin."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from cupy_ep import jit; "
            f"print(len(jit.compile_check(sys.argv[2], {CONSTS!r})))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(REPO), str(kernel)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o for o, _ in outs}) == 1
    cache = Path(os.environ["CUPY_EP_CACHE_DIR"])
    assert [p.suffix for p in cache.iterdir()] == [".cubin"]


# ---------------------------------------------------------------------------
# Where kernels are found
# ---------------------------------------------------------------------------
def test_builtin_kernel_dir():
    builtin = jit.builtin_kernel_dir()
    # The source tree's kernels_cu/, or the installed package data cupy_ep/kernels_cu/.
    assert builtin in (REPO / "kernels_cu", Path(jit.__file__).resolve().parent / "kernels_cu")
    assert jit.kernel_dirs() == [builtin]
    assert jit.resolve_kernel("common.cuh") == builtin / "common.cuh"


def test_user_kernel_dirs(tmp_path, nvrtc_calls):
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir()
    other.mkdir()
    (mine / "user.cu").write_text('#include "common.cuh"\n'
                                  'extern "C" __global__ void k(u64* t) { *t = global_timer_ns(); }\n')
    (other / "user.cu").write_text("#error wrong directory\n")
    with pytest.raises(FileNotFoundError, match="user.cu"):
        jit.resolve_kernel("user.cu")
    jit.add_kernel_dir(mine)
    jit.add_kernel_dir(other)
    jit.add_kernel_dir(mine)  # no duplicate
    assert jit.kernel_dirs() == [mine, other, jit.builtin_kernel_dir()]
    assert jit.resolve_kernel("user.cu") == mine / "user.cu"
    jit.compile_check("user.cu")  # common.cuh comes from the built-in directory
    with pytest.raises(NotADirectoryError):
        jit.add_kernel_dir(tmp_path / "missing")


# ---------------------------------------------------------------------------
# Collective agreement (mpiexec, no GPU)
# ---------------------------------------------------------------------------
def run_collective(kernel, cache, nranks, bad):
    cmd = [MPIEXEC, "-n", str(nranks), sys.executable,
           str(REPO / "tests" / "mpi" / "bootstrap_jit_check.py"), str(kernel), str(cache), bad]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec")
def test_collective_compile_agreement(kernel, tmp_path):
    (kernel.parent / "collective.cu").write_text(KERNEL.replace("FACTOR + OFFSET", "2"))
    src = kernel.parent / "collective.cu"
    assert run_collective(src, tmp_path / "c1", 3, "") == ["ok"] * 3
    for bad, ranks in (("1", [1]), ("0,2", [0, 2])):
        results = run_collective(src, tmp_path / f"c-{bad}", 3, bad)
        for res in results:  # every rank raised, naming the same failing ranks
            assert res != "ok"
            assert res["ranks"] == ranks
            assert "GOOD must be 1" in res["message"]
            assert f"failed on rank(s) {', '.join(map(str, ranks))} of 3" in res["message"]


# ---------------------------------------------------------------------------
# NVSHMEM device code (compile only)
# ---------------------------------------------------------------------------
NVSHMEM_KERNEL = r'''
#include <nvshmem.h>
#include <nvshmemx.h>
extern "C" __global__ void put_signal(int* dst, const int* src, unsigned long long* sig, int pe) {
    nvshmemx_int_put_signal_nbi_warp(dst, src, NUM, (uint64_t*)sig, 1, NVSHMEM_SIGNAL_ADD, pe);
    nvshmem_quiet();
}
'''


def _nvshmem_headers():
    try:
        return jit.nvshmem_include_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_nvshmem_nvrtc_compile_check(tmp_path):
    _nvshmem_headers()
    if jit.nvshmem_version() < (3, 8, 0):
        pytest.skip("NVSHMEM headers older than 3.8 do not compile under NVRTC")
    src = tmp_path / "nv.cu"
    src.write_text(NVSHMEM_KERNEL)
    assert jit.compile_check(src, {"NUM": 32}, nvshmem=True, backend="nvrtc")[:4] == b"\x7fELF"
    with pytest.raises(CompileError, match="nvshmem.h"):
        jit.compile_check(src, {"NUM": 32})  # without the NVSHMEM include directories


def test_nvshmem_nvcc_backend_builds(tmp_path, nvrtc_calls):
    _nvshmem_headers()
    try:
        jit._find_nvcc()
        jit._nvshmem_device_lib()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    src = tmp_path / "nv.cu"
    src.write_text(NVSHMEM_KERNEL)
    cubin = jit.compile_check(src, {"NUM": 32}, nvshmem=True, backend="nvcc")
    assert cubin[:4] == b"\x7fELF"
    assert jit.compile_check(src, {"NUM": 32}, nvshmem=True, backend="nvcc") == cubin  # cached
    assert nvrtc_calls == []
    with pytest.raises(CompileError, match="nvcc failed"):
        jit.compile_check(src, {}, nvshmem=True, backend="nvcc")  # NUM undefined
    with pytest.raises(ValueError, match="backend"):
        jit.compile_check(src, {"NUM": 32}, nvshmem=True, backend="clang")


# ---------------------------------------------------------------------------
# With a GPU: compile_module, load, launch
# ---------------------------------------------------------------------------
@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error")
def test_compile_module_without_gpu(kernel):
    with pytest.raises(GPUUnavailableError, match="compile_check"):
        jit.compile_module(kernel, CONSTS)


@needs_gpu
def test_compile_module_launch(kernel, nvrtc_calls):
    import cupy

    mod = jit.compile_module(kernel, CONSTS)
    assert jit.compile_module(kernel, CONSTS) is mod  # memoised in the process
    assert len(nvrtc_calls) == 1
    x = cupy.arange(1000, dtype=cupy.float32)
    y = cupy.empty_like(x)
    mod.get_function("scale")(((x.size + 255) // 256,), (256,), (x, y, np.int32(x.size)))
    np.testing.assert_array_equal(cupy.asnumpy(y), np.arange(1000, dtype=np.float32) * 2 + 0.5)
    with pytest.raises(CompileError, match="GOOD must be 1"):
        jit.compile_module(kernel, {**CONSTS, "GOOD": 0})


@needs_gpu
def test_common_cuh_number_formats_on_gpu(tmp_path):
    """common.cuh's bf16 and e4m3 conversions agree with ml_dtypes (round to nearest even)."""
    import cupy
    import ml_dtypes

    src = tmp_path / "formats.cu"
    src.write_text(r'''
#include "common.cuh"
extern "C" __global__ void formats(const float* x, u16* bf16, u16* e4m3x2, float* back, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    bf16[i] = float_to_bf16(x[i]);
    if (2 * i + 1 < n) {
        u16 v = float2_to_e4m3x2(x[2 * i], x[2 * i + 1]);
        e4m3x2[i] = v;
        e4m3x2_to_float2(v, &back[2 * i], &back[2 * i + 1]);
    }
}
''')
    mod = jit.compile_module(src)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * 50).astype(np.float32)
    n = x.size
    d_bf16 = cupy.zeros(n, cupy.uint16)
    d_fp8 = cupy.zeros(n // 2, cupy.uint16)
    d_back = cupy.zeros(n, cupy.float32)
    mod.get_function("formats")((n // 256,), (256,), (cupy.asarray(x), d_bf16, d_fp8, d_back,
                                                      np.int32(n)))
    np.testing.assert_array_equal(cupy.asnumpy(d_bf16), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    want = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(cupy.asnumpy(d_fp8).view(np.uint8), want.view(np.uint8))
    np.testing.assert_array_equal(cupy.asnumpy(d_back), want.astype(np.float32))
