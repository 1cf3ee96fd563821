"""The `triton` backward of the inference op (ops/inference.py): the folded
block's gradients as Triton launches, for fine-tuning with frozen BatchNorm
(FrozenBatchNorm2d, or BatchNorm2d in eval mode) (docs/training.md,
"Fine-tuning with frozen BatchNorm").

The op's forward saved x, the folded weights and biases and y (nothing
else: t1 and t2 are recomputed here, see docs/training.md for why). With
BatchNorm folded into the convs, each norm is a fixed per-channel affine
and its bias is the conv's; so the training kernels run with "identity
norms" (mean 0, scale 1, beta 0 on the post-ReLU t1, t2: relu(bn(t)) = t,
and the ReLU mask threshold_backward(g, t) is the training kernels' mask),
and BN-backward coefficients (a, b, c) = (1, 0, 0), which make each
prologue's dy = a*dz + b*(y - mean) + c the incoming gradient dz itself
(the "y" operand is dz again, with b = 0: see the NaN note below).

Launches (each skipped when no requested gradient needs it):
    t1 = relu(x @ w1 + b1)                     conv1x1_bias_relu (K1, recompute, packed channels)
    t2 = relu(gconv(t1) + b2)                  grouped_conv_bias_relu (K2a, recompute)
    dz3, sums3 = threshold_backward(g, y)      bn_add_relu_backward    (row 0: b3's and bd's gradient)
    dz2, sums2 = conv3 dgrad, ReLU2 mask       conv1x1_dgrad MASK_STATS (row 0: b2's gradient)
    dw3 = conv3 wgrad (t2);  dwd = projection wgrad (x at stride)
    dz1, sums1 = gconv dgrad, ReLU1 mask       grouped_conv_dgrad       (row 0: b1's gradient)
    dw2 = gconv wgrad (t1)
    dx = conv1 dgrad + shortcut (dz3, or dz3 @ wd at the stride pixels)
    dw1 = conv1 wgrad (x)
plus the fixed-order fp64 sums of the bias rows (bn_statistics.sum_rows).

Packed vs real channels: K1/K2a write t1/t2 in the packed channels of
packing.py; the training kernels read real channels. Without padding
(groups * d_p == width_p: d a power of two and the width a multiple of 16)
the buffers are the real tensors; otherwise the real columns are gathered
once (an index copy of t1 and t2; small blocks and odd d only).

NaN/inf: the ReLU masks are threshold_backward's (zero where t <= 0, a NaN
t passes the gradient). The prologues' dy = 1*dz + 0*(dz - 0) leaves the
b = 0 term out (_bn.bn_grad_input), so an infinite incoming gradient stays
+-inf as in eager's conv backward rather than becoming 0 * inf = NaN.
"""

import contextlib

import torch

from ...common.batch_stats import INVSTD, MEAN, SCALE, STATS_ROWS
from ...common.sizes import conv_output_size
from . import conv1x1_bias_relu as _k1
from . import grouped_conv_bias_relu as _k2a
from ._common import nhwc_view
from .bn_add_relu import bn_add_relu_backward
from .bn_statistics import sum_rows
from .conv1x1_dgrad import conv1x1_dgrad
from .conv1x1_wgrad import conv1x1_wgrad
from .grouped_conv_dgrad import grouped_conv_dgrad
from .grouped_conv_wgrad import grouped_conv_wgrad
from .packing import cached_pack_weights

CL = torch.channels_last


def _empty(n, c, h, w, like):
    return torch.empty((n, c, h, w), dtype=like.dtype, device=like.device, memory_format=CL)


def _real_channels(buf, tiling, n, h, w):
    """[N, width, H, W] channels_last real-channel tensor of a packed
    [n*h*w, width_p] activation buffer: a view without padding, else a gather."""
    if not tiling.has_padding:
        return nhwc_view(buf, n, h, w)
    return nhwc_view(buf[:, tiling.packed_index(buf.device)].contiguous(), n, h, w)


def _identity_norm(c, device):
    """(stats [STATS_ROWS, c], coef [3, c]) of a norm that changes nothing:
    mean 0, invstd 1, scale 1, beta 0; backward coefficients (1, 0, 0)."""
    stats = torch.zeros(STATS_ROWS, c, device=device)
    stats[INVSTD] = 1.0
    stats[SCALE] = 1.0
    coef = torch.zeros(3, c, device=device)
    coef[0] = 1.0
    return stats, coef


def _bias_grad(part, dtype):
    """Row 0 (sum dz) of [T, J, C] fp64 partial sums, summed in a fixed order, in dtype."""
    sums = torch.empty(part.shape[1], part.shape[2], device=part.device, dtype=torch.float64)
    return sum_rows(part, sums)[0].to(dtype)


