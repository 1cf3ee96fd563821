"""Python glue of the `cuda` and `cuda_emulated` backends.

``cuda``: ``torch.ops.resnext_kernels.fused_block_cuda``, the fused block
kernel of csrc/fused_block_kernel.cuh compiled into ``resnext_kernels._C``.

``cuda_emulated`` (testing only): the same kernel source compiled with the
host C++ compiler against csrc/emulation/cuda_emu.h, which runs thread blocks
one after another and a block's threads as fibers. It is a separate library,
built on first use with ``torch.utils.cpp_extension.load`` (a message is
printed; ~20 s on an idle 2-core machine) into a directory keyed by a hash
of the sources and the torch version, under ``RESNEXT_KERNELS_EMU_BUILD_DIR``, else
``TORCH_EXTENSIONS_DIR``, else ``~/.cache/resnext_kernels``. Its op is
``torch.ops.resnext_kernels.fused_block_cuda_emulated`` (CPU tensors); test
helpers live in ``torch.ops.resnext_kernels_emu``.

Both ops take the block's arguments plus ``allow_tf32`` (fp32 inputs on TF32
tensor cores when True, fp32 FMA when False; the backends pass
``torch.backends.cudnn.allow_tf32`` like cuDNN convolutions do) and
``smem_limit`` (bytes the tile plan may use; 0 = the device's opt-in
maximum, H100's 232448 for the emulation).
"""

import hashlib
import os
import shutil
import sys
import threading

import torch

from . import _extension

_NS = "resnext_kernels"
_EMU_NAME = "resnext_kernels_emu"
_EMU_SOURCES = ("emulation/fused_block_emu.cpp", "emulation/emu_selftest.cpp")

_emu_lock = threading.Lock()
_emu_loaded = False
_emu_error = None


def _fake_fused_block(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, allow_tf32, smem_limit=0):
    n, _, h, w = x.shape
    shape = (n, w3.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1)
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


def _op_exists(name):
    return hasattr(getattr(torch.ops, _NS), name)


def _register_fake(name):
    torch.library.register_fake(f"{_NS}::{name}")(_fake_fused_block)


if _extension.extension() is not None and _op_exists("fused_block_cuda"):
    _register_fake("fused_block_cuda")


def bottleneck_inference_cuda(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups):
    """The `cuda` backend: one fused kernel launch on x's current stream."""
    return torch.ops.resnext_kernels.fused_block_cuda(
        x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, torch.backends.cudnn.allow_tf32, 0
    )


def csrc_dir():
    """The kernel sources: the source tree's csrc/, else the installed copy."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "_csrc")):
        if all(os.path.exists(os.path.join(cand, s)) for s in _EMU_SOURCES):
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


def _emu_build_dir(csrc):
    base = os.environ.get("RESNEXT_KERNELS_EMU_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    if not base:
        base = os.path.join(os.path.expanduser("~"), ".cache", "resnext_kernels")
    return os.path.join(base, f"emu-{_sources_digest(csrc)}")


def emulated_unavailable_reason():
    """None when the emulation build can be used (or built), else why not."""
    if _emu_error is not None:
        return _emu_error
    if _emu_loaded:
        return None
    if not sys.platform.startswith("linux"):
        return f"the CUDA emulator needs Linux (ucontext fibers), got {sys.platform}"
    if csrc_dir() is None:
        return "the kernel sources (csrc/ or resnext_kernels/_csrc) were not found"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler {cxx!r} on PATH to build the emulation"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension.load needs it)"
    return None


def load_emulation():
    """Build (first use) and load the emulation library; raise on failure."""
    global _emu_loaded, _emu_error
    with _emu_lock:
        if _emu_loaded:
            return
        if _emu_error is not None:
            raise RuntimeError(_emu_error)
        reason = emulated_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        from torch.utils import cpp_extension

        csrc = csrc_dir()
        build_dir = _emu_build_dir(csrc)
        os.makedirs(build_dir, exist_ok=True)
        if not os.path.exists(os.path.join(build_dir, f"{_EMU_NAME}.so")):
            print(
                f"[resnext_kernels] building the CPU emulation of the CUDA kernels in {build_dir} "
                "(first use only, under a minute)",
                file=sys.stderr,
                flush=True,
            )
        try:
            cpp_extension.load(
                name=_EMU_NAME,
                sources=[os.path.join(csrc, s) for s in _EMU_SOURCES],
                extra_include_paths=[csrc],
                extra_cflags=["-O2"],
                build_directory=build_dir,
                is_python_module=False,
                verbose=False,
            )
        except Exception as exc:
            _emu_error = f"building the CUDA emulation failed: {type(exc).__name__}: {exc}"
            raise RuntimeError(_emu_error) from exc
        _register_fake("fused_block_cuda_emulated")
        _emu_loaded = True


def bottleneck_inference_cuda_emulated(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups):
    """The `cuda_emulated` backend: the CUDA kernel run by the CPU emulator."""
    load_emulation()
    return torch.ops.resnext_kernels.fused_block_cuda_emulated(
        x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, torch.backends.cudnn.allow_tf32, 0
    )
