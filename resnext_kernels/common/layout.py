"""The block's output memory format: one rule for every backend and the
op's fake kernel (torch.compile must see the strides the kernels write)."""

import torch


def output_memory_format(x):
    """The memory format of the block's output for input `x`, as ATen's conv
    gives it for NCHW-ordered weights: torch.channels_last when x is
    channels_last (and not also NCHW-contiguous, as when C == 1 or H == W ==
    1), else torch.contiguous_format. Inputs in neither format (e.g. a
    slice) get an NCHW-contiguous output; ATen would follow their stride
    order."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
