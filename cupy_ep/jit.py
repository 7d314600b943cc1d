"""Runtime compilation of cupy_ep's CUDA kernels (and of users' own kernel files).

A kernel file is plain CUDA C++ that includes only ``common.cuh`` (no CUDA toolkit headers),
so NVRTC alone compiles it, with or without a GPU. Compile-time constants are emitted as
``#define NAME value`` lines in front of the source, which lets the compiler specialise the
kernel (unrolled loops over ranks, fixed hidden sizes...).

Compiled cubins are stored in an on-disk cache (``~/.cache/cupy_ep/kernels``, or the directory
named by ``CUPY_EP_CACHE_DIR``), keyed by the SHA-256 of everything that decides the binary:
the main source and every header it includes from the kernel/include directories (followed
recursively), the constants, the options, the target architecture and the compiler version.
Files are written atomically (temporary file + ``os.replace``), so several ranks or processes
may compile the same kernel at once. Loaded modules are also memoised per process.

With ``comm=`` (an mpi4py communicator) compilation is collective: every rank compiles and
loads, then all ranks agree on the outcome, and if any rank failed, every rank raises
:class:`cupy_ep.errors.CompileError` naming the failing ranks with their compiler logs,
instead of one rank raising while the others wait forever in the next collective call.

Kernel files are looked up in the directories of :func:`kernel_dirs`: those added with
:func:`add_kernel_dir` first, then cupy_ep's own ``kernels_cu`` directory. A path to an
existing file is used as is.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from cupy_ep import log
from cupy_ep.collective import failures
from cupy_ep.errors import CompileError
from cupy_ep.limits import device_constants

__all__ = [
    "add_kernel_dir",
    "builtin_kernel_dir",
    "cache_dir",
    "compile_check",
    "compile_module",
    "compile_module_nvshmem",
    "format_constants",
    "kernel_dirs",
    "nvshmem_include_dir",
    "nvshmem_version",
    "resolve_kernel",
]

DEFAULT_OPTIONS = ("-std=c++17",)

# Bumped whenever the way a cubin is produced changes, to retire old cache entries.
_CACHE_FORMAT = 1

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ARCH = re.compile(r"sm_[0-9]{2,3}[af]?\Z")
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*([<"])([^>"]+)[>"]', re.MULTILINE)

_user_kernel_dirs: list[Path] = []
_modules: dict = {}
_modules_lock = threading.Lock()


# ---------------------------------------------------------------------------
# Where kernels live
# ---------------------------------------------------------------------------
def builtin_kernel_dir() -> Path:
    """cupy_ep's own kernel directory.

    ``<repo>/kernels_cu`` when running from the source tree, else the installed package data
    ``cupy_ep/kernels_cu``.
    """
    here = Path(__file__).resolve()
    source_tree = here.parents[1] / "kernels_cu"
    if (source_tree / "common.cuh").is_file():
        return source_tree
    return here.parent / "kernels_cu"


def add_kernel_dir(path) -> None:
    """Adds a directory to the kernel search path (searched before cupy_ep's own kernels).

    Its files can ``#include "common.cuh"``: every kernel directory is an include directory.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise NotADirectoryError(f"kernel directory {str(path)!r} does not exist")
    if p not in _user_kernel_dirs:
        _user_kernel_dirs.append(p)


def kernel_dirs() -> list[Path]:
    """The kernel search path: user directories in the order added, then the built-in one."""
    return [*_user_kernel_dirs, builtin_kernel_dir()]


def resolve_kernel(filename) -> Path:
    """Absolute path of a kernel file: an existing path as is, else found in :func:`kernel_dirs`."""
    p = Path(filename).expanduser()
    if p.is_file():
        return p.resolve()
    if not p.is_absolute():
        for d in kernel_dirs():
            if (d / p).is_file():
                return (d / p).resolve()
    searched = ", ".join(str(d) for d in kernel_dirs())
    raise FileNotFoundError(f"kernel file {str(filename)!r} not found (searched: {searched})")


def cache_dir() -> Path:
    """The on-disk cubin cache: ``$CUPY_EP_CACHE_DIR`` or ``~/.cache/cupy_ep/kernels``."""
    env = os.environ.get("CUPY_EP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cupy_ep" / "kernels"


# ---------------------------------------------------------------------------
# Constants, options, architecture
# ---------------------------------------------------------------------------
def _constant_text(name: str, value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, numbers.Integral):
        v = int(value)
        return str(v) if v >= 0 else f"({v})"
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"constant {name} = {value!r} is not finite")
        return repr(v) if v >= 0 else f"({v!r})"
    if isinstance(value, str):
        if not value.strip() or "\n" in value or "\r" in value or value.rstrip().endswith("\\"):
            raise ValueError(f"constant {name} = {value!r}: a text value must be one non-empty line")
        return value.strip()
    raise TypeError(f"constant {name} has unsupported type {type(value).__name__} "
                    "(use bool, int, float or str)")


def format_constants(constants) -> str:
    """The ``#define NAME value`` lines for ``constants`` (sorted by name).

    bool -> 0/1, int -> decimal, float -> a double literal, str -> the text as is (a type
    name, an expression). Names must be C identifiers.
    """
    if constants is None:
        return ""
    if not hasattr(constants, "items"):
        raise TypeError(f"constants must be a dict, not {type(constants).__name__}")
    lines = []
    for name, value in sorted(constants.items()):
        if not isinstance(name, str) or not _IDENT.match(name):
            raise ValueError(f"constant name {name!r} is not a C identifier")
        lines.append(f"#define {name} {_constant_text(name, value)}\n")
    return "".join(lines)


def _with_library_constants(constants) -> dict:
    """The user's constants plus cupy_ep's own (:func:`cupy_ep.limits.device_constants`), which
    ``common.cuh`` needs; a user constant may not redefine one of them."""
    format_constants(constants)  # argument errors first, identically on every rank
    library = device_constants()
    clash = sorted(set(constants or {}) & set(library))
    if clash:
        raise ValueError(f"constants {clash} are cupy_ep's own (cupy_ep.limits); pick other names")
    return {**library, **(constants or {})}


def _check_options(options) -> tuple:
    if isinstance(options, str):
        raise TypeError("options must be a sequence of strings, not one string")
    options = tuple(options)
    for o in options:
        if not isinstance(o, str):
            raise TypeError(f"compiler option {o!r} is not a string")
        if o.startswith(("-arch", "--gpu-architecture", "-gencode", "--generate-code")):
            raise ValueError(f"compiler option {o!r}: give the target with arch= instead")
    if not any(o.startswith(("-std", "--std")) for o in options):
        options = DEFAULT_OPTIONS + options
    return options


def _normalize_arch(arch) -> str:
    """'sm_XY[a|f]' from an int/str compute capability, or the current device's when None."""
    if arch is None:
        import cupy

        try:
            arch = cupy.cuda.Device().compute_capability
        except Exception as e:  # no driver, no device
            from cupy_ep.bootstrap import gpu_unavailable_reason
            from cupy_ep.errors import GPUUnavailableError

            why = gpu_unavailable_reason() or f"{type(e).__name__}: {e}"
            raise GPUUnavailableError(
                f"no usable GPU to compile for ({why}); pass arch= or use compile_check()") from e
    a = str(arch).strip()
    if a.isdigit():
        a = f"sm_{a}"
    if not _ARCH.match(a):
        raise ValueError(f"arch {arch!r} is not a real GPU architecture like 'sm_90' or 90")
    return a


def _include_dirs(main: Path, include_dirs) -> list[Path]:
    dirs = [main.parent, *kernel_dirs(), *(Path(d).expanduser().resolve() for d in include_dirs)]
    out = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _source_digest(main: Path, search: list[Path]) -> list:
    """(name, sha256) of the main file and of every header it includes from ``search``,
    followed recursively. Includes not found there (toolkit/NVSHMEM headers) are listed by
    name only: their version enters the cache key separately."""
    seen: dict[Path, str] = {}
    external: set[str] = set()
    todo = [main]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        data = f.read_bytes()
        seen[f] = hashlib.sha256(data).hexdigest()
        for kind, name in _INCLUDE.findall(data.decode("utf-8", errors="replace")):
            where = ([f.parent] if kind == '"' else []) + search
            hit = next((d / name for d in where if (d / name).is_file()), None)
            if hit is None:
                external.add(name)
            else:
                todo.append(hit.resolve())
    files = sorted((p.name if p == main else str(p), h) for p, h in seen.items())
    return [files, sorted(external)]


def _full_source(main: Path, constants_text: str) -> str:
    # #line keeps compiler messages pointing at the real file and line.
    path = str(main).replace("\\", "/")
    return f'{constants_text}#line 1 "{path}"\n{main.read_text()}'


def _cache_key(parts: dict) -> str:
    blob = json.dumps({"format": _CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; cache entries are readable by all
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------------
# NVRTC
# ---------------------------------------------------------------------------
def _nvrtc_version() -> tuple:
    from cupy.cuda import nvrtc

    return tuple(nvrtc.getVersion())


def _nvrtc_cubin(source: str, name: str, options: list) -> bytes:
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog).strip()
            raise CompileError(f"NVRTC failed to compile {name} ({e}):\n{log}\n"
                               f"options: {' '.join(options)}") from None
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


def _build_nvrtc(main: Path, constants, options: tuple, arch: str, include_dirs,
                 nvshmem: bool) -> Path:
    """Compiles ``main`` with NVRTC (or takes it from the cache); returns the cubin's path."""
    search = _include_dirs(main, include_dirs)
    parts = {"compiler": ["nvrtc", _nvrtc_version()],
             "sources": _source_digest(main, search)}
    defines = []
    if nvshmem:
        external = [nvshmem_include_dir(), *_toolkit_include_dirs()]
        parts["nvshmem"] = [nvshmem_version(), [str(d) for d in external]]
        search = search + [d for d in external if d not in search]
        defines = ["-D__NVSHMEM_NUMBA_SUPPORT__"]
    constants_text = format_constants(constants)
    key = _cache_key({**parts, "constants": constants_text, "options": [*options, *defines],
                      "arch": arch})
    out = cache_dir() / f"{main.stem}-{key[:40]}.cubin"
    if not out.is_file():
        nvrtc_options = [f"-arch={arch}", *options, *defines, *(f"-I{d}" for d in search)]
        with log.compile_notice(main.name, "NVRTC", arch, _user_constants(constants), out):
            _atomic_write(out, _nvrtc_cubin(_full_source(main, constants_text), main.name, nvrtc_options))
    return out


def _user_constants(constants) -> dict:
    """The constants that make a specialisation (without cupy_ep's own), for messages."""
    library = device_constants()
    return {k: v for k, v in (constants or {}).items() if k not in library}


# ---------------------------------------------------------------------------
# Loading, collective agreement
# ---------------------------------------------------------------------------
def _load(cubin: Path, cooperative: bool):
    """A loaded RawModule for ``cubin`` on the current device (memoised per process)."""
    import cupy

    with _modules_lock:
        mod = _modules.get((cubin, cooperative))
        if mod is None:
            mod = cupy.RawModule(path=str(cubin), enable_cooperative_groups=cooperative)
            _modules[(cubin, cooperative)] = mod
    mod.module  # noqa: B018 -- loads the module now, so that load errors are agreed on too
    return mod


def _agree(comm, what: str, fn):
    """Runs ``fn()``; with ``comm`` (a communicator or a Buffer's
    :class:`cupy_ep.collective.CallSteps`), all ranks learn whether it failed anywhere and every
    rank raises :class:`CompileError` naming the failing ranks (with their messages) if so.

    Every rank first meets the others (one round, nothing exchanged): over a Buffer's host steps
    that is where a peer's refusal or absence in the call is learnt, before a compilation that may
    take longer than ``timeout_s``, while a refusing rank's cancelled part waits on the device."""
    if comm is None:
        return fn()
    comm.allgather(None)
    result, error, message = None, None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 -- reported to every rank below
        error, message = e, f"{type(e).__name__}: {e}"
    failed = failures(comm, message)
    if not failed:
        return result
    groups: dict[str, list[int]] = {}
    for r, m in failed.items():
        groups.setdefault(m, []).append(r)
    text = "\n".join(f"--- rank(s) {', '.join(map(str, rs))} ---\n{m}" for m, rs in groups.items())
    err = CompileError(f"{what} failed on rank(s) {', '.join(map(str, failed))} "
                       f"of {comm.Get_size()}:\n{text}")
    err.ranks = list(failed)
    err.logs = failed
    raise err from error


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------
def compile_module(filename, constants=None, *, options=(), comm=None, arch=None,
                   include_dirs=(), cooperative=False):
    """Compiles a kernel file for the current GPU and returns a loaded ``cupy.RawModule``.

    Args:
        filename: a file in :func:`kernel_dirs` (``"layout.cu"``) or a path to one.
        constants: ``{NAME: value}`` emitted as ``#define NAME value`` before the source
            (bool -> 0/1, int, float, or str inserted as is).
        options: extra NVRTC options (after the default ``-std=c++17``; ``-std=...`` given
            here replaces it). ``--use_fast_math`` is not on unless given.
        comm: an mpi4py communicator: compile collectively; if any rank fails, every rank
            raises :class:`CompileError` with the failing ranks and their logs.
        arch: target ``"sm_90"``/``90``...; default: the current device's compute capability.
        include_dirs: more ``-I`` directories (the file's own directory and every kernel
            directory are always on the include path).
        cooperative: launch the module's kernels cooperatively (grid-wide sync).

    Kernels meant to be fetched with ``module.get_function(name)`` should be ``extern "C"``.
    """
    options = _check_options(options)
    constants = _with_library_constants(constants)

    def build():
        main = resolve_kernel(filename)
        return _load(_build_nvrtc(main, constants, options, _normalize_arch(arch),
                                  include_dirs, nvshmem=False), cooperative)

    return _agree(comm, f"compiling {filename}", build)


def compile_check(filename, constants=None, arch="sm_90", options=(), include_dirs=(), *,
                  nvshmem=False, backend="auto", comm=None) -> bytes:
    """Compiles a kernel file without a GPU (no device query) and returns the cubin bytes.

    For CI and for checking kernels on machines without GPUs. ``nvshmem=True`` compiles
    NVSHMEM device code the way :func:`compile_module_nvshmem` does, with its ``backend``.
    ``comm`` makes it collective like :func:`compile_module`.
    """
    options = _check_options(options)
    constants = _with_library_constants(constants)
    _check_backend(backend)

    def build():
        main = resolve_kernel(filename)
        target = _normalize_arch(arch)
        if nvshmem:
            cubin = _build_nvshmem(main, constants, options, target, include_dirs, backend)
        else:
            cubin = _build_nvrtc(main, constants, options, target, include_dirs, nvshmem=False)
        return cubin.read_bytes()

    return _agree(comm, f"compiling {filename}", build)


# ---------------------------------------------------------------------------
# NVSHMEM device code
# ---------------------------------------------------------------------------
def nvshmem_include_dir() -> Path:
    """The NVSHMEM header directory: ``$NVSHMEM_HOME/include`` when set, else the one of the
    ``nvidia-nvshmem-cu13`` wheel (the headers matching the library nvshmem4py loads)."""
    home = os.environ.get("NVSHMEM_HOME")
    candidates = [Path(home) / "include"] if home else []
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("nvshmem")
        if found:
            candidates.append(Path(found))
    except Exception:  # noqa: BLE001 -- cuda.pathfinder missing or failing: try the package
        pass
    try:
        import nvidia.nvshmem

        candidates += [Path(p) / "include" for p in nvidia.nvshmem.__path__]
    except ImportError:
        pass
    for c in candidates:
        if (c / "nvshmem.h").is_file():
            return c.resolve()
    raise FileNotFoundError("NVSHMEM headers not found: install nvidia-nvshmem-cu13 "
                            "or set NVSHMEM_HOME")


def nvshmem_version() -> tuple:
    """(major, minor, patch) of the NVSHMEM headers in :func:`nvshmem_include_dir`."""
    text = (nvshmem_include_dir() / "non_abi" / "nvshmem_version.h").read_text()
    parts = []
    for field in ("MAJOR", "MINOR", "PATCH"):
        m = re.search(rf"#define\s+NVSHMEM_VENDOR_{field}_VERSION\s+(\d+)", text)
        parts.append(int(m.group(1)) if m else 0)
    return tuple(parts)


def _toolkit_include_dirs() -> list[Path]:
    """CUDA runtime and CCCL header directories (NVSHMEM's headers include cuda_runtime.h)."""
    found = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        for lib in ("cudart", "cccl"):
            d = find_nvidia_header_directory(lib)
            if d:
                found.append(Path(d))
    except Exception:  # noqa: BLE001 -- fall back to a toolkit installation
        pass
    if len(found) < 2:
        for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if root and (Path(root) / "include" / "cuda_runtime.h").is_file():
                found = [Path(root) / "include", Path(root) / "include" / "cccl"]
                break
    if not any((d / "cuda_runtime.h").is_file() for d in found):
        raise FileNotFoundError("CUDA runtime headers not found (needed by NVSHMEM's headers): "
                                "install nvidia-cuda-runtime or set CUDA_HOME")
    return [d.resolve() for d in found]


def _find_nvcc() -> Path:
    """nvcc: ``$CUPY_EP_NVCC``, ``$CUDA_PATH/bin``, ``$CUDA_HOME/bin``, ``PATH``, /usr/local/cuda."""
    candidates = [os.environ.get("CUPY_EP_NVCC")]
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")):
        if root:
            candidates.append(str(Path(root) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise FileNotFoundError("nvcc not found (needed by the nvcc backend): set CUPY_EP_NVCC "
                            "or CUDA_HOME, or put nvcc on PATH")


def _nvshmem_device_lib() -> Path:
    lib = nvshmem_include_dir().parent / "lib" / "libnvshmem_device.a"
    if not lib.is_file():
        raise FileNotFoundError(f"{lib} not found (needed by the nvcc backend)")
    return lib


_identity_memo: dict = {}


def _file_identity(path: Path) -> str:
    """sha256 of a tool's version output or of a library, memoised per process."""
    if path not in _identity_memo:
        if path.suffix == ".a":
            _identity_memo[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            r = subprocess.run([str(path), "--version"], capture_output=True, text=True)
            _identity_memo[path] = r.stdout.strip()
    return _identity_memo[path]


def _run(cmd: list) -> None:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise CompileError(f"{Path(str(cmd[0])).name} failed (exit {r.returncode}):\n"
                           f"{(r.stdout + r.stderr).strip()}\n"
                           f"command: {' '.join(map(str, cmd))}")


def _build_nvcc_nvshmem(main: Path, constants, options: tuple, arch: str, include_dirs) -> Path:
    """nvcc -rdc -cubin, then a device link against libnvshmem_device.a into one cubin."""
    nvcc, lib = _find_nvcc(), _nvshmem_device_lib()
    search = _include_dirs(main, include_dirs)
    constants_text = format_constants(constants)
    key = _cache_key({
        "compiler": ["nvcc", _file_identity(nvcc)],
        "sources": _source_digest(main, search),
        "nvshmem": [nvshmem_version(), str(lib), _file_identity(lib)],
        "constants": constants_text, "options": list(options), "arch": arch,
    })
    out = cache_dir() / f"{main.stem}-{key[:40]}.nvcc.cubin"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with log.compile_notice(main.name, "nvcc", arch, _user_constants(constants), out), \
                tempfile.TemporaryDirectory(dir=out.parent, prefix="nvcc-") as tmp:
            src, obj, linked = Path(tmp, main.name), Path(tmp, "rdc.cubin"), Path(tmp, "out.cubin")
            src.write_text(_full_source(main, constants_text))
            includes = [f"-I{d}" for d in [*search, nvshmem_include_dir()]]
            _run([nvcc, f"-arch={arch}", "-rdc=true", "-cubin", *options, *includes,
                  "-o", obj, src])
            _run([nvcc, f"-arch={arch}", "-dlink", "-cubin", obj, f"-L{lib.parent}",
                  "-lnvshmem_device", "-o", linked])
            _atomic_write(out, linked.read_bytes())
    return out


def _check_backend(backend) -> None:
    if backend not in ("auto", "nvrtc", "nvcc"):
        raise ValueError(f"backend must be 'auto', 'nvrtc' or 'nvcc', not {backend!r}")


def _build_nvshmem(main: Path, constants, options: tuple, arch: str, include_dirs,
                   backend: str) -> Path:
    if backend == "auto":
        backend = "nvrtc" if nvshmem_version() >= (3, 8, 0) else "nvcc"
    if backend == "nvrtc":
        return _build_nvrtc(main, constants, options, arch, include_dirs, nvshmem=True)
    return _build_nvcc_nvshmem(main, constants, options, arch, include_dirs)


def compile_module_nvshmem(filename, constants=None, *, options=(), comm=None, arch=None,
                           include_dirs=(), backend="auto", cooperative=False):
    """Compiles a kernel file that calls NVSHMEM device functions (``#include <nvshmem.h>``).

    Same arguments as :func:`compile_module`, plus ``backend``:

    - ``"nvrtc"``: NVRTC with the NVSHMEM and CUDA runtime headers and
      ``-D__NVSHMEM_NUMBA_SUPPORT__``, which makes NVSHMEM's device code self-contained
      (inlined, with a per-module ``nvshmemi_device_state_d``): no device link. Needs headers
      that support NVRTC (NVSHMEM 3.8 does; 3.4.5's fail on ``infiniband/mlx5dv.h``).
    - ``"nvcc"``: ``nvcc -rdc=true -cubin`` then ``nvcc -dlink -cubin`` against
      ``libnvshmem_device.a`` of the same NVSHMEM installation. Needs nvcc (and its host
      compiler for preprocessing).
    - ``"auto"``: ``"nvrtc"`` for NVSHMEM >= 3.8 headers, else ``"nvcc"``.

    The module is returned loaded but NOT yet bound to NVSHMEM: after
    :func:`cupy_ep.bootstrap.init_nvshmem`, call
    :func:`cupy_ep.bootstrap.nvshmem_bind_module` on it before the first launch.
    """
    options = _check_options(options)
    constants = _with_library_constants(constants)
    _check_backend(backend)

    def build():
        main = resolve_kernel(filename)
        cubin = _build_nvshmem(main, constants, options, _normalize_arch(arch), include_dirs,
                               backend)
        return _load(cubin, cooperative)

    return _agree(comm, f"compiling {filename} with NVSHMEM", build)
