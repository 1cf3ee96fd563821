"""The block computed by its submodules, one by one, exactly as torchvision's
``Bottleneck.forward`` does (torchvision/models/resnet.py, 0.26-0.29).

FusedResNeXtBlock runs this instead of its fused op only where a fused
kernel cannot serve what the user asked for (a tool or hook that must see
the inner modules run). It calls the submodules themselves, so their hooks,
parametrizations and pruning masks apply, and its numbers are eager's.
Every caller says why it is here; this module only computes.
"""

import torch


class UnfusedForwardWarning(UserWarning):
    """A FusedResNeXtBlock runs, or a tool records it, as its unfused
    submodules (torchvision's Bottleneck.forward): the fused kernels do not
    run there. Raised by tracing.py (TorchScript, ONNX export) and
    inner_hooks.py (hooks on inner modules)."""


def bottleneck_forward(block, x: torch.Tensor) -> torch.Tensor:
    """torchvision's Bottleneck.forward over `block`'s submodules (conv1 bn1
    conv2 bn2 conv3 bn3 relu downsample), including its in-place ReLU and
    in-place residual add."""
    identity = x
    out = block.conv1(x)
    out = block.bn1(out)
    out = block.relu(out)
    out = block.conv2(out)
    out = block.bn2(out)
    out = block.relu(out)
    out = block.conv3(out)
    out = block.bn3(out)
    if block.downsample is not None:
        identity = block.downsample(x)
    out += identity
    out = block.relu(out)
    return out
