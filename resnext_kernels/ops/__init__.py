"""The op layer: the ``resnext_kernels`` torch.library ops, one module per op
family (schema, fake kernel, autograd, input checks).

inference   resnext_kernels::bottleneck_inference, the block with BN folded
inference_backward  resnext_kernels::bottleneck_inference_backward, its fused
            backward (fine-tuning with frozen BatchNorm)
training    resnext_kernels::bottleneck_training (+ its backward op), the block
            with BatchNorm using batch statistics
vmap        the torch.vmap rules of those ops (imported for its registrations)
"""

from .inference import bottleneck_inference
from .training import bottleneck_training
from . import vmap  # noqa: F401  (registers the ops' vmap rules)

__all__ = ["bottleneck_inference", "bottleneck_training"]
