"""The `reference` backend: the folded inference block, and the training
block (batch-statistics BatchNorm, forward and backward), from ATen ops.

Works on any device and in any floating dtype (float64 included, which
gradcheck needs). It is also the ground truth the fused kernels are tested
against, computed in float64 on CPU.

The training block takes the same `exchange` (common/batch_stats.py, the
SyncBatchNorm seam) as the triton backend, at the same points: with LOCAL
each norm is ATen's batch norm; with a multi-process exchange the
batch-statistics norms are normalized with the group's statistics (this
process's rows exchanged and merged, then ATen's batch norm in its
running-statistics form) and BN's backward uses the group's gradient sums
and count.
"""

import torch
import torch.nn.functional as F

from ..common.batch_stats import (
    BETA,
    COUNT,
    INVSTD,
    LOCAL,
    MEAN,
    SAVED_ROWS,
    SCALE,
    STATS_ROWS,
    StatisticsRows,
    norm_columns,
    norm_counts,
    stats_dtype,
    synchronized_statistics,
)
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


# -- the training op (batch-statistics BatchNorm) ---------------------------------


def _local_rows(y):
    """This process's statistics of y [N, C, H, W] as one StatisticsRows row (float64)."""
    yd = y.double()
    mean = yd.mean((0, 2, 3))
    m2 = (yd - mean[:, None, None]).square().sum((0, 2, 3))
    count = torch.full((1,), y.numel() // y.shape[1], dtype=torch.float64, device=y.device)
    return StatisticsRows(count, mean[None], m2[None])


def _bn_forward(y, bn, stats, new_running, rows=None):
    """ATen's batch norm of y for one BatchNormArgs, on copies of the running
    stats; fills the norm's columns of stats (mean, invstd) and new_running
    (mean, var after the update). Returns BN's output.

    rows: the exchanged StatisticsRows of a batch-statistics norm (a
    multi-process exchange): y is normalized with their merged mean and
    biased variance (ATen's batch norm in its running-statistics form) and
    the running stats updated with them, as nn.SyncBatchNorm does; None:
    this process's own statistics (ATen's batch norm in training form)."""
    sd = stats.dtype
    rm = None if bn.running_mean is None else bn.running_mean.clone()
    rv = None if bn.running_var is None else bn.running_var.clone()
    if rows is not None:
        mean, var, new_running[0], new_running[1] = synchronized_statistics(rows, bn, sd)  # merged in float64
        z = torch.native_batch_norm(y, bn.weight, bn.bias, mean, var.to(sd), False, 0.0, bn.eps)[0]
        stats[MEAN], stats[INVSTD] = mean, torch.rsqrt(var + bn.eps).to(sd)
        return z
    z, save_mean, save_invstd = torch.native_batch_norm(y, bn.weight, bn.bias, rm, rv, bn.batch_stats, bn.momentum,
                                                        bn.eps)
    if bn.batch_stats:
        mean, invstd = save_mean.to(sd), save_invstd.to(sd)
        if rm is None:  # no running stats: the batch mean and unbiased variance
            rv, rm = torch.var_mean(y.to(sd), dim=(0, 2, 3), correction=1)
    else:
        mean, invstd = rm.to(sd), torch.rsqrt(rv.to(sd) + bn.eps)
    stats[MEAN], stats[INVSTD] = mean, invstd
    new_running[0], new_running[1] = rm.to(sd), rv.to(sd)
    return z


def bottleneck_training_reference(x, w1, w2, w3, wd, norms, stride, dilation, groups, exchange=LOCAL):
    """The training op's forward from ATen ops (conv2d, native_batch_norm,
    relu), any device and floating dtype: the ground truth of the triton
    backend's kernels.

    x [N, Cin, H, W]; conv weights w1, w2, w3 (wd or None) in x's dtype;
    norms: bn1, bn2, bn3 (, bn_d) as common.batch_stats.BatchNormArgs;
    exchange: the statistics exchange (module docstring).
    Returns (out, y1, y2, y3, yd, bn_stats, new_running): out = relu(bn3(y3) +
    shortcut) in x's memory format and the raw conv outputs y1..y3, yd ([0]
    without projection), channels_last; bn_stats [STATS_ROWS, C_total] and new_running [2, C_total]
    (the running mean and variance after the update; without running stats
    the batch mean and unbiased variance) in stats_dtype(x.dtype), columns per
    norm as norm_columns gives them; bn_stats has SAVED_ROWS rows (mean,
    invstd). The running stats passed in are not modified.
    """
    width, cout = w1.shape[0], w3.shape[0]
    cols = norm_columns(width, cout, wd is not None)
    sd = stats_dtype(x.dtype)
    bn_stats = torch.empty(SAVED_ROWS, cols[-1].stop, dtype=sd, device=x.device)
    new_running = torch.empty(2, cols[-1].stop, dtype=sd, device=x.device)

    def bn(indices, ys):
        """BN outputs of the norms `indices` (finalized at one point of the
        block: the triton backend's order) for their conv outputs `ys`."""
        rows = [None] * len(indices)
        if exchange is not LOCAL:
            synced = [k for k, i in enumerate(indices) if norms[i].batch_stats]
            if synced:
                for k, r in zip(synced, exchange.gather_statistics([_local_rows(ys[k]) for k in synced])):
                    rows[k] = r
        return [_bn_forward(y, norms[i], bn_stats[:, cols[i]], new_running[:, cols[i]], r)
                for i, y, r in zip(indices, ys, rows)]

    y1 = F.conv2d(x, w1)
    y2 = F.conv2d(F.relu(bn([0], [y1])[0]), w2, stride=stride, padding=dilation, dilation=dilation, groups=groups)
    y3 = F.conv2d(F.relu(bn([1], [y2])[0]), w3)
    if wd is None:
        yd, shortcut = x.new_empty(0), x
        z3, = bn([2], [y3])
    else:
        yd = F.conv2d(x, wd, stride=stride)
        z3, shortcut = bn([2, 3], [y3, yd])
    out = F.relu(z3 + shortcut)
    cl = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in (y1, y2, y3, yd)]
    return (out.contiguous(memory_format=output_memory_format(x)), *cl, bn_stats, new_running)


