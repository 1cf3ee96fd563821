"""BatchNorm folding with differentiable torch ops.

For inference BN(conv(x, w)) == conv(x, w') + b' with, per output channel,
    scale = gamma / sqrt(running_var + eps)
    w'    = w * scale
    b'    = beta - running_mean * scale
Because these are ordinary torch ops, autograd carries gradients from w', b'
back to the conv weight and to gamma/beta (and running stats are buffers).
The fold is computed in float32 (or float64 if the parameters are float64)
and the result cast to the requested dtype, so half-precision models do not
lose accuracy in the fold itself.
"""

import torch
from torch import nn


def is_frozen_batchnorm(module):
    """torchvision's or timm's FrozenBatchNorm2d (fixed statistics, no updates)."""
    return type(module).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(module, n) for n in ("weight", "bias", "running_mean", "running_var", "eps")
    )


def is_supported_norm(module):
    """Norm layers the fused block accepts: nn.BatchNorm2d, nn.SyncBatchNorm
    (what convert_sync_batchnorm makes of it; exact types) or FrozenBatchNorm2d."""
    return type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm) or is_frozen_batchnorm(module)


def uses_batch_statistics(bn):
    """True when `bn` normalizes with the batch's own statistics in its current mode."""
    if is_frozen_batchnorm(bn):
        return False
    return bn.training or bn.running_mean is None


def fold_conv_bn(conv_weight, bn, dtype):
    """(w', b') of conv(bias=False) followed by `bn` in inference mode, cast to `dtype`."""
    compute = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
    var = bn.running_var.to(compute)
    mean = bn.running_mean.to(compute)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(compute)
    bias = -mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(compute)
    weight = conv_weight.to(compute) * scale.reshape(-1, 1, 1, 1)
    return weight.to(dtype), bias.to(dtype)
