"""``resnext_kernels::bottleneck_inference_backward``: the fused backward of
the inference op (ops/inference.py), an op of its own so that torch.compile
traces it (fake kernel) rather than the Triton launches inside it.

The inference op's autograd (ops/inference.py) calls it when
registry.inference_backward_backend says the forward's backend has fused
backward kernels (triton, and cuda's forward, on CUDA); elsewhere it keeps
its ATen backward. Gradients: (dx, dw1, db1, dw2, db2, dw3, db3, dwd) of the
folded block, each an empty tensor unless `needs` asks for it (frozen
parameters get no gradient and their kernels do not run); db3 is also bd's
gradient (both are the sum of the final ReLU's gradient). The fold's torch
ops carry them on to the conv weights and the BN affine parameters.
"""

import torch
from torch import Tensor

from ..backends import registry
from ..common.sizes import conv_output_size

_NS = "resnext_kernels"
N_GRADS = 8  # x, w1, b1, w2, b2, w3, b3 (= bd), wd


def _check(grad_y, x, w3, y, stride, needs, backend):
    if backend not in registry.INFERENCE_BACKWARD_BACKENDS:
        raise ValueError(f"backend must be one of {registry.INFERENCE_BACKWARD_BACKENDS}, got {backend!r}")
    if len(needs) != N_GRADS:
        raise ValueError(f"needs must hold {N_GRADS} bools (x, w1, b1, w2, b2, w3, b3, wd), got {len(needs)}")
    n, _, h, w = x.shape
    shape = (n, w3.shape[0], conv_output_size(h, stride), conv_output_size(w, stride))
    for name, t in (("grad_y", grad_y), ("y", y)):
        if tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must be a {x.dtype} tensor of shape {shape} on {x.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")


@torch.library.custom_op(f"{_NS}::bottleneck_inference_backward", mutates_args=())
def _inference_backward_op(
    grad_y: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
    wd: Tensor | None, bd: Tensor | None, y: Tensor, stride: int, dilation: int, groups: int, needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check(grad_y, x, w3, y, stride, needs, backend)
    grads = registry.inference_backward_kernel(backend)(grad_y, x, w1, b1, w2, b2, w3, b3, wd, bd, y, stride,
                                                        dilation, groups, list(needs))
    # dx is channels_last; the parameter gradients contiguous (the grouped
    # wgrad's unpacked result is a permuted view).
    return tuple(x.new_empty(0) if g is None else g if i == 0 else g.contiguous() for i, g in enumerate(grads))


@_inference_backward_op.register_fake
def _(grad_y, x, w1, b1, w2, b2, w3, b3, wd, bd, y, stride, dilation, groups, needs, backend):
    _check(grad_y, x, w3, y, stride, needs, backend)
    grads = [x.new_empty(x.shape).contiguous(memory_format=torch.channels_last)]  # dx is channels_last
    grads += [t.new_empty(t.shape) for t in (w1, b1, w2, b2, w3, b3, wd if wd is not None else w3)]
    return tuple(g if need else x.new_empty(0) for g, need in zip(grads, needs))


def bottleneck_inference_backward(grad_y, x, w1, b1, w2, b2, w3, b3, wd, bd, y, stride, dilation, groups, needs,
                                  backend):
    """The op's gradients as a tuple of 8, None where `needs` is False."""
    grads = _inference_backward_op(grad_y, x, w1, b1, w2, b2, w3, b3, wd, bd, y, stride, dilation, groups,
                                   [bool(v) for v in needs], backend)
    return tuple(g if need else None for g, need in zip(grads, needs))


__all__ = ["N_GRADS", "bottleneck_inference_backward"]
