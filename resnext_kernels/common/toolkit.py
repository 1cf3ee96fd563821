"""Finding the CUDA toolkit and importing torch's extension builder quietly.

setup.py loads this file by path (it cannot import the package while
building it), so it imports nothing but the standard library at module level.
"""

import logging
import os
import shutil


def find_cuda_home():
    """The CUDA toolkit root holding bin/nvcc, or None.

    CUDA_HOME (or CUDA_PATH) when set and holding nvcc; else /usr/local/cuda
    when it holds nvcc; else the toolkit of the nvcc on PATH, symlinks
    resolved (torch's own guess takes the symlink's directory, e.g.
    /usr/local for /usr/local/bin/nvcc, which has no CUDA headers).
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if os.path.exists(os.path.join(env, "bin", "nvcc")) else None
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def import_cpp_extension():
    """torch.utils.cpp_extension, imported with CUDA_HOME pointing at the real
    toolkit (when one is found and CUDA_HOME is unset) and without its import
    time warning "No CUDA runtime is found, using CUDA_HOME=..." on machines
    without a GPU (it says nothing about a CPU build)."""
    cuda_home = find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension
