"""The `reference` backend: the folded inference block from ATen ops.

Works on any device and in any floating dtype (float64 included, which
gradcheck needs). It is also the ground truth the fused kernels are tested
against, computed in float64 on CPU.
"""

import torch.nn.functional as F

from ..common.layout import output_memory_format


def bottleneck_intermediates(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups):
    """Forward of the folded block, returning (t1, t2, y).

    t1 = relu(conv1x1(x, w1) + b1)
    t2 = relu(conv3x3(t1, w2, stride, padding=dilation, dilation, groups) + b2)
    y  = relu(conv1x1(t2, w3) + b3 + shortcut),
    shortcut = x, or conv1x1(x, wd, stride) + bd when wd is given.
    """
    t1 = F.relu(F.conv2d(x, w1, b1))
    t2 = F.relu(F.conv2d(t1, w2, b2, stride=stride, padding=dilation, dilation=dilation, groups=groups))
    shortcut = x if wd is None else F.conv2d(x, wd, bd, stride=stride)
    y = F.relu(F.conv2d(t2, w3, b3) + shortcut)
    return t1, t2, y


def bottleneck_inference_reference(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups):
    """y for the folded block (see `bottleneck_intermediates`), in x's memory
    format (common.layout.output_memory_format; ATen's convs already give it,
    unless a channels_last 3x3 weight makes them switch an NCHW x's output
    to channels_last)."""
    y = bottleneck_intermediates(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups)[2]
    return y.contiguous(memory_format=output_memory_format(x))
