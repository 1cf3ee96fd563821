"""Swap torchvision/timm Bottleneck blocks of a model for FusedResNeXtBlock
(convert), and back to torchvision's Bottleneck (unconvert)."""

import warnings

from .backends import registry
from .block import (
    FusedResNeXtBlock,
    _is_timm_bottleneck,
    _is_torchvision_bottleneck,
    unsupported_reason,
)


class ConversionWarning(UserWarning):
    """Some Bottleneck blocks were left unconverted (see the message)."""


def convert(model, backend="auto"):
    """Replace every convertible torchvision/timm ``Bottleneck`` in `model`, in place.

    Blocks that cannot be fused (timm blocks with attention, anti-aliasing,
    drop-block or drop-path, non-ReLU activations, reduce_first != 1, or an
    unusual downsample) are left alone and reported with one
    ``ConversionWarning`` naming each block and the reason. The skipped blocks
    are also recorded as ``model.resnext_kernels_skipped`` ({name: reason}).
    A model in which nothing was converted always gets a ConversionWarning:
    the skipped blocks and why, or that it has no Bottleneck at all.
    Returns `model`.
    """
    registry.check_backend_name(backend)
    if _is_torchvision_bottleneck(model) or _is_timm_bottleneck(model):
        raise ValueError("model is itself a Bottleneck; use FusedResNeXtBlock.from_bottleneck(model)")
    skipped = {}
    converted = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not (_is_torchvision_bottleneck(child) or _is_timm_bottleneck(child)):
                continue
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            reason = unsupported_reason(child)
            if reason is not None:
                skipped[full_name] = reason
                continue
            setattr(parent, child_name, FusedResNeXtBlock.from_bottleneck(child, backend=backend))
            converted += 1
    if skipped:
        lines = "\n".join(f"  {name}: {reason}" for name, reason in skipped.items())
        nothing = "converted nothing: " if converted == 0 else ""
        warnings.warn(f"resnext_kernels.convert {nothing}left {len(skipped)} Bottleneck block(s) unconverted "
                      f"({converted} converted):\n{lines}", ConversionWarning, stacklevel=2)
    elif converted == 0:
        warnings.warn(f"resnext_kernels.convert converted nothing: {type(model).__name__} contains no torchvision or "
                      "timm Bottleneck block", ConversionWarning, stacklevel=2)
    model.resnext_kernels_skipped = skipped
    return model


def unconvert(model):
    """Replace every FusedResNeXtBlock in `model` by torchvision's Bottleneck, in place.

    The blocks keep their parameters and buffers (copied, as convert copies
    them) and the module tree its state_dict keys, so the model runs, trains
    and saves with torchvision alone. Returns `model`; a FusedResNeXtBlock
    itself has ``to_bottleneck()``.
    """
    if isinstance(model, FusedResNeXtBlock):
        raise ValueError("model is itself a FusedResNeXtBlock; use model.to_bottleneck()")
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, FusedResNeXtBlock):
                setattr(parent, child_name, child.to_bottleneck())
    return model
