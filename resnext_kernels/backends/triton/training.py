"""The `triton` backend of the training op (ops/training.py): the block with
batch-statistics BatchNorm, forward and backward, as Triton launches.

Forward (8 launches, 10 with a projection):
    y1, rows1 = conv1(x)                       conv1x1_bn_stats        statistics epilogue
    bn1 = finalize(rows1)                      bn_statistics           mean, invstd, scale, running update
    y2, rows2 = gconv(relu(bn1(y1)))           grouped_conv_bn_stats   BN1 + ReLU prologue
    bn2 = finalize(rows2)
    y3, rows3 = conv3(relu(bn2(y2)))           conv1x1_bn_stats        BN2 + ReLU prologue
    yd, rowsd = proj(x at stride)              conv1x1_bn_stats        (projection only)
    bn3, bnd = finalize(rows3), finalize(rowsd)  (one exchange for both)
    out = relu(bn3(y3) + (x | bnd(yd)))        bn_add_relu
Backward (12 launches + 2 for the projection, + 2 small sums when a wgrad
reduction is split):
    dz3, sums3 = tail backward(grad_out, out, y3, yd)   bn_add_relu_backward
    coef3 (, coefd) = coefficients(sum_rows(sums3))     bn_statistics
    dz2, sums2 = conv3 dgrad (BN3 backward prologue, ReLU2 mask + BN2 sums epilogue)
    dw3 = conv3 wgrad (t2 = relu(bn2(y2)) recomputed); dwd = projection wgrad
    coef2 = coefficients(sum_rows(sums2))
    dz1, sums1 = gconv dgrad (BN2 backward prologue, ReLU1 mask + BN1 sums epilogue)
    dw2 = gconv wgrad (t1 recomputed)
    coef1 = coefficients(sum_rows(sums1))
    dx = conv1 dgrad (BN1 backward prologue) + shortcut (dz3, or the projection's dgrad)
    dw1 = conv1 wgrad

Saved by the op for backward: x, y1, y2, y3, yd, out and bn_stats (the
mean and invstd of every norm, fp32); no post-BN or post-ReLU tensor. The
backward rebuilds each norm's scale and beta from its affine parameters
(bn_statistics.restore). `exchange` (common/batch_stats.py) is the
SyncBatchNorm seam: the rows of the batch-statistics norms pass through
exchange.gather_statistics before their finalize (bn1; bn2; bn3 and bn_d
together), each backward reduction through exchange.reduce_gradient_sums
before the coefficients, with this process's count; the BN weight and bias
gradients are this process's own sums (as nn.SyncBatchNorm's).
"""

import contextlib

import torch

from ...common.batch_stats import (
    BETA,
    COUNT,
    LOCAL,
    MEAN,
    SAVED_ROWS,
    SCALE,
    STATS_ROWS,
    norm_columns,
    norm_counts,
)
from ...common.layout import output_memory_format
from ...common.sizes import conv_output_size
from .bn_add_relu import bn_add_relu, bn_add_relu_backward
from .bn_statistics import backward_coefficients, finalize, restore, sum_rows
from .conv1x1_bn_stats import conv1x1_bn_stats
from .conv1x1_dgrad import conv1x1_dgrad
from .conv1x1_wgrad import conv1x1_wgrad
from .grouped_conv_bn_stats import grouped_conv_bn_stats
from .grouped_conv_dgrad import grouped_conv_dgrad
from .grouped_conv_wgrad import grouped_conv_wgrad
from .packing import GroupTiling, pack_w2

CL = torch.channels_last


def _empty(n, c, h, w, like):
    """A channels_last activation, uninitialized (torch.empty: the tests
    NaN-poison it to catch unwritten elements)."""
    return torch.empty((n, c, h, w), dtype=like.dtype, device=like.device, memory_format=CL)


def _prologue(stats):
    """(mean, scale, beta) rows of a norm's stats block: its BN + ReLU as a prologue."""
    return stats[MEAN], stats[SCALE], stats[BETA]


