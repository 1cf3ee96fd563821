"""The training op's gradients while autograd records a graph of them
(``torch.autograd.grad(..., create_graph=True)``, ``backward(create_graph=True)``:
gradient penalties such as R1 or WGAN-GP, input-gradient regularisers).

The backend's backward kernels (and the op ``bottleneck_training_backward``)
compute numbers, not a graph. So while a graph is being recorded, the
training op's autograd formula gets its gradients from the differentiable
reference composite instead: the block's forward recomputed from the saved
x, conv weights and BN affine parameters with ATen ops
(backends/reference.py, ``bottleneck_training_reference``: conv2d,
native_batch_norm in its training form, relu), differentiated by autograd
with create_graph=True. Its gradients are eager's, and so are their
derivatives of every order (the batch statistics' dependence on x
included, which a formula on the saved statistics would lose). The price:
one more forward of the block, in ATen, per create_graph backward.

A norm that normalized with its running statistics (an eval-mode norm in a
training block) is recomputed with the saved mean and invstd (its running
variance rebuilt as invstd**-2 - eps, in float64). Synchronized norms
(SyncBatchNorm over a process group) raise, as nn.SyncBatchNorm's own
backward is not differentiable either.
"""

import torch

from ..backends.reference import bottleneck_training_reference
from ..common.batch_stats import INVSTD, MEAN, BatchNormArgs, norm_columns


def training_gradients_with_graph(grad_out, inputs, needs_input_grad, bn_stats, batch_stats, eps, conv, group_name):
    """The training op's input gradients (one per op input, None where not
    needed), differentiable (module docstring). inputs: the op's tensor
    inputs (x, w1, w2, w3, wd, then weight, bias, running_mean, running_var
    per norm) as saved; bn_stats: the forward's saved mean and invstd."""
    if group_name is not None:
        raise RuntimeError("double backward (create_graph=True) through a block whose BatchNorms are synchronized "
                           "over a process group is not supported (nor is it by nn.SyncBatchNorm)")
    x, w1, w2, w3, wd = inputs[:5]
    cols = norm_columns(w1.shape[0], w3.shape[0], wd is not None)
    norms = []
    for i, col in enumerate(cols):
        weight, bias = inputs[5 + 4 * i], inputs[6 + 4 * i]
        if batch_stats[i]:
            norms.append(BatchNormArgs(weight, bias, None, None, True, 0.0, eps[i]))
        else:
            mean, invstd = bn_stats[MEAN, col], bn_stats[INVSTD, col]
            var = (invstd.double() ** -2 - eps[i]).to(mean.dtype)
            norms.append(BatchNormArgs(weight, bias, mean, var, False, 0.0, eps[i]))
    with torch.autocast(x.device.type, enabled=False):
        out = bottleneck_training_reference(x, w1, w2, w3, wd, norms, *conv)[0]
    wanted = [k for k, t in enumerate(inputs) if needs_input_grad[k] and t is not None]
    grads = torch.autograd.grad(out, [inputs[k] for k in wanted], grad_out, create_graph=True, allow_unused=True)
    result = [None] * len(inputs)
    for k, g in zip(wanted, grads):
        result[k] = torch.zeros_like(inputs[k]) if g is None else g
    return result


__all__ = ["training_gradients_with_graph"]
