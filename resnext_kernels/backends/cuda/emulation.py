"""The CPU emulation library of the CUDA kernel (backend ``cuda_emulated``).

The same kernel source as resnext_kernels._C, compiled with the host C++
compiler against csrc/emulation/cuda_emu.h (thread blocks run one after
another, a block's threads as fibers). It is a separate library, built on
first use with ``torch.utils.cpp_extension.load`` (a message is printed;
~20 s on an idle 2-core machine) into a directory keyed by a hash of the
sources and the torch version, under ``RESNEXT_KERNELS_EMU_BUILD_DIR``, else
``TORCH_EXTENSIONS_DIR``, else ``~/.cache/resnext_kernels``. Its ops live in
``torch.ops.resnext_kernels_emu`` (CPU tensors): the schemas of
csrc/fused_block_ops.cpp compiled with that namespace, and the test helpers
of csrc/emulation/ (emulator self-tests, ``last_launch_plan``).
"""

import functools
import hashlib
import os
import shutil
import sys
import threading

import torch

from ...common import toolkit

NAMESPACE = "resnext_kernels_emu"
# The op schemas (compiled with RK_OPS_NAMESPACE=NAMESPACE), the emulator's
# fiber switch, the emulated implementations, and the emulator's self-test
# kernels.
SOURCES = ("fused_block_ops.cpp", "emulation/cuda_emu.cpp", "emulation/fused_block_emu.cpp",
           "emulation/emu_selftest.cpp")

_lock = threading.Lock()
_loaded = False
_error = None
_on_load = []


def csrc_dir():
    """The kernel sources: the source tree's csrc/, else the installed copy (resnext_kernels/_csrc)."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for cand in (os.path.join(os.path.dirname(package), "csrc"), os.path.join(package, "_csrc")):
        if all(os.path.exists(os.path.join(cand, s)) for s in SOURCES):
            return cand
    return None


def _sources_digest(csrc):
    h = hashlib.sha256(torch.__version__.encode())
    for root, _dirs, files in sorted(os.walk(csrc)):
        for name in sorted(files):
            if name.endswith((".h", ".cuh", ".cpp")):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, csrc).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


@functools.cache
def build_digest():
    """The digest of the emulation's sources and torch version (its build
    directory's name; the tuning store keys emulated timings to it)."""
    return _sources_digest(csrc_dir())


def build_dir(csrc):
    base = os.environ.get("RESNEXT_KERNELS_EMU_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    if not base:
        base = os.path.join(os.path.expanduser("~"), ".cache", "resnext_kernels")
    return os.path.join(base, f"emu-{_sources_digest(csrc)}")


def unavailable_reason():
    """None when the emulation library can be used (or built), else why not."""
    if _error is not None:
        return _error
    if _loaded:
        return None
    if not sys.platform.startswith("linux"):
        return f"the CUDA emulator needs Linux (ucontext fibers), got {sys.platform}"
    if csrc_dir() is None:
        return "the kernel sources (csrc/ or resnext_kernels/_csrc) were not found"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler {cxx!r} on PATH to build the emulation"
    # torch.utils.cpp_extension.load builds with ninja. Checked by name, so
    # that asking (python -m resnext_kernels info) does not import
    # cpp_extension and its CUDA_HOME warning.
    if shutil.which("ninja") is None:
        return "ninja is not installed (torch.utils.cpp_extension.load needs it)"
    return None


def on_load(fn):
    """Run fn() once the library is loaded (the fake kernels of its ops)."""
    _on_load.append(fn)
    return fn


def load():
    """Build (first use) and load the emulation library; raise RuntimeError on failure."""
    global _loaded, _error
    with _lock:
        if _loaded:
            return
        if _error is not None:
            raise RuntimeError(_error)
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        cpp_extension = toolkit.import_cpp_extension()
        csrc = csrc_dir()
        directory = build_dir(csrc)
        os.makedirs(directory, exist_ok=True)
        if not os.path.exists(os.path.join(directory, f"{NAMESPACE}.so")):
            print(f"[resnext_kernels] building the CPU emulation of the CUDA kernels in {directory} "
                  "(first use only, under a minute)", file=sys.stderr, flush=True)
        try:
            cpp_extension.load(
                name=NAMESPACE,
                sources=[os.path.join(csrc, s) for s in SOURCES],
                extra_include_paths=[csrc],
                extra_cflags=["-O2", f"-DRK_OPS_NAMESPACE={NAMESPACE}"],
                build_directory=directory,
                is_python_module=False,
                verbose=False,
            )
        except Exception as exc:
            _error = f"building the CUDA emulation failed: {type(exc).__name__}: {exc}"
            raise RuntimeError(_error) from exc
        for fn in _on_load:
            fn()
        _loaded = True
