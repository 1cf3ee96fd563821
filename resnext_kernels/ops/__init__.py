"""The op layer: the ``resnext_kernels`` torch.library ops, one module per op
family (schema, fake kernel, autograd, input checks).

inference   resnext_kernels::bottleneck_inference, the block with BN folded
"""

from .inference import bottleneck_inference

__all__ = ["bottleneck_inference"]
