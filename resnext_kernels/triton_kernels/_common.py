"""Helpers shared by the kernel launchers (no kernels here)."""

import torch

from .. import backends


def interpreting():
    """True when kernels run in the Triton interpreter (TRITON_INTERPRET=1).

    The interpreter runs every program sequentially in numpy, so the launchers
    use one fixed, large-tile config there instead of autotuning.
    """
    return backends.triton_interpreter_enabled()


def dot_precision(dtype):
    """`tl.dot` input_precision, read at call time.

    fp32 follows torch.backends.cudnn.allow_tf32 like PyTorch's convolutions:
    "tf32" while it is True, full fp32 ("ieee") when False. fp16/bf16 dots are
    exact products with fp32 accumulation whatever the flag says; they get
    "tf32" (Triton's default) so that one compiled variant serves both flag
    values. The interpreter ignores the setting (numpy matmul in fp32).
    """
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def cdiv(a, b):
    return -(-a // b)
