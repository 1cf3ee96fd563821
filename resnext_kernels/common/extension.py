"""Loading of the compiled extension ``resnext_kernels._C``.

Import of the package never fails because ``_C`` is missing or was built
against another torch: the failure is kept as a reason string and reported by
``available_backends()`` and ``python -m resnext_kernels info``.
"""

import importlib

_C = None
_C_LOAD_ERROR = None


def _load():
    global _C, _C_LOAD_ERROR
    try:
        _C = importlib.import_module("resnext_kernels._C")
    except Exception as exc:  # ImportError, OSError (undefined symbol), ...
        _C = None
        _C_LOAD_ERROR = f"resnext_kernels._C failed to load: {type(exc).__name__}: {exc}"


def extension():
    """The loaded ``_C`` module, or None."""
    return _C


def extension_error():
    """Why ``_C`` could not be loaded, or None if it loaded."""
    return _C_LOAD_ERROR


def built_with_cuda():
    """True when ``_C`` was compiled with the CUDA kernels."""
    return _C is not None and bool(_C.built_with_cuda())


_load()
