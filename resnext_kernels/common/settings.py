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
