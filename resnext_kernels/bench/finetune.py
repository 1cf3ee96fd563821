"""What the fine-tuning benchmark times (benchmarks/test_finetune_bench.py):
one step (forward, then backward of <out, grad>) of a block whose norms are
torchvision's FrozenBatchNorm2d, as detection backbones have them: the
inference op's forward and its fused backward on triton, against eager
torchvision. The step itself is bench.training.build_training_step's (bf16
autocast, channels_last; a FusedResNeXtBlock with frozen norms runs the
inference op in train mode too).
"""

import torch
from torch import nn


def freeze_batchnorm(module):
    """Replace every nn.BatchNorm2d in `module` by a torchvision
    FrozenBatchNorm2d with its statistics and affine parameters (as
    torchvision's detection builders put in pretrained backbones), in place;
    returns `module`."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                with torch.no_grad():
                    for buf in ("weight", "bias", "running_mean", "running_var"):
                        getattr(frozen, buf).copy_(getattr(child, buf))
                setattr(parent, name, frozen)
    return module


__all__ = ["freeze_batchnorm"]
