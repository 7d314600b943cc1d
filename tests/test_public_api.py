"""The package's top-level names: what the docs and the GPU tests use must be importable,
and a CPU-only install (no CuPy) imports cupy_ep and says what to install for the GPU Buffer."""
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import cupy_ep
from cupy_ep import errors

HAS_CUPY = importlib.util.find_spec("cupy") is not None
REPO = Path(__file__).resolve().parents[1]


def test_every_exported_name_exists():
    gpu_only = set() if HAS_CUPY else {"Buffer"}
    missing = [name for name in cupy_ep.__all__ if name not in gpu_only and not hasattr(cupy_ep, name)]
    assert missing == []


def test_every_runtime_error_class_is_exported():
    error_classes = {name for name, obj in inspect.getmembers(errors, inspect.isclass)
                     if issubclass(obj, errors.CupyEpError) and obj.__module__ == errors.__name__}
    assert error_classes - set(cupy_ep.__all__) == set()
    for name in error_classes:
        assert getattr(cupy_ep, name) is getattr(errors, name)


def _run_without_cupy(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter where ``import cupy`` fails, as on a CPU-only install."""
    prelude = ("import sys\n"
               "sys.modules['cupy'] = None  # `import cupy` fails, as without the cuda13 extra\n"
               f"sys.path.insert(0, {str(REPO)!r})\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)


def test_cpu_only_install_imports_and_names_the_gpu_extra():
    proc = _run_without_cupy(
        "import cupy_ep, cupy_ep.reference\n"
        "assert sys.modules['cupy'] is None\n"
        "try:\n"
        "    cupy_ep.Buffer\n"
        "except ImportError as e:\n"
        "    print('MSG', e)\n"
        "else:\n"
        "    raise SystemExit('cupy_ep.Buffer did not raise')\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "MSG " + cupy_ep.GPU_STACK_MISSING
    assert 'pip install "cupy_ep[cuda13]"' in cupy_ep.GPU_STACK_MISSING


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Bufer'"):
        cupy_ep.Bufer  # noqa: B018


@pytest.mark.skipif(not HAS_CUPY, reason="needs the cuda13 extra")
def test_gpu_buffer_loads_on_first_use():
    """``import cupy_ep`` imports no CuPy; the first ``cupy_ep.Buffer`` loads the GPU modules,
    which import CuPy at their top."""
    proc = subprocess.run([sys.executable, "-c",
                           f"import sys; sys.path.insert(0, {str(REPO)!r}); import cupy_ep; "
                           "assert 'cupy' not in sys.modules, 'importing cupy_ep imported cupy'; "
                           "B = cupy_ep.Buffer; from cupy_ep.buffer import Buffer; assert B is Buffer"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