def _conv_backward(grad, inp, weight, stride=1, padding=0, dilation=1, groups=1, need_input=True):
    gi, gw, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight, None, [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], groups,
        [need_input, True, False])
    return gi, gw


def bottleneck_training_backward_reference(grad_out, x, w1, w2, w3, wd, out, y1, y2, y3, yd, bn_stats, affine,
                                           batch_stats, stride, dilation, groups, need_x_grad, exchange=LOCAL):
    """The training op's backward from ATen ops (convolution_backward,
    threshold_backward) and BatchNorm's backward formula, from what the
    forward saved (post-BN/ReLU activations recomputed from y, bn_stats and
    the affine parameters).

    affine: per norm (weight, bias), either may be None; batch_stats: per
    norm, whether it normalized with batch statistics; exchange: the
    statistics exchange (module docstring; the gradient sums of the tail's
    norms bn3 and bn_d cross it together, as in the triton backend).
    Returns (dx or None, dw1, dw2, dw3, dwd or None, grad_bn [2, C_total]):
    grad_bn row 0 the BN weights' gradients sum(dz * xhat), row 1 the
    biases' sum(dz), this process's own, in bn_stats' dtype.
    """
    width, cout = w1.shape[0], w3.shape[0]
    cols = norm_columns(width, cout, wd is not None)
    sd, dtype = bn_stats.dtype, x.dtype
    counts = norm_counts(x.shape, stride, len(cols))
    work = torch.empty(STATS_ROWS, cols[-1].stop, dtype=sd, device=x.device)  # restored: see batch_stats
    for col, (weight, bias), n in zip(cols, affine, counts):
        work[MEAN, col], work[INVSTD, col] = bn_stats[MEAN, col], bn_stats[INVSTD, col]
        work[SCALE, col] = bn_stats[INVSTD, col] * (1.0 if weight is None else weight.to(sd))
        work[BETA, col] = 0.0 if bias is None else bias.to(sd)
        work[COUNT, col] = n
    stats = [work[:, c, None, None] for c in cols]  # [STATS_ROWS, C, 1, 1]: broadcasts over NCHW
    grad_bn = torch.empty(2, cols[-1].stop, dtype=sd, device=x.device)

    def bn_relu(y, s):
        return F.relu(((y.to(sd) - s[MEAN]) * s[SCALE] + s[BETA]).to(dtype))

    def bn_backward(indices, dz, ys):
        """BN's input gradients of the norms `indices`, which share the
        output gradient dz (bn3 and bn_d do), for their inputs ys."""
        dzf = dz.to(sd)
        xhats = [(y.to(sd) - stats[i][MEAN]) * stats[i][INVSTD] for i, y in zip(indices, ys)]
        local = torch.stack([dzf.sum((0, 2, 3))] + [(dzf * xhat).sum((0, 2, 3)) for xhat in xhats])
        for j, i in enumerate(indices, start=1):
            grad_bn[0, cols[i]], grad_bn[1, cols[i]] = local[j], local[0]
        sums, n = local, stats[indices[0]][COUNT]
        if any(batch_stats[i] for i in indices):
            # float64 across processes, as the triton backend's sums (and an empty rank's zeros, ops/empty_batch.py)
            sums, n = exchange.reduce_gradient_sums(local.double(), counts[indices[0]])
            sums = sums.to(sd)
        grads = []
        for j, (i, xhat) in enumerate(zip(indices, xhats), start=1):
            scale = stats[i][SCALE]
            if batch_stats[i]:
                grads.append((scale * (dzf - sums[0, :, None, None] / n - xhat * sums[j, :, None, None] / n)).to(dtype))
            else:
                grads.append((scale * dzf).to(dtype))
        return grads

    t1, t2 = bn_relu(y1, stats[0]), bn_relu(y2, stats[1])
    dz3 = torch.ops.aten.threshold_backward(grad_out, out, 0)
    if wd is None:
        dy3, = bn_backward([2], dz3, [y3])
    else:
        dy3, dyd = bn_backward([2, 3], dz3, [y3, yd])
    dt2, dw3 = _conv_backward(dy3, t2, w3)
    dwd = shortcut = None
    if wd is not None:
        shortcut, dwd = _conv_backward(dyd, x, wd, stride, need_input=need_x_grad)
    elif need_x_grad:
        shortcut = dz3
    dz2 = torch.ops.aten.threshold_backward(dt2, t2, 0)
    dy2, = bn_backward([1], dz2, [y2])
    dt1, dw2 = _conv_backward(dy2, t1, w2, stride, dilation, dilation, groups)
    dz1 = torch.ops.aten.threshold_backward(dt1, t1, 0)
    dy1, = bn_backward([0], dz1, [y1])
    dx, dw1 = _conv_backward(dy1, x, w1, need_input=need_x_grad)
    if need_x_grad:
        dx = (dx + shortcut).contiguous(memory_format=torch.channels_last)
    return dx, dw1, dw2, dw3, dwd, grad_bn
