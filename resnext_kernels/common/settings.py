"""Dtypes, environment switches and device limits: each written once here."""

import os

import torch

# Dtypes the fused kernels (triton, cuda) compute in; the reference backend
# also takes float64 (gradcheck, the ground truth).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)

# cudaDevAttrMaxSharedMemoryPerBlockOptin of H100 and H200 (227 KiB): the
# shared-memory budget the Triton config prunes and the CPU emulation of the
# CUDA kernel plan for, and the default of `cuda_plans --list` without a GPU.
H100_SMEM_OPTIN = 232448

AUTOTUNE_ENV = "RESNEXT_KERNELS_AUTOTUNE"


def triton_interpreter_enabled():
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1,
    which must be set before triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled():
    """Whether the GPU backends tune their tile configuration by timing it.

    Read at every call from the environment variable RESNEXT_KERNELS_AUTOTUNE:
    "1" (the default) lets the first call of each shape time a few candidate
    configurations on the GPU and keep the fastest (triton: its autotuner;
    cuda: the top-ranked tile plans; auto: cuda against triton); "0" takes the
    heuristic's first choice with no timing (deterministic, no first-call
    cost; the GPU check's tests use it). The interpreter and the emulation
    never tune.
    """
    value = os.environ.get(AUTOTUNE_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be '0' or '1', got {value!r}")
    return value == "1"


CACHE_DIR_ENV = "RESNEXT_KERNELS_CACHE_DIR"
CACHE_DIR_OFF = "off"


def tuning_cache_dir():
    """The directory of the on-disk tuning store (common/tuning_store.py), or
    None when the disk part is off.

    Read at every use from the environment variable RESNEXT_KERNELS_CACHE_DIR:
    a directory, or "off" (the choices then live in the process only, as
    before the store existed). Unset or empty: the user's cache directory,
    $XDG_CACHE_HOME/resnext_kernels/tuning (~/.cache when XDG_CACHE_HOME is
    unset), beside the CUDA emulation's build directory.
    """
    value = os.environ.get(CACHE_DIR_ENV, "")
    if value == CACHE_DIR_OFF:
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnext_kernels", "tuning")


TUNE_SYNC_ENV = "RESNEXT_KERNELS_TUNE_SYNC"


def tune_sync_enabled():
    """Whether, with an initialized torch.distributed process group of more
    than one process, a tuning miss is resolved once for all ranks (rank 0
    looks up or times, and broadcasts: common/tuning.py).

    Read on every miss from RESNEXT_KERNELS_TUNE_SYNC: "1" (the default): the
    ranks run the same kernels, and every rank must meet the same untuned
    problems of its training steps (grad mode on) and tune() runs in the same
    order, as DDP replicas do (misses under no_grad never synchronize:
    tuning.py); "0": each rank chooses for itself.
    """
    value = os.environ.get(TUNE_SYNC_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{TUNE_SYNC_ENV} must be '0' or '1', got {value!r}")
    return value == "1"
