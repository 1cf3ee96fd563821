"""Build script for resnext_kernels._C.

The extension always contains the C++ op registrations (csrc/*.cpp). The CUDA
kernels (csrc/*.cu) are added when torch is a CUDA build and nvcc is found.

Environment switches:
  RESNEXT_KERNELS_SKIP_CUDA=1   build the C++ part only, even if nvcc exists.
  TORCH_CUDA_ARCH_LIST          archs to compile for (torch's own switch).
                                Unset and no GPU visible: "8.0;9.0" (sm_80 +
                                sm_90; the kernels need bf16/tf32 tensor cores,
                                sm_80+). sm_80 adds only seconds: the
                                device code compiles in ~5 s per arch.
  CUDA_HOME                     CUDA toolkit root. Unset: /usr/local/cuda when
                                it holds bin/nvcc, else the toolkit of the nvcc
                                on PATH (resnext_kernels/common/toolkit.py).
  MAX_JOBS                      parallel compile jobs (torch's own switch).
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    # pip hides build output unless -v; stderr lines still end up in the log.
    print(f"[resnext_kernels build] {msg}", file=sys.stderr, flush=True)


def _toolkit():
    # The package cannot be imported while it is being built; its toolkit
    # finder is a standalone file (stdlib imports only), loaded by path.
    path = os.path.join(ROOT, "resnext_kernels", "common", "toolkit.py")
    spec = importlib.util.spec_from_file_location("_resnext_kernels_toolkit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_build_decision(torch):
    """Return (cuda_home or None, reason string)."""
    if os.environ.get("RESNEXT_KERNELS_SKIP_CUDA", "0") not in ("", "0"):
        return None, "RESNEXT_KERNELS_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    cuda_home = _toolkit().find_cuda_home()
    if cuda_home is None:
        return None, "no nvcc found (set CUDA_HOME to a CUDA toolkit)"
    return cuda_home, f"nvcc found in {cuda_home}, torch CUDA {torch.version.cuda}"


def _extra_cuda_include_dirs():
    # ATen/cuda/CUDAContext.h includes cusparse.h, which the CUDA 13 toolkit
    # here lacks; the pip wheel nvidia-* packages carry it.
    dirs = []
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cusparse/include"):
            d = os.path.join(site, sub)
            if os.path.exists(os.path.join(d, "cusparse.h")):
                dirs.append(d)
    return dirs


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cuda_home, reason = _cuda_build_decision(torch)
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need
    # (C++17 for torch 2.11, C++20 for torch 2.14).
    cxx_flags = ["-O3"]
    include_dirs = [os.path.join(ROOT, "csrc")]

    if cuda_home is None:
        _say(f"building the C++ part only: {reason}")
        return [
            cpp_extension.CppExtension(
                "resnext_kernels._C",
                cpp_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
            )
        ], cpp_extension

    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # torch caches its guess at import
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            _say("TORCH_CUDA_ARCH_LIST unset: building for the visible GPU(s)")
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
            _say("TORCH_CUDA_ARCH_LIST unset and no GPU visible: building for sm_80 and sm_90")
    _say(f"building C++ + CUDA ({reason}); archs: {os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    nvcc_flags = [
        "-O3",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "-Xptxas=-v" if os.environ.get("RESNEXT_KERNELS_PTXAS_VERBOSE") else "-Xptxas=-O3",
    ]
    return [
        cpp_extension.CUDAExtension(
            "resnext_kernels._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs + _extra_cuda_include_dirs(),
            define_macros=[("RESNEXT_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    ], cpp_extension


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package as resnext_kernels/_csrc.

    The CPU emulation build of the CUDA kernels (backend "cuda_emulated")
    compiles the same .cu sources on first use, so an installed (non-editable)
    package needs them.
    """

    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "resnext_kernels", "_csrc")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), dst)


ext_modules, cpp_extension = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass={
        "build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True),
        "build_py": BuildPyWithSources,
    },
)