def bottleneck_training_triton(x, w1, w2, w3, wd, norms, stride, dilation, groups, exchange=LOCAL):
    """Forward; contract of reference.bottleneck_training_reference.

    x [N, Cin, H, W] (channels_last used in place, NCHW converted once;
    out is written in x's memory format, the saved activations channels_last),
    conv weights in x's dtype, norms: 3 or 4 BatchNormArgs (bn1, bn2, bn3,
    bn_d). Returns (out, y1, y2, y3, yd, bn_stats, new_running); yd is an
    empty tensor without projection, bn_stats [SAVED_ROWS, C_total].
    """
    out_format = output_memory_format(x)
    x = x.contiguous(memory_format=CL)
    n, _, h, w = x.shape
    width, cout = w1.shape[0], w3.shape[0]
    ho, wo = conv_output_size(h, stride), conv_output_size(w, stride)
    projection = wd is not None
    cols = norm_columns(width, cout, projection)
    dev = x.device
    work = torch.empty(STATS_ROWS, cols[-1].stop, device=dev)  # the forward's per-channel block
    bn_stats = torch.empty(SAVED_ROWS, cols[-1].stop, device=dev)
    new_running = torch.empty(2, cols[-1].stop, device=dev)
    with torch.cuda.device(dev) if x.is_cuda else contextlib.nullcontext():

        def finish(indices, rows):
            """Finalize the norms `indices` from their statistics rows; the
            rows of batch-statistics norms cross the exchange together."""
            synced = [k for k, i in enumerate(indices) if norms[i].batch_stats]
            if synced:
                exchanged = exchange.gather_statistics([rows[k] for k in synced])
                rows = list(rows)
                for k, r in zip(synced, exchanged):
                    rows[k] = r
            for i, r in zip(indices, rows):
                bn = norms[i]
                finalize(r, bn.weight, bn.bias, bn.running_mean, bn.running_var, work[:, cols[i]],
                         bn_stats[:, cols[i]], new_running[:, cols[i]], bn.eps, bn.momentum, bn.batch_stats)
            return [work[:, cols[i]] for i in indices]

        y1 = _empty(n, width, h, w, x)
        stats1, = finish([0], [conv1x1_bn_stats(x, w1, y1)])
        tiling = GroupTiling(width, groups)
        y2 = _empty(n, width, ho, wo, x)
        stats2, = finish([1], [grouped_conv_bn_stats(y1, pack_w2(w2, tiling), y2, tiling, _prologue(stats1), stride,
                                                     dilation)])
        y3 = _empty(n, cout, ho, wo, x)
        rows3 = conv1x1_bn_stats(y2, w3, y3, _prologue(stats2))
        out = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=dev, memory_format=out_format)
        if projection:
            yd = _empty(n, cout, ho, wo, x)
            stats3, statsd = finish([2, 3], [rows3, conv1x1_bn_stats(x, wd, yd, stride=stride)])
            bn_add_relu(y3, yd, out, stats3, statsd)
        else:
            yd = x.new_empty(0)
            stats3, = finish([2], [rows3])
            bn_add_relu(y3, x, out, stats3, None)
    return out, y1, y2, y3, yd, bn_stats, new_running