def bottleneck_inference_backward_triton(grad_y, x, w1, b1, w2, b2, w3, b3, wd, bd, y, stride, dilation, groups,
                                         needs):
    """Gradients of the folded inference block.

    grad_y, y: [N, Cout, Ho, Wo], any strides; x [N, Cin, H, W] (NCHW is
    converted once); weights and biases as the op's (one dtype, x's).
    needs: 8 bools, which of (x, w1, b1, w2, b2, w3, b3 (or bd), wd) to
    compute. Returns those 8 gradients, None where not needed: dx
    channels_last, weight gradients contiguous in the weights' shapes
    (accumulated in fp32, rounded once), bias gradients summed in fp64.
    """
    need_x, need_w1, need_b1, need_w2, need_b2, need_w3, need_b3, need_wd = needs
    need_dz1 = need_x or need_w1 or need_b1
    need_dz2 = need_dz1 or need_w2 or need_b2
    x = x.contiguous(memory_format=CL)
    n, _, h, w = x.shape
    width, cout = w1.shape[0], w3.shape[0]
    ho, wo = conv_output_size(h, stride), conv_output_size(w, stride)
    projection = wd is not None
    dev, dtype = x.device, x.dtype
    dx = dw1 = db1 = dw2 = db2 = dw3 = db3 = dwd = None
    with torch.cuda.device(dev) if x.is_cuda else contextlib.nullcontext():
        tiling, packed = cached_pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups)  # the forward's, cached
        stats_w, coef_w = _identity_norm(width, dev)
        stats_c, coef_c = _identity_norm(cout, dev)
        zeros_w, zeros_c = stats_w[MEAN], stats_c[MEAN]

        # t1, t2 as the forward computed them (same kernels as its split path).
        t1 = t2 = None
        if need_dz2 or need_w3:
            t1p = torch.empty((n * h * w, tiling.width_p), dtype=dtype, device=dev)
            _k1.conv1x1_bias_relu(x, packed["w1p"], packed["b1p"], t1p, tiling=tiling)
            t2p = torch.empty((n * ho * wo, tiling.width_p), dtype=dtype, device=dev)
            _k2a.grouped_conv_bias_relu(nhwc_view(t1p, n, h, w), tiling, packed, nhwc_view(t2p, n, ho, wo), stride,
                                        dilation)
            t1 = _real_channels(t1p, tiling, n, h, w)
            t2 = _real_channels(t2p, tiling, n, ho, wo)

        # dz3 = threshold_backward(grad_y, y); its sums' row 0 is b3's (and bd's)
        # gradient (row 1, against the "identity" xhat of y, is unused).
        dz3 = _empty(n, cout, ho, wo, x)
        part3 = bn_add_relu_backward(grad_y, y, y, None, dz3, stats_c, None)
        if need_b3:
            db3 = _bias_grad(part3, dtype)

        if need_dz2:
            dz2 = _empty(n, width, ho, wo, x)
            part2 = conv1x1_dgrad(dz3, dz3, zeros_c, coef_c, w3, dz2, prev=(t2, stats_w))
            if need_b2:
                db2 = _bias_grad(part2, dtype)
        if need_w3:
            dw3 = conv1x1_wgrad(dz3, dz3, zeros_c, coef_c, t2, w3.shape, w3.dtype)
        if need_wd:
            dwd = conv1x1_wgrad(dz3, dz3, zeros_c, coef_c, x, wd.shape, wd.dtype, stride=stride)

        if need_dz1:
            dz1 = _empty(n, width, h, w, x)
            part1 = grouped_conv_dgrad(dz2, dz2, stats_w, coef_w, packed["w2p"], tiling, t1, stats_w, dz1, stride,
                                       dilation)
            if need_b1:
                db1 = _bias_grad(part1, dtype)
        if need_w2:
            dw2 = grouped_conv_wgrad(t1, stats_w, dz2, dz2, stats_w, coef_w, tiling, stride, dilation, w2.dtype)

        if need_x:
            dx = _empty(*x.shape, x)
            shortcut = (dz3, dz3, zeros_c, coef_c, wd) if projection else (dz3,)
            conv1x1_dgrad(dz1, dz1, zeros_w, coef_w, w1, dx, shortcut=shortcut, stride=stride)
        if need_w1:
            dw1 = conv1x1_wgrad(dz1, dz1, zeros_w, coef_w, x, w1.shape, w1.dtype)
    return dx, dw1, db1, dw2, db2, dw3, db3, dwd


__all__ = ["bottleneck_inference_backward_triton"]
