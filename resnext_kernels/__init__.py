"""resnext_kernels: fused Triton and CUDA kernels for the ResNeXt bottleneck block.

Public API:
  FusedResNeXtBlock      drop-in for torchvision's / timm's Bottleneck
  convert(model, backend) swap every convertible Bottleneck of a model in place
  unconvert(model)       back to torchvision's Bottleneck (plain torchvision modules)
  models                 builders: resnext29_8x64d / _16x64d (CIFAR), resnext50_32x4d, resnext101_*
  available_backends()   which backends can run here, and why not
  bottleneck_inference   the folded inference op (functional form)
  tune(model, x)         make every timed choice of a model's blocks now (fills the tuning store)

Importing never fails because the compiled extension is missing or stale; the
reason is reported by available_backends() and ``python -m resnext_kernels info``.

The package is layered (README, "Where things are"): tooling (bench/, the
command line) > public API (block, convert, forms) > ops > backends > common.
"""

from . import forms
from .backends.registry import BACKENDS, BackendUnavailableError, available_backends
from .block import FusedResNeXtBlock
from .common.extension import extension_error
from . import models
from .convert import ConversionWarning, convert, unconvert
from .unfused import UnfusedForwardWarning
from .ops import bottleneck_inference
from .warmup import tune

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ConversionWarning",
    "FusedResNeXtBlock",
    "UnfusedForwardWarning",
    "available_backends",
    "bottleneck_inference",
    "convert",
    "extension_error",
    "forms",
    "models",
    "tune",
    "unconvert",
]
