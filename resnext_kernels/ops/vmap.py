"""torch.vmap rules of the ``resnext_kernels`` ops (torch.library.register_vmap).

bottleneck_inference: when only x is batched, the vmapped dimension folds
into N (one call of the op on [B*N, C, H, W], split again afterwards): the
block is per-image, so this is exact. When any weight or bias is batched (a
model ensemble: torch.func.stack_module_state + functional_call), the op
runs once per ensemble member on that member's slices, and the outputs are
stacked. No backend has a kernel for a batch of weight sets.

bottleneck_training and bottleneck_training_backward always run once per
vmapped slice: batch statistics are taken over each slice's own N, as
torch's batch norm does under vmap.

A vmapped call's output is in the op's usual layout per slice; the stacked
result follows torch.stack.
"""

import torch

from .inference import _NS

# The tensor arguments of the inference op whose batching makes it loop (w1 .. bd).
_INFERENCE_WEIGHTS = slice(1, 9)


def _sliced(args, in_dims, i):
    # Non-tensor arguments (ints, the training op's float/int lists) come
    # with an in_dim that is not None too (a list's: a list of Nones).
    return [a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a for a, d in zip(args, in_dims)]


def _per_slice(op, batch_size, in_dims, args):
    """op once per vmapped slice, the outputs stacked along dim 0."""
    outs = [op(*_sliced(args, in_dims, i)) for i in range(batch_size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    stacked = tuple(torch.stack(parts) for parts in zip(*outs))
    return stacked, (0,) * len(stacked)


def _inference_rule(info, in_dims, *args):
    op = torch.ops.resnext_kernels.bottleneck_inference.default
    if any(d is not None for d in in_dims[_INFERENCE_WEIGHTS]):
        return _per_slice(op, info.batch_size, in_dims, args)
    x = args[0].movedim(in_dims[0], 0)
    y = op(x.flatten(0, 1), *args[1:])
    return y.unflatten(0, (x.shape[0], x.shape[1])), 0


def _training_rule(info, in_dims, *args):
    return _per_slice(torch.ops.resnext_kernels.bottleneck_training.default, info.batch_size, in_dims, args)


def _training_backward_rule(info, in_dims, *args):
    return _per_slice(torch.ops.resnext_kernels.bottleneck_training_backward.default, info.batch_size, in_dims,
                      args)


torch.library.register_vmap(f"{_NS}::bottleneck_inference", _inference_rule)
torch.library.register_vmap(f"{_NS}::bottleneck_training", _training_rule)
torch.library.register_vmap(f"{_NS}::bottleneck_training_backward", _training_backward_rule)
