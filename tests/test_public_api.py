"""The package's top-level names: what the docs and the GPU tests use must be importable."""
import inspect

import cupy_ep
from cupy_ep import errors


def test_every_exported_name_exists():
    missing = [name for name in cupy_ep.__all__ if not hasattr(cupy_ep, name)]
    assert missing == []


def test_every_runtime_error_class_is_exported():
    error_classes = {name for name, obj in inspect.getmembers(errors, inspect.isclass)
                     if issubclass(obj, errors.CupyEpError) and obj.__module__ == errors.__name__}
    assert error_classes - set(cupy_ep.__all__) == set()
    for name in error_classes:
        assert getattr(cupy_ep, name) is getattr(errors, name)