def bottleneck_training_backward_triton(grad_out, x, w1, w2, w3, wd, out, y1, y2, y3, yd, bn_stats, affine,
                                        batch_stats, stride, dilation, groups, need_x_grad, exchange=LOCAL):
    """Backward; contract of reference.bottleneck_training_backward_reference.
    affine: per norm (weight, bias), either may be None.
    Returns (dx or None, dw1, dw2, dw3, dwd or None, grad_bn [2, C_total] fp32:
    row 0 the BN weights' gradients, row 1 the biases')."""
    x = x.contiguous(memory_format=CL)
    width, cout = w1.shape[0], w3.shape[0]
    projection = wd is not None
    cols = norm_columns(width, cout, projection)
    dev = x.device
    work = torch.empty(STATS_ROWS, cols[-1].stop, device=dev)
    stats = [work[:, c] for c in cols]
    grad_bn = torch.empty(2, cols[-1].stop, device=dev)
    coefs = [torch.empty(3, c.stop - c.start, device=dev) for c in cols]
    counts = norm_counts(x.shape, stride, len(cols))  # this process's
    with torch.cuda.device(dev) if x.is_cuda else contextlib.nullcontext():
        for i, n in enumerate(counts):
            restore(bn_stats[:, cols[i]], *affine[i], n, stats[i])

        def coefficients(i, local, sums, j):
            """BN i's backward coefficients from row j of its (exchanged)
            gradient sums; its weight and bias gradients are row j of this
            process's own sums (`local`; as nn.SyncBatchNorm's, averaged by
            DistributedDataParallel like any parameter's)."""
            grad_bn[1, cols[i]] = local[0]
            grad_bn[0, cols[i]] = local[j]
            return backward_coefficients(sums[0], sums[j], stats[i], coefs[i], batch_stats[i])

        def reduce(part, indices):
            """[T, J, C] fp64 partial sums of the norms `indices` -> (local,
            exchanged) [J, C] fp64: summed over this process, then over the
            exchange's processes (when a norm uses batch statistics), whose
            count then replaces this process's in the norms' stats blocks."""
            local = sum_rows(part, torch.empty(part.shape[1], part.shape[2], device=dev, dtype=torch.float64))
            if not any(batch_stats[i] for i in indices):
                return local, local
            sums, n = exchange.reduce_gradient_sums(local, counts[indices[0]])
            if isinstance(n, torch.Tensor):  # the group's count (a multi-process exchange)
                for i in indices:
                    stats[i][COUNT].fill_(n)
            return local, sums

        dz3 = _empty(*y3.shape, y3)
        tail = [2, 3] if projection else [2]
        sums3 = reduce(bn_add_relu_backward(grad_out, out, y3, yd if projection else None, dz3, stats[2],
                                            stats[3] if projection else None), tail)
        coef3 = coefficients(2, *sums3, 1)
        coefd = coefficients(3, *sums3, 2) if projection else None

        dz2 = _empty(*y2.shape, y2)
        sums2 = reduce(conv1x1_dgrad(dz3, y3, stats[2][MEAN], coef3, w3, dz2, prev=(y2, stats[1])), [1])
        dw3 = conv1x1_wgrad(dz3, y3, stats[2][MEAN], coef3, y2, w3.shape, w3.dtype, prologue=_prologue(stats[1]))
        dwd = None
        if projection:
            dwd = conv1x1_wgrad(dz3, yd, stats[3][MEAN], coefd, x, wd.shape, wd.dtype, stride=stride)
        coef2 = coefficients(1, *sums2, 1)

        tiling = GroupTiling(width, groups)
        dz1 = _empty(*y1.shape, y1)
        sums1 = reduce(grouped_conv_dgrad(dz2, y2, stats[1], coef2, pack_w2(w2, tiling), tiling, y1, stats[0], dz1,
                                          stride, dilation), [0])
        dw2 = grouped_conv_wgrad(y1, stats[0], dz2, y2, stats[1], coef2, tiling, stride, dilation, w2.dtype)
        coef1 = coefficients(0, *sums1, 1)

        dx = None
        if need_x_grad:
            dx = _empty(*x.shape, x)
            shortcut = (dz3, yd, stats[3][MEAN], coefd, wd) if projection else (dz3,)
            conv1x1_dgrad(dz1, y1, stats[0][MEAN], coef1, w1, dx, shortcut=shortcut, stride=stride)
        dw1 = conv1x1_wgrad(dz1, y1, stats[0][MEAN], coef1, x, w1.shape, w1.dtype)
    return dx, dw1, dw2, dw3, dwd, grad_bn  # weight gradients accumulated in fp32, rounded once


__all__ = ["bottleneck_training_backward_triton", "bottleneck_training_triton"]
